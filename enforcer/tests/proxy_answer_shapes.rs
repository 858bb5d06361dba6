//! Tool calls in shapes of an answer the SDKs assemble and hand to the agent, through the real proxy from a real TLS
//! upstream: the legacy Chat `function_call` (whole and streamed), arguments the agent's JSON parser reads but the
//! reader's does not (`NaN`, a lone surrogate escape), arguments that are not text, twin member names (the same
//! name twice, or in other letter case as Go's `encoding/json` matches them), a provider's member name in other
//! letter case, and Gemini parts so written. Each call is either decided by the policy as the agent would read it,
//! or refused and recorded (`proposal`, `unparseable`): it never reaches the agent unread.

mod proxy_support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use proxy_support::*;
use serde_json::{json, Value};

const COMMAND: &str = CURL_COMMAND;

fn chunk(delta: Value, finish: Option<&str>) -> String {
    let c = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
    format!("data: {c}\n\n")
}

/// A chat stream of one call: `pieces` are the deltas carrying it, then the finish and `[DONE]`.
fn chat_stream(pieces: &[Value], finish: &str) -> String {
    let mut s = chunk(json!({"role": "assistant", "content": null}), None);
    for p in pieces {
        s.push_str(&chunk(p.clone(), None));
    }
    s.push_str(&chunk(json!({}), Some(finish)));
    s.push_str("data: [DONE]\n\n");
    s
}

fn tool_piece(args: &str) -> Value {
    json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
        "function": {"name": "shell", "arguments": args}}]})
}

/// A whole chat completion whose message is `message`.
fn completion(message: Value, finish: &str) -> String {
    json!({"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "finish_reason": finish, "logprobs": null, "message": message}]})
    .to_string()
}

fn tool_message(args: Value) -> Value {
    json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
        "function": {"name": "shell", "arguments": args}}]})
}

/// Arguments text: `{"command": <curl>}` with `extra` members after it.
fn args_with(extra: &str) -> String {
    format!("{{\"command\":{}{extra}}}", json!(COMMAND))
}

/// The canned answer for a case: content type and body.
/// The page of an ordinary redirect (not JSON: read as an answer, it would be unreadable and refused).
const REDIRECT_PAGE: &str =
    "<html><body>Moved to <a href=\"/v1/elsewhere\">/v1/elsewhere</a></body></html>";

