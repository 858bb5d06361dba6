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

async fn world_with(policy: &str, traces: Option<enforcer::trace::TraceSettings>) -> World {
    // Short client-side bounds, so a hold longer than them shows they do not cut a held exchange.
    set_limits(Limits {
        header_read_timeout: Duration::from_secs(1),
        body_idle_timeout: Duration::from_secs(1),
        ..Limits::default()
    });
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
    for _ in 0..200 {
        if let Some(p) = w.proxy.ctx.reviews.list().first() {
            return p.id;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no review became pending");
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
    assert_eq!(closing["decision"]["verdict"], "review");
    assert_eq!(closing["outcome"]["disposition"], "blocked");
    assert_eq!(closing["outcome"]["error"], "review_denied");
    assert_eq!(closing["outcome"]["status"], 403);
    assert_eq!(closing["review"]["result"], "denied");
    assert_eq!(closing["review"]["by"]["name"], "bob");
    assert_eq!(closing["review"]["carried_out"], "block");
    w.proxy.close_and_verify().await;
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
        agent: who.clone(),
        transport: Transport {
            host: Some("app.test".into()),
            port: 443,
            ..Transport::default()
        },
        http: Some(HttpRequest {
            method: "POST".into(),
            path: "/mcp".into(),
            ..HttpRequest::default()
        }),
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
    let report = enforcer::audit::verify(&audit_dir, None).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.traces, 1);
    let file = traces.join(trace_rec["trace"]["file"].as_str().unwrap());
    let mut bytes = std::fs::read(&file).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    let report = enforcer::audit::verify(&audit_dir, None).unwrap();
    let problems: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
    assert!(
        problems.iter().any(|p| p.starts_with("swapped: trace")),
        "{problems:?}"
    );
    let err = enforcer::trace::cli::show(&audit_dir, &traces, of, &key).unwrap_err();
    assert!(err.to_string().contains("swapped or altered"), "{err}");
    std::fs::remove_file(&file).unwrap();
    let report = enforcer::audit::verify(&audit_dir, None).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.to_string().starts_with("deleted: trace")),
        "{:?}",
        report.problems
    );
}
