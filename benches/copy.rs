//! Point-in-time copy of a live volume (issue 23): how long `localnfs volume copy`
//! takes on a running agent and how long the source's writes pause, next to `cp -a`
//! (plus `sync`, as the copy is durable when it answers) of the same data on the same
//! disk. Prints a markdown table.
//!
//! Per data set: a fresh root (not on tmpfs), volume `src` filled on disk, a release
//! `localnfs node --standalone` serving it, and a client appending 4 KiB `FILE_SYNC`
//! writes to `src/log` all along, timestamping each reply. Page caches are dropped
//! before the copy and before `cp -a`. Columns: the agent's own time for the copy (its
//! answer), the pause it held the source's mutations for to mark the instant (its
//! answer), and the longest gap between the client's acknowledged writes while the
//! copy ran against before it (what a pod sees).
//!
//! A second table (when `LOCALNFS_K8S_BIN_DIR` names the test control plane's
//! binaries): clones of the same data sets, on the source's node and on another. A
//! real control plane, the controller and two release agents on 127.0.0.91/92 (each
//! node's InternalIP), the sources' claims on node-1 filled on disk. First node-1 has
//! no room left, so each clone is made on node-2, streamed by the source's agent over
//! the peer channel (TLS on loopback); then node-1's agent is started again with room,
//! and each clone is made beside its source. Columns: the clone claim made → Bound,
//! and the making agent's own figures from its `VolumeCloned` event (copy or stream
//! time, the source's pause); the anchors, on node-1's disk with page caches dropped,
//! each then `sync`: `cp -a` of the source directory (same node) and a `tar -c | tar
//! -x` pipe (the other node's copy, without a network here). The source is idle.
//!
//! A third table (`copy/database.rs`): MariaDB on a localnfs volume mounted by a
//! kernel test node's NFS client, a copy and a backup taken under sysbench load, what
//! the database saw around each, next to `cp -a` and `tar` of the same datadir.
//!
//! `cargo bench --bench copy` (root and User-Mode Linux; ~1 min for the files table,
//! ~4 for the database, ~3 for the clones with the control plane), `-- --dir PATH` for
//! another disk, `-- --only files|database|clones` for one table.

#[path = "copy/database.rs"]
mod database;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nfs3_types::nfs3::stable_how;
use support::nfs::{Client, Node, create_volume};

struct DataSet {
    label: &'static str,
    dirs: usize,
    files_per_dir: usize,
    file_bytes: usize,
}

const SETS: [DataSet; 2] = [
    DataSet {
        label: "1 GiB in 16 files",
        dirs: 1,
        files_per_dir: 16,
        file_bytes: 64 << 20,
    },
    DataSet {
        label: "10,000 files of 4 KiB in 100 dirs",
        dirs: 100,
        files_per_dir: 100,
        file_bytes: 4096,
    },
];

fn fill(dir: &Path, set: &DataSet) {
    for d in 0..set.dirs {
        let sub = dir.join(format!("d{d}"));
        std::fs::create_dir_all(&sub).expect("mkdir");
        for f in 0..set.files_per_dir {
            let data: Vec<u8> = (0..set.file_bytes).map(|b| (b ^ f ^ d) as u8).collect();
            std::fs::write(sub.join(format!("f{f}")), data).expect("write");
        }
    }
}

fn drop_caches() {
    let _ = std::process::Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// `field` of a `localnfs volume` answer: the text after `key` up to the next comma.
fn field<'a>(answer: &'a str, key: &str) -> &'a str {
    answer
        .split(key)
        .nth(1)
        .and_then(|t| t.split(',').next())
        .unwrap_or("?")
}

