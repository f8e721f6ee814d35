//! The calls of the depth-1 rows: one call of a row, timed on its own, and the checks
//! of its reply (a server that answers wrongly fails the row with the reason).

use std::future::Future;
use std::time::{Duration, Instant};

use nfs3_types::nfs3::{
    ACCESS3_EXECUTE, ACCESS3_EXTEND, ACCESS3_MODIFY, ACCESS3_READ, ACCESS3args, GETATTR3args,
    Nfs3Option, REMOVE3args, RENAME3args, SETATTR3args, fattr3, ftype3, nfs_fh3, post_op_attr,
    sattr3, stable_how,
};

use super::super::BLOCK;
use super::super::client::{
    Cursor, check_verf, commit, create, dirop, lookup, nfs, readdirplus_page, write, write_stable,
};
use super::{Kind, Rep, Server, created_name, renamed_name};

/// The mode SETATTR sets (CREATE makes files 0644, so every call changes it).
const CHMOD_TO: u32 = 0o600;

/// Awaits `call`, returning its output and how long it took.
async fn timed<T>(call: impl Future<Output = T>) -> (T, Duration) {
    let start = Instant::now();
    let out = call.await;
    (out, start.elapsed())
}

/// Call `i` of a row: returns the time of the call the row is named for.
pub async fn one_call(
    server: &Server<'_>,
    rep: &mut Rep,
    kind: Kind,
    i: u64,
    file: Option<&nfs_fh3>,
    data: &[u8],
) -> Result<Duration, String> {
    let conn = &mut rep.conn;
    match kind {
        Kind::Lookup => {
            let f = server.pop_file(i);
            let (res, took) = timed(lookup(conn, &server.pop_dir, &f.name)).await;
            let res = res?;
            let same = match &res.obj_attributes {
                Nfs3Option::Some(attr) => attr.fileid == f.fileid,
                Nfs3Option::None => res.object == f.fh,
            };
            if !same {
                return Err(format!("LOOKUP {}: a different file", f.name));
            }
            Ok(took)
        }
        Kind::Getattr => {
            let f = server.pop_file(i);
            let args = GETATTR3args {
                object: f.fh.clone(),
            };
            let (res, took) = timed(nfs("GETATTR", conn.getattr(&args))).await;
            let attr = res?.obj_attributes;
            if attr.fileid != f.fileid || attr.type_ != ftype3::NF3REG || attr.size != 0 {
                return Err(format!(
                    "GETATTR {}: fileid {} type {:?} size {}, expected fileid {} empty file",
                    f.name, attr.fileid, attr.type_, attr.size, f.fileid
                ));
            }
            Ok(took)
        }
        Kind::Access => {
            let f = server.pop_file(i);
            // What the Linux client asks for a regular file.
            let asked = ACCESS3_READ | ACCESS3_MODIFY | ACCESS3_EXTEND | ACCESS3_EXECUTE;
            let args = ACCESS3args {
                object: f.fh.clone(),
                access: asked,
            };
            let (res, took) = timed(nfs("ACCESS", conn.access(&args))).await;
            let granted = res?.access;
            // The owner (or root, not squashed) of a 0644 file may read and write it.
            let needed = ACCESS3_READ | ACCESS3_MODIFY | ACCESS3_EXTEND;
            if granted & needed != needed {
                return Err(format!(
                    "ACCESS {}: granted {granted:#x} of {asked:#x}; root may read and write it",
                    f.name
                ));
            }
            Ok(took)
        }
        Kind::Readdirplus => {
            let (res, took) = timed(readdirplus_page(conn, &server.pop_dir, &mut rep.cursor)).await;
            let (entries, eof) = res?;
            rep.listed += entries;
            rep.received += entries;
            let expected = server.pop.len() as u64;
            if rep.listed > expected || (eof && rep.listed != expected) {
                return Err(format!(
                    "READDIRPLUS listed {}{} of {expected} files",
                    rep.listed,
                    if eof { " (EOF)" } else { " so far" }
                ));
            }
            if eof {
                rep.cursor = Cursor::default();
                rep.listed = 0;
            }
            Ok(took)
        }
        Kind::Create => {
            let (fh, took) = timed(create(conn, &rep.dir, &created_name(i))).await;
            rep.created.push(fh?);
            Ok(took)
        }
        Kind::Setattr => {
            let fh = rep.created.get(i as usize).ok_or("no handle")?;
            let args = SETATTR3args {
                object: fh.clone(),
                new_attributes: sattr3 {
                    mode: Nfs3Option::Some(CHMOD_TO),
                    ..sattr3::default()
                },
                guard: Nfs3Option::None,
            };
            let (res, took) = timed(nfs("SETATTR", conn.setattr(&args))).await;
            if let Some(attr) = attributes(&res?.obj_wcc.after)
                && attr.mode & 0o7777 != CHMOD_TO
            {
                return Err(format!(
                    "SETATTR mode {CHMOD_TO:o}: reply says {:o}",
                    attr.mode & 0o7777
                ));
            }
            Ok(took)
        }
        Kind::Rename => {
            let (from, to) = (created_name(i), renamed_name(i));
            let args = RENAME3args {
                from: dirop(&rep.dir, &from),
                to: dirop(&rep.dir, &to),
            };
            let (res, took) = timed(nfs("RENAME", conn.rename(&args))).await;
            res?;
            Ok(took)
        }
        Kind::Remove => {
            let name = renamed_name(i);
            let args = REMOVE3args {
                object: dirop(&rep.dir, &name),
            };
            let (res, took) = timed(nfs("REMOVE", conn.remove(&args))).await;
            res?;
            Ok(took)
        }
        Kind::Commit => {
            let fh = file.ok_or("no file")?;
            // The write is not timed: this row is the COMMIT a kernel client sends on
            // fsync after buffered writes.
            let verf = write(conn, fh, i * BLOCK, &data[..BLOCK as usize]).await?;
            check_verf(&mut rep.verf, verf)?;
            let (res, took) = timed(commit(conn, fh, Some(verf))).await;
            res?;
            Ok(took)
        }
        Kind::WriteSync => {
            let fh = file.ok_or("no file")?;
            let call = write_stable(
                conn,
                fh,
                i * BLOCK,
                &data[..BLOCK as usize],
                stable_how::FILE_SYNC,
            );
            let (verf, took) = timed(call).await;
            check_verf(&mut rep.verf, verf?)?;
            Ok(took)
        }
    }
}

fn attributes(attr: &post_op_attr) -> Option<&fattr3> {
    match attr {
        Nfs3Option::Some(a) => Some(a),
        Nfs3Option::None => None,
    }
}
