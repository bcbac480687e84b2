//! What every bench HTTP client sends: the headers the router would send (HTTP
//! contract), and one POST that must answer 2xx.

use anyhow::{bail, Context, Result};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// The headers the router sends for the first delivery of a message with the id
/// `m-12345` from `key` (a queue or stream) through the subscription `main` and
/// handler `php` (HTTP contract); the broker adds its own (`x-message-header-*`).
/// wrk and the bench's own clients send these, so the handler does the same work.
pub fn router_headers(
    content_type: &str,
    source: &str,
    key: &str,
    time: &str,
    route: &str,
) -> Vec<(&'static str, String)> {
    vec![
        ("content-type", content_type.into()),
        ("ce-specversion", "1.0".into()),
        ("ce-id", "m-12345".into()),
        ("ce-source", source.into()),
        ("ce-type", key.into()),
        ("ce-time", time.into()),
        ("x-router-key", key.into()),
        ("x-router-attempt", "1".into()),
        ("x-router-route", route.into()),
        ("x-router-subscription", "main".into()),
        ("x-router-handler", "php".into()),
    ]
}

/// `headers` as a header map.
pub fn header_map(headers: &[(&str, String)]) -> Result<HeaderMap> {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        add(&mut h, k, v)?;
    }
    Ok(h)
}

/// Set header `name` (lower case) to `value`.
pub fn add(h: &mut HeaderMap, name: &str, value: &str) -> Result<()> {
    let n = HeaderName::from_bytes(name.as_bytes()).with_context(|| format!("header name {name:?}"))?;
    let v = HeaderValue::from_str(value).with_context(|| format!("value of header {name:?}"))?;
    h.insert(n, v);
    Ok(())
}

/// POST `body` to `url` and read the answer; an error unless it is a 2xx.
pub async fn post(
    client: &reqwest::Client,
    url: &str,
    headers: HeaderMap,
    body: impl Into<reqwest::Body>,
) -> Result<()> {
    let r = client.post(url).headers(headers).body(body).send().await?;
    let status = r.status();
    let _ = r.bytes().await;
    if !status.is_success() {
        bail!("the handler answered {status}");
    }
    Ok(())
}
