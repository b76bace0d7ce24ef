//! A broker that loses acknowledged messages and hands their offsets to new
//! ones, against a real broker and a real store: the worker notices that the
//! log below its checkpoint is not the one it handled, resumes at the newest
//! earlier checkpoint that still matches, and handles every new message
//! there exactly once, re-reading the ones it had (as duplicates).
//!
//! The rewritten log is made exactly, so that the counts are exact: the
//! topic is deleted and created again (on assignment), or the broker comes
//! back from a stop with another broker's data (after an outage), holding
//! the first 600 messages byte for byte (timestamps included) and 700 new
//! events where messages 600..999 were.

mod common;

use common::faults::wait_until;
use common::*;
use idem::clock::ManualClock;
use idem::handler::ledger::{self, Ledger};
use idem::pipeline::{RunSummary, StopWhen, Worker};
use idem::store::DedupStore;
use idem::telemetry::server::Health;
use idem::workload::{Workload, WorkloadMessage, WorkloadSpec};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn events(prefix: &'static str) -> Vec<WorkloadMessage> {
    Workload::generate(&WorkloadSpec {
        unique: 1_700,
        resends: 0,
        conflicts: 0,
        partitions: 1,
        accounts: 50,
        seed: 11,
        id_prefix: prefix,
    })
    .messages
}

/// Produces `messages` to partition 0, message `i` with timestamp
/// `first_ts + i`, and waits for every acknowledgement.
fn produce_at(brokers: &str, topic: &str, messages: &[WorkloadMessage], first_ts: i64) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "60000")
        .create()
        .unwrap();
    let pending: Vec<_> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut headers = OwnedHeaders::new();
            for (k, v) in &m.headers {
                headers = headers.insert(Header {
                    key: k,
                    value: Some(v),
                });
            }
            let record = FutureRecord::to(topic)
                .partition(0)
                .key(&m.key)
                .payload(&m.payload)
                .headers(headers)
                .timestamp(first_ts + i as i64);
            producer.send_result(record).map_err(|(e, _)| e).unwrap()
        })
        .collect();
    for f in pending {
        futures::executor::block_on(f).unwrap().unwrap();
    }
}

/// A ledger worker on `clock`, running in a thread until `.1` is set.
type Running = (
    Arc<DedupStore>,
    Arc<AtomicBool>,
    std::thread::JoinHandle<RunSummary>,
    Arc<Health>,
);

fn start_worker(config: idem::config::Config, clock: &ManualClock) -> Running {
    // RUST_LOG=info shows the worker's log when a run needs explaining.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let worker = Worker::with_clock(config, Box::new(Ledger), Arc::new(clock.clone())).unwrap();
    let store = worker.store();
    let health = worker.health();
    let shutdown = Arc::new(AtomicBool::new(false));
    let stop = shutdown.clone();
    let run = std::thread::spawn(move || worker.run(stop, StopWhen::Shutdown).unwrap());
    (store, shutdown, run, health)
}

/// Produces the first 1,000 events in chunks of 100 to the running worker
/// (message `i` with timestamp `base_ts + i`: recent, or the broker's
/// retention would delete them),
/// the clock moving 1.5 s after each chunk is handled, so that each chunk
/// leaves a mark in the checkpoint's history.
fn produce_in_chunks(
    store: &DedupStore,
    brokers: &str,
    topic: &str,
    a: &[WorkloadMessage],
    clock: &ManualClock,
    base_ts: i64,
) {
    for (i, chunk) in a.chunks(100).enumerate() {
        produce_at(brokers, topic, chunk, base_ts + i as i64 * 100);
        let want = (i as i64 + 1) * 100;
        wait_until(
            60,
            "the worker handles the chunk",
            || store.checkpoint(topic, 0).unwrap() == Some(want),
            || format!("checkpoint {:?}", store.checkpoint(topic, 0)),
        );
        clock.advance(1_500);
    }
}

/// The exact outcome of a second run over the rewritten log.
fn assert_rewritten_log_handled(s: &RunSummary, store: &DedupStore, topic: &str) {
    assert_eq!(s.log_rewrites, 1, "{s:?}");
    assert_eq!(s.log_rewrites_held, 0);
    // The 700 events at the reused offsets, each once.
    assert_eq!(s.handled, 700, "{s:?}");
    // Re-read from the newest mark that matches, which lies in 500..=600:
    // what comes before offset 600 is the same log, so duplicates.
    let reread = s.consumed - 700;
    assert!((0..=100).contains(&reread), "{s:?}");
    assert_eq!(s.duplicates, reread);
    assert_eq!(s.conflicts, 0);
    let applied = ledger::applied_counts(store).unwrap();
    assert_eq!(applied.len(), 1_700);
    assert!(applied.values().all(|&n| n == 1));
    assert_eq!(store.checkpoint(topic, 0).unwrap(), Some(1_300));
}

/// Deletes `topic` and creates it again, empty, with one partition.
fn recreate_topic(topic: &str) {
    delete_topic(topic);
    wait_until(
        30,
        "the topic can be created again",
        || {
            std::panic::catch_unwind(|| create_topic(topic, 1)).is_ok()
                && log_end(topic, 1) == vec![0]
        },
        || "still there".into(),
    );
}

fn delete_topic(topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let res =
        futures::executor::block_on(admin.delete_topics(&[topic], &AdminOptions::new())).unwrap();
    for r in res {
        r.unwrap();
    }
}