fn canned(case: &str) -> (&'static str, String) {
    let legacy = json!({"name": "shell", "arguments": args_with("")});
    let sse = "text/event-stream";
    let whole = "application/json";
    match case {
        "legacy-whole" => (
            whole,
            completion(
                json!({"role": "assistant", "content": null, "function_call": legacy}),
                "function_call",
            ),
        ),
        "legacy-stream" => {
            let text = args_with("");
            let (a, b) = text.split_at(12);
            let pieces = [
                json!({"function_call": {"name": "shell", "arguments": ""}}),
                json!({"function_call": {"arguments": a}}),
                json!({"function_call": {"arguments": b}}),
            ];
            (sse, chat_stream(&pieces, "function_call"))
        }
        // Python's json.loads reads NaN and a lone surrogate; the reader's parser does not.
        "nan-whole" => (
            whole,
            completion(tool_message(json!(args_with(",\"n\":NaN"))), "tool_calls"),
        ),
        "nan-stream" => (
            sse,
            chat_stream(&[tool_piece(&args_with(",\"n\":NaN"))], "tool_calls"),
        ),
        "surrogate-whole" => (
            whole,
            completion(
                tool_message(json!(args_with(",\"s\":\"\\ud800\""))),
                "tool_calls",
            ),
        ),
        // Arguments as an object, not text: the SDKs hand the object on as it came.
        "object-whole" => (
            whole,
            completion(tool_message(json!({"command": COMMAND})), "tool_calls"),
        ),
        // Go's case-insensitive decoder reads the second; a first-wins reader reads the first of two.
        "twin-whole" => {
            let args = format!("{{\"command\":\"echo ok\",\"Command\":{}}}", json!(COMMAND));
            (whole, completion(tool_message(json!(args)), "tool_calls"))
        }
        "twin-stream" => {
            let args = format!("{{\"command\":\"echo ok\",\"Command\":{}}}", json!(COMMAND));
            let (a, b) = args.split_at(20);
            (
                sse,
                chat_stream(
                    &[
                        tool_piece(a),
                        json!({"tool_calls": [{"index": 0, "function": {"arguments": b}}]}),
                    ],
                    "tool_calls",
                ),
            )
        }
        // A function call also carrying a custom tool's member: the SDKs read the member its `type` names.
        "decoy-whole" => {
            let mut message = tool_message(json!(args_with("")));
            message["tool_calls"][0]["custom"] = json!({"name": "notes", "input": "hi"});
            (whole, completion(message, "tool_calls"))
        }
        "decoy-stream" => {
            let mut piece = tool_piece(&args_with(""));
            piece["tool_calls"][0]["custom"] = json!({"name": "notes", "input": "hi"});
            (sse, chat_stream(&[piece], "tool_calls"))
        }
        // The arguments encoded twice: a JSON string holding the object (an agent that decodes until it has an
        // object runs it; the function tools' arguments are always an object).
        "string-args-whole" => (
            whole,
            completion(
                tool_message(json!(json!(args_with("")).to_string())),
                "tool_calls",
            ),
        ),
        // A call whose type changes between pieces: the SDKs keep the last type and read the member it names,
        // joined over every piece (`shell` with the curl input), not the function pieces before it.
        "retyped-stream" => (
            sse,
            chat_stream(
                &[
                    json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                        "function": {"name": "read", "arguments": "{}"}}]}),
                    json!({"tool_calls": [{"index": 0, "type": "custom",
                        "custom": {"name": "shell", "input": COMMAND}}]}),
                ],
                "tool_calls",
            ),
        ),
        "dup-whole" => {
            let args = format!("{{\"command\":{},\"command\":\"echo ok\"}}", json!(COMMAND));
            (whole, completion(tool_message(json!(args)), "tool_calls"))
        }
        // The message's own member in other letter case: Go's decoder reads it as `tool_calls`.
        "case-member-whole" => (
            whole,
            completion(
                json!({"role": "assistant", "content": null, "Tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "shell", "arguments": args_with("")}}]}),
                "tool_calls",
            ),
        ),
        "case-member-stream" => (
            sse,
            chat_stream(
                &[
                    json!({"Tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                    "function": {"name": "shell", "arguments": args_with("")}}]}),
                ],
                "tool_calls",
            ),
        ),
        // The SDK's accumulator puts a call's first piece at `min(index, calls so far)` (Python's list.insert), so
        // a piece for index 1 before any for 0 is the first call, and the piece for 0 joins it: `sh` + `ell`.
        "sparse-index-stream" => (
            sse,
            chat_stream(
                &[
                    json!({"tool_calls": [{"index": 1, "id": "call_1", "type": "function",
                        "function": {"name": "sh", "arguments": args_with("")}}]}),
                    json!({"tool_calls": [{"index": 0, "function": {"name": "ell"}}]}),
                ],
                "tool_calls",
            ),
        ),
        // A piece after the choice's finish joins the call of its index, already decided (as `shell` with `{}`).
        "reopened-stream" => {
            let mut s = chunk(json!({"role": "assistant", "content": null}), None);
            s.push_str(&chunk(tool_piece(""), None));
            s.push_str(&chunk(json!({}), Some("tool_calls")));
            s.push_str(&chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": args_with("")}}]}),
                None,
            ));
            s.push_str(&chunk(json!({}), Some("tool_calls")));
            s.push_str("data: [DONE]\n\n");
            (sse, s)
        }
        // A choice's `index` as a string: JavaScript's accumulator files its pieces under choice 1, Go's decoder
        // fails; read as 0 its piece would join choice 0's call (`shell` + `shell`, a tool no rule names) and pass.
        "choice-index-stream" => {
            let chunk_of = |index: Value, delta: Value, finish: Value| {
                let c = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                    "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}]});
                format!("data: {c}\n\n")
            };
            let mut s = chunk_of(json!(0), tool_piece(""), Value::Null);
            s.push_str(&chunk_of(
                json!("1"),
                json!({"tool_calls": [{"index": 0, "id": "call_2", "type": "function",
                    "function": {"name": "shell", "arguments": args_with("")}}]}),
                Value::Null,
            ));
            s.push_str(&chunk_of(json!(0), json!({}), json!("tool_calls")));
            s.push_str(&chunk_of(json!("1"), json!({}), json!("tool_calls")));
            s.push_str("data: [DONE]\n\n");
            (sse, s)
        }
        // A Responses arguments delta naming its item by an `output_index` written as a string: JavaScript's
        // accumulator adds it to the item at 0, the call decided with the `{}` its `done` events carry.
        "responses-index-stream" => {
            let item = shell_item;
            let events = [
                json!({"type": "response.output_item.added", "output_index": 0, "item": item("", "in_progress")}),
                json!({"type": "response.function_call_arguments.delta", "output_index": "0",
                    "delta": args_with("")}),
                json!({"type": "response.function_call_arguments.done", "item_id": "fc_1", "output_index": 0,
                    "arguments": "{}"}),
                json!({"type": "response.output_item.done", "output_index": 0, "item": item("{}", "completed")}),
            ];
            (sse, responses_sse(events.map(|e| (None, e)), 0))
        }
        // A piece of the arguments between two others (`cu` + `X` + `rl …`) in an event named `thread.…`: the openai
        // SDKs hand it on as an Assistants event, which their accumulators never apply.
        "thread-named-stream" => {
            let args = args_with("");
            let (a, b) = args.split_at(args.find("curl").unwrap() + 2);
            let piece =
                |args: &str| json!({"tool_calls": [{"index": 0, "function": {"arguments": args}}]});
            let mut s = chunk(tool_piece(a), None);
            s.push_str(&format!(
                "event: thread.message.delta\n{}",
                chunk(piece("X"), None)
            ));
            s.push_str(&chunk(piece(b), None));
            s.push_str(&chunk(json!({}), Some("tool_calls")));
            s.push_str("data: [DONE]\n\n");
            (sse, s)
        }
        "responses-thread-named-stream" | "responses-renamed-stream" => {
            let args = args_with("");
            let (a, b) = args.split_at(args.find("curl").unwrap() + 2);
            let joined = format!("{a}X{b}");
            let item = shell_item;
            let delta = |piece: &str| {
                json!({"type": "response.function_call_arguments.delta", "item_id": "fc_1",
                    "output_index": 0, "delta": piece})
            };
            let other = if case == "responses-thread-named-stream" {
                "thread.run.step.delta"
            } else {
                "response.output_text.delta"
            };
            let events = [
                (
                    None,
                    json!({"type": "response.output_item.added", "output_index": 0, "item": item("", "in_progress")}),
                ),
                (None, delta(a)),
                (Some(other), delta("X")),
                (None, delta(b)),
                (
                    None,
                    json!({"type": "response.function_call_arguments.done", "item_id": "fc_1",
                    "output_index": 0, "arguments": joined}),
                ),
                (
                    None,
                    json!({"type": "response.output_item.done", "output_index": 0,
                    "item": item(&joined, "completed")}),
                ),
            ];
            (sse, responses_sse(events, 0))
        }
        // Output items the agent acts on besides function calls: a patch to a file, an action on its screen; and an
        // item of a type the reader does not know.
        "responses-apply-patch-whole" | "responses-computer-whole" | "responses-program-whole" => {
            let item = match case {
                "responses-apply-patch-whole" => json!({"type": "apply_patch_call", "id": "apc_1",
                    "call_id": "call_1", "status": "completed", "operation": {"type": "update_file",
                    "path": "/home/user/.bashrc", "diff": format!("@@\n+{COMMAND}\n")}}),
                "responses-computer-whole" => json!({"type": "computer_call", "id": "cc_1",
                    "call_id": "call_1", "status": "completed", "pending_safety_checks": [],
                    "action": {"type": "type", "text": format!("{COMMAND}\n")}}),
                _ => json!({"type": "program", "id": "pg_1", "call_id": "call_1",
                    "code": format!("run({})", json!(COMMAND)), "fingerprint": "f"}),
            };
            let doc = json!({"id": "resp_1", "object": "response", "status": "completed", "model": "m",
                "output": [item]});
            (whole, doc.to_string())
        }
        "responses-computer-stream" => {
            let item = |status: &str| {
                json!({"type": "computer_call", "id": "cc_1", "call_id": "call_1", "status": status,
                    "pending_safety_checks": [], "actions": [{"type": "type", "text": COMMAND}]})
            };
            let events = [
                json!({"type": "response.output_item.added", "output_index": 0, "item": item("in_progress")}),
                json!({"type": "response.output_item.done", "output_index": 0, "item": item("completed")}),
            ];
            (sse, responses_sse(events.map(|e| (None, e)), 0))
        }
        // Answers fetched again (`GET /v1/responses/{id}`, whole or streamed; its `/cancel`; a stored completion):
        // the object a create returns, with the call the agent runs.
        "retrieve-responses-whole" => {
            let item = shell_item(&args_with(""), "completed");
            let doc = json!({"id": "resp_1", "object": "response", "status": "completed", "model": "m",
                "background": true, "output": [item]});
            (whole, doc.to_string())
        }
        "retrieve-responses-stream" => {
            let args = args_with("");
            let item = shell_item;
            let events = [
                json!({"type": "response.output_item.added", "output_index": 0, "item": item("", "in_progress")}),
                json!({"type": "response.function_call_arguments.delta", "item_id": "fc_1", "output_index": 0,
                    "delta": args}),
                json!({"type": "response.function_call_arguments.done", "item_id": "fc_1", "output_index": 0,
                    "arguments": args}),
                json!({"type": "response.output_item.done", "output_index": 0, "item": item(&args, "completed")}),
            ];
            (sse, responses_sse(events.map(|e| (None, e)), 1))
        }
        "retrieve-chat-whole" => (
            whole,
            completion(tool_message(json!(args_with(""))), "tool_calls"),
        ),
        // A completion under a redirect status with no `Location` (or one no client follows, `300`): Go's
        // net/http hands it back as it came, and go-openai decodes any status below 400 as the answer.
        // A redirect every client follows (Go's net/http too): its page is nobody's answer, and passes as it came.
        "moved-307-located" => ("text/html", REDIRECT_PAGE.to_string()),
        "moved-300-whole" | "moved-302-stream" => {
            if case.ends_with("-stream") {
                (
                    sse,
                    chat_stream(&[tool_piece(&args_with(""))], "tool_calls"),
                )
            } else {
                (
                    whole,
                    completion(tool_message(json!(args_with(""))), "tool_calls"),
                )
            }
        }
        // The same twin names in a Responses call's arguments (whole) and an Anthropic tool input (streamed).
        "responses-twin-whole" => {
            let args = format!("{{\"command\":\"echo ok\",\"Command\":{}}}", json!(COMMAND));
            let item = json!({"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "shell",
                "arguments": args, "status": "completed"});
            let doc = json!({"id": "resp_1", "object": "response", "status": "completed", "model": "m",
                "output": [item]});
            (whole, doc.to_string())
        }
        "messages-twin-stream" => {
            let args = format!("{{\"command\":\"echo ok\",\"Command\":{}}}", json!(COMMAND));
            (sse, messages_stream(&[], &[named(input_piece(0, &args))]))
        }
        // A piece of the input between two others (`cu` + `X` + `rl …`) in an event the SDKs skip or apply
        // otherwise than this reader would join it: unnamed (anthropic-python skips it), named `ping` (every SDK
        // skips it), under a name only Python's SDK reads, a `text_delta` or `thinking_delta` carrying
        // `partial_json` (applied as text, if at all), or a piece naming the text block before (anthropic-sdk-go
        // applies it to the last block started, the tool's).
        "messages-unnamed-stream"
        | "messages-ping-stream"
        | "messages-unknown-name-stream"
        | "messages-text-delta-stream"
        | "messages-thinking-delta-stream"
        | "messages-other-block-stream" => {
            let args = args_with("");
            let (a, b) = args.split_at(args.find("curl").unwrap() + 2);
            let mut x = input_piece(1, "X");
            let middle = match case {
                "messages-unnamed-stream" => (None, x),
                "messages-ping-stream" => (Some("ping".to_string()), x),
                "messages-unknown-name-stream" => (Some("content_block_piece".to_string()), x),
                "messages-text-delta-stream" => {
                    x["delta"] = json!({"type": "text_delta", "text": "", "partial_json": "X"});
                    named(x)
                }
                "messages-thinking-delta-stream" => {
                    x["delta"] =
                        json!({"type": "thinking_delta", "thinking": "", "partial_json": "X"});
                    named(x)
                }
                _ => {
                    x["index"] = json!(0);
                    named(x)
                }
            };
            let text = [
                named(json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}})),
                named(json!({"type": "content_block_stop", "index": 0})),
            ];
            let pieces = [named(input_piece(1, a)), middle, named(input_piece(1, b))];
            (sse, messages_stream(&text, &pieces))
        }
        // Pieces after a start whose `input` is not `{}`: anthropic-python reads the pieces alone, anthropic-sdk-go
        // the start's input with the pieces appended.
        "messages-start-input-stream" => {
            let mut events = messages_stream(&[], &[named(input_piece(0, "{}"))]);
            events = events.replacen(
                "\"input\":{}",
                &format!("\"input\":{}", json!({"command": COMMAND})),
                1,
            );
            (sse, events)
        }
        // What an ordinary stream carries besides a call: `ping` events, a thinking block (thinking and signature
        // deltas), a text block; the call's input in pieces, a `ping` between them.
        "messages-ordinary-stream" => {
            let ping = named(json!({"type": "ping"}));
            let block = |index: u64, block: Value, delta: Value| {
                [
                    named(
                        json!({"type": "content_block_start", "index": index, "content_block": block}),
                    ),
                    named(json!({"type": "content_block_delta", "index": index, "delta": delta})),
                    named(json!({"type": "content_block_stop", "index": index})),
                ]
            };
            let mut before = vec![ping.clone()];
            before.extend(block(
                0,
                json!({"type": "thinking", "thinking": "", "signature": ""}),
                json!({"type": "thinking_delta", "thinking": "Let me see."}),
            ));
            before.insert(
                3,
                named(json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "signature_delta", "signature": "c2ln"}})),
            );
            before.push(ping.clone());
            before.extend(block(
                1,
                json!({"type": "text", "text": ""}),
                json!({"type": "text_delta", "text": "Running it."}),
            ));
            let args = args_with("");
            let (a, b) = args.split_at(args.find("curl").unwrap() + 2);
            let pieces = [named(input_piece(2, a)), ping, named(input_piece(2, b))];
            (sse, messages_stream(&before, &pieces))
        }
        _ => ("text/plain", "unknown case".into()),
    }
}

