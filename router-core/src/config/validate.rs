//! Semantic checks that serde cannot express: references between sections, numeric
//! ranges. Every problem is collected, not just the first. What only concerns one
//! broker is checked in its folder (`crate::transport::<kind>::config`), reached
//! through [`crate::transport::config`].

use std::collections::BTreeSet;
use std::net::SocketAddr;

use super::section::Issues;
use super::{CircuitBreakerConfig, Config, ConfigIssue, HandlerConfig, MaxInFlight, SourceConfig};
use crate::retry::RetryPolicy;

impl Config {
    /// Every problem found, each with its key path. Empty means valid.
    pub fn validate(&self) -> Vec<ConfigIssue> {
        let mut issues = Issues::default();

        if self.admin.enabled {
            match (self.admin.listen.parse::<SocketAddr>(), &self.admin.token) {
                (Err(_), _) => issues
                    .add("admin.listen", format!("{:?} is not an address like 127.0.0.1:9090", self.admin.listen)),
                (Ok(addr), None) if !addr.ip().is_loopback() => issues.add(
                    "admin.listen",
                    format!(
                        "{addr} is reachable from other machines: set admin.token (for example `token: ${{ROUTER_ADMIN_TOKEN}}`) or listen on 127.0.0.1"
                    ),
                ),
                _ => {}
            }
            if let Some(token) = &self.admin.token {
                if token.chars().count() < super::ADMIN_TOKEN_MIN || token.chars().any(char::is_whitespace) {
                    issues.add(
                        "admin.token",
                        format!(
                            "must be at least {} characters without spaces (for example `openssl rand -hex 24`)",
                            super::ADMIN_TOKEN_MIN
                        ),
                    );
                }
            }
        }
        if self.shutdown.grace_period.is_zero() {
            issues.add("shutdown.grace_period", "must be greater than 0");
        }
        let t = &self.tracing;
        if !(0.0..=1.0).contains(&t.sampling) {
            issues.add("tracing.sampling", format!("{} is not a share between 0.0 and 1.0", t.sampling));
        }
        match url::Url::parse(&t.endpoint) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => issues.add(
                "tracing.endpoint",
                format!("{:?} is not an http:// or https:// URL like http://127.0.0.1:4318", t.endpoint),
            ),
        }
        if t.service_name.trim().is_empty() {
            issues.add("tracing.service_name", "must not be empty");
        }

        for (name, t) in &self.transports {
            t.broker.check(&format!("transports.{name}"), &mut issues);
        }

