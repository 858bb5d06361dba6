//! An LLM stream on the wire, through the real proxy from a raw TLS upstream speaking HTTP/1.1 to an agent over
//! HTTP/1.1 or HTTP/2 (the proxy translates): a last chunk with trailers (RFC 9112 §7.1.2) and chunk extensions
//! (§7.1.1) while a tool call is held, and a content-coded stream that breaks off without its last chunk. A call is
//! decided and delivered before the stream ends; a stream broken upstream is broken for the agent.

mod proxy_support;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxy_support::*;
use serde_json::{json, Value};

fn chunk(delta: Value, finish: Option<&str>) -> String {
    let c = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
    format!("data: {c}\n\n")
}

fn tool_piece(args: &str) -> Value {
    json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
        "function": {"name": "shell", "arguments": args}}]})
}

/// One record: the proposal's, blocked by the policy's rule.
fn assert_refused(case: &str, recs: &[Value]) {
    assert_eq!(recs.len(), 1, "{case}: {recs:#?}");
    let r = &recs[0];
    assert_eq!(r["request"]["phase"], "proposal", "{case}: {r}");
    assert_eq!(r["outcome"]["disposition"], "blocked", "{case}: {r}");
    assert_eq!(r["decision"]["rule"], "no-curl", "{case}: {r}");
}

const OPENAI: &str = "api.openai.com";

/// An HTTP/1.1 upstream writing, for the request's `x-case`, a chunked event stream byte for byte.
async fn wire_upstream(ca: &TestCa) -> SocketAddr {
    use tokio::io::AsyncWriteExt;
    let (chain, key) = ca.leaf(&[OPENAI]);
    let handler: RawHandler = std::sync::Arc::new(move |mut tls| {
        Box::pin(async move {
            let head = String::from_utf8_lossy(&read_head(&mut tls).await).to_ascii_lowercase();
            let broken = head.contains("x-case: gzip-broken");
            let events = if broken {
                // A call that is complete as far as it came; the upstream breaks off before its finish.
                let mut s = chunk(json!({"role": "assistant", "content": null}), None);
                s.push_str(&chunk(tool_piece("{\"command\":\"echo ok\"}"), None));
                s
            } else {
                let mut s = chunk(json!({"role": "assistant", "content": "ok"}), None);
                let args = json!({"command": CURL_COMMAND}).to_string();
                s.push_str(&chunk(tool_piece(&args), None));
                s
            };
            let mut out = String::from("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n");
            let body = if broken {
                out.push_str("content-encoding: gzip\r\n");
                let mut gz =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                std::io::Write::write_all(&mut gz, events.as_bytes()).unwrap();
                gz.finish().unwrap()
            } else {
                events.into_bytes()
            };
            out.push_str("\r\n");
            let mut bytes = out.into_bytes();
            // A chunk extension (RFC 9112 §7.1.1) on the one data chunk.
            bytes.extend_from_slice(format!("{:x};ext=1\r\n", body.len()).as_bytes());
            bytes.extend_from_slice(&body);
            bytes.extend_from_slice(b"\r\n");
            if !broken {
                // The last chunk with a trailer section (RFC 9112 §7.1.2): the stream ends there, a call held.
                bytes.extend_from_slice(b"0\r\nx-checksum: 1\r\n\r\n");
            }
            let _ = tls.write_all(&bytes).await;
            let _ = tls.flush().await;
            // No last chunk for the broken case: the connection just ends.
            let (mut tcp, _) = tls.into_inner();
            let _ = tcp.shutdown().await;
        })
    });
    raw_tls_upstream(chain, key, &[b"http/1.1"], handler).await
}

/// One streamed chat request over h1 (asking for trailers) or h2: the body as far as it came, and whether it ended
/// cleanly.
async fn wire_ask(proxy: &Proxy, up: SocketAddr, case: &str, h2: bool) -> (String, bool) {
    let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
    let io = TokioIo::new(proxy.tls_to(up, OPENAI, &[alpn]).await);
    let req = Request::builder()
        .method("POST")
        .uri(if h2 {
            "https://api.openai.com/v1/chat/completions"
        } else {
            "/v1/chat/completions"
        })
        .header("host", OPENAI)
        .header("te", "trailers")
        .header("x-case", case)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]})
                .to_string(),
        )))
        .unwrap();
    let resp = if h2 {
        let (mut s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .unwrap();
        tokio::spawn(conn);
        s.send_request(req).await.unwrap()
    } else {
        let (mut s, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
        tokio::spawn(conn);
        s.send_request(req).await.unwrap()
    };
    let mut body = resp.into_body();
    let mut got = Vec::new();
    let clean = loop {
        match body.frame().await {
            None => break true,
            Some(Err(_)) => break false,
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    got.extend_from_slice(d);
                }
            }
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), clean)
}

