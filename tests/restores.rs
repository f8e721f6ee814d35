//! `VolumeRestore` (issue 23 item 4): one object restores a backup set into new claims,
//! one by name or every replica of a StatefulSet; what must not be restored fails with
//! a reason in its status and an event, and makes no volume.
//!
//! Real v1.20.2 control plane, the shipped CRDs (`deploy/base/crds.yaml`), real
//! controller and node agent processes (agents with `--backup-target nightly=DIR`);
//! the sets are written by the existing backup path (`localnfs volume backup`, asking
//! the running agent) from volumes the agent made for claims.

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Secret};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use localnfs::objects::backups::{API_VERSION, ClaimPhase, Phase, VolumeRestore};
use localnfs::objects::keys::{CONTROLLER_KEY_FIELD, CONTROLLER_KEY_SECRET, NODE_KEY, REFUSED};
use localnfs::objects::request::{RestoreSource, VolumeRequest};
use localnfs::objects::signed::{self, Signer};
use localnfs::volume::{VolumeName, VolumeSpec};
use localnfs_testbed::{TestCluster, kubelet};
use serde_json::json;
use support::cluster::*;
use support::credentials::kubectl;
use support::eventually;
use support::tmpfs::Tmpfs;

const WAIT: Duration = Duration::from_secs(90);

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Every regular file under `dir`: relative path → sha256.
fn sums(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).expect("read dir").flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let data = std::fs::read(&path).expect("read file");
                let h = ring::digest::digest(&ring::digest::SHA256, &data);
                let rel = path.strip_prefix(root).expect("prefix");
                out.insert(rel.to_string_lossy().into_owned(), h.as_ref().to_vec());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// A cluster of two nodes whose agents know backup target `nightly`, the CRDs, class
/// `now` (Immediate), and the target directory (apart from the agents' roots).
struct Setup {
    cluster: TestCluster,
    lnfs: Localnfs,
    target: Tmpfs,
    /// The first node's address (node-2's is the next one).
    first: u8,
}

impl Setup {
    async fn start(first: u8) -> Setup {
        Setup::start_with_target(first, "64m").await
    }

    /// Same, with a target of `size` (`1g`).
    async fn start_with_target(first: u8, size: &str) -> Setup {
        let cluster = TestCluster::start().await.expect("control plane");
        let client = cluster.client();
        install_crds(cluster.kubeconfig());
        let target = Tmpfs::mount(size);
        let mut s = Setup {
            lnfs: Localnfs::new(&cluster).await,
            cluster,
            target,
            first,
        };
        for node in ["node-1", "node-2"] {
            kubelet::add_node(&client, node, s.addr(node))
                .await
                .expect("node");
            s.start_agent(node);
        }
        s.lnfs.start_controller();
        storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
        s
    }

    fn addr(&self, node: &str) -> IpAddr {
        ip(self.first + u8::from(node == "node-2"))
    }

    /// Starts (or starts again) `node`'s agent with the target `nightly`.
    fn start_agent(&mut self, node: &str) {
        let flag = format!("nightly={}", self.target.path().display());
        let addr = self.addr(node);
        self.lnfs
            .start_agent_with(node, addr, &["--capacity", "5Gi", "--backup-target", &flag]);
    }

    fn client(&self) -> Client {
        self.cluster.client()
    }

    /// Claim `name` in `ns` holding a few files; returns its node, volume and sums.
    async fn claim_with_files(
        &self,
        ns: &str,
        name: &str,
    ) -> (String, String, BTreeMap<String, Vec<u8>>) {
        let mut pvc = claim(name, "now", "4Mi", json!({}));
        pvc.metadata.namespace = Some(ns.into());
        Api::<PersistentVolumeClaim>::namespaced(self.client(), ns)
            .create(&PostParams::default(), &pvc)
            .await
            .expect("create claim");
        let (node, volume) = self.bound(ns, name).await;
        let dir = self.lnfs.root(&node).join("volumes").join(&volume);
        std::fs::create_dir_all(dir.join("db/tables")).expect("mkdir");
        std::fs::write(dir.join("db/tables/t1.ibd"), format!("rows of {ns}/{name}"))
            .expect("write");
        let big: Vec<u8> = (0..300 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.join("db/ib_logfile0"), &big).expect("write");
        (node, volume, sums(&dir))
    }

