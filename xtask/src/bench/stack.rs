//! Everything a run starts, and its removal: the work directory (test PKI, configurations, the daemons' state), nginx
//! on loopback, and the contenders — direct, nginx as a plain TLS-terminating proxy (the reference: the same
//! transport work with no policy and no record), the enforcer as an explicit proxy, the enforcer with transparent eBPF
//! capture (its own cgroup and pin directory; the client under `enforcer exec --user` [`BENCH_USER`]), mitmproxy, and
//! on request the explicit proxy without durable records and another enforcer binary (the baseline).
//!
//! [`Stack`] stops and removes all of it when dropped, so also on failure and after Ctrl-C. What a killed run left
//! (its processes are recorded in `<work>/pids`, with their executables) is swept at the next start.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::plan::Plan;
use super::procfs;
use super::tools::{Tools, BENCH_USER};
use crate::sys::{self, mint_upstream_pki, remove_cgroup_tree, terminate, wait_for_line};
use crate::workspace_root;

/// The run's scratch space, on disk (the audit trail's fsyncs must reach a disk), reachable by [`BENCH_USER`].
pub const WORK_DIR: &str = "/var/tmp/enforcer-bench";
/// The transparent contender's capture cgroup (relative to the cgroup root) and pin directory.
const CGROUP: &str = "enforcer-bench";
const PIN_DIR: &str = "/sys/fs/bpf/enforcer-bench";
/// Loopback ports: nginx, the reference proxy, the two enforcer daemons (proxy, explicit listener, DNS), mitmproxy.
pub const UPSTREAM_PORT: u16 = 18443;
const REFERENCE_PORT: u16 = 18190;
const EXPLICIT_PROXY_PORT: u16 = 18101;
const EXPLICIT_PORT: u16 = 18102;
const EXPLICIT_DNS_PORT: u16 = 18103;
const TRANSPARENT_PROXY_PORT: u16 = 18111;
const TRANSPARENT_DNS_PORT: u16 = 18113;
const MITMPROXY_PORT: u16 = 18180;
const NOT_DURABLE_PORTS: (u16, u16, u16) = (18121, 18122, 18123);
const BASELINE_PORTS: (u16, u16, u16) = (18131, 18132, 18133);
const PORTS: &[u16] = &[
    UPSTREAM_PORT,
    REFERENCE_PORT,
    EXPLICIT_PROXY_PORT,
    EXPLICIT_PORT,
    EXPLICIT_DNS_PORT,
    TRANSPARENT_PROXY_PORT,
    TRANSPARENT_DNS_PORT,
    MITMPROXY_PORT,
    NOT_DURABLE_PORTS.0,
    NOT_DURABLE_PORTS.1,
    NOT_DURABLE_PORTS.2,
    BASELINE_PORTS.0,
    BASELINE_PORTS.1,
    BASELINE_PORTS.2,
];

/// Which enforcer daemon a contender is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Daemon {
    /// An explicit (HTTP CONNECT) proxy, no eBPF capture.
    Explicit,
    /// eBPF capture at the bench cgroup; the client runs under `enforcer exec`.
    Transparent,
    /// [`Daemon::Explicit`] with `audit.durable: false`.
    NotDurable,
    /// Another binary (`--baseline`) as an explicit proxy, on the minimal configuration.
    Baseline,
}

