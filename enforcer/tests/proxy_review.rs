//! Checkpoints, sessions and traces through the real proxy on loopback: a request a `review` rule holds reaches the
//! upstream only after an approval (once), never after a denial or a timeout with a `block` fallback, and its two
//! records (held, closing) say who answered, when and why; shadow mode records "would review" and forwards; labels
//! one request leaves on its session block a later one, also when a response phase sets them through the session
//! API; a retained exchange is written encrypted, its digest recorded, readable with the key and not without it, and
//! a swapped file is caught by `audit verify`.

mod proxy_support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use enforcer::model::{Agent, Approver};
use enforcer::proxy::{set_limits, Limits};
use http_body_util::Full;
use hyper::Request;
use proxy_support::*;
use serde_json::Value;

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const H1: &[u8] = b"http/1.1";

const POLICY: &str = r#"version: 1
default: block
rules:
  - id: allow-app
    when: { host: app.test }
    verdict: log
  - id: merge-needs-approval
    when: { host: app.test, path: "/merge/**" }
    verdict: review
    review: { timeout: 30s, fallback: block }
    message: merging needs a person's approval
  - id: strict
    when: { host: app.test, path: "/strict/**" }
    verdict: review
    review: { timeout: 1s, fallback: block }
  - id: lenient
    when: { host: app.test, path: "/lenient/**" }
    verdict: review
    review: { timeout: 1s, fallback: log }
  - id: crm
    when: { host: app.test, path: "/crm/**" }
    verdict: log
    label: customer-data
  - id: customer-data-in-a-response
    phase: response
    when: { detect: [email] }
    verdict: log
    label: customer-data
  - id: no-egress-after-customer-data
    when: { session.labels: customer-data, path: "/upload/**" }
    verdict: block
    message: customer data may not leave
  - id: traced
    when: { host: app.test, path: "/traced/**" }
    verdict: log
    retain: true
"#;

struct World {
    proxy: Proxy,
    upstream: SocketAddr,
    seen: Arc<Seen>,
}

/// Every test's proxy has the same limits (process-wide: the first call wins).
fn short_limits() {
    // Short client-side bounds, so a hold longer than them shows they do not cut a held exchange; a short
    // keep-alive interval, so a held stream shows its keep-alives within a test's time.
    set_limits(Limits {
        header_read_timeout: Duration::from_secs(1),
        body_idle_timeout: Duration::from_secs(1),
        review_keepalive: Duration::from_millis(200),
        ..Limits::default()
    });
}

async fn world_with(policy: &str, traces: Option<enforcer::trace::TraceSettings>) -> World {
    short_limits();
    let ca = TestCa::new("review test upstream CA");
    let (chain, key) = ca.leaf(&["app.test"]);
    let (upstream, seen) = https_upstream(chain, key, false).await;
    let hosts: &[(&str, &[IpAddr])] = &[("app.test", &[LOOPBACK])];
    let proxy = match traces {
        Some(t) => start_proxy_retaining(policy, &[&ca], hosts, t).await,
        None => start_proxy_with_hosts(policy, &[&ca], false, hosts).await,
    };
    World {
        proxy,
        upstream,
        seen,
    }
}

async fn world() -> World {
    world_with(POLICY, None).await
}

fn agent(cgroup: &str) -> Agent {
    Agent {
        profile: Some("test-agent".into()),
        cgroup: Some(cgroup.into()),
        pid: Some(4242),
        ..Agent::default()
    }
}

