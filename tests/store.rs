//! The dedup store on a real disk, with a clock the tests move by hours and
//! days: the window is a floor, expiry drops whole buckets and gives their
//! disk space back, a clock that jumps back files nothing into the past, and
//! dropping buckets under concurrent lookups neither crashes nor forgets a
//! live key. No broker is needed here.

use idem::clock::ManualClock;
use idem::key::{IdempotencyKey, ScopedKeyHash};
use idem::proto::DedupRecord;
use idem::store::{DedupStore, StoreBatch, StoreOptions};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SEC: i64 = 1_000;
const MIN: i64 = 60 * SEC;
const HOUR: i64 = 60 * MIN;
/// 2026-12-03T10:17:00Z: inside a bucket, not at its start.
const T0: i64 = 1_796_293_020_000;

fn key(i: u64) -> ScopedKeyHash {
    ScopedKeyHash::new("s", &IdempotencyKey(format!("k-{i}").into_bytes()))
}

fn record(store: &DedupStore, keys: impl IntoIterator<Item = u64>) {
    let now = store.processing_time();
    let mut b = StoreBatch::new();
    for i in keys {
        b.record(
            key(i),
            store.bucket_for(now),
            DedupRecord {
                fingerprint: vec![7; 16],
                first_seen_ms: now,
                source_topic: "t".into(),
                source_partition: 0,
                source_offset: i as i64,
                outcome: 1,
                refreshed_ms: 0,
                response: None,
            },
        );
    }
    store.commit(b).unwrap();
}

fn open(dir: &Path, clock: &ManualClock, opts: StoreOptions) -> DedupStore {
    DedupStore::open(dir, opts, Arc::new(clock.clone())).unwrap()
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[test]
fn a_key_is_a_duplicate_for_the_whole_window_and_new_once_its_bucket_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, StoreOptions::default());
    record(&store, [1]);
    let first_bucket = store.bucket_for(T0);

    clock.set(T0 + 23 * HOUR + 59 * MIN);
    assert!(store.expire(store.processing_time()).unwrap().is_empty());
    assert_eq!(store.lookup(&key(1)).unwrap().unwrap().source_offset, 1);

    // T0 + window + bucket: past the end of the bucket plus the window.
    clock.set(T0 + 24 * HOUR + HOUR);
    assert_eq!(store.lookup(&key(1)).unwrap(), None);
    assert_eq!(
        store.expire(store.processing_time()).unwrap(),
        vec![first_bucket]
    );
    assert!(store.live_buckets().is_empty());
    drop(store);
    // Gone on disk too: a reopen finds no bucket.
    let store = open(dir.path(), &clock, StoreOptions::default());
    assert!(store.live_buckets().is_empty());
    assert_eq!(store.lookup(&key(1)).unwrap(), None);
}

#[test]
fn live_buckets_stay_within_window_over_width_plus_two() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let opts = StoreOptions {
        window_ms: 6 * HOUR,
        bucket_secs: 1800,
        ..StoreOptions::default()
    };
    let store = open(dir.path(), &clock, opts);
    let mut most = 0;
    for step in 0..200 {
        clock.set(T0 + step * 10 * MIN);
        record(&store, [step as u64]);
        store.expire(store.processing_time()).unwrap();
        most = most.max(store.live_buckets().len());
    }
    // 6 h / 30 min = 12 buckets in the window, plus the current one and the
    // one whose end is less than a window old.
    assert_eq!(most, 13);
    assert!(most <= 12 + 2);
}

#[test]
fn a_clock_that_jumps_back_two_hours_files_nothing_into_an_older_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, StoreOptions::default());
    record(&store, [1]);
    clock.set(T0 - 2 * HOUR);
    record(&store, [2]);
    assert_eq!(store.clock_clamps(), 2); // once for the batch, once for its commit
    let buckets = store.live_buckets();
    assert_eq!(buckets, vec![store.bucket_for(T0)]);
    assert_eq!(store.lookup(&key(2)).unwrap().unwrap().first_seen_ms, T0);
    // Forgetting is judged by the clamped time too: still known 23 h later.
    clock.set(T0 + 23 * HOUR);
    assert!(store.lookup(&key(1)).unwrap().is_some());
    assert!(store.lookup(&key(2)).unwrap().is_some());
}

