//! The explicit proxy (HTTP CONNECT and absolute-form requests) on loopback.

mod proxy_support;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use proxy_support::*;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Open a CONNECT tunnel to `target` and return the stream once the proxy said 200.
async fn connect_tunnel(proxy: std::net::SocketAddr, target: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut reader = BufReader::new(&mut tcp);
    let mut status = String::new();
    reader.read_line(&mut status).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" || line.is_empty() {
            break;
        }
    }
    tcp
}

#[tokio::test]
async fn connect_tls_allowed_and_blocked() {
    let test_ca = TestCa::new("explicit test CA");
    let proxy = start_proxy(&policy(&["localhost"], &[]), &[&test_ca], true).await;
    let explicit = proxy.explicit.unwrap();
    let (chain, key) = test_ca.leaf(&["localhost", "blocked.test"]);
    let (up, seen) = https_upstream(chain, key, true).await;

    let tcp = connect_tunnel(explicit, &format!("localhost:{}", up.port())).await;
    let tls = tokio_rustls::TlsConnector::from(proxy.client_tls(&[b"h2"]))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let req = Request::builder()
        .uri(format!("https://localhost:{}/via-connect", up.port()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, body) = send(tls, true, req).await;
    let body = String::from_utf8(body).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("path=/via-connect"), "{body}");
    assert_eq!(seen.count(), 1);

    // The tunnel's TLS names a blocked host: decided like any request, never forwarded.
    let tcp = connect_tunnel(explicit, &format!("127.0.0.1:{}", up.port())).await;
    let tls = tokio_rustls::TlsConnector::from(proxy.client_tls(&[b"http/1.1"]))
        .connect(ServerName::try_from("blocked.test").unwrap(), tcp)
        .await
        .unwrap();
    let (status, _, _) = send(tls, false, get("/", "blocked.test")).await;
    assert_eq!(status, 403);
    assert_eq!(seen.count(), 1);

    let records = proxy.audit_records().await;
    assert_eq!(records.len(), 2);
    assert_eq!(records[0]["agent"]["profile"], "explicit-profile");
    assert_eq!(records[0]["outcome"]["disposition"], "forwarded");
    assert_eq!(records[1]["outcome"]["disposition"], "blocked");
}

#[tokio::test]
async fn absolute_form_plain_http_and_tcp_through_connect() {
    let proxy = start_proxy(&policy(&["localhost"], &[]), &[], true).await;
    let explicit = proxy.explicit.unwrap();
    let (up, seen) = http_upstream().await;
    let tcp = TcpStream::connect(explicit).await.unwrap();
    let req = Request::builder()
        .uri(format!("http://localhost:{}/absolute?q=1", up.port()))
        .header("host", format!("localhost:{}", up.port()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, body) = send(tcp, false, req).await;
    let body = String::from_utf8(body).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("path=/absolute?q=1"), "{body}");
    assert_eq!(seen.count(), 1);

    // Raw TCP to a port the policy does not allow: the tunnel opens, then closes without reaching the server.
    let (echo, echo_seen) = tcp_echo().await;
    let mut tcp = connect_tunnel(explicit, &format!("127.0.0.1:{}", echo.port())).await;
    tcp.write_all(b"\x00\x00raw").await.unwrap();
    let mut buf = Vec::new();
    let n = tcp.read_to_end(&mut buf).await.unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(echo_seen.count(), 0);
}

#[tokio::test]
async fn plain_http_in_a_connect_tunnel_must_name_the_connect_target_or_a_bound_host() {
    // The daemon resolved the CONNECT target itself: that name is bound. Another Host inside the tunnel is only the
    // agent's claim and goes through host binding like a transparent connection (`.invalid` never resolves).
    let proxy = start_proxy(&policy(&["localhost", "spoof.invalid"], &[]), &[], true).await;
    let explicit = proxy.explicit.unwrap();
    let (up, seen) = http_upstream().await;
    let target = format!("localhost:{}", up.port());
    let tcp = connect_tunnel(explicit, &target).await;
    let (status, _, body) = send(tcp, false, get("/in-tunnel", &target)).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(seen.count(), 1);
    let tcp = connect_tunnel(explicit, &target).await;
    let (status, _, _) = send(tcp, false, get("/spoofed", "spoof.invalid")).await;
    assert_eq!(status, 421);
    assert_eq!(seen.count(), 1, "a spoofed Host must never be forwarded");
    let records = proxy.audit_records().await;
    assert_eq!(records.len(), 2);
    assert_eq!(records[1]["outcome"]["error"], "host_mismatch");
}
