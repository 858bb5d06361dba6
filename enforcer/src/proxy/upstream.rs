//! Upstream connections: always to the original destination IP and port (never a fresh DNS lookup), TLS with
//! SNI = the host the agent named and the real certificate verified, then an HTTP/2 or HTTP/1.1 client connection.
//! The connection is read the way a direct client reads it: an answer the upstream sent before it stopped reading
//! the request body still arrives (`io::EarlyAnswer`), and a close-delimited body ended without TLS `close_notify`
//! ends cleanly (`io::CloseDelimited`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

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
    #[error("{host:?} is not a valid TLS server name")]
    Name { host: String },
    #[error("TLS with the upstream failed: {source}")]
    Tls {
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP handshake with the upstream failed: {0}")]
    Http(#[from] hyper::Error),
}

impl UpstreamError {
    /// Whether the server refused every protocol offered by ALPN (RFC 7301 §3.2 `no_application_protocol`).
    fn refused_protocol(&self) -> bool {
        let UpstreamError::Tls { source } = self else {
            return false;
        };
        matches!(
            source
                .get_ref()
                .and_then(|e| e.downcast_ref::<rustls::Error>()),
            Some(rustls::Error::AlertReceived(
                rustls::AlertDescription::NoApplicationProtocol
            ))
        )
    }

    /// The audit reason for this failure.
    pub fn reason(&self) -> Reason {
        match self {
            UpstreamError::Name { .. } | UpstreamError::Tls { .. } => Reason::UpstreamTls,
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
            UpstreamError::Connect { .. } | UpstreamError::Timeout { .. } => {
                "the upstream could not be reached".into()
            }
            UpstreamError::Http(_) => "the upstream did not speak HTTP".into(),
        }
    }
}

/// A ready client connection to the upstream.
pub(crate) struct Sender {
    http: Http,
    /// Set when writing to the connection failed (see `io::EarlyAnswer`): it carries no further request.
    write_failed: Arc<AtomicBool>,
}

enum Http {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    pub fn is_h2(&self) -> bool {
        matches!(self.http, Http::H2(_))
    }

    fn is_closed(&self) -> bool {
        self.write_failed.load(Ordering::Acquire)
            || match &self.http {
                Http::H1(s) => s.is_closed(),
                Http::H2(s) => s.is_closed(),
            }
    }

    /// Another handle on a shared (HTTP/2) connection; `None` for HTTP/1.1, which carries one request at a time.
    fn shared(&self) -> Option<Sender> {
        match &self.http {
            Http::H2(s) => Some(Sender {
                http: Http::H2(s.clone()),
                write_failed: self.write_failed.clone(),
            }),
            Http::H1(_) => None,
        }
    }

    /// Whether a request can be sent now (HTTP/1.1: the previous response was read to the end).
    fn is_ready(&self) -> bool {
        match &self.http {
            Http::H1(s) => s.is_ready(),
            Http::H2(s) => s.is_ready(),
        }
    }

    pub async fn send(
        &mut self,
        req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper::Error> {
        match &mut self.http {
            Http::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Http::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }
}

pub(crate) async fn connect_tcp(dst: SocketAddr) -> Result<TcpStream, UpstreamError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(source)) => Err(UpstreamError::Connect { dst, source }),
        Err(_) => Err(UpstreamError::Timeout { dst }),
    }
}

/// Connect to `dst`; with `tls`, verify the upstream as `host` and offer h2 when `want_h2`. A server that refuses
/// HTTP/1.1 (the `no_application_protocol` alert: an HTTP/2-only server) is tried again offering h2 when
/// `h2_fallback` (not for upgrade requests, which need HTTP/1.1); the request is then translated (see `forward`).
pub(crate) async fn connect(
    tls: Option<&UpstreamTls>,
    dst: SocketAddr,
    host: &str,
    want_h2: bool,
    h2_fallback: bool,
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
    let (stream, write_failed) = match tls_connect(config, &name, dst).await {
        Err(e) if !want_h2 && h2_fallback && e.refused_protocol() => {
            tracing::debug!(dst = %dst, "the upstream refused HTTP/1.1: offering h2");
            tls_connect(&tls.h2, &name, dst).await?
        }
        other => other?,
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(H2);
    let stream = CloseDelimited(stream);
    if h2 {
        let (sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream h2 connection ended");
            }
        });
        Ok(Sender {
            http: Http::H2(sender),
            write_failed,
        })
    } else {
        h1(stream, write_failed).await
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
        Err(_) => Err(UpstreamError::Timeout { dst }),
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
    })
}

