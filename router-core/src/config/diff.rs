//! What changed between two configs, component by component (the model is Vector's
//! `config/diff.rs`). A reload applies only this: what did not change keeps running
//! untouched, with its connections and its in-flight work.
//!
//! A component is changed when its section differs in any key. A subscription is also
//! changed when the transport it reads from changed (its consumer must reconnect with
//! the new URL or credentials). Routes are compared by name and by order (the first
//! matching route wins, so moving one changes the routing).

use std::collections::BTreeMap;

use serde::Serialize;

use super::Config;

/// Names added, removed and changed in one kind of component.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Changes {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub changed: Vec<String>,
}

impl Changes {
    fn between<V: PartialEq>(old: &BTreeMap<String, V>, new: &BTreeMap<String, V>) -> Self {
        let mut c = Changes::default();
        for (name, v) in new {
            match old.get(name) {
                None => c.added.push(name.clone()),
                Some(o) if o != v => c.changed.push(name.clone()),
                Some(_) => {}
            }
        }
        c.removed = old.keys().filter(|n| !new.contains_key(*n)).cloned().collect();
        c
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    /// Whether `name` was added or changed: it needs building anew.
    pub fn needs_building(&self, name: &str) -> bool {
        self.added.iter().chain(&self.changed).any(|n| n == name)
    }

    fn summary(&self, kind: &str, out: &mut Vec<String>) {
        let mut parts = Vec::new();
        for (sign, names) in [("+", &self.added), ("-", &self.removed), ("~", &self.changed)] {
            parts.extend(names.iter().map(|n| format!("{sign}{n}")));
        }
        if !parts.is_empty() {
            out.push(format!("{kind} {}", parts.join(" ")));
        }
    }
}

/// Everything a reload changes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConfigDiff {
    pub transports: Changes,
    pub handlers: Changes,
    pub subscriptions: Changes,
    pub routes: Changes,
    /// The routes kept their names and sections but not their order.
    pub routes_reordered: bool,
    /// `shutdown.grace_period` changed (applies to every drain from now on).
    pub grace_period: bool,
    /// Keys whose new value takes effect only after a restart (`admin`, `log`, `tracing`).
    pub restart_needed: Vec<String>,
}

impl ConfigDiff {
    pub fn between(old: &Config, new: &Config) -> Self {
        let transports = Changes::between(&old.transports, &new.transports);
        let mut subscriptions = Changes::between(&old.subscriptions, &new.subscriptions);
        for (name, s) in &new.subscriptions {
            let kept = old.subscriptions.contains_key(name) && !subscriptions.changed.contains(name);
            if kept && transports.changed.contains(&s.transport) {
                subscriptions.changed.push(name.clone());
            }
        }
        subscriptions.changed.sort();
        let by_name = |c: &Config| c.routes.iter().map(|r| (r.name.clone(), r.clone())).collect::<BTreeMap<_, _>>();
        let routes = Changes::between(&by_name(old), &by_name(new));
        let order = |c: &Config| c.routes.iter().map(|r| r.name.clone()).collect::<Vec<_>>();
        let routes_reordered = routes.is_empty() && order(old) != order(new);
        let mut restart_needed = Vec::new();
        if old.admin != new.admin {
            restart_needed.push("admin".to_string());
        }
        if old.log.level != new.log.level {
            restart_needed.push("log.level".to_string());
        }
        if old.log.format != new.log.format {
            restart_needed.push("log.format".to_string());
        }
        if old.tracing != new.tracing {
            restart_needed.push("tracing".to_string());
        }
        ConfigDiff {
            transports,
            handlers: Changes::between(&old.handlers, &new.handlers),
            subscriptions,
            routes,
            routes_reordered,
            grace_period: old.shutdown != new.shutdown,
            restart_needed,
        }
    }

    /// Nothing to apply (the file may still differ in comments or layout).
    pub fn is_empty(&self) -> bool {
        self.transports.is_empty()
            && self.handlers.is_empty()
            && self.subscriptions.is_empty()
            && self.routes.is_empty()
            && !self.routes_reordered
            && !self.grace_period
            && self.restart_needed.is_empty()
    }

    /// Whether messages must be routed through a new table: a route or a handler changed.
    pub fn rewires(&self) -> bool {
        !self.routes.is_empty() || self.routes_reordered || !self.handlers.is_empty() || self.grace_period
    }

