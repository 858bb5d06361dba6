//! The privileged end-to-end harness: a network-namespace upstream host serving HTTPS (test CA), plain HTTP, HTTPS
//! with an untrusted certificate and TCP echoes; a test CA minted with rcgen; the real `enforcer run` attached at the
//! harness's own cgroup; and clients (real curl) run tagged through `enforcer exec` or untagged.
//!
//! Tagged clients run as they should in production: as an unprivileged user ([`AGENT_USER`], created with
//! `useradd --system` when absent) through `enforcer exec --user`, with the Python of the test venv that
//! `cargo xtask setup` installs ([`PYTHON`]), from the harness's temporary directory (0755), running copies of the
//! client scripts kept there ([`Env::script`]), since the repository may sit where that user cannot read.
//!
//! [`Env`] owns every resource it creates and its `Drop` always releases them — daemon and server processes, the
//! netns and veth pair, the cgroup tree (bottom-up, after killing leftovers), the bpffs pin dir — so cleanup runs on
//! test failure and panic too. Resources left behind by a harness that was killed are swept at the next start.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The name the upstream's trusted certificate is minted for.
pub const API_HOST: &str = "api.e2e.test";
/// The name the upstream's untrusted certificate is minted for.
pub const BAD_HOST: &str = "bad.e2e.test";
/// A name pinned (`proxy.static_hosts`) to the upstream's IPv4 address only: plain HTTP naming it at the IPv6
/// address is a spoofed Host.
pub const V4_ONLY_HOST: &str = "v4only.e2e.test";
/// The profile the tests tag their clients with.
pub const PROFILE: &str = "e2e";
/// A profile configured to serve (`accept_inbound`): its agents may listen for other hosts.
pub const SERVE_PROFILE: &str = "e2e-serve";
pub const ECHO_ALLOWED: u16 = 7000;
pub const ECHO_BLOCKED: u16 = 7001;
pub const BAD_TLS_PORT: u16 = 8443;
/// A UDP port on the netns host that counts the datagrams it receives.
pub const UDP_SINK: u16 = 7002;
/// What the netns host's DNS responder (port 53, the daemon's `dns.upstream`) answers every A query with.
pub const DNS_ANSWER: &str = "192.0.2.7";

/// The unprivileged user every tagged client runs as (`enforcer exec --user`).
pub const AGENT_USER: &str = "enforcer-e2e";
/// The test venv's Python (`cargo xtask setup`): readable by [`AGENT_USER`], with the pinned SDKs and requests.
pub const PYTHON: &str = "/opt/enforcer-test/venv/bin/python3";
/// PATH for tagged clients: the venv first (its `python3`), then the system's, nothing under /root.
const AGENT_PATH: &str = "/opt/enforcer-test/venv/bin:/usr/local/bin:/usr/bin:/bin";

const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";
const BPFFS: &str = "/sys/fs/bpf";
const PREFIX: &str = "enforcer-e2e-";
const NETNS_PREFIX: &str = "enf-e2e-";

pub type Result<T> = std::result::Result<T, String>;

/// The repository root (the enforcer crate's parent).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent().unwrap_or(here).to_path_buf()
}

/// The `enforcer` binary under test: cargo's, unless `ENFORCER_BIN` names another build.
pub fn enforcer_bin() -> PathBuf {
    std::env::var_os("ENFORCER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_enforcer")))
}

/// The running daemon.
struct Daemon {
    child: Child,
}

pub struct Env {
    pub id: u32,
    pub netns: String,
    veth_host: String,
    veth_ns: String,
    /// The upstream's addresses inside the netns.
    pub v4: String,
    pub v6: String,
    pub dir: tempfile::TempDir,
    pub test_ca: PathBuf,
    pub config: PathBuf,
    pub audit_dir: PathBuf,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub port: u16,
    /// The explicit proxy listener (CONNECT and absolute-form) on 127.0.0.1, for the profile [`PROFILE`].
    pub explicit_port: u16,
    /// The daemon's DNS listener port (UDP, 127.0.0.1 and ::1).
    pub dns_port: u16,
    /// The daemon's Prometheus endpoint (`metrics.listen`) on 127.0.0.1.
    pub metrics_port: u16,
    /// Extra environment for the daemon (e.g. `NOTIFY_SOCKET`), applied at its next start.
    pub daemon_env: Vec<(String, String)>,
    /// The host side of the veth pair (10.77.N.1, fd77:N::1): nothing listens on port 53 there, so a DNS query
    /// sent to it is answered only when the enforcer redirected it.
    pub host_v4: String,
    pub host_v6: String,
    pub daemon_log: PathBuf,
    pub upstream_log: PathBuf,
    /// [`AGENT_USER`]'s uid and gid.
    pub agent_uid: u32,
    pub agent_gid: u32,
    upstream: Option<Child>,
    daemon: Option<Daemon>,
    /// Why the daemon is not running, when it failed to start.
    pub daemon_error: Option<String>,
}