/// A Responses `function_call` item calling `shell` with `args`.
fn shell_item(args: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "shell",
        "arguments": args, "status": status})
}

/// Responses events as server-sent events, their `sequence_number`s from `first`, each named by its own `type`
/// unless it comes with another name.
fn responses_sse<'a>(
    events: impl IntoIterator<Item = (Option<&'a str>, Value)>,
    first: usize,
) -> String {
    events
        .into_iter()
        .enumerate()
        .map(|(i, (name, mut e))| {
            e["sequence_number"] = json!(first + i);
            let name = name.map_or_else(|| e["type"].as_str().unwrap().to_string(), str::to_string);
            format!("event: {name}\ndata: {e}\n\n")
        })
        .collect()
}

/// An Anthropic event named by its own `type`, as the API writes it.
fn named(v: Value) -> (Option<String>, Value) {
    (v["type"].as_str().map(str::to_string), v)
}

/// A piece of the input of the tool block at `index`.
fn input_piece(index: u64, json: &str) -> Value {
    json!({"type": "content_block_delta", "index": index,
        "delta": {"type": "input_json_delta", "partial_json": json}})
}

/// An Anthropic Messages stream: `before` (whole blocks), then a `shell` tool block at the next index built by
/// `pieces`, then its stop and the end of the message.
fn messages_stream(
    before: &[(Option<String>, Value)],
    pieces: &[(Option<String>, Value)],
) -> String {
    let tool = before
        .iter()
        .filter(|(_, v)| v["type"] == "content_block_start")
        .count();
    let mut all = vec![named(
        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant",
            "model": "m", "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 1, "output_tokens": 1}}}),
    )];
    all.extend_from_slice(before);
    all.push(named(json!({"type": "content_block_start", "index": tool,
        "content_block": {"type": "tool_use", "id": "toolu_1", "name": "shell", "input": {}}})));
    all.extend_from_slice(pieces);
    all.extend([
        named(json!({"type": "content_block_stop", "index": tool})),
        named(json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
            "usage": {"output_tokens": 5}})),
        named(json!({"type": "message_stop"})),
    ]);
    all.iter()
        .map(|(name, v)| match name {
            Some(name) => format!("event: {name}\ndata: {v}\n\n"),
            None => format!("data: {v}\n\n"),
        })
        .collect()
}

