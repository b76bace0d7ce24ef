//! Replays against a real broker and a real store: after a full run a replay
//! is a no-op whose counts add up to the run's; one new event is reported with
//! its offset; a dump (idem's or kcat's) gives the same report as the topic;
//! no replay moves the live group's offsets; and `--apply` after the store
//! lost its newest bucket applies exactly the missing events, once.

mod common;

use common::*;
use idem::clock::ManualClock;
use idem::handler::ledger::{self, Ledger};
use idem::pipeline::RunSummary;
use idem::replay::{kcat, Position, Replay, ReplayOutcome, ReplayReport};
use idem::workload::{produce_messages, Role, Workload, WorkloadSpec};
use rdkafka::message::{Headers as _, Message as _};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

fn run_worker(config: idem::config::Config, clock: Option<ManualClock>) -> RunSummary {
    run_ledger(config, clock.as_ref()).0
}

/// Runs the `idem` binary with the test broker; returns (exit code, stdout).
fn idem(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("idem: error"),
        "idem {args:?} failed: {stderr}"
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn totals(json: &str) -> serde_json::Value {
    serde_json::from_str::<serde_json::Value>(json).unwrap()["total"].clone()
}

fn partition_counts(r: &ReplayReport) -> Vec<(i32, u64, u64, u64)> {
    r.partitions
        .iter()
        .map(|p| {
            (
                p.partition,
                p.counts.messages,
                p.counts.duplicates,
                p.counts.conflicts,
            )
        })
        .collect()
}

#[test]
fn replay_after_a_full_run_is_a_no_op_and_one_new_event_is_reported_with_its_offset() {
    let topic = unique("replay");
    let group = unique("idem");
    create_topic(&topic, 4);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let workload = Workload::generate(&WorkloadSpec::default());
    workload.produce(&brokers(), &topic).unwrap();
    let config = config(&topic, &group, &store);
    let run = run_worker(config.clone(), None);
    assert_eq!(
        (run.handled, run.duplicates, run.conflicts),
        (8_950, 1_000, 50)
    );
    let committed_before = committed(&group, &topic, 4);
    assert_eq!(committed_before, log_end(&topic, 4));

    // The library: read-only, every message decided against the store.
    let report = Replay::topic(config.clone(), &topic).run().unwrap();
    let t = report.total;
    assert_eq!(t.messages, 10_000);
    assert_eq!(t.new, 0);
    assert_eq!(t.duplicates, run.handled + run.duplicates);
    assert_eq!(t.conflicts, run.conflicts);
    assert_eq!(
        t.dead_lettered,
        run.rejected + run.undecodable + run.tombstones + run.bad_keys
    );
    assert_eq!(t.messages, t.duplicates + t.conflicts + t.dead_lettered);
    assert!(report.no_op);
    assert_eq!(report.partitions.len(), 4);
    let ends = log_end(&topic, 4);
    for p in &report.partitions {
        assert_eq!(p.from_offset, Some(0));
        assert_eq!(p.to_offset, Some(ends[p.partition as usize]));
        assert_eq!(p.counts.messages as i64, ends[p.partition as usize]);
    }
    assert_eq!(report.examples[&ReplayOutcome::Conflict].len(), 5);

    // The command line, as a team's CI would call it.
    let store_arg = store.to_str().unwrap();
    let b = brokers();
    let base = [
        "--brokers",
        b.as_str(),
        "--group-id",
        group.as_str(),
        "--store-dir",
        store_arg,
    ];
    let mut args = vec![
        "replay",
        "--topic",
        topic.as_str(),
        "--expect-no-op",
        "--json",
    ];
    args.extend_from_slice(&base);
    let (code, out) = idem(&args);
    assert_eq!(code, 0, "{out}");
    let cli = totals(&out);
    assert_eq!(cli["messages"], 10_000);
    assert_eq!(cli["duplicates"], 9_950);
    assert_eq!(cli["conflicts"], 50);
    assert_eq!(cli["new"], 0);

    // A part of the range: partition 1, offsets 10..20.
    let part = Replay::topic(config.clone(), &topic)
        .partitions(vec![1])
        .from("1:10".parse().unwrap())
        .to("1:20".parse().unwrap())
        .run()
        .unwrap();
    assert_eq!(part.partitions.len(), 1);
    assert_eq!(
        (
            part.partitions[0].partition,
            part.partitions[0].from_offset,
            part.partitions[0].to_offset
        ),
        (1, Some(10), Some(20))
    );
    assert_eq!(part.total.messages, 10);
    // A start after every message: nothing to replay.
    let later = Replay::topic(config.clone(), &topic)
        .from(Position::Time(4_102_444_800_000)) // 2100-01-01
        .run()
        .unwrap();
    assert_eq!(later.total.messages, 0);

    // One new event appended: reported as new, with its offset.
    let extra = Workload::generate(&WorkloadSpec {
        unique: 20,
        resends: 0,
        conflicts: 0,
        seed: 3,
        id_prefix: "late",
        ..WorkloadSpec::default()
    });
    let one = extra
        .messages
        .iter()
        .find(|m| m.partition == 2)
        .unwrap()
        .clone();
    produce_messages(&brokers(), &topic, std::slice::from_ref(&one)).unwrap();
    let new_offset = ends[2];
    let report = Replay::topic(config.clone(), &topic).run().unwrap();
    assert_eq!(report.total.messages, 10_001);
    assert_eq!(report.total.new, 1);
    assert!(!report.no_op);
    let example = &report.examples[&ReplayOutcome::New][0];
    assert_eq!((example.partition, example.offset), (2, new_offset));
    assert_eq!(example.key.as_deref(), Some(one.event.event_id.as_str()));
    let (code, out) = idem(&args);
    assert_eq!(
        code, 3,
        "--expect-no-op must fail when a message would reach the handler: {out}"
    );
    assert_eq!(totals(&out)["new"], 1);
    let mut table_args = vec!["replay", "--topic", topic.as_str()];
    table_args.extend_from_slice(&base);
    let (code, table) = idem(&table_args);
    assert_eq!(code, 0);
    assert!(
        table.contains(&format!("{topic}/2@{new_offset}")),
        "{table}"
    );
    assert!(
        table.contains("NOT a no-op: 1 message would reach the handler"),
        "{table}"
    );

    // No replay moved the live group.
    assert_eq!(committed(&group, &topic, 4), committed_before);
}

#[test]
fn a_dump_from_idem_or_kcat_gives_the_same_report_as_the_topic() {
    let topic = unique("dump");
    let group = unique("idem");
    create_topic(&topic, 4);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let workload = Workload::generate(&WorkloadSpec {
        unique: 1_800,
        resends: 180,
        conflicts: 20,
        seed: 21,
        ..WorkloadSpec::default()
    });
    // Only part of it is handled, so the report has new messages too.
    let (first, rest) = workload.messages.split_at(1_500);
    produce_messages(&brokers(), &topic, first).unwrap();
    let config = config(&topic, &group, &store);
    run_worker(config.clone(), None);
    produce_messages(&brokers(), &topic, rest).unwrap();
    let committed_before = committed(&group, &topic, 4);

    let from_topic = Replay::topic(config.clone(), &topic).run().unwrap();
    assert_eq!(from_topic.total.messages, 2_000);
    assert!(from_topic.total.new > 0);

    // idem's own dump.
    let dump = dir.path().join("idem-dump.jsonl");
    let b = brokers();
    let (code, _) = idem(&[
        "dump",
        "--topic",
        &topic,
        "--out",
        dump.to_str().unwrap(),
        "--brokers",
        &b,
    ]);
    assert_eq!(code, 0);
    let from_dump = Replay::file(config.clone(), &dump).run().unwrap();
    assert_eq!(from_dump.total, from_topic.total);
    assert_eq!(partition_counts(&from_dump), partition_counts(&from_topic));
    assert_eq!(from_dump.source, format!("file:{}", dump.display()));

    // kcat's dump: every message, headers included, reads back exactly.
    let kcat_dump = dir.path().join("kcat-dump.jsonl");
    let status = Command::new("kcat")
        .args(["-C", "-J", "-e", "-q", "-b", &b, "-t", &topic])
        .stdout(std::fs::File::create(&kcat_dump).unwrap())
        .status()
        .expect("kcat is not installed: run the tests with scripts/test.sh, which installs it");
    assert!(status.success());
    let on_broker = read_all(&topic, 4);
    let text = std::fs::read(&kcat_dump).unwrap();
    let parsed: Vec<_> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| kcat::parse_line(l).unwrap())
        .collect();
    assert_eq!(parsed.len(), 2_000);
    let mut with_headers = 0;
    for m in &parsed {
        let orig = on_broker
            .iter()
            .find(|o| o.partition() == m.partition() && o.offset() == m.offset())
            .unwrap();
        assert_eq!(m.payload(), orig.payload());
        assert_eq!(m.key(), orig.key());
        assert_eq!(m.timestamp(), orig.timestamp());
        let hs = |x: &rdkafka::message::OwnedMessage| -> Vec<(String, Option<Vec<u8>>)> {
            x.headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default()
        };
        assert_eq!(hs(m), hs(orig));
        with_headers += usize::from(!hs(m).is_empty());
    }
    assert!(
        with_headers > 500,
        "only {with_headers} messages had headers"
    );
    let from_kcat = Replay::file(config.clone(), &kcat_dump).run().unwrap();
    assert_eq!(from_kcat.total, from_topic.total);
    assert_eq!(partition_counts(&from_kcat), partition_counts(&from_topic));

    // The command line reads it too, and a broken line is a specific error.
    let (code, out) = idem(&[
        "replay",
        "--file",
        kcat_dump.to_str().unwrap(),
        "--json",
        "--store-dir",
        store.to_str().unwrap(),
        "--group-id",
        &group,
    ]);
    assert_eq!(code, 0);
    assert_eq!(totals(&out)["new"], from_topic.total.new);
    let broken = dir.path().join("broken.jsonl");
    let first_line = text.split(|b| *b == b'\n').next().unwrap();
    std::fs::write(&broken, [first_line, b"\n{\"topic\":1}\n"].concat()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args([
            "replay",
            "--file",
            broken.to_str().unwrap(),
            "--store-dir",
            store.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.jsonl line 2: not a kcat JSON envelope"),
        "{err}"
    );

    // A failed dump leaves the file it would have replaced as it was.
    let before = std::fs::read(&dump).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args([
            "dump",
            "--topic",
            "no-such-topic-here",
            "--out",
            dump.to_str().unwrap(),
            "--brokers",
            &b,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(std::fs::read(&dump).unwrap(), before);
    // A replay that reads nothing proves nothing: --expect-no-op says so.
    let out = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args([
            "replay",
            "--file",
            dump.to_str().unwrap(),
            "--topic",
            "other-topic",
            "--expect-no-op",
        ])
        .args(["--store-dir", store.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("replay read no message"));
    // --apply repairs an existing store only.
    let out = Command::new(env!("CARGO_BIN_EXE_idem"))
        .args(["replay", "--topic", &topic, "--apply", "--brokers", &b])
        .args(["--store-dir", dir.path().join("typo").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no idem store at"));
    assert!(!dir.path().join("typo").exists());

    assert_eq!(committed(&group, &topic, 4), committed_before);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn apply_after_the_store_lost_its_newest_bucket_applies_exactly_the_missing_events_once() {
    let topic = unique("repair");
    let group = unique("idem");
    create_topic(&topic, 4);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let backup = dir.path().join("backup");
    let config = config(&topic, &group, &store);
    let hour = 3_600_000;
    let clock = ManualClock::new(now_ms() / hour * hour);

    // Hour 1: a first workload, then a backup of the store.
    let a = Workload::generate(&WorkloadSpec {
        unique: 1_000,
        resends: 100,
        conflicts: 10,
        seed: 31,
        id_prefix: "a",
        ..WorkloadSpec::default()
    });
    a.produce(&brokers(), &topic).unwrap();
    assert_eq!(
        run_worker(config.clone(), Some(clock.clone())).handled,
        1_000
    );
    copy_dir(&store, &backup);

    // Hour 2: a second workload lands in a new bucket.
    clock.advance(hour);
    let b = Workload::generate(&WorkloadSpec {
        unique: 600,
        resends: 60,
        conflicts: 6,
        seed: 32,
        id_prefix: "b",
        ..WorkloadSpec::default()
    });
    b.produce(&brokers(), &topic).unwrap();
    assert_eq!(run_worker(config.clone(), Some(clock.clone())).handled, 600);
    let buckets = |dir: &Path| {
        idem::store::DedupStore::open_read_only(dir)
            .unwrap()
            .live_buckets()
            .len()
    };
    assert_eq!(buckets(&store), 2);
    let committed_before = committed(&group, &topic, 4);

    // The store is restored from the backup: it lost its newest bucket and
    // the ledger changes of hour 2.
    std::fs::remove_dir_all(&store).unwrap();
    copy_dir(&backup, &store);
    assert_eq!(buckets(&store), 1);

    let dry = Replay::topic(config.clone(), &topic).run().unwrap();
    assert_eq!(dry.total.messages, 1_776);
    assert_eq!(dry.total.new, 600);

    let applied = Replay::topic(config.clone(), &topic)
        .with_clock(Arc::new(clock.clone()))
        .apply(Box::new(Ledger))
        .unwrap();
    assert_eq!(applied.total.new, 600);
    assert_eq!(applied.total.duplicates, 1_000 + 100 + 60);
    assert_eq!(applied.total.conflicts, 16);
    assert!(applied.examples[&ReplayOutcome::New]
        .iter()
        .all(|e| e.key.as_deref().is_some_and(|k| k.starts_with("b-"))));

    let s = idem::store::DedupStore::open_read_only(&store).unwrap();
    let mut expected = a.expected_balances();
    for (k, v) in b.expected_balances() {
        *expected.entry(k).or_insert(0) += v;
    }
    assert_eq!(ledger::balances(&s).unwrap(), expected);
    let counts = ledger::applied_counts(&s).unwrap();
    assert_eq!(
        counts.len(),
        a.count(Role::Original) + b.count(Role::Original)
    );
    assert_eq!(counts.values().max(), Some(&1));
    // Its own checkpoints; the live worker's are the backup's.
    let checkpoints = s.checkpoints().unwrap();
    let replay_sum: i64 = checkpoints
        .iter()
        .filter(|(t, _, _)| t == &format!("replay:{topic}"))
        .map(|(_, _, n)| n)
        .sum();
    assert_eq!(replay_sum, 1_776);
    let live_sum: i64 = checkpoints
        .iter()
        .filter(|(t, _, _)| t == &topic)
        .map(|(_, _, n)| n)
        .sum();
    assert_eq!(live_sum, 1_110);
    drop(s);

    // Applying again does nothing; the group never moved.
    let again = Replay::topic(config, &topic).run().unwrap();
    assert!(again.no_op);
    assert_eq!(again.total.new, 0);
    assert_eq!(committed(&group, &topic, 4), committed_before);
}
