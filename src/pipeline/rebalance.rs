//! Partition assignment and revocation.
//!
//! Guarantees:
//! - On assignment a partition starts at the later of the store's checkpoint
//!   and the group's committed offset: a worker that crashed between its
//!   durable write and its Kafka commit does not re-read what it already
//!   recorded, and a store restored from an old backup does not rewind the
//!   group (it starts at the committed offset and says so).
//! - A start at the store's checkpoint is first compared with the log
//!   ([`super::truncation`]): when the brokers rewrote the log below it, the
//!   partition starts at the newest earlier checkpoint that still matches
//!   (and that offset is committed), or, when none does, it is held for the
//!   operator, paused.
//! - With the changelog on, each partition is restored from its changelog
//!   ([`crate::changelog::restore`]) before it is assigned, so nothing of it
//!   is fetched before its keys are in the store; one that cannot be
//!   restored is not taken, and the worker stops (`idem run` starts a new
//!   one, with backoff).
//! - With `resume_from = "group"` the committed offset alone decides, so an
//!   operator's deliberate rewind replays messages (as duplicates).
//! - On revocation the pipeline is between batches (the rebalance callback runs
//!   inside `poll`, and every batch is written before the next poll), and the
//!   revoked partitions' durable offsets are committed synchronously before
//!   they are given up, so the next owner starts after everything handled
//!   here (unless the assignment was lost: then the commit would be refused
//!   anyway). Messages fetched but not yet started for a revoked partition
//!   are dropped unhandled, for the new owner to handle.
//! - Offsets are otherwise committed asynchronously; a commit that fails is
//!   reported here and the loop commits the latest durable offsets again,
//!   never older ones.

use super::stats::Stats;
use super::truncation::{self, Log, Verdict};
use crate::changelog::restore::Restorer;
use crate::changelog::ChangelogWriter;
use crate::config::ResumeFrom;
use crate::store::DedupStore;
use crate::telemetry::metrics;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A topic and partition.
pub type TopicPartition = (String, i32);

/// What the pipeline needs to know about the assignment, updated by the
/// rebalance callback and read by the loop on the same thread.
#[derive(Debug, Default)]
pub struct Assignment {
    /// Partitions currently owned, with the offset they started at (`None`
    /// when Kafka's reset policy decides).
    pub owned: HashMap<TopicPartition, Option<i64>>,
    /// Partitions revoked since the loop last looked.
    pub revoked: HashSet<TopicPartition>,
    /// Offsets to commit because the store was ahead of Kafka at assignment.
    pub commit_now: HashMap<TopicPartition, i64>,
    /// Next offset to process of each owned partition whose outcomes are
    /// durable: what a revocation commits. Written by the loop.
    pub durable: HashMap<TopicPartition, i64>,
    /// Next offset to process of each owned partition whose outcomes are
    /// written, perhaps not yet synced (`overlap_wal_sync`): what a
    /// revocation commits once it has synced the store itself.
    pub written: HashMap<TopicPartition, i64>,
    /// The last asynchronous commit failed with this error (taken by the
    /// loop, which commits its latest offsets again).
    pub commit_failed: Option<String>,
    /// Partitions found rewritten below every checkpoint kept, to be held
    /// by the loop (paused), with the reason.
    pub held: HashMap<TopicPartition, String>,
    /// Times every broker connection was reported down.
    pub outages: u64,
    /// Rebalances seen.
    pub generation: u64,
    /// A partition's changelog could not be restored: it was not taken
    /// (never fetched), and the loop stops the worker with this error
    /// (`idem run` starts a new one, with backoff, which restores again).
    pub restore_failed: Option<String>,
    /// Asynchronous commits answered (either way) by the brokers.
    pub commits_answered: u64,
    /// The fencing token of each owned partition (with the changelog on).
    pub tokens: HashMap<TopicPartition, i64>,
    /// When the group last confirmed this worker's membership: the sending
    /// of a commit answered without error, or an assignment.
    pub confirmed_at: Option<std::time::Instant>,
    /// When each asynchronous commit not answered yet was sent, oldest
    /// first (the coordinator answers them in order). A commit answered
    /// after a stall proves the membership only as of its sending.
    pub commits_sent_at: std::collections::VecDeque<std::time::Instant>,
}

