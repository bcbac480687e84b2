//! The delivery engine: one pipeline per subscription, each consumer under a
//! supervisor.
//!
//! ```text
//!             supervisor: restart with backoff, stall watchdog
//!                  │
//! transport.consume ──inbox.put()──▶ window slot, route ──▶ task: circuit, handler slot, target.deliver
//!        ▲                                                                            │ Outcome
//!        └──── delivery.settle(Settlement), retried until the broker takes it ◀── decide() ◀┘
//! ```
//!
//! Bounds: the broker hands a subscription at most `prefetch` unsettled messages, and
//! the pipeline's window admits as many (one when `ordered`): `inbox.put` waits for a
//! window slot on the transport's own task, so a full window stops consumption. Each
//! handler has its own `max_in_flight` limit shared by every subscription (fixed, or
//! adaptive: [`crate::concurrency`]); a task waits for it without holding up messages
//! bound for other handlers.
//!
//! Never silent (README "Reliability"):
//! - **Supervision.** When a consumer ends without being asked (it failed, it
//!   panicked, it just returned) the supervisor logs it, counts it and starts it
//!   again with backoff; `/readyz` says why meanwhile. A fatal error (a consumer that
//!   can never work as configured) stops the whole router with an error.
//! - **Stall watchdog.** When the broker reports messages waiting and none arrived for
//!   `stall_timeout` while the window had room and no circuit was open, the consumer
//!   is reported stalled and started again.
//! - **Settlement.** A settlement the broker refuses (a dead-letter exchange that does
//!   not exist) is tried again with backoff — the settlement, never the handler — while
//!   the message stays unacked and holds its window slot; a warning per message at
//!   most once a minute, `router_settling`, and `/readyz` tell the operator.
//! - **Circuit breakers.** When a handler fails most attempts, its circuit opens
//!   ([`crate::breaker`]): the subscriptions routed to it take nothing new, attempts
//!   wait, and a failed attempt while the circuit is not closed is not counted against
//!   its message.
//!
//! Reload ([`Reloader`]): the routes and handlers live in one `Wiring` swapped whole,
//! read once per message; a subscription the diff leaves alone keeps its pipeline, a
//! removed one stops like at shutdown, a changed one stops and a new pipeline starts
//! once it has.
//!
//! Shutdown: stop taking deliveries, let in-flight work finish within the grace
//! period, drop (= hand back to the broker) whatever is still running, then let the
//! transport flush its acks and close.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use prometheus::{IntCounter, IntCounterVec};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, trace, warn, Instrument, Span};

use crate::backoff;
use crate::breaker::{Breaker, CircuitState, Observer, Verdict};
use crate::concurrency::{Feedback, Limiter};
use crate::config::{Config, ConfigDiff, SubscriptionConfig};
use crate::control::{ControlError, DepthsSeen, Mode, Snapshot, State};
use crate::dedup::Dedup;
use crate::health::{Problem, Readiness, SourceStatus};
use crate::message::{Delivery, SettleError, Settlement};
use crate::metrics::Metrics;
use crate::retry::{decide, Decision, Outcome, RetryPolicy};
use crate::routing::{RouteMatch, RoutingTable};
use crate::target::{DeliveryInfo, Target};
use crate::trace as otel;
use crate::transport::{self, ConsumeError, ConsumeSpec, Inbox, Transport};

/// Why a router could not be built from a valid config.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("handler {0:?} is used by a route but no target was registered for it")]
    MissingTarget(String),
}

/// Why a router stopped without being asked.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("subscription {subscription:?} cannot run: {reason}")]
    Fatal { subscription: String, reason: String },
}

/// A consumer that ran this long before ending resets the supervisor's backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// How often a message whose settlement keeps failing is logged.
const SETTLE_WARN_EVERY: Duration = Duration::from_secs(60);
/// Longest wait for the broker's backlog answer in a stall check.
const BACKLOG_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the depths at the broker (backlog, retries waiting, dead letters) are read.
const DEPTHS_EVERY: Duration = Duration::from_secs(5);

/// A handler as the engine sees it: how to reach it, how many may be in flight, its
/// circuit, and its latency histogram (resolved once, not per attempt).
#[derive(Clone)]
struct Handler {
    target: Arc<dyn Target>,
    limit: Limiter,
    breaker: Arc<Breaker>,
    seconds: prometheus::Histogram,
}

/// A route as one subscription's messages take it under one wiring: the names, the
/// handler, the retry policy and the settlement counters of the pair, resolved on the
/// route's first message and shared by the next ones (no label lookup, no string
/// copy per message).
struct Bound {
    route: String,
    handler_name: String,
    handler: Handler,
    policy: RetryPolicy,
    counters: Settled,
}

/// `router_messages_{acked,retried,dead_lettered}_total` of one subscription, route and handler.
struct Settled {
    acked: prometheus::IntCounter,
    retried: prometheus::IntCounter,
    dead_lettered: prometheus::IntCounter,
}

impl Settled {
    fn new(metrics: &Metrics, labels: &[&str; 3]) -> Self {
        Settled {
            acked: metrics.acked.with_label_values(labels),
            retried: metrics.retried.with_label_values(labels),
            dead_lettered: metrics.dead_lettered.with_label_values(labels),
        }
    }
}

/// The routes a pipeline has bound under the wiring they were bound with; a rewire
/// starts afresh (a route's handler or policy may have changed).
#[derive(Default)]
struct BoundRoutes {
    wiring: Option<Arc<Wiring>>,
    routes: HashMap<String, Arc<Bound>>,
}

/// Routes and handlers as of the last (re)load. A reload swaps the whole of it, so a
/// message is routed by the old table or by the new one, never by a mix; work already
/// under way keeps the handler it started with.
struct Wiring {
    routes: RoutingTable,
    handlers: HashMap<String, Handler>,
    grace: Duration,
}

/// The router's current wiring, read once per message.
type Wire = Arc<RwLock<Arc<Wiring>>>;

/// A circuit a subscription watches: while it is open the subscription takes nothing
/// new. `on` is cleared when a reload detaches it, so a circuit left to in-flight work
/// no longer speaks for the subscription.
struct Attached {
    handler: String,
    breaker: Arc<Breaker>,
    on: Arc<AtomicBool>,
}

