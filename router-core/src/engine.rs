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
//! handler has its own `max_in_flight` semaphore shared by every subscription; a task
//! waits for it without holding up messages bound for other handlers.
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
//! Shutdown: stop taking deliveries, let in-flight work finish within the grace
//! period, drop (= hand back to the broker) whatever is still running, then let the
//! transport flush its acks and close.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, trace, warn, Instrument, Span};

use crate::backoff;
use crate::breaker::{Breaker, CircuitState, Observer, Verdict};
use crate::config::{Config, SubscriptionConfig};
use crate::control::{ControlError, DepthsSeen, Mode, Snapshot, State};
use crate::dedup::Dedup;
use crate::health::{Problem, Readiness, SourceStatus};
use crate::message::{Delivery, SettleError, Settlement};
use crate::metrics::Metrics;
use crate::retry::{decide, Decision, Outcome, RetryPolicy};
use crate::routing::RoutingTable;
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

/// A handler as the engine sees it: how to reach it, how many may be in flight, and
/// its circuit.
#[derive(Clone)]
struct Handler {
    target: Arc<dyn Target>,
    limit: Arc<Semaphore>,
    breaker: Arc<Breaker>,
}

/// Everything one subscription pipeline needs, shared by its tasks.
struct Pipeline {
    name: String,
    config: SubscriptionConfig,
    transport: Arc<dyn Transport>,
    routes: Arc<RoutingTable>,
    handlers: Arc<HashMap<String, Handler>>,
    metrics: Arc<Metrics>,
    status: Arc<SourceStatus>,
    grace: Duration,
    reconnect_max: Duration,
    dedup: Option<Dedup>,
    /// Circuits of the handlers this subscription can reach: while one is open, the
    /// subscription takes nothing new from the broker.
    breakers: Vec<Arc<Breaker>>,
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
}

