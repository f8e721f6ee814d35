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
    let rss_kib = proc_status(node.pid(), "VmRSS");
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

// --- Nothing blocks forever, memory stays bounded ---------------------------------------
// Limits are given as `LOCALNFS_*` environment, so the same tests run against a build
// without them (to see them fail there).

/// Whether the server closed `s` within `within` (EOF or reset, nothing else read).
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", MIB);
    let node = Node::start_env(dir.path(), &[("LOCALNFS_IDLE_TIMEOUT", "1s")]).await;
    let mut s = connect(node.port, LOCAL).await;
    assert!(
        exchange(&mut s, &call(1, 100_003, 3, 0, 1, &[]))
            .await
            .is_some()
    );
    assert!(
        closed_within(&mut s, Duration::from_secs(5)).await,
        "idle connection kept open"
    );
}

#[tokio::test]
async fn a_record_that_never_completes_is_dropped_in_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", MIB);
    let node = Node::start_env(
        dir.path(),
        &[
            ("LOCALNFS_RECORD_TIMEOUT", "1s"),
            ("LOCALNFS_IDLE_TIMEOUT", "1h"),
        ],
    )
    .await;
    let mut s = connect(node.port, LOCAL).await;
    // A record mark promising 100 bytes, and 10 of them.
    s.write_all(&[0x80, 0, 0, 100, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0])
        .await
        .expect("write");
    assert!(
        closed_within(&mut s, Duration::from_secs(5)).await,
        "a stalled record held its connection"
    );
    assert!(null_works(node.port).await);
}

/// A READ call for `count` bytes at offset 0 of `fh`.
fn read_call(xid: u32, fh: &[u8], count: u32) -> Vec<u8> {
    let mut args = Vec::new();
    put(&mut args, fh.len() as u32);
    args.extend_from_slice(fh);
    args.resize(args.len().next_multiple_of(4), 0);
    args.extend_from_slice(&0u64.to_be_bytes());
    put(&mut args, count);
    call(xid, 100_003, 3, 6, 1, &args)
}

/// A value from `/proc/<pid>/status` (`VmRSS` in KiB, `Threads`).
fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("alive");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

/// Mounts `vol`, writes 64 KiB and reads them back: what a pod does.
async fn honest_client_round_trip(port: u16) {
    round_trip_on(port, "vol").await
}

/// [`honest_client_round_trip`] on volume `volume`.
async fn round_trip_on(port: u16, volume: &str) {
    let mut c = Client::mount(port, volume).await;
    let root = c.root.clone();
    let name = format!("honest-{}", std::process::id());
    let f = match c.lookup(&root, name.as_bytes()).await {
        Ok(f) => f,
        Err(_) => c
            .create(&root, name.as_bytes(), 0o644)
            .await
            .expect("create"),
    };
    let data = vec![7u8; 64 * 1024];
    c.write(&f, 0, &data, nfs3_types::nfs3::stable_how::FILE_SYNC)
        .await
        .expect("write");
    assert_eq!(c.read(&f, 0, data.len() as u32).await.expect("read"), data);
}

/// The 1 MiB written (FILE_SYNC) to `vol/big` by [`node_with_big_file`].
static BIG: [u8; 1 << 20] = [5u8; 1 << 20];

/// A node started with `env`, serving `vol` (64 MiB) with [`BIG`] in `big`; returns
/// it, its root and `big`'s handle.
async fn node_with_big_file(env: &[(&str, &str)]) -> (Node, tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", 64 * MIB);
    let node = Node::start_env(dir.path(), env).await;
    let mut c = Client::mount(node.port, "vol").await;
    let root = c.root.clone();
    let big = c.create(&root, b"big", 0o644).await.expect("create");
    c.write(&big, 0, &BIG, nfs3_types::nfs3::stable_how::FILE_SYNC)
        .await
        .expect("write");
    (node, dir, big.data.to_vec())
}

/// A client at `from` that asks for 64 MiB in 1 MiB READs of `fh` with a tiny receive
/// buffer: whatever it does not read stays in the server's socket.
async fn reads_64_mib(port: u16, from: IpAddr, fh: &[u8]) -> TcpStream {
    reads_mib(port, from, fh, 64).await
}

/// [`reads_64_mib`] with `calls` READs of 1 MiB.
async fn reads_mib(port: u16, from: IpAddr, fh: &[u8], calls: u32) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    socket.bind(SocketAddr::new(from, 0)).expect("bind");
    let mut s = socket
        .connect(SocketAddr::new(LOCAL, port))
        .await
        .expect("connect");
    let calls: Vec<u8> = (0..calls).flat_map(|x| read_call(x, fh, 1 << 20)).collect();
    s.write_all(&calls).await.expect("send calls");
    s
}

