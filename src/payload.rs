//! Decoding a message payload into something keys and handlers can read.
//!
//! Guarantee: a payload either decodes to exactly one form or yields a
//! [`DecodeError`] whose text says what was wrong, which becomes the
//! dead-letter reason. Nothing here panics on any input.

use crate::proto::PaymentEvent;
use prost::Message as _;
use serde::{Deserialize, Serialize};

/// How payloads of a topic are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// A JSON object when the first non-blank byte is `{`, else a protobuf
    /// `PaymentEvent`.
    #[default]
    Auto,
    /// Always a JSON object.
    Json,
    /// Always a protobuf `PaymentEvent`.
    Protobuf,
    /// Opaque bytes: never decoded, keyed by header (or unkeyed) only.
    Bytes,
}

/// A decoded payload.
#[derive(Debug, Clone)]
pub enum Decoded {
    /// A JSON object.
    Json(serde_json::Value),
    /// A protobuf payment event.
    Proto(PaymentEvent),
    /// Bytes that idem does not interpret.
    Opaque,
}

/// Why a payload could not be decoded; the text is the dead-letter reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A zero-length payload (distinct from a null payload, a tombstone).
    #[error("empty payload")]
    Empty,
    /// Looked like JSON but did not parse as a JSON object.
    #[error("invalid JSON payload: {0}")]
    Json(String),
    /// Did not parse as a protobuf `PaymentEvent`.
    #[error("payload is neither a JSON object nor a protobuf PaymentEvent: {0}")]
    Protobuf(String),
    /// Larger than `max_payload_bytes`.
    #[error("payload of {size} bytes is over max_payload_bytes ({max})")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The configured maximum.
        max: usize,
    },
}

/// Decodes `bytes` as `format` says.
pub fn decode(bytes: &[u8], format: PayloadFormat) -> Result<Decoded, DecodeError> {
    if format == PayloadFormat::Bytes {
        return Ok(Decoded::Opaque);
    }
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let looks_like_json = bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    match format {
        PayloadFormat::Json => decode_json(bytes),
        PayloadFormat::Protobuf => decode_proto(bytes),
        _ if looks_like_json => decode_json(bytes),
        _ => decode_proto(bytes),
    }
}

fn decode_json(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(v @ serde_json::Value::Object(_)) => Ok(Decoded::Json(v)),
        Ok(_) => Err(DecodeError::Json("not a JSON object".into())),
        Err(e) => Err(DecodeError::Json(e.to_string())),
    }
}

fn decode_proto(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    PaymentEvent::decode(bytes)
        .map(Decoded::Proto)
        .map_err(|e| DecodeError::Protobuf(e.to_string()))
}

impl Decoded {
    /// The text at a JSON pointer (`/event_id`), or for a protobuf event the
    /// field named by the pointer's last segment. Numbers are rendered as their
    /// JSON text; absent, null and empty values are `None`.
    pub fn field(&self, pointer: &str) -> Option<String> {
        let value = match self {
            Decoded::Json(v) => match v.pointer(pointer)? {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => return None,
            },
            Decoded::Proto(ev) => payment_event_field(ev, pointer.rsplit('/').next()?)?,
            Decoded::Opaque => return None,
        };
        (!value.is_empty()).then_some(value)
    }
}

/// A `PaymentEvent` field by its proto name, as text.
pub fn payment_event_field(ev: &PaymentEvent, name: &str) -> Option<String> {
    Some(match name {
        "event_id" => ev.event_id.clone(),
        "account_id" => ev.account_id.clone(),
        "amount_minor" | "amount" => ev.amount_minor.to_string(),
        "currency" => ev.currency.clone(),
        "kind" => ev.kind().as_str_name().to_string(),
        "occurred_at_ms" => ev.occurred_at_ms.to_string(),
        "merchant_reference" => ev.merchant_reference.clone(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_object_decodes_and_exposes_fields() {
        let d = decode(
            br#" {"event_id":"e-1","amount_minor":5}"#,
            PayloadFormat::Auto,
        )
        .unwrap();
        assert_eq!(d.field("/event_id").as_deref(), Some("e-1"));
        assert_eq!(d.field("/amount_minor").as_deref(), Some("5"));
        assert_eq!(d.field("/missing"), None);
    }

    #[test]
    fn protobuf_event_decodes_and_exposes_fields() {
        let ev = PaymentEvent {
            event_id: "p-1".into(),
            amount_minor: 7,
            ..Default::default()
        };
        let d = decode(&ev.encode_to_vec(), PayloadFormat::Auto).unwrap();
        assert_eq!(d.field("/event_id").as_deref(), Some("p-1"));
        assert_eq!(d.field("account_id"), None);
    }

    #[test]
    fn garbage_and_empty_payloads_are_specific_errors() {
        assert_eq!(
            decode(b"", PayloadFormat::Auto).unwrap_err(),
            DecodeError::Empty
        );
        assert!(matches!(
            decode(b"{not json", PayloadFormat::Auto),
            Err(DecodeError::Json(_))
        ));
        assert!(matches!(
            decode(&[0xff, 0xff, 0xff, 0xff], PayloadFormat::Auto),
            Err(DecodeError::Protobuf(_))
        ));
        assert!(matches!(
            decode(b"[1,2]", PayloadFormat::Json),
            Err(DecodeError::Json(_))
        ));
    }

    #[test]
    fn bytes_format_never_decodes() {
        assert!(matches!(
            decode(&[0xff], PayloadFormat::Bytes),
            Ok(Decoded::Opaque)
        ));
    }
}