impl Daemon {
    /// The contender's name, its directory under the work directory and its log's name.
    fn name(self) -> &'static str {
        match self {
            Daemon::Explicit => "enforcer-explicit",
            Daemon::Transparent => "enforcer-transparent",
            Daemon::NotDurable => "enforcer-not-durable",
            Daemon::Baseline => "enforcer-baseline",
        }
    }

    /// Its configuration's template under `bench/`.
    fn template(self) -> &'static str {
        match self {
            Daemon::Explicit | Daemon::NotDurable => "enforcer-explicit.yaml",
            Daemon::Transparent => "enforcer-transparent.yaml",
            Daemon::Baseline => "enforcer-baseline.yaml",
        }
    }

    /// (transparent proxy port, explicit listener port, DNS port).
    fn ports(self) -> (u16, u16, u16) {
        match self {
            Daemon::Explicit => (EXPLICIT_PROXY_PORT, EXPLICIT_PORT, EXPLICIT_DNS_PORT),
            // The transparent daemon's explicit listener is not configured.
            Daemon::Transparent => (TRANSPARENT_PROXY_PORT, 0, TRANSPARENT_DNS_PORT),
            Daemon::NotDurable => NOT_DURABLE_PORTS,
            Daemon::Baseline => BASELINE_PORTS,
        }
    }
}
/// The response body nginx serves: exactly this many bytes of JSON.
pub const BODY_BYTES: usize = 1024;

/// One way for the client to reach the upstream.
pub struct Contender {
    /// Short name, used in file names and `--report`: `direct`, `nginx-proxy`, `enforcer-explicit`,
    /// `enforcer-transparent`, `mitmproxy`.
    pub name: &'static str,
    /// Column header: the name and, for mitmproxy, its version.
    pub label: String,
    /// The explicit proxy the client is pointed at (`oha -x`), if any.
    pub proxy: Option<String>,
    /// The CA the client must trust: the upstream's (direct) or the proxy's.
    pub ca: PathBuf,
    /// Prefix of the client's command line (`enforcer exec … --` for the transparent contender).
    pub wrap: Vec<OsString>,
    /// The port the client's connections are accepted on (where they are counted).
    pub port: u16,
    /// The port of the URL the client asks for: the upstream's, except for the reference proxy, which the client
    /// addresses as its server.
    pub url_port: u16,
    process: Option<Child>,
}

impl Contender {
    /// The proxy's pid (its process tree's CPU time and memory are the proxy's cost); `None` for direct.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }
}

/// nginx, the contenders, the work directory, cgroup and pins; all removed on drop.
pub struct Stack {
    pub work: PathBuf,
    pub logs: PathBuf,
    pub cgroup: PathBuf,
    nginx: Option<Child>,
    pub contenders: Vec<Contender>,
}

impl Stack {
    /// Sweep what an earlier run left, then start nginx and every contender, and check each answers.
    /// `enforcer` is the binary the enforcer contenders run (all but the baseline).
    pub fn start(
        tools: &Tools,
        enforcer: &Path,
        logs: &Path,
        plan: &Plan,
    ) -> anyhow::Result<Stack> {
        let work = PathBuf::from(WORK_DIR);
        sweep(&work)?;
        std::fs::create_dir_all(work.join("client"))?;
        std::fs::create_dir_all(work.join("nginx-tmp"))?;
        std::fs::create_dir_all(work.join("pki"))?;
        set_mode(&work, 0o755)?;
        // The captured client (BENCH_USER) writes oha's request database here.
        set_mode(&work.join("client"), 0o1777)?;
        std::fs::write(work.join("xtask.pid"), std::process::id().to_string())?;
        let mut stack = Stack {
            work,
            logs: logs.to_path_buf(),
            cgroup: sys::cgroup_root().join(CGROUP),
            nginx: None,
            contenders: Vec::new(),
        };
        for port in PORTS {
            if procfs::listening(*port) {
                bail!("port {port} is in use on this machine; the benchmark needs ports {PORTS:?}");
            }
        }
        std::fs::write(stack.llm_request(), super::llm::request())?;
        stack.start_nginx(tools)?;
        stack.contenders.push(Contender {
            name: "direct",
            label: "direct".into(),
            proxy: None,
            ca: stack.work.join("pki/upstream-ca.pem"),
            wrap: Vec::new(),
            port: UPSTREAM_PORT,
            url_port: UPSTREAM_PORT,
            process: None,
        });
        stack.start_reference(tools)?;
        let policy = fill(
            &template("policy.yaml")?,
            &[("PORT", &UPSTREAM_PORT.to_string())],
        );
        std::fs::write(stack.work.join("policy.yaml"), policy)?;
        stack.start_enforcer(enforcer, Daemon::Explicit)?;
        stack.start_enforcer(enforcer, Daemon::Transparent)?;
        if plan.not_durable {
            stack.start_enforcer(enforcer, Daemon::NotDurable)?;
        }
        if let Some(baseline) = &plan.baseline {
            stack.start_enforcer(baseline, Daemon::Baseline)?;
        }
        if let Some(mitmdump) = &tools.mitmdump {
            if plan.mitmproxy {
                stack.start_mitmproxy(mitmdump)?;
            }
        }
        Ok(stack)
    }

