//! One batch: decide every message's outcome, then make the outcomes durable
//! in order — dead letters acknowledged, then one RocksDB write with the WAL
//! synced — and only then report the offsets that may be committed.
//!
//! Guarantee: [`BatchProcessor::process`] either returns the next offset of
//! every partition in the batch with every outcome durable, or returns an
//! error having written nothing to the store (dead letters may have been
//! written; they are at-least-once). A key seen twice within one batch, on one
//! partition or two, reaches the handler once.

use crate::config::BucketClock;
use crate::dlq::{DeadLetter, DeadLetterKind, DeadLetters};
use crate::handler::{Delivery, Handler, Verdict};
use crate::key::Fingerprint;
use crate::pipeline::decide::{Decider, Decision};
use crate::pipeline::rebalance::TopicPartition;
use crate::pipeline::stats::{BatchCounts, Counted};
use crate::proto::{DedupRecord, RecordOutcome};
use crate::store::{DedupStore, StoreBatch};
use anyhow::Context as _;
use rdkafka::message::{Headers as _, Message as _, OwnedMessage};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Decides outcomes and writes batches for one worker.
pub struct BatchProcessor {
    /// The worker's store.
    pub store: Arc<DedupStore>,
    /// The handler of new messages.
    pub handler: Box<dyn Handler>,
    /// Dead-letter producer.
    pub dead_letters: DeadLetters,
    /// How keys are derived, scoped and payloads decoded.
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
}

/// What a durable batch lets the caller commit and count.
pub struct BatchResult {
    /// Next offset (last + 1) per partition.
    pub next_offsets: BTreeMap<TopicPartition, i64>,
    /// Counts, for [`crate::pipeline::stats::Stats`].
    pub counts: BatchCounts,
    /// The outcome of each message, in the order given.
    pub outcomes: Vec<MessageOutcome>,
}

/// The outcome of one message of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageOutcome {
    /// What happened to it.
    pub counted: Counted,
    /// True when it was keyed by topic/partition/offset.
    pub unkeyed: bool,
}

fn headers_of(msg: &OwnedMessage) -> Vec<(String, Option<Vec<u8>>)> {
    msg.headers()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default()
}

impl BatchProcessor {
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

