//! Byte-stream plumbing: a stream that first replays bytes already read from it (what the sniffer looked at), so
//! the TLS acceptor, the HTTP server or the TCP relay each see the connection from its first byte; and the two
//! adapters the upstream side needs so that the proxy's HTTP client reads what a direct client would read
//! ([`EarlyAnswer`], [`CloseDelimited`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `inner`, with `prefix` read first.
#[derive(Debug)]
pub(crate) struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// An upstream connection that keeps being read after writing to it failed. A server may answer before it has read
/// the whole request body and close the connection (a `413` for an oversized body, a `401`, a `429`); the kernel
/// then resets it and the rest of the body cannot be sent. RFC 9112 §9.3 asks a client to stop sending and read the
/// answer. hyper's HTTP/1.1 client gives up on the exchange at the first write error, losing an answer that is
/// already in the socket's receive queue, so here the failed write is reported as done (the rest of the body goes
/// nowhere) and reading continues: the answer arrives, or reading fails and the exchange fails as before. A
/// connection that failed a write is never reused ([`EarlyAnswer::write_failed`]).
#[derive(Debug)]
pub(crate) struct EarlyAnswer<S> {
    inner: S,
    failed: Arc<AtomicBool>,
}

impl<S> EarlyAnswer<S> {
    pub fn new(inner: S) -> Self {
        EarlyAnswer {
            inner,
            failed: Arc::default(),
        }
    }

    /// Set once a write failed: the connection must not carry another request.
    pub fn write_failed(&self) -> Arc<AtomicBool> {
        self.failed.clone()
    }

    /// A write error the peer caused by closing: swallowed (reading goes on); any other error is kept.
    fn swallow<T>(&self, result: io::Result<T>, done: T) -> io::Result<T> {
        match result {
            Err(e) if peer_closed(&e) => {
                self.failed.store(true, Ordering::Release);
                Ok(done)
            }
            other => other,
        }
    }
}

fn peer_closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for EarlyAnswer<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for EarlyAnswer<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.failed.load(Ordering::Acquire) {
            return Poll::Ready(Ok(buf.len()));
        }
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        polled.map(|r| self.swallow(r, buf.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let all = bufs.iter().map(|b| b.len()).sum();
        if self.failed.load(Ordering::Acquire) {
            return Poll::Ready(Ok(all));
        }
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        polled.map(|r| self.swallow(r, all))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.failed.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        polled.map(|r| self.swallow(r, ()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.failed.load(Ordering::Acquire) {
            return Poll::Ready(Ok(()));
        }
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        polled.map(|r| self.swallow(r, ()))
    }
}

/// A TLS connection whose end without `close_notify` reads as a plain end of stream. rustls reports a peer that
/// closed TCP without it as `UnexpectedEof`, which hyper turns into an error even for a response delimited by the
/// close (RFC 9112 §6.3 rule 8), where the close *is* the end. Such a response is, strictly, incomplete (RFC 9112
/// §9.8), but curl and browsers accept it, and so does the proxy — so the agent sees what a direct client sees: a
/// close-delimited body ends cleanly, while a body with a `Content-Length` or chunked framing that stops short is
/// still an incomplete message (hyper checks the framing) and reaches the agent as an aborted one.
#[derive(Debug)]
pub(crate) struct CloseDelimited<S>(pub S);

impl<S: AsyncRead + Unpin> AsyncRead for CloseDelimited<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.0).poll_read(cx, buf) {
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(())),
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for CloseDelimited<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn replays_the_prefix_then_the_stream() {
        let inner: &[u8] = b" world";
        let mut s = Prefixed::new(Bytes::from_static(b"hello"), inner);
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "hello world");
    }

    /// An upstream as the proxy's socket sees it when the server answered early and reset the connection: after
    /// `accept` bytes every write fails with `EPIPE`, and the answer becomes readable only then.
    struct ResetAfter {
        accept: usize,
        written: usize,
        answer: &'static [u8],
        reader: Option<std::task::Waker>,
    }

    impl AsyncRead for ResetAfter {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.written < self.accept {
                self.reader = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let n = self.answer.len().min(buf.remaining());
            buf.put_slice(&self.answer[..n]);
            self.answer = &self.answer[n..];
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for ResetAfter {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.written >= self.accept {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            let n = buf.len().min(self.accept - self.written);
            self.written += n;
            if self.written >= self.accept {
                if let Some(w) = self.reader.take() {
                    w.wake();
                }
            }
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// A POST of `len` bytes over `io` with hyper's HTTP/1.1 client: the status, or the error.
    async fn post<S>(io: S, len: usize) -> Result<u16, hyper::Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        use hyper_util::rt::TokioIo;
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Full<Bytes>,
        >(TokioIo::new(io))
        .await?;
        tokio::spawn(conn);
        let req = http::Request::post("/upload")
            .header("host", "upstream.test")
            .body(http_body_util::Full::new(Bytes::from(vec![b'x'; len])))
            .expect("a valid request");
        sender.send_request(req).await.map(|r| r.status().as_u16())
    }

    const EARLY_413: &[u8] =
        b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}";

    #[tokio::test]
    async fn an_answer_readable_only_after_the_write_failed_is_not_lost() {
        let upstream = || ResetAfter {
            accept: 64 << 10,
            written: 0,
            answer: EARLY_413,
            reader: None,
        };
        // hyper alone gives up on the exchange at the write error (the answer the proxy lost)...
        let bare = post(upstream(), 1 << 20).await;
        assert!(bare.is_err(), "{bare:?}");
        // ...and reads it through EarlyAnswer, which also marks the connection as not reusable.
        let io = EarlyAnswer::new(upstream());
        let failed = io.write_failed();
        assert_eq!(post(io, 1 << 20).await.ok(), Some(413));
        assert!(failed.load(Ordering::Acquire));
    }

    #[tokio::test]
    async fn a_missing_close_notify_ends_the_stream_other_errors_stay() {
        let mut ok = CloseDelimited(tokio_test_io(Err(io::ErrorKind::UnexpectedEof)));
        let mut out = Vec::new();
        assert_eq!(ok.read_to_end(&mut out).await.ok(), Some(5));
        let mut reset = CloseDelimited(tokio_test_io(Err(io::ErrorKind::ConnectionReset)));
        let mut out = Vec::new();
        assert!(reset.read_to_end(&mut out).await.is_err());
    }

    /// `hello`, then `end`.
    fn tokio_test_io(end: Result<(), io::ErrorKind>) -> impl AsyncRead + Unpin {
        let rest: std::pin::Pin<Box<dyn AsyncRead + Send>> = match end {
            Ok(()) => Box::pin(tokio::io::empty()),
            Err(kind) => Box::pin(Failing(kind)),
        };
        AsyncReadExt::chain(&b"hello"[..], rest)
    }

    struct Failing(io::ErrorKind);

    impl AsyncRead for Failing {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(self.0.into()))
        }
    }
}
