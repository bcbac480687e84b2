//! The one list of brokers the config knows: each kind's transport section
//! ([`BrokerConfig`]) and subscription section ([`SourceConfig`]), defined and checked
//! in the broker's own folder. The loader reads the keys every transport and every
//! subscription take (`type`, `reconnect_max_delay`; `transport`, `prefetch`, `retry`
//! ...) and hands the rest here, parsed by the kind of the transport.

use serde::Deserialize;
use serde_yaml_ng::Mapping;

use super::amqp::config::{AmqpConfig, AmqpSource};
use super::kafka::config::{KafkaConfig, KafkaSource};
use super::memory::MemoryConfig;
use super::redis::config::{RedisConfig, RedisSource};
use crate::config::section::{self, field_names, quoted, Issues};
use crate::config::{Config, ConfigIssue, SubscriptionConfig, TransportConfig};

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

/// What a transport of each kind is configured with, beyond what every transport takes.
#[derive(Clone, Debug, PartialEq)]
pub enum BrokerConfig {
    Amqp(AmqpConfig),
    Redis(RedisConfig),
    Kafka(KafkaConfig),
    Memory(MemoryConfig),
}

/// What a subscription reads and how, by the kind of its transport.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceConfig {
    Amqp(AmqpSource),
    Redis(RedisSource),
    Kafka(KafkaSource),
    /// In-process queues take the keys of an AMQP subscription.
    Memory(AmqpSource),
}

impl TransportKind {
    const ALL: [TransportKind; 4] =
        [TransportKind::Amqp, TransportKind::Redis, TransportKind::Kafka, TransportKind::Memory];

    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Amqp => "amqp",
            TransportKind::Redis => "redis",
            TransportKind::Kafka => "kafka",
            TransportKind::Memory => "memory",
        }
    }

    /// `an amqp`, `a redis` ...
    fn article(self) -> String {
        let name = self.name();
        if name.starts_with(['a', 'e', 'i', 'o', 'u']) {
            format!("an {name}")
        } else {
            format!("a {name}")
        }
    }

    /// The transport section's own keys (`map`: all but the common ones), at `path`.
    /// A key it does not take is reported to `unknown` and left out, so the checks of
    /// the rest still run.
    pub(crate) fn parse_broker(
        self,
        map: Mapping,
        path: &str,
        unknown: &mut Issues,
    ) -> Result<BrokerConfig, ConfigIssue> {
        let what = ("transport", field_names::<TransportConfig<()>>());
        Ok(match self {
            TransportKind::Amqp => BrokerConfig::Amqp(self.explain(map, path, what, Self::broker_fields, unknown)?),
            TransportKind::Redis => BrokerConfig::Redis(self.explain(map, path, what, Self::broker_fields, unknown)?),
            TransportKind::Kafka => BrokerConfig::Kafka(self.explain(map, path, what, Self::broker_fields, unknown)?),
            TransportKind::Memory => {
                BrokerConfig::Memory(self.explain(map, path, what, Self::broker_fields, unknown)?)
            }
        })
    }

    /// A subscription's keys beyond the common ones, read as this kind defines them
    /// (unknown keys as for [`TransportKind::parse_broker`]).
    pub(crate) fn parse_source(
        self,
        map: Mapping,
        path: &str,
        unknown: &mut Issues,
    ) -> Result<SourceConfig, ConfigIssue> {
        let what = ("subscription", field_names::<SubscriptionConfig<()>>());
        Ok(match self {
            TransportKind::Amqp => SourceConfig::Amqp(self.explain(map, path, what, Self::source_fields, unknown)?),
            TransportKind::Redis => SourceConfig::Redis(self.explain(map, path, what, Self::source_fields, unknown)?),
            TransportKind::Kafka => SourceConfig::Kafka(self.explain(map, path, what, Self::source_fields, unknown)?),
            TransportKind::Memory => {
                SourceConfig::Memory(self.explain(map, path, what, Self::source_fields, unknown)?)
            }
        })
    }

    fn broker_fields(self) -> &'static [&'static str] {
        match self {
            TransportKind::Amqp => field_names::<AmqpConfig>(),
            TransportKind::Redis => field_names::<RedisConfig>(),
            TransportKind::Kafka => field_names::<KafkaConfig>(),
            TransportKind::Memory => field_names::<MemoryConfig>(),
        }
    }

    fn source_fields(self) -> &'static [&'static str] {
        match self {
            TransportKind::Amqp | TransportKind::Memory => field_names::<AmqpSource>(),
            TransportKind::Redis => field_names::<RedisSource>(),
            TransportKind::Kafka => field_names::<KafkaSource>(),
        }
    }

    /// [`section::parse`] of the keys this kind takes; every other string key is
    /// explained in `unknown` (which kinds take it, or which keys this kind and every
    /// `what`, whose keys are `common`, take) and left out.
    fn explain<T: serde::de::DeserializeOwned>(
        self,
        map: Mapping,
        path: &str,
        (what, common): (&str, &[&str]),
        fields: fn(TransportKind) -> &'static [&'static str],
        unknown: &mut Issues,
    ) -> Result<T, ConfigIssue> {
        // Keys that are not strings stay, for serde to name.
        let (known, others) =
            map.into_iter().partition::<Mapping, _>(|(k, _)| k.as_str().is_none_or(|k| fields(self).contains(&k)));
        for key in others.keys().filter_map(|k| k.as_str()) {
            let owners: Vec<&str> = Self::ALL.iter().filter(|k| fields(**k).contains(&key)).map(|k| k.name()).collect();
            let message = if owners.is_empty() {
                let own =
                    if fields(self).is_empty() { String::new() } else { format!("{} and, ", quoted(fields(self))) };
                format!(
                    "unknown key `{key}`: {} {what} takes {own}like every {what}, {}",
                    self.article(),
                    quoted(common)
                )
            } else {
                format!("`{key}` is a setting of {} {what}s; this one is {}", owners.join(", "), self.name())
            };
            unknown.add(format!("{path}.{key}"), message);
        }
        section::parse(known, path)
    }
}

