//! Property tests of the HTTP contract (`cargo test fuzz_`; `scripts/fuzz` runs a
//! million cases of each): request headers for arbitrary messages (ids, keys, content
//! types, kinds, timestamps, header maps with control characters, names that are not
//! tokens, very long values), with and without a secret; response statuses and
//! `Retry-After` values.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use proptest::test_runner::TestCaseResult;
use reqwest::header::{HeaderName, HeaderValue};
use reqwest::StatusCode;
use router_core::fuzz_support::run;
use router_core::message::header;
use router_core::{DeliveryInfo, Message, Outcome};

use super::{outcome, parse_retry_after, request_headers, MESSAGE_HEADER_PREFIX, MESSAGE_HEX_HEADER_PREFIX};

/// Text that is sometimes not sendable: control characters, DEL, very long.
fn text() -> BoxedStrategy<String> {
    prop_oneof![
        6 => "[ -~]{0,24}",
        2 => any::<String>(),
        1 => vec(prop_oneof![Just('\n'), Just('\r'), Just('\0'), Just('\t'), Just('\u{7f}'), Just('\u{85}'), Just('a')], 0..6)
            .prop_map(String::from_iter),
        1 => (1usize..20_000, any::<char>()).prop_map(|(n, c)| std::iter::repeat_n(c, n).collect()),
    ]
    .boxed()
}

/// Text that HTTP takes as a header value.
fn sendable() -> BoxedStrategy<String> {
    prop_oneof![
        4 => "[ -~]{0,24}",
        1 => any::<String>().prop_map(|s| s.chars().filter(|c| !c.is_control()).collect()),
        1 => (1usize..20_000).prop_map(|n| "v".repeat(n)),
    ]
    .boxed()
}

/// Header names the router writes on messages (retry copies, dead letters).
const ROUTER_HEADERS: &[&str] = &[
    header::ATTEMPT,
    header::REASON,
    header::ATTEMPTS,
    header::LAST_ERROR,
    header::FIRST_FAILURE,
    header::LAST_FAILURE,
    header::ROUTE,
    header::HANDLER,
    header::SUBSCRIPTION,
    header::ORIGINAL_EXCHANGE,
    header::ORIGINAL_ROUTING_KEY,
    header::ORIGINAL_QUEUE,
    header::ORIGINAL_STREAM,
    header::ORIGINAL_ID,
    "x-router-due",
    "x-router-original-topic",
    "x-router-original-partition",
    "x-router-original-offset",
];

fn router_header_name() -> BoxedStrategy<String> {
    (select(ROUTER_HEADERS), any::<bool>())
        .prop_map(|(n, upper)| if upper { n.to_ascii_uppercase() } else { n.to_string() })
        .boxed()
}

fn header_name() -> BoxedStrategy<String> {
    prop_oneof![
        3 => "[a-zA-Z0-9_-]{1,12}",
        2 => router_header_name(),
        1 => select(&["traceparent", "TraceState", "content-type", "ce-id", ""][..]).prop_map(str::to_string),
        1 => any::<String>(),
        1 => "[a-z]{1,4}[ :()\"\u{0}\n][a-z]{0,4}",
        // Symfony Messenger's stamp headers: a class name in the header name.
        1 => "X-Message-Stamp-[A-Z][a-z]{1,6}(\\\\[A-Z][a-z]{1,6}){1,3}",
        1 => (65_530usize..65_540).prop_map(|n| "n".repeat(n)),
    ]
    .boxed()
}

/// Times from before the epoch to far past year 9999.
fn timestamp() -> BoxedStrategy<SystemTime> {
    prop_oneof![
        (0u64..253_402_300_800).prop_map(|s| UNIX_EPOCH + Duration::from_secs(s)),
        any::<u64>().prop_map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
        (0u64..(i64::MAX as u64)).prop_map(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s)).unwrap_or(UNIX_EPOCH)),
        (0u64..4_000_000_000).prop_map(|s| UNIX_EPOCH - Duration::from_secs(s)),
    ]
    .boxed()
}

#[derive(Debug, Clone)]
struct Case {
    message: Message,
    attempt: u32,
    names: [String; 3],
    /// No key, or one (a rotation's two keys are the contract tests' business).
    secret: Option<Vec<u8>>,
}

fn message(
    text: BoxedStrategy<String>,
    headers: BoxedStrategy<BTreeMap<String, String>>,
) -> impl Strategy<Value = Message> {
    (
        text.clone(),
        option::of(text.clone()),
        option::of(text.clone()),
        option::of(text.clone()),
        text,
        headers,
        option::of(timestamp()),
        vec(any::<u8>(), 0..32),
    )
        .prop_map(|(id, key, content_type, kind, source, headers, timestamp, body)| Message {
            id,
            body: body.into(),
            headers,
            key,
            content_type,
            kind,
            timestamp,
            source,
        })
}

