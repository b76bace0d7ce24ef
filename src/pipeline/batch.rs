//! One batch: decide every message's outcome, call the handler for the new
//! ones, then make the outcomes durable in order — dead letters and replies
//! acknowledged, then one RocksDB write with the WAL synced — and only then
//! report the offsets that may be committed.
//!
//! Guarantees:
//! - [`BatchProcessor::process`] either returns the next offset of every
//!   partition in the batch with every outcome durable, or returns an error
//!   having written nothing to the store (dead letters and replies may have
//!   been written; they are at-least-once).
//! - A key seen twice within one batch, on one partition or two, reaches the
//!   handler once; a copy of a key whose first copy is waiting for a retry
//!   waits behind it (never reaches the handler concurrently with it).
//! - A message the handler could not finish ([`Verdict::Retry`], an error or
//!   a panic) defers its partition at its offset: nothing at or after it in
//!   that partition gets an outcome, the partition's next offset is that
//!   offset, and the caller is told when to try again. The other partitions
//!   of the batch are unaffected.

use crate::changelog::ChangelogWriter;
use crate::config::{BucketClock, Config, OnStoreFailure, OnStoreFull};
use crate::dlq::{DeadLetter, DeadLetterKind, DeadLetters};
use crate::handler::{Answer, AnyHandler, Delivery, RemoteHandler, Verdict};
use crate::key::{Fingerprint, ScopedKeyHash};
use crate::pipeline::decide::{Decider, Decision, Fresh, Prepared};
use crate::pipeline::guard::Guard;
use crate::pipeline::rebalance::TopicPartition;
use crate::pipeline::retry::{NextStep, RetryPolicy};
use crate::pipeline::stats::{BatchCounts, Counted};
use crate::proto::{DedupRecord, RecordOutcome, StoredResponse};
use crate::reply::Reply;
use crate::store::{DedupStore, FastMap, StoreBatch, StoreError};
use crate::telemetry::metrics as m;
use anyhow::Context as _;
use rdkafka::message::{Message as _, OwnedMessage};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How soon a message waiting behind another copy of its key is looked at
/// again.
const LEASE_WAIT: Duration = Duration::from_millis(50);
/// How long a remote handler's lane keeps starting calls within one batch;
/// the rest of its messages wait for the next batch, so that the loop
/// writes, commits and polls at least this often (plus one request timeout).
const LANE_BUDGET: Duration = Duration::from_secs(2);

/// Decides outcomes and writes batches for one worker.
pub struct BatchProcessor {
    /// The worker's store.
    pub store: Arc<DedupStore>,
    /// The handler of new messages.
    pub handler: AnyHandler,
    /// Dead-letter (and reply) producer.
    pub dead_letters: DeadLetters,
    /// How keys are derived, scoped and decoded.
    pub decider: Decider,
    /// Dead-letter topic per source topic.
    pub dlq_topic: Box<dyn Fn(&str) -> String + Send>,
    /// Prefix of the checkpoint topic names this processor writes: empty for
    /// the live worker, `replay:` for a replay with `--apply`, so that a replay
    /// never moves the live worker's checkpoints.
    pub checkpoint_prefix: String,
    /// Re-file a duplicate's record into the current bucket, so that the
    /// window counts from the last sighting instead of the first.
    pub refresh_on_duplicate: bool,
    /// Which time files a new record.
    pub bucket_clock: BucketClock,
    /// Size cap of the store (0: none) and whether to drop the oldest bucket
    /// (`true`) or fail (`false`) when it is passed.
    pub size_cap: (u64, bool),
    /// When unfinished messages are tried again.
    pub retry: RetryPolicy,
    /// Where responses are produced (remote handlers), if anywhere.
    pub reply_topic: Option<String>,
    /// Bytes of a response body kept with its record.
    pub keep_response_bytes: usize,
    /// Partitions of one batch a remote handler is called for at once.
    pub max_in_flight: usize,
    /// Topics with `on_store_failure = "fail_open"`.
    pub fail_open: HashSet<String>,
    /// Write batches without syncing the WAL (the loop syncs them while
    /// the next batch is processed); batches of fail-open topics are
    /// always synced in their write.
    pub overlap_sync: bool,
    /// Produces the batch's records to the changelog before the write;
    /// `None` when the changelog is off (and always for a replay).
    pub changelog: Option<Arc<ChangelogWriter>>,
    /// The fencing token of each owned partition (the offset of this
    /// worker's claim in its changelog), passed to every handler call.
    pub tokens: HashMap<TopicPartition, i64>,
    /// What fail-open topics remember while the store cannot be written.
    guard: Guard,
    /// Failed attempts of messages not finished yet.
    attempts: HashMap<(TopicPartition, i64), u32>,
    /// Keys of messages waiting for a retry, and where each waits.
    leases: HashMap<ScopedKeyHash, (TopicPartition, i64)>,
}

/// A partition whose messages from `offset` on got no outcome in this batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deferral {
    /// The first offset without an outcome; the partition's next offset.
    pub offset: i64,
    /// When to try again.
    pub delay: Duration,
    /// True when retries are used up and the policy holds the partition
    /// (`on_exhausted = "pause"`): the worker is degraded.
    pub held: bool,
}

/// What a durable batch lets the caller commit and count.
pub struct BatchResult {
    /// Next offset per partition: last + 1, or the first deferred offset.
    pub next_offsets: BTreeMap<TopicPartition, i64>,
    /// Partitions with messages left without an outcome.
    pub deferred: BTreeMap<TopicPartition, Deferral>,
    /// Counts, for [`crate::pipeline::stats::Stats`].
    pub counts: BatchCounts,
    /// The outcome of each message, in the order given; `None` for a
    /// deferred one.
    pub outcomes: Vec<Option<MessageOutcome>>,
    /// True when the store could not be written and the batch's records
    /// went to the fail-open guard instead (its offsets may still be
    /// committed: the operator chose `fail_open`).
    pub unverified: bool,
    /// The batch's store writes, when they are to be written behind
    /// (`overlap_wal_sync`): the caller hands them to
    /// [`DedupStore::write_behind`], and its offsets may be committed only
    /// once [`DedupStore::written_behind`] reports it.
    pub write_behind: Option<StoreBatch>,
}

/// True for a store failure that fail-open topics go on through: the store
/// cannot be read or written now. A store over `max_store_bytes` is not one
/// (`on_store_full` decides), nor is a damaged store.
fn store_down(e: &StoreError) -> bool {
    e.is_transient()
        && !matches!(
            e,
            StoreError::Full { .. } | StoreError::FullAtOneBucket { .. }
        )
}

/// The outcome of one message of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageOutcome {
    /// What happened to it.
    pub counted: Counted,
    /// True when it was keyed by topic/partition/offset.
    pub unkeyed: bool,
}

/// A message of the batch after the decision, before any handler call.
enum Step {
    /// Decided without the handler; `dep` is the index of the message of
    /// this batch whose (not yet written) record decided it.
    Final {
        decision: Decision,
        dep: Option<usize>,
    },
    /// New: the handler decides.
    New(Fresh),
    /// Another copy of its key waits for a retry: it waits behind it.
    Waiting,
}

