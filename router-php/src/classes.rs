//! The PHP API (namespace `MessageRouter`) and the run loop on the PHP thread.
//!
//! What a handler does becomes an outcome (README "Use from PHP / Symfony"):
//! return → ack; `RetryLater` → retry after its delay; `Reject` → dead-letter now;
//! any other Throwable → a failed attempt (retried per policy, then dead-lettered with
//! class, message and trace). `exit()` and fatal errors end the process: the message
//! in hand is never answered, so the broker gets it back unsettled.

// Parameter names are PHP's (named arguments): camelCase, as PHP code writes them.
// The macros copy them into generated code, so the allowance is module-wide.
#![allow(non_snake_case)]

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ext_php_rs::binary::Binary;
use ext_php_rs::boxed::ZBox;
use ext_php_rs::class::RegisteredClass;
use ext_php_rs::convert::IntoZval;
use ext_php_rs::ffi::{
    zend_call_known_function, zend_fcall_info_cache, zend_is_callable_ex, ZEND_ACC_CALL_VIA_TRAMPOLINE,
};
use ext_php_rs::flags::PropertyFlags;
use ext_php_rs::prelude::*;
use ext_php_rs::types::{ZendCallable, ZendHashTable, ZendStr, Zval};
use ext_php_rs::zend::{ce, try_catch, CatchError, ExecutorGlobals};
use router_core::config::Config;
use router_core::Outcome;

use crate::convert;
use crate::signals;
use crate::worker::{Job, Limits, Reply, Running, Selection, StopReason};

/// How long the PHP thread waits for a batch before it looks at limits and signals.
const POLL: Duration = Duration::from_millis(100);

/// A handler object: what `Router::route()` takes besides callables.
#[php_interface]
#[php(name = "MessageRouter\\Handler")]
pub trait Handler {
    fn handle(&self, message: &Message);
}

/// One delivery as a handler sees it: read-only. It owns the delivery's message as the
/// router handed it over (body and headers are converted to PHP values only when the
/// handler asks for them, not for every message).
#[php_class]
#[php(name = "MessageRouter\\Message")]
#[derive(Clone, Default)]
pub struct Message {
    message: router_core::Message,
    route: String,
    handler: String,
    subscription: String,
    attempt: i64,
    /// The router's span of this attempt (tracing on), else None.
    traceparent: Option<String>,
}

#[php_impl]
impl Message {
    /// For tests and the HTTP entry point (daemon mode builds messages in PHP).
    #[php(defaults(attempt = 1))]
    #[allow(clippy::too_many_arguments)]
    pub fn __construct(
        body: Binary<u8>,
        headers: Option<HashMap<String, String>>,
        id: Option<String>,
        key: Option<String>,
        route: Option<String>,
        attempt: Option<i64>,
        source: Option<String>,
        subscription: Option<String>,
        handler: Option<String>,
        contentType: Option<String>,
        kind: Option<String>,
        traceparent: Option<String>,
    ) -> Self {
        Message {
            message: router_core::Message {
                id: id.unwrap_or_default(),
                body: Vec::<u8>::from(body).into(),
                headers: headers.unwrap_or_default().into_iter().collect(),
                key,
                content_type: contentType,
                kind,
                timestamp: None,
                source: source.unwrap_or_default(),
            },
            route: route.unwrap_or_default(),
            handler: handler.unwrap_or_default(),
            subscription: subscription.unwrap_or_default(),
            attempt: attempt.unwrap_or(1),
            traceparent,
        }
    }

    /// The broker's message id (`message_id` / `ce_id`), or one the router made.
    pub fn id(&self) -> String {
        self.message.id.clone()
    }

