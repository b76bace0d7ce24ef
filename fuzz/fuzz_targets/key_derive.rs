//! Key derivation on realistic messages: a Kafka message (headers and
//! payload) built from the fuzz input and decided by
//! `idem::pipeline::Decider::prepare`, the function the worker and the replay
//! command both use, under several key configurations.
//!
//! Input layout (so that seeds can be written by hand, see
//! `fuzz/corpus/key_derive/seed-*`):
//!
//! ```text
//! byte 0     key configuration (index into CONFIGS, or an arbitrary
//!            composite key for the last index)
//! byte 1     bits 0-1 payload format (auto, json, protobuf, bytes),
//!            bit 2 a max_payload_bytes of 64, bits 3-4 the topic
//! byte 2     partition
//! byte 3-4   offset (big-endian)
//! byte 5     number of headers (mod 6), then per header:
//!              name selector (an index into HEADER_NAMES, else a length
//!              mod 17 and that many raw bytes: on the wire a header name is
//!              any bytes), value length (255: a null value, else mod 32),
//!              value bytes
//! if the configuration is the arbitrary one: a length byte, then that many
//!            bytes describing the composite key
//! the rest   the payload
//! ```
//!
//! Properties checked:
//! - deterministic: the same message always gets the same decision, key,
//!   store hash and fingerprint, and `KeyRule::derive` called directly agrees
//!   with `prepare`;
//! - headers are read without panicking, whatever bytes their names are;
//! - the order of the headers and headers of other names do not change the
//!   key;
//! - each key source's key is what the configuration says: the header's
//!   value, the payload field, the composite rule's key (`sem:` + 32 hex for
//!   a semantic key), or `topic/partition/offset`;
//! - a bad key is explained: disagreeing headers really disagree, an empty
//!   header really is empty;
//! - an undecodable payload is exactly `payload::decode`'s error (or too
//!   large);
//! - the store hash is `ScopedKeyHash::new(scope, key)`; the fingerprint is
//!   the payload's, or the composite rule's;
//! - canonical keys: the same JSON object re-serialised with other
//!   whitespace gets the same key and (for composite keys) fingerprint, and
//!   a protobuf event rewritten as the equivalent JSON object gets the same
//!   key as the protobuf.
#![no_main]

use idem::key::{CompositeKey, Fingerprint, KeyError, KeyPart, KeyRule, KeySource, ScopedKeyHash};
use idem::payload::{decode, DecodeError, Decoded, PayloadFormat};
use idem::pipeline::{Decider, Decision, Prepared, TopicRule};
use idem::proto::PaymentEvent;
use libfuzzer_sys::fuzz_target;
use rdkafka::message::{BorrowedHeaders, OwnedHeaders, OwnedMessage, Timestamp};

const SCOPE: &str = "payments";
const TOPICS: &[&str] = &["payments", "captures", "refunds.v2", "t"];
const HEADER_NAMES: &[&str] = &[
    "Idempotency-Key",
    "idempotency-key",
    "IDEMPOTENCY-KEY",
    "traceparent",
    "Idempotency-Key ",
    "content-type",
    "Idempotency_Key",
    "X-Request-Id",
];
const KEY_HEADER: &str = "Idempotency-Key";
/// Pointers an arbitrary composite key is made of.
const FIELDS: &[&str] = &[
    "/event_id",
    "account_id",
    "/account_id",
    "/amount_minor",
    "amount",
    "/currency",
    "/kind",
    "/occurred_at_ms",
    "occurred_at_ms",
    "/merchant_reference",
    "/client_id",
    "/meta/x",
    "/items/0",
    "/a~1b",
    "/",
    "",
    " /x",
];

fn part(name: &str) -> KeyPart {
    KeyPart {
        name: name.into(),
        ..KeyPart::default()
    }
}

fn semantic() -> CompositeKey {
    CompositeKey {
        fields: [
            "account_id",
            "amount_minor",
            "currency",
            "merchant_reference",
        ]
        .map(String::from)
        .to_vec(),
        parts: vec![],
    }
}

