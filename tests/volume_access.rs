//! Per-volume access on the real control plane (DESIGN invariant 8): the controller
//! publishes on each PV the nodes whose pods use its claim, the node agents serve the
//! volume to those nodes only, and a ReadWriteOnce volume goes to one node at a time.
//! Every mount here is the Linux kernel NFS client of a test node (a User-Mode Linux
//! guest), as kubelet does it.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use localnfs_testbed::{TestCluster, kubelet};
use serde_json::json;
use support::cluster::*;
use support::eventually;

const WAIT: Duration = Duration::from_secs(120);

/// Waits until pod `name` is Running and Ready (its volumes mounted and used by the
/// test-kubelet); returns what the test-kubelet did with them.
async fn running(
    client: &kube::Client,
    kubelet: &NfsKubelet,
    lnfs: &Localnfs,
    name: &str,
) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Ok(p) = pods.get(name).await
            && kubelet::is_running_and_ready(&p)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{name} not running; mount errors {:?}\n{}",
            kubelet.mount_errors_of(name),
            lnfs.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    kubelet
        .log
        .lock()
        .expect("log")
        .get(name)
        .cloned()
        .unwrap_or_default()
        .join(",")
}

async fn is_ready(client: &kube::Client, name: &str) -> bool {
    Api::<Pod>::namespaced(client.clone(), "default")
        .get(name)
        .await
        .is_ok_and(|p| kubelet::is_running_and_ready(&p))
}

#[tokio::test]
async fn volumes_reach_only_the_nodes_of_their_pods_and_read_write_once_one_node_at_a_time() {
    let cluster = TestCluster::start().await.expect("control plane");
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    let kernel = lnfs
        .start_kernel_nodes_and_controller(&client, &[("node-1", "10Gi"), ("node-2", "10Gi")])
        .await;
    storage_class(
        &client,
        "now",
        json!({"volumeBindingMode": "Immediate", "parameters": {"maxFiles": "5000"}}),
    )
    .await;
    let kubelet = NfsKubelet::start(client.clone(), "default", &kernel);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    for (name, mode) in [("solo", "ReadWriteOnce"), ("shared", "ReadWriteMany")] {
        claims
            .create(
                &PostParams::default(),
                &claim(name, "now", "64Mi", json!({"accessModes": [mode]})),
            )
            .await
            .expect("claim");
    }
    let solo = bound_pv(&client, "solo").await;
    let solo_name = solo.name_any();
    assert_eq!(
        published(&client, &solo_name).await,
        Some(vec![]),
        "a new volume is published to nobody"
    );
    // The class's object limit reached the volume's node.
    let (_, _, volume) = nfs_target(&solo);
    let home = solo.labels()["localnfs.io/node"].clone();
    let meta = std::fs::read_to_string(lnfs.root(&home).join(format!("meta/{volume}.json")))
        .expect("volume metadata");
    let meta: serde_json::Value = serde_json::from_str(&meta).expect("json");
    assert_eq!(meta["max_files"], 5000);

    // ReadWriteOnce: the first pod's node holds the volume.
    pod_on(&client, "writer", "node-1", &["solo"]).await;
    assert_eq!(
        running(&client, &kubelet, &lnfs, "writer").await,
        "solo:wrote"
    );
    wait_published(&client, &solo_name, &["node-1"]).await;

    // A pod of the same claim on another node waits: its mounts are refused and the
    // controller says why on the pod.
    pod_on(&client, "second", "node-2", &["solo"]).await;
    let why = eventually("VolumeHeldByNode on the second pod", WAIT, || async {
        events(&client, "second")
            .await
            .into_iter()
            .find(|(r, _)| r == "VolumeHeldByNode")
    })
    .await;
    assert!(
        why.1.contains("node-1") && why.1.contains(&solo_name),
        "{why:?}"
    );
    let refused = eventually("a refused mount on node-2", WAIT, || async {
        assert!(
            !is_ready(&client, "second").await,
            "a ReadWriteOnce volume was mounted on two nodes at once"
        );
        kubelet.mount_errors_of("second").into_iter().next()
    })
    .await;
    assert!(refused.contains("access denied"), "{refused}");
    eventually(
        "a second refused mount (the pod keeps trying)",
        WAIT,
        || async { (kubelet.mount_errors_of("second").len() >= 2).then_some(()) },
    )
    .await;
    assert!(
        !is_ready(&client, "second").await,
        "a ReadWriteOnce volume was mounted on two nodes at once"
    );
    assert_eq!(
        published(&client, &solo_name).await,
        Some(vec!["node-1".into()])
    );

    // The holder goes away: the waiting pod gets the volume and the data.
    Api::<Pod>::namespaced(client.clone(), "default")
        .delete("writer", &DeleteParams::default())
        .await
        .expect("delete writer");
    assert_eq!(
        running(&client, &kubelet, &lnfs, "second").await,
        "solo:found"
    );
    assert_eq!(
        published(&client, &solo_name).await,
        Some(vec!["node-2".into()])
    );
    eventually("VolumePublished on the second pod", WAIT, || async {
        events(&client, "second")
            .await
            .into_iter()
            .find(|(r, m)| r == "VolumePublished" && m.contains("node-2"))
    })
    .await;

    // node-1 is a cluster node but runs no pod of the claim now: refused.
    let mut quick = solo.clone();
    if let Some(opts) = quick.spec.as_mut().and_then(|s| s.mount_options.as_mut()) {
        opts.extend(["retry=0".into(), "timeo=50".into(), "retrans=1".into()]);
    }
    let err = kernel
        .node("node-1")
        .mount_pv(&quick, "/mnt/not-mine")
        .await
        .expect_err("a node without a pod of the claim mounted it");
    assert!(err.to_string().contains("access denied"), "{err}");

    // ReadWriteMany: every node with a pod of the claim mounts it, at the same time.
    let shared = bound_pv(&client, "shared").await;
    // One pod after the other: the test-kubelet's check-then-write is not atomic, so two
    // pods started at once on two nodes may both find no file and both write it. `a`
    // stays mounted while `b` mounts, so both nodes still hold the volume at once.
    pod_on(&client, "a", "node-1", &["shared"]).await;
    let a = running(&client, &kubelet, &lnfs, "a").await;
    pod_on(&client, "b", "node-2", &["shared"]).await;
    let b = running(&client, &kubelet, &lnfs, "b").await;
    assert_eq!([a, b], ["shared:wrote", "shared:found"]);
    wait_published(&client, &shared.name_any(), &["node-1", "node-2"]).await;
    for (pod, node) in [("a", "node-1"), ("b", "node-2")] {
        let uid = Api::<Pod>::namespaced(client.clone(), "default")
            .get(pod)
            .await
            .expect("pod")
            .uid()
            .expect("uid");
        kernel
            .node(node)
            .run_ok(
                &format!("ls {}", pod_mount(&uid, "shared")),
                Duration::from_secs(30),
            )
            .await
            .unwrap_or_else(|e| panic!("{pod} lost its shared volume: {e}"));
    }
}
