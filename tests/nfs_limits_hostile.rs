//! Hostile callers against the volume's limits and permissions (issue 22): creates
//! whose ownership step fails, truncates and writes racing a remove, READDIRPLUS of a
//! directory the caller may read but not search, and set-id clearing racing an
//! owner's chmod. Each test drives the real `localnfs node` binary with raw RPC from
//! the `nfs3_client` crate and forged AUTH_SYS credentials.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::{Duration, Instant};

use nfs3_types::nfs3::*;
use nfs3_types::xdr_codec::Opaque;
use support::nfs::*;

const MIB: u64 = 1 << 20;

fn dirop<'a>(dir: &nfs_fh3, name: &'a [u8]) -> diropargs3<'a> {
    diropargs3 {
        dir: dir.clone(),
        name: filename3(Opaque::borrowed(name)),
    }
}

/// Attributes asking for root as the owner (what an ordinary uid may not give away).
fn owned_by_root(mode: u32) -> sattr3 {
    sattr3 {
        mode: Nfs3Option::Some(mode),
        uid: Nfs3Option::Some(0),
        ..sattr3::default()
    }
}

fn mode(m: u32) -> sattr3 {
    sattr3 {
        mode: Nfs3Option::Some(m),
        ..sattr3::default()
    }
}

/// What the server says the volume uses (FSSTAT: size minus free).
async fn usage(c: &mut Client) -> u64 {
    let st = c.fsstat().await.expect("fsstat");
    st.tbytes - st.fbytes
}

/// One of each make call, by a caller asking for an owner it may not give away.
async fn make_owned_by_root(c: &mut Client, dir: &nfs_fh3, kind: usize, name: &[u8]) -> nfsstat3 {
    let (at, nfs) = (dirop(dir, name), &mut c.nfs);
    match kind {
        0 => {
            status(nfs.mkdir(&MKDIR3args {
                where_: at,
                attributes: owned_by_root(0o755),
            }))
            .await
        }
        1 => {
            status(nfs.create(&CREATE3args {
                where_: at,
                how: createhow3::GUARDED(owned_by_root(0o644)),
            }))
            .await
        }
        2 => {
            status(nfs.symlink(&SYMLINK3args {
                where_: at,
                symlink: symlinkdata3 {
                    symlink_attributes: owned_by_root(0o777),
                    symlink_data: nfspath3(Opaque::borrowed(b"target")),
                },
            }))
            .await
        }
        _ => {
            status(nfs.mknod(&MKNOD3args {
                where_: at,
                what: mknoddata3::NF3FIFO(owned_by_root(0o644)),
            }))
            .await
        }
    }
}

/// The status of a call's reply.
async fn status<T, E, F: std::fmt::Debug>(
    call: impl std::future::Future<Output = Result<Nfs3Result<T, E>, F>>,
) -> nfsstat3 {
    match call.await.expect("rpc") {
        Nfs3Result::Ok(_) => nfsstat3::NFS3_OK,
        Nfs3Result::Err((s, _)) => s,
    }
}

#[tokio::test]
async fn a_create_refused_for_its_owner_leaves_nothing_uncounted() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 1 MiB: at most 1,024 objects.
    create_volume(dir.path(), "vol", MIB);
    let vol = dir.path().join("volumes/vol");
    let node = Node::start(dir.path()).await;
    let root = Client::mount(node.port, "vol").await.root;
    let mut c = Client::connect(node.port, LOCAL, 1000, 1000, root.clone()).await;
    // More refused makes than the volume may hold objects, of every kind.
    for i in 0..1100usize {
        let name = format!("n{i}");
        let s = make_owned_by_root(&mut c, &root, i % 4, name.as_bytes()).await;
        assert_eq!(s, nfsstat3::NFS3ERR_PERM, "make {i} (kind {})", i % 4);
    }
    assert_eq!(
        on_disk(&vol),
        (0, 0),
        "refused creates left objects in the volume"
    );
    assert_eq!(usage(&mut c).await, 0, "usage after refused creates");
    // The object count came back too: the volume still takes all 1,024 of its own.
    let d = c.mkdir(&root, b"d").await.expect("mkdir");
    for i in 1..1024 {
        c.create(&d, format!("{i}").as_bytes(), 0o644)
            .await
            .unwrap_or_else(|s| panic!("create {i} of 1,024: {s:?}"));
    }
    assert_eq!(
        c.create(&d, b"one-too-many", 0o644).await,
        Err(nfsstat3::NFS3ERR_DQUOT)
    );
}

