//! The configuration model, shared by the daemon and the PHP extension (both read the
//! same YAML file). [`load`] turns a file into a validated [`Config`]; every problem is
//! reported as `FILE: key.path: what is wrong`.
//!
//! Field doc comments are the user reference (README "Configuration").

mod load;
mod validate;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::retry::RetryPolicy;

pub use load::{interpolate, load, load_with, parse, parse_with, ConfigError, ConfigIssue};

/// The whole file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// Broker connections by name.
    pub transports: BTreeMap<String, TransportConfig>,
    /// Handlers by name: where messages are delivered.
    pub handlers: BTreeMap<String, HandlerConfig>,
    /// What to consume, by name.
    pub subscriptions: BTreeMap<String, SubscriptionConfig>,
    /// Ordered routing table; the first matching route wins.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve `/healthz`, `/readyz` and `/metrics`.
    pub enabled: bool,
    /// Address to bind; loopback by default so metrics are not exposed by accident.
    pub listen: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { enabled: true, listen: "127.0.0.1:9090".into() }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter (`info`, `message_router=debug,lapin=warn`); `RUST_LOG` wins.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Text, level: "info".into() }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// On SIGTERM/SIGINT, how long in-flight messages may take to finish. What is
    /// still running then is handed back to the broker unacked.
    #[serde(deserialize_with = "crate::config::duration::deserialize")]
    pub grace_period: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { grace_period: Duration::from_secs(30) }
    }
}

#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TransportKind {
    /// RabbitMQ and other AMQP 0-9-1 brokers.
    Amqp,
    /// Redis Streams, read through consumer groups.
    Redis,
    /// Apache Kafka and Kafka-protocol brokers, read through consumer groups.
    Kafka,
    /// In-process queues: tests and demos; nothing survives the process.
    Memory,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportConfig {
    #[serde(rename = "type")]
    pub kind: TransportKind,
    /// `amqp://user:pass@host:port/vhost` (`amqps://` for TLS), or
    /// `redis://[:pass@]host:port[/db]` (`rediss://` for TLS). Use `${VAR}` for secrets.
    pub url: Option<String>,
    /// Kafka: bootstrap brokers, `host:port`.
    #[serde(default)]
    pub brokers: Vec<String>,
    /// Kafka: librdkafka client properties passed through as they are
    /// (`security.protocol`, `sasl.mechanism`, `sasl.username`, `ssl.ca.location`,
    /// `client.id`, `auto.offset.reset` ...). Use `${VAR}` for secrets. Numbers and
    /// booleans may be written bare.
    #[serde(default, deserialize_with = "crate::config::scalars::deserialize")]
    pub properties: BTreeMap<String, String>,
    /// Redis: this router instance's consumer name in every consumer group. Keep it
    /// stable across restarts (a restarted instance first re-reads its own pending
    /// entries) and unique per instance. Default: the host name.
    pub consumer: Option<String>,
    /// Longest wait between reconnect attempts (the wait doubles from 100 ms).
    #[serde(default = "default_reconnect_max", deserialize_with = "crate::config::duration::deserialize")]
    pub reconnect_max_delay: Duration,
    /// AMQP: heartbeat interval asked of the broker. A connection that stays silent for
    /// two intervals (a network partition, a hung broker) is closed and reconnected,
    /// and `/readyz` reports it. A `heartbeat=` in the URL wins. Default: 10s.
    #[serde(default, deserialize_with = "crate::config::duration::deserialize_opt")]
    pub heartbeat: Option<Duration>,
    /// Kafka: how the router creates the retry and dead-letter topics it writes to
    /// (when `declare` is on and they are missing). Unset values take the cluster's
    /// defaults (`num.partitions`, `default.replication.factor`), so a dead letter is
    /// as durable as the cluster makes any topic.
    pub create_topics: Option<CreateTopics>,
    /// Exchanges, queues and bindings to declare at connect (AMQP).
    #[serde(default)]
    pub topology: Topology,
}

fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}

/// AMQP heartbeat when the config names none.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

