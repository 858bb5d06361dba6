//! The proxy: accepts redirected (transparent) and explicit-proxy connections, terminates TLS with leaves minted
//! by the enforcer CA, turns each request into an `Action`, has it decided and audited, then forwards it upstream
//! (verifying the real certificate) or answers with a block.
//!
//! SCAFFOLD: replaced by the proxy stage.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Print the CA certificate (PEM).
    Export,
}

pub fn ca_command(_cmd: CaCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the CA is not wired yet")
}
