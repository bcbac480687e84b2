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
//! - `config.rs`: the transport and subscription sections of the config.
//! - `dlq.rs`: reading the dead-letter topics back (`message-router dlq`).
//! - `depth.rs`: what waits for a subscription (group lag, retries, dead letters).
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

pub mod config;
mod consume;
mod convert;
mod depth;
mod dlq;
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
pub use dlq::PURGE_REFUSED;

use super::{
    ConsumeError, ConsumeSpec, Decide, Depths, Inbox, Reworked, SourceConfig, SourceStatus, Transport, TransportError,
};
use crate::message::Message;
use config::{CreateTopics, KafkaConfig};
use rebalance::Context;
use state::State;

/// Longest wait for a broker answer in a backlog probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// librdkafka's `max.poll.interval.ms` when the config names none.
const DEFAULT_MAX_POLL_INTERVAL: Duration = Duration::from_secs(300);

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
    /// A group-less consumer the watchdog reads single records with (made on first use).
    probe: Mutex<Option<Arc<BaseConsumer>>>,
    /// How long a rebalance may take (`max.poll.interval.ms`): the coordinator waits
    /// that long for members to rejoin, so the watchdog does not start a consumer that
    /// is rejoining again sooner (it would join as a new member and the wait go on).
    rebalance_timeout: Duration,
    /// Each subscription's group membership, across the consumers it has had.
    groups: Mutex<HashMap<String, Arc<rebalance::GroupWatch>>>,
    /// Per consumer group: a client of the group that never joins it, reading its
    /// committed offsets for [`Transport::depths`].
    lag_readers: Mutex<HashMap<String, Arc<BaseConsumer>>>,
}

/// A subscription's consumer while it runs (weak: the watchdog must not keep it alive).
struct Live {
    consumer: Weak<StreamConsumer<Context>>,
    state: Weak<State>,
    retry_topic: String,
}

impl KafkaTransport {
    pub fn new(name: &str, config: &KafkaConfig) -> Self {
        let brokers = config.brokers.join(",");
        let properties: Vec<(String, String)> = config.properties.clone().into_iter().collect();
        let mut producer = base_config(&brokers, &properties, properties::Role::Producer);
        producer.set("acks", "all").set("enable.idempotence", "true");
        let producer = producer.create::<FutureProducer>().map_err(|e| format!("kafka producer: {e}"));
        let rebalance_timeout = properties
            .iter()
            .find(|(k, _)| k == "max.poll.interval.ms")
            .and_then(|(_, v)| v.parse().ok())
            .map_or(DEFAULT_MAX_POLL_INTERVAL, Duration::from_millis);
        KafkaTransport {
            name: name.to_string(),
            display: format!("kafka://{}", config.brokers.first().map_or("", String::as_str)),
            brokers,
            properties,
            producer,
            create_topics: config.create_topics.clone(),
            live: Mutex::new(HashMap::new()),
            probe: Mutex::new(None),
            rebalance_timeout,
            groups: Mutex::new(HashMap::new()),
            lag_readers: Mutex::new(HashMap::new()),
        }
    }

    fn group_watch(&self, subscription: &str) -> Arc<rebalance::GroupWatch> {
        self.groups.lock().entry(subscription.to_string()).or_default().clone()
    }

    fn probe(&self) -> Result<Arc<BaseConsumer>, TransportError> {
        let mut slot = self.probe.lock();
        if let Some(p) = slot.as_ref() {
            return Ok(p.clone());
        }
        let mut c = self.client_config(properties::Role::Other);
        c.set("enable.auto.commit", "false").set("group.id", "message-router-probe");
        let p: Arc<BaseConsumer> =
            Arc::new(c.create().map_err(|e| TransportError::Broker(format!("kafka probe client: {e}")))?);
        *slot = Some(p.clone());
        Ok(p)
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
    consumer
        .subscribe(&[anchored(pattern).as_str()])
        .map_err(|e| format!("{pattern:?} is not a regular expression librdkafka accepts ({e})"))
}

/// The record at `offset` of `part` as the broker holds it now, if it can be read
/// within the probe timeout.
fn fetch_one(probe: &BaseConsumer, part: &state::Part, offset: i64) -> Option<state::Fingerprint> {
    use rdkafka::message::Message as _;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(&part.0, part.1, Offset::Offset(offset)).ok()?;
    probe.assign(&tpl).ok()?;
    let deadline = std::time::Instant::now() + PROBE_TIMEOUT;
    let mut found = None;
    while found.is_none() && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = probe.poll(Duration::from_millis(200)) {
            if m.topic() == part.0 && m.partition() == part.1 && m.offset() == offset {
                found = Some((offset, m.timestamp().to_millis(), m.payload_len()));
            }
        }
    }
    let _ = probe.unassign();
    found
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

    async fn rework_dead_letters(
        &self,
        spec: &ConsumeSpec,
        decide: Decide<'_>,
        pace: Duration,
    ) -> Result<Reworked, TransportError> {
        let source = spec.source("kafka", SourceConfig::kafka).map_err(TransportError::Unsupported)?;
        dlq::walk(self, source, decide, pace).await
    }

