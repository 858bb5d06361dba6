//! `enforcer`: the binary edge. Parses the command line and hands over to the library.

use std::process::ExitCode;

use clap::Parser;

/// mimalloc for the whole process: per-thread free lists, fewer CPU microseconds per proxied request than glibc
/// malloc (`cargo xtask bench`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = enforcer::cli::Cli::parse();
    if !matches!(cli.command, enforcer::cli::Command::Run(_)) {
        restore_sigpipe();
    }
    match enforcer::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", enforcer::cli::error_message(&err));
            ExitCode::from(2)
        }
    }
}

/// The Rust runtime ignores SIGPIPE, so a write to a closed pipe fails with EPIPE and `println!` panics: `enforcer
/// audit query | head` would end in a panic message. A command that prints should end quietly instead, as every Unix
/// tool does: restore the default disposition (the process ends on SIGPIPE). The daemon keeps it ignored, since a
/// peer closing a socket must not end it.
fn restore_sigpipe() {
    // SAFETY: signal(2) with a valid signal number and SIG_DFL, before any other thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
