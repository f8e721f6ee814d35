//! Hostile or broken peers: random bytes, bad record marks, garbage XDR, unknown
//! programs, versions, procedures and auth flavours, clients outside the allow-list.
//! The server answers with an RPC error or closes the connection, never panics, and
//! keeps serving everyone else.

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use support::nfs::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const MIB: u64 = 1 << 20;

fn put(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_be_bytes());
}

/// An RPC call record (one fragment) with AUTH_SYS root credentials.
fn call(xid: u32, prog: u32, vers: u32, procedure: u32, flavor: u32, args: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for v in [xid, 0, 2, prog, vers, procedure, flavor] {
        put(&mut body, v);
    }
    let mut cred = Vec::new();
    for v in [0u32, 0, 0, 0, 0] {
        put(&mut cred, v); // stamp, machinename "", uid, gid, no gids
    }
    put(&mut body, cred.len() as u32);
    body.extend_from_slice(&cred);
    put(&mut body, 0);
    put(&mut body, 0);
    body.extend_from_slice(args);
    let mut rec = ((body.len() as u32) | 0x8000_0000).to_be_bytes().to_vec();
    rec.extend_from_slice(&body);
    rec
}

async fn connect(port: u16, from: IpAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind");
    socket
        .connect(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
        .await
        .expect("connect")
}

/// Sends `bytes` and returns the reply record's body, or None if the server closed
/// the connection (or said nothing within 2 s).
async fn exchange(s: &mut TcpStream, bytes: &[u8]) -> Option<Vec<u8>> {
    s.write_all(bytes).await.ok()?;
    let mut mark = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut mark))
        .await
        .ok()?
        .ok()?;
    let len = (u32::from_be_bytes(mark) & 0x7fff_ffff) as usize;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.ok()?;
    Some(body)
}

