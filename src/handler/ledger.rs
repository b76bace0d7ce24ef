//! The built-in payment ledger: applies payment events to per-account,
//! per-currency balances held in the `ledger` column family of the dedup store.
//!
//! It is the exactly-once reference: its balance changes commit in the same
//! write batch as the dedup record, so after any crash the balances equal the
//! sum of the events that are recorded as handled, and the applied-count per
//! event id (kept for proof) never exceeds 1. The applied-counts are kept for
//! ever, outside the dedup window: an event redelivered after its dedup record
//! expired is rejected (dead-lettered with the reason), never applied twice.
//!
//! Amounts are i64 minor units; an event that would overflow a balance is
//! rejected, never wrapped.

use crate::handler::{Delivery, Handler, HandlerTxn, Verdict};
use crate::payload::Decoded;
use crate::proto::{PaymentEvent, PaymentKind};
use crate::store::{DedupStore, StoreError};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// The ledger's column family.
pub const LEDGER_CF: &str = "ledger";
const BALANCE_PREFIX: &[u8] = b"bal\0";
const APPLIED_PREFIX: &[u8] = b"applied\0";

/// The ledger handler.
#[derive(Debug, Default)]
pub struct Ledger;

/// The JSON form of a `PaymentEvent`: the proto field names, `kind` as text
/// (`"capture"`, case-insensitive).
#[derive(Debug, Deserialize)]
struct JsonPaymentEvent {
    #[serde(default)]
    event_id: String,
    #[serde(default)]
    account_id: String,
    amount_minor: i64,
    #[serde(default)]
    currency: String,
    kind: String,
    #[serde(default)]
    occurred_at_ms: i64,
    #[serde(default)]
    merchant_reference: String,
    #[serde(default)]
    metadata: std::collections::HashMap<String, String>,
}

/// Reads a payment event from a decoded payload; the error is a rejection
/// reason. A protobuf event is borrowed as it was decoded, not copied: this
/// runs once per new message.
pub fn payment_event(decoded: &Decoded) -> Result<Cow<'_, PaymentEvent>, String> {
    match decoded {
        Decoded::Proto(ev) => Ok(Cow::Borrowed(ev)),
        Decoded::Json(v) => {
            let j = JsonPaymentEvent::deserialize(v)
                .map_err(|e| format!("JSON is not a payment event: {e}"))?;
            let kind = PaymentKind::from_str_name(&j.kind.to_ascii_uppercase())
                .ok_or_else(|| format!("unknown payment kind `{}`", j.kind))?;
            Ok(Cow::Owned(PaymentEvent {
                event_id: j.event_id,
                account_id: j.account_id,
                amount_minor: j.amount_minor,
                currency: j.currency,
                kind: kind as i32,
                occurred_at_ms: j.occurred_at_ms,
                merchant_reference: j.merchant_reference,
                metadata: j.metadata,
            }))
        }
        Decoded::Opaque => Err("the ledger needs a PaymentEvent payload, not opaque bytes".into()),
    }
}

/// The signed balance change of an event, or why it is refused.
pub fn balance_delta(ev: &PaymentEvent) -> Result<i64, String> {
    if ev.account_id.is_empty() {
        return Err("payment event has no account_id".into());
    }
    if ev.currency.len() != 3 || !ev.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(format!(
            "currency `{}` is not an ISO 4217 alphabetic code",
            ev.currency
        ));
    }
    if ev.amount_minor <= 0 {
        return Err(format!(
            "amount_minor must be positive, got {}",
            ev.amount_minor
        ));
    }
    match PaymentKind::try_from(ev.kind) {
        Ok(PaymentKind::Capture) => Ok(ev.amount_minor),
        Ok(PaymentKind::Refund | PaymentKind::Chargeback) => Ok(-ev.amount_minor),
        Ok(PaymentKind::Authorize | PaymentKind::Void) => Ok(0),
        Ok(PaymentKind::Unspecified) | Err(_) => {
            Err(format!("payment kind {} is not supported", ev.kind))
        }
    }
}

fn balance_key(account: &str, currency: &str) -> Vec<u8> {
    let mut k = BALANCE_PREFIX.to_vec();
    k.extend_from_slice(account.as_bytes());
    k.push(0);
    k.extend_from_slice(currency.as_bytes());
    k
}

fn applied_key(id: &[u8]) -> Vec<u8> {
    let mut k = APPLIED_PREFIX.to_vec();
    k.extend_from_slice(id);
    k
}

fn read_i64(v: Option<Vec<u8>>) -> anyhow::Result<i64> {
    match v {
        None => Ok(0),
        Some(b) => Ok(i64::from_be_bytes(b.as_slice().try_into().map_err(
            |_| anyhow::anyhow!("corrupt ledger value of {} bytes", b.len()),
        )?)),
    }
}

