//! Dead letters as an operator sees them, whatever broker holds them: what a
//! transport reads from a subscription's dead-letter destination ([`DeadLetter`]), the
//! filters of `message-router dlq ...` ([`Filter`]) and the summary of `dlq stats`
//! ([`Stats`]). Reading is the transports' job ([`crate::Transport::dead_letters`]);
//! nothing here touches a broker.

use std::collections::BTreeMap;
use std::time::SystemTime;

use crate::message::{header, Message};

/// One dead letter, with what the router wrote about its failures.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// How `dlq show` names it: the message id on AMQP (a queue has no other
    /// address), `<stream>/<entry id>` on Redis, `<topic>/<partition>/<offset>` on
    /// Kafka.
    pub id: String,
    /// The dead-letter queue, stream or topic.
    pub destination: String,
    pub message: Message,
}

impl DeadLetter {
    fn header(&self, name: &str) -> Option<&str> {
        self.message.headers.get(name).map(String::as_str)
    }

    /// `x-router-reason`; "unknown" for a message the router did not dead-letter.
    pub fn reason(&self) -> &str {
        self.header(header::REASON).unwrap_or("unknown")
    }

    pub fn route(&self) -> Option<&str> {
        self.header(header::ROUTE)
    }

    pub fn subscription(&self) -> Option<&str> {
        self.header(header::SUBSCRIPTION)
    }

    /// When it was dead-lettered (its last failure).
    pub fn when(&self) -> Option<SystemTime> {
        self.header(header::LAST_FAILURE).and_then(|t| humantime::parse_rfc3339_weak(t).ok())
    }

    /// Where it came from: the original queue, stream or topic (and exchange, key).
    pub fn origin(&self) -> String {
        let parts: Vec<String> = [
            ("queue", header::ORIGINAL_QUEUE),
            ("stream", header::ORIGINAL_STREAM),
            ("exchange", header::ORIGINAL_EXCHANGE),
            ("routing key", header::ORIGINAL_ROUTING_KEY),
        ]
        .iter()
        .filter_map(|(what, name)| self.header(name).map(|v| format!("{what} {v:?}")))
        .collect();
        if parts.is_empty() {
            self.message.source.clone()
        } else {
            parts.join(", ")
        }
    }

    /// The `x-router-*` headers, in name order.
    pub fn router_headers(&self) -> impl Iterator<Item = (&String, &String)> {
        self.message.headers.iter().filter(|(k, _)| k.starts_with("x-router-"))
    }

    /// The first `max` bytes of the body as text: UTF-8 as it is, any other byte as
    /// `\xNN`, control characters escaped, so a binary body cannot disturb a terminal.
    pub fn body_excerpt(&self, max: usize) -> String {
        let body = &self.message.body;
        let cut = &body[..body.len().min(max)];
        let mut out = String::new();
        for chunk in cut.utf8_chunks() {
            for c in chunk.valid().chars() {
                if c.is_control() && c != '\n' {
                    out.extend(c.escape_default());
                } else {
                    out.push(c);
                }
            }
            for b in chunk.invalid() {
                out.push_str(&format!("\\x{b:02x}"));
            }
        }
        if body.len() > max {
            out.push_str(&format!("… ({} bytes in all)", body.len()));
        }
        out
    }
}

/// What a dead letter carries about its failures: dropped from a replayed copy, which
/// starts again at attempt 1.
pub const FAILURE_HEADERS: &[&str] = &[
    header::REASON,
    header::ATTEMPTS,
    header::LAST_ERROR,
    header::FIRST_FAILURE,
    header::LAST_FAILURE,
    header::ROUTE,
    header::HANDLER,
    header::SUBSCRIPTION,
    header::ATTEMPT,
    header::DUE,
];

/// The `x-router-replayed` of a copy replayed now.
pub fn replayed_now() -> String {
    crate::message::rfc3339(SystemTime::now())
}

/// A dead letter's headers as its replayed copy carries them: without
/// [`FAILURE_HEADERS`], with `x-router-replayed` (origin, message id and the
/// producer's headers kept).
pub fn replay_headers(headers: &mut BTreeMap<String, String>) {
    headers.retain(|k, _| !FAILURE_HEADERS.contains(&k.as_str()));
    headers.insert(header::REPLAYED.to_string(), replayed_now());
}

