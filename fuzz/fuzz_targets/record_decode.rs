//! Dedup record decoding, through the store's own read paths.
//!
//! The input is a stored value: it is written as the value of one dedup
//! record in a bucket of a real (RocksDB) `DedupStore`, then read back with
//! `DedupStore::lookup` (the worker's path), `DedupStore::find` (inspection)
//! and `DedupStore::verify`. The bucket is opened as a handler column family
//! too, which is the only public way to write raw bytes into it.
//!
//! Properties checked, beyond "never panics":
//! - a value that decodes as a `DedupRecord` is returned by `lookup` and
//!   `find` as exactly that record, and one that does not is
//!   `StoreError::Corrupt { what: "dedup record", .. }` with the decoder's
//!   reason, from both;
//! - `verify` counts the record and lists exactly one problem for a value
//!   that does not decode or has a fingerprint that is not 16 bytes, and none
//!   otherwise;
//! - a record that decodes re-encodes to bytes that decode to the same
//!   record, and re-encoding is stable (encode . decode . encode = encode).
#![no_main]

use idem::clock::ManualClock;
use idem::key::{IdempotencyKey, ScopedKeyHash};
use idem::proto::DedupRecord;
use idem::store::{Bucket, DedupStore, StoreBatch, StoreError, StoreOptions};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A fixed processing time, so the bucket is always live.
const NOW_MS: i64 = 1_796_293_020_000;
const BUCKET_SECS: i64 = 3600;

struct Fixture {
    store: DedupStore,
    dir: PathBuf,
    bucket: Bucket,
    cf: &'static str,
    key: ScopedKeyHash,
}

/// One store for the whole run: opening RocksDB per input would be all the
/// fuzzer measured. Every input overwrites the same key. It is closed at
/// exit (`close_at_exit`), before LeakSanitizer looks: a RocksDB left open
/// at exit leaves its block cache's blocks behind as leaks.
static FIXTURE: Mutex<Option<Fixture>> = Mutex::new(None);

fn open_fixture() -> Fixture {
    let bucket = Bucket::containing(NOW_MS, BUCKET_SECS);
    let cf: &'static str = Box::leak(bucket.name().into_boxed_str());
    let dir = std::env::temp_dir().join(format!("idem-fuzz-record-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let store = DedupStore::open(
        &dir,
        StoreOptions {
            window_ms: 24 * 3600 * 1000,
            bucket_secs: BUCKET_SECS,
            handler_cfs: vec![cf],
            sync: false,
        },
        Arc::new(ManualClock::new(NOW_MS)),
    )
    .expect("open the fuzz store");
    assert_eq!(store.live_buckets(), vec![bucket]);
    extern "C" {
        fn atexit(f: extern "C" fn()) -> std::ffi::c_int;
    }
    // SAFETY: registers a plain function; it runs once, at exit.
    assert_eq!(unsafe { atexit(close_at_exit) }, 0);
    Fixture {
        store,
        dir,
        bucket,
        cf,
        key: ScopedKeyHash::new("payments", &IdempotencyKey(b"evt-1".to_vec())),
    }
}

extern "C" fn close_at_exit() {
    let fixture = FIXTURE.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(f) = fixture {
        let dir = f.dir.clone();
        drop(f);
        let _ = std::fs::remove_dir_all(dir);
    }
}

fuzz_target!(|data: &[u8]| {
    let mut guard = FIXTURE.lock().unwrap_or_else(|e| e.into_inner());
    let f = guard.get_or_insert_with(open_fixture);
    let mut batch = StoreBatch::new();
    let mut txn = batch.handler_txn(&f.store);
    txn.put(f.cf, f.key.0.to_vec(), data.to_vec());
    txn.keep();
    f.store.commit(batch).expect("write the value");

    let direct = DedupRecord::decode(data);
    let looked = f.store.lookup(&f.key);
    let found = f.store.find(&f.key);
    match &direct {
        Ok(record) => {
            assert_eq!(looked.expect("lookup").as_ref(), Some(record));
            assert_eq!(found.expect("find"), Some((f.bucket, record.clone())));

            let bytes = record.encode_to_vec();
            assert_eq!(bytes.len(), record.encoded_len());
            let again = DedupRecord::decode(bytes.as_slice()).expect("a re-encoded record decodes");
            assert_eq!(&again, record);
            assert_eq!(again.encode_to_vec(), bytes);
        }
        Err(e) => {
            for r in [looked.map(|_| ()), found.map(|_| ())] {
                match r {
                    Err(StoreError::Corrupt {
                        what: "dedup record",
                        detail,
                    }) => assert_eq!(detail, e.to_string()),
                    other => panic!("an undecodable record gave {other:?}"),
                }
            }
        }
    }

    let report = f.store.verify().expect("verify");
    assert_eq!((report.buckets, report.records), (1, 1), "{report:?}");
    let expected_problems = match &direct {
        Err(_) => 1,
        Ok(r) if r.fingerprint.len() != 16 => 1,
        Ok(_) => 0,
    };
    assert_eq!(report.problems.len(), expected_problems, "{report:?}");
});
