//! The install manifests and examples against a real v1.20 API server:
//! `kubectl apply --dry-run=server` for every object the server knows. Objects of API
//! versions newer than v1.20 (policy/v1 PodDisruptionBudget) are listed as skipped;
//! anything else the server refuses fails the test. Schema and lint checks against
//! current Kubernetes are in scripts/check-manifests.

use std::path::Path;
use std::process::Command;

use localnfs::testbed::TestCluster;

/// API versions a v1.20 server cannot know; objects using them are skipped.
const NEWER_THAN_1_20: &[&str] = &["policy/v1"];

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
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// YAML documents, each with its apiVersion and kind.
fn documents(yaml: &str) -> Vec<(String, String, String)> {
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

#[tokio::test]
async fn install_manifests_and_examples_pass_a_server_side_dry_run_on_v1_20() {
    let cluster = TestCluster::start().await.expect("control plane");
    let kc = cluster.kubeconfig().to_owned();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (ok, rendered) = kubectl(
        &kc,
        &["kustomize", root.join("deploy").to_str().expect("utf8")],
        None,
    );
    assert!(ok, "kustomize failed: {rendered}");
    let rendered = rendered
        .lines()
        .filter(|l| !l.starts_with("# Warning"))
        .collect::<Vec<_>>()
        .join("\n");
    // Namespaced objects need their namespace to exist for a dry run.
    let (ok, out) = kubectl(&kc, &["create", "namespace", "localnfs-system"], None);
    assert!(ok, "{out}");

    let mut docs = documents(&rendered);
    let mut examples: Vec<_> = ["storageclass", "storageclass/workloads"]
        .iter()
        .flat_map(|d| std::fs::read_dir(root.join(d)).expect("dir").flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    examples.sort();
    assert!(examples.len() >= 5, "examples missing: {examples:?}");
    for path in &examples {
        docs.extend(documents(&std::fs::read_to_string(path).expect("read")));
    }
    assert!(docs.len() > 25, "only {} objects found", docs.len());

    let (mut applied, mut skipped, mut failed) = (0, Vec::new(), Vec::new());
    for (api_version, kind, doc) in &docs {
        if NEWER_THAN_1_20.contains(&api_version.as_str()) {
            skipped.push(format!("{api_version} {kind}"));
            continue;
        }
        let (ok, out) = kubectl(&kc, &["apply", "--dry-run=server", "-f", "-"], Some(doc));
        if ok {
            applied += 1;
        } else {
            failed.push(format!("{api_version} {kind}: {out}"));
        }
    }
    eprintln!("dry-run: {applied} accepted, skipped as newer than v1.20: {skipped:?}");
    assert!(
        failed.is_empty(),
        "refused by the v1.20 API server:\n{}",
        failed.join("\n")
    );
    assert_eq!(
        skipped.len(),
        2,
        "only the two PodDisruptionBudgets are newer: {skipped:?}"
    );
}
