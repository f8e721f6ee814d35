//! `localnfs demo`: the whole flow on an embedded single-node test cluster, with a short
//! report a person can read: control plane (kube-scheduler calling the helper's
//! extender), a Ready node that is a real Linux kernel (a User-Mode Linux guest on a
//! private network, see `localnfs_testbed::kernel`), the node agent, the controller and the
//! scheduler helper, a StatefulSet scaled 1 → 3 by clone (the new replicas' volumes
//! start as copies of the first's) whose volumes the node's kernel mounts as kubelet
//! would and writes into, a deleted pod rebuilt onto its node with the
//! helper's affinity finding its data (see [`flow`]), a backup of the first replica's
//! volume restored into a new claim by a `VolumeRestore` with matching checksums (see
//! [`restore`]), and the `localnfs status` table.
//! Ctrl-C (or `--run-for`) tears everything down. Needs root (network namespaces).

mod flow;
mod restore;

pub use flow::mysql;

use std::sync::Arc;
use std::time::Instant;

use crate::admin;
use crate::cli::DemoArgs;
use crate::error::{Error, Result};
use localnfs_testbed::kernel::{KernelNode, TestNetwork};
use localnfs_testbed::{self as testbed, ClusterOptions, TestCluster};

/// The demo's one node.
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
        testbed::free_port().map_err(|source| {
            Error::from(localnfs_nfs::Error::Bind {
                what,
                addr: ([127, 0, 0, 1], 0).into(),
                source,
            })
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
    // The node: a Linux kernel on a private network. Its agent serves on the host end
    // of that network; both addresses are the Node's InternalIPs (agent first).
    let net = TestNetwork::create()?;
    let agent_ip = net.address(1);
    let kernel = Arc::new(KernelNode::boot(&net, NODE, net.address(101)).await?);
    testbed::kubelet::add_node_with_addresses(
        &cluster.client(),
        NODE,
        &[agent_ip, kernel.address()],
    )
    .await?;
    println!(
        "node {NODE} registered (Ready): a Linux kernel (User-Mode Linux) at {}, its node \
         agent at {agent_ip}",
        kernel.address()
    );
    flow::prepare(&cluster.client(), ports.0).await?;
    let components =
        flow::start_components(cluster.dir(), cluster.kubeconfig(), NODE, agent_ip, ports)?;
    println!(
        "started localnfs node (node agent), localnfs controller and localnfs scheduler \
         (webhook on 127.0.0.1:{}, extender on 127.0.0.1:{})",
        ports.0, ports.1
    );
    let client = cluster.client();
    let flow_and_restore = async {
        let o = flow::run(&client, kernel.clone()).await?;
        // Said in the report when it fails; the volume flow above stands on its own.
        let r = restore::run(&client, cluster.dir(), cluster.kubeconfig(), NODE)
            .await
            .unwrap_or_else(|e| format!("\n  the backup and restore failed: {e}\n"));
        Ok::<_, Error>((o, r))
    };
    let outcome = tokio::select! {
        o = flow_and_restore => o,
        _ = shutdown.cancelled() => {
            println!("interrupted; stopping everything");
            drop(components);
            cluster.stop();
            return Ok(());
        }
    };
    match &outcome {
        Ok((o, restored)) => {
            println!("{}", volumes_report(o));
            println!("{restored}");
            // The same table `localnfs status` prints.
            match crate::status::render(
                &client,
                crate::objects::agents::HEARTBEAT_NAMESPACE,
                "localnfs.io/nfs",
            )
            .await
            {
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
    println!("{}", report(&cluster, &components, &kernel, admin_addr));
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
    let mut out =
        String::from("\n  pod       claim            node     PV / what the pod's kubelet did\n");
    for (pod, (claim, pv, node, mount, found)) in &o.volumes {
        out.push_str(&format!(
            "  {pod:<9} {claim:<16} {node:<8} {pv}\n  {:<35}{mount}\n  {:<35}{found}\n",
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
    kernel: &KernelNode,
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
        "  {:<25} {:<8} {}\n",
        format!("linux.uml ({})", kernel.name()),
        kernel.pid(),
        kernel.console_log().display()
    ));
    out.push_str(&format!(
        "\n  admin endpoints: http://{admin_addr}/healthz /readyz /metrics\
         \n  kubectl --kubeconfig {} get pods,pvc,pv\n",
        cluster.kubeconfig().display()
    ));
    out
}
