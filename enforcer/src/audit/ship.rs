//! Shipping the trail to a central collector: every record and every signed checkpoint, as it is written, goes out as
//! one syslog message (RFC 5424) over TLS (RFC 5425) with octet-counted framing (RFC 6587 §3.4.1), to rsyslog,
//! syslog-ng or any collector that speaks that. Owns the queue, the connection and the message layout; the local trail
//! stays the record of truth and never waits for it.
//!
//! The writer offers each line to a bounded queue ([`Shipper::offer`], a non-blocking `try_send` under the append
//! mutex, so messages leave in seq order); one thread of its own drains the queue onto the TLS connection. When the
//! queue is full (the collector is down or slower than the daemon) the line is dropped from shipping — never from the
//! local trail — and counted ([`ShipStatus::dropped`]); since every message carries its record's seq, the collector
//! sees the jump and `enforcer audit verify` on the collected file reports it as a gap. A lost connection is retried
//! with exponential backoff (100 ms to 30 s); the message whose write failed is sent again first, then whatever the
//! queue still holds, so shipping resumes from the last shipped seq as far as the queue reaches back.
//!
//! A message is `LEN SP <86>1 TIMESTAMP HOSTNAME enforcer PROCID MSGID [enforcer@32473 seq="N" key="K" host="H"] LINE`:
//! facility authpriv, severity info; MSGID `record` or `checkpoint`; the structured-data element carries the host's
//! identity (the checkpoint-signing key's id, as in every checkpoint's `key`, and the hostname) and the record's seq;
//! the MSG is the line exactly as in the local file (without its `\n`), so its hash and signature check as they do
//! there. The fields are fixed, so they are formatted here (RFC 5424 §6, SD-PARAM escaping §6.3.3) rather than
//! through a syslog crate: those either bring their own transport and logging facade or are no longer maintained.
//! 32473 is the private enterprise number RFC 5612 reserves for documentation, standing in until one is registered.

use std::io::Write as _;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::recover::now_ts;

/// The SD-ID of the one structured-data element on every message (RFC 5424 §6.3.2, `name@<private enterprise number>`).
pub const SD_ID: &str = "enforcer@32473";
/// `<PRI>`: facility authpriv (10) × 8 + severity info (6), as the local syslog copy of checkpoints.
const PRI: u8 = 86;
const APP_NAME: &str = "enforcer";
/// The default queue bound (`audit.ship.queue`): about 3 MiB of records.
pub const DEFAULT_QUEUE: usize = 4096;
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A collector that takes no bytes for this long is treated as gone (the connection is dropped and retried).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long closing the trail keeps trying to ship what is queued.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(100);

/// Where and how to ship: the `audit.ship:` section of the daemon's configuration (docs/audit.md, "Shipping to a
/// central collector").
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShipConfig {
    /// `host:port` of the collector's RFC 5425 listener (6514 is the registered port).
    pub collector: String,
    /// The name the collector's certificate must be valid for. Default: the host part of `collector`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// PEM file of the CA certificate(s) the collector's certificate must chain to (the only roots trusted).
    pub ca_file: PathBuf,
    /// PEM certificate chain and private key presented to a collector that asks for a client certificate (both or
    /// neither).
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Messages waiting to be shipped, at most; past it new ones are dropped from shipping (never from the local
    /// trail), counted, and show as a seq gap at the collector. Default 4096.
    #[serde(default = "default_queue")]
    pub queue: usize,
    /// The HOSTNAME field and `host` parameter. Default: the system's hostname.
    #[serde(default)]
    pub hostname: Option<String>,
}

fn default_queue() -> usize {
    DEFAULT_QUEUE
}

impl ShipConfig {
    pub fn new(collector: impl Into<String>, ca_file: impl Into<PathBuf>) -> ShipConfig {
        ShipConfig {
            collector: collector.into(),
            server_name: None,
            ca_file: ca_file.into(),
            client_cert: None,
            client_key: None,
            queue: DEFAULT_QUEUE,
            hostname: None,
        }
    }
}

/// Why shipping could not be set up (the daemon refuses to start: a configured shipper that silently ships nothing
/// would be a gap nobody sees).
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error("audit.ship: {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("audit.ship: {path}: {detail}")]
    Pem { path: String, detail: String },
    #[error("audit.ship.collector {0:?} is not host:port")]
    Collector(String),
    #[error("audit.ship: {0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("audit.ship.client_cert and audit.ship.client_key go together")]
    ClientPair,
    #[error("audit.ship.queue must be at least 1")]
    Queue,
    #[error("audit.ship: TLS setup: {0}")]
    Tls(#[from] rustls::Error),
}

/// Who wrote a record: what every shipped message carries so a collected file can be attributed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIdentity {
    /// RFC 5424 HOSTNAME: printable US-ASCII, at most 255 octets.
    pub hostname: String,
    /// The checkpoint-signing key's id (16 hex digits, [`super::PublicKey::key_id`]).
    pub key_id: String,
}

/// What is shipped: a record or a checkpoint line, with its seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Record,
    Checkpoint,
}

