//! How handlers are reached. A target knows nothing of brokers: it gets a message and
//! its delivery metadata and answers with an [`Outcome`]. The daemon implements it with
//! HTTP endpoint pools; the PHP extension with PHP callables.

use async_trait::async_trait;

use crate::message::Message;
use crate::retry::Outcome;

/// What a target is told about one delivery attempt.
#[derive(Clone, Copy, Debug)]
pub struct DeliveryInfo<'a> {
    pub message: &'a Message,
    /// 1-based attempt number.
    pub attempt: u32,
    pub subscription: &'a str,
    pub route: &'a str,
    pub handler: &'a str,
    /// W3C `traceparent` of this attempt's span when tracing is on: what the target
    /// sends the handler (instead of the message's own), so the handler's spans are
    /// children of the attempt. `None` with tracing off.
    pub traceparent: Option<&'a str>,
}

#[async_trait]
pub trait Target: Send + Sync {
    /// Deliver one message and report how it went. Must not panic on any input; a
    /// failure is an `Outcome::Retry` or `Outcome::Reject` with a reason.
    async fn deliver(&self, delivery: DeliveryInfo<'_>) -> Outcome;
}
