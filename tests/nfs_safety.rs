//! What keeps data safe, tested against the real `localnfs node` binary: handles that
//! survive restarts, acknowledged data on disk, the jail, size limits and caller
//! identity.

mod support;

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use localnfs::volume::{Squash, VolumeName, VolumeSpec};
use nfs3_types::nfs3::*;
use nfs3_types::xdr_codec::Opaque;
use support::nfs::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

#[tokio::test]
async fn restart_keeps_handles_valid() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", 16 * MIB);
    let mut node = Node::start(dir.path()).await;
    let mut c = Client::mount(node.port, "vol").await;
    let root = c.root.clone();
    let d = c.mkdir(&root, b"d").await.expect("mkdir");
    let f = c.create(&d, b"f", 0o644).await.expect("create");
    c.write(&f, 0, b"survives", stable_how::FILE_SYNC)
        .await
        .expect("write");

    node.kill9_and_restart().await;

    // A new connection, no new MOUNT: exactly what a kernel client does after the
    // server comes back.
    let mut c = Client::connect(node.port, LOCAL, 0, 0, root.clone()).await;
    c.getattr(&root).await.expect("root handle still valid");
    c.getattr(&d).await.expect("directory handle still valid");
    assert_eq!(
        c.read(&f, 0, 100).await.expect("file handle still valid"),
        b"survives"
    );
    assert_eq!(
        c.lookup(&d, b"f").await.expect("lookup"),
        f,
        "same handle after restart"
    );
}

#[tokio::test]
async fn acknowledged_writes_are_on_disk_after_sigkill_and_the_verifier_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", 16 * MIB);
    let mut node = Node::start(dir.path()).await;
    let mut c = Client::mount(node.port, "vol").await;
    let root = c.root.clone();
    let f = c.create(&root, b"db", 0o644).await.expect("create");
    let a = vec![0xaa; 256 * 1024];
    let b = vec![0xbb; 256 * 1024];
    let w = c
        .write(&f, 0, &a, stable_how::FILE_SYNC)
        .await
        .expect("sync write");
    assert_eq!(
        w.committed,
        stable_how::FILE_SYNC,
        "FILE_SYNC must be acknowledged as such"
    );
    let w = c
        .write(&f, a.len() as u64, &b, stable_how::UNSTABLE)
        .await
        .expect("write");
    let verf_before = c.commit(&f).await.expect("commit");
    assert_eq!(w.verf, verf_before);

    node.kill9_and_restart().await;

    let on_disk = std::fs::read(dir.path().join("volumes/vol/db")).expect("read file");
    assert_eq!(on_disk.len(), a.len() + b.len());
    assert!(on_disk[..a.len()] == a[..] && on_disk[a.len()..] == b[..]);
    let mut c = Client::connect(node.port, LOCAL, 0, 0, root).await;
    let w = c
        .write(&f, 0, b"x", stable_how::UNSTABLE)
        .await
        .expect("write after restart");
    assert_ne!(
        w.verf, verf_before,
        "clients could not tell they must resend unstable writes"
    );
}

#[tokio::test]
async fn dotdot_at_the_root_and_names_with_slashes_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", MIB);
    let node = Node::start(dir.path()).await;
    let mut c = Client::mount(node.port, "vol").await;
    let root = c.root.clone();
    assert_eq!(c.lookup(&root, b"..").await, Err(nfsstat3::NFS3ERR_ACCES));
    let sub = c.mkdir(&root, b"sub").await.expect("mkdir");
    assert_eq!(
        c.lookup(&sub, b"..")
            .await
            .expect("parent inside the volume"),
        root
    );
    for bad in [&b"../volumes"[..], b"sub/..", b"/etc", b"a\0b"] {
        let r = c.lookup(&root, bad).await;
        assert_eq!(
            r,
            Err(nfsstat3::NFS3ERR_ACCES),
            "{}",
            String::from_utf8_lossy(bad)
        );
        assert!(c.create(&root, bad, 0o644).await.is_err());
    }
    assert_eq!(
        c.lookup(&root, &[b'a'; 256]).await,
        Err(nfsstat3::NFS3ERR_NAMETOOLONG)
    );
}

