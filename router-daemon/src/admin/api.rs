//! The admin API (`/api/...`), JSON in and out. Errors are `{"error": "..."}` with a
//! status that says whose fault it is: 400 bad input, 404 nothing by that name (or
//! nothing matched), 502 the broker refused; a refused call changes nothing.

use std::time::{Duration, SystemTime};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use router_core::dlq::{DeadLetter, Filter};
use router_core::transport::{Rework, TransportError};
use router_core::SubscriptionHandle;
use serde::Deserialize;
use serde_json::{json, Value};

use super::AdminState;
use crate::dlq::{self, ReworkJob};

/// Most dead letters one list answer holds.
const LIST_MAX: usize = 1000;
/// The body excerpt of a dead letter in a list; `show` gives up to [`SHOW_BODY`].
const LIST_BODY: usize = 200;
const SHOW_BODY: usize = 64 * 1024;

pub fn routes() -> axum::Router<AdminState> {
    axum::Router::new()
        .route("/status", get(status))
        .route("/subscriptions", get(subscriptions))
        .route("/subscriptions/{name}", get(subscription))
        .route("/subscriptions/{name}/{action}", post(control))
        .route("/subscriptions/{name}/dead-letters", get(dead_letters))
        .route("/subscriptions/{name}/dead-letters/stats", get(dead_letter_stats))
        .route("/subscriptions/{name}/dead-letters/replay", post(replay))
        .route("/subscriptions/{name}/dead-letters/purge", post(purge))
        .route("/subscriptions/{name}/dead-letters/{id}", get(dead_letter))
        .route("/handlers", get(handlers))
        .route("/reload", post(reload))
}

/// Read the config file again and apply it as a diff (README "Reload"). 200 with what
/// changed (or `unchanged`); 422 with every problem when the file is invalid or a
/// target cannot be built (nothing changed then).
async fn reload(State(s): State<AdminState>) -> Response {
    match s.reloads.request().await {
        Some(outcome) => {
            let status = match outcome.result {
                "applied" | "unchanged" => StatusCode::OK,
                _ => StatusCode::UNPROCESSABLE_ENTITY,
            };
            (status, Json(outcome)).into_response()
        }
        None => error(StatusCode::SERVICE_UNAVAILABLE, "the router is stopping").into_response(),
    }
}

/// A refusal: its status and what to say, answered as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

pub fn error(status: StatusCode, message: impl Into<String>) -> ApiError {
    ApiError(status, message.into())
}

type Answer = Result<Json<Value>, ApiError>;

fn find(s: &AdminState, name: &str) -> Result<SubscriptionHandle, ApiError> {
    s.subscriptions.get(name).map_err(|_| {
        let all = s.subscriptions.all();
        let known: Vec<&str> = all.iter().map(SubscriptionHandle::name).collect();
        error(StatusCode::NOT_FOUND, format!("no subscription {name:?} (there are: {})", known.join(", ")))
    })
}

fn stamp(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

async fn status(State(s): State<AdminState>) -> Json<Value> {
    let info = s.info.read();
    let uptime = info.started.elapsed().unwrap_or_default();
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "config_hash": info.config_hash,
        "last_reload": info.last_reload,
        "started_at": stamp(info.started),
        "uptime_seconds": uptime.as_secs(),
        "ready": s.readiness.not_ready().is_empty(),
        "subscriptions": s.subscriptions.all().len(),
    }))
}

/// A subscription as the API shows it: its snapshot, totals and rates.
fn view(s: &AdminState, sub: &SubscriptionHandle) -> Value {
    let (totals, rates) = s.rates.of(sub.name());
    let mut v = serde_json::to_value(sub.snapshot()).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.insert("totals".into(), json!(totals));
        map.insert("rates".into(), json!(rates));
        map.insert("rate_window_seconds".into(), json!(super::rates::WINDOW.as_secs()));
    }
    v
}

async fn subscriptions(State(s): State<AdminState>) -> Json<Value> {
    let all: Vec<Value> = s.subscriptions.all().iter().map(|sub| view(&s, sub)).collect();
    Json(json!({ "subscriptions": all }))
}

async fn subscription(State(s): State<AdminState>, Path(name): Path<String>) -> Answer {
    let sub = find(&s, &name)?;
    Ok(Json(view(&s, &sub)))
}

/// `pause`, `resume`, `drain`: the new state at once (a drain goes on in the
/// background: the state says `draining`, then `drained`).
async fn control(State(s): State<AdminState>, Path((name, action)): Path<(String, String)>) -> Answer {
    let sub = find(&s, &name)?;
    match action.as_str() {
        "pause" => sub.pause(),
        "resume" => sub.resume(),
        "drain" => sub.drain(),
        other => {
            return Err(error(
                StatusCode::NOT_FOUND,
                format!("no action {other:?} on a subscription (there are: pause, resume, drain)"),
            ))
        }
    }
    tracing::info!(subscription = %name, action, "admin API");
    Ok(Json(view(&s, &sub)))
}

