//! Test nodes that are real Linux kernels: each [`KernelNode`] is a User-Mode Linux
//! guest (Debian's `user-mode-linux`, a Linux kernel run as an ordinary process), so a
//! volume is mounted exactly as kubelet mounts it — `mount -t nfs` with the PV's
//! server, path and mountOptions — and every READ, WRITE, COMMIT and READDIRPLUS after
//! that comes from the kernel's NFS client with its own caching and retries.
//!
//! The network: a [`TestNetwork`] is a network namespace of the test's own with a
//! bridge, joined to this (the host's) namespace by a veth pair whose host end carries
//! one /24 of `10.213.0.0/16`. Guests sit on the bridge through tap devices; node
//! agents listen on extra addresses of the host end. Nothing is routed anywhere else,
//! and dropping the network deletes the namespace and the veth.
//!
//! A node is therefore two addresses on that /24: the one its agent serves NFS on and
//! the one its kernel mounts from. Both are the Node's InternalIPs (agent first, which
//! is what PVs point at), as on a node with two interfaces, so the agents' allow-list
//! (every node's InternalIPs) admits exactly the test nodes' kernels and nothing else.
//!
//! Inside, the guest's root is this machine's `/` read-only (`hostfs`), so it runs the
//! same `mount.nfs`, `mariadbd` or `prove` as the host; `/run`, `/tmp` and `/mnt` are
//! tmpfs, and `/dev` is the guest's own devtmpfs. Those tmpfs hide the host's files
//! there (a checkout made by `mktemp -d`, an `XDG_CACHE_HOME` under `/tmp`), so the
//! host's `/` is mounted a second time, read-only, at [`HOST_VIEW`]: a host file a
//! guest must read is named by [`guest_path`], never by its host path. Host files can be attached as block
//! devices ([`BootOptions::disks`]) for a file system local to the guest. PID 1 is a
//! shell script that loads the NFS modules and starts a small command server
//! (`guest_agent.py`, port 7000) through which [`KernelNode::run`] executes shell
//! scripts. Each guest is killed by its process group when dropped.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::PersistentVolume;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::process::Process;
use crate::error::{Error, Result};

/// Port of the command server inside each guest.
const AGENT_PORT: u16 = 7000;
/// Memory of each guest (mariadbd with a small buffer pool fits).
const GUEST_MEMORY: &str = "512M";
/// How long a guest may take to boot and start its command server.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a command's connection is tried again while the host finds no route to
/// the guest (its ARP unanswered: see [`KernelNode::run`]).
const UNREACHABLE_RETRY: Duration = Duration::from_secs(30);
/// Block devices a guest can have (`ubd0`…`ubd15`).
const MAX_DISKS: usize = 16;
/// The command server, started by the guest's init.
const GUEST_AGENT: &str = include_str!("guest_agent.py");
/// Where a guest sees the host's whole `/` (read-only), tmpfs-hidden parts included.
pub const HOST_VIEW: &str = "/run/host";
/// Guest directories that are tmpfs of the guest's own, hiding the host's.
const GUEST_TMPFS: [&str; 3] = ["/run", "/tmp", "/mnt"];

/// The path under which a guest reads the host file `host`: the same path, except
/// under the guest's own tmpfs (`/tmp`, `/run`, `/mnt`), where it is reached through
/// [`HOST_VIEW`]. `host` should be absolute (a relative one is returned as given).
pub fn guest_path(host: &Path) -> PathBuf {
    let hidden = GUEST_TMPFS.iter().any(|d| host.starts_with(d));
    if hidden {
        Path::new(HOST_VIEW).join(host.strip_prefix("/").unwrap_or(host))
    } else {
        host.to_owned()
    }
}

/// A private network for test nodes; see the module docs.
pub struct TestNetwork {
    netns: String,
    host_if: String,
    /// The first three octets of the network's /24.
    prefix: [u8; 3],
    taps: std::sync::atomic::AtomicU32,
}

