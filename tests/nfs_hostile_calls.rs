//! Hostile callers, one procedure at a time (issue 13): identities the kernel refuses,
//! special files, oversized listing counts, the shared descriptor cache, durable
//! namespace changes and racing quota charges. Each test drives the real
//! `localnfs node` binary with the `nfs3_client` crate and forged credentials.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use localnfs::volume::{Squash, VolumeName, VolumeSpec};
use nfs3_client::Nfs3Client;
use nfs3_types::nfs3::*;
use nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_types::xdr_codec::Opaque;
use support::nfs::*;

const MIB: u64 = 1 << 20;

/// An NFS client that says it is `uid`/`gid` with supplementary `gids`, using handles
/// of a mount made from the same address (no MOUNT of its own).
async fn forged(port: u16, uid: u32, gid: u32, gids: &[u32], root: &nfs_fh3) -> Client {
    let cred = opaque_auth::auth_unix(&auth_unix {
        stamp: 7,
        machinename: Opaque::borrowed(b"hostile"),
        uid,
        gid,
        gids: gids.to_vec(),
    });
    Client {
        nfs: Nfs3Client::new_with_auth(tcp(port, LOCAL).await, cred, opaque_auth::default()),
        root: root.clone(),
    }
}

fn mode(m: u32) -> sattr3 {
    sattr3 {
        mode: Nfs3Option::Some(m),
        ..sattr3::default()
    }
}

fn squashed_volume(root: &Path, name: &str, squash: Squash) {
    let spec = VolumeSpec {
        squash,
        anon_uid: 5000,
        anon_gid: 5001,
        ..VolumeSpec::new(VolumeName::new(name).expect("name"), 4 * MIB)
    };
    create_volume_with(root, &spec);
}

/// Root's private corner of a volume, made on the disk: `secret/` (0700) holding
/// `secret/f`, `rootfile` (0644) and `group0` (0640, group 0), all owned by root.
fn roots_files(vol: &Path) {
    std::fs::create_dir(vol.join("secret")).expect("mkdir");
    std::fs::set_permissions(vol.join("secret"), PermissionsExt::from_mode(0o700)).expect("chmod");
    std::fs::write(vol.join("secret/f"), b"root only").expect("write");
    for (name, m) in [("rootfile", 0o644), ("group0", 0o640)] {
        std::fs::write(vol.join(name), b"root's").expect("write");
        std::fs::set_permissions(vol.join(name), PermissionsExt::from_mode(m)).expect("chmod");
    }
}

#[tokio::test]
async fn ids_the_kernel_refuses_get_no_more_rights_than_the_anonymous_user() {
    let dir = tempfile::tempdir().expect("tempdir");
    squashed_volume(dir.path(), "sq", Squash::Root);
    let vol = dir.path().join("volumes/sq");
    roots_files(&vol);
    let node = Node::start(dir.path()).await;
    let root = Client::mount(node.port, "sq").await.root;

    // uid/gid 4294967295: setfsuid refuses it, which used to leave the call as root.
    let mut h = forged(node.port, u32::MAX, u32::MAX, &[u32::MAX], &root).await;
    let secret = h.lookup(&root, b"secret").await.expect("lookup secret");
    assert_eq!(
        h.lookup(&secret, b"f").await,
        Err(nfsstat3::NFS3ERR_ACCES),
        "LOOKUP inside root's 0700 directory"
    );
    let rootfile = h.lookup(&root, b"rootfile").await.expect("lookup");
    assert_eq!(
        h.setattr(&rootfile, mode(0o666)).await,
        Err(nfsstat3::NFS3ERR_PERM),
        "chmod of root's file"
    );
    assert_eq!(
        std::fs::metadata(vol.join("rootfile"))
            .expect("stat")
            .mode()
            & 0o7777,
        0o644
    );
    // What such a caller creates belongs to the anonymous ids.
    h.create(&root, b"by-max", 0o644).await.expect("create");
    let md = std::fs::metadata(vol.join("by-max")).expect("stat");
    assert_eq!((md.uid(), md.gid()), (5000, 5001));

    // Root squash also squashes group 0, primary or supplementary (as knfsd).
    let group0 = h.lookup(&root, b"group0").await.expect("lookup");
    for (gid, gids) in [(0, vec![]), (1000, vec![0])] {
        let mut c = forged(node.port, 1000, gid, &gids, &root).await;
        assert_eq!(
            c.read(&group0, 0, 10).await,
            Err(nfsstat3::NFS3ERR_ACCES),
            "group-0 file read by gid {gid} groups {gids:?}"
        );
        assert_eq!(
            c.lookup(&secret, b"f").await,
            Err(nfsstat3::NFS3ERR_ACCES),
            "gid {gid} groups {gids:?}"
        );
    }
}

