//! Protocol conformance of the proxy on loopback, against the RFCs a direct client and server would hold each other
//! to: `Expect: 100-continue` over HTTP/1.1 and HTTP/2 (RFC 9110 §10.1.1), an upstream's early answer to a request
//! whose body it did not read (RFC 9112 §9.3), HTTP/2 ↔ HTTP/1.1 translation (RFC 9113 §8.2), close-delimited
//! responses ended without TLS `close_notify` (RFC 9112 §9.8), and HTTP/2 with prior knowledge over plain TCP.

mod proxy_support;

use std::future::poll_fn;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use proxy_support::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOST: &str = "api.conform.test";
/// Long enough for anything on loopback; only reached when the proxy fails to answer.
const WAIT: Duration = Duration::from_secs(10);

/// A proxy allowing `HOST` and trusting `ca` for upstreams.
async fn conform_proxy(ca: &TestCa) -> Proxy {
    start_proxy(&policy(&[HOST], &[]), &[ca], false).await
}

/// An allow-all-for-`HOST` proxy and an upstream that speaks h2 and http/1.1.
async fn setup() -> (Proxy, std::net::SocketAddr, Arc<Seen>) {
    let ca = TestCa::new("conform upstream CA");
    let (chain, key) = ca.leaf(&[HOST]);
    let (up, seen) = https_upstream(chain, key, true).await;
    (conform_proxy(&ca).await, up, seen)
}

/// An HTTP/2 client (the h2 crate's, for control over every frame) on `io`, ready for a request.
async fn h2_client<S>(io: S) -> h2::client::SendRequest<Bytes>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, conn) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(conn);
    client.ready().await.unwrap()
}

/// Write `request` on `io` and read the answer's head (and whatever came with it).
async fn send_head<S>(io: &mut S, request: &str) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    io.write_all(request.as_bytes()).await.unwrap();
    tokio::time::timeout(WAIT, read_head(io)).await.unwrap()
}

/// The whole body of an HTTP/2 response.
/// The status of `GET https://HOST/x` with the field `name: value`, sent on `client`.
async fn h2_status_with(
    client: &mut h2::client::SendRequest<Bytes>,
    name: &str,
    value: http::HeaderValue,
) -> u16 {
    let req = Request::get(format!("https://{HOST}/x"))
        .header(name, value)
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
    resp.status().as_u16()
}

async fn h2_body(resp: http::Response<h2::RecvStream>) -> Vec<u8> {
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    got
}

// ---- Expect: 100-continue ----

/// An HTTP/2 client that waits for `100 (Continue)` before it sends its body (as Node's http2 client does) gets it
/// promptly, then its answer; the body reaches the upstream once.
#[tokio::test]
async fn h2_expect_100_continue_is_answered_before_the_body() {
    let (proxy, up, seen) = setup().await;
    let tls = proxy.tls_to(up, HOST, &[b"h2"]).await;
    let mut client = h2_client(tls).await;
    let req = Request::post(format!("https://{HOST}/upload"))
        .header("expect", "100-continue")
        .header("content-length", "5")
        .body(())
        .unwrap();
    let (mut resp, mut body) = client.send_request(req, false).unwrap();
    let interim = tokio::time::timeout(WAIT, poll_fn(|cx| resp.poll_informational(cx)))
        .await
        .expect("no 100 Continue: the client would wait for ever")
        .expect("an informational response")
        .unwrap();
    assert_eq!(interim.status(), 100);
    assert_eq!(seen.count(), 0, "nothing forwarded before the body");
    body.send_data(Bytes::from_static(b"hello"), true).unwrap();
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let text = h2_body(resp).await;
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("path=/upload") && text.ends_with("body=hello"),
        "{text}"
    );
    assert_eq!(seen.count(), 1);
}

/// A request refused on its head (here: a declared body over the inspection limit) gets its final status at once,
/// without a `100` and without the client having to send the body — over HTTP/2 and HTTP/1.1.
#[tokio::test]
async fn expect_100_continue_refused_on_the_head_gets_the_final_status() {
    let (proxy, up, seen) = setup().await;
    let tls = proxy.tls_to(up, HOST, &[b"h2"]).await;
    let mut client = h2_client(tls).await;
    let req = Request::post(format!("https://{HOST}/upload"))
        .header("expect", "100-continue")
        .header("content-length", (64u64 << 20).to_string())
        .body(())
        .unwrap();
    let (mut resp, _body) = client.send_request(req, false).unwrap();
    let first = tokio::time::timeout(WAIT, poll_fn(|cx| resp.poll_informational(cx)))
        .await
        .expect("no answer");
    assert!(first.is_none(), "a 100 for a refused request: {first:?}");
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 413);

    let mut tls = proxy.tls_to(up, HOST, &[b"http/1.1"]).await;
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: {HOST}\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        64u64 << 20
    );
    let answer = send_head(&mut tls, &head).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(seen.count(), 0);
}

