//! Backups as Kubernetes objects (issue 23 item 3): VolumeBackup and
//! VolumeBackupSchedule run by the real node agent and controller processes on the
//! real v1.20.2 control plane, with the CRDs and RBAC as shipped in deploy/base/.
//!
//! Targets are small tmpfs mounts made by the test (it runs as root): a different
//! device from the agent's root, as a network volume would be, and one that can be
//! made full. Each is unmounted when its test ends, passed or failed.

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use localnfs::objects::backups::{Phase, VolumeBackup, VolumeBackupSchedule, VolumeBackupStatus};
use localnfs::objects::keys::VOLUME_KEY;
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

/// A bind mount of `from` on `on`; unmounted on drop.
struct Bind(PathBuf);

impl Bind {
    fn mount(from: &Path, on: &Path) -> Self {
        let ok = std::process::Command::new("mount")
            .arg("--bind")
            .arg(from)
            .arg(on)
            .status()
            .expect("run mount");
        assert!(ok.success(), "bind mount");
        Bind(on.to_owned())
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Installs the three CRDs as shipped and waits until they are served.
fn install_crds(kubeconfig: &Path) {
    let crds = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/base/crds.yaml");
    kubectl(kubeconfig, &["apply", "-f", crds.to_str().expect("utf8")]);
    kubectl(
        kubeconfig,
        &[
            "wait",
            "--for=condition=established",
            "--timeout=60s",
            "crd/volumebackups.localnfs.io",
            "crd/volumebackupschedules.localnfs.io",
            "crd/volumerestores.localnfs.io",
        ],
    );
}

/// A cluster with the CRDs, node-1 at 127.0.0.`last` whose agent has `targets`
/// (`--backup-target` values), the controller, and class `now`.
async fn cluster_with(last: u8, targets: &[String]) -> (TestCluster, Localnfs) {
    let cluster = TestCluster::start().await.expect("control plane");
    install_crds(cluster.kubeconfig());
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    kubelet::add_node(&client, "node-1", ip(last))
        .await
        .expect("node");
    lnfs.start_agent_with("node-1", ip(last), &agent_flags(targets));
    lnfs.start_controller();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    (cluster, lnfs)
}

fn agent_flags(targets: &[String]) -> Vec<&str> {
    let mut flags = vec!["--capacity", "5Gi"];
    for t in targets {
        flags.extend(["--backup-target", t.as_str()]);
    }
    flags
}

/// Creates claim `name` (of `size`) in `ns`, waits for its volume; returns the
/// volume's directory on node-1 and its name.
async fn claim_in(
    client: &Client,
    lnfs: &Localnfs,
    ns: &str,
    name: &str,
    size: &str,
) -> (PathBuf, String) {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    claims
        .create(&PostParams::default(), &claim(name, "now", size, json!({})))
        .await
        .expect("create claim");
    let pv_name = eventually(&format!("{ns}/{name} Bound"), WAIT, || async {
        let c = claims.get(name).await.ok()?;
        (c.status.as_ref()?.phase.as_deref()? == "Bound").then_some(())?;
        c.spec?.volume_name
    })
    .await;
    let pv = Api::<PersistentVolume>::all(client.clone())
        .get(&pv_name)
        .await
        .expect("pv");
    let volume = nfs_target(&pv).2;
    (lnfs.root("node-1").join("volumes").join(&volume), volume)
}

async fn namespace(client: &Client, name: &str) {
    let body: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name}})).expect("namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &body)
        .await
        .expect("create namespace");
}

/// Files under `dir` (relative path → sha256).
fn sums(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for e in std::fs::read_dir(dir).expect("read dir").flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let data = std::fs::read(&path).expect("read");
                let rel = path.strip_prefix(root).expect("prefix");
                out.insert(
                    rel.to_string_lossy().into_owned(),
                    ring::digest::digest(&ring::digest::SHA256, &data)
                        .as_ref()
                        .to_vec(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Writes a few files, one of `big` bytes, into `dir`.
fn write_data(dir: &Path, big: usize) {
    std::fs::create_dir_all(dir.join("db/tables")).expect("mkdir");
    std::fs::write(dir.join("precious"), b"rows").expect("write");
    std::fs::write(dir.join("db/tables/t1.ibd"), b"table one").expect("write");
    let data: Vec<u8> = (0..big).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("db/log"), &data).expect("write");
}

async fn create_backup(client: &Client, ns: &str, name: &str, claim: &str, target: &str) {
    let vbk: VolumeBackup = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"claim": claim, "target": target, "keep": 5},
    }))
    .expect("VolumeBackup");
    Api::<VolumeBackup>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &vbk)
        .await
        .expect("create VolumeBackup");
}

