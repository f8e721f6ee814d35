//! The victim in a client process of its own: the bench binary runs itself again with
//! [`CHILD_FLAG`] for each victim pass, and the child prints its rows on one line of
//! its stdout (a pipe). Why: in the bench's own process the victim's connection shared
//! the CPU scheduler's and tokio's attention with the flood's 64–256 connections, so
//! its rows measured the client as much as the server. The child is one thread, not
//! pinned, and starts before its rows are timed (process start is not measured).
//!
//! Around each row the child also takes a [`Snap`]: the agent's own time on the
//! victim's volume (`localnfs_volume_request_duration_seconds`, received → reply
//! ready, and `localnfs_nfs_volume_queued_seconds`, waiting for a pool worker) from
//! its `/metrics`, and the CPU time of the agent, of itself and of the flood's process
//! (the parent) from `/proc`. So each row says where a victim call's time went: in the
//! agent's window, and outside it (sockets, the client, waiting for a core).

use std::net::SocketAddr;
use std::process::{Command, Stdio};

use crate::load::{self, RowSample, VICTIM_ROWS, VictimSample, Volume};
use crate::support::scrape;

/// The first argument that makes the bench binary a victim child.
pub const CHILD_FLAG: &str = "--victim-child";

/// What the child can look at besides its own calls.
#[derive(Clone, Copy)]
pub struct Probe {
    /// The agent's admin listener (localnfs only).
    pub admin: Option<SocketAddr>,
    /// The server's process, for its CPU time.
    pub server_pid: Option<u32>,
    /// The flood's process (the bench's own).
    pub flood_pid: u32,
}

/// Counters at one moment.
pub struct Snap {
    at: std::time::Instant,
    /// The victim volume's calls and their seconds received → ready, and queued.
    agent: Option<[f64; 3]>,
    server_cpu: Option<f64>,
    own_cpu: Option<f64>,
    flood_cpu: Option<f64>,
}

/// CPU seconds (user + system, all threads, dead ones included) of process `pid`.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields after it are space-separated, and
    // utime and stime are fields 14 and 15 (proc(5)), the 12th and 13th after it.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (tick > 0).then(|| (utime + stime) / tick as f64)
}

impl Probe {
    pub async fn snap(&self, volume: &str) -> Snap {
        let agent = match self.admin {
            Some(addr) => {
                let m = scrape(addr).await;
                let v = [("volume", volume)];
                Some([
                    m.get("localnfs_volume_request_duration_seconds_count", &v),
                    m.get("localnfs_volume_request_duration_seconds_sum", &v),
                    m.get("localnfs_nfs_volume_queued_seconds_total", &v),
                ])
            }
            None => None,
        };
        Snap {
            at: std::time::Instant::now(),
            agent,
            server_cpu: self.server_pid.and_then(|p| cpu_seconds(&p.to_string())),
            own_cpu: cpu_seconds("self"),
            flood_cpu: cpu_seconds(&self.flood_pid.to_string()),
        }
    }
}

impl Snap {
    /// One row between `self` and `after`: `calls` made by the client in `row_secs`,
    /// `rate` the row's figure.
    pub fn row(&self, after: &Snap, calls: u64, rate: f64, row_secs: f64) -> RowSample {
        // CPU over the snapshots' interval (the row and a scrape).
        let secs = (after.at - self.at).as_secs_f64();
        let cores = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if secs > 0.0 => (b - a) / secs,
            _ => f64::NAN,
        };
        let (agent_us, queued_us) = match (self.agent, after.agent) {
            (Some(a), Some(b)) if b[0] > a[0] => {
                let n = b[0] - a[0];
                ((b[1] - a[1]) / n * 1e6, (b[2] - a[2]) / n * 1e6)
            }
            _ => (f64::NAN, f64::NAN),
        };
        RowSample {
            rate,
            round_trip_us: if calls > 0 {
                row_secs / calls as f64 * 1e6
            } else {
                f64::NAN
            },
            agent_us,
            queued_us,
            server_cores: cores(self.server_cpu, after.server_cpu),
            victim_cores: cores(self.own_cpu, after.own_cpu),
            flood_cores: cores(self.flood_cpu, after.flood_cpu),
        }
    }
}