    pub fn nginx_pid(&self) -> u32 {
        self.nginx.as_ref().map_or(0, Child::id)
    }

    /// The request body the `llm<N>` test posts ([`super::llm::request`]), readable by the captured client.
    pub fn llm_request(&self) -> PathBuf {
        self.work.join("client/llm-request.json")
    }

    /// The file nginx logs `/newconn` requests to (see bench/nginx.conf).
    pub fn newconn_log(&self) -> PathBuf {
        self.work.join("newconn.log")
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) -> anyhow::Result<Child> {
        let log = File::create(self.logs.join(format!("{name}.log")))?;
        // Its own process group: a Ctrl-C reaches the client and us, and we stop the servers in order.
        let child = cmd
            .process_group(0)
            .stdin(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let exe = procfs::exe(child.id()).unwrap_or_default();
        let mut pids = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work.join("pids"))?;
        writeln!(pids, "{} {}", child.id(), exe.display())?;
        Ok(child)
    }

    fn start_nginx(&mut self, tools: &Tools) -> anyhow::Result<()> {
        let pki = self.work.join("pki");
        mint_upstream_pki(
            &pki,
            "enforcer bench upstream CA",
            &[
                "DNS:localhost".into(),
                "IP:127.0.0.1".into(),
                "IP:::1".into(),
            ],
        )?;
        let answer = super::llm::nginx_quoted(&super::llm::answer());
        let child = self.nginx_from(
            "nginx",
            tools,
            &[
                ("BODY", &body()),
                ("LLM_PATH", super::llm::PATH),
                ("LLM_ANSWER", &answer),
            ],
            UPSTREAM_PORT,
        )?;
        self.nginx = Some(child);
        wait_listening(UPSTREAM_PORT, "nginx")?;
        check(
            "nginx",
            &[],
            &pki.join("upstream-ca.pem"),
            None,
            UPSTREAM_PORT,
        )
    }

    /// The reference contender: nginx as a TLS-terminating proxy in front of the upstream (bench/nginx-proxy.conf),
    /// presenting the upstream's certificate on its own port.
    fn start_reference(&mut self, tools: &Tools) -> anyhow::Result<()> {
        let upstream = UPSTREAM_PORT.to_string();
        let child = self.nginx_from(
            "nginx-proxy",
            tools,
            &[("UPSTREAM_PORT", &upstream)],
            REFERENCE_PORT,
        )?;
        let ca = self.work.join("pki/upstream-ca.pem");
        self.contenders.push(Contender {
            name: "nginx-proxy",
            label: "nginx as proxy".into(),
            proxy: None,
            ca: ca.clone(),
            wrap: Vec::new(),
            port: REFERENCE_PORT,
            url_port: REFERENCE_PORT,
            process: Some(child),
        });
        wait_listening(REFERENCE_PORT, "nginx as proxy")?;
        check("nginx as proxy", &[], &ca, None, REFERENCE_PORT)
    }

