//! The HTTP target: delivers to a pool of handler endpoints (PHP-FPM pods, `php -S`,
//! anything that speaks HTTP).
//!
//! - `config.rs`: the handler section of `type: http` (endpoints, balance, signing).
//! - `contract.rs`: request headers and the status → outcome table (the FastCGI
//!   target carries the same contract).
//!
//! Endpoint selection and passive health: `crate::pool`.
//!
//! A connection failure means the request never reached a handler, so it is safe to
//! try the next endpoint within the same attempt: a dead pod costs a retry of the
//! connect, not an attempt of the message.

pub mod config;
pub mod contract;

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use router_core::{DeliveryInfo, Outcome, Target};

use crate::pool::{Endpoint, Pool};
use config::HttpConfig;

pub struct HttpTarget {
    name: String,
    client: reqwest::Client,
    pool: Pool,
    timeout: Duration,
    /// Signing keys, the current one first; empty: requests go unsigned.
    secrets: Vec<Vec<u8>>,
}

impl HttpTarget {
    /// A target for handler `name`, with `timeout` per request. `up` is the
    /// `router_endpoint_up` gauge family.
    pub fn new(
        name: &str,
        config: &HttpConfig,
        timeout: Duration,
        client: reqwest::Client,
        up: &prometheus::IntGaugeVec,
    ) -> Result<Self, String> {
        let mut endpoints = Vec::new();
        for e in &config.endpoints {
            let url = reqwest::Url::parse(e).map_err(|err| format!("handlers.{name}.endpoints: {e:?}: {err}"))?;
            endpoints.push(Endpoint::new(url, up.with_label_values(&[name, crate::pool::endpoint_label(e).as_str()])));
        }
        Ok(HttpTarget {
            name: name.to_string(),
            client,
            pool: Pool::new(endpoints, config.balance),
            timeout,
            secrets: config.signing.as_ref().map(|s| s.keys()).unwrap_or_default(),
        })
    }
}

#[async_trait]
impl Target for HttpTarget {
    async fn deliver(&self, d: DeliveryInfo<'_>) -> Outcome {
        let headers = match contract::request_headers(&d, &self.secrets) {
            Ok(h) => h,
            Err(reason) => return Outcome::Undeliverable { reason },
        };
        let mut tried = Vec::new();
        let mut last_error = String::from("no endpoints configured");
        while let Some(i) = self.pool.pick(&tried) {
            tried.push(i);
            let endpoint = &self.pool.endpoints[i];
            let _in_flight = endpoint.start();
            let sent = self
                .client
                .post(endpoint.url.clone())
                .headers(headers.clone())
                .body(d.message.body.clone())
                .timeout(self.timeout)
                .send()
                .await;
            let mut response = match sent {
                Ok(r) => r,
                Err(e) if e.is_connect() => {
                    last_error = endpoint.unreachable(&self.name, "endpoint", &e);
                    continue;
                }
                Err(e) if e.is_timeout() => {
                    return Outcome::Retry {
                        after: None,
                        error: format!("{}: no answer within {:?}", endpoint.label, self.timeout),
                    };
                }
                Err(e) => {
                    return Outcome::Retry {
                        after: None,
                        error: format!("{}: request failed: {}", endpoint.label, e.without_url()),
                    }
                }
            };
            endpoint.mark_up();
            router_core::trace::record_endpoint("http", &endpoint.label);
            let status = response.status();
            router_core::trace::record_status(status.as_u16());
            let retry_after = response.headers().get(reqwest::header::RETRY_AFTER).cloned();
            // Read (a bounded part of) the body: the excerpt explains failures, and a
            // fully read small body lets the connection be reused.
            let mut excerpt = Vec::new();
            while excerpt.len() < 64 * 1024 {
                match tokio::time::timeout(self.timeout, response.chunk()).await {
                    Ok(Ok(Some(chunk))) => excerpt.extend_from_slice(&chunk),
                    _ => break,
                }
            }
            excerpt.truncate(contract::EXCERPT_BYTES);
            return contract::outcome(status, retry_after.as_ref(), &excerpt, SystemTime::now());
        }
        Outcome::Retry { after: None, error: format!("no endpoint of handler {:?} reachable: {last_error}", self.name) }
    }
}
