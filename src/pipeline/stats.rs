//! Counters of message outcomes. Every consumed message lands in exactly one
//! outcome counter (handled, duplicate, conflict or dead-lettered), so
//! `consumed = handled + duplicates + conflicts + dead_lettered_other` holds at
//! every batch boundary; the other counters are details of those.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Live counters, shared between the pipeline and whoever reports them.
#[derive(Debug, Default)]
pub struct Stats {
    consumed: AtomicU64,
    handled: AtomicU64,
    duplicates: AtomicU64,
    conflicts: AtomicU64,
    rejected: AtomicU64,
    undecodable: AtomicU64,
    tombstones: AtomicU64,
    bad_keys: AtomicU64,
    exhausted: AtomicU64,
    retries: AtomicU64,
    replies: AtomicU64,
    unkeyed: AtomicU64,
    cross_partition_duplicates: AtomicU64,
    event_time_fallbacks: AtomicU64,
    early_bucket_drops: AtomicU64,
    clock_clamps: AtomicU64,
    dead_letters_written: AtomicU64,
    batches: AtomicU64,
    commits: AtomicU64,
    commit_failures: AtomicU64,
    batch_failures: AtomicU64,
    unverified: AtomicU64,
    guard_evictions: AtomicU64,
    guard_flushed: AtomicU64,
    log_rewrites: AtomicU64,
    log_rewrites_held: AtomicU64,
    restored: AtomicU64,
    processing_ms: AtomicU64,
    /// Microseconds from a batch's first message entering it to the batch
    /// being durable, once per message; created on first use.
    latency: Mutex<Option<Histogram<u64>>>,
}

/// A snapshot of [`Stats`], printed at exit and returned to embedders.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RunSummary {
    /// Messages taken from Kafka and given a final outcome.
    pub consumed: u64,
    /// New messages the handler applied.
    pub handled: u64,
    /// Redeliveries recognised and skipped (handler not called).
    pub duplicates: u64,
    /// Keys reused with a different payload (dead-lettered).
    pub conflicts: u64,
    /// New messages the handler refused (dead-lettered).
    pub rejected: u64,
    /// Payloads that did not decode (dead-lettered).
    pub undecodable: u64,
    /// Null payloads (dead-lettered).
    pub tombstones: u64,
    /// Messages without a usable key, e.g. disagreeing headers (dead-lettered).
    pub bad_keys: u64,
    /// New messages not finished within the retry policy's attempts
    /// (dead-lettered, `on_exhausted = "dead_letter"`).
    pub exhausted: u64,
    /// Failed attempts that were retried later (not outcomes: a message
    /// retried three times and then handled counts 3 here and 1 in
    /// `handled`).
    pub retries: u64,
    /// Replies acknowledged on the reply topic.
    pub replies: u64,
    /// Messages keyed by topic/partition/offset because no key source matched.
    pub unkeyed: u64,
    /// Duplicates whose first copy came from another partition.
    pub cross_partition_duplicates: u64,
    /// With `bucket_clock = "event"`: records filed by the processing clock
    /// because the message timestamp was missing, in the future, or older
    /// than the window.
    pub event_time_fallbacks: u64,
    /// Buckets dropped before their window ended because the store passed
    /// `max_store_bytes` (`on_store_full = "drop_oldest"`).
    pub early_bucket_drops: u64,
    /// Times the wall clock was seen behind the store's high-water mark and
    /// clamped (processing time never runs backwards).
    pub clock_clamps: u64,
    /// Dead letters acknowledged by the broker.
    pub dead_letters_written: u64,
    /// Batches written (one RocksDB write and fsync each).
    pub batches: u64,
    /// Asynchronous offset commits sent: the loop's and the stop's final
    /// one (not the synchronous ones of revocations); fewer than `batches`
    /// with `commit_interval_ms`.
    pub commits: u64,
    /// Offset commits that failed and were retried later.
    pub commit_failures: u64,
    /// Batches that could not be made durable (store, dead-letter or reply
    /// write failed) and were held back and tried again (fail closed).
    pub batch_failures: u64,
    /// New messages handled (or rejected) while the store could not be
    /// written (`on_store_failure = "fail_open"`): their dedup record was
    /// kept only in the in-memory guard until the store returned.
    pub unverified: u64,
    /// Keys the fail-open guard forgot because it was full: a redelivery of
    /// one of them reaches the handler again.
    pub guard_evictions: u64,
    /// Guarded records written into the store once it took writes again.
    pub guard_flushed: u64,
    /// Partitions whose log the brokers rewrote below the checkpoint
    /// (acknowledged messages lost, their offsets reused), resumed at an
    /// earlier checkpoint that still matches the log.
    pub log_rewrites: u64,
    /// Partitions found rewritten below every checkpoint kept, held for the
    /// operator.
    pub log_rewrites_held: u64,
    /// Dedup records restored from changelogs into the store when
    /// partitions were assigned.
    pub restored: u64,
    /// Median time a message spent in the worker, microseconds: from its
    /// batch's first message being polled (or taken back after a retry
    /// wait) to the batch's outcomes being durable. An upper bound per
    /// message: messages polled later in the batch's linger waited less.
    pub latency_p50_us: u64,
    /// 99th percentile of the same.
    pub latency_p99_us: u64,
    /// Milliseconds from the first message polled to the last batch
    /// committed: the busy time, without start-up and idle waits at the end.
    pub processing_ms: u64,
}