    /// Decides, writes and returns the committable offsets of `messages`
    /// (each partition's messages in offset order).
    pub fn process(&mut self, messages: &[OwnedMessage]) -> anyhow::Result<BatchResult> {
        let (max_bytes, drop_oldest) = self.size_cap;
        let mut counts = BatchCounts::default();
        if max_bytes > 0 {
            let dropped = self
                .store
                .enforce_size_cap(max_bytes, drop_oldest)
                .context("checking max_store_bytes (nothing of this batch was handled)")?;
            counts.early_bucket_drops = dropped.len() as u64;
        }
        let now = self.store.processing_time();
        let bucket = self.store.bucket_for(now);
        let mut batch = StoreBatch::new();
        let mut letters = Vec::new();
        let mut outcomes = Vec::with_capacity(messages.len());
        let mut next_offsets = BTreeMap::new();

        // Every key first, then one batched read per bucket for all of them.
        let (prepared, stored) = self
            .decider
            .prepare_batch(messages, &self.store)
            .with_context(|| {
                format!(
                    "looking up the keys of a batch of {} messages",
                    messages.len()
                )
            })?;

        for (msg, prepared) in messages.iter().zip(prepared) {
            next_offsets.insert((msg.topic().to_string(), msg.partition()), msg.offset() + 1);
            let decision = self.decider.complete(
                msg,
                prepared,
                |h| batch.staged_record(h).cloned(),
                &stored,
                now,
            );
            let unkeyed = decision.unkeyed();
            if unkeyed {
                counts.unkeyed += 1;
                tracing::debug!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(),
                    "unkeyed message: using topic/partition/offset, which catches redeliveries but not producer duplicates");
            }
            let outcome = match decision {
                Decision::Tombstone => {
                    letters.push(self.letter(
                        msg,
                        DeadLetterKind::Tombstone,
                        "null payload (tombstone)".into(),
                    ));
                    Counted::Tombstone
                }
                Decision::Undecodable(e) => {
                    letters.push(self.letter(
                        msg,
                        DeadLetterKind::Undecodable,
                        format!("undecodable payload: {e}"),
                    ));
                    Counted::Undecodable
                }
                Decision::BadKey(e) => {
                    letters.push(self.letter(
                        msg,
                        DeadLetterKind::BadKey,
                        format!("no usable idempotency key: {e}"),
                    ));
                    Counted::BadKey
                }
                Decision::Duplicate { first, hash, .. } => {
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
                    if first.source_partition != msg.partition()
                        || first.source_topic != msg.topic()
                    {
                        counts.cross_partition += 1;
                        tracing::warn!(topic = msg.topic(), partition = msg.partition(), offset = msg.offset(),
                            first_topic = %first.source_topic, first_partition = first.source_partition,
                            "duplicate arrived on another partition than its first copy: this topic is keyed so that a scaled-out group cannot dedup it");
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
                Decision::New(fresh) => {
                    let delivery = Delivery {
                        topic: msg.topic(),
                        partition: msg.partition(),
                        offset: msg.offset(),
                        timestamp_ms: msg.timestamp().to_millis(),
                        key: &fresh.key,
                        key_source: fresh.source,
                        payload: msg.payload().unwrap_or_default(),
                        decoded: &fresh.decoded,
                    };
                    let mut txn = batch.handler_txn(&self.store);
                    let verdict = self.handler.handle(&delivery, &mut txn).with_context(|| {
                        format!(
                            "handler `{}` failed on {}/{}@{}",
                            self.handler.name(),
                            msg.topic(),
                            msg.partition(),
                            msg.offset()
                        )
                    })?;
                    let (counted, recorded) = match verdict {
                        Verdict::Handled => {
                            txn.keep();
                            (Counted::Handled, RecordOutcome::Handled)
                        }
                        Verdict::Rejected(reason) => {
                            drop(txn);
                            letters.push(self.letter(
                                msg,
                                DeadLetterKind::Rejected,
                                format!("handler rejected: {reason}"),
                            ));
                            (Counted::Rejected, RecordOutcome::Rejected)
                        }
                    };
                    let filed_in = match self.bucket_clock {
                        BucketClock::Processing => bucket,
                        BucketClock::Event => {
                            let window = self.store.options().window_ms;
                            match msg.timestamp().to_millis().filter(|&ts| ts >= 0) {
                                Some(ts) if ts <= now && ts > now - window => {
                                    self.store.bucket_for(ts)
                                }
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
                    };
                    batch.record(
                        fresh.hash,
                        filed_in,
                        DedupRecord {
                            fingerprint: fresh.fingerprint.0.to_vec(),
                            first_seen_ms: now,
                            source_topic: msg.topic().to_string(),
                            source_partition: msg.partition(),
                            source_offset: msg.offset(),
                            outcome: recorded as i32,
                            refreshed_ms: 0,
                        },
                    );
                    counted
                }
            };
            counts.count(outcome);
            outcomes.push(MessageOutcome {
                counted: outcome,
                unkeyed,
            });
        }

        if counts.event_time_fallbacks > 0 {
            tracing::warn!(
                count = counts.event_time_fallbacks,
                "bucket_clock = event: records filed by the processing clock because their message timestamp was missing, in the future or older than the window"
            );
        }
        for ((topic, partition), next) in &next_offsets {
            let name = format!("{}{topic}", self.checkpoint_prefix);
            batch.checkpoint(&name, *partition, *next);
        }
        if !letters.is_empty() {
            self.dead_letters
                .send_all(&letters)
                .context("writing dead letters (nothing of this batch was committed)")?;
            counts.dead_letters = letters.len() as u64;
        }
        self.store.commit(batch).context(
            "writing the batch to the dedup store (nothing of this batch was committed)",
        )?;
        Ok(BatchResult {
            next_offsets,
            counts,
            outcomes,
        })
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
    use crate::handler::HandlerTxn;
    use crate::key::{IdempotencyKey, KeyRule, ScopedKeyHash};
    use crate::payload::PayloadFormat;
    use crate::pipeline::decide::TopicRule;
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
        let p = BatchProcessor {
            store,
            handler: Box::new(handler),
            dead_letters: DeadLetters::new(&config).unwrap(),
            decider: Decider::new(TopicRule {
                key_rule: KeyRule {
                    header: Some("Idempotency-Key".into()),
                    field: Some("/event_id".into()),
                    composite: None,
                },
                scope: "s".into(),
                format: PayloadFormat::Auto,
                window_ms: None,
            }),
            dlq_topic: Box::new(|t: &str| format!("{t}.dlq")),
            checkpoint_prefix: String::new(),
            refresh_on_duplicate,
            bucket_clock: BucketClock::Processing,
            size_cap: (0, false),
        };
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
            p.handler = Box::new(Counting(calls.clone(), None));
            let m = [msg(0, 0, &event("e1", 10))];
            p.process(&m).unwrap();
            // Seen again 20 h later: a duplicate either way.
            clock.advance(20 * HOUR);
            let r = p.process(&m).unwrap();
            assert_eq!(r.outcomes[0].counted, Counted::Duplicate);
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
                r.outcomes[0].counted, expected,
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
        p.handler = Box::new(Counting(calls.clone(), None));
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
        let outcome =
            |p: &mut BatchProcessor, m: OwnedMessage| p.process(&[m]).unwrap().outcomes[0].counted;
        assert_eq!(outcome(&mut p, on("t", 0)), Counted::Handled);
        assert_eq!(outcome(&mut p, on("u", 0)), Counted::Handled); // another scope
        clock.advance(HOUR);
        assert_eq!(outcome(&mut p, on("u", 1)), Counted::Duplicate);
        clock.advance(2 * HOUR);
        assert_eq!(outcome(&mut p, on("u", 2)), Counted::Handled); // ship's 2 h are over
        assert_eq!(outcome(&mut p, on("t", 1)), Counted::Duplicate); // the store's 24 h are not
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }
}
