//! The FastCGI target: delivers straight to PHP-FPM pools, as nginx would, without a
//! web server in between.
//!
//! - `config.rs`: the handler section of `type: fastcgi`.
//! - `proto.rs`: the record protocol and CGI output parsing.
//!
//! The delivery contract is the HTTP one (`crate::http::contract`): every request
//! header becomes the CGI variable PHP expects (`ce-id` → `HTTP_CE_ID`,
//! `content-type` → `CONTENT_TYPE`), so `$_SERVER`, `getallheaders()`, the bridge's
//! `front.php` and the Symfony delivery controller see what they would see behind
//! nginx. The answer's `Status:` header (absent: 200) and `Retry-After` go through
//! the same status table.
//!
//! Connections are kept alive and reused, one request at a time each (PHP-FPM does
//! not multiplex), at most `max_connections` per endpoint: a kept connection holds one
//! FPM worker, so that must not exceed the pool's `pm.max_children` (a request beyond
//! it waits here for a connection, within the handler timeout, rather than in FPM's
//! backlog behind workers pinned by idle connections). As for HTTP, a refused connection marks
//! the endpoint down and the next one is tried within the same attempt; a timeout or
//! a connection lost mid-request is a failed attempt. A reused connection that turns
//! out closed before any byte of the answer (a worker recycled after
//! `pm.max_requests`) is replaced and the request sent once more.

pub mod config;
pub mod proto;

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use parking_lot::Mutex;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::StatusCode;
use router_core::{DeliveryInfo, Outcome, Target};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::warn;

use crate::http::contract;
use crate::pool::{Endpoint, Pool};
use config::{Address, FastcgiConfig};

/// A connection to one FPM pool, TCP or unix socket.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Conn = Box<dyn Io>;

/// Answer bytes kept: enough for the headers and the excerpt of a failure.
const STDOUT_CAP: usize = 64 * 1024;
/// Longest wait for a connection to an FPM pool (within the handler timeout).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest stderr text logged per record.
const STDERR_LOGGED: usize = 2000;

/// One endpoint's connections.
struct Socket {
    address: Address,
    /// Connections open to it, in use or idle: `max_connections` permits.
    slots: tokio::sync::Semaphore,
    idle: Mutex<Vec<Conn>>,
}

pub struct FastcgiTarget {
    name: String,
    pool: Pool,
    /// Per endpoint (same index as `pool.endpoints`).
    sockets: Vec<Socket>,
    /// CGI variables every request carries.
    base: Vec<(Vec<u8>, Vec<u8>)>,
    timeout: Duration,
    secrets: Vec<Vec<u8>>,
}

