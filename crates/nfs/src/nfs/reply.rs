//! What an NFS procedure answers, and the one place an answer becomes bytes (RFC 1813
//! §3.3).
//!
//! Every NFSv3 reply is a status, then what it carries whatever the status (post-op
//! attributes, wcc data), with a success's results before or after that part. A
//! procedure returns an [`Answer`] once it knows its object, or [`Early`] if it stops
//! before that: its reply then carries the status with empty attributes. [`encode`]
//! writes both, so no procedure writes a reply byte itself and no failure path can
//! leave a reply half-written or shaped unlike its success. MOUNT's answers (no
//! `nfsstat3`) are typed too and written by [`encode_plain`].

use nfs3_types::mount::mountstat3;
use nfs3_types::nfs3::{fattr3, nfsstat3, wcc_attr};

use super::attr;
use super::xdr::{Garbage, put, put_bool, put_opaque, put_u32};

/// Writes a value in its XDR form.
pub trait Encode {
    fn encode(self, out: &mut Vec<u8>);
}

/// A success's results. Most are values ([`Encode`]); READ's data is read from the file
/// straight into the reply as it is written, and a read that fails there turns the reply
/// into that failure.
pub trait Results {
    fn encode_results(self, out: &mut Vec<u8>) -> Result<(), nfsstat3>;
}

impl<E: Encode> Results for E {
    fn encode_results(self, out: &mut Vec<u8>) -> Result<(), nfsstat3> {
        self.encode(out);
        Ok(())
    }
}

impl Encode for () {
    fn encode(self, _: &mut Vec<u8>) {}
}

impl<A: Encode, B: Encode> Encode for (A, B) {
    fn encode(self, out: &mut Vec<u8>) {
        self.0.encode(out);
        self.1.encode(out);
    }
}

/// ACCESS's granted bits.
impl Encode for u32 {
    fn encode(self, out: &mut Vec<u8>) {
        put_u32(out, self);
    }
}

/// A write verifier (COMMIT's result).
impl Encode for [u8; 8] {
    fn encode(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self);
    }
}

/// GETATTR's result.
impl Encode for fattr3 {
    fn encode(self, out: &mut Vec<u8>) {
        put(out, &self);
    }
}

/// `post_op_attr`: an object's attributes after the call, if they could be read.
#[derive(Default)]
pub struct PostOp(Option<fattr3>);

impl PostOp {
    pub fn of(st: Option<&libc::stat>, fsid: u32) -> PostOp {
        PostOp(st.map(|st| attr::fattr(st, fsid)))
    }
}

impl Encode for PostOp {
    fn encode(self, out: &mut Vec<u8>) {
        put_bool(out, self.0.is_some());
        if let Some(a) = self.0 {
            put(out, &a);
        }
    }
}

/// `wcc_data`: an object's attributes before and after a change.
#[derive(Default)]
pub struct Wcc {
    before: Option<wcc_attr>,
    after: PostOp,
}

impl Wcc {
    pub fn of(before: Option<&libc::stat>, after: Option<&libc::stat>, fsid: u32) -> Wcc {
        Wcc {
            before: before.map(attr::wcc),
            after: PostOp::of(after, fsid),
        }
    }
}

impl Encode for Wcc {
    fn encode(self, out: &mut Vec<u8>) {
        put_bool(out, self.before.is_some());
        if let Some(b) = self.before {
            put(out, &b);
        }
        self.after.encode(out);
    }
}

/// `post_op_fh3`.
pub struct PostOpFh(pub Option<Vec<u8>>);

impl Encode for PostOpFh {
    fn encode(self, out: &mut Vec<u8>) {
        put_bool(out, self.0.is_some());
        if let Some(fh) = self.0 {
            put_opaque(out, &fh);
        }
    }
}

/// A handle that is always there (LOOKUP's result).
pub struct Fh(pub Vec<u8>);

