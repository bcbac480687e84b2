//! Kafka through rdkafka (bundled librdkafka): consumer groups, ordered lanes,
//! contiguous offset commits, in-place and durable retries, dead-letter topics.
//!
//! - `mod.rs`: clients, the consume loop and its lanes, settlement, rebalances.
//! - `offsets.rs`: the commit point of a partition (first unsettled offset).
//! - `convert.rs`: records ↔ the router's message model, re-publish headers.
//!
//! The consume loop reads records and puts each in a lane: its partition
//! (`ordering: partition`), its partition and key (`key`), or a lane of its own
//! (`unordered`). A lane hands one message at a time to the pipeline; the next goes
//! when the previous is settled. Offsets are stored (and auto-committed every 200 ms)
//! only up to the first message of the partition that is not settled, so a message in
//! flight, waiting for a retry or queued behind its key is never skipped.
//!
//! Flow control: at most `prefetch` messages are read and not finished, and a
//! partition reads at most 4 × `prefetch` offsets past its commit point (it is paused
//! until the commit point moves), so a crash delivers at most that many messages per
//! partition again (plus what settled in the last auto-commit interval). At the
//! read-ahead bound the loop stops polling; after `POLL_STALL` it pauses every
//! partition and polls again, so rebalances are served and the group membership
//! survives slow handlers.
//!
//! Retries: one due within `in_place_retry_max` is waited for in its lane (holding its
//! key's order; not durable: after a crash it starts again at attempt 1). A longer one
//! is produced (acks=all, awaited) to the retry topic with its due time, attempt and
//! origin in headers, then its offset is settled. The group consumes the retry topic
//! beside the source topics and delivers each message when it is due, pausing that
//! partition meanwhile. Dead letters are produced (acks=all, awaited) to
//! `<topic>.dlq` before their offset is settled.
//!
//! Rebalances (eager): on revoke the loop stops handing out the revoked partitions'
//! messages, waits (up to the shutdown grace period) for those in flight, commits what
//! is settled, and only then lets the partitions go. Their queued messages are
//! dropped unsettled: the next owner starts at the committed offset.

mod convert;
mod offsets;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use convert::field;
use convert::Record;
use offsets::Offsets;

use super::{ConsumeSpec, Inbox, SourceStatus, Transport, TransportError};
use crate::config::{KafkaOrdering, TransportConfig};
use crate::message::{header, Delivery, Failure, Message, Settle, SettleError, Settlement};

/// How long a produce (retry, dead letter) may take before it counts as failed.
const PRODUCE_TIMEOUT: Duration = Duration::from_secs(30);
/// Wait before trying a failed retry or dead-letter produce again.
const PRODUCE_BACKOFF: Duration = Duration::from_secs(1);
/// How long a revoke waits for in-flight messages of the revoked partitions.
const REVOKE_WAIT: Duration = Duration::from_secs(30);
/// A partition reads at most this many times `prefetch` offsets past its commit
/// point. Pausing is costly: librdkafka drops what it fetched for the partition and
/// fetches it again on resume. With a bound of 2 × prefetch, a head message merely
/// waiting a few milliseconds for a runtime thread while other keys raced ahead
/// paused partitions 40 times per 100 000 records and cut the rate to a third
/// (bench/run kafka-core); at 4 × the span fills only when the head is really stuck
/// (retrying in place, a slow key).
const SPAN_FACTOR: i64 = 4;
/// How long the loop may go without polling at the read-ahead bound before it pauses
/// every partition and polls again (rebalances and group membership need polls).
const POLL_STALL: Duration = Duration::from_secs(1);

pub struct KafkaTransport {
    name: String,
    brokers: String,
    properties: Vec<(String, String)>,
    display: String,
    producer: Result<FutureProducer, String>,
}

impl KafkaTransport {
    pub fn new(name: &str, config: &TransportConfig) -> Self {
        let brokers = config.brokers.join(",");
        let properties: Vec<(String, String)> = config.properties.clone().into_iter().collect();
        let mut producer = client_config(&brokers, &properties);
        producer.set("acks", "all").set("enable.idempotence", "true");
        let producer = producer.create::<FutureProducer>().map_err(|e| format!("kafka producer: {e}"));
        KafkaTransport {
            name: name.to_string(),
            display: format!("kafka://{}", config.brokers.first().map_or("", String::as_str)),
            brokers,
            properties,
            producer,
        }
    }