/// A Gemini answer for a case (the model in the path).
fn gemini(case: &str) -> (&'static str, String) {
    let doc = |parts: Value| json!({"candidates": [{"index": 0, "finishReason": "STOP", "content": {"role": "model", "parts": parts}}]});
    match case {
        // The call's name in other letter case: Go's genai reads it as the name.
        "gemini-name-case" => (
            "application/json",
            doc(json!([{"functionCall": {"Name": "shell", "args": {"command": COMMAND}}}])).to_string(),
        ),
        "gemini-twin-args" => (
            "application/json",
            format!(
                "{{\"candidates\":[{{\"content\":{{\"role\":\"model\",\"parts\":[{{\"functionCall\":{{\"name\":\"shell\",\"args\":{{\"command\":\"echo ok\",\"COMMAND\":{}}}}}}}]}}}}]}}",
                json!(COMMAND)
            ),
        ),
        // Both spellings of the part's call: each reader takes the one it prefers.
        "gemini-both" => (
            "application/json",
            doc(json!([{"functionCall": {"name": "read", "args": {}},
                "function_call": {"name": "shell", "args": {"command": COMMAND}}}]))
            .to_string(),
        ),
        // A call in the second candidate of a streamed chunk, and in a JSON array (no `alt=sse`).
        "gemini-second-candidate" => {
            let chunk = json!({"candidates": [
                {"index": 0, "content": {"role": "model", "parts": [{"text": "hi"}]}},
                {"index": 1, "content": {"role": "model", "parts": [{"functionCall": {"name": "shell",
                    "args": {"command": COMMAND}}}]}}]});
            ("text/event-stream", format!("data: {chunk}\n\n"))
        }
        "gemini-call" => (
            "application/json",
            doc(json!([{"functionCall": {"name": "shell", "args": {"command": COMMAND}}}])).to_string(),
        ),
        "gemini-array" => {
            let chunk = doc(json!([{"functionCall": {"name": "shell", "args": {"command": COMMAND}}}]));
            ("application/json", json!([doc(json!([{"text": "hi"}])), chunk]).to_string())
        }
        // Each body labelled as the other: read as neither, never passed on unread.
        "gemini-array-as-events" => {
            let chunk = doc(json!([{"functionCall": {"name": "shell", "args": {"command": COMMAND}}}]));
            ("text/event-stream", json!([chunk]).to_string())
        }
        "gemini-events-as-json" => {
            let chunk = doc(json!([{"functionCall": {"name": "shell", "args": {"command": COMMAND}}}]));
            ("application/json", format!("data: {chunk}\n\n"))
        }
        _ => ("text/plain", "unknown case".into()),
    }
}

