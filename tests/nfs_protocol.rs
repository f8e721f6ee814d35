//! The NFS data plane speaks RFC 1813 to real clients: the `nfs3_client` crate and
//! Debian's libnfs-utils, against the `localnfs node` binary.

mod support;

use std::collections::BTreeSet;

use nfs3_client::MountClient;
use nfs3_types::mount::dirpath;
use nfs3_types::nfs3::*;
use nfs3_types::rpc::opaque_auth;
use nfs3_types::xdr_codec::Opaque;
use support::nfs::*;

const MIB: u64 = 1 << 20;

#[tokio::test]
async fn libnfs_client_copies_lists_and_reads_back_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", 64 * MIB);
    let node = Node::start(dir.path()).await;
    let src = dir.path().join("src.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&src, &data).expect("write source");

    let out = libnfs(
        "nfs-cp",
        &[src.to_str().expect("utf8"), &node.url("vol/copy.bin")],
    );
    assert!(
        out.status.success(),
        "nfs-cp: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let on_disk = std::fs::read(dir.path().join("volumes/vol/copy.bin")).expect("file on disk");
    assert_eq!(on_disk, data, "bytes on the server's disk differ");

    let out = libnfs("nfs-ls", &[&node.url("vol")]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("copy.bin"));

    let back = dir.path().join("back.bin");
    let out = libnfs(
        "nfs-cp",
        &[&node.url("vol/copy.bin"), back.to_str().expect("utf8")],
    );
    assert!(
        out.status.success(),
        "nfs-cp back: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&back).expect("copy back"), data);
}

/// READ replies come three ways (data spliced from the page cache for large READs,
/// copied on the connection task when cached, copied on the blocking pool when not):
/// all must carry the exact bytes, count, eof flag and XDR padding.
#[tokio::test]
async fn reads_of_every_size_return_exact_bytes_cached_or_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", 64 * MIB);
    let node = Node::start(dir.path()).await;
    let len = MIB as usize + 3; // odd: the last READ needs padding
    let data: Vec<u8> = (0..len as u32).map(|i| (i * 13 % 251) as u8).collect();
    let path = dir.path().join("volumes/vol/big.bin");
    std::fs::write(&path, &data).expect("write file");
    let mut c = Client::mount(node.port, "vol").await;
    let root = c.root.clone();
    let f = c.lookup(&root, b"big.bin").await.expect("LOOKUP");
    let cases: [(u64, u32); 7] = [
        (0, 1 << 20),            // spliced, not the end
        (MIB, 1 << 20),          // spliced, 3 bytes and eof
        (7, 100_001),            // spliced, odd offset and count
        (MIB - 1000, 65_536),    // spliced, crosses the end
        (4096, 4096),            // small
        (len as u64 - 1, 4096),  // small, 1 byte and eof
        (len as u64 + 10, 4096), // past the end: nothing, eof
    ];
    for evicted in [false, true] {
        for (offset, count) in cases {
            if evicted {
                evict_from_page_cache(&path);
            }
            let r = c
                .nfs
                .read(&READ3args {
                    file: f.clone(),
                    offset,
                    count,
                })
                .await
                .expect("rpc");
            let Nfs3Result::Ok(ok) = r else {
                panic!("READ {offset}+{count} failed (evicted: {evicted})");
            };
            let start = (offset as usize).min(len);
            let end = (start + count as usize).min(len);
            assert_eq!(ok.count as usize, end - start, "count of {offset}+{count}");
            assert!(
                ok.data.as_ref() == &data[start..end],
                "bytes of {offset}+{count}"
            );
            assert_eq!(ok.eof, end == len, "eof of {offset}+{count}");
        }
    }
    // Still in step after all of that: the next call on the connection decodes.
    assert_eq!(c.getattr(&f).await.expect("GETATTR").size, len as u64);
}

/// Drops a file's pages from the page cache, so the next READ has to go to disk.
fn evict_from_page_cache(path: &std::path::Path) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).expect("open");
    f.sync_all().expect("sync");
    // SAFETY: plain syscall on a descriptor we own.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
}