    /// The payload, byte for byte (never assumed to be UTF-8 or JSON).
    pub fn body(&self) -> BodyBytes<'_> {
        BodyBytes(&self.message.body)
    }

    /// Message headers (AMQP headers, Kafka headers, Redis fields), by name.
    pub fn headers(&self) -> BTreeMap<String, String> {
        self.message.headers.clone()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.message.headers.get(name).cloned()
    }

    /// The routing key (AMQP), the topic (Kafka), the stream (Redis).
    pub fn key(&self) -> Option<String> {
        self.message.key.clone()
    }

    pub fn content_type(&self) -> Option<String> {
        self.message.content_type.clone()
    }

    /// The message type (AMQP `type`, a `type` header or field).
    #[php(name = "type")]
    pub fn kind(&self) -> Option<String> {
        self.message.kind.clone()
    }

    /// Where it came from, without credentials (`amqp://host/queue`, ...).
    pub fn source(&self) -> String {
        self.message.source.clone()
    }

    pub fn route(&self) -> String {
        self.route.clone()
    }

    pub fn handler(&self) -> String {
        self.handler.clone()
    }

    pub fn subscription(&self) -> String {
        self.subscription.clone()
    }

    /// 1 for the first delivery.
    pub fn attempt(&self) -> i64 {
        self.attempt
    }

    /// W3C trace context to continue (PHP's OpenTelemetry SDK: `TraceContextPropagator`
    /// over `['traceparent' => $m->traceparent()]`): the router's span of this attempt
    /// when tracing is on, else the message's own `traceparent` header (any case).
    pub fn traceparent(&self) -> Option<String> {
        self.traceparent.clone().or_else(|| {
            self.message.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("traceparent")).map(|(_, v)| v.clone())
        })
    }
}

/// A body handed to PHP straight from the delivery's bytes: one copy, into the PHP
/// string (`Binary` would copy into a `Vec` first).
pub struct BodyBytes<'a>(&'a [u8]);

impl IntoZval for BodyBytes<'_> {
    const TYPE: ext_php_rs::flags::DataType = ext_php_rs::flags::DataType::String;
    const NULLABLE: bool = false;

    fn set_zval(self, zv: &mut Zval, persistent: bool) -> ext_php_rs::error::Result<()> {
        zv.set_zend_string(ZendStr::new(self.0, persistent));
        Ok(())
    }
}

impl Message {
    /// The job's message itself, moved (not copied) into the PHP object.
    fn from_job(job: Job) -> (Self, Reply) {
        let Job { message, attempt, subscription, route, handler, traceparent, reply } = job;
        let m = Message { message, route, handler, subscription, attempt: i64::from(attempt), traceparent };
        (m, reply)
    }
}

/// Throw it to have the message retried after `delay` seconds (0: the policy's
/// backoff). Counts as a failed attempt.
#[php_class]
#[php(name = "MessageRouter\\RetryLater")]
#[php(extends(ce = ce::exception, stub = "\\Exception"))]
#[derive(Default)]
pub struct RetryLater {
    // Shadows \Exception::$message, so getMessage() returns it.
    #[php(prop, flags = PropertyFlags::Protected)]
    message: String,
    delay: f64,
}

#[php_impl]
impl RetryLater {
    #[php(defaults(delay = 0.0))]
    pub fn __construct(delay: Option<f64>, message: Option<String>) -> Self {
        let delay = delay.unwrap_or(0.0);
        let message = message.unwrap_or_else(|| format!("retry in {delay}s"));
        RetryLater { message, delay }
    }

    /// Seconds to wait before the next attempt (0: the retry policy decides).
    pub fn delay(&self) -> f64 {
        self.delay
    }
}

/// Throw it to dead-letter the message now, with the exception's message as the
/// reason (a poison message: no retry helps).
#[php_class]
#[php(name = "MessageRouter\\Reject")]
#[php(extends(ce = ce::exception, stub = "\\Exception"))]
#[derive(Default)]
pub struct Reject {
    // Shadows \Exception::$message, so getMessage() returns the reason.
    #[php(prop, flags = PropertyFlags::Protected)]
    message: String,
}

#[php_impl]
impl Reject {
    pub fn __construct(reason: Option<String>) -> Self {
        Reject { message: reason.unwrap_or_else(|| "rejected".into()) }
    }

    /// Why the message is dead-lettered (its dead-letter reason).
    pub fn reason(&self) -> String {
        self.message.clone()
    }
}

/// The in-process router: the daemon's config, PHP handlers, `run()`.
#[php_class]
#[php(name = "MessageRouter\\Router")]
pub struct Router {
    config: RefCell<Config>,
    /// The file the config came from: SIGHUP and `reload()` read it again.
    source: Option<std::path::PathBuf>,
    /// A config `reload()` asked for during `run()`, applied between batches.
    pending: RefCell<Option<Config>>,
    /// Route or handler name → the handler to call.
    handlers: RefCell<HashMap<String, Registered>>,
    stop: Arc<AtomicBool>,
    running: Cell<bool>,
    /// The subscriptions the current `run()` consumes; a reload keeps to them.
    selection: RefCell<Selection>,
}