/// The case an answer fetched again names by its id: `/v1/responses/{case}` (and its `/cancel`),
/// `/v1/chat/completions/{case}`.
fn retrieved_case(path: &str) -> Option<&str> {
    let rest = path
        .strip_prefix("/v1/responses/")
        .or_else(|| path.strip_prefix("/v1/chat/completions/"))?;
    Some(rest.strip_suffix("/cancel").unwrap_or(rest))
}

async fn answer(req: Request<Incoming>) -> Response<TestBody> {
    let path = req.uri().path().to_string();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    // A Gemini path in any letter case (the proxy reads it so; the model names the case, in lower case).
    let gemini_prefix = "/v1beta/models/";
    let (case, (content_type, body)) = if path
        .get(..gemini_prefix.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(gemini_prefix))
    {
        let rest = &path[gemini_prefix.len()..];
        (
            String::new(),
            gemini(
                &rest
                    .split([':', '/', '\\', ';', '%'])
                    .next()
                    .unwrap_or_default()
                    .to_ascii_lowercase(),
            ),
        )
    } else if let Some(case) = retrieved_case(&path) {
        (case.to_string(), canned(case))
    } else {
        let req: Value = serde_json::from_slice(&body).unwrap();
        let case = req["model"].as_str().unwrap_or_default().to_string();
        let answer = canned(&case);
        (case, answer)
    };
    // `moved-<status>-…`: answered with that status; `…-located` with a `Location` too.
    let status = case
        .strip_prefix("moved-")
        .and_then(|c| c.get(..3)?.parse().ok())
        .unwrap_or(200);
    let mut resp = Response::builder()
        .status(status)
        .header("content-type", content_type);
    if case.ends_with("-located") {
        resp = resp.header("location", "https://api.openai.com/v1/elsewhere");
    }
    resp.body(Full::new(Bytes::from(body)).boxed()).unwrap()
}

struct World {
    proxy: Proxy,
    openai: SocketAddr,
    gemini: SocketAddr,
}

async fn world() -> World {
    world_with(NO_CURL_POLICY).await
}

async fn world_with(policy: &str) -> World {
    let ca = TestCa::new("answer shapes test CA");
    let proxy = start_proxy(policy, &[&ca], false).await;
    let openai = answering_upstream(&ca, &["api.openai.com", "api.anthropic.com"], answer).await;
    let gemini = answering_upstream(&ca, &["generativelanguage.googleapis.com"], answer).await;
    World {
        proxy,
        openai,
        gemini,
    }
}

/// One request through the proxy: status and body as the agent got them, and the exchange's records after the
/// request's.
async fn exchange(w: &World, host: &str, path: &str, body: Value) -> (u16, String, Vec<Value>) {
    exchange_as(w, "POST", host, path, Some(body)).await
}

