//! The protocol tests' harness: a [`Served`] server (the crate's `Server`, in this
//! process, on a temp root with the volumes a test asks for, on 127.0.0.1:0) and a
//! [`Client`] over the `nfs3_client` crate whose calls return `Result<_, nfsstat3>`.

#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use localnfs_nfs::nfs::{AllowList, Exports, Limits, Server};
use localnfs_nfs::volume::{VolumeName, VolumeSpec, VolumeStore};
use nfs3_client::{MountClient, Nfs3Client};
use nfs3_types::mount::dirpath;
use nfs3_types::nfs3::*;
use nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_types::xdr_codec::Opaque;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const MIB: u64 = 1 << 20;

/// A server on a temp root, stopped (and its root removed) when dropped.
pub struct Served {
    pub addr: SocketAddr,
    /// What the server serves: the copy tests call it as the agent does.
    pub exports: Arc<Exports>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    _root: tempfile::TempDir,
}

impl Served {
    /// Serves `volumes` (name, size in bytes), accepting unreserved source ports (our
    /// client binds one; the agent's `--insecure-ports`).
    pub async fn start(volumes: &[(&str, u64)]) -> Served {
        Self::start_with(volumes, false).await
    }

    /// The same, refusing calls from unreserved ports if `reserved_ports_only`.
    pub async fn start_with(volumes: &[(&str, u64)], reserved_ports_only: bool) -> Served {
        // As the agent does: modes come from the client and the volume, not our umask.
        // SAFETY: umask only changes this process's file-creation mask.
        unsafe {
            libc::umask(0);
        }
        let root = tempfile::tempdir().expect("tempdir");
        let store = VolumeStore::open(root.path()).expect("store");
        for (name, size) in volumes {
            let name = VolumeName::new(name).expect("volume name");
            store
                .create(&VolumeSpec::new(name, *size))
                .expect("create volume");
        }
        let allow = AllowList::new(vec!["127.0.0.1".parse().expect("network")]);
        let exports = Arc::new(Exports::load(store, allow.clone()).expect("exports"));
        let limits = Limits {
            max_connections: 16,
            idle_timeout: Duration::from_secs(60),
            record_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(10),
            bytes_in_flight: 64 << 20,
            require_reserved_port: reserved_ports_only,
            drain_timeout: Duration::from_secs(1),
        };
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(Server::new(exports.clone(), limits).serve(
            listener,
            allow,
            shutdown.clone(),
        ));
        Served {
            addr,
            exports,
            shutdown,
            task,
            _root: root,
        }
    }

    pub async fn mount_client(&self) -> MountClient<Conn> {
        MountClient::new_with_auth(self.connect().await, auth(0, 0), opaque_auth::default())
    }

    /// Mounts `/<volume>` as root and opens an NFS connection.
    pub async fn mount(&self, volume: &str) -> Client {
        let path = format!("/{volume}");
        let ok = self
            .mount_client()
            .await
            .mnt(dirpath(Opaque::borrowed(path.as_bytes())))
            .await
            .expect("MNT");
        Client {
            nfs: Nfs3Client::new_with_auth(
                self.connect().await,
                auth(0, 0),
                opaque_auth::default(),
            ),
            root: nfs_fh3 {
                data: Opaque::owned(ok.fhandle.0.to_vec()),
            },
        }
    }

    pub async fn connect(&self) -> Conn {
        Conn(TcpStream::connect(self.addr).await.expect("connect"))
    }

    /// Stops serving and waits for the server to drain.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.task).await;
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
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

/// A TCP stream for `nfs3_client` that reports end-of-stream as an error (the crate
/// otherwise waits forever on a connection the server closed).
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

/// An NFS connection and the root handle MNT gave it.
pub struct Client {
    pub nfs: Nfs3Client<Conn>,
    pub root: nfs_fh3,
}

/// The status of a result, its body on success.
fn status<T, E>(r: Nfs3Result<T, E>) -> Result<T, nfsstat3> {
    match r {
        Nfs3Result::Ok(ok) => Ok(ok),
        Nfs3Result::Err((s, _)) => Err(s),
    }
}

fn dirop<'a>(dir: &nfs_fh3, name: &'a [u8]) -> diropargs3<'a> {
    diropargs3 {
        dir: dir.clone(),
        name: filename3(Opaque::borrowed(name)),
    }
}

impl Client {
    pub async fn getattr(&mut self, fh: &nfs_fh3) -> Result<fattr3, nfsstat3> {
        let args = GETATTR3args { object: fh.clone() };
        status(self.nfs.getattr(&args).await.expect("rpc")).map(|ok| ok.obj_attributes)
    }

    pub async fn lookup(&mut self, dir: &nfs_fh3, name: &[u8]) -> Result<nfs_fh3, nfsstat3> {
        let args = LOOKUP3args {
            what: dirop(dir, name),
        };
        status(self.nfs.lookup(&args).await.expect("rpc")).map(|ok| ok.object)
    }

    pub async fn create(&mut self, dir: &nfs_fh3, name: &[u8]) -> Result<nfs_fh3, nfsstat3> {
        let args = CREATE3args {
            where_: dirop(dir, name),
            how: createhow3::GUARDED(sattr3 {
                mode: Nfs3Option::Some(0o644),
                ..sattr3::default()
            }),
        };
        match status(self.nfs.create(&args).await.expect("rpc"))?.obj {
            Nfs3Option::Some(fh) => Ok(fh),
            Nfs3Option::None => Err(nfsstat3::NFS3ERR_SERVERFAULT),
        }
    }

