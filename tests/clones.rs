//! Clones of claims (issue 23, same-node clones): a claim whose `dataSource` names
//! another claim gets a new volume holding a copy of that claim's volume, on the
//! source's node when it fits (clones to another node: `clones_cross_node.rs`);
//! everything else is refused with an event and makes no volume.
//!
//! Real v1.20.2 control plane (its PV binder and StatefulSet controller included),
//! real controller and node agent processes; the files are written into the source
//! volume's directory on the node's disk, as data a pod wrote before.

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim, Pod, Secret};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use localnfs::objects::keys::{
    CONTROLLER_KEY_FIELD, CONTROLLER_KEY_SECRET, NODE_KEY, REFUSED, SELECTED_NODE,
};
use localnfs::objects::request::{CloneSource, VolumeRequest};
use localnfs::objects::signed::{self, Signer};
use localnfs::scheduler::config::extender_entry;
use localnfs::volume::{VolumeName, VolumeSpec};
use localnfs_testbed::{ClusterOptions, TestCluster, kubelet};
use serde_json::json;
use support::cluster::*;
use support::eventually;

const WAIT: Duration = Duration::from_secs(90);

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Every file under `dir` (relative path → contents).
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).expect("read dir").flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).expect("prefix");
                out.insert(
                    rel.to_string_lossy().into_owned(),
                    std::fs::read(&path).expect("read file"),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Writes a few files (one in a subdirectory, one of 200 KiB) into `dir`.
fn write_data(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::create_dir_all(dir.join("db/tables")).expect("mkdir");
    std::fs::write(dir.join("precious"), b"rows").expect("write");
    std::fs::write(dir.join("db/tables/t1.ibd"), b"table one").expect("write");
    let big: Vec<u8> = (0..200 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("db/log"), &big).expect("write");
    files(dir)
}

/// The directory of claim `name`'s volume on its node (from its PV).
async fn volume_dir(
    client: &Client,
    lnfs: &Localnfs,
    node: &str,
    name: &str,
) -> std::path::PathBuf {
    let pv = bound_pv(client, name).await;
    lnfs.root(node).join("volumes").join(nfs_target(&pv).2)
}

/// Two nodes: node-1 (5Gi) and node-2 (10Gi, so the controller's own choice for a new
/// volume), classes `now` (Immediate) and `wait` (WaitForFirstConsumer), and claim
/// `src` placed on node-1 (as the scheduler would have chosen) holding a few files.
async fn two_nodes_and_a_source() -> (TestCluster, Localnfs, BTreeMap<String, Vec<u8>>) {
    let cluster = TestCluster::start().await.expect("control plane");
    with_source(cluster, 131).await
}

/// [`two_nodes_and_a_source`] on `cluster`, the nodes at 127.0.0.`first` and the next.
async fn with_source(
    cluster: TestCluster,
    first: u8,
) -> (TestCluster, Localnfs, BTreeMap<String, Vec<u8>>) {
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    lnfs.start_nodes_and_controller(
        &client,
        &[
            ("node-1", ip(first), "5Gi"),
            ("node-2", ip(first + 1), "10Gi"),
        ],
    )
    .await;
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    storage_class(
        &client,
        "wait",
        json!({"volumeBindingMode": "WaitForFirstConsumer"}),
    )
    .await;
    let mut src = claim("src", "wait", "1Mi", json!({}));
    src.metadata
        .annotations
        .get_or_insert_default()
        .insert(SELECTED_NODE.into(), "node-1".into());
    create_claim(&client, &src).await;
    // Bound, not only made: a clone's placement (and the scheduler helper's pin to
    // the source's node) follows the source's PV, which comes after its directory.
    bound_pv(&client, "src").await;
    let dir = volume_dir(&client, &lnfs, "node-1", "src").await;
    let data = write_data(&dir);
    (cluster, lnfs, data)
}

#[tokio::test]
async fn a_clone_holds_its_sources_files_on_the_sources_node() {
    let (cluster, lnfs, data) = two_nodes_and_a_source().await;
    let client = cluster.client();
    // Immediate: left to itself the controller would pick node-2 (most room).
    create_claim(&client, &claim("copy", "now", "1Mi", clone_of("src"))).await;
    let pv = bound_pv(&client, "copy").await;
    assert_eq!(
        nfs_target(&pv).0,
        ip(131),
        "the clone must be served from the source's node\n{}",
        lnfs.logs()
    );
    let copy_dir = volume_dir(&client, &lnfs, "node-1", "copy").await;
    assert_eq!(
        files(&copy_dir),
        data,
        "the clone does not hold the source's files"
    );
    event_saying(&client, "default", "copy", "VolumeCloned", "default/src").await;

    // A copy, not a link: writing the clone leaves the source as it was.
    std::fs::write(copy_dir.join("precious"), b"changed").expect("write clone");
    let src_dir = volume_dir(&client, &lnfs, "node-1", "src").await;
    assert_eq!(
        files(&src_dir),
        data,
        "writing the clone changed the source"
    );
    assert!(
        volume_dirs(&lnfs, "node-2").is_empty(),
        "nothing belongs on node-2: {:?}",
        volume_dirs(&lnfs, "node-2")
    );
}

#[tokio::test]
async fn a_pod_whose_claim_clones_runs_on_the_sources_node() {
    let (webhook_port, extender_port) = (free_port(), free_port());
    let cluster = TestCluster::start_with(ClusterOptions {
        scheduler_extenders: vec![extender_entry(&format!("http://127.0.0.1:{extender_port}"))],
        ..ClusterOptions::default()
    })
    .await
    .expect("control plane");
    let (cluster, mut lnfs, data) = with_source(cluster, 161).await;
    let client = cluster.client();
    lnfs.start_scheduler(&client, webhook_port, extender_port)
        .await;
    // WaitForFirstConsumer: the scheduler picks the node. Left to itself it prefers
    // node-2 (the helper scores free space, and node-2 has twice node-1's); only the
    // clone's source pins it to node-1.
    create_claim(&client, &claim("copy", "wait", "1Mi", clone_of("src"))).await;
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "reader"},
        "spec": {"containers": [{"name": "c", "image": "c"}],
                 "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "copy"}}]},
    }))
    .expect("pod");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let node = eventually("reader scheduled", WAIT, || async {
        pods.get("reader").await.ok()?.spec?.node_name
    })
    .await;
    assert_eq!(node, "node-1", "{}", lnfs.logs());
    let copy_dir = volume_dir(&client, &lnfs, "node-1", "copy").await;
    assert_eq!(files(&copy_dir), data);
}