    /// One line for the log: `subscriptions +audit -legacy; handlers ~billing`.
    pub fn summary(&self) -> String {
        let mut out = Vec::new();
        self.transports.summary("transports", &mut out);
        self.handlers.summary("handlers", &mut out);
        self.subscriptions.summary("subscriptions", &mut out);
        self.routes.summary("routes", &mut out);
        if self.routes_reordered {
            out.push("routes reordered".into());
        }
        if self.grace_period {
            out.push("shutdown.grace_period".into());
        }
        if !self.restart_needed.is_empty() {
            out.push(format!("needs a restart: {}", self.restart_needed.join(", ")));
        }
        if out.is_empty() {
            "no change".into()
        } else {
            out.join("; ")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    const BASE: &str = r#"
transports:
  rabbit: { type: amqp, url: "amqp://127.0.0.1:5672" }
  other: { type: amqp, url: "amqp://127.0.0.1:5672" }
handlers:
  a: { endpoints: ["http://127.0.0.1:1/a"] }
  b: { endpoints: ["http://127.0.0.1:1/b"] }
subscriptions:
  orders: { transport: rabbit, queue: orders }
  refunds: { transport: rabbit, queue: refunds }
  audit: { transport: other, queue: audit }
routes:
  - { name: first, match: { routing_key: "x.#" }, handler: a }
  - { name: second, handler: b }
"#;

    fn config(yaml: &str) -> Config {
        match parse(yaml, "router.yaml", &|_| None) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_same_file_changes_nothing() {
        let d = ConfigDiff::between(&config(BASE), &config(BASE));
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(d.summary(), "no change");
    }

    #[test]
    fn each_kind_of_component_is_compared_by_name() {
        let new = BASE
            .replace(
                "  refunds: { transport: rabbit, queue: refunds }\n",
                "  payouts: { transport: rabbit, queue: payouts }\n",
            )
            .replace("http://127.0.0.1:1/b", "http://127.0.0.1:2/b")
            .replace("name: second", "name: fallback");
        let d = ConfigDiff::between(&config(BASE), &config(&new));
        assert_eq!(d.subscriptions.added, ["payouts"]);
        assert_eq!(d.subscriptions.removed, ["refunds"]);
        assert!(d.subscriptions.changed.is_empty());
        assert_eq!(d.handlers.changed, ["b"]);
        assert_eq!(d.routes.added, ["fallback"]);
        assert_eq!(d.routes.removed, ["second"]);
        assert!(d.transports.is_empty());
        assert!(d.rewires());
        assert_eq!(d.summary(), "handlers ~b; subscriptions +payouts -refunds; routes +fallback -second");
    }

    #[test]
    fn a_changed_transport_changes_the_subscriptions_on_it() {
        let new = BASE.replace(
            "other: { type: amqp, url: \"amqp://127.0.0.1:5672\" }",
            "other: { type: amqp, url: \"amqp://127.0.0.2:5672\" }",
        );
        let d = ConfigDiff::between(&config(BASE), &config(&new));
        assert_eq!(d.transports.changed, ["other"]);
        assert_eq!(d.subscriptions.changed, ["audit"]);
        assert!(!d.rewires(), "routes and handlers are untouched");
    }

    #[test]
    fn a_subscription_setting_changes_only_that_subscription() {
        let new = BASE.replace(
            "orders: { transport: rabbit, queue: orders }",
            "orders: { transport: rabbit, queue: orders, prefetch: 7 }",
        );
        let d = ConfigDiff::between(&config(BASE), &config(&new));
        assert_eq!(d.subscriptions.changed, ["orders"]);
        assert!(d.handlers.is_empty() && d.transports.is_empty() && d.routes.is_empty());
    }

    #[test]
    fn a_changed_max_in_flight_changes_the_handler() {
        let with = |v: &str| BASE.replace("1/a\"] }", &format!("1/a\"], max_in_flight: {v} }}"));
        for (old, new) in [("16", "auto"), ("auto", "{ auto: { max: 32 } }"), ("auto", "16"), ("8", "9")] {
            let d = ConfigDiff::between(&config(&with(old)), &config(&with(new)));
            assert_eq!(d.handlers.changed, ["a"], "{old} -> {new}");
            assert!(d.rewires() && d.subscriptions.is_empty(), "{old} -> {new}");
        }
        let same = ConfigDiff::between(&config(&with("auto")), &config(&with("{ auto: { max: 256 } }")));
        assert!(same.is_empty(), "`auto` is `auto` with max 256");
    }

    #[test]
    fn moving_a_route_rewires() {
        let new = BASE.replace(
            "  - { name: first, match: { routing_key: \"x.#\" }, handler: a }\n  - { name: second, handler: b }\n",
            "  - { name: second, handler: b }\n  - { name: first, match: { routing_key: \"x.#\" }, handler: a }\n",
        );
        let d = ConfigDiff::between(&config(BASE), &config(&new));
        assert!(d.routes.is_empty() && d.routes_reordered && d.rewires());
    }

    #[test]
    fn admin_and_log_need_a_restart() {
        let new = format!("admin: {{ listen: \"127.0.0.1:9999\" }}\nlog: {{ format: json, level: debug }}\n{BASE}");
        let d = ConfigDiff::between(&config(BASE), &config(&new));
        assert_eq!(d.restart_needed, ["admin", "log.level", "log.format"]);
        assert!(!d.is_empty());
    }
}
