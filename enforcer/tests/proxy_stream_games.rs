//! Streamed tool calls whose events an SDK's accumulator assembles otherwise than the proposal reader did, through
//! the real proxy on loopback: Anthropic Messages blocks whose `index` is reused, missing or not the block's
//! position, a call carried whole in `message_start`, input JSON left open (the anthropic SDK parses it partially);
//! OpenAI Responses calls carried only in the lifecycle event's `response.output`, or whose deltas, `.done` and
//! `output_item.done` disagree. The refused command must never reach the agent: each is decided, or refused and
//! recorded (fail closed).

mod proxy_support;

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

fn sse(events: &[Value]) -> String {
    events
        .iter()
        .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
        .collect()
}

fn message_start(content: Value) -> Value {
    json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
        "model": "m", "content": content, "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": 1, "output_tokens": 1}}})
}

fn tool_start(index: Value, input: Value) -> Value {
    json!({"type": "content_block_start", "index": index,
        "content_block": {"type": "tool_use", "id": "toolu_1", "name": "shell", "input": input}})
}

fn input_delta(index: u64, text: &str) -> Value {
    json!({"type": "content_block_delta", "index": index,
        "delta": {"type": "input_json_delta", "partial_json": text}})
}

fn block_stop(index: u64) -> Value {
    json!({"type": "content_block_stop", "index": index})
}

fn message_end() -> [Value; 2] {
    [
        json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
            "usage": {"output_tokens": 5}}),
        json!({"type": "message_stop"}),
    ]
}

/// Anthropic Messages streams, by the request's `model`.
fn messages(model: &str) -> Option<Vec<Value>> {
    let curl = json!({"command": COMMAND});
    let open_json = format!("{{\"command\":\"{COMMAND}\"");
    let mut events = vec![message_start(json!([]))];
    match model {
        // The input's JSON never closed: the SDK's partial parse still reads the command.
        "m-open-json" => events.extend([
            tool_start(json!(0), json!({})),
            input_delta(0, &open_json),
            block_stop(0),
        ]),
        // A block start without a usable `index`: the SDK appends every start whatever its index.
        "m-start-index-null" => {
            events.extend([tool_start(Value::Null, curl.clone()), block_stop(0)]);
        }
        "m-start-index-negative" => {
            events.extend([tool_start(json!(-1), curl.clone()), block_stop(0)]);
        }
        // The whole call in `message_start`: the SDK's snapshot starts from that message.
        "m-message-start" => {
            events[0] = message_start(json!([{"type": "tool_use", "id": "toolu_1", "name": "shell",
                "input": curl.clone()}]));
        }
        // The tool block reuses a text block's index: the SDK sends its deltas to the text block.
        "m-index-reused" => events.extend([
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            block_stop(0),
            tool_start(json!(0), curl.clone()),
            input_delta(0, "{\"command\":\"echo ok\"}"),
            block_stop(0),
        ]),
        _ => return None,
    }
    events.extend(message_end());
    Some(events)
}

fn function_item(status: &str, args: &str) -> Value {
    json!({"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "shell",
        "arguments": args, "status": status})
}

fn lifecycle(ty: &str, status: &str, output: Value) -> Value {
    json!({"type": ty, "response": {"id": "resp_1", "object": "response", "status": status,
        "model": "m", "output": output}})
}

