//! The proxy against hostile clients and upstreams on loopback: stalled heads and bodies, silent upstreams,
//! request smuggling attempts, bodies that inspection cannot read faithfully, and request data that must not be
//! echoed. The process-wide limits are shortened once so timeouts fire in about a second.

mod proxy_support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use enforcer::proxy::{set_limits, Limits};
use proxy_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const SHORT: Duration = Duration::from_secs(1);

fn short_limits() {
    set_limits(Limits {
        header_read_timeout: SHORT,
        body_idle_timeout: SHORT,
        response_head_timeout: SHORT,
        ..Limits::default()
    });
}

async fn proxy() -> Proxy {
    short_limits();
    start_proxy(&policy(&["127.0.0.1"], &[]), &[], false).await
}

/// Write `bytes` on a connection redirected to `dst`, then read until the proxy closes it or `wait` passes.
async fn exchange(p: &Proxy, dst: SocketAddr, bytes: &[u8], wait: Duration) -> (String, Duration) {
    let mut s = p.connect_as(dst).await;
    let start = Instant::now();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    (String::from_utf8_lossy(&out).into_owned(), start.elapsed())
}

/// A plain-HTTP upstream that records the raw bytes of every connection and answers each head it sees with a
/// short 200 after reading a Content-Length body; `silent` makes it read forever and never answer.
async fn raw_upstream(silent: bool) -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let seen = s.clone();
            tokio::spawn(async move {
                let index = {
                    let mut v = seen.lock().unwrap();
                    v.push(Vec::new());
                    v.len() - 1
                };
                let mut buf = [0u8; 4096];
                let mut all = Vec::new();
                loop {
                    let Ok(n) = tcp.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    all.extend_from_slice(&buf[..n]);
                    seen.lock().unwrap()[index] = all.clone();
                    if silent {
                        continue;
                    }
                    let text = String::from_utf8_lossy(&all).to_ascii_lowercase();
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let len: usize = text[..head_end]
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if all.len() >= head_end + 4 + len {
                            let _ = tcp
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                                .await;
                            all.drain(..head_end + 4 + len);
                        }
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Sends each raw HTTP/1.1 request of `requests` on a connection of its own and asserts the status it gets; the
/// answers, for further checks.
async fn answered_each(
    p: &Proxy,
    dst: SocketAddr,
    requests: &[impl AsRef<str>],
    status: u16,
) -> Vec<String> {
    let mut answers = Vec::new();
    for req in requests {
        let req = req.as_ref();
        let (resp, _) = exchange(p, dst, req.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&resp), Some(status), "{req}: {resp}");
        answers.push(resp);
    }
    answers
}

/// Asserts that every record of `records` names `error` as its outcome's error.
/// Hex SHA-256 of `bytes`, as records name a body.
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn all_refused_as(records: &[serde_json::Value], error: &str) {
    for r in records {
        assert_eq!(r["outcome"]["error"], error, "{r}");
    }
}

/// Asserts that each record says its request was blocked by the policy (403), by `rules` in order (`None`: its
/// default).
fn all_blocked_by(records: &[serde_json::Value], rules: &[Option<&str>]) {
    assert_eq!(records.len(), rules.len(), "{records:#?}");
    for (r, rule) in records.iter().zip(rules) {
        assert_eq!(r["decision"]["verdict"], "block", "{r}");
        assert_eq!(r["decision"]["rule"].as_str(), *rule, "{r}");
        let reason = if rule.is_some() { "rule" } else { "default" };
        assert_eq!(r["decision"]["reason"], reason, "{r}");
        assert_eq!(r["outcome"]["disposition"], "blocked", "{r}");
        assert_eq!(r["outcome"]["status"], 403, "{r}");
        assert_eq!(r["outcome"]["error"], serde_json::Value::Null, "{r}");
    }
}

/// A raw HTTP/1.1 POST of `body` to `target` on `host`, with the header lines `extra` (each ending in CRLF), on a
/// connection the client closes after it.
fn post_to(host: impl std::fmt::Display, target: &str, extra: &str, body: &str) -> String {
    format!(
        "POST {target} HTTP/1.1\r\nhost: {host}\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// A raw HTTP/1.1 POST of the JSON `body` to `target` (host 127.0.0.1), see [`post_to`].
fn json_post(target: &str, body: &str) -> String {
    post_to(
        "127.0.0.1",
        target,
        "content-type: application/json\r\n",
        body,
    )
}

/// The path and query of every request an upstream of `http_upstream` saw.
fn paths_seen(seen: &Seen) -> Vec<String> {
    seen.log
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.2.clone())
        .collect()
}

/// A TLS upstream answering `{}` for `hosts`, and how many requests reached it.
async fn counting_upstream(
    ca: &TestCa,
    hosts: &[&str],
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use http_body_util::{BodyExt, Full};
    let reached = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = reached.clone();
    let up = answering_upstream(ca, hosts, move |_req| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            hyper::Response::new(Full::new(bytes::Bytes::from_static(b"{}")).boxed())
        }
    })
    .await;
    (up, reached)
}

/// POST the JSON `body` to `path` on `host` over TLS through the proxy to `up`: the status and the answer.
async fn post_over_tls(
    p: &Proxy,
    up: SocketAddr,
    (host, path): (&str, &str),
    body: &'static str,
) -> (u16, String) {
    use http_body_util::Full;
    let tls = p.tls_to(up, host, &[b"http/1.1"]).await;
    let req = hyper::Request::post(path)
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from_static(body.as_bytes())))
        .unwrap();
    let (status, _, body) = send(tls, false, req).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Asserts that every record of `records` is a request allowed (by `rule`, or the default when `None`) and forwarded.
fn all_forwarded_as(records: &[serde_json::Value], rule: Option<&str>) {
    for r in records {
        assert_eq!(r["decision"]["verdict"], "allow", "{r}");
        assert_eq!(r["decision"]["rule"].as_str(), rule, "{r}");
        assert_eq!(r["outcome"]["disposition"], "forwarded", "{r}");
    }
}

fn status_of(response: &str) -> Option<u16> {
    response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
}

