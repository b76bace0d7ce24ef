//! The changelog: every dedup record a worker writes is also produced to a
//! compacted topic partitioned like its source, so that a partition moving
//! to another worker (scale-out, deploy, crash) does not forget its keys.
//! The new owner restores the partition's records into its own store before
//! it handles that partition ([`restore`]).
//!
//! Guarantees:
//! - [`ChangelogWriter::send`] returns `Ok` only when the brokers have
//!   acknowledged every record of the batch (idempotent producer,
//!   `acks=all`). The pipeline writes the batch to the store and commits its
//!   offsets only after that, so a committed offset always has its records
//!   in the changelog (DESIGN.md, invariant 1).
//! - A record is produced only after its handler call returned, to the
//!   changelog partition of its source partition, and it carries its source
//!   offset, so a restore can leave out records of a batch whose store write
//!   may not have happened (see [`restore`]).
//! - Records are keyed by the 16-byte key hash: compaction keeps the latest
//!   record of each key, and `retention.ms` (window + bucket + margin)
//!   removes keys past the window.

pub mod restore;

use crate::config::Config;
use crate::kafka::producer_config;
use crate::key::ScopedKeyHash;
use crate::proto::ChangelogRecord;
use crate::store::{Bucket, StoreBatch};
use anyhow::Context as _;
use prost::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::{BTreeMap, HashMap};

/// The changelog topic of source `topic`, from the `changelog.topic`
/// template (`{group}` and `{topic}` replaced).
pub fn topic_for(template: &str, group: &str, topic: &str) -> String {
    template.replace("{group}", group).replace("{topic}", topic)
}

/// The record produced for one dedup record.
pub fn encode(key: &ScopedKeyHash, bucket: Bucket, record: &crate::proto::DedupRecord) -> Vec<u8> {
    ChangelogRecord {
        key_hash: key.0.to_vec(),
        bucket_start_secs: bucket.start_secs,
        record: Some(record.clone()),
        claim: None,
    }
    .encode_to_vec()
}

/// Produces a batch's dedup records to the changelog topics.
pub struct ChangelogWriter {
    producer: crate::kafka::RenewingProducer,
    /// Source topic → changelog topic.
    topics: HashMap<String, String>,
}

/// Where a batch's records landed, per source topic and partition: (first
/// offset, count) when they are contiguous in the changelog partition, else
/// `None`; and how many there were.
pub type Spans = BTreeMap<(String, i32), (Option<(i64, i64)>, u64)>;

impl ChangelogWriter {
    /// A writer for the configured topics, or `None` when the changelog is
    /// off.
    pub fn new(config: &Config) -> anyhow::Result<Option<Self>> {
        if !config.changelog.enabled {
            return Ok(None);
        }
        // No linger: a batch's records are queued at once and the batch
        // waits for their acknowledgement, so lingering only adds to every
        // batch's time (records queued while a request is out still go
        // together).
        let mut producer = producer_config(config)?;
        producer.set("linger.ms", "0");
        let producer = crate::kafka::RenewingProducer::new(producer, "changelog")?;
        let topics = config
            .topics
            .iter()
            .map(|t| (t.clone(), config.changelog_topic_for(t)))
            .collect();
        Ok(Some(Self { producer, topics }))
    }

    /// Produces every record of `batch` to the changelog partition of its
    /// source partition and waits until all are acknowledged; returns where
    /// they landed, per source topic and partition. A record whose source
    /// topic is not consumed any more (a refreshed old record) is left out.
    pub fn send(&self, batch: &StoreBatch) -> anyhow::Result<Spans> {
        let sent = self.send_with(&self.producer.get(), batch);
        if sent.is_err() {
            self.producer.renew_if_failed();
        }
        sent
    }