    /// Start an nginx from the template `bench/<name>.conf` (its placeholders `WORK`, `LOGS`, `PORT` and `extra`).
    fn nginx_from(
        &mut self,
        name: &str,
        tools: &Tools,
        extra: &[(&str, &str)],
        port: u16,
    ) -> anyhow::Result<Child> {
        let (work, logs) = (
            self.work.display().to_string(),
            self.logs.display().to_string(),
        );
        let port_text = port.to_string();
        let mut values = vec![
            ("WORK", work.as_str()),
            ("LOGS", logs.as_str()),
            ("PORT", &port_text),
        ];
        values.extend_from_slice(extra);
        let mut conf = fill(&template(&format!("{name}.conf"))?, &values);
        if !ipv6_loopback() {
            conf = conf
                .lines()
                .filter(|l| !l.contains("[::1]"))
                .collect::<Vec<_>>()
                .join("\n");
        }
        let path = self.work.join(format!("{name}.conf"));
        std::fs::write(&path, conf)?;
        let child = self.spawn(
            name,
            Command::new(&tools.nginx)
                .arg("-c")
                .arg(&path)
                .arg("-p")
                .arg(&self.work)
                .arg("-e")
                .arg(self.logs.join(format!("{name}-error.log")))
                .stdout(Stdio::null()),
        )?;
        Ok(child)
    }

    /// One enforcer daemon, its configuration filled from its template.
    fn start_enforcer(&mut self, enforcer: &Path, daemon: Daemon) -> anyhow::Result<()> {
        let name = daemon.name();
        let transparent = daemon == Daemon::Transparent;
        let dir = self.work.join(name);
        std::fs::create_dir_all(&dir)?;
        set_mode(&dir, 0o755)?;
        let (proxy_port, explicit_port, dns_port) = daemon.ports();
        let mut config = fill(
            &template(daemon.template())?,
            &[
                ("WORK", &self.work.display().to_string()),
                ("DIR", &dir.display().to_string()),
                ("CGROUP_ROOT", &sys::cgroup_root().display().to_string()),
                ("CGROUP", CGROUP),
                ("PIN_DIR", PIN_DIR),
                ("PROXY_PORT", &proxy_port.to_string()),
                ("EXPLICIT_PORT", &explicit_port.to_string()),
                ("DNS_PORT", &dns_port.to_string()),
            ],
        );
        if daemon == Daemon::NotDurable {
            config.push_str("audit:\n  durable: false\n");
        }
        let mut label = name.replace('-', " ");
        if daemon == Daemon::Baseline {
            raise_agent_share(&mut config, enforcer)?;
            let left_out = baseline_policy(&self.work, enforcer)?;
            if !left_out.is_empty() {
                eprintln!(
                    "xtask: bench: {} cannot read the benchmark's whole policy; it runs without {}",
                    enforcer.display(),
                    left_out.join(", ")
                );
                label.push_str(&format!(" (without {})", left_out.join(", ")));
            }
        }
        let config_path = dir.join("enforcer.yaml");
        std::fs::write(&config_path, config)?;
        if transparent {
            sys::ensure_bpffs()?;
        }
        let mut child = self.spawn(
            name,
            Command::new(enforcer)
                .arg("run")
                .arg("--config")
                .arg(&config_path)
                .stdout(Stdio::piped()),
        )?;
        let ready = wait_for_line(child.stdout.take(), "READY", Duration::from_secs(60));
        // Versions before the state directory had a public part kept the CA at its top (a baseline may be one).
        let ca = ["state/public/ca.pem", "state/ca/ca.pem"]
            .iter()
            .map(|p| dir.join(p))
            .find(|p| p.is_file())
            .unwrap_or_else(|| dir.join("state/public/ca.pem"));
        let (proxy, wrap, port) = if transparent {
            let wrap: Vec<OsString> = vec![
                enforcer.into(),
                "exec".into(),
                "--config".into(),
                config_path.into(),
                "--profile".into(),
                "default".into(),
                "--user".into(),
                BENCH_USER.into(),
                "--".into(),
            ];
            (None, wrap, TRANSPARENT_PROXY_PORT)
        } else {
            (
                Some(format!("http://127.0.0.1:{explicit_port}")),
                Vec::new(),
                explicit_port,
            )
        };
        self.contenders.push(Contender {
            name,
            label,
            proxy,
            ca,
            wrap,
            port,
            url_port: UPSTREAM_PORT,
            process: Some(child),
        });
        ready.with_context(|| {
            format!(
                "{name} did not become ready (log: {})",
                self.logs.join(format!("{name}.log")).display()
            )
        })?;
        let c = self.contenders.last().context("contender")?;
        check(name, &c.wrap, &c.ca, c.proxy.as_deref(), UPSTREAM_PORT)
    }

