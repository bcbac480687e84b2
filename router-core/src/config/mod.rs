//! The configuration model, shared by the daemon and the PHP extension (both read the
//! same YAML file). [`load`] turns a file into a validated [`Config`]; every problem is
//! reported as `FILE: key.path: what is wrong`.
//!
//! This module knows the keys every transport, handler and subscription take; the rest
//! of each section belongs to a component: a broker's keys to
//! `crate::transport::<broker>::config` (by the transport's `type`), a handler's to
//! its delivery target in the front (read with [`HandlerConfig::settings`]).
//! [`section`] holds the tools they read and check their keys with.
//!
//! - `load.rs`: file → YAML → `${VAR}` → typed config → checks.
//! - `validate.rs`: what crosses sections (references, routes) and the common keys.
//! - `diff.rs`: what changed between two configs, per component (hot reload).
//! - `section.rs`: parsing a component's section with key paths; [`section::Issues`].
//!
//! Field doc comments are the user reference (README "Configuration").

mod diff;
mod load;
pub mod section;
mod validate;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

pub use crate::concurrency::MaxInFlight;
use crate::retry::RetryPolicy;
pub use crate::transport::config::{BrokerConfig, SourceConfig, TransportKind};

pub use diff::{Changes, ConfigDiff};
pub use load::{interpolate, load, load_with, parse, parse_with, ConfigError, ConfigIssue};
/// The helpers of the config tests, for the brokers' tests of their own sections.
#[cfg(test)]
pub(crate) use validate::tests;

/// The whole file. The loader reads it first with each transport and subscription as
/// a plain mapping (`Config<Mapping, Mapping>`), then each of those by its kind.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config<T = TransportConfig, S = SubscriptionConfig> {
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub shutdown: ShutdownConfig,
    /// OpenTelemetry spans per message, exported with OTLP (README "Tracing").
    #[serde(default)]
    pub tracing: TracingConfig,
    /// Broker connections by name.
    pub transports: BTreeMap<String, T>,
    /// Handlers by name: where messages are delivered.
    pub handlers: BTreeMap<String, HandlerConfig>,
    /// What to consume, by name.
    pub subscriptions: BTreeMap<String, S>,
    /// Ordered routing table; the first matching route wins.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve `/healthz`, `/readyz`, `/metrics`, the admin API and the status page.
    pub enabled: bool,
    /// Address to bind; loopback by default so nothing is exposed by accident. Any
    /// other address needs `token`.
    pub listen: String,
    /// Bearer token every `/api/` call must carry (`Authorization: Bearer ...`),
    /// usually `${ROUTER_ADMIN_TOKEN}`. Without one, the admin listener must be
    /// loopback and answers only loopback peers.
    pub token: Option<String>,
}

/// Smallest admin token accepted: a guessable one protects nothing.
pub const ADMIN_TOKEN_MIN: usize = 16;

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { enabled: true, listen: "127.0.0.1:9090".into(), token: None }
    }
}

// The token never reaches a log line, even through `{:?}` of the whole config.
impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("enabled", &self.enabled)
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
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

/// How spans reach the collector.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    /// OTLP/HTTP with protobuf bodies: `POST <endpoint>/v1/traces` (port 4318).
    #[default]
    Http,
    /// OTLP/gRPC (port 4317).
    Grpc,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// Create spans (consume, each delivery attempt, settle) and export them. Off: no
    /// span is created at all.
    pub enabled: bool,
    /// The OTLP receiver (an OpenTelemetry Collector, Jaeger, Tempo ...): the base URL
    /// for `http` (`/v1/traces` is appended), the gRPC URL for `grpc`.
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    /// Share of new traces recorded, 0.0 to 1.0. A message that arrives with a
    /// `traceparent` follows its producer's sampling decision.
    pub sampling: f64,
    /// `service.name` of the exported spans.
    pub service_name: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            enabled: false,
            endpoint: "http://127.0.0.1:4318".into(),
            protocol: OtlpProtocol::Http,
            sampling: 1.0,
            service_name: "message-router".into(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
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

/// `transports.<name>`: the keys every transport takes; `broker` holds the rest, as
/// the transport's kind defines them (`crate::transport::<kind>::config`). The loader
/// reads the common keys as `TransportConfig<()>` and the rest by `kind`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransportConfig<B = BrokerConfig> {
    #[serde(rename = "type")]
    pub kind: TransportKind,
    /// Longest wait between reconnect attempts (the wait doubles from 100 ms).
    #[serde(default = "default_reconnect_max", deserialize_with = "crate::config::duration::deserialize")]
    pub reconnect_max_delay: Duration,
    #[serde(skip)]
    pub broker: B,
}

impl TransportConfig<()> {
    fn with_broker(self, broker: BrokerConfig) -> TransportConfig {
        TransportConfig { kind: self.kind, reconnect_max_delay: self.reconnect_max_delay, broker }
    }
}

fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}

/// `handlers.<name>`: what the engine needs of every handler, whatever reaches it,
/// plus the section of its delivery target (`type`), which the target defines and
/// checks (the daemon's `http`, `fastcgi`, `grpc`; the PHP extension reaches every
/// handler in process and ignores it).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct HandlerConfig {
    /// The delivery target: `http` (the default), or another the front knows.
    #[serde(rename = "type", default = "default_target")]
    pub kind: String,
    /// An attempt that takes longer is a failed attempt (retried per policy).
    #[serde(default = "default_timeout", deserialize_with = "crate::config::duration::deserialize")]
    pub timeout: Duration,
    /// Most deliveries in flight to this handler at once, over all subscriptions: a
    /// number, or `auto` (`{ auto: { max: N } }`, default max 256): found while
    /// running, as high as the handler takes before its latency climbs
    /// ([`crate::concurrency`]).
    #[serde(default)]
    pub max_in_flight: MaxInFlight,
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
        section::parse(self.target.clone(), &format!("handlers.{name}"))
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

