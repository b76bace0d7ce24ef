//! One batch: decide every message's outcome, then make the outcomes durable
//! in order — dead letters acknowledged, then one RocksDB write with the WAL
//! synced — and only then report the offsets that may be committed.
//!
//! Guarantee: [`BatchProcessor::process`] either returns the next offset of
//! every partition in the batch with every outcome durable, or returns an
//! error having written nothing to the store (dead letters may have been
//! written; they are at-least-once). A key seen twice within one batch, on one
//! partition or two, reaches the handler once.

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
        let now = self.store.processing_time();
        let bucket = self.store.bucket_for(now);
        let mut batch = StoreBatch::new();
        let mut letters = Vec::new();
        let mut counts = BatchCounts::default();
        let mut outcomes = Vec::with_capacity(messages.len());
        let mut next_offsets = BTreeMap::new();

        for msg in messages {
            next_offsets.insert((msg.topic().to_string(), msg.partition()), msg.offset() + 1);
            let decision = self
                .decider
                .decide(msg, |h| batch.staged_record(h).cloned(), &self.store)
                .with_context(|| {
                    format!(
                        "looking up the key of {}/{}@{}",
                        msg.topic(),
                        msg.partition(),
                        msg.offset()
                    )
                })?;
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
                Decision::Duplicate { first, .. } => {
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
                    batch.record(
                        fresh.hash,
                        bucket,
                        DedupRecord {
                            fingerprint: fresh.fingerprint.0.to_vec(),
                            first_seen_ms: now,
                            source_topic: msg.topic().to_string(),
                            source_partition: msg.partition(),
                            source_offset: msg.offset(),
                            outcome: recorded as i32,
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
    use crate::key::KeyRule;
    use crate::payload::PayloadFormat;
    use crate::proto::PaymentEvent;
    use crate::store::StoreOptions;
    use prost::Message as _;
    use rdkafka::message::Timestamp;
    use rdkafka::mocking::MockCluster;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts calls, then delegates to the ledger.
    struct Counting(Arc<AtomicUsize>, Ledger);

    impl Handler for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        fn column_families(&self) -> Vec<&'static str> {
            self.1.column_families()
        }
        fn handle(
            &mut self,
            d: &Delivery<'_>,
            txn: &mut HandlerTxn<'_>,
        ) -> anyhow::Result<Verdict> {
            self.0.fetch_add(1, Ordering::SeqCst);
            self.1.handle(d, txn)
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

    #[test]
    fn a_key_twice_in_one_batch_on_two_partitions_reaches_the_handler_once() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t.dlq", 2, 1).unwrap();
        let config = Config {
            brokers: cluster.bootstrap_servers(),
            topics: vec!["t".into()],
            ..Config::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let handler = Counting(calls.clone(), Ledger);
        let opts = StoreOptions {
            handler_cfs: handler.column_families(),
            ..StoreOptions::default()
        };
        let store = Arc::new(
            DedupStore::open(dir.path(), opts, Arc::new(ManualClock::new(1_000_000))).unwrap(),
        );
        let mut p = BatchProcessor {
            store: store.clone(),
            handler: Box::new(handler),
            dead_letters: DeadLetters::new(&config).unwrap(),
            decider: Decider {
                key_rule: KeyRule {
                    header: Some("Idempotency-Key".into()),
                    field: Some("/event_id".into()),
                },
                scope: "s".into(),
                format: PayloadFormat::Auto,
            },
            dlq_topic: Box::new(|t: &str| format!("{t}.dlq")),
            checkpoint_prefix: String::new(),
        };
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
}