/// HTTP/1.1 as a regression check: `100 Continue`, then the body, then the answer.
#[tokio::test]
async fn h1_expect_100_continue_is_answered_before_the_body() {
    let (proxy, up, seen) = setup().await;
    let mut tls = proxy.tls_to(up, HOST, &[b"http/1.1"]).await;
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: {HOST}\r\nexpect: 100-continue\r\ncontent-length: 5\r\nconnection: close\r\n\r\n"
    );
    let interim = send_head(&mut tls, &head).await;
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue\r\n"),
        "{}",
        String::from_utf8_lossy(&interim)
    );
    tls.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut rest)).await;
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.starts_with("HTTP/1.1 200") && rest.contains("body=hello"),
        "{rest}"
    );
    assert_eq!(seen.count(), 1);
}

// ---- an upstream's early answer ----

/// The answer of [`early_413_upstream`]: an Anthropic-style error, padded to 64 KiB so that it takes several reads (and still fits the receive buffers).
fn early_answer_body() -> String {
    let error = r#"{"type":"error","error":{"type":"request_too_large","message":"Request exceeds the maximum allowed number of bytes."}}"#;
    format!("{error}{}", " ".repeat((64 << 10) - error.len()))
}

/// An upstream that answers `413` once it has read more than its body limit (the head and 256 KiB), then closes the
/// connection with the rest of the body unread (so the kernel resets it), as servers with a body limit do: every
/// other time after TLS `close_notify`, else at once. The answer goes out in two writes.
async fn early_413_upstream(ca: &TestCa) -> std::net::SocketAddr {
    let (chain, key) = ca.leaf(&[HOST]);
    let connections = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let handler: RawHandler = Arc::new(move |mut tls| {
        let n = connections.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Box::pin(async move {
            let mut read = read_head(&mut tls).await.len();
            let mut chunk = vec![0u8; 4096];
            while read < 256 << 10 {
                match tls.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => read += k,
                }
            }
            let body = early_answer_body();
            let head = format!(
                "HTTP/1.1 413 Payload Too Large\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let (first, second) = body.split_at(body.len() / 2);
            for part in [format!("{head}{first}"), second.to_string()] {
                let _ = tls.write_all(part.as_bytes()).await;
                let _ = tls.flush().await;
            }
            if n.is_multiple_of(2) {
                let _ = tls.shutdown().await;
            }
        })
    });
    raw_tls_upstream(chain, key, &[b"http/1.1"], handler).await
}

/// A 3 MiB request to [`early_413_upstream`].
fn big_request() -> Request<Full<Bytes>> {
    Request::post(format!("https://{HOST}/v1/messages"))
        .header("host", HOST)
        .header("content-type", "application/octet-stream")
        .body(Full::new(Bytes::from(vec![b'x'; 3 << 20])))
        .unwrap()
}

/// The proxy, still sending a large body when the upstream answered and closed, passes the upstream's answer on —
/// every time, over HTTP/1.1 and HTTP/2 — instead of a gateway error or an empty reply.
#[tokio::test]
async fn an_upstreams_early_answer_reaches_the_client() {
    let ca = TestCa::new("conform upstream CA");
    let up = early_413_upstream(&ca).await;
    let proxy = conform_proxy(&ca).await;
    for round in 0..6 {
        for h2 in [false, true] {
            let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
            let tls = proxy.tls_to(up, HOST, &[alpn]).await;
            let (status, _, body) = tokio::time::timeout(WAIT, send(tls, h2, big_request()))
                .await
                .unwrap_or_else(|_| panic!("round {round} h2={h2}: no answer"));
            let body = String::from_utf8_lossy(&body);
            assert_eq!(status, 413, "round {round} h2={h2}: {body}");
            assert_eq!(body, early_answer_body(), "round {round} h2={h2}");
        }
    }
}