    fn start_mitmproxy(&mut self, mitmdump: &Path) -> anyhow::Result<()> {
        let confdir = self.work.join("mitmproxy");
        std::fs::create_dir_all(&confdir)?;
        let child = self.spawn(
            "mitmproxy",
            Command::new(mitmdump)
                .args(["--mode", "regular", "--listen-host", "127.0.0.1", "-p"])
                .arg(MITMPROXY_PORT.to_string())
                .args([
                    "-q",
                    "--set",
                    "flow_detail=0",
                    "--set",
                    "termlog_verbosity=error",
                ])
                .arg("--set")
                .arg(format!("confdir={}", confdir.display()))
                .arg("--set")
                .arg(format!(
                    "ssl_verify_upstream_trusted_ca={}",
                    self.work.join("pki/upstream-ca.pem").display()
                ))
                .stdout(Stdio::null()),
        )?;
        let version = crate::setup::quiet_output(Command::new(mitmdump).arg("--version"))
            .and_then(|v| v.lines().next().map(str::to_string))
            .unwrap_or_default();
        let proxy = format!("http://127.0.0.1:{MITMPROXY_PORT}");
        self.contenders.push(Contender {
            name: "mitmproxy",
            label: format!(
                "mitmproxy {}",
                version.trim_start_matches("Mitmproxy:").trim()
            ),
            proxy: Some(proxy.clone()),
            ca: confdir.join("mitmproxy-ca-cert.pem"),
            wrap: Vec::new(),
            port: MITMPROXY_PORT,
            url_port: UPSTREAM_PORT,
            process: Some(child),
        });
        wait_listening(MITMPROXY_PORT, "mitmproxy")?;
        check(
            "mitmproxy",
            &[],
            &confdir.join("mitmproxy-ca-cert.pem"),
            Some(&proxy),
            UPSTREAM_PORT,
        )
    }
}

/// Write the baseline's policy, `policy-baseline.yaml` in the work directory: the benchmark's policy, or, when the
/// baseline binary's `policy check` refuses it (a build from before the policy could decide an answer's tool calls
/// reads no `phase:`), the same policy without its rules that name a phase, which that build has nothing to apply to.
/// Returns the ids of the rules left out (the column's label names them); an error, with the build's own checker's
/// message, when it refuses the policy and no rule names a phase, or refuses even the policy without them.
fn baseline_policy(work: &Path, binary: &Path) -> anyhow::Result<Vec<String>> {
    let full = std::fs::read_to_string(work.join("policy.yaml"))?;
    let path = work.join("policy-baseline.yaml");
    let check = |text: &str| -> anyhow::Result<Option<String>> {
        std::fs::write(&path, text)?;
        let out = Command::new(binary)
            .args(["policy", "check"])
            .arg(&path)
            .output()
            .with_context(|| format!("running {} policy check", binary.display()))?;
        let said = [out.stderr, out.stdout].concat();
        Ok((!out.status.success()).then(|| String::from_utf8_lossy(&said).trim().to_string()))
    };
    let Some(refused) = check(&full)? else {
        return Ok(Vec::new());
    };
    let (reduced, left_out) = without_phase_rules(&full);
    if left_out.is_empty() {
        bail!(
            "the baseline {} refuses the benchmark's policy: {refused}",
            binary.display()
        );
    }
    match check(&reduced)? {
        None => Ok(left_out),
        Some(error) => bail!(
            "the baseline {} refuses the benchmark's policy ({refused}), and without the rules {} too: {error}",
            binary.display(),
            left_out.join(", ")
        ),
    }
}

