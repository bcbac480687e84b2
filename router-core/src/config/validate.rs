//! Semantic checks that serde cannot express: references between sections, URL
//! schemes, numeric ranges. Every problem is collected, not just the first.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use super::{
    CircuitBreakerConfig, Config, ConfigIssue, DeadLetterConfig, HandlerConfig, KafkaOrdering, SubscriptionConfig,
    TransportConfig, TransportKind,
};
use crate::retry::RetryPolicy;

impl Config {
    /// Every problem found, each with its key path. Empty means valid.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        let mut add = |path: String, message: String| issues.push(ConfigIssue::new(path, message));

        if self.admin.enabled && self.admin.listen.parse::<SocketAddr>().is_err() {
            add("admin.listen".into(), format!("{:?} is not an address like 127.0.0.1:9090", self.admin.listen));
        }
        if self.shutdown.grace_period.is_zero() {
            add("shutdown.grace_period".into(), "must be greater than 0".into());
        }

        for (name, t) in &self.transports {
            let p = format!("transports.{name}");
            let schemes: &[&str] = match t.kind {
                TransportKind::Amqp => &["amqp", "amqps"],
                TransportKind::Redis => &["redis", "rediss"],
                TransportKind::Kafka | TransportKind::Memory => &[],
            };
            match (&t.url, schemes.is_empty()) {
                (None, false) => add(format!("{p}.url"), format!("a {} transport needs a url", kind_name(t.kind))),
                (Some(_), true) if t.kind == TransportKind::Kafka => {
                    add(format!("{p}.url"), "a kafka transport lists `brokers` (host:port), not a url".into())
                }
                (Some(_), true) => add(format!("{p}.url"), "a memory transport takes no url".into()),
                (Some(url), false) => match url::Url::parse(url) {
                    Ok(u) if schemes.contains(&u.scheme()) => {}
                    Ok(u) => add(
                        format!("{p}.url"),
                        format!("scheme must be {}, not {:?}", schemes.join(" or "), u.scheme()),
                    ),
                    Err(e) => add(format!("{p}.url"), format!("not a valid URL: {e}")),
                },
                (None, true) => {}
            }
            let has_topology =
                !(t.topology.exchanges.is_empty() && t.topology.queues.is_empty() && t.topology.bindings.is_empty());
            if has_topology && t.kind != TransportKind::Amqp {
                add(format!("{p}.topology"), "only amqp transports declare a topology".into());
            }
            check_kafka_transport(t, &p, &mut add);
            if let Some(h) = t.heartbeat {
                if t.kind != TransportKind::Amqp {
                    add(format!("{p}.heartbeat"), "only amqp transports take a heartbeat".into());
                } else if h.is_zero() || h.as_secs() > u64::from(u16::MAX) {
                    add(format!("{p}.heartbeat"), "must be between 1s and 65535s".into());
                } else if h.subsec_nanos() != 0 {
                    add(format!("{p}.heartbeat"), "AMQP counts heartbeats in whole seconds".into());
                }
            }
            match (&t.consumer, t.kind) {
                (Some(c), TransportKind::Redis) if c.trim().is_empty() => {
                    add(format!("{p}.consumer"), "must not be empty (omit it to use the host name)".into())
                }
                (Some(_), TransportKind::Amqp | TransportKind::Kafka | TransportKind::Memory) => {
                    add(format!("{p}.consumer"), "only redis transports take a consumer name".into())
                }
                _ => {}
            }
            let declared: BTreeSet<&str> = t.topology.exchanges.iter().map(|e| e.name.as_str()).collect();
            for (i, e) in t.topology.exchanges.iter().enumerate() {
                if e.name.is_empty() || e.name.starts_with("amq.") {
                    add(
                        format!("{p}.topology.exchanges[{i}].name"),
                        "must be non-empty and not start with \"amq.\"".into(),
                    );
                }
            }
            for (i, q) in t.topology.queues.iter().enumerate() {
                if q.name.is_empty() {
                    add(format!("{p}.topology.queues[{i}].name"), "must not be empty".into());
                }
            }
            for (i, b) in t.topology.bindings.iter().enumerate() {
                let known = declared.contains(b.exchange.as_str()) || b.exchange.starts_with("amq.");
                if !known {
                    add(
                        format!("{p}.topology.bindings[{i}].exchange"),
                        format!("exchange {:?} is not declared under topology.exchanges", b.exchange),
                    );
                }
            }
        }

