//! The benchmark's NFSv3 client calls over `nfs3_client`: one connection is one call at
//! a time, every call has a timeout, and NFS or transport failures become messages that
//! name the procedure.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use nfs3_client::io::{AsyncRead, AsyncWrite};
use nfs3_client::{MountClient, Nfs3Client, RpcError};
use nfs3_types::mount::dirpath;
use nfs3_types::nfs3::{
    COMMIT3args, CREATE3args, LOOKUP3args, LOOKUP3resok, MKDIR3args, Nfs3Option, Nfs3Result,
    READDIRPLUS3args, WRITE3args, cookieverf3, createhow3, diropargs3, filename3, nfs_fh3, sattr3,
    stable_how, writeverf3,
};
use nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_types::xdr_codec::Opaque;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An NFSv3 connection: strictly one call at a time.
pub type Conn = Nfs3Client<Io>;

/// READDIRPLUS reply budget, as a Linux client with rsize ≥ 32 KiB asks for.
const READDIR_MAXCOUNT: u32 = 32 * 1024;
/// Upper bound on READDIRPLUS pages (a server that never says EOF fails the row).
const READDIR_MAX_PAGES: usize = 100_000;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RPC_TIMEOUT: Duration = Duration::from_secs(60);

/// One UNSTABLE WRITE of all of `data`; returns the reply's verifier.
pub async fn write(
    conn: &mut Conn,
    file: &nfs_fh3,
    offset: u64,
    data: &[u8],
) -> Result<writeverf3, String> {
    write_stable(conn, file, offset, data, stable_how::UNSTABLE).await
}

/// One WRITE of all of `data` at stability `stable`; returns the reply's verifier.
/// Fails on a short write or a reply less stable than asked for (RFC 1813 §3.3.7: the
/// server may commit more than asked, never less).
pub async fn write_stable(
    conn: &mut Conn,
    file: &nfs_fh3,
    offset: u64,
    data: &[u8],
    stable: stable_how,
) -> Result<writeverf3, String> {
    let count = u32::try_from(data.len()).map_err(|e| e.to_string())?;
    let res = nfs(
        "WRITE",
        conn.write(&WRITE3args {
            file: file.clone(),
            offset,
            count,
            stable,
            data: Opaque::borrowed(data),
        }),
    )
    .await?;
    if res.count != count {
        return Err(format!("short WRITE at {offset}: {} of {count}", res.count));
    }
    if (res.committed as u32) < (stable as u32) {
        return Err(format!(
            "WRITE at {offset} asked {stable}, reply says only {}",
            res.committed
        ));
    }
    Ok(res.verf)
}

/// Remembers the first write verifier of a run in `seen`; a later different one means
/// the server restarted and forgot unstable data (RFC 1813 §3.3.7).
pub fn check_verf(seen: &mut Option<writeverf3>, verf: writeverf3) -> Result<(), String> {
    match seen {
        Some(v) if *v != verf => Err("write verifier changed mid-run".into()),
        Some(_) => Ok(()),
        None => {
            *seen = Some(verf);
            Ok(())
        }
    }
}

/// COMMIT of the whole file; fails if the verifier differs from the writes' one.
pub async fn commit(
    conn: &mut Conn,
    file: &nfs_fh3,
    verf: Option<writeverf3>,
) -> Result<(), String> {
    let res = nfs(
        "COMMIT",
        conn.commit(&COMMIT3args {
            file: file.clone(),
            offset: 0,
            count: 0,
        }),
    )
    .await?;
    match verf {
        Some(v) if v != res.verf => Err("COMMIT verifier differs from WRITE's".into()),
        _ => Ok(()),
    }
}

/// Where a READDIRPLUS listing stands: the cookie and verifier for the next page.
#[derive(Default)]
pub struct Cursor {
    cookie: u64,
    cookieverf: cookieverf3,
}

/// One READDIRPLUS page after `cursor`, as a Linux client asks for it (dircount =
/// maxcount / 8); advances the cursor and returns the number of entries other than `.`
/// and `..`, and whether the page was the last.
pub async fn readdirplus_page(
    conn: &mut Conn,
    dir: &nfs_fh3,
    cursor: &mut Cursor,
) -> Result<(u64, bool), String> {
    let res = nfs(
        "READDIRPLUS",
        conn.readdirplus(&READDIRPLUS3args {
            dir: dir.clone(),
            cookie: cursor.cookie,
            cookieverf: cursor.cookieverf,
            dircount: READDIR_MAXCOUNT / 8,
            maxcount: READDIR_MAXCOUNT,
        }),
    )
    .await?;
    let page = res.reply.entries.into_inner();
    if page.is_empty() && !res.reply.eof {
        return Err("READDIRPLUS returned an empty page before EOF".into());
    }
    let entries = page
        .iter()
        .filter(|e| !matches!(e.name.0.as_ref(), b"." | b".."))
        .count() as u64;
    cursor.cookie = page.last().map_or(cursor.cookie, |e| e.cookie);
    cursor.cookieverf = res.cookieverf;
    Ok((entries, res.reply.eof))
}

