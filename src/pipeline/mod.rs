//! The consumer loop: poll, batch, decide, handle, write, commit.
//!
//! Guarantees (DESIGN.md invariants 1, 2 and 5):
//! - An offset is committed to Kafka only after every message below it in
//!   its partition has a final outcome recorded in a synced RocksDB write (and
//!   its dead letter, if any, acknowledged by the broker) — except, by the
//!   operator's choice, for `fail_open` topics while the store fails: their
//!   records are then kept by the in-memory guard ([`guard`]).
//! - Every batch is written before the next `poll` and its offsets are
//!   committed asynchronously; partitions being revoked have their durable
//!   offsets committed synchronously first (see [`rebalance`]), so a
//!   rebalance (served inside `poll`) never finds handled-but-uncommitted work.
//! - A message that could not be finished holds its partition at its offset:
//!   the partition is paused in the consumer, the messages already fetched
//!   for it wait in memory (in order), and it is tried again when its retry
//!   delay has passed. The other partitions keep flowing and the consumer
//!   keeps polling, so the group membership is kept.
//! - A commit that fails is reported by librdkafka and the latest durable
//!   offsets are committed again (never older ones); the store's checkpoint
//!   already holds the position, so a crash before that only costs a re-read
//!   of messages that then resolve as duplicates.
//!
//! Limits: batches are processed one at a time; within a batch a remote
//! handler is called for several partitions at once, but the next batch
//! waits for the slowest call of this one (at most `http.request_timeout_ms`
//! after a lane's time budget).

mod batch;
pub mod decide;
pub mod guard;
pub mod rebalance;
pub mod retry;
mod stats;
mod sync;
pub mod truncation;

pub use batch::{BatchProcessor, BatchResult, Deferral, MessageOutcome};
pub use decide::{Decider, Decision, Prepared, StoredRecords, TopicRule};
pub use guard::Guard;
pub use rebalance::{Assignment, IdemContext, TopicPartition};
pub use retry::RetryPolicy;
pub use stats::{BatchCounts, Counted, RunSummary, Stats};
use truncation::{Log, Verdict};

use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::handler::{AnyHandler, Handler};
use crate::kafka;
use crate::store::{DedupStore, StoreOptions};
use crate::telemetry::metrics as m;
use crate::telemetry::server::Health;
use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::OwnedMessage;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message as _;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
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
/// How often the lag and store gauges are refreshed.
const GAUGE_INTERVAL: Duration = Duration::from_secs(5);