    /// Create the retry and dead-letter topics the subscription writes to, when missing.
    async fn declare(&self, topics: &[String]) -> Result<(), String> {
        let admin: AdminClient<DefaultClientContext> =
            client_config(&self.brokers, &self.properties).create().map_err(|e| format!("kafka admin: {e}"))?;
        let new: Vec<NewTopic<'_>> = topics.iter().map(|t| NewTopic::new(t, 1, TopicReplication::Fixed(1))).collect();
        let results = admin.create_topics(&new, &AdminOptions::new()).await.map_err(|e| e.to_string())?;
        for r in results {
            match r {
                Ok(topic) => info!(transport = %self.name, topic, "created topic"),
                Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(format!("creating topic {topic:?}: {code}")),
            }
        }
        Ok(())
    }
}

fn client_config(brokers: &str, properties: &[(String, String)]) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    for (k, v) in properties {
        c.set(k, v);
    }
    c
}

/// A partition: (topic, partition).
type Part = (String, i32);

/// What decides which messages wait for each other.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Lane {
    Partition(Part),
    Key(Part, Option<Bytes>),
    Own(u64),
}

/// Per-partition state shared by the loop, the handles and the rebalance callback.
#[derive(Default)]
struct PartState {
    offsets: Offsets,
    /// Bumped when the partition is revoked: messages read before are stale.
    generation: u64,
    /// Handed to the pipeline and not finished (settled or given up).
    in_flight: usize,
    /// Why fetching from the partition is paused (librdkafka keeps one flag; several
    /// reasons may hold it). Retry messages of it waiting for their due time:
    waiting: usize,
    /// Reading ran `span_limit` offsets past the commit point: a crash would deliver
    /// all of those again, so read no further until the commit point moves.
    full: bool,
    /// The whole subscription is at its read-ahead bound and the loop polls only to
    /// serve rebalances and keep its group membership (see `POLL_STALL`).
    stalled: bool,
}

impl PartState {
    fn paused(&self) -> bool {
        self.waiting > 0 || self.full || self.stalled
    }
}

struct State {
    subscription: String,
    parts: Mutex<HashMap<Part, PartState>>,
    finished: Condvar,
    consumer: std::sync::OnceLock<Arc<StreamConsumer<Context>>>,
    /// How far a partition may read past its commit point (`SPAN_FACTOR` × prefetch).
    span_limit: i64,
}

impl State {
    /// Change why `part` is paused, and pause or resume it at the broker client when
    /// that flips.
    fn pause_reason(&self, part: &Part, change: impl FnOnce(&mut PartState)) {
        let mut parts = self.parts.lock();
        let p = parts.entry(part.clone()).or_default();
        self.change_pause(part, p, change);
    }

    /// Change why `p` is paused, with the lock on `parts` held: librdkafka's flag is
    /// flipped in the same critical section, so two threads changing reasons (a read
    /// filling the span, a settle moving the commit point) cannot flip it in the
    /// opposite order of the state they saw.
    fn change_pause(&self, part: &Part, p: &mut PartState, change: impl FnOnce(&mut PartState)) {
        let before = p.paused();
        change(p);
        let after = p.paused();
        if before != after {
            self.set_paused(part, after);
        }
    }

