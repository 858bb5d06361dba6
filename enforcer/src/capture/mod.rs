//! Capture: loads and attaches the eBPF programs, tags cgroups with profiles, and recovers the original destination
//! and calling process of each redirected connection for the proxy (`OriginLookup`). Also `enforcer exec`.
//!
//! SCAFFOLD: replaced by the capture stage.

use std::process::ExitCode;

use clap::Args;

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Profile to tag the new cgroup with.
    #[arg(long, default_value = "default")]
    pub profile: String,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true)]
    pub command: Vec<String>,
}

pub fn exec(_args: ExecArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("exec is not wired yet")
}