fn word(b: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

/// reply_stat / accept_stat (or reject_stat) of a reply with an AUTH_NONE verifier.
fn stats(reply: &[u8]) -> (u32, u32) {
    // xid, REPLY, reply_stat, then for accepted: verf flavor, verf len, accept_stat;
    // for denied: reject_stat.
    if word(reply, 2) == 0 {
        (0, word(reply, 5))
    } else {
        (1, word(reply, 3))
    }
}

async fn null_works(port: u16) -> bool {
    let mut s = connect(port, IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
    matches!(exchange(&mut s, &call(1, 100_003, 3, 0, 1, &[])).await, Some(r) if stats(&r) == (0, 0))
}

#[tokio::test]
async fn protocol_errors_get_rpc_error_replies() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", MIB);
    let node = Node::start(dir.path()).await;
    let mut s = connect(node.port, IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
    let cases: [(&str, Vec<u8>, (u32, u32)); 6] = [
        ("unknown program", call(2, 200_000, 1, 0, 1, &[]), (0, 1)),
        ("NFS version 2", call(3, 100_003, 2, 0, 1, &[]), (0, 2)),
        ("unknown procedure", call(4, 100_003, 3, 99, 1, &[]), (0, 3)),
        (
            "garbage arguments",
            call(5, 100_003, 3, 1, 1, &[0, 0, 0]),
            (0, 4),
        ),
        (
            "handle longer than 64 bytes",
            call(6, 100_003, 3, 1, 1, &[0, 0, 0, 200]),
            (0, 4),
        ),
        ("AUTH_DES", call(7, 100_003, 3, 1, 3, &[]), (1, 1)),
    ];
    for (what, rec, want) in cases {
        let reply = exchange(&mut s, &rec)
            .await
            .unwrap_or_else(|| panic!("{what}: no reply"));
        assert_eq!(stats(&reply), want, "{what}");
    }
    assert!(null_works(node.port).await);
}

#[tokio::test]
async fn broken_record_marks_close_the_connection_without_harm() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", MIB);
    let node = Node::start(dir.path()).await;
    // A record claiming 2 GiB: refused before anything is allocated.
    let mut s = connect(node.port, IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
    assert!(
        exchange(&mut s, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3])
            .await
            .is_none()
    );
    // Many fragments adding up past the limit.
    let mut s = connect(node.port, IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
    let frag = [&0x0010_0000u32.to_be_bytes()[..], &vec![0u8; 0x10_0000]].concat();
    let _ = s.write_all(&frag).await;
    assert!(exchange(&mut s, &frag).await.is_none());
    // A record cut short, then the peer goes away.
    let mut s = connect(node.port, IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
    s.write_all(&[0x80, 0, 0, 100, 1, 2]).await.expect("write");
    drop(s);
    assert!(null_works(node.port).await, "server stopped answering");
}

/// A small deterministic generator so failures reproduce.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[tokio::test]
async fn random_bytes_never_take_the_server_down() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", MIB);
    let node = Node::start(dir.path()).await;
    let mut rng = XorShift(0x5eed_1234_abcd_9876);
    let valid = call(9, 100_003, 3, 1, 1, &[0, 0, 0, 4, 1, 2, 3, 4]);
    for round in 0..300 {
        let mut s = connect(node.port, IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
        let bytes: Vec<u8> = if round % 2 == 0 {
            // Pure noise.
            (0..(rng.next() % 512)).map(|_| rng.next() as u8).collect()
        } else {
            // A valid call with a few bytes flipped: reaches the decoders.
            let mut b = valid.clone();
            for _ in 0..(1 + rng.next() % 4) {
                let i = 4 + (rng.next() as usize % (b.len() - 4));
                b[i] ^= rng.next() as u8 | 1;
            }
            b
        };
        let _ = tokio::time::timeout(Duration::from_millis(200), exchange(&mut s, &bytes)).await;
    }
    assert!(null_works(node.port).await, "server stopped answering");
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid())).expect("alive");
    let rss_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    assert!(rss_kib < 256 * 1024, "RSS grew to {rss_kib} KiB");
}

#[tokio::test]
async fn clients_outside_the_allow_list_are_disconnected_unread() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", MIB);
    let node = Node::start_with(dir.path(), 0, &["--allow", "127.0.0.2/32"]).await;
    let mut refused = connect(node.port, IpAddr::V4(Ipv4Addr::LOCALHOST)).await;
    assert!(
        exchange(&mut refused, &call(1, 100_003, 3, 0, 1, &[]))
            .await
            .is_none()
    );
    assert!(mount(node.port, "vol", LOCAL, 0, 0).await.is_err());
    let mut allowed = connect(node.port, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))).await;
    let reply = exchange(&mut allowed, &call(1, 100_003, 3, 0, 1, &[])).await;
    assert_eq!(reply.map(|r| stats(&r)), Some((0, 0)));
    assert!(
        mount(
            node.port,
            "vol",
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
            0,
            0
        )
        .await
        .is_ok()
    );
}

#[tokio::test]
async fn sigterm_finishes_in_flight_calls_and_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", 64 * MIB);
    let mut node = Node::start(dir.path()).await;
    let mut c = Client::mount(node.port, "vol").await;
    let root = c.root.clone();
    let f = c.create(&root, b"f", 0o644).await.expect("create");
    // A large synced write in flight while the signal arrives.
    let port = node.port;
    let writer = tokio::spawn(async move {
        let mut c = Client::connect(port, LOCAL, 0, 0, root).await;
        c.write(
            &f,
            0,
            &vec![1u8; 1 << 20],
            nfs3_types::nfs3::stable_how::FILE_SYNC,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    let status = node.sigterm().await;
    assert!(status.success(), "exit status {status}");
    if let Ok(Ok(ok)) = writer.await {
        // If the write was acknowledged, it is on disk.
        assert_eq!(ok.count, 1 << 20);
        assert_eq!(
            std::fs::metadata(dir.path().join("volumes/vol/f"))
                .expect("stat")
                .len(),
            1 << 20
        );
    }
}
