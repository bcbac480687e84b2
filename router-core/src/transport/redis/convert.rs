//! Redis stream entries ↔ the router's message model, and the replies of the stream
//! commands.
//!
//! An entry is a list of field/value pairs, both binary. The subscription's
//! `body_field` is the body; every other field is a header. `message_id`,
//! `content_type` and `type` also fill the message id, content type and CloudEvents
//! type. A field name or header value that is not UTF-8, or a missing body field,
//! makes the message defective: it is dead-lettered with the reason.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use redis::Value;

use crate::message::{header, Message};

/// Field conventions shared with producers (and with `publish`).
pub use crate::transport::field;

/// One stream entry. `fields` is `None` when the entry is still pending but its
/// content is gone (the stream was trimmed past it).
#[derive(Clone, Debug)]
pub struct Entry {
    pub id: String,
    pub fields: Option<Vec<(Bytes, Bytes)>>,
}

/// The router's view of an entry read from a stream of `origin` (the source stream,
/// also for entries coming back through the retry stream). Returns the message and,
/// when it could not be decoded, what was wrong.
pub fn to_message(
    source: &str,
    origin: &str,
    id: &str,
    fields: &[(Bytes, Bytes)],
    body_field: &str,
) -> (Message, Option<String>) {
    let mut defect = None;
    let mut body = None;
    let mut headers = BTreeMap::new();
    for (name, value) in fields {
        if name.as_ref() == body_field.as_bytes() {
            body = Some(value.clone());
            continue;
        }
        let Ok(name) = std::str::from_utf8(name) else {
            defect = Some(format!("field name {:?} is not valid UTF-8 text", String::from_utf8_lossy(name)));
            continue;
        };
        match std::str::from_utf8(value) {
            Ok(v) => {
                headers.insert(name.to_string(), v.to_string());
            }
            Err(_) => defect = Some(format!("field {name:?}: value is not valid UTF-8 text")),
        }
    }
    if body.is_none() {
        defect = Some(format!(
            "entry has no field {body_field:?} (the subscription's body_field; fields: {})",
            fields.iter().map(|(n, _)| String::from_utf8_lossy(n)).collect::<Vec<_>>().join(", ")
        ));
    }
    // The id the message had when it first entered the router: stable across retries
    // and redeliveries, so handlers and deduplication can rely on it.
    let first_id = headers.get(header::ORIGINAL_ID).cloned().unwrap_or_else(|| id.to_string());
    let message = Message {
        id: headers.get(field::MESSAGE_ID).filter(|s| !s.is_empty()).cloned().unwrap_or_else(|| first_id.clone()),
        body: body.unwrap_or_default(),
        key: Some(origin.to_string()),
        content_type: headers.get(field::CONTENT_TYPE).cloned(),
        kind: headers.get(field::TYPE).cloned(),
        timestamp: entry_time(&first_id),
        source: crate::transport::source_uri(source, origin),
        headers,
    };
    (message, defect)
}

/// When an entry was added: the millisecond part of its id.
fn entry_time(id: &str) -> Option<std::time::SystemTime> {
    let ms = id.split_once('-').map_or(id, |(ms, _)| ms).parse::<u64>().ok()?;
    Some(UNIX_EPOCH + Duration::from_millis(ms))
}

/// The fields of `message` as a producer would write them (`publish`).
pub fn to_fields(message: &Message, body_field: &str) -> Vec<(Bytes, Bytes)> {
    let mut out = vec![(Bytes::copy_from_slice(body_field.as_bytes()), message.body.clone())];
    let mut put = |name: &str, value: &str| {
        out.push((Bytes::copy_from_slice(name.as_bytes()), Bytes::copy_from_slice(value.as_bytes())))
    };
    put(field::MESSAGE_ID, &message.id);
    if let Some(ct) = &message.content_type {
        put(field::CONTENT_TYPE, ct);
    }
    if let Some(kind) = &message.kind {
        put(field::TYPE, kind);
    }
    for (name, value) in &message.headers {
        if ![field::MESSAGE_ID, field::CONTENT_TYPE, field::TYPE, body_field].contains(&name.as_str()) {
            put(name, value);
        }
    }
    out
}

