//! Operating the daemon, end to end: `enforcer status` over the control socket (and its `SO_PEERCRED` check), the
//! Prometheus endpoint scraped by the real Prometheus tooling (`promtool check metrics`, and a Prometheus server that
//! scrapes it), the systemd notification protocol spoken to a datagram socket the test owns (`READY=1` only once
//! everything is up, watchdog pings while healthy and none once not, `RELOADING=1`/`READY=1` around a reload,
//! `STOPPING=1`), profiles naming cgroups by glob tagged as they appear, JSON logs, and setup errors that name what
//! is missing.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest;

use crate::harness::{self, Env, API_HOST, PROFILE};

/// Bounded waits (not timing assertions): how long something may take to show up.
const WAIT: Duration = Duration::from_secs(20);

fn enforcer(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(harness::enforcer_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("enforcer {args:?}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn status_json(env: &Env) -> serde_json::Value {
    let config = env.config.display().to_string();
    let (code, out, err) = enforcer(&["status", "--json", "--config", &config]);
    assert_eq!(code, 0, "enforcer status: {out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status JSON {out:?}: {e}"))
}

fn sha256_file(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    hex::encode(sha2::Sha256::digest(&bytes))
}

fn scrape(env: &Env, accept: &str) -> String {
    let url = format!("http://127.0.0.1:{}/metrics", env.metrics_port);
    let out = env.curl_untagged(&["-H", &format!("Accept: {accept}"), &url]);
    assert_eq!(out.status, 200, "scrape: {out:?}");
    out.body
}

/// The value of the sample line `series` (exact name and labels) in a text scrape.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap_or(f64::NAN))
}

/// The daemon's status: programs attached where, the profile's cgroup and its live agents, the policy's hash, the
/// audit trail's position and the decisions since start; refused to a process that is neither root nor in
/// `control.group`.
pub fn status_reports_the_daemon(env: &mut Env) {
    env.need_daemon();
    // One blocked request, so the trail and the counters have moved.
    let path = super::unique("/blocked", "status");
    let url = format!("https://{API_HOST}{path}");
    let out = env.curl_tagged(&["--resolve", &env.resolve(API_HOST, 443, false), &url]);
    assert_eq!(out.status, 403, "{out:?}");
    // A live agent in the profile's cgroup while we look.
    let mut agent = env
        .exec_command()
        .args(["sleep", "3"])
        .spawn()
        .unwrap_or_else(|e| panic!("enforcer exec sleep: {e}"));
    let deadline = Instant::now() + WAIT;
    let status = loop {
        let s = status_json(env);
        let agents = s["profiles"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == PROFILE))
            .map_or(0, |p| p["agents"].as_u64().unwrap_or(0));
        if agents >= 1 || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = agent.wait();

    assert_eq!(status["daemon"]["healthy"], true, "{status}");
    assert_eq!(
        status["daemon"]["pid"].as_u64(),
        env.daemon_pid().map(u64::from),
        "{status}"
    );
    assert_eq!(
        status["capture"]["cgroup"],
        env.cgroup.display().to_string()
    );
    let programs: Vec<&str> = status["capture"]["programs"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p.as_str()).collect())
        .unwrap_or_default();
    // Every cgroup program, and one device-egress program per network device (their names carry the device's
    // index, which differs between machines).
    let (devices, cgroup_programs): (Vec<&str>, Vec<&str>) = programs
        .into_iter()
        .partition(|p| p.starts_with("device_egress_"));
    assert_eq!(
        cgroup_programs,
        [
            "bypass_sockopt",
            "dns_peer",
            "dns_recvmsg4",
            "dns_recvmsg6",
            "inbound",
            "peer_getpeername4",
            "peer_getpeername6",
            "redirect_connect4",
            "redirect_connect6",
            "rekey_established",
            "serve_bind4",
            "serve_bind6",
            "sock_create",
            "sock_release",
            "udp_sendmsg4",
            "udp_sendmsg6"
        ],
        "{status}"
    );
    assert!(!devices.is_empty(), "{status}");
    let profile = status["profiles"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == PROFILE))
        .unwrap_or_else(|| panic!("no profile {PROFILE}: {status}"));
    let own_cgroup = format!("enforcer-e2e-{}/enforcer/{PROFILE}", env.id);
    assert!(
        profile["cgroups"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c == own_cgroup.as_str())),
        "{profile}"
    );
    assert!(profile["agents"].as_u64() >= Some(1), "{profile}");
    let policy = harness::repo_root().join("tests/e2e/policy.yaml");
    assert_eq!(status["policy"]["hash"], sha256_file(&policy), "{status}");
    // The last decision the status was taken after (the watcher records `enforcer exec` cgroups as they come and go,
    // so a cgroup record may have been appended since).
    let records = env.audit_records();
    let last = records
        .iter()
        .rfind(|r| r.get("decision").is_some())
        .and_then(|r| r["seq"].as_u64());
    assert!(
        status["audit"]["last_seq"].as_u64() >= last && last.is_some(),
        "{status}"
    );
    assert!(status["audit"]["bytes"].as_u64() > Some(0));
    assert!(status["decisions"]["block"].as_u64() >= Some(1), "{status}");
    assert!(
        status["audit"]["last_checkpoint"]["seq"].is_u64(),
        "{status}"
    );

    let config = env.config.display().to_string();
    let (code, text, err) = enforcer(&["status", "--config", &config]);
    assert_eq!(code, 0, "{text}{err}");
    assert!(text.contains("health:    ok\n"), "{text}");
    let attached = format!("{} programs attached at", 16 + devices.len());
    assert!(text.contains(&attached), "{text}");

    // SO_PEERCRED: with the directories and the socket (0660 root) opened up, an unprivileged process reaches the
    // socket and is refused by the daemon itself.
    let state = env.dir.path().join("state");
    let socket = state.join("control.sock");
    assert_eq!(mode(&socket), 0o660);
    let modes = [
        (env.dir.path().to_path_buf(), 0o711),
        (state.clone(), 0o711),
        (socket.clone(), 0o666),
    ];
    let saved: Vec<(PathBuf, u32)> = modes.iter().map(|(p, _)| (p.clone(), mode(p))).collect();
    for (p, m) in &modes {
        set_mode(p, *m);
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--",
            // Debian's: /root (pyenv) is closed to other users.
            "/usr/bin/python3",
            "-c",
            // The daemon may refuse (answer and close) before reading the request: a broken pipe on sending is
            // expected then, and the answer is still there to read.
            "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n\
             try:\n    s.sendall(b'{\"request\":\"status\"}\\n')\nexcept BrokenPipeError:\n    pass\n\
             print(s.makefile().readline())",
        ])
        .arg(&socket)
        .output();
    for (p, m) in &saved {
        set_mode(p, *m);
    }
    let out = out.unwrap_or_else(|e| panic!("setpriv: {e}"));
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.contains("\"ok\":false") && answer.contains("permission denied"),
        "an unprivileged peer got: {answer} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).map_or(0o700, |m| m.permissions().mode() & 0o7777)
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}

