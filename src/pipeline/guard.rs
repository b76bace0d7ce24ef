//! The fail-open guard: what a worker remembers, in memory only, while its
//! dedup store cannot be written (`on_store_failure = "fail_open"`).
//!
//! Guarantees:
//! - Every record of a batch that could not be written is kept here, so a
//!   redelivery of its key while the store is down is still a duplicate (or a
//!   conflict), as long as the guard has room.
//! - Memory is bounded: past `max_keys` the oldest keys are forgotten, and
//!   each one forgotten is counted (a redelivery of it reaches the handler
//!   again: that is what failing open means).
//! - Once the store takes writes again, everything guarded (records and the
//!   checkpoints of the partitions handled meanwhile) is written into it in
//!   the same write as the next batch, which overrides older checkpoints; the
//!   guard is emptied only after that write succeeded.

use crate::key::ScopedKeyHash;
use crate::pipeline::TopicPartition;
use crate::proto::DedupRecord;
use crate::store::{Bucket, CheckpointAt, StoreBatch};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

/// Records and checkpoints that are not in the store yet.
#[derive(Debug)]
pub struct Guard {
    max_keys: usize,
    records: HashMap<ScopedKeyHash, (Bucket, DedupRecord)>,
    /// Keys in the order they were first guarded, oldest first.
    order: VecDeque<ScopedKeyHash>,
    checkpoints: BTreeMap<TopicPartition, CheckpointAt>,
}

/// A batch's staged writes that the guard cannot keep: an in-process
/// handler's own state changes live only in the store.
#[derive(Debug, thiserror::Error)]
#[error("the batch carries {0} handler state changes, which only the dedup store can keep")]
pub struct EffectsNotGuardable(pub usize);

impl Guard {
    /// An empty guard holding at most `max_keys` keys.
    pub fn new(max_keys: usize) -> Self {
        Self {
            max_keys: max_keys.max(1),
            records: HashMap::new(),
            order: VecDeque::new(),
            checkpoints: BTreeMap::new(),
        }
    }

    /// True when nothing waits to be written into the store.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.checkpoints.is_empty()
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// The guarded record of `key`.
    pub fn get(&self, key: &ScopedKeyHash) -> Option<&DedupRecord> {
        self.records.get(key).map(|(_, r)| r)
    }

    /// Keeps the records and checkpoints of a batch the store did not take;
    /// returns how many old keys were forgotten to make room.
    pub fn absorb(&mut self, batch: StoreBatch) -> Result<u64, EffectsNotGuardable> {
        if !batch.effects.is_empty() {
            return Err(EffectsNotGuardable(batch.effects.len()));
        }
        for (key, value) in batch.records {
            if self.records.insert(key, value).is_none() {
                self.order.push_back(key);
            }
        }
        self.checkpoints.extend(batch.checkpoints);
        let mut evicted = 0;
        while self.records.len() > self.max_keys {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if self.records.remove(&oldest).is_some() {
                evicted += 1;
            }
        }
        Ok(evicted)
    }

    /// Adds everything guarded to `batch` under what the batch itself
    /// stages (its own records and checkpoints are newer); returns the number
    /// of guarded records added.
    pub fn merge_into(&self, batch: &mut StoreBatch) -> u64 {
        let mut added = 0;
        for (key, value) in &self.records {
            if !batch.records.contains_key(key) {
                batch.records.insert(*key, value.clone());
                added += 1;
            }
        }
        for (tp, next) in &self.checkpoints {
            batch.checkpoints.entry(tp.clone()).or_insert(*next);
        }
        added
    }

    /// Empties the guard after its content was written into the store.
    pub fn clear(&mut self) {
        self.records.clear();
        self.order.clear();
        self.checkpoints.clear();
    }

    /// Forgets the checkpoints of revoked partitions (their new owner goes
    /// by Kafka's committed offsets); their keys stay guarded.
    pub fn forget_partitions(&mut self, revoked: &HashSet<TopicPartition>) {
        self.checkpoints.retain(|tp, _| !revoked.contains(tp));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::IdempotencyKey;

    fn key(i: u32) -> ScopedKeyHash {
        ScopedKeyHash::new("s", &IdempotencyKey(i.to_be_bytes().to_vec()))
    }

    fn batch(keys: std::ops::Range<u32>, next: i64) -> StoreBatch {
        let mut b = StoreBatch::new();
        for i in keys {
            let r = DedupRecord {
                source_offset: i as i64,
                ..DedupRecord::default()
            };
            b.record(key(i), Bucket::containing(0, 3600), r);
        }
        b.checkpoint("t", 0, next, None);
        b
    }

    #[test]
    fn a_full_guard_forgets_its_oldest_keys_and_counts_them() {
        let mut g = Guard::new(5);
        assert_eq!(g.absorb(batch(0..3, 3)).unwrap(), 0);
        assert_eq!(g.absorb(batch(3..7, 7)).unwrap(), 2);
        assert_eq!(g.len(), 5);
        // Two of the first batch's keys (the oldest) went; within a batch
        // there is no order.
        assert_eq!((0..3).filter(|i| g.get(&key(*i)).is_some()).count(), 1);
        for i in 3..7 {
            assert_eq!(g.get(&key(i)).unwrap().source_offset, i as i64);
        }
    }

    #[test]
    fn merging_keeps_the_batch_newer_checkpoint_and_records() {
        let mut g = Guard::new(10);
        g.absorb(batch(0..3, 3)).unwrap();
        let mut b = batch(2..4, 9);
        assert_eq!(g.merge_into(&mut b), 2);
        assert_eq!(b.record_count(), 4);
        assert_eq!(b.checkpoints[&("t".to_string(), 0)].next_offset, 9);
        g.clear();
        assert!(g.is_empty());
    }

    #[test]
    fn handler_state_changes_cannot_be_guarded() {
        let mut g = Guard::new(10);
        let mut b = batch(0..1, 1);
        b.effects
            .insert("ledger", b"acct".to_vec(), Some(b"1".to_vec()));
        assert!(matches!(g.absorb(b), Err(EffectsNotGuardable(1))));
        assert!(g.is_empty());
    }
}
