//! The dead-letter producer.
//!
//! Guarantee: [`DeadLetters::send_all`] returns `Ok` only when the broker has
//! acknowledged every letter (idempotent producer, `acks=all`). The pipeline
//! writes the batch's outcomes and commits its offsets only after that, so a
//! message is never committed past without its dead letter; a crash between
//! the acknowledgement and the store write can produce a letter twice, never
//! zero times. Each letter carries the original key, payload and headers plus
//! `idem-reason`, `idem-kind` and `idem-source-topic/partition/offset`.
//!
//! The same producer writes the reply topic ([`crate::reply`]), with the
//! same acknowledgement rule.

use crate::config::Config;
use crate::kafka::producer_config;
use anyhow::Context as _;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Why a message went to the dead-letter topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterKind {
    /// A null payload (tombstone).
    Tombstone,
    /// The payload did not decode.
    Undecodable,
    /// No usable idempotency key (e.g. disagreeing headers).
    BadKey,
    /// Key reused with a different payload.
    Conflict,
    /// The handler refused the message.
    Rejected,
    /// The payload is over `max_payload_bytes` (the letter carries no
    /// payload, only its size).
    TooLarge,
    /// The handler could not finish it within the retry policy's attempts
    /// (`on_exhausted = "dead_letter"`).
    RetriesExhausted,
}

impl DeadLetterKind {
    /// The value of the `idem-kind` header and the metrics label.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Tombstone => "tombstone",
            Self::Undecodable => "undecodable",
            Self::BadKey => "bad_key",
            Self::Conflict => "conflict",
            Self::Rejected => "rejected",
            Self::TooLarge => "too_large",
            Self::RetriesExhausted => "retries_exhausted",
        }
    }
}

/// One message on its way to the dead-letter topic.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Destination topic.
    pub topic: String,
    /// Category.
    pub kind: DeadLetterKind,
    /// Human-readable reason.
    pub reason: String,
    /// Source position.
    pub source_topic: String,
    /// Source partition.
    pub source_partition: i32,
    /// Source offset.
    pub source_offset: i64,
    /// Original Kafka key.
    pub key: Option<Vec<u8>>,
    /// Original payload (`None` for a tombstone).
    pub payload: Option<Vec<u8>>,
    /// Original headers.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Extra `idem-*` headers (e.g. both fingerprints of a conflict).
    pub extra: Vec<(&'static str, String)>,
}

/// The dead-letter producer of a worker.
pub struct DeadLetters {
    producer: crate::kafka::RenewingProducer,
}

impl DeadLetters {
    /// Builds the producer from the worker configuration.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let producer =
            crate::kafka::RenewingProducer::new(producer_config(config)?, "dead-letter")?;
        Ok(Self { producer })
    }

    /// Produces every letter and waits for all acknowledgements.
    pub fn send_all(&self, letters: &[DeadLetter]) -> anyhow::Result<()> {
        let records: Vec<Outgoing<'_>> = letters
            .iter()
            .map(|l| {
                let mut headers: Vec<(&str, Option<Vec<u8>>)> = l
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.clone()))
                    .collect();
                let fixed = [
                    ("idem-reason", l.reason.clone()),
                    ("idem-kind", l.kind.as_str().to_string()),
                    ("idem-source-topic", l.source_topic.clone()),
                    ("idem-source-partition", l.source_partition.to_string()),
                    ("idem-source-offset", l.source_offset.to_string()),
                ];
                headers.extend(
                    fixed
                        .into_iter()
                        .chain(l.extra.iter().map(|(k, v)| (*k, v.clone())))
                        .map(|(k, v)| (k, Some(v.into_bytes()))),
                );
                Outgoing {
                    topic: &l.topic,
                    key: l.key.as_deref(),
                    payload: l.payload.as_deref(),
                    headers,
                    what: format!(
                        "the dead letter of {}/{}@{}",
                        l.source_topic, l.source_partition, l.source_offset
                    ),
                }
            })
            .collect();
        self.send(records)
    }

    /// Produces every reply and waits for all acknowledgements.
    pub fn send_replies(&self, replies: &[crate::reply::Reply]) -> anyhow::Result<()> {
        self.send(replies.iter().map(crate::reply::Reply::outgoing).collect())
    }

    fn send(&self, records: Vec<Outgoing<'_>>) -> anyhow::Result<()> {
        let sent = self.send_with(&self.producer.get(), records);
        if sent.is_err() {
            self.producer.renew_if_failed();
        }
        sent
    }

    fn send_with(
        &self,
        producer: &FutureProducer,
        records: Vec<Outgoing<'_>>,
    ) -> anyhow::Result<()> {
        let mut pending = Vec::with_capacity(records.len());
        for r in &records {
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len());
            for (name, value) in &r.headers {
                headers = headers.insert(Header {
                    key: name,
                    value: value.as_deref(),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(r.topic).headers(headers);
            if let Some(k) = r.key {
                record = record.key(k);
            }
            if let Some(p) = r.payload {
                record = record.payload(p);
            }
            let fut = crate::kafka::queue(producer, record)
                .with_context(|| format!("queueing {}", r.what))?;
            pending.push((r, fut));
        }
        for (r, fut) in pending {
            let delivered = futures::executor::block_on(fut)
                .map_err(|_| anyhow::anyhow!("the producer was dropped before acknowledging"))?;
            delivered
                .map_err(|(e, _)| e)
                .with_context(|| format!("writing {} to {}", r.what, r.topic))?;
        }
        Ok(())
    }
}

/// One record on its way to a topic, with what it is for the error message.
pub(crate) struct Outgoing<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub headers: Vec<(&'a str, Option<Vec<u8>>)>,
    pub what: String,
}