#[php_impl]
impl Router {
    /// `$config`: the path of a YAML file in the daemon's format, or an array of the
    /// same shape. A bad config throws with the file, key path and problem.
    pub fn __construct(config: &Zval) -> PhpResult<Self> {
        let source = config.str().map(std::path::PathBuf::from);
        Ok(Router::with(read_config(config)?, source))
    }

    /// Build from YAML text (`$name` names it in errors).
    pub fn from_yaml(yaml: &str, name: Option<String>) -> PhpResult<Self> {
        let name = name.unwrap_or_else(|| "inline.yaml".into());
        let config =
            router_core::config::parse(yaml, &name, &|var| std::env::var(var).ok()).map_err(|e| e.to_string())?;
        Ok(Router::with(config, None))
    }

    /// Load a new config (a YAML file path or an array; none: the file this router was
    /// built from) and apply it as a diff (README "Reload"): during `run()` between two
    /// batches, what did not change keeps running. A bad config throws here with the
    /// file, key path and problem, and the running one stays.
    pub fn reload(&self, config: Option<&Zval>) -> PhpResult<()> {
        let config = match config {
            Some(c) => read_config(c)?,
            None => match &self.source {
                Some(path) => router_core::config::load(path).map_err(|e| e.to_string())?,
                None => {
                    return Err("MessageRouter\\Router::reload(): this router was built from an array or YAML text; pass the new config".into())
                }
            },
        };
        if self.running.get() {
            *self.pending.borrow_mut() = Some(config);
        } else {
            *self.config.borrow_mut() = config;
        }
        Ok(())
    }

