//! Logging set-up: human-readable text by default, one JSON object per line with
//! `--log-format json`, filtered by `--log` / `LOCALNFS_LOG` (`RUST_LOG` syntax).
//! Logs go to stderr so commands that print reports keep stdout clean.

use clap::ValueEnum;
use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber. A filter that does not parse falls back to `info`
/// with a warning rather than silencing the process.
pub fn init(format: LogFormat, filter: &str) {
    let (env_filter, bad_filter) = match EnvFilter::try_new(filter) {
        Ok(f) => (f, None),
        Err(e) => (EnvFilter::new("info"), Some(e)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    if let Some(e) = bad_filter {
        tracing::warn!(filter, error = %e, "ignoring log filter that does not parse");
    }
}
