//! `idem::payload::decode` on any bytes, in every format.
//!
//! Properties checked, beyond "never panics":
//! - `Bytes` is always `Opaque`; an empty payload is `DecodeError::Empty` in
//!   every other format;
//! - `Json` is a JSON object or `DecodeError::Json`, `Protobuf` a
//!   `PaymentEvent` or `DecodeError::Protobuf`, never another variant, and
//!   every error has a reason to put on the dead letter;
//! - `Auto` is exactly `Json` when the first non-blank byte is `{` and
//!   exactly `Protobuf` otherwise;
//! - decoding is deterministic;
//! - a decoded `PaymentEvent` re-encodes to bytes that decode to the same
//!   event;
//! - `Decoded::field` never yields an empty value, and for a protobuf event
//!   agrees with `payment_event_field` on the pointer's last segment.
#![no_main]

use idem::payload::{decode, payment_event_field, DecodeError, Decoded, PayloadFormat};
use idem::proto::PaymentEvent;
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

/// Pointers as configurations write them, and some that are not.
const POINTERS: &[&str] = &[
    "/event_id",
    "/account_id",
    "/amount_minor",
    "/amount",
    "/currency",
    "/kind",
    "/occurred_at_ms",
    "/merchant_reference",
    "/metadata",
    "/metadata/k",
    "/a/b",
    "/0",
    "/a~1b",
    "/~0",
    "/",
    "",
    "event_id",
];

/// The same result, variant and value.
fn same(a: &Result<Decoded, DecodeError>, b: &Result<Decoded, DecodeError>) -> bool {
    match (a, b) {
        (Ok(Decoded::Json(x)), Ok(Decoded::Json(y))) => x == y,
        (Ok(Decoded::Proto(x)), Ok(Decoded::Proto(y))) => x == y,
        (Ok(Decoded::Opaque), Ok(Decoded::Opaque)) => true,
        (Err(x), Err(y)) => x == y,
        _ => false,
    }
}

fn check_fields(d: &Decoded) {
    for p in POINTERS {
        let v = d.field(p);
        assert_ne!(v.as_deref(), Some(""), "field({p:?}) is Some(\"\")");
        if let Decoded::Proto(ev) = d {
            let by_name = p
                .rsplit('/')
                .next()
                .and_then(|n| payment_event_field(ev, n))
                .filter(|v| !v.is_empty());
            assert_eq!(v, by_name, "field({p:?}) of a PaymentEvent");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    assert!(matches!(
        decode(data, PayloadFormat::Bytes),
        Ok(Decoded::Opaque)
    ));

    let json = decode(data, PayloadFormat::Json);
    let proto = decode(data, PayloadFormat::Protobuf);
    let auto = decode(data, PayloadFormat::Auto);

    if data.is_empty() {
        for r in [&json, &proto, &auto] {
            assert_eq!(r.as_ref().unwrap_err(), &DecodeError::Empty);
        }
        return;
    }

    match &json {
        Ok(Decoded::Json(v)) => assert!(v.is_object(), "Json decoded to a non-object"),
        Err(e @ DecodeError::Json(reason)) => {
            assert!(!reason.is_empty());
            assert!(e.to_string().starts_with("invalid JSON payload: "));
        }
        other => panic!("Json format gave {other:?}"),
    }
    match &proto {
        Ok(Decoded::Proto(ev)) => {
            let bytes = ev.encode_to_vec();
            if bytes.is_empty() {
                // Every field at its default: nothing to write, and an empty
                // payload is `Empty`, not an event.
                assert_eq!(ev, &PaymentEvent::default());
                assert_eq!(
                    decode(&bytes, PayloadFormat::Protobuf).unwrap_err(),
                    DecodeError::Empty
                );
            } else {
                match decode(&bytes, PayloadFormat::Protobuf) {
                    Ok(Decoded::Proto(again)) => assert_eq!(&again, ev),
                    other => panic!("re-encoded event gave {other:?}"),
                }
            }
        }
        Err(e @ DecodeError::Protobuf(reason)) => {
            assert!(!reason.is_empty());
            assert!(e
                .to_string()
                .starts_with("payload is neither a JSON object nor a protobuf PaymentEvent: "));
        }
        other => panic!("Protobuf format gave {other:?}"),
    }

    let first = data.iter().find(|b| !b.is_ascii_whitespace());
    let expected = if first == Some(&b'{') { &json } else { &proto };
    assert!(
        same(&auto, expected),
        "Auto gave {auto:?}, expected {expected:?}"
    );

    // Deterministic.
    assert!(same(&decode(data, PayloadFormat::Auto), &auto));

    for d in [&json, &proto].into_iter().flatten() {
        check_fields(d);
    }
});
