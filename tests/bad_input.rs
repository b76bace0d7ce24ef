//! Bad input on one partition among good ones: every bad message gets its own
//! stated outcome and reason, the partition keeps flowing, and the committed
//! offset moves past all of them.

mod common;

use common::*;
use idem::handler::ledger::{self, Ledger};
use idem::pipeline::{StopWhen, Worker};
use idem::proto::{PaymentEvent, PaymentKind};
use prost::Message as _;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use rdkafka::Message as _;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

fn event(id: &str, account: &str, amount: i64) -> PaymentEvent {
    PaymentEvent {
        event_id: id.into(),
        account_id: account.into(),
        amount_minor: amount,
        currency: "EUR".into(),
        kind: PaymentKind::Capture as i32,
        ..Default::default()
    }
}

fn send(
    p: &FutureProducer,
    topic: &str,
    partition: i32,
    payload: Option<&[u8]>,
    headers: &[(&str, &str)],
) {
    let mut hs = OwnedHeaders::new();
    for (k, v) in headers {
        hs = hs.insert(Header {
            key: k,
            value: Some(v.as_bytes()),
        });
    }
    let mut r: FutureRecord<'_, [u8], [u8]> =
        FutureRecord::to(topic).partition(partition).headers(hs);
    if let Some(b) = payload {
        r = r.payload(b);
    }
    futures::executor::block_on(p.send(r, Duration::from_secs(30))).unwrap();
}

#[test]
fn each_bad_message_gets_its_outcome_and_the_partition_keeps_flowing() {
    let topic = unique("bad-input");
    let group = unique("idem");
    create_topic(&topic, 2);
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();

    // Partition 1: good events only.
    for i in 0..5 {
        send(
            &p,
            &topic,
            1,
            Some(&event(&format!("ok1-{i}"), "b", 10).encode_to_vec()),
            &[],
        );
    }
    // Partition 0: good and bad interleaved, offsets 0..=8.
    send(
        &p,
        &topic,
        0,
        Some(&event("ok0-0", "a", 100).encode_to_vec()),
        &[],
    ); // 0
    send(&p, &topic, 0, Some(&[0xff, 0xff, 0xff, 0xff]), &[]); // 1 undecodable
    send(&p, &topic, 0, None, &[("Idempotency-Key", "tomb-1")]); // 2 tombstone
    let no_key = br#"{"account_id":"a","amount_minor":7,"currency":"EUR","kind":"capture"}"#;
    send(&p, &topic, 0, Some(no_key), &[]); // 3 no key source: unkeyed, handled
    send(
        &p,
        &topic,
        0,
        Some(&event("ok0-4", "a", 1000).encode_to_vec()),
        &[("Idempotency-Key", "k-1"), ("Idempotency-Key", "k-2")],
    ); // 4 disagreeing headers
    let teleport = br#"{"event_id":"tp-1","account_id":"a","amount_minor":5,"currency":"EUR","kind":"teleport"}"#;
    send(&p, &topic, 0, Some(teleport), &[]); // 5 handler rejection
    send(&p, &topic, 0, Some(b"{\"event_id\": "), &[]); // 6 truncated JSON
    send(
        &p,
        &topic,
        0,
        Some(&event("ok0-7", "a", 20).encode_to_vec()),
        &[],
    ); // 7
    send(
        &p,
        &topic,
        0,
        Some(&event("ok0-8", "a", 3).encode_to_vec()),
        &[("Idempotency-Key", "same"), ("idempotency-key", "same")],
    ); // 8 agreeing headers

    let dir = tempfile::tempdir().unwrap();
    let worker = Worker::new(
        config(&topic, &group, &dir.path().join("store")),
        Box::new(Ledger),
    )
    .unwrap();
    let store = worker.store();
    let s = worker
        .run(Arc::new(AtomicBool::new(false)), StopWhen::CaughtUp)
        .unwrap();

    assert_eq!(s.consumed, 14);
    assert_eq!(s.handled, 9); // 5 on p1; offsets 0, 3, 7, 8 on p0
    assert_eq!(s.unkeyed, 1);
    assert_eq!(s.undecodable, 2);
    assert_eq!(s.tombstones, 1);
    assert_eq!(s.bad_keys, 1);
    assert_eq!(s.rejected, 1);
    assert_eq!((s.duplicates, s.conflicts), (0, 0));
    assert_eq!(s.dead_letters_written, 5);

    let balances = ledger::balances(&store).unwrap();
    let expected: BTreeMap<(String, String), i64> = [
        (("a".to_string(), "EUR".to_string()), 100 + 7 + 20 + 3),
        (("b".to_string(), "EUR".to_string()), 50),
    ]
    .into_iter()
    .collect();
    assert_eq!(balances, expected);
    assert_eq!(committed(&group, &topic, 2), vec![9, 5]);

    let mut letters: Vec<(i64, String, String)> = read_all(&format!("{topic}.dlq"), 2)
        .iter()
        .map(|l| {
            assert_eq!(header(l, "idem-source-partition"), Some("0"));
            (
                header(l, "idem-source-offset").unwrap().parse().unwrap(),
                header(l, "idem-kind").unwrap().to_string(),
                header(l, "idem-reason").unwrap().to_string(),
            )
        })
        .collect();
    letters.sort();
    let kinds: Vec<(i64, &str)> = letters.iter().map(|(o, k, _)| (*o, k.as_str())).collect();
    assert_eq!(
        kinds,
        vec![
            (1, "undecodable"),
            (2, "tombstone"),
            (4, "bad_key"),
            (5, "rejected"),
            (6, "undecodable")
        ]
    );
    assert!(letters[0].2.starts_with(
        "undecodable payload: payload is neither a JSON object nor a protobuf PaymentEvent"
    ));
    assert_eq!(letters[1].2, "null payload (tombstone)");
    assert_eq!(
        letters[2].2,
        "no usable idempotency key: 2 `Idempotency-Key` headers with different values"
    );
    assert_eq!(
        letters[3].2,
        "handler rejected: unknown payment kind `teleport`"
    );
    assert!(letters[4]
        .2
        .starts_with("undecodable payload: invalid JSON payload: EOF while parsing"));

    // The tombstone's dead letter keeps its null payload and original header.
    let tomb = read_all(&format!("{topic}.dlq"), 2)
        .into_iter()
        .find(|l| header(l, "idem-kind") == Some("tombstone"))
        .unwrap();
    assert_eq!(tomb.payload(), None);
    assert_eq!(header(&tomb, "Idempotency-Key"), Some("tomb-1"));
}

