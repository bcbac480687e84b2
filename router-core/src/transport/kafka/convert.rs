//! Kafka records ↔ the router's message model.
//!
//! Headers become message headers when their values are UTF-8 text; one that is not
//! makes the message defective (dead-lettered with the reason). The record key is
//! kept as bytes for ordering and re-publishing, and shown to handlers as the header
//! `kafka-key` (`kafka-key-hex` when it is not text). The routing key is the topic
//! (the original one for a message coming back from the retry topic), so routes glob
//! over topic names. `message_id` or `ce_id` headers name the message; without them
//! its id is `<topic>-<partition>-<offset>` of where it first arrived.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use rdkafka::message::{BorrowedMessage, Headers, Message as _};

use crate::message::Message;

/// Header names of the Kafka transport (beside the router's own `x-router-*`).
pub mod field {
    pub use crate::transport::field::{CONTENT_TYPE, MESSAGE_ID, TYPE};
    /// The CloudEvents Kafka binding's id header.
    pub const CE_ID: &str = "ce_id";
    pub const KEY: &str = "kafka-key";
    pub const KEY_HEX: &str = "kafka-key-hex";
    /// When a message in the retry topic is due, in ms since the epoch.
    pub use crate::message::header::DUE;
    pub const ORIGINAL_TOPIC: &str = "x-router-original-topic";
    pub const ORIGINAL_PARTITION: &str = "x-router-original-partition";
    pub const ORIGINAL_OFFSET: &str = "x-router-original-offset";
}

/// A record as read, owned, with what settling it needs.
#[derive(Clone, Debug)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Bytes>,
    pub payload: Bytes,
    /// Raw headers, values as bytes (`None`: a null value).
    pub headers: Vec<(String, Option<Bytes>)>,
    pub timestamp_ms: Option<i64>,
}

impl Record {
    pub fn from_borrowed(m: &BorrowedMessage<'_>) -> Self {
        let headers = m
            .headers()
            .map(|h| h.iter().map(|h| (h.key.to_string(), h.value.map(Bytes::copy_from_slice))).collect())
            .unwrap_or_default();
        Record {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(Bytes::copy_from_slice),
            payload: m.payload().map(Bytes::copy_from_slice).unwrap_or_default(),
            headers,
            timestamp_ms: m.timestamp().to_millis(),
        }
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_ref())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The topic the message first arrived on (itself unless it is a retry).
    pub fn origin_topic(&self) -> String {
        self.header(field::ORIGINAL_TOPIC).unwrap_or_else(|| self.topic.clone())
    }

    /// The router's view of this record, and what could not be decoded.
    pub fn to_message(&self, source: &str) -> (Message, Option<String>) {
        let mut defect = None;
        let mut headers = BTreeMap::new();
        for (name, value) in &self.headers {
            let Some(value) = value else { continue };
            match std::str::from_utf8(value) {
                Ok(v) => {
                    headers.insert(name.clone(), v.to_string());
                }
                Err(_) => defect = Some(format!("header {name:?}: value is not valid UTF-8 text")),
            }
        }
        if let Some(key) = &self.key {
            match std::str::from_utf8(key) {
                Ok(k) => headers.insert(field::KEY.to_string(), k.to_string()),
                Err(_) => headers.insert(field::KEY_HEX.to_string(), hex::encode(key)),
            };
        }
        let origin = self.origin_topic();
        let first = match (headers.get(field::ORIGINAL_PARTITION), headers.get(field::ORIGINAL_OFFSET)) {
            (Some(p), Some(o)) => format!("{origin}-{p}-{o}"),
            _ => format!("{}-{}-{}", self.topic, self.partition, self.offset),
        };
        let id = [field::MESSAGE_ID, field::CE_ID]
            .iter()
            .find_map(|h| headers.get(*h).filter(|v| !v.is_empty()).cloned())
            .unwrap_or(first);
        let message = Message {
            id,
            body: self.payload.clone(),
            key: Some(origin.clone()),
            content_type: headers.get(field::CONTENT_TYPE).cloned(),
            kind: headers.get(field::TYPE).cloned(),
            timestamp: self
                .timestamp_ms
                .and_then(|ms| u64::try_from(ms).ok())
                .map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
            source: crate::transport::source_uri(source, &origin),
            headers,
        };
        (message, defect)
    }

