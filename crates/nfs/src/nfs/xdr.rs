//! XDR (RFC 4506) decoding of untrusted requests, and encoding of replies.
//!
//! Requests are decoded here, not with `nfs3_types`' `Unpack`, because that allocates
//! whatever length a peer claims before checking it is there. [`XdrIn`] reads from a
//! record already in memory, borrows opaque data instead of copying it (WRITE payloads
//! go straight from the record to `pwrite`), and checks every length against both what
//! is left and a per-field maximum. Replies are encoded with `nfs3_types`' `Pack`.

use nfs3_types::nfs3::{
    Nfs3Option, createverf3, nfstime3, sattr3, set_atime, set_mtime, specdata3,
};
use nfs3_types::xdr_codec::Pack;

/// The request did not decode (RPC `GARBAGE_ARGS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Garbage;

/// Decoding result.
pub type XdrResult<T> = Result<T, Garbage>;

/// A cursor over one RPC record.
#[derive(Debug, Clone)]
pub struct XdrIn<'a> {
    buf: &'a [u8],
}

impl<'a> XdrIn<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Bytes not yet decoded.
    pub fn remaining(&self) -> &'a [u8] {
        self.buf
    }

    fn take(&mut self, n: usize) -> XdrResult<&'a [u8]> {
        if n > self.buf.len() {
            return Err(Garbage);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    pub fn u32(&mut self) -> XdrResult<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> XdrResult<u64> {
        Ok(u64::from(self.u32()?) << 32 | u64::from(self.u32()?))
    }

    pub fn bool(&mut self) -> XdrResult<bool> {
        match self.u32()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Garbage),
        }
    }

    /// Variable-length opaque of at most `max` bytes (padding skipped).
    pub fn opaque(&mut self, max: usize) -> XdrResult<&'a [u8]> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(Garbage);
        }
        let data = self.take(len)?;
        self.take((4 - len % 4) % 4)?;
        Ok(data)
    }

    /// Fixed-length opaque of exactly `N` bytes.
    pub fn fixed<const N: usize>(&mut self) -> XdrResult<[u8; N]> {
        let b = self.take(N)?;
        self.take((4 - N % 4) % 4)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    /// An NFSv3 file handle (at most 64 bytes, RFC 1813 §2.5).
    pub fn fh(&mut self) -> XdrResult<&'a [u8]> {
        self.opaque(nfs3_types::nfs3::NFS3_FHSIZE)
    }

    /// A file name component; length is checked later against NAME_MAX so the client
    /// gets NAMETOOLONG rather than GARBAGE_ARGS.
    pub fn filename(&mut self) -> XdrResult<&'a [u8]> {
        self.opaque(MAX_NAME_XDR)
    }

    /// A path (symlink target, mount path).
    pub fn path(&mut self) -> XdrResult<&'a [u8]> {
        self.opaque(MAX_PATH)
    }

    pub fn time(&mut self) -> XdrResult<nfstime3> {
        Ok(nfstime3 {
            seconds: self.u32()?,
            nseconds: self.u32()?,
        })
    }

    fn option_u32(&mut self) -> XdrResult<Nfs3Option<u32>> {
        Ok(if self.bool()? {
            Nfs3Option::Some(self.u32()?)
        } else {
            Nfs3Option::None
        })
    }

    /// `sattr3` (RFC 1813 §2.6).
    pub fn sattr(&mut self) -> XdrResult<sattr3> {
        let mode = self.option_u32()?;
        let uid = self.option_u32()?;
        let gid = self.option_u32()?;
        let size = if self.bool()? {
            Nfs3Option::Some(self.u64()?)
        } else {
            Nfs3Option::None
        };
        let atime = match self.u32()? {
            0 => set_atime::DONT_CHANGE,
            1 => set_atime::SET_TO_SERVER_TIME,
            2 => set_atime::SET_TO_CLIENT_TIME(self.time()?),
            _ => return Err(Garbage),
        };
        let mtime = match self.u32()? {
            0 => set_mtime::DONT_CHANGE,
            1 => set_mtime::SET_TO_SERVER_TIME,
            2 => set_mtime::SET_TO_CLIENT_TIME(self.time()?),
            _ => return Err(Garbage),
        };
        Ok(sattr3 {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
        })
    }

    /// `sattrguard3`: the ctime the client expects, if any.
    pub fn guard(&mut self) -> XdrResult<Option<nfstime3>> {
        Ok(if self.bool()? {
            Some(self.time()?)
        } else {
            None
        })
    }

    pub fn createverf(&mut self) -> XdrResult<createverf3> {
        Ok(createverf3(self.fixed::<8>()?))
    }

    pub fn specdata(&mut self) -> XdrResult<specdata3> {
        Ok(specdata3 {
            specdata1: self.u32()?,
            specdata2: self.u32()?,
        })
    }
}

