//! What the sidecar does while its store cannot be written, chosen per topic
//! with `on_store_failure`, against real faults: a size-limited tmpfs filled
//! to the last byte while the worker runs (`fail_open`), and a store on a
//! filesystem that is read-only when the worker starts (`fail_closed`). A
//! real HTTP application started by the test counts every call; counts are
//! exact.

mod common;

use common::app::{self, Answer, App};
use common::faults::*;
use common::*;
use idem::store::DedupStore;
use idem::workload::{produce_messages, Role, Workload, WorkloadSpec};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn always_200() -> App {
    App::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(|_: &str, _| Answer::Status(200, "ok".into(), None)),
    )
}

/// `idem run` as a sidecar of `app`, with quick retries and its operations
/// endpoint on `ops`.
fn sidecar(
    topic: &str,
    group: &str,
    store: &std::path::Path,
    app: &App,
    ops: SocketAddr,
) -> Command {
    let mut cmd = idem_run(&brokers(), topic, group, store, Stdio::null());
    cmd.env("IDEM_HANDLER", "http")
        .env("IDEM_HTTP__URL", app.url())
        .env("IDEM_METRICS__LISTEN", ops.to_string())
        .env("IDEM_BATCH_SIZE", "20")
        .env("IDEM_RETRY__INITIAL_DELAY_MS", "50")
        .env("IDEM_RETRY__MAX_DELAY_MS", "500");
    cmd
}

fn calls_per_event(app: &App) -> HashMap<String, usize> {
    let mut per = HashMap::new();
    for c in app.calls() {
        assert_eq!(c.key, c.event_id, "a call without its event's key");
        *per.entry(c.event_id).or_insert(0) += 1;
    }
    per
}

fn metric(ops: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    app::metric(&app::get(ops, "/metrics").1, name, labels)
}

fn originals(w: &Workload) -> usize {
    w.count(Role::Original)
}

#[test]
fn fail_open_handles_on_through_a_full_disk_counts_each_unverified_message_and_writes_them_back() {
    let Some(fs) = Tmpfs::mount(40) else {
        eprintln!("SKIPPED: this machine does not allow mounting a tmpfs (needs CAP_SYS_ADMIN)");
        return;
    };
    let topic = unique("fail-open");
    let group = unique("g");
    create_topic(&topic, 4);
    let spec = |unique, resends, id_prefix| WorkloadSpec {
        unique,
        resends,
        conflicts: 0,
        id_prefix,
        ..WorkloadSpec::default()
    };
    let before = Workload::generate(&spec(2_000, 0, "before"));
    before.produce(&brokers(), &topic).unwrap();
    let store_dir = fs.path.join("store");
    let app = always_200();
    let ops = app::free_port();
    let child = sidecar(&topic, &group, &store_dir, &app, ops)
        .env("IDEM_ON_STORE_FAILURE", "fail_open")
        .spawn()
        .unwrap();
    wait_until(
        60,
        "the first events were not handled",
        || progress(&store_dir) == 2_000,
        || format!("progress {}", progress(&store_dir)),
    );

    // The disk fills. Canary events, one at a time, until the worker says it
    // is failing open: from then on every new event is unverified.
    let (full, filler) = keep_full(&fs.path);
    let canaries = Workload::generate(&spec(200, 0, "canary"));
    let mut sent = 0;
    wait_until(
        60,
        "the full disk was never reported",
        || {
            let (status, body) = ready(ops);
            if status == 503 && body.contains("fail_open topics are handled without durable dedup")
            {
                return true;
            }
            produce_messages(&brokers(), &topic, &canaries.messages[sent..sent + 1]).unwrap();
            sent += 1;
            std::thread::sleep(std::time::Duration::from_millis(200));
            false
        },
        || format!("{:?}", ready(ops)),
    );
    // Called, and their batches done (counted and committed): the counter
    // moves after a batch's write, a moment after its calls.
    let canaries_end = log_end(&topic, 4);
    wait_until(
        30,
        "canaries not all handled",
        || app.calls().len() == 2_000 + sent && committed(&group, &topic, 4) == canaries_end,
        || format!("{} calls", app.calls().len()),
    );
    let unverified_before = metric(ops, "idem_unverified_total", &[("topic", &topic)]);
    let progress_when_full = progress(&store_dir);

    // While full: 1,000 new events and 300 re-sends of them.
    let during = Workload::generate(&spec(1_000, 300, "during"));
    during.produce(&brokers(), &topic).unwrap();
    let end = log_end(&topic, 4);
    wait_until(
        60,
        "fail_open did not commit through the full disk",
        || committed(&group, &topic, 4) == end,
        || format!("{:?} of {end:?}", committed(&group, &topic, 4)),
    );
    let unverified = metric(ops, "idem_unverified_total", &[("topic", &topic)]);
    assert_eq!(unverified - unverified_before, 1_000.0);
    let per = calls_per_event(&app);
    for m in during.messages.iter().filter(|m| m.role == Role::Original) {
        assert_eq!(per.get(&m.event.event_id), Some(&1), "{}", m.event.event_id);
    }
    assert_eq!(app.calls().len(), 2_000 + sent + 1_000);
    assert_eq!(
        progress(&store_dir),
        progress_when_full,
        "the store moved while full"
    );
    assert_eq!(metric(ops, "idem_degraded", &[]), 1.0);
    assert_eq!(
        metric(ops, "idem_fail_open_guard_keys", &[]),
        unverified,
        "every unverified record is guarded"
    );

    // Space returns: the guard goes into the store, idle, by itself.
    full.store(false, Ordering::SeqCst);
    filler.join().unwrap();
    let end_sum: i64 = end.iter().sum();
    wait_until(
        60,
        "the guard never reached the store",
        || ready(ops).0 == 200 && progress(&store_dir) == end_sum,
        || format!("{:?}, progress {}", ready(ops), progress(&store_dir)),
    );
    // Now every guarded key is durable: re-sends are duplicates.
    let resent: Vec<_> = during
        .messages
        .iter()
        .filter(|m| m.role == Role::Original)
        .take(200)
        .cloned()
        .collect();
    produce_messages(&brokers(), &topic, &resent).unwrap();
    let end = log_end(&topic, 4);
    wait_until(
        60,
        "re-sends after recovery not committed",
        || committed(&group, &topic, 4) == end,
        || format!("{:?} of {end:?}", committed(&group, &topic, 4)),
    );
    let summary = stop_with_sigterm(child);
    eprintln!("fail open through a full disk: {sent} canaries; {summary}");
    assert_eq!(app.calls().len(), 2_000 + sent + 1_000);
    assert_eq!(summary["handled"], (2_000 + sent + 1_000) as u64);
    assert_eq!(summary["duplicates"], 300 + 200);
    assert_eq!(summary["unverified"].as_f64(), Some(unverified));
    assert_eq!(summary["guard_flushed"].as_f64(), Some(unverified));
    assert_eq!(summary["guard_evictions"], 0);
    let store = DedupStore::open_read_only(&store_dir).unwrap();
    assert_eq!(checkpoint_total(&store), end.iter().sum::<i64>());
}