#[tokio::test]
async fn symlinks_are_never_followed_by_the_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", MIB);
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).expect("mkdir");
    std::fs::write(outside.join("secret"), b"do not read").expect("canary");
    let vol = dir.path().join("volumes/vol");
    std::os::unix::fs::symlink(&outside, vol.join("esc")).expect("symlink");
    std::os::unix::fs::symlink(outside.join("secret"), vol.join("file-esc")).expect("symlink");
    let node = Node::start(dir.path()).await;
    let mut c = Client::mount(node.port, "vol").await;
    let root = c.root.clone();

    let esc = c.lookup(&root, b"esc").await.expect("the link itself");
    assert_eq!(c.getattr(&esc).await.expect("attrs").type_, ftype3::NF3LNK);
    assert_eq!(
        c.lookup(&esc, b"secret").await,
        Err(nfsstat3::NFS3ERR_NOTDIR)
    );
    assert_eq!(
        c.create(&esc, b"planted", 0o644).await,
        Err(nfsstat3::NFS3ERR_NOTDIR)
    );
    assert_eq!(
        c.list(&esc, false, 4096).await,
        Err(nfsstat3::NFS3ERR_NOTDIR)
    );
    let file_esc = c.lookup(&root, b"file-esc").await.expect("the link itself");
    assert_eq!(
        c.read(&file_esc, 0, 100).await,
        Err(nfsstat3::NFS3ERR_INVAL)
    );
    assert!(
        c.write(&file_esc, 0, b"x", stable_how::FILE_SYNC)
            .await
            .is_err()
    );
    // Links the client makes are stored, not followed either.
    assert!(c.create(&root, b"esc", 0o644).await.is_err());
    assert_eq!(
        std::fs::read(outside.join("secret")).expect("canary"),
        b"do not read"
    );
    assert_eq!(
        std::fs::read_dir(&outside).expect("ls").count(),
        1,
        "something was created outside"
    );
}

#[tokio::test]
async fn handles_of_a_volume_not_granted_to_the_client_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "a", MIB);
    create_volume(dir.path(), "b", MIB);
    // `a` is served to 127.0.0.2 only; `b` to every allow-listed client.
    std::fs::write(dir.path().join("access.json"), br#"{"a": ["127.0.0.2"]}"#).expect("grants");
    let node = Node::start(dir.path()).await;
    let mut owner = Client::mount_as(node.port, "a", ip(2), 0, 0).await;
    let a_root = owner.root.clone();
    let secret = owner
        .create(&a_root, b"secret", 0o644)
        .await
        .expect("create");
    owner
        .write(&secret, 0, b"tenant a", stable_how::FILE_SYNC)
        .await
        .expect("write");

    assert!(
        mount(node.port, "a", ip(3), 0, 0).await.is_err(),
        "MNT of a volume not granted to the client"
    );
    let mut other = Client::mount_as(node.port, "b", ip(3), 0, 0).await;
    assert_eq!(
        other.getattr(&a_root).await.err(),
        Some(nfsstat3::NFS3ERR_ACCES)
    );
    assert_eq!(
        other.read(&secret, 0, 100).await,
        Err(nfsstat3::NFS3ERR_ACCES)
    );
    assert_eq!(
        other.lookup(&a_root, b"secret").await,
        Err(nfsstat3::NFS3ERR_ACCES)
    );
    // Its own volume works.
    let b_root = other.root.clone();
    other.getattr(&b_root).await.expect("own volume");
}

