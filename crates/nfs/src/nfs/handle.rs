//! NFS file handles: restart-safe (valid across agent restarts and upgrades) and
//! unforgeable (MAC'd with a per-node key, so no handle leads out of its volume).
//!
//! A handle is the kernel's own persistent handle for the inode (`name_to_handle_at`,
//! the same mechanism knfsd uses; it survives reboots, carries the inode generation so
//! a reused inode number is STALE, and never depends on our process), prefixed with the
//! volume's stable id and sealed with an HMAC-SHA256 tag keyed by the per-node secret.
//! Nothing in it comes from process start time or an in-memory table.
//!
//! Wire layout (at most 64 bytes, RFC 1813 §2.5):
//! `[version=1][kernel handle len][volume id u32][kernel handle type i32][kernel handle][tag 12]`

use ring::hmac;

const VERSION: u8 = 1;
const HEADER: usize = 10;
const TAG: usize = 12;
/// Room for the kernel's handle: 64 − header − tag.
pub const MAX_KERNEL_HANDLE: usize = 64 - HEADER - TAG;

/// A decoded, authenticated handle.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FileHandle {
    pub volume: u32,
    pub kind: i32,
    pub kernel: Vec<u8>,
}

/// Why a handle was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandleError {
    /// Wrong length, version or tag: forged, truncated or altered.
    Bad,
}

/// Seals and opens handles with the node's key.
#[derive(Clone)]
pub struct HandleKey(hmac::Key);

impl std::fmt::Debug for HandleKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HandleKey(..)")
    }
}

impl HandleKey {
    pub fn new(secret: &[u8; 32]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// Encodes and seals a handle. Kernel handles longer than [`MAX_KERNEL_HANDLE`]
    /// (no common filesystem makes one) yield `None`.
    pub fn seal(&self, fh: &FileHandle) -> Option<Vec<u8>> {
        if fh.kernel.len() > MAX_KERNEL_HANDLE {
            return None;
        }
        let mut out = Vec::with_capacity(HEADER + fh.kernel.len() + TAG);
        out.push(VERSION);
        out.push(fh.kernel.len() as u8);
        out.extend_from_slice(&fh.volume.to_be_bytes());
        out.extend_from_slice(&fh.kind.to_be_bytes());
        out.extend_from_slice(&fh.kernel);
        let tag = hmac::sign(&self.0, &out);
        out.extend_from_slice(&tag.as_ref()[..TAG]);
        Some(out)
    }

    /// Checks and decodes a handle from the wire.
    pub fn open(&self, wire: &[u8]) -> Result<FileHandle, HandleError> {
        if wire.len() < HEADER + TAG || wire[0] != VERSION {
            return Err(HandleError::Bad);
        }
        let klen = wire[1] as usize;
        if klen > MAX_KERNEL_HANDLE || wire.len() != HEADER + klen + TAG {
            return Err(HandleError::Bad);
        }
        let (body, tag) = wire.split_at(HEADER + klen);
        let expected = hmac::sign(&self.0, body);
        if !constant_time_eq(&expected.as_ref()[..TAG], tag) {
            return Err(HandleError::Bad);
        }
        Ok(FileHandle {
            volume: u32::from_be_bytes([body[2], body[3], body[4], body[5]]),
            kind: i32::from_be_bytes([body[6], body[7], body[8], body[9]]),
            kernel: body[HEADER..].to_vec(),
        })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fh() -> FileHandle {
        FileHandle {
            volume: 7,
            kind: 1,
            kernel: vec![1, 2, 3, 4, 5, 6, 7, 8],
        }
    }

    #[test]
    fn sealed_handles_open_with_the_same_key() {
        let key = HandleKey::new(&[9; 32]);
        let wire = key.seal(&fh()).expect("fits");
        assert!(wire.len() <= 64);
        assert_eq!(key.open(&wire), Ok(fh()));
    }

    #[test]
    fn altered_truncated_or_foreign_handles_are_refused() {
        let key = HandleKey::new(&[9; 32]);
        let wire = key.seal(&fh()).expect("fits");
        for i in 0..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 0x40;
            assert_eq!(
                key.open(&bad),
                Err(HandleError::Bad),
                "byte {i} flip accepted"
            );
        }
        for cut in 0..wire.len() {
            assert_eq!(key.open(&wire[..cut]), Err(HandleError::Bad));
        }
        let other = HandleKey::new(&[8; 32]);
        assert_eq!(other.open(&wire), Err(HandleError::Bad));
    }

    #[test]
    fn oversized_kernel_handles_are_not_sealed() {
        let key = HandleKey::new(&[9; 32]);
        let big = FileHandle {
            kernel: vec![0; MAX_KERNEL_HANDLE + 1],
            ..fh()
        };
        assert!(key.seal(&big).is_none());
    }
}
