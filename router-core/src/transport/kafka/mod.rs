//! Kafka through rdkafka (bundled librdkafka): consumer groups, ordered lanes,
//! contiguous offset commits, in-place and durable retries, dead-letter topics.
//!
//! - `mod.rs`: the transport: clients and their properties, topic creation, publish,
//!   the backlog the stall watchdog asks for.
//! - `consume.rs`: the consume loop: reading, lanes, flow control, hand-out.
//! - `lanes.rs`: which messages wait for each other (partition, key, none).
//! - `state.rs`: per-partition state: commit point, in flight, why it is paused.
//! - `rebalance.rs`: the consumer context: revokes wait for in-flight work, lag and
//!   reachability from librdkafka's statistics.
//! - `settle.rs`: acks, in-place and durable retries, dead letters.
//! - `offsets.rs`: the commit point of a partition (first unsettled offset).
//! - `properties.rs`: which librdkafka properties go to consumers, producers, admins.
//! - `convert.rs`: records ↔ the router's message model, re-publish headers.
//!
//! Offsets are stored (and auto-committed every 200 ms) only up to the first message
//! of a partition that is not settled, so a message in flight, waiting for a retry or
//! queued behind its key is never skipped.
//!
//! Retries: one due within `in_place_retry_max` is waited for in its lane (holding its
//! key's order; not durable: after a crash it starts again at attempt 1). A longer one
//! is produced (acks=all, awaited) to the retry topic with its due time, attempt and
//! origin in headers, then its offset is settled. The group consumes the retry topic
//! beside the source topics and delivers each message when it is due. Dead letters
//! are produced (acks=all, awaited) to `<topic>.dlq` before their offset is settled.
//! After a crash between the produce and the commit a copy can be produced twice
//! (at least once, like every delivery).
//!
//! Rebalances (eager): on revoke the loop stops handing out the revoked partitions'
//! messages, waits (up to 30 s) for those in flight, commits what is settled, and only
//! then lets the partitions go. Their queued messages are dropped unsettled: the next
//! owner starts at the committed offset.

mod consume;
mod convert;
mod lanes;
mod offsets;
mod properties;
mod rebalance;
mod settle;
mod state;

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::Offset;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub use convert::field;

use super::{ConsumeError, ConsumeSpec, Inbox, SourceStatus, Transport, TransportError};
use crate::config::{CreateTopics, TransportConfig};
use crate::message::Message;
use rebalance::Context;
use state::State;

/// Longest wait for a broker answer in a backlog probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct KafkaTransport {
    name: String,
    brokers: String,
    /// The transport's properties, for every client (each takes what applies to it).
    properties: Vec<(String, String)>,
    display: String,
    producer: Result<FutureProducer, String>,
    create_topics: CreateTopics,
    /// The live consumer of each subscription, for the stall watchdog.
    live: Mutex<HashMap<String, Live>>,
}

/// A subscription's consumer while it runs (weak: the watchdog must not keep it alive).
struct Live {
    consumer: Weak<StreamConsumer<Context>>,
    state: Weak<State>,
    retry_topic: String,
}

impl KafkaTransport {
    pub fn new(name: &str, config: &TransportConfig) -> Self {
        let brokers = config.brokers.join(",");
        let properties: Vec<(String, String)> = config.properties.clone().into_iter().collect();
        let mut producer = base_config(&brokers, &properties, properties::Role::Producer);
        producer.set("acks", "all").set("enable.idempotence", "true");
        let producer = producer.create::<FutureProducer>().map_err(|e| format!("kafka producer: {e}"));
        KafkaTransport {
            name: name.to_string(),
            display: format!("kafka://{}", config.brokers.first().map_or("", String::as_str)),
            brokers,
            properties,
            producer,
            create_topics: config.create_topics.clone().unwrap_or_default(),
            live: Mutex::new(HashMap::new()),
        }
    }

    fn client_config(&self, role: properties::Role) -> ClientConfig {
        base_config(&self.brokers, &self.properties, role)
    }