/// The filters of the dead-letter calls, as query parameters or a JSON body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Select {
    reason: Option<String>,
    route: Option<String>,
    since: Option<String>,
    until: Option<String>,
    /// One id (query string).
    id: Option<String>,
    #[serde(default)]
    ids: Vec<String>,
    limit: Option<usize>,
    /// Replay and purge: count only.
    #[serde(default)]
    dry_run: bool,
    /// Replay and purge without a filter: every dead letter of the subscription.
    #[serde(default)]
    all: bool,
    /// Replay: at most this many per second.
    rate: Option<f64>,
}

impl Select {
    fn filter(&self) -> Result<Filter, ApiError> {
        let bad = |what: &str, e: String| error(StatusCode::BAD_REQUEST, format!("{what}: {e}"));
        let mut ids = self.ids.clone();
        ids.extend(self.id.clone());
        for id in &ids {
            if id.is_empty() || id.len() > 512 || id.chars().any(char::is_control) {
                return Err(bad("ids", format!("{id:?} is not a dead-letter id (GET .../dead-letters shows them)")));
            }
        }
        Ok(Filter {
            reason: self.reason.as_deref().map(dlq::parse_regex).transpose().map_err(|e| bad("reason", e))?,
            route: self.route.clone(),
            since: self.since.as_deref().map(dlq::parse_time).transpose().map_err(|e| bad("since", e))?,
            until: self.until.as_deref().map(dlq::parse_time).transpose().map_err(|e| bad("until", e))?,
            ids,
        })
    }

    fn is_unfiltered(&self) -> bool {
        self.reason.is_none()
            && self.route.is_none()
            && self.since.is_none()
            && self.until.is_none()
            && self.id.is_none()
            && self.ids.is_empty()
    }
}

/// 409 when the broker cannot do this at all (a purge on a Kafka log), else 502.
fn broker_error(e: anyhow::Error) -> ApiError {
    let unsupported =
        e.chain().any(|c| matches!(c.downcast_ref::<TransportError>(), Some(TransportError::Unsupported(_))));
    let status = if unsupported { StatusCode::CONFLICT } else { StatusCode::BAD_GATEWAY };
    error(status, format!("{e:#}"))
}

fn letter(d: &DeadLetter, body: usize) -> Value {
    let router: serde_json::Map<String, Value> =
        d.router_headers().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    let other: serde_json::Map<String, Value> = d
        .message
        .headers
        .iter()
        .filter(|(k, _)| !k.starts_with("x-router-"))
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "id": d.id,
        "reason": d.reason(),
        "route": d.route(),
        "dead_lettered_at": d.when().map(stamp),
        "origin": d.origin(),
        "destination": d.destination,
        "message_id": d.message.id,
        "key": d.message.key,
        "content_type": d.message.content_type,
        "router_headers": router,
        "headers": other,
        "body_bytes": d.message.body.len(),
        "body": d.body_excerpt(body),
    })
}

async fn dead_letters(State(s): State<AdminState>, Path(name): Path<String>, Query(select): Query<Select>) -> Answer {
    let sub = find(&s, &name)?;
    let filter = select.filter()?;
    let limit = select.limit.unwrap_or(50).min(LIST_MAX);
    let (found, more) =
        dlq::collect(sub.transport().as_ref(), &sub.spec(), &filter, limit).await.map_err(broker_error)?;
    let list: Vec<Value> = found.iter().map(|d| letter(d, LIST_BODY)).collect();
    Ok(Json(json!({ "subscription": name, "dead_letters": list, "more": more })))
}

async fn dead_letter(State(s): State<AdminState>, Path((name, id)): Path<(String, String)>) -> Answer {
    let sub = find(&s, &name)?;
    let found = dlq::find(sub.transport().as_ref(), &sub.spec(), &id).await.map_err(broker_error)?;
    match found {
        Some(d) => Ok(Json(letter(&d, SHOW_BODY))),
        None => Err(error(StatusCode::NOT_FOUND, format!("no dead letter {id:?} in subscription {name:?}"))),
    }
}

