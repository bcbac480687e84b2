//! The consume loop of one subscription: read records, put each in its lane, hand the
//! lanes' heads to the pipeline, keep librdkafka polled.
//!
//! Flow control: at most `prefetch` messages are read and not finished, and a
//! partition reads at most `SPAN_FACTOR` × `prefetch` offsets past its commit point
//! (it is paused until the commit point moves), so a crash delivers at most that
//! many messages per partition again (plus what settled in the last auto-commit
//! interval). At the read-ahead bound, and while the pipeline is paused (a handler's
//! circuit is open), the loop stops reading; after `POLL_STALL` it pauses every
//! partition and polls again, so rebalances are served and the group membership
//! survives (`max.poll.interval.ms`).
//!
//! A message of the retry topic that is not due yet waits (its partition paused) and
//! is handed out when due; it does not count toward `prefetch`, so the source topics
//! flow on.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::convert::{field, Record};
use super::lanes::Lanes;
use super::rebalance::{ConsumerSwitch, Context};
use super::settle::{Event, KafkaHandle, Pending, Shared};
use super::state::{Part, State};
use super::{properties, KafkaTransport, Live};
use crate::message::{header, Delivery};
use crate::transport::{ConsumeError, ConsumeSpec, Inbox, SourceConfig, SourceStatus};

/// A partition reads at most this many times `prefetch` offsets past its commit
/// point. Pausing is costly: librdkafka drops what it fetched for the partition and
/// fetches it again on resume. With a bound of 2 × prefetch, a head message merely
/// waiting a few milliseconds for a runtime thread while other keys raced ahead
/// paused partitions 40 times per 100 000 records and cut the rate to a third
/// (bench/run kafka-core); at 4 × the span fills only when the head is really stuck
/// (retrying in place, a slow key).
const SPAN_FACTOR: i64 = 4;
/// How long the loop may go without polling while it reads nothing before it pauses
/// every partition and polls again (rebalances and group membership need polls).
const POLL_STALL: Duration = Duration::from_secs(1);

/// The loop's view of the pipeline and the consumer.
struct Loop<'a> {
    transport: &'a KafkaTransport,
    shared: Arc<Shared>,
    events: mpsc::UnboundedSender<Event>,
    inbox: &'a Arc<dyn Inbox>,
}