/// The whole router: every subscription of a config, wired to its targets.
pub struct Router {
    pipelines: Vec<Arc<Pipeline>>,
    transports: Vec<Arc<dyn Transport>>,
    metrics: Arc<Metrics>,
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
struct CircuitHealth(Arc<SourceStatus>);

impl Observer for CircuitHealth {
    fn changed(&self, handler: &str, state: CircuitState, reason: &str) {
        let problem = Problem::CircuitOpen(handler.to_string());
        match state {
            CircuitState::Closed => self.0.clear(&problem),
            CircuitState::Open => self.0.report(problem, format!("{reason}; taking nothing new")),
            CircuitState::HalfOpen => self.0.report(problem, "half-open: probing the handler"),
        }
    }
}

impl Router {
    /// Wire a validated config to its targets (one per handler name).
    pub fn new(
        config: &Config,
        targets: HashMap<String, Arc<dyn Target>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, BuildError> {
        let mut handlers = HashMap::new();
        for (name, h) in &config.handlers {
            let used = config.routes.iter().any(|r| &r.handler == name)
                || config.subscriptions.values().any(|s| s.default_handler.as_deref() == Some(name));
            match targets.get(name) {
                Some(t) => {
                    let breaker = Breaker::new(name, h.circuit_breaker.clone());
                    breaker.observe(Arc::new(CircuitMetrics(metrics.clone())));
                    metrics.circuit_state.with_label_values(&[name.as_str()]).set(0);
                    handlers.insert(
                        name.clone(),
                        Handler { target: t.clone(), limit: Arc::new(Semaphore::new(h.max_in_flight.max(1))), breaker },
                    );
                }
                None if used => return Err(BuildError::MissingTarget(name.clone())),
                None => {}
            }
        }
        let handlers = Arc::new(handlers);
        let routes = Arc::new(RoutingTable::from_config(config));
        let transports: HashMap<&String, Arc<dyn Transport>> =
            config.transports.iter().map(|(name, t)| (name, transport::build(name, t))).collect();
        let mut pipelines = Vec::new();
        for (name, s) in &config.subscriptions {
            let Some(transport) = transports.get(&s.transport) else {
                continue;
            };
            let gauge = metrics.connected.with_label_values(&[name.as_str()]);
            let status = Arc::new(SourceStatus::new(Some(gauge)));
            let breakers: Vec<Arc<Breaker>> = config
                .reachable_handlers(name)
                .filter_map(|(h, _)| handlers.get(h))
                .map(|h| h.breaker.clone())
                .collect();
            for b in &breakers {
                b.observe(Arc::new(CircuitHealth(status.clone())));
            }
            let reconnect_max =
                config.transports.get(&s.transport).map_or(Duration::from_secs(30), |t| t.reconnect_max_delay);
            pipelines.push(Arc::new(Pipeline {
                name: name.clone(),
                config: s.clone(),
                transport: transport.clone(),
                routes: routes.clone(),
                handlers: handlers.clone(),
                metrics: metrics.clone(),
                status,
                grace: config.shutdown.grace_period,
                reconnect_max,
                dedup: s.dedup.as_ref().map(|d| Dedup::new(name, d)),
                breakers,
                settling: Mutex::new((0, String::new())),
                last_received: Mutex::new(Instant::now()),
                transport_name: s.transport.clone(),
                mode: tokio::sync::watch::Sender::new(Mode::Running),
                in_flight: AtomicU64::new(0),
                depths: Mutex::new(DepthsSeen::default()),
            }));
            metrics.paused.with_label_values(&[name.as_str()]).set(0);
        }
        Ok(Router { pipelines, transports: transports.into_values().collect(), metrics })
    }

    pub fn readiness(&self) -> Readiness {
        Readiness(self.pipelines.iter().map(|p| (p.name.clone(), p.status.clone())).collect())
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Handles on every subscription, for the admin API: what each is doing, and
    /// pause, resume and drain.
    pub fn subscriptions(&self) -> Subscriptions {
        Subscriptions(self.pipelines.iter().map(|p| SubscriptionHandle(p.clone())).collect())
    }

    /// Run every subscription until `shutdown` is cancelled, then drain and return. A
    /// subscription that can never run (a fatal consumer error) stops the others too,
    /// and the error is returned.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let stop = CancellationToken::new();
        let link = {
            let (outer, inner) = (shutdown.clone(), stop.clone());
            tokio::spawn(async move {
                outer.cancelled().await;
                inner.cancel();
            })
        };
        let mut all = tokio::task::JoinSet::new();
        for p in &self.pipelines {
            let (p, stop) = (p.clone(), stop.clone());
            all.spawn(async move {
                let result = p.clone().run(stop.clone()).await;
                if result.is_err() {
                    stop.cancel();
                }
                result.map_err(|reason| RunError::Fatal { subscription: p.name.clone(), reason })
            });
        }
        let mut failure = None;
        while let Some(res) = all.join_next().await {
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    error!(error = %e, "stopping the router");
                    failure.get_or_insert(e);
                }
                Err(e) => error!(error = %e, "a subscription pipeline failed"),
            }
        }
        link.abort();
        for t in &self.transports {
            t.close().await;
        }
        info!("router stopped");
        failure.map_or(Ok(()), Err)
    }
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
        for b in &self.pipeline.breakers {
            if !b.wait_not_open(&self.shutdown).await {
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
        let name = [self.pipeline.name.as_str()];
        self.pipeline.metrics.received.with_label_values(&name).inc();
        if d.redelivered {
            self.pipeline.metrics.redelivered.with_label_values(&name).inc();
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
        let mut mode = self.pipeline.mode.subscribe();
        let mut changes: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>> =
            self.pipeline.breakers.iter().map(|b| Box::pin(b.changed()) as _).collect();
        changes.push(Box::pin(async move {
            if mode.changed().await.is_err() {
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
                    if tokio::time::timeout(self.grace, &mut consumer).await.is_err() {
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
        if !tasks.is_empty() {
            info!(subscription = %self.name, in_flight = tasks.len(), grace = ?self.grace, "draining in-flight messages");
        }
        if tokio::time::timeout(self.grace, tasks.wait()).await.is_err() {
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
            Mode::Running if self.breakers.iter().any(|b| b.is_open()) => State::BreakerOpen,
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
        *self.mode.borrow() != Mode::Running || self.breakers.iter().any(|b| b.is_open())
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
        let route = match problem {
            Some(reason) => Err(reason),
            None => match self.routes.route(&self.name, &d.message) {
                None => Err(format!("no route matched (routing key {:?})", d.message.key.as_deref().unwrap_or(""))),
                Some(r) => match self.handlers.get(r.handler) {
                    Some(h) => Ok((
                        r.route.to_string(),
                        r.handler.to_string(),
                        h.clone(),
                        r.retry.unwrap_or(&self.config.retry).clone(),
                    )),
                    // Config validation makes this unreachable; dead-letter rather than panic.
                    None => Err(format!("handler {:?} has no target", r.handler)),
                },
            },
        };
        let (shutdown, abort) = (inbox.shutdown.clone(), inbox.abort.clone());
        // The delivery's consumer span (none with tracing off): its attempts and its
        // settlement run inside it.
        let span = otel::consume(&self.name, &self.config, &d);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        inbox.tasks.spawn(async move {
            let work = async {
                match route {
                    Err(reason) => self.dead_letter_unhandled(d, reason, &abort).await,
                    // Earlier deliveries ended without an answer (the consumer died
                    // or was stopped mid-handling): a message that keeps killing its
                    // consumer must not be delivered forever.
                    Ok((route, handler_name, _, policy)) if d.attempt > policy.max_attempts => {
                        let reason = format!(
                            "max attempts ({}) exhausted: {} earlier deliveries ended without an answer (the consumer crashed or was stopped while handling the message)",
                            policy.max_attempts,
                            d.attempt - 1
                        );
                        let mut failure = d.failure(
                            reason,
                            "no answer from the handler".into(),
                            Some(&route),
                            Some(&handler_name),
                            SystemTime::now(),
                        );
                        failure.attempts = d.attempt - 1;
                        self.settle(d, Settlement::DeadLetter(failure), &route, &handler_name, &abort).await;
                    }
                    Ok((route, handler_name, handler, policy)) => {
                        self.handle(d, &route, &handler_name, &handler, &policy, &shutdown, &abort).await;
                    }
                }
            }
            .instrument(span);
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

    /// Deliver (again while the handler's circuit is not closed), decide, settle.
    #[allow(clippy::too_many_arguments)]
    async fn handle(
        &self,
        d: Delivery,
        route: &str,
        handler_name: &str,
        handler: &Handler,
        policy: &RetryPolicy,
        shutdown: &CancellationToken,
        abort: &CancellationToken,
    ) {
        if self.already_handled(&d).await {
            self.metrics.deduplicated.with_label_values(&[self.name.as_str()]).inc();
            debug!(subscription = %self.name, id = %d.message.id, "already handled; acking without delivery");
            self.settle(d, Settlement::Ack, route, handler_name, abort).await;
            return;
        }
        let outcome = loop {
            // Shutdown while waiting: the delivery is dropped, so handed back.
            let Some(admission) = handler.breaker.admit(shutdown).await else { return };
            let Some(slot) = acquire(&handler.limit, shutdown).await else { return };
            let outcome = self.deliver(&d, route, handler_name, handler).await;
            drop(slot);
            let verdict = match &outcome {
                o if o.is_failure() => Verdict::Failure,
                Outcome::Undeliverable { .. } => Verdict::Neutral,
                _ => Verdict::Success,
            };
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
        self.settle(d, settlement, route, handler_name, abort).await;
    }

    /// One attempt at the handler.
    async fn deliver(&self, d: &Delivery, route: &str, handler_name: &str, handler: &Handler) -> Outcome {
        let in_flight = self.metrics.in_flight.with_label_values(&[self.name.as_str()]);
        in_flight.inc();
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
        self.metrics.handler_seconds.with_label_values(&[handler_name]).observe(started.elapsed().as_secs_f64());
        in_flight.dec();
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
        self.settle(d, Settlement::DeadLetter(failure), "", "", abort).await;
    }

    /// The one place a delivery is settled, counted and logged. A settlement the
    /// broker refuses is tried again with backoff until it lands (the message stays
    /// unacked and keeps its window slot), until the broker takes the message back by
    /// itself, or until the grace period of a shutdown is over (then it is handed back).
    async fn settle(
        &self,
        d: Delivery,
        mut settlement: Settlement,
        route: &str,
        handler: &str,
        abort: &CancellationToken,
    ) {
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
        self.settle_traced(d, settlement, route, handler, abort).instrument(span).await;
    }

    /// [`Self::settle`]'s work, inside the settlement's span.
    async fn settle_traced(
        &self,
        mut d: Delivery,
        settlement: Settlement,
        route: &str,
        handler: &str,
        abort: &CancellationToken,
    ) {
        let labels = [self.name.as_str(), route, handler];
        let id = d.message.id.clone();
        let counter = match &settlement {
            Settlement::Ack => {
                debug!(subscription = %self.name, route, %id, attempt = d.attempt, "handled");
                Some(&self.metrics.acked)
            }
            Settlement::Retry { after, next_attempt, failure } => {
                warn!(subscription = %self.name, route, %id, attempt = d.attempt, next_attempt, delay = ?after, error = %failure.last_error, "attempt failed; retrying");
                Some(&self.metrics.retried)
            }
            Settlement::DeadLetter(failure) => {
                warn!(subscription = %self.name, route, %id, attempts = failure.attempts, reason = %failure.reason, error = %failure.last_error, "dead-lettering");
                Some(&self.metrics.dead_lettered)
            }
            Settlement::Release => None,
        };
        let mut backoff = None;
        let mut warned: Option<Instant> = None;
        let mut tries = 0u32;
        loop {
            match d.settle(&settlement).await {
                Ok(()) => {
                    if let Some(c) = counter {
                        c.with_label_values(&labels).inc();
                    }
                    if tries > 0 {
                        info!(subscription = %self.name, %id, tries = tries + 1, "settled after the broker refused it earlier");
                    }
                    break;
                }
                Err(SettleError::Gone(reason)) => {
                    warn!(subscription = %self.name, %id, reason = %reason, "the broker took the message back before it was settled; it will be delivered again");
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
                        warn!(subscription = %self.name, %id, tries, error = %reason, retry_in = ?wait, "settlement refused by the broker; trying it again (not the handler), the message stays unacked");
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

/// Every subscription of a router ([`Router::subscriptions`]).
#[derive(Clone, Default)]
pub struct Subscriptions(Vec<SubscriptionHandle>);

impl Subscriptions {
    pub fn all(&self) -> &[SubscriptionHandle] {
        &self.0
    }

    pub fn get(&self, name: &str) -> Result<&SubscriptionHandle, ControlError> {
        self.0.iter().find(|s| s.name() == name).ok_or_else(|| ControlError::Unknown(name.to_string()))
    }
}

async fn acquire(limit: &Arc<Semaphore>, shutdown: &CancellationToken) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        p = limit.clone().acquire_owned() => p.ok(),
    }
}