#[test]
fn a_log_rewritten_below_the_checkpoint_is_read_again_from_the_newest_matching_checkpoint() {
    let topic = unique("rewritten");
    let group = unique("g");
    create_topic(&topic, 1);
    let ev = events("rw-assign");
    let (a, b) = ev.split_at(1_000);
    let dir = tempfile::tempdir().unwrap();
    let config = config(&topic, &group, &dir.path().join("store"));
    let clock = ManualClock::new(now_ms());
    let (store, shutdown, run, _) = start_worker(config.clone(), &clock);
    let base = now_ms();
    produce_in_chunks(&store, &brokers(), &topic, a, &clock, base);
    drop(store);
    shutdown.store(true, Ordering::SeqCst);
    assert_eq!(run.join().unwrap().handled, 1_000);
    assert_eq!(committed(&group, &topic, 1), vec![1_000]);

    // The broker "loses" offsets 600..999 and takes 700 new events there.
    recreate_topic(&topic);
    produce_at(&brokers(), &topic, &a[..600], base);
    produce_at(&brokers(), &topic, b, base + 10_000);
    assert_eq!(log_end(&topic, 1), vec![1_300]);

    let (store, shutdown, run, _) = start_worker(config, &clock);
    wait_until(
        60,
        "the worker handles the rewritten log",
        || store.checkpoint(&topic, 0).unwrap() == Some(1_300),
        || format!("checkpoint {:?}", store.checkpoint(&topic, 0)),
    );
    shutdown.store(true, Ordering::SeqCst);
    let s = run.join().unwrap();
    assert_rewritten_log_handled(&s, &store, &topic);
    assert_eq!(committed(&group, &topic, 1), vec![1_300]);
}

#[test]
fn after_an_outage_a_broker_back_with_a_rewritten_log_is_read_again_from_the_newest_matching_checkpoint(
) {
    let broker = OwnBroker::start();
    let topic = unique("rewritten");
    let group = unique("g");
    broker.create_topic(&topic, 1);
    let ev = events("rw-outage");
    let (a, b) = ev.split_at(1_000);
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&topic, &group, &dir.path().join("store"));
    config.brokers = broker.addr.clone();
    let clock = ManualClock::new(now_ms());

    let (store, shutdown, run, _) = start_worker(config, &clock);
    let base = now_ms();
    produce_in_chunks(&store, &broker.addr, &topic, a, &clock, base);

    // Another broker holds the log as it will be: the first 600 messages,
    // then 700 new events. The worker's broker stops and comes back with it.
    let other = OwnBroker::start();
    other.create_topic(&topic, 1);
    // Its changelog lost everything too (the worker then reads it from its
    // start and writes on from there).
    other.create_topic(&format!("{group}.idem-changelog.{topic}"), 1);
    produce_at(&other.addr, &topic, &a[..600], base);
    produce_at(&other.addr, &topic, b, base + 10_000);
    broker.restart_with_data_of(&other);

    wait_until(
        120,
        "the worker handles the rewritten log",
        || store.checkpoint(&topic, 0).unwrap() == Some(1_300),
        || {
            format!(
                "checkpoint {:?}; {}",
                store.checkpoint(&topic, 0),
                broker.describe()
            )
        },
    );
    shutdown.store(true, Ordering::SeqCst);
    let mut s = run.join().unwrap();
    // The first run's 1,000 events are in the same counters.
    s.handled -= 1_000;
    s.consumed -= 1_000;
    assert_rewritten_log_handled(&s, &store, &topic);
}

#[test]
fn a_log_rewritten_below_every_mark_holds_the_partition_until_the_operator_chooses() {
    let topic = unique("rewritten");
    let group = unique("g");
    create_topic(&topic, 1);
    let ev = events("rw-held");
    let a = &ev[..1_000];
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(&topic, &group, &dir.path().join("store"));
    let clock = ManualClock::new(now_ms());
    let (store, shutdown, run, _) = start_worker(config.clone(), &clock);
    produce_in_chunks(&store, &brokers(), &topic, a, &clock, now_ms());
    drop(store);
    shutdown.store(true, Ordering::SeqCst);
    assert_eq!(run.join().unwrap().handled, 1_000);

    // Every offset holds another message now: no mark matches.
    recreate_topic(&topic);
    let other = events("rw-held-new");
    produce_at(&brokers(), &topic, &other[..1_300], now_ms());

    let (store, shutdown, run, health) = start_worker(config.clone(), &clock);
    // Held: not ready, saying why; nothing is handled and nothing moves.
    wait_until(
        30,
        "/readyz names the rewritten partition",
        || {
            health.not_ready_reasons().iter().any(|r| {
                r.contains(&format!(
                    "the log of {topic}/0 was rewritten below the store checkpoint 1000"
                ))
            })
        },
        || format!("{:?}", health.not_ready_reasons()),
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(store.checkpoint(&topic, 0).unwrap(), Some(1_000));
    drop(store);
    shutdown.store(true, Ordering::SeqCst);
    let s = run.join().unwrap();
    assert_eq!((s.log_rewrites_held, s.log_rewrites), (1, 0), "{s:?}");
    assert_eq!((s.consumed, s.handled), (0, 0), "{s:?}");

    // The operator's choice: the group's offset at 0, started once with
    // resume_from = "group". Every message of the new log is handled once.
    rewind_group(&group, &topic, 1, 0);
    config.resume_from = idem::config::ResumeFrom::Group;
    let (store, shutdown, run, _) = start_worker(config, &clock);
    wait_until(
        60,
        "the worker handles the new log from the operator's offset",
        || store.checkpoint(&topic, 0).unwrap() == Some(1_300),
        || format!("checkpoint {:?}", store.checkpoint(&topic, 0)),
    );
    shutdown.store(true, Ordering::SeqCst);
    let s = run.join().unwrap();
    assert_eq!((s.handled, s.duplicates), (1_300, 0), "{s:?}");
    assert_eq!(ledger::applied_counts(&store).unwrap().len(), 2_300);
}
