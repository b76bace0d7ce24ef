//! Batches handed to the store to be written by a thread of their own
//! (`overlap_wal_sync`), so that one batch's RocksDB write (memtable inserts,
//! WAL append, fsync) overlaps the processing of the next.
//!
//! Guarantees:
//! - A batch handed over is seen by every lookup of records
//!   ([`DedupStore::lookup_many`]) and of handler state
//!   ([`DedupStore::pending_handler_value`]) at once, before it is written;
//!   every other read and write of the store first waits until the batches
//!   handed over are written, so the store reads as if each batch had been
//!   written when it was handed over.
//! - Batches are written in the order handed over, with the WAL synced;
//!   [`DedupStore::written_behind`] reports the newest one written and
//!   synced, never one that is not durable.
//! - Each write takes every batch waiting as one atomic RocksDB write: a
//!   failed write leaves none of them in the store.
//! - A failed write stays failed until [`DedupStore::resume_behind`]: no
//!   later batch is taken, the failed batches stay visible to lookups (so a
//!   key of theirs reaches no handler again meanwhile), and every wait
//!   reports the failure. Resuming forgets them all; the worker handles
//!   their messages again.

use super::{DedupStore, StoreBatch, StoreError};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// At most this many batches wait to be written: the worker goes on with
/// the next batches while the ones before are written, and the writer
/// syncs the WAL once for all it finds waiting.
const MAX_BEHIND: usize = 4;

#[derive(Default)]
struct State {
    /// Batches handed over and not written yet, oldest first, by sequence.
    pending: VecDeque<(u64, Arc<StoreBatch>)>,
    /// The newest batch written and synced.
    written: u64,
    failed: bool,
    error: Option<StoreError>,
    stop: bool,
}

/// The queue between the worker and the writing thread.
#[derive(Default)]
pub(crate) struct Behind {
    state: Mutex<State>,
    cv: Condvar,
    /// Batches in `state.pending`, readable without the lock: the reads of
    /// the hot path look at the queue only when something waits in it.
    waiting: AtomicUsize,
}

impl Behind {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, s: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cv.wait(s).unwrap_or_else(|e| e.into_inner())
    }

    /// Calls `f` on the batches not written yet, newest first, until it
    /// returns `Some`.
    pub(crate) fn find<T>(&self, mut f: impl FnMut(&StoreBatch) -> Option<T>) -> Option<T> {
        let s = self.lock();
        s.pending.iter().rev().find_map(|(_, b)| f(b))
    }

    /// True when no batch waits to be written.
    pub(crate) fn is_idle(&self) -> bool {
        self.waiting.load(Ordering::Acquire) == 0
    }

    /// Publishes the queue's length after a change made under the lock.
    fn publish(&self, s: &State) {
        self.waiting.store(s.pending.len(), Ordering::Release);
    }
}

impl DedupStore {
    /// A handler value staged by a batch handed over and not written yet,
    /// newest first: `Some(None)` when that batch deletes it, `None` when no
    /// such batch touches it (read the store then).
    pub fn pending_handler_value(&self, cf: &'static str, key: &[u8]) -> Option<Option<Vec<u8>>> {
        if self.behind.is_idle() {
            return None;
        }
        self.behind.find(|b| b.effects.get(cf, key).cloned())
    }

    /// Hands `batch` (numbered `seq` by the caller, rising) over to be
    /// written by the thread that runs [`DedupStore::write_behind_next`];
    /// waits while [`MAX_BEHIND`] batches wait to be written. Lookups see
    /// it at once. False when an earlier write failed (the batch is then
    /// dropped: nothing of it may be committed).
    pub fn write_behind(&self, seq: u64, batch: StoreBatch) -> bool {
        let b = &self.behind;
        let mut s = b.lock();
        while s.pending.len() >= MAX_BEHIND && !s.failed && !s.stop {
            s = b.wait(s);
        }
        if s.failed || s.stop {
            return false;
        }
        s.pending.push_back((seq, Arc::new(batch)));
        b.publish(&s);
        b.cv.notify_all();
        true
    }

    /// Writes every batch handed over and not written yet, in order, as one
    /// atomic write with the WAL synced (all of them or none), waiting for
    /// one if there is none. After a failed write it waits for
    /// [`DedupStore::resume_behind`]. False once
    /// [`DedupStore::stop_writing_behind`] was called: the writing thread
    /// then ends.
    pub fn write_behind_next(&self) -> bool {
        let b = &self.behind;
        let batches: Vec<(u64, Arc<StoreBatch>)> = {
            let mut s = b.lock();
            loop {
                if s.stop {
                    return false;
                }
                if !s.failed && !s.pending.is_empty() {
                    break s.pending.iter().cloned().collect();
                }
                s = b.wait(s);
            }
        };
        let group: Vec<&StoreBatch> = batches.iter().map(|(_, b)| b.as_ref()).collect();
        let result = self.commit_group(&group, true);
        let mut s = b.lock();
        match result {
            Ok(()) => {
                s.pending.drain(..batches.len());
                b.publish(&s);
                if let Some((seq, _)) = batches.last() {
                    s.written = s.written.max(*seq);
                }
            }
            Err(e) => {
                s.failed = true;
                s.error = Some(e);
            }
        }
        b.cv.notify_all();
        true
    }

    /// After a failed write: forgets every batch handed over and not written
    /// (none of them is in the store: a group is written whole or not at
    /// all), so that the caller can handle their messages again, and takes
    /// writes again. Returns the write's error; `None` when nothing failed.
    pub fn resume_behind(&self) -> Option<StoreError> {
        let b = &self.behind;
        let mut s = b.lock();
        if !s.failed {
            return None;
        }
        s.failed = false;
        s.pending.clear();
        b.publish(&s);
        let e = s.error.take().unwrap_or(StoreError::NotWrittenBehind);
        b.cv.notify_all();
        Some(e)
    }

    /// The newest batch handed over that is written and synced; `None` once
    /// a write failed.
    pub fn written_behind(&self) -> Option<u64> {
        let s = self.behind.lock();
        (!s.failed).then_some(s.written)
    }

    /// Waits until every batch up to `seq` is written and synced; false when
    /// a write failed.
    pub fn wait_written_behind(&self, seq: u64) -> bool {
        let b = &self.behind;
        let mut s = b.lock();
        loop {
            if s.failed {
                return false;
            }
            if s.written >= seq {
                return true;
            }
            if s.stop {
                return false;
            }
            s = b.wait(s);
        }
    }

    /// The error of the write that failed, to the first caller that asks.
    pub fn take_write_behind_error(&self) -> Option<StoreError> {
        self.behind.lock().error.take()
    }

    /// Ends the writing thread's loop; batches not written yet stay unwritten
    /// (their offsets were never committed).
    pub fn stop_writing_behind(&self) {
        self.behind.lock().stop = true;
        self.behind.cv.notify_all();
    }

    /// Waits until no batch waits to be written, so that what follows reads
    /// and writes the store in order with them. Fails when one could not
    /// be written.
    pub(crate) fn settle_behind(&self) -> Result<(), StoreError> {
        let b = &self.behind;
        if b.is_idle() {
            return Ok(());
        }
        let mut s = b.lock();
        loop {
            if s.failed || (s.stop && !s.pending.is_empty()) {
                return Err(StoreError::NotWrittenBehind);
            }
            if s.pending.is_empty() {
                return Ok(());
            }
            s = b.wait(s);
        }
    }
}
