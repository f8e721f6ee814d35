//! The two sides of the noisy-neighbour bench over `nfs3_client` (one connection is one
//! call in flight, as in `nfs_workload`):
//!
//! - the **victim** on volume A, one connection, one call at a time: 4 KiB reads at
//!   random offsets of a 16 MiB file for a few seconds, then a serial create + 4 KiB
//!   write + COMMIT of [`VICTIM_FILES`] files, GETATTR of each ([`STAT_PASSES`] passes),
//!   and REMOVE of each. Each row is calls (or files) per second.
//! - an **aggressor** ([`Flood`]) on volume B: [`FLOOD_CLIENTS`] clients, each with its
//!   own file and `depth` connections: 1 MiB UNSTABLE writes sequentially through a
//!   256 MiB file (COMMIT at each wrap, as a streaming writer's `fsync` would), or 4 KiB
//!   reads at random offsets of a 64 MiB file. It runs until stopped and counts what
//!   completed, so its rate over any window can be read.
//!
//! Every call has a timeout (`client::nfs`), so a starved call fails its row rather
//! than hanging the run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nfs3_types::nfs3::{GETATTR3args, READ3args, REMOVE3args, RMDIR3args, nfs_fh3};
use tokio::task::JoinHandle;

use crate::child::Probe;
use crate::client::{Conn, commit, connect_nfs, create, dirop, lookup, mkdir, mount, nfs, write};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4 * KIB;
/// The victim's read file.
const VICTIM_READ_FILE: u64 = 16 * MIB;
/// How long the victim's read row runs.
const VICTIM_READ_TIME: Duration = Duration::from_secs(3);
/// Files of the victim's create, stat and unlink rows.
pub const VICTIM_FILES: u64 = 400;
/// GETATTR passes over the victim's files (one pass of 400 takes a few ms alone).
const STAT_PASSES: u64 = 5;
/// Clients of each aggressor, each with a file of its own.
pub const FLOOD_CLIENTS: usize = 4;
const WRITE_FLOOD_FILE: u64 = 256 * MIB;
const READ_FLOOD_FILE: u64 = 64 * MIB;

/// Where one volume is: an NFS server, an export, and optionally a directory in it
/// (Ganesha exports one directory holding both volumes' directories).
#[derive(Clone)]
pub struct Volume {
    pub nfs: SocketAddr,
    pub mount: SocketAddr,
    pub export: String,
    pub subdir: Option<String>,
}

impl Volume {
    /// The volume's root handle.
    pub async fn root(&self, conn: &mut Conn) -> Result<nfs_fh3, String> {
        let root = mount(self.mount, &self.export).await?;
        match &self.subdir {
            None => Ok(root),
            Some(d) => Ok(lookup(conn, &root, d).await?.object),
        }
    }
}

/// Deterministic bytes no layer can compress.
fn pattern(len: u64) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A cheap pseudo-random sequence for read offsets.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Creates `name` in `dir` and writes `size` bytes of pattern to it in 1 MiB UNSTABLE
/// writes, then COMMITs (untimed set-up).
async fn write_file(conn: &mut Conn, dir: &nfs_fh3, name: &str, size: u64) -> Result<(), String> {
    let fh = create(conn, dir, name).await?;
    let data = pattern(MIB);
    let mut offset = 0;
    while offset < size {
        let n = (size - offset).min(MIB);
        let part = data
            .get(..usize::try_from(n).map_err(|e| e.to_string())?)
            .ok_or("pattern too short")?;
        write(conn, &fh, offset, part).await?;
        offset += n;
    }
    commit(conn, &fh, None).await
}

/// Writes the victim's read file on `a` (untimed).
pub async fn prepare_victim(a: &Volume) -> Result<(), String> {
    let mut conn = connect_nfs(a.nfs).await?;
    let root = a.root(&mut conn).await?;
    write_file(&mut conn, &root, "victim.dat", VICTIM_READ_FILE).await
}

/// Creates the write flood's files on `b` and, if `reads`, writes the read flood's
/// (untimed).
pub async fn prepare_floods(b: &Volume, reads: bool) -> Result<(), String> {
    let mut conn = connect_nfs(b.nfs).await?;
    let root = b.root(&mut conn).await?;
    for c in 0..FLOOD_CLIENTS {
        if reads {
            write_file(
                &mut conn,
                &root,
                &format!("read-flood-{c}"),
                READ_FLOOD_FILE,
            )
            .await?;
        }
        // The write flood overwrites these; created now so each run starts alike.
        create(&mut conn, &root, &format!("write-flood-{c}")).await?;
    }
    Ok(())
}

