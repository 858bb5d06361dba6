//! DNS over TCP (RFC 7766): a connection the proxy's accept path hands over because its original destination port
//! is 53. Messages are 2-byte length-prefixed; a client may send several on one connection and need not wait for an
//! answer before sending the next (pipelining), so up to [`MAX_PIPELINE`] are handled at once and answered as they
//! complete, in any order (clients match answers by id, RFC 7766 §6.2.1.1). Each query is decided, recorded and
//! forwarded exactly like a datagram (over TCP upstream). The connection is closed after [`IDLE_TIMEOUT`] without a
//! complete query while nothing is pending, when the client closes its side and every answer is written, or when
//! an answer cannot be written within [`IDLE_TIMEOUT`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::upstream::frame;
use super::wire::parse_query;
use super::{resolve, unparsed, DnsStage, Via};
use crate::model::Agent;
use crate::proxy::ProxyContext;

/// Queries of one connection handled at once; the connection is not read further until one completes.
const MAX_PIPELINE: usize = 32;
/// How long a connection may stay without a complete query (while no answer is pending), and how long writing an
/// answer may take.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve one DNS-over-TCP connection from `agent` to the resolver `resolver` (its original destination).
pub async fn serve_tcp<S>(
    ctx: Arc<ProxyContext>,
    stage: Arc<DnsStage>,
    io: S,
    resolver: SocketAddr,
    agent: Agent,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut reader, mut writer) = tokio::io::split(io);
    let agent = Arc::new(agent);
    let mut buf = BytesMut::with_capacity(2 + super::MAX_QUERY);
    let mut pending: JoinSet<Option<Vec<u8>>> = JoinSet::new();
    let mut client_done = false;
    let mut idle_since = Instant::now();
    loop {
        while pending.len() < MAX_PIPELINE {
            let Some(message) = take_message(&mut buf) else {
                break;
            };
            idle_since = Instant::now();
            match parse_query(&message) {
                Ok(query) => {
                    let (ctx, stage, agent) = (ctx.clone(), stage.clone(), agent.clone());
                    pending.spawn(async move {
                        let _place = stage.admission.admit(Some(&agent)).await;
                        let via = Via::Tcp;
                        let resolver = Some(resolver.ip());
                        Some(resolve(&ctx, &stage, &query, &agent, resolver, via).await)
                    });
                }
                Err(e) => {
                    if let Some(reply) = unparsed(&message, e) {
                        pending.spawn(std::future::ready(Some(reply)));
                    }
                }
            }
        }
        if client_done && pending.is_empty() {
            return;
        }
        let can_read = !client_done && pending.len() < MAX_PIPELINE;
        tokio::select! {
            read = reader.read_buf(&mut buf), if can_read => match read {
                Ok(0) => client_done = true,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "dns/tcp: client read failed");
                    return;
                }
            },
            Some(done) = pending.join_next() => {
                let Ok(Some(reply)) = done else { continue };
                let framed = frame(&reply);
                let write = tokio::time::timeout(IDLE_TIMEOUT, writer.write_all(&framed));
                if !matches!(write.await, Ok(Ok(()))) {
                    tracing::debug!("dns/tcp: answer not written; connection closed");
                    return;
                }
                idle_since = Instant::now();
            },
            _ = tokio::time::sleep_until(idle_since + IDLE_TIMEOUT), if pending.is_empty() => {
                tracing::debug!("dns/tcp: idle connection closed");
                return;
            },
            else => return,
        }
    }
}

/// The next complete message in `buf` (its length prefix removed), if one has arrived whole.
fn take_message(buf: &mut BytesMut) -> Option<BytesMut> {
    let len = usize::from(u16::from_be_bytes([*buf.first()?, *buf.get(1)?]));
    if buf.len() < 2 + len {
        return None;
    }
    buf.advance(2);
    Some(buf.split_to(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_taken_whole_and_in_order() {
        let mut buf = BytesMut::from(&[0, 3, b'a', b'b', b'c', 0, 0, 0, 2, b'x'][..]);
        assert_eq!(take_message(&mut buf).as_deref(), Some(&b"abc"[..]));
        assert_eq!(take_message(&mut buf).as_deref(), Some(&b""[..]));
        assert_eq!(take_message(&mut buf), None, "incomplete");
        buf.extend_from_slice(b"y");
        assert_eq!(take_message(&mut buf).as_deref(), Some(&b"xy"[..]));
        assert!(buf.is_empty());
        let mut one = BytesMut::from(&[0][..]);
        assert_eq!(take_message(&mut one), None);
    }
}