#[tokio::test]
async fn stalled_request_body_gets_408_audited_and_never_reaches_the_upstream() {
    let p = proxy().await;
    let (up, seen) = http_upstream().await;
    let head = format!(
        "POST /upload HTTP/1.1\r\nhost: {up}\r\ncontent-type: text/plain\r\ncontent-length: 100\r\n\r\nonly a part"
    );
    let (resp, took) = exchange(&p, up, head.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(status_of(&resp), Some(408), "{resp}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(seen.count(), 0);
    let records = p.audit_records().await;
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["outcome"]["disposition"], "blocked");
    assert_eq!(records[0]["outcome"]["status"], 408);
}

#[tokio::test]
async fn slow_request_head_is_cut_off() {
    let p = proxy().await;
    let (up, seen) = http_upstream().await;
    // The method is complete (so the connection is HTTP), the head never is.
    let (resp, took) = exchange(
        &p,
        up,
        b"GET / HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: ",
        Duration::from_secs(10),
    )
    .await;
    assert!(took < Duration::from_secs(5), "{took:?} {resp}");
    assert!(resp.is_empty() || status_of(&resp) == Some(408), "{resp}");
    assert_eq!(seen.count(), 0);
}

#[tokio::test]
async fn slow_request_head_on_the_explicit_listener_is_cut_off() {
    short_limits();
    let p = start_proxy(&policy(&["127.0.0.1"], &[]), &[], true).await;
    let mut s = tokio::net::TcpStream::connect(p.explicit.unwrap())
        .await
        .unwrap();
    let start = Instant::now();
    s.write_all(b"GET http://127.0.0.1/ HTTP/1.1\r\nx-slow: ")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let took = start.elapsed();
    let resp = String::from_utf8_lossy(&out);
    assert!(took < Duration::from_secs(5), "{took:?} {resp}");
    assert!(resp.is_empty() || status_of(&resp) == Some(408), "{resp}");
}

#[tokio::test]
async fn upstream_that_never_answers_gets_504() {
    let p = proxy().await;
    let (up, seen) = raw_upstream(true).await;
    let req = format!("GET /slow HTTP/1.1\r\nhost: {up}\r\nconnection: close\r\n\r\n");
    let (resp, took) = exchange(&p, up, req.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(status_of(&resp), Some(504), "{resp}");
    assert!(resp.contains("upstream_unreachable"), "{resp}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(String::from_utf8_lossy(&seen.lock().unwrap()[0]).starts_with("GET /slow "));
    let records = p.audit_records().await;
    assert_eq!(records.len(), 1, "{records:#?}");
}

#[tokio::test]
async fn a_stream_that_outlasts_the_head_timeout_is_not_cut() {
    let p = proxy().await;
    let (up, seen) = http_upstream().await;
    let go = seen.clone();
    tokio::spawn(async move {
        tokio::time::sleep(SHORT * 2).await;
        go.sse_go.notify_one();
    });
    let req = format!("GET /sse HTTP/1.1\r\nhost: {up}\r\nconnection: close\r\n\r\n");
    let (resp, _) = exchange(&p, up, req.as_bytes(), Duration::from_secs(10)).await;
    assert_eq!(status_of(&resp), Some(200), "{resp}");
    assert!(
        resp.contains("data: one") && resp.contains("data: two"),
        "{resp}"
    );
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_reframed_not_smuggled() {
    let p = proxy().await;
    let (up, seen) = raw_upstream(false).await;
    // A front end trusting Content-Length would see `hell` and then a second request starting `o\r\n0...`.
    let req = format!(
        "POST /a HTTP/1.1\r\nhost: {up}\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n\
         5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: {up}\r\n\r\n"
    );
    let (resp, _) = exchange(&p, up, req.as_bytes(), Duration::from_secs(5)).await;
    let seen = seen.lock().unwrap().clone();
    let all: String = seen
        .iter()
        .map(|c| String::from_utf8_lossy(c).to_ascii_lowercase())
        .collect();
    assert!(!all.contains("/smuggled"), "{all}");
    // Chunked framing wins (RFC 9112 6.3), the connection closes after it, and the upstream gets exactly the body
    // the proxy inspected, framed by a Content-Length of the proxy's own.
    assert_eq!(status_of(&resp), Some(200), "{resp}");
    assert_eq!(all.matches("post /a ").count(), 1, "{all}");
    assert!(all.contains("content-length: 5\r\n"), "{all}");
    assert!(!all.contains("transfer-encoding"), "{all}");
    assert!(all.ends_with("\r\n\r\nhello"), "{all}");
}

#[tokio::test]
async fn conflicting_framing_is_refused_before_the_upstream() {
    let p = proxy().await;
    let (up, seen) = raw_upstream(false).await;
    let cases = [
        "content-length: 5\r\ncontent-length: 6\r\n",
        "content-length: 5, 6\r\n",
        "content-length: -5\r\n",
        "content-length: +5\r\n",
        "transfer-encoding: chunked, identity\r\n",
        "transfer-encoding: xchunked\r\n",
    ];
    for framing in cases {
        let req = format!("POST /x HTTP/1.1\r\nhost: {up}\r\n{framing}\r\nhello!");
        let (resp, _) = exchange(&p, up, req.as_bytes(), Duration::from_secs(5)).await;
        assert!(
            resp.is_empty() || status_of(&resp) == Some(400),
            "{framing:?}: {resp}"
        );
    }
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn too_many_or_too_large_headers_are_refused() {
    let p = proxy().await;
    let (up, seen) = http_upstream().await;
    let mut many = format!("GET / HTTP/1.1\r\nhost: {up}\r\n");
    for i in 0..200 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let (resp, _) = exchange(&p, up, many.as_bytes(), Duration::from_secs(5)).await;
    assert!(resp.is_empty() || status_of(&resp) == Some(431), "{resp}");
    let big = format!(
        "GET / HTTP/1.1\r\nhost: {up}\r\nx-big: {}\r\n\r\n",
        "a".repeat(200 * 1024)
    );
    let (resp, _) = exchange(&p, up, big.as_bytes(), Duration::from_secs(5)).await;
    assert!(resp.is_empty() || status_of(&resp) == Some(431), "{resp}");
    assert_eq!(seen.count(), 0);
}

#[tokio::test]
async fn mcp_body_that_is_not_utf8_is_refused_not_forwarded() {
    let p = proxy().await;
    let (up, seen) = http_upstream().await;
    let mut body =
        b"{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"tools/call\",\"params\":{\"name\":\"del"
            .to_vec();
    body.push(0xff);
    body.extend_from_slice(b"ete_all\",\"arguments\":{}}}");
    let mut req = format!(
        "POST /mcp HTTP/1.1\r\nhost: {up}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    let (resp, _) = exchange(&p, up, &req, Duration::from_secs(5)).await;
    assert_eq!(status_of(&resp), Some(400), "{resp}");
    assert!(resp.contains("unparseable"), "{resp}");
    assert_eq!(seen.count(), 0);
}

#[tokio::test]
async fn an_unsupported_content_encoding_is_not_echoed() {
    let p = proxy().await;
    let (up, seen) = http_upstream().await;
    let secret = "sk-ant-api03-notreallyasecretbutlooksalot";
    let req = format!(
        "POST /x HTTP/1.1\r\nhost: {up}\r\ncontent-encoding: {secret}\r\ncontent-length: 2\r\nconnection: close\r\n\r\nhi"
    );
    let (resp, _) = exchange(&p, up, req.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&resp), Some(415), "{resp}");
    assert!(!resp.contains(secret), "{resp}");
    assert_eq!(seen.count(), 0);
    let records = p.audit_records().await;
    assert!(!format!("{records:?}").contains(secret));
}

/// Everything the proxy logs while a test runs on this (current-thread) runtime.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_refused_rewrite_logs_no_body_data() {
    // tracing caches each callsite's interest process-wide, computed once by whichever thread reaches it first; with
    // at most one dispatcher registered it asks only that thread's default. A test running alongside, with no
    // subscriber, would pin the callsites this test reads to "never" (tracing-core `Rebuilder::JustOne`). A global
    // default registered first means no thread ever answers with "no subscriber" (set once per process).
    let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    short_limits();
    let yaml = "version: 1\ndefault: allow\nrules:\n  - id: redact\n    when: { detect: [github-token] }\n    verdict: constrain\n    constrain: { redact: [github-token] }\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = http_upstream().await;
    // The secret sits inside a signed thinking block (so the rewrite is refused) under a key that is itself secret.
    let token = "ghp_abcdefghijklmnopqrstuvwxyz0123456789";
    let body = serde_json::json!({
        token: {"type": "thinking", "thinking": format!("token {token}"), "signature": "sig"}
    })
    .to_string();
    let req = format!(
        "POST /x HTTP/1.1\r\nhost: {up}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let (resp, _) = exchange(&p, up, req.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&resp), Some(403), "{resp}");
    assert!(!resp.contains(token), "{resp}");
    assert_eq!(seen.count(), 0);
    let logged = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        logged.contains("constrain could not be applied"),
        "{logged}"
    );
    assert!(!logged.contains("ghp_"), "{logged}");
}

#[tokio::test]
async fn a_constrained_chunked_gzip_body_is_reframed_for_the_upstream() {
    use std::io::Write;
    short_limits();
    let yaml = "version: 1\ndefault: allow\nrules:\n  - id: redact\n    when: { detect: [github-token] }\n    verdict: constrain\n    constrain: { redact: [github-token] }\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = raw_upstream(false).await;
    let token = "ghp_abcdefghijklmnopqrstuvwxyz0123456789";
    let body = serde_json::json!({"prompt": format!("use {token} please"), "n": 1}).to_string();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(body.as_bytes()).unwrap();
    let gz = gz.finish().unwrap();
    let (a, b) = gz.split_at(gz.len() / 2);
    let mut req = format!(
        "POST /x HTTP/1.1\r\nhost: {up}\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in [a, b] {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let (resp, _) = exchange(&p, up, &req, Duration::from_secs(5)).await;
    assert_eq!(status_of(&resp), Some(200), "{resp}");
    let raw = seen.lock().unwrap()[0].clone();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, sent) = text.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(!head.contains("transfer-encoding"), "{head}");
    assert!(!head.contains("content-encoding"), "{head}");
    assert!(
        head.contains(&format!("content-length: {}\r\n", sent.len()))
            || head.ends_with(&format!("content-length: {}", sent.len())),
        "{head} / {}",
        sent.len()
    );
    let sent: serde_json::Value = serde_json::from_str(sent).unwrap();
    assert_eq!(
        sent,
        serde_json::json!({"prompt": "use [REDACTED:github-token] please", "n": 1})
    );
    let records = p.audit_records().await;
    assert_eq!(records.len(), 1);
    assert!(!records[0].to_string().contains(token));
}

#[tokio::test]
async fn an_mcp_call_in_utf16_is_refused_not_forwarded_unclassified() {
    let p = proxy().await;
    let (up, seen) = http_upstream().await;
    let json = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_all","arguments":{}}}"#;
    // What Python's json.loads(bytes) (the official MCP SDK's server) reads as that very call.
    let body: Vec<u8> = json.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let mut req = format!(
        "POST /mcp HTTP/1.1\r\nhost: {up}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    let (resp, _) = exchange(&p, up, &req, Duration::from_secs(5)).await;
    assert_eq!(status_of(&resp), Some(415), "{resp}");
    assert_eq!(seen.count(), 0);
    let records = p.audit_records().await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["outcome"]["error"], "unparseable");
}

#[tokio::test]
async fn dot_segments_cannot_walk_out_of_an_allowed_path() {
    short_limits();
    let yaml = "version: 1\ndefault: block\nrules:\n  - id: acme-read\n    when: { host: 127.0.0.1, method: [GET], path: \"/repos/acme/**\" }\n    verdict: allow\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = raw_upstream(false).await;
    for path in [
        "/repos/acme/../evil/secrets",
        "/repos/acme/%2e%2e/evil/secrets",
        "/repos/acme/..%2fevil/secrets",
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nhost: {up}\r\nconnection: close\r\n\r\n");
        let (resp, _) = exchange(&p, up, req.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&resp), Some(400), "{path}: {resp}");
    }
    assert!(seen.lock().unwrap().is_empty());
    let req = format!("GET /repos/acme/tools HTTP/1.1\r\nhost: {up}\r\nconnection: close\r\n\r\n");
    let (resp, _) = exchange(&p, up, req.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&resp), Some(200), "{resp}");
    assert_eq!(p.audit_records().await.len(), 4);
}

#[tokio::test]
async fn encoded_path_spellings_cannot_dodge_a_deny_rule() {
    short_limits();
    let yaml = "version: 1\ndefault: allow\nrules:\n  - id: no-admin\n    when: { host: 127.0.0.1, path: \"/admin/**\" }\n    verdict: block\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = raw_upstream(false).await;
    for path in [
        "/admin/users",
        "/%61dmin/users",
        "/%2561dmin-is-not-admin",
        "//admin//users",
        "/admin;v=1/users",
        "/%2Fadmin/users",
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nhost: {up}\r\nconnection: close\r\n\r\n");
        let (resp, _) = exchange(&p, up, req.as_bytes(), Duration::from_secs(5)).await;
        let want = if path.starts_with("/%25") { 200 } else { 403 };
        assert_eq!(status_of(&resp), Some(want), "{path}: {resp}");
    }
    // Only the request that really is not under /admin reached the upstream.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(String::from_utf8_lossy(&seen[0]).starts_with("GET /%2561dmin-is-not-admin "));
    let records = p.audit_records().await;
    assert_eq!(records.len(), 6);
    // The record keeps the path as the client sent it.
    assert_eq!(records[1]["request"]["path"], "/%61dmin/users");
    assert_eq!(records[1]["decision"]["rule"], "no-admin");
}

#[tokio::test]
async fn a_secret_hidden_by_escapes_is_redacted_and_one_redaction_cannot_reach_is_blocked() {
    short_limits();
    let yaml = "version: 1\ndefault: allow\nrules:\n  - id: redact-keys\n    when: { detect: [aws-access-key] }\n    verdict: constrain\n    constrain: { redact: [aws-access-key] }\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = raw_upstream(false).await;
    let key_tail = "KIAIOSFODNN7EXAMPLE";

    // `\u0041` spells the key's `A`: detection and redaction read the string as the upstream's parser will.
    let body = format!(r#"{{"prompt":"\u0041{key_tail}"}}"#);
    let req = format!(
        "POST /v1/chat HTTP/1.1\r\nhost: {up}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let (resp, _) = exchange(&p, up, req.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&resp), Some(200), "{resp}");

    // In the URL path the key cannot be rewritten: blocked, naming the detector and where, never the value.
    let req = format!("GET /paste/A{key_tail} HTTP/1.1\r\nhost: {up}\r\nconnection: close\r\n\r\n");
    let (resp, _) = exchange(&p, up, req.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&resp), Some(403), "{resp}");
    assert!(
        resp.contains("aws-access-key") && resp.contains("path"),
        "{resp}"
    );
    assert!(!resp.contains(key_tail), "{resp}");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        1,
        "only the redacted request reached the upstream"
    );
    let forwarded = String::from_utf8_lossy(&seen[0]);
    assert!(
        forwarded.contains(r#"{"prompt":"[REDACTED:aws-access-key]"}"#),
        "{forwarded}"
    );
    assert!(!forwarded.contains(key_tail));

    let records = p.audit_records().await;
    assert_eq!(records.len(), 2);
    assert_eq!(records[0]["decision"]["verdict"], "constrain");
    assert_eq!(records[1]["decision"]["verdict"], "block");
    assert_eq!(records[1]["decision"]["reason"], "unredactable");
    // The record names the path without the key.
    assert_eq!(
        records[1]["request"]["path"],
        "/paste/[REDACTED:aws-access-key]"
    );

    // A key in the host name: refused (here already because the name does not live at the destination), and the
    // record shows the host without the key.
    let req =
        format!("GET /x HTTP/1.1\r\nhost: A{key_tail}.exfil.test\r\nconnection: close\r\n\r\n");
    let (resp, _) = exchange(&p, up, req.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&resp), Some(421), "{resp}");
    assert!(!resp.contains(key_tail), "{resp}");
    let records = p.audit_records().await;
    assert_eq!(records.len(), 3);
    assert_eq!(records[2]["decision"]["reason"], "host_mismatch");
    // Host names arrive lower-cased, so the key is found (and shown) in upper case.
    assert_eq!(
        records[2]["request"]["host"],
        "[REDACTED:aws-access-key].EXFIL.TEST"
    );
    assert!(!serde_json::to_string(&records).unwrap().contains(key_tail));
    assert_eq!(seen.len(), 1);
}

/// A body that claims JSON but that the proxy's parser refuses must never be decided as plain HTTP: MCP servers
/// (the official Python SDK's among them) accept `NaN`, `Infinity`, out-of-range numbers and deeper nesting, so a
/// host-level allow would let a `tools/call` the policy blocks run. Refused with a JSON-RPC parse error, whether the
/// JSON is claimed by the media type or only by the body's shape, and nothing reaches the upstream.
#[tokio::test]
async fn json_the_parser_refuses_is_refused_not_decided_as_plain_http() {
    short_limits();
    let yaml = "version: 1\ndefault: block\nrules:\n  - id: allow-mcp-host\n    when: { host: 127.0.0.1 }\n    verdict: allow\n  - id: no-delete\n    when: { mcp.tool: \"delete_*\" }\n    verdict: block\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = http_upstream().await;
    let call = |args: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"name":"delete_everything","arguments":{args}}}}}"#
        )
    };
    let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    let bodies = [
        call(r#"{"n":NaN}"#),
        call(r#"{"n":Infinity}"#),
        call(r#"{"n":-Infinity}"#),
        call(r#"{"n":1e400}"#),
        call(&format!(r#"{{"deep":{deep}}}"#)),
    ];
    for body in &bodies {
        for content_type in ["application/json", "text/plain"] {
            let request = format!(
                "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let (resp, _) = exchange(&p, up, request.as_bytes(), Duration::from_secs(5)).await;
            assert!(
                resp.starts_with("HTTP/1.1 400"),
                "{content_type} {body:.60}: {resp}"
            );
            assert!(
                resp.contains("\"code\":-32700"),
                "a JSON-RPC parse error: {resp}"
            );
        }
    }
    assert_eq!(
        seen.count(),
        0,
        "nothing the policy could not read reached the upstream"
    );
    let records = p.audit_records().await;
    assert_eq!(records.len(), bodies.len() * 2);
    for r in &records {
        assert_eq!(r["outcome"]["disposition"], "blocked", "{r}");
        assert_eq!(r["outcome"]["error"], "unparseable", "{r}");
    }
    // Valid JSON-RPC on the same host is still classified and decided per tool.
    let ok = call(r#"{"n":1}"#);
    let request = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{ok}",
        ok.len()
    );
    let (resp, _) = exchange(&p, up, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(
        resp.contains("\"isError\":true"),
        "the tool call is blocked as a tool error: {resp}"
    );
    assert_eq!(seen.count(), 0);
}

/// What is forwarded is what was inspected: a content-coded body the policy allows goes upstream decoded, without
/// its `Content-Encoding`, so no difference between the proxy's decoder and the upstream's can matter.
#[tokio::test]
async fn an_allowed_coded_body_is_forwarded_as_inspected() {
    use std::io::Write;
    short_limits();
    let p = proxy().await;
    let (up, seen) = raw_upstream(false).await;
    let body = r#"{"prompt":"hello"}"#;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    z.write_all(body.as_bytes()).unwrap();
    let z = z.finish().unwrap();
    let mut req = format!(
        "POST /x HTTP/1.1\r\nhost: {up}\r\ncontent-type: application/json\r\ncontent-encoding: deflate\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        z.len()
    )
    .into_bytes();
    req.extend_from_slice(&z);
    let (resp, _) = exchange(&p, up, &req, Duration::from_secs(5)).await;
    assert_eq!(status_of(&resp), Some(200), "{resp}");
    let raw = seen.lock().unwrap()[0].clone();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, sent) = text.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(!head.contains("content-encoding"), "{head}");
    assert!(
        head.contains(&format!("content-length: {}", body.len())),
        "{head}"
    );
    assert_eq!(sent, body);
}

/// Blocks any request in which the AWS access key detector fires.
const NO_AWS_KEYS: &str = "version: 1\ndefault: allow\nrules:\n  - id: no-keys\n    when: { detect: [aws-access-key] }\n    verdict: block\n";

/// `Content-Encoding` may come as several field lines, which a recipient reads as one list (RFC 9110 §5.3):
/// `identity` on one line and `gzip` on the next is a gzip body. Inspection reads every line, so a secret behind the
/// second line's coding is found (and a body the policy allows goes upstream decoded, without the field), never
/// forwarded still coded with a label the upstream reads in full.
#[tokio::test]
async fn every_content_encoding_line_is_undone_before_inspection() {
    use std::io::Write;
    short_limits();
    let p = start_proxy(NO_AWS_KEYS, &[], false).await;
    let (up, seen) = raw_upstream(false).await;
    let request = |text: &str| {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(text.as_bytes()).unwrap();
        let gz = gz.finish().unwrap();
        let mut req = format!(
            "POST /paste HTTP/1.1\r\nhost: {up}\r\ncontent-type: text/plain\r\ncontent-encoding: identity\r\ncontent-encoding: gzip\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            gz.len()
        )
        .into_bytes();
        req.extend_from_slice(&gz);
        req
    };
    let (resp, _) = exchange(
        &p,
        up,
        &request("note AKIAIOSFODNN7EXAMPLE"),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&resp), Some(403), "{resp}");
    assert!(
        seen.lock().unwrap().is_empty(),
        "the coded secret reached the upstream"
    );

    let (resp, _) = exchange(&p, up, &request("just a note"), Duration::from_secs(5)).await;
    assert_eq!(status_of(&resp), Some(200), "{resp}");
    let raw = seen.lock().unwrap()[0].clone();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, sent) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        !head.to_ascii_lowercase().contains("content-encoding"),
        "{head}"
    );
    assert_eq!(sent, "just a note");

    let records = p.audit_records().await;
    assert_eq!(records.len(), 2);
    assert_eq!(records[0]["decision"]["rule"], "no-keys");
    assert_eq!(records[1]["decision"]["verdict"], "allow");
}

/// A body labelled as a form is read by the upstream as a form, whatever else its text parses as: `"k=%41KIA…"` is a
/// JSON string, and also the form field `k` holding an AWS key once percent-decoded. Detection reads the form too.
#[tokio::test]
async fn a_form_body_that_is_also_json_is_scanned_as_the_form_it_is() {
    short_limits();
    let p = start_proxy(NO_AWS_KEYS, &[], false).await;
    let (up, seen) = raw_upstream(false).await;
    let bodies = [
        r#""k=%41KIAIOSFODNN7EXAMPLE""#,
        r#"["&k=%41KIAIOSFODNN7EXAMPLE&"]"#,
        r#"{"a":"&k=%41KIAIOSFODNN7EXAMPLE&"}"#,
    ];
    for body in bodies {
        let req = format!(
            "POST /paste HTTP/1.1\r\nhost: {up}\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let (resp, _) = exchange(&p, up, req.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&resp), Some(403), "{body}: {resp}");
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "a form-encoded key reached the upstream"
    );
    let records = p.audit_records().await;
    assert_eq!(records.len(), bodies.len());
    for r in &records {
        assert_eq!(r["decision"]["rule"], "no-keys", "{r}");
    }
}

/// `Upgrade` may come as several field lines, which the upstream reads as one list (RFC 9110 §5.3): `websocket` on
/// one line and `h2c` on the next asks for both. The request is decided on the whole list, so it is no WebSocket
/// upgrade and its `Upgrade` is removed (an h2c session after a 101 would skip every decision), never forwarded as a
/// WebSocket upgrade that still asks for h2c.
#[tokio::test]
async fn every_upgrade_line_is_read_before_the_upgrade_is_admitted() {
    let p = proxy().await;
    let (up, seen) = raw_upstream(false).await;
    let req = format!(
        "GET /chat HTTP/1.1\r\nhost: {up}\r\nconnection: upgrade\r\nupgrade: websocket\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
    );
    let (resp, _) = exchange(&p, up, req.as_bytes(), Duration::from_secs(3)).await;
    assert_eq!(status_of(&resp), Some(200), "{resp}");
    let raw = seen.lock().unwrap()[0].clone();
    let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    assert!(!head.contains("upgrade: h2c"), "{head}");
    assert!(!head.contains("http2-settings"), "{head}");
    let records = p.audit_records().await;
    assert_eq!(records.len(), 1);
    assert!(
        records[0].to_string().contains("upgrade_removed"),
        "{}",
        records[0]
    );
}

/// JSON-RPC member names are case-sensitive, but an MCP server built on Go's `encoding/json` matches them
/// case-insensitively (also folding `ſ` to `s`), the last of two such keys winning (CVE-2026-27896): each body below
/// is, to such a server, a call of `delete_all` the policy would not have seen. They are refused as unparseable
/// JSON-RPC and nothing reaches the upstream; a differently-cased key that is no member and has no twin still passes.
#[tokio::test]
async fn json_rpc_members_spelt_in_another_case_are_refused() {
    short_limits();
    let yaml = "version: 1\ndefault: block\nrules:\n  - id: allow-mcp-host\n    when: { host: 127.0.0.1 }\n    verdict: allow\n  - id: no-delete\n    when: { mcp.tool: \"delete_*\" }\n    verdict: block\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = http_upstream().await;
    let post = |body: &str| json_post("/mcp", body);
    let bodies = [
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","Name":"delete_all"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"Method":"tools/call","params":{"name":"delete_all"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"NAME":"delete_all"}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file"},"paramſ":{"name":"delete_all"}}"#,
        r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"JSONRPC":"2.0","id":2,"method":"tools/call","params":{"name":"delete_all"}}]"#,
        // An exact duplicate: the policy's parser keeps the last `name`, a server keeping the first calls delete_all.
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_all","name":"read_file"}}"#,
    ];
    let requests: Vec<String> = bodies.iter().map(|b| post(b)).collect();
    for resp in answered_each(&p, up, &requests, 400).await {
        assert!(resp.contains("\"code\":-32700"), "{resp}");
    }
    assert_eq!(seen.count(), 0, "an ambiguous call reached the upstream");
    // Arguments no rule reads are the tool's data: members alike in letter case there pass.
    let ok = [
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"write","arguments":{"Path":"/tmp/x"}}}"#,
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"write","arguments":{"path":"/tmp/x","Path":"/tmp/y"}}}"#,
    ];
    let oks: Vec<String> = ok.iter().map(|b| post(b)).collect();
    answered_each(&p, up, &oks, 200).await;
    assert_eq!(seen.count(), ok.len() as u64);
    let records = p.audit_records().await;
    assert_eq!(records.len(), bodies.len() + ok.len());
    all_refused_as(&records[..bodies.len()], "unparseable");
    all_forwarded_as(&records[bodies.len()..], Some("allow-mcp-host"));
}

