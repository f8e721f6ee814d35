//! The procedure table: one row per NFSv3 and MOUNT v3 procedure, the only place that
//! says what a procedure number means (the shape of knfsd's `nfsd_procedures3[]`).
//! A row holds the procedure's name (the metrics' label), its number, what runs it
//! (the handler, which decodes its arguments from the call and returns a typed answer
//! that `reply` encodes), where it runs (tried on the connection task or sent to the
//! blocking pool) and how large its reply can get (charged to the byte budget before
//! it runs). `conn` looks rows up and does connection I/O only.
//!
//! Adding a procedure is one row here (and its handler).

use super::dirops;
use super::limits::MAX_IO;
use super::mount;
use super::ops::{self, Ctx};
use super::program::{MOUNT_PROGRAM, NFS_PROGRAM, VERSION, mount3, nfs3};
use super::reply::{Early, encode, encode_plain};
use super::rpc;
use super::splice::Piped;
use super::stats::{MOUNT_SLOTS, SLOTS};
use super::sys;
use super::xdr::{Garbage, XdrIn};

/// What a reply other than READ's and READDIR's data can take: attributes, wcc data,
/// a handle, a path (RFC 1813 limits each).
pub const SMALL_RESULT: usize = 4 * 1024;

/// Where a READ's data may go instead of the reply bytes: `Some` only on a
/// blocking-pool thread that writes the reply itself (large READs splice).
pub type Splice<'s> = Option<&'s mut Option<Piped>>;

/// Decodes a call's arguments, runs it and writes its results (after the RPC header,
/// through `reply`). Garbage and WouldBlock come back for the RPC layer.
pub type Handler = fn(&Ctx, &mut XdrIn, &mut Vec<u8>, Splice) -> Result<(), Early>;

/// Where a procedure runs.
#[derive(Clone, Copy)]
pub enum Runs {
    /// Tried on the connection task: it only reads attributes, or (READ) runs there
    /// only when the page cache holds its data; a call that would wait for the disk
    /// stops with `Early::WouldBlock` (nothing done) and moves to the blocking pool
    /// (see `Ctx::cached_only`).
    Inline,
    /// Tried on the connection task when this says the dentry cache can answer it
    /// (LOOKUP: the thread's credentials are switched for its one synchronous step,
    /// and put back before the task can yield), else as [`Runs::Inline`] would.
    InlineIf(fn() -> bool),
    /// May wait for the disk or changes the namespace: the blocking pool.
    Pool,
}

/// The largest reply a procedure can produce, known from its arguments before it runs.
#[derive(Clone, Copy)]
pub enum Bound {
    /// Attributes, wcc data, a handle, a path: [`SMALL_RESULT`].
    Small,
    /// [`SMALL_RESULT`] plus the data the client asked for, read by this from the
    /// arguments (RFC 1813 §3.3.6, §3.3.16, §3.3.17) and clamped to [`MAX_IO`].
    Data(fn(&mut XdrIn) -> Result<u32, Garbage>),
}

/// One procedure.
pub struct Procedure {
    pub name: &'static str,
    pub number: u32,
    pub handler: Handler,
    pub runs: Runs,
    pub bound: Bound,
}

const fn row(name: &'static str, number: u32, handler: Handler, runs: Runs) -> Procedure {
    Procedure {
        name,
        number,
        handler,
        runs,
        bound: Bound::Small,
    }
}

const fn bounded(name: &'static str, number: u32, handler: Handler, bound: Bound) -> Procedure {
    Procedure {
        name,
        number,
        handler,
        runs: Runs::Pool,
        bound,
    }
}

