//! Anthropic's Message Batches create (`POST /v1/messages/batches`) through the real proxy from a real TLS upstream.
//! Each `requests[].params` is a Messages create body (Anthropic API reference, "Create a Message Batch"): it is
//! decided as the same body sent to `/v1/messages` is (its model, its declared tools, its text for detectors), one
//! Action per element; a batch any element of which is blocked is refused whole, a body that cannot be read so is
//! refused as unreadable, and a constrain (written for one call's body) refuses the batch.

mod proxy_support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use proxy_support::*;
use serde_json::{json, Value};

const HOST: &str = "api.anthropic.com";

/// Request rules on the model, a declared tool and a secret in an LLM call's text, and a constrain.
const POLICY: &str = r#"version: 1
default: allow
max_body_bytes: 64KiB
rules:
  - id: no-evil-model
    when: { llm.model: "evil-*" }
    verdict: block
    message: that model is not allowed
  - id: no-declared-delete
    when: { llm.tools: delete_everything }
    verdict: block
    message: that tool may not be declared
  - id: no-keys-to-models
    when: { llm.provider: anthropic, detect: [aws-access-key] }
    verdict: block
    message: no keys to models
  - id: cap-tokens
    when: { llm.model: "capped-*" }
    verdict: constrain
    constrain: { json_cap: { $.max_tokens: 100 } }
  - id: redact-emails
    when: { llm.model: "redacted-*", detect: [email] }
    verdict: constrain
    constrain: { redact: [email] }
"#;

/// The batch object Anthropic answers a create with.
const CREATED: &str =
    r#"{"id":"msgbatch_1","type":"message_batch","processing_status":"in_progress"}"#;

/// [`CREATED`]; under `/echo/` the body the upstream received.
async fn answer(req: Request<Incoming>) -> Response<TestBody> {
    let echo = req.uri().path().starts_with("/echo/");
    let body = req.into_body().collect().await.unwrap().to_bytes();
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(if echo { body } else { Bytes::from(CREATED) }).boxed())
        .unwrap()
}

struct World {
    proxy: Proxy,
    anthropic: SocketAddr,
}

async fn world() -> World {
    let ca = TestCa::new("anthropic batches test CA");
    let proxy = start_proxy(POLICY, &[&ca], false).await;
    let anthropic = answering_upstream(&ca, &[HOST], answer).await;
    World { proxy, anthropic }
}

/// `POST path` with `body` on Anthropic's host through the proxy: status and body as the agent got them, and the
/// exchange's records.
async fn post(w: &World, path: &str, body: String) -> (u16, Value, Vec<Value>) {
    let before = w.proxy.audit_records().await.len();
    let tls = w.proxy.tls_to(w.anthropic, HOST, &[b"http/1.1"]).await;
    let req = Request::builder()
        .method("POST")
        .uri(path)
        .header("host", HOST)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let (status, _, body) = send(tls, false, req).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let recs = w.proxy.audit_records().await;
    let text = String::from_utf8_lossy(&body).into_owned();
    let got = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, got, recs[before..].to_vec())
}

/// A Messages create body for `model`, declaring `tool`, saying `text`.
fn params(model: &str, tool: &str, text: &str) -> Value {
    json!({"model": model, "max_tokens": 1024, "system": "be brief",
           "messages": [{"role": "user", "content": text}],
           "tools": [{"name": tool, "input_schema": {"type": "object"}}]})
}

/// A batch of `params`, each its own request.
fn batch(params: &[Value]) -> String {
    let requests: Vec<Value> = params
        .iter()
        .enumerate()
        .map(|(i, p)| json!({"custom_id": format!("r{i}"), "params": p}))
        .collect();
    json!({ "requests": requests }).to_string()
}

/// The Anthropic error the agent gets for a request `rule` blocked with `message`.
fn refusal(message: &str, rule: &str) -> Value {
    json!({"type": "error", "error": {"type": "permission_error",
           "message": format!("{message} (policy rule: {rule})")}})
}

/// Found by a black-box attack: a Message Batch whose requests named a blocked model, declared a blocked tool or
/// carried a secret was forwarded, while the same `params` sent to `/v1/messages` were refused. Each is refused
/// now as `/v1/messages` refuses its element, recorded as the Anthropic call it is, at any prefix and letter case.
#[tokio::test]
async fn a_batch_is_decided_as_its_requests_would_be() {
    let w = world().await;
    let ok = params("claude-1", "read_file", "hi");
    let model = ("that model is not allowed", "no-evil-model", "evil-x");
    let tool = (
        "that tool may not be declared",
        "no-declared-delete",
        "claude-1",
    );
    let key = ("no keys to models", "no-keys-to-models", "claude-1");
    for (blocked, (message, rule, llm_model)) in [
        (params("evil-x", "read_file", "hi"), model),
        (params("claude-1", "delete_everything", "hi"), tool),
        (
            params("claude-1", "read_file", "key AKIAIOSFODNN7EXAMPLE"),
            key,
        ),
    ] {
        // The element alone, as a Messages call, and in a batch after an allowed one: the same refusal.
        let (status, got, recs) = post(&w, "/v1/messages", blocked.to_string()).await;
        assert_eq!((status, &got), (451, &refusal(message, rule)), "{rule}");
        assert_eq!(recs.len(), 1, "{rule}: {recs:#?}");
        for path in [
            "/v1/messages/batches",
            "/V1/Messages/Batches/",
            "/anthropic/v1/messages/batches?beta=true",
        ] {
            let body = batch(&[ok.clone(), blocked.clone()]);
            let (status, got, recs) = post(&w, path, body).await;
            assert_eq!(status, 451, "{path} {rule}: {got}");
            assert_eq!(got, refusal(message, rule), "{path} {rule}");
            assert_eq!(recs.len(), 1, "{path} {rule}: {recs:#?}");
            let r = &recs[0];
            assert_eq!(r["request"]["llm_provider"], "anthropic", "{path}: {r}");
            assert_eq!(r["request"]["llm_model"], llm_model, "{path}: {r}");
            assert_eq!(r["decision"]["verdict"], "block", "{path}: {r}");
            assert_eq!(r["decision"]["rule"], rule, "{path}: {r}");
            assert_eq!(r["outcome"]["disposition"], "blocked", "{path}: {r}");
        }
    }
    // Allowed: forwarded, the upstream's answer as it came, recorded as an Anthropic call.
    let (status, got, recs) = post(&w, "/v1/messages/batches", batch(&[ok.clone(), ok])).await;
    assert_eq!(
        (status, got),
        (200, serde_json::from_str::<Value>(CREATED).unwrap())
    );
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(recs[0]["request"]["llm_provider"], "anthropic");
    assert_eq!(recs[0]["request"]["llm_model"], "claude-1");
    assert_eq!(recs[0]["outcome"]["disposition"], "forwarded");
    assert!(w.proxy.close_and_verify().await > 0);
}

