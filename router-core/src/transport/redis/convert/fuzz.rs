//! Property tests of the Redis conversion (`cargo test fuzz_`; `scripts/fuzz` runs a
//! million cases of each): stream entries with arbitrary field names and values
//! (binary, not UTF-8, duplicated, without the body field), the packed field lists of
//! the delayed set, and the reply parsers on arbitrary `redis::Value` trees.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use bytes::Bytes;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use redis::{PushKind, ServerError, Value, VerbatimFormat};

use super::{
    bytes, id_order, items, pack_fields, parse_autoclaim, parse_entries, parse_read, text, to_message, unpack_fields,
    Entry,
};
use crate::fuzz_support::run;
use crate::message::header;
use crate::transport::field;

/// Names producers and the router use, and anything else.
fn name() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        2 => select(&["body", "payload", field::MESSAGE_ID, field::CONTENT_TYPE, field::TYPE, header::ORIGINAL_ID, header::ATTEMPT, ""][..])
            .prop_map(|s| s.as_bytes().to_vec()),
        2 => "[a-z_-]{1,8}".prop_map(String::into_bytes),
        1 => any::<String>().prop_map(String::into_bytes),
        1 => vec(any::<u8>(), 0..8),
    ]
    .boxed()
}

fn value_bytes() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        3 => any::<String>().prop_map(String::into_bytes),
        1 => vec(any::<u8>(), 0..32),
        1 => "[0-9]{1,20}(-[0-9]{1,20})?".prop_map(String::into_bytes),
    ]
    .boxed()
}

fn fields() -> BoxedStrategy<Vec<(Bytes, Bytes)>> {
    vec((name(), value_bytes()), 0..8)
        .prop_map(|f| f.into_iter().map(|(n, v)| (Bytes::from(n), Bytes::from(v))).collect())
        .boxed()
}

/// Entry ids as Redis writes them, and others (a trimmed or hand-made stream).
fn entry_id() -> BoxedStrategy<String> {
    prop_oneof![
        3 => (any::<u64>(), any::<u64>()).prop_map(|(ms, seq)| format!("{ms}-{seq}")),
        1 => (0u64..2_000_000_000_000, 0u64..4).prop_map(|(ms, seq)| format!("{ms}-{seq}")),
        1 => any::<String>(),
    ]
    .boxed()
}

/// Any entry becomes a message: the body is the (last) body field byte for byte, every
/// other field whose name and value are text is a header (the last one of a name wins),
/// and the message is defective exactly when the body field is missing or a header is
/// not text.
#[test]
fn fuzz_redis_to_message() {
    let body_field = prop_oneof![3 => Just("body".to_string()), 1 => "[a-z]{1,4}", 1 => any::<String>()];
    let input = (fields(), body_field, entry_id(), any::<String>(), any::<String>());
    run("fuzz_redis_to_message", 1000, input, |(fields, body_field, id, source, origin)| {
        let (m, defect) = to_message(&source, &origin, &id, &fields, &body_field);
        // The model: the last body field, headers by last text value, any defect.
        let body = fields.iter().rev().find(|(n, _)| n.as_ref() == body_field.as_bytes()).map(|(_, v)| v.clone());
        let mut headers = BTreeMap::new();
        let mut undecodable = false;
        for (n, v) in fields.iter().filter(|(n, _)| n.as_ref() != body_field.as_bytes()) {
            match (std::str::from_utf8(n), std::str::from_utf8(v)) {
                (Ok(n), Ok(v)) => {
                    headers.insert(n.to_string(), v.to_string());
                }
                _ => undecodable = true,
            }
        }
        prop_assert_eq!(&m.body, &body.clone().unwrap_or_default());
        prop_assert_eq!(&m.headers, &headers);
        prop_assert_eq!(defect.is_some(), body.is_none() || undecodable, "defect {:?}", defect);
        prop_assert_eq!(m.key.as_deref(), Some(origin.as_str()));
        let first = headers.get(header::ORIGINAL_ID).unwrap_or(&id);
        let want_id = headers.get(field::MESSAGE_ID).filter(|s| !s.is_empty()).unwrap_or(first);
        prop_assert_eq!(&m.id, want_id);
        prop_assert_eq!(m.content_type.as_ref(), headers.get(field::CONTENT_TYPE));
        prop_assert_eq!(m.kind.as_ref(), headers.get(field::TYPE));
        Ok(())
    });
}

