//! Dump files: one Kafka message per line in kcat's JSON envelope
//! (`kcat -C -J`), so `kcat -C -J -b ... -t payments -e > dump.jsonl` is valid
//! input and `idem dump` output can be read by anything that reads kcat's.
//!
//! ```text
//! {"topic":"payments","partition":0,"offset":7,"tstype":"create","ts":1796083200000,
//!  "broker":-1,"headers":["Idempotency-Key","k-7"],"key":"acct-1","payload":"{...}"}
//! ```
//!
//! Binary data, faithfully:
//! - kcat writes keys, payloads and header values as JSON strings holding the
//!   raw bytes, invalid UTF-8 included. Such a line is not valid JSON text, so
//!   it is read byte for byte: every byte that is not part of valid UTF-8 is
//!   carried through the JSON parser as a private-use character and turned
//!   back into the same byte. A kcat dump of protobuf payloads therefore
//!   round-trips exactly.
//! - `idem dump` writes valid UTF-8 as kcat does and anything else in base64,
//!   marked per field: `"key_encoding":"base64"`, `"payload_encoding":"base64"`,
//!   `"headers_encoding":"base64"` (then every header value is base64). Those
//!   markers are read here too; any other encoding is an error.
//! - `null` is a null key, payload (a tombstone) or header value.
//!
//! Guarantee: [`parse_line`] either returns the message the line describes or
//! an error saying which field is wrong; [`write_line`] output parses back to
//! the same topic, partition, offset, timestamp, key, payload and headers.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use rdkafka::message::{Header, Message as _, OwnedHeaders, OwnedMessage, Timestamp};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::io::Write;

/// First of the 256 private-use characters that stand for raw bytes.
const RAW_BYTE_BASE: u32 = 0x10_FF00;

/// Why a dump line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// Not a JSON object of the expected shape.
    #[error("not a kcat JSON envelope: {0}")]
    Json(String),
    /// Raw bytes and an escaped character U+10FF00..U+10FFFF on one line.
    #[error("the line mixes raw bytes with an escaped character U+10FF00..U+10FFFF; it cannot be read back exactly")]
    Ambiguous,
    /// The topic is empty or not text.
    #[error("topic must be a non-empty text name")]
    Topic,
    /// An encoding marker other than base64.
    #[error("unknown {field} {value:?} (allowed: \"base64\")")]
    UnknownEncoding {
        /// The marker field.
        field: &'static str,
        /// Its value.
        value: String,
    },
    /// A base64 field that does not decode.
    #[error("{field} is marked base64 but does not decode: {detail}")]
    Base64 {
        /// The field.
        field: &'static str,
        /// The decoder's complaint.
        detail: String,
    },
    /// A header list with an odd number of entries or a null name.
    #[error("headers must be a flat [name, value, ...] list or a {{name: [values]}} map, with string names and string or null values")]
    Headers,
    /// Negative partition or offset.
    #[error("partition and offset must not be negative")]
    Position,
}

/// Header pairs from kcat's default flat list `["name", "value", "name",
/// null, ...]` or its JSON-map form `{"name": ["v1", "v2"]}`.
fn header_pairs(v: serde_json::Value) -> Result<Vec<(String, Option<String>)>, EnvelopeError> {
    use serde_json::Value;
    let text = |v: Value| match v {
        Value::String(s) => Ok(Some(s)),
        Value::Null => Ok(None),
        _ => Err(EnvelopeError::Headers),
    };
    let mut pairs = Vec::new();
    match v {
        Value::Null => {}
        Value::Array(list) => {
            if list.len() % 2 != 0 {
                return Err(EnvelopeError::Headers);
            }
            let mut it = list.into_iter();
            while let (Some(name), Some(value)) = (it.next(), it.next()) {
                let name = text(name)?.ok_or(EnvelopeError::Headers)?;
                pairs.push((name, text(value)?));
            }
        }
        Value::Object(map) => {
            for (name, values) in map {
                let Value::Array(values) = values else {
                    return Err(EnvelopeError::Headers);
                };
                for v in values {
                    pairs.push((name.clone(), text(v)?));
                }
            }
        }
        _ => return Err(EnvelopeError::Headers),
    }
    Ok(pairs)
}

