//! The accept path shared by both modes: sniff the first bytes of a connection whose original destination is known,
//! then hand it to TLS termination, the plain-HTTP server, or the destination-only TCP relay (`tunnel`).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;

use super::http::{self, Conn};
use super::io::Prefixed;
use super::tls::{server_config, Hello, H2};
use super::{tunnel, ProxyContext, Target};
use crate::model::{Reason, RequestSummary, Scheme};

/// How long a client may stay silent before the server is let speak first (see `tunnel::server_first`).
pub(crate) const SNIFF_TIMEOUT: Duration = Duration::from_millis(800);
/// How long the TLS handshake with the agent may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Bytes the sniffer reads at most before deciding: a whole request line, up to the HTTP/1.1 head limit (`limits`).
const SNIFF_MAX: usize = 64 * 1024;
/// The longest method the sniffer waits for (RFC 9110 §9.1: any token is a method).
const METHOD_MAX: usize = 32;

/// What the first bytes of a connection are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Tls,
    Http,
    Other,
}

/// Methods that make a connection HTTP as soon as they and a space arrive (RFC 9110 §9.3, RFC 5789).
const METHODS: &[&[u8]] = &[
    b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT",
];

/// The start of the HTTP/2 connection preface (RFC 9113 §3.4), which has a request line's shape.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// Classify the first bytes; `None` while more are needed to decide. What an HTTP server would read as a request is
/// HTTP, so it is decided as one and never relayed raw: empty lines before a request line (RFC 9112 §2.2: a server
/// ignores them), and a request line of any method (a token, a space, a target, a space and an HTTP version, RFC
/// 9112 §3), not only the well-known ones.
pub(crate) fn sniff(buf: &[u8]) -> Option<Kind> {
    match buf {
        [] | [0x16] => None,
        [0x16, 0x03, ..] => Some(Kind::Tls),
        [b'\r' | b'\n', ..] => Some(Kind::Http),
        _ => request_line(buf),
    }
}

/// Whether `buf` starts an HTTP/1 request line (`None` while it may still).
fn request_line(buf: &[u8]) -> Option<Kind> {
    let method = buf.iter().take_while(|b| is_tchar(**b)).count();
    if method > METHOD_MAX || method == 0 {
        return Some(Kind::Other);
    }
    if method == buf.len() {
        return None;
    }
    if buf[method] != b' ' {
        return Some(Kind::Other);
    }
    if METHODS.contains(&&buf[..method]) {
        return Some(Kind::Http);
    }
    let Some(end) = buf.iter().position(|b| *b == b'\n') else {
        // Not yet a whole line: wait for it; one longer than a head may be is read as HTTP, which refuses it.
        return (buf.len() >= SNIFF_MAX).then_some(Kind::Http);
    };
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let version = line.len().checked_sub(9).map(|at| &line[at..]);
    let http = version.is_some_and(|v| {
        v.starts_with(b" HTTP/") && v[6].is_ascii_digit() && v[7] == b'.' && v[8].is_ascii_digit()
    });
    Some(if http { Kind::Http } else { Kind::Other })
}

/// Whether undecided first bytes that stall are waited for like a request head (the start of a TLS record, of a
/// well-known method, or a token and a space: a request line on its way), rather than taken after the sniff timeout
/// for a text protocol's client that sent a word and waits for an answer (an echo's `ping`).
pub(crate) fn patient(buf: &[u8]) -> bool {
    !buf.is_empty()
        && (buf[0] == 0x16 || buf.contains(&b' ') || METHODS.iter().any(|m| m.starts_with(buf)))
}

