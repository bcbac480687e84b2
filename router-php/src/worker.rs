//! The Rust half of the in-process worker, free of PHP types (PHP values may only be
//! touched on the PHP thread; nothing here ever holds one).
//!
//! ```text
//!  runtime threads (tokio)                          PHP thread (Router::run)
//!  router-core pipelines ─▶ PhpTarget::deliver ─▶ jobs channel ─▶ next_batch() ─▶ handler
//!                                ▲                                                 │
//!                                └──── answerer task ◀── Answers (per batch, or 1 ms) ◀──┘
//! ```
//!
//! The runtime is created lazily and once per process id (php-fpm and `pcntl_fork`
//! fork after the extension loads; threads do not survive a fork), with every
//! signal blocked in its threads so SIGTERM and SIGINT reach the PHP thread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;
use router_core::config::Config;
use router_core::{DeliveryInfo, Message, Metrics, Outcome, Target};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Most jobs handed to the PHP thread per wake-up (batching was measured 2–3× faster
/// than one wake-up per message).
pub const BATCH: usize = 64;

/// One delivery attempt waiting for the PHP thread: owned data only.
pub struct Job {
    pub message: Message,
    pub attempt: u32,
    pub subscription: String,
    pub route: String,
    pub handler: String,
    /// The attempt's span (tracing on), for `Message::traceparent()`.
    pub traceparent: Option<String>,
    pub reply: Reply,
}

/// Where a job's outcome goes (to [`Answers::push`], once its handler has run).
pub struct Reply(oneshot::Sender<Outcome>);

impl Reply {
    /// The engine gave up on this attempt (grace period over): do not run it.
    pub fn abandoned(&self) -> bool {
        self.0.is_closed()
    }
}

impl Job {
    pub fn abandoned(&self) -> bool {
        self.reply.abandoned()
    }
}

/// Outcomes handled on the PHP thread, on their way back to the runtime. Sending each
/// oneshot from the PHP thread woke a runtime thread per message (a futex wake and a
/// push to the runtime's shared queue each). Here the PHP thread only appends to a
/// list; the answerer task on the runtime completes the oneshots (waking the waiting
/// attempts is then a push to its local queue) when the PHP thread ends a batch, or
/// 1 ms after the first outcome of a batch arrived, whichever comes first: a slow
/// handler never holds back the outcomes of the messages handled before it.
pub struct Answers {
    shared: Arc<AnswerBox>,
}

struct AnswerBox {
    pending: Mutex<Vec<(Reply, Outcome)>>,
    /// The first outcome since the last drain arrived.
    arrived: tokio::sync::Notify,
    /// The PHP thread ended a batch: drain now.
    flush: tokio::sync::Notify,
}

/// How long a handled message's outcome may wait for the rest of its batch.
const ANSWER_DELAY: Duration = Duration::from_millis(1);

impl Answers {
    pub fn push(&self, reply: Reply, outcome: Outcome) {
        let first = {
            let mut pending = self.shared.pending.lock();
            pending.push((reply, outcome));
            pending.len() == 1
        };
        if first {
            self.shared.arrived.notify_one();
        }
    }

    /// The batch is done: hand every pending outcome to the runtime now.
    pub fn flush(&self) {
        if !self.shared.pending.lock().is_empty() {
            self.shared.flush.notify_one();
        }
    }
}

/// The runtime's half of [`Answers`]: completes the outcomes' oneshots.
async fn answer(shared: Arc<AnswerBox>) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        shared.arrived.notified().await;
        tokio::select! {
            _ = shared.flush.notified() => {}
            _ = tokio::time::sleep(ANSWER_DELAY) => {}
        }
        std::mem::swap(&mut batch, &mut *shared.pending.lock());
        for (Reply(reply), outcome) in batch.drain(..) {
            // The engine may have given up meanwhile; then the broker has it back.
            let _ = reply.send(outcome);
        }
    }
}

/// Every handler of the config is reached through one of these: the delivery goes to
/// the PHP thread and the attempt waits for its answer.
struct PhpTarget {
    jobs: Sender<Job>,
}

