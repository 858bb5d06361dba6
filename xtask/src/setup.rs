//! Idempotent installation of the prerequisites: each step checks first and does nothing when already satisfied.
//! `apt-get update` runs at most once, and only when something is about to be installed.
//!
//! The recipe (DESIGN.md): Debian `llvm-22-dev`; `bpf-linker` 0.13.0 built against LLVM 22 (`LLVM_PREFIX` must point
//! at LLVM 22 or it finds Debian's LLVM 14); `rust-src` for `-Z build-std=core`. The end-to-end tests and the demo
//! also need `ip` (iproute2), `curl`, `python3`, `openssl`, `node` and the pinned `openai`, `anthropic` and `mcp`
//! Python SDKs (pip). The operations tests need `promtool` and `prometheus` (Debian `prometheus`), `setpriv`
//! (util-linux) and `systemd-analyze` (systemd); the package test (root only) needs `cargo-deb`, pinned. The audit
//! trail's crash and disk-full tests need `mount`, `losetup`, `mkfs.ext4`, `dumpe2fs` and `fallocate`; its shipping
//! test needs `rsyslogd` with the GnuTLS network stream driver (Debian `rsyslog`, `rsyslog-gnutls`). The
//! conformance tests run the providers' Node SDKs and the agent CLIs (npm, pinned, under `/opt/enforcer-test/node`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

use crate::run_checked;

const LLVM_PACKAGE: &str = "llvm-22-dev";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Tools the tests and the demo run, with the Debian package that provides each.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("curl", "curl"),
    ("python3", "python3"),
    ("openssl", "openssl"),
    ("node", "nodejs"),
    ("npm", "npm"),
    ("git", "git"),
    ("useradd", "passwd"),
    ("promtool", "prometheus"),
    ("prometheus", "prometheus"),
    ("setpriv", "util-linux"),
    ("systemd-analyze", "systemd"),
    // The audit trail's crash and disk-full tests mount tmpfs and ext4 on loop devices.
    ("mount", "mount"),
    ("losetup", "mount"),
    ("mkfs.ext4", "e2fsprogs"),
    ("dumpe2fs", "e2fsprogs"),
    ("fallocate", "util-linux"),
    // libfuzzer-sys compiles libFuzzer (C++) for the fuzz targets.
    ("c++", "g++"),
];

/// The collector the audit shipping test sends to: rsyslog and its TLS (GnuTLS) network stream driver.
const SYSLOG_PACKAGES: &[&str] = &["rsyslog", "rsyslog-gnutls"];

/// cargo-deb builds the Debian package in the package test (enforcer/tests/package.rs, root only).
const CARGO_DEB_VERSION: &str = "3.8.0";

/// The Python the virtual environment is made from: Debian's, outside /root, so every user can run the venv.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";
/// The test virtual environment (world-readable); tests/e2e/harness.rs runs every Python from it.
pub const TEST_VENV: &str = "/opt/enforcer-test/venv";

/// The npm prefix of the Node packages the tests run (world-readable): `node_modules/.bin` holds the agent CLIs.
pub const TEST_NODE: &str = "/opt/enforcer-test/node";

/// What the conformance tests (tests/e2e/conform.rs) run as unmodified agents, pinned: the official Node SDKs of
/// the three providers and the three agent CLIs (Claude Code and Codex ship native binaries through npm).
const NODE_PACKAGES: &[(&str, &str)] = &[
    ("openai", "7.59.0"),
    ("@anthropic-ai/sdk", "1.14.0"),
    ("@google/genai", "3.3.0"),
    ("@anthropic-ai/claude-code", "2.1.332"),
    ("@openai/codex", "0.171.0"),
    ("@google/gemini-cli", "0.61.0"),
];

/// What the tests import or run, pinned: the official SDKs they run as unmodified agents (tests/e2e/sdk.rs, which
/// also runs the MCP SDK's server), requests (the trust-environment test) and the offline schema validator of the
/// Kubernetes manifests (enforcer/tests/deploy.rs, its schemas bundled). `websockets` is the `openai` SDK's optional
/// `realtime` dependency, which its Responses WebSocket mode (`client.responses.connect()`) needs (it requires
/// `>=13,<16`).
const PYTHON_PACKAGES: &[(&str, &str)] = &[
    ("openai", "3.51.0"),
    ("websockets", "15.0.1"),
    ("anthropic", "2.10.0"),
    ("mcp", "2.3.0"),
    ("requests", "2.34.2"),
    ("kubernetes-validate", "1.37.0"),
];

