//! The main job against a real broker: 10,000 payment events with re-sends and
//! conflicts, applied exactly once; then redeliveries of every kind are no-ops.

mod common;

use common::*;
use idem::config::ResumeFrom;
use idem::handler::ledger;
use idem::key::Fingerprint;
use idem::pipeline::RunSummary;
use idem::workload::{produce_messages, Role, Workload, WorkloadSpec};
use rdkafka::Message;
use std::collections::HashMap;
use std::sync::Arc;

fn run(config: idem::config::Config) -> (RunSummary, Arc<idem::store::DedupStore>) {
    run_ledger(config, None)
}

#[test]
fn ten_thousand_events_apply_exactly_once_and_every_redelivery_is_a_no_op() {
    let topic = unique("payments");
    let group = unique("idem");
    create_topic(&topic, 4);
    let dir = tempfile::tempdir().unwrap();
    let workload = Workload::generate(&WorkloadSpec::default());
    workload.produce(&brokers(), &topic).unwrap();
    let config = config(&topic, &group, &dir.path().join("store"));

    // First pass: every unique event applied once.
    let (first, store) = run(config.clone());
    assert_eq!(first.consumed, 10_000);
    assert_eq!(first.handled, 8_950);
    assert_eq!(first.duplicates, 1_000);
    assert_eq!(first.conflicts, 50);
    assert_eq!(
        first.rejected + first.undecodable + first.tombstones + first.bad_keys,
        0
    );
    assert_eq!(first.unkeyed, 0);
    assert_eq!(first.cross_partition_duplicates, 0);
    assert_eq!(first.dead_letters_written, 50);
    let expected = workload.expected_balances();
    assert_eq!(ledger::balances(&store).unwrap(), expected);
    let applied = ledger::applied_counts(&store).unwrap();
    assert_eq!(applied.len(), 8_950);
    assert!(applied.values().all(|&n| n == 1));
    drop(store);

    // The group's committed offset is the log-end offset on every partition.
    let ends = log_end(&topic, 4);
    assert_eq!(ends.iter().sum::<i64>(), 10_000);
    assert_eq!(committed(&group, &topic, 4), ends);

    // 50 conflict records on the dead-letter topic, both fingerprints exact.
    let by_position: HashMap<(i32, i64), &idem::workload::WorkloadMessage> = {
        let produced = read_all(&topic, 4);
        produced
            .iter()
            .map(offset_of)
            .zip(workload_in_partition_order(&workload, &produced))
            .collect()
    };
    let letters = read_all(&format!("{topic}.dlq"), 4);
    assert_eq!(letters.len(), 50);
    for l in &letters {
        assert_eq!(header(l, "idem-kind"), Some("conflict"));
        assert_eq!(header(l, "idem-source-topic"), Some(topic.as_str()));
        let p: i32 = header(l, "idem-source-partition").unwrap().parse().unwrap();
        let o: i64 = header(l, "idem-source-offset").unwrap().parse().unwrap();
        let first_offset: i64 = header(l, "idem-first-offset").unwrap().parse().unwrap();
        let conflicting = by_position[&(p, o)];
        let original = by_position[&(p, first_offset)];
        assert_eq!(conflicting.role, Role::Conflict);
        assert_eq!(original.role, Role::Original);
        assert_eq!(original.event.event_id, conflicting.event.event_id);
        assert_eq!(
            header(l, "idem-fingerprint-received").unwrap(),
            Fingerprint::of(&conflicting.payload).to_hex()
        );
        assert_eq!(
            header(l, "idem-fingerprint-recorded").unwrap(),
            Fingerprint::of(&original.payload).to_hex()
        );
        assert_eq!(l.payload(), Some(conflicting.payload.as_slice()));
        assert!(header(l, "idem-reason")
            .unwrap()
            .starts_with("idempotency key reused with a different payload"));
    }

    // Restart with nothing new: no handler call, no dedup hit.
    let (idle, store) = run(config.clone());
    assert_eq!(
        (idle.consumed, idle.handler_calls(), idle.duplicates),
        (0, 0, 0)
    );
    drop(store);

    // Rewind the group to the earliest offsets: everything is delivered again
    // and nothing reaches the handler.
    rewind_group(&group, &topic, 4, 0);
    assert_eq!(committed(&group, &topic, 4), vec![0, 0, 0, 0]);
    let mut rewound = config.clone();
    rewound.resume_from = ResumeFrom::Group;
    let (replay, store) = run(rewound);
    assert_eq!(replay.consumed, 10_000);
    assert_eq!(replay.handler_calls(), 0);
    assert_eq!(replay.duplicates, 9_950);
    assert_eq!(replay.conflicts, 50);
    assert_eq!(ledger::balances(&store).unwrap(), expected);
    assert_eq!(committed(&group, &topic, 4), ends);
    drop(store);

    // One new event per partition: exactly four handler calls.
    let extra = Workload::generate(&WorkloadSpec {
        unique: 200,
        resends: 0,
        conflicts: 0,
        seed: 99,
        id_prefix: "extra",
        ..WorkloadSpec::default()
    });
    let one_per_partition: Vec<_> = (0..4)
        .map(|p| {
            extra
                .messages
                .iter()
                .find(|m| m.partition == p)
                .unwrap()
                .clone()
        })
        .collect();
    produce_messages(&brokers(), &topic, &one_per_partition).unwrap();
    let (more, store) = run(config);
    assert_eq!(more.consumed, 4);
    assert_eq!(more.handled, 4);
    assert_eq!(more.duplicates, 0);
    let mut expected_after = expected.clone();
    for m in &one_per_partition {
        *expected_after
            .entry((m.event.account_id.clone(), m.event.currency.clone()))
            .or_insert(0) += ledger::balance_delta(&m.event).unwrap();
    }
    assert_eq!(ledger::balances(&store).unwrap(), expected_after);
    assert_eq!(committed(&group, &topic, 4), log_end(&topic, 4));
}

