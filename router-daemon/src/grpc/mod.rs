//! The gRPC target: each delivery attempt is one unary call
//! `message_router.v1.Handler/Deliver` (proto/message_router/v1/handler.proto), so
//! handlers can be written in any language with a gRPC server.
//!
//! - `config.rs`: the handler section of `type: grpc`.
//!
//! The request carries the HTTP contract's headers in its `headers` map, and the body,
//! id, attempt and route as fields; the deadline is the handler's `timeout`. The answer
//! is explicit (`ACK`, `RETRY` with an optional delay, `REJECT` with a reason), or the
//! call fails with a status code, mapped through the HTTP status table via the usual
//! gRPC ↔ HTTP correspondence ([`http_status`]). One HTTP/2 channel per endpoint
//! multiplexes the calls (bounded by `max_in_flight`); endpoints are balanced and a
//! refused connection tries the next one, as for HTTP.

pub mod config;

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use reqwest::header::HeaderValue;
use reqwest::StatusCode;
use router_core::{DeliveryInfo, Outcome, Target};
use tonic::transport::Channel;
use tonic::Code;

use crate::http::contract;
use crate::pool::{Endpoint, Pool};
use config::GrpcConfig;

/// The code generated from the proto.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("message_router.v1");
}

use v1::deliver_response::Result as Answer;
use v1::handler_client::HandlerClient;

/// Largest message either way (a body may be up to `max_body_bytes`, 16 MiB default).
const MAX_MESSAGE: usize = 64 * 1024 * 1024;

pub struct GrpcTarget {
    name: String,
    pool: Pool,
    /// Per endpoint (same index as `pool.endpoints`): its channel.
    channels: Vec<Channel>,
    timeout: Duration,
    secrets: Vec<Vec<u8>>,
}

impl GrpcTarget {
    /// A target for handler `name`. `up` is the `router_endpoint_up` gauge family.
    /// Channels connect lazily (on first call) and reconnect by themselves.
    pub fn new(
        name: &str,
        config: &GrpcConfig,
        timeout: Duration,
        up: &prometheus::IntGaugeVec,
    ) -> Result<Self, String> {
        let mut endpoints = Vec::new();
        let mut channels = Vec::new();
        for e in &config.endpoints {
            let bad = |err: String| format!("handlers.{name}.endpoints: {e:?}: {err}");
            let url = reqwest::Url::parse(e).map_err(|err| bad(err.to_string()))?;
            let channel = tonic::transport::Endpoint::from_shared(e.clone())
                .map_err(|err| bad(err.to_string()))?
                .connect_timeout(Duration::from_secs(5))
                .tcp_nodelay(true)
                .connect_lazy();
            endpoints.push(Endpoint::new(url, up.with_label_values(&[name, crate::pool::endpoint_label(e).as_str()])));
            channels.push(channel);
        }
        Ok(GrpcTarget {
            name: name.to_string(),
            pool: Pool::new(endpoints, config.balance),
            channels,
            timeout,
            secrets: config.signing.as_ref().map(|s| s.keys()).unwrap_or_default(),
        })
    }
}

/// The HTTP status a gRPC status code stands for (gRPC's own HTTP mapping), so one
/// table decides: 4xx dead-letters, 429/503 honour a delay, 5xx retries.
pub fn http_status(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound => 404,
        Code::AlreadyExists => 409,
        Code::ResourceExhausted => 429,
        // Aborted (a concurrency conflict) and Cancelled are worth another attempt.
        Code::Aborted | Code::Cancelled | Code::Unknown | Code::Internal | Code::DataLoss => 500,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        Code::DeadlineExceeded => 504,
    }
}

/// Whether the call failed because no connection could be made (nothing reached the
/// handler, so another endpoint may be tried within the same attempt).
fn not_connected(status: &tonic::Status) -> bool {
    if status.code() != Code::Unavailable {
        return false;
    }
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(io.kind(), std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound) {
                return true;
            }
        }
        source = e.source();
    }
    status.message().contains("connect error")
}

