//! Zero-copy READ replies: file data moves from the page cache into a pipe and from the
//! pipe into the client's socket with `splice(2)`, so a large READ costs the server no
//! copy of its data (a `pread` into a buffer and a `write` from it cost two).
//!
//! Each blocking-pool thread keeps one pipe sized for the largest READ. A READ first
//! splices all of its data into the pipe, which tells the exact byte count the reply
//! header must carry (the file may change meanwhile: the pipe holds the pages as they
//! were), then the connection writes the header, splices the pipe into the socket and
//! adds the XDR padding (RFC 1813 §3.3.6, RFC 4506 §4.10), all under its send lock so
//! the record is contiguous on the wire.
//!
//! The socket is the tokio-owned non-blocking one: on `EAGAIN` the thread waits with
//! `poll(2)`, but only briefly (the caller's patience): if the client has not taken
//! the record by then, what is left of it is copied out of the pipe and returned
//! ([`Sent::Rest`]) for a writer that waits without holding a thread (a client that
//! stops reading, or reads a byte a minute, must not hold server threads).
//!
//! The other socket calls of a connection live here too: bounding its kernel buffers,
//! measuring what it has not sent yet, cutting it.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use super::sys::{Errno, SysResult};

/// READs at least this large are spliced; smaller ones are cheaper as one `pread`.
pub const MIN_SPLICE: usize = 64 * 1024;

fn last() -> Errno {
    Errno(
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    )
}

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    fn new(want: usize) -> SysResult<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 returns.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(last());
        }
        // SAFETY: both descriptors are fresh and owned by us alone.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let want = libc::c_int::try_from(want).unwrap_or(libc::c_int::MAX);
        // SAFETY: plain fcntl on our descriptor. A refusal (above pipe-max-size for an
        // unprivileged process) leaves the default size, read back below.
        unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
        // SAFETY: plain fcntl on our descriptor.
        let capacity = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        let capacity = usize::try_from(capacity).map_err(|_| last())?;
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

thread_local! {
    /// This thread's pipe; `None` until first use and after a failure left it dirty.
    static PIPE: RefCell<Option<Pipe>> = const { RefCell::new(None) };
}

/// `n` bytes of file data waiting in this thread's pipe. Not `Send`: the pipe is the
/// thread's own. Dropping it unsent discards the pipe (a fresh one is made next time).
pub struct Piped {
    len: usize,
    _thread_bound: PhantomData<*const ()>,
}

impl Piped {
    pub fn len(&self) -> usize {
        self.len
    }

    /// The XDR padding that follows the data on the wire (RFC 4506 §4.10).
    pub fn pad(&self) -> &'static [u8] {
        &[0u8; 3][..(4 - self.len % 4) % 4]
    }

    /// Reads the data out of the pipe into `out` (a reply handed to another writer).
    pub fn append_to(mut self, out: &mut Vec<u8>) -> SysResult<()> {
        let r = drain_pipe(std::mem::take(&mut self.len), out);
        if r.is_err() {
            discard_pipe();
        }
        r
    }

    /// Writes `head`, then the piped data, then `tail` to the non-blocking socket
    /// `sock`, as one contiguous stretch of the stream, waiting for room until
    /// `patience`. The caller holds the socket's send lock, and keeps it until the
    /// [`Sent::Rest`] it may get back has been written too. On error the stream is left
    /// mid-record: close the connection.
    pub fn send(
        mut self,
        sock: RawFd,
        head: &[u8],
        tail: &[u8],
        patience: Instant,
    ) -> SysResult<Sent> {
        let len = std::mem::take(&mut self.len);
        // MORE while something of this record follows, so TCP need not push a short
        // segment; the last piece goes without it and is pushed at once.
        let data_more = if tail.is_empty() {
            0
        } else {
            libc::SPLICE_F_MORE
        };
        let more = if len > 0 { libc::MSG_MORE } else { 0 };
        let r = (|| {
            let n = send_until(sock, head, more, patience)?;
            if n < head.len() {
                let mut rest = head[n..].to_vec();
                drain_pipe(len, &mut rest)?;
                rest.extend_from_slice(tail);
                return Ok(Sent::Rest(rest));
            }
            let left = with_pipe(|p| splice_until(p, sock, len, data_more, patience))?;
            if left > 0 {
                let mut rest = Vec::with_capacity(left + tail.len());
                drain_pipe(left, &mut rest)?;
                rest.extend_from_slice(tail);
                return Ok(Sent::Rest(rest));
            }
            send_bytes(sock, tail, patience)
        })();
        if r.is_err() {
            discard_pipe();
        }
        r
    }
}

/// How far a send from a blocking-pool thread got before the thread stopped waiting
/// for the client.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// The whole record is in the socket.
    All,
    /// The client took too little in time: these bytes of the record are still to be
    /// written, next on the stream, by a writer that may wait without holding a thread.
    Rest(Vec<u8>),
}

