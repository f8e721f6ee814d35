//! The file-system rows, run in the guest on one mount: untar the tree, `ls -lR` cold
//! and warm, read every file cold and warm, `rm -rf` it. Each step is timed inside the
//! guest (`date +%s%N` around the command, so the command server's round trip is not
//! in it) and checked: the file and directory counts after untar, the listed files and
//! their summed sizes, the MD5 of all bytes read, the tree gone after `rm -rf`. A server
//! that gets one wrong fails that row and the rows after it.
//!
//! "Cold" means the guest's caches were dropped first (`sync; echo 3 >
//! /proc/sys/vm/drop_caches`: pages, dentries, inodes and with them NFS attributes);
//! the host's page cache, under the NFS servers and the guest's disk alike, stays warm.

use std::collections::HashMap;
use std::time::Duration;

use localnfs_testbed::kernel::{KernelNode, quote};

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

/// The two passes of a cold-then-warm step, with the call counts around each.
const PASSES: [(&str, &str, &str); 2] = [("cold", "c0", "c1"), ("warm", "c1", "c2")];

/// What a step runs to make the guest drop its caches.
const DROP_CACHES: &str = "sync; echo 3 > /proc/sys/vm/drop_caches";

/// NFSv3 procedures in the order the guest's `/proc/net/rpc/nfs` counts them.
const NFS3_PROCEDURES: [&str; 22] = [
    "NULL",
    "GETATTR",
    "SETATTR",
    "LOOKUP",
    "ACCESS",
    "READLINK",
    "READ",
    "WRITE",
    "CREATE",
    "MKDIR",
    "SYMLINK",
    "MKNOD",
    "REMOVE",
    "RMDIR",
    "RENAME",
    "LINK",
    "READDIR",
    "READDIRPLUS",
    "FSSTAT",
    "FSINFO",
    "PATHCONF",
    "COMMIT",
];

/// Runs `body` with `/bin/sh -e` in `dir` of `node` and returns the `key=value` lines it
/// printed. In `body`, `now` prints nanoseconds since the epoch, and `calls` the guest
/// NFS client's calls so far per NFSv3 procedure (for [`log_calls`]).
async fn step(node: &KernelNode, dir: &str, body: &str) -> Result<HashMap<String, String>, String> {
    let script = format!(
        "set -e; now() {{ date +%s%N; }}
        calls() {{ awk '/^proc3 / {{ $1 = \"\"; $2 = \"\"; print }}' /proc/net/rpc/nfs; }}
        cd {}; {body}",
        quote(dir)
    );
    let out = node
        .run_ok(&script, STEP_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect())
}

/// The number `key` of a step's output.
fn number(out: &HashMap<String, String>, key: &str) -> Result<u64, String> {
    out.get(key)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("the step printed no {key}: {out:?}"))
}

/// Seconds from the nanoseconds `key`.
fn seconds(out: &HashMap<String, String>, key: &str) -> Result<f64, String> {
    Ok(Duration::from_nanos(number(out, key)?).as_secs_f64())
}

/// Prints the NFS calls the client made between the counts `before` and `after` of a
/// step's output (nothing for a local file system): which requests a row cost, to see
/// whether two servers were asked the same.
fn log_calls(dir: &str, row: &str, out: &HashMap<String, String>, before: &str, after: &str) {
    let counts = |key: &str| -> Vec<u64> {
        out.get(key)
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let (b, a) = (counts(before), counts(after));
    let calls: Vec<String> = NFS3_PROCEDURES
        .iter()
        .zip(b.iter().zip(&a))
        .filter(|(_, (b, a))| a > b)
        .map(|(name, (b, a))| format!("{name} {}", a - b))
        .collect();
    if !calls.is_empty() {
        eprintln!("  {dir} {row}: NFS calls {}", calls.join(", "));
    }
}

/// Fails with `what` unless `got` is `want`.
fn check<T: PartialEq + std::fmt::Display>(what: &str, got: T, want: T) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got}, expected {want}"))
    }
}