/// Everything one subscription pipeline needs, shared by its tasks.
struct Pipeline {
    name: String,
    config: SubscriptionConfig,
    transport: Arc<dyn Transport>,
    wiring: Wire,
    /// Bumped by every reload that rewires: a consumer paused for a circuit looks again.
    rewired: Arc<tokio::sync::watch::Sender<u64>>,
    metrics: Arc<Metrics>,
    status: Arc<SourceStatus>,
    reconnect_max: Duration,
    dedup: Option<Dedup>,
    /// Circuits of the handlers this subscription can reach: while one is open, the
    /// subscription takes nothing new from the broker.
    breakers: RwLock<Arc<Vec<Attached>>>,
    /// Messages whose settlement is being retried, and the last refusal.
    settling: Mutex<(usize, String)>,
    /// When the consumer last handed over a delivery (or started): the watchdog's clock.
    last_received: Mutex<Instant>,
    /// The name of its transport (for the admin API).
    transport_name: String,
    /// What the operator asked ([`crate::control`]).
    mode: tokio::sync::watch::Sender<Mode>,
    /// Deliveries handed over and not settled (or handed back) yet.
    in_flight: AtomicU64,
    /// The depths last read at the broker.
    depths: Mutex<DepthsSeen>,
    /// Routes taken so far (read on the consumer's task: uncontended).
    bound: Mutex<BoundRoutes>,
    /// This subscription's per-message series, resolved once.
    received: prometheus::IntCounter,
    redelivered: prometheus::IntCounter,
    in_flight_gauge: prometheus::IntGauge,
}

/// The subscriptions running now, by name; what the admin API and `/readyz` see. A
/// subscription a reload removed or replaced leaves it at once (it drains unseen).
type Registry = Arc<RwLock<BTreeMap<String, Arc<Pipeline>>>>;

/// The whole router: every subscription of a config, wired to its targets.
pub struct Router {
    config: Config,
    metrics: Arc<Metrics>,
    wiring: Wire,
    rewired: Arc<tokio::sync::watch::Sender<u64>>,
    transports: HashMap<String, Arc<dyn Transport>>,
    registry: Registry,
    reloads: mpsc::Receiver<Reload>,
    reloader: mpsc::Sender<Reload>,
}

/// Keeps `router_circuit_state` and `router_circuit_opened_total` in step with a circuit.
struct CircuitMetrics(Arc<Metrics>);

impl Observer for CircuitMetrics {
    fn changed(&self, handler: &str, state: CircuitState, _reason: &str) {
        self.0.circuit_state.with_label_values(&[handler]).set(state as i64);
        if state == CircuitState::Open {
            self.0.circuit_opened.with_label_values(&[handler]).inc();
        }
    }
}

/// Shows an open circuit on the health of a subscription routed to its handler.
struct CircuitHealth {
    status: Arc<SourceStatus>,
    on: Arc<AtomicBool>,
}

impl Observer for CircuitHealth {
    fn changed(&self, handler: &str, state: CircuitState, reason: &str) {
        if !self.on.load(Ordering::Acquire) {
            return;
        }
        let problem = Problem::CircuitOpen(handler.to_string());
        match state {
            CircuitState::Closed => self.status.clear(&problem),
            CircuitState::Open => self.status.report(problem, format!("{reason}; taking nothing new")),
            CircuitState::HalfOpen => self.status.report(problem, "half-open: probing the handler"),
        }
    }
}

/// Builds the targets of the handlers a reload adds or changes (the [`ConfigDiff`]
/// says which); the others keep theirs. An error refuses the whole reload.
pub type BuildTargets =
    Box<dyn FnOnce(&Config, &ConfigDiff) -> Result<HashMap<String, Arc<dyn Target>>, String> + Send>;

/// Why a reload was refused; the running config stays as it was.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Build(String),
    #[error(transparent)]
    Wiring(#[from] BuildError),
    #[error("the router is stopping")]
    Stopping,
}

struct Reload {
    config: Config,
    build: BuildTargets,
    reply: oneshot::Sender<Result<ConfigDiff, ReloadError>>,
}

/// Hands a new config to a running router ([`Router::reloader`]).
#[derive(Clone)]
pub struct Reloader(mpsc::Sender<Reload>);

impl Reloader {
    /// Apply `config` as a diff against the running one: what did not change keeps
    /// running untouched; removed subscriptions drain and stop; changed ones drain and
    /// start again with their new settings; routes and handlers swap at once for new
    /// messages; a changed transport reconnects its subscriptions. Returns what changed.
    pub async fn reload(&self, config: Config, build: BuildTargets) -> Result<ConfigDiff, ReloadError> {
        let (reply, answer) = oneshot::channel();
        self.0.send(Reload { config, build, reply }).await.map_err(|_| ReloadError::Stopping)?;
        answer.await.map_err(|_| ReloadError::Stopping)?
    }
}

/// A subscription pipeline that runs: how to stop it, and a token cancelled once it
/// has stopped (a replacement waits for it).
struct Running {
    stop: CancellationToken,
    finished: CancellationToken,
}

