//! `enforcer run`: wires the stages together. Loads the configuration and policy, opens the audit trail, loads and
//! attaches the eBPF capture, starts the proxy listeners, reports readiness and shuts down on SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Daemon configuration file (YAML). Without it the built-in defaults apply.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub fn run(_args: RunArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the daemon is not wired yet")
}