impl BrokerConfig {
    pub fn kind(&self) -> TransportKind {
        match self {
            BrokerConfig::Amqp(_) => TransportKind::Amqp,
            BrokerConfig::Redis(_) => TransportKind::Redis,
            BrokerConfig::Kafka(_) => TransportKind::Kafka,
            BrokerConfig::Memory(_) => TransportKind::Memory,
        }
    }

    pub(crate) fn check(&self, p: &str, issues: &mut Issues) {
        match self {
            BrokerConfig::Amqp(c) => c.check(p, issues),
            BrokerConfig::Redis(c) => c.check(p, issues),
            BrokerConfig::Kafka(c) => c.check(p, issues),
            BrokerConfig::Memory(_) => {}
        }
    }
}

impl SourceConfig {
    /// One message at a time, in the broker's order (Kafka orders by its own
    /// `ordering` instead).
    pub fn ordered(&self) -> bool {
        match self {
            SourceConfig::Amqp(s) | SourceConfig::Memory(s) => s.ordered,
            SourceConfig::Redis(s) => s.ordered,
            SourceConfig::Kafka(_) => false,
        }
    }

    /// An AMQP subscription's source (in-memory queues take the same).
    pub fn amqp(&self) -> Option<&AmqpSource> {
        match self {
            SourceConfig::Amqp(s) | SourceConfig::Memory(s) => Some(s),
            _ => None,
        }
    }

    pub fn redis(&self) -> Option<&RedisSource> {
        match self {
            SourceConfig::Redis(s) => Some(s),
            _ => None,
        }
    }

    pub fn kafka(&self) -> Option<&KafkaSource> {
        match self {
            SourceConfig::Kafka(s) => Some(s),
            _ => None,
        }
    }

    /// The checks of the subscription `name` (at `p`) that its broker owns.
    pub(crate) fn check(&self, name: &str, p: &str, config: &Config, issues: &mut Issues) {
        match self {
            SourceConfig::Amqp(s) | SourceConfig::Memory(s) => s.check(p, issues),
            SourceConfig::Redis(s) => s.check(name, p, config, issues),
            SourceConfig::Kafka(s) => s.check(p, issues),
        }
    }

    /// The checks across subscriptions that a broker owns.
    pub(crate) fn check_all(config: &Config, issues: &mut Issues) {
        super::redis::config::check_all(config, issues);
    }
}
