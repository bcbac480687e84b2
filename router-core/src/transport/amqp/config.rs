//! The config sections of an AMQP transport (`transports.<name>` with `type: amqp`)
//! and of the subscriptions that read from one. Field doc comments are the user
//! reference (README "Configuration").

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::Deserialize;

use crate::config::section::Issues;

/// `transports.<name>` of `type: amqp`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost` (`amqps://` for TLS). Use `${VAR}` for secrets.
    #[serde(default)]
    pub url: String,
    /// Heartbeat interval asked of the broker. A connection that stays silent for two
    /// intervals (a network partition, a hung broker) is closed and reconnected, and
    /// `/readyz` reports it. A `heartbeat=` in the URL wins. Default: 10s.
    #[serde(default, deserialize_with = "crate::config::duration::deserialize_opt")]
    pub heartbeat: Option<Duration>,
    /// Exchanges, queues and bindings to declare at connect.
    #[serde(default)]
    pub topology: Topology,
}

/// Heartbeat when the config names none.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Topology {
    pub exchanges: Vec<ExchangeDecl>,
    pub queues: Vec<QueueDecl>,
    pub bindings: Vec<BindingDecl>,
}

impl Topology {
    pub fn is_empty(&self) -> bool {
        self.exchanges.is_empty() && self.queues.is_empty() && self.bindings.is_empty()
    }
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

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExchangeDecl {
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: ExchangeType,
    #[serde(default = "yes")]
    pub durable: bool,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
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

#[derive(Clone, Debug, Deserialize, PartialEq)]
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

/// What a subscription to an AMQP transport reads (the in-memory transport's
/// subscriptions take the same keys).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AmqpSource {
    /// The queue to consume.
    #[serde(default)]
    pub queue: String,
    /// Handle one message at a time, in the broker's order.
    #[serde(default)]
    pub ordered: bool,
    /// Where messages go that leave the normal path. Default: the queue `<queue>.dlq`
    /// through the default exchange, declared by the router.
    pub dead_letter: Option<DeadLetter>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeadLetter {
    /// Exchange to publish dead letters to; "" is the default exchange.
    #[serde(default)]
    pub exchange: String,
    /// Routing key; with the default exchange this is the dead-letter queue's name,
    /// which the router declares. Default: `<queue>.dlq`.
    pub routing_key: Option<String>,
}

/// Where a subscription's dead letters are published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterTo {
    pub exchange: String,
    pub routing_key: String,
}

impl AmqpSource {
    /// The dead-letter destination, defaults applied.
    pub fn dead_letter(&self) -> DeadLetterTo {
        let dl = self.dead_letter.clone().unwrap_or_default();
        DeadLetterTo {
            routing_key: dl.routing_key.unwrap_or_else(|| format!("{}.dlq", self.queue)),
            exchange: dl.exchange,
        }
    }

    pub(crate) fn check(&self, p: &str, issues: &mut Issues) {
        if self.queue.is_empty() {
            issues.add(format!("{p}.queue"), "name the queue to consume");
        }
        if let Some(dl) = &self.dead_letter {
            let key = dl.routing_key.as_deref().unwrap_or("");
            if dl.exchange.is_empty() && key.is_empty() {
                issues.add(
                    format!("{p}.dead_letter.routing_key"),
                    "with the default exchange, name the dead-letter queue here",
                );
            }
            if dl.exchange.is_empty() && key == self.queue {
                issues.add(
                    format!("{p}.dead_letter.routing_key"),
                    "must not be the subscription's own queue (dead letters would loop)",
                );
            }
        }
    }
}

impl AmqpConfig {
    pub(crate) fn check(&self, p: &str, issues: &mut Issues) {
        crate::config::section::check_url(&self.url, &["amqp", "amqps"], &format!("{p}.url"), issues);
        if let Some(h) = self.heartbeat {
            if h.is_zero() || h.as_secs() > u64::from(u16::MAX) {
                issues.add(format!("{p}.heartbeat"), "must be between 1s and 65535s");
            } else if h.subsec_nanos() != 0 {
                issues.add(format!("{p}.heartbeat"), "AMQP counts heartbeats in whole seconds");
            }
        }
        let t = &self.topology;
        let declared: BTreeSet<&str> = t.exchanges.iter().map(|e| e.name.as_str()).collect();
        for (i, e) in t.exchanges.iter().enumerate() {
            if e.name.is_empty() || e.name.starts_with("amq.") {
                issues
                    .add(format!("{p}.topology.exchanges[{i}].name"), "must be non-empty and not start with \"amq.\"");
            }
        }
        for (i, q) in t.queues.iter().enumerate() {
            if q.name.is_empty() {
                issues.add(format!("{p}.topology.queues[{i}].name"), "must not be empty");
            }
        }
        for (i, b) in t.bindings.iter().enumerate() {
            if !declared.contains(b.exchange.as_str()) && !b.exchange.starts_with("amq.") {
                issues.add(
                    format!("{p}.topology.bindings[{i}].exchange"),
                    format!("exchange {:?} is not declared under topology.exchanges", b.exchange),
                );
            }
        }
    }
}