#[test]
fn a_dropped_bucket_gives_its_disk_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, StoreOptions::default());
    for chunk in 0..20u64 {
        record(&store, chunk * 10_000..(chunk + 1) * 10_000);
    }
    store.flush().unwrap();
    let stats = store.stats().unwrap();
    assert_eq!(stats.buckets.len(), 1);
    let bucket_bytes = stats.buckets[0].sst_bytes;
    assert!(
        bucket_bytes > 2_000_000,
        "200,000 records in {bucket_bytes} bytes"
    );
    let files = store.sst_files(&store.bucket_for(T0)).unwrap();
    assert!(!files.is_empty());
    let before = dir_bytes(dir.path());

    clock.set(T0 + 26 * HOUR);
    record(&store, [1_000_000]);
    assert_eq!(store.expire(store.processing_time()).unwrap().len(), 1);
    // RocksDB deletes a dropped family's files once nothing reads them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while files.iter().any(|f| f.exists()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left: Vec<_> = files.iter().filter(|f| f.exists()).collect();
    assert!(
        left.is_empty(),
        "files of the dropped bucket still on disk: {left:?}"
    );
    let after = dir_bytes(dir.path());
    println!("store directory: {before} bytes before the drop, {after} after; the bucket held {bucket_bytes}");
    assert!(before - after >= bucket_bytes * 9 / 10);
}

#[test]
fn two_expiry_runs_at_once_drop_each_bucket_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let opts = StoreOptions {
        window_ms: HOUR,
        bucket_secs: 60,
        ..StoreOptions::default()
    };
    let store = Arc::new(open(dir.path(), &clock, opts));
    for m in 0..40 {
        clock.set(T0 + m * MIN);
        record(&store, [m as u64]);
    }
    clock.set(T0 + 10 * HOUR);
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let s = store.clone();
            std::thread::spawn(move || s.expire(T0 + 10 * HOUR).unwrap().len())
        })
        .collect();
    let dropped: usize = runs.into_iter().map(|h| h.join().unwrap()).sum();
    assert_eq!(dropped, 40);
    assert!(store.live_buckets().is_empty());
}

#[test]
fn dropping_buckets_under_concurrent_lookups_never_crashes_nor_forgets_a_live_key() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0 / 1000 * 1000);
    let start = clock_now(&clock);
    // 1 s buckets, 3 s window: a bucket is dropped 4 s (4 iterations) after
    // its start.
    let opts = StoreOptions {
        window_ms: 3 * SEC,
        bucket_secs: 1,
        sync: false,
        ..StoreOptions::default()
    };
    let store = Arc::new(open(dir.path(), &clock, opts));
    let committed = Arc::new(AtomicI64::new(-1));
    let done = Arc::new(AtomicBool::new(false));
    const ITERATIONS: i64 = 10_000;

    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (store, committed, done, clock) = (
                store.clone(),
                committed.clone(),
                done.clone(),
                clock.clone(),
            );
            std::thread::spawn(move || {
                let (mut checked, mut must_find) = (0u64, 0u64);
                while !done.load(Ordering::SeqCst) {
                    let j = committed.load(Ordering::SeqCst);
                    if j < 0 {
                        continue;
                    }
                    let found = store.lookup(&key(j as u64)).unwrap();
                    // The iteration the clock stood at once the lookup was over.
                    let now_iteration = (clock_now(&clock) - start) / SEC;
                    checked += 1;
                    if now_iteration < j + 4 {
                        must_find += 1;
                        assert!(
                            found.is_some(),
                            "key {j} forgotten at iteration {now_iteration}"
                        );
                        assert_eq!(found.unwrap().source_offset, j);
                    }
                }
                (checked, must_find)
            })
        })
        .collect();

    for i in 0..ITERATIONS {
        clock.set(start + i * SEC);
        record(&store, [i as u64]);
        committed.store(i, Ordering::SeqCst);
        store.expire(store.processing_time()).unwrap();
        assert!(store.live_buckets().len() <= 3 + 2);
    }
    done.store(true, Ordering::SeqCst);
    for r in readers {
        let (checked, must_find) = r.join().unwrap();
        println!("reader: {checked} lookups, {must_find} of them required to hit");
        assert!(must_find > 0);
    }
    assert_eq!(store.live_buckets().len(), 4);
}