/// Waits for VolumeBackup `name` to reach Completed or Failed; returns its status.
async fn finished(client: &Client, lnfs: &Localnfs, ns: &str, name: &str) -> VolumeBackupStatus {
    let api: Api<VolumeBackup> = Api::namespaced(client.clone(), ns);
    let logs = || lnfs.logs();
    let st = tokio::time::timeout(
        WAIT,
        eventually(
            &format!("VolumeBackup {ns}/{name} finished"),
            WAIT,
            || async {
                let st = api.get(name).await.ok()?.status?;
                st.phase?.is_final().then_some(st)
            },
        ),
    )
    .await;
    st.unwrap_or_else(|_| panic!("VolumeBackup {ns}/{name} never finished\n{}", logs()))
}

/// Waits for an event `reason` on `name` in `ns`; returns its message.
async fn event(client: &Client, ns: &str, name: &str, reason: &str) -> String {
    let evs: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
    eventually(&format!("{reason} event on {ns}/{name}"), WAIT, || async {
        evs.list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .filter(|e| e.involved_object.name.as_deref() == Some(name))
            .filter(|e| e.reason.as_deref() == Some(reason))
            .find_map(|e| e.message)
    })
    .await
}

async fn status_of(api: &Api<VolumeBackup>, name: &str) -> VolumeBackupStatus {
    api.get(name).await.expect("get").status.unwrap_or_default()
}

/// Entries of a directory (names), empty if it does not exist.
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_volume_backup_completes_restores_to_the_same_files_and_the_next_is_incremental() {
    let target = Tmpfs::mount("64m");
    let flag = format!("nightly={}", target.path().display());
    let (cluster, lnfs) = cluster_with(201, &[flag]).await;
    let client = cluster.client();
    let (dir, volume) = claim_in(&client, &lnfs, "default", "data", "16Mi").await;
    write_data(&dir, 3 << 20);
    let want = sums(&dir);

    create_backup(&client, "default", "first", "data", "nightly").await;
    let st = finished(&client, &lnfs, "default", "first").await;
    assert_eq!(st.phase, Some(Phase::Completed), "{st:?}\n{}", lnfs.logs());
    assert_eq!(st.node.as_deref(), Some("node-1"));
    assert_eq!(st.volume.as_deref(), Some(volume.as_str()));
    let set = st.set.clone().expect("set id");
    assert!(st.bytes.is_some_and(|b| b >= 3 << 20), "{st:?}");
    assert_eq!(st.files, Some(3), "{st:?}");
    assert!(
        st.duration_seconds.is_some() && st.start_time.is_some() && st.completion_time.is_some()
    );
    assert!(st.pause_ms.is_some(), "{st:?}");
    let note = event(&client, "default", "first", "BackupCompleted").await;
    assert!(note.contains(&set), "{note}");

    // The set restores, with the existing restore, to the same checksums.
    let restored = tempfile::tempdir().expect("restore root");
    let from = target.path().join(&volume).join(&set);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_localnfs"))
        .args(["volume", "--root"])
        .arg(restored.path())
        .args(["restore", "--from"])
        .arg(&from)
        .arg("back")
        .output()
        .expect("run localnfs volume restore");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sums(&restored.path().join("volumes/back")), want);

    // The second backup links what did not change.
    std::fs::write(dir.join("precious"), b"more rows").expect("change a file");
    create_backup(&client, "default", "second", "data", "nightly").await;
    let st = finished(&client, &lnfs, "default", "second").await;
    assert_eq!(st.phase, Some(Phase::Completed), "{st:?}");
    assert!(
        st.bytes_linked.is_some_and(|b| b >= 3 << 20),
        "not incremental: {st:?}"
    );
    assert!(st.bytes_copied.is_some_and(|b| b < 1 << 20), "{st:?}");
    assert_ne!(st.set.as_deref(), Some(set.as_str()));

    // `kubectl get vbk` shows the printer columns.
    let table = kubectl(cluster.kubeconfig(), &["get", "vbk", "-n", "default"]);
    let header = table.lines().next().unwrap_or_default();
    for col in [
        "CLAIM", "TARGET", "PHASE", "SET", "BYTES", "DURATION", "AGE",
    ] {
        assert!(header.contains(col), "no {col} column in:\n{table}");
    }
    assert!(
        table.contains("Completed") && table.contains(&set),
        "{table}"
    );
    eprintln!("{table}");
}

