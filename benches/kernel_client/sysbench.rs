//! The database rows: MariaDB in the guest with its datadir on one mount, sysbench
//! `oltp_read_write` and `oltp_write_only` (4 threads, 4 tables of 10,000 rows; the
//! server's settings are in `tests/support/mariadb.rs`: 64 MiB buffer pool, a flush
//! per commit). Each repetition starts mariadbd on the mount, runs both workloads and
//! stops it; the tables are made once per mount beforehand.

use std::time::Duration;

use localnfs_testbed::kernel::KernelNode;

use super::report::Unit;
use crate::support::mariadb;

const TABLES: u32 = 4;
const ROWS_PER_TABLE: u32 = 10_000;
const THREADS: u32 = 4;
const WORKLOADS: [&str; 2] = ["oltp_read_write", "oltp_write_only"];

/// The rows, in the order [`run`] returns them: per workload, TPS then p95 latency.
pub fn rows(seconds: u64) -> Vec<(String, Unit)> {
    WORKLOADS
        .iter()
        .flat_map(|w| {
            let what = format!("sysbench {w} ({THREADS} threads, {seconds} s)");
            [
                (format!("{what} TPS"), Unit::PerSecond),
                (format!("{what} p95"), Unit::Millis),
            ]
        })
        .collect()
}

fn datadir(mount: &str) -> String {
    format!("{mount}/data")
}

/// Creates the database and sysbench's tables on `mount`.
pub async fn prepare(node: &KernelNode, mount: &str) -> Result<(), String> {
    let result = async {
        mariadb::start(node, &datadir(mount)).await?;
        mariadb::prepare(node, TABLES, ROWS_PER_TABLE).await
    }
    .await;
    stop(node, mount).await;
    result.map_err(|e| e.to_string())
}

/// Stops mariadbd, saying so if it would not.
async fn stop(node: &KernelNode, mount: &str) {
    if let Err(e) = mariadb::stop(node).await {
        eprintln!("{mount}: stopping mariadbd failed: {e}");
    }
}

/// One repetition of every workload on `mount`, `seconds` each: TPS and p95 latency
/// (ms) per workload, in the order of [`rows`], or why it failed.
pub async fn run(node: &KernelNode, mount: &str, seconds: u64) -> Vec<Result<f64, String>> {
    let mut rows = Vec::new();
    if let Err(e) = mariadb::start(node, &datadir(mount)).await {
        let e = format!("mariadbd did not start: {e}");
        return vec![Err(e); 2 * WORKLOADS.len()];
    }
    for workload in WORKLOADS {
        let out = node
            .run_ok(
                &format!(
                    "{} --time={seconds} --threads={THREADS} run",
                    mariadb::sysbench(workload, TABLES, ROWS_PER_TABLE)
                ),
                Duration::from_secs(seconds + 300),
            )
            .await
            .map_err(|e| e.to_string())
            .and_then(|out| {
                mariadb::tps_and_p95(&out).ok_or_else(|| format!("no sysbench report in {out}"))
            });
        match out {
            Ok((tps, p95)) => {
                eprintln!("  {mount} {workload}: {tps:.1} TPS, p95 {p95} ms");
                rows.extend([Ok(tps), Ok(p95)]);
            }
            Err(e) => rows.extend([Err(e.clone()), Err(e)]),
        }
    }
    stop(node, mount).await;
    rows
}