        for (name, h) in &self.handlers {
            let p = format!("handlers.{name}");
            if h.max_in_flight == 0 {
                add(format!("{p}.max_in_flight"), "must be at least 1".into());
            }
            if h.timeout.is_zero() {
                add(format!("{p}.timeout"), "must be greater than 0".into());
            }
            check_breaker(&h.circuit_breaker, &format!("{p}.circuit_breaker"), &mut add);
        }

        let handler_names = || self.handlers.keys().cloned().collect::<Vec<_>>().join(", ");
        for (name, s) in &self.subscriptions {
            let p = format!("subscriptions.{name}");
            if !self.transports.contains_key(&s.transport) {
                add(
                    format!("{p}.transport"),
                    format!(
                        "unknown transport {:?} (defined: {})",
                        s.transport,
                        self.transports.keys().cloned().collect::<Vec<_>>().join(", ")
                    ),
                );
            }
            let kind = self.transports.get(&s.transport).map(|t| t.kind);
            if let Some(kind) = kind {
                check_source(s, kind, &p, &mut add);
            }
            if s.prefetch == 0 {
                add(format!("{p}.prefetch"), "must be at least 1".into());
            }
            if s.max_body_bytes == 0 {
                add(format!("{p}.max_body_bytes"), "must be at least 1".into());
            }
            check_retry(&s.retry, &format!("{p}.retry"), &mut add);
            if let Some(h) = &s.default_handler {
                if !self.handlers.contains_key(h) {
                    add(
                        format!("{p}.default_handler"),
                        format!("unknown handler {h:?} (defined: {})", handler_names()),
                    );
                }
            }
            if let Some(d) = &s.dedup {
                match url::Url::parse(&d.redis) {
                    Ok(u) if u.scheme() == "redis" || u.scheme() == "rediss" => {}
                    _ => add(format!("{p}.dedup.redis"), format!("{:?} must be a redis:// or rediss:// URL", d.redis)),
                }
                if d.ttl.is_zero() {
                    add(format!("{p}.dedup.ttl"), "must be greater than 0".into());
                }
            }
            if kind == Some(TransportKind::Redis) {
                // A claim before the handler could have answered delivers the message twice.
                for h in self.reachable_handlers(name) {
                    if s.claim_idle <= h.1.timeout {
                        add(
                            format!("{p}.claim_idle"),
                            format!(
                                "{:?} must be longer than the timeout of handler {:?} ({:?}), or entries still being handled are claimed and delivered twice",
                                s.claim_idle, h.0, h.1.timeout
                            ),
                        );
                    }
                }
            }
            let routed = s.default_handler.is_some()
                || self.routes.iter().any(|r| r.matcher.subscription.as_deref().is_none_or(|sub| sub == name));
            if !routed {
                add(p.clone(), "no route matches this subscription and it has no default_handler: every message would be dead-lettered".into());
            }
        }

        let mut groups = BTreeSet::new();
        for (name, s) in &self.subscriptions {
            for stream in &s.streams {
                let group = s.group.as_deref().unwrap_or("");
                if !groups.insert((s.transport.as_str(), stream.as_str(), group)) {
                    add(
                        format!("subscriptions.{name}.streams"),
                        format!("another subscription already reads stream {stream:?} with group {group:?}; one subscription per stream and group (add prefetch instead)"),
                    );
                }
            }
        }