    /// Create the retry and dead-letter topics the subscription writes to, when
    /// missing: with the cluster's default partitions and replication unless the
    /// transport's `create_topics` says otherwise.
    async fn declare(&self, topics: &[String]) -> Result<(), String> {
        let admin: AdminClient<DefaultClientContext> =
            self.client_config(properties::Role::Other).create().map_err(|e| format!("kafka admin: {e}"))?;
        let partitions = self.create_topics.partitions.unwrap_or(-1);
        let replication = self.create_topics.replication_factor.unwrap_or(-1);
        let new: Vec<NewTopic<'_>> =
            topics.iter().map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication))).collect();
        let results = admin.create_topics(&new, &AdminOptions::new()).await.map_err(|e| e.to_string())?;
        for r in results {
            match r {
                Ok(topic) => info!(transport = %self.name, topic, partitions, replication, "created topic (-1: the cluster's default)"),
                Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(format!(
                        "creating topic {topic:?}: {code} (a broker older than Kafka 2.4 needs `create_topics: {{ partitions, replication_factor }}` on the transport)"
                    ))
                }
            }
        }
        Ok(())
    }
}

fn base_config(brokers: &str, all: &[(String, String)], role: properties::Role) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in properties::for_role(all, role) {
        c.set(k, v);
    }
    c
}

/// A `topic_pattern` as librdkafka takes it: a regex subscription starts with `^`.
fn anchored(pattern: &str) -> String {
    if pattern.starts_with('^') {
        pattern.to_string()
    } else {
        format!("^{pattern}")
    }
}

/// Whether librdkafka accepts `pattern` as a topic pattern (its own regex dialect),
/// without connecting anywhere: for `validate`.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("group.id", "message-router-validate")
        .set("log_level", "0")
        .create()
        .map_err(|e| format!("cannot check the pattern: {e}"))?;
    consumer.subscribe(&[anchored(pattern).as_str()]).map_err(|e| format!("librdkafka refuses the pattern: {e}"))
}

/// Milliseconds since the Unix epoch, `after` from now: the `x-router-due` value.
fn due_ms(after: Duration) -> u128 {
    (SystemTime::now() + after).duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

#[async_trait]
impl Transport for KafkaTransport {
    async fn consume(
        &self,
        spec: ConsumeSpec,
        inbox: Arc<dyn Inbox>,
        status: Arc<SourceStatus>,
        stop: CancellationToken,
    ) -> Result<(), ConsumeError> {
        consume::run(self, spec, inbox, status, stop).await
    }

    async fn publish(&self, exchange: &str, routing_key: &str, message: &Message) -> Result<(), TransportError> {
        if !exchange.is_empty() {
            return Err(TransportError::Unsupported(format!(
                "kafka has no exchanges (got {exchange:?}): the routing key names the topic"
            )));
        }
        let producer = self.producer.clone().map_err(TransportError::Broker)?;
        let mut headers = vec![(field::MESSAGE_ID.to_string(), Some(Bytes::from(message.id.clone())))];
        if let Some(ct) = &message.content_type {
            headers.push((field::CONTENT_TYPE.to_string(), Some(Bytes::from(ct.clone()))));
        }
        for (k, v) in &message.headers {
            if k != field::KEY {
                headers.push((k.clone(), Some(Bytes::from(v.clone()))));
            }
        }
        let key = message.headers.get(field::KEY).map(|k| Bytes::from(k.clone()));
        settle::produce(&producer, routing_key, key.as_ref(), &message.body, &headers)
            .await
            .map_err(|reason| TransportError::NotConfirmed { destination: format!("topic {routing_key:?}"), reason })
    }

    /// Records waiting in the source partitions assigned to this consumer that it is
    /// not holding back on purpose: high watermark − the consumer's position.
    async fn backlog(&self, spec: &ConsumeSpec) -> Result<Option<u64>, TransportError> {
        let live = {
            let live = self.live.lock();
            live.get(&spec.subscription)
                .and_then(|l| Some((l.consumer.upgrade()?, l.state.upgrade()?, l.retry_topic.clone())))
        };
        let Some((consumer, state, retry_topic)) = live else { return Ok(None) };
        tokio::task::spawn_blocking(move || {
            let broker = |e: rdkafka::error::KafkaError| TransportError::Broker(e.to_string());
            let positions = consumer.position().map_err(broker)?;
            let mut waiting = 0u64;
            for e in positions.elements() {
                let part = (e.topic().to_string(), e.partition());
                if part.0 == retry_topic || state.paused(&part) {
                    continue;
                }
                let (low, high) = consumer.fetch_watermarks(&part.0, part.1, PROBE_TIMEOUT).map_err(broker)?;
                let from = match e.offset() {
                    Offset::Offset(o) => o.max(low),
                    // Nothing consumed yet: it starts at the committed offset or the
                    // beginning; either way everything up to the end waits.
                    _ => low,
                };
                waiting += u64::try_from(high - from).unwrap_or(0);
            }
            Ok(Some(waiting))
        })
        .await
        .map_err(|e| TransportError::Broker(format!("backlog probe failed: {e}")))?
    }
}
