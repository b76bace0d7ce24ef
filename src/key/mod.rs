//! Idempotency keys and payload fingerprints.
//!
//! Guarantee: the same message (same headers and payload) always yields the
//! same key and fingerprint, on any machine and across restarts; keys are raw
//! bytes and are never assumed to be UTF-8. When no configured source yields a
//! key, the fallback topic/partition/offset key is marked [`KeySource::Unkeyed`]
//! so callers can count it: it catches redeliveries, not producer duplicates.

mod composite;

pub use composite::{CompositeKey, KeyPart};

use crate::payload::Decoded;
use std::fmt;
use xxhash_rust::xxh3::xxh3_128;

/// An idempotency key as the producer wrote it: raw bytes.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(pub Vec<u8>);

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey({})", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

/// A 128-bit hash of a payload. Two payloads with the same key and different
/// fingerprints are a conflict.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 16]);

impl Fingerprint {
    /// The fingerprint of `payload`.
    pub fn of(payload: &[u8]) -> Self {
        Self(xxh3_128(payload).to_be_bytes())
    }

    /// From stored bytes; `None` when they are not 16 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// Lowercase hex, for dead-letter headers and logs.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.to_hex())
    }
}

/// The 16-byte store key: a hash of (scope, idempotency key). The scope is
/// length-prefixed so that no (scope, key) pair can collide with another by
/// moving bytes between the two.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct ScopedKeyHash(pub [u8; 16]);

impl ScopedKeyHash {
    /// The hash of `key` within `scope`.
    pub fn new(scope: &str, key: &IdempotencyKey) -> Self {
        let mut buf = Vec::with_capacity(8 + scope.len() + key.0.len());
        buf.extend_from_slice(&(scope.len() as u64).to_be_bytes());
        buf.extend_from_slice(scope.as_bytes());
        buf.extend_from_slice(&key.0);
        Self(xxh3_128(&buf).to_be_bytes())
    }
}

/// Where a message's key came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// The configured header.
    Header,
    /// A field of the payload.
    PayloadField,
    /// A semantic or composed key built from payload fields.
    Composite,
    /// No source matched: topic/partition/offset.
    Unkeyed,
}

/// Why no key could be derived; the text is the dead-letter reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The key header appears more than once with different values.
    #[error("{count} `{header}` headers with different values")]
    ConflictingHeaders {
        /// The header name.
        header: String,
        /// How many times it appeared.
        count: usize,
    },
    /// The key header is present but empty.
    #[error("empty `{header}` header")]
    EmptyHeader {
        /// The header name.
        header: String,
    },
}

/// How keys are derived for a topic: the first source that matches wins.
#[derive(Debug, Clone)]
pub struct KeyRule {
    /// Header carrying the key, matched case-insensitively.
    pub header: Option<String>,
    /// JSON pointer (or `PaymentEvent` field name) of a payload field.
    pub field: Option<String>,
    /// A semantic or composed key, tried after the header and the field.
    pub composite: Option<CompositeKey>,
}