fn case(message: impl Strategy<Value = Message>, names: BoxedStrategy<String>) -> impl Strategy<Value = Case> {
    (message, any::<u32>(), [names.clone(), names.clone(), names], option::of(vec(any::<u8>(), 0..40)))
        .prop_map(|(message, attempt, names, secret)| Case { message, attempt, names, secret })
}

/// What `request_headers` puts, name and value, in order: what an error must name.
fn attempted(c: &Case) -> Vec<(String, String)> {
    let m = &c.message;
    let mut out = vec![
        ("content-type".to_string(), m.content_type.clone().unwrap_or_else(|| "application/octet-stream".into())),
        ("ce-specversion".into(), "1.0".into()),
        ("ce-id".into(), m.id.clone()),
        ("ce-source".into(), m.source.clone()),
    ];
    let ce_type = m
        .kind
        .as_deref()
        .or(m.key.as_deref())
        .filter(|t| !t.is_empty())
        .unwrap_or("message-router.message")
        .to_string();
    out.push(("ce-type".into(), ce_type));
    if let Some(key) = &m.key {
        out.push(("x-router-key".into(), key.clone()));
    }
    out.push(("x-router-attempt".into(), c.attempt.to_string()));
    let [subscription, route, handler] = &c.names;
    out.push(("x-router-route".into(), route.clone()));
    out.push(("x-router-subscription".into(), subscription.clone()));
    out.push(("x-router-handler".into(), handler.clone()));
    for (k, v) in &m.headers {
        let lower = k.to_ascii_lowercase();
        if lower == "traceparent" || lower == "tracestate" {
            out.push((lower.clone(), v.clone()));
        }
        out.push((http_name(k), v.clone()));
    }
    out
}

/// The HTTP header a message header travels as: its lower-cased name after the prefix
/// when that is an HTTP token, else its bytes in hex after the hex prefix.
fn http_name(k: &str) -> String {
    let plain = format!("{MESSAGE_HEADER_PREFIX}{}", k.to_ascii_lowercase());
    if HeaderName::from_bytes(plain.as_bytes()).is_ok() {
        plain
    } else {
        format!("{MESSAGE_HEX_HEADER_PREFIX}{}", hex::encode(k))
    }
}

fn check(c: &Case) -> TestCaseResult {
    let [subscription, route, handler] = &c.names;
    let d = DeliveryInfo { message: &c.message, attempt: c.attempt, subscription, route, handler, traceparent: None };
    match request_headers(&d, std::slice::from_ref(&c.secret).iter().flatten().cloned().collect::<Vec<_>>().as_slice())
    {
        Ok(h) => {
            for (name, value) in &h {
                let n = name.as_str();
                prop_assert!(!n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase()));
                prop_assert!(
                    value.as_bytes().iter().all(|b| (*b >= 0x20 && *b != 0x7f) || *b == b'\t'),
                    "{:?}: {:?}",
                    name,
                    value
                );
            }
            prop_assert_eq!(h.get("ce-id").map(HeaderValue::as_bytes), Some(c.message.id.as_bytes()));
            let attempt = c.attempt.to_string();
            prop_assert_eq!(h.get("x-router-attempt").map(HeaderValue::as_bytes), Some(attempt.as_bytes()));
            prop_assert_eq!(h.contains_key("x-router-signature"), c.secret.is_some());
            for k in c.message.headers.keys() {
                let name = http_name(k);
                prop_assert!(h.contains_key(name.as_str()), "{} missing", name);
            }
        }
        Err(reason) => {
            // The reason names a header that cannot be sent: its name or its value.
            let named = attempted(c).into_iter().any(|(name, value)| {
                let bad_name = HeaderName::from_bytes(name.as_bytes()).is_err();
                let bad_value = HeaderValue::from_str(&value).is_err();
                (bad_name && reason == format!("header name {name:?} cannot be sent over HTTP"))
                    || (bad_value && reason == format!("value of header {name:?} cannot be sent over HTTP"))
            });
            prop_assert!(named, "{:?} names no header that cannot be sent", reason);
        }
    }
    Ok(())
}

/// Arbitrary messages: never a panic; `Ok` holds only valid headers, `ce-id` is the
/// message id; an `Err` names the header that cannot be sent.
#[test]
fn fuzz_http_request_headers() {
    let headers = btree_map(header_name(), text(), 0..6).boxed();
    let input = case(message(text(), headers), prop_oneof![3 => "[a-z.-]{1,8}", 1 => text()].boxed());
    run("fuzz_http_request_headers", 1000, input, |c| check(&c));
}

