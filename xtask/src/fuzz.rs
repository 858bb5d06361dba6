//! `cargo xtask fuzz`: build the libFuzzer targets of `fuzz/` and run each for a bounded time.
//!
//! The targets are built with plain cargo on the stable toolchain, with the flags cargo-fuzz 0.13 passes for
//! `--sanitizer none` (sanitizer-coverage: inline 8-bit counters, PC table, compare tracing, stack depth; `--cfg
//! fuzzing`), in release with debug assertions and overflow checks (fuzz/Cargo.toml), into `<target>/fuzz`. None of
//! those flags is unstable, so neither nightly nor cargo-fuzz is needed; `--asan` adds AddressSanitizer, which on
//! stable needs `-Zsanitizer=address` and so `RUSTC_BOOTSTRAP=1` (the runtime ships with the stable toolchain).
//!
//! The fuzz workspace's lock file is not committed: each build starts it from the project's `Cargo.lock`, so the
//! targets link exactly the dependency versions the daemon ships with, and cargo adds only the fuzzing crates
//! (`fuzz/Cargo.toml` pins those exactly).
//!
//! Each target runs over a working corpus in `<target>/fuzz/corpus/NAME` (new inputs land there, kept between runs)
//! and the committed seeds in `fuzz/corpus/NAME` (read only). A crash, panic, timeout or out-of-memory fails the run
//! and leaves the input in `<target>/fuzz/artifacts/NAME/`; its log is `<target>/fuzz/logs/NAME.log`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};

use crate::{cargo, run_checked, target_dir, workspace_root};

/// The host triple the targets are built for: with `--target`, RUSTFLAGS reach the targets' crates but not build
/// scripts or proc macros (which must not be instrumented).
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

/// Seconds per target in `--smoke` mode (what `cargo xtask test` runs).
pub const SMOKE_SECONDS: u64 = 5;

/// What to fuzz and how long.
#[derive(Debug, Clone)]
pub struct FuzzRun {
    /// Targets to run (all of `fuzz/fuzz_targets/` when empty).
    pub targets: Vec<String>,
    /// Seconds per target.
    pub seconds: u64,
    /// Build with AddressSanitizer.
    pub asan: bool,
    /// The short pass `cargo xtask test` runs: the committed seeds and what this run finds, without the working
    /// corpus earlier runs grew (so it takes the same few seconds on every machine).
    pub smoke: bool,
}

pub fn run(opts: &FuzzRun) -> anyhow::Result<()> {
    let all = targets()?;
    let chosen: Vec<String> = if opts.targets.is_empty() {
        all.clone()
    } else {
        for t in &opts.targets {
            if !all.contains(t) {
                bail!("no fuzz target {t:?} (there are: {})", all.join(", "));
            }
        }
        opts.targets.clone()
    };
    build(opts.asan)?;
    let out = target_dir().join("fuzz");
    let mut failed = Vec::new();
    for name in &chosen {
        if let Err(e) = run_one(&out, name, opts) {
            eprintln!("xtask: fuzz: {name}: {e:#}");
            failed.push(name.as_str());
        }
    }
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Every target: the file stems of `fuzz/fuzz_targets/*.rs`, sorted.
fn targets() -> anyhow::Result<Vec<String>> {
    let dir = workspace_root().join("fuzz/fuzz_targets");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                out.push(stem.to_string());
            }
        }
    }
    out.sort();
    Ok(out)
}

fn build(asan: bool) -> anyhow::Result<()> {
    let mut rustflags = [
        "-Cpasses=sancov-module",
        "-Cllvm-args=-sanitizer-coverage-level=4",
        "-Cllvm-args=-sanitizer-coverage-inline-8bit-counters",
        "-Cllvm-args=-sanitizer-coverage-pc-table",
        "-Cllvm-args=-sanitizer-coverage-trace-compares",
        "-Cllvm-args=-sanitizer-coverage-stack-depth",
        "-Cllvm-args=-simplifycfg-branch-fold-threshold=0",
        "--cfg=fuzzing",
    ]
    .join(" ");
    let mut cmd = cargo();
    if asan {
        rustflags.push_str(" -Zsanitizer=address");
        cmd.env("RUSTC_BOOTSTRAP", "1");
    }
    let lock = workspace_root().join("Cargo.lock");
    let fuzz_lock = workspace_root().join("fuzz/Cargo.lock");
    std::fs::copy(&lock, &fuzz_lock)
        .with_context(|| format!("copying {} to {}", lock.display(), fuzz_lock.display()))?;
    let target = target_dir().join("fuzz");
    cmd.args(["build", "--release", "--bins", "--manifest-path"])
        .arg(workspace_root().join("fuzz/Cargo.toml"))
        .args(["--target", TRIPLE, "--target-dir"])
        .arg(&target)
        .env("RUSTFLAGS", rustflags)
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    run_checked(&mut cmd)
}

/// Run one target for `opts.seconds`; fails on any crash, panic, timeout or out-of-memory.
fn run_one(out: &Path, name: &str, opts: &FuzzRun) -> anyhow::Result<()> {
    let binary = out.join(TRIPLE).join("release").join(name);
    if !binary.is_file() {
        bail!(
            "no binary {}: add the target's line to fuzz/Cargo.toml",
            binary.display()
        );
    }
    let work = out
        .join(if opts.smoke { "smoke-corpus" } else { "corpus" })
        .join(name);
    if opts.smoke && work.exists() {
        std::fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    }
    let artifacts = out.join("artifacts").join(name);
    let logs = out.join("logs");
    for dir in [&work, &artifacts, &logs] {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let seeds = workspace_root().join("fuzz/corpus").join(name);
    let log_path = logs.join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = Command::new(&binary);
    cmd.arg(&work)
        .arg(&seeds)
        .arg(format!("-max_total_time={}", opts.seconds))
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"])
        .stdout(Stdio::null())
        .stderr(log);
    let started = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", binary.display()))?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let stat = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("stat::{key}:")))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "?".into())
    };
    if !status.success() {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        for line in tail.iter().rev() {
            eprintln!("  {line}");
        }
        bail!(
            "{status} after {:.0?}: the input is in {}, the whole log in {}",
            started.elapsed(),
            artifacts.display(),
            log_path.display()
        );
    }
    eprintln!(
        "xtask: fuzz: {name}: {} executions in {:.0?} ({} per second), corpus {} inputs, no crash",
        stat("number_of_executed_units"),
        started.elapsed(),
        stat("average_exec_per_sec"),
        count_files(&work) + count_files(&seeds),
    );
    Ok(())
}

fn count_files(dir: &PathBuf) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.flatten().count())
}
