//! Host plumbing the workflows share (the demo and the benchmark): quiet commands, stopping a child politely,
//! waiting for a daemon's ready line, bpffs and cgroup trees, and a throwaway upstream PKI minted with openssl.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::run_checked;

/// Run a set-up command without echoing it; show its output only when it fails.
pub fn checked_quiet(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Run a command for its effect alone, its output discarded.
pub fn quiet(cmd: &mut Command) -> std::io::Result<ExitStatus> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
}

/// Send `signal` (a kill(1) name: `TERM`, `KILL`) to a process, or to a process group when `pid` is negative.
pub fn signal(pid: i64, signal: &str) {
    let _ = quiet(
        Command::new("kill")
            .arg(format!("-{signal}"))
            .arg("--")
            .arg(pid.to_string()),
    );
}

/// SIGTERM, then SIGKILL after `grace`; reaps the child. `None` when it had to be killed.
pub fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    signal(i64::from(child.id()), "TERM");
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

/// Wait for a line containing `needle` on a child's stdout; keep draining it afterwards.
pub fn wait_for_line(
    stdout: Option<std::process::ChildStdout>,
    needle: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let stdout = stdout.context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    let wanted = needle.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && line.contains(&wanted) {
                let _ = tx.send(line);
                sent = true;
            }
        }
    });
    rx.recv_timeout(timeout).map_err(|_| {
        anyhow::anyhow!("no {needle:?} line within {timeout:?} (or the process exited)")
    })
}

/// Mount bpffs at /sys/fs/bpf unless it is there (the daemon pins its maps and links below it).
pub fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    if mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        f.nth(1) == Some("/sys/fs/bpf") && f.next() == Some("bpf")
    }) {
        return Ok(());
    }
    run_checked(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// The cgroup v2 mount, found as the daemon finds it: `/sys/fs/cgroup` when that is cgroup2, else
/// `/sys/fs/cgroup/unified` (hybrid hosts).
pub fn cgroup_root() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let unified = mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        f.nth(1) == Some("/sys/fs/cgroup") && f.next() == Some("cgroup2")
    });
    PathBuf::from(if unified {
        "/sys/fs/cgroup"
    } else {
        "/sys/fs/cgroup/unified"
    })
}

/// Kill what is left in the cgroup tree, then remove it bottom-up.
pub fn remove_cgroup_tree(top: &Path) {
    if !top.exists() {
        return;
    }
    let _ = std::fs::write(top.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while top.exists() && Instant::now() < deadline {
        let mut dirs = Vec::new();
        collect_dirs(top, &mut dirs);
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in &dirs {
            let _ = std::fs::remove_dir(d);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

/// A throwaway CA and one leaf for `sans` (openssl `subjectAltName` entries: `DNS:name`, `IP:addr`), ECDSA P-256,
/// valid two days, written to `dir` as `upstream-ca.pem`, `upstream.pem` and `upstream.key` (plus the CA key).
pub fn mint_upstream_pki(dir: &Path, ca_name: &str, sans: &[String]) -> anyhow::Result<()> {
    std::fs::write(
        dir.join("leaf.ext"),
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName={}\n",
            sans.join(",")
        ),
    )?;
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        checked_quiet(Command::new("openssl").args(args).current_dir(dir))
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let ca_subject = format!("/CN={ca_name}");
    let mut ca = vec!["req", "-x509"];
    ca.extend_from_slice(&ec);
    ca.extend_from_slice(&[
        "-keyout",
        "upstream-ca.key",
        "-out",
        "upstream-ca.pem",
        "-days",
        "2",
        "-subj",
        &ca_subject,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(&ca)?;
    let mut csr = vec!["req"];
    csr.extend_from_slice(&ec);
    csr.extend_from_slice(&[
        "-keyout",
        "upstream.key",
        "-out",
        "upstream.csr",
        "-subj",
        "/CN=upstream",
    ]);
    openssl(&csr)?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "upstream.csr",
        "-CA",
        "upstream-ca.pem",
        "-CAkey",
        "upstream-ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
        "-out",
        "upstream.pem",
    ])
}
