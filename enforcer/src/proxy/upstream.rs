//! Upstream connections: always to the original destination IP and port (never a fresh DNS lookup), TLS with
//! SNI = the host the agent named and the real certificate verified, then an HTTP/2 or HTTP/1.1 client connection.
//! The connection is read the way a direct client reads it: an answer the upstream sent before it stopped reading
//! the request body still arrives (`io::EarlyAnswer`), and a close-delimited body ended without TLS `close_notify`
//! ends cleanly (`io::CloseDelimited`).
//!
//! The [`Pool`] keeps verified connections for later requests of the same agent: HTTP/1.1 ones lent to one request
//! at a time, HTTP/2 ones shared by up to [`STREAMS_PER_CONNECTION`] requests at once, whatever HTTP version the
//! agent itself spoke.
//!
//! HTTP/1.1 is hyper's client. HTTP/2 is the h2 crate's client used directly: the exchange's own task opens the
//! stream, sends the (already complete) body and waits for the response head, where hyper's HTTP/2 client hands each
//! request to the connection's task over a channel and spawns a task per request to wait for its response: two
//! wake-ups and a task's allocation per request that the direct use does without.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::http2::{keepalive, RecvBody};
use super::io::{CloseDelimited, EarlyAnswer};
use super::tls::{UpstreamTls, H2};
use crate::model::Reason;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const TLS_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {dst}: {source}")]
    Connect {
        dst: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {dst}: timed out")]
    Timeout { dst: SocketAddr },
    #[error("TLS handshake with {dst}: timed out")]
    TlsTimeout { dst: SocketAddr },
    #[error("{host:?} is not a valid TLS server name")]
    Name { host: String },
    #[error("TLS with the upstream failed: {source}")]
    Tls {
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP handshake with the upstream failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("HTTP/2 handshake with the upstream failed: {0}")]
    Http2(#[from] h2::Error),
    /// The destination is one of the daemon's own listeners ([`set_daemon_ports`]): never connected to for an agent.
    #[error("{dst} is one of the enforcer's own endpoints")]
    DaemonEndpoint { dst: SocketAddr },
}

/// Why an exchange with an open upstream connection failed: sending the request, or reading the response.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// hyper's HTTP/1.1 client.
    #[error(transparent)]
    Http1(#[from] hyper::Error),
    /// The HTTP/2 stream or its connection (a reset, a GOAWAY, an I/O error).
    #[error(transparent)]
    Http2(#[from] h2::Error),
    /// The HTTP/2 connection could not take the request (it had ended, or its server's GOAWAY had come): nothing
    /// of the request left the proxy.
    #[error("the upstream connection took no request: {0}")]
    Unsent(h2::Error),
}

impl UpstreamError {
    /// The audit reason for this failure.
    pub fn reason(&self) -> Reason {
        match self {
            UpstreamError::Name { .. } | UpstreamError::Tls { .. } => Reason::UpstreamTls,
            UpstreamError::DaemonEndpoint { .. } => Reason::DaemonEndpoint,
            _ => Reason::UpstreamUnreachable,
        }
    }

    /// A short description safe to show the client (no request data).
    pub fn client_message(&self) -> String {
        match self {
            UpstreamError::Tls { source } => match source
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>())
            {
                Some(rustls::Error::InvalidCertificate(e)) => {
                    format!("the upstream certificate failed verification: {e:?}")
                }
                Some(e) => format!("TLS with the upstream failed: {e}"),
                None => "TLS with the upstream failed".into(),
            },
            UpstreamError::Name { .. } => "the host is not a valid TLS server name".into(),
            UpstreamError::Connect { .. }
            | UpstreamError::Timeout { .. }
            | UpstreamError::TlsTimeout { .. } => "the upstream could not be reached".into(),
            UpstreamError::Http(_) | UpstreamError::Http2(_) => {
                "the upstream did not speak HTTP".into()
            }
            UpstreamError::DaemonEndpoint { .. } => {
                "the enforcer's own endpoints are not for agents".into()
            }
        }
    }
}

/// The ports of the daemon's own listeners (`Config::daemon_ports`), set once it has read its configuration.
static DAEMON_PORTS: std::sync::RwLock<Vec<u16>> = std::sync::RwLock::new(Vec::new());

/// From now on, refuse every upstream connection to these ports on a loopback address: the daemon's proxy, DNS,
/// explicit proxy, metrics and review-link listeners (and a loopback webhook receiver) are never an agent's
/// upstream, whatever the policy allows; the review links would otherwise take an agent's own approval.
pub fn set_daemon_ports(ports: Vec<u16>) {
    *DAEMON_PORTS
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = ports;
}

fn is_daemon_endpoint(dst: SocketAddr) -> bool {
    let ip = match dst.ip() {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), Into::into),
        ip => ip,
    };
    (ip.is_loopback() || ip.is_unspecified())
        && DAEMON_PORTS
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&dst.port())
}

