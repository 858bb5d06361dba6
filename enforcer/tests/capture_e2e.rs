//! Privileged end-to-end tests of the capture stage on the real kernel: the eBPF programs attach to a cgroup of
//! their own (unique name under the cgroup v2 root), real processes connect from tagged and untagged child cgroups,
//! and a loopback listener stands in for the proxy. Needs root; without it the tests are skipped, unless `CI` is
//! set, where skipping would hide a broken pipeline, so they fail.
//!
//! A [`Harness`] guard removes the cgroups (killing stray processes), detaches the programs and removes the pins
//! even when an assertion fails.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use enforcer::capture::{Capture, CaptureConfig, CaptureProfile, TagTable};

const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";
const PROFILE: &str = "agents";
const TIMEOUT: Duration = Duration::from_secs(10);

/// Connects argv[2]:argv[3] after joining the cgroup argv[1] (`-`: stay); sends one byte, waits for one byte back.
const CLIENT: &str = r#"
import os, socket, sys
if sys.argv[1] != "-":
    open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
host, port = sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM)
s.settimeout(10)
s.connect((host, port))
s.sendall(b"x")
s.recv(1)
"#;

/// Opens 40 connections in parallel to 127.0.0.2:(20000+i); each sends its port as text and waits for a byte.
const PARALLEL: &str = r#"
import os, socket, sys, threading
open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
errors = []
def one(i):
    try:
        port = 20000 + i
        s = socket.create_connection(("127.0.0.2", port), timeout=10)
        s.sendall(b"%05d" % port)
        s.recv(1)
    except Exception as e:
        errors.append(repr(e))
threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
[t.start() for t in threads]
[t.join() for t in threads]
sys.exit(1 if errors else 0)
"#;

/// UDP: prints `<target>:<port>:<op>=ok|eperm` for connect() and sendto() to ports 443 (QUIC), 4443 and 53 (DNS)
/// over IPv4, IPv6 and IPv4-mapped IPv6. Nobody listens; a UDP send succeeds without a listener.
const UDP: &str = r#"
import os, socket, sys
open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
out = []
for name, fam, host in (("v4", socket.AF_INET, "127.0.0.2"), ("v6", socket.AF_INET6, "::1"),
                        ("mapped", socket.AF_INET6, "::ffff:127.0.0.2")):
    for port in (443, 4443, 53):
        for op in ("connect", "sendto"):
            s = socket.socket(fam, socket.SOCK_DGRAM)
            try:
                if op == "connect":
                    s.connect((host, port))
                else:
                    s.sendto(b"q", (host, port))
                r = "ok"
            except PermissionError:
                r = "eperm"
            out.append("%s:%d:%s=%s" % (name, port, op, r))
print(" ".join(out))
"#;

/// Move into argv[1], then bind each address at port argv[2] (TCP and UDP, loopback and the wildcard) and a
/// loopback address at port argv[3]: `ok` or `eperm` for each.
const BIND: &str = r#"
import os, socket, sys
open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
out = []
for port in (int(sys.argv[2]), int(sys.argv[3])):
    for name, fam, host in (("v4", socket.AF_INET, "127.0.0.1"), ("v6", socket.AF_INET6, "::1"),
                            ("any", socket.AF_INET, "0.0.0.0")):
        for kind, typ in (("tcp", socket.SOCK_STREAM), ("udp", socket.SOCK_DGRAM)):
            s = socket.socket(fam, typ)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                r = "ok"
            except PermissionError:
                r = "eperm"
            s.close()
            out.append("%s/%s=%s" % (name, kind, r))
print(" ".join(out))
"#;

/// Move into argv[1], then send UDP datagrams to 127.0.0.2:9 for argv[2] seconds, as fast as it can; print how many
/// sends passed and how many were refused.
const UDP_LOOP: &str = r#"
import os, socket, sys, time
open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ok = refused = 0
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        s.sendto(b"x", ("127.0.0.2", 9))
        ok += 1
    except PermissionError:
        refused += 1
print(ok, refused)
"#;

/// What [`UDP`] prints when every port but 53 is refused (`tagged`) or nothing is (`!tagged`).
fn udp_expected(tagged: bool) -> String {
    let mut out = Vec::new();
    for name in ["v4", "v6", "mapped"] {
        for port in [443, 4443, 53] {
            for op in ["connect", "sendto"] {
                let r = if tagged && port != 53 { "eperm" } else { "ok" };
                out.push(format!("{name}:{port}:{op}={r}"));
            }
        }
    }
    out.join(" ")
}