/// The same while the agent reads the answer slowly (an HTTP/2 client with a small window): the proxy is still
/// sending the request body when the upstream resets the connection, with half of the answer not yet read — and
/// the agent still gets all of it.
#[tokio::test]
async fn an_upstreams_early_answer_reaches_a_slow_reader_whole() {
    let ca = TestCa::new("conform upstream CA");
    let up = early_413_upstream(&ca).await;
    let proxy = conform_proxy(&ca).await;
    for round in 0..2 {
        let tls = proxy.tls_to(up, HOST, &[b"h2"]).await;
        let (client, conn) = h2::client::Builder::new()
            .initial_window_size(1024)
            .handshake(tls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let mut client = client.ready().await.unwrap();
        let (parts, body) = big_request().into_parts();
        let (resp, mut tx) = client
            .send_request(Request::from_parts(parts, ()), false)
            .unwrap();
        let body = http_body_util::BodyExt::collect(body)
            .await
            .unwrap()
            .to_bytes();
        tx.send_data(body, true).unwrap();
        let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
        assert_eq!(resp.status(), 413, "round {round}");
        // Let the upstream finish and reset the connection before reading on.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut data = resp.into_body();
        let mut got = Vec::new();
        while let Some(chunk) = tokio::time::timeout(WAIT, data.data()).await.unwrap() {
            let chunk =
                chunk.unwrap_or_else(|e| panic!("round {round}: the answer broke off: {e}"));
            let _ = data.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
        }
        assert_eq!(
            String::from_utf8_lossy(&got),
            early_answer_body(),
            "round {round}"
        );
    }
}

// ---- close-delimited responses ----

/// An HTTP/1.1 upstream answering without a length (the body ends when the connection closes) and closing the TCP
/// connection without TLS `close_notify`, as some servers and load balancers do.
async fn close_delimited_upstream(ca: &TestCa, seen: Arc<Mutex<u32>>) -> std::net::SocketAddr {
    let (chain, key) = ca.leaf(&[HOST]);
    let handler: RawHandler = Arc::new(move |mut tls| {
        let seen = seen.clone();
        Box::pin(async move {
            let _ = read_head(&mut tls).await;
            *seen.lock().unwrap() += 1;
            let resp = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nthe whole answer";
            let _ = tls.write_all(resp.as_bytes()).await;
            let _ = tls.flush().await;
            // No close_notify: the TCP connection just ends.
            let (mut tcp, _) = tls.into_inner();
            let _ = tcp.shutdown().await;
        })
    });
    raw_tls_upstream(chain, key, &[b"http/1.1"], handler).await
}

/// Such a response ends cleanly for the agent, as it does for a direct client (curl and browsers accept it): every
/// byte, then a proper end (the terminal chunk over HTTP/1.1, END_STREAM over HTTP/2), not an aborted stream.
#[tokio::test]
async fn a_close_delimited_response_without_close_notify_ends_cleanly() {
    let ca = TestCa::new("conform upstream CA");
    let seen = Arc::new(Mutex::new(0));
    let up = close_delimited_upstream(&ca, seen.clone()).await;
    let proxy = conform_proxy(&ca).await;
    for h2 in [false, true] {
        let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
        let tls = proxy.tls_to(up, HOST, &[alpn]).await;
        let (status, _, body) = tokio::time::timeout(WAIT, send(tls, h2, get("/text", HOST)))
            .await
            .unwrap();
        assert_eq!(
            (status, body.as_slice()),
            (200, &b"the whole answer"[..]),
            "h2={h2}"
        );
    }
    assert_eq!(*seen.lock().unwrap(), 2);
}

// ---- HTTP/2 ↔ HTTP/1.1 translation (RFC 9113 §8.2, §8.3) ----

/// An HTTP/1.1-only upstream that records each request head as it arrived on the wire and answers with the
/// connection-specific fields an HTTP/1.1 server may send (which HTTP/2 forbids), plus one end-to-end field.
async fn h1_recording_upstream(
    ca: &TestCa,
    heads: Arc<Mutex<Vec<String>>>,
) -> std::net::SocketAddr {
    let (chain, key) = ca.leaf(&[HOST]);
    let handler: RawHandler = Arc::new(move |mut tls| {
        let heads = heads.clone();
        Box::pin(async move {
            let head = read_head(&mut tls).await;
            heads
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&head).into_owned());
            let resp = "HTTP/1.1 200 OK\r\nconnection: close, x-resp-hop\r\nx-resp-hop: 1\r\nkeep-alive: timeout=5\r\nproxy-connection: close\r\nupgrade: h2c\r\nx-kept: yes\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
            let _ = tls.write_all(resp.as_bytes()).await;
            let _ = tls.shutdown().await;
        })
    });
    raw_tls_upstream(chain, key, &[b"http/1.1"], handler).await
}

