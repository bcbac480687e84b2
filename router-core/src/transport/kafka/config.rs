//! The config sections of a Kafka transport (`transports.<name>` with `type: kafka`)
//! and of the subscriptions that read from one. Field doc comments are the user
//! reference (README "Configuration").

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::config::section::Issues;

/// `transports.<name>` of `type: kafka`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port`.
    #[serde(default)]
    pub brokers: Vec<String>,
    /// librdkafka client properties passed through as they are (`security.protocol`,
    /// `sasl.mechanism`, `sasl.username`, `ssl.ca.location`, `client.id`,
    /// `auto.offset.reset` ...). Use `${VAR}` for secrets. Numbers and booleans may be
    /// written bare.
    #[serde(default, deserialize_with = "crate::config::scalars::deserialize")]
    pub properties: BTreeMap<String, String>,
    /// How the router creates the retry and dead-letter topics it writes to (when
    /// `declare` is on and they are missing). Unset values take the cluster's defaults
    /// (`num.partitions`, `default.replication.factor`), so a dead letter is as durable
    /// as the cluster makes any topic.
    #[serde(default)]
    pub create_topics: CreateTopics,
}

/// Partitions and replication of the topics the router creates.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CreateTopics {
    /// Unset: the cluster's `num.partitions`.
    pub partitions: Option<i32>,
    /// Unset: the cluster's `default.replication.factor`.
    pub replication_factor: Option<i32>,
}

/// librdkafka properties the router sets itself: offsets are its job.
const ROUTER_OWNED_PROPERTIES: &[&str] =
    &["bootstrap.servers", "group.id", "enable.auto.commit", "enable.auto.offset.store", "enable.partition.eof"];

impl KafkaConfig {
    pub(crate) fn check(&self, p: &str, issues: &mut Issues) {
        if self.brokers.is_empty() {
            issues.add(format!("{p}.brokers"), "list at least one broker as host:port");
        }
        for (i, b) in self.brokers.iter().enumerate() {
            let ok = b.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok {
                issues.add(format!("{p}.brokers[{i}]"), format!("{b:?} is not host:port, like 127.0.0.1:9092"));
            }
        }
        let c = &self.create_topics;
        for (key, value) in [("partitions", c.partitions), ("replication_factor", c.replication_factor)] {
            if value.is_some_and(|v| v < 1) {
                issues
                    .add(format!("{p}.create_topics.{key}"), "must be at least 1 (omit it for the cluster's default)");
            }
        }
        let mut client = rdkafka::ClientConfig::new();
        let mut passed = Vec::new();
        for (key, value) in &self.properties {
            if ROUTER_OWNED_PROPERTIES.contains(&key.as_str()) {
                issues.add(
                    format!("{p}.properties.{key}"),
                    "set by the router (brokers, the subscription's group, offsets committed only once handled)",
                );
            } else {
                client.set(key, value);
                passed.push((key, value));
            }
        }
        // librdkafka checks names and values when a client is made (no connection yet).
        // It stops at the first property it refuses, in the order of rdkafka's hash
        // map, so the report names the first one (by key) refused on its own, the same
        // every time.
        if let Err(e) = client.create::<rdkafka::consumer::BaseConsumer>() {
            let alone = passed.iter().find_map(|(key, value)| {
                rdkafka::ClientConfig::new().set(*key, *value).create::<rdkafka::consumer::BaseConsumer>().err()
            });
            issues.add(format!("{p}.properties"), format!("librdkafka refuses them: {}", alone.unwrap_or(e)));
        }
    }
}

/// What a subscription to a Kafka transport reads.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KafkaSource {
    /// The topics to consume.
    #[serde(default)]
    pub topics: Vec<String>,
    /// Consume every topic whose name matches this regular expression (instead of
    /// `topics`).
    pub topic_pattern: Option<String>,
    /// The consumer group (instances sharing a group split the work).
    #[serde(default)]
    pub group: String,
    /// What may run in parallel. `partition`: one message at a time per partition;
    /// `key`: one at a time per record key, keys of a partition in parallel;
    /// `unordered`: up to `prefetch` at once. In every mode offsets are committed only
    /// up to the first message not yet settled.
    #[serde(default)]
    pub ordering: Ordering,
    /// A retry due within this is waited for in place (holding its partition or key);
    /// a longer one goes through the retry topic. `0s`: always the retry topic.
    #[serde(default = "default_in_place_retry_max", deserialize_with = "crate::config::duration::deserialize")]
    pub in_place_retry_max: Duration,
    /// The topic durable retries wait in, consumed by the same group. Default:
    /// `<group>.retry`.
    pub retry_topic: Option<String>,
    /// Create the retry and dead-letter topics when missing.
    #[serde(default = "yes")]
    pub declare: bool,
    /// Where messages go that leave the normal path. Default: `<topic>.dlq` for each
    /// source topic.
    #[serde(default)]
    pub dead_letter: DeadLetter,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeadLetter {
    /// The dead-letter topic. Default: `<topic>.dlq` for each source topic.
    pub topic: Option<String>,
}

/// How a Kafka subscription orders its work (see [`KafkaSource::ordering`]).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Ordering {
    #[default]
    Partition,
    Key,
    Unordered,
}

fn yes() -> bool {
    true
}

fn default_in_place_retry_max() -> Duration {
    Duration::from_secs(10)
}