/// Maps the messages read back from the topic to the workload messages that
/// produced them: per partition, production order is offset order.
fn workload_in_partition_order<'w>(
    workload: &'w Workload,
    read: &[rdkafka::message::OwnedMessage],
) -> Vec<&'w idem::workload::WorkloadMessage> {
    let mut per_partition: HashMap<
        i32,
        std::collections::VecDeque<&idem::workload::WorkloadMessage>,
    > = HashMap::new();
    for m in &workload.messages {
        per_partition.entry(m.partition).or_default().push_back(m);
    }
    let mut sorted: Vec<_> = read.iter().collect();
    sorted.sort_by_key(|m| (m.partition(), m.offset()));
    let mut map: HashMap<(i32, i64), &idem::workload::WorkloadMessage> = HashMap::new();
    for m in sorted {
        let w = per_partition
            .get_mut(&m.partition())
            .unwrap()
            .pop_front()
            .unwrap();
        assert_eq!(
            m.payload(),
            Some(w.payload.as_slice()),
            "topic order differs from production order"
        );
        map.insert((m.partition(), m.offset()), w);
    }
    read.iter()
        .map(|m| map[&(m.partition(), m.offset())])
        .collect()
}

#[test]
fn a_replay_after_a_30_hour_outage_is_refused_by_the_ledger_never_applied_twice() {
    let topic = unique("outage");
    let group = unique("idem");
    create_topic(&topic, 4);
    let dir = tempfile::tempdir().unwrap();
    let workload = Workload::generate(&WorkloadSpec {
        unique: 1_000,
        resends: 100,
        conflicts: 10,
        seed: 41,
        ..WorkloadSpec::default()
    });
    workload.produce(&brokers(), &topic).unwrap();
    let config = config(&topic, &group, &dir.path().join("store"));
    let clock = idem::clock::ManualClock::new(now_ms());
    let run_at = |config: idem::config::Config| run_ledger(config, Some(&clock));
    let (first, store) = run_at(config.clone());
    assert_eq!(
        (first.handled, first.duplicates, first.conflicts),
        (1_000, 100, 10)
    );
    drop(store);

    // 30 hours later the whole topic is delivered again: every dedup record
    // has expired, so the keys are new to the store; the ledger refuses them.
    clock.advance(30 * 3_600_000);
    rewind_group(&group, &topic, 4, 0);
    let mut rewound = config;
    rewound.resume_from = ResumeFrom::Group;
    let (again, store) = run_at(rewound);
    assert_eq!(again.consumed, 1_110);
    assert_eq!(again.handled, 0);
    assert_eq!(again.rejected, 1_000);
    assert_eq!(again.duplicates, 100);
    assert_eq!(again.conflicts, 10);
    assert_eq!(again.dead_letters_written, 1_010);
    assert_eq!(
        ledger::balances(&store).unwrap(),
        workload.expected_balances()
    );
    let applied = ledger::applied_counts(&store).unwrap();
    assert_eq!(applied.len(), 1_000);
    assert_eq!(applied.values().max(), Some(&1));
    let letters = read_all(&format!("{topic}.dlq"), 4);
    let refused = letters
        .iter()
        .filter(|l| {
            header(l, "idem-kind") == Some("rejected")
                && header(l, "idem-reason")
                    .is_some_and(|r| r.contains("was already applied to the ledger"))
        })
        .count();
    assert_eq!(refused, 1_000);
}