pub fn run() -> anyhow::Result<()> {
    let mut apt = Apt::default();

    if dpkg_installed(LLVM_PACKAGE) {
        eprintln!("xtask: setup: {LLVM_PACKAGE} already installed");
    } else {
        apt.install(&[LLVM_PACKAGE])?;
    }

    let mut missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(tool, _)| which(tool).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        let tools: Vec<&str> = TOOLS.iter().map(|(tool, _)| *tool).collect();
        eprintln!("xtask: setup: {} present", tools.join(", "));
    } else {
        apt.install(&missing)?;
    }
    // The audit shipping test (enforcer/tests/audit_ship.rs) starts its own rsyslogd in the foreground; the
    // package's service is not started here (no systemd as PID 1), and the test never uses it.
    let syslog: Vec<&str> = SYSLOG_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if syslog.is_empty() {
        eprintln!(
            "xtask: setup: {} already installed",
            SYSLOG_PACKAGES.join(", ")
        );
    } else {
        apt.install(&syslog)?;
    }
    if quiet_output(Command::new(SYSTEM_PYTHON).args(["-c", "import venv, ensurepip"])).is_none() {
        apt.install(&["python3-venv"])?;
    }

    // Only the package test uses it, and it runs only as root.
    if !is_root() {
        eprintln!("xtask: setup: not root, cargo-deb not needed (the package test runs as root)");
    } else if cargo_deb_ok() {
        eprintln!("xtask: setup: cargo-deb {CARGO_DEB_VERSION} already installed");
    } else {
        run_checked(
            Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())).args([
                "install",
                "cargo-deb",
                "--version",
                CARGO_DEB_VERSION,
                "--locked",
            ]),
        )?;
    }

    if bpf_linker_ok() {
        eprintln!("xtask: setup: bpf-linker {BPF_LINKER_VERSION} already installed");
    } else {
        run_checked(
            Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--locked",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("LLVM_PREFIX", LLVM_PREFIX),
        )?;
    }

    test_venv()?;
    test_node()?;

    if rust_src_installed() {
        eprintln!("xtask: setup: rust-src already installed");
    } else {
        run_checked(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "stable",
        ]))?;
    }
    Ok(())
}

/// Create [`TEST_VENV`] from [`SYSTEM_PYTHON`] and install [`PYTHON_PACKAGES`] into it, unless exactly those
/// versions are there already; then make it readable and runnable by everyone (whatever root's umask was).
fn test_venv() -> anyhow::Result<()> {
    let venv = Path::new(TEST_VENV);
    let python = venv.join("bin/python3");
    let names: Vec<String> = PYTHON_PACKAGES
        .iter()
        .map(|(n, _)| format!("{n:?}"))
        .collect();
    let script = format!(
        "import importlib.metadata as m\nfor n in [{}]:\n    print(n, m.version(n))",
        names.join(", ")
    );
    let want: Vec<String> = PYTHON_PACKAGES
        .iter()
        .map(|(n, v)| format!("{n} {v}"))
        .collect();
    let have = quiet_output(Command::new(&python).args(["-c", &script]));
    if have.is_some_and(|h| h.lines().map(str::trim).eq(want.iter().map(String::as_str))) {
        eprintln!(
            "xtask: setup: test venv {TEST_VENV} already has {}",
            want.join(", ")
        );
        return Ok(());
    }
    if !python.is_file() {
        run_checked(Command::new(SYSTEM_PYTHON).args(["-m", "venv", TEST_VENV]))?;
    }
    let pins: Vec<String> = PYTHON_PACKAGES
        .iter()
        .map(|(n, v)| format!("{n}=={v}"))
        .collect();
    pip_install(&python, &pins)?;
    if let Some(parent) = venv.parent() {
        run_checked(Command::new("chmod").arg("-R").arg("a+rX").arg(parent))?;
    }
    Ok(())
}

