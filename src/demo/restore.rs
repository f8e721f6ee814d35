//! The demo's backup and restore, after the clone scale-out: mysql-0's volume is
//! backed up (`localnfs volume backup`, asking the running agent, into the demo's
//! target `demo` = `<cluster dir>/backups`), then a `VolumeRestore` makes claim
//! `data-mysql-0-restored` from that set, and the report shows each file's sha256 in
//! the source and in the restored volume.
//!
//! The target shares the node's disk here (a demo has one), so the backup passes
//! `--allow-same-device`; a cluster mounts a network volume instead. The CRDs are the
//! shipped ones, applied with `kubectl` (without it, this part is skipped, saying so).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::json;

use super::flow::{bound_pv, create, wait_until};
use crate::error::{Error, Result};
use crate::kubeclient::annotation;
use crate::objects::backups::{API_VERSION, Phase, VolumeRestore};
use crate::objects::keys::VOLUME_KEY;

/// The backup target's name, as the demo's agent is given it.
pub const TARGET: &str = "demo";

/// The CRDs as shipped.
const CRDS: &str = include_str!("../../deploy/base/crds.yaml");

/// The target's directory under the demo's cluster directory.
pub fn target_dir(dir: &Path) -> PathBuf {
    dir.join("backups")
}

fn step(msg: String) -> Error {
    Error::DemoStep(msg)
}

/// Backs up data-mysql-0 and restores it into a new claim; returns the report.
pub async fn run(client: &Client, dir: &Path, kubeconfig: &Path, node: &str) -> Result<String> {
    if !apply_crds(kubeconfig)? {
        return Ok(
            "\n  backup and restore skipped: kubectl not found (it applies the CRDs)\n".into(),
        );
    }
    let source = bound_pv(client, "data-mysql-0").await?;
    let volume = volume_of(&source)?;
    // The restore names a target and set, not a VolumeBackup: it is told the size.
    let size = source
        .spec
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .map(|q| q.0.clone())
        .ok_or_else(|| step("data-mysql-0's PV has no capacity".into()))?;
    let target = target_dir(dir);
    std::fs::create_dir_all(&target)
        .map_err(|e| step(format!("create {}: {e}", target.display())))?;
    println!(
        "backing up mysql-0's volume {volume} (localnfs volume backup, into target {TARGET})..."
    );
    let set = backup(&dir.join(node), &volume, &target).await?;

    let classes: Api<StorageClass> = Api::all(client.clone());
    create(
        &classes,
        json!({
            "metadata": {"name": "localnfs-now"},
            "provisioner": "localnfs.io/nfs",
            "volumeBindingMode": "Immediate",
        }),
        "StorageClass localnfs-now",
    )
    .await?;
    println!("restoring set {set} into claim data-mysql-0-restored (a VolumeRestore)...");
    let ar = ApiResource::erase::<VolumeRestore>(&());
    let restores: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &ar);
    let vr: DynamicObject = serde_json::from_value(json!({
        "apiVersion": API_VERSION,
        "kind": "VolumeRestore",
        "metadata": {"name": "mysql-0-restore"},
        "spec": {
            "source": {"target": TARGET, "volume": volume, "set": set},
            "storageClassName": "localnfs-now",
            "size": size,
            "claims": ["data-mysql-0-restored"],
        },
    }))
    .map_err(|e| Error::BuildObject(format!("VolumeRestore: {e}")))?;
    restores
        .create(&PostParams::default(), &vr)
        .await
        .map_err(Error::kube("create VolumeRestore mysql-0-restore"))?;
    let typed: Api<VolumeRestore> = Api::namespaced(client.clone(), "default");
    let status = wait_until("VolumeRestore mysql-0-restore to finish", || async {
        let st = typed.get("mysql-0-restore").await.ok()?.status?;
        st.phase?.is_final().then_some(st)
    })
    .await?;
    if status.phase != Some(Phase::Completed) {
        return Err(step(format!(
            "the restore failed: {}",
            status.message.unwrap_or_default()
        )));
    }
    let restored = volume_of(&bound_pv(client, "data-mysql-0-restored").await?)?;
    let volumes = dir.join(node).join("volumes");
    let (before, after) = (
        sums(&volumes.join(&volume))?,
        sums(&volumes.join(&restored))?,
    );
    let mut out = format!(
        "\n  backup set {set} of data-mysql-0 (volume {volume}) restored into claim data-mysql-0-restored (volume {restored}):\n  file                 sha256 in mysql-0's volume / in the restored one\n"
    );
    for (file, sum) in &before {
        let again = after.get(file).map_or("missing", String::as_str);
        let verdict = if again == sum { "match" } else { "DIFFER" };
        out.push_str(&format!(
            "  {file:<20} {}… / {}… {verdict}\n",
            &sum[..16.min(sum.len())],
            &again[..16.min(again.len())]
        ));
    }
    if before != after {
        return Err(step(format!("the restored volume differs:{out}")));
    }
    Ok(out)
}

/// Applies the CRDs; `false` when there is no kubectl.
fn apply_crds(kubeconfig: &Path) -> Result<bool> {
    let child = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["apply", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(step(format!("run kubectl: {e}"))),
    };
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(CRDS.as_bytes())
            .map_err(|e| step(format!("kubectl apply: {e}")))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| step(format!("kubectl apply: {e}")))?;
    if !out.status.success() {
        return Err(step(format!(
            "kubectl apply of the CRDs: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    let ok = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/volumerestores.localnfs.io",
        ])
        .stdout(Stdio::null())
        .status()
        .map_err(|e| step(format!("kubectl wait: {e}")))?;
    if !ok.success() {
        return Err(step("the VolumeRestore CRD was not established".into()));
    }
    Ok(true)
}

fn volume_of(pv: &PersistentVolume) -> Result<String> {
    annotation(pv, VOLUME_KEY)
        .map(str::to_owned)
        .ok_or_else(|| step(format!("PV {:?} names no volume", pv.metadata.name)))
}

/// `localnfs volume backup` against the running agent; the set id it wrote.
async fn backup(root: &Path, volume: &str, target: &Path) -> Result<String> {
    let exe = std::env::current_exe().map_err(|e| step(format!("find this binary: {e}")))?;
    let out = tokio::process::Command::new(exe)
        .arg("volume")
        .arg("--root")
        .arg(root)
        .args(["backup", volume, "--to"])
        .arg(target)
        .arg("--allow-same-device")
        .output()
        .await
        .map_err(|e| step(format!("run localnfs volume backup: {e}")))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(step(format!(
            "the backup failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    text.strip_prefix("backup set ")
        .and_then(|t| t.split_whitespace().next())
        .map(str::to_owned)
        .ok_or_else(|| step(format!("no set id in the backup's answer: {text}")))
}

/// Every regular file under `dir`: relative path → sha256 (hex).
fn sums(dir: &Path) -> Result<BTreeMap<String, String>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) -> std::io::Result<()> {
        for e in std::fs::read_dir(dir)? {
            let path = e?.path();
            let md = std::fs::symlink_metadata(&path)?;
            if md.is_dir() {
                walk(root, &path, out)?;
            } else if md.is_file() {
                let data = std::fs::read(&path)?;
                let h = ring::digest::digest(&ring::digest::SHA256, &data);
                let hex: String = h.as_ref().iter().map(|b| format!("{b:02x}")).collect();
                let rel = path.strip_prefix(root).unwrap_or(&path);
                out.insert(rel.to_string_lossy().into_owned(), hex);
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out).map_err(|e| step(format!("read {}: {e}", dir.display())))?;
    Ok(out)
}
