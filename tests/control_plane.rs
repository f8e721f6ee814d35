//! The test control plane is the real thing: real StatefulSet controller, real PV
//! binder, real scheduler; and it is torn down completely however a test ends.

mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use localnfs_testbed::{TestCluster, kubelet};
use serde_json::json;
use support::{TestKubelet, eventually, process_exists};

const WAIT: Duration = Duration::from_secs(90);

fn statefulset(name: &str, class: &str) -> StatefulSet {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name},
        "spec": {
            "serviceName": name,
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{
                    "name": "db", "image": "mysql:8",
                    "volumeMounts": [{"name": "data", "mountPath": "/var/lib/mysql"}],
                }]},
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": class,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            }],
        },
    }))
    .expect("valid StatefulSet")
}

/// Stands in for a provisioner in this test only (the real one is tested elsewhere):
/// every PVC of `class` gets a PV pre-bound to it, so the real binder and scheduler have
/// something to work with.
fn static_provisioner(client: Client, class: &'static str) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
        let pvs: Api<PersistentVolume> = Api::all(client);
        loop {
            for pvc in pvcs
                .list(&ListParams::default())
                .await
                .into_iter()
                .flatten()
            {
                let (Some(name), Some(uid)) = (pvc.metadata.name, pvc.metadata.uid) else {
                    continue;
                };
                let pv: PersistentVolume = serde_json::from_value(json!({
                    "metadata": {"name": format!("pv-{name}")},
                    "spec": {
                        "capacity": {"storage": "1Gi"},
                        "accessModes": ["ReadWriteOnce"],
                        "storageClassName": class,
                        "nfs": {"server": "127.0.0.1", "path": format!("/{name}")},
                        "claimRef": {"namespace": "default", "name": name, "uid": uid},
                    },
                }))
                .expect("valid PV");
                // AlreadyExists on later rounds is expected.
                let _ = pvs.create(&PostParams::default(), &pv).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
}

#[tokio::test]
async fn statefulset_scaled_to_three_gets_three_bound_claims() {
    let cluster = TestCluster::start().await.expect("control plane starts");
    let client = cluster.client();
    kubelet::add_node(&client, "node-1", IpAddr::V4(Ipv4Addr::LOCALHOST))
        .await
        .expect("node registers");
    let _kubelet = TestKubelet::start(client.clone(), "default");
    let provisioner = static_provisioner(client.clone(), "manual");

    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    sets.create(&PostParams::default(), &statefulset("db", "manual"))
        .await
        .expect("StatefulSet created");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let ready_pods = || async {
        let list = pods.list(&ListParams::default()).await.ok()?;
        Some(
            list.items
                .iter()
                .filter(|p| kubelet::is_running_and_ready(p))
                .count(),
        )
    };
    eventually("db-0 Ready", WAIT, || async {
        (ready_pods().await? == 1).then_some(())
    })
    .await;

    // What `kubectl scale statefulset db --replicas=3` sends.
    sets.patch_scale(
        "db",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 3}})),
    )
    .await
    .expect("scale subresource accepts the patch");

    eventually("three Ready pods", WAIT, || async {
        (ready_pods().await? == 3).then_some(())
    })
    .await;
    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let bound = eventually("three Bound claims", WAIT, || async {
        let list = pvcs.list(&ListParams::default()).await.ok()?;
        let bound: BTreeSet<String> = list
            .items
            .into_iter()
            .filter(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"))
            .filter_map(|c| c.metadata.name)
            .collect();
        (bound.len() == 3).then_some(bound)
    })
    .await;
    let expected: BTreeSet<String> = (0..3).map(|i| format!("data-db-{i}")).collect();
    assert_eq!(bound, expected);
    // The real scheduler placed every pod on the only node.
    for pod in pods.list(&ListParams::default()).await.expect("list pods") {
        assert_eq!(
            pod.spec.and_then(|s| s.node_name).as_deref(),
            Some("node-1")
        );
    }
    provisioner.abort();

    let pids: Vec<u32> = cluster.processes().iter().map(|p| p.pid()).collect();
    let dir = cluster.dir().to_owned();
    cluster.stop();
    for pid in pids {
        assert!(!process_exists(pid), "pid {pid} survived stop()");
    }
    assert!(
        !dir.exists(),
        "cluster directory {} left behind",
        dir.display()
    );
}

#[test]
fn cluster_is_torn_down_when_a_test_panics() {
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        rt.block_on(async {
            let cluster = TestCluster::start().await.expect("control plane starts");
            let pids: Vec<u32> = cluster.processes().iter().map(|p| p.pid()).collect();
            tx.send((pids, cluster.dir().to_owned())).expect("send");
            panic!("a test failing while its cluster runs");
        })
    })
    .join();
    assert!(outcome.is_err(), "the thread was meant to panic");
    let (pids, dir) = rx.recv().expect("the cluster started before the panic");
    assert_eq!(
        pids.len(),
        4,
        "etcd, apiserver, controller-manager, scheduler"
    );
    for pid in pids {
        assert!(!process_exists(pid), "pid {pid} survived the panic");
    }
    assert!(
        !dir.exists(),
        "cluster directory {} left behind",
        dir.display()
    );
}

#[tokio::test]
async fn two_clusters_run_side_by_side() {
    let (a, b) = tokio::join!(TestCluster::start(), TestCluster::start());
    let (a, b) = (a.expect("first cluster"), b.expect("second cluster"));
    assert_ne!(a.api_url(), b.api_url());
    kubelet::add_node(&a.client(), "only-in-a", IpAddr::V4(Ipv4Addr::LOCALHOST))
        .await
        .expect("node in a");
    let nodes_b: Api<k8s_openapi::api::core::v1::Node> = Api::all(b.client());
    assert!(
        nodes_b
            .get_opt("only-in-a")
            .await
            .expect("list b")
            .is_none(),
        "clusters share state"
    );
}
