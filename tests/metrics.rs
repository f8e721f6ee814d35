//! What operators see on `/metrics`: the node agent's counts move with real NFS
//! traffic (per procedure and per volume: calls, bytes, latency, errors by status,
//! usage, connections, memory in flight), and the controller reports provisioning
//! latency, its queues and whether it leads; `localnfs status` draws volume use as bars.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Api, PostParams};
use localnfs::volume::{VolumeName, VolumeStore};
use nfs3_types::nfs3::{nfs_fh3, nfsstat3, stable_how};
use nfs3_types::xdr_codec::Opaque;
use serde_json::json;
use support::cluster::{bound_pv, claim, start_localnfs, status, storage_class, wait_for_leader};
use support::nfs::{Client, Node, create_volume};
use support::{Metrics, eventually, scrape};
use tokio::io::AsyncWriteExt;

const WAIT: Duration = Duration::from_secs(30);
const MIB: u64 = 1 << 20;

/// `after - before` of one sample.
fn delta(before: &Metrics, after: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.get(name, labels) - before.get(name, labels)
}

#[tokio::test]
async fn agent_metrics_count_what_clients_did_per_procedure_and_volume() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol-a", 64 * MIB);
    create_volume(dir.path(), "vol-b", 64 * MIB);
    let node = Node::start(dir.path()).await;
    let a = [("volume", "vol-a")];
    let b = [("volume", "vol-b")];

    // Every exported volume has its usage series from the start.
    let m0 = scrape(node.admin).await;
    assert_eq!(m0.get("localnfs_volumes", &[]), 2.0, "{}", m0.0);
    for v in [&a, &b] {
        assert_eq!(
            m0.get("localnfs_volume_capacity_bytes", v),
            64.0 * MIB as f64
        );
        assert_eq!(
            m0.get("localnfs_volume_inodes", v),
            16384.0,
            "one per 4 KiB"
        );
        assert_eq!(m0.get("localnfs_volume_inodes_used", v), 0.0);
        assert_eq!(m0.get("localnfs_volume_used_bytes", v), 0.0);
        assert!(m0.has("localnfs_volume_request_duration_seconds_count", v));
    }
    assert_eq!(
        m0.get("localnfs_nfs_in_flight_bytes_limit", &[]),
        128.0 * MIB as f64,
        "the default budget"
    );

    let mut c = Client::mount(node.port, "vol-a").await;
    let root = c.root.clone();
    let file = c.create(&root, b"f", 0o644).await.expect("create");
    let m1 = scrape(node.admin).await;
    let mnt = [("volume", "vol-a"), ("procedure", "MNT")];
    assert_eq!(delta(&m0, &m1, "localnfs_volume_requests_total", &mnt), 1.0);
    assert_eq!(delta(&m0, &m1, "localnfs_volume_inodes_used", &a), 1.0);

    // The traffic whose counts the second scrape must show, and nothing else.
    let data = vec![7u8; 10_000];
    c.write(&file, 0, &data, stable_how::FILE_SYNC)
        .await
        .expect("write");
    let back = c.read(&file, 0, 4096).await.expect("read");
    assert_eq!(back.len(), 4096);
    for _ in 0..5 {
        c.getattr(&file).await.expect("getattr");
    }
    for _ in 0..2 {
        assert_eq!(
            c.lookup(&root, b"missing").await,
            Err(nfsstat3::NFS3ERR_NOENT)
        );
    }
    let past_the_size = c.write(&file, 100 * MIB, b"x", stable_how::UNSTABLE).await;
    assert_eq!(past_the_size.err(), Some(nfsstat3::NFS3ERR_DQUOT));
    let forged = nfs_fh3 {
        data: Opaque::owned(vec![1; 40]),
    };
    assert_eq!(
        c.getattr(&forged).await.err(),
        Some(nfsstat3::NFS3ERR_BADHANDLE)
    );
    let m2 = scrape(node.admin).await;
    let d = |name: &str, labels: &[(&str, &str)]| delta(&m1, &m2, name, labels);

    // Per procedure, server-wide.
    let getattr = [("program", "nfs"), ("procedure", "GETATTR")];
    assert_eq!(d("localnfs_nfs_requests_total", &getattr), 6.0, "{}", m2.0);
    assert_eq!(
        d("localnfs_nfs_request_duration_seconds_count", &getattr),
        6.0
    );
    let inf = [("procedure", "GETATTR"), ("le", "+Inf")];
    assert_eq!(d("localnfs_nfs_request_duration_seconds_bucket", &inf), 6.0);
    assert!(d("localnfs_nfs_request_duration_seconds_sum", &getattr) > 0.0);
    let errors = |procedure, status| [("procedure", procedure), ("status", status)];
    assert_eq!(
        d(
            "localnfs_nfs_errors_total",
            &errors("GETATTR", "NFS3ERR_BADHANDLE")
        ),
        1.0
    );
    assert_eq!(
        d(
            "localnfs_nfs_errors_total",
            &errors("LOOKUP", "NFS3ERR_NOENT")
        ),
        2.0
    );
    assert_eq!(
        d(
            "localnfs_nfs_errors_total",
            &errors("WRITE", "NFS3ERR_DQUOT")
        ),
        1.0
    );
    assert_eq!(
        d("localnfs_nfs_requests_total", &[("procedure", "WRITE")]),
        2.0
    );
    assert_eq!(
        d("localnfs_nfs_requests_total", &[("procedure", "READ")]),
        1.0
    );

    // Per volume: the forged handle belongs to no volume.
    let on_a = |procedure| [("volume", "vol-a"), ("procedure", procedure)];
    assert_eq!(d("localnfs_volume_requests_total", &on_a("GETATTR")), 5.0);
    assert_eq!(d("localnfs_volume_requests_total", &on_a("LOOKUP")), 2.0);
    assert_eq!(d("localnfs_volume_requests_total", &on_a("WRITE")), 2.0);
    assert_eq!(
        d("localnfs_volume_request_duration_seconds_count", &a),
        10.0,
        "write, read, 5 getattr, 2 lookup, 1 write"
    );
    assert_eq!(d("localnfs_volume_written_bytes_total", &a), 10_000.0);
    assert_eq!(d("localnfs_volume_read_bytes_total", &a), 4096.0);
    let status = |s| [("volume", "vol-a"), ("status", s)];
    assert_eq!(
        d("localnfs_volume_errors_total", &status("NFS3ERR_NOENT")),
        2.0
    );
    assert_eq!(
        d("localnfs_volume_errors_total", &status("NFS3ERR_DQUOT")),
        1.0
    );
    assert_eq!(
        d("localnfs_volume_errors_total", &status("NFS3ERR_BADHANDLE")),
        0.0
    );
    // What the volume is charged grew by what the file takes on disk.
    let md = std::fs::metadata(dir.path().join("volumes/vol-a/f")).expect("stat");
    let charged = localnfs::volume::charge(true, md.len(), md.blocks());
    assert_eq!(d("localnfs_volume_used_bytes", &a), charged as f64);
    assert_eq!(d("localnfs_volume_inodes_used", &a), 0.0);
    // The other volume saw nothing.
    assert_eq!(m2.get("localnfs_volume_requests_total", &b), 0.0);
    assert_eq!(
        m2.get("localnfs_volume_request_duration_seconds_count", &b),
        0.0
    );

    // Connections and the bytes held for a record still arriving.
    eventually(
        "one NFS connection (the MOUNT one closed)",
        WAIT,
        || async {
            let m = scrape(node.admin).await;
            (m.get("localnfs_nfs_connections", &[]) == 1.0).then_some(())
        },
    )
    .await;
    let mut stalled = tokio::net::TcpStream::connect(node.addr)
        .await
        .expect("connect");
    // A record mark promising 64 KiB, and 1000 bytes of it.
    let mut partial = (0x8000_0000u32 | 65536).to_be_bytes().to_vec();
    partial.extend_from_slice(&[0; 1000]);
    stalled.write_all(&partial).await.expect("send");
    eventually("the partial record charged to the budget", WAIT, || async {
        let m = scrape(node.admin).await;
        let held = m.get("localnfs_nfs_in_flight_bytes", &[]);
        (m.get("localnfs_nfs_connections", &[]) == 2.0 && held >= 1000.0).then_some(())
    })
    .await;
    drop(stalled);
    drop(c);
    eventually(
        "connections closed and their bytes returned",
        WAIT,
        || async {
            let m = scrape(node.admin).await;
            (m.get("localnfs_nfs_connections", &[]) == 0.0
                && m.get("localnfs_nfs_in_flight_bytes", &[]) == 0.0)
                .then_some(())
        },
    )
    .await;

    // A volume that goes away takes its series with it.
    let store = VolumeStore::open(dir.path()).expect("store");
    store
        .delete(&VolumeName::new("vol-b").expect("name"))
        .expect("delete");
    eventually("vol-b's series gone", WAIT, || async {
        let m = scrape(node.admin).await;
        (!m.has("localnfs_volume_capacity_bytes", &b) && m.get("localnfs_volumes", &[]) == 1.0)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn controller_reports_leadership_queues_and_provisioning_latency() {
    let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 61, 1));
    let (cluster, mut lnfs) = start_localnfs(&[("node-1", ip, "10Gi")]).await;
    let client = cluster.client();
    let standby = lnfs.start_controller();
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    let (_, leader_pid) = wait_for_leader(&client).await;
    let leader = lnfs
        .controllers
        .iter()
        .position(|c| c.id() == Some(leader_pid))
        .expect("the leader is one of ours");
    let other = if leader == standby { 0 } else { standby };
    let admin = |i: usize| lnfs.admin[&format!("controller/{i}")];
    let (leader_admin, other_admin) = (admin(leader), admin(other));

    let before = eventually("the leader says it leads", WAIT, || async {
        let m = scrape(leader_admin).await;
        (m.get("localnfs_leader", &[]) == 1.0).then_some(m)
    })
    .await;
    let standby_page = scrape(other_admin).await;
    assert_eq!(standby_page.get("localnfs_leader", &[]), 0.0);
    assert!(
        standby_page.has("localnfs_leader", &[]),
        "a standby reports 0, not nothing"
    );

    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    claims
        .create(
            &PostParams::default(),
            &claim("data", "now", "4Mi", json!({})),
        )
        .await
        .expect("create claim");
    let pv = bound_pv(&client, "data").await;
    let volume = pv
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(localnfs::objects::keys::VOLUME_KEY))
        .cloned()
        .expect("the PV names its volume");
    let after = eventually("the provisioning counted", WAIT, || async {
        let m = scrape(leader_admin).await;
        (m.get("localnfs_provisioned_total", &[]) > before.get("localnfs_provisioned_total", &[]))
            .then_some(m)
    })
    .await;
    assert_eq!(
        delta(
            &before,
            &after,
            "localnfs_provision_duration_seconds_count",
            &[]
        ),
        1.0,
        "{}",
        after.0
    );
    assert_eq!(
        delta(&before, &after, "localnfs_provisioned_total", &[]),
        1.0
    );
    for queue in ["claims", "pvs"] {
        assert!(
            after.has("localnfs_queue_depth", &[("queue", queue)]),
            "{queue} queue depth missing:\n{}",
            after.0
        );
    }
    let standby_page = scrape(other_admin).await;
    assert_eq!(
        standby_page.get("localnfs_provisioned_total", &[]),
        0.0,
        "the standby did nothing"
    );

    // The agent labels the volume with its claim.
    let agent = lnfs.admin["agent/node-1"];
    let labels = [
        ("volume", volume.as_str()),
        ("namespace", "default"),
        ("persistentvolumeclaim", "data"),
    ];
    eventually("the agent's volume series name the claim", WAIT, || async {
        let m = scrape(agent).await;
        (m.get("localnfs_volume_capacity_bytes", &labels) == 4.0 * MIB as f64).then_some(())
    })
    .await;

    // `localnfs status` draws the same use, from the agent's usage report: an empty 4 MiB
    // volume, 1024 objects allowed.
    eventually("status draws the volume's use", WAIT, || async {
        let table = status(&lnfs.kubeconfig).await;
        let row = table.lines().find(|l| l.contains("default/data"))?;
        (row.contains("[..........]   0%       0 B")
            && row.contains("[..........]   0% 0/1024")
            && row.ends_with("Bound"))
        .then_some(())
    })
    .await;
}