#[tokio::test]
async fn clones_that_cannot_be_made_are_refused_and_make_no_volume() {
    let (cluster, lnfs, _) = two_nodes_and_a_source().await;
    let client = cluster.client();
    // A claim that never binds (WaitForFirstConsumer, no pod), and one bound to a PV
    // made by hand, which localnfs never made.
    create_claim(&client, &claim("pending", "wait", "1Mi", json!({}))).await;
    let static_pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": "static-pv"},
        "spec": {"capacity": {"storage": "1Mi"}, "accessModes": ["ReadWriteOnce"],
                 "storageClassName": "", "nfs": {"server": "127.0.0.1", "path": "/x"},
                 "claimRef": {"namespace": "default", "name": "static"}},
    }))
    .expect("pv");
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &static_pv)
        .await
        .expect("static PV");
    create_claim(
        &client,
        &claim("static", "", "1Mi", json!({"volumeName": "static-pv"})),
    )
    .await;
    bound_pv(&client, "static").await;

    let cases = [
        (
            claim("too-small", "now", "512Ki", clone_of("src")),
            "less than its dataSource claim default/src (1048576 bytes)",
        ),
        (
            claim("of-pending", "now", "1Mi", clone_of("pending")),
            "waiting for claim default/pending, the clone's dataSource, to be Bound",
        ),
        (
            claim("of-missing", "now", "1Mi", clone_of("nope")),
            "waiting for claim default/nope, the clone's dataSource, to exist",
        ),
        (
            claim("of-static", "now", "1Mi", clone_of("static")),
            "is not bound to a volume localnfs made for it",
        ),
    ];
    let mut uids = Vec::new();
    for (pvc, _) in &cases {
        uids.push(create_claim(&client, pvc).await.uid().expect("uid"));
    }
    for (pvc, words) in &cases {
        event_saying(
            &client,
            "default",
            &pvc.name_any(),
            "ProvisioningFailed",
            words,
        )
        .await;
    }
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    for uid in &uids {
        let pv = format!("pvc-{uid}");
        assert!(pvs.get_opt(&pv).await.expect("read").is_none(), "{pv} made");
    }
    let src_volume = nfs_target(&bound_pv(&client, "src").await).2;
    assert_eq!(
        volume_dirs(&lnfs, "node-1"),
        vec![src_volume],
        "{}",
        lnfs.logs()
    );
    assert!(volume_dirs(&lnfs, "node-2").is_empty());
}

