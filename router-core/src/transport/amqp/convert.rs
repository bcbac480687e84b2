//! AMQP ↔ router message model. Headers become text: numbers and booleans in their
//! usual spelling, arrays and tables (RabbitMQ's `x-death`) as JSON. A header whose
//! bytes are not UTF-8 makes the message defective: it is dead-lettered with the reason
//! instead of being guessed at.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;
use serde_json::Value as Json;

use crate::message::{header, Message};

/// Build the router's view of an AMQP delivery. Returns the message and, when a header
/// could not be decoded, what was wrong with it.
pub fn to_message(
    source: &str,
    routing_key: &str,
    properties: &BasicProperties,
    body: Bytes,
) -> (Message, Option<String>) {
    let mut defect = None;
    let mut headers = std::collections::BTreeMap::new();
    if let Some(table) = properties.headers() {
        for (k, v) in table.inner() {
            match to_text(v) {
                Ok(text) => {
                    headers.insert(k.as_str().to_string(), text);
                }
                Err(e) => defect = Some(format!("header {:?}: {e}", k.as_str())),
            }
        }
    }
    // A message coming back from a retry queue carries its original routing key.
    let key = headers.get(header::ORIGINAL_ROUTING_KEY).cloned().unwrap_or_else(|| routing_key.to_string());
    // The producer's id; else the one the router gave the message at its first
    // delivery (carried by its retry copies); else a new one.
    let id = properties
        .message_id()
        .as_ref()
        .map(|s| s.as_str().to_string())
        .or_else(|| headers.get(header::MESSAGE_ID).cloned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let message = Message {
        id,
        body,
        headers,
        key: Some(key),
        content_type: properties.content_type().as_ref().map(|s| s.as_str().to_string()),
        kind: properties.kind().as_ref().map(|s| s.as_str().to_string()),
        // A producer's timestamp past what SystemTime holds is dropped, not a panic.
        timestamp: properties.timestamp().and_then(|t| UNIX_EPOCH.checked_add(Duration::from_secs(t))),
        source: source.to_string(),
    };
    (message, defect)
}

/// A header value as text (numbers and booleans spelled out, tables and arrays as
/// JSON); an error when its bytes are not UTF-8.
pub(super) fn to_text(v: &AMQPValue) -> Result<String, String> {
    Ok(match v {
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        AMQPValue::LongString(s) => utf8(s.as_bytes())?,
        AMQPValue::ByteArray(b) => utf8(b.as_slice())?,
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) => to_json(v)?.to_string(),
        other => match to_json(other)? {
            Json::String(s) => s,
            j => j.to_string(),
        },
    })
}

fn utf8(bytes: &[u8]) -> Result<String, String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| "value is not valid UTF-8 text".to_string())
}

fn to_json(v: &AMQPValue) -> Result<Json, String> {
    Ok(match v {
        AMQPValue::Boolean(b) => Json::Bool(*b),
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Timestamp(n) => (*n).into(),
        AMQPValue::Float(f) => Json::from(f64::from(*f)),
        AMQPValue::Double(f) => Json::from(*f),
        AMQPValue::DecimalValue(d) => Json::from(f64::from(d.value) / 10f64.powi(i32::from(d.scale))),
        AMQPValue::ShortString(s) => Json::String(s.as_str().to_string()),
        AMQPValue::LongString(s) => Json::String(utf8(s.as_bytes())?),
        AMQPValue::ByteArray(b) => Json::String(utf8(b.as_slice())?),
        AMQPValue::FieldArray(a) => Json::Array(a.as_slice().iter().map(to_json).collect::<Result<_, _>>()?),
        AMQPValue::FieldTable(t) => Json::Object(
            t.inner().iter().map(|(k, v)| Ok((k.as_str().to_string(), to_json(v)?))).collect::<Result<_, String>>()?,
        ),
        AMQPValue::Void => Json::Null,
    })
}

/// The original properties with `extra` headers set (replacing same-named ones),
/// made persistent, for a durable re-publish. Dropped on purpose: `expiration` (a
/// per-message TTL would expire the retry) and `user_id` (RabbitMQ refuses a publish
/// whose user_id is not the router's own user).
pub fn republish_properties(original: &BasicProperties, extra: &[(&str, String)]) -> BasicProperties {
    let mut table = original.headers().clone().unwrap_or_default();
    for (k, v) in extra {
        table.insert(ShortString::from(*k), AMQPValue::LongString(v.as_str().into()));
    }
    let mut props = BasicProperties::default().with_headers(table).with_delivery_mode(2);
    let o = original;
    if let Some(v) = o.content_type() {
        props = props.with_content_type(v.clone());
    }
    if let Some(v) = o.content_encoding() {
        props = props.with_content_encoding(v.clone());
    }
    if let Some(v) = o.priority() {
        props = props.with_priority(*v);
    }
    if let Some(v) = o.correlation_id() {
        props = props.with_correlation_id(v.clone());
    }
    if let Some(v) = o.reply_to() {
        props = props.with_reply_to(v.clone());
    }
    if let Some(v) = o.message_id() {
        props = props.with_message_id(v.clone());
    }
    if let Some(v) = o.timestamp() {
        props = props.with_timestamp(*v);
    }
    if let Some(v) = o.kind() {
        props = props.with_type(v.clone());
    }
    if let Some(v) = o.app_id() {
        props = props.with_app_id(v.clone());
    }
    props
}

