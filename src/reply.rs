//! The reply topic: the application's response to each handled message, and
//! the stored response again for each duplicate, so that a client retrying
//! a request gets the same answer without the application being called
//! twice (as Stripe promises for HTTP).
//!
//! Guarantee: a reply is acknowledged by the broker before the batch that
//! produced it is written, like a dead letter; replies are at-least-once. A
//! reply carries the source message's Kafka key, `Idempotency-Key`,
//! `idem-status`, `idem-source-topic/partition/offset`, `idem-replayed`
//! (`false` for the application's own answer, `true` for a stored one),
//! `idem-first-topic/partition/offset` and, when set, `content-type` and `idem-truncated`.

use crate::dlq::Outgoing;
use crate::handler::Response;
use crate::proto::StoredResponse;
use rdkafka::message::{Message as _, OwnedMessage};

/// One reply on its way to the reply topic.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The reply topic.
    pub topic: String,
    /// The source message's Kafka key.
    pub key: Option<Vec<u8>>,
    /// The idempotency key, as text.
    pub idempotency_key: String,
    /// The stored (or fresh) response.
    pub response: StoredResponse,
    /// Source position of the message answered.
    pub source: (String, i32, i64),
    /// Position (topic, partition, offset) of the message whose handling
    /// produced the response.
    pub first: (String, i32, i64),
    /// True when answered from the store (a duplicate).
    pub replayed: bool,
}

impl Reply {
    /// A reply to `msg` with `response`.
    pub fn to(
        topic: &str,
        msg: &OwnedMessage,
        idempotency_key: String,
        response: StoredResponse,
        first: (&str, i32, i64),
        replayed: bool,
    ) -> Self {
        Reply {
            topic: topic.to_string(),
            key: msg.key().map(<[u8]>::to_vec),
            idempotency_key,
            response,
            source: (msg.topic().to_string(), msg.partition(), msg.offset()),
            first: (first.0.to_string(), first.1, first.2),
            replayed,
        }
    }

    pub(crate) fn outgoing(&self) -> Outgoing<'_> {
        let r = &self.response;
        let mut headers: Vec<(&str, Option<Vec<u8>>)> = vec![
            (
                "Idempotency-Key",
                Some(self.idempotency_key.clone().into_bytes()),
            ),
            ("idem-status", Some(r.status.to_string().into_bytes())),
            (
                "idem-source-topic",
                Some(self.source.0.clone().into_bytes()),
            ),
            (
                "idem-source-partition",
                Some(self.source.1.to_string().into_bytes()),
            ),
            (
                "idem-source-offset",
                Some(self.source.2.to_string().into_bytes()),
            ),
            ("idem-first-topic", Some(self.first.0.clone().into_bytes())),
            (
                "idem-first-partition",
                Some(self.first.1.to_string().into_bytes()),
            ),
            (
                "idem-first-offset",
                Some(self.first.2.to_string().into_bytes()),
            ),
            (
                "idem-replayed",
                Some(if self.replayed { "true" } else { "false" }.into()),
            ),
        ];
        if !r.content_type.is_empty() {
            headers.push(("content-type", Some(r.content_type.clone().into_bytes())));
        }
        if r.truncated {
            headers.push(("idem-truncated", Some(b"true".to_vec())));
        }
        Outgoing {
            topic: &self.topic,
            key: self.key.as_deref(),
            payload: Some(&r.body),
            headers,
            what: format!(
                "the reply to {}/{}@{}",
                self.source.0, self.source.1, self.source.2
            ),
        }
    }
}

/// The stored form of a response: status, the digest of the whole body, and
/// the body up to `keep` bytes.
pub fn stored(response: &Response, keep: usize) -> StoredResponse {
    let kept = response.body.len().min(keep);
    StoredResponse {
        status: u32::from(response.status),
        digest: crate::key::Fingerprint::of(&response.body).0.to_vec(),
        body: response.body[..kept].to_vec(),
        truncated: response.truncated || kept < response.body.len(),
        content_type: response.content_type.clone().unwrap_or_default(),
    }
}
