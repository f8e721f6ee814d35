//! The provisioner on the real control plane: StatefulSets get one working NFS volume
//! per replica, data survives scale-down and scale-up, reclaim follows the policy.

mod support;

use std::collections::BTreeSet;

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use localnfs_testbed::{TestCluster, kubelet};
use serde_json::json;
use support::cluster::*;
use support::eventually;

const WAIT: Duration = Duration::from_secs(120);

fn mysql(replicas: i32, class: &str) -> StatefulSet {
    serde_json::from_value(localnfs::demo::mysql(replicas, class)).expect("StatefulSet")
}

async fn scale(client: &Client, replicas: i32) {
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    sets.patch_scale(
        "mysql",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": replicas}})),
    )
    .await
    .expect("scale");
}

async fn ready_pods(client: &Client) -> Option<BTreeSet<String>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let list = pods.list(&ListParams::default()).await.ok()?;
    Some(
        list.items
            .iter()
            .filter(|p| kubelet::is_running_and_ready(p) && p.metadata.deletion_timestamp.is_none())
            .map(|p| p.name_any())
            .collect(),
    )
}

async fn wait_ready(client: &Client, n: usize, lnfs: &Localnfs) {
    let want: BTreeSet<String> = (0..n).map(|i| format!("mysql-{i}")).collect();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if ready_pods(client).await.as_ref() == Some(&want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "pods {want:?} not Ready in time\n{}",
            lnfs.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn statefulset_scales_to_five_volumes_on_one_node_and_keeps_data_across_scale_down() {
    let cluster = TestCluster::start().await.expect("control plane");
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    let kernel = lnfs
        .start_kernel_nodes_and_controller(&client, &[("node-1", "100Gi")])
        .await;
    storage_class(&client, "localnfs", json!({})).await;
    let kubelet = NfsKubelet::start(client.clone(), "default", &kernel);

    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    sets.create(&PostParams::default(), &mysql(1, "localnfs"))
        .await
        .expect("create");
    wait_ready(&client, 1, &lnfs).await;
    scale(&client, 3).await;
    wait_ready(&client, 3, &lnfs).await;
    scale(&client, 5).await;
    wait_ready(&client, 5, &lnfs).await;

    // Five PVs, each a directory on node-1's disk holding what the pod wrote over NFS.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    for i in 0..5 {
        let claim = claims.get(&format!("data-mysql-{i}")).await.expect("claim");
        assert_eq!(
            claim.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Bound")
        );
        let pv = pvs
            .get(
                claim
                    .spec
                    .as_ref()
                    .and_then(|s| s.volume_name.as_deref())
                    .expect("bound"),
            )
            .await
            .expect("pv");
        assert_eq!(pv.name_any(), format!("pvc-{}", claim.uid().expect("uid")));
        let (server, _, volume) = nfs_target(&pv);
        assert_eq!(server, kernel.agent_ip("node-1"));
        let file = lnfs
            .root("node-1")
            .join("volumes")
            .join(&volume)
            .join(format!("data-mysql-{i}.txt"));
        assert_eq!(
            std::fs::read(&file).expect("file written over NFS"),
            format!("data-mysql-{i}").as_bytes()
        );
    }

    // Scale down: claims stay. Scale up again: the old data is found.
    scale(&client, 1).await;
    eventually("two pods left", WAIT, || async {
        (ready_pods(&client).await?.len() == 1).then_some(())
    })
    .await;
    assert_eq!(
        claims
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        5
    );
    kubelet.log.lock().expect("log").clear();
    scale(&client, 3).await;
    wait_ready(&client, 3, &lnfs).await;
    let log = kubelet.log.lock().expect("log").clone();
    for pod in ["mysql-1", "mysql-2"] {
        let claim = format!("data-{pod}");
        assert_eq!(
            log.get(pod),
            Some(&vec![format!("{claim}:found")]),
            "{pod} did not find its data: {log:?}"
        );
    }

    // Deleting an unused claim of a Delete class removes its PV and its data.
    let pv4 = claims
        .get("data-mysql-4")
        .await
        .expect("claim")
        .spec
        .and_then(|s| s.volume_name)
        .expect("pv");
    let dir4 = lnfs.root("node-1").join("volumes").join(&pv4);
    assert!(dir4.is_dir());
    claims
        .delete("data-mysql-4", &DeleteParams::default())
        .await
        .expect("delete claim");
    eventually("PV of data-mysql-4 gone", WAIT, || async {
        pvs.get_opt(&pv4).await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(
        !dir4.exists(),
        "data of a deleted Delete-policy claim is still on disk"
    );
}
