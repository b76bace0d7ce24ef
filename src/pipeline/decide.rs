//! The decision of one message, before anything is handled or written: what
//! is it (a tombstone, undecodable, unkeyable), and if it has a key, has that
//! key been seen, with the same payload or another?
//!
//! Guarantee: the worker's batches and the replay command decide with this one
//! function, so a replay's "would be a duplicate" means exactly what the
//! worker would do with the same message against the same store. Nothing here
//! writes; the caller supplies the records staged but not yet written (the
//! rest of its batch) so a key seen twice in one batch is caught.

use crate::key::{Fingerprint, IdempotencyKey, KeyError, KeyRule, KeySource, ScopedKeyHash};
use crate::payload::{decode, DecodeError, Decoded, PayloadFormat};
use crate::proto::DedupRecord;
use crate::store::{DedupStore, StoreError};
use rdkafka::message::{Message as _, OwnedMessage};
use std::collections::HashMap;

/// How the messages of one topic are keyed, scoped and decoded.
#[derive(Debug, Clone)]
pub struct TopicRule {
    /// How keys are derived.
    pub key_rule: KeyRule,
    /// Scope of every key.
    pub scope: String,
    /// Payload encoding.
    pub format: PayloadFormat,
    /// The scope's own window, when shorter than the store's: a record older
    /// than this counts as absent for this scope.
    pub window_ms: Option<i64>,
}

/// How a worker derives and scopes the keys of its messages: one rule for
/// every topic, and overrides for some.
#[derive(Debug, Clone)]
pub struct Decider {
    default: TopicRule,
    per_topic: HashMap<String, TopicRule>,
    max_payload_bytes: usize,
}

/// A message whose key has not been seen: it goes to the handler.
#[derive(Debug)]
pub struct Fresh {
    /// The idempotency key.
    pub key: IdempotencyKey,
    /// Where the key came from.
    pub source: KeySource,
    /// The store key.
    pub hash: ScopedKeyHash,
    /// The payload fingerprint to record.
    pub fingerprint: Fingerprint,
    /// The decoded payload.
    pub decoded: Decoded,
}

/// What one message is, before any handler runs.
#[derive(Debug)]
pub enum Decision {
    /// A null payload.
    Tombstone,
    /// The payload does not decode.
    Undecodable(DecodeError),
    /// No usable key (e.g. disagreeing key headers).
    BadKey(KeyError),
    /// The key was seen with the same payload: a no-op.
    Duplicate {
        /// The record of the first copy.
        first: DedupRecord,
        /// The store key.
        hash: ScopedKeyHash,
        /// The idempotency key.
        key: IdempotencyKey,
        /// Where the key came from.
        source: KeySource,
    },
    /// The key was seen with another payload.
    Conflict {
        /// The record of the first copy.
        first: DedupRecord,
        /// The fingerprint of this copy.
        received: Fingerprint,
        /// The idempotency key.
        key: IdempotencyKey,
        /// Where the key came from.
        source: KeySource,
    },
    /// A new key.
    New(Fresh),
}

impl Decision {
    /// The idempotency key, when the message has a usable one.
    pub fn key(&self) -> Option<&IdempotencyKey> {
        match self {
            Decision::Duplicate { key, .. } | Decision::Conflict { key, .. } => Some(key),
            Decision::New(f) => Some(&f.key),
            _ => None,
        }
    }

    /// True when the key came from topic/partition/offset because no
    /// configured source matched.
    pub fn unkeyed(&self) -> bool {
        let source = match self {
            Decision::Duplicate { source, .. } | Decision::Conflict { source, .. } => *source,
            Decision::New(f) => f.source,
            _ => return false,
        };
        source == KeySource::Unkeyed
    }
}

impl Decider {
    /// A decider applying `default` to every topic.
    pub fn new(default: TopicRule) -> Self {
        Self {
            default,
            per_topic: HashMap::new(),
            max_payload_bytes: 0,
        }
    }

    /// Payloads larger than `max` bytes (0: no limit) are not decoded: they
    /// are dead-lettered as too large.
    pub fn with_max_payload(mut self, max: usize) -> Self {
        self.max_payload_bytes = max;
        self
    }

    /// Applies `rule` to `topic` instead of the default.
    pub fn with_topic(mut self, topic: &str, rule: TopicRule) -> Self {
        self.per_topic.insert(topic.to_string(), rule);
        self
    }

    /// The rule of `topic`.
    pub fn rule(&self, topic: &str) -> &TopicRule {
        self.per_topic.get(topic).unwrap_or(&self.default)
    }

    /// Decodes `msg` and derives its key, without consulting the store:
    /// either its final decision (tombstone, undecodable, no usable key) or
    /// the key to look up. Batches prepare every message first, then look all
    /// keys up in one batched read per bucket.
    pub fn prepare(&self, msg: &OwnedMessage) -> Prepared {
        let rule = self.rule(msg.topic());
        let Some(payload) = msg.payload() else {
            return Prepared::Final(Decision::Tombstone);
        };
        if self.max_payload_bytes > 0 && payload.len() > self.max_payload_bytes {
            return Prepared::Final(Decision::Undecodable(DecodeError::TooLarge {
                size: payload.len(),
                max: self.max_payload_bytes,
            }));
        }
        let decoded = match decode(payload, rule.format) {
            Ok(d) => d,
            Err(e) => return Prepared::Final(Decision::Undecodable(e)),
        };
        // A name that is not UTF-8 cannot be the configured key header (a
        // UTF-8 string), so it is left out here.
        let header_iter = crate::kafka::raw_headers(msg.headers())
            .filter_map(|(name, value)| Some((std::str::from_utf8(name).ok()?, value)));
        let (key, source) = match rule.key_rule.derive(
            header_iter,
            &decoded,
            msg.topic(),
            msg.partition(),
            msg.offset(),
        ) {
            Ok(k) => k,
            Err(e) => return Prepared::Final(Decision::BadKey(e)),
        };
        let fingerprint = match (&rule.key_rule.composite, source) {
            (Some(c), KeySource::Composite) => c.fingerprint(&key.0, &decoded, payload),
            _ => Fingerprint::of(payload),
        };
        Prepared::Keyed(Fresh {
            hash: ScopedKeyHash::new(&rule.scope, &key),
            fingerprint,
            key,
            source,
            decoded,
        })
    }