/// The headers a dead letter carries over; a name that is not UTF-8 is
/// carried with its invalid bytes replaced (U+FFFD): the producer takes
/// UTF-8 names only.
fn headers_of(msg: &OwnedMessage) -> Vec<(String, Option<Vec<u8>>)> {
    crate::kafka::raw_headers(msg.headers())
        .map(|(name, value)| {
            (
                String::from_utf8_lossy(name).into_owned(),
                value.map(<[u8]>::to_vec),
            )
        })
        .collect()
}

fn tp_of(msg: &OwnedMessage) -> TopicPartition {
    (msg.topic().to_string(), msg.partition())
}

fn delivery<'a>(
    msg: &'a OwnedMessage,
    fresh: &'a Fresh,
    tokens: &HashMap<TopicPartition, i64>,
) -> Delivery<'a> {
    // Without a key allocation per call: a worker owns few partitions.
    let token = tokens
        .iter()
        .find(|((t, p), _)| *p == msg.partition() && t == msg.topic())
        .map(|(_, token)| *token);
    Delivery {
        fencing_token: token,
        topic: msg.topic(),
        partition: msg.partition(),
        offset: msg.offset(),
        timestamp_ms: msg.timestamp().to_millis(),
        key: &fresh.key,
        key_source: fresh.source,
        payload: msg.payload().unwrap_or_default(),
        decoded: &fresh.decoded,
        headers: msg.headers(),
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

fn call_remote(h: &dyn RemoteHandler, d: &Delivery<'_>) -> Answer {
    let began = Instant::now();
    let answer = catch_unwind(AssertUnwindSafe(|| h.call(d))).unwrap_or_else(|p| Answer {
        verdict: Verdict::Retry {
            reason: format!("handler panicked: {}", panic_text(p.as_ref())),
            after: None,
        },
        response: None,
    });
    m::handler_call(h.name(), &answer.verdict, began.elapsed());
    answer
}

impl BatchProcessor {
    /// A processor for `config` over `store`, writing checkpoints under
    /// `checkpoint_prefix`.
    pub fn new(
        config: &Config,
        store: Arc<DedupStore>,
        handler: AnyHandler,
        checkpoint_prefix: &str,
    ) -> anyhow::Result<Self> {
        let dlq = config.clone();
        Ok(Self {
            store,
            handler,
            dead_letters: DeadLetters::new(config)?,
            decider: config.decider(),
            dlq_topic: Box::new(move |t: &str| dlq.dead_letter_topic_for(t)),
            checkpoint_prefix: checkpoint_prefix.to_string(),
            refresh_on_duplicate: config.refresh_on_duplicate,
            bucket_clock: config.bucket_clock,
            size_cap: (
                config.max_store_bytes,
                config.on_store_full == OnStoreFull::DropOldest,
            ),
            retry: (&config.retry).into(),
            reply_topic: (!config.http.reply_topic.is_empty())
                .then(|| config.http.reply_topic.clone()),
            keep_response_bytes: config.http.keep_response_bytes,
            max_in_flight: config.http.max_in_flight,
            fail_open: config
                .topics
                .iter()
                .filter(|t| config.on_store_failure_for(t) == OnStoreFailure::FailOpen)
                .cloned()
                .collect(),
            overlap_sync: false,
            changelog: if checkpoint_prefix.is_empty() {
                ChangelogWriter::new(config)?.map(Arc::new)
            } else {
                None
            },
            tokens: HashMap::new(),
            guard: Guard::new(config.fail_open_max_keys),
            attempts: HashMap::new(),
            leases: HashMap::new(),
        })
    }

    /// Forgets the retry state of partitions this worker no longer owns: the
    /// new owner starts their messages afresh.
    pub fn forget_partitions(&mut self, revoked: &HashSet<TopicPartition>) {
        self.attempts.retain(|(tp, _), _| !revoked.contains(tp));
        self.leases.retain(|_, (tp, _)| !revoked.contains(tp));
        self.guard.forget_partitions(revoked);
    }

    /// The fail-open guard.
    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// True when every message of `messages` belongs to a fail-open topic,
    /// so the batch may go on with the guard if the store fails.
    pub fn may_fail_open(&self, messages: &[OwnedMessage]) -> bool {
        !self.fail_open.is_empty() && messages.iter().all(|m| self.fail_open.contains(m.topic()))
    }

    /// Writes what the guard holds into the store, which takes writes again;
    /// returns the records written. On failure the guard keeps everything.
    pub fn flush_guard(&mut self) -> Result<u64, StoreError> {
        if self.guard.is_empty() {
            return Ok(0);
        }
        let mut batch = StoreBatch::new();
        let n = self.guard.merge_into(&mut batch);
        self.store.commit_ref(&batch)?;
        self.guard.clear();
        m::guard(0, 0);
        tracing::warn!(
            records = n,
            "the dedup store takes writes again: wrote the keys handled while it was down (fail open) into it"
        );
        Ok(n)
    }

    fn letter(&self, msg: &OwnedMessage, kind: DeadLetterKind, reason: String) -> DeadLetter {
        tracing::warn!(
            topic = msg.topic(),
            partition = msg.partition(),
            offset = msg.offset(),
            kind = kind.as_str(),
            %reason,
            "dead-lettering message"
        );
        DeadLetter {
            topic: (self.dlq_topic)(msg.topic()),
            kind,
            reason,
            source_topic: msg.topic().to_string(),
            source_partition: msg.partition(),
            source_offset: msg.offset(),
            key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().map(<[u8]>::to_vec),
            headers: headers_of(msg),
            extra: Vec::new(),
        }
    }

    /// Phase 1: every message's decision, against the store and the rest of
    /// the batch, with no handler call.
    fn decide_all(
        &self,
        messages: &[OwnedMessage],
        prepared: Vec<Prepared>,
        stored: &crate::pipeline::StoredRecords,
        now: i64,
    ) -> Vec<Step> {
        let mut tentative: FastMap<ScopedKeyHash, (DedupRecord, usize)> = FastMap::default();
        let mut steps = Vec::with_capacity(messages.len());
        for (i, (msg, prepared)) in messages.iter().zip(prepared).enumerate() {
            if let Some(h) = prepared.hash() {
                if let Some((tp, offset)) = self.leases.get(&h) {
                    if *offset != msg.offset() || *tp != tp_of(msg) {
                        steps.push(Step::Waiting);
                        continue;
                    }
                }
            }
            let mut dep = None;
            let decision = self.decider.complete(
                msg,
                prepared,
                |h| {
                    tentative.get(h).map(|(r, j)| {
                        dep = Some(*j);
                        r.clone()
                    })
                },
                stored,
                now,
            );
            match decision {
                Decision::New(fresh) => {
                    let record = new_record(msg, &fresh, now, RecordOutcome::Handled);
                    tentative.insert(fresh.hash, (record, i));
                    steps.push(Step::New(fresh));
                }
                decision => steps.push(Step::Final { decision, dep }),
            }
        }
        steps
    }

    /// Phase 2: the handler's answer for each new message it was called
    /// for. A partition stops at its first message that cannot be finished
    /// now; the messages after it get no call.
    fn call_handler(
        &mut self,
        messages: &[OwnedMessage],
        steps: &[Step],
        batch: &mut StoreBatch,
    ) -> Vec<Option<Answer>> {
        let mut answers: Vec<Option<Answer>> = vec![None; messages.len()];
        match &mut self.handler {
            AnyHandler::Local(h) => {
                let calls = m::HandlerCalls::of(h.name());
                let mut stopped: HashSet<(&str, i32)> = HashSet::new();
                for (i, (msg, step)) in messages.iter().zip(steps).enumerate() {
                    let tp = (msg.topic(), msg.partition());
                    if stopped.contains(&tp) {
                        continue;
                    }
                    match step {
                        Step::Waiting => {
                            stopped.insert(tp);
                        }
                        Step::Final { dep: Some(j), .. } => {
                            let finished = answers[*j]
                                .as_ref()
                                .is_some_and(|a| !matches!(a.verdict, Verdict::Retry { .. }));
                            if !finished {
                                stopped.insert(tp);
                            }
                        }
                        Step::Final { dep: None, .. } => {}
                        Step::New(fresh) => {
                            let d = delivery(msg, fresh, &self.tokens);
                            let began = Instant::now();
                            let mut txn = batch.handler_txn(&self.store);
                            let verdict =
                                match catch_unwind(AssertUnwindSafe(|| h.handle(&d, &mut txn))) {
                                    Ok(Ok(v)) => v,
                                    Ok(Err(e)) => Verdict::Retry {
                                        reason: format!("handler `{}` failed: {e:#}", h.name()),
                                        after: None,
                                    },
                                    Err(p) => Verdict::Retry {
                                        reason: format!(
                                            "handler `{}` panicked: {}",
                                            h.name(),
                                            panic_text(p.as_ref())
                                        ),
                                        after: None,
                                    },
                                };
                            match verdict {
                                Verdict::Handled => txn.keep(),
                                Verdict::Retry { .. } => {
                                    drop(txn);
                                    stopped.insert(tp);
                                }
                                Verdict::Rejected(_) => drop(txn),
                            }
                            calls.record(&verdict, began.elapsed());
                            answers[i] = Some(Answer {
                                verdict,
                                response: None,
                            });
                        }
                    }
                }
            }
            AnyHandler::Remote(h) => {
                // One lane per partition, each in offset order; at most
                // `max_in_flight` lanes at a time.
                let mut lanes: BTreeMap<(&str, i32), Vec<usize>> = BTreeMap::new();
                for (i, msg) in messages.iter().enumerate() {
                    lanes
                        .entry((msg.topic(), msg.partition()))
                        .or_default()
                        .push(i);
                }
                let queue = Mutex::new(lanes.into_values().collect::<Vec<_>>());
                let results = Mutex::new(Vec::new());
                let workers = self.max_in_flight.max(1);
                let h: &dyn RemoteHandler = h.as_ref();
                let tokens = &self.tokens;
                let began = Instant::now();
                std::thread::scope(|scope| {
                    for _ in 0..workers {
                        scope.spawn(|| loop {
                            let lane = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                            let Some(lane) = lane else { break };
                            let mut done = Vec::new();
                            for &i in &lane {
                                match &steps[i] {
                                    Step::Waiting => break,
                                    // Decided against another partition's
                                    // message of this batch: whether that
                                    // one finishes is not known here.
                                    Step::Final { dep: Some(j), .. }
                                        if messages[*j].partition() != messages[i].partition()
                                            || messages[*j].topic() != messages[i].topic() =>
                                    {
                                        break
                                    }
                                    Step::Final { .. } => {}
                                    Step::New(_) if began.elapsed() > LANE_BUDGET => break,
                                    Step::New(fresh) => {
                                        let answer =
                                            call_remote(h, &delivery(&messages[i], fresh, tokens));
                                        let retry = matches!(answer.verdict, Verdict::Retry { .. });
                                        done.push((i, answer));
                                        if retry {
                                            break;
                                        }
                                    }
                                }
                            }
                            results
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .extend(done);
                        });
                    }
                });
                for (i, a) in results.into_inner().unwrap_or_else(|e| e.into_inner()) {
                    answers[i] = Some(a);
                }
            }
        }
        answers
    }

    /// Decides, handles, writes and returns the committable offsets of
    /// `messages` (each partition's messages in offset order).
    pub fn process(&mut self, messages: &[OwnedMessage]) -> anyhow::Result<BatchResult> {
        let (max_bytes, drop_oldest) = self.size_cap;
        let mut counts = BatchCounts::default();
        let guardable = self.may_fail_open(messages);
        if max_bytes > 0 {
            match self.store.enforce_size_cap(max_bytes, drop_oldest) {
                Ok(dropped) => counts.early_bucket_drops = dropped.len() as u64,
                Err(e) if guardable && store_down(&e) => {
                    tracing::debug!(error = %e, "size cap not checked: the store fails (fail open)")
                }
                Err(e) => {
                    return Err(e)
                        .context("checking max_store_bytes (nothing of this batch was handled)")
                }
            }
        }
        let now = self.store.processing_time();
        let bucket = self.store.bucket_for(now);
        let mut batch = StoreBatch::new();

        // Every key first, then one batched read per bucket for all of them.
        let store = &self.store;
        let (prepared, mut stored) = self
            .decider
            .prepare_batch_with(messages, |keys| match store.lookup_many(keys) {
                Err(e) if guardable && store_down(&e) => {
                    tracing::debug!(error = %e, "keys looked up in the fail-open guard only: the store cannot be read");
                    Ok(vec![None; keys.len()])
                }
                found => found,
            })
            .with_context(|| {
                format!(
                    "looking up the keys of a batch of {} messages",
                    messages.len()
                )
            })?;
        if !self.guard.is_empty() {
            for h in prepared.iter().filter_map(Prepared::hash) {
                if let Some(r) = self.guard.get(&h) {
                    stored.insert_missing(h, r);
                }
            }
        }
        let steps = self.decide_all(messages, prepared, &stored, now);
        let mut answers = self.call_handler(messages, &steps, &mut batch);

        // Phase 3: outcomes in message order.
        let mut letters = Vec::new();
        let mut replies = Vec::new();
        let mut outcomes = Vec::with_capacity(messages.len());
        // Keyed by borrowed topic names: no allocation per message; the
        // owned maps of the result are built once per partition at the end.
        let mut next_offsets: BTreeMap<(&str, i32), i64> = BTreeMap::new();
        let mut deferred: BTreeMap<(&str, i32), Deferral> = BTreeMap::new();
        let mut finished = vec![false; messages.len()];
        // Responses of this batch's new messages, for in-batch duplicates.
        let mut responses: FastMap<ScopedKeyHash, StoredResponse> = FastMap::default();
        for (i, (msg, step)) in messages.iter().zip(steps).enumerate() {
            let tp = (msg.topic(), msg.partition());
            if deferred.contains_key(&tp) {
                outcomes.push(None);
                continue;
            }
            next_offsets.insert(tp, msg.offset() + 1);
            let mut defer = |delay: Duration, held: bool| {
                next_offsets.insert(tp, msg.offset());
                deferred.insert(
                    tp,
                    Deferral {
                        offset: msg.offset(),
                        delay,
                        held,
                    },
                );
            };
            let decision = match step {
                Step::Waiting => {
                    tracing::debug!(
                        topic = msg.topic(),
                        partition = msg.partition(),
                        offset = msg.offset(),
                        "another copy of this key waits for a retry: this one waits behind it"
                    );
                    defer(LEASE_WAIT, false);
                    outcomes.push(None);
                    continue;
                }
                Step::Final { dep: Some(j), .. } if !finished[j] => {
                    defer(Duration::ZERO, false);
                    outcomes.push(None);
                    continue;
                }
                Step::Final { decision, .. } => decision,
                Step::New(fresh) => {
                    let Some(answer) = answers[i].take() else {
                        defer(Duration::ZERO, false);
                        outcomes.push(None);
                        continue;
                    };
                    let key = || (tp_of(msg), msg.offset());
                    let (counted, recorded, response) = match answer.verdict {
                        Verdict::Retry { reason, after } => {
                            let attempts = self.attempts.entry(key()).or_insert(0);
                            *attempts += 1;
                            let attempts = *attempts;
                            let next = self.retry.after_failure(attempts, after);
                            if next != NextStep::DeadLetter {
                                counts.retries += 1;
                                m::retries(msg.topic(), 1);
                            }
                            match next {
                                NextStep::RetryAfter(delay) | NextStep::PausedRetryAfter(delay) => {
                                    let held = matches!(next, NextStep::PausedRetryAfter(_));
                                    let delay_ms = delay.as_millis() as u64;
                                    if held {
                                        tracing::error!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(),
                                            attempts, delay_ms, %reason,
                                            "retries exhausted: partition held at this message (on_exhausted = pause); retrying at the longest delay");
                                    } else {
                                        tracing::warn!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(),
                                            attempts, delay_ms, %reason,
                                            "message not finished; its partition waits and retries it");
                                    }
                                    self.leases.insert(fresh.hash, key());
                                    defer(delay, held);
                                    outcomes.push(None);
                                    continue;
                                }
                                NextStep::DeadLetter => {
                                    self.attempts.remove(&key());
                                    self.leases.remove(&fresh.hash);
                                    letters.push(self.letter(
                                        msg,
                                        DeadLetterKind::RetriesExhausted,
                                        format!("not finished after {attempts} attempts: {reason}"),
                                    ));
                                    finished[i] = true;
                                    counts.count(Counted::Exhausted);
                                    outcomes.push(Some(MessageOutcome {
                                        counted: Counted::Exhausted,
                                        unkeyed: (fresh.source == crate::key::KeySource::Unkeyed),
                                    }));
                                    if fresh.source == crate::key::KeySource::Unkeyed {
                                        counts.unkeyed += 1;
                                    }
                                    continue;
                                }
                            }
                        }
                        Verdict::Handled => {
                            (Counted::Handled, RecordOutcome::Handled, answer.response)
                        }
                        Verdict::Rejected(reason) => {
                            letters.push(self.letter(
                                msg,
                                DeadLetterKind::Rejected,
                                format!("handler rejected: {reason}"),
                            ));
                            (Counted::Rejected, RecordOutcome::Rejected, answer.response)
                        }
                    };
                    if !self.attempts.is_empty() {
                        self.attempts.remove(&key());
                    }
                    self.leases.remove(&fresh.hash);
                    let mut record = new_record(msg, &fresh, now, recorded);
                    record.response = response
                        .as_ref()
                        .map(|r| crate::reply::stored(r, self.keep_response_bytes));
                    if let (Some(topic), Some(r)) = (&self.reply_topic, &record.response) {
                        replies.push(Reply::to(
                            topic,
                            msg,
                            fresh.key.to_string(),
                            r.clone(),
                            (msg.topic(), msg.partition(), msg.offset()),
                            false,
                        ));
                        responses.insert(fresh.hash, r.clone());
                    }
                    let filed_in = self.bucket_of_new(msg, now, bucket, &mut counts);
                    batch.record(fresh.hash, filed_in, record);
                    finished[i] = true;
                    if fresh.source == crate::key::KeySource::Unkeyed {
                        counts.unkeyed += 1;
                    }
                    counts.count(counted);
                    outcomes.push(Some(MessageOutcome {
                        counted,
                        unkeyed: (fresh.source == crate::key::KeySource::Unkeyed),
                    }));
                    continue;
                }
            };
            finished[i] = true;
            let unkeyed = decision.unkeyed();
            if unkeyed {
                counts.unkeyed += 1;
                tracing::debug!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(),
                    "unkeyed message: using topic/partition/offset, which catches redeliveries but not producer duplicates");
            }
            let outcome = self.settle(
                msg,
                decision,
                now,
                bucket,
                &mut batch,
                &mut letters,
                &mut replies,
                &responses,
                &mut counts,
            );
            counts.count(outcome);
            outcomes.push(Some(MessageOutcome {
                counted: outcome,
                unkeyed,
            }));
        }

        if counts.event_time_fallbacks > 0 {
            tracing::warn!(
                count = counts.event_time_fallbacks,
                "bucket_clock = event: records filed by the processing clock because their message timestamp was missing, in the future or older than the window"
            );
        }
        for ((topic, partition), next) in &next_offsets {
            let name = format!("{}{topic}", self.checkpoint_prefix);
            let last = messages
                .iter()
                .rev()
                .find(|m| {
                    m.offset() == *next - 1 && m.partition() == *partition && m.topic() == *topic
                })
                .map(super::truncation::mark_of);
            batch.checkpoint(&name, *partition, *next, last);
        }
        if !letters.is_empty() {
            self.dead_letters
                .send_all(&letters)
                .context("writing dead letters (nothing of this batch was committed)")?;
            counts.dead_letters = letters.len() as u64;
        }
        if !replies.is_empty() {
            self.dead_letters
                .send_replies(&replies)
                .context("writing replies (nothing of this batch was committed)")?;
            counts.replies = replies.len() as u64;
        }
        if let Some(changelog) = &self.changelog {
            if !batch.records.is_empty() {
                let spans = changelog
                    .send(&batch)
                    .context("writing the changelog (nothing of this batch was committed)")?;
                for ((topic, partition), (span, n)) in spans {
                    m::changelog_records(&topic, n);
                    if let Some(cp) = batch.checkpoints.get_mut(&(topic, partition)) {
                        cp.changelog = span;
                    }
                }
            }
        }
        let owned = |(t, p): (&str, i32)| (t.to_string(), p);
        let mut result = BatchResult {
            next_offsets: next_offsets
                .into_iter()
                .map(|(tp, n)| (owned(tp), n))
                .collect(),
            deferred: deferred.into_iter().map(|(tp, d)| (owned(tp), d)).collect(),
            counts,
            outcomes,
            unverified: false,
            write_behind: None,
        };
        if self.overlap_sync && !guardable {
            // Written by the store's writing thread while the next batch is
            // processed; lookups see it at once.
            result.write_behind = Some(batch);
            return Ok(result);
        }
        let began = Instant::now();
        match self.store.commit_ref(&batch) {
            Ok(()) => m::store_write(began.elapsed(), messages.len()),
            Err(e) if guardable && store_down(&e) => {
                let counts = &mut result.counts;
                result.unverified = true;
                counts.unverified = counts.handler_calls();
                counts.guard_evictions = self
                    .guard
                    .absorb(batch)
                    .context("keeping the batch in the fail-open guard")?;
                m::guard(self.guard.len(), counts.guard_evictions);
                tracing::debug!(error = %e, unverified = counts.unverified, guard = self.guard.len(),
                    "batch kept in the fail-open guard: the store cannot be written");
            }
            Err(e) => {
                return Err(e).context(
                    "writing the batch to the dedup store (nothing of this batch was committed)",
                )
            }
        }
        Ok(result)
    }

    /// The bucket a new message's record is filed in.
    fn bucket_of_new(
        &self,
        msg: &OwnedMessage,
        now: i64,
        bucket: crate::store::Bucket,
        counts: &mut BatchCounts,
    ) -> crate::store::Bucket {
        match self.bucket_clock {
            BucketClock::Processing => bucket,
            BucketClock::Event => {
                let window = self.store.options().window_ms;
                match msg.timestamp().to_millis().filter(|&ts| ts >= 0) {
                    Some(ts) if ts <= now && ts > now - window => self.store.bucket_for(ts),
                    other => {
                        counts.event_time_fallbacks += 1;
                        let why = match other {
                            None => "missing",
                            Some(ts) if ts > now => "in the future",
                            Some(_) => "older than the window",
                        };
                        tracing::debug!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(),
                            timestamp = ?other, "message timestamp {why}: filing its record by the processing clock");
                        bucket
                    }
                }
            }
        }
    }

    /// The outcome of a message decided without the handler.
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &self,
        msg: &OwnedMessage,
        decision: Decision,
        now: i64,
        bucket: crate::store::Bucket,
        batch: &mut StoreBatch,
        letters: &mut Vec<DeadLetter>,
        replies: &mut Vec<Reply>,
        responses: &FastMap<ScopedKeyHash, StoredResponse>,
        counts: &mut BatchCounts,
    ) -> Counted {
        match decision {
            Decision::Undecodable(crate::payload::DecodeError::TooLarge { size, max }) => {
                let mut l = self.letter(
                    msg,
                    DeadLetterKind::TooLarge,
                    format!("payload of {size} bytes is over max_payload_bytes ({max}); the dead letter carries no payload"),
                );
                l.payload = None;
                l.extra = vec![("idem-payload-bytes", size.to_string())];
                letters.push(l);
                Counted::Undecodable
            }
            Decision::Tombstone => {
                letters.push(self.letter(
                    msg,
                    DeadLetterKind::Tombstone,
                    "null payload (tombstone)".into(),
                ));
                Counted::Tombstone
            }
            Decision::Undecodable(e) => {
                let reason = format!("undecodable payload: {e}");
                letters.push(self.letter(msg, DeadLetterKind::Undecodable, reason));
                Counted::Undecodable
            }
            Decision::BadKey(e) => {
                let reason = format!("no usable idempotency key: {e}");
                letters.push(self.letter(msg, DeadLetterKind::BadKey, reason));
                Counted::BadKey
            }
            Decision::Duplicate {
                first, hash, key, ..
            } => {
                let filed_at = first.first_seen_ms.max(first.refreshed_ms);
                if self.refresh_on_duplicate && self.store.bucket_for(filed_at) != bucket {
                    batch.record(
                        hash,
                        bucket,
                        DedupRecord {
                            refreshed_ms: now,
                            ..first.clone()
                        },
                    );
                }
                if first.source_partition != msg.partition() || first.source_topic != msg.topic() {
                    counts.cross_partition += 1;
                    tracing::warn!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(),
                        first_topic = %first.source_topic, first_partition = first.source_partition,
                        "duplicate arrived on another partition than its first copy: this topic is keyed so that a scaled-out group cannot dedup it");
                }
                if let Some(topic) = &self.reply_topic {
                    let response = first
                        .response
                        .clone()
                        .or_else(|| responses.get(&hash).cloned());
                    if let Some(r) = response {
                        replies.push(Reply::to(
                            topic,
                            msg,
                            key.to_string(),
                            r,
                            (
                                first.source_topic.as_str(),
                                first.source_partition,
                                first.source_offset,
                            ),
                            true,
                        ));
                    }
                }
                Counted::Duplicate
            }
            Decision::Conflict {
                first, received, ..
            } => {
                let recorded = Fingerprint::from_slice(&first.fingerprint)
                    .map(|f| f.to_hex())
                    .unwrap_or_else(|| hex::encode(&first.fingerprint));
                let mut l = self.letter(
                    msg,
                    DeadLetterKind::Conflict,
                    format!(
                        "idempotency key reused with a different payload (first seen at {}/{}@{})",
                        first.source_topic, first.source_partition, first.source_offset
                    ),
                );
                l.extra = vec![
                    ("idem-fingerprint-recorded", recorded),
                    ("idem-fingerprint-received", received.to_hex()),
                    ("idem-first-offset", first.source_offset.to_string()),
                ];
                letters.push(l);
                Counted::Conflict
            }
            Decision::New(_) => unreachable!("new messages are settled by the handler's answer"),
        }
    }
}

