//! The node agent's key Lease (`localnfs-key-<node>`, the public half of the key its
//! answers are signed with) comes back when deleted while the agent runs: without it
//! the controller cannot believe the agent's answers, so claims on that node would
//! wait for an agent restart.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams};
use localnfs::objects::agents::key_lease_name;
use localnfs::objects::keys::AGENT_KEY;
use localnfs_testbed::{TestCluster, kubelet};
use support::cluster::{HEARTBEATS, Localnfs, wait_for_heartbeat};
use support::credentials::apply_namespace_and_rbac;
use support::eventually;

fn key_of(lease: &Lease) -> Option<String> {
    lease.metadata.annotations.as_ref()?.get(AGENT_KEY).cloned()
}

#[tokio::test]
async fn a_deleted_key_lease_is_written_again_without_an_agent_restart() {
    let cluster = TestCluster::start().await.expect("control plane");
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    let (node, ip) = ("node-1", IpAddr::V4(Ipv4Addr::new(127, 0, 73, 1)));
    kubelet::add_node(&client, node, ip).await.expect("node");
    // The agent as the DaemonSet runs it: the shipped RBAC, a pod-bound token (its
    // watch of the key Lease needs what the install grants, not the admin's rights).
    apply_namespace_and_rbac(cluster.kubeconfig());
    lnfs.use_pod_credentials(&client, node).await;
    lnfs.start_agent(node, ip);
    wait_for_heartbeat(&client, node).await;
    let pid = lnfs.agents[node].id();
    let leases: Api<Lease> = Api::namespaced(client.clone(), HEARTBEATS);
    let name = key_lease_name(node);
    let key = eventually("the key Lease", Duration::from_secs(30), || async {
        key_of(&leases.get_opt(&name).await.ok()??)
    })
    .await;

    leases
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete the key Lease");
    // Well within one heartbeat (30 s): the agent watches its key Lease.
    let again = eventually("the key Lease again", Duration::from_secs(15), || async {
        key_of(&leases.get_opt(&name).await.ok()??)
    })
    .await;
    assert_eq!(again, key, "the same key, written again");
    assert_eq!(
        lnfs.agents[node].id(),
        pid,
        "the agent was not restarted\n{}",
        lnfs.logs()
    );
}
