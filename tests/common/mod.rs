//! Shared set-up of the integration tests: a real Kafka-protocol broker whose
//! address comes from `IDEM_TEST_BROKERS` (scripts/test.sh starts one), unique
//! topic and group names per test, and readers of the broker's view of the
//! truth (committed offsets, log-end offsets, dead letters).
#![allow(dead_code)]

pub mod app;
pub mod faults;

use idem::clock::{Clock as _, ManualClock, SystemClock};
use idem::config::Config;
use idem::handler::ledger::Ledger;
use idem::pipeline::{RunSummary, StopWhen, Worker};
use idem::store::DedupStore;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientConfig, Message};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn brokers() -> String {
    std::env::var("IDEM_TEST_BROKERS").expect(
        "IDEM_TEST_BROKERS is not set: run the tests with scripts/test.sh (or `make test`), \
         which starts a local broker, or point it at a Kafka-protocol broker",
    )
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_000_000;
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

pub fn create_topic(topic: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let res = futures::executor::block_on(admin.create_topics([&t], &AdminOptions::new())).unwrap();
    for r in res {
        r.unwrap();
    }
    // Wait until the metadata shows every partition.
    let c = plain_consumer("meta");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(md) = c.fetch_metadata(Some(topic), Duration::from_secs(5)) {
            if md.topics().iter().any(|t| {
                t.name() == topic
                    && t.partitions().len() == partitions as usize
                    && t.error().is_none()
            }) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "topic {topic} did not appear");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A worker configuration for tests: quick rebalances.
pub fn config(topic: &str, group: &str, store: &Path) -> Config {
    let mut c = Config {
        brokers: brokers(),
        group_id: group.into(),
        topics: vec![topic.into()],
        store_dir: store.to_path_buf(),
        ..Config::default()
    };
    // The whole suite can run with the overlapped WAL sync.
    c.overlap_wal_sync = overlap_wal_sync();
    c.kafka.insert(
        "session.timeout.ms".into(),
        toml::Value::String("6000".into()),
    );
    c.kafka.insert(
        "heartbeat.interval.ms".into(),
        toml::Value::String("500".into()),
    );
    c
}

/// The environment that makes a child `idem run` use quick rebalances.
pub fn child_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("IDEM_KAFKA__SESSION_TIMEOUT_MS", "6000"),
        ("IDEM_KAFKA__HEARTBEAT_INTERVAL_MS", "500"),
        // noida-db ignores fetch.max.bytes: see `plain_consumer`.
        ("IDEM_KAFKA__RECEIVE_MESSAGE_MAX_BYTES", "1000000000"),
        ("RUST_LOG", "info,rdkafka=warn"),
        // Several workers at once: each on a free port.
        ("IDEM_METRICS__LISTEN", "127.0.0.1:0"),
        (
            "IDEM_OVERLAP_WAL_SYNC",
            if overlap_wal_sync() { "true" } else { "false" },
        ),
    ]
}

/// `IDEM_TEST_OVERLAP_WAL_SYNC=1` runs the tests' workers with
/// `overlap_wal_sync = true`.
pub fn overlap_wal_sync() -> bool {
    std::env::var("IDEM_TEST_OVERLAP_WAL_SYNC").is_ok_and(|v| v == "1")
}

/// A consumer of the tests' own. It takes fetch responses up to 1 GB:
/// noida-db 0.2.3 ignores `fetch.max.bytes`, and a reader at the start of a
/// large topic otherwise gets a response librdkafka refuses (over 100 MB),
/// again on every retry.
pub fn plain_consumer(group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("receive.message.max.bytes", "1000000000")
        .create()
        .unwrap()
}

/// Log-end offsets (high watermarks) of every partition.
pub fn log_end(topic: &str, partitions: i32) -> Vec<i64> {
    let c = plain_consumer("watermarks");
    (0..partitions)
        .map(|p| {
            c.fetch_watermarks(topic, p, Duration::from_secs(10))
                .unwrap()
                .1
        })
        .collect()
}

/// The group's committed offsets of every partition (-1 when none).
pub fn committed(group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let c = plain_consumer(group);
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    (0..partitions)
        .map(|p| match got.find_partition(topic, p).unwrap().offset() {
            Offset::Offset(o) => o,
            _ => -1,
        })
        .collect()
}

/// Commits `offset` for every partition on behalf of an idle group: the
/// operator's "reset offsets" of a rewind.
pub fn rewind_group(group: &str, topic: &str, partitions: i32, offset: i64) {
    let c = plain_consumer(group);
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Offset(offset))
            .unwrap();
    }
    c.commit(&tpl, rdkafka::consumer::CommitMode::Sync).unwrap();
}

/// Every message of `topic`, read by assignment (no group).
pub fn read_all(topic: &str, partitions: i32) -> Vec<OwnedMessage> {
    let ends = log_end(topic, partitions);
    let total: i64 = ends.iter().sum();
    let c = plain_consumer("reader");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while (out.len() as i64) < total {
        assert!(
            Instant::now() < deadline,
            "read {} of {total} messages of {topic}",
            out.len()
        );
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            out.push(m.unwrap().detach());
        }
    }
    out
}

