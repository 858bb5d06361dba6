//! WebSocket messages under policy, through the real proxy on loopback: every message from the agent is decided,
//! recorded (linked to the upgrade's record), redacted, refused in its protocol's shape or by closing the
//! connection; messages from the upstream go through response rules; oversized messages and compression never pass
//! unread.

mod proxy_support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use proxy_support::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

const KEY: &str = "AKIAIOSFODNN7EXAMPLE";

const POLICY: &str = r#"version: 1
default: block
rules:
  - id: log-openai
    when: { host: [api.openai.com, tools.test, other.test] }
    verdict: log
  - id: redact-keys
    when: { host: api.openai.com, detect: [aws-access-key] }
    verdict: constrain
    constrain: { redact: [aws-access-key] }
  - id: no-blocked-models
    when: { llm.model: "blocked-*" }
    verdict: block
    message: this model is not approved for agents
  - id: no-shell-tools
    when: { llm.tools: [shell] }
    verdict: block
    message: agents may not declare a shell tool
  - id: no-delete-tools
    when: { mcp.tool: "delete_*" }
    verdict: block
    message: destructive tools are not allowed
  - id: no-keys-in-plain-data
    when: { host: other.test, detect: [aws-access-key] }
    verdict: block
  - id: at-most-100-records
    phase: response
    when: { host: other.test, response.json: { "$.records[*]": { count_gt: 100 } } }
    verdict: constrain
    constrain: { json_truncate: { "$.records": 100 } }
"#;

struct World {
    proxy: Proxy,
    up: std::net::SocketAddr,
    seen: std::sync::Arc<WsSeen>,
}

async fn world(policy: &str) -> World {
    let ca = TestCa::new("ws test upstream CA");
    let proxy = start_proxy(policy, &[&ca], false).await;
    let (chain, key) = ca.leaf(&["api.openai.com", "tools.test", "other.test"]);
    let (up, seen) = ws_upstream(chain, key).await;
    World { proxy, up, seen }
}

