//! Brokers. A transport consumes a subscription's source into [`Delivery`] values and
//! settles them (ack, durable retry, durable dead-letter, release); it also publishes.
//! It knows nothing of routing, HTTP or PHP: adding a broker touches only this folder
//! and [`build`].

pub mod amqp;
pub mod config;
pub mod kafka;
pub mod memory;
pub mod redis;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::backoff;
use crate::config::{SubscriptionConfig, TransportConfig};
use crate::message::{Delivery, Message};
pub use config::{BrokerConfig, SourceConfig, TransportKind};

/// Names producers use, on brokers without message properties (Redis fields, Kafka
/// headers), for the message id, content type and type.
pub mod field {
    pub const MESSAGE_ID: &str = "message_id";
    pub const CONTENT_TYPE: &str = "content_type";
    pub const TYPE: &str = "type";
}

/// What a transport needs to consume one subscription.
#[derive(Clone, Debug)]
pub struct ConsumeSpec {
    pub subscription: String,
    /// The subscription entry: what to read (AMQP `queue`, Redis `streams`, Kafka
    /// `topics`), `prefetch` (most unsettled deliveries at once), dead-letter
    /// destination, and what is specific to one broker.
    pub config: SubscriptionConfig,
    /// `router_consumer_lag{subscription, topic, partition}`, for brokers that know it.
    pub lag: Option<prometheus::IntGaugeVec>,
}

impl ConsumeSpec {
    /// The subscription's source as the transport of `kind` reads it, picked by `pick`
    /// (`SourceConfig::amqp` ...). The loader parses every subscription by the kind of
    /// its transport, so `Err` means a caller handed a transport another's subscription.
    pub fn source<'a, T>(
        &'a self,
        kind: &str,
        pick: impl Fn(&'a SourceConfig) -> Option<&'a T>,
    ) -> Result<&'a T, String> {
        pick(&self.config.source)
            .ok_or_else(|| format!("subscription {:?} is not a {kind} subscription", self.subscription))
    }
}

pub use crate::health::{Problem, SourceStatus};

/// What [`Transport::dead_letters`] hands each dead letter to; `false` stops the read.
pub type Visit<'a> = &'a mut (dyn FnMut(&crate::dlq::DeadLetter) -> bool + Send);

/// What `dlq replay` and `dlq purge` do with one dead letter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rework {
    /// Leave it where it is.
    Keep,
    /// Publish a copy back to the subscription's source, then remove it.
    Replay,
    /// Remove it.
    Purge,
    /// Leave it and every one after it.
    Stop,
}

/// What [`Transport::rework_dead_letters`] asks about each dead letter.
pub type Decide<'a> = &'a mut (dyn FnMut(&crate::dlq::DeadLetter) -> Rework + Send);

/// How many dead letters a rework replayed and purged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reworked {
    pub replayed: u64,
    pub purged: u64,
}

impl Reworked {
    /// Count one done `act`.
    pub fn count(&mut self, act: Rework) {
        match act {
            Rework::Replay => self.replayed += 1,
            Rework::Purge => self.purged += 1,
            Rework::Keep | Rework::Stop => {}
        }
    }
}

/// What waits at the broker for one subscription, as `router_backlog_messages`,
/// `router_retries_waiting`, `router_dead_letters` and the admin API show it. `None`
/// where the transport cannot tell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Depths {
    /// Messages not yet handled: AMQP ready messages of the queue; Redis the group's
    /// lag plus its pending entries; Kafka the group's lag on the source topics.
    pub backlog: Option<u64>,
    /// Retries written durably and not yet back (AMQP delay queues, Redis delayed set
    /// and retry stream, Kafka retry topic lag).
    pub retries_waiting: Option<u64>,
    /// Messages in the dead-letter destination.
    pub dead_letters: Option<u64>,
}

/// Why a transport could not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The broker could not be reached or refused the request.
    #[error("{0}")]
    Broker(String),
    /// This broker has no such thing (an exchange on Redis or Kafka).
    #[error("{0}")]
    Unsupported(String),
    #[error("publish to {destination} not confirmed: {reason}")]
    NotConfirmed { destination: String, reason: String },
}

/// Why a consumer ended without being asked to.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// It can never work as configured (a client that cannot be created, a pattern
    /// the broker's client refuses): the router stops and exits non-zero.
    #[error("{0}")]
    Fatal(String),
    /// It failed; the supervisor starts it again after a backoff.
    #[error("{0}")]
    Failed(String),
}

/// Where a transport hands its deliveries: the subscription's pipeline. Handing over
/// is the backpressure point: `put` waits while the subscription's in-flight window is
/// full, and while the subscription is paused (the circuit of a handler it routes to
/// is open). Deliveries are handed over on the transport's own task (no channel hop).
#[async_trait]
pub trait Inbox: Send + Sync {
    /// Take a delivery. `Err` gives it back when the router is stopping: the transport
    /// then stops consuming (the returned delivery, once dropped, goes back to the broker).
    async fn put(&self, delivery: Delivery) -> Result<(), Delivery>;

    /// Whether `put` would wait because the subscription is paused. A transport whose
    /// loop must keep polling its broker (Kafka: group membership) checks this instead
    /// of blocking in `put`.
    fn paused(&self) -> bool {
        false
    }

    /// Completes when the pause may have ended (check [`Inbox::paused`] again).
    async fn pause_changed(&self) {
        std::future::pending::<()>().await
    }
}