    /// Waits for claim `ns/name` to be Bound; its node and volume (from the PV).
    async fn bound(&self, ns: &str, name: &str) -> (String, String) {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client(), ns);
        let pv = eventually(&format!("{ns}/{name} Bound"), WAIT, || async {
            let c = claims.get(name).await.ok()?;
            (c.status.as_ref()?.phase.as_deref()? == "Bound").then_some(())?;
            c.spec?.volume_name
        })
        .await;
        let pv = Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(self.client())
            .get(&pv)
            .await
            .expect("pv");
        let node = pv.labels().get(NODE_KEY).cloned().expect("node label");
        (node, nfs_target(&pv).2)
    }

    /// `localnfs volume backup` of `volume` on `node` into the target; the set id.
    async fn backup(&self, node: &str, volume: &str) -> String {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_localnfs"))
            .arg("volume")
            .arg("--root")
            .arg(self.lnfs.root(node))
            .args(["backup", volume, "--to"])
            .arg(self.target.path())
            .arg("--allow-same-device")
            .output()
            .await
            .expect("run localnfs volume backup");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "backup: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.strip_prefix("backup set ")
            .and_then(|t| t.split_whitespace().next())
            .expect("set id")
            .to_owned()
    }

    fn set_dir(&self, volume: &str, set: &str) -> PathBuf {
        self.target.path().join(volume).join(set)
    }

    async fn restore(&self, ns: &str, name: &str, spec: serde_json::Value) {
        // As `kubectl apply` sends it: with apiVersion and kind.
        let ar = ApiResource::erase::<VolumeRestore>(&());
        let vr: DynamicObject = serde_json::from_value(json!({
            "apiVersion": API_VERSION, "kind": "VolumeRestore",
            "metadata": {"name": name}, "spec": spec}))
        .expect("vr");
        Api::<DynamicObject>::namespaced_with(self.client(), ns, &ar)
            .create(&PostParams::default(), &vr)
            .await
            .expect("create VolumeRestore");
    }

    /// Waits for VolumeRestore `ns/name` to reach a final phase; returns it.
    async fn finished(&self, ns: &str, name: &str) -> VolumeRestore {
        let api: Api<VolumeRestore> = Api::namespaced(self.client(), ns);
        eventually(
            &format!("VolumeRestore {ns}/{name} finished"),
            WAIT,
            || async {
                let vr = api.get(name).await.ok()?;
                vr.status.as_ref()?.phase?.is_final().then_some(vr)
            },
        )
        .await
    }

    /// Every volume directory on both nodes.
    fn all_volumes(&self) -> Vec<String> {
        let mut all: Vec<String> = ["node-1", "node-2"]
            .iter()
            .flat_map(|n| volume_dirs(&self.lnfs, n))
            .collect();
        all.sort();
        all
    }
}

fn install_crds(kubeconfig: &Path) {
    let crds = repo_file("deploy/base/crds.yaml");
    let crds = crds.to_str().expect("utf8");
    kubectl(kubeconfig, &["apply", "-f", crds]);
    kubectl(
        kubeconfig,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "-f",
            crds,
        ],
    );
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

async fn namespace(client: &Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("ns");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
}

