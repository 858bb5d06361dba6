//! `cargo xtask demo`: the daemon on the default policy enforcing a demo agent, start to finish.
//!
//! 1. a network-namespace host (10.77.250.2) serving HTTPS with a certificate from a CA minted here (openssl);
//! 2. `enforcer run --config tests/demo/enforcer.yaml` (default policy, programs attached at its own cgroup);
//! 3. the demo agent `tests/demo/agent.sh` under `enforcer exec --user nobody` (an unprivileged agent, as agents
//!    should run): ordinary curl requests, some allowed, some not;
//! 4. SIGTERM to the daemon, then the audit trail's tail and its verification;
//! 5. cleanup (daemon, server, netns, cgroups, pins) — by a guard, so it also runs on failure.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};

use crate::setup::{is_root, require};
use crate::sys::{
    checked_quiet, ensure_bpffs, mint_upstream_pki, quiet, remove_cgroup_tree, terminate,
    wait_for_line,
};
use crate::{target_dir, workspace_root};

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
    let sans: Vec<String> = NAMES
        .iter()
        .map(|n| format!("DNS:{n}"))
        .chain([format!("IP:{DEMO_IP}")])
        .collect();
    mint_upstream_pki(run_dir, "enforcer demo upstream CA", &sans)?;
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
            match terminate(&mut daemon, Duration::from_secs(10)) {
                Some(status) => println!("  daemon stopped: {status}"),
                None => println!("  daemon killed (did not stop within 10 s of SIGTERM)"),
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