/// The longest gap between consecutive times in `acks` that end inside `[from, to]`.
fn longest_gap(acks: &[Instant], keep: impl Fn(Instant) -> bool) -> Duration {
    acks.windows(2)
        .filter(|w| keep(w[1]))
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

struct Row {
    label: &'static str,
    answer: String,
    took: Duration,
    gap_during: Duration,
    gap_before: Duration,
    cp: Duration,
}

async fn measure(base: &Path, set: &DataSet) -> Row {
    let root = tempfile::tempdir_in(base).expect("root");
    create_volume(root.path(), "src", 8 << 30);
    let src = root.path().join("volumes/src");
    fill(&src, set);
    let agent = Node::start(root.path()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut c = Client::mount(agent.port, "src").await;
        let dir = c.root.clone();
        let f = c.create(&dir, b"log", 0o644).await.expect("CREATE");
        tokio::spawn(async move {
            let mut acks = Vec::new();
            let data = vec![7u8; 4096];
            let mut off = 0;
            while !stop.load(Ordering::Acquire) {
                c.write(&f, off, &data, stable_how::FILE_SYNC)
                    .await
                    .expect("WRITE");
                off += 4096;
                acks.push(Instant::now());
            }
            acks
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop_caches();
    let asked = Instant::now();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_localnfs"))
        .arg("volume")
        .arg("--root")
        .arg(root.path())
        .args(["copy", "src", "snap", "--timeout", "10m"])
        .output()
        .await
        .expect("localnfs volume copy");
    let answered = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Release);
    let acks = writer.await.expect("writer");
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        out.status.success(),
        "copy failed: {answer}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let took_ms: f64 = answer
        .rsplit("took ")
        .next()
        .and_then(|t| t.trim_end_matches(" ms").parse().ok())
        .expect("the answer's time");
    drop(agent);

    drop_caches();
    let anchor = root.path().join("cp-a");
    let started = Instant::now();
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(&src)
        .arg(&anchor)
        .status()
        .expect("cp -a");
    assert!(cp.success());
    let _ = std::process::Command::new("sync").status();
    let cp = started.elapsed();
    Row {
        label: set.label,
        answer,
        took: Duration::from_secs_f64(took_ms / 1e3),
        gap_during: longest_gap(&acks, |t| t >= asked && t <= answered),
        gap_before: longest_gap(&acks, |t| t < asked),
        cp,
    }
}

/// One data set's clones (module docs): claim made → Bound and the `VolumeCloned`
/// event's note, on the source's node and on the other node, and the anchors.
struct CloneRow {
    label: &'static str,
    same: (Duration, String),
    cross: (Duration, String),
    cp: Duration,
    tar: Duration,
}

/// `cmd` (a shell line) then `sync`, page caches dropped first; how long both took.
fn anchor(cmd: &str) -> Duration {
    drop_caches();
    let started = Instant::now();
    let ok = std::process::Command::new("sh")
        .args(["-c", cmd])
        .status()
        .expect("anchor");
    assert!(ok.success(), "{cmd}");
    let _ = std::process::Command::new("sync").status();
    started.elapsed()
}

/// Clones of each data set (module docs), cross-node first, then same-node.
async fn clone_rows() -> Vec<CloneRow> {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::{Event, PersistentVolumeClaim};
    use kube::api::{Api, PostParams};
    use serde_json::json;
    use support::cluster::{HEARTBEATS, Localnfs, claim, nfs_target, storage_class};
    let ip = |last| std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, last));
    let cluster = localnfs_testbed::TestCluster::start()
        .await
        .expect("control plane");
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    // node-1 holds the two sources (1300 MiB) and 50 MiB more: no room for a clone.
    lnfs.start_nodes_and_controller(
        &client,
        &[("node-1", ip(91), "1350Mi"), ("node-2", ip(92), "10Gi")],
    )
    .await;
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    storage_class(
        &client,
        "wait",
        json!({"volumeBindingMode": "WaitForFirstConsumer"}),
    )
    .await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let bound = |name: String| {
        let claims = claims.clone();
        async move {
            support::eventually(&format!("{name} Bound"), Duration::from_secs(900), || {
                let (claims, name) = (claims.clone(), name.clone());
                async move {
                    let c = claims.get(&name).await.ok()?;
                    (c.status?.phase.as_deref()? == "Bound").then_some(c.spec?.volume_name?)
                }
            })
            .await
        }
    };
    let sizes = ["1100Mi", "200Mi"];
    // Both sources made before either is filled, and both before the first clone:
    // a source made later found node-1 without room and waited for a consumer that
    // never comes. (Data filled on disk behind a running agent, as here, is counted
    // by it only at its next usage recount or restart, so until then the node's free
    // space is understated by that data, never overstated; `tests/node_free_space.rs`
    // shows data written through the agent is counted once.)
    let mut dirs = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let mut pvc = claim(&format!("src-{i}"), "wait", size, json!({}));
        pvc.metadata.annotations.get_or_insert_default().insert(
            localnfs::objects::keys::SELECTED_NODE.into(),
            "node-1".into(),
        );
        claims
            .create(&PostParams::default(), &pvc)
            .await
            .expect("source");
        let pv = bound(format!("src-{i}")).await;
        let pv = Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(client.clone())
            .get(&pv)
            .await
            .expect("pv");
        dirs.push(lnfs.root("node-1").join("volumes").join(nfs_target(&pv).2));
    }
    for (set, dir) in SETS.iter().zip(&dirs) {
        fill(dir, set);
    }
    // The anchors, on node-1's disk: `cp -a` for a copy on the same node, a `tar`
    // pipe for one sent elsewhere (here both ends are this machine).
    let mut anchors = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let (cp_to, tar_to) = (
            lnfs.root("node-1").join(format!("anchor-cp-{i}")),
            lnfs.root("node-1").join(format!("anchor-tar-{i}")),
        );
        let cp = anchor(&format!("cp -a '{}' '{}'", dir.display(), cp_to.display()));
        std::fs::create_dir(&tar_to).expect("mkdir");
        let tar = anchor(&format!(
            "tar -C '{}' -cf - . | tar -C '{}' -xf -",
            dir.display(),
            tar_to.display()
        ));
        for d in [cp_to, tar_to] {
            std::fs::remove_dir_all(d).expect("remove anchor copy");
        }
        anchors.push((cp, tar));
    }
    let clone_one = |copy: String, src: String, size: &'static str| {
        let (claims, events) = (claims.clone(), events.clone());
        async move {
            drop_caches();
            let asked = Instant::now();
            let clone = claim(
                &copy,
                "now",
                size,
                json!({"dataSource": {"kind": "PersistentVolumeClaim", "name": src}}),
            );
            claims
                .create(&PostParams::default(), &clone)
                .await
                .expect("clone");
            bound(copy.clone()).await;
            let took = asked.elapsed();
            let note = support::eventually("VolumeCloned", Duration::from_secs(60), || async {
                let list = events.list(&Default::default()).await.ok()?;
                list.items
                    .into_iter()
                    .filter(|e| e.involved_object.name.as_deref() == Some(copy.as_str()))
                    .filter(|e| e.reason.as_deref() == Some("VolumeCloned"))
                    .find_map(|e| e.message)
            })
            .await;
            (took, note)
        }
    };
    let mut cross = Vec::new();
    for (i, size) in sizes.into_iter().enumerate() {
        let (took, note) = clone_one(format!("copy-{i}"), format!("src-{i}"), size).await;
        assert!(note.contains("streamed from node node-1"), "{note}");
        cross.push((took, note));
    }
    // node-1's agent again with room for both clones beside their sources.
    lnfs.stop_agent("node-1").await;
    lnfs.start_agent_with("node-1", ip(91), &["--capacity", "4Gi"]);
    let leases: Api<Lease> = Api::namespaced(client.clone(), HEARTBEATS);
    support::eventually("node-1 offering room", Duration::from_secs(120), || async {
        let hb = leases.get("localnfs-node-node-1").await.ok()?;
        let free: u64 = hb
            .metadata
            .annotations?
            .get(localnfs::objects::keys::FREE_BYTES)?
            .parse()
            .ok()?;
        (free > 1400 << 20).then_some(())
    })
    .await;
    let mut rows = Vec::new();
    for (i, ((set, size), ((cp, tar), cross))) in SETS
        .iter()
        .zip(sizes)
        .zip(anchors.into_iter().zip(cross))
        .enumerate()
    {
        let same = clone_one(format!("same-{i}"), format!("src-{i}"), size).await;
        assert!(
            same.1.starts_with("node node-1:") && !same.1.contains("streamed"),
            "{}",
            same.1
        );
        rows.push(CloneRow {
            label: set.label,
            same,
            cross,
            cp,
            tar,
        });
    }
    rows
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut base = PathBuf::from("/var/tmp");
    if let Some(i) = args.iter().position(|a| a == "--dir") {
        base = PathBuf::from(args.get(i + 1).expect("--dir PATH"));
    }
    let only = args.iter().position(|a| a == "--only").map(|i| {
        args.get(i + 1)
            .expect("--only files|database|clones")
            .as_str()
    });
    let wanted = |table: &str| only.is_none_or(|o| o == table);
    if wanted("files") {
        files_table(&base).await;
    }
    if wanted("database") {
        database::print(&database::measure(&base).await);
    }
    if wanted("clones") {
        clones_table().await;
    }
}

