//! Playing kubelet: the test cluster has none, so tests register Ready Nodes and report
//! pods Running and Ready themselves (after doing for real what a kubelet would, such
//! as mounting the pod's volume over NFS).

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::error::{Error, Result};

/// Registers a schedulable, Ready node called `name` with `internal_ip` as its
/// InternalIP, 8 CPUs, 32 GiB and room for 1000 pods (enough for the provisioning benchmark).
pub async fn add_node(client: &Client, name: &str, internal_ip: IpAddr) -> Result<Node> {
    add_node_with_addresses(client, name, &[internal_ip]).await
}

/// Same, with several InternalIPs (in this order), as a node with several interfaces
/// reports them.
pub async fn add_node_with_addresses(
    client: &Client,
    name: &str,
    internal_ips: &[IpAddr],
) -> Result<Node> {
    let nodes: Api<Node> = Api::all(client.clone());
    let mut addresses: Vec<_> = internal_ips
        .iter()
        .map(|ip| json!({"type": "InternalIP", "address": ip.to_string()}))
        .collect();
    addresses.push(json!({"type": "Hostname", "address": name}));
    let status = json!({
        "conditions": [ready_condition("KubeletReady", "test kubelet is posting ready status")],
        "addresses": addresses,
        "capacity": {"cpu": "8", "memory": "32Gi", "pods": "1000", "ephemeral-storage": "100Gi"},
        "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "1000", "ephemeral-storage": "100Gi"},
        "nodeInfo": {
            "architecture": "amd64", "operatingSystem": "linux",
            "kubeletVersion": super::K8S_VERSION, "kubeProxyVersion": super::K8S_VERSION,
            "bootID": "", "containerRuntimeVersion": "", "kernelVersion": "",
            "machineID": "", "osImage": "", "systemUUID": "",
        },
    });
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
        }},
        "status": status,
    }))
    .map_err(|e| Error::Kube {
        action: format!("build node {name}"),
        source: kube::Error::SerdeError(e),
    })?;
    nodes
        .create(&PostParams::default(), &node)
        .await
        .map_err(Error::kube(format!("create node {name}")))?;
    // Status on create is kept for nodes, but patch it anyway in case a future version
    // drops it; the TaintNodesByCondition admission plugin adds a not-ready taint on
    // create that only the node lifecycle controller (absent here) would remove.
    nodes
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .map_err(Error::kube(format!("set status of node {name}")))?;
    nodes
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": null}})),
        )
        .await
        .map_err(Error::kube(format!("remove taints from node {name}")))
}

/// Reports the pod Running with all its containers Ready, as a kubelet does once the
/// containers started and their readiness probes passed.
pub async fn mark_pod_ready(client: &Client, namespace: &str, name: &str) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = pods
        .get(name)
        .await
        .map_err(Error::kube(format!("get pod {namespace}/{name}")))?;
    let now = api_now();
    let containers: Vec<_> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .map(|c| {
            json!({
                "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
                "ready": true, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            })
        })
        .collect();
    let condition = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
    let status = json!({"status": {
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "podIP": "127.0.0.1",
        "startTime": now,
        "conditions": [
            condition("PodScheduled"), condition("Initialized"),
            condition("ContainersReady"), condition("Ready"),
        ],
        "containerStatuses": containers,
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .map_err(Error::kube(format!("mark pod {namespace}/{name} ready")))
}

/// Finishes a graceful pod deletion, as a kubelet does once the containers stopped
/// (without a kubelet, pods stay Terminating forever). Only this incarnation of the
/// pod: a StatefulSet pod recreated under the same name meanwhile is left alone.
pub async fn finish_pod_deletion(client: &Client, pod: &Pod) -> Result<()> {
    let (namespace, name) = (
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default(),
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let params = kube::api::DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(kube::api::Preconditions {
            uid: pod.metadata.uid.clone(),
            resource_version: None,
        }),
        ..kube::api::DeleteParams::default()
    };
    match pods.delete(name, &params).await {
        Ok(_) => Ok(()),
        // Gone, or a new pod of the same name (uid precondition failed).
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(Error::kube(format!(
            "finish deleting pod {namespace}/{name}"
        ))(e)),
    }
}

/// Whether a pod is Running and its Ready condition is True (what the StatefulSet
/// controller waits for).
pub fn is_running_and_ready(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return false;
    };
    status.phase.as_deref() == Some("Running")
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

fn ready_condition(reason: &str, message: &str) -> serde_json::Value {
    let now = api_now();
    json!({
        "type": "Ready", "status": "True", "reason": reason, "message": message,
        "lastHeartbeatTime": now, "lastTransitionTime": now,
    })
}

/// "now" as the API expects timestamps (RFC 3339, UTC).
fn api_now() -> serde_json::Value {
    json!(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::now()
    ))
}
