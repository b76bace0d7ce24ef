//! The `idem` command line: parses, loads configuration, dispatches.

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use idem::config::{Config, ResumeFrom};
use idem::pipeline::{Stats, StopWhen, Worker};
use idem::replay::{Position, Replay};
use idem::shutdown::Signals;
use idem::store::StoreError;
use idem::telemetry::server::Health;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// mimalloc instead of the system allocator: a batch allocates and frees
/// thousands of small buffers (messages, records, staged writes), which
/// glibc's malloc spends a quarter of the worker thread's instructions on.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "idem",
    version,
    about = "Idempotent Kafka consumer worker: every redelivery is a no-op."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume the configured topics until SIGTERM (or until caught up).
    Run(RunArgs),
    /// Run the whole job on an embedded broker and print a checkable summary.
    Demo {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Distinct events to produce.
        #[arg(long, default_value_t = 8_950)]
        unique: usize,
        /// Exact re-sends to produce.
        #[arg(long, default_value_t = 1_000)]
        resends: usize,
        /// Conflicting re-sends to produce.
        #[arg(long, default_value_t = 50)]
        conflicts: usize,
    },
    /// Replay a topic (or a dump file) against the store and report what a
    /// redelivery would do: duplicates (no-ops), new, conflicts, dead letters.
    /// Dry run unless --apply. Exit status 3 with --expect-no-op when any
    /// message would reach the handler.
    Replay(ReplayArgs),
    /// Write a topic's messages to a file in kcat's JSON envelope (`kcat -C -J`),
    /// the input format of `replay --file`.
    Dump(DumpArgs),
    /// Inspect the dedup store (read-only; works beside a running worker).
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Inspect the ledger handler's state.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
}

/// Where the configuration comes from; shared by the commands that need it.
#[derive(clap::Args)]
struct ConfigArgs {
    /// Config file (TOML). Default: ./idem.toml when it exists.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers (overrides `brokers`).
    #[arg(long)]
    brokers: Option<String>,
    /// Consumer group (overrides `group_id`; also the default key scope).
    #[arg(long)]
    group_id: Option<String>,
    /// Store directory (overrides `store_dir`).
    #[arg(long)]
    store_dir: Option<PathBuf>,
}

/// Which messages a replay or dump reads.
#[derive(clap::Args)]
struct RangeArgs {
    /// Only these partitions, e.g. 0,3 (default: all).
    #[arg(long, value_parser = parse_partitions)]
    partitions: Option<PartitionList>,
    /// Start: earliest, latest, an RFC 3339 time, or partition:offset pairs (0:100,3:42).
    #[arg(long, default_value = "earliest")]
    from: Position,
    /// End, exclusive: latest (the log end when the replay starts), a time, or partition:offset pairs.
    #[arg(long, default_value = "latest")]
    to: Position,
}

/// `--partitions 0,3` as one value (a bare `Vec` would make clap expect the
/// flag once per partition).
#[derive(Clone)]
struct PartitionList(Vec<i32>);

fn parse_partitions(s: &str) -> anyhow::Result<PartitionList> {
    idem::replay::range::parse_partitions(s).map(PartitionList)
}