/// The first table (module docs).
async fn files_table(base: &Path) {
    let mut rows = Vec::new();
    for set in &SETS {
        let row = measure(base, set).await;
        eprintln!("{}: {}", row.label, row.answer);
        rows.push(row);
    }
    println!();
    println!(
        "| data (ext4) | localnfs copy, live source | source pause to mark T | longest gap between a writer's FILE_SYNC replies: during / before the copy | `cp -a` + `sync`, idle source |"
    );
    println!("|---|---|---|---|---|");
    for r in rows {
        let pause = field(&r.answer, "source paused ");
        println!(
            "| {} | {:.2} s | {} | {:.1} ms / {:.1} ms | {:.2} s |",
            r.label,
            r.took.as_secs_f64(),
            pause,
            r.gap_during.as_secs_f64() * 1e3,
            r.gap_before.as_secs_f64() * 1e3,
            r.cp.as_secs_f64()
        );
    }
}

/// The clone table (module docs).
async fn clones_table() {
    if std::env::var_os("LOCALNFS_K8S_BIN_DIR").is_none() {
        eprintln!("LOCALNFS_K8S_BIN_DIR not set: no clone table");
        return;
    }
    let rows = clone_rows().await;
    // "(N files, M bytes) [taken ]in X s; the source's writes paused Y ms"
    let figures = |note: &str| {
        let time = note
            .split(" bytes) ")
            .nth(1)
            .and_then(|t| t.split(" s;").next())
            .map(|t| t.trim_start_matches("taken ").trim_start_matches("in "))
            .unwrap_or("?")
            .to_owned();
        let pause = note
            .split("paused ")
            .nth(1)
            .and_then(|t| t.split(" ms").next())
            .unwrap_or("?")
            .to_owned();
        (time, pause)
    };
    println!();
    println!(
        "| data (idle source) | same-node clone: claim made → Bound | the agent's copy time | `cp -a` + `sync` | cross-node clone: claim made → Bound | the receiving agent's stream time | `tar -c \\| tar -x` + `sync` | source pause to mark T: same / cross |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        let (same_time, same_pause) = figures(&r.same.1);
        let (cross_time, cross_pause) = figures(&r.cross.1);
        println!(
            "| {} | {:.2} s | {same_time} s | {:.2} s | {:.2} s | {cross_time} s | {:.2} s | {same_pause} ms / {cross_pause} ms |",
            r.label,
            r.same.0.as_secs_f64(),
            r.cp.as_secs_f64(),
            r.cross.0.as_secs_f64(),
            r.tar.as_secs_f64(),
        );
    }
}
