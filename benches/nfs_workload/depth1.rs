//! Depth-1 rows (`--depth1`): one connection, exactly one call in flight, for each
//! procedure the Linux kernel client sends for metadata work, and for small synced
//! writes. What a database or `ls -l`/`rm -rf`/`tar` feels is this latency, not the
//! throughput of many calls in flight.
//!
//! Per server, untimed: a directory of `--entries` empty files (the read-only rows'
//! population), then a warm-up pass of every row. Each repetition then gives every
//! server a fresh connection and a fresh directory for the rows that change things, and
//! runs the rows in order, the servers taking turns at each row, first place rotating.
//! Each call is timed on its own (p50, p99); ops/s is calls over the row's wall time;
//! server CPU is sampled around the row as in the other rows. Every reply is checked, so
//! a server that answers wrongly fails the row with the reason.

use std::time::{Duration, Instant};

use nfs3_types::nfs3::{
    GETATTR3args, Nfs3Option, REMOVE3args, RMDIR3args, SETATTR3args, nfs_fh3, sattr3, writeverf3,
};

use super::client::{
    Conn, Cursor, connect_nfs, connect_nfs_as, create, dirop, lookup, mkdir, mount, nfs,
};
use super::report::{LatencySample, print_depth1_table};

#[path = "depth1_calls.rs"]
mod calls;
use super::{BLOCK, Config, Measured, Target, pattern, row};
use calls::one_call;

/// The rows, in the order they run (CREATE → SETATTR → RENAME → REMOVE work on the
/// same files).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Lookup,
    Getattr,
    Access,
    Readdirplus,
    Create,
    Setattr,
    Rename,
    Remove,
    Commit,
    WriteSync,
}

impl Kind {
    pub const ALL: [Kind; 10] = [
        Kind::Lookup,
        Kind::Getattr,
        Kind::Access,
        Kind::Readdirplus,
        Kind::Create,
        Kind::Setattr,
        Kind::Rename,
        Kind::Remove,
        Kind::Commit,
        Kind::WriteSync,
    ];

    /// The name `--only` takes.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Lookup => "lookup",
            Kind::Getattr => "getattr",
            Kind::Access => "access",
            Kind::Readdirplus => "readdirplus",
            Kind::Create => "create",
            Kind::Setattr => "setattr",
            Kind::Rename => "rename",
            Kind::Remove => "remove",
            Kind::Commit => "commit",
            Kind::WriteSync => "write",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Lookup => "LOOKUP",
            Kind::Getattr => "GETATTR",
            Kind::Access => "ACCESS",
            Kind::Readdirplus => "READDIRPLUS (32 KiB page)",
            Kind::Create => "CREATE",
            Kind::Setattr => "SETATTR (chmod)",
            Kind::Rename => "RENAME",
            Kind::Remove => "REMOVE",
            Kind::Commit => "COMMIT (after 4 KiB UNSTABLE WRITE)",
            Kind::WriteSync => "WRITE 4 KiB FILE_SYNC",
        }
    }

    /// Calls per repetition: the cheap read-only calls 10× the others, so their CPU
    /// time spans enough clock ticks.
    fn count(self, config: &Config) -> u64 {
        match self {
            Kind::Lookup | Kind::Getattr | Kind::Access => 10 * config.ops,
            _ => config.ops,
        }
    }

    /// Calls of the warm-up pass: every populated file once for the rows that visit
    /// them, a few listings, a short run of the rest.
    fn warm_up_count(self, config: &Config) -> u64 {
        match self {
            Kind::Lookup | Kind::Getattr | Kind::Access => config.entries,
            _ => config.ops.min(100),
        }
    }
}

/// A file of a server's population directory, as its first LOOKUP saw it.
struct PopFile {
    name: String,
    fh: nfs_fh3,
    fileid: u64,
}

/// A server ready for the rows: the bench's directory (in the export root, owned by
/// the caller), and the populated directory in it.
struct Server<'a> {
    target: &'a Target,
    root: nfs_fh3,
    base: nfs_fh3,
    uid: u32,
    pop_dir: nfs_fh3,
    pop: Vec<PopFile>,
}

/// One repetition's state on one server.
struct Rep {
    conn: Conn,
    dir: nfs_fh3,
    tag: String,
    /// Handles made by the CREATE row, for SETATTR; RENAME and REMOVE go by name.
    created: Vec<nfs_fh3>,
    /// How many files CREATE (then RENAME) finished, `None` if that row failed.
    created_ok: Option<u64>,
    renamed_ok: Option<u64>,
    removed: bool,
    /// Where the READDIRPLUS row's current listing stands.
    cursor: Cursor,
    listed: u64,
    /// Entries the READDIRPLUS row received in all, for entries per call.
    received: u64,
    /// The write verifier of the row's first reply; a change means a restart.
    verf: Option<writeverf3>,
    /// Files the COMMIT and WRITE rows made, removed at the end.
    files: Vec<String>,
}