#[async_trait]
pub trait Transport: Send + Sync {
    /// Consume the subscription's source into `inbox` until `stop` is cancelled or the
    /// inbox refuses a delivery (`Ok`), reconnecting on its own after broker failures.
    /// It returns once the deliveries already handed out are settled or dropped (so
    /// their acks reach the broker). An `Err` ends this consumer; the engine's
    /// supervisor decides what follows.
    async fn consume(
        &self,
        spec: ConsumeSpec,
        inbox: Arc<dyn Inbox>,
        status: Arc<SourceStatus>,
        stop: CancellationToken,
    ) -> Result<(), ConsumeError>;

    /// Publish `message` durably (confirmed) to `exchange` with `routing_key`.
    async fn publish(&self, exchange: &str, routing_key: &str, message: &Message) -> Result<(), TransportError>;

    /// How many messages wait at the broker that this subscription could be taking
    /// now (AMQP: ready messages of the queue; Redis: entries not yet delivered to the
    /// group; Kafka: records after the committed offsets of partitions it reads). For
    /// the stall watchdog; `None` when the transport cannot tell.
    async fn backlog(&self, _spec: &ConsumeSpec) -> Result<Option<u64>, TransportError> {
        Ok(None)
    }

    /// What waits at the broker for the subscription in `spec` ([`Depths`]), asked
    /// every few seconds for the gauges and the admin API. Cheap questions only
    /// (counters the broker keeps), never a walk over messages.
    async fn depths(&self, _spec: &ConsumeSpec) -> Result<Depths, TransportError> {
        Ok(Depths::default())
    }

    /// Read the dead letters of the subscription in `spec`, oldest first, handing each
    /// to `visit` until it returns `false`. Nothing is removed or changed at the
    /// broker; a destination that does not exist yet holds none.
    async fn dead_letters(&self, spec: &ConsumeSpec, visit: Visit<'_>) -> Result<(), TransportError> {
        let mut decide = |d: &crate::dlq::DeadLetter| if visit(d) { Rework::Keep } else { Rework::Stop };
        self.rework_dead_letters(spec, &mut decide, Duration::ZERO).await.map(|_| ())
    }

    /// Walk the dead letters as [`Transport::dead_letters`] does, doing with each what
    /// `decide` says ([`Rework`]), and sleeping `pace` after each one replayed or
    /// purged. A replayed copy goes back to the subscription's source, its failure
    /// headers removed and `x-router-replayed` set ([`crate::dlq::replay_headers`]),
    /// confirmed before the dead letter is removed: a crash in between leaves both
    /// (one duplicate), never neither. An `Err` stops the walk; what was done stays.
    async fn rework_dead_letters(
        &self,
        _spec: &ConsumeSpec,
        _decide: Decide<'_>,
        _pace: Duration,
    ) -> Result<Reworked, TransportError> {
        Err(TransportError::Unsupported("this transport cannot replay or purge its dead letters".into()))
    }

    /// Close connections cleanly; called once every subscription has stopped.
    async fn close(&self) {}
}

/// The transport a config entry describes.
pub fn build(name: &str, config: &TransportConfig) -> Arc<dyn Transport> {
    let reconnect_max = config.reconnect_max_delay;
    match &config.broker {
        BrokerConfig::Amqp(c) => Arc::new(amqp::AmqpTransport::new(name, c, reconnect_max)),
        BrokerConfig::Redis(c) => Arc::new(redis::RedisTransport::new(name, c, reconnect_max)),
        BrokerConfig::Kafka(c) => Arc::new(kafka::KafkaTransport::new(name, c)),
        BrokerConfig::Memory(_) => Arc::new(memory::MemoryBroker::named(name)),
    }
}

/// `url` without credentials, for logs and CloudEvents `source`; `fallback` when it
/// does not parse.
pub fn display_url(url: &str, fallback: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_password(None);
            let _ = u.set_username("");
            u.to_string()
        }
        Err(_) => fallback.to_string(),
    }
}

/// CloudEvents `source` of messages from `name` (a queue or stream) on the broker at
/// `display`: `amqp://host:5672/%2f/orders`, `redis://host:6379/orders`.
pub fn source_uri(display: &str, name: &str) -> String {
    format!("{}/{name}", display.trim_end_matches('/'))
}

/// A consume session that stayed up this long counts as healthy (see [`keep_consuming`]).
const HEALTHY_SESSION: Duration = Duration::from_secs(10);

/// Run consume sessions until one ends because the subscription stops (`Ok`) or `stop`
/// fires. After a failed session, wait ([`backoff::reconnect`]: 100 ms, doubling up to
/// `max_delay`) and start another; `/readyz` names the error meanwhile. A session marks
/// itself up with `status.set_connected(true)` once it consumes; only a session that
/// stayed up [`HEALTHY_SESSION`] resets the backoff, so one that fails right after
/// connecting does not hammer the broker.
pub(crate) async fn keep_consuming<F, Fut, E>(
    transport: &str,
    subscription: &str,
    max_delay: Duration,
    status: &SourceStatus,
    stop: &CancellationToken,
    mut session: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut backoff = backoff::reconnect(max_delay);
    loop {
        let started = Instant::now();
        let result = session().await;
        let was_up = status.is_connected();
        status.set_connected(false);
        let Err(e) = result else { return };
        if was_up && started.elapsed() >= HEALTHY_SESSION {
            backoff = backoff::reconnect(max_delay);
        }
        let wait = backoff.next_delay();
        status.report(Problem::Unreachable, format!("{e}; reconnecting"));
        warn!(subscription, transport, error = %e, retry_in = ?wait, "consumer down; reconnecting");
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