/// [`exchange`] with `method`, and no body when `body` is `None`.
async fn exchange_as(
    w: &World,
    method: &str,
    host: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, String, Vec<Value>) {
    let before = w.proxy.audit_records().await.len();
    let up = if host.starts_with("api.") {
        w.openai
    } else {
        w.gemini
    };
    let tls = w.proxy.tls_to(up, host, &[b"http/1.1"]).await;
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let req = req.body(Full::new(body)).unwrap();
    let (status, _, body) = send(tls, false, req).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let recs = w.proxy.audit_records().await;
    (
        status,
        String::from_utf8_lossy(&body).into_owned(),
        recs[before + 1..].to_vec(),
    )
}

async fn chat(w: &World, case: &str) -> (u16, String, Vec<Value>) {
    let stream = case.ends_with("-stream");
    let body =
        json!({"model": case, "stream": stream, "messages": [{"role": "user", "content": "hi"}]});
    let (host, path) = match case.split('-').next() {
        Some("responses") => ("api.openai.com", "/v1/responses"),
        Some("messages") => ("api.anthropic.com", "/v1/messages"),
        _ => ("api.openai.com", "/v1/chat/completions"),
    };
    exchange(w, host, path, body).await
}

async fn ask_gemini(w: &World, case: &str) -> (u16, String, Vec<Value>) {
    let method = if case == "gemini-second-candidate" {
        "streamGenerateContent?alt=sse"
    } else if case == "gemini-array" {
        "streamGenerateContent"
    } else {
        "generateContent"
    };
    let body = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]});
    let path = format!("/v1beta/models/{case}:{method}");
    exchange(w, "generativelanguage.googleapis.com", &path, body).await
}

/// One record: the proposal's, blocked, for `reason` (`rule` for the `no-curl` rule; another rule by its id).
fn assert_refused(case: &str, recs: &[Value], reason: &str) {
    assert_eq!(recs.len(), 1, "{case}: {recs:#?}");
    let r = &recs[0];
    assert_eq!(r["request"]["phase"], "proposal", "{case}: {r}");
    assert_eq!(r["outcome"]["disposition"], "blocked", "{case}: {r}");
    // Every record of the answer names the call it answers, refused by a rule or as unreadable alike (an answer
    // fetched again answers no call: none, as its request's record).
    let provider = match case.split('-').next() {
        _ if case.contains("/retrieve-") => Value::Null,
        Some("messages") => "anthropic".into(),
        Some("gemini") => "gemini".into(),
        _ => "openai".into(),
    };
    assert_eq!(r["request"]["llm_provider"], provider, "{case}: {r}");
    match reason {
        "rule" => assert_eq!(r["decision"]["rule"], "no-curl", "{case}: {r}"),
        "unparseable" => assert_eq!(r["decision"]["reason"], reason, "{case}: {r}"),
        rule => assert_eq!(r["decision"]["rule"], rule, "{case}: {r}"),
    }
}

/// The legacy `function_call` (the `functions` parameter) is a tool call the SDKs assemble: decided as one.
#[tokio::test]
async fn a_legacy_function_call_is_decided_whole_and_streamed() {
    let w = world().await;
    for case in ["legacy-whole", "legacy-stream"] {
        let answer = chat(&w, case).await;
        assert!(
            !answer.1.contains("\"function_call\""),
            "{case}: {}",
            answer.1
        );
        assert_refused_by_rule(case, 200, answer);
    }
    assert!(w.proxy.close_and_verify().await > 0);
}

/// Arguments the agent's parser reads otherwise than the reader's (or not text at all) are not decided on a
/// reading the agent does not share: the call is refused, the rest of the answer intact.
#[tokio::test]
async fn arguments_read_otherwise_by_the_agent_refuse_the_call() {
    let w = world().await;
    for case in [
        "nan-whole",
        "nan-stream",
        "surrogate-whole",
        "object-whole",
        "twin-whole",
        "twin-stream",
        "dup-whole",
        "string-args-whole",
        "decoy-whole",
        "decoy-stream",
        "retyped-stream",
        "responses-twin-whole",
        "messages-twin-stream",
    ] {
        let (status, body, recs) = chat(&w, case).await;
        assert_eq!(status, 200, "{case}: {body}");
        assert!(
            !body.contains("evil.example"),
            "{case}: the call reached the agent: {body}"
        );
        // The refusal names the tool as this reader joined it (`readshell` for the retyped call).
        assert!(
            body.contains("refused the tool call `") && body.contains("shell`"),
            "{case}: {body}"
        );
        assert_refused(case, &recs, "unparseable");
    }
    assert!(w.proxy.close_and_verify().await > 0);
}

