//! `cargo xtask demo`: the daemon on the default policy enforcing a demo agent, start to finish.
//!
//! 1. a network-namespace host (10.77.250.2) serving HTTPS with a certificate from a CA minted here (openssl);
//! 2. `enforcer run --config tests/demo/enforcer.yaml` (default policy, programs attached at its own cgroup);
//! 3. the demo agent `tests/demo/agent.sh` under `enforcer exec --user nobody` (an unprivileged agent, as agents
//!    should run): ordinary curl requests, some allowed, some not;
//! 4. SIGTERM to the daemon, then the audit trail's tail and its verification;
//! 5. cleanup (daemon, server, netns, cgroups, pins) — by a guard, so it also runs on failure.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::setup::{is_root, require};
use crate::{run_checked, target_dir, workspace_root};

const RUN_DIR: &str = "/run/enforcer-demo";
/// The unprivileged user the demo agent runs as (`enforcer exec --user`).
const AGENT_USER: &str = "nobody";
const CONFIG: &str = "tests/demo/enforcer.yaml";
const NETNS: &str = "enf-demo";
const VETH_HOST: &str = "enfdemoh";
const VETH_NS: &str = "enfdemon";
const HOST_IP: &str = "10.77.250.1";
const DEMO_IP: &str = "10.77.250.2";
const CGROUP: &str = "/sys/fs/cgroup/unified/enforcer-demo";
const PIN_DIR: &str = "/sys/fs/bpf/enforcer-demo";
const NAMES: &[&str] = &[
    "api.openai.com",
    "api.anthropic.com",
    "api.github.com",
    "uploads.example.net",
];

