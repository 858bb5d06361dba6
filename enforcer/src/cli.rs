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
    /// Run a command inside a fresh cgroup tagged with a profile, as an unprivileged user.
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
    /// Exchanges held for human review: list, show, approve, deny (the daemon must be running).
    #[command(subcommand)]
    Review(crate::review::cli::ReviewCommand),
    /// Live agent sessions with their labels and counters (the daemon must be running).
    #[command(subcommand)]
    Session(crate::session::cli::SessionCommand),
    /// Retained traces: decrypt one with the private key, or make a key pair.
    #[command(subcommand)]
    Trace(crate::trace::cli::TraceCommand),
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
        Command::Review(cmd) => crate::review::cli::run(cmd),
        Command::Session(cmd) => crate::session::cli::run(cmd),
        Command::Trace(cmd) => crate::trace::cli::run(cmd),
    }
}

/// An error chain as one line for the terminal: each cause after the first is appended unless the message before it
/// already ends with it (several error types print their source inside their own message).
pub fn error_message(err: &anyhow::Error) -> String {
    let mut out = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "No such file");
        let err = anyhow::Error::from(crate::config::ConfigError::Io {
            path: "/etc/x.yaml".into(),
            source: io,
        })
        .context("loading the configuration");
        assert_eq!(
            error_message(&err),
            "loading the configuration: /etc/x.yaml: No such file"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_message(&plain), "outer: inner");
    }
}
