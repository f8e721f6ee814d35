//! Least privilege for node agents (issue 14 item 6), on the real control plane with
//! the shipped RBAC (`deploy/base/rbac.yaml`), agent pods made from the shipped DaemonSet
//! template, pod-bound tokens, and the shipped write guard (`deploy/base/webhook.yaml`)
//! served by the scheduler helper. RBAC lets the agents' service account patch every
//! claim and PV and every Lease of the namespace; the guard is what keeps an agent to
//! its own node's objects, so every refusal below fails without it.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use localnfs::objects::keys::{READY, SIZE};
use localnfs_testbed::{TestCluster, kubelet};
use serde_json::json;
use support::cluster::*;
use support::credentials::*;
use support::eventually;

const WAIT: Duration = Duration::from_secs(90);
const NODES: [(&str, u8); 2] = [("node-1", 161), ("node-2", 162)];

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

struct Env {
    // Field order matters: processes stop before the control plane.
    lnfs: Localnfs,
    cluster: TestCluster,
    client: Client,
    webhook_port: u16,
    extender_port: u16,
}

/// The shipped namespace and RBAC, the write guard, the helper, two nodes whose agents
/// run with pod-bound tokens, the controller (as admin), and a WaitForFirstConsumer
/// class with expansion.
async fn setup() -> Env {
    let cluster = TestCluster::start().await.expect("control plane");
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    apply_namespace_and_rbac(cluster.kubeconfig());
    let (webhook_port, extender_port) = (free_port(), free_port());
    register_agent_guard(&client, cluster.kubeconfig(), webhook_port).await;
    lnfs.start_scheduler(&client, webhook_port, extender_port)
        .await;
    for (node, last) in NODES {
        kubelet::add_node(&client, node, ip(last))
            .await
            .expect("node");
        lnfs.use_pod_credentials(&client, node).await;
        lnfs.start_agent_with(node, ip(last), &["--capacity", "10Gi"]);
    }
    lnfs.start_controller();
    storage_class(&client, "wait", json!({})).await;
    for (node, _) in NODES {
        wait_for_heartbeat(&client, node).await;
    }
    Env {
        lnfs,
        cluster,
        client,
        webhook_port,
        extender_port,
    }
}

/// Creates claim `name` as if the scheduler had picked `node`; returns its PV.
async fn claim_on(client: &Client, name: &str, node: &str) -> PersistentVolume {
    let mut c = claim(name, "wait", "1Mi", json!({}));
    c.metadata.annotations = Some(
        [(
            "volume.kubernetes.io/selected-node".to_owned(),
            node.to_owned(),
        )]
        .into(),
    );
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &c)
        .await
        .expect("create claim");
    bound_pv(client, name).await
}

/// The client agent-`node` runs with (its pod-bound token).
async fn agent_client(lnfs: &Localnfs, node: &str) -> Client {
    localnfs::kubeclient::from_kubeconfig(&lnfs.agent_kubeconfigs[node])
        .await
        .expect("agent client")
}

fn merge(v: serde_json::Value) -> Patch<serde_json::Value> {
    Patch::Merge(v)
}

/// Asserts a write was refused by the guard (HTTP 403 from the webhook, with our
/// reason), not by RBAC or anything else.
fn refused<T: std::fmt::Debug>(what: &str, r: Result<T, kube::Error>, why: &str) {
    refused_by("agents.localnfs.io", what, r, why);
}

/// Asserts a write was refused by webhook `webhook` (HTTP 403) with `why` in its
/// message.
fn refused_by<T: std::fmt::Debug>(webhook: &str, what: &str, r: Result<T, kube::Error>, why: &str) {
    match r {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{what}: {s:?}");
            assert!(
                s.message.contains(webhook) && s.message.contains(why),
                "{what}: refused for another reason: {}",
                s.message
            );
        }
        other => panic!("{what}: must be refused, got {other:?}"),
    }
}