/// An HTTP/2 client through the proxy to an [`h1_recording_upstream`], and the heads that upstream records.
async fn h2_client_to_h1_upstream() -> (
    Proxy,
    h2::client::SendRequest<Bytes>,
    Arc<Mutex<Vec<String>>>,
) {
    let ca = TestCa::new("conform upstream CA");
    let heads = Arc::new(Mutex::new(Vec::new()));
    let up = h1_recording_upstream(&ca, heads.clone()).await;
    let proxy = conform_proxy(&ca).await;
    let tls = proxy.tls_to(up, HOST, &[b"h2"]).await;
    (proxy, h2_client(tls).await, heads)
}

/// The head lines of `head` after the request line, lower-cased names (values as sent).
fn fields(head: &str) -> Vec<(String, String)> {
    head.split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect()
}

/// An HTTP/2 client's request to an HTTP/1.1 upstream: its `cookie` fields are joined into one with `; ` (§8.2.3),
/// `:authority` becomes `Host`, the request line is origin-form, `te` is not sent on (hop-by-hop in HTTP/1.1); the
/// upstream's connection-specific response fields never reach the HTTP/2 client (§8.2.2), which would reject the
/// response as malformed, and its end-to-end fields do.
#[tokio::test]
async fn h2_client_to_h1_upstream_follows_rfc_9113() {
    let (_proxy, mut client, heads) = h2_client_to_h1_upstream().await;
    let req = Request::get(format!("https://{HOST}/a/b?q=1"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3; d=4")
        .header("te", "trailers")
        .header("x-end-to-end", "kept")
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers();
    for gone in [
        "connection",
        "x-resp-hop",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "transfer-encoding",
    ] {
        assert!(
            !h.contains_key(gone),
            "{gone} reached the HTTP/2 client: {h:?}"
        );
    }
    assert_eq!(h.get("x-kept").map(|v| v.as_bytes()), Some(&b"yes"[..]));
    assert_eq!(h2_body(resp).await, b"ok");

    let head = heads
        .lock()
        .unwrap()
        .pop()
        .expect("the upstream saw the request");
    assert!(head.starts_with("GET /a/b?q=1 HTTP/1.1\r\n"), "{head}");
    let f = fields(&head);
    let cookies: Vec<&str> = f
        .iter()
        .filter(|(k, _)| k == "cookie")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(cookies, ["a=1; b=2; c=3; d=4"], "{head}");
    let hosts: Vec<&str> = f
        .iter()
        .filter(|(k, _)| k == "host")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(hosts, [HOST], "{head}");
    assert!(
        !f.iter().any(|(k, _)| k == "te" || k.starts_with(':')),
        "{head}"
    );
    assert!(
        f.iter().any(|(k, v)| k == "x-end-to-end" && v == "kept"),
        "{head}"
    );
}

/// What an HTTP/2 upstream received: (method, URI, version, header fields).
type H2Seen = Arc<Mutex<Vec<(String, String, http::Version, http::HeaderMap)>>>;

/// An HTTP/2-only upstream recording each request.
async fn h2_recording_upstream(ca: &TestCa, seen: H2Seen) -> std::net::SocketAddr {
    let (chain, key) = ca.leaf(&[HOST]);
    let handler: RawHandler = Arc::new(move |tls| {
        let seen = seen.clone();
        Box::pin(async move {
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        seen.lock().unwrap().push((
                            req.method().to_string(),
                            req.uri().to_string(),
                            req.version(),
                            req.headers().clone(),
                        ));
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    }
                });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
        })
    });
    raw_tls_upstream(chain, key, &[b"h2"], handler).await
}

