//! What an operator sees of a running worker: logs, Prometheus metrics and
//! the health endpoints.
//!
//! Logs go to stderr so that stdout stays free for the summaries and tables
//! that scripts read. Payload bytes and secrets are never logged.

pub mod metrics;
pub mod server;

use crate::config::LogFormat;
use tracing_subscriber::EnvFilter;

/// The default filter of the worker.
pub const DEFAULT_FILTER: &str = "info,rdkafka=warn";

/// Installs the global subscriber with [`DEFAULT_FILTER`]; see
/// [`init_with_default`].
pub fn init(format: LogFormat) {
    init_with_default(format, DEFAULT_FILTER)
}

/// Installs the global subscriber; `RUST_LOG` overrides `default_filter`.
/// Calling it twice is harmless (the second call does nothing).
pub fn init_with_default(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