/// An answer whose own members another reader matches otherwise (a provider's name in other letter case, twin
/// names, a streamed call piece whose index the SDK's accumulator files under another call, a choice's or an
/// output item's place that is not a non-negative integer) is refused whole; a Gemini part with both spellings of
/// its call has that call refused.
#[tokio::test]
async fn answer_members_read_otherwise_refuse_the_answer() {
    let w = world().await;
    let mut answers = Vec::new();
    for case in [
        "case-member-whole",
        "case-member-stream",
        "sparse-index-stream",
        "reopened-stream",
        "choice-index-stream",
        "responses-index-stream",
        "messages-unnamed-stream",
        "messages-ping-stream",
        "messages-unknown-name-stream",
        "messages-text-delta-stream",
        "messages-thinking-delta-stream",
        "messages-other-block-stream",
        "messages-start-input-stream",
        "thread-named-stream",
        "responses-thread-named-stream",
        "responses-renamed-stream",
    ] {
        answers.push((case, chat(&w, case).await));
    }
    for case in ["gemini-name-case", "gemini-twin-args", "gemini-both"] {
        answers.push((case, ask_gemini(&w, case).await));
    }
    for (case, (status, body, recs)) in &answers {
        assert!(
            !body.contains("evil.example"),
            "{case}: the call reached the agent: {status} {body}"
        );
        match *case {
            // The part's call alone is refused (two readings of one call).
            "gemini-both" => assert!(body.contains("refused the tool call"), "{case}: {body}"),
            c if c.ends_with("-stream") => {}
            _ => assert_eq!(*status, 502, "{case}: {body}"),
        }
        assert_refused(case, recs, "unparseable");
    }
    assert!(w.proxy.close_and_verify().await > 0);
}

/// A completion under a `3xx` status is read for its calls as one under `2xx` is: the SDKs that follow redirects
/// never see one, but Go's net/http returns a `300` (and any redirect without a `Location`) as it came, and go-openai
/// decodes every status below 400 as the answer (`isFailureStatusCode`). The call is decided; the status passes.
#[tokio::test]
async fn an_answer_under_a_redirect_status_is_decided() {
    let w = world().await;
    for (case, code) in [("moved-300-whole", 300), ("moved-302-stream", 302)] {
        assert_refused_by_rule(case, code, chat(&w, case).await);
    }
    // A redirect with a `Location` is followed by every client: its page is not read, and not refused as unreadable.
    let (status, body, recs) = chat(&w, "moved-307-located").await;
    assert_eq!((status, body.as_str()), (307, REDIRECT_PAGE));
    assert!(recs.is_empty(), "{recs:#?}");
    assert!(w.proxy.close_and_verify().await > 0);
}

/// The answer to `case` came with status `code` and the call refused by the rule in its place: the agent got the
/// refusal text, never the call, and the exchange left one record of the refusal.
fn assert_refused_by_rule(case: &str, code: u16, answer: (u16, String, Vec<Value>)) {
    assert_refused_as(case, code, answer, "shell", "rule");
}

/// The answer to `case` came with status `code` and the call of `tool` refused in its place for `reason` (as
/// [`assert_refused`] reads it).
fn assert_refused_as(
    case: &str,
    code: u16,
    (status, body, recs): (u16, String, Vec<Value>),
    tool: &str,
    reason: &str,
) {
    assert_eq!(status, code, "{case}: {body}");
    assert!(
        !body.contains("evil.example"),
        "{case}: the call reached the agent: {body}"
    );
    assert!(
        body.contains(&format!("refused the tool call `{tool}`")),
        "{case}: {body}"
    );
    assert_refused(case, &recs, reason);
}

/// Gemini calls in a later candidate of a streamed chunk and in a JSON-array stream are decided.
#[tokio::test]
async fn gemini_calls_in_any_candidate_and_either_stream_are_decided() {
    let w = world().await;
    for case in ["gemini-second-candidate", "gemini-array"] {
        assert_refused_by_rule(case, 200, ask_gemini(&w, case).await);
    }
    assert!(w.proxy.close_and_verify().await > 0);
}

/// Gemini's `alt` system parameter (also `$alt`, `%24alt`) asking for events in any letter case (`alt=SSE`): the answer
/// is read as what its body is, events or JSON, whatever the query said, so its call is refused in its place; a body
/// that is not what its label says (a JSON array labelled `text/event-stream`, events labelled JSON) is refused as
/// unreadable, never passed on.
#[tokio::test]
async fn gemini_answers_are_read_as_their_bodies_are_whatever_alt_says() {
    let w = world().await;
    let body = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]});
    let models = "/v1beta/models";
    for path in [
        "gemini-second-candidate:streamGenerateContent?alt=SSE",
        "gemini-second-candidate:streamGenerateContent?$alt=sse",
        "gemini-second-candidate:streamGenerateContent?%24alt=Sse",
        "gemini-second-candidate:generateContent?alt=SSE",
        "gemini-array:streamGenerateContent?alt=SSE",
        "gemini-call:generateContent?alt=SSE",
    ] {
        let host = "generativelanguage.googleapis.com";
        let answer = exchange(&w, host, &format!("{models}/{path}"), body.clone()).await;
        assert_refused_by_rule(path, 200, answer);
    }
    for (path, status) in [
        ("gemini-array-as-events:streamGenerateContent?alt=SSE", 200),
        ("gemini-array-as-events:streamGenerateContent", 200),
        ("gemini-events-as-json:streamGenerateContent?alt=SSE", 502),
        ("gemini-events-as-json:generateContent", 502),
    ] {
        let host = "generativelanguage.googleapis.com";
        let (got, text, recs) = exchange(&w, host, &format!("{models}/{path}"), body.clone()).await;
        assert_eq!(got, status, "{path}: {text}");
        assert!(!text.contains("evil.example"), "{path}: {text}");
        // The stream ends with the provider's error event; the whole answer is the enforcer's refusal.
        assert!(
            text.contains("could not be read for its tool calls"),
            "{path}: {text}"
        );
        assert_refused(path, &recs, "unparseable");
    }
    assert!(w.proxy.close_and_verify().await > 0);
}

