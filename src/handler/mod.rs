//! What happens to a message whose key is new.
//!
//! Guarantee: the pipeline calls a handler at most once per idempotency key in
//! the dedup window for a successful outcome, and an in-process handler's
//! writes (through [`HandlerTxn`]) commit in the same RocksDB write batch as
//! the dedup record and the partition checkpoint: all of them or none.

pub mod ledger;

use crate::key::{IdempotencyKey, KeySource};
use crate::payload::Decoded;
pub use crate::store::HandlerTxn;

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
}

/// A handler's final word on a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Applied; its effects are kept.
    Handled,
    /// Refused for good (bad content, business rule); it is dead-lettered with
    /// this reason and its effects are discarded.
    Rejected(String),
}

/// Handles new messages. Implement it to embed idem in a Rust service.
///
/// An `Err` means "could not decide now" (a transient failure): nothing of the
/// batch is written or committed, and the message is delivered again.
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