/// A JSON body whose object names one member twice — exactly anywhere, or in another letter case where the policy
/// reads it — is read differently by its receivers: serde_json (the policy) keeps the last of exact twins, other
/// decoders the first; Go's `encoding/json` matches `Query` to the field `query` and keeps the last of the two. Each
/// body below is allowed by a rule that read a SELECT where the database gateway runs the DROP, or names a member
/// twice exactly. They are refused (400, one record, reason unparseable) and nothing reaches the upstream. Members
/// alike only in letter case where no condition reads (a database row `{"ID":1,"id":2}`) are data: such a body is
/// allowed, as is the same query without a twin.
#[tokio::test]
async fn json_objects_with_twin_members_are_refused() {
    short_limits();
    let yaml = "version: 1\ndefault: block\nrules:\n  - id: select-only\n    when:\n      host: 127.0.0.1\n      json: { \"$.query\": { matches: \"(?i)^select\\\\b\" } }\n    verdict: allow\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = http_upstream().await;
    let post = |body: &str| json_post("/query", body);
    let bodies = [
        r#"{"query":"select 1","Query":"drop table users"}"#,
        r#"{"query":"drop table users","query":"select 1"}"#,
        r#"{"query":"select 1","QUERY":"drop table users"}"#,
        r#"{"options":{"a":1,"a":2},"query":"select 1"}"#,
        r#"{"query":"select 1","rows":[{"x":{"y":[{"k":"a","k":"b"}]}}]}"#,
    ];
    let requests: Vec<String> = bodies.iter().map(|b| post(b)).collect();
    answered_each(&p, up, &requests, 400).await;
    assert_eq!(seen.count(), 0, "an ambiguous body reached the upstream");
    let ok = [
        r#"{"query":"select 1","Options":{"Query":"x"}}"#,
        r#"{"options":{"a":1,"A":2},"query":"select 1"}"#,
        r#"{"query":"select 1","rows":[{"ID":1,"id":2},{"x":{"y":[{"k":"a","K":"b"}]}}]}"#,
    ];
    let oks: Vec<String> = ok.iter().map(|b| post(b)).collect();
    answered_each(&p, up, &oks, 200).await;
    assert_eq!(seen.count(), ok.len() as u64);
    let records = p.audit_records().await;
    assert_eq!(records.len(), bodies.len() + ok.len());
    all_refused_as(&records[..bodies.len()], "unparseable");
    all_forwarded_as(&records[bodies.len()..], Some("select-only"));
}