/// A Gemini path spelt in other letter case, or with a tail a lenient server drops, is a Gemini call as the other
/// providers' paths are: its request is recorded as the call it is (the model as the path spells it), and the blocked
/// call in its answer is refused in its place. Before, such a path was plain HTTP and the call reached the agent.
#[tokio::test]
async fn gemini_paths_in_any_letter_case_are_read_and_their_calls_decided() {
    let w = world().await;
    let body = json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]});
    for (path, model) in [
        ("/v1beta/models/gemini-call:GenerateContent", "gemini-call"),
        (
            "/V1BETA/Models/gemini-Array:streamGenerateContent",
            "gemini-Array",
        ),
        (
            "/v1beta/MODELS/gemini-call:GENERATECONTENT%20",
            "gemini-call",
        ),
        // Found by a black-box attack: a slash or backslash after the model, a `;parameter` before the method, a
        // query sent percent-encoded after it — spellings a lenient server routes — were plain HTTP.
        ("/v1beta/models/gemini-call/:generateContent", "gemini-call"),
        (
            "/v1beta/models/gemini-call%5C:generateContent",
            "gemini-call",
        ),
        (
            "/v1beta/models/gemini-call;foo:generateContent",
            "gemini-call",
        ),
        (
            "/v1beta/models/gemini-call%3Bfoo:generateContent",
            "gemini-call",
        ),
        (
            "/v1beta/models/gemini-call:generateContent%3Fx",
            "gemini-call",
        ),
    ] {
        let before = w.proxy.audit_records().await.len();
        let answer = exchange(&w, "generativelanguage.googleapis.com", path, body.clone()).await;
        let recs = w.proxy.audit_records().await;
        let request = &recs[before];
        assert_eq!(
            request["request"]["llm_provider"], "gemini",
            "{path}: {request}"
        );
        assert_eq!(request["request"]["llm_model"], model, "{path}: {request}");
        assert_eq!(request["request"]["path"], path, "{path}: {request}");
        assert_eq!(
            request["outcome"]["disposition"], "forwarded",
            "{path}: {request}"
        );
        assert_refused_by_rule(model, 200, answer);
    }
    assert!(w.proxy.close_and_verify().await > 0);
}

/// An ordinary Anthropic stream (`ping` events, thinking with its signature, text, a call's input in pieces with a
/// `ping` between them) is read as the SDKs read it: everything but the call passes as it came, the call is decided.
#[tokio::test]
async fn an_ordinary_anthropic_stream_is_read_and_its_call_decided() {
    let w = world().await;
    let case = "messages-ordinary-stream";
    let (status, body, recs) = chat(&w, case).await;
    for kept in ["\"type\":\"ping\"", "Let me see.", "c2ln", "Running it."] {
        assert!(body.contains(kept), "{case}: {kept} missing: {body}");
    }
    assert_refused_by_rule(case, 200, (status, body, recs));
    assert!(w.proxy.close_and_verify().await > 0);
}

/// A policy refusing the calls that patch files or act on the agent's screen.
const NO_PATCH_POLICY: &str = r#"version: 1
default: allow
rules:
  - id: no-patch-or-screen
    phase: proposal
    when: { proposal.tool: [apply_patch, "computer*"], proposal.kind: [apply_patch, computer] }
    verdict: block
    message: no patches or screen actions
"#;

/// Responses items the agent acts on besides function calls — an `apply_patch_call` (a file created, deleted or
/// patched), a `computer_call` (a click, keys, text typed; one `action` or batched `actions`) — are proposals of
/// their own kind and tool (`apply_patch`, `computer_use`), decided on their operation or actions; an item of a type
/// the reader does not know is refused as unreadable. None reaches the agent past a rule naming it.
#[tokio::test]
async fn responses_patches_screen_actions_and_unknown_items_are_proposals() {
    let w = world_with(NO_PATCH_POLICY).await;
    for (case, tool) in [
        ("responses-apply-patch-whole", "apply_patch"),
        ("responses-computer-whole", "computer_use"),
        ("responses-computer-stream", "computer_use"),
        ("responses-program-whole", "program"),
    ] {
        let reason = if tool == "program" {
            "unparseable"
        } else {
            "no-patch-or-screen"
        };
        assert_refused_as(case, 200, chat(&w, case).await, tool, reason);
    }
    assert!(w.proxy.close_and_verify().await > 0);
}

/// An answer fetched again from an endpoint other than a create — a Responses answer retrieved (whole, or its events
/// again with `stream=true`, as a background response is polled or resumed), cancelled, a stored Chat completion —
/// is the object a create returns, read for its calls the same way: the call is decided before the agent gets it.
#[tokio::test]
async fn answers_fetched_again_are_decided_like_a_create_s() {
    let w = world().await;
    for (method, path) in [
        ("GET", "/v1/responses/retrieve-responses-whole"),
        (
            "GET",
            "/v1/responses/retrieve-responses-stream?stream=true&starting_after=0",
        ),
        ("POST", "/v1/responses/retrieve-responses-whole/cancel"),
        ("GET", "/v1/chat/completions/retrieve-chat-whole"),
    ] {
        let answer = exchange_as(&w, method, "api.openai.com", path, None).await;
        assert_refused_by_rule(path, 200, answer);
    }
    assert!(w.proxy.close_and_verify().await > 0);
}
