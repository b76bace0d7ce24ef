//! Replay: "if this topic were delivered again, would anything reach the
//! handler twice?", answered from the store, for people, scripts and tests.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use idem::replay::{Position, Replay};
//! let config = idem::config::Config::load(Some("idem.toml".as_ref()), std::env::vars())?;
//! let report = Replay::topic(config, "payments").from(Position::Earliest).run()?;
//! assert!(report.no_op, "{}", report.render());
//! # Ok(()) }
//! ```
//!
//! Guarantees:
//! - A dry run ([`Replay::run`]) opens the store read-only (it may run beside a
//!   live worker on the same store) and writes nothing anywhere: no store
//!   write, no dead letter, no offset commit. Each message is decided by the
//!   worker's own decision function ([`crate::pipeline::Decider`]) against the
//!   store, and against the messages of the replay before it, so a key that
//!   occurs twice in the replayed range counts once as new.
//! - [`Replay::apply`] sends new messages through a handler exactly as the
//!   worker would (same batches, same atomic write, conflicts dead-lettered),
//!   with its checkpoints under `replay:<topic>`, so it never moves the live
//!   worker's checkpoints or the group's offsets. It needs the store to
//!   itself: stop the worker of that store first.
//! - Reading never joins or commits for the live group (see [`source`]).

pub mod kcat;
pub mod range;
pub mod report;
pub mod source;

pub use range::{FileFilter, PartitionRange, Position};
pub use report::{Example, ReplayCounts, ReplayOutcome, ReplayReport};

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::handler::{AnyHandler, Handler};
use crate::kafka;
use crate::key::ScopedKeyHash;
use crate::pipeline::{BatchProcessor, Counted, Decision};
use crate::proto::{DedupRecord, RecordOutcome};
use crate::store::{DedupStore, StoreOptions};
use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::{Message as _, OwnedMessage};
use report::ReportBuilder;
use source::{DumpReader, MessageSource, TopicReader};
use std::collections::HashMap;
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Prefix of the checkpoints an applying replay writes.
pub const REPLAY_CHECKPOINT_PREFIX: &str = "replay:";

/// Messages per batch of a dump (a replay uses the configured `batch_size`,
/// as the worker does).
const DUMP_BATCH: usize = 500;

#[derive(Debug, Clone)]
enum Source {
    Topic {
        topic: String,
    },
    File {
        path: PathBuf,
        topic: Option<String>,
    },
}

/// A replay to run: where from, over which range, against which store.
pub struct Replay {
    config: Config,
    source: Source,
    partitions: Option<Vec<i32>>,
    from: Position,
    to: Position,
    store: Option<Arc<DedupStore>>,
    clock: Arc<dyn Clock>,
    progress: bool,
}

impl Replay {
    /// A replay of `topic` on the configured brokers, against the configured
    /// store (`store_dir`, `scope`, key rule, payload format and window).
    pub fn topic(config: Config, topic: &str) -> Self {
        Self::new(
            config,
            Source::Topic {
                topic: topic.to_string(),
            },
        )
    }

    /// A replay of a dump file in kcat's JSON envelope (see [`kcat`]).
    pub fn file(config: Config, path: &Path) -> Self {
        Self::new(
            config,
            Source::File {
                path: path.to_path_buf(),
                topic: None,
            },
        )
    }

    fn new(config: Config, source: Source) -> Self {
        Self {
            config,
            source,
            partitions: None,
            from: Position::Earliest,
            to: Position::Latest,
            store: None,
            clock: Arc::new(SystemClock),
            progress: false,
        }
    }

    /// Only these partitions.
    pub fn partitions(mut self, partitions: Vec<i32>) -> Self {
        self.partitions = Some(partitions);
        self
    }

    /// Only messages of this topic (for a dump holding several).
    pub fn only_topic(mut self, topic: &str) -> Self {
        if let Source::File { topic: t, .. } = &mut self.source {
            *t = Some(topic.to_string());
        }
        self
    }

    /// Where the range starts (default: earliest).
    pub fn from(mut self, from: Position) -> Self {
        self.from = from;
        self
    }

    /// Where the range ends, exclusive (default: the log end at the start).
    pub fn to(mut self, to: Position) -> Self {
        self.to = to;
        self
    }