/// Which dead letters a `dlq` command is about. Every set condition must hold.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// The reason contains this text, or matches this regular expression.
    pub reason: Option<regex::Regex>,
    pub route: Option<String>,
    /// Dead-lettered at or after / before.
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
    /// These ids only.
    pub ids: Vec<String>,
}

impl Filter {
    pub fn matches(&self, d: &DeadLetter) -> bool {
        let when = d.when();
        self.reason.as_ref().is_none_or(|r| r.is_match(d.reason()))
            && self.route.as_deref().is_none_or(|r| d.route() == Some(r))
            && self.since.is_none_or(|s| when.is_some_and(|w| w >= s))
            && self.until.is_none_or(|u| when.is_some_and(|w| w < u))
            && (self.ids.is_empty() || self.ids.contains(&d.id))
    }
}

/// What `dlq stats` reports of one subscription's dead letters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub count: u64,
    pub by_reason: BTreeMap<String, u64>,
    pub by_route: BTreeMap<String, u64>,
    pub oldest: Option<SystemTime>,
    pub newest: Option<SystemTime>,
}

impl Stats {
    pub fn add(&mut self, d: &DeadLetter) {
        self.count += 1;
        *self.by_reason.entry(d.reason().to_string()).or_default() += 1;
        *self.by_route.entry(d.route().unwrap_or("(none)").to_string()).or_default() += 1;
        if let Some(w) = d.when() {
            self.oldest = Some(self.oldest.map_or(w, |o| o.min(w)));
            self.newest = Some(self.newest.map_or(w, |n| n.max(w)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn letter(id: &str, reason: &str, route: Option<&str>, when: &str) -> DeadLetter {
        let mut message = Message { body: Bytes::from_static(b"{}"), ..Message::default() };
        message.headers.insert(header::REASON.into(), reason.into());
        message.headers.insert(header::LAST_FAILURE.into(), when.into());
        if let Some(r) = route {
            message.headers.insert(header::ROUTE.into(), r.into());
        }
        DeadLetter { id: id.into(), destination: "q.dlq".into(), message }
    }

    #[test]
    fn filters_combine() {
        let a = letter("1", "max attempts exhausted", Some("orders"), "2026-12-01T10:00:00Z");
        let b = letter("2", "no route", None, "2026-12-02T10:00:00Z");
        let t = |s: &str| humantime::parse_rfc3339(s).expect("time");
        let by_reason = Filter { reason: Some(regex::Regex::new("attempts").expect("re")), ..Filter::default() };
        assert!(by_reason.matches(&a) && !by_reason.matches(&b));
        let by_route = Filter { route: Some("orders".into()), ..Filter::default() };
        assert!(by_route.matches(&a) && !by_route.matches(&b));
        let window = Filter { since: Some(t("2026-12-02T00:00:00Z")), ..Filter::default() };
        assert!(!window.matches(&a) && window.matches(&b));
        let until = Filter { until: Some(t("2026-12-02T00:00:00Z")), ..Filter::default() };
        assert!(until.matches(&a) && !until.matches(&b));
        let ids = Filter { ids: vec!["2".into()], ..Filter::default() };
        assert!(!ids.matches(&a) && ids.matches(&b));
        assert!(Filter::default().matches(&a) && Filter::default().matches(&b));
    }

    #[test]
    fn stats_count_reasons_routes_and_times() {
        let mut s = Stats::default();
        s.add(&letter("1", "no route", None, "2026-12-02T10:00:00Z"));
        s.add(&letter("2", "no route", None, "2026-12-01T10:00:00Z"));
        s.add(&letter("3", "rejected", Some("orders"), "2026-12-03T10:00:00Z"));
        assert_eq!(s.count, 3);
        assert_eq!(s.by_reason["no route"], 2);
        assert_eq!(s.by_route["orders"], 1);
        assert_eq!(s.by_route["(none)"], 2);
        assert_eq!(s.oldest, humantime::parse_rfc3339("2026-12-01T10:00:00Z").ok());
        assert_eq!(s.newest, humantime::parse_rfc3339("2026-12-03T10:00:00Z").ok());
    }

    #[test]
    fn a_binary_body_is_shown_safely() {
        let mut d = letter("1", "r", None, "2026-12-01T10:00:00Z");
        d.message.body = Bytes::from_static(b"ok\x00\xff\x1b[31mred");
        assert_eq!(d.body_excerpt(64), "ok\\u{0}\\xff\\u{1b}[31mred");
        assert_eq!(d.body_excerpt(2), "ok… (12 bytes in all)");
    }
}