/// A message that is sendable but for the router's own `x-router-*` headers from an
/// earlier attempt (any value: a handler's multi-line answer, control characters,
/// very long) is always sent.
#[test]
fn fuzz_http_router_headers_never_refuse() {
    let producer = btree_map("[a-zA-Z0-9_-]{1,12}", sendable(), 0..3);
    let router = btree_map(router_header_name(), text(), 0..5);
    let headers = (producer, router)
        .prop_map(|(mut p, r)| {
            p.retain(|k, _| !k.to_ascii_lowercase().starts_with("x-router-"));
            p.extend(r);
            p
        })
        .boxed();
    let input = case(message(sendable(), headers), "[a-z.-]{1,8}".boxed());
    run("fuzz_http_router_headers_never_refuse", 1000, input, |c| {
        let [subscription, route, handler] = &c.names;
        let d =
            DeliveryInfo { message: &c.message, attempt: c.attempt, subscription, route, handler, traceparent: None };
        let sent = request_headers(
            &d,
            std::slice::from_ref(&c.secret).iter().flatten().cloned().collect::<Vec<_>>().as_slice(),
        );
        prop_assert!(sent.is_ok(), "refused: {:?}", sent.err());
        check(&c)
    });
}

fn now() -> BoxedStrategy<SystemTime> {
    prop_oneof![
        (0u64..253_402_300_000).prop_map(|s| UNIX_EPOCH + Duration::from_secs(s)),
        (0u64..4_000_000_000).prop_map(|s| UNIX_EPOCH - Duration::from_secs(s)),
    ]
    .boxed()
}

/// Every status maps per the contract, whatever the `Retry-After` bytes and the body.
#[test]
fn fuzz_http_outcome() {
    let retry_after = prop_oneof![
        vec(any::<u8>(), 0..40),
        any::<u64>().prop_map(|n| n.to_string().into_bytes()),
        (0u64..253_400_000_000).prop_map(|s| httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(s)).into_bytes()),
    ];
    let input = (100u16..1000, option::of(retry_after), vec(any::<u8>(), 0..64), now());
    run("fuzz_http_outcome", 2000, input, |(code, retry_after, excerpt, now)| {
        let status = StatusCode::from_u16(code).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let retry_after = retry_after.and_then(|b| HeaderValue::from_bytes(&b).ok());
        let got = outcome(status, retry_after.as_ref(), &excerpt, now);
        let describes =
            |s: &str| s.starts_with(&format!("HTTP {code}")) || s.starts_with(&format!("unexpected HTTP {code}"));
        match code {
            200..=299 => prop_assert_eq!(got, Outcome::Ack),
            429 | 503 => {
                let want = retry_after.as_ref().and_then(|v| parse_retry_after(v, now));
                prop_assert!(
                    matches!(&got, Outcome::Retry { after, error } if *after == want && describes(error)),
                    "{:?}",
                    got
                );
            }
            408 | 500..=599 => {
                prop_assert!(matches!(&got, Outcome::Retry { after: None, error } if describes(error)), "{:?}", got)
            }
            400..=499 => prop_assert!(matches!(&got, Outcome::Reject { reason } if describes(reason)), "{:?}", got),
            _ => prop_assert!(matches!(&got, Outcome::Retry { after: None, error } if describes(error)), "{:?}", got),
        }
        Ok(())
    });
}

/// `Retry-After`: delta-seconds as they are, an HTTP date as the time until it (zero
/// when past), anything else nothing; never a panic.
#[test]
fn fuzz_http_parse_retry_after() {
    let input = (
        prop_oneof![vec(any::<u8>(), 0..40), "[0-9 ]{0,24}".prop_map(String::into_bytes)],
        now(),
        any::<u32>(),
        any::<bool>(),
    );
    run("fuzz_http_parse_retry_after", 2000, input, |(bytes, now, delta, past)| {
        if let Ok(v) = HeaderValue::from_bytes(&bytes) {
            let got = parse_retry_after(&v, now);
            if let Ok(secs) = std::str::from_utf8(&bytes).map(str::trim).unwrap_or("x").parse::<u64>() {
                prop_assert_eq!(got, Some(Duration::from_secs(secs)));
            }
        }
        // An HTTP date, whole seconds, `delta` from now.
        let now = UNIX_EPOCH + Duration::from_secs(now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0));
        let delta = Duration::from_secs(delta.into());
        let at = if past { now.checked_sub(delta) } else { now.checked_add(delta) };
        if let Some(at) =
            at.filter(|t| *t >= UNIX_EPOCH && t.duration_since(UNIX_EPOCH).is_ok_and(|d| d.as_secs() < 253_402_300_800))
        {
            let v =
                HeaderValue::from_str(&httpdate::fmt_http_date(at)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let want = if past { Duration::ZERO } else { delta };
            prop_assert_eq!(parse_retry_after(&v, now), Some(want));
        }
        Ok(())
    });
}