#[tokio::test]
async fn a_create_with_a_size_is_charged_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", 64 * MIB);
    let vol = dir.path().join("volumes/vol");
    let node = Node::start(dir.path()).await;
    let mut c = Client::mount(node.port, "vol").await;
    let root = c.root.clone();
    for (i, how) in [
        createhow3::UNCHECKED(sattr3 {
            size: Nfs3Option::Some(8 * MIB),
            ..mode(0o644)
        }),
        createhow3::GUARDED(sattr3 {
            size: Nfs3Option::Some(4 * MIB),
            ..mode(0o644)
        }),
    ]
    .into_iter()
    .enumerate()
    {
        c.create_how(&root, format!("sized{i}").as_bytes(), how)
            .await
            .expect("create with a size");
    }
    assert_eq!(
        usage(&mut c).await,
        on_disk(&vol).0,
        "usage against the disk"
    );
}

#[tokio::test]
async fn a_truncate_or_write_racing_a_remove_keeps_usage_equal_to_the_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limit = 64 * MIB;
    create_volume(dir.path(), "vol", limit);
    let vol = dir.path().join("volumes/vol");
    let node = Node::start(dir.path()).await;
    let mut c = Client::mount(node.port, "vol").await;
    let root = c.root.clone();
    // A file that stays, so a usage released twice shows instead of stopping at zero.
    let keep = c.create(&root, b"keep", 0o644).await.expect("create");
    for at in 0..4 {
        c.write(
            &keep,
            at * MIB,
            &vec![1u8; MIB as usize],
            stable_how::UNSTABLE,
        )
        .await
        .expect("write");
    }
    let mut a = Client::connect(node.port, LOCAL, 0, 0, root.clone()).await;
    let mut b = Client::connect(node.port, LOCAL, 0, 0, root.clone()).await;
    let mut w = Client::connect(node.port, LOCAL, 0, 0, root.clone()).await;
    let data = vec![2u8; 512 * 1024];
    let start = Instant::now();
    for i in 0..300 {
        if start.elapsed() > Duration::from_secs(30) {
            break;
        }
        let name = format!("f{i}");
        let f = c
            .create(&root, name.as_bytes(), 0o644)
            .await
            .expect("create");
        c.write(&f, 0, &data, stable_how::UNSTABLE)
            .await
            .expect("write");
        let truncate = sattr3 {
            size: Nfs3Option::Some(0),
            ..sattr3::default()
        };
        let (_, removed, _) = tokio::join!(
            a.setattr(&f, truncate),
            b.remove(&root, name.as_bytes()),
            w.write(&f, 0, &data, stable_how::UNSTABLE),
        );
        removed.expect("remove");
    }
    let (bytes, _) = on_disk(&vol);
    assert_eq!(usage(&mut c).await, bytes, "usage drifted from the disk");
    assert!(bytes <= limit);
}

