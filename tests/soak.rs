//! Crash soak: a producer writes payment events (10 % exact re-sends, 1 %
//! conflicting re-sends) while `idem run` is SIGKILLed at random moments and
//! the broker is stopped and started again; at the end every event is applied
//! exactly once, committed = log-end, and the dead letters are the
//! conflicts.
//!
//! Small by default (a test, without broker restarts: see below);
//! `scripts/soak.sh EVENTS KILLS [RESTART_EVERY]` runs it large, with a
//! broker restart every third kill, and prints one line: events, kills,
//! broker restarts, lost, doubled, events in the log, dead letters.

mod common;

use common::*;
use idem::handler::ledger;
use idem::store::DedupStore;
use idem::workload::{produce_messages, Role, Workload, WorkloadSpec};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::{Rng, SeedableRng};
use std::collections::{HashMap, HashSet};
use std::process::Child;
use std::time::{Duration, Instant};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn spawn(
    broker: &str,
    topic: &str,
    group: &str,
    store: &std::path::Path,
    extra: &[&str],
    log: &std::path::Path,
) -> Child {
    let mut cmd = idem_run(
        broker,
        topic,
        group,
        store,
        std::fs::File::create(log).unwrap().into(),
    );
    cmd.args(extra);
    // After a broker restart, noida-db 0.2.3 never expires a member that was
    // SIGKILLed, and the next JoinGroup waits for it for ever. With static
    // membership the next worker takes the killed one's place at once (as
    // a redeployed pod would).
    cmd.env("IDEM_KAFKA__GROUP_INSTANCE_ID", "soak-worker");
    if let Ok(debug) = std::env::var("IDEM_TEST_SOAK_DEBUG") {
        cmd.env("IDEM_KAFKA__DEBUG", debug)
            .env("RUST_LOG", "info,librdkafka=debug,rdkafka=debug");
    }
    cmd.spawn().unwrap()
}

/// The source positions (partition, offset) every worker log under `dir`
/// reports as dead-lettered.
fn dead_lettered_in_logs(dir: &std::path::Path) -> HashSet<(i32, i64)> {
    let mut found = HashSet::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text
            .lines()
            .filter(|l| l.contains("dead-lettering message"))
        {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .and_then(|v| v.parse::<i64>().ok())
            };
            if let (Some(p), Some(o)) = (field("partition="), field("offset=")) {
                found.insert((p as i32, o));
            }
        }
    }
    found
}

