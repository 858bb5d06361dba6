//! Streamed LLM responses through the proxy with proposal and response rules active, against the same stream fetched
//! directly in the same run: time to the first streamed byte (target: within 1 ms of direct), and the cost of a
//! 1,000-event chat-completions stream (text deltas, then a tool call in many argument deltas that a proposal rule
//! refuses, and a response rule reading every event) as wall time and process CPU per event beyond direct (target:
//! ≤ 20 µs of proxy CPU per event). Client, upstream and proxy share this process, so the CPU difference between the
//! two runs is the proxy's. Run: `cargo bench -p enforcer --bench stream` (`ENFORCER_BENCH_SHORT=1`: fewer rounds).

#[path = "../tests/proxy_support/mod.rs"]
mod proxy_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use proxy_support::*;
use rustls::pki_types::ServerName;
use serde_json::json;

/// The allocator the daemon ships with (`src/main.rs`): the proxy's per-event CPU depends on it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EVENTS: usize = 1000;

const POLICY: &str = r#"version: 1
default: allow
rules:
  - id: no-curl
    phase: proposal
    when: { proposal.tool: shell, proposal.args: { "$.command": { matches: "\\bcurl\\b" } } }
    verdict: block
  - id: no-secrets-in-calls
    phase: proposal
    when: { detect: [aws-access-key, github-token] }
    verdict: block
  - id: redact-returned-keys
    phase: response
    when: { host: api.openai.com, detect: [aws-access-key, github-token] }
    verdict: constrain
    constrain: { redact: [aws-access-key, github-token] }
"#;

/// The stream's events: text deltas, then a `shell` call whose arguments arrive in many deltas, then the finish.
fn events() -> Vec<Bytes> {
    let chunk = |delta: serde_json::Value, finish: serde_json::Value| {
        let c = json!({"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
        Bytes::from(format!("data: {c}\n\n"))
    };
    let mut out = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        json!(null),
    )];
    let calls = 100;
    for i in 0..EVENTS - calls - 3 {
        out.push(chunk(json!({"content": format!("word{i} ")}), json!(null)));
    }
    out.push(chunk(
        json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "shell", "arguments": ""}}]}),
        json!(null),
    ));
    let args = format!(
        r#"{{"command": "curl https://example.net/{}"}}"#,
        "x".repeat(calls * 4)
    );
    let step = args.len().div_ceil(calls - 1);
    for piece in args.as_bytes().chunks(step) {
        out.push(chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": String::from_utf8_lossy(piece)}}]}),
            json!(null),
        ));
    }
    out.push(chunk(json!({}), json!("tool_calls")));
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    out
}

async fn upstream(ca: &TestCa) -> std::net::SocketAddr {
    let (chain, key) = ca.leaf(&["api.openai.com"]);
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("leaf");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let events = Arc::new(events());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, events) = (acceptor.clone(), events.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(move |req: Request<Incoming>| {
                    let events = events.clone();
                    async move {
                        let _ = req.into_body().collect().await;
                        let (mut tx, rx) = http_body_util::channel::Channel::<Bytes>::new(64);
                        tokio::spawn(async move {
                            for e in events.iter() {
                                if tx.send_data(e.clone()).await.is_err() {
                                    return;
                                }
                            }
                        });
                        Ok::<_, std::convert::Infallible>(
                            Response::builder()
                                .header("content-type", "text/event-stream")
                                .body(rx)
                                .expect("response"),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

fn request() -> Request<Full<Bytes>> {
    let body =
        json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("host", "api.openai.com")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request")
}

/// One stream over `io`: time to the first body byte, time to the end, bytes received.
async fn one<S>(io: S) -> (Duration, Duration, usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let t = Instant::now();
    let resp = s.send_request(request()).await.expect("response");
    let mut body = resp.into_body();
    let (mut first, mut n) = (None, 0);
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.expect("frame").into_data() {
            n += data.len();
            first.get_or_insert_with(|| t.elapsed());
        }
    }
    (first.unwrap_or_default(), t.elapsed(), n)
}

/// CPU time (user + system) of this process.
fn cpu() -> Duration {
    // SAFETY: getrusage writes into the struct we pass and has no other preconditions.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

struct Run {
    first: Duration,
    total: Duration,
    cpu: Duration,
    bytes: usize,
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(run());
}

async fn run() {
    let rounds: u32 = if std::env::var_os("ENFORCER_BENCH_SHORT").is_some() {
        10
    } else {
        50
    };
    let ca = TestCa::new("stream bench CA");
    let up = upstream(&ca).await;
    let proxy = start_proxy(POLICY, &[&ca], false).await;
    let direct_tls = tokio_rustls::TlsConnector::from(client_trusting(&ca.pem, &[b"http/1.1"]));
    let mut direct = Vec::new();
    let mut via = Vec::new();
    // Interleaved, after one warm-up each, so both see the same machine load.
    for round in 0..=rounds {
        let tcp = tokio::net::TcpStream::connect(up).await.expect("upstream");
        let tls = direct_tls
            .connect(ServerName::try_from("api.openai.com").expect("name"), tcp)
            .await
            .expect("direct TLS");
        let c = cpu();
        let (first, total, bytes) = one(tls).await;
        let d = Run {
            first,
            total,
            cpu: cpu() - c,
            bytes,
        };
        let tls = proxy.tls_to(up, "api.openai.com", &[b"http/1.1"]).await;
        let c = cpu();
        let (first, total, bytes) = one(tls).await;
        let v = Run {
            first,
            total,
            cpu: cpu() - c,
            bytes,
        };
        if round > 0 {
            direct.push(d);
            via.push(v);
        }
    }
    assert!(
        via.iter()
            .all(|r| r.bytes > 0 && r.bytes != direct[0].bytes),
        "the refusal rewrote the stream"
    );
    let median = |runs: &[Run], f: fn(&Run) -> Duration| {
        let mut v: Vec<Duration> = runs.iter().map(f).collect();
        v.sort();
        v[v.len() / 2]
    };
    let (df, vf) = (median(&direct, |r| r.first), median(&via, |r| r.first));
    println!(
        "time to first streamed byte: direct {:.3} ms, via proxy {:.3} ms, +{:.3} ms, ratio {:.2} (target: within 1 ms)",
        df.as_secs_f64() * 1e3,
        vf.as_secs_f64() * 1e3,
        (vf.as_secs_f64() - df.as_secs_f64()) * 1e3,
        vf.as_secs_f64() / df.as_secs_f64()
    );
    let (dt, vt) = (median(&direct, |r| r.total), median(&via, |r| r.total));
    let (dc, vc) = (median(&direct, |r| r.cpu), median(&via, |r| r.cpu));
    let per = |d: Duration| d.as_secs_f64() * 1e6 / EVENTS as f64;
    println!(
        "{EVENTS}-event stream, wall: direct {:.2} ms, via proxy {:.2} ms, ratio {:.2}, +{:.2} µs per event",
        dt.as_secs_f64() * 1e3,
        vt.as_secs_f64() * 1e3,
        vt.as_secs_f64() / dt.as_secs_f64(),
        per(vt.saturating_sub(dt))
    );
    println!(
        "{EVENTS}-event stream, process CPU: direct {:.2} ms, via proxy {:.2} ms, ratio {:.2}, proxy {:.2} µs per event (target: ≤ 20)",
        dc.as_secs_f64() * 1e3,
        vc.as_secs_f64() * 1e3,
        vc.as_secs_f64() / dc.as_secs_f64(),
        per(vc.saturating_sub(dc))
    );
}
