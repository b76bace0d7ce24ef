//! The Prometheus metrics of a worker: their names, units and help texts in
//! one place, and the recording calls the pipeline makes.
//!
//! Guarantee: the message counters are incremented only for outcomes that
//! are durable (after the batch's write), so `/metrics` never counts a
//! message that a crash would hand out again; a test compares them with its
//! own counts.

use crate::handler::Verdict;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

/// Messages by topic and final outcome.
pub const MESSAGES: &str = "idem_messages_total";
/// Failed attempts that were retried, by topic.
pub const RETRIES: &str = "idem_retries_total";
/// Handler calls by handler and result, seconds.
pub const HANDLER_SECONDS: &str = "idem_handler_duration_seconds";
/// Synced store writes (one per batch), seconds.
pub const STORE_WRITE_SECONDS: &str = "idem_store_write_duration_seconds";
/// Messages per batch.
pub const BATCH_SIZE: &str = "idem_batch_messages";
/// Log-end offset minus the next offset to process, per partition.
pub const LAG: &str = "idem_consumer_lag";
/// Live buckets of the store.
pub const STORE_BUCKETS: &str = "idem_store_buckets";
/// Estimated keys in the store.
pub const STORE_KEYS: &str = "idem_store_keys";
/// Bytes of the store directory.
pub const STORE_BYTES: &str = "idem_store_bytes";
/// 1 when the worker is degraded (a partition held after its retries ran
/// out, or the store failing), else 0.
pub const DEGRADED: &str = "idem_degraded";
/// Partitions waiting for a retry.
pub const PARTITIONS_WAITING: &str = "idem_partitions_waiting";
/// Offset commits that failed (retried later).
pub const COMMIT_FAILURES: &str = "idem_commit_failures_total";
/// Batches that could not be made durable (held back and retried).
pub const BATCH_FAILURES: &str = "idem_batch_failures_total";
/// Assignments where the store's checkpoint was behind the group's
/// committed offset (a store restored from an old copy).
pub const STORE_BEHIND: &str = "idem_store_behind_total";
/// Counter: partitions whose log was found rewritten below the checkpoint,
/// by topic, partition and what the worker did (`resumed`, `held`).
pub const LOG_REWRITES: &str = "idem_log_rewrites_total";
/// Counter: new messages handled without durable dedup (fail open), by topic.
pub const UNVERIFIED: &str = "idem_unverified_total";
/// Gauge: keys held by the fail-open guard.
pub const GUARD_KEYS: &str = "idem_fail_open_guard_keys";
/// Counter: duplicates whose first copy came from another partition.
pub const CROSS_PARTITION: &str = "idem_cross_partition_duplicates_total";
/// Counter: dedup records restored from changelogs, by topic.
pub const CHANGELOG_RESTORED: &str = "idem_changelog_restored_records_total";
/// Histogram: how long a partition's changelog restore took, seconds.
pub const CHANGELOG_RESTORE_SECONDS: &str = "idem_changelog_restore_seconds";
/// Counter: dedup records produced to changelogs, by topic.
pub const CHANGELOG_RECORDS: &str = "idem_changelog_records_total";
/// Counter: keys the full fail-open guard forgot.
pub const GUARD_EVICTIONS: &str = "idem_fail_open_guard_evictions_total";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder (once; later calls return
/// the same handle). `None` when another recorder was installed first.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ];
            let sizes = [1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_SIZE.into()), &sizes))
                .and_then(|b| b.install_recorder())
                .map_err(|e| tracing::warn!(error = %e, "cannot install the Prometheus recorder"))
                .ok()?;
            describe();
            Some(handle)
        })
        .as_ref()
}

fn describe() {
    describe_counter!(MESSAGES, "Messages by topic and final outcome (handled, duplicate, conflict, rejected, undecodable, tombstone, bad_key, retries_exhausted).");
    describe_counter!(
        RETRIES,
        "Failed attempts that were retried later, by topic."
    );
    describe_histogram!(
        HANDLER_SECONDS,
        metrics::Unit::Seconds,
        "Handler calls by handler and result."
    );
    describe_histogram!(
        STORE_WRITE_SECONDS,
        metrics::Unit::Seconds,
        "Synced RocksDB writes, one per batch."
    );
    describe_histogram!(BATCH_SIZE, "Messages per batch.");
    describe_gauge!(
        LAG,
        "Log-end offset minus the next offset to process, per partition."
    );
    describe_gauge!(STORE_BUCKETS, "Live buckets of the dedup store.");
    describe_gauge!(STORE_KEYS, "Estimated keys in the dedup store.");
    describe_gauge!(
        STORE_BYTES,
        metrics::Unit::Bytes,
        "Bytes of the dedup store directory."
    );
    describe_gauge!(
        DEGRADED,
        "1 while a partition is held after its retries ran out or the store fails."
    );
    describe_gauge!(
        PARTITIONS_WAITING,
        "Partitions waiting for a retry of a message."
    );
    describe_counter!(
        COMMIT_FAILURES,
        "Offset commits that failed and were retried later."
    );
    describe_counter!(
        CROSS_PARTITION,
        "Duplicates whose first copy came from another partition: the topic is keyed so that a scaled-out group cannot dedup it."
    );
    describe_counter!(
        UNVERIFIED,
        "New messages handled while the dedup store could not be written (on_store_failure = fail_open): deduplicated only by the in-memory guard."
    );
    describe_gauge!(
        GUARD_KEYS,
        "Keys held in memory by the fail-open guard until the store takes writes again."
    );
    describe_counter!(
        GUARD_EVICTIONS,
        "Keys the full fail-open guard forgot: a redelivery of one reaches the handler again."
    );
    describe_counter!(
        CHANGELOG_RESTORED,
        "Dedup records restored from the changelog into the store when a partition was assigned, by topic."
    );
    describe_histogram!(
        CHANGELOG_RESTORE_SECONDS,
        metrics::Unit::Seconds,
        "Time to restore one assigned partition from its changelog, before it is handled."
    );
    describe_counter!(
        CHANGELOG_RECORDS,
        "Dedup records produced (and acknowledged) to the changelog, by topic."
    );
    describe_counter!(
        LOG_REWRITES,
        "Partitions whose log the brokers rewrote below the checkpoint (acknowledged messages lost, offsets reused): resumed at an earlier verified checkpoint, or held for the operator."
    );
}