        let mut seen = BTreeSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let p = format!("routes[{i}]");
            if r.name.is_empty() {
                add(format!("{p}.name"), "must not be empty".into());
            } else if !seen.insert(r.name.as_str()) {
                add(format!("{p}.name"), format!("duplicate route name {:?}", r.name));
            }
            if !self.handlers.contains_key(&r.handler) {
                add(format!("{p}.handler"), format!("unknown handler {:?} (defined: {})", r.handler, handler_names()));
            }
            if let Some(sub) = &r.matcher.subscription {
                if !self.subscriptions.contains_key(sub) {
                    add(format!("{p}.match.subscription"), format!("unknown subscription {sub:?}"));
                }
            }
            if let Some(glob) = &r.matcher.routing_key {
                if glob.is_empty() {
                    add(format!("{p}.match.routing_key"), "must not be empty (omit it to match any key)".into());
                }
            }
            if let Some(retry) = &r.retry {
                check_retry(retry, &format!("{p}.retry"), &mut add);
            }
        }
        issues
    }
}

impl Config {
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

fn kind_name(kind: TransportKind) -> &'static str {
    match kind {
        TransportKind::Amqp => "amqp",
        TransportKind::Redis => "redis",
        TransportKind::Kafka => "kafka",
        TransportKind::Memory => "memory",
    }
}

/// librdkafka properties the router sets itself: offsets are its job.
const ROUTER_OWNED_PROPERTIES: &[&str] =
    &["bootstrap.servers", "group.id", "enable.auto.commit", "enable.auto.offset.store", "enable.partition.eof"];

fn check_kafka_transport(t: &TransportConfig, p: &str, add: &mut impl FnMut(String, String)) {
    if t.kind != TransportKind::Kafka {
        if !t.brokers.is_empty() || !t.properties.is_empty() {
            add(format!("{p}.brokers"), "`brokers` and `properties` are for kafka transports".into());
        }
        if t.create_topics.is_some() {
            add(format!("{p}.create_topics"), "only kafka transports create topics".into());
        }
        return;
    }
    if t.brokers.is_empty() {
        add(format!("{p}.brokers"), "list at least one broker as host:port".into());
    }
    if let Some(c) = &t.create_topics {
        for (key, value) in [("partitions", c.partitions), ("replication_factor", c.replication_factor)] {
            if value.is_some_and(|v| v < 1) {
                add(
                    format!("{p}.create_topics.{key}"),
                    "must be at least 1 (omit it for the cluster's default)".into(),
                );
            }
        }
    }
    for (i, b) in t.brokers.iter().enumerate() {
        let ok = b.rsplit_once(':').is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !ok {
            add(format!("{p}.brokers[{i}]"), format!("{b:?} is not host:port, like 127.0.0.1:9092"));
        }
    }
    let mut client = rdkafka::ClientConfig::new();
    let mut passed = Vec::new();
    for (key, value) in &t.properties {
        if ROUTER_OWNED_PROPERTIES.contains(&key.as_str()) {
            add(
                format!("{p}.properties.{key}"),
                "set by the router (brokers, the subscription's group, offsets committed only once handled)".into(),
            );
        } else {
            client.set(key, value);
            passed.push((key, value));
        }
    }
    // librdkafka checks names and values when a client is made (no connection yet). It
    // stops at the first property it refuses, in the order of rdkafka's hash map, so
    // the report names the first one (by key) refused on its own, the same every time.
    if let Err(e) = client.create::<rdkafka::consumer::BaseConsumer>() {
        let alone = passed.iter().find_map(|(key, value)| {
            rdkafka::ClientConfig::new().set(*key, *value).create::<rdkafka::consumer::BaseConsumer>().err()
        });
        add(format!("{p}.properties"), format!("librdkafka refuses them: {}", alone.unwrap_or(e)));
    }
}

