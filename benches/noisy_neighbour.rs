//! Noisy neighbour: how much one busy volume takes from another on the same server, for
//! localnfs and NFS-Ganesha 4.3 (VFS) in the same run, both serving two directories of
//! one disk (issue #24). Prints markdown tables:
//!
//! - the **victim** on volume A (`noisy_neighbour/load.rs`: 4 KiB reads at depth 1;
//!   create + 4 KiB write + COMMIT, GETATTR and REMOVE of 400 small files, one call at a
//!   time) alone, then with each **aggressor** on volume B (write flood: 4 clients × 16
//!   in flight of 1 MiB sequential UNSTABLE writes; read flood: 4 clients × 64 in flight
//!   of 4 KiB random reads), as ratios to alone;
//! - **MariaDB** sysbench `oltp_write_only` (4 threads) with its datadir on volume A,
//!   through the Linux kernel NFS client of a User-Mode Linux test node, alone and with
//!   each aggressor: TPS and p95 latency;
//! - each aggressor's own rate alone, during the victim's rows and during MariaDB;
//! - **where a victim call's time went** (`noisy_neighbour/child.rs`): per row, the
//!   client's round trip, the agent's own window and queue wait (its `/metrics`), and
//!   the CPU of the server, the victim's process and the flood's;
//! - **ceilings** (localnfs only): volume C with `writeBandwidth: 32Mi` under the write
//!   flood and volume D with `readIOPS: 2000` under the read flood, each alone: the
//!   measured rate against the ceiling.
//!
//! The victim runs in a process of its own (this binary, run again by
//! `child::victim_in_child`), the floods in this one: the table measures how the server
//! shares itself between volumes, not how one client process shares its threads.
//!
//! Repetitions take turns between the servers (first place rotating). Before each
//! measured window a flood runs 2 s untimed; after a write flood every file is
//! COMMITted, so the next row does not start behind its dirty data.
//!
//! Run as root (test network, test node, Ganesha):
//! `cargo bench --bench noisy_neighbour` (2 repetitions, ~11 min), or shorter:
//! `cargo bench --bench noisy_neighbour -- --reps 1 --only victim --servers localnfs`.

#[path = "noisy_neighbour/child.rs"]
mod child;
#[path = "nfs_workload/client.rs"]
#[allow(dead_code, reason = "shared with nfs_workload, which uses all of it")]
mod client;
#[path = "noisy_neighbour/load.rs"]
mod load;
#[path = "noisy_neighbour/report.rs"]
mod report;
#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use load::{Flood, Kind, VictimSample, Volume};
use localnfs::volume::{VolumeName, VolumeSpec};
use localnfs_testbed::kernel::{KernelNode, TestNetwork};
use support::ganesha::Ganesha;
use support::kernel::{agent_for, mount};
use support::mariadb;
use support::nfs::{Node, create_volume, create_volume_with};

const GIB: u64 = 1 << 30;
const VOLUME_BYTES: u64 = 8 * GIB;
/// How long a flood runs before its rate is measured.
const WARM_UP: Duration = Duration::from_secs(2);
const DB_TABLES: u32 = 4;
const DB_ROWS: u32 = 10_000;
const DB_THREADS: u32 = 4;
const MIB: u64 = 1 << 20;
/// A volume of localnfs with a ceiling, flooded alone.
struct Ceiling {
    volume: &'static str,
    set: fn(&mut VolumeSpec),
    flood: Kind,
    /// The table's row.
    label: &'static str,
    /// The ceiling in the flood's unit ([`Kind::unit`]).
    value: f64,
}

const CEILINGS: [Ceiling; 2] = [
    Ceiling {
        volume: "c",
        set: |s| s.write_bandwidth = Some(32 * MIB),
        flood: Kind::Write,
        label: "`writeBandwidth: 32Mi`, write flood (MB/s)",
        value: (32 * MIB) as f64 / 1e6,
    },
    Ceiling {
        volume: "d",
        set: |s| s.read_iops = Some(2000),
        flood: Kind::Read,
        label: "`readIOPS: \"2000\"`, read flood (IOPS)",
        value: 2000.0,
    },
];