    /// Uses a store the caller already has open (embedding, tests) instead of
    /// opening `store_dir`.
    pub fn with_store(mut self, store: Arc<DedupStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// The clock of an applying replay's store (default: the system clock).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Shows progress (messages/s, ETA) on stderr when it is a terminal.
    pub fn show_progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    fn source_name(&self) -> String {
        match &self.source {
            Source::Topic { topic } => format!("kafka:{topic}"),
            Source::File { path, .. } => format!("file:{}", path.display()),
        }
    }

    fn open_source(&self, report: &mut ReportBuilder) -> anyhow::Result<Box<dyn MessageSource>> {
        Ok(match &self.source {
            Source::Topic { topic } => {
                let reader = TopicReader::open(
                    &self.config,
                    topic,
                    self.partitions.as_deref(),
                    &self.from,
                    &self.to,
                )?;
                for r in reader.ranges() {
                    report.declare(topic, r.partition, r.start, r.end);
                }
                Box::new(reader)
            }
            Source::File { path, topic } => {
                range::check_bounds(&self.from, &self.to, self.partitions.as_deref(), None)?;
                Box::new(DumpReader::open(
                    path,
                    FileFilter {
                        from: self.from.clone(),
                        to: Some(self.to.clone()),
                        partitions: self.partitions.clone(),
                        topic: topic.clone(),
                    },
                )?)
            }
        })
    }

    fn progress_bar(&self, expected: Option<u64>) -> ProgressBar {
        if !self.progress || !std::io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        match expected {
            Some(n) => ProgressBar::with_draw_target(Some(n), ProgressDrawTarget::stderr())
                .with_style(
                    ProgressStyle::with_template(
                        "{bar:30} {pos}/{len} messages, {per_sec}, ETA {eta}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
                ),
            None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
                ProgressStyle::with_template("{spinner} {pos} messages, {per_sec}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            ),
        }
    }

    /// Decides every message of the range against the store and reports what
    /// a redelivery would do. Writes nothing.
    pub fn run(self) -> anyhow::Result<ReplayReport> {
        let store = match &self.store {
            Some(s) => s.clone(),
            None => Arc::new(
                DedupStore::open_read_only_with_window(
                    &self.config.store_dir,
                    self.config.window_secs as i64 * 1000,
                )
                .with_context(|| {
                    format!(
                        "opening the store at {} read-only",
                        self.config.store_dir.display()
                    )
                })?,
            ),
        };
        let decider = self.config.decider();
        let mut report = ReportBuilder::new(self.source_name(), false);
        let mut source = self.open_source(&mut report)?;
        let bar = self.progress_bar(source.expected());
        // Keys this replay would record, so a second copy inside the range is
        // a duplicate of the first, as it would be for the worker.
        let mut staged: HashMap<ScopedKeyHash, DedupRecord> = HashMap::new();
        loop {
            let batch = source.next_batch(self.config.batch_size)?;
            if batch.is_empty() {
                break;
            }
            let now = store.processing_time();
            let (prepared, stored) = decider
                .prepare_batch(&batch, &store)
                .context("looking up the keys of a batch")?;
            for (msg, prepared) in batch.iter().zip(prepared) {
                let decision =
                    decider.complete(msg, prepared, |h| staged.get(h).cloned(), &stored, now);
                let outcome = outcome_of(&decision);
                let example = example_of(msg, &decision);
                let unkeyed = decision.unkeyed();
                if let Decision::New(fresh) = decision {
                    staged.insert(
                        fresh.hash,
                        DedupRecord {
                            fingerprint: fresh.fingerprint.0.to_vec(),
                            first_seen_ms: 0,
                            source_topic: msg.topic().to_string(),
                            source_partition: msg.partition(),
                            source_offset: msg.offset(),
                            outcome: RecordOutcome::Handled as i32,
                            refreshed_ms: 0,
                            response: None,
                        },
                    );
                }
                report.add(outcome, unkeyed, example);
            }
            bar.inc(batch.len() as u64);
        }
        bar.finish_and_clear();
        Ok(report.finish())
    }

    /// Like [`Replay::run`], but new messages go through `handler` and are
    /// recorded, exactly as the worker would handle them; conflicts and bad
    /// input are dead-lettered as usual. Needs the store to itself.
    pub fn apply(self, handler: Box<dyn Handler>) -> anyhow::Result<ReplayReport> {
        self.config
            .validate_except_topics()
            .context("invalid configuration")?;
        let store = match &self.store {
            Some(s) => s.clone(),
            None => {
                // Repairing means an existing store: a mistyped path must not
                // become a fresh store that sends the whole topic through the
                // handler.
                if !DedupStore::exists_at(&self.config.store_dir) {
                    anyhow::bail!(
                        "no idem store at {}: `replay --apply` repairs an existing store; check --store-dir (a worker creates the store on its first run)",
                        self.config.store_dir.display()
                    );
                }
                let opts = StoreOptions {
                    window_ms: self.config.window_secs as i64 * 1000,
                    bucket_secs: self.config.bucket_secs as i64,
                    handler_cfs: handler.column_families(),
                    sync: true,
                };
                Arc::new(
                    DedupStore::open(&self.config.store_dir, opts, self.clock.clone())
                        .with_context(|| {
                            format!(
                                "opening the store at {} for writing (is a worker still running on it? \
                                 `replay --apply` needs the store to itself)",
                                self.config.store_dir.display()
                            )
                        })?,
                )
            }
        };
        let mut report = ReportBuilder::new(self.source_name(), true);
        let mut source = self.open_source(&mut report)?;
        if let Source::Topic { topic } = &self.source {
            if self.config.create_topics {
                let admin: BaseConsumer = kafka::base_config(&self.config)?
                    .create()
                    .context("creating a metadata client")?;
                let n = kafka::partition_count(&admin, topic)?;
                kafka::ensure_topic(
                    &admin,
                    &self.config,
                    &self.config.dead_letter_topic_for(topic),
                    n,
                )?;
            }
        }
        let mut processor = BatchProcessor::new(
            &self.config,
            store.clone(),
            AnyHandler::Local(handler),
            REPLAY_CHECKPOINT_PREFIX,
        )?;
        let bar = self.progress_bar(source.expected());
        loop {
            let batch = source.next_batch(self.config.batch_size)?;
            if batch.is_empty() {
                break;
            }
            let result = processor.process(&batch)?;
            if let Some(((topic, partition), d)) = result.deferred.iter().next() {
                anyhow::bail!(
                    "the handler could not finish {topic}/{partition}@{}; nothing at or after it in that partition was applied (see the log for the reason); run the replay again with --from {partition}:{}",
                    d.offset,
                    d.offset
                );
            }
            for (msg, done) in batch.iter().zip(result.outcomes.into_iter().flatten()) {
                let outcome = match done.counted {
                    Counted::Handled => ReplayOutcome::New,
                    Counted::Duplicate => ReplayOutcome::Duplicate,
                    Counted::Conflict => ReplayOutcome::Conflict,
                    Counted::Rejected => ReplayOutcome::Rejected,
                    Counted::Undecodable => ReplayOutcome::Undecodable,
                    Counted::Tombstone => ReplayOutcome::Tombstone,
                    Counted::BadKey => ReplayOutcome::BadKey,
                    Counted::Exhausted => ReplayOutcome::Rejected,
                };
                // The key for the example: decided again now that the batch is
                // written (only for the few messages kept as examples).
                let example = if report.wants_example(outcome) {
                    let again =
                        processor
                            .decider
                            .decide(msg, |_| None, &store, store.processing_time())?;
                    let mut e = example_of(msg, &again);
                    if outcome != ReplayOutcome::Conflict {
                        e.first_seen = None;
                    }
                    e
                } else {
                    bare_example(msg)
                };
                report.add(outcome, done.unkeyed, example);
            }
            bar.inc(batch.len() as u64);
        }
        bar.finish_and_clear();
        Ok(report.finish())
    }
}

fn outcome_of(d: &Decision) -> ReplayOutcome {
    match d {
        Decision::Tombstone => ReplayOutcome::Tombstone,
        Decision::Undecodable(_) => ReplayOutcome::Undecodable,
        Decision::BadKey(_) => ReplayOutcome::BadKey,
        Decision::Duplicate { .. } => ReplayOutcome::Duplicate,
        Decision::Conflict { .. } => ReplayOutcome::Conflict,
        Decision::New(_) => ReplayOutcome::New,
    }
}

fn bare_example(msg: &OwnedMessage) -> Example {
    Example {
        topic: msg.topic().to_string(),
        partition: msg.partition(),
        offset: msg.offset(),
        key: None,
        first_seen: None,
    }
}

fn example_of(msg: &OwnedMessage, d: &Decision) -> Example {
    let mut e = bare_example(msg);
    e.key = d.key().map(|k| k.to_string());
    e.first_seen = match d {
        Decision::Duplicate { first, .. } | Decision::Conflict { first, .. } => Some(format!(
            "{}/{}@{}",
            first.source_topic, first.source_partition, first.source_offset
        )),
        _ => None,
    };
    e
}

/// Writes every message of the range of `topic` to `out` in kcat's JSON
/// envelope; returns how many. Reads by assignment, commits nothing.
pub fn dump(
    config: &Config,
    topic: &str,
    partitions: Option<&[i32]>,
    from: &Position,
    to: &Position,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<u64> {
    let mut reader = TopicReader::open(config, topic, partitions, from, to)?;
    let mut n = 0u64;
    loop {
        let batch = reader.next_batch(DUMP_BATCH)?;
        if batch.is_empty() {
            break;
        }
        for m in &batch {
            kcat::write_line(out, m).context("writing the dump")?;
        }
        n += batch.len() as u64;
    }
    out.flush().context("writing the dump")?;
    Ok(n)
}
