//! The broker-neutral message, the delivery that carries it through the router, and
//! the settlement a delivery ends with.
//!
//! A [`Delivery`] is settled once: after [`Delivery::settle`] succeeded there is
//! nothing left to settle. A settlement the broker refuses (a dead-letter exchange
//! that does not exist, a full disk) leaves the delivery as it was, still held at the
//! broker, so the engine can try the same settlement again: never the handler. One
//! that is dropped unsettled (a task aborted at the end of the shutdown grace period,
//! a panic) hands its message back to the broker through [`Settle::abandon`], so it is
//! redelivered rather than lost.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

/// Header names the router writes and reads. They travel with a message through
/// retries and into dead-letter destinations, on every broker.
pub mod header {
    /// Attempt number of the delivery that carries it (1 for the first delivery).
    pub const ATTEMPT: &str = "x-router-attempt";
    /// Why the message was dead-lettered.
    pub const REASON: &str = "x-router-reason";
    /// How many delivery attempts were made before dead-lettering.
    pub const ATTEMPTS: &str = "x-router-attempts";
    /// The last failure: HTTP status and body excerpt, or exception, or routing error.
    pub const LAST_ERROR: &str = "x-router-last-error";
    /// RFC 3339 time of the first failed attempt.
    pub const FIRST_FAILURE: &str = "x-router-first-failure";
    /// RFC 3339 time of the last failed attempt.
    pub const LAST_FAILURE: &str = "x-router-last-failure";
    /// Route and handler that failed (absent when no route matched).
    pub const ROUTE: &str = "x-router-route";
    pub const HANDLER: &str = "x-router-handler";
    /// Subscription the message was consumed through.
    pub const SUBSCRIPTION: &str = "x-router-subscription";
    /// Where the message originally came from (broker-specific values).
    pub const ORIGINAL_EXCHANGE: &str = "x-router-original-exchange";
    pub const ORIGINAL_ROUTING_KEY: &str = "x-router-original-routing-key";
    pub const ORIGINAL_QUEUE: &str = "x-router-original-queue";
    pub const ORIGINAL_STREAM: &str = "x-router-original-stream";
    /// Id of the stream entry the message first arrived as (Redis).
    pub const ORIGINAL_ID: &str = "x-router-original-id";
    /// When a waiting retry is due, in milliseconds since the Unix epoch.
    pub const DUE: &str = "x-router-due";
    /// The id the router gave a message that arrived without one (AMQP without
    /// `message_id`), kept on its retry copies and dead letter so every attempt
    /// carries the same `ce-id`.
    pub const MESSAGE_ID: &str = "x-router-message-id";
    /// W3C trace context (README "Tracing"): read to continue the producer's trace,
    /// replaced on retry copies and dead letters by the router's consumer span.
    pub const TRACEPARENT: &str = "traceparent";
    /// When a dead letter was put back on its source (`message-router dlq replay`).
    pub const REPLAYED: &str = "x-router-replayed";
}

/// One message as the router sees it, whatever broker it came from.
#[derive(Clone, Debug, Default)]
pub struct Message {
    /// Broker message id, or a generated UUID when the producer set none.
    pub id: String,
    /// The payload. Never assumed to be UTF-8 or JSON.
    pub body: Bytes,
    /// Textual metadata (AMQP headers, Kafka headers, Redis fields).
    pub headers: BTreeMap<String, String>,
    /// Routing key (AMQP), record key (Kafka); what route globs match against.
    pub key: Option<String>,
    pub content_type: Option<String>,
    /// Message type (AMQP `type` property); becomes the CloudEvents `type`.
    pub kind: Option<String>,
    pub timestamp: Option<SystemTime>,
    /// Where the message came from, without credentials (CloudEvents `source`).
    pub source: String,
}

/// What happens to a delivery at the broker. Produced by the engine from the
/// handler's [`crate::Outcome`] and the retry policy, applied by the transport.
#[derive(Clone, Debug, PartialEq)]
pub enum Settlement {
    /// Handled: remove it from the broker.
    Ack,
    /// Durably re-enqueue for attempt `next_attempt` after `after`, then remove the
    /// original. The publish must be confirmed before the original is acked.
    Retry { after: Duration, next_attempt: u32, failure: Failure },
    /// Durably write to the dead-letter destination, then remove the original.
    DeadLetter(Failure),
    /// Give it back to the broker unsettled (shutdown): it will be redelivered.
    Release,
}

/// Everything a dead-letter record or a retried message carries about its failures.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    /// Why the message left the normal path ("max attempts exhausted", "no route" ...).
    pub reason: String,
    /// Attempts made so far.
    pub attempts: u32,
    /// The last error as the handler reported it.
    pub last_error: String,
    pub first_failure: SystemTime,
    pub last_failure: SystemTime,
    pub route: Option<String>,
    pub handler: Option<String>,
    /// W3C `traceparent` of the delivery's consumer span (tracing on): written on the
    /// retry copy or dead letter, so its next delivery continues the same trace.
    pub traceparent: Option<String>,
}

