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
//! The socket is the tokio-owned non-blocking one: on `EAGAIN` the writer waits with
//! `poll(2)` on this (blocking-pool) thread, and gives up once the send timeout has
//! passed since the reply's first byte, closing the connection (a client that stops
//! reading must not hold server threads; a client that reads a byte a minute must not
//! either, so the bound is on the whole reply, not on each wait).
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
        let len = std::mem::take(&mut self.len);
        let r = with_pipe(|p| {
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
        });
        if r.is_err() {
            discard_pipe();
        }
        r
    }

    /// Writes `head`, then the piped data, then `tail` to the non-blocking socket
    /// `sock`, as one contiguous stretch of the stream, giving up at `deadline`. The
    /// caller holds the socket's send lock. On error the stream is left mid-record:
    /// close the connection.
    pub fn send(
        mut self,
        sock: RawFd,
        head: &[u8],
        tail: &[u8],
        deadline: Instant,
    ) -> SysResult<()> {
        let len = std::mem::take(&mut self.len);
        // MORE while something of this record follows, so TCP need not push a short
        // segment; the last piece goes without it and is pushed at once.
        let data_more = if tail.is_empty() {
            0
        } else {
            libc::SPLICE_F_MORE
        };
        let more = if len > 0 { libc::MSG_MORE } else { 0 };
        let r = send_all(sock, head, more, deadline)
            .and_then(|()| with_pipe(|p| splice_out(p, sock, len, data_more, deadline)))
            .and_then(|()| send_all(sock, tail, 0, deadline));
        if r.is_err() {
            discard_pipe();
        }
        r
    }
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

/// Waits until `sock` can take more bytes, or fails with `ETIMEDOUT` at `deadline`.
fn wait_writable(sock: RawFd, deadline: Instant) -> SysResult<()> {
    let mut pfd = libc::pollfd {
        fd: sock,
        events: libc::POLLOUT,
        revents: 0,
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = libc::c_int::try_from(left.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        match n {
            0 => return Err(Errno(libc::ETIMEDOUT)),
            n if n > 0 => {
                if pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
                    && pfd.revents & libc::POLLOUT == 0
                {
                    return Err(Errno(libc::EPIPE));
                }
                return Ok(());
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

/// Writes all of `buf` to the non-blocking socket `sock`, waiting for room with `poll`
/// until `deadline`.
pub fn send_all(sock: RawFd, mut buf: &[u8], flags: i32, deadline: Instant) -> SysResult<()> {
    while !buf.is_empty() {
        // SAFETY: a buffer of the given length; MSG_NOSIGNAL turns SIGPIPE into EPIPE.
        let n = unsafe {
            libc::send(
                sock,
                buf.as_ptr().cast(),
                buf.len(),
                flags | libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if n >= 0 {
            buf = &buf[n as usize..];
            continue;
        }
        match last() {
            Errno(libc::EINTR) => {}
            Errno(libc::EAGAIN) => wait_writable(sock, deadline)?,
            e => return Err(e),
        }
    }
    Ok(())
}

fn splice_out(
    p: &Pipe,
    sock: RawFd,
    mut left: usize,
    more: libc::c_uint,
    deadline: Instant,
) -> SysResult<()> {
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
                Errno(libc::EAGAIN) => wait_writable(sock, deadline)?,
                e => return Err(e),
            },
        }
    }
    Ok(())
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
        piped
            .send(b.as_raw_fd(), b"HEAD", b"TL", far())
            .expect("send");
        drop(b);
        let got = reader.join().expect("reader");
        assert_eq!(got.len(), 4 + data.len() + 2);
        assert_eq!(&got[..4], b"HEAD");
        assert!(got[4..4 + data.len()] == data[..]);
        assert_eq!(&got[4 + data.len()..], b"TL");
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