#[tokio::test]
async fn agents_with_pod_bound_tokens_provision_resize_and_reclaim_their_volumes() {
    let env = setup().await;
    let client = &env.client;
    // The heartbeat Lease carries the node label, so the fail-closed entry guards it.
    let lease = Api::<Lease>::namespaced(client.clone(), HEARTBEATS)
        .get("localnfs-node-node-1")
        .await
        .expect("lease");
    assert_eq!(lease.labels()["localnfs.io/node"], "node-1");

    let pv1 = claim_on(client, "one", "node-1").await;
    let pv2 = claim_on(client, "two", "node-2").await;
    assert_eq!(pv1.labels()["localnfs.io/node"], "node-1");
    assert_eq!(pv2.labels()["localnfs.io/node"], "node-2");
    assert!(volume_dirs(&env.lnfs, "node-1").contains(&nfs_target(&pv1).2));
    assert!(volume_dirs(&env.lnfs, "node-2").contains(&nfs_target(&pv2).2));

    // Resize: the agent writes the size annotation on its PV.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    claims
        .patch(
            "one",
            &PatchParams::default(),
            &merge(json!({"spec": {"resources": {"requests": {"storage": "2Mi"}}}})),
        )
        .await
        .expect("expand");
    eventually("claim one shows 2Mi", WAIT, || async {
        let c = claims.get("one").await.ok()?;
        (c.status?.capacity?.get("storage")?.0 == "2Mi").then_some(())
    })
    .await;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let resized = pvs.get(&pv1.name_any()).await.expect("pv");
    assert_eq!(resized.annotations()[SIZE], (2 << 20).to_string());

    // Reclaim: the agent removes the directory and our finalizer from its PV.
    claims
        .delete("one", &DeleteParams::default())
        .await
        .expect("delete claim");
    wait_pv_gone(client, &pv1.name_any()).await;
    assert!(
        !volume_dirs(&env.lnfs, "node-1").contains(&nfs_target(&pv1).2),
        "directory reclaimed"
    );
    let logs = env.lnfs.logs();
    assert!(
        !logs.contains("refused a node agent's write"),
        "the guard refused an agent's own work:\n{logs}"
    );
}

