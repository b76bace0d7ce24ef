//! Restoring a partition's dedup records from its changelog into the store,
//! before the partition is handled.
//!
//! Guarantees:
//! - A restore reads the changelog partition from the store's own position
//!   (the `changelog_next` of the partition's checkpoint) to the log end it
//!   saw when it began, and writes every record into its bucket, except
//!   records of buckets already past the window.
//! - A record is in the changelog only once its handler call returned. For
//!   a remote handler (the application) that is all a record means, so
//!   every record is restored. An in-process handler's effects are in the
//!   store's own batch, written after the changelog's acknowledgement, so
//!   for it ([`Restorer::unfinished_from_start`]) records whose source
//!   offset is at or past the partition's start are left out: their batch
//!   may never have been written, and their messages are decided again.
//! - The store's position and the partition's checkpoint move forward only
//!   after every record up to that position is written and the WAL synced,
//!   so a crash during a restore leaves a restore that starts over, never a
//!   store that believes it holds records it does not.
//! - A record that does not decode is an error that names the changelog
//!   offset: a restore never silently skips a record it could not read.

use crate::key::ScopedKeyHash;
use crate::proto::ChangelogRecord;
use crate::store::{Bucket, DedupStore, StoreBatch};
use anyhow::{bail, Context as _};
use prost::Message as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message as _;
use std::time::{Duration, Instant};

/// A partition's changelog could not be restored when it was assigned: the
/// worker stops without handling it, and `idem run` starts a new worker
/// (with backoff) that joins the group and restores again, as it does for a
/// store that cannot be written.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RestoreFailed(pub String);

/// Records written to the store per write during a restore.
const CHUNK: usize = 20_000;

/// How long a restore waits for the next changelog message before it gives
/// up (the brokers are then not answering).
const STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// What one restore did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    /// Changelog offset the restore started at.
    pub from: i64,
    /// Changelog offset it read up to (exclusive): the store's position now.
    pub to: i64,
    /// Records written into the store.
    pub records: u64,
    /// Records left out because their bucket is past the window.
    pub expired: u64,
    /// Records left out because their source offset is at or past the
    /// partition's start (in-process handlers: their batch may not have
    /// been written).
    pub unfinished: u64,
}

/// Reads changelog partitions with a consumer of its own, outside the group.
pub struct Restorer {
    consumer: BaseConsumer,
    unfinished_from_start: bool,
}

impl Restorer {
    /// A restorer over a client configuration with the brokers set.
    pub fn new(base: ClientConfig) -> anyhow::Result<Self> {
        let consumer = crate::kafka::reader_config(base, "idem-changelog-restore")
            .set("auto.offset.reset", "earliest")
            .create()
            .context("creating the consumer that restores changelogs")?;
        Ok(Self {
            consumer,
            unfinished_from_start: false,
        })
    }

    /// Leaves out records at or past the partition's start: for in-process
    /// handlers, whose effects are written with the store's batch.
    pub fn unfinished_from_start(mut self) -> Self {
        self.unfinished_from_start = true;
        self
    }

    /// Restores source partition `topic`/`partition` from `changelog` into
    /// `store`; the partition will be handled from `start` (`None`: where
    /// the group's reset policy decides).
    pub fn restore(
        &self,
        store: &DedupStore,
        changelog: &str,
        topic: &str,
        partition: i32,
        start: Option<i64>,
    ) -> anyhow::Result<Restored> {
        let began = Instant::now();
        let position = store
            .checkpoint_detail(topic, partition)
            .with_context(|| format!("reading the checkpoint of {topic}/{partition}"))?
            .map_or(0, |c| c.changelog_next);
        let (low, high) = self
            .consumer
            .fetch_watermarks(changelog, partition, STALL_TIMEOUT)
            .with_context(|| format!("reading the offsets of changelog {changelog}/{partition}"))?;
        let from = if position > high {
            // The changelog ends before what this store read of it: the
            // brokers lost records and will reuse their offsets. It is read
            // from its start (what it still holds), and the store's position
            // follows from there.
            tracing::warn!(%topic, partition, %changelog, position, end = high,
                "the changelog ends before the store's position in it (the brokers lost records): reading it from its start");
            low
        } else {
            position.max(low)
        };
        let mut done = Restored {
            from,
            to: high.max(from),
            ..Restored::default()
        };
        if from < high {
            tracing::info!(%topic, partition, %changelog, from, to = high,
                "restoring the partition's keys from its changelog before handling it");
            self.read(store, changelog, partition, from, high, start, &mut done)?;
        }
        store
            .mark_restored(topic, partition, done.to, start)
            .with_context(|| format!("recording the changelog position of {topic}/{partition}"))?;
        if done.records + done.expired + done.unfinished > 0 {
            tracing::info!(%topic, partition, records = done.records, expired = done.expired,
                unfinished = done.unfinished, from = done.from, to = done.to,
                took_ms = began.elapsed().as_millis() as u64, "changelog restored");
        }
        crate::telemetry::metrics::changelog_restored(topic, done.records, began.elapsed());
        Ok(done)
    }