async fn text(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Message {
    tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("a message in time")
        .expect("the connection is open")
        .expect("a message")
}

/// The records of one connection: the upgrade's, then its messages'.
async fn records(proxy: &Proxy) -> Vec<serde_json::Value> {
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.audit_records().await
}

#[tokio::test]
async fn responses_api_events_are_decided_redacted_and_refused_like_their_http_form() {
    let w = world(POLICY).await;
    let mut ws = ws_connect(&w.proxy, w.up, "api.openai.com", "/v1/responses", &[])
        .await
        .expect("upgraded");
    // A pasted key reaches the provider redacted, the rest of the event intact.
    let create = serde_json::json!({
        "type": "response.create",
        "model": "gpt-test",
        "input": [{"role": "user", "content": format!("deploy with {KEY} now")}],
        "tools": [{"type": "function", "name": "read_file"}],
    });
    ws.send(Message::Text(create.to_string().into()))
        .await
        .unwrap();
    assert_eq!(
        text(&mut ws).await,
        Message::Text(r#"{"type":"response.completed"}"#.into())
    );
    let sent: serde_json::Value =
        serde_json::from_str(&w.seen.messages.lock().unwrap()[0]).unwrap();
    assert_eq!(
        sent["input"][0]["content"],
        "deploy with [REDACTED:aws-access-key] now"
    );
    assert_eq!(sent["tools"], create["tools"]);

    // A blocked model: an error event the client surfaces as the 403 a POST would have had; nothing reaches the
    // provider, and the connection stays open.
    let blocked = serde_json::json!({"type": "response.create", "model": "blocked-1", "input": []});
    ws.send(Message::Text(blocked.to_string().into()))
        .await
        .unwrap();
    let Message::Text(error) = text(&mut ws).await else {
        panic!("an error event")
    };
    let error: serde_json::Value = serde_json::from_str(&error).unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["status"], 403);
    assert_eq!(error["error"]["code"], "blocked_by_policy");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("this model is not approved for agents (policy rule: no-blocked-models)"),
        "{error}"
    );
    // A call declaring a shell tool, likewise.
    a_shell_tool_is_refused(&mut ws, "/v1/responses").await;
    ws.send(Message::Text("reply:still open".into()))
        .await
        .unwrap();
    assert_eq!(text(&mut ws).await, Message::Text("still open".into()));
    assert_eq!(
        w.seen.messages.lock().unwrap().len(),
        2,
        "only the allowed events reached the provider"
    );

    let recs = records(&w.proxy).await;
    assert_eq!(recs.len(), 5, "the upgrade and four messages: {recs:#?}");
    let upgrade = recs[0]["seq"].clone();
    let verdicts: Vec<(&str, &str)> = recs[1..]
        .iter()
        .map(|r| {
            assert_eq!(r["request"]["parent"], upgrade, "{r}");
            assert_eq!(r["request"]["phase"], "request", "{r}");
            (
                r["decision"]["verdict"].as_str().unwrap(),
                r["outcome"]["disposition"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        [
            ("constrain", "forwarded"),
            ("block", "blocked"),
            ("block", "blocked"),
            ("log", "forwarded")
        ]
    );
    assert_eq!(recs[1]["request"]["llm_model"], "gpt-test");
    assert_eq!(
        recs[1]["request"]["changes"][0]["cause"],
        "redact:aws-access-key"
    );
    assert!(
        !serde_json::to_string(&recs).unwrap().contains(KEY),
        "no record carries the key"
    );
}

/// A `response.create` declaring a shell tool, sent on `ws` (opened at `path`): refused with an error event.
async fn a_shell_tool_is_refused(
    ws: &mut (impl SinkExt<Message, Error = tokio_tungstenite::tungstenite::Error>
              + StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
              + Unpin),
    path: &str,
) {
    let shell = serde_json::json!({"type": "response.create", "model": "gpt-test",
        "tools": [{"type": "function", "name": "shell"}], "input": []});
    ws.send(Message::Text(shell.to_string().into()))
        .await
        .unwrap();
    let Message::Text(error) = text(ws).await else {
        panic!("{path}: an error event")
    };
    assert!(
        error.contains("agents may not declare a shell tool"),
        "{path}: {error}"
    );
}

/// The Responses WebSocket mode is recognised at every path the HTTP classifier reads as the Responses endpoint:
/// behind a gateway's or an SDK's `base_url` prefix, Azure's `/openai/responses`, the path percent-encoded. A
/// `response.create` declaring a forbidden tool there is refused as at `/v1/responses`, and never reaches the
/// provider.
#[tokio::test]
async fn responses_api_events_are_decided_at_any_responses_path() {
    let w = world(POLICY).await;
    for path in [
        "/openai/v1/responses",
        "/openai/responses?api-version=preview",
        "/v1/respons%65s",
    ] {
        let mut ws = ws_connect(&w.proxy, w.up, "api.openai.com", path, &[])
            .await
            .expect("upgraded");
        a_shell_tool_is_refused(&mut ws, path).await;
    }
    assert!(
        w.seen.messages.lock().unwrap().is_empty(),
        "nothing reached the provider"
    );
    let recs = records(&w.proxy).await;
    let blocked = recs
        .iter()
        .filter(|r| r["decision"]["rule"] == "no-shell-tools")
        .count();
    assert_eq!(blocked, 3, "{recs:#?}");
}

/// A JSON-RPC `tools/call` of `tool` without arguments.
fn call(id: u32, tool: &str) -> String {
    serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": tool, "arguments": {}}})
    .to_string()
}

#[tokio::test]
async fn json_rpc_over_websocket_is_decided_per_tool_call() {
    let w = world(POLICY).await;
    let mut ws = ws_connect(&w.proxy, w.up, "tools.test", "/mcp", &[])
        .await
        .expect("upgraded");
    ws.send(Message::Text(call(1, "delete_repo").into()))
        .await
        .unwrap();
    let Message::Text(answer) = text(&mut ws).await else {
        panic!("an answer")
    };
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["id"], 1);
    assert_eq!(
        answer["result"]["isError"], true,
        "a tool error the model reads: {answer}"
    );
    ws.send(Message::Text(call(2, "read_file").into()))
        .await
        .unwrap();
    let Message::Text(echo) = text(&mut ws).await else {
        panic!("an answer")
    };
    assert!(echo.starts_with("echo:"), "{echo}");
    assert_eq!(w.seen.messages.lock().unwrap().len(), 1);
    let recs = records(&w.proxy).await;
    assert_eq!(recs[1]["request"]["mcp_tool"], "delete_repo");
    assert_eq!(recs[1]["decision"]["rule"], "no-delete-tools");
}

/// Over WebSocket as over HTTP: a JSON-RPC message whose members a server on Go's `encoding/json` reads
/// case-insensitively (`Name` beside `name`: `delete_repo` to such a server) is refused, never relayed.
#[tokio::test]
async fn json_rpc_members_spelt_in_another_case_close_the_connection() {
    let w = world(POLICY).await;
    let mut ws = ws_connect(&w.proxy, w.up, "tools.test", "/mcp", &[])
        .await
        .expect("upgraded");
    let smuggled = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","Name":"delete_repo","arguments":{}}}"#;
    ws.send(Message::Text(smuggled.into())).await.unwrap();
    match text(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Invalid),
        other => panic!("expected a close with 1007, got {other:?}"),
    }
    assert!(w.seen.messages.lock().unwrap().is_empty());
    let recs = records(&w.proxy).await;
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[1]["outcome"]["error"], "unparseable", "{}", recs[1]);
}

/// Over WebSocket as over HTTP: members alike only in letter case that no condition reads are data (a row
/// `{"ID":1,"id":2}` in a tool's arguments), relayed and recorded as decided; a member named twice exactly is read
/// differently by each decoder, and closes the connection (1007), never relayed.
#[tokio::test]
async fn members_alike_in_letter_case_pass_and_a_member_named_twice_closes_the_connection() {
    let w = world(POLICY).await;
    let mut ws = ws_connect(&w.proxy, w.up, "tools.test", "/mcp", &[])
        .await
        .expect("upgraded");
    let row = r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"read_file","arguments":{"row":{"ID":1,"id":2}}}}"#;
    ws.send(Message::Text(row.into())).await.unwrap();
    let Message::Text(echo) = text(&mut ws).await else {
        panic!("an answer")
    };
    assert!(echo.starts_with("echo:"), "{echo}");
    let twice = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"read_file","arguments":{"a":1,"a":2}}}"#;
    ws.send(Message::Text(twice.into())).await.unwrap();
    match text(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Invalid),
        other => panic!("expected a close with 1007, got {other:?}"),
    }
    assert_eq!(w.seen.messages.lock().unwrap().len(), 1);
    let recs = records(&w.proxy).await;
    assert_eq!(recs.len(), 3);
    assert_eq!(recs[1]["decision"]["rule"], "log-openai", "{}", recs[1]);
    assert_eq!(recs[2]["outcome"]["error"], "unparseable", "{}", recs[2]);
}

