//! Who may use what, against the real `localnfs node`: access is
//! decided per call by the allow-list and per-volume grants, never by the mount table,
//! so one pod's unmount cannot cut off another pod on the same node; the mount table
//! survives restarts and failed saves; EXPORT and DUMP show a client only its own.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use nfs3_client::MountClient;
use nfs3_types::mount::dirpath;
use nfs3_types::nfs3::*;
use nfs3_types::rpc::opaque_auth;
use nfs3_types::xdr_codec::Opaque;
use support::eventually;
use support::nfs::*;

const MIB: u64 = 1 << 20;

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

async fn mount_client(port: u16, from: IpAddr) -> MountClient<Conn> {
    MountClient::new_with_auth(tcp(port, from).await, auth(0, 0), opaque_auth::default())
}

/// The paths `from` sees in DUMP, as `host:/path`.
async fn dump(port: u16, from: IpAddr) -> Vec<String> {
    let mut m = mount_client(port, from).await;
    m.dump()
        .await
        .expect("DUMP")
        .0
        .iter()
        .map(|e| {
            format!(
                "{}:{}",
                String::from_utf8_lossy(&e.ml_hostname.0),
                String::from_utf8_lossy(&e.ml_directory.0)
            )
        })
        .collect()
}

/// The paths `from` sees in EXPORT.
async fn exports(port: u16, from: IpAddr) -> Vec<String> {
    exports_at(std::net::SocketAddr::new(LOCAL, port), from).await
}

#[tokio::test]
async fn one_pods_unmount_does_not_cut_off_another_pod_on_the_same_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "shared", MIB);
    let node = Node::start(dir.path()).await;
    // Two pods on one node: two mounts of an RWX volume from the node's one address.
    let mut first = Client::mount_as(node.port, "shared", ip(2), 0, 0).await;
    let mut second = Client::mount_as(node.port, "shared", ip(2), 0, 0).await;
    let root = second.root.clone();
    let f = second.create(&root, b"f", 0o644).await.expect("create");

    // The first pod goes away: kubelet unmounts, mount.nfs sends UMNT.
    let mut m = mount_client(node.port, ip(2)).await;
    m.umnt(dirpath(Opaque::borrowed(b"/shared")))
        .await
        .expect("UMNT");
    m.umntall().await.expect("UMNTALL");
    first
        .getattr(&first.root.clone())
        .await
        .expect("first still works until it closes");

    // The second keeps working.
    second
        .getattr(&root)
        .await
        .expect("GETATTR after the other's UMNT");
    second
        .write(&f, 0, b"still here", stable_how::FILE_SYNC)
        .await
        .expect("WRITE after the other's UMNT");
    assert_eq!(second.read(&f, 0, 100).await.expect("READ"), b"still here");
}

#[tokio::test]
async fn mount_table_survives_restarts_and_a_failed_save_is_retried() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", MIB);
    let rmtab = dir.path().join("rmtab");
    // Saving cannot work while a directory sits where the file goes.
    std::fs::create_dir(&rmtab).expect("block rmtab");
    let mut node = Node::start(dir.path()).await;
    mount(node.port, "vol", ip(2), 0, 0).await.expect("mount");
    assert_eq!(dump(node.port, ip(2)).await, ["127.0.0.2:/vol"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(rmtab.is_dir(), "nothing could have been saved yet");

    // Once the obstacle is gone the table lands on disk without another MNT.
    std::fs::remove_dir(&rmtab).expect("unblock rmtab");
    eventually(
        "the mount table to be saved",
        Duration::from_secs(10),
        || {
            let saved = std::fs::read_to_string(&rmtab).ok();
            async move { saved.filter(|s| s.contains("vol")).map(|_| ()) }
        },
    )
    .await;

    node.kill9_and_restart().await;
    assert_eq!(dump(node.port, ip(2)).await, ["127.0.0.2:/vol"]);
}

#[tokio::test]
async fn export_and_dump_show_a_client_only_what_is_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    for v in ["a", "b", "open"] {
        create_volume(dir.path(), v, MIB);
    }
    std::fs::write(
        dir.path().join("access.json"),
        br#"{"a": ["127.0.0.2"], "b": ["127.0.0.3"]}"#,
    )
    .expect("grants");
    let node = Node::start(dir.path()).await;
    mount(node.port, "a", ip(2), 0, 0).await.expect("mount a");
    mount(node.port, "b", ip(3), 0, 0).await.expect("mount b");

    assert_eq!(exports(node.port, ip(2)).await, ["/a", "/open"]);
    assert_eq!(exports(node.port, ip(3)).await, ["/b", "/open"]);
    assert_eq!(exports(node.port, ip(4)).await, ["/open"]);
    assert_eq!(dump(node.port, ip(2)).await, ["127.0.0.2:/a"]);
    assert_eq!(dump(node.port, ip(3)).await, ["127.0.0.3:/b"]);
    assert!(dump(node.port, ip(4)).await.is_empty());
}

#[tokio::test]
async fn grants_apply_to_existing_connections_as_soon_as_they_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", MIB);
    let grants = dir.path().join("access.json");
    std::fs::write(&grants, br#"{"vol": ["127.0.0.2"]}"#).expect("grants");
    let node = Node::start(dir.path()).await;
    let mut c = Client::mount_as(node.port, "vol", ip(2), 0, 0).await;
    let root = c.root.clone();
    c.getattr(&root).await.expect("granted");

    // The pod moved to another node: the grant moves with it.
    std::fs::write(&grants, br#"{"vol": ["127.0.0.3"]}"#).expect("grants");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.getattr(&root).await.err() != Some(nfsstat3::NFS3ERR_ACCES) {
        assert!(
            std::time::Instant::now() < deadline,
            "the old node kept access"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Client::mount_as(node.port, "vol", ip(3), 0, 0).await;
}

#[tokio::test]
async fn an_access_file_that_does_not_parse_stops_the_agent_instead_of_opening_every_volume() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", MIB);
    // One trailing comma: the operator meant to serve `vol` to 127.0.0.2 only.
    std::fs::write(
        dir.path().join("access.json"),
        br#"{"vol": ["127.0.0.2"],}"#,
    )
    .expect("grants");
    let mut agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_localnfs"))
        .args(["node", "--standalone", "--admin-addr", "127.0.0.1:0"])
        .args(["--listen", "127.0.0.1:0"])
        .arg("--root")
        .arg(dir.path())
        .env("LOCALNFS_INSECURE_PORTS", "true")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start localnfs node");
    let stdout = agent.stdout.take().expect("stdout");
    let mut stderr = agent.stderr.take().expect("stderr");
    let first = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout)).next_line(),
    )
    .await
    .expect("the agent serves or exits within 20 s")
    .expect("read stdout");
    if let Some(port) = first
        .as_deref()
        .and_then(|l| l.strip_prefix("nfs listening on 127.0.0.1:"))
        .and_then(|p| p.parse::<u16>().ok())
    {
        let opened = mount(port, "vol", ip(3), 0, 0).await.is_ok();
        panic!(
            "the agent serves with unreadable access rules (vol mountable by 127.0.0.3: {opened})"
        );
    }
    let status = tokio::time::timeout(Duration::from_secs(10), agent.wait())
        .await
        .expect("exits");
    let status = status.expect("wait");
    let mut log = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut log)
        .await
        .expect("stderr");
    assert!(!status.success(), "exit status {status}");
    assert!(
        log.contains("access.json") && log.contains("trailing comma"),
        "the error names the file and the cause: {log}"
    );
}