/// A stream whose last chunk carries trailers, a call still held when it ends: the call is decided and its refusal
/// reaches the agent (over h1 and h2) before the stream ends, not lost behind the trailers.
#[tokio::test]
async fn a_call_held_when_trailers_end_the_stream_is_decided_and_delivered() {
    let ca = TestCa::new("answer wire CA");
    let proxy = start_proxy(NO_CURL_POLICY, &[&ca], false).await;
    let up = wire_upstream(&ca).await;
    for h2 in [false, true] {
        let before = proxy.audit_records().await.len();
        let (body, clean) = wire_ask(&proxy, up, "trailers", h2).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!body.contains("evil.example"), "h2={h2}: {body}");
        assert!(clean, "h2={h2}: {body}");
        assert!(
            body.contains("refused the tool call `shell`"),
            "h2={h2}: {body}"
        );
        let recs = proxy.audit_records().await;
        assert_refused("trailers", &recs[before + 1..]);
    }
    assert!(proxy.close_and_verify().await > 0);
}

/// A content-coded stream the upstream breaks off (no last chunk) breaks off for the agent too: never a clean end
/// with the calls cut short as if they were whole.
#[tokio::test]
async fn a_coded_stream_broken_off_upstream_is_broken_off_for_the_agent() {
    let ca = TestCa::new("answer wire CA");
    let proxy = start_proxy(NO_CURL_POLICY, &[&ca], false).await;
    let up = wire_upstream(&ca).await;
    for h2 in [false, true] {
        let (body, clean) = wire_ask(&proxy, up, "gzip-broken", h2).await;
        assert!(!clean, "h2={h2}: a clean end: {body}");
        assert!(!body.contains("echo ok"), "h2={h2}: {body}");
    }
    assert!(proxy.close_and_verify().await > 0);
}

/// A body of one data frame, then (a moment later, once the frame has gone out) an error: hyper's HTTP/2 server
/// resets the stream (RST_STREAM) there.
struct Resetting(Option<Bytes>, std::pin::Pin<Box<tokio::time::Sleep>>);

impl hyper::body::Body for Resetting {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, std::io::Error>>> {
        if let Some(data) = self.0.take() {
            return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(data))));
        }
        std::task::ready!(self.1.as_mut().poll(cx));
        std::task::Poll::Ready(Some(Err(std::io::Error::other("reset mid-body"))))
    }
}

/// An upstream speaking only HTTP/2 whose answer (an event stream with a call still open, or the start of a
/// whole completion) is reset mid-body.
async fn h2_resetting_upstream(ca: &TestCa) -> SocketAddr {
    let (chain, key) = ca.leaf(&[OPENAI]);
    let acceptor = tls_acceptor(chain, key, &[b"h2"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc =
                    hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                        let events = req
                            .headers()
                            .get("x-case")
                            .is_some_and(|c| c == "h2-reset-stream");
                        let (ct, body) = if events {
                            let mut s = chunk(json!({"role": "assistant", "content": "ok"}), None);
                            let args = json!({"command": "echo ok"}).to_string();
                            s.push_str(&chunk(tool_piece(&args), None));
                            ("text/event-stream", s)
                        } else {
                            (
                                "application/json",
                                "{\"id\":\"c1\",\"choices\":[".to_string(),
                            )
                        };
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .header("content-type", ct)
                                .body(Resetting(
                                    Some(Bytes::from(body)),
                                    Box::pin(tokio::time::sleep(Duration::from_millis(200))),
                                ))
                                .unwrap(),
                        )
                    });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

/// An HTTP/2 upstream resetting its stream mid-body, to an HTTP/1.1 agent: a stream breaks off for the agent with
/// the call it held never sent; a whole answer is refused (502, recorded), never passed on cut short.
#[tokio::test]
async fn an_h2_answer_reset_mid_body_never_passes_what_it_held() {
    let ca = TestCa::new("answer wire CA");
    let proxy = start_proxy(NO_CURL_POLICY, &[&ca], false).await;
    let up = h2_resetting_upstream(&ca).await;
    let (body, clean) = wire_ask(&proxy, up, "h2-reset-stream", false).await;
    assert!(!clean, "a clean end: {body}");
    assert!(body.contains("\"ok\""), "{body}");
    assert!(!body.contains("echo ok"), "{body}");
    let before = proxy.audit_records().await.len();
    let (body, clean) = wire_ask(&proxy, up, "h2-reset-whole", false).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(clean, "{body}");
    assert!(!body.contains("\"choices\":["), "{body}");
    let recs = proxy.audit_records().await;
    let recs = &recs[before + 1..];
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(recs[0]["outcome"]["disposition"], "blocked", "{}", recs[0]);
    assert!(proxy.close_and_verify().await > 0);
}