    pub async fn mkdir(&mut self, dir: &nfs_fh3, name: &[u8]) -> Result<nfs_fh3, nfsstat3> {
        let args = MKDIR3args {
            where_: dirop(dir, name),
            attributes: sattr3 {
                mode: Nfs3Option::Some(0o755),
                ..sattr3::default()
            },
        };
        match status(self.nfs.mkdir(&args).await.expect("rpc"))?.obj {
            Nfs3Option::Some(fh) => Ok(fh),
            Nfs3Option::None => Err(nfsstat3::NFS3ERR_SERVERFAULT),
        }
    }

    pub async fn write(
        &mut self,
        fh: &nfs_fh3,
        offset: u64,
        data: &[u8],
        stable: stable_how,
    ) -> Result<WRITE3resok, nfsstat3> {
        let args = WRITE3args {
            file: fh.clone(),
            offset,
            count: u32::try_from(data.len()).expect("small write"),
            stable,
            data: Opaque::borrowed(data),
        };
        status(self.nfs.write(&args).await.expect("rpc"))
    }

    pub async fn read(
        &mut self,
        fh: &nfs_fh3,
        offset: u64,
        count: u32,
    ) -> Result<Vec<u8>, nfsstat3> {
        let args = READ3args {
            file: fh.clone(),
            offset,
            count,
        };
        status(self.nfs.read(&args).await.expect("rpc")).map(|ok| ok.data.to_vec())
    }

    pub async fn commit(&mut self, fh: &nfs_fh3) -> Result<writeverf3, nfsstat3> {
        let args = COMMIT3args {
            file: fh.clone(),
            offset: 0,
            count: 0,
        };
        status(self.nfs.commit(&args).await.expect("rpc")).map(|ok| ok.verf)
    }

    /// SETATTR of the size alone (a truncate or an extension).
    pub async fn truncate(&mut self, fh: &nfs_fh3, size: u64) -> Result<(), nfsstat3> {
        let args = SETATTR3args {
            object: fh.clone(),
            new_attributes: sattr3 {
                size: Nfs3Option::Some(size),
                ..sattr3::default()
            },
            guard: Nfs3Option::None,
        };
        status(self.nfs.setattr(&args).await.expect("rpc")).map(|_| ())
    }

    pub async fn remove(&mut self, dir: &nfs_fh3, name: &[u8]) -> Result<(), nfsstat3> {
        let args = REMOVE3args {
            object: dirop(dir, name),
        };
        status(self.nfs.remove(&args).await.expect("rpc")).map(|_| ())
    }

    pub async fn rename(
        &mut self,
        from: (&nfs_fh3, &[u8]),
        to: (&nfs_fh3, &[u8]),
    ) -> Result<(), nfsstat3> {
        let args = RENAME3args {
            from: dirop(from.0, from.1),
            to: dirop(to.0, to.1),
        };
        status(self.nfs.rename(&args).await.expect("rpc")).map(|_| ())
    }

    pub async fn symlink(
        &mut self,
        dir: &nfs_fh3,
        name: &[u8],
        target: &[u8],
    ) -> Result<(), nfsstat3> {
        let args = SYMLINK3args {
            where_: dirop(dir, name),
            symlink: symlinkdata3 {
                symlink_attributes: sattr3::default(),
                symlink_data: nfspath3(Opaque::borrowed(target)),
            },
        };
        status(self.nfs.symlink(&args).await.expect("rpc")).map(|_| ())
    }

    pub async fn link(
        &mut self,
        file: &nfs_fh3,
        dir: &nfs_fh3,
        name: &[u8],
    ) -> Result<(), nfsstat3> {
        let args = LINK3args {
            file: file.clone(),
            link: dirop(dir, name),
        };
        status(self.nfs.link(&args).await.expect("rpc")).map(|_| ())
    }

    pub async fn fsstat(&mut self) -> Result<FSSTAT3resok, nfsstat3> {
        let args = FSSTAT3args {
            fsroot: self.root.clone(),
        };
        status(self.nfs.fsstat(&args).await.expect("rpc"))
    }

    /// Every name in `dir` by READDIRPLUS, `maxcount` bytes a page, and the number of
    /// pages it took.
    pub async fn list(
        &mut self,
        dir: &nfs_fh3,
        maxcount: u32,
    ) -> Result<(Vec<Vec<u8>>, usize), nfsstat3> {
        let (mut names, mut pages) = (Vec::new(), 0);
        let (mut cookie, mut cookieverf) = (0, cookieverf3::default());
        loop {
            let args = READDIRPLUS3args {
                dir: dir.clone(),
                cookie,
                cookieverf,
                dircount: maxcount,
                maxcount,
            };
            let ok = status(self.nfs.readdirplus(&args).await.expect("rpc"))?;
            pages += 1;
            for e in ok.reply.entries.0 {
                cookie = e.cookie;
                names.push(e.name.0.to_vec());
            }
            if ok.reply.eof {
                return Ok((names, pages));
            }
            cookieverf = ok.cookieverf;
            assert!(pages < 10_000, "READDIRPLUS never reached the end");
        }
    }
}
