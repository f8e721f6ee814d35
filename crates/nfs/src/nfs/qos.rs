//! Per-volume service, decided before a call runs: which volume a call belongs to
//! (from its file handle, authenticated like any other use of it), whether it is a
//! read or a write call (the procedure table's `direction`), how long the volume's
//! ceilings hold it (`throttle`), and its weight, cost and class in the fair queue
//! (`pool`: durable calls, those that sync before their reply, go before other
//! volumes' unstable WRITEs), and how much room its volume has for calls read and
//! not yet run ([`ROOM_KIB`]; what a connection does without room is [`when_full`]).
//! `conn` asks [`route`] for each call that may reach the blocking pool or a ceiling.
//!
//! A call whose handle does not authenticate, names no exported volume, or names one
//! the client may not use is routed to no volume (key 0, default weight, no ceiling):
//! it fails fast in its handler, and a forged handle can neither spend another
//! volume's ceiling nor take its place in the queue.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::handle::FileHandle;
use super::limits::MAX_IO;
use super::pool::{Class, Ticket};
use super::program::nfs3;
use super::rpc;
use super::state::{Exports, Volume};
use super::table;
use super::table::Direction;
use super::throttle::Throttle;
use super::writeback::Backlog;
use super::xdr::XdrIn;
use crate::volume::{DEFAULT_WEIGHT, VolumeSpec};

/// Bytes of one volume's calls that may wait for its ceilings at once, in KiB (the
/// unit of [`VolumeQos::parked`]). Past it the connections sending them stop reading
/// until some leave: the byte budget is the whole server's, and a throttled volume
/// must not fill it with calls that will wait. (Stopping a connection stops it for
/// every volume it carries: see the known limit in `docs/nfs-server.md`.)
pub const PARKED_KIB: usize = 16 * 1024;

/// Room for one volume's calls queued or running (read and not yet answered), in KiB
/// of records plus their replies' data: a connection whose next call finds its volume
/// out of room stops reading until some leaves (see [`when_full`]), so a flooding
/// volume's records wait in its clients' sockets, not in the agent, and the cores that
/// would read them serve the other volumes. A quarter of the default byte budget.
pub const ROOM_KIB: usize = 32 * 1024;
/// Most calls of one volume queued or running: each takes at least this share of
/// [`ROOM_KIB`], so small calls are bounded by count as large ones are by bytes.
pub const ROOM_CALLS: usize = 64;

/// A unit of cost in the fair queue: one call, plus one per this many data bytes (a
/// 1 MiB WRITE keeps a worker far longer than a GETATTR).
const COST_BYTES: u64 = 32 * 1024;

/// One volume's service state.
#[derive(Debug)]
pub struct VolumeQos {
    pub weight: u32,
    throttle: Mutex<Throttle>,
    /// Whether any ceiling is set: calls of volumes without one skip the lock.
    limited: bool,
    origin: Instant,
    /// Room for calls waiting for a ceiling, in KiB (see [`PARKED_KIB`]).
    pub parked: Arc<Semaphore>,
    /// Nanoseconds calls were held by the ceilings, by direction (read, write).
    pub throttled_ns: [AtomicU64; 2],
    /// Nanoseconds calls waited in the fair queue for a worker.
    pub queued_ns: AtomicU64,
    /// Unstable bytes not yet written out (see `writeback`).
    pub backlog: Backlog,
    /// Room for calls queued or running, in KiB (see [`ROOM_KIB`]).
    pub room: Arc<Semaphore>,
}

impl VolumeQos {
    pub fn of(spec: &VolumeSpec) -> Self {
        let throttle = Throttle::of(spec);
        Self {
            weight: spec.weight(),
            limited: throttle.read.any() || throttle.write.any(),
            throttle: Mutex::new(throttle),
            origin: Instant::now(),
            parked: Arc::new(Semaphore::new(PARKED_KIB)),
            throttled_ns: [AtomicU64::new(0), AtomicU64::new(0)],
            queued_ns: AtomicU64::new(0),
            backlog: Backlog::default(),
            room: Arc::new(Semaphore::new(ROOM_KIB)),
        }
    }