impl Kind {
    /// The MSGID.
    pub fn msgid(self) -> &'static str {
        match self {
            Kind::Record => "record",
            Kind::Checkpoint => "checkpoint",
        }
    }
}

/// Shipping's state, for `enforcer status` and the metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShipStatus {
    pub collector: String,
    pub connected: bool,
    /// Messages written to the collector since start.
    pub shipped: u64,
    /// Messages dropped from shipping (queue full, or unsent when the trail closed) since start.
    pub dropped: u64,
    /// Messages waiting in the queue now.
    pub queued: u64,
    /// Seq of the last record shipped.
    pub last_seq: Option<u64>,
}

#[derive(Debug, Default)]
struct Stats {
    shipped: AtomicU64,
    dropped: AtomicU64,
    queued: AtomicU64,
    connected: AtomicBool,
    /// Last record seq shipped, plus one (0: none yet).
    last_seq: AtomicU64,
}

struct Item {
    kind: Kind,
    seq: u64,
    line: Vec<u8>,
}

/// A cheap handle on shipping's counters, read at each metrics scrape or status request.
#[derive(Debug, Clone)]
pub struct ShipProbe {
    stats: Arc<Stats>,
    collector: String,
}

impl ShipProbe {
    pub fn status(&self) -> ShipStatus {
        let s = &self.stats;
        let last = s.last_seq.load(Ordering::Relaxed);
        ShipStatus {
            collector: self.collector.clone(),
            connected: s.connected.load(Ordering::Relaxed),
            shipped: s.shipped.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            queued: s.queued.load(Ordering::Relaxed),
            last_seq: last.checked_sub(1),
        }
    }
}

/// The running shipper: the queue's sending end and the thread draining it.
pub(crate) struct Shipper {
    tx: SyncSender<Item>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    probe: ShipProbe,
}

impl std::fmt::Debug for Shipper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shipper")
            .field("collector", &self.probe.collector)
            .finish_non_exhaustive()
    }
}

