//! Property tests of the AMQP conversion (`cargo test fuzz_`; `scripts/fuzz` runs a
//! million cases of each): arbitrary properties, every one optional; header tables
//! nesting tables and arrays of every `AMQPValue` variant, with bytes that are not
//! UTF-8 in long strings and byte arrays; arbitrary bodies.

use std::time::UNIX_EPOCH;

use bytes::Bytes;
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;

use super::{republish_properties, to_message};
use crate::fuzz_support::run;
use crate::message::header;

/// A short string: at most 255 bytes (the protocol's limit; longer ones cannot be built).
fn short_string() -> BoxedStrategy<ShortString> {
    prop_oneof![
        8 => vec(any::<char>(), 0..24).prop_map(String::from_iter),
        1 => (200usize..=255).prop_map(|n| "x".repeat(n)),
        1 => Just(String::new()),
        1 => select(&[header::ORIGINAL_ROUTING_KEY, header::ATTEMPT, "x-death", "traceparent"][..]).prop_map(str::to_string),
    ]
    .prop_map(|mut s| {
        while s.len() > 255 {
            s.pop();
        }
        ShortString::from(s)
    })
    .boxed()
}

/// Bytes that are text most of the time.
fn some_bytes() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        3 => any::<String>().prop_map(String::into_bytes),
        1 => vec(any::<u8>(), 0..24),
    ]
    .boxed()
}

fn amqp_value() -> BoxedStrategy<AMQPValue> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        any::<f32>().prop_map(AMQPValue::Float),
        any::<f64>().prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>()).prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        short_string().prop_map(AMQPValue::ShortString),
        some_bytes().prop_map(|b| AMQPValue::LongString(LongString::from(b))),
        any::<u64>().prop_map(AMQPValue::Timestamp),
        some_bytes().prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
            table_of(inner).prop_map(AMQPValue::FieldTable),
        ]
    })
    .boxed()
}

fn table_of(value: BoxedStrategy<AMQPValue>) -> impl Strategy<Value = FieldTable> {
    btree_map(short_string(), value, 0..5).prop_map(FieldTable::from)
}

/// Whether every string in `v`, at any depth, is UTF-8 (table keys always are).
fn all_text(v: &AMQPValue) -> bool {
    match v {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).is_ok(),
        AMQPValue::ByteArray(b) => std::str::from_utf8(b.as_slice()).is_ok(),
        AMQPValue::FieldArray(a) => a.as_slice().iter().all(all_text),
        AMQPValue::FieldTable(t) => t.inner().values().all(all_text),
        _ => true,
    }
}

fn timestamp() -> BoxedStrategy<u64> {
    prop_oneof![any::<u64>(), 0..4_102_444_800u64, Just(u64::MAX), Just(i64::MAX as u64 + 1)].boxed()
}

fn properties() -> impl Strategy<Value = BasicProperties> {
    let s = || option::of(short_string());
    let strings = (s(), s(), s(), s(), s(), s(), s(), s(), s(), s(), s());
    let others =
        (option::of(table_of(amqp_value())), option::of(any::<u8>()), option::of(any::<u8>()), option::of(timestamp()));
    (strings, others).prop_map(|(strings, others)| {
        let (content_type, encoding, correlation, reply_to, expiration, message_id, kind, user, app, cluster, _) =
            strings;
        let (headers, delivery_mode, priority, timestamp) = others;
        let mut p = BasicProperties::default();
        macro_rules! set {
            ($value:expr, $with:ident) => {
                if let Some(v) = $value {
                    p = p.$with(v);
                }
            };
        }
        set!(content_type, with_content_type);
        set!(encoding, with_content_encoding);
        set!(headers, with_headers);
        set!(delivery_mode, with_delivery_mode);
        set!(priority, with_priority);
        set!(correlation, with_correlation_id);
        set!(reply_to, with_reply_to);
        set!(expiration, with_expiration);
        set!(message_id, with_message_id);
        set!(timestamp, with_timestamp);
        set!(kind, with_type);
        set!(user, with_user_id);
        set!(app, with_app_id);
        set!(cluster, with_cluster_id);
        p
    })
}