    fn set_paused(&self, part: &Part, pause: bool) {
        let Some(consumer) = self.consumer.get() else { return };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&part.0, part.1);
        // An error: revoked meanwhile, nothing to pause or resume.
        let result = if pause { consumer.pause(&tpl) } else { consumer.resume(&tpl) };
        debug!(subscription = %self.subscription, topic = %part.0, partition = part.1, pause, result = ?result, "fetching paused or resumed");
    }

    /// Pause (or resume) every assigned partition for the read-ahead bound.
    fn stall(&self, on: bool) {
        let assigned: Vec<Part> = match self.consumer.get().map(|c| c.assignment()) {
            Some(Ok(tpl)) => tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect(),
            _ => Vec::new(),
        };
        // Resume also what was paused for the stall and is no longer assigned here.
        let mut parts: Vec<Part> = assigned;
        if !on {
            parts.extend(self.parts.lock().iter().filter(|(_, p)| p.stalled).map(|(k, _)| k.clone()));
            parts.sort();
            parts.dedup();
        }
        debug!(subscription = %self.subscription, partitions = parts.len(), on, "read-ahead bound: pause while polling");
        for part in &parts {
            self.pause_reason(part, |p| p.stalled = on);
        }
    }

    /// Store the new commit point of `part` (auto-commit sends it within 200 ms).
    fn store(&self, part: &Part, offset: i64) {
        let Some(consumer) = self.consumer.get() else { return };
        let mut tpl = TopicPartitionList::new();
        if tpl.add_partition_offset(&part.0, part.1, Offset::Offset(offset)).is_ok() {
            if let Err(e) = consumer.store_offsets(&tpl) {
                // The partition was revoked meanwhile: its next owner starts earlier.
                debug!(subscription = %self.subscription, topic = %part.0, partition = part.1, error = %e, "offset not stored");
            }
        }
    }

    /// A message handed out is finished: settled (its offset may be committed) or not.
    fn finish(&self, part: &Part, generation: u64, offset: i64, settled: bool) {
        let mut parts = self.parts.lock();
        let Some(p) = parts.get_mut(part).filter(|p| p.generation == generation) else { return };
        p.in_flight = p.in_flight.saturating_sub(1);
        let commit = if settled { p.offsets.settle(offset) } else { None };
        // The commit point moved: a partition held for its span may read again.
        if commit.is_some() && p.full && p.offsets.span() < self.span_limit {
            self.change_pause(part, p, |p| p.full = false);
        }
        drop(parts);
        self.finished.notify_all();
        if let Some(c) = commit {
            self.store(part, c);
        }
    }

    fn is_current(&self, part: &Part, generation: u64) -> bool {
        self.parts.lock().get(part).is_some_and(|p| p.generation == generation)
    }
}

/// The consumer context: rebalance handling, lag from librdkafka's statistics, and
/// whether any broker is reachable (`/readyz`).
struct Context {
    state: Arc<std::sync::OnceLock<Arc<State>>>,
    lag: Option<prometheus::IntGaugeVec>,
    subscription: String,
    status: Arc<SourceStatus>,
}

impl Context {
    /// librdkafka reconnects by itself; this only reports what it sees.
    fn reachable(&self, up: bool) {
        if up != self.status.is_connected() {
            if up {
                info!(subscription = %self.subscription, "kafka brokers reachable again: consuming");
            } else {
                warn!(subscription = %self.subscription, "every kafka broker is unreachable; librdkafka keeps reconnecting");
            }
            self.status.set_connected(up);
        }
    }
}