#[tokio::test]
async fn an_agents_credentials_cannot_touch_another_nodes_objects() {
    let mut env = setup().await;
    let client = env.client.clone();
    let kubeconfig = env.cluster.kubeconfig().to_owned();
    let pv1 = claim_on(&client, "one", "node-1").await;
    let pv2 = claim_on(&client, "two", "node-2").await;
    wait_for_leader(&client).await;

    // RBAC alone would let it: the guard is what refuses.
    let can = kubectl(
        &kubeconfig,
        &[
            "auth",
            "can-i",
            "patch",
            "persistentvolumes",
            "--as=system:serviceaccount:localnfs-system:localnfs-node",
        ],
    );
    assert_eq!(can.trim(), "yes");

    let agent1 = agent_client(&env.lnfs, "node-1").await;
    let pvs: Api<PersistentVolume> = Api::all(agent1.clone());
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(agent1.clone(), "default");
    let leases: Api<Lease> = Api::namespaced(agent1.clone(), HEARTBEATS);
    let pp = PatchParams::default();

    refused(
        "agent-1 patching node-2's PV",
        pvs.patch(
            &pv2.name_any(),
            &pp,
            &merge(json!({"metadata": {"annotations": {SIZE: "1"}}})),
        )
        .await,
        "is not placed on node node-1",
    );
    refused(
        "agent-1 answering for node-2's claim",
        claims
            .patch(
                "two",
                &pp,
                &merge(json!({"metadata": {"annotations": {READY: "x"}}})),
            )
            .await,
        "is not placed on node node-1",
    );
    // The controller's leader Lease is in another namespace, where RBAC gives the
    // agents no Leases at all: no webhook is asked, so none can let it through.
    match Api::<Lease>::namespaced(agent1.clone(), NAMESPACE)
        .patch(
            "localnfs-controller",
            &pp,
            &merge(json!({"spec": {"holderIdentity": "agent-1"}})),
        )
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{s:?}");
            assert!(
                s.message.contains("cannot patch resource \"leases\""),
                "agent-1 taking the controller's leader Lease: {}",
                s.message
            );
        }
        other => panic!("agent-1 took the controller's leader Lease: {other:?}"),
    }
    refused(
        "agent-1 writing node-2's heartbeat",
        leases
            .patch(
                "localnfs-node-node-2",
                &pp,
                &merge(json!({"metadata": {"annotations": {"localnfs.io/free-bytes": "0"}}})),
            )
            .await,
        "may only write its own Lease",
    );
    let forged: Lease = serde_json::from_value(json!({
        "metadata": {"name": "localnfs-node-node-3", "labels": {"localnfs.io/node": "node-3"}},
        "spec": {"holderIdentity": "node-3"},
    }))
    .expect("lease");
    refused(
        "agent-1 announcing a node of its own invention",
        leases.create(&PostParams::default(), &forged).await,
        "may only write its own Lease",
    );
    refused(
        "agent-1 changing its own PV's reclaim policy",
        pvs.patch(
            &pv1.name_any(),
            &pp,
            &merge(json!({"spec": {"persistentVolumeReclaimPolicy": "Retain"}})),
        )
        .await,
        "not spec.persistentVolumeReclaimPolicy",
    );
    refused(
        "agent-1 handing its claim to node-2",
        claims
            .patch(
                "one",
                &pp,
                &merge(json!({"metadata": {"labels": {"localnfs.io/node": "node-2"}}})),
            )
            .await,
        "would no longer be placed on node node-1",
    );
    // What is its own is still its own.
    leases
        .patch(
            "localnfs-node-node-1",
            &pp,
            &merge(json!({"metadata": {"annotations": {"test": "mine"}}})),
        )
        .await
        .expect("agent-1 writes its own heartbeat Lease");

    // Tokens that name no pod name no node: refused, even for node-1's own claim.
    for (kind, token) in [
        ("unbound TokenRequest", agent_token(&client, None).await),
        ("legacy Secret token", legacy_agent_token(&client).await),
    ] {
        let c = client_with_token(&kubeconfig, &token, env.lnfs.dir.path(), "unbound").await;
        refused(
            kind,
            Api::<PersistentVolumeClaim>::namespaced(c, "default")
                .patch(
                    "one",
                    &pp,
                    &merge(json!({"metadata": {"annotations": {READY: "x"}}})),
                )
                .await,
            "bound to no pod",
        );
    }

    // A token outlives nothing: once its pod is gone the API server itself refuses it
    // (so the helper may cache pod uid → node).
    let spare = agent_pod(&client, &kubeconfig, "spare").await;
    let token = agent_token(&client, Some(&spare)).await;
    Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .delete(&spare.name_any(), &DeleteParams::default().grace_period(0))
        .await
        .expect("delete spare pod");
    let gone = client_with_token(&kubeconfig, &token, env.lnfs.dir.path(), "gone").await;
    let c: Api<PersistentVolumeClaim> = Api::namespaced(gone, "default");
    let err = eventually("the deleted pod's token refused", WAIT, || async {
        match c.get("one").await {
            Err(kube::Error::Api(s)) if s.code == 401 => Some(s),
            _ => None,
        }
    })
    .await;
    assert_eq!(err.code, 401);

    // Helper down: writes to our objects fail closed, for the agent too; writes to
    // objects that are not ours (a PV of another provisioner) go through.
    env.lnfs.stop_scheduler().await;
    let err = pvs
        .patch(
            &pv2.name_any(),
            &pp,
            &merge(json!({"metadata": {"annotations": {SIZE: "1"}}})),
        )
        .await
        .expect_err("agent-1 patching node-2's PV with the helper down");
    assert!(
        matches!(&err, kube::Error::Api(s) if s.message.contains("failed calling webhook")),
        "{err:?}"
    );
    let admin_pvs: Api<PersistentVolume> = Api::all(client.clone());
    let other: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": "not-ours"},
        "spec": {"capacity": {"storage": "1Mi"}, "accessModes": ["ReadWriteOnce"],
                 "hostPath": {"path": "/tmp/not-ours"}},
    }))
    .expect("pv");
    admin_pvs
        .create(&PostParams::default(), &other)
        .await
        .expect("create another provisioner's PV");
    admin_pvs
        .patch(
            "not-ours",
            &pp,
            &merge(json!({"metadata": {"annotations": {"x": "y"}}})),
        )
        .await
        .expect("a PV that is not ours is writable with the helper down");

    // Back up: the agents' own work flows again.
    env.lnfs
        .restart_scheduler(env.webhook_port, env.extender_port);
    let pv3 = claim_on(&client, "three", "node-2").await;
    assert_eq!(pv3.labels()["localnfs.io/node"], "node-2");
}

/// A tenant of namespace `default` (a service account there that may create, update
/// and delete claims, nothing else), as a client.
async fn tenant(client: &Client, kubeconfig: &std::path::Path, dir: &std::path::Path) -> Client {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let pp = PostParams::default();
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "tenant"}})).expect("sa");
    Api::<ServiceAccount>::namespaced(client.clone(), "default")
        .create(&pp, &sa)
        .await
        .expect("tenant account");
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "claims"},
        "rules": [{"apiGroups": [""], "resources": ["persistentvolumeclaims"],
                   "verbs": ["get", "list", "create", "update", "patch", "delete"]}],
    }))
    .expect("role");
    Api::<Role>::namespaced(client.clone(), "default")
        .create(&pp, &role)
        .await
        .expect("tenant role");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "tenant-claims"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "claims"},
        "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": "default"}],
    }))
    .expect("binding");
    Api::<RoleBinding>::namespaced(client.clone(), "default")
        .create(&pp, &binding)
        .await
        .expect("tenant binding");
    let token = account_token(client, "default", "tenant", None).await;
    client_with_token(kubeconfig, &token, dir, "tenant").await
}