impl Handler for Ledger {
    fn name(&self) -> &'static str {
        "ledger"
    }

    fn column_families(&self) -> Vec<&'static str> {
        vec![LEDGER_CF]
    }

    fn handle(&mut self, d: &Delivery<'_>, txn: &mut HandlerTxn<'_>) -> anyhow::Result<Verdict> {
        let ev = match payment_event(d.decoded) {
            Ok(ev) => ev,
            Err(reason) => return Ok(Verdict::Rejected(reason)),
        };
        let delta = match balance_delta(&ev) {
            Ok(delta) => delta,
            Err(reason) => return Ok(Verdict::Rejected(reason)),
        };
        let bkey = balance_key(&ev.account_id, &ev.currency);
        let balance = read_i64(txn.get(LEDGER_CF, &bkey)?)?;
        let Some(new_balance) = balance.checked_add(delta) else {
            return Ok(Verdict::Rejected(format!(
                "balance of {}/{} would overflow",
                ev.account_id, ev.currency
            )));
        };
        let id: &[u8] = if ev.event_id.is_empty() {
            &d.key.0
        } else {
            ev.event_id.as_bytes()
        };
        let akey = applied_key(id);
        let applied = read_i64(txn.get(LEDGER_CF, &akey)?)?;
        if applied > 0 {
            // The dedup record is gone (the window passed, or the store was
            // restored from an older copy) but the ledger remembers: a ledger
            // never applies an event twice.
            return Ok(Verdict::Rejected(format!(
                "event `{}` was already applied to the ledger; its dedup record is no longer in the window, and the ledger refuses to apply it twice",
                String::from_utf8_lossy(id)
            )));
        }
        txn.put(LEDGER_CF, bkey, new_balance.to_be_bytes().to_vec());
        txn.put(LEDGER_CF, akey, (applied + 1).to_be_bytes().to_vec());
        Ok(Verdict::Handled)
    }
}

/// Balances by (account, currency), as committed.
pub fn balances(store: &DedupStore) -> Result<BTreeMap<(String, String), i64>, StoreError> {
    let mut out = BTreeMap::new();
    for (k, v) in store.scan_handler_cf(LEDGER_CF)? {
        let Some(rest) = k.strip_prefix(BALANCE_PREFIX) else {
            continue;
        };
        let mut parts = rest.splitn(2, |b| *b == 0);
        let account = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
        let currency = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
        let value =
            i64::from_be_bytes(v.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                what: "ledger balance",
                detail: format!("{} bytes", v.len()),
            })?);
        out.insert((account, currency), value);
    }
    Ok(out)
}

/// How many times each event id was applied, as committed. Every value must
/// be 1: a 2 is a double application.
pub fn applied_counts(store: &DedupStore) -> Result<BTreeMap<String, i64>, StoreError> {
    let mut out = BTreeMap::new();
    for (k, v) in store.scan_handler_cf(LEDGER_CF)? {
        let Some(id) = k.strip_prefix(APPLIED_PREFIX) else {
            continue;
        };
        let value =
            i64::from_be_bytes(v.as_slice().try_into().map_err(|_| StoreError::Corrupt {
                what: "ledger applied-count",
                detail: format!("{} bytes", v.len()),
            })?);
        out.insert(String::from_utf8_lossy(id).into_owned(), value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: PaymentKind, amount: i64) -> PaymentEvent {
        PaymentEvent {
            event_id: "e".into(),
            account_id: "acct".into(),
            amount_minor: amount,
            currency: "EUR".into(),
            kind: kind as i32,
            ..Default::default()
        }
    }

    #[test]
    fn kinds_move_balances_in_their_direction() {
        assert_eq!(balance_delta(&ev(PaymentKind::Capture, 5)), Ok(5));
        assert_eq!(balance_delta(&ev(PaymentKind::Refund, 5)), Ok(-5));
        assert_eq!(balance_delta(&ev(PaymentKind::Chargeback, 5)), Ok(-5));
        assert_eq!(balance_delta(&ev(PaymentKind::Authorize, 5)), Ok(0));
    }

    #[test]
    fn invalid_events_are_rejected_with_reasons() {
        assert_eq!(
            balance_delta(&ev(PaymentKind::Capture, 0)),
            Err("amount_minor must be positive, got 0".into())
        );
        let mut e = ev(PaymentKind::Capture, 1);
        e.currency = "eur".into();
        assert!(balance_delta(&e).unwrap_err().contains("ISO 4217"));
        assert!(balance_delta(&ev(PaymentKind::Unspecified, 1)).is_err());
    }

    #[test]
    fn json_events_read_like_protobuf_ones() {
        let v = serde_json::json!({"event_id":"j","account_id":"a","amount_minor":3,
                                   "currency":"USD","kind":"Refund"});
        let decoded = Decoded::Json(v);
        let e = payment_event(&decoded).unwrap();
        assert_eq!((e.kind(), e.amount_minor), (PaymentKind::Refund, 3));
        let bad = serde_json::json!({"event_id":"j","amount_minor":3,"kind":"teleport"});
        assert_eq!(
            payment_event(&Decoded::Json(bad)).unwrap_err(),
            "unknown payment kind `teleport`"
        );
    }
}
