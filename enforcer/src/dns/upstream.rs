//! The one exchange with the upstream resolver for an allowed query, over UDP (the client asked over UDP) or TCP
//! (the client asked over TCP, RFC 7766 framing): the rebuilt query goes out from a fresh socket, and the first
//! message that [`answers`](super::wire::answers) it comes back, within the stage's timeout.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::wire::{answers, upstream_query, DnsQuery};

/// Receive buffer for a UDP answer: larger than any payload size offered upstream.
const MAX_UDP_ANSWER: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub(super) enum ExchangeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no answer in time")]
    Timeout,
    #[error("the TCP answer did not answer the query")]
    Mismatch,
}

/// Send `query` over UDP and wait for the datagram that answers it (others are ignored).
pub(super) async fn udp(
    upstream: SocketAddr,
    query: &DnsQuery,
    timeout: Duration,
) -> Result<Vec<u8>, ExchangeError> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(&upstream_query(query)).await?;
    let mut buf = vec![0u8; MAX_UDP_ANSWER];
    tokio::time::timeout(timeout, async {
        loop {
            let n = socket.recv(&mut buf).await?;
            if answers(&buf[..n], query) {
                return Ok(buf[..n].to_vec());
            }
        }
    })
    .await
    .map_err(|_| ExchangeError::Timeout)?
}

/// Send `query` over a new TCP connection (2-byte length prefix, RFC 1035 §4.2.2) and read the one message that
/// answers it, whole, whatever its size.
pub(super) async fn tcp(
    upstream: SocketAddr,
    query: &DnsQuery,
    timeout: Duration,
) -> Result<Vec<u8>, ExchangeError> {
    tokio::time::timeout(timeout, async {
        let mut stream = TcpStream::connect(upstream).await?;
        stream.set_nodelay(true)?;
        stream.write_all(&frame(&upstream_query(query))).await?;
        let len = stream.read_u16().await?;
        let mut reply = vec![0u8; usize::from(len)];
        stream.read_exact(&mut reply).await?;
        if answers(&reply, query) {
            Ok(reply)
        } else {
            Err(ExchangeError::Mismatch)
        }
    })
    .await
    .map_err(|_| ExchangeError::Timeout)?
}

/// `message` with its 2-byte length prefix (RFC 1035 §4.2.2). Messages this stage builds are far below 64 KiB;
/// a longer one would be cut at the prefix's maximum, never mis-framed.
pub(super) fn frame(message: &[u8]) -> Vec<u8> {
    let len = u16::try_from(message.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(2 + usize::from(len));
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&message[..usize::from(len)]);
    out
}
