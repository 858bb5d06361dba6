//! What an agent started by `enforcer exec` is, and what it can reach: it runs as an unprivileged user without
//! capabilities (`--user`, or the sudo caller), it cannot leave its cgroup, open raw sockets, read the keys, remove
//! the pinned programs or signal the daemon; it reads the published CA bundle, and every runtime installed here
//! trusts the enforcer CA through the variables `exec` sets, even when the tool's own configuration names another
//! CA file. A client that refuses the enforcer's certificate leaves a `client_tls` record. Upstream certificates are
//! verified against the host's trust store.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::{self, Env, AGENT_USER, API_HOST, PROFILE};

/// The system trust store, which does not contain the enforcer CA (nor the e2e test CA).
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

fn unique(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// `enforcer exec` without `--user` (for the sudo and root cases), as the harness runs agents otherwise.
fn exec_without_user(env: &Env) -> Command {
    let mut cmd = Command::new(harness::enforcer_bin());
    cmd.arg("exec")
        .arg("--config")
        .arg(&env.config)
        .args(["--profile", PROFILE]);
    env.agent_command(cmd)
}

/// The agent's ids, its capability sets and no_new_privs, as the kernel reports them.
pub fn runs_unprivileged_without_capabilities(env: &mut Env) {
    env.need_daemon();
    let (code, out, err) = env.exec_tagged(&[
        "sh",
        "-c",
        "id -u; id -g; echo HOME=$HOME USER=$USER; \
         grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs):' /proc/self/status",
    ]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], env.agent_uid.to_string(), "uid: {out}");
    assert_ne!(lines[0], "0");
    assert_eq!(lines[1], env.agent_gid.to_string(), "gid: {out}");
    assert_eq!(
        lines[2],
        format!("HOME=/nonexistent USER={AGENT_USER}"),
        "{out}"
    );
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let line = lines
            .iter()
            .find(|l| l.starts_with(set))
            .unwrap_or_else(|| panic!("no {set} in {out}"));
        assert_eq!(
            line.split_whitespace().nth(1),
            Some("0000000000000000"),
            "{set} not empty: {out}"
        );
    }
    assert!(lines.contains(&"NoNewPrivs:\t1"), "no_new_privs: {out}");
    // A setuid program gains nothing: su cannot become root.
    let (code, out, err) = env.exec_tagged(&["sh", "-c", "su -c id root </dev/null; id -u"]);
    assert_eq!(
        out.lines().last(),
        Some(env.agent_uid.to_string().as_str()),
        "code {code} {out} {err}"
    );
}

/// The start of the agents' Python probes: `attempt(name, fn)` records `ok` or the errno name in `out`.
macro_rules! python_attempts {
    () => {
        r#"
import ctypes, errno, json, os, sys
out = {}
def attempt(name, fn):
    try:
        fn()
        out[name] = "ok"
    except OSError as e:
        out[name] = errno.errorcode.get(e.errno, str(e.errno))
"#
    };
}

/// Each attempt prints its outcome: `ok` or the errno name. argv[1] is JSON: the daemon's pid, `cgroup.procs` files
/// to write the agent's pid to, keys to read, pinned files to remove, the tag map's pin for bpf(BPF_OBJ_GET).
const ESCAPE: &str = concat!(
    python_attempts!(),
    r#"
import signal, socket, struct
args = json.loads(sys.argv[1])
def write(path):
    with open(path, "w") as f:
        f.write(str(os.getpid()))
def read(path):
    with open(path, "rb") as f:
        f.read()
for i, procs in enumerate(args["procs"]):
    attempt("cgroup %s" % procs, lambda p=procs: write(p))
out["cgroup_after"] = open("/proc/self/cgroup").read().strip()
attempt("raw inet", lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close())
attempt("raw inet6", lambda: socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6).close())
attempt("packet", lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0).close())
for key in args["keys"]:
    attempt("read %s" % key, lambda k=key: read(k))
attempt("signal 0 daemon", lambda: os.kill(args["daemon"], 0))
attempt("SIGTERM daemon", lambda: os.kill(args["daemon"], signal.SIGTERM))
attempt("SIGTERM exec", lambda: os.kill(os.getppid(), signal.SIGTERM))
for pin in args["pins"]:
    attempt("unlink %s" % pin, lambda p=pin: os.unlink(p))
libc = ctypes.CDLL(None, use_errno=True)
path = ctypes.create_string_buffer(args["map"].encode())
attr = ctypes.create_string_buffer(struct.pack("QIIi", ctypes.addressof(path), 0, 0, 0))
def bpf_obj_get():
    # bpf(2) is syscall 321 on x86_64; BPF_OBJ_GET = 7.
    if libc.syscall(ctypes.c_long(321), ctypes.c_int(7), attr, ctypes.c_uint(len(attr.raw))) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
attempt("bpf obj_get tag map", bpf_obj_get)
print(json.dumps(out))
"#
);