/// Answers within 5 s, or the test fails saying what hung.
async fn prompt<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(5), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no reply within 5 s"))
}

#[tokio::test]
async fn special_files_never_block_a_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", 4 * MIB);
    let vol = dir.path().join("volumes/vol");
    let c_path =
        |n: &str| std::ffi::CString::new(vol.join(n).as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: valid C paths; the test runs as root (device nodes need it).
    unsafe {
        assert_eq!(libc::mkfifo(c_path("fifo").as_ptr(), 0o666), 0);
        assert_eq!(
            libc::mknod(
                c_path("null").as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(1, 3)
            ),
            0
        );
    }
    let _sock = std::os::unix::net::UnixListener::bind(vol.join("sock")).expect("socket");
    let node = Node::start(dir.path()).await;
    let root = Client::mount(node.port, "vol").await.root;

    // Many at once, each on its own connection: every one must answer, and
    // none may pin a worker (an open of a FIFO with no writer waits forever).
    let mut calls = Vec::new();
    for i in 0..8 {
        let root = root.clone();
        let port = node.port;
        calls.push(tokio::spawn(async move {
            let mut c = Client::connect(port, LOCAL, 1000, 1000, root.clone()).await;
            let name: &[u8] = [b"fifo".as_slice(), b"null", b"sock"][i % 3];
            let how = createhow3::UNCHECKED(sattr3 {
                size: Nfs3Option::Some(0),
                ..sattr3::default()
            });
            let fh = prompt(
                "CREATE UNCHECKED over a special file",
                c.create_how(&root, name, how),
            )
            .await
            .expect("an existing object is taken as it is");
            assert_eq!(
                prompt("READ", c.read(&fh, 0, 10)).await,
                Err(nfsstat3::NFS3ERR_INVAL)
            );
            assert_eq!(
                prompt("WRITE", c.write(&fh, 0, b"x", stable_how::FILE_SYNC))
                    .await
                    .map(drop),
                Err(nfsstat3::NFS3ERR_INVAL)
            );
            let size = sattr3 {
                size: Nfs3Option::Some(0),
                ..sattr3::default()
            };
            assert_eq!(
                prompt("SETATTR size", c.setattr(&fh, size)).await,
                Err(nfsstat3::NFS3ERR_INVAL)
            );
            prompt("COMMIT", c.commit(&fh))
                .await
                .expect_err("not a regular file");
        }));
    }
    for call in calls {
        call.await.expect("call task");
    }
    // GUARDED and EXCLUSIVE over them: EXIST, at once.
    let mut c = Client::mount(node.port, "vol").await;
    for name in [b"fifo".as_slice(), b"null", b"sock"] {
        let guarded = createhow3::GUARDED(sattr3::default());
        assert_eq!(
            prompt("CREATE GUARDED", c.create_how(&root, name, guarded)).await,
            Err(nfsstat3::NFS3ERR_EXIST)
        );
        let excl = createhow3::EXCLUSIVE(createverf3([1; 8]));
        assert_eq!(
            prompt("CREATE EXCLUSIVE", c.create_how(&root, name, excl)).await,
            Err(nfsstat3::NFS3ERR_EXIST)
        );
    }
    // And the server still answers everyone promptly.
    prompt("GETATTR", c.getattr(&root)).await.expect("getattr");
    let f = prompt("CREATE", c.create(&root, b"plain", 0o644))
        .await
        .expect("create");
    prompt("WRITE", c.write(&f, 0, b"ok", stable_how::FILE_SYNC))
        .await
        .expect("write");
}

