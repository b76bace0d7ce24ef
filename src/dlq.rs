//! The dead-letter producer.
//!
//! Guarantee: [`DeadLetters::send_all`] returns `Ok` only when the broker has
//! acknowledged every letter (idempotent producer, `acks=all`). The pipeline
//! writes the batch's outcomes and commits its offsets only after that, so a
//! message is never committed past without its dead letter; a crash between
//! the acknowledgement and the store write can produce a letter twice, never
//! zero times. Each letter carries the original key, payload and headers plus
//! `idem-reason`, `idem-kind` and `idem-source-topic/partition/offset`.

use crate::config::Config;
use crate::kafka::producer_config;
use anyhow::Context as _;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::time::Duration;

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
    producer: FutureProducer,
}

impl DeadLetters {
    /// Builds the producer from the worker configuration.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let producer = producer_config(config)
            .create()
            .context("creating the dead-letter producer")?;
        Ok(Self { producer })
    }

    /// Produces every letter and waits for all acknowledgements.
    pub fn send_all(&self, letters: &[DeadLetter]) -> anyhow::Result<()> {
        let mut pending = Vec::with_capacity(letters.len());
        for l in letters {
            let mut headers = OwnedHeaders::new_with_capacity(l.headers.len() + 5 + l.extra.len());
            for (name, value) in &l.headers {
                headers = headers.insert(Header {
                    key: name,
                    value: value.as_deref(),
                });
            }
            let partition = l.source_partition.to_string();
            let offset = l.source_offset.to_string();
            let fixed = [
                ("idem-reason", l.reason.as_str()),
                ("idem-kind", l.kind.as_str()),
                ("idem-source-topic", l.source_topic.as_str()),
                ("idem-source-partition", partition.as_str()),
                ("idem-source-offset", offset.as_str()),
            ];
            for (k, v) in fixed
                .into_iter()
                .chain(l.extra.iter().map(|(k, v)| (*k, v.as_str())))
            {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v.as_bytes()),
                });
            }
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&l.topic).headers(headers);
            if let Some(k) = &l.key {
                record = record.key(k.as_slice());
            }
            if let Some(p) = &l.payload {
                record = record.payload(p.as_slice());
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(fut) => {
                        pending.push((l, fut));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err((e, _)) => {
                        return Err(e).with_context(|| {
                            format!(
                                "queueing a dead letter for {}/{}@{}",
                                l.source_topic, l.source_partition, l.source_offset
                            )
                        })
                    }
                }
            }
        }
        for (l, fut) in pending {
            let delivered = futures::executor::block_on(fut).map_err(|_| {
                anyhow::anyhow!("dead-letter producer was dropped before acknowledging")
            })?;
            delivered.map_err(|(e, _)| e).with_context(|| {
                format!(
                    "writing the dead letter of {}/{}@{} to {}",
                    l.source_topic, l.source_partition, l.source_offset, l.topic
                )
            })?;
        }
        Ok(())
    }
}
