//! prost types generated from `proto/`: the wire format of payment events and
//! the on-disk format of dedup records. Generated code, so it is not linted.
#![allow(missing_docs, clippy::all)]

/// `proto/payment_event.proto`.
pub mod payment {
    include!(concat!(env!("OUT_DIR"), "/idem.payment.v1.rs"));
}

/// `proto/idem.proto`.
pub mod store {
    include!(concat!(env!("OUT_DIR"), "/idem.store.v1.rs"));
}

pub use payment::{PaymentEvent, PaymentKind};
pub use store::{
    ChangelogRecord, Checkpoint, CheckpointMark, Claim, DedupRecord, Outcome as RecordOutcome,
    StoredResponse,
};