impl Encode for Fh {
    fn encode(self, out: &mut Vec<u8>) {
        put_opaque(out, &self.0);
    }
}

/// A symbolic link's target (READLINK's result).
pub struct Target(pub Vec<u8>);

impl Encode for Target {
    fn encode(self, out: &mut Vec<u8>) {
        put_opaque(out, &self.0);
    }
}

/// A procedure's answer: `head` and `tail` go out whatever the status, the results
/// between them only on success.
pub struct Answer<T, H = (), F = ()> {
    pub head: H,
    pub result: Result<T, nfsstat3>,
    pub tail: F,
}

impl<T, H> Answer<T, H> {
    /// Status, `head`, then the results (most procedures).
    pub fn with(head: H, result: Result<T, nfsstat3>) -> Self {
        Answer {
            head,
            result,
            tail: (),
        }
    }
}

impl<T, F> Answer<T, (), F> {
    /// Status, the results, then `tail` (LOOKUP, and the calls that create).
    pub fn then(result: Result<T, nfsstat3>, tail: F) -> Self {
        Answer {
            head: (),
            result,
            tail,
        }
    }
}

/// A call that stopped before it knew its object. `?` on a status converts to it, so
/// in a procedure `?` belongs to the steps before the object resolved: once it has,
/// the outcome goes in [`Answer::result`], which keeps the attributes with it.
#[derive(Debug)]
pub enum Early {
    /// Its arguments do not decode: RPC GARBAGE_ARGS.
    Garbage,
    /// This status, with empty attributes.
    Status(nfsstat3),
    /// A READ tried on the connection task whose data is not all in the page cache:
    /// nothing was done, the call moves to the blocking pool.
    WouldBlock,
}

impl From<Garbage> for Early {
    fn from(_: Garbage) -> Self {
        Early::Garbage
    }
}

impl From<nfsstat3> for Early {
    fn from(s: nfsstat3) -> Self {
        Early::Status(s)
    }
}

/// What a procedure returns.
pub type Proc<T, H = (), F = ()> = Result<Answer<T, H, F>, Early>;

/// Writes `answer`'s reply to `out`; a call that stopped early is answered with its
/// status and empty attributes in the shape of its success. Garbage and WouldBlock
/// write nothing and are passed back for the RPC layer.
pub fn encode<T: Results, H: Encode + Default, F: Encode + Default>(
    answer: Proc<T, H, F>,
    out: &mut Vec<u8>,
) -> Result<(), Early> {
    let a = match answer {
        Ok(a) => a,
        Err(Early::Status(s)) => Answer {
            head: H::default(),
            result: Err(s),
            tail: F::default(),
        },
        Err(e) => return Err(e),
    };
    let (status, results) = match a.result {
        Ok(t) => (nfsstat3::NFS3_OK, Some(t)),
        Err(s) => (s, None),
    };
    let start = out.len();
    put_u32(out, status as u32);
    a.head.encode(out);
    if let Some(t) = results {
        let head_end = out.len();
        if let Err(s) = t.encode_results(out) {
            // The same reply with that status and no results.
            out.truncate(head_end);
            out[start..start + 4].copy_from_slice(&(s as u32).to_be_bytes());
        }
    }
    a.tail.encode(out);
    Ok(())
}

/// MNT's answer (RFC 1813 appendix I, `mountres3`): the volume's root handle and the
/// one auth flavor accepted, or why not.
pub enum Mnt {
    Ok { fh: Vec<u8>, flavor: u32 },
    Refused(mountstat3),
}

impl Encode for Mnt {
    fn encode(self, out: &mut Vec<u8>) {
        match self {
            Mnt::Ok { fh, flavor } => {
                put_u32(out, mountstat3::MNT3_OK as u32);
                put_opaque(out, &fh);
                put_u32(out, 1);
                put_u32(out, flavor);
            }
            Mnt::Refused(s) => put_u32(out, s as u32),
        }
    }
}

