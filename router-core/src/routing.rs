//! Which handler a message belongs to. Routes are tried in config order; the first
//! whose every condition holds wins. No match falls back to the subscription's default
//! handler, else the engine dead-letters the message with reason "no route".

use std::collections::HashMap;

use crate::config::{Config, RouteConfig};
use crate::message::Message;
use crate::retry::RetryPolicy;

/// The chosen route for one message.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteMatch<'a> {
    pub route: &'a str,
    pub handler: &'a str,
    /// Route-level override of the subscription's retry policy.
    pub retry: Option<&'a RetryPolicy>,
}

#[derive(Clone, Debug)]
struct Route {
    name: String,
    subscription: Option<String>,
    key: Option<Vec<String>>,
    headers: Vec<(String, String)>,
    handler: String,
    retry: Option<RetryPolicy>,
}

/// The compiled routing table. Cheap to query; built once per config.
#[derive(Clone, Debug, Default)]
pub struct RoutingTable {
    routes: Vec<Route>,
    defaults: HashMap<String, String>,
}

/// Route name reported for messages that reached a subscription's default handler.
pub const DEFAULT_ROUTE: &str = "default";

impl RoutingTable {
    pub fn from_config(config: &Config) -> Self {
        let routes = config.routes.iter().map(Route::compile).collect();
        let defaults = config
            .subscriptions
            .iter()
            .filter_map(|(name, s)| s.default_handler.clone().map(|h| (name.clone(), h)))
            .collect();
        RoutingTable { routes, defaults }
    }

    /// The route for `message` arriving on `subscription`, if any.
    pub fn route(&self, subscription: &str, message: &Message) -> Option<RouteMatch<'_>> {
        self.routes
            .iter()
            .find(|r| r.matches(subscription, message))
            .map(|r| RouteMatch { route: &r.name, handler: &r.handler, retry: r.retry.as_ref() })
            .or_else(|| {
                self.defaults.get(subscription).map(|h| RouteMatch { route: DEFAULT_ROUTE, handler: h, retry: None })
            })
    }
}

impl Route {
    fn compile(c: &RouteConfig) -> Self {
        Route {
            name: c.name.clone(),
            subscription: c.matcher.subscription.clone(),
            key: c.matcher.routing_key.as_deref().map(|g| g.split('.').map(str::to_string).collect()),
            headers: c.matcher.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            handler: c.handler.clone(),
            retry: c.retry.clone(),
        }
    }

    fn matches(&self, subscription: &str, m: &Message) -> bool {
        if self.subscription.as_deref().is_some_and(|s| s != subscription) {
            return false;
        }
        if let Some(glob) = &self.key {
            let key = m.key.as_deref().unwrap_or("");
            let words: Vec<&str> = if key.is_empty() { Vec::new() } else { key.split('.').collect() };
            if !glob_match(glob, &words) {
                return false;
            }
        }
        self.headers.iter().all(|(k, v)| m.headers.get(k) == Some(v))
    }
}

/// AMQP topic matching: `*` is exactly one word, `#` is zero or more words.
fn glob_match(pattern: &[String], words: &[&str]) -> bool {
    match pattern.split_first() {
        None => words.is_empty(),
        Some((p, rest)) if p == "#" => (0..=words.len()).any(|skip| glob_match(rest, &words[skip..])),
        Some((p, rest)) => match words.split_first() {
            Some((w, wrest)) if p == "*" || p == w => glob_match(rest, wrest),
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn table() -> RoutingTable {
        let yaml = r#"
transports: { mem: { type: memory } }
handlers: { a: {}, b: {}, c: {}, fallback: {} }
subscriptions:
  orders: { transport: mem, queue: orders, default_handler: fallback }
  audit: { transport: mem, queue: audit }
routes:
  - { name: vip, match: { routing_key: "order.#", headers: { tier: gold } }, handler: c }
  - { name: created, match: { subscription: orders, routing_key: "order.*.created" }, handler: a }
  - { name: audit-all, match: { subscription: audit }, handler: b }
"#;
        RoutingTable::from_config(&parse(yaml, "t.yaml", &|_| None).expect("valid"))
    }

    fn msg(key: &str, headers: &[(&str, &str)]) -> Message {
        Message {
            key: Some(key.into()),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Message::default()
        }
    }

    #[test]
    fn first_match_wins_and_defaults_apply() {
        let t = table();
        let cases = [
            ("orders", msg("order.eu.created", &[]), Some(("created", "a"))),
            ("orders", msg("order.eu.created", &[("tier", "gold")]), Some(("vip", "c"))),
            ("orders", msg("order.eu.deleted", &[("tier", "silver")]), Some((DEFAULT_ROUTE, "fallback"))),
            ("audit", msg("anything", &[]), Some(("audit-all", "b"))),
            ("audit", msg("order", &[("tier", "gold")]), Some(("vip", "c"))),
            ("other", msg("x", &[]), None),
        ];
        for (sub, m, want) in cases {
            let got = t.route(sub, &m).map(|r| (r.route, r.handler));
            assert_eq!(got, want, "{sub} {:?} {:?}", m.key, m.headers);
        }
    }

    #[test]
    fn globs_follow_amqp_topic_rules() {
        let p = |s: &str| s.split('.').map(str::to_string).collect::<Vec<_>>();
        let w = |s: &'static str| {
            if s.is_empty() {
                vec![]
            } else {
                s.split('.').collect::<Vec<_>>()
            }
        };
        let cases = [
            ("a.*", "a.b", true),
            ("a.*", "a", false),
            ("a.*", "a.b.c", false),
            ("a.#", "a", true),
            ("a.#", "a.b.c", true),
            ("#", "", true),
            ("#.c", "a.b.c", true),
            ("a.#.c", "a.c", true),
            ("a.#.c", "a.x.y.c", true),
            ("a.#.c", "a.x.y", false),
            ("*.b.*", "x.b.y", true),
            ("a.b", "a.b", true),
            ("a.b", "a.bb", false),
        ];
        for (pattern, key, want) in cases {
            assert_eq!(glob_match(&p(pattern), &w(key)), want, "{pattern} vs {key}");
        }
    }
}