#[tokio::test]
async fn backups_that_would_read_the_wrong_volume_or_write_the_wrong_place_are_refused() {
    let nightly = Tmpfs::mount("64m");
    let small = Tmpfs::mount("1m");
    let own = tempfile::tempdir_in("/var/tmp").expect("mountpoint");
    let flags = [
        format!("nightly={}", nightly.path().display()),
        format!("small={}", small.path().display()),
        format!("self={}", own.path().display()),
    ];
    let (cluster, lnfs) = cluster_with(202, &flags).await;
    let client = cluster.client();
    let (victim_dir, victim) = claim_in(&client, &lnfs, "default", "data", "16Mi").await;
    write_data(&victim_dir, 3 << 20);
    let victim_sums = sums(&victim_dir);

    // Unknown target name.
    create_backup(&client, "default", "unknown", "data", "nope").await;
    let st = finished(&client, &lnfs, "default", "unknown").await;
    assert_eq!(st.phase, Some(Phase::Failed));
    let msg = st.message.unwrap_or_default();
    assert!(
        msg.contains(
            "no backup target named nope on node node-1; configured: nightly, self, small"
        ),
        "{msg}"
    );
    event(&client, "default", "unknown", "BackupFailed").await;

    // A target that is one of this agent's own volumes (here a bind mount of its
    // directory, as an NFS mount of its export would be).
    let (other_dir, other) = claim_in(&client, &lnfs, "default", "other", "16Mi").await;
    let _bind = Bind::mount(&other_dir, own.path());
    create_backup(&client, "default", "onto-self", "data", "self").await;
    let st = finished(&client, &lnfs, "default", "onto-self").await;
    assert_eq!(st.phase, Some(Phase::Failed));
    let msg = st.message.unwrap_or_default();
    assert!(
        msg.contains(&format!("is volume {other} of node node-1")),
        "{msg}"
    );
    assert!(
        entries(&other_dir).is_empty(),
        "written into the volume: {:?}",
        entries(&other_dir)
    );

    // A full target: Failed with BackupTargetUnavailable, no set, source untouched.
    create_backup(&client, "default", "too-big", "data", "small").await;
    let st = finished(&client, &lnfs, "default", "too-big").await;
    assert_eq!(st.phase, Some(Phase::Failed));
    let msg = st.message.unwrap_or_default();
    assert!(msg.contains("the backup target is full"), "{msg}");
    let note = event(&client, "default", "too-big", "BackupTargetUnavailable").await;
    assert!(note.contains("full"), "{note}");
    let sets: Vec<String> = entries(&small.path().join(&victim))
        .into_iter()
        .filter(|e| !e.starts_with('.'))
        .collect();
    assert!(
        sets.is_empty(),
        "a set was left on the full target: {sets:?}"
    );
    assert_eq!(sums(&victim_dir), victim_sums, "the source changed");

    // Another namespace: its claim's PV re-pointed at default/data's volume (as a
    // PV edited by mistake or by someone who may edit PVs) does not make the agent
    // read default/data's volume: the owner record decides.
    namespace(&client, "shop").await;
    let (_, mine) = claim_in(&client, &lnfs, "shop", "mine", "16Mi").await;
    let pv_name = Api::<PersistentVolumeClaim>::namespaced(client.clone(), "shop")
        .get("mine")
        .await
        .expect("claim")
        .spec
        .and_then(|s| s.volume_name)
        .expect("bound");
    Api::<PersistentVolume>::all(client.clone())
        .patch(
            &pv_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {VOLUME_KEY: victim}}})),
        )
        .await
        .expect("re-point the PV");
    // A tenant's own claim carrying localnfs's keys and naming the victim's PV.
    let victim_pv = Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .get("data")
        .await
        .expect("claim")
        .spec
        .and_then(|s| s.volume_name)
        .expect("bound");
    let mut thief = claim("thief", "now", "16Mi", json!({"volumeName": victim_pv}));
    thief.metadata.annotations = Some([(VOLUME_KEY.to_owned(), victim.clone())].into());
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), "shop")
        .create(&PostParams::default(), &thief)
        .await
        .expect("create claim");
    // The agent's PV cache must have seen the new annotation first.
    tokio::time::sleep(Duration::from_secs(3)).await;
    create_backup(&client, "shop", "steal", "mine", "nightly").await;
    create_backup(&client, "shop", "steal-2", "thief", "nightly").await;
    let st = finished(&client, &lnfs, "shop", "steal").await;
    assert_eq!(st.phase, Some(Phase::Failed), "{st:?}");
    let msg = st.message.unwrap_or_default();
    assert!(msg.contains("belongs to claim default/data"), "{msg}");
    assert!(
        msg.contains(&format!("volume {victim} on node node-1")),
        "{msg}"
    );
    assert_ne!(mine, victim);
    let st2 = Api::<VolumeBackup>::namespaced(client.clone(), "shop")
        .get("steal-2")
        .await
        .expect("get")
        .status
        .unwrap_or_default();
    assert_ne!(st2.volume.as_deref(), Some(victim.as_str()), "{st2:?}");
    assert!(
        entries(&nightly.path().join(&victim))
            .iter()
            .all(|e| e.starts_with('.')),
        "the victim's data reached the target: {:?}",
        entries(&nightly.path().join(&victim))
    );
}

