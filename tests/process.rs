//! The worker as a real process: SIGKILLed mid-stream it loses and doubles
//! nothing; on SIGTERM it stops in time, commits what is durable, and the next
//! start reprocesses nothing.

mod common;

use common::*;
use idem::handler::ledger;
use idem::store::DedupStore;
use idem::workload::{Role, Workload, WorkloadSpec};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn spawn(topic: &str, group: &str, store: &Path, extra: &[&str], env: &[(&str, &str)]) -> Child {
    let mut cmd = idem_run(&brokers(), topic, group, store, Stdio::null());
    cmd.args(extra).envs(env.iter().copied());
    cmd.spawn().unwrap()
}

fn wait_with_deadline(child: &mut Child, deadline: Duration) -> std::process::ExitStatus {
    let until = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < until,
            "worker did not exit within {deadline:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn stdout_of(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn sigkill_at_five_random_moments_loses_and_doubles_nothing() {
    sigkill_at_random_moments(5, &[]);
}

/// With offsets committed at most every 1.5 s (`commit_interval_ms`, capped
/// by the tests' 6 s session), a kill finds the group's committed offsets
/// far behind the store's checkpoints: the restarted worker resumes at the
/// checkpoints and still applies each event once.
#[test]
fn sigkill_with_offsets_committed_seldom_loses_and_doubles_nothing() {
    sigkill_at_random_moments(3, &[("IDEM_COMMIT_INTERVAL_MS", "60000")]);
}

fn sigkill_at_random_moments(kills: u32, extra_env: &[(&str, &str)]) {
    let topic = unique("crash");
    let group = unique("idem");
    create_topic(&topic, 4);
    let workload = Workload::generate(&WorkloadSpec {
        unique: 18_000,
        resends: 1_800,
        conflicts: 200,
        seed: 11,
        ..WorkloadSpec::default()
    });
    workload.produce(&brokers(), &topic).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    // Static membership: a restarted worker takes its partitions back at once
    // instead of waiting for the killed member's session to expire.
    let mut env = vec![
        ("IDEM_BATCH_SIZE", "20"),
        ("IDEM_KAFKA__GROUP_INSTANCE_ID", "crash-worker"),
    ];
    env.extend_from_slice(extra_env);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let mut mid_stream_kills = 0;
    for kill_no in 1..=kills {
        let before = progress(&store);
        let mut child = spawn(&topic, &group, &store, &[], &env);
        // Kill at a random moment after it has started writing batches.
        let until = Instant::now() + Duration::from_secs(60);
        while progress(&store) == before && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..600)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let after = progress(&store);
        if after > before && after < 20_000 {
            mid_stream_kills += 1;
        }
        println!(
            "kill {kill_no}: {before} -> {after} of 20000 messages durable, {} committed",
            committed(&group, &topic, 4).iter().sum::<i64>()
        );
    }
    println!("{mid_stream_kills} of {kills} kills landed mid-stream");
    let child = spawn(&topic, &group, &store, &["--until-caught-up"], &env);
    let summary = parse_summary(&stdout_of(child));
    println!("final run: {summary}");

    let s = DedupStore::open_read_only(&store).unwrap();
    assert_eq!(ledger::balances(&s).unwrap(), workload.expected_balances());
    let applied = ledger::applied_counts(&s).unwrap();
    assert_eq!(applied.len(), workload.count(Role::Original));
    assert_eq!(applied.values().max(), Some(&1));
    assert_eq!(committed(&group, &topic, 4), log_end(&topic, 4));
    let checkpoints: i64 = s.checkpoints().unwrap().iter().map(|(_, _, n)| n).sum();
    assert_eq!(checkpoints, 20_000);
}