/// Which idle connections a request may reuse: the same agent (its cgroup; agents never share an upstream
/// connection), the same original destination and scheme, the same host the certificate was verified for, and the
/// same protocol offer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct PoolKey {
    pub agent: Option<String>,
    pub dst: SocketAddr,
    pub tls: bool,
    pub host: String,
    pub want_h2: bool,
}

/// How long an idle upstream connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle HTTP/1.1 connections kept per key (an HTTP/2 connection carries every concurrent request of its key): as
/// many as one agent keeps requests in flight to one host, so a busy agent does not open and drop upstream
/// connections (a TLS handshake each) once its concurrency passes the bound.
const IDLE_PER_KEY: usize = 512;
/// Idle connections kept in all.
const IDLE_TOTAL: usize = 1024;

/// Verified upstream connections shared by every client connection, so an agent that opens a new connection per
/// request (most SDKs under load, every `curl`) costs one TLS handshake with the agent, not two. An HTTP/2
/// connection is shared by concurrent requests; an HTTP/1.1 connection is lent to one request at a time and is
/// handed out again only once hyper reports it ready (its previous response body read to the end).
#[derive(Default)]
pub struct Pool(std::sync::Mutex<PoolState>);

#[derive(Default)]
struct PoolState {
    /// Per key, in the order they were returned (oldest first).
    idle: std::collections::HashMap<
        PoolKey,
        std::collections::VecDeque<(Sender, std::time::Instant)>,
    >,
    count: usize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pool")
    }
}

impl Pool {
    /// A live connection for `key`, if one is idle: the most recently returned ready one. Entries are kept in the
    /// order they were returned, so the expired ones are a prefix, dropped first; the search then goes newest first
    /// and stops at the first ready connection, forgetting closed ones on the way (a take costs the entries it
    /// passes, not the whole list, under the lock).
    pub(crate) fn take(&self, key: &PoolKey) -> Option<Sender> {
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let state = &mut *state;
        let idle = state.idle.get_mut(key)?;
        let before = idle.len();
        let now = std::time::Instant::now();
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
                taken = match sender.shared() {
                    Some(shared) => Some(shared),
                    None => idle.remove(i).map(|(s, _)| s),
                };
                break;
            }
        }
        state.count -= before - idle.len();
        if idle.is_empty() {
            state.idle.remove(key);
        }
        taken
    }

    /// Keep `sender` for later requests with `key` (dropped when the pool is full or it already holds an HTTP/2
    /// connection for `key`; a dropped connection closes once its response is read).
    pub(crate) fn put(&self, key: PoolKey, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if state.count >= IDLE_TOTAL {
            state.sweep();
        }
        if state.count >= IDLE_TOTAL {
            return;
        }
        let idle = state.idle.entry(key).or_default();
        let full = if sender.is_h2() {
            idle.iter().any(|(s, _)| s.is_h2() && !s.is_closed())
        } else {
            idle.len() >= IDLE_PER_KEY
        };
        if !full {
            idle.push_back((sender, std::time::Instant::now()));
            state.count += 1;
        }
    }
}

impl PoolState {
    /// Forget closed and expired connections under every key.
    fn sweep(&mut self) {
        self.idle.retain(|_, idle| {
            idle.retain(|(s, since)| !s.is_closed() && since.elapsed() < IDLE_TIMEOUT);
            !idle.is_empty()
        });
        self.count = self
            .idle
            .values()
            .map(std::collections::VecDeque::len)
            .sum();
    }
}