/// What a test node's command printed.
#[derive(Debug, Clone)]
pub struct Output {
    pub rc: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `ip` (or another setup command), failing with what it printed.
fn sh(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| Error::SpawnProcess {
            name: program.to_owned(),
            source,
        })?;
    if !out.status.success() {
        return Err(Error::TestNetwork {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Serialises the choice of a free /24 between tests (threads and processes, whatever
/// their TMPDIR).
fn lock_subnets() -> Result<std::fs::File> {
    let path = PathBuf::from("/run/localnfs-testnet.lock");
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| Error::PrepareTestDir {
            path: path.clone(),
            source,
        })?;
    // SAFETY: flock on a descriptor we own; released when the file is closed.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX) } != 0 {
        return Err(Error::PrepareTestDir {
            path,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(file)
}

/// Removes what test processes that died without unwinding (SIGKILL, a CI timeout)
/// left: their namespaces (`lnfs<pid>x<n>`) with every process still in them, and
/// their veths (`lnh<pid>x<n>`), so their addresses are free again.
fn remove_leftovers() {
    let dead = |name: &str, prefix: &str| {
        name.strip_prefix(prefix)
            .and_then(|rest| rest.split_once('x'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    for ns in sh("ip", &["netns", "list"]).unwrap_or_default().lines() {
        let ns = ns.split_whitespace().next().unwrap_or_default();
        if dead(ns, "lnfs") {
            for pid in sh("ip", &["netns", "pids", ns]).unwrap_or_default().lines() {
                if let Ok(pid) = pid.trim().parse::<libc::pid_t>() {
                    // SAFETY: plain syscall; these are the guests of a dead test.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
            let _ = sh("ip", &["netns", "del", ns]);
        }
    }
    for link in sh("ip", &["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
    {
        let name = link.split(": ").nth(1).unwrap_or_default();
        let name = name.split('@').next().unwrap_or_default();
        if dead(name, "lnh") {
            let _ = sh("ip", &["link", "del", name]);
        }
    }
}

impl TestNetwork {
    /// Creates the namespace, its bridge and the veth pair, with `10.213.N.1/24` on the
    /// host end for the first free `N`.
    pub fn create() -> Result<Self> {
        for program in ["ip", "linux.uml"] {
            if super::find_on_path(program).is_none() {
                return Err(Error::MissingProgram {
                    program: if program == "ip" { "ip" } else { "linux.uml" },
                    hint: "run scripts/deps (Debian packages iproute2, user-mode-linux, kmod, nfs-common)",
                });
            }
        }
        let _lock = lock_subnets()?;
        remove_leftovers();
        let taken = sh("ip", &["-o", "-4", "addr", "show"])?;
        let n = (1..=250u8)
            .find(|n| !taken.contains(&format!(" 10.213.{n}.")))
            .ok_or_else(|| Error::TestNetwork {
                command: "pick a free 10.213.N.0/24".into(),
                stderr: "all taken".into(),
            })?;
        let id = format!("{}x{n}", std::process::id());
        let net = TestNetwork {
            netns: format!("lnfs{id}"),
            host_if: format!("lnh{id}"),
            prefix: [10, 213, n],
            taps: Default::default(),
        };
        let peer = format!("lnp{id}");
        let ns = net.netns.as_str();
        sh("ip", &["netns", "add", ns])?;
        // From here on, Drop removes what was made.
        net.in_ns(&["link", "set", "lo", "up"])?;
        net.in_ns(&["link", "add", "br0", "type", "bridge"])?;
        net.in_ns(&["link", "set", "br0", "up"])?;
        sh(
            "ip",
            &[
                "link",
                "add",
                &net.host_if,
                "type",
                "veth",
                "peer",
                "name",
                &peer,
                "netns",
                ns,
            ],
        )?;
        net.in_ns(&["link", "set", &peer, "master", "br0"])?;
        net.in_ns(&["link", "set", &peer, "up"])?;
        net.add_host_address(net.address(1))?;
        sh("ip", &["link", "set", &net.host_if, "up"])?;
        Ok(net)
    }

    fn in_ns(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["netns", "exec", &self.netns, "ip"];
        all.extend_from_slice(args);
        sh("ip", &all)
    }

    /// `10.213.N.host` on this network.
    pub fn address(&self, host: u8) -> IpAddr {
        let [a, b, c] = self.prefix;
        IpAddr::V4(Ipv4Addr::new(a, b, c, host))
    }

    /// Adds `addr` to the host end, so a process here can listen on it (a node agent).
    pub fn add_host_address(&self, addr: IpAddr) -> Result<()> {
        sh(
            "ip",
            &["addr", "add", &format!("{addr}/24"), "dev", &self.host_if],
        )
        .map(drop)
    }

    /// A new tap device on the bridge, for one guest.
    fn add_tap(&self) -> Result<String> {
        let i = self.taps.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tap = format!("tap{i}");
        self.in_ns(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        self.in_ns(&["link", "set", &tap, "master", "br0"])?;
        self.in_ns(&["link", "set", &tap, "up"])?;
        Ok(tap)
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        // Guests hold their taps open; they are dropped before the network by their owners.
        let _ = sh("ip", &["link", "del", &self.host_if]);
        let _ = sh("ip", &["netns", "del", &self.netns]);
    }
}

/// What a guest gets besides the defaults of [`KernelNode::boot`].
#[derive(Debug, Clone, Default)]
pub struct BootOptions {
    /// Host files the guest sees as block devices `/dev/ubda`, `/dev/ubdb`, … in this
    /// order (User-Mode Linux's `ubd` driver), read-write.
    pub disks: Vec<Disk>,
}

/// A host file attached to a guest as a block device.
#[derive(Debug, Clone)]
pub struct Disk {
    pub path: PathBuf,
    /// Every write reaches the host's disk before it completes (ubd's `s` flag: the
    /// file is opened `O_SYNC`), so what the guest's file system made durable is
    /// durable. Without it the guest's writes and flushes (fsync, journal commits) stop
    /// in the host's page cache: this ubd driver completes a flush without syncing the
    /// file on the host (Debian's 6.1.176: no fdatasync from its I/O thread for 100
    /// flushes of the guest).
    pub write_through: bool,
}

impl BootOptions {
    /// The guest's device for `disks[i]` (`/dev/ubda` for the first; `i` < 16).
    pub fn disk_device(i: usize) -> String {
        let letter = char::from(b'a' + i.min(MAX_DISKS - 1) as u8);
        format!("/dev/ubd{letter}")
    }
}

/// One test node: a Linux kernel (User-Mode Linux) on a [`TestNetwork`].
pub struct KernelNode {
    name: String,
    addr: IpAddr,
    /// Proves to the guest's command server that a request comes from this test.
    token: String,
    // Field order matters: the guest dies before its directory is removed.
    process: Process,
    /// Init script, command server and token; removed on drop.
    _dir: tempfile::TempDir,
}

impl KernelNode {
    /// Boots a guest called `name` with address `addr` on `net` and waits until it
    /// answers commands.
    pub async fn boot(net: &TestNetwork, name: &str, addr: IpAddr) -> Result<Self> {
        Self::boot_with(net, name, addr, &BootOptions::default()).await
    }

    /// Like [`KernelNode::boot`], with `options` (disks).
    pub async fn boot_with(
        net: &TestNetwork,
        name: &str,
        addr: IpAddr,
        options: &BootOptions,
    ) -> Result<Self> {
        let mut disks = Vec::with_capacity(options.disks.len());
        for (i, disk) in options.disks.iter().enumerate() {
            let path = &disk.path;
            let fail = |why| Error::AttachDisk {
                node: name.to_owned(),
                path: path.clone(),
                why,
            };
            let text = path.to_str().ok_or_else(|| fail("the path is not UTF-8"))?;
            if i >= MAX_DISKS {
                return Err(fail("User-Mode Linux has 16 ubd devices"));
            }
            if text.contains([',', ':']) {
                return Err(fail(
                    "User-Mode Linux splits its ubd argument at ',' and ':'",
                ));
            }
            let flags = if disk.write_through { "s" } else { "" };
            disks.push(format!("ubd{i}{flags}={text}"));
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("localnfs-{name}-"))
            .tempdir()
            .map_err(|source| Error::PrepareTestDir {
                path: std::env::temp_dir(),
                source,
            })?;
        let io = |source| Error::PrepareTestDir {
            path: dir.path().to_owned(),
            source,
        };
        let agent = dir.path().join("agent.py");
        std::fs::write(&agent, GUEST_AGENT).map_err(io)?;
        // The directory is 0700: only root on the host (and the guest) reads the token.
        let token = super::random_hex(16).map_err(io)?;
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, &token).map_err(io)?;
        let init = dir.path().join("init");
        std::fs::write(&init, init_script(name, addr, &agent, &token_file)).map_err(io)?;
        std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .map_err(io)?;
        let tap = net.add_tap()?;
        let mut process = Process::spawn_group(
            &format!("test node {name}"),
            Command::new("ip")
                .args(["netns", "exec", &net.netns, "linux.uml"])
                .arg(format!("mem={GUEST_MEMORY}"))
                .args(["root=/dev/root", "rootfstype=hostfs", "rootflags=/", "ro"])
                .arg(format!("init={}", init.display()))
                .args(["con0=fd:0,fd:1", "con=null"])
                // gro=1: without it the guest drops the large segments of big READ
                // replies and the mount stalls.
                .arg(format!("vec0:transport=tap,ifname={tap},gro=1"))
                .args(&disks),
            &dir.path().join("console.log"),
        )?;
        // Ready once the command server says on the console that it listens (a
        // connection made as a probe proves less: it was fed to the server as a
        // request, and says nothing about the server a moment later).
        let start = Instant::now();
        while !console_says(process.log(), READY_LINE) {
            process.ensure_running()?;
            if start.elapsed() > BOOT_TIMEOUT {
                return Err(Error::Timeout {
                    what: format!(
                        "test node {name} to boot (console {}:\n{})",
                        process.log().display(),
                        super::process::log_tail(process.log())
                    ),
                    after: BOOT_TIMEOUT,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(KernelNode {
            name: name.to_owned(),
            addr,
            token,
            process,
            _dir: dir,
        })
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The process id of the guest kernel (`linux.uml`).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The address its kernel mounts from.
    pub fn address(&self) -> IpAddr {
        self.addr
    }

    /// The guest's console output (kernel messages).
    pub fn console_log(&self) -> &Path {
        self.process.log()
    }

    /// Runs `script` with `/bin/sh` as root in the guest, for at most `timeout`.
    pub async fn run(&self, script: &str, timeout: Duration) -> Result<Output> {
        let fail = |detail: String| Error::GuestCommand {
            node: self.name.clone(),
            detail,
        };
        let request = serde_json::json!({
            "token": self.token,
            "script": script,
            "timeout": timeout.as_secs_f64(),
        });
        let exchange = async {
            // A refusal is not retried: the server listens from before `boot`
            // returned until the guest dies, and the guest's kernel queues
            // connections it has not accepted yet, so a refusal means the server is
            // gone; the console says why (init reports its exit, the kernel an OOM
            // kill). "No route to host" is the host's ARP going unanswered for 3 s: a
            // guest kernel starved of CPU on a busy machine (a fresh-clone CI run met
            // it right after boot), so it is tried again for a while.
            let addr = SocketAddr::new(self.addr, AGENT_PORT);
            let tried = Instant::now();
            let mut s = loop {
                match tokio::net::TcpStream::connect(addr).await {
                    Ok(s) => break s,
                    Err(e)
                        if e.kind() == std::io::ErrorKind::HostUnreachable
                            && tried.elapsed() < UNREACHABLE_RETRY
                            && self.process.alive() =>
                    {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    Err(e) => {
                        return Err(fail(format!(
                            "connect to the command server: {e} (after {:.1} s); the guest's console ends:\n{}",
                            tried.elapsed().as_secs_f64(),
                            super::process::log_tail(self.process.log())
                        )));
                    }
                }
            };
            let mut line = request.to_string();
            line.push('\n');
            s.write_all(line.as_bytes())
                .await
                .map_err(|e| fail(format!("send the command: {e}")))?;
            let mut reply = String::new();
            BufReader::new(s)
                .read_line(&mut reply)
                .await
                .map_err(|e| fail(format!("read the reply: {e}")))?;
            let v: serde_json::Value = serde_json::from_str(&reply)
                .map_err(|e| fail(format!("unreadable reply {reply:?}: {e}")))?;
            Ok(Output {
                rc: v["rc"].as_i64().unwrap_or(-1) as i32,
                stdout: v["stdout"].as_str().unwrap_or_default().to_owned(),
                stderr: v["stderr"].as_str().unwrap_or_default().to_owned(),
            })
        };
        // The guest enforces `timeout`; this bound only catches a guest that died.
        tokio::time::timeout(timeout + Duration::from_secs(30), exchange)
            .await
            .map_err(|_| fail(format!("no reply within {timeout:?}")))?
    }

    /// Like [`KernelNode::run`], failing unless the script exits 0.
    pub async fn run_ok(&self, script: &str, timeout: Duration) -> Result<String> {
        let out = self.run(script, timeout).await?;
        if out.rc != 0 {
            return Err(Error::GuestCommand {
                node: self.name.clone(),
                detail: format!(
                    "`{script}` exited {}:\n{}\n{}",
                    out.rc,
                    out.stdout.trim_end(),
                    out.stderr.trim_end()
                ),
            });
        }
        Ok(out.stdout)
    }

    /// Mounts a PV's NFS volume at `target` exactly as kubelet does: the PV's
    /// `nfs.server`, `nfs.path` and `mountOptions`.
    pub async fn mount_pv(&self, pv: &PersistentVolume, target: &str) -> Result<()> {
        let fail = |what: &str| Error::GuestCommand {
            node: self.name.clone(),
            detail: format!("PV {}: {what}", pv.metadata.name.as_deref().unwrap_or("?")),
        };
        let spec = pv.spec.as_ref().ok_or_else(|| fail("no spec"))?;
        let nfs = spec.nfs.as_ref().ok_or_else(|| fail("no nfs source"))?;
        let options = spec.mount_options.as_deref().unwrap_or_default();
        self.mount_nfs(&nfs.server, &nfs.path, options, target)
            .await
    }

    /// Mounts `server:path` at `target` with `options`, as kubelet does for an NFS PV
    /// (`mount -t nfs -o <mountOptions> <server>:<path> <dir>`).
    pub async fn mount_nfs(
        &self,
        server: &str,
        path: &str,
        options: &[String],
        target: &str,
    ) -> Result<()> {
        let mut script = format!("mkdir -p {} && mount -t nfs", quote(target));
        if !options.is_empty() {
            let _ = write!(script, " -o {}", quote(&options.join(",")));
        }
        let _ = write!(
            script,
            " {} {}",
            quote(&format!("{server}:{path}")),
            quote(target)
        );
        self.run_ok(&script, Duration::from_secs(60))
            .await
            .map(drop)
    }
}

/// What the command server prints on the console once it listens.
const READY_LINE: &str = "guest agent: listening on ";

/// Whether the console log at `path` has a line starting with `prefix`.
fn console_says(path: &Path, prefix: &str) -> bool {
    std::fs::read(path).is_ok_and(|log| {
        String::from_utf8_lossy(&log)
            .lines()
            .any(|l| l.trim_start().starts_with(prefix))
    })
}

/// `s` as one single-quoted shell word.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// PID 1 of a guest: mounts, NFS modules, network, then the command server (listening
/// on the guest's address only). A step that fails says so on the console.
fn init_script(name: &str, addr: IpAddr, agent: &Path, token: &Path) -> String {
    format!(
        r#"#!/bin/sh
# PID 1 of test node {name}.
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs -o mode=0755 tmpfs /run
# The host's / once more, where this guest's tmpfs do not hide its /tmp, /run, /mnt.
mkdir -p {host_view}
mount -r -t hostfs -o / hostfs {host_view} || echo "init: cannot mount the host's / at {host_view}"
mount -t tmpfs -o mode=0755 tmpfs /mnt
cp {agent} /run/guest_agent.py || echo "init: cannot copy the command server from {agent}"
cp {token} /run/guest_agent.token || echo "init: cannot copy the command token from {token}"
mount -t tmpfs -o mode=1777 tmpfs /tmp
mkdir -p /run/modroot/lib/modules /run/mysqld
# The modules are not under /lib/modules (the host's root is read-only here).
ln -s /usr/lib/uml/modules/$(uname -r) /run/modroot/lib/modules/$(uname -r)
modprobe -d /run/modroot nfsv3 || echo "init: cannot load the NFS modules for $(uname -r)"
echo {name} > /proc/sys/kernel/hostname
# Errors (an OOM kill among them) reach the console, notices do not.
echo 4 > /proc/sys/kernel/printk
ip link set lo up
ip addr add {addr}/24 dev vec0
ip link set vec0 up
cd /
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
# PID 1 stays a shell: its `wait` reaps every orphan (a killed daemon must not linger
# as a zombie that looks alive).
# Its exit is said on the console: a host that finds it gone reads why there.
(/usr/bin/python3 /run/guest_agent.py /run/guest_agent.token {addr}; echo "init: the command server exited with status $?") &
while :; do wait; sleep 1; done
"#,
        agent = quote(&guest_path(agent).to_string_lossy()),
        token = quote(&guest_path(token).to_string_lossy()),
        name = quote(name),
        host_view = HOST_VIEW,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_files_under_the_guests_own_tmpfs_are_named_through_the_host_view() {
        for (host, guest) in [
            (
                "/tmp/tmp.X/main/target/x",
                "/run/host/tmp/tmp.X/main/target/x",
            ),
            ("/tmp", "/run/host/tmp"),
            ("/run/user/0/cache", "/run/host/run/user/0/cache"),
            ("/mnt/data/f", "/run/host/mnt/data/f"),
            (
                "/root/.cache/localnfs/pjdfstest",
                "/root/.cache/localnfs/pjdfstest",
            ),
            ("/var/tmp/x", "/var/tmp/x"),
            // A name that only starts like one of them is not under it.
            ("/tmpfoo/x", "/tmpfoo/x"),
        ] {
            assert_eq!(guest_path(Path::new(host)), Path::new(guest), "{host}");
        }
    }
}
