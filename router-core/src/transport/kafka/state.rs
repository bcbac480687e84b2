//! Per-partition state shared by the consume loop, the handles and the rebalance
//! callback: what is read and settled (the commit point), what is in flight, and why
//! fetching from a partition is paused.
//!
//! librdkafka keeps one pause flag per partition; several reasons may hold it
//! ([`PartState::paused`]). The flag is flipped in the same critical section as the
//! reason changes ([`State::change_pause`]), so two threads changing reasons (a read
//! filling the span, a settle moving the commit point) cannot flip it in the opposite
//! order of the state they saw.

use std::collections::HashMap;

use parking_lot::{Condvar, Mutex};
use tokio::sync::Notify;
use tracing::debug;

use super::offsets::Offsets;

/// A partition: (topic, partition).
pub type Part = (String, i32);

/// What identifies a record well enough to tell whether the broker still holds the
/// same one at its offset: (offset, timestamp in ms, payload length).
pub type Fingerprint = (i64, Option<i64>, usize);

/// What the state drives at the broker client (the consumer; a recorder in tests).
pub trait Switch: Send + Sync {
    fn pause(&self, part: &Part, pause: bool);
    /// Partitions assigned to this consumer now.
    fn assigned(&self) -> Vec<Part>;
    /// Store `offset` as the next commit point of `part`.
    fn store(&self, part: &Part, offset: i64);
}

#[derive(Debug, Default)]
pub struct PartState {
    pub offsets: Offsets,
    /// Bumped when the partition is revoked: messages read before are stale.
    pub generation: u64,
    /// Handed to the pipeline and not finished (settled or given up).
    pub in_flight: usize,
    /// Why fetching from the partition is paused. Retry messages of it waiting for
    /// their due time:
    pub waiting: usize,
    /// Reading ran `span_limit` offsets past the commit point: a crash would deliver
    /// all of those again, so read no further until the commit point moves.
    pub full: bool,
    /// The whole subscription is at its read-ahead bound (or paused by a circuit) and
    /// the loop polls only to serve rebalances and keep its group membership.
    pub stalled: bool,
    /// The last record read (the stall watchdog compares it with the broker's).
    pub last: Option<Fingerprint>,
}

impl PartState {
    pub fn paused(&self) -> bool {
        self.waiting > 0 || self.full || self.stalled
    }
}

pub struct State {
    pub subscription: String,
    pub parts: Mutex<HashMap<Part, PartState>>,
    /// Signalled whenever a message finishes (the revoke waits on it, on its thread).
    pub finished: Condvar,
    /// The same, for async waiters (the end of consumption).
    idle: Notify,
    switch: std::sync::OnceLock<Box<dyn Switch>>,
    /// How far a partition may read past its commit point (`SPAN_FACTOR` × prefetch).
    pub span_limit: i64,
}

impl State {
    pub fn new(subscription: &str, span_limit: i64) -> Self {
        State {
            subscription: subscription.to_string(),
            parts: Mutex::new(HashMap::new()),
            finished: Condvar::new(),
            idle: Notify::new(),
            switch: std::sync::OnceLock::new(),
            span_limit,
        }
    }

    /// Connect the state to its consumer (once, right after the consumer is made).
    pub fn attach(&self, switch: Box<dyn Switch>) {
        let _ = self.switch.set(switch);
    }

    /// Change why `part` is paused, and pause or resume it at the broker client when
    /// that flips.
    pub fn pause_reason(&self, part: &Part, change: impl FnOnce(&mut PartState)) {
        let mut parts = self.parts.lock();
        let p = parts.entry(part.clone()).or_default();
        self.change_pause(part, p, change);
    }

    /// Change why `p` is paused, with the lock on `parts` held (see the module doc).
    pub fn change_pause(&self, part: &Part, p: &mut PartState, change: impl FnOnce(&mut PartState)) {
        let before = p.paused();
        change(p);
        let after = p.paused();
        if before != after {
            if let Some(s) = self.switch.get() {
                s.pause(part, after);
            }
            debug!(subscription = %self.subscription, topic = %part.0, partition = part.1, pause = after, "fetching paused or resumed");
        }
    }

    /// Pause (or resume) every assigned partition: the loop keeps polling without
    /// reading (read-ahead bound, or a circuit open).
    pub fn stall(&self, on: bool) {
        let mut parts: Vec<Part> = self.switch.get().map(|s| s.assigned()).unwrap_or_default();
        // Resume also what was paused for the stall and is no longer assigned here.
        if !on {
            parts.extend(self.parts.lock().iter().filter(|(_, p)| p.stalled).map(|(k, _)| k.clone()));
            parts.sort();
            parts.dedup();
        }
        debug!(subscription = %self.subscription, partitions = parts.len(), on, "pausing every partition while polling");
        for part in &parts {
            self.pause_reason(part, |p| p.stalled = on);
        }
    }

    /// A message was read: record it, and pause its partition when it ran `span_limit`
    /// past its commit point (or the loop is stalled). Returns its generation.
    pub fn read(&self, part: &Part, record: Fingerprint, stalled: bool) -> u64 {
        let mut parts = self.parts.lock();
        let p = parts.entry(part.clone()).or_default();
        p.offsets.read(record.0);
        p.last = Some(record);
        // Bound what a crash would deliver again (duplicates) to `span_limit` per
        // partition; also catch a partition assigned while stalled.
        let full = p.offsets.span() >= self.span_limit;
        self.change_pause(part, p, |p| {
            p.full |= full;
            p.stalled |= stalled;
        });
        p.generation
    }

    pub fn started(&self, part: &Part) {
        self.parts.lock().entry(part.clone()).or_default().in_flight += 1;
    }