/// A multipart (RFC 7578) body whose part has its own `Content-Transfer-Encoding` is decoded by python-multipart and
/// Django (base64, quoted-printable) and by Go (quoted-printable): the detectors would read only the encoding. Such
/// a body is refused (415, one record, unparseable), as is a part with its own `Content-Encoding` or a charset that
/// hides ASCII, and a boundary that reads two ways; a file name given as an RFC 2231 extended parameter is read as
/// receivers decode it, so a key spelt with escapes there is found. Nothing reaches the upstream; a plain multipart
/// body passes.
#[tokio::test]
async fn multipart_parts_a_receiver_decodes_are_refused_or_read_decoded() {
    short_limits();
    let p = start_proxy(NO_AWS_KEYS, &[], false).await;
    let (up, seen) = raw_upstream(false).await;
    let post = |content_type: &str, body: &str| {
        format!(
            "POST /upload HTTP/1.1\r\nhost: {up}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let form = "multipart/form-data; boundary=B0und";
    let part = |headers: &str, data: &str| {
        format!("--B0und\r\nContent-Disposition: form-data; name=\"note\"\r\n{headers}\r\n{data}\r\n--B0und--\r\n")
    };
    // base64 and quoted-printable spellings of AKIAIOSFODNN7EXAMPLE.
    let refused = [
        (
            form,
            part(
                "Content-Transfer-Encoding: base64\r\n",
                "QUtJQUlPU0ZPRE5ON0VYQU1QTEU=",
            ),
        ),
        (
            form,
            part(
                "Content-Transfer-Encoding: quoted-printable\r\n",
                "=41=4B=49=41IOSFODNN7EXAMPLE",
            ),
        ),
        (form, part("Content-Encoding: gzip\r\n", "x")),
        (
            form,
            part("Content-Type: text/plain; charset=utf-16le\r\n", "x"),
        ),
        (
            "multipart/form-data; boundary=B0und; boundary=other",
            part("", "x"),
        ),
    ];
    for (content_type, body) in &refused {
        let (resp, _) = exchange(
            &p,
            up,
            post(content_type, body).as_bytes(),
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(status_of(&resp), Some(415), "{body}: {resp}");
    }
    let named = part("", "x").replace(
        "name=\"note\"",
        "name=\"note\"; filename*=UTF-8''%41KIAIOSFODNN7EXAMPLE.txt",
    );
    let (resp, _) = exchange(
        &p,
        up,
        post(form, &named).as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&resp), Some(403), "{resp}");
    assert!(
        seen.lock().unwrap().is_empty(),
        "an encoded part reached the upstream"
    );

    let (resp, _) = exchange(
        &p,
        up,
        post(form, &part("", "just a note")).as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&resp), Some(200), "{resp}");
    let records = p.audit_records().await;
    assert_eq!(records.len(), refused.len() + 2);
    for r in &records[..refused.len()] {
        assert_eq!(r["outcome"]["error"], "unparseable", "{r}");
    }
    assert_eq!(records[refused.len()]["decision"]["rule"], "no-keys");
}

/// An address in the NAT64 well-known prefix reaches the IPv4 address it embeds (RFC 6052): `[64:ff9b::7f00:1]` is
/// 127.0.0.1 through a NAT64 gateway, and is decided as 127.0.0.1 (blocked by the rule naming it, not bound to
/// nothing). An address in the local-use prefix `64:ff9b:1::/48` embeds its IPv4 address where the network chose,
/// and is refused.
#[tokio::test]
async fn nat64_addresses_are_decided_as_the_ipv4_address_they_reach() {
    short_limits();
    let yaml = "version: 1\ndefault: allow\nrules:\n  - id: no-loopback\n    when: { host: 127.0.0.1 }\n    verdict: block\n    message: the upstream's address is blocked\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = raw_upstream(false).await;
    let get = |host: &str| {
        format!(
            "GET /x HTTP/1.1\r\nhost: {host}:{}\r\nconnection: close\r\n\r\n",
            up.port()
        )
    };
    for host in ["[64:ff9b::7f00:1]", "[64:FF9B::127.0.0.1]"] {
        let (resp, _) = exchange(&p, up, get(host).as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&resp), Some(403), "{host}: {resp}");
        assert!(
            resp.contains("the upstream's address is blocked"),
            "{host}: {resp}"
        );
    }
    let (resp, _) = exchange(
        &p,
        up,
        get("[64:ff9b:1::7f00:1]").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&resp), Some(400), "{resp}");
    assert!(seen.lock().unwrap().is_empty());
    let records = p.audit_records().await;
    assert_eq!(records.len(), 3);
    assert_eq!(
        records[0]["decision"]["rule"], "no-loopback",
        "{}",
        records[0]
    );
    assert_eq!(records[0]["request"]["host"], "127.0.0.1", "{}", records[0]);
    assert_eq!(
        records[2]["outcome"]["error"], "bad_request",
        "{}",
        records[2]
    );
}