#[tokio::test]
async fn listing_counts_are_clamped_to_the_servers_maximum() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", 4 * MIB);
    let vol = dir.path().join("volumes/vol");
    std::fs::create_dir(vol.join("big")).expect("mkdir");
    // 6,000 names of 200 bytes: about 1.7 MB of READDIR entries, more with attributes.
    let files = 6000;
    for i in 0..files {
        std::fs::write(vol.join("big").join(format!("{i:0>200}")), b"").expect("file");
    }
    let node = Node::start(dir.path()).await;
    let mut c = Client::mount(node.port, "vol").await;
    let root = c.root.clone();
    let big = c.lookup(&root, b"big").await.expect("lookup");
    let r = c
        .nfs
        .readdirplus(&READDIRPLUS3args {
            dir: big.clone(),
            cookie: 0,
            cookieverf: cookieverf3::default(),
            dircount: u32::MAX,
            maxcount: u32::MAX,
        })
        .await
        .expect("rpc");
    let Nfs3Result::Ok(ok) = r else {
        panic!("READDIRPLUS failed")
    };
    let n = ok.reply.entries.0.len();
    // An entry but `.` and `..` takes at least 200 + 24 bytes: at most 1 MiB of them.
    assert!(
        !ok.reply.eof && n > 0 && n <= 2 + (1 << 20) / 224,
        "{n} entries in one reply"
    );
    let r = c
        .nfs
        .readdir(&READDIR3args {
            dir: big.clone(),
            cookie: 0,
            cookieverf: cookieverf3::default(),
            count: u32::MAX,
        })
        .await
        .expect("rpc");
    let Nfs3Result::Ok(ok) = r else {
        panic!("READDIR failed")
    };
    let n = ok.reply.entries.0.len();
    assert!(
        !ok.reply.eof && n > 0 && n <= 2 + (1 << 20) / 224,
        "{n} entries in one reply"
    );
    // Paging still lists everything.
    assert_eq!(
        c.list(&big, true, u32::MAX).await.expect("list").len(),
        files + 2
    );
}

#[tokio::test]
async fn an_owners_truncate_of_a_read_only_file_leaves_writes_working_for_all() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", 4 * MIB);
    let node = Node::start(dir.path()).await;
    let mut owner = Client::mount_as(node.port, "vol", LOCAL, 1000, 1000).await;
    let root = owner.root.clone();
    // The owner may change the size of a file whose mode denies them writing
    // (RFC 1813 §4.4, as knfsd); their own rights cannot open it read-write.
    let f = owner.create(&root, b"ro", 0o444).await.expect("create");
    let size = sattr3 {
        size: Nfs3Option::Some(10),
        ..sattr3::default()
    };
    owner.setattr(&f, size).await.expect("owner sets the size");
    let mut root_c = Client::mount(node.port, "vol").await;
    root_c
        .write(&f, 0, b"by root", stable_how::FILE_SYNC)
        .await
        .expect("root writes after the owner's truncate");
    owner
        .write(&f, 7, b"!", stable_how::FILE_SYNC)
        .await
        .expect("the owner writes too");
    assert_eq!(
        root_c.read(&f, 0, 100).await.expect("read"),
        b"by root!\0\0"
    );
    // A caller without the right is refused, and that changes nothing for others.
    let mut other = Client::connect(node.port, LOCAL, 2000, 2000, root.clone()).await;
    assert_eq!(
        other
            .write(&f, 0, b"x", stable_how::FILE_SYNC)
            .await
            .map(drop),
        Err(nfsstat3::NFS3ERR_ACCES)
    );
    root_c
        .write(&f, 0, b"B", stable_how::UNSTABLE)
        .await
        .expect("still writable");
}

/// `strace` attached to the node, recording its fsync-family calls.
struct FsyncTrace {
    child: std::process::Child,
    log: tempfile::NamedTempFile,
    /// Calls that answered without syncing anything.
    unsynced: std::cell::RefCell<Vec<String>>,
}

impl FsyncTrace {
    fn attach(pid: u32) -> FsyncTrace {
        let log = tempfile::NamedTempFile::new().expect("log file");
        let child = std::process::Command::new("strace")
            .args(["-f", "-qq", "-e", "trace=fsync,fdatasync,syncfs,sync", "-o"])
            .arg(log.path())
            .args(["-p", &pid.to_string()])
            .spawn()
            .unwrap_or_else(|e| panic!("strace runs (apt-get install strace): {e}"));
        // Attaching to every thread takes a moment.
        std::thread::sleep(Duration::from_millis(1500));
        FsyncTrace {
            child,
            log,
            unsynced: Default::default(),
        }
    }

    fn count(&self) -> usize {
        std::fs::read_to_string(self.log.path())
            .expect("read trace")
            .lines()
            .filter(|l| l.contains("sync(") && l.contains("= 0"))
            .count()
    }

