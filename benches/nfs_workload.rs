//! One NFSv3 workload against several servers in the same run, printed as one markdown
//! table: sequential 1 MiB write/read, 4 KiB random read, small-file create, GETATTR,
//! READDIRPLUS listing and REMOVE, each repeated (default 3×) and reported as median,
//! min and max, with the server's CPU time (utime + stime from `/proc/PID/stat`).
//!
//! Run through `bench/nfs-vs-ganesha`, which starts `localnfs node --standalone` and
//! NFS-Ganesha and passes them here:
//! `cargo bench --bench nfs_workload -- --server NAME=HOST:NFSPORT:MOUNTPORT:/path[:PID]`.
//! Besides the table it draws the rows as an SVG chart (`--svg PATH`, default
//! `bench/nfs-vs-ganesha.svg`).
//!
//! `--depth1` runs the depth-1 rows instead (`nfs_workload/depth1.rs`): one connection,
//! one call at a time, per metadata procedure and for 4 KiB FILE_SYNC writes, with p50
//! and p99 latency.
//!
//! "N in flight" means N client connections, each one call at a time (an `Nfs3Client`
//! has one outstanding call), driven concurrently. Every call has a timeout and every
//! row a count and time bound, so a stuck server fails a row instead of hanging.

#[path = "charts.rs"]
mod charts;
#[path = "nfs_workload/client.rs"]
mod client;
#[path = "nfs_workload/depth1.rs"]
mod depth1;
#[path = "nfs_workload/report.rs"]
mod report;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nfs3_types::nfs3::{GETATTR3args, READ3args, REMOVE3args, RMDIR3args, nfs_fh3, writeverf3};

use client::{Conn, commit, connect_nfs, create, dirop, list_dir, mkdir, mount, nfs, write};
use report::{ROWS, Sample, draw_chart, print_table};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Sequential I/O request size.
const CHUNK: u64 = MIB;
/// Random-read and small-file size.
const BLOCK: u64 = 4 * KIB;
const SEQ_DEPTH: usize = 8;
const META_DEPTH: usize = 16;
/// Upper bound on random reads, so that row is bounded by count as well as by time.
const RANDOM_MAX_OPS: u64 = 50_000_000;
const ROW_TIMEOUT: Duration = Duration::from_secs(600);