/// Requests one upstream HTTP/2 connection carries at once before the pool opens another for the same key: the
/// least a server should allow (RFC 9113 §6.5.2 recommends a `SETTINGS_MAX_CONCURRENT_STREAMS` of no fewer than
/// 100). A server that allows fewer queues the rest in the HTTP/2 client until a stream closes.
pub(crate) const STREAMS_PER_CONNECTION: usize = 100;

/// A ready client connection to the upstream.
pub(crate) struct Sender {
    http: Http,
    /// Set when writing to the connection failed (see `io::EarlyAnswer`) or it refused a request
    /// ([`Sender::retire`]): it carries no further request.
    write_failed: Arc<AtomicBool>,
    /// The place of this handle's request among its HTTP/2 connection's streams (see [`Sender::shared`]); moved to
    /// the response body by [`Sender::send`].
    stream: Option<StreamSlot>,
}

enum Http {
    H1(http1::SendRequest<Full<Bytes>>),
    H2 {
        sender: h2::client::SendRequest<Bytes>,
        streams: Arc<Streams>,
    },
}

/// One HTTP/2 connection's requests in flight, how many its server allows at once, and whether it has ended.
struct Streams {
    /// From [`Sender::shared`] to the end (or drop) of the response body.
    open: AtomicUsize,
    /// The server's `SETTINGS_MAX_CONCURRENT_STREAMS` as last seen by the connection's task (RFC 9113 §6.5.2).
    allowed: AtomicUsize,
    /// Set by the connection's task when the connection has ended.
    ended: AtomicBool,
}

impl Streams {
    fn new() -> Arc<Streams> {
        Arc::new(Streams {
            open: AtomicUsize::new(0),
            allowed: AtomicUsize::new(STREAMS_PER_CONNECTION),
            ended: AtomicBool::new(false),
        })
    }

    /// Whether another request fits: fewer in flight than the server allows, and than [`STREAMS_PER_CONNECTION`].
    fn have_room(&self) -> bool {
        let allowed = self.allowed.load(Ordering::Acquire);
        self.open.load(Ordering::Acquire) < allowed.min(STREAMS_PER_CONNECTION)
    }
}

/// One request's place on a shared HTTP/2 connection, given back when dropped.
struct StreamSlot(Arc<Streams>);