/// Fields of a [`RowSample`] on the child's stdout line, in this order.
fn encode(rows: &VictimSample) -> String {
    let mut line = String::from("ok");
    for r in rows {
        for v in [
            r.rate,
            r.round_trip_us,
            r.agent_us,
            r.queued_us,
            r.server_cores,
            r.victim_cores,
            r.flood_cores,
        ] {
            line.push_str(&format!(" {v}"));
        }
    }
    line
}

fn decode(line: &str) -> Result<VictimSample, String> {
    let line = line.trim();
    if let Some(e) = line.strip_prefix("err ") {
        return Err(e.to_owned());
    }
    let values = line
        .strip_prefix("ok ")
        .ok_or_else(|| format!("victim child said `{line}`"))?
        .split(' ')
        .map(|v| v.parse::<f64>().map_err(|e| format!("`{v}`: {e}")))
        .collect::<Result<Vec<f64>, String>>()?;
    if values.len() != 7 * VICTIM_ROWS.len() {
        return Err(format!("victim child sent {} values", values.len()));
    }
    let mut rows = VictimSample::default();
    for (r, v) in rows.iter_mut().zip(values.chunks(7)) {
        *r = RowSample {
            rate: v[0],
            round_trip_us: v[1],
            agent_us: v[2],
            queued_us: v[3],
            server_cores: v[4],
            victim_cores: v[5],
            flood_cores: v[6],
        };
    }
    Ok(rows)
}

/// Kills the child by its PID if it is still running when dropped (a panic here).
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs one victim pass on `a` in a child process; blocks this thread until it ends.
pub fn victim_in_child(a: &Volume, tag: &str, probe: Probe) -> Result<VictimSample, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg(CHILD_FLAG)
        .args(["--nfs", &a.nfs.to_string()])
        .args(["--mount", &a.mount.to_string()])
        .args(["--export", &a.export])
        .args(["--tag", tag])
        .args(["--flood-pid", &probe.flood_pid.to_string()]);
    if let Some(d) = &a.subdir {
        cmd.args(["--subdir", d]);
    }
    if let Some(admin) = probe.admin {
        cmd.args(["--admin", &admin.to_string()]);
    }
    if let Some(pid) = probe.server_pid {
        cmd.args(["--server-pid", &pid.to_string()]);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("start the victim child: {e}"))?;
    let mut reaper = Reaper(child);
    let mut out = String::new();
    if let Some(mut stdout) = reaper.0.stdout.take() {
        std::io::Read::read_to_string(&mut stdout, &mut out)
            .map_err(|e| format!("read the victim child: {e}"))?;
    }
    let status = reaper
        .0
        .wait()
        .map_err(|e| format!("wait for the victim child: {e}"))?;
    if !status.success() && out.trim().is_empty() {
        return Err(format!("victim child: {status}"));
    }
    decode(&out)
}

/// The child's `main`: `args` follow [`CHILD_FLAG`]. Exits the process.
pub fn run(args: &[String]) -> ! {
    let result = parse(args).and_then(|(a, tag, probe)| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        rt.block_on(load::victim(&a, &tag, &probe))
    });
    match result {
        Ok(rows) => println!("{}", encode(&rows)),
        Err(e) => println!("err {}", e.replace('\n', " ")),
    }
    std::process::exit(0)
}

fn parse(args: &[String]) -> Result<(Volume, String, Probe), String> {
    let get = |name: &str| -> Option<String> {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let addr = |v: Option<String>, name: &str| -> Result<SocketAddr, String> {
        v.ok_or(format!("{name} missing"))?
            .parse()
            .map_err(|e| format!("{name}: {e}"))
    };
    let volume = Volume {
        nfs: addr(get("--nfs"), "--nfs")?,
        mount: addr(get("--mount"), "--mount")?,
        export: get("--export").ok_or("--export missing")?,
        subdir: get("--subdir"),
    };
    let tag = get("--tag").ok_or("--tag missing")?;
    let probe = Probe {
        admin: get("--admin")
            .map(|a| addr(Some(a), "--admin"))
            .transpose()?,
        server_pid: get("--server-pid").and_then(|p| p.parse().ok()),
        flood_pid: get("--flood-pid")
            .and_then(|p| p.parse().ok())
            .ok_or("--flood-pid missing")?,
    };
    Ok((volume, tag, probe))
}