/// Serialize fields into one binary string (a sorted-set member): each name and value
/// as a 4-byte big-endian length and its bytes. The move script decodes it in Lua.
pub fn pack_fields(fields: &[(Bytes, Bytes)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(fields.iter().map(|(n, v)| n.len() + v.len() + 8).sum());
    for part in fields.iter().flat_map(|(n, v)| [n, v]) {
        // A single field is far below 4 GiB (Redis caps values at 512 MB).
        out.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// Inverse of [`pack_fields`]; `None` when the bytes are not a packed field list.
#[cfg(test)]
pub fn unpack_fields(mut bytes: &[u8]) -> Option<Vec<(Bytes, Bytes)>> {
    let mut parts = Vec::new();
    while !bytes.is_empty() {
        let len = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
        parts.push(Bytes::copy_from_slice(bytes.get(4..4 + len)?));
        bytes = &bytes[4 + len..];
    }
    if parts.len() % 2 != 0 {
        return None;
    }
    Some(parts.chunks(2).map(|p| (p[0].clone(), p[1].clone())).collect())
}

/// A reply value as bytes (bulk or simple string).
pub fn bytes(v: &Value) -> Option<Bytes> {
    match v {
        Value::BulkString(b) => Some(Bytes::copy_from_slice(b)),
        Value::SimpleString(s) => Some(Bytes::copy_from_slice(s.as_bytes())),
        Value::VerbatimString { text, .. } => Some(Bytes::copy_from_slice(text.as_bytes())),
        _ => None,
    }
}

/// A reply value as text.
pub fn text(v: &Value) -> Option<String> {
    match v {
        Value::Int(i) => Some(i.to_string()),
        other => bytes(other).map(|b| String::from_utf8_lossy(&b).into_owned()),
    }
}

/// The items of an array-like reply.
pub fn items(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        _ => None,
    }
}

/// What `XINFO GROUPS` says of one group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupInfo {
    /// Entries not yet delivered to the group; `None` when Redis cannot tell (after
    /// deletions in the stream).
    pub lag: Option<u64>,
    /// The id of the last entry delivered to the group.
    pub last: String,
    /// Entries delivered to the group and not acked yet.
    pub pending: u64,
}

/// What `XINFO GROUPS` says of `group`; `None` when the group is not there.
pub fn group_info(v: &Value, group: &str) -> Option<GroupInfo> {
    for g in items(v)? {
        let fields: Vec<&Value> = items(g).map(|f| f.iter().collect()).unwrap_or_default();
        let get = |name: &str| {
            fields
                .chunks(2)
                .find(|kv| kv.first().and_then(|k| text(k)).as_deref() == Some(name))
                .and_then(|kv| kv.get(1))
        };
        if get("name").and_then(|n| text(n)).as_deref() != Some(group) {
            continue;
        }
        let number = |name: &str| get(name).and_then(|l| text(l)).and_then(|l| l.parse().ok());
        let last = get("last-delivered-id").and_then(|l| text(l)).unwrap_or_default();
        return Some(GroupInfo { lag: number("lag"), last, pending: number("pending").unwrap_or(0) });
    }
    None
}

fn shape(what: &str) -> String {
    format!("unexpected reply shape from {what}")
}

/// Entries as XRANGE, XREADGROUP and XAUTOCLAIM return them: `[[id, [f, v, ...]], ...]`.
pub fn parse_entries(v: &Value) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    for e in items(v).ok_or_else(|| shape("stream entries"))? {
        let parts = items(e).ok_or_else(|| shape("a stream entry"))?;
        let id = parts.first().and_then(text).ok_or_else(|| shape("a stream entry id"))?;
        let fields = match parts.get(1) {
            None | Some(Value::Nil) => None,
            Some(list) => {
                let flat = items(list).ok_or_else(|| shape("stream entry fields"))?;
                let mut fields = Vec::with_capacity(flat.len() / 2);
                for pair in flat.chunks(2) {
                    match (pair.first().and_then(bytes), pair.get(1).and_then(bytes)) {
                        (Some(n), Some(v)) => fields.push((n, v)),
                        _ => return Err(shape("stream entry fields")),
                    }
                }
                Some(fields)
            }
        };
        out.push(Entry { id, fields });
    }
    Ok(out)
}

/// An XREADGROUP reply: entries by stream key (nil when nothing arrived in time).
pub fn parse_read(v: &Value) -> Result<Vec<(String, Vec<Entry>)>, String> {
    let pairs: Vec<(&Value, &Value)> = match v {
        Value::Nil => return Ok(Vec::new()),
        Value::Map(m) => m.iter().map(|(k, v)| (k, v)).collect(),
        other => {
            let mut out = Vec::new();
            for s in items(other).ok_or_else(|| shape("XREADGROUP"))? {
                let kv = items(s).ok_or_else(|| shape("XREADGROUP"))?;
                match kv {
                    [k, v] => out.push((k, v)),
                    _ => return Err(shape("XREADGROUP")),
                }
            }
            out
        }
    };
    pairs.into_iter().map(|(k, v)| Ok((text(k).ok_or_else(|| shape("XREADGROUP"))?, parse_entries(v)?))).collect()
}

/// An XAUTOCLAIM reply: the next cursor, the claimed entries and the ids whose
/// content was gone (removed from the pending list by Redis).
pub fn parse_autoclaim(v: &Value) -> Result<(String, Vec<Entry>, Vec<String>), String> {
    let parts = items(v).ok_or_else(|| shape("XAUTOCLAIM"))?;
    let cursor = parts.first().and_then(text).ok_or_else(|| shape("XAUTOCLAIM"))?;
    let entries = parse_entries(parts.get(1).ok_or_else(|| shape("XAUTOCLAIM"))?)?;
    let deleted = parts.get(2).and_then(items).map(|d| d.iter().filter_map(text).collect()).unwrap_or_default();
    Ok((cursor, entries, deleted))
}

