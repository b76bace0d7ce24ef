#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into fuzz/corpus/<target>/seed-*.

Realistic inputs: payment events as producers send them (JSON as
`idem::workload` writes it, and protobuf `PaymentEvent`), messages with key
headers for every key configuration of `key_derive`, and dedup records as the
store writes them. Run from anywhere; it rewrites the seeds only.
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def varint(n):
    n &= (1 << 64) - 1  # negative int64: ten bytes, as protobuf writes them
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_varint(num, n):
    return varint(num << 3) + varint(n)


def field_bytes(num, b):
    if isinstance(b, str):
        b = b.encode()
    return varint(num << 3 | 2) + varint(len(b)) + b


def payment_event(event_id, account, amount, currency, kind, at_ms, ref, metadata=()):
    out = field_bytes(1, event_id) + field_bytes(2, account) + field_varint(3, amount)
    out += field_bytes(4, currency) + field_varint(5, kind) + field_varint(6, at_ms)
    out += field_bytes(7, ref)
    for k, v in metadata:
        out += field_bytes(8, field_bytes(1, k) + field_bytes(2, v))
    return out


def json_event(event_id, account, amount, currency, kind, at_ms, ref, **extra):
    d = {
        "event_id": event_id,
        "account_id": account,
        "amount_minor": amount,
        "currency": currency,
        "kind": kind,
        "occurred_at_ms": at_ms,
        "merchant_reference": ref,
    }
    d.update(extra)
    return json.dumps(d, separators=(",", ":")).encode()


CAPTURE, REFUND = 2, 3
T = 1796293020000
JSON_EVENT = json_event("evt-000001", "acct-17", 1250, "EUR", "capture", T, "ord-9")
JSON_PRETTY = json.dumps(json.loads(JSON_EVENT), indent=2, sort_keys=True).encode()
JSON_NESTED = json_event(
    "evt-\u00e9\u2603", "acct-2", -5, "JPY", "refund", 0, "",
    client_id="acme&co=1", meta={"x": [1, 2.5, None, True]}, items=["a"],
).replace(b"acct-2", b"acct-\\u0032")
PROTO_EVENT = payment_event("evt-000002", "acct-17", 1250, "EUR", CAPTURE, T, "ord-9",
                            [("channel", "web")])
PROTO_REFUND = payment_event("evt-000003", "acct-3", 99, "USD", REFUND, T + 86_400_000, "ord-10")

PAYLOADS = {
    "json-event": JSON_EVENT,
    "json-pretty": JSON_PRETTY,
    "json-nested": JSON_NESTED,
    "json-no-key": b'{"account_id":"a","amount_minor":7,"currency":"EUR","kind":"capture"}',
    "json-truncated": b'{"event_id": ',
    "json-array": b"[1,2]",
    "proto-event": PROTO_EVENT,
    "proto-refund": PROTO_REFUND,
    "proto-truncated": PROTO_EVENT[:17],
}


def header(name, value):
    """A key_derive header: a name from its HEADER_NAMES (int) or raw bytes."""
    if isinstance(name, int):
        out = bytes([name])
    else:
        out = bytes([200, len(name)]) + name
    if value is None:
        return out + bytes([255])
    return out + bytes([len(value)]) + value


def key_case(config, fmt, headers, payload, partition=3, offset=42, topic=0, composite=None):
    out = bytes([config, fmt | topic << 3, partition]) + offset.to_bytes(2, "big")
    out += bytes([len(headers)]) + b"".join(header(n, v) for n, v in headers)
    if composite is not None:
        out += bytes([len(composite)]) + composite
    return out + payload


KEY_CASES = {
    # deploy/idem.example.toml: header, then /event_id
    "default-header": key_case(0, 0, [(0, b"pay-77f1"), (3, b"00-abc-01")], JSON_EVENT),
    "default-field": key_case(0, 0, [], JSON_EVENT),
    "default-proto": key_case(0, 2, [(1, b"pay-77f1")], PROTO_EVENT),
    "conflicting-headers": key_case(1, 0, [(0, b"a"), (2, b"b")], JSON_EVENT),
    "empty-header": key_case(1, 0, [(0, None)], JSON_EVENT),
    "field-only-proto": key_case(2, 0, [], PROTO_REFUND),
    "semantic-json": key_case(3, 1, [], JSON_PRETTY),
    "semantic-proto": key_case(3, 0, [], PROTO_EVENT),
    "composed-json": key_case(4, 0, [], JSON_NESTED),
    "composed-proto": key_case(4, 0, [], PROTO_REFUND),
    "unkeyed": key_case(5, 0, [(0, b"ignored")], JSON_EVENT, topic=2),
    "too-large": key_case(0, 4, [], JSON_PRETTY),
    "bytes-format": key_case(1, 3, [(2, b"k")], b"\x00\x01\xff"),
    "raw-header-name": key_case(0, 0, [(b"Idempotency-Key", b"x"), (b"X-Trace", b"y")], JSON_EVENT),
    # an arbitrary composite key: a header, then parts (field, literal, hash)
    "arbitrary-composite": key_case(6, 0, [], JSON_EVENT,
                                    composite=bytes([0, 1, 2, 0, 1, 2, 3, 4, 4, 0x01, 6])),
}


def dedup_record(fp, first_seen, topic, partition, offset, outcome, refreshed=0, response=b""):
    out = field_bytes(1, fp) + field_varint(2, first_seen) + field_bytes(3, topic)
    out += field_varint(4, partition) + field_varint(5, offset) + field_varint(6, outcome)
    if refreshed:
        out += field_varint(7, refreshed)
    if response:
        out += field_bytes(8, response)
    return out


RESPONSE = (field_varint(1, 201) + field_bytes(2, bytes(range(16))) +
            field_bytes(3, b'{"status":"ok"}') + field_varint(4, 1) +
            field_bytes(5, "application/json"))
RECORD = dedup_record(bytes(range(16)), T, "payments", 3, 42, 1)
RECORDS = {
    "handled": RECORD,
    "rejected-refreshed": dedup_record(b"\xff" * 16, T, "payments.v2", 0, 0, 2, T + 5000),
    "with-response": dedup_record(bytes(range(16)), T, "payments", 11, 9_000_000_000, 1,
                                  response=RESPONSE),
    "short-fingerprint": dedup_record(b"\x01" * 15, T, "t", -1, -1, 7),
    "truncated": RECORD[:20],
    "empty": b"",
}


def write(target, seeds):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, "seed-" + name), "wb") as f:
            f.write(data)


write("payload_decode", PAYLOADS)
write("key_derive", KEY_CASES)
write("record_decode", RECORDS)
