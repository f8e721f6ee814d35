//! Encoding pieces shared by the NFS procedures: post-operation attributes, weak cache
//! consistency data, optional handles (RFC 1813 §2.6).

use nfs3_types::nfs3::nfsstat3;

use super::attr;
use super::xdr::{put, put_bool, put_opaque, put_u32};

/// `post_op_attr`.
pub fn post_op(out: &mut Vec<u8>, st: Option<&libc::stat>, fsid: u32) {
    match st {
        Some(st) => {
            put_bool(out, true);
            put(out, &attr::fattr(st, fsid));
        }
        None => put_bool(out, false),
    }
}

/// `wcc_data`: attributes before and after an operation.
pub fn wcc(out: &mut Vec<u8>, before: Option<&libc::stat>, after: Option<&libc::stat>, fsid: u32) {
    match before {
        Some(st) => {
            put_bool(out, true);
            put(out, &attr::wcc(st));
        }
        None => put_bool(out, false),
    }
    post_op(out, after, fsid);
}

/// `post_op_fh3`.
pub fn post_op_fh(out: &mut Vec<u8>, fh: Option<&[u8]>) {
    match fh {
        Some(fh) => {
            put_bool(out, true);
            put_opaque(out, fh);
        }
        None => put_bool(out, false),
    }
}

pub fn status(out: &mut Vec<u8>, s: nfsstat3) {
    put_u32(out, s as u32);
}
