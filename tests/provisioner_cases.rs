//! Provisioner behaviour beyond the seed scenario: placement across nodes, bad
//! requests, expansion, reclaim policies, claims deleted mid-way.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use localnfs_testbed::{TestCluster, kubelet};
use nfs3_types::nfs3::{nfs_fh3, nfsstat3, stable_how};
use serde_json::json;
use support::cluster::*;
use support::eventually;
use support::nfs::Client as NfsClient;

const WAIT: Duration = Duration::from_secs(90);
const MIB: u64 = 1 << 20;

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

#[tokio::test]
async fn volumes_land_on_the_node_the_scheduler_picked() {
    let cluster = TestCluster::start().await.expect("control plane");
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    let kernel = lnfs
        .start_kernel_nodes_and_controller(&client, &[("node-1", "10Gi"), ("node-2", "10Gi")])
        .await;
    storage_class(&client, "local", json!({})).await;
    let _kubelet = NfsKubelet::start(client.clone(), "default", &kernel);
    let sts: StatefulSet = serde_json::from_value(json!({
        "metadata": {"name": "db"},
        "spec": {
            "serviceName": "db", "replicas": 4, "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {"app": "db"}},
            "template": {"metadata": {"labels": {"app": "db"}}, "spec": {
                "containers": [{"name": "db", "image": "db"}],
                "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                    "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "db"}}}],
            }},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {
                "accessModes": ["ReadWriteOnce"], "storageClassName": "local",
                "resources": {"requests": {"storage": "1Gi"}}}}],
        },
    }))
    .expect("sts");
    Api::<StatefulSet>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &sts)
        .await
        .expect("create");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut nodes_used = std::collections::BTreeSet::new();
    for i in 0..4 {
        let pv = bound_pv(&client, &format!("data-db-{i}")).await;
        let pod = eventually("pod scheduled", WAIT, || async {
            pods.get(&format!("db-{i}")).await.ok()?.spec?.node_name
        })
        .await;
        let (server, _, volume) = nfs_target(&pv);
        let want_ip = kernel.agent_ip(&pod);
        assert_eq!(
            server, want_ip,
            "db-{i} runs on {pod} but its volume is served from {server}"
        );
        assert!(
            volume_dirs(&lnfs, &pod).contains(&volume),
            "{volume} not on {pod}'s disk\n{}",
            lnfs.logs()
        );
        nodes_used.insert(pod);
    }
    assert_eq!(
        nodes_used.len(),
        2,
        "spread constraint should use both nodes"
    );

    // `localnfs status` lists each volume on its node with what its files use on disk
    // (the test-kubelet wrote "<claim>" into <claim>.txt: one 4 KiB block), from the
    // agents' heartbeats, which follow within seconds.
    let table = eventually("status with usage", WAIT, || async {
        let t = status(cluster.kubeconfig()).await;
        let rows: Vec<String> = t
            .lines()
            .filter(|l| l.contains("default/data-db-"))
            .map(String::from)
            .collect();
        (rows.len() == 4
            && rows
                .iter()
                .all(|r| r.contains(" 4.0 KiB ") && r.ends_with("Bound")))
        .then_some(t)
    })
    .await;
    for node in ["node-1", "node-2"] {
        let line = table
            .lines()
            .find(|l| l.starts_with(node))
            .expect("node line");
        assert!(
            line.contains(" up ") && line.trim_end().ends_with(" 2"),
            "{table}"
        );
    }
}

