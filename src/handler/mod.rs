//! What happens to a message whose key is new.
//!
//! Guarantee: the pipeline calls a handler at most once per idempotency key in
//! the dedup window for a successful outcome, and an in-process handler's
//! writes (through [`HandlerTxn`]) commit in the same RocksDB write batch as
//! the dedup record and the partition checkpoint: all of them or none.

pub mod http;
pub mod ledger;

use crate::key::{IdempotencyKey, KeySource};
use crate::payload::Decoded;
pub use crate::store::HandlerTxn;
use rdkafka::message::OwnedHeaders;
use std::sync::Arc;
use std::time::Duration;

/// One message handed to a handler.
#[derive(Debug)]
pub struct Delivery<'a> {
    /// Source topic.
    pub topic: &'a str,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Kafka timestamp, Unix milliseconds, when the message has one.
    pub timestamp_ms: Option<i64>,
    /// The idempotency key (the same on every redelivery).
    pub key: &'a IdempotencyKey,
    /// Where the key came from.
    pub key_source: KeySource,
    /// The raw payload.
    pub payload: &'a [u8],
    /// The decoded payload.
    pub decoded: &'a Decoded,
    /// The message's Kafka headers.
    pub headers: Option<&'a OwnedHeaders>,
    /// The partition's fencing token for this worker (with the changelog
    /// on): higher for every later owner of the partition, so an
    /// application that remembers the highest token seen per partition can
    /// refuse a call from a worker that lost the partition (a zombie).
    pub fencing_token: Option<i64>,
}

/// A handler's final word on a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Applied; its effects are kept.
    Handled,
    /// Refused for good (bad content, business rule); it is dead-lettered with
    /// this reason and its effects are discarded.
    Rejected(String),
    /// Not finished now (the application is down, busy or slow): the message
    /// is tried again later with the same idempotency key, after at least
    /// `after` when given (a `Retry-After`). Its partition waits at this
    /// offset meanwhile; the other partitions keep flowing. Its effects are
    /// discarded.
    Retry {
        /// Why, for the logs and the dead letter once retries run out.
        reason: String,
        /// The least wait the other side asked for.
        after: Option<Duration>,
    },
}

/// What an application answered, kept with the dedup record (status and
/// digest always, the body up to a limit) so that a duplicate can be answered
/// the same way on the reply topic without calling the application again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// HTTP status.
    pub status: u16,
    /// The body, possibly cut to the configured limit.
    pub body: Vec<u8>,
    /// True when `body` was cut.
    pub truncated: bool,
    /// The response's content type, when it named one.
    pub content_type: Option<String>,
}

/// A remote handler's word on a message: the verdict, and the response that
/// led to it when there was one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// What the pipeline does with the message.
    pub verdict: Verdict,
    /// The application's response, when it gave one.
    pub response: Option<Response>,
}

/// A handler outside the process (the application behind the sidecar). It
/// has no effects in the store, so the pipeline calls it for several
/// partitions of a batch at once (each partition strictly in offset order);
/// every failure is a [`Verdict::Retry`] or a [`Verdict::Rejected`], never a
/// worker stop.
pub trait RemoteHandler: Send + Sync {
    /// Name used in logs and metrics.
    fn name(&self) -> &'static str;

    /// Handles one new message; the same message always carries the same
    /// idempotency key, on every retry and redelivery.
    fn call(&self, delivery: &Delivery<'_>) -> Answer;

    /// Whether the application answered the last call at all (for
    /// `/readyz`): false after connection failures and timeouts.
    fn reachable(&self) -> bool {
        true
    }
}

/// The handler of a worker: in-process (its effects commit with the dedup
/// record) or remote (called concurrently across partitions).
pub enum AnyHandler {
    /// An in-process handler such as the ledger.
    Local(Box<dyn Handler>),
    /// A remote handler such as the HTTP application.
    Remote(Arc<dyn RemoteHandler>),
}

impl AnyHandler {
    /// Name used in logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            AnyHandler::Local(h) => h.name(),
            AnyHandler::Remote(h) => h.name(),
        }
    }

    /// Column families the handler writes.
    pub fn column_families(&self) -> Vec<&'static str> {
        match self {
            AnyHandler::Local(h) => h.column_families(),
            AnyHandler::Remote(_) => Vec::new(),
        }
    }
}

/// The handler a configuration names: `ledger` or `http`.
pub fn for_config(config: &crate::config::Config) -> anyhow::Result<AnyHandler> {
    Ok(match config.handler {
        crate::config::HandlerKind::Ledger => AnyHandler::Local(Box::new(ledger::Ledger)),
        crate::config::HandlerKind::Http => {
            AnyHandler::Remote(Arc::new(http::HttpHandler::new(&config.http)?))
        }
    })
}

impl From<Box<dyn Handler>> for AnyHandler {
    fn from(h: Box<dyn Handler>) -> Self {
        AnyHandler::Local(h)
    }
}

/// Handles new messages. Implement it to embed idem in a Rust service.
///
/// An `Err` (or a panic) means "could not decide now": it is treated as a
/// [`Verdict::Retry`] of that message, whose staged effects are discarded.
pub trait Handler: Send {
    /// Name used in logs and metrics.
    fn name(&self) -> &'static str;

    /// Column families this handler writes through [`HandlerTxn`]; they are
    /// created when the store opens.
    fn column_families(&self) -> Vec<&'static str> {
        Vec::new()
    }

    /// Handles one new message, staging its state changes in `txn`.
    fn handle(
        &mut self,
        delivery: &Delivery<'_>,
        txn: &mut HandlerTxn<'_>,
    ) -> anyhow::Result<Verdict>;
}