/// Longest name accepted on the wire; NAME_MAX (255) is enforced with NAMETOOLONG.
pub const MAX_NAME_XDR: usize = 1024;
/// Longest path accepted (PATH_MAX).
pub const MAX_PATH: usize = 4096;

/// Appends `value`'s XDR encoding to `out`.
pub fn put<T: Pack>(out: &mut Vec<u8>, value: &T) {
    // Packing into a Vec cannot fail for the fixed-size and bounded types we build.
    let _ = value.pack(out);
}

pub fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

pub fn put_bool(out: &mut Vec<u8>, v: bool) {
    put_u32(out, u32::from(v));
}

/// Variable-length opaque with padding.
pub fn put_opaque(out: &mut Vec<u8>, data: &[u8]) {
    put_u32(out, data.len() as u32);
    out.extend_from_slice(data);
    out.extend_from_slice(&[0u8; 3][..(4 - data.len() % 4) % 4]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_lengths_beyond_the_record_are_garbage_not_allocations() {
        // Claims 4 GiB of data with none present.
        let mut x = XdrIn::new(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(x.opaque(usize::MAX), Err(Garbage));
        let mut x = XdrIn::new(&[0, 0, 0, 200]);
        assert_eq!(x.opaque(100), Err(Garbage));
    }

    #[test]
    fn opaque_round_trips_with_padding() {
        let mut out = Vec::new();
        put_opaque(&mut out, b"abcde");
        assert_eq!(out.len(), 4 + 8);
        put_u32(&mut out, 7);
        let mut x = XdrIn::new(&out);
        assert_eq!(x.opaque(10), Ok(&b"abcde"[..]));
        assert_eq!(x.u32(), Ok(7));
        assert!(x.remaining().is_empty());
    }

    #[test]
    fn booleans_other_than_zero_or_one_are_garbage() {
        assert_eq!(XdrIn::new(&[0, 0, 0, 2]).bool(), Err(Garbage));
    }

    #[test]
    fn sattr_decodes_every_field() {
        let mut b = Vec::new();
        for v in [1u32, 0o640, 1, 999, 0, 1] {
            put_u32(&mut b, v);
        }
        put_u64(&mut b, 4096);
        put_u32(&mut b, 1); // atime = server
        put_u32(&mut b, 2); // mtime = client
        put_u32(&mut b, 10);
        put_u32(&mut b, 20);
        let s = XdrIn::new(&b).sattr().expect("decodes");
        assert_eq!(s.mode, Nfs3Option::Some(0o640));
        assert_eq!(s.uid, Nfs3Option::Some(999));
        assert_eq!(s.gid, Nfs3Option::None);
        assert_eq!(s.size, Nfs3Option::Some(4096));
        assert!(matches!(s.atime, set_atime::SET_TO_SERVER_TIME));
        assert!(matches!(
            s.mtime,
            set_mtime::SET_TO_CLIENT_TIME(nfstime3 {
                seconds: 10,
                nseconds: 20
            })
        ));
    }
}