/// `policy`, laid out as bench/policy.yaml is (each rule an item `  - ` of `rules:`, block style, its other keys
/// indented four spaces), without the rules that have a `phase:` key; and the ids of the rules left out.
fn without_phase_rules(policy: &str) -> (String, Vec<String>) {
    // The text cut into pieces, each a rule (its `  - ` line and the lines under it) or a line outside the rules.
    let mut pieces: Vec<(bool, String)> = Vec::new();
    for line in policy.split_inclusive('\n') {
        let in_rule = pieces.last().is_some_and(|(rule, _)| *rule);
        if line.starts_with("  - ") {
            pieces.push((true, line.to_string()));
        } else if in_rule && (line.starts_with("    ") || line.trim().is_empty()) {
            pieces.last_mut().expect("a rule").1.push_str(line);
        } else {
            pieces.push((false, line.to_string()));
        }
    }
    // A rule's own key `name` (on its `  - ` line or indented four spaces), if it has one.
    let key = |rule: &'_ str, name: &str| -> Option<String> {
        rule.lines().find_map(|l| {
            let key = l.strip_prefix("  - ").or_else(|| l.strip_prefix("    "))?;
            key.strip_prefix(name)?
                .strip_prefix(':')
                .map(|v| v.trim().to_string())
        })
    };
    let mut left_out = Vec::new();
    let mut out = String::with_capacity(policy.len());
    for (rule, text) in pieces {
        if rule && key(&text, "phase").is_some() {
            left_out.push(key(&text, "id").unwrap_or_else(|| "(no id)".into()));
        } else {
            out.push_str(&text);
        }
    }
    (out, left_out)
}

/// The key of the per-agent connection share, which versions from f958fac on read (and older ones refuse: the
/// configuration denies unknown keys).
const AGENT_SHARE_KEY: &str = "max_connections_per_agent";

/// Give a baseline binary that knows [`AGENT_SHARE_KEY`] the same share as the explicit contender, so that
/// `conns1000` holds all its connections there too: the binary is searched for the key's name, which serde keeps in
/// it as a string, as no older version has a way to ask which keys it reads.
fn raise_agent_share(config: &mut String, binary: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let knows = bytes
        .windows(AGENT_SHARE_KEY.len())
        .any(|w| w == AGENT_SHARE_KEY.as_bytes());
    if knows {
        *config = config.replace(
            "  max_connections: 4096\n",
            &format!("  max_connections: 4096\n  {AGENT_SHARE_KEY}: 2048\n"),
        );
    }
    Ok(())
}

impl Drop for Stack {
    fn drop(&mut self) {
        // The daemons first (SIGTERM: with no agent left the transparent one detaches its programs), then nginx.
        for c in self.contenders.iter_mut().rev() {
            if let Some(mut p) = c.process.take() {
                if terminate(&mut p, Duration::from_secs(10)).is_none() {
                    eprintln!("xtask: bench: {} did not stop within 10 s; killed", c.name);
                }
            }
        }
        if let Some(mut nginx) = self.nginx.take() {
            terminate(&mut nginx, Duration::from_secs(10));
        }
        remove_cgroup_tree(&self.cgroup);
        let _ = std::fs::remove_dir_all(PIN_DIR);
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// Stop what a killed earlier run left (refusing while that run is still going), remove its cgroup, pins and work
/// directory.
fn sweep(work: &Path) -> anyhow::Result<()> {
    let running = std::fs::read_to_string(work.join("xtask.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            procfs::exe(*pid).is_some_and(|exe| {
                exe.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("xtask"))
            })
        });
    if let Some(pid) = running {
        bail!("another `cargo xtask bench` is running (pid {pid}); wait for it or stop it first");
    }
    let recorded = std::fs::read_to_string(work.join("pids")).unwrap_or_default();
    for line in recorded.lines() {
        let Some((pid, exe)) = line.split_once(' ') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if procfs::exe(pid).is_some_and(|e| e == Path::new(exe)) {
            eprintln!("xtask: bench: stopping {exe} (pid {pid}) left by an earlier run");
            sys::signal(i64::from(pid), "TERM");
            let deadline = Instant::now() + Duration::from_secs(10);
            while procfs::exe(pid).is_some() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            sys::signal(i64::from(pid), "KILL");
        }
    }
    remove_cgroup_tree(&sys::cgroup_root().join(CGROUP));
    let _ = std::fs::remove_dir_all(PIN_DIR);
    match std::fs::remove_dir_all(work) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", work.display()))
        }
        _ => Ok(()),
    }
}