/// Says the schedule last ran an hour ago (through the status subresource, as the
/// controller writes it), so its latest missed due time is due now: the test does not
/// wait for the clock to reach the next minute before the first backup.
async fn ran_an_hour_ago(api: &Api<VolumeBackupSchedule>, name: &str) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64;
    let hour_ago = k8s_openapi::jiff::Timestamp::from_second(now - 3600)
        .expect("timestamp")
        .to_string();
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"lastScheduleTime": hour_ago}})),
    )
    .await
    .expect("backdate lastScheduleTime");
}

/// Sleeps until `after` seconds past the next minute: a `*/1` schedule's next due time
/// has then come and gone.
async fn past_the_next_minute(after: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    tokio::time::sleep(Duration::from_secs(60 - now % 60 + after)).await;
}

#[tokio::test]
async fn a_due_schedule_makes_a_volume_backup_owned_by_it_that_completes() {
    let target = Tmpfs::mount("64m");
    let flag = format!("nightly={}", target.path().display());
    let (cluster, lnfs) = cluster_with(203, &[flag]).await;
    let client = cluster.client();
    let (dir, _) = claim_in(&client, &lnfs, "default", "data", "16Mi").await;
    write_data(&dir, 64 << 10);
    let sched: VolumeBackupSchedule = serde_json::from_value(json!({
        "metadata": {"name": "often", "namespace": "default"},
        "spec": {"schedule": "*/1 * * * *", "successfulBackupsHistoryLimit": 1,
                 "template": {"claim": "data", "target": "nightly"}},
    }))
    .expect("schedule");
    let made = Api::<VolumeBackupSchedule>::namespaced(client.clone(), "default")
        .create(&PostParams::default(), &sched)
        .await
        .expect("create schedule");
    let schedules = Api::<VolumeBackupSchedule>::namespaced(client.clone(), "default");
    ran_an_hour_ago(&schedules, "often").await;
    let backups: Api<VolumeBackup> = Api::namespaced(client.clone(), "default");
    let first = tokio::time::timeout(
        Duration::from_secs(80),
        eventually(
            "a scheduled VolumeBackup",
            Duration::from_secs(80),
            || async {
                backups
                    .list(&Default::default())
                    .await
                    .ok()?
                    .items
                    .into_iter()
                    .next()
            },
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("no VolumeBackup within 80 s\n{}", lnfs.logs()));
    let name = first.name_any();
    assert!(
        name.starts_with("often-20") && name.len() == "often-".len() + 12,
        "{name}"
    );
    let owner = first
        .owner_references()
        .first()
        .cloned()
        .expect("ownerReference");
    assert_eq!(
        (owner.kind.as_str(), owner.uid),
        ("VolumeBackupSchedule", made.uid().unwrap_or_default())
    );
    let st = finished(&client, &lnfs, "default", &name).await;
    assert_eq!(st.phase, Some(Phase::Completed), "{st:?}");
    let s = Api::<VolumeBackupSchedule>::namespaced(client.clone(), "default")
        .get("often")
        .await
        .expect("schedule")
        .status
        .unwrap_or_default();
    assert!(s.last_schedule_time.is_some(), "{s:?}");

    // Suspended: no new object; the history limit keeps one Completed object.
    Api::<VolumeBackupSchedule>::namespaced(client.clone(), "default")
        .patch(
            "often",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"suspend": true}})),
        )
        .await
        .expect("suspend");
    let names = || async {
        let list = backups.list(&Default::default()).await.expect("list").items;
        list.iter().map(ResourceExt::name_any).collect::<Vec<_>>()
    };
    let before = names().await;
    past_the_next_minute(10).await;
    let after = names().await;
    let new: Vec<_> = after.iter().filter(|n| !before.contains(n)).collect();
    assert!(new.is_empty(), "a suspended schedule made {new:?}");
}

