//! The file-system rows, run in the guest on each mount: untar the tree, `ls -lR` cold
//! and warm, read every file cold and warm, `rm -rf` it, each step on every mount in
//! turn before the next step. Each row is one guest script around one timed command
//! (`date +%s%N` on either side, so the command server's round trip is not in it) and
//! is checked: the file and directory counts after untar, the listed files and their
//! summed sizes, the MD5 of all bytes read, the tree gone after `rm -rf`. A server that
//! gets one wrong fails that row and the rows after it.
//!
//! "Cold" means the guest's caches were dropped first (`sync; echo 3 >
//! /proc/sys/vm/drop_caches`: pages, dentries, inodes and with them NFS attributes);
//! the host's page cache, under the NFS servers and the guest's disk alike, stays warm.
//!
//! Besides its seconds, each row records the NFS calls the guest's client made (from
//! its `/proc/net/rpc/nfs`) and, for localnfs, the time the server spent on them (the
//! sum of its `nfs_request_duration_seconds`): these commands issue one call at a
//! time, so what is not server time is the client's, the network's and the command's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use localnfs_testbed::kernel::{KernelNode, quote};
use nfs3_types::nfs3::NFS_PROGRAM;

use super::report::Unit;
use super::tree::{Tree, read_all_command};

/// The rows, in the order [`run`] returns them.
pub const ROWS: [(&str, Unit); 6] = [
    ("untar (tar x, then sync)", Unit::Seconds),
    ("ls -lR cold", Unit::Seconds),
    ("ls -lR warm", Unit::Seconds),
    ("read every file cold (+ md5sum)", Unit::Seconds),
    ("read every file warm (+ md5sum)", Unit::Seconds),
    ("rm -rf (then sync)", Unit::Seconds),
];

/// Bound on one step; a stuck server fails it instead of hanging the run.
const STEP_TIMEOUT: Duration = Duration::from_secs(1200);

/// What a step runs to make the guest drop its caches.
const DROP_CACHES: &str = "sync; echo 3 > /proc/sys/vm/drop_caches";

/// One repetition of one row.
#[derive(Clone, Debug)]
pub struct Measured {
    pub seconds: f64,
    /// NFS calls the guest's client made during the command (0 on a local fs).
    pub calls: u64,
    /// Time the server spent answering them, where the server reports it (localnfs).
    pub server_seconds: Option<f64>,
}

/// Where the rows run.
pub struct Target<'a> {
    pub node: &'a KernelNode,
    /// The mount point in the guest.
    pub dir: &'a str,
    /// The localnfs agent's admin listener, for its request durations.
    pub admin: Option<SocketAddr>,
}

/// What one step printed (`key=value` lines) and measured.
struct StepOutput {
    values: HashMap<String, String>,
    measured: Measured,
}

impl Target<'_> {
    /// Runs `before` (untimed), then `command` timed, then `after` (untimed; it may
    /// print `key=value` lines for checks and must not touch the mount, so that the
    /// server time is the command's), with `/bin/sh -e` in the mount.
    async fn step(
        &self,
        row: &str,
        before: &str,
        command: &str,
        after: &str,
    ) -> Result<StepOutput, String> {
        let script = format!(
            "set -e; cd {dir}
            calls() {{ awk '/^proc3 / {{ $1 = \"\"; $2 = \"\"; print }}' /proc/net/rpc/nfs; }}
            {before}
            c0=$(calls); t0=$(date +%s%N)
            {command}
            t1=$(date +%s%N); c1=$(calls)
            echo ns=$((t1 - t0)); echo c0=$c0; echo c1=$c1
            {after}",
            dir = quote(self.dir)
        );
        let server_before = self.server_seconds().await;
        let out = self
            .node
            .run_ok(&script, STEP_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        let server_after = self.server_seconds().await;
        let values = key_values(&out);
        let calls = self.log_calls(row, &values);
        let measured = Measured {
            seconds: Duration::from_nanos(number(&values, "ns")?).as_secs_f64(),
            calls,
            server_seconds: server_before.zip(server_after).map(|(b, a)| a - b),
        };
        Ok(StepOutput { values, measured })
    }

    /// Runs `script` untimed in the mount and returns the `key=value` lines it printed.
    async fn query(&self, script: &str) -> Result<HashMap<String, String>, String> {
        let out = self
            .node
            .run_ok(
                &format!("set -e; cd {}; {script}", quote(self.dir)),
                STEP_TIMEOUT,
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(key_values(&out))
    }

    /// The localnfs agent's total request time so far, if this target has one.
    async fn server_seconds(&self) -> Option<f64> {
        let admin = self.admin?;
        let metrics = crate::support::scrape(admin).await;
        Some(metrics.get("localnfs_nfs_request_duration_seconds_sum", &[]))
    }

    /// Prints the NFS calls between the counts `c0` and `c1` of a step's output, per
    /// procedure (nothing on a local file system), to see whether two servers were asked
    /// the same; returns their total.
    fn log_calls(&self, row: &str, values: &HashMap<String, String>) -> u64 {
        let counts = |key: &str| -> Vec<u64> {
            values
                .get(key)
                .map(|v| {
                    v.split_whitespace()
                        .filter_map(|n| n.parse().ok())
                        .collect()
                })
                .unwrap_or_default()
        };
        let (b, a) = (counts("c0"), counts("c1"));
        // The counts are by procedure number (RFC 1813 §3).
        let calls: Vec<(u32, u64)> = (0..)
            .zip(b.iter().zip(&a))
            .filter(|(_, (b, a))| a > b)
            .map(|(procedure, (b, a))| (procedure, a - b))
            .collect();
        if !calls.is_empty() {
            let list: Vec<String> = calls
                .iter()
                .map(|(procedure, c)| {
                    let name = NFS_PROGRAM::try_from(*procedure)
                        .map_or_else(|_| procedure.to_string(), |p| p.to_string());
                    format!("{} {c}", name.trim_start_matches("NFSPROC3_"))
                })
                .collect();
            eprintln!("  {} {row}: NFS calls {}", self.dir, list.join(", "));
        }
        calls.iter().map(|(_, c)| c).sum()
    }
}

/// The `key=value` lines of a script's output.
fn key_values(out: &str) -> HashMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The number `key` of a step's output.
fn number(values: &HashMap<String, String>, key: &str) -> Result<u64, String> {
    values
        .get(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("the step printed no {key}: {values:?}"))
}

/// Fails with `what` unless `got` is `want`.
fn check<T: PartialEq + std::fmt::Display>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got}, expected {want}"))
    }
}

