//! The `idem` command line: parses, loads configuration, dispatches.

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use idem::config::{Config, ResumeFrom};
use idem::pipeline::{StopWhen, Worker};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
    /// Inspect the ledger handler's state.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Config file (TOML). Default: ./idem.toml when it exists.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers (overrides `brokers`).
    #[arg(long)]
    brokers: Option<String>,
    /// Consumer group (overrides `group_id`).
    #[arg(long)]
    group_id: Option<String>,
    /// Topic to consume; repeat for several (overrides `topics`).
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// Store directory (overrides `store_dir`).
    #[arg(long)]
    store_dir: Option<PathBuf>,
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

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
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
    if !args.topics.is_empty() {
        config.topics = args.topics;
    }
    if let Some(d) = args.store_dir {
        config.store_dir = d;
    }
    if let Some(r) = args.resume_from {
        config.resume_from = match r {
            ResumeArg::Newest => ResumeFrom::Newest,
            ResumeArg::Group => ResumeFrom::Group,
        };
    }
    config.validate()?;
    idem::telemetry::init(config.log_format);
    let deadline = Duration::from_secs(config.shutdown_timeout_secs);
    let worker = Worker::new(config, Box::new(idem::handler::ledger::Ledger))?;
    let stop = if args.until_caught_up {
        StopWhen::CaughtUp
    } else {
        StopWhen::Shutdown
    };
    let summary = idem::shutdown::run_until_signal(worker, stop, deadline)?;
    println!("{}", serde_json::json!({ "summary": summary }));
    Ok(ExitCode::SUCCESS)
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
