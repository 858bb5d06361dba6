//! Privileged end-to-end tests of the kernel side of capture, against the real daemon: what a tagged process may do
//! with sockets beyond connecting out (socket kinds, bind/listen, inbound packets), how the daemon is told from an
//! agent, what a redirected socket reports as its peer, how origins are keyed, and that every refusal reaches the
//! audit trail, rate-bounded. Attacks that need a capability (raw sockets need CAP_NET_RAW) run as root inside a
//! tagged cgroup — the attacker with capabilities; the others run through `enforcer exec` as any agent would.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::harness::{
    self, Env, API_HOST, ECHO_ALLOWED, ECHO_BLOCKED, PROFILE, SERVE_PROFILE, UDP_SINK,
};
use crate::run;

/// Python for agents: the system interpreter (a non-root agent cannot use one under /root).
const PYTHON: &str = "/usr/bin/python3";

/// Run `cmd` as root in a fresh cgroup below `profile`'s tagged cgroup, kept until `keep` returns (so records can
/// still name it); returns (exit code, stdout, stderr) and the cgroup's path relative to the cgroup root.
pub(crate) fn as_root_in_tagged_cgroup(
    env: &Env,
    profile: &str,
    cmd: &[&str],
    keep: impl FnOnce(&str),
) -> (i32, String, String) {
    static N: AtomicU32 = AtomicU32::new(0);
    let cgroup = env
        .profile_cgroup(profile)
        .join(format!("root-{}", N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir(&cgroup).expect("create a cgroup below the profile's");
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .expect("open cgroup.procs");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&procs);
    let mut command = Command::new(cmd[0]);
    command.args(&cmd[1..]).stdin(Stdio::null());
    // SAFETY: only write(2), async-signal-safe, on an fd that stays open until spawn returns: the child joins the
    // tagged cgroup before it execs.
    unsafe {
        command.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) == 1 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let out = command.output().expect("spawn in the tagged cgroup");
    drop(procs);
    let rel = format!(
        "/{}",
        cgroup
            .strip_prefix("/sys/fs/cgroup/unified")
            .expect("below the cgroup root")
            .display()
    );
    keep(&rel);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::remove_dir(&cgroup).is_err() && cgroup.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The audit records of kernel refusals.
fn kernel_records(env: &Env) -> Vec<serde_json::Value> {
    env.audit_records()
        .into_iter()
        .filter(|r| r["decision"]["reason"] == "kernel")
        .collect()
}

/// Wait (bounded) until at least `n` kernel refusal records satisfy `pred`; returns them all.
fn wait_for_kernel_records(
    env: &Env,
    n: usize,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let found: Vec<_> = kernel_records(env).into_iter().filter(&pred).collect();
        if found.len() >= n || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A kernel refusal record's fixed parts: blocked by the kernel, attributed to `profile`.
fn assert_refusal(rec: &serde_json::Value, method: &str, profile: &str) {
    assert_eq!(rec["decision"]["verdict"], "block", "{rec}");
    assert_eq!(rec["decision"]["rule"], serde_json::Value::Null, "{rec}");
    assert_eq!(rec["outcome"]["disposition"], "blocked", "{rec}");
    assert_eq!(rec["outcome"]["error"], "kernel", "{rec}");
    assert_eq!(rec["request"]["method"], method, "{rec}");
    assert_eq!(rec["agent"]["profile"], profile, "{rec}");
}

/// Wait until the UDP sink has counted `want` datagrams (or give up), then a little longer so late ones show.
fn settle_udp_count(env: &Env, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.udp_count(UDP_SINK) < want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    env.udp_count(UDP_SINK)
}

// ---- socket kinds ----

/// Sends one UDP datagram to the netns host's sink (argv[1] IPv4, argv[2] IPv6, argv[3] port) through an IPv4 raw
/// socket and an IPv6 raw socket (the kernel adds the IP header). Prints one result per socket: `sent`, `eperm`
/// (refused) or `error:<errno>`.
const RAW_SOCKETS: &str = r#"
import socket, struct, sys
v4, v6, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def udp(sport):
    data = b"raw"
    return struct.pack("!HHHH", sport, port, 8 + len(data), 0) + data
def raw4():
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
    s.sendto(udp(40001), (v4, 0))
def raw6():
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_UDP)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_CHECKSUM, 6)
    s.sendto(udp(40002), (v6, 0))
out = []
for attempt in (raw4, raw6):
    try:
        attempt()
        out.append("sent")
    except PermissionError:
        out.append("eperm")
    except OSError as e:
        out.append("error:%d" % e.errno)
print(" ".join(out))
"#;

/// Sends one UDP datagram to the netns host's sink as a whole Ethernet frame through a packet socket bound to the
/// host's veth (argv[1]): to MAC argv[2], from IPv4 argv[3] to argv[4] port argv[5]. First asks for the qdisc
/// bypass. Prints `<bypass> <send>`, each `ok`/`sent`, `eperm` (refused), `dropped` (ENOBUFS: the device refused
/// the frame) or `error:<errno>`.
const PACKET_SOCKET: &str = r#"
import errno, socket, struct, sys
ifname, dst_mac, src_ip, dst_ip, port = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
def checksum(h):
    total = sum(struct.unpack("!%dH" % (len(h) // 2), h))
    total = (total >> 16) + (total & 0xffff)
    return ~(total + (total >> 16)) & 0xffff
def result(fn, ok):
    try:
        fn()
        return ok
    except PermissionError:
        return "eperm"
    except OSError as e:
        return "dropped" if e.errno == errno.ENOBUFS else "error:%d" % e.errno
out = []
try:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
    s.bind((ifname, 0))
except PermissionError:
    print("eperm eperm")
    sys.exit(0)
out.append(result(lambda: s.setsockopt(263, 20, 1), "ok"))
mac = lambda m: bytes(int(x, 16) for x in m.split(":"))
data = b"packet"
udp = struct.pack("!HHHH", 40003, port, 8 + len(data), 0) + data
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                 socket.inet_aton(src_ip), socket.inet_aton(dst_ip))
ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
src_mac = open("/sys/class/net/%s/address" % ifname).read().strip()
frame = mac(dst_mac) + mac(src_mac) + b"\x08\x00" + ip + udp
out.append(result(lambda: s.send(frame), "sent"))
print(" ".join(out))
"#;

/// Raw IP sockets carry bytes past every connect and send hook, so a tagged process may not create them, even as
/// root (CAP_NET_RAW): nothing reaches the netns host and each attempt is in the audit trail. A packet socket is
/// refused at creation where the kernel runs BPF LSM programs; everywhere its frames are dropped at the device
/// (and the qdisc bypass that would skip that check is refused). The same scripts run untagged deliver their
/// datagrams, so the test would see them arrive.
pub fn raw_and_packet_sockets_of_a_tagged_root_process_are_refused_and_recorded(env: &mut Env) {
    env.need_daemon();
    let port = UDP_SINK.to_string();
    let before = env.udp_count(UDP_SINK);
    let mut recs = Vec::new();
    let (code, out, err) = as_root_in_tagged_cgroup(
        env,
        PROFILE,
        &[PYTHON, "-c", RAW_SOCKETS, &env.v4, &env.v6, &port],
        |cgroup| recs = wait_for_kernel_records(env, 2, |r| r["agent"]["cgroup"] == cgroup),
    );
    assert_eq!((code, out.trim()), (0, "eperm eperm"), "tagged: {err}");
    let (code, out, err) = run(&[PYTHON, "-c", RAW_SOCKETS, &env.v4, &env.v6, &port]);
    assert_eq!((code, out.trim()), (0, "sent sent"), "untagged: {err}");
    assert_eq!(
        settle_udp_count(env, before + 2),
        before + 2,
        "only the untagged datagrams arrive"
    );

    let veth = format!("enfh{}", env.id);
    let (_, peer_mac, _) = run(&[
        "ip",
        "netns",
        "exec",
        &env.netns,
        "cat",
        &format!("/sys/class/net/enfn{}/address", env.id),
    ]);
    let packet = [
        PYTHON,
        "-c",
        PACKET_SOCKET,
        veth.as_str(),
        peer_mac.trim(),
        env.host_v4.as_str(),
        env.v4.as_str(),
        port.as_str(),
    ];
    let mut packet_recs = Vec::new();
    let (code, out, err) = as_root_in_tagged_cgroup(env, PROFILE, &packet, |cgroup| {
        packet_recs = wait_for_kernel_records(env, 2, |r| r["agent"]["cgroup"] == cgroup)
    });
    assert!(
        code == 0 && ["eperm eperm", "eperm dropped"].contains(&out.trim()),
        "tagged packet socket: {out} {err}"
    );
    let methods: Vec<&str> = packet_recs
        .iter()
        .filter_map(|r| r["request"]["method"].as_str())
        .collect();
    assert!(
        methods == ["socket"] || methods == ["setsockopt", "transmit"],
        "{packet_recs:?}"
    );
    for rec in &packet_recs {
        assert_refusal(
            rec,
            rec["request"]["method"].as_str().unwrap_or_default(),
            PROFILE,
        );
    }
    let (code, out, err) = run(&packet);
    assert_eq!(
        (code, out.trim()),
        (0, "ok sent"),
        "untagged packet socket: {err}"
    );
    assert_eq!(
        settle_udp_count(env, before + 3),
        before + 3,
        "only the untagged frame arrives"
    );
    let kinds: Vec<&str> = recs
        .iter()
        .filter_map(|r| r["request"]["path"].as_str())
        .collect();
    assert_eq!(kinds, ["inet/raw/udp", "inet6/raw/udp"], "{recs:?}");
    for rec in &recs {
        assert_refusal(rec, "socket", PROFILE);
        assert_eq!(rec["agent"]["uid"], 0, "{rec}");
        assert!(rec["agent"]["pid"].as_u64().is_some(), "{rec}");
        assert_eq!(rec["request"]["count"], 1, "{rec}");
    }
    env.assert_audit_verifies();
}

/// ICMP echo through "ping" sockets (SOCK_DGRAM + IPPROTO_ICMP / ICMPV6, open to unprivileged users where
/// net.ipv4.ping_group_range allows it) to argv[1] (IPv4) and argv[2] (IPv6): `reply`, `eperm`, `noreply` or
/// `error:<errno>` for each.
const PING_SOCKETS: &str = r#"
import socket, struct, sys
out = []
for fam, proto, addr, typ in ((socket.AF_INET, socket.IPPROTO_ICMP, sys.argv[1], 8),
                              (socket.AF_INET6, socket.IPPROTO_ICMPV6, sys.argv[2], 128)):
    try:
        s = socket.socket(fam, socket.SOCK_DGRAM, proto)
        s.settimeout(3)
        s.sendto(struct.pack("!BBHHH", typ, 0, 0, 0, 1) + b"exfil", (addr, 0))
        s.recvfrom(64)
        out.append("reply")
    except PermissionError:
        out.append("eperm")
    except socket.timeout:
        out.append("noreply")
    except OSError as e:
        out.append("error:%d" % e.errno)
print(" ".join(out))
"#;

/// Restores a sysctl's value when dropped.
struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Sysctl {
    fn set(path: &str, value: &str) -> Sysctl {
        let path = PathBuf::from(path);
        let old = std::fs::read_to_string(&path).expect("read sysctl");
        std::fs::write(&path, value).expect("write sysctl");
        Sysctl { path, old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, self.old.trim());
    }
}

/// "Ping" sockets are datagram sockets neither the proxy nor the DNS stage carries: refused for a tagged process
/// (with every group allowed to open them for the test), while an untagged process gets its echo replies.
pub fn icmp_ping_sockets_of_a_tagged_process_are_refused(env: &mut Env) {
    env.need_daemon();
    let _range = Sysctl::set("/proc/sys/net/ipv4/ping_group_range", "0 2147483647");
    let (code, out, err) = run(&[PYTHON, "-c", PING_SOCKETS, &env.v4, &env.v6]);
    assert_eq!((code, out.trim()), (0, "reply reply"), "untagged: {err}");
    let before = kernel_records(env).len();
    let (code, out, err) = env.exec_tagged(&[PYTHON, "-c", PING_SOCKETS, &env.v4, &env.v6]);
    assert_eq!((code, out.trim()), (0, "eperm eperm"), "tagged: {err}");
    let recs = wait_for_kernel_records(env, before + 2, |_| true);
    let new = &recs[before..];
    let kinds: Vec<&str> = new
        .iter()
        .filter_map(|r| r["request"]["path"].as_str())
        .collect();
    assert_eq!(kinds, ["inet/dgram/icmp", "inet6/dgram/icmpv6"], "{new:?}");
    for rec in new {
        assert_refusal(rec, "socket", PROFILE);
    }
}

// ---- the daemon is not recognised by its pid ----

/// Run untagged as root: obtain process id argv[1] (the dead daemon's) through ns_last_pid, join the tagged cgroup
/// argv[2] with it, and connect to argv[3]:argv[4]. Prints `connected`, `refused` or `error <errno>`, or
/// `pid not obtained`.
const PID_REUSE: &str = r#"
import os, socket, sys
target, cgroup, host, port = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
for attempt in range(500):
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(target - 1))
    pid = os.fork()
    if pid == 0:
        if os.getpid() != target:
            os._exit(3)
        with open(cgroup + "/cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
        try:
            s = socket.create_connection((host, port), timeout=5)
            s.sendall(b"x")
            s.recv(1)
            print("connected", flush=True)
        except ConnectionRefusedError:
            print("refused", flush=True)
        except OSError as e:
            print("error", e.errno, flush=True)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if os.WEXITSTATUS(status) != 3:
        sys.exit(0)
print("pid not obtained")
sys.exit(1)
"#;

/// After the daemon dies its programs stay attached (fail closed): raw sockets are still refused, and a tagged
/// process that obtains the dead daemon's process id is still an agent: its connect is redirected to the dead proxy
/// port and refused, never sent out unaudited. The restarted daemon enforces again.
pub fn a_tagged_process_with_the_dead_daemons_pid_is_not_exempt(env: &mut Env) {
    env.need_daemon();
    let pid = env.daemon_pid().expect("daemon pid").to_string();
    env.kill_daemon().unwrap_or_else(|e| panic!("{e}"));
    let port = UDP_SINK.to_string();
    let (code, out, err) = as_root_in_tagged_cgroup(
        env,
        PROFILE,
        &[PYTHON, "-c", RAW_SOCKETS, &env.v4, &env.v6, &port],
        |_| {},
    );
    assert_eq!(
        (code, out.trim()),
        (0, "eperm eperm"),
        "raw sockets with the daemon dead: {err}"
    );
    let cgroup = env.profile_cgroup(PROFILE).join("pid-reuse");
    std::fs::create_dir_all(&cgroup).expect("cgroup");
    let (code, out, err) = run(&[
        PYTHON,
        "-c",
        PID_REUSE,
        &pid,
        cgroup.to_str().expect("utf-8"),
        &env.v4,
        &ECHO_ALLOWED.to_string(),
    ]);
    let _ = std::fs::remove_dir(&cgroup);
    let config = env.config.clone();
    env.restart_daemon(config)
        .unwrap_or_else(|e| panic!("restart: {e}"));
    assert_eq!(
        (code, out.trim()),
        (0, "refused"),
        "a tagged process with the daemon's pid {pid}: {err}"
    );
}

/// `enforcer cgroup tag` refuses the daemon's own cgroup (and so every ancestor of it), naming the daemon.
pub fn tagging_the_daemons_cgroup_is_refused(env: &mut Env) {
    env.need_daemon();
    let pid = env.daemon_pid().expect("daemon pid");
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("daemon cgroup");
    let rel = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("cgroup v2 line")
        .to_string();
    let out = Command::new(harness::enforcer_bin())
        .args(["cgroup", "tag", "--config"])
        .arg(&env.config)
        .args(["--profile", PROFILE, &rel])
        .output()
        .expect("enforcer cgroup tag");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        // Leave nothing tagged behind, then fail.
        let _ = Command::new(harness::enforcer_bin())
            .args(["cgroup", "untag", "--config"])
            .arg(&env.config)
            .arg(&rel)
            .output();
        panic!("tagging the daemon's cgroup {rel} succeeded");
    }
    assert!(
        stderr.contains("the enforcer daemon runs in"),
        "unclear refusal: {stderr}"
    );
}

// ---- inbound ----

/// A TCP listener: `bind` to argv[3]:argv[4] (argv[2]: `4` or `6`) then listen, or `listen` without binding (the
/// kernel picks the wildcard and a port). Prints `eperm` when refused, else `listening <port>`, then waits up to
/// argv[5] seconds for a connection and prints `accepted <first bytes>` or `none`.
const LISTENER: &str = r#"
import select, socket, sys
mode, fam, addr, port, wait = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET6 if fam == "6" else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    if mode == "bind":
        s.bind((addr, port))
    s.listen(8)
except PermissionError:
    print("eperm", flush=True)
    sys.exit(0)
print("listening %d" % s.getsockname()[1], flush=True)
if select.select([s], [], [], wait)[0]:
    c, _ = s.accept()
    c.settimeout(5)
    print("accepted " + c.recv(16).decode(), flush=True)
else:
    print("none", flush=True)
"#;

/// Connect to argv[1]:argv[2] (timeout argv[3] s) and send `hello`: `connected`, `timeout`, `refused` or `error`.
const CONNECT: &str = r#"
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    s.sendall(b"hello")
    print("connected")
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("error", e.errno)
"#;

/// A port free on the host right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Start LISTENER as an agent of `profile`; when it listens, have `client` (a command prefix: the netns host, or
/// nothing for this host) connect to `host` at its port. Returns (listener's first line, client's answer, listener's
/// last line).
fn listen_and_dial(
    env: &Env,
    profile: &str,
    listener: [&str; 4],
    client: &[&str],
    host: &str,
) -> (String, String, String) {
    let [mode, fam, addr, port] = listener;
    let mut child = env
        .exec_command_in(profile)
        .args([PYTHON, "-c", LISTENER, mode, fam, addr, port, "6"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("listener");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines
        .next()
        .and_then(Result::ok)
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut answer = String::new();
    if let Some(bound) = first.strip_prefix("listening ") {
        let mut cmd = client.to_vec();
        cmd.extend([PYTHON, "-c", CONNECT, host, bound, "3"]);
        answer = run(&cmd).1.trim().to_string();
    }
    let last = lines
        .map_while(Result::ok)
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    let _ = child.wait();
    (first, answer, last)
}

/// A tagged agent cannot serve other hosts: a bind with a port on a non-loopback address (the wildcard included)
/// is refused, and a listener it gets anyway (bound to the wildcard with port 0, or never bound: `listen()` picks
/// the wildcard itself) receives nothing from the netns host. Loopback serving still works. A profile configured to
/// serve (`accept_inbound`) can be reached. Every refusal is in the audit trail.
pub fn a_tagged_listener_is_unreachable_from_another_host_unless_its_profile_serves(env: &mut Env) {
    env.need_daemon();
    let netns = ["ip", "netns", "exec", env.netns.as_str()];
    let port = free_port().to_string();
    for (fam, addr) in [("4", env.host_v4.as_str()), ("4", "0.0.0.0"), ("6", "::")] {
        let (first, _, _) = listen_and_dial(env, PROFILE, ["bind", fam, addr, &port], &[], "");
        assert_eq!(first, "eperm", "bind {addr}:{port}");
    }
    let bind_recs = wait_for_kernel_records(env, 3, |r| {
        r["request"]["method"] == "bind" && r["request"]["port"].as_u64() == port.parse().ok()
    });
    assert_eq!(bind_recs.len(), 3, "{bind_recs:?}");
    for rec in &bind_recs {
        assert_refusal(rec, "bind", PROFILE);
        let want = if rec["request"]["ip"] == "::" {
            "inet6/stream/tcp"
        } else {
            "inet/stream/tcp"
        };
        assert_eq!(rec["request"]["path"], want, "{rec}");
    }
    let inbound_before =
        wait_for_kernel_records(env, 0, |r| r["request"]["method"] == "inbound").len();
    let cases = [
        (["bind", "4", "0.0.0.0", "0"], env.host_v4.as_str()),
        (["listen", "4", "", "0"], env.host_v4.as_str()),
        (["listen", "6", "", "0"], env.host_v6.as_str()),
    ];
    for (listener, host) in cases {
        let (first, answer, last) = listen_and_dial(env, PROFILE, listener, &netns, host);
        assert!(first.starts_with("listening "), "{listener:?}: {first}");
        assert_eq!(
            (answer.as_str(), last.as_str()),
            ("timeout", "none"),
            "{listener:?} reached from the netns host"
        );
    }
    let inbound = wait_for_kernel_records(env, inbound_before + 3, |r| {
        r["request"]["method"] == "inbound"
    });
    assert!(inbound.len() >= inbound_before + 3, "{inbound:?}");
    for rec in &inbound[inbound_before..] {
        assert_refusal(rec, "inbound", PROFILE);
        let ip = rec["request"]["ip"].as_str().unwrap_or_default();
        assert!(
            ip == env.v4 || ip == env.v6,
            "the netns host is the peer: {rec}"
        );
    }
    // Serving on loopback is fine.
    let (first, answer, last) = listen_and_dial(
        env,
        PROFILE,
        ["bind", "4", "127.0.0.1", "0"],
        &[],
        "127.0.0.1",
    );
    assert!(first.starts_with("listening "), "{first}");
    assert_eq!(
        (answer.as_str(), last.as_str()),
        ("connected", "accepted hello")
    );
    // A profile that serves can be reached from the netns host.
    let (first, answer, last) = listen_and_dial(
        env,
        SERVE_PROFILE,
        ["bind", "4", &env.host_v4, &port],
        &netns,
        &env.host_v4,
    );
    assert_eq!(first, format!("listening {port}"));
    assert_eq!(
        (answer.as_str(), last.as_str()),
        ("connected", "accepted hello")
    );
    env.assert_audit_verifies();
}

// ---- what a redirected socket reports ----

/// Connect to argv[1]:argv[2] with family argv[3] (`4`, `6`) and protocol argv[4] (`tcp`, `mptcp`); print the
/// peer address getpeername() reports.
const PEER: &str = r#"
import socket, sys
fam = socket.AF_INET6 if sys.argv[3] == "6" else socket.AF_INET
proto = socket.IPPROTO_MPTCP if sys.argv[4] == "mptcp" else socket.IPPROTO_TCP
s = socket.socket(fam, socket.SOCK_STREAM, proto)
s.settimeout(10)
s.connect((sys.argv[1], int(sys.argv[2])))
peer = s.getpeername()
print(peer[0], peer[1])
"#;

/// A redirected connection reports its original destination as its peer, not the proxy: curl's
/// `%{remote_ip} %{remote_port}` over IPv4 and IPv6, and getpeername() for IPv4-mapped IPv6 and MPTCP sockets.
pub fn getpeername_reports_the_original_destination(env: &mut Env) {
    env.need_daemon();
    for v6 in [false, true] {
        let resolve = env.resolve(API_HOST, 443, v6);
        let url = format!("https://{API_HOST}/allowed/getpeername");
        let (code, out, err) = env.exec_tagged(&[
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{remote_ip} %{remote_port}",
            "--resolve",
            &resolve,
            &url,
        ]);
        let want = format!("{} 443", if v6 { &env.v6 } else { &env.v4 });
        assert_eq!((code, out.trim()), (0, want.as_str()), "{err}");
    }
    let echo = ECHO_ALLOWED.to_string();
    let mapped = format!("::ffff:{}", env.v4);
    let cases = [
        (mapped.as_str(), "6", "tcp", format!("{mapped} {echo}")),
        (env.v4.as_str(), "4", "mptcp", format!("{} {echo}", env.v4)),
        (env.v6.as_str(), "6", "mptcp", format!("{} {echo}", env.v6)),
    ];
    for (addr, fam, proto, want) in cases {
        let (code, out, err) = env.exec_tagged(&[PYTHON, "-c", PEER, addr, &echo, fam, proto]);
        assert_eq!(
            (code, out.trim()),
            (0, want.as_str()),
            "{addr} {proto}: {err}"
        );
    }
}

// ---- other ways to connect ----

/// Reach argv[1]:argv[2] over TCP the way argv[3] says, send a line, print what comes back (`RECV <eof>` when the
/// connection is closed, `ERR <kind>` on an error):
/// - `fastopen`: no connect(), `sendto(MSG_FASTOPEN)` with the address (TCP Fast Open, RFC 7413);
/// - `fastopen_connect`: `TCP_FASTOPEN_CONNECT`, then connect() and send (the SYN goes with the first send);
/// - `reconnect`: connect to argv[4] (another port), dissolve it with connect(AF_UNSPEC), connect again;
/// - `mapped`: an IPv6 socket connecting to the IPv4-mapped address.
const CONNECT_WAYS: &str = r#"
import ctypes, signal, socket, sys
signal.alarm(15)
host, port, way = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fam = socket.AF_INET6 if way == "mapped" or ":" in host else socket.AF_INET
if way == "mapped":
    host = "::ffff:" + host
s = socket.socket(fam, socket.SOCK_STREAM)
line = b"ping-e2e\n"
try:
    if way == "fastopen":
        s.sendto(line, socket.MSG_FASTOPEN, (host, port))
    else:
        if way == "fastopen_connect":
            s.setsockopt(socket.IPPROTO_TCP, 30, 1)
        elif way == "reconnect":
            s.connect((host, int(sys.argv[4])))
            unspec = ctypes.create_string_buffer(28)
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.connect(s.fileno(), unspec, 28) != 0:
                raise OSError(ctypes.get_errno(), "connect(AF_UNSPEC)")
        s.connect((host, port))
        s.sendall(line)
    s.settimeout(10)
    data = s.recv(100)
    print("RECV " + (data.decode(errors="replace").strip() or "<eof>"))
except Exception as e:
    print("ERR " + type(e).__name__ + " " + str(e))
"#;

/// Every way to open a TCP connection goes through the connect hooks and so the proxy: TCP Fast Open (the address
/// on `sendto`), `TCP_FASTOPEN_CONNECT`, a connection dissolved with `connect(AF_UNSPEC)` and made again to
/// another port, and an IPv6 socket to an IPv4-mapped address. To the blocked echo port each is closed by the proxy
/// and recorded as raw TCP to that port; untagged, the same port echoes.
pub fn other_ways_to_connect_are_captured_too(env: &mut Env) {
    env.need_daemon();
    let blocked = ECHO_BLOCKED.to_string();
    let allowed = ECHO_ALLOWED.to_string();
    for (addr, way) in [
        (env.v4.clone(), "fastopen"),
        (env.v6.clone(), "fastopen"),
        (env.v4.clone(), "fastopen_connect"),
        (env.v4.clone(), "reconnect"),
        (env.v6.clone(), "reconnect"),
        (env.v4.clone(), "mapped"),
    ] {
        let before = blocked_tcp_records(env);
        let args = [PYTHON, "-c", CONNECT_WAYS, &addr, &blocked, way, &allowed];
        let (code, out, err) = env.exec_tagged(&args);
        let out = out.trim();
        assert!(
            code == 0 && (out == "RECV <eof>" || out.starts_with("ERR ConnectionResetError")),
            "{way} to {addr}: code {code} out {out:?} err {err}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while blocked_tcp_records(env) == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            blocked_tcp_records(env),
            before + 1,
            "{way} to {addr}: one record"
        );
        let (code, out, err) = run(&[PYTHON, "-c", CONNECT_WAYS, &addr, &blocked, way, &allowed]);
        assert_eq!(
            (code, out.trim()),
            (0, "RECV ping-e2e"),
            "{way} to {addr} untagged: {err}"
        );
    }
}

/// How many raw TCP connections to the blocked echo port the audit trail holds.
fn blocked_tcp_records(env: &Env) -> usize {
    env.audit_records()
        .iter()
        .filter(|r| r["request"]["scheme"] == "tcp" && r["request"]["port"] == ECHO_BLOCKED)
        .count()
}

// ---- origins ----

/// Connect straight to the proxy port argv[2] on argv[1], send a byte, wait for the close; print `closed`, then wait
/// for stdin to close (so the test can read the agent's pid, as the host sees it, from the run's cgroup).
const TO_PROXY: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"x")
try:
    s.recv(1)
except OSError:
    pass
print("closed", flush=True)
sys.stdin.read()
"#;

/// A tagged connect straight to the proxy port has no original destination and is refused, but the record names
/// the agent that made it (IPv4 and IPv6): its pid as the host sees it (the agent, in its own PID namespace, sees
/// another), read from the run's cgroup while the agent still runs.
pub fn a_connect_straight_to_the_proxy_is_recorded_with_its_agent(env: &mut Env) {
    env.need_daemon();
    let port = env.port.to_string();
    for host in ["127.0.0.1", "::1"] {
        let mut exec = env.exec_command();
        exec.args([PYTHON, "-c", TO_PROXY, host, &port])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = exec.spawn().expect("enforcer exec");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read");
        assert_eq!(line.trim(), "closed", "{line}");
        let procs = env
            .profile_cgroup(PROFILE)
            .join(format!("exec-{}", child.id()))
            .join("cgroup.procs");
        let pids: Vec<u64> = std::fs::read_to_string(&procs)
            .unwrap_or_else(|e| panic!("{}: {e}", procs.display()))
            .lines()
            .map(|l| l.parse().expect("pid"))
            .collect();
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("wait");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(pids.len(), 1, "the run's processes: {pids:?}");
        let pid = pids[0];
        let deadline = Instant::now() + Duration::from_secs(10);
        let rec = loop {
            let found = env
                .audit_records()
                .into_iter()
                .find(|r| r["agent"]["pid"].as_u64() == Some(pid));
            if let Some(rec) = found {
                break rec;
            }
            assert!(Instant::now() < deadline, "no record names pid {pid}");
            std::thread::sleep(Duration::from_millis(200));
        };
        assert_eq!(rec["decision"]["reason"], "bad_request", "{rec}");
        assert_eq!(rec["outcome"]["disposition"], "blocked", "{rec}");
        assert_eq!(rec["agent"]["profile"], PROFILE, "{rec}");
    }
}

/// Two sockets bound to the same port on 127.0.0.2 and 127.0.0.3 connect to the allowed (argv[2]) and the blocked
/// (argv[3]) echo ports of argv[1]; print `connected`, then on a line from stdin send `ping` on both and print what
/// each got back (`closed` when nothing).
const SAME_PORT: &str = r#"
import socket, sys
host, allowed, blocked = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print("started", flush=True)
sys.stdin.readline()
a = socket.socket()
a.bind(("127.0.0.2", 0))
b = socket.socket()
b.bind(("127.0.0.3", a.getsockname()[1]))
for s, port in ((a, allowed), (b, blocked)):
    s.settimeout(15)
    s.connect((host, port))
print("connected", flush=True)
sys.stdin.readline()
out = []
for s in (a, b):
    try:
        s.sendall(b"ping")
        out.append(s.recv(4).decode() or "closed")
    except OSError:
        out.append("closed")
print(" ".join(out), flush=True)
"#;

/// Resumes a stopped process when dropped.
struct Stopped(i32);

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the daemon's pid, which the harness has not reaped.
        unsafe {
            libc::kill(self.0, libc::SIGCONT);
        }
    }
}

/// The kernel files a redirected connection under the client's full local address. Two connections from the same
/// port on different loopback addresses, both established before the proxy looks either up (the daemon is stopped
/// meanwhile, after `enforcer exec` has registered the run and started the client), each get their own original
/// destination: the allowed one echoes, the blocked one is closed.
pub fn origins_are_keyed_by_the_full_local_address(env: &mut Env) {
    env.need_daemon();
    let pid = i32::try_from(env.daemon_pid().expect("daemon pid")).expect("pid");
    let mut child = env
        .exec_command()
        .args([
            PYTHON,
            "-c",
            SAME_PORT,
            &env.v4,
            &ECHO_ALLOWED.to_string(),
            &ECHO_BLOCKED.to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("client");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut stdin = child.stdin.take().expect("stdin");
    let started = lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(started.trim(), "started");
    let answer = {
        // SAFETY: kill(2) on the daemon's pid, which the harness has not reaped.
        unsafe {
            libc::kill(pid, libc::SIGSTOP);
        }
        let stopped = Stopped(pid);
        stdin.write_all(b"connect\n").expect("connect");
        let connected = lines.next().and_then(Result::ok).unwrap_or_default();
        assert_eq!(connected.trim(), "connected");
        drop(stopped);
        stdin.write_all(b"go\n").expect("go");
        lines.next().and_then(Result::ok).unwrap_or_default()
    };
    let _ = child.wait();
    assert_eq!(answer.trim(), "ping closed");
}

/// `enforcer exec` fails closed when the daemon runs but does not answer its registration (here it is stopped):
/// after the control socket's 30 s it refuses to start the agent, rather than starting a run the daemon would later
/// decide without the person it acts for. Once the daemon answers again, exec starts agents again.
pub fn exec_starts_no_agent_a_stopped_daemon_cannot_register(env: &mut Env) {
    env.need_daemon();
    let pid = i32::try_from(env.daemon_pid().expect("daemon pid")).expect("pid");
    let (code, out, err) = {
        // SAFETY: kill(2) on the daemon's pid, which the harness has not reaped.
        unsafe {
            libc::kill(pid, libc::SIGSTOP);
        }
        let _stopped = Stopped(pid);
        env.exec_tagged(&["echo", "the agent ran"])
    };
    assert_eq!(
        (code, out.as_str()),
        (2, ""),
        "enforcer exec started an agent the stopped daemon did not register: {err}"
    );
    assert!(
        err.contains("the agent is not started") && err.contains("did not answer within 30 s"),
        "{err}"
    );
    let (code, out, err) = env.exec_tagged(&["echo", "the agent ran"]);
    assert_eq!((code, out.trim()), (0, "the agent ran"), "{err}");
}

// ---- the refusal channel ----

/// Send argv[3] UDP datagrams to argv[1]:argv[2] (not DNS), counting the refused ones.
const UDP_FLOOD: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
refused = 0
for _ in range(int(sys.argv[3])):
    try:
        s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
    except PermissionError:
        refused += 1
print(refused)
"#;

/// An agent that makes the kernel refuse it in a loop cannot flood the trail: a handful of records per second carry
/// the details (here: the datagram's destination), the rest are counted, and the counts add up to every refusal.
pub fn kernel_refusals_are_rate_bounded_and_counted(env: &mut Env) {
    env.need_daemon();
    const N: u64 = 3000;
    let before = env.udp_count(UDP_SINK);
    let port = UDP_SINK.to_string();
    let mut recs = Vec::new();
    let (code, out, err) = as_root_in_tagged_cgroup(
        env,
        PROFILE,
        &[PYTHON, "-c", UDP_FLOOD, &env.v4, &port, &N.to_string()],
        |cgroup| {
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                recs = kernel_records(env)
                    .into_iter()
                    .filter(|r| r["agent"]["cgroup"] == cgroup)
                    .collect();
                let total: u64 = recs
                    .iter()
                    .filter_map(|r| r["request"]["count"].as_u64())
                    .sum();
                if total >= N || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        },
    );
    assert_eq!((code, out.trim()), (0, N.to_string().as_str()), "{err}");
    assert_eq!(
        env.udp_count(UDP_SINK),
        before,
        "a refused datagram arrived"
    );
    let total: u64 = recs
        .iter()
        .filter_map(|r| r["request"]["count"].as_u64())
        .sum();
    assert_eq!(total, N, "the counts add up to every refusal: {recs:?}");
    assert!(
        recs.len() <= 40,
        "{} records for {N} refusals: not rate-bounded",
        recs.len()
    );
    let detailed: Vec<_> = recs
        .iter()
        .filter(|r| r["request"]["ip"].is_string())
        .collect();
    assert!(!detailed.is_empty(), "{recs:?}");
    for rec in &recs {
        assert_refusal(rec, "sendmsg", PROFILE);
    }
    for rec in detailed {
        assert_eq!(rec["request"]["ip"], env.v4.as_str(), "{rec}");
        assert_eq!(rec["request"]["port"], UDP_SINK, "{rec}");
        assert_eq!(rec["request"]["path"], "inet/dgram/udp", "{rec}");
    }
    env.assert_audit_verifies();
}