/// Lists `dir` page by page with [`readdirplus_page`]; returns the number of entries
/// other than `.` and `..`.
pub async fn list_dir(conn: &mut Conn, dir: &nfs_fh3) -> Result<u64, String> {
    let mut cursor = Cursor::default();
    let mut entries = 0;
    for _ in 0..READDIR_MAX_PAGES {
        let (n, eof) = readdirplus_page(conn, dir, &mut cursor).await?;
        entries += n;
        if eof {
            return Ok(entries);
        }
    }
    Err(format!(
        "READDIRPLUS gave no EOF in {READDIR_MAX_PAGES} pages"
    ))
}

pub async fn create(conn: &mut Conn, dir: &nfs_fh3, name: &str) -> Result<nfs_fh3, String> {
    let res = nfs(
        "CREATE",
        conn.create(&CREATE3args {
            where_: dirop(dir, name),
            how: createhow3::UNCHECKED(sattr3 {
                mode: Nfs3Option::Some(0o644),
                ..sattr3::default()
            }),
        }),
    )
    .await?;
    match res.obj {
        Nfs3Option::Some(fh) => Ok(fh),
        // RFC 1813 §3.3.8: the handle is optional in the reply; a client then looks up.
        Nfs3Option::None => Ok(lookup(conn, dir, name).await?.object),
    }
}

pub async fn mkdir(conn: &mut Conn, dir: &nfs_fh3, name: &str) -> Result<nfs_fh3, String> {
    let res = nfs(
        "MKDIR",
        conn.mkdir(&MKDIR3args {
            where_: dirop(dir, name),
            attributes: sattr3 {
                mode: Nfs3Option::Some(0o755),
                ..sattr3::default()
            },
        }),
    )
    .await?;
    match res.obj {
        Nfs3Option::Some(fh) => Ok(fh),
        Nfs3Option::None => Ok(lookup(conn, dir, name).await?.object),
    }
}

pub async fn lookup(conn: &mut Conn, dir: &nfs_fh3, name: &str) -> Result<LOOKUP3resok, String> {
    nfs(
        "LOOKUP",
        conn.lookup(&LOOKUP3args {
            what: dirop(dir, name),
        }),
    )
    .await
}

pub fn dirop<'a>(dir: &nfs_fh3, name: &'a str) -> diropargs3<'a> {
    diropargs3 {
        dir: dir.clone(),
        name: filename3(Opaque::borrowed(name.as_bytes())),
    }
}

/// Awaits one NFS call under [`RPC_TIMEOUT`] and turns transport and NFS errors into
/// messages naming the procedure.
pub async fn nfs<T, E>(
    what: &str,
    call: impl Future<Output = Result<Nfs3Result<T, E>, RpcError>>,
) -> Result<T, String> {
    match tokio::time::timeout(RPC_TIMEOUT, call).await {
        Err(_) => Err(format!("{what}: no reply within {RPC_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Ok(Ok(Nfs3Result::Err((status, _)))) => Err(format!("{what}: {status:?}")),
        Ok(Ok(Nfs3Result::Ok(v))) => Ok(v),
    }
}

/// AUTH_SYS as `uid` with primary and only supplementary group `uid` (what a
/// kernel client sends for a daemon user), or as root with no groups for uid 0.
fn credential(uid: u32) -> opaque_auth<'static> {
    opaque_auth::auth_unix(&auth_unix {
        stamp: 1,
        machinename: Opaque::borrowed(b"nfsbench"),
        uid,
        gid: uid,
        gids: if uid == 0 { vec![] } else { vec![uid] },
    })
}

/// MOUNT on its own connection; returns the export's root handle.
pub async fn mount(addr: SocketAddr, path: &str) -> Result<nfs_fh3, String> {
    let io = connect(addr).await?;
    let mut client = MountClient::new_with_auth(io, credential(0), opaque_auth::default());
    let res = tokio::time::timeout(
        RPC_TIMEOUT,
        client.mnt(dirpath(Opaque::borrowed(path.as_bytes()))),
    )
    .await
    .map_err(|_| format!("MOUNT {path}: no reply"))?
    .map_err(|e| format!("MOUNT {path}: {e}"))?;
    Ok(nfs_fh3 {
        data: Opaque::owned(res.fhandle.0.into_owned()),
    })
}

/// An NFS connection calling as root.
pub async fn connect_nfs(addr: SocketAddr) -> Result<Conn, String> {
    connect_nfs_as(addr, 0).await
}

/// An NFS connection calling as `uid` (see [`credential`]).
pub async fn connect_nfs_as(addr: SocketAddr, uid: u32) -> Result<Conn, String> {
    Ok(Nfs3Client::new_with_auth(
        connect(addr).await?,
        credential(uid),
        opaque_auth::default(),
    ))
}

async fn connect(addr: SocketAddr) -> Result<Io, String> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connect {addr}: timed out"))?
        .map_err(|e| format!("connect {addr}: {e}"))?;
    // As the Linux RPC client does: small calls must not wait for Nagle.
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(Io(stream))
}

/// A TCP stream for `nfs3_client` that reports a closed connection as an error (the
/// crate's `read_exact` loops forever on a zero-byte read).
pub struct Io(TcpStream);

impl AsyncRead for Io {
    async fn async_read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.read(buf).await? {
            0 if !buf.is_empty() => Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => Ok(n),
        }
    }
}

impl AsyncWrite for Io {
    async fn async_write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).await
    }
}
