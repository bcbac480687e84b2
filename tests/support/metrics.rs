//! The metric names the daemon exports, and the `router_*` names a text mentions: what
//! `tests/monitoring.rs` checks the dashboard and alert rules against, and
//! `tests/deploy.rs` the manifests and ScaledObjects.

use std::collections::BTreeSet;
use std::sync::Arc;

/// Every `router_*` name in `text` (the bare prefix, as in "every router_* name", is none).
pub fn metric_names(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.starts_with("router_") && t.len() > "router_".len())
        .map(str::to_string)
        .collect()
}

/// What the daemon registers: the core's metrics and those of its targets.
pub fn exported() -> BTreeSet<String> {
    let yaml = r#"
transports: { rabbit: { type: amqp, url: "amqp://127.0.0.1:5672/%2f" } }
handlers: { php: { endpoints: ["http://127.0.0.1:8080/"] } }
subscriptions: { orders: { transport: rabbit, queue: orders } }
routes: [ { name: all, handler: php } ]
"#;
    let config = router_core::config::parse(yaml, "metrics.yaml", &|_| None).expect("config");
    let metrics = Arc::new(router_core::Metrics::new().expect("metrics"));
    router_daemon::targets::build(&config, &metrics).expect("targets");
    router_daemon::reload::register(&metrics).expect("reload metrics");
    metrics.names().into_iter().collect()
}

/// The names of `named` that the router does not export (a histogram's `_bucket`,
/// `_sum` and `_count` series count as its own name).
pub fn not_exported<'a>(named: impl IntoIterator<Item = &'a String>, exported: &BTreeSet<String>) -> Vec<String> {
    named
        .into_iter()
        .filter(|name| {
            let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
            !exported.contains(*name) && !exported.contains(base)
        })
        .cloned()
        .collect()
}