/// The phases, each one or two rows of [`ROWS`] (a cold pass and its warm pass stay
/// together, so no other server's pages come between them).
const PHASES: [usize; 4] = [1, 2, 2, 1];

/// One repetition of every row on every target, phase by phase: each phase runs on all
/// targets in `order` before the next begins, so the targets' numbers for a row are
/// taken within moments of each other and a burst of other load on the machine falls
/// on all of them. `tarball` is a path in the guest. Returns `[target][row]`, each row
/// of [`ROWS`] or why it failed; a target's failed phase skips its later ones.
pub async fn run(
    targets: &[Target<'_>],
    order: &[usize],
    tree: &Tree,
    tarball: &str,
) -> Vec<Vec<Result<Measured, String>>> {
    let mut rows: Vec<Vec<Result<Measured, String>>> = targets.iter().map(|_| Vec::new()).collect();
    let mut failed: Vec<Option<&str>> = vec![None; targets.len()];
    for (phase, count) in PHASES.iter().enumerate() {
        for &t in order {
            let first = rows[t].len();
            let outcome = match failed[t] {
                Some(row) => Err(format!("not run: {row} failed")),
                None => run_phase(&targets[t], phase, tree, tarball, &mut rows[t]).await,
            };
            if let Err(e) = outcome {
                failed[t].get_or_insert(ROWS[rows[t].len()].0);
                rows[t].push(Err(e));
            }
            while rows[t].len() < first + count {
                rows[t].push(Err(format!("not run: {} failed", ROWS[first].0)));
            }
        }
    }
    // Whatever happened, the next repetition starts from the same state.
    for target in targets {
        if let Err(e) = target
            .node
            .run_ok(&format!("rm -rf {}/tree", quote(target.dir)), STEP_TIMEOUT)
            .await
        {
            eprintln!("{}: cleaning up the tree failed: {e}", target.dir);
        }
    }
    rows
}

/// Phase `phase` on one target, pushing its rows; stops at the first failure.
async fn run_phase(
    target: &Target<'_>,
    phase: usize,
    tree: &Tree,
    tarball: &str,
    rows: &mut Vec<Result<Measured, String>>,
) -> Result<(), String> {
    let row = |rows: &Vec<_>| ROWS[rows.len()].0;
    match phase {
        0 => {
            let untar = target
                .step(
                    row(rows),
                    &format!("rm -rf tree; {DROP_CACHES}"),
                    &format!("tar -xf {}; sync", quote(tarball)),
                    "",
                )
                .await?;
            let counts = target
                .query("echo files=$(find tree -type f | wc -l); echo dirs=$(find tree -type d | wc -l)")
                .await?;
            check("files after untar", number(&counts, "files")?, tree.files)?;
            check(
                "directories after untar",
                number(&counts, "dirs")?,
                tree.dirs,
            )?;
            rows.push(Ok(untar.measured));
        }
        // `ls -l` shows each file's size: the listed regular files and their sizes must
        // add up to the tree.
        1 => {
            for (pass, before) in [("cold", DROP_CACHES), ("warm", "")] {
                let ls = target
                    .step(
                        row(rows),
                        before,
                        "ls -lR tree > /tmp/ls.out",
                        "awk '/^-/ { n++; b += $5 } END { print \"files=\" n; print \"bytes=\" b }' /tmp/ls.out
                        rm /tmp/ls.out",
                    )
                    .await?;
                check(
                    &format!("files in ls -lR {pass}"),
                    number(&ls.values, "files")?,
                    tree.files,
                )?;
                check(
                    &format!("bytes in ls -lR {pass}"),
                    number(&ls.values, "bytes")?,
                    tree.bytes,
                )?;
                rows.push(Ok(ls.measured));
            }
        }
        2 => {
            for (pass, before) in [("cold", DROP_CACHES), ("warm", "")] {
                let read = target
                    .step(
                        row(rows),
                        before,
                        &format!("md5=$({})", read_all_command()),
                        "echo md5=$md5",
                    )
                    .await?;
                let md5 = read.values.get("md5").map_or("", String::as_str);
                check(
                    &format!("MD5 of every file read {pass}"),
                    md5,
                    tree.md5.as_str(),
                )?;
                rows.push(Ok(read.measured));
            }
        }
        _ => {
            let rm = target.step(row(rows), "", "rm -rf tree; sync", "").await?;
            let left = target
                .query("if [ -e tree ]; then echo left=1; else echo left=0; fi")
                .await?;
            check(
                "tree left after rm -rf (1 = yes)",
                number(&left, "left")?,
                0,
            )?;
            rows.push(Ok(rm.measured));
        }
    }
    Ok(())
}