/// What a subscription reads, checked against its transport's kind: AMQP and memory
/// consume a `queue`, Redis reads `streams` through a `group`.
fn check_source(s: &SubscriptionConfig, kind: TransportKind, p: &str, add: &mut impl FnMut(String, String)) {
    let dl = s.dead_letter.clone().unwrap_or_default();
    let is_kafka = kind == TransportKind::Kafka;
    if !is_kafka
        && (!s.topics.is_empty()
            || s.topic_pattern.is_some()
            || s.retry_topic.is_some()
            || dl.topic.is_some()
            || s.ordering != KafkaOrdering::Partition)
    {
        add(
            format!("{p}.topics"),
            format!(
                "`topics`, `topic_pattern`, `ordering`, `retry_topic` and `dead_letter.topic` are for kafka subscriptions; this transport is {}",
                kind_name(kind)
            ),
        );
    }
    if is_kafka {
        check_kafka_source(s, &dl, p, add);
        return;
    }
    if kind == TransportKind::Redis {
        if !s.queue.is_empty() {
            add(format!("{p}.queue"), "a redis subscription reads `streams`, not a `queue`".into());
        }
        if s.streams.is_empty() {
            add(format!("{p}.streams"), "list at least one stream to read".into());
        }
        for (i, stream) in s.streams.iter().enumerate() {
            if stream.is_empty() {
                add(format!("{p}.streams[{i}]"), "must not be empty".into());
            } else if s.streams[..i].contains(stream) {
                add(format!("{p}.streams[{i}]"), format!("stream {stream:?} is listed twice"));
            }
        }
        match s.group.as_deref() {
            None => add(format!("{p}.group"), "a redis subscription needs a consumer group name".into()),
            Some("") => add(format!("{p}.group"), "must not be empty".into()),
            Some(_) => {}
        }
        if s.claim_idle.is_zero() {
            add(format!("{p}.claim_idle"), "must be greater than 0".into());
        }
        if s.body_field.is_empty() {
            add(format!("{p}.body_field"), "must not be empty".into());
        }
        if !dl.exchange.is_empty() || dl.routing_key.is_some() {
            add(
                format!("{p}.dead_letter"),
                "a redis subscription dead-letters to a `stream`, not an exchange or routing key".into(),
            );
        }
        if dl.stream.as_deref() == Some("") {
            add(format!("{p}.dead_letter.stream"), "must not be empty (omit it for <stream>.dlq)".into());
        }
        if let Some(stream) = dl.stream.as_deref().filter(|d| s.streams.iter().any(|x| x == d)) {
            add(format!("{p}.dead_letter.stream"), format!("{stream:?} is a source stream (dead letters would loop)"));
        }
        if dl.maxlen == Some(0) {
            add(format!("{p}.dead_letter.maxlen"), "must be at least 1 (omit it to never trim)".into());
        }
        return;
    }
    let kind = kind_name(kind);
    if s.queue.is_empty() {
        add(format!("{p}.queue"), format!("a {kind} subscription needs the queue to consume"));
    }
    if !s.streams.is_empty() || s.group.is_some() {
        add(
            format!("{p}.streams"),
            format!("`streams` and `group` are for redis subscriptions; this transport is {kind}"),
        );
    }
    if dl.stream.is_some() || dl.maxlen.is_some() {
        add(
            format!("{p}.dead_letter"),
            format!("`stream` and `maxlen` are for redis subscriptions; this transport is {kind}"),
        );
    }
    if s.dead_letter.is_some() {
        if dl.exchange.is_empty() && dl.routing_key.as_deref().unwrap_or("").is_empty() {
            add(
                format!("{p}.dead_letter.routing_key"),
                "with the default exchange, name the dead-letter queue here".into(),
            );
        }
        if dl.routing_key.as_deref() == Some(s.queue.as_str()) && dl.exchange.is_empty() {
            add(
                format!("{p}.dead_letter.routing_key"),
                "must not be the subscription's own queue (dead letters would loop)".into(),
            );
        }
    }
}