/// `pip install` the requirement specifiers (`name==version`) with a virtual environment's Python.
pub(crate) fn pip_install(python: &Path, specs: &[String]) -> anyhow::Result<()> {
    run_checked(
        Command::new(python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(specs),
    )
}

/// Install [`NODE_PACKAGES`] under [`TEST_NODE`] with npm, unless exactly those versions are there already; then
/// make the tree readable and runnable by everyone.
fn test_node() -> anyhow::Result<()> {
    let prefix = Path::new(TEST_NODE);
    let installed = |name: &str| -> Option<String> {
        let manifest = prefix.join("node_modules").join(name).join("package.json");
        let script = format!("require({:?}).version", manifest.display().to_string());
        quiet_output(Command::new("node").args(["-p", &script])).map(|v| v.trim().to_string())
    };
    let want: Vec<String> = NODE_PACKAGES
        .iter()
        .map(|(n, v)| format!("{n}@{v}"))
        .collect();
    if NODE_PACKAGES
        .iter()
        .all(|(n, v)| installed(n).as_deref() == Some(*v))
    {
        eprintln!("xtask: setup: {TEST_NODE} already has {}", want.join(", "));
        return Ok(());
    }
    std::fs::create_dir_all(prefix).with_context(|| format!("creating {TEST_NODE}"))?;
    run_checked(
        Command::new("npm")
            .args([
                "install",
                "--prefix",
                TEST_NODE,
                "--no-audit",
                "--no-fund",
                "--omit=dev",
            ])
            .args(["--save-exact", "--loglevel=error"])
            .args(&want),
    )?;
    if let Some(parent) = prefix.parent() {
        run_checked(Command::new("chmod").arg("-R").arg("a+rX").arg(parent))?;
    }
    Ok(())
}

/// apt-get, with `update` run once before the first install.
#[derive(Default)]
pub(crate) struct Apt {
    updated: bool,
}

impl Apt {
    pub(crate) fn install(&mut self, packages: &[&str]) -> anyhow::Result<()> {
        self.update(packages)?;
        run_checked(
            Command::new("apt-get")
                .args(["install", "-y", "--no-install-recommends"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    }

    /// Install the first of `candidates` the package lists offer (a package renamed between Debian releases).
    pub(crate) fn install_first_available(&mut self, candidates: &[&str]) -> anyhow::Result<()> {
        self.update(candidates)?;
        let offered = candidates.iter().find(|pkg| {
            quiet_output(Command::new("apt-cache").args(["show", "--no-all-versions", pkg]))
                .is_some_and(|out| !out.trim().is_empty())
        });
        match offered {
            Some(pkg) => self.install(&[pkg]),
            None => bail!("apt offers none of {}", candidates.join(", ")),
        }
    }

    fn update(&mut self, packages: &[&str]) -> anyhow::Result<()> {
        if !is_root() {
            bail!(
                "need root to install {} with apt-get (run as root, or install them yourself)",
                packages.join(" ")
            );
        }
        if !self.updated {
            run_checked(
                Command::new("apt-get")
                    .arg("update")
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
            self.updated = true;
        }
        Ok(())
    }
}

pub(crate) fn quiet_output(cmd: &mut Command) -> Option<String> {
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn dpkg_installed(package: &str) -> bool {
    quiet_output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| status.contains("install ok installed"))
}

fn bpf_linker_ok() -> bool {
    quiet_output(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|v| v.split_whitespace().any(|w| w == BPF_LINKER_VERSION))
}

fn cargo_deb_ok() -> bool {
    quiet_output(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["deb", "--version"]),
    )
    .is_some_and(|v| v.split_whitespace().any(|w| w == CARGO_DEB_VERSION))
}

fn rust_src_installed() -> bool {
    quiet_output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "stable",
    ]))
    .is_some_and(|list| list.lines().any(|l| l.trim() == "rust-src"))
}

pub fn is_root() -> bool {
    quiet_output(Command::new("id").arg("-u")).is_some_and(|uid| uid.trim() == "0")
}

/// Find an executable on PATH.
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// Fail with a clear message when a required tool is still missing after setup.
pub fn require(tool: &str) -> anyhow::Result<PathBuf> {
    which(tool).with_context(|| format!("{tool} not found on PATH"))
}