fn main() {
    let config = match parse_args(std::env::args().skip(1)) {
        Ok(Some(config)) => config,
        Ok(None) => {
            eprintln!(
                "nfs_workload: no --server given; nothing to measure (run bench/nfs-vs-ganesha)"
            );
            return;
        }
        Err(e) => {
            eprintln!("nfs_workload: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    if config.depth1 {
        depth1::run(&config);
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let mut results: Vec<Vec<Vec<Result<Sample, String>>>> = config
        .servers
        .iter()
        .map(|_| ROWS.iter().map(|_| Vec::new()).collect())
        .collect();
    // Servers take turns within each repetition, in rotating order, so whatever the
    // machine does meanwhile (page cache, memory the VM touches for the first time,
    // other load) falls on all of them alike.
    // One untimed sequential write per server first: the first gigabyte a run writes
    // lands on memory the VM may never have touched, several times slower.
    for target in &config.servers {
        eprintln!("{}: warm-up write", target.name);
        if let Err(e) = rt.block_on(run_rep(target, &config, 0, &mut Vec::new())) {
            eprintln!("{}: warm-up failed: {e}", target.name);
        }
    }
    let n = config.servers.len();
    for rep in 1..=config.reps {
        for turn in 0..n {
            let i = (turn + rep - 1) % n;
            let target = &config.servers[i];
            let rows = &mut results[i];
            eprintln!("{}: repetition {rep}/{}", target.name, config.reps);
            let mut done = Vec::new();
            let outcome = rt.block_on(run_rep(target, &config, rep, &mut done));
            let completed = done.len();
            for (row, sample) in done.into_iter().enumerate() {
                rows[row].push(Ok(sample));
            }
            if let Err(e) = outcome {
                eprintln!("{}: {} failed: {e}", target.name, ROWS[completed].label);
                rows[completed].push(Err(e));
                for later in rows.iter_mut().skip(completed + 1) {
                    later.push(Err("skipped (an earlier row failed)".into()));
                }
            }
        }
    }
    print_table(&config, &results);
    let svg = charts::svg_path("nfs-vs-ganesha.svg");
    match draw_chart(&config, &results, &svg) {
        Ok(()) => eprintln!("nfs_workload: chart written to {}", svg.display()),
        Err(e) => eprintln!("nfs_workload: {e}"),
    }
}

const USAGE: &str = "usage: nfs_workload --server NAME=HOST:NFSPORT:MOUNTPORT:/export[:PID] \
[--server ...] [--reps N] [--file-mib N] [--files N] [--random-secs N] [--svg PATH] \
| ... --depth1 [--reps N] [--ops N] [--entries N] [--uid N] \
[--only lookup,getattr,access,readdirplus,create,setattr,rename,remove,commit,write]";

/// One server under test.
struct Target {
    name: String,
    nfs: SocketAddr,
    mount: SocketAddr,
    path: String,
    /// Server process whose CPU time is sampled around each row.
    pid: Option<u32>,
}

struct Config {
    servers: Vec<Target>,
    reps: usize,
    file_bytes: u64,
    files: u64,
    random_for: Duration,
    /// Run the depth-1 rows instead of the default ones.
    depth1: bool,
    /// Calls per depth-1 row (10× for the cheapest).
    ops: u64,
    /// Files in the directory the depth-1 read-only rows visit and list.
    entries: u64,
    /// The depth-1 rows to run (by `Kind::name`); empty = all.
    only: Vec<String>,
    /// The depth-1 rows' caller (AUTH_SYS uid = gid = its one group); 0 = root.
    uid: u32,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Option<Config>, String> {
    let mut config = Config {
        servers: Vec::new(),
        reps: 3,
        file_bytes: 1024 * MIB,
        files: 5_000,
        random_for: Duration::from_secs(10),
        depth1: false,
        ops: 2_000,
        entries: 3_000,
        uid: 0,
        only: Vec::new(),
    };
    let mut args = args;
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().ok_or(format!("{flag} needs a value"));
        let number = |flag: &str, v: String| {
            v.parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or(format!("{flag}: `{v}` is not a positive number"))
        };
        match arg.as_str() {
            // `cargo bench` passes this to every bench binary.
            "--bench" => {}
            "--server" => config.servers.push(parse_target(&value("--server")?)?),
            "--reps" => {
                let n = number("--reps", value("--reps")?)?;
                config.reps = usize::try_from(n).map_err(|e| e.to_string())?;
            }
            // Read by `charts::svg_path`.
            "--svg" => {
                value("--svg")?;
            }
            "--file-mib" => config.file_bytes = number(&arg, value(&arg)?)? * MIB,
            "--files" => config.files = number(&arg, value(&arg)?)?,
            "--random-secs" => {
                config.random_for = Duration::from_secs(number(&arg, value(&arg)?)?);
            }
            "--depth1" => config.depth1 = true,
            "--ops" => config.ops = number(&arg, value(&arg)?)?,
            "--entries" => config.entries = number(&arg, value(&arg)?)?,
            "--only" => {
                for name in value(&arg)?.split(',') {
                    if !depth1::Kind::ALL.iter().any(|k| k.name() == name) {
                        return Err(format!("--only: no depth-1 row `{name}`"));
                    }
                    config.only.push(name.to_owned());
                }
            }
            "--uid" => {
                let n = number(&arg, value(&arg)?)?;
                config.uid = u32::try_from(n).map_err(|e| e.to_string())?;
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok((!config.servers.is_empty()).then_some(config))
}

/// `NAME=HOST:NFSPORT:MOUNTPORT:/export[:PID]`.
fn parse_target(spec: &str) -> Result<Target, String> {
    let bad = |why: &str| format!("--server `{spec}`: {why}");
    let (name, rest) = spec.split_once('=').ok_or_else(|| bad("missing NAME="))?;
    let mut parts = rest.splitn(4, ':');
    let (Some(host), Some(nfs_port), Some(mount_port), Some(tail)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad("expected HOST:NFSPORT:MOUNTPORT:/export"));
    };
    let host: IpAddr = host.parse().map_err(|_| bad("HOST is not an IP address"))?;
    let port = |p: &str| p.parse::<u16>().map_err(|_| bad("bad port"));
    let (path, pid) = match tail.rsplit_once(':') {
        Some((path, pid)) if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) => {
            (path, Some(pid.parse().map_err(|_| bad("bad PID"))?))
        }
        _ => (tail, None),
    };
    if !path.starts_with('/') {
        return Err(bad("the export path must start with /"));
    }
    Ok(Target {
        name: name.to_owned(),
        nfs: SocketAddr::new(host, port(nfs_port)?),
        mount: SocketAddr::new(host, port(mount_port)?),
        path: path.to_owned(),
        pid,
    })
}

/// A finished row before CPU accounting.
struct Measured {
    elapsed: Duration,
    ops: u64,
}

impl Measured {
    fn per_second(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// Decimal MB/s of a row whose operations each move one [`CHUNK`].
    fn mb_per_second(&self) -> f64 {
        self.per_second() * CHUNK as f64 / 1e6
    }

    fn seconds(&self) -> f64 {
        self.elapsed.as_secs_f64()
    }
}

/// One repetition: every row in order, on fresh connections and fresh names. Each
/// completed row is pushed to `out`; the first failure ends the repetition.
/// Repetition 0 is the warm-up: the sequential write only.
async fn run_rep(
    target: &Target,
    config: &Config,
    rep: usize,
    out: &mut Vec<Sample>,
) -> Result<(), String> {
    let root = mount(target.mount, &target.path).await?;
    let mut conns = Vec::with_capacity(META_DEPTH);
    for _ in 0..META_DEPTH {
        conns.push(connect_nfs(target.nfs).await?);
    }
    let tag = format!("nfsbench-{}-{rep}", std::process::id());
    let dir = mkdir(&mut conns[0], &root, &tag).await?;
    let big_name = format!("{tag}.dat");
    let file = create(&mut conns[0], &root, &big_name).await?;
    let shared = Arc::new(Shared {
        file,
        file_bytes: config.file_bytes,
        dir,
        pattern: pattern(CHUNK),
        verf: Mutex::new(None),
        files: Mutex::new(vec![
            None;
            usize::try_from(config.files).expect("file count")
        ]),
        seed: rep as u64,
    });
    let chunks = config.file_bytes / CHUNK;
    let pid = target.pid;

    let m = row(pid, async {
        let start = Instant::now();
        let ops = run_parallel(&mut conns, &shared, Op::SeqWrite, chunks, None).await?;
        commit(&mut conns[0], &shared.file, shared.write_verf()).await?;
        Ok(Measured {
            elapsed: start.elapsed(),
            ops,
        })
    })
    .await?;
    out.push(m.sample(Measured::mb_per_second));
    if rep == 0 {
        return remove_rep_files(&mut conns[0], &root, &tag, &big_name).await;
    }

    let m = parallel_row(&mut conns, &shared, pid, Op::SeqRead, chunks, None).await?;
    out.push(m.sample(Measured::mb_per_second));

    let dropped = drop_page_cache();
    let m = parallel_row(&mut conns, &shared, pid, Op::SeqRead, chunks, None).await?;
    let mut sample = m.sample(Measured::mb_per_second);
    sample.note = dropped
        .err()
        .map(|e| format!("page cache NOT dropped: {e}"));
    out.push(sample);

    let limit = Some(config.random_for);
    let m = parallel_row(
        &mut conns,
        &shared,
        pid,
        Op::RandomRead,
        RANDOM_MAX_OPS,
        limit,
    );
    out.push(m.await?.sample(Measured::per_second));

    for op in [Op::CreateFile, Op::Getattr] {
        let m = parallel_row(&mut conns, &shared, pid, op, config.files, None).await?;
        out.push(m.sample(Measured::per_second));
    }

    let m = row(pid, async {
        let start = Instant::now();
        let entries = list_dir(&mut conns[0], &shared.dir).await?;
        if entries != config.files {
            return Err(format!(
                "READDIRPLUS listed {entries} files, expected {}",
                config.files
            ));
        }
        Ok(Measured {
            elapsed: start.elapsed(),
            ops: entries,
        })
    })
    .await?;
    out.push(m.sample(Measured::seconds));

    let m = parallel_row(&mut conns, &shared, pid, Op::Remove, config.files, None).await?;
    out.push(m.sample(Measured::per_second));

    remove_rep_files(&mut conns[0], &root, &tag, &big_name).await
}

/// Leaves the export as the repetition found it (not timed).
async fn remove_rep_files(
    c: &mut Conn,
    root: &nfs_fh3,
    tag: &str,
    big: &str,
) -> Result<(), String> {
    let rmdir = RMDIR3args {
        object: dirop(root, tag),
    };
    nfs("RMDIR", c.rmdir(&rmdir)).await?;
    let remove = REMOVE3args {
        object: dirop(root, big),
    };
    nfs("REMOVE", c.remove(&remove)).await?;
    Ok(())
}

/// A row that is `count` operations of `op` (or as many as fit in `limit`).
async fn parallel_row(
    conns: &mut Vec<Conn>,
    shared: &Arc<Shared>,
    pid: Option<u32>,
    op: Op,
    count: u64,
    limit: Option<Duration>,
) -> Result<RowRun, String> {
    row(pid, async {
        let start = Instant::now();
        let deadline = limit.map(|l| start + l);
        let ops = run_parallel(conns, shared, op, count, deadline).await?;
        Ok(Measured {
            elapsed: start.elapsed(),
            ops,
        })
    })
    .await
}

/// A row's result with the server CPU time it cost.
struct RowRun {
    measured: Measured,
    cpu: Option<Duration>,
}

impl RowRun {
    fn sample(&self, value: impl Fn(&Measured) -> f64) -> Sample {
        Sample {
            value: value(&self.measured),
            ops: self.measured.ops,
            cpu: self.cpu,
            note: None,
        }
    }
}

/// Runs one row under [`ROW_TIMEOUT`], sampling the server's CPU time around it.
async fn row(
    pid: Option<u32>,
    work: impl Future<Output = Result<Measured, String>>,
) -> Result<RowRun, String> {
    let before = pid.and_then(cpu_time);
    let measured = tokio::time::timeout(ROW_TIMEOUT, work)
        .await
        .map_err(|_| format!("row did not finish within {ROW_TIMEOUT:?}"))??;
    let after = pid.and_then(cpu_time);
    let cpu = before.zip(after).map(|(b, a)| a.saturating_sub(b));
    Ok(RowRun { measured, cpu })
}

/// utime + stime of a process (all its threads), fields 14 and 15 of `/proc/PID/stat`.
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after it start at 3.
    let mut fields = stat
        .get(stat.rfind(')')? + 1..)?
        .split_whitespace()
        .skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    let ticks = ticks_per_second()?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / f64::from(ticks),
    ))
}

/// Clock ticks per second, the unit of `/proc/PID/stat` CPU times.
fn ticks_per_second() -> Option<u32> {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u32::try_from(ticks).ok().filter(|t| *t > 0)
}

/// `sync; echo 3 > /proc/sys/vm/drop_caches` (needs root and a writable /proc/sys).
fn drop_page_cache() -> Result<(), String> {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").map_err(|e| e.to_string())
}

/// State the concurrent workers share within one repetition.
struct Shared {
    /// The big file of the sequential and random rows.
    file: nfs_fh3,
    file_bytes: u64,
    /// The directory holding the small files.
    dir: nfs_fh3,
    /// Every write sends (a prefix of) this, so byte `o` of the big file is
    /// `pattern[o % CHUNK]` and reads can be checked.
    pattern: Vec<u8>,
    /// The write verifier of the first reply; a change means the server restarted.
    verf: Mutex<Option<writeverf3>>,
    /// Small-file handles by index, filled by the create row.
    files: Mutex<Vec<Option<nfs_fh3>>>,
    seed: u64,
}

impl Shared {
    fn check_verf(&self, verf: writeverf3) -> Result<(), String> {
        client::check_verf(&mut self.verf.lock().expect("verifier lock"), verf)
    }

    fn write_verf(&self) -> Option<writeverf3> {
        *self.verf.lock().expect("verifier lock")
    }

    fn file_handle(&self, i: u64) -> Result<nfs_fh3, String> {
        let files = self.files.lock().expect("files lock");
        files
            .get(usize::try_from(i).map_err(|e| e.to_string())?)
            .cloned()
            .flatten()
            .ok_or(format!("no handle for file {i}"))
    }
}

#[derive(Clone, Copy)]
enum Op {
    SeqWrite,
    SeqRead,
    RandomRead,
    CreateFile,
    Getattr,
    Remove,
}

impl Op {
    /// Requests in flight: 1 MiB streams at 8, small operations at 16.
    fn depth(self) -> usize {
        match self {
            Op::SeqWrite | Op::SeqRead => SEQ_DEPTH,
            Op::RandomRead | Op::CreateFile | Op::Getattr | Op::Remove => META_DEPTH,
        }
    }
}

/// Performs operations `0..count` of `op` with [`Op::depth`] connections, each one call
/// at a time, until done or `deadline`. Returns how many completed; the first error
/// stops every worker.
async fn run_parallel(
    conns: &mut Vec<Conn>,
    shared: &Arc<Shared>,
    op: Op,
    count: u64,
    deadline: Option<Instant>,
) -> Result<u64, String> {
    let next = Arc::new(AtomicU64::new(0));
    let depth = op.depth().min(conns.len());
    let workers: Vec<_> = conns
        .drain(..depth)
        .map(|mut conn| {
            let (shared, next) = (shared.clone(), next.clone());
            tokio::spawn(async move {
                let mut done = 0;
                while deadline.is_none_or(|d| Instant::now() < d) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    if let Err(e) = do_op(&mut conn, &shared, op, i).await {
                        next.store(count, Ordering::Relaxed);
                        return Err(e);
                    }
                    done += 1;
                }
                Ok((conn, done))
            })
        })
        .collect();
    let mut total = 0;
    let mut first_error = None;
    for worker in workers {
        match worker.await {
            Ok(Ok((conn, done))) => {
                conns.push(conn);
                total += done;
            }
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(format!("worker failed: {e}"));
            }
        }
    }
    first_error.map_or(Ok(total), Err)
}

