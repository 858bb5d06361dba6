//! The Debian package, installed on this machine for real: built by cargo-deb from the test build's binary
//! (`--no-build`), installed with `dpkg -i`, its files, conffile and unit checked (`systemd-analyze verify`, which
//! needs no running systemd), the installed binary run, then removed (`dpkg -r`: configuration and state stay) and
//! purged (`dpkg --purge`: everything goes but the audit trail, which no package removal deletes).
//!
//! Root only (CI runs as root: there it never skips). The machine is restored whatever happens: the package is
//! purged, and what the test put under /var/lib/enforcer removed; an existing CA there is moved aside and put back.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const STATE: &str = "/var/lib/enforcer";
const UNIT: &str = "/usr/lib/systemd/system/enforcer.service";
const CONFFILE: &str = "/etc/enforcer/enforcer.yaml";

fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// Run `cmd`; (exit code, stdout + stderr).
fn run(cmd: &mut Command) -> (i32, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn ok(cmd: &mut Command) -> String {
    let (code, out) = run(cmd);
    assert_eq!(code, 0, "{cmd:?}:\n{out}");
    out
}

fn installed() -> bool {
    run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "enforcer"]))
        .1
        .contains("install ok installed")
}

/// Puts the machine back: purge the package, remove the test's files, restore a CA that was there before.
struct Restore {
    marker: PathBuf,
    created_state: bool,
    created_audit: bool,
    ca_backup: Option<PathBuf>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        if installed() {
            let _ = run(Command::new("dpkg").args(["--purge", "enforcer"]));
        }
        let _ = std::fs::remove_file(&self.marker);
        if self.created_audit {
            let _ = std::fs::remove_dir(Path::new(STATE).join("audit"));
        }
        if let Some(backup) = &self.ca_backup {
            let _ = std::fs::create_dir_all(STATE);
            let _ = std::fs::rename(backup, Path::new(STATE).join("ca"));
        }
        if self.created_state {
            let _ = std::fs::remove_dir(STATE);
        }
    }
}

#[test]
fn the_debian_package_installs_verifies_and_purges_cleanly() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "the package test needs root, and CI runs as root"
        );
        eprintln!("skipping the package test: not root (it runs as root, and in CI)");
        return;
    }
    assert!(
        !installed(),
        "an enforcer package is installed on this machine already; this test would replace it"
    );
    let state = Path::new(STATE);
    let audit = state.join("audit");
    let mut restore = Restore {
        marker: audit.join(format!("audit-package-test-{}.jsonl", std::process::id())),
        created_state: !state.exists(),
        created_audit: !audit.exists(),
        ca_backup: None,
    };
    if state.join("ca").exists() {
        let backup = PathBuf::from(format!(
            "/var/lib/enforcer-ca-before-package-test-{}",
            std::process::id()
        ));
        std::fs::rename(state.join("ca"), &backup).expect("move the existing CA aside");
        restore.ca_backup = Some(backup);
    }

    // Build: the binary this test run was built with, packaged as is (cargo-deb strips a copy).
    let out_dir = tempfile::tempdir().expect("tempdir");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    ok(Command::new(cargo)
        .args([
            "deb",
            "-p",
            "enforcer",
            "--no-build",
            "--profile",
            "dev",
            "--fast",
        ])
        .arg("--manifest-path")
        .arg(repo_root().join("Cargo.toml"))
        .arg("-o")
        .arg(out_dir.path()));
    let deb = std::fs::read_dir(out_dir.path())
        .expect("read out dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("cargo deb wrote no .deb");

    // Install.
    ok(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(installed());
    for path in [
        "/usr/bin/enforcer",
        UNIT,
        CONFFILE,
        "/usr/share/enforcer/policies/default.yaml",
        "/usr/share/enforcer/policies/default.cases.yaml",
        "/usr/share/doc/enforcer/README.md",
    ] {
        assert!(Path::new(path).is_file(), "{path} not installed");
    }
    let mode = |p: &Path| std::fs::metadata(p).map(|m| m.permissions().mode() & 0o7777);
    assert_eq!(mode(Path::new("/usr/bin/enforcer")).ok(), Some(0o755));
    assert_eq!(mode(state).ok(), Some(0o700), "{STATE}");
    let conffiles = ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "enforcer"]));
    assert!(conffiles.contains(CONFFILE), "conffiles: {conffiles}");
    // The unit as systemd would load it (no systemd as PID 1 needed).
    let (code, verify) = run(Command::new("systemd-analyze").args(["verify", UNIT]));
    assert_eq!(code, 0, "systemd-analyze verify {UNIT}:\n{verify}");
    assert!(
        verify.trim().is_empty(),
        "systemd-analyze verify {UNIT}:\n{verify}"
    );
    let unit = std::fs::read_to_string(UNIT).expect("read unit");
    for line in [
        "Type=notify",
        "ExecStart=/usr/bin/enforcer run --config /etc/enforcer/enforcer.yaml",
        "ExecReload=/usr/bin/enforcer reload --config /etc/enforcer/enforcer.yaml",
        "Restart=on-failure",
        "WatchdogSec=30s",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "{line} missing from the unit"
        );
    }

    // The installed binary: its policies check, its configuration parses (the daemon is not running here).
    let version = ok(Command::new("/usr/bin/enforcer").arg("--version"));
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    ok(Command::new("/usr/bin/enforcer").args([
        "policy",
        "check",
        "/usr/share/enforcer/policies/default.yaml",
    ]));
    let (code, status) =
        run(Command::new("/usr/bin/enforcer").args(["status", "--config", CONFFILE]));
    assert_eq!(code, 2, "{status}");
    assert!(
        status.contains("/var/lib/enforcer/control.sock: the daemon is not running"),
        "{status}"
    );

    // What a running daemon and its operator leave: an audit trail, a CA, an edited configuration.
    std::fs::create_dir_all(&audit).expect("mkdir audit");
    let trail = b"{\"seq\":0}\n";
    std::fs::write(&restore.marker, trail).expect("write audit marker");
    std::fs::create_dir_all(state.join("ca")).expect("mkdir ca");
    std::fs::write(state.join("ca/ca.key"), "not a real key").expect("write ca");
    let mut edited = std::fs::read_to_string(CONFFILE).expect("read conffile");
    edited.push_str("# edited by the operator\n");
    std::fs::write(CONFFILE, &edited).expect("edit conffile");

    // Remove: the program goes, configuration and state stay.
    ok(Command::new("dpkg").args(["-r", "enforcer"]));
    assert!(!Path::new("/usr/bin/enforcer").exists());
    assert!(!Path::new(UNIT).exists());
    assert_eq!(
        std::fs::read_to_string(CONFFILE).ok().as_deref(),
        Some(edited.as_str())
    );
    assert!(state.join("ca/ca.key").exists());
    assert_eq!(
        std::fs::read(&restore.marker).ok().as_deref(),
        Some(&trail[..])
    );

    // Purge: configuration and the daemon's state go; the audit trail stays, byte for byte.
    let purge = ok(Command::new("dpkg").args(["--purge", "enforcer"]));
    assert!(!installed());
    assert!(
        !Path::new("/etc/enforcer").exists(),
        "/etc/enforcer left after purge"
    );
    assert!(!state.join("ca").exists(), "the CA left after purge");
    assert!(!Path::new("/etc/systemd/system/multi-user.target.wants/enforcer.service").exists());
    assert_eq!(
        std::fs::read(&restore.marker).ok().as_deref(),
        Some(&trail[..])
    );
    assert!(
        purge.contains("audit trail in /var/lib/enforcer/audit is kept"),
        "{purge}"
    );
    drop(restore);
}
