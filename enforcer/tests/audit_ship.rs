//! Shipping the audit trail to the real rsyslog from Debian (installed by `cargo xtask setup`), started by the test
//! in the foreground on a loopback port, receiving RFC 5424 messages over TLS (gtls, a test CA) with octet-counted
//! framing into a file; then `enforcer audit verify FILE --keys DIR` on what it wrote. No kernel features are needed,
//! so this runs on loopback without root.

mod audit_support;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use audit_support::{config, event};
use enforcer::audit::{AuditConfig, AuditLog, ShipConfig};

const RSYSLOGD: &str = "/usr/sbin/rsyslogd";

/// A test CA and the collector's certificate for 127.0.0.1.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = params.signed_by(&key, &issuer).unwrap();
    let p = Pki {
        ca: dir.join("ca.pem"),
        cert: dir.join("collector.pem"),
        key: dir.join("collector.key"),
    };
    std::fs::write(&p.ca, ca_cert.pem()).unwrap();
    std::fs::write(&p.cert, cert.pem()).unwrap();
    std::fs::write(&p.key, key.serialize_pem()).unwrap();
    p
}

/// rsyslogd in the foreground with its own config, work directory and pid file; stopped (and waited for) on drop.
struct Collector {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
}

impl Collector {
    fn start(dir: &Path, pki: &Pki, port: u16) -> Collector {
        let work = dir.join("rsyslog-work");
        std::fs::create_dir_all(&work).unwrap();
        let conf = dir.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                r#"global(
  workDirectory="{work}"
  maxMessageSize="64k"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="{ca}"
  defaultNetstreamDriverCertFile="{cert}"
  defaultNetstreamDriverKeyFile="{key}"
)
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="collect")
ruleset(name="collect") {{
  action(type="omfile" file="{out}" template="RSYSLOG_SyslogProtocol23Format")
}}
"#,
                work = work.display(),
                ca = pki.ca.display(),
                cert = pki.cert.display(),
                key = pki.key.display(),
                out = dir.join("collected.log").display(),
            ),
        )
        .unwrap();
        let child = Command::new(RSYSLOGD)
            .arg("-n")
            .arg("-f")
            .arg(&conf)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{RSYSLOGD}: {e} (run `cargo xtask setup`)"));
        let c = Collector {
            child: Some(child),
            dir: dir.to_path_buf(),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "rsyslogd did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    fn file(&self) -> PathBuf {
        self.dir.join("collected.log")
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = child.wait();
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn shipped(dir: &Path, pki: &Pki, port: u16, host: &str, queue: usize) -> AuditConfig {
    let mut cfg = config(dir);
    let mut ship = ShipConfig::new(format!("127.0.0.1:{port}"), &pki.ca);
    ship.hostname = Some(host.to_string());
    ship.queue = queue;
    cfg.ship = Some(ship);
    cfg
}

/// Wait until the collected file holds a line containing every one of `needles`.
fn wait_for(file: &Path, needles: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the collector never wrote a line with {needles:?}; it has:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait until the shipper has shipped record `seq`.
async fn shipped_through(log: &AuditLog, seq: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while log.shipping().unwrap().last_seq < Some(seq) {
        assert!(
            Instant::now() < deadline,
            "record {seq} never shipped: {:?}",
            log.shipping()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn verify(file: &Path, keys: &Path) -> (Option<i32>, String) {
    let o: Output = Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .args(["audit", "verify"])
        .arg(file)
        .arg("--keys")
        .arg(keys)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status.code(), text)
}

fn trust(keys: &Path, trail: &Path, name: &str) {
    std::fs::create_dir_all(keys).unwrap();
    std::fs::copy(trail.join("audit.pub"), keys.join(format!("{name}.pub"))).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_ship_to_rsyslog_and_the_collected_file_verifies_per_host() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let collector = Collector::start(dir.path(), &pki, free_port());
    let (a, b) = (dir.path().join("host-a"), dir.path().join("host-b"));
    let log_a = AuditLog::open(shipped(&a, &pki, collector.port, "agent-a", 4096))
        .await
        .unwrap();
    let log_b = AuditLog::open(shipped(&b, &pki, collector.port, "agent-b", 4096))
        .await
        .unwrap();
    for i in 0..30 {
        log_a.record(event(0, i)).await.unwrap();
        if i < 20 {
            log_b.record(event(1, i)).await.unwrap();
        }
    }
    log_a.close().await.unwrap();
    log_b.close().await.unwrap();
    let file = collector.file();
    // The final checkpoints sign records 29 and 19.
    wait_for(&file, &["agent-a", "checkpoint", "\"seq\":29,\"hash\""]);
    wait_for(&file, &["agent-b", "checkpoint", "\"seq\":19,\"hash\""]);

    let keys = dir.path().join("keys");
    trust(&keys, &a, "agent-a");
    // Host b's key is not trusted yet: the file fails, naming it.
    let (code, out) = verify(&file, &keys);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("OK: host agent-a"), "{out}");
    assert!(out.contains("30 records (seq 0 to 29)"), "{out}");
    assert!(out.contains("FAILED: host agent-b"), "{out}");
    assert!(out.contains("untrusted"), "{out}");

    trust(&keys, &b, "agent-b");
    let (code, out) = verify(&file, &keys);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("20 records (seq 0 to 19)"), "{out}");
    assert!(!out.contains("gap"), "{out}");

    // One record edited at the collector: tampering, naming the host and the seq.
    let text = std::fs::read_to_string(&file).unwrap();
    let edited: Vec<String> = text
        .lines()
        .map(|l| {
            if l.contains("agent-b") && l.contains("{\"seq\":7,") {
                l.replace("pastebin.com", "pastebin.org")
            } else {
                l.to_string()
            }
        })
        .collect();
    assert_ne!(
        edited.join("\n") + "\n",
        text,
        "record 7 of agent-b not found"
    );
    std::fs::write(&file, edited.join("\n") + "\n").unwrap();
    let (code, out) = verify(&file, &keys);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("OK: host agent-a"), "{out}");
    assert!(
        out.contains("tampered: host agent-b") && out.contains("record 7 "),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_outage_shows_as_a_gap_and_shipping_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let port = free_port();
    let mut collector = Collector::start(dir.path(), &pki, port);
    let trail = dir.path().join("host");
    let log = AuditLog::open(shipped(&trail, &pki, port, "agent-c", 4))
        .await
        .unwrap();
    // One at a time: the queue holds only 4, and a shipper slower than the writer (a loaded machine) drops.
    for i in 0..10 {
        let seq = log.record(event(0, i)).await.unwrap();
        shipped_through(&log, seq).await;
    }
    wait_for(&collector.file(), &["agent-c", "{\"seq\":9,"]);

    collector.stop();
    // Records written while the collector is down: the queue (4) fills and the rest are dropped from shipping.
    for i in 10..60 {
        log.record(event(0, i)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let during = log.shipping().unwrap();
    assert!(during.dropped > 0, "{during:?}");
    // The drops are counted where Prometheus scrapes them.
    let metrics = enforcer::metrics::Metrics::new();
    metrics.watch_shipping(log.ship_probe().unwrap());
    let text = metrics.encode(false);
    let dropped: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("enforcer_audit_ship_dropped_total "))
        .unwrap_or_else(|| panic!("no drop counter in:\n{text}"))
        .parse()
        .unwrap();
    assert!(dropped >= during.dropped, "{text}");
    assert!(text.contains("enforcer_audit_ship_connected 0"), "{text}");

    let collector = Collector::start(dir.path(), &pki, port);
    // The shipper reconnects (backoff) and sends what the queue kept; then records flow again.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = log.shipping().unwrap();
        if s.connected && s.queued == 0 && s.last_seq > during.last_seq {
            break;
        }
        assert!(Instant::now() < deadline, "shipping never resumed: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 60..70 {
        log.record(event(0, i)).await.unwrap();
    }
    shipped_through(&log, 69).await;
    log.close().await.unwrap();
    wait_for(
        &collector.file(),
        &["agent-c", "checkpoint", "\"seq\":69,\"hash\""],
    );

    // Every record is still in the local trail.
    let local = enforcer::audit::verify(&trail, None).unwrap();
    assert!(local.ok(), "{:?}", local.problems);
    assert_eq!(local.last_seq, Some(69));

    let keys = dir.path().join("keys");
    trust(&keys, &trail, "agent-c");
    let (code, out) = verify(&collector.file(), &keys);
    assert_eq!(code, Some(0), "a gap is not tampering: {out}");
    assert!(out.contains("OK: host agent-c"), "{out}");
    assert!(out.contains("gap: records "), "{out}");
    assert!(!out.contains("tampered"), "{out}");
}