#[tokio::test]
async fn clients_that_stop_reading_pin_neither_threads_nor_the_server() {
    let (node, _dir, fh) = node_with_big_file(&[("LOCALNFS_MAX_BYTES_IN_FLIGHT", "64Mi")]).await;
    // 16 clients each ask for 64 MiB in 1 MiB READs and never read their sockets:
    // far more calls than the blocking pool has threads.
    let mut hostile = Vec::new();
    for _ in 0..16 {
        hostile.push(reads_64_mib(node.port, LOCAL, &fh).await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let threads = proc_status(node.pid(), "Threads");

    let start = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(8), honest_client_round_trip(node.port))
        .await
        .expect("an honest client is served while others stop reading");
    eprintln!(
        "stalled readers: {} threads in the agent; honest round trip {:?}",
        threads,
        start.elapsed()
    );
    assert!(
        threads < 200,
        "{threads} threads: workers pinned by stalled clients"
    );
}

#[tokio::test]
async fn clients_that_stop_reading_leave_the_workers_to_other_volumes() {
    // More stalled clients than the blocking pool has workers (16), spread over two
    // volumes (one volume runs at most 12 calls at once: `pool::WORKERS` and
    // `pool::PER_VOLUME`; 2 × 12 ≥ 16 is what makes it take every worker), each with
    // replies it never reads, and a budget far above what they hold: nobody is dropped
    // to make room, so only a thread never waiting long on a client leaves workers for
    // a third volume's calls (a thread waiting on each client would hold them all for
    // the send timeout, 30 s).
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["vol", "vol2", "quiet"] {
        create_volume(dir.path(), name, 64 * MIB);
    }
    let node = Node::start_env(dir.path(), &[("LOCALNFS_MAX_BYTES_IN_FLIGHT", "1Gi")]).await;
    let mut hostile = Vec::new();
    for name in ["vol", "vol2"] {
        let mut c = Client::mount(node.port, name).await;
        let root = c.root.clone();
        let big = c.create(&root, b"big", 0o644).await.expect("create");
        c.write(&big, 0, &BIG, nfs3_types::nfs3::stable_how::FILE_SYNC)
            .await
            .expect("write");
        for _ in 0..12 {
            hostile.push(reads_mib(node.port, LOCAL, &big.data, 4).await);
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), round_trip_on(node.port, "quiet"))
        .await
        .expect("a third volume is served while 24 clients of two others stop reading");
    eprintln!(
        "24 stalled readers: the quiet volume's round trip {:?}",
        start.elapsed()
    );
    // The replies threads began and tasks finished are whole and in order on the wire:
    // a stalled client that starts reading gets its four READs' data, each record intact.
    for s in hostile.iter_mut().take(2) {
        let mut xids = Vec::new();
        for _ in 0..4 {
            let body = tokio::time::timeout(Duration::from_secs(20), next_reply(s))
                .await
                .expect("a reply within 20 s")
                .expect("a reply, not a closed connection");
            xids.push(u32::from_be_bytes(body[..4].try_into().expect("xid")));
            assert_eq!(&body[24..28], &[0, 0, 0, 0], "READ succeeded");
            assert_eq!(
                body.len(),
                24 + 4 + 88 + 12 + BIG.len(),
                "one whole READ reply"
            );
            assert!(body[body.len() - BIG.len()..] == BIG[..], "the file's data");
        }
        xids.sort_unstable();
        assert_eq!(xids, [0, 1, 2, 3]);
    }
    drop(hostile);
}

#[tokio::test]
async fn thousands_of_stalled_records_leave_memory_bounded_and_others_served() {
    const CONNECTIONS: usize = 3000;
    const SENT: usize = 100 * 1024; // of a record promising 1 MiB
    let limit = libc::rlimit {
        rlim_cur: 20_000,
        rlim_max: 20_000,
    };
    // SAFETY: plain syscall on this process (the node inherits the limit).
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", 64 * MIB);
    let node = Node::start_env(
        dir.path(),
        &[
            ("LOCALNFS_MAX_CONNECTIONS", "4000"),
            ("LOCALNFS_MAX_BYTES_IN_FLIGHT", "64Mi"),
            ("LOCALNFS_RECORD_TIMEOUT", "5m"),
        ],
    )
    .await;
    honest_client_round_trip(node.port).await;
    let rss_before = proc_status(node.pid(), "VmRSS");

    let mut partial = vec![0u8; 4 + SENT];
    partial[..4].copy_from_slice(&(0x8000_0000u32 | (1 << 20)).to_be_bytes());
    let mut held = Vec::with_capacity(CONNECTIONS);
    for batch in 0..CONNECTIONS / 100 {
        let opened = futures::future::join_all((0..100).map(|i| {
            let partial = &partial;
            async move {
                let from = IpAddr::V4(Ipv4Addr::new(127, 0, 1 + (batch % 50) as u8, 1 + i as u8));
                let mut s = connect(node.port, from).await;
                // The kernel takes what the server does not read yet.
                let _ = tokio::time::timeout(Duration::from_secs(2), s.write_all(partial)).await;
                s
            }
        }))
        .await;
        held.extend(opened);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_held = proc_status(node.pid(), "VmRSS");

    let start = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), honest_client_round_trip(node.port))
        .await
        .expect("an honest client is served next to thousands of stalled records");
    let latency = start.elapsed();
    let rss_after = proc_status(node.pid(), "VmRSS");
    let mut still_open = 0;
    for s in &mut held {
        let mut b = [0u8; 1];
        // Nothing to read and no EOF: the server still holds it.
        if tokio::time::timeout(Duration::from_millis(1), s.read(&mut b))
            .await
            .is_err()
        {
            still_open += 1;
        }
    }
    eprintln!(
        "{CONNECTIONS} connections x {SENT} B of a 1 MiB record, budget 64 MiB: \
         agent RSS {} MiB before, {} MiB while held, {} MiB after an honest round trip \
         in {latency:?}; {still_open} stalled connections still open",
        rss_before / 1024,
        rss_held / 1024,
        rss_after / 1024,
    );
    let grown = rss_held.max(rss_after).saturating_sub(rss_before);
    assert!(
        grown < 160 * 1024,
        "RSS grew by {} MiB holding stalled records",
        grown / 1024
    );
}

