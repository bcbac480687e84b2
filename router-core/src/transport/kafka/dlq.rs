//! Reading a subscription's dead-letter topics back (`message-router dlq`): every
//! partition from its low to its high watermark as they are at the start, through a
//! consumer that joins no group and commits nothing. A replayed copy is produced
//! (acks=all, awaited) to the topic the record first came from; the dead letter stays,
//! as a log keeps every record until its retention: there is no purge.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::config::KafkaSource;
use super::convert::Record;
use super::{properties, KafkaTransport};
use crate::dlq::DeadLetter;
use crate::message::header;
use crate::transport::{Decide, Rework, Reworked, TransportError};

/// Why a Kafka dead letter cannot be purged, and what to do instead.
pub const PURGE_REFUSED: &str = "a Kafka topic is a log: its records leave it only by the topic's retention \
     (retention.ms), never one by one; `dlq replay` copies dead letters back and they stay in the dead-letter \
     topic (select them by --since/--until or --id to replay each once)";

/// How long the broker may stay silent while records are still expected.
const SILENCE: Duration = Duration::from_secs(30);
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn walk(
    t: &KafkaTransport,
    source: &KafkaSource,
    decide: Decide<'_>,
    pace: Duration,
) -> Result<Reworked, TransportError> {
    let mut c = t.client_config(properties::Role::Other);
    c.set("group.id", "message-router-dlq-reader")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer =
        c.create().map_err(|e| TransportError::Broker(format!("kafka dead-letter reader: {e}")))?;
    let source = source.clone();
    let display = t.display.clone();
    let (tx, mut rx) = mpsc::channel::<(DeadLetter, Record)>(256);
    let reader = tokio::task::spawn_blocking(move || scan(&consumer, &source, &display, &tx));
    let mut done = Reworked::default();
    let mut result = Ok(());
    while let Some((letter, record)) = rx.recv().await {
        let act = decide(&letter);
        match act {
            Rework::Keep => continue,
            Rework::Stop => break,
            Rework::Purge => {
                result = Err(TransportError::Unsupported(PURGE_REFUSED.into()));
                break;
            }
            Rework::Replay => {
                let producer = t.producer.as_ref().map_err(|e| TransportError::Broker(e.clone()))?;
                let topic = record.origin_topic();
                let headers = record.republish_headers(vec![(header::REPLAYED, crate::dlq::replayed_now())]);
                let sent =
                    super::settle::produce(producer, &topic, record.key.as_ref(), &record.payload, &headers).await;
                if let Err(reason) = sent {
                    result = Err(TransportError::NotConfirmed { destination: format!("topic {topic:?}"), reason });
                    break;
                }
                done.count(act);
                tokio::time::sleep(pace).await;
            }
        }
    }
    // Closing the channel stops the scan at its next record.
    drop(rx);
    reader.await.map_err(|e| TransportError::Broker(format!("dead-letter reader: {e}")))??;
    result.map(|()| done)
}

/// The dead-letter topics of `source`: its `dead_letter.topic`, else `<topic>.dlq` of
/// each source topic (with a `topic_pattern`: of each existing topic it matches).
pub(super) fn topics(consumer: &BaseConsumer, source: &KafkaSource) -> Result<Vec<String>, TransportError> {
    match &source.dead_letter.topic {
        Some(t) => Ok(vec![t.clone()]),
        None => matching_topics(consumer, &source.topics, source.topic_pattern.as_deref(), ".dlq"),
    }
}

/// `<topic><suffix>` of each of `topics`; with a `pattern`, the existing topics
/// named `<match><suffix>` where `<match>` matches it (anchored, as the consumer does).
pub(super) fn matching_topics(
    consumer: &BaseConsumer,
    topics: &[String],
    pattern: Option<&str>,
    suffix: &str,
) -> Result<Vec<String>, TransportError> {
    let Some(pattern) = pattern else {
        return Ok(topics.iter().map(|t| format!("{t}{suffix}")).collect());
    };
    let re = regex::Regex::new(&super::anchored(pattern))
        .map_err(|e| TransportError::Unsupported(format!("topic_pattern {pattern:?}: {e}")))?;
    let metadata =
        consumer.fetch_metadata(None, METADATA_TIMEOUT).map_err(|e| TransportError::Broker(e.to_string()))?;
    Ok(metadata
        .topics()
        .iter()
        .filter_map(|t| t.name().strip_suffix(suffix).filter(|base| re.is_match(base)).map(|_| t.name().to_string()))
        .collect())
}

fn scan(
    consumer: &BaseConsumer,
    source: &KafkaSource,
    display: &str,
    tx: &mpsc::Sender<(DeadLetter, Record)>,
) -> Result<(), TransportError> {
    let broker = |e: rdkafka::error::KafkaError| TransportError::Broker(e.to_string());
    let mut assignment = TopicPartitionList::new();
    // The last offset to read of each partition (high watermark − 1 at the start).
    let mut last: HashMap<(String, i32), i64> = HashMap::new();
    for topic in topics(consumer, source)? {
        let metadata = consumer.fetch_metadata(Some(&topic), METADATA_TIMEOUT).map_err(broker)?;
        let Some(partitions) = metadata.topics().first().filter(|t| t.error().is_none()).map(|t| t.partitions().len())
        else {
            continue; // not created yet: nothing dead-lettered there
        };
        for p in 0..partitions {
            let p = i32::try_from(p).unwrap_or(i32::MAX);
            let (low, high) = consumer.fetch_watermarks(&topic, p, METADATA_TIMEOUT).map_err(broker)?;
            if high > low {
                assignment.add_partition_offset(&topic, p, Offset::Offset(low)).map_err(broker)?;
                last.insert((topic.clone(), p), high - 1);
            }
        }
    }
    if last.is_empty() {
        return Ok(());
    }
    consumer.assign(&assignment).map_err(broker)?;
    let mut heard = Instant::now();
    while !last.is_empty() {
        let Some(polled) = consumer.poll(Duration::from_millis(200)) else {
            if heard.elapsed() > SILENCE {
                return Err(TransportError::Broker(format!(
                    "no record for {SILENCE:?} while {} partitions were not read to their end",
                    last.len()
                )));
            }
            continue;
        };
        let m = polled.map_err(broker)?;
        heard = Instant::now();
        let part = (m.topic().to_string(), m.partition());
        let Some(&end) = last.get(&part) else { continue };
        if m.offset() >= end {
            last.remove(&part);
        }
        if m.offset() > end {
            continue; // written after the read began
        }
        let record = Record::from_borrowed(&m);
        let (message, _) = record.to_message(display);
        let id = format!("{}/{}/{}", part.0, part.1, m.offset());
        if tx.blocking_send((DeadLetter { id, destination: part.0, message }, record)).is_err() {
            return Ok(()); // the caller has seen enough
        }
    }
    Ok(())
}
