//! The HTTP delivery contract (README "HTTP contract").
//!
//! Request: `POST`, body = message body, CloudEvents binary-mode `ce-*` headers,
//! router metadata in `x-router-*`, message headers as `x-message-header-<name>`,
//! W3C `traceparent`/`tracestate` (with tracing on, `traceparent` is the router's
//! attempt span, a child of the message's), optional HMAC signature (one per key:
//! `signing.previous_secret` adds the second during a rotation).
//!
//! Response → [`Outcome`]:
//!
//! | status                  | outcome                                           |
//! |-------------------------|---------------------------------------------------|
//! | 2xx                     | ack                                               |
//! | 429, 503                | retry after `Retry-After` (or the policy's delay) |
//! | 408, other 5xx          | retry per policy                                  |
//! | other 4xx               | reject: dead-letter now                           |
//! | 1xx, 3xx                | retry per policy (a misconfigured endpoint)       |

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use reqwest::StatusCode;
use router_core::message::rfc3339;
use router_core::{DeliveryInfo, Outcome};
use sha2::Sha256;

/// Prefix under which message headers travel as HTTP headers.
pub const MESSAGE_HEADER_PREFIX: &str = "x-message-header-";
/// Prefix of a message header whose name is no HTTP token (Symfony Messenger's
/// `X-Message-Stamp-App\Stamp\Foo`): the name follows in lowercase hex, which survives
/// HTTP's case folding and FastCGI's `HTTP_NAME` variables byte for byte.
pub const MESSAGE_HEX_HEADER_PREFIX: &str = "x-message-hex-header-";
/// How much of an error response body goes into the failure reason.
pub const EXCERPT_BYTES: usize = 512;

/// Headers for one delivery. A message header whose value cannot be expressed in HTTP
/// (control characters) is an error: the caller rejects the message with this reason
/// rather than dropping the header silently. A name that is not a token travels
/// hex-encoded ([`MESSAGE_HEX_HEADER_PREFIX`]). `secrets`:
/// the signing keys, the current one first (none: unsigned).
pub fn request_headers(d: &DeliveryInfo<'_>, secrets: &[Vec<u8>]) -> Result<HeaderMap, String> {
    let m = d.message;
    let mut h = HeaderMap::new();
    let mut put = |name: &str, value: &str| -> Result<(), String> {
        let n = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("header name {name:?} cannot be sent over HTTP"))?;
        let v =
            HeaderValue::from_str(value).map_err(|_| format!("value of header {name:?} cannot be sent over HTTP"))?;
        h.insert(n, v);
        Ok(())
    };
    put(CONTENT_TYPE.as_str(), m.content_type.as_deref().unwrap_or("application/octet-stream"))?;
    put("ce-specversion", "1.0")?;
    put("ce-id", &m.id)?;
    put("ce-source", &m.source)?;
    put(
        "ce-type",
        m.kind.as_deref().or(m.key.as_deref()).filter(|t| !t.is_empty()).unwrap_or("message-router.message"),
    )?;
    if let Some(t) = m.timestamp.filter(|t| rfc3339_writes(*t)) {
        put("ce-time", &rfc3339(t))?;
    }
    if let Some(key) = &m.key {
        put("x-router-key", key)?;
    }
    put("x-router-attempt", &d.attempt.to_string())?;
    put("x-router-route", d.route)?;
    put("x-router-subscription", d.subscription)?;
    put("x-router-handler", d.handler)?;
    if let Some(tp) = d.traceparent {
        put("traceparent", tp)?;
    }
    for (k, v) in &m.headers {
        let lower = k.to_ascii_lowercase();
        if (lower == "traceparent" && d.traceparent.is_none()) || lower == "tracestate" {
            put(&lower, v)?;
        }
        let plain = format!("{MESSAGE_HEADER_PREFIX}{lower}");
        if HeaderName::from_bytes(plain.as_bytes()).is_err() {
            put(&format!("{MESSAGE_HEX_HEADER_PREFIX}{}", hex::encode(k)), v)?;
        } else if lower.starts_with("x-router-") {
            // The router's own bookkeeping from an earlier attempt (a retry copy's
            // last error may hold a handler's multi-line answer): informative, never
            // a reason to refuse the message. Control characters become spaces.
            let clean: String = v.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
            put(&plain, &clean)?;
        } else {
            put(&plain, v)?;
        }
    }
    if !secrets.is_empty() {
        let ts = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0).to_string();
        put("x-router-timestamp", &ts)?;
        put("x-router-signature", &signature(secrets, &ts, &m.body))?;
    }
    Ok(h)
}

