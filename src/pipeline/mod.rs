//! The consumer loop: poll, batch, decide, write, commit.
//!
//! Guarantees (DESIGN.md invariants 1, 2 and 5):
//! - An offset is committed to Kafka only after every message at or below it in
//!   its partition has a final outcome recorded in a synced RocksDB write (and
//!   its dead letter, if any, acknowledged by the broker).
//! - Every batch is written and committed before the next `poll`, so a
//!   rebalance (served inside `poll`) never finds handled-but-uncommitted work.
//! - A commit that fails is retried with the next batch; the store's
//!   checkpoint already holds the position, so a crash before the retry only
//!   costs a re-read of messages that then resolve as duplicates.
//!
//! Limits: batches are processed one at a time across all partitions of the
//! worker; a slow handler therefore slows every partition of this worker.

mod batch;
pub mod decide;
pub mod rebalance;
mod stats;

pub use batch::{BatchProcessor, BatchResult, MessageOutcome};
pub use decide::{Decider, Decision, Prepared, StoredRecords, TopicRule};
pub use rebalance::{Assignment, IdemContext, TopicPartition};
pub use stats::{BatchCounts, Counted, RunSummary, Stats};

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::dlq::DeadLetters;
use crate::handler::Handler;
use crate::kafka;
use crate::store::{DedupStore, StoreOptions};
use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::message::OwnedMessage;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message as _;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a poll waits when no batch is being filled.
const IDLE_POLL: Duration = Duration::from_millis(100);
/// The longest time between two expiry runs; with narrower buckets expiry
/// runs once per bucket width, so live buckets stay within
/// window / width + 2.
const MAX_EXPIRY_INTERVAL: Duration = Duration::from_secs(3600);
/// How often an idle worker checks whether it has caught up.
const CAUGHT_UP_CHECK: Duration = Duration::from_millis(500);

/// When the loop stops by itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum StopWhen {
    /// Only on shutdown.
    #[default]
    Shutdown,
    /// As soon as every assigned partition has been processed up to its
    /// log-end offset (for tests, demos and catch-up jobs).
    CaughtUp,
}

/// A worker: one consumer, one store, one handler.
pub struct Worker {
    config: Config,
    store: Arc<DedupStore>,
    handler: Box<dyn Handler>,
    stats: Arc<Stats>,
}

impl Worker {
    /// Opens the store (creating the handler's column families) with the
    /// system clock.
    pub fn new(config: Config, handler: Box<dyn Handler>) -> anyhow::Result<Self> {
        Self::with_clock(config, handler, Arc::new(SystemClock))
    }

    /// Like [`Worker::new`] with a clock of the caller's choice.
    pub fn with_clock(
        config: Config,
        handler: Box<dyn Handler>,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        std::fs::create_dir_all(&config.store_dir).with_context(|| {
            format!(
                "creating the store directory {}",
                config.store_dir.display()
            )
        })?;
        let opts = StoreOptions {
            window_ms: config.window_secs as i64 * 1000,
            bucket_secs: config.bucket_secs as i64,
            handler_cfs: handler.column_families(),
            sync: true,
        };
        let store = DedupStore::open(&config.store_dir, opts, clock).with_context(|| {
            format!("opening the dedup store in {}", config.store_dir.display())
        })?;
        Ok(Self {
            config,
            store: Arc::new(store),
            handler,
            stats: Arc::new(Stats::default()),
        })
    }

    /// The live counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The store, for inspection after (or during) a run.
    pub fn store(&self) -> Arc<DedupStore> {
        self.store.clone()
    }

    /// Runs the loop on the calling thread until `shutdown` is set (or, with
    /// [`StopWhen::CaughtUp`], until caught up), then commits what is durable,
    /// leaves the group and returns the counters.
    pub fn run(self, shutdown: Arc<AtomicBool>, stop: StopWhen) -> anyhow::Result<RunSummary> {
        let Worker {
            config,
            store,
            handler,
            stats,
        } = self;
        let dropped = store
            .expire(store.processing_time())
            .context("dropping expired buckets at start-up")?;
        if !dropped.is_empty() {
            tracing::info!(count = dropped.len(), "dropped expired buckets at start-up");
        }
        let assignment = Arc::new(Mutex::new(Assignment::default()));
        let consumer: BaseConsumer<IdemContext> = kafka::consumer_config(&config)
            .create_with_context(IdemContext::new(
                store.clone(),
                assignment.clone(),
                config.resume_from,
            ))
            .context("creating the Kafka consumer")?;
        if config.create_topics {
            for topic in &config.topics {
                let partitions = kafka::partition_count(&consumer, topic)?;
                kafka::ensure_topic(
                    &consumer,
                    &config,
                    &config.dead_letter_topic_for(topic),
                    partitions,
                )?;
            }
        }
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .with_context(|| format!("subscribing to {topics:?}"))?;
        tracing::info!(topics = ?topics, group = %config.group_id, store = %config.store_dir.display(), "worker started");

        let dlq_template = config.clone();
        let mut processor = BatchProcessor {
            store: store.clone(),
            handler,
            dead_letters: DeadLetters::new(&config)?,
            decider: config.decider(),
            dlq_topic: Box::new(move |t: &str| dlq_template.dead_letter_topic_for(t)),
            checkpoint_prefix: String::new(),
            refresh_on_duplicate: config.refresh_on_duplicate,
            bucket_clock: config.bucket_clock,
            size_cap: (
                config.max_store_bytes,
                config.on_store_full == crate::config::OnStoreFull::DropOldest,
            ),
        };
        let mut looper = Loop {
            consumer: &consumer,
            assignment: &assignment,
            stats: &stats,
            processed: HashMap::new(),
            uncommitted: BTreeMap::new(),
            generation_seen: 0,
        };
        let linger = Duration::from_millis(config.batch_linger_ms);
        let expiry_interval = MAX_EXPIRY_INTERVAL.min(Duration::from_secs(config.bucket_secs));
        let mut last_expiry = Instant::now();
        let mut last_caught_up_check = Instant::now();
        let mut result = Ok(());
        let mut first_message_at: Option<Instant> = None;
        while !shutdown.load(Ordering::SeqCst) {
            let batch = looper.fill_batch(config.batch_size, linger);
            if batch.is_empty() {
                looper.commit_pending();
                if stop == StopWhen::CaughtUp && last_caught_up_check.elapsed() >= CAUGHT_UP_CHECK {
                    last_caught_up_check = Instant::now();
                    if looper.caught_up() {
                        tracing::info!("caught up with every assigned partition; stopping");
                        break;
                    }
                }
            } else {
                let began = *first_message_at.get_or_insert_with(Instant::now);
                if let Err(e) = looper.process(&mut processor, &batch) {
                    result = Err(e);
                    break;
                }
                stats.set_processing_ms(began.elapsed().as_millis() as u64);
            }
            if last_expiry.elapsed() >= expiry_interval {
                last_expiry = Instant::now();
                if let Err(e) = store.expire(store.processing_time()) {
                    tracing::error!(error = %e, "dropping expired buckets failed; will retry");
                }
            }
        }
        looper.commit_pending();
        consumer.unsubscribe();
        stats.set_clock_clamps(store.clock_clamps());
        let summary = stats.snapshot();
        tracing::info!(?summary, "worker stopped");
        result.map(|_| summary)
    }
}