#[async_trait]
impl Target for PhpTarget {
    async fn deliver(&self, d: DeliveryInfo<'_>) -> Outcome {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            message: d.message.clone(),
            attempt: d.attempt,
            subscription: d.subscription.to_string(),
            route: d.route.to_string(),
            handler: d.handler.to_string(),
            traceparent: d.traceparent.map(str::to_string),
            reply: Reply(reply),
        };
        router_core::trace::record_endpoint("php", "in-process");
        if self.jobs.send(job).is_err() {
            return Outcome::Retry { after: None, error: "the PHP worker stopped before handling it".into() };
        }
        // A handler that calls exit() or dies of a fatal error never answers: the
        // process is going away and the broker gets the message back unsettled.
        answer.await.unwrap_or_else(|_| Outcome::Retry {
            after: None,
            error: "the PHP worker dropped the message without an answer".into(),
        })
    }
}

/// Why a run stopped (returned to PHP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// `limit` messages handled.
    Limit,
    /// `time_limit` passed.
    TimeLimit,
    /// `memory_limit` exceeded after a message.
    MemoryLimit,
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// `Router::stop()` from a handler.
    Requested,
    /// Every subscription stopped on its own (the router ended without being asked).
    RouterEnded,
}

impl StopReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            StopReason::Limit => "limit",
            StopReason::TimeLimit => "time_limit",
            StopReason::MemoryLimit => "memory_limit",
            StopReason::Signal(_) => "signal",
            StopReason::Requested => "stop",
            StopReason::RouterEnded => "router_ended",
        }
    }
}

/// Worker limits, as `messenger:consume` has them. `None`: no limit.
#[derive(Clone, Debug, Default)]
pub struct Limits {
    pub messages: Option<u64>,
    pub time: Option<Duration>,
    pub memory_bytes: Option<u64>,
}

impl Limits {
    /// The first limit reached, if any.
    pub fn reached(&self, handled: u64, started: Instant, memory: impl FnOnce() -> u64) -> Option<StopReason> {
        if self.messages.is_some_and(|n| handled >= n) {
            return Some(StopReason::Limit);
        }
        if self.time.is_some_and(|t| started.elapsed() >= t) {
            return Some(StopReason::TimeLimit);
        }
        if self.memory_bytes.is_some_and(|m| memory() >= m) {
            return Some(StopReason::MemoryLimit);
        }
        None
    }
}

/// Which subscriptions of the config one `run()` consumes, as `messenger:consume`'s
/// receiver arguments and `--queues` pick them. Empty: all of them.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// By subscription name.
    pub subscriptions: Vec<String>,
    /// By the AMQP queue a subscription reads.
    pub queues: Vec<String>,
}

impl Selection {
    /// `config` with only the chosen subscriptions (routes stay: one that matches no
    /// chosen subscription just never fires). A name or queue that matches nothing is
    /// an error naming what there is, never a silent run of nothing.
    pub fn apply(&self, config: &Config) -> Result<Config, String> {
        let mut config = config.clone();
        if !self.subscriptions.is_empty() {
            let unknown: Vec<&str> = self
                .subscriptions
                .iter()
                .filter(|n| !config.subscriptions.contains_key(*n))
                .map(String::as_str)
                .collect();
            if !unknown.is_empty() {
                return Err(format!(
                    "no subscription {} in the config (subscriptions: {})",
                    unknown.join(", "),
                    config.subscriptions.keys().map(String::as_str).collect::<Vec<_>>().join(", ")
                ));
            }
            config.subscriptions.retain(|name, _| self.subscriptions.contains(name));
        }
        if !self.queues.is_empty() {
            let queue_of = |s: &router_core::config::SubscriptionConfig| s.source.amqp().map(|a| a.queue.clone());
            let read: Vec<String> = config.subscriptions.values().filter_map(queue_of).collect();
            let unknown: Vec<&str> = self.queues.iter().filter(|q| !read.contains(q)).map(String::as_str).collect();
            if !unknown.is_empty() {
                return Err(format!(
                    "no {}subscription reads queue {} (queues read: {})",
                    if self.subscriptions.is_empty() { "" } else { "chosen " },
                    unknown.join(", "),
                    if read.is_empty() { "none".to_string() } else { read.join(", ") }
                ));
            }
            config.subscriptions.retain(|_, s| queue_of(s).is_some_and(|q| self.queues.contains(&q)));
        }
        Ok(config)
    }
}