#[test]
fn with_no_linger_a_backlog_still_goes_in_full_batches_and_applies_once() {
    let topic = unique("no-linger");
    let group = unique("idem");
    create_topic(&topic, 4);
    let dir = tempfile::tempdir().unwrap();
    let spec = WorkloadSpec {
        unique: 4_000,
        resends: 0,
        conflicts: 0,
        ..WorkloadSpec::default()
    };
    let workload = Workload::generate(&spec);
    workload.produce(&brokers(), &topic).unwrap();
    let mut config = config(&topic, &group, &dir.path().join("store"));
    config.batch_linger_ms = 0;
    config.batch_size = 500;
    let (summary, store) = run(config);
    eprintln!("no linger: {} batches for 4,000 events", summary.batches);
    assert_eq!(summary.handled, 4_000);
    assert_eq!(
        ledger::balances(&store).unwrap(),
        workload.expected_balances()
    );
    // Before, a zero linger ended every batch at its first message: 4,000
    // batches (and fsyncs). Batches now take what is already fetched.
    assert!(
        summary.batches < 400,
        "{} batches for 4,000 events: batches end before what is fetched",
        summary.batches
    );
    assert_eq!(committed(&group, &topic, 4), log_end(&topic, 4));
}

/// The default workload (10,000 events, 1,000 re-sends, 50 conflicts) run
/// once to the end with `tweak` applied to the configuration: each event
/// applied once, the committed offsets at the log end, and a second run
/// with nothing to do. Returns the first run's summary.
fn default_workload_applies_once_with(
    name: &str,
    tweak: impl FnOnce(&mut idem::config::Config),
) -> RunSummary {
    let topic = unique(name);
    let group = unique("idem");
    create_topic(&topic, 4);
    let dir = tempfile::tempdir().unwrap();
    let workload = Workload::generate(&WorkloadSpec::default());
    workload.produce(&brokers(), &topic).unwrap();
    let mut config = config(&topic, &group, &dir.path().join("store"));
    tweak(&mut config);
    let (s, store) = run(config.clone());
    assert_eq!(
        (s.consumed, s.handled, s.duplicates, s.conflicts),
        (10_000, 8_950, 1_000, 50)
    );
    assert_eq!(
        ledger::balances(&store).unwrap(),
        workload.expected_balances()
    );
    let applied = ledger::applied_counts(&store).unwrap();
    assert_eq!(applied.len(), 8_950);
    assert!(applied.values().all(|&n| n == 1));
    drop(store);
    // Caught up means durable and committed: the committed offsets are the
    // log end, and a second run finds nothing to do.
    assert_eq!(committed(&group, &topic, 4), log_end(&topic, 4));
    let (again, _) = run(config);
    assert_eq!((again.consumed, again.handled), (0, 0));
    s
}

#[test]
fn with_the_wal_sync_overlapped_every_event_applies_once_and_offsets_wait_for_the_sync() {
    default_workload_applies_once_with("overlap", |c| {
        c.overlap_wal_sync = true;
        c.batch_size = 100;
    });
}

#[test]
fn with_a_commit_interval_commits_are_spaced_and_the_last_offsets_are_still_committed() {
    let s = default_workload_applies_once_with("commit-interval", |c| {
        c.batch_size = 50;
        // Capped at a quarter of the tests' 6 s session timeout: 1.5 s.
        c.commit_interval_ms = 60_000;
    });
    eprintln!(
        "commit interval: {} commits for {} batches in {} ms",
        s.commits, s.batches, s.processing_ms
    );
    assert!(s.batches >= 200, "{} batches of at most 50", s.batches);
    // At most one commit per 1.5 s while batches flow (the first too waits
    // for the interval), and the final one when the worker stops; a commit
    // per batch would be 200 or more.
    assert!(
        s.commits <= 3 + s.processing_ms / 1_500,
        "{} commits in {} ms: closer than the interval",
        s.commits,
        s.processing_ms
    );
}