/// The state of the consumer loop between batches.
struct Loop<'a> {
    consumer: &'a BaseConsumer<IdemContext>,
    assignment: &'a Mutex<Assignment>,
    stats: &'a Stats,
    /// Next offset to process per partition, after durable batches.
    processed: HashMap<TopicPartition, i64>,
    /// Durable offsets not yet committed to Kafka.
    uncommitted: BTreeMap<TopicPartition, i64>,
    generation_seen: u64,
}

impl Loop<'_> {
    /// Polls until the batch is full, the linger time has passed since its
    /// first message, or (when empty) one idle poll came back with nothing.
    fn fill_batch(&mut self, size: usize, linger: Duration) -> Vec<OwnedMessage> {
        let mut batch: Vec<OwnedMessage> = Vec::new();
        let mut deadline: Option<Instant> = None;
        while batch.len() < size {
            let timeout = match deadline {
                None => IDLE_POLL,
                Some(d) => d.saturating_duration_since(Instant::now()),
            };
            let polled = self.consumer.poll(timeout);
            self.drop_revoked(&mut batch);
            match polled {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    if batch.is_empty() {
                        break;
                    }
                }
                Some(Ok(m)) => {
                    batch.push(m.detach());
                    deadline.get_or_insert_with(|| Instant::now() + linger);
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
        }
        batch
    }

    /// Drops fetched-but-unstarted messages of partitions revoked during the
    /// last poll: the new owner will handle them.
    fn drop_revoked(&mut self, batch: &mut Vec<OwnedMessage>) {
        let mut state = self.assignment.lock().unwrap_or_else(|e| e.into_inner());
        if state.generation == self.generation_seen {
            return;
        }
        self.generation_seen = state.generation;
        let revoked = std::mem::take(&mut state.revoked);
        for (tp, next) in state.commit_now.drain() {
            self.uncommitted.insert(tp, next);
        }
        drop(state);
        if revoked.is_empty() {
            return;
        }
        let before = batch.len();
        batch.retain(|m| !revoked.contains(&(m.topic().to_string(), m.partition())));
        if batch.len() != before {
            tracing::info!(
                dropped = before - batch.len(),
                "dropped unstarted messages of revoked partitions"
            );
        }
        for tp in &revoked {
            self.processed.remove(tp);
            self.uncommitted.remove(tp);
        }
    }

    fn process(
        &mut self,
        processor: &mut BatchProcessor,
        batch: &[OwnedMessage],
    ) -> anyhow::Result<()> {
        let result = processor.process(batch)?;
        self.stats.add_batch(&result.counts);
        for (tp, next) in result.next_offsets {
            self.processed.insert(tp.clone(), next);
            self.uncommitted.insert(tp, next);
        }
        self.commit_pending();
        Ok(())
    }

    /// Commits every durable offset not yet committed; on failure keeps them
    /// for the next try.
    fn commit_pending(&mut self) {
        if self.uncommitted.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in &self.uncommitted {
            if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
                tracing::error!(%topic, partition, error = %e, "cannot build the commit list");
            }
        }
        match self.consumer.commit(&tpl, CommitMode::Sync) {
            Ok(()) => self.uncommitted.clear(),
            Err(e) => {
                self.stats.commit_failed();
                tracing::warn!(error = %e, "offset commit failed; will retry with the next batch");
            }
        }
    }

    /// True when every owned partition has been processed up to its
    /// high watermark (and at least one partition is owned).
    fn caught_up(&self) -> bool {
        let owned: Vec<(TopicPartition, Option<i64>)> = {
            let state = self.assignment.lock().unwrap_or_else(|e| e.into_inner());
            state.owned.iter().map(|(k, v)| (k.clone(), *v)).collect()
        };
        if owned.is_empty() {
            return false;
        }
        for ((topic, partition), start) in owned {
            let Ok((low, high)) =
                self.consumer
                    .fetch_watermarks(&topic, partition, Duration::from_secs(5))
            else {
                return false;
            };
            let next = self
                .processed
                .get(&(topic.clone(), partition))
                .copied()
                .or(start)
                .unwrap_or(low);
            if next < high {
                return false;
            }
        }
        self.uncommitted.is_empty()
    }
}
