//! Settling Kafka messages: an ack settles the offset (the commit point moves when
//! every earlier offset of the partition is settled too); a retry waits in its lane
//! (in place) or is produced to the retry topic; a dead letter is produced to the
//! dead-letter topic. Produces are acks=all and awaited before the offset is settled;
//! a produce that fails leaves the message unsettled and in flight, so the engine can
//! try the same settlement again (the handler is not called again).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::mpsc;

use super::convert::{field, Record};
use super::lanes::Lane;
use super::state::{Part, State};
use crate::message::{header, Settle, SettleError, Settlement};

/// How long a produce (retry, dead letter) may take before it counts as failed.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(30);

/// A message read and not yet handed to the pipeline, or out and not yet finished.
pub struct Pending {
    pub record: Record,
    pub lane: Lane,
    pub generation: u64,
    /// Set when it is delivered again in place (the attempt it is at).
    pub attempt: Option<u32>,
    pub first_failure: Option<SystemTime>,
}

impl Pending {
    pub fn part(&self) -> Part {
        (self.record.topic.clone(), self.record.partition)
    }
}

/// What handles tell the consume loop.
pub enum Event {
    /// The lane's message is finished: hand out the next one. The flag says whether
    /// it counted toward the read-ahead bound (retry-topic messages do not).
    Free(Lane, bool),
    /// Deliver this message again (an in-place retry, a retry that came due).
    Again(Pending),
}

/// What every handle of a subscription needs.
pub struct Shared {
    pub state: Arc<State>,
    pub producer: FutureProducer,
    pub retry_topic: String,
    pub dead_letter: Option<String>,
    pub in_place_max: Duration,
    pub subscription: String,
}

impl Shared {
    /// Pause a retry partition while a message of it waits (`hold`), resume it when
    /// none does any more.
    pub fn hold(&self, part: &Part, hold: bool) {
        self.state.pause_reason(part, |p| {
            p.waiting = if hold { p.waiting + 1 } else { p.waiting.saturating_sub(1) };
        });
    }
}

/// The Kafka half of a delivery.
pub struct KafkaHandle {
    pub shared: Arc<Shared>,
    pub events: mpsc::UnboundedSender<Event>,
    pub pending: Option<Pending>,
}

impl KafkaHandle {
    fn finish(&mut self, settled: bool) {
        let Some(p) = self.pending.take() else { return };
        self.shared.state.finish(&p.part(), p.generation, p.record.offset, settled);
        let counted = p.record.topic != self.shared.retry_topic;
        let _ = self.events.send(Event::Free(p.lane, counted));
    }

    /// Deliver again after `after`, keeping the lane (an in-place retry).
    fn again(&mut self, after: Duration, attempt: u32, first_failure: Option<SystemTime>) {
        let Some(mut p) = self.pending.take() else { return };
        // Not settled (the offset stays open), but no longer in flight for a revoke to
        // wait on.
        self.shared.state.finish(&p.part(), p.generation, p.record.offset, false);
        p.attempt = Some(attempt);
        p.first_failure = first_failure;
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = events.send(Event::Again(p));
        });
    }

    /// Produce a copy to `topic`, then settle the offset. When the produce fails,
    /// nothing is settled: the engine tries again.
    async fn durable(
        &mut self,
        topic: &str,
        extra: Vec<(&'static str, String)>,
        what: &str,
    ) -> Result<(), SettleError> {
        let Some(p) = &self.pending else { return Err(SettleError::Gone("already settled".into())) };
        let headers = p.record.republish_headers(extra);
        produce(&self.shared.producer, topic, p.record.key.as_ref(), &p.record.payload, &headers)
            .await
            .map_err(|e| SettleError::Failed(format!("{what} in topic {topic:?}: {e}")))?;
        self.finish(true);
        Ok(())
    }
}

#[async_trait]
impl Settle for KafkaHandle {
    async fn settle(&mut self, settlement: &Settlement) -> Result<(), SettleError> {
        let current = self.pending.as_ref().is_some_and(|p| self.shared.state.is_current(&p.part(), p.generation));
        if !current {
            // Revoked meanwhile (a rebalance that waited for it in vain): the next owner
            // starts at the committed offset, before this one.
            self.finish(false);
            return Err(SettleError::Gone("its partition was revoked; its next owner delivers it again".into()));
        }
        let subscription = self.shared.subscription.clone();
        match settlement {
            Settlement::Ack => self.finish(true),
            Settlement::Release => self.finish(false),
            Settlement::Retry { after, next_attempt, failure } if *after <= self.shared.in_place_max => {
                self.again(*after, *next_attempt, Some(failure.first_failure));
            }
            Settlement::Retry { after, next_attempt, failure } => {
                let mut extra =
                    vec![(header::ATTEMPT, next_attempt.to_string()), (field::DUE, super::due_ms(*after).to_string())];
                extra.extend(failure.headers(&subscription));
                let topic = self.shared.retry_topic.clone();
                self.durable(&topic, extra, "scheduling the retry").await?;
            }
            Settlement::DeadLetter(failure) => {
                let origin = self.pending.as_ref().map(|p| p.record.origin_topic()).unwrap_or_default();
                let topic = self.shared.dead_letter.clone().unwrap_or_else(|| format!("{origin}.dlq"));
                self.durable(&topic, failure.headers(&subscription), "writing the dead letter").await?;
            }
        }
        Ok(())
    }

    fn abandon(mut self: Box<Self>) {
        self.finish(false);
    }
}

impl Drop for KafkaHandle {
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// Produce one record (acks=all) and wait for the broker's answer.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    key: Option<&Bytes>,
    payload: &Bytes,
    headers: &[(String, Option<Bytes>)],
) -> Result<(), String> {
    let mut owned = OwnedHeaders::new_with_capacity(headers.len());
    for (k, v) in headers {
        owned = owned.insert(Header { key: k, value: v.as_deref() });
    }
    let mut record = FutureRecord::to(topic).payload(payload.as_ref()).headers(owned);
    if let Some(k) = key {
        record = record.key(k.as_ref());
    }
    producer.send(record, PRODUCE_TIMEOUT).await.map(|_| ()).map_err(|(e, _): (KafkaError, _)| e.to_string())
}
