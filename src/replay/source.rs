//! Where replayed messages come from: a topic read by assignment, or a dump
//! file.
//!
//! Guarantees:
//! - The topic is read with `assign`, by a consumer that never joins a group
//!   and never commits: the live group's membership and committed offsets are
//!   untouched.
//! - Every message inside the resolved range is returned exactly once, each
//!   partition in offset order; the read ends when every partition has reached
//!   the end of its range (or the end of its log, for gaps left by compaction).
//! - A read that makes no progress for [`STALL_TIMEOUT`] fails with the
//!   partitions it was waiting for, instead of hanging.
//! - A dump line that does not parse fails the read with its line number;
//!   nothing is skipped silently.

use crate::config::Config;
use crate::kafka;
use crate::replay::kcat;
use crate::replay::range::{self, FileFilter, PartitionRange, Position};
use anyhow::{bail, Context as _};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message as _, OwnedMessage};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a topic read may go without a message before it fails.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A source of replayed messages, read in batches.
pub trait MessageSource {
    /// Up to `max` next messages; empty when the source is exhausted.
    fn next_batch(&mut self, max: usize) -> anyhow::Result<Vec<OwnedMessage>>;

    /// Messages the source will return in all, when known up front.
    fn expected(&self) -> Option<u64>;
}

/// The replay consumer's context: the end of a partition is expected, not
/// an error worth a log line; every other client error is logged and kept
/// for the stall message.
#[derive(Default)]
pub struct ReplayContext {
    last_error: std::sync::Mutex<Option<String>>,
}

impl ClientContext for ReplayContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error, KafkaError::PartitionEOF(_)) {
            return;
        }
        tracing::warn!(error = %error, %reason, "Kafka client error during replay");
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_string());
    }
}

impl ConsumerContext for ReplayContext {}

/// A topic read by assignment over resolved ranges.
pub struct TopicReader {
    consumer: BaseConsumer<ReplayContext>,
    topic: String,
    /// Partitions not yet read to the end of their range.
    pending: BTreeMap<i32, PartitionRange>,
    /// The resolved ranges, for the report.
    ranges: Vec<PartitionRange>,
}

impl TopicReader {
    /// Resolves the range of `topic` (all partitions unless `partitions`
    /// names some) and assigns the consumer to it.
    pub fn open(
        config: &Config,
        topic: &str,
        partitions: Option<&[i32]>,
        from: &Position,
        to: &Position,
    ) -> anyhow::Result<Self> {
        // A group id that no worker uses: `assign` does not join it, and
        // nothing is ever committed under it.
        let group = format!("idem-replay-{}", std::process::id());
        let consumer: BaseConsumer<ReplayContext> = kafka::base_config(config)?
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "error")
            .create_with_context(ReplayContext::default())
            .context("creating the replay consumer")?;
        let count = kafka::partition_count(&consumer, topic)? as i32;
        range::check_bounds(from, to, partitions, Some(count))?;
        let chosen: Vec<i32> = match partitions {
            None => (0..count).collect(),
            Some(ps) => {
                if let Some(bad) = ps.iter().find(|p| **p >= count) {
                    bail!(
                        "partition {bad} does not exist: {topic} has {count} partitions (0..={})",
                        count - 1
                    );
                }
                ps.to_vec()
            }
        };
        let ranges = range::resolve(&consumer, topic, &chosen, from, to)?;
        let mut tpl = TopicPartitionList::new();
        let mut pending = BTreeMap::new();
        for r in &ranges {
            if r.start < r.end {
                tpl.add_partition_offset(topic, r.partition, Offset::Offset(r.start))
                    .with_context(|| format!("assigning {topic}/{}", r.partition))?;
                pending.insert(r.partition, *r);
            }
        }
        consumer
            .assign(&tpl)
            .with_context(|| format!("assigning the partitions of {topic}"))?;
        Ok(Self {
            consumer,
            topic: topic.to_string(),
            pending,
            ranges,
        })
    }

    /// The resolved range of every partition read.
    pub fn ranges(&self) -> &[PartitionRange] {
        &self.ranges
    }

    /// The topic read.
    pub fn topic(&self) -> &str {
        &self.topic
    }
}

impl MessageSource for TopicReader {
    fn next_batch(&mut self, max: usize) -> anyhow::Result<Vec<OwnedMessage>> {
        let mut out = Vec::new();
        let mut last_progress = Instant::now();
        while !self.pending.is_empty() && out.len() < max {
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    last_progress = Instant::now();
                    let Some(r) = self.pending.get(&m.partition()).copied() else {
                        continue; // prefetched past the end of a finished range
                    };
                    if m.offset() < r.end {
                        out.push(m.detach());
                    }
                    if m.offset() >= r.end - 1 {
                        self.pending.remove(&r.partition);
                    }
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    // The end of the log is at or past the end of the range,
                    // which was at most the log end when the replay began.
                    last_progress = Instant::now();
                    self.pending.remove(&p);
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, topic = %self.topic, "consumer error during replay; retrying");
                    *self
                        .consumer
                        .context()
                        .last_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                }
                None if !out.is_empty() => break,
                None => {}
            }
            if out.is_empty() && last_progress.elapsed() >= STALL_TIMEOUT {
                let waiting: Vec<String> = self
                    .pending
                    .values()
                    .map(|r| {
                        format!(
                            "{}/{} (range {}..{})",
                            self.topic, r.partition, r.start, r.end
                        )
                    })
                    .collect();
                let last = self
                    .consumer
                    .context()
                    .last_error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                    .unwrap_or_else(|| "none".into());
                bail!(
                    "replay stalled: no message for {}s while waiting for {}; last client error: {last}",
                    STALL_TIMEOUT.as_secs(),
                    waiting.join(", ")
                );
            }
        }
        Ok(out)
    }

    fn expected(&self) -> Option<u64> {
        Some(self.ranges.iter().map(|r| (r.end - r.start) as u64).sum())
    }
}

/// A dump file in kcat's JSON envelope, one message per line.
pub struct DumpReader {
    path: PathBuf,
    lines: std::io::Split<std::io::BufReader<std::fs::File>>,
    line_no: u64,
    filter: FileFilter,
}

impl DumpReader {
    /// Opens `path`; messages outside `filter` are passed over.
    pub fn open(path: &Path, filter: FileFilter) -> anyhow::Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("opening the dump file {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            lines: std::io::BufReader::new(file).split(b'\n'),
            line_no: 0,
            filter,
        })
    }
}

impl MessageSource for DumpReader {
    fn next_batch(&mut self, max: usize) -> anyhow::Result<Vec<OwnedMessage>> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(line) = self.lines.next() else { break };
            self.line_no += 1;
            let line = line.with_context(|| {
                format!("reading line {} of {}", self.line_no, self.path.display())
            })?;
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            let msg = kcat::parse_line(line)
                .with_context(|| format!("{} line {}", self.path.display(), self.line_no))?;
            if self.filter.keeps(&msg) {
                out.push(msg);
            }
        }
        Ok(out)
    }

    fn expected(&self) -> Option<u64> {
        None
    }
}