#[tokio::test]
async fn plain_data_with_a_secret_closes_the_connection_with_policy_violation() {
    let w = world(POLICY).await;
    let mut ws = ws_connect(&w.proxy, w.up, "other.test", "/stream", &[])
        .await
        .expect("upgraded");
    ws.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(text(&mut ws).await, Message::Text("echo:hello".into()));
    // Split over three frames, a ping between them: reassembled before it is decided, so a key split across
    // frames is still one key.
    let (first, rest) = KEY.split_at(8);
    let frames = [
        Frame::message(format!("here is {first}"), OpCode::Data(Data::Text), false),
        Frame::message(rest[..6].to_string(), OpCode::Data(Data::Continue), false),
        Frame::message(rest[6..].to_string(), OpCode::Data(Data::Continue), true),
    ];
    for (i, frame) in frames.into_iter().enumerate() {
        ws.send(Message::Frame(frame)).await.unwrap();
        if i == 0 {
            ws.send(Message::Ping(bytes::Bytes::from_static(b"p")))
                .await
                .unwrap();
        }
    }
    let closed = loop {
        match text(&mut ws).await {
            Message::Pong(_) => continue,
            other => break other,
        }
    };
    match closed {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Policy),
        other => panic!("expected a close with 1008, got {other:?}"),
    }
    assert_eq!(*w.seen.messages.lock().unwrap(), ["hello"]);
}

#[tokio::test]
async fn messages_from_the_upstream_go_through_response_rules() {
    let w = world(POLICY).await;
    let mut ws = ws_connect(&w.proxy, w.up, "other.test", "/db", &[])
        .await
        .expect("upgraded");
    ws.send(Message::Text("records".into())).await.unwrap();
    let Message::Text(answer) = text(&mut ws).await else {
        panic!("records")
    };
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["records"].as_array().unwrap().len(), 100);
    let recs = records(&w.proxy).await;
    let response: Vec<_> = recs
        .iter()
        .filter(|r| r["request"]["phase"] == "response")
        .collect();
    assert_eq!(response.len(), 1, "{recs:#?}");
    assert_eq!(response[0]["decision"]["rule"], "at-most-100-records");
    assert_eq!(
        response[0]["request"]["changes"][0]["cause"],
        "json_truncate"
    );
    assert_eq!(response[0]["request"]["parent"], recs[0]["seq"]);
}

#[tokio::test]
async fn oversized_messages_and_compression_never_pass_unread() {
    let small = POLICY.replace("default: block\n", "default: block\nmax_body_bytes: 1KiB\n");
    let w = world(&small).await;
    let mut ws = ws_connect(
        &w.proxy,
        w.up,
        "other.test",
        "/stream",
        &[(
            "sec-websocket-extensions",
            "permessage-deflate; client_max_window_bits",
        )],
    )
    .await
    .expect("upgraded");
    assert!(
        w.seen.upgrades.lock().unwrap()[0]
            .get("sec-websocket-extensions")
            .is_none(),
        "compression is never offered to the upstream"
    );
    ws.send(Message::Text("x".repeat(4096).into()))
        .await
        .unwrap();
    match text(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Size),
        other => panic!("expected a close with 1009, got {other:?}"),
    }
    assert!(w.seen.messages.lock().unwrap().is_empty());
    let recs = records(&w.proxy).await;
    assert_eq!(
        recs.last().unwrap()["decision"]["reason"],
        "body_too_large",
        "{recs:#?}"
    );
}

/// A message under `review` cannot be held (the connection's other messages would wait behind it, and the
/// protocols have no "pending" answer): in enforce mode it is refused in its protocol's shape, recorded as
/// `review_unavailable`, and never reaches the upstream. Messages are Actions of the agent's session like requests:
/// a label one leaves blocks a later one.
#[tokio::test]
async fn a_message_under_review_is_refused_and_messages_label_their_session() {
    const SESSIONS: &str = r#"version: 1
default: block
rules:
  - id: log-tools
    when: { host: tools.test }
    verdict: log
  - id: deploys-need-a-person
    when: { mcp.tool: "deploy_*" }
    verdict: review
    review: { timeout: 60s, fallback: block }
  - id: customer-read
    when: { mcp.tool: read_customer }
    verdict: log
    label: customer-data
  - id: no-mail-after-customer-data
    when: { mcp.tool: send_mail, session.labels: customer-data }
    verdict: block
    message: this run has read customer data
"#;
    let w = world(SESSIONS).await;
    let agent = enforcer::model::Agent {
        cgroup: Some("/ws/session".into()),
        ..test_agent()
    };
    let mut ws = ws_connect_as(&w.proxy, agent, w.up, "tools.test", "/mcp", &[])
        .await
        .expect("upgraded");
    let mut answer = async |id: u32, tool: &str| {
        ws.send(Message::Text(call(id, tool).into())).await.unwrap();
        let Message::Text(a) = text(&mut ws).await else {
            panic!("an answer")
        };
        a.to_string()
    };
    let held = answer(1, "deploy_prod").await;
    let held: serde_json::Value = serde_json::from_str(&held).expect("a JSON-RPC answer");
    assert_eq!(held["id"], 1);
    assert_eq!(held["result"]["isError"], true, "{held}");
    assert!(answer(2, "send_mail").await.starts_with("echo:"));
    assert!(answer(3, "read_customer").await.starts_with("echo:"));
    let refused: serde_json::Value =
        serde_json::from_str(&answer(4, "send_mail").await).expect("a JSON-RPC answer");
    assert_eq!(refused["result"]["isError"], true, "{refused}");
    let seen = w.seen.messages.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "only the two allowed calls: {seen:?}");
    assert!(seen.iter().all(|m| !m.contains("deploy_prod")));

    let recs = records(&w.proxy).await;
    assert_eq!(recs[1]["decision"]["verdict"], "review");
    assert_eq!(recs[1]["outcome"]["disposition"], "blocked");
    assert_eq!(recs[1]["outcome"]["error"], "review_unavailable");
    assert_eq!(
        recs[3]["decision"]["labels"],
        serde_json::json!(["customer-data"])
    );
    assert_eq!(recs[4]["decision"]["rule"], "no-mail-after-customer-data");
    let session = recs[0]["agent"]["session"].as_str().expect("a session");
    let info = w.proxy.ctx.sessions.show(session).expect("live");
    assert_eq!(
        info.counters["requests"], 5,
        "the upgrade and four messages"
    );
}