/// OpenAI Responses streams, by the request's `model`.
fn responses(model: &str) -> Option<Vec<Value>> {
    let curl = json!({"command": COMMAND}).to_string();
    let ok = json!({"command": "echo ok"}).to_string();
    let mut events = vec![lifecycle("response.created", "in_progress", json!([]))];
    match model {
        // The call only in `response.completed` (what `get_final_response()` returns).
        "r-completed-only" => events.push(lifecycle(
            "response.completed",
            "completed",
            json!([function_item("completed", &curl)]),
        )),
        // The call streamed harmless, then completed with the command.
        "r-completed-differs" => events.extend([
            json!({"type": "response.output_item.added", "output_index": 0, "item": function_item("in_progress", "")}),
            json!({"type": "response.function_call_arguments.delta", "output_index": 0, "item_id": "fc_1", "delta": ok}),
            json!({"type": "response.function_call_arguments.done", "output_index": 0, "item_id": "fc_1", "arguments": ok}),
            json!({"type": "response.output_item.done", "output_index": 0, "item": function_item("completed", &ok)}),
            lifecycle("response.completed", "completed", json!([function_item("completed", &curl)])),
        ]),
        // The deltas and `.done` carry the command, `output_item.done` something harmless.
        "r-done-differs" => events.extend([
            json!({"type": "response.output_item.added", "output_index": 0, "item": function_item("in_progress", "")}),
            json!({"type": "response.function_call_arguments.delta", "output_index": 0, "item_id": "fc_1", "delta": curl}),
            json!({"type": "response.function_call_arguments.done", "output_index": 0, "item_id": "fc_1", "arguments": curl}),
            json!({"type": "response.output_item.done", "output_index": 0, "item": function_item("completed", &ok)}),
            lifecycle("response.completed", "completed", json!([function_item("completed", &ok)])),
        ]),
        _ => return None,
    }
    for (n, e) in events.iter_mut().enumerate() {
        e["sequence_number"] = json!(n);
    }
    Some(events)
}

async fn answer(req: Request<Incoming>) -> Response<TestBody> {
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let req: Value = serde_json::from_slice(&body).unwrap();
    let model = req["model"].as_str().unwrap_or_default();
    let text = messages(model)
        .or_else(|| responses(model))
        .map(|events| sse(&events))
        .unwrap_or_default();
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Full::new(Bytes::from(text)).boxed())
        .unwrap()
}

async fn upstream(ca: &TestCa) -> SocketAddr {
    answering_upstream(ca, &["api.openai.com", "api.anthropic.com"], answer).await
}

/// One streamed request for `model` through the proxy: the body as the agent got it, and the exchange's records
/// after the request's.
async fn ask(proxy: &Proxy, up: SocketAddr, model: &str) -> (String, Vec<Value>) {
    let (host, path) = match &model[..2] {
        "m-" => ("api.anthropic.com", "/v1/messages"),
        "r-" => ("api.openai.com", "/v1/responses"),
        _ => ("api.openai.com", "/v1/responses"),
    };
    let before = proxy.audit_records().await.len();
    let tls = proxy.tls_to(up, host, &[b"http/1.1"]).await;
    let req = Request::builder()
        .method("POST")
        .uri(path)
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            json!({"model": model, "stream": true, "max_tokens": 100,
                "messages": [{"role": "user", "content": "hi"}]})
            .to_string(),
        )))
        .unwrap();
    let (_, _, body) = send(tls, false, req).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let recs = proxy.audit_records().await;
    let body = String::from_utf8_lossy(&body).into_owned();
    if let Ok(dir) = std::env::var("STREAM_GAMES_DUMP") {
        std::fs::write(format!("{dir}/{model}.sse"), &body).unwrap();
    }
    (body, recs[before + 1..].to_vec())
}

/// Every game: the command never reaches the agent, and the exchange's proposal phase leaves one record of a
/// blocked call (the rule's refusal, or the reader's refusal of what it could not read the SDK's way).
#[tokio::test]
async fn a_call_the_sdk_assembles_otherwise_never_reaches_the_agent() {
    let ca = TestCa::new("stream games test CA");
    let proxy = start_proxy(POLICY, &[&ca], false).await;
    let up = upstream(&ca).await;
    let models = [
        "m-open-json",
        "m-start-index-null",
        "m-start-index-negative",
        "m-message-start",
        "m-index-reused",
        "r-completed-only",
        "r-completed-differs",
        "r-done-differs",
    ];
    let mut failed = Vec::new();
    for model in models {
        let (body, recs) = ask(&proxy, up, model).await;
        if body.contains("evil.example") {
            failed.push(format!("{model}: the call reached the agent: {body}"));
            continue;
        }
        let blocked: Vec<&Value> = recs
            .iter()
            .filter(|r| r["request"]["phase"] == "proposal")
            .collect();
        if blocked.len() != 1 || blocked[0]["outcome"]["disposition"] != "blocked" {
            failed.push(format!(
                "{model}: not one blocked proposal record: {recs:#?}"
            ));
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
    assert!(proxy.close_and_verify().await > 0);
}