fn check_kafka_source(s: &SubscriptionConfig, dl: &DeadLetterConfig, p: &str, add: &mut impl FnMut(String, String)) {
    if !s.queue.is_empty() || !s.streams.is_empty() {
        add(
            format!("{p}.queue"),
            "a kafka subscription reads `topics` (or `topic_pattern`), not a queue or streams".into(),
        );
    }
    match (s.topics.is_empty(), &s.topic_pattern) {
        (true, None) => add(format!("{p}.topics"), "list the topics to consume, or set topic_pattern".into()),
        (false, Some(_)) => add(format!("{p}.topic_pattern"), "set either topics or topic_pattern, not both".into()),
        (true, Some(pattern)) if pattern.trim().is_empty() => {
            add(format!("{p}.topic_pattern"), "must not be empty".into())
        }
        (true, Some(pattern)) => {
            if let Err(e) = crate::transport::kafka::check_pattern(pattern) {
                add(format!("{p}.topic_pattern"), e);
            }
        }
        _ => {}
    }
    for (i, topic) in s.topics.iter().enumerate() {
        if topic.is_empty() {
            add(format!("{p}.topics[{i}]"), "must not be empty".into());
        } else if s.topics[..i].contains(topic) {
            add(format!("{p}.topics[{i}]"), format!("topic {topic:?} is listed twice"));
        }
    }
    match s.group.as_deref() {
        None => add(format!("{p}.group"), "a kafka subscription needs a consumer group id".into()),
        Some("") => add(format!("{p}.group"), "must not be empty".into()),
        Some(_) => {}
    }
    if s.ordered {
        add(format!("{p}.ordered"), "kafka subscriptions say `ordering: partition | key | unordered` instead".into());
    }
    if !dl.exchange.is_empty() || dl.routing_key.is_some() || dl.stream.is_some() || dl.maxlen.is_some() {
        add(format!("{p}.dead_letter"), "a kafka subscription dead-letters to a `topic`".into());
    }
    for (what, topic) in [("dead_letter.topic", dl.topic.as_ref()), ("retry_topic", s.retry_topic.as_ref())] {
        match topic {
            Some(t) if t.is_empty() => add(format!("{p}.{what}"), "must not be empty (omit it for the default)".into()),
            Some(t) if s.topics.contains(t) => {
                add(format!("{p}.{what}"), format!("{t:?} is a source topic (messages would loop)"))
            }
            _ => {}
        }
    }
}

fn check_breaker(b: &CircuitBreakerConfig, p: &str, add: &mut impl FnMut(String, String)) {
    if !b.enabled {
        return;
    }
    if !(0.0..=1.0).contains(&b.failure_ratio) {
        add(format!("{p}.failure_ratio"), format!("must be between 0 and 1 (0: not used), got {}", b.failure_ratio));
    }
    if b.consecutive_failures == 0 && b.failure_ratio == 0.0 {
        add(p.to_string(), "set consecutive_failures or failure_ratio (or enabled: false)".into());
    }
    if b.failure_ratio > 0.0 && b.min_attempts == 0 {
        add(format!("{p}.min_attempts"), "must be at least 1 when failure_ratio is used".into());
    }
    if b.failure_ratio > 0.0 && b.window.is_zero() {
        add(format!("{p}.window"), "must be greater than 0 when failure_ratio is used".into());
    }
    if b.open_for.is_zero() {
        add(format!("{p}.open_for"), "must be greater than 0".into());
    }
    if b.max_open_for < b.open_for {
        add(format!("{p}.max_open_for"), "must not be shorter than open_for".into());
    }
    if b.probes == 0 {
        add(format!("{p}.probes"), "must be at least 1".into());
    }
}