impl Shipper {
    /// Load the TLS material and start the shipping thread. Connecting happens on that thread: a collector that is
    /// down at start is retried like one that goes away later.
    pub fn start(cfg: &ShipConfig, key_id: &str) -> Result<Shipper, ShipError> {
        if cfg.queue == 0 {
            return Err(ShipError::Queue);
        }
        let (host, _) = split_host_port(&cfg.collector)?;
        let name = cfg.server_name.clone().unwrap_or_else(|| host.to_string());
        let server_name =
            ServerName::try_from(name.clone()).map_err(|_| ShipError::ServerName(name))?;
        let tls = Arc::new(client_config(cfg)?);
        let identity = HostIdentity {
            hostname: cfg.hostname.clone().unwrap_or_else(local_hostname),
            key_id: key_id.to_string(),
        };
        let (tx, rx) = sync_channel(cfg.queue);
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let link = Link {
            collector: cfg.collector.clone(),
            server_name,
            tls,
            identity,
            pid: std::process::id(),
            stats: stats.clone(),
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("audit-ship".into())
            .spawn(move || link.run(rx))
            .map_err(|source| ShipError::Read {
                path: "audit-ship thread".into(),
                source,
            })?;
        Ok(Shipper {
            tx,
            probe: ShipProbe {
                stats: stats.clone(),
                collector: cfg.collector.clone(),
            },
            stats,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queue one line (with or without its `\n`) for shipping; never blocks. A full queue drops it from shipping.
    pub fn offer(&self, kind: Kind, seq: u64, line: &[u8]) {
        let line = line.strip_suffix(b"\n").unwrap_or(line).to_vec();
        // Counted before the send, so the thread never takes it below zero.
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Item { kind, seq, line }) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn probe(&self) -> ShipProbe {
        self.probe.clone()
    }

    /// Ship what is queued (for at most a couple of seconds), then stop the thread.
    pub fn close(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for Shipper {
    fn drop(&mut self) {
        self.close();
    }
}

/// One RFC 5424 message for `line`, octet-counted (RFC 6587 §3.4.1): `MSG-LEN SP SYSLOG-MSG`.
pub fn frame(id: &HostIdentity, pid: u32, ts: &str, kind: Kind, seq: u64, line: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(line.len() + 160);
    // Writing to a Vec cannot fail.
    let _ = write!(
        msg,
        "<{PRI}>1 {ts} {} {APP_NAME} {pid} {} [{SD_ID} seq=\"{seq}\" key=\"",
        header_field(&id.hostname, 255),
        kind.msgid()
    );
    escape_param(&mut msg, &id.key_id);
    msg.extend_from_slice(b"\" host=\"");
    escape_param(&mut msg, &id.hostname);
    msg.extend_from_slice(b"\"] ");
    msg.extend_from_slice(line);
    let mut out = Vec::with_capacity(msg.len() + 8);
    let _ = write!(out, "{} ", msg.len());
    out.extend_from_slice(&msg);
    out
}

/// A header field (RFC 5424 §6.2: `1*N PRINTUSASCII`): other octets become `_`, empty is the NILVALUE `-`.
fn header_field(s: &str, max: usize) -> String {
    let v: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v
    }
}

/// PARAM-VALUE escaping (RFC 5424 §6.3.3): `"`, `\` and `]` are preceded by `\`.
fn escape_param(out: &mut Vec<u8>, s: &str) {
    for b in s.bytes() {
        if matches!(b, b'"' | b'\\' | b']') {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// The system's hostname (gethostname(2) reads the same UTS field).
fn local_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "-".into())
}

fn split_host_port(addr: &str) -> Result<(&str, u16), ShipError> {
    let bad = || ShipError::Collector(addr.to_string());
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = port.parse().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host, port))
}

fn read_pem(path: &PathBuf) -> Result<Vec<u8>, ShipError> {
    std::fs::read(path).map_err(|source| ShipError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn client_config(cfg: &ShipConfig) -> Result<ClientConfig, ShipError> {
    let pem_err = |path: &PathBuf, detail: String| ShipError::Pem {
        path: path.display().to_string(),
        detail,
    };
    let mut roots = RootCertStore::empty();
    let pem = read_pem(&cfg.ca_file)?;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| pem_err(&cfg.ca_file, e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| pem_err(&cfg.ca_file, e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(pem_err(&cfg.ca_file, "no CERTIFICATE block".into()));
    }
    let builder = ClientConfig::builder_with_provider(crate::proxy::crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    Ok(match (&cfg.client_cert, &cfg.client_key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let pem = read_pem(cert)?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_err(cert, e.to_string()))?;
            if chain.is_empty() {
                return Err(pem_err(cert, "no CERTIFICATE block".into()));
            }
            let key_pem = read_pem(key)?;
            let key_der =
                PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| pem_err(key, e.to_string()))?;
            builder.with_client_auth_cert(chain, key_der)?
        }
        _ => return Err(ShipError::ClientPair),
    })
}

/// The shipping thread's side.
struct Link {
    collector: String,
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
    identity: HostIdentity,
    pid: u32,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
}

type Conn = StreamOwned<ClientConnection, TcpStream>;

impl Link {
    fn run(self, rx: Receiver<Item>) {
        let mut conn: Option<Conn> = None;
        // The message being shipped: kept until a write of it succeeds (resent first after a reconnect).
        let mut pending: Option<(u64, Kind, Vec<u8>)> = None;
        let mut backoff = BACKOFF_FIRST;
        let mut retry_at: Option<Instant> = None;
        let mut down_logged = false;
        let mut deadline: Option<Instant> = None;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                let d = *deadline.get_or_insert_with(|| Instant::now() + CLOSE_GRACE);
                if Instant::now() >= d {
                    let left = rx.try_iter().count() as u64 + u64::from(pending.is_some());
                    self.stats.dropped.fetch_add(left, Ordering::Relaxed);
                    self.stats.queued.store(0, Ordering::Relaxed);
                    break;
                }
            }
            if pending.is_none() {
                let item = if deadline.is_some() {
                    match rx.try_recv() {
                        Ok(item) => item,
                        Err(_) => break,
                    }
                } else {
                    match rx.recv_timeout(POLL) {
                        Ok(item) => item,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                };
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                let msg = frame(
                    &self.identity,
                    self.pid,
                    &now_ts(),
                    item.kind,
                    item.seq,
                    &item.line,
                );
                pending = Some((item.seq, item.kind, msg));
            }
            let Some((seq, kind, msg)) = &pending else {
                continue;
            };
            let stream = match &mut conn {
                Some(c) => c,
                None => {
                    if let Some(t) = retry_at.filter(|&t| t > Instant::now()) {
                        std::thread::sleep(t.saturating_duration_since(Instant::now()).min(POLL));
                        continue;
                    }
                    match self.connect() {
                        Ok(c) => {
                            tracing::info!(collector = %self.collector, "audit shipping connected");
                            self.stats.connected.store(true, Ordering::Relaxed);
                            down_logged = false;
                            backoff = BACKOFF_FIRST;
                            retry_at = None;
                            conn.insert(c)
                        }
                        Err(e) => {
                            if !down_logged {
                                tracing::warn!(collector = %self.collector, error = %e,
                                    "audit shipping: cannot reach the collector; retrying with backoff, records \
                                     past the queue bound are dropped from shipping (the local trail keeps them)");
                                down_logged = true;
                            }
                            retry_at = Some(Instant::now() + backoff);
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                            continue;
                        }
                    }
                }
            };
            match stream.write_all(msg).and_then(|()| stream.flush()) {
                Ok(()) => {
                    self.stats.shipped.fetch_add(1, Ordering::Relaxed);
                    if *kind == Kind::Record {
                        self.stats.last_seq.fetch_max(seq + 1, Ordering::Relaxed);
                    }
                    pending = None;
                }
                Err(e) => {
                    tracing::warn!(collector = %self.collector, seq, error = %e,
                        "audit shipping: connection lost; reconnecting");
                    down_logged = true;
                    conn = None;
                    self.stats.connected.store(false, Ordering::Relaxed);
                    retry_at = Some(Instant::now() + backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        if let Some(mut c) = conn {
            c.conn.send_close_notify();
            let _ = c.flush();
        }
        self.stats.connected.store(false, Ordering::Relaxed);
    }

    fn connect(&self) -> std::io::Result<Conn> {
        let mut last = None;
        let addrs = self.collector.to_socket_addrs()?;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(sock) => {
                    sock.set_write_timeout(Some(WRITE_TIMEOUT))?;
                    sock.set_read_timeout(Some(WRITE_TIMEOUT))?;
                    sock.set_nodelay(true)?;
                    let tls = ClientConnection::new(self.tls.clone(), self.server_name.clone())
                        .map_err(std::io::Error::other)?;
                    let mut stream = StreamOwned::new(tls, sock);
                    while stream.conn.is_handshaking() {
                        stream.conn.complete_io(&mut stream.sock)?;
                    }
                    return Ok(stream);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the collector's name resolves to no address",
            )
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_is_octet_counted_rfc5424_with_the_line_verbatim() {
        let id = HostIdentity {
            hostname: "agent-host-1".into(),
            key_id: "0123456789abcdef".into(),
        };
        let line = br#"{"seq":7,"ts":"t","prev":"00","x":"a]\"b","hash":"11"}"#;
        let out = frame(
            &id,
            42,
            "2026-01-01T00:00:00.000001Z",
            Kind::Record,
            7,
            line,
        );
        let text = String::from_utf8(out).unwrap();
        let (len, msg) = text.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), msg.len());
        assert_eq!(
            msg,
            format!(
                "<86>1 2026-01-01T00:00:00.000001Z agent-host-1 enforcer 42 record \
                 [enforcer@32473 seq=\"7\" key=\"0123456789abcdef\" host=\"agent-host-1\"] {}",
                std::str::from_utf8(line).unwrap()
            )
        );
    }

    #[test]
    fn header_fields_and_params_follow_the_grammar() {
        assert_eq!(header_field("a b\u{e9}", 255), "a_b_");
        assert_eq!(header_field("", 255), "-");
        let mut out = Vec::new();
        escape_param(&mut out, r#"a"b\c]d"#);
        assert_eq!(out, br#"a\"b\\c\]d"#);
    }

    #[test]
    fn setup_errors_name_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        assert!(matches!(
            Shipper::start(&ShipConfig::new("collector", &ca), "k"),
            Err(ShipError::Collector(_))
        ));
        assert!(matches!(
            Shipper::start(&ShipConfig::new("127.0.0.1:6514", &ca), "k"),
            Err(ShipError::Read { .. })
        ));
        std::fs::write(&ca, "not pem").unwrap();
        let e = Shipper::start(&ShipConfig::new("127.0.0.1:6514", &ca), "k").unwrap_err();
        assert!(e.to_string().contains("ca.pem"), "{e}");
    }

    #[test]
    fn a_full_queue_drops_from_shipping_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        // Nothing listens on port 1: the link never connects, so the queue fills.
        let mut cfg = ShipConfig::new("127.0.0.1:1", &ca);
        cfg.queue = 2;
        let s = Shipper::start(&cfg, "k").unwrap();
        for seq in 0..10 {
            s.offer(Kind::Record, seq, b"{}\n");
        }
        let st = s.probe().status();
        // The thread may hold one message as pending, so 2 or 3 are taken.
        assert!((7..=8).contains(&st.dropped), "{st:?}");
        assert!(!st.connected);
        assert_eq!(st.last_seq, None);
        drop(s);
    }
}
