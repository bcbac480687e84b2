//! The admin server: `/healthz` (the process runs), `/readyz` (every subscription has a
//! live consumer and nothing wrong: no settlement refused, no circuit open, no
//! consumer being restarted; else 503 with the reasons), `/metrics` (Prometheus text
//! format). Bound to loopback by default.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use router_core::{Metrics, Readiness};
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    readiness: Readiness,
}

/// Bind now (so a taken port fails start-up with a clear error), serve until shutdown.
pub async fn start(
    listen: &str,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!("admin.listen: cannot bind {listen}: {e} (choose another port, or set admin.enabled: false)")
    })?;
    let addr = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AdminState { metrics, readiness });
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    Ok((addr, task))
}

/// 200 `ready`, or 503 with one line per subscription that is not ready and why
/// (`orders: settling: 3 message(s) whose settlement the broker refuses ...`).
async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let report = s.readiness.report();
    if report.is_empty() {
        return (StatusCode::OK, "ready\n".to_string());
    }
    let mut body = String::from("not ready\n");
    for (subscription, reasons) in report {
        for reason in reasons {
            body.push_str(&format!("{subscription}: {reason}\n"));
        }
    }
    (StatusCode::SERVICE_UNAVAILABLE, body)
}

async fn metrics_text(State(s): State<AdminState>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
}