/// The metrics endpoint: `promtool check metrics` finds nothing to fault in a scrape of the running daemon, a
/// blocked request moves exactly its series, a secret in a query string shows up neither in the scrape nor in the
/// daemon's log, and a real Prometheus server scrapes the endpoint (OpenMetrics) and stores its series.
pub fn metrics_pass_promtool_and_prometheus_scrapes_them(env: &mut Env) {
    env.need_daemon();
    let series = format!(
        "enforcer_requests_total{{verdict=\"block\",reason=\"rule\",profile=\"{PROFILE}\"}}"
    );
    let before = sample(&scrape(env, "text/plain"), &series);
    let secret = "sk-ops-query-secret-4711";
    let path = super::unique("/blocked", "metrics");
    let url = format!("https://{API_HOST}{path}?api_key={secret}");
    let out = env.curl_tagged(&["--resolve", &env.resolve(API_HOST, 443, false), &url]);
    assert_eq!(out.status, 403, "{out:?}");
    let text = scrape(env, "text/plain");
    assert_eq!(sample(&text, &series), before + 1.0, "{text}");
    assert!(text.contains("# TYPE enforcer_audit_write_duration_seconds histogram\n"));
    assert!(!text.contains(secret));
    assert!(!std::fs::read_to_string(&env.daemon_log)
        .unwrap_or_default()
        .contains(secret));

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("promtool (installed by cargo xtask setup): {e}"));
    {
        use std::io::Write;
        let mut stdin = promtool.stdin.take().expect("stdin");
        stdin
            .write_all(text.as_bytes())
            .unwrap_or_else(|e| panic!("promtool stdin: {e}"));
    }
    let out = promtool
        .wait_with_output()
        .unwrap_or_else(|e| panic!("promtool: {e}"));
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let om = scrape(env, "application/openmetrics-text;version=1.0.0");
    assert!(om.ends_with("# EOF\n"), "{om}");

    prometheus_scrapes(env);
}

