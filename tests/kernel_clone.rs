//! A clone of a live database's claim (issue 23, "done when" (a)): MariaDB runs on a
//! localnfs volume mounted by the Linux kernel NFS client of a test node, sysbench
//! writes to it, and a claim whose dataSource names the database's claim is made in
//! the middle of that load. A second MariaDB started on the clone's volume recovers
//! InnoDB (the copy is crash-consistent, as after a power cut) and `CHECK TABLE`
//! passes, with every table holding the rows it had (sysbench's read-write mix deletes
//! and re-inserts in one transaction, so a torn copy would show in the count).
//!
//! Real v1.20.2 control plane, controller and node agent processes, a kernel test node.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::ResourceExt;
use kube::api::{Api, PostParams};
use localnfs_testbed::TestCluster;
use localnfs_testbed::kernel::KernelNode;
use serde_json::json;
use support::cluster::*;
use support::eventually;
use support::mariadb;

const TABLES: u32 = 4;
const ROWS: u32 = 5000;
/// How long sysbench writes; the clone is asked for a third of the way in.
const LOAD_SECONDS: u64 = 30;
const WAIT: Duration = Duration::from_secs(120);

/// Publishes claim `claim`'s volume to node-1 (a pod there uses it) and mounts it at
/// `target` in the node's kernel as kubelet would.
async fn mount_claim(client: &kube::Client, node: &KernelNode, claim: &str, target: &str) {
    let pv = bound_pv(client, claim).await;
    pod_on(client, &format!("{claim}-pod"), "node-1", &[claim]).await;
    wait_published(client, &pv.name_any(), &["node-1"]).await;
    eventually(&format!("{claim} mounted"), WAIT, || async {
        node.mount_pv(&pv, target).await.ok()
    })
    .await;
}

#[tokio::test]
async fn a_clone_taken_under_sysbench_load_starts_mariadb_and_its_tables_check_ok() {
    let cluster = TestCluster::start().await.expect("control plane");
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    let kernel = lnfs
        .start_kernel_nodes_and_controller(&client, &[("node-1", "10Gi")])
        .await;
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    claims
        .create(
            &PostParams::default(),
            &claim("db", "now", "2Gi", json!({})),
        )
        .await
        .expect("claim db");
    let node = kernel.nodes["node-1"].clone();
    mount_claim(&client, &node, "db", "/mnt/db").await;
    mariadb::start(&node, "/mnt/db/data")
        .await
        .expect("mariadbd starts on the volume");
    mariadb::prepare(&node, TABLES, ROWS)
        .await
        .expect("sysbench prepare");

    let loader = node.clone();
    let load = tokio::spawn(async move {
        let cmd = format!(
            "{} --time={LOAD_SECONDS} --threads=4 run 2>&1",
            mariadb::sysbench("oltp_read_write", TABLES, ROWS)
        );
        loader
            .run_ok(&cmd, Duration::from_secs(LOAD_SECONDS + 120))
            .await
    });
    tokio::time::sleep(Duration::from_secs(LOAD_SECONDS / 3)).await;
    let asked = Instant::now();
    let clone = claim(
        "db-copy",
        "now",
        "2Gi",
        json!({"dataSource": {"kind": "PersistentVolumeClaim", "name": "db"}}),
    );
    claims
        .create(&PostParams::default(), &clone)
        .await
        .expect("clone claim");
    bound_pv(&client, "db-copy").await;
    let bound_after = asked.elapsed();
    assert!(
        !load.is_finished(),
        "sysbench ended before the clone was bound: the copy was not taken under load"
    );
    let report = load.await.expect("load task").expect("sysbench run");
    let (tps, p95) = mariadb::tps_and_p95(&report).expect("sysbench report");
    let cloned = events(&client, "db-copy")
        .await
        .into_iter()
        .find(|(reason, _)| reason == "VolumeCloned")
        .map(|(_, m)| m)
        .unwrap_or_default();
    println!(
        "clone of a MariaDB volume under sysbench load: Bound {:.1} s after the claim was made; {cloned}; sysbench {tps} transactions/s, p95 {p95} ms",
        bound_after.as_secs_f64()
    );
    mariadb::stop(&node).await.expect("source mariadbd stops");

    mount_claim(&client, &node, "db-copy", "/mnt/copy").await;
    mariadb::start(&node, "/mnt/copy/data")
        .await
        .expect("mariadbd starts on the clone (InnoDB recovery)");
    mariadb::check_tables(&node, TABLES).await;
    for i in 1..=TABLES {
        let out = mariadb::sql(&node, &format!("select count(*) from sbtest.sbtest{i}"))
            .await
            .expect("count");
        assert_eq!(
            out.lines().nth(1).map(str::trim),
            Some(ROWS.to_string().as_str()),
            "sbtest{i} on the clone: {out}"
        );
    }
    mariadb::stop(&node).await.expect("clone's mariadbd stops");
}