/// A router running on the background runtime for one `run()`.
pub struct Running {
    jobs: Receiver<Job>,
    /// Outcomes back to the runtime, per batch.
    answers: Arc<AnswerBox>,
    answerer: tokio::task::JoinHandle<()>,
    /// Hands every handler a reload adds its PHP target (the same channel).
    to_php: Sender<Job>,
    reloader: router_core::Reloader,
    stop: CancellationToken,
    done: Arc<AtomicBool>,
    /// Why the router stopped on its own (a subscription that cannot run).
    failed: Arc<Mutex<Option<String>>>,
}

impl Running {
    /// Build the router of `config` (every handler reached through the PHP thread)
    /// and start it on the runtime.
    pub fn start(config: &Config) -> Result<Running, String> {
        let runtime = runtime()?;
        init_log(&config.log.level, &config.tracing, &runtime);
        // Unbounded, yet bounded: the engine holds at most `prefetch` messages per
        // subscription and `max_in_flight` per handler.
        let (tx, jobs) = crossbeam_channel::unbounded();
        let targets: HashMap<String, Arc<dyn Target>> = config
            .handlers
            .keys()
            .map(|name| (name.clone(), Arc::new(PhpTarget { jobs: tx.clone() }) as Arc<dyn Target>))
            .collect();
        let metrics = Metrics::new().map_err(|e| format!("metrics: {e}"))?;
        let router = {
            // Transports spawn their clients' tasks when built: inside the runtime.
            let _guard = runtime.enter();
            router_core::Router::new(config, targets, Arc::new(metrics)).map_err(|e| e.to_string())?
        };
        let reloader = router.reloader();
        let stop = CancellationToken::new();
        let done = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(Mutex::new(None));
        let answers = Arc::new(AnswerBox {
            pending: Mutex::new(Vec::with_capacity(BATCH)),
            arrived: tokio::sync::Notify::new(),
            flush: tokio::sync::Notify::new(),
        });
        // Ends with the runtime (module shutdown): the attempts it held are gone with it.
        let answerer = runtime.spawn(answer(answers.clone()));
        let (token, flag, failure) = (stop.clone(), done.clone(), failed.clone());
        runtime.spawn(async move {
            if let Err(e) = router.run(token).await {
                tracing::error!(error = %e, "the router stopped");
                *failure.lock() = Some(e.to_string());
            }
            flag.store(true, Ordering::SeqCst);
        });
        Ok(Running { jobs, answers, answerer, to_php: tx, reloader, stop, done, failed })
    }

    /// Apply `config` as a diff (blocks the PHP thread for as long as the engine takes
    /// to swap; in-flight work goes on meanwhile).
    pub fn reload(&self, config: &Config) -> Result<router_core::config::ConfigDiff, String> {
        let to_php = self.to_php.clone();
        let build: router_core::BuildTargets = Box::new(move |_, diff| {
            Ok(diff
                .handlers
                .added
                .iter()
                .chain(&diff.handlers.changed)
                .map(|name| (name.clone(), Arc::new(PhpTarget { jobs: to_php.clone() }) as Arc<dyn Target>))
                .collect())
        });
        let reloader = self.reloader.clone();
        runtime()?.block_on(reloader.reload(config.clone(), build)).map_err(|e| e.to_string())
    }

    /// Where the PHP thread collects outcomes for this run.
    pub fn answers(&self) -> Answers {
        Answers { shared: self.answers.clone() }
    }

    /// Wait up to `wait` for jobs; return at most [`BATCH`] of them (empty: none came).
    pub fn next_batch(&self, wait: Duration) -> Vec<Job> {
        let mut batch = Vec::with_capacity(BATCH);
        match self.jobs.recv_timeout(wait) {
            Ok(job) => batch.push(job),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return batch,
        }
        while batch.len() < BATCH {
            match self.jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        batch
    }

    /// Stop fetching; in-flight messages are still handed out until the router has
    /// drained (within the config's shutdown grace period).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    pub fn stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// The router has stopped: every subscription drained and its connection closed.
    pub fn finished(&self) -> bool {
        self.done.load(Ordering::SeqCst)
    }

    /// Why the router stopped on its own, if it failed.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().clone()
    }
}