/// Asserts a claim write was refused by the claim webhook with `message`.
fn refused_claim<T: std::fmt::Debug>(what: &str, r: Result<T, kube::Error>, message: &str) {
    refused_by("claims.localnfs.io", what, r, message);
}

#[tokio::test]
async fn a_tenants_forged_localnfs_keys_on_claims_are_refused_with_the_key_to_drop() {
    let cluster = TestCluster::start().await.expect("control plane");
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    apply_namespace_and_rbac(cluster.kubeconfig());
    let (webhook_port, extender_port) = (free_port(), free_port());
    register_validating(&client, cluster.kubeconfig(), CLAIM_GUARD, webhook_port).await;
    lnfs.start_scheduler(&client, webhook_port, extender_port)
        .await;
    let tenant = tenant(&client, cluster.kubeconfig(), lnfs.dir.path()).await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(tenant, "default");
    let pp = PostParams::default();

    // A claim re-created from saved YAML, with another claim's answer on it.
    let mut copy = claim("copy", "wait", "1Mi", json!({}));
    copy.metadata.annotations = Some([(READY.to_owned(), "default-data-0-1234".to_owned())].into());
    refused_claim(
        "a claim created with a copied volume-ready",
        claims.create(&pp, &copy).await,
        "claim default/copy: annotation localnfs.io/volume-ready is written by localnfs only: remove it (a claim re-created from saved YAML must drop its localnfs.io/ keys)",
    );
    // The same for a label, a finalizer, and a key localnfs does not know yet.
    let mut labelled = claim("labelled", "wait", "1Mi", json!({}));
    labelled.metadata.labels = Some([("localnfs.io/node".to_owned(), "node-1".to_owned())].into());
    refused_claim(
        "a claim created with a node label",
        claims.create(&pp, &labelled).await,
        "label localnfs.io/node is written by localnfs only",
    );
    let mut finalized = claim("finalized", "wait", "1Mi", json!({}));
    finalized.metadata.finalizers = Some(vec!["localnfs.io/provisioning".to_owned()]);
    refused_claim(
        "a claim created with our finalizer",
        claims.create(&pp, &finalized).await,
        "finalizer localnfs.io/provisioning is written by localnfs only",
    );

    // A plain claim is the tenant's to make and change...
    claims
        .create(&pp, &claim("mine", "wait", "1Mi", json!({})))
        .await
        .expect("a plain claim");
    let patch = PatchParams::default();
    claims
        .patch(
            "mine",
            &patch,
            &merge(json!({"metadata": {"labels": {"tier": "gold"}}})),
        )
        .await
        .expect("a label of the tenant's own");
    // ...but not to mark for abandon or answer for.
    refused_claim(
        "a tenant adding abandon to its claim",
        claims
            .patch(
                "mine",
                &patch,
                &merge(json!({"metadata": {"annotations": {"localnfs.io/abandon": "true"}}})),
            )
            .await,
        "annotation localnfs.io/abandon is written by localnfs only: only the controller and the node agents add it",
    );

    // The controller's service account writes them.
    let token = account_token(&client, NAMESPACE, "localnfs-controller", None).await;
    let controller =
        client_with_token(cluster.kubeconfig(), &token, lnfs.dir.path(), "controller").await;
    Api::<PersistentVolumeClaim>::namespaced(controller, "default")
        .patch(
            "mine",
            &patch,
            &merge(json!({"metadata": {"labels": {"localnfs.io/node": "node-1"}}})),
        )
        .await
        .expect("the controller places a claim");
    // Once there, the tenant may not take it off, but may still annotate the claim.
    refused_claim(
        "a tenant removing the node label",
        claims
            .patch(
                "mine",
                &patch,
                &merge(json!({"metadata": {"labels": {"localnfs.io/node": null}}})),
            )
            .await,
        "label localnfs.io/node is written by localnfs only: only the controller and the node agents remove it",
    );
    claims
        .patch(
            "mine",
            &patch,
            &merge(json!({"metadata": {"annotations": {"note": "mine"}}})),
        )
        .await
        .expect("an annotation of the tenant's own on a placed claim");

    // failurePolicy Ignore: with the helper down, claim writes go through (the
    // controller and the agents verify what they read; this is not the boundary).
    lnfs.stop_scheduler().await;
    claims
        .create(&pp, &claim("while-down", "wait", "1Mi", json!({})))
        .await
        .expect("claims can be made while the helper is down");
}