/// An HTTP/1.1 client's request to an HTTP/2 upstream: `Host` becomes `:authority` (and no `host` field goes
/// along), every connection-specific field — `Connection` and the fields it names, `Keep-Alive`,
/// `Proxy-Connection`, `Transfer-Encoding`, `Upgrade` — is removed, and `TE` is sent on only as `trailers`, the one
/// value HTTP/2 allows (§8.2.2): a `TE` listing `trailers` among others keeps it.
#[tokio::test]
async fn h1_client_to_h2_upstream_follows_rfc_9113() {
    let ca = TestCa::new("conform upstream CA");
    let seen: H2Seen = Arc::default();
    let up = h2_recording_upstream(&ca, seen.clone()).await;
    let proxy = conform_proxy(&ca).await;
    let mut tls = proxy.tls_to(up, HOST, &[b"http/1.1"]).await;
    let req = format!(
        "POST /v1/x?y=2 HTTP/1.1\r\nHost: {HOST}\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
         Proxy-Connection: keep-alive\r\nTE: gzip;q=0.5, trailers\r\nTransfer-Encoding: chunked\r\nCookie: a=1; b=2\r\n\
         X-End-To-End: kept\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    );
    let answer = send_head(&mut tls, &req).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    let (method, uri, version, h) = seen
        .lock()
        .unwrap()
        .pop()
        .expect("the upstream saw the request");
    assert_eq!((method.as_str(), version), ("POST", http::Version::HTTP_2));
    assert_eq!(uri, format!("https://{HOST}/v1/x?y=2"));
    for gone in [
        "host",
        "connection",
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        assert!(
            !h.contains_key(gone),
            "{gone} reached the HTTP/2 upstream: {h:?}"
        );
    }
    let te: Vec<_> = h.get_all("te").iter().collect();
    assert_eq!(te, ["trailers"], "{h:?}");
    assert_eq!(
        h.get("content-length").map(|v| v.as_bytes()),
        Some(&b"5"[..])
    );
    assert_eq!(
        h.get("cookie").map(|v| v.as_bytes()),
        Some(&b"a=1; b=2"[..])
    );
    assert_eq!(
        h.get("x-end-to-end").map(|v| v.as_bytes()),
        Some(&b"kept"[..])
    );
}

/// `OPTIONS *` (RFC 9113 §8.3.1: `:path` `*`) reaches an HTTP/1.1 upstream in asterisk form (RFC 9112 §3.2.4).
#[tokio::test]
async fn h2_options_asterisk_reaches_h1_in_asterisk_form() {
    let (_proxy, mut client, heads) = h2_client_to_h1_upstream().await;
    let uri = http::Uri::from_parts({
        let mut p = http::uri::Parts::default();
        p.scheme = Some(http::uri::Scheme::HTTPS);
        p.authority = Some(HOST.parse().unwrap());
        p.path_and_query = Some("*".parse().unwrap());
        p
    })
    .unwrap();
    let req = Request::builder()
        .method("OPTIONS")
        .uri(uri)
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let head = heads
        .lock()
        .unwrap()
        .pop()
        .expect("the upstream saw the request");
    assert!(head.starts_with("OPTIONS * HTTP/1.1\r\n"), "{head}");
}

/// An HTTP/2 request whose `host` field names another host than its `:authority` is malformed (RFC 9113 §8.3.1),
/// and so is an HTTP/1.1 request with two `Host` fields (RFC 9112 §3.2): refused with 400, and never forwarded —
/// the policy decided on one name, the upstream could read the other. The same host spelt with its default port
/// is the same host.
#[tokio::test]
async fn a_host_field_naming_another_host_is_refused() {
    let (proxy, up, seen) = setup().await;
    let tls = proxy.tls_to(up, HOST, &[b"h2"]).await;
    let mut client = h2_client(tls).await;
    let other = http::HeaderValue::from_static("other.conform.test");
    assert_eq!(h2_status_with(&mut client, "host", other).await, 400);
    assert_eq!(seen.count(), 0);
    let same = format!("{}:443", HOST.to_ascii_uppercase());
    let same = http::HeaderValue::from_str(&same).unwrap();
    assert_eq!(h2_status_with(&mut client, "host", same).await, 200);
    assert_eq!(seen.count(), 1);

    let mut tls = proxy.tls_to(up, HOST, &[b"http/1.1"]).await;
    let req = format!("GET /x HTTP/1.1\r\nhost: {HOST}\r\nhost: other.conform.test\r\n\r\n");
    let answer = send_head(&mut tls, &req).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    // In absolute form the request's URI names its authority (RFC 9112 §3.2.2); two `Host` fields are still refused.
    let mut tls = proxy.tls_to(up, HOST, &[b"http/1.1"]).await;
    let req = format!(
        "GET https://{HOST}/x HTTP/1.1\r\nhost: {HOST}\r\nhost: other.conform.test\r\n\r\n"
    );
    let answer = send_head(&mut tls, &req).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(seen.count(), 1);

    // One record each. A request whose URI names its authority (`:authority`, absolute form) has its record name
    // that host, as every other head refusal's does; two `Host` fields and no authority name no one host.
    let records = proxy.audit_records().await;
    assert_eq!(records.len(), 4, "{records:#?}");
    for (r, host) in [
        (&records[0], Value::from(HOST)),
        (&records[2], Value::Null),
        (&records[3], Value::from(HOST)),
    ] {
        assert_eq!(r["outcome"]["disposition"], "blocked", "{r}");
        assert_eq!(r["outcome"]["error"], "bad_request", "{r}");
        assert_eq!(r["outcome"]["status"], 400, "{r}");
        assert_eq!(r["decision"]["reason"], "bad_request", "{r}");
        assert_eq!(r["request"]["host"], host, "{r}");
        assert_eq!(r["request"]["path"], "/x", "{r}");
    }
    assert_eq!(records[1]["request"]["host"], HOST);
    assert_eq!(records[1]["outcome"]["disposition"], "forwarded");
}

