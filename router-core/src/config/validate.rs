//! Semantic checks that serde cannot express: references between sections, numeric
//! ranges. Every problem is collected, not just the first. What only concerns one
//! broker is checked in its folder (`crate::transport::<kind>::config`), reached
//! through [`crate::transport::config`].

use std::collections::BTreeSet;
use std::net::SocketAddr;

use super::section::Issues;
use super::{CircuitBreakerConfig, Config, ConfigIssue, HandlerConfig, SourceConfig};
use crate::retry::RetryPolicy;

impl Config {
    /// Every problem found, each with its key path. Empty means valid.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut issues = Issues::default();

        if self.admin.enabled && self.admin.listen.parse::<SocketAddr>().is_err() {
            issues.add("admin.listen", format!("{:?} is not an address like 127.0.0.1:9090", self.admin.listen));
        }
        if self.shutdown.grace_period.is_zero() {
            issues.add("shutdown.grace_period", "must be greater than 0");
        }

        for (name, t) in &self.transports {
            t.broker.check(&format!("transports.{name}"), &mut issues);
        }

        for (name, h) in &self.handlers {
            let p = format!("handlers.{name}");
            if h.max_in_flight == 0 {
                issues.add(format!("{p}.max_in_flight"), "must be at least 1");
            }
            if h.timeout.is_zero() {
                issues.add(format!("{p}.timeout"), "must be greater than 0");
            }
            check_breaker(&h.circuit_breaker, &format!("{p}.circuit_breaker"), &mut issues);
        }

        let handler_names = || self.handlers.keys().cloned().collect::<Vec<_>>().join(", ");
        for (name, s) in &self.subscriptions {
            let p = format!("subscriptions.{name}");
            s.source.check(name, &p, self, &mut issues);
            if s.prefetch == 0 {
                issues.add(format!("{p}.prefetch"), "must be at least 1");
            }
            if s.max_body_bytes == 0 {
                issues.add(format!("{p}.max_body_bytes"), "must be at least 1");
            }
            check_retry(&s.retry, &format!("{p}.retry"), &mut issues);
            if let Some(h) = &s.default_handler {
                if !self.handlers.contains_key(h) {
                    issues.add(
                        format!("{p}.default_handler"),
                        format!("unknown handler {h:?} (defined: {})", handler_names()),
                    );
                }
            }
            if let Some(d) = &s.dedup {
                super::section::check_url(&d.redis, &["redis", "rediss"], &format!("{p}.dedup.redis"), &mut issues);
                if d.ttl.is_zero() {
                    issues.add(format!("{p}.dedup.ttl"), "must be greater than 0");
                }
            }
            let routed = s.default_handler.is_some()
                || self.routes.iter().any(|r| r.matcher.subscription.as_deref().is_none_or(|sub| sub == name));
            if !routed {
                issues.add(p.clone(), "no route matches this subscription and it has no default_handler: every message would be dead-lettered");
            }
        }
        SourceConfig::check_all(self, &mut issues);

        let mut seen = BTreeSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let p = format!("routes[{i}]");
            if r.name.is_empty() {
                issues.add(format!("{p}.name"), "must not be empty");
            } else if !seen.insert(r.name.as_str()) {
                issues.add(format!("{p}.name"), format!("duplicate route name {:?}", r.name));
            }
            if !self.handlers.contains_key(&r.handler) {
                issues.add(
                    format!("{p}.handler"),
                    format!("unknown handler {:?} (defined: {})", r.handler, handler_names()),
                );
            }
            if let Some(sub) = &r.matcher.subscription {
                if !self.subscriptions.contains_key(sub) {
                    issues.add(format!("{p}.match.subscription"), format!("unknown subscription {sub:?}"));
                }
            }
            if let Some(glob) = &r.matcher.routing_key {
                if glob.is_empty() {
                    issues.add(format!("{p}.match.routing_key"), "must not be empty (omit it to match any key)");
                }
            }
            if let Some(retry) = &r.retry {
                check_retry(retry, &format!("{p}.retry"), &mut issues);
            }
        }
        issues.into_vec()
    }

    /// Handlers that messages of `subscription` can reach, with their config.
    pub fn reachable_handlers<'a>(
        &'a self,
        subscription: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a HandlerConfig)> {
        let s = self.subscriptions.get(subscription);
        self.handlers.iter().filter(move |(h, _)| {
            s.and_then(|s| s.default_handler.as_ref()) == Some(*h)
                || self.routes.iter().any(|r| {
                    &r.handler == *h && r.matcher.subscription.as_deref().is_none_or(|sub| sub == subscription)
                })
        })
    }
}

