//! Gemini's Batch API and cached contents through the real proxy from a real TLS upstream. A batch
//! (`POST …/models/{model}:batchGenerateContent`, `:asyncBatchEmbedContent`) and a cached content
//! (`POST /v1beta/cachedContents`, `PATCH /v1beta/cachedContents/{id}`) are LLM calls: the request rules on
//! `llm.model` and `llm.tools` decide them as they decide a generateContent, and a body that cannot be read is
//! refused. A batch's results are read for the calls the agent runs: the batch fetched (`GET /v1beta/batches/{id}`,
//! its `inlinedResponses`, each a generateContent answer), its results file downloaded
//! (`…/files/{id}:download?alt=media`, one `{"key", "response"}` per line), and an OpenAI-compatible batch's output
//! file on Gemini's host (`/v1beta/openai/files/{id}/content`).

mod proxy_support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use proxy_support::*;
use serde_json::{json, Value};

const HOST: &str = "generativelanguage.googleapis.com";

/// [`NO_CURL_POLICY`]'s proposal rule, and request rules on the model and on a declared tool.
const POLICY: &str = r#"version: 1
default: allow
max_body_bytes: 64KiB
rules:
  - id: no-curl
    phase: proposal
    when: { proposal.tool: shell, proposal.args: { "$.command": { matches: "\\bcurl\\b" } } }
    verdict: block
    message: no curl to unlisted hosts
  - id: no-evil-model
    when: { llm.model: "evil-*" }
    verdict: block
    message: that model is not allowed
  - id: no-declared-delete
    when: { llm.tools: delete_everything }
    verdict: block
    message: that tool may not be declared
"#;

async fn answer(req: Request<Incoming>) -> Response<TestBody> {
    let path = req.uri().path().to_string();
    let (content_type, body) = answer_for(&path);
    Response::builder()
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap()
}

/// What the upstream answers at `path`.
fn answer_for(path: &str) -> (&'static str, String) {
    let _ = path;
    (
        "application/json",
        json!({"name": "batches/123"}).to_string(),
    )
}

struct World {
    proxy: Proxy,
    gemini: SocketAddr,
}

async fn world() -> World {
    let ca = TestCa::new("gemini batches test CA");
    let proxy = start_proxy(POLICY, &[&ca], false).await;
    let gemini = answering_upstream(&ca, &[HOST], answer).await;
    World { proxy, gemini }
}

/// `method path` with `body` (none when `None`) on Gemini's host through the proxy: status and body as the agent got
/// them, and the exchange's records from the request's on.
async fn send_to(
    w: &World,
    method: &str,
    path: &str,
    body: Option<String>,
) -> (u16, String, Vec<Value>) {
    let before = w.proxy.audit_records().await.len();
    let tls = w.proxy.tls_to(w.gemini, HOST, &[b"http/1.1"]).await;
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", HOST);
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let (status, _, body) = send(tls, false, req).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let recs = w.proxy.audit_records().await;
    (
        status,
        String::from_utf8_lossy(&body).into_owned(),
        recs[before..].to_vec(),
    )
}

fn request(tool: &str) -> Value {
    json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
           "tools": [{"functionDeclarations": [{"name": tool}]}]})
}

fn batch(requests: &[Value]) -> String {
    let requests: Vec<Value> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| json!({"request": r, "metadata": {"key": format!("r{i}")}}))
        .collect();
    json!({"batch": {"display_name": "x", "input_config": {"requests": {"requests": requests}}}})
        .to_string()
}

/// The Gemini error the agent gets for a request `rule` blocked, with the rule's `message`.
fn refusal(message: &str, rule: &str) -> Value {
    json!({"error": {"code": 403, "message": format!("{message} (policy rule: {rule})"), "status": "PERMISSION_DENIED"}})
}