/// Run the Prometheus server (Debian's `prometheus`) against the endpoint until it reports the target up and a
/// query returns the daemon's series.
fn prometheus_scrapes(env: &Env) {
    let dir = env.dir.path().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let web = free_port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{ scrape_interval: 1s, scrape_timeout: 1s }}\n\
             scrape_configs:\n  - job_name: enforcer\n    static_configs:\n      - targets: [\"127.0.0.1:{}\"]\n",
            env.metrics_port
        ),
    )
    .unwrap_or_else(|e| panic!("write prometheus.yml: {e}"));
    let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
    let mut server = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("prometheus (installed by cargo xtask setup): {e}"));
    let query = format!("http://127.0.0.1:{web}/api/v1/query?query=enforcer_build_info");
    let targets = format!("http://127.0.0.1:{web}/api/v1/targets");
    let deadline = Instant::now() + Duration::from_secs(60);
    let result = loop {
        let t = env.curl_untagged(&[&targets]);
        let q = env.curl_untagged(&[&query]);
        let up = t.body.contains("\"health\":\"up\"");
        let found = q.body.contains("\"__name__\":\"enforcer_build_info\"");
        if up && found {
            break Ok(t.body);
        }
        if Instant::now() > deadline {
            break Err(format!("targets: {}\nquery: {}", t.body, q.body));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = server.kill();
    let _ = server.wait();
    let targets = result.unwrap_or_else(|e| {
        panic!(
            "Prometheus did not scrape the daemon: {e}\n{}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        )
    });
    assert!(targets.contains("\"lastError\":\"\""), "{targets}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("free port: {e}"))
}

/// Reads what the daemon tells "systemd".
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(path: PathBuf) -> NotifySocket {
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).unwrap_or_else(|e| panic!("bind notify socket: {e}"));
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        NotifySocket { sock, path }
    }

    /// Messages until one contains `needle` (returned with everything before it), or panic after `WAIT`.
    fn until(&self, needle: &str) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if let Ok(n) = self.sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = msg.contains(needle);
                seen.push(msg);
                if done {
                    return seen;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} from the daemon; got {seen:?}"
            );
        }
    }

    /// Everything that arrives within `d`.
    fn drain(&self, d: Duration) -> Vec<String> {
        let deadline = Instant::now() + d;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.sock.recv(&mut buf) {
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        seen
    }
}

/// The daemon as a `Type=notify` service with `WatchdogSec=`: `READY=1` once the programs are attached, the proxy
/// listens and the audit trail is open; `WATCHDOG=1` at half the interval while healthy; `RELOADING=1` then
/// `READY=1` around `enforcer reload`; no more pings once the audit directory is gone; `STOPPING=1` on SIGTERM.
pub fn notify_ready_watchdog_reload_stopping(env: &mut Env) {
    env.need_daemon();
    let original = env.config.clone();
    let notify = NotifySocket::bind(env.dir.path().join("notify.sock"));
    env.daemon_env = vec![
        ("NOTIFY_SOCKET".into(), notify.path.display().to_string()),
        // 400 ms: pings every 200 ms.
        ("WATCHDOG_USEC".into(), "400000".into()),
    ];
    let restarted = env.restart_daemon(original.clone());
    env.daemon_env.clear();
    restarted.unwrap_or_else(|e| panic!("restart with NOTIFY_SOCKET: {e}"));

    let startup = notify.until("READY=1");
    // At READY: the programs are attached, the proxy accepts, the trail is open, the control socket answers.
    assert!(env.pin_dir.join("link_redirect_connect4").exists());
    assert!(std::net::TcpStream::connect(("127.0.0.1", env.port)).is_ok());
    assert!(env.audit_dir.join("audit.lock").exists());
    assert!(env.dir.path().join("state/control.sock").exists());
    assert_eq!(
        startup.first().map(String::as_str),
        Some("STATUS=starting"),
        "{startup:?}"
    );
    let ready = startup.last().cloned().unwrap_or_default();
    assert!(
        ready.starts_with("READY=1\nSTATUS=enforcing policy "),
        "{ready}"
    );

    let pings = notify.drain(Duration::from_millis(1500));
    let count = pings.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(
        count >= 3,
        "watchdog pings in 1.5 s at a 200 ms interval: {pings:?}"
    );

    let config = original.display().to_string();
    let (code, out, err) = enforcer(&["reload", "--config", &config]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("unchanged"), "{out}");
    let reload = notify.until("READY=1");
    let reloading = reload
        .iter()
        .position(|m| m.starts_with("RELOADING=1\nMONOTONIC_USEC="));
    assert!(
        reloading.is_some_and(|i| i + 1 < reload.len()),
        "RELOADING=1 then READY=1: {reload:?}"
    );

    // Unhealthy: the audit directory's lock file is gone (as when the directory is removed under the daemon).
    std::fs::remove_file(env.audit_dir.join("audit.lock")).unwrap_or_else(|e| panic!("rm: {e}"));
    let sick = notify.until("STATUS=unhealthy");
    assert!(
        sick.last().is_some_and(|m| m.contains("audit directory")),
        "{sick:?}"
    );
    let after = notify.drain(Duration::from_millis(1000));
    assert!(
        !after.iter().any(|m| m == "WATCHDOG=1"),
        "pinged while unhealthy: {after:?}"
    );
    let (code, text, _) = enforcer(&["status", "--config", &config]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("UNHEALTHY: the audit directory"), "{text}");

    assert_eq!(env.stop_daemon(), Ok(Some(0)));
    let stop = notify.until("STOPPING=1");
    assert!(!stop.is_empty());
    env.restart_daemon(original)
        .unwrap_or_else(|e| panic!("restart: {e}"));
}