#[tokio::test]
async fn an_agent_killed_during_a_volume_backup_leaves_it_finished_and_no_unfinished_set() {
    let target = Tmpfs::mount("1g");
    let flag = format!("nightly={}", target.path().display());
    let flags = [flag];
    let (cluster, mut lnfs) = cluster_with(204, &flags).await;
    let client = cluster.client();
    let (dir, volume) = claim_in(&client, &lnfs, "default", "data", "900Mi").await;
    // Many files, so the backup runs long enough to be seen running and cut: 375 MiB
    // in 2,000 files alone took 1.7 s on a quiet machine, less than one progress
    // write apart; 12,000 small ones add per-file work.
    support::fill_many_files(&dir);
    claim_in(&client, &lnfs, "default", "other", "16Mi").await;
    create_backup(&client, "default", "cut", "data", "nightly").await;
    let api: Api<VolumeBackup> = Api::namespaced(client.clone(), "default");
    // Progress is reported while it runs, in the status and the agent's gauge.
    let agent_admin = lnfs.admin["agent/node-1"];
    let progress = eventually("progress of the running backup", WAIT, || async {
        let st = api.get("cut").await.ok()?.status?;
        assert!(
            !st.phase?.is_final(),
            "finished before any progress was seen: {st:?}"
        );
        let bytes = st.progress_bytes.filter(|b| *b > 0)?;
        let gauge = support::scrape(agent_admin)
            .await
            .get("localnfs_backup_progress_bytes", &[]);
        (gauge > 0.0).then_some((bytes, st.bytes_per_second))
    })
    .await;
    assert!(progress.1.is_some_and(|b| b > 0), "{progress:?}");
    // A second backup of the same claim meanwhile is refused at once: one tenant
    // cannot queue many backups ahead of others on the node.
    create_backup(&client, "default", "again", "data", "nightly").await;
    let st = finished(&client, &lnfs, "default", "again").await;
    if st.phase == Some(Phase::Failed) {
        let msg = st.message.unwrap_or_default();
        assert!(
            msg.contains("another backup of this claim is unfinished: cut"),
            "{msg}"
        );
    } else {
        let cut = status_of(&api, "cut").await;
        assert!(
            cut.phase.is_some_and(Phase::is_final),
            "two backups of one claim ran: {st:?} {cut:?}"
        );
    }
    // Another claim's backup meanwhile waits its turn, saying so.
    create_backup(&client, "default", "queued", "other", "nightly").await;
    let waited = eventually("the queued backup waiting", WAIT, || async {
        let st = api.get("queued").await.ok()?.status?;
        if st
            .message
            .as_deref()
            .is_some_and(|m| m.contains("waiting for another backup on node node-1"))
        {
            assert_eq!(st.phase, Some(Phase::Pending), "{st:?}");
            return Some(true);
        }
        (st.phase? != Phase::Pending).then_some(false)
    })
    .await;
    if !waited {
        let cut = status_of(&api, "cut").await;
        assert!(
            cut.phase.is_some_and(Phase::is_final),
            "two backups ran at once: {cut:?}"
        );
    }
    lnfs.stop_agent("node-1").await; // SIGKILL
    lnfs.start_agent_with("node-1", ip(204), &agent_flags(&flags));
    let st = finished(&client, &lnfs, "default", "cut").await;
    match st.phase {
        Some(Phase::Failed) => {
            let msg = st.message.unwrap_or_default();
            assert!(
                msg.contains("the node agent restarted during the backup"),
                "{msg}"
            );
        }
        Some(Phase::Completed) => eprintln!("the backup finished before the kill"),
        p => panic!("left {p:?}"),
    }
    // The waiting one was not started, so the restarted agent runs it.
    let st = finished(&client, &lnfs, "default", "queued").await;
    if waited {
        assert_eq!(st.phase, Some(Phase::Completed), "{st:?}");
    }
    create_backup(&client, "default", "after", "data", "nightly").await;
    let st = finished(&client, &lnfs, "default", "after").await;
    assert_eq!(st.phase, Some(Phase::Completed), "{st:?}\n{}", lnfs.logs());
    let unfinished: Vec<String> = entries(&target.path().join(&volume))
        .into_iter()
        .filter(|e| e.contains("partial"))
        .collect();
    assert!(
        unfinished.is_empty(),
        "unfinished sets remain: {unfinished:?}"
    );
}