    /// Runs `call` and notes it in `unsynced` if the node synced nothing before answering.
    async fn synced<T>(&self, what: &str, call: impl std::future::Future<Output = T>) -> T {
        let before = self.count();
        let out = call.await;
        // The fsync returned before the reply was sent; give strace time to print it.
        std::thread::sleep(Duration::from_millis(300));
        if self.count() == before {
            self.unsynced.borrow_mut().push(what.to_owned());
        }
        out
    }
}

impl Drop for FsyncTrace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dirop<'a>(dir: &nfs_fh3, name: &'a [u8]) -> diropargs3<'a> {
    diropargs3 {
        dir: dir.clone(),
        name: filename3(Opaque::borrowed(name)),
    }
}

#[tokio::test]
async fn namespace_changes_are_synced_before_the_reply() {
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir on a disk");
    create_volume(dir.path(), "vol", 4 * MIB);
    let node = Node::start(dir.path()).await;
    let mut c = Client::mount(node.port, "vol").await;
    let root = c.root.clone();
    let t = FsyncTrace::attach(node.pid());

    let f = t
        .synced("CREATE", c.create(&root, b"f", 0o644))
        .await
        .expect("create");
    let d = t
        .synced("MKDIR", c.mkdir(&root, b"d"))
        .await
        .expect("mkdir");
    let r = t
        .synced(
            "SYMLINK",
            c.nfs.symlink(&SYMLINK3args {
                where_: dirop(&root, b"l"),
                symlink: symlinkdata3 {
                    symlink_attributes: sattr3::default(),
                    symlink_data: nfspath3(Opaque::borrowed(b"f")),
                },
            }),
        )
        .await
        .expect("rpc");
    assert!(matches!(r, Nfs3Result::Ok(_)), "SYMLINK");
    let r = t
        .synced(
            "MKNOD",
            c.nfs.mknod(&MKNOD3args {
                where_: dirop(&root, b"p"),
                what: mknoddata3::NF3FIFO(sattr3::default()),
            }),
        )
        .await
        .expect("rpc");
    assert!(matches!(r, Nfs3Result::Ok(_)), "MKNOD");
    let r = t
        .synced(
            "LINK",
            c.nfs.link(&LINK3args {
                file: f.clone(),
                link: dirop(&d, b"g"),
            }),
        )
        .await
        .expect("rpc");
    assert!(matches!(r, Nfs3Result::Ok(_)), "LINK");
    let r = t
        .synced(
            "RENAME",
            c.nfs.rename(&RENAME3args {
                from: dirop(&root, b"f"),
                to: dirop(&d, b"h"),
            }),
        )
        .await
        .expect("rpc");
    assert!(matches!(r, Nfs3Result::Ok(_)), "RENAME");
    t.synced("SETATTR", c.setattr(&f, mode(0o600)))
        .await
        .expect("setattr");
    t.synced("REMOVE", c.remove(&d, b"g"))
        .await
        .expect("remove");
    t.synced("REMOVE", c.remove(&d, b"h"))
        .await
        .expect("remove");
    let r = t
        .synced(
            "RMDIR",
            c.nfs.rmdir(&RMDIR3args {
                object: dirop(&root, b"d"),
            }),
        )
        .await
        .expect("rpc");
    assert!(matches!(r, Nfs3Result::Ok(_)), "RMDIR");
    assert_eq!(
        *t.unsynced.borrow(),
        Vec::<String>::new(),
        "replied before syncing"
    );
}

/// Bytes the files under `dir` really spend on the disk (each inode once).
fn allocated(dir: &Path) -> u64 {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir") {
            let e = e.expect("entry");
            let md = e.metadata().expect("stat");
            if md.is_dir() {
                stack.push(e.path());
            }
            if seen.insert(md.ino()) {
                total += md.blocks() * 512;
            }
        }
    }
    total
}