#[test]
fn sigterm_stops_in_time_commits_what_is_durable_and_restart_reprocesses_nothing() {
    let topic = unique("sigterm");
    let group = unique("idem");
    create_topic(&topic, 4);
    let spec = WorkloadSpec {
        unique: 18_000,
        resends: 1_800,
        conflicts: 200,
        seed: 5,
        ..WorkloadSpec::default()
    };
    let workload = Workload::generate(&spec);
    workload.produce(&brokers(), &topic).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");

    let mut child = spawn(&topic, &group, &store, &[], &[("IDEM_BATCH_SIZE", "20")]);
    // Let it make some progress, but not finish.
    let until = Instant::now() + Duration::from_secs(60);
    while progress(&store) < 1_000 {
        assert!(Instant::now() < until, "worker made no progress");
        std::thread::sleep(Duration::from_millis(100));
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_with_deadline(&mut child, Duration::from_secs(40));
    assert!(status.success(), "worker exited with {status}");
    let first = parse_summary(&stdout_of(child));
    let consumed1 = first["consumed"].as_u64().unwrap();
    assert!(
        consumed1 < 20_000,
        "SIGTERM came after the end; nothing tested"
    );

    // What is durable is committed: store checkpoints = group offsets.
    let s = DedupStore::open_read_only(&store).unwrap();
    let mut ckpt = [-1i64; 4];
    for (_, p, n) in s.checkpoints().unwrap() {
        ckpt[p as usize] = n;
    }
    drop(s);
    let committed1 = committed(&group, &topic, 4);
    assert_eq!(
        committed1.iter().map(|&c| c.max(0)).collect::<Vec<_>>(),
        ckpt.iter().map(|&c| c.max(0)).collect::<Vec<_>>()
    );
    assert_eq!(
        committed1.iter().map(|&c| c.max(0) as u64).sum::<u64>(),
        consumed1
    );

    // The next start reprocesses nothing: the two runs add up exactly.
    let second = parse_summary(&stdout_of(spawn(
        &topic,
        &group,
        &store,
        &["--until-caught-up"],
        &[],
    )));
    let sum = |k: &str| first[k].as_u64().unwrap() + second[k].as_u64().unwrap();
    assert_eq!(sum("consumed"), 20_000);
    assert_eq!(sum("handled"), 18_000);
    assert_eq!(sum("duplicates"), 1_800);
    assert_eq!(sum("conflicts"), 200);
    let s = DedupStore::open_read_only(&store).unwrap();
    assert_eq!(ledger::balances(&s).unwrap(), workload.expected_balances());
    assert_eq!(committed(&group, &topic, 4), log_end(&topic, 4));
}

#[test]
fn sigterm_with_the_broker_gone_still_exits_within_the_deadline_and_keeps_what_is_durable() {
    let broker = OwnBroker::start();
    let topic = unique("gone");
    let group = unique("idem");
    broker.create_topic(&topic, 2);
    let workload = Workload::generate(&WorkloadSpec {
        unique: 20_000,
        resends: 0,
        conflicts: 0,
        partitions: 2,
        ..WorkloadSpec::default()
    });
    workload.produce(&broker.addr, &topic).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let mut cmd = idem_run(&broker.addr, &topic, &group, &store, Stdio::null());
    cmd.env("IDEM_SHUTDOWN_TIMEOUT_SECS", "5")
        .env("IDEM_BATCH_SIZE", "10")
        .env("IDEM_KAFKA__MESSAGE_TIMEOUT_MS", "300000");
    let mut child = cmd.spawn().unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    while progress(&store) < 200 {
        assert!(Instant::now() < until, "worker made no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    broker.stop();
    std::thread::sleep(Duration::from_secs(1));
    let before = progress(&store);
    let sent = Instant::now();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    // The deadline is 5 s; 15 s leaves room for a loaded machine, far below
    // librdkafka's own timeouts (a minute and more) that would otherwise
    // hold the process.
    let status = wait_with_deadline(&mut child, Duration::from_secs(15));
    let took = sent.elapsed();
    let out = stdout_of(child);
    eprintln!("exited with {status} after {took:?}: {out}");
    // Whatever it could not commit stays durable in the store, for the next
    // start to resume from.
    let after = progress(&store);
    assert!(after >= before && after >= 200, "{before} -> {after}");
    assert!(out.contains("\"summary\""), "no summary on stdout: {out}");
}