#[tokio::test]
async fn forged_truncated_or_altered_handles_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", MIB);
    let node = Node::start(dir.path()).await;
    let mut c = Client::mount(node.port, "vol").await;
    let root = c.root.clone();
    let f = c.create(&root, b"f", 0o644).await.expect("create");
    let wire = f.data.to_vec();
    for i in 0..wire.len() {
        let mut bad = wire.clone();
        bad[i] ^= 0x01;
        let fh = nfs_fh3 {
            data: Opaque::owned(bad),
        };
        assert_eq!(
            c.getattr(&fh).await.err(),
            Some(nfsstat3::NFS3ERR_BADHANDLE),
            "byte {i}"
        );
    }
    for cut in [0, 1, wire.len() / 2, wire.len() - 1] {
        let fh = nfs_fh3 {
            data: Opaque::owned(wire[..cut].to_vec()),
        };
        assert_eq!(
            c.getattr(&fh).await.err(),
            Some(nfsstat3::NFS3ERR_BADHANDLE),
            "cut {cut}"
        );
    }
    // A handle for a file that was deleted is stale, not someone else's file.
    c.remove(&root, b"f").await.expect("remove");
    assert_eq!(c.getattr(&f).await.err(), Some(nfsstat3::NFS3ERR_STALE));
}

#[tokio::test]
async fn writes_past_the_volume_size_fail_with_dquot_and_keep_earlier_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", MIB);
    let mut node = Node::start(dir.path()).await;
    let mut c = Client::mount(node.port, "vol").await;
    let root = c.root.clone();
    let f = c.create(&root, b"f", 0o644).await.expect("create");
    let first = vec![7u8; 768 * 1024];
    c.write(&f, 0, &first, stable_how::FILE_SYNC)
        .await
        .expect("fits");
    let over = c
        .write(
            &f,
            first.len() as u64,
            &vec![8u8; 512 * 1024],
            stable_how::FILE_SYNC,
        )
        .await;
    assert_eq!(over.err(), Some(nfsstat3::NFS3ERR_DQUOT));
    assert_eq!(
        c.read(&f, 0, MIB as u32).await.expect("read"),
        first,
        "earlier data damaged"
    );
    let g = c.create(&root, b"g", 0o644).await.expect("create");
    let r = c
        .nfs
        .setattr(&SETATTR3args {
            object: g.clone(),
            new_attributes: sattr3 {
                size: Nfs3Option::Some(MIB),
                ..sattr3::default()
            },
            guard: Nfs3Option::None,
        })
        .await
        .expect("rpc");
    assert!(
        matches!(r, Nfs3Result::Err((nfsstat3::NFS3ERR_DQUOT, _))),
        "truncate up past the limit: {r:?}"
    );

    let st = c.fsstat().await.expect("fsstat");
    assert_eq!(
        (st.tbytes, st.fbytes, st.abytes),
        (MIB, 256 * KIB, 256 * KIB)
    );

    // Usage is recomputed from disk after a restart.
    node.kill9_and_restart().await;
    let mut c = Client::connect(node.port, LOCAL, 0, 0, root.clone()).await;
    assert_eq!(c.fsstat().await.expect("fsstat").fbytes, 256 * KIB);

    // Deleting frees space; growing the volume takes effect without a remount.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_localnfs"))
        .args(["volume", "--root"])
        .arg(dir.path())
        .args(["resize", "vol", "--size", "2Mi"])
        .output()
        .expect("localnfs volume resize");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    support::eventually("new size visible", Duration::from_secs(10), || async {
        let mut c = Client::connect(node.port, LOCAL, 0, 0, root.clone()).await;
        (c.fsstat().await.ok()?.tbytes == 2 * MIB).then_some(())
    })
    .await;
    c.write(
        &f,
        first.len() as u64,
        &vec![8u8; 512 * 1024],
        stable_how::FILE_SYNC,
    )
    .await
    .expect("fits after resize");
    c.remove(&root, b"f").await.expect("remove");
    assert_eq!(c.fsstat().await.expect("fsstat").fbytes, 2 * MIB);
}