/// A batch body that cannot be read as Messages bodies (not an object, `requests` not an array or empty, an element
/// without object `params`, a member spelt in another letter case where a case-insensitive decoder would read it)
/// is refused as unreadable, as an unreadable `/v1/messages` body is; a constrain whose rewrites read one call's
/// body (a JSON path, `drop_tools`) refuses the batch, whose elements they cannot reach, and a redaction is applied.
#[tokio::test]
async fn an_unreadable_or_constrained_batch_is_refused() {
    let w = world().await;
    let ok = params("claude-1", "read_file", "hi");
    let unreadable = json!({"type": "error", "error": {"type": "invalid_request_error",
        "message": "the body is not valid JSON for a anthropic endpoint"}});
    let mut misspelt_model = ok.clone();
    misspelt_model["Model"] = json!("evil-x");
    for body in [
        "[]".to_string(),
        "not json".to_string(),
        json!({"requests": {"custom_id": "r0", "params": ok}}).to_string(),
        json!({"requests": []}).to_string(),
        json!({"requests": [{"custom_id": "r0"}]}).to_string(),
        json!({"requests": [{"custom_id": "r0", "params": "x"}]}).to_string(),
        json!({"requests": [ok.clone()]}).to_string(),
        json!({"Requests": [{"custom_id": "r0", "params": params("evil-x", "t", "hi")}], "requests": []})
            .to_string(),
        json!({"requests": [{"custom_id": "r0", "params": ok, "Params": params("evil-x", "t", "hi")}]})
            .to_string(),
        batch(&[misspelt_model]),
    ] {
        let (status, got, recs) = post(&w, "/v1/messages/batches", body.clone()).await;
        assert_eq!((status, &got), (400, &unreadable), "{body}");
        assert_eq!(recs.len(), 1, "{body}: {recs:#?}");
        assert_eq!(recs[0]["request"]["llm_provider"], "anthropic", "{body}");
        assert_eq!(recs[0]["decision"]["reason"], "unparseable", "{body}");
        assert_eq!(recs[0]["outcome"]["disposition"], "blocked", "{body}");
    }
    // A constrain on one element: the batch is refused, the rule recorded.
    let body = batch(&[ok, params("capped-1", "read_file", "hi")]);
    let (status, got, recs) = post(&w, "/v1/messages/batches", body).await;
    let message = "a constrain rule matched a message batch, whose requests it cannot rewrite: \
                   send them to /v1/messages (policy rule: cap-tokens)";
    assert_eq!(status, 451, "{got}");
    assert_eq!(
        got,
        json!({"type": "error", "error": {"type": "permission_error", "message": message}})
    );
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(recs[0]["request"]["llm_model"], "capped-1");
    assert_eq!(recs[0]["decision"]["verdict"], "block");
    assert_eq!(recs[0]["decision"]["reason"], "unrewritable");
    assert_eq!(recs[0]["decision"]["rule"], "cap-tokens");
    assert_eq!(recs[0]["outcome"]["disposition"], "blocked");
    // A redaction reads every string of the body, each element's: applied, the batch forwarded.
    let body = batch(&[
        params("claude-1", "read_file", "hi"),
        params("redacted-1", "read_file", "mail bob@example.com"),
    ]);
    let (status, got, recs) = post(&w, "/echo/v1/messages/batches", body).await;
    let want: Value = serde_json::from_str(&batch(&[
        params("claude-1", "read_file", "hi"),
        params("redacted-1", "read_file", "mail [REDACTED:email]"),
    ]))
    .unwrap();
    assert_eq!((status, got), (200, want));
    assert_eq!(recs.len(), 1, "{recs:#?}");
    let r = &recs[0];
    assert_eq!(r["decision"]["verdict"], "constrain", "{r}");
    assert_eq!(r["decision"]["rule"], "redact-emails", "{r}");
    assert_eq!(
        r["request"]["changes"],
        json!([{"path": "$.requests[1].params.messages[0].content", "cause": "redact:email"}]),
        "{r}"
    );
    assert_eq!(r["outcome"]["disposition"], "forwarded", "{r}");
    assert!(w.proxy.close_and_verify().await > 0);
}