#[tokio::test]
async fn readdirplus_gives_no_handles_in_a_directory_the_caller_cannot_search() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", 4 * MIB);
    let vol = dir.path().join("volumes/vol");
    // Root's directory: others may list it but not search it (as `ls` but not `cat`).
    std::fs::create_dir(vol.join("listed")).expect("mkdir");
    std::fs::write(vol.join("listed/secret"), b"root's data").expect("write");
    std::fs::set_permissions(vol.join("listed"), PermissionsExt::from_mode(0o744)).expect("chmod");
    let node = Node::start(dir.path()).await;
    let root = Client::mount(node.port, "vol").await.root;
    let mut c = Client::connect(node.port, LOCAL, 1000, 1000, root.clone()).await;
    let listed = c.lookup(&root, b"listed").await.expect("lookup");
    assert_eq!(
        c.lookup(&listed, b"secret").await,
        Err(nfsstat3::NFS3ERR_ACCES),
        "LOOKUP without search permission"
    );
    let entries = first_page(&mut c, &listed).await;
    let names: Vec<&[u8]> = entries.iter().map(|e| &e.name[..]).collect();
    assert!(
        names.contains(&&b"secret"[..]),
        "names are listed: {names:?}"
    );
    // The file first: what a handle for it gave before is its data.
    let mut entries = entries;
    entries.sort_by_key(|e| e.name != b"secret");
    for e in &entries {
        let name = String::from_utf8_lossy(&e.name);
        if let Some(fh) = &e.handle {
            let read = c.read(fh, 0, 100).await;
            panic!("READDIRPLUS handed out a handle for {name}; READ through it: {read:?}");
        }
        assert!(
            !e.attributes,
            "attributes of {name} in a directory the caller cannot search"
        );
    }
    // With search permission, the entries come with handles again.
    let mut owner = Client::connect(node.port, LOCAL, 0, 0, root.clone()).await;
    let secret = first_page(&mut owner, &listed)
        .await
        .into_iter()
        .find(|e| e.name == b"secret")
        .expect("secret listed");
    assert!(secret.handle.is_some() && secret.attributes);
}

/// One READDIRPLUS entry, as far as these tests look at it.
struct Entry {
    name: Vec<u8>,
    attributes: bool,
    handle: Option<nfs_fh3>,
}

/// The first page of a READDIRPLUS listing of `dir` (8 KiB: all of a small directory).
async fn first_page(c: &mut Client, dir: &nfs_fh3) -> Vec<Entry> {
    let r = c
        .nfs
        .readdirplus(&READDIRPLUS3args {
            dir: dir.clone(),
            cookie: 0,
            cookieverf: cookieverf3::default(),
            dircount: 8192,
            maxcount: 8192,
        })
        .await
        .expect("rpc");
    let Nfs3Result::Ok(ok) = r else {
        panic!("READDIRPLUS of a readable directory: {r:?}");
    };
    ok.reply
        .entries
        .0
        .into_iter()
        .map(|e| Entry {
            name: e.name.0.to_vec(),
            attributes: matches!(e.name_attributes, Nfs3Option::Some(_)),
            handle: match e.name_handle {
                Nfs3Option::Some(fh) => Some(fh),
                Nfs3Option::None => None,
            },
        })
        .collect()
}

#[tokio::test]
async fn set_id_clearing_after_a_write_never_undoes_the_owners_chmod() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", 64 * MIB);
    let vol = dir.path().join("volumes/vol");
    let node = Node::start(dir.path()).await;
    let root = Client::mount(node.port, "vol").await.root;
    let mut owner = Client::connect(node.port, LOCAL, 1000, 1000, root.clone()).await;
    let mut writer = Client::connect(node.port, LOCAL, 2000, 2000, root.clone()).await;
    let f = owner.create(&root, b"f", 0o644).await.expect("create");
    let data = vec![3u8; 256 * 1024];
    let start = Instant::now();
    let mut undone = Vec::new();
    for i in 0..300 {
        if start.elapsed() > Duration::from_secs(40) {
            break;
        }
        // Set-id bits, writable by anyone: a write by another uid clears them.
        owner.setattr(&f, mode(0o6777)).await.expect("chmod");
        let (wrote, chmod) = tokio::join!(
            writer.write(&f, 0, &data, stable_how::UNSTABLE),
            owner.setattr(&f, mode(0o666)),
        );
        wrote.expect("write");
        chmod.expect("owner's chmod");
        // Whichever ran first, the owner's chmod asked for no set-id bits and no
        // execute bits, and nothing may put them back.
        let m = std::fs::metadata(vol.join("f")).expect("stat").mode() & 0o7777;
        if m != 0o666 {
            undone.push((i, format!("{m:o}")));
        }
    }
    assert_eq!(undone, Vec::new(), "(try, mode) where the chmod was undone");
}