impl Router {
    /// Wire a validated config to its targets (one per handler name).
    pub fn new(
        config: &Config,
        targets: HashMap<String, Arc<dyn Target>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BuildError> {
        let handlers = Self::handlers(config, &targets, None, &ConfigDiff::default(), &metrics)?;
        let wiring = Arc::new(RwLock::new(Arc::new(Wiring {
            routes: RoutingTable::from_config(config),
            handlers,
            grace: config.shutdown.grace_period,
        })));
        let (reloader, reloads) = mpsc::channel(4);
        let router = Router {
            config: config.clone(),
            metrics,
            wiring,
            rewired: Arc::new(tokio::sync::watch::Sender::new(0)),
            transports: config.transports.iter().map(|(n, t)| (n.clone(), transport::build(n, t))).collect(),
            registry: Registry::default(),
            reloads,
            reloader,
        };
        for (name, s) in &config.subscriptions {
            if let Some(p) = router.pipeline(name, s, Mode::Running) {
                router.registry.write().insert(name.clone(), p);
            }
        }
        Ok(router)
    }

    /// The handlers of `config`: those `keep` has and the diff leaves alone are kept
    /// (same target, slots and circuit); the others get the target `targets` holds.
    fn handlers(
        config: &Config,
        targets: &HashMap<String, Arc<dyn Target>>,
        keep: Option<&Wiring>,
        diff: &ConfigDiff,
        metrics: &Arc<Metrics>,
    ) -> Result<HashMap<String, Handler>, BuildError> {
        let mut handlers = HashMap::new();
        for (name, h) in &config.handlers {
            if let Some(kept) = keep.filter(|_| !diff.handlers.needs_building(name)).and_then(|w| w.handlers.get(name))
            {
                handlers.insert(name.clone(), kept.clone());
                continue;
            }
            let used = config.routes.iter().any(|r| &r.handler == name)
                || config.subscriptions.values().any(|s| s.default_handler.as_deref() == Some(name));
            match targets.get(name) {
                Some(t) => {
                    let breaker = Breaker::new(name, h.circuit_breaker.clone());
                    breaker.observe(Arc::new(CircuitMetrics(metrics.clone())));
                    metrics.circuit_state.with_label_values(&[name.as_str()]).set(0);
                    let gauge = metrics.concurrency_limit.with_label_values(&[name.as_str()]);
                    let limit = Limiter::new(h.max_in_flight, Some(gauge));
                    handlers.insert(
                        name.clone(),
                        Handler {
                            target: t.clone(),
                            limit,
                            breaker,
                            seconds: metrics.handler_seconds.with_label_values(&[name.as_str()]),
                        },
                    );
                }
                None if used => return Err(BuildError::MissingTarget(name.clone())),
                None => {}
            }
        }
        Ok(handlers)
    }

    /// A new pipeline for subscription `name` of the current config, in `mode`.
    fn pipeline(&self, name: &str, s: &SubscriptionConfig, mode: Mode) -> Option<Arc<Pipeline>> {
        let transport = self.transports.get(&s.transport)?;
        let gauge = self.metrics.connected.with_label_values(&[name]);
        let reconnect_max =
            self.config.transports.get(&s.transport).map_or(Duration::from_secs(30), |t| t.reconnect_max_delay);
        let p = Arc::new(Pipeline {
            name: name.to_string(),
            config: s.clone(),
            transport: transport.clone(),
            wiring: self.wiring.clone(),
            rewired: self.rewired.clone(),
            metrics: self.metrics.clone(),
            status: Arc::new(SourceStatus::new(Some(gauge))),
            reconnect_max,
            dedup: s.dedup.as_ref().map(|d| Dedup::new(name, d)),
            breakers: RwLock::new(Arc::new(Vec::new())),
            settling: Mutex::new((0, String::new())),
            last_received: Mutex::new(Instant::now()),
            transport_name: s.transport.clone(),
            mode: tokio::sync::watch::Sender::new(mode),
            in_flight: AtomicU64::new(0),
            depths: Mutex::new(DepthsSeen::default()),
            bound: Mutex::new(BoundRoutes::default()),
            received: self.metrics.received.with_label_values(&[name]),
            redelivered: self.metrics.redelivered.with_label_values(&[name]),
            in_flight_gauge: self.metrics.in_flight.with_label_values(&[name]),
        });
        self.attach(&p);
        self.metrics.paused.with_label_values(&[name]).set(i64::from(mode != Mode::Running));
        Some(p)
    }

    /// Point `p` at the circuits of the handlers it reaches in the current wiring; the
    /// circuits it no longer reaches stop speaking for its health.
    fn attach(&self, p: &Pipeline) {
        let wiring = self.wiring.read().clone();
        let old = p.breakers.read().clone();
        let mut now = Vec::new();
        for (h, _) in self.config.reachable_handlers(&p.name) {
            let Some(handler) = wiring.handlers.get(h) else { continue };
            match old.iter().find(|a| Arc::ptr_eq(&a.breaker, &handler.breaker)) {
                Some(a) => now.push(Attached { handler: h.clone(), breaker: a.breaker.clone(), on: a.on.clone() }),
                None => {
                    let on = Arc::new(AtomicBool::new(true));
                    handler.breaker.observe(Arc::new(CircuitHealth { status: p.status.clone(), on: on.clone() }));
                    now.push(Attached { handler: h.clone(), breaker: handler.breaker.clone(), on });
                }
            }
        }
        for a in old.iter().filter(|a| !now.iter().any(|n| Arc::ptr_eq(&n.breaker, &a.breaker))) {
            a.on.store(false, Ordering::Release);
            p.status.clear(&Problem::CircuitOpen(a.handler.clone()));
        }
        *p.breakers.write() = Arc::new(now);
        // Routes bound under the old wiring hold its handlers (targets, connections):
        // let them go now rather than at the subscription's next message.
        *p.bound.lock() = BoundRoutes::default();
    }

    pub fn readiness(&self) -> Readiness {
        let registry = self.registry.clone();
        Readiness::new(Arc::new(move || registry.read().values().map(|p| (p.name.clone(), p.status.clone())).collect()))
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Handles on every subscription, for the admin API: what each is doing, and
    /// pause, resume and drain. Live: a reload's additions and removals show.
    pub fn subscriptions(&self) -> Subscriptions {
        Subscriptions(self.registry.clone())
    }

    /// Hands new configs to this router while it runs.
    pub fn reloader(&self) -> Reloader {
        Reloader(self.reloader.clone())
    }

    /// Run every subscription until `shutdown` is cancelled, then drain and return. A
    /// subscription that can never run (a fatal consumer error) stops the others too,
    /// and the error is returned. Reloads ([`Router::reloader`]) are applied meanwhile.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), RunError> {
        let stop = CancellationToken::new();
        let link = {
            let (outer, inner) = (shutdown.clone(), stop.clone());
            tokio::spawn(async move {
                outer.cancelled().await;
                inner.cancel();
            })
        };
        let mut all = tokio::task::JoinSet::new();
        let mut running = HashMap::new();
        let first: Vec<Arc<Pipeline>> = self.registry.read().values().cloned().collect();
        for p in first {
            running.insert(p.name.clone(), start(&mut all, p, &stop, None));
        }
        let mut failure = None;
        loop {
            tokio::select! {
                Some(res) = all.join_next() => match res {
                    Ok((name, Ok(()))) => {
                        // A subscription a reload removed has stopped: its gauges go.
                        if !stop.is_cancelled() && !self.registry.read().contains_key(&name) {
                            self.metrics.forget_subscription(&name);
                        }
                    }
                    Ok((subscription, Err(reason))) => {
                        let e = RunError::Fatal { subscription, reason };
                        error!(error = %e, "stopping the router");
                        stop.cancel();
                        failure.get_or_insert(e);
                    }
                    Err(e) => error!(error = %e, "a subscription pipeline failed"),
                },
                Some(reload) = self.reloads.recv() => {
                    let result = if stop.is_cancelled() {
                        Err(ReloadError::Stopping)
                    } else {
                        self.apply(reload.config, reload.build, &mut all, &mut running, &stop)
                    };
                    let _ = reload.reply.send(result);
                }
                _ = stop.cancelled(), if all.is_empty() => break,
            }
        }
        link.abort();
        for t in self.transports.values() {
            t.close().await;
        }
        info!("router stopped");
        failure.map_or(Ok(()), Err)
    }

    /// Apply a new config as a diff ([`Reloader::reload`]). Everything that can fail
    /// (building targets, wiring handlers) happens before anything changes.
    fn apply(
        &mut self,
        config: Config,
        build: BuildTargets,
        all: &mut tokio::task::JoinSet<(String, Result<(), String>)>,
        running: &mut HashMap<String, Running>,
        stop: &CancellationToken,
    ) -> Result<ConfigDiff, ReloadError> {
        let diff = ConfigDiff::between(&self.config, &config);
        let targets = build(&config, &diff).map_err(ReloadError::Build)?;
        let old_wiring = self.wiring.read().clone();
        let handlers = Self::handlers(&config, &targets, Some(&old_wiring), &diff, &self.metrics)?;

        // Nothing can fail from here on.
        let mut retired = Vec::new();
        for name in diff.transports.removed.iter().chain(&diff.transports.changed) {
            retired.extend(self.transports.remove(name));
        }
        for name in diff.transports.added.iter().chain(&diff.transports.changed) {
            if let Some(t) = config.transports.get(name) {
                self.transports.insert(name.clone(), transport::build(name, t));
            }
        }
        self.config = config;
        for name in &diff.handlers.removed {
            self.metrics.forget_handler(name);
        }
        if diff.rewires() {
            *self.wiring.write() = Arc::new(Wiring {
                routes: RoutingTable::from_config(&self.config),
                handlers,
                grace: self.config.shutdown.grace_period,
            });
            self.rewired.send_modify(|n| *n += 1);
        }
        let mut stopping = Vec::new();
        for name in &diff.subscriptions.removed {
            self.registry.write().remove(name);
            if let Some(r) = running.remove(name) {
                info!(subscription = %name, "reload: removed; draining it");
                r.stop.cancel();
                stopping.push(r.finished);
            }
        }
        for name in diff.subscriptions.changed.iter().chain(&diff.subscriptions.added) {
            let Some(s) = self.config.subscriptions.get(name).cloned() else { continue };
            let old = self.registry.read().get(name).cloned();
            let mode = old.as_ref().map_or(Mode::Running, |p| *p.mode.borrow());
            let Some(p) = self.pipeline(name, &s, mode) else { continue };
            self.registry.write().insert(name.clone(), p.clone());
            let after = running.remove(name).map(|r| {
                info!(subscription = %name, "reload: changed; draining it, then starting it with the new settings");
                r.stop.cancel();
                stopping.push(r.finished.clone());
                r.finished
            });
            if after.is_none() {
                info!(subscription = %name, "reload: added");
            }
            running.insert(name.clone(), start(all, p, stop, after));
        }
        if diff.rewires() {
            let kept: Vec<Arc<Pipeline>> = self
                .registry
                .read()
                .iter()
                .filter(|(n, _)| !diff.subscriptions.needs_building(n))
                .map(|(_, p)| p.clone())
                .collect();
            for p in kept {
                self.attach(&p);
            }
        }
        // A retired transport closes once the pipelines that read from it stopped.
        if !retired.is_empty() {
            tokio::spawn(async move {
                for f in stopping {
                    f.cancelled().await;
                }
                for t in retired {
                    t.close().await;
                }
            });
        }
        Ok(diff)
    }
}

/// Start `p` (once `after` is cancelled: the pipeline it replaces has stopped).
fn start(
    all: &mut tokio::task::JoinSet<(String, Result<(), String>)>,
    p: Arc<Pipeline>,
    router_stop: &CancellationToken,
    after: Option<CancellationToken>,
) -> Running {
    let (stop, finished) = (router_stop.child_token(), CancellationToken::new());
    let (run_stop, done) = (stop.clone(), finished.clone());
    all.spawn(async move {
        if let Some(after) = after {
            after.cancelled().await;
        }
        let result = p.clone().run(run_stop).await;
        done.cancel();
        (p.name.clone(), result)
    });
    Running { stop, finished }
}

/// The pipeline's side of the hand-over from its transport (see [`Inbox`]).
struct PipelineInbox {
    pipeline: Arc<Pipeline>,
    /// Bounds the messages between hand-over and settlement (prefetch, or 1 if ordered).
    window: Arc<Semaphore>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Cancelled when the grace period is over: unfinished tasks drop their deliveries,
    /// which hands them back to the broker.
    abort: CancellationToken,
}

#[async_trait]
impl Inbox for PipelineInbox {
    async fn put(&self, d: Delivery) -> Result<(), Delivery> {
        if self.shutdown.is_cancelled() {
            return Err(d);
        }
        // A handler this subscription routes to is failing: take nothing new. This one
        // waits here, unacked; the rest stays at the broker.
        for a in self.pipeline.breakers().iter() {
            if !a.breaker.wait_not_open(&self.shutdown).await {
                return Err(d);
            }
        }
        // Paused by an operator: wait here, unacked. Draining: give it back (the
        // transport then stops consuming, and the broker redelivers it later).
        // Running (nearly always): one read of the mode, no receiver made.
        if *self.pipeline.mode.borrow() != Mode::Running {
            let mut mode = self.pipeline.mode.subscribe();
            loop {
                match *mode.borrow_and_update() {
                    Mode::Running => break,
                    Mode::Draining => return Err(d),
                    Mode::Paused => {}
                }
                tokio::select! {
                    _ = self.shutdown.cancelled() => return Err(d),
                    changed = mode.changed() => if changed.is_err() { return Err(d) },
                }
            }
        }
        self.pipeline.received.inc();
        if d.redelivered {
            self.pipeline.redelivered.inc();
        }
        self.pipeline.touch();
        let Some(slot) = acquire(&self.window, &self.shutdown).await else { return Err(d) };
        self.pipeline.clone().dispatch(d, slot, self);
        Ok(())
    }