/// `enforcer exec` runs the command in a cgroup of its own below the profile's (`exec-<exec's pid>`), where its
/// connections are the command's (the record names that cgroup and a pid other than exec's); passes its exit code on
/// (a signal as 128 + the signal); forwards SIGTERM to it; and removes the cgroup once the command has ended.
pub fn exec_runs_the_command_in_its_own_cgroup_and_passes_its_exit_on(env: &mut Env) {
    use std::process::Stdio;
    env.need_daemon();
    let path = format!("/allowed/{}", unique("exec-cgroup"));
    let url = format!("https://{API_HOST}{path}");
    let resolve = env.resolve(API_HOST, 443, false);
    let mut exec = env.exec_command();
    exec.args(["curl", "-fsS", "-o", "/dev/null", "--max-time", "20"])
        .args(["--resolve", &resolve, &url])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = exec.spawn().expect("enforcer exec");
    let exec_pid = child.id();
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = crate::records_for(env, &path);
    assert_eq!(recs.len(), 1, "{recs:?}");
    let rec = &recs[0];
    let cgroup = format!("/enforcer/{PROFILE}/exec-{exec_pid}");
    assert!(
        rec["agent"]["cgroup"]
            .as_str()
            .is_some_and(|c| c.ends_with(&cgroup)),
        "{rec}"
    );
    let pid = rec["agent"]["pid"].as_u64().expect("pid");
    assert_ne!(pid, u64::from(exec_pid), "exec itself connected: {rec}");
    let exec_cgroup = env.profile_cgroup(PROFILE).join(format!("exec-{exec_pid}"));
    assert!(!exec_cgroup.exists(), "exec cgroup left after the command");

    assert_eq!(env.exec_tagged(&["sh", "-c", "exit 7"]).0, 7);
    // A command the agent's user has no program for is exec's error, not an exit code of the command's.
    let (code, _, err) = env.exec_tagged(&["enforcer-e2e-no-such-command"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(
            "starting enforcer-e2e-no-such-command: no directory of PATH that the agent's user can search holds a \
             program it may run by that name"
        ),
        "{err}"
    );
    assert_eq!(env.exec_tagged(&["sh", "-c", "kill -TERM $$"]).0, 128 + 15);

    // SIGTERM to exec reaches the command (which reports it by its exit code), and exec still removes its cgroup.
    let (mut term, exec_cgroup) = spawn_until_ready(
        env,
        "trap 'exit 42' TERM; touch \"$0\"; while :; do sleep 0.05; done",
    );
    assert!(exec_cgroup.is_dir(), "the command runs in its exec cgroup");
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe {
        libc::kill(i32::try_from(term.id()).expect("pid"), libc::SIGTERM);
    }
    assert_eq!(term.wait().expect("wait").code(), Some(42));
    assert!(!exec_cgroup.exists(), "exec cgroup left after SIGTERM");
}

/// `enforcer exec -- sh -c SCRIPT READY`, returned once the script has created the file `$0` (so the agent runs),
/// with the run's cgroup.
fn spawn_until_ready(env: &Env, script: &str) -> (std::process::Child, PathBuf) {
    spawn_until_ready_with(env, script, |_| {})
}

/// [`spawn_until_ready`], with `configure` applied to the `enforcer exec` command before it is spawned.
fn spawn_until_ready_with(
    env: &Env,
    script: &str,
    configure: impl FnOnce(&mut Command),
) -> (std::process::Child, PathBuf) {
    spawn_until_ready_in(env, env.exec_command(), script, configure)
}

/// [`spawn_until_ready_with`], with `exec` the `enforcer exec … --` command to start the script with.
fn spawn_until_ready_in(
    env: &Env,
    mut exec: Command,
    script: &str,
    configure: impl FnOnce(&mut Command),
) -> (std::process::Child, PathBuf) {
    let ready = std::env::temp_dir().join(unique("exec-ready"));
    exec.args(["sh", "-c", script]).arg(&ready);
    configure(&mut exec);
    let child = exec.spawn().expect("enforcer exec");
    let exec_cgroup = env
        .profile_cgroup(PROFILE)
        .join(format!("exec-{}", child.id()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !ready.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the command never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&ready);
    (child, exec_cgroup)
}

/// Send `exec` SIGTERM and wait for it ([`wait_exec`]), timed from just before the signal.
fn stop_exec(exec: std::process::Child) -> (Option<i32>, String, std::time::Duration) {
    let start = std::time::Instant::now();
    // SAFETY: kill(2) on our own child, not yet reaped.
    assert_eq!(
        unsafe { libc::kill(i32::try_from(exec.id()).expect("pid"), libc::SIGTERM) },
        0
    );
    wait_exec(exec, start)
}

/// Wait for `exec`, at most 30 s after `start` (a run that never ends fails the test rather than hanging it): its exit
/// code, what it wrote to stderr, and how long it took from `start`.
fn wait_exec(
    mut exec: std::process::Child,
    start: std::time::Instant,
) -> (Option<i32>, String, std::time::Duration) {
    use std::io::Read;
    let status = loop {
        if let Some(status) = exec.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > std::time::Duration::from_secs(30) {
            let _ = exec.kill();
            let _ = exec.wait();
            panic!("enforcer exec did not end within 30 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let waited = start.elapsed();
    let mut stderr = String::new();
    if let Some(mut err) = exec.stderr.take() {
        err.read_to_string(&mut stderr).expect("stderr");
    }
    (status.code(), stderr, waited)
}

/// The message `exec` prints when it killed a run after its stop timeout of `secs` seconds.
fn killed_message(secs: u32) -> String {
    format!(
        "enforcer exec: the run did not end within {secs} s of SIGTERM (--stop-timeout): every process of it was \
         killed"
    )
}

/// A stand-in agent that ignores SIGTERM (`trap '' TERM`), with a child that ignores it too (an ignored signal stays
/// ignored across fork and exec); it signals it is ready once the child runs (`$0`, as `spawn_until_ready_in` reads).
const IGNORES_SIGTERM: &str =
    "trap '' TERM; sh -c 'touch \"$0\"; while :; do sleep 0.05; done' \"$0.child\" & \
     while [ ! -e \"$0.child\" ]; do sleep 0.05; done; rm -f \"$0.child\"; touch \"$0\"; \
     while :; do sleep 0.05; done";

/// An agent that ignores SIGTERM, with a child that ignores it too ([`IGNORES_SIGTERM`]), is not left running when
/// `exec` is asked to stop: `--stop-timeout 1` after passing the
/// SIGTERM on, `exec` kills every process of the run, says so, and exits 137 (128 + SIGKILL); no process of the run
/// is left (a pidfd of each names no process any more) and its cgroup is removed. Before, the run went on for ever.
pub fn ignoring_sigterm_is_killed_whole_after_the_stop_timeout(env: &mut Env) {
    use std::process::Stdio;
    env.need_daemon();
    let (exec, exec_cgroup) = spawn_until_ready_in(
        env,
        env.exec_command_with(&["--stop-timeout", "1"]),
        IGNORES_SIGTERM,
        |exec| {
            exec.stdout(Stdio::null()).stderr(Stdio::piped());
        },
    );
    let pidfds = run_pidfds(&[&exec_cgroup]);
    let (code, stderr, waited) = stop_exec(exec);
    assert_eq!(code, Some(137), "{stderr}");
    assert_eq!(stderr.trim_end(), killed_message(1), "{stderr}");
    // Not killed before its stop timeout; the upper bound is loose (a shared machine).
    assert!(
        waited >= std::time::Duration::from_secs(1) && waited < std::time::Duration::from_secs(20),
        "{waited:?}"
    );
    assert_gone(&pidfds);
    assert!(!exec_cgroup.exists(), "the run's cgroup is left: {stderr}");
}

/// Every process in the cgroups `cgroups` (the run's, and any its processes moved to), as pidfds (a `sleep` that ended
/// meanwhile is skipped); the run must be the stand-in agent of the kill tests: two shells, the agent and its child.
fn run_pidfds(cgroups: &[&Path]) -> Vec<(i32, std::os::fd::OwnedFd)> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let procs: String = cgroups
        .iter()
        .map(|c| std::fs::read_to_string(c.join("cgroup.procs")).expect("cgroup.procs"))
        .collect();
    let mut shells = 0;
    let pidfds = procs
        .lines()
        .filter_map(|line| {
            let pid: i32 = line.parse().ok()?;
            // SAFETY: pidfd_open(2) returns a new descriptor or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            let fd = i32::try_from(fd).ok().filter(|fd| *fd >= 0)?;
            if is_shell(pid) {
                shells += 1;
            }
            // SAFETY: just opened, owned only here.
            Some((pid, unsafe { OwnedFd::from_raw_fd(fd) }))
        })
        .collect();
    assert_eq!(shells, 2, "the agent and its child: {procs}");
    pidfds
}

/// Whether process `pid` runs `sh` (its `/proc/<pid>/comm`): one of the kill tests' stand-in shells.
fn is_shell(pid: impl std::fmt::Display) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sh")
}

/// No process of `pidfds` is left: a pidfd of each names no process any more.
fn assert_gone(pidfds: &[(i32, std::os::fd::OwnedFd)]) {
    for (pid, fd) in pidfds {
        // SAFETY: pidfd_send_signal(2) with signal 0 only checks the process exists.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                std::os::fd::AsRawFd::as_raw_fd(fd),
                0,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        let errno = std::io::Error::last_os_error().raw_os_error();
        assert_eq!(
            (rc, errno),
            (-1, Some(libc::ESRCH)),
            "process {pid} of the run is left"
        );
    }
}

/// The way docs/agents.md gives to end a run at once, whatever its stop timeout: `echo 1 > …/exec-<pid>/cgroup.kill`
/// kills the agent and its child ([`IGNORES_SIGTERM`]; the run's stop timeout is the default 10 s); the run's init
/// then ends, and `exec` exits 137 (128 + SIGKILL) at once, without the stop timeout's message, no process of the run
/// left and its cgroup removed. `exec` itself is not in that cgroup, so it lives to clean up.
pub fn killing_its_cgroup_ends_a_run_at_once(env: &mut Env) {
    use std::process::Stdio;
    env.need_daemon();
    let (exec, exec_cgroup) =
        spawn_until_ready_in(env, env.exec_command(), IGNORES_SIGTERM, |exec| {
            exec.stdout(Stdio::null()).stderr(Stdio::piped());
        });
    let pidfds = run_pidfds(&[&exec_cgroup]);
    let start = std::time::Instant::now();
    std::fs::write(exec_cgroup.join("cgroup.kill"), "1").expect("cgroup.kill");
    let (code, stderr, waited) = wait_exec(exec, start);
    assert_eq!((code, stderr.as_str()), (Some(137), ""));
    // At once, not after the 10 s stop timeout; the bound is loose (a shared machine).
    assert!(waited < std::time::Duration::from_secs(8), "{waited:?}");
    assert_gone(&pidfds);
    assert!(!exec_cgroup.exists(), "the run's cgroup is left");
}

/// A root agent (`--allow-root`) can leave its run's cgroup, but not its run: docs/agents.md says that when `exec`
/// kills a run after its stop timeout, the kernel kills every process of the run's PID namespace, those that moved to
/// another cgroup included. Here the agent's child ([`IGNORES_SIGTERM`], run as root) writes itself into a cgroup of
/// the test's outside the profile's tree before it signals ready. `exec` is sent SIGTERM with `--stop-timeout 1`: it
/// exits 137 with the stop timeout's message, no process of the run is left, the cgroup the child moved to is empty,
/// and the run's cgroup is removed.
pub fn root_agent_that_left_its_cgroup_is_killed_with_its_run(env: &mut Env) {
    use std::process::Stdio;
    env.need_daemon();
    let outside = env.cgroup.join(unique("left-run"));
    std::fs::create_dir(&outside).expect("a cgroup outside the run");
    // The child moves itself (`0` names the writer) before it creates `$0.child`.
    let script = IGNORES_SIGTERM.replacen(
        "sh -c 'touch",
        &format!("sh -c 'echo 0 > {}/cgroup.procs; touch", outside.display()),
        1,
    );
    assert_ne!(script, IGNORES_SIGTERM);
    let mut exec = exec_without_user(env);
    exec.env_remove("SUDO_UID")
        .args(["--allow-root", "--stop-timeout", "1", "--"]);
    let (exec, exec_cgroup) = spawn_until_ready_in(env, exec, &script, |exec| {
        exec.stdout(Stdio::null()).stderr(Stdio::piped());
    });
    // The child's shell is there (with the `sleep` it may be running).
    let moved = std::fs::read_to_string(outside.join("cgroup.procs")).expect("cgroup.procs");
    assert!(
        moved.lines().any(is_shell),
        "the child did not leave the run's cgroup: {moved:?}"
    );
    let pidfds = run_pidfds(&[&exec_cgroup, &outside]);
    let (code, stderr, _) = stop_exec(exec);
    assert_eq!(code, Some(137), "{stderr}");
    assert!(
        stderr.ends_with(&format!("{}\n", killed_message(1))),
        "{stderr}"
    );
    assert_gone(&pidfds);
    let left = std::fs::read_to_string(outside.join("cgroup.procs")).expect("cgroup.procs");
    assert_eq!(left, "", "processes left in the cgroup the child moved to");
    assert!(!exec_cgroup.exists(), "the run's cgroup is left: {stderr}");
    std::fs::remove_dir(&outside).expect("remove the emptied cgroup");
}

/// An agent that ends on SIGTERM is not killed early, and its own status comes back: with `--stop-timeout 5`, an agent
/// whose TERM trap takes a second exits with the trap's code (7) and one without a trap with 143 (128 + SIGTERM);
/// with the default stop timeout (10 s), a trap that takes 3 s still exits with its own code. `exec` says nothing of
/// a kill.
pub fn ending_on_sigterm_keeps_its_status_within_the_stop_timeout(env: &mut Env) {
    use std::process::Stdio;
    env.need_daemon();
    let cases: [(&[&str], &str, i32); 3] = [
        (
            &["--stop-timeout", "5"],
            "trap 'sleep 1; exit 7' TERM; touch \"$0\"; while :; do sleep 0.05; done",
            7,
        ),
        (
            &["--stop-timeout", "5"],
            "touch \"$0\"; exec sleep 30",
            128 + 15,
        ),
        (
            &[],
            "trap 'sleep 3; exit 7' TERM; touch \"$0\"; while :; do sleep 0.05; done",
            7,
        ),
    ];
    for (options, script, want) in cases {
        let (exec, exec_cgroup) =
            spawn_until_ready_in(env, env.exec_command_with(options), script, |exec| {
                exec.stdout(Stdio::null()).stderr(Stdio::piped());
            });
        let (code, stderr, _) = stop_exec(exec);
        assert_eq!(
            (code, stderr.as_str()),
            (Some(want), ""),
            "{options:?} {script}"
        );
        assert!(!exec_cgroup.exists(), "the run's cgroup is left: {stderr}");
    }
}

/// Ctrl-C at a terminal sends SIGINT to the whole foreground process group: `exec`, its init, and an agent that does
/// no job control of its own (most agents: a Python or Node program, not an interactive shell). `exec` and the init
/// ignore it; the agent handles it as it likes, the run ends with the agent's own status, and its cgroup is removed.
/// Before, `exec` died of the SIGINT, so the kernel killed the agent in the middle of its handler (the run ends with
/// `exec`) and the run's cgroup was left behind.
pub fn ctrl_c_is_the_agents_to_handle(env: &mut Env) {
    use std::os::unix::process::CommandExt;
    env.need_daemon();
    let (child, exec_cgroup) = spawn_until_ready_with(
        env,
        "trap 'echo interrupted; sleep 0.5; echo done; exit 5' INT; touch \"$0\"; while :; do sleep 0.05; done",
        |exec| {
            exec.process_group(0)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
        },
    );
    let group = i32::try_from(child.id()).expect("pid");
    // SAFETY: killpg(2) on the process group of our own child, as the terminal driver sends Ctrl-C.
    assert_eq!(unsafe { libc::killpg(group, libc::SIGINT) }, 0);
    let out = child.wait_with_output().expect("wait");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        (out.status.code(), stdout.lines().collect::<Vec<_>>()),
        (Some(5), vec!["interrupted", "done"]),
        "{:?} {stderr}",
        out.status
    );
    assert!(!exec_cgroup.exists(), "the run's cgroup is left: {stderr}");
}

/// The attempts a root agent could make to get out from under the enforcer, each refused for the unprivileged
/// agent; afterwards the daemon still runs and still decides the agent's requests.
pub fn cannot_escape_read_keys_or_stop_the_daemon(env: &mut Env) {
    env.need_daemon();
    let state = env.dir.path().join("state");
    let daemon = env.daemon_pid().expect("daemon running");
    let pins: Vec<String> = std::fs::read_dir(&env.pin_dir)
        .expect("pin dir")
        .flatten()
        .map(|e| e.path().display().to_string())
        .collect();
    assert!(pins.iter().any(|p| p.contains("link_")), "pins: {pins:?}");
    let profile = env.cgroup.join("enforcer").join(PROFILE);
    let args = serde_json::json!({
        "daemon": daemon,
        "procs": [
            env.cgroup.join("cgroup.procs"),
            profile.join("cgroup.procs"),
            Path::new("/sys/fs/cgroup/unified/cgroup.procs"),
        ],
        "keys": [state.join("ca/ca.key"), state.join("audit/audit.key")],
        "pins": pins,
        "map": env.pin_dir.join("TAGGED"),
    });
    let (code, out, err) = env.exec_tagged(&["python3", "-c", ESCAPE, &args.to_string()]);
    assert_eq!(code, 0, "{out} {err}");
    let result: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    let attempts = result.as_object().expect("object");
    assert!(attempts.len() >= 12, "{result}");
    for (what, outcome) in attempts {
        if what == "cgroup_after" {
            continue;
        }
        assert_ne!(outcome, "ok", "the agent could: {what} ({result})");
    }
    for raw in ["raw inet", "raw inet6", "packet"] {
        assert_eq!(attempts[raw], "EPERM", "{result}");
    }
    // The daemon is not even visible from the agent's PID namespace.
    assert_eq!(attempts["SIGTERM daemon"], "ESRCH", "{result}");
    let cgroup = attempts["cgroup_after"].as_str().unwrap_or_default();
    assert!(
        cgroup.contains(&format!("/enforcer/{PROFILE}/exec-")),
        "the agent left its cgroup: {cgroup}"
    );
    // The daemon, the pins and the agent's capture are all still there.
    assert!(env.daemon_running(), "the daemon stopped");
    for pin in &pins {
        assert!(Path::new(pin).exists(), "{pin} removed");
    }
    let path = format!("/blocked/{}", unique("after-escape"));
    let out = env.curl_tagged(&[
        "--resolve",
        &env.resolve(API_HOST, 443, false),
        &format!("https://{API_HOST}{path}"),
    ]);
    assert_eq!(out.status, 403, "{out:?}");
}

/// Each attempt on the pid in argv[1] prints its outcome (`ok` or the errno name), with the pids the agent sees.
const REACH: &str = concat!(
    python_attempts!(),
    r#"
pid = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    if libc.syscall(ctypes.c_long(nr), *args) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
# x86_64: ptrace = 101 (PTRACE_ATTACH = 16), pidfd_open = 434, process_vm_readv = 310.
attempt("ptrace attach", lambda: call(101, ctypes.c_long(16), ctypes.c_long(pid), None, None))
attempt("kill 0", lambda: os.kill(pid, 0))
attempt("open mem", lambda: open("/proc/%d/mem" % pid, "rb").close())
attempt("pidfd_open", lambda: call(434, ctypes.c_int(pid), ctypes.c_uint(0)))
buf = ctypes.create_string_buffer(8)
iov = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
attempt("process_vm_readv", lambda: call(310, ctypes.c_int(pid), iov, ctypes.c_ulong(1), iov, ctypes.c_ulong(1), ctypes.c_ulong(0)))
libc.shmat.restype = ctypes.c_void_p
def shmat():
    if libc.shmat(ctypes.c_int(int(sys.argv[2])), None, ctypes.c_int(0)) in (None, ctypes.c_void_p(-1).value):
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
attempt("shmat", shmat)
out["self"] = os.getpid()
out["visible"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
print(json.dumps(out))
"#
);

/// A process of the agent's own user outside its run (the shell of the person who ran `sudo enforcer exec`, another
/// agent's run) cannot be traced, signalled or opened by the agent, whatever `kernel.yama.ptrace_scope` allows: the
/// agent runs in a PID namespace of its own, with a `/proc` that shows only its run. Before, with no Yama (as here),
/// `PTRACE_ATTACH` on such a process succeeded and the agent could make it act for it outside capture. Nor can it
/// attach the System V shared memory of its user's processes outside the run (its IPC namespace is its own). Every
/// process the agent leaves behind ends with the run, so its cgroup is removed; and the run ends when `exec` is killed.
pub fn cannot_reach_processes_of_its_user_outside_its_run(env: &mut Env) {
    use std::os::unix::process::CommandExt;
    env.need_daemon();
    let mut outside = Command::new("sleep");
    outside.arg("120").uid(env.agent_uid).gid(env.agent_gid);
    let mut outside = outside.spawn().expect("sleep as the agent's user");
    let pid = outside.id().to_string();
    // A System V shared memory segment of the agent's user, made outside the run.
    let mut ipcmk = Command::new("ipcmk");
    ipcmk
        .args(["--shmem", "4096", "--mode", "0600"])
        .uid(env.agent_uid)
        .gid(env.agent_gid);
    let (code, made, err) = harness::output(ipcmk);
    assert_eq!(code, 0, "ipcmk: {err}");
    let shmid = made
        .trim()
        .rsplit(' ')
        .next()
        .filter(|id| id.parse::<u32>().is_ok())
        .unwrap_or_else(|| panic!("ipcmk: {made}"))
        .to_string();
    let (code, out, err) = env.exec_tagged(&["python3", "-c", REACH, &pid, &shmid]);
    let _ = outside.kill();
    let _ = outside.wait();
    let mut ipcrm = Command::new("ipcrm");
    ipcrm.args(["--shmem-id", &shmid]);
    let _ = harness::output(ipcrm);
    assert_eq!(code, 0, "{out} {err}");
    let result: serde_json::Value =
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    for (attempt, errno) in [
        ("ptrace attach", "ESRCH"),
        ("kill 0", "ESRCH"),
        ("open mem", "ENOENT"),
        ("pidfd_open", "ESRCH"),
        ("process_vm_readv", "ESRCH"),
        // The run has an IPC namespace of its own: the segment's id names nothing there.
        ("shmat", "EINVAL"),
    ] {
        assert_eq!(result[attempt], errno, "{attempt}: {result}");
    }
    // The agent is the second process of its namespace; the first is its init. Nothing else is visible.
    assert_eq!(result["self"], 2, "{result}");
    assert_eq!(result["visible"], serde_json::json!([1, 2]), "{result}");

    // A process the agent starts in the background ends with the run, and the run's cgroup goes with it.
    let mut exec = env.exec_command();
    exec.args(["sh", "-c", "sleep 300 & echo started"]);
    let child = exec
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("enforcer exec");
    let exec_cgroup = env
        .profile_cgroup(PROFILE)
        .join(format!("exec-{}", child.id()));
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim()
        ),
        (Some(0), "started"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !exec_cgroup.exists(),
        "the run's cgroup is left: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // When exec itself is killed, the run ends with it: its cgroup empties, and the daemon, which holds a pidfd of
    // the exec that registered the run, removes the cgroup exec could not.
    let (mut child, exec_cgroup) = spawn_until_ready(env, "touch \"$0\"; sleep 300");
    child.kill().expect("SIGKILL exec");
    child.wait().expect("wait");
    let procs = exec_cgroup.join("cgroup.procs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        if !exec_cgroup.exists() {
            break;
        }
        let left = std::fs::read_to_string(&procs).unwrap_or_default();
        assert!(
            std::time::Instant::now() < deadline,
            "the killed run's cgroup is left after 15 s, holding [{}]",
            left.trim()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// An `exec` killed after creating its run's cgroup and before registering the run (or while the daemon was down)
/// leaves a cgroup no session knows. The daemon removes it once the `exec` its name carries has been gone a minute,
/// and leaves alone one whose `exec` still runs.
pub fn abandoned_exec_cgroup_is_removed(env: &mut Env) {
    env.need_daemon();
    let mut gone = Command::new("true").spawn().expect("true");
    gone.wait().expect("wait");
    let mut running = Command::new("sleep").arg("300").spawn().expect("sleep");
    let parent = env.profile_cgroup(PROFILE);
    let abandoned = parent.join(format!("exec-{}-1", gone.id()));
    let live = parent.join(format!("exec-{}-1", running.id()));
    std::fs::create_dir(&abandoned).expect("mkdir the abandoned cgroup");
    std::fs::create_dir(&live).expect("mkdir the live exec's cgroup");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    while abandoned.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let (abandoned_left, live_left) = (abandoned.exists(), live.exists());
    let _ = running.kill();
    let _ = running.wait();
    // Gone now, and that of a running exec is left to it: the test removes it itself, whoever gets there first.
    let _ = std::fs::remove_dir(&live);
    let _ = std::fs::remove_dir(&abandoned);
    assert!(
        !abandoned_left,
        "the abandoned exec cgroup is left after 90 s"
    );
    assert!(
        live_left,
        "the cgroup of an exec that still runs was removed"
    );
}

/// A process of the agent's user outside its run: it listens on the abstract unix socket argv[1] and holds the
/// host's `/proc` open; it prints its pid and that descriptor, then waits.
const VICTIM: &str = r#"
import os, socket, sys, time
proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind("\0" + sys.argv[1])
s.listen(8)
print(os.getpid(), proc, flush=True)
time.sleep(120)
"#;

/// The agent's attempts on [`VICTIM`] by names other than its pid. argv: the victim's socket, the number of its
/// `/proc` descriptor, a file to create once the first attempt is made, the directory where the host then mounts a
/// procfs, the victim's pid there.
const BY_OTHER_NAMES: &str = concat!(
    python_attempts!(),
    r#"
import socket, struct, time
name, proc_fd, ready, later, victim = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    if libc.syscall(ctypes.c_long(nr), *args) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect("\0" + name)
# SO_PEERPIDFD = 77: a pidfd for the process at the other end, wherever it runs. x86_64: pidfd_getfd = 438.
pidfd = struct.unpack("i", s.getsockopt(socket.SOL_SOCKET, 77, 4))[0]
attempt("pidfd_getfd", lambda: call(438, ctypes.c_int(pidfd), ctypes.c_int(proc_fd), ctypes.c_uint(0)))
open(ready, "w").close()
deadline = time.time() + 20
while not os.path.exists(later + "/1/status") and time.time() < deadline:
    time.sleep(0.02)
out["later procfs shows the victim"] = os.path.exists(later + "/" + victim + "/status")
attempt("open mem rw", lambda: os.close(os.open(later + "/" + victim + "/mem", os.O_RDWR)))
print(json.dumps(out))
"#
);

/// A directory bind-mounted onto itself and made shared, as every mount is on a systemd host; unmounted (with what
/// was mounted below it) when dropped.
struct SharedMount(PathBuf);

impl SharedMount {
    fn new(dir: PathBuf) -> SharedMount {
        std::fs::create_dir_all(&dir).expect("mkdir");
        let shared = SharedMount(dir);
        let mount = |args: &[&std::ffi::OsStr]| {
            let mut mount = Command::new("mount");
            mount.args(args);
            let (code, _, err) = harness::output(mount);
            assert_eq!(code, 0, "mount {args:?}: {err}");
        };
        let dir = shared.0.as_os_str();
        mount(&["--bind".as_ref(), dir, dir]);
        mount(&["--make-shared".as_ref(), dir]);
        shared
    }
}

impl Drop for SharedMount {
    fn drop(&mut self) {
        let mut umount = Command::new("umount");
        umount.arg("--recursive").arg("--lazy").arg(&self.0);
        let _ = harness::output(umount);
    }
}

/// A pid is not the only name of a process, and the agent cannot reach a process of its user outside its run by
/// another: not through the unix socket it talks to it over (`SO_PEERPIDFD` gives a pidfd for the process at the
/// other end, and pidfd_getfd(2) checks ptrace access, not the PID namespace), nor through a procfs the host mounts
/// on a shared mount after the run started (it propagates into the run's mount namespace and shows every process of
/// the host). Before, the agent copied the victim's descriptor of the host's `/proc` and opened the victim's memory
/// for writing through the later mount; now the Landlock domain the agent runs in refuses both (`EPERM`, `EACCES`).
pub fn cannot_reach_processes_of_its_user_by_other_names(env: &mut Env) {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    env.need_daemon();
    let name = unique("enforcer-e2e-victim");
    let mut victim = Command::new(harness::PYTHON);
    victim
        .args(["-c", VICTIM, &name])
        .uid(env.agent_uid)
        .gid(env.agent_gid)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped());
    let mut victim = victim.spawn().expect("the victim, as the agent's user");
    let mut line = String::new();
    std::io::BufReader::new(victim.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the victim's pid and descriptor");
    let (victim_pid, proc_fd) = line.trim().split_once(' ').expect("pid and fd");
    let shared = SharedMount::new(env.dir.path().join(unique("shared")));
    let later = shared.0.join("proc");
    std::fs::create_dir(&later).expect("mkdir");
    let ready = std::env::temp_dir().join(unique("by-other-names-ready"));

    let mut exec = env.exec_command();
    exec.args(["python3", "-c", BY_OTHER_NAMES, &name, proc_fd])
        .arg(&ready)
        .arg(&later)
        .arg(victim_pid)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let agent = exec.spawn().expect("enforcer exec");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !ready.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = std::fs::remove_file(&ready);
    let mut mount = Command::new("mount");
    mount.args(["-t", "proc", "proc"]).arg(&later);
    let (mounted, _, mount_err) = harness::output(mount);
    let out = agent.wait_with_output().expect("wait");
    let _ = victim.kill();
    let _ = victim.wait();
    drop(shared);
    assert_eq!(mounted, 0, "mount -t proc: {mount_err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout} {stderr}");
    let result: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout} {stderr}"));
    assert_eq!(result["later procfs shows the victim"], true, "{result}");
    assert_eq!(result["pidfd_getfd"], "EPERM", "{result}");
    assert_eq!(result["open mem rw"], "EACCES", "{result}");
}

/// The agent's attempts on the terminal it shares with the shell that started `exec`: push a command into its input
/// queue (`TIOCSTI`), which that shell would run as typed once the agent exits.
const TYPE_INTO_TERMINAL: &str = concat!(
    python_attempts!(),
    r#"
import fcntl, termios
def push():
    for c in b"echo typed-by-the-agent\n":
        fcntl.ioctl(0, termios.TIOCSTI, bytes([c]))
attempt("TIOCSTI", push)
print(json.dumps(out))
"#
);

/// An agent started from an interactive shell shares its terminal (as its controlling terminal), and `TIOCSTI` would
/// push a command into the terminal's input queue that the shell runs once the agent exits: as the person who ran
/// `enforcer exec` (root, for a root shell), outside capture. Before, the push was ok and the command waited in the
/// queue; the agent's system call filter now refuses it (`EPERM`) and nothing reaches the queue.
pub fn cannot_type_into_the_terminal_it_shares(env: &mut Env) {
    use std::os::unix::process::CommandExt;
    env.need_daemon();
    let (master, slave) = crate::terminal::open_pty();
    let mut exec = env.exec_command();
    exec.args(["python3", "-c", TYPE_INTO_TERMINAL])
        .stdin(slave.try_clone().expect("dup"))
        .stdout(slave.try_clone().expect("dup"))
        .stderr(slave.try_clone().expect("dup"));
    // SAFETY: setsid(2) and ioctl(2) only: exec leads a session whose controlling terminal is the pty, as a shell's
    // job's terminal is.
    unsafe {
        exec.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let status = exec.status().expect("enforcer exec");
    let output = read_available(&master);
    assert_eq!(status.code(), Some(0), "{output}");
    let result: serde_json::Value = output
        .lines()
        .find_map(|l| serde_json::from_str(l.trim()).ok())
        .unwrap_or_else(|| panic!("no result: {output}"));
    assert_eq!(result["TIOCSTI"], "EPERM", "{result}");
    // Nothing waits in the terminal's input queue for the shell to read.
    let queued = read_available(&slave);
    assert_eq!(queued, "", "the agent typed into the terminal");
}

/// What can be read from `fd` now, without waiting.
fn read_available(fd: &std::os::fd::OwnedFd) -> String {
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::new();
    loop {
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll(2) on one descriptor we hold, then read(2) into `buf` of the length given.
        let n = unsafe {
            if libc::poll(&mut poll, 1, 200) != 1 || poll.revents & libc::POLLIN == 0 {
                break;
            }
            libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
        };
        let Ok(n) = usize::try_from(n) else { break };
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `sudo enforcer exec` runs the agent as the sudo caller; root without a user is refused with what to pass; only
/// `--allow-root` gives a root agent, with a warning.
pub fn sudo_caller_root_refusal_and_allow_root(env: &mut Env) {
    env.need_daemon();
    // As sudo(8) sets them for the command it runs.
    let mut cmd = exec_without_user(env);
    cmd.env("SUDO_UID", env.agent_uid.to_string())
        .env("SUDO_GID", env.agent_gid.to_string())
        .env("SUDO_USER", AGENT_USER)
        .env("HOME", "/root")
        .args(["--", "sh", "-c", "id -u; id -G; echo $HOME"]);
    let (code, out, err) = harness::output(cmd);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], env.agent_uid.to_string(), "{out}");
    assert!(
        lines[1]
            .split_whitespace()
            .any(|g| g == env.agent_gid.to_string()),
        "{out}"
    );
    assert_eq!(lines[2], "/nonexistent", "HOME is the user's: {out}");
    // Nothing to warn about: the agent cannot reach its user's processes outside its run.
    assert!(!err.contains("WARNING"), "{err}");

    let mut cmd = exec_without_user(env);
    cmd.env_remove("SUDO_UID")
        .env_remove("SUDO_GID")
        .args(["--", "id", "-u"]);
    let (code, out, err) = harness::output(cmd);
    assert_ne!(code, 0, "a root agent was started: {out}");
    assert!(out.is_empty(), "{out}");
    for hint in [
        "refusing to run the agent as root",
        "--user NAME",
        "--allow-root",
        "sudo",
    ] {
        assert!(err.contains(hint), "{hint:?} not in: {err}");
    }

    // A root agent (sessions' review test runs another).
    let mut cmd = exec_without_user(env);
    cmd.env_remove("SUDO_UID")
        .args(["--allow-root", "--", "id", "-u"]);
    let (code, out, err) = harness::output(cmd);
    assert_eq!((code, out.trim()), (0, "0"), "{err}");
    assert!(
        err.contains("WARNING") && err.contains("--allow-root"),
        "{err}"
    );
}

/// The state directory publishes the CA certificate and bundle to every user and keeps the keys to root; the
/// unprivileged agent's curl trusts the bundle it is pointed at.
pub fn published_bundle_is_readable_keys_are_not(env: &mut Env) {
    env.need_daemon();
    let state = env.dir.path().join("state");
    for (path, want) in [
        (state.clone(), 0o711),
        (state.join("public"), 0o755),
        (state.join("public/bundle.pem"), 0o644),
        (state.join("public/ca.pem"), 0o644),
        (state.join("ca"), 0o700),
        (state.join("ca/ca.key"), 0o600),
        (state.join("audit"), 0o700),
        (state.join("audit/audit.key"), 0o600),
    ] {
        assert_eq!(mode(&path), want, "{}", path.display());
    }
    let path = format!("/allowed/{}", unique("bundle"));
    let out = env.curl_tagged(&[
        "--resolve",
        &env.resolve(API_HOST, 443, false),
        &format!("https://{API_HOST}{path}"),
    ]);
    assert_eq!((out.code, out.status), (0, 200), "{out:?}");
    assert_eq!(env.upstream_count(&path), 1);
}

/// Every trust variable `exec` sets, and the published file it names.
const TRUST_VARIABLES: &[(&str, &str)] = &[
    ("SSL_CERT_FILE", "bundle.pem"),
    ("REQUESTS_CA_BUNDLE", "bundle.pem"),
    ("CURL_CA_BUNDLE", "bundle.pem"),
    ("NODE_EXTRA_CA_CERTS", "ca.pem"),
    ("PIP_CERT", "bundle.pem"),
    ("NPM_CONFIG_CAFILE", "bundle.pem"),
    ("GIT_SSL_CAINFO", "bundle.pem"),
    ("CARGO_HTTP_CAINFO", "bundle.pem"),
    ("AWS_CA_BUNDLE", "bundle.pem"),
    ("CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE", "bundle.pem"),
    ("HTTPLIB2_CA_CERTS", "bundle.pem"),
    ("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", "bundle.pem"),
    ("CONDA_SSL_VERIFY", "bundle.pem"),
    ("DENO_CERT", "bundle.pem"),
    ("NIX_SSL_CERT_FILE", "bundle.pem"),
    ("HEX_CACERTS_PATH", "bundle.pem"),
];

/// Values the caller's environment had (the system bundle: no enforcer CA) are replaced.
pub fn trust_variables_replace_inherited_values(env: &mut Env) {
    env.need_daemon();
    let public = env.dir.path().join("state/public");
    let mut cmd = env.exec_command();
    for (var, _) in TRUST_VARIABLES {
        cmd.env(var, SYSTEM_BUNDLE);
    }
    cmd.arg("env");
    let (code, out, err) = harness::output(cmd);
    assert_eq!(code, 0, "{err}");
    for (var, file) in TRUST_VARIABLES {
        let want = format!("{var}={}", public.join(file).display());
        assert!(out.lines().any(|l| l == want), "{want} not in:\n{out}");
    }
}

/// A working directory of the agent's own, with tool configurations that name the system bundle as their CA file.
struct Workspace {
    dir: PathBuf,
    hosts: PathBuf,
    cargo: PathBuf,
}

fn workspace(env: &Env) -> Workspace {
    let dir = env.dir.path().join("runtimes");
    let hosts = env.dir.path().join("runtimes-hosts");
    std::fs::create_dir_all(dir.join("cargo-home")).expect("mkdir");
    std::fs::write(
        &hosts,
        format!(
            "127.0.0.1 localhost\n::1 localhost\n{} {API_HOST}\n",
            env.v4
        ),
    )
    .expect("hosts");
    for (name, text) in [
        ("pip.conf", format!("[global]\ncert = {SYSTEM_BUNDLE}\n")),
        ("npmrc", format!("cafile={SYSTEM_BUNDLE}\n")),
        (
            "gitconfig",
            format!("[http]\n\tsslCAInfo = {SYSTEM_BUNDLE}\n"),
        ),
        (
            "cargo-home/config.toml",
            format!("[http]\ncainfo = \"{SYSTEM_BUNDLE}\"\n"),
        ),
    ] {
        std::fs::write(dir.join(name), text).expect("config");
    }
    // The cargo that runs this test, copied where the agent user can run it (rustup's toolchains are under /root).
    let cargo = env.dir.path().join("bin/cargo");
    if !cargo.exists() {
        let real = std::env::var_os("CARGO")
            .map(PathBuf::from)
            .expect("CARGO is set by cargo test");
        std::fs::create_dir_all(cargo.parent().expect("parent")).expect("mkdir bin");
        std::fs::copy(&real, &cargo).unwrap_or_else(|e| panic!("copy {}: {e}", real.display()));
        harness::set_mode(cargo.parent().expect("parent"), 0o755).expect("chmod");
        harness::set_mode(&cargo, 0o755).expect("chmod");
    }
    let (uid, gid) = (env.agent_uid, env.agent_gid);
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{uid}:{gid}"))
        .arg(&dir)
        .status()
        .expect("chown");
    assert!(status.success());
    Workspace { dir, hosts, cargo }
}

/// Run `cmd` as the tagged agent, with `api.e2e.test` resolving to the upstream (a private /etc/hosts in its own
/// mount namespace), HOME in the workspace and the tools' configuration files set; `unset` names trust variables
/// removed inside the agent (to show what the tool's own configuration does without them).
fn run_tool(env: &Env, ws: &Workspace, unset: &[&str], cmd: &[&str]) -> (i32, String, String) {
    let d = |name: &str| ws.dir.join(name).display().to_string();
    let mut inner: Vec<String> = vec!["env".into()];
    for var in unset {
        inner.push(format!("--unset={var}"));
    }
    for (k, v) in [
        ("HOME", d("")),
        ("PIP_CONFIG_FILE", d("pip.conf")),
        ("PIP_DISABLE_PIP_VERSION_CHECK", "1".into()),
        ("NPM_CONFIG_USERCONFIG", d("npmrc")),
        ("npm_config_cache", d("npm-cache")),
        ("npm_config_fetch_retries", "0".into()),
        ("npm_config_update_notifier", "false".into()),
        ("GIT_CONFIG_GLOBAL", d("gitconfig")),
        ("GIT_TERMINAL_PROMPT", "0".into()),
        ("CARGO_HOME", d("cargo-home")),
        ("CARGO_NET_RETRY", "0".into()),
    ] {
        inner.push(format!("{k}={v}"));
    }
    inner.extend(cmd.iter().map(|s| s.to_string()));
    let mut c = Command::new("unshare");
    c.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
        .arg(&ws.hosts)
        .args(env.exec_argv())
        .args(&inner);
    harness::output(env.agent_command(c))
}

/// `pip download` of a package that does not exist from `index`, as the agent (see [`run_tool`]).
fn pip_download(env: &Env, ws: &Workspace, unset: &[&str], index: &str) -> (i32, String, String) {
    let dl = ws.dir.join("dl").display().to_string();
    let pip = [
        "python3",
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--retries",
        "0",
        "--timeout",
        "20",
        "-d",
        &dl,
        "--index-url",
        index,
        "enforcer-probe",
    ];
    run_tool(env, ws, unset, &pip)
}

/// The records the proxy left for agents that refused its certificate.
fn client_tls_records(env: &Env) -> Vec<serde_json::Value> {
    env.audit_records()
        .into_iter()
        .filter(|r| r["decision"]["reason"] == "client_tls")
        .collect()
}

/// The `client_tls` records, once there are more than `before` (the proxy writes the record after the client has
/// already given up, so it may land a moment later); bounded wait.
fn client_tls_records_after(env: &Env, before: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let recs = client_tls_records(env);
        if recs.len() > before || std::time::Instant::now() > deadline {
            return recs;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Every runtime installed here, run as the agent, reaches the upstream through the proxy — curl, Python's urllib
/// and requests, Node's https, and pip, npm, git and cargo each with a configuration file that names the system
/// bundle as its CA file (which the variables `exec` sets override).
pub fn every_runtime_trusts_the_enforcer_ca(env: &mut Env) {
    env.need_daemon();
    let ws = workspace(env);
    let base = |tag: &str| format!("/allowed/{}", unique(tag));
    let url = |path: &str| format!("https://{API_HOST}{path}");
    let cargo = ws.cargo.display().to_string();

    let mut checks: Vec<(&str, String)> = Vec::new();
    let p = base("curl");
    let (code, out, err) = run_tool(
        env,
        &ws,
        &[],
        &["curl", "-sS", "--max-time", "20", &url(&p)],
    );
    assert!(
        code == 0 && out.contains("upstream ok"),
        "curl: {out} {err}"
    );
    checks.push(("curl", p));
    let p = base("urllib");
    let py =
        "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=20).status)";
    let (code, out, err) = run_tool(env, &ws, &[], &["python3", "-c", py, &url(&p)]);
    assert_eq!((code, out.trim()), (0, "200"), "urllib: {err}");
    checks.push(("urllib", p));
    let p = base("requests");
    let py = "import sys, requests; print(requests.get(sys.argv[1], timeout=20).status_code)";
    let (code, out, err) = run_tool(env, &ws, &[], &["python3", "-c", py, &url(&p)]);
    assert_eq!((code, out.trim()), (0, "200"), "requests: {err}");
    checks.push(("requests", p));
    let p = base("node");
    let js =
        "require('https').get(process.argv[1], r => { console.log(r.statusCode); r.resume(); })\
              .on('error', e => { console.error(String(e)); process.exit(1); })";
    let (code, out, err) = run_tool(env, &ws, &[], &["node", "-e", js, &url(&p)]);
    assert_eq!((code, out.trim()), (0, "200"), "node: {err}");
    checks.push(("node", p));

    // The package managers get an answer that is no index, so they fail after the request; what matters is that
    // the request got through TLS to the upstream (counted there) and was decided (recorded).
    let p = base("pip");
    let (_, out, err) = pip_download(env, &ws, &[], &format!("{}/", url(&p)));
    checks.push(("pip", format!("{p}/enforcer-probe/")));
    let mut outputs = format!("pip: {out}{err}\n");
    let (npm, git, cargo_path) = (base("npm"), base("git"), base("cargo"));
    let (registry, repo) = (format!("{}/", url(&npm)), url(&format!("{git}/repo.git")));
    let index = format!("sparse+{}/", url(&cargo_path));
    let managers: [(&str, Vec<&str>, String); 3] = [
        (
            "npm",
            vec!["npm", "view", "enforcer-probe", "--registry", &registry],
            format!("{npm}/enforcer-probe"),
        ),
        (
            "git",
            vec!["git", "ls-remote", &repo],
            format!("{git}/repo.git/info/refs"),
        ),
        (
            "cargo",
            vec![&cargo, "search", "--index", &index, "enforcer-probe"],
            format!("{cargo_path}/config.json"),
        ),
    ];
    for (tool, cmd, counted) in managers {
        let (_, out, err) = run_tool(env, &ws, &[], &cmd);
        outputs.push_str(&format!("{tool}: {out}{err}\n"));
        checks.push((tool, counted));
    }
    let records = env.audit_records();
    for (tool, path) in &checks {
        assert_eq!(
            env.upstream_count(path),
            1,
            "{tool}: {path} did not reach the upstream\n{outputs}"
        );
        let recs: Vec<_> = records
            .iter()
            .filter(|r| r["request"]["path"].as_str() == Some(path.as_str()))
            .collect();
        assert_eq!(recs.len(), 1, "{tool}: records {recs:?}");
        assert_eq!(
            recs[0]["decision"]["verdict"], "allow",
            "{tool}: {}",
            recs[0]
        );
        assert_eq!(
            recs[0]["agent"]["uid"], env.agent_uid,
            "{tool}: {}",
            recs[0]
        );
    }
}

/// A client whose own CA setting names a file without the enforcer CA refuses the handshake; the refusal is in the
/// audit trail with the destination, SNI, agent, the alert it sent and reason `client_tls`. curl given `--cacert`,
/// and pip left to its pip.conf `cert =` (the variables that override it removed inside the agent: `PIP_CERT`, and
/// `REQUESTS_CA_BUNDLE` and `CURL_CA_BUNDLE`, which requests lets win over a session's CA file).
pub fn a_client_refusing_the_certificate_is_recorded(env: &mut Env) {
    env.need_daemon();
    let ws = workspace(env);
    let before = client_tls_records(env).len();
    let path = format!("/allowed/{}", unique("refused"));
    let out = env.curl_tagged(&[
        "--cacert",
        SYSTEM_BUNDLE,
        "--resolve",
        &env.resolve(API_HOST, 443, false),
        &format!("https://{API_HOST}{path}"),
    ]);
    assert_eq!(out.code, 60, "{out:?}");
    assert_eq!(env.upstream_count(&path), 0);
    let recs = client_tls_records_after(env, before);
    assert_eq!(recs.len(), before + 1, "{recs:?}");
    let rec = &recs[before];
    assert_eq!(rec["decision"]["verdict"], "block", "{rec}");
    assert_eq!(rec["outcome"]["disposition"], "blocked", "{rec}");
    assert_eq!(rec["outcome"]["error"], "client_tls", "{rec}");
    assert_eq!(rec["request"]["host"], API_HOST, "{rec}");
    assert_eq!(rec["request"]["ip"], env.v4.as_str(), "{rec}");
    assert_eq!(rec["request"]["port"], 443, "{rec}");
    assert_eq!(rec["request"]["scheme"], "https", "{rec}");
    assert_eq!(rec["agent"]["profile"], PROFILE, "{rec}");
    assert_eq!(rec["agent"]["uid"], env.agent_uid, "{rec}");
    assert!(rec["agent"]["pid"].as_u64().is_some(), "{rec}");
    assert_eq!(rec["request"]["tls_alert"], "unknown_ca", "{rec}");

    let before = client_tls_records(env).len();
    let p = format!("/allowed/{}", unique("pip-refused"));
    let (code, out, err) = pip_download(
        env,
        &ws,
        &["PIP_CERT", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"],
        &format!("https://{API_HOST}{p}/"),
    );
    assert_ne!(code, 0, "{out} {err}");
    assert_eq!(
        env.upstream_count(&format!("{p}/enforcer-probe/")),
        0,
        "pip trusted the enforcer without PIP_CERT: {out} {err}"
    );
    let recs = client_tls_records_after(env, before);
    assert!(
        recs.len() > before,
        "pip's refusal left no record: {out} {err}"
    );
    for rec in &recs[before..] {
        assert_eq!(rec["request"]["host"], API_HOST, "{rec}");
        assert_eq!(rec["request"]["tls_alert"], "unknown_ca", "{rec}");
        assert!(
            rec["agent"]["exe"]
                .as_str()
                .is_some_and(|e| e.contains("python")),
            "{rec}"
        );
    }
}

/// Upstream certificates are verified against the host's trust store: a CA found only in the store the daemon's
/// environment points at (SSL_CERT_FILE, as OpenSSL reads it) is trusted, and without it, or with
/// `proxy.upstream_roots: bundled`, the same upstream is not.
pub fn upstream_trust_comes_from_the_system_store(env: &mut Env) {
    env.need_daemon();
    let original = env.config.clone();
    let base = std::fs::read_to_string(&original).expect("config");
    let roots_line = format!("  extra_roots: [{}]\n", env.test_ca.display());
    assert!(base.contains(&roots_line), "{base}");
    let system_only = base.replace(&roots_line, "  extra_roots: []\n");
    let bundled = system_only.replace("proxy:\n", "proxy:\n  upstream_roots: bundled\n");
    let dir = env.dir.path();
    let (system_cfg, bundled_cfg) = (
        dir.join("system-roots.yaml"),
        dir.join("bundled-roots.yaml"),
    );
    std::fs::write(&system_cfg, system_only).expect("config");
    std::fs::write(&bundled_cfg, bundled).expect("config");
    let store = dir.join("system-store.pem");
    let mut text = std::fs::read_to_string(SYSTEM_BUNDLE).unwrap_or_default();
    text.push_str(&std::fs::read_to_string(&env.test_ca).expect("test CA"));
    std::fs::write(&store, text).expect("store");

    let request = |env: &Env, tag: &str| {
        let path = format!("/allowed/{}", unique(tag));
        let out = env.curl_tagged(&[
            "--resolve",
            &env.resolve(API_HOST, 443, false),
            &format!("https://{API_HOST}{path}"),
        ]);
        let count = env.upstream_count(&path);
        let recs: Vec<serde_json::Value> = env
            .audit_records()
            .into_iter()
            .filter(|r| r["request"]["path"].as_str() == Some(path.as_str()))
            .collect();
        (out, count, recs)
    };
    let cases: [(&Path, &Path, bool); 3] = [
        (&system_cfg, &store, true),
        (&system_cfg, Path::new(SYSTEM_BUNDLE), false),
        (&bundled_cfg, &store, false),
    ];
    for (config, store, trusted) in cases {
        env.restart_daemon_with_env(config.to_path_buf(), &[("SSL_CERT_FILE", store)])
            .unwrap_or_else(|e| panic!("restart: {e}"));
        let (out, count, recs) = request(env, "roots");
        let case = format!(
            "{} with SSL_CERT_FILE={}",
            config.display(),
            store.display()
        );
        assert_eq!(recs.len(), 1, "{case}: {recs:?}");
        if trusted {
            assert_eq!((out.code, out.status), (0, 200), "{case}: {out:?}");
            assert_eq!(count, 1, "{case}");
            assert_eq!(recs[0]["outcome"]["disposition"], "forwarded", "{case}");
        } else {
            assert_ne!(out.status, 200, "{case}: {out:?}");
            assert_eq!(count, 0, "{case}: forwarded to an untrusted upstream");
            assert_eq!(
                recs[0]["outcome"]["error"], "upstream_tls",
                "{case}: {}",
                recs[0]
            );
        }
    }
    env.restart_daemon(original)
        .unwrap_or_else(|e| panic!("restart on the harness config: {e}"));
}
