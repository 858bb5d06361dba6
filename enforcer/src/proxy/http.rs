//! The HTTP server side of an accepted (and possibly TLS-terminated) client connection: hyper serving HTTP/1.1, or
//! `http2` serving HTTP/2, within the resource bounds of `limits`, each request handed to
//! [`super::exchange::handle`]. Also the connection facts every exchange on it shares ([`Conn`]) and the body type
//! the proxy answers with.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::body::ClientBody;
use super::{exchange, http2, ProxyContext};
use crate::model::{Agent, Scheme};

/// The body type the proxy answers with: the upstream's streamed body or a small buffered one.
pub type ProxyBody = BoxBody<Bytes, super::upstream::HttpError>;

/// One accepted client connection, as the exchanges on it need it.
#[derive(Debug, Clone)]
pub(crate) struct Conn {
    pub scheme: Scheme,
    /// The SNI the agent sent (TLS only).
    pub sni: Option<String>,
    /// The original destination.
    pub dst: SocketAddr,
    /// A host name the daemon itself resolved to `dst` (explicit proxy: the CONNECT or absolute-form target). A
    /// plain-HTTP request naming any other host must be bound to `dst` by the `HostBinder`.
    pub resolved_host: Option<String>,
    pub agent: Agent,
}

/// Serve HTTP/1.1, or HTTP/2 when `h2` (ALPN chose h2, or the client sent the HTTP/2 preface over plain TCP), on
/// `io`. `head_timeout` bounds how long a request head (HTTP/1.1) or an idle spell without a stream (HTTP/2) may
/// take.
pub(crate) async fn serve<S>(
    ctx: Arc<ProxyContext>,
    io: S,
    conn: Conn,
    h2: bool,
    head_timeout: std::time::Duration,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if h2 {
        // Boxed: a connection served over HTTP/1.1 need not hold the room HTTP/2 serving takes.
        return Box::pin(http2::serve(ctx, io, conn, head_timeout)).await;
    }
    let dst = conn.dst;
    // Shared, not copied, by the exchanges on this connection.
    let conn = Arc::new(conn);
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let ctx = ctx.clone();
        let conn = conn.clone();
        let req = Box::new(detach_head(req).map(ClientBody::Http1));
        async move { Ok::<_, Infallible>(exchange::handle(&ctx, &conn, req).await) }
    });
    let limits = super::limits::limits();
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_headers(limits.h1_max_headers)
        .max_buf_size(limits.h1_max_buf_size)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await
    {
        tracing::debug!(dst = %dst, error = %e, "client connection ended with an error");
    }
}

/// `req` with a head that owns its bytes: its target and header values copied into one buffer of their own.
///
/// hyper's HTTP/1.1 parser hands out a head whose target and header values are slices of the connection's 8 KiB
/// read buffer. An exchange keeps its head until the upstream has taken the request, while hyper, with the request
/// in flight, reads on to notice a client that goes away: it finds its buffer shared and allocates another. Copied
/// before the exchange starts (the service is called from within hyper's read), the head costs its own few hundred
/// bytes and hyper reuses its buffer — 8 KiB less per connection with a request in flight. A value that does not
/// copy (none: the bytes were valid once) stays as it was.
pub(crate) fn detach_head<B>(req: http::Request<B>) -> http::Request<B> {
    use std::fmt::Write as _;
    let (mut parts, body) = req.into_parts();
    // The target as it renders: `scheme://authority` (absolute form, to an explicit proxy) and the path and query.
    let target_hint = parts
        .uri
        .authority()
        .map_or(0, |a| a.as_str().len() + "https://".len())
        + parts.uri.path_and_query().map_or(1, |p| p.as_str().len());
    let values_len = parts.headers.values().map(|v| v.len()).sum::<usize>();
    let mut buf = bytes::BytesMut::with_capacity(target_hint + values_len);
    // Writing into a `BytesMut` cannot fail; it grows if the hint was short.
    let _ = write!(buf, "{}", parts.uri);
    let target_len = buf.len();
    for value in parts.headers.values() {
        buf.extend_from_slice(value.as_bytes());
    }
    let owned = buf.freeze();
    if let Ok(uri) = http::Uri::from_maybe_shared(owned.slice(..target_len)) {
        parts.uri = uri;
    }
    let mut at = target_len;
    for value in parts.headers.values_mut() {
        let end = at + value.len();
        if let Ok(mut copy) = http::HeaderValue::from_maybe_shared(owned.slice(at..end)) {
            copy.set_sensitive(value.is_sensitive());
            *value = copy;
        }
        at = end;
    }
    http::Request::from_parts(parts, body)
}

/// A complete body the proxy answers with itself.
pub(crate) fn full(b: Bytes) -> ProxyBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A head as hyper's parser makes it: target and values slices of one read buffer.
    #[test]
    fn detached_head_keeps_no_slice_of_the_read_buffer() {
        let read_buf = Bytes::from_static(b"/v1/messages?beta=true api-key secret");
        let mut req = http::Request::new(());
        *req.uri_mut() = http::Uri::from_maybe_shared(read_buf.slice(0..22)).unwrap();
        let mut secret = http::HeaderValue::from_maybe_shared(read_buf.slice(31..)).unwrap();
        secret.set_sensitive(true);
        req.headers_mut().insert("x-api-key", secret);
        req.headers_mut().append(
            "x-api-key",
            http::HeaderValue::from_maybe_shared(read_buf.slice(23..30)).unwrap(),
        );
        req.headers_mut()
            .insert("accept", http::HeaderValue::from_static("*/*"));

        let req = detach_head(req);

        let within = |p: *const u8| read_buf.as_ptr_range().contains(&p);
        assert_eq!(req.uri(), "/v1/messages?beta=true");
        assert!(!within(req.uri().path().as_ptr()));
        let keys: Vec<_> = req.headers().get_all("x-api-key").iter().collect();
        assert_eq!(keys, ["secret", "api-key"]);
        assert!(keys[0].is_sensitive() && !keys[1].is_sensitive());
        assert!(keys.iter().all(|v| !within(v.as_bytes().as_ptr())));
        assert_eq!(req.headers()["accept"], "*/*");

        // The absolute form an explicit proxy receives for plain HTTP keeps its scheme and authority.
        let mut req = http::Request::new(());
        *req.uri_mut() = http::Uri::from_static("http://api.example.test:8080/v1/models?x=1");
        let req = detach_head(req);
        assert_eq!(req.uri(), "http://api.example.test:8080/v1/models?x=1");
        assert_eq!(req.uri().authority().unwrap(), "api.example.test:8080");
    }
}
