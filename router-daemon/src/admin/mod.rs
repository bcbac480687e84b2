//! The admin listener: probes, metrics, the admin API and the status page.
//!
//! - `/healthz` (the process runs), `/readyz` (every subscription has a live consumer
//!   and nothing wrong; else 503 with the reasons), `/metrics` (Prometheus text).
//!   Open to whoever reaches the listener: probes and scrapers carry no token.
//! - `/api/...` ([`api`]): JSON status, subscriptions with their state, rates and
//!   depths, pause/resume/drain, dead letters (list, show, stats, replay, purge),
//!   handler pools.
//! - `/` ([`page`]): the status page, one HTML file compiled into the binary.
//!
//! Security ([`guard`]): without `admin.token` the listener must be loopback (config
//! validation) and the API answers loopback peers only; with a token every `/api/`
//! call must carry it as `Authorization: Bearer`. A mutating call from a browser page
//! of another origin is refused either way, so a web page cannot drive a loopback
//! router through the operator's browser. No answer carries a credential: broker URLs
//! and endpoints are shown without theirs, the token is never echoed or logged.

mod api;
mod page;
mod rates;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use parking_lot::RwLock;
use router_core::{Metrics, Readiness, Subscriptions};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub use rates::Rates;

use crate::reload::Reloads;

/// What the admin API says about the running process.
pub struct Info {
    /// `sha256:<hex>` of the config file as read.
    pub config_hash: String,
    pub started: SystemTime,
    /// Handler names with their target type, in config order.
    pub handlers: Vec<(String, String)>,
    /// How the last reload attempt ended.
    pub last_reload: Option<crate::reload::Outcome>,
}

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    readiness: Readiness,
    subscriptions: Subscriptions,
    rates: Arc<Rates>,
    /// Changed by every applied reload.
    info: Arc<RwLock<Info>>,
    reloads: Reloads,
    /// SHA-256 of `admin.token`: compared digest to digest, so the time a comparison
    /// takes says nothing about the token.
    token: Option<[u8; 32]>,
}

/// Everything the admin listener serves from.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub readiness: Readiness,
    pub subscriptions: Subscriptions,
    pub info: Arc<RwLock<Info>>,
    pub reloads: Reloads,
    pub token: Option<String>,
}

/// Bind now (so a taken port fails start-up with a clear error), serve until shutdown.
pub async fn start(
    listen: &str,
    admin: Admin,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!("admin.listen: cannot bind {listen}: {e} (choose another port, or set admin.enabled: false)")
    })?;
    let addr = listener.local_addr()?;
    let rates = Rates::new(admin.metrics.clone());
    tokio::spawn(rates.clone().run(shutdown.clone()));
    let state = AdminState {
        metrics: admin.metrics,
        readiness: admin.readiness,
        subscriptions: admin.subscriptions,
        rates,
        info: admin.info,
        reloads: admin.reloads,
        token: admin.token.as_deref().map(digest),
    };
    let api =
        api::routes().route_layer(axum::middleware::from_fn_with_state(state.clone(), guard)).fallback(|| async {
            api::error(
                StatusCode::NOT_FOUND,
                "no such API path (the README section \"Status page and admin API\" lists them)",
            )
        });
    let app = axum::Router::new()
        .route("/", get(page::index))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .nest("/api", api)
        .with_state(state);
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    Ok((addr, task))
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Who may call the API (see the module doc). Refusals say what to do and change
/// nothing.
async fn guard(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    match s.token {
        Some(token) => {
            let given = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(|t| digest(t.trim()));
            if given != Some(token) {
                let mut refused = api::error(
                    StatusCode::UNAUTHORIZED,
                    "this call needs the admin token: send `Authorization: Bearer <admin.token>`",
                )
                .into_response();
                refused.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
                return refused;
            }
        }
        None if !peer.ip().is_loopback() => {
            return api::error(
                StatusCode::FORBIDDEN,
                "the admin API answers loopback callers only unless admin.token is set",
            )
            .into_response();
        }
        None => {}
    }
    if request.method() != Method::GET && !same_origin(headers) {
        return api::error(
            StatusCode::FORBIDDEN,
            "a change asked by a page of another origin is refused (call the API from the status page, curl or a script)",
        )
        .into_response();
    }
    next.run(request).await
}

/// Whether a request comes from no browser page (no `Origin`) or from a page of this
/// listener (`Origin` names the `Host` it was sent to).
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else { return true };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let origin_host = origin.split_once("://").map_or("", |(_, rest)| rest);
    !host.is_empty() && origin_host == host
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
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_origin_means_no_origin_or_the_listener_itself() {
        let headers = |pairs: &[(header::HeaderName, &str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(k, v.parse().expect("header value"));
            }
            h
        };
        assert!(same_origin(&headers(&[(header::HOST, "127.0.0.1:9090")])));
        assert!(same_origin(&headers(&[(header::HOST, "127.0.0.1:9090"), (header::ORIGIN, "http://127.0.0.1:9090")])));
        assert!(!same_origin(&headers(&[(header::HOST, "127.0.0.1:9090"), (header::ORIGIN, "https://evil.example")])));
        assert!(!same_origin(&headers(&[(header::HOST, "127.0.0.1:9090"), (header::ORIGIN, "null")])));
        assert!(!same_origin(&headers(&[(header::ORIGIN, "http://127.0.0.1:9090")])));
    }
}