#[derive(clap::Args)]
struct ReplayArgs {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    range: RangeArgs,
    /// Topic to replay (with --file: only this topic of the dump).
    #[arg(long, required_unless_present = "file")]
    topic: Option<String>,
    /// Replay a dump file (kcat -C -J format, or `idem dump` output) instead of the broker.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Send new messages through the ledger handler and record them (needs the store to itself).
    #[arg(long)]
    apply: bool,
    /// Exit with status 3 when any message would reach (with --apply: reached) the handler.
    #[arg(long)]
    expect_no_op: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct DumpArgs {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(flatten)]
    range: RangeArgs,
    /// Topic to dump.
    #[arg(long)]
    topic: String,
    /// Output file; `-` for standard output.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Topic to consume; repeat for several (overrides `topics`).
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// Where assigned partitions start (overrides `resume_from`).
    #[arg(long, value_enum)]
    resume_from: Option<ResumeArg>,
    /// Stop once every assigned partition is processed to its end.
    #[arg(long)]
    until_caught_up: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum ResumeArg {
    Newest,
    Group,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Each bucket's span, estimated keys and bytes; totals; checkpoints.
    Stats {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The record of one idempotency key.
    Get {
        #[command(flatten)]
        config: ConfigArgs,
        /// The key as text (as in the `Idempotency-Key` header or `event_id`).
        #[arg(long, required_unless_present = "key_hex", conflicts_with = "key_hex")]
        key: Option<String>,
        /// The key as hex, for binary keys.
        #[arg(long)]
        key_hex: Option<String>,
        /// Scope of the key (default: the configured scope, i.e. the group id).
        #[arg(long)]
        scope: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drop the buckets that are past the window now (the worker also does
    /// this at start-up and on a timer). Needs the store to itself unless --dry-run.
    Expire {
        #[command(flatten)]
        config: ConfigArgs,
        /// Only list what would be dropped.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read every record and checkpoint; exit status 4 when anything is wrong.
    Verify {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Print balances per account and currency.
    Balances {
        /// Store directory.
        #[arg(long)]
        store: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Demo {
            json,
            unique,
            resends,
            conflicts,
        } => demo(json, unique, resends, conflicts),
        Command::Replay(args) => replay(args),
        Command::Dump(args) => dump(args),
        Command::Store { command } => store_command(command),
        Command::Ledger {
            command: LedgerCommand::Balances { store, json },
        } => balances(&store, json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("idem: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration: file, then environment, then these flags.
fn load_config(args: ConfigArgs) -> anyhow::Result<Config> {
    let file = args.config.clone().or_else(|| {
        let default = PathBuf::from("idem.toml");
        default.exists().then_some(default)
    });
    let mut config = Config::load(file.as_deref(), std::env::vars())?;
    if let Some(b) = args.brokers {
        config.brokers = b;
    }
    if let Some(g) = args.group_id {
        config.group_id = g;
    }
    if let Some(d) = args.store_dir {
        config.store_dir = d;
    }
    Ok(config)
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut config = load_config(args.config)?;
    if !args.topics.is_empty() {
        config.topics = args.topics;
    }
    if let Some(r) = args.resume_from {
        config.resume_from = match r {
            ResumeArg::Newest => ResumeFrom::Newest,
            ResumeArg::Group => ResumeFrom::Group,
        };
    }
    config.validate()?;
    idem::telemetry::init(config.log_format);
    for w in config.all_warnings() {
        tracing::warn!("{w}");
    }
    let deadline = Duration::from_secs(config.shutdown_timeout_secs);
    let stall = Duration::from_millis(config.http.request_timeout_ms);
    let health = Health::new(stall);
    let stats = Arc::new(Stats::default());
    let signals = Signals::install()?;
    if !config.metrics.listen.is_empty() {
        let addr = config.metrics.listen.parse().with_context(|| {
            format!(
                "`metrics.listen` {:?} is not host:port",
                config.metrics.listen
            )
        })?;
        idem::telemetry::server::serve(addr, health.clone())?;
    }
    let stop = if args.until_caught_up {
        StopWhen::CaughtUp
    } else {
        StopWhen::Shutdown
    };
    let outcome = supervise(&config, stop, deadline, &signals, &health, &stats);
    match outcome {
        Ok(summary) => {
            println!("{}", serde_json::json!({ "summary": summary }));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            // What was durable before the failure, for the operator's script.
            println!(
                "{}",
                serde_json::json!({ "summary": stats.snapshot(), "error": format!("{e:#}") })
            );
            Err(e)
        }
    }
}

/// Whether an error is a store failure that may pass by itself.
fn store_may_recover(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<StoreError>()
            .is_some_and(StoreError::is_transient)
            || c.is::<idem::changelog::restore::RestoreFailed>()
    })
}

/// Runs workers until one finishes or a signal stops it. A store that
/// cannot be opened or written for a reason that may pass (a full disk, an
/// I/O error) fails closed: nothing is handled, `/readyz` says why, the error
/// is logged once a minute, and the store is opened again with backoff until
/// it works; so does a worker that could not restore a partition's
/// changelog. A damaged store or a bad configuration ends the run.
fn supervise(
    config: &Config,
    stop: StopWhen,
    deadline: Duration,
    signals: &Signals,
    health: &Arc<Health>,
    stats: &Arc<Stats>,
) -> anyhow::Result<idem::pipeline::RunSummary> {
    let policy = idem::pipeline::RetryPolicy::from(&config.retry);
    let mut attempt = 0u32;
    let mut logged: Option<std::time::Instant> = None;
    loop {
        let started = idem::handler::for_config(config).and_then(|handler| {
            Worker::with_parts(
                config.clone(),
                handler,
                Arc::new(idem::clock::SystemClock),
                health.clone(),
                stats.clone(),
            )
        });
        let error = match started {
            Ok(worker) => match idem::shutdown::run_until_signal(worker, stop, deadline, signals) {
                Ok(summary) => return Ok(summary),
                Err(e) => e,
            },
            Err(e) => e,
        };
        if signals.raised_at().is_some() || !store_may_recover(&error) {
            return Err(error);
        }
        attempt += 1;
        let delay = policy.delay(attempt, None).max(Duration::from_millis(100));
        let text = format!("{error:#}");
        health.set_failing(Some(text.clone()));
        if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            logged = Some(std::time::Instant::now());
            tracing::error!(error = %text, attempt, retry_in_ms = delay.as_millis() as u64,
                "the worker cannot go on (the dedup store cannot be used, or a partition's changelog cannot be restored): nothing is handled until it can (fail closed; logged once a minute)");
        }
        if signals.sleep(delay) {
            return Err(error.context("stopped by a signal while waiting for the store"));
        }
    }
}

fn demo(json: bool, unique: usize, resends: usize, conflicts: usize) -> anyhow::Result<ExitCode> {
    // The demo's own summary is the point; per-message warnings (one per
    // conflict) and librdkafka's notices stay quiet unless RUST_LOG asks.
    idem::telemetry::init_with_default(
        idem::config::LogFormat::Human,
        "warn,idem::pipeline::batch=error,librdkafka=error,rdkafka=error",
    );
    let opts = idem::demo::DemoOptions {
        spec: idem::workload::WorkloadSpec {
            unique,
            resends,
            conflicts,
            ..Default::default()
        },
        store_dir: None,
    };
    let report = idem::demo::run(&opts)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(if report.balances_match {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let config = load_config(args.config)?;
    config.validate_except_topics()?;
    let scope = config.scope().to_string();
    idem::telemetry::init_with_default(config.log_format, "warn,librdkafka=error,rdkafka=error");
    let mut replay = match (&args.file, &args.topic) {
        (Some(path), topic) => {
            let r = Replay::file(config, path);
            match topic {
                Some(t) => r.only_topic(t),
                None => r,
            }
        }
        (None, Some(topic)) => Replay::topic(config, topic),
        (None, None) => anyhow::bail!("name a --topic to replay, or a dump --file"),
    };
    replay = replay
        .from(args.range.from)
        .to(args.range.to)
        .show_progress(true);
    if let Some(PartitionList(ps)) = args.range.partitions {
        replay = replay.partitions(ps);
    }
    let report = if args.apply {
        replay.apply(Box::new(idem::handler::ledger::Ledger))?
    } else {
        replay.run()?
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    if report.total.messages > 0 && report.total.new == report.total.messages && !report.applied {
        eprintln!(
            "idem: every message is new to scope {scope:?}: if the worker of this store uses another group id or scope, pass its --group-id or --config"
        );
    }
    if args.expect_no_op && report.total.messages == 0 {
        eprintln!("idem: replay read no message, so it proves nothing; check --topic, --partitions, --from and --to (exit status 4)");
        return Ok(ExitCode::from(4));
    }
    Ok(if args.expect_no_op && !report.no_op {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

fn dump(args: DumpArgs) -> anyhow::Result<ExitCode> {
    let config = load_config(args.config)?;
    config.validate_except_topics()?;
    idem::telemetry::init_with_default(config.log_format, "warn,librdkafka=error,rdkafka=error");
    let partitions = args.range.partitions.as_ref().map(|p| p.0.as_slice());
    let (from, to) = (&args.range.from, &args.range.to);
    let n = if args.out.as_os_str() == "-" {
        let stdout = std::io::stdout();
        let mut out = std::io::BufWriter::new(stdout.lock());
        idem::replay::dump(&config, &args.topic, partitions, from, to, &mut out)?
    } else {
        // Written beside the target and renamed at the end, so a failed dump
        // leaves an existing file as it was.
        let dir = match args.out.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => std::path::Path::new("."),
        };
        let tmp = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("creating a file in {}", dir.display()))?;
        let mut out = std::io::BufWriter::new(tmp);
        let n = idem::replay::dump(&config, &args.topic, partitions, from, to, &mut out)?;
        out.into_inner()
            .map_err(|e| e.into_error())
            .context("writing the dump")?
            .persist(&args.out)
            .with_context(|| format!("writing {}", args.out.display()))?;
        n
    };
    eprintln!("dumped {n} messages of {}", args.topic);
    Ok(ExitCode::SUCCESS)
}

fn open_store_read_only(config: &Config) -> anyhow::Result<idem::store::DedupStore> {
    config.validate_except_topics()?;
    idem::store::DedupStore::open_read_only_with_window(
        &config.store_dir,
        config.window_secs as i64 * 1000,
    )
    .with_context(|| {
        format!(
            "opening the store at {} read-only",
            config.store_dir.display()
        )
    })
}

fn print_json_or(
    json: bool,
    value: &impl serde::Serialize,
    table: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", table());
    }
    Ok(())
}

fn store_command(command: StoreCommand) -> anyhow::Result<ExitCode> {
    use idem::store::inspect::format_ms;
    match command {
        StoreCommand::Stats { config, json } => {
            let config = load_config(config)?;
            let stats = open_store_read_only(&config)?.stats()?;
            print_json_or(json, &stats, || stats.render())?;
        }
        StoreCommand::Get {
            config,
            key,
            key_hex,
            scope,
            json,
        } => {
            let config = load_config(config)?;
            let raw = match (key, key_hex) {
                (Some(k), _) => k.into_bytes(),
                (None, Some(h)) => hex::decode(h.trim()).context("--key-hex is not hex")?,
                (None, None) => anyhow::bail!("give --key or --key-hex"),
            };
            let scope = scope.unwrap_or_else(|| config.scope().to_string());
            let hash = idem::key::ScopedKeyHash::new(&scope, &idem::key::IdempotencyKey(raw));
            let store = open_store_read_only(&config)?;
            let Some((bucket, r)) = store.find(&hash)? else {
                if json {
                    println!("{}", serde_json::json!({"found": false, "scope": scope}));
                } else {
                    println!("not found in scope {scope:?} (in any live bucket)");
                }
                return Ok(ExitCode::from(5));
            };
            let expired = store.is_expired(&bucket, store.processing_time());
            let outcome = idem::proto::RecordOutcome::try_from(r.outcome)
                .map(|o| o.as_str_name().to_string())
                .unwrap_or_else(|_| format!("unknown ({})", r.outcome));
            let value = serde_json::json!({
                "found": true,
                "expired": expired,
                "scope": scope,
                "bucket": bucket.name(),
                "first_seen_ms": r.first_seen_ms,
                "source": {"topic": r.source_topic, "partition": r.source_partition, "offset": r.source_offset},
                "outcome": outcome,
                "fingerprint": hex::encode(&r.fingerprint),
            });
            print_json_or(json, &value, || {
                format!(
                    "scope        {scope}\nbucket       {}\nfirst seen   {}\nsource       {}/{}@{}\noutcome      {outcome}\nfingerprint  {}\n",
                    bucket.name(),
                    format_ms(r.first_seen_ms),
                    r.source_topic,
                    r.source_partition,
                    r.source_offset,
                    hex::encode(&r.fingerprint)
                ) + if expired {
                    "expired: past the window, no longer consulted (dropped at the next expiry)\n"
                } else {
                    ""
                }
            })?;
            if expired {
                return Ok(ExitCode::from(5));
            }
        }
        StoreCommand::Expire {
            config,
            dry_run,
            json,
        } => {
            let config = load_config(config)?;
            // Never a shorter window than the last worker ran with: a
            // command run without the worker's configuration must not drop
            // live buckets.
            let probe = open_store_read_only(&config)?;
            let configured = config.window_secs as i64 * 1000;
            let window_ms = probe.expiry_window_ms(configured)?;
            if window_ms > configured {
                eprintln!(
                    "idem: using the window the worker last ran with ({} s), longer than the configured {} s",
                    window_ms / 1000,
                    config.window_secs
                );
            }
            drop(probe);
            let (buckets, verb) = if dry_run {
                let store = idem::store::DedupStore::open_read_only_with_window(
                    &config.store_dir,
                    window_ms,
                )?;
                (store.expired_buckets(store.processing_time()), "would drop")
            } else {
                let opts = idem::store::StoreOptions {
                    window_ms,
                    bucket_secs: config.bucket_secs as i64,
                    ..Default::default()
                };
                let store = idem::store::DedupStore::open(
                    &config.store_dir,
                    opts,
                    std::sync::Arc::new(idem::clock::SystemClock),
                )
                .with_context(|| {
                    format!(
                        "opening the store at {} for writing (a running worker holds it, and expires buckets itself)",
                        config.store_dir.display()
                    )
                })?;
                (store.expire(store.processing_time())?, "dropped")
            };
            let names: Vec<String> = buckets.iter().map(|b| b.name()).collect();
            print_json_or(
                json,
                &serde_json::json!({ verb.replace(' ', "_"): names }),
                || format!("{verb} {} buckets: {}\n", names.len(), names.join(" ")),
            )?;
        }
        StoreCommand::Verify { config, json } => {
            let config = load_config(config)?;
            config.validate_except_topics()?;
            let report = match open_store_read_only(&config) {
                Ok(store) => store.verify()?,
                // A store that does not open (damaged, unreadable) is the
                // first problem; a directory that is not there is an error.
                Err(e) if config.store_dir.is_dir() => idem::store::VerifyReport {
                    problems: vec![format!("the store does not open: {e:#}")],
                    ..Default::default()
                },
                Err(e) => return Err(e),
            };
            print_json_or(json, &report, || {
                let mut s = format!(
                    "{} buckets, {} records, {} checkpoints read; {} problems\n",
                    report.buckets,
                    report.records,
                    report.checkpoints,
                    report.problems.len()
                );
                for p in &report.problems {
                    s.push_str(&format!("  {p}\n"));
                }
                s
            })?;
            if !report.problems.is_empty() {
                return Ok(ExitCode::from(4));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn balances(store: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let store = idem::store::DedupStore::open_read_only(store)
        .with_context(|| format!("opening the store at {}", store.display()))?;
    let balances = idem::handler::ledger::balances(&store)?;
    let applied = idem::handler::ledger::applied_counts(&store)?;
    let max_applied = applied.values().copied().max().unwrap_or(0);
    if json {
        let rows: Vec<_> = balances
            .iter()
            .map(|((a, c), b)| serde_json::json!({"account": a, "currency": c, "balance_minor": b}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"balances": rows, "events_applied": applied.len(), "max_applied_count": max_applied})
        );
    } else {
        println!(
            "{:<24} {:<8} {:>18}",
            "ACCOUNT", "CURRENCY", "BALANCE (minor)"
        );
        for ((a, c), b) in &balances {
            println!("{a:<24} {c:<8} {b:>18}");
        }
        println!(
            "events applied: {}, highest applied-count: {max_applied}",
            applied.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