/// A committed template from `bench/`.
fn template(name: &str) -> anyhow::Result<String> {
    let path = workspace_root().join("bench").join(name);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Replace each `@NAME@` of a template.
fn fill(template: &str, values: &[(&str, &str)]) -> String {
    values
        .iter()
        .fold(template.to_string(), |s, (name, value)| {
            s.replace(&format!("@{name}@"), value)
        })
}

/// A JSON object of exactly [`BODY_BYTES`] bytes, with no character nginx's quoted `return` text would mangle.
pub fn body() -> String {
    let mut items = Vec::new();
    let render = |items: &[String], pad: usize| {
        format!(
            "{{\"id\":\"bench\",\"ok\":true,\"items\":[{}],\"pad\":\"{}\"}}",
            items.join(","),
            "p".repeat(pad)
        )
    };
    while render(&items, 0).len() + 40 < BODY_BYTES {
        items.push(format!(
            "{{\"n\":{},\"v\":\"{}\"}}",
            items.len(),
            "x".repeat(20)
        ));
    }
    let pad = BODY_BYTES - render(&items, 0).len();
    render(&items, pad)
}

fn ipv6_loopback() -> bool {
    std::fs::read_to_string("/proc/net/if_inet6").is_ok_and(|s| {
        s.lines()
            .any(|l| l.starts_with("00000000000000000000000000000001"))
    })
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", path.display()))
}

fn wait_listening(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !procfs::listening(port) {
        if Instant::now() > deadline {
            bail!("{what} does not listen on port {port} after 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// `program` run directly, or after the wrapper (`enforcer exec … --`).
pub fn wrapped(wrap: &[OsString], program: impl Into<OsString>) -> Command {
    match wrap.split_first() {
        Some((first, rest)) => {
            let mut cmd = Command::new(first);
            cmd.args(rest).arg(program.into());
            cmd
        }
        None => Command::new(program.into()),
    }
}

/// Two requests through the contender with curl (under `wrap`): `GET https://localhost:<url_port>/` must get 200 and
/// the whole 1 KiB body, and the `llm<N>` test's `POST` must get 200 and the whole answer (so the policy let both
/// through); or a clear error.
fn check(
    what: &str,
    wrap: &[OsString],
    ca: &Path,
    proxy: Option<&str>,
    url_port: u16,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ca.is_file() {
        if Instant::now() > deadline {
            bail!("{what}: no CA certificate at {} after 30 s", ca.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let request = Path::new(WORK_DIR).join("client/llm-request.json");
    let mut post = vec![
        "-H".into(),
        "content-type: application/json".into(),
        "--data-binary".into(),
        format!("@{}", request.display()),
    ];
    post.push(format!("https://localhost:{url_port}{}", super::llm::PATH));
    let get = vec![format!("https://localhost:{url_port}/")];
    for (args, want) in [(get, BODY_BYTES), (post, super::llm::answer().len())] {
        let mut curl = wrapped(wrap, "curl");
        curl.args(["-sS", "--max-time", "20", "-o", "/dev/null"])
            .args(["-w", "%{http_code} %{size_download}"])
            .arg("--cacert")
            .arg(ca)
            .current_dir(WORK_DIR);
        if let Some(proxy) = proxy {
            curl.args(["--proxy", proxy]);
        }
        let out = curl
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("{what}: running curl"))?;
        let got = String::from_utf8_lossy(&out.stdout);
        if got.trim() != format!("200 {want}") {
            bail!(
                "{what}: a request through it ({}) got {:?} ({}): {}",
                args.last().map_or("", String::as_str),
                got.trim(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    eprintln!("xtask: bench: {what} answers");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_1_kib_of_json_without_quotes_nginx_would_mangle() {
        let body = body();
        assert_eq!(body.len(), BODY_BYTES);
        assert!(!body.contains('\'') && !body.contains('\\') && !body.contains('$'));
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(v["id"], "bench");
    }

    #[test]
    fn the_baseline_policy_leaves_out_exactly_the_rules_that_name_a_phase() {
        let policy = fill(
            &template("policy.yaml").expect("template"),
            &[("PORT", "1")],
        );
        let (reduced, left_out) = without_phase_rules(&policy);
        assert_eq!(left_out, ["bench-no-secrets-in-tool-calls"]);
        assert!(!reduced.contains("phase:"), "{reduced}");
        // Everything else is as it was: the header, and every other rule's lines in order.
        let kept: Vec<&str> = policy
            .split("\n\n")
            .filter(|block| !block.contains("phase:"))
            .collect();
        assert_eq!(reduced.trim_end(), kept.join("\n\n").trim_end());
        assert_eq!(without_phase_rules(&reduced), (reduced.clone(), Vec::new()));

        // A rule whose first key is its phase, and one whose condition has a member named `phase` (kept: it is
        // not the rule's key).
        let other = "version: 1\nrules:\n  - phase: response\n    id: a\n    verdict: block\n\n  - id: b\n    when:\n      \
                     json: { phase: x }\n    verdict: log\n  - id: c\n    phase: proposal\n    verdict: block\ndefault: block\n";
        let (reduced, left_out) = without_phase_rules(other);
        assert_eq!(left_out, ["a", "c"]);
        assert_eq!(
            reduced,
            "version: 1\nrules:\n  - id: b\n    when:\n      json: { phase: x }\n    verdict: log\ndefault: block\n"
        );
    }

    #[test]
    fn templates_are_filled_and_every_placeholder_is_known() {
        for (name, values) in [
            (
                "nginx.conf",
                &["WORK", "LOGS", "PORT", "BODY", "LLM_PATH", "LLM_ANSWER"][..],
            ),
            (
                "nginx-proxy.conf",
                &["WORK", "LOGS", "PORT", "UPSTREAM_PORT"][..],
            ),
            ("policy.yaml", &["PORT"][..]),
            (
                "enforcer-explicit.yaml",
                &["WORK", "DIR", "PROXY_PORT", "EXPLICIT_PORT", "DNS_PORT"][..],
            ),
            (
                "enforcer-baseline.yaml",
                &["WORK", "DIR", "PROXY_PORT", "EXPLICIT_PORT", "DNS_PORT"][..],
            ),
            (
                "enforcer-transparent.yaml",
                &[
                    "WORK",
                    "DIR",
                    "CGROUP_ROOT",
                    "CGROUP",
                    "PIN_DIR",
                    "PROXY_PORT",
                    "DNS_PORT",
                ][..],
            ),
        ] {
            let t = template(name).expect("template");
            let pairs: Vec<(&str, &str)> = values.iter().map(|v| (*v, "x")).collect();
            let filled = fill(&t, &pairs);
            assert!(
                !filled.contains('@'),
                "{name}: a placeholder is left: {filled}"
            );
            for v in values {
                assert!(t.contains(&format!("@{v}@")), "{name} has no @{v}@");
            }
        }
    }
}
