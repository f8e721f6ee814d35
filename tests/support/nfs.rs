//! NFS test helpers: the real `localnfs node` binary in standalone mode on a temp root,
//! and a thin wrapper over the `nfs3_client` crate returning `Result<_, nfsstat3>`.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use localnfs::volume::{VolumeName, VolumeSpec, VolumeStore};
use nfs3_client::MountClient;
use nfs3_client::Nfs3Client;
use nfs3_types::mount::dirpath;
use nfs3_types::nfs3::*;
use nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_types::xdr_codec::Opaque;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};

/// A `localnfs node --standalone` process serving `root`: this build's binary, or the
/// one `LOCALNFS_NODE_BIN` names (to measure an older build with the same test).
pub struct Node {
    child: Child,
    /// Where it serves NFS and MOUNT.
    pub addr: SocketAddr,
    pub port: u16,
    /// Where it serves `/metrics`, `/healthz`, `/readyz`.
    pub admin: SocketAddr,
    pub root: PathBuf,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

/// Our test clients (`nfs3_client`, libnfs, hand-built RPC) bind unreserved source
/// ports, so test nodes accept them unless a test says otherwise. Given as
/// environment (like the limits tests set), so a test can also run against a build
/// that predates the setting.
const INSECURE: (&str, &str) = ("LOCALNFS_INSECURE_PORTS", "true");

impl Node {
    pub async fn start(root: &Path) -> Node {
        Self::start_with(root, 0, &[]).await
    }

    /// Starts on `127.0.0.1:port` (0: any) with extra flags, accepting unreserved ports.
    pub async fn start_with(root: &Path, port: u16, extra: &[&str]) -> Node {
        let listen = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
        Self::spawn(root, listen, extra, &[INSECURE]).await
    }

    /// Starts on `listen` (port 0: any) with extra flags and the default port check
    /// (for the kernel client of test nodes, which uses reserved ports).
    pub async fn start_on(root: &Path, listen: SocketAddr, extra: &[&str]) -> Node {
        Self::spawn(root, listen, extra, &[]).await
    }

    /// Starts with these `LOCALNFS_*` settings, accepting unreserved ports.
    pub async fn start_env(root: &Path, env: &[(&str, &str)]) -> Node {
        let mut all = vec![INSECURE];
        all.extend_from_slice(env);
        Self::spawn(
            root,
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0),
            &[],
            &all,
        )
        .await
    }

    /// Starts with the defaults: calls from unreserved ports are refused.
    pub async fn start_secure(root: &Path) -> Node {
        Self::spawn(
            root,
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0),
            &[],
            &[],
        )
        .await
    }

    async fn spawn(root: &Path, listen: SocketAddr, extra: &[&str], env: &[(&str, &str)]) -> Node {
        let bin = std::env::var_os("LOCALNFS_NODE_BIN")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_localnfs").into());
        let mut child = Command::new(bin)
            .args(["node", "--standalone", "--admin-addr", "127.0.0.1:0"])
            .arg("--root")
            .arg(root)
            .arg("--listen")
            .arg(listen.to_string())
            .args(extra)
            .envs(env.iter().copied())
            .env(
                "LOCALNFS_LOG",
                std::env::var("LOCALNFS_TEST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start localnfs node");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("node starts within 20 s")
            .expect("read stdout")
            .expect("node printed its address");
        let addr: SocketAddr = line
            .strip_prefix("nfs listening on ")
            .expect("address line")
            .parse()
            .expect("socket address");
        let admin: SocketAddr = lines
            .next_line()
            .await
            .expect("read stdout")
            .as_deref()
            .and_then(|l| l.strip_prefix("admin listening on "))
            .expect("admin address line")
            .parse()
            .expect("socket address");
        Node {
            child,
            addr,
            port: addr.port(),
            admin,
            root: root.to_owned(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// SIGKILL, then start again on the same port.
    pub async fn kill9_and_restart(&mut self) {
        self.child.start_kill().expect("kill");
        self.child.wait().await.expect("reap");
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        *self = Node::spawn(&self.root.clone(), self.addr, &extra, &env).await;
    }

    pub async fn sigterm(&mut self) -> std::process::ExitStatus {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .expect("node exits after SIGTERM")
            .expect("wait")
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "nfs://127.0.0.1/{path}?nfsport={p}&mountport={p}",
            p = self.port
        )
    }
}

/// Creates a volume directly in the store.
pub fn create_volume(root: &Path, name: &str, size: u64) -> VolumeSpec {
    let spec = VolumeSpec::new(VolumeName::new(name).expect("name"), size);
    VolumeStore::open(root)
        .expect("store")
        .create(&spec)
        .expect("create volume");
    spec
}

pub fn create_volume_with(root: &Path, spec: &VolumeSpec) {
    VolumeStore::open(root)
        .expect("store")
        .create(spec)
        .expect("create volume");
}

pub fn auth(uid: u32, gid: u32) -> opaque_auth<'static> {
    opaque_auth::auth_unix(&auth_unix {
        stamp: 1,
        machinename: Opaque::borrowed(b"test"),
        uid,
        gid,
        gids: vec![],
    })
}

/// A TCP stream for `nfs3_client` that reports end-of-stream as an error: the
/// crate's `read_exact` loops forever on a closed connection otherwise, turning a
/// server that hangs up into a test that hangs.
pub struct Conn(TcpStream);

impl nfs3_client::io::AsyncRead for Conn {
    async fn async_read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match tokio::io::AsyncReadExt::read(&mut self.0, buf).await? {
            0 if !buf.is_empty() => Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => Ok(n),
        }
    }
}

