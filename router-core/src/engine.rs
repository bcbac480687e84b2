//! The delivery engine: one pipeline per subscription.
//!
//! ```text
//! transport.consume ──inbox.put()──▶ window slot, route ──▶ task: handler slot, target.deliver
//!        ▲                                                                   │ Outcome
//!        └──────────── delivery.settle(Settlement) ◀── decide() ◀────────────┘
//! ```
//!
//! Bounds: the broker hands a subscription at most `prefetch` unsettled messages, and
//! the pipeline's window admits as many (one when `ordered`): `inbox.put` waits for a
//! window slot on the transport's own task, so a full window stops consumption. Each
//! handler has its own `max_in_flight` semaphore shared by every subscription; a task
//! waits for it without holding up messages bound for other handlers.
//!
//! Shutdown: stop taking deliveries, let in-flight work finish within the grace
//! period, drop (= hand back to the broker) whatever is still running, then let the
//! transport flush its acks and close.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use crate::config::{Config, SubscriptionConfig};
use crate::dedup::Dedup;
use crate::message::{Delivery, Settlement};
use crate::metrics::Metrics;
use crate::retry::{decide, Decision, RetryPolicy};
use crate::routing::RoutingTable;
use crate::target::{DeliveryInfo, Target};
use crate::transport::{self, ConsumeSpec, Inbox, SourceStatus, Transport};

/// Why a router could not be built from a valid config.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("handler {0:?} is used by a route but no target was registered for it")]
    MissingTarget(String),
}

/// A handler as the engine sees it: how to reach it and how many may be in flight.
#[derive(Clone)]
struct Handler {
    target: Arc<dyn Target>,
    limit: Arc<Semaphore>,
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
    dedup: Option<Dedup>,
}

/// The whole router: every subscription of a config, wired to its targets.
pub struct Router {
    pipelines: Vec<Arc<Pipeline>>,
    transports: Vec<Arc<dyn Transport>>,
    metrics: Arc<Metrics>,
}

/// Live readiness of every subscription, for `/readyz`.
#[derive(Clone)]
pub struct Readiness(Vec<(String, Arc<SourceStatus>)>);

impl Readiness {
    /// Names of subscriptions without a live consumer.
    pub fn not_ready(&self) -> Vec<String> {
        self.0.iter().filter(|(_, s)| !s.is_connected()).map(|(n, _)| n.clone()).collect()
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
                    handlers.insert(
                        name.clone(),
                        Handler { target: t.clone(), limit: Arc::new(Semaphore::new(h.max_in_flight.max(1))) },
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
            pipelines.push(Arc::new(Pipeline {
                name: name.clone(),
                config: s.clone(),
                transport: transport.clone(),
                routes: routes.clone(),
                handlers: handlers.clone(),
                metrics: metrics.clone(),
                status: Arc::new(SourceStatus::new(Some(gauge))),
                grace: config.shutdown.grace_period,
                dedup: s.dedup.as_ref().map(|d| Dedup::new(name, d)),
            }));
        }
        Ok(Router { pipelines, transports: transports.into_values().collect(), metrics })
    }

    pub fn readiness(&self) -> Readiness {
        Readiness(self.pipelines.iter().map(|p| (p.name.clone(), p.status.clone())).collect())
    }

    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Run every subscription until `shutdown` is cancelled, then drain and return.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut all = tokio::task::JoinSet::new();
        for p in &self.pipelines {
            all.spawn(p.clone().run(shutdown.clone()));
        }
        while let Some(res) = all.join_next().await {
            if let Err(e) = res {
                error!(error = %e, "a subscription pipeline failed");
            }
        }
        for t in &self.transports {
            t.close().await;
        }
        info!("router stopped");
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
        let name = [self.pipeline.name.as_str()];
        self.pipeline.metrics.received.with_label_values(&name).inc();
        if d.redelivered {
            self.pipeline.metrics.redelivered.with_label_values(&name).inc();
        }
        let Some(slot) = acquire(&self.window, &self.shutdown).await else { return Err(d) };
        self.pipeline.clone().dispatch(d, slot, self);
        Ok(())
    }
}