/// How many probe writes in a row may fail before the worker reopens its
/// store: RocksDB keeps the error of a failed write (a full disk, an I/O
/// error, a read-only filesystem) until the database is opened again.
const REOPEN_AFTER_PROBES: u32 = 5;
/// The shortest time between two reopens of a failing store.
const REOPEN_INTERVAL: Duration = Duration::from_secs(1);
/// How often an idle worker with keys in its fail-open guard checks whether
/// the store takes writes again.
const IDLE_RECOVERY_CHECK: Duration = Duration::from_secs(1);
/// How often the comparison of the checkpoints with the log is tried again
/// after an outage when it could not be made.
const VERIFY_RETRY: Duration = Duration::from_secs(1);
/// How long a partition held for the operator waits: until a restart.
const HELD_FOR_OPERATOR: Duration = Duration::from_secs(100 * 365 * 86_400);

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
    handler: AnyHandler,
    stats: Arc<Stats>,
    health: Arc<Health>,
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
        Self::with_handler(config, AnyHandler::Local(handler), clock)
    }

    /// A worker with any handler, in-process or remote.
    pub fn with_handler(
        config: Config,
        handler: AnyHandler,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Self> {
        let stall = Duration::from_millis(config.http.request_timeout_ms);
        Self::with_parts(
            config,
            handler,
            clock,
            Health::new(stall),
            Arc::new(Stats::default()),
        )
    }

    /// A worker reporting to existing health state and counters: for a
    /// caller that starts a new worker after the last one's store failed, so
    /// that `/readyz` and the counters carry over.
    pub fn with_parts(
        config: Config,
        handler: AnyHandler,
        clock: Arc<dyn Clock>,
        health: Arc<Health>,
        stats: Arc<Stats>,
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
        if let AnyHandler::Remote(h) = &handler {
            health.set_handler(h.clone());
        }
        Ok(Self {
            config,
            store: Arc::new(store),
            handler,
            stats,
            health,
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

    /// What `/healthz` and `/readyz` report.
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
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
            health,
        } = self;
        let dropped = store
            .expire(store.processing_time())
            .context("dropping expired buckets at start-up")?;
        if !dropped.is_empty() {
            tracing::info!(count = dropped.len(), "dropped expired buckets at start-up");
        }
        let assignment = Arc::new(Mutex::new(Assignment::default()));
        let log: Arc<dyn Log + Send + Sync> =
            Arc::new(truncation::BrokerLog::new(kafka::base_config(&config)?)?);
        let local_handler = matches!(handler, AnyHandler::Local(_));
        let mut processor = BatchProcessor::new(&config, store.clone(), handler, "")?;
        let mut context = IdemContext::new(store.clone(), assignment.clone(), config.resume_from)
            .with_health(health.clone())
            .with_log_check(log.clone())
            .with_stats(stats.clone());
        if config.changelog.enabled {
            let topics = config
                .topics
                .iter()
                .map(|t| (t.clone(), config.changelog_topic_for(t)))
                .collect();
            let mut restorer =
                crate::changelog::restore::Restorer::new(kafka::base_config(&config)?)?;
            if local_handler {
                restorer = restorer.unfinished_from_start();
            }
            context = context.with_changelog(restorer, topics);
            if let Some(writer) = &processor.changelog {
                let member = format!(
                    "pid {} instance {}",
                    std::process::id(),
                    config
                        .kafka
                        .get("group.instance.id")
                        .and_then(toml::Value::as_str)
                        .unwrap_or("-")
                );
                context = context.with_claims(writer.clone(), member);
            }
        }
        let consumer: BaseConsumer<IdemContext> = kafka::consumer_config(&config)?
            .create_with_context(context)
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
                if !config.http.reply_topic.is_empty() {
                    kafka::ensure_topic(&consumer, &config, &config.http.reply_topic, partitions)?;
                }
            }
        }
        if config.changelog.enabled {
            for topic in &config.topics {
                ensure_changelog(&consumer, &config, topic)?;
            }
        }
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer
            .subscribe(&topics)
            .with_context(|| format!("subscribing to {topics:?}"))?;
        tracing::info!(topics = ?topics, group = %config.group_id, store = %config.store_dir.display(),
            handler = processor.handler.name(), "worker started");

        let syncer = config
            .overlap_wal_sync
            .then(|| sync::Syncer::start(store.clone()));
        // The processor hands its writes over only when a thread takes them.
        processor.overlap_sync = syncer.is_some();
        let mut looper = Loop {
            consumer: &consumer,
            assignment: &assignment,
            stats: &stats,
            health: &health,
            processor,
            processed: HashMap::new(),
            uncommitted: BTreeMap::new(),
            parked: HashMap::new(),
            generation_seen: 0,
            failing: None,
            probe_failures: 0,
            last_reopen: None,
            unverified_while_failing: 0,
            batch_started: Instant::now(),
            log,
            outages_seen: 0,
            verify_pending: false,
            last_verify: None,
            held_for_operator: HashSet::new(),
            syncer,
            written_seq: 0,
            unsynced: VecDeque::new(),
            lease: session_timeout(&config) / 2,
            commit_every: commit_every(&config),
            // As librdkafka's auto-commit: the first commit too waits for
            // the interval, counted from the start.
            last_commit: Instant::now(),
            confirm_sent: None,
            fatal: None,
        };
        m::degraded(false, 0);
        // The store opened: whatever failed before this worker is over.
        health.set_failing(None);
        let linger = Duration::from_millis(config.batch_linger_ms);
        let expiry_interval = MAX_EXPIRY_INTERVAL.min(Duration::from_secs(config.bucket_secs));
        let mut last_expiry = Instant::now();
        let mut last_caught_up_check = Instant::now();
        let mut last_gauges: Option<Instant> = None;
        let mut last_broker_check = Instant::now();
        let mut last_recovery_check = Instant::now();
        let mut first_message_at: Option<Instant> = None;
        let mut members_checked_at = 0;
        while !shutdown.load(Ordering::SeqCst) {
            health.beat();
            looper.drain_synced()?;
            if looper.verify_pending
                && !health.brokers_down()
                && looper
                    .last_verify
                    .is_none_or(|t| t.elapsed() >= VERIFY_RETRY)
            {
                looper.verify_after_outage(&store);
            }
            let mut batch = looper.fill_batch(config.batch_size, linger);
            let restore_failed = assignment
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore_failed
                .take();
            if !config.changelog.enabled && looper.generation_seen != members_checked_at {
                members_checked_at = looper.generation_seen;
                warn_if_shared_without_changelog(&consumer, &config.group_id);
            }
            if let Some(why) = looper.fatal.take() {
                // Messages parked or in hand are not handled; nothing is
                // committed (the group would refuse it).
                drop(batch);
                anyhow::bail!("{why}");
            }
            if let Some(why) = restore_failed {
                // Nothing of this batch is handled or committed: the next
                // owner (or this worker, restarted) reads it again.
                drop(batch);
                looper.commit_final()?;
                consumer.unsubscribe();
                return Err(crate::changelog::restore::RestoreFailed(why).into());
            }
            if looper.verify_pending && !batch.is_empty() {
                // Not handled before the checkpoints were compared with the
                // log: they wait in memory, in order (see
                // `verify_after_outage` for what becomes of them).
                looper.park_until_checked(std::mem::take(&mut batch));
            }
            if batch.is_empty() {
                if looper.failing.is_some()
                    && !looper.processor.guard().is_empty()
                    && last_recovery_check.elapsed() >= IDLE_RECOVERY_CHECK
                {
                    last_recovery_check = Instant::now();
                    looper.recover_idle(&store);
                }
                looper.commit_pending();
                if stop == StopWhen::CaughtUp && last_caught_up_check.elapsed() >= CAUGHT_UP_CHECK {
                    last_caught_up_check = Instant::now();
                    if looper.caught_up() {
                        tracing::info!("caught up with every assigned partition; stopping");
                        break;
                    }
                }
            } else if !looper.membership_fresh() {
                // Not handled until the group confirms this worker still
                // owns its partitions (a stall, such as a SIGSTOP or a long
                // pause, may have cost the membership): they wait, paused.
                looper.confirm_membership(batch);
            } else {
                let began = *first_message_at.get_or_insert_with(Instant::now);
                looper.process_or_hold(batch, &store);
                stats.set_processing_ms(began.elapsed().as_millis() as u64);
            }
            if last_expiry.elapsed() >= expiry_interval {
                last_expiry = Instant::now();
                if let Err(e) = store.expire(store.processing_time()) {
                    tracing::error!(error = %e, "dropping expired buckets failed; will retry");
                }
            }
            if health.broker_trouble() && last_broker_check.elapsed() >= Duration::from_secs(1) {
                last_broker_check = Instant::now();
                if consumer
                    .fetch_metadata(None, Duration::from_secs(1))
                    .is_ok()
                {
                    tracing::info!("the brokers answer again");
                    health.set_broker_trouble(None);
                    looper.commit_pending();
                }
            }
            if last_gauges.is_none_or(|t| t.elapsed() >= GAUGE_INTERVAL) {
                last_gauges = Some(Instant::now());
                looper.refresh_gauges(&store);
            }
        }
        health.set_stopping();
        looper.flush_guard_at_exit();
        looper.commit_final()?;
        consumer.unsubscribe();
        stats.set_clock_clamps(store.clock_clamps());
        let summary = stats.snapshot();
        tracing::info!(?summary, "worker stopped");
        Ok(summary)
    }
}

/// Warns when the group has more than one member while the changelog is
/// off: a partition that moves to another worker then forgets its keys, and
/// their redeliveries reach the handler again.
fn warn_if_shared_without_changelog<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    group: &str,
) {
    let Ok(list) = consumer.fetch_group_list(Some(group), Duration::from_secs(2)) else {
        return;
    };
    let members = list
        .groups()
        .iter()
        .find(|g| g.name() == group)
        .map_or(0, |g| g.members().len());
    if members > 1 {
        tracing::warn!(group, members,
            "more than one worker consumes this group with the changelog off ([changelog] enabled = false): a partition that moves between workers forgets its keys, and their redeliveries reach the handler again; turn the changelog on");
    }
}

/// Checks, or creates when `create_topics` allows, the changelog of
/// `topic`: compacted, with as many partitions as the source (each source
/// partition's records go to the changelog partition of its number), and a
/// retention past the window.
fn ensure_changelog<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    config: &Config,
    topic: &str,
) -> anyhow::Result<()> {
    let changelog = config.changelog_topic_for(topic);
    let partitions = kafka::partition_count(consumer, topic)?;
    let have = if config.create_topics {
        kafka::ensure_topic_with(
            consumer,
            config,
            &changelog,
            partitions,
            &[
                ("cleanup.policy", "compact,delete".to_string()),
                ("retention.ms", config.changelog_retention_ms().to_string()),
            ],
        )?
    } else {
        kafka::partition_count(consumer, &changelog).with_context(|| {
            format!("the changelog topic {changelog} of {topic} must exist when `create_topics = false`")
        })?
    };
    if have < partitions {
        anyhow::bail!(
            "changelog topic {changelog} has {have} partitions but {topic} has {partitions}: each source partition needs the changelog partition of its number (add partitions to the changelog, or choose another `changelog.topic`)"
        );
    }
    Ok(())
}

