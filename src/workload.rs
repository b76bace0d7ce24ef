//! A reproducible stream of payment events with exact re-sends and
//! conflicting re-sends, and the balances it must produce: the input of the
//! demo, the integration tests and the benchmarks.
//!
//! Guarantee: the same [`WorkloadSpec`] always yields the same messages, every
//! re-send follows its original on the original's partition (producers key
//! payment topics by account), and [`Workload::expected_balances`] is the sum
//! of the unique events alone.

use crate::handler::ledger::balance_delta;
use crate::proto::{PaymentEvent, PaymentKind};
use anyhow::Context as _;
use prost::Message as _;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::time::Duration;
use xxhash_rust::xxh3::xxh3_64;

/// What a workload contains.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadSpec {
    /// Distinct payment events.
    pub unique: usize,
    /// Exact re-sends (same key, same bytes, later offset).
    pub resends: usize,
    /// Re-sends of a used key with another amount.
    pub conflicts: usize,
    /// Partitions of the topic.
    pub partitions: i32,
    /// Accounts the events are spread over.
    pub accounts: usize,
    /// Seed of the generator.
    pub seed: u64,
    /// Prefix of event ids, so that several workloads can share a store.
    pub id_prefix: &'static str,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        Self {
            unique: 8_950,
            resends: 1_000,
            conflicts: 50,
            partitions: 4,
            accounts: 200,
            seed: 7,
            id_prefix: "evt",
        }
    }
}

/// The role of a message in the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// First sighting of an event.
    Original,
    /// Byte-identical re-send.
    Resend,
    /// Same event id, different amount.
    Conflict,
}

/// One message to produce.
#[derive(Debug, Clone)]
pub struct WorkloadMessage {
    /// Partition to produce to.
    pub partition: i32,
    /// Kafka key (the account id).
    pub key: Vec<u8>,
    /// Encoded payment event (protobuf, or JSON for one in five).
    pub payload: Vec<u8>,
    /// Headers; half the events carry `Idempotency-Key`.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The event.
    pub event: PaymentEvent,
    /// Its role.
    pub role: Role,
}

/// A generated workload.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Messages in production order.
    pub messages: Vec<WorkloadMessage>,
}

const KINDS: [(PaymentKind, u32); 4] = [
    (PaymentKind::Capture, 60),
    (PaymentKind::Refund, 15),
    (PaymentKind::Chargeback, 5),
    (PaymentKind::Authorize, 20),
];

fn encode(ev: &PaymentEvent, json: bool) -> Vec<u8> {
    if !json {
        return ev.encode_to_vec();
    }
    serde_json::json!({
        "event_id": ev.event_id,
        "account_id": ev.account_id,
        "amount_minor": ev.amount_minor,
        "currency": ev.currency,
        "kind": ev.kind().as_str_name().to_ascii_lowercase(),
        "occurred_at_ms": ev.occurred_at_ms,
        "merchant_reference": ev.merchant_reference,
    })
    .to_string()
    .into_bytes()
}