/// One repetition of every row on the mount `dir`, extracting `tarball` (a path in the
/// guest). Returns the seconds of each row of [`ROWS`], or why it failed.
pub async fn run(
    node: &KernelNode,
    dir: &str,
    tree: &Tree,
    tarball: &str,
) -> Vec<Result<f64, String>> {
    let mut rows = Vec::with_capacity(ROWS.len());
    let outcome = run_steps(node, dir, tree, tarball, &mut rows).await;
    if let Err(e) = outcome {
        let failed = ROWS[rows.len()].0;
        rows.push(Err(e));
        while rows.len() < ROWS.len() {
            rows.push(Err(format!("not run: {failed} failed")));
        }
    }
    // Whatever happened, the next server starts from the same state.
    if let Err(e) = step(node, dir, "rm -rf tree").await {
        eprintln!("{dir}: cleaning up the tree failed: {e}");
    }
    rows
}

/// The steps in order, pushing each row's seconds; stops at the first failure.
async fn run_steps(
    node: &KernelNode,
    dir: &str,
    tree: &Tree,
    tarball: &str,
    rows: &mut Vec<Result<f64, String>>,
) -> Result<(), String> {
    let out = step(
        node,
        dir,
        &format!(
            "rm -rf tree; {DROP_CACHES}
            echo c0=$(calls); t0=$(now); tar -xf {tarball}; sync; t1=$(now); echo c1=$(calls)
            echo ns=$((t1 - t0))
            echo files=$(find tree -type f | wc -l)
            echo dirs=$(find tree -type d | wc -l)",
            tarball = quote(tarball)
        ),
    )
    .await?;
    check("files after untar", number(&out, "files")?, tree.files)?;
    check("directories after untar", number(&out, "dirs")?, tree.dirs)?;
    log_calls(dir, ROWS[rows.len()].0, &out, "c0", "c1");
    rows.push(Ok(seconds(&out, "ns")?));

    // `ls -l` shows each file's size: the listed regular files and their sizes must add
    // up to the tree.
    let out = step(
        node,
        dir,
        &format!(
            "{DROP_CACHES}
            echo c0=$(calls); t0=$(now); ls -lR tree > /tmp/ls.cold; t1=$(now); echo c1=$(calls)
            t2=$(now); ls -lR tree > /tmp/ls.warm; t3=$(now); echo c2=$(calls)
            echo cold_ns=$((t1 - t0)); echo warm_ns=$((t3 - t2))
            for f in cold warm; do
                awk -v f=$f '/^-/ {{ n++; b += $5 }} END {{ print f \"_files=\" n; print f \"_bytes=\" b }}' /tmp/ls.$f
            done
            rm /tmp/ls.cold /tmp/ls.warm"
        ),
    )
    .await?;
    for (pass, before, after) in PASSES {
        check(
            &format!("files in ls -lR {pass}"),
            number(&out, &format!("{pass}_files"))?,
            tree.files,
        )?;
        check(
            &format!("bytes in ls -lR {pass}"),
            number(&out, &format!("{pass}_bytes"))?,
            tree.bytes,
        )?;
        log_calls(dir, ROWS[rows.len()].0, &out, before, after);
        rows.push(Ok(seconds(&out, &format!("{pass}_ns"))?));
    }

    let read = read_all_command();
    let out = step(
        node,
        dir,
        &format!(
            "{DROP_CACHES}
            echo c0=$(calls); t0=$(now); cold=$({read}); t1=$(now); echo c1=$(calls)
            t2=$(now); warm=$({read}); t3=$(now); echo c2=$(calls)
            echo cold_ns=$((t1 - t0)); echo warm_ns=$((t3 - t2))
            echo cold_md5=$cold; echo warm_md5=$warm"
        ),
    )
    .await?;
    for (pass, before, after) in PASSES {
        let md5 = out.get(&format!("{pass}_md5")).map_or("", String::as_str);
        check(
            &format!("MD5 of every file read {pass}"),
            md5,
            tree.md5.as_str(),
        )?;
        log_calls(dir, ROWS[rows.len()].0, &out, before, after);
        rows.push(Ok(seconds(&out, &format!("{pass}_ns"))?));
    }

    let out = step(
        node,
        dir,
        "echo c0=$(calls); t0=$(now); rm -rf tree; sync; t1=$(now); echo c1=$(calls)
        echo ns=$((t1 - t0)); if [ -e tree ]; then echo left=1; else echo left=0; fi",
    )
    .await?;
    check("tree left after rm -rf (1 = yes)", number(&out, "left")?, 0)?;
    log_calls(dir, ROWS[rows.len()].0, &out, "c0", "c1");
    rows.push(Ok(seconds(&out, "ns")?));
    Ok(())
}