/// Reads `len` bytes out of this thread's pipe onto the end of `out`; on failure the
/// pipe is dirty (the caller discards it).
fn drain_pipe(len: usize, out: &mut Vec<u8>) -> SysResult<()> {
    with_pipe(|p| {
        out.reserve(len);
        let mut left = len;
        while left > 0 {
            let spare = out.spare_capacity_mut();
            // SAFETY: the kernel writes at most `left` bytes into reserved capacity.
            let n = unsafe { libc::read(p.read.as_raw_fd(), spare.as_mut_ptr().cast(), left) };
            if n <= 0 {
                return Err(if n == 0 { Errno(libc::EIO) } else { last() });
            }
            // SAFETY: read initialised the first `n` bytes of the spare capacity.
            unsafe { out.set_len(out.len() + n as usize) };
            left -= n as usize;
        }
        Ok(())
    })
}

impl Drop for Piped {
    fn drop(&mut self) {
        if self.len > 0 {
            discard_pipe();
        }
    }
}

fn discard_pipe() {
    PIPE.with(|p| p.borrow_mut().take());
}

fn with_pipe<T>(f: impl FnOnce(&Pipe) -> SysResult<T>) -> SysResult<T> {
    PIPE.with(|cell| match cell.borrow().as_ref() {
        Some(p) => f(p),
        None => Err(Errno(libc::EIO)),
    })
}

/// Moves up to `count` bytes of `fd` at `off` into this thread's pipe (page references,
/// no copy). `Ok(None)` when splicing cannot serve this READ (the pipe is too small,
/// cannot be made for want of descriptors, or the file system does not splice): use
/// `pread` instead.
pub fn file_to_pipe(fd: RawFd, off: u64, count: usize) -> SysResult<Option<Piped>> {
    let mut off = i64::try_from(off).map_err(|_| Errno(libc::EINVAL))?;
    PIPE.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            match Pipe::new(super::limits::MAX_IO as usize) {
                Ok(p) => *slot = Some(p),
                // Out of descriptors (each blocking-pool thread keeps a pipe, and there
                // may be more threads than the open-file limit has room for) or of
                // pipe memory: `pread` needs neither, and the READ still succeeds.
                Err(e) if matches!(e.0, libc::EMFILE | libc::ENFILE | libc::ENOMEM) => {
                    return Ok(None);
                }
                Err(e) => return Err(e),
            }
        }
        let Some(p) = slot.as_ref() else {
            return Ok(None);
        };
        if p.capacity < count {
            return Ok(None);
        }
        let mut got = 0;
        while got < count {
            // SAFETY: our descriptors; the kernel advances `off`.
            let n = unsafe {
                libc::splice(
                    fd,
                    &mut off,
                    p.write.as_raw_fd(),
                    std::ptr::null_mut(),
                    count - got,
                    libc::SPLICE_F_MOVE,
                )
            };
            match n {
                0 => break, // end of file
                n if n > 0 => got += n as usize,
                _ => {
                    let e = last();
                    if e.0 == libc::EINTR {
                        continue;
                    }
                    // Whatever made it into the pipe is stale now.
                    *slot = None;
                    if got == 0 && matches!(e.0, libc::EINVAL | libc::ENOSYS) {
                        return Ok(None);
                    }
                    return Err(e);
                }
            }
        }
        Ok(Some(Piped {
            len: got,
            _thread_bound: PhantomData,
        }))
    })
}

/// Waits until `sock` can take more bytes: true, or false once `patience` has passed.
fn writable_by(sock: RawFd, patience: Instant) -> SysResult<bool> {
    let mut pfd = libc::pollfd {
        fd: sock,
        events: libc::POLLOUT,
        revents: 0,
    };
    loop {
        let left = patience.saturating_duration_since(Instant::now());
        // Rounded up: a 0 ms poll before `patience` would spin.
        let ms = libc::c_int::try_from(left.as_micros().div_ceil(1000)).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        match n {
            0 => return Ok(false),
            n if n > 0 => {
                if pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
                    && pfd.revents & libc::POLLOUT == 0
                {
                    return Err(Errno(libc::EPIPE));
                }
                return Ok(true);
            }
            _ => {
                let e = last();
                if e.0 != libc::EINTR {
                    return Err(e);
                }
            }
        }
    }
}

/// Ends both directions of `sock` after a reply was cut short mid-record: the peer and
/// our reader see the connection close. When the socket is closed, whatever the kernel
/// still holds for the peer is discarded (a reset, not a FIN queued behind data a
/// client is not reading: a closed socket's unsent bytes would otherwise stay in kernel
/// memory, counted nowhere, until TCP gives up on the peer).
pub fn abort(sock: RawFd) {
    let reset = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: plain syscalls on a descriptor the caller keeps open; `reset` outlives
    // the call and its size is passed.
    unsafe {
        libc::setsockopt(
            sock,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const reset).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
        libc::shutdown(sock, libc::SHUT_RDWR);
    }
}