/// What a curl run returned.
#[derive(Debug)]
pub struct Curl {
    /// curl's exit code (0 ok, 60 certificate problem, 7 connection refused, …).
    pub code: i32,
    /// The HTTP status (`%{http_code}`), 0 when there was no response.
    pub status: u16,
    pub body: String,
    pub stderr: String,
}

impl Env {
    /// Build the whole environment. The upstream must come up; the daemon may fail (recorded in `daemon_error`) so
    /// that tests which do not need it still run.
    pub fn start() -> Result<Env> {
        sweep_stale();
        ensure_bpffs()?;
        if !Path::new(PYTHON).is_file() {
            return Err(format!("{PYTHON} is missing: run `cargo xtask setup`"));
        }
        let (agent_uid, agent_gid) = ensure_agent_user()?;
        let id = std::process::id();
        let n = pick_subnet()?;
        let dir = tempfile::Builder::new()
            .prefix("enforcer-e2e-")
            .tempdir()
            .map_err(|e| format!("tempdir: {e}"))?;
        let root = dir.path().to_path_buf();
        // The agent user works from here and reads the scripts, the test CA and the published CA files below it.
        set_mode(&root, 0o755)?;
        copy_scripts(&root.join("scripts"))?;
        let mut env = Env {
            id,
            netns: format!("{NETNS_PREFIX}{id}"),
            veth_host: format!("enfh{id}"),
            veth_ns: format!("enfn{id}"),
            v4: format!("10.77.{n}.2"),
            v6: format!("fd77:{n}::2"),
            dir,
            test_ca: root.join("test-ca.pem"),
            config: root.join("enforcer.yaml"),
            audit_dir: root.join("state/audit"),
            cgroup: Path::new(CGROUP_ROOT).join(format!("{PREFIX}{id}")),
            pin_dir: Path::new(BPFFS).join(format!("{PREFIX}{id}")),
            port: free_port()?,
            explicit_port: free_port()?,
            dns_port: free_udp_port()?,
            metrics_port: free_port()?,
            daemon_env: Vec::new(),
            host_v4: format!("10.77.{n}.1"),
            host_v6: format!("fd77:{n}::1"),
            daemon_log: root.join("daemon.log"),
            upstream_log: root.join("upstream.log"),
            agent_uid,
            agent_gid,
            upstream: None,
            daemon: None,
            daemon_error: None,
        };
        env.make_netns(n)?;
        env.mint_certs()?;
        env.start_upstream()?;
        std::fs::create_dir_all(&env.cgroup)
            .map_err(|e| format!("mkdir {}: {e}", env.cgroup.display()))?;
        env.write_config()?;
        if let Err(err) = env.start_daemon() {
            env.daemon_error = Some(err);
        }
        Ok(env)
    }