/// A profile naming cgroups by glob: a matching cgroup created while the daemon runs is tagged (logged, counted,
/// listed by `enforcer status`), and a client started in it is enforced under that profile; a cgroup that does not
/// match stays untagged.
pub fn glob_profiles_tag_cgroups_as_they_appear(env: &mut Env) {
    env.need_daemon();
    let original = env.config.clone();
    let base = std::fs::read_to_string(&original).unwrap_or_else(|e| panic!("read config: {e}"));
    let cgroup_name = env
        .cgroup
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    let cgroup_name = cgroup_name.unwrap_or_default();
    let config = env.dir.path().join("enforcer-glob.yaml");
    std::fs::write(
        &config,
        format!("{base}  globbed: {{ cgroups: [\"{cgroup_name}/agents-*.scope\"] }}\n"),
    )
    .unwrap_or_else(|e| panic!("write config: {e}"));
    env.restart_daemon(config.clone())
        .unwrap_or_else(|e| panic!("restart on the glob config: {e}"));
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| glob_tagging(env, &config)));
    for dir in ["agents-7.scope", "other-7.scope"] {
        harness::remove_cgroup_tree(&env.cgroup.join(dir));
    }
    env.restart_daemon(original)
        .unwrap_or_else(|e| panic!("restart: {e}"));
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn glob_tagging(env: &Env, config: &Path) {
    let since = env.daemon_log_len();
    let scope = env.cgroup.join("agents-7.scope");
    let other = env.cgroup.join("other-7.scope");
    std::fs::create_dir(&scope).unwrap_or_else(|e| panic!("mkdir {}: {e}", scope.display()));
    std::fs::create_dir(&other).unwrap_or_else(|e| panic!("mkdir {}: {e}", other.display()));
    env.wait_for_daemon_log(since, "tagged a new cgroup", WAIT)
        .unwrap_or_else(|e| panic!("{e}"));

    // The enforcer CA bundle (system roots + the enforcer CA), as `enforcer exec` would hand it over.
    let bundle = env.dir.path().join("state/public/bundle.pem");
    let in_cgroup = |cgroup: &Path, cacert: &Path, path: &str| {
        let url = format!("https://{API_HOST}{path}");
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec curl -sS --max-time 20 -o /dev/null -w '%{{http_code}}' \
             --cacert {} --resolve {} {url}",
            cgroup.display(),
            cacert.display(),
            env.resolve(API_HOST, 443, false)
        );
        let out = Command::new("sh")
            .args(["-c", &script])
            .output()
            .unwrap_or_else(|e| panic!("sh: {e}"));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let path = super::unique("/blocked", "glob");
    assert_eq!(in_cgroup(&scope, &bundle, &path), "403");
    assert_eq!(env.upstream_count(&path), 0);
    let recs = super::records_for(env, &path);
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["agent"]["profile"], "globbed", "{}", recs[0]);
    assert_eq!(recs[0]["decision"]["verdict"], "block");

    // Not matching: not tagged, so not intercepted (it trusts only the test CA and reaches the upstream itself).
    let path = super::unique("/allowed", "glob-other");
    assert_eq!(in_cgroup(&other, &env.test_ca, &path), "200");
    assert_eq!(env.upstream_count(&path), 1);
    assert!(super::records_for(env, &path).is_empty());

    let cfg = config.display().to_string();
    let (code, out, err) = enforcer(&["status", "--json", "--config", &cfg]);
    assert_eq!(code, 0, "{out}{err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    let globbed = status["profiles"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "globbed"))
        .cloned()
        .unwrap_or_default();
    let want = format!(
        "{}/agents-7.scope",
        env.cgroup.file_name().unwrap_or_default().to_string_lossy()
    );
    assert!(
        globbed["cgroups"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c == want.as_str())),
        "{globbed}"
    );
    let text = scrape(env, "text/plain");
    assert_eq!(
        sample(&text, "enforcer_cgroups_tagged_total{profile=\"globbed\"}"),
        1.0,
        "{text}"
    );
    tagging_is_recorded(env, &scope);
}