fn post(path: &str, body: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method("POST")
        .uri(path)
        .header("host", "app.test")
        .header("content-type", "application/json")
        .header("authorization", "Bearer sk-not-for-traces")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

/// One request from `agent` over a fresh TLS connection: (status, body).
async fn request(w: &World, agent: Agent, req: Request<Full<Bytes>>) -> (u16, String) {
    let tcp = w.proxy.connect_as_agent(w.upstream, agent).await;
    let tls = tokio_rustls::TlsConnector::from(w.proxy.client_tls(&[H1]))
        .connect(
            rustls::pki_types::ServerName::try_from("app.test").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (status, _, body) = send(tls, false, req).await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// A request from `cgroup`'s agent for `path`, sent in the background (it will be held); and the held review's id.
async fn held(
    w: &Arc<World>,
    cgroup: &'static str,
    path: &'static str,
) -> (tokio::task::JoinHandle<(u16, String)>, u64) {
    let w2 = w.clone();
    let client = tokio::spawn(async move { request(&w2, agent(cgroup), post(path, "{}")).await });
    (client, pending(w).await)
}

/// Wait (bounded) until a review is pending; its id.
async fn pending(w: &World) -> u64 {
    pending_review(&w.proxy).await
}

/// The records written so far that belong to `path`.
async fn records_for(w: &World, path: &str) -> Vec<Value> {
    w.proxy
        .audit_records()
        .await
        .into_iter()
        .filter(|r| r["request"]["path"] == path)
        .collect()
}

fn cli(name: &str) -> Approver {
    Approver::Cli {
        uid: 1000,
        name: Some(name.into()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_review_is_forwarded_once_with_its_approver_recorded() {
    let w = Arc::new(world().await);
    let (client, id) = held(&w, "/a/1", "/merge/7").await;
    // Held longer than the header-read and body-idle timeouts: the connection stays open.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        w.seen.count(),
        0,
        "nothing is forwarded before the approval"
    );
    let shown = w.proxy.ctx.reviews.get(id).unwrap();
    assert_eq!(shown.rule.as_deref(), Some("merge-needs-approval"));
    assert_eq!(shown.request.path.as_deref(), Some("/merge/7"));
    w.proxy
        .ctx
        .reviews
        .answer(id, true, cli("alice"), Some("checked".into()))
        .unwrap();
    let (status, body) = client.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(w.seen.count(), 1);
    let recs = records_for(&w, "/merge/7").await;
    assert_eq!(recs.len(), 2, "held and closing records: {recs:#?}");
    let (held, closing) = (&recs[0], &recs[1]);
    assert_eq!(held["seq"], id);
    assert_eq!(held["decision"]["verdict"], "review");
    assert_eq!(held["outcome"]["disposition"], "held");
    assert_eq!(held["review"]["timeout_secs"], 30);
    assert_eq!(held["review"]["fallback"], "block");
    assert_eq!(closing["outcome"]["disposition"], "forwarded");
    let r = &closing["review"];
    assert_eq!(r["held_seq"], id);
    assert_eq!(r["result"], "approved");
    assert_eq!(r["by"]["via"], "cli");
    assert_eq!(r["by"]["uid"], 1000);
    assert_eq!(r["by"]["name"], "alice");
    assert_eq!(r["reason"], "checked");
    assert_eq!(r["carried_out"], "allow");
    assert!(r["at"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert!(w.proxy.ctx.reviews.list().is_empty());
    w.proxy.close_and_verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_review_never_reaches_the_upstream_and_is_answered_like_a_block() {
    let w = Arc::new(world().await);
    let (client, id) = held(&w, "/a/2", "/merge/8").await;
    w.proxy
        .ctx
        .reviews
        .answer(id, false, cli("bob"), Some("not on a Friday".into()))
        .unwrap();
    let (status, body) = client.await.unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains(
            "merging needs a person's approval: denied by a reviewer: not on a Friday (policy rule: merge-needs-approval)"
        ),
        "{body}"
    );
    assert_eq!(w.seen.count(), 0);
    let recs = records_for(&w, "/merge/8").await;
    assert_eq!(recs.len(), 2, "{recs:#?}");
    let closing = &recs[1];
    assert_eq!(closing["outcome"]["status"], 403);
    denied_by(closing, "bob");
    w.proxy.close_and_verify().await;
}

/// `closing` is the closing record of a review `name` denied: the `review` decision kept, carried out as a block.
fn denied_by(closing: &Value, name: &str) {
    assert_eq!(closing["decision"]["verdict"], "review");
    assert_eq!(closing["outcome"]["disposition"], "blocked");
    assert_eq!(closing["outcome"]["error"], "review_denied");
    assert_eq!(closing["review"]["result"], "denied");
    assert_eq!(closing["review"]["by"]["name"], name);
    assert_eq!(closing["review"]["carried_out"], "block");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_review_nobody_answers_applies_its_fallback() {
    let w = world().await;
    let (status, body) = request(&w, agent("/a/3"), post("/strict/1", "{}")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("nobody approved it in time"), "{body}");
    let (status, _) = request(&w, agent("/a/3"), post("/lenient/1", "{}")).await;
    assert_eq!(status, 200);
    assert_eq!(w.seen.count(), 1, "only the lenient request went on");
    let strict = records_for(&w, "/strict/1").await;
    assert_eq!(strict[1]["outcome"]["error"], "review_timeout");
    assert_eq!(strict[1]["review"]["result"], "timeout");
    assert_eq!(strict[1]["review"]["carried_out"], "block");
    assert!(strict[1]["review"]["by"].is_null());
    let lenient = records_for(&w, "/lenient/1").await;
    assert_eq!(lenient[1]["outcome"]["disposition"], "forwarded");
    assert_eq!(lenient[1]["review"]["carried_out"], "log");
    w.proxy.close_and_verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_request_whose_client_leaves_is_withdrawn_and_recorded() {
    let w = Arc::new(world().await);
    let (client, id) = held(&w, "/a/4", "/merge/9").await;
    client.abort();
    for _ in 0..200 {
        if w.proxy.ctx.reviews.list().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(w.proxy.ctx.reviews.list().is_empty(), "withdrawn");
    assert!(w
        .proxy
        .ctx
        .reviews
        .answer(id, true, cli("late"), None)
        .is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(w.seen.count(), 0);
    let recs = records_for(&w, "/merge/9").await;
    assert_eq!(recs.len(), 2, "{recs:#?}");
    assert_eq!(recs[1]["outcome"]["error"], "client_closed");
    assert_eq!(recs[1]["outcome"]["disposition"], "failed");
    assert!(recs[1]["outcome"]["status"].is_null(), "{}", recs[1]);
    assert_eq!(recs[1]["review"]["held_seq"], id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_records_would_review_and_holds_nothing() {
    let shadow = POLICY.replace("default: block\n", "default: block\nmode: shadow\n");
    let w = world_with(&shadow, None).await;
    let (status, _) = request(&w, agent("/a/5"), post("/merge/10", "{}")).await;
    assert_eq!(status, 200);
    let recs = records_for(&w, "/merge/10").await;
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(recs[0]["decision"]["verdict"], "review");
    assert_eq!(recs[0]["decision"]["mode"], "shadow");
    assert_eq!(recs[0]["outcome"]["disposition"], "forwarded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_one_request_leaves_blocks_a_later_one_in_the_same_session_only() {
    let w = world().await;
    let (status, _) = request(&w, agent("/s/1"), get("/upload/a", "app.test")).await;
    assert_eq!(status, 200, "before any customer data");
    let (status, _) = request(&w, agent("/s/1"), get("/crm/customers", "app.test")).await;
    assert_eq!(status, 200);
    let (status, body) = request(&w, agent("/s/1"), get("/upload/b", "app.test")).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("customer data may not leave"), "{body}");
    // Another agent run (another cgroup) has its own session.
    let (status, _) = request(&w, agent("/s/2"), get("/upload/c", "app.test")).await;
    assert_eq!(status, 200);
    let crm = &records_for(&w, "/crm/customers").await[0];
    assert_eq!(
        crm["decision"]["labels"],
        serde_json::json!(["customer-data"])
    );
    let blocked = &records_for(&w, "/upload/b").await[0];
    let other = &records_for(&w, "/upload/c").await[0];
    let session = blocked["agent"]["session"].as_str().unwrap();
    assert_eq!(crm["agent"]["session"], session);
    assert_ne!(other["agent"]["session"], session);
    let info = w.proxy.ctx.sessions.show(session).unwrap();
    assert_eq!(info.labels, ["customer-data"]);
    assert_eq!(info.counters["requests"], 3);
}

/// The response phases (proposals, responses) decide their Actions and hand each decision to the same session API;
/// here an MCP tool result is decided and noted the way they will, and the proxy's next request sees the label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_label_a_response_leaves_through_the_session_api_blocks_later_requests() {
    use enforcer::model::{Action, HttpRequest, HttpResponse, McpCall, Transport};
    let w = world().await;
    let sessions = &w.proxy.ctx.sessions;
    let mut who = agent("/r/1");
    sessions.identify(&mut who);
    let body = MCP_RESULT;
    let mut result = vec![Action {
        agent: who.clone().into(),
        transport: Transport {
            host: Some("app.test".into()),
            port: 443,
            ..Transport::default()
        },
        http: Some(
            HttpRequest {
                method: "POST".into(),
                path: "/mcp".into(),
                ..HttpRequest::default()
            }
            .into(),
        ),
        mcp: Some(McpCall {
            method: "tools/call".into(),
            tool: Some("lookup_customer".into()),
            ..McpCall::default()
        }),
        response: Some(HttpResponse {
            status: 200,
            content_type: Some("application/json".into()),
            body: body.into(),
            json: serde_json::from_str(body).ok(),
            ..HttpResponse::default()
        }),
        ..Action::default()
    }];
    let policy = w.proxy.ctx.policy.current();
    sessions.fill(&mut result, policy.session_counters());
    let decided = policy.decide_all(&result);
    assert_eq!(decided.decision.labels, ["customer-data"]);
    sessions.note(&who, &decided.each[0], &result[0]);
    let (status, body) = request(&w, agent("/r/1"), get("/upload/x", "app.test")).await;
    assert_eq!(status, 403, "{body}");
    let shown = sessions.show(who.session.as_deref().unwrap()).unwrap();
    assert_eq!(shown.counters["bytes_received"], MCP_RESULT.len() as u64);
}

/// An MCP `tools/call` result carrying a customer's e-mail address.
const MCP_RESULT: &str = r#"{"jsonrpc":"2.0","id":1,"result":{"content":[{"type":"text","text":"jane@customer.example"}]}}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_exchange_is_encrypted_recorded_and_a_swap_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("trace.key");
    let recipient = enforcer::trace::cli::keygen(&key).unwrap();
    let settings = enforcer::trace::TraceSettings {
        recipient: Some(recipient),
        ..Default::default()
    };
    let w = world_with(POLICY, Some(settings)).await;
    let (status, _) = request(
        &w,
        agent("/t/1"),
        post(
            "/traced/1",
            r#"{"messages":[{"role":"user","content":"think hard"}]}"#,
        ),
    )
    .await;
    assert_eq!(status, 200);
    let mut trace_rec = None;
    for _ in 0..100 {
        trace_rec = w
            .proxy
            .audit_records()
            .await
            .into_iter()
            .find(|r| r["outcome"]["disposition"] == "retained");
        if trace_rec.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let trace_rec = trace_rec.expect("a trace record");
    let exchange = &records_for(&w, "/traced/1").await[0];
    assert_eq!(trace_rec["trace"]["of"], exchange["seq"]);
    assert_eq!(trace_rec["trace"]["event"], "stored");
    let of = exchange["seq"].as_u64().unwrap();
    let audit_dir = w.proxy.audit_dir.clone();
    let traces = audit_dir.join("traces");
    let text = enforcer::trace::cli::show(&audit_dir, &traces, of, &key).unwrap();
    assert!(text.contains("think hard"), "{text}");
    assert!(
        text.contains("upstream HTTP/1.1 host=app.test path=/traced/1"),
        "{text}"
    );
    assert!(
        !text.contains("sk-not-for-traces"),
        "credentials are left out: {text}"
    );
    // Another key cannot read it.
    let other = dir.path().join("other.key");
    enforcer::trace::cli::keygen(&other).unwrap();
    let err = enforcer::trace::cli::show(&audit_dir, &traces, of, &other).unwrap_err();
    assert!(err.to_string().contains("cannot decrypt"), "{err}");
    // Swapping the file for another valid trace is caught, by `show` and by `audit verify`.
    w.proxy.audit.close().await.unwrap();
    let file = traces.join(trace_rec["trace"]["file"].as_str().unwrap());
    a_swap_is_caught(&audit_dir, 1, &file, of, &key);
}

/// The trail verifies with its `traces` traces; then `file` (the trace of record `of`) altered is caught by `audit
/// verify` and by `trace show`, and deleted is caught too.
fn a_swap_is_caught(
    audit_dir: &std::path::Path,
    traces: usize,
    file: &std::path::Path,
    of: u64,
    key: &std::path::Path,
) {
    let report = enforcer::audit::verify(audit_dir, None).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.traces, traces);
    let mut bytes = std::fs::read(file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(file, &bytes).unwrap();
    let report = enforcer::audit::verify(audit_dir, None).unwrap();
    let problems: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
    assert!(
        problems.iter().any(|p| p.starts_with("swapped: trace")),
        "{problems:?}"
    );
    let traces = file.parent().unwrap();
    let err = enforcer::trace::cli::show(audit_dir, traces, of, key).unwrap_err();
    assert!(err.to_string().contains("swapped or altered"), "{err}");
    std::fs::remove_file(file).unwrap();
    let report = enforcer::audit::verify(audit_dir, None).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.to_string().starts_with("deleted: trace")),
        "{:?}",
        report.problems
    );
}

// ---- Proposals held for review while their stream stays alive ----

const PROPOSAL_POLICY: &str = r#"version: 1
default: allow
rules:
  - id: deploy-needs-approval
    phase: proposal
    when: { proposal.tool: deploy }
    verdict: review
    review: { timeout: 30s, fallback: block }
    message: deploying needs a person's approval
    retain: true
  - id: hasty-deploy
    phase: proposal
    when: { proposal.tool: deploy_now }
    verdict: review
    review: { timeout: 1s, fallback: block }
    message: deploying needs a person's approval
  - id: no-wipes
    phase: proposal
    when: { proposal.tool: wipe }
    verdict: block
    message: no wipes
    retain: true
"#;

/// The keep-alive a held stream gets (an SSE comment line).
const KEEPALIVE: &str = ": held for review by the enforcer\n\n";

fn sse_events(events: &[(Option<&str>, Value)]) -> String {
    events
        .iter()
        .map(|(name, data)| match name {
            Some(n) => format!("event: {n}\ndata: {data}\n\n"),
            None => format!("data: {data}\n\n"),
        })
        .collect()
}

/// An Anthropic Messages stream: a text block, then a call of `tool` with `{"env": "prod"}`.
fn anthropic_stream(tool: &str) -> String {
    use serde_json::json;
    let events = [
        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
            "content": [], "model": "claude-x", "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 1, "output_tokens": 1}}}),
        json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Deploying now."}}),
        json!({"type": "content_block_stop", "index": 0}),
        json!({"type": "content_block_start", "index": 1,
            "content_block": {"type": "tool_use", "id": "toolu_1", "name": tool, "input": {}}}),
        json!({"type": "content_block_delta", "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": "{\"env\": "}}),
        json!({"type": "content_block_delta", "index": 1,
            "delta": {"type": "input_json_delta", "partial_json": "\"prod\"}"}}),
        json!({"type": "content_block_stop", "index": 1}),
        json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
            "usage": {"output_tokens": 5}}),
        json!({"type": "message_stop"}),
    ];
    let named: Vec<(Option<&str>, Value)> = events
        .into_iter()
        .map(|v| {
            let name: &'static str = match v["type"].as_str().unwrap() {
                "message_start" => "message_start",
                "content_block_start" => "content_block_start",
                "content_block_delta" => "content_block_delta",
                "content_block_stop" => "content_block_stop",
                "message_delta" => "message_delta",
                _ => "message_stop",
            };
            (Some(name), v)
        })
        .collect();
    sse_events(&named)
}

/// An OpenAI Chat Completions stream: text, then a call of `tool` with `{"env": "prod"}`, then `[DONE]`.
fn chat_stream(tool: &str) -> String {
    use serde_json::json;
    let chunk = |delta: Value, finish: Value| {
        (
            None,
            json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]}),
        )
    };
    let events = [
        chunk(
            json!({"role": "assistant", "content": "Deploying now."}),
            Value::Null,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
            "function": {"name": tool, "arguments": ""}}]}),
            Value::Null,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"env\": "}}]}),
            Value::Null,
        ),
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"prod\"}"}}]}),
            Value::Null,
        ),
        chunk(json!({}), json!("tool_calls")),
    ];
    sse_events(&events) + "data: [DONE]\n\n"
}