impl StreamSlot {
    fn open(streams: &Arc<Streams>) -> StreamSlot {
        streams.open.fetch_add(1, Ordering::AcqRel);
        StreamSlot(streams.clone())
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Sender {
    pub fn is_h2(&self) -> bool {
        matches!(self.http, Http::H2 { .. })
    }

    fn is_closed(&self) -> bool {
        self.write_failed.load(Ordering::Acquire)
            || match &self.http {
                Http::H1(s) => s.is_closed(),
                Http::H2 { streams, .. } => streams.ended.load(Ordering::Acquire),
            }
    }

    /// Another handle on a shared (HTTP/2) connection, holding a place among its streams; `None` for HTTP/1.1,
    /// which carries one request at a time.
    fn shared(&self) -> Option<Sender> {
        match &self.http {
            Http::H2 { sender, streams } => Some(Sender {
                http: Http::H2 {
                    sender: sender.clone(),
                    streams: streams.clone(),
                },
                write_failed: self.write_failed.clone(),
                stream: Some(StreamSlot::open(streams)),
            }),
            Http::H1(_) => None,
        }
    }

    /// Whether a request can be sent now: HTTP/1.1, the previous response was read to the end; HTTP/2, fewer
    /// requests are in flight on the connection than its server allows and than [`STREAMS_PER_CONNECTION`].
    fn is_ready(&self) -> bool {
        match &self.http {
            Http::H1(s) => s.is_ready(),
            Http::H2 { streams, .. } => streams.have_room(),
        }
    }

    /// Mark the connection as carrying no further request: the pool forgets it (its open streams run on).
    pub fn retire(&self) {
        self.write_failed.store(true, Ordering::Release);
    }

    /// Whether `self` and `other` are handles on the same HTTP/2 connection.
    fn same_connection(&self, other: &Sender) -> bool {
        match (&self.http, &other.http) {
            (Http::H2 { streams: a, .. }, Http::H2 { streams: b, .. }) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Send `req` and wait for the response head. The response body keeps the request's place among the HTTP/2
    /// connection's streams until it ends or is dropped.
    ///
    /// Over HTTP/2 the request must carry an absolute URI (`:scheme`, `:authority`) and no connection-specific
    /// field (RFC 9113 §8.2.2, §8.3.1); its body, complete already, is handed to the stream at once and sent as the
    /// server's flow-control window allows.
    pub async fn send(
        &mut self,
        req: http::Request<Bytes>,
    ) -> Result<http::Response<UpstreamBody>, HttpError> {
        let stream = self.stream.take();
        match &mut self.http {
            Http::H1(s) => {
                s.ready().await?;
                let resp = s.send_request(req.map(Full::new)).await?;
                Ok(resp.map(|body| UpstreamBody {
                    body: Received::H1(body),
                    stream,
                }))
            }
            Http::H2 { sender, .. } => {
                let mut sender = sender.clone().ready().await.map_err(not_taken)?;
                let (parts, body) = req.into_parts();
                let end = body.is_empty();
                let (response, mut send) = sender
                    .send_request(http::Request::from_parts(parts, ()), end)
                    .map_err(not_taken)?;
                if !end {
                    // Handing the body over fails only when the stream has ended already: a server may answer
                    // before it has read the whole request and then end the stream with RST_STREAM(NO_ERROR), and
                    // its response stands (RFC 9113 §8.1). Either way the response, or the stream's error, counts.
                    let _ = send.send_data(body, true);
                }
                let resp = response.await?;
                let length = content_length(resp.headers());
                Ok(resp.map(|recv| UpstreamBody {
                    body: Received::H2(RecvBody::upstream(recv), length),
                    stream,
                }))
            }
        }
    }
}

/// The error of an HTTP/2 connection that did not take a request: [`HttpError::Unsent`] when the connection has
/// gone (its server's GOAWAY, an I/O error), so another connection may take it; else (a request h2 finds malformed)
/// another connection would refuse it too.
fn not_taken(e: h2::Error) -> HttpError {
    if e.is_go_away() || e.is_io() {
        HttpError::Unsent(e)
    } else {
        HttpError::Http2(e)
    }
}

/// A response body from the upstream (hyper's for HTTP/1.1, the h2 stream's for HTTP/2), plus the request's place
/// on its HTTP/2 connection, given back once the body has ended (or is dropped), so the pool counts streams that
/// are still open.
pub(crate) struct UpstreamBody {
    body: Received,
    stream: Option<StreamSlot>,
}

enum Received {
    H1(Incoming),
    /// With what is left of the length the response's `Content-Length` gave, if it gave one.
    H2(RecvBody, Option<u64>),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        let this = self.get_mut();
        let polled = match &mut this.body {
            Received::H1(b) => Pin::new(b).poll_frame(cx).map_err(HttpError::from),
            Received::H2(b, left) => match Pin::new(b).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let (Some(left), Some(data)) = (left.as_mut(), frame.data_ref()) {
                        *left = left.saturating_sub(data.len() as u64);
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                // A server that answered before reading the whole request resets the stream with NO_ERROR (RFC
                // 9113 §8.1): the answer has ended, it has not failed.
                // One that cut its answer short of its `Content-Length` has sent a malformed response (RFC 9113
                // §8.1.1), an error.
                Poll::Ready(Some(Err(e)))
                    if e.reason() == Some(h2::Reason::NO_ERROR)
                        && matches!(left, None | Some(0)) =>
                {
                    Poll::Ready(None)
                }
                polled => polled.map_err(HttpError::from),
            },
        };
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            this.stream = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.body {
            Received::H1(b) => b.is_end_stream(),
            Received::H2(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.body {
            Received::H1(b) => b.size_hint(),
            Received::H2(_, Some(left)) => SizeHint::with_exact(*left),
            Received::H2(b, None) => b.size_hint(),
        }
    }
}

/// The length a response's `Content-Length` gives, when it gives one (RFC 9110 §8.6; the h2 crate has already
/// refused a stream whose fields disagree or whose data runs past it).
fn content_length(headers: &http::HeaderMap) -> Option<u64> {
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let first = values.next()?.to_str().ok()?.trim().parse().ok()?;
    values.next().is_none().then_some(first)
}

/// Every upstream TCP connection the proxy opens for an agent starts here (HTTP and raw TCP alike).
pub(crate) async fn connect_tcp(dst: SocketAddr) -> Result<TcpStream, UpstreamError> {
    if is_daemon_endpoint(dst) {
        return Err(UpstreamError::DaemonEndpoint { dst });
    }
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(source)) => Err(UpstreamError::Connect { dst, source }),
        Err(_) => Err(UpstreamError::Timeout { dst }),
    }
}

/// Connect to `dst`; with `tls`, verify the upstream as `host` and offer h2 (before http/1.1) when `want_h2`.
pub(crate) async fn connect(
    tls: Option<&UpstreamTls>,
    dst: SocketAddr,
    host: &str,
    want_h2: bool,
) -> Result<Sender, UpstreamError> {
    let Some(tls) = tls else {
        let tcp = EarlyAnswer::new(connect_tcp(dst).await?);
        let write_failed = tcp.write_failed();
        return h1(tcp, write_failed).await;
    };
    let name = ServerName::try_from(host.to_string()).map_err(|_| UpstreamError::Name {
        host: host.to_string(),
    })?;
    let config = if want_h2 { &tls.h2 } else { &tls.h1 };
    let (stream, write_failed) = tls_connect(config, &name, dst).await?;
    let h2 = stream.get_ref().1.alpn_protocol() == Some(H2);
    let stream = CloseDelimited(stream);
    if h2 {
        let (sender, mut conn) = h2_client().handshake(stream).await?;
        let streams = Streams::new();
        let seen = streams.clone();
        let pings = keepalive(conn.ping_pong());
        tokio::spawn(async move {
            tokio::pin!(pings);
            // Each time the connection runs, what its server now allows (its SETTINGS may change it).
            let ended = std::future::poll_fn(|cx| {
                let allowed = conn.max_concurrent_send_streams();
                seen.allowed.store(allowed, Ordering::Release);
                if pings.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(None));
                }
                Pin::new(&mut conn).poll(cx).map_err(Some)
            });
            match ended.await {
                Ok(()) => {}
                Err(Some(e)) => tracing::debug!(error = %e, "upstream h2 connection ended"),
                Err(None) => tracing::debug!("upstream stopped answering HTTP/2 pings: closing"),
            }
            seen.ended.store(true, Ordering::Release);
        });
        Ok(Sender {
            http: Http::H2 { sender, streams },
            write_failed,
            stream: None,
        })
    } else {
        h1(stream, write_failed).await
    }
}

/// Flow-control window of each upstream HTTP/2 stream: what the upstream may send ahead of an agent that reads
/// slowly (RFC 9113 §6.9), and so what such an agent can hold in the proxy's memory per request.
const STREAM_WINDOW: u32 = 1 << 20;

/// The HTTP/2 client for upstream connections.
///
/// - The connection's window is every stream's at once ([`STREAMS_PER_CONNECTION`] × [`STREAM_WINDOW`]): agents
///   that stop reading hold only their own streams' windows, never the whole connection's, so the requests they
///   share it with still get their answers.
/// - Headers up to 64 KiB are accepted, the same bound as HTTP/1.1's (see `limits`).
/// - Server push is refused (`SETTINGS_ENABLE_PUSH` 0, RFC 9113 §6.5.2): nothing the agent did not ask for.
/// - The connection's task pings the server every 30 s and closes the connection when a ping is not answered
///   within 20 s (RFC 9113 §6.7, see `http2::keepalive`): one that went silently dead fails its requests and
///   leaves the pool instead of holding every later request until the response-head timeout.
fn h2_client() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(STREAM_WINDOW * STREAMS_PER_CONNECTION as u32)
        .max_header_list_size(64 * 1024)
        .enable_push(false);
    builder
}