/// Packed field lists: 4-byte big-endian length before each name and value, nothing
/// else, and they unpack to the same fields; unpacking arbitrary bytes never panics.
#[test]
fn fuzz_redis_pack_fields() {
    let input = (fields(), vec(any::<u8>(), 0..64));
    run("fuzz_redis_pack_fields", 1000, input, |(fields, junk)| {
        let packed = pack_fields(&fields);
        prop_assert_eq!(packed.len(), fields.iter().map(|(n, v)| 8 + n.len() + v.len()).sum::<usize>());
        let mut at = 0;
        for part in fields.iter().flat_map(|(n, v)| [n, v]) {
            let len = u32::from_be_bytes(packed[at..at + 4].try_into().expect("4 bytes")) as usize;
            prop_assert_eq!(len, part.len());
            prop_assert_eq!(&packed[at + 4..at + 4 + len], part.as_ref());
            at += 4 + len;
        }
        prop_assert_eq!(unpack_fields(&packed), Some(fields));
        let _ = unpack_fields(&junk);
        Ok(())
    });
}

fn any_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        Just(Value::Nil),
        Just(Value::Okay),
        any::<i64>().prop_map(Value::Int),
        value_bytes().prop_map(Value::BulkString),
        any::<String>().prop_map(Value::SimpleString),
        any::<f64>().prop_map(Value::Double),
        any::<bool>().prop_map(Value::Boolean),
        (
            prop_oneof![
                Just(VerbatimFormat::Text),
                Just(VerbatimFormat::Markdown),
                any::<String>().prop_map(VerbatimFormat::Unknown)
            ],
            any::<String>()
        )
            .prop_map(|(format, text)| Value::VerbatimString { format, text }),
        vec(any::<u8>(), 0..8).prop_map(Value::BigNumber),
        ("[A-Z]{1,8}", option::of(any::<String>())).prop_map(|(code, detail)| {
            let e = redis::make_extension_error(code, detail);
            ServerError::try_from(e).map(Value::ServerError).unwrap_or(Value::Nil)
        }),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..5).prop_map(Value::Array),
            vec(inner.clone(), 0..5).prop_map(Value::Set),
            vec((inner.clone(), inner.clone()), 0..4).prop_map(Value::Map),
            (inner.clone(), vec((inner.clone(), inner.clone()), 0..2))
                .prop_map(|(data, attributes)| Value::Attribute { data: Box::new(data), attributes }),
            vec(inner, 0..3).prop_map(|data| Value::Push { kind: PushKind::Message, data }),
        ]
    })
    .boxed()
}

/// An entry as a reply holds it: its id and its fields (`None`: trimmed away).
type ModelEntry = (String, Option<Vec<(Vec<u8>, Vec<u8>)>>);

/// Entries as a reply holds them, with the fields they should parse to.
fn entries() -> BoxedStrategy<Vec<ModelEntry>> {
    vec((entry_id(), option::weighted(0.9, vec((name(), value_bytes()), 0..4))), 0..4).boxed()
}

fn bulk(b: &[u8]) -> Value {
    Value::BulkString(b.to_vec())
}

fn entries_reply(entries: &[ModelEntry]) -> Value {
    Value::Array(
        entries
            .iter()
            .map(|(id, fields)| {
                let fields = match fields {
                    Some(f) => Value::Array(f.iter().flat_map(|(n, v)| [bulk(n), bulk(v)]).collect()),
                    None => Value::Nil,
                };
                Value::Array(vec![bulk(id.as_bytes()), fields])
            })
            .collect(),
    )
}

fn same_entries(got: &[Entry], want: &[ModelEntry]) -> bool {
    got.len() == want.len()
        && got.iter().zip(want).all(|(g, (id, fields))| {
            let g_fields =
                g.fields.as_ref().map(|f| f.iter().map(|(n, v)| (n.to_vec(), v.to_vec())).collect::<Vec<_>>());
            g.id == *id && g_fields.as_ref() == fields.as_ref()
        })
}