/// Partitions and replication of the topics the router creates (Kafka).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CreateTopics {
    /// Unset: the cluster's `num.partitions`.
    pub partitions: Option<i32>,
    /// Unset: the cluster's `default.replication.factor`.
    pub replication_factor: Option<i32>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Topology {
    pub exchanges: Vec<ExchangeDecl>,
    pub queues: Vec<QueueDecl>,
    pub bindings: Vec<BindingDecl>,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ExchangeType {
    Direct,
    #[default]
    Topic,
    Fanout,
    Headers,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeDecl {
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: ExchangeType,
    #[serde(default = "yes")]
    pub durable: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueDecl {
    pub name: String,
    #[serde(default = "yes")]
    pub durable: bool,
    /// Queue arguments (`x-queue-type: quorum`, `x-max-length: 10000` ...).
    #[serde(default)]
    pub arguments: BTreeMap<String, ArgValue>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum ArgValue {
    Bool(bool),
    Int(i64),
    Text(String),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingDecl {
    pub queue: String,
    pub exchange: String,
    #[serde(default)]
    pub routing_key: String,
}

fn yes() -> bool {
    true
}

/// `handlers.<name>`: what the engine needs of every handler, whatever reaches it,
/// plus the section of its delivery target (`type`), which the target defines and
/// checks (the daemon's `http`, `fastcgi`, `grpc`; the PHP extension reaches every
/// handler in process and ignores it).
#[derive(Clone, Debug, Deserialize)]
pub struct HandlerConfig {
    /// The delivery target: `http` (the default), or another the front knows.
    #[serde(rename = "type", default = "default_target")]
    pub kind: String,
    /// An attempt that takes longer is a failed attempt (retried per policy).
    #[serde(default = "default_timeout", deserialize_with = "crate::config::duration::deserialize")]
    pub timeout: Duration,
    /// Most deliveries in flight to this handler at once, over all subscriptions.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Stop feeding a handler that fails most of what it gets (its database is down,
    /// every pod crashes): the subscriptions routed to it take nothing new from the
    /// broker while the circuit is open, and failed attempts are not counted against
    /// messages, so an outage does not burn the backlog into the dead-letter queue.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
    /// Every other key: the target's own settings (`endpoints`, `signing` ...), read
    /// with [`HandlerConfig::settings`] by the target of `kind`.
    #[serde(flatten)]
    pub target: serde_yaml_ng::Mapping,
}

fn default_target() -> String {
    "http".into()
}

impl HandlerConfig {
    /// The target's section as its own type `T` (which should deny unknown fields).
    /// A problem names its key path under `handlers.<name>`.
    pub fn settings<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T, ConfigIssue> {
        serde_path_to_error::deserialize(serde_yaml_ng::Value::Mapping(self.target.clone())).map_err(|e| {
            let inner = e.path().to_string();
            let path = if inner == "." { format!("handlers.{name}") } else { format!("handlers.{name}.{inner}") };
            ConfigIssue::new(path, e.inner().to_string())
        })
    }
}

/// When a handler's circuit opens, and how it probes its way back (README
/// "Circuit breaker"). Failures are attempts that end in a retry (5xx, timeouts,
/// refused connections, 429/503, a thrown exception); a rejection (4xx, `Reject`) is
/// an answer, not a failure.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    pub enabled: bool,
    /// Open after this many failed attempts in a row (0: never on this rule).
    pub consecutive_failures: u32,
    /// Open when at least this share (0 to 1) of the attempts of the last `window`
    /// failed, once there were `min_attempts` of them (0: never on this rule).
    pub failure_ratio: f64,
    pub min_attempts: u32,
    #[serde(deserialize_with = "crate::config::duration::deserialize")]
    pub window: Duration,
    /// How long the circuit stays open before probing; doubles after each failed
    /// probe, up to `max_open_for`.
    #[serde(deserialize_with = "crate::config::duration::deserialize")]
    pub open_for: Duration,
    #[serde(deserialize_with = "crate::config::duration::deserialize")]
    pub max_open_for: Duration,
    /// Attempts let through while half-open; all must succeed to close the circuit.
    pub probes: u32,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            enabled: true,
            consecutive_failures: 10,
            failure_ratio: 0.5,
            min_attempts: 10,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(30),
            probes: 1,
        }
    }
}

fn default_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_max_in_flight() -> usize {
    64
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    /// Name of an entry under `transports`.
    pub transport: String,
    /// AMQP: the queue to consume.
    #[serde(default)]
    pub queue: String,
    /// Redis: the streams to read, all through the consumer group `group`.
    #[serde(default)]
    pub streams: Vec<String>,
    /// Redis, Kafka: the consumer group (instances sharing a group split the work).
    pub group: Option<String>,
    /// Kafka: the topics to consume.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Kafka: consume every topic whose name matches this regular expression
    /// (instead of `topics`).
    pub topic_pattern: Option<String>,
    /// Kafka: what may run in parallel. `partition`: one message at a time per
    /// partition; `key`: one at a time per record key, keys of a partition in
    /// parallel; `unordered`: up to `prefetch` at once. In every mode offsets are
    /// committed only up to the first message not yet settled.
    #[serde(default)]
    pub ordering: KafkaOrdering,
    /// Kafka: a retry due within this is waited for in place (holding its partition or
    /// key); a longer one goes through the retry topic. `0s`: always the retry topic.
    #[serde(default = "default_in_place_retry_max", deserialize_with = "crate::config::duration::deserialize")]
    pub in_place_retry_max: Duration,
    /// Kafka: the topic durable retries wait in, consumed by the same group.
    /// Default: `<group>.retry`.
    pub retry_topic: Option<String>,
    /// Redis: create the consumer group (and the stream, MKSTREAM) when missing,
    /// reading from the stream's first entry. Kafka: create the retry and dead-letter
    /// topics when missing.
    #[serde(default = "yes")]
    pub declare: bool,
    /// Redis: pending entries idle this long (their consumer died or stalled) are
    /// claimed (XAUTOCLAIM) and delivered again. Must exceed every handler timeout.
    #[serde(default = "default_claim_idle", deserialize_with = "crate::config::duration::deserialize")]
    pub claim_idle: Duration,
    /// Redis: the entry field that holds the message body; every other field is a header.
    #[serde(default = "default_body_field")]
    pub body_field: String,
    /// Skip messages already handled successfully (by message id) within a window.
    pub dedup: Option<DedupConfig>,
    /// Most unacked messages the broker hands this subscription at once: the bound on
    /// in-flight work and on memory.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Handle one message at a time, in the broker's order.
    #[serde(default)]
    pub ordered: bool,
    /// Retry policy for failed attempts (a route may override it).
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Where messages go that leave the normal path. Default: the queue `<queue>.dlq`
    /// through the default exchange, declared by the router (AMQP); the stream
    /// `<stream>.dlq` next to each source stream (Redis).
    pub dead_letter: Option<DeadLetterConfig>,
    /// Handler for messages no route matches; without one they are dead-lettered
    /// with reason "no route".
    pub default_handler: Option<String>,
    /// Larger messages are dead-lettered unread.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Stall watchdog: when the broker reports messages waiting for this subscription
    /// and none arrived for this long while the in-flight window had room (and no
    /// circuit was open), the consumer is reported as stalled and reconnected. `0s`
    /// turns the watchdog off.
    #[serde(default = "default_stall_timeout", deserialize_with = "crate::config::duration::deserialize")]
    pub stall_timeout: Duration,
}

/// How a Kafka subscription orders its work (see `SubscriptionConfig::ordering`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KafkaOrdering {
    #[default]
    Partition,
    Key,
    Unordered,
}

fn default_in_place_retry_max() -> Duration {
    Duration::from_secs(10)
}

fn default_claim_idle() -> Duration {
    Duration::from_secs(60)
}

fn default_body_field() -> String {
    "body".into()
}

fn default_prefetch() -> u16 {
    64
}

fn default_max_body() -> usize {
    16 * 1024 * 1024
}

fn default_stall_timeout() -> Duration {
    Duration::from_secs(60)
}

impl SubscriptionConfig {
    /// The dead-letter destination, defaults applied.
    pub fn dead_letter(&self) -> DeadLetterConfig {
        self.dead_letter.clone().unwrap_or_else(|| DeadLetterConfig {
            routing_key: (!self.queue.is_empty()).then(|| format!("{}.dlq", self.queue)),
            ..DeadLetterConfig::default()
        })
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// AMQP: exchange to publish dead letters to; "" is the default exchange.
    #[serde(default)]
    pub exchange: String,
    /// AMQP: routing key; with the default exchange this is the dead-letter queue's
    /// name, which the router declares. Default: `<queue>.dlq`.
    pub routing_key: Option<String>,
    /// Redis: the dead-letter stream. Default: `<stream>.dlq` for each source stream.
    pub stream: Option<String>,
    /// Kafka: the dead-letter topic. Default: `<topic>.dlq` for each source topic.
    pub topic: Option<String>,
    /// Redis: trim the dead-letter stream to about this many entries (oldest first).
    /// Unset: never trimmed.
    pub maxlen: Option<u64>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// Redis holding the ids of handled messages: `redis://host:port[/db]`.
    pub redis: String,
    /// How long a handled message id is remembered.
    #[serde(deserialize_with = "crate::config::duration::deserialize")]
    pub ttl: Duration,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(rename = "match", default)]
    pub matcher: MatchConfig,
    /// Name of an entry under `handlers`.
    pub handler: String,
    /// Overrides the subscription's retry policy for this route.
    pub retry: Option<RetryPolicy>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MatchConfig {
    /// Only messages from this subscription.
    pub subscription: Option<String>,
    /// AMQP-style glob over the routing key: `*` one word, `#` zero or more words.
    pub routing_key: Option<String>,
    /// Every listed header must be present with exactly this value.
    pub headers: BTreeMap<String, String>,
}

/// Durations in the config: `250ms`, `5s`, `2m`, `1h 30m` (humantime syntax). The
/// error keeps humantime's explanation and shows valid examples.
pub(crate) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    pub fn deserialize_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(text) => parse(&text).map(Some).map_err(serde::de::Error::custom),
            None => Ok(None),
        }
    }

    fn parse(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text.trim())
            .map_err(|e| format!("invalid duration {text:?}: {e} (write it like 250ms, 5s, 2m or 1h 30m)"))
    }
}

/// A map whose values are written as any YAML scalar (`6000`, `true`, `SASL_SSL`) and
/// kept as text, as client libraries take them.
pub(crate) mod scalars {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Bool(bool),
        Int(i64),
        Float(f64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
        let raw = BTreeMap::<String, Scalar>::deserialize(d)?;
        Ok(raw
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    Scalar::Bool(b) => b.to_string(),
                    Scalar::Int(i) => i.to_string(),
                    Scalar::Float(f) => f.to_string(),
                    Scalar::Text(t) => t,
                };
                (k, v)
            })
            .collect())
    }
}