/// Counts a partition log found rewritten below its checkpoint.
pub fn log_rewritten(topic: &str, partition: i32, action: &'static str) {
    counter!(LOG_REWRITES, "topic" => topic.to_string(), "partition" => partition.to_string(), "action" => action)
        .increment(1);
}

/// Counts a partition's changelog restore.
pub fn changelog_restored(topic: &str, records: u64, took: Duration) {
    counter!(CHANGELOG_RESTORED, "topic" => topic.to_string()).increment(records);
    histogram!(CHANGELOG_RESTORE_SECONDS).record(took.as_secs_f64());
}

/// Adds `n` records of `topic` acknowledged by its changelog.
pub fn changelog_records(topic: &str, n: u64) {
    counter!(CHANGELOG_RECORDS, "topic" => topic.to_string()).increment(n);
}

/// Adds `n` duplicates whose first copy came from another partition.
pub fn cross_partition(n: u64) {
    counter!(CROSS_PARTITION).increment(n);
}

/// Adds `n` messages of `topic` handled without durable dedup.
pub fn unverified(topic: &str, n: u64) {
    counter!(UNVERIFIED, "topic" => topic.to_string()).increment(n);
}

/// Sets the fail-open guard's size and adds its evictions.
pub fn guard(keys: usize, evicted: u64) {
    gauge!(GUARD_KEYS).set(keys as f64);
    if evicted > 0 {
        counter!(GUARD_EVICTIONS).increment(evicted);
    }
}

/// Records one handler call.
pub fn handler_call(handler: &'static str, verdict: &Verdict, took: Duration) {
    histogram!(HANDLER_SECONDS, "handler" => handler, "result" => result_label(verdict))
        .record(took.as_secs_f64());
}

fn result_label(verdict: &Verdict) -> &'static str {
    match verdict {
        Verdict::Handled => "handled",
        Verdict::Rejected(_) => "rejected",
        Verdict::Retry { .. } => "retry",
    }
}

/// The call-duration histograms of one handler, looked up once (per batch)
/// instead of per call: the recorder's lookup of a labelled metric costs
/// more than an in-process handler's call. Records what
/// [`handler_call`] records.
pub struct HandlerCalls {
    handled: metrics::Histogram,
    rejected: metrics::Histogram,
    retry: metrics::Histogram,
}

impl HandlerCalls {
    /// The histograms of `handler`.
    pub fn of(handler: &'static str) -> Self {
        let h = |result: &'static str| histogram!(HANDLER_SECONDS, "handler" => handler, "result" => result);
        Self {
            handled: h("handled"),
            rejected: h("rejected"),
            retry: h("retry"),
        }
    }

    /// Records one call that ended with `verdict` after `took`.
    pub fn record(&self, verdict: &Verdict, took: Duration) {
        let h = match verdict {
            Verdict::Handled => &self.handled,
            Verdict::Rejected(_) => &self.rejected,
            Verdict::Retry { .. } => &self.retry,
        };
        h.record(took.as_secs_f64());
    }
}

/// Records one synced store write of a batch of `messages`.
pub fn store_write(took: Duration, messages: usize) {
    histogram!(STORE_WRITE_SECONDS).record(took.as_secs_f64());
    histogram!(BATCH_SIZE).record(messages as f64);
}

/// Adds `n` messages of `topic` with final `outcome`.
pub fn messages(topic: &str, outcome: &'static str, n: u64) {
    counter!(MESSAGES, "topic" => topic.to_string(), "outcome" => outcome).increment(n);
}

/// Adds `n` retried attempts of `topic`.
pub fn retries(topic: &str, n: u64) {
    counter!(RETRIES, "topic" => topic.to_string()).increment(n);
}

/// Counts a failed offset commit.
pub fn commit_failed() {
    counter!(COMMIT_FAILURES).increment(1);
}

/// Counts a batch that could not be made durable.
pub fn batch_failed() {
    counter!(BATCH_FAILURES).increment(1);
}

/// Counts an assignment whose store checkpoint was behind Kafka.
pub fn store_behind(topic: &str, partition: i32) {
    counter!(STORE_BEHIND, "topic" => topic.to_string(), "partition" => partition.to_string())
        .increment(1);
}

/// Sets the lag of one partition.
pub fn lag(topic: &str, partition: i32, lag: i64) {
    gauge!(LAG, "topic" => topic.to_string(), "partition" => partition.to_string()).set(lag as f64);
}

/// Sets the store gauges.
pub fn store(buckets: usize, keys: u64, bytes: u64) {
    gauge!(STORE_BUCKETS).set(buckets as f64);
    gauge!(STORE_KEYS).set(keys as f64);
    gauge!(STORE_BYTES).set(bytes as f64);
}

/// Sets the degraded gauge and the count of waiting partitions.
pub fn degraded(degraded: bool, waiting: usize) {
    gauge!(DEGRADED).set(if degraded { 1.0 } else { 0.0 });
    gauge!(PARTITIONS_WAITING).set(waiting as f64);
}
