//! Durable retries on RabbitMQ, moved back by the router itself.
//!
//! A retry waits as a persistent message in a delay queue `<queue>.retry.<bucket>`
//! with its due time in the `x-router-due` header. The queues have no TTL and no
//! dead-letter exchange: RabbitMQ never moves a retry by itself, because its TTL
//! expiry dead-letters at most once (a broker that stops at that instant drops the
//! message). Instead every router instance consuming the subscription runs a mover:
//! it consumes the delay queues, holds each copy (unacked) until it is due, publishes
//! it to `<queue>` with a publisher confirm, and only then acks the copy.
//!
//! Why no retry can be lost, whatever instant the broker, the router or the network
//! fails: the copy is written (confirmed, persistent, durable queue) before the
//! original is acked; it is removed from its delay queue only by an ack sent after the
//! broker confirmed the copy back in `<queue>`. A failure between two steps leaves the
//! message in both places (a duplicate), never in neither. Unacked copies of a closed
//! channel go back to their delay queue.
//!
//! Buckets: a delay goes to the first bucket at least as long (1s, 5s, 30s, 2m, 10m,
//! 1h, 6h, 24h), so a subscription has exactly eight delay queues whatever its jitter,
//! declared at every session start and consumed by the mover from then on (a bounded,
//! predictable set; copies left by an earlier run or another instance are found
//! because every bucket is always consumed). The mover holds up to [`MOVER_PREFETCH`]
//! copies per queue, each on its own timer, so retries of different delays in one
//! bucket come back on time; only when more than that wait in one bucket can a later
//! copy wait for earlier ones (at most the bucket's width).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::stream::SelectAll;
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, Consumer};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::time::DelayQueue;
use tracing::{debug, warn};

use super::convert::to_text;
use super::publisher::{PublishError, Publisher};
use crate::backoff;
use crate::message::header;

/// Delay buckets: (longest delay, queue name suffix).
const BUCKETS: [(Duration, &str); 8] = [
    (Duration::from_secs(1), "1s"),
    (Duration::from_secs(5), "5s"),
    (Duration::from_secs(30), "30s"),
    (Duration::from_secs(120), "2m"),
    (Duration::from_secs(600), "10m"),
    (Duration::from_secs(3600), "1h"),
    (Duration::from_secs(6 * 3600), "6h"),
    (Duration::MAX, "24h"),
];

/// Copies the mover holds per delay queue while they wait for their time.
pub const MOVER_PREFETCH: u16 = 256;
/// How often the mover checks that every delay queue is still consumed (the broker
/// cancels a consumer whose queue an operator deleted).
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// How often a move the broker keeps refusing is logged.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The delay queue of `queue` for a retry due after `after`.
pub fn delay_queue(queue: &str, after: Duration) -> String {
    let suffix = BUCKETS.iter().find(|(max, _)| after <= *max).map_or("24h", |(_, s)| s);
    format!("{queue}.retry.{suffix}")
}

/// Every delay queue `queue` can have.
pub fn delay_queues(queue: &str) -> impl Iterator<Item = String> + '_ {
    BUCKETS.iter().map(move |(_, s)| format!("{queue}.retry.{s}"))
}