/// The stream an LLM upstream sends for `path`, its tool named by the request's `model`.
fn llm_stream(path: &str, body: &[u8]) -> String {
    let req: Value = serde_json::from_slice(body).unwrap_or_default();
    let tool = req["model"].as_str().unwrap_or("deploy");
    match path {
        "/v1/messages" => anthropic_stream(tool),
        _ => chat_stream(tool),
    }
}

/// An LLM upstream (api.anthropic.com, api.openai.com) streaming [`llm_stream`] at once, in one write.
async fn llm_upstream(ca: &TestCa) -> SocketAddr {
    use http_body_util::BodyExt;
    let (chain, key) = ca.leaf(&["api.anthropic.com", "api.openai.com"]);
    let acceptor = tls_acceptor(chain, key, &[H1]);
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
                        let path = req.uri().path().to_owned();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let resp = hyper::Response::builder()
                            .header("content-type", "text/event-stream")
                            .body(Full::new(Bytes::from(llm_stream(&path, &body))))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

struct LlmWorld {
    proxy: Proxy,
    upstream: SocketAddr,
}

async fn llm_world(traces: Option<enforcer::trace::TraceSettings>) -> LlmWorld {
    short_limits();
    let ca = TestCa::new("review test LLM CA");
    let upstream = llm_upstream(&ca).await;
    let hosts: &[(&str, &[IpAddr])] = &[
        ("api.anthropic.com", &[LOOPBACK]),
        ("api.openai.com", &[LOOPBACK]),
    ];
    let proxy = match traces {
        Some(t) => start_proxy_retaining(PROPOSAL_POLICY, &[&ca], hosts, t).await,
        None => start_proxy_with_hosts(PROPOSAL_POLICY, &[&ca], false, hosts).await,
    };
    LlmWorld { proxy, upstream }
}

/// A streamed LLM call (`model` names the tool the upstream proposes) read in the background; what has arrived so
/// far is in the shared buffer, and the task ends with the whole body.
async fn stream_call(
    w: &LlmWorld,
    host: &str,
    path: &str,
    model: &str,
) -> (
    Arc<std::sync::Mutex<Vec<u8>>>,
    tokio::task::JoinHandle<Vec<u8>>,
) {
    use http_body_util::BodyExt;
    let tls = w.proxy.tls_to(w.upstream, host, &[H1]).await;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let body = serde_json::json!({"model": model, "stream": true, "max_tokens": 100,
        "messages": [{"role": "user", "content": "ship it"}]});
    let req = Request::builder()
        .method("POST")
        .uri(path)
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let task = tokio::spawn(async move {
        let _sender = sender;
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                s.lock().unwrap().extend_from_slice(&data);
            }
        }
        let all = s.lock().unwrap().clone();
        all
    });
    (seen, task)
}