    async fn depths(&self, spec: &ConsumeSpec) -> Result<Depths, TransportError> {
        let source = spec.source("kafka", SourceConfig::kafka).map_err(TransportError::Unsupported)?;
        depth::depths(self, source).await
    }

    /// Records waiting in the source partitions assigned to this consumer that are
    /// neither busy nor held back on purpose, as the broker sees them: high watermark
    /// − the group's committed offset (the low watermark when there is none).
    ///
    /// A consumer can lose track of its partition without a word: a topic deleted and
    /// created again (on a broker without topic ids) leaves it fetching at an offset
    /// the new topic may already have passed, its own auto-commit writing that offset
    /// back. So the probe also checks that the broker still holds, just before the
    /// consumer's position, the record the consumer read there; when it does not (or
    /// the position lies past the end), the partition's offset is set back to its
    /// beginning and everything in it counts as waiting, so the watchdog starts a new
    /// consumer, which reads it from there.
    async fn backlog(&self, spec: &ConsumeSpec) -> Result<Option<u64>, TransportError> {
        let live = {
            let live = self.live.lock();
            live.get(&spec.subscription)
                .and_then(|l| Some((l.consumer.upgrade()?, l.state.upgrade()?, l.retry_topic.clone())))
        };
        let Some((consumer, state, retry_topic)) = live else { return Ok(None) };
        let probe = self.probe()?;
        let group = self.group_watch(&spec.subscription);
        let subscription = spec.subscription.clone();
        let stall_after = spec.config.stall_timeout;
        let unsteady_after = stall_after.max(self.rebalance_timeout);
        let topics = spec.source("kafka", SourceConfig::kafka).map_err(TransportError::Unsupported)?.topics.clone();
        tokio::task::spawn_blocking(move || {
            let broker = |e: rdkafka::error::KafkaError| TransportError::Broker(e.to_string());
            // Whatever the assignment, the broker must answer (a consumer dropped from
            // its group by a partition holds nothing, but is not fine).
            consumer.fetch_metadata(Some(&retry_topic), PROBE_TIMEOUT).map_err(broker)?;
            let mut idle = rdkafka::TopicPartitionList::new();
            for e in consumer.assignment().map_err(broker)?.elements() {
                let part = (e.topic().to_string(), e.partition());
                if part.0 != retry_topic && !state.occupied(&part) {
                    idle.add_partition(&part.0, part.1);
                }
            }
            // A consumer that has not been steady in its group for the stall timeout
            // and the rebalance timeout (a rejoin that never completes after a partition
            // healed) holds nothing and takes nothing: what waits in the topics it reads
            // is its stall.
            let (unsteady, how) = group.unsteady().unwrap_or_default();
            if !stall_after.is_zero() && unsteady >= unsteady_after {
                for t in &topics {
                    let metadata = consumer.fetch_metadata(Some(t), PROBE_TIMEOUT).map_err(broker)?;
                    for p in metadata.topics().iter().flat_map(|m| m.partitions()) {
                        idle.add_partition(t, p.id());
                    }
                }
                tracing::debug!(subscription = %subscription, ?unsteady, how = %how, "not steady in its group");
            }
            if idle.count() == 0 {
                return Ok(Some(0));
            }
            let positions: HashMap<(String, i32), Offset> = consumer
                .position()
                .map_err(broker)?
                .elements()
                .iter()
                .map(|e| ((e.topic().to_string(), e.partition()), e.offset()))
                .collect();
            let committed = consumer.committed_offsets(idle, PROBE_TIMEOUT).map_err(broker)?;
            let mut waiting = 0u64;
            for e in committed.elements() {
                let part = (e.topic().to_string(), e.partition());
                let (low, high) = consumer.fetch_watermarks(&part.0, part.1, PROBE_TIMEOUT).map_err(broker)?;
                let position = match positions.get(&part) {
                    Some(Offset::Offset(o)) => Some(*o),
                    _ => None,
                };
                let lost = match (position, state.last(&part)) {
                    (Some(pos), _) if pos > high => true,
                    (Some(pos), Some(last)) if last.0 == pos - 1 && last.0 >= low => {
                        fetch_one(&probe, &part, last.0).is_some_and(|now| now != last)
                    }
                    _ => false,
                };
                if lost {
                    tracing::warn!(subscription = %subscription, topic = %part.0, partition = part.1, low, high, position = ?position, "the broker no longer holds what this consumer read (was the topic deleted and created again?): reading the partition from its beginning");
                    state.store_now(&part, low);
                    let _ = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync);
                    waiting += u64::try_from(high - low).unwrap_or(0).max(1);
                    continue;
                }
                waiting += depth::waiting_after(e.offset(), low, high);
            }
            drop(committed);
            Ok(Some(waiting))
        })
        .await
        .map_err(|e| TransportError::Broker(format!("backlog probe failed: {e}")))?
    }
}
