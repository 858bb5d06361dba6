//! The HTTP/2 server side of a client connection, on the h2 crate directly: hyper's HTTP/2 server never answers
//! `Expect: 100-continue` (hyperium/hyper#2743), so a client that waits for `100` before sending its body — curl for
//! its expect timeout, Node's http2 client forever — would stall on every such request. Here each stream is an
//! exchange ([`super::exchange::handle`]) whose request body sends the `100 (Continue)` the first time it is read
//! (RFC 9110 §10.1.1), as hyper does for HTTP/1.1: a request refused on its head gets its final status instead.
//!
//! Also owned here: the connection's settings (`limits`), keep-alive pings (a client that stops answering them is
//! dropped), the idle bound (a connection without an open stream for the head timeout is closed with GOAWAY, so an
//! idle or slow client cannot hold a connection slot), a client's `RST_STREAM` ending its exchange, and the response
//! sent within the stream's flow-control window with connection-specific fields removed (RFC 9113 §8.2.2).

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::server::{Builder, SendResponse};
use h2::{Ping, PingPong, Reason, RecvStream, SendStream};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;

use super::body::ClientBody;
use super::http::{Conn, ProxyBody};
use super::{exchange, ProxyContext};

/// How often an idle connection's client is pinged, and how long it has to answer.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Flow-control windows offered to clients (hyper's server defaults).
const WINDOW: u32 = 1024 * 1024;
/// Streams the client's errors made the proxy reset before the connection is closed (hyper's default).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// Serve HTTP/2 on `io` (after the client's preface, TLS with ALPN `h2` or prior knowledge over plain TCP) until the
/// client leaves, stops answering pings, or stays without an open stream for `idle`.
pub(crate) async fn serve<S>(ctx: Arc<ProxyContext>, io: S, conn: Conn, idle: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let dst = conn.dst;
    // Shared, not copied, by the streams on this connection.
    let conn = Arc::new(conn);
    let limits = super::limits::limits();
    let mut builder = Builder::new();
    builder
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.h2_max_header_list_size)
        .max_pending_accept_reset_streams(limits.h2_max_pending_accept_reset_streams)
        .max_send_buffer_size(limits.h2_max_send_buf_size)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS));
    let mut connection = match tokio::time::timeout(idle, builder.handshake(io)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(dst = %dst, error = %e, "HTTP/2 handshake with the client failed");
            return;
        }
        Err(_) => {
            tracing::debug!(dst = %dst, "HTTP/2 handshake with the client timed out");
            return;
        }
    };
    let keepalive = keepalive(connection.ping_pong());
    tokio::pin!(keepalive);
    let mut idle_since = tokio::time::Instant::now();
    let mut closing = false;
    loop {
        let idle_check = tokio::time::sleep_until(idle_since + idle);
        tokio::select! {
            accepted = connection.accept() => match accepted {
                Some(Ok((req, reply))) => {
                    idle_since = tokio::time::Instant::now();
                    tokio::spawn(stream(ctx.clone(), Arc::clone(&conn), req, reply));
                }
                Some(Err(e)) => {
                    tracing::debug!(dst = %dst, error = %e, "client HTTP/2 connection ended with an error");
                    return;
                }
                None => return,
            },
            () = &mut keepalive, if !closing => {
                tracing::debug!(dst = %dst, "client stopped answering HTTP/2 pings: closing");
                connection.abrupt_shutdown(Reason::NO_ERROR);
                closing = true;
            }
            () = idle_check, if !closing => {
                if connection.has_streams() {
                    idle_since = tokio::time::Instant::now();
                } else {
                    tracing::debug!(dst = %dst, "client HTTP/2 connection idle: closing");
                    connection.graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// Ping the peer every [`KEEPALIVE_INTERVAL`]; completes when one goes unanswered for [`KEEPALIVE_TIMEOUT`]. Used
/// for clients here and for upstream servers by `upstream`.
pub(crate) async fn keepalive(ping_pong: Option<PingPong>) {
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        if ping_pong.send_ping(Ping::opaque()).is_err() {
            return std::future::pending().await;
        }
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, poll_fn(|cx| ping_pong.poll_pong(cx))).await {
            Ok(Ok(_)) => {}
            // The connection is ending anyway.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

/// One stream: the exchange (sending `100 Continue` when its body is first read), ended early when the client resets
/// the stream, then the response.
async fn stream(
    ctx: Arc<ProxyContext>,
    conn: Arc<Conn>,
    req: Request<RecvStream>,
    mut reply: SendResponse<Bytes>,
) {
    let (parts, recv) = req.into_parts();
    let expects_continue = !recv.is_end_stream()
        && parts
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let (continue_tx, mut continue_rx) = if expects_continue {
        let (tx, rx) = oneshot::channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let body = ClientBody::Http2(RecvBody {
        recv,
        data_done: false,
        continue_tx,
    });
    let req = Box::new(Request::from_parts(parts, body));
    let exchange = exchange::handle(&ctx, &conn, req);
    tokio::pin!(exchange);
    let resp = loop {
        tokio::select! {
            resp = &mut exchange => break resp,
            reset = poll_fn(|cx| reply.poll_reset(cx)) => {
                // Dropping the exchange records it as abandoned by the client.
                tracing::debug!(reason = ?reset.ok(), "client reset its HTTP/2 stream");
                return;
            }
            Ok(()) = continued(&mut continue_rx), if continue_rx.is_some() => {
                continue_rx = None;
                let mut interim = Response::new(());
                *interim.status_mut() = StatusCode::CONTINUE;
                if let Err(e) = reply.send_informational(interim) {
                    tracing::debug!(error = %e, "could not send 100 Continue");
                }
            }
        }
    };
    send_response(reply, resp).await;
}

/// The signal that the exchange began reading the body (never, once it was taken).
async fn continued(
    rx: &mut Option<oneshot::Receiver<()>>,
) -> Result<(), oneshot::error::RecvError> {
    match rx {
        Some(rx) => rx.await,
        None => std::future::pending().await,
    }
}

/// Send `resp` on the stream: the head without connection-specific fields, then the body within flow control.
async fn send_response(mut reply: SendResponse<Bytes>, resp: Response<ProxyBody>) {
    let (mut head, body) = resp.into_parts();
    strip_connection_fields(&mut head.headers);
    let end = body.is_end_stream();
    if !end {
        if let Some(len) = body.size_hint().exact() {
            head.headers
                .entry(http::header::CONTENT_LENGTH)
                .or_insert_with(|| len.into());
        }
    }
    match reply.send_response(Response::from_parts(head, ()), end) {
        Ok(tx) if !end => pipe(tx, body).await,
        Ok(_) => {}
        Err(e) => {
            tracing::debug!(error = %e, "could not send the response head");
            reply.send_reset(Reason::INTERNAL_ERROR);
        }
    }
}

/// HTTP/2 forbids connection-specific fields (RFC 9113 §8.2.2): `Connection` and what it names, `Keep-Alive`,
/// `Proxy-Connection`, `Transfer-Encoding`, `Upgrade`, and in a response any `TE`.
fn strip_connection_fields(headers: &mut HeaderMap) {
    super::forward::strip_hop_by_hop(headers, false);
    headers.remove(http::header::TE);
}

/// Stream `body` into `tx`, each chunk sent as the stream's window allows; a body error or the client's reset ends
/// the stream (an upstream failure mid-body must not look like a complete response).
async fn pipe(mut tx: SendStream<Bytes>, mut body: ProxyBody) {
    loop {
        let frame = tokio::select! {
            _ = poll_fn(|cx| tx.poll_reset(cx)) => return,
            frame = body.frame() => frame,
        };
        let frame = match frame {
            None => {
                let _ = tx.send_data(Bytes::new(), true);
                return;
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "response body failed: resetting the client's stream");
                tx.send_reset(Reason::INTERNAL_ERROR);
                return;
            }
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let end = body.is_end_stream();
                if send_data(&mut tx, data, end).await.is_err() || end {
                    return;
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = tx.send_trailers(trailers);
                    return;
                }
            }
        }
    }
}

/// Send `data` in pieces no larger than the capacity the stream is granted, so nothing piles up unbounded.
async fn send_data(tx: &mut SendStream<Bytes>, mut data: Bytes, end: bool) -> Result<(), ()> {
    if data.is_empty() {
        return if end {
            tx.send_data(data, true).map_err(|_| ())
        } else {
            Ok(())
        };
    }
    while !data.is_empty() {
        tx.reserve_capacity(data.len());
        let granted = loop {
            let now = tx.capacity();
            if now > 0 {
                break now;
            }
            match poll_fn(|cx| tx.poll_capacity(cx)).await {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Err(()),
            }
        };
        let chunk = data.split_to(granted.min(data.len()));
        tx.send_data(chunk, end && data.is_empty())
            .map_err(|_| ())?;
    }
    Ok(())
}

/// A body read from an HTTP/2 stream: its flow-control window is released as the data is read. A client's request
/// body's first read sends the `100 Continue` a client that sent `Expect: 100-continue` waits for; an upstream's
/// response body ([`RecvBody::upstream`]) has none to send.
#[derive(Debug)]
pub(crate) struct RecvBody {
    recv: RecvStream,
    data_done: bool,
    continue_tx: Option<oneshot::Sender<()>>,
}

impl RecvBody {
    /// An upstream's response body.
    pub(crate) fn upstream(recv: RecvStream) -> RecvBody {
        RecvBody {
            recv,
            data_done: false,
            continue_tx: None,
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if let Some(tx) = self.continue_tx.take() {
            let _ = tx.send(());
        }
        if !self.data_done {
            match self.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => self.data_done = true,
            }
        }
        match self.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
