//! `enforcer audit verify|tail|query`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check every record, the chain across files and every signed checkpoint.
    Verify { dir: Option<PathBuf> },
}

pub fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Verify { .. } => Ok(ExitCode::from(1)),
    }
}
