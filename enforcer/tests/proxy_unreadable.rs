//! Proposed tool calls the proposal reader could not read, through the real proxy on loopback: an upstream answer
//! the SDKs still read (Python's `json.loads`, JavaScript's `JSON.parse`) but the reader's JSON parser does not — a
//! number beyond `f64`, nesting beyond its depth limit, a byte-order mark, a content type that lies about the
//! framing, a content coding applied twice in two header lines — must never reach the agent as a runnable call:
//! it is read and decided, or refused and recorded (fail closed).

mod proxy_support;

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use proxy_support::*;
use serde_json::{json, Value};

const POLICY: &str = NO_CURL_POLICY;
const COMMAND: &str = CURL_COMMAND;

fn completion() -> Value {
    completion_with(&json!({"command": COMMAND}).to_string())
}

/// A whole completion proposing one `shell` call with the arguments text `args`.
fn completion_with(args: &str) -> Value {
    json!({"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": null,
            "message": {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "shell", "arguments": args}}]}}]})
}

/// The chat stream of one `shell` call, its call chunk carrying `extra` (JSON text) as one more member.
fn chat_stream(extra: &str) -> String {
    chat_stream_with(extra, &json!({"command": COMMAND}).to_string())
}

/// [`chat_stream`] with the call's arguments text `args`.
fn chat_stream_with(extra: &str, args: &str) -> String {
    let call = json!({"index": 0, "delta": {"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1",
        "type": "function", "function": {"name": "shell", "arguments": args}}]}, "finish_reason": null});
    let finish = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]});
    format!(
        "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",{extra}\"choices\":[{call}]}}\n\n\
         data: {finish}\n\ndata: [DONE]\n\n"
    )
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

/// The canned answer for the request's `model`: content type, content codings (one header line each), body.
fn canned(model: &str) -> (&'static str, Vec<&'static str>, Vec<u8>) {
    let whole = completion().to_string();
    match model {
        // A number beyond f64 in the call's chunk (Python reads `inf`, JavaScript `Infinity`).
        "big-number" => (
            "text/event-stream",
            vec![],
            chat_stream("\"pad\":1e400,").into_bytes(),
        ),
        // A whole completion labelled as an event stream (the SDKs parse a non-streamed answer as JSON anyway).
        "json-as-events" => ("text/event-stream", vec![], whole.into_bytes()),
        // An event stream labelled as JSON (the SDKs read a streamed answer as events whatever its type).
        "events-as-json" => ("application/json", vec![], chat_stream("").into_bytes()),
        // Nesting deeper than the reader's parser goes.
        "deep" => {
            let pad = format!("{}{}", "[".repeat(200), "]".repeat(200));
            let text = whole.replacen('{', &format!("{{\"pad\":{pad},"), 1);
            ("application/json", vec![], text.into_bytes())
        }
        // A UTF-8 byte-order mark before the JSON (RFC 8259 §8.1 lets a parser ignore it; the SDKs do).
        "bom" => (
            "application/json",
            vec![],
            [b"\xEF\xBB\xBF", whole.as_bytes()].concat(),
        ),
        // gzip applied twice, named in two `Content-Encoding` lines (RFC 9110 §5.3: one list).
        // Arguments naming `command` twice: the reader keeps the last (`ls`), an agent whose decoder keeps the
        // first runs curl.
        "twin-args-stream" => (
            "text/event-stream",
            vec![],
            chat_stream_with("", &format!(r#"{{"command":"{COMMAND}","command":"ls"}}"#))
                .into_bytes(),
        ),
        // `Command` beside `command`: Go's encoding/json reads the last of the two into its `command` field.
        "twin-args" => (
            "application/json",
            vec![],
            completion_with(&format!(r#"{{"command":"ls","Command":"{COMMAND}"}}"#))
                .to_string()
                .into_bytes(),
        ),
        // `Tool_calls` for `tool_calls`: go-openai (encoding/json) reads the call, the reader saw only text.
        "misspelt-calls" => (
            "text/event-stream",
            vec![],
            chat_stream("")
                .replacen("\"tool_calls\"", "\"Tool_calls\"", 1)
                .into_bytes(),
        ),
        "gzip-twice" => (
            "application/json",
            vec!["gzip", "gzip"],
            gzip(&gzip(whole.as_bytes())),
        ),
        _ => ("text/plain", vec![], b"unknown case".to_vec()),
    }
}

async fn answer(req: Request<Incoming>) -> Response<TestBody> {
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let req: Value = serde_json::from_slice(&body).unwrap();
    let (content_type, codings, body) = canned(req["model"].as_str().unwrap_or_default());
    let mut resp = Response::builder().header("content-type", content_type);
    for c in codings {
        resp = resp.header("content-encoding", c);
    }
    resp.body(Full::new(Bytes::from(body)).boxed()).unwrap()
}

async fn upstream(ca: &TestCa) -> SocketAddr {
    answering_upstream(ca, &["api.openai.com"], answer).await
}

/// One chat request for `model` through the proxy: status and body as the agent got them, and the exchange's
/// records after the request's.
async fn ask(
    proxy: &Proxy,
    up: SocketAddr,
    model: &str,
    stream: bool,
) -> (u16, String, Vec<Value>) {
    let before = proxy.audit_records().await.len();
    let tls = proxy.tls_to(up, "api.openai.com", &[b"http/1.1"]).await;
    let req = Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("host", "api.openai.com")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}).to_string(),
        )))
        .unwrap();
    let (status, _, body) = send(tls, false, req).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let recs = proxy.audit_records().await;
    (
        status,
        String::from_utf8_lossy(&body).into_owned(),
        recs[before + 1..].to_vec(),
    )
}