/// Frameworks route a POST as the method it names in `X-HTTP-Method-Override` (and `X-HTTP-Method`,
/// `X-Method-Override`) or a `_method` parameter of its query or form (Rack, Laravel, Spring, Express
/// `method-override`): each request below is a DELETE to such an application, where the policy saw a POST. The
/// policy blocks the DELETE reading, so the block is the request's decision: refused as the policy refuses (403, one
/// record naming the rule) and nothing reaches the upstream. A `_method` part of a multipart form is refused as
/// unreadable (400, bad_request: its value is not read); an override naming the request's own method passes.
#[tokio::test]
async fn a_method_override_naming_another_method_is_refused() {
    short_limits();
    let yaml = "version: 1\ndefault: allow\nrules:\n  - id: no-deletes\n    when: { method: DELETE }\n    verdict: block\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = raw_upstream(false).await;
    let post = |target: &str, extra: &str, content_type: &str, body: &str| {
        post_to(
            up,
            target,
            &format!("{extra}content-type: {content_type}\r\n"),
            body,
        )
    };
    let form = "application/x-www-form-urlencoded";
    let requests = [
        post(
            "/items/7",
            "x-http-method-override: DELETE\r\n",
            "text/plain",
            "",
        ),
        post("/items/7", "X-HTTP-Method: delete\r\n", "text/plain", ""),
        post(
            "/items/7",
            "x-method-override: DELETE\r\n",
            "text/plain",
            "",
        ),
        post("/items/7?_method=DELETE", "", "text/plain", ""),
        post("/items/7", "", form, "confirm=1&_method=DELETE"),
        post(
            "/items/7",
            "x-http-method-override: GET, DELETE\r\n",
            "text/plain",
            "",
        ),
    ];
    let answers = answered_each(&p, up, &requests, 403).await;
    for a in &answers {
        assert!(a.contains("no-deletes"), "{a}");
    }
    let multipart = post(
        "/items/7",
        "",
        "multipart/form-data; boundary=b",
        "--b\r\ncontent-disposition: form-data; name=\"_method\"\r\n\r\nPUT\r\n--b--\r\n",
    );
    answered_each(&p, up, &[multipart], 400).await;
    assert!(
        seen.lock().unwrap().is_empty(),
        "an overridden method reached the upstream"
    );
    let same = post(
        "/items/7",
        "x-http-method-override: POST\r\n",
        "text/plain",
        "",
    );
    answered_each(&p, up, &[same], 200).await;
    let records = p.audit_records().await;
    assert_eq!(records.len(), requests.len() + 2);
    for r in &records[..requests.len()] {
        assert_eq!(r["decision"]["verdict"], "block", "{r}");
        assert_eq!(r["decision"]["rule"], "no-deletes", "{r}");
        assert_eq!(r["decision"]["reason"], "rule", "{r}");
        assert_eq!(
            r["decision"]["matched"],
            serde_json::json!(["no-deletes"]),
            "{r}"
        );
        assert_eq!(r["outcome"]["disposition"], "blocked", "{r}");
        assert_eq!(r["outcome"]["status"], 403, "{r}");
        assert_eq!(r["outcome"]["error"], serde_json::Value::Null, "{r}");
        // The record names the request as sent.
        assert_eq!(r["request"]["method"], "POST", "{r}");
    }
    all_refused_as(&records[requests.len()..=requests.len()], "bad_request");
}

/// Readings the policy decides differently where none is an enforced block (a `log` rule for one, the default for
/// another; a block under a shadow policy) have no decision that fits the request: refused as ambiguous (400, one
/// record, bad_request), never forwarded. A request blocked under its own reading is refused by that block (403).
#[tokio::test]
async fn readings_decided_differently_without_an_enforced_block_are_refused_as_ambiguous() {
    short_limits();
    let logged = "version: 1\ndefault: allow\nrules:\n  - id: log-deletes\n    when: { method: DELETE }\n    verdict: log\n  - id: no-posts-here\n    when: { method: POST, path: /posts/** }\n    verdict: block\n";
    let shadow = "version: 1\nmode: shadow\ndefault: allow\nrules:\n  - id: no-deletes\n    when: { method: DELETE }\n    verdict: block\n";
    for (yaml, target, status, error, rule) in [
        (logged, "/items/7", 400, "bad_request", None),
        (shadow, "/items/7", 400, "bad_request", None),
        (logged, "/posts/7", 403, "", Some("no-posts-here")),
    ] {
        let p = start_proxy(yaml, &[], false).await;
        let (up, seen) = raw_upstream(false).await;
        let req = post_to(up, target, "x-http-method-override: DELETE\r\n", "");
        answered_each(&p, up, &[req], status).await;
        assert!(seen.lock().unwrap().is_empty(), "{target}: forwarded");
        let records = p.audit_records().await;
        assert_eq!(records.len(), 1, "{records:#?}");
        let r = &records[0];
        assert_eq!(r["outcome"]["disposition"], "blocked", "{r}");
        assert_eq!(r["outcome"]["status"], status, "{r}");
        match rule {
            None => assert_eq!(r["outcome"]["error"], error, "{r}"),
            Some(rule) => {
                assert_eq!(r["decision"]["rule"], rule, "{r}");
                assert_eq!(r["outcome"]["error"], serde_json::Value::Null, "{r}");
            }
        }
    }
}

