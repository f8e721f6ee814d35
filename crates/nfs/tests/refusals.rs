//! What the in-process server refuses, over RPC: writes past a volume's size, forged
//! and truncated handles, and (by default) calls from unreserved source ports.

mod support;

use nfs3_types::mount::dirpath;
use nfs3_types::nfs3::*;
use nfs3_types::xdr_codec::Opaque;
use support::{MIB, Served};

#[tokio::test]
async fn writes_past_the_volume_size_are_refused_and_fsstat_reports_it() {
    let server = Served::start(&[("vol", MIB)]).await;
    let mut c = server.mount("vol").await;
    let root = c.root.clone();
    let stat = c.fsstat().await.expect("FSSTAT");
    assert_eq!(stat.tbytes, MIB, "df shows the volume's size");
    let f = c.create(&root, b"f").await.expect("CREATE");
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
    assert!(
        matches!(
            over.err(),
            Some(nfsstat3::NFS3ERR_DQUOT | nfsstat3::NFS3ERR_NOSPC)
        ),
        "a write past the size is refused"
    );
    // What was written before stays.
    let back = c.read(&f, 0, 4096).await.expect("READ");
    assert_eq!(back, vec![7u8; 4096]);
    assert!(c.fsstat().await.expect("FSSTAT").fbytes <= MIB / 4);
    server.stop().await;
}

#[tokio::test]
async fn forged_and_truncated_handles_are_refused() {
    let server = Served::start(&[("vol", MIB)]).await;
    let mut c = server.mount("vol").await;
    let root = c.root.clone();
    let f = c.create(&root, b"f").await.expect("CREATE");
    let wire = f.data.to_vec();
    for i in 0..wire.len() {
        let mut bad = wire.clone();
        bad[i] ^= 0x01;
        let forged = nfs_fh3 {
            data: Opaque::owned(bad),
        };
        assert_eq!(
            c.getattr(&forged).await.err(),
            Some(nfsstat3::NFS3ERR_BADHANDLE),
            "byte {i} altered"
        );
    }
    for cut in [0, 1, wire.len() / 2, wire.len() - 1] {
        let short = nfs_fh3 {
            data: Opaque::owned(wire[..cut].to_vec()),
        };
        assert_eq!(
            c.getattr(&short).await.err(),
            Some(nfsstat3::NFS3ERR_BADHANDLE),
            "cut to {cut} bytes"
        );
    }
    assert!(c.getattr(&f).await.is_ok(), "the real handle still works");
    server.stop().await;
}

/// Calls routed to a volume have their first handle checked once, by routing; every
/// other handle they carry, and a forged first one, is still checked by its handler.
#[tokio::test]
async fn routed_calls_refuse_a_forged_handle_in_any_position() {
    let server = Served::start(&[("vol", MIB)]).await;
    let mut c = server.mount("vol").await;
    let root = c.root.clone();
    let f = c.create(&root, b"f").await.expect("CREATE");
    let forge = |fh: &nfs_fh3| {
        let mut bad = fh.data.to_vec();
        if let Some(last) = bad.last_mut() {
            *last ^= 0x01;
        }
        nfs_fh3 {
            data: Opaque::owned(bad),
        }
    };
    let (bad_f, bad_root) = (forge(&f), forge(&root));
    let refused = Some(nfsstat3::NFS3ERR_BADHANDLE);
    assert_eq!(
        c.write(&bad_f, 0, b"x", stable_how::FILE_SYNC).await.err(),
        refused,
        "WRITE, first handle forged"
    );
    assert_eq!(c.remove(&bad_root, b"f").await.err(), refused, "REMOVE");
    assert_eq!(
        c.rename((&root, b"f"), (&bad_root, b"g")).await.err(),
        refused,
        "RENAME, second handle forged"
    );
    assert_eq!(
        c.link(&f, &bad_root, b"h").await.err(),
        refused,
        "LINK, second handle forged"
    );
    assert!(c.lookup(&root, b"f").await.is_ok(), "f is where it was");
    assert_eq!(
        c.lookup(&root, b"g").await.err(),
        Some(nfsstat3::NFS3ERR_NOENT)
    );
    assert_eq!(
        c.lookup(&root, b"h").await.err(),
        Some(nfsstat3::NFS3ERR_NOENT)
    );
    server.stop().await;
}

#[tokio::test]
async fn unreserved_ports_get_null_and_nothing_else_by_default() {
    let server = Served::start_with(&[("vol", MIB)], true).await;
    let mut m = server.mount_client().await;
    m.null().await.expect("NULL is answered");
    assert!(
        m.mnt(dirpath(Opaque::borrowed(b"/vol"))).await.is_err(),
        "MNT from an unreserved port is refused"
    );
    server.stop().await;
}