/// Most sending times kept for commits not answered (commits whose answers
/// never come would otherwise grow the list).
const MAX_COMMITS_UNANSWERED: usize = 4096;

impl Assignment {
    /// Notes an asynchronous commit sent now.
    pub fn commit_sent(&mut self) {
        if self.commits_sent_at.len() >= MAX_COMMITS_UNANSWERED {
            self.commits_sent_at.pop_front();
        }
        self.commits_sent_at.push_back(std::time::Instant::now());
    }
}

/// The consumer context: chooses start offsets and tracks the assignment.
pub struct IdemContext {
    store: Arc<DedupStore>,
    assignment: Arc<Mutex<Assignment>>,
    resume_from: ResumeFrom,
    health: Option<Arc<crate::telemetry::server::Health>>,
    log: Option<Arc<dyn Log + Send + Sync>>,
    stats: Option<Arc<Stats>>,
    /// Restores each assigned partition from its changelog (source topic →
    /// changelog topic).
    changelog: Option<(Restorer, HashMap<String, String>)>,
    /// Writes each assigned partition's claim (its fencing token), as
    /// `member`.
    claims: Option<(Arc<ChangelogWriter>, String)>,
}

impl IdemContext {
    /// A context over `store` publishing to `assignment`.
    pub fn new(
        store: Arc<DedupStore>,
        assignment: Arc<Mutex<Assignment>>,
        resume_from: ResumeFrom,
    ) -> Self {
        Self {
            store,
            assignment,
            resume_from,
            health: None,
            log: None,
            stats: None,
            changelog: None,
            claims: None,
        }
    }

    /// Claims every assigned partition in its changelog, as `member`, after
    /// its restore: the claim's offset is the fencing token of the
    /// assignment.
    pub fn with_claims(mut self, writer: Arc<ChangelogWriter>, member: String) -> Self {
        self.claims = Some((writer, member));
        self
    }

    /// Restores every assigned partition from its changelog (`topics`: source
    /// topic → changelog topic) before it is handled.
    pub fn with_changelog(mut self, restorer: Restorer, topics: HashMap<String, String>) -> Self {
        self.changelog = Some((restorer, topics));
        self
    }

    /// Restores the partitions about to be assigned; when some cannot be
    /// restored, returns the list without them (so they are never fetched)
    /// and reports them. `tpl` itself belongs to librdkafka's rebalance
    /// event and is never replaced.
    fn restore(
        &self,
        tpl: &TopicPartitionList,
        starts: &[(TopicPartition, Option<i64>)],
    ) -> Option<TopicPartitionList> {
        let Some((restorer, topics)) = &self.changelog else {
            return None;
        };
        let mut failed = Vec::new();
        for ((topic, partition), start) in starts {
            let Some(changelog) = topics.get(topic) else {
                continue;
            };
            let restored = restorer
                .restore(&self.store, changelog, topic, *partition, *start)
                .and_then(|done| {
                    if let Some(st) = &self.stats {
                        st.restored(done.records);
                    }
                    match &self.claims {
                        // Once more when it fails: a producer that failed
                        // for good has been replaced by then.
                        Some((writer, member)) => writer
                            .claim(topic, *partition, member, self.store.processing_time())
                            .or_else(|e| {
                                tracing::warn!(%topic, partition, error = %format!("{e:#}"), "claiming the partition failed; trying once more");
                                writer.claim(topic, *partition, member, self.store.processing_time())
                            })
                            .map(Some),
                        None => Ok(None),
                    }
                });
            match restored {
                Ok(token) => {
                    if let Some(token) = token {
                        tracing::info!(%topic, partition, fencing_token = token, "partition claimed");
                        if let Err(e) = self.store.advance_changelog_position(
                            topic,
                            *partition,
                            token,
                            token + 1,
                        ) {
                            tracing::debug!(%topic, partition, error = %e, "recording the claim in the changelog position");
                        }
                        self.assignment
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .tokens
                            .insert((topic.clone(), *partition), token);
                    }
                }
                Err(e) => {
                    let text =
                        format!("restoring {topic}/{partition} from changelog {changelog}: {e:#}");
                    tracing::error!(error = %text, "a partition's changelog could not be restored: it is not taken, and the worker stops; a new one joins and restores again (with backoff)");
                    failed.push(((topic.clone(), *partition), text));
                }
            }
        }
        if failed.is_empty() {
            return None;
        }
        let mut kept = TopicPartitionList::new();
        for e in tpl.elements() {
            if failed
                .iter()
                .any(|((t, p), _)| t == e.topic() && *p == e.partition())
            {
                continue;
            }
            let _ = kept.add_partition_offset(e.topic(), e.partition(), e.offset());
        }
        let mut state = self.assignment.lock().unwrap_or_else(|e| e.into_inner());
        for (tp, text) in failed {
            state.owned.remove(&tp);
            state.commit_now.remove(&tp);
            state.restore_failed.get_or_insert(text);
        }
        Some(kept)
    }

