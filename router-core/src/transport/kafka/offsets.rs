//! Which offset of a partition may be committed: the first one not yet settled.
//!
//! Pure bookkeeping, unit-tested: the commit point never passes a message that is in
//! flight, waiting for an in-place retry, or queued behind its key, whatever order
//! messages finish in (the failure RoadRunner's Kafka driver is known for).

use std::collections::BTreeSet;

/// Offsets of one partition between "read" and "settled".
#[derive(Debug, Default)]
pub struct Offsets {
    /// Read and not yet settled.
    open: BTreeSet<i64>,
    /// One past the highest offset read.
    next: Option<i64>,
}

impl Offsets {
    /// A message at `offset` was read.
    pub fn read(&mut self, offset: i64) {
        self.open.insert(offset);
        self.next = Some(self.next.map_or(offset + 1, |n| n.max(offset + 1)));
    }

    /// The message at `offset` is settled (acked, or durably retried or dead-lettered).
    /// Returns the new commit point when it moved.
    pub fn settle(&mut self, offset: i64) -> Option<i64> {
        let before = self.commit_point();
        self.open.remove(&offset);
        let after = self.commit_point();
        (after != before).then_some(after).flatten()
    }

    /// The offset to commit: the first unsettled one, else one past the highest read.
    pub fn commit_point(&self) -> Option<i64> {
        self.open.first().copied().or(self.next)
    }

    /// How far reading has run ahead of the commit point, in offsets: what a crash
    /// now would deliver again. Gaps (compaction, transaction markers) count too,
    /// which errs on the safe side.
    pub fn span(&self) -> i64 {
        match (self.commit_point(), self.next) {
            (Some(c), Some(n)) => n - c,
            _ => 0,
        }
    }

    /// How many are read and not settled.
    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commit_point_waits_for_the_first_unsettled_offset() {
        let mut o = Offsets::default();
        assert_eq!(o.commit_point(), None);
        for off in 10..15 {
            o.read(off);
        }
        assert_eq!(o.commit_point(), Some(10));
        // Later offsets finish first: nothing may be committed past 10.
        assert_eq!(o.settle(12), None);
        assert_eq!(o.settle(11), None);
        assert_eq!(o.commit_point(), Some(10));
        // 10 settles: the point jumps over 11 and 12 to the next open one.
        assert_eq!(o.settle(10), Some(13));
        assert_eq!(o.settle(14), None);
        assert_eq!(o.settle(13), Some(15));
        assert_eq!(o.open(), 0);
        // Settling an unknown offset changes nothing.
        assert_eq!(o.settle(99), None);
    }

    #[test]
    fn span_is_what_a_crash_would_deliver_again() {
        let mut o = Offsets::default();
        assert_eq!(o.span(), 0);
        for off in 0..10 {
            o.read(off);
        }
        assert_eq!(o.span(), 10);
        // Settled behind an unsettled head: still redelivered after a crash.
        for off in 1..10 {
            o.settle(off);
        }
        assert_eq!(o.span(), 10);
        o.settle(0);
        assert_eq!(o.span(), 0);
    }

    #[test]
    fn gaps_in_offsets_are_fine() {
        // Compacted topics and transaction markers leave holes.
        let mut o = Offsets::default();
        o.read(3);
        o.read(7);
        assert_eq!(o.settle(7), None);
        assert_eq!(o.settle(3), Some(8));
    }
}
