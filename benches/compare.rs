//! idem side by side with what users would run instead, on one broker, one
//! machine and the same data, in one go, so that the ratios survive a noisy
//! machine (see BENCHMARKS.md):
//!
//! - (a) `plain`: an at-least-once rdkafka consumer that only stores each
//!   offset after reading it (auto-commit every 5 s): the ceiling of this
//!   broker and machine;
//! - (b) `idem`: the worker with the ledger handler, one synced RocksDB
//!   write per batch (batch_size 500), offsets committed every 5 s
//!   (`commit_interval_ms = 5000`, as (a) and (c) auto-commit);
//! - (b0) `idem-commit-each`: (b) with an offset commit after every durable
//!   batch (`commit_interval_ms = 0`, the default);
//! - (b') `idem-overlap`: the same with `overlap_wal_sync = true` (a
//!   batch's fsync runs while the next batch is processed)
//! - (b'') `idem-changelog`: (b) with the changelog on (every dedup record
//!   also produced, and acknowledged, before the batch's write);
//! - (c) `redis`: the hand-rolled dedup — `SET key NX EX 86400` per message
//!   against a local Redis (from Debian's packages, started here, no
//!   persistence), then the balance applied in memory;
//! - (d) `idem-sync-each`: idem with one synced write per message
//!   (batch_size 1), on a smaller topic, beside (b) on the same one.
//!
//! `IDEM_BENCH_COMMIT_INTERVAL_MS` sets the commit interval of every idem
//! contender but (b0).
//!
//! Each contender is a child process (this binary with `--role`), so its CPU
//! seconds (from `wait4`) and peak RSS (its VmHWM) are its own; Redis's CPU
//! time and peak RSS are added to (c). Latency is per message, from the consumer receiving it to
//! its outcome being done (offset stored; Redis answered; for idem an upper
//! bound: from its batch's first message to the batch being durable).
//!
//! `cargo bench --bench compare -- [--events N] [--sync-events M]
//! [--rounds R]`; `scripts/bench.sh` installs Redis and starts a broker
//! first. `cargo test --all-targets` runs this binary without `--bench`:
//! then it runs small sizes (`--quick`), so CI keeps it working.

use anyhow::{bail, Context as _};
use hdrhistogram::Histogram;
use idem::config::Config;
use idem::handler::ledger::{balance_delta, payment_event, Ledger};
use idem::payload::{decode, PayloadFormat};
use idem::pipeline::{StopWhen, Worker};
use idem::workload::{produce_messages, Workload, WorkloadSpec};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::{ClientConfig, Message as _};
use std::collections::HashMap;

/// The allocator the `idem` binary uses (src/main.rs), for every contender.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A librdkafka property every consumer here runs with: noida-db 0.2.3, the
/// test broker, ignores the fetch size limits and answers a consumer at the
/// start of a large topic with everything it has in one response (112 MB was
/// seen), which librdkafka refuses above `receive.message.max.bytes` (100 MB
/// by default) — "Bad message format", a dropped connection, and the same
/// again on every retry. Apache Kafka keeps responses within `fetch.max.bytes`.
const LARGE_RESPONSES: (&str, &str) = ("receive.message.max.bytes", "1000000000");

/// The commit interval of (a) and (c), librdkafka's `auto.commit.interval.ms`
/// default, set explicitly; idem's contenders but (b0) commit as often.
const AUTO_COMMIT_MS: u64 = 5_000;

/// What one contender reports on its last stdout line.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Report {
    role: String,
    events: u64,
    /// From the first message received to the last one done.
    secs: f64,
    p50_us: u64,
    p99_us: u64,
    new: u64,
    duplicates: u64,
    /// The contender's own peak RSS (VmHWM at its end), MiB. Measured by the
    /// child itself: `wait4`'s maxrss would include the parent's memory at
    /// the fork.
    peak_rss_mib: f64,
    /// Errors the consumer reported (and went on from).
    consumer_errors: u64,
    /// CPU seconds of the thread that read and handled the messages (the
    /// contender's main thread: idem's loop, the plain and Redis consumers'
    /// loops), without librdkafka's and RocksDB's threads. Filled by the
    /// child itself at its end.
    #[serde(default)]
    loop_cpu_secs: f64,
}

