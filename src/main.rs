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
/// (`cargo bench --bench noisy_neighbour`, bench/README.md).
const EVENT_INTERVAL: u32 = 1;

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .event_interval(EVENT_INTERVAL)
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
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
