//! Regression tests for what the fuzz targets found (`fuzz/`,
//! `scripts/fuzz.sh`): each input pinned to the exact result it must give.
//! They need no broker: the one that crosses the wire uses librdkafka's
//! in-process mock cluster.
//!
//! key_derive, crash 1 (minimized: `ff ff 00 00 00 77 65 65 ff`): a message
//! whose only header is named `\xff`. A header name on the wire is any bytes;
//! rdkafka's `Headers::iter` unwraps every name as UTF-8, so
//! `Decider::prepare` panicked, and a worker given such a message would have
//! stopped at its offset for good. Headers are now read with
//! `idem::kafka::raw_headers`.

use idem::config::Config;
use idem::handler::http::HttpHandler;
use idem::handler::{AnyHandler, Delivery, Handler, HandlerTxn, RemoteHandler, Verdict};
use idem::key::{CompositeKey, Fingerprint, IdempotencyKey, KeyRule, KeySource, ScopedKeyHash};
use idem::payload::{decode, PayloadFormat};
use idem::pipeline::{BatchProcessor, Counted, Decider, Prepared, TopicRule};
use idem::store::{DedupStore, StoreOptions};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::{BorrowedHeaders, Message as _, OwnedHeaders, OwnedMessage, Timestamp};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::io::{Read as _, Write as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Headers with names as raw bytes, added through librdkafka as its protocol
/// reader adds them (`OwnedHeaders::insert` only takes UTF-8 names).
fn raw_headers(headers: &[(&[u8], Option<&[u8]>)]) -> OwnedHeaders {
    let owned = OwnedHeaders::new_with_capacity(headers.len());
    let native =
        owned.as_borrowed() as *const BorrowedHeaders as *mut rdkafka::bindings::rd_kafka_headers_t;
    for (name, value) in headers {
        let (vp, vn) = match value {
            Some(v) => (v.as_ptr().cast(), v.len() as isize),
            None => (std::ptr::null(), 0),
        };
        // SAFETY: `native` is the headers `owned` owns; librdkafka copies the
        // name and value out of these live slices.
        let err = unsafe {
            rdkafka::bindings::rd_kafka_header_add(
                native,
                name.as_ptr().cast(),
                name.len() as isize,
                vp,
                vn,
            )
        };
        assert_eq!(
            err,
            rdkafka::bindings::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        );
    }
    owned
}

fn message(topic: &str, headers: OwnedHeaders, payload: &[u8]) -> OwnedMessage {
    OwnedMessage::new(
        Some(payload.to_vec()),
        None,
        topic.into(),
        Timestamp::CreateTime(1_796_293_020_000),
        0,
        0,
        Some(headers),
    )
}

const EVENT: &[u8] =
    br#"{"event_id":"evt-1","account_id":"a","amount_minor":5,"currency":"EUR","kind":"capture"}"#;

#[test]
fn key_derive_crash_a_header_named_0xff_is_read_and_the_message_unkeyed() {
    // The minimized input: key configuration 3 (the Idempotency-Key header,
    // then a semantic key), payload format bytes, max_payload_bytes 64, topic
    // "t", partition 0, offset 0, one header named `\xff` with an empty
    // value, an empty payload.
    let semantic = CompositeKey {
        fields: [
            "account_id",
            "amount_minor",
            "currency",
            "merchant_reference",
        ]
        .map(String::from)
        .to_vec(),
        parts: vec![],
    };
    let decider = Decider::new(TopicRule {
        key_rule: KeyRule {
            header: Some("Idempotency-Key".into()),
            field: None,
            composite: Some(semantic),
        },
        scope: "payments".into(),
        format: PayloadFormat::Bytes,
        window_ms: None,
    })
    .with_max_payload(64);
    let msg = message("t", raw_headers(&[(b"\xff", Some(b""))]), b"");
    let Prepared::Keyed(fresh) = decider.prepare(&msg) else {
        panic!("not keyed");
    };
    let key = IdempotencyKey(b"t/0/0".to_vec());
    assert_eq!(fresh.source, KeySource::Unkeyed);
    assert_eq!(fresh.hash, ScopedKeyHash::new("payments", &key));
    assert_eq!(fresh.key, key);
    assert_eq!(fresh.fingerprint, Fingerprint::of(b""));
}

#[test]
fn a_key_header_beside_one_with_a_non_utf8_name_still_keys_the_message() {
    let decider = Config::default().decider();
    let headers = raw_headers(&[
        (b"trace-\xc3\x28", Some(b"x")),
        (b"idempotency-key", Some(b"k-1")),
        (b"Idempotency-Key\0junk", Some(b"k-1")), // a name ends at its NUL
    ]);
    let Prepared::Keyed(fresh) = decider.prepare(&message("t", headers, EVENT)) else {
        panic!("not keyed");
    };
    assert_eq!(
        (fresh.key.0.as_slice(), fresh.source),
        (&b"k-1"[..], KeySource::Header)
    );
    // Without the key header: the payload field, as before.
    let headers = raw_headers(&[(b"\xff\xfe", Some(b"k-1"))]);
    let Prepared::Keyed(fresh) = decider.prepare(&message("t", headers, EVENT)) else {
        panic!("not keyed");
    };
    assert_eq!(
        (fresh.key.0.as_slice(), fresh.source),
        (&b"evt-1"[..], KeySource::PayloadField)
    );
}

struct Accept;

impl Handler for Accept {
    fn name(&self) -> &'static str {
        "accept"
    }
    fn handle(&mut self, _: &Delivery<'_>, _: &mut HandlerTxn<'_>) -> anyhow::Result<Verdict> {
        Ok(Verdict::Handled)
    }
}