/// The dedup record of a new message.
fn new_record(msg: &OwnedMessage, fresh: &Fresh, now: i64, outcome: RecordOutcome) -> DedupRecord {
    DedupRecord {
        fingerprint: fresh.fingerprint.0.to_vec(),
        first_seen_ms: now,
        source_topic: msg.topic().to_string(),
        source_partition: msg.partition(),
        source_offset: msg.offset(),
        outcome: outcome as i32,
        refreshed_ms: 0,
        response: None,
    }
}

#[cfg(test)]
mod tests {
    //! Unit tests of the decision logic. librdkafka's in-process mock cluster
    //! stands in for the broker of the dead-letter producer here; the real
    //! broker is exercised by the integration tests under `tests/`.
    use super::*;
    use crate::clock::ManualClock;
    use crate::config::Config;
    use crate::handler::ledger::Ledger;
    use crate::handler::{Handler, HandlerTxn, Response};
    use crate::key::{IdempotencyKey, KeyRule, ScopedKeyHash};
    use crate::payload::PayloadFormat;
    use crate::pipeline::decide::TopicRule;
    use crate::pipeline::retry::RetryPolicy;
    use crate::proto::PaymentEvent;
    use crate::store::StoreOptions;
    use prost::Message as _;
    use rdkafka::message::Timestamp;
    use rdkafka::mocking::MockCluster;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts calls, then delegates to the ledger.
    /// Counts calls, then delegates to the ledger, or (with `None`) accepts
    /// everything: for tests of the dedup decision alone, which the ledger's
    /// own refusal of an event applied before would mask.
    struct Counting(Arc<AtomicUsize>, Option<Ledger>);

