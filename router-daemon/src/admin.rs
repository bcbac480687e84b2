//! The admin server: `/healthz` (the process runs), `/readyz` (every subscription has a
//! live consumer), `/metrics` (Prometheus text format). Bound to loopback by default.

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

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    let down = s.readiness.not_ready();
    if down.is_empty() {
        (StatusCode::OK, "ready\n".to_string())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", down.join(", ")))
    }
}

async fn metrics_text(State(s): State<AdminState>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
}