async fn do_op(conn: &mut Conn, s: &Shared, op: Op, i: u64) -> Result<(), String> {
    match op {
        Op::SeqWrite => {
            let verf = write(conn, &s.file, i * CHUNK, &s.pattern).await?;
            s.check_verf(verf)
        }
        Op::SeqRead => read_checked(conn, s, i * CHUNK, CHUNK).await,
        Op::RandomRead => {
            let blocks = s.file_bytes / BLOCK;
            let offset = splitmix64(s.seed.wrapping_mul(1 << 40) ^ i) % blocks * BLOCK;
            read_checked(conn, s, offset, BLOCK).await
        }
        Op::CreateFile => {
            // What a Linux client does for `open(O_CREAT); write(4 KiB); close()`.
            let fh = create(conn, &s.dir, &file_name(i)).await?;
            let data = &s.pattern[..BLOCK as usize];
            let verf = write(conn, &fh, 0, data).await?;
            commit(conn, &fh, Some(verf)).await?;
            let mut files = s.files.lock().expect("files lock");
            files[usize::try_from(i).map_err(|e| e.to_string())?] = Some(fh);
            Ok(())
        }
        Op::Getattr => {
            let object = s.file_handle(i)?;
            let attr = nfs("GETATTR", conn.getattr(&GETATTR3args { object })).await?;
            if attr.obj_attributes.size == BLOCK {
                Ok(())
            } else {
                Err(format!(
                    "GETATTR of file {i}: size {} after a committed {BLOCK}-byte write",
                    attr.obj_attributes.size
                ))
            }
        }
        Op::Remove => {
            let name = file_name(i);
            nfs(
                "REMOVE",
                conn.remove(&REMOVE3args {
                    object: dirop(&s.dir, &name),
                }),
            )
            .await?;
            Ok(())
        }
    }
}

fn file_name(i: u64) -> String {
    format!("f{i:06}")
}

/// Reads `count` bytes at `offset` of the big file and checks them against the pattern.
async fn read_checked(conn: &mut Conn, s: &Shared, offset: u64, count: u64) -> Result<(), String> {
    let args = READ3args {
        file: s.file.clone(),
        offset,
        count: u32::try_from(count).map_err(|e| e.to_string())?,
    };
    let res = nfs("READ", conn.read(&args)).await?;
    let start = usize::try_from(offset % CHUNK).map_err(|e| e.to_string())?;
    let expected = s
        .pattern
        .get(start..start + args.count as usize)
        .ok_or("read crosses a pattern boundary")?;
    if res.data.as_ref() == expected {
        Ok(())
    } else {
        Err(format!(
            "READ at {offset}: got {} bytes that differ from what was written",
            res.data.len()
        ))
    }
}

/// Deterministic non-repeating-looking bytes, so no layer can compress or dedupe them.
fn pattern(len: u64) -> Vec<u8> {
    (0..len.div_ceil(8))
        .flat_map(|i| splitmix64(i).to_le_bytes())
        .take(usize::try_from(len).expect("pattern length"))
        .collect()
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