/// The composed key of the module documentation of `key::composite`.
fn composed() -> CompositeKey {
    CompositeKey {
        fields: vec![],
        parts: vec![
            KeyPart {
                field: Some("/account_id".into()),
                ..part("client")
            },
            KeyPart {
                literal: Some("capture".into()),
                ..part("op")
            },
            KeyPart {
                field: Some("/merchant_reference".into()),
                optional: true,
                ..part("order")
            },
            KeyPart {
                field: Some("/occurred_at_ms".into()),
                time_window_secs: Some(86_400),
                ..part("day")
            },
            KeyPart {
                hash: vec!["/amount_minor".into(), "/currency".into()],
                ..part("content")
            },
        ],
    }
}

/// Fixed configurations, as `Config::decider` builds them (every pointer
/// starts with `/`, as `validate_key_field` requires).
fn config(i: u8) -> Option<KeyRule> {
    let header = Some(KEY_HEADER.to_string());
    let field = Some("/event_id".to_string());
    Some(match i {
        // The defaults of deploy/idem.example.toml.
        0 => KeyRule {
            header,
            field,
            composite: None,
        },
        1 => KeyRule {
            header,
            field: None,
            composite: None,
        },
        2 => KeyRule {
            header: None,
            field,
            composite: None,
        },
        3 => KeyRule {
            header,
            field: None,
            composite: Some(semantic()),
        },
        4 => KeyRule {
            header: None,
            field: Some("/merchant_reference".into()),
            composite: Some(composed()),
        },
        5 => KeyRule {
            header: None,
            field: None,
            composite: None,
        },
        _ => return None,
    })
}
const FIXED_CONFIGS: u8 = 6;

/// Reads the input front to back; past its end every byte is 0.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
    fn str(&mut self, max: u8) -> String {
        let n = self.u8() % (max + 1);
        String::from_utf8_lossy(self.bytes(n as usize)).into_owned()
    }
    fn field(&mut self) -> String {
        let i = self.u8() as usize;
        match FIELDS.get(i) {
            Some(f) => f.to_string(),
            None => self.str(12),
        }
    }
}

/// An arbitrary composite key; `None` unless it passes `validate`, as
/// configurations must.
fn arbitrary_composite(r: &mut Reader) -> Option<CompositeKey> {
    let mut key = CompositeKey {
        fields: vec![],
        parts: vec![],
    };
    if r.u8().is_multiple_of(2) {
        for _ in 0..1 + r.u8() % 5 {
            key.fields.push(r.field());
        }
    } else {
        for i in 0..1 + r.u8() % 5 {
            let flags = r.u8();
            let name = if flags & 0x80 != 0 {
                r.str(8)
            } else {
                format!("p{i}")
            };
            let mut p = part(&name);
            p.optional = flags & 1 != 0;
            match (flags >> 1) % 3 {
                0 => p.field = Some(r.field()),
                1 => p.literal = Some(r.str(8)),
                _ => {
                    for _ in 0..1 + r.u8() % 3 {
                        p.hash.push(r.field());
                    }
                }
            }
            if flags & 0x08 != 0 {
                let w =
                    u64::from_be_bytes(r.bytes(8).try_into().unwrap_or([0, 0, 0, 0, 0, 0, 0, 1]));
                // TOML integers are i64: a configuration cannot say more.
                p.time_window_secs = Some(w % (i64::MAX as u64 + 1));
            }
            key.parts.push(p);
        }
    }
    key.validate().ok().map(|_| key)
}

/// One fuzz case: a message and how its topic is configured.
#[derive(Debug)]
struct Case {
    rule: KeyRule,
    fixed_config: bool,
    format: PayloadFormat,
    max_payload: usize,
    topic: &'static str,
    partition: i32,
    offset: i64,
    headers: Vec<RawHeader>,
    payload: Vec<u8>,
}

/// A header as it comes off the wire: name and value are bytes.
type RawHeader = (Vec<u8>, Option<Vec<u8>>);

