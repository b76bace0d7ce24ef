//! One atomic unit of store writes: the dedup records, the partition
//! checkpoints and the handler's own state changes of one batch of messages.
//!
//! Guarantee: nothing staged here reaches RocksDB until
//! [`crate::store::DedupStore::commit`] writes it all as one `WriteBatch` with
//! the WAL synced; a crash before that leaves none of it, after it all of it.
//! Reads through a [`HandlerTxn`] see the writes staged earlier in the same
//! batch, so two events for one account in one batch add up correctly.

use crate::key::ScopedKeyHash;
use crate::proto::DedupRecord;
use crate::store::{Bucket, DedupStore, StoreError};
use std::collections::{BTreeMap, HashMap};

/// A hash map with a fast, randomly seeded hasher, for the per-batch maps
/// of the hot path (keys are hashes or handler keys; a batch holds at most
/// `batch_size` of them).
pub type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Staged handler writes by column family, then key: `None` deletes. Looked
/// up by borrowed key, so a read allocates nothing.
#[derive(Default)]
pub struct Staged(Vec<(&'static str, Family)>);

/// A staged write as [`Staged::sorted`] lists it: key, and value (`None`
/// deletes).
pub type StagedWrite<'a> = (&'a [u8], &'a Option<Vec<u8>>);

/// One column family's staged writes.
type Family = FastMap<Vec<u8>, Option<Vec<u8>>>;

impl Staged {
    /// The staged value of `key` in `cf`: `Some(None)` when it is deleted.
    pub fn get(&self, cf: &str, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        self.0
            .iter()
            .find(|(n, _)| *n == cf)
            .and_then(|(_, m)| m.get(key))
    }

    fn family_mut(&mut self, cf: &'static str) -> &mut Family {
        let i = match self.0.iter().position(|(n, _)| *n == cf) {
            Some(i) => i,
            None => {
                self.0.push((cf, FastMap::default()));
                self.0.len() - 1
            }
        };
        &mut self.0[i].1
    }

    /// Stages `key = value` in `cf` (`None` deletes).
    pub fn insert(&mut self, cf: &'static str, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.family_mut(cf).insert(key, value);
    }

    /// True when nothing is staged.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|(_, m)| m.is_empty())
    }

    /// Number of keys staged.
    pub fn len(&self) -> usize {
        self.0.iter().map(|(_, m)| m.len()).sum()
    }

    fn absorb(&mut self, other: Staged) {
        for (cf, m) in other.0 {
            let into = self.family_mut(cf);
            if into.is_empty() {
                *into = m;
            } else {
                into.extend(m);
            }
        }
    }

    /// Every staged write by column family, each family's in key order.
    pub fn sorted(&self) -> Vec<(&'static str, Vec<StagedWrite<'_>>)> {
        let mut out: Vec<_> = self
            .0
            .iter()
            .filter(|(_, m)| !m.is_empty())
            .map(|(cf, m)| {
                let mut kv: Vec<_> = m.iter().map(|(k, v)| (k.as_slice(), v)).collect();
                kv.sort_unstable_by(|a, b| a.0.cmp(b.0));
                (*cf, kv)
            })
            .collect();
        out.sort_unstable_by(|a, b| a.0.cmp(b.0));
        out
    }
}

/// A staged partition checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointAt {
    /// The next offset to process.
    pub next_offset: i64,
    /// Identity of the message at `next_offset - 1`, when known.
    pub last_message: Option<[u8; 16]>,
    /// The changelog records this batch wrote for the partition, as (first
    /// offset, count), when they are contiguous in the changelog.
    pub changelog: Option<(i64, i64)>,
}

/// Everything one batch will write.
#[derive(Default)]
pub struct StoreBatch {
    pub(crate) records: FastMap<ScopedKeyHash, (Bucket, DedupRecord)>,
    pub(crate) checkpoints: BTreeMap<(String, i32), CheckpointAt>,
    pub(crate) effects: Staged,
}

impl StoreBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// A record staged earlier in this batch under `key`, so that a duplicate
    /// inside one batch is caught before anything is written.
    pub fn staged_record(&self, key: &ScopedKeyHash) -> Option<&DedupRecord> {
        self.records.get(key).map(|(_, r)| r)
    }

    /// Stages a dedup record in `bucket`.
    pub fn record(&mut self, key: ScopedKeyHash, bucket: Bucket, record: DedupRecord) {
        self.records.insert(key, (bucket, record));
    }

    /// Stages the next offset to process for a partition, with the identity
    /// of the message before it when this batch finished that message (see
    /// [`crate::pipeline::truncation::mark_of`]).
    pub fn checkpoint(
        &mut self,
        topic: &str,
        partition: i32,
        next_offset: i64,
        last_message: Option<[u8; 16]>,
    ) {
        self.checkpoints.insert(
            (topic.to_string(), partition),
            CheckpointAt {
                next_offset,
                last_message,
                changelog: None,
            },
        );
    }

    /// Number of dedup records staged.
    pub fn record_count(&self) -> usize {
        self.records.len()
    }

    /// True when the batch would write nothing.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.checkpoints.is_empty() && self.effects.is_empty()
    }

    /// Opens a transaction for one handler call. Its writes join the batch only
    /// when [`HandlerTxn::keep`] is called, so a handler that fails half-way
    /// leaves nothing behind.
    pub fn handler_txn<'a>(&'a mut self, store: &'a DedupStore) -> HandlerTxn<'a> {
        HandlerTxn {
            batch: self,
            store,
            local: Staged::default(),
        }
    }
}

/// The handler's view of the store during one message: reads see the batch's
/// staged writes, writes are staged until [`HandlerTxn::keep`].
pub struct HandlerTxn<'a> {
    batch: &'a mut StoreBatch,
    store: &'a DedupStore,
    local: Staged,
}

impl HandlerTxn<'_> {
    /// Reads `key` from the handler column family `cf`, seeing writes staged
    /// by this transaction and earlier ones of the same batch.
    pub fn get(&self, cf: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.local.get(cf, key) {
            return Ok(v.clone());
        }
        if let Some(v) = self.batch.effects.get(cf, key) {
            return Ok(v.clone());
        }
        if let Some(v) = self.store.pending_handler_value(cf, key) {
            return Ok(v);
        }
        self.store.get_handler_value(cf, key)
    }

    /// Stages `key = value` in `cf`.
    pub fn put(&mut self, cf: &'static str, key: Vec<u8>, value: Vec<u8>) {
        self.local.insert(cf, key, Some(value));
    }

    /// Stages the deletion of `key` in `cf`.
    pub fn delete(&mut self, cf: &'static str, key: Vec<u8>) {
        self.local.insert(cf, key, None);
    }

    /// Moves this transaction's writes into the batch.
    pub fn keep(self) {
        self.batch.effects.absorb(self.local);
    }
}
