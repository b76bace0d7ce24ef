//! Notices a partition's log rewritten below the store's checkpoint, and
//! finds where to resume.
//!
//! A broker that loses acknowledged messages (a crash before they reached
//! disk or another replica, an unclean leader election) hands their offsets
//! to the next messages it is sent. idem trusts offsets: a checkpoint past
//! such an offset would skip the new message there, for ever and silently.
//! So every checkpoint carries the identity of the message before it (its
//! key, payload and timestamp, hashed: [`mark_of`]) and a history of earlier
//! checkpoints (marks, at least a second apart: see
//! [`crate::store::MARK_SPACING_MS`]).
//!
//! Guarantees:
//! - [`verify`] compares the log with the checkpoint and its marks, newest
//!   first. A checkpoint whose message is still there is intact. One whose
//!   message differs, or whose offset is past the end of the log, was
//!   rewritten: the newest mark that still matches is where to resume, and
//!   every message after it is read again, so those already recorded are
//!   duplicates and the new ones are handled.
//! - When no mark matches, there is no offset known to be safe: the verdict
//!   says so, and the worker holds the partition for the operator rather
//!   than guess (re-reading from the start could re-apply messages older
//!   than the dedup window; resuming at the end would skip).
//! - A message that is gone because retention deleted it cannot be compared:
//!   the checkpoint is then taken as it is ([`Verdict::Unverifiable`]).
//!
//! When it runs: on assignment (the checkpoint decides the start offset) and
//! after all brokers were unreachable. A leader change inside a cluster that
//! stays reachable is not noticed here; Kafka with `acks=all` and no
//! unclean leader election does not lose acknowledged messages.

use crate::proto::{Checkpoint, CheckpointMark};
use anyhow::Context as _;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::Message;
use std::time::{Duration, Instant};
use xxhash_rust::xxh3::Xxh3;

/// How long one look-up of a message may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The identity of a message: a 128-bit hash of its key, payload and
/// timestamp (a re-sent event has the same key and payload, but not the
/// same timestamp).
pub fn mark_of<M: Message>(m: &M) -> [u8; 16] {
    let mut h = Xxh3::new();
    let key = m.key().unwrap_or_default();
    let payload = m.payload().unwrap_or_default();
    h.update(&(key.len() as u64).to_be_bytes());
    h.update(key);
    h.update(&(payload.len() as u64).to_be_bytes());
    h.update(payload);
    h.update(&m.timestamp().to_millis().unwrap_or(-1).to_be_bytes());
    h.digest128().to_be_bytes()
}

/// What a partition's log holds at an offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// A message with this identity.
    Message([u8; 16]),
    /// Nothing any more: below the log start (retention), or not a message
    /// (compaction, a transaction marker).
    Gone,
    /// Nothing yet: at or past the end of the log.
    Beyond,
}

/// Reads single messages of a partition's log.
pub trait Log {
    /// What the log of `topic`/`partition` holds at `offset`.
    fn at(&self, topic: &str, partition: i32, offset: i64) -> anyhow::Result<Seen>;
}

/// The outcome of comparing a checkpoint with the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The message before the checkpoint is the one recorded.
    Intact,
    /// Nothing to compare (no identity recorded, or the message is gone).
    Unverifiable(&'static str),
    /// The log was rewritten below the checkpoint; resume at this mark.
    Rewritten {
        /// The checkpoint's offset.
        checkpoint: i64,
        /// The newest mark whose message is still the one recorded.
        resume: CheckpointMark,
    },
    /// The log was rewritten below the checkpoint and below every mark.
    Unresolved {
        /// The checkpoint's offset.
        checkpoint: i64,
        /// The oldest mark compared.
        oldest_mark: Option<i64>,
    },
}