    /// Compares each start at a store checkpoint with `log` first.
    pub fn with_log_check(mut self, log: Arc<dyn Log + Send + Sync>) -> Self {
        self.log = Some(log);
        self
    }

    /// Counts what the assignment finds (rewritten logs) in `stats`.
    pub fn with_stats(mut self, stats: Arc<Stats>) -> Self {
        self.stats = Some(stats);
        self
    }

    /// The offset to start a partition at whose store checkpoint is `s`:
    /// `s` when the log still holds what the checkpoint recorded (or when
    /// that cannot be told), else the newest earlier checkpoint that
    /// matches; a partition rewritten below every checkpoint is put in
    /// `state.held`.
    fn checked_start(&self, topic: &str, partition: i32, s: i64, state: &mut Assignment) -> i64 {
        let Some(log) = &self.log else {
            return s;
        };
        let cp = match self.store.checkpoint_detail(topic, partition) {
            Ok(Some(cp)) => cp,
            Ok(None) => return s,
            Err(e) => {
                tracing::warn!(%topic, partition, error = %e, "cannot read the store checkpoint to compare it with the log");
                return s;
            }
        };
        let tp = (topic.to_string(), partition);
        match truncation::verify(log.as_ref(), topic, partition, &cp) {
            Ok(Verdict::Intact) => s,
            Ok(Verdict::Unverifiable(why)) => {
                tracing::debug!(%topic, partition, checkpoint = s, why, "checkpoint not compared with the log");
                s
            }
            Ok(Verdict::Rewritten { checkpoint, resume }) => {
                let to = resume.next_offset;
                tracing::error!(%topic, partition, checkpoint, resume_at = to,
                    "the brokers rewrote this partition's log below the store checkpoint (acknowledged messages lost and their offsets reused): resuming at the newest earlier checkpoint that still matches the log; offsets {to}..{checkpoint} are read again (keys already recorded resolve as duplicates)");
                if let Err(e) = self.store.rewind_checkpoint(topic, partition, &resume) {
                    tracing::error!(%topic, partition, error = %e, "cannot move the store checkpoint back; the next durable batch does");
                }
                metrics::log_rewritten(topic, partition, "resumed");
                if let Some(st) = &self.stats {
                    st.log_rewritten(false);
                }
                state.commit_now.insert(tp, to);
                to
            }
            Ok(Verdict::Unresolved {
                checkpoint,
                oldest_mark,
            }) => {
                let why = format!(
                    "the log of {topic}/{partition} was rewritten below the store checkpoint {checkpoint} and below every earlier checkpoint kept (the oldest at {}): no offset is known to be safe to resume at",
                    oldest_mark.map_or("none".to_string(), |o| o.to_string())
                );
                tracing::error!(%topic, partition, checkpoint, reason = %why,
                    "holding the partition: choose where it resumes by setting the group's committed offset and starting once with resume_from = \"group\"");
                metrics::log_rewritten(topic, partition, "held");
                if let Some(st) = &self.stats {
                    st.log_rewritten(true);
                }
                state.held.insert(tp, why);
                s
            }
            Err(e) => {
                tracing::warn!(%topic, partition, checkpoint = s, error = %format!("{e:#}"),
                    "cannot compare the store checkpoint with the log; starting at it unverified");
                s
            }
        }
    }