#[tokio::test]
async fn immediate_claims_go_to_the_node_with_most_room_and_oversized_ones_fail() {
    let (cluster, lnfs) = start_localnfs(&[("small", ip(21), "2Gi"), ("big", ip(22), "5Gi")]).await;
    let client = cluster.client();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    claims
        .create(&PostParams::default(), &claim("a", "now", "1Gi", json!({})))
        .await
        .expect("a");
    let pv = bound_pv(&client, "a").await;
    assert_eq!(
        nfs_target(&pv).0,
        ip(22),
        "the node with most room should get it"
    );
    claims
        .create(
            &PostParams::default(),
            &claim("huge", "now", "6Gi", json!({})),
        )
        .await
        .expect("huge");
    let evs = eventually("ProvisioningFailed for huge", WAIT, || async {
        let e = events(&client, "huge").await;
        e.iter()
            .any(|(r, _)| r == "ProvisioningFailed")
            .then_some(e)
    })
    .await;
    assert!(
        evs.iter().any(|(_, m)| m.contains("no node has room")),
        "{evs:?}"
    );
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    assert_eq!(
        pvs.list(&ListParams::default())
            .await
            .expect("pvs")
            .items
            .len(),
        1
    );
    assert_eq!(
        volume_dirs(&lnfs, "small").len() + volume_dirs(&lnfs, "big").len(),
        1
    );
}

#[tokio::test]
async fn bad_requests_get_provisioning_failed_events_and_nothing_is_made() {
    let (cluster, lnfs) = start_localnfs(&[("node-1", ip(31), "10Gi")]).await;
    let client = cluster.client();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    storage_class(
        &client,
        "typo",
        json!({"volumeBindingMode": "Immediate", "parameters": {"localty": "strict"}}),
    )
    .await;
    storage_class(
        &client,
        "nofiles",
        json!({"volumeBindingMode": "Immediate", "parameters": {"maxFiles": "0"}}),
    )
    .await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let cases = [
        (
            "no-files",
            claim("no-files", "nofiles", "1Gi", json!({})),
            "maxFiles=\"0\" is invalid",
        ),
        (
            "block",
            claim("block", "now", "1Gi", json!({"volumeMode": "Block"})),
            "Block",
        ),
        (
            "selector",
            claim(
                "selector",
                "now",
                "1Gi",
                json!({"selector": {"matchLabels": {"a": "b"}}}),
            ),
            "selector",
        ),
        (
            // Clones of claims are provisioned (tests/clones.rs); snapshots are not.
            "snapshot",
            claim(
                "snapshot",
                "now",
                "1Gi",
                json!({"dataSource": {"kind": "VolumeSnapshot", "apiGroup": "snapshot.storage.k8s.io", "name": "snap"}}),
            ),
            "dataSource of kind VolumeSnapshot.snapshot.storage.k8s.io is not supported",
        ),
        (
            "unknown-param",
            claim("unknown-param", "typo", "1Gi", json!({})),
            "unknown StorageClass parameter \"localty\"",
        ),
        (
            "zero",
            claim("zero", "now", "0", json!({})),
            "greater than zero",
        ),
    ];
    for (name, c, want) in cases {
        if let Err(e) = claims.create(&PostParams::default(), &c).await {
            // The API server itself may refuse some (that is a refusal too).
            eprintln!("{name}: refused by the API server: {e}");
            continue;
        }
        let evs = eventually(&format!("event for {name}"), WAIT, || async {
            let e = events(&client, name).await;
            e.iter()
                .any(|(r, _)| r == "ProvisioningFailed")
                .then_some(e)
        })
        .await;
        assert!(evs.iter().any(|(_, m)| m.contains(want)), "{name}: {evs:?}");
    }
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    assert!(
        pvs.list(&ListParams::default())
            .await
            .expect("pvs")
            .items
            .is_empty()
    );
    assert!(
        volume_dirs(&lnfs, "node-1").is_empty(),
        "{:?}",
        volume_dirs(&lnfs, "node-1")
    );
}

