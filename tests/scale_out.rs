//! Partitions moving between workers keep their keys: the changelog, the
//! restore on assignment, and several workers of one group, against a real
//! broker with real stores on disk.
mod common;

use common::app::{Answer, App};
use common::*;
use idem::config::Config;
use idem::workload::{produce_messages, Role, Workload, WorkloadMessage, WorkloadSpec};
use rdkafka::Message as _;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A test worker configuration with the changelog on.
fn with_changelog(topic: &str, group: &str, store: &Path) -> Config {
    let mut c = config(topic, group, store);
    c.changelog.enabled = true;
    c
}

fn spec(unique: usize, prefix: &'static str) -> WorkloadSpec {
    WorkloadSpec {
        unique,
        resends: 0,
        conflicts: 0,
        id_prefix: prefix,
        ..WorkloadSpec::default()
    }
}

#[test]
fn a_worker_whose_store_is_wiped_rebuilds_it_from_the_changelog_and_redeliveries_stay_duplicates() {
    let topic = unique("wiped");
    let group = unique("g");
    create_topic(&topic, 4);
    let first = Workload::generate(&spec(2_000, "first"));
    first.produce(&brokers(), &topic).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store_dir = dir.path().join("store");
    let (summary, store) = run_ledger(with_changelog(&topic, &group, &store_dir), None);
    assert_eq!(summary.handled, 2_000);
    assert_eq!(summary.restored, 0);
    drop(store);
    let changelog = format!("{group}.idem-changelog.{topic}");
    // 2,000 records and each partition's claim.
    assert_eq!(log_end(&changelog, 4).iter().sum::<i64>(), 2_000 + 4);
    assert_eq!(committed(&group, &topic, 4).iter().sum::<i64>(), 2_000);

    // The disk is lost: a new, empty store. Every first event is delivered
    // again (a producer's replay), with 300 new ones.
    std::fs::remove_dir_all(&store_dir).unwrap();
    first.produce(&brokers(), &topic).unwrap();
    let new = Workload::generate(&spec(300, "new"));
    new.produce(&brokers(), &topic).unwrap();
    let (summary, store) = run_ledger(with_changelog(&topic, &group, &store_dir), None);
    assert_eq!(summary.restored, 2_000);
    assert_eq!(summary.duplicates, 2_000);
    assert_eq!(summary.handled, 300);
    assert_eq!(
        idem::handler::ledger::applied_counts(&store)
            .unwrap()
            .values()
            .max(),
        Some(&1)
    );
    assert_eq!(committed(&group, &topic, 4), log_end(&topic, 4));
    assert_eq!(log_end(&changelog, 4).iter().sum::<i64>(), 2_300 + 2 * 4);
}

#[test]
fn a_partition_handed_a_to_b_to_a_resumes_at_the_committed_offset_with_every_key() {
    let topic = unique("handoff");
    let group = unique("g");
    create_topic(&topic, 4);
    let dir = tempfile::tempdir().unwrap();
    let (a_dir, b_dir) = (dir.path().join("a"), dir.path().join("b"));
    let changelog = format!("{group}.idem-changelog.{topic}");

    // A handles the first 1,000 events.
    let one = Workload::generate(&spec(1_000, "one"));
    one.produce(&brokers(), &topic).unwrap();
    let (a1, store) = run_ledger(with_changelog(&topic, &group, &a_dir), None);
    drop(store);
    assert_eq!((a1.handled, a1.restored), (1_000, 0));
    let after_a = committed(&group, &topic, 4);
    assert_eq!(after_a.iter().sum::<i64>(), 1_000);

    // B, with a store of its own, takes the partitions: the first 1,000
    // come again with 500 new ones.
    one.produce(&brokers(), &topic).unwrap();
    let two = Workload::generate(&spec(500, "two"));
    two.produce(&brokers(), &topic).unwrap();
    let (b, store) = run_ledger(with_changelog(&topic, &group, &b_dir), None);
    drop(store);
    assert_eq!(b.restored, 1_000);
    assert_eq!((b.handled, b.duplicates), (500, 1_000));
    let after_b = committed(&group, &topic, 4);
    assert!(after_b.iter().zip(&after_a).all(|(b, a)| b >= a));
    assert_eq!(after_b, log_end(&topic, 4));

    // Back to A: its store is behind the group; it starts at B's committed
    // offset and restores only what B wrote (its own records it holds
    // already), so B's 500 are duplicates when they come again.
    two.produce(&brokers(), &topic).unwrap();
    let three = Workload::generate(&spec(200, "three"));
    three.produce(&brokers(), &topic).unwrap();
    let (a2, store) = run_ledger(with_changelog(&topic, &group, &a_dir), None);
    assert_eq!(a2.restored, 500);
    assert_eq!((a2.handled, a2.duplicates), (200, 500));
    let after_a2 = committed(&group, &topic, 4);
    assert!(after_a2.iter().zip(&after_b).all(|(a, b)| a >= b));
    assert_eq!(after_a2, log_end(&topic, 4));
    assert_eq!(checkpoint_total(&store), after_a2.iter().sum::<i64>());
    // The records, and 4 claims per assignment (A, B, A).
    assert_eq!(log_end(&changelog, 4).iter().sum::<i64>(), 1_700 + 3 * 4);
}