#[tokio::test]
async fn calls_from_unreserved_ports_are_refused_by_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", MIB);
    let node = Node::start_secure(dir.path()).await;
    // An ordinary process's socket: an ephemeral port.
    let mut s = connect(node.port, LOCAL).await;
    let null = exchange(&mut s, &call(1, 100_003, 3, 0, 1, &[])).await;
    assert_eq!(null.map(|r| stats(&r)), Some((0, 0)), "NULL is answered");
    let getattr = exchange(
        &mut s,
        &call(2, 100_003, 3, 1, 1, &[0, 0, 0, 4, 1, 2, 3, 4]),
    )
    .await;
    assert_eq!(
        getattr.map(|r| stats(&r)),
        Some((1, 1)),
        "MSG_DENIED/AUTH_ERROR"
    );
    let mnt = exchange(
        &mut s,
        &call(3, 100_005, 3, 1, 1, &[0, 0, 0, 4, b'/', b'v', b'o', b'l']),
    )
    .await;
    assert_eq!(mnt.map(|r| stats(&r)), Some((1, 1)), "MNT refused");
    assert!(mount(node.port, "vol", LOCAL, 0, 0).await.is_err());

    // A root process's socket on a reserved port, as the kernel client uses.
    let mut reserved = None;
    for port in (600..1024).rev() {
        let socket = TcpSocket::new_v4().expect("socket");
        if socket.bind(SocketAddr::new(LOCAL, port)).is_ok() {
            reserved = Some(
                socket
                    .connect(SocketAddr::new(LOCAL, node.port))
                    .await
                    .expect("connect"),
            );
            break;
        }
    }
    let mut s = reserved.expect("a free reserved port (tests run as root)");
    let mnt = exchange(
        &mut s,
        &call(4, 100_005, 3, 1, 1, &[0, 0, 0, 4, b'/', b'v', b'o', b'l']),
    )
    .await;
    let mnt = mnt.expect("MNT reply");
    assert_eq!(stats(&mnt), (0, 0));
    assert_eq!(word(&mnt, 6), 0, "MNT3_OK from a reserved port");
}

#[tokio::test]
async fn idle_connections_filling_every_slot_make_room_for_a_new_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", MIB);
    let node = Node::start_env(dir.path(), &[("LOCALNFS_MAX_CONNECTIONS", "50")]).await;
    let mut squatters = Vec::new();
    for i in 0..50 {
        let mut s = connect(node.port, LOCAL).await;
        assert!(
            exchange(&mut s, &call(i, 100_003, 3, 0, 1, &[]))
                .await
                .is_some()
        );
        squatters.push(s);
    }
    tokio::time::timeout(Duration::from_secs(5), honest_client_round_trip(node.port))
        .await
        .expect("a new client is served although idle connections hold every slot");
    assert!(
        closed_within(&mut squatters[0], Duration::from_secs(1)).await,
        "the connection idle longest made room"
    );
}