async fn world() -> (Proxy, SocketAddr) {
    let ca = TestCa::new("unreadable test CA");
    let proxy = start_proxy(POLICY, &[&ca], false).await;
    let up = upstream(&ca).await;
    (proxy, up)
}

/// What the reader cannot parse is refused whole, recorded once as an unparseable proposal; the call never arrives.
#[tokio::test]
async fn an_answer_the_reader_cannot_parse_never_passes_a_call() {
    let (proxy, up) = world().await;
    let cases = [
        ("big-number", true),
        ("json-as-events", false),
        ("events-as-json", true),
        ("deep", false),
        ("misspelt-calls", true),
    ];
    let mut answers = Vec::new();
    for (model, stream) in cases {
        answers.push((model, ask(&proxy, up, model, stream).await));
    }
    let leaked: Vec<String> = answers
        .iter()
        .filter(|(_, (_, body, _))| body.contains("evil.example"))
        .map(|(model, (status, body, _))| format!("{model}: {status} {body}"))
        .collect();
    assert!(leaked.is_empty(), "the call reached the agent: {leaked:#?}");
    for (model, (_, _, recs)) in &answers {
        assert_eq!(recs.len(), 1, "{model}: {recs:#?}");
        assert_eq!(
            recs[0]["request"]["phase"], "proposal",
            "{model}: {}",
            recs[0]
        );
        assert_eq!(
            recs[0]["decision"]["reason"], "unparseable",
            "{model}: {}",
            recs[0]
        );
        assert_eq!(
            recs[0]["outcome"]["disposition"], "blocked",
            "{model}: {}",
            recs[0]
        );
    }
    assert!(proxy.close_and_verify().await > 0);
}

/// A call whose arguments text names a member twice (or twice in other letter case) is that call's alone to lose: it
/// is refused undecided (one record: proposal, unparseable, blocked), the agent gets the refusal text in its place,
/// and the rest of the answer passes (the stream runs to its `[DONE]`).
#[tokio::test]
async fn twin_argument_names_refuse_that_call_alone() {
    let (proxy, up) = world().await;
    for (model, stream) in [("twin-args-stream", true), ("twin-args", false)] {
        let (status, body, recs) = ask(&proxy, up, model, stream).await;
        assert_eq!(status, 200, "{model}: {body}");
        assert!(
            !body.contains("evil.example"),
            "{model}: the call reached the agent: {body}"
        );
        assert!(
            body.contains("refused the tool call `shell`"),
            "{model}: {body}"
        );
        if stream {
            assert!(body.contains("data: [DONE]"), "{model}: {body}");
        } else {
            let doc: Value = serde_json::from_str(&body).unwrap();
            assert!(
                doc["choices"][0]["message"].get("tool_calls").is_none(),
                "{model}: {doc}"
            );
            assert_eq!(doc["choices"][0]["finish_reason"], "stop", "{model}: {doc}");
        }
        assert_eq!(recs.len(), 1, "{model}: {recs:#?}");
        assert_eq!(
            recs[0]["request"]["phase"], "proposal",
            "{model}: {}",
            recs[0]
        );
        assert_eq!(
            recs[0]["decision"]["reason"], "unparseable",
            "{model}: {}",
            recs[0]
        );
        assert_eq!(
            recs[0]["outcome"]["disposition"], "blocked",
            "{model}: {}",
            recs[0]
        );
    }
    assert!(proxy.close_and_verify().await > 0);
}

/// What the SDKs read as the JSON it is (after a byte-order mark; through every coding named) is read the same and
/// its call decided: refused by the rule, the rest of the answer intact.
#[tokio::test]
async fn an_answer_read_past_a_bom_or_a_repeated_coding_has_its_call_refused() {
    let (proxy, up) = world().await;
    for model in ["bom", "gzip-twice"] {
        let (status, body, recs) = ask(&proxy, up, model, false).await;
        assert_eq!(status, 200, "{model}: {body}");
        assert!(
            !body.contains("evil.example"),
            "{model}: the call reached the agent: {body}"
        );
        let doc: Value = serde_json::from_str(body.trim_start_matches('\u{feff}')).unwrap();
        let message = &doc["choices"][0]["message"];
        assert!(message.get("tool_calls").is_none(), "{model}: {doc}");
        assert!(
            message["content"]
                .as_str()
                .unwrap()
                .contains("refused the tool call `shell`"),
            "{model}: {doc}"
        );
        assert_eq!(doc["choices"][0]["finish_reason"], "stop", "{model}: {doc}");
        assert_eq!(recs.len(), 1, "{model}: {recs:#?}");
        assert_eq!(
            recs[0]["decision"]["rule"], "no-curl",
            "{model}: {}",
            recs[0]
        );
    }
    assert!(proxy.close_and_verify().await > 0);
}