fn check_retry(r: &RetryPolicy, p: &str, add: &mut impl FnMut(String, String)) {
    if r.max_attempts == 0 {
        add(format!("{p}.max_attempts"), "must be at least 1 (1 = no retries)".into());
    }
    if !(r.multiplier.is_finite() && r.multiplier >= 1.0) {
        add(format!("{p}.multiplier"), format!("must be a number >= 1, got {}", r.multiplier));
    }
    if !(0.0..=1.0).contains(&r.jitter) {
        add(format!("{p}.jitter"), format!("must be between 0 and 1, got {}", r.jitter));
    }
    if r.initial_delay > r.max_delay {
        add(format!("{p}.initial_delay"), "must not be greater than max_delay".into());
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{parse, ConfigError};

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
        assert_eq!(c.transports["rabbit"].url.as_deref(), Some("amqp://guest:s3cret@127.0.0.1:5672/%2f"));
        assert_eq!(c.subscriptions["orders"].dead_letter().routing_key.as_deref(), Some("orders.dlq"));
    }

    #[test]
    fn names_file_path_and_problem() {
        let cases = [
            (
                GOOD.replace("queue: orders", "queue: orders, prefetc: 5"),
                "router.yaml: subscriptions.orders.prefetc: unknown field `prefetc`, expected one of",
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
        let s = &c.subscriptions["orders"];
        assert_eq!(s.streams, ["orders", "refunds"]);
        assert_eq!(s.group.as_deref(), Some("billing"));
        assert!(s.declare, "groups are created unless the config says not to");
        assert_eq!(s.body_field, "body");
        assert_eq!(c.transports["redis"].consumer.as_deref(), Some("s3cret"));
    }

    #[test]
    fn redis_mistakes_name_their_key() {
        let cases = [
            (REDIS.replace("streams: [orders, refunds], ", "queue: orders, "), &[
                "subscriptions.orders.queue: a redis subscription reads `streams`, not a `queue`",
                "subscriptions.orders.streams: list at least one stream to read",
            ][..]),
            (REDIS.replace("group: billing, ", ""), &["subscriptions.orders.group: a redis subscription needs a consumer group name"]),
            (REDIS.replace("[orders, refunds]", "[orders, orders]"), &["subscriptions.orders.streams[1]: stream \"orders\" is listed twice"]),
            (REDIS.replace("claim_idle: 30s", "claim_idle: 5s"), &[
                "subscriptions.orders.claim_idle: 5s must be longer than the timeout of handler \"orders\" (5s)",
            ]),
            (REDIS.replace("redis://", "amqp://"), &["transports.redis.url: scheme must be redis or rediss, not \"amqp\""]),
            (REDIS.replace("claim_idle: 30s", "claim_idle: 30s, dead_letter: { routing_key: dlq }"), &[
                "subscriptions.orders.dead_letter: a redis subscription dead-letters to a `stream`",
            ]),
            (REDIS.replace("claim_idle: 30s", "claim_idle: 30s, dead_letter: { stream: refunds }"), &[
                "subscriptions.orders.dead_letter.stream: \"refunds\" is a source stream",
            ]),
            (REDIS.replace("claim_idle: 30s", "claim_idle: 30s, dedup: { redis: \"http://x\", ttl: 0s }"), &[
                "subscriptions.orders.dedup.redis: \"http://x\" must be a redis:// or rediss:// URL",
                "subscriptions.orders.dedup.ttl: must be greater than 0",
            ]),
            (GOOD.replace("queue: orders", "queue: orders, streams: [x]"), &[
                "subscriptions.orders.streams: `streams` and `group` are for redis subscriptions; this transport is amqp",
            ]),
            (GOOD.replace("url: \"amqp", "consumer: me, url: \"amqp"), &["transports.rabbit.consumer: only redis transports take a consumer name"]),
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
        let s = &c.subscriptions["orders"];
        assert_eq!(s.ordering, crate::config::KafkaOrdering::Key);
        assert_eq!(s.in_place_retry_max, std::time::Duration::from_secs(10));
        assert_eq!(c.transports["kafka"].properties["security.protocol"], "SASL_SSL");
        assert_eq!(c.transports["kafka"].properties["session.timeout.ms"], "6000", "bare numbers are fine");
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
            (KAFKA.replace("ordering: key", "ordered: true"), "subscriptions.orders.ordered: kafka subscriptions say `ordering: partition | key | unordered` instead"),
            (KAFKA.replace("ordering: key", "retry_topic: orders"), "subscriptions.orders.retry_topic: \"orders\" is a source topic"),
            (KAFKA.replace("brokers: [\"127.0.0.1:9092\"]", "url: \"kafka://x:1\""), "transports.kafka.url: a kafka transport lists `brokers` (host:port), not a url"),
            (GOOD.replace("queue: orders", "queue: orders, topics: [x]"), "`topics`, `topic_pattern`, `ordering`, `retry_topic` and `dead_letter.topic` are for kafka subscriptions"),
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