/// Any delivery becomes a message: the body byte for byte, an id, the headers that are
/// text; a defect exactly when some header value (at any depth) is not UTF-8.
#[test]
fn fuzz_amqp_to_message() {
    let input = (properties(), vec(any::<u8>(), 0..64), any::<String>(), any::<String>());
    run("fuzz_amqp_to_message", 1000, input, |(props, body, source, routing_key)| {
        let body = Bytes::from(body);
        let (m, defect) = to_message(&source, &routing_key, &props, body.clone());
        prop_assert_eq!(&m.body, &body);
        prop_assert!(!m.id.is_empty());
        if let Some(id) = props.message_id().as_ref().filter(|id| !id.as_str().is_empty()) {
            prop_assert_eq!(m.id.as_str(), id.as_str());
        }
        let table = props.headers().clone().unwrap_or_default();
        let binary: Vec<&ShortString> = table.inner().iter().filter(|(_, v)| !all_text(v)).map(|(k, _)| k).collect();
        prop_assert_eq!(defect.is_some(), !binary.is_empty(), "defect {:?}", defect);
        if let Some(defect) = &defect {
            prop_assert!(binary.iter().any(|k| defect.contains(&format!("{:?}", k.as_str()))), "{}", defect);
        }
        for (k, v) in table.inner() {
            prop_assert_eq!(m.headers.contains_key(k.as_str()), all_text(v), "header {:?}", k);
        }
        prop_assert_eq!(m.headers.len(), table.inner().len() - binary.len());
        let want_key = m.headers.get(header::ORIGINAL_ROUTING_KEY).unwrap_or(&routing_key);
        prop_assert_eq!(m.key.as_ref(), Some(want_key));
        prop_assert_eq!(&m.source, &source);
        prop_assert_eq!(m.content_type.as_deref(), props.content_type().as_ref().map(ShortString::as_str));
        prop_assert_eq!(m.kind.as_deref(), props.kind().as_ref().map(ShortString::as_str));
        if let Some(t) = m.timestamp {
            prop_assert_eq!(Some(t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)), *props.timestamp());
        }
        if props.timestamp().is_some_and(|t| t < 1 << 40) {
            prop_assert!(m.timestamp.is_some(), "a plausible timestamp is kept");
        }
        Ok(())
    });
}

/// A re-publish keeps the message id and what identifies the message, drops the
/// per-message TTL and user id, is persistent, and its extra headers win.
#[test]
fn fuzz_amqp_republish_properties() {
    let extra_name = prop_oneof![
        select(&[header::ATTEMPT, header::REASON, header::LAST_ERROR, header::ORIGINAL_ROUTING_KEY, "x-death"][..])
            .prop_map(str::to_string),
        short_string().prop_map(|s| s.as_str().to_string()),
    ];
    let input = (properties(), vec((extra_name, any::<String>()), 0..6));
    run("fuzz_amqp_republish_properties", 1000, input, |(original, extra)| {
        let extra_refs: Vec<(&str, String)> = extra.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let out = republish_properties(&original, &extra_refs);
        prop_assert_eq!(out.expiration(), &None);
        prop_assert_eq!(out.user_id(), &None);
        prop_assert_eq!(out.delivery_mode(), &Some(2));
        prop_assert_eq!(out.message_id(), original.message_id());
        prop_assert_eq!(out.content_type(), original.content_type());
        prop_assert_eq!(out.content_encoding(), original.content_encoding());
        prop_assert_eq!(out.priority(), original.priority());
        prop_assert_eq!(out.correlation_id(), original.correlation_id());
        prop_assert_eq!(out.reply_to(), original.reply_to());
        prop_assert_eq!(out.timestamp(), original.timestamp());
        prop_assert_eq!(out.kind(), original.kind());
        prop_assert_eq!(out.app_id(), original.app_id());
        let headers = out.headers().clone().unwrap_or_default();
        let before = original.headers().clone().unwrap_or_default();
        for (k, v) in before.inner() {
            if !extra.iter().any(|(name, _)| name == k.as_str()) {
                prop_assert_eq!(headers.inner().get(k), Some(v), "original header {:?} kept", k);
            }
        }
        for (name, _) in &extra {
            // The last value given for a name wins.
            let want = extra.iter().rev().find(|(n, _)| n == name).map(|(_, v)| v.as_str()).unwrap_or_default();
            prop_assert_eq!(
                headers.inner().get(name.as_str()),
                Some(&AMQPValue::LongString(LongString::from(want))),
                "extra header {:?}",
                name
            );
        }
        let names: std::collections::BTreeSet<&str> =
            before.inner().keys().map(ShortString::as_str).chain(extra.iter().map(|(n, _)| n.as_str())).collect();
        prop_assert_eq!(headers.inner().len(), names.len(), "no other headers");
        Ok(())
    });
}
