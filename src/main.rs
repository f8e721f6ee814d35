//! Entry point: parse the command line, set up logging, run the chosen command.

use clap::Parser;
use localnfs::cli::{Cli, Command};

/// Scheduler ticks between the runtime's looks at the sockets (tokio's default is 61).
/// A node agent's busy connections are always ready to run: a flood of cached 4 KiB
/// READs answered on connection tasks kept both workers busy, and a quiet volume's
/// call waited for the 61st task poll before its socket was even looked at: 1.1–1.3 ms
/// a call instead of 50–80 µs (its reads at 0.04–0.07× of alone). Looking every tick
/// costs one `epoll_wait` that returns at once per task poll; with it the same victim
/// ran at 0.98× of alone beside the read flood, the flood at 0.91× of its own rate
/// (one quick run, `--reps 1 --only victim`; the full bench: 1.00× and 0.86×,
/// bench/README.md).
const EVENT_INTERVAL: u32 = 1;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Controller(_)) {
        few_malloc_arenas();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .event_interval(EVENT_INTERVAL)
        .build()?
        .block_on(run(cli))
}

/// The controller's memory is mostly its watch caches (every claim and our PVs),
/// decoded on whichever thread polled the watch: glibc gives threads arenas of their
/// own (up to 8 per core), and freed list pages and replaced objects leave each of
/// them partly used. Two arenas: the controller's threads mostly wait on the API
/// server, so they contend little for them.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn few_malloc_arenas() {
    // SAFETY: called before any other thread exists; mallopt only sets a limit.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn few_malloc_arenas() {}

async fn run(cli: Cli) -> anyhow::Result<()> {
    localnfs::telemetry::init(cli.telemetry.log_format, &cli.telemetry.log_filter);
    match cli.command {
        #[cfg(feature = "demo")]
        Command::Demo(args) => localnfs::demo::run(args).await?,
        #[cfg(not(feature = "demo"))]
        Command::Demo(_) => anyhow::bail!(
            "this localnfs was built without the demo (cargo feature `demo`, on by default; release images leave it out)"
        ),
        Command::Node(args) => localnfs::node::run(args).await?,
        Command::Volume(args) => localnfs::node::volume_cmd::run(args)?,
        Command::Controller(args) => localnfs::provisioner::run::run(args).await?,
        Command::Scheduler(args) => localnfs::scheduler::run::run(args).await?,
        Command::Status(args) => localnfs::status::run(args).await?,
    }
    Ok(())
}