pub fn run() -> anyhow::Result<()> {
    if !is_root() {
        bail!("the demo loads eBPF programs and creates a network namespace: run it as root");
    }
    for tool in ["ip", "curl", "python3", "openssl"] {
        require(tool)?;
    }
    let root = workspace_root();
    let enforcer = target_dir().join("debug/enforcer");
    let run_dir = Path::new(RUN_DIR);
    let mut demo = Demo::default();
    demo.cleanup_host(); // leftovers of an interrupted earlier run
    let _ = std::fs::remove_dir_all(run_dir);
    std::fs::create_dir_all(run_dir).context("creating /run/enforcer-demo")?;
    // The agent user reaches the published CA bundle below it (whatever root's umask).
    std::fs::set_permissions(run_dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .context("chmod /run/enforcer-demo")?;
    ensure_bpffs()?;

    step("network-namespace host");
    demo.netns = true;
    netns_up()?;
    mint_certs(run_dir)?;
    let upstream_log = std::fs::File::create(run_dir.join("upstream.log"))?;
    let mut upstream = Command::new("ip")
        .args(["netns", "exec", NETNS, "python3"])
        .arg(root.join("tests/e2e/upstream.py"))
        .arg("--cert")
        .arg(run_dir.join("upstream.pem"))
        .arg("--key")
        .arg(run_dir.join("upstream.key"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(upstream_log)
        .spawn()
        .context("starting the demo upstream")?;
    let up_out = upstream.stdout.take();
    demo.upstream = Some(upstream);
    wait_for_line(up_out, "UPSTREAM READY", Duration::from_secs(20)).context("demo upstream")?;
    println!("  {DEMO_IP} (and names {NAMES:?} via curl --resolve) serves HTTPS with its own CA");

    step("enforcer run (default policy)");
    std::fs::create_dir_all(CGROUP).context("creating the demo cgroup")?;
    let daemon_log = run_dir.join("daemon.log");
    let mut daemon = Command::new(&enforcer)
        .args(["run", "--config", CONFIG])
        .current_dir(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&daemon_log)?)
        .spawn()
        .with_context(|| format!("starting {}", enforcer.display()))?;
    let daemon_out = daemon.stdout.take();
    demo.daemon = Some(daemon);
    match wait_for_line(daemon_out, "READY", Duration::from_secs(60)) {
        Ok(line) => println!("  daemon: {line}   (log: {})", daemon_log.display()),
        Err(err) => {
            eprintln!(
                "{}",
                std::fs::read_to_string(&daemon_log).unwrap_or_default()
            );
            return Err(err.context("enforcer run did not become ready"));
        }
    }

    step("demo agent under `enforcer exec --user nobody`");
    // The script is handed over as text: the repository may sit where the agent user cannot read (/root).
    let agent = std::fs::read_to_string(root.join("tests/demo/agent.sh"))
        .context("reading tests/demo/agent.sh")?;
    let status = Command::new(&enforcer)
        .arg("exec")
        .arg("--config")
        .arg(root.join(CONFIG))
        .args(["--profile", "default", "--user", AGENT_USER, "--"])
        .args(["sh", "-c", &agent, "agent.sh"])
        .current_dir(run_dir)
        .env("DEMO_IP", DEMO_IP)
        .status()
        .context("enforcer exec")?;
    println!("  agent exited: {status}");

    step("stop the daemon (SIGTERM)");
    demo.stop_daemon();

    step("audit trail: enforcer audit tail, enforcer audit verify");
    let audit = run_dir.join("state/audit");
    for sub in ["tail", "verify"] {
        let _ = Command::new(&enforcer)
            .arg("audit")
            .arg(sub)
            .arg(&audit)
            .status();
    }

    step("cleanup (server, netns, cgroups, pins)");
    drop(demo);
    println!("  done; the audit trail stays in {}", audit.display());
    Ok(())
}

fn step(title: &str) {
    println!("\n== {title}");
}

/// Everything the demo started; dropping it stops and removes all of it.
#[derive(Default)]
struct Demo {
    netns: bool,
    upstream: Option<Child>,
    daemon: Option<Child>,
}

impl Demo {
    fn cleanup_host(&self) {
        remove_cgroup_tree(Path::new(CGROUP));
        let _ = quiet(Command::new("ip").args(["netns", "del", NETNS]));
        let _ = quiet(Command::new("ip").args(["link", "del", VETH_HOST]));
        let _ = std::fs::remove_dir_all(PIN_DIR);
    }
}

impl Demo {
    /// SIGTERM, then SIGKILL after 10 s.
    fn stop_daemon(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = quiet(Command::new("kill").args(["-TERM", &daemon.id().to_string()]));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match daemon.try_wait() {
                    Ok(Some(status)) => {
                        println!("  daemon stopped: {status}");
                        break;
                    }
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = daemon.kill();
                        let _ = daemon.wait();
                        println!("  daemon killed (did not stop within 10 s of SIGTERM)");
                        break;
                    }
                }
            }
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.stop_daemon();
        if let Some(mut up) = self.upstream.take() {
            let _ = up.kill();
            let _ = up.wait();
        }
        if self.netns {
            self.cleanup_host();
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    checked_quiet(Command::new("ip").args(args))
}

/// Run a set-up command without echoing it; show its output only when it fails.
fn checked_quiet(cmd: &mut Command) -> anyhow::Result<()> {
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

fn quiet(cmd: &mut Command) -> std::io::Result<std::process::ExitStatus> {
    cmd.stdout(Stdio::null()).stderr(Stdio::null()).status()
}

fn netns_up() -> anyhow::Result<()> {
    ip(&["netns", "add", NETNS])?;
    ip(&[
        "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS,
    ])?;
    ip(&["link", "set", VETH_NS, "netns", NETNS])?;
    ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", VETH_HOST])?;
    ip(&["link", "set", VETH_HOST, "up"])?;
    ip(&["netns", "exec", NETNS, "ip", "link", "set", "lo", "up"])?;
    ip(&[
        "netns",
        "exec",
        NETNS,
        "ip",
        "addr",
        "add",
        &format!("{DEMO_IP}/24"),
        "dev",
        VETH_NS,
    ])?;
    ip(&["netns", "exec", NETNS, "ip", "link", "set", VETH_NS, "up"])?;
    Ok(())
}

/// A throwaway CA and a leaf for the demo names, with openssl (keys stay in /run/enforcer-demo).
fn mint_certs(dir: &Path) -> anyhow::Result<()> {
    let p = |name: &str| -> PathBuf { dir.join(name) };
    let sans: Vec<String> = NAMES
        .iter()
        .map(|n| format!("DNS:{n}"))
        .chain([format!("IP:{DEMO_IP}")])
        .collect();
    std::fs::write(
        p("leaf.ext"),
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
        "/CN=enforcer demo upstream CA",
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
        "/CN=enforcer demo upstream",
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

fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    if mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        f.nth(1) == Some("/sys/fs/bpf") && f.next() == Some("bpf")
    }) {
        return Ok(());
    }
    run_checked(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// Kill what is left in the cgroup tree, then remove it bottom-up.
fn remove_cgroup_tree(top: &Path) {
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

/// Wait for a line containing `needle` on a child's stdout; keep draining it afterwards.
fn wait_for_line(
    stdout: Option<std::process::ChildStdout>,
    needle: &str,
    timeout: Duration,
) -> anyhow::Result<String> {
    let stdout = stdout.context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    let needle = needle.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent && line.contains(&needle) {
                let _ = tx.send(line);
                sent = true;
            }
        }
    });
    rx.recv_timeout(timeout).map_err(|_| {
        anyhow::anyhow!(
            "no {:?} line within {timeout:?} (or the process exited)",
            "READY"
        )
    })
}
