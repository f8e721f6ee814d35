//! Start-up time of the test control plane (etcd + kube-apiserver +
//! kube-controller-manager + kube-scheduler), from the first process start to each
//! milestone, over N sequential runs (default 5; `LOCALNFS_BENCH_RUNS`).
//!
//! Run: `cargo bench --bench control_plane_startup` (after scripts/k8s-binaries).

use std::time::{Duration, Instant};

use localnfs_testbed::TestCluster;

fn main() {
    let runs: usize = std::env::var("LOCALNFS_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let mut phases: Vec<(&'static str, Vec<Duration>)> = Vec::new();
    let mut teardown = Vec::new();
    for run in 1..=runs {
        let cluster = rt
            .block_on(TestCluster::start())
            .expect("control plane starts");
        for (i, (name, at)) in cluster.startup_phases().iter().enumerate() {
            if phases.len() <= i {
                phases.push((name, Vec::new()));
            }
            phases[i].1.push(*at);
        }
        let t = Instant::now();
        cluster.stop();
        teardown.push(t.elapsed());
        eprintln!("run {run}/{runs} done");
    }
    phases.push(("teardown (stop)", teardown));

    println!("\ncontrol plane start-up, {runs} runs (seconds from first process start)\n");
    println!(
        "| {:<24} | {:>7} | {:>7} | {:>7} |",
        "milestone", "median", "min", "max"
    );
    println!("|{:-<26}|{:->9}|{:->9}|{:->9}|", "", "", "", "");
    for (name, mut times) in phases {
        times.sort();
        let secs = |d: Duration| d.as_secs_f64();
        println!(
            "| {:<24} | {:>7.2} | {:>7.2} | {:>7.2} |",
            name,
            secs(times[times.len() / 2]),
            secs(times[0]),
            secs(times[times.len() - 1]),
        );
    }
}