/// Counts by reason and route; `limit` reads at most that many (the status page
/// asks for the top reasons of the first 500), `sampled` says the count stopped there.
async fn dead_letter_stats(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    Query(select): Query<Select>,
) -> Answer {
    let sub = find(&s, &name)?;
    let filter = select.filter()?;
    let limit = select.limit.unwrap_or(usize::MAX);
    let stats = dlq::stats_of(sub.transport().as_ref(), &sub.spec(), &filter, limit).await.map_err(broker_error)?;
    let ranked = |counts: &std::collections::BTreeMap<String, u64>| -> Vec<Value> {
        dlq::by_count(counts).into_iter().map(|(k, n)| json!({ "name": k, "count": n })).collect()
    };
    Ok(Json(json!({
        "subscription": name,
        "count": stats.count,
        "sampled": limit != usize::MAX && stats.count as usize >= limit,
        "by_reason": ranked(&stats.by_reason),
        "by_route": ranked(&stats.by_route),
        "oldest": stats.oldest.map(stamp),
        "newest": stats.newest.map(stamp),
    })))
}

async fn replay(state: State<AdminState>, name: Path<String>, body: axum::body::Bytes) -> Answer {
    rework(state, name, body, Rework::Replay).await
}

async fn purge(state: State<AdminState>, name: Path<String>, body: axum::body::Bytes) -> Answer {
    rework(state, name, body, Rework::Purge).await
}

/// Replay or purge what the body selects. Nothing selected (no filter and not
/// `all: true`), or a selection that matches nothing, is an error that changed nothing.
async fn rework(State(s): State<AdminState>, Path(name): Path<String>, body: axum::body::Bytes, act: Rework) -> Answer {
    let sub = find(&s, &name)?;
    // Read here rather than by axum's extractor, so a malformed body gets the same
    // JSON error as every other refusal, whatever its Content-Type.
    let select: Select = if body.iter().all(u8::is_ascii_whitespace) {
        Select::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("the body must be a JSON selection: {e}")))?
    };
    let verb = if act == Rework::Replay { "replay" } else { "purge" };
    if select.is_unfiltered() && !select.all {
        return Err(error(
            StatusCode::BAD_REQUEST,
            format!("say which dead letters to {verb}: ids, reason, route, since/until, or \"all\": true"),
        ));
    }
    let pace = match select.rate {
        None => Duration::ZERO,
        Some(r) if r.is_finite() && r > 0.0 => Duration::from_secs_f64(1.0 / r),
        Some(r) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("rate {r} must be a number of messages per second above 0"),
            ))
        }
    };
    let filter = select.filter()?;
    let job =
        ReworkJob { act, limit: select.limit.unwrap_or(usize::MAX), pace, dry_run: select.dry_run, progress: false };
    // One walk: a selection that matches nothing changes nothing, and says so.
    let done = dlq::rework_one(sub.transport().as_ref(), &sub.spec(), &filter, &job).await.map_err(broker_error)?;
    if done == 0 {
        return Err(error(StatusCode::NOT_FOUND, format!("no dead letter of {name:?} matches; nothing changed")));
    }
    if select.dry_run {
        return Ok(Json(json!({ "subscription": name, "dry_run": true, "matching": done })));
    }
    tracing::info!(subscription = %name, action = verb, done, "admin API: dead letters");
    let key = if act == Rework::Replay { "replayed" } else { "purged" };
    Ok(Json(json!({ "subscription": name, key: done })))
}

/// Each handler: its target type, the circuit of its breaker and its endpoints'
/// health, as the metrics say (endpoints are shown without credentials).
async fn handlers(State(s): State<AdminState>) -> Json<Value> {
    let (mut circuits, mut endpoints) = (std::collections::HashMap::new(), std::collections::HashMap::new());
    for family in s.metrics.registry.gather() {
        let label = |m: &prometheus::proto::Metric, name: &str| {
            m.get_label().iter().find(|l| l.name() == name).map(|l| l.value().to_string()).unwrap_or_default()
        };
        match family.name() {
            "router_circuit_state" => {
                for m in family.get_metric() {
                    let state = match m.get_gauge().get_value() as i64 {
                        1 => "open",
                        2 => "half_open",
                        _ => "closed",
                    };
                    circuits.insert(label(m, "handler"), state);
                }
            }
            "router_endpoint_up" => {
                for m in family.get_metric() {
                    endpoints
                        .entry(label(m, "handler"))
                        .or_insert_with(Vec::new)
                        .push(json!({ "endpoint": label(m, "endpoint"), "up": m.get_gauge().get_value() >= 1.0 }));
                }
            }
            _ => {}
        }
    }
    let all: Vec<Value> = s
        .info
        .read()
        .handlers
        .iter()
        .map(|(name, kind)| {
            json!({
                "name": name,
                "type": kind,
                "circuit": circuits.get(name).copied().unwrap_or("closed"),
                "endpoints": endpoints.remove(name).unwrap_or_default(),
            })
        })
        .collect();
    Json(json!({ "handlers": all }))
}