/// DNS over UDP to argv[2] port 53 with sendto() or connect()+send() (argv[3]); prints the reply's source address,
/// port and payload, or `noreply` (1 s timeout, or any error).
const DNS_CLIENT: &str = r#"
import os, socket, sys
open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
host, op = sys.argv[2], sys.argv[3]
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.settimeout(float(sys.argv[4]))
try:
    if op == "connect":
        s.connect((host, 53))
        s.send(b"q")
    else:
        s.sendto(b"q", (host, 53))
    data, src = s.recvfrom(100)
    print(src[0], src[1], data.decode())
except Exception:
    print("noreply")
"#;

fn root_or_skip() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("capture e2e tests need root and CI is set: refusing to skip");
    }
    println!("skipped: needs root");
    false
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Everything logged through `tracing` by this test binary (the kernel programs' aya-log records included).
static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logs() -> Arc<Mutex<Vec<u8>>> {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        tracing_subscriber::fmt()
            .with_env_filter("enforcer=debug")
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .init();
        buf
    })
    .clone()
}

/// Wait until the log contains `needle`.
fn logged(needle: &str) -> bool {
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        let text = String::from_utf8_lossy(
            &logs()
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
        .into_owned();
        if text.contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// One test's world: its cgroup tree, pin dir, proxy listeners and the attached capture. Dropping cleans all up.
struct Harness {
    runtime: tokio::runtime::Runtime,
    capture: Option<Capture>,
    /// The cgroup the programs attach to (absolute).
    cgroup: PathBuf,
    /// Its name relative to the cgroup root, with a leading `/`.
    rel: String,
    pin_dir: PathBuf,
    proxy4: TcpListener,
    proxy6: TcpListener,
    /// A free port given to the capture as one of the daemon's (`CaptureConfig::daemon_ports`).
    daemon_port: u16,
}

impl Harness {
    fn new() -> Harness {
        logs();
        let name = format!(
            "enforcer-test-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let cgroup = Path::new(CGROUP_ROOT).join(&name);
        std::fs::create_dir(&cgroup).expect("create test cgroup");
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{name}"));
        let (proxy4, proxy6) = loopback_pair();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let mut h = Harness {
            runtime,
            capture: None,
            cgroup,
            rel: format!("/{name}"),
            pin_dir,
            proxy4,
            proxy6,
            daemon_port: free_port(),
        };
        h.start_capture();
        h
    }

    /// Start (or restart) the capture on this harness's cgroup, pins and proxy port.
    fn start_capture(&mut self) {
        let cfg = CaptureConfig {
            cgroup_root: PathBuf::from(CGROUP_ROOT),
            attach_cgroup: self.cgroup.clone(),
            pin_dir: self.pin_dir.clone(),
            proxy_port: self.proxy_port(),
            dns_port: self.proxy_port(),
            daemon_ports: vec![self.daemon_port],
            profiles: vec![CaptureProfile::new(PROFILE)],
        };
        let capture = {
            let _enter = self.runtime.enter();
            Capture::start(&cfg).expect("capture starts")
        };
        self.capture = Some(capture);
    }

    fn capture(&self) -> &Capture {
        self.capture.as_ref().expect("capture running")
    }

    fn proxy_port(&self) -> u16 {
        self.proxy4.local_addr().expect("addr").port()
    }

    /// `<test>/enforcer/agents`: created and tagged by `Capture::start`.
    fn profile_cgroup(&self) -> PathBuf {
        self.cgroup.join("enforcer").join(PROFILE)
    }

    /// Create a cgroup below the test cgroup (path relative to it).
    fn child_cgroup(&self, rel: &str) -> PathBuf {
        let path = self.cgroup.join(rel);
        std::fs::create_dir_all(&path).expect("create child cgroup");
        path
    }

    /// Accept the next connection on either proxy listener.
    fn accept_proxy(&self) -> Option<(TcpStream, SocketAddr)> {
        accept_any(&[&self.proxy4, &self.proxy6], TIMEOUT)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(capture) = self.capture.take() {
            if let Err(err) = capture.shutdown() {
                eprintln!("capture shutdown: {err}");
            }
        }
        remove_cgroup_tree(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// Kill everything in a cgroup tree and remove it, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    let deadline = Instant::now() + Duration::from_secs(3);
    while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Non-blocking listeners on 127.0.0.1 and ::1 with the same port.
/// A port nothing listens on now (TCP on 127.0.0.1).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn loopback_pair() -> (TcpListener, TcpListener) {
    for _ in 0..50 {
        let v4 = TcpListener::bind("127.0.0.1:0").expect("bind v4");
        let port = v4.local_addr().expect("addr").port();
        if let Ok(v6) = TcpListener::bind(("::1", port)) {
            v4.set_nonblocking(true).expect("nonblocking");
            v6.set_nonblocking(true).expect("nonblocking");
            return (v4, v6);
        }
    }
    panic!("no free port on both 127.0.0.1 and ::1");
}

fn accept_any(listeners: &[&TcpListener], timeout: Duration) -> Option<(TcpStream, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    loop {
        for l in listeners {
            match l.accept() {
                Ok((stream, peer)) => {
                    stream.set_nonblocking(false).expect("blocking");
                    stream
                        .set_read_timeout(Some(TIMEOUT))
                        .expect("read timeout");
                    return Some((stream, peer));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn python(script: &str, args: &[&str]) -> Child {
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs")
}

fn finish(child: Child) -> String {
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "client failed: {:?}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Serve one client connection: read its byte, answer, so it exits.
fn answer(mut stream: TcpStream) {
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).expect("client byte");
    stream.write_all(b"y").expect("answer");
}

/// A tagged client connecting to `host:port` lands on the proxy, and the lookup returns what it really dialled.
fn assert_redirected(
    h: &Harness,
    cgroup: &Path,
    host: &str,
    port: u16,
    expect_dst: SocketAddr,
) -> u32 {
    let child = python(
        CLIENT,
        &[cgroup.to_str().expect("utf-8"), host, &port.to_string()],
    );
    let pid = child.id();
    let (stream, peer) = h.accept_proxy().expect("tagged connect reaches the proxy");
    let origin = h
        .capture()
        .origins()
        .lookup(peer)
        .expect("origin recorded for the redirected connection");
    assert_eq!(
        origin.dst, expect_dst,
        "original destination of {host}:{port}"
    );
    assert_eq!(origin.agent.pid, Some(pid));
    assert_eq!(origin.agent.uid, Some(0));
    assert_eq!(origin.agent.profile.as_deref(), Some(PROFILE));
    let rel = format!(
        "{}/{}",
        h.rel,
        cgroup
            .strip_prefix(&h.cgroup)
            .expect("below test cgroup")
            .display()
    );
    assert_eq!(origin.agent.cgroup.as_deref(), Some(rel.as_str()));
    assert!(
        origin
            .agent
            .exe
            .as_deref()
            .is_some_and(|e| e.contains("python")),
        "exe: {:?}",
        origin.agent.exe
    );
    // The entry is consumed by the lookup.
    assert_eq!(h.capture().origins().lookup(peer), None);
    answer(stream);
    finish(child);
    pid
}

#[test]
fn tagged_connects_are_redirected_with_their_origin() {
    if !root_or_skip() {
        return;
    }
    let h = Harness::new();
    // A nested cgroup inherits the profile of its tagged ancestor.
    let client = h.child_cgroup("enforcer/agents/client");
    let ip2: IpAddr = "127.0.0.2".parse().expect("ip");
    let pid4 = assert_redirected(&h, &client, "127.0.0.2", 9, SocketAddr::new(ip2, 9));
    // IPv4-mapped IPv6 is reported as the IPv4 address it names.
    let pid6 = assert_redirected(&h, &client, "::ffff:127.0.0.2", 9, SocketAddr::new(ip2, 9));
    assert_redirected(&h, &client, "::1", 9, "[::1]:9".parse().expect("addr"));
    // The kernel programs' aya-log records reach the daemon's tracing log.
    assert!(
        logged(&format!("connect4 redirected: pid {pid4} port 9")),
        "kernel log (v4) not forwarded"
    );
    assert!(
        logged(&format!("connect6 redirected: pid {pid6} port 9")),
        "kernel log (v6) not forwarded"
    );
    assert_redirected(
        &h,
        &h.profile_cgroup(),
        "127.0.0.2",
        80,
        SocketAddr::new(ip2, 80),
    );

    // A direct connect to the proxy port is recorded with the proxy as its destination, so the proxy (which refuses
    // it: it has no original destination) can name the agent.
    let port = h.proxy_port();
    for host in ["127.0.0.1", "::1"] {
        let child = python(
            CLIENT,
            &[client.to_str().expect("utf-8"), host, &port.to_string()],
        );
        let (stream, peer) = h.accept_proxy().expect("direct connect to the proxy");
        let origin = h
            .capture()
            .origins()
            .lookup(peer)
            .expect("a direct connect is recorded");
        assert_eq!(origin.dst, SocketAddr::new(host.parse().expect("ip"), port));
        assert_eq!(origin.agent.pid, Some(child.id()));
        assert_eq!(origin.agent.profile.as_deref(), Some(PROFILE));
        answer(stream);
        finish(child);
    }
}

#[test]
fn untagged_processes_are_not_redirected() {
    if !root_or_skip() {
        return;
    }
    let h = Harness::new();
    let plain = h.child_cgroup("plain");
    let upstream = TcpListener::bind("127.0.0.2:0").expect("bind upstream");
    upstream.set_nonblocking(true).expect("nonblocking");
    let port = upstream.local_addr().expect("addr").port();
    let child = python(
        CLIENT,
        &[
            plain.to_str().expect("utf-8"),
            "127.0.0.2",
            &port.to_string(),
        ],
    );
    let (stream, _) =
        accept_any(&[&upstream], TIMEOUT).expect("untagged connect reaches its destination");
    answer(stream);
    finish(child);
    assert!(
        accept_any(&[&h.proxy4, &h.proxy6], Duration::from_millis(200)).is_none(),
        "the proxy saw an untagged connection"
    );
}

#[test]
fn parallel_connects_resolve_to_their_own_destination() {
    if !root_or_skip() {
        return;
    }
    let h = Harness::new();
    let child = python(PARALLEL, &[h.profile_cgroup().to_str().expect("utf-8")]);
    let mut streams = Vec::new();
    for _ in 0..40 {
        let (mut stream, peer) = h.accept_proxy().expect("all 40 connects reach the proxy");
        let origin = h
            .capture()
            .origins()
            .lookup(peer)
            .expect("origin for every connection");
        let mut said = [0u8; 5];
        stream.read_exact(&mut said).expect("client names its port");
        let said: u16 = std::str::from_utf8(&said)
            .expect("ascii")
            .parse()
            .expect("port");
        assert_eq!(origin.dst, SocketAddr::from(([127, 0, 0, 2], said)));
        streams.push(stream);
    }
    for mut s in streams {
        s.write_all(b"y").expect("answer");
    }
    finish(child);
}

#[test]
fn tagging_and_untagging_take_effect_at_runtime() {
    if !root_or_skip() {
        return;
    }
    let h = Harness::new();
    let rt = h.child_cgroup("runtime");
    let upstream = TcpListener::bind("127.0.0.2:0").expect("bind upstream");
    upstream.set_nonblocking(true).expect("nonblocking");
    let port = upstream.local_addr().expect("addr").port();
    let dial = |expect_proxy: bool| {
        let child = python(
            CLIENT,
            &[rt.to_str().expect("utf-8"), "127.0.0.2", &port.to_string()],
        );
        let (listener_hit, (stream, peer)) = loop {
            if let Some(hit) = accept_any(&[&upstream], Duration::from_millis(5)) {
                break (false, hit);
            }
            if let Some(hit) = accept_any(&[&h.proxy4, &h.proxy6], Duration::from_millis(5)) {
                break (true, hit);
            }
        };
        if listener_hit {
            let origin = h.capture().origins().lookup(peer).expect("origin");
            assert_eq!(origin.agent.profile.as_deref(), Some("late"));
        }
        answer(stream);
        finish(child);
        assert_eq!(listener_hit, expect_proxy);
    };
    dial(false);
    h.capture().tag(&rt, "late").expect("tag at runtime");
    dial(true);
    // Untag through the pinned map, as `enforcer cgroup untag` does from another process.
    let mut pinned = TagTable::open_pinned(&h.pin_dir, Path::new(CGROUP_ROOT)).expect("pinned map");
    assert_eq!(
        pinned.direct_profile(&rt).expect("lookup").as_deref(),
        Some("late")
    );
    pinned.untag(&rt).expect("untag");
    dial(false);
    // Tag through the pin with a relative path, then untag through the API.
    let rel = rt.strip_prefix(CGROUP_ROOT).expect("below root");
    pinned.tag(rel, "late").expect("tag via pin");
    dial(true);
    h.capture().untag(&rt).expect("untag");
    dial(false);
}

/// The daemon's ports cannot be bound by a tagged process on any address, loopback included (else, while the
/// daemon restarts, an agent holding its proxy or DNS port would be sent every other agent's redirected traffic);
/// other loopback ports can, and an untagged process binds the daemon's ports as before.
#[test]
fn the_daemons_ports_cannot_be_bound_by_tagged_processes() {
    if !root_or_skip() {
        return;
    }
    let h = Harness::new();
    let other = free_port();
    let run = |cgroup: &Path, port: u16| {
        let args = [
            cgroup.to_str().expect("utf-8").to_string(),
            port.to_string(),
            other.to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        finish(python(BIND, &args))
    };
    // What BIND prints: for a tagged process, the daemon's port refused everywhere, the other port on loopback
    // only (a bind of the wildcard with a port is a server's, refused unless the profile serves).
    let expected = |tagged: bool| {
        let mut out = Vec::new();
        for daemons in [true, false] {
            for name in ["v4", "v6", "any"] {
                for kind in ["tcp", "udp"] {
                    let refused = tagged && (daemons || name == "any");
                    out.push(format!(
                        "{name}/{kind}={}",
                        if refused { "eperm" } else { "ok" }
                    ));
                }
            }
        }
        out.join(" ")
    };
    let tagged = h.profile_cgroup();
    assert_eq!(run(&tagged, h.daemon_port).trim(), expected(true));
    let plain = h.child_cgroup("plain");
    assert_eq!(run(&plain, h.daemon_port).trim(), expected(false));
}

#[test]
fn udp_from_tagged_cgroups_is_refused_except_dns() {
    if !root_or_skip() {
        return;
    }
    let h = Harness::new();
    let tagged = finish(python(UDP, &[h.profile_cgroup().to_str().expect("utf-8")]));
    assert_eq!(tagged.trim(), udp_expected(true));
    assert!(logged("sendmsg4 refused: port 443"));
    assert!(logged("connect4 refused: port 4443"));
    let plain = finish(python(
        UDP,
        &[h.child_cgroup("plain").to_str().expect("utf-8")],
    ));
    assert_eq!(plain.trim(), udp_expected(false));
}

#[test]
fn tagged_dns_is_redirected_and_replies_come_from_the_resolver() {
    if !root_or_skip() {
        return;
    }
    let h = Harness::new();
    // The stand-in DNS listener: the capture was started with DNS_PORT = the proxy's port number (UDP here).
    let port = h.proxy_port();
    let listeners: Vec<std::net::UdpSocket> = ["127.0.0.1", "::1"]
        .iter()
        .map(|ip| {
            let s = std::net::UdpSocket::bind((*ip, port)).expect("bind the DNS stand-in");
            s.set_nonblocking(true).expect("nonblocking");
            s
        })
        .collect();
    let tagged = h.profile_cgroup();
    let cases = [
        ("127.0.0.2", "sendto", "127.0.0.2"),
        ("127.0.0.2", "connect", "127.0.0.2"),
        ("::1", "sendto", "::1"),
        ("::1", "connect", "::1"),
        ("::ffff:127.0.0.2", "sendto", "127.0.0.2"),
        ("::ffff:127.0.0.2", "connect", "127.0.0.2"),
    ];
    for (host, op, resolver) in cases {
        let mut child = python(
            DNS_CLIENT,
            &[tagged.to_str().expect("utf-8"), host, op, "10"],
        );
        let deadline = Instant::now() + TIMEOUT;
        let mut seen = None;
        while seen.is_none() && Instant::now() < deadline {
            for l in &listeners {
                let mut buf = [0u8; 16];
                if let Ok((n, peer)) = l.recv_from(&mut buf) {
                    assert_eq!(&buf[..n], b"q");
                    let origin = h.capture().dns_origins().lookup(peer);
                    l.send_to(b"r", peer).expect("reply");
                    seen = Some(origin);
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if seen.is_none() {
            let _ = child.kill();
        }
        let out = finish(child);
        let origin = seen
            .unwrap_or_else(|| panic!("{host} {op}: nothing reached the DNS listener"))
            .unwrap_or_else(|| panic!("{host} {op}: no DNS origin recorded"));
        assert_eq!(
            origin.dst,
            SocketAddr::new(resolver.parse::<IpAddr>().expect("ip"), 53),
            "{host} {op}"
        );
        assert_eq!(origin.agent.profile.as_deref(), Some(PROFILE));
        assert_eq!(
            out.trim(),
            format!("{host} 53 r"),
            "{host} {op}: reply source restored"
        );
    }
    // Untagged DNS is not redirected: the stand-in hears nothing.
    let plain = h.child_cgroup("plain");
    let out = finish(python(
        DNS_CLIENT,
        &[plain.to_str().expect("utf-8"), "127.0.0.2", "sendto", "1"],
    ));
    assert_eq!(out.trim(), "noreply");
    for l in &listeners {
        let mut buf = [0u8; 16];
        assert!(
            l.recv_from(&mut buf).is_err(),
            "untagged DNS reached the listener"
        );
    }
}

#[test]
fn shutdown_leaves_no_trace() {
    if !root_or_skip() {
        return;
    }
    let mut h = Harness::new();
    let pin = h.pin_dir.join("TAGGED");
    assert!(pin.exists());
    let capture = h.capture.take().expect("capture");
    capture.shutdown().expect("shutdown");
    assert!(!pin.exists(), "pin removed");
    assert!(!h.pin_dir.exists(), "pin dir removed");
    assert!(
        !h.cgroup.join("enforcer").exists(),
        "profile cgroups removed"
    );
    // No program is attached any more: a connect from the former profile cgroup goes where it was sent.
    let cg = h.child_cgroup("after");
    let upstream = TcpListener::bind("127.0.0.2:0").expect("bind upstream");
    upstream.set_nonblocking(true).expect("nonblocking");
    let port = upstream.local_addr().expect("addr").port();
    let child = python(
        CLIENT,
        &[cg.to_str().expect("utf-8"), "127.0.0.2", &port.to_string()],
    );
    let (stream, _) = accept_any(&[&upstream], TIMEOUT).expect("direct connect");
    answer(stream);
    finish(child);
}

/// A daemon that starts while agents run takes the earlier daemon's links over one by one (each made to run the new
/// program at once): a tagged process sending datagrams all through three restarts is refused every time, never let
/// through in between (before, the old links were removed and the new programs attached after, and a tagged send in
/// that gap passed).
#[test]
fn restarts_leave_no_moment_unenforced() {
    if !root_or_skip() {
        return;
    }
    let mut h = Harness::new();
    let pins = |h: &Harness| {
        let mut names: Vec<String> = std::fs::read_dir(&h.pin_dir)
            .expect("pin dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            // Devices come and go with the tests running beside this one: their links with them.
            .filter(|n| !n.starts_with("link_device_egress_"))
            .collect();
        names.sort();
        names
    };
    let first = pins(&h);
    assert!(first.iter().any(|p| p == "link_udp_sendmsg4"), "{first:?}");
    let agents = h.profile_cgroup();
    let sender = python(UDP_LOOP, &[agents.to_str().expect("utf-8"), "6"]);
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        h.capture
            .take()
            .expect("capture")
            .shutdown()
            .expect("shutdown");
        assert!(
            h.pin_dir.join("link_udp_sendmsg4").exists(),
            "the programs stay attached while an agent runs"
        );
        h.start_capture();
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = finish(sender);
    let counts: Vec<u64> = out
        .split_whitespace()
        .map(|n| n.parse().expect("count"))
        .collect();
    assert_eq!(counts[0], 0, "tagged datagrams let through: {out}");
    assert!(counts[1] > 0, "{out}");
    // The same pins as the first daemon's: every program's link taken over, none left over or missing (the devices'
    // links aside).
    assert_eq!(pins(&h), first);
}

#[test]
fn agents_alive_at_shutdown_keep_the_programs_attached_until_a_new_daemon() {
    if !root_or_skip() {
        return;
    }
    let mut h = Harness::new();
    // An agent that outlives the daemon.
    let agents = h.profile_cgroup();
    let mut sleeper = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec sleep 60",
            agents.display()
        ))
        .spawn()
        .expect("sleeper");
    let procs = agents.join("cgroup.procs");
    let deadline = Instant::now() + TIMEOUT;
    while std::fs::read_to_string(&procs)
        .unwrap_or_default()
        .trim()
        .is_empty()
    {
        assert!(
            Instant::now() < deadline,
            "the sleeper never joined its cgroup"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    h.capture
        .take()
        .expect("capture")
        .shutdown()
        .expect("shutdown");
    assert!(
        !h.pin_dir.join("TAGGED").exists(),
        "no tag map pin: `enforcer exec` refuses"
    );
    assert!(
        h.pin_dir.join("link_redirect_connect4").exists(),
        "the programs stay attached while agents run"
    );

    // Still redirected, never direct: with the daemon gone nobody listens at the proxy port, so this fails closed.
    let upstream = TcpListener::bind("127.0.0.2:0").expect("bind upstream");
    upstream.set_nonblocking(true).expect("nonblocking");
    let port = upstream.local_addr().expect("addr").port();
    let child = python(
        CLIENT,
        &[
            agents.to_str().expect("utf-8"),
            "127.0.0.2",
            &port.to_string(),
        ],
    );
    let (stream, _) = h.accept_proxy().expect("the held programs still redirect");
    answer(stream);
    finish(child);
    assert!(accept_any(&[&upstream], Duration::from_millis(300)).is_none());

    // A new daemon replaces the held links with its own, and sees its agents again.
    h.start_capture();
    assert_redirected(
        &h,
        &agents,
        "127.0.0.2",
        port,
        SocketAddr::from(([127, 0, 0, 2], port)),
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();
}

#[test]
fn network_devices_that_appear_later_are_covered_too() {
    if !root_or_skip() {
        return;
    }
    let h = Harness::new();
    let name = format!("enfta{}", std::process::id() % 100_000);
    let peer = format!("enftb{}", std::process::id() % 100_000);
    let ip = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .status()
            .expect("ip runs")
            .success()
    };
    assert!(
        ip(&["link", "add", &name, "type", "veth", "peer", "name", &peer]),
        "add {name}"
    );
    let ifindex = std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .expect("ifindex")
        .trim()
        .to_string();
    let pin = h.pin_dir.join(format!("link_device_egress_{ifindex}"));
    let deadline = Instant::now() + TIMEOUT;
    while !pin.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let covered = pin.exists();
    assert!(ip(&["link", "del", &name]), "del {name}");
    assert!(covered, "{name} was not covered within {TIMEOUT:?}");
    // Loopback never is.
    assert!(!h.pin_dir.join("link_device_egress_1").exists());
}

/// Runs the real `enforcer` binary with `args`; returns (exit code, stdout, stderr).
fn enforcer(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .args(args)
        .output()
        .expect("enforcer runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The unprivileged user `enforcer exec` runs these tests' commands as (`--user`).
const AGENT: &str = "nobody";

/// `exec --config CFG --profile PROFILE --user nobody --`: the arguments before the command.
fn exec_args<'a>(cfg: &'a str, profile: &'a str) -> [&'a str; 8] {
    [
        "exec",
        "--config",
        cfg,
        "--profile",
        profile,
        "--user",
        AGENT,
        "--",
    ]
}

/// `enforcer exec --config CFG --profile PROFILE --user nobody -- CMD…`; (exit code, stdout, stderr).
fn exec_as_agent(cfg: &str, profile: &str, cmd: &[&str]) -> (Option<i32>, String, String) {
    let mut args = exec_args(cfg, profile).to_vec();
    args.extend_from_slice(cmd);
    enforcer(&args)
}

/// A daemon config pointing `enforcer exec` at the harness (its cgroup, pins) and a state dir with the published
/// CA files (`public/bundle.pem`, `public/ca.pem`); the state dir is world-writable so the agent can leave marks.
fn exec_config(h: &Harness, state: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o777)).expect("chmod state");
    std::fs::create_dir_all(state.join("public")).expect("public dir");
    for file in ["bundle.pem", "ca.pem"] {
        std::fs::write(
            state.join("public").join(file),
            "-----BEGIN CERTIFICATE-----\n",
        )
        .expect("CA file");
    }
    let cfg = state.join("enforcer.yaml");
    let yaml = format!(
        "state_dir: {}\ncgroup_root: {CGROUP_ROOT}\ncapture:\n  cgroup: {}\n  pin_dir: {}\n",
        state.display(),
        h.rel.trim_start_matches('/'),
        h.pin_dir.display()
    );
    std::fs::write(&cfg, yaml).expect("config");
    cfg
}

/// `enforcer exec` starts nothing it cannot have enforced: here the programs are attached and the profile tagged
/// (the harness plays the daemon's capture), but no daemon answers on the control socket, so the run cannot be
/// registered and exec refuses to start the command, leaving no cgroup behind. So do an untagged profile, a missing
/// CA bundle and detached programs. (A registered run's cgroup, exit code and signals: the e2e test
/// `exec_runs_the_command_in_its_own_cgroup_and_passes_its_exit_on`, with the daemon.)
#[test]
fn exec_starts_nothing_it_cannot_register_or_enforce() {
    if !root_or_skip() {
        return;
    }
    let h = Harness::new();
    let state = tempfile::tempdir().expect("tempdir");
    let cfg = exec_config(&h, state.path());
    let cfg = cfg.to_str().expect("utf-8");
    let bundle = state.path().join("public/bundle.pem");

    let (code, stdout, stderr) = exec_as_agent(cfg, PROFILE, &["echo", "the agent ran"]);
    assert_eq!((code, stdout.as_str()), (Some(2), ""), "{stderr}");
    assert!(
        stderr.contains("the agent is not started") && stderr.contains("not running"),
        "stderr: {stderr}"
    );
    let leftovers: Vec<_> = std::fs::read_dir(h.profile_cgroup())
        .expect("profile cgroup")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("exec-"))
        .collect();
    assert!(leftovers.is_empty(), "exec left its cgroup: {leftovers:?}");

    // A profile the daemon does not tag is refused, clearly (here: the default profile, not configured).
    let (code, _, stderr) = enforcer(&["exec", "--config", cfg, "--user", AGENT, "--", "true"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("\"default\""), "stderr: {stderr}");
    let (code, _, stderr) = exec_as_agent(cfg, "nope", &["true"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("nope"), "stderr: {stderr}");

    // No CA bundle: refused.
    std::fs::remove_file(&bundle).expect("remove bundle");
    let (code, _, stderr) = exec_as_agent(cfg, PROFILE, &["true"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("bundle"), "stderr: {stderr}");

    // Daemon gone: refused.
    let mut h = h;
    if let Some(capture) = h.capture.take() {
        capture.shutdown().expect("shutdown");
    }
    let (code, _, stderr) = exec_as_agent(cfg, PROFILE, &["true"]);
    assert_ne!(code, Some(0));
    assert!(stderr.contains("not running"), "stderr: {stderr}");
}

#[test]
fn cgroup_command_tags_and_untags_through_the_pin() {
    if !root_or_skip() {
        return;
    }
    let h = Harness::new();
    let state = tempfile::tempdir().expect("tempdir");
    let cfg = exec_config(&h, state.path());
    let cfg = cfg.to_str().expect("utf-8");
    let slice = h.child_cgroup("slice");
    let slice_s = slice.to_str().expect("utf-8");
    let (code, _, stderr) = enforcer(&[
        "cgroup",
        "tag",
        "--config",
        cfg,
        "--profile",
        "late",
        slice_s,
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let (_, list, _) = enforcer(&["cgroup", "list", "--config", cfg]);
    assert!(
        list.contains(&format!("late\t{}/slice", h.rel)),
        "list: {list}"
    );
    let ip2: IpAddr = "127.0.0.2".parse().expect("ip");
    let child = python(CLIENT, &[slice_s, "127.0.0.2", "9"]);
    let (stream, peer) = h.accept_proxy().expect("tagged by the command");
    let origin = h.capture().origins().lookup(peer).expect("origin");
    assert_eq!(origin.dst, SocketAddr::new(ip2, 9));
    assert_eq!(origin.agent.profile.as_deref(), Some("late"));
    answer(stream);
    finish(child);
    let (code, _, stderr) = enforcer(&["cgroup", "untag", "--config", cfg, slice_s]);
    assert_eq!(code, Some(0), "{stderr}");
    let pinned = TagTable::open_pinned(&h.pin_dir, Path::new(CGROUP_ROOT)).expect("pinned map");
    assert_eq!(pinned.direct_profile(&slice).expect("lookup"), None);
}