/// Wait (bounded) until `seen` holds `what`.
async fn arrived(seen: &std::sync::Mutex<Vec<u8>>, what: &str) -> String {
    for _ in 0..200 {
        let text = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
        if text.contains(what) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("{what:?} never arrived");
}

/// `body` without the keep-alives.
fn without_keepalives(body: &[u8]) -> String {
    String::from_utf8_lossy(body).replace(KEEPALIVE, "")
}

/// The proposal records of the trail: (held, closing).
async fn proposal_records(proxy: &Proxy) -> Vec<Value> {
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy
        .audit_records()
        .await
        .into_iter()
        .filter(|r| r["request"]["phase"] == "proposal")
        .collect()
}

/// Anthropic's text blocks and stop reason, as the SDK accumulates them.
fn anthropic_text_and_stop(body: &str) -> (Vec<Value>, String) {
    let (mut blocks, mut stop) = (Vec::<Value>::new(), String::new());
    for data in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let v: Value = serde_json::from_str(data).unwrap();
        match v["type"].as_str().unwrap_or_default() {
            "content_block_start" => blocks.push(v["content_block"].clone()),
            "content_block_delta" if v["delta"]["type"] == "text_delta" => {
                let b = blocks.last_mut().unwrap();
                let text = format!(
                    "{}{}",
                    b["text"].as_str().unwrap(),
                    v["delta"]["text"].as_str().unwrap()
                );
                b["text"] = Value::String(text);
            }
            "message_delta" => stop = v["delta"]["stop_reason"].as_str().unwrap().to_owned(),
            _ => {}
        }
    }
    (blocks, stop)
}

