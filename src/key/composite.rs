//! Keys built from the payload, for producers that send no id: a semantic key
//! (a canonical hash of chosen business fields, so two messages that mean the
//! same operation dedup together) or a key composed of named parts, as payment
//! teams write them: client id + operation type + business context + an
//! optional time window + a content hash.
//!
//! ```toml
//! key = { fields = ["account_id", "amount_minor", "currency", "merchant_reference"] }
//! # or
//! [key]
//! parts = [
//!   { name = "client",  field = "/client_id" },
//!   { name = "op",      literal = "capture" },
//!   { name = "order",   field = "/merchant_reference" },
//!   { name = "day",     field = "/occurred_at_ms", time_window_secs = 86400 },
//!   { name = "content", hash = ["/amount_minor", "/currency"] },
//! ]
//! ```
//!
//! Guarantees:
//! - Canonical: the key depends only on the values of the named fields (JSON
//!   or protobuf alike, in any field order or whitespace of the JSON), never
//!   on anything else in the payload. An absent, null or empty field counts as
//!   absent, and absent differs from every value.
//! - Unambiguous: the composed key is `name=value&name=value...` with `%`,
//!   `&` and `=` percent-escaped inside values, so no two part lists give the
//!   same text; semantic keys are `sem:` and the hex of a 128-bit hash.
//! - A part that is not `optional` and whose field is absent makes the rule not
//!   match (the next key source applies), rather than producing a key that
//!   would merge different operations.

use crate::key::Fingerprint;
use crate::payload::Decoded;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use xxhash_rust::xxh3::xxh3_128;

/// A key rule computed from payload fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompositeKey {
    /// Semantic key: a canonical hash of these fields.
    #[serde(default)]
    pub fields: Vec<String>,
    /// Composed key: these parts, in order.
    #[serde(default)]
    pub parts: Vec<KeyPart>,
}

/// One named part of a composed key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPart {
    /// The part's name, written into the key.
    pub name: String,
    /// A payload field (JSON pointer, or a `PaymentEvent` field name).
    #[serde(default)]
    pub field: Option<String>,
    /// A constant, such as the operation type of a flow step.
    #[serde(default)]
    pub literal: Option<String>,
    /// A content hash of these fields.
    #[serde(default)]
    pub hash: Vec<String>,
    /// With `field`: the field is a Unix time in milliseconds, floored to
    /// windows of this many seconds (86400: the day).
    #[serde(default)]
    pub time_window_secs: Option<u64>,
    /// An absent field leaves the part empty instead of failing the rule.
    #[serde(default)]
    pub optional: bool,
}

/// A field name as a JSON pointer: `account_id` means `/account_id`.
fn pointer(field: &str) -> String {
    if field.starts_with('/') {
        field.to_string()
    } else {
        format!("/{field}")
    }
}

/// The canonical hash of `fields`: each as its name, a presence byte and its
/// value, length-prefixed.
fn canonical_hash(payload: &Decoded, fields: &[String]) -> String {
    let mut buf = Vec::new();
    for f in fields {
        let name = pointer(f);
        buf.extend_from_slice(&(name.len() as u32).to_be_bytes());
        buf.extend_from_slice(name.as_bytes());
        match payload.field(&name) {
            Some(v) => {
                buf.push(1);
                buf.extend_from_slice(&(v.len() as u32).to_be_bytes());
                buf.extend_from_slice(v.as_bytes());
            }
            None => buf.push(0),
        }
    }
    hex::encode(xxh3_128(&buf).to_be_bytes())
}

