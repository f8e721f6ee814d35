//! What users feel through the Linux kernel NFS client: one User-Mode Linux test node
//! runs the same workloads on a localnfs volume, on an NFS-Ganesha 4.3 (VFS) export and,
//! as the ceiling, on ext4 on disks of its own (files on the same host disk attached as
//! `ubd` block devices): `local` writes through to the host's disk, so what ext4 made
//! durable is; `local-cached` stops in the host's page cache (durable only in name; the
//! guest kernel's own limit). All in the same run, taking turns in rotating order.
//! Workloads: untar of a generated tree of thousands of files, `ls -lR` cold and warm,
//! reading every file cold and warm, `rm -rf` (`kernel_client/files.rs`), and MariaDB
//! sysbench `oltp_read_write` and `oltp_write_only` (`kernel_client/sysbench.rs`).
//! Prints one markdown table (medians of the repetitions, and localnfs's speed against
//! each other server).
//!
//! Run (as root): `cargo bench --bench kernel_client` (defaults: 3 repetitions, 5,000
//! files, 30 s per sysbench workload; about 25-30 minutes), or a quick look:
//! `cargo bench --bench kernel_client -- --reps 1 --files 1000 --seconds 10`.
//! `--servers localnfs,ganesha,local,local-cached` and `--workloads files,sysbench`
//! choose what runs.

#[path = "kernel_client/files.rs"]
mod files;
#[path = "kernel_client/machine.rs"]
mod machine;
#[path = "kernel_client/report.rs"]
mod report;
#[path = "../tests/support/mod.rs"]
mod support;
#[path = "kernel_client/sysbench.rs"]
mod sysbench;
#[path = "kernel_client/tree.rs"]
mod tree;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use localnfs_testbed::kernel::{BootOptions, Disk, KernelNode, TestNetwork, quote};
use report::{Unit, print_table};
use support::ganesha::Ganesha;
use support::kernel::{agent_for, mount};
use support::nfs::create_volume;

const GIB: u64 = 1 << 30;
/// Size of the localnfs volume and of the guest's ext4 disk (sparse).
const VOLUME_BYTES: u64 = 4 * GIB;
/// Where the tarball is copied in the guest (tmpfs), so reading it costs the same for
/// every server.
const GUEST_TARBALL: &str = "/tmp/tree.tar";

const USAGE: &str = "usage: cargo bench --bench kernel_client -- [--reps N] [--files N] \
    [--seconds N] [--servers localnfs,ganesha,local,local-cached] [--workloads files,sysbench] \
    [--dir PATH]";

/// The places the workloads run on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Server {
    Localnfs,
    Ganesha,
    /// ext4 on a disk of the guest's that writes through to the host's disk.
    Local,
    /// ext4 on a disk of the guest's whose writes stop in the host's page cache.
    LocalCached,
}

impl Server {
    const ALL: [Server; 4] = [
        Server::Localnfs,
        Server::Ganesha,
        Server::Local,
        Server::LocalCached,
    ];

    fn name(self) -> &'static str {
        match self {
            Server::Localnfs => "localnfs",
            Server::Ganesha => "ganesha",
            Server::Local => "local",
            Server::LocalCached => "local-cached",
        }
    }

    /// Its mount point in the guest.
    fn mount(self) -> String {
        format!("/mnt/{}", self.name())
    }
}

struct Config {
    reps: usize,
    files: u64,
    seconds: u64,
    servers: Vec<Server>,
    files_rows: bool,
    sysbench_rows: bool,
    /// Where the run's temporary tree goes: the localnfs root, Ganesha's export and the
    /// guest's disk image share it, so they share a disk. Not under /tmp, /run or /mnt,
    /// which the guest covers with its own tmpfs (it reads the tarball from here).
    dir: PathBuf,
}