#[tokio::test]
async fn tenants_back_up_through_the_edit_role_cannot_write_status_and_agent_and_controller_run_on_their_own_rbac()
 {
    use k8s_openapi::api::core::v1::ServiceAccount;
    use k8s_openapi::api::rbac::v1::RoleBinding;
    use support::credentials::{account_token, apply_namespace_and_rbac, client_with_token};
    let target = Tmpfs::mount("64m");
    let flags = [format!("nightly={}", target.path().display())];
    // The aggregation controller fills in `edit` (the test cluster runs only the
    // controllers tests need; a flag given again adds to the list).
    let cluster = TestCluster::start_with(localnfs_testbed::ClusterOptions {
        controller_manager_args: vec!["--controllers=clusterrole-aggregation".into()],
        ..Default::default()
    })
    .await
    .expect("control plane");
    install_crds(cluster.kubeconfig());
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    apply_namespace_and_rbac(cluster.kubeconfig());
    kubelet::add_node(&client, "node-1", ip(205))
        .await
        .expect("node");
    // The agent as the DaemonSet runs it: the shipped ClusterRole, a pod-bound token.
    lnfs.use_pod_credentials(&client, "node-1").await;
    lnfs.start_agent_with("node-1", ip(205), &agent_flags(&flags));
    // The controller as its Deployment runs it: its service account's token.
    let dir = tempfile::tempdir().expect("dir");
    let token = account_token(&client, NAMESPACE, "localnfs-controller", None).await;
    let controller_kc = dir.path().join("controller.kubeconfig");
    support::credentials::kubeconfig_with_token(cluster.kubeconfig(), &token, &controller_kc);
    let controller_log = std::fs::File::create(dir.path().join("controller.log")).expect("log");
    let _controller = tokio::process::Command::new(env!("CARGO_BIN_EXE_localnfs"))
        .args([
            "controller",
            "--namespace",
            NAMESPACE,
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .arg("--kubeconfig")
        .arg(&controller_kc)
        .stderr(controller_log)
        .kill_on_drop(true)
        .spawn()
        .expect("start the controller");
    let controller_logs =
        || std::fs::read_to_string(dir.path().join("controller.log")).unwrap_or_default();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;

    // A tenant bound to the built-in `edit` role in `default`, nothing else.
    let pp = PostParams::default();
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "tenant"}})).expect("sa");
    Api::<ServiceAccount>::namespaced(client.clone(), "default")
        .create(&pp, &sa)
        .await
        .expect("tenant account");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "tenant-edit"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
        "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": "default"}],
    }))
    .expect("binding");
    Api::<RoleBinding>::namespaced(client.clone(), "default")
        .create(&pp, &binding)
        .await
        .expect("tenant binding");
    let token = account_token(&client, "default", "tenant", None).await;
    let tenant = client_with_token(cluster.kubeconfig(), &token, dir.path(), "tenant").await;

    let (dir_data, _) = claim_in(&client, &lnfs, "default", "data", "16Mi").await;
    write_data(&dir_data, 64 << 10);
    // `edit` gets localnfs-backup-user by aggregation (the controller-manager fills
    // it in shortly after the ClusterRole appears, the authorizer a moment later).
    eventually("the tenant may create VolumeBackups", WAIT, || async {
        let vbk: VolumeBackup = serde_json::from_value(json!({
            "metadata": {"name": "mine", "namespace": "default"},
            "spec": {"claim": "data", "target": "nightly"},
        }))
        .ok()?;
        Api::<VolumeBackup>::namespaced(tenant.clone(), "default")
            .create(&PostParams::default(), &vbk)
            .await
            .ok()
    })
    .await;
    let st = finished(&tenant, &lnfs, "default", "mine").await;
    assert_eq!(st.phase, Some(Phase::Completed), "{st:?}\n{}", lnfs.logs());
    event(&tenant, "default", "mine", "BackupCompleted").await;

    // The tenant cannot write status (a forged Completed, a forged volume).
    let forged = Api::<VolumeBackup>::namespaced(tenant.clone(), "default")
        .patch_status(
            "mine",
            &PatchParams::default(),
            &Patch::Merge(localnfs::objects::backups::status_patch::<VolumeBackup>(
                &json!({"volume": "pvc-someone-else"}),
            )),
        )
        .await;
    match forged {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{e:?}"),
        other => panic!("a tenant wrote a VolumeBackup's status: {other:?}"),
    }

    // A tenant's schedule: the controller, on its shipped RBAC, makes its VolumeBackup.
    let sched: VolumeBackupSchedule = serde_json::from_value(json!({
        "metadata": {"name": "often", "namespace": "default"},
        "spec": {"schedule": "* * * * *", "template": {"claim": "data", "target": "nightly"}},
    }))
    .expect("schedule");
    Api::<VolumeBackupSchedule>::namespaced(tenant.clone(), "default")
        .create(&PostParams::default(), &sched)
        .await
        .expect("the tenant creates a schedule");
    let made = tokio::time::timeout(
        Duration::from_secs(80),
        eventually(
            "the schedule's VolumeBackup",
            Duration::from_secs(80),
            || async {
                let list = Api::<VolumeBackup>::namespaced(tenant.clone(), "default")
                    .list(&Default::default())
                    .await
                    .ok()?;
                list.items
                    .into_iter()
                    .map(|b| b.name_any())
                    .find(|n| n.starts_with("often-"))
            },
        ),
    )
    .await
    .unwrap_or_else(|_| panic!("no scheduled VolumeBackup\n{}", controller_logs()));
    let st = finished(&tenant, &lnfs, "default", &made).await;
    assert_eq!(st.phase, Some(Phase::Completed), "{st:?}");
}

