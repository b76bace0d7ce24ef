//! idem: an idempotent Kafka consumer worker.
//!
//! It consumes topics in a consumer group, records every processed message's
//! idempotency key in a local RocksDB dedup store, and commits offsets only
//! after the handler's effects and the dedup record are durable together, so
//! a redelivered message is a no-op. See `DESIGN.md` for the invariants.
//!
//! Embedding: implement [`handler::Handler`], build a [`config::Config`], and
//! run a [`pipeline::Worker`].
#![warn(missing_docs)]

pub mod changelog;
pub mod clock;
pub mod config;
pub mod demo;
pub mod dlq;
pub mod handler;
pub mod kafka;
pub mod key;
pub mod payload;
pub mod pipeline;
pub mod proto;
pub mod replay;
pub mod reply;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod workload;
