//! Property tests of the code that reads what producers send: any payload,
//! any headers, any key rule reach a decision (or a stated error) without a
//! panic, and the ledger's reading of a decoded event never panics or
//! overflows. No broker: messages are built in memory.

use idem::config::Config;
use idem::handler::ledger;
use idem::pipeline::{Decision, Prepared};
use proptest::prelude::*;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

fn payloads() -> impl Strategy<Value = Option<Vec<u8>>> {
    let json_value = prop_oneof![
        Just("null".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        ".{0,12}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        Just("[1,2]".to_string()),
        Just("{\"a\":{}}".to_string()),
    ];
    let json = (
        json_value.clone(),
        json_value.clone(),
        json_value.clone(),
        json_value,
    )
        .prop_map(|(id, amount, currency, kind)| {
            format!(
                "{{\"event_id\":{id},\"account_id\":\"a\",\"amount_minor\":{amount},\"currency\":{currency},\"kind\":{kind}}}"
            )
            .into_bytes()
        });
    prop_oneof![
        Just(None),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Some),
        json.prop_map(Some),
        // A protobuf-looking prefix followed by noise.
        proptest::collection::vec(any::<u8>(), 0..64).prop_map(|mut v| {
            v.insert(0, 0x0a);
            Some(v)
        }),
    ]
}

fn headers() -> impl Strategy<Value = Vec<(String, Option<Vec<u8>>)>> {
    let name = prop_oneof![
        Just("Idempotency-Key".to_string()),
        Just("idempotency-key".to_string()),
        "[ -~]{0,16}",
    ];
    proptest::collection::vec(
        (
            name,
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        ),
        0..4,
    )
}

fn configs() -> Vec<Config> {
    [
        "topics = [\"t\"]",
        "topics = [\"t\"]\nkey_field = \"\"\nkey = { fields = [\"account_id\", \"amount_minor\", \"currency\"] }",
        "topics = [\"t\"]\nkey_header = \"\"\nkey_field = \"\"\n[key]\nparts = [{ name = \"c\", field = \"/account_id\" }, { name = \"d\", field = \"/amount_minor\", time_window_secs = 60 }, { name = \"h\", hash = [\"/currency\", \"/kind\"] }, { name = \"o\", field = \"/nope\", optional = true }]",
        "topics = [\"t\"]\npayload_format = \"json\"\nmax_payload_bytes = 100",
        "topics = [\"t\"]\npayload_format = \"protobuf\"",
        "topics = [\"t\"]\npayload_format = \"bytes\"",
    ]
    .iter()
    .map(|t| {
        let c: Config = toml::from_str(t).unwrap();
        c.validate().unwrap();
        c
    })
    .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn any_message_gets_a_decision_and_the_ledger_reads_it_safely(
        payload in payloads(),
        hs in headers(),
        key in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..20)),
        offset in 0i64..i64::MAX,
        which in 0usize..6,
    ) {
        let config = &configs()[which];
        let mut owned = OwnedHeaders::new();
        for (k, v) in &hs {
            owned = owned.insert(Header { key: k.as_str(), value: v.as_deref() });
        }
        let msg = OwnedMessage::new(
            payload.clone(),
            key,
            "t".into(),
            Timestamp::CreateTime(offset),
            0,
            offset,
            Some(owned),
        );
        match config.decider().prepare(&msg) {
            Prepared::Final(d) => {
                let dead_letter_like = matches!(
                    d,
                    Decision::Tombstone | Decision::Undecodable(_) | Decision::BadKey(_)
                );
                prop_assert!(dead_letter_like, "a final decision before the store: {d:?}");
                if payload.is_none() {
                    prop_assert!(matches!(d, Decision::Tombstone));
                }
            }
            Prepared::Keyed(fresh) => {
                prop_assert!(!fresh.key.0.is_empty());
                if let Ok(ev) = ledger::payment_event(&fresh.decoded) {
                    // Either a delta or a reason; never a panic or a wrap.
                    if let Ok(delta) = ledger::balance_delta(&ev) {
                        prop_assert!(delta == 0 || delta.unsigned_abs() == ev.amount_minor.unsigned_abs());
                    }
                }
            }
        }
    }
}