    /// Handle the messages of route `$name` (or of every route of handler `$name`)
    /// with `$handler`: a callable, or an object implementing `Handler`.
    pub fn route(&self, name: &str, handler: &Zval) -> PhpResult<()> {
        if self.running.get() {
            return Err("MessageRouter\\Router::route(): cannot change handlers while running".into());
        }
        let config = self.config.borrow();
        let known = config.routes.iter().any(|r| r.name == name) || config.handlers.contains_key(name);
        if !known {
            return Err(format!(
                "MessageRouter\\Router::route(): {name:?} is neither a route nor a handler of the config (routes: {}; handlers: {})",
                config.routes.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", "),
                config.handlers.keys().map(String::as_str).collect::<Vec<_>>().join(", "),
            )
            .into());
        }
        let callable = callable_of(handler)?;
        self.handlers.borrow_mut().insert(name.to_string(), Registered::new(callable));
        Ok(())
    }

    /// The route names and handler names of the config: what `route()` takes.
    pub fn names(&self) -> Vec<String> {
        let config = self.config.borrow();
        let mut names: Vec<String> = config.routes.iter().map(|r| r.name.clone()).collect();
        names.extend(config.handlers.keys().cloned());
        names.sort();
        names.dedup();
        names
    }

    /// Consume until a limit is reached, SIGTERM/SIGINT arrives or `stop()` is called;
    /// then stop fetching, finish what is in flight and return
    /// `['handled' => int, 'reason' => string]`. Options: `limit` (messages),
    /// `time_limit` (seconds), `memory_limit` (bytes, or "128M"), `subscriptions`
    /// (names: only these), `queues` (AMQP queue names: only the subscriptions reading
    /// them).
    pub fn run(&self, options: Option<&ZendHashTable>) -> PhpResult<ZBox<ZendHashTable>> {
        if self.running.replace(true) {
            return Err("MessageRouter\\Router::run() is already running".into());
        }
        let result = self.run_inner(options);
        self.running.set(false);
        result
    }

    /// Stop after the message in hand (from a handler, or a pcntl signal handler).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl Router {
    fn run_inner(&self, options: Option<&ZendHashTable>) -> PhpResult<ZBox<ZendHashTable>> {
        let (limits, selection) = match options {
            Some(o) => convert::run_options(o)?,
            None => (Limits::default(), Selection::default()),
        };
        let config =
            selection.apply(&self.config.borrow()).map_err(|e| format!("MessageRouter\\Router::run(): {e}"))?;
        self.check_handlers(&config)?;
        self.stop.store(false, Ordering::SeqCst);
        self.pending.borrow_mut().take();
        let running = Running::start(&config)?;
        *self.selection.borrow_mut() = selection;
        let caught = signals::catch();
        let started = Instant::now();
        let mut handled = 0u64;
        let mut reason: Option<StopReason> = None;
        // After every message and every wait: the first stop reason stops fetching.
        let note_stop = |reason: &mut Option<StopReason>, handled: u64, running: &Running| {
            if reason.is_none() {
                *reason = self.stop_reason(&limits, handled, started, &caught);
                if reason.is_some() {
                    running.stop();
                }
            }
        };
        let answers = running.answers();
        loop {
            let batch = running.next_batch(POLL);
            if batch.is_empty() && running.finished() {
                break;
            }
            let mut jobs = batch.into_iter();
            while let Some(job) = jobs.next() {
                if job.abandoned() {
                    continue;
                }
                match self.call(job) {
                    (Called::Outcome(outcome), reply) => {
                        answers.push(reply, outcome);
                        handled += 1;
                    }
                    (crash @ (Called::Exit | Called::Bailout), reply) => {
                        // exit() or a fatal error: the process is going away. The
                        // messages handled before it are settled; this one and the rest
                        // of the batch stay unanswered (never acked: the broker
                        // redelivers them).
                        answers.flush();
                        std::mem::forget(reply);
                        jobs.for_each(std::mem::forget);
                        std::mem::forget(answers);
                        std::mem::forget(running);
                        if matches!(crash, Called::Bailout) {
                            // SAFETY: re-raising the bailout caught around the handler
                            // call; nothing of ours on this frame needs dropping.
                            unsafe { ext_php_rs::zend::bailout() }
                        }
                        // Let the exit go on.
                        return Ok(ZendHashTable::new());
                    }
                }
                note_stop(&mut reason, handled, &running);
            }
            // Before waiting for the next batch: what is handled goes back now.
            answers.flush();
            note_stop(&mut reason, handled, &running);
            if reason.is_none() {
                self.reload_between_batches(&running, &caught);
            }
            if reason.is_none() && running.finished() {
                reason = Some(StopReason::RouterEnded);
            }
        }
        answers.flush();
        drop(caught);
        if let Some(failure) = running.failure() {
            // A subscription cannot run as configured: an error, never a normal return.
            return Err(format!("MessageRouter\\Router::run(): {failure}").into());
        }
        let mut out = ZendHashTable::new();
        out.insert("handled", handled as i64)?;
        out.insert("reason", reason.unwrap_or(StopReason::RouterEnded).as_str())?;
        Ok(out)
    }

    fn stop_reason(
        &self,
        limits: &Limits,
        handled: u64,
        started: Instant,
        caught: &signals::Caught,
    ) -> Option<StopReason> {
        if let Some(sig) = caught.signal() {
            return Some(StopReason::Signal(sig));
        }
        if self.stop.load(Ordering::SeqCst) {
            return Some(StopReason::Requested);
        }
        limits.reached(handled, started, memory_usage)
    }

    /// SIGHUP (read the source file again) or `reload()`: apply the new config as a
    /// diff. A refusal is logged and the running config stays, as in the daemon.
    fn reload_between_batches(&self, running: &Running, caught: &signals::Caught) {
        if caught.take_hangup() {
            match &self.source {
                Some(path) => match router_core::config::load(path) {
                    Ok(c) => *self.pending.borrow_mut() = Some(c),
                    Err(e) => {
                        tracing::error!(errors = %e.to_string().replace('\n', "; "), "SIGHUP: reload refused: the configuration is invalid; the running one stays")
                    }
                },
                None => tracing::warn!(
                    "SIGHUP: this router was built from an array or YAML text, not a file; call $router->reload($config)"
                ),
            }
        }
        let Some(whole) = self.pending.borrow_mut().take() else { return };
        let config = match self.selection.borrow().apply(&whole) {
            Ok(config) => config,
            Err(e) => {
                tracing::error!(error = %e, "reload refused: the subscriptions this run consumes are gone; the running configuration stays");
                return;
            }
        };
        if let Err(e) = self.check_handlers(&config) {
            tracing::error!(error = %e, "reload refused; the running configuration stays");
            return;
        }
        match running.reload(&config) {
            Ok(diff) => {
                tracing::info!(changes = %diff.summary(), "configuration reloaded");
                if !diff.restart_needed.is_empty() {
                    tracing::warn!(keys = %diff.restart_needed.join(", "), "reload: these settings take effect only after a restart");
                }
                *self.config.borrow_mut() = whole;
            }
            Err(e) => tracing::error!(error = %e, "reload failed; the running configuration stays"),
        }
    }

    fn with(config: Config, source: Option<std::path::PathBuf>) -> Self {
        Router {
            config: RefCell::new(config),
            source,
            pending: RefCell::default(),
            handlers: RefCell::default(),
            stop: Arc::default(),
            running: Cell::new(false),
            selection: RefCell::default(),
        }
    }

    /// Every route of `config` must have a PHP handler, by its name or its handler's.
    fn check_handlers(&self, config: &Config) -> Result<(), String> {
        let handlers = self.handlers.borrow();
        let mut missing = Vec::new();
        for r in &config.routes {
            if !handlers.contains_key(&r.name) && !handlers.contains_key(&r.handler) {
                missing.push(format!("route {:?} (handler {:?})", r.name, r.handler));
            }
        }
        for (name, s) in &config.subscriptions {
            if let Some(h) = &s.default_handler {
                if !handlers.contains_key(h) {
                    missing.push(format!("handler {h:?} (default of subscription {name:?})"));
                }
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "MessageRouter\\Router::run(): no PHP handler for {}: register one with $router->route(name, $handler)",
                missing.join(", ")
            ))
        }
    }

    /// Call the handler of `job` and say how it went; the job's reply to answer with.
    fn call(&self, job: Job) -> (Called, Reply) {
        let handlers = self.handlers.borrow();
        let Some(registered) = handlers.get(&job.route).or_else(|| handlers.get(&job.handler)) else {
            let reason = format!("no PHP handler for route {:?} (handler {:?})", job.route, job.handler);
            return (Called::Outcome(Outcome::Undeliverable { reason }), job.reply);
        };
        let (message, reply) = Message::from_job(job);
        let mut message = match message.into_zval(false) {
            Ok(m) => m,
            Err(e) => {
                let error = format!("cannot build the message: {e}");
                return (Called::Outcome(Outcome::Retry { after: None, error }), reply);
            }
        };
        let result = try_catch(AssertUnwindSafe(|| registered.call(&mut message)));
        // The message (and the delivery data it owns) is freed here, on this thread,
        // unless the handler kept a reference to it.
        drop(message);
        let called = match result {
            Err(CatchError::Bailout) => Called::Bailout,
            Err(e) => Called::Outcome(Outcome::Retry { after: None, error: format!("the handler panicked: {e}") }),
            Ok(true) if !ExecutorGlobals::has_exception() => Called::Outcome(Outcome::Ack),
            Ok(_) => thrown(),
        };
        (called, reply)
    }
}

