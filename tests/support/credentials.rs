//! Running localnfs under the credentials the install manifests give it: the real
//! RBAC from `deploy/base/rbac.yaml`, node-agent pods made from the real DaemonSet template
//! (`deploy/base/node.yaml`), pod-bound service-account tokens for them (what kubelet puts
//! in the projected volume), and the agents' write guard registered from the real
//! `deploy/base/webhook.yaml` with its clientConfig pointed at the test's helper.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Pod, Secret, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use super::cluster::NAMESPACE;

/// The agents' service account (deploy/base/rbac.yaml).
pub const AGENT_ACCOUNT: &str = "localnfs-node";
/// The agents' write guard (deploy/base/webhook.yaml).
pub const AGENT_GUARD: &str = "localnfs-agents";
/// The claim webhook (deploy/base/webhook.yaml).
pub const CLAIM_GUARD: &str = "localnfs-claims";

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join("base")
        .join(file)
}

/// Runs kubectl against the cluster of `kubeconfig`; panics with its output on failure.
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .expect("kubectl (Debian package kubernetes-client; scripts/deps installs it)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kubectl {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The objects of a manifest under `deploy/base/`, as JSON (kubectl reads the YAML).
pub fn manifest_objects(kubeconfig: &Path, file: &str) -> Vec<Value> {
    let path = deploy(file);
    let out = kubectl(
        kubeconfig,
        &[
            "create",
            "--dry-run=client",
            "-o",
            "json",
            "-f",
            path.to_str().expect("utf8"),
        ],
    );
    // One JSON document per object, one after the other.
    serde_json::Deserializer::from_str(&out)
        .into_iter::<Value>()
        .map(|v| v.expect("kubectl json"))
        .collect()
}

/// Applies the install's namespace (labels) and RBAC exactly as shipped.
pub fn apply_namespace_and_rbac(kubeconfig: &Path) {
    for file in ["namespace.yaml", "rbac.yaml"] {
        kubectl(
            kubeconfig,
            &["apply", "-f", deploy(file).to_str().expect("utf8")],
        );
    }
}

/// Registers the shipped ValidatingWebhookConfiguration with every webhook's
/// clientConfig replaced by `https://127.0.0.1:<port>/validate` (no Service here).
pub async fn register_agent_guard(client: &Client, kubeconfig: &Path, port: u16) {
    register_validating(client, kubeconfig, AGENT_GUARD, port).await;
}

/// Registers the shipped ValidatingWebhookConfiguration `name` with each webhook's
/// clientConfig replaced by `https://127.0.0.1:<port><its path>` (no Service here).
pub async fn register_validating(client: &Client, kubeconfig: &Path, name: &str, port: u16) {
    let mut config = manifest_objects(kubeconfig, "webhook.yaml")
        .into_iter()
        .find(|o| o["kind"] == "ValidatingWebhookConfiguration" && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("webhook.yaml has the ValidatingWebhookConfiguration {name}"));
    for w in config["webhooks"].as_array_mut().expect("webhooks") {
        let path = w["clientConfig"]["service"]["path"]
            .as_str()
            .expect("service path")
            .to_owned();
        w["clientConfig"] = json!({"url": format!("https://127.0.0.1:{port}{path}")});
    }
    let config: ValidatingWebhookConfiguration =
        serde_json::from_value(config).expect("ValidatingWebhookConfiguration");
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &config)
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
}

/// Whether the helper has written its CA into every webhook of the guard.
pub async fn agent_guard_trusted(client: &Client) -> bool {
    validating_trusted(client, AGENT_GUARD).await
}

/// Whether the helper has written its CA into every webhook of configuration `name`.
pub async fn validating_trusted(client: &Client, name: &str) -> bool {
    Api::<ValidatingWebhookConfiguration>::all(client.clone())
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|c| c.webhooks)
        .is_some_and(|ws| ws.iter().all(|w| w.client_config.ca_bundle.is_some()))
}

/// Creates the agent pod for `node` from the DaemonSet's pod template, bound to
/// `node` (nothing runs it: there is no kubelet; the test starts the agent process).
pub async fn agent_pod(client: &Client, kubeconfig: &Path, node: &str) -> Pod {
    let ds = manifest_objects(kubeconfig, "node.yaml")
        .into_iter()
        .find(|o| o["kind"] == "DaemonSet")
        .expect("node.yaml has the DaemonSet");
    let mut pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": ds["spec"]["template"]["metadata"].clone(),
        "spec": ds["spec"]["template"]["spec"].clone(),
    });
    pod["metadata"]["name"] = json!(format!("localnfs-node-{node}"));
    pod["metadata"]["namespace"] = json!(NAMESPACE);
    pod["spec"]["nodeName"] = json!(node);
    let pod: Pod = serde_json::from_value(pod).expect("pod");
    Api::<Pod>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &pod)
        .await
        .expect("create the agent pod from the DaemonSet template")
}

/// A token of the agents' service account bound to `pod` (what kubelet writes into
/// the projected volume), or bound to nothing when `pod` is `None`.
pub async fn agent_token(client: &Client, pod: Option<&Pod>) -> String {
    account_token(client, NAMESPACE, AGENT_ACCOUNT, pod).await
}

/// A token of service account `namespace/account`, bound to `pod` if given.
pub async fn account_token(
    client: &Client,
    namespace: &str,
    account: &str,
    pod: Option<&Pod>,
) -> String {
    let bound = pod
        .map(|p| json!({"kind": "Pod", "apiVersion": "v1", "name": p.name_any(), "uid": p.uid()}));
    let req: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": [], "expirationSeconds": 3600, "boundObjectRef": bound},
    }))
    .expect("token request");
    Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(account, &PostParams::default(), &req)
        .await
        .expect("TokenRequest")
        .status
        .expect("token status")
        .token
}

/// The legacy Secret token of the agents' service account (v1.20 still makes one per
/// service account; the DaemonSet no longer mounts it).
pub async fn legacy_agent_token(client: &Client) -> String {
    let sa = Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE);
    let secret = super::eventually(
        "the legacy token Secret of the agents' service account",
        std::time::Duration::from_secs(60),
        || async {
            sa.get(AGENT_ACCOUNT)
                .await
                .ok()?
                .secrets?
                .first()?
                .name
                .clone()
        },
    )
    .await;
    let s = Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .get(&secret)
        .await
        .expect("token secret");
    String::from_utf8(s.data.expect("data")["token"].0.clone()).expect("token utf8")
}

/// Writes a kubeconfig for the cluster of `admin` (same server and CA) that
/// authenticates with `token`.
pub fn kubeconfig_with_token(admin: &Path, token: &str, path: &Path) {
    let mut doc: Value =
        serde_json::from_slice(&std::fs::read(admin).expect("read kubeconfig")).expect("json");
    doc["users"] = json!([{"name": "admin", "user": {"token": token}}]);
    std::fs::write(path, serde_json::to_vec_pretty(&doc).expect("json")).expect("write");
}

/// A client authenticating with `token` (through a kubeconfig written into `dir`).
pub async fn client_with_token(admin: &Path, token: &str, dir: &Path, name: &str) -> Client {
    let path = dir.join(format!("{name}.kubeconfig"));
    kubeconfig_with_token(admin, token, &path);
    localnfs::kubeclient::from_kubeconfig(&path)
        .await
        .expect("client")
}