/// An XDR optional-data list (`mountlist`, `exports`): each item preceded by TRUE,
/// the end by FALSE.
pub struct List<T>(pub Vec<T>);

impl<T: Encode> Encode for List<T> {
    fn encode(self, out: &mut Vec<u8>) {
        for item in self.0 {
            put_bool(out, true);
            item.encode(out);
        }
        put_bool(out, false);
    }
}

/// A DUMP entry (`mountbody` without its link): who mounted which path.
pub struct MountEntry {
    pub host: String,
    pub dir: String,
}

impl Encode for MountEntry {
    fn encode(self, out: &mut Vec<u8>) {
        put_opaque(out, self.host.as_bytes());
        put_opaque(out, self.dir.as_bytes());
    }
}

/// An EXPORT entry (`exportnode` without its link): a path, with an empty group list
/// (a list would name other clients).
pub struct ExportEntry(pub String);

impl Encode for ExportEntry {
    fn encode(self, out: &mut Vec<u8>) {
        put_opaque(out, self.0.as_bytes());
        put_bool(out, false);
    }
}

/// Writes the answer of a procedure whose results carry no `nfsstat3` (MOUNT's: MNT's
/// own status, lists, or nothing), as [`encode`] does for NFS's.
pub fn encode_plain<T: Encode>(answer: Result<T, Garbage>, out: &mut Vec<u8>) -> Result<(), Early> {
    answer?.encode(out);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes<T: Results, H: Encode + Default, F: Encode + Default>(a: Proc<T, H, F>) -> Vec<u8> {
        let mut out = Vec::new();
        encode(a, &mut out).expect("encodes");
        out
    }

    fn words(w: &[u32]) -> Vec<u8> {
        w.iter().flat_map(|x| x.to_be_bytes()).collect()
    }

    #[test]
    fn an_early_failure_has_the_shape_of_its_success_with_empty_attributes() {
        // REMOVE: status, wcc (no before, no after).
        let early: Proc<(), Wcc> = Err(Early::Status(nfsstat3::NFS3ERR_STALE));
        assert_eq!(bytes(early), words(&[70, 0, 0]));
        // LINK: status, post_op_attr, wcc.
        let early: Proc<(), (PostOp, Wcc)> = Err(nfsstat3::NFS3ERR_BADHANDLE.into());
        assert_eq!(bytes(early), words(&[10001, 0, 0, 0]));
        // GETATTR: the status alone.
        let early: Proc<fattr3> = Err(nfsstat3::NFS3ERR_ACCES.into());
        assert_eq!(bytes(early), words(&[13]));
    }

    #[test]
    fn results_go_between_head_and_tail_only_on_success() {
        let ok: Proc<Fh, (), PostOp> = Ok(Answer::then(Ok(Fh(vec![1, 2, 3, 4, 5])), PostOp(None)));
        assert_eq!(
            bytes(ok),
            [words(&[0, 5]), vec![1, 2, 3, 4, 5, 0, 0, 0], words(&[0])].concat()
        );
        let failed: Proc<u32, PostOp> = Ok(Answer::with(PostOp(None), Err(nfsstat3::NFS3ERR_IO)));
        assert_eq!(bytes(failed), words(&[5, 0]));
        let ok: Proc<u32, PostOp> = Ok(Answer::with(PostOp(None), Ok(0x1f)));
        assert_eq!(bytes(ok), words(&[0, 0, 0x1f]));
    }

    #[test]
    fn garbage_and_would_block_write_nothing() {
        let mut out = Vec::new();
        let g: Proc<()> = Err(Early::Garbage);
        assert!(matches!(encode(g, &mut out), Err(Early::Garbage)));
        let w: Proc<()> = Err(Early::WouldBlock);
        assert!(matches!(encode(w, &mut out), Err(Early::WouldBlock)));
        assert!(out.is_empty());
    }
}