#[test]
fn an_oversized_payload_is_dead_lettered_without_it_and_the_partition_flows() {
    let topic = unique("too-large");
    let group = unique("idem");
    create_topic(&topic, 1);
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let big = PaymentEvent {
        merchant_reference: "x".repeat(5_000),
        ..event("big-1", "a", 5)
    }
    .encode_to_vec();
    send(
        &p,
        &topic,
        0,
        Some(&event("ok-1", "a", 1).encode_to_vec()),
        &[],
    );
    send(&p, &topic, 0, Some(&big), &[]);
    send(
        &p,
        &topic,
        0,
        Some(&event("ok-2", "a", 2).encode_to_vec()),
        &[],
    );
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&topic, &group, &dir.path().join("store"));
    c.max_payload_bytes = 1_000;
    let worker = Worker::new(c, Box::new(Ledger)).unwrap();
    let store = worker.store();
    let s = worker
        .run(Arc::new(AtomicBool::new(false)), StopWhen::CaughtUp)
        .unwrap();
    assert_eq!((s.consumed, s.handled, s.undecodable), (3, 2, 1));
    assert_eq!(committed(&group, &topic, 1), vec![3]);
    let balances = ledger::balances(&store).unwrap();
    assert_eq!(balances.values().copied().collect::<Vec<_>>(), vec![3]);
    let letters = read_all(&format!("{topic}.dlq"), 1);
    assert_eq!(letters.len(), 1);
    let l = &letters[0];
    assert_eq!(header(l, "idem-kind"), Some("too_large"));
    assert_eq!(header(l, "idem-source-offset"), Some("1"));
    let size = big.len().to_string();
    assert_eq!(header(l, "idem-payload-bytes"), Some(size.as_str()));
    assert_eq!(
        header(l, "idem-reason"),
        Some(
            format!(
                "payload of {} bytes is over max_payload_bytes (1000); the dead letter carries no payload",
                big.len()
            )
            .as_str()
        )
    );
    assert_eq!(l.payload(), None);
}