/// Whether a request that failed with `error` was never processed by the upstream, so it may be sent again on
/// another connection (RFC 9113 §8.7): it was not sent at all ([`HttpError::Unsent`]; for HTTP/1.1 hyper's
/// `is_canceled`, `is_closed`, or its "dispatch task is gone": the connection ended with the request still queued,
/// for which hyper has no predicate), its stream was refused (`REFUSED_STREAM`), or the server's GOAWAY excluded
/// it (a stream above its last stream ID).
pub(crate) fn unprocessed(error: &HttpError) -> bool {
    match error {
        HttpError::Unsent(_) => true,
        HttpError::Http1(e) => {
            e.is_canceled()
                || e.is_closed()
                || (e.is_user() && e.to_string().starts_with("dispatch task is gone"))
        }
        HttpError::Http2(e) => {
            (e.is_go_away() && e.is_remote())
                || (e.is_reset() && e.is_remote() && e.reason() == Some(h2::Reason::REFUSED_STREAM))
        }
    }
}

/// A TCP connection to `dst` and the TLS handshake on it with `config`, verifying `name`.
async fn tls_connect(
    config: &Arc<rustls::ClientConfig>,
    name: &ServerName<'static>,
    dst: SocketAddr,
) -> Result<(TlsStream<EarlyAnswer<TcpStream>>, Arc<AtomicBool>), UpstreamError> {
    let tcp = EarlyAnswer::new(connect_tcp(dst).await?);
    let write_failed = tcp.write_failed();
    let connector = TlsConnector::from(config.clone());
    match tokio::time::timeout(TLS_TIMEOUT, connector.connect(name.clone(), tcp)).await {
        Ok(Ok(s)) => Ok((s, write_failed)),
        Ok(Err(source)) => Err(UpstreamError::Tls { source }),
        Err(_) => Err(UpstreamError::TlsTimeout { dst }),
    }
}