/// Waits for an event `reason` on `ns/name` whose message contains `words`.
async fn event_saying(client: &Client, ns: &str, name: &str, reason: &str, words: &str) -> String {
    let evs: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("{reason} event on {ns}/{name} saying {words:?}"),
        WAIT,
        || async {
            let list = evs.list(&Default::default()).await.ok()?;
            list.items
                .into_iter()
                .filter(|e| e.involved_object.name.as_deref() == Some(name))
                .filter(|e| e.reason.as_deref() == Some(reason))
                .filter_map(|e| e.message)
                .find(|m| m.contains(words))
        },
    )
    .await
}

#[tokio::test]
async fn a_volumerestore_brings_back_one_claim_and_every_replica_of_a_statefulset() {
    let s = Setup::start(151).await;
    let client = s.client();
    let (node, volume, want) = s.claim_with_files("default", "data-mysql-0").await;
    let set = s.backup(&node, &volume).await;

    // (a) One claim from a chosen set.
    s.restore(
        "default",
        "one",
        json!({"source": {"target": "nightly", "volume": volume, "set": set},
               "storageClassName": "now", "size": "8Mi", "claims": ["db-restored"]}),
    )
    .await;
    let vr = s.finished("default", "one").await;
    let status = vr.status.expect("status");
    assert_eq!(
        status.phase,
        Some(Phase::Completed),
        "{status:?}\n{}",
        s.lnfs.logs()
    );
    let (rnode, rvol) = s.bound("default", "db-restored").await;
    assert_eq!(status.claims[0].node.as_deref(), Some(rnode.as_str()));
    let claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .get("db-restored")
        .await
        .expect("claim");
    assert_eq!(status.claims[0].uid, claim.uid());
    assert_eq!(sums(&s.lnfs.root(&rnode).join("volumes").join(&rvol)), want);
    event_saying(&client, "default", "one", "RestoreCompleted", "db-restored").await;
    event_saying(
        &client,
        "default",
        "db-restored",
        "VolumeRestored",
        "every sha256 checked",
    )
    .await;

    // (b) Every replica at once: the StatefulSet and its claims are gone (here: the
    // one claim), the restore makes data-mysql-0..2 from the newest set.
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .delete("data-mysql-0", &Default::default())
        .await
        .expect("delete claim");
    eventually("data-mysql-0 gone", WAIT, || async {
        Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
            .get_opt("data-mysql-0")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    s.restore(
        "default",
        "all",
        json!({"source": {"target": "nightly", "volume": volume, "set": "latest"},
               "storageClassName": "now", "size": "8Mi",
               "statefulSet": {"name": "mysql", "template": "data", "replicas": 3}}),
    )
    .await;
    let vr = s.finished("default", "all").await;
    let status = vr.status.expect("status");
    assert_eq!(
        status.phase,
        Some(Phase::Completed),
        "{status:?}\n{}",
        s.lnfs.logs()
    );
    let names: Vec<&str> = status.claims.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["data-mysql-0", "data-mysql-1", "data-mysql-2"]);
    for c in &status.claims {
        assert_eq!(c.phase, Some(ClaimPhase::Completed));
        let (n, v) = s.bound("default", &c.name).await;
        assert_eq!(
            sums(&s.lnfs.root(&n).join("volumes").join(&v)),
            want,
            "{}",
            c.name
        );
    }
}

#[tokio::test]
async fn restores_that_must_not_happen_fail_with_a_reason_and_make_no_volume() {
    let s = Setup::start(161).await;
    let client = s.client();
    namespace(&client, "bank").await;
    let (bank_node, bank_volume, _) = s.claim_with_files("bank", "ledger").await;
    let bank_set = s.backup(&bank_node, &bank_volume).await;
    let (node, volume, _) = s.claim_with_files("default", "db-0").await;
    let set = s.backup(&node, &volume).await;
    let (_, existing_volume, existing) = s.claim_with_files("default", "existing").await;
    // A damaged copy of the good set, under a volume name of its own.
    let damaged_vol = "pvc-damaged";
    let from = s.set_dir(&volume, &set);
    let to = s.set_dir(damaged_vol, &set);
    std::fs::create_dir_all(s.target.path().join(damaged_vol)).expect("mkdir");
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(&from)
        .arg(&to)
        .status()
        .ok();
    assert!(cp.is_some_and(|st| st.success()), "copy the set");
    std::fs::write(to.join("data/db/tables/t1.ibd"), b"tampered!").expect("tamper");
    let before = s.all_volumes();

    let cases = [
        // (restore, source, claim, what its status says)
        (
            "stolen",
            json!({"target": "nightly", "volume": bank_volume, "set": bank_set}),
            "mine",
            "the set belongs to namespace bank",
        ),
        (
            "overwrite",
            json!({"target": "nightly", "volume": volume, "set": "latest"}),
            "existing",
            "claim exists",
        ),
        (
            "nowhere",
            json!({"target": "weekly", "volume": volume, "set": "latest"}),
            "from-weekly",
            "unknown backup target",
        ),
        (
            "damaged",
            json!({"target": "nightly", "volume": damaged_vol, "set": set}),
            "from-damaged",
            "is damaged",
        ),
    ];
    for (name, source, claim, _) in &cases {
        s.restore(
            "default",
            name,
            json!({"source": source, "storageClassName": "now", "size": "8Mi", "claims": [claim]}),
        )
        .await;
    }
    for (name, _, claim, words) in &cases {
        let vr = s.finished("default", name).await;
        let status = vr.status.expect("status");
        assert_eq!(status.phase, Some(Phase::Failed), "{name}: {status:?}");
        let entry = &status.claims[0];
        assert_eq!(entry.name, *claim);
        assert_eq!(entry.phase, Some(ClaimPhase::Failed), "{name}: {status:?}");
        let message = entry.message.clone().unwrap_or_default();
        assert!(message.contains(words), "{name}: {message}");
        event_saying(&client, "default", name, "RestoreFailed", words).await;
    }
    assert_eq!(
        s.all_volumes(),
        before,
        "a refused restore made a volume\n{}",
        s.lnfs.logs()
    );
    // The existing claim's data is untouched.
    let (n, v) = s.bound("default", "existing").await;
    assert_eq!(v, existing_volume);
    assert_eq!(sums(&s.lnfs.root(&n).join("volumes").join(&v)), existing);
    // A VolumeRestore with nothing valid to make fails at once.
    s.restore(
        "default",
        "both",
        json!({"source": {"target": "nightly", "volume": volume}, "storageClassName": "now",
               "size": "8Mi", "claims": ["x"], "statefulSet": {"name": "m", "template": "d", "replicas": 1}}),
    )
    .await;
    let vr = s.finished("default", "both").await;
    assert!(
        vr.status
            .and_then(|st| st.message)
            .unwrap_or_default()
            .contains("not both"),
        "spec refusal"
    );
    // A class of another provisioner would bind the claim empty: refused at once,
    // and no claim is made.
    let other: StorageClass = serde_json::from_value(json!({
        "metadata": {"name": "elsewhere"}, "provisioner": "example.com/other"}))
    .expect("class");
    Api::<StorageClass>::all(client.clone())
        .create(&PostParams::default(), &other)
        .await
        .expect("create class");
    s.restore(
        "default",
        "other-class",
        json!({"source": {"target": "nightly", "volume": volume}, "storageClassName": "elsewhere",
               "size": "8Mi", "claims": ["from-elsewhere"]}),
    )
    .await;
    let vr = s.finished("default", "other-class").await;
    let status = vr.status.unwrap_or_default();
    assert_eq!(status.phase, Some(Phase::Failed), "{status:?}");
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains("provisioned by example.com/other"),
        "{message}"
    );
    let made = Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .get_opt("from-elsewhere")
        .await
        .expect("get claim");
    assert!(made.is_none(), "a claim was made: {made:?}");
}