impl Pipeline {
    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let spec = ConsumeSpec {
            subscription: self.name.clone(),
            config: self.config.clone(),
            lag: Some(self.metrics.consumer_lag.clone()),
        };
        let window = if self.config.ordered { 1 } else { usize::from(self.config.prefetch.max(1)) };
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
        let stop_consuming = CancellationToken::new();
        let mut consumer = tokio::spawn({
            let (transport, status, stop) = (self.transport.clone(), self.status.clone(), stop_consuming.clone());
            async move { transport.consume(spec, inbox, status, stop).await }
        });
        tokio::select! {
            _ = shutdown.cancelled() => {}
            res = &mut consumer => {
                error!(subscription = %self.name, result = ?res, "transport stopped on its own");
            }
        }
        // Stop taking deliveries; let in-flight work finish within the grace period.
        stop_consuming.cancel();
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
        info!(subscription = %self.name, "subscription stopped");
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
        inbox.tasks.spawn(async move {
            let work = async {
                match route {
                    Err(reason) => self.dead_letter_unhandled(d, reason).await,
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
                        self.settle(d, Settlement::DeadLetter(failure), &route, &handler_name).await;
                    }
                    Ok((route, handler_name, handler, policy)) => {
                        // Shutdown while waiting: the delivery is dropped, so handed back.
                        if let Some(slot) = acquire(&handler.limit, &shutdown).await {
                            self.handle(d, &route, &handler_name, &handler, &policy).await;
                            drop(slot);
                        }
                    }
                }
            };
            tokio::select! {
                biased;
                // Grace period over: dropping the work drops its delivery (handed back).
                _ = abort.cancelled() => {}
                _ = work => {}
            }
            drop(window_slot);
        });
    }

    /// One attempt: deliver, decide, settle.
    async fn handle(&self, d: Delivery, route: &str, handler_name: &str, handler: &Handler, policy: &RetryPolicy) {
        if self.already_handled(&d).await {
            self.metrics.deduplicated.with_label_values(&[self.name.as_str()]).inc();
            debug!(subscription = %self.name, id = %d.message.id, "already handled; acking without delivery");
            self.settle(d, Settlement::Ack, route, handler_name).await;
            return;
        }
        let in_flight = self.metrics.in_flight.with_label_values(&[self.name.as_str()]);
        in_flight.inc();
        let started = Instant::now();
        let outcome = handler
            .target
            .deliver(DeliveryInfo {
                message: &d.message,
                attempt: d.attempt,
                subscription: &self.name,
                route,
                handler: handler_name,
            })
            .await;
        self.metrics.handler_seconds.with_label_values(&[handler_name]).observe(started.elapsed().as_secs_f64());
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
        self.settle(d, settlement, route, handler_name).await;
        in_flight.dec();
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
    async fn dead_letter_unhandled(&self, d: Delivery, reason: String) {
        let failure = d.failure(reason.clone(), reason, None, None, SystemTime::now());
        self.settle(d, Settlement::DeadLetter(failure), "", "").await;
    }

    /// The one place a delivery is settled, counted and logged.
    async fn settle(&self, d: Delivery, settlement: Settlement, route: &str, handler: &str) {
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
        match d.settle(settlement).await {
            Ok(()) => {
                if let Some(c) = counter {
                    c.with_label_values(&labels).inc();
                }
            }
            Err(e) => {
                self.metrics.settle_failures.with_label_values(&[self.name.as_str()]).inc();
                error!(subscription = %self.name, %id, error = %e, "settlement failed; the broker will redeliver the message");
            }
        }
    }
}

async fn acquire(limit: &Arc<Semaphore>, shutdown: &CancellationToken) -> Option<OwnedSemaphorePermit> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => None,
        p = limit.clone().acquire_owned() => p.ok(),
    }
}