fn clock_now(clock: &ManualClock) -> i64 {
    use idem::clock::Clock as _;
    clock.now_ms()
}

#[test]
fn over_max_store_bytes_the_oldest_bucket_goes_early_or_the_store_fails_closed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let store = open(dir.path(), &clock, StoreOptions::default());
    for h in 0..3u64 {
        clock.set(T0 + h as i64 * HOUR);
        record(&store, h * 20_000..(h + 1) * 20_000);
    }
    store.flush().unwrap();
    let stats = store.stats().unwrap();
    assert_eq!(stats.buckets.len(), 3);
    let total = store.size_bytes().unwrap();
    // On disk (what the cap counts), after the flush: its table files. Its
    // memtable's bytes are memory, not disk (an empty hashed memtable holds
    // its hash table).
    let oldest = stats.buckets[0].sst_bytes;
    let cap = total - oldest / 2;

    // fail_closed: nothing dropped, a specific error.
    match store.enforce_size_cap(cap, false) {
        Err(idem::store::StoreError::Full { bytes, max, .. }) => {
            assert_eq!((bytes, max), (total, cap));
        }
        other => panic!("expected StoreError::Full, got {other:?}"),
    }
    assert_eq!(store.live_buckets().len(), 3);
    assert!(store.lookup(&key(0)).unwrap().is_some());

    // drop_oldest: exactly the oldest bucket goes, its keys with it.
    let dropped = store.enforce_size_cap(cap, true).unwrap();
    assert_eq!(dropped, vec![store.bucket_for(T0)]);
    assert_eq!(store.live_buckets().len(), 2);
    assert_eq!(store.lookup(&key(0)).unwrap(), None);
    assert!(store.lookup(&key(20_000)).unwrap().is_some());
    assert!(store.size_bytes().unwrap() <= cap);
    // Under the cap: nothing more happens.
    assert!(store.enforce_size_cap(cap, true).unwrap().is_empty());
}