    fn paused(&self) -> bool {
        self.pipeline.paused()
    }

    async fn pause_changed(&self) {
        let (mut mode, mut rewired) = (self.pipeline.mode.subscribe(), self.pipeline.rewired.subscribe());
        let breakers = self.pipeline.breakers();
        let mut changes: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>> =
            breakers.iter().map(|a| Box::pin(a.breaker.changed()) as _).collect();
        changes.push(Box::pin(async move {
            if mode.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }));
        // A reload may have swapped the circuits this subscription watches.
        changes.push(Box::pin(async move {
            if rewired.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }));
        futures::future::select_all(changes).await;
    }
}

/// How one consumer run ended, as the supervisor sees it.
enum Ended {
    /// The router is stopping.
    Shutdown,
    /// The watchdog found it stalled (and it was stopped).
    Stalled(String),
    /// It ended on its own.
    Returned(Result<Result<(), ConsumeError>, tokio::task::JoinError>),
    /// An operator asked to drain the subscription.
    Drain,
}

impl Pipeline {
    /// Run the subscription until `shutdown`. `Err` carries the reason a consumer can
    /// never run (fatal).
    async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), String> {
        let spec = ConsumeSpec {
            subscription: self.name.clone(),
            config: self.config.clone(),
            lag: Some(self.metrics.consumer_lag.clone()),
        };
        let window = if self.config.source.ordered() { 1 } else { usize::from(self.config.prefetch.max(1)) };
        let tasks = TaskTracker::new();
        let abort = CancellationToken::new();
        let inbox = Arc::new(PipelineInbox {
            pipeline: self.clone(),
            window: Arc::new(Semaphore::new(window)),
            shutdown: shutdown.clone(),
            tasks: tasks.clone(),
            abort: abort.clone(),
        });
        info!(subscription = %self.name, "subscription started");
        let depths = tokio::spawn(self.clone().watch_depths(spec.clone(), shutdown.clone()));
        let labels = [self.name.as_str()];
        let mut backoff = backoff::reconnect(self.reconnect_max);
        let mut fatal = None;
        let mut consumer;
        loop {
            let run = shutdown.child_token();
            self.touch();
            let started = Instant::now();
            consumer = tokio::spawn({
                let (transport, spec, status, run) =
                    (self.transport.clone(), spec.clone(), self.status.clone(), run.clone());
                let inbox: Arc<dyn Inbox> = inbox.clone();
                async move { transport.consume(spec, inbox, status, run).await }
            });
            self.status.clear(&Problem::Restarting);
            let ended = tokio::select! {
                _ = shutdown.cancelled() => Ended::Shutdown,
                reason = self.watch_stall(&inbox, &spec) => Ended::Stalled(reason),
                () = self.drain_asked() => Ended::Drain,
                res = &mut consumer => match res {
                    // The inbox gave a delivery back because of a drain.
                    Ok(Ok(())) if *self.mode.borrow() == Mode::Draining => Ended::Drain,
                    res => Ended::Returned(res),
                },
            };
            let reason = match ended {
                Ended::Shutdown => break,
                Ended::Drain => {
                    info!(subscription = %self.name, in_flight = self.in_flight.load(Ordering::Relaxed), "draining: taking nothing new, finishing what is in flight");
                    run.cancel();
                    // The consumer returns once what it handed over is settled.
                    if !consumer.is_finished() {
                        let _ = (&mut consumer).await;
                    }
                    self.status.set_connected(false);
                    self.status.report(
                        Problem::Drained,
                        format!("by an operator; POST /api/subscriptions/{}/resume consumes again", self.name),
                    );
                    info!(subscription = %self.name, "drained: the consumer is stopped until resumed");
                    let mut mode = self.mode.subscribe();
                    let resumed = tokio::select! {
                        _ = shutdown.cancelled() => false,
                        r = mode.wait_for(|m| *m != Mode::Draining) => r.is_ok(),
                    };
                    self.status.clear(&Problem::Drained);
                    if !resumed {
                        break;
                    }
                    info!(subscription = %self.name, "resumed after a drain: consuming again");
                    continue;
                }
                Ended::Stalled(reason) => {
                    self.metrics.stalls.with_label_values(&labels).inc();
                    warn!(subscription = %self.name, reason = %reason, "consumer stalled; starting it again");
                    self.status.report(Problem::Restarting, format!("stalled: {reason}"));
                    run.cancel();
                    // Its in-flight messages settle through the old consumer first;
                    // one that takes longer than the grace period finishes beside the new one.
                    if tokio::time::timeout(self.grace(), &mut consumer).await.is_err() {
                        warn!(subscription = %self.name, "the stalled consumer is still finishing its messages; starting a new one beside it");
                    }
                    self.metrics.consumer_restarts.with_label_values(&labels).inc();
                    continue;
                }
                Ended::Returned(Ok(Ok(()))) => "the consumer ended on its own".to_string(),
                Ended::Returned(Ok(Err(ConsumeError::Fatal(e)))) => {
                    error!(subscription = %self.name, error = %e, "the consumer cannot run as configured");
                    self.status.report(Problem::Restarting, format!("cannot run: {e}"));
                    fatal = Some(e);
                    break;
                }
                Ended::Returned(Ok(Err(ConsumeError::Failed(e)))) => e,
                Ended::Returned(Err(e)) => format!("the consumer task failed: {e}"),
            };
            self.status.set_connected(false);
            self.metrics.consumer_restarts.with_label_values(&labels).inc();
            if started.elapsed() >= HEALTHY_RUN {
                backoff = backoff::reconnect(self.reconnect_max);
            }
            let wait = backoff.next_delay();
            error!(subscription = %self.name, reason = %reason, retry_in = ?wait, "consumer stopped; starting it again");
            self.status.report(Problem::Restarting, format!("{reason}; starting again in {wait:?}"));
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // Stop taking deliveries (fatal: the others are told to stop by `run`); let
        // in-flight work finish within the grace period.
        tasks.close();
        let grace = self.grace();
        if !tasks.is_empty() {
            info!(subscription = %self.name, in_flight = tasks.len(), grace = ?grace, "draining in-flight messages");
        }
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            warn!(subscription = %self.name, left = tasks.len(), "grace period over: handing unfinished messages back to the broker");
            abort.cancel();
            tasks.wait().await;
        }
        // Let the transport flush acks of settled messages and close its channel.
        if !consumer.is_finished() && tokio::time::timeout(Duration::from_secs(10), consumer).await.is_err() {
            warn!(subscription = %self.name, "transport did not stop within 10s");
        }
        self.status.set_connected(false);
        depths.abort();
        info!(subscription = %self.name, "subscription stopped");
        fatal.map_or(Ok(()), Err)
    }

