//! The scheduler helper on the real control plane: kube-scheduler calls its extender,
//! the API server calls its webhook over HTTPS, and the test-kubelet mounts volumes
//! with the Linux kernel NFS client of the node (a User-Mode Linux guest) each pod
//! runs on.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Node, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use localnfs::objects::keys::HOSTNAME_LABEL;
use localnfs::scheduler::config::extender_entry;
use localnfs_testbed::kernel::KernelNode;
use localnfs_testbed::{ClusterOptions, TestCluster, kubelet};
use serde_json::json;
use support::cluster::*;
use support::eventually;

const WAIT: Duration = Duration::from_secs(90);

struct Env {
    // Field order matters: processes stop before the test nodes, nodes before the
    // control plane.
    lnfs: Localnfs,
    kernel: KernelNodes,
    /// Kept alive for the test; torn down on drop.
    _cluster: TestCluster,
    client: Client,
}

/// A cluster whose scheduler calls the helper's extender, kernel test nodes with their
/// agents (`--capacity` each), the controller, and the helper with its webhook
/// registered.
async fn setup(nodes: &[(&str, &str)], class: serde_json::Value) -> Env {
    let (webhook_port, extender_port) = (free_port(), free_port());
    let cluster = TestCluster::start_with(ClusterOptions {
        scheduler_extenders: vec![extender_entry(&format!("http://127.0.0.1:{extender_port}"))],
        ..ClusterOptions::default()
    })
    .await
    .expect("control plane");
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    let kernel = lnfs.start_kernel_nodes_and_controller(&client, nodes).await;
    lnfs.start_scheduler(&client, webhook_port, extender_port)
        .await;
    storage_class(&client, "local", class).await;
    Env {
        lnfs,
        kernel,
        _cluster: cluster,
        client,
    }
}

/// A one-replica StatefulSet whose pod asks for half a CPU and one `size` volume.
async fn statefulset(client: &Client, name: &str, size: &str) {
    let sts: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "serviceName": name, "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": {
                "containers": [{"name": "db", "image": "db",
                    "resources": {"requests": {"cpu": "500m"}}}],
            }},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {
                "accessModes": ["ReadWriteOnce"], "storageClassName": "local",
                "resources": {"requests": {"storage": size}}}}],
        },
    }))
    .expect("sts");
    Api::<StatefulSet>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &sts)
        .await
        .expect("create StatefulSet");
}

/// Makes `node` the busier one: pods bound to it that request 6 of its 8 CPUs, so
/// kube-scheduler's own scores favour every other node.
async fn crowd(client: &Client, node: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for i in 0..3 {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": format!("filler-{node}-{i}")},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "c",
                "resources": {"requests": {"cpu": "2"}}}]},
        }))
        .expect("pod");
        pods.create(&PostParams::default(), &pod)
            .await
            .expect("filler pod");
    }
}

/// The pod's node once it runs with its volume mounted by the test-kubelet, and what
/// the test-kubelet found (`<claim>:wrote` or `<claim>:found`).
async fn running(
    client: &Client,
    kubelet: &NfsKubelet,
    pod: &str,
    not_uid: &str,
) -> (String, String, Pod) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let p = eventually(&format!("{pod} running again"), WAIT, || async {
        let p = pods.get(pod).await.ok()?;
        (p.uid()? != not_uid && kubelet::is_running_and_ready(&p)).then_some(p)
    })
    .await;
    let seen = kubelet
        .log
        .lock()
        .expect("log")
        .get(pod)
        .cloned()
        .unwrap_or_default();
    let node = p
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .expect("node");
    (node, seen.join(","), p)
}

async fn delete_pod(client: &Client, name: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let uid = pods.get(name).await.expect("pod").uid().expect("uid");
    pods.delete(name, &DeleteParams::default())
        .await
        .expect("delete pod");
    uid
}

async fn cordon(client: &Client, node: &str, on: bool) {
    Api::<Node>::all(client.clone())
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": on}})),
        )
        .await
        .expect("cordon");
}

/// The node names in the pod's node affinity: (required, preferred with weights).
fn affinity(pod: &Pod) -> (Vec<String>, Vec<(String, i32)>) {
    let na = pod
        .spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.clone())
        .unwrap_or_default();
    let values = |t: &k8s_openapi::api::core::v1::NodeSelectorTerm| -> Vec<String> {
        t.match_expressions
            .iter()
            .flatten()
            .filter(|e| e.key == HOSTNAME_LABEL)
            .flat_map(|e| e.values.clone().unwrap_or_default())
            .collect()
    };
    let required = na
        .required_during_scheduling_ignored_during_execution
        .map(|r| r.node_selector_terms.iter().flat_map(values).collect())
        .unwrap_or_default();
    let preferred = na
        .preferred_during_scheduling_ignored_during_execution
        .unwrap_or_default()
        .iter()
        .flat_map(|t| {
            values(&t.preference)
                .into_iter()
                .map(move |n| (n, t.weight))
        })
        .collect();
    (required, preferred)
}