#[tokio::test]
async fn expansion_raises_the_limit_then_pv_then_claim() {
    let (cluster, _lnfs) = start_localnfs(&[("node-1", ip(41), "10Gi")]).await;
    let client = cluster.client();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    claims
        .create(
            &PostParams::default(),
            &claim("grow", "now", "1Mi", json!({})),
        )
        .await
        .expect("create");
    let pv = bound_pv(&client, "grow").await;
    // A pod on node-1 uses the claim: the volume is published to node-1's address.
    pod_on(&client, "grower", "node-1", &["grow"]).await;
    wait_published(&client, &pv.name_any(), &["node-1"]).await;
    let (server, port, volume) = nfs_target(&pv);
    let mut c =
        NfsClient::mount_when_granted(std::net::SocketAddr::new(server, port), &volume, server)
            .await;
    let root = c.root.clone();
    let f = c.create(&root, b"f", 0o644).await.expect("create");
    // WRITEs of at most 1 MiB (the server's wtmax): the first fills the volume.
    let one_mib = vec![1u8; MIB as usize];
    c.write(&f, 0, &one_mib, stable_how::FILE_SYNC)
        .await
        .expect("fits exactly");
    let more = vec![2u8; 512 * 1024];
    assert_eq!(
        c.write(&f, MIB, &more, stable_how::FILE_SYNC).await.err(),
        Some(nfsstat3::NFS3ERR_DQUOT)
    );

    claims
        .patch(
            "grow",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": "2Mi"}}}})),
        )
        .await
        .expect("expand");
    eventually("claim status shows 2Mi", WAIT, || async {
        let c = claims.get("grow").await.ok()?;
        (c.status?.capacity?.get("storage")?.0 == "2Mi").then_some(())
    })
    .await;
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get(&pv.name_any())
        .await
        .expect("pv");
    assert_eq!(
        pv.spec.and_then(|s| s.capacity).expect("capacity")["storage"].0,
        "2Mi"
    );
    c.write(&f, MIB, &more, stable_how::FILE_SYNC)
        .await
        .expect("fits after expansion, same mount");
    assert_eq!(c.fsstat().await.expect("fsstat").tbytes, 2 * MIB);

    let shrink = claims
        .patch(
            "grow",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": "1Mi"}}}})),
        )
        .await;
    assert!(shrink.is_err(), "shrinking a claim must be refused");
}