impl KafkaSource {
    /// The topic durable retries wait in.
    pub fn retry_topic(&self) -> String {
        self.retry_topic.clone().unwrap_or_else(|| format!("{}.retry", self.group))
    }

    pub(crate) fn check(&self, p: &str, issues: &mut Issues) {
        match (self.topics.is_empty(), &self.topic_pattern) {
            (true, None) => issues.add(format!("{p}.topics"), "list the topics to consume, or set topic_pattern"),
            (false, Some(_)) => {
                issues.add(format!("{p}.topic_pattern"), "set either topics or topic_pattern, not both")
            }
            (true, Some(pattern)) if pattern.trim().is_empty() => {
                issues.add(format!("{p}.topic_pattern"), "must not be empty")
            }
            (true, Some(pattern)) => {
                if let Err(e) = super::check_pattern(pattern) {
                    issues.add(format!("{p}.topic_pattern"), e);
                }
            }
            _ => {}
        }
        issues.check_names(&self.topics, &format!("{p}.topics"), "topic");
        if self.group.is_empty() {
            issues.add(format!("{p}.group"), "a kafka subscription needs a consumer group id");
        }
        for (what, topic) in [("dead_letter.topic", &self.dead_letter.topic), ("retry_topic", &self.retry_topic)] {
            match topic {
                Some(t) if t.is_empty() => {
                    issues.add(format!("{p}.{what}"), "must not be empty (omit it for the default)")
                }
                Some(t) if self.topics.contains(t) => {
                    issues.add(format!("{p}.{what}"), format!("{t:?} is a source topic (messages would loop)"))
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{env, errors, GOOD};
    use crate::config::{parse, BrokerConfig};

    const KAFKA: &str = r#"
transports:
  kafka: { type: kafka, brokers: ["127.0.0.1:9092"], properties: { security.protocol: SASL_SSL, sasl.mechanism: SCRAM-SHA-512, sasl.username: u, sasl.password: "${PASS}", session.timeout.ms: 6000 } }
handlers:
  orders: { endpoints: ["http://127.0.0.1:8080/"] }
subscriptions:
  orders: { transport: kafka, topics: [orders], group: billing, ordering: key }
routes:
  - { name: all, handler: orders }
"#;

    #[test]
    fn accepts_kafka_subscription() {
        let c = parse(KAFKA, "router.yaml", &env).expect("valid");
        let s = c.subscriptions["orders"].source.kafka().expect("a kafka subscription");
        assert_eq!(s.ordering, crate::transport::kafka::config::Ordering::Key);
        assert_eq!(s.in_place_retry_max, std::time::Duration::from_secs(10));
        let BrokerConfig::Kafka(kafka) = &c.transports["kafka"].broker else { panic!("a kafka transport") };
        assert_eq!(kafka.properties["security.protocol"], "SASL_SSL");
        assert_eq!(kafka.properties["session.timeout.ms"], "6000", "bare numbers are fine");
    }

    #[test]
    fn kafka_mistakes_name_their_key() {
        let cases = [
            (KAFKA.replace("topics: [orders], ", ""), "subscriptions.orders.topics: list the topics to consume, or set topic_pattern"),
            (KAFKA.replace("topics: [orders]", "topics: [orders], topic_pattern: \"o.*\""), "subscriptions.orders.topic_pattern: set either topics or topic_pattern, not both"),
            (KAFKA.replace("group: billing, ", ""), "subscriptions.orders.group: a kafka subscription needs a consumer group id"),
            (KAFKA.replace("127.0.0.1:9092", "localhost"), "transports.kafka.brokers[0]: \"localhost\" is not host:port"),
            (KAFKA.replace("security.protocol: SASL_SSL,", "group.id: x,"), "transports.kafka.properties.group.id: set by the router"),
            (KAFKA.replace("session.timeout.ms: 6000", "fetch.wait.maxx.ms: 5"), "transports.kafka.properties: librdkafka refuses them: "),
            (KAFKA.replace("ordering: key", "ordered: true"), "subscriptions.orders.ordered: `ordered` is a setting of amqp, redis, memory subscriptions; this one is kafka"),
            (KAFKA.replace("ordering: key", "retry_topic: orders"), "subscriptions.orders.retry_topic: \"orders\" is a source topic"),
            (KAFKA.replace("brokers: [\"127.0.0.1:9092\"]", "url: \"kafka://x:1\""), "transports.kafka.url: `url` is a setting of amqp, redis transports; this one is kafka"),
            (GOOD.replace("queue: orders", "queue: orders, topics: [x]"), "subscriptions.orders.topics: `topics` is a setting of kafka subscriptions; this one is amqp"),
        ];
        for (text, want) in cases {
            let got = errors(&text);
            assert!(got.contains(want), "want {want:?} in:\n{got}");
        }
    }

    #[test]
    fn refused_kafka_properties_are_reported_the_same_every_time() {
        let text = KAFKA
            .replace("session.timeout.ms: 6000", "fetch.wait.maxx.ms: 5, auto.offset.reset: sideways, zz.bogus: 1");
        let first = errors(&text);
        assert!(first.contains("librdkafka refuses them: ") && first.contains("auto.offset.reset"), "{first}");
        for _ in 0..20 {
            assert_eq!(errors(&text), first);
        }
    }
}