fn check_breaker(b: &CircuitBreakerConfig, p: &str, issues: &mut Issues) {
    if !b.enabled {
        return;
    }
    if !(0.0..=1.0).contains(&b.failure_ratio) {
        issues.add(
            format!("{p}.failure_ratio"),
            format!("must be between 0 and 1 (0: not used), got {}", b.failure_ratio),
        );
    }
    if b.consecutive_failures == 0 && b.failure_ratio == 0.0 {
        issues.add(p.to_string(), "set consecutive_failures or failure_ratio (or enabled: false)");
    }
    if b.failure_ratio > 0.0 && b.min_attempts == 0 {
        issues.add(format!("{p}.min_attempts"), "must be at least 1 when failure_ratio is used");
    }
    if b.failure_ratio > 0.0 && b.window.is_zero() {
        issues.add(format!("{p}.window"), "must be greater than 0 when failure_ratio is used");
    }
    if b.open_for.is_zero() {
        issues.add(format!("{p}.open_for"), "must be greater than 0");
    }
    if b.max_open_for < b.open_for {
        issues.add(format!("{p}.max_open_for"), "must not be shorter than open_for");
    }
    if b.probes == 0 {
        issues.add(format!("{p}.probes"), "must be at least 1");
    }
}

fn check_retry(r: &RetryPolicy, p: &str, issues: &mut Issues) {
    if r.max_attempts == 0 {
        issues.add(format!("{p}.max_attempts"), "must be at least 1 (1 = no retries)");
    }
    if !(r.multiplier.is_finite() && r.multiplier >= 1.0) {
        issues.add(format!("{p}.multiplier"), format!("must be a number >= 1, got {}", r.multiplier));
    }
    if !(0.0..=1.0).contains(&r.jitter) {
        issues.add(format!("{p}.jitter"), format!("must be between 0 and 1, got {}", r.jitter));
    }
    if r.initial_delay > r.max_delay {
        issues.add(format!("{p}.initial_delay"), "must not be greater than max_delay");
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, BrokerConfig, ConfigError};

    const GOOD: &str = r#"
transports:
  rabbit: { type: amqp, url: "amqp://guest:${PASS}@127.0.0.1:5672/%2f" }
handlers:
  orders: { endpoints: ["http://127.0.0.1:8080/"] }
subscriptions:
  orders: { transport: rabbit, queue: orders }
routes:
  - { name: all, handler: orders }
"#;

    fn env(name: &str) -> Option<String> {
        (name == "PASS").then(|| "s3cret".to_string())
    }

    fn errors(text: &str) -> String {
        match parse(text, "router.yaml", &env) {
            Ok(_) => panic!("config should be rejected:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn accepts_good_config_and_interpolates_env() {
        let c = parse(GOOD, "router.yaml", &env).expect("valid");
        let BrokerConfig::Amqp(rabbit) = &c.transports["rabbit"].broker else { panic!("an amqp transport") };
        assert_eq!(rabbit.url, "amqp://guest:s3cret@127.0.0.1:5672/%2f");
        let source = c.subscriptions["orders"].source.amqp().expect("an amqp subscription");
        assert_eq!(source.dead_letter().routing_key, "orders.dlq");
    }

    #[test]
    fn names_file_path_and_problem() {
        let cases = [
            (
                GOOD.replace("queue: orders", "queue: orders, prefetc: 5"),
                "router.yaml: subscriptions.orders.prefetc: unknown key `prefetc`: an amqp subscription takes `queue`, `ordered`, `dead_letter` and, like every subscription, `transport`, `dedup`, `prefetch`,",
            ),
            (
                GOOD.replace("type: amqp", "type: kafkaa"),
                "router.yaml: transports.rabbit.type: unknown variant `kafkaa`",
            ),
            (
                GOOD.replace("transport: rabbit", "transport: rabit"),
                "router.yaml: subscriptions.orders.transport: unknown transport \"rabit\"",
            ),
            (
                GOOD.replace("handler: orders", "handler: order"),
                "router.yaml: routes[0].handler: unknown handler \"order\"",
            ),
            (
                GOOD.replace("queue: orders", "queue: orders, retry: { initial_delay: 5 parsecs }"),
                "router.yaml: subscriptions.orders.retry.initial_delay: ",
            ),
            (
                GOOD.replace("${PASS}", "${MISSING}"),
                "router.yaml: transports.rabbit.url: environment variable MISSING is not set",
            ),
        ];
        for (text, want) in cases {
            let got = errors(&text);
            assert!(got.contains(want), "want {want:?} in:\n{got}");
        }
    }

    #[test]
    fn reports_every_problem_at_once() {
        let text = GOOD.replace("queue: orders", "queue: orders, prefetch: 0, retry: { jitter: 2 }");
        let got = errors(&text);
        assert!(got.contains("subscriptions.orders.prefetch: must be at least 1"), "{got}");
        assert!(got.contains("subscriptions.orders.retry.jitter: must be between 0 and 1"), "{got}");
    }

    #[test]
    fn a_handler_keeps_its_target_section_for_the_target() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        struct Http {
            #[allow(dead_code)]
            endpoints: Vec<String>,
        }
        let c = parse(GOOD, "router.yaml", &env).expect("valid");
        let h = &c.handlers["orders"];
        assert_eq!(h.kind, "http", "http is the default target");
        assert!(h.settings::<Http>("orders").is_ok());
        let c =
            parse(&GOOD.replace("8080/\"] }", "8080/\"], balanse: x }"), "router.yaml", &env).expect("core accepts");
        let issue = c.handlers["orders"].settings::<Http>("orders").expect_err("the target refuses");
        assert_eq!(issue.path, "handlers.orders.balanse", "{issue:?}");
        assert!(issue.message.contains("unknown field `balanse`"), "{issue:?}");
    }

    #[test]
    fn rejects_unroutable_subscription_and_bad_yaml() {
        let got = errors(&GOOD.replace("  - { name: all, handler: orders }", ""));
        assert!(got.contains("no route matches this subscription"), "{got}");
        assert!(matches!(parse("a: [", "f.yaml", &env), Err(ConfigError::Syntax { .. })));
    }

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

    #[test]
    fn one_subscription_per_stream_and_group() {
        let text = REDIS.replace(
            "routes:",
            "  again: { transport: redis, streams: [refunds], group: billing, claim_idle: 30s }\nroutes:",
        );
        let got = errors(&text);
        assert!(got.contains("another subscription already reads stream \"refunds\" with group \"billing\""), "{got}");
    }

    #[test]
    fn interpolation_rules() {
        use crate::config::interpolate;
        assert_eq!(interpolate("a$$b", &env).as_deref(), Ok("a$b"));
        assert_eq!(interpolate("${NOPE:-x}", &env).as_deref(), Ok("x"));
        assert_eq!(interpolate("${PASS}-$HOME", &env).as_deref(), Ok("s3cret-$HOME"));
        assert!(interpolate("${PASS", &env).is_err());
    }
}