/// A tenant cannot have data restored by writing a request on a claim: one signed
/// with any key but the controller's is ignored (no volume), and one the controller
/// signed by mistake naming another namespace's set is refused by the agent, which
/// checks the set's owner against the claim's own namespace.
#[tokio::test]
async fn a_forged_restore_request_makes_no_volume() {
    let s = Setup::start(171).await;
    let client = s.client();
    let (node, volume, _) = s.claim_with_files("default", "db-0").await;
    let set = s.backup(&node, &volume).await;
    namespace(&client, "tenant").await;
    let secret = Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .get(CONTROLLER_KEY_SECRET)
        .await
        .expect("controller key");
    let pkcs8 = secret.data.expect("data")[CONTROLLER_KEY_FIELD].0.clone();
    let controller = Signer::from_pkcs8(&pkcs8).expect("key");
    let forger =
        Signer::from_pkcs8(&Signer::generate().expect("key")).expect("a key of the tenant's");
    let tenant: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "tenant");
    let before = s.all_volumes();
    for (name, key) in [("forged", &forger), ("mistaken", &controller)] {
        // A class localnfs does not serve: the controller leaves the claim alone.
        let mut pvc = claim(name, "someone-elses", "8Mi", json!({}));
        pvc.metadata.namespace = Some("tenant".into());
        let pvc = tenant
            .create(&PostParams::default(), &pvc)
            .await
            .expect("claim");
        let uid = pvc.uid().expect("uid");
        let request = VolumeRequest::restore_of(
            VolumeSpec::new(
                VolumeName::new(&format!("pvc-{uid}")).expect("name"),
                8 << 20,
            ),
            uid,
            node.clone(),
            RestoreSource {
                target: "nightly".into(),
                volume: VolumeName::new(&volume).expect("name"),
                set: set.clone(),
                // What the request claims; the agent reads the claim's own.
                namespace: "default".into(),
            },
        );
        let annotations: BTreeMap<&str, String> = signed::request_annotations(key, &request)
            .expect("sign")
            .into_iter()
            .collect();
        tenant
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {
                    "labels": {NODE_KEY: node}, "annotations": annotations}})),
            )
            .await
            .expect("place the claim");
    }
    event_saying(
        &client,
        "tenant",
        "mistaken",
        "ProvisioningFailed",
        "the set belongs to namespace default",
    )
    .await;
    eventually("the refusal answer", WAIT, || async {
        tenant
            .get("mistaken")
            .await
            .ok()?
            .annotations()
            .contains_key(REFUSED)
            .then_some(())
    })
    .await;
    // The forged one had as long; the agent ignores what the controller did not sign.
    let forged = tenant.get("forged").await.expect("claim");
    assert!(!forged.annotations().contains_key(REFUSED));
    assert!(
        !forged.annotations().keys().any(|k| k.contains("ready")),
        "{forged:?}"
    );
    assert_eq!(
        s.all_volumes(),
        before,
        "a forged request made a volume\n{}",
        s.lnfs.logs()
    );
}

