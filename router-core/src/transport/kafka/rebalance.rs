//! The consumer's context: rebalances (a revoke waits for in-flight messages and
//! commits before the partitions go), lag from librdkafka's statistics, and whether
//! any broker is reachable (`/readyz`).

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use super::state::{Part, State, Switch};
use crate::transport::{Problem, SourceStatus};

/// How long a revoke waits for in-flight messages of the revoked partitions.
const REVOKE_WAIT: Duration = Duration::from_secs(30);
/// A consumer not steady in its group this long is reported on `/readyz`.
const UNSTEADY_REPORT: Duration = Duration::from_secs(30);

/// Whether a subscription's consumer is steady in its group (a member with an
/// assignment), from librdkafka's statistics. One per subscription, kept across
/// consumers the supervisor starts again, so a group the broker never lets anyone
/// rejoin is seen however often the consumer is replaced.
#[derive(Debug, Default)]
pub struct GroupWatch {
    /// Since when, and how, it has not been steady (`None`: steady).
    unsteady: parking_lot::Mutex<Option<(std::time::Instant, String)>>,
}

impl GroupWatch {
    fn seen(&self, state: &str, join_state: &str) {
        let mut u = self.unsteady.lock();
        if state == "up" && join_state == "steady" {
            *u = None;
        } else {
            let how = format!("group state {state}, join state {join_state}");
            let since = u.as_ref().map_or_else(std::time::Instant::now, |(t, _)| *t);
            *u = Some((since, how));
        }
    }

    /// How long it has not been steady, and how it is.
    pub fn unsteady(&self) -> Option<(Duration, String)> {
        self.unsteady.lock().as_ref().map(|(t, how)| (t.elapsed(), how.clone()))
    }
}

pub struct Context {
    pub state: Arc<OnceLock<Arc<State>>>,
    pub lag: Option<prometheus::IntGaugeVec>,
    pub subscription: String,
    pub status: Arc<SourceStatus>,
    pub group: Arc<GroupWatch>,
}

impl Context {
    /// librdkafka reconnects by itself; this only reports what it sees.
    pub fn reachable(&self, up: bool) {
        if up != self.status.is_connected() {
            if up {
                info!(subscription = %self.subscription, "kafka brokers reachable again: consuming");
                self.status.set_connected(true);
            } else {
                warn!(subscription = %self.subscription, "every kafka broker is unreachable; librdkafka keeps reconnecting");
                self.status.report(Problem::Unreachable, "every kafka broker is unreachable; reconnecting");
                self.status.set_connected(false);
            }
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
        if let Some(cgrp) = &statistics.cgrp {
            self.group.seen(&cgrp.state, &cgrp.join_state);
            match self.group.unsteady() {
                Some((d, how)) if d >= UNSTEADY_REPORT => self.status.report(
                    Problem::Group,
                    format!("not steady in its consumer group for {d:.0?} ({how}): the group coordinator has not completed a rebalance"),
                ),
                _ => self.status.clear(&Problem::Group),
            }
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
                        warn!(subscription = %state.subscription, busy, "revoke: in-flight messages did not finish in time; their partitions' next owner will deliver them again");
                    }
                    break;
                }
            }
        };
        // The callback runs inside a poll on a runtime worker: let the runtime move
        // other tasks off this thread while it waits.
        match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(wait),
            _ => wait(),
        }
        // Messages read before are stale now; their next assignment starts afresh.
        state.revoked(&revoked);
        if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
            debug!(subscription = %state.subscription, error = %e, "commit at revoke");
        }
    }
}

/// The consumer as the partition state drives it. Weak: the consumer's context holds
/// the state, so a strong reference here would keep both alive forever.
pub struct ConsumerSwitch(pub Weak<StreamConsumer<Context>>);

impl Switch for ConsumerSwitch {
    fn pause(&self, part: &Part, pause: bool) {
        let Some(consumer) = self.0.upgrade() else { return };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&part.0, part.1);
        // An error: revoked meanwhile, nothing to pause or resume.
        let result = if pause { consumer.pause(&tpl) } else { consumer.resume(&tpl) };
        if let Err(e) = result {
            debug!(topic = %part.0, partition = part.1, pause, error = %e, "pause or resume refused");
        }
    }

    fn assigned(&self) -> Vec<Part> {
        match self.0.upgrade().map(|c| c.assignment()) {
            Some(Ok(tpl)) => tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect(),
            _ => Vec::new(),
        }
    }

    fn store(&self, part: &Part, offset: i64) {
        let Some(consumer) = self.0.upgrade() else { return };
        let mut tpl = TopicPartitionList::new();
        if tpl.add_partition_offset(&part.0, part.1, Offset::Offset(offset)).is_ok() {
            if let Err(e) = consumer.store_offsets(&tpl) {
                // The partition was revoked meanwhile: its next owner starts earlier.
                debug!(topic = %part.0, partition = part.1, error = %e, "offset not stored");
            }
        }
    }
}