/// `subscriptions.<name>`: the keys every subscription takes; `source` holds what it
/// reads and how, as the kind of its transport defines it
/// (`crate::transport::<kind>::config`). The loader reads the common keys as
/// `SubscriptionConfig<()>` and the rest by the kind of `transport`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig<S = SourceConfig> {
    /// Name of an entry under `transports`.
    pub transport: String,
    /// Skip messages already handled successfully (by message id) within a window.
    pub dedup: Option<DedupConfig>,
    /// Most unacked messages the broker hands this subscription at once: the bound on
    /// in-flight work and on memory.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    /// Retry policy for failed attempts (a route may override it).
    #[serde(default)]
    pub retry: RetryPolicy,
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
    /// What the messages are, when a framework wrote them: `messenger` for Symfony
    /// Messenger's envelopes (README "Migrating from Symfony Messenger").
    pub envelope: Option<Envelope>,
    #[serde(skip)]
    pub source: S,
}

/// `subscriptions.<name>.envelope`: the framework format the messages arrive in.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Envelope {
    /// Symfony Messenger's transports wrote them: AMQP, the body plus `type` and
    /// `X-Message-Stamp-*` headers; Redis, one stream field `message` holding
    /// `{"body", "headers"}` as JSON, and delayed ones (`DelayStamp`) in the sorted set
    /// `<stream>__queue` until due. Handlers decode them (the Symfony bundle does).
    Messenger,
}

impl SubscriptionConfig<()> {
    fn with_source(self, source: SourceConfig) -> SubscriptionConfig {
        SubscriptionConfig {
            transport: self.transport,
            dedup: self.dedup,
            prefetch: self.prefetch,
            retry: self.retry,
            default_handler: self.default_handler,
            max_body_bytes: self.max_body_bytes,
            stall_timeout: self.stall_timeout,
            envelope: self.envelope,
            source,
        }
    }
}

impl Config<serde_yaml_ng::Mapping, serde_yaml_ng::Mapping> {
    /// Each transport and subscription read by its kind: the keys every one takes
    /// here, the rest by its broker ([`TransportKind::parse_broker`],
    /// [`TransportKind::parse_source`]). A section that cannot be read is an `Err`
    /// with every section's problem; keys nobody takes are returned beside the config,
    /// to be reported with what validation finds.
    fn resolve(self) -> Result<(Config, Vec<ConfigIssue>), Vec<ConfigIssue>> {
        let mut issues = section::Issues::default();
        let mut unknown = section::Issues::default();
        let mut kinds = BTreeMap::new();
        let mut transports = BTreeMap::new();
        for (name, map) in self.transports {
            let path = format!("transports.{name}");
            let (common, own) = section::split(map, section::field_names::<TransportConfig<()>>());
            let parsed = section::parse::<TransportConfig<()>>(common, &path).and_then(|head| {
                let kind = head.kind;
                kinds.insert(name.clone(), Some(kind));
                Ok(head.with_broker(kind.parse_broker(own, &path, &mut unknown)?))
            });
            match parsed {
                Ok(t) => drop(transports.insert(name, t)),
                Err(issue) => {
                    kinds.entry(name).or_insert(None);
                    issues.push(issue);
                }
            }
        }
        let mut subscriptions = BTreeMap::new();
        for (name, map) in self.subscriptions {
            let path = format!("subscriptions.{name}");
            let (common, own) = section::split(map, section::field_names::<SubscriptionConfig<()>>());
            let head = match section::parse::<SubscriptionConfig<()>>(common, &path) {
                Ok(head) => head,
                Err(issue) => {
                    issues.push(issue);
                    continue;
                }
            };
            let kind = match kinds.get(&head.transport) {
                Some(Some(kind)) => *kind,
                // Its transport's own problem is reported.
                Some(None) => continue,
                None => {
                    let known = kinds.keys().cloned().collect::<Vec<_>>().join(", ");
                    issues.add(
                        format!("{path}.transport"),
                        format!("unknown transport {:?} (defined: {known})", head.transport),
                    );
                    continue;
                }
            };
            // Messenger's Redis transport writes the envelope into the field `message`.
            let messenger_body = head.envelope == Some(Envelope::Messenger) && !own.contains_key("body_field");
            match kind.parse_source(own, &path, &mut unknown) {
                Ok(mut source) => {
                    if let (true, SourceConfig::Redis(redis)) = (messenger_body, &mut source) {
                        redis.body_field = crate::transport::redis::config::MESSENGER_BODY_FIELD.to_string();
                    }
                    subscriptions.insert(name, head.with_source(source));
                }
                Err(issue) => issues.push(issue),
            }
        }
        if !issues.is_empty() {
            let mut all = unknown.into_vec();
            all.extend(issues.into_vec());
            return Err(all);
        }
        let config = Config {
            admin: self.admin,
            log: self.log,
            shutdown: self.shutdown,
            tracing: self.tracing,
            transports,
            handlers: self.handlers,
            subscriptions,
            routes: self.routes,
        };
        Ok((config, unknown.into_vec()))
    }
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

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DedupConfig {
    /// Redis holding the ids of handled messages: `redis://host:port[/db]`.
    pub redis: String,
    /// How long a handled message id is remembered.
    #[serde(deserialize_with = "crate::config::duration::deserialize")]
    pub ttl: Duration,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
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

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
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