    /// The decision of a keyed message of `topic`, given the record `staged`
    /// earlier in the caller's batch and the record `stored` in the store. A
    /// stored record older than the topic's scope window counts as absent.
    pub fn resolve(
        &self,
        topic: &str,
        fresh: Fresh,
        staged: Option<DedupRecord>,
        stored: Option<DedupRecord>,
        now_ms: i64,
    ) -> Decision {
        let rule = self.rule(topic);
        let seen = staged.or_else(|| {
            // A scope with a shorter window than the store's forgets on its
            // own schedule.
            stored.filter(|r| {
                rule.window_ms
                    .is_none_or(|w| r.first_seen_ms.max(r.refreshed_ms) + w > now_ms)
            })
        });
        let Fresh {
            key,
            source,
            hash,
            fingerprint,
            ..
        } = &fresh;
        match seen {
            Some(first) if first.fingerprint == fingerprint.0 => Decision::Duplicate {
                first,
                hash: *hash,
                key: key.clone(),
                source: *source,
            },
            Some(first) => Decision::Conflict {
                first,
                received: *fingerprint,
                key: key.clone(),
                source: *source,
            },
            None => Decision::New(fresh),
        }
    }

    /// Prepares every message of a batch and looks all their keys up in the
    /// store together (one batched read per bucket).
    pub fn prepare_batch(
        &self,
        messages: &[OwnedMessage],
        store: &DedupStore,
    ) -> Result<(Vec<Prepared>, StoredRecords), StoreError> {
        self.prepare_batch_with(messages, |keys| store.lookup_many(keys))
    }

    /// Like [`Decider::prepare_batch`], with the keys looked up by `lookup`
    /// (one call for the whole batch, records in the order of the keys).
    pub fn prepare_batch_with(
        &self,
        messages: &[OwnedMessage],
        lookup: impl FnOnce(&[ScopedKeyHash]) -> Result<Vec<Option<DedupRecord>>, StoreError>,
    ) -> Result<(Vec<Prepared>, StoredRecords), StoreError> {
        let prepared: Vec<Prepared> = messages.iter().map(|m| self.prepare(m)).collect();
        let hashes: Vec<ScopedKeyHash> = prepared.iter().filter_map(Prepared::hash).collect();
        let found = lookup(&hashes)?;
        let stored = hashes
            .into_iter()
            .zip(found)
            .filter_map(|(h, r)| Some((h, r?)))
            .collect();
        Ok((prepared, StoredRecords(stored)))
    }

    /// The decision of a message prepared by [`Decider::prepare_batch`]:
    /// against `staged` (records staged earlier in the caller's batch) first,
    /// then against what the store held.
    pub fn complete(
        &self,
        msg: &OwnedMessage,
        prepared: Prepared,
        staged: impl FnOnce(&ScopedKeyHash) -> Option<DedupRecord>,
        stored: &StoredRecords,
        now_ms: i64,
    ) -> Decision {
        match prepared {
            Prepared::Final(d) => d,
            Prepared::Keyed(fresh) => {
                let staged = staged(&fresh.hash);
                let from_store = stored.0.get(&fresh.hash).cloned();
                self.resolve(msg.topic(), fresh, staged, from_store, now_ms)
            }
        }
    }

    /// Decides one message at processing time `now_ms`: first against
    /// `staged` (records of the caller's batch not yet written), then against
    /// the store.
    pub fn decide(
        &self,
        msg: &OwnedMessage,
        staged: impl FnOnce(&ScopedKeyHash) -> Option<DedupRecord>,
        store: &DedupStore,
        now_ms: i64,
    ) -> Result<Decision, StoreError> {
        let prepared = self.prepare(msg);
        let mut stored = StoredRecords::default();
        if let Some(h) = prepared.hash() {
            if let Some(r) = store.lookup(&h)? {
                stored.0.insert(h, r);
            }
        }
        Ok(self.complete(msg, prepared, staged, &stored, now_ms))
    }
}

/// What the store held for the keys of a batch, looked up together.
#[derive(Debug, Default)]
pub struct StoredRecords(crate::store::FastMap<ScopedKeyHash, DedupRecord>);

impl StoredRecords {
    /// Adds a record known from elsewhere (the fail-open guard) for a key
    /// the store did not return.
    pub fn insert_missing(&mut self, key: ScopedKeyHash, record: &DedupRecord) {
        self.0.entry(key).or_insert_with(|| record.clone());
    }
}

/// A message prepared for a decision: see [`Decider::prepare`].
#[derive(Debug)]
pub enum Prepared {
    /// Decided without the store.
    Final(Decision),
    /// Keyed: the store decides.
    Keyed(Fresh),
}

impl Prepared {
    /// The store key to look up, when there is one.
    pub fn hash(&self) -> Option<ScopedKeyHash> {
        match self {
            Prepared::Keyed(f) => Some(f.hash),
            Prepared::Final(_) => None,
        }
    }
}