/// Messages of a partition held back until their retry is due.
struct Parked {
    /// Fetched messages of the partition, in offset order, the first being
    /// the one to retry.
    messages: VecDeque<OwnedMessage>,
    /// When the first one is tried again.
    due: Instant,
    /// True when retries ran out and the policy holds the partition.
    held: bool,
}

/// The state of the consumer loop between batches.
struct Loop<'a> {
    consumer: &'a BaseConsumer<IdemContext>,
    assignment: &'a Mutex<Assignment>,
    stats: &'a Stats,
    health: &'a Health,
    processor: BatchProcessor,
    /// Next offset to process per partition, after durable batches.
    processed: HashMap<TopicPartition, i64>,
    /// Durable offsets not yet committed to Kafka.
    uncommitted: BTreeMap<TopicPartition, i64>,
    /// Partitions waiting for a retry (paused in the consumer).
    parked: HashMap<TopicPartition, Parked>,
    generation_seen: u64,
    /// Set while batches cannot be made durable.
    failing: Option<Failing>,
    /// Probe writes that failed in a row.
    probe_failures: u32,
    /// When the store was last reopened.
    last_reopen: Option<Instant>,
    /// Messages handled without durable dedup since the store failed.
    unverified_while_failing: u64,
    /// When the batch being processed took its first message.
    batch_started: Instant,
    /// Reads single messages, to compare checkpoints with the log.
    log: Arc<dyn Log + Send + Sync>,
    /// The outages (every broker down) the loop has seen.
    outages_seen: u64,
    /// True after an outage until the checkpoints were compared with the
    /// log: nothing fetched meanwhile is handled.
    verify_pending: bool,
    /// When that comparison was last tried.
    last_verify: Option<Instant>,
    /// Partitions held (paused) for the operator: their log was rewritten
    /// below every checkpoint kept.
    held_for_operator: HashSet<TopicPartition>,
    /// Syncs the WAL behind the writes (`overlap_wal_sync`).
    syncer: Option<sync::Syncer>,
    /// Batches written without a sync, numbered from 1.
    written_seq: u64,
    /// Written batches whose sync has not returned yet, oldest first: their
    /// offsets wait here, not committed.
    unsynced: VecDeque<Unsynced>,
    /// How long a confirmation of the group membership is trusted: half the
    /// session timeout.
    lease: Duration,
    /// Least time between two commits of the flowing batches
    /// (`commit_interval_ms`, capped by [`commit_every`]).
    commit_every: Duration,
    /// When the last asynchronous commit was sent (the start, before any).
    last_commit: Instant,
    /// When the last membership confirmation was sent.
    confirm_sent: Option<Instant>,
    /// The consumer failed for good: the worker stops with this error.
    fatal: Option<String>,
}

/// A batch written but not yet synced.
struct Unsynced {
    seq: u64,
    next_offsets: Vec<(TopicPartition, i64)>,
    started: Instant,
    done: u64,
    /// The batch's counts, added once it is durable.
    counts: BatchCounts,
    tally: Tally,
    /// The messages the batch finished, handled again if its write fails.
    messages: Vec<OwnedMessage>,
}

/// Batches cannot be made durable (the store, a dead letter or a reply
/// cannot be written): the worker fails closed.
struct Failing {
    since: Instant,
    failures: u32,
    logged: Instant,
}

/// How often a batch waiting for the membership confirmation is looked at.
const CONFIRM_RETRY: Duration = Duration::from_millis(100);
/// How long a membership confirmation is waited for before it is sent again.
const CONFIRM_RESEND: Duration = Duration::from_secs(1);

/// The consumer's `session.timeout.ms` (librdkafka's default, 45 s, unless
/// `[kafka]` sets it).
fn session_timeout(config: &Config) -> Duration {
    let ms = config
        .kafka
        .get("session.timeout.ms")
        .and_then(|v| match v {
            toml::Value::String(s) => s.parse::<u64>().ok(),
            toml::Value::Integer(i) => u64::try_from(*i).ok(),
            _ => None,
        })
        .unwrap_or(45_000);
    Duration::from_millis(ms)
}

/// The least time between two commits of flowing batches: the configured
/// `commit_interval_ms`, but at most a quarter of the session timeout (half
/// the membership lease), so that the commits' answers keep confirming the
/// membership and a batch never waits for a confirmation of its own while
/// messages flow. A configured interval above that is said at start-up.
fn commit_every(config: &Config) -> Duration {
    let configured = Duration::from_millis(config.commit_interval_ms);
    let session = session_timeout(config);
    let cap = session / 4;
    if configured > cap {
        tracing::warn!(
            commit_interval_ms = config.commit_interval_ms,
            session_timeout_ms = session.as_millis() as u64,
            effective_ms = cap.as_millis() as u64,
            "commit_interval_ms is above a quarter of session.timeout.ms: offsets are committed at that quarter instead (the commits' answers confirm the group membership)"
        );
    }
    configured.min(cap)
}

/// Longest a stopping worker waits for its final commit to be answered.
const FINAL_COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often a failing worker repeats its error log.
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

fn one_partition(tp: &TopicPartition) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(&tp.0, tp.1);
    tpl
}

