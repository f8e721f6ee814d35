//! Command-line interface. Every flag has an environment fallback (`LOCALNFS_*`) so the
//! same binary is configured by flags on a laptop and by env in a Pod spec. Values are
//! typed (addresses, paths, durations) and validated once, here, at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::telemetry::LogFormat;

/// localnfs: local disks served as NFSv3 PersistentVolumes for Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "localnfs", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub telemetry: TelemetryArgs,

    #[command(subcommand)]
    pub command: Command,
}

/// Logging flags shared by every subcommand.
#[derive(Debug, Args)]
pub struct TelemetryArgs {
    /// Log line format.
    #[arg(
        long,
        env = "LOCALNFS_LOG_FORMAT",
        value_enum,
        default_value_t,
        global = true
    )]
    pub log_format: LogFormat,

    /// Log filter, `RUST_LOG` syntax (e.g. `info,localnfs=debug`).
    #[arg(
        long = "log",
        env = "LOCALNFS_LOG",
        default_value = "info",
        global = true
    )]
    pub log_filter: String,
}

/// The admin listener (`/healthz`, `/readyz`, `/metrics`).
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Address for the admin HTTP listener; port 0 picks a free one.
    #[arg(long, env = "LOCALNFS_ADMIN_ADDR", default_value = "127.0.0.1:9808")]
    pub admin_addr: SocketAddr,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole flow on an embedded single-node test cluster.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub admin: AdminArgs,

    /// Directory with the v1.20.2 kube-apiserver, kube-controller-manager and
    /// kube-scheduler (filled by scripts/k8s-binaries).
    #[arg(long, env = "LOCALNFS_K8S_BIN_DIR")]
    pub k8s_bin_dir: Option<PathBuf>,

    /// Stop after this long instead of waiting for Ctrl-C (e.g. `30s`, `5m`, `0s`).
    #[arg(long, value_parser = parse_duration)]
    pub run_for: Option<Duration>,
}

/// Parses `500ms`, `30s`, `5m`, `2h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (try 30s, 5m, 500ms)"))?;
    let secs = |k: u64| {
        n.checked_mul(k)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("`{s}` is too long"))
    };
    match unit {
        "" | "s" => secs(1),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => secs(60),
        "h" => secs(3600),
        _ => Err(format!(
            "unknown unit `{unit}` in `{s}` (use ms, s, m or h)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
    }

    #[test]
    fn bad_durations_say_why() {
        assert!(parse_duration("").unwrap_err().contains("not a duration"));
        assert!(
            parse_duration("5 days")
                .unwrap_err()
                .contains("unknown unit")
        );
        assert!(
            parse_duration("-1s")
                .unwrap_err()
                .contains("not a duration")
        );
        assert!(
            parse_duration("99999999999999999999h")
                .unwrap_err()
                .contains("not a duration")
        );
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