const USAGE: &str = "usage: cargo bench --bench noisy_neighbour -- [--reps N] [--seconds N] \
    [--flood-seconds N] [--servers localnfs,ganesha] [--only victim,mariadb,ceiling] [--dir PATH]";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Server {
    Localnfs,
    Ganesha,
}

impl Server {
    const ALL: [Server; 2] = [Server::Localnfs, Server::Ganesha];

    pub fn name(self) -> &'static str {
        match self {
            Server::Localnfs => "localnfs",
            Server::Ganesha => "ganesha",
        }
    }

    /// Where volume A is mounted in the test node.
    fn guest_mount(self) -> String {
        format!("/mnt/{}", self.name())
    }

    /// MariaDB's datadir in the test node (on volume A).
    fn datadir(self) -> String {
        match self {
            Server::Localnfs => format!("{}/db", self.guest_mount()),
            Server::Ganesha => format!("{}/a/db", self.guest_mount()),
        }
    }
}

struct Config {
    reps: usize,
    /// sysbench's run time per measurement.
    seconds: u64,
    /// A flood's measured window when it runs alone.
    flood_seconds: u64,
    servers: Vec<Server>,
    victim: bool,
    mariadb: bool,
    ceiling: bool,
    /// Where the servers' directories go (one disk; not /tmp, which may be tmpfs).
    dir: PathBuf,
}