/// The first message of `topic`/0, read by a consumer.
fn first_message(brokers: &str, topic: &str) -> OwnedMessage {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "fuzz-regressions")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            return m.unwrap().detach();
        }
    }
    panic!("no message on {topic}");
}

#[test]
fn a_non_utf8_header_name_crosses_the_wire_and_its_dead_letter_carries_it_replaced() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("t", 1, 1).unwrap();
    cluster.create_topic("t.dlq", 1, 1).unwrap();
    let brokers = cluster.bootstrap_servers();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    // Two disagreeing key headers: a bad key, dead-lettered with the headers.
    let headers = raw_headers(&[
        (b"X-\xff", Some(b"v")),
        (b"Idempotency-Key", Some(b"a")),
        (b"Idempotency-Key", Some(b"b")),
    ]);
    producer
        .send(
            BaseRecord::<(), [u8]>::to("t")
                .payload(EVENT)
                .headers(headers),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    producer.flush(Duration::from_secs(10)).unwrap();

    let msg = first_message(&brokers, "t");
    let names: Vec<&[u8]> = idem::kafka::raw_headers(msg.headers())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        [&b"X-\xff"[..], b"Idempotency-Key", b"Idempotency-Key"]
    );

    let dir = tempfile::tempdir().unwrap();
    let store = DedupStore::open(
        dir.path(),
        StoreOptions::default(),
        Arc::new(idem::clock::SystemClock),
    )
    .unwrap();
    let config = Config {
        brokers: brokers.clone(),
        topics: vec!["t".into()],
        ..Config::default()
    };
    let mut p = BatchProcessor::new(
        &config,
        Arc::new(store),
        AnyHandler::Local(Box::new(Accept)),
        "",
    )
    .unwrap();
    let result = p.process(std::slice::from_ref(&msg)).unwrap();
    assert_eq!(result.outcomes[0].unwrap().counted, Counted::BadKey);

    let letter = first_message(&brokers, "t.dlq");
    let carried: Vec<(Vec<u8>, Option<Vec<u8>>)> = idem::kafka::raw_headers(letter.headers())
        .filter(|(n, _)| !n.starts_with(b"idem-"))
        .map(|(n, v)| (n.to_vec(), v.map(<[u8]>::to_vec)))
        .collect();
    assert_eq!(
        carried,
        [
            ("X-\u{FFFD}".as_bytes().to_vec(), Some(b"v".to_vec())),
            (b"Idempotency-Key".to_vec(), Some(b"a".to_vec())),
            (b"Idempotency-Key".to_vec(), Some(b"b".to_vec())),
        ]
    );
}

#[test]
fn a_replay_dump_writes_a_non_utf8_header_name_with_replacement_characters() {
    let headers = raw_headers(&[(b"n-\xff", Some(b"v")), (b"ok", None)]);
    let mut line = Vec::new();
    idem::replay::kcat::write_line(&mut line, &message("t", headers, EVENT)).unwrap();
    let env: serde_json::Value = serde_json::from_slice(&line).unwrap();
    assert_eq!(
        env["headers"],
        serde_json::json!(["n-\u{FFFD}", "v", "ok", null])
    );
    let back = idem::replay::kcat::parse_line(&line).unwrap();
    let names: Vec<&[u8]> = idem::kafka::raw_headers(back.headers())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["n-\u{FFFD}".as_bytes(), b"ok"]);
}

#[test]
fn the_http_handler_forwards_the_other_headers_and_not_a_non_utf8_name() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/events", listener.local_addr().unwrap());
    let app = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 4096];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).unwrap();
            assert!(n > 0, "the request ended early");
            request.extend_from_slice(&buf[..n]);
        }
        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .unwrap();
        String::from_utf8_lossy(&request).to_lowercase()
    });
    let handler = HttpHandler::new(&idem::config::HttpConfig {
        url,
        ..Default::default()
    })
    .unwrap();
    let headers = raw_headers(&[(b"trace\xff", Some(b"x")), (b"tenant", Some(b"acme"))]);
    let decoded = decode(EVENT, PayloadFormat::Auto).unwrap();
    let key = IdempotencyKey(b"evt-1".to_vec());
    let answer = handler.call(&Delivery {
        topic: "t",
        partition: 0,
        offset: 0,
        timestamp_ms: None,
        key: &key,
        key_source: KeySource::PayloadField,
        payload: EVENT,
        decoded: &decoded,
        headers: Some(&headers),
        fencing_token: None,
    });
    assert!(
        matches!(answer.verdict, Verdict::Handled),
        "{:?}",
        answer.verdict
    );
    let request = app.join().unwrap();
    assert!(
        request.contains("\r\nkafka-header-tenant: acme\r\n"),
        "{request}"
    );
    assert!(!request.contains("trace"), "{request}");
}
