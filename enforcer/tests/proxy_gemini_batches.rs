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

/// A generateContent answer whose model proposes `command` to `shell`, after a text part.
fn generated(command: &str) -> Value {
    json!({"candidates": [{"index": 0, "finishReason": "STOP", "content": {"role": "model", "parts": [
        {"text": "Running it."}, {"functionCall": {"name": "shell", "args": {"command": command}}}]}}],
        "modelVersion": "gem-1"})
}

/// [`generated`] with its call refused by `no-curl`, as the agent gets it.
fn generated_refused() -> Value {
    let mut v = generated(CURL_COMMAND);
    v["candidates"][0]["content"]["parts"][1] = json!({"text":
        "[The enforcer refused the tool call `shell`: no curl to unlisted hosts (policy rule: no-curl)]"});
    v
}

/// A finished batch whose inline answers are `answers`, as `GET /v1beta/batches/{id}` returns it (an Operation; the
/// answers in its `response`, or in its `metadata.output` when `in_metadata`).
fn operation(answers: &[Value], in_metadata: bool) -> Value {
    let inlined: Vec<Value> = answers
        .iter()
        .enumerate()
        .map(|(i, a)| json!({"response": a, "metadata": {"key": format!("r{i}")}}))
        .collect();
    let output = json!({"@type": "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatchOutput",
        "inlinedResponses": {"inlinedResponses": inlined}});
    let mut op = json!({"name": "batches/123", "done": true, "metadata": {"model": "models/gem-1",
        "state": "BATCH_STATE_SUCCEEDED"}});
    if in_metadata {
        op["metadata"]["output"] = output;
    } else {
        op["response"] = output;
    }
    op
}

/// A Gemini Batch API results file's line.
fn result_line(key: &str, answer: Value) -> Value {
    json!({"key": key, "response": answer})
}

/// An OpenAI Batch output line whose Chat Completions answer calls `shell` with `command`.
fn openai_line(command: &str) -> Value {
    let call = json!({"id": "call_1", "type": "function",
        "function": {"name": "shell", "arguments": json!({"command": command}).to_string()}});
    json!({"id": "batch_req_1", "custom_id": "a", "response": {"status_code": 200, "request_id": "req_1",
        "body": {"id": "chatcmpl-1", "object": "chat.completion", "model": "gemini-2.5-flash", "choices": [
            {"index": 0, "finish_reason": "tool_calls", "message": {"role": "assistant", "content": null,
             "tool_calls": [call]}}]}}, "error": null})
}

