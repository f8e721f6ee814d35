//! `localnfs demo`: the whole flow on an embedded single-node test cluster, with a short
//! report a person can read: control plane (kube-scheduler calling the helper's
//! extender), a Ready node, the node agent, the controller and the scheduler helper, a
//! StatefulSet scaled 1 → 3 with data written over NFS into each volume, a deleted pod
//! rebuilt onto its node with the helper's affinity finding its data (see [`flow`]),
//! and the `localnfs status` table. Ctrl-C (or `--run-for`) tears everything down.

mod flow;

pub use flow::mysql;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use crate::admin;
use crate::cli::DemoArgs;
use crate::error::{Error, Result};
use crate::testbed::{self, ClusterOptions, TestCluster};

/// The demo's one node; its InternalIP is loopback so NFS mounts stay on this machine.
const NODE: &str = "node-1";

/// Runs the demo until Ctrl-C, SIGTERM or `--run-for` elapses.
pub async fn run(args: DemoArgs) -> Result<()> {
    let shutdown = crate::shutdown::on_signals()?;
    let admin = admin::start(
        args.admin.admin_addr,
        crate::metrics::registry("demo"),
        &shutdown,
    )
    .await?;
    let (admin_addr, readiness) = (admin.addr, admin.readiness.clone());

    let port = |what: &'static str| {
        testbed::free_port().map_err(|source| Error::Bind {
            what,
            addr: ([127, 0, 0, 1], 0).into(),
            source,
        })
    };
    let ports = (port("webhook")?, port("extender")?);
    let opts = ClusterOptions {
        bin_dir: args.k8s_bin_dir.unwrap_or_else(testbed::default_bin_dir),
        scheduler_extenders: vec![crate::scheduler::config::extender_entry(&format!(
            "http://127.0.0.1:{}",
            ports.1
        ))],
        ..ClusterOptions::default()
    };
    println!(
        "localnfs demo: starting a Kubernetes {} control plane (etcd, kube-apiserver, \
         kube-controller-manager, kube-scheduler)...",
        testbed::K8S_VERSION
    );
    let started = Instant::now();
    let cluster = tokio::select! {
        c = TestCluster::start_with(opts) => c?,
        _ = shutdown.cancelled() => {
            println!("interrupted before the control plane was up; nothing left running");
            return Ok(());
        }
    };
    println!(
        "control plane ready in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let node_ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    testbed::kubelet::add_node(&cluster.client(), NODE, node_ip).await?;
    println!("node {NODE} registered (InternalIP {node_ip}, Ready)");
    flow::prepare(&cluster.client(), ports.0).await?;
    let components =
        flow::start_components(cluster.dir(), cluster.kubeconfig(), NODE, node_ip, ports)?;
    println!(
        "started localnfs node (node agent), localnfs controller and localnfs scheduler \
         (webhook on 127.0.0.1:{}, extender on 127.0.0.1:{})",
        ports.0, ports.1
    );
    let client = cluster.client();
    let outcome = tokio::select! {
        o = flow::run(&client) => o,
        _ = shutdown.cancelled() => {
            println!("interrupted; stopping everything");
            drop(components);
            cluster.stop();
            return Ok(());
        }
    };
    match &outcome {
        Ok(o) => {
            println!("{}", volumes_report(o));
            // The same table `localnfs status` prints.
            match crate::status::render(&client, "localnfs-system", "localnfs.io/nfs").await {
                Ok(t) => println!("localnfs status:\n{t}"),
                Err(e) => println!("localnfs status failed: {e}"),
            }
        }
        Err(e) => println!(
            "the volume flow failed: {e}
(logs: {})",
            cluster.dir().display()
        ),
    }
    println!("{}", report(&cluster, &components, admin_addr));
    readiness.set(true);

    match args.run_for {
        Some(d) => tokio::select! {
            _ = tokio::time::sleep(d) => {},
            _ = shutdown.cancelled() => {},
        },
        None => {
            println!("press Ctrl-C to stop and remove everything");
            shutdown.cancelled().await;
        }
    }
    readiness.set(false);
    println!("stopping localnfs and the control plane...");
    drop(components);
    cluster.stop();
    shutdown.cancel();
    let _ = admin.task.await;
    println!("stopped; all processes ended and the cluster directory is removed");
    outcome.map(drop)
}

fn volumes_report(o: &flow::Outcome) -> String {
    let mut out = String::from(
        "\n  pod       claim            node     PV / what the pod's kubelet saw over NFS\n",
    );
    for (pod, (claim, pv, node, url, found)) in &o.volumes {
        out.push_str(&format!(
            "  {pod:<9} {claim:<16} {node:<8} {pv}\n  {:<35}{found}\n  {:<35}{url}\n",
            "", ""
        ));
    }
    if let Some((node, found)) = &o.rebuilt {
        out.push_str(&format!(
            "\n  mysql-1 was deleted and rebuilt on {node}: it {found}\n"
        ));
    }
    out
}

fn report(
    cluster: &TestCluster,
    components: &[testbed::Process],
    admin_addr: std::net::SocketAddr,
) -> String {
    let mut out = String::from("\n  component                 pid      log\n");
    for p in cluster.processes().iter().chain(components) {
        out.push_str(&format!(
            "  {:<25} {:<8} {}\n",
            p.name(),
            p.pid(),
            p.log().display()
        ));
    }
    out.push_str(&format!(
        "\n  admin endpoints: http://{admin_addr}/healthz /readyz /metrics\
         \n  kubectl --kubeconfig {} get pods,pvc,pv\n",
        cluster.kubeconfig().display()
    ));
    out
}