/// Runs `idem store ...` on `dir`; returns (exit code, stdout, stderr).
fn idem_store(args: &[&str], dir: &Path) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_idem"))
        .arg("store")
        .args(args)
        .arg("--store-dir")
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_store_commands_read_a_store_that_is_open_for_writing_and_report_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    // The clock stands now, so that the commands (on the system clock) see
    // the buckets as live.
    let now = {
        use idem::clock::Clock as _;
        idem::clock::SystemClock.now_ms()
    };
    let clock = ManualClock::new(now - 2 * HOUR);
    let store = open(&store_dir, &clock, StoreOptions::default());
    record(&store, 0..300);
    clock.set(now);
    record(&store, 300..500);
    let mut b = StoreBatch::new();
    b.checkpoint("payments", 3, 500, None);
    store.commit(b).unwrap();
    store.flush().unwrap();

    // The worker's store stays open for writing while the commands read it.
    let (code, out, err) = idem_store(&["stats", "--json"], &store_dir);
    assert_eq!(code, 0, "{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["buckets"].as_array().unwrap().len(), 2);
    assert_eq!(stats["estimated_keys"], 500);
    assert_eq!(
        stats["checkpoints"][0],
        serde_json::json!(["payments", 3, 500])
    );

    let (code, out, _) = idem_store(
        &["get", "--key", "k-42", "--scope", "s", "--json"],
        &store_dir,
    );
    assert_eq!(code, 0);
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["source"]["offset"], 42);
    assert_eq!(got["outcome"], "HANDLED");
    assert_eq!(got["fingerprint"], "07".repeat(16));
    let (code, _, _) = idem_store(&["get", "--key", "k-42", "--scope", "other"], &store_dir);
    assert_eq!(code, 5, "a key of one scope is not found in another");

    let (code, out, _) = idem_store(&["expire", "--dry-run", "--json"], &store_dir);
    assert_eq!(code, 0);
    assert_eq!(out.trim().replace([' ', '\n'], ""), r#"{"would_drop":[]}"#);

    let (code, out, _) = idem_store(&["verify"], &store_dir);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("2 buckets, 500 records, 1 checkpoints read; 0 problems"),
        "{out}"
    );

    // A record with a 3-byte fingerprint is a problem verify names.
    let mut b = StoreBatch::new();
    let bad = DedupRecord {
        fingerprint: vec![1, 2, 3],
        first_seen_ms: now,
        source_topic: "t".into(),
        source_partition: 0,
        source_offset: 9,
        outcome: 1,
        refreshed_ms: 0,
        response: None,
    };
    b.record(key(9_999), store.bucket_for(now), bad);
    store.commit(b).unwrap();
    store.flush().unwrap();
    let (code, out, _) = idem_store(&["verify", "--json"], &store_dir);
    assert_eq!(code, 4);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["records"], 501);
    let problems = report["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1);
    assert!(problems[0]
        .as_str()
        .unwrap()
        .ends_with("has a 3-byte fingerprint"));

    let (code, _, err) = idem_store(&["stats"], &dir.path().join("nothing-here"));
    assert_eq!(code, 1);
    assert!(err.contains("no idem store at"), "{err}");
}

#[test]
fn a_store_is_never_created_over_a_damaged_one_or_among_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    let busy = dir.path().join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), "not a store").unwrap();
    let err = DedupStore::open(&busy, StoreOptions::default(), Arc::new(clock.clone()))
        .err()
        .unwrap();
    assert!(matches!(err, idem::store::StoreError::NotEmpty(_)), "{err}");

    let damaged = dir.path().join("damaged");
    drop(open(&damaged, &clock, StoreOptions::default()));
    std::fs::remove_file(damaged.join("CURRENT")).unwrap();
    let err = DedupStore::open(&damaged, StoreOptions::default(), Arc::new(clock.clone()))
        .err()
        .unwrap();
    assert!(matches!(err, idem::store::StoreError::Damaged(_)), "{err}");
    assert!(
        !damaged.join("CURRENT").exists(),
        "nothing was written over it"
    );
    let err = DedupStore::open_read_only(&damaged).err().unwrap();
    assert!(err.to_string().contains("is damaged"), "{err}");
}

#[test]
fn a_wal_corrupted_before_its_last_record_refuses_to_open_instead_of_losing_batches() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(T0);
    {
        let store = open(dir.path(), &clock, StoreOptions::default());
        for b in 0..10u64 {
            record(&store, b * 100..(b + 1) * 100);
        }
    }
    let wal = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&wal).unwrap();
    assert!(
        bytes.len() > 20_000,
        "the batches are in the WAL ({} bytes)",
        bytes.len()
    );
    let middle = bytes.len() / 3;
    bytes[middle..middle + 8].copy_from_slice(b"XXXXXXXX");
    std::fs::write(&wal, &bytes).unwrap();
    let err = DedupStore::open(dir.path(), StoreOptions::default(), Arc::new(clock.clone()))
        .err()
        .expect("a corrupted WAL must not open as if the later batches never happened");
    assert!(err.to_string().contains("Corruption"), "{err}");
}