#[async_trait]
impl Target for GrpcTarget {
    async fn deliver(&self, d: DeliveryInfo<'_>) -> Outcome {
        let headers = match contract::request_headers(&d, &self.secrets) {
            Ok(h) => h,
            Err(reason) => return Outcome::Undeliverable { reason },
        };
        let request = v1::DeliverRequest {
            id: d.message.id.clone(),
            body: d.message.body.clone(),
            content_type: d.message.content_type.clone().unwrap_or_else(|| "application/octet-stream".into()),
            headers: headers
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect(),
            attempt: d.attempt,
            subscription: d.subscription.to_string(),
            route: d.route.to_string(),
            handler: d.handler.to_string(),
        };
        let mut tried = Vec::new();
        let mut last_error = String::from("no endpoints configured");
        while let Some(i) = self.pool.pick(&tried) {
            tried.push(i);
            let endpoint = &self.pool.endpoints[i];
            let _in_flight = endpoint.start();
            let mut client = HandlerClient::new(self.channels[i].clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
            let mut call = tonic::Request::new(request.clone());
            call.set_timeout(self.timeout);
            let answer = match tokio::time::timeout(self.timeout, client.deliver(call)).await {
                Err(_) => Err(None),
                Ok(Ok(response)) => Ok(response.into_inner()),
                Ok(Err(status)) if not_connected(&status) => {
                    last_error = endpoint.unreachable(&self.name, "gRPC handler", &status.message());
                    continue;
                }
                Ok(Err(status)) => Err(Some(status)),
            };
            endpoint.mark_up();
            router_core::trace::record_endpoint("grpc", &endpoint.label);
            router_core::trace::record_grpc_status(match &answer {
                Ok(_) => Code::Ok as i32,
                Err(Some(s)) => s.code() as i32,
                Err(None) => Code::DeadlineExceeded as i32,
            });
            return match answer {
                Ok(r) => match Answer::try_from(r.result) {
                    Ok(Answer::Ack) => Outcome::Ack,
                    Ok(Answer::Retry) => Outcome::Retry {
                        after: (r.retry_after_ms > 0).then(|| Duration::from_millis(r.retry_after_ms)),
                        error: format!("handler asked to retry: {}", r.reason),
                    },
                    Ok(Answer::Reject) => Outcome::Reject { reason: format!("rejected by handler: {}", r.reason) },
                    Err(_) => {
                        Outcome::Retry { after: None, error: format!("unknown result {} from the handler", r.result) }
                    }
                },
                // Our deadline (tonic reports it as Cancelled, "Timeout expired").
                Err(None) => Outcome::Retry {
                    after: None,
                    error: format!("{}: no answer within {:?}", endpoint.label, self.timeout),
                },
                Err(Some(s)) if s.code() == Code::Cancelled && s.message().contains("Timeout expired") => {
                    Outcome::Retry {
                        after: None,
                        error: format!("{}: no answer within {:?}", endpoint.label, self.timeout),
                    }
                }
                Err(Some(s)) => {
                    let status =
                        StatusCode::from_u16(http_status(s.code())).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    let retry_after =
                        s.metadata().get("retry-after").and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok());
                    let text = format!("gRPC {:?}: {}", s.code(), s.message());
                    contract::outcome(status, retry_after.as_ref(), text.as_bytes(), SystemTime::now())
                }
            };
        }
        Outcome::Retry {
            after: None,
            error: format!("no gRPC server of handler {:?} reachable: {last_error}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_like_http_statuses() {
        let outcome = |code| {
            contract::outcome(StatusCode::from_u16(http_status(code)).expect("status"), None, b"x", SystemTime::now())
        };
        for code in [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::OutOfRange,
            Code::PermissionDenied,
            Code::NotFound,
            Code::Unauthenticated,
            Code::AlreadyExists,
        ] {
            assert!(matches!(outcome(code), Outcome::Reject { .. }), "{code:?} dead-letters");
        }
        for code in [
            Code::Unavailable,
            Code::ResourceExhausted,
            Code::Internal,
            Code::Unknown,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::Cancelled,
            Code::Unimplemented,
            Code::DataLoss,
        ] {
            assert!(matches!(outcome(code), Outcome::Retry { .. }), "{code:?} retries");
        }
    }
}
