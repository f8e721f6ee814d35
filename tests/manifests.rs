//! The install manifests against a real v1.20 API server (the only control plane the
//! test machines have; newer versions get schema checks in scripts/check-manifests):
//! - `deploy/install-1.20.yaml` and the examples pass `kubectl apply --dry-run=server`,
//!   every object, PodDisruptionBudgets included;
//! - applied for real, the install puts a node agent on every node whatever its
//!   taints, at priority `system-node-critical`, with images pulled `IfNotPresent`;
//! - every component's pod spec (as the server defaults it) is admitted by the Pod
//!   Security level its namespace enforces in `deploy/install.yaml`, that level is no
//!   looser than its pods need, and the controller and the scheduler helper meet
//!   `restricted` (v1.20 has no Pod Security admission: the levels' rules are checked
//!   by tests/support/pod_security.rs).

#[path = "support/pod_security.rs"]
mod pod_security;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use localnfs_testbed::{ClusterOptions, TestCluster, kubelet};
use pod_security::Level;
use serde_json::Value;

const NAMESPACE: &str = "localnfs-system";

fn kubectl(kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("kubectl (Debian package kubernetes-client; scripts/deps installs it)");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().expect("kubectl");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        text.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    (out.status.success(), text)
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// YAML documents of a file, each with its apiVersion and kind (top-level keys).
fn documents(path: &Path) -> Vec<(String, String, String)> {
    let yaml = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    yaml.split("\n---")
        .filter_map(|doc| {
            let field = |name: &str| {
                doc.lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                    .map(|v| v.trim().to_owned())
            };
            Some((field("apiVersion")?, field("kind")?, doc.to_owned()))
        })
        .collect()
}

async fn start_cluster(controller_manager_args: &[&str]) -> TestCluster {
    TestCluster::start_with(ClusterOptions {
        controller_manager_args: controller_manager_args
            .iter()
            .map(|a| a.to_string())
            .collect(),
        ..ClusterOptions::default()
    })
    .await
    .expect("control plane")
}

/// The node agent's `/metrics` names volumes, namespaces and claims; on the host
/// network any address but loopback is the node network's. Its probes must reach it
/// there (kubelet's httpGet goes to the pod IP, the node's, unless told otherwise).
#[test]
fn node_agent_admin_listener_stays_on_loopback_and_probes_reach_it_there() {
    for install in ["deploy/install.yaml", "deploy/install-1.20.yaml"] {
        let (_, _, agent) = documents(&repo_file(install))
            .into_iter()
            .find(|(_, kind, doc)| kind == "DaemonSet" && doc.contains("name: localnfs-node"))
            .unwrap_or_else(|| panic!("{install}: the node agent's DaemonSet"));
        let admin: Vec<std::net::SocketAddr> = agent
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- --admin-addr="))
            .map(|a| a.parse().expect("an address"))
            .collect();
        assert!(
            !admin.is_empty() && admin.iter().all(|a| a.ip().is_loopback()),
            "{install}: the agent's admin listener binds {admin:?}"
        );
        assert!(
            !agent.contains("LOCALNFS_ADMIN_ADDR"),
            "{install}: the admin address is set once, by the flag"
        );
        let probes = agent.matches("httpGet:").count();
        assert!(
            probes > 0 && agent.matches("host: 127.0.0.1").count() == probes,
            "{install}: every httpGet probe goes to 127.0.0.1"
        );
    }
}

#[tokio::test]
async fn install_for_1_20_and_examples_pass_a_server_side_dry_run_on_v1_20() {
    let cluster = start_cluster(&[]).await;
    let kc = cluster.kubeconfig().to_owned();
    // Namespaced objects need their namespace to exist for a dry run.
    for ns in [NAMESPACE, "localnfs-heartbeats"] {
        let (ok, out) = kubectl(&kc, &["create", "namespace", ns], None);
        assert!(ok, "{out}");
    }

    let mut docs = documents(&repo_file("deploy/install-1.20.yaml"));
    let mut examples: Vec<_> = ["storageclass", "storageclass/workloads"]
        .iter()
        .flat_map(|d| std::fs::read_dir(repo_file(d)).expect("dir").flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 5, "examples missing: {examples:?}");
    for path in &examples {
        docs.extend(documents(path));
    }
    assert!(docs.len() > 25, "only {} objects found", docs.len());

    let mut accepted = BTreeMap::<String, usize>::new();
    let mut refused = Vec::new();
    for (api_version, kind, doc) in &docs {
        let (ok, out) = kubectl(&kc, &["apply", "--dry-run=server", "-f", "-"], Some(doc));
        if ok {
            *accepted.entry(format!("{api_version} {kind}")).or_default() += 1;
        } else {
            refused.push(format!("{api_version} {kind}: {out}"));
        }
    }
    eprintln!("dry-run on v1.20 accepted: {accepted:?}");
    assert!(
        refused.is_empty(),
        "refused by the v1.20 API server:\n{}",
        refused.join("\n")
    );
    assert_eq!(
        accepted.get("policy/v1beta1 PodDisruptionBudget"),
        Some(&2),
        "both PodDisruptionBudgets are part of the 1.20 install"
    );
}

#[tokio::test]
async fn install_puts_an_agent_on_every_node_whatever_its_taints() {
    // The DaemonSet controller decides which nodes get an agent (taints included);
    // kube-scheduler then binds the pods, checking the taints again.
    let cluster = start_cluster(&["--controllers=daemonset"]).await;
    let kc = cluster.kubeconfig().to_owned();
    let client = cluster.client();
    let taints = [
        ("plain", None),
        (
            "control-plane",
            Some(r#"{"key":"node-role.kubernetes.io/master","effect":"NoSchedule"}"#),
        ),
        (
            "db-only",
            Some(r#"{"key":"dedicated","value":"db","effect":"NoExecute"}"#),
        ),
    ];
    for (i, (node, taint)) in taints.iter().enumerate() {
        let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10 + i as u8));
        kubelet::add_node(&client, node, ip).await.expect("node");
        if let Some(taint) = taint {
            let patch = format!(r#"{{"spec":{{"taints":[{taint}]}}}}"#);
            let (ok, out) = kubectl(&kc, &["patch", "node", node, "-p", &patch], None);
            assert!(ok, "{out}");
        }
    }
    let install = repo_file("deploy/install-1.20.yaml");
    let (ok, out) = kubectl(&kc, &["apply", "-f", install.to_str().expect("utf8")], None);
    assert!(ok, "kubectl apply -f deploy/install-1.20.yaml: {out}");

    let wanted: BTreeSet<&str> = taints.iter().map(|(n, _)| *n).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    let pods = loop {
        let (ok, out) = kubectl(
            &kc,
            &[
                "get",
                "pods",
                "-n",
                NAMESPACE,
                "-o",
                "json",
                "-l",
                "app.kubernetes.io/name=localnfs-node",
            ],
            None,
        );
        assert!(ok, "{out}");
        let pods: Value = serde_json::from_str(&out).expect("pod list");
        let pods = pods["items"].as_array().cloned().unwrap_or_default();
        let bound: BTreeSet<&str> = pods
            .iter()
            .filter_map(|p| p["spec"]["nodeName"].as_str())
            .collect();
        if bound == wanted {
            break pods;
        }
        assert!(
            Instant::now() < deadline,
            "node agents bound to {bound:?} after 60 s, want one on each of {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for pod in &pods {
        let spec = &pod["spec"];
        assert_eq!(spec["priorityClassName"], "system-node-critical");
        // Set by the Priority admission plugin from the class: admitted at that priority.
        assert_eq!(spec["priority"], 2_000_001_000, "{}", spec["nodeName"]);
        for c in spec["containers"].as_array().expect("containers") {
            assert_eq!(c["imagePullPolicy"], "IfNotPresent", "{}", c["name"]);
        }
    }
}

#[tokio::test]
async fn each_component_meets_the_pod_security_level_its_namespace_enforces() {
    let cluster = start_cluster(&[]).await;
    let kc = cluster.kubeconfig().to_owned();
    let docs = documents(&repo_file("deploy/install.yaml"));

    // The namespace for real (its workloads need it for a dry run), then the
    // workloads as the server would store them, defaults filled in.
    // Every workload is in NAMESPACE (checked below); the other namespace holds
    // heartbeat Leases only.
    let namespaces: Vec<_> = docs.iter().filter(|d| d.1 == "Namespace").collect();
    assert_eq!(namespaces.len(), 2, "localnfs's and the heartbeats'");
    let ours = namespaces
        .iter()
        .find(|d| {
            d.2.lines()
                .any(|l| l.trim() == format!("name: {NAMESPACE}"))
        })
        .expect("localnfs's namespace");
    let (ok, out) = kubectl(&kc, &["apply", "-o", "json", "-f", "-"], Some(&ours.2));
    assert!(ok, "{out}");
    let namespace: Value = serde_json::from_str(&out).expect("namespace");
    let labels = &namespace["metadata"]["labels"];
    let mut workloads = Vec::new();
    for (_, kind, doc) in docs
        .iter()
        .filter(|d| ["DaemonSet", "Deployment", "StatefulSet"].contains(&d.1.as_str()))
    {
        let (ok, out) = kubectl(
            &kc,
            &["apply", "--dry-run=server", "-o", "json", "-f", "-"],
            Some(doc),
        );
        assert!(ok, "{kind}: {out}");
        let object: Value = serde_json::from_str(&out).expect("workload");
        assert_eq!(object["metadata"]["namespace"], NAMESPACE);
        let name = object["metadata"]["name"]
            .as_str()
            .expect("name")
            .to_owned();
        workloads.push((name, object["spec"]["template"].clone()));
    }
    assert_eq!(workloads.len(), 3, "agent, controller, scheduler helper");

    let mut needed = Level::Restricted;
    for (name, template) in &workloads {
        let level = pod_security::strictest_level(template);
        eprintln!("{name}: strictest Pod Security level it meets: {level:?}");
        needed = needed.min(level);
        if name != "localnfs-node" {
            assert_eq!(
                level,
                Level::Restricted,
                "{name} must meet restricted: {:?}",
                pod_security::violations(Level::Restricted, template)
            );
        }
    }
    for mode in ["enforce", "warn", "audit"] {
        let label = labels[format!("pod-security.kubernetes.io/{mode}")]
            .as_str()
            .unwrap_or_else(|| panic!("namespace has no {mode} label: {labels}"));
        let level = Level::parse(label).unwrap_or_else(|| panic!("{mode}: {label}"));
        assert_eq!(
            level, needed,
            "namespace {mode} level {label}: its pods need exactly {needed:?}"
        );
    }
}