/// One row of one victim pass: its rate and where its calls' time went (see `child`).
#[derive(Clone, Copy, Debug, Default)]
pub struct RowSample {
    /// Calls (files) per second.
    pub rate: f64,
    /// The client's time per call.
    pub round_trip_us: f64,
    /// The agent's time per call on the victim's volume, received → reply ready
    /// (NaN for Ganesha).
    pub agent_us: f64,
    /// Of which waiting for a pool worker.
    pub queued_us: f64,
    /// CPU used during the row, in cores: the server, the victim's process, the
    /// flood's process.
    pub server_cores: f64,
    pub victim_cores: f64,
    pub flood_cores: f64,
}

/// One victim pass: its rows in the order of [`VICTIM_ROWS`].
pub type VictimSample = [RowSample; 4];

/// The victim's rows, in order.
pub const VICTIM_ROWS: [&str; 4] = [
    "4 KiB read, depth 1",
    "create + 4 KiB write",
    "stat",
    "unlink",
];

/// Runs the victim's rows once on `a`, in a directory named `tag`, with `probe`'s
/// counters taken around each row.
pub async fn victim(a: &Volume, tag: &str, probe: &Probe) -> Result<VictimSample, String> {
    let mut c = connect_nfs(a.nfs).await?;
    let root = a.root(&mut c).await?;
    let file = lookup(&mut c, &root, "victim.dat").await?.object;
    // The volume's name in the agent's metrics (localnfs exports `/<name>`).
    let name = a.export.trim_start_matches('/');
    let mut rows = VictimSample::default();

    let before = probe.snap(name).await;

    let mut rng = 0x2545_F491_4F6C_DD1D ^ tag.len() as u64;
    let start = Instant::now();
    let mut reads = 0u64;
    while start.elapsed() < VICTIM_READ_TIME {
        let offset = next_random(&mut rng) % (VICTIM_READ_FILE / BLOCK) * BLOCK;
        let args = READ3args {
            file: file.clone(),
            offset,
            count: BLOCK as u32,
        };
        let res = nfs("READ", c.read(&args)).await?;
        if res.data.len() as u64 != BLOCK {
            return Err(format!("READ at {offset}: {} bytes", res.data.len()));
        }
        reads += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    rows[0] = before.row(&probe.snap(name).await, reads, reads as f64 / secs, secs);

    let dir = mkdir(&mut c, &root, tag).await?;
    let data = pattern(BLOCK);
    let before = probe.snap(name).await;
    let start = Instant::now();
    let mut files = Vec::new();
    for i in 0..VICTIM_FILES {
        // What a Linux client sends for `open(O_CREAT); write(4 KiB); fsync(); close()`.
        let fh = create(&mut c, &dir, &format!("f{i:04}")).await?;
        let verf = write(&mut c, &fh, 0, &data).await?;
        commit(&mut c, &fh, Some(verf)).await?;
        files.push(fh);
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = VICTIM_FILES as f64 / secs;
    rows[1] = before.row(&probe.snap(name).await, 3 * VICTIM_FILES, rate, secs);

    let before = probe.snap(name).await;
    let start = Instant::now();
    for _ in 0..STAT_PASSES {
        for fh in &files {
            let attr = nfs("GETATTR", c.getattr(&GETATTR3args { object: fh.clone() })).await?;
            if attr.obj_attributes.size != BLOCK {
                return Err(format!(
                    "GETATTR: size {} after a committed 4 KiB write",
                    attr.obj_attributes.size
                ));
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let calls = STAT_PASSES * VICTIM_FILES;
    rows[2] = before.row(&probe.snap(name).await, calls, calls as f64 / secs, secs);

    let before = probe.snap(name).await;
    let start = Instant::now();
    for i in 0..VICTIM_FILES {
        let name = format!("f{i:04}");
        nfs(
            "REMOVE",
            c.remove(&REMOVE3args {
                object: dirop(&dir, &name),
            }),
        )
        .await?;
    }
    let secs = start.elapsed().as_secs_f64();
    let rate = VICTIM_FILES as f64 / secs;
    rows[3] = before.row(&probe.snap(name).await, VICTIM_FILES, rate, secs);
    nfs(
        "RMDIR",
        c.rmdir(&RMDIR3args {
            object: dirop(&root, tag),
        }),
    )
    .await?;
    Ok(rows)
}

/// Which aggressor.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// 1 MiB sequential UNSTABLE writes, 16 in flight per client.
    Write,
    /// 4 KiB random reads, 64 in flight per client.
    Read,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::Write, Kind::Read];

    fn depth(self) -> usize {
        match self {
            Kind::Write => 16,
            Kind::Read => 64,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Write => "write flood",
            Kind::Read => "read flood",
        }
    }

    /// The unit of [`Flood::rate`].
    pub fn unit(self) -> &'static str {
        match self {
            Kind::Write => "MB/s",
            Kind::Read => "IOPS",
        }
    }
}

/// A running aggressor; see the module docs.
pub struct Flood {
    kind: Kind,
    stop: Arc<AtomicBool>,
    /// Calls completed so far, all clients together.
    calls: Arc<AtomicU64>,
    workers: Vec<JoinHandle<Result<(), String>>>,
    /// Each client's file and one connection to COMMIT it with when stopping.
    files: Vec<nfs_fh3>,
    conn: Conn,
}

/// A count of a flood's completed calls at one moment.
#[derive(Clone, Copy)]
pub struct Mark {
    calls: u64,
    at: Instant,
}

impl Flood {
    /// Connects every client and starts them on the current runtime.
    pub async fn start(b: &Volume, kind: Kind) -> Result<Flood, String> {
        let mut conn = connect_nfs(b.nfs).await?;
        let root = b.root(&mut conn).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicU64::new(0));
        let data = Arc::new(pattern(MIB));
        let mut workers = Vec::new();
        let mut files = Vec::new();
        for client in 0..FLOOD_CLIENTS {
            let name = match kind {
                Kind::Write => format!("write-flood-{client}"),
                Kind::Read => format!("read-flood-{client}"),
            };
            let file = lookup(&mut conn, &root, &name).await?.object;
            files.push(file.clone());
            // The client's next 1 MiB chunk: its writes go through the file in order.
            let next = Arc::new(AtomicU64::new(0));
            for slot in 0..kind.depth() {
                let mut c = connect_nfs(b.nfs).await?;
                let (stop, calls, data, next, file) = (
                    stop.clone(),
                    calls.clone(),
                    data.clone(),
                    next.clone(),
                    file.clone(),
                );
                let mut rng = 0x9E37_79B9_7F4A_7C15 ^ ((client * 1000 + slot) as u64 + 1);
                workers.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match kind {
                            Kind::Write => {
                                let chunks = WRITE_FLOOD_FILE / MIB;
                                let i = next.fetch_add(1, Ordering::Relaxed);
                                write(&mut c, &file, i % chunks * MIB, &data).await?;
                                if i % chunks == chunks - 1 {
                                    commit(&mut c, &file, None).await?;
                                }
                            }
                            Kind::Read => {
                                let offset =
                                    next_random(&mut rng) % (READ_FLOOD_FILE / BLOCK) * BLOCK;
                                let args = READ3args {
                                    file: file.clone(),
                                    offset,
                                    count: BLOCK as u32,
                                };
                                nfs("READ", c.read(&args)).await?;
                            }
                        }
                        calls.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                }));
            }
        }
        Ok(Flood {
            kind,
            stop,
            calls,
            workers,
            files,
            conn,
        })
    }

    pub fn mark(&self) -> Mark {
        Mark {
            calls: self.calls.load(Ordering::Relaxed),
            at: Instant::now(),
        }
    }

    /// The rate between `since` and now, in [`Kind::unit`].
    pub fn rate(&self, since: Mark) -> f64 {
        let now = self.mark();
        let per_second =
            now.calls.saturating_sub(since.calls) as f64 / (now.at - since.at).as_secs_f64();
        match self.kind {
            Kind::Write => per_second * MIB as f64 / 1e6,
            Kind::Read => per_second,
        }
    }

    /// Stops every client after its call in flight, then (write flood) COMMITs each
    /// file, so the next measurement does not start behind this one's dirty data.
    pub async fn stop(mut self) -> Result<(), String> {
        self.stop.store(true, Ordering::Relaxed);
        let mut first_error = None;
        for w in self.workers.drain(..) {
            match w.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error.get_or_insert(format!("flood client failed: {e}"));
                }
            }
        }
        if self.kind == Kind::Write {
            for f in &self.files {
                commit(&mut self.conn, f, None).await?;
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Runs `kind` alone on `b` for `secs` after `warm_up`; its rate.
pub async fn flood_alone(
    b: &Volume,
    kind: Kind,
    warm_up: Duration,
    secs: Duration,
) -> Result<f64, String> {
    let flood = Flood::start(b, kind).await?;
    tokio::time::sleep(warm_up).await;
    let mark = flood.mark();
    tokio::time::sleep(secs).await;
    let rate = flood.rate(mark);
    flood.stop().await?;
    Ok(rate)
}