/// Longest a contender may run: a minute, plus a second per 10,000
/// messages; one that takes longer is killed (and run once more).
fn contender_limit(messages: u64) -> Duration {
    Duration::from_secs(60 + messages / 10_000)
}

/// A contender's report with what the parent measured of its process.
#[derive(Debug, Clone)]
struct Run {
    report: Report,
    cpu_secs: f64,
    peak_rss_mib: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.report.events as f64 / self.report.secs.max(1e-9)
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn num(args: &[String], name: &str, default: u64) -> anyhow::Result<u64> {
    match arg(args, name) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .with_context(|| format!("{name} must be a whole number, got {v:?}")),
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match arg(&args, "--role") {
        Some(role) => {
            let mut report = child(&role, &args)?;
            report.peak_rss_mib = proc_peak_rss_mib(std::process::id())?;
            report.loop_cpu_secs = this_thread_cpu_secs();
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
        None => parent(&args),
    }
}

// ---------------------------------------------------------------- children

/// CPU seconds (user + system) of the calling thread so far.
fn this_thread_cpu_secs() -> f64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill, and
    // the pointer is valid for the call.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn child(role: &str, args: &[String]) -> anyhow::Result<Report> {
    let brokers = arg(args, "--brokers").context("--brokers")?;
    let topic = arg(args, "--topic").context("--topic")?;
    let group = arg(args, "--group").context("--group")?;
    let expect = num(args, "--expect", 0)?;
    // Warnings (consumer errors, rebalances gone wrong) reach the parent's
    // stderr; RUST_LOG overrides.
    idem::telemetry::init_with_default(
        idem::config::LogFormat::Human,
        "warn,idem::pipeline::rebalance=info,librdkafka=warn",
    );
    match role {
        "plain" => plain(&brokers, &topic, &group, expect, None),
        "redis" => {
            let port = num(args, "--redis-port", 0)?;
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
            let con = client.get_connection().context("connecting to Redis")?;
            plain(&brokers, &topic, &group, expect, Some(con))
        }
        "idem" | "idem-commit-each" | "idem-overlap" | "idem-changelog" | "idem-sync-each" => {
            if std::env::var("IDEM_BENCH_METRICS").is_ok_and(|v| v == "1") {
                // The Prometheus recorder a worker with `metrics.listen`
                // records into (no server: only the recording's cost).
                idem::telemetry::metrics::install();
            }
            let dir = tempfile::tempdir()?;
            let commit_interval_ms = match role {
                "idem-commit-each" => 0,
                _ => std::env::var("IDEM_BENCH_COMMIT_INTERVAL_MS")
                    .ok()
                    .map(|v| v.parse::<u64>())
                    .transpose()
                    .context("IDEM_BENCH_COMMIT_INTERVAL_MS: not a number of milliseconds")?
                    .unwrap_or(AUTO_COMMIT_MS),
            };
            let mut config = Config {
                brokers,
                group_id: group,
                topics: vec![topic],
                store_dir: dir.path().join("store"),
                batch_size: if role != "idem-sync-each" {
                    num(args, "--batch-size", 500)? as usize
                } else {
                    1
                },
                batch_linger_ms: num(args, "--linger-ms", 10)?,
                overlap_wal_sync: role == "idem-overlap",
                commit_interval_ms,
                metrics: idem::config::MetricsConfig {
                    listen: String::new(),
                },
                ..Config::default()
            };
            config.changelog.enabled = role == "idem-changelog";
            config.kafka.insert(
                LARGE_RESPONSES.0.into(),
                toml::Value::String(LARGE_RESPONSES.1.into()),
            );
            for (k, v) in extra_kafka_props()? {
                config.kafka.insert(k, toml::Value::String(v));
            }
            let worker = Worker::new(config, Box::new(Ledger))?;
            let s = worker.run(Arc::new(AtomicBool::new(false)), StopWhen::CaughtUp)?;
            Ok(Report {
                role: role.into(),
                events: s.consumed,
                secs: s.processing_ms as f64 / 1000.0,
                p50_us: s.latency_p50_us,
                p99_us: s.latency_p99_us,
                new: s.handled,
                duplicates: s.duplicates,
                peak_rss_mib: 0.0,
                consumer_errors: 0,
                loop_cpu_secs: 0.0,
            })
        }
        other => {
            bail!("unknown --role {other:?}: plain, redis, idem, idem-commit-each, idem-overlap, idem-changelog, idem-sync-each")
        }
    }
}

/// Extra librdkafka properties for every contender's consumer, from
/// `IDEM_BENCH_KAFKA_PROPS` (`k=v,k=v`).
fn extra_kafka_props() -> anyhow::Result<Vec<(String, String)>> {
    let Ok(props) = std::env::var("IDEM_BENCH_KAFKA_PROPS") else {
        return Ok(Vec::new());
    };
    props
        .split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("IDEM_BENCH_KAFKA_PROPS: {kv:?} is not k=v"))
        })
        .collect()
}