// --- Descriptors, kernel buffers, shutdown ------------------------------------------

/// Starts `localnfs node` with its open-file limit at `open_files` (soft and hard, as
/// a service manager or container runtime would set it); returns it and its NFS port.
async fn start_with_open_files(
    root: &std::path::Path,
    open_files: u64,
) -> (tokio::process::Child, u16) {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_localnfs"));
    cmd.args(["node", "--standalone", "--admin-addr", "127.0.0.1:0"])
        .args(["--listen", "127.0.0.1:0"])
        .arg("--root")
        .arg(root)
        .env("LOCALNFS_INSECURE_PORTS", "true")
        .env("LOCALNFS_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: open_files,
                rlim_max: open_files,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start localnfs node");
    let stdout = child.stdout.take().expect("stdout");
    let line = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout)).next_line(),
    )
    .await
    .expect("node starts within 20 s")
    .expect("read stdout")
    .expect("node printed its address");
    let port = line
        .strip_prefix("nfs listening on 127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .expect("address line");
    (child, port)
}

#[tokio::test]
async fn idle_connections_under_a_low_open_file_limit_leave_honest_calls_their_descriptors() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", 64 * MIB);
    let (_node, port) = start_with_open_files(dir.path(), 256).await;
    // More idle connections than the agent has descriptors.
    let mut idle = Vec::new();
    for i in 0..300u32 {
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 2, 1 + (i % 200) as u8));
        idle.push(connect(port, from).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::time::timeout(Duration::from_secs(20), async {
        honest_client_round_trip(port).await;
        let mut c = Client::mount(port, "vol").await;
        let root = c.root.clone();
        for i in 0..40 {
            let name = format!("f{i}");
            c.create(&root, name.as_bytes(), 0o644)
                .await
                .expect("CREATE");
            c.lookup(&root, name.as_bytes()).await.expect("LOOKUP");
        }
    })
    .await
    .expect("an honest client is served next to idle connections past the descriptor limit");
    drop(idle);
}

/// The next reply record on `s` (all its fragments), or None once the server closed.
async fn next_reply(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut mark = [0u8; 4];
        s.read_exact(&mut mark).await.ok()?;
        let mark = u32::from_be_bytes(mark);
        let start = body.len();
        body.resize(start + (mark & 0x7fff_ffff) as usize, 0);
        s.read_exact(&mut body[start..]).await.ok()?;
        if mark & 0x8000_0000 != 0 {
            return Some(body);
        }
    }
}

#[tokio::test]
async fn large_reads_under_a_low_open_file_limit_never_fail_for_want_of_a_descriptor() {
    const CLIENTS: u32 = 24;
    const READS: u32 = 8;
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", 64 * MIB);
    let (_node, port) = start_with_open_files(dir.path(), 256).await;
    let mut c = Client::mount(port, "vol").await;
    let root = c.root.clone();
    let big = c.create(&root, b"big", 0o644).await.expect("create");
    c.write(
        &big,
        0,
        &vec![3u8; 1 << 20],
        nfs3_types::nfs3::stable_how::FILE_SYNC,
    )
    .await
    .expect("write");
    let fh = big.data.to_vec();
    // Many 1 MiB READs at once: more calls running than the agent has descriptors to
    // give each its own splice pipe.
    let statuses = futures::future::join_all((0..CLIENTS).map(|i| {
        let fh = fh.clone();
        async move {
            let from = IpAddr::V4(Ipv4Addr::new(127, 0, 4, 1 + i as u8));
            let mut s = connect(port, from).await;
            let calls: Vec<u8> = (0..READS)
                .flat_map(|x| read_call(x, &fh, 1 << 20))
                .collect();
            s.write_all(&calls).await.expect("send calls");
            let mut got = Vec::new();
            for _ in 0..READS {
                match tokio::time::timeout(Duration::from_secs(20), next_reply(&mut s)).await {
                    // accepted and SUCCESS, then the NFS status
                    Ok(Some(r)) if stats(&r) == (0, 0) => got.push(word(&r, 6)),
                    other => panic!("no READ reply: {:?}", other.map(|r| r.map(|r| stats(&r)))),
                }
            }
            got
        }
    }))
    .await;
    let failed: Vec<u32> = statuses.into_iter().flatten().filter(|s| *s != 0).collect();
    assert!(failed.is_empty(), "READs answered with nfsstat3 {failed:?}");
}