fn parse_args(args: &[String]) -> Result<Config, String> {
    let mut config = Config {
        reps: 3,
        files: 5_000,
        seconds: 30,
        servers: Server::ALL.to_vec(),
        files_rows: true,
        sysbench_rows: true,
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
            "--files" => config.files = positive()?,
            "--seconds" => config.seconds = positive()?,
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
            "--workloads" => {
                let chosen: Vec<&str> = value.split(',').collect();
                if let Some(bad) = chosen.iter().find(|w| !["files", "sysbench"].contains(w)) {
                    return Err(format!("--workloads: unknown workload `{bad}`"));
                }
                config.files_rows = chosen.contains(&"files");
                config.sysbench_rows = chosen.contains(&"sysbench");
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(config)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match parse_args(&args) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("kernel_client: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    tokio::runtime::Runtime::new()
        .expect("tokio runtime")
        .block_on(run(&config));
}

/// A sparse file of [`VOLUME_BYTES`] with an empty ext4 on it, inode tables and journal
/// written now so the guest's kernel does not initialise them during the run.
fn make_ext4_image(path: &Path) {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(VOLUME_BYTES))
        .expect("disk image for the guest");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(path)
        .output()
        .expect("run mkfs.ext4 (apt-get install e2fsprogs)");
    assert!(
        out.status.success(),
        "mkfs.ext4 {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn run(config: &Config) {
    let watch = machine::Watch::start(&config.dir);
    let dir = tempfile::Builder::new()
        .prefix("localnfs-kclient-")
        .tempdir_in(&config.dir)
        .expect("temporary directory (--dir)");
    let tree = config.files_rows.then(|| {
        eprintln!("generating a tree of {} files", config.files);
        tree::generate(dir.path(), config.files).expect("generate the file tree")
    });
    // One disk per local server, in the order of `config.servers`.
    let mut boot = BootOptions::default();
    let mut devices = Vec::new();
    for &server in &config.servers {
        if matches!(server, Server::Local | Server::LocalCached) {
            let path = dir.path().join(format!("{}.img", server.name()));
            make_ext4_image(&path);
            devices.push((server, BootOptions::disk_device(boot.disks.len())));
            boot.disks.push(Disk {
                path,
                write_through: server == Server::Local,
            });
        }
    }
    let net = TestNetwork::create().expect("test network (run as root)");
    let node = KernelNode::boot_with(&net, "bench-node", net.address(101), &boot)
        .await
        .expect("boot test node");
    let guest_kernel = node
        .run_ok("uname -r", Duration::from_secs(30))
        .await
        .expect("uname");

    // The servers live until the end of this function; they are dropped (stopped by
    // PID) before the node and the network.
    let mut localnfs_agent = None;
    let mut _ganesha = None;
    for &server in &config.servers {
        let target = server.mount();
        match server {
            Server::Localnfs => {
                let root = dir.path().join("localnfs");
                create_volume(&root, "bench", VOLUME_BYTES);
                let agent = agent_for(&net, &root, &[&node], &[]).await;
                mount(&node, &agent, "bench", &target).await;
                localnfs_agent = Some(agent);
            }
            Server::Ganesha => {
                let ip = net.address(2);
                net.add_host_address(ip).expect("address for Ganesha");
                let home = dir.path().join("ganesha");
                let export = home.join("export");
                std::fs::create_dir_all(&export).expect("Ganesha's export directory");
                let ganesha = Ganesha::start(&home, &export, ip).await;
                ganesha.mount(&node, ip, &export, &target).await;
                _ganesha = Some(ganesha);
            }
            Server::Local | Server::LocalCached => {
                let dev = devices
                    .iter()
                    .find(|(s, _)| *s == server)
                    .map(|(_, d)| d.as_str())
                    .unwrap_or_default();
                node.run_ok(
                    &format!(
                        "mkdir -p {t} && mount -t ext4 {dev} {t}",
                        t = quote(&target)
                    ),
                    Duration::from_secs(60),
                )
                .await
                .expect("mount the guest's ext4 disk");
            }
        }
    }
    if let Some(tree) = &tree {
        node.run_ok(
            &format!(
                "cp {} {GUEST_TARBALL}",
                quote(&tree.tarball.to_string_lossy())
            ),
            Duration::from_secs(300),
        )
        .await
        .expect("copy the tarball into the guest");
    }

    let mut rows: Vec<(String, Unit)> = Vec::new();
    if config.files_rows {
        rows.extend(files::ROWS.iter().map(|(n, u)| (n.to_string(), *u)));
    }
    if config.sysbench_rows {
        rows.extend(sysbench::rows(config.seconds));
    }
    // results[server][row][rep]
    let mut results = vec![vec![Vec::new(); rows.len()]; config.servers.len()];
    // per_call[server][file row]: the successful repetitions' calls and server time
    let mut per_call = vec![vec![Vec::new(); files::ROWS.len()]; config.servers.len()];
    let mut prepared = Vec::new();
    if config.sysbench_rows {
        for &server in &config.servers {
            eprintln!("{}: sysbench prepare", server.name());
            let p = sysbench::prepare(&node, &server.mount()).await;
            if let Err(e) = &p {
                eprintln!("{}: sysbench prepare failed: {e}", server.name());
            }
            prepared.push(p);
        }
    }

    let n = config.servers.len();
    for rep in 0..config.reps {
        // Servers take turns, who goes first rotating per repetition, so drift on the
        // machine (other load, the host's page cache) falls on all of them alike.
        let order: Vec<usize> = (0..n).map(|turn| (turn + rep) % n).collect();
        let mut row = 0;
        if let Some(tree) = &tree {
            eprintln!("rep {rep}: files");
            let dirs: Vec<String> = config.servers.iter().map(|s| s.mount()).collect();
            let targets: Vec<files::Target> = config
                .servers
                .iter()
                .zip(&dirs)
                .map(|(&server, dir)| files::Target {
                    node: &node,
                    dir,
                    admin: match server {
                        Server::Localnfs => localnfs_agent.as_ref().map(|a| a.admin),
                        _ => None,
                    },
                })
                .collect();
            let got = files::run(&targets, &order, tree, GUEST_TARBALL).await;
            for (s, server_rows) in got.into_iter().enumerate() {
                for (i, r) in server_rows.into_iter().enumerate() {
                    if let Ok(m) = &r {
                        if let Some(server_s) = m.server_seconds {
                            eprintln!(
                                "  {} {}: {} NFS calls, {server_s:.2} s of them in the server",
                                config.servers[s].name(),
                                rows[i].0,
                                m.calls
                            );
                        }
                        per_call[s][i].push(m.clone());
                    }
                    let r = r.map(|m| m.seconds);
                    log_sample(rep, config.servers[s], &rows[i].0, &r);
                    results[s][i].push(r);
                }
            }
            row = files::ROWS.len();
        }
        if config.sysbench_rows {
            for &s in &order {
                let server = config.servers[s];
                eprintln!("rep {rep} {}: sysbench", server.name());
                let got = match &prepared[s] {
                    Ok(()) => sysbench::run(&node, &server.mount(), config.seconds).await,
                    Err(e) => vec![Err(format!("sysbench prepare failed: {e}")); rows.len() - row],
                };
                for (i, r) in got.into_iter().enumerate() {
                    log_sample(rep, server, &rows[row + i].0, &r);
                    results[s][row + i].push(r);
                }
            }
        }
    }

    println!(
        "\nkernel_client: guest Linux {} (User-Mode Linux, 512 MiB); tree of {} files, {} directories, \
         {:.1} MB; {}",
        guest_kernel.trim(),
        tree.as_ref().map_or(0, |t| t.files),
        tree.as_ref().map_or(0, |t| t.dirs),
        tree.as_ref().map_or(0.0, |t| t.bytes as f64 / 1e6),
        watch.finish(&config.dir),
    );
    if let Some(tree) = &tree {
        eprintln!("tree MD5 {}", tree.md5);
    }
    println!();
    let names: Vec<&str> = config.servers.iter().map(|s| s.name()).collect();
    print_table(&names, &rows, &results, config.reps);
    if tree.is_some() {
        println!();
        report::print_time_per_call(&names, &files::ROWS, &per_call);
    }
}

/// One repetition's result, as it happens.
fn log_sample(rep: usize, server: Server, row: &str, r: &Result<f64, String>) {
    match r {
        Ok(v) => eprintln!("rep {rep} {} {row}: {v:.3}", server.name()),
        Err(e) => eprintln!("rep {rep} {} {row}: FAILED: {e}", server.name()),
    }
}