impl RunSummary {
    /// Calls made to the handler: every handled or rejected message.
    pub fn handler_calls(&self) -> u64 {
        self.handled + self.rejected
    }
}

/// The outcome of one message, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// See [`RunSummary::handled`].
    Handled,
    /// See [`RunSummary::duplicates`].
    Duplicate,
    /// See [`RunSummary::conflicts`].
    Conflict,
    /// See [`RunSummary::rejected`].
    Rejected,
    /// See [`RunSummary::undecodable`].
    Undecodable,
    /// See [`RunSummary::tombstones`].
    Tombstone,
    /// See [`RunSummary::bad_keys`].
    BadKey,
    /// See [`RunSummary::exhausted`].
    Exhausted,
}

impl Counted {
    /// The `outcome` label of the messages metric.
    pub fn label(self) -> &'static str {
        match self {
            Counted::Handled => "handled",
            Counted::Duplicate => "duplicate",
            Counted::Conflict => "conflict",
            Counted::Rejected => "rejected",
            Counted::Undecodable => "undecodable",
            Counted::Tombstone => "tombstone",
            Counted::BadKey => "bad_key",
            Counted::Exhausted => "retries_exhausted",
        }
    }
}

impl Stats {
    /// Adds the counts of one written batch.
    pub fn add_batch(&self, counts: &BatchCounts) {
        let add = |c: &AtomicU64, n: u64| {
            c.fetch_add(n, Ordering::Relaxed);
        };
        add(&self.consumed, counts.outcomes.iter().sum());
        for (i, c) in [
            &self.handled,
            &self.duplicates,
            &self.conflicts,
            &self.rejected,
            &self.undecodable,
            &self.tombstones,
            &self.bad_keys,
            &self.exhausted,
        ]
        .into_iter()
        .enumerate()
        {
            add(c, counts.outcomes[i]);
        }
        add(&self.retries, counts.retries);
        add(&self.replies, counts.replies);
        add(&self.unkeyed, counts.unkeyed);
        add(&self.cross_partition_duplicates, counts.cross_partition);
        add(&self.event_time_fallbacks, counts.event_time_fallbacks);
        add(&self.early_bucket_drops, counts.early_bucket_drops);
        add(&self.dead_letters_written, counts.dead_letters);
        add(&self.unverified, counts.unverified);
        add(&self.guard_evictions, counts.guard_evictions);
        add(&self.batches, 1);
    }

    /// Sets the busy time so far.
    pub fn set_processing_ms(&self, ms: u64) {
        self.processing_ms.store(ms, Ordering::Relaxed);
    }

    /// Sets how many times the store clamped a clock that ran backwards.
    pub fn set_clock_clamps(&self, n: u64) {
        self.clock_clamps.store(n, Ordering::Relaxed);
    }