impl nfs3_client::io::AsyncWrite for Conn {
    async fn async_write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        tokio::io::AsyncWriteExt::write(&mut self.0, buf).await
    }
}

pub async fn tcp(port: u16, from: IpAddr) -> Conn {
    tcp_to(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port), from).await
}

/// A connection to `server` from the local address `from`.
pub async fn tcp_to(server: SocketAddr, from: IpAddr) -> Conn {
    try_tcp_to(server, from).await.expect("connect")
}

/// Same, or the error when nothing listens there.
pub async fn try_tcp_to(server: SocketAddr, from: IpAddr) -> std::io::Result<Conn> {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(SocketAddr::new(from, 0)).expect("bind source");
    socket.connect(server).await.map(Conn)
}

/// The paths `server` lists in EXPORT for a client at `from`.
pub async fn exports_at(server: SocketAddr, from: IpAddr) -> Vec<String> {
    let mut m = MountClient::new_with_auth(
        tcp_to(server, from).await,
        auth(0, 0),
        opaque_auth::default(),
    );
    m.export()
        .await
        .expect("EXPORT")
        .0
        .iter()
        .map(|e| String::from_utf8_lossy(&e.ex_dir.0).into_owned())
        .collect()
}

pub const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// An NFS client: one MOUNT call, then NFS calls on a second connection.
pub struct Client {
    pub nfs: Nfs3Client<Conn>,
    pub root: nfs_fh3,
}

pub async fn mount(
    port: u16,
    volume: &str,
    from: IpAddr,
    uid: u32,
    gid: u32,
) -> Result<nfs_fh3, String> {
    mount_at(SocketAddr::new(LOCAL, port), volume, from, uid, gid).await
}

/// MOUNT `/<volume>` on `server`, connecting from the local address `from`.
pub async fn mount_at(
    server: SocketAddr,
    volume: &str,
    from: IpAddr,
    uid: u32,
    gid: u32,
) -> Result<nfs_fh3, String> {
    let mut m = MountClient::new_with_auth(
        tcp_to(server, from).await,
        auth(uid, gid),
        opaque_auth::default(),
    );
    let path = format!("/{volume}");
    m.mnt(dirpath(Opaque::borrowed(path.as_bytes())))
        .await
        .map(|ok| nfs_fh3 {
            data: Opaque::owned(ok.fhandle.0.to_vec()),
        })
        .map_err(|e| format!("{e:?}"))
}

impl Client {
    pub async fn mount(port: u16, volume: &str) -> Client {
        Self::mount_as(port, volume, LOCAL, 0, 0).await
    }

    pub async fn mount_as(port: u16, volume: &str, from: IpAddr, uid: u32, gid: u32) -> Client {
        Self::mount_at(SocketAddr::new(LOCAL, port), volume, from, uid, gid).await
    }

    /// Mounts `volume` from `server`, connecting from the local address `from` (a
    /// kubelet mounts from its node's address).
    pub async fn mount_at(
        server: SocketAddr,
        volume: &str,
        from: IpAddr,
        uid: u32,
        gid: u32,
    ) -> Client {
        let root = mount_at(server, volume, from, uid, gid)
            .await
            .expect("mount");
        Self::at_root(server, from, uid, gid, root).await
    }

    /// A client of `server` from `from` whose root is the handle a MOUNT gave.
    async fn at_root(
        server: SocketAddr,
        from: IpAddr,
        uid: u32,
        gid: u32,
        root: nfs_fh3,
    ) -> Client {
        Client {
            nfs: Nfs3Client::new_with_auth(
                tcp_to(server, from).await,
                auth(uid, gid),
                opaque_auth::default(),
            ),
            root,
        }
    }