#[tokio::test]
async fn every_nfsv3_procedure_answers() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", 64 * MIB);
    let node = Node::start(dir.path()).await;
    let disk = dir.path().join("volumes/vol");
    let mut c = Client::mount(node.port, "vol").await;
    let root = c.root.clone();

    c.nfs.null().await.expect("NULL");
    let f = c.create(&root, b"f", 0o644).await.expect("CREATE");
    c.write(&f, 0, b"hello world", stable_how::UNSTABLE)
        .await
        .expect("WRITE");
    c.commit(&f).await.expect("COMMIT");
    assert_eq!(c.read(&f, 6, 100).await.expect("READ"), b"world");
    assert_eq!(c.lookup(&root, b"f").await.expect("LOOKUP"), f);
    assert_eq!(c.getattr(&f).await.expect("GETATTR").size, 11);

    let r = c
        .nfs
        .setattr(&SETATTR3args {
            object: f.clone(),
            new_attributes: sattr3 {
                mode: Nfs3Option::Some(0o600),
                size: Nfs3Option::Some(5),
                ..sattr3::default()
            },
            guard: Nfs3Option::None,
        })
        .await
        .expect("rpc");
    assert!(matches!(r, Nfs3Result::Ok(_)), "SETATTR {r:?}");
    let md = std::fs::metadata(disk.join("f")).expect("stat");
    assert_eq!(
        (
            md.len(),
            std::os::unix::fs::PermissionsExt::mode(&md.permissions()) & 0o777
        ),
        (5, 0o600)
    );

    let r = c
        .nfs
        .access(&ACCESS3args {
            object: f.clone(),
            access: 0x3f,
        })
        .await
        .expect("rpc");
    assert!(
        matches!(r, Nfs3Result::Ok(ref ok) if ok.access & ACCESS3_READ != 0),
        "ACCESS {r:?}"
    );

    let sub = c.mkdir(&root, b"sub").await.expect("MKDIR");
    let r = c
        .nfs
        .symlink(&SYMLINK3args {
            where_: diropargs3 {
                dir: sub.clone(),
                name: filename3(Opaque::borrowed(b"ln")),
            },
            symlink: symlinkdata3 {
                symlink_attributes: sattr3::default(),
                symlink_data: nfspath3(Opaque::borrowed(b"../f")),
            },
        })
        .await
        .expect("rpc");
    let Nfs3Result::Ok(SYMLINK3resok {
        obj: Nfs3Option::Some(ln),
        ..
    }) = r
    else {
        panic!("SYMLINK {r:?}");
    };
    let r = c
        .nfs
        .readlink(&READLINK3args { symlink: ln })
        .await
        .expect("rpc");
    assert!(
        matches!(r, Nfs3Result::Ok(ref ok) if ok.data.0.as_ref() == b"../f"),
        "READLINK {r:?}"
    );

    let r = c
        .nfs
        .mknod(&MKNOD3args {
            where_: diropargs3 {
                dir: sub.clone(),
                name: filename3(Opaque::borrowed(b"pipe")),
            },
            what: mknoddata3::NF3FIFO(sattr3::default()),
        })
        .await
        .expect("rpc");
    assert!(matches!(r, Nfs3Result::Ok(_)), "MKNOD fifo {r:?}");
    let r = c
        .nfs
        .mknod(&MKNOD3args {
            where_: diropargs3 {
                dir: sub.clone(),
                name: filename3(Opaque::borrowed(b"dev")),
            },
            what: mknoddata3::NF3CHR(devicedata3 {
                dev_attributes: sattr3::default(),
                spec: specdata3 {
                    specdata1: 1,
                    specdata2: 3,
                },
            }),
        })
        .await
        .expect("rpc");
    assert!(
        matches!(r, Nfs3Result::Err((nfsstat3::NFS3ERR_NOTSUPP, _))),
        "MKNOD chr {r:?}"
    );

    let r = c
        .nfs
        .link(&LINK3args {
            file: f.clone(),
            link: diropargs3 {
                dir: sub.clone(),
                name: filename3(Opaque::borrowed(b"hard")),
            },
        })
        .await
        .expect("rpc");
    assert!(matches!(r, Nfs3Result::Ok(_)), "LINK {r:?}");
    assert_eq!(std::fs::metadata(disk.join("f")).expect("stat").len(), 5);
    assert!(disk.join("sub/hard").exists());

    let r = c
        .nfs
        .rename(&RENAME3args {
            from: diropargs3 {
                dir: sub.clone(),
                name: filename3(Opaque::borrowed(b"hard")),
            },
            to: diropargs3 {
                dir: root.clone(),
                name: filename3(Opaque::borrowed(b"moved")),
            },
        })
        .await
        .expect("rpc");
    assert!(matches!(r, Nfs3Result::Ok(_)), "RENAME {r:?}");
    assert!(disk.join("moved").exists() && !disk.join("sub/hard").exists());

    let names: BTreeSet<Vec<u8>> = c
        .list(&sub, false, 4096)
        .await
        .expect("READDIR")
        .into_iter()
        .collect();
    let want: BTreeSet<Vec<u8>> = [&b"."[..], b"..", b"ln", b"pipe"]
        .iter()
        .map(|n| n.to_vec())
        .collect();
    assert_eq!(names, want);
    let names = c.list(&sub, true, 4096).await.expect("READDIRPLUS");
    assert_eq!(names.len(), 4);

    c.remove(&sub, b"ln").await.expect("REMOVE");
    c.remove(&sub, b"pipe").await.expect("REMOVE fifo");
    let r = c
        .nfs
        .rmdir(&RMDIR3args {
            object: diropargs3 {
                dir: root.clone(),
                name: filename3(Opaque::borrowed(b"sub")),
            },
        })
        .await
        .expect("rpc");
    assert!(matches!(r, Nfs3Result::Ok(_)), "RMDIR {r:?}");
    assert!(!disk.join("sub").exists());

    let st = c.fsstat().await.expect("FSSTAT");
    assert_eq!(st.tbytes, 64 * MIB);
    let r = c
        .nfs
        .fsinfo(&FSINFO3args {
            fsroot: root.clone(),
        })
        .await
        .expect("rpc");
    assert!(
        matches!(r, Nfs3Result::Ok(ref ok) if ok.wtmax == 1 << 20 && ok.properties & FSF3_LINK != 0),
        "FSINFO {r:?}"
    );
    let r = c
        .nfs
        .pathconf(&PATHCONF3args {
            object: root.clone(),
        })
        .await
        .expect("rpc");
    assert!(
        matches!(r, Nfs3Result::Ok(ref ok) if ok.name_max == 255),
        "PATHCONF {r:?}"
    );
}