/// An HTTP/2 field value that begins or ends with space or tab is malformed (RFC 9113 §8.2.1): an HTTP/1.1
/// upstream strips it as optional whitespace and reads `x-role: " admin"` as `admin`, which the block rule on
/// `header.x-role: "admin*"` never saw. Refused with 400 (as the other malformed heads), one record, never forwarded;
/// whitespace inside a value is data and passes.
#[tokio::test]
async fn h2_field_values_with_leading_or_trailing_whitespace_are_refused() {
    let ca = TestCa::new("conform upstream CA");
    let (chain, key) = ca.leaf(&[HOST]);
    let (up, seen) = https_upstream(chain, key, true).await;
    let yaml = format!(
        "version: 1\ndefault: block\nrules:\n - id: no-admin\n   when: {{ header.x-role: \"admin*\" }}\n   verdict: block\n - id: ok\n   when: {{ host: {HOST} }}\n   verdict: allow\n"
    );
    let proxy = start_proxy(&yaml, &[&ca], false).await;
    let tls = proxy.tls_to(up, HOST, &[b"h2"]).await;
    let mut client = h2_client(tls).await;
    let bad: [(&str, &[u8]); 5] = [
        ("x-role", b" admin"),
        ("x-role", b"\tadmin"),
        ("x-role", b"admin "),
        ("x-other", b"\t"),
        ("x-role", b"reader\t"),
    ];
    for (name, value) in bad {
        let sent = http::HeaderValue::from_bytes(value).unwrap();
        let status = h2_status_with(&mut client, name, sent).await;
        assert_eq!(status, 400, "{name}: {value:?}");
    }
    assert_eq!(seen.count(), 0, "a malformed field reached the upstream");
    let inner = http::HeaderValue::from_static("read only");
    assert_eq!(h2_status_with(&mut client, "x-role", inner).await, 200);
    assert_eq!(seen.count(), 1);
    let records = proxy.audit_records().await;
    assert_eq!(records.len(), bad.len() + 1);
    for r in &records[..bad.len()] {
        assert_eq!(r["outcome"]["disposition"], "blocked", "{r}");
        assert_eq!(r["outcome"]["error"], "bad_request", "{r}");
        assert_eq!(r["outcome"]["status"], 400, "{r}");
        // The request named its authority: the record names the host, as every other refusal's does.
        assert_eq!(r["request"]["host"], HOST, "{r}");
    }
    assert_eq!(records[bad.len()]["decision"]["rule"], "ok");
}

/// HTTP/2 with prior knowledge over plain TCP (RFC 9113 §3.3: the connection preface instead of a request line) is
/// served by the same HTTP/2 server as over TLS: decided, forwarded, answered.
#[tokio::test]
async fn h2_prior_knowledge_over_plain_tcp_is_served() {
    let (up, seen) = http_upstream().await;
    let proxy = start_proxy(&policy(&["127.0.0.1"], &[]), &[], false).await;
    let tcp = proxy.connect_as(up).await;
    let mut client = h2_client(tcp).await;
    let req = Request::get(format!("http://{up}/prior")).body(()).unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = tokio::time::timeout(WAIT, resp).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let text = String::from_utf8(h2_body(resp).await).unwrap();
    assert!(text.contains("path=/prior"), "{text}");
    assert_eq!(seen.count(), 1);
}