/// A POST that names another method (`X-HTTP-Method-Override: GET`, `_method=PUT` in its query or form) is decided
/// under its own method and under each it names: where the policy decides them alike, it reaches the upstream as
/// sent, recorded allowed — by the same rule, or by the default.
#[tokio::test]
async fn a_method_override_decided_alike_under_each_method_is_forwarded() {
    short_limits();
    let yaml = "version: 1\ndefault: block\nrules:\n  - id: items\n    when: { path: \"/items/**\", method: [GET, POST, PUT] }\n    verdict: allow\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = http_upstream().await;
    let requests = [
        ("/items/7", "x-http-method-override: GET\r\n", ""),
        ("/items/7", "X-HTTP-Method: put\r\n", ""),
        ("/items/7?_method=PUT", "", ""),
        (
            "/items/7",
            "content-type: application/x-www-form-urlencoded\r\n",
            "confirm=1&_method=PUT",
        ),
    ]
    .map(|(target, extra, body)| post_to(up, target, extra, body));
    answered_each(&p, up, &requests, 200).await;
    let paths = paths_seen(&seen);
    assert_eq!(paths.len(), requests.len());
    assert_eq!(paths[2], "/items/7?_method=PUT");
    let records = p.audit_records().await;
    assert_eq!(records.len(), requests.len());
    all_forwarded_as(&records, Some("items"));
}

/// An OpenAI-compatible server built on Go's `encoding/json` (local model servers, API gateways) binds `Model` to
/// its `model` field and a tool's `NAME` to `name`: each call below asks it for the model or declares the tool the
/// policy blocks, while the policy found no model and no tool. Such a call is refused in OpenAI's error shape (400,
/// one record, unparseable) and never reaches the upstream; the same call spelt exactly is decided (blocked by its
/// rule), and a call naming neither passes.
#[tokio::test]
async fn llm_fields_spelt_in_another_case_are_refused() {
    use std::sync::atomic::Ordering;
    let yaml = "version: 1\ndefault: allow\nrules:\n  - id: no-gpt5\n    when: { llm.model: \"gpt-5*\" }\n    verdict: block\n  - id: no-shell\n    when: { llm.tools: shell }\n    verdict: block\n";
    let ca = TestCa::new("llm case test CA");
    let p = start_proxy(yaml, &[&ca], false).await;
    let (up, reached) = counting_upstream(&ca, &["api.openai.com"]).await;
    let ask = |body| post_over_tls(&p, up, ("api.openai.com", "/v1/chat/completions"), body);
    let misspelt = [
        r#"{"Model":"gpt-5","messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"gpt-4o","messages":[],"Tools":[{"type":"function","function":{"name":"shell"}}]}"#,
        r#"{"model":"gpt-4o","messages":[],"tools":[{"type":"function","function":{"NAME":"shell"}}]}"#,
        r#"{"model":"gpt-4o","messages":[{"Role":"tool","content":"x"}]}"#,
        // Not JSON at all.
        r#"{"model":"gpt-5","messages":["#,
    ];
    for body in misspelt {
        let (status, answer) = ask(body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer.contains("invalid_request_error"), "{body}: {answer}");
    }
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "a misspelt call reached the upstream"
    );
    let (status, _) = ask(r#"{"model":"gpt-5","messages":[]}"#).await;
    assert_eq!(status, 400);
    let (status, answer) =
        ask(r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi","name":"Ann"}]}"#).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(reached.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let records = p.audit_records().await;
    assert_eq!(records.len(), misspelt.len() + 2);
    for (r, body) in records.iter().zip(misspelt) {
        assert_eq!(r["outcome"]["error"], "unparseable", "{r}");
        // The provider is known from the host, the body's size and digest from what was read.
        assert_eq!(r["request"]["host"], "api.openai.com", "{r}");
        assert_eq!(r["request"]["llm_provider"], "openai", "{r}");
        assert_eq!(r["request"]["body_size"], body.len(), "{r}");
        assert_eq!(
            r["request"]["body_sha256"],
            sha256_hex(body.as_bytes()),
            "{r}"
        );
    }
    assert_eq!(records[misspelt.len()]["decision"]["rule"], "no-gpt5");
}

/// The tool shapes whose name is not under `function`: a custom tool (Chat Completions `{"type":"custom","custom":
/// {"name":…}}`, Responses `{"type":"custom","name":…}`) and the tools a Responses `namespace` groups
/// (`{"type":"namespace","tools":[…]}`). A member of theirs spelt in another letter case (`Name`, `Custom`, `Tools`)
/// is what a server on Go's `encoding/json` reads the tool's name from, while the policy found none: refused (400,
/// unparseable, never forwarded). Spelt exactly, each declares `shell` and is blocked by the `llm.tools` rule.
#[tokio::test]
async fn custom_and_namespaced_tools_spelt_in_another_case_are_refused() {
    use std::sync::atomic::Ordering;
    let yaml = "version: 1\ndefault: allow\nrules:\n  - id: no-shell\n    when: { llm.tools: shell }\n    verdict: block\n";
    let ca = TestCa::new("llm tool shapes test CA");
    let p = start_proxy(yaml, &[&ca], false).await;
    let (up, reached) = counting_upstream(&ca, &["api.openai.com"]).await;
    let chat = ("api.openai.com", "/v1/chat/completions");
    let responses = ("api.openai.com", "/v1/responses");
    let misspelt = [
        (
            responses,
            r#"{"model":"gpt-5","input":"hi","tools":[{"type":"custom","Name":"shell"}]}"#,
        ),
        (
            chat,
            r#"{"model":"gpt-5","messages":[],"tools":[{"type":"custom","custom":{"Name":"shell"}}]}"#,
        ),
        (
            chat,
            r#"{"model":"gpt-5","messages":[],"tools":[{"type":"custom","Custom":{"name":"shell"}}]}"#,
        ),
        (
            responses,
            r#"{"model":"gpt-5","input":"hi","tools":[{"type":"namespace","name":"ops","tools":[{"type":"function","Name":"shell"}]}]}"#,
        ),
        (
            responses,
            r#"{"model":"gpt-5","input":"hi","tools":[{"type":"namespace","name":"ops","tools":[{"type":"custom","NAME":"shell"}]}]}"#,
        ),
        (
            responses,
            r#"{"model":"gpt-5","input":"hi","tools":[{"type":"namespace","name":"ops","Tools":[{"type":"function","name":"shell"}]}]}"#,
        ),
        (
            responses,
            r#"{"model":"gpt-5","input":"hi","tools":[{"type":"namespace","name":"ops","tools":[{"type":"function","function":{"nAme":"shell"}}]}]}"#,
        ),
    ];
    for (to, body) in misspelt {
        let (status, answer) = post_over_tls(&p, up, to, body).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer.contains("invalid_request_error"), "{body}: {answer}");
    }
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "a misspelt tool reached the upstream"
    );
    let exact = [
        (
            responses,
            r#"{"model":"gpt-5","input":"hi","tools":[{"type":"custom","name":"shell"}]}"#,
        ),
        (
            chat,
            r#"{"model":"gpt-5","messages":[],"tools":[{"type":"custom","custom":{"name":"shell"}}]}"#,
        ),
        (
            responses,
            r#"{"model":"gpt-5","input":"hi","tools":[{"type":"namespace","name":"ops","tools":[{"type":"function","name":"shell"}]}]}"#,
        ),
    ];
    for (to, body) in exact {
        post_over_tls(&p, up, to, body).await;
    }
    assert_eq!(
        reached.load(Ordering::SeqCst),
        0,
        "a shell tool reached the upstream"
    );
    let records = p.audit_records().await;
    assert_eq!(records.len(), misspelt.len() + exact.len());
    for r in &records[..misspelt.len()] {
        assert_eq!(r["outcome"]["error"], "unparseable", "{r}");
        assert_eq!(r["request"]["llm_provider"], "openai", "{r}");
    }
    for r in &records[misspelt.len()..] {
        assert_eq!(r["decision"]["rule"], "no-shell", "{r}");
        assert_eq!(r["outcome"]["disposition"], "blocked", "{r}");
    }
}

