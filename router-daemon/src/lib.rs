//! The `message-router` daemon: consumes every subscription of a YAML config and
//! delivers to pools of handler endpoints.
//!
//! # Layout
//! - `main.rs`: the CLI (`run`, `validate`, `publish`); thin.
//! - [`targets`]: which target reaches each handler (`handlers.<name>.type`); the one
//!   list of targets.
//! - [`http`]: the HTTP target: its handler section (`http/config.rs`) and the delivery
//!   contract (`http/contract.rs`).
//! - [`fastcgi`]: the FastCGI target (PHP-FPM without a web server): its handler
//!   section, the record protocol, pooled keep-alive connections.
//! - [`pool`]: endpoint pools with load balancing and passive health, for every
//!   target with endpoints.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`telemetry`]: tracing set-up (text or JSON).
//! - this file: loading a config for the daemon (core validation plus what only the
//!   daemon needs), running it until SIGTERM/SIGINT, and publishing test messages.
//!
//! Everything broker-side (transports, routing, retry, dead-letter, settlement) lives
//! in `router-core`.

pub mod admin;
pub mod fastcgi;
pub mod http;
pub mod pool;
pub mod targets;
pub mod telemetry;

use std::path::Path;
use std::sync::Arc;

use router_core::config::{Config, ConfigError, ConfigIssue, TransportKind};
use router_core::{Metrics, Router};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Load a config file and check it for daemon use. Errors name the file, key path
/// and problem; the core's and the daemon's come in one list.
pub fn load_config(path: &Path) -> Result<Config, ConfigError> {
    router_core::config::load_with(path, &daemon_issues)
}

/// What the daemon needs beyond the shared model: a valid target section for every
/// handler, a transport the outside world can feed, a valid log filter.
pub fn daemon_issues(config: &Config) -> Vec<ConfigIssue> {
    let mut issues = targets::check(config);
    for (name, t) in &config.transports {
        if t.kind == TransportKind::Memory {
            issues.push(ConfigIssue::new(
                format!("transports.{name}.type"),
                "the memory transport lives inside one process and nothing outside the daemon can publish to it; use it from tests or the PHP extension",
            ));
        }
    }
    if let Err(e) = telemetry::check_filter(&config.log.level) {
        issues.push(ConfigIssue::new("log.level", e));
    }
    issues
}

/// Run until SIGTERM or SIGINT, then drain within the grace period and return. `Err`
/// when a subscription cannot run as configured (the router stopped everything).
pub async fn run(config: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new()?);
    let targets = targets::build(&config, &metrics)?;
    let router = Router::new(&config, targets, metrics.clone())?;
    let shutdown = CancellationToken::new();
    let admin = if config.admin.enabled {
        let (addr, task) = admin::start(&config.admin.listen, metrics, router.readiness(), shutdown.clone()).await?;
        info!(%addr, "admin server listening (/healthz, /readyz, /metrics)");
        Some(task)
    } else {
        None
    };
    tokio::spawn(watch_signals(shutdown.clone(), config.shutdown.grace_period));
    info!(
        subscriptions = config.subscriptions.len(),
        routes = config.routes.len(),
        handlers = config.handlers.len(),
        "message-router running"
    );
    let result = router.run(shutdown.clone()).await;
    shutdown.cancel();
    if let Some(task) = admin {
        let _ = task.await;
    }
    // A subscription that can never run ends the process with an error, never exit 0.
    result.map_err(anyhow::Error::from)
}

/// First SIGTERM/SIGINT: graceful shutdown. A second one: exit at once (messages in
/// flight are redelivered by the broker).
async fn watch_signals(shutdown: CancellationToken, grace: std::time::Duration) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        warn!("cannot install signal handlers; stop the router with SIGKILL");
        return;
    };
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    info!(?grace, "shutdown requested: finishing in-flight messages (signal again to exit now)");
    shutdown.cancel();
    tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    warn!("second signal: exiting now; unsettled messages will be redelivered");
    std::process::exit(130);
}