        for (name, h) in &self.handlers {
            let p = format!("handlers.{name}");
            match h.max_in_flight {
                MaxInFlight::Fixed(0) => issues.add(format!("{p}.max_in_flight"), "must be at least 1"),
                MaxInFlight::Auto { max: 0 } => issues.add(format!("{p}.max_in_flight.auto.max"), "must be at least 1"),
                _ => {}
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
pub(crate) mod tests {
    use crate::config::{parse, BrokerConfig, ConfigError};

    pub(crate) const GOOD: &str = r#"
transports:
  rabbit: { type: amqp, url: "amqp://guest:${PASS}@127.0.0.1:5672/%2f" }
handlers:
  orders: { endpoints: ["http://127.0.0.1:8080/"] }
subscriptions:
  orders: { transport: rabbit, queue: orders }
routes:
  - { name: all, handler: orders }
"#;

    pub(crate) fn env(name: &str) -> Option<String> {
        (name == "PASS").then(|| "s3cret".to_string())
    }

    /// What the loader says of a config it must refuse.
    pub(crate) fn errors(text: &str) -> String {
        match parse(text, "router.yaml", &env) {
            Ok(_) => panic!("config should be rejected:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn tracing_is_off_by_default_and_its_keys_are_checked() {
        let c = parse(GOOD, "router.yaml", &env).expect("valid");
        assert!(!c.tracing.enabled);
        let with = |t: &str| format!("{GOOD}tracing: {t}\n");
        let c = parse(
            &with("{ enabled: true, protocol: grpc, endpoint: \"http://otel:4317\", sampling: 0.25 }"),
            "router.yaml",
            &env,
        )
        .expect("valid");
        assert_eq!((c.tracing.protocol, c.tracing.sampling), (super::super::OtlpProtocol::Grpc, 0.25));
        let e = errors(&with("{ sampling: 1.5, endpoint: \"otel:4318\", service_name: \" \" }"));
        assert!(e.contains("router.yaml: tracing.sampling: 1.5 is not a share between 0.0 and 1.0"), "{e}");
        assert!(e.contains("tracing.endpoint: \"otel:4318\" is not an http:// or https:// URL"), "{e}");
        assert!(e.contains("tracing.service_name: must not be empty"), "{e}");
        assert!(errors(&with("{ protocol: udp }")).contains("tracing"), "an unknown protocol names its section");
    }

    #[test]
    fn the_admin_listener_beyond_loopback_needs_a_strong_token_that_no_debug_output_shows() {
        let with = |admin: &str| format!("{GOOD}admin: {admin}\n");
        assert!(errors(&with("{ listen: \"0.0.0.0:9090\" }"))
            .contains("router.yaml: admin.listen: 0.0.0.0:9090 is reachable from other machines: set admin.token"));
        assert!(errors(&with("{ listen: \"127.0.0.1:9090\", token: short }"))
            .contains("admin.token: must be at least 16 characters"));
        let c = parse(&with("{ listen: \"0.0.0.0:9090\", token: \"${PASS}-and-some-more\" }"), "router.yaml", &env)
            .expect("a token allows any address");
        assert_eq!(c.admin.token.as_deref(), Some("s3cret-and-some-more"));
        assert!(!format!("{c:?}").contains("s3cret-and-some-more"), "the token is redacted from Debug output");
        parse(&with("{ listen: \"[::1]:9090\" }"), "router.yaml", &env).expect("loopback needs no token");
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
    fn max_in_flight_is_a_number_or_auto() {
        use crate::config::MaxInFlight;
        let with = |v: &str| GOOD.replace("8080/\"] }", &format!("8080/\"], max_in_flight: {v} }}"));
        let limit = |v: &str| parse(&with(v), "router.yaml", &env).expect("valid").handlers["orders"].max_in_flight;
        assert_eq!(
            parse(GOOD, "router.yaml", &env).expect("valid").handlers["orders"].max_in_flight,
            MaxInFlight::Fixed(64)
        );
        assert_eq!(limit("16"), MaxInFlight::Fixed(16));
        assert_eq!(limit("auto"), MaxInFlight::Auto { max: 256 });
        assert_eq!(limit("{ auto: { max: 32 } }"), MaxInFlight::Auto { max: 32 });
        assert_eq!(limit("{ auto: {} }"), MaxInFlight::Auto { max: 256 });
        assert_eq!(limit("{ auto: }"), MaxInFlight::Auto { max: 256 });
        let cases = [
            ("0", "router.yaml: handlers.orders.max_in_flight: must be at least 1"),
            ("{ auto: { max: 0 } }", "router.yaml: handlers.orders.max_in_flight.auto.max: must be at least 1"),
            ("-1", "router.yaml: handlers.orders.max_in_flight: invalid value: integer `-1`, expected a number of deliveries (64), `auto`, or `{ auto: { max: 256 } }`"),
            ("automatic", "router.yaml: handlers.orders.max_in_flight: invalid value: string \"automatic\", expected a number"),
            ("2.5", "router.yaml: handlers.orders.max_in_flight: invalid type: floating point `2.5`, expected a number"),
            ("{ auto: { max: -3 } }", "router.yaml: handlers.orders.max_in_flight.auto.max: invalid value: integer `-3`"),
            ("{ auto: { maxx: 3 } }", "router.yaml: handlers.orders.max_in_flight.auto.maxx: unknown field `maxx`, expected `max`"),
            ("{ fixed: 3 }", "router.yaml: handlers.orders.max_in_flight: unknown field `fixed`, expected `auto`"),
            ("{ auto: {}, max: 3 }", "router.yaml: handlers.orders.max_in_flight: unknown field `max`, expected `auto`"),
            ("[auto]", "router.yaml: handlers.orders.max_in_flight: invalid type: sequence, expected a number"),
        ];
        for (value, want) in cases {
            let got = errors(&with(value));
            assert!(got.contains(want), "max_in_flight: {value}: want {want:?} in:\n{got}");
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

    #[test]
    fn interpolation_rules() {
        use crate::config::interpolate;
        assert_eq!(interpolate("a$$b", &env).as_deref(), Ok("a$b"));
        assert_eq!(interpolate("${NOPE:-x}", &env).as_deref(), Ok("x"));
        assert_eq!(interpolate("${PASS}-$HOME", &env).as_deref(), Ok("s3cret-$HOME"));
        assert!(interpolate("${PASS", &env).is_err());
    }
}