#[tokio::test]
async fn retain_keeps_the_data_and_archive_moves_it_aside() {
    let (cluster, lnfs) = start_localnfs(&[("node-1", ip(51), "10Gi")]).await;
    let client = cluster.client();
    storage_class(
        &client,
        "keep",
        json!({"volumeBindingMode": "Immediate", "reclaimPolicy": "Retain"}),
    )
    .await;
    storage_class(
        &client,
        "arch",
        json!({"volumeBindingMode": "Immediate", "parameters": {"onDelete": "archive"}}),
    )
    .await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    claims
        .create(
            &PostParams::default(),
            &claim("kept", "keep", "1Mi", json!({})),
        )
        .await
        .expect("kept");
    claims
        .create(
            &PostParams::default(),
            &claim("archived", "arch", "1Mi", json!({})),
        )
        .await
        .expect("archived");
    let kept = bound_pv(&client, "kept").await;
    let archived = bound_pv(&client, "archived").await;
    pod_on(&client, "user", "node-1", &["kept", "archived"]).await;
    for pv in [&kept, &archived] {
        wait_published(&client, &pv.name_any(), &["node-1"]).await;
        let (server, port, volume) = nfs_target(pv);
        let mut c =
            NfsClient::mount_when_granted(std::net::SocketAddr::new(server, port), &volume, server)
                .await;
        let root = c.root.clone();
        let f = c.create(&root, b"precious", 0o644).await.expect("create");
        c.write(&f, 0, b"rows", stable_how::FILE_SYNC)
            .await
            .expect("write");
    }
    // The pod goes first: a claim in use is not deleted (pvc-protection).
    delete_pod_now(&client, "user").await;
    claims
        .delete("kept", &DeleteParams::default())
        .await
        .expect("delete");
    claims
        .delete("archived", &DeleteParams::default())
        .await
        .expect("delete");
    wait_pv_gone(&client, &archived.name_any()).await;
    let archive = lnfs.root("node-1").join("archive");
    let moved: Vec<_> = std::fs::read_dir(&archive)
        .expect("archive dir")
        .flatten()
        .collect();
    assert_eq!(moved.len(), 1);
    assert_eq!(
        std::fs::read(moved[0].path().join("precious")).expect("archived data"),
        b"rows"
    );

    eventually("kept PV Released", WAIT, || async {
        (pvs.get(&kept.name_any()).await.ok()?.status?.phase? == "Released").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kept_dir = lnfs
        .root("node-1")
        .join("volumes")
        .join(nfs_target(&kept).2);
    assert_eq!(
        std::fs::read(kept_dir.join("precious")).expect("retained data"),
        b"rows"
    );
    assert!(
        pvs.get_opt(&kept.name_any()).await.expect("get").is_some(),
        "a Retain PV was deleted"
    );
}

#[tokio::test]
async fn a_claim_deleted_mid_provisioning_leaves_nothing_behind() {
    let (cluster, mut lnfs) = start_localnfs(&[("node-1", ip(61), "10Gi")]).await;
    let client = cluster.client();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    // The agent has announced itself, then stops: the controller places the claim on
    // node-1 but nobody creates the volume yet.
    wait_for_heartbeat(&client, "node-1").await;
    lnfs.stop_agent("node-1").await;
    claims
        .create(
            &PostParams::default(),
            &claim("gone", "now", "1Mi", json!({})),
        )
        .await
        .expect("create");
    eventually("claim placed on node-1", WAIT, || async {
        claims
            .get("gone")
            .await
            .ok()?
            .labels()
            .get("localnfs.io/node")
            .map(|_| ())
    })
    .await;
    claims
        .delete("gone", &DeleteParams::default())
        .await
        .expect("delete");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        claims.get_opt("gone").await.expect("get").is_some(),
        "finalizer should hold the claim until cleanup"
    );
    lnfs.start_agent_with("node-1", ip(61), &["--capacity", "10Gi"]);
    eventually("claim gone", WAIT, || async {
        claims.get_opt("gone").await.ok()?.is_none().then_some(())
    })
    .await;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    assert!(
        pvs.list(&ListParams::default())
            .await
            .expect("pvs")
            .items
            .is_empty()
    );
    assert!(volume_dirs(&lnfs, "node-1").is_empty());
}

/// A client of the agent at `server` from `from`, using handle `root` it got before
/// (no MOUNT): connects as soon as something listens there.
async fn reconnect(server: std::net::SocketAddr, from: IpAddr, root: &nfs_fh3) -> NfsClient {
    let conn = eventually("the agent listening", WAIT, || async {
        support::nfs::try_tcp_to(server, from).await.ok()
    })
    .await;
    NfsClient {
        nfs: nfs3_client::Nfs3Client::new_with_auth(
            conn,
            support::nfs::auth(0, 0),
            nfs3_types::rpc::opaque_auth::default(),
        ),
        root: root.clone(),
    }
}

/// DESIGN invariant 8 with a raw client: only node addresses may connect, and a volume
/// is served only to the nodes running pods that use its claim, as the controller
/// publishes them: MNT, EXPORT and every call with a handle follow the publication,
/// across agent restarts.
#[tokio::test]
async fn in_cluster_mode_a_volume_is_served_only_to_the_nodes_of_its_pods() {
    let cluster = TestCluster::start().await.expect("control plane");
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    kubelet::add_node(&client, "node-1", ip(91))
        .await
        .expect("node");
    // --allow replaces the loopback default: only node addresses (and this) remain. A
    // fixed port, so the restarted agent is where the PV points.
    let listen = std::net::SocketAddr::new(ip(91), free_port());
    let flags = ["--insecure-ports", "--allow", "127.0.0.250/32"];
    lnfs.start_agent_on("node-1", listen, &flags);
    lnfs.start_controller();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    claims
        .create(&PostParams::default(), &claim("v", "now", "1Mi", json!({})))
        .await
        .expect("create");
    let pv = bound_pv(&client, "v").await;
    let pv_name = pv.name_any();
    let (server, port, volume) = nfs_target(&pv);
    let addr = std::net::SocketAddr::new(server, port);
    assert_eq!(addr, listen);
    assert_eq!(published(&client, &pv_name).await, Some(vec![]));

    // The volume's own node runs no pod of the claim: not mountable, not listed.
    let refused = support::nfs::mount_at(addr, &volume, ip(91), 0, 0).await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("ACCES")),
        "{refused:?}"
    );
    assert!(support::nfs::exports_at(addr, ip(91)).await.is_empty());
    assert!(
        support::nfs::mount_at(addr, &volume, ip(92), 0, 0)
            .await
            .is_err(),
        "a non-node address mounted"
    );

    // node-2 joins the cluster and runs a pod using the claim.
    kubelet::add_node(&client, "node-2", ip(92))
        .await
        .expect("second node");
    pod_on(&client, "p", "node-2", &["v"]).await;
    wait_published(&client, &pv_name, &["node-2"]).await;
    eventually("node-2 mounts", WAIT, || async {
        support::nfs::mount_at(addr, &volume, ip(92), 0, 0)
            .await
            .ok()
    })
    .await;
    let mut c = NfsClient::mount_at(addr, &volume, ip(92), 0, 0).await;
    let root = c.root.clone();
    let f = c.create(&root, b"f", 0o644).await.expect("create");
    c.write(&f, 0, b"rows", stable_how::FILE_SYNC)
        .await
        .expect("write");
    let want = [format!("/{volume}")];
    assert_eq!(support::nfs::exports_at(addr, ip(92)).await, want);
    assert!(support::nfs::exports_at(addr, ip(91)).await.is_empty());
    assert!(support::nfs::exports_at(addr, ip(250)).await.is_empty());
    // A handle is no pass: node-1 holding node-2's handle gets ACCES on every call.
    let mut thief = reconnect(addr, ip(91), &root).await;
    assert_eq!(
        thief.getattr(&root).await.err(),
        Some(nfsstat3::NFS3ERR_ACCES)
    );
    assert_eq!(
        thief.read(&f, 0, 4).await.err(),
        Some(nfsstat3::NFS3ERR_ACCES)
    );

    // Agent restarts, with its saved copy of the rules and without: the first call
    // after either is answered by the rules, never served to everyone or refused.
    let saved_rules = lnfs.root("node-1").join("cluster-access.json");
    eventually("the agent's saved rules to grant node-2", WAIT, || async {
        let rules: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&saved_rules).ok()?).ok()?;
        (rules["volumes"][volume.as_str()] == json!(["127.0.0.92/32"])).then_some(())
    })
    .await;
    for saved in [true, false] {
        lnfs.stop_agent("node-1").await;
        if !saved {
            std::fs::remove_file(&saved_rules).expect("the agent saved its rules");
        }
        lnfs.start_agent_on("node-1", listen, &flags);
        let mut again = reconnect(addr, ip(92), &root).await;
        assert_eq!(
            again.read(&f, 0, 4).await.expect("read after restart"),
            b"rows",
            "saved copy: {saved}"
        );
        let mut thief = reconnect(addr, ip(91), &root).await;
        assert_eq!(
            thief.getattr(&root).await.err(),
            Some(nfsstat3::NFS3ERR_ACCES),
            "saved copy: {saved}"
        );
    }

    // The pod goes away: the handle node-2 holds stops working on its next call.
    let mut c = reconnect(addr, ip(92), &root).await;
    c.getattr(&root).await.expect("still published");
    delete_pod_now(&client, "p").await;
    wait_published(&client, &pv_name, &[]).await;
    let deadline = std::time::Instant::now() + WAIT;
    while c.getattr(&root).await.err() != Some(nfsstat3::NFS3ERR_ACCES) {
        assert!(std::time::Instant::now() < deadline, "node-2 kept access");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(c.read(&f, 0, 4).await.err(), Some(nfsstat3::NFS3ERR_ACCES));
    assert_eq!(
        c.write(&f, 0, b"more", stable_how::FILE_SYNC).await.err(),
        Some(nfsstat3::NFS3ERR_ACCES)
    );
    assert!(
        support::nfs::mount_at(addr, &volume, ip(92), 0, 0)
            .await
            .is_err()
    );
    assert!(support::nfs::exports_at(addr, ip(92)).await.is_empty());
}