/// NFSv3, row `n` is procedure `n` (a test checks).
pub static NFS3: [Procedure; nfs3::COUNT] = [
    row("NULL", nfs3::NULL, |_, _, _, _| Ok(()), Runs::Inline),
    row(
        "GETATTR",
        nfs3::GETATTR,
        |c, a, o, _| encode(ops::getattr(c, a), o),
        Runs::Inline,
    ),
    row(
        "SETATTR",
        nfs3::SETATTR,
        |c, a, o, _| encode(ops::setattr(c, a), o),
        Runs::Pool,
    ),
    row(
        "LOOKUP",
        nfs3::LOOKUP,
        |c, a, o, _| encode(dirops::lookup(c, a), o),
        Runs::InlineIf(sys::cached_lookups),
    ),
    row(
        "ACCESS",
        nfs3::ACCESS,
        |c, a, o, _| encode(ops::access(c, a), o),
        Runs::Inline,
    ),
    row(
        "READLINK",
        nfs3::READLINK,
        |c, a, o, _| encode(ops::readlink(c, a), o),
        Runs::Pool,
    ),
    Procedure {
        name: "READ",
        number: nfs3::READ,
        handler: |c, a, o, s| encode(ops::read(c, a, s), o),
        runs: Runs::Inline,
        bound: Bound::Data(|a| {
            a.opaque(64)?; // the handle
            a.u64()?; // offset
            a.u32() // count
        }),
    },
    row(
        "WRITE",
        nfs3::WRITE,
        |c, a, o, _| encode(ops::write(c, a), o),
        Runs::Pool,
    ),
    row(
        "CREATE",
        nfs3::CREATE,
        |c, a, o, _| encode(dirops::create(c, a), o),
        Runs::Pool,
    ),
    row(
        "MKDIR",
        nfs3::MKDIR,
        |c, a, o, _| encode(dirops::mkdir(c, a), o),
        Runs::Pool,
    ),
    row(
        "SYMLINK",
        nfs3::SYMLINK,
        |c, a, o, _| encode(dirops::symlink(c, a), o),
        Runs::Pool,
    ),
    row(
        "MKNOD",
        nfs3::MKNOD,
        |c, a, o, _| encode(dirops::mknod(c, a), o),
        Runs::Pool,
    ),
    row(
        "REMOVE",
        nfs3::REMOVE,
        |c, a, o, _| encode(dirops::remove(c, a), o),
        Runs::Pool,
    ),
    row(
        "RMDIR",
        nfs3::RMDIR,
        |c, a, o, _| encode(dirops::rmdir(c, a), o),
        Runs::Pool,
    ),
    row(
        "RENAME",
        nfs3::RENAME,
        |c, a, o, _| encode(dirops::rename(c, a), o),
        Runs::Pool,
    ),
    row(
        "LINK",
        nfs3::LINK,
        |c, a, o, _| encode(dirops::link(c, a), o),
        Runs::Pool,
    ),
    bounded(
        "READDIR",
        nfs3::READDIR,
        |c, a, o, _| encode(dirops::readdir(c, a, false), o),
        Bound::Data(|a| {
            a.opaque(64)?; // the handle
            a.u64()?; // cookie
            a.fixed::<8>()?; // cookieverf
            a.u32() // count
        }),
    ),
    bounded(
        "READDIRPLUS",
        nfs3::READDIRPLUS,
        |c, a, o, _| encode(dirops::readdir(c, a, true), o),
        Bound::Data(|a| {
            a.opaque(64)?; // the handle
            a.u64()?; // cookie
            a.fixed::<8>()?; // cookieverf
            a.u32()?; // dircount
            a.u32() // maxcount
        }),
    ),
    row(
        "FSSTAT",
        nfs3::FSSTAT,
        |c, a, o, _| encode(ops::fsstat(c, a), o),
        Runs::Inline,
    ),
    row(
        "FSINFO",
        nfs3::FSINFO,
        |c, a, o, _| encode(ops::fsinfo(c, a), o),
        Runs::Inline,
    ),
    row(
        "PATHCONF",
        nfs3::PATHCONF,
        |c, a, o, _| encode(ops::pathconf(c, a), o),
        Runs::Inline,
    ),
    row(
        "COMMIT",
        nfs3::COMMIT,
        |c, a, o, _| encode(ops::commit(c, a), o),
        Runs::Pool,
    ),
];

/// MOUNT v3, row `n` is procedure `n` (a test checks). Every one runs on the pool (MNT
/// may re-read the store) and answers small.
pub static MOUNT3: [Procedure; mount3::COUNT] = [
    row("NULL", mount3::NULL, |_, _, _, _| Ok(()), Runs::Pool),
    row(
        "MNT",
        mount3::MNT,
        |c, a, o, _| encode_plain(mount::mnt(c, a), o),
        Runs::Pool,
    ),
    row(
        "DUMP",
        mount3::DUMP,
        |c, a, o, _| encode_plain(mount::dump(c, a), o),
        Runs::Pool,
    ),
    row(
        "UMNT",
        mount3::UMNT,
        |c, a, o, _| encode_plain(mount::umnt(c, a), o),
        Runs::Pool,
    ),
    row(
        "UMNTALL",
        mount3::UMNTALL,
        |c, a, o, _| encode_plain(mount::umntall(c, a), o),
        Runs::Pool,
    ),
    row(
        "EXPORT",
        mount3::EXPORT,
        |c, a, o, _| encode_plain(mount::export(c, a), o),
        Runs::Pool,
    ),
];

/// What a call to `procedure` of program `prog` version `vers` finds.
pub enum Found {
    Procedure(&'static Procedure),
    /// A program served, in another version: PROG_MISMATCH.
    OtherVersion,
    /// A program served, a procedure it does not have: PROC_UNAVAIL.
    NoProcedure,
    /// Not a program served: PROG_UNAVAIL.
    NoProgram,
}

pub fn find(prog: u32, vers: u32, procedure: u32) -> Found {
    let rows: &'static [Procedure] = match (prog, vers) {
        (NFS_PROGRAM, VERSION) => &NFS3,
        (MOUNT_PROGRAM, VERSION) => &MOUNT3,
        (NFS_PROGRAM | MOUNT_PROGRAM, _) => return Found::OtherVersion,
        _ => return Found::NoProgram,
    };
    numbered(rows, procedure).map_or(Found::NoProcedure, Found::Procedure)
}