#[tokio::test]
async fn readdir_cookies_stay_valid_through_100k_entries() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", 64 * MIB);
    let big = dir.path().join("volumes/vol/big");
    std::fs::create_dir(&big).expect("mkdir");
    let expected: BTreeSet<Vec<u8>> = (0..100_000)
        .map(|i| {
            let name = format!("entry-{i:06}");
            std::fs::File::create(big.join(&name)).expect("create");
            name.into_bytes()
        })
        .collect();
    let node = Node::start(dir.path()).await;
    let mut c = Client::mount(node.port, "vol").await;
    let root = c.root.clone();
    let d = c.lookup(&root, b"big").await.expect("lookup");
    for plus in [false, true] {
        let names = c.list(&d, plus, 16 * 1024).await.expect("list");
        let set: BTreeSet<Vec<u8>> = names
            .iter()
            .filter(|n| n.as_slice() != b"." && n.as_slice() != b"..")
            .cloned()
            .collect();
        assert_eq!(names.len(), 100_002, "duplicates or gaps (plus={plus})");
        assert!(set == expected, "names differ (plus={plus})");
    }
}

#[tokio::test]
async fn mount_serves_volume_paths_and_nothing_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", MIB);
    create_volume(dir.path(), "other", MIB);
    std::fs::create_dir(dir.path().join("volumes/vol/sub")).expect("mkdir");
    let node = Node::start(dir.path()).await;
    for good in ["vol", "other"] {
        assert!(mount(node.port, good, LOCAL, 0, 0).await.is_ok(), "{good}");
    }
    for bad in ["", "vol/sub", "../volumes/vol", "missing", "vol/..", "VOL"] {
        assert!(
            mount(node.port, bad, LOCAL, 0, 0).await.is_err(),
            "/{bad} mounted"
        );
    }

    let mut m = MountClient::new_with_auth(
        tcp(node.port, LOCAL).await,
        auth(0, 0),
        opaque_auth::default(),
    );
    m.null().await.expect("MOUNT NULL");
    let exports = m.export().await.expect("EXPORT");
    let paths: BTreeSet<String> = exports
        .0
        .iter()
        .map(|e| String::from_utf8_lossy(&e.ex_dir.0).into_owned())
        .collect();
    assert_eq!(
        paths,
        ["/other", "/vol"].map(String::from).into_iter().collect()
    );
    let dump = m.dump().await.expect("DUMP");
    assert_eq!(dump.0.len(), 2, "{dump:?}");
    m.umnt(dirpath(Opaque::borrowed(b"/vol")))
        .await
        .expect("UMNT");
    assert_eq!(m.dump().await.expect("DUMP").0.len(), 1);
    m.umntall().await.expect("UMNTALL");
    assert!(m.dump().await.expect("DUMP").0.is_empty());
}