/// A token character (RFC 9110 §5.6.2).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Serve one connection whose target is known.
pub(crate) async fn handle<S>(ctx: Arc<ProxyContext>, mut io: S, target: Target)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Port 53 is DNS over TCP: every query on it is decided by the DNS stage, nothing passes as raw TCP.
    if let Some(dns) = ctx
        .dns
        .clone()
        .filter(|_| target.dst.port() == crate::dns::PORT)
    {
        return crate::dns::serve_tcp(ctx, dns, io, target.dst, target.agent).await;
    }
    let mut buf = BytesMut::with_capacity(64);
    let kind = loop {
        if let Some(kind) = sniff(&buf) {
            break kind;
        }
        // A client silent from the start may speak a server-speaks-first protocol; one that stops within the
        // prefix of TLS or an HTTP method is waited for like any request head, never relayed raw.
        let wait = if patient(&buf) {
            target.head_timeout
        } else {
            SNIFF_TIMEOUT
        };
        match tokio::time::timeout(wait, io.read_buf(&mut buf)).await {
            // The raw-TCP paths run boxed: a connection served as HTTP need not keep their room.
            Err(_) if buf.is_empty() => {
                let Some((first, back)) = Box::pin(tunnel::server_first(&ctx, io, &target)).await
                else {
                    return;
                };
                (buf, io) = (first, back);
            }
            Err(_) if !patient(&buf) => break Kind::Other,
            Err(_) => {
                tracing::debug!(dst = %target.dst, "client stalled within its first bytes");
                return;
            }
            Ok(Ok(0)) if buf.is_empty() => return,
            Ok(Ok(0)) => break Kind::Other,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(dst = %target.dst, error = %e, "client read failed before the first bytes");
                return;
            }
        }
    };
    // HTTP/2 with prior knowledge (RFC 9113 §3.3): the connection preface instead of a request line.
    let h2_preface = buf.starts_with(H2_PREFACE);
    let first = buf.freeze();
    tracing::debug!(dst = %target.dst, kind = ?kind, "connection sniffed");
    match kind {
        Kind::Other => Box::pin(tunnel::relay(ctx, io, target, first)).await,
        Kind::Tls => {
            let io = Prefixed::new(first, io);
            // The handshake runs boxed and is gone before serving starts: a connection kept open for its next
            // request holds only what serving needs.
            let head_timeout = target.head_timeout;
            if let Some((tls, conn, h2)) = Box::pin(terminate_tls(&ctx, io, target)).await {
                http::serve(ctx, tls, conn, h2, head_timeout).await;
            }
        }
        Kind::Http => {
            let io = Prefixed::new(first, io);
            let conn = Conn {
                scheme: Scheme::Http,
                sni: None,
                dst: target.dst,
                resolved_host: target.host_hint,
                agent: target.agent,
            };
            http::serve(ctx, io, conn, h2_preface, target.head_timeout).await;
        }
    }
}