impl KeyRule {
    /// Derives the key of a message from its headers (name, value pairs), its
    /// decoded payload and its position.
    pub fn derive<'h>(
        &self,
        headers: impl Iterator<Item = (&'h str, Option<&'h [u8]>)>,
        payload: &Decoded,
        topic: &str,
        partition: i32,
        offset: i64,
    ) -> Result<(IdempotencyKey, KeySource), KeyError> {
        if let Some(name) = &self.header {
            let mut found: Option<&[u8]> = None;
            let mut count = 0usize;
            let mut disagree = false;
            for (h, v) in headers {
                if !h.eq_ignore_ascii_case(name) {
                    continue;
                }
                let v = v.unwrap_or_default();
                count += 1;
                match found {
                    None => found = Some(v),
                    Some(prev) if prev != v => disagree = true,
                    Some(_) => {}
                }
            }
            if disagree {
                return Err(KeyError::ConflictingHeaders {
                    header: name.clone(),
                    count,
                });
            }
            match found {
                Some([]) => {
                    return Err(KeyError::EmptyHeader {
                        header: name.clone(),
                    })
                }
                Some(v) => return Ok((IdempotencyKey(v.to_vec()), KeySource::Header)),
                None => {}
            }
        }
        if let Some(pointer) = &self.field {
            if let Some(v) = payload.field(pointer) {
                return Ok((IdempotencyKey(v.into_bytes()), KeySource::PayloadField));
            }
        }
        if let Some(rule) = &self.composite {
            if let Some(k) = rule.derive(payload) {
                return Ok((IdempotencyKey(k), KeySource::Composite));
            }
        }
        let fallback = format!("{topic}/{partition}/{offset}");
        Ok((IdempotencyKey(fallback.into_bytes()), KeySource::Unkeyed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::payload::{decode, PayloadFormat};

    fn rule() -> KeyRule {
        KeyRule {
            header: Some("Idempotency-Key".into()),
            field: Some("/event_id".into()),
            composite: None,
        }
    }

    fn json(s: &str) -> Decoded {
        decode(s.as_bytes(), PayloadFormat::Json).unwrap()
    }

    #[test]
    fn header_wins_over_payload_field_and_is_case_insensitive() {
        let h = [("idempotency-key", Some(&b"\xffraw"[..]))];
        let (k, src) = rule()
            .derive(h.iter().copied(), &json(r#"{"event_id":"e1"}"#), "t", 0, 1)
            .unwrap();
        assert_eq!(k.0, b"\xffraw".to_vec());
        assert_eq!(src, KeySource::Header);
    }

    #[test]
    fn payload_field_then_unkeyed_fallback() {
        let none: [(&str, Option<&[u8]>); 0] = [];
        let (k, src) = rule()
            .derive(
                none.iter().copied(),
                &json(r#"{"event_id":"e1"}"#),
                "t",
                0,
                1,
            )
            .unwrap();
        assert_eq!((k.0.as_slice(), src), (&b"e1"[..], KeySource::PayloadField));
        let (k, src) = rule()
            .derive(none.iter().copied(), &json(r#"{"x":1}"#), "pay", 3, 42)
            .unwrap();
        assert_eq!(
            (k.0.as_slice(), src),
            (&b"pay/3/42"[..], KeySource::Unkeyed)
        );
    }

    #[test]
    fn disagreeing_or_empty_headers_are_errors_and_agreeing_ones_are_not() {
        let h = [
            ("Idempotency-Key", Some(&b"a"[..])),
            ("Idempotency-Key", Some(&b"b"[..])),
        ];
        let err = rule()
            .derive(h.iter().copied(), &Decoded::Opaque, "t", 0, 0)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "2 `Idempotency-Key` headers with different values"
        );
        let same = [
            ("Idempotency-Key", Some(&b"a"[..])),
            ("Idempotency-Key", Some(&b"a"[..])),
        ];
        assert!(rule()
            .derive(same.iter().copied(), &Decoded::Opaque, "t", 0, 0)
            .is_ok());
        let empty = [("Idempotency-Key", None)];
        assert_eq!(
            rule()
                .derive(empty.iter().copied(), &Decoded::Opaque, "t", 0, 0)
                .unwrap_err(),
            KeyError::EmptyHeader {
                header: "Idempotency-Key".into()
            }
        );
    }

    #[test]
    fn scope_separates_keys() {
        let k = IdempotencyKey(b"k".to_vec());
        assert_ne!(ScopedKeyHash::new("a", &k), ScopedKeyHash::new("b", &k));
        assert_ne!(
            ScopedKeyHash::new("ab", &IdempotencyKey(b"c".to_vec())),
            ScopedKeyHash::new("a", &IdempotencyKey(b"bc".to_vec()))
        );
        assert_eq!(Fingerprint::of(b"x"), Fingerprint::of(b"x"));
        assert_ne!(Fingerprint::of(b"x"), Fingerprint::of(b"y"));
    }
}