/// Compare two stream ids (`ms-seq`) numerically.
pub fn id_order(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(id: &str) -> (u64, u64) {
        let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
        (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
    }
    parts(a).cmp(&parts(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn body_and_headers_from_fields() {
        let fields = vec![(b("body"), b("{\"a\":1}")), (b("type"), b("order.created")), (b("tenant"), b("acme"))];
        let (m, defect) = to_message("redis://h/", "orders", "1700000000000-3", &fields, "body");
        assert_eq!(defect, None);
        assert_eq!(m.body, b("{\"a\":1}"));
        assert_eq!(m.id, "1700000000000-3");
        assert_eq!(m.key.as_deref(), Some("orders"));
        assert_eq!(m.kind.as_deref(), Some("order.created"));
        assert_eq!(m.headers.get("tenant").map(String::as_str), Some("acme"));
        assert!(!m.headers.contains_key("body"));
        assert_eq!(m.timestamp, Some(UNIX_EPOCH + Duration::from_millis(1_700_000_000_000)));
        assert_eq!(m.source, "redis://h/orders");
        assert_eq!(to_message("redis://h", "o", "1-0", &fields, "body").0.source, "redis://h/o");
    }

    #[test]
    fn id_prefers_producer_id_then_first_entry_id() {
        let retried = vec![(b("body"), b("x")), (b(header::ORIGINAL_ID), b("5-0"))];
        assert_eq!(to_message("", "s", "9-0", &retried, "body").0.id, "5-0");
        let with_id = vec![(b("body"), b("x")), (b("message_id"), b("m-1")), (b(header::ORIGINAL_ID), b("5-0"))];
        assert_eq!(to_message("", "s", "9-0", &with_id, "body").0.id, "m-1");
    }

    #[test]
    fn undecodable_or_bodiless_entries_are_defects() {
        let bad = vec![(b("body"), b("x")), (b("h"), Bytes::from_static(&[0xff, 0xfe]))];
        assert!(to_message("", "s", "1-0", &bad, "body").1.unwrap_or_default().contains("field \"h\""));
        let bodiless = vec![(b("payload"), b("x"))];
        let defect = to_message("", "s", "1-0", &bodiless, "body").1.unwrap_or_default();
        assert!(defect.contains("no field \"body\"") && defect.contains("payload"), "{defect}");
        // A binary body is fine.
        let binary = vec![(b("body"), Bytes::from_static(&[0, 0xff]))];
        assert_eq!(to_message("", "s", "1-0", &binary, "body").1, None);
    }

    #[test]
    fn packed_fields_round_trip() {
        let fields = vec![(b("body"), Bytes::from_static(&[0, 1, 0xff])), (b("k"), b("")), (b(""), b("v"))];
        assert_eq!(unpack_fields(&pack_fields(&fields)), Some(fields));
        assert_eq!(unpack_fields(&[0, 0, 0, 9, 1]), None);
    }

    #[test]
    fn parses_replies() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let entry = Value::Array(vec![bulk("1-0"), Value::Array(vec![bulk("body"), bulk("x")])]);
        let gone = Value::Array(vec![bulk("2-0"), Value::Nil]);
        let read = Value::Array(vec![Value::Array(vec![bulk("s"), Value::Array(vec![entry.clone(), gone])])]);
        let parsed = parse_read(&read).expect("parses");
        assert_eq!(parsed[0].0, "s");
        assert_eq!(parsed[0].1[0].fields.as_ref().map(Vec::len), Some(1));
        assert!(parsed[0].1[1].fields.is_none());
        assert!(parse_read(&Value::Nil).expect("nil").is_empty());
        let claim = Value::Array(vec![bulk("0-0"), Value::Array(vec![entry]), Value::Array(vec![bulk("3-0")])]);
        let (cursor, entries, deleted) = parse_autoclaim(&claim).expect("parses");
        assert_eq!((cursor.as_str(), entries.len(), deleted), ("0-0", 1, vec!["3-0".to_string()]));
        assert!(parse_entries(&bulk("x")).is_err());
        assert_eq!(id_order("10-0", "9-5"), std::cmp::Ordering::Greater);
        assert_eq!(id_order("9-10", "9-9"), std::cmp::Ordering::Greater);
    }

    #[test]
    fn group_info_reads_lag_pending_and_last() {
        let bulk = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let group = |name: &str, lag: Value| {
            Value::Array(vec![
                bulk("name"),
                bulk(name),
                bulk("pending"),
                Value::Int(3),
                bulk("last-delivered-id"),
                bulk("7-0"),
                bulk("lag"),
                lag,
            ])
        };
        let reply = Value::Array(vec![group("other", Value::Int(9)), group("g", Value::Int(4))]);
        assert_eq!(group_info(&reply, "g"), Some(GroupInfo { lag: Some(4), last: "7-0".into(), pending: 3 }));
        let unknown = Value::Array(vec![group("g", Value::Nil)]);
        assert_eq!(group_info(&unknown, "g").and_then(|g| g.lag), None);
        assert_eq!(group_info(&reply, "missing"), None);
    }
}

#[cfg(test)]
mod fuzz;