async fn h1<S>(io: S, write_failed: Arc<AtomicBool>) -> Result<Sender, UpstreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream h1 connection ended");
        }
    });
    Ok(Sender {
        http: Http::H1(sender),
        write_failed,
        stream: None,
    })
}

/// Which connections a request may use: the same agent (its cgroup; agents never share an upstream connection), the
/// same original destination and scheme, the same host the certificate was verified for, and the same protocol
/// offer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub agent: Option<String>,
    pub dst: SocketAddr,
    pub tls: bool,
    pub host: String,
    pub want_h2: bool,
}

/// How long a connection is kept after it was last returned or shared.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections kept per key: idle HTTP/1.1 ones, as many as one agent keeps requests in flight to one host (so a
/// busy agent does not open and drop upstream connections, a TLS handshake each, once its concurrency passes the
/// bound), and HTTP/2 ones, each shared by up to [`STREAMS_PER_CONNECTION`] requests.
const PER_KEY: usize = 512;
/// Connections kept in all.
const IDLE_TOTAL: usize = 1024;
/// How long a request waits for the connection another request of its key is opening.
const TURN_WAIT: Duration = Duration::from_secs(3);
/// Keys whose way of opening connections is remembered (beyond it, those nobody is waiting on are forgotten).
const OPENINGS_KEPT: usize = 4096;