#[derive(Deserialize)]
struct EnvelopeIn {
    topic: String,
    partition: i32,
    offset: i64,
    #[serde(default)]
    tstype: Option<String>,
    #[serde(default)]
    ts: Option<i64>,
    #[serde(default)]
    headers: serde_json::Value,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    key_encoding: Option<String>,
    #[serde(default)]
    payload_encoding: Option<String>,
    #[serde(default)]
    headers_encoding: Option<String>,
}

#[derive(Serialize)]
struct EnvelopeOut<'a> {
    topic: &'a str,
    partition: i32,
    offset: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    tstype: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ts: Option<i64>,
    broker: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    headers: Option<Vec<Option<Cow<'a, str>>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    headers_encoding: Option<&'static str>,
    key: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_encoding: Option<&'static str>,
    payload: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_encoding: Option<&'static str>,
}

/// The line as text, with every byte outside valid UTF-8 replaced by its
/// private-use stand-in; `true` when any was replaced.
fn line_as_text(line: &[u8]) -> (Cow<'_, str>, bool) {
    if let Ok(s) = std::str::from_utf8(line) {
        return (Cow::Borrowed(s), false);
    }
    let stand_in =
        |b: u8| char::from_u32(RAW_BYTE_BASE + u32::from(b)).unwrap_or(char::REPLACEMENT_CHARACTER);
    let mut out = String::with_capacity(line.len() + 16);
    for chunk in line.utf8_chunks() {
        for c in chunk.valid().chars() {
            if is_stand_in(c) {
                // A genuine character of the stand-in range: carried byte by
                // byte too, so it cannot be mistaken for a stand-in.
                let mut buf = [0u8; 4];
                for &b in c.encode_utf8(&mut buf).as_bytes() {
                    out.push(stand_in(b));
                }
            } else {
                out.push(c);
            }
        }
        for &b in chunk.invalid() {
            out.push(stand_in(b));
        }
    }
    (Cow::Owned(out), true)
}

fn is_stand_in(c: char) -> bool {
    (RAW_BYTE_BASE..=RAW_BYTE_BASE + 0xFF).contains(&(c as u32))
}

/// True when `text` escapes a character of the stand-in range as a JSON
/// surrogate pair (`\uDBFF\uDFxx`), which could not be told apart from a
/// stand-in once parsed.
fn escapes_a_stand_in(text: &str) -> bool {
    text.to_ascii_lowercase().contains("\\udbff\\udf")
}

/// The bytes a decoded JSON string stands for.
fn text_bytes(s: String, raw: bool) -> Vec<u8> {
    if !raw {
        return s.into_bytes();
    }
    let mut out = Vec::with_capacity(s.len());
    for c in s.chars() {
        if is_stand_in(c) {
            out.push((c as u32 - RAW_BYTE_BASE) as u8);
        } else {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }
    out
}

fn field_bytes(
    value: Option<String>,
    encoding: &Option<String>,
    field: &'static str,
    marker: &'static str,
    raw: bool,
) -> Result<Option<Vec<u8>>, EnvelopeError> {
    let Some(v) = value else { return Ok(None) };
    match encoding.as_deref() {
        None => Ok(Some(text_bytes(v, raw))),
        Some("base64") => {
            BASE64
                .decode(v.as_bytes())
                .map(Some)
                .map_err(|e| EnvelopeError::Base64 {
                    field,
                    detail: e.to_string(),
                })
        }
        Some(other) => Err(EnvelopeError::UnknownEncoding {
            field: marker,
            value: other.to_string(),
        }),
    }
}

/// Parses one line of a dump into the message it describes.
pub fn parse_line(line: &[u8]) -> Result<OwnedMessage, EnvelopeError> {
    let line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line); // a BOM
    let (text, raw) = line_as_text(line);
    if raw && escapes_a_stand_in(&text) {
        return Err(EnvelopeError::Ambiguous);
    }
    let env: EnvelopeIn = serde_json::from_str(&text).map_err(|e| {
        // serde counts lines inside this one line: only the column helps.
        EnvelopeError::Json(e.to_string().replace(" at line 1 column", " at column"))
    })?;
    if env.topic.chars().any(is_stand_in) || env.topic.is_empty() {
        return Err(EnvelopeError::Topic);
    }
    if env.partition < 0 || env.offset < 0 {
        return Err(EnvelopeError::Position);
    }
    let key = field_bytes(env.key, &env.key_encoding, "key", "key_encoding", raw)?;
    let payload = field_bytes(
        env.payload,
        &env.payload_encoding,
        "payload",
        "payload_encoding",
        raw,
    )?;
    let pairs = header_pairs(env.headers)?;
    let headers = if pairs.is_empty() {
        None
    } else {
        let mut hs = OwnedHeaders::new_with_capacity(pairs.len());
        for (name, value) in pairs {
            let name = String::from_utf8_lossy(&text_bytes(name, raw)).into_owned();
            let value = field_bytes(
                value,
                &env.headers_encoding,
                "header value",
                "headers_encoding",
                raw,
            )?;
            hs = hs.insert(Header {
                key: &name,
                value: value.as_deref(),
            });
        }
        Some(hs)
    };
    let timestamp = match (env.tstype.as_deref(), env.ts) {
        (_, None) => Timestamp::NotAvailable,
        (Some("logappend"), Some(ts)) => Timestamp::LogAppendTime(ts),
        (_, Some(ts)) => Timestamp::CreateTime(ts),
    };
    Ok(OwnedMessage::new(
        payload,
        key,
        env.topic,
        timestamp,
        env.partition,
        env.offset,
        headers,
    ))
}

