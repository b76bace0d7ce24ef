//! Writes the store's batches on a thread of their own
//! (`overlap_wal_sync`), so that one batch's RocksDB write (memtable inserts,
//! WAL append and fsync) overlaps the processing of the next batch.
//!
//! Guarantees (see `crate::store` for the store's side):
//! - [`Syncer::synced`] only ever reports a batch that was written with its
//!   WAL synced; batches are written in the order handed over.
//! - The next batch's lookups see a batch handed over before it is written,
//!   so a key of one batch is a duplicate in the next.
//! - A failed write is reported and stays reported until
//!   [`Syncer::resume`]: none of the batches not written is in the store,
//!   their offsets are never committed, and the loop handles their messages
//!   again, as it does for a batch whose write failed in the loop.

use crate::store::{DedupStore, StoreBatch, StoreError};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The writing thread.
pub struct Syncer {
    store: Arc<DedupStore>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    /// Starts the thread over `store`.
    pub fn start(store: Arc<DedupStore>) -> Self {
        let writer = store.clone();
        let thread = std::thread::Builder::new()
            .name("idem-store-writer".into())
            .spawn(move || while writer.write_behind_next() {})
            .ok();
        if thread.is_none() {
            // Nothing would ever be written: fail every wait at once.
            store.stop_writing_behind();
        }
        Self { store, thread }
    }

    /// Hands batch number `seq` (numbered by the caller, rising) over to be
    /// written; waits while the store's queue of batches to write is full. A
    /// batch refused (an earlier write failed) is reported by
    /// [`Syncer::synced`].
    pub fn write(&self, seq: u64, batch: StoreBatch) {
        let _ = self.store.write_behind(seq, batch);
    }

    /// The newest batch known written and durable; `None` once a write
    /// failed.
    pub fn synced(&self) -> Option<u64> {
        self.store.written_behind()
    }

    /// The error of the write that failed, to the first caller that asks.
    pub fn take_error(&self) -> Option<StoreError> {
        self.store.take_write_behind_error()
    }

    /// After a failed write: forgets the batches not written and takes
    /// batches again; returns the error (`None`: nothing failed).
    pub fn resume(&self) -> Option<StoreError> {
        self.store.resume_behind()
    }

    /// Waits until every batch up to `seq` is written and durable; false when
    /// a write failed or the thread is gone.
    pub fn wait_for(&self, seq: u64) -> bool {
        self.store.wait_written_behind(seq)
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.store.stop_writing_behind();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::key::{IdempotencyKey, ScopedKeyHash};
    use crate::proto::DedupRecord;
    use crate::store::StoreOptions;

    #[test]
    fn a_batch_handed_over_is_seen_at_once_and_a_failed_write_holds_everything_until_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            DedupStore::open(
                dir.path(),
                StoreOptions {
                    handler_cfs: vec!["h"],
                    ..StoreOptions::default()
                },
                Arc::new(ManualClock::new(1_000_000)),
            )
            .unwrap(),
        );
        let syncer = Syncer::start(store.clone());
        assert_eq!(syncer.synced(), Some(0));
        let key = ScopedKeyHash::new("s", &IdempotencyKey(b"k1".to_vec()));
        let mut b = StoreBatch::new();
        b.checkpoint("t", 0, 7, None);
        b.record(
            key,
            store.bucket_for(1_000_000),
            DedupRecord {
                source_offset: 6,
                ..DedupRecord::default()
            },
        );
        {
            let mut txn = b.handler_txn(&store);
            txn.put("h", b"balance".to_vec(), b"10".to_vec());
            txn.keep();
        }
        syncer.write(1, b);
        // Seen by lookups and handler reads whether written yet or not.
        assert_eq!(store.lookup(&key).unwrap().unwrap().source_offset, 6);
        let mut b2 = StoreBatch::new();
        let v = b2.handler_txn(&store).get("h", b"balance").unwrap();
        assert_eq!(v, Some(b"10".to_vec()));
        // Any other read waits for the write: the checkpoint is there.
        assert_eq!(store.checkpoint("t", 0).unwrap(), Some(7));
        assert!(syncer.wait_for(1));
        assert_eq!(syncer.synced(), Some(1));
        // A write that fails stays failed, and its error is handed out once.
        store.close();
        let mut b3 = StoreBatch::new();
        b3.checkpoint("t", 0, 9, None);
        syncer.write(2, b3);
        assert!(!syncer.wait_for(2));
        assert_eq!(syncer.synced(), None);
        assert!(syncer.take_error().is_some());
        assert!(syncer.take_error().is_none());
        // Nothing after it is taken, and every other write refuses.
        let mut b4 = StoreBatch::new();
        b4.checkpoint("t", 0, 11, None);
        syncer.write(3, b4);
        assert!(!syncer.wait_for(3));
        assert!(store.sync_wal().is_err());
        // Resuming forgets what was not written and takes batches again.
        assert!(syncer.resume().is_some());
        assert!(syncer.resume().is_none());
        store.reopen().unwrap();
        assert_eq!(store.checkpoint("t", 0).unwrap(), Some(7));
        let mut b5 = StoreBatch::new();
        b5.checkpoint("t", 0, 13, None);
        syncer.write(5, b5);
        assert!(syncer.wait_for(5));
        assert_eq!(store.checkpoint("t", 0).unwrap(), Some(13));
    }
}
