//! Partitions moving between workers keep their keys: the changelog, the
//! restore on assignment, and several workers of one group, against a real
//! broker with real stores on disk.
mod common;

use common::*;
use idem::config::Config;
use idem::workload::{Workload, WorkloadSpec};
use std::path::Path;

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
    assert_eq!(log_end(&changelog, 4).iter().sum::<i64>(), 2_000);
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
    assert_eq!(log_end(&changelog, 4).iter().sum::<i64>(), 2_300);
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
    assert_eq!(
        store
            .checkpoints()
            .unwrap()
            .iter()
            .map(|c| c.2)
            .sum::<i64>(),
        after_a2.iter().sum::<i64>()
    );
    assert_eq!(log_end(&changelog, 4).iter().sum::<i64>(), 1_700);
}