/// Compares `cp` (of `topic`/`partition`) with the log; see the module
/// documentation.
pub fn verify(
    log: &dyn Log,
    topic: &str,
    partition: i32,
    cp: &Checkpoint,
) -> anyhow::Result<Verdict> {
    let head = CheckpointMark {
        next_offset: cp.next_offset,
        last_message: cp.last_message.clone(),
        written_at_ms: cp.written_at_ms,
    };
    let mut diverged = false;
    let mut oldest = None;
    for (i, mark) in std::iter::once(&head).chain(&cp.history).enumerate() {
        if mark.next_offset <= 0 {
            // Nothing before it: any log holds "nothing" there.
            return Ok(if diverged {
                rewritten(cp, mark)
            } else {
                Verdict::Intact
            });
        }
        if mark.last_message.is_empty() {
            // An identity unknown (the head only): the log's end still
            // tells a truncation below it.
            if i == 0 && log.at(topic, partition, mark.next_offset - 1)? == Seen::Beyond {
                diverged = true;
            }
            continue;
        }
        oldest = Some(mark.next_offset);
        match log.at(topic, partition, mark.next_offset - 1)? {
            Seen::Message(m) if m.as_slice() == mark.last_message.as_slice() => {
                return Ok(if diverged {
                    rewritten(cp, mark)
                } else {
                    Verdict::Intact
                });
            }
            Seen::Gone if !diverged => {
                return Ok(Verdict::Unverifiable(
                    "the message before the checkpoint is no longer in the log",
                ))
            }
            // Below a rewrite, a message that is gone cannot vouch for
            // anything: keep looking further back.
            Seen::Gone | Seen::Message(_) | Seen::Beyond => diverged = true,
        }
    }
    if !diverged {
        return Ok(Verdict::Unverifiable(
            "the checkpoint carries no message identity",
        ));
    }
    Ok(Verdict::Unresolved {
        checkpoint: cp.next_offset,
        oldest_mark: oldest,
    })
}

fn rewritten(cp: &Checkpoint, mark: &CheckpointMark) -> Verdict {
    Verdict::Rewritten {
        checkpoint: cp.next_offset,
        resume: mark.clone(),
    }
}

/// A [`Log`] read from the brokers by a consumer of its own, outside the
/// group (it never joins it and never commits).
pub struct BrokerLog {
    consumer: BaseConsumer,
}

impl BrokerLog {
    /// A reader with the worker's broker settings (`base`, security
    /// included).
    pub fn new(base: ClientConfig) -> anyhow::Result<Self> {
        let consumer = crate::kafka::reader_config(base, "idem-log-check")
            .set("fetch.wait.max.ms", "100")
            .set("max.partition.fetch.bytes", "65536")
            .set("queued.max.messages.kbytes", "1024")
            .create()
            .context("creating the consumer that checks checkpoints against the log")?;
        Ok(Self { consumer })
    }
}

impl Log for BrokerLog {
    fn at(&self, topic: &str, partition: i32, offset: i64) -> anyhow::Result<Seen> {
        let (low, high) = self
            .consumer
            .fetch_watermarks(topic, partition, LOOKUP_TIMEOUT)
            .with_context(|| format!("reading the offsets of {topic}/{partition}"))?;
        if offset >= high {
            return Ok(Seen::Beyond);
        }
        if offset < low {
            return Ok(Seen::Gone);
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
            .with_context(|| format!("reading {topic}/{partition} at {offset}"))?;
        self.consumer
            .assign(&tpl)
            .with_context(|| format!("reading {topic}/{partition} at {offset}"))?;
        let until = Instant::now() + LOOKUP_TIMEOUT;
        let seen = loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(anyhow::anyhow!(
                    "no answer within {} s reading {topic}/{partition} at offset {offset}",
                    LOOKUP_TIMEOUT.as_secs()
                ));
            }
            match self.consumer.poll(left.min(Duration::from_millis(200))) {
                Some(Ok(m)) if m.topic() == topic && m.partition() == partition => {
                    break Ok(if m.offset() == offset {
                        Seen::Message(mark_of(&m))
                    } else {
                        Seen::Gone
                    });
                }
                Some(Ok(_)) | None => {}
                // The client's own reports (a broker connection lost and
                // retried) are not about this read: it goes on until its
                // deadline.
                Some(Err(e)) => {
                    tracing::debug!(%topic, partition, offset, error = %e, "while reading one message");
                }
            }
        };
        let _ = self.consumer.unassign();
        seen
    }
}

#[cfg(test)]
mod tests {
    //! The verdicts against a log held in memory (a stand-in for the broker
    //! in this unit test of our own logic); the broker path is tested in
    //! `tests/truncation.rs`.
    use super::*;
    use std::collections::BTreeMap;

    struct MemLog {
        start: i64,
        messages: BTreeMap<i64, [u8; 16]>,
    }

    impl Log for MemLog {
        fn at(&self, _: &str, _: i32, offset: i64) -> anyhow::Result<Seen> {
            let end = self
                .messages
                .keys()
                .next_back()
                .map_or(self.start, |o| o + 1);
            Ok(if offset >= end {
                Seen::Beyond
            } else if offset < self.start {
                Seen::Gone
            } else {
                self.messages
                    .get(&offset)
                    .map_or(Seen::Gone, |m| Seen::Message(*m))
            })
        }
    }