impl ClientContext for Context {
    fn error(&self, error: KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode::{AllBrokersDown, BrokerTransportFailure};
        match error {
            KafkaError::Global(AllBrokersDown) => self.reachable(false),
            // librdkafka logs each failed connection itself (and retries it); whether
            // any broker is left is what the statistics below tell.
            KafkaError::Global(BrokerTransportFailure) => {
                debug!(subscription = %self.subscription, reason, "kafka broker connection failed")
            }
            _ => warn!(subscription = %self.subscription, error = %error, reason, "kafka client error"),
        }
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        // Reachable while any real broker (bootstrap entries have nodeid -1 and stay
        // DOWN once the cluster is known) is connected; every 5 s.
        let up = statistics.brokers.values().any(|b| b.nodeid >= 0 && b.state == "UP");
        if up || statistics.brokers.values().any(|b| b.nodeid >= 0) {
            self.reachable(up);
        }
        let Some(lag) = &self.lag else { return };
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // -1: not assigned here, or not known yet (no committed offset).
                if *partition >= 0 && p.consumer_lag >= 0 {
                    lag.with_label_values(&[self.subscription.as_str(), topic.as_str(), &partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for Context {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Some(state) = self.state.get() else { return };
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts: Vec<String> =
                    tpl.elements().iter().map(|e| format!("{}[{}]", e.topic(), e.partition())).collect();
                info!(subscription = %state.subscription, partitions = ?parts, "partitions assigned");
                // Their state starts afresh (see the revoke), so must librdkafka's: a
                // partition paused when it was revoked may come back still paused.
                if let Err(e) = consumer.resume(tpl) {
                    debug!(subscription = %state.subscription, error = %e, "resume at assignment");
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => warn!(subscription = %state.subscription, error = %e, "rebalance failed"),
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else { return };
        let Some(state) = self.state.get() else { return };
        let revoked: Vec<Part> = tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect();
        info!(subscription = %state.subscription, partitions = revoked.len(), "partitions revoked: finishing their in-flight messages");
        let wait = || {
            let deadline = std::time::Instant::now() + REVOKE_WAIT;
            let mut parts = state.parts.lock();
            loop {
                let busy: usize = revoked.iter().filter_map(|p| parts.get(p)).map(|p| p.in_flight).sum();
                if busy == 0 || state.finished.wait_until(&mut parts, deadline).timed_out() {
                    if busy > 0 {
                        warn!(subscription = %state.subscription, busy, "revoke: in-flight messages did not finish in time; their partitions' next owner will redeliver them");
                    }
                    break;
                }
            }
            for p in &revoked {
                if let Some(s) = parts.get_mut(p) {
                    s.generation += 1;
                }
            }
        };
        // The callback runs inside a poll on a runtime worker: let the runtime move
        // other tasks off this thread while it waits.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            _ => wait(),
        }
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            debug!(subscription = %state.subscription, error = %e, "commit at revoke");
        }
        let mut parts = state.parts.lock();
        for p in &revoked {
            if let Some(s) = parts.get_mut(p) {
                // Its next assignment starts afresh: unpaused, nothing read.
                *s = PartState { generation: s.generation, ..PartState::default() };
            }
        }
    }
}

/// A message read and not yet handed to the pipeline.
struct Pending {
    record: Record,
    lane: Lane,
    generation: u64,
    attempt: Option<u32>,
    first_failure: Option<SystemTime>,
}

/// What handles tell the consume loop.
enum Event {
    /// The lane's message is finished: hand out the next one. The flag says whether
    /// it counted toward the read-ahead bound (retry-topic messages do not).
    Free(Lane, bool),
    /// Deliver this message again (in-place retry, or a failed produce).
    Again(Pending),
}

#[async_trait]
impl Transport for KafkaTransport {
    async fn consume(
        &self,
        spec: ConsumeSpec,
        inbox: Arc<dyn Inbox>,
        status: Arc<SourceStatus>,
        stop: CancellationToken,
    ) {
        let config = &spec.config;
        let group = config.group.clone().unwrap_or_default();
        let retry_topic = config.retry_topic.clone().unwrap_or_else(|| format!("{group}.retry"));
        if config.declare {
            let mut topics = vec![retry_topic.clone()];
            let dl = config.dead_letter.clone().unwrap_or_default();
            match dl.topic {
                Some(t) => topics.push(t),
                None => topics.extend(config.topics.iter().map(|t| format!("{t}.dlq"))),
            }
            if let Err(e) = self.declare(&topics).await {
                warn!(subscription = %spec.subscription, error = %e, "could not create the retry and dead-letter topics; producing to them may fail");
            }
        }
        let state_slot = Arc::new(std::sync::OnceLock::new());
        let mut c = client_config(&self.brokers, &self.properties);
        c.set("group.id", &group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "200")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        // Defaults a user may override: start at the beginning of a topic the group has
        // no offset for (nothing published before the first start is skipped), and
        // statistics every 5 s for the lag gauge.
        for (key, value) in [("auto.offset.reset", "earliest"), ("statistics.interval.ms", "5000")] {
            if !self.properties.iter().any(|(k, _)| k == key) {
                c.set(key, value);
            }
        }
        let consumer: StreamConsumer<Context> = match c.create_with_context(Context {
            state: state_slot.clone(),
            lag: spec.lag.clone(),
            subscription: spec.subscription.clone(),
            status: status.clone(),
        }) {
            Ok(c) => c,
            Err(e) => {
                warn!(subscription = %spec.subscription, error = %e, "cannot create the kafka consumer");
                return;
            }
        };
        let consumer = Arc::new(consumer);
        let state = Arc::new(State {
            subscription: spec.subscription.clone(),
            parts: Mutex::new(HashMap::new()),
            finished: Condvar::new(),
            consumer: std::sync::OnceLock::new(),
            span_limit: SPAN_FACTOR * i64::from(spec.config.prefetch.max(1)),
        });
        let _ = state.consumer.set(consumer.clone());
        let _ = state_slot.set(state.clone());
        let mut topics: Vec<String> = match &config.topic_pattern {
            Some(p) => vec![if p.starts_with('^') { p.clone() } else { format!("^{p}") }],
            None => config.topics.clone(),
        };
        topics.push(retry_topic.clone());
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        if let Err(e) = consumer.subscribe(&names) {
            warn!(subscription = %spec.subscription, error = %e, "cannot subscribe");
            return;
        }
        status.set_connected(true);
        info!(subscription = %spec.subscription, topics = ?topics, group = %group, ordering = ?config.ordering, "consuming");

        let producer = match &self.producer {
            Ok(p) => p.clone(),
            Err(e) => {
                warn!(subscription = %spec.subscription, error = %e, "cannot produce retries and dead letters");
                return;
            }
        };
        let shared = Arc::new(Shared {
            state: state.clone(),
            producer,
            retry_topic: retry_topic.clone(),
            dead_letter: config.dead_letter.clone().unwrap_or_default().topic,
            in_place_max: config.in_place_retry_max,
            subscription: spec.subscription.clone(),
        });
        let limit = usize::from(spec.config.prefetch.max(1));
        let (events, mut event_rx) = mpsc::unbounded_channel::<Event>();
        let mut lanes: HashMap<Lane, VecDeque<Pending>> = HashMap::new();
        let mut busy: std::collections::HashSet<Lane> = std::collections::HashSet::new();
        let mut own = 0u64;
        // Read and not finished, over all lanes.
        let mut open = 0usize;
        // Paused every assigned partition to go on polling while at the bound.
        let mut stalled = false;

        loop {
            if stalled && open < limit {
                stalled = false;
                state.stall(false);
            }
            let read = open < limit || stalled;
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                // At the bound for a while: pause every partition and poll again, so
                // rebalances are served and librdkafka's max.poll.interval.ms is not
                // exceeded by a slow handler (it would drop the group membership).
                _ = tokio::time::sleep(POLL_STALL), if !read => {
                    stalled = true;
                    state.stall(true);
                }
                Some(ev) = event_rx.recv() => {
                    let next = match ev {
                        Event::Free(lane, counted) => {
                            if counted {
                                open = open.saturating_sub(1);
                            }
                            busy.remove(&lane);
                            lanes.get_mut(&lane).and_then(VecDeque::pop_front)
                        }
                        Event::Again(p) => Some(p),
                    };
                    if let Some(p) = next {
                        if !self.hand_out(p, &shared, &events, &inbox, &mut busy).await {
                            break;
                        }
                    }
                }
                m = consumer.recv(), if read => {
                    let record = match m {
                        Ok(m) => {
                            if !status.is_connected() {
                                consumer.context().reachable(true);
                            }
                            Record::from_borrowed(&m)
                        }
                        Err(e) => {
                            // A lost broker connection also arrives here, as often as
                            // librdkafka retries it: the client's log has it already.
                            if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::BrokerTransportFailure) {
                                debug!(subscription = %spec.subscription, error = %e, "kafka consumer error");
                            } else {
                                warn!(subscription = %spec.subscription, error = %e, "kafka consumer error");
                            }
                            continue;
                        }
                    };
                    let part: Part = (record.topic.clone(), record.partition);
                    let generation = {
                        let mut parts = state.parts.lock();
                        let p = parts.entry(part.clone()).or_default();
                        p.offsets.read(record.offset);
                        // Bound what a crash would deliver again (duplicates) to
                        // `span_limit` per partition; also catch a partition assigned
                        // while stalled.
                        let full = p.offsets.span() >= state.span_limit;
                        state.change_pause(&part, p, |p| {
                            p.full |= full;
                            p.stalled |= stalled;
                        });
                        p.generation
                    };
                    let lane = match config.ordering {
                        KafkaOrdering::Partition => Lane::Partition(part),
                        KafkaOrdering::Key => Lane::Key(part, record.key.clone()),
                        KafkaOrdering::Unordered => { own += 1; Lane::Own(own) }
                    };
                    // Retry-topic messages wait for their due time without holding up the
                    // source topics; their partition is paused meanwhile (see hand_out).
                    if record.topic != retry_topic {
                        open += 1;
                    }
                    let p = Pending { record, lane: lane.clone(), generation, attempt: None, first_failure: None };
                    if busy.contains(&lane) {
                        lanes.entry(lane).or_default().push_back(p);
                    } else if !self.hand_out(p, &shared, &events, &inbox, &mut busy).await {
                        break;
                    }
                }
            }
            lanes.retain(|_, q| !q.is_empty());
        }
        status.set_connected(false);
        drop(lanes);
        drop(events);
        // Let what was handed out finish (the engine drains it), then commit what is
        // settled and leave the group.
        wait_idle(&state).await;
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            debug!(subscription = %spec.subscription, error = %e, "final commit");
        }
        consumer.unsubscribe();
    }

