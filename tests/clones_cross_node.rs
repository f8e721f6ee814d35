//! Clones to another node (issue 23 item 2): when the source's node has no room, the
//! clone is made on another node, whose agent streams it from the source's agent over
//! the peer channel (`node::peer`); nothing else may use that channel.
//!
//! Real v1.20.2 control plane, real controller and node agent processes on 127.0.0.x
//! (each node's InternalIP), real TLS connections; the files are written into the
//! source volume's directory on the node's disk, as data a pod wrote before.

mod support;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, PersistentVolumeClaim, Secret};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use localnfs::node::peer::{client_tls, read_frame, write_frame};
use localnfs::objects::agents::{AgentInfo, lease_name};
use localnfs::objects::keys::{CONTROLLER_KEY_FIELD, CONTROLLER_KEY_SECRET};
use localnfs::objects::peer::{self as wire, Ask, BINDING_LEN, EXPORTER_LABEL, Frame, RECEIVER};
use localnfs::objects::request::{CloneSource, VolumeRequest};
use localnfs::objects::signed::{self, Signer};
use localnfs::volume::{VolumeName, VolumeSpec};
use ring::digest::{SHA256, digest};
use serde_json::json;
use support::cluster::*;
use support::eventually;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

const WAIT: Duration = Duration::from_secs(120);

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Every object under `dir` (relative path → kind, mode, owner, mtime, and the
/// contents' sha256, the symlink's target, or for a further name of a hard-linked
/// file the first name of its group).
fn tree(dir: &Path) -> BTreeMap<String, String> {
    fn walk(
        root: &Path,
        dir: &Path,
        inodes: &mut BTreeMap<u64, String>,
        out: &mut BTreeMap<String, String>,
    ) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("read dir")
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for path in entries {
            let rel = path
                .strip_prefix(root)
                .expect("prefix")
                .to_string_lossy()
                .into_owned();
            let m = std::fs::symlink_metadata(&path).expect("stat");
            let t = m.file_type();
            let what = if t.is_dir() {
                walk(root, &path, inodes, out);
                "dir".to_owned()
            } else if t.is_symlink() {
                format!(
                    "symlink -> {}",
                    std::fs::read_link(&path).expect("link").display()
                )
            } else if m.nlink() > 1 && inodes.contains_key(&m.ino()) {
                format!("hard link of {}", inodes[&m.ino()])
            } else {
                if m.nlink() > 1 {
                    inodes.insert(m.ino(), rel.clone());
                }
                let data = std::fs::read(&path).expect("read");
                format!("file sha256 {:?}", digest(&SHA256, &data))
            };
            // A symlink's mode is always 0777; a directory's mtime is what its
            // entries' creation left (compared too: the copy sets it last).
            let line = format!(
                "{what} mode {:o} owner {}:{} mtime {}.{}",
                m.mode() & 0o7777,
                m.uid(),
                m.gid(),
                m.mtime(),
                m.mtime_nsec()
            );
            out.insert(rel, line);
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut BTreeMap::new(), &mut out);
    out
}

/// Writes files with owners, modes, times, symlinks and hard links into `dir`, and a
/// file of `big` bytes.
fn write_tree(dir: &Path, big: usize) {
    std::fs::create_dir_all(dir.join("db/tables")).expect("mkdir");
    std::fs::create_dir_all(dir.join("empty")).expect("mkdir");
    std::fs::write(dir.join("precious"), b"rows").expect("write");
    std::fs::write(dir.join("db/tables/t1.ibd"), b"table one").expect("write");
    let data: Vec<u8> = (0..big as u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(dir.join("db/log"), &data).expect("write");
    std::fs::hard_link(dir.join("db/log"), dir.join("log-link")).expect("link");
    std::os::unix::fs::symlink("db/log", dir.join("latest")).expect("symlink");
    std::os::unix::fs::symlink("/nowhere/at/all", dir.join("dangling")).expect("symlink");
    std::os::unix::fs::chown(dir.join("db/tables/t1.ibd"), Some(999), Some(998)).expect("chown");
    std::os::unix::fs::lchown(dir.join("latest"), Some(999), Some(998)).expect("chown");
    std::os::unix::fs::chown(dir.join("db/tables"), Some(999), Some(998)).expect("chown");
    for (p, mode) in [("precious", 0o600), ("db/log", 0o4750), ("empty", 0o1777)] {
        std::fs::set_permissions(dir.join(p), std::fs::Permissions::from_mode(mode))
            .expect("chmod");
    }
    let old = SystemTime::UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789);
    std::fs::File::options()
        .write(true)
        .open(dir.join("precious"))
        .expect("open")
        .set_modified(old)
        .expect("mtime");
}

/// `.partial` copies under `node`'s staging directory.
fn partials(lnfs: &Localnfs, node: &str) -> Vec<String> {
    std::fs::read_dir(lnfs.root(node).join("staging"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Two nodes: node-1 with `small` capacity, node-2 with 10Gi; classes `now`
/// (Immediate) and `wait` (WaitForFirstConsumer); claim `src` of `size` on node-1.
/// Returns the source volume's directory.
async fn source_on_a_small_node(
    first: u8,
    small: &str,
    size: &str,
) -> (localnfs_testbed::TestCluster, Localnfs, PathBuf) {
    let cluster = localnfs_testbed::TestCluster::start()
        .await
        .expect("control plane");
    let client = cluster.client();
    let mut lnfs = Localnfs::new(&cluster).await;
    lnfs.start_nodes_and_controller(
        &client,
        &[
            ("node-1", ip(first), small),
            ("node-2", ip(first + 1), "10Gi"),
        ],
    )
    .await;
    storage_class(&client, "now", json!({"volumeBindingMode": "Immediate"})).await;
    storage_class(
        &client,
        "wait",
        json!({"volumeBindingMode": "WaitForFirstConsumer"}),
    )
    .await;
    let mut src = claim("src", "wait", size, json!({}));
    src.metadata.annotations.get_or_insert_default().insert(
        localnfs::objects::keys::SELECTED_NODE.into(),
        "node-1".into(),
    );
    create_claim(&client, &src).await;
    let pv = bound_pv(&client, "src").await;
    let dir = lnfs.root("node-1").join("volumes").join(nfs_target(&pv).2);
    (cluster, lnfs, dir)
}

#[tokio::test]
async fn a_clone_whose_sources_node_is_full_lands_on_another_node_with_the_exact_files() {
    let (cluster, lnfs, src_dir) = source_on_a_small_node(201, "24Mi", "16Mi").await;
    let client = cluster.client();
    write_tree(&src_dir, 3 << 20);
    let want = tree(&src_dir);
    // node-1 has 8Mi left: the 16Mi clone cannot be made there.
    create_claim(&client, &claim("copy", "now", "16Mi", clone_of("src"))).await;
    let pv = bound_pv(&client, "copy").await;
    assert_eq!(
        nfs_target(&pv).0,
        ip(202),
        "the clone must be served from node-2\n{}",
        lnfs.logs()
    );
    let copy_dir = lnfs.root("node-2").join("volumes").join(nfs_target(&pv).2);
    assert_eq!(
        tree(&copy_dir),
        want,
        "the clone does not hold the source's exact files"
    );
    let placed = event_saying(
        &client,
        "default",
        "copy",
        "Provisioning",
        "streamed from node node-1",
    )
    .await;
    assert!(placed.contains("node node-1 has no room"), "{placed}");
    let cloned = event_saying(
        &client,
        "default",
        "copy",
        "VolumeCloned",
        "streamed from node node-1",
    )
    .await;
    assert!(
        cloned.contains(&format!("{} bytes", (3 << 20) + 4 + 9)),
        "{cloned}"
    );
    assert_eq!(tree(&src_dir), want, "the source changed");
    // The source's snapshot went once sent; the receiver's staging was committed.
    eventually("no copies left in staging", WAIT, || async {
        (partials(&lnfs, "node-1").is_empty() && partials(&lnfs, "node-2").is_empty()).then_some(())
    })
    .await;
    // A copy, not a link: writing the clone leaves the source as it was.
    std::fs::write(copy_dir.join("precious"), b"changed").expect("write clone");
    assert_eq!(tree(&src_dir), want, "writing the clone changed the source");

    // A scheduler without the helper's extender put the pod on node-2 (what it
    // writes on the claim): the clone is made there too, streamed.
    let mut elsewhere = claim("elsewhere", "wait", "16Mi", clone_of("src"));
    elsewhere
        .metadata
        .annotations
        .get_or_insert_default()
        .insert(
            localnfs::objects::keys::SELECTED_NODE.into(),
            "node-2".into(),
        );
    create_claim(&client, &elsewhere).await;
    let pv = bound_pv(&client, "elsewhere").await;
    assert_eq!(nfs_target(&pv).0, ip(202), "{}", lnfs.logs());
    let dir = lnfs.root("node-2").join("volumes").join(nfs_target(&pv).2);
    assert_eq!(tree(&dir), want, "the scheduler-placed clone");
    event_saying(
        &client,
        "default",
        "elsewhere",
        "Provisioning",
        "streamed from node node-1 by its agent: the scheduler chose node node-2",
    )
    .await;
}

/// A test client of the peer channel: TLS to node-1's agent (its address and peer
/// port from its Lease, as an agent finds them).
struct Caller {
    tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    ekm: [u8; BINDING_LEN],
}

async fn peer_addr(client: &Client, node: &str, node_ip: IpAddr) -> SocketAddr {
    let leases: Api<Lease> = Api::namespaced(client.clone(), HEARTBEATS);
    let port = eventually("the agent's peer port", WAIT, || async {
        let lease = leases.get_opt(&lease_name(node)).await.ok()??;
        AgentInfo::from_lease(&lease, 0)?.1.peer_port
    })
    .await;
    SocketAddr::new(node_ip, port)
}

impl Caller {
    async fn connect(addr: SocketAddr) -> Caller {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let name = ServerName::try_from("anything").expect("name").to_owned();
        let tls = TlsConnector::from(client_tls().expect("tls"))
            .connect(name, tcp)
            .await
            .expect("TLS handshake");
        let ekm = tls
            .get_ref()
            .1
            .export_keying_material([0u8; BINDING_LEN], EXPORTER_LABEL, None)
            .expect("ekm");
        Caller { tls, ekm }
    }

    async fn send(&mut self, f: Frame) {
        write_frame(&mut self.tls, &f).await.expect("send");
    }

    /// What the agent answers, then that it sends nothing more.
    async fn refused(&mut self, words: &str) {
        match read_frame(&mut self.tls, Duration::from_secs(30)).await {
            Ok(Frame::Refused(why)) => assert!(why.contains(words), "refused for: {why}"),
            other => panic!("expected a refusal saying {words:?}, got {other:?}"),
        }
        let after = read_frame(&mut self.tls, Duration::from_secs(30)).await;
        assert!(
            after.is_err(),
            "the agent sent more after refusing: {after:?}"
        );
    }

    /// Says it is `node`'s agent, signing with `key`, and reads the source's hello.
    async fn hello(&mut self, key: &Signer, node: &str) {
        let h = wire::hello(key, RECEIVER, node, &self.ekm);
        self.send(Frame::Hello(h)).await;
        match read_frame(&mut self.tls, Duration::from_secs(30)).await {
            Ok(Frame::Hello(h)) => assert_eq!(h.node, "node-1"),
            other => panic!("expected the source's hello, got {other:?}"),
        }
    }
}

fn key_file(lnfs: &Localnfs, node: &str) -> Signer {
    Signer::from_pkcs8(&std::fs::read(lnfs.root(node).join("agent.key")).expect("agent key"))
        .expect("key")
}

/// Puts a clone request (`node`, source `source`) signed by `signer` on a new claim
/// `name` in `ns`, of a class localnfs does not serve and labelled with no node (so
/// no agent acts on it); returns the Ask a receiver would send for it.
async fn claim_with_request(
    client: &Client,
    ns: &str,
    name: &str,
    node: &str,
    source: CloneSource,
    signer: &Signer,
) -> Ask {
    let mut pvc = claim(name, "someone-elses", "16Mi", json!({}));
    pvc.metadata.namespace = Some(ns.into());
    let uid = create_claim(client, &pvc).await.uid().expect("uid");
    let request = VolumeRequest::clone_of(
        VolumeSpec::new(
            VolumeName::new(&format!("pvc-{uid}")).expect("name"),
            16 << 20,
        ),
        uid,
        node.into(),
        source,
    );
    let [(k1, text), (k2, sig)] = signed::request_annotations(signer, &request).expect("sign");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    claims
        .patch(
            name,
            &Default::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"annotations": {k1: text, k2: sig}}})),
        )
        .await
        .expect("annotate");
    Ask {
        namespace: ns.into(),
        claim: name.into(),
        request: text,
        request_sig: sig,
    }
}

