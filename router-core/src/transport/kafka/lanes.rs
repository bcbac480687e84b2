//! Lanes: which messages wait for each other. Each record goes into a lane — its
//! partition (`ordering: partition`), its partition and record key (`key`), or a lane
//! of its own (`unordered`) — and a lane hands out one message at a time: the next
//! goes when the previous one is finished.

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::Bytes;

use super::config::Ordering as KafkaOrdering;
use super::state::Part;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Lane {
    Partition(Part),
    Key(Part, Option<Bytes>),
    Own(u64),
}

/// The lanes of one subscription and what waits in them.
#[derive(Debug)]
pub struct Lanes<T> {
    ordering: KafkaOrdering,
    queued: HashMap<Lane, VecDeque<T>>,
    /// Lanes whose message is out (handed to the pipeline or about to be).
    busy: HashSet<Lane>,
    next_own: u64,
}

impl<T> Lanes<T> {
    pub fn new(ordering: KafkaOrdering) -> Self {
        Lanes { ordering, queued: HashMap::new(), busy: HashSet::new(), next_own: 0 }
    }

    /// The lane of a record of `part` with `key`.
    pub fn lane(&mut self, part: &Part, key: &Option<Bytes>) -> Lane {
        match self.ordering {
            KafkaOrdering::Partition => Lane::Partition(part.clone()),
            KafkaOrdering::Key => Lane::Key(part.clone(), key.clone()),
            KafkaOrdering::Unordered => {
                self.next_own += 1;
                Lane::Own(self.next_own)
            }
        }
    }

    /// A new message for `lane`: returned when it may go now (the lane is then busy),
    /// else queued behind the lane's message.
    pub fn offer(&mut self, lane: Lane, item: T) -> Option<T> {
        if self.busy.contains(&lane) {
            self.queued.entry(lane).or_default().push_back(item);
            None
        } else {
            self.busy.insert(lane);
            Some(item)
        }
    }

    /// The message of `lane` is finished: the next one of the lane, if any (the lane
    /// stays busy with it), else the lane is free.
    pub fn finished(&mut self, lane: &Lane) -> Option<T> {
        let next = self.queued.get_mut(lane).and_then(VecDeque::pop_front);
        if self.queued.get(lane).is_some_and(VecDeque::is_empty) {
            self.queued.remove(lane);
        }
        if next.is_none() {
            self.busy.remove(lane);
        }
        next
    }

    /// Messages waiting behind busy lanes.
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.queued.values().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(p: i32) -> Part {
        ("t".to_string(), p)
    }

    #[test]
    fn a_lane_hands_out_one_message_at_a_time_in_order() {
        let mut lanes = Lanes::new(KafkaOrdering::Partition);
        let l = lanes.lane(&part(0), &None);
        assert_eq!(lanes.offer(l.clone(), 1), Some(1));
        assert_eq!(lanes.offer(l.clone(), 2), None);
        assert_eq!(lanes.offer(l.clone(), 3), None);
        let other = lanes.lane(&part(1), &None);
        assert_eq!(lanes.offer(other.clone(), 10), Some(10), "another partition is another lane");
        assert_eq!(lanes.finished(&l), Some(2));
        assert_eq!(lanes.finished(&l), Some(3));
        assert_eq!(lanes.finished(&l), None);
        assert_eq!(lanes.offer(l, 4), Some(4), "a free lane takes the next message at once");
        assert_eq!(lanes.waiting(), 0);
    }

    #[test]
    fn key_lanes_run_keys_of_a_partition_side_by_side() {
        let mut lanes = Lanes::new(KafkaOrdering::Key);
        let a = lanes.lane(&part(0), &Some(Bytes::from_static(b"a")));
        let b = lanes.lane(&part(0), &Some(Bytes::from_static(b"b")));
        let none = lanes.lane(&part(0), &None);
        assert_ne!(a, b);
        assert_eq!(lanes.offer(a.clone(), 1), Some(1));
        assert_eq!(lanes.offer(b, 2), Some(2));
        assert_eq!(lanes.offer(none, 3), Some(3));
        assert_eq!(lanes.offer(a, 4), None, "same key waits");
        assert_eq!(lanes.waiting(), 1);
    }

    #[test]
    fn unordered_gives_every_message_its_own_lane() {
        let mut lanes = Lanes::new(KafkaOrdering::Unordered);
        for i in 0..5 {
            let l = lanes.lane(&part(0), &None);
            assert_eq!(lanes.offer(l, i), Some(i));
        }
    }
}