#[tokio::test]
async fn a_request_naming_another_namespaces_volume_is_refused_by_the_agent() {
    let (cluster, lnfs) = start_localnfs(&[("node-1", ip(141), "5Gi")]).await;
    let client = cluster.client();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    let (victim_pv, victim_file) = claim_with_data(&client, &lnfs, "db-0").await;
    let victim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .get("db-0")
        .await
        .expect("victim");
    let victim_volume = VolumeName::new(&nfs_target(&victim_pv).2).expect("name");

    // A claim can only name a dataSource in its own namespace (the API has no field for
    // another), so the attack left is a request naming another namespace's volume. A
    // tenant cannot sign one; the controller could, by a bug: it is signed here with
    // the controller's own key, so only the agent's check stands in the way.
    let secret = Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .get(CONTROLLER_KEY_SECRET)
        .await
        .expect("controller key");
    let pkcs8 = secret.data.expect("data")[CONTROLLER_KEY_FIELD].0.clone();
    let controller = Signer::from_pkcs8(&pkcs8).expect("key");
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "tenant"}})).expect("ns");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
    let tenant: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "tenant");
    // (claim, namespace the request says the source is in, what the refusal says)
    let cases = [
        (
            "honest",
            "default",
            "in another namespace than this claim's (tenant)",
        ),
        ("lying", "tenant", "belongs to claim default/db-0"),
    ];
    for (name, source_ns, _) in cases {
        // A class localnfs does not serve: the controller leaves the claim alone.
        let mut pvc = claim(name, "someone-elses", "1Mi", json!({}));
        pvc.metadata.namespace = Some("tenant".into());
        let pvc = create_claim(&client, &pvc).await;
        let uid = pvc.uid().expect("uid");
        let request = VolumeRequest::clone_of(
            VolumeSpec::new(
                VolumeName::new(&format!("pvc-{uid}")).expect("name"),
                1 << 20,
            ),
            uid,
            "node-1".into(),
            CloneSource {
                volume: victim_volume.clone(),
                claim_uid: victim.uid().expect("uid"),
                namespace: source_ns.into(),
                claim: "db-0".into(),
            },
        );
        let annotations: BTreeMap<&str, String> =
            signed::request_annotations(&controller, &request)
                .expect("sign")
                .into_iter()
                .collect();
        tenant
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {
                    "labels": {NODE_KEY: "node-1"}, "annotations": annotations}})),
            )
            .await
            .expect("place the claim");
    }
    for (name, _, words) in cases {
        event_saying(&client, "tenant", name, "ProvisioningFailed", words).await;
        // The agent sends the event first, then answers on the claim.
        eventually(&format!("{name}: the refusal answer"), WAIT, || async {
            let claim = tenant.get(name).await.ok()?;
            claim.annotations().contains_key(REFUSED).then_some(())
        })
        .await;
    }
    assert_eq!(
        volume_dirs(&lnfs, "node-1"),
        vec![victim_volume.to_string()],
        "a volume was made from another namespace's data\n{}",
        lnfs.logs()
    );
    assert_eq!(std::fs::read(&victim_file).expect("victim data"), b"rows");
}