#[tokio::test]
async fn files_are_created_as_the_caller_and_chown_follows_unix_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", MIB);
    let node = Node::start(dir.path()).await;
    let vol = dir.path().join("volumes/vol");
    let mut user = Client::mount_as(node.port, "vol", LOCAL, 999, 999).await;
    let root = user.root.clone();
    let f = user
        .create(&root, b"f", 0o640)
        .await
        .expect("create as 999");
    user.mkdir(&root, b"d").await.expect("mkdir as 999");
    let r = user
        .nfs
        .symlink(&SYMLINK3args {
            where_: diropargs3 {
                dir: root.clone(),
                name: filename3(Opaque::borrowed(b"l")),
            },
            symlink: symlinkdata3 {
                symlink_attributes: sattr3::default(),
                symlink_data: nfspath3(Opaque::borrowed(b"f")),
            },
        })
        .await
        .expect("rpc");
    assert!(matches!(r, Nfs3Result::Ok(_)));
    for name in ["f", "d", "l"] {
        let md = std::fs::symlink_metadata(vol.join(name)).expect("stat");
        assert_eq!((md.uid(), md.gid()), (999, 999), "{name}");
    }
    assert_eq!(
        std::fs::metadata(vol.join("f")).expect("stat").mode() & 0o777,
        0o640
    );

    // A user cannot give files away; root can (database images chown their data dir).
    let give = sattr3 {
        uid: Nfs3Option::Some(0),
        ..sattr3::default()
    };
    assert_eq!(user.setattr(&f, give).await, Err(nfsstat3::NFS3ERR_PERM));
    let mut root_c = Client::mount(node.port, "vol").await;
    let take = sattr3 {
        uid: Nfs3Option::Some(1234),
        gid: Nfs3Option::Some(4321),
        ..sattr3::default()
    };
    root_c.setattr(&f, take).await.expect("root chowns");
    let md = std::fs::metadata(vol.join("f")).expect("stat");
    assert_eq!((md.uid(), md.gid()), (1234, 4321));

    // 999 no longer owns f (0640, group 4321): reading is now refused by the kernel.
    assert_eq!(user.read(&f, 0, 10).await, Err(nfsstat3::NFS3ERR_ACCES));
}

#[tokio::test]
async fn access_answers_from_mode_bits_and_the_caller() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", MIB);
    let node = Node::start(dir.path()).await;
    let mut owner = Client::mount_as(node.port, "vol", LOCAL, 999, 50).await;
    let root = owner.root.clone();
    let f = owner.create(&root, b"f", 0o640).await.expect("create");
    let rw = ACCESS3_READ | ACCESS3_MODIFY | ACCESS3_EXTEND;
    for (uid, gid, want) in [
        (999, 50, rw),
        (1000, 50, ACCESS3_READ),
        (1000, 1000, 0),
        (0, 0, rw),
    ] {
        let mut c = Client::connect(node.port, LOCAL, uid, gid, root.clone()).await;
        let r = c
            .nfs
            .access(&ACCESS3args {
                object: f.clone(),
                access: 0x3f,
            })
            .await
            .expect("rpc");
        let Nfs3Result::Ok(ok) = r else {
            panic!("ACCESS failed for {uid}")
        };
        assert_eq!(ok.access, want, "uid {uid} gid {gid}");
    }
}

#[tokio::test]
async fn squash_maps_root_or_everyone_to_the_anonymous_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, squash) in [("sq-root", Squash::Root), ("sq-all", Squash::All)] {
        let spec = VolumeSpec {
            squash,
            anon_uid: 5000,
            anon_gid: 5001,
            ..VolumeSpec::new(VolumeName::new(name).expect("name"), MIB)
        };
        create_volume_with(dir.path(), &spec);
    }
    let node = Node::start(dir.path()).await;
    let owner = |vol: &str, file: &str| {
        let md = std::fs::metadata(dir.path().join("volumes").join(vol).join(file)).expect("stat");
        (md.uid(), md.gid())
    };
    let cases = [
        ("sq-root", 0, (5000, 5001)),
        ("sq-root", 999, (999, 999)),
        ("sq-all", 999, (5000, 5001)),
        ("sq-all", 0, (5000, 5001)),
    ];
    for (vol, uid, want) in cases {
        let mut c = Client::mount_as(node.port, vol, LOCAL, uid, uid).await;
        let root = c.root.clone();
        let name = format!("by-{uid}");
        c.create(&root, name.as_bytes(), 0o644)
            .await
            .expect("create");
        assert_eq!(owner(vol, &name), want, "{vol} as {uid}");
    }
}
