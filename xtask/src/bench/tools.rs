//! What the benchmark runs besides the enforcer, installed idempotently (each step checks first): nginx and the
//! sqlite3 shell from Debian, the `oha` load generator (pinned, `cargo install --locked` under [`TOOLS_DIR`], where
//! the unprivileged client of the transparent runs can execute it), a mitmproxy virtual environment (pinned) and the
//! system user the captured clients run as.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use crate::setup::{dpkg_installed, pip_install, quiet_output, which, Apt};
use crate::{cargo, run_checked};

/// Where oha and the mitmproxy venv live: outside /root, readable by everyone (the captured client runs oha).
pub const TOOLS_DIR: &str = "/opt/enforcer-bench";
/// The load generator (Rust, tokio, rustls), pinned.
const OHA_VERSION: &str = "1.16.0";
/// nginx from Debian: `nginx-light` where it still exists (bookworm), else `nginx`.
const NGINX_PACKAGES: &[&str] = &["nginx-light", "nginx"];
/// mitmproxy, pinned per Python: 12.x needs Python ≥ 3.12; 11.0.2 is the last release for 3.10 and 3.11.
const MITMPROXY_PINS: &[((u32, u32), &str)] = &[((3, 12), "12.3.1"), ((3, 10), "11.0.2")];
/// The unprivileged system user the transparent contender's client runs as (`enforcer exec --user`).
pub const BENCH_USER: &str = "enforcer-bench";

/// Paths of the installed tools.
pub struct Tools {
    pub oha: PathBuf,
    pub nginx: PathBuf,
    pub sqlite3: PathBuf,
    /// `mitmdump`, when mitmproxy is part of the run.
    pub mitmdump: Option<PathBuf>,
}

/// Install (or find) everything; `mitmproxy` false skips the venv.
pub fn install(mitmproxy: bool) -> anyhow::Result<Tools> {
    let mut apt = Apt::default();
    if which("nginx").is_none() && !Path::new("/usr/sbin/nginx").is_file() {
        apt.install_first_available(NGINX_PACKAGES)?;
    }
    if !dpkg_installed("sqlite3") {
        apt.install(&["sqlite3"])?;
    }
    let oha = install_oha()?;
    let mitmdump = if mitmproxy {
        Some(install_mitmproxy()?)
    } else {
        None
    };
    ensure_system_user(BENCH_USER)?;
    Ok(Tools {
        oha,
        nginx: which("nginx").unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx")),
        sqlite3: which("sqlite3").context("sqlite3 not found after installing it")?,
        mitmdump,
    })
}

fn install_oha() -> anyhow::Result<PathBuf> {
    let oha = Path::new(TOOLS_DIR).join("bin/oha");
    let version = quiet_output(Command::new(&oha).arg("--version"));
    if version.is_some_and(|v| v.split_whitespace().any(|w| w == OHA_VERSION)) {
        eprintln!("xtask: bench: oha {OHA_VERSION} already installed");
        return Ok(oha);
    }
    run_checked(cargo().args([
        "install",
        "oha",
        "--version",
        OHA_VERSION,
        "--locked",
        "--root",
        TOOLS_DIR,
    ]))?;
    world_readable(Path::new(TOOLS_DIR))?;
    Ok(oha)
}

/// A venv under [`TOOLS_DIR`] with the mitmproxy pinned for the newest Python ≥ 3.10 found; returns `mitmdump`.
fn install_mitmproxy() -> anyhow::Result<PathBuf> {
    let venv = Path::new(TOOLS_DIR).join("mitmproxy");
    let mitmdump = venv.join("bin/mitmdump");
    let python = venv.join("bin/python3");
    if let Some((version, pin)) = python_version(&python).and_then(mitmproxy_pin) {
        let have = quiet_output(Command::new(&python).args([
            "-c",
            "import importlib.metadata as m; print(m.version('mitmproxy'))",
        ]));
        if have.is_some_and(|h| h.trim() == pin) {
            eprintln!(
                "xtask: bench: mitmproxy {pin} already installed (Python {}.{})",
                version.0, version.1
            );
            return Ok(mitmdump);
        }
    }
    let (base, version) = newest_python().context(
        "mitmproxy needs Python >= 3.10 (python3.13, python3.12 or python3 on PATH, or a pyenv version)",
    )?;
    let pin = mitmproxy_pin(version).map_or("", |(_, pin)| pin);
    let _ = std::fs::remove_dir_all(&venv);
    run_checked(Command::new(&base).arg("-m").arg("venv").arg(&venv))?;
    pip_install(&python, &[format!("mitmproxy=={pin}")])?;
    world_readable(&venv)?;
    Ok(mitmdump)
}

fn mitmproxy_pin(version: (u32, u32)) -> Option<((u32, u32), &'static str)> {
    MITMPROXY_PINS
        .iter()
        .find(|(min, _)| version >= *min)
        .map(|&(_, pin)| (version, pin))
}

/// The newest Python ≥ 3.10 among those on PATH and pyenv's versions (mitmproxy 12 needs 3.12).
fn newest_python() -> Option<(PathBuf, (u32, u32))> {
    let mut candidates: Vec<PathBuf> = ["python3.14", "python3.13", "python3.12", "python3"]
        .iter()
        .filter_map(|name| which(name))
        .collect();
    candidates.push(PathBuf::from("/usr/bin/python3"));
    let pyenv = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pyenv")));
    if let Some(Ok(entries)) = pyenv.map(|p| std::fs::read_dir(p.join("versions"))) {
        candidates.extend(entries.flatten().map(|e| e.path().join("bin/python3")));
    }
    candidates
        .into_iter()
        .filter_map(|p| python_version(&p).map(|v| (p, v)))
        .filter(|(_, v)| *v >= (3, 10))
        .max_by_key(|(_, v)| *v)
}

/// `(major, minor)` of a Python interpreter that runs (a pyenv shim for an inactive version does not).
fn python_version(python: &Path) -> Option<(u32, u32)> {
    let out = quiet_output(Command::new(python).args([
        "-c",
        "import sys; print(sys.version_info[0], sys.version_info[1])",
    ]))?;
    let mut parts = out.split_whitespace().map(str::parse::<u32>);
    Some((parts.next()?.ok()?, parts.next()?.ok()?))
}

fn world_readable(path: &Path) -> anyhow::Result<()> {
    run_checked(Command::new("chmod").arg("-R").arg("a+rX").arg(path))
}

/// A system user (no home, no login shell) created when absent; a concurrent creation is fine (exit code 9).
fn ensure_system_user(name: &str) -> anyhow::Result<()> {
    let exists = || quiet_output(Command::new("id").args(["-u", name])).is_some();
    if exists() {
        return Ok(());
    }
    let out = Command::new("useradd")
        .args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ])
        .output()
        .context("useradd")?;
    if !out.status.success() && out.status.code() != Some(9) {
        bail!(
            "useradd {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if !exists() {
        bail!("user {name} still missing after useradd");
    }
    Ok(())
}
