//! `enforcer policy check|test|eval`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Load a policy and report errors with file, line and column.
    Check { file: PathBuf },
}

pub fn run(cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PolicyCommand::Check { file } => {
            super::Policy::load(&file)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