/// Each tagging is an audit record: the glob-matched cgroup tagged, and untagged once it is removed; an `enforcer
/// exec` cgroup from its creation to its removal; the profiles' own cgroups tagged at start.
fn tagging_is_recorded(env: &Env, scope: &Path) {
    let count = |action: &str, source: &str, profile: &str, suffix: &str| {
        env.audit_records()
            .iter()
            .filter(|r| {
                let c = &r["cgroup"];
                c["action"] == action
                    && c["source"] == source
                    && c["profile"] == profile
                    && c["path"].as_str().is_some_and(|p| p.ends_with(suffix))
            })
            .count()
    };
    let wait_for = |action: &str, source: &str, profile: &str, suffix: &str| {
        let deadline = std::time::Instant::now() + WAIT;
        while count(action, source, profile, suffix) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no {action} record ({source}, {profile}) for a cgroup ending in {suffix}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(count("tag", "glob", "globbed", "/agents-7.scope"), 1);
    assert_eq!(count("tag", "glob", "globbed", "/other-7.scope"), 0);
    assert_eq!(count("untag", "glob", "globbed", "/agents-7.scope"), 0);
    assert_eq!(count("tag", "config", "globbed", "/enforcer/globbed"), 1);
    harness::remove_cgroup_tree(scope);
    wait_for("untag", "glob", "globbed", "/agents-7.scope");

    let (code, out, err) = env.exec_tagged(&["sh", "-c", "cat /proc/self/cgroup"]);
    assert_eq!(code, 0, "{out}{err}");
    let exec_cgroup = out
        .trim()
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(exec_cgroup.starts_with("exec-"), "{out}");
    let suffix = format!("/{exec_cgroup}");
    wait_for("tag", "exec", PROFILE, &suffix);
    wait_for("untag", "exec", PROFILE, &suffix);
}

/// What `enforcer run` says when the host or the configuration is not ready: each error names the setting and
/// what is missing. A missing `capture.cgroup` is created, and the daemon starts (with JSON logs).
pub fn setup_errors_name_what_is_missing(env: &mut Env) {
    let dir = env.dir.path().join("setup");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir: {e}"));
    let not_cgroup = dir.join("not-a-cgroup");
    std::fs::create_dir_all(&not_cgroup).expect("mkdir");
    let policy = harness::repo_root().join("tests/e2e/policy.yaml");
    let sibling = PathBuf::from(format!(
        "/sys/fs/cgroup/unified/enforcer-e2e-setup-{}",
        env.id
    ));
    let pin = env.pin_dir.join("setup");
    // The configuration of one run: these defaults, with the top-level keys `extra` names replaced.
    let config = |name: &str, extra: &str| {
        let path = dir.join(format!("{name}.yaml"));
        let defaults = [
            ("policy", policy.display().to_string()),
            (
                "state_dir",
                dir.join(format!("state-{name}")).display().to_string(),
            ),
            ("cgroup_root", "/sys/fs/cgroup/unified".to_string()),
            ("proxy", format!("{{ port: {} }}", free_port())),
            ("dns", format!("{{ port: {} }}", free_port())),
        ];
        let mut yaml = String::new();
        for (key, value) in defaults {
            if !extra.lines().any(|l| l.starts_with(&format!("{key}:"))) {
                yaml.push_str(&format!("{key}: {value}\n"));
            }
        }
        yaml.push_str(extra);
        std::fs::write(&path, yaml).expect("write config");
        path.display().to_string()
    };
    let fails = |name: &str, extra: &str, want: &str| {
        let cfg = config(name, extra);
        let (code, out, err) = enforcer(&["run", "--config", &cfg]);
        assert_eq!(code, 2, "{name}: {out}{err}");
        assert!(err.contains(want), "{name}: expected {want:?} in:\n{err}");
    };
    fails(
        "cgroup-root",
        &format!("cgroup_root: {}\n", not_cgroup.display()),
        &format!(
            "cgroup_root {}: an ordinary directory, not a cgroup v2 mount",
            not_cgroup.display()
        ),
    );
    fails(
        "pin-dir",
        &format!("capture: {{ pin_dir: {} }}\n", dir.join("pins").display()),
        &format!("{} is not a bpf filesystem", dir.display()),
    );
    fails(
        "policy",
        "policy: /nonexistent/enforcer-policy.yaml\n",
        "loading the policy: /nonexistent/enforcer-policy.yaml: No such file or directory",
    );
    fails(
        "port",
        &format!("proxy: {{ port: {} }}\n", env.port),
        &format!("proxy.port: cannot listen on 127.0.0.1:{}: ", env.port),
    );
    fails(
        "metrics",
        "metrics: { listen: \"0.0.0.0:9464\" }\n",
        "metrics.listen 0.0.0.0:9464 is not a loopback address",
    );

    // A capture cgroup that does not exist yet is created (it was an error naming `<cgroup>/enforcer` before).
    let missing = sibling.join("agents");
    let cfg = config(
        "missing-cgroup",
        &format!(
            "capture: {{ cgroup: {}/agents, pin_dir: {} }}\nprofiles: {{ ci: {{}} }}\n",
            sibling.file_name().unwrap_or_default().to_string_lossy(),
            pin.display()
        ),
    );
    let started = start_and_stop(&cfg);
    harness::remove_cgroup_tree(&sibling);
    let _ = std::fs::remove_dir_all(&pin);
    let (ready, stderr) = started.unwrap_or_else(|e| panic!("{e}"));
    assert!(
        ready,
        "the daemon did not start with a missing capture.cgroup:\n{stderr}"
    );
    // --log-format json: every line one JSON object with a level and a message.
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l:?}: {e}")))
        .collect();
    assert!(lines
        .iter()
        .all(|l| l["level"].is_string() && l["timestamp"].is_string()));
    let created = lines
        .iter()
        .find(|l| l["message"] == "created the capture cgroup (capture.cgroup)")
        .unwrap_or_else(|| panic!("no creation logged:\n{stderr}"));
    assert_eq!(
        created["cgroup"],
        missing.display().to_string(),
        "{created}"
    );
}