impl FastcgiTarget {
    /// A target for handler `name`. `up` is the `router_endpoint_up` gauge family;
    /// `max_in_flight` the most the handler's limit can reach (an adaptive limit's
    /// `max`), the default pool size.
    pub fn new(
        name: &str,
        config: &FastcgiConfig,
        timeout: Duration,
        max_in_flight: usize,
        up: &prometheus::IntGaugeVec,
    ) -> Result<Self, String> {
        let max_connections = config.max_connections.unwrap_or(max_in_flight).max(1);
        let mut endpoints = Vec::new();
        let mut sockets = Vec::new();
        for e in &config.endpoints {
            let address = Address::parse(e).map_err(|err| format!("handlers.{name}.endpoints: {e:?}: {err}"))?;
            let url = reqwest::Url::parse(e).map_err(|err| format!("handlers.{name}.endpoints: {e:?}: {err}"))?;
            endpoints.push(Endpoint::new(url, up.with_label_values(&[name, crate::pool::endpoint_label(e).as_str()])));
            sockets.push(Socket {
                address,
                slots: tokio::sync::Semaphore::new(max_connections),
                idle: Mutex::new(Vec::new()),
            });
        }
        let document_root = config.script_filename.rsplit_once('/').map_or("/", |(dir, _)| dir).to_string();
        let mut base: Vec<(String, String)> = vec![
            ("GATEWAY_INTERFACE".into(), "CGI/1.1".into()),
            ("SERVER_SOFTWARE".into(), concat!("message-router/", env!("CARGO_PKG_VERSION")).into()),
            ("SERVER_PROTOCOL".into(), "HTTP/1.1".into()),
            ("REQUEST_METHOD".into(), "POST".into()),
            ("SCRIPT_FILENAME".into(), config.script_filename.clone()),
            ("SCRIPT_NAME".into(), config.script_name()),
            ("DOCUMENT_ROOT".into(), if document_root.is_empty() { "/".into() } else { document_root }),
            ("REQUEST_URI".into(), config.request_uri.clone()),
            ("DOCUMENT_URI".into(), config.request_uri.clone()),
            ("QUERY_STRING".into(), String::new()),
            ("SERVER_NAME".into(), "message-router".into()),
            ("REMOTE_ADDR".into(), "127.0.0.1".into()),
        ];
        base.extend(config.params.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(FastcgiTarget {
            name: name.to_string(),
            pool: Pool::new(endpoints, config.balance),
            sockets,
            base: base.into_iter().map(|(k, v)| (k.into_bytes(), v.into_bytes())).collect(),
            timeout,
            secrets: config.signing.as_ref().map(|s| s.keys()).unwrap_or_default(),
        })
    }

    /// One request's bytes: the fixed CGI variables, `CONTENT_LENGTH`, each header as
    /// its variable, then the body.
    fn request(&self, headers: &HeaderMap, body: &[u8]) -> Vec<u8> {
        let length = body.len().to_string();
        let names: Vec<(Vec<u8>, &[u8])> =
            headers.iter().map(|(name, value)| (cgi_name(name.as_str()), value.as_bytes())).collect();
        let params = self
            .base
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .chain(std::iter::once((&b"CONTENT_LENGTH"[..], length.as_bytes())))
            .chain(names.iter().map(|(k, v)| (k.as_slice(), *v)));
        proto::request(params, body)
    }
}

/// The CGI variable of a request header: `CONTENT_TYPE`, else `HTTP_` and the name in
/// upper case with `-` as `_`.
fn cgi_name(header: &str) -> Vec<u8> {
    let upper = header.to_ascii_uppercase().replace('-', "_");
    if upper == "CONTENT_TYPE" || upper == "CONTENT_LENGTH" {
        upper.into_bytes()
    } else {
        format!("HTTP_{upper}").into_bytes()
    }
}

async fn connect(address: &Address) -> std::io::Result<Conn> {
    let connect = async {
        Ok::<Conn, std::io::Error>(match address {
            Address::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Address::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await?),
        })
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
}

#[async_trait]
impl Target for FastcgiTarget {
    async fn deliver(&self, d: DeliveryInfo<'_>) -> Outcome {
        let headers = match contract::request_headers(&d, &self.secrets) {
            Ok(h) => h,
            Err(reason) => return Outcome::Undeliverable { reason },
        };
        let request = self.request(&headers, &d.message.body);
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut tried = Vec::new();
        let mut last_error = String::from("no endpoints configured");
        while let Some(i) = self.pool.pick(&tried) {
            tried.push(i);
            let endpoint = &self.pool.endpoints[i];
            let socket = &self.sockets[i];
            let _in_flight = endpoint.start();
            let Ok(Ok(_slot)) = tokio::time::timeout_at(deadline, socket.slots.acquire()).await else {
                return Outcome::Retry {
                    after: None,
                    error: format!(
                        "{}: no connection free within {:?} (max_connections in use)",
                        endpoint.url, self.timeout
                    ),
                };
            };
            // A kept connection first; when it proves closed before answering, a new one.
            let mut kept = socket.idle.lock().pop();
            let answer = loop {
                let reused = kept.is_some();
                let mut conn = match kept.take() {
                    Some(c) => c,
                    None => match connect(&socket.address).await {
                        Ok(c) => c,
                        Err(e) => break Err(e),
                    },
                };
                match tokio::time::timeout_at(deadline, proto::exchange(&mut conn, &request, STDOUT_CAP)).await {
                    Err(_) => {
                        return Outcome::Retry {
                            after: None,
                            error: format!("{}: no answer within {:?}", endpoint.label, self.timeout),
                        }
                    }
                    Ok(Err(proto::ReadError::Closed { received: 0, .. })) if reused => continue,
                    Ok(Err(e)) => {
                        return Outcome::Retry {
                            after: None,
                            error: format!("{}: request failed: {e}", endpoint.label),
                        }
                    }
                    Ok(Ok(response)) => break Ok((conn, response)),
                }
            };
            let (conn, response) = match answer {
                Ok(a) => a,
                Err(e) => {
                    last_error = endpoint.unreachable(&self.name, "PHP-FPM", &e);
                    continue;
                }
            };
            endpoint.mark_up();
            router_core::trace::record_endpoint("fastcgi", &endpoint.label);
            for text in &response.stderr {
                let text: String = text.chars().take(STDERR_LOGGED).collect();
                warn!(handler = %self.name, endpoint = %endpoint.label, id = %d.message.id, stderr = %text.trim_end(), "PHP-FPM wrote to stderr");
            }
            if response.protocol_status != 0 {
                // Overloaded, or a request it cannot take: nothing ran.
                return Outcome::Retry {
                    after: None,
                    error: format!(
                        "{}: PHP-FPM refused the request (protocol status {})",
                        endpoint.url, response.protocol_status
                    ),
                };
            }
            socket.idle.lock().push(conn);
            return match proto::parse_cgi(&response.stdout) {
                Ok(cgi) => {
                    router_core::trace::record_status(cgi.status);
                    let status = StatusCode::from_u16(cgi.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    let retry_after = cgi
                        .headers
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
                        .and_then(|(_, v)| HeaderValue::from_str(v).ok());
                    let excerpt = &cgi.body[..cgi.body.len().min(contract::EXCERPT_BYTES)];
                    contract::outcome(status, retry_after.as_ref(), excerpt, SystemTime::now())
                }
                Err(e) => Outcome::Retry { after: None, error: format!("{}: {e}", endpoint.label) },
            };
        }
        Outcome::Retry {
            after: None,
            error: format!("no PHP-FPM pool of handler {:?} reachable: {last_error}", self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_become_cgi_variables() {
        assert_eq!(cgi_name("ce-id"), b"HTTP_CE_ID");
        assert_eq!(cgi_name("x-router-attempt"), b"HTTP_X_ROUTER_ATTEMPT");
        assert_eq!(cgi_name("content-type"), b"CONTENT_TYPE");
        assert_eq!(cgi_name("x-message-header-behave"), b"HTTP_X_MESSAGE_HEADER_BEHAVE");
    }
}
