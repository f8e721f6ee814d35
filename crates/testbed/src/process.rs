//! A child process of the test cluster: output captured to a log file, killed by PID on
//! drop (so a panicking test still tears it down), and killed by the kernel if the
//! thread that started it dies without unwinding (`PR_SET_PDEATHSIG`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::error::{Error, Result};

/// How much of a log to show when a process dies during start-up.
const LOG_TAIL_BYTES: u64 = 3000;

/// A running child with its log.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
    program: std::ffi::OsString,
    args: Vec<std::ffi::OsString>,
    /// Killed as a whole process group (programs that fork helpers, such as
    /// `linux.uml`, whose helpers outlive it otherwise).
    group: bool,
}

impl Process {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Self> {
        Self::spawn_inner(name, cmd, log, false)
    }

    /// Same, in a process group of its own that [`Process::kill`] kills whole.
    pub fn spawn_group(name: &str, cmd: &mut Command, log: &Path) -> Result<Self> {
        cmd.process_group(0);
        Self::spawn_inner(name, cmd, log, true)
    }

    fn spawn_inner(name: &str, cmd: &mut Command, log: &Path, group: bool) -> Result<Self> {
        let spawn_err = |source| Error::SpawnProcess {
            name: name.to_owned(),
            source,
        };
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .map_err(spawn_err)?;
        let err = out.try_clone().map_err(spawn_err)?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent; this
        // runs in the forked child before exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(spawn_err)?;
        tracing::debug!(name, pid = child.id(), log = %log.display(), "started");
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            program: cmd.get_program().to_owned(),
            args: cmd.get_args().map(ToOwned::to_owned).collect(),
            group,
        })
    }

    /// Kills the process (SIGKILL, as a crash would) and starts it again with the same
    /// command line and log.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        if self.group {
            cmd.process_group(0);
        }
        let fresh = Self::spawn_inner(&self.name, &mut cmd, &self.log.clone(), self.group)?;
        *self = fresh;
        Ok(())
    }

    /// The component name ("etcd", "kube-apiserver", ...).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The operating-system process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The file the process writes its output to.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Whether the process still runs, without reaping it (for `&self` callers; an
    /// exited child not yet waited for is a zombie, which `/proc` still lists).
    pub fn alive(&self) -> bool {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()));
        // The state follows the command name, which is in parentheses.
        stat.ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .map(|(_, rest)| rest.trim_start().to_owned())
            })
            .is_some_and(|rest| !rest.starts_with(['Z', 'X']))
    }

    /// Fails with the log's tail if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(self.exited(status.to_string())),
            Err(e) => Err(self.exited(format!("unknown status: {e}"))),
        }
    }

    fn exited(&self, status: String) -> Error {
        Error::ProcessExited {
            name: self.name.clone(),
            status,
            log: self.log.clone(),
            tail: log_tail(&self.log),
        }
    }

    /// Asks the process to stop with SIGTERM, then SIGKILLs it after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        signal(self.pid(), libc::SIGTERM);
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            signal(self.pid(), libc::SIGKILL);
        }
        if self.group {
            // Before the leader is reaped, so the group id cannot have been reused.
            if let Ok(pgid) = libc::pid_t::try_from(self.pid()) {
                // SAFETY: plain syscall on the group made at spawn.
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
            }
        }
        let _ = self.child.wait();
        if self.group
            && let Ok(pgid) = libc::pid_t::try_from(self.pid())
        {
            wait_group_gone(pgid, std::time::Duration::from_secs(10));
        }
    }
}

/// Waits (at most `limit`) until no process of group `pgid` is left: the leader's
/// helpers die of the same SIGKILL, but on a busy machine some are still exiting (or
/// waiting for their new parent to reap them) when the leader has been reaped.
fn wait_group_gone(pgid: libc::pid_t, limit: std::time::Duration) {
    let start = std::time::Instant::now();
    while group_members(pgid) > 0 && start.elapsed() < limit {
        // SAFETY: plain syscall on the group made at spawn; members it missed get it again.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// How many processes of group `pgid` exist (zombies included).
fn group_members(pgid: libc::pid_t) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // Field 5 (after the parenthesised command) is the process group.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(2)?.parse::<libc::pid_t>().ok())
                == Some(pgid)
        })
        .count()
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: plain syscall on a pid we own and have not reaped yet.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// The last few KiB of a log file, for error messages.
pub fn log_tail(path: &Path) -> String {
    let mut buf = String::new();
    if let Ok(mut f) = File::open(path) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)));
        let mut bytes = Vec::new();
        let _ = f.read_to_end(&mut bytes);
        buf = String::from_utf8_lossy(&bytes).into_owned();
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_is_false_once_the_process_exited_though_not_reaped() {
        let dir = tempfile::tempdir().expect("dir");
        let log = dir.path().join("log");
        let mut running =
            Process::spawn("sleep", Command::new("sleep").arg("30"), &log).expect("sleep");
        assert!(running.alive());
        let exited = Process::spawn("true", &mut Command::new("true"), &log).expect("true");
        let start = std::time::Instant::now();
        while exited.alive() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "true still alive"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // A zombie until waited for: /proc still lists it.
        assert!(Path::new(&format!("/proc/{}", exited.pid())).exists());
        running.kill();
        assert!(!running.alive());
    }
}