/// Replace the node at a (wrapped) position of `v`'s depth-first walk by `with`.
fn graft(v: &mut Value, at: &mut usize, with: &Value) -> bool {
    if *at == 0 {
        *v = with.clone();
        return true;
    }
    *at -= 1;
    match v {
        Value::Array(items) | Value::Set(items) => items.iter_mut().any(|i| graft(i, at, with)),
        Value::Map(pairs) => pairs.iter_mut().any(|(k, v)| graft(k, at, with) || graft(v, at, with)),
        _ => false,
    }
}

/// The reply parsers: well-formed XREADGROUP (RESP2 arrays and RESP3 maps) and
/// XAUTOCLAIM replies parse to what they hold; arbitrary trees and well-formed ones
/// with a node replaced give `Ok` or `Err`, never a panic.
#[test]
fn fuzz_redis_reply_parsers() {
    let streams = vec((any::<String>(), entries()), 0..3);
    let input = (streams, entries(), vec(entry_id(), 0..3), any_value(), any::<usize>(), any::<bool>());
    run("fuzz_redis_reply_parsers", 1000, input, |(streams, claimed, deleted, junk, at, resp3)| {
        // XREADGROUP, as RESP2 or RESP3.
        let read = if resp3 {
            Value::Map(streams.iter().map(|(s, e)| (bulk(s.as_bytes()), entries_reply(e))).collect())
        } else {
            Value::Array(
                streams.iter().map(|(s, e)| Value::Array(vec![bulk(s.as_bytes()), entries_reply(e)])).collect(),
            )
        };
        let parsed = parse_read(&read).map_err(TestCaseError::fail)?;
        prop_assert_eq!(parsed.len(), streams.len());
        for ((name, got), (want_name, want)) in parsed.iter().zip(&streams) {
            prop_assert_eq!(name, want_name);
            prop_assert!(same_entries(got, want), "{:?} vs {:?}", got, want);
        }
        // XAUTOCLAIM.
        let claim = Value::Array(vec![
            bulk(b"0-0"),
            entries_reply(&claimed),
            Value::Array(deleted.iter().map(|d| bulk(d.as_bytes())).collect()),
        ]);
        let (cursor, got, gone) = parse_autoclaim(&claim).map_err(TestCaseError::fail)?;
        prop_assert_eq!(cursor, "0-0");
        prop_assert!(same_entries(&got, &claimed));
        prop_assert_eq!(gone, deleted);
        // Damaged and arbitrary replies.
        for reply in [read, claim] {
            let mut damaged = reply.clone();
            let mut at = at % 64;
            graft(&mut damaged, &mut at, &junk);
            let _ = parse_read(&damaged);
            let _ = parse_autoclaim(&damaged);
            let _ = parse_entries(&damaged);
        }
        let _ = parse_read(&junk);
        let _ = parse_autoclaim(&junk);
        let _ = parse_entries(&junk);
        // The small readers say what they read and nothing else.
        let is_text = matches!(
            junk,
            Value::Int(_) | Value::BulkString(_) | Value::SimpleString(_) | Value::VerbatimString { .. }
        );
        prop_assert_eq!(text(&junk).is_some(), is_text);
        prop_assert_eq!(bytes(&junk).is_some(), is_text && !matches!(junk, Value::Int(_)));
        prop_assert_eq!(items(&junk).is_some(), matches!(junk, Value::Array(_) | Value::Set(_)));
        Ok(())
    });
}

/// Stream ids compare numerically (`ms-seq`, a part that is not a number counts as 0),
/// and the order is a total order: reflexive, antisymmetric.
#[test]
fn fuzz_redis_id_order() {
    let id = prop_oneof![entry_id(), (0u64..10, 0u64..10).prop_map(|(a, b)| format!("{a}-{b}"))];
    run("fuzz_redis_id_order", 2000, (id.clone(), id), |(a, b)| {
        prop_assert_eq!(id_order(&a, &a), Ordering::Equal);
        prop_assert_eq!(id_order(&a, &b), id_order(&b, &a).reverse());
        let num = |id: &str| -> Option<(u64, u64)> {
            let (ms, seq) = id.split_once('-')?;
            Some((ms.parse().ok()?, seq.parse().ok()?))
        };
        if let (Some(x), Some(y)) = (num(&a), num(&b)) {
            prop_assert_eq!(id_order(&a, &b), x.cmp(&y));
        }
        Ok(())
    });
}