pub fn run(config: &Config) {
    // The client is one task on one thread, as a libnfs or kernel caller waiting on
    // each reply is: no cross-thread wake-up adds to the measured round trip.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let kinds: Vec<Kind> = Kind::ALL
        .into_iter()
        .filter(|k| config.only.is_empty() || config.only.iter().any(|o| o == k.name()))
        .collect();
    let mut servers = Vec::new();
    for target in &config.servers {
        eprintln!(
            "{}: populating {} files, warm-up",
            target.name, config.entries
        );
        let prepared = rt.block_on(async {
            let server = Server::prepare(target, config).await?;
            let mut rep = Rep::start(&server, 0).await?;
            for kind in Kind::ALL {
                let count = kind.warm_up_count(config);
                if let Err(e) = run_row(&server, &mut rep, kind, count).await {
                    eprintln!("{}: warm-up {} failed: {e}", target.name, kind.label());
                }
            }
            rep.finish(&server.base).await;
            Ok::<_, String>(server)
        });
        servers.push(prepared.inspect_err(|e| eprintln!("{}: set-up failed: {e}", target.name)));
    }
    let n = servers.len();
    let mut results: Vec<Vec<Vec<Result<LatencySample, String>>>> = (0..n)
        .map(|_| kinds.iter().map(|_| Vec::new()).collect())
        .collect();
    for rep_no in 1..=config.reps {
        eprintln!("depth 1: repetition {rep_no}/{}", config.reps);
        let mut reps: Vec<Result<Rep, String>> = servers
            .iter()
            .map(|s| match s {
                Ok(server) => rt.block_on(Rep::start(server, rep_no)),
                Err(e) => Err(format!("set-up failed: {e}")),
            })
            .collect();
        for (r, kind) in kinds.iter().copied().enumerate() {
            for turn in 0..n {
                let i = (turn + rep_no + r) % n;
                let outcome = match (&servers[i], &mut reps[i]) {
                    (Ok(server), Ok(rep)) => {
                        rt.block_on(run_row(server, rep, kind, kind.count(config)))
                    }
                    (Err(e), _) => Err(e.clone()),
                    (_, Err(e)) => Err(e.clone()),
                };
                let name = &config.servers[i].name;
                match &outcome {
                    Ok(s) => eprintln!("{name}: {} done, {:.0} ops/s", kind.label(), s.ops_per_s),
                    Err(e) => eprintln!("{name}: {} failed: {e}", kind.label()),
                }
                results[i][r].push(outcome);
            }
        }
        for (server, rep) in servers.iter().zip(reps) {
            if let (Ok(server), Ok(rep)) = (server, rep) {
                rt.block_on(rep.finish(&server.base));
            }
        }
    }
    for server in servers.into_iter().flatten() {
        if let Err(e) = rt.block_on(server.finish()) {
            eprintln!("{}: clean-up: {e}", server.target.name);
        }
    }
    let labels: Vec<&str> = kinds.iter().map(|k| k.label()).collect();
    print_depth1_table(config, &labels, &results);
}

impl<'a> Server<'a> {
    /// Mounts, makes the bench's directory (as root, then handed to the caller), and
    /// fills a fresh directory in it with `config.entries` empty files.
    async fn prepare(target: &'a Target, config: &Config) -> Result<Self, String> {
        let root = mount(target.mount, &target.path).await?;
        let mut conn = connect_nfs(target.nfs).await?;
        let base = mkdir(&mut conn, &root, &base_name()).await?;
        let uid = config.uid;
        if uid != 0 {
            let args = SETATTR3args {
                object: base.clone(),
                new_attributes: sattr3 {
                    uid: Nfs3Option::Some(uid),
                    gid: Nfs3Option::Some(uid),
                    ..sattr3::default()
                },
                guard: Nfs3Option::None,
            };
            nfs("SETATTR (chown)", conn.setattr(&args)).await?;
            conn = connect_nfs_as(target.nfs, uid).await?;
        }
        let pop_dir = mkdir(&mut conn, &base, POP_DIR).await?;
        let mut pop = Vec::new();
        for i in 0..config.entries {
            let name = format!("p{i:06}");
            create(&mut conn, &pop_dir, &name).await?;
            let res = lookup(&mut conn, &pop_dir, &name).await?;
            let Nfs3Option::Some(attr) = res.obj_attributes else {
                return Err(format!("LOOKUP {name}: no attributes in the reply"));
            };
            pop.push(PopFile {
                name,
                fh: res.object,
                fileid: attr.fileid,
            });
        }
        Ok(Server {
            target,
            root,
            base,
            uid,
            pop_dir,
            pop,
        })
    }

    /// Removes the population and the bench's directory (untimed).
    async fn finish(&self) -> Result<(), String> {
        let mut conn = connect_nfs(self.target.nfs).await?;
        for f in &self.pop {
            let args = REMOVE3args {
                object: dirop(&self.pop_dir, &f.name),
            };
            nfs("REMOVE", conn.remove(&args)).await?;
        }
        for (dir, name) in [(&self.base, POP_DIR), (&self.root, &base_name())] {
            let args = RMDIR3args {
                object: dirop(dir, name),
            };
            nfs("RMDIR", conn.rmdir(&args)).await?;
        }
        Ok(())
    }

    fn pop_file(&self, i: u64) -> &PopFile {
        &self.pop[(i % self.pop.len() as u64) as usize]
    }
}