/// An agent session's LLM calls carry data the model was given: a Gemini `functionResponse.response` holding a
/// database row `{"ID":1,"id":2}`, an OpenAI tool message's content with such an object. No reader looks those
/// members up by name, so the calls reach the upstream, recorded allowed. A member named twice exactly, or a
/// protocol member spelt in another case beside its own (`model` and `Model`), is still refused (400, unparseable).
#[tokio::test]
async fn llm_calls_carrying_rows_with_members_alike_in_letter_case_are_forwarded() {
    use std::sync::atomic::Ordering;
    let yaml = "version: 1\ndefault: allow\nrules:\n  - id: no-gpt5\n    when: { llm.model: \"gpt-5*\" }\n    verdict: block\n";
    let ca = TestCa::new("llm twins test CA");
    let p = start_proxy(yaml, &[&ca], false).await;
    let hosts = ["api.openai.com", "generativelanguage.googleapis.com"];
    let (up, reached) = counting_upstream(&ca, &hosts).await;
    let gemini = (
        "generativelanguage.googleapis.com",
        "/v1beta/models/gemini-2.0-flash:generateContent",
    );
    let chat = ("api.openai.com", "/v1/chat/completions");
    let legitimate = [
        (
            gemini,
            r#"{"contents":[{"role":"user","parts":[{"text":"row 1?"}]},{"role":"model","parts":[{"functionCall":{"name":"db","args":{"id":1}}}]},{"role":"user","parts":[{"functionResponse":{"name":"db","response":{"ID":1,"id":2}}}]}]}"#,
        ),
        (
            chat,
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"row 1?"},{"role":"tool","tool_call_id":"c1","content":[{"type":"text","text":"row","data":{"ID":1,"id":2}}]}]}"#,
        ),
    ];
    for (to, body) in legitimate {
        let (status, answer) = post_over_tls(&p, up, to, body).await;
        assert_eq!(status, 200, "{body}: {answer}");
    }
    assert_eq!(reached.load(Ordering::SeqCst), legitimate.len());
    let refused = [
        r#"{"model":"gpt-4o","model":"gpt-5","messages":[]}"#,
        r#"{"model":"gpt-4o","Model":"gpt-5","messages":[]}"#,
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi","data":{"a":1,"a":2}}]}"#,
    ];
    for body in refused {
        let (status, answer) = post_over_tls(&p, up, chat, body).await;
        assert_eq!(status, 400, "{body}: {answer}");
    }
    assert_eq!(reached.load(Ordering::SeqCst), legitimate.len());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let records = p.audit_records().await;
    assert_eq!(records.len(), legitimate.len() + refused.len());
    all_forwarded_as(&records[..legitimate.len()], None);
    all_refused_as(&records[legitimate.len()..], "unparseable");
}

/// A condition on a header or query parameter holds when any of its values meets it, while a receiver acts on the
/// first, the last or all of them — and a CGI-style server (WSGI, Django, PHP) reads `X_Role` as `X-Role`. Each
/// request below passes an allow rule on `x-role: reader` and `mode=read` with a second value the application may
/// act on instead, which the policy's default blocks: refused by that block (403, one record) and nothing reaches the
/// upstream; the same request given one way passes.
#[tokio::test]
async fn a_field_the_policy_reads_given_two_ways_is_refused() {
    short_limits();
    let yaml = "version: 1\ndefault: block\nrules:\n  - id: readers\n    when: { header.x-role: reader, query.mode: read }\n    verdict: allow\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = raw_upstream(false).await;
    let get = |query: &str, headers: &str| {
        format!("GET /records?{query} HTTP/1.1\r\nhost: {up}\r\n{headers}connection: close\r\n\r\n")
    };
    let requests = [
        get("mode=read", "x-role: reader\r\nx-role: admin\r\n"),
        get("mode=read", "x-role: reader\r\nx_role: admin\r\n"),
        get("mode=read&mode=write", "x-role: reader\r\n"),
    ];
    answered_each(&p, up, &requests, 403).await;
    assert!(
        seen.lock().unwrap().is_empty(),
        "a second value reached the upstream"
    );
    let one_way = get("mode=read&mode=read", "x-role: reader\r\n");
    answered_each(&p, up, &[one_way], 200).await;
    let records = p.audit_records().await;
    assert_eq!(records.len(), requests.len() + 1);
    all_blocked_by(&records[..requests.len()], &[None, None, None]);
}

/// List-valued fields are legitimate: two `anthropic-beta` lines (one list, RFC 9110 §5.3), `include[]` given twice,
/// a `;` in a value (`q=a;b`, which Rails also reads as `q=a` and `b`). Each is decided under every reading — each
/// value alone, the lines joined with `, `, the query split on `;` too — and, the policy deciding them all alike,
/// reaches the upstream recorded allowed. The same policy's block rules still see a value one reading gives: such
/// a request is refused by that rule (403).
#[tokio::test]
async fn a_list_valued_field_read_alike_every_way_is_forwarded() {
    short_limits();
    let yaml = "version: 1\ndefault: allow\nrules:\n  - id: no-computer-use\n    when: { header.anthropic-beta: \"*computer-use*\" }\n    verdict: block\n  - id: no-secrets\n    when: { \"query.include[]\": secrets }\n    verdict: block\n  - id: no-drop\n    when: { query.q: \"drop*\" }\n    verdict: block\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = http_upstream().await;
    let get = |query: &str, headers: &str| {
        format!(
            "GET /v1/search?{query} HTTP/1.1\r\nhost: {up}\r\n{headers}connection: close\r\n\r\n"
        )
    };
    let betas = "anthropic-beta: prompt-caching-2024-07-31\r\nanthropic-beta: token-efficient-tools-2025-02-19\r\n";
    let legitimate = [
        get("x=1", betas),
        get("include[]=a&include[]=b", ""),
        get("q=a;b", ""),
        get("include[]=a&include[]=b&q=a;b", betas),
    ];
    answered_each(&p, up, &legitimate, 200).await;
    assert_eq!(seen.count() as usize, legitimate.len());
    let bypasses = [
        get(
            "x=1",
            "anthropic-beta: a\r\nanthropic-beta: computer-use-2025-01-24\r\n",
        ),
        get("include[]=a&include[]=secrets", ""),
        get("q=a;q=drop", ""),
    ];
    let rules = ["no-computer-use", "no-secrets", "no-drop"];
    for (resp, rule) in answered_each(&p, up, &bypasses, 403)
        .await
        .iter()
        .zip(rules)
    {
        assert!(resp.contains(rule), "{resp}");
    }
    assert_eq!(seen.count() as usize, legitimate.len());
    let records = p.audit_records().await;
    assert_eq!(records.len(), legitimate.len() + bypasses.len());
    all_forwarded_as(&records[..legitimate.len()], None);
    all_blocked_by(&records[legitimate.len()..], &rules.map(Some));
}

/// A request read several ways is enforced as the proxy parsed it: two `anthropic-beta` lines that each reading
/// constrains by the same rule are forwarded with that rule's rewrite made once, recorded constrained.
#[tokio::test]
async fn readings_decided_alike_are_enforced_as_the_request_was_parsed() {
    short_limits();
    let yaml = "version: 1\ndefault: allow\nrules:\n  - id: cap-betas\n    when: { header.anthropic-beta: \"*\" }\n    verdict: constrain\n    constrain: { json_set: { \"$.max_tokens\": 100 } }\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = http_upstream().await;
    let extra = "anthropic-beta: a\r\nanthropic-beta: b\r\ncontent-type: application/json\r\n";
    let req = post_to("127.0.0.1", "/v1/complete", extra, r#"{"max_tokens":4096}"#);
    answered_each(&p, up, &[req], 200).await;
    let bodies: Vec<Vec<u8>> = seen
        .log
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.3.clone())
        .collect();
    assert_eq!(bodies.len(), 1);
    let sent: serde_json::Value = serde_json::from_slice(&bodies[0]).unwrap();
    assert_eq!(sent["max_tokens"], 100, "{sent}");
    let records = p.audit_records().await;
    assert_eq!(records.len(), 1);
    assert_eq!(
        records[0]["decision"]["verdict"], "constrain",
        "{}",
        records[0]
    );
    assert_eq!(
        records[0]["decision"]["rule"], "cap-betas",
        "{}",
        records[0]
    );
    assert_eq!(
        records[0]["outcome"]["disposition"], "forwarded",
        "{}",
        records[0]
    );
}

/// A tool on Go's `encoding/json` binds an argument spelt `Command` to its `command` field: a rule on
/// `$.command` reads it so too, and the call is blocked (a tool error), never forwarded.
#[tokio::test]
async fn a_condition_reads_a_member_spelt_in_another_case() {
    short_limits();
    let yaml = "version: 1\ndefault: allow\nrules:\n  - id: no-rm\n    when: { mcp.args: { \"$.command\": { matches: \"\\\\brm\\\\b\" } } }\n    verdict: block\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = http_upstream().await;
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"shell","arguments":{"Command":"rm -rf /"}}}"#;
    let req = format!(
        "POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (resp, _) = exchange(&p, up, req.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&resp), Some(200), "{resp}");
    assert!(resp.contains("\"isError\":true"), "{resp}");
    assert_eq!(seen.count(), 0, "the call reached the upstream");
    let records = p.audit_records().await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["decision"]["rule"], "no-rm", "{}", records[0]);
}