#[tokio::test]
async fn many_small_files_cannot_spend_more_disk_than_the_volume_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limit = 256 * 1024;
    create_volume(dir.path(), "vol", limit);
    let node = Node::start(dir.path()).await;
    let mut c = Client::mount(node.port, "vol").await;
    let root = c.root.clone();
    // One byte each: 100 bytes by size, but every file spends a 4 KiB block.
    let mut refused = None;
    for i in 0..100 {
        let name = format!("f{i}");
        let r = match c.create(&root, name.as_bytes(), 0o644).await {
            Ok(f) => c.write(&f, 0, b"x", stable_how::FILE_SYNC).await.map(drop),
            Err(s) => Err(s),
        };
        if let Err(s) = r {
            refused = Some((i, s));
            break;
        }
    }
    let (at, status) = refused.expect("a 256 KiB volume refuses 100 4-KiB files");
    assert_eq!(status, nfsstat3::NFS3ERR_DQUOT);
    assert!(at > 40, "refused too early, at file {at}");
    let spent = allocated(&dir.path().join("volumes/vol"));
    assert!(spent <= limit, "{spent} bytes on disk, limit {limit}");
    let st = c.fsstat().await.expect("fsstat");
    assert!(st.fbytes < 4096, "FSSTAT free {} after DQUOT", st.fbytes);
}

#[tokio::test]
async fn a_volume_holds_a_bounded_number_of_objects() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 1 MiB: the floor of 1,024 objects.
    create_volume(dir.path(), "vol", MIB);
    let node = Node::start(dir.path()).await;
    let mut c = Client::mount(node.port, "vol").await;
    let root = c.root.clone();
    let d = c.mkdir(&root, b"d").await.expect("mkdir");
    let mut made = 1;
    let last = loop {
        let name = format!("{made}");
        match c.create(&d, name.as_bytes(), 0o644).await {
            Ok(_) => made += 1,
            Err(s) => break s,
        }
        assert!(made <= 1024, "more than 1,024 objects in a 1 MiB volume");
    };
    assert_eq!((made, last), (1024, nfsstat3::NFS3ERR_DQUOT));
    // Freed objects can be made again.
    c.remove(&d, b"1").await.expect("remove");
    c.create(&d, b"again", 0o644)
        .await
        .expect("room for one again");
}

#[tokio::test]
async fn a_class_object_limit_replaces_the_default_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 1 GiB would allow 262,144 objects by default; the class says 10 (`maxFiles`).
    let spec = VolumeSpec {
        max_files: Some(10),
        ..VolumeSpec::new(VolumeName::new("few").expect("name"), 1 << 30)
    };
    create_volume_with(dir.path(), &spec);
    let node = Node::start(dir.path()).await;
    let mut c = Client::mount(node.port, "few").await;
    let root = c.root.clone();
    let d = c.mkdir(&root, b"d").await.expect("mkdir");
    let mut made = 1;
    let last = loop {
        match c.create(&d, made.to_string().as_bytes(), 0o644).await {
            Ok(_) => made += 1,
            Err(s) => break s,
        }
        assert!(made <= 10, "more than maxFiles objects");
    };
    assert_eq!((made, last), (10, nfsstat3::NFS3ERR_DQUOT));
    assert_eq!(
        c.mkdir(&d, b"sub").await.err(),
        Some(nfsstat3::NFS3ERR_DQUOT),
        "directories count too"
    );
}

#[tokio::test]
async fn racing_links_removes_renames_and_writes_keep_usage_equal_to_the_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", 64 * MIB);
    let node = Node::start(dir.path()).await;
    let root = Client::mount(node.port, "vol").await.root;
    let mut tasks = Vec::new();
    for t in 0..4u32 {
        let root = root.clone();
        let port = node.port;
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(port, LOCAL, 0, 0, root.clone()).await;
            for i in 0..40u32 {
                let name = format!("t{t}-{i}");
                let Ok(f) = c.create(&root, name.as_bytes(), 0o644).await else {
                    continue;
                };
                let _ = c
                    .write(&f, u64::from(i) * 512, &[7u8; 9000], stable_how::UNSTABLE)
                    .await;
                // Shared names: every client links, renames over and removes them.
                let _ = c
                    .nfs
                    .link(&LINK3args {
                        file: f.clone(),
                        link: dirop(&root, b"shared"),
                    })
                    .await;
                let _ = c.remove(&root, b"shared").await;
                if i % 2 == 1 {
                    let _ = c
                        .nfs
                        .rename(&RENAME3args {
                            from: dirop(&root, name.as_bytes()),
                            to: dirop(&root, b"over"),
                        })
                        .await;
                }
                if i % 5 == 0 {
                    let _ = c.remove(&root, b"over").await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let mut c = Client::mount(node.port, "vol").await;
    let st = c.fsstat().await.expect("fsstat");
    let vol = dir.path().join("volumes/vol");
    assert_eq!(
        st.tbytes - st.fbytes,
        on_disk(&vol).0,
        "usage drifted from the disk"
    );
}
