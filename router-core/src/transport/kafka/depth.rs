//! What waits at the broker for a Kafka subscription, for the gauges and the admin
//! API: the group's lag on the source topics and on the retry topic (the group's
//! committed offsets, read by a client of that group that never joins it), and the
//! records held by the dead-letter topics (high − low watermark).

use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::config::KafkaSource;
use super::{dlq, properties, KafkaTransport};
use crate::transport::{Depths, TransportError};

const TIMEOUT: Duration = Duration::from_secs(10);

/// The depths of `source`, asked by a client of its group kept for the next time.
pub async fn depths(t: &KafkaTransport, source: &KafkaSource) -> Result<Depths, TransportError> {
    let reader = {
        let mut readers = t.lag_readers.lock();
        match readers.get(&source.group) {
            Some(r) => r.clone(),
            None => {
                let mut c = t.client_config(properties::Role::Other);
                // Same group, never subscribed: it reads the group's offsets and
                // commits nothing.
                c.set("group.id", &source.group).set("enable.auto.commit", "false");
                let r: Arc<BaseConsumer> =
                    Arc::new(c.create().map_err(|e| TransportError::Broker(format!("kafka lag reader: {e}")))?);
                readers.insert(source.group.clone(), r.clone());
                r
            }
        }
    };
    let source = source.clone();
    tokio::task::spawn_blocking(move || {
        let sources = dlq::matching_topics(&reader, &source.topics, source.topic_pattern.as_deref(), "")?;
        Ok(Depths {
            backlog: Some(lag(&reader, &sources)?),
            retries_waiting: Some(lag(&reader, &[source.retry_topic()])?),
            dead_letters: Some(held(&reader, &dlq::topics(&reader, &source)?)?),
        })
    })
    .await
    .map_err(|e| TransportError::Broker(format!("kafka lag reader: {e}")))?
}

fn broker(e: rdkafka::error::KafkaError) -> TransportError {
    TransportError::Broker(e.to_string())
}

/// The partitions of `topic` (none when it does not exist yet).
fn partitions(consumer: &BaseConsumer, topic: &str) -> Result<Vec<i32>, TransportError> {
    let metadata = consumer.fetch_metadata(Some(topic), TIMEOUT).map_err(broker)?;
    Ok(metadata
        .topics()
        .first()
        .filter(|t| t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default())
}

/// Records of `topics` after the group's committed offsets (from the low watermark
/// where the group committed none).
fn lag(consumer: &BaseConsumer, topics: &[String]) -> Result<u64, TransportError> {
    let mut list = TopicPartitionList::new();
    for topic in topics {
        for p in partitions(consumer, topic)? {
            list.add_partition(topic, p);
        }
    }
    if list.count() == 0 {
        return Ok(0);
    }
    let committed = consumer.committed_offsets(list, TIMEOUT).map_err(broker)?;
    let mut waiting = 0u64;
    for e in committed.elements() {
        let (low, high) = consumer.fetch_watermarks(e.topic(), e.partition(), TIMEOUT).map_err(broker)?;
        waiting += waiting_after(e.offset(), low, high);
    }
    Ok(waiting)
}

/// Records of a partition holding `low..high` after the group's `committed` offset;
/// all of them when it committed none there (or one the partition no longer holds).
pub(super) fn waiting_after(committed: Offset, low: i64, high: i64) -> u64 {
    let from = match committed {
        Offset::Offset(o) if (low..=high).contains(&o) => o,
        _ => low,
    };
    u64::try_from(high - from).unwrap_or(0)
}

/// Records the partitions of `topics` hold now.
fn held(consumer: &BaseConsumer, topics: &[String]) -> Result<u64, TransportError> {
    let mut n = 0u64;
    for topic in topics {
        for p in partitions(consumer, topic)? {
            let (low, high) = consumer.fetch_watermarks(topic, p, TIMEOUT).map_err(broker)?;
            n += u64::try_from(high - low).unwrap_or(0);
        }
    }
    Ok(n)
}