/// Verified upstream connections shared by every client connection, so an agent that opens a new connection per
/// request (most SDKs under load, every `curl`) costs one TLS handshake with the agent, not two.
///
/// An HTTP/1.1 connection is lent to one request at a time and handed out again only once hyper reports it ready
/// (its previous response body read to the end). An HTTP/2 connection stays in the pool while requests share it, up
/// to [`STREAMS_PER_CONNECTION`] at once. While a connection is being opened for a key whose last connection spoke
/// HTTP/2 (or that has had none yet), the key's other requests wait for it rather than each opening their own: a
/// burst of requests from one agent to one host opens one connection, not one per request.
#[derive(Default)]
pub struct Pool(std::sync::Mutex<PoolState>);

#[derive(Default)]
struct PoolState {
    /// Per key, in the order they were returned or last shared (oldest first).
    idle: HashMap<PoolKey, VecDeque<(Sender, Instant)>>,
    count: usize,
    /// Per key, how its connections are opened.
    opening: HashMap<PoolKey, Opening>,
}

/// How connections for one key are opened.
struct Opening {
    /// One at a time: the key's last connection spoke HTTP/2 or none has been opened yet, so the requests waiting
    /// can share the next one. Cleared by a connection that spoke HTTP/1.1 or failed to open: each request then
    /// opens its own at once.
    in_turn: bool,
    turn: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pool")
    }
}