/// A schedule whose last VolumeBackup never finishes (here: its claim does not exist,
/// so no agent takes it) makes no more: due times are skipped, and its status says
/// why, instead of queueing one more object every tick.
#[tokio::test]
async fn a_schedule_skips_due_times_while_its_last_backup_is_unfinished() {
    let target = Tmpfs::mount("16m");
    let flag = format!("nightly={}", target.path().display());
    let (cluster, lnfs) = cluster_with(206, &[flag]).await;
    let client = cluster.client();
    let sched: VolumeBackupSchedule = serde_json::from_value(json!({
        "metadata": {"name": "stuck", "namespace": "default"},
        "spec": {"schedule": "*/1 * * * *",
                 "template": {"claim": "no-such-claim", "target": "nightly"}},
    }))
    .expect("schedule");
    let schedules = Api::<VolumeBackupSchedule>::namespaced(client.clone(), "default");
    schedules
        .create(&PostParams::default(), &sched)
        .await
        .expect("create schedule");
    ran_an_hour_ago(&schedules, "stuck").await;
    let message = eventually("a skipped due time", Duration::from_secs(150), || async {
        let st = schedules.get("stuck").await.ok()?.status?;
        st.message
            .filter(|m| m.contains("skipped the backup due at"))
    })
    .await;
    let list = Api::<VolumeBackup>::namespaced(client.clone(), "default")
        .list(&Default::default())
        .await
        .expect("list")
        .items;
    let names: Vec<String> = list.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names.len(), 1, "{names:?}\n{}", lnfs.logs());
    assert!(
        message.contains(&format!("VolumeBackup {} is unfinished", names[0])),
        "{message}"
    );
}