    impl Handler for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        fn column_families(&self) -> Vec<&'static str> {
            Ledger.column_families()
        }
        fn handle(
            &mut self,
            d: &Delivery<'_>,
            txn: &mut HandlerTxn<'_>,
        ) -> anyhow::Result<Verdict> {
            self.0.fetch_add(1, Ordering::SeqCst);
            match &mut self.1 {
                Some(l) => l.handle(d, txn),
                None => Ok(Verdict::Handled),
            }
        }
    }

    fn msg(partition: i32, offset: i64, ev: &PaymentEvent) -> OwnedMessage {
        OwnedMessage::new(
            Some(ev.encode_to_vec()),
            None,
            "t".into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    fn event(id: &str, amount: i64) -> PaymentEvent {
        PaymentEvent {
            event_id: id.into(),
            account_id: "a".into(),
            amount_minor: amount,
            currency: "EUR".into(),
            kind: crate::proto::PaymentKind::Capture as i32,
            ..Default::default()
        }
    }

    /// A processor over a fresh store with a counting ledger; the mock
    /// cluster only receives dead letters.
    fn processor(
        cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
        dir: &std::path::Path,
        clock: ManualClock,
        refresh_on_duplicate: bool,
    ) -> (BatchProcessor, Arc<AtomicUsize>) {
        let config = Config {
            brokers: cluster.bootstrap_servers(),
            topics: vec!["t".into()],
            ..Config::default()
        };
        let calls = Arc::new(AtomicUsize::new(0));
        let handler = Counting(calls.clone(), Some(Ledger));
        let opts = StoreOptions {
            handler_cfs: handler.column_families(),
            ..StoreOptions::default()
        };
        let store = Arc::new(DedupStore::open(dir, opts, Arc::new(clock)).unwrap());
        let mut p =
            BatchProcessor::new(&config, store, AnyHandler::Local(Box::new(handler)), "").unwrap();
        p.decider = Decider::new(TopicRule {
            key_rule: KeyRule {
                header: Some("Idempotency-Key".into()),
                field: Some("/event_id".into()),
                composite: None,
            },
            scope: "s".into(),
            format: PayloadFormat::Auto,
            window_ms: None,
        });
        p.refresh_on_duplicate = refresh_on_duplicate;
        (p, calls)
    }

    #[test]
    fn a_key_twice_in_one_batch_on_two_partitions_reaches_the_handler_once() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t.dlq", 2, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (mut p, calls) = processor(&cluster, dir.path(), ManualClock::new(1_000_000), false);
        let store = p.store.clone();
        let batch = [
            msg(0, 0, &event("e1", 10)),
            msg(1, 0, &event("e1", 10)), // same key, same payload, other partition
            msg(0, 1, &event("e1", 11)), // same key, other payload
            msg(1, 1, &event("e2", 5)),
        ];
        let r = p.process(&batch).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(r.counts.cross_partition, 1);
        assert_eq!(r.counts.dead_letters, 1);
        assert_eq!(
            r.next_offsets.into_iter().collect::<Vec<_>>(),
            vec![(("t".to_string(), 0), 2), (("t".to_string(), 1), 2)]
        );
        let balances = crate::handler::ledger::balances(&store).unwrap();
        assert_eq!(balances.values().copied().collect::<Vec<_>>(), vec![15]);
        assert_eq!(store.checkpoint("t", 0).unwrap(), Some(2));

        // The same messages again, in a later batch: no handler call.
        p.process(&batch).unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn refresh_on_duplicate_decides_whether_the_window_counts_from_the_last_sighting() {
        const HOUR: i64 = 3_600_000;
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t.dlq", 1, 1).unwrap();
        for (refresh, calls_at_30h) in [(false, 2), (true, 1)] {
            let dir = tempfile::tempdir().unwrap();
            let clock = ManualClock::new(1_000 * HOUR);
            let (mut p, calls) = processor(&cluster, dir.path(), clock.clone(), refresh);
            p.handler = AnyHandler::Local(Box::new(Counting(calls.clone(), None)));
            let m = [msg(0, 0, &event("e1", 10))];
            p.process(&m).unwrap();
            // Seen again 20 h later: a duplicate either way.
            clock.advance(20 * HOUR);
            let r = p.process(&m).unwrap();
            assert_eq!(r.outcomes[0].unwrap().counted, Counted::Duplicate);
            assert_eq!(calls.load(Ordering::SeqCst), 1);
            // 30 h after the first sighting, 10 h after the last.
            clock.advance(10 * HOUR);
            let r = p.process(&m).unwrap();
            let expected = if refresh {
                Counted::Duplicate
            } else {
                Counted::Handled
            };
            assert_eq!(
                r.outcomes[0].unwrap().counted,
                expected,
                "refresh_on_duplicate = {refresh}"
            );
            assert_eq!(calls.load(Ordering::SeqCst), calls_at_30h);
        }
    }

    #[test]
    fn event_clock_files_by_timestamp_and_falls_back_for_missing_future_and_old_ones() {
        const HOUR: i64 = 3_600_000;
        let now = 1_000 * HOUR + 1_234;
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t.dlq", 1, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (mut p, calls) = processor(&cluster, dir.path(), ManualClock::new(now), false);
        p.bucket_clock = BucketClock::Event;
        let at = |offset: i64, id: &str, ts: Timestamp| {
            OwnedMessage::new(
                Some(event(id, 1).encode_to_vec()),
                None,
                "t".into(),
                ts,
                0,
                offset,
                None,
            )
        };
        let batch = [
            at(0, "fresh", Timestamp::CreateTime(now - 5 * HOUR)),
            at(1, "missing", Timestamp::NotAvailable),
            at(2, "minus-one", Timestamp::CreateTime(-1)),
            at(3, "micros", Timestamp::CreateTime(now * 1000)),
            at(4, "month-old", Timestamp::CreateTime(now - 30 * 24 * HOUR)),
        ];
        let r = p.process(&batch).unwrap();
        assert_eq!(r.counts.event_time_fallbacks, 4);
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        let bucket_of = |id: &str| {
            let h = ScopedKeyHash::new("s", &IdempotencyKey(id.as_bytes().to_vec()));
            p.store.find(&h).unwrap().unwrap().0.start_secs * 1000
        };
        assert_eq!(bucket_of("fresh"), 995 * HOUR);
        for id in ["missing", "minus-one", "micros", "month-old"] {
            assert_eq!(bucket_of(id), 1_000 * HOUR, "{id}");
        }
        // No bucket in the future, none already expired.
        let starts: Vec<i64> = p
            .store
            .live_buckets()
            .iter()
            .map(|b| b.start_secs)
            .collect();
        assert_eq!(starts, vec![1_000 * 3_600, 995 * 3_600]);
    }

    #[test]
    fn a_key_never_matches_across_scopes_and_a_scope_forgets_on_its_own_window() {
        const HOUR: i64 = 3_600_000;
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t.dlq", 1, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(1_000 * HOUR);
        let (mut p, calls) = processor(&cluster, dir.path(), clock.clone(), false);
        p.handler = AnyHandler::Local(Box::new(Counting(calls.clone(), None)));
        let mut ship = p.decider.rule("t").clone();
        ship.scope = "ship".into();
        ship.window_ms = Some(2 * HOUR);
        p.decider = p.decider.clone().with_topic("u", ship);
        let on = |topic: &str, offset: i64| {
            OwnedMessage::new(
                Some(event("e1", 10).encode_to_vec()),
                None,
                topic.into(),
                Timestamp::NotAvailable,
                0,
                offset,
                None,
            )
        };
        let outcome = |p: &mut BatchProcessor, m: OwnedMessage| {
            p.process(&[m]).unwrap().outcomes[0].unwrap().counted
        };
        assert_eq!(outcome(&mut p, on("t", 0)), Counted::Handled);
        assert_eq!(outcome(&mut p, on("u", 0)), Counted::Handled); // another scope
        clock.advance(HOUR);
        assert_eq!(outcome(&mut p, on("u", 1)), Counted::Duplicate);
        clock.advance(2 * HOUR);
        assert_eq!(outcome(&mut p, on("u", 2)), Counted::Handled); // ship's 2 h are over
        assert_eq!(outcome(&mut p, on("t", 1)), Counted::Duplicate); // the store's 24 h are not
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    /// A remote handler answering from a script: per event id, the verdicts
    /// of successive calls (the last one repeats); it records every call.
    struct Scripted {
        script: Mutex<HashMap<String, Vec<Verdict>>>,
        calls: Mutex<Vec<String>>,
    }

    impl Scripted {
        fn new(script: &[(&str, Vec<Verdict>)]) -> Arc<Self> {
            Arc::new(Scripted {
                script: Mutex::new(
                    script
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.clone()))
                        .collect(),
                ),
                calls: Mutex::new(Vec::new()),
            })
        }
        fn calls(&self) -> Vec<String> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl RemoteHandler for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }
        fn call(&self, d: &Delivery<'_>) -> Answer {
            let id = d.key.to_string();
            self.calls.lock().unwrap().push(id.clone());
            let mut script = self.script.lock().unwrap();
            let verdict = match script.get_mut(&id) {
                Some(v) if v.len() > 1 => v.remove(0),
                Some(v) => v[0].clone(),
                None => Verdict::Handled,
            };
            drop(script);
            if matches!(verdict, Verdict::Rejected(ref r) if r == "panic") {
                panic!("scripted panic");
            }
            Answer {
                verdict,
                response: Some(Response {
                    status: 200,
                    body: format!("done {id}").into_bytes(),
                    truncated: false,
                    content_type: Some("text/plain".into()),
                }),
            }
        }
    }

    fn retry() -> Verdict {
        Verdict::Retry {
            reason: "HTTP 503".into(),
            after: None,
        }
    }

    fn remote(
        cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
        dir: &std::path::Path,
        script: &[(&str, Vec<Verdict>)],
        policy: RetryPolicy,
    ) -> (BatchProcessor, Arc<Scripted>) {
        let (mut p, _) = processor(cluster, dir, ManualClock::new(1_000_000), false);
        let h = Scripted::new(script);
        p.handler = AnyHandler::Remote(h.clone());
        p.retry = policy;
        (p, h)
    }

    fn policy(max_attempts: u32, on_exhausted: crate::config::OnExhausted) -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(500),
            max_attempts,
            on_exhausted,
        }
    }

    #[test]
    fn fail_open_goes_on_with_the_guard_while_the_store_is_closed_and_writes_it_back() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t.dlq", 2, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (mut p, h) = remote(
            &cluster,
            dir.path(),
            &[],
            policy(5, crate::config::OnExhausted::Pause),
        );
        p.fail_open.insert("t".into());
        let first = [msg(0, 0, &event("a", 1)), msg(0, 1, &event("b", 1))];
        assert!(!p.process(&first).unwrap().unverified);
        p.store.close();
        // The store cannot be read either: `a` is new again to this worker
        // (failing open means exactly that); `d` twice is caught in-batch.
        let broken = [
            msg(0, 2, &event("a", 1)),
            msg(0, 3, &event("d", 1)),
            msg(0, 4, &event("d", 1)),
            msg(1, 0, &event("e", 1)),
        ];
        let r = p.process(&broken).unwrap();
        assert!(r.unverified);
        assert_eq!(r.counts.unverified, 3);
        assert_eq!(r.counts.handler_calls(), 3);
        assert_eq!(r.next_offsets[&("t".to_string(), 0)], 5);
        assert_eq!(p.guard().len(), 3);
        // Redeliveries while broken are duplicates, from the guard.
        let again = [msg(0, 5, &event("d", 1)), msg(1, 1, &event("e", 1))];
        let r = p.process(&again).unwrap();
        assert_eq!(r.counts.handler_calls(), 0);
        assert_eq!(
            r.outcomes
                .iter()
                .map(|o| o.unwrap().counted)
                .collect::<Vec<_>>(),
            vec![Counted::Duplicate, Counted::Duplicate]
        );
        // Partitions are called concurrently: compare as a multiset.
        let mut calls = h.calls();
        calls.sort();
        assert_eq!(calls, vec!["a", "a", "b", "d", "e"]);
        // A fail-closed topic's batch is not guarded.
        p.fail_open.clear();
        assert!(p.process(&[msg(0, 6, &event("f", 1))]).is_err());
        p.fail_open.insert("t".into());
        // The store returns: the guard goes into it, with the checkpoints.
        p.store.reopen().unwrap();
        assert_eq!(p.flush_guard().unwrap(), 3);
        assert!(p.guard().is_empty());
        let d = ScopedKeyHash::new("s", &IdempotencyKey(b"d".to_vec()));
        assert_eq!(p.store.lookup(&d).unwrap().unwrap().source_offset, 3);
        assert_eq!(p.store.checkpoint("t", 0).unwrap(), Some(6));
        assert_eq!(p.store.checkpoint("t", 1).unwrap(), Some(2));
        let r = p.process(&[msg(0, 6, &event("e", 1))]).unwrap();
        assert!(!r.unverified);
        assert_eq!(r.outcomes[0].unwrap().counted, Counted::Duplicate);
    }

    #[test]
    fn a_retry_defers_its_partition_at_its_offset_and_the_other_partition_flows() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t.dlq", 2, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (mut p, h) = remote(
            &cluster,
            dir.path(),
            &[("e1", vec![retry(), Verdict::Handled])],
            policy(5, crate::config::OnExhausted::Pause),
        );
        let batch = [
            msg(0, 0, &event("e0", 1)),
            msg(0, 1, &event("e1", 1)),
            msg(0, 2, &event("e2", 1)),
            msg(1, 0, &event("e3", 1)),
            msg(1, 1, &event("e4", 1)),
        ];
        let r = p.process(&batch).unwrap();
        let counted: Vec<Option<Counted>> =
            r.outcomes.iter().map(|o| o.map(|o| o.counted)).collect();
        assert_eq!(
            counted,
            vec![
                Some(Counted::Handled),
                None,
                None,
                Some(Counted::Handled),
                Some(Counted::Handled)
            ]
        );
        assert_eq!(r.counts.retries, 1);
        assert_eq!(
            r.next_offsets.clone().into_iter().collect::<Vec<_>>(),
            vec![(("t".to_string(), 0), 1), (("t".to_string(), 1), 2)]
        );
        let d = r.deferred[&("t".to_string(), 0)];
        assert_eq!(d.offset, 1);
        assert!(!d.held);
        assert!(d.delay <= Duration::from_millis(10));
        assert_eq!(p.store.checkpoint("t", 0).unwrap(), Some(1));
        let mut calls = h.calls();
        calls.sort();
        assert_eq!(calls, vec!["e0", "e1", "e3", "e4"]); // e2 waits behind e1

        // The deferred messages again: e1 now succeeds, e2 follows.
        let r = p.process(&batch[1..3]).unwrap();
        assert!(r.deferred.is_empty());
        assert_eq!(r.next_offsets[&("t".to_string(), 0)], 3);
        assert_eq!(
            h.calls().iter().filter(|c| *c == "e1").count(),
            2,
            "the same message twice, with the same key"
        );
        assert_eq!(h.calls().len(), 6);
    }

    #[test]
    fn exhausted_retries_dead_letter_without_a_record_or_hold_the_partition() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t.dlq", 1, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (mut p, h) = remote(
            &cluster,
            dir.path(),
            &[("e1", vec![retry()])],
            policy(2, crate::config::OnExhausted::DeadLetter),
        );
        let batch = [msg(0, 0, &event("e1", 1)), msg(0, 1, &event("e2", 1))];
        let r = p.process(&batch).unwrap();
        assert_eq!(r.deferred[&("t".to_string(), 0)].offset, 0);
        let r = p.process(&batch).unwrap();
        assert_eq!(r.outcomes[0].unwrap().counted, Counted::Exhausted);
        assert_eq!(r.counts.dead_letters, 1);
        // Its lane stopped at it, so the next message waits for the next
        // batch, with no delay.
        assert_eq!(r.outcomes[1], None);
        let d = r.deferred[&("t".to_string(), 0)];
        assert_eq!((d.offset, d.delay), (1, Duration::ZERO));
        let r = p.process(&batch[1..]).unwrap();
        assert_eq!(r.outcomes[0].unwrap().counted, Counted::Handled);
        assert!(r.deferred.is_empty());
        // No record: a re-drive of e1 reaches the handler again.
        let h1 = ScopedKeyHash::new("s", &IdempotencyKey(b"e1".to_vec()));
        assert!(p.store.find(&h1).unwrap().is_none());
        assert_eq!(h.calls(), vec!["e1", "e1", "e2"]);

        let dir = tempfile::tempdir().unwrap();
        let (mut p, _) = remote(
            &cluster,
            dir.path(),
            &[("e1", vec![retry()])],
            policy(1, crate::config::OnExhausted::Pause),
        );
        for _ in 0..3 {
            let r = p.process(&batch[..1]).unwrap();
            let d = r.deferred[&("t".to_string(), 0)];
            assert!(d.held);
            assert_eq!(d.delay, Duration::from_millis(500));
            assert_eq!(r.outcomes[0], None);
        }
    }

    #[test]
    fn a_copy_of_a_key_waiting_for_a_retry_waits_behind_it() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t.dlq", 2, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (mut p, h) = remote(
            &cluster,
            dir.path(),
            &[("e1", vec![retry(), retry(), Verdict::Handled])],
            policy(10, crate::config::OnExhausted::Pause),
        );
        // In one batch: the copy on partition 1 depends on partition 0's.
        let r = p
            .process(&[msg(0, 0, &event("e1", 1)), msg(1, 0, &event("e1", 1))])
            .unwrap();
        assert_eq!(r.outcomes, vec![None, None]);
        assert_eq!(r.deferred.len(), 2);
        // In a later batch, alone: it waits behind the lease.
        let r = p.process(&[msg(1, 0, &event("e1", 1))]).unwrap();
        assert_eq!(r.outcomes, vec![None]);
        assert_eq!(h.calls(), vec!["e1"]);
        // The first copy retried and done; then the copy is a duplicate.
        let r = p.process(&[msg(0, 0, &event("e1", 1))]).unwrap();
        assert_eq!(r.outcomes, vec![None]);
        let r = p.process(&[msg(0, 0, &event("e1", 1))]).unwrap();
        assert_eq!(r.outcomes[0].unwrap().counted, Counted::Handled);
        let r = p.process(&[msg(1, 0, &event("e1", 1))]).unwrap();
        assert_eq!(r.outcomes[0].unwrap().counted, Counted::Duplicate);
        assert_eq!(h.calls(), vec!["e1", "e1", "e1"]);
    }

    #[test]
    fn a_panicking_handler_is_a_retry_not_a_crash() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t.dlq", 1, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (mut p, _) = remote(
            &cluster,
            dir.path(),
            &[(
                "e1",
                vec![Verdict::Rejected("panic".into()), Verdict::Handled],
            )],
            policy(5, crate::config::OnExhausted::Pause),
        );
        let r = p.process(&[msg(0, 0, &event("e1", 1))]).unwrap();
        assert_eq!(r.outcomes, vec![None]);
        assert_eq!(r.counts.retries, 1);
        let r = p.process(&[msg(0, 0, &event("e1", 1))]).unwrap();
        assert_eq!(r.outcomes[0].unwrap().counted, Counted::Handled);
    }

    #[test]
    fn a_duplicate_gets_the_stored_response_again() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t.dlq", 1, 1).unwrap();
        cluster.create_topic("replies", 1, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (mut p, h) = remote(&cluster, dir.path(), &[], RetryPolicy::default());
        p.reply_topic = Some("replies".into());
        p.keep_response_bytes = 4;
        let r = p
            .process(&[msg(0, 0, &event("e1", 1)), msg(0, 1, &event("e1", 1))])
            .unwrap();
        assert_eq!(r.counts.replies, 2);
        let r = p.process(&[msg(0, 2, &event("e1", 1))]).unwrap();
        assert_eq!(r.outcomes[0].unwrap().counted, Counted::Duplicate);
        assert_eq!(r.counts.replies, 1);
        assert_eq!(h.calls(), vec!["e1"]);
        let h1 = ScopedKeyHash::new("s", &IdempotencyKey(b"e1".to_vec()));
        let stored = p.store.find(&h1).unwrap().unwrap().1.response.unwrap();
        assert_eq!(stored.status, 200);
        assert_eq!(stored.body, b"done");
        assert!(stored.truncated);
        assert_eq!(stored.digest, Fingerprint::of(b"done e1").0.to_vec());
    }
}