/// One `idem run` worker of the group: the sidecar in front of `url`, with
/// the changelog on, cooperative-sticky assignment, its log appended to
/// `<name>.log` beside its store.
fn spawn_worker(
    spawned: &Spawned,
    topic: &str,
    group: &str,
    dir: &Path,
    name: &str,
    member: &str,
    url: &str,
) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .unwrap();
    let child = idem_run(&brokers(), topic, group, &dir.join(name), Stdio::from(log))
        .env("IDEM_HANDLER", "http")
        .env("IDEM_HTTP__URL", url)
        .env("IDEM_CHANGELOG__ENABLED", "true")
        .env(
            "IDEM_KAFKA__PARTITION_ASSIGNMENT_STRATEGY",
            std::env::var("IDEM_TEST_ASSIGNOR").unwrap_or("range,roundrobin".into()),
        )
        .env("IDEM_BATCH_SIZE", "100")
        .env("IDEM_KAFKA__GROUP_INSTANCE_ID", format!("{group}-{member}"))
        .env(
            "RUST_LOG",
            std::env::var("IDEM_TEST_WORKER_LOG").unwrap_or("info,rdkafka=warn".into()),
        )
        .spawn()
        .unwrap();
    spawned.0.borrow_mut().push(child.id());
    child
}

/// The worker processes a test started, killed when the test ends (also
/// when it fails half-way), so that none outlives its test.
#[derive(Default)]
struct Spawned(std::cell::RefCell<Vec<u32>>);