#[tokio::test]
async fn readdirplus_pages_fill_maxcount_and_never_pass_it() {
    use nfs3_types::xdr_codec::Pack;
    let dir = tempfile::tempdir().expect("tempdir");
    create_volume(dir.path(), "vol", 16 * MIB);
    let d = dir.path().join("volumes/vol/d");
    std::fs::create_dir(&d).expect("mkdir");
    let files = 2000;
    for i in 0..files {
        std::fs::File::create(d.join(format!("file-{i:05}"))).expect("create");
    }
    let node = Node::start(dir.path()).await;
    let mut c = Client::mount(node.port, "vol").await;
    let root = c.root.clone();
    let d = c.lookup(&root, b"d").await.expect("lookup");
    // What the Linux client asks for: dircount an eighth of maxcount.
    let maxcount = 32 * 1024;
    let (mut cookie, mut cookieverf, mut listed) = (0, cookieverf3::default(), 0);
    loop {
        let r = c
            .nfs
            .readdirplus(&READDIRPLUS3args {
                dir: d.clone(),
                cookie,
                cookieverf,
                dircount: maxcount / 8,
                maxcount,
            })
            .await
            .expect("rpc");
        let Nfs3Result::Ok(ok) = r else {
            panic!("READDIRPLUS failed: {r:?}")
        };
        // The reply's body: the status word, then the results.
        let size = 4 + ok.packed_size();
        assert!(size <= maxcount as usize, "a {size}-byte page");
        let entries = &ok.reply.entries.0;
        if !ok.reply.eof {
            // No room left for another entry like these (about 180 bytes each).
            assert!(
                size + 200 > maxcount as usize,
                "a {size}-byte page of {} entries left room",
                entries.len()
            );
        }
        listed += entries.len();
        if ok.reply.eof {
            break;
        }
        cookie = entries.last().expect("a page with entries").cookie;
        cookieverf = ok.cookieverf;
    }
    assert_eq!(listed, files + 2, "every name, `.` and `..`, once");
}