pub fn header<'a>(m: &'a OwnedMessage, name: &str) -> Option<&'a str> {
    use rdkafka::message::Headers;
    let hs = m.headers()?;
    hs.iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

pub fn offset_of(m: &OwnedMessage) -> (i32, i64) {
    (m.partition(), m.offset())
}

/// Parses the `{"summary": {...}}` line a child `idem run` prints at exit.
pub fn parse_summary(stdout: &str) -> serde_json::Value {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("{\"summary\""))
        .unwrap_or_else(|| panic!("no summary line in child output:\n{stdout}"));
    serde_json::from_str::<serde_json::Value>(line).unwrap()["summary"].clone()
}

/// Runs a ledger worker until it has caught up (on `clock` when given) and
/// returns its counters and its store.
pub fn run_ledger(config: Config, clock: Option<&ManualClock>) -> (RunSummary, Arc<DedupStore>) {
    let worker = match clock {
        Some(c) => Worker::with_clock(config, Box::new(Ledger), Arc::new(c.clone())).unwrap(),
        None => Worker::new(config, Box::new(Ledger)).unwrap(),
    };
    let store = worker.store();
    let summary = worker
        .run(Arc::new(AtomicBool::new(false)), StopWhen::CaughtUp)
        .unwrap();
    (summary, store)
}

/// The wall clock now, Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemClock.now_ms()
}

/// A broker of the test's own (not the shared one), which it can stop and
/// start again on the same port and data.
pub struct OwnBroker {
    dir: tempfile::TempDir,
    pub addr: String,
    port: u16,
}

/// Runs `deploy/broker.sh` with `args` and the data directory.
fn run_broker_sh(args: &[&str], dir: &Path) -> std::io::Result<std::process::Output> {
    let root = env!("CARGO_MANIFEST_DIR");
    std::process::Command::new(format!("{root}/deploy/broker.sh"))
        .args(args)
        .arg(dir)
        .output()
}

/// Like [`run_broker_sh`], asserting success; its stdout.
fn broker_sh(args: &[&str], dir: &Path) -> String {
    let out = run_broker_sh(args, dir).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl OwnBroker {
    pub fn start() -> OwnBroker {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = broker_sh(&["start", &port.to_string()], dir.path());
        OwnBroker { dir, addr, port }
    }

    pub fn stop(&self) {
        broker_sh(&["stop"], self.dir.path());
    }

    /// Starts it again on the same port and data (after [`OwnBroker::stop`]).
    pub fn restart(&self) {
        broker_sh(&["start", &self.port.to_string()], self.dir.path());
    }

    /// Stops both brokers and starts this one again, on its port, with the
    /// data `other` held: to the clients of this one, a broker that came
    /// back from a restart with another log.
    pub fn restart_with_data_of(&self, other: &OwnBroker) {
        other.stop();
        self.stop();
        for entry in std::fs::read_dir(other.dir.path()).unwrap() {
            let entry = entry.unwrap();
            let name = entry.file_name();
            if name == "kafka.json" {
                std::fs::copy(entry.path(), self.dir.path().join(&name)).unwrap();
            }
        }
        self.restart();
    }

    /// What the broker process wrote last, and whether its port answers.
    pub fn describe(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(15).collect();
        let open = std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
        format!(
            "broker port {} open: {open}; broker log ends:\n{}",
            self.port,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    /// Creates `topic` with `partitions` on this broker.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.addr)
            .create()
            .unwrap();
        let t = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
        let res =
            futures::executor::block_on(admin.create_topics([&t], &AdminOptions::new())).unwrap();
        for r in res {
            r.unwrap();
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        // Best effort, without asserting: this may run while a test panics.
        let _ = run_broker_sh(&["stop"], self.dir.path());
    }
}

/// The sum of a store's checkpoints: messages it recorded as processed.
pub fn checkpoint_total(store: &DedupStore) -> i64 {
    store.checkpoints().unwrap().iter().map(|c| c.2).sum()
}

/// Messages recorded as processed in the store so far (sum of checkpoints);
/// 0 while the store cannot be read.
pub fn progress(store: &Path) -> i64 {
    DedupStore::open_read_only(store)
        .and_then(|s| s.checkpoints())
        .map(|c| c.iter().map(|(_, _, n)| n).sum())
        .unwrap_or(0)
}

/// Stops an `idem run` child with SIGTERM, asserts it exited 0, and returns
/// the summary it printed.
pub fn stop_with_sigterm(child: std::process::Child) -> serde_json::Value {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", out.status);
    parse_summary(&String::from_utf8_lossy(&out.stdout))
}

/// `idem run` against `broker` for `topic` and `group` with its store in
/// `store`, quick rebalances, stdout piped and stderr to `stderr`.
pub fn idem_run(
    broker: &str,
    topic: &str,
    group: &str,
    store: &Path,
    stderr: std::process::Stdio,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_idem"));
    cmd.args([
        "run",
        "--brokers",
        broker,
        "--group-id",
        group,
        "--topic",
        topic,
    ])
    .arg("--store-dir")
    .arg(store)
    .stdout(std::process::Stdio::piped())
    .stderr(stderr);
    for (k, v) in child_env() {
        cmd.env(k, v);
    }
    cmd
}