fn escape_into(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '%' | '&' | '=' => {
                let _ = write!(out, "%{:02X}", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// A JSON value with every object's keys in sorted order, compact: the same
/// document whatever its field order or whitespace.
fn canonical_json(v: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match v {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                // A string always serialises.
                out.extend_from_slice(&serde_json::to_vec(k).unwrap_or_default());
                out.push(b':');
                canonical_json(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical_json(v, out);
            }
            out.push(b']');
        }
        other => out.extend_from_slice(&serde_json::to_vec(other).unwrap_or_default()),
    }
}

impl CompositeKey {
    /// The fingerprint of a message keyed by this rule, which decides between
    /// a duplicate and a conflict:
    /// - a semantic key (`fields`) names every field that makes the
    ///   operation, so the fingerprint is the key itself: a re-send with
    ///   other ids, field order, whitespace or extra fields is a duplicate,
    ///   never a conflict;
    /// - a composed key (`parts`) fingerprints the payload's content: for JSON
    ///   its canonical form (sorted keys, no whitespace), so only a change of
    ///   a value is a conflict; for other payloads the bytes.
    pub fn fingerprint(&self, key: &[u8], payload: &Decoded, raw: &[u8]) -> Fingerprint {
        if !self.fields.is_empty() {
            return Fingerprint::of(key);
        }
        match payload {
            Decoded::Json(v) => {
                let mut buf = Vec::with_capacity(raw.len());
                canonical_json(v, &mut buf);
                Fingerprint::of(&buf)
            }
            _ => Fingerprint::of(raw),
        }
    }

    /// Checks the rule; the error names the part and what is allowed.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.fields.is_empty() == self.parts.is_empty() {
            anyhow::bail!("`key` must have exactly one of `fields` (a semantic key) or `parts` (a composed key)");
        }
        let bad_field = |f: &String| f.trim().is_empty() || f.contains(char::is_whitespace);
        if let Some(f) = self.fields.iter().find(|f| bad_field(f)) {
            anyhow::bail!("`key.fields`: {f:?} is not a field name or JSON pointer");
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, p) in self.parts.iter().enumerate() {
            if p.name.is_empty() {
                anyhow::bail!("`key.parts[{i}].name` must not be empty");
            }
            if !names.insert(p.name.as_str()) {
                anyhow::bail!("`key.parts[{i}].name` {:?} is used twice", p.name);
            }
            if let Some(f) = p.field.iter().chain(&p.hash).find(|f| bad_field(f)) {
                anyhow::bail!(
                    "`key.parts[{i}]` ({}): {f:?} is not a field name or JSON pointer",
                    p.name
                );
            }
            let sources = [p.field.is_some(), p.literal.is_some(), !p.hash.is_empty()]
                .iter()
                .filter(|b| **b)
                .count();
            if sources != 1 {
                anyhow::bail!(
                    "`key.parts[{i}]` ({}) must have exactly one of `field`, `literal` or `hash`",
                    p.name
                );
            }
            if p.time_window_secs.is_some() && p.field.is_none() {
                anyhow::bail!(
                    "`key.parts[{i}].time_window_secs` needs `field` (a time in Unix milliseconds)"
                );
            }
            if p.time_window_secs == Some(0) {
                anyhow::bail!("`key.parts[{i}].time_window_secs` must be at least 1");
            }
        }
        if !self.parts.is_empty()
            && !self
                .parts
                .iter()
                .any(|p| !p.optional && (p.field.is_some() || !p.hash.is_empty()))
        {
            anyhow::bail!(
                "`key.parts` needs at least one part that is not optional and reads the payload (`field` or `hash`): \
                 literals and optional parts alone would give different operations the same key"
            );
        }
        Ok(())
    }

    /// The key of `payload`, or `None` when a required field is absent.
    pub fn derive(&self, payload: &Decoded) -> Option<Vec<u8>> {
        if !self.fields.is_empty() {
            if self
                .fields
                .iter()
                .all(|f| payload.field(&pointer(f)).is_none())
            {
                return None; // nothing to hash: not this kind of message
            }
            return Some(format!("sem:{}", canonical_hash(payload, &self.fields)).into_bytes());
        }
        let mut out = String::new();
        for p in &self.parts {
            let value = if let Some(l) = &p.literal {
                l.clone()
            } else if !p.hash.is_empty() {
                let absent = p.hash.iter().all(|f| payload.field(&pointer(f)).is_none());
                match (absent, p.optional) {
                    (true, true) => String::new(),
                    (true, false) => return None,
                    (false, _) => canonical_hash(payload, &p.hash),
                }
            } else {
                let field = pointer(p.field.as_deref().unwrap_or_default());
                match (payload.field(&field), p.time_window_secs) {
                    (None, _) if p.optional => String::new(),
                    (None, _) => return None,
                    (Some(v), None) => v,
                    (Some(v), Some(w)) => {
                        let ms: i64 = v.parse().ok()?;
                        let w = (w as i64).saturating_mul(1000);
                        ms.div_euclid(w).saturating_mul(w).to_string()
                    }
                }
            };
            if !out.is_empty() {
                out.push('&');
            }
            escape_into(&mut out, &p.name);
            out.push('=');
            escape_into(&mut out, &value);
        }
        Some(out.into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{decode, PayloadFormat};
    use crate::proto::PaymentEvent;
    use prost::Message as _;

    fn json(s: &str) -> Decoded {
        decode(s.as_bytes(), PayloadFormat::Json).unwrap()
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

    #[test]
    fn a_semantic_key_ignores_field_order_whitespace_and_other_fields_and_matches_protobuf() {
        let a = json(
            r#"{"account_id":"a-1","amount_minor":500,"currency":"EUR","merchant_reference":"ord-9","event_id":"x"}"#,
        );
        let b = json(
            r#"{ "currency" : "EUR", "merchant_reference":"ord-9", "amount_minor": 500, "account_id":"a-1", "event_id":"y", "note":"retry" }"#,
        );
        let ev = PaymentEvent {
            event_id: "z".into(),
            account_id: "a-1".into(),
            amount_minor: 500,
            currency: "EUR".into(),
            merchant_reference: "ord-9".into(),
            ..Default::default()
        };
        let c = decode(&ev.encode_to_vec(), PayloadFormat::Protobuf).unwrap();
        let k = semantic().derive(&a).unwrap();
        assert!(k.starts_with(b"sem:"));
        assert_eq!(k.len(), 4 + 32);
        assert_eq!(semantic().derive(&b).unwrap(), k);
        assert_eq!(semantic().derive(&c).unwrap(), k);
        // Another amount is another operation.
        let d = json(
            r#"{"account_id":"a-1","amount_minor":501,"currency":"EUR","merchant_reference":"ord-9"}"#,
        );
        assert_ne!(semantic().derive(&d).unwrap(), k);
        // Absent and empty are alike, and differ from a value.
        let e = json(r#"{"account_id":"a-1","amount_minor":500,"currency":"EUR"}"#);
        let f = json(
            r#"{"account_id":"a-1","amount_minor":500,"currency":"EUR","merchant_reference":""}"#,
        );
        assert_eq!(semantic().derive(&e), semantic().derive(&f));
        assert_ne!(semantic().derive(&e).unwrap(), k);
        // Nothing to hash: the rule does not match.
        assert_eq!(semantic().derive(&json(r#"{"other":1}"#)), None);
    }

    #[test]
    fn a_composed_key_names_its_parts_floors_time_and_escapes_values() {
        let rule = CompositeKey {
            fields: vec![],
            parts: vec![
                KeyPart {
                    name: "client".into(),
                    field: Some("/client_id".into()),
                    literal: None,
                    hash: vec![],
                    time_window_secs: None,
                    optional: false,
                },
                KeyPart {
                    name: "op".into(),
                    field: None,
                    literal: Some("capture".into()),
                    hash: vec![],
                    time_window_secs: None,
                    optional: false,
                },
                KeyPart {
                    name: "ctx".into(),
                    field: Some("merchant_reference".into()),
                    literal: None,
                    hash: vec![],
                    time_window_secs: None,
                    optional: true,
                },
                KeyPart {
                    name: "day".into(),
                    field: Some("/occurred_at_ms".into()),
                    literal: None,
                    hash: vec![],
                    time_window_secs: Some(86_400),
                    optional: false,
                },
                KeyPart {
                    name: "content".into(),
                    field: None,
                    literal: None,
                    hash: vec!["/amount_minor".into()],
                    time_window_secs: None,
                    optional: false,
                },
            ],
        };
        rule.validate().unwrap();
        let p = json(
            r#"{"client_id":"acme&co=1","merchant_reference":"o-1","occurred_at_ms":1796293020000,"amount_minor":5}"#,
        );
        let k = String::from_utf8(rule.derive(&p).unwrap()).unwrap();
        let content = canonical_hash(&p, &["/amount_minor".into()]);
        assert_eq!(
            k,
            format!("client=acme%26co%3D1&op=capture&ctx=o-1&day=1796256000000&content={content}")
        );
        // Later the same day: the same key.
        let later = json(
            r#"{"client_id":"acme&co=1","merchant_reference":"o-1","occurred_at_ms":1796339000000,"amount_minor":5}"#,
        );
        assert_eq!(String::from_utf8(rule.derive(&later).unwrap()).unwrap(), k);
        // The optional part may be absent; a required one may not.
        let no_ctx = json(r#"{"client_id":"c","occurred_at_ms":1,"amount_minor":5}"#);
        assert!(String::from_utf8(rule.derive(&no_ctx).unwrap())
            .unwrap()
            .contains("&ctx=&"));
        let no_client = json(r#"{"occurred_at_ms":1,"amount_minor":5}"#);
        assert_eq!(rule.derive(&no_client), None);
    }

    #[test]
    fn bad_rules_name_the_part() {
        let mut r = semantic();
        r.parts = vec![KeyPart {
            name: "x".into(),
            field: None,
            literal: None,
            hash: vec![],
            time_window_secs: None,
            optional: false,
        }];
        assert!(r
            .validate()
            .unwrap_err()
            .to_string()
            .contains("exactly one of `fields`"));
        r.fields.clear();
        assert!(r
            .validate()
            .unwrap_err()
            .to_string()
            .contains("`key.parts[0]` (x) must have exactly one of"));
    }

    #[test]
    fn a_semantic_retry_is_a_duplicate_and_a_composed_key_conflicts_only_on_a_changed_value() {
        let a = json(r#"{"account_id":"s","amount_minor":100,"currency":"EUR","kind":"capture"}"#);
        let b = json(
            r#"{ "currency" : "EUR", "amount_minor": 100, "account_id":"s", "kind":"capture", "note":"retry" }"#,
        );
        let r = semantic();
        let (ka, kb) = (r.derive(&a).unwrap(), r.derive(&b).unwrap());
        assert_eq!(ka, kb);
        assert_eq!(r.fingerprint(&ka, &a, b"a"), r.fingerprint(&kb, &b, b"b"));

        let composed = CompositeKey {
            fields: vec![],
            parts: vec![KeyPart {
                name: "account".into(),
                field: Some("/account_id".into()),
                ..KeyPart::default()
            }],
        };
        composed.validate().unwrap();
        let c = json(r#"{"kind":"capture","currency":"EUR","amount_minor":100,"account_id":"s"}"#);
        let d = json(r#"{"account_id":"s","amount_minor":200,"currency":"EUR","kind":"capture"}"#);
        let k = composed.derive(&a).unwrap();
        assert_eq!(composed.derive(&d).unwrap(), k);
        // Field order and whitespace: the same content.
        assert_eq!(
            composed.fingerprint(&k, &a, b""),
            composed.fingerprint(&k, &c, b"")
        );
        // Another amount under the same key: a conflict.
        assert_ne!(
            composed.fingerprint(&k, &a, b""),
            composed.fingerprint(&k, &d, b"")
        );
    }

    #[test]
    fn a_composed_key_must_read_the_payload_somewhere() {
        let only_literal_and_optional = CompositeKey {
            fields: vec![],
            parts: vec![
                KeyPart {
                    name: "op".into(),
                    literal: Some("capture".into()),
                    ..KeyPart::default()
                },
                KeyPart {
                    name: "order".into(),
                    field: Some("/merchant_reference".into()),
                    optional: true,
                    ..KeyPart::default()
                },
            ],
        };
        let e = only_literal_and_optional
            .validate()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("needs at least one part that is not optional and reads the payload"),
            "{e}"
        );
        let twice = CompositeKey {
            fields: vec![],
            parts: vec![
                KeyPart {
                    name: "a".into(),
                    field: Some("/x".into()),
                    ..KeyPart::default()
                },
                KeyPart {
                    name: "a".into(),
                    field: Some("/y".into()),
                    ..KeyPart::default()
                },
            ],
        };
        assert!(twice
            .validate()
            .unwrap_err()
            .to_string()
            .contains("is used twice"));
        let blank = CompositeKey {
            fields: vec!["".into()],
            parts: vec![],
        };
        assert!(blank
            .validate()
            .unwrap_err()
            .to_string()
            .contains("is not a field name"));
        // A required hash part over absent fields does not match.
        let hashed = CompositeKey {
            fields: vec![],
            parts: vec![KeyPart {
                name: "c".into(),
                hash: vec!["/amount_minor".into()],
                ..KeyPart::default()
            }],
        };
        assert_eq!(hashed.derive(&json(r#"{"other":1}"#)), None);
    }
}
