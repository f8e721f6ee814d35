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

use std::future::Future;
use std::time::{Duration, Instant};

use nfs3_types::nfs3::{
    ACCESS3_EXECUTE, ACCESS3_EXTEND, ACCESS3_MODIFY, ACCESS3_READ, ACCESS3args, GETATTR3args,
    Nfs3Option, REMOVE3args, RENAME3args, RMDIR3args, SETATTR3args, fattr3, ftype3, nfs_fh3,
    post_op_attr, sattr3, stable_how, writeverf3,
};

use super::client::{
    Conn, Cursor, commit, connect_nfs, connect_nfs_as, create, dirop, lookup, mkdir, mount, nfs,
    readdirplus_page, write, write_stable,
};
use super::report::{LatencySample, print_depth1_table};
use super::{BLOCK, Config, Measured, Target, pattern, row};

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

/// The mode SETATTR sets (CREATE makes files 0644, so every call changes it).
const CHMOD_TO: u32 = 0o600;

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

/// Awaits `call`, returning its output and how long it took.
async fn timed<T>(call: impl Future<Output = T>) -> (T, Duration) {
    let start = Instant::now();
    let out = call.await;
    (out, start.elapsed())
}

/// Call `i` of a row: returns the time of the call the row is named for.
async fn one_call(
    server: &Server<'_>,
    rep: &mut Rep,
    kind: Kind,
    i: u64,
    file: Option<&nfs_fh3>,
    data: &[u8],
) -> Result<Duration, String> {
    let conn = &mut rep.conn;
    match kind {
        Kind::Lookup => {
            let f = server.pop_file(i);
            let (res, took) = timed(lookup(conn, &server.pop_dir, &f.name)).await;
            let res = res?;
            let same = match &res.obj_attributes {
                Nfs3Option::Some(attr) => attr.fileid == f.fileid,
                Nfs3Option::None => res.object == f.fh,
            };
            if !same {
                return Err(format!("LOOKUP {}: a different file", f.name));
            }
            Ok(took)
        }
        Kind::Getattr => {
            let f = server.pop_file(i);
            let args = GETATTR3args {
                object: f.fh.clone(),
            };
            let (res, took) = timed(nfs("GETATTR", conn.getattr(&args))).await;
            let attr = res?.obj_attributes;
            if attr.fileid != f.fileid || attr.type_ != ftype3::NF3REG || attr.size != 0 {
                return Err(format!(
                    "GETATTR {}: fileid {} type {:?} size {}, expected fileid {} empty file",
                    f.name, attr.fileid, attr.type_, attr.size, f.fileid
                ));
            }
            Ok(took)
        }
        Kind::Access => {
            let f = server.pop_file(i);
            // What the Linux client asks for a regular file.
            let asked = ACCESS3_READ | ACCESS3_MODIFY | ACCESS3_EXTEND | ACCESS3_EXECUTE;
            let args = ACCESS3args {
                object: f.fh.clone(),
                access: asked,
            };
            let (res, took) = timed(nfs("ACCESS", conn.access(&args))).await;
            let granted = res?.access;
            // The owner (or root, not squashed) of a 0644 file may read and write it.
            let needed = ACCESS3_READ | ACCESS3_MODIFY | ACCESS3_EXTEND;
            if granted & needed != needed {
                return Err(format!(
                    "ACCESS {}: granted {granted:#x} of {asked:#x}; root may read and write it",
                    f.name
                ));
            }
            Ok(took)
        }
        Kind::Readdirplus => {
            let (res, took) = timed(readdirplus_page(conn, &server.pop_dir, &mut rep.cursor)).await;
            let (entries, eof) = res?;
            rep.listed += entries;
            rep.received += entries;
            let expected = server.pop.len() as u64;
            if rep.listed > expected || (eof && rep.listed != expected) {
                return Err(format!(
                    "READDIRPLUS listed {}{} of {expected} files",
                    rep.listed,
                    if eof { " (EOF)" } else { " so far" }
                ));
            }
            if eof {
                rep.cursor = Cursor::default();
                rep.listed = 0;
            }
            Ok(took)
        }
        Kind::Create => {
            let (fh, took) = timed(create(conn, &rep.dir, &created_name(i))).await;
            rep.created.push(fh?);
            Ok(took)
        }
        Kind::Setattr => {
            let fh = rep.created.get(i as usize).ok_or("no handle")?;
            let args = SETATTR3args {
                object: fh.clone(),
                new_attributes: sattr3 {
                    mode: Nfs3Option::Some(CHMOD_TO),
                    ..sattr3::default()
                },
                guard: Nfs3Option::None,
            };
            let (res, took) = timed(nfs("SETATTR", conn.setattr(&args))).await;
            if let Some(attr) = attributes(&res?.obj_wcc.after)
                && attr.mode & 0o7777 != CHMOD_TO
            {
                return Err(format!(
                    "SETATTR mode {CHMOD_TO:o}: reply says {:o}",
                    attr.mode & 0o7777
                ));
            }
            Ok(took)
        }
        Kind::Rename => {
            let (from, to) = (created_name(i), renamed_name(i));
            let args = RENAME3args {
                from: dirop(&rep.dir, &from),
                to: dirop(&rep.dir, &to),
            };
            let (res, took) = timed(nfs("RENAME", conn.rename(&args))).await;
            res?;
            Ok(took)
        }
        Kind::Remove => {
            let name = renamed_name(i);
            let args = REMOVE3args {
                object: dirop(&rep.dir, &name),
            };
            let (res, took) = timed(nfs("REMOVE", conn.remove(&args))).await;
            res?;
            Ok(took)
        }
        Kind::Commit => {
            let fh = file.ok_or("no file")?;
            // The write is not timed: this row is the COMMIT a kernel client sends on
            // fsync after buffered writes.
            let verf = write(conn, fh, i * BLOCK, &data[..BLOCK as usize]).await?;
            check_verf(&mut rep.verf, verf)?;
            let (res, took) = timed(commit(conn, fh, Some(verf))).await;
            res?;
            Ok(took)
        }
        Kind::WriteSync => {
            let fh = file.ok_or("no file")?;
            let call = write_stable(
                conn,
                fh,
                i * BLOCK,
                &data[..BLOCK as usize],
                stable_how::FILE_SYNC,
            );
            let (verf, took) = timed(call).await;
            check_verf(&mut rep.verf, verf?)?;
            Ok(took)
        }
    }
}

fn attributes(attr: &post_op_attr) -> Option<&fattr3> {
    match attr {
        Nfs3Option::Some(a) => Some(a),
        Nfs3Option::None => None,
    }
}

/// The first verifier of a row is remembered; a later different one means the server
/// restarted and forgot unstable data.
fn check_verf(seen: &mut Option<writeverf3>, verf: writeverf3) -> Result<(), String> {
    match seen {
        Some(v) if *v != verf => Err("write verifier changed mid-row".into()),
        Some(_) => Ok(()),
        None => {
            *seen = Some(verf);
            Ok(())
        }
    }
}