#[test]
fn sigkills_and_broker_restarts_lose_and_double_nothing() {
    let events = env_or("IDEM_TEST_SOAK_EVENTS", 30_000);
    let kills = env_or("IDEM_TEST_SOAK_KILLS", 4);
    // Broker restarts are off at the test's size: noida-db 0.2.3 loses a few
    // acknowledged messages across a restart (seen as missing dead letters
    // with every event still in the source topic), which is the broker's
    // failure, not idem's. scripts/soak.sh turns them on and reports.
    let restarts_every = env_or("IDEM_TEST_SOAK_RESTART_EVERY", 0);
    let partitions = 8;
    let began = Instant::now();
    let broker = OwnBroker::start();
    let topic = unique("soak");
    let group = unique("g");
    broker.create_topic(&topic, partitions);
    let spec = WorkloadSpec {
        unique: events - events / 10 - events / 100,
        resends: events / 10,
        conflicts: events / 100,
        partitions,
        accounts: 1_000,
        seed: 42,
        ..WorkloadSpec::default()
    };
    let w = Workload::generate(&spec);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");

    // The producer writes in chunks while the worker is killed; it retries
    // through broker restarts (idempotent, one-minute delivery timeout).
    let addr = broker.addr.clone();
    let (t, msgs) = (topic.clone(), w.messages.clone());
    let producer = std::thread::spawn(move || {
        for chunk in msgs.chunks(2_000) {
            let mut tries = 0;
            while let Err(e) = produce_messages(&addr, &t, chunk) {
                tries += 1;
                assert!(tries < 10, "producing failed 10 times: {e:#}");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    });

    let mut rng = rand::rngs::StdRng::seed_from_u64(events as u64 + kills as u64);
    let mut restarts = 0;
    for k in 0..kills {
        let log = dir.path().join(format!("worker-{k}.log"));
        let mut child = spawn(&broker.addr, &topic, &group, &store, &[], &log);
        std::thread::sleep(Duration::from_millis(rng.random_range(1_500..6_000)));
        if restarts_every > 0 && (k + 1) % restarts_every == 0 {
            // The broker goes away under the running worker, then comes back.
            broker.stop();
            std::thread::sleep(Duration::from_millis(rng.random_range(500..3_000)));
            broker.restart();
            restarts += 1;
            std::thread::sleep(Duration::from_millis(rng.random_range(500..3_000)));
        }
        kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
        child.wait().unwrap();
    }
    producer.join().unwrap();

    // A last run to the end.
    let log = dir.path().join("worker-last.log");
    let mut last = spawn(
        &broker.addr,
        &topic,
        &group,
        &store,
        &["--until-caught-up"],
        &log,
    );
    let until =
        Instant::now() + Duration::from_secs(env_or("IDEM_TEST_SOAK_LAST_RUN_SECS", 300) as u64);
    while last.try_wait().unwrap().is_none() {
        if Instant::now() > until {
            let _ = last.kill();
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            panic!(
                "the last run did not catch up; its log ends:\n{}\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
                broker.describe()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(last.wait().unwrap().success());

    // What the broker holds: the distinct original events in the topic.
    // The conflicts' payloads, to find where the broker still holds them.
    let conflict_payloads: HashSet<&[u8]> = w
        .messages
        .iter()
        .filter(|m| m.role == Role::Conflict)
        .map(|m| m.payload.as_slice())
        .collect();
    let mut conflicts_in_log: HashMap<(i32, i64), String> = HashMap::new();
    let original_payloads: HashSet<&[u8]> = w
        .messages
        .iter()
        .filter(|m| m.role == Role::Original)
        .map(|m| m.payload.as_slice())
        .collect();
    let mut originals_in_log: HashMap<String, Vec<(i32, i64)>> = HashMap::new();
    let in_log = {
        use prost::Message as _;
        use rdkafka::consumer::Consumer as _;
        use rdkafka::Message as _;
        let c: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &broker.addr)
            .set("receive.message.max.bytes", "1000000000")
            .set("group.id", unique("scan"))
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
        // assign, not subscribe: no group join (which noida-db can hang on
        // after restarts) between the test and the truth.
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&topic, p, rdkafka::Offset::Beginning)
                .unwrap();
        }
        c.assign(&tpl).unwrap();
        let mut ids = HashSet::new();
        let mut eof = HashSet::new();
        let until = Instant::now() + Duration::from_secs(300);
        while eof.len() < partitions as usize && Instant::now() < until {
            match c.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    let body = m.payload().unwrap_or_default();
                    let conflict = conflict_payloads.contains(body);
                    let original = !conflict && original_payloads.contains(body);
                    let id = serde_json::from_slice::<serde_json::Value>(body)
                        .ok()
                        .and_then(|v| v.get("event_id")?.as_str().map(str::to_string))
                        .or_else(|| {
                            idem::proto::PaymentEvent::decode(body)
                                .ok()
                                .map(|e| e.event_id)
                        });
                    if let Some(id) = id {
                        if conflict {
                            conflicts_in_log.insert((m.partition(), m.offset()), id.clone());
                        } else if original {
                            originals_in_log
                                .entry(id.clone())
                                .or_default()
                                .push((m.partition(), m.offset()));
                        }
                        ids.insert(id);
                    }
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    eof.insert(p);
                }
                _ => {}
            }
        }
        ids
    };
    let s = DedupStore::open_read_only(&store).unwrap();
    let applied = ledger::applied_counts(&s).unwrap();
    let doubled = applied.values().filter(|&&n| n > 1).count();
    // Lost: events the broker holds that were never applied. Events the
    // broker no longer holds (it lost acknowledged messages at a restart)
    // are counted apart: applied before the loss, or never seen.
    let lost = in_log
        .iter()
        .filter(|id| !applied.contains_key(*id))
        .count();
    let missing_from_broker = spec.unique - in_log.len().min(spec.unique);
    let applied_not_in_log = applied.keys().filter(|id| !in_log.contains(*id)).count();
    let in_log = in_log.len();
    let balances_exact = ledger::balances(&s).unwrap() == w.expected_balances();
    drop(s);
    let c: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("group.id", &group)
        .create()
        .unwrap();
    let mut log_end = Vec::new();
    let mut committed = Vec::new();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        use rdkafka::consumer::Consumer as _;
        log_end.push(
            c.fetch_watermarks(&topic, p, Duration::from_secs(10))
                .unwrap()
                .1,
        );
        tpl.add_partition(&topic, p);
    }
    {
        use rdkafka::consumer::Consumer as _;
        for e in c
            .committed_offsets(tpl, Duration::from_secs(10))
            .unwrap()
            .elements()
        {
            committed.push(e.offset().to_raw().unwrap_or(-1));
        }
    }
    // Dead letters: at least once, so count the distinct source positions.
    let letters = {
        let c: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &broker.addr)
            .set("receive.message.max.bytes", "1000000000")
            .set("group.id", unique("dlq-reader"))
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "true")
            .create()
            .unwrap();
        use rdkafka::consumer::Consumer as _;
        let dlq = format!("{topic}.dlq");
        let mut tpl = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(&dlq, p, rdkafka::Offset::Beginning)
                .unwrap();
        }
        c.assign(&tpl).unwrap();
        let mut seen = HashSet::new();
        let mut raw = 0;
        let mut eof = HashSet::new();
        let until = Instant::now() + Duration::from_secs(60);
        while eof.len() < partitions as usize && Instant::now() < until {
            match c.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    raw += 1;
                    let m = m.detach();
                    let at = |name: &str| header(&m, name).and_then(|v| v.parse::<i64>().ok());
                    if let (Some(p), Some(o)) =
                        (at("idem-source-partition"), at("idem-source-offset"))
                    {
                        seen.insert((p as i32, o));
                    }
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    eof.insert(p);
                }
                _ => {}
            }
        }
        (raw, seen)
    };
    // Conflicts the broker still holds that have no dead letter: idem's
    // failure, unless the broker lost the dead letter itself.
    // (A conflict the log holds before its original, or without it, is the
    // first copy of its key: handled, not dead-lettered. That happens when
    // the broker loses the original's first copy and the producer's retry
    // of its chunk writes it again after the conflict.)
    let unanswered: Vec<(i32, i64)> = conflicts_in_log
        .iter()
        .filter(|(at, id)| {
            originals_in_log
                .get(*id)
                .is_some_and(|o| o.iter().any(|first| first < *at))
                && !letters.1.contains(at)
        })
        .map(|(at, _)| *at)
        .collect();
    // Of those, the ones a worker logged as dead-lettered (the broker then
    // lost the acknowledged dead letter) and the rest (idem's failure).
    let logged = dead_lettered_in_logs(dir.path());
    let conflicts_without_letter = unanswered.iter().filter(|at| !logged.contains(at)).count();
    let logged_letters_missing = unanswered.len() - conflicts_without_letter;
    for at in unanswered.iter().filter(|at| !logged.contains(at)) {
        let id = &conflicts_in_log[at];
        println!(
            "soak: conflict at {at:?} ({id}) has no dead letter and no worker logged one; its original is at {:?}",
            originals_in_log[id]
        );
    }
    println!(
        "soak: events={events} kills={kills} broker_restarts={restarts} lost={lost} doubled={doubled} events_in_log={in_log}/{} missing_from_broker={missing_from_broker} (applied_before_the_loss {applied_not_in_log}) balances_exact={balances_exact} committed_is_log_end={} dead_letters={} (distinct {}, conflicts {}, conflicts_in_log {}, unanswered {conflicts_without_letter}, dead_lettered_per_worker_logs {logged_letters_missing}) elapsed_s={:.0}",
        spec.unique,
        committed == log_end,
        letters.0,
        letters.1.len(),
        w.count(Role::Conflict),
        conflicts_in_log.len(),
        began.elapsed().as_secs_f64()
    );
    assert_eq!(lost, 0);
    assert_eq!(doubled, 0);
    assert_eq!(committed, log_end);
    assert_eq!(conflicts_without_letter, 0);
    if restarts == 0 {
        assert!(balances_exact);
        assert_eq!(applied.len(), spec.unique);
        assert_eq!(letters.1.len(), w.count(Role::Conflict));
    }
}
