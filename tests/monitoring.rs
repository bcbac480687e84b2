//! The Grafana dashboard and the Prometheus alert rules in `deploy/`: the rules load
//! (`promtool check rules`), each alert fires on the series that should raise it and
//! stays quiet otherwise (`promtool test rules deploy/prometheus/alerts.test.yaml`),
//! every dashboard query is valid PromQL, and every metric either names is one the
//! router registers.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use e2e::metrics::{exported, metric_names};
use e2e::*;
use serde_json::Value;

fn promtool(args: &[&str], dir: &Path) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool runs (Debian's prometheus package; scripts/setup installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_load_and_fire_when_they_should() {
    let dir = root().join("deploy/prometheus");
    assert!(promtool(&["check", "rules", "alerts.yaml"], &dir).contains("SUCCESS: 8 rules found"));
    promtool(&["test", "rules", "alerts.test.yaml"], &dir);
}

#[test]
fn dashboard_queries_are_valid_and_name_only_exported_metrics() {
    let text = std::fs::read_to_string(root().join("deploy/grafana/message-router.json")).expect("dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 10, "{} queries", exprs.len());
    // promtool parses PromQL inside rule files: each query becomes a recording rule,
    // Grafana's variables replaced by what they stand for.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e.replace("$__rate_interval", "5m").replace("$subscription", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&e).expect("json")
        ));
    }
    let scratch = Scratch::new("monitoring");
    std::fs::write(scratch.path("dashboard-rules.yaml"), rules).expect("write rules");
    promtool(&["check", "rules", "dashboard-rules.yaml"], &scratch.0);

    let exported = exported();
    let alerts = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yaml")).expect("alerts");
    let named: BTreeSet<String> = metric_names(&exprs.join("\n")).into_iter().chain(metric_names(&alerts)).collect();
    for name in &named {
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        assert!(
            exported.contains(name) || exported.contains(base),
            "{name} is named by deploy/ but the router exports no such metric (it has: {exported:?})"
        );
    }
    for must in ["router_backlog_messages", "router_dead_letters", "router_endpoint_up", "router_circuit_state"] {
        assert!(named.contains(must), "{must} is on neither the dashboard nor an alert");
    }
}