/// The plain consumer, and with a Redis connection the hand-rolled dedup:
/// per message `SET idem:<event id> <fingerprint> NX EX 86400`, the balance
/// applied in memory when the key was new, then the offset stored.
fn plain(
    brokers: &str,
    topic: &str,
    group: &str,
    expect: u64,
    mut redis: Option<redis::Connection>,
) -> anyhow::Result<Report> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", AUTO_COMMIT_MS.to_string())
        .set("enable.auto.offset.store", "false")
        .set(LARGE_RESPONSES.0, LARGE_RESPONSES.1);
    for (k, v) in extra_kafka_props()? {
        config.set(k, v);
    }
    let consumer: BaseConsumer = config.create().context("creating the consumer")?;
    consumer.subscribe(&[topic])?;
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 2)?;
    let mut balances: HashMap<(String, String), i64> = HashMap::new();
    let (mut events, mut new, mut duplicates, mut errors) = (0u64, 0u64, 0u64, 0u64);
    let mut first: Option<Instant> = None;
    let give_up = Instant::now() + Duration::from_secs(600);
    while events < expect {
        if Instant::now() > give_up {
            bail!(
                "{topic}: only {events} of {expect} messages in 600 s ({errors} consumer errors)"
            );
        }
        let Some(m) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let m = match m {
            Ok(m) => m,
            Err(e) => {
                // Reported and counted, as idem does; the run then fails
                // its count check if a message was lost to it.
                eprintln!("{topic}: consumer error: {e}");
                errors += 1;
                continue;
            }
        };
        let received = Instant::now();
        first.get_or_insert(received);
        if let Some(con) = redis.as_mut() {
            let payload = m.payload().unwrap_or_default();
            let decoded = decode(payload, PayloadFormat::Auto)
                .map_err(|e| anyhow::anyhow!("offset {} of {topic}: {e}", m.offset()))?;
            let ev = payment_event(&decoded)
                .map_err(|e| anyhow::anyhow!("offset {} of {topic}: {e}", m.offset()))?;
            let fingerprint = xxhash_rust::xxh3::xxh3_128(payload).to_be_bytes();
            let set: Option<String> = redis::cmd("SET")
                .arg(format!("idem:{}", ev.event_id))
                .arg(&fingerprint[..])
                .arg("NX")
                .arg("EX")
                .arg(86_400)
                .query(con)
                .context("SET NX EX")?;
            if set.is_some() {
                new += 1;
                *balances
                    .entry((ev.account_id.clone(), ev.currency.clone()))
                    .or_insert(0) += balance_delta(&ev).unwrap_or(0);
            } else {
                duplicates += 1;
            }
        }
        consumer.store_offset_from_message(&m)?;
        hist.saturating_record(received.elapsed().as_micros().max(1) as u64);
        events += 1;
    }
    let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
    consumer.commit_consumer_state(CommitMode::Sync)?;
    Ok(Report {
        role: if redis.is_some() { "redis" } else { "plain" }.into(),
        events,
        secs,
        p50_us: hist.value_at_quantile(0.5),
        p99_us: hist.value_at_quantile(0.99),
        new,
        duplicates,
        peak_rss_mib: 0.0,
        consumer_errors: errors,
        loop_cpu_secs: 0.0,
    })
}

