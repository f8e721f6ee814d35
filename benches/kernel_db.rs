//! MariaDB through the Linux kernel NFS client: sysbench against a datadir on a
//! localnfs volume and on an NFS-Ganesha 4.3 (VFS) export, from the same User-Mode Linux
//! test node in the same run, the servers taking turns. Prints one markdown table.
//!
//! Run (as root): `cargo bench --bench kernel_db` (defaults: oltp_read_write and
//! oltp_write_only, 60 s each, 3 repetitions), or e.g.
//! `cargo bench --bench kernel_db -- --seconds 20 --reps 1`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use localnfs_testbed::kernel::{KernelNode, TestNetwork};
use support::ganesha::Ganesha;
use support::kernel::mount;
use support::mariadb;
use support::nfs::{Node, create_volume};

const TABLES: u32 = 4;
const ROWS: u32 = 10_000;
const WORKLOADS: [&str; 2] = ["oltp_read_write", "oltp_write_only"];

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() {
    let seconds = arg("--seconds", 60);
    let reps = arg("--reps", 3) as usize;
    let net = TestNetwork::create().expect("test network (run as root)");
    let node = KernelNode::boot(&net, "db-node", net.address(101))
        .await
        .expect("boot test node");
    let dir = tempfile::tempdir().expect("dir");

    let root = dir.path().join("localnfs");
    create_volume(&root, "db", 16 << 30);
    let agent = Node::start_on(
        &root,
        SocketAddr::new(net.address(1), 0),
        &["--allow", &format!("{}/32", node.address())],
    )
    .await;
    mount(&node, &agent, "db", "/mnt/localnfs").await;
    let ganesha_ip = net.address(2);
    net.add_host_address(ganesha_ip).expect("address");
    let export = dir.path().join("ganesha/export");
    std::fs::create_dir_all(&export).expect("export");
    let ganesha = Ganesha::start(&dir.path().join("ganesha"), &export, ganesha_ip).await;
    ganesha
        .mount(&node, ganesha_ip, &export, "/mnt/ganesha")
        .await;

    let servers = ["localnfs", "ganesha"];
    // workload → server → (tps, p95) per repetition
    let mut results = vec![vec![Vec::new(); servers.len()]; WORKLOADS.len()];
    for server in servers {
        let datadir = format!("/mnt/{server}/data");
        mariadb::start(&node, &datadir).await;
        mariadb::prepare(&node, TABLES, ROWS).await;
        mariadb::stop(&node).await;
    }
    for rep in 0..reps {
        for i in 0..servers.len() {
            // Rotate who goes first so drift on the machine falls on both alike.
            let s = (i + rep) % servers.len();
            let datadir = format!("/mnt/{}/data", servers[s]);
            mariadb::start(&node, &datadir).await;
            for (w, workload) in WORKLOADS.iter().enumerate() {
                let out = node
                    .run_ok(
                        &format!(
                            "{} --time={seconds} --threads=4 run",
                            mariadb::sysbench(workload, TABLES, ROWS)
                        ),
                        Duration::from_secs(seconds + 300),
                    )
                    .await
                    .expect("sysbench run");
                let r = mariadb::tps_and_p95(&out).expect("sysbench report");
                eprintln!(
                    "rep {rep} {} {workload}: {:.1} tps, p95 {} ms",
                    servers[s], r.0, r.1
                );
                results[w][s].push(r);
            }
            mariadb::stop(&node).await;
        }
    }
    println!(
        "\n| workload (4 threads, {TABLES}×{ROWS} rows, {seconds} s) | server | TPS (median of {reps}) | p95 latency ms (median) |\n|---|---|---|---|"
    );
    for (w, workload) in WORKLOADS.iter().enumerate() {
        for (s, server) in servers.iter().enumerate() {
            let tps = median(results[w][s].iter().map(|r| r.0).collect());
            let p95 = median(results[w][s].iter().map(|r| r.1).collect());
            println!("| {workload} | {server} | {tps:.1} | {p95:.1} |");
        }
    }
}