#[tokio::test]
async fn a_statefulsets_new_replicas_start_from_ordinal_0s_data() {
    let (cluster, lnfs) = start_localnfs(&[("node-1", ip(151), "5Gi")]).await;
    let client = cluster.client();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    // The design the README shows: the template's dataSource names ordinal 0's claim;
    // ordinal 0's own claim (made from the same template) names itself and starts
    // empty, every later ordinal's claim clones it.
    let sts: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "db"},
        "spec": {
            "serviceName": "db", "replicas": 2,
            "selector": {"matchLabels": {"app": "db"}},
            "template": {"metadata": {"labels": {"app": "db"}}, "spec": {
                "containers": [{"name": "db", "image": "db"}]}},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {
                "accessModes": ["ReadWriteOnce"], "storageClassName": "now",
                "resources": {"requests": {"storage": "1Mi"}},
                "dataSource": {"kind": "PersistentVolumeClaim", "name": "data-db-0"}}}],
        },
    }))
    .expect("sts");
    Api::<StatefulSet>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &sts)
        .await
        .expect("create StatefulSet");
    let first = volume_dir(&client, &lnfs, "node-1", "data-db-0").await;
    assert!(files(&first).is_empty(), "ordinal 0 must start empty");
    event_saying(
        &client,
        "default",
        "data-db-0",
        "Provisioning",
        "the claim's dataSource names the claim itself",
    )
    .await;
    // Ordinal 0 runs and writes its data; only then (OrderedReady) is ordinal 1 made.
    let data = write_data(&first);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    eventually("db-0 scheduled", WAIT, || async {
        pods.get("db-0").await.ok()?.spec?.node_name
    })
    .await;
    kubelet::mark_pod_ready(&client, "default", "db-0")
        .await
        .expect("db-0 ready");
    let second = volume_dir(&client, &lnfs, "node-1", "data-db-1").await;
    let claim1 = Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .get("data-db-1")
        .await
        .expect("data-db-1");
    assert_eq!(
        claim1.spec.and_then(|s| s.data_source).map(|d| d.name),
        Some("data-db-0".to_owned()),
        "the StatefulSet controller copies the template's dataSource"
    );
    assert_eq!(
        files(&second),
        data,
        "ordinal 1 does not hold ordinal 0's data"
    );
}

#[tokio::test]
async fn an_agent_killed_mid_clone_leaves_nothing_half_made_and_clones_after_restart() {
    let (cluster, mut lnfs) = start_localnfs(&[("node-1", ip(171), "5Gi")]).await;
    let client = cluster.client();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    create_claim(&client, &claim("big", "now", "1Gi", json!({}))).await;
    let src = volume_dir(&client, &lnfs, "node-1", "big").await;
    let mut data = write_data(&src);
    // Enough data that the copy is still running when the agent is killed.
    let chunk: Vec<u8> = (0..32u32 << 20).map(|i| (i % 253) as u8).collect();
    for i in 0..12 {
        let name = format!("db/chunk-{i}");
        std::fs::write(src.join(&name), &chunk).expect("write chunk");
        data.insert(name, chunk.clone());
    }

    let uid = create_claim(&client, &claim("copy", "now", "1Gi", clone_of("big")))
        .await
        .uid()
        .expect("uid");
    let root = lnfs.root("node-1");
    let volume = format!("pvc-{uid}");
    let partial = root.join("staging").join(format!("{volume}.partial"));
    let meta = root.join("meta").join(format!("{volume}.json"));
    eventually("the copy under way", WAIT, || async {
        tokio::time::sleep(Duration::from_millis(2)).await;
        partial.exists().then_some(())
    })
    .await;
    lnfs.stop_agent("node-1").await;
    assert!(
        !meta.exists(),
        "the copy finished before the agent was killed: give the source more data"
    );
    assert!(
        !volume_dirs(&lnfs, "node-1").contains(&volume) || partial.exists(),
        "a volume directory without its copy's staging: half-made"
    );
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let c = claims.get("copy").await.expect("claim");
    assert!(
        !c.annotations().contains_key(localnfs::objects::keys::READY),
        "answered ready for a copy that never finished"
    );

    // The request is still on the claim: the restarted agent throws the unfinished
    // copy away and makes it again.
    lnfs.start_agent_with("node-1", ip(171), &["--capacity", "5Gi"]);
    let copy_dir = volume_dir(&client, &lnfs, "node-1", "copy").await;
    assert_eq!(files(&copy_dir), data, "the clone made after the restart");
    assert!(
        !partial.exists(),
        "the killed copy's staging is left behind"
    );
    assert_eq!(files(&src), data, "the source changed");
}