    fn make_netns(&self, n: u8) -> Result<()> {
        let (ns, vh, vn) = (&self.netns, &self.veth_host, &self.veth_ns);
        ip(&["netns", "add", ns])?;
        ip(&["link", "add", vh, "type", "veth", "peer", "name", vn])?;
        ip(&["link", "set", vn, "netns", ns])?;
        ip(&["addr", "add", &format!("10.77.{n}.1/24"), "dev", vh])?;
        ip(&[
            "-6",
            "addr",
            "add",
            &format!("fd77:{n}::1/64"),
            "dev",
            vh,
            "nodad",
        ])?;
        ip(&["link", "set", vh, "up"])?;
        let in_ns = |args: &[&str]| {
            let mut full = vec!["netns", "exec", ns, "ip"];
            full.extend_from_slice(args);
            ip(&full)
        };
        in_ns(&["link", "set", "lo", "up"])?;
        in_ns(&["addr", "add", &format!("{}/24", self.v4), "dev", vn])?;
        in_ns(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", self.v6),
            "dev",
            vn,
            "nodad",
        ])?;
        in_ns(&["link", "set", vn, "up"])?;
        Ok(())
    }

    /// The trusted test CA with a leaf for `api.e2e.test` (+ the upstream's IPs), and an untrusted CA with a leaf for
    /// `bad.e2e.test`. Keys stay in the tempdir.
    fn mint_certs(&self) -> Result<()> {
        let root = self.dir.path();
        let names = |host: &str| vec![host.to_string(), self.v4.clone(), self.v6.clone()];
        let (ca_pem, leaf_pem, leaf_key) = mint("enforcer e2e test CA", names(API_HOST))?;
        write(&self.test_ca, &ca_pem)?;
        write(&root.join("upstream.pem"), &leaf_pem)?;
        write(&root.join("upstream.key"), &leaf_key)?;
        let (_, bad_pem, bad_key) = mint("untrusted CA", names(BAD_HOST))?;
        write(&root.join("bad.pem"), &bad_pem)?;
        write(&root.join("bad.key"), &bad_key)?;
        for key in ["upstream.key", "bad.key"] {
            set_mode(&root.join(key), 0o600)?;
        }
        Ok(())
    }

    fn start_upstream(&mut self) -> Result<()> {
        let root = self.dir.path();
        let script = repo_root().join("tests/e2e/upstream.py");
        let log = std::fs::File::create(&self.upstream_log).map_err(|e| e.to_string())?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.netns, PYTHON])
            .arg(&script)
            .arg("--cert")
            .arg(root.join("upstream.pem"))
            .arg("--key")
            .arg(root.join("upstream.key"))
            .arg("--bad-cert")
            .arg(root.join("bad.pem"))
            .arg("--bad-key")
            .arg(root.join("bad.key"))
            .args(["--bad-port", &BAD_TLS_PORT.to_string()])
            .args(["--echo-port", &ECHO_ALLOWED.to_string()])
            .args(["--echo-port", &ECHO_BLOCKED.to_string()])
            .args(["--udp-port", &UDP_SINK.to_string()])
            .args(["--dns-port", "53", "--dns-answer", DNS_ANSWER])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting upstream.py: {e}"))?;
        let stdout = child.stdout.take();
        self.upstream = Some(child);
        let line = wait_for_line(stdout, "UPSTREAM READY", Duration::from_secs(20));
        line.map(|_| ())
            .map_err(|e| format!("upstream: {e}; log:\n{}", tail(&self.upstream_log)))
    }

    fn write_config(&self) -> Result<()> {
        let root = self.dir.path();
        let policy = repo_root().join("tests/e2e/policy.yaml");
        let yaml = format!(
            "policy: {policy}\n\
             state_dir: {state}\n\
             cgroup_root: {CGROUP_ROOT}\n\
             capture:\n  cgroup: {PREFIX}{id}\n  pin_dir: {pin}\n\
             proxy:\n  port: {port}\n  extra_roots: [{ca}]\n\
             \x20 explicit: {{ port: {explicit}, profile: {PROFILE} }}\n\
             \x20 static_hosts:\n\
             \x20   {API_HOST}: [\"{v4}\", \"{v6}\"]\n\
             \x20   {BAD_HOST}: [\"{v4}\", \"{v6}\"]\n\
             \x20   {V4_ONLY_HOST}: [\"{v4}\"]\n\
             dns:\n  port: {dns_port}\n  upstream: \"{v4}:53\"\n\
             audit:\n  checkpoint_interval_secs: 1\n\
             metrics:\n  listen: \"127.0.0.1:{metrics}\"\n\
             profiles:\n  {PROFILE}: {{ cgroups: [] }}\n  {SERVE_PROFILE}: {{ accept_inbound: true }}\n",
            policy = policy.display(),
            state = root.join("state").display(),
            id = self.id,
            pin = self.pin_dir.display(),
            port = self.port,
            explicit = self.explicit_port,
            dns_port = self.dns_port,
            metrics = self.metrics_port,
            ca = self.test_ca.display(),
            v4 = self.v4,
            v6 = self.v6,
        );
        write(&self.config, &yaml)
    }

    fn start_daemon(&mut self) -> Result<()> {
        self.start_daemon_with_env(&[])
    }

    /// Start the daemon with extra environment variables (`SSL_CERT_FILE` for its trust store, ...).
    fn start_daemon_with_env(&mut self, vars: &[(&str, &Path)]) -> Result<()> {
        let log = std::fs::File::create(&self.daemon_log).map_err(|e| e.to_string())?;
        let mut child = Command::new(enforcer_bin())
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .envs(vars.iter().map(|(k, v)| (*k, *v)))
            .env("RUST_LOG", "info,enforcer=debug")
            .env("NO_COLOR", "1")
            .envs(self.daemon_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting enforcer run: {e}"))?;
        let stdout = child.stdout.take();
        self.daemon = Some(Daemon { child });
        let want = format!("READY proxy_port={}", self.port);
        match wait_for_line(stdout, "READY", Duration::from_secs(90)) {
            Ok(line) if line.trim() == want => Ok(()),
            Ok(line) => Err(format!("daemon said {line:?}, expected {want:?}")),
            Err(e) => Err(format!(
                "enforcer run: {e}; log:\n{}",
                tail(&self.daemon_log)
            )),
        }
    }

    /// Fail the calling test unless the daemon is up.
    pub fn need_daemon(&self) {
        if let Some(err) = &self.daemon_error {
            panic!("the daemon did not start: {err}");
        }
    }

    /// Send SIGTERM and wait; returns the daemon's exit code (None when killed by a signal or already stopped).
    pub fn stop_daemon(&mut self) -> Result<Option<i32>> {
        let Some(mut daemon) = self.daemon.take() else {
            return Err("no daemon running".into());
        };
        let status = terminate(&mut daemon.child, Duration::from_secs(15))?;
        Ok(status.and_then(|s| s.code()))
    }

    /// Kill the daemon with SIGKILL (no shutdown code runs), as a crash or the OOM killer would.
    pub fn kill_daemon(&mut self) -> Result<()> {
        let mut daemon = self.daemon.take().ok_or("no daemon running")?;
        daemon.child.kill().map_err(|e| format!("kill -9: {e}"))?;
        daemon.child.wait().map_err(|e| format!("wait: {e}"))?;
        Ok(())
    }

    /// `enforcer exec --config … --profile e2e --user enforcer-e2e --`: what runs a tagged agent, as argv (for
    /// wrappers such as `unshare`); the command to run follows.
    pub fn exec_argv(&self) -> Vec<std::ffi::OsString> {
        self.exec_argv_in(PROFILE)
    }

    /// [`Env::exec_argv`] with another profile.
    pub fn exec_argv_in(&self, profile: &str) -> Vec<std::ffi::OsString> {
        self.exec_argv_with(profile, &[])
    }

    /// [`Env::exec_argv_in`] with `options` of `exec`'s own (`--stop-timeout 1`) before its `--`.
    fn exec_argv_with(&self, profile: &str, options: &[&str]) -> Vec<std::ffi::OsString> {
        let mut argv: Vec<std::ffi::OsString> = vec![enforcer_bin().into(), "exec".into()];
        argv.push("--config".into());
        argv.push(self.config.clone().into());
        for a in ["--profile", profile, "--user", AGENT_USER] {
            argv.push(a.into());
        }
        argv.extend(options.iter().map(Into::into));
        argv.push("--".into());
        argv
    }

    /// Give a command that runs a tagged agent (directly or through a wrapper) the agent's working directory and
    /// PATH.
    pub fn agent_command(&self, mut cmd: Command) -> Command {
        cmd.current_dir(self.dir.path())
            .env("PATH", AGENT_PATH)
            .stdin(Stdio::null());
        cmd
    }

    /// `enforcer exec … --` as a Command, ready for the agent's command and arguments.
    pub fn exec_command(&self) -> Command {
        self.exec_command_in(PROFILE)
    }

    /// [`Env::exec_command`] with `options` of `exec`'s own (`--stop-timeout 1`) before its `--`.
    pub fn exec_command_with(&self, options: &[&str]) -> Command {
        self.command_of(self.exec_argv_with(PROFILE, options))
    }

    /// [`Env::exec_command`] with another profile.
    pub fn exec_command_in(&self, profile: &str) -> Command {
        self.command_of(self.exec_argv_in(profile))
    }

    /// `argv` as an agent's Command ([`Env::agent_command`]).
    fn command_of(&self, argv: Vec<std::ffi::OsString>) -> Command {
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        self.agent_command(cmd)
    }

    /// A copy of a client script from tests/e2e (`"ws_client.py"`, `"sdk/llm_client.py"`) the agent user can read.
    pub fn script(&self, name: &str) -> String {
        self.dir
            .path()
            .join("scripts")
            .join(name)
            .display()
            .to_string()
    }

    /// curl as a tagged agent: `enforcer exec --profile e2e --user enforcer-e2e -- curl …`.
    pub fn curl_tagged(&self, args: &[&str]) -> Curl {
        let mut cmd = self.exec_command();
        cmd.arg("curl");
        curl_with(cmd, args)
    }

    /// The same curl, untagged (straight from the harness's own cgroup).
    pub fn curl_untagged(&self, args: &[&str]) -> Curl {
        curl_with(Command::new("curl"), args)
    }

    /// Run any command as a tagged agent; returns (exit code, stdout, stderr).
    pub fn exec_tagged(&self, cmd: &[&str]) -> (i32, String, String) {
        let mut exec = self.exec_command();
        exec.args(cmd);
        output(exec)
    }

    /// `enforcer exec --profile e2e -- CMD…` in a private mount namespace where `file` is bind-mounted over `over`
    /// (a client's own /etc/hosts or /etc/resolv.conf, leaving the host's untouched).
    pub fn tagged_with_file(&self, file: &Path, over: &str, cmd: &[&str]) -> Command {
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$0" "$1" && shift && exec "$@""#)
            .arg(file)
            .arg(over)
            .args(self.exec_argv())
            .args(cmd);
        self.agent_command(c)
    }

    /// The cgroup the daemon tags with `profile` (`enforcer exec` creates its cgroups below it).
    pub fn profile_cgroup(&self, profile: &str) -> PathBuf {
        self.cgroup.join("enforcer").join(profile)
    }

    /// `--resolve` argument pinning `host:port` to the upstream's IPv4 or IPv6 address.
    pub fn resolve(&self, host: &str, port: u16, v6: bool) -> String {
        if v6 {
            format!("{host}:{port}:[{}]", self.v6)
        } else {
            format!("{host}:{port}:{}", self.v4)
        }
    }

    /// How many requests the upstream saw for `path`, asked directly (untagged, plain HTTP).
    pub fn upstream_count(&self, path: &str) -> u64 {
        let url = format!("http://{}/_ctl/count?path={path}", self.v4);
        let out = self.curl_untagged(&[&url]);
        assert_eq!(out.status, 200, "count query failed: {out:?}");
        let v: serde_json::Value = serde_json::from_str(&out.body)
            .unwrap_or_else(|e| panic!("count reply {:?}: {e}", out.body));
        v["count"]
            .as_u64()
            .unwrap_or_else(|| panic!("count reply {v}"))
    }

    /// How many datagrams the netns host's UDP sink on `port` received, asked directly (untagged, plain HTTP).
    pub fn udp_count(&self, port: u16) -> u64 {
        let url = format!("http://{}/_ctl/udp_count?port={port}", self.v4);
        let out = self.curl_untagged(&[&url]);
        assert_eq!(out.status, 200, "udp count query failed: {out:?}");
        let v: serde_json::Value = serde_json::from_str(&out.body)
            .unwrap_or_else(|e| panic!("udp count reply {:?}: {e}", out.body));
        v["count"]
            .as_u64()
            .unwrap_or_else(|| panic!("udp count reply {v}"))
    }

    /// How many DNS queries for `name` the netns host's responder received, asked directly (untagged).
    pub fn dns_count(&self, name: &str) -> u64 {
        let url = format!("http://{}/_ctl/dns_count?name={name}", self.v4);
        let out = self.curl_untagged(&[&url]);
        assert_eq!(out.status, 200, "dns count query failed: {out:?}");
        let v: serde_json::Value = serde_json::from_str(&out.body)
            .unwrap_or_else(|e| panic!("dns count reply {:?}: {e}", out.body));
        v["count"]
            .as_u64()
            .unwrap_or_else(|| panic!("dns count reply {v}"))
    }

    /// Let SSE stream `id` send its second event (an untagged control request straight to the netns host).
    pub fn release_sse(&self, id: &str) {
        let url = format!("http://{}/_ctl/release?id={id}", self.v4);
        let out = self.curl_untagged(&[&url]);
        assert_eq!(out.status, 200, "release failed: {out:?}");
    }

    /// Every audit record (`enforcer audit tail DIR --json -n 1000000`), as JSON.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        let out = Command::new(enforcer_bin())
            .args(["audit", "tail"])
            .arg(&self.audit_dir)
            .args(["--json", "-n", "1000000"])
            .output()
            .unwrap_or_else(|e| panic!("enforcer audit tail: {e}"));
        assert!(
            out.status.success(),
            "enforcer audit tail failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
            .collect()
    }

    /// `enforcer audit verify DIR` → (success, output).
    /// `enforcer audit verify` passes on the live trail (retried for a few seconds, so a checkpoint being written
    /// as we read cannot fail it).
    pub fn assert_audit_verifies(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (ok, out) = self.audit_verify();
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "enforcer audit verify failed: {out}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn audit_verify(&self) -> (bool, String) {
        match Command::new(enforcer_bin())
            .args(["audit", "verify"])
            .arg(&self.audit_dir)
            .output()
        {
            Ok(o) => (
                o.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
            ),
            Err(e) => (false, format!("spawn: {e}")),
        }
    }

    pub fn daemon_log_tail(&self) -> String {
        tail(&self.daemon_log)
    }

    pub fn upstream_log_tail(&self) -> String {
        tail(&self.upstream_log)
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            let _ = terminate(&mut daemon.child, Duration::from_secs(10));
        }
        if let Some(mut up) = self.upstream.take() {
            let _ = up.kill();
            let _ = up.wait();
        }
        remove_cgroup_tree(&self.cgroup);
        let _ = ip(&["netns", "del", &self.netns]);
        let _ = ip(&["link", "del", &self.veth_host]);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// What is left behind on the host by the harness run `id` (for the cleanup test).
pub fn leftovers(id: u32) -> Vec<String> {
    let mut found = Vec::new();
    let cg = Path::new(CGROUP_ROOT).join(format!("{PREFIX}{id}"));
    if cg.exists() {
        found.push(cg.display().to_string());
    }
    let pin = Path::new(BPFFS).join(format!("{PREFIX}{id}"));
    if pin.exists() {
        found.push(pin.display().to_string());
    }
    if netns_list()
        .iter()
        .any(|n| n == &format!("{NETNS_PREFIX}{id}"))
    {
        found.push(format!("netns {NETNS_PREFIX}{id}"));
    }
    if Path::new("/sys/class/net")
        .join(format!("enfh{id}"))
        .exists()
    {
        found.push(format!("link enfh{id}"));
    }
    found
}

/// Run to completion; (exit code, stdout, stderr), -1 and the error when it did not start.
pub fn output(mut cmd: Command) -> (i32, String, String) {
    match cmd.stdin(Stdio::null()).output() {
        Ok(o) => (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => (-1, String::new(), format!("spawn: {e}")),
    }
}

/// Run curl as `cmd` (its program and any wrapper) with the harness's output options and `args`.
pub fn curl_with(mut cmd: Command, args: &[&str]) -> Curl {
    cmd.args(["-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .args(args)
        .stdin(Stdio::null());
    match cmd.output() {
        Ok(o) => {
            let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
            let (body, status) = match stdout.rsplit_once('\n') {
                Some((body, code)) => (body.to_string(), code.trim().parse().unwrap_or(0)),
                None => (String::new(), stdout.trim().parse().unwrap_or(0)),
            };
            Curl {
                code: o.status.code().unwrap_or(-1),
                status,
                body,
                stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            }
        }
        Err(e) => Curl {
            code: -1,
            status: 0,
            body: String::new(),
            stderr: format!("spawn: {e}"),
        },
    }
}

/// A CA and one leaf it signs for `names`: (CA PEM, leaf PEM, leaf key PEM).
fn mint(ca_name: &str, names: Vec<String>) -> Result<(String, String, String)> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    let err = |e: rcgen::Error| e.to_string();
    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, ca_name);
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().map_err(err)?;
    let mut leaf_params = CertificateParams::new(names.clone()).map_err(err)?;
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, names[0].as_str());
    leaf_params.use_authority_key_identifier_extension = true;
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).map_err(err)?;
    Ok((ca_cert.pem(), leaf.pem(), leaf_key.serialize_pem()))
}

