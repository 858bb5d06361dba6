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
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

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
    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let ctx = ctx.clone();
        let conn = conn.clone();
        let req = req.map(ClientBody::Http1);
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

/// A complete body the proxy answers with itself.
pub(crate) fn full(b: Bytes) -> ProxyBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}