/// The MySQL example (storageclass/workloads/restore/) as a user runs it: a
/// VolumeBackup of data-mysql-0 (the agent's own backup path), then a VolumeRestore
/// naming that backup gives a new claim the same files, sized as the backed-up claim;
/// the all-replicas form passes a server-side dry run against the CRDs.
#[tokio::test]
async fn the_mysql_example_restores_a_replica_from_its_volumebackup() {
    let s = Setup::start(181).await;
    let client = s.client();
    let kc = s.cluster.kubeconfig().to_owned();
    storage_class(
        &client,
        "localnfs",
        json!({"volumeBindingMode": "Immediate"}),
    )
    .await;
    let (_, _, want) = s.claim_with_files("default", "data-mysql-0").await;
    let dir = repo_file("storageclass/workloads/restore");
    let file = |f: &str| dir.join(f).to_str().expect("utf8").to_owned();
    kubectl(
        &kc,
        &["apply", "-n", "default", "-f", &file("mysql-backup.yaml")],
    );
    kubectl(
        &kc,
        &[
            "apply",
            "-n",
            "default",
            "-f",
            &file("mysql-restore-one.yaml"),
        ],
    );
    let vr = s.finished("default", "mysql-restore-one").await;
    let status = vr.status.expect("status");
    assert_eq!(
        status.phase,
        Some(Phase::Completed),
        "{status:?}\n{}",
        s.lnfs.logs()
    );
    let (n, v) = s.bound("default", "data-mysql-restored").await;
    assert_eq!(sums(&s.lnfs.root(&n).join("volumes").join(&v)), want);
    let claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .get("data-mysql-restored")
        .await
        .expect("claim");
    let size = claim
        .spec
        .and_then(|sp| sp.resources)
        .and_then(|r| r.requests);
    assert_eq!(
        size.and_then(|r| r.get("storage").cloned())
            .map(|q| q.0)
            .as_deref(),
        Some("4Mi")
    );
    kubectl(
        &kc,
        &[
            "apply",
            "--dry-run=server",
            "-n",
            "default",
            "-f",
            &file("mysql-restore-all.yaml"),
        ],
    );
}