#[test]
fn a_store_on_a_read_only_filesystem_at_start_up_handles_nothing_until_it_is_writable() {
    let Some(fs) = Tmpfs::mount(64) else {
        eprintln!("SKIPPED: this machine does not allow mounting a tmpfs (needs CAP_SYS_ADMIN)");
        return;
    };
    let topic = unique("read-only");
    let group = unique("g");
    create_topic(&topic, 4);
    let first = Workload::generate(&WorkloadSpec {
        unique: 1_000,
        resends: 100,
        conflicts: 0,
        id_prefix: "first",
        ..WorkloadSpec::default()
    });
    first.produce(&brokers(), &topic).unwrap();
    let store_dir = fs.path.join("store");
    let app = always_200();
    let ops = app::free_port();
    let child = sidecar(&topic, &group, &store_dir, &app, ops)
        .spawn()
        .unwrap();
    let end = log_end(&topic, 4);
    wait_until(
        60,
        "the first events were not handled",
        || committed(&group, &topic, 4) == end,
        || format!("{:?} of {end:?}", committed(&group, &topic, 4)),
    );
    let summary = stop_with_sigterm(child);
    assert_eq!(summary["handled"], originals(&first) as u64);

    // The filesystem goes read-only; more events arrive; the worker starts.
    fs.remount_read_only(true);
    let second = Workload::generate(&WorkloadSpec {
        unique: 1_000,
        resends: 100,
        conflicts: 0,
        id_prefix: "second",
        ..WorkloadSpec::default()
    });
    second.produce(&brokers(), &topic).unwrap();
    let committed_before = committed(&group, &topic, 4);
    let child = sidecar(&topic, &group, &store_dir, &app, ops)
        .spawn()
        .unwrap();
    wait_until(
        30,
        "the read-only store was never reported",
        || {
            let (status, body) = ready(ops);
            status == 503 && body.contains("Read-only file system")
        },
        || format!("{:?}", ready(ops)),
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(app.calls().len(), 1_000, "handled with a read-only store");
    assert_eq!(committed(&group, &topic, 4), committed_before);
    assert_eq!(ready(ops).0, 503);

    // Writable again: the worker opens its store by itself and goes on.
    fs.remount_read_only(false);
    let end = log_end(&topic, 4);
    wait_until(
        90,
        "did not resume once the filesystem was writable",
        || committed(&group, &topic, 4) == end,
        || {
            format!(
                "{:?} of {end:?}, {:?}",
                committed(&group, &topic, 4),
                ready(ops)
            )
        },
    );
    let summary = stop_with_sigterm(child);
    eprintln!("read-only store at start-up: {summary}");
    assert_eq!(summary["handled"], originals(&second) as u64);
    assert_eq!(summary["duplicates"], 100);
    let per = calls_per_event(&app);
    assert_eq!(per.len(), 2_000);
    assert!(per.values().all(|n| *n == 1), "an event was called twice");
}
