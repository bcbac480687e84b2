//! Property tests of the Kafka conversion (`cargo test fuzz_`; `scripts/fuzz` runs a
//! million cases of each): records with arbitrary topics, binary keys and payloads,
//! header lists with null values, bytes that are not UTF-8, duplicated names and the
//! router's own `x-router-*` names.

use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;

use super::{field, Record};
use crate::fuzz_support::run;
use crate::message::header;

/// Header names the router and producers use, and anything else.
fn header_name() -> BoxedStrategy<String> {
    prop_oneof![
        3 => select(&[
            field::MESSAGE_ID,
            field::CE_ID,
            field::CONTENT_TYPE,
            field::TYPE,
            field::KEY,
            field::KEY_HEX,
            field::DUE,
            field::ORIGINAL_TOPIC,
            field::ORIGINAL_PARTITION,
            field::ORIGINAL_OFFSET,
            header::ATTEMPT,
            header::REASON,
            header::LAST_ERROR,
            "x-router-",
            "X-Router-Attempt",
            "",
        ][..])
        .prop_map(str::to_string),
        2 => "[a-z_-]{1,10}",
        1 => any::<String>(),
    ]
    .boxed()
}

fn some_bytes() -> BoxedStrategy<Bytes> {
    prop_oneof![
        3 => any::<String>().prop_map(String::into_bytes),
        1 => vec(any::<u8>(), 0..24),
        1 => "-?[0-9]{1,20}".prop_map(String::into_bytes),
    ]
    .prop_map(Bytes::from)
    .boxed()
}

fn record() -> impl Strategy<Value = Record> {
    (
        prop_oneof![3 => "[a-z.]{0,12}", 1 => any::<String>()],
        any::<i32>(),
        any::<i64>(),
        option::of(some_bytes()),
        vec(any::<u8>(), 0..64),
        vec((header_name(), option::weighted(0.85, some_bytes())), 0..8),
        option::of(prop_oneof![any::<i64>(), 0i64..4_102_444_800_000]),
    )
        .prop_map(|(topic, partition, offset, key, payload, headers, timestamp_ms)| Record {
            topic,
            partition,
            offset,
            key,
            payload: Bytes::from(payload),
            headers,
            timestamp_ms,
        })
}

/// Any record becomes a message: the payload byte for byte, an id, the text headers
/// (the last value of a name wins; the key as `kafka-key` or `kafka-key-hex`); a
/// defect exactly when some non-null header value is not UTF-8.
#[test]
fn fuzz_kafka_to_message() {
    run("fuzz_kafka_to_message", 1000, (record(), any::<String>()), |(r, source)| {
        let (m, defect) = r.to_message(&source);
        prop_assert_eq!(&m.body, &r.payload);
        prop_assert!(!m.id.is_empty());
        let binary = r.headers.iter().any(|(_, v)| v.as_ref().is_some_and(|v| std::str::from_utf8(v).is_err()));
        prop_assert_eq!(defect.is_some(), binary, "defect {:?}", defect);
        let mut headers = BTreeMap::new();
        for (n, v) in &r.headers {
            if let Some(Ok(v)) = v.as_ref().map(|v| std::str::from_utf8(v)) {
                headers.insert(n.clone(), v.to_string());
            }
        }
        match r.key.as_ref().map(|k| std::str::from_utf8(k)) {
            Some(Ok(k)) => {
                headers.insert(field::KEY.to_string(), k.to_string());
            }
            Some(Err(_)) => {
                headers.insert(field::KEY_HEX.to_string(), hex::encode(r.key.as_deref().unwrap_or_default()));
            }
            None => {}
        }
        prop_assert_eq!(&m.headers, &headers);
        if let Some(id) =
            [field::MESSAGE_ID, field::CE_ID].iter().find_map(|h| headers.get(*h).filter(|v| !v.is_empty()))
        {
            prop_assert_eq!(&m.id, id);
        }
        prop_assert_eq!(m.key, Some(r.origin_topic()));
        prop_assert_eq!(m.content_type.as_ref(), headers.get(field::CONTENT_TYPE));
        prop_assert_eq!(m.kind.as_ref(), headers.get(field::TYPE));
        if r.timestamp_ms.is_some_and(|ms| ms >= 0) {
            prop_assert!(m.timestamp.is_some());
        }
        Ok(())
    });
}

/// Re-publish headers: the record's own headers as they were (null values and
/// duplicates too) but for the router's earlier `x-router-*` bookkeeping, then where
/// it first came from, then the extra headers; no other `x-router-*` header.
#[test]
fn fuzz_kafka_republish_headers() {
    let extra_name = select(
        &[
            header::ATTEMPT,
            header::REASON,
            header::ATTEMPTS,
            header::LAST_ERROR,
            header::FIRST_FAILURE,
            header::SUBSCRIPTION,
            field::DUE,
            "tenant",
        ][..],
    );
    let input = (record(), vec((extra_name, any::<String>()), 0..6));
    run("fuzz_kafka_republish_headers", 1000, input, |(r, extra)| {
        let out = r.republish_headers(extra.clone());
        let kept: Vec<&(String, Option<Bytes>)> =
            r.headers.iter().filter(|(n, _)| !n.starts_with("x-router-")).collect();
        prop_assert_eq!(out.len(), kept.len() + 3 + extra.len());
        for (got, want) in out.iter().zip(&kept) {
            prop_assert_eq!(got, *want);
        }
        let set_here: Vec<&str> = [field::ORIGINAL_TOPIC, field::ORIGINAL_PARTITION, field::ORIGINAL_OFFSET]
            .into_iter()
            .chain(extra.iter().map(|(n, _)| *n))
            .collect();
        let added: Vec<&str> = out[kept.len()..].iter().map(|(n, _)| n.as_str()).collect();
        prop_assert_eq!(&added, &set_here);
        for (n, _) in &out[..kept.len()] {
            prop_assert!(!n.starts_with("x-router-"), "stale {:?} kept", n);
        }
        let value = |i: usize| out[kept.len() + i].1.as_deref().map(|v| String::from_utf8_lossy(v).into_owned());
        prop_assert_eq!(value(0), Some(r.origin_topic()));
        let partition = r.header(field::ORIGINAL_PARTITION).unwrap_or(r.partition.to_string());
        prop_assert_eq!(value(1), Some(partition));
        let offset = r.header(field::ORIGINAL_OFFSET).unwrap_or(r.offset.to_string());
        prop_assert_eq!(value(2), Some(offset));
        for (i, (_, v)) in extra.iter().enumerate() {
            prop_assert_eq!(value(3 + i), Some(v.clone()));
        }
        Ok(())
    });
}