/// The row of `procedure` in `rows`: at its number's index (checked, so a misplaced
/// row answers PROC_UNAVAIL rather than running another procedure).
fn numbered(rows: &'static [Procedure], procedure: u32) -> Option<&'static Procedure> {
    rows.get(procedure as usize)
        .filter(|p| p.number == procedure)
}

/// Big-endian word `i` of a record (for decisions made before it is decoded).
fn word(record: &[u8], i: usize) -> Option<u32> {
    record
        .get(4 * i..4 * i + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Which of a volume's ceilings a call counts against (see `qos`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Read = 0,
    Write = 1,
}

/// The direction of the NFSv3 call in `record`, from its header words alone: READ,
/// READDIR, READDIRPLUS and READLINK read; WRITE, COMMIT, SETATTR and the namespace
/// changes write. The rest (GETATTR, LOOKUP, ACCESS, FSSTAT, FSINFO, PATHCONF, NULL,
/// MOUNT) only read attributes: they count against no ceiling.
pub fn direction(record: &[u8]) -> Option<Direction> {
    if word(record, 3) != Some(NFS_PROGRAM) || word(record, 4) != Some(VERSION) {
        return None;
    }
    match word(record, 5)? {
        nfs3::READ | nfs3::READDIR | nfs3::READDIRPLUS | nfs3::READLINK => Some(Direction::Read),
        p if changes(p) => Some(Direction::Write),
        _ => None,
    }
}

/// Words of empty attributes after the status in NFSv3 procedure `proc`'s failure
/// reply (RFC 1813 §3.3, each `...3resfail`): a `post_op_attr` without attributes is
/// one word, `wcc_data` two (neither before nor after attributes).
pub fn failure_words(proc: u32) -> usize {
    match proc {
        nfs3::GETATTR => 0,
        nfs3::LOOKUP
        | nfs3::ACCESS
        | nfs3::READLINK
        | nfs3::READ
        | nfs3::READDIR
        | nfs3::READDIRPLUS
        | nfs3::FSSTAT
        | nfs3::FSINFO
        | nfs3::PATHCONF => 1,
        // the file's post_op_attr, the directory's wcc_data
        nfs3::LINK => 3,
        // both directories' wcc_data
        nfs3::RENAME => 4,
        // SETATTR, WRITE, the calls that create or remove, COMMIT: wcc_data
        _ => 2,
    }
}

/// Whether NFSv3 procedure `proc` changes the volume: WRITE, COMMIT, SETATTR and the
/// namespace changes (each syncs what it changed before its reply).
pub fn changes(proc: u32) -> bool {
    matches!(
        proc,
        nfs3::WRITE
            | nfs3::COMMIT
            | nfs3::CREATE
            | nfs3::MKDIR
            | nfs3::SYMLINK
            | nfs3::MKNOD
            | nfs3::REMOVE
            | nfs3::RMDIR
            | nfs3::RENAME
            | nfs3::LINK
            | nfs3::SETATTR
    )
}

/// Whether the call in `record` is tried on the connection task (see [`Runs`]), from
/// its header words alone: NFS (any version, which answers a mismatch inline) and the
/// procedure's row.
pub fn try_inline(record: &[u8]) -> bool {
    if word(record, 3) != Some(NFS_PROGRAM) {
        return false;
    }
    match word(record, 5).and_then(|p| numbered(&NFS3, p)) {
        Some(Procedure {
            runs: Runs::Inline, ..
        }) => true,
        Some(Procedure {
            runs: Runs::InlineIf(cached),
            ..
        }) => cached(),
        _ => false,
    }
}

/// The largest reply `record`'s call can produce, charged before it runs (see
/// [`Bound`]); calls that are not NFSv3, or whose arguments do not decode, answer small.
pub fn reply_bound(record: &[u8]) -> usize {
    // Only the rows with a data bound need the call decoded.
    let data = word(record, 3) == Some(NFS_PROGRAM)
        && word(record, 4) == Some(VERSION)
        && matches!(
            word(record, 5).and_then(|p| numbered(&NFS3, p)),
            Some(Procedure {
                bound: Bound::Data(_),
                ..
            })
        );
    if !data {
        return SMALL_RESULT;
    }
    let Ok(call) = rpc::parse_call(record) else {
        return SMALL_RESULT;
    };
    if (call.prog, call.vers) != (NFS_PROGRAM, VERSION) {
        return SMALL_RESULT;
    }
    let mut args = call.args;
    let data = match numbered(&NFS3, call.procedure).map(|p| p.bound) {
        Some(Bound::Data(read)) => read(&mut args).unwrap_or(0),
        Some(Bound::Small) | None => 0,
    };
    data.min(MAX_IO) as usize + SMALL_RESULT
}

/// `(program, procedure)` label values of a call counter slot (see `stats::slot`).
pub fn slot_labels(slot: usize) -> (&'static str, &'static str) {
    match slot {
        s if s < MOUNT_SLOTS => ("nfs", NFS3[s].name),
        s if s < SLOTS - 1 => ("mount", MOUNT3[s - MOUNT_SLOTS].name),
        _ => ("other", "other"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nfs::stats::{OTHER_SLOT, slot, slot_of_record};
    use crate::nfs::xdr::{put_opaque, put_u32};

    #[test]
    fn row_n_is_procedure_n() {
        for (i, p) in NFS3.iter().enumerate() {
            assert_eq!(p.number as usize, i, "NFS {}", p.name);
        }
        for (i, p) in MOUNT3.iter().enumerate() {
            assert_eq!(p.number as usize, i, "MOUNT {}", p.name);
        }
    }

    #[test]
    fn every_procedure_has_its_own_labels() {
        let label = |prog, procedure| slot_labels(slot(prog, VERSION, procedure));
        assert_eq!(label(NFS_PROGRAM, nfs3::GETATTR), ("nfs", "GETATTR"));
        assert_eq!(label(NFS_PROGRAM, nfs3::COMMIT), ("nfs", "COMMIT"));
        assert_eq!(label(MOUNT_PROGRAM, mount3::MNT), ("mount", "MNT"));
        assert_eq!(label(MOUNT_PROGRAM, mount3::EXPORT), ("mount", "EXPORT"));
        assert_eq!(slot_labels(OTHER_SLOT), ("other", "other"));
        let mut record = Vec::new();
        for w in [1, 0, 2, MOUNT_PROGRAM, VERSION, mount3::MNT] {
            put_u32(&mut record, w);
        }
        assert_eq!(slot_labels(slot_of_record(&record)), ("mount", "MNT"));
    }

    /// An NFSv3 call record of `procedure` with `args`.
    fn call(procedure: u32, args: &[u32]) -> Vec<u8> {
        let mut b = Vec::new();
        for v in [1, 0, 2, NFS_PROGRAM, VERSION, procedure, 0] {
            put_u32(&mut b, v);
        }
        put_opaque(&mut b, &[]); // AUTH_NONE credential
        put_u32(&mut b, 0);
        put_opaque(&mut b, &[]);
        put_opaque(&mut b, &[9; 32]); // the handle
        for a in args {
            put_u32(&mut b, *a);
        }
        b
    }

    #[test]
    fn the_largest_reply_is_charged_before_the_call_runs() {
        let max = MAX_IO as usize + SMALL_RESULT;
        let cases = [
            ("GETATTR", call(nfs3::GETATTR, &[]), SMALL_RESULT),
            (
                "READ 64 KiB",
                call(nfs3::READ, &[0, 0, 65536]),
                65536 + SMALL_RESULT,
            ),
            ("READ 4 GiB", call(nfs3::READ, &[0, 0, u32::MAX]), max),
            (
                "READDIR 8 KiB",
                call(nfs3::READDIR, &[0, 0, 0, 0, 8192]),
                8192 + SMALL_RESULT,
            ),
            (
                "READDIRPLUS huge",
                call(nfs3::READDIRPLUS, &[0, 0, 0, 0, 1024, u32::MAX]),
                max,
            ),
            ("READ cut short", call(nfs3::READ, &[0]), SMALL_RESULT),
            ("garbage", vec![1, 2, 3], SMALL_RESULT),
        ];
        for (what, record, want) in cases {
            assert_eq!(reply_bound(&record), want, "{what}");
        }
    }

    #[test]
    fn attribute_calls_are_tried_inline_and_the_rest_go_to_the_pool() {
        for p in [
            nfs3::NULL,
            nfs3::GETATTR,
            nfs3::ACCESS,
            nfs3::READ,
            nfs3::FSSTAT,
        ] {
            assert!(try_inline(&call(p, &[])), "{}", NFS3[p as usize].name);
        }
        for p in [
            nfs3::WRITE,
            nfs3::CREATE,
            nfs3::COMMIT,
            nfs3::READDIRPLUS,
            99,
        ] {
            assert!(!try_inline(&call(p, &[])), "procedure {p}");
        }
        let mut mount = call(mount3::NULL, &[]);
        mount[12..16].copy_from_slice(&MOUNT_PROGRAM.to_be_bytes());
        assert!(!try_inline(&mount));
    }
}