/// FailedScheduling messages about the pod with this uid.
async fn scheduling_failures(client: &Client, uid: &str) -> Vec<String> {
    Api::<Event>::namespaced(client.clone(), "default")
        .list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|e| e.involved_object.uid.as_deref() == Some(uid))
                .filter(|e| e.reason.as_deref() == Some("FailedScheduling"))
                .filter_map(|e| e.message)
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn rebuilt_pod_goes_home_and_runs_elsewhere_over_nfs_when_home_is_cordoned() {
    let mut env = setup(&[("node-1", "10Gi"), ("node-2", "10Gi")], json!({})).await;
    let client = env.client.clone();
    let kubelet = NfsKubelet::start(client.clone(), "default", &env.kernel);
    statefulset(&client, "db", "1Gi").await;
    let (home, seen, _) = running(&client, &kubelet, "db-0", "").await;
    assert_eq!(seen, "data-db-0:wrote");
    let other = if home == "node-1" { "node-2" } else { "node-1" };
    let home_ip = env.kernel.agent_ip(&home);

    // Home is now the busier node; the rebuilt pod still goes home.
    crowd(&client, &home).await;
    let old = delete_pod(&client, "db-0").await;
    let (node, seen, pod) = running(&client, &kubelet, "db-0", &old).await;
    assert_eq!(
        node,
        home,
        "rebuilt pod left its data's node\n{}",
        env.lnfs.logs()
    );
    assert_eq!(seen, "data-db-0:found");
    assert_eq!(
        affinity(&pod),
        (vec![], vec![(home.clone(), 100)]),
        "the webhook adds a preferred term for home"
    );

    // Home cordoned: preferred means the pod runs elsewhere and reads its data over
    // NFS from home (the test-kubelet mounts in the other node's kernel).
    cordon(&client, &home, true).await;
    let old = delete_pod(&client, "db-0").await;
    let (node, seen, _) = running(&client, &kubelet, "db-0", &old).await;
    assert_eq!(node, other);
    assert_eq!(seen, "data-db-0:found", "data read over NFS from {home_ip}");
    let claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .get("data-db-0")
        .await
        .expect("claim");
    let pv = Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(client.clone())
        .get(
            claim
                .spec
                .and_then(|s| s.volume_name)
                .as_deref()
                .expect("bound"),
        )
        .await
        .expect("pv");
    assert_eq!(
        nfs_target(&pv).0,
        home_ip,
        "the volume stays on its home node"
    );

    // A machine on the node network that is not a node cannot mount the volume.
    let net = &env.kernel.net;
    let stranger = KernelNode::boot(net, "stranger", net.address(200))
        .await
        .expect("boot a machine that is not a node");
    let mut stranger_pv = pv.clone();
    if let Some(opts) = stranger_pv
        .spec
        .as_mut()
        .and_then(|s| s.mount_options.as_mut())
    {
        opts.extend(["retry=0".into(), "timeo=50".into(), "retrans=1".into()]);
    }
    assert!(
        stranger
            .mount_pv(&stranger_pv, "/mnt/stolen")
            .await
            .is_err(),
        "an address that is not a node mounted a volume"
    );
    // The control: the node running the pod mounts with exactly those options.
    env.kernel
        .node(other)
        .mount_pv(&stranger_pv, "/mnt/control")
        .await
        .expect("a node mounts with the same options");

    // Helper down: pods are still created and scheduled (failurePolicy Ignore, an
    // ignorable extender).
    env.lnfs.stop_scheduler().await;
    let old = delete_pod(&client, "db-0").await;
    let (node, seen, pod) = running(&client, &kubelet, "db-0", &old).await;
    assert_eq!((node.as_str(), seen.as_str()), (other, "data-db-0:found"));
    assert_eq!(affinity(&pod), (vec![], vec![]), "nobody added affinity");
}