    fn send_with(&self, producer: &FutureProducer, batch: &StoreBatch) -> anyhow::Result<Spans> {
        let mut pending = Vec::with_capacity(batch.records.len());
        for (key, (bucket, record)) in &batch.records {
            let Some(changelog) = self.topics.get(&record.source_topic) else {
                continue;
            };
            let payload = encode(key, *bucket, record);
            let out: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(changelog)
                .partition(record.source_partition)
                .key(&key.0[..])
                .payload(&payload);
            let fut = crate::kafka::queue(producer, out).with_context(|| {
                format!(
                    "queueing the changelog record of {}/{}@{} for {changelog}",
                    record.source_topic, record.source_partition, record.source_offset
                )
            })?;
            pending.push((record, fut));
        }
        let mut landed: BTreeMap<(String, i32), Vec<i64>> = BTreeMap::new();
        for (record, fut) in pending {
            let delivered = futures::executor::block_on(fut)
                .map_err(|_| anyhow::anyhow!("the producer was dropped before acknowledging"))?;
            let delivery = delivered.map_err(|(e, _)| e).with_context(|| {
                format!(
                    "writing the changelog record of {}/{}@{}",
                    record.source_topic, record.source_partition, record.source_offset
                )
            })?;
            landed
                .entry((record.source_topic.clone(), record.source_partition))
                .or_default()
                .push(delivery.offset);
        }
        Ok(landed
            .into_iter()
            .map(|(tp, offsets)| (tp, (span(&offsets), offsets.len() as u64)))
            .collect())
    }
}

impl ChangelogWriter {
    /// Writes a claim of source partition `topic`/`partition` by `member`
    /// and returns its changelog offset: the fencing token every handler
    /// call of this assignment carries. A later owner's claim lands later in
    /// the same changelog partition, so its token is higher, and an
    /// application that keeps the highest token it has seen per partition
    /// can refuse a stale worker.
    pub fn claim(
        &self,
        topic: &str,
        partition: i32,
        member: &str,
        now_ms: i64,
    ) -> anyhow::Result<i64> {
        let changelog = self
            .topics
            .get(topic)
            .with_context(|| format!("{topic} has no changelog"))?;
        let payload = ChangelogRecord {
            claim: Some(crate::proto::Claim {
                member: member.to_string(),
                claimed_at_ms: now_ms,
            }),
            ..ChangelogRecord::default()
        }
        .encode_to_vec();
        let record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(changelog)
            .partition(partition)
            .key(CLAIM_KEY)
            .payload(&payload);
        let producer = self.producer.get();
        let fut = crate::kafka::queue(&producer, record)
            .with_context(|| format!("queueing the claim of {topic}/{partition}"))?;
        let delivery = futures::executor::block_on(fut)
            .map_err(|_| anyhow::anyhow!("the producer was dropped before acknowledging"))?
            .map_err(|(e, _)| e)
            .with_context(|| format!("writing the claim of {topic}/{partition} to {changelog}"));
        if delivery.is_err() {
            self.producer.renew_if_failed();
        }
        Ok(delivery?.offset)
    }
}

/// The record key of claims (compaction keeps the latest); dedup records
/// have 16-byte keys, so the two never meet.
pub const CLAIM_KEY: &[u8] = b"idem-claim";

/// (first, count) when `offsets` are exactly a run of consecutive offsets.
fn span(offsets: &[i64]) -> Option<(i64, i64)> {
    let first = *offsets.iter().min()?;
    let last = *offsets.iter().max()?;
    let n = offsets.len() as i64;
    (last - first + 1 == n).then_some((first, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_span_is_only_a_run_without_gaps() {
        assert_eq!(span(&[7, 5, 6]), Some((5, 3)));
        assert_eq!(span(&[5]), Some((5, 1)));
        assert_eq!(span(&[5, 7]), None);
        assert_eq!(span(&[]), None);
    }

    #[test]
    fn the_topic_template_names_group_and_topic() {
        assert_eq!(
            topic_for("{group}.idem-changelog.{topic}", "g", "payments"),
            "g.idem-changelog.payments"
        );
    }
}