impl Loop<'_> {
    /// Takes the parked messages whose retry is due, then polls until the
    /// batch is full, or nothing more is fetched now once the linger time
    /// has passed since its first message, or (when empty) one idle poll
    /// came back with nothing. So `batch_linger_ms = 0` never waits, yet a
    /// backlog still goes in full batches.
    fn fill_batch(&mut self, size: usize, linger: Duration) -> Vec<OwnedMessage> {
        let mut batch: Vec<OwnedMessage> = Vec::new();
        let now = Instant::now();
        self.batch_started = now;
        let due: Vec<TopicPartition> = self
            .parked
            .iter()
            .filter(|(_, p)| p.due <= now)
            .map(|(tp, _)| tp.clone())
            .collect();
        for tp in due {
            let Some(p) = self.parked.get_mut(&tp) else {
                continue;
            };
            while batch.len() < size {
                let Some(m) = p.messages.pop_front() else {
                    break;
                };
                batch.push(m);
            }
            if p.messages.is_empty() {
                self.parked.remove(&tp);
                if let Err(e) = self.consumer.resume(&one_partition(&tp)) {
                    tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "cannot resume a partition; will retry");
                }
            }
        }
        let mut deadline: Option<Instant> = (!batch.is_empty()).then(|| Instant::now() + linger);
        while batch.len() < size {
            let timeout = match deadline {
                None => IDLE_POLL,
                Some(d) => d.saturating_duration_since(Instant::now()),
            };
            let polled = self.consumer.poll(timeout);
            self.drop_revoked(&mut batch);
            if self.outage_noticed() {
                // What this poll returned may come from the brokers as they
                // are after the outage: it is read again after the check.
                break;
            }
            match polled {
                None => break,
                Some(Err(rdkafka::error::KafkaError::MessageConsumptionFatal(code))) => {
                    // The consumer cannot go on (such as a static member
                    // fenced by its replacement): nothing more is handled.
                    self.fatal = Some(format!(
                        "the Kafka consumer failed for good ({code}): another member with the same `group.instance.id` took this worker's place, or the group refused it; the worker stops"
                    ));
                    batch.clear();
                    break;
                }
                Some(Err(e)) => {
                    use rdkafka::types::RDKafkaErrorCode as Code;
                    // Broker connections lost are reported (once, and on
                    // /readyz) by the client context; librdkafka repeats
                    // them on every poll meanwhile.
                    if matches!(
                        e.rdkafka_error_code(),
                        Some(Code::AllBrokersDown | Code::BrokerTransportFailure)
                    ) {
                        tracing::debug!(error = %e, "consumer error");
                    } else {
                        tracing::warn!(error = %e, "consumer error");
                    }
                    if batch.is_empty() {
                        break;
                    }
                }
                Some(Ok(m)) => {
                    let m = m.detach();
                    // A message of a paused partition fetched before the
                    // pause took effect: it goes behind the waiting ones.
                    if !self.parked.is_empty() {
                        let tp = (m.topic().to_string(), m.partition());
                        if let Some(p) = self.parked.get_mut(&tp) {
                            if p.messages
                                .back()
                                .is_none_or(|last| last.offset() < m.offset())
                            {
                                p.messages.push_back(m);
                            }
                            continue;
                        }
                    }
                    if batch.is_empty() {
                        self.batch_started = Instant::now();
                    }
                    batch.push(m);
                    deadline.get_or_insert_with(|| Instant::now() + linger);
                }
            }
            // Past the linger time the batch still takes what is already
            // fetched (polls then do not wait): the first empty poll ends it.
        }
        batch
    }

    /// True when the last poll reported every broker down (again): from then
    /// on nothing is handled until [`Loop::verify_after_outage`] has compared
    /// the checkpoints with the log.
    fn outage_noticed(&mut self) -> bool {
        let outages = self
            .assignment
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .outages;
        if outages == self.outages_seen {
            return false;
        }
        self.outages_seen = outages;
        self.verify_pending = true;
        true
    }

    /// True when the group confirmed this worker's membership (a commit
    /// answered without error, or an assignment) within the lease: half the
    /// session timeout. Past it, another worker may own the partitions.
    fn membership_fresh(&self) -> bool {
        let confirmed = self
            .assignment
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .confirmed_at;
        confirmed.is_some_and(|t| t.elapsed() < self.lease)
    }

    /// Parks a batch until the membership is confirmed, and asks for the
    /// confirmation: a commit of the offsets already committed or durable,
    /// which the group refuses from a member it no longer has (then the
    /// assignment is lost and the parked messages are dropped unhandled).
    fn confirm_membership(&mut self, batch: Vec<OwnedMessage>) {
        self.park_whole(batch, CONFIRM_RETRY);
        if self
            .confirm_sent
            .is_some_and(|t| t.elapsed() < CONFIRM_RESEND)
        {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), start) in self.owned() {
            let next = self
                .processed
                .get(&(topic.clone(), partition))
                .copied()
                .or(start);
            if let Some(next) = next {
                let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(next));
            }
        }
        if tpl.count() == 0 {
            // Nothing to commit yet: nothing was handled since the assignment.
            self.assignment
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .confirmed_at = Some(Instant::now());
            return;
        }
        let confirmed = self
            .assignment
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .confirmed_at;
        if confirmed.is_none_or(|t| t.elapsed() > 2 * self.lease) {
            tracing::info!(lease_ms = self.lease.as_millis() as u64,
                "the group has not confirmed this worker's membership within the session timeout (a stall, or the brokers unreachable?): confirming before anything more is handled");
        } else {
            tracing::debug!("confirming the group membership before the next batch");
        }
        self.confirm_sent = Some(Instant::now());
        match kafka::commit_async(self.consumer, &tpl) {
            Ok(()) => self
                .assignment
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .commit_sent(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot send the membership confirmation; will retry")
            }
        }
    }

    /// Keeps a batch fetched while the checkpoints wait to be compared with
    /// the log: each partition's messages wait (paused) in front of any
    /// already waiting, and are looked at again after a second.
    fn park_until_checked(&mut self, batch: Vec<OwnedMessage>) {
        self.park_whole(batch, VERIFY_RETRY);
    }

    /// Holds a partition whose log was rewritten below every checkpoint
    /// kept: paused, its fetched messages dropped, until an operator chooses
    /// where it resumes (and restarts the worker).
    fn hold_for_operator(&mut self, tp: TopicPartition, why: String) {
        if let Err(e) = self.consumer.pause(&one_partition(&tp)) {
            tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "cannot pause a partition held for the operator; its messages are dropped as they arrive");
        }
        self.uncommitted.remove(&tp);
        self.forget_unsynced(&tp);
        self.health
            .set_rewritten(format!("{}/{}", tp.0, tp.1), Some(why));
        self.held_for_operator.insert(tp.clone());
        self.parked.insert(
            tp,
            Parked {
                messages: VecDeque::new(),
                due: Instant::now() + HELD_FOR_OPERATOR,
                held: false,
            },
        );
        m::degraded(true, self.parked.len());
    }

    /// After an outage: compares each owned partition's store checkpoint
    /// with the log, moves a rewritten one back to its newest matching
    /// checkpoint (or holds it), and seeks every partition not waiting for a
    /// retry back to its next offset, so that what was fetched during the
    /// check, or by an offset reset after the outage, is read again from
    /// there. When the log cannot be read, the check is tried again later.
    fn verify_after_outage(&mut self, store: &DedupStore) {
        self.last_verify = Some(Instant::now());
        let owned = self.owned();
        let mut seeks = Vec::new();
        for ((topic, partition), start) in owned {
            let tp = (topic.clone(), partition);
            if self.held_for_operator.contains(&tp) {
                continue;
            }
            let cp = match store.checkpoint_detail(&topic, partition) {
                Ok(cp) => cp,
                Err(e) => {
                    tracing::warn!(%topic, partition, error = %e, "cannot read the store checkpoint to compare it with the log; will retry");
                    return;
                }
            };
            let next = self.processed.get(&tp).copied().or(start);
            let verdict = match &cp {
                Some(cp) => match truncation::verify(self.log.as_ref(), &topic, partition, cp) {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(%topic, partition, error = %format!("{e:#}"),
                            "cannot compare the store checkpoint with the log after the outage; will retry");
                        return;
                    }
                },
                None => Verdict::Unverifiable("no checkpoint"),
            };
            tracing::info!(%topic, partition, ?verdict, "checkpoint compared with the log after the outage");
            match verdict {
                Verdict::Intact | Verdict::Unverifiable(_) => {
                    let Some(next) = next.or(cp.as_ref().map(|c| c.next_offset)) else {
                        continue;
                    };
                    // Messages waiting in memory that do not start at the
                    // next offset (an offset reset after the outage) are
                    // dropped and read again from it.
                    let waiting_elsewhere = self
                        .parked
                        .get(&tp)
                        .is_some_and(|p| p.messages.front().is_some_and(|m| m.offset() != next));
                    if waiting_elsewhere {
                        self.parked.remove(&tp);
                        if let Err(e) = self.consumer.resume(&one_partition(&tp)) {
                            tracing::warn!(%topic, partition, error = %e, "cannot resume a partition; will retry");
                        }
                    }
                    if !self.parked.contains_key(&tp) {
                        seeks.push((tp, next));
                    }
                }
                Verdict::Rewritten { checkpoint, resume } => {
                    let to = resume.next_offset;
                    tracing::error!(%topic, partition, checkpoint, resume_at = to,
                        "after the outage the brokers hold a rewritten log below the store checkpoint (acknowledged messages lost and their offsets reused): resuming at the newest earlier checkpoint that still matches the log; offsets {to}..{checkpoint} are read again (keys already recorded resolve as duplicates)");
                    if let Err(e) = store.rewind_checkpoint(&topic, partition, &resume) {
                        tracing::error!(%topic, partition, error = %e, "cannot move the store checkpoint back; the next durable batch does");
                    }
                    m::log_rewritten(&topic, partition, "resumed");
                    self.stats.log_rewritten(false);
                    self.processor
                        .forget_partitions(&std::iter::once(tp.clone()).collect());
                    if self.parked.remove(&tp).is_some() {
                        if let Err(e) = self.consumer.resume(&one_partition(&tp)) {
                            tracing::warn!(%topic, partition, error = %e, "cannot resume a rewound partition; will retry");
                        }
                    }
                    self.forget_unsynced(&tp);
                    self.processed.insert(tp.clone(), to);
                    self.uncommitted.insert(tp.clone(), to);
                    {
                        let mut state = self.assignment.lock().unwrap_or_else(|e| e.into_inner());
                        state.durable.insert(tp.clone(), to);
                        state.written.insert(tp.clone(), to);
                    }
                    seeks.push((tp, to));
                }
                Verdict::Unresolved {
                    checkpoint,
                    oldest_mark,
                } => {
                    let why = format!(
                        "after an outage the log of {topic}/{partition} was found rewritten below the store checkpoint {checkpoint} and below every earlier checkpoint kept (the oldest at {}): no offset is known to be safe to resume at",
                        oldest_mark.map_or("none".to_string(), |o| o.to_string())
                    );
                    tracing::error!(%topic, partition, checkpoint, reason = %why,
                        "holding the partition: choose where it resumes by setting the group's committed offset and starting once with resume_from = \"group\"");
                    m::log_rewritten(&topic, partition, "held");
                    self.stats.log_rewritten(true);
                    self.hold_for_operator(tp, why);
                }
            }
        }
        for ((topic, partition), next) in seeks {
            if let Err(e) = self.consumer.seek(
                &topic,
                partition,
                Offset::Offset(next),
                Duration::from_secs(5),
            ) {
                tracing::warn!(%topic, partition, offset = next, error = %e,
                    "cannot seek back to the checkpoint after the outage; will retry");
                return;
            }
        }
        tracing::info!("checkpoints compared with the log after the outage; consuming again");
        self.verify_pending = false;
    }

    /// Drops fetched-but-unstarted messages of partitions revoked during the
    /// last poll, parked ones included: the new owner will handle them.
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
        if !state.tokens.is_empty() || !self.processor.tokens.is_empty() {
            self.processor.tokens = state.tokens.clone();
        }
        let held: Vec<(TopicPartition, String)> = state.held.drain().collect();
        let owned: Vec<TopicPartition> = state.owned.keys().cloned().collect();
        drop(state);
        for (tp, why) in held {
            self.hold_for_operator(tp, why);
        }
        self.health.set_assigned(!owned.is_empty());
        // librdkafka keeps a partition paused across a re-assignment: every
        // owned partition that is not waiting for a retry is resumed.
        let mut resume = TopicPartitionList::new();
        for tp in owned.iter().filter(|tp| !self.parked.contains_key(*tp)) {
            resume.add_partition(&tp.0, tp.1);
        }
        if resume.count() > 0 {
            if let Err(e) = self.consumer.resume(&resume) {
                tracing::debug!(error = %e, "resuming the assigned partitions");
            }
        }
        if revoked.is_empty() {
            return;
        }
        let before = batch.len();
        batch.retain(|m| !revoked.contains(&(m.topic().to_string(), m.partition())));
        let parked_before: usize = self.parked.values().map(|p| p.messages.len()).sum();
        self.parked.retain(|tp, _| !revoked.contains(tp));
        let parked_after: usize = self.parked.values().map(|p| p.messages.len()).sum();
        let dropped = before - batch.len() + parked_before - parked_after;
        if dropped > 0 {
            tracing::info!(dropped, "dropped unstarted messages of revoked partitions");
        }
        self.processor.forget_partitions(&revoked);
        for tp in &revoked {
            self.processed.remove(tp);
            self.uncommitted.remove(tp);
            self.forget_unsynced(tp);
            if self.held_for_operator.remove(tp) {
                self.health
                    .set_rewritten(format!("{}/{}", tp.0, tp.1), None);
            }
        }
    }

    /// Processes a batch; when it cannot be made durable, holds it back
    /// instead (fail closed): every partition of the batch waits at its
    /// first message, nothing is committed, `/readyz` says why, the error is
    /// logged once a minute, and the batch is tried again with backoff. While
    /// failing, a batch is tried only after the store takes a probe write, so
    /// a broken store costs no handler call; after
    /// [`REOPEN_AFTER_PROBES`] failed probes the store is reopened in place.
    /// Messages of `fail_open` topics go on meanwhile, remembered by the
    /// guard, and the guard is written into the store once a probe passes.
    fn process_or_hold(&mut self, batch: Vec<OwnedMessage>, store: &DedupStore) {
        if self.failing.is_some() {
            if let Err(e) = store.probe() {
                self.probe_failed(store);
                let (open, closed): (Vec<_>, Vec<_>) = batch
                    .into_iter()
                    .partition(|m| self.processor.fail_open.contains(m.topic()));
                if !closed.is_empty() {
                    self.hold(
                        anyhow::Error::new(e).context("the dedup store still cannot be written"),
                        closed,
                    );
                }
                if !open.is_empty() {
                    self.run_batch(open);
                }
                return;
            }
            self.probe_failures = 0;
            if let Err(e) = self.flush_guard() {
                self.hold(
                    anyhow::Error::new(e).context("writing the fail-open guard into the store"),
                    batch,
                );
                return;
            }
        }
        self.run_batch(batch);
    }

    /// Processes a batch and counts and commits its outcomes; a batch that
    /// could not be made durable is held (fail closed).
    fn run_batch(&mut self, batch: Vec<OwnedMessage>) {
        let result = match self.processor.process(&batch) {
            Ok(r) => r,
            Err(e) => {
                self.hold(e, batch);
                return;
            }
        };
        if result.unverified {
            self.failing_open(&result);
        } else {
            self.recovered();
        }
        self.after(batch, result);
    }

    /// Counts a failed probe write; after [`REOPEN_AFTER_PROBES`] of them
    /// in a row the store is reopened, at most once per [`REOPEN_INTERVAL`].
    fn probe_failed(&mut self, store: &DedupStore) {
        self.probe_failures += 1;
        if self.probe_failures < REOPEN_AFTER_PROBES
            || self
                .last_reopen
                .is_some_and(|t| t.elapsed() < REOPEN_INTERVAL)
        {
            return;
        }
        self.last_reopen = Some(Instant::now());
        match store.reopen() {
            Ok(()) => tracing::info!(
                probes = self.probe_failures,
                "reopened the dedup store after failed writes"
            ),
            Err(e) => tracing::debug!(error = %e, "reopening the dedup store failed; will retry"),
        }
    }

    /// Batches are durable again: ends the failing state, if any.
    fn recovered(&mut self) {
        if let Some(f) = self.failing.take() {
            tracing::warn!(
                failures = f.failures,
                down_ms = f.since.elapsed().as_millis() as u64,
                unverified = self.unverified_while_failing,
                "batches are durable again: resuming"
            );
            self.unverified_while_failing = 0;
            self.probe_failures = 0;
            self.health.set_failing(None);
        }
    }

    /// A batch of fail-open topics went on without the store: loud, counted
    /// and reported, never silent.
    fn failing_open(&mut self, result: &BatchResult) {
        let now = Instant::now();
        let f = self.failing.get_or_insert(Failing {
            since: now,
            failures: 0,
            logged: now - FAILURE_LOG_INTERVAL,
        });
        self.unverified_while_failing += result.counts.unverified;
        let guard = self.processor.guard().len();
        let text = format!(
            "the dedup store cannot be written: fail_open topics are handled without durable dedup ({} unverified so far, {guard} keys in the in-memory guard)",
            self.unverified_while_failing
        );
        if f.logged.elapsed() >= FAILURE_LOG_INTERVAL {
            f.logged = now;
            tracing::error!(unverified = self.unverified_while_failing, guard_keys = guard,
                evicted = result.counts.guard_evictions,
                "FAIL OPEN: the dedup store cannot be written; handling fail_open topics with only the in-memory guard against duplicates (logged once a minute)");
        }
        if result.counts.guard_evictions > 0 {
            tracing::warn!(
                evicted = result.counts.guard_evictions,
                "the fail-open guard is full: its oldest keys are forgotten, and a redelivery of one reaches the handler again"
            );
        }
        self.health.set_failing(Some(text));
    }

    /// Writes the fail-open guard into the store (it takes writes again).
    fn flush_guard(&mut self) -> Result<(), crate::store::StoreError> {
        let n = self.processor.flush_guard()?;
        if n > 0 {
            self.stats.guard_flushed(n);
        }
        Ok(())
    }

    /// With no message to try, checks whether a failing store takes writes
    /// again, so that the guard reaches the store without waiting for traffic.
    fn recover_idle(&mut self, store: &DedupStore) {
        if store.probe().is_err() {
            self.probe_failed(store);
            return;
        }
        if self.flush_guard().is_ok() {
            self.recovered();
            m::degraded(false, self.parked.len());
        }
    }

    /// At shutdown: the guard's keys are written into the store if it takes
    /// them; otherwise the loss is logged with its size.
    fn flush_guard_at_exit(&mut self) {
        if self.processor.guard().is_empty() {
            return;
        }
        let keys = self.processor.guard().len();
        if let Err(e) = self.flush_guard() {
            tracing::error!(error = %e, keys,
                "stopping with keys handled while the store was down (fail open) that never reached it: a redelivery of one reaches the handler again");
        }
    }

    fn hold(&mut self, e: anyhow::Error, batch: Vec<OwnedMessage>) {
        let now = Instant::now();
        let f = self.failing.get_or_insert(Failing {
            since: now,
            failures: 0,
            logged: now - FAILURE_LOG_INTERVAL,
        });
        f.failures += 1;
        let delay = self
            .processor
            .retry
            .delay(f.failures, None)
            .max(Duration::from_millis(50));
        let text = format!("{e:#}");
        if f.logged.elapsed() >= FAILURE_LOG_INTERVAL {
            f.logged = now;
            tracing::error!(error = %text, failures = f.failures, retry_in_ms = delay.as_millis() as u64,
                "a batch could not be made durable: its partitions wait, nothing is committed, retrying (fail closed; logged once a minute)");
        } else {
            tracing::debug!(error = %text, failures = f.failures, "batch still not durable");
        }
        self.health.set_failing(Some(text));
        self.stats.batch_failed();
        m::batch_failed();
        self.park_whole(batch, delay);
        m::degraded(true, self.parked.len());
    }

    fn after(&mut self, batch: Vec<OwnedMessage>, mut result: BatchResult) {
        let done = result.outcomes.iter().filter(|o| o.is_some()).count() as u64;
        let tally = Tally::of(&batch, &result);
        let behind = result.write_behind.take();
        let mut batch = batch;
        match (&self.syncer, behind) {
            (Some(syncer), Some(writes)) => {
                // Offsets and counts wait for the write (see
                // `drain_synced`); the next batch starts after this one at
                // once.
                self.written_seq += 1;
                syncer.write(self.written_seq, writes);
                let mut state = self.assignment.lock().unwrap_or_else(|e| e.into_inner());
                for (tp, next) in &result.next_offsets {
                    self.processed.insert(tp.clone(), *next);
                    if state.owned.contains_key(tp) {
                        state.written.insert(tp.clone(), *next);
                    }
                }
                drop(state);
                self.unsynced.push_back(Unsynced {
                    seq: self.written_seq,
                    next_offsets: result
                        .next_offsets
                        .iter()
                        .map(|(tp, n)| (tp.clone(), *n))
                        .collect(),
                    started: self.batch_started,
                    done,
                    counts: std::mem::take(&mut result.counts),
                    tally,
                    messages: finished_part(&mut batch, &result.deferred),
                });
            }
            _ => {
                tally.count(self.stats, &result.counts);
                if done > 0 {
                    self.stats
                        .record_latency(self.batch_started.elapsed().as_micros() as u64, done);
                }
                let mut state = self.assignment.lock().unwrap_or_else(|e| e.into_inner());
                for (tp, next) in &result.next_offsets {
                    self.processed.insert(tp.clone(), *next);
                    self.uncommitted.insert(tp.clone(), *next);
                    if state.owned.contains_key(tp) {
                        state.durable.insert(tp.clone(), *next);
                        state.written.insert(tp.clone(), *next);
                    }
                }
            }
        }
        self.commit_pending();
        if !result.deferred.is_empty() {
            self.park(batch, &result.deferred);
        }
        let held = self.parked.values().filter(|p| p.held).count();
        self.health.set_held_partitions(held);
        m::degraded(held > 0 || self.failing.is_some(), self.parked.len());
    }

    /// Holds back a whole batch: each partition waits at its first message
    /// of the batch for `delay`.
    fn park_whole(&mut self, batch: Vec<OwnedMessage>, delay: Duration) {
        let mut deferred = BTreeMap::new();
        for m in &batch {
            deferred
                .entry((m.topic().to_string(), m.partition()))
                .or_insert(Deferral {
                    offset: m.offset(),
                    delay,
                    held: false,
                });
        }
        self.park(batch, &deferred);
    }

    /// Holds back the messages of deferred partitions from their deferred
    /// offset on, in front of any still parked, and pauses those partitions.
    fn park(&mut self, batch: Vec<OwnedMessage>, deferred: &BTreeMap<TopicPartition, Deferral>) {
        let mut held_back: HashMap<TopicPartition, VecDeque<OwnedMessage>> = HashMap::new();
        for m in batch {
            let tp = (m.topic().to_string(), m.partition());
            if deferred.get(&tp).is_some_and(|d| m.offset() >= d.offset) {
                held_back.entry(tp).or_default().push_back(m);
            }
        }
        for (tp, d) in deferred {
            let mut messages = held_back.remove(tp).unwrap_or_default();
            let due = Instant::now() + d.delay;
            match self.parked.get_mut(tp) {
                Some(p) => {
                    messages.append(&mut p.messages);
                    p.messages = messages;
                    p.due = due;
                    p.held = d.held;
                }
                None => {
                    if let Err(e) = self.consumer.pause(&one_partition(tp)) {
                        tracing::warn!(topic = %tp.0, partition = tp.1, error = %e,
                            "cannot pause a partition waiting for a retry; its new messages wait in memory");
                    }
                    self.parked.insert(
                        tp.clone(),
                        Parked {
                            messages,
                            due,
                            held: d.held,
                        },
                    );
                }
            }
        }
    }

    /// Commits every durable offset not yet committed, asynchronously; an
    /// immediate failure keeps them for the next try, a failure reported
    /// later commits the latest durable offsets again.
    /// With `commit_interval_ms` set, offsets wait until that long after
    /// the last commit (the idle loop commits them once it has passed).
    fn commit_pending(&mut self) {
        if self.last_commit.elapsed() < self.commit_every {
            return;
        }
        self.commit();
    }

    /// At shutdown: commits the latest durable offset of every owned
    /// partition and waits for the answer.
    fn commit_final(&mut self) -> anyhow::Result<()> {
        if let Some(syncer) = &self.syncer {
            if let Some(newest) = self.unsynced.back().map(|u| u.seq) {
                if !syncer.wait_for(newest) {
                    return Err(self.sync_failed());
                }
            }
            self.drain_synced()?;
        }
        for (tp, _) in self.owned() {
            if let Some(next) = self.processed.get(&tp) {
                self.uncommitted.insert(tp, *next);
            }
        }
        // Asynchronously, serving the consumer until the brokers answered:
        // a synchronous commit made while the group rebalances waits for a
        // rebalance callback that only a poll can run, and would hang.
        // Commits sent are counted by the stats, answers by the context.
        let (sent, answered) = (self.stats.commits(), self.commits_answered());
        self.commit();
        if self.stats.commits() == sent {
            return Ok(());
        }
        let until = Instant::now() + FINAL_COMMIT_TIMEOUT;
        while self.commits_answered() == answered && Instant::now() < until {
            // A message fetched now is not handled: the worker is stopping,
            // and it is read again by the partition's next owner.
            let _ = self.consumer.poll(Duration::from_millis(100));
        }
        if self.commits_answered() == answered {
            tracing::warn!(timeout_secs = FINAL_COMMIT_TIMEOUT.as_secs(), sent = self.stats.commits(), answered = self.commits_answered(),
                "the final offset commit was not answered in time; the next owner re-reads from the last commit (duplicates where the keys are known)");
        }
        Ok(())
    }

    fn commits_answered(&self) -> u64 {
        self.assignment
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .commits_answered
    }

    /// Moves the offsets of batches whose sync returned to the commit list
    /// (owned partitions only) and commits them. A failed sync ends the
    /// worker: the batches written since the last good sync may be lost by
    /// a machine crash, so their offsets are never committed, and a new
    /// worker starts from what the store holds.
    fn drain_synced(&mut self) -> anyhow::Result<()> {
        let Some(syncer) = &self.syncer else {
            return Ok(());
        };
        if self.unsynced.is_empty() {
            return Ok(());
        }
        let Some(synced) = syncer.synced() else {
            self.write_behind_failed();
            return Ok(());
        };
        let mut moved = false;
        while self.unsynced.front().is_some_and(|u| u.seq <= synced) {
            let Some(u) = self.unsynced.pop_front() else {
                break;
            };
            if u.done > 0 {
                self.stats
                    .record_latency(u.started.elapsed().as_micros() as u64, u.done);
            }
            u.tally.count(self.stats, &u.counts);
            let mut state = self.assignment.lock().unwrap_or_else(|e| e.into_inner());
            for (tp, next) in u.next_offsets {
                if state.owned.contains_key(&tp) {
                    state.durable.insert(tp.clone(), next);
                    self.uncommitted.insert(tp, next);
                    moved = true;
                }
            }
        }
        if moved {
            self.commit_pending();
        }
        Ok(())
    }

    /// A write behind failed, and with it every batch waiting (none of them
    /// is in the store): their offsets are rolled back to the durable ones
    /// and their messages held and handled again, as a batch whose write
    /// failed in the loop is.
    fn write_behind_failed(&mut self) {
        let Some(syncer) = &self.syncer else {
            return;
        };
        let e = syncer
            .resume()
            .unwrap_or(crate::store::StoreError::NotWrittenBehind);
        let batches: Vec<Unsynced> = self.unsynced.drain(..).collect();
        let mut messages: Vec<OwnedMessage> = Vec::new();
        let mut first: HashMap<TopicPartition, i64> = HashMap::new();
        for u in batches {
            for m in &u.messages {
                first
                    .entry((m.topic().to_string(), m.partition()))
                    .or_insert(m.offset());
            }
            messages.extend(u.messages);
        }
        {
            let mut state = self.assignment.lock().unwrap_or_else(|e| e.into_inner());
            for (tp, offset) in &first {
                self.processed.insert(tp.clone(), *offset);
                match state.durable.get(tp).copied() {
                    Some(d) => state.written.insert(tp.clone(), d),
                    None => state.written.remove(tp),
                };
            }
        }
        let n = messages.len();
        let e = anyhow::Error::new(e).context(format!(
            "writing batches behind failed ({n} messages, none of them written): they are handled again"
        ));
        self.hold(e, messages);
    }

    fn sync_failed(&self) -> anyhow::Error {
        let e = self
            .syncer
            .as_ref()
            .and_then(|s| s.take_error())
            .map(anyhow::Error::new)
            .unwrap_or_else(|| anyhow::anyhow!("an earlier sync failed"));
        e.context("syncing the dedup store's write-ahead log failed: the worker stops without committing the offsets of the batches not synced")
    }

    /// Forgets the not-yet-synced offsets of a partition (moved back or
    /// given up), so that they are never committed for it.
    fn forget_unsynced(&mut self, tp: &TopicPartition) {
        for u in &mut self.unsynced {
            u.next_offsets.retain(|(t, _)| t != tp);
            // Nor handled again here if the write fails: its next owner
            // reads them.
            u.messages
                .retain(|m| m.partition() != tp.1 || m.topic() != tp.0);
        }
    }

    /// Sends the commit of every durable offset not yet committed,
    /// asynchronously; the answer reaches the consumer context's callback.
    fn commit(&mut self) {
        let failed = self
            .assignment
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .commit_failed
            .take();
        if failed.is_some() {
            self.stats.commit_failed();
            m::commit_failed();
            let state = self.assignment.lock().unwrap_or_else(|e| e.into_inner());
            for (tp, next) in &state.durable {
                self.uncommitted.insert(tp.clone(), *next);
            }
        }
        // With every broker down the offsets wait (they are durable in the
        // store) until the brokers answer a metadata request again, so that
        // commits do not pile up in librdkafka meanwhile.
        if self.uncommitted.is_empty() || self.health.brokers_down() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in &self.uncommitted {
            if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
                tracing::error!(%topic, partition, error = %e, "cannot build the commit list");
            }
        }
        match kafka::commit_async(self.consumer, &tpl) {
            Ok(()) => {
                self.stats.commit_sent();
                self.last_commit = Instant::now();
                self.assignment
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .commit_sent();
                self.uncommitted.clear();
            }
            Err(e) => {
                self.stats.commit_failed();
                m::commit_failed();
                self.health
                    .set_broker_trouble(Some(format!("offset commits fail: {e}")));
                tracing::warn!(error = %e, "offset commit failed; will retry with the next batch");
            }
        }
    }

    /// The owned partitions with the offsets they started at.
    fn owned(&self) -> Vec<(TopicPartition, Option<i64>)> {
        let state = self.assignment.lock().unwrap_or_else(|e| e.into_inner());
        state.owned.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// The next offset to process of a partition: what was processed, else
    /// where it started, else its low watermark.
    fn next_offset(&self, topic: &str, partition: i32, start: Option<i64>, low: i64) -> i64 {
        self.processed
            .get(&(topic.to_string(), partition))
            .copied()
            .or(start)
            .unwrap_or(low)
    }

    /// Refreshes the lag and store gauges.
    fn refresh_gauges(&self, store: &DedupStore) {
        let owned = self.owned();
        for ((topic, partition), start) in owned {
            if let Some((low, high)) = kafka::cached_watermarks(self.consumer, &topic, partition) {
                let next = self.next_offset(&topic, partition, start, low);
                m::lag(&topic, partition, (high - next).max(0));
            }
        }
        match store.stats() {
            Ok(s) => m::store(s.buckets.len(), s.estimated_keys, s.disk_bytes),
            Err(e) => tracing::debug!(error = %e, "reading the store gauges"),
        }
    }

    /// True when every owned partition has been processed up to its
    /// high watermark (and at least one partition is owned) and every batch
    /// is durable. Offsets still waiting for `commit_interval_ms` do not
    /// count: the stop's final commit takes them.
    fn caught_up(&self) -> bool {
        let owned = self.owned();
        if owned.is_empty() || !self.parked.is_empty() {
            return false;
        }
        for ((topic, partition), start) in owned {
            let Ok((low, high)) =
                self.consumer
                    .fetch_watermarks(&topic, partition, Duration::from_secs(5))
            else {
                return false;
            };
            let next = self.next_offset(&topic, partition, start, low);
            if next < high {
                return false;
            }
        }
        self.unsynced.is_empty()
    }
}