/// A controller stopped after recording the claims to make but before making them:
/// the next leader makes them (they do not exist), rather than failing every entry
/// with "claim exists".
#[tokio::test]
async fn a_controller_stopped_before_making_recorded_claims_makes_them_on_restart() {
    let mut s = Setup::start(191).await;
    let client = s.client();
    let (node, volume, want) = s.claim_with_files("default", "db-0").await;
    let set = s.backup(&node, &volume).await;
    s.lnfs.kill_controller(0).await;
    // What the stopped controller left: the object with its intent recorded (the
    // first status write of a restore) and no claim made.
    s.restore(
        "default",
        "late",
        json!({"source": {"target": "nightly", "volume": volume, "set": set},
               "storageClassName": "now", "size": "8Mi", "claims": ["made-late"]}),
    )
    .await;
    Api::<VolumeRestore>::namespaced(client.clone(), "default")
        .patch_status(
            "late",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "phase": "Running",
                "source": {"target": "nightly", "volume": volume, "set": set},
                "claims": [{"name": "made-late", "phase": "Pending"}],
            }})),
        )
        .await
        .expect("write the recorded intent");
    s.lnfs.start_controller();
    let vr = s.finished("default", "late").await;
    let status = vr.status.expect("status");
    assert_eq!(
        status.phase,
        Some(Phase::Completed),
        "{status:?}\n{}",
        s.lnfs.logs()
    );
    let (n, v) = s.bound("default", "made-late").await;
    assert_eq!(sums(&s.lnfs.root(&n).join("volumes").join(&v)), want);
}

/// A claim a VolumeRestore recorded but that was provisioned empty (its
/// `localnfs.io/restore` annotation removed before it was placed) is not reported
/// restored: Bound is not enough, the controller's signed restore request must be on it.
#[tokio::test]
async fn a_claim_provisioned_empty_is_not_reported_restored() {
    let mut s = Setup::start(193).await;
    let client = s.client();
    let (node, volume, _) = s.claim_with_files("default", "db-0").await;
    let set = s.backup(&node, &volume).await;
    // Provisioned as a plain claim: what the tenant gets by removing the annotation.
    let mut pvc = claim("emptied", "now", "8Mi", json!({}));
    pvc.metadata.namespace = Some("default".into());
    let made = Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &pvc)
        .await
        .expect("create claim");
    s.bound("default", "emptied").await;
    // The restore had recorded that claim's uid (as it does right after making it).
    s.lnfs.kill_controller(0).await;
    s.restore(
        "default",
        "emptied",
        json!({"source": {"target": "nightly", "volume": volume, "set": set},
               "storageClassName": "now", "size": "8Mi", "claims": ["emptied"]}),
    )
    .await;
    Api::<VolumeRestore>::namespaced(client.clone(), "default")
        .patch_status(
            "emptied",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "phase": "Running",
                "source": {"target": "nightly", "volume": volume, "set": set},
                "claims": [{"name": "emptied", "uid": made.uid(), "phase": "Pending"}],
            }})),
        )
        .await
        .expect("write the recorded claim");
    s.lnfs.start_controller();
    let vr = s.finished("default", "emptied").await;
    let status = vr.status.expect("status");
    assert_eq!(status.phase, Some(Phase::Failed), "{status:?}");
    let message = status.claims[0].message.clone().unwrap_or_default();
    assert!(
        message.contains("provisioned without the restore"),
        "{message}"
    );
}

