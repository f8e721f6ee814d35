//! NFSv3 and MOUNT v3 over RPC against the crate's server in this process (no binary,
//! no cluster): the procedures a mounted pod uses, each checked for the answer a
//! client sees. The refusals (size limit, forged handles, ports) are in `refusals.rs`.

mod support;

use std::collections::HashSet;

use nfs3_client::MountError;
use nfs3_types::mount::{dirpath, mountstat3};
use nfs3_types::nfs3::*;
use nfs3_types::xdr_codec::Opaque;
use support::{MIB, Served};

#[tokio::test]
async fn mount_lists_mounts_and_unmounts() {
    let server = Served::start(&[("vol", MIB), ("other", MIB)]).await;
    let mut m = server.mount_client().await;
    m.null().await.expect("MOUNT NULL");
    let mut exported: Vec<String> = m
        .export()
        .await
        .expect("EXPORT")
        .0
        .iter()
        .map(|e| String::from_utf8_lossy(&e.ex_dir.0).into_owned())
        .collect();
    exported.sort();
    assert_eq!(exported, ["/other", "/vol"]);
    let ok = m
        .mnt(dirpath(Opaque::borrowed(b"/vol")))
        .await
        .expect("MNT /vol");
    assert!(!ok.fhandle.0.is_empty(), "a root handle");
    for missing in [&b"/nope"[..], b"/", b"/vol/sub"] {
        match m.mnt(dirpath(Opaque::borrowed(missing))).await {
            Err(MountError::Denied(s)) => assert_eq!(s as u32, mountstat3::MNT3ERR_NOENT as u32),
            other => panic!("MNT {missing:?}: {other:?}"),
        }
    }
    let mounts = |list: nfs3_types::mount::mountlist<'_, '_>| {
        list.0
            .iter()
            .map(|b| {
                (
                    String::from_utf8_lossy(&b.ml_hostname.0).into_owned(),
                    String::from_utf8_lossy(&b.ml_directory.0).into_owned(),
                )
            })
            .collect::<Vec<_>>()
    };
    let dumped = mounts(m.dump().await.expect("DUMP"));
    assert_eq!(dumped, [("127.0.0.1".to_string(), "/vol".to_string())]);
    m.umnt(dirpath(Opaque::borrowed(b"/vol")))
        .await
        .expect("UMNT");
    assert!(mounts(m.dump().await.expect("DUMP")).is_empty());
    m.umntall().await.expect("UMNTALL");

    let mut c = server.mount("vol").await;
    c.nfs.null().await.expect("NFS NULL");
    server.stop().await;
}

#[tokio::test]
async fn getattr_and_lookup_stay_inside_the_volume() {
    let server = Served::start(&[("vol", MIB)]).await;
    let mut c = server.mount("vol").await;
    let root = c.root.clone();
    let attrs = c.getattr(&root).await.expect("GETATTR root");
    assert_eq!(attrs.type_, ftype3::NF3DIR);
    // The root's parent is outside the volume: refused, never the node's directory.
    assert_eq!(c.lookup(&root, b"..").await, Err(nfsstat3::NFS3ERR_ACCES));
    let sub = c.mkdir(&root, b"sub").await.expect("MKDIR");
    assert_eq!(c.lookup(&sub, b"..").await, Ok(root.clone()));
    assert_eq!(c.lookup(&root, b"sub").await, Ok(sub.clone()));
    assert_eq!(
        c.lookup(&root, b"missing").await,
        Err(nfsstat3::NFS3ERR_NOENT)
    );
    for bad in [&b"sub/.."[..], b"../vol", b"/etc"] {
        assert_eq!(
            c.lookup(&root, bad).await,
            Err(nfsstat3::NFS3ERR_ACCES),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn written_data_reads_back_and_commit_keeps_the_verifier() {
    let server = Served::start(&[("vol", 4 * MIB)]).await;
    let mut c = server.mount("vol").await;
    let root = c.root.clone();
    let f = c.create(&root, b"data").await.expect("CREATE");
    assert_eq!(c.create(&root, b"data").await, Err(nfsstat3::NFS3ERR_EXIST));
    let block: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    let first = c
        .write(&f, 0, &block, stable_how::UNSTABLE)
        .await
        .expect("WRITE");
    assert_eq!(first.count as usize, block.len());
    let second = c
        .write(&f, block.len() as u64, &block, stable_how::FILE_SYNC)
        .await
        .expect("WRITE FILE_SYNC");
    assert_eq!(second.committed, stable_how::FILE_SYNC);
    // Same server run, same verifier: the client need not resend its unstable writes.
    assert_eq!(c.commit(&f).await, Ok(first.verf));
    assert_eq!(second.verf, first.verf);
    let back = c.read(&f, 0, 2 * block.len() as u32).await.expect("READ");
    assert_eq!(back.len(), 2 * block.len());
    assert_eq!(&back[..block.len()], &block[..]);
    assert_eq!(&back[block.len()..], &block[..]);
    assert_eq!(c.read(&f, 100, 10).await.expect("READ"), &block[100..110]);
    assert_eq!(
        c.getattr(&f).await.expect("GETATTR").size,
        2 * block.len() as u64
    );
    server.stop().await;
}

#[tokio::test]
async fn readdirplus_pages_through_a_large_directory() {
    let server = Served::start(&[("vol", 16 * MIB)]).await;
    let mut c = server.mount("vol").await;
    let root = c.root.clone();
    let made: HashSet<Vec<u8>> = (0..250)
        .map(|i| format!("file-{i:04}").into_bytes())
        .collect();
    for name in &made {
        c.create(&root, name).await.expect("CREATE");
    }
    let (names, pages) = c.list(&root, 4096).await.expect("READDIRPLUS");
    let listed: HashSet<Vec<u8>> = names.iter().cloned().collect();
    assert_eq!(listed.len(), names.len(), "no name listed twice");
    let files: HashSet<Vec<u8>> = listed
        .into_iter()
        .filter(|n| n != b"." && n != b"..")
        .collect();
    assert_eq!(files, made);
    assert!(
        pages > 1,
        "250 entries in 4 KiB pages take several: took {pages}"
    );
    server.stop().await;
}

#[tokio::test]
async fn remove_and_rename_change_the_namespace() {
    let server = Served::start(&[("vol", MIB)]).await;
    let mut c = server.mount("vol").await;
    let root = c.root.clone();
    let dir = c.mkdir(&root, b"dir").await.expect("MKDIR");
    let f = c.create(&root, b"a").await.expect("CREATE");
    c.write(&f, 0, b"kept", stable_how::FILE_SYNC)
        .await
        .expect("WRITE");
    c.rename((&root, b"a"), (&dir, b"b")).await.expect("RENAME");
    assert_eq!(c.lookup(&root, b"a").await, Err(nfsstat3::NFS3ERR_NOENT));
    let moved = c.lookup(&dir, b"b").await.expect("renamed file");
    assert_eq!(c.read(&moved, 0, 100).await.expect("READ"), b"kept");
    assert_eq!(
        c.rename((&root, b"missing"), (&root, b"x")).await,
        Err(nfsstat3::NFS3ERR_NOENT)
    );
    c.remove(&dir, b"b").await.expect("REMOVE");
    assert_eq!(c.lookup(&dir, b"b").await, Err(nfsstat3::NFS3ERR_NOENT));
    assert_eq!(c.remove(&dir, b"b").await, Err(nfsstat3::NFS3ERR_NOENT));
    // The removed file's handle is stale, not someone else's file.
    assert_eq!(c.getattr(&moved).await.err(), Some(nfsstat3::NFS3ERR_STALE));
    server.stop().await;
}