impl Pool {
    /// A connection for one request with `key`: a ready one from the pool, else one `open` makes (an HTTP/2 one is
    /// put in the pool at once, for the key's other requests to share).
    ///
    /// Errors: `open`'s.
    pub(crate) async fn checkout<F>(
        &self,
        key: &PoolKey,
        open: impl FnOnce() -> F,
    ) -> Result<Sender, UpstreamError>
    where
        F: Future<Output = Result<Sender, UpstreamError>>,
    {
        if let Some(sender) = self.take(key) {
            return Ok(sender);
        }
        let _turn = self.turn(key).await;
        if let Some(sender) = self.take(key) {
            return Ok(sender);
        }
        // Boxed: opening (TLS, HTTP/2 handshake) is a large future every request would otherwise carry.
        let opened = Box::pin(open()).await;
        self.opened(key, opened.as_ref().is_ok_and(Sender::is_h2));
        let sender = opened?;
        Ok(match sender.shared() {
            Some(mine) => {
                self.put(key.clone(), sender);
                mine
            }
            None => sender,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait for `key`'s turn to open a connection, when its connections are opened one at a time (`None` when they
    /// are not).
    async fn turn(&self, key: &PoolKey) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        let turn = {
            let mut state = self.lock();
            if state.opening.len() >= OPENINGS_KEPT && !state.opening.contains_key(key) {
                state.opening.retain(|_, o| Arc::strong_count(&o.turn) > 1);
            }
            let opening = state.opening.entry(key.clone()).or_insert_with(|| Opening {
                in_turn: true,
                turn: Arc::default(),
            });
            if !opening.in_turn {
                return None;
            }
            opening.turn.clone()
        };
        // A connection that takes longer than this to open (an upstream that accepts TCP but never answers the TLS
        // hello) is not waited for: each request then opens its own, as without turns.
        let guard = tokio::time::timeout(TURN_WAIT, turn.lock_owned())
            .await
            .ok()?;
        // The connection opened before this turn may have shown that the key's connections cannot be shared.
        let in_turn = self.lock().opening.get(key).is_none_or(|o| o.in_turn);
        in_turn.then_some(guard)
    }

    /// Note how a connection for `key` turned out: HTTP/2 (`h2`), or HTTP/1.1 or not opened.
    fn opened(&self, key: &PoolKey, h2: bool) {
        if let Some(opening) = self.lock().opening.get_mut(key) {
            opening.in_turn = h2;
        }
    }

    /// A live connection for `key`, if one is ready: the most recently returned or shared. Entries are kept in
    /// that order, so the expired ones are a prefix, dropped first; the search then goes newest first and stops at
    /// the first ready connection, forgetting closed ones on the way (a take costs the entries it passes, not the
    /// whole list, under the lock). A shared (HTTP/2) connection stays, moved to the back.
    fn take(&self, key: &PoolKey) -> Option<Sender> {
        let mut state = self.lock();
        let state = &mut *state;
        let idle = state.idle.get_mut(key)?;
        let before = idle.len();
        let now = Instant::now();
        while idle
            .front()
            .is_some_and(|(_, since)| now.saturating_duration_since(*since) >= IDLE_TIMEOUT)
        {
            idle.pop_front();
        }
        let mut taken = None;
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let sender = &idle[i].0;
            if sender.is_closed() {
                idle.remove(i);
            } else if sender.is_ready() {
                let entry = idle.remove(i);
                taken = entry.map(|(sender, _)| match sender.shared() {
                    Some(shared) => {
                        idle.push_back((sender, now));
                        shared
                    }
                    None => sender,
                });
                break;
            }
        }
        state.count -= before - idle.len();
        if idle.is_empty() {
            state.idle.remove(key);
        }
        taken
    }

    /// Keep `sender` for later requests with `key` (not when the pool or the key's list is full, or it is an
    /// HTTP/2 connection the pool already holds; a dropped connection closes once its responses are read).
    pub(crate) fn put(&self, key: PoolKey, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut state = self.lock();
        if state.count >= IDLE_TOTAL {
            state.sweep();
        }
        if state.count >= IDLE_TOTAL && !(sender.is_h2() && state.evict_h1()) {
            return;
        }
        let idle = state.idle.entry(key).or_default();
        let held = idle.len() >= PER_KEY || idle.iter().any(|(s, _)| s.same_connection(&sender));
        if !held {
            idle.push_back((sender, Instant::now()));
            state.count += 1;
        }
    }
}

impl PoolState {
    /// Make room for a shared (HTTP/2) connection, which serves many requests, by closing the least recently
    /// returned idle HTTP/1.1 connection of some key; `false` when there is none.
    fn evict_h1(&mut self) -> bool {
        let oldest = self
            .idle
            .iter()
            .filter_map(|(key, idle)| {
                let (sender, since) = idle.front()?;
                (!sender.is_h2()).then_some((*since, key.clone()))
            })
            .min_by_key(|(since, _)| *since);
        let Some((_, key)) = oldest else {
            return false;
        };
        if let Some(idle) = self.idle.get_mut(&key) {
            idle.pop_front();
            if idle.is_empty() {
                self.idle.remove(&key);
            }
        }
        self.count -= 1;
        true
    }

    /// Forget closed and expired connections under every key.
    fn sweep(&mut self) {
        self.idle.retain(|_, idle| {
            idle.retain(|(s, since)| !s.is_closed() && since.elapsed() < IDLE_TIMEOUT);
            !idle.is_empty()
        });
        self.count = self.idle.values().map(VecDeque::len).sum();
    }
}