/// Copies being built on `node` (`<root>/staging/*.partial`), and whether any holds
/// restored data yet.
fn partial_copies(lnfs: &Localnfs, node: &str) -> (usize, bool) {
    let Ok(dir) = std::fs::read_dir(lnfs.root(node).join("staging")) else {
        return (0, false);
    };
    let partial: Vec<PathBuf> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".partial"))
        .collect();
    let writing = partial
        .iter()
        .any(|p| std::fs::read_dir(p.join("data")).is_ok_and(|mut d| d.next().is_some()));
    (partial.len(), writing)
}

/// The agent restoring a claim through a VolumeRestore is SIGKILLed with the restore
/// half written: the claim is not Bound meanwhile (no PV answers ready with part of
/// the set), and the restarted agent restores it whole from the request, leaving no
/// copy half-made behind.
#[tokio::test]
async fn an_agent_killed_mid_restore_leaves_no_claim_ready_with_part_of_the_set_and_restores_it_after_restart()
 {
    let mut s = Setup::start_with_target(197, "1g").await;
    let client = s.client();
    let mut pvc = claim("big", "now", "1Gi", json!({}));
    pvc.metadata.namespace = Some("default".into());
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &pvc)
        .await
        .expect("create claim");
    let (node, volume) = s.bound("default", "big").await;
    let dir = s.lnfs.root(&node).join("volumes").join(&volume);
    // Enough files that the restore (every sha256 checked, every file synced) runs
    // for seconds and is caught part-way.
    support::fill_many_files(&dir);
    let want = sums(&dir);
    let set = s.backup(&node, &volume).await;
    let before = s.all_volumes();
    s.restore(
        "default",
        "cut",
        json!({"source": {"target": "nightly", "volume": volume, "set": set},
               "storageClassName": "now", "size": "1Gi", "claims": ["back"]}),
    )
    .await;
    let restoring = eventually("a restore half written", WAIT, || async {
        ["node-1", "node-2"]
            .into_iter()
            .find(|n| partial_copies(&s.lnfs, n).1)
    })
    .await;
    s.lnfs.stop_agent(restoring).await; // SIGKILL
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let back = claims.get("back").await.expect("claim");
    assert_eq!(
        back.spec.and_then(|sp| sp.volume_name),
        None,
        "the claim was bound before its restore finished"
    );
    let vr: VolumeRestore = Api::namespaced(client.clone(), "default")
        .get("cut")
        .await
        .expect("restore");
    let status = vr.status.unwrap_or_default();
    assert!(
        status
            .claims
            .iter()
            .all(|c| c.phase != Some(ClaimPhase::Completed)),
        "reported restored while its agent was down: {status:?}"
    );
    assert_eq!(s.all_volumes(), before, "a half-made volume exists");
    // Nothing answers for a few seconds while the agent is down: still not Bound.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let back = claims.get("back").await.expect("claim");
    assert_eq!(back.spec.and_then(|sp| sp.volume_name), None);

    s.start_agent(restoring);
    let vr = s.finished("default", "cut").await;
    let status = vr.status.expect("status");
    assert_eq!(
        status.phase,
        Some(Phase::Completed),
        "{status:?}\n{}",
        s.lnfs.logs()
    );
    let (n, v) = s.bound("default", "back").await;
    assert_eq!(
        sums(&s.lnfs.root(&n).join("volumes").join(&v)),
        want,
        "the restored claim does not hold the whole set"
    );
    for node in ["node-1", "node-2"] {
        assert_eq!(
            partial_copies(&s.lnfs, node).0,
            0,
            "a half-made copy stays on {node}"
        );
    }
}