pub async fn run(
    t: &KafkaTransport,
    spec: ConsumeSpec,
    inbox: Arc<dyn Inbox>,
    status: Arc<SourceStatus>,
    stop: CancellationToken,
) -> Result<(), ConsumeError> {
    let config = spec.source("kafka", SourceConfig::kafka).map_err(ConsumeError::Fatal)?;
    let group = config.group.clone();
    let retry_topic = config.retry_topic();
    if config.declare {
        let mut topics = vec![retry_topic.clone()];
        match config.dead_letter.topic.clone() {
            Some(t) => topics.push(t),
            None => topics.extend(config.topics.iter().map(|t| format!("{t}.dlq"))),
        }
        if let Err(e) = t.declare(&topics).await {
            warn!(subscription = %spec.subscription, error = %e, "could not create the retry and dead-letter topics; producing to them may fail");
        }
    }
    let producer = t.producer.clone().map_err(ConsumeError::Fatal)?;
    let state_slot = Arc::new(std::sync::OnceLock::new());
    let mut c = t.client_config(properties::Role::Consumer);
    c.set("group.id", &group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "200")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    // Defaults a user may override: start at the beginning of a topic the group has
    // no offset for (nothing published before the first start is skipped),
    // statistics every 5 s for the lag gauge, metadata every 30 s rather than
    // librdkafka's 5 min (topics that appear for a pattern, disappear or come back are
    // noticed soon), and requests given up after 10 s rather than 60 s: after a
    // network partition heals, a request stuck on the dead connection would otherwise
    // hold the group's rejoin back for a minute.
    for (key, value) in [
        ("auto.offset.reset", "earliest"),
        ("statistics.interval.ms", "5000"),
        ("topic.metadata.refresh.interval.ms", "30000"),
        ("socket.timeout.ms", "10000"),
    ] {
        if !t.properties.iter().any(|(k, _)| k == key) {
            c.set(key, value);
        }
    }
    let context = Context {
        state: state_slot.clone(),
        lag: spec.lag.clone(),
        subscription: spec.subscription.clone(),
        status: status.clone(),
        group: t.group_watch(&spec.subscription),
    };
    let consumer: StreamConsumer<Context> = c
        .create_with_context(context)
        .map_err(|e| ConsumeError::Fatal(format!("cannot create the kafka consumer: {e}")))?;
    let consumer = Arc::new(consumer);
    let state = Arc::new(State::new(&spec.subscription, SPAN_FACTOR * i64::from(spec.config.prefetch.max(1))));
    state.attach(Box::new(ConsumerSwitch(Arc::downgrade(&consumer))));
    let _ = state_slot.set(state.clone());
    let mut topics: Vec<String> = match &config.topic_pattern {
        Some(p) => vec![super::anchored(p)],
        None => config.topics.clone(),
    };
    topics.push(retry_topic.clone());
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer.subscribe(&names).map_err(|e| ConsumeError::Fatal(format!("cannot subscribe to {topics:?}: {e}")))?;
    t.live.lock().insert(
        spec.subscription.clone(),
        Live { consumer: Arc::downgrade(&consumer), state: Arc::downgrade(&state), retry_topic: retry_topic.clone() },
    );
    status.set_connected(true);
    info!(subscription = %spec.subscription, topics = ?topics, group = %group, ordering = ?config.ordering, "consuming");

    let (events, mut event_rx) = mpsc::unbounded_channel::<Event>();
    let lp = Loop {
        transport: t,
        shared: Arc::new(Shared {
            state: state.clone(),
            producer,
            retry_topic: retry_topic.clone(),
            dead_letter: config.dead_letter.topic.clone(),
            in_place_max: config.in_place_retry_max,
            subscription: spec.subscription.clone(),
        }),
        events,
        inbox: &inbox,
    };
    let limit = usize::from(spec.config.prefetch.max(1));
    let mut lanes: Lanes<Pending> = Lanes::new(config.ordering);
    // Ready to go while the pipeline is paused: handed out when it resumes.
    let mut held: VecDeque<Pending> = VecDeque::new();
    // Read and not finished, over all lanes.
    let mut open = 0usize;
    // Every assigned partition paused, to go on polling without reading.
    let mut stalled = false;
    let mut failure = None;

    'run: loop {
        let paused = inbox.paused();
        if !paused {
            while let Some(p) = held.pop_front() {
                if !lp.hand_out(p).await {
                    break 'run;
                }
            }
        }
        if stalled && open < limit && !paused {
            stalled = false;
            state.stall(false);
        }
        let read = (open < limit && !paused) || stalled;
        tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            // Reading nothing for a while: pause every partition and poll again, so
            // rebalances are served and librdkafka's max.poll.interval.ms is not
            // exceeded by a slow handler or an open circuit (it would drop the group
            // membership).
            _ = tokio::time::sleep(POLL_STALL), if !read => {
                stalled = true;
                state.stall(true);
            }
            _ = inbox.pause_changed(), if paused => {}
            Some(ev) = event_rx.recv() => {
                let next = match ev {
                    Event::Free(lane, counted) => {
                        if counted {
                            open = open.saturating_sub(1);
                        }
                        lanes.finished(&lane)
                    }
                    Event::Again(p) => Some(p),
                };
                if let Some(p) = next {
                    if inbox.paused() {
                        held.push_back(p);
                    } else if !lp.hand_out(p).await {
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
                    Err(KafkaError::MessageConsumptionFatal(code)) => {
                        // The consumer is unusable (fenced by another member with its
                        // group.instance.id, ...): the supervisor makes a new one.
                        failure = Some(format!("the kafka consumer failed for good: {code}"));
                        break;
                    }
                    Err(e) => {
                        // A lost broker connection also arrives here, as often as
                        // librdkafka retries it: the client's log has it already.
                        if e.rdkafka_error_code() == Some(RDKafkaErrorCode::BrokerTransportFailure) {
                            debug!(subscription = %spec.subscription, error = %e, "kafka consumer error");
                        } else {
                            warn!(subscription = %spec.subscription, error = %e, "kafka consumer error");
                        }
                        continue;
                    }
                };
                let part: Part = (record.topic.clone(), record.partition);
                let fingerprint = (record.offset, record.timestamp_ms, record.payload.len());
                let generation = state.read(&part, fingerprint, stalled);
                let lane = lanes.lane(&part, &record.key);
                // Retry-topic messages wait for their due time without holding up the
                // source topics; their partition is paused meanwhile (see hand_out).
                if record.topic != retry_topic {
                    open += 1;
                }
                let p = Pending { record, lane: lane.clone(), generation, attempt: None, first_failure: None };
                if let Some(p) = lanes.offer(lane, p) {
                    if paused {
                        held.push_back(p);
                    } else if !lp.hand_out(p).await {
                        break;
                    }
                }
            }
        }
    }
    status.set_connected(false);
    drop(lanes);
    drop(held);
    drop(lp);
    // Let what was handed out finish (the engine drains it), then commit what is
    // settled and leave the group.
    state.wait_idle().await;
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        debug!(subscription = %spec.subscription, error = %e, "final commit");
    }
    consumer.unsubscribe();
    t.live.lock().remove(&spec.subscription);
    failure.map_or(Ok(()), |f| Err(ConsumeError::Failed(f)))
}

impl Loop<'_> {
    /// Hand one message to the pipeline: now, or when due (a retry-topic message).
    /// Returns false when the router is stopping.
    async fn hand_out(&self, p: Pending) -> bool {
        let shared = &self.shared;
        let part = p.part();
        if !shared.state.is_current(&part, p.generation) {
            // Revoked since it was read: its next owner delivers it.
            let counted = p.record.topic != shared.retry_topic;
            let _ = self.events.send(Event::Free(p.lane, counted));
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
                let (events, shared) = (self.events.clone(), shared.clone());
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
        let (message, defect) = p.record.to_message(&self.transport.display);
        let position = crate::trace::enabled().then(|| crate::trace::Position::Kafka {
            topic: p.record.topic.clone(),
            partition: p.record.partition,
            offset: p.record.offset,
        });
        shared.state.started(&part);
        let (attempt, first_failure) = (p.attempt, p.first_failure);
        let handle = KafkaHandle { shared: shared.clone(), events: self.events.clone(), pending: Some(p) };
        let mut delivery = Delivery::new(message, Box::new(handle));
        if let Some(a) = attempt {
            delivery.attempt = a;
        }
        if first_failure.is_some() {
            delivery.first_failure = first_failure;
        }
        delivery.defect = defect;
        delivery.position = position;
        self.inbox.put(delivery).await.is_ok()
    }
}