/// Milliseconds since the Unix epoch, `after` from now: the `x-router-due` value.
pub fn due_ms(after: Duration) -> u64 {
    let due = SystemTime::now() + after;
    due.duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Declare every delay queue of `queue` (durable, no TTL, no dead-lettering).
pub async fn declare_all(connection: &Connection, queue: &str) -> Result<(), String> {
    for name in delay_queues(queue) {
        super::settle::declare_owned_queue(connection, &name, FieldTable::default()).await?;
    }
    Ok(())
}

/// Move due retries of `queue`'s delay queues back to `queue` until `stop`. `held`
/// counts the copies this mover holds unacked (the broker counts them as neither
/// ready nor gone), for `router_retries_waiting`.
pub async fn run_mover(
    connection: Arc<Connection>,
    publisher: Arc<Publisher>,
    queue: String,
    held: Arc<AtomicU64>,
    stop: CancellationToken,
) {
    let mut backoff = backoff::reconnect(Duration::from_secs(30));
    while !stop.is_cancelled() {
        let session = mover_session(&connection, &publisher, &queue, &held, &stop).await;
        held.store(0, Ordering::Relaxed);
        match session {
            Ok(()) => return,
            Err(e) => {
                if !connection.status().connected() {
                    // The session's connection is gone: the session restarts us.
                    return;
                }
                let wait = backoff.next_delay();
                warn!(queue = %queue, error = %e, retry_in = ?wait, "retry mover failed; starting it again");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// One mover channel: consume the delay queues, hold each copy until due, move it.
async fn mover_session(
    connection: &Connection,
    publisher: &Arc<Publisher>,
    queue: &str,
    held: &AtomicU64,
    stop: &CancellationToken,
) -> Result<(), String> {
    // Declared again here too: an operator may have deleted one (the broker then
    // cancelled its consumer and this session starts over).
    declare_all(connection, queue).await?;
    let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    channel.basic_qos(MOVER_PREFETCH, BasicQosOptions { global: false }).await.map_err(|e| e.to_string())?;
    let mut consumers: SelectAll<Consumer> = SelectAll::new();
    for name in delay_queues(queue) {
        consumers.push(consume(&channel, &name).await?);
    }
    let all = consumers.len();
    let mut waiting: DelayQueue<lapin::message::Delivery> = DelayQueue::new();
    let mut moving: JoinSet<()> = JoinSet::new();
    let mut check = tokio::time::interval(CHECK_EVERY);
    loop {
        held.store((waiting.len() + moving.len()) as u64, Ordering::Relaxed);
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = check.tick() => {
                if consumers.len() < all {
                    return Err(format!("the broker cancelled a consumer of the delay queues of {queue:?} (was one deleted?)"));
                }
            }
            Some(next) = consumers.next(), if !consumers.is_empty() => {
                let d = next.map_err(|e| format!("consuming delay queues of {queue:?}: {e}"))?;
                let due = d.properties.headers().as_ref()
                    .and_then(|h| h.inner().get(header::DUE))
                    .and_then(|v| to_text(v).ok())
                    .and_then(|t| t.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                let wait = Duration::from_millis(due.saturating_sub(due_ms(Duration::ZERO)));
                waiting.insert_at(d, tokio::time::Instant::now() + wait);
            }
            Some(expired) = waiting.next(), if !waiting.is_empty() => {
                let d = expired.into_inner();
                let (publisher, queue) = (publisher.clone(), queue.to_string());
                moving.spawn(async move { move_back(d, &publisher, &queue).await });
            }
            Some(_) = moving.join_next(), if !moving.is_empty() => {}
        }
    }
    // Moves under way finish (their acks land); copies still waiting go back to
    // their delay queues when the channel closes.
    while moving.join_next().await.is_some() {}
    drop(waiting);
    if channel.status().connected() {
        let _ = channel.close(200, ShortString::from("retry mover stopped")).await;
    }
    Ok(())
}

async fn consume(channel: &lapin::Channel, name: &str) -> Result<Consumer, String> {
    channel
        .basic_consume(
            ShortString::from(name),
            ShortString::from(format!("message-router/mover/{}", uuid::Uuid::new_v4())),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| format!("consuming delay queue {name:?}: {e}"))
}

/// Publish a due copy to `queue` (confirmed), then ack it in its delay queue. A
/// refused publish is tried again with backoff while the copy stays held; when the
/// mover's channel is gone, the copy is back in its delay queue already.
async fn move_back(d: lapin::message::Delivery, publisher: &Publisher, queue: &str) {
    let props = without_due(&d.properties);
    let mut backoff = backoff::settle();
    let mut warned: Option<std::time::Instant> = None;
    loop {
        match publisher.publish("", queue, &d.data, props.clone()).await {
            Ok(()) => break,
            Err(PublishError::Disconnected(_)) => return,
            Err(PublishError::Refused(e)) => {
                if warned.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    warned = Some(std::time::Instant::now());
                    warn!(queue, error = %e, "moving a due retry back was refused; trying again (it stays in its delay queue meanwhile)");
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
    if let Err(e) = d.acker.ack(BasicAckOptions::default()).await {
        // The copy stays in its delay queue and is moved again: a duplicate, never a loss.
        debug!(queue, error = %e, "ack of a moved retry failed");
    }
}

/// The copy's properties without its due time (it is due now).
fn without_due(props: &BasicProperties) -> BasicProperties {
    let mut table = props.headers().clone().unwrap_or_default();
    let inner: std::collections::BTreeMap<ShortString, AMQPValue> =
        table.inner().iter().filter(|(k, _)| k.as_str() != header::DUE).map(|(k, v)| (k.clone(), v.clone())).collect();
    table = FieldTable::from(inner);
    props.clone().with_headers(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_go_to_the_first_bucket_at_least_as_long() {
        let q = |ms| delay_queue("orders", Duration::from_millis(ms));
        assert_eq!(q(0), "orders.retry.1s");
        assert_eq!(q(200), "orders.retry.1s");
        assert_eq!(q(1000), "orders.retry.1s");
        assert_eq!(q(1001), "orders.retry.5s");
        assert_eq!(q(45_000), "orders.retry.2m");
        assert_eq!(q(86_400_000), "orders.retry.24h");
        assert_eq!(delay_queue("orders", Duration::from_secs(1 << 40)), "orders.retry.24h");
        // Jittered sub-second delays share one queue.
        let names: std::collections::HashSet<String> = (100..1000).map(q).collect();
        assert_eq!(names.len(), 1);
        assert_eq!(delay_queues("q").count(), 8);
    }

    #[test]
    fn a_moved_copy_loses_only_its_due_time() {
        let mut t = FieldTable::default();
        t.insert(header::DUE.into(), AMQPValue::LongString("123".into()));
        t.insert(header::ATTEMPT.into(), AMQPValue::LongString("2".into()));
        let props = BasicProperties::default().with_headers(t).with_message_id("m".into());
        let out = without_due(&props);
        let h = out.headers().clone().unwrap_or_default();
        assert!(!h.inner().contains_key(header::DUE));
        assert_eq!(h.inner().get(header::ATTEMPT), Some(&AMQPValue::LongString("2".into())));
        assert_eq!(out.message_id().as_ref().map(|s| s.as_str()), Some("m"));
    }
}
