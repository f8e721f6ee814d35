//! Per-volume service (issue 24) against the real `localnfs node`: ceilings hold calls
//! back without failing them, a throttled or flooding volume does not take a quiet
//! neighbour's service, and busy volumes share the server by weight. Clients are
//! `nfs3_client` connections over loopback (one call in flight each, so a flood is
//! many connections); volumes are real directories on the test machine's disk.
//!
//! Rates are compared as ratios measured in the same test (alone vs with a
//! neighbour), never against absolute times, except ceilings, which are absolute by
//! definition. `LOCALNFS_NODE_BIN=<older build>` runs the same tests against another
//! binary (the comparison in the report of issue 24).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use localnfs::volume::{VolumeName, VolumeSpec};
use nfs3_types::nfs3::*;
use support::nfs::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KIB: usize = 1 << 10;

/// Held by each test for its whole run: they measure rates, so two must never share
/// the machine (the test harness runs a file's tests in parallel).
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const MIB: u64 = 1 << 20;

/// Makes volume `name` (1 GiB) with StorageClass parameters `params`.
fn volume(root: &std::path::Path, name: &str, params: &[(&str, &str)]) {
    let mut spec = VolumeSpec::new(VolumeName::new(name).expect("name"), 1 << 30);
    for (k, v) in params {
        spec.set_param(k, v)
            .expect("a volume parameter")
            .expect("a valid value");
    }
    create_volume_with(root, &spec);
}

/// What each client of a run does, one call at a time.
#[derive(Clone, Copy)]
enum Load {
    /// WRITEs of `size` bytes through a 64 MiB file; a COMMIT after every `commit`
    /// writes (0: never).
    Write {
        size: usize,
        stable: stable_how,
        commit: u64,
    },
    /// READs of `size` bytes at scattered offsets of a 1 MiB file.
    Read { size: u32 },
    /// A database's durable calls: CREATE, a 4 KiB FILE_SYNC WRITE, REMOVE.
    Durable,
}

/// Calls completed (and data bytes moved by them) within a run of `secs`.
#[derive(Debug, Clone, Copy)]
struct Counts {
    calls: u64,
    bytes: u64,
    secs: f64,
}

impl Counts {
    fn per_sec(&self) -> f64 {
        self.calls as f64 / self.secs
    }
    fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.secs
    }
}

/// Runs `load` from `clients` connections to `volume` for `run`, counted from the
/// moment all have connected and made their files. `tag` keeps file names apart
/// between runs on one volume.
async fn drive(
    port: u16,
    volume: &str,
    tag: &str,
    clients: usize,
    load: Load,
    run: Duration,
) -> Counts {
    let ready = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let calls = Arc::new(AtomicU64::new(0));
    let bytes = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..clients {
        let (ready, calls, bytes) = (ready.clone(), calls.clone(), bytes.clone());
        let (volume, name) = (volume.to_owned(), format!("{tag}-{i}"));
        tasks.push(tokio::spawn(async move {
            let mut c = Client::mount(port, &volume).await;
            let root = c.root.clone();
            let fh = c
                .create_how(
                    &root,
                    name.as_bytes(),
                    createhow3::UNCHECKED(sattr3::default()),
                )
                .await
                .expect("create the client's file");
            let chunk = vec![0x5a_u8; 64 * KIB];
            if let Load::Read { .. } = load {
                for off in (0..MIB).step_by(chunk.len()) {
                    c.write(&fh, off, &chunk, stable_how::FILE_SYNC)
                        .await
                        .expect("fill the file");
                }
            }
            let data = match load {
                Load::Write { size, .. } => vec![0xa5_u8; size],
                _ => vec![0x11_u8; 4 * KIB],
            };
            ready.wait().await;
            let end = Instant::now() + run;
            let mut n = 0u64;
            while Instant::now() < end {
                let moved = match load {
                    Load::Write {
                        size,
                        stable,
                        commit,
                    } => {
                        let off = n * size as u64 % (64 * MIB);
                        c.write(&fh, off, &data, stable).await.expect("write");
                        if commit > 0 && (n + 1).is_multiple_of(commit) {
                            c.commit(&fh).await.expect("commit");
                        }
                        size as u64
                    }
                    Load::Read { size } => {
                        let off = (n * 7919 % 240) * 4096;
                        c.read(&fh, off, size).await.expect("read").len() as u64
                    }
                    Load::Durable => {
                        let file = format!("{name}-d{n}");
                        let d = c
                            .create(&root, file.as_bytes(), 0o644)
                            .await
                            .expect("create");
                        c.write(&d, 0, &data, stable_how::FILE_SYNC)
                            .await
                            .expect("durable write");
                        c.remove(&root, file.as_bytes()).await.expect("remove");
                        0
                    }
                };
                n += 1;
                if Instant::now() <= end {
                    calls.fetch_add(1, Ordering::Relaxed);
                    bytes.fetch_add(moved, Ordering::Relaxed);
                }
            }
        }));
    }
    ready.wait().await;
    for t in tasks {
        t.await.expect("client task");
    }
    Counts {
        calls: calls.load(Ordering::Relaxed),
        bytes: bytes.load(Ordering::Relaxed),
        secs: run.as_secs_f64(),
    }
}

