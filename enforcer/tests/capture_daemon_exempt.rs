//! Privileged test (own binary, because it moves its whole process between cgroups): the daemon's own connects
//! are never redirected, even when the daemon runs inside a tagged cgroup, while its children there are.
//! Needs root; skipped without it unless `CI` is set.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use enforcer::capture::{Capture, CaptureConfig};

const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";

struct Guard {
    capture: Option<Capture>,
    cgroup: PathBuf,
    pin_dir: PathBuf,
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
        for dir in ["enforcer/agents", "enforcer", ""] {
            let d = self.cgroup.join(dir);
            let _ = std::fs::write(d.join("cgroup.kill"), "1");
            let deadline = Instant::now() + Duration::from_secs(3);
            while std::fs::remove_dir(&d).is_err() && d.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

fn accept(l: &TcpListener, timeout: Duration) -> Option<(TcpStream, SocketAddr)> {
    let deadline = Instant::now() + timeout;
    loop {
        match l.accept() {
            Ok(hit) => return Some(hit),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("accept: {e}"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_daemons_own_connects_are_never_redirected() {
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
    std::fs::create_dir(&cgroup).expect("test cgroup");
    let proxy = TcpListener::bind("127.0.0.1:0").expect("proxy");
    proxy.set_nonblocking(true).expect("nonblocking");
    let upstream = TcpListener::bind("127.0.0.2:0").expect("upstream");
    upstream.set_nonblocking(true).expect("nonblocking");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut guard = Guard {
        capture: None,
        cgroup: cgroup.clone(),
        pin_dir: PathBuf::from(format!("/sys/fs/bpf/{name}")),
        home: Path::new(CGROUP_ROOT).join(own.trim_start_matches('/')),
    };
    let _enter = runtime.enter();
    guard.capture = Some(
        Capture::start(&CaptureConfig {
            cgroup_root: PathBuf::from(CGROUP_ROOT),
            attach_cgroup: cgroup.clone(),
            pin_dir: guard.pin_dir.clone(),
            proxy_port: proxy.local_addr().expect("addr").port(),
            dns_port: proxy.local_addr().expect("addr").port(),
            profiles: vec![("agents".to_string(), vec![])],
        })
        .expect("capture starts"),
    );
    let tagged = cgroup.join("enforcer/agents");
    std::fs::write(tagged.join("cgroup.procs"), std::process::id().to_string())
        .expect("move into the tagged cgroup");
    let port = upstream.local_addr().expect("addr").port();

    // The daemon itself reaches the upstream directly.
    let mut own = TcpStream::connect(("127.0.0.2", port)).expect("daemon connects");
    let (mut seen, _) =
        accept(&upstream, Duration::from_secs(10)).expect("daemon's connect is not redirected");
    own.write_all(b"d").expect("write");
    let mut byte = [0u8; 1];
    seen.set_nonblocking(false).expect("blocking");
    seen.read_exact(&mut byte).expect("read");
    assert!(accept(&proxy, Duration::from_millis(100)).is_none());

    // A child it starts in the same cgroup is captured.
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import socket,sys; s=socket.create_connection(('127.0.0.2', int(sys.argv[1])), timeout=10); s.recv(1)",
            &port.to_string(),
        ])
        .spawn()
        .expect("python3");
    let (mut redirected, _) = accept(&proxy, Duration::from_secs(10)).expect("child is redirected");
    redirected.write_all(b"y").expect("answer");
    assert!(child.wait().expect("wait").success());
    drop(guard);
}
