//! MariaDB (Debian's `mariadb-server`) inside a kernel test node, its datadir on an NFS
//! mount, driven by sysbench: what a database pod does to its volume.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::time::Duration;

use localnfs_testbed::Result;
use localnfs_testbed::kernel::{KernelNode, quote};

/// The server's options. The buffer pool maximum must be small: under User-Mode Linux
/// mariadbd cannot map its default (8 TiB of address space) and InnoDB fails to start.
fn my_cnf(datadir: &str) -> String {
    format!(
        "[client]\nsocket=/run/mysqld/mysqld.sock\nuser=root\n\
         [mariadbd]\nuser=root\ndatadir={datadir}\nsocket=/run/mysqld/mysqld.sock\n\
         skip-networking\nskip-name-resolve\ninnodb-buffer-pool-size=64M\n\
         loose-innodb-buffer-pool-size-max=256M\ninnodb-log-file-size=32M\n\
         innodb-flush-log-at-trx-commit=1\n"
    )
}

const CNF: &str = "/run/my.cnf";

/// Writes the configuration, creates the system tables in `datadir` unless they exist,
/// and starts mariadbd; returns once it answers.
pub async fn start(node: &KernelNode, datadir: &str) -> Result<()> {
    let script = format!(
        "set -e; printf %s {cnf} > {CNF}
        [ -d {d}/mysql ] || mariadb-install-db --defaults-file={CNF} --skip-test-db \
            --auth-root-authentication-method=normal > /tmp/install.log 2>&1 \
            || {{ cat /tmp/install.log; exit 1; }}
        (mariadbd --defaults-file={CNF} >> /tmp/mariadbd.log 2>&1 &)
        for i in $(seq 120); do
            mariadb --defaults-file={CNF} -e 'select 1' >/dev/null 2>&1 && exit 0
            sleep 1
        done
        tail -30 /tmp/mariadbd.log; exit 1",
        cnf = quote(&my_cnf(datadir)),
        d = quote(datadir),
    );
    node.run_ok(&script, Duration::from_secs(300))
        .await
        .map(drop)
}

/// Runs SQL as root, failing on any error.
pub async fn sql(node: &KernelNode, statements: &str) -> Result<String> {
    node.run_ok(
        &format!("mariadb --defaults-file={CNF} -e {}", quote(statements)),
        Duration::from_secs(300),
    )
    .await
}

/// The sysbench command line for `workload` (e.g. `oltp_read_write`).
pub fn sysbench(workload: &str, tables: u32, rows: u32) -> String {
    format!(
        "sysbench {workload} --mysql-socket=/run/mysqld/mysqld.sock --mysql-user=root \
         --tables={tables} --table-size={rows}"
    )
}

/// Creates the `sbtest` database and sysbench's tables.
pub async fn prepare(node: &KernelNode, tables: u32, rows: u32) -> Result<()> {
    sql(node, "create database if not exists sbtest").await?;
    node.run_ok(
        &format!("{} prepare", sysbench("oltp_read_write", tables, rows)),
        Duration::from_secs(600),
    )
    .await
    .map(drop)
}

/// `CHECK TABLE` of sysbench's tables: each must say OK.
pub async fn check_tables(node: &KernelNode, tables: u32) {
    let list: Vec<String> = (1..=tables).map(|i| format!("sbtest.sbtest{i}")).collect();
    let out = sql(node, &format!("check table {}", list.join(", ")))
        .await
        .expect("CHECK TABLE");
    let statuses: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(statuses.len(), tables as usize, "{out}");
    for line in statuses {
        assert!(line.ends_with("status\tOK"), "CHECK TABLE: {out}");
    }
}

/// Kills mariadbd as a crash would (SIGKILL), so the next start runs InnoDB recovery.
pub async fn crash(node: &KernelNode) {
    node.run_ok(
        "pkill -9 -x mariadbd; for i in $(seq 100); do pgrep -x mariadbd >/dev/null || exit 0; \
         sleep 0.1; done; exit 1",
        Duration::from_secs(30),
    )
    .await
    .expect("mariadbd killed");
}

/// Transactions per second and 95th-percentile latency (ms) from sysbench's report.
pub fn tps_and_p95(report: &str) -> Option<(f64, f64)> {
    let number_after = |key: &str| -> Option<f64> {
        let line = report.lines().find(|l| l.trim_start().starts_with(key))?;
        let rest = line.split_once(':')?.1.trim();
        let tps = rest.split_once('(').map_or(rest, |(_, r)| r);
        tps.split_whitespace().next()?.parse().ok()
    };
    Some((
        number_after("transactions:")?,
        number_after("95th percentile:")?,
    ))
}

/// Stops mariadbd cleanly and waits until it is gone.
pub async fn stop(node: &KernelNode) -> Result<()> {
    node.run_ok(
        &format!(
            "mariadb-admin --defaults-file={CNF} shutdown; \
             for i in $(seq 600); do pgrep -x mariadbd >/dev/null || exit 0; sleep 0.1; done; exit 1"
        ),
        Duration::from_secs(90),
    )
    .await
    .map(drop)
}