/// `victim` measured alone, then while `aggressor` runs (started `ramp` earlier and
/// lasting past the measurement): (alone, with, the aggressor's counts).
async fn alone_and_beside(
    port: u16,
    victim: (&str, Load),
    aggressor: (&str, usize, Load),
    run: Duration,
) -> (Counts, Counts, Counts) {
    let ramp = Duration::from_millis(700);
    let alone = drive(port, victim.0, "alone", 1, victim.1, run).await;
    let (name, clients, load) = (aggressor.0.to_owned(), aggressor.1, aggressor.2);
    let flood =
        tokio::spawn(
            async move { drive(port, &name, "flood", clients, load, run + ramp * 2).await },
        );
    // Long enough for every aggressor client to connect and start.
    tokio::time::sleep(ramp).await;
    let beside = drive(port, victim.0, "beside", 1, victim.1, run).await;
    let flood = flood.await.expect("aggressor");
    (alone, beside, flood)
}

/// One sample of `family` for `volume` (and `direction`, when given) from the
/// node's `/metrics`.
async fn metric(node: &Node, family: &str, volume: &str, direction: Option<&str>) -> f64 {
    let mut s = tokio::net::TcpStream::connect(node.admin)
        .await
        .expect("admin");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut body = String::new();
    s.read_to_string(&mut body).await.expect("metrics page");
    body.lines()
        .find(|l| {
            l.starts_with(family)
                && l.contains(&format!("volume=\"{volume}\""))
                && direction.is_none_or(|d| l.contains(&format!("direction=\"{d}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {family} for {volume} in:\n{body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_bandwidth_ceiling_holds_within_5_percent() {
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    volume(dir.path(), "capped", &[("writeBandwidth", "4Mi")]);
    let node = Node::start(dir.path()).await;
    let load = Load::Write {
        size: 64 * KIB,
        stable: stable_how::UNSTABLE,
        commit: 0,
    };
    let got = drive(node.port, "capped", "w", 4, load, Duration::from_secs(4)).await;
    let ratio = got.bytes_per_sec() / (4 * MIB) as f64;
    eprintln!(
        "write ceiling 4 MiB/s: measured {:.3} MiB/s ({ratio:.3}×)",
        got.bytes_per_sec() / MIB as f64
    );
    assert!((0.95..=1.05).contains(&ratio), "{ratio:.3}× the ceiling");
    // Every call was answered (drive expects success); the hold shows in the metric.
    let held = metric(
        &node,
        "localnfs_nfs_volume_throttled_seconds_total",
        "capped",
        Some("write"),
    )
    .await;
    assert!(held > 1.0, "throttled seconds {held}");
}

/// Many large writes at once: more than a volume's room for waiting calls, so most of
/// them queue for room before their turn. Their turn is counted from when the ceiling
/// gave it, not from when room was found (counted from there, this ran at 0.3× its
/// ceiling).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_bandwidth_ceiling_holds_with_many_large_writes_in_flight() {
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    volume(dir.path(), "capped", &[("writeBandwidth", "16Mi")]);
    let node = Node::start(dir.path()).await;
    let load = Load::Write {
        size: 1 << 20,
        stable: stable_how::UNSTABLE,
        commit: 0,
    };
    let got = drive(node.port, "capped", "w", 24, load, Duration::from_secs(6)).await;
    let ratio = got.bytes_per_sec() / (16 * MIB) as f64;
    eprintln!(
        "write ceiling 16 MiB/s, 24 x 1 MiB in flight: measured {:.3} MiB/s ({ratio:.3}×)",
        got.bytes_per_sec() / MIB as f64
    );
    assert!((0.85..=1.05).contains(&ratio), "{ratio:.3}× the ceiling");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_iops_ceiling_holds() {
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    volume(dir.path(), "capped", &[("readIOPS", "200")]);
    let node = Node::start(dir.path()).await;
    let got = drive(
        node.port,
        "capped",
        "r",
        4,
        Load::Read { size: 4096 },
        Duration::from_secs(4),
    )
    .await;
    let ratio = got.per_sec() / 200.0;
    eprintln!(
        "read ceiling 200/s: measured {:.1}/s ({ratio:.3}×)",
        got.per_sec()
    );
    assert!((0.95..=1.05).contains(&ratio), "{ratio:.3}× the ceiling");
    let held = metric(
        &node,
        "localnfs_nfs_volume_throttled_seconds_total",
        "capped",
        Some("read"),
    )
    .await;
    assert!(held > 1.0, "throttled seconds {held}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_volume_does_not_slow_an_unthrottled_neighbour() {
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    volume(dir.path(), "capped", &[("writeIOPS", "20")]);
    volume(dir.path(), "free", &[]);
    let node = Node::start(dir.path()).await;
    let small = Load::Write {
        size: 4 * KIB,
        stable: stable_how::UNSTABLE,
        commit: 0,
    };
    let (alone, beside, flood) = alone_and_beside(
        node.port,
        ("free", small),
        ("capped", 32, small),
        Duration::from_secs(3),
    )
    .await;
    let ratio = beside.per_sec() / alone.per_sec();
    eprintln!(
        "neighbour 4 KiB writes: alone {:.0}/s, beside a throttled flood {:.0}/s ({ratio:.2}×); throttled volume {:.1}/s",
        alone.per_sec(),
        beside.per_sec(),
        flood.per_sec()
    );
    // Measured 0.46–1.24× (CPU-bound at ~5000 calls/s, on a 2-core machine other
    // builds share: the two windows differ by whatever else runs); the build before
    // ceilings: 0.11×, the flood unthrottled.
    assert!(ratio >= 0.4, "{ratio:.2}× of alone");
    // The flood really was held to its ceiling meanwhile.
    assert!(flood.per_sec() <= 20.0 * 1.1, "{:.1}/s", flood.per_sec());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_volumes_share_the_server_by_weight() {
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    volume(dir.path(), "light", &[("weight", "100")]);
    volume(dir.path(), "heavy", &[("weight", "300")]);
    let node = Node::start(dir.path()).await;
    // Calls whose cost is the server's (an fsync each), not the test client's: with
    // cheap calls the client's own two threads, not the server, set the pace.
    let load = Load::Write {
        size: 4 * KIB,
        stable: stable_how::FILE_SYNC,
        commit: 0,
    };
    let run = Duration::from_secs(4);
    let port = node.port;
    let light = tokio::spawn(async move { drive(port, "light", "l", 24, load, run).await });
    let heavy = drive(port, "heavy", "h", 24, load, run).await;
    let light = light.await.expect("light");
    let ratio = heavy.per_sec() / light.per_sec();
    eprintln!(
        "weights 300:100 → heavy {:.0}/s, light {:.0}/s ({ratio:.2}:1)",
        heavy.per_sec(),
        light.per_sec()
    );
    // The fair queue shares the blocking pool's threads 1:3 (`fair`'s unit tests);
    // end to end the split is that only while the threads are what the volumes wait
    // for. Measured 2.5–2.8:1 with a slow disk and 1.3–1.5:1 with a fast one, when the
    // two cores (connection tasks and the test's own clients, outside the queue) are
    // the limit; the build before weights: 0.99:1. A debug build's connection tasks
    // take more of those cores: 1.19:1 in one fresh-clone CI run (`cargo test`, debug)
    // on a machine where the release build gives 1.40–1.79:1.
    assert!((1.1..=4.5).contains(&ratio), "{ratio:.2}:1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_calls_keep_pace_beside_a_neighbours_write_flood() {
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    volume(dir.path(), "db", &[]);
    volume(dir.path(), "bulk", &[]);
    let node = Node::start(dir.path()).await;
    let flood = Load::Write {
        size: 1 << 20,
        stable: stable_how::UNSTABLE,
        commit: 16,
    };
    let (alone, beside, bulk) = alone_and_beside(
        node.port,
        ("db", Load::Durable),
        ("bulk", 16, flood),
        Duration::from_secs(4),
    )
    .await;
    let ratio = beside.per_sec() / alone.per_sec();
    eprintln!(
        "create+FILE_SYNC write+remove: alone {:.0}/s, beside a 1 MiB write flood {:.0}/s ({ratio:.2}×); flood {:.0} MiB/s",
        alone.per_sec(),
        beside.per_sec(),
        bulk.bytes_per_sec() / MIB as f64
    );
    // Measured 0.12–0.27× on a loaded 2-core machine (before bounded write-back and
    // the fair queue: 0.07–0.08×); 0.28–0.54× once other volumes' unstable writes run
    // one at a time beside durable calls (`pool`), and 0.18–0.26× without in the same
    // session. The bound is below all of them, with margin: it catches durable calls
    // starved outright, not the difference between builds.
    assert!(ratio >= 0.06, "{ratio:.2}× of alone");
}

/// An NFSv3 call record with AUTH_SYS root credentials and `fh` as its first argument.
fn nfs_call(xid: u32, procedure: u32, fh: &nfs_fh3, rest: &[u8]) -> Vec<u8> {
    let words = |ws: &[u32]| ws.iter().flat_map(|w| w.to_be_bytes()).collect::<Vec<u8>>();
    // xid, CALL, RPC v2, NFS, v3, procedure; AUTH_SYS: stamp, "", uid 0, gid 0, no
    // groups; AUTH_NONE verifier.
    let mut body = words(&[xid, 0, 2, 100_003, 3, procedure, 1, 20, 0, 0, 0, 0, 0, 0, 0]);
    let handle = fh.data.as_ref();
    body.extend(words(&[handle.len() as u32]));
    body.extend_from_slice(handle);
    body.resize(body.len().next_multiple_of(4), 0);
    body.extend_from_slice(rest);
    let mut record = words(&[body.len() as u32 | 0x8000_0000]);
    record.extend(body);
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_volume_leaves_room_for_its_neighbour_on_a_shared_connection() {
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    volume(dir.path(), "capped", &[("writeIOPS", "1")]);
    volume(dir.path(), "free", &[]);
    let node = Node::start(dir.path()).await;
    let capped = mount(node.port, "capped", LOCAL, 0, 0)
        .await
        .expect("mount capped");
    let free = mount(node.port, "free", LOCAL, 0, 0)
        .await
        .expect("mount free");
    // One connection, as a kernel client mounting both: 100 COMMITs of the capped
    // volume (a minute and a half of its ceiling), then a GETATTR of the other.
    let mut s = tokio::net::TcpStream::connect(node.addr)
        .await
        .expect("connect");
    let mut calls = Vec::new();
    for xid in 1..=100 {
        // offset 0, count 0 (RFC 1813 §3.3.21)
        calls.extend(nfs_call(xid, 21, &capped, &[0; 12]));
    }
    calls.extend(nfs_call(1000, 1, &free, &[]));
    s.write_all(&calls).await.expect("send");
    let getattr = async {
        loop {
            let mut mark = [0u8; 4];
            s.read_exact(&mut mark).await.expect("reply mark");
            let mut body = vec![0u8; (u32::from_be_bytes(mark) & 0x7fff_ffff) as usize];
            s.read_exact(&mut body).await.expect("reply body");
            if body[..4] == 1000u32.to_be_bytes() {
                return;
            }
        }
    };
    // Before parked calls gave their slot back: the 65th call was not even read for
    // a minute.
    tokio::time::timeout(Duration::from_secs(5), getattr)
        .await
        .expect("the neighbour's GETATTR answered within 5 s");
}

/// A client that leaves with calls still waiting for its volume's ceiling: they are
/// dropped with the connection, not run later (minutes later, at a low ceiling, for a
/// client that is gone and may since have written the same range again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_waiting_for_a_ceiling_are_dropped_when_their_client_leaves() {
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    volume(dir.path(), "capped", &[("writeIOPS", "1")]);
    let node = Node::start(dir.path()).await;
    let mut c = Client::mount(node.port, "capped").await;
    let root = c.root.clone();
    let fh = c
        .create_how(&root, b"f", createhow3::UNCHECKED(sattr3::default()))
        .await
        .expect("create");
    // 20 FILE_SYNC WRITEs of 4 KiB at growing offsets, 20 s of the ceiling; then the
    // client is gone.
    let mut s = tokio::net::TcpStream::connect(node.addr)
        .await
        .expect("connect");
    let mut calls = Vec::new();
    for i in 0..20u32 {
        let mut args = (u64::from(i) * 4096).to_be_bytes().to_vec();
        args.extend(4096u32.to_be_bytes()); // count
        args.extend(2u32.to_be_bytes()); // FILE_SYNC
        args.extend(4096u32.to_be_bytes()); // data length
        args.extend([0x5a_u8; 4096]);
        calls.extend(nfs_call(i + 1, 7, &fh, &args));
    }
    s.write_all(&calls).await.expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    // Kept, they would land one a second from here.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let size = c.getattr(&fh).await.expect("getattr").size;
    eprintln!(
        "5 s after the client left: {} of its 20 writes landed",
        size / 4096
    );
    assert!(
        size <= 2 * 4096,
        "{} writes landed after their client left",
        size / 4096
    );
}

/// The arguments of a 1 MiB FILE_SYNC WRITE at `offset` (RFC 1813 §3.3.7).
fn sync_write_args(offset: u64) -> Vec<u8> {
    let mut args = offset.to_be_bytes().to_vec();
    args.extend((MIB as u32).to_be_bytes()); // count
    args.extend(2u32.to_be_bytes()); // FILE_SYNC
    args.extend((MIB as u32).to_be_bytes()); // data length
    args.resize(args.len() + MIB as usize, 0x5a);
    args
}

/// Sends `calls` down one new connection at once and reads `n` replies: (xid,
/// nfsstat3) of each, in the order they came.
async fn pipelined(node: &Node, calls: Vec<u8>, n: usize) -> Vec<(u32, u32)> {
    let s = tokio::net::TcpStream::connect(node.addr)
        .await
        .expect("connect");
    let (mut rd, mut wr) = s.into_split();
    // Written from a task of its own: the server stops reading while it has no room,
    // and its replies must be read meanwhile.
    let send = tokio::spawn(async move {
        wr.write_all(&calls).await.expect("send");
        wr
    });
    let mut got = Vec::new();
    while got.len() < n {
        let mut mark = [0u8; 4];
        rd.read_exact(&mut mark).await.expect("reply mark");
        let mut body = vec![0u8; (u32::from_be_bytes(mark) & 0x7fff_ffff) as usize];
        rd.read_exact(&mut body).await.expect("reply body");
        let word = |i: usize| u32::from_be_bytes(body[i * 4..i * 4 + 4].try_into().expect("4"));
        // xid, REPLY, MSG_ACCEPTED, AUTH_NONE verifier (2 words), SUCCESS, status
        assert_eq!(word(5), 0, "accept_stat of xid {}", word(0));
        got.push((word(0), word(6)));
    }
    drop(send.await.expect("sender"));
    got
}

/// Largest sample of the node's `family` gauge (no labels) taken every 10 ms until
/// `stop` is set.
async fn sample_max(node: &Node, family: &str, stop: Arc<std::sync::atomic::AtomicBool>) -> f64 {
    let mut most = 0f64;
    while !stop.load(Ordering::Relaxed) {
        let mut s = tokio::net::TcpStream::connect(node.admin)
            .await
            .expect("admin");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("send");
        let mut body = String::new();
        s.read_to_string(&mut body).await.expect("metrics page");
        let v = body
            .lines()
            .find(|l| l.starts_with(&format!("{family} ")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {family} in:\n{body}"));
        most = most.max(v);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    most
}

/// A volume flooded with large writes from many connections keeps most of the
/// server's byte budget free for the other volumes: its connections stop reading once
/// its queue is full, rather than each reading up to 64 MiB records into the agent
/// (before, the flood took the whole budget, and every other client's next call
/// waited for it). Every write is still answered, none refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_flood_on_one_volume_leaves_most_of_the_byte_budget_to_others() {
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    volume(dir.path(), "bulk", &[]);
    let node = Arc::new(Node::start(dir.path()).await);
    let mut c = Client::mount(node.port, "bulk").await;
    let root = c.root.clone();
    let fh = c
        .create_how(&root, b"f", createhow3::UNCHECKED(sattr3::default()))
        .await
        .expect("create");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (node, stop) = (node.clone(), stop.clone());
        tokio::spawn(async move { sample_max(&node, "localnfs_nfs_in_flight_bytes", stop).await })
    };
    // 16 connections × 32 FILE_SYNC writes of 1 MiB: 512 MiB, four times the budget.
    let mut floods = Vec::new();
    for conn in 0..16u32 {
        let mut calls = Vec::new();
        for i in 0..32u32 {
            let offset = u64::from(conn * 32 + i) * MIB;
            calls.extend(nfs_call(i + 1, 7, &fh, &sync_write_args(offset)));
        }
        let node = node.clone();
        floods.push(tokio::spawn(
            async move { pipelined(&node, calls, 32).await },
        ));
    }
    let mut answered = 0;
    for f in floods {
        for (xid, status) in f.await.expect("flood connection") {
            assert_eq!(status, 0, "write {xid}: status {status}");
            answered += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let most = sampler.await.expect("sampler");
    let limit = 128.0 * MIB as f64;
    eprintln!(
        "{answered} writes answered; bytes in flight at most {:.1} MiB of {:.0}",
        most / MIB as f64,
        limit / MIB as f64
    );
    assert!(
        most <= limit / 2.0,
        "{:.1} MiB in flight",
        most / MIB as f64
    );
}

/// A kernel client sends all its volumes of one server down one connection. When one
/// of them is out of room and the server's byte budget is over half spent, that
/// volume's new calls are answered NFS3ERR_JUKEBOX (the client retries them) instead
/// of stopping the connection, and the other volume's calls on it are still served.
/// Before, nothing was refused: the connection read the writes until the budget was
/// spent and then waited for it. The full volume has a ceiling, so that its room is
/// full for certain (its calls wait on timers) however fast the disk is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_volume_on_a_shared_connection_is_told_to_retry_rather_than_stall_it() {
    const JUKEBOX: u32 = 10008;
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    volume(dir.path(), "bulk", &[("writeIOPS", "20")]);
    volume(dir.path(), "free", &[]);
    let node = Node::start_with(dir.path(), 0, &["--max-bytes-in-flight", "48Mi"]).await;
    let node = Arc::new(node);
    let mut b = Client::mount(node.port, "bulk").await;
    let broot = b.root.clone();
    let bulk = b
        .create_how(&broot, b"f", createhow3::UNCHECKED(sattr3::default()))
        .await
        .expect("create in bulk");
    let mut f = Client::mount(node.port, "free").await;
    let froot = f.root.clone();
    let free = f
        .create_how(&froot, b"g", createhow3::UNCHECKED(sattr3::default()))
        .await
        .expect("create in free");
    // Eight connections, each: a COMMIT of free's file, 32 FILE_SYNC writes of 1 MiB
    // to bulk (256 MiB in all, five times the budget), a COMMIT of free's file again.
    let commit = |xid| nfs_call(xid, 21, &free, &[0; 12]);
    let mut conns = Vec::new();
    for conn in 0..8u32 {
        let mut calls = commit(1000);
        for i in 0..32u32 {
            let offset = u64::from(conn * 32 + i) * MIB;
            calls.extend(nfs_call(i + 1, 7, &bulk, &sync_write_args(offset)));
        }
        calls.extend(commit(1001));
        let node = node.clone();
        conns.push(tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(60), pipelined(&node, calls, 34))
                .await
                .expect("every call answered within a minute")
        }));
    }
    let (mut ok, mut retry) = (0, 0);
    for c in conns {
        for (xid, status) in c.await.expect("connection") {
            match (xid, status) {
                (1000 | 1001, s) => assert_eq!(s, 0, "free's COMMIT {xid}"),
                (_, 0) => ok += 1,
                (_, JUKEBOX) => retry += 1,
                (_, s) => panic!("write {xid}: status {s}, an error a client would surface"),
            }
        }
    }
    eprintln!("bulk's writes on shared connections: {ok} done, {retry} told to retry");
    assert!(
        retry > 0,
        "no write was refused for later: the connections waited"
    );
    assert!(ok > 0, "the full volume was still served");
}

/// The known limit of ceilings on a shared connection: a throttled volume's waiting
/// calls past its 16 MiB of room stopped the connection, and so every other volume
/// the kernel client sends down it, at the ceiling's pace. Now, on a connection that
/// carries other volumes too, they wait past that room (bounded by the byte budget)
/// and the neighbour's call behind them is read and answered at once. Before: 40
/// writes of 1 MiB at one write a second held it for about 24 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_volumes_large_writes_do_not_stop_a_shared_connection() {
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    volume(dir.path(), "capped", &[("writeIOPS", "1")]);
    volume(dir.path(), "free", &[]);
    let node = Node::start(dir.path()).await;
    let mut c = Client::mount(node.port, "capped").await;
    let root = c.root.clone();
    let capped = c
        .create_how(&root, b"f", createhow3::UNCHECKED(sattr3::default()))
        .await
        .expect("create in capped");
    let mut f = Client::mount(node.port, "free").await;
    let froot = f.root.clone();
    let free = f
        .create_how(&froot, b"g", createhow3::UNCHECKED(sattr3::default()))
        .await
        .expect("create in free");
    // One connection: a COMMIT of free's file, 40 FILE_SYNC writes of 1 MiB to the
    // capped volume, a COMMIT of free's file again.
    let mut calls = nfs_call(1000, 21, &free, &[0; 12]);
    for i in 0..40u32 {
        calls.extend(nfs_call(
            i + 1,
            7,
            &capped,
            &sync_write_args(u64::from(i) * MIB),
        ));
    }
    calls.extend(nfs_call(1001, 21, &free, &[0; 12]));
    let mut s = tokio::net::TcpStream::connect(node.addr)
        .await
        .expect("connect");
    let (mut rd, mut wr) = s.split();
    let send = async {
        wr.write_all(&calls).await.expect("send");
        std::future::pending::<()>().await
    };
    let second_commit = async {
        loop {
            let mut mark = [0u8; 4];
            rd.read_exact(&mut mark).await.expect("reply mark");
            let mut body = vec![0u8; (u32::from_be_bytes(mark) & 0x7fff_ffff) as usize];
            rd.read_exact(&mut body).await.expect("reply body");
            if body[..4] == 1001u32.to_be_bytes() {
                return u32::from_be_bytes(body[24..28].try_into().expect("4"));
            }
        }
    };
    let status = tokio::time::timeout(Duration::from_secs(5), async {
        tokio::select! {
            () = send => unreachable!("pending"),
            s = second_commit => s,
        }
    })
    .await
    .expect("free's COMMIT behind the throttled writes answered within 5 s");
    assert_eq!(status, 0, "free's COMMIT");
}