    fn id(n: u8) -> [u8; 16] {
        [n; 16]
    }

    /// A log of `len` messages, message `o` having identity `o % 200`, the
    /// ones from `rewritten_from` on replaced by `200 + o % 50`.
    fn log(len: i64, rewritten_from: i64) -> MemLog {
        let messages = (0..len)
            .map(|o| {
                let n = if o >= rewritten_from {
                    200 + o % 50
                } else {
                    o % 200
                };
                (o, id(n as u8))
            })
            .collect();
        MemLog { start: 0, messages }
    }

    fn mark(next: i64) -> CheckpointMark {
        CheckpointMark {
            next_offset: next,
            last_message: id(((next - 1) % 200) as u8).to_vec(),
            written_at_ms: next,
        }
    }

    /// The verdict for the checkpoint at 150 rewritten above the mark at
    /// `next`.
    fn resumes_at(next: i64) -> Verdict {
        Verdict::Rewritten {
            checkpoint: 150,
            resume: mark(next),
        }
    }

    /// A checkpoint at `next` with marks at `marks` (newest first), as the
    /// worker recorded them from the original log.
    fn checkpoint(next: i64, marks: &[i64]) -> Checkpoint {
        Checkpoint {
            next_offset: next,
            written_at_ms: next,
            last_message: mark(next).last_message,
            history: marks.iter().map(|m| mark(*m)).collect(),
            changelog_next: 0,
        }
    }

    #[test]
    fn an_untouched_log_is_intact() {
        let cp = checkpoint(150, &[120, 90]);
        assert_eq!(
            verify(&log(180, 1000), "t", 0, &cp).unwrap(),
            Verdict::Intact
        );
    }

    #[test]
    fn a_rewritten_tail_resumes_at_the_newest_mark_below_it() {
        let cp = checkpoint(150, &[120, 90, 60]);
        // Offsets from 100 on were rewritten: 120's message differs, 90's not.
        let v = verify(&log(180, 100), "t", 0, &cp).unwrap();
        assert_eq!(v, resumes_at(90));
    }

    #[test]
    fn a_log_truncated_below_the_checkpoint_resumes_at_a_mark_inside_it() {
        let cp = checkpoint(150, &[140, 110]);
        // The log now ends at 130 and is otherwise the same.
        let v = verify(&log(130, 1000), "t", 0, &cp).unwrap();
        assert_eq!(v, resumes_at(110));
    }

    #[test]
    fn a_rewrite_below_every_mark_is_unresolved() {
        let cp = checkpoint(150, &[120, 90]);
        let v = verify(&log(180, 10), "t", 0, &cp).unwrap();
        assert_eq!(
            v,
            Verdict::Unresolved {
                checkpoint: 150,
                oldest_mark: Some(90)
            }
        );
    }

    #[test]
    fn a_rewrite_of_the_whole_log_resumes_at_its_start() {
        // A mark at 0 would be "nothing before it", which every log holds.
        let cp = checkpoint(150, &[120, 0]);
        let v = verify(&log(180, 0), "t", 0, &cp).unwrap();
        assert_eq!(v, resumes_at(0));
    }

    #[test]
    fn a_message_deleted_by_retention_cannot_be_compared() {
        let cp = checkpoint(150, &[120]);
        let mut l = log(180, 1000);
        l.start = 160;
        l.messages.retain(|o, _| *o >= 160);
        assert_eq!(
            verify(&l, "t", 0, &cp).unwrap(),
            Verdict::Unverifiable("the message before the checkpoint is no longer in the log")
        );
    }

    #[test]
    fn a_checkpoint_without_identity_still_notices_a_truncated_log() {
        let mut cp = checkpoint(150, &[120]);
        cp.last_message.clear();
        assert_eq!(
            verify(&log(180, 1000), "t", 0, &cp).unwrap(),
            Verdict::Intact
        );
        let v = verify(&log(130, 1000), "t", 0, &cp).unwrap();
        assert_eq!(v, resumes_at(120));
        let mut bare = checkpoint(150, &[]);
        bare.last_message.clear();
        assert_eq!(
            verify(&log(180, 1000), "t", 0, &bare).unwrap(),
            Verdict::Unverifiable("the checkpoint carries no message identity")
        );
    }
}
