//! `idem demo`: the whole job on an embedded broker, with a summary a person
//! can check. librdkafka's in-process mock cluster stands in for Kafka here
//! (and only here and in fault-injection unit tests; the integration tests use
//! a real broker).
//!
//! It produces payment events with exact re-sends and conflicting re-sends,
//! runs the worker with the ledger handler until it has caught up, compares
//! the balances with those the unique events alone produce, then replays the
//! whole topic through a second consumer group against the same store and
//! shows that nothing reaches the handler again.

use crate::config::{Config, ResumeFrom};
use crate::handler::ledger::{self, Ledger};
use crate::pipeline::{RunSummary, StopWhen, Worker};
use crate::workload::{Role, Workload, WorkloadSpec};
use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::mocking::MockCluster;
use rdkafka::ClientConfig;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The workload.
    pub spec: WorkloadSpec,
    /// Store directory; a temporary one when `None`.
    pub store_dir: Option<PathBuf>,
}

/// What the demo found; `balances_match` is the verdict.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoReport {
    /// Messages produced.
    pub produced: usize,
    /// Distinct events among them.
    pub unique: usize,
    /// Exact re-sends produced.
    pub resends: usize,
    /// Conflicting re-sends produced.
    pub conflicts: usize,
    /// First pass counters.
    pub first_pass: RunSummary,
    /// Messages on the dead-letter topic after the first pass.
    pub dead_letter_topic_messages: i64,
    /// First pass throughput, messages per second, from the first message
    /// polled to the last offset committed.
    pub events_per_sec: f64,
    /// First pass wall time including start-up and the group join, seconds.
    pub wall_secs: f64,
    /// Replay counters.
    pub replay: RunSummary,
    /// Accounts with a balance.
    pub accounts: usize,
    /// Ledger balances equal the sums of the unique events.
    pub balances_match: bool,
    /// No event was applied more than once.
    pub max_applied_count: i64,
}

const TOPIC: &str = "payments";

fn dlq_messages(brokers: &str, topic: &str, partitions: i32) -> anyhow::Result<i64> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "idem-demo-inspect")
        .create()
        .context("creating the inspection consumer")?;
    let mut total = 0;
    for p in 0..partitions {
        let (lo, hi) = c
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .with_context(|| format!("reading watermarks of {topic}/{p}"))?;
        total += hi - lo;
    }
    Ok(total)
}

/// The demo's consumer group, and the group of its replay.
const GROUP: &str = "idem-demo";
const REPLAY_GROUP: &str = "idem-demo-replay";

/// Runs the demo and returns its report.
pub fn run(opts: &DemoOptions) -> anyhow::Result<DemoReport> {
    let cluster = MockCluster::new(1).context("starting the embedded mock broker")?;
    // The mock broker does not serve CreateTopics: the source, its dead
    // letters and the changelog are made here.
    let changelog = crate::changelog::topic_for(&Config::default().changelog.topic, GROUP, TOPIC);
    for topic in [TOPIC.to_string(), format!("{TOPIC}.dlq"), changelog] {
        cluster
            .create_topic(&topic, opts.spec.partitions, 1)
            .with_context(|| format!("creating the demo topic {topic}"))?;
    }
    let brokers = cluster.bootstrap_servers();
    let workload = Workload::generate(&opts.spec);
    workload.produce(&brokers, TOPIC)?;
    eprintln!(
        "produced {} payment events to {TOPIC}",
        workload.messages.len()
    );

    let tmp;
    let store_dir = match &opts.store_dir {
        Some(d) => d.clone(),
        None => {
            tmp = tempfile::tempdir().context("creating a temporary store directory")?;
            tmp.path().join("store")
        }
    };
    let mut config = Config {
        brokers: brokers.clone(),
        group_id: GROUP.into(),
        topics: vec![TOPIC.into()],
        store_dir: store_dir.clone(),
        // The mock broker does not serve CreateTopics; the topic exists.
        create_topics: false,
        ..Config::default()
    };
    config.kafka.insert(
        "session.timeout.ms".into(),
        toml::Value::String("6000".into()),
    );
    let stop = Arc::new(AtomicBool::new(false));

    let started = Instant::now();
    let first =
        Worker::new(config.clone(), Box::new(Ledger))?.run(stop.clone(), StopWhen::CaughtUp)?;
    let elapsed = started.elapsed().as_secs_f64();

    let dead = dlq_messages(
        &brokers,
        &config.dead_letter_topic_for(TOPIC),
        opts.spec.partitions,
    )?;

    // Replay: a second group starts from the earliest offsets against the same
    // store, so every message is delivered again.
    // The scope stays that of the first group, so the keys are the same keys.
    config.scope = Some(config.group_id.clone());
    // So is the changelog: the store's position in it is the first group's
    // (an empty changelog of its own would read as one the brokers lost).
    // (`{topic}` stays in the template: the configuration requires it.)
    config.changelog.topic = config.changelog.topic.replace("{group}", GROUP);
    config.group_id = REPLAY_GROUP.into();
    config.resume_from = ResumeFrom::Group;
    let worker = Worker::new(config, Box::new(Ledger))?;
    let store = worker.store();
    let replay = worker.run(stop, StopWhen::CaughtUp)?;

    let balances = ledger::balances(&store)?;
    let expected = workload.expected_balances();
    let applied = ledger::applied_counts(&store)?;
    Ok(DemoReport {
        produced: workload.messages.len(),
        unique: workload.count(Role::Original),
        resends: workload.count(Role::Resend),
        conflicts: workload.count(Role::Conflict),
        first_pass: first,
        dead_letter_topic_messages: dead,
        events_per_sec: first.consumed as f64 / (first.processing_ms as f64 / 1000.0).max(1e-9),
        wall_secs: elapsed,
        replay,
        accounts: balances.len(),
        balances_match: balances == expected && applied.len() == workload.count(Role::Original),
        max_applied_count: applied.values().copied().max().unwrap_or(0),
    })
}

impl DemoReport {
    /// The summary for people.
    pub fn render(&self) -> String {
        let yes = |b: bool| if b { "yes" } else { "NO" };
        format!(
            "\
idem demo — embedded broker, topic `{TOPIC}`, ledger handler

produced                        {produced}
  unique payment events         {unique}
  exact re-sends                {resends}
  conflicting re-sends          {conflicts}

first pass (group idem-demo)
  handled (applied once)        {handled}
  duplicates skipped            {dups}
  conflicts dead-lettered       {conf}
  messages on {TOPIC}.dlq       {dead}
  throughput                    {eps:.0} events/s (first message to last commit)
  wall time                     {wall:.1} s (incl. start-up and group join)

replay of the whole topic (group idem-demo-replay, same store)
  reached the handler           {rcalls}
  duplicates skipped            {rdups}
  conflicts                     {rconf}

accounts                        {accounts}
highest applied-count           {maxc}
balances match: {verdict}
",
            produced = self.produced,
            unique = self.unique,
            resends = self.resends,
            conflicts = self.conflicts,
            handled = self.first_pass.handled,
            dups = self.first_pass.duplicates,
            conf = self.first_pass.conflicts,
            dead = self.dead_letter_topic_messages,
            eps = self.events_per_sec,
            wall = self.wall_secs,
            rcalls = self.replay.handler_calls(),
            rdups = self.replay.duplicates,
            rconf = self.replay.conflicts,
            accounts = self.accounts,
            maxc = self.max_applied_count,
            verdict = yes(self.balances_match),
        )
    }
}