    /// Counts a batch that could not be made durable.
    pub fn batch_failed(&self) {
        self.batch_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Records that `n` messages became durable `micros` after their batch
    /// began.
    pub fn record_latency(&self, micros: u64, n: u64) {
        let mut h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        let h = h.get_or_insert_with(|| {
            // 1 µs to 1 h at 2 significant digits: a few tens of KiB.
            Histogram::new_with_bounds(1, 3_600_000_000, 2).unwrap_or_else(|_| {
                Histogram::new(2).expect("a histogram with 2 significant digits")
            })
        });
        h.saturating_record_n(micros.max(1), n);
    }

    /// Counts guarded records written into the store once it returned.
    pub fn guard_flushed(&self, n: u64) {
        self.guard_flushed.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a partition whose log was found rewritten below its
    /// checkpoint: resumed at an earlier verified checkpoint, or (`held`)
    /// held for the operator.
    pub fn log_rewritten(&self, held: bool) {
        let c = if held {
            &self.log_rewrites_held
        } else {
            &self.log_rewrites
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` dedup records restored from changelogs.
    pub fn restored(&self, n: u64) {
        self.restored.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts an offset commit sent.
    pub fn commit_sent(&self) {
        self.commits.fetch_add(1, Ordering::Relaxed);
    }

    /// Asynchronous offset commits sent so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Counts a failed offset commit.
    pub fn commit_failed(&self) {
        self.commit_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The current values.
    pub fn snapshot(&self) -> RunSummary {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RunSummary {
            consumed: g(&self.consumed),
            handled: g(&self.handled),
            duplicates: g(&self.duplicates),
            conflicts: g(&self.conflicts),
            rejected: g(&self.rejected),
            undecodable: g(&self.undecodable),
            tombstones: g(&self.tombstones),
            bad_keys: g(&self.bad_keys),
            exhausted: g(&self.exhausted),
            retries: g(&self.retries),
            replies: g(&self.replies),
            unkeyed: g(&self.unkeyed),
            cross_partition_duplicates: g(&self.cross_partition_duplicates),
            event_time_fallbacks: g(&self.event_time_fallbacks),
            early_bucket_drops: g(&self.early_bucket_drops),
            clock_clamps: g(&self.clock_clamps),
            dead_letters_written: g(&self.dead_letters_written),
            batches: g(&self.batches),
            commits: g(&self.commits),
            commit_failures: g(&self.commit_failures),
            batch_failures: g(&self.batch_failures),
            unverified: g(&self.unverified),
            guard_evictions: g(&self.guard_evictions),
            guard_flushed: g(&self.guard_flushed),
            log_rewrites: g(&self.log_rewrites),
            log_rewrites_held: g(&self.log_rewrites_held),
            restored: g(&self.restored),
            processing_ms: g(&self.processing_ms),
            latency_p50_us: self.latency_quantile(0.5),
            latency_p99_us: self.latency_quantile(0.99),
        }
    }

    fn latency_quantile(&self, q: f64) -> u64 {
        let h = self.latency.lock().unwrap_or_else(|e| e.into_inner());
        h.as_ref().map_or(0, |h| h.value_at_quantile(q))
    }
}

/// Counts of one batch, added to [`Stats`] only once the batch is durable.
#[derive(Debug, Default)]
pub struct BatchCounts {
    outcomes: [u64; 8],
    /// Unkeyed messages in the batch.
    pub unkeyed: u64,
    /// Cross-partition duplicates in the batch.
    pub cross_partition: u64,
    /// Records filed by the processing clock in event-time mode.
    pub event_time_fallbacks: u64,
    /// Buckets dropped early by the size cap.
    pub early_bucket_drops: u64,
    /// Dead letters acknowledged for the batch.
    pub dead_letters: u64,
    /// Failed attempts deferred for a retry.
    pub retries: u64,
    /// Replies acknowledged for the batch.
    pub replies: u64,
    /// New messages of the batch whose records went to the fail-open guard.
    pub unverified: u64,
    /// Keys the guard forgot to make room for this batch's.
    pub guard_evictions: u64,
}

impl BatchCounts {
    /// Messages of the batch the handler took: handled or rejected.
    pub fn handler_calls(&self) -> u64 {
        self.outcomes[Counted::Handled as usize] + self.outcomes[Counted::Rejected as usize]
    }

    /// Counts one outcome.
    pub fn count(&mut self, outcome: Counted) {
        self.outcomes[outcome as usize] += 1;
    }
}