/// The TLS handshake with the agent, as the proxy's own server for the name it asked for: the stream, the
/// connection's facts and whether ALPN chose h2; `None` when the handshake did not complete (recorded where the
/// client asked for something the proxy refuses).
///
/// The stream is boxed: its TLS session is over a kilobyte, and a value moved from one future into the next keeps
/// its room in each (the accept task, `http::serve`, hyper's connection) for as long as the connection is served.
async fn terminate_tls<S>(
    ctx: &Arc<ProxyContext>,
    io: S,
    target: Target,
) -> Option<(Box<TlsStream<S>>, Conn, bool)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), io);
    // Shorter under pressure (see `limits`): a client that is slow to say hello holds a connection slot.
    let handshake_timeout = HANDSHAKE_TIMEOUT.min(target.head_timeout);
    let start = match tokio::time::timeout(handshake_timeout, acceptor).await {
        Ok(Ok(start)) => start,
        Ok(Err(e)) => {
            tracing::debug!(dst = %target.dst, error = %e, "unreadable ClientHello");
            return None;
        }
        Err(_) => {
            tracing::debug!(dst = %target.dst, "ClientHello timed out");
            return None;
        }
    };
    let hello = Hello::read(&start.client_hello());
    if hello.client_sent_alpn && hello.alpn.is_empty() {
        // An ALPN protocol the proxy cannot inspect: refused deliberately (and audited), not failed by accident.
        let summary = RequestSummary {
            scheme: Some(Scheme::Https),
            host: hello.sni.clone(),
            ip: Some(target.dst.ip()),
            port: target.dst.port(),
            ..RequestSummary::default()
        };
        let message =
            "the TLS client offered no ALPN protocol the proxy can inspect (h2, http/1.1)";
        let policy = ctx.policy.current();
        ctx.record_refusal(
            &policy,
            &target.agent,
            summary,
            (Reason::BadRequest, None),
            message,
        )
        .await;
        return None;
    }
    let name = hello
        .sni
        .clone()
        .or_else(|| target.host_hint.clone())
        .unwrap_or_else(|| target.dst.ip().to_string());
    let leaf = match ctx.ca.leaf(&name).await {
        Ok(leaf) => leaf,
        Err(e) => {
            tracing::warn!(error = %e, "cannot mint a leaf for this connection");
            return None;
        }
    };
    let config = match server_config(leaf, hello.alpn.clone(), hello.sni.is_some()) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot build the TLS server configuration");
            return None;
        }
    };
    let tls = match tokio::time::timeout(handshake_timeout, start.into_stream(config)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(dst = %target.dst, error = %e, "TLS handshake with the agent failed");
            super::tls::record_agent_handshake_failure(ctx, &target, hello.sni, Some(&e)).await;
            return None;
        }
        Err(_) => {
            tracing::debug!(dst = %target.dst, "TLS handshake with the agent timed out");
            super::tls::record_agent_handshake_failure(ctx, &target, hello.sni, None).await;
            return None;
        }
    };
    let h2 = tls.get_ref().1.alpn_protocol() == Some(H2);
    let conn = Conn {
        scheme: Scheme::Https,
        sni: hello.sni,
        dst: target.dst,
        resolved_host: target.host_hint,
        agent: target.agent,
    };
    Some((Box::new(tls), conn, h2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_tls_http_and_other() {
        assert_eq!(sniff(b""), None);
        assert_eq!(sniff(&[0x16]), None);
        assert_eq!(sniff(&[0x16, 0x03, 0x01]), Some(Kind::Tls));
        assert_eq!(sniff(b"GE"), None);
        assert_eq!(sniff(b"GET /"), Some(Kind::Http));
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), Some(Kind::Http));
        assert_eq!(sniff(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(sniff(b"SSH-2.0-OpenSSH_9.6\r\n"), Some(Kind::Other));
        assert_eq!(sniff(&[0x16, 0x01]), Some(Kind::Other));
        assert_eq!(sniff(&[0x00, 0x00, 0x00, 0x08]), Some(Kind::Other));
        assert_eq!(sniff(b"GETX"), None);
        assert_eq!(sniff(b"GETX /"), None);
        assert_eq!(sniff(b"GETX / HTTP/1.1\r\n"), Some(Kind::Http));
        assert_eq!(sniff(b"QUERY /search HTTP/1.1\r\n"), Some(Kind::Http));
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), Some(Kind::Http));
        assert_eq!(sniff(b"SET key value\r\n"), Some(Kind::Other));
        assert_eq!(sniff(b"*1\r\n$4\r\nPING\r\n"), Some(Kind::Other));
        assert_eq!(sniff(&[b'A'; 40]), Some(Kind::Other));
        assert!(patient(b"GE") && patient(b"QUERY /ev") && patient(&[0x16]));
        assert!(!patient(b"ping") && !patient(b""));
        let long = [b"QUERY /".as_slice(), &[b'a'; SNIFF_MAX]].concat();
        assert_eq!(sniff(&long), Some(Kind::Http));
        assert_eq!(sniff(b"\r\n"), Some(Kind::Http));
        assert_eq!(sniff(b"\nGET /"), Some(Kind::Http));
    }
}