/// The uid and gid of [`AGENT_USER`], created (`useradd --system`, no home, no login shell) when absent. Another
/// harness creating it at the same moment is fine (useradd's exit code 9: it exists).
fn ensure_agent_user() -> Result<(u32, u32)> {
    let ids = || -> Option<(u32, u32)> {
        let id = |flag: &str| {
            let out = Command::new("id").args([flag, AGENT_USER]).output().ok()?;
            out.status.success().then_some(())?;
            String::from_utf8_lossy(&out.stdout).trim().parse().ok()
        };
        Some((id("-u")?, id("-g")?))
    };
    if let Some(ids) = ids() {
        return Ok(ids);
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
            AGENT_USER,
        ])
        .output()
        .map_err(|e| format!("useradd: {e}"))?;
    if !out.status.success() && out.status.code() != Some(9) {
        return Err(format!(
            "useradd {AGENT_USER}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    ids().ok_or_else(|| format!("user {AGENT_USER} still missing after useradd"))
}

/// Copy the client scripts (tests/e2e/*.py, tests/e2e/sdk/*, tests/e2e/conform/*) to `dest`, readable by every
/// user.
fn copy_scripts(dest: &Path) -> Result<()> {
    let src = repo_root().join("tests/e2e");
    for sub in ["", "sdk", "conform"] {
        let from = src.join(sub);
        let to = dest.join(sub);
        std::fs::create_dir_all(&to).map_err(|e| format!("mkdir {}: {e}", to.display()))?;
        set_mode(&to, 0o755)?;
        let entries =
            std::fs::read_dir(&from).map_err(|e| format!("read {}: {e}", from.display()))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let script = path.extension().is_some_and(|e| e == "py" || e == "mjs");
            if script && path.is_file() {
                let target = to.join(entry.file_name());
                std::fs::copy(&path, &target)
                    .map_err(|e| format!("copy {}: {e}", path.display()))?;
                set_mode(&target, 0o644)?;
            }
        }
    }
    Ok(())
}

/// Make the process `cmd` starts die with the harness (PR_SET_PDEATHSIG), so a server a test starts never outlives
/// it, whatever happens to the harness.
pub fn die_with_harness(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("chmod {mode:o} {}: {e}", path.display()))
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(|e| format!("write {}: {e}", path.display()))
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn netns_list() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A 10.77.N.0/24 not already configured on this host.
fn pick_subnet() -> Result<u8> {
    let out = Command::new("ip")
        .args(["-o", "addr"])
        .output()
        .map_err(|e| format!("ip -o addr: {e}"))?;
    let addrs = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = (std::process::id() % 200) as u8 + 20;
    (0..200u8)
        .map(|i| 20 + (start - 20 + i) % 200)
        .find(|n| !addrs.contains(&format!("10.77.{n}.")))
        .ok_or_else(|| "no free 10.77.N.0/24 subnet".to_string())
}

/// A port free on both 127.0.0.1 and ::1 right now.
pub fn free_port() -> Result<u16> {
    for _ in 0..50 {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = v4.local_addr().map_err(|e| e.to_string())?.port();
        if std::net::TcpListener::bind(("::1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err("no free port".into())
}

/// A UDP port free on both 127.0.0.1 and ::1 right now.
fn free_udp_port() -> Result<u16> {
    for _ in 0..50 {
        let v4 = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let port = v4.local_addr().map_err(|e| e.to_string())?.port();
        if std::net::UdpSocket::bind(("::1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err("no free UDP port".into())
}

/// Mount bpffs at /sys/fs/bpf when nothing is mounted there (pins need it).
fn ensure_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|e| e.to_string())?;
    if mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some(BPFFS) && l.split_whitespace().nth(2) == Some("bpf")
    }) {
        return Ok(());
    }
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf", BPFFS])
        .output()
        .map_err(|e| format!("mount bpffs: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "mount -t bpf bpf {BPFFS}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Remove what an earlier harness process (now dead) left behind.
fn sweep_stale() {
    let dead = |id: &str| {
        id.parse::<u32>()
            .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    for ns in netns_list() {
        if let Some(id) = ns.strip_prefix(NETNS_PREFIX) {
            if dead(id) {
                let _ = ip(&["netns", "del", &ns]);
                let _ = ip(&["link", "del", &format!("enfh{id}")]);
            }
        }
    }
    for base in [CGROUP_ROOT, BPFFS] {
        let Ok(entries) = std::fs::read_dir(base) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // `enforcer-e2e-<pid>`, and the ops tests' `enforcer-e2e-<what>-<pid>`.
            if let Some(id) = name
                .strip_prefix(PREFIX)
                .and_then(|rest| rest.rsplit('-').next())
            {
                if dead(id) {
                    if base == CGROUP_ROOT {
                        remove_cgroup_tree(&entry.path());
                    } else {
                        let _ = std::fs::remove_dir_all(entry.path());
                    }
                }
            }
        }
    }
}

/// Kill every process left in the cgroup tree, then remove the cgroups bottom-up.
pub fn remove_cgroup_tree(top: &Path) {
    if !top.exists() {
        return;
    }
    let _ = std::fs::write(top.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut dirs = Vec::new();
        collect_dirs(top, &mut dirs);
        // Deepest first.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in &dirs {
            let _ = std::fs::remove_dir(d);
        }
        if !top.exists() || Instant::now() > deadline {
            return;
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

/// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status when the process exited by itself.
fn terminate(child: &mut Child, grace: Duration) -> Result<Option<std::process::ExitStatus>> {
    if let Ok(Some(status)) = child.try_wait() {
        return Ok(Some(status));
    }
    let pid = i32::try_from(child.id()).map_err(|e| e.to_string())?;
    // SAFETY: plain kill(2) on our own child's pid, which has not been reaped yet.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(Some(status));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(None)
}

/// Read `stdout` lines until one contains `needle` (returned) or the deadline passes; keeps draining afterwards.
fn wait_for_line(
    stdout: Option<std::process::ChildStdout>,
    needle: &str,
    timeout: Duration,
) -> Result<String> {
    let stdout = stdout.ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    let needle = needle.to_string();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let mut sent = false;
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if !sent && line.contains(&needle) => {
                    let _ = tx.send(Ok(line.trim_end().to_string()));
                    sent = true;
                }
                Ok(_) => {}
            }
        }
        if !sent {
            let _ = tx.send(Err("exited before becoming ready".to_string()));
        }
        // Keep draining anything after the ready line (the pipe would otherwise fill).
        let mut rest = Vec::new();
        let _ = reader.read_to_end(&mut rest);
    });
    rx.recv_timeout(timeout)
        .map_err(|_| format!("not ready after {timeout:?}"))?
}

/// The last lines of a log file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

// ---- for the SDK tests (sdk.rs) ----

impl Env {
    /// Stop the daemon and start it again on `config`, which every later tagged client then uses too.
    pub fn restart_daemon(&mut self, config: PathBuf) -> Result<()> {
        self.restart_daemon_with_env(config, &[])
    }

    /// [`Env::restart_daemon`] with extra variables in the daemon's environment.
    pub fn restart_daemon_with_env(
        &mut self,
        config: PathBuf,
        vars: &[(&str, &Path)],
    ) -> Result<()> {
        if let Some(mut daemon) = self.daemon.take() {
            terminate(&mut daemon.child, Duration::from_secs(15))?;
        }
        self.config = config;
        self.daemon_error = None;
        self.start_daemon_with_env(vars)
            .inspect_err(|e| self.daemon_error = Some(e.clone()))
    }
}

// ---- for the policy reload test (reload.rs) ----

impl Env {
    /// A copy of the current daemon config that names `policy` as the policy file, written as `name` in the tempdir.
    pub fn config_with_policy(&self, policy: &Path, name: &str) -> Result<PathBuf> {
        self.config_with(policy, None, name)
    }

    /// [`Env::config_with_policy`], also trusting the CA in `extra_root` for upstream connections.
    pub fn config_with(
        &self,
        policy: &Path,
        extra_root: Option<&Path>,
        name: &str,
    ) -> Result<PathBuf> {
        let base =
            std::fs::read_to_string(&self.config).map_err(|e| format!("read config: {e}"))?;
        let mut yaml = String::new();
        let mut saw_policy = false;
        for l in base.lines() {
            if l.starts_with("policy:") {
                yaml.push_str(&format!("policy: {}\n", policy.display()));
                saw_policy = true;
            } else if let (Some(rest), Some(root)) =
                (l.strip_prefix("  extra_roots: ["), extra_root)
            {
                yaml.push_str(&format!("  extra_roots: [{}, {rest}\n", root.display()));
            } else {
                yaml.push_str(l);
                yaml.push('\n');
            }
        }
        if !saw_policy {
            return Err(format!("no policy line in the harness config:\n{base}"));
        }
        let config = self.dir.path().join(name);
        write(&config, &yaml)?;
        Ok(config)
    }

    /// Send SIGHUP to the daemon (reload the policy).
    pub fn hangup_daemon(&self) -> Result<()> {
        let daemon = self.daemon.as_ref().ok_or("no daemon running")?;
        let pid = i32::try_from(daemon.child.id()).map_err(|e| e.to_string())?;
        // SAFETY: plain kill(2) on our own child's pid, which has not been reaped yet (we hold its `Child`).
        if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
            return Err(format!(
                "kill -HUP {pid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// The daemon's pid, while it runs.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|d| d.child.id())
    }

    /// Whether the daemon process is still running.
    pub fn daemon_running(&mut self) -> bool {
        self.daemon
            .as_mut()
            .is_some_and(|d| matches!(d.child.try_wait(), Ok(None)))
    }

    /// The daemon log's length now: pass it to [`Env::wait_for_daemon_log`] to look only at what comes after.
    pub fn daemon_log_len(&self) -> usize {
        std::fs::read(&self.daemon_log).map_or(0, |b| b.len())
    }

    /// Wait (bounded) for a daemon log line after byte `since` that contains `needle`; returns the line.
    pub fn wait_for_daemon_log(
        &self,
        since: usize,
        needle: &str,
        timeout: Duration,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = std::fs::read(&self.daemon_log).unwrap_or_default();
            let after = String::from_utf8_lossy(log.get(since..).unwrap_or_default()).into_owned();
            if let Some(line) = after.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no {needle:?} in the daemon log after {timeout:?}:\n{after}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The files of a test's stand-in servers, under one directory.
pub struct ServerFiles {
    /// The directory, e.g. `<tempdir>/sdk`.
    pub root: PathBuf,
    /// `root/records`, where the servers write what they received.
    pub records: PathBuf,
    /// `root/ca.pem`: the CA that signed the servers' certificate (for the daemon's `extra_roots`).
    pub ca: PathBuf,
    /// `root/leaf.pem` and `root/leaf.key` (mode 0600): the servers' certificate for `names` and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Creates `root` and `root/records`, mints a CA named `ca_name` and one leaf it signs for `names`, and writes them.
pub fn server_files(root: PathBuf, ca_name: &str, names: &[&str]) -> Result<ServerFiles> {
    let records = root.join("records");
    std::fs::create_dir_all(&records).map_err(|e| format!("mkdir {}: {e}", records.display()))?;
    let (ca, leaf, key) = mint(ca_name, names.iter().map(|n| n.to_string()).collect())?;
    let files = ServerFiles {
        ca: root.join("ca.pem"),
        cert: root.join("leaf.pem"),
        key: root.join("leaf.key"),
        records,
        root,
    };
    for (path, text) in [(&files.ca, &ca), (&files.cert, &leaf), (&files.key, &key)] {
        write(path, text)?;
    }
    set_mode(&files.key, 0o600)?;
    Ok(files)
}