    /// Reports broker trouble (all brokers down) to `/readyz`.
    pub fn with_health(mut self, health: Arc<crate::telemetry::server::Health>) -> Self {
        self.health = Some(health);
        self
    }

    /// Sets each partition's start offset in `tpl`, restores the partitions
    /// from their changelogs, and returns the list to assign instead of
    /// `tpl` when some could not be restored.
    fn choose_start_offsets(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &mut TopicPartitionList,
    ) -> Option<TopicPartitionList> {
        let committed = consumer.committed_offsets(tpl.clone(), Duration::from_secs(10));
        if let Err(e) = &committed {
            tracing::warn!(error = %e, "could not read the group's committed offsets; using the store's checkpoints");
        }
        let mut state = self.assignment.lock().unwrap_or_else(|e| e.into_inner());
        state.generation += 1;
        state.confirmed_at = Some(std::time::Instant::now());
        let mut starts = Vec::new();
        for elem in tpl.elements() {
            let (topic, partition) = (elem.topic().to_string(), elem.partition());
            let kafka = committed.as_ref().ok().and_then(|c| {
                match c.find_partition(&topic, partition).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => Some(o),
                    _ => None,
                }
            });
            let stored = match self.store.checkpoint(&topic, partition) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(%topic, partition, error = %e, "cannot read the store checkpoint");
                    None
                }
            };
            let start = match (stored, kafka) {
                (_, k) if self.resume_from == ResumeFrom::Group => k,
                (Some(s), Some(k)) if s > k => {
                    tracing::info!(%topic, partition, store = s, committed = k,
                        "store is ahead of the group's committed offset (a crash after the durable write); starting at the store checkpoint");
                    state.commit_now.insert((topic.clone(), partition), s);
                    Some(self.checked_start(&topic, partition, s, &mut state))
                }
                (Some(s), None) => {
                    tracing::info!(%topic, partition, store = s,
                        "the group has no committed offset but the store has a checkpoint (a crash before the first commit); starting at the store checkpoint");
                    state.commit_now.insert((topic.clone(), partition), s);
                    Some(self.checked_start(&topic, partition, s, &mut state))
                }
                (Some(s), Some(k)) if s == k => {
                    Some(self.checked_start(&topic, partition, s, &mut state))
                }
                (Some(s), Some(k)) if s < k => {
                    metrics::store_behind(&topic, partition);
                    tracing::warn!(%topic, partition, store = s, committed = k,
                        "store checkpoint is behind the group's committed offset (store restored from an older copy, or another worker handled this partition): the keys of offsets {s}..{k} are not in this store; starting at the committed offset, never reprocessing them");
                    Some(k)
                }
                (None, Some(k)) => {
                    metrics::store_behind(&topic, partition);
                    tracing::warn!(%topic, partition, committed = k,
                        "the store has no checkpoint for this partition but the group has committed offset {k} (a new, missing or replaced store): keys recorded before are not known here; starting at the committed offset");
                    Some(k)
                }
                (s, k) => s.or(k),
            };
            let tp = (topic, partition);
            state.revoked.remove(&tp);
            state.owned.insert(tp.clone(), start);
            starts.push((tp, start));
        }
        drop(state);
        for ((topic, partition), start) in &starts {
            if let Some(o) = start {
                if let Err(e) = tpl.set_partition_offset(topic, *partition, Offset::Offset(*o)) {
                    tracing::error!(%topic, partition, error = %e, "cannot set the start offset");
                }
            }
        }
        self.restore(tpl, &starts)
    }

    fn note_revoked(&self, tpl: &TopicPartitionList) {
        let mut state = self.assignment.lock().unwrap_or_else(|e| e.into_inner());
        state.generation += 1;
        for e in tpl.elements() {
            let tp = (e.topic().to_string(), e.partition());
            state.owned.remove(&tp);
            state.commit_now.remove(&tp);
            state.tokens.remove(&tp);
            state.durable.remove(&tp);
            state.written.remove(&tp);
            state.held.remove(&tp);
            state.revoked.insert(tp);
        }
    }
}