    /// Headers for re-publishing (retry or dead letter): the original ones without the
    /// router's earlier bookkeeping, where it first came from, then `extra`.
    pub fn republish_headers(&self, extra: Vec<(&'static str, String)>) -> Vec<(String, Option<Bytes>)> {
        let origin = [
            (field::ORIGINAL_TOPIC, self.origin_topic()),
            (field::ORIGINAL_PARTITION, self.header(field::ORIGINAL_PARTITION).unwrap_or(self.partition.to_string())),
            (field::ORIGINAL_OFFSET, self.header(field::ORIGINAL_OFFSET).unwrap_or(self.offset.to_string())),
        ];
        // An extra replaces the original of the same name (a new `traceparent`).
        let mut out: Vec<(String, Option<Bytes>)> = self
            .headers
            .iter()
            .filter(|(n, _)| !n.starts_with("x-router-") && !extra.iter().any(|(e, _)| e == n))
            .cloned()
            .collect();
        for (name, value) in origin.into_iter().chain(extra) {
            out.push((name.to_string(), Some(Bytes::from(value))));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::header::ATTEMPT;

    fn record(headers: &[(&str, &[u8])]) -> Record {
        Record {
            topic: "orders".into(),
            partition: 2,
            offset: 40,
            key: Some(Bytes::from_static(b"customer-7")),
            payload: Bytes::from_static(b"{}"),
            headers: headers.iter().map(|(n, v)| (n.to_string(), Some(Bytes::copy_from_slice(v)))).collect(),
            timestamp_ms: Some(1_700_000_000_000),
        }
    }

    #[test]
    fn ids_keys_and_headers() {
        let (m, defect) = record(&[("tenant", b"acme")]).to_message("kafka://b:9092");
        assert_eq!(defect, None);
        assert_eq!(m.id, "orders-2-40");
        assert_eq!(m.key.as_deref(), Some("orders"));
        assert_eq!(m.headers["kafka-key"], "customer-7");
        assert_eq!(m.headers["tenant"], "acme");
        assert_eq!(m.source, "kafka://b:9092/orders");
        let (m, _) = record(&[("message_id", b"m-1")]).to_message("k");
        assert_eq!(m.id, "m-1");
    }

    #[test]
    fn a_retry_keeps_its_origin() {
        let r = record(&[]);
        let headers = r.republish_headers(vec![(ATTEMPT, "2".into())]);
        let mut retried = r.clone();
        retried.topic = "group.retry".into();
        retried.offset = 3;
        retried.headers = headers;
        let (m, _) = retried.to_message("k");
        assert_eq!(m.id, "orders-2-40", "the id of where it first arrived");
        assert_eq!(m.key.as_deref(), Some("orders"), "routes see the original topic");
        let again = retried.republish_headers(vec![]);
        assert!(again.iter().any(|(n, v)| n == field::ORIGINAL_TOPIC && v.as_deref() == Some(&b"orders"[..])));
        assert!(!again.iter().any(|(n, _)| n == ATTEMPT), "stale router headers dropped");
    }

    #[test]
    fn undecodable_header_is_a_defect_binary_key_is_not() {
        let mut r = record(&[("h", &[0xff])]);
        assert!(r.to_message("k").1.unwrap_or_default().contains("header \"h\""));
        r.headers.clear();
        r.key = Some(Bytes::from_static(&[0, 0xff]));
        let (m, defect) = r.to_message("k");
        assert_eq!(defect, None);
        assert_eq!(m.headers["kafka-key-hex"], "00ff");
    }
}

#[cfg(test)]
mod fuzz;