/// OpenAI Chat's content and finish reasons, as the SDK accumulates them.
fn chat_text_and_finish(body: &str) -> (String, Vec<String>) {
    let (mut content, mut finish) = (String::new(), Vec::new());
    for data in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            content.push_str(c);
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish.push(f.to_owned());
        }
        assert!(
            v["choices"][0]["delta"]["tool_calls"].is_null(),
            "a tool call reached the agent: {body}"
        );
    }
    (content, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_anthropic_tool_call_under_review_is_held_kept_alive_and_released_unchanged() {
    let w = llm_world(None).await;
    let (seen, task) = stream_call(&w, "api.anthropic.com", "/v1/messages", "deploy").await;
    let id = pending_review(&w.proxy).await;
    // While held: the text before the call has arrived, the call has not, and keep-alives come.
    let so_far = arrived(&seen, KEEPALIVE).await;
    assert!(so_far.contains("Deploying now."), "{so_far}");
    assert!(
        !so_far.contains("toolu_1"),
        "the held call reached the agent: {so_far}"
    );
    let shown = w.proxy.ctx.reviews.get(id).unwrap();
    assert_eq!(shown.phase, enforcer::model::Phase::Proposal);
    assert_eq!(shown.proposal_tool.as_deref(), Some("deploy"));
    assert_eq!(shown.rule.as_deref(), Some("deploy-needs-approval"));
    assert_eq!(shown.request.host.as_deref(), Some("api.anthropic.com"));
    w.proxy
        .ctx
        .reviews
        .answer(id, true, cli("alice"), Some("release train".into()))
        .unwrap();
    let body = task.await.unwrap();
    assert_eq!(
        without_keepalives(&body),
        anthropic_stream("deploy"),
        "released unchanged"
    );
    let recs = proposal_records(&w.proxy).await;
    assert_eq!(recs.len(), 2, "{recs:#?}");
    let (held, closing) = (&recs[0], &recs[1]);
    assert_eq!(held["seq"], id);
    assert_eq!(held["decision"]["verdict"], "review");
    assert_eq!(held["outcome"]["disposition"], "held");
    assert_eq!(held["request"]["tool"], "deploy");
    assert_eq!(held["review"]["timeout_secs"], 30);
    assert_eq!(held["review"]["fallback"], "block");
    assert_eq!(closing["request"]["parent"], held["request"]["parent"]);
    assert_eq!(closing["decision"]["verdict"], "review");
    assert_eq!(closing["outcome"]["disposition"], "forwarded");
    assert_eq!(closing["review"]["held_seq"], id);
    assert_eq!(closing["review"]["result"], "approved");
    assert_eq!(closing["review"]["by"]["name"], "alice");
    assert_eq!(closing["review"]["reason"], "release train");
    assert_eq!(closing["review"]["carried_out"], "allow");
    assert!(w.proxy.ctx.reviews.list().is_empty());
    w.proxy.close_and_verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_anthropic_tool_call_is_answered_like_a_block() {
    let w = llm_world(None).await;
    let (_, _, body) = held_call(&w, ANTHROPIC, false, "bob", Some("not today")).await;
    assert!(!body.contains("tool_use\""), "{body}");
    let (blocks, stop) = anthropic_text_and_stop(&body);
    let texts: Vec<&str> = blocks.iter().map(|b| b["text"].as_str().unwrap()).collect();
    assert_eq!(
        texts,
        [
            "Deploying now.",
            "[The enforcer refused the tool call `deploy`: deploying needs a person's approval: denied by a reviewer: \
             not today (policy rule: deploy-needs-approval)]"
        ]
    );
    assert_eq!(stop, "end_turn");
    let recs = proposal_records(&w.proxy).await;
    assert_eq!(recs.len(), 2, "{recs:#?}");
    denied_by(&recs[1], "bob");
    w.proxy.close_and_verify().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_openai_chat_tool_call_is_held_then_approved_denied_or_timed_out() {
    let w = llm_world(None).await;
    // Approved: the call as the model proposed it.
    let (_, so_far, body) = held_call(&w, OPENAI, true, "alice", None).await;
    assert!(so_far.contains("Deploying now."), "{so_far}");
    assert!(!so_far.contains("call_1"), "{so_far}");
    assert_eq!(body, chat_stream("deploy"));

    // Denied: the refusal as text, finish reason `stop`.
    let (_, _, body) = held_call(&w, OPENAI, false, "bob", None).await;
    let (content, finish) = chat_text_and_finish(&body);
    assert_eq!(
        content,
        "Deploying now.\n\n[The enforcer refused the tool call `deploy`: deploying needs a person's approval: \
         denied by a reviewer (policy rule: deploy-needs-approval)]"
    );
    assert_eq!(finish, ["stop"]);
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");

    // Nobody answers within the rule's 1 s: the `block` fallback, kept alive meanwhile.
    let (_, task) = stream_call(&w, "api.openai.com", "/v1/chat/completions", "deploy_now").await;
    let raw = task.await.unwrap();
    assert!(String::from_utf8_lossy(&raw).contains(KEEPALIVE));
    let (content, finish) = chat_text_and_finish(&without_keepalives(&raw));
    assert_eq!(
        content,
        "Deploying now.\n\n[The enforcer refused the tool call `deploy_now`: deploying needs a person's approval: \
         nobody approved it in time (policy rule: hasty-deploy)]"
    );
    assert_eq!(finish, ["stop"]);

    let recs = proposal_records(&w.proxy).await;
    assert_eq!(recs.len(), 6, "held and closing, three times: {recs:#?}");
    let results: Vec<(&str, &str)> = recs
        .iter()
        .map(|r| {
            (
                r["outcome"]["disposition"].as_str().unwrap(),
                r["review"]["result"].as_str().unwrap_or("-"),
            )
        })
        .collect();
    assert_eq!(
        results,
        [
            ("held", "-"),
            ("forwarded", "approved"),
            ("held", "-"),
            ("blocked", "denied"),
            ("held", "-"),
            ("blocked", "timeout")
        ]
    );
    assert_eq!(recs[5]["outcome"]["error"], "review_timeout");
    assert_eq!(recs[5]["review"]["carried_out"], "block");
    assert_eq!(recs[5]["review"]["held_seq"], recs[4]["seq"]);
    w.proxy.close_and_verify().await;
}

const ANTHROPIC: (&str, &str) = ("api.anthropic.com", "/v1/messages");
const OPENAI: (&str, &str) = ("api.openai.com", "/v1/chat/completions");

/// A streamed call of `(host, path)` whose `deploy` proposal is held, answered (approved or not, by `by`, for
/// `reason`) once its keep-alives arrived: the review's id, what had arrived while held, and the whole body without
/// the keep-alives.
async fn held_call(
    w: &LlmWorld,
    (host, path): (&str, &str),
    approve: bool,
    by: &str,
    reason: Option<&str>,
) -> (u64, String, String) {
    let (seen, task) = stream_call(w, host, path, "deploy").await;
    let id = pending_review(&w.proxy).await;
    let so_far = arrived(&seen, KEEPALIVE).await;
    let reviews = &w.proxy.ctx.reviews;
    reviews
        .answer(id, approve, cli(by), reason.map(str::to_owned))
        .unwrap();
    (id, so_far, without_keepalives(&task.await.unwrap()))
}

/// Wait (bounded) until a review is pending on `proxy`; its id.
async fn pending_review(proxy: &Proxy) -> u64 {
    for _ in 0..200 {
        if let Some(p) = proxy.ctx.reviews.list().first() {
            return p.id;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no review became pending");
}

/// Trace settings encrypting to a fresh key: (settings, the key file, its directory).
fn trace_settings() -> (
    enforcer::trace::TraceSettings,
    std::path::PathBuf,
    tempfile::TempDir,
) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("trace.key");
    let recipient = enforcer::trace::cli::keygen(&key).unwrap();
    let settings = enforcer::trace::TraceSettings {
        recipient: Some(recipient),
        ..Default::default()
    };
    (settings, key, dir)
}

/// The retained records written so far (bounded wait until there are `n`).
async fn retained(proxy: &Proxy, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        let recs: Vec<Value> = proxy
            .audit_records()
            .await
            .into_iter()
            .filter(|r| r["outcome"]["disposition"] == "retained")
            .collect();
        if recs.len() >= n {
            return recs;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} retained records");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_or_reviewed_proposal_retains_its_exchange_as_the_model_proposed_it() {
    let (settings, key, _keys) = trace_settings();
    let w = llm_world(Some(settings)).await;
    // A call no rule matches keeps nothing.
    let (_, task) = stream_call(&w, "api.anthropic.com", "/v1/messages", "lookup").await;
    assert_eq!(task.await.unwrap(), anthropic_stream("lookup").into_bytes());
    // A blocked call under a `retain: true` block rule keeps its whole exchange, before the refusal rewrote it.
    let (_, task) = stream_call(&w, "api.anthropic.com", "/v1/messages", "wipe").await;
    let body = String::from_utf8(task.await.unwrap()).unwrap();
    assert!(
        body.contains("[The enforcer refused the tool call `wipe`: no wipes"),
        "{body}"
    );
    let blocked = proposal_records(&w.proxy).await[0]["seq"].as_u64().unwrap();
    let recs = retained(&w.proxy, 1).await;
    assert_eq!(
        recs.len(),
        1,
        "only the retained proposal is kept: {recs:#?}"
    );
    assert_eq!(recs[0]["trace"]["of"], blocked);
    assert_eq!(recs[0]["decision"]["rule"], "no-wipes");
    let trace = proposal_trace(&w, blocked, &key);
    assert_eq!(
        trace["response"]["body"],
        anthropic_stream("wipe"),
        "the call as proposed"
    );

    // A denied call under a `retain: true` review rule: its closing record's trace, without the keep-alives.
    let (id, _, body) = held_call(&w, ANTHROPIC, false, "bob", None).await;
    assert!(
        body.contains("[The enforcer refused the tool call `deploy`"),
        "{body}"
    );
    let recs = retained(&w.proxy, 2).await;
    let trace_rec = &recs[1];
    let closing = proposal_records(&w.proxy)
        .await
        .into_iter()
        .find(|r| r["review"]["held_seq"] == id)
        .unwrap();
    let of = closing["seq"].as_u64().unwrap();
    assert_eq!(trace_rec["trace"]["of"], of);
    assert_eq!(trace_rec["trace"]["event"], "stored");
    assert_eq!(trace_rec["request"]["phase"], "proposal");
    assert_eq!(trace_rec["request"]["tool"], "deploy");
    assert_eq!(trace_rec["request"]["parent"], closing["request"]["parent"]);
    assert_eq!(trace_rec["decision"]["rule"], "deploy-needs-approval");
    let trace = proposal_trace(&w, of, &key);
    assert_eq!(trace["of"], of);
    assert_eq!(trace["request"]["target"], "/v1/messages");
    let sent: Value = serde_json::from_str(trace["request"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent["messages"][0]["content"], "ship it");
    assert_eq!(trace["response"]["status"], 200);
    assert_eq!(
        trace["response"]["body"],
        anthropic_stream("deploy"),
        "the response as the upstream sent it: the call as proposed, no refusal, no keep-alives"
    );
    assert_eq!(trace["response"]["truncated"], false);
    w.proxy.audit.close().await.unwrap();
    let traces = w.proxy.audit_dir.join("traces");
    let file = traces.join(trace_rec["trace"]["file"].as_str().unwrap());
    a_swap_is_caught(&w.proxy.audit_dir, 2, &file, of, &key);
}

/// The trace of record `of`, decrypted with `key`.
fn proposal_trace(w: &LlmWorld, of: u64, key: &std::path::Path) -> Value {
    let audit_dir = &w.proxy.audit_dir;
    let text = enforcer::trace::cli::show(audit_dir, &audit_dir.join("traces"), of, key).unwrap();
    serde_json::from_str(&text).unwrap()
}
