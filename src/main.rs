//! Entry point: parse the command line, set up logging, run the chosen command.

use clap::Parser;
use localnfs::cli::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    localnfs::telemetry::init(cli.telemetry.log_format, &cli.telemetry.log_filter);
    match cli.command {
        Command::Demo(args) => localnfs::demo::run(args).await?,
        Command::Node(args) => localnfs::node::run(args).await?,
        Command::Volume(args) => localnfs::node::volume_cmd::run(args)?,
        Command::Controller(args) => localnfs::provisioner::run::run(args).await?,
        Command::Scheduler(args) => localnfs::scheduler::run::run(args).await?,
        Command::Status(args) => localnfs::status::run(args).await?,
    }
    Ok(())
}