/// Start `enforcer run --log-format json` on `config`, wait for READY, stop it with SIGTERM; (ready, stderr).
fn start_and_stop(config: &str) -> Result<(bool, String), String> {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(harness::enforcer_bin())
        .args(["run", "--log-format", "json", "--config", config])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("enforcer run: {e}"))?;
    let stdout = child.stdout.take().ok_or("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let ready = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.starts_with("READY"));
        let _ = tx.send(ready);
    });
    let ready = rx.recv_timeout(Duration::from_secs(90)).unwrap_or(false);
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    Ok((ready, String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// What one daemon run under a capability bounding set did.
struct CapsRun {
    ready: bool,
    stderr: String,
    /// The audit record of a request made by an agent running as `nobody` in a tagged cgroup.
    record: Option<serde_json::Value>,
}

/// The capabilities the packaged unit grants (`CapabilityBoundingSet=`), as setpriv names them (`bpf`, …).
fn unit_capabilities() -> Vec<String> {
    let unit = harness::repo_root().join("packaging/systemd/enforcer.service");
    let text = std::fs::read_to_string(&unit).unwrap_or_else(|e| panic!("{}: {e}", unit.display()));
    text.lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .map(|caps| {
            caps.split_whitespace()
                .map(|c| c.trim_start_matches("CAP_").to_lowercase())
                .collect()
        })
        .unwrap_or_else(|| panic!("no CapabilityBoundingSet= in {}", unit.display()))
}

/// The packaged unit's capability set is exactly what the daemon needs: under it the daemon starts, captures an agent
/// running as another user, records its executable, and hands the control socket to `control.group`; without any
/// one of them it cannot start, or (CAP_SYS_PTRACE) records the agent's command name only.
pub fn the_units_capabilities_suffice_and_each_is_needed(env: &mut Env) {
    env.need_daemon();
    let caps = unit_capabilities();
    assert_eq!(caps, ["bpf", "net_admin", "perfmon", "sys_ptrace", "chown"]);
    let full = run_with_caps(env, &caps);
    assert!(
        full.ready,
        "not ready under the unit's capabilities:\n{}",
        full.stderr
    );
    let rec = full
        .record
        .unwrap_or_else(|| panic!("no record:\n{}", full.stderr));
    assert_eq!(rec["decision"]["verdict"], "block", "{rec}");
    assert_eq!(rec["agent"]["uid"], 65534, "{rec}");
    assert_eq!(rec["agent"]["exe"], "/usr/bin/curl", "{rec}");
    for dropped in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != dropped).cloned().collect();
        let run = run_with_caps(env, &fewer);
        if dropped == "sys_ptrace" {
            assert!(run.ready, "{}", run.stderr);
            let rec = run
                .record
                .unwrap_or_else(|| panic!("no record:\n{}", run.stderr));
            assert_eq!(rec["agent"]["exe"], "curl", "without CAP_SYS_PTRACE: {rec}");
        } else {
            assert!(
                !run.ready,
                "ready without CAP_{}:\n{}",
                dropped.to_uppercase(),
                run.stderr
            );
        }
    }
}