    /// Completes when an operator asks to drain.
    async fn drain_asked(&self) {
        let mut mode = self.mode.subscribe();
        if mode.wait_for(|m| *m == Mode::Draining).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Read the depths at the broker every [`DEPTHS_EVERY`] into the gauges and
    /// [`Snapshot::depths`]. A failed reading keeps the last figures and says why.
    async fn watch_depths(self: Arc<Self>, spec: ConsumeSpec, shutdown: CancellationToken) {
        let labels = [self.name.as_str()];
        let mut every = tokio::time::interval(DEPTHS_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            let read = tokio::time::timeout(BACKLOG_TIMEOUT, self.transport.depths(&spec)).await;
            let mut seen = self.depths.lock();
            match read {
                Ok(Ok(d)) => {
                    for (gauge, value) in [
                        (&self.metrics.backlog, d.backlog),
                        (&self.metrics.retries_waiting, d.retries_waiting),
                        (&self.metrics.dead_letters, d.dead_letters),
                    ] {
                        if let Some(v) = value {
                            gauge.with_label_values(&labels).set(i64::try_from(v).unwrap_or(i64::MAX));
                        }
                    }
                    *seen = DepthsSeen { depths: d, at: Some(SystemTime::now()), error: None };
                }
                Ok(Err(e)) => seen.error = Some(e.to_string()),
                Err(_) => seen.error = Some(format!("the broker did not answer within {BACKLOG_TIMEOUT:?}")),
            }
        }
    }

    fn set_mode(&self, mode: Mode) {
        let before = self.mode.send_replace(mode);
        if before != mode {
            info!(subscription = %self.name, from = ?before, to = ?mode, "operator changed the subscription's mode");
        }
        self.metrics.paused.with_label_values(&[self.name.as_str()]).set(i64::from(mode != Mode::Running));
    }

    fn state(&self) -> State {
        let mode = *self.mode.borrow();
        match mode {
            Mode::Paused => State::Paused,
            Mode::Draining if self.status.has(&Problem::Drained) => State::Drained,
            Mode::Draining => State::Draining,
            Mode::Running if self.breakers().iter().any(|a| a.breaker.is_open()) => State::BreakerOpen,
            Mode::Running if !self.status.is_connected() || self.status.has(&Problem::Restarting) => {
                State::Reconnecting
            }
            Mode::Running => State::Running,
        }
    }

    /// Note that the consumer is alive and delivering (the watchdog's clock).
    fn touch(&self) {
        *self.last_received.lock() = Instant::now();
    }

    /// Whether the subscription takes nothing new (an operator paused or drains it, or
    /// a circuit it routes to is open).
    fn paused(&self) -> bool {
        *self.mode.borrow() != Mode::Running || self.breakers().iter().any(|a| a.breaker.is_open())
    }

    /// The circuits it watches now (a reload may swap them).
    fn breakers(&self) -> Arc<Vec<Attached>> {
        self.breakers.read().clone()
    }

    /// How long in-flight work may take to finish when it stops (the current config's).
    fn grace(&self) -> Duration {
        self.wiring.read().grace
    }

    /// Complete with the reason when the consumer is stalled: the broker reports
    /// messages waiting, none arrived for `stall_timeout`, the window has room, and
    /// nothing paused the subscription on purpose. Never completes when the watchdog
    /// is off.
    async fn watch_stall(&self, inbox: &PipelineInbox, spec: &ConsumeSpec) -> String {
        let limit = self.config.stall_timeout;
        if limit.is_zero() {
            return std::future::pending().await;
        }
        let every = (limit / 4).clamp(Duration::from_millis(250), Duration::from_secs(15));
        loop {
            tokio::time::sleep(every).await;
            if self.paused() || !self.status.is_connected() {
                // Idle on purpose, or the transport's reconnect loop is at work (and
                // `/readyz` already says so): the clock starts again afterwards.
                self.touch();
                self.status.clear(&Problem::Unresponsive);
                continue;
            }
            let idle = self.last_received.lock().elapsed();
            if idle < limit {
                self.status.clear(&Problem::Unresponsive);
                continue;
            }
            if inbox.window.available_permits() == 0 {
                continue;
            }
            let answer = tokio::time::timeout(BACKLOG_TIMEOUT, self.transport.backlog(spec)).await;
            // A broker that does not answer (a silent network partition that the
            // client has not noticed yet) is reported now, and cleared once it answers.
            match &answer {
                Ok(Ok(_)) => self.status.clear(&Problem::Unresponsive),
                Ok(Err(e)) => self.status.report(Problem::Unresponsive, format!("the broker refused the watchdog's question: {e}")),
                Err(_) => self.status.report(
                    Problem::Unresponsive,
                    format!("the broker did not answer the watchdog within {BACKLOG_TIMEOUT:?} (nothing arrived for {idle:.0?})"),
                ),
            }
            match answer {
                Ok(Ok(Some(waiting))) if waiting > 0 => {
                    return format!(
                        "{waiting} messages wait at the broker but none arrived for {:.0?} while the window had room",
                        idle
                    );
                }
                Ok(Ok(waiting)) => {
                    trace!(subscription = %self.name, ?waiting, ?idle, "stall check: nothing waits")
                }
                Ok(Err(e)) => debug!(subscription = %self.name, error = %e, "stall check: cannot read the backlog"),
                Err(_) => debug!(subscription = %self.name, "stall check: the broker did not answer in time"),
            }
        }
    }

    /// Route one delivery and start its task. The task waits for a slot of its
    /// handler itself, so one saturated handler never holds up messages for the
    /// subscription's other handlers; the window slot still bounds the tasks.
    fn dispatch(self: Arc<Self>, d: Delivery, window_slot: OwnedSemaphorePermit, inbox: &PipelineInbox) {
        let problem = if let Some(defect) = &d.defect {
            Some(format!("undecodable message: {defect}"))
        } else if d.message.body.len() > self.config.max_body_bytes {
            Some(format!(
                "message too large: {} bytes (max_body_bytes is {})",
                d.message.body.len(),
                self.config.max_body_bytes
            ))
        } else {
            None
        };
        // One read of the wiring per message: routed and handled by one table.
        let wiring = self.wiring.read().clone();
        let route = match problem {
            Some(reason) => Err(reason),
            None => match wiring.routes.route(&self.name, &d.message) {
                None => Err(format!("no route matched (routing key {:?})", d.message.key.as_deref().unwrap_or(""))),
                // Config validation makes a missing handler unreachable; dead-letter
                // rather than panic.
                Some(r) => self.bind(&wiring, &r).ok_or_else(|| format!("handler {:?} has no target", r.handler)),
            },
        };
        let (shutdown, abort) = (inbox.shutdown.clone(), inbox.abort.clone());
        // The delivery's consumer span (none with tracing off): its attempts and its
        // settlement run inside it.
        let span = otel::consume(&self.name, &self.config, &d);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        inbox.tasks.spawn(async move {
            // Boxed: the handling future is large (deliver, retry decision, settle), and
            // inline it made the task itself large, copied whole when spawned, when
            // stored in the task cell and when its stage changed (a profile of the PHP
            // worker had 14% of the runtime threads in memmove from these copies).
            let work = Box::pin(
                async {
                    match route {
                        Err(reason) => self.dead_letter_unhandled(d, reason, &abort).await,
                        // Earlier deliveries ended without an answer (the consumer died
                        // or was stopped mid-handling): a message that keeps killing its
                        // consumer must not be delivered forever.
                        Ok(b) if d.attempt > b.policy.max_attempts => {
                            let reason = format!(
                                "max attempts ({}) exhausted: {} earlier deliveries ended without an answer (the consumer crashed or was stopped while handling the message)",
                                b.policy.max_attempts,
                                d.attempt - 1
                            );
                            let mut failure = d.failure(
                                reason,
                                "no answer from the handler".into(),
                                Some(&b.route),
                                Some(&b.handler_name),
                                SystemTime::now(),
                            );
                            failure.attempts = d.attempt - 1;
                            self.settle(d, Settlement::DeadLetter(failure), Some(&b), &abort).await;
                        }
                        Ok(b) => self.handle(d, &b, &shutdown, &abort).await,
                    }
                }
                .instrument(span),
            );
            tokio::select! {
                biased;
                // Grace period over: dropping the work drops its delivery (handed back).
                _ = abort.cancelled() => {}
                _ = work => {}
            }
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            drop(window_slot);
        });
    }

    /// The route `r` bound for this subscription under `wiring` (see [`Bound`]);
    /// `None` when its handler has no target.
    fn bind(&self, wiring: &Arc<Wiring>, r: &RouteMatch<'_>) -> Option<Arc<Bound>> {
        let mut cache = self.bound.lock();
        if !cache.wiring.as_ref().is_some_and(|w| Arc::ptr_eq(w, wiring)) {
            *cache = BoundRoutes { wiring: Some(wiring.clone()), routes: HashMap::new() };
        }
        if let Some(b) = cache.routes.get(r.route).filter(|b| b.handler_name == r.handler) {
            return Some(b.clone());
        }
        let handler = wiring.handlers.get(r.handler)?.clone();
        let bound = Arc::new(Bound {
            route: r.route.to_string(),
            handler_name: r.handler.to_string(),
            handler,
            policy: r.retry.unwrap_or(&self.config.retry).clone(),
            counters: Settled::new(&self.metrics, &[self.name.as_str(), r.route, r.handler]),
        });
        cache.routes.insert(r.route.to_string(), bound.clone());
        Some(bound)
    }

    /// Deliver (again while the handler's circuit is not closed), decide, settle.
    async fn handle(&self, d: Delivery, b: &Bound, shutdown: &CancellationToken, abort: &CancellationToken) {
        let (route, handler_name, handler, policy) = (b.route.as_str(), b.handler_name.as_str(), &b.handler, &b.policy);
        if self.already_handled(&d).await {
            self.metrics.deduplicated.with_label_values(&[self.name.as_str()]).inc();
            debug!(subscription = %self.name, id = %d.message.id, "already handled; acking without delivery");
            self.settle(d, Settlement::Ack, Some(b), abort).await;
            return;
        }
        let outcome = loop {
            // Shutdown while waiting: the delivery is dropped, so handed back.
            let Some(admission) = handler.breaker.admit(shutdown).await else { return };
            let slot = tokio::select! {
                biased;
                _ = shutdown.cancelled() => None,
                slot = handler.limit.acquire() => slot,
            };
            let Some(slot) = slot else { return };
            let outcome = self.deliver(&d, route, handler_name, handler).await;
            let verdict = match &outcome {
                o if o.is_failure() => Verdict::Failure,
                Outcome::Undeliverable { .. } => Verdict::Neutral,
                _ => Verdict::Success,
            };
            // A failed attempt (429, 503, a timeout, no connection) says the handler
            // takes no more; an undeliverable message never reached it.
            slot.done(match verdict {
                Verdict::Failure => Feedback::BackPressure,
                Verdict::Neutral => Feedback::NotSent,
                Verdict::Success => Feedback::Answered,
            });
            let error = match &outcome {
                Outcome::Retry { error, .. } => error.as_str(),
                _ => "",
            };
            if admission.record(verdict, error) && verdict == Verdict::Failure {
                // The handler is failing as a whole, not this message: wait for the
                // circuit and try it again with the same attempt number.
                self.metrics.attempts_held.with_label_values(&[handler_name]).inc();
                debug!(subscription = %self.name, id = %d.message.id, attempt = d.attempt, error, "attempt failed while the circuit is open; not counted, waiting for the circuit");
                continue;
            }
            break outcome;
        };
        let now = SystemTime::now();
        let failure = |reason: String, error: String| d.failure(reason, error, Some(route), Some(handler_name), now);
        let settlement = match decide(policy, d.attempt, outcome, fastrand::f64()) {
            Decision::Ack => {
                // Recorded before the ack: a crash in between leaves a redelivery
                // that dedup then skips.
                if let Some(dedup) = &self.dedup {
                    if let Err(e) = dedup.record(&d.message.id).await {
                        self.metrics.dedup_errors.with_label_values(&[self.name.as_str()]).inc();
                        warn!(subscription = %self.name, id = %d.message.id, error = %e, "could not record the message as handled; a redelivered copy would be handled again");
                    }
                }
                Settlement::Ack
            }
            Decision::Retry { after, next_attempt, error } => {
                Settlement::Retry { after, next_attempt, failure: failure(format!("retrying after {after:?}"), error) }
            }
            Decision::DeadLetter { reason, error } => Settlement::DeadLetter(failure(reason, error)),
        };
        self.settle(d, settlement, Some(b), abort).await;
    }

    /// One attempt at the handler.
    async fn deliver(&self, d: &Delivery, route: &str, handler_name: &str, handler: &Handler) -> Outcome {
        self.in_flight_gauge.inc();
        let started = std::time::Instant::now();
        // A child of the consumer span per attempt; the handler gets its context.
        let span = otel::attempt(handler_name, route, d.attempt);
        let traceparent = otel::traceparent(&span);
        let outcome = handler
            .target
            .deliver(DeliveryInfo {
                message: &d.message,
                attempt: d.attempt,
                subscription: &self.name,
                route,
                handler: handler_name,
                traceparent: traceparent.as_deref(),
            })
            .instrument(span.clone())
            .await;
        otel::attempt_done(&span, &outcome);
        handler.seconds.observe(started.elapsed().as_secs_f64());
        self.in_flight_gauge.dec();
        outcome
    }

    /// Whether dedup knows this message as handled. A dedup store that cannot answer
    /// means "not handled" (deliver: at least once still holds).
    async fn already_handled(&self, d: &Delivery) -> bool {
        let Some(dedup) = &self.dedup else { return false };
        match dedup.seen(&d.message.id).await {
            Ok(seen) => seen,
            Err(e) => {
                self.metrics.dedup_errors.with_label_values(&[self.name.as_str()]).inc();
                warn!(subscription = %self.name, id = %d.message.id, error = %e, "dedup lookup failed; delivering");
                false
            }
        }
    }

    /// Dead-letter a message that never reached a handler.
    async fn dead_letter_unhandled(&self, d: Delivery, reason: String, abort: &CancellationToken) {
        let failure = d.failure(reason.clone(), reason, None, None, SystemTime::now());
        self.settle(d, Settlement::DeadLetter(failure), None, abort).await;
    }

    /// The one place a delivery is settled, counted and logged. A settlement the
    /// broker refuses is tried again with backoff until it lands (the message stays
    /// unacked and keeps its window slot), until the broker takes the message back by
    /// itself, or until the grace period of a shutdown is over (then it is handed back).
    /// `bound`: the route the message took, `None` when it never reached a handler.
    async fn settle(&self, d: Delivery, mut settlement: Settlement, bound: Option<&Bound>, abort: &CancellationToken) {
        // Tracing on: the retry copy or dead letter carries the consumer span's
        // context, and the settlement is a span of its own.
        let span = if otel::enabled() {
            let consumer = Span::current();
            if let (Some(tp), Settlement::Retry { failure, .. } | Settlement::DeadLetter(failure)) =
                (otel::traceparent(&consumer), &mut settlement)
            {
                failure.traceparent = Some(tp);
            }
            otel::consumed(&consumer, &settlement);
            otel::settle(&consumer, &settlement)
        } else {
            Span::none()
        };
        self.settle_traced(d, settlement, bound, abort).instrument(span).await;
    }

    /// [`Self::settle`]'s work, inside the settlement's span.
    async fn settle_traced(
        &self,
        mut d: Delivery,
        settlement: Settlement,
        bound: Option<&Bound>,
        abort: &CancellationToken,
    ) {
        let route = bound.map_or("", |b| b.route.as_str());
        // A message that never reached a handler (rare) is counted under empty route
        // and handler labels, looked up now.
        // The route's counter, resolved when it was bound; a message that never
        // reached a handler (rare) is counted under empty route and handler labels,
        // only the series it needs looked up now.
        let pick = |bound_counter: fn(&Settled) -> &IntCounter, all: &IntCounterVec| match bound {
            Some(b) => std::borrow::Cow::Borrowed(bound_counter(&b.counters)),
            None => std::borrow::Cow::Owned(all.with_label_values(&[self.name.as_str(), "", ""])),
        };
        let counter = match &settlement {
            Settlement::Ack => {
                debug!(subscription = %self.name, route, id = %d.message.id, attempt = d.attempt, "handled");
                Some(pick(|c| &c.acked, &self.metrics.acked))
            }
            Settlement::Retry { after, next_attempt, failure } => {
                warn!(subscription = %self.name, route, id = %d.message.id, attempt = d.attempt, next_attempt, delay = ?after, error = %failure.last_error, "attempt failed; retrying");
                Some(pick(|c| &c.retried, &self.metrics.retried))
            }
            Settlement::DeadLetter(failure) => {
                warn!(subscription = %self.name, route, id = %d.message.id, attempts = failure.attempts, reason = %failure.reason, error = %failure.last_error, "dead-lettering");
                Some(pick(|c| &c.dead_lettered, &self.metrics.dead_lettered))
            }
            Settlement::Release => None,
        };
        let mut backoff = None;
        let mut warned: Option<Instant> = None;
        let mut tries = 0u32;
        loop {
            match d.settle(&settlement).await {
                Ok(()) => {
                    if let Some(c) = &counter {
                        c.inc();
                    }
                    if tries > 0 {
                        info!(subscription = %self.name, id = %d.message.id, tries = tries + 1, "settled after the broker refused it earlier");
                    }
                    break;
                }
                Err(SettleError::Gone(reason)) => {
                    warn!(subscription = %self.name, id = %d.message.id, reason = %reason, "the broker took the message back before it was settled; it will be delivered again");
                    break;
                }
                Err(SettleError::Failed(reason)) => {
                    tries += 1;
                    self.metrics.settle_failures.with_label_values(&[self.name.as_str()]).inc();
                    if tries == 1 {
                        self.settling_changed(1, &reason);
                    } else {
                        self.settling_changed(0, &reason);
                    }
                    let wait = backoff.get_or_insert_with(backoff::settle).next_delay();
                    if warned.is_none_or(|t| t.elapsed() >= SETTLE_WARN_EVERY) {
                        warned = Some(Instant::now());
                        warn!(subscription = %self.name, id = %d.message.id, tries, error = %reason, retry_in = ?wait, "settlement refused by the broker; trying it again (not the handler), the message stays unacked");
                    }
                    tokio::select! {
                        biased;
                        _ = abort.cancelled() => break,
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
            }
        }
        if tries > 0 {
            self.settling_changed(-1, "");
        }
    }

    /// Track messages whose settlement is being retried, for `router_settling` and `/readyz`.
    fn settling_changed(&self, delta: i64, reason: &str) {
        let mut s = self.settling.lock();
        s.0 = s.0.saturating_add_signed(delta as isize);
        if !reason.is_empty() {
            s.1 = reason.to_string();
        }
        self.metrics.settling.with_label_values(&[self.name.as_str()]).set(s.0 as i64);
        if s.0 == 0 {
            self.status.clear(&Problem::Settling);
        } else {
            self.status.report(
                Problem::Settling,
                format!("{} message(s) whose settlement the broker refuses, retrying; last: {}", s.0, s.1),
            );
        }
    }
}

/// One running subscription, as the admin API sees and controls it.
#[derive(Clone)]
pub struct SubscriptionHandle(Arc<Pipeline>);

impl SubscriptionHandle {
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Whether both handles point at the same running pipeline (a reload that leaves
    /// a subscription alone keeps it; one that changes it starts a new one).
    pub fn same_as(&self, other: &SubscriptionHandle) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Its transport, for reading and reworking its dead letters.
    pub fn transport(&self) -> Arc<dyn Transport> {
        self.0.transport.clone()
    }

    /// What its transport needs to read its source and dead letters.
    pub fn spec(&self) -> ConsumeSpec {
        ConsumeSpec { subscription: self.0.name.clone(), config: self.0.config.clone(), lag: None }
    }

    pub fn state(&self) -> State {
        self.0.state()
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            name: self.0.name.clone(),
            transport: self.0.transport_name.clone(),
            state: self.0.state(),
            mode: *self.0.mode.borrow(),
            problems: self.0.status.reasons().into_iter().filter(|r| r != "no live consumer").collect(),
            in_flight: self.0.in_flight.load(Ordering::Relaxed),
            depths: self.0.depths.lock().clone(),
        }
    }

    /// Take nothing new; what is in flight finishes ([`crate::control`]).
    pub fn pause(&self) {
        self.0.set_mode(Mode::Paused);
    }

    /// Consume again after a pause or a drain.
    pub fn resume(&self) {
        self.0.set_mode(Mode::Running);
    }

    /// Take nothing new, finish what is in flight, stop the consumer until resumed.
    pub fn drain(&self) {
        self.0.set_mode(Mode::Draining);
    }
}

/// Every subscription of a router ([`Router::subscriptions`]), as it runs now.
#[derive(Clone, Default)]
pub struct Subscriptions(Registry);

impl Subscriptions {
    pub fn all(&self) -> Vec<SubscriptionHandle> {
        self.0.read().values().map(|p| SubscriptionHandle(p.clone())).collect()
    }

    pub fn get(&self, name: &str) -> Result<SubscriptionHandle, ControlError> {
        self.0
            .read()
            .get(name)
            .map(|p| SubscriptionHandle(p.clone()))
            .ok_or_else(|| ControlError::Unknown(name.to_string()))
    }
}

async fn acquire(limit: &Arc<Semaphore>, shutdown: &CancellationToken) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        p = limit.clone().acquire_owned() => p.ok(),
    }
}
