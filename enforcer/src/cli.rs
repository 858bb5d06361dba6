//! The command line: one subcommand group per area, each defined and carried out by the module that owns it.
//! This file only routes; `anyhow` is allowed here because this is the binary's edge.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "enforcer",
    version,
    about = "Runtime egress policy for AI agents"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: load the eBPF programs, start the proxy, enforce the policy.
    Run(crate::daemon::RunArgs),
    /// Check the configured policy and make the running daemon load it.
    Reload(crate::daemon::ReloadArgs),
    /// Show the running daemon's state (over its control socket).
    Status(crate::control::StatusArgs),
    /// Run a command inside a fresh cgroup tagged with a profile.
    Exec(crate::capture::ExecArgs),
    /// Tag and untag cgroups at runtime (the daemon must be running).
    #[command(subcommand)]
    Cgroup(crate::capture::CgroupCommand),
    /// The enforcer's certificate authority.
    #[command(subcommand)]
    Ca(crate::proxy::CaCommand),
    /// Check, test and explain policies.
    #[command(subcommand)]
    Policy(crate::policy::cli::PolicyCommand),
    /// Verify and read the audit trail.
    #[command(subcommand)]
    Audit(crate::audit::cli::AuditCommand),
}

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) => crate::daemon::run(args),
        Command::Reload(args) => crate::daemon::reload(args),
        Command::Status(args) => crate::control::status_command(args),
        Command::Exec(args) => crate::capture::exec(args),
        Command::Cgroup(cmd) => crate::capture::cgroup_command(cmd),
        Command::Ca(cmd) => crate::proxy::ca_command(cmd),
        Command::Policy(cmd) => crate::policy::cli::run(cmd),
        Command::Audit(cmd) => crate::audit::cli::run(cmd),
    }
}