/// A VolumeBackup no node agent will run (its claim missing, not bound, or bound to a
/// volume of another provisioner) is marked Failed by the controller, saying why,
/// with a `BackupFailed` event, once the grace period for agents has passed; a
/// VolumeBackup of a localnfs claim is still the agent's.
#[tokio::test]
async fn a_volume_backup_no_agent_can_run_fails_with_the_reason_instead_of_waiting_forever() {
    let target = Tmpfs::mount("16m");
    let flags = [format!("nightly={}", target.path().display())];
    let cluster = TestCluster::start().await.expect("control plane");
    install_crds(cluster.kubeconfig());
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    kubelet::add_node(&client, "node-1", ip(207))
        .await
        .expect("node");
    lnfs.start_agent_with("node-1", ip(207), &agent_flags(&flags));
    // A short grace, so the test does not wait out the default two minutes.
    lnfs.start_controller_with(&["--backup-grace", "15s"]);
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    storage_class(
        &client,
        "later",
        json!({"volumeBindingMode": "WaitForFirstConsumer"}),
    )
    .await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    claims
        .create(
            &PostParams::default(),
            &claim("unbound", "later", "4Mi", json!({})),
        )
        .await
        .expect("claim");
    // A claim bound to a PV localnfs did not make (a static NFS PV).
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": "static-nfs"},
        "spec": {"capacity": {"storage": "4Mi"}, "accessModes": ["ReadWriteOnce"],
                 "storageClassName": "", "nfs": {"server": "127.0.0.1", "path": "/exports/x"},
                 "claimRef": {"namespace": "default", "name": "foreign"}},
    }))
    .expect("pv");
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .expect("static PV");
    claims
        .create(
            &PostParams::default(),
            &claim("foreign", "", "4Mi", json!({"volumeName": "static-nfs"})),
        )
        .await
        .expect("claim");
    let (dir, ours) = claim_in(&client, &lnfs, "default", "ours", "4Mi").await;
    write_data(&dir, 1024);
    // Bound before its backup exists: otherwise, on a slow machine, the grace could
    // end while it is still Pending and the object fail for that reason instead.
    eventually("claim foreign Bound", WAIT, || async {
        let c = claims.get("foreign").await.ok()?;
        (c.status?.phase.as_deref() == Some("Bound")).then_some(())
    })
    .await;
    for (name, claim) in [
        ("of-nothing", "missing"),
        ("of-unbound", "unbound"),
        ("of-foreign", "foreign"),
        ("of-ours", "ours"),
    ] {
        create_backup(&client, "default", name, claim, "nightly").await;
    }
    let st = finished(&client, &lnfs, "default", "of-ours").await;
    assert_eq!(st.phase, Some(Phase::Completed), "{st:?}");
    let api: Api<VolumeBackup> = Api::namespaced(client.clone(), "default");
    for (name, says) in [
        ("of-nothing", "claim default/missing does not exist"),
        ("of-unbound", "claim default/unbound is Pending, not Bound"),
        (
            "of-foreign",
            "bound to PV static-nfs, provisioned by nobody known",
        ),
    ] {
        let st = tokio::time::timeout(
            Duration::from_secs(240),
            eventually(
                &format!("{name} Failed"),
                Duration::from_secs(240),
                || async {
                    let st = api.get(name).await.ok()?.status?;
                    st.phase?.is_final().then_some(st)
                },
            ),
        )
        .await
        .unwrap_or_else(|_| panic!("{name} was never given a status\n{}", lnfs.logs()));
        assert_eq!(st.phase, Some(Phase::Failed), "{name}: {st:?}");
        let message = st.message.unwrap_or_default();
        assert!(message.contains(says), "{name}: {message}");
        let note = event(&client, "default", name, "BackupFailed").await;
        assert!(note.contains(says), "{name}: {note}");
    }
    // Nothing was written to the target for them.
    assert_eq!(entries(target.path()), [ours]);
}
