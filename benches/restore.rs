//! How long a worker takes to restore one partition's changelog into an
//! empty store before it handles that partition (issue goal: 1,000,000
//! records in at most 10 s on the 2-core test machine).
//!
//! It produces N changelog records (each a dedup record in the current
//! bucket, as a worker writes them) to a one-partition topic, then times
//! [`idem::changelog::restore::Restorer::restore`] into a new store, and
//! checks that every key is then found. The broker comes from
//! `IDEM_TEST_BROKERS` (scripts/with-broker.sh starts one).
//!
//! `scripts/with-broker.sh cargo bench --bench restore -- [--records N]`
//! (default 1,000,000). `cargo test --all-targets` runs it without `--bench`:
//! then 20,000 records, so CI keeps it working.

use anyhow::Context as _;
use idem::clock::SystemClock;
use idem::key::{IdempotencyKey, ScopedKeyHash};
use idem::proto::DedupRecord;
use idem::store::{DedupStore, StoreOptions};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench");
    let records: usize = match args.iter().position(|a| a == "--records") {
        Some(i) => args
            .get(i + 1)
            .context("--records needs a number")?
            .parse()
            .context("--records needs a number")?,
        None if full => 1_000_000,
        None => 20_000,
    };
    let brokers = std::env::var("IDEM_TEST_BROKERS")
        .context("IDEM_TEST_BROKERS must name a broker (scripts/with-broker.sh starts one)")?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let changelog = format!("bench-restore-{nanos}");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let topic = NewTopic::new(&changelog, 1, TopicReplication::Fixed(1));
    for r in futures::executor::block_on(admin.create_topics([&topic], &AdminOptions::new()))? {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }

    let dir = tempfile::tempdir()?;
    let store = DedupStore::open(dir.path(), StoreOptions::default(), Arc::new(SystemClock))?;
    let now = store.processing_time();
    let bucket = store.bucket_for(now);
    let key =
        |i: usize| ScopedKeyHash::new("bench", &IdempotencyKey(format!("evt-{i:09}").into_bytes()));
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("message.timeout.ms", "120000")
        .create()?;
    let began = Instant::now();
    let mut pending = Vec::with_capacity(records);
    for i in 0..records {
        let record = DedupRecord {
            fingerprint: vec![7; 16],
            first_seen_ms: now,
            source_topic: "payments".into(),
            source_partition: 0,
            source_offset: i as i64,
            outcome: idem::proto::RecordOutcome::Handled as i32,
            ..DedupRecord::default()
        };
        let k = key(i);
        let payload = idem::changelog::encode(&k, bucket, &record);
        let mut out: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&changelog)
            .partition(0)
            .key(&k.0[..])
            .payload(&payload);
        loop {
            match producer.send_result(out) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((_, back)) => {
                    out = back;
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }
    for f in pending {
        futures::executor::block_on(f)?.map_err(|(e, _)| e)?;
    }
    let produced = began.elapsed();

    let restorer = idem::changelog::restore::Restorer::new({
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &brokers)
            // noida-db 0.2.3 ignores fetch size limits (see benches/compare.rs).
            .set("receive.message.max.bytes", "1000000000");
        c
    })?;
    let began = Instant::now();
    let done = restorer.restore(&store, &changelog, "payments", 0, None)?;
    let took = began.elapsed();
    anyhow::ensure!(
        done.records == records as u64,
        "restored {} of {records} records",
        done.records
    );
    // Every key is found afterwards, as a duplicate would look it up.
    for i in (0..records).step_by((records / 1_000).max(1)) {
        anyhow::ensure!(store.lookup(&key(i))?.is_some(), "key {i} not restored");
    }
    println!(
        "restore: records={records} secs={:.2} records_per_sec={:.0} (produced in {:.1} s) disk_mib={:.1}",
        took.as_secs_f64(),
        records as f64 / took.as_secs_f64(),
        produced.as_secs_f64(),
        store.stats()?.disk_bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}
