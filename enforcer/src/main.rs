//! `enforcer`: the binary edge. Parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = enforcer::cli::Cli::parse();
    match enforcer::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", enforcer::cli::error_message(&err));
            ExitCode::from(2)
        }
    }
}