impl Drop for Spawned {
    fn drop(&mut self) {
        use nix::sys::signal::{kill, Signal};
        use nix::unistd::Pid;
        for pid in self.0.borrow_mut().drain(..) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// The event id of a payload (JSON or protobuf), as the application reads it.
fn event_id(payload: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) {
        if let Some(id) = v.get("event_id").and_then(|v| v.as_str()) {
            return id.to_string();
        }
    }
    <idem::proto::PaymentEvent as prost::Message>::decode(payload)
        .map(|e| e.event_id)
        .unwrap_or_default()
}

fn wait_caught_up(group: &str, topic: &str, partitions: i32, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let ends = log_end(topic, partitions);
        if committed(group, topic, partitions) == ends {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: committed {:?} never reached the log end {ends:?}",
            committed(group, topic, partitions)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Stops a worker with SIGTERM and returns its summary; when it does not
/// exit cleanly, the test fails with the end of its log.
fn stop(child: Child, dir: &Path, name: &str) -> serde_json::Value {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    if !out.status.success() {
        let log = std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
        let _ = std::fs::write(
            std::env::temp_dir().join(format!("{name}-failed.log")),
            &log,
        );
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        panic!("{name} exited with {}:\n{}", out.status, tail.join("\n"));
    }
    parse_summary(&String::from_utf8_lossy(&out.stdout))
}

/// A directory kept after the test when `IDEM_TEST_KEEP` is set (to read
/// the workers' logs).
struct Kept(Option<tempfile::TempDir>);

impl Kept {
    fn path(&self) -> &Path {
        self.0.as_ref().map(|d| d.path()).unwrap_or(Path::new("/"))
    }
}

impl Drop for Kept {
    fn drop(&mut self) {
        if std::env::var("IDEM_TEST_KEEP").is_ok() {
            if let Some(d) = self.0.take() {
                let _ = d.keep();
            }
        }
    }
}

fn calls_per_event(app: &App) -> BTreeMap<String, Vec<String>> {
    let mut by: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for c in app.calls() {
        by.entry(c.event_id).or_default().push(c.key);
    }
    by
}

#[test]
fn three_workers_joining_and_leaving_never_call_the_application_twice_for_a_key() {
    let spawned = Spawned::default();
    let topic = unique("scale");
    let group = unique("g");
    create_topic(&topic, 8);
    let app = App::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(|_: &str, _| Answer::Status(200, "ok".into(), None)),
    );
    let w = Workload::generate(&WorkloadSpec {
        unique: 45_000,
        resends: 5_000,
        conflicts: 0,
        partitions: 8,
        ..WorkloadSpec::default()
    });
    let dir = tempfile::tempdir().unwrap();
    if std::env::var("IDEM_TEST_KEEP").is_ok() {
        eprintln!("workers' logs: {}", dir.path().display());
    }
    let dir = Kept(Some(dir));
    let names = ["w0", "w1", "w2"];
    let mut workers: Vec<Child> = names
        .iter()
        .map(|n| spawn_worker(&spawned, &topic, &group, dir.path(), n, n, &app.url()))
        .collect();
    // Re-sends spread in time: the workload in 12 chunks, a worker leaving
    // (SIGTERM) and coming back with its store between chunks, 10 times.
    let chunks: Vec<_> = w.messages.chunks(w.messages.len().div_ceil(12)).collect();
    produce_messages(&brokers(), &topic, chunks[0]).unwrap();
    for (i, chunk) in chunks[1..].iter().enumerate() {
        if i < 10 {
            let k = i % 3;
            let summary = stop(workers.remove(k), dir.path(), names[k]);
            eprintln!("{} left: {summary}", names[k]);
            produce_messages(&brokers(), &topic, chunk).unwrap();
            std::thread::sleep(Duration::from_millis(1_500));
            workers.insert(
                k,
                spawn_worker(
                    &spawned,
                    &topic,
                    &group,
                    dir.path(),
                    names[k],
                    names[k],
                    &app.url(),
                ),
            );
            std::thread::sleep(Duration::from_millis(1_500));
        } else {
            produce_messages(&brokers(), &topic, chunk).unwrap();
        }
    }
    wait_caught_up(&group, &topic, 8, "after 10 joins and leaves");
    let by = calls_per_event(&app);
    let twice: Vec<_> = by.iter().filter(|(_, c)| c.len() > 1).collect();
    assert!(twice.is_empty(), "called more than once: {twice:?}");
    assert_eq!(by.len(), 45_000);

    // A worker is killed mid-flow and a fresh one, with an empty store,
    // joins: 5,000 new events and 2,250 re-sends of old ones keep coming.
    let late = Workload::generate(&WorkloadSpec {
        unique: 5_000,
        resends: 0,
        conflicts: 0,
        partitions: 8,
        seed: 11,
        id_prefix: "late",
        ..WorkloadSpec::default()
    });
    let mut stream: Vec<WorkloadMessage> = late.messages.clone();
    let old: Vec<&WorkloadMessage> = w
        .messages
        .iter()
        .filter(|m| m.role == Role::Original)
        .step_by(20)
        .collect();
    for (i, m) in old.iter().enumerate() {
        stream.insert((i * 2 + 1).min(stream.len()), (*m).clone());
    }
    let before_kill = app.calls().len();
    let producer = {
        let (brokers, topic, stream) = (brokers(), topic.clone(), stream.clone());
        std::thread::spawn(move || {
            for chunk in stream.chunks(700) {
                produce_messages(&brokers, &topic, chunk).unwrap();
                std::thread::sleep(Duration::from_millis(300));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while app.calls().len() < before_kill + 1_000 {
        assert!(Instant::now() < deadline, "no calls after the first 45,000");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut victim = workers.remove(0);
    victim.kill().unwrap();
    victim.wait().unwrap();
    // A request the victim wrote to its socket before it died can still
    // reach the application after `wait` returns (the kernel delivers what
    // was sent): the stop point is taken once those have arrived, as in the
    // SIGSTOP test below.
    std::thread::sleep(Duration::from_millis(500));
    let killed_at = app.calls().len();
    let committed_at_kill = committed(&group, &topic, 8);
    // It takes the killed worker's place in the group (static membership,
    // as a deploy's replacement pod does).
    workers.push(spawn_worker(
        &spawned,
        &topic,
        &group,
        dir.path(),
        "fresh",
        "w0",
        &app.url(),
    ));
    producer.join().unwrap();
    wait_caught_up(&group, &topic, 8, "after the kill");
    for (child, name) in workers.into_iter().zip(["w1", "w2", "fresh"]) {
        stop(child, dir.path(), name);
    }

    // Every event reached the application; a second call happened only for
    // a message the killed worker had called but not committed, with the
    // same key.
    let first_offset: HashMap<String, (i32, i64)> = {
        let mut m = HashMap::new();
        for msg in read_all(&topic, 8) {
            m.entry(event_id(msg.payload().unwrap()))
                .or_insert((msg.partition(), msg.offset()));
        }
        m
    };
    let calls = app.calls();
    let by = calls_per_event(&app);
    assert_eq!(by.len(), 50_000, "every event reached the application");
    let mut twice = 0;
    for (id, keys) in &by {
        if keys.len() == 1 {
            continue;
        }
        assert_eq!(keys.len(), 2, "{id} called {} times", keys.len());
        assert_eq!(keys[0], keys[1], "{id} was called with two keys");
        let (p, o) = first_offset[id];
        assert!(
            o >= committed_at_kill[p as usize],
            "{id} at {p}/{o} was called twice though committed ({:?})",
            committed_at_kill
        );
        let first = calls.iter().position(|c| &c.event_id == id).unwrap();
        assert!(first < killed_at, "{id}'s first call came after the kill");
        twice += 1;
    }
    eprintln!(
        "calls: {} for 50,000 events; called twice: {twice} (in flight at the kill, same key)",
        calls.len()
    );
    assert_eq!(calls.len(), 50_000 + twice);
}

/// The fencing token and partition of a call.
fn token_of(c: &common::app::Call) -> (i32, i64) {
    let p = c.headers["idem-partition"].parse().unwrap();
    let t = c
        .headers
        .get("idem-fencing-token")
        .expect("a call without a fencing token")
        .parse()
        .unwrap();
    (p, t)
}

#[test]
fn a_worker_stopped_past_its_session_handles_nothing_after_it_wakes_and_its_token_is_older() {
    let spawned = Spawned::default();
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let topic = unique("zombie");
    let group = unique("g");
    create_topic(&topic, 4);
    // A slow application, so that the worker is mid-flow when it stops.
    let app = App::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(|_: &str, _| {
            std::thread::sleep(Duration::from_millis(2));
            Answer::Status(200, "ok".into(), None)
        }),
    );
    let w = Workload::generate(&WorkloadSpec {
        unique: 6_000,
        resends: 0,
        conflicts: 0,
        ..WorkloadSpec::default()
    });
    w.produce(&brokers(), &topic).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dir = Kept(Some(dir));
    let mut a = spawn_worker(&spawned, &topic, &group, dir.path(), "a", "a", &app.url());
    let deadline = Instant::now() + Duration::from_secs(60);
    while app.calls().len() < 500 {
        assert!(Instant::now() < deadline, "the worker did not start");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = Pid::from_raw(a.id() as i32);
    kill(pid, Signal::SIGSTOP).unwrap();
    // A request sent just before the stop is recorded when it is answered
    // (the application sleeps first): those land before `at_stop`.
    std::thread::sleep(Duration::from_millis(500));
    let at_stop = app.calls().len();
    let a_tokens: HashMap<i32, i64> = app.calls().iter().map(token_of).collect();
    // Past its session timeout (6 s), another worker takes the partitions:
    // a replacement in its place in the group (static membership), since
    // noida-db 0.2.3 never expires a silent member by itself.
    std::thread::sleep(Duration::from_secs(8));
    let b = spawn_worker(&spawned, &topic, &group, dir.path(), "b", "a", &app.url());
    let deadline = Instant::now() + Duration::from_secs(60);
    while app.calls().len() < at_stop + 500 {
        assert!(
            Instant::now() < deadline,
            "the second worker never took over"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    kill(pid, Signal::SIGCONT).unwrap();
    wait_caught_up(&group, &topic, 4, "after the stale worker woke");
    std::thread::sleep(Duration::from_secs(3));
    let calls = app.calls();
    // A call the stale worker had begun when it froze (a lane's thread
    // stopped inside the HTTP client) goes out when it wakes, with its old
    // token, which the application can refuse: at most one per partition
    // (one lane each). A worker that handled batches after waking would make
    // many, and every other call after the stop carries a newer token.
    let mut stale: HashMap<i32, Vec<String>> = HashMap::new();
    for c in &calls[at_stop..] {
        let (p, t) = token_of(c);
        if let Some(old) = a_tokens.get(&p) {
            if t == *old {
                stale.entry(p).or_default().push(c.event_id.clone());
            } else {
                assert!(
                    t > *old,
                    "partition {p}: token {t} is not above the stale worker's {old}"
                );
            }
        }
    }
    assert!(
        stale.values().all(|ids| ids.len() <= 1),
        "the stale worker called after it woke, beyond the calls in flight at the stop: {stale:?}"
    );
    let by = calls_per_event(&app);
    assert_eq!(by.len(), 6_000, "every event reached the application");
    assert_eq!(committed(&group, &topic, 4), log_end(&topic, 4));
    let twice = by.values().filter(|k| k.len() > 1).count();
    eprintln!(
        "calls {} for 6,000 events; {twice} called twice (in flight at the SIGSTOP, same key)",
        calls.len()
    );
    for keys in by.values() {
        assert!(keys.len() <= 2 && keys.iter().all(|k| *k == keys[0]));
    }
    // The stale worker learnt it was fenced and stopped by itself.
    let status = a.try_wait().unwrap();
    if status.is_none() {
        let _ = a.kill();
        let _ = a.wait();
    }
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "the stale worker is still running"
    );
    let log = std::fs::read_to_string(dir.path().join("a.log")).unwrap();
    assert!(log.contains("the worker stops"), "{log}");
    stop(b, dir.path(), "b");
}
