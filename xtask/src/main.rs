//! Developer workflows that are not a plain cargo command: installing prerequisites, running the demo, the test
//! suite (including the privileged end-to-end tests) and benchmarks.
//!
//! `cargo xtask bench` measures the enforcer's overhead against a direct connection and mitmproxy in one run.
//!
//! `cargo xtask setup` installs what building the eBPF object needs (Debian `llvm-22-dev`, `bpf-linker` 0.13 built
//! against LLVM 22, `rust-src`) plus the tools the end-to-end tests and the demo use, skipping every step that is
//! already satisfied. `cargo xtask test` and `cargo xtask demo` run it first, so on a fresh machine they are the only
//! commands a user types. `cargo xtask fuzz` (after setup) builds and runs the fuzz targets (`fuzz/`); `test` runs them
//! briefly.
//! This crate must not depend on `enforcer`: it installs what the enforcer's build needs.

mod bench;
mod demo;
mod fuzz;
mod setup;
mod sys;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "Workflows for the agent egress enforcer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install the build and test prerequisites (idempotent).
    Setup,
    /// Set up, build, then run the whole test suite (unit, integration, privileged end-to-end) and the benchmarks.
    Test {
        /// Skip the benchmarks.
        #[arg(long)]
        no_bench: bool,
    },
    /// Set up, build, then run the daemon on the default policy and enforce a demo agent against a netns host.
    Demo,
    /// Measure the enforcer's overhead side by side with a direct connection and mitmproxy (root; ~25 min, or
    /// well under a minute with --short / ENFORCER_BENCH_SHORT=1).
    Bench(bench::BenchArgs),
    /// Set up, build the libFuzzer targets of `fuzz/` and run each for a bounded time; fails on any crash.
    Fuzz {
        /// The short run `cargo xtask test` does: each target for a few seconds.
        #[arg(long, conflicts_with = "seconds")]
        smoke: bool,
        /// Seconds per target.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Build with AddressSanitizer (on stable: `-Zsanitizer=address` under `RUSTC_BOOTSTRAP=1`).
        #[arg(long)]
        asan: bool,
        /// Targets to run (default: every file of `fuzz/fuzz_targets/`).
        targets: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup::run(),
        Cmd::Test { no_bench } => test(no_bench),
        Cmd::Demo => setup::run()
            .and_then(|()| build())
            .and_then(|()| demo::run()),
        Cmd::Bench(args) => bench::run(args),
        Cmd::Fuzz {
            smoke,
            seconds,
            asan,
            targets,
        } => setup::run().and_then(|()| {
            fuzz::run(&fuzz::FuzzRun {
                targets,
                seconds: if smoke { fuzz::SMOKE_SECONDS } else { seconds },
                asan,
                smoke,
            })
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (the parent of this crate's directory).
pub(crate) fn workspace_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// The cargo that runs us (so a toolchain chosen by rustup applies to the nested builds too).
pub(crate) fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    cmd
}

/// Run a command to completion, failing unless it exits 0.
pub(crate) fn run_checked(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd
        .status()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{:?} failed: {status}", cmd.get_program());
    }
    Ok(())
}

/// The directory cargo builds into (honours `CARGO_TARGET_DIR`).
pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

fn build() -> anyhow::Result<()> {
    run_checked(cargo().arg("build"))
}

fn test(no_bench: bool) -> anyhow::Result<()> {
    setup::run()?;
    build()?;
    // Unit, integration and the privileged end-to-end tests (tests/e2e, run as the `e2e` test of `enforcer`).
    // Every failure is fatal; `test result:` lines are cargo's own.
    run_checked(cargo().args(["test", "--workspace", "--no-fail-fast"]))?;
    // The fuzz targets over their committed seeds and a few seconds of new inputs each: a crash fails the run.
    fuzz::run(&fuzz::FuzzRun {
        targets: Vec::new(),
        seconds: fuzz::SMOKE_SECONDS,
        asan: false,
        smoke: true,
    })?;
    if no_bench {
        return Ok(());
    }
    // Short mode: every benchmark path once (the library benches and the side-by-side run), in well under a minute.
    // It needs root, as the privileged end-to-end tests do: skipped without, unless in CI.
    if !setup::is_root() && std::env::var_os("CI").is_none() {
        eprintln!("xtask: not root: skipping the benchmarks' short mode (cargo xtask bench --short needs root)");
        return Ok(());
    }
    bench::run(bench::BenchArgs::short())
}