/// Bounds the kernel's send and receive buffers of `sock` (Linux doubles each value
/// and caps it at `net.core.wmem_max`/`rmem_max`), which also turns off their
/// autotuning: by default one socket may grow to megabytes of replies its client does
/// not read. Best effort: a refusal leaves the kernel's defaults.
pub fn bound_buffers(sock: RawFd, send: usize, receive: usize) {
    for (option, bytes) in [(libc::SO_SNDBUF, send), (libc::SO_RCVBUF, receive)] {
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: plain syscall; `value` outlives it and its size is passed.
        unsafe {
            libc::setsockopt(
                sock,
                libc::SOL_SOCKET,
                option,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

/// Bytes written to the TCP socket `sock` that its peer has not acknowledged yet: what
/// the kernel still holds of our replies (`SIOCOUTQ`, tcp(7)).
pub fn unsent(sock: RawFd) -> SysResult<usize> {
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the pointer.
    if unsafe { libc::ioctl(sock, libc::TIOCOUTQ, &raw mut n) } < 0 {
        return Err(last());
    }
    Ok(usize::try_from(n).unwrap_or(0))
}

/// Writes `buf` to the non-blocking socket `sock`, waiting for room with `poll` until
/// `patience`; returns how many bytes went (all of them, unless `patience` passed).
fn send_until(sock: RawFd, buf: &[u8], flags: i32, patience: Instant) -> SysResult<usize> {
    let mut sent = 0;
    while sent < buf.len() {
        let rest = &buf[sent..];
        // SAFETY: a buffer of the given length; MSG_NOSIGNAL turns SIGPIPE into EPIPE.
        let n = unsafe {
            libc::send(
                sock,
                rest.as_ptr().cast(),
                rest.len(),
                flags | libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            sent += n as usize;
            continue;
        }
        match last() {
            Errno(libc::EINTR) => {}
            Errno(libc::EAGAIN) => {
                if !writable_by(sock, patience)? {
                    break;
                }
            }
            e => return Err(e),
        }
    }
    Ok(sent)
}

/// Splices `left` bytes of the pipe into `sock`, waiting for room until `patience`;
/// returns how many are still in the pipe (none, unless `patience` passed).
fn splice_until(
    p: &Pipe,
    sock: RawFd,
    mut left: usize,
    more: libc::c_uint,
    patience: Instant,
) -> SysResult<usize> {
    while left > 0 {
        // SAFETY: our pipe and the caller's socket; no offsets (neither is seekable).
        let n = unsafe {
            libc::splice(
                p.read.as_raw_fd(),
                std::ptr::null_mut(),
                sock,
                std::ptr::null_mut(),
                left,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK | more,
            )
        };
        match n {
            0 => return Err(Errno(libc::EIO)), // the pipe ran dry: cannot happen
            n if n > 0 => left -= n as usize,
            _ => match last() {
                Errno(libc::EINTR) => {}
                Errno(libc::EAGAIN) => {
                    if !writable_by(sock, patience)? {
                        break;
                    }
                }
                e => return Err(e),
            },
        }
    }
    Ok(left)
}

/// Sends a whole record of bytes to `sock`, waiting for room until `patience`: what
/// [`Piped::send`] does for a reply with no piped data.
pub fn send_bytes(sock: RawFd, buf: &[u8], patience: Instant) -> SysResult<Sent> {
    let n = send_until(sock, buf, 0, patience)?;
    Ok(match &buf[n..] {
        [] => Sent::All,
        rest => Sent::Rest(rest.to_vec()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn far() -> Instant {
        Instant::now() + std::time::Duration::from_secs(60)
    }

    fn file_with(bytes: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile().expect("temp file");
        f.write_all(bytes).expect("write");
        f
    }

    #[test]
    fn spliced_bytes_match_the_file_and_stop_at_its_end() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let f = file_with(&data);
        let piped = file_to_pipe(f.as_raw_fd(), 100_000, 1 << 20)
            .expect("splice")
            .expect("pipe big enough");
        assert_eq!(piped.len(), 200_000);
        let mut out = b"head".to_vec();
        piped.append_to(&mut out).expect("drain");
        assert_eq!(&out[..4], b"head");
        assert_eq!(&out[4..], &data[100_000..]);
    }

    #[test]
    fn sent_reply_is_head_data_tail_in_order() {
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
        let f = file_with(&data);
        let (mut a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        b.set_nonblocking(true).expect("nonblocking");
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            a.read_to_end(&mut got).expect("read");
            got
        });
        let piped = file_to_pipe(f.as_raw_fd(), 0, 1 << 20)
            .expect("splice")
            .expect("pipe");
        let sent = piped
            .send(b.as_raw_fd(), b"HEAD", b"TL", far())
            .expect("send");
        assert_eq!(sent, Sent::All);
        drop(b);
        let got = reader.join().expect("reader");
        assert_eq!(got.len(), 4 + data.len() + 2);
        assert_eq!(&got[..4], b"HEAD");
        assert!(got[4..4 + data.len()] == data[..]);
        assert_eq!(&got[4 + data.len()..], b"TL");
    }

    #[test]
    fn a_peer_that_does_not_read_gets_the_rest_of_the_record_back_in_order() {
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        let f = file_with(&data);
        let (mut a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        b.set_nonblocking(true).expect("nonblocking");
        bound_buffers(b.as_raw_fd(), 16 * 1024, 16 * 1024);
        let piped = file_to_pipe(f.as_raw_fd(), 0, 1 << 20)
            .expect("splice")
            .expect("pipe");
        let start = Instant::now();
        let patience = start + std::time::Duration::from_millis(20);
        let Sent::Rest(rest) = piped
            .send(b.as_raw_fd(), b"HEAD", b"TL", patience)
            .expect("send")
        else {
            panic!("1 MiB fit a 32 KiB socket buffer nobody reads");
        };
        assert!(
            start.elapsed() < std::time::Duration::from_secs(2),
            "the thread waited {:?}, far past its patience",
            start.elapsed()
        );
        // What went, then the rest, is the whole record.
        let sent = 4 + data.len() + 2 - rest.len();
        let mut got = vec![0u8; sent];
        a.read_exact(&mut got).expect("read what was sent");
        got.extend_from_slice(&rest);
        assert_eq!(&got[..4], b"HEAD");
        assert!(got[4..4 + data.len()] == data[..]);
        assert_eq!(&got[4 + data.len()..], b"TL");
        assert_pipe_clean();
    }

    /// The next READ's data alone comes out of this thread's pipe: nothing of an
    /// earlier reply is left in it.
    fn assert_pipe_clean() {
        let g = file_with(&[9u8; 1000]);
        let next = file_to_pipe(g.as_raw_fd(), 0, 1000)
            .expect("splice")
            .expect("pipe");
        let mut out = Vec::new();
        next.append_to(&mut out).expect("drain");
        assert_eq!(out, vec![9u8; 1000]);
    }

    #[test]
    fn records_to_a_peer_that_does_not_read_come_back_as_their_rest() {
        let record: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 241) as u8).collect();
        let (mut a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        b.set_nonblocking(true).expect("nonblocking");
        bound_buffers(b.as_raw_fd(), 16 * 1024, 16 * 1024);
        let patience = Instant::now() + std::time::Duration::from_millis(20);
        let Sent::Rest(rest_of_first) = send_bytes(b.as_raw_fd(), &record, patience).expect("send")
        else {
            panic!("1 MiB fit a socket buffer nobody reads");
        };
        // A spliced reply behind them, to the full socket: what did not go (all of it,
        // or all but what slack the socket had) comes back, in order, the pipe clean.
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 239) as u8).collect();
        let f = file_with(&data);
        let piped = file_to_pipe(f.as_raw_fd(), 0, data.len())
            .expect("splice")
            .expect("pipe");
        let soon = Instant::now() + std::time::Duration::from_millis(20);
        let Sent::Rest(rest) = piped
            .send(b.as_raw_fd(), b"HEAD", b"TL", soon)
            .expect("send")
        else {
            panic!("a reply went whole into a full socket");
        };
        assert_pipe_clean();
        let mut want = record[..record.len() - rest_of_first.len()].to_vec();
        want.extend_from_slice(b"HEAD");
        want.extend_from_slice(&data);
        want.extend_from_slice(b"TL");
        let mut got = vec![0u8; want.len() - rest.len()];
        a.read_exact(&mut got).expect("read what was sent");
        got.extend_from_slice(&rest);
        assert!(got == want);
        // A record that fits goes whole.
        assert_eq!(
            send_bytes(b.as_raw_fd(), b"small", far()).expect("send"),
            Sent::All
        );
    }

    #[test]
    fn unsent_data_does_not_leak_into_the_next_read() {
        let f = file_with(&[1u8; 100_000]);
        let g = file_with(&[2u8; 100_000]);
        let first = file_to_pipe(f.as_raw_fd(), 0, 100_000)
            .expect("splice")
            .expect("pipe");
        drop(first); // e.g. the reply could not be sent
        let second = file_to_pipe(g.as_raw_fd(), 0, 100_000)
            .expect("splice")
            .expect("pipe");
        let mut out = Vec::new();
        second.append_to(&mut out).expect("drain");
        assert_eq!(out, vec![2u8; 100_000]);
    }
}