/// The name of a header as librdkafka hands it out: a C string, so up to its
/// first NUL byte.
fn visible_name(name: &[u8]) -> &[u8] {
    name.split(|b| *b == 0).next().unwrap_or_default()
}

impl Case {
    fn parse(data: &[u8]) -> Option<Case> {
        let mut r = Reader(data);
        let cfg = r.u8() % (FIXED_CONFIGS + 1);
        let flags = r.u8();
        let format = [
            PayloadFormat::Auto,
            PayloadFormat::Json,
            PayloadFormat::Protobuf,
            PayloadFormat::Bytes,
        ][(flags & 3) as usize];
        let max_payload = if flags & 4 != 0 { 64 } else { 0 };
        let topic = TOPICS[((flags >> 3) & 3) as usize];
        let partition = (r.u8() % 16) as i32;
        let offset = u16::from_be_bytes([r.u8(), r.u8()]) as i64;
        let mut headers = Vec::new();
        for _ in 0..r.u8() % 6 {
            let sel = r.u8() as usize;
            let name = match HEADER_NAMES.get(sel) {
                Some(n) => n.as_bytes().to_vec(),
                None => {
                    let n = r.u8() % 17;
                    r.bytes(n as usize).to_vec()
                }
            };
            let len = r.u8();
            let value = (len != 255).then(|| r.bytes((len % 32) as usize).to_vec());
            headers.push((name, value));
        }
        let (rule, fixed_config) = match config(cfg) {
            Some(rule) => (rule, true),
            None => {
                let n = r.u8() as usize;
                let mut spec = Reader(r.bytes(n));
                let header = (spec.u8() % 2 == 0).then(|| KEY_HEADER.to_string());
                let composite = Some(arbitrary_composite(&mut spec)?);
                (
                    KeyRule {
                        header,
                        field: None,
                        composite,
                    },
                    false,
                )
            }
        };
        Some(Case {
            rule,
            fixed_config,
            format,
            max_payload,
            topic,
            partition,
            offset,
            headers,
            payload: r.0.to_vec(),
        })
    }

    fn decider(&self) -> Decider {
        Decider::new(TopicRule {
            key_rule: self.rule.clone(),
            scope: SCOPE.into(),
            format: self.format,
            window_ms: None,
        })
        .with_max_payload(self.max_payload)
    }

    /// The message a consumer would hand out. Headers are added through
    /// librdkafka itself, as its protocol reader does, because
    /// `OwnedHeaders::insert` only takes UTF-8 names.
    fn message(&self, headers: &[RawHeader], payload: &[u8]) -> OwnedMessage {
        let owned = OwnedHeaders::new_with_capacity(headers.len());
        // SAFETY: a `&BorrowedHeaders` is the address of the native
        // `rd_kafka_headers_t` (rdkafka's own `as_native_ptr` is this cast),
        // owned by `owned` and alive for the call; librdkafka copies the name
        // and value, whose pointers and lengths are those of live slices.
        let native = owned.as_borrowed() as *const BorrowedHeaders
            as *mut rdkafka::bindings::rd_kafka_headers_t;
        for (name, value) in headers {
            let (vp, vn) = match value {
                Some(v) => (v.as_ptr().cast(), v.len() as isize),
                None => (std::ptr::null(), 0),
            };
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
        OwnedMessage::new(
            Some(payload.to_vec()),
            None,
            self.topic.to_string(),
            Timestamp::CreateTime(1_796_293_020_000),
            self.partition,
            self.offset,
            Some(owned),
        )
    }

    fn matching(&self) -> Vec<&[u8]> {
        let Some(name) = &self.rule.header else {
            return vec![];
        };
        self.headers
            .iter()
            .filter(|(h, _)| visible_name(h).eq_ignore_ascii_case(name.as_bytes()))
            .map(|(_, v)| v.as_deref().unwrap_or_default())
            .collect()
    }
}

/// What a decision says, comparable.
#[derive(Debug, PartialEq)]
enum Outcome {
    Undecodable(DecodeError),
    BadKey(KeyError),
    Keyed {
        key: Vec<u8>,
        source: KeySource,
        hash: ScopedKeyHash,
        fingerprint: Fingerprint,
    },
}

fn outcome(decider: &Decider, msg: &OwnedMessage) -> (Outcome, Option<Decoded>) {
    match decider.prepare(msg) {
        Prepared::Final(Decision::Undecodable(e)) => (Outcome::Undecodable(e), None),
        Prepared::Final(Decision::BadKey(e)) => (Outcome::BadKey(e), None),
        Prepared::Keyed(f) => (
            Outcome::Keyed {
                key: f.key.0,
                source: f.source,
                hash: f.hash,
                fingerprint: f.fingerprint,
            },
            Some(f.decoded),
        ),
        Prepared::Final(other) => panic!("a message with a payload gave {other:?}"),
    }
}

/// The JSON object a producer would send for `ev`, field for field.
fn as_json(ev: &PaymentEvent) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "event_id": ev.event_id,
        "account_id": ev.account_id,
        "amount_minor": ev.amount_minor,
        "currency": ev.currency,
        "kind": ev.kind().as_str_name(),
        "occurred_at_ms": ev.occurred_at_ms,
        "merchant_reference": ev.merchant_reference,
    }))
    .expect("a JSON value serialises")
}