/// The properties of a replayed dead letter: the original's, with the failure
/// headers removed and `x-router-replayed` set ([`crate::dlq::replay_headers`]).
pub fn replay_properties(original: &BasicProperties) -> BasicProperties {
    let props = republish_properties(original, &[(header::REPLAYED, crate::dlq::replayed_now())]);
    let mut table = FieldTable::default();
    for (k, v) in props.headers().as_ref().map(|t| t.inner().clone()).unwrap_or_default() {
        if !crate::dlq::FAILURE_HEADERS.contains(&k.as_str()) {
            table.insert(k, v);
        }
    }
    props.with_headers(table)
}

/// Properties for a message the router publishes on its own (`message-router publish`).
pub fn publish_properties(message: &Message) -> BasicProperties {
    let mut table = FieldTable::default();
    for (k, v) in &message.headers {
        table.insert(ShortString::from(k.as_str()), AMQPValue::LongString(v.as_str().into()));
    }
    let mut props = BasicProperties::default()
        .with_message_id(ShortString::from(message.id.as_str()))
        .with_delivery_mode(2)
        .with_headers(table)
        .with_timestamp(
            message
                .timestamp
                .unwrap_or_else(SystemTime::now)
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        );
    if let Some(ct) = &message.content_type {
        props = props.with_content_type(ShortString::from(ct.as_str()));
    }
    if let Some(kind) = &message.kind {
        props = props.with_type(ShortString::from(kind.as_str()));
    }
    props
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{ByteArray, FieldArray, LongString};

    #[test]
    fn converts_headers_to_text_and_flags_binary_ones() {
        let mut t = FieldTable::default();
        t.insert("n".into(), AMQPValue::LongInt(-5));
        t.insert("b".into(), AMQPValue::Boolean(true));
        t.insert("s".into(), AMQPValue::LongString(LongString::from("héllo")));
        let mut death = FieldTable::default();
        death.insert("count".into(), AMQPValue::LongLongInt(2));
        t.insert("x-death".into(), AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])));
        t.insert(header::ORIGINAL_ROUTING_KEY.into(), AMQPValue::LongString("order.created".into()));
        let props = BasicProperties::default().with_headers(t.clone()).with_message_id("m1".into());
        let (m, defect) = to_message("rabbit/q", "q.retry.100ms", &props, Bytes::from_static(b"\xff\x00"));
        assert_eq!(defect, None);
        assert_eq!(m.id, "m1");
        assert_eq!(m.headers["n"], "-5");
        assert_eq!(m.headers["b"], "true");
        assert_eq!(m.headers["s"], "héllo");
        assert_eq!(m.headers["x-death"], r#"[{"count":2}]"#);
        assert_eq!(m.key.as_deref(), Some("order.created"));
        assert_eq!(&m.body[..], b"\xff\x00");

        t.insert("bin".into(), AMQPValue::ByteArray(ByteArray::from(vec![0xff, 0xfe])));
        let props = BasicProperties::default().with_headers(t);
        let (m, defect) = to_message("rabbit/q", "k", &props, Bytes::new());
        assert_eq!(defect.as_deref(), Some("header \"bin\": value is not valid UTF-8 text"));
        assert!(!m.id.is_empty(), "a generated id");

        let props = BasicProperties::default().with_timestamp(u64::MAX);
        assert_eq!(to_message("rabbit/q", "k", &props, Bytes::new()).0.timestamp, None, "no overflow panic");
    }

    #[test]
    fn a_generated_id_travels_with_retry_copies() {
        let (first, _) = to_message("rabbit/q", "k", &BasicProperties::default(), Bytes::new());
        let (again, _) = to_message("rabbit/q", "k", &BasicProperties::default(), Bytes::new());
        assert_ne!(first.id, again.id, "without an id each delivery gets a new one");
        let copy = republish_properties(&BasicProperties::default(), &[(header::MESSAGE_ID, first.id.clone())]);
        let (retried, _) = to_message("rabbit/q", "k", &copy, Bytes::new());
        assert_eq!(retried.id, first.id, "the retry copy keeps the first id");
        let mine = BasicProperties::default().with_message_id("producer-1".into());
        let (m, _) = to_message("rabbit/q", "k", &mine, Bytes::new());
        assert_eq!(m.id, "producer-1", "a producer's id wins");
    }

    #[test]
    fn republish_keeps_properties_and_drops_ttl() {
        let props = BasicProperties::default().with_expiration("1000".into()).with_message_id("m".into());
        let out = republish_properties(&props, &[(header::ATTEMPT, "2".into())]);
        assert_eq!(out.expiration(), &None);
        assert_eq!(out.delivery_mode(), &Some(2));
        assert_eq!(out.message_id().as_ref().map(|s| s.as_str()), Some("m"));
        let h = out.headers().clone().unwrap_or_default();
        assert_eq!(h.inner().get(header::ATTEMPT), Some(&AMQPValue::LongString("2".into())));
    }
}

#[cfg(test)]
mod fuzz;