impl Rep {
    /// A fresh connection and directory for repetition `rep_no` (0 = warm-up).
    async fn start(server: &Server<'_>, rep_no: usize) -> Result<Self, String> {
        let mut conn = connect_nfs_as(server.target.nfs, server.uid).await?;
        let tag = format!("rep{rep_no}");
        let dir = mkdir(&mut conn, &server.base, &tag).await?;
        Ok(Rep {
            conn,
            dir,
            tag,
            created: Vec::new(),
            created_ok: None,
            renamed_ok: None,
            removed: false,
            cursor: Cursor::default(),
            listed: 0,
            received: 0,
            verf: None,
            files: Vec::new(),
        })
    }

    /// Removes what the repetition made (untimed). After a failed row some names may
    /// remain, and the directory with them; the bench's temp tree goes at exit anyway.
    async fn finish(mut self, base: &nfs_fh3) {
        let mut names = std::mem::take(&mut self.files);
        let made = self.created.len() as u64;
        match (self.created_ok, self.renamed_ok, self.removed) {
            (Some(_), None, _) => names.extend((0..made).map(created_name)),
            (_, Some(_), false) => names.extend((0..made).map(renamed_name)),
            _ => {}
        }
        for name in names {
            let args = REMOVE3args {
                object: dirop(&self.dir, &name),
            };
            if let Err(e) = nfs("REMOVE", self.conn.remove(&args)).await {
                eprintln!("clean-up of {}/{name}: {e}", self.tag);
            }
        }
        let args = RMDIR3args {
            object: dirop(base, &self.tag),
        };
        if let Err(e) = nfs("RMDIR", self.conn.rmdir(&args)).await {
            eprintln!("clean-up of {}: {e}", self.tag);
        }
    }
}

/// The directory of the read-only rows' files, in the bench's directory.
const POP_DIR: &str = "pop";

/// The bench's directory in the export root.
fn base_name() -> String {
    format!("nfsbench-d1-{}", std::process::id())
}

fn created_name(i: u64) -> String {
    format!("c{i:06}")
}

fn renamed_name(i: u64) -> String {
    format!("r{i:06}")
}

/// Runs `count` calls of `kind` one at a time, timing each, with the server's CPU
/// time over the row. Set-up the row needs (a file to write) is not timed.
async fn run_row(
    server: &Server<'_>,
    rep: &mut Rep,
    kind: Kind,
    count: u64,
) -> Result<LatencySample, String> {
    let count = match kind {
        Kind::Setattr | Kind::Rename => rep
            .created_ok
            .ok_or("skipped: needs the CREATE row, which failed or was not run")?,
        Kind::Remove => rep
            .renamed_ok
            .ok_or("skipped: needs the RENAME row, which failed or was not run")?,
        _ => count,
    };
    let file = match kind {
        Kind::Commit | Kind::WriteSync => {
            let name = if kind == Kind::Commit {
                "commit.dat"
            } else {
                "sync.dat"
            };
            let fh = create(&mut rep.conn, &rep.dir, name).await?;
            rep.files.push(name.to_owned());
            Some(fh)
        }
        _ => None,
    };
    rep.cursor = Cursor::default();
    rep.listed = 0;
    rep.received = 0;
    rep.verf = None;
    let data = pattern(BLOCK);
    let mut latencies = Vec::with_capacity(usize::try_from(count).unwrap_or(0));
    let run = row(server.target.pid, async {
        let start = Instant::now();
        for i in 0..count {
            latencies.push(one_call(server, rep, kind, i, file.as_ref(), &data).await?);
        }
        Ok(Measured {
            elapsed: start.elapsed(),
            ops: count,
        })
    })
    .await?;
    match kind {
        Kind::Create => rep.created_ok = Some(count),
        Kind::Rename => rep.renamed_ok = Some(count),
        Kind::Remove => rep.removed = true,
        Kind::Commit | Kind::WriteSync => {
            let object = file.ok_or("no file")?;
            let attr = nfs("GETATTR", rep.conn.getattr(&GETATTR3args { object })).await?;
            let size = attr.obj_attributes.size;
            if size != count * BLOCK {
                return Err(format!(
                    "after {count} acknowledged {BLOCK}-byte writes the file has {size} bytes"
                ));
            }
        }
        _ => {}
    }
    latencies.sort_unstable();
    // Servers fill a page differently (RFC 1813 §3.3.17 leaves it to them), so a call
    // is not the same work everywhere.
    let note = (kind == Kind::Readdirplus && count > 0)
        .then(|| format!("{:.0} entries/call", rep.received as f64 / count as f64));
    Ok(LatencySample {
        note,
        ops_per_s: run.measured.per_second(),
        p50: percentile(&latencies, 50),
        p99: percentile(&latencies, 99),
        ops: count,
        cpu: run.cpu,
    })
}

/// Nearest-rank percentile of sorted `values`.
fn percentile(sorted: &[Duration], p: usize) -> Duration {
    let rank = (sorted.len() * p).div_ceil(100).max(1);
    sorted.get(rank - 1).copied().unwrap_or_default()
}