impl ClientContext for IdemContext {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::types::RDKafkaErrorCode;
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            // librdkafka repeats this while the brokers stay away: one line
            // when it starts, the rest at debug.
            let first = self.health.as_ref().is_none_or(|h| !h.brokers_down());
            if let Some(h) = &self.health {
                h.set_brokers_down(format!("all brokers are down: {reason}"));
            }
            if first {
                // The loop compares its checkpoints with the log before it
                // handles anything fetched after this.
                self.assignment
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .outages += 1;
                tracing::error!(%reason, "all Kafka brokers are down; waiting for them (offsets stay durable in the store)");
            } else {
                tracing::debug!(%reason, "all Kafka brokers are still down");
            }
            return;
        }
        tracing::error!(error = %error, %reason, "Kafka client error");
    }
}

impl IdemContext {
    /// Commits, synchronously, the durable offsets of partitions about to
    /// be given up, so that their next owner starts after them.
    fn commit_revoked(&self, consumer: &BaseConsumer<Self>, revoked: &TopicPartitionList) {
        if consumer.assignment_lost() || self.health.as_ref().is_some_and(|h| h.brokers_down()) {
            return;
        }
        // Batches written but not yet synced become durable here, so that
        // the next owner starts after them too.
        let synced = match self.store.sync_wal() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "cannot sync the store before giving partitions up; committing what was synced before");
                false
            }
        };
        let mut tpl = TopicPartitionList::new();
        {
            let state = self.assignment.lock().unwrap_or_else(|e| e.into_inner());
            let offsets = if synced {
                &state.written
            } else {
                &state.durable
            };
            for e in revoked.elements() {
                if let Some(next) = offsets.get(&(e.topic().to_string(), e.partition())) {
                    let _ =
                        tpl.add_partition_offset(e.topic(), e.partition(), Offset::Offset(*next));
                }
            }
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = consumer.commit(&tpl, rdkafka::consumer::CommitMode::Sync) {
            tracing::warn!(error = %e, partitions = tpl.count(),
                "committing revoked partitions failed; their next owner re-reads from the last commit (duplicates, recognised where the keys are known)");
        }
    }
}

impl ConsumerContext for IdemContext {
    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        let sent_at = {
            let mut state = self.assignment.lock().unwrap_or_else(|e| e.into_inner());
            state.commits_answered += 1;
            state.commits_sent_at.pop_front()
        };
        match result {
            Ok(()) => {
                // Dated by its sending: a commit sent before a stall and
                // answered after it says nothing of the membership now. An
                // answer to a commit not noted (the synchronous one of a
                // revocation) confirms nothing.
                if let Some(sent_at) = sent_at {
                    let mut state = self.assignment.lock().unwrap_or_else(|e| e.into_inner());
                    state.confirmed_at =
                        Some(state.confirmed_at.map_or(sent_at, |c| c.max(sent_at)));
                }
                if let Some(h) = &self.health {
                    h.set_broker_trouble(None);
                }
            }
            Err(rdkafka::error::KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "offset commit failed; the latest durable offsets are committed again");
                if let Some(h) = &self.health {
                    h.set_broker_trouble(Some(format!("offset commits fail: {e}")));
                }
                self.assignment
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .commit_failed = Some(e.to_string());
            }
        }
    }

    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result: KafkaResult<()> = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let kept = self.choose_start_offsets(consumer, tpl);
                let assign: &TopicPartitionList = kept.as_ref().unwrap_or(tpl);
                tracing::info!(partitions = assign.count(), "partitions assigned");
                if cooperative {
                    consumer.incremental_assign(assign)
                } else {
                    consumer.assign(assign)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.commit_revoked(consumer, tpl);
                self.note_revoked(tpl);
                tracing::info!(partitions = tpl.count(), "partitions revoked");
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                self.note_revoked(tpl);
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "applying the rebalance failed");
        }
    }
}