fuzz_target!(|data: &[u8]| {
    let Some(case) = Case::parse(data) else {
        return;
    };
    let decider = case.decider();
    let msg = case.message(&case.headers, &case.payload);
    let (got, decoded) = outcome(&decider, &msg);

    // Deterministic, and the same as `KeyRule::derive` called directly.
    assert_eq!(outcome(&decider, &msg).0, got);
    assert_eq!(
        outcome(&decider, &case.message(&case.headers, &case.payload)).0,
        got
    );
    if let (Some(d), Outcome::Keyed { key, source, .. }) = (&decoded, &got) {
        let names: Vec<String> = case
            .headers
            .iter()
            .map(|(k, _)| String::from_utf8_lossy(visible_name(k)).into_owned())
            .collect();
        let headers = names
            .iter()
            .zip(&case.headers)
            .map(|(k, (_, v))| (k.as_str(), v.as_deref()));
        let direct = case
            .rule
            .derive(headers, d, case.topic, case.partition, case.offset)
            .expect("derive agrees with prepare");
        assert_eq!((&direct.0 .0, direct.1), (key, *source));
    }

    // Header order, and headers of other names, do not matter.
    let mut reordered: Vec<_> = case.headers.iter().rev().cloned().collect();
    reordered.insert(0, (b"X-Unrelated".to_vec(), Some(b"v".to_vec())));
    reordered.push((b"Idempotency-Keys".to_vec(), None));
    assert_eq!(
        outcome(&decider, &case.message(&reordered, &case.payload)).0,
        got,
        "headers reordered"
    );

    let matching = case.matching();
    match &got {
        Outcome::Undecodable(e) => {
            if case.max_payload > 0 && case.payload.len() > case.max_payload {
                assert_eq!(
                    e,
                    &DecodeError::TooLarge {
                        size: case.payload.len(),
                        max: case.max_payload
                    }
                );
            } else {
                assert_eq!(
                    Err(e.clone()),
                    decode(&case.payload, case.format).map(|_| ())
                );
            }
            return;
        }
        Outcome::BadKey(KeyError::ConflictingHeaders { header, count }) => {
            assert_eq!(Some(header), case.rule.header.as_ref());
            assert_eq!(*count, matching.len());
            assert!(matching.iter().any(|v| *v != matching[0]));
            return;
        }
        Outcome::BadKey(KeyError::EmptyHeader { header }) => {
            assert_eq!(Some(header), case.rule.header.as_ref());
            assert!(!matching.is_empty() && matching.iter().all(|v| v.is_empty()));
            return;
        }
        Outcome::Keyed { .. } => {}
    }
    let Outcome::Keyed {
        key,
        source,
        hash,
        fingerprint,
    } = &got
    else {
        unreachable!()
    };
    let decoded = decoded.expect("a keyed message has its payload");
    assert!(case.max_payload == 0 || case.payload.len() <= case.max_payload);
    assert_eq!(
        *hash,
        ScopedKeyHash::new(SCOPE, &idem::key::IdempotencyKey(key.clone()))
    );
    assert!(!key.is_empty(), "an empty key");

    // Each source gives what the configuration says, and only when the
    // sources before it did not match.
    let field_value = case.rule.field.as_deref().and_then(|f| decoded.field(f));
    let composite_key = case
        .rule
        .composite
        .as_ref()
        .and_then(|c| c.derive(&decoded));
    match source {
        KeySource::Header => {
            assert!(!matching.is_empty());
            assert!(matching.iter().all(|v| v == key));
        }
        KeySource::PayloadField => {
            assert!(matching.is_empty());
            assert_eq!(field_value.as_deref().map(str::as_bytes), Some(&key[..]));
        }
        KeySource::Composite => {
            assert!(matching.is_empty() && field_value.is_none());
            assert_eq!(composite_key.as_ref(), Some(key));
            let c = case.rule.composite.as_ref().unwrap();
            if !c.fields.is_empty() {
                assert!(key.starts_with(b"sem:") && key.len() == 36, "{key:?}");
                assert!(key[4..].iter().all(|b| b"0123456789abcdef".contains(b)));
            }
        }
        KeySource::Unkeyed => {
            assert!(matching.is_empty() && field_value.is_none() && composite_key.is_none());
            let expected = format!("{}/{}/{}", case.topic, case.partition, case.offset);
            assert_eq!(key, expected.as_bytes());
        }
    }
    let expected_fingerprint = match (&case.rule.composite, source) {
        (Some(c), KeySource::Composite) => c.fingerprint(key, &decoded, &case.payload),
        _ => Fingerprint::of(&case.payload),
    };
    assert_eq!(*fingerprint, expected_fingerprint);

    // The same JSON object with other whitespace: the same key (and, for a
    // composite key, the same fingerprint). Only when serde_json reads back
    // the value it wrote (its float parsing is not always exact).
    if let Decoded::Json(v) = &decoded {
        let pretty = serde_json::to_vec_pretty(v).expect("a JSON value serialises");
        let same_value = serde_json::from_slice::<serde_json::Value>(&pretty)
            .ok()
            .as_ref()
            == Some(v);
        let fits = case.max_payload == 0 || pretty.len() <= case.max_payload;
        if same_value && fits {
            match outcome(&decider, &case.message(&case.headers, &pretty)).0 {
                Outcome::Keyed {
                    key: k2,
                    source: s2,
                    fingerprint: f2,
                    ..
                } => {
                    assert_eq!((&k2, s2), (key, *source), "re-serialised JSON");
                    if *source == KeySource::Composite {
                        assert_eq!(
                            f2, *fingerprint,
                            "re-serialised JSON, composite fingerprint"
                        );
                    }
                }
                other => panic!("re-serialised JSON gave {other:?}"),
            }
        }
    }

    // A protobuf event and the equivalent JSON object: the same key, under
    // the fixed configurations (whose pointers are all one segment deep, as
    // a protobuf event's fields are).
    if let (Decoded::Proto(ev), true) = (&decoded, case.fixed_config) {
        let json = as_json(ev);
        let json_case = Case {
            format: PayloadFormat::Auto,
            max_payload: 0,
            rule: case.rule.clone(),
            headers: case.headers.clone(),
            payload: json.clone(),
            ..case
        };
        match outcome(
            &json_case.decider(),
            &json_case.message(&json_case.headers, &json),
        )
        .0
        {
            Outcome::Keyed {
                key: k2,
                source: s2,
                ..
            } => assert_eq!((&k2, s2), (key, *source), "protobuf as JSON: {json_case:?}"),
            other => panic!("protobuf as JSON gave {other:?}"),
        }
    }
});