/// Proposal rules for the Realtime tests: a `shell` function and a provider-run MCP `delete_*` tool are refused,
/// every other function call is recorded; tool results may not go to a `blocked-*` model.
const REALTIME: &str = r#"version: 1
default: block
rules:
  - id: log-openai
    when: { host: api.openai.com }
    verdict: log
  - id: redact-keys
    when: { host: api.openai.com, detect: [aws-access-key] }
    verdict: constrain
    constrain: { redact: [aws-access-key] }
  - id: no-blocked-models
    when: { llm.model: "blocked-*" }
    verdict: block
    message: this model is not approved for agents
  - id: no-shell
    phase: proposal
    when: { proposal.tool: [shell, "mcp:*/delete_*"] }
    verdict: block
    message: the model may not run a shell here
  - id: log-calls
    phase: proposal
    when: { proposal.kind: [function, mcp] }
    verdict: log
"#;

type AgentWs =
    tokio_tungstenite::WebSocketStream<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// A Realtime connection (`path`, extra upgrade headers `extra`) through the proxy under `policy`.
async fn realtime(policy: &str, path: &str, extra: &[(&str, &str)]) -> (World, AgentWs) {
    let w = world(policy).await;
    let ws = ws_connect(&w.proxy, w.up, "api.openai.com", path, extra)
        .await
        .expect("upgraded");
    (w, ws)
}

/// Have the test upstream send `events`, one message each (it answers `reply:X` with X).
async fn upstream_sends(ws: &mut AgentWs, events: &[serde_json::Value]) {
    for e in events {
        ws.send(Message::Text(format!("reply:{e}").into()))
            .await
            .unwrap();
    }
}

/// The next text message the agent receives, as it came and as JSON.
async fn next_event(ws: &mut AgentWs) -> (String, serde_json::Value) {
    loop {
        if let Message::Text(t) = text(ws).await {
            let v = serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}"));
            return (t.to_string(), v);
        }
    }
}

/// The server events of one function call `id` proposed in response `resp` (GA names): the item added to the
/// response and the conversation, its arguments in two deltas, `.done`, and the item done in the conversation and
/// the response, then `response.done` listing it.
fn ga_call(resp: &str, id: &str, name: &str, args: &str) -> Vec<serde_json::Value> {
    let item = |status: &str, arguments: &str| {
        serde_json::json!({"id": id, "object": "realtime.item", "type": "function_call", "status": status,
            "name": name, "call_id": format!("call_{id}"), "arguments": arguments})
    };
    let (first, rest) = args.split_at(args.len() / 2);
    let call = format!("call_{id}");
    vec![
        serde_json::json!({"type": "response.created", "event_id": "ev_0", "response": {"id": resp, "object": "realtime.response", "status": "in_progress", "output": []}}),
        serde_json::json!({"type": "response.output_item.added", "event_id": "ev_1", "response_id": resp, "output_index": 0, "item": item("in_progress", "")}),
        serde_json::json!({"type": "conversation.item.added", "event_id": "ev_2", "previous_item_id": null, "item": item("in_progress", "")}),
        serde_json::json!({"type": "response.function_call_arguments.delta", "event_id": "ev_3", "response_id": resp, "item_id": id, "output_index": 0, "call_id": call, "delta": first}),
        serde_json::json!({"type": "response.function_call_arguments.delta", "event_id": "ev_4", "response_id": resp, "item_id": id, "output_index": 0, "call_id": call, "delta": rest}),
        serde_json::json!({"type": "response.function_call_arguments.done", "event_id": "ev_5", "response_id": resp, "item_id": id, "output_index": 0, "call_id": call, "name": name, "arguments": args}),
        serde_json::json!({"type": "conversation.item.done", "event_id": "ev_6", "previous_item_id": null, "item": item("completed", args)}),
        serde_json::json!({"type": "response.output_item.done", "event_id": "ev_7", "response_id": resp, "output_index": 0, "item": item("completed", args)}),
        serde_json::json!({"type": "response.done", "event_id": "ev_8", "response": {"id": resp, "object": "realtime.response", "status": "completed", "output": [item("completed", args)]}}),
    ]
}

/// The proposal-phase records.
fn proposals(recs: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    recs.iter()
        .filter(|r| r["request"]["phase"] == "proposal")
        .collect()
}