    /// Reserves a `direction` call of `bytes` against the ceilings; how long its reply
    /// must be held (counted in [`VolumeQos::throttled_ns`]).
    pub fn admit(&self, direction: Direction, bytes: u64) -> Duration {
        if !self.limited {
            return Duration::ZERO;
        }
        let now = self.origin.elapsed().as_secs_f64();
        let wait = {
            let mut t = self.throttle.lock().unwrap_or_else(|p| p.into_inner());
            match direction {
                Direction::Read => t.read.admit(now, bytes),
                Direction::Write => t.write.admit(now, bytes),
            }
        };
        let wait = Duration::from_secs_f64(wait);
        let ns = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
        self.throttled_ns[direction as usize].fetch_add(ns, Ordering::Relaxed);
        wait
    }

    /// Counts time a call waited for a worker.
    pub fn queued(&self, waited: Duration) {
        let ns = u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX);
        self.queued_ns.fetch_add(ns, Ordering::Relaxed);
    }
}

/// Where a call goes.
pub struct Route {
    pub volume: Option<Arc<Volume>>,
    pub direction: Option<Direction>,
    /// Data bytes it reads or writes (READ's count, WRITE's data).
    pub bytes: u64,
    /// Whether it syncs, adds unstable data, or neither (the pool's order).
    pub class: Class,
    /// What routing decoded, for the call's run (`call::respond`): None for a record
    /// that is no NFSv3 call with a handle.
    pub known: Option<Known>,
}

/// A routed call's header and its handle as routing opened it, so that its run
/// neither decodes the call nor checks the handle's MAC again.
pub struct Known {
    pub head: rpc::Head,
    /// Where the handle is in the record, opened; None if it did not authenticate.
    pub handle: Option<(std::ops::Range<usize>, FileHandle)>,
}

impl Route {
    /// The fair queue's key: the volume id, 0 for none.
    pub fn key(&self) -> u32 {
        self.volume.as_ref().map_or(0, |v| v.meta.id)
    }

    pub fn weight(&self) -> u32 {
        self.volume
            .as_ref()
            .map_or(DEFAULT_WEIGHT, |v| v.qos.weight)
    }

    pub fn cost(&self) -> u32 {
        u32::try_from(1 + self.bytes / COST_BYTES).unwrap_or(u32::MAX)
    }

    /// Its place in the pool's queue.
    pub fn ticket(&self) -> Ticket {
        Ticket {
            key: self.key(),
            weight: self.weight(),
            cost: self.cost(),
            class: self.class,
        }
    }

    /// How long the volume's ceilings hold the call (zero for calls of no volume and
    /// attribute-only calls).
    pub fn admit(&self) -> Duration {
        match (&self.volume, self.direction) {
            (Some(v), Some(d)) => v.qos.admit(d, self.bytes),
            _ => Duration::ZERO,
        }
    }

    /// The KiB of [`VolumeQos::parked`] a call of `record_len` bytes takes while it
    /// waits (its record and a reply's worth, as the byte budget counts it).
    pub fn parked_kib(&self, record_len: usize) -> u32 {
        let kib = (record_len + self.bytes as usize) / 1024 + 4;
        u32::try_from(kib.min(PARKED_KIB)).unwrap_or(u32::MAX)
    }

    /// The KiB of [`VolumeQos::room`] a call of `record_len` bytes takes while queued
    /// or running: its record and the data its reply can carry (a WRITE's data is in
    /// its record already).
    pub fn room_kib(&self, record_len: usize) -> u32 {
        let reply = match self.direction {
            Some(Direction::Read) => self.bytes as usize,
            _ => 0,
        };
        let kib = (record_len + reply) / 1024 + 4;
        let kib = kib.clamp(ROOM_KIB / ROOM_CALLS, ROOM_KIB);
        u32::try_from(kib).unwrap_or(u32::MAX)
    }
}