/// What the upstream answers at `path`.
fn answer_for(path: &str) -> (&'static str, String) {
    let json = "application/json";
    let octets = "application/octet-stream";
    match path {
        "/v1beta/batches/inline" => (
            json,
            operation(&[generated("ls"), generated(CURL_COMMAND)], false).to_string(),
        ),
        "/V1BETA/Batches/in-metadata" => (
            json,
            operation(&[generated(CURL_COMMAND)], true).to_string(),
        ),
        "/v1beta/batches" => (
            json,
            json!({"operations": [operation(&[generated(CURL_COMMAND)], false)]}).to_string(),
        ),
        "/download/v1beta/files/results:download" | "/v1beta/files/results:download" => (
            octets,
            format!(
                "{}\n{}\n{}\n",
                result_line("r0", generated("ls")),
                json!({"key": "r1", "error": {"code": 400, "message": "bad"}}),
                result_line("r2", generated(CURL_COMMAND))
            ),
        ),
        "/download/v1beta/files/cut:download" => (
            octets,
            format!(
                "{}\n{{\"key\":\"r1\",\"response\":{{\n",
                result_line("r0", generated("ls"))
            ),
        ),
        "/download/v1beta/files/input:download" => (
            octets,
            format!(
                "{}\n",
                json!({"key": "r0", "request": request("read_file")})
            ),
        ),
        "/v1beta/openai/files/output/content" => {
            (octets, format!("{}\n", openai_line(CURL_COMMAND)))
        }
        _ => (json, json!({"name": "batches/123"}).to_string()),
    }
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

/// The one record of `no-curl` refusing the `shell` call of the answer at `path`, after the request's.
fn assert_refusal(path: &str, recs: &[Value], model: Value, custom_id: Value) {
    assert_eq!(recs.len(), 2, "{path}: {recs:#?}");
    let r = &recs[1];
    assert_eq!(r["request"]["phase"], "proposal", "{path}: {r}");
    assert_eq!(r["request"]["method"], "GET", "{path}: {r}");
    assert_eq!(r["request"]["tool"], "shell", "{path}: {r}");
    assert_eq!(r["request"]["llm_model"], model, "{path}: {r}");
    assert_eq!(r["request"]["custom_id"], custom_id, "{path}: {r}");
    assert_eq!(r["decision"]["rule"], "no-curl", "{path}: {r}");
    assert_eq!(r["outcome"]["disposition"], "blocked", "{path}: {r}");
}

/// Found by a black-box attack: a Gemini batch's answers reached the agent unread — fetched with the batch
/// (`inlinedResponses`, in its `response` or its `metadata.output`, or in a listing), or downloaded as its results
/// file, or an OpenAI-compatible batch's output file on Gemini's host. Each answer is read as a generateContent
/// answer now (the compatible output as OpenAI's): the refused call becomes a text part in its place, everything
/// else as it came.
#[tokio::test]
async fn a_gemini_batch_s_answers_are_read_for_their_calls() {
    let w = world().await;
    for (path, expected) in [
        (
            "/v1beta/batches/inline",
            operation(&[generated("ls"), generated_refused()], false),
        ),
        (
            "/V1BETA/Batches/in-metadata",
            operation(&[generated_refused()], true),
        ),
        (
            "/v1beta/batches?pageSize=10",
            json!({"operations": [operation(&[generated_refused()], false)]}),
        ),
    ] {
        let (status, text, recs) = send_to(&w, "GET", path, None).await;
        assert_eq!(status, 200, "{path}: {text}");
        let got: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(got, expected, "{path}");
        assert_refusal(path, &recs, Value::Null, Value::Null);
    }
    // The results file: each line's answer decided on its own, the call's record naming the line's key and model.
    for path in [
        "/download/v1beta/files/results:download?alt=media",
        "/v1beta/files/results:download?alt=media",
    ] {
        let (status, text, recs) = send_to(&w, "GET", path, None).await;
        assert_eq!(status, 200, "{path}: {text}");
        let expected = format!(
            "{}\n{}\n{}\n",
            result_line("r0", generated("ls")),
            json!({"key": "r1", "error": {"code": 400, "message": "bad"}}),
            result_line("r2", generated_refused())
        );
        assert_eq!(text, expected, "{path}");
        assert_refusal(path, &recs, json!("gem-1"), json!("r2"));
    }
    // Gemini's OpenAI-compatible Batch API: its output file is read as OpenAI's is.
    let path = "/v1beta/openai/files/output/content";
    let (status, text, recs) = send_to(&w, "GET", path, None).await;
    assert_eq!(status, 200, "{path}: {text}");
    assert!(!text.contains("evil.example"), "{text}");
    assert!(text.contains("refused the tool call `shell`"), "{text}");
    assert_refusal(path, &recs, json!("gemini-2.5-flash"), json!("a"));
    // A results file with a line cut short is refused whole; an input file (its lines name a `request`) passes.
    let path = "/download/v1beta/files/cut:download?alt=media";
    let (status, text, recs) = send_to(&w, "GET", path, None).await;
    assert_eq!(status, 502, "{path}: {text}");
    assert!(!text.contains("Running it."), "{text}");
    assert_eq!(recs.len(), 2, "{recs:#?}");
    assert_eq!(recs[1]["decision"]["reason"], "unparseable", "{}", recs[1]);
    let path = "/download/v1beta/files/input:download?alt=media";
    let (status, text, recs) = send_to(&w, "GET", path, None).await;
    let sent = answer_for("/download/v1beta/files/input:download").1;
    assert_eq!((status, text), (200, sent));
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert!(w.proxy.close_and_verify().await > 0);
}