/// A function call the model proposes over the Realtime API is held until complete, decided once by the proposal
/// rules with the model of the agent's last LLM call, and recorded linked to that call's record: a refused one
/// reaches the agent as an assistant message saying so — none of its nine events, no delta of its arguments, nothing
/// the agents SDKs would run — and an allowed one passes byte for byte.
#[tokio::test]
async fn realtime_function_calls_are_decided_before_the_agent_receives_them() {
    let (w, mut ws) = realtime(REALTIME, "/v1/realtime?model=gpt-realtime", &[]).await;
    let create =
        serde_json::json!({"type": "response.create", "response": {"instructions": "help"}});
    ws.send(Message::Text(create.to_string().into()))
        .await
        .unwrap();
    assert_eq!(next_event(&mut ws).await.1["type"], "response.completed");

    // The call is held while it is incomplete: an event after its first five reaches the agent before any of them.
    let shell = ga_call("resp_1", "item_1", "shell", r#"{"command": "rm -rf /"}"#);
    upstream_sends(&mut ws, &shell[..5]).await;
    let limits =
        serde_json::json!({"type": "rate_limits.updated", "event_id": "ev_rl", "rate_limits": []});
    upstream_sends(&mut ws, std::slice::from_ref(&limits)).await;
    let (_, created) = next_event(&mut ws).await;
    assert_eq!(created["type"], "response.created");
    let (_, first) = next_event(&mut ws).await;
    assert_eq!(first, limits, "nothing of the held call came before it");
    upstream_sends(&mut ws, &shell[5..]).await;
    let mut got = Vec::new();
    loop {
        let (raw, v) = next_event(&mut ws).await;
        assert!(!raw.contains("function_call"), "{raw}");
        assert!(!raw.contains("rm -rf"), "{raw}");
        let done = v["type"] == "response.done";
        got.push(v);
        if done {
            break;
        }
    }
    let types: Vec<&str> = got.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "response.output_item.added",
            "conversation.item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "conversation.item.done",
            "response.output_item.done",
            "response.done",
        ]
    );
    for e in &got[..2] {
        assert_eq!(e["item"]["id"], "item_1", "the item keeps its id: {e}");
        assert_eq!(e["item"]["type"], "message");
        assert_eq!(e["item"]["status"], "in_progress");
    }
    let said = got[3]["delta"].as_str().unwrap();
    assert!(
        said.contains("`shell`") && said.contains("the model may not run a shell here"),
        "{said}"
    );
    assert_eq!(got[3]["item_id"], "item_1");
    assert_eq!(got[3]["response_id"], "resp_1");
    let message = serde_json::json!({"id": "item_1", "object": "realtime.item", "type": "message",
        "role": "assistant", "status": "completed", "content": [{"type": "output_text", "text": said}]});
    assert_eq!(got[6]["item"], message);
    assert_eq!(got[7]["item"], message);
    assert_eq!(got[7]["event_id"], "ev_7");
    assert_eq!(got[8]["response"]["output"], serde_json::json!([message]));

    // An allowed call passes as it came, byte for byte.
    let read = ga_call("resp_2", "item_2", "read_file", r#"{"path": "README.md"}"#);
    upstream_sends(&mut ws, &read).await;
    for e in &read {
        assert_eq!(next_event(&mut ws).await.0, e.to_string());
    }

    let recs = records(&w.proxy).await;
    let calls = proposals(&recs);
    assert_eq!(calls.len(), 2, "each call decided once: {recs:#?}");
    let turn = recs
        .iter()
        .find(|r| r["request"]["phase"] == "request" && r["request"]["llm_provider"] == "openai")
        .expect("the response.create's record");
    for (call, (tool, verdict, rule)) in calls.iter().zip([
        ("shell", "block", "no-shell"),
        ("read_file", "log", "log-calls"),
    ]) {
        assert_eq!(call["request"]["tool"], tool, "{call}");
        assert_eq!(call["decision"]["verdict"], verdict, "{call}");
        assert_eq!(call["decision"]["rule"], rule, "{call}");
        assert_eq!(call["request"]["llm_model"], "gpt-realtime", "{call}");
        assert_eq!(call["request"]["parent"], turn["seq"], "{call}");
    }
    assert_eq!(calls[0]["outcome"]["disposition"], "blocked");
}