#[tokio::test]
async fn the_peer_channel_refuses_anyone_but_the_agent_a_signed_request_names() {
    let (cluster, lnfs, src_dir) = source_on_a_small_node(211, "24Mi", "16Mi").await;
    let client = cluster.client();
    write_tree(&src_dir, 1 << 20);
    let addr = peer_addr(&client, "node-1", ip(211)).await;
    let src = Api::<PersistentVolumeClaim>::namespaced(client.clone(), "default")
        .get("src")
        .await
        .expect("src");
    let source = CloneSource {
        volume: VolumeName::new(&nfs_target(&bound_pv(&client, "src").await).2).expect("name"),
        claim_uid: src.uid().expect("uid"),
        namespace: "default".into(),
        claim: "src".into(),
    };
    let secret = Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .get(CONTROLLER_KEY_SECRET)
        .await
        .expect("controller key");
    let controller =
        Signer::from_pkcs8(&secret.data.expect("data")[CONTROLLER_KEY_FIELD].0).expect("key");
    let node2 = key_file(&lnfs, "node-2");
    let stranger = Signer::from_pkcs8(&Signer::generate().expect("key")).expect("key");

    // No hello: a TLS client that is no agent.
    let mut c = Caller::connect(addr).await;
    c.send(Frame::Done).await;
    c.refused("expected a hello").await;
    // A key that is not in node-2's Lease.
    let mut c = Caller::connect(addr).await;
    c.send(Frame::Hello(wire::hello(
        &stranger, RECEIVER, "node-2", &c.ekm,
    )))
    .await;
    c.refused("not node node-2's agent").await;
    // node-2's genuine hello, replayed in another session.
    let first = Caller::connect(addr).await;
    let replayed = wire::hello(&node2, RECEIVER, "node-2", &first.ekm);
    let mut c = Caller::connect(addr).await;
    c.send(Frame::Hello(replayed)).await;
    c.refused("not node node-2's agent").await;
    drop(first);

    // node-2's agent itself, with requests it must not be served.
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": "tenant"}})).expect("ns");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace");
    let other_ns = CloneSource {
        namespace: "tenant".into(),
        ..source.clone()
    };
    let cases = [
        (
            claim_with_request(
                &client,
                "default",
                "forged",
                "node-2",
                source.clone(),
                &stranger,
            )
            .await,
            "not signed by the controller",
        ),
        (
            claim_with_request(
                &client,
                "default",
                "for-node-1",
                "node-1",
                source.clone(),
                &controller,
            )
            .await,
            "places the claim on node node-1, not on node node-2",
        ),
        (
            claim_with_request(
                &client,
                "tenant",
                "other-ns",
                "node-2",
                source.clone(),
                &controller,
            )
            .await,
            "in another namespace than this claim's (tenant)",
        ),
        (
            claim_with_request(
                &client,
                "tenant",
                "lying-ns",
                "node-2",
                other_ns,
                &controller,
            )
            .await,
            "belongs to claim default/src",
        ),
    ];
    for (ask, words) in cases {
        let mut c = Caller::connect(addr).await;
        c.hello(&node2, "node-2").await;
        c.send(Frame::Ask(ask)).await;
        c.refused(words).await;
    }

    // The control: the same client with a request the controller signed for node-2
    // is served (so the refusals above are the checks', not the client's).
    let ask = claim_with_request(&client, "default", "honest", "node-2", source, &controller).await;
    let mut c = Caller::connect(addr).await;
    c.hello(&node2, "node-2").await;
    c.send(Frame::Ask(ask)).await;
    match read_frame(&mut c.tls, Duration::from_secs(60)).await {
        Ok(Frame::Accepted(a)) => assert_eq!(a.files, 3, "{a:?}"),
        other => panic!(
            "the signed request was not served: {other:?}\n{}",
            lnfs.logs()
        ),
    }
    drop(c);
    // The source's snapshot goes when the receiver hangs up.
    eventually("the source's snapshot removed", WAIT, || async {
        partials(&lnfs, "node-1").is_empty().then_some(())
    })
    .await;
    let logs = lnfs.logs();
    assert!(
        logs.matches("refused a peer-channel connection").count() >= 7,
        "every refusal is logged\n{logs}"
    );
}