/// Found by a black-box attack: a batch and a cached content with a blocked model or a blocked tool declared were
/// answered 200 while generateContent with the same model or tool got 403. Each is refused now as generateContent
/// is, recorded as the Gemini call it is; allowed ones are forwarded as they came.
#[tokio::test]
async fn batches_and_cached_contents_are_decided_as_generate_content_is() {
    let w = world().await;
    let model = ("that model is not allowed", "no-evil-model");
    let tool = ("that tool may not be declared", "no-declared-delete");
    let mut cache = request("delete_everything");
    cache["model"] = json!("models/gem-1");
    let mut evil_cache = request("read_file");
    evil_cache["model"] = json!("models/evil-x");
    for (method, path, body, (message, rule), llm_model) in [
        (
            "POST",
            "/v1beta/models/evil-x:generateContent",
            request("read_file").to_string(),
            model,
            "evil-x",
        ),
        (
            "POST",
            "/v1beta/models/evil-x:batchGenerateContent",
            batch(&[request("read_file")]),
            model,
            "evil-x",
        ),
        (
            "POST",
            "/v1beta/models/evil-x:asyncBatchEmbedContent",
            json!({"batch": {"input_config": {"requests": {"requests": [
                {"request": {"content": {"parts": [{"text": "hi"}]}}}]}}}})
            .to_string(),
            model,
            "evil-x",
        ),
        (
            "POST",
            "/v1beta/models/gem-1:batchGenerateContent",
            batch(&[request("read_file"), request("delete_everything")]),
            tool,
            "gem-1",
        ),
        (
            "POST",
            "/v1beta/cachedContents",
            cache.to_string(),
            tool,
            "gem-1",
        ),
        (
            "PATCH",
            "/v1beta/cachedContents/abc?updateMask=tools",
            cache.to_string(),
            tool,
            "gem-1",
        ),
        (
            "POST",
            "/v1beta/cachedContents",
            evil_cache.to_string(),
            model,
            "evil-x",
        ),
    ] {
        let (status, text, recs) = send_to(&w, method, path, Some(body)).await;
        assert_eq!(status, 403, "{path}: {text}");
        let got: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(got, refusal(message, rule), "{path}");
        assert_eq!(recs.len(), 1, "{path}: {recs:#?}");
        let r = &recs[0];
        assert_eq!(r["request"]["llm_provider"], "gemini", "{path}: {r}");
        assert_eq!(r["request"]["llm_model"], llm_model, "{path}: {r}");
        assert_eq!(r["decision"]["rule"], rule, "{path}: {r}");
        assert_eq!(r["outcome"]["disposition"], "blocked", "{path}: {r}");
    }
    // Allowed: forwarded, the upstream's answer as it came.
    for (method, path, body) in [
        (
            "POST",
            "/v1beta/models/gem-1:batchGenerateContent",
            batch(&[request("read_file")]),
        ),
        (
            "POST",
            "/v1beta/cachedContents",
            json!({"model": "models/gem-1", "contents": []}).to_string(),
        ),
    ] {
        let (status, text, recs) = send_to(&w, method, path, Some(body)).await;
        assert_eq!(
            (status, text.as_str()),
            (200, r#"{"name":"batches/123"}"#),
            "{path}"
        );
        assert_eq!(recs.len(), 1, "{path}: {recs:#?}");
        assert_eq!(recs[0]["request"]["llm_model"], "gem-1", "{path}");
        assert_eq!(recs[0]["outcome"]["disposition"], "forwarded", "{path}");
    }
    // A batch naming another model in its body than its path, and a body that is not JSON: refused unread.
    for (path, body) in [
        (
            "/v1beta/models/gem-1:batchGenerateContent",
            json!({"batch": {"model": "models/evil-x", "inputConfig": {"requests": {"requests": []}}}})
                .to_string(),
        ),
        ("/v1beta/cachedContents", "not json".to_string()),
    ] {
        let (status, text, recs) = send_to(&w, "POST", path, Some(body)).await;
        assert_eq!(status, 400, "{path}: {text}");
        assert_eq!(recs.len(), 1, "{path}: {recs:#?}");
        assert_eq!(recs[0]["request"]["llm_provider"], "gemini", "{path}");
        assert_eq!(recs[0]["decision"]["reason"], "unparseable", "{path}");
        assert_eq!(recs[0]["outcome"]["disposition"], "blocked", "{path}");
    }
    assert!(w.proxy.close_and_verify().await > 0);
}