// ------------------------------------------------------------------ parent

/// A process started here and killed when dropped.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A broker of our own (deploy/broker.sh), stopped when dropped.
struct OwnBroker {
    dir: tempfile::TempDir,
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = Command::new(broker_sh())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

fn broker_sh() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/broker.sh")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_redis() -> anyhow::Result<(Daemon, u16)> {
    let port = free_port()?;
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .stdout(Stdio::null())
        .spawn()
        .context(
            "starting redis-server (not installed? scripts/bench.sh installs it: apt-get install redis-server)",
        )?;
    let daemon = Daemon(child);
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut con) = client.get_connection() {
            if redis::cmd("PING").query::<String>(&mut con).is_ok() {
                return Ok((daemon, port));
            }
        }
        if Instant::now() > until {
            bail!("redis-server on port {port} did not answer within 10 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CPU seconds (user + system) of a running process, from /proc.
fn proc_cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses).
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc/pid/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// Peak RSS of a running process, MiB (VmHWM).
fn proc_peak_rss_mib(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmHWM")?;
    Ok(kib / 1024.0)
}

/// Runs one contender and measures its process.
fn contend(
    role: &str,
    brokers: &str,
    topic: &str,
    expect: u64,
    redis: Option<(&Daemon, u16)>,
) -> anyhow::Result<Run> {
    // A group of its own per run, so each run reads the topic from the start.
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let group = format!("bench-{role}-{}-{n}", std::process::id());
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["--role", role, "--brokers", brokers, "--topic", topic])
        .args(["--group", &group, "--expect", &expect.to_string()])
        .stdout(Stdio::piped());
    let redis_cpu_before = match redis {
        Some((d, port)) => {
            cmd.args(["--redis-port", &port.to_string()]);
            // Every run starts with no keys, as idem's runs start with an
            // empty store.
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
            redis::cmd("FLUSHALL")
                .query::<()>(&mut client.get_connection()?)
                .context("FLUSHALL")?;
            Some(proc_cpu_secs(d.0.id())?)
        }
        None => None,
    };
    let mut child = cmd.spawn().context("starting a contender")?;
    let mut stdout = child.stdout.take().context("the contender's stdout")?;
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        stdout.read_to_string(&mut out).map(|_| out)
    });
    let pid = child.id() as i32;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let limit = contender_limit(expect);
    let deadline = Instant::now() + limit;
    loop {
        // SAFETY: the pid is our own child, not yet reaped; both pointers are
        // valid for the duration of the call.
        let waited = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if waited == pid {
            break;
        }
        if waited < 0 {
            bail!("waiting for contender {role} failed");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            // SAFETY: as above; reaps the killed child.
            unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            bail!(
                "contender {role} did not finish within {} s and was killed (its warnings are above)",
                limit.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reading {role}'s output"))??;
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("contender {role} failed (wait status {status}): {out}");
    }
    let line = out.lines().last().unwrap_or_default();
    let report: Report =
        serde_json::from_str(line).with_context(|| format!("{role} printed {out:?}"))?;
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let mut cpu_secs = secs(usage.ru_utime) + secs(usage.ru_stime);
    let mut peak_rss_mib = report.peak_rss_mib;
    if let (Some((d, _)), Some(before)) = (redis, redis_cpu_before) {
        cpu_secs += proc_cpu_secs(d.0.id())? - before;
        peak_rss_mib += proc_peak_rss_mib(d.0.id())?;
    }
    Ok(Run {
        report,
        cpu_secs,
        peak_rss_mib,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn parent(args: &[String]) -> anyhow::Result<()> {
    // `cargo bench` passes --bench; `cargo test --all-targets` does not.
    let quick = args.iter().any(|a| a == "--quick") || !args.iter().any(|a| a == "--bench");
    let events = num(args, "--events", if quick { 20_000 } else { 1_000_000 })?;
    let sync_events = num(args, "--sync-events", if quick { 2_000 } else { 20_000 })?;
    let rounds = num(args, "--rounds", 1)?.max(1);
    let partitions = 8;
    println!(
        "# idem compared ({}): {events} events (10 % re-sends) on {partitions} partitions; sync-per-message run on {sync_events}; {rounds} round(s)",
        if quick { "quick" } else { "full" }
    );

    let mut _own_broker = None;
    let brokers = match arg(args, "--brokers").or_else(|| std::env::var("IDEM_TEST_BROKERS").ok()) {
        Some(b) => b,
        None => {
            let dir = tempfile::tempdir()?;
            let out = Command::new(broker_sh())
                .arg("start")
                .arg(free_port()?.to_string())
                .arg(dir.path())
                .output()
                .context("starting a broker with deploy/broker.sh")?;
            if !out.status.success() {
                bail!(
                    "deploy/broker.sh failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            _own_broker = Some(OwnBroker { dir });
            String::from_utf8(out.stdout)?.trim().to_string()
        }
    };
    let (redis, redis_port) = start_redis()?;

    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let big = format!("bench-{stamp}-big");
    let small = format!("bench-{stamp}-small");
    let admin: rdkafka::admin::AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let topics = [&big, &small].map(|t| {
        rdkafka::admin::NewTopic::new(t, partitions, rdkafka::admin::TopicReplication::Fixed(1))
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for r in rt.block_on(admin.create_topics(&topics, &rdkafka::admin::AdminOptions::new()))? {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    let spec = |n: u64, seed| WorkloadSpec {
        unique: (n - n / 10) as usize,
        resends: (n / 10) as usize,
        conflicts: 0,
        partitions,
        seed,
        ..WorkloadSpec::default()
    };
    let t = Instant::now();
    let w_big = Workload::generate(&spec(events, 11));
    produce_messages(&brokers, &big, &w_big.messages)?;
    let w_small = Workload::generate(&spec(sync_events, 12));
    produce_messages(&brokers, &small, &w_small.messages)?;
    println!(
        "produced {} messages to {big} and {} to {small} in {:.1} s",
        w_big.messages.len(),
        w_small.messages.len(),
        t.elapsed().as_secs_f64()
    );

    if args.iter().any(|a| a == "--produce-only") {
        // For profiling one contender by hand: `--role <r> --topic <big>`.
        if _own_broker.is_some() {
            bail!("--produce-only needs --brokers or IDEM_TEST_BROKERS: the harness's own broker stops with it");
        }
        println!("topics: {big} {small} (brokers {brokers})");
        return Ok(());
    }
    // The test broker is still writing its segments just after a large
    // produce; contenders started then have seen dropped connections.
    std::thread::sleep(Duration::from_secs(5));
    let mut runs: HashMap<&str, Vec<Run>> = HashMap::new();
    // A contender that fails is run once more, loudly (the test broker has
    // failed runs: see LARGE_RESPONSES).
    let contend = |role: &str, topic: &str, n: u64, redis: Option<(&Daemon, u16)>| {
        contend(role, &brokers, topic, n, redis).or_else(|e| {
            println!("{role} failed, running it once more: {e:#}");
            contend(role, &brokers, topic, n, redis)
        })
    };
    let check = |run: &Run, w: &Workload| -> anyhow::Result<()> {
        let r = &run.report;
        let unique = w.count(idem::workload::Role::Original) as u64;
        let ok = r.events == w.messages.len() as u64
            && (r.role == "plain" || (r.new == unique && r.duplicates == r.events - unique));
        if !ok {
            bail!(
                "{} got wrong counts: {r:?} for {unique} unique events",
                r.role
            );
        }
        Ok(())
    };
    for round in 0..rounds {
        for role in [
            "plain",
            "idem",
            "idem-commit-each",
            "idem-overlap",
            "idem-changelog",
            "redis",
        ] {
            let r = contend(
                role,
                &big,
                events,
                (role == "redis").then_some((&redis, redis_port)),
            )?;
            check(&r, &w_big)?;
            println!("round {round} {role:>15}: {:>9.0} events/s", r.rate());
            runs.entry(role).or_default().push(r);
        }
        for role in ["idem", "idem-sync-each"] {
            let r = contend(role, &small, sync_events, None)?;
            check(&r, &w_small)?;
            let key = if role == "idem" { "idem (small)" } else { role };
            println!("round {round} {key:>15}: {:>9.0} events/s", r.rate());
            runs.entry(key).or_default().push(r);
        }
    }

    println!();
    println!(
        "| contender | events | events/s | p50 µs | p99 µs | CPU s | CPU µs/event | loop CPU µs/event | peak RSS MiB |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let label = [
        ("plain", "(a) plain consumer, offsets stored"),
        (
            "idem",
            "(b) idem, ledger, sync per batch, commits every 5 s",
        ),
        (
            "idem-commit-each",
            "(b0) idem, same, a commit per batch (the default)",
        ),
        (
            "idem-overlap",
            "(b') idem, same, written behind (overlap_wal_sync)",
        ),
        ("idem-changelog", "(b'') idem, same, with the changelog"),
        ("redis", "(c) Redis SET NX EX per message"),
        ("idem (small)", "(b) idem, same, small topic"),
        ("idem-sync-each", "(d) idem, sync per message"),
    ];
    let mut rate = HashMap::new();
    for (key, name) in label {
        let Some(rs) = runs.get(key) else { continue };
        let r = median(rs.iter().map(Run::rate).collect());
        rate.insert(key, r);
        let m = |f: fn(&Run) -> f64| median(rs.iter().map(f).collect());
        let events = rs[0].report.events;
        let cpu = m(|r| r.cpu_secs);
        println!(
            "| {name} | {events} | {r:.0} | {:.0} | {:.0} | {cpu:.2} | {:.1} | {:.1} | {:.0} |",
            m(|r| r.report.p50_us as f64),
            m(|r| r.report.p99_us as f64),
            cpu * 1e6 / events as f64,
            m(|r| r.report.loop_cpu_secs) * 1e6 / events as f64,
            m(|r| r.peak_rss_mib),
        );
    }
    println!();
    println!(
        "b/a = {:.2} (goal >= 0.8); b/c = {:.2} (goal >= 5); b/d on the small topic = {:.1}",
        rate["idem"] / rate["plain"],
        rate["idem"] / rate["redis"],
        rate["idem (small)"] / rate["idem-sync-each"],
    );
    println!(
        "b'/a = {:.2}; b'/c = {:.2}; b'/b = {:.2}",
        rate["idem-overlap"] / rate["plain"],
        rate["idem-overlap"] / rate["redis"],
        rate["idem-overlap"] / rate["idem"],
    );
    println!(
        "b''/b = {:.2} (the changelog's cost); b0/b = {:.2} (a commit per batch against one per 5 s)",
        rate["idem-changelog"] / rate["idem"],
        rate["idem-commit-each"] / rate["idem"],
    );
    drop(redis);
    Ok(())
}