/// What a connection does with a call whose volume is out of room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// Waits for room before reading its next record: its client's calls back up
    /// in its socket, and it pays for its own volume's flood only.
    Wait,
    /// Queues it anyway: the connection carries other volumes' calls too (a kernel
    /// client sends all of one server's volumes down one connection), and waiting
    /// would hold theirs behind this volume's; the byte budget still bounds it.
    Overdraw,
    /// Answers NFS3ERR_JUKEBOX ("try again later", RFC 1813 §2.6: clients retry
    /// it, the Linux client after a delay) without running it: the byte budget is
    /// over half spent, and queueing more of a full volume's calls would leave the
    /// connection, and every volume it carries, waiting for the budget.
    Jukebox,
}

/// What to do with a call whose volume is out of room, on a connection that has
/// carried calls of more than one volume (`mixed`), while `held` bytes of the
/// server's budget of `limit` are in use.
pub fn when_full(mixed: bool, held: usize, limit: usize) -> Full {
    if !mixed {
        Full::Wait
    } else if held <= limit / 2 {
        Full::Overdraw
    } else {
        Full::Jukebox
    }
}

/// Routes the call in `record` from `client`; `direction` is the procedure table's
/// answer for it.
pub fn route(ex: &Exports, client: IpAddr, record: &[u8], direction: Option<Direction>) -> Route {
    let none = Route {
        volume: None,
        direction,
        bytes: 0,
        class: Class::Other,
        known: None,
    };
    let Ok(call) = rpc::parse_call(record) else {
        return none;
    };
    if call.prog != super::program::NFS_PROGRAM || call.procedure == nfs3::NULL {
        return none;
    }
    let (head, mut args) = rpc::Head::split(call, record);
    // Every NFSv3 procedure but NULL starts with a handle (RFC 1813 §3.3).
    let Ok(fh) = args.fh() else {
        return none;
    };
    let at = (fh.as_ptr() as usize).wrapping_sub(record.as_ptr() as usize);
    let opened = ex.volume_of(client, fh);
    let (bytes, class) = match head.procedure {
        // offset, count (§3.3.6)
        nfs3::READ => (count(&mut args), Class::Other),
        // offset, count, stable, data (§3.3.7): UNSTABLE is 0.
        nfs3::WRITE => {
            let bytes = count(&mut args);
            // A WRITE too short to say counts as durable: it is refused at once, so
            // it holds other volumes' writes back for no more than the linger.
            match args.u32() {
                Ok(0) => (bytes, Class::Bulk),
                _ => (bytes, Class::Durable),
            }
        }
        // Each syncs what it changed before its reply (`DESIGN.md`, invariant 10).
        p if table::changes(p) => (0, Class::Durable),
        _ => (0, Class::Other),
    };
    let (volume, handle) = match opened {
        Some((v, h)) => (Some(v), Some((at..at + fh.len(), h))),
        None => (None, None),
    };
    Route {
        volume,
        direction,
        bytes,
        class,
        known: Some(Known { head, handle }),
    }
}

/// A READ's or WRITE's count, after its handle: the offset is skipped.
fn count(args: &mut XdrIn<'_>) -> u64 {
    args.u64()
        .and_then(|_| args.u32())
        .map_or(0, |n| u64::from(n.min(MAX_IO)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_volume_waits_on_its_own_connections_and_is_refused_only_past_half_the_budget() {
        // (carries other volumes, budget held of 100) → what happens
        let table = [
            (false, 0, Full::Wait),
            (false, 100, Full::Wait),
            (true, 0, Full::Overdraw),
            (true, 50, Full::Overdraw),
            (true, 51, Full::Jukebox),
        ];
        for (mixed, held, want) in table {
            assert_eq!(when_full(mixed, held, 100), want, "{mixed} {held}");
        }
    }
}