/// A handler as registered: the callable, and what calling it needs, resolved once.
struct Registered {
    /// Kept alive here: `fcc` points into it.
    callable: Zval,
    /// The function, object and scope `zend_call_known_function` calls, looked up by
    /// `zend_is_callable_ex` once instead of on every call (20–35% of a no-op call's
    /// cost). None: called through `ZendCallable` each time.
    fcc: Option<zend_fcall_info_cache>,
}

impl Registered {
    fn new(callable: Zval) -> Self {
        // As a Closure, the function is never a __call trampoline (a trampoline is
        // freed by the call that uses it, so it could not be called twice).
        let callable = ZendCallable::try_from_name("Closure::fromCallable")
            .ok()
            .and_then(|from| match from.try_call(vec![&callable]) {
                Ok(closure) => Some(closure),
                Err(_) => {
                    // It stays callable as given: the exception says nothing to keep.
                    let _ = ExecutorGlobals::take_exception();
                    None
                }
            })
            .filter(|c| c.object().is_some())
            .unwrap_or(callable);
        // SAFETY: zend_is_callable_ex reads the zval (ours, alive) and fills `fcc`;
        // no name or error string is asked for, so nothing needs freeing.
        let fcc = unsafe {
            let mut fcc: zend_fcall_info_cache = std::mem::zeroed();
            let zval = std::ptr::from_ref(&callable).cast_mut();
            let ok = zend_is_callable_ex(
                zval,
                std::ptr::null_mut(),
                0,
                std::ptr::null_mut(),
                &mut fcc,
                std::ptr::null_mut(),
            );
            let usable = ok
                && !fcc.function_handler.is_null()
                && (*fcc.function_handler).common.fn_flags & ZEND_ACC_CALL_VIA_TRAMPOLINE == 0;
            usable.then_some(fcc)
        };
        Registered { callable, fcc }
    }