    /// A message handed out is finished: settled (its offset may be committed) or not.
    pub fn finish(&self, part: &Part, generation: u64, offset: i64, settled: bool) {
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
        self.idle.notify_waiters();
        if let (Some(c), Some(s)) = (commit, self.switch.get()) {
            // Auto-commit sends it within 200 ms.
            s.store(part, c);
        }
    }

    pub fn is_current(&self, part: &Part, generation: u64) -> bool {
        self.parts.lock().get(part).is_some_and(|p| p.generation == generation)
    }

    pub fn last(&self, part: &Part) -> Option<Fingerprint> {
        self.parts.lock().get(part).and_then(|p| p.last)
    }

    /// Store `offset` as the commit point of `part` now (the watchdog's repair of a
    /// partition whose records changed under the consumer).
    pub fn store_now(&self, part: &Part, offset: i64) {
        if let Some(s) = self.switch.get() {
            s.store(part, offset);
        }
    }

    /// Whether `part` is busy or idle on purpose: a message of it in flight, or held
    /// paused by the router itself (span full, a retry waiting, the loop stalled).
    /// Not a stall, whatever its lag.
    pub fn occupied(&self, part: &Part) -> bool {
        self.parts.lock().get(part).is_some_and(|p| p.paused() || p.in_flight > 0)
    }

    fn in_flight(&self) -> usize {
        self.parts.lock().values().map(|p| p.in_flight).sum()
    }

    /// Wait until no message is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Forget revoked partitions: their next assignment starts afresh (unpaused,
    /// nothing read), and messages read before are stale (generation bumped).
    pub fn revoked(&self, revoked: &[Part]) {
        let mut parts = self.parts.lock();
        for p in revoked {
            if let Some(s) = parts.get_mut(p) {
                *s = PartState { generation: s.generation + 1, ..PartState::default() };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Records what the state asked of the consumer.
    #[derive(Default)]
    struct Recorder {
        flips: Flips,
        stored: Stored,
        assigned: Vec<Part>,
    }

    impl Switch for Recorder {
        fn pause(&self, part: &Part, pause: bool) {
            self.flips.lock().push((part.clone(), pause));
        }
        fn assigned(&self) -> Vec<Part> {
            self.assigned.clone()
        }
        fn store(&self, part: &Part, offset: i64) {
            self.stored.lock().push((part.clone(), offset));
        }
    }

    fn part(p: i32) -> Part {
        ("orders".to_string(), p)
    }

    type Flips = Arc<Mutex<Vec<(Part, bool)>>>;
    type Stored = Arc<Mutex<Vec<(Part, i64)>>>;

    fn state(span: i64, assigned: Vec<Part>) -> (State, Flips, Stored) {
        let r = Recorder { assigned, ..Recorder::default() };
        let (flips, stored) = (r.flips.clone(), r.stored.clone());
        let s = State::new("sub", span);
        s.attach(Box::new(r));
        (s, flips, stored)
    }

    #[test]
    fn a_partition_pauses_at_its_span_and_resumes_when_its_head_settles() {
        let (s, flips, stored) = state(4, vec![]);
        let p = part(0);
        let g = (0..3).map(|o| s.read(&p, (o, None, 0), false)).last().unwrap_or_default();
        assert!(flips.lock().is_empty(), "3 read past the commit point: under the span of 4");
        s.read(&p, (3, None, 0), false);
        assert_eq!(*flips.lock(), [(p.clone(), true)], "the 4th fills the span");
        for _ in 0..4 {
            s.started(&p);
        }
        // Later offsets settle first: the commit point stays, the partition stays paused.
        s.finish(&p, g, 3, true);
        s.finish(&p, g, 2, true);
        assert_eq!(flips.lock().len(), 1);
        assert!(stored.lock().is_empty());
        // The head settles: the commit point moves to 1, the first still open.
        s.finish(&p, g, 0, true);
        assert_eq!(*stored.lock(), [(p.clone(), 1)]);
        assert_eq!(flips.lock().last(), Some(&(p.clone(), false)), "span 3 < 4: reading again");
        s.finish(&p, g, 1, true);
        assert_eq!(stored.lock().last(), Some(&(p.clone(), 4)));
    }

    #[test]
    fn several_reasons_hold_one_flag() {
        let (s, flips, _) = state(100, vec![part(0), part(1)]);
        let p = part(0);
        s.pause_reason(&p, |p| p.waiting += 1);
        s.stall(true);
        s.pause_reason(&p, |p| p.waiting -= 1);
        assert_eq!(
            *flips.lock(),
            [(part(0), true), (part(1), true)],
            "part 0 stays paused while the stall holds it; no flip for the second reason"
        );
        s.stall(false);
        assert_eq!(flips.lock()[2..], [(part(0), false), (part(1), false)]);
        assert!(!s.occupied(&p));
        s.started(&p);
        assert!(s.occupied(&p), "a message in flight: working, not stalled");
    }

    #[test]
    fn stale_messages_of_a_revoked_partition_change_nothing() {
        let (s, _, stored) = state(100, vec![]);
        let p = part(0);
        let g = s.read(&p, (7, None, 0), false);
        s.started(&p);
        s.revoked(std::slice::from_ref(&p));
        assert!(!s.is_current(&p, g));
        s.finish(&p, g, 7, true);
        assert!(stored.lock().is_empty(), "nothing stored for a stale generation");
        assert_eq!(s.in_flight(), 0, "the revoke reset the partition");
    }

    #[tokio::test]
    async fn wait_idle_wakes_when_the_last_message_finishes() {
        let (s, _, _) = state(100, vec![]);
        let s = Arc::new(s);
        let p = part(0);
        let g = s.read(&p, (0, None, 0), false);
        s.started(&p);
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.wait_idle().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        s.finish(&p, g, 0, true);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.expect("woken").expect("task");
    }
}
