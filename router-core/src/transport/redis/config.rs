//! The config sections of a Redis Streams transport (`transports.<name>` with
//! `type: redis`) and of the subscriptions that read from one. Field doc comments are
//! the user reference (README "Configuration").

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Deserialize;

use crate::config::section::Issues;
use crate::config::Config;
use crate::transport::SourceConfig;

/// `transports.<name>` of `type: redis`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:pass@]host:port[/db]` (`rediss://` for TLS). Use `${VAR}` for secrets.
    #[serde(default)]
    pub url: String,
    /// This router instance's consumer name in every consumer group. Keep it stable
    /// across restarts (a restarted instance first re-reads its own pending entries)
    /// and unique per instance. Default: the host name.
    pub consumer: Option<String>,
}

impl RedisConfig {
    pub(crate) fn check(&self, p: &str, issues: &mut Issues) {
        crate::config::section::check_url(&self.url, &["redis", "rediss"], &format!("{p}.url"), issues);
        if self.consumer.as_deref().is_some_and(|c| c.trim().is_empty()) {
            issues.add(format!("{p}.consumer"), "must not be empty (omit it to use the host name)");
        }
    }
}

/// What a subscription to a Redis transport reads.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedisSource {
    /// The streams to read, all through the consumer group `group`.
    #[serde(default)]
    pub streams: Vec<String>,
    /// The consumer group (instances sharing a group split the work).
    #[serde(default)]
    pub group: String,
    /// Create the consumer group (and the stream, MKSTREAM) when missing, reading from
    /// the stream's first entry.
    #[serde(default = "yes")]
    pub declare: bool,
    /// Pending entries idle this long (their consumer died or stalled) are claimed
    /// (XAUTOCLAIM) and delivered again. Must exceed every handler timeout.
    #[serde(default = "default_claim_idle", deserialize_with = "crate::config::duration::deserialize")]
    pub claim_idle: Duration,
    /// The entry field that holds the message body; every other field is a header.
    #[serde(default = "default_body_field")]
    pub body_field: String,
    /// Handle one message at a time, in the stream's order.
    #[serde(default)]
    pub ordered: bool,
    /// Where messages go that leave the normal path. Default: the stream
    /// `<stream>.dlq` next to each source stream.
    #[serde(default)]
    pub dead_letter: DeadLetter,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DeadLetter {
    /// The dead-letter stream. Default: `<stream>.dlq` for each source stream.
    pub stream: Option<String>,
    /// Trim the dead-letter stream to about this many entries (oldest first). Unset:
    /// never trimmed.
    pub maxlen: Option<u64>,
}

fn yes() -> bool {
    true
}

fn default_claim_idle() -> Duration {
    Duration::from_secs(60)
}

/// The field Symfony Messenger's Redis transport writes its envelope into: the default
/// `body_field` of a subscription with `envelope: messenger`.
pub const MESSENGER_BODY_FIELD: &str = "message";

fn default_body_field() -> String {
    "body".into()
}

impl RedisSource {
    pub(crate) fn check(&self, name: &str, p: &str, config: &Config, issues: &mut Issues) {
        if self.streams.is_empty() {
            issues.add(format!("{p}.streams"), "list at least one stream to read");
        }
        issues.check_names(&self.streams, &format!("{p}.streams"), "stream");
        if self.group.is_empty() {
            issues.add(format!("{p}.group"), "a redis subscription needs a consumer group name");
        }
        if self.claim_idle.is_zero() {
            issues.add(format!("{p}.claim_idle"), "must be greater than 0");
        }
        // A claim before the handler could have answered delivers the message twice.
        for (handler, h) in config.reachable_handlers(name) {
            if self.claim_idle <= h.timeout {
                issues.add(
                    format!("{p}.claim_idle"),
                    format!(
                        "{:?} must be longer than the timeout of handler {handler:?} ({:?}), or entries still being handled are claimed and delivered twice",
                        self.claim_idle, h.timeout
                    ),
                );
            }
        }
        if self.body_field.is_empty() {
            issues.add(format!("{p}.body_field"), "must not be empty");
        }
        let dl = &self.dead_letter;
        if dl.stream.as_deref() == Some("") {
            issues.add(format!("{p}.dead_letter.stream"), "must not be empty (omit it for <stream>.dlq)");
        }
        if let Some(stream) = dl.stream.as_deref().filter(|d| self.streams.iter().any(|x| x == d)) {
            issues.add(
                format!("{p}.dead_letter.stream"),
                format!("{stream:?} is a source stream (dead letters would loop)"),
            );
        }
        if dl.maxlen == Some(0) {
            issues.add(format!("{p}.dead_letter.maxlen"), "must be at least 1 (omit it to never trim)");
        }
    }
}