fn run_with_caps(env: &Env, caps: &[String]) -> CapsRun {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::Builder::new()
        .prefix("caps-")
        .tempdir_in(env.dir.path())
        .expect("tempdir");
    let cgroup = PathBuf::from(format!(
        "/sys/fs/cgroup/unified/enforcer-e2e-caps-{}",
        env.id
    ));
    let agent = cgroup.join("agent");
    std::fs::create_dir_all(&agent).unwrap_or_else(|e| panic!("mkdir {}: {e}", agent.display()));
    let pin = env.pin_dir.join("caps");
    let config = dir.path().join("enforcer.yaml");
    let name = cgroup
        .file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned();
    std::fs::write(
        &config,
        format!(
            "policy: {policy}\nstate_dir: {state}\ncgroup_root: /sys/fs/cgroup/unified\n\
             capture: {{ cgroup: {name}, pin_dir: {pin} }}\n\
             proxy: {{ port: {port} }}\ndns: {{ port: {dns}, upstream: \"{v4}:53\" }}\n\
             control: {{ group: nogroup }}\nprofiles: {{ caps: {{ cgroups: [{name}/agent] }} }}\n",
            policy = harness::repo_root().join("tests/e2e/policy.yaml").display(),
            state = dir.path().join("state").display(),
            pin = pin.display(),
            port = free_port(),
            dns = free_port(),
            v4 = env.v4,
        ),
    )
    .expect("write config");
    let bounding = format!(
        "--bounding-set=-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut child = Command::new("setpriv")
        .arg(&bounding)
        .arg("--")
        .arg(harness::enforcer_bin())
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("setpriv enforcer run: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
        let _ = tx.send(lines.any(|l| l.starts_with("READY")));
        lines.for_each(drop);
    });
    let ready = rx.recv_timeout(Duration::from_secs(90)).unwrap_or(false);
    let mut record = None;
    if ready {
        let url = format!("http://{}/blocked/caps", env.v4);
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec setpriv --reuid=65534 --regid=65534 --clear-groups \
             curl -s -o /dev/null --max-time 10 {url}",
            agent.display()
        );
        let _ = Command::new("sh").args(["-c", &script]).status();
        let audit = dir.path().join("state/audit").display().to_string();
        let (_, out, _) = enforcer(&["audit", "tail", &audit, "--json", "-n", "1"]);
        record = out
            .lines()
            .next()
            .and_then(|l| serde_json::from_str(l).ok());
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let out = child.wait_with_output().expect("wait");
    harness::remove_cgroup_tree(&cgroup);
    let _ = std::fs::remove_dir_all(&pin);
    CapsRun {
        ready,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        record,
    }
}