#[tokio::test]
async fn strict_volume_keeps_its_pod_pending_while_home_is_cordoned() {
    let env = setup(
        &[("node-1", "10Gi"), ("node-2", "10Gi")],
        json!({"parameters": {"locality": "strict"}}),
    )
    .await;
    let client = env.client.clone();
    let kubelet = NfsKubelet::start(client.clone(), "default", &env.kernel);
    statefulset(&client, "vault", "1Gi").await;
    let (home, _, _) = running(&client, &kubelet, "vault-0", "").await;

    cordon(&client, &home, true).await;
    let old = delete_pod(&client, "vault-0").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = eventually("vault-0 recreated", WAIT, || async {
        pods.get("vault-0")
            .await
            .ok()
            .filter(|p| p.uid().as_deref() != Some(&old))
    })
    .await;
    let uid = pod.uid().expect("uid");
    assert_eq!(
        affinity(&pod),
        (vec![home.clone()], vec![]),
        "the webhook requires home for a strict volume"
    );
    let why = eventually("a FailedScheduling event", WAIT, || async {
        scheduling_failures(&client, &uid).await.into_iter().next()
    })
    .await;
    assert!(
        why.contains("unschedulable") && why.contains("0/2 nodes are available"),
        "{why}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pod = pods.get("vault-0").await.expect("pod");
    assert_eq!(
        pod.spec.and_then(|s| s.node_name),
        None,
        "a strict pod must not run away from its data"
    );

    cordon(&client, &home, false).await;
    let (node, seen, _) = running(&client, &kubelet, "vault-0", &old).await;
    assert_eq!((node, seen), (home, "data-vault-0:found".to_owned()));
}

#[tokio::test]
async fn new_volumes_go_where_there_is_room_and_impossible_ones_say_why() {
    let env = setup(&[("node-1", "1Gi"), ("node-2", "20Gi")], json!({})).await;
    let client = env.client.clone();
    let kubelet = NfsKubelet::start(client.clone(), "default", &env.kernel);
    // node-1 looks better to kube-scheduler on its own (idle); only the extender
    // knows its disk is too small for the claim.
    crowd(&client, "node-2").await;
    statefulset(&client, "big", "5Gi").await;
    let (node, seen, _) = running(&client, &kubelet, "big-0", "").await;
    assert_eq!(node, "node-2", "{}", env.lnfs.logs());
    assert_eq!(seen, "data-big-0:wrote");

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let claim: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "huge"},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local",
                 "resources": {"requests": {"storage": "100Gi"}}},
    }))
    .expect("claim");
    claims
        .create(&PostParams::default(), &claim)
        .await
        .expect("claim");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "huge"},
        "spec": {"containers": [{"name": "c", "image": "c"}],
                 "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "huge"}}]},
    }))
    .expect("pod");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod = pods
        .create(&PostParams::default(), &pod)
        .await
        .expect("pod");
    let uid = pod.uid().expect("uid");
    let why = eventually("a FailedScheduling event", WAIT, || async {
        scheduling_failures(&client, &uid).await.into_iter().next()
    })
    .await;
    assert!(why.contains("localnfs: not enough room"), "{why}");
    assert!(why.contains("107374182400 bytes"), "{why}");
    let claim = claims.get("huge").await.expect("claim");
    assert_eq!(
        claim.spec.and_then(|s| s.volume_name),
        None,
        "no volume for a claim no node can hold"
    );
}

#[tokio::test]
async fn a_node_whose_clock_is_five_minutes_off_is_neither_dropped_nor_kept_after_it_dies() {
    let cluster = TestCluster::start().await.expect("control plane");
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    let (webhook_port, extender_port) = (free_port(), free_port());
    lnfs.start_scheduler(&client, webhook_port, extender_port)
        .await;
    storage_class(&client, "local", json!({})).await;
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .create(
            &PostParams::default(),
            &claim("data", "local", "1Mi", json!({})),
        )
        .await
        .expect("claim");

    // "behind": a live agent whose clock is 5 minutes slow, renewing every second.
    // "ahead": an agent whose clock is 5 minutes fast, which beat once and died.
    let leases: Api<Lease> = Api::namespaced(client.clone(), HEARTBEATS);
    fake_heartbeat(&leases, "ahead", at(300), 10 << 30).await;
    let beating = tokio::spawn({
        let leases = leases.clone();
        async move {
            loop {
                fake_heartbeat(&leases, "behind", at(-300), 10 << 30).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });

    // A pod with a new WaitForFirstConsumer volume: only nodes with a live agent pass.
    let args = json!({
        "Pod": {"metadata": {"name": "db-0", "namespace": "default"}, "spec": {
            "containers": [{"name": "db", "image": "db"}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}},
        "NodeNames": ["behind", "ahead"],
    })
    .to_string();
    let extender = std::net::SocketAddr::from(([127, 0, 0, 1], extender_port));
    let filter = || async {
        let (status, body) = support::http_post(extender, "/filter", &args).await;
        assert_eq!(status, 200, "{body}");
        let answer: serde_json::Value = serde_json::from_str(&body).expect("filter answer");
        (answer["NodeNames"].clone(), answer["FailedNodes"].clone())
    };
    let failed = eventually("only the live agent's node passes", WAIT, || async {
        let (passed, failed) = filter().await;
        (passed == json!(["behind"])).then_some(failed)
    })
    .await;
    assert!(
        failed["ahead"]
            .as_str()
            .is_some_and(|why| why.contains("no localnfs node agent")),
        "{failed}"
    );
    // And it stays so, for several of the Lease's durations.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(filter().await.0, json!(["behind"]));
    }
    beating.abort();
}