/// The `x-router-signature` value: one [`sign`] per key, joined by `", "`
/// (`v1=<current>, v1=<previous>` during a rotation; a single `v1=...` otherwise).
/// An endpoint accepts the request when any of them matches any key it knows.
pub fn signature(secrets: &[Vec<u8>], timestamp: &str, body: &[u8]) -> String {
    secrets.iter().map(|s| sign(s, timestamp, body)).collect::<Vec<_>>().join(", ")
}

/// Whether [`rfc3339`] can write `t` (1970 to 9999; it panics outside). A producer's
/// timestamp outside that range leaves `ce-time` out rather than crash the delivery.
fn rfc3339_writes(t: SystemTime) -> bool {
    t.duration_since(UNIX_EPOCH).is_ok_and(|d| d.as_secs() < 253_402_300_800)
}

/// `v1=` + hex(HMAC-SHA256(secret, "<timestamp>." + body)). Endpoints recompute it and
/// refuse requests whose timestamp is too old (replays).
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    // HMAC accepts keys of any length; the error branch cannot happen.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else { return String::new() };
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Map a response onto an outcome. `excerpt` is the start of the response body.
pub fn outcome(status: StatusCode, retry_after: Option<&HeaderValue>, excerpt: &[u8], now: SystemTime) -> Outcome {
    let describe = || {
        let text = String::from_utf8_lossy(excerpt);
        let text = text.trim();
        if text.is_empty() {
            format!("HTTP {}", status.as_u16())
        } else {
            format!("HTTP {}: {text}", status.as_u16())
        }
    };
    match status.as_u16() {
        200..=299 => Outcome::Ack,
        429 | 503 => Outcome::Retry { after: retry_after.and_then(|v| parse_retry_after(v, now)), error: describe() },
        408 | 500..=599 => Outcome::Retry { after: None, error: describe() },
        400..=499 => Outcome::Reject { reason: describe() },
        _ => Outcome::Retry { after: None, error: format!("unexpected {}", describe()) },
    }
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn parse_retry_after(v: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let s = v.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(s).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use router_core::Message;

    #[test]
    fn routers_own_headers_from_an_earlier_attempt_are_cleaned_not_refused() {
        let mut m = Message { id: "m-1".into(), ..Message::default() };
        m.headers.insert("x-router-last-error".into(), "HTTP 500: boom\n#0 trace".into());
        let d =
            DeliveryInfo { message: &m, attempt: 2, subscription: "s", route: "r", handler: "h", traceparent: None };
        let h = request_headers(&d, &[]).expect("sent");
        assert_eq!(h["x-message-header-x-router-last-error"], "HTTP 500: boom #0 trace");
        m.headers.insert("note".into(), "a\nb".into());
        let d =
            DeliveryInfo { message: &m, attempt: 2, subscription: "s", route: "r", handler: "h", traceparent: None };
        assert!(request_headers(&d, &[]).is_err(), "a producer's header still makes it poison");
    }

    #[test]
    fn a_header_name_that_is_no_token_travels_hex_encoded() {
        let mut m = Message { id: "m-1".into(), ..Message::default() };
        let stamp = "X-Message-Stamp-Symfony\\Component\\Messenger\\Stamp\\BusNameStamp";
        m.headers.insert(stamp.into(), r#"[{"busName":"messenger.bus.default"}]"#.into());
        m.headers.insert("Type".into(), "App\\Message\\Ping".into());
        let d =
            DeliveryInfo { message: &m, attempt: 1, subscription: "s", route: "r", handler: "h", traceparent: None };
        let h = request_headers(&d, &[]).expect("sent");
        let name = format!("{MESSAGE_HEX_HEADER_PREFIX}{}", hex::encode(stamp));
        assert_eq!(h[name.as_str()], r#"[{"busName":"messenger.bus.default"}]"#);
        assert_eq!(h["x-message-header-type"], "App\\Message\\Ping", "a token name is sent as before");
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert!(!names.iter().any(|n| n.contains("stamp")), "no plain copy: {names:?}");
    }

    #[test]
    fn maps_statuses_per_contract() {
        let now = SystemTime::now();
        let st = |c: u16| StatusCode::from_u16(c).expect("status");
        let ra = HeaderValue::from_static("7");
        assert_eq!(outcome(st(200), None, b"", now), Outcome::Ack);
        assert_eq!(outcome(st(204), None, b"", now), Outcome::Ack);
        assert_eq!(
            outcome(st(429), Some(&ra), b"slow down", now),
            Outcome::Retry { after: Some(Duration::from_secs(7)), error: "HTTP 429: slow down".into() }
        );
        assert_eq!(outcome(st(503), None, b"", now), Outcome::Retry { after: None, error: "HTTP 503".into() });
        assert_eq!(
            outcome(st(500), Some(&ra), b"boom", now),
            Outcome::Retry { after: None, error: "HTTP 500: boom".into() }
        );
        assert_eq!(outcome(st(408), None, b"", now), Outcome::Retry { after: None, error: "HTTP 408".into() });
        assert_eq!(
            outcome(st(422), None, b"bad order\n", now),
            Outcome::Reject { reason: "HTTP 422: bad order".into() }
        );
        assert_eq!(outcome(st(404), None, b"", now), Outcome::Reject { reason: "HTTP 404".into() });
        assert!(matches!(outcome(st(302), None, b"", now), Outcome::Retry { .. }));
    }

    #[test]
    fn parses_retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let date = HeaderValue::from_str(&httpdate::fmt_http_date(now + Duration::from_secs(90))).expect("date");
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(90)));
        assert_eq!(parse_retry_after(&HeaderValue::from_static("120"), now), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon"), now), None);
    }

    #[test]
    fn builds_cloudevents_headers_and_refuses_unsendable_ones() {
        let mut m = Message {
            id: "m-1".into(),
            key: Some("order.created".into()),
            source: "amqp://h/orders".into(),
            ..Message::default()
        };
        m.headers.insert("traceparent".into(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        m.headers.insert("Tenant".into(), "acme".into());
        let d =
            DeliveryInfo { message: &m, attempt: 2, subscription: "s", route: "r", handler: "h", traceparent: None };
        let h = request_headers(&d, &[b"0123456789abcdef".to_vec()]).expect("headers");
        assert_eq!(h["ce-id"], "m-1");
        assert_eq!(h["ce-specversion"], "1.0");
        assert_eq!(h["ce-type"], "order.created");
        assert_eq!(h["x-router-attempt"], "2");
        assert_eq!(h["traceparent"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert_eq!(h["x-message-header-tenant"], "acme");
        let ts = h["x-router-timestamp"].to_str().expect("ascii");
        assert_eq!(h["x-router-signature"], sign(b"0123456789abcdef", ts, b"").as_str());

        let attempt_span = "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01";
        let d = DeliveryInfo { traceparent: Some(attempt_span), ..d };
        let h = request_headers(&d, &[]).expect("headers");
        assert_eq!(h["traceparent"], attempt_span, "tracing on: the attempt's span, not the producer's");
        assert_eq!(h["x-message-header-traceparent"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");

        m.timestamp = Some(UNIX_EPOCH + Duration::from_secs(253_402_300_800));
        let d =
            DeliveryInfo { message: &m, attempt: 1, subscription: "s", route: "r", handler: "h", traceparent: None };
        assert!(!request_headers(&d, &[]).expect("sent").contains_key("ce-time"), "year 10000: no ce-time, no panic");

        m.headers.insert("bad".into(), "line\nbreak".into());
        let d =
            DeliveryInfo { message: &m, attempt: 1, subscription: "s", route: "r", handler: "h", traceparent: None };
        assert_eq!(
            request_headers(&d, &[]).err().as_deref(),
            Some("value of header \"x-message-header-bad\" cannot be sent over HTTP")
        );
    }

    #[test]
    fn signs_with_every_key_during_a_rotation() {
        let (new, old) = (b"new-secret-0123456789".to_vec(), b"old-secret-0123456789".to_vec());
        // A known answer: PHP's hash_hmac('sha256', '1700000000.{"n":1}', '0123456789abcdef').
        assert_eq!(
            sign(b"0123456789abcdef", "1700000000", br#"{"n":1}"#),
            "v1=d9a22bdcfdab07f3be7c84c30003fdc81a4c25420850e983eb235d7e17846231"
        );
        assert_eq!(
            signature(std::slice::from_ref(&new), "17", b"x"),
            sign(&new, "17", b"x"),
            "one key: the header as before"
        );
        assert_eq!(
            signature(&[new.clone(), old.clone()], "17", b"x"),
            format!("{}, {}", sign(&new, "17", b"x"), sign(&old, "17", b"x"))
        );

        let m = Message { id: "m-1".into(), body: b"body".to_vec().into(), ..Message::default() };
        let d =
            DeliveryInfo { message: &m, attempt: 1, subscription: "s", route: "r", handler: "h", traceparent: None };
        let h = request_headers(&d, &[new.clone(), old.clone()]).expect("headers");
        let ts = h["x-router-timestamp"].to_str().expect("ascii");
        let sig = h["x-router-signature"].to_str().expect("ascii");
        let parts: Vec<&str> = sig.split(", ").collect();
        assert_eq!(parts, [sign(&new, ts, b"body"), sign(&old, ts, b"body")]);
        assert!(parts.iter().all(|p| p.len() == 3 + 64 && p.starts_with("v1=")), "{sig}");
        let unsigned = request_headers(&d, &[]).expect("headers");
        assert!(!unsigned.contains_key("x-router-signature") && !unsigned.contains_key("x-router-timestamp"));
    }
}

#[cfg(test)]
mod fuzz;