/// A namespace deleted and made again with the same name does not inherit the sets of
/// the earlier one through VolumeRestores, though their owner records name the same
/// namespace: a set made before the namespace was created is refused, with the
/// operator's `localnfs volume restore` named as the way; the new namespace's own
/// sets restore.
#[tokio::test]
async fn a_namespace_made_again_with_the_same_name_cannot_restore_the_earlier_ones_sets() {
    let s = Setup::start(199).await;
    let client = s.client();
    namespace(&client, "team").await;
    let (node, old_volume, _) = s.claim_with_files("team", "db").await;
    let old_set = s.backup(&node, &old_volume).await;
    // The namespace deleted, as Kubernetes' namespace controller (not run by the test
    // control plane) would: its claim deleted, then its `kubernetes` finalizer taken.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .delete("team", &Default::default())
        .await
        .expect("delete namespace");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "team");
    claims
        .delete("db", &Default::default())
        .await
        .expect("delete claim");
    eventually("team/db gone", WAIT, || async {
        claims.get_opt("db").await.ok()?.is_none().then_some(())
    })
    .await;
    let mut ns = namespaces.get("team").await.expect("namespace");
    ns.spec = Some(Default::default());
    namespaces
        .replace_subresource("finalize", "team", &PostParams::default(), &ns)
        .await
        .expect("finalize namespace");
    eventually("namespace team gone", WAIT, || async {
        namespaces
            .get_opt("team")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    namespace(&client, "team").await;
    // The deleted claim's volume reclaimed first (on a busy machine it was still there
    // when the volumes below were listed), so the list before the restores is settled.
    eventually("team/db's volume reclaimed", WAIT, || async {
        (!s.all_volumes().contains(&old_volume)).then_some(())
    })
    .await;
    let before = s.all_volumes();
    for (name, set) in [("by-id", old_set.as_str()), ("by-latest", "latest")] {
        s.restore(
            "team",
            name,
            json!({"source": {"target": "nightly", "volume": old_volume, "set": set},
                   "storageClassName": "now", "size": "8Mi", "claims": [format!("from-{name}")]}),
        )
        .await;
    }
    for name in ["by-id", "by-latest"] {
        let vr = s.finished("team", name).await;
        let status = vr.status.expect("status");
        assert_eq!(status.phase, Some(Phase::Failed), "{name}: {status:?}");
        let message = status.claims[0].message.clone().unwrap_or_default();
        assert!(
            message.contains(&format!(
                "set {old_set} of volume {old_volume} was made before namespace team was created"
            )) && message.contains("localnfs volume restore"),
            "{name}: {message}"
        );
    }
    assert_eq!(s.all_volumes(), before, "a refused restore made a volume");
    // The new namespace's own sets restore as ever (made after its first second:
    // its creation time is known to the second only).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (node, volume, want) = s.claim_with_files("team", "db").await;
    let set = s.backup(&node, &volume).await;
    s.restore(
        "team",
        "own",
        json!({"source": {"target": "nightly", "volume": volume, "set": set},
               "storageClassName": "now", "size": "8Mi", "claims": ["db-back"]}),
    )
    .await;
    let vr = s.finished("team", "own").await;
    let status = vr.status.expect("status");
    assert_eq!(status.phase, Some(Phase::Completed), "{status:?}");
    let (n, v) = s.bound("team", "db-back").await;
    assert_eq!(sums(&s.lnfs.root(&n).join("volumes").join(&v)), want);
}