    /// [`Client::mount_at`] as root, once the agent lets `from` mount: a PV's published
    /// nodes reach the agent through its own PV watch, a moment after the API server
    /// has them, and a kubelet retries a refused mount the same way. A mount still
    /// refused after 30 s fails the test with the last refusal.
    pub async fn mount_when_granted(server: SocketAddr, volume: &str, from: IpAddr) -> Client {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match mount_at(server, volume, from, 0, 0).await {
                Ok(root) => return Self::at_root(server, from, 0, 0, root).await,
                Err(e) if std::time::Instant::now() < deadline && e.contains("MNT3ERR_ACCES") => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("mount {volume} from {from}: {e}"),
            }
        }
    }

    /// A client that talks NFS with handles it got elsewhere (no MOUNT of its own).
    pub async fn connect(port: u16, from: IpAddr, uid: u32, gid: u32, root: nfs_fh3) -> Client {
        Client {
            nfs: Nfs3Client::new_with_auth(
                tcp(port, from).await,
                auth(uid, gid),
                opaque_auth::default(),
            ),
            root,
        }
    }

    pub async fn lookup(&mut self, dir: &nfs_fh3, name: &[u8]) -> Result<nfs_fh3, nfsstat3> {
        let r = self
            .nfs
            .lookup(&LOOKUP3args {
                what: diropargs3 {
                    dir: dir.clone(),
                    name: filename3(Opaque::borrowed(name)),
                },
            })
            .await
            .expect("rpc");
        match r {
            Nfs3Result::Ok(ok) => Ok(ok.object),
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    pub async fn create(
        &mut self,
        dir: &nfs_fh3,
        name: &[u8],
        mode: u32,
    ) -> Result<nfs_fh3, nfsstat3> {
        let how = createhow3::GUARDED(sattr3 {
            mode: Nfs3Option::Some(mode),
            ..sattr3::default()
        });
        self.create_how(dir, name, how).await
    }

    /// CREATE with any mode (UNCHECKED, GUARDED, EXCLUSIVE).
    pub async fn create_how(
        &mut self,
        dir: &nfs_fh3,
        name: &[u8],
        how: createhow3,
    ) -> Result<nfs_fh3, nfsstat3> {
        let r = self
            .nfs
            .create(&CREATE3args {
                where_: diropargs3 {
                    dir: dir.clone(),
                    name: filename3(Opaque::borrowed(name)),
                },
                how,
            })
            .await
            .expect("rpc");
        match r {
            Nfs3Result::Ok(ok) => match ok.obj {
                Nfs3Option::Some(fh) => Ok(fh),
                Nfs3Option::None => Err(nfsstat3::NFS3ERR_SERVERFAULT),
            },
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    /// SETATTR without a guard.
    pub async fn setattr(&mut self, fh: &nfs_fh3, s: sattr3) -> Result<(), nfsstat3> {
        match self
            .nfs
            .setattr(&SETATTR3args {
                object: fh.clone(),
                new_attributes: s,
                guard: Nfs3Option::None,
            })
            .await
            .expect("rpc")
        {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    pub async fn mkdir(&mut self, dir: &nfs_fh3, name: &[u8]) -> Result<nfs_fh3, nfsstat3> {
        let r = self
            .nfs
            .mkdir(&MKDIR3args {
                where_: diropargs3 {
                    dir: dir.clone(),
                    name: filename3(Opaque::borrowed(name)),
                },
                attributes: sattr3 {
                    mode: Nfs3Option::Some(0o755),
                    ..sattr3::default()
                },
            })
            .await
            .expect("rpc");
        match r {
            Nfs3Result::Ok(ok) => match ok.obj {
                Nfs3Option::Some(fh) => Ok(fh),
                Nfs3Option::None => Err(nfsstat3::NFS3ERR_SERVERFAULT),
            },
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    pub async fn write(
        &mut self,
        fh: &nfs_fh3,
        offset: u64,
        data: &[u8],
        stable: stable_how,
    ) -> Result<WRITE3resok, nfsstat3> {
        let r = self
            .nfs
            .write(&WRITE3args {
                file: fh.clone(),
                offset,
                count: data.len() as u32,
                stable,
                data: Opaque::borrowed(data),
            })
            .await
            .expect("rpc");
        match r {
            Nfs3Result::Ok(ok) => Ok(ok),
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    pub async fn read(
        &mut self,
        fh: &nfs_fh3,
        offset: u64,
        count: u32,
    ) -> Result<Vec<u8>, nfsstat3> {
        let r = self
            .nfs
            .read(&READ3args {
                file: fh.clone(),
                offset,
                count,
            })
            .await
            .expect("rpc");
        match r {
            Nfs3Result::Ok(ok) => Ok(ok.data.to_vec()),
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    pub async fn getattr(&mut self, fh: &nfs_fh3) -> Result<fattr3, nfsstat3> {
        match self
            .nfs
            .getattr(&GETATTR3args { object: fh.clone() })
            .await
            .expect("rpc")
        {
            Nfs3Result::Ok(ok) => Ok(ok.obj_attributes),
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    pub async fn commit(&mut self, fh: &nfs_fh3) -> Result<writeverf3, nfsstat3> {
        match self
            .nfs
            .commit(&COMMIT3args {
                file: fh.clone(),
                offset: 0,
                count: 0,
            })
            .await
            .expect("rpc")
        {
            Nfs3Result::Ok(ok) => Ok(ok.verf),
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    pub async fn fsstat(&mut self) -> Result<FSSTAT3resok, nfsstat3> {
        match self
            .nfs
            .fsstat(&FSSTAT3args {
                fsroot: self.root.clone(),
            })
            .await
            .expect("rpc")
        {
            Nfs3Result::Ok(ok) => Ok(ok),
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    pub async fn remove(&mut self, dir: &nfs_fh3, name: &[u8]) -> Result<(), nfsstat3> {
        match self
            .nfs
            .remove(&REMOVE3args {
                object: diropargs3 {
                    dir: dir.clone(),
                    name: filename3(Opaque::borrowed(name)),
                },
            })
            .await
            .expect("rpc")
        {
            Nfs3Result::Ok(_) => Ok(()),
            Nfs3Result::Err((s, _)) => Err(s),
        }
    }

    /// Every name in `dir`, paging with READDIRPLUS (or READDIR) `maxcount` bytes at a time.
    pub async fn list(
        &mut self,
        dir: &nfs_fh3,
        plus: bool,
        maxcount: u32,
    ) -> Result<Vec<Vec<u8>>, nfsstat3> {
        let mut names = Vec::new();
        let mut cookie = 0;
        let mut verf = cookieverf3::default();
        loop {
            let (entries, eof, v) = if plus {
                match self
                    .nfs
                    .readdirplus(&READDIRPLUS3args {
                        dir: dir.clone(),
                        cookie,
                        cookieverf: verf,
                        dircount: maxcount,
                        maxcount,
                    })
                    .await
                    .expect("rpc")
                {
                    Nfs3Result::Ok(ok) => (
                        ok.reply
                            .entries
                            .0
                            .into_iter()
                            .map(|e| (e.name.0.to_vec(), e.cookie))
                            .collect::<Vec<_>>(),
                        ok.reply.eof,
                        ok.cookieverf,
                    ),
                    Nfs3Result::Err((s, _)) => return Err(s),
                }
            } else {
                match self
                    .nfs
                    .readdir(&READDIR3args {
                        dir: dir.clone(),
                        cookie,
                        cookieverf: verf,
                        count: maxcount,
                    })
                    .await
                    .expect("rpc")
                {
                    Nfs3Result::Ok(ok) => (
                        ok.reply
                            .entries
                            .0
                            .into_iter()
                            .map(|e| (e.name.0.to_vec(), e.cookie))
                            .collect::<Vec<_>>(),
                        ok.reply.eof,
                        ok.cookieverf,
                    ),
                    Nfs3Result::Err((s, _)) => return Err(s),
                }
            };
            verf = v;
            if let Some((_, c)) = entries.last() {
                cookie = *c;
            }
            names.extend(entries.into_iter().map(|(n, _)| n));
            if eof {
                return Ok(names);
            }
        }
    }
}

/// Runs a libnfs-utils command (a client nobody here wrote) and returns its output.
pub fn libnfs(program: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs (apt-get install libnfs-utils): {e}"))
}

/// What the volume at `dir` holds by the server's rule: a file its allocated blocks and
/// at least its size, anything else its blocks; each inode once, the root not counted.
/// Returns (bytes, objects).
pub fn on_disk(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let (mut total, mut objects) = (0, 0);
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let e = e.expect("entry");
            let md = std::fs::symlink_metadata(e.path()).expect("stat");
            if md.is_dir() {
                stack.push(e.path());
            }
            if seen.insert(md.ino()) {
                let blocks = md.blocks() * 512;
                total += if md.is_file() {
                    blocks.max(md.size())
                } else {
                    blocks
                };
                objects += 1;
            }
        }
    }
    (total, objects)
}