impl Failure {
    /// The headers every transport writes for this failure, so retries and
    /// dead-letter destinations look the same on every broker.
    pub fn headers(&self, subscription: &str) -> Vec<(&'static str, String)> {
        let mut out = vec![
            (header::REASON, self.reason.clone()),
            (header::ATTEMPTS, self.attempts.to_string()),
            (header::LAST_ERROR, self.last_error.clone()),
            (header::FIRST_FAILURE, rfc3339(self.first_failure)),
            (header::LAST_FAILURE, rfc3339(self.last_failure)),
            (header::SUBSCRIPTION, subscription.to_string()),
        ];
        if let Some(route) = &self.route {
            out.push((header::ROUTE, route.clone()));
        }
        if let Some(handler) = &self.handler {
            out.push((header::HANDLER, handler.clone()));
        }
        if let Some(tp) = &self.traceparent {
            out.push((header::TRACEPARENT, tp.clone()));
        }
        out
    }
}

/// RFC 3339 with millisecond precision, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Why a transport could not apply a settlement.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    /// Nothing happened at the broker, which still holds the message for this
    /// consumer (unacked): the same settlement may be tried again.
    #[error("{0}")]
    Failed(String),
    /// The broker no longer holds the message for this consumer (its channel closed,
    /// its partition was revoked, its group was destroyed): it is delivered again from
    /// the broker, and there is nothing left to settle here.
    #[error("{0}")]
    Gone(String),
}

/// The transport's half of a delivery: how to settle it at the broker.
#[async_trait]
pub trait Settle: Send + Sync {
    /// Apply the settlement. Durable publishes (retry, dead-letter) are confirmed by
    /// the broker before the original is acked. After [`SettleError::Failed`] the
    /// handle is unchanged and the same settlement may be applied again.
    async fn settle(&mut self, settlement: &Settlement) -> Result<(), SettleError>;

    /// The delivery was dropped without being settled: hand it back to the broker for
    /// redelivery. Called from `Drop`, so it must not block.
    fn abandon(self: Box<Self>);
}

/// A message in flight, with what the router knows of its history and the handle that
/// settles it at the broker.
pub struct Delivery {
    pub message: Message,
    /// 1 for a first delivery; carried across durable retries in [`header::ATTEMPT`].
    pub attempt: u32,
    /// Time of the first failed attempt, when this is a retry.
    pub first_failure: Option<SystemTime>,
    /// Set by the transport when the message could not be decoded (for example a
    /// header that is not text). The engine dead-letters such a message at once.
    pub defect: Option<String>,
    /// Set by the transport when the broker delivered this message before (AMQP
    /// `redelivered`, a Redis entry re-read or claimed): a consumer died or gave it
    /// back. Counted in `router_messages_redelivered_total`.
    pub redelivered: bool,
    /// Partition and offset (Kafka) or entry id (Redis), for the consumer span; set by
    /// the transport only while tracing is on ([`crate::trace::enabled`]).
    pub position: Option<crate::trace::Position>,
    handle: Option<Box<dyn Settle>>,
}

impl Delivery {
    /// A delivery for `message`, reading the attempt count and first-failure time from
    /// the router's own headers.
    pub fn new(message: Message, handle: Box<dyn Settle>) -> Self {
        let attempt = message
            .headers
            .get(header::ATTEMPT)
            .and_then(|a| a.trim().parse::<u32>().ok())
            .filter(|a| *a >= 1)
            .unwrap_or(1);
        let first_failure =
            message.headers.get(header::FIRST_FAILURE).and_then(|t| humantime::parse_rfc3339_weak(t).ok());
        Delivery {
            message,
            attempt,
            first_failure,
            defect: None,
            redelivered: false,
            position: None,
            handle: Some(handle),
        }
    }

    /// The failure record of this delivery's current attempt, failed `now`.
    pub fn failure(
        &self,
        reason: String,
        last_error: String,
        route: Option<&str>,
        handler: Option<&str>,
        now: SystemTime,
    ) -> Failure {
        Failure {
            reason,
            attempts: self.attempt,
            last_error,
            first_failure: self.first_failure.unwrap_or(now),
            last_failure: now,
            route: route.map(str::to_string),
            handler: handler.map(str::to_string),
            traceparent: None,
        }
    }

    /// Settle at the broker. After `Ok` (or [`SettleError::Gone`]) there is nothing
    /// left to settle; after [`SettleError::Failed`] the delivery is still held and the
    /// same settlement can be tried again.
    pub async fn settle(&mut self, settlement: &Settlement) -> Result<(), SettleError> {
        let Some(handle) = self.handle.as_mut() else {
            return Err(SettleError::Gone("delivery already settled".into()));
        };
        let result = handle.settle(settlement).await;
        if !matches!(result, Err(SettleError::Failed(_))) {
            self.handle = None;
        }
        result
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abandon();
        }
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.message.id)
            .field("attempt", &self.attempt)
            .field("defect", &self.defect)
            .finish_non_exhaustive()
    }
}