    async fn publish(&self, exchange: &str, routing_key: &str, message: &Message) -> Result<(), TransportError> {
        if !exchange.is_empty() {
            return Err(TransportError::Broker(format!(
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
        produce(&producer, routing_key, key.as_ref(), &message.body, &headers)
            .await
            .map_err(|reason| TransportError::NotConfirmed { destination: format!("topic {routing_key:?}"), reason })
    }
}

/// Wait until no message of `state` is in flight.
async fn wait_idle(state: &State) {
    loop {
        let busy: usize = state.parts.lock().values().map(|p| p.in_flight).sum();
        if busy == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What every handle of a subscription needs.
struct Shared {
    state: Arc<State>,
    producer: FutureProducer,
    retry_topic: String,
    dead_letter: Option<String>,
    in_place_max: Duration,
    subscription: String,
}

impl Shared {
    /// Pause a retry partition while a message of it waits (`hold`), resume it when
    /// none does any more.
    fn hold(&self, part: &Part, hold: bool) {
        self.state.pause_reason(part, |p| {
            p.waiting = if hold { p.waiting + 1 } else { p.waiting.saturating_sub(1) };
        });
    }
}

impl KafkaTransport {
    /// Hand one message to the pipeline: now, or when due (a retry-topic message).
    /// Returns false when the router is stopping.
    async fn hand_out(
        &self,
        p: Pending,
        shared: &Arc<Shared>,
        events: &mpsc::UnboundedSender<Event>,
        inbox: &Arc<dyn Inbox>,
        busy: &mut std::collections::HashSet<Lane>,
    ) -> bool {
        let part: Part = (p.record.topic.clone(), p.record.partition);
        busy.insert(p.lane.clone());
        if !shared.state.is_current(&part, p.generation) {
            // Revoked since it was read: its next owner delivers it.
            let counted = p.record.topic != shared.retry_topic;
            let _ = events.send(Event::Free(p.lane, counted));
            return true;
        }
        // A message from the retry topic waits for its time in its lane.
        let due = p.record.header(field::DUE).and_then(|d| d.parse::<u64>().ok());
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        if p.attempt.is_none() {
            if let Some(wait) = due.and_then(|d| d.checked_sub(now_ms)).filter(|w| *w > 0) {
                // Stop fetching this retry partition while its head waits: what is
                // behind it is due later anyway (retries are appended in time order,
                // give or take differing delays).
                shared.hold(&part, true);
                debug!(subscription = %shared.subscription, offset = p.record.offset, wait_ms = wait, "retry waiting until due");
                let (events, shared) = (events.clone(), shared.clone());
                let mut p = p;
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                    shared.hold(&part, false);
                    p.attempt = p.record.header(header::ATTEMPT).and_then(|a| a.parse().ok()).or(Some(1));
                    let _ = events.send(Event::Again(p));
                });
                return true;
            }
        }
        let (message, defect) = p.record.to_message(&self.display);
        shared.state.parts.lock().entry(part.clone()).or_default().in_flight += 1;
        let attempt = p.attempt;
        let first_failure = p.first_failure;
        let handle = KafkaHandle { shared: shared.clone(), events: events.clone(), pending: Some(p) };
        let mut delivery = Delivery::new(message, Box::new(handle));
        if let Some(a) = attempt {
            delivery.attempt = a;
        }
        if first_failure.is_some() {
            delivery.first_failure = first_failure;
        }
        delivery.defect = defect;
        inbox.put(delivery).await.is_ok()
    }
}

/// The Kafka half of a delivery.
struct KafkaHandle {
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<Event>,
    pending: Option<Pending>,
}

impl KafkaHandle {
    fn finish(&mut self, settled: bool) {
        let Some(p) = self.pending.take() else { return };
        let part = (p.record.topic.clone(), p.record.partition);
        self.shared.state.finish(&part, p.generation, p.record.offset, settled);
        let counted = p.record.topic != self.shared.retry_topic;
        let _ = self.events.send(Event::Free(p.lane, counted));
    }

    /// Deliver again after `after`, keeping the lane (in-place retry, failed produce).
    fn again(&mut self, after: Duration, attempt: u32, first_failure: Option<SystemTime>) {
        let Some(mut p) = self.pending.take() else { return };
        let part = (p.record.topic.clone(), p.record.partition);
        // Not settled (the offset stays open), but no longer in flight for a revoke to
        // wait on.
        self.shared.state.finish(&part, p.generation, p.record.offset, false);
        p.attempt = Some(attempt);
        p.first_failure = first_failure;
        let events = self.events.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = events.send(Event::Again(p));
        });
    }

    async fn produce_copy(&self, topic: &str, extra: Vec<(&'static str, String)>) -> Result<(), String> {
        let Some(p) = &self.pending else { return Err("already settled".into()) };
        let headers = p.record.republish_headers(extra);
        produce(&self.shared.producer, topic, p.record.key.as_ref(), &p.record.payload, &headers).await
    }
}

#[async_trait]
impl Settle for KafkaHandle {
    async fn settle(mut self: Box<Self>, settlement: Settlement) -> Result<(), SettleError> {
        let subscription = self.shared.subscription.clone();
        match settlement {
            Settlement::Ack => self.finish(true),
            Settlement::Release => self.finish(false),
            Settlement::Retry { after, next_attempt, failure } if after <= self.shared.in_place_max => {
                self.again(after, next_attempt, Some(failure.first_failure));
            }
            Settlement::Retry { after, next_attempt, failure } => {
                let due = SystemTime::now() + after;
                let due_ms = due.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
                let mut extra = vec![(header::ATTEMPT, next_attempt.to_string()), (field::DUE, due_ms.to_string())];
                extra.extend(failure.headers(&subscription));
                let topic = self.shared.retry_topic.clone();
                self.durable(&topic, extra, &failure, "scheduling the retry").await?;
            }
            Settlement::DeadLetter(failure) => {
                let origin = self.pending.as_ref().map(|p| p.record.origin_topic()).unwrap_or_default();
                let topic = self.shared.dead_letter.clone().unwrap_or_else(|| format!("{origin}.dlq"));
                let extra = failure.headers(&subscription);
                self.durable(&topic, extra, &failure, "writing the dead letter").await?;
            }
        }
        Ok(())
    }

    fn abandon(mut self: Box<Self>) {
        self.finish(false);
    }
}

impl KafkaHandle {
    /// Produce a copy to `topic`, then settle the offset. When the produce fails the
    /// message is delivered again later (same attempt): nothing is settled unwritten.
    async fn durable(
        &mut self,
        topic: &str,
        extra: Vec<(&'static str, String)>,
        failure: &Failure,
        what: &str,
    ) -> Result<(), SettleError> {
        match self.produce_copy(topic, extra).await {
            Ok(()) => {
                self.finish(true);
                Ok(())
            }
            Err(e) => {
                self.again(PRODUCE_BACKOFF, failure.attempts, Some(failure.first_failure));
                Err(SettleError(format!("{what} in topic {topic:?}: {e}; delivering it again")))
            }
        }
    }
}

impl Drop for KafkaHandle {
    fn drop(&mut self) {
        self.finish(false);
    }
}

/// Produce one record (acks=all) and wait for the broker's answer.
async fn produce(
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