impl Drop for Running {
    /// The run is over: what the answerer has not taken yet is answered from here, and
    /// the answerer stops (one per run).
    fn drop(&mut self) {
        self.answerer.abort();
        for (Reply(reply), outcome) in self.answers.pending.lock().drain(..) {
            let _ = reply.send(outcome);
        }
    }
}

/// The span exporter of this process (tracing on), flushed by [`shutdown`].
static EXPORTER: Mutex<Option<router_core::trace::Exporter>> = Mutex::new(None);

/// The router's log goes to stderr, like a PHP CLI worker's own output: filtered by
/// `MESSAGE_ROUTER_LOG` (or `RUST_LOG`), else by the config's `log.level`. With
/// `tracing.enabled`, the OTLP span exporter beside it (set up once per process, by
/// the first config).
fn init_log(level: &str, tracing: &router_core::config::TracingConfig, runtime: &tokio::runtime::Runtime) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = std::env::var("MESSAGE_ROUTER_LOG")
            .or_else(|_| std::env::var("RUST_LOG"))
            .unwrap_or_else(|_| level.to_string());
        let filter = tracing_subscriber::EnvFilter::try_new(&filter)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // No colour codes unless stderr is a terminal (a log file, a pipe, php-fpm's
        // log). Another tracing user in the process may have set a global subscriber first.
        use std::io::IsTerminal;
        let log = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(filter)
            .boxed();
        // Inside the runtime: the gRPC exporter's channel lives there.
        let spans = {
            let _guard = runtime.enter();
            router_core::trace::install::<tracing_subscriber::Registry>(tracing)
        };
        let mut layers = vec![log];
        match spans {
            Ok(Some((layer, exporter))) => {
                layers.push(layer);
                *EXPORTER.lock() = Some(exporter);
            }
            Ok(None) => {}
            Err(e) => eprintln!("message-router: tracing is off: {e}"),
        }
        let _ = tracing_subscriber::registry().with(layers).try_init();
    });
}

/// The process's runtime, created on first use and again in a forked child.
static RUNTIME: Mutex<Option<(u32, Arc<tokio::runtime::Runtime>)>> = Mutex::new(None);

fn runtime() -> Result<Arc<tokio::runtime::Runtime>, String> {
    let pid = std::process::id();
    let mut slot = RUNTIME.lock();
    if let Some((owner, rt)) = slot.as_ref() {
        if *owner == pid {
            return Ok(rt.clone());
        }
        // Inherited from the parent by fork: its threads are not here. Leak it rather
        // than drop it (dropping would wait for threads that do not exist).
        if let Some((_, rt)) = slot.take() {
            std::mem::forget(rt);
        }
    }
    // MESSAGE_ROUTER_THREADS, else half the cores (at least 1): the PHP thread is the
    // process's main work, and the runtime's is short and I/O-bound.
    let threads = router_core::runtime::threads_from_env()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("message-router")
        .enable_all()
        .on_thread_start(block_signals)
        .build()
        .map_err(|e| format!("cannot start the router's runtime: {e}"))?;
    let rt = Arc::new(rt);
    *slot = Some((pid, rt.clone()));
    Ok(rt)
}

/// Runtime threads never take a signal: SIGTERM and SIGINT go to the PHP thread,
/// whose handlers (ours during `run()`, pcntl's otherwise) decide.
fn block_signals() {
    // SAFETY: sigfillset and pthread_sigmask only touch the set we own and this
    // thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Stop the runtime at module shutdown, waiting at most `wait` for its tasks (what
/// is still in flight then goes back to the broker unsettled when the connections
/// close). Only this process's own runtime: a forked child's inherited one has no
/// threads to stop.
pub fn shutdown(wait: Duration) {
    // The last spans first, while the runtime (the gRPC exporter's) still runs.
    if let Some(exporter) = EXPORTER.lock().take() {
        exporter.shutdown();
    }
    let taken = {
        let mut slot = RUNTIME.lock();
        match slot.as_ref() {
            Some((owner, _)) if *owner == std::process::id() => slot.take(),
            _ => None,
        }
    };
    if let Some((_, rt)) = taken {
        match Arc::try_unwrap(rt) {
            Ok(rt) => rt.shutdown_timeout(wait),
            // A run() is still using it (a bailout left its frame): let the process
            // exit take the threads.
            Err(rt) => std::mem::forget(rt),
        }
    }
}
