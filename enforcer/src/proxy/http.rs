//! The HTTP server side of an accepted (and possibly TLS-terminated) client connection: hyper serving HTTP/1.1 and
//! HTTP/2 within the resource bounds of `limits`, each request handed to [`super::exchange::handle`]. Also the
//! connection facts every exchange on it shares ([`Conn`]) and the body type the proxy answers with.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{exchange, ProxyContext};
use crate::model::{Agent, Scheme};

/// HTTP/2 pings to notice dead clients.
const H2_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(30);

/// The body type the proxy answers with: the upstream's streamed body or a small buffered one.
pub(crate) type ProxyBody = BoxBody<Bytes, hyper::Error>;

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

/// Serve HTTP/1.1 and HTTP/2 on `io`. `h2` is true when ALPN chose h2, in which case only HTTP/2 is spoken.
pub(crate) async fn serve<S>(ctx: Arc<ProxyContext>, io: S, conn: Conn, h2: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let dst = conn.dst;
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(exchange::handle(&ctx, &conn, req).await) }
    });
    let limits = super::limits::limits();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(limits.h1_max_headers)
        .max_buf_size(limits.h1_max_buf_size);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEPALIVE)
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.h2_max_header_list_size)
        .max_pending_accept_reset_streams(limits.h2_max_pending_accept_reset_streams)
        .max_send_buf_size(limits.h2_max_send_buf_size);
    if h2 {
        builder = builder.http2_only();
    }
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
    {
        tracing::debug!(dst = %dst, error = %e, "client connection ended with an error");
    }
}

/// A complete body the proxy answers with itself.
pub(crate) fn full(b: Bytes) -> ProxyBody {
    Full::new(b).map_err(|never| match never {}).boxed()
}