/// Where a condition reads a member (`$.command` of a tool's arguments) and the call gives it twice, alike in letter
/// case, an exact decoder runs `ls` and Go's `encoding/json` the last, `rm -rf /`: the call is refused (400, one
/// record, unparseable) and never forwarded. Twins of a member no condition reads pass.
#[tokio::test]
async fn a_member_a_condition_reads_given_twice_in_letter_case_is_refused() {
    short_limits();
    let yaml = "version: 1\ndefault: allow\nrules:\n  - id: no-rm\n    when: { mcp.args: { \"$.command\": { matches: \"\\\\brm\\\\b\" } } }\n    verdict: block\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = http_upstream().await;
    let post = |body: &str| json_post("/mcp", body);
    let twins = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"shell","arguments":{"command":"ls","Command":"rm -rf /"}}}"#;
    for resp in answered_each(&p, up, &[post(twins)], 400).await {
        assert!(resp.contains("\"code\":-32700"), "{resp}");
    }
    assert_eq!(seen.count(), 0, "the call reached the upstream");
    let data = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"shell","arguments":{"command":"ls","env":{"PATH":"/bin","path":"/usr/bin"}}}}"#;
    answered_each(&p, up, &[post(data)], 200).await;
    assert_eq!(seen.count(), 1);
    let records = p.audit_records().await;
    assert_eq!(records.len(), 2);
    all_refused_as(&records[..1], "unparseable");
    all_forwarded_as(&records[1..], None);
}

/// IIS and ASP.NET read a backslash in a path as `/`: `/admin%5Cusers` is `/admin/users` to them and a segment
/// `admin\users` to others, which a rule on `/admin/**` does not match. A path with a backslash, sent or encoded,
/// is decided both ways; the rule blocks the `/` reading of each, so they are refused by it (403, one record each)
/// and never forwarded.
#[tokio::test]
async fn a_backslash_in_the_path_is_refused() {
    short_limits();
    let yaml = "version: 1\ndefault: allow\nrules:\n  - id: no-admin\n    when: { path: \"/admin/**\" }\n    verdict: block\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = raw_upstream(false).await;
    for path in ["/admin%5Cusers", "/admin%5cusers", "/admin\\users"] {
        let req = format!("GET {path} HTTP/1.1\r\nhost: {up}\r\nconnection: close\r\n\r\n");
        let (resp, _) = exchange(&p, up, req.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&resp), Some(403), "{path}: {resp}");
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "a backslash path reached the upstream"
    );
    let records = p.audit_records().await;
    all_blocked_by(&records, &[Some("no-admin"); 3]);
}

/// A backslash the policy decides alike read either way (a Windows file name in a path no rule tells apart) reaches
/// the upstream as sent, recorded allowed.
#[tokio::test]
async fn a_backslash_decided_alike_both_ways_is_forwarded() {
    short_limits();
    let yaml = "version: 1\ndefault: block\nrules:\n  - id: no-admin\n    when: { path: \"/admin/**\" }\n    verdict: block\n  - id: files\n    when: { path: \"/files/**\" }\n    verdict: allow\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = http_upstream().await;
    let get =
        |path: &str| format!("GET {path} HTTP/1.1\r\nhost: {up}\r\nconnection: close\r\n\r\n");
    let requests = [get("/files/C:%5Cdata%5Creport.txt"), get("/files/a%5cb")];
    answered_each(&p, up, &requests, 200).await;
    let paths = paths_seen(&seen);
    assert_eq!(paths.len(), requests.len());
    assert_eq!(paths, ["/files/C:%5Cdata%5Creport.txt", "/files/a%5cb"]);
    let records = p.audit_records().await;
    assert_eq!(records.len(), requests.len());
    all_forwarded_as(&records, Some("files"));
}

/// Express (qs), Rack/Rails and PHP read `cmd[]=id`, `cmd%5B%5D=id` and `cmd[x]=id` as the parameter `cmd` (`["id"]`,
/// `{x: "id"}`); PHP also reads `user.id`, `user id` and `user[id` as `user_id`. A rule blocking any `cmd` (or any
/// `user_id`) decides the query both as named and as those frameworks name it, and the request, read differently,
/// is refused by the rule (403, one record) and never forwarded. Brackets in a parameter no rule reads pass.
#[tokio::test]
async fn query_names_frameworks_read_as_another_name_are_read_both_ways() {
    short_limits();
    let yaml = "version: 1\ndefault: allow\nrules:\n  - id: no-cmd\n    when: { query.cmd: \"*\" }\n    verdict: block\n  - id: no-user-id\n    when: { query.user_id: \"0\" }\n    verdict: block\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = raw_upstream(false).await;
    let queries = [
        "cmd[]=id",
        "cmd%5B%5D=id",
        "cmd%5b%5d=id",
        "cmd[x]=id",
        "cmd[x][y]=id",
        "a=1&cmd[]=id",
        "user.id=0",
        "user%20id=0",
        "user+id=0",
        "user[id=0",
    ];
    let requests: Vec<String> = queries
        .iter()
        .map(|q| format!("GET /run?{q} HTTP/1.1\r\nhost: {up}\r\nconnection: close\r\n\r\n"))
        .collect();
    for (q, req) in queries.iter().zip(&requests) {
        let (resp, _) = exchange(&p, up, req.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&resp), Some(403), "{q}: {resp}");
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "a parameter the policy blocks reached the upstream"
    );
    let ok = format!(
        "GET /run?filter[]=a&user.name=b&user_id=1 HTTP/1.1\r\nhost: {up}\r\nconnection: close\r\n\r\n"
    );
    answered_each(&p, up, &[ok], 200).await;
    let records = p.audit_records().await;
    assert_eq!(records.len(), queries.len() + 1);
    let rules = queries.map(|q| {
        Some(if q.contains("cmd") {
            "no-cmd"
        } else {
            "no-user-id"
        })
    });
    all_blocked_by(&records[..queries.len()], &rules);
    all_forwarded_as(&records[queries.len()..], None);
}

/// Rack 2 (Rails), older Python and Go split a query on `;` as well as `&`: `?mode=read;mode=write` asks such an
/// application for `mode=write`, where a plain reading gives one value `read;mode=write`. A rule blocking
/// `mode=write` sees every reading, and the request, giving `mode` two ways, is refused by it (403) and never
/// forwarded. A `;` in a parameter no rule reads passes.
#[tokio::test]
async fn a_query_split_on_semicolons_is_read_both_ways() {
    short_limits();
    let yaml = "version: 1\ndefault: allow\nrules:\n  - id: read-only\n    when: { query.mode: write }\n    verdict: block\n";
    let p = start_proxy(yaml, &[], false).await;
    let (up, seen) = raw_upstream(false).await;
    let req = format!(
        "GET /records?mode=read;mode=write HTTP/1.1\r\nhost: {up}\r\nconnection: close\r\n\r\n"
    );
    let (resp, _) = exchange(&p, up, req.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&resp), Some(403), "{resp}");
    assert!(
        seen.lock().unwrap().is_empty(),
        "mode=write reached the upstream"
    );
    let ok = format!(
        "GET /records?mode=read&filter=a;b HTTP/1.1\r\nhost: {up}\r\nconnection: close\r\n\r\n"
    );
    answered_each(&p, up, &[ok], 200).await;
    let records = p.audit_records().await;
    assert_eq!(records.len(), 2);
    all_blocked_by(&records[..1], &[Some("read-only")]);
}

/// The daemon's own listeners on loopback (its metrics and review-link ports, `enforcer::proxy::set_daemon_ports`)
/// are never an agent's upstream, whatever the policy allows: an allowed plain-HTTP request and an allowed raw TCP
/// connection to one are refused (403, `daemon_endpoint`), recorded once each, and never connected to; the same
/// policy still forwards to another loopback port.
#[tokio::test]
async fn the_daemons_own_endpoints_are_never_an_upstream() {
    let (daemon, daemon_seen) = http_upstream().await;
    let (echo, echo_seen) = tcp_echo().await;
    enforcer::proxy::set_daemon_ports(vec![daemon.port(), echo.port()]);
    short_limits();
    let p = start_proxy(&policy(&["127.0.0.1"], &[echo.port()]), &[], false).await;
    let head = format!("GET /approve HTTP/1.1\r\nhost: {daemon}\r\n\r\n");
    let (resp, _) = exchange(&p, daemon, head.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&resp), Some(403), "{resp}");
    assert!(
        resp.contains("the enforcer's own endpoints are not for agents"),
        "{resp}"
    );
    let (resp, _) = exchange(&p, echo, b"hi\n", Duration::from_secs(2)).await;
    assert!(!resp.contains("HELLO"), "{resp}");
    assert_eq!(daemon_seen.count(), 0);
    assert_eq!(echo_seen.count(), 0);
    let records = p.audit_records().await;
    assert_eq!(records.len(), 2, "{records:#?}");
    for r in &records {
        assert_eq!(r["outcome"]["error"], "daemon_endpoint", "{r}");
    }
    assert_eq!(records[0]["outcome"]["status"], 403);
    assert_eq!(records[1]["outcome"]["disposition"], "failed");

    // Another loopback port under the same policy is forwarded.
    let (other, other_seen) = http_upstream().await;
    let head = format!("GET /ok HTTP/1.1\r\nhost: {other}\r\n\r\n");
    let (resp, _) = exchange(&p, other, head.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(status_of(&resp), Some(200), "{resp}");
    assert_eq!(other_seen.count(), 1);
}
