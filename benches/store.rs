//! The dedup store's own benchmark: decisions per second (lookup + record) by
//! batch size with and without a synced WAL, lookups that miss and hit across
//! 1, 25 and 169 buckets, bytes on disk per key and resident memory at many
//! live keys. Prints one line per figure; see BENCHMARKS.md.
//!
//! `cargo bench --bench store` runs the full sizes (10 M keys);
//! `cargo bench --bench store -- --quick`, and `cargo test --all-targets`
//! (which runs it without `--bench`), run small ones, so CI keeps it
//! compiling and running.

use idem::clock::ManualClock;
use idem::key::{IdempotencyKey, ScopedKeyHash};
use idem::proto::DedupRecord;
use idem::store::{DedupStore, StoreBatch, StoreOptions};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

const HOUR: i64 = 3_600_000;
const T0: i64 = 1_796_256_000_000;

fn key(i: u64) -> ScopedKeyHash {
    ScopedKeyHash::new(
        "bench",
        &IdempotencyKey(format!("evt-{i:012}").into_bytes()),
    )
}

fn rec(i: u64, now: i64) -> DedupRecord {
    DedupRecord {
        fingerprint: xxhash_rust::xxh3::xxh3_128(&i.to_be_bytes())
            .to_be_bytes()
            .to_vec(),
        first_seen_ms: now,
        source_topic: "payments".into(),
        source_partition: (i % 8) as i32,
        source_offset: i as i64,
        outcome: 1,
        refreshed_ms: 0,
        response: None,
    }
}

fn open(dir: &Path, clock: &ManualClock, sync: bool, window_ms: i64) -> DedupStore {
    let opts = StoreOptions {
        sync,
        window_ms,
        ..StoreOptions::default()
    };
    DedupStore::open(dir, opts, Arc::new(clock.clone())).expect("open the store")
}

/// Decides `n` new keys starting at `first` in batches of `batch`, as the
/// pipeline does: one batched lookup of the batch's keys (all miss), a record
/// each, one commit per batch.
fn decide(store: &DedupStore, first: u64, n: u64, batch: u64) {
    let now = store.processing_time();
    let bucket = store.bucket_for(now);
    let mut i = first;
    while i < first + n {
        let ids: Vec<u64> = (i..(i + batch).min(first + n)).collect();
        let keys: Vec<ScopedKeyHash> = ids.iter().map(|&j| key(j)).collect();
        let found = store.lookup_many(&keys).expect("lookup");
        assert!(found.iter().all(Option::is_none));
        let mut b = StoreBatch::new();
        for (&j, k) in ids.iter().zip(keys) {
            b.record(k, bucket, rec(j, now));
        }
        store.commit(b).expect("commit");
        i += batch;
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this
    // binary without it, and then the quick sizes keep CI short.
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench");
    let scale = if quick { 1 } else { 10 };
    println!(
        "# idem store benchmark ({})",
        if quick { "quick" } else { "full" }
    );

    // Bytes on disk per key and resident memory at many live keys: first,
    // so that the other phases' allocations do not count in the RSS.
    let n = 1_000_000 * scale as u64;
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(T0);
    let rss_before = rss_bytes();
    let store = open(dir.path(), &clock, false, 24 * HOUR);
    let t = Instant::now();
    for h in 0..24u64 {
        clock.set(T0 + h as i64 * HOUR);
        decide(&store, h * (n / 24), n / 24, 1_000);
    }
    let secs = t.elapsed().as_secs_f64();
    let keys = n / 24 * 24;
    store.flush().expect("flush");
    let rss_after = rss_bytes();
    let stats = store.stats().expect("stats");
    let on_disk = dir_bytes(dir.path());
    println!(
        "live keys={keys} in {} buckets: loaded at {:.0} decisions/s; {} bytes on disk = {:.1} bytes/key (tables and memtables {:.1}); RSS {} MiB (+{} MiB)",
        stats.buckets.len(),
        keys as f64 / secs,
        on_disk,
        on_disk as f64 / keys as f64,
        stats.bytes as f64 / keys as f64,
        rss_after / (1 << 20),
        rss_after.saturating_sub(rss_before) / (1 << 20),
    );

    // Decisions per second by batch size, WAL synced per batch or not.
    for (batch, n_sync, n_nosync) in [
        (1u64, 200, 20_000),
        (100, 20_000, 200_000),
        (1_000, 100_000, 1_000_000),
    ] {
        for sync in [true, false] {
            let n = if sync { n_sync } else { n_nosync } / (10 / scale) as u64;
            let dir = tempfile::tempdir().expect("tempdir");
            let clock = ManualClock::new(T0);
            let store = open(dir.path(), &clock, sync, 24 * HOUR);
            let t = Instant::now();
            decide(&store, 0, n, batch);
            let secs = t.elapsed().as_secs_f64();
            println!(
                "decisions batch={batch:<5} wal_sync={sync:<5} n={n:<8} {:>10.0} decisions/s",
                n as f64 / secs
            );
        }
    }

    // Lookups across 1, 25 and 169 buckets: misses, and hits in the oldest
    // bucket (the last one a newest-first lookup reaches).
    let per_bucket = 2_000 * scale as u64;
    for buckets in [1u64, 5, 25, 169] {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::new(T0);
        let store = open(dir.path(), &clock, false, 200 * HOUR);
        for b in 0..buckets {
            clock.set(T0 + b as i64 * HOUR);
            decide(&store, b * per_bucket, per_bucket, 1_000);
        }
        store.flush().expect("flush");
        let n = 100_000u64;
        let t = Instant::now();
        for i in 0..n {
            assert!(store
                .lookup(&key(10_000_000_000 + i))
                .expect("lookup")
                .is_none());
        }
        let miss = t.elapsed().as_secs_f64();
        let t = Instant::now();
        for i in 0..n {
            assert!(store
                .lookup(&key(i % per_bucket))
                .expect("lookup")
                .is_some());
        }
        let hit = t.elapsed().as_secs_f64();
        // The pipeline's way: a batch of 1,000 keys per batched read.
        let misses: Vec<ScopedKeyHash> = (0..n).map(|i| key(10_000_000_000 + i)).collect();
        let t = Instant::now();
        for chunk in misses.chunks(1_000) {
            assert!(store
                .lookup_many(chunk)
                .expect("lookup")
                .iter()
                .all(Option::is_none));
        }
        let batched_miss = t.elapsed().as_secs_f64();
        println!(
            "lookups buckets={buckets:<4} keys={:<8} miss {:>8.2} us  hit-in-oldest {:>8.2} us  miss batched by 1000 {:>8.2} us/key",
            buckets * per_bucket,
            miss / n as f64 * 1e6,
            hit / n as f64 * 1e6,
            batched_miss / n as f64 * 1e6
        );
    }
}