fn parse_args(args: &[String]) -> Result<Config, String> {
    let mut config = Config {
        reps: 2,
        seconds: 15,
        flood_seconds: 5,
        servers: Server::ALL.to_vec(),
        victim: true,
        mariadb: true,
        ceiling: true,
        dir: PathBuf::from("/var/tmp"),
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        // `cargo bench` passes this to every bench binary.
        if arg == "--bench" {
            continue;
        }
        let value = args.next().ok_or(format!("{arg} needs a value"))?;
        let positive = || {
            value
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or(format!("{arg}: `{value}` is not a positive number"))
        };
        match arg.as_str() {
            "--reps" => config.reps = positive()? as usize,
            "--seconds" => config.seconds = positive()?,
            "--flood-seconds" => config.flood_seconds = positive()?,
            "--dir" => config.dir = PathBuf::from(value),
            "--servers" => {
                config.servers = value
                    .split(',')
                    .map(|name| {
                        Server::ALL
                            .into_iter()
                            .find(|s| s.name() == name)
                            .ok_or(format!("--servers: unknown server `{name}`"))
                    })
                    .collect::<Result<_, _>>()?;
            }
            "--only" => {
                let parts: Vec<&str> = value.split(',').collect();
                if let Some(bad) = parts
                    .iter()
                    .find(|p| !["victim", "mariadb", "ceiling"].contains(p))
                {
                    return Err(format!("--only: unknown part `{bad}`"));
                }
                config.victim = parts.contains(&"victim");
                config.mariadb = parts.contains(&"mariadb");
                config.ceiling = parts.contains(&"ceiling");
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(config)
}

/// Everything measured on one server: `[cond][rep]` with cond 0 = alone, 1 = with the
/// write flood, 2 = with the read flood; floods by [`Kind::ALL`] order.
#[derive(Default)]
pub struct Results {
    pub victim: [Vec<Result<VictimSample, String>>; 3],
    /// TPS and p95 (ms).
    pub db: [Vec<Result<[f64; 2], String>>; 3],
    pub flood_alone: [Vec<Result<f64, String>>; 2],
    pub flood_with_victim: [Vec<Result<f64, String>>; 2],
    pub flood_with_db: [Vec<Result<f64, String>>; 2],
}

/// A server under test: its two volumes as the host's clients reach them.
struct Served {
    server: Server,
    a: Volume,
    b: Volume,
    /// What the victim's process may look at (the server's metrics and CPU).
    probe: child::Probe,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(child::CHILD_FLAG) {
        child::run(&args[1..]);
    }
    let config = match parse_args(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("noisy_neighbour: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    // Floods run on this runtime's two workers; the victim in a process of its own
    // (`child`), so its calls never queue behind the flood's tasks in the client.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let started = std::time::Instant::now();

    let dir = tempfile::Builder::new()
        .prefix("localnfs-noisy-")
        .tempdir_in(&config.dir)
        .expect("temporary directory (--dir)");
    let net = TestNetwork::create().expect("test network (run as root)");
    let node = config.mariadb.then(|| {
        rt.block_on(KernelNode::boot(&net, "bench-node", net.address(101)))
            .expect("boot test node")
    });
    let nodes: Vec<&KernelNode> = node.iter().collect();
    let ganesha_ip = net.address(2);
    // The host's clients connect from the host end's addresses.
    let allow_host = [
        "--insecure-ports".to_owned(),
        "--allow".to_owned(),
        format!("{}/32,{ganesha_ip}/32", net.address(1)),
    ];
    let allow_host: Vec<&str> = allow_host.iter().map(String::as_str).collect();

    // Servers are dropped (stopped by PID) before the node and the network.
    let mut agent: Option<Node> = None;
    let mut ganesha: Option<Ganesha> = None;
    let mut served = Vec::new();
    let mut ceiling_volumes: Vec<Volume> = Vec::new();
    for &server in &config.servers {
        match server {
            Server::Localnfs => {
                let root = dir.path().join("localnfs");
                create_volume(&root, "a", VOLUME_BYTES);
                create_volume(&root, "b", VOLUME_BYTES);
                if config.ceiling {
                    for c in &CEILINGS {
                        let name = VolumeName::new(c.volume).expect("name");
                        let mut spec = VolumeSpec::new(name, VOLUME_BYTES);
                        (c.set)(&mut spec);
                        create_volume_with(&root, &spec);
                    }
                }
                let a = rt.block_on(agent_for(&net, &root, &nodes, &allow_host));
                let vol = |name: &str| Volume {
                    nfs: a.addr,
                    mount: a.addr,
                    export: format!("/{name}"),
                    subdir: None,
                };
                served.push(Served {
                    server,
                    a: vol("a"),
                    b: vol("b"),
                    probe: child::Probe {
                        admin: Some(a.admin),
                        server_pid: Some(a.pid()),
                        flood_pid: std::process::id(),
                    },
                });
                if config.ceiling {
                    ceiling_volumes = CEILINGS.iter().map(|c| vol(c.volume)).collect();
                }
                if let Some(node) = &node {
                    rt.block_on(mount(node, &a, "a", &server.guest_mount()));
                }
                agent = Some(a);
            }
            Server::Ganesha => {
                net.add_host_address(ganesha_ip)
                    .expect("address for Ganesha");
                let home = dir.path().join("ganesha");
                let export = home.join("export");
                for d in ["a", "b"] {
                    std::fs::create_dir_all(export.join(d)).expect("Ganesha's export");
                }
                let g = rt.block_on(Ganesha::start(&home, &export, ganesha_ip));
                let vol = |name: &str| Volume {
                    nfs: SocketAddr::new(ganesha_ip, g.nfs_port),
                    mount: SocketAddr::new(ganesha_ip, g.mount_port),
                    export: export.to_string_lossy().into_owned(),
                    subdir: Some(name.to_owned()),
                };
                let pid = std::fs::read_to_string(home.join("ganesha.pid"))
                    .ok()
                    .and_then(|p| p.trim().parse().ok());
                served.push(Served {
                    server,
                    a: vol("a"),
                    b: vol("b"),
                    probe: child::Probe {
                        admin: None,
                        server_pid: pid,
                        flood_pid: std::process::id(),
                    },
                });
                if let Some(node) = &node {
                    rt.block_on(g.mount(node, ganesha_ip, &export, &server.guest_mount()));
                }
                ganesha = Some(g);
            }
        }
    }

    let mut results: Vec<Results> = config.servers.iter().map(|_| Results::default()).collect();
    if config.victim {
        for s in &served {
            eprintln!("{}: writing the files", s.server.name());
            rt.block_on(load::prepare_victim(&s.a))
                .expect("write the victim's file");
            rt.block_on(load::prepare_floods(&s.b, true))
                .expect("write the floods' files");
        }
        for rep in 0..config.reps {
            for turn in 0..served.len() {
                let i = (turn + rep) % served.len();
                victim_rep(&rt, &config, &served[i], rep, &mut results[i]);
            }
        }
    }
    if let Some(node) = &node {
        let mut prepared = Vec::new();
        for s in &served {
            // The MariaDB rows run the same floods: their files are written here when
            // the victim rows (which write them) were not asked for.
            if !config.victim {
                eprintln!("{}: writing the floods' files", s.server.name());
                rt.block_on(load::prepare_floods(&s.b, true))
                    .expect("write the floods' files");
            }
            eprintln!("{}: sysbench prepare", s.server.name());
            let p = rt.block_on(db_prepare(node, s.server));
            if let Err(e) = &p {
                eprintln!("{}: sysbench prepare failed: {e}", s.server.name());
            }
            prepared.push(p.is_ok());
        }
        for rep in 0..config.reps {
            for turn in 0..served.len() {
                let i = (turn + rep) % served.len();
                if prepared[i] {
                    db_rep(&rt, node, &config, &served[i], rep, &mut results[i]);
                }
            }
        }
    }

    let mut ceilings = Vec::new();
    for (vol, c) in ceiling_volumes.iter().zip(&CEILINGS) {
        let reads = c.flood == Kind::Read;
        if let Err(e) = rt.block_on(load::prepare_floods(vol, reads)) {
            eprintln!("ceiling volume {}: {e}", vol.export);
            continue;
        }
        let mut rates = Vec::new();
        for rep in 0..config.reps {
            let secs = Duration::from_secs(config.flood_seconds);
            let r = rt.block_on(load::flood_alone(vol, c.flood, WARM_UP, secs));
            log(rep, Server::Localnfs, c.label, &r);
            rates.push(r);
        }
        ceilings.push(report::CeilingRow {
            label: c.label,
            ceiling: c.value,
            measured: rates,
        });
    }

    let guest = node.as_ref().and_then(|n| {
        rt.block_on(n.run_ok("uname -r", Duration::from_secs(30)))
            .ok()
    });
    println!(
        "\nnoisy_neighbour: {} repetition(s), {} s per sysbench run, {} s per flood alone; \
         {} cores; {}{:.1} min\n",
        config.reps,
        config.seconds,
        config.flood_seconds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        guest.map_or(String::new(), |g| format!(
            "test node Linux {} (User-Mode Linux); ",
            g.trim()
        )),
        started.elapsed().as_secs_f64() / 60.0,
    );
    report::print(&config.servers, &results);
    report::print_ceilings(&ceilings);
    report::print_breakdown(&config.servers, &results);
    drop(ganesha);
    drop(agent);
}

/// Logs one measurement as it happens.
fn log<T: std::fmt::Debug>(rep: usize, server: Server, what: &str, r: &Result<T, String>) {
    match r {
        Ok(v) => eprintln!("rep {rep} {} {what}: {v:.1?}", server.name()),
        Err(e) => eprintln!("rep {rep} {} {what}: FAILED: {e}", server.name()),
    }
}

/// Runs `during` (on this thread) while `kind` floods volume B: the flood's rate over
/// `during`, and `during`'s result.
fn with_flood<T>(
    rt: &tokio::runtime::Runtime,
    b: &Volume,
    kind: Kind,
    during: impl FnOnce() -> Result<T, String>,
) -> (Result<f64, String>, Result<T, String>) {
    let flood = match rt.block_on(Flood::start(b, kind)) {
        Ok(f) => f,
        Err(e) => return (Err(e.clone()), Err(format!("flood did not start: {e}"))),
    };
    std::thread::sleep(WARM_UP);
    let mark = flood.mark();
    let result = during();
    let rate = flood.rate(mark);
    let stopped = rt.block_on(flood.stop());
    (stopped.map(|()| rate), result)
}

fn victim_rep(
    rt: &tokio::runtime::Runtime,
    config: &Config,
    s: &Served,
    rep: usize,
    out: &mut Results,
) {
    let server = s.server;
    let victim = |cond: &str| {
        let tag = format!("victim-{rep}-{cond}").replace(' ', "-");
        child::victim_in_child(&s.a, &tag, s.probe)
    };
    let rates = |r: &Result<VictimSample, String>| {
        r.as_ref()
            .map(|v| v.map(|row| row.rate))
            .map_err(Clone::clone)
    };
    let r = victim("alone");
    log(rep, server, "victim alone", &rates(&r));
    out.victim[0].push(r);
    for (k, kind) in Kind::ALL.into_iter().enumerate() {
        let secs = Duration::from_secs(config.flood_seconds);
        let alone = rt.block_on(load::flood_alone(&s.b, kind, WARM_UP, secs));
        log(rep, server, &format!("{} alone", kind.label()), &alone);
        out.flood_alone[k].push(alone);
        let (rate, r) = with_flood(rt, &s.b, kind, || victim(kind.label()));
        log(
            rep,
            server,
            &format!("victim with {}", kind.label()),
            &rates(&r),
        );
        log(rep, server, &format!("{} with victim", kind.label()), &rate);
        out.victim[k + 1].push(r);
        out.flood_with_victim[k].push(rate);
    }
}

/// Creates sysbench's tables on `server`'s volume A, with mariadbd stopped after.
async fn db_prepare(node: &KernelNode, server: Server) -> Result<(), String> {
    let result = async {
        mariadb::start(node, &server.datadir()).await?;
        mariadb::prepare(node, DB_TABLES, DB_ROWS).await
    }
    .await;
    let stopped = mariadb::stop(node).await;
    result.and(stopped).map_err(|e| e.to_string())
}

/// One sysbench `oltp_write_only` run: TPS and p95 (ms).
async fn sysbench(node: &KernelNode, seconds: u64) -> Result<[f64; 2], String> {
    let out = node
        .run_ok(
            &format!(
                "{} --time={seconds} --threads={DB_THREADS} run",
                mariadb::sysbench("oltp_write_only", DB_TABLES, DB_ROWS)
            ),
            Duration::from_secs(seconds + 300),
        )
        .await
        .map_err(|e| e.to_string())?;
    let (tps, p95) =
        mariadb::tps_and_p95(&out).ok_or_else(|| format!("no sysbench report in {out}"))?;
    Ok([tps, p95])
}

fn db_rep(
    rt: &tokio::runtime::Runtime,
    node: &KernelNode,
    config: &Config,
    s: &Served,
    rep: usize,
    out: &mut Results,
) {
    let server = s.server;
    if let Err(e) = rt.block_on(mariadb::start(node, &server.datadir())) {
        let e = format!("mariadbd did not start: {e}");
        for cond in &mut out.db {
            cond.push(Err(e.clone()));
        }
        return;
    }
    let r = rt.block_on(sysbench(node, config.seconds));
    log(rep, server, "sysbench alone [TPS, p95 ms]", &r);
    out.db[0].push(r);
    for (k, kind) in Kind::ALL.into_iter().enumerate() {
        let (rate, r) = with_flood(rt, &s.b, kind, || {
            rt.block_on(sysbench(node, config.seconds))
        });
        log(
            rep,
            server,
            &format!("sysbench with {} [TPS, p95 ms]", kind.label()),
            &r,
        );
        log(
            rep,
            server,
            &format!("{} with sysbench", kind.label()),
            &rate,
        );
        out.db[k + 1].push(r);
        out.flood_with_db[k].push(rate);
    }
    if let Err(e) = rt.block_on(mariadb::stop(node)) {
        eprintln!("{}: stopping mariadbd failed: {e}", server.name());
    }
}
