//! Privileged test (own binary, because it moves its whole process between cgroups): how the kernel programs tell
//! the daemon from an agent. The daemon is recognised by its cgroup, never by its pid: with the programs attached
//! above the daemon's cgroup (as at the root in production) its own connects go where they are sent while its
//! children in a tagged cgroup are redirected; the daemon refuses to tag its own cgroup or an ancestor of it; and a
//! daemon whose cgroup is tagged anyway (behind its back, through the pinned map) is refused, never exempted and
//! never looped back to itself. Needs root; skipped without it unless `CI` is set.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use enforcer::capture::{Capture, CaptureConfig, CaptureError, CaptureProfile, TagTable};

const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";

struct Guard {
    capture: Option<Capture>,
    cgroup: PathBuf,
    pin_dirs: Vec<PathBuf>,
    home: PathBuf,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.home.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        if let Some(capture) = self.capture.take() {
            let _ = capture.shutdown();
        }
        for dir in [
            "enforcer/agents",
            "enforcer/other",
            "enforcer",
            "daemon",
            "",
        ] {
            let d = self.cgroup.join(dir);
            let _ = std::fs::write(d.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(3);
            while std::fs::remove_dir(&d).is_err() && d.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for pin_dir in &self.pin_dirs {
            let _ = std::fs::remove_dir_all(pin_dir);
        }
    }
}

fn accept(l: &TcpListener, timeout: Duration) -> Option<(TcpStream, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok(hit) => return Some(hit),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The daemon (this process) connects to `port` on 127.0.0.2; returns whether the upstream got the connection.
fn daemon_reaches(upstream: &TcpListener, port: u16) -> bool {
    let mut own = TcpStream::connect(("127.0.0.2", port)).expect("daemon connects");
    let Some((mut seen, _)) = accept(upstream, Duration::from_secs(10)) else {
        return false;
    };
    own.write_all(b"d").expect("write");
    let mut byte = [0u8; 1];
    seen.set_nonblocking(false).expect("blocking");
    seen.read_exact(&mut byte).expect("read");
    true
}

#[test]
fn the_daemon_is_recognised_by_its_cgroup_and_never_exempted_when_tagged() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "needs root and CI is set: refusing to skip"
        );
        println!("skipped: needs root");
        return;
    }
    let text = std::fs::read_to_string("/proc/self/cgroup").expect("own cgroup");
    let own = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("cgroup v2 line");
    let name = format!("enforcer-test-daemon-{}", std::process::id());
    let cgroup = Path::new(CGROUP_ROOT).join(&name);
    let daemon_cgroup = cgroup.join("daemon");
    std::fs::create_dir_all(&daemon_cgroup).expect("test cgroups");
    let proxy = TcpListener::bind("127.0.0.1:0").expect("proxy");
    proxy.set_nonblocking(true).expect("nonblocking");
    let upstream = TcpListener::bind("127.0.0.2:0").expect("upstream");
    upstream.set_nonblocking(true).expect("nonblocking");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{name}"));
    let other_pin_dir = PathBuf::from(format!("/sys/fs/bpf/{name}-other"));
    let mut guard = Guard {
        capture: None,
        cgroup: cgroup.clone(),
        pin_dirs: vec![pin_dir.clone(), other_pin_dir.clone()],
        home: Path::new(CGROUP_ROOT).join(own.trim_start_matches('/')),
    };
    // The daemon runs in a cgroup below the one the programs attach to.
    std::fs::write(
        daemon_cgroup.join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .expect("move into the daemon's cgroup");
    let _enter = runtime.enter();
    let config = |pin_dir: &Path, profiles: Vec<CaptureProfile>| CaptureConfig {
        cgroup_root: PathBuf::from(CGROUP_ROOT),
        attach_cgroup: cgroup.clone(),
        pin_dir: pin_dir.to_path_buf(),
        proxy_port: proxy.local_addr().expect("addr").port(),
        dns_port: proxy.local_addr().expect("addr").port(),
        daemon_ports: Vec::new(),
        profiles,
    };
    guard.capture = Some(
        Capture::start(&config(&pin_dir, vec![CaptureProfile::new("agents")]))
            .expect("capture starts"),
    );
    let capture = guard.capture.as_ref().expect("capture");
    let port = upstream.local_addr().expect("addr").port();

    // The daemon itself reaches the upstream directly.
    assert!(
        daemon_reaches(&upstream, port),
        "the daemon's connect was redirected"
    );
    assert!(accept(&proxy, Duration::from_millis(100)).is_none());

    // A child it starts in a tagged cgroup is captured.
    let agents = cgroup.join("enforcer/agents");
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import os,socket,sys; open(sys.argv[2] + '/cgroup.procs', 'w').write(str(os.getpid())); \
             s=socket.create_connection(('127.0.0.2', int(sys.argv[1])), timeout=10); s.recv(1)",
            &port.to_string(),
            agents.to_str().expect("utf-8"),
        ])
        .spawn()
        .expect("python3");
    let (mut redirected, _) = accept(&proxy, Duration::from_secs(10)).expect("child is redirected");
    redirected.write_all(b"y").expect("answer");
    assert!(child.wait().expect("wait").success());

    // Tagging the daemon's cgroup, or one above it, is refused.
    for target in [&daemon_cgroup, &cgroup] {
        match capture.tag(target, "agents") {
            Err(CaptureError::DaemonCgroup { daemon, .. }) => assert_eq!(daemon, daemon_cgroup),
            other => panic!("tagging {} was not refused: {other:?}", target.display()),
        }
    }
    assert!(daemon_reaches(&upstream, port), "a refused tag took effect");

    // Tagged behind the daemon's back (through the pin, as any tool could): its sockets are refused, neither
    // exempted (no upstream connection) nor redirected to itself (no proxy connection).
    let mut pinned = TagTable::open_pinned(&pin_dir, Path::new(CGROUP_ROOT)).expect("pinned map");
    pinned
        .tag(&daemon_cgroup, "agents")
        .expect("tag through the pin");
    let err = TcpStream::connect(("127.0.0.2", port)).expect_err("a tagged daemon is refused");
    assert_eq!(err.kind(), ErrorKind::PermissionDenied, "{err}");
    assert!(accept(&upstream, Duration::from_millis(200)).is_none());
    assert!(accept(&proxy, Duration::from_millis(200)).is_none());
    pinned.untag(&daemon_cgroup).expect("untag");
    assert!(daemon_reaches(&upstream, port), "untagged again");

    // A configuration whose profile names the daemon's cgroup does not start.
    let mut other = CaptureProfile::new("other");
    other.cgroups = vec![daemon_cgroup
        .strip_prefix(CGROUP_ROOT)
        .expect("below the root")
        .to_path_buf()];
    match Capture::start(&config(&other_pin_dir, vec![other])) {
        Err(CaptureError::DaemonCgroup { .. }) => {}
        Err(e) => panic!("expected DaemonCgroup, got {e}"),
        Ok(_) => panic!("a capture tagging the daemon's cgroup started"),
    }
    drop(guard);
}