/// Adds a durable batch's outcomes to the Prometheus counters, by topic.
/// Takes out of `batch` the messages its write covers: all of them, but
/// those of a deferred partition from its deferred offset on (they wait in
/// `batch` to be parked).
fn finished_part(
    batch: &mut Vec<OwnedMessage>,
    deferred: &BTreeMap<TopicPartition, crate::pipeline::Deferral>,
) -> Vec<OwnedMessage> {
    if deferred.is_empty() {
        return std::mem::take(batch);
    }
    let (waiting, finished): (Vec<_>, Vec<_>) = std::mem::take(batch).into_iter().partition(|m| {
        deferred
            .get(&(m.topic().to_string(), m.partition()))
            .is_some_and(|d| m.offset() >= d.offset)
    });
    *batch = waiting;
    finished
}

/// A batch's outcomes by topic, for the metrics, kept with the batch until
/// it is durable.
struct Tally {
    by: Vec<(String, &'static str, u64)>,
    unverified: bool,
}

impl Tally {
    fn of(batch: &[OwnedMessage], result: &BatchResult) -> Self {
        let mut by: BTreeMap<(&str, &'static str), u64> = BTreeMap::new();
        for (msg, outcome) in batch.iter().zip(&result.outcomes) {
            if let Some(o) = outcome {
                *by.entry((msg.topic(), o.counted.label())).or_default() += 1;
            }
        }
        Self {
            by: by
                .into_iter()
                .map(|((topic, label), n)| (topic.to_string(), label, n))
                .collect(),
            unverified: result.unverified,
        }
    }

    /// Adds the batch to the worker's counts and the metrics.
    fn count(&self, stats: &Stats, counts: &BatchCounts) {
        stats.add_batch(counts);
        if counts.cross_partition > 0 {
            m::cross_partition(counts.cross_partition);
        }
        for (topic, label, n) in &self.by {
            m::messages(topic, label, *n);
            if self.unverified && matches!(*label, "handled" | "rejected") {
                m::unverified(topic, *n);
            }
        }
    }
}