    /// Call it with `message`; false: it could not be called. An exception it threw
    /// stays pending in EG(exception).
    fn call(&self, message: &mut Zval) -> bool {
        match &self.fcc {
            Some(fcc) => {
                let mut retval = Zval::new();
                // SAFETY: `fcc` was resolved from `self.callable`, which is alive and
                // holds the closure (and its bound object) it points into; the call
                // copies the one parameter into its frame.
                unsafe {
                    zend_call_known_function(
                        fcc.function_handler,
                        fcc.object,
                        fcc.called_scope,
                        &mut retval,
                        1,
                        message,
                        std::ptr::null_mut(),
                    );
                }
                true
            }
            None => match ZendCallable::new(&self.callable) {
                Ok(f) => f.try_call(vec![&*message]).is_ok() || ExecutorGlobals::has_exception(),
                Err(_) => false,
            },
        }
    }
}

enum Called {
    Outcome(Outcome),
    /// `exit()` or `die()` (a pending non-Throwable unwind).
    Exit,
    /// A fatal error unwound past the call.
    Bailout,
}

/// What the pending exception says.
fn thrown() -> Called {
    let is_throwable = ExecutorGlobals::get().exception().is_some_and(|e| e.instance_of(ce::throwable()));
    if !is_throwable {
        if ExecutorGlobals::has_exception() {
            return Called::Exit;
        }
        return Called::Outcome(Outcome::Retry { after: None, error: "the handler could not be called".into() });
    }
    let Some(ex) = ExecutorGlobals::take_exception() else {
        return Called::Outcome(Outcome::Retry { after: None, error: "the handler failed".into() });
    };
    let text = |method: &str| -> String {
        let got = ex.try_call_method(method, vec![]).ok().and_then(|z| z.string()).unwrap_or_default();
        // A method of a user's exception class may itself throw: drop that one.
        let _ = ExecutorGlobals::take_exception();
        got
    };
    if ex.instance_of(RetryLater::get_metadata().ce()) {
        let delay = ex.try_call_method("delay", vec![]).ok().and_then(|z| z.double()).unwrap_or(0.0);
        let _ = ExecutorGlobals::take_exception();
        let after = (delay > 0.0 && delay.is_finite()).then(|| Duration::from_secs_f64(delay));
        return Called::Outcome(Outcome::Retry { after, error: format!("RetryLater: {}", text("getMessage")) });
    }
    if ex.instance_of(Reject::get_metadata().ce()) {
        return Called::Outcome(Outcome::Reject { reason: text("getMessage") });
    }
    let class = ex.get_class_name().unwrap_or_else(|_| "Throwable".into());
    let error = format!("{class}: {}\n{}", text("getMessage"), text("getTraceAsString"));
    Called::Outcome(Outcome::Retry { after: None, error })
}

/// A callable as given, or `[$object, 'handle']` for a handler object.
/// A config given to PHP: a YAML file path or an array of the same shape.
fn read_config(config: &Zval) -> PhpResult<Config> {
    match (config.str(), config.array()) {
        (Some(path), _) => Ok(router_core::config::load(std::path::Path::new(path)).map_err(|e| e.to_string())?),
        (None, Some(array)) => convert::config_from_array(array),
        _ => Err("MessageRouter\\Router: the config is a YAML file path or an array".into()),
    }
}

fn callable_of(handler: &Zval) -> PhpResult<Zval> {
    if handler.is_callable() {
        return Ok(handler.shallow_clone());
    }
    // Any object with a public handle() method (implementing Handler or not):
    // `[$object, 'handle']` is callable exactly then.
    if handler.object().is_some() {
        let mut pair = ZendHashTable::new();
        pair.push(handler.shallow_clone())?;
        pair.push("handle")?;
        let mut callable = Zval::new();
        callable.set_hashtable(pair);
        if callable.is_callable() {
            return Ok(callable);
        }
    }
    Err("MessageRouter\\Router::route(): the handler must be a callable or an object implementing MessageRouter\\Handler (a public handle(Message) method)".into())
}

/// PHP's own `memory_get_usage()`, what `--memory-limit` means to PHP developers.
fn memory_usage() -> u64 {
    ZendCallable::try_from_name("memory_get_usage")
        .ok()
        .and_then(|f| f.try_call(vec![]).ok())
        .and_then(|z| z.long())
        .map_or(0, |n| n.max(0) as u64)
}