    #[allow(clippy::too_many_arguments)]
    fn read(
        &self,
        store: &DedupStore,
        changelog: &str,
        partition: i32,
        from: i64,
        high: i64,
        start: Option<i64>,
        done: &mut Restored,
    ) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(changelog, partition, Offset::Offset(from))
            .with_context(|| format!("reading changelog {changelog}/{partition}"))?;
        self.consumer
            .assign(&tpl)
            .with_context(|| format!("reading changelog {changelog}/{partition}"))?;
        let result = self.read_assigned(store, changelog, partition, high, start, done);
        let _ = self.consumer.unassign();
        result
    }

    fn read_assigned(
        &self,
        store: &DedupStore,
        changelog: &str,
        partition: i32,
        high: i64,
        start: Option<i64>,
        done: &mut Restored,
    ) -> anyhow::Result<()> {
        let now = store.processing_time();
        let window = store.options().window_ms;
        let width = store.options().bucket_secs;
        let mut batch = StoreBatch::new();
        let mut last_progress = Instant::now();
        let mut next_log = Instant::now() + Duration::from_secs(5);
        loop {
            let Some(polled) = self.consumer.poll(Duration::from_millis(200)) else {
                if last_progress.elapsed() > STALL_TIMEOUT {
                    bail!(
                        "changelog {changelog}/{partition} gave nothing for {} s at offset {} of {high}",
                        STALL_TIMEOUT.as_secs(),
                        done.to_next(high)
                    );
                }
                continue;
            };
            let m = match polled {
                Ok(m) => m,
                Err(e) => {
                    // The client's own reports (a connection lost and
                    // retried) do not end the restore; a stall does.
                    tracing::debug!(%changelog, partition, error = %e, "while restoring");
                    continue;
                }
            };
            if m.topic() != changelog || m.partition() != partition {
                continue;
            }
            last_progress = Instant::now();
            let offset = m.offset();
            let value = m.payload().unwrap_or_default();
            let rec = ChangelogRecord::decode(value).with_context(|| {
                format!("changelog {changelog}/{partition}@{offset} is not a changelog record")
            })?;
            if rec.claim.is_some() {
                // A worker's claim of the partition: no key to restore.
                if offset + 1 >= high {
                    break;
                }
                continue;
            }
            let (Ok(hash), Some(record)) =
                (<[u8; 16]>::try_from(rec.key_hash.as_slice()), rec.record)
            else {
                bail!("changelog {changelog}/{partition}@{offset} has no key hash or no record");
            };
            let bucket = Bucket {
                start_secs: rec.bucket_start_secs,
                width_secs: width,
            };
            if bucket.expires_at_ms(window) <= now {
                done.expired += 1;
            } else if self.unfinished_from_start && start.is_some_and(|s| record.source_offset >= s)
            {
                done.unfinished += 1;
            } else {
                batch.record(ScopedKeyHash(hash), bucket, record);
                done.records += 1;
            }
            if batch.record_count() >= CHUNK {
                store
                    .commit_unsynced(&std::mem::take(&mut batch))
                    .context("writing restored records")?;
            }
            if Instant::now() >= next_log {
                next_log = Instant::now() + Duration::from_secs(5);
                tracing::info!(%changelog, partition, at = offset, to = high, records = done.records,
                    "restoring from the changelog");
            }
            if offset + 1 >= high {
                break;
            }
        }
        store
            .commit_unsynced(&batch)
            .context("writing restored records")?;
        Ok(())
    }
}

impl Restored {
    fn to_next(&self, high: i64) -> i64 {
        (self.from + (self.records + self.expired + self.unfinished) as i64).min(high)
    }
}