/// The beta interface (`OpenAI-Beta: realtime=v1`) names its events otherwise: a refused call's message there is a
/// `text` part streamed with `response.text.*`, and a later `conversation.item.retrieved` of the refused item
/// carries the message too. A provider-run MCP call (`mcp_call`, `response.mcp_call_arguments.*`,
/// `response.mcp_call.*`) is decided as `mcp:<server>/<tool>`.
#[tokio::test]
async fn realtime_beta_events_and_mcp_calls_are_decided_too() {
    let (w, mut ws) = realtime(
        REALTIME,
        "/v1/realtime?model=gpt-4o-realtime-preview",
        &[("openai-beta", "realtime=v1")],
    )
    .await;
    let item = |status: &str, args: &str| {
        serde_json::json!({"id": "item_b", "object": "realtime.item", "type": "function_call",
            "status": status, "name": "shell", "call_id": "call_b", "arguments": args})
    };
    let args = r#"{"command":"id"}"#;
    let events = [
        serde_json::json!({"type": "response.output_item.added", "event_id": "e1", "response_id": "r", "output_index": 0, "item": item("in_progress", "")}),
        serde_json::json!({"type": "conversation.item.created", "event_id": "e2", "previous_item_id": "u1", "item": item("in_progress", "")}),
        serde_json::json!({"type": "response.function_call_arguments.delta", "event_id": "e3", "response_id": "r", "item_id": "item_b", "output_index": 0, "call_id": "call_b", "delta": args}),
        serde_json::json!({"type": "response.function_call_arguments.done", "event_id": "e4", "response_id": "r", "item_id": "item_b", "output_index": 0, "call_id": "call_b", "arguments": args}),
        serde_json::json!({"type": "response.output_item.done", "event_id": "e5", "response_id": "r", "output_index": 0, "item": item("completed", args)}),
        serde_json::json!({"type": "conversation.item.retrieved", "event_id": "e6", "item": item("completed", args)}),
    ];
    upstream_sends(&mut ws, &events).await;
    let mut got = Vec::new();
    while got.len() < 8 {
        let (raw, v) = next_event(&mut ws).await;
        assert!(!raw.contains("function_call"), "{raw}");
        got.push(v);
    }
    let types: Vec<&str> = got.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "response.output_item.added",
            "conversation.item.created",
            "response.content_part.added",
            "response.text.delta",
            "response.text.done",
            "response.content_part.done",
            "response.output_item.done",
            "conversation.item.retrieved",
        ]
    );
    assert_eq!(got[1]["previous_item_id"], "u1");
    assert_eq!(got[6]["item"]["content"][0]["type"], "text");
    assert_eq!(got[7]["item"], got[6]["item"]);

    let mcp = |args: &str| {
        serde_json::json!({"id": "mcp_1", "type": "mcp_call", "server_label": "github",
            "name": "delete_repo", "arguments": args})
    };
    let args = r#"{"repo":"acme/app"}"#;
    let events = [
        serde_json::json!({"type": "response.output_item.added", "event_id": "m1", "response_id": "r2", "output_index": 0, "item": mcp("")}),
        serde_json::json!({"type": "response.mcp_call_arguments.delta", "event_id": "m2", "response_id": "r2", "item_id": "mcp_1", "output_index": 0, "delta": args}),
        serde_json::json!({"type": "response.mcp_call_arguments.done", "event_id": "m3", "response_id": "r2", "item_id": "mcp_1", "output_index": 0, "arguments": args}),
        serde_json::json!({"type": "response.mcp_call.in_progress", "event_id": "m4", "item_id": "mcp_1", "output_index": 0}),
        serde_json::json!({"type": "response.mcp_call.completed", "event_id": "m5", "item_id": "mcp_1", "output_index": 0}),
        serde_json::json!({"type": "response.output_item.done", "event_id": "m6", "response_id": "r2", "output_index": 0, "item": mcp(args)}),
    ];
    upstream_sends(&mut ws, &events).await;
    let mut got = Vec::new();
    while got.len() < 6 {
        let (raw, v) = next_event(&mut ws).await;
        assert!(!raw.contains("mcp_call"), "{raw}");
        got.push(v);
    }
    assert_eq!(got[5]["type"], "response.output_item.done");
    assert_eq!(got[5]["item"]["type"], "message");

    let recs = records(&w.proxy).await;
    let tools: Vec<(&str, &str)> = proposals(&recs)
        .iter()
        .map(|r| {
            (
                r["request"]["tool"].as_str().unwrap(),
                r["decision"]["rule"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        tools,
        [
            ("shell", "no-shell"),
            ("mcp:github/delete_repo", "no-shell")
        ]
    );
}

/// The Realtime API is recognised at every path a gateway or the provider may route to it: behind a `base_url`
/// prefix, percent-encoded, in another letter case (as the HTTP endpoints are). A refused call there never reaches
/// the agent.
#[tokio::test]
async fn realtime_calls_are_decided_at_any_realtime_path() {
    for path in [
        "/openai/v1/realtime?model=gpt-realtime",
        "/v1/realtim%65?model=gpt-realtime",
        "/V1/Realtime?model=gpt-realtime",
    ] {
        let (w, mut ws) = realtime(REALTIME, path, &[]).await;
        let shell = ga_call("r", "item_p", "shell", r#"{"command": "id"}"#);
        upstream_sends(&mut ws, &shell).await;
        loop {
            let (raw, v) = next_event(&mut ws).await;
            assert!(!raw.contains("function_call"), "{path}: {raw}");
            if v["type"] == "response.done" {
                break;
            }
        }
        let recs = records(&w.proxy).await;
        assert_eq!(
            proposals(&recs)[0]["decision"]["rule"],
            "no-shell",
            "{path}"
        );
    }
}

/// A call the model proposes before the agent made any LLM call on the connection is the connection's: recorded with
/// provider `openai` and the model the URL named (none without `?model=`), linked to the upgrade's record, as is an
/// unreadable event refused then. Before, both records named no provider.
#[tokio::test]
async fn realtime_refusals_before_any_agent_turn_name_the_connections_call() {
    for (path, model) in [
        (
            "/v1/realtime?model=gpt-realtime",
            serde_json::Value::from("gpt-realtime"),
        ),
        ("/v1/realtime", serde_json::Value::Null),
    ] {
        let (w, mut ws) = realtime(REALTIME, path, &[]).await;
        let shell = ga_call("r", "item_p", "shell", r#"{"command": "id"}"#);
        upstream_sends(&mut ws, &shell).await;
        loop {
            let (raw, v) = next_event(&mut ws).await;
            assert!(!raw.contains("function_call"), "{path}: {raw}");
            if v["type"] == "response.done" {
                break;
            }
        }
        // An array of events is unreadable: the connection ends (1007).
        ws.send(Message::Text("reply:[{}]".into())).await.unwrap();
        match text(&mut ws).await {
            Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Invalid, "{path}"),
            other => panic!("{path}: expected a close with 1007, got {other:?}"),
        }
        let recs = records(&w.proxy).await;
        let upgrade = &recs[0];
        assert_eq!(
            upgrade["request"]["path"],
            path.split('?').next().unwrap(),
            "{upgrade}"
        );
        assert_eq!(
            upgrade["request"]["llm_provider"],
            serde_json::Value::Null,
            "{upgrade}"
        );
        let calls = proposals(&recs);
        assert_eq!(calls.len(), 2, "{path}: {recs:#?}");
        assert_eq!(calls[0]["decision"]["rule"], "no-shell", "{}", calls[0]);
        assert_eq!(calls[0]["request"]["tool"], "shell", "{}", calls[0]);
        assert_eq!(
            calls[1]["decision"]["reason"], "unparseable",
            "{}",
            calls[1]
        );
        for call in calls {
            assert_eq!(call["outcome"]["disposition"], "blocked", "{call}");
            assert_eq!(call["request"]["llm_provider"], "openai", "{call}");
            assert_eq!(call["request"]["llm_model"], model, "{call}");
            assert_eq!(call["request"]["parent"], upgrade["seq"], "{call}");
        }
    }
}

/// After the agent's LLM call, an unreadable event refused answers that call: its record names the call's provider
/// and model (the event's own, over the URL's) and links to the call's record. Before, it named none.
#[tokio::test]
async fn a_realtime_refusal_after_an_agent_turn_names_the_turns_call() {
    let (w, mut ws) = realtime(REALTIME, "/v1/realtime?model=gpt-realtime", &[]).await;
    let create =
        serde_json::json!({"type": "response.create", "response": {"model": "gpt-realtime-mini"}});
    ws.send(Message::Text(create.to_string().into()))
        .await
        .unwrap();
    assert_eq!(next_event(&mut ws).await.1["type"], "response.completed");
    ws.send(Message::Text("reply:[{}]".into())).await.unwrap();
    match text(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Invalid),
        other => panic!("expected a close with 1007, got {other:?}"),
    }
    let recs = records(&w.proxy).await;
    let turn = recs
        .iter()
        .find(|r| {
            r["request"]["llm_model"] == "gpt-realtime-mini" && r["request"]["phase"] == "request"
        })
        .expect("the response.create's record");
    let last = recs.last().unwrap();
    assert_eq!(last["request"]["phase"], "proposal", "{last}");
    assert_eq!(last["decision"]["reason"], "unparseable", "{last}");
    assert_eq!(last["request"]["llm_provider"], "openai", "{last}");
    assert_eq!(last["request"]["llm_model"], "gpt-realtime-mini", "{last}");
    assert_eq!(last["request"]["parent"], turn["seq"], "{last}");
}

/// What the agent could read otherwise than the policy is never relayed: an event naming a call that was passed
/// with other arguments than were decided closes the connection (1007), recorded as unreadable.
#[tokio::test]
async fn a_realtime_event_contradicting_a_decided_call_closes_the_connection() {
    let (w, mut ws) = realtime(REALTIME, "/v1/realtime?model=gpt-realtime", &[]).await;
    let read = ga_call("r", "item_3", "read_file", r#"{"path": "README.md"}"#);
    upstream_sends(&mut ws, &read[..8]).await;
    for e in &read[..8] {
        assert_eq!(next_event(&mut ws).await.0, e.to_string());
    }
    let mut other = read[8].clone();
    other["response"]["output"][0]["name"] = "shell".into();
    upstream_sends(&mut ws, &[other]).await;
    match text(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Invalid),
        other => panic!("expected a close with 1007, got {other:?}"),
    }
    let recs = records(&w.proxy).await;
    let last = recs.last().unwrap();
    assert_eq!(last["request"]["phase"], "proposal", "{last}");
    assert_eq!(last["outcome"]["error"], "unparseable", "{last}");
}

/// A tool's result returned over Realtime (`conversation.item.create` with a `function_call_output` item) is an LLM
/// call, as a Responses `input[]` `function_call_output` is: decided with the session's model (a `blocked-*` model
/// refuses it, in an `error` event), its secrets redacted, recorded with its provider and model.
#[tokio::test]
async fn realtime_tool_results_are_llm_calls_decided_like_responses_input() {
    let output = |call: &str| {
        serde_json::json!({"type": "conversation.item.create", "item": {"type": "function_call_output",
            "call_id": call, "output": format!("the key is {KEY}")}})
    };
    // The file's base policy: the test upstream echoes what it does not know as text, which a proposal reader
    // would refuse as unreadable.
    let (w, mut ws) = realtime(POLICY, "/v1/realtime?model=blocked-rt", &[]).await;
    ws.send(Message::Text(output("call_1").to_string().into()))
        .await
        .unwrap();
    let (_, error) = next_event(&mut ws).await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["code"], "blocked_by_policy");
    assert!(w.seen.messages.lock().unwrap().is_empty());
    let recs = records(&w.proxy).await;
    assert_eq!(
        recs[1]["decision"]["rule"], "no-blocked-models",
        "{}",
        recs[1]
    );
    assert_eq!(recs[1]["request"]["llm_model"], "blocked-rt");

    let (w, mut ws) = realtime(POLICY, "/v1/realtime?model=gpt-realtime", &[]).await;
    ws.send(Message::Text(output("call_2").to_string().into()))
        .await
        .unwrap();
    let Message::Text(echo) = text(&mut ws).await else {
        panic!("the upstream's answer")
    };
    assert!(echo.starts_with("echo:"), "{echo}");
    let sent: serde_json::Value =
        serde_json::from_str(&w.seen.messages.lock().unwrap()[0]).unwrap();
    assert_eq!(
        sent["item"]["output"],
        "the key is [REDACTED:aws-access-key]"
    );
    let recs = records(&w.proxy).await;
    assert_eq!(recs[1]["decision"]["rule"], "redact-keys", "{}", recs[1]);
    assert_eq!(recs[1]["request"]["llm_provider"], "openai");
    assert_eq!(recs[1]["request"]["llm_model"], "gpt-realtime");
}

/// The type an event is read by is the one every SDK reads: an event naming `type` twice — the same name (Python's
/// `json.loads` keeps the last), or in another letter case (Go's `encoding/json` binds `Type` to the field too) —
/// could be an audio delta to the reader and a completed `function_call` item to the agent, so it closes the
/// connection (1007), recorded as unreadable, however large the audio it carries; as does an audio delta that is not
/// JSON. An audio delta read alike by all passes byte for byte.
#[tokio::test]
async fn a_realtime_event_naming_its_type_twice_closes_the_connection() {
    let audio = "UklGRiQAAABXQVZFZm10IBAAAAABAAEA".repeat(768); // 24 KiB of base64
    let call = r#"{"id":"item_t","object":"realtime.item","type":"function_call","status":"completed","name":"shell","call_id":"call_t","arguments":"{\"command\":\"rm -rf /\"}"}"#;
    let delta = |ty: &str| {
        format!(
            r#""type":"{ty}","event_id":"ev_a","response_id":"r","item_id":"item_a","output_index":0,"content_index":0,"delta":"{audio}""#
        )
    };
    let fine = format!("{{{}}}", delta("response.output_audio.delta"));
    let cases = [
        format!(
            r#"{{{},"type":"response.output_item.done","item":{call}}}"#,
            delta("response.output_audio.delta")
        ),
        format!(
            r#"{{"type":"response.output_item.done","item":{call},{}}}"#,
            delta("response.output_audio.delta")
        ),
        format!(
            r#"{{{},"Type":"response.output_item.done","item":{call}}}"#,
            delta("response.output_audio.delta")
        ),
        format!(
            r#"{{{},"TYPE":"conversation.item.done","item":{call}}}"#,
            delta("response.audio.delta")
        ),
        format!("{{{}", delta("response.output_audio.delta")),
    ];
    for case in cases {
        let (w, mut ws) = realtime(REALTIME, "/v1/realtime?model=gpt-realtime", &[]).await;
        ws.send(Message::Text(format!("reply:{fine}").into()))
            .await
            .unwrap();
        assert_eq!(next_event(&mut ws).await.0, fine);
        ws.send(Message::Text(format!("reply:{case}").into()))
            .await
            .unwrap();
        match text(&mut ws).await {
            Message::Close(Some(frame)) => {
                assert_eq!(frame.code, CloseCode::Invalid, "{case:.120}")
            }
            other => panic!("expected a close with 1007 for {case:.120}, got {other:.120?}"),
        }
        let recs = records(&w.proxy).await;
        let last = recs.last().unwrap();
        assert_eq!(last["request"]["phase"], "proposal", "{last}");
        assert_eq!(last["outcome"]["error"], "unparseable", "{last}");
        assert_eq!(proposals(&recs).len(), 1, "{recs:#?}");
    }
}

/// A response rule on the model reads the model of the agent's last LLM call over the connection, as proposal rules
/// do: the Realtime API's events answer the `response.create` (or `session.update`) that asked for them, whose model
/// can be another than the URL's. Before, response rules decided every event with the connection's call (the URL's
/// model), so a rule for the turn's model never matched; now the event is refused (1008) and its record names the
/// turn's model and links to the turn's record. Before any turn, the URL's call is the one answered.
#[tokio::test]
async fn realtime_response_rules_decide_with_the_turns_call() {
    let policy = format!(
        "{REALTIME}  - id: mini-says-nothing-internal\n    phase: response\n    when: {{ llm.model: gpt-realtime-mini, response.json: {{ \"$.delta\": {{ matches: internal-only }} }} }}\n    verdict: block\n"
    );
    let delta = serde_json::json!({"type": "response.output_text.delta", "event_id": "ev_1",
        "response_id": "resp_1", "item_id": "item_1", "output_index": 0, "content_index": 0,
        "delta": "internal-only figures"});
    // Before any turn: the URL's model, which no rule limits.
    let (w, mut ws) = realtime(&policy, "/v1/realtime?model=gpt-realtime", &[]).await;
    upstream_sends(&mut ws, std::slice::from_ref(&delta)).await;
    assert_eq!(next_event(&mut ws).await.1, delta);

    let create =
        serde_json::json!({"type": "response.create", "response": {"model": "gpt-realtime-mini"}});
    ws.send(Message::Text(create.to_string().into()))
        .await
        .unwrap();
    assert_eq!(next_event(&mut ws).await.1["type"], "response.completed");
    upstream_sends(&mut ws, std::slice::from_ref(&delta)).await;
    match text(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Policy),
        other => panic!("expected a close with 1008, got {other:?}"),
    }
    let recs = records(&w.proxy).await;
    let turn = recs
        .iter()
        .find(|r| {
            r["request"]["llm_model"] == "gpt-realtime-mini" && r["request"]["phase"] == "request"
        })
        .expect("the response.create's record");
    let refused: Vec<_> = recs
        .iter()
        .filter(|r| r["decision"]["rule"] == "mini-says-nothing-internal")
        .collect();
    assert_eq!(refused.len(), 1, "{recs:#?}");
    let r = refused[0];
    assert_eq!(r["request"]["phase"], "response", "{r}");
    assert_eq!(r["decision"]["verdict"], "block", "{r}");
    assert_eq!(r["request"]["llm_model"], "gpt-realtime-mini", "{r}");
    assert_eq!(r["request"]["parent"], turn["seq"], "{r}");
}