impl Workload {
    /// Generates the workload of `spec`.
    pub fn generate(spec: &WorkloadSpec) -> Self {
        let mut rng = StdRng::seed_from_u64(spec.seed);
        let mut roles: Vec<Role> = std::iter::repeat_n(Role::Original, spec.unique)
            .chain(std::iter::repeat_n(Role::Resend, spec.resends))
            .chain(std::iter::repeat_n(Role::Conflict, spec.conflicts))
            .collect();
        roles.shuffle(&mut rng);
        // Every re-send needs an earlier original: move the first original to
        // the front.
        if let Some(i) = roles.iter().position(|r| *r == Role::Original) {
            roles.swap(0, i);
        }
        let mut messages = Vec::with_capacity(roles.len());
        let mut originals: Vec<usize> = Vec::with_capacity(spec.unique);
        let now_ms = crate::clock::Clock::now_ms(&crate::clock::SystemClock);
        for role in roles {
            let msg = match role {
                Role::Original => {
                    let n = originals.len();
                    let account = format!("acct-{:04}", rng.random_range(0..spec.accounts.max(1)));
                    let currency =
                        ["EUR", "USD", "GBP"][(xxh3_64(account.as_bytes()) % 3) as usize];
                    let pick = rng.random_range(0..100);
                    let mut acc = 0;
                    let kind = KINDS
                        .iter()
                        .find(|(_, w)| {
                            acc += w;
                            pick < acc
                        })
                        .map(|(k, _)| *k)
                        .unwrap_or(PaymentKind::Capture);
                    let event = PaymentEvent {
                        event_id: format!("{}-{n:08}", spec.id_prefix),
                        account_id: account.clone(),
                        amount_minor: rng.random_range(1..=50_000),
                        currency: currency.into(),
                        kind: kind as i32,
                        occurred_at_ms: now_ms,
                        merchant_reference: format!("order-{n}"),
                        metadata: Default::default(),
                    };
                    let partition =
                        (xxh3_64(account.as_bytes()) % spec.partitions.max(1) as u64) as i32;
                    let headers = if n.is_multiple_of(2) {
                        vec![(
                            "Idempotency-Key".to_string(),
                            event.event_id.clone().into_bytes(),
                        )]
                    } else {
                        Vec::new()
                    };
                    originals.push(messages.len());
                    WorkloadMessage {
                        partition,
                        key: account.into_bytes(),
                        payload: encode(&event, n % 5 == 4),
                        headers,
                        event,
                        role,
                    }
                }
                Role::Resend => {
                    let of = &messages[originals[rng.random_range(0..originals.len())]];
                    WorkloadMessage {
                        role,
                        ..WorkloadMessage::clone(of)
                    }
                }
                Role::Conflict => {
                    let of: &WorkloadMessage =
                        &messages[originals[rng.random_range(0..originals.len())]];
                    let mut event = of.event.clone();
                    event.amount_minor += rng.random_range(1..=1_000);
                    let json = of.payload.first() == Some(&b'{');
                    WorkloadMessage {
                        payload: encode(&event, json),
                        event,
                        role,
                        ..of.clone()
                    }
                }
            };
            messages.push(msg);
        }
        Self { messages }
    }

    /// Balances by (account, currency) that the unique events produce.
    pub fn expected_balances(&self) -> BTreeMap<(String, String), i64> {
        let mut out = BTreeMap::new();
        for m in self.messages.iter().filter(|m| m.role == Role::Original) {
            let delta = balance_delta(&m.event).unwrap_or(0);
            *out.entry((m.event.account_id.clone(), m.event.currency.clone()))
                .or_insert(0) += delta;
        }
        out
    }

    /// Messages with `role`.
    pub fn count(&self, role: Role) -> usize {
        self.messages.iter().filter(|m| m.role == role).count()
    }

    /// Produces every message to `topic` on `brokers` and waits for all
    /// acknowledgements (idempotent producer, so a retry never duplicates).
    pub fn produce(&self, brokers: &str, topic: &str) -> anyhow::Result<()> {
        produce_messages(brokers, topic, &self.messages)
    }
}

/// Produces `messages` to `topic` and waits for every acknowledgement.
pub fn produce_messages(
    brokers: &str,
    topic: &str,
    messages: &[WorkloadMessage],
) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000")
        .create()
        .context("creating the workload producer")?;
    let mut pending = Vec::with_capacity(messages.len());
    for m in messages {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &m.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut record = FutureRecord::to(topic)
            .partition(m.partition)
            .key(&m.key)
            .payload(&m.payload)
            .headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e).context("queueing a workload message"),
            }
        }
    }
    for f in pending {
        futures::executor::block_on(f)
            .context("workload producer dropped")?
            .map_err(|(e, _)| e)
            .context("producing a workload message")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_has_the_requested_mix_and_resends_follow_originals() {
        let w = Workload::generate(&WorkloadSpec::default());
        assert_eq!(w.messages.len(), 10_000);
        assert_eq!(w.count(Role::Original), 8_950);
        assert_eq!(w.count(Role::Resend), 1_000);
        assert_eq!(w.count(Role::Conflict), 50);
        let mut seen = std::collections::HashMap::new();
        for m in &w.messages {
            match m.role {
                Role::Original => {
                    assert!(seen.insert(m.event.event_id.clone(), m.partition).is_none());
                }
                _ => assert_eq!(seen.get(&m.event.event_id), Some(&m.partition)),
            }
        }
        let again = Workload::generate(&WorkloadSpec::default());
        assert_eq!(again.expected_balances(), w.expected_balances());
    }
}
