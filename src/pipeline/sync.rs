//! Syncs the store's WAL on a thread of its own, so that a batch's fsync
//! overlaps the processing of the next batch (`overlap_wal_sync`).
//!
//! Guarantees:
//! - [`Syncer::synced`] only ever reports a batch whose WAL write was
//!   synced: every batch written before a sync started is durable when it
//!   returns (one fsync covers all the WAL written before it).
//! - A failed sync is reported and stays reported: the loop stops the
//!   worker (whose batches since the last sync may be lost by a machine
//!   crash), and a new one starts from what the store holds.

use crate::store::{DedupStore, StoreError};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

#[derive(Default)]
struct State {
    /// The newest batch written and asked to be synced.
    requested: u64,
    /// The newest batch known durable.
    synced: u64,
    failed: bool,
    error: Option<StoreError>,
    stop: bool,
}

/// The sync thread and its state.
pub struct Syncer {
    state: Arc<(Mutex<State>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    /// Starts the thread over `store`.
    pub fn start(store: Arc<DedupStore>) -> Self {
        let state: Arc<(Mutex<State>, Condvar)> = Arc::default();
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("idem-wal-sync".into())
            .spawn(move || run(&store, &shared))
            .ok();
        Self { state, thread }
    }

    /// Asks for every batch up to `seq` (numbered by the caller, rising) to
    /// be synced.
    pub fn request(&self, seq: u64) {
        let (lock, cv) = &*self.state;
        let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
        s.requested = s.requested.max(seq);
        cv.notify_all();
    }

    /// The newest batch known durable; `None` once a sync failed.
    pub fn synced(&self) -> Option<u64> {
        let s = self.state.0.lock().unwrap_or_else(|e| e.into_inner());
        (!s.failed).then_some(s.synced)
    }

    /// The error of the sync that failed, to the first caller that asks.
    pub fn take_error(&self) -> Option<StoreError> {
        self.state
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .error
            .take()
    }

    /// Waits until every batch up to `seq` is durable; false when a sync
    /// failed.
    pub fn wait_for(&self, seq: u64) -> bool {
        let (lock, cv) = &*self.state;
        let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
        s.requested = s.requested.max(seq);
        cv.notify_all();
        loop {
            if s.failed {
                return false;
            }
            if s.synced >= seq {
                return true;
            }
            s = cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        {
            let (lock, cv) = &*self.state;
            lock.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
            cv.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(store: &DedupStore, state: &(Mutex<State>, Condvar)) {
    let (lock, cv) = state;
    loop {
        let target = {
            let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
            while !s.stop && (s.requested == s.synced || s.failed) {
                s = cv.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            if s.stop {
                return;
            }
            s.requested
        };
        let result = store.sync_wal();
        let mut s = lock.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(()) => s.synced = s.synced.max(target),
            Err(e) => {
                s.failed = true;
                s.error = Some(e);
            }
        }
        cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::{StoreBatch, StoreOptions};

    #[test]
    fn a_requested_batch_is_reported_synced_and_a_closed_store_fails_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            DedupStore::open(
                dir.path(),
                StoreOptions::default(),
                Arc::new(ManualClock::new(1_000_000)),
            )
            .unwrap(),
        );
        let syncer = Syncer::start(store.clone());
        assert_eq!(syncer.synced(), Some(0));
        let mut b = StoreBatch::new();
        b.checkpoint("t", 0, 7, None);
        store.commit_unsynced(&b).unwrap();
        assert_eq!(store.checkpoint("t", 0).unwrap(), Some(7));
        assert!(syncer.wait_for(1));
        assert_eq!(syncer.synced(), Some(1));
        // A sync that fails stays failed, and its error is handed out once.
        store.close();
        assert!(!syncer.wait_for(2));
        assert_eq!(syncer.synced(), None);
        assert!(syncer.take_error().is_some());
        assert!(syncer.take_error().is_none());
        assert!(!syncer.wait_for(3));
    }
}