/// Bytes the kernel holds unsent or unacknowledged in the sockets whose local port is
/// `port` (the server's side), from `/proc/net/tcp`'s `tx_queue`.
fn send_queues(port: u16) -> u64 {
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    let port = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = f.get(1)?;
            let tx = f.get(4)?.split(':').next()?;
            local
                .ends_with(&port)
                .then(|| u64::from_str_radix(tx, 16).ok())
                .flatten()
        })
        .sum()
}

#[tokio::test]
async fn replies_clients_never_read_stay_inside_the_memory_budget() {
    const CONNECTIONS: usize = 64;
    const BUDGET: u64 = 16 * MIB;
    let (node, _dir, fh) = node_with_big_file(&[("LOCALNFS_MAX_BYTES_IN_FLIGHT", "16Mi")]).await;
    let rss_before = proc_status(node.pid(), "VmRSS") * 1024;

    // Each client asks for 64 MiB and never reads: what its small receive window
    // cannot take stays in the agent's socket.
    let mut hostile = Vec::new();
    for i in 0..CONNECTIONS {
        let from = IpAddr::V4(Ipv4Addr::new(127, 0, 3, 1 + i as u8));
        hostile.push(reads_64_mib(node.port, from, &fh).await);
    }
    let mut worst = (0, 0);
    for _ in 0..25 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let rss = proc_status(node.pid(), "VmRSS") * 1024;
        let queued = send_queues(node.port);
        if rss.saturating_sub(rss_before) + queued > worst.0 + worst.1 {
            worst = (rss.saturating_sub(rss_before), queued);
        }
    }
    tokio::time::timeout(Duration::from_secs(10), honest_client_round_trip(node.port))
        .await
        .expect("an honest client is served while others leave their replies unread");
    eprintln!(
        "{CONNECTIONS} clients not reading 1 MiB READ replies, budget {} MiB: worst RSS growth \
         {:.1} MiB + {:.1} MiB in the agent's socket send queues",
        BUDGET / MIB,
        worst.0 as f64 / MIB as f64,
        worst.1 as f64 / MIB as f64
    );
    // The budget, plus what sits outside it by design: the record buffer pool (32 x
    // 1 MiB), and allocator and thread overhead.
    let bound = BUDGET + 32 * MIB + 16 * MIB;
    assert!(
        worst.0 + worst.1 < bound,
        "RSS growth {} MiB + send queues {} MiB past {} MiB",
        worst.0 / MIB,
        worst.1 / MIB,
        bound / MIB
    );
    drop(hostile);
}

#[tokio::test]
async fn sigterm_with_a_slow_reader_exits_within_the_drain_deadline_with_acknowledged_data_on_disk()
{
    let (mut node, dir, fh) = node_with_big_file(&[("LOCALNFS_DRAIN_TIMEOUT", "2s")]).await;
    // 64 MiB of replies taken a few KiB at a time, five times a second: each send makes
    // progress, so no send timeout ends it, only a deadline on the drain.
    let mut slow = reads_64_mib(node.port, LOCAL, &fh).await;
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_secs(30), slow.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start = std::time::Instant::now();
    // Waits up to 20 s for the exit (the slow reader alone would hold it for minutes).
    let status = node.sigterm().await;
    let took = start.elapsed();
    eprintln!("SIGTERM with a slow reader: exited in {took:?} (drain deadline 2 s)");
    assert!(status.success(), "exit status {status}");
    assert!(took < Duration::from_secs(7), "exit took {took:?}");
    assert_eq!(
        std::fs::read(dir.path().join("volumes/vol/big")).expect("read"),
        BIG.as_slice(),
        "acknowledged data is on disk"
    );
    reader.abort();
}

#[tokio::test]
async fn sigterm_with_admin_clients_that_never_finish_still_exits_in_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut node = Node::start_env(dir.path(), &[("LOCALNFS_DRAIN_TIMEOUT", "1s")]).await;
    // One request never finished, and many asked for whose answers are never read.
    let mut half = TcpStream::connect(node.admin).await.expect("connect");
    half.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("send");
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .set_recv_buffer_size(4096)
        .expect("small receive buffer");
    let mut unread = socket.connect(node.admin).await.expect("connect");
    let requests = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2000);
    let _ = tokio::time::timeout(Duration::from_secs(2), unread.write_all(&requests)).await;
    let start = std::time::Instant::now();
    let status = node.sigterm().await;
    let took = start.elapsed();
    assert!(status.success(), "exit status {status}");
    // The drain deadline (1 s) and 5 s for the rest, plus slack.
    assert!(took < Duration::from_secs(9), "exit took {took:?}");
}