#[tokio::test]
async fn a_killed_agent_on_either_side_leaves_nothing_half_made_and_the_clone_completes_after_restart()
 {
    let (cluster, mut lnfs, src_dir) = source_on_a_small_node(221, "1536Mi", "1Gi").await;
    let client = cluster.client();
    write_tree(&src_dir, 1 << 20);
    // Enough data that the stream is still running when an agent is killed.
    let chunk: Vec<u8> = (0..32u32 << 20).map(|i| (i % 253) as u8).collect();
    for i in 0..12 {
        std::fs::write(src_dir.join(format!("db/chunk-{i}")), &chunk).expect("write chunk");
    }
    let want = tree(&src_dir);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    for (copy, kill, node_ip) in [("copy-a", "node-1", ip(221)), ("copy-b", "node-2", ip(222))] {
        let uid = create_claim(&client, &claim(copy, "now", "1Gi", clone_of("src")))
            .await
            .uid()
            .expect("uid");
        let volume = format!("pvc-{uid}");
        let receiving = lnfs
            .root("node-2")
            .join("staging")
            .join(format!("{volume}.partial"));
        let meta = lnfs
            .root("node-2")
            .join("meta")
            .join(format!("{volume}.json"));
        eventually(&format!("{copy}: the stream under way"), WAIT, || async {
            tokio::time::sleep(Duration::from_millis(2)).await;
            receiving.join("data/db").exists().then_some(())
        })
        .await;
        lnfs.stop_agent(kill).await;
        assert!(
            !meta.exists(),
            "{copy}: the clone finished before {kill}'s agent was killed: give the source more data"
        );
        let c = claims.get(copy).await.expect("claim");
        assert!(
            !c.annotations().contains_key(localnfs::objects::keys::READY),
            "{copy}: answered ready for a copy that never finished"
        );
        if kill == "node-1" {
            // The receiver gives up the broken stream and keeps nothing of it.
            eventually(
                &format!("{copy}: the receiver's copy removed"),
                WAIT,
                || async { (!receiving.exists()).then_some(()) },
            )
            .await;
            assert!(!meta.exists() && !volume_dirs(&lnfs, "node-2").contains(&volume));
        }
        let capacity = if kill == "node-1" { "1536Mi" } else { "10Gi" };
        lnfs.start_agent_with(kill, node_ip, &["--capacity", capacity]);
        let pv = bound_pv(&client, copy).await;
        assert_eq!(nfs_target(&pv).0, ip(222), "{copy}: not on node-2");
        let copy_dir = lnfs.root("node-2").join("volumes").join(&volume);
        assert_eq!(
            tree(&copy_dir),
            want,
            "{copy}: the clone made after the restart"
        );
        eventually(
            &format!("{copy}: no copies left in staging"),
            WAIT,
            || async {
                (partials(&lnfs, "node-1").is_empty() && partials(&lnfs, "node-2").is_empty())
                    .then_some(())
            },
        )
        .await;
    }
    assert_eq!(tree(&src_dir), want, "the source changed");
}