/// Text as kcat writes it when `bytes` are UTF-8, else base64 and `true`.
fn encode_bytes(bytes: &[u8]) -> (Cow<'_, str>, bool) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (Cow::Borrowed(s), false),
        Err(_) => (Cow::Owned(BASE64.encode(bytes)), true),
    }
}

/// Writes `msg` as one envelope line (newline included).
pub fn write_line(out: &mut dyn Write, msg: &OwnedMessage) -> std::io::Result<()> {
    let (tstype, ts) = match msg.timestamp() {
        Timestamp::NotAvailable => (None, None),
        Timestamp::CreateTime(t) => (Some("create"), Some(t)),
        Timestamp::LogAppendTime(t) => (Some("logappend"), Some(t)),
    };
    let key = msg.key().map(encode_bytes);
    let payload = msg.payload().map(encode_bytes);
    let (headers, headers_encoding) = match msg.headers() {
        None => (None, None),
        Some(hs) => {
            let raw: Vec<_> = crate::kafka::raw_headers(Some(hs)).collect();
            let binary = raw
                .iter()
                .any(|(_, v)| v.is_some_and(|v| std::str::from_utf8(v).is_err()));
            let mut list = Vec::with_capacity(raw.len() * 2);
            // kcat's envelope has no encoding for names: one that is not
            // UTF-8 is written with U+FFFD in place of its invalid bytes.
            for (name, value) in raw {
                list.push(Some(String::from_utf8_lossy(name)));
                list.push(value.map(|v| {
                    if binary {
                        Cow::Owned(BASE64.encode(v))
                    } else {
                        String::from_utf8_lossy(v)
                    }
                }));
            }
            (Some(list), binary.then_some("base64"))
        }
    };
    let env = EnvelopeOut {
        topic: msg.topic(),
        partition: msg.partition(),
        offset: msg.offset(),
        tstype,
        ts,
        broker: -1,
        headers,
        headers_encoding,
        key_encoding: key.as_ref().and_then(|(_, b)| b.then_some("base64")),
        key: key.map(|(s, _)| s),
        payload_encoding: payload.as_ref().and_then(|(_, b)| b.then_some("base64")),
        payload: payload.map(|(s, _)| s),
    };
    serde_json::to_writer(&mut *out, &env)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers as _;

    fn headers(m: &OwnedMessage) -> Vec<(String, Option<Vec<u8>>)> {
        m.headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_kcat_line_with_raw_binary_bytes_reads_back_byte_for_byte() {
        // What kcat prints for a protobuf payload: raw bytes inside the JSON
        // string, control characters escaped.
        let mut line = br#"{"topic":"payments","partition":2,"offset":41,"tstype":"create","ts":1796083200123,"broker":1,"headers":["Idempotency-Key","k-1","trace",null],"key":"acct-9","payload":""#.to_vec();
        line.extend_from_slice(b"\\n\\u0005e-1\xff\xfe\xc3\xa9\\u0000");
        line.extend_from_slice(br#""}"#);
        let m = parse_line(&line).unwrap();
        assert_eq!(m.topic(), "payments");
        assert_eq!((m.partition(), m.offset()), (2, 41));
        assert_eq!(m.timestamp(), Timestamp::CreateTime(1_796_083_200_123));
        assert_eq!(m.key(), Some(&b"acct-9"[..]));
        assert_eq!(m.payload(), Some(&b"\n\x05e-1\xff\xfe\xc3\xa9\x00"[..]));
        assert_eq!(
            headers(&m),
            vec![
                ("Idempotency-Key".to_string(), Some(b"k-1".to_vec())),
                ("trace".to_string(), None)
            ]
        );
    }

    #[test]
    fn a_genuine_character_of_the_stand_in_range_beside_raw_bytes_reads_back_exactly() {
        let mut line = br#"{"topic":"t","partition":0,"offset":1,"key":""#.to_vec();
        line.extend_from_slice(b"\xff\\u0001");
        line.extend_from_slice(br#"","payload":"ref "#);
        line.extend_from_slice("\u{10FF41}\u{10FFFF}".as_bytes());
        line.extend_from_slice(br#""}"#);
        let m = parse_line(&line).unwrap();
        assert_eq!(m.key(), Some(&b"\xff\x01"[..]));
        assert_eq!(m.payload(), Some("ref \u{10FF41}\u{10FFFF}".as_bytes()));
        // Escaped as a surrogate pair beside raw bytes: refused, not guessed.
        let mut esc = br#"{"topic":"t","partition":0,"offset":1,"key":""#.to_vec();
        esc.extend_from_slice(b"\xff");
        esc.extend_from_slice(br#"","payload":"\uDBFF\uDF41"}"#);
        assert!(matches!(parse_line(&esc), Err(EnvelopeError::Ambiguous)));
        // A BOM at the start of the line is not part of the envelope.
        let bom = [
            &b"\xEF\xBB\xBF"[..],
            br#"{"topic":"t","partition":0,"offset":2}"#,
        ]
        .concat();
        assert_eq!(parse_line(&bom).unwrap().offset(), 2);
    }

    #[test]
    fn idem_dump_lines_round_trip_binary_and_text() {
        let hs = OwnedHeaders::new()
            .insert(Header {
                key: "Idempotency-Key",
                value: Some(&b"\xffbin"[..]),
            })
            .insert(Header {
                key: "x",
                value: None::<&[u8]>,
            });
        let m = OwnedMessage::new(
            Some(b"\x08\x01\xff".to_vec()),
            Some(b"text key".to_vec()),
            "t".into(),
            Timestamp::LogAppendTime(5),
            0,
            9,
            Some(hs),
        );
        let mut out = Vec::new();
        write_line(&mut out, &m).unwrap();
        let text = String::from_utf8(out.clone()).unwrap();
        assert!(text.contains(r#""payload_encoding":"base64""#));
        assert!(text.contains(r#""headers_encoding":"base64""#));
        assert!(text.contains(r#""key":"text key""#));
        assert!(!text.contains("key_encoding"));
        let back = parse_line(out.trim_ascii_end()).unwrap();
        assert_eq!(back.payload(), m.payload());
        assert_eq!(back.key(), m.key());
        assert_eq!(back.timestamp(), Timestamp::LogAppendTime(5));
        assert_eq!(headers(&back), headers(&m));

        let tomb = OwnedMessage::new(None, None, "t".into(), Timestamp::NotAvailable, 1, 0, None);
        let mut out = Vec::new();
        write_line(&mut out, &tomb).unwrap();
        let back = parse_line(out.trim_ascii_end()).unwrap();
        assert_eq!((back.payload(), back.key()), (None, None));
        assert_eq!(back.timestamp(), Timestamp::NotAvailable);
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        let e = parse_line(b"{\"topic\":\"t\"}").unwrap_err().to_string();
        assert!(
            e.starts_with("not a kcat JSON envelope: missing field `partition`"),
            "{e}"
        );
        let e = parse_line(
            br#"{"topic":"t","partition":0,"offset":1,"payload":"x","payload_encoding":"hex"}"#,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(e, "unknown payload_encoding \"hex\" (allowed: \"base64\")");
        let e = parse_line(
            br#"{"topic":"t","partition":0,"offset":1,"payload":"!!","payload_encoding":"base64"}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("payload is marked base64 but does not decode"));
        let e = parse_line(br#"{"topic":"t","partition":0,"offset":1,"headers":["a"]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("headers must be a flat"));
        assert!(matches!(
            parse_line(br#"{"topic":"t","partition":-1,"offset":1}"#),
            Err(EnvelopeError::Position)
        ));
    }
}
