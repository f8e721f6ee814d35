//! Entry point: parse the command line, set up logging, run the chosen command.

use clap::Parser;
use localnfs::cli::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
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