/// One subscription per stream and group on a transport: two would split one group's
/// entries between two pipelines with different settings.
pub(crate) fn check_all(config: &Config, issues: &mut Issues) {
    let mut groups = BTreeSet::new();
    for (name, s) in &config.subscriptions {
        let SourceConfig::Redis(source) = &s.source else { continue };
        for stream in &source.streams {
            if !groups.insert((s.transport.as_str(), stream.as_str(), source.group.as_str())) {
                issues.add(
                    format!("subscriptions.{name}.streams"),
                    format!(
                        "another subscription already reads stream {stream:?} with group {:?}; one subscription per stream and group (add prefetch instead)",
                        source.group
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::{env, errors, GOOD};
    use crate::config::{parse, BrokerConfig};

    const REDIS: &str = r#"
transports:
  redis: { type: redis, url: "redis://127.0.0.1:6379/0", consumer: "${PASS}" }
handlers:
  orders: { endpoints: ["http://127.0.0.1:8080/"], timeout: 5s }
subscriptions:
  orders: { transport: redis, streams: [orders, refunds], group: billing, claim_idle: 30s }
routes:
  - { name: all, handler: orders }
"#;

    #[test]
    fn accepts_redis_subscription() {
        let c = parse(REDIS, "router.yaml", &env).expect("valid");
        let s = c.subscriptions["orders"].source.redis().expect("a redis subscription");
        assert_eq!(s.streams, ["orders", "refunds"]);
        assert_eq!(s.group, "billing");
        assert!(s.declare, "groups are created unless the config says not to");
        assert_eq!(s.body_field, "body");
        let BrokerConfig::Redis(redis) = &c.transports["redis"].broker else { panic!("a redis transport") };
        assert_eq!(redis.consumer.as_deref(), Some("s3cret"));
    }

    #[test]
    fn a_messenger_envelope_reads_messengers_field_unless_told_otherwise() {
        let messenger = REDIS.replace("claim_idle: 30s", "claim_idle: 30s, envelope: messenger");
        let c = parse(&messenger, "router.yaml", &env).expect("valid");
        assert_eq!(c.subscriptions["orders"].envelope, Some(crate::config::Envelope::Messenger));
        assert_eq!(c.subscriptions["orders"].source.redis().expect("redis").body_field, "message");
        let own = messenger.replace("envelope: messenger", "envelope: messenger, body_field: payload");
        let c = parse(&own, "router.yaml", &env).expect("valid");
        assert_eq!(c.subscriptions["orders"].source.redis().expect("redis").body_field, "payload");
        let bad = REDIS.replace("claim_idle: 30s", "claim_idle: 30s, envelope: symfony");
        let got = errors(&bad);
        assert!(
            got.contains("subscriptions.orders.envelope: unknown variant `symfony`, expected `messenger`"),
            "{got}"
        );
    }

    #[test]
    fn redis_mistakes_name_their_key() {
        let cases = [
            (REDIS.replace("streams: [orders, refunds], ", "queue: orders, "), &[
                "subscriptions.orders.queue: `queue` is a setting of amqp, memory subscriptions; this one is redis",
            ][..]),
            (REDIS.replace("streams: [orders, refunds], ", ""), &["subscriptions.orders.streams: list at least one stream to read"]),
            (REDIS.replace("group: billing, ", ""), &["subscriptions.orders.group: a redis subscription needs a consumer group name"]),
            (REDIS.replace("[orders, refunds]", "[orders, orders]"), &["subscriptions.orders.streams[1]: stream \"orders\" is listed twice"]),
            (REDIS.replace("claim_idle: 30s", "claim_idle: 5s"), &[
                "subscriptions.orders.claim_idle: 5s must be longer than the timeout of handler \"orders\" (5s)",
            ]),
            (REDIS.replace("redis://", "amqp://"), &["transports.redis.url: scheme must be redis or rediss, not \"amqp\""]),
            (REDIS.replace("claim_idle: 30s", "claim_idle: 30s, dead_letter: { routing_key: dlq }"), &[
                "subscriptions.orders.dead_letter.routing_key: unknown field `routing_key`, expected `stream` or `maxlen`",
            ]),
            (REDIS.replace("claim_idle: 30s", "claim_idle: 30s, dead_letter: { stream: refunds }"), &[
                "subscriptions.orders.dead_letter.stream: \"refunds\" is a source stream",
            ]),
            (REDIS.replace("claim_idle: 30s", "claim_idle: 30s, dedup: { redis: \"http://x\", ttl: 0s }"), &[
                "subscriptions.orders.dedup.redis: scheme must be redis or rediss, not \"http\"",
                "subscriptions.orders.dedup.ttl: must be greater than 0",
            ]),
            (GOOD.replace("queue: orders", "queue: orders, streams: [x]"), &[
                "subscriptions.orders.streams: `streams` is a setting of redis subscriptions; this one is amqp",
            ]),
            (GOOD.replace("url: \"amqp", "consumer: me, url: \"amqp"), &["transports.rabbit.consumer: `consumer` is a setting of redis transports; this one is amqp"]),
        ];
        for (text, wants) in cases {
            let got = errors(&text);
            for want in wants {
                assert!(got.contains(want), "want {want:?} in:\n{got}");
            }
        }
    }

    #[test]
    fn one_subscription_per_stream_and_group() {
        let text = REDIS.replace(
            "routes:",
            "  again: { transport: redis, streams: [refunds], group: billing, claim_idle: 30s }\nroutes:",
        );
        let got = errors(&text);
        assert!(got.contains("another subscription already reads stream \"refunds\" with group \"billing\""), "{got}");
    }
}
