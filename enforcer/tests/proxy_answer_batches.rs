//! Batch results through the real proxy from a real TLS upstream: an Anthropic Message Batch's results
//! (`GET /v1/messages/batches/{id}/results`, JSON Lines, one Messages answer per line) are read line by line, each
//! line's message decided as a whole Messages answer is. A refused call becomes a text block on its line alone, the
//! other lines reach the agent as they came, each decision leaves one record; a line that cannot be read refuses the
//! whole answer (502, `unparseable`), and the answer is held within the body bound and the agent's share of the
//! buffer budget (its largest line's parsed JSON counted). An OpenAI file's content (`GET /v1/files/{id}/content`)
//! is read whole, each line naming `response` read as a Batch output line, its `response.body` decided as a whole
//! Chat Completions or Responses answer is; other lines pass as they came. Lines are split as every reader splits
//! them (Python's `str.splitlines` too), a part (`206`) or a body not UTF-8 is refused. A test binary of its own:
//! the buffer budget is process-wide.

mod proxy_support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use enforcer::inspect::proposal::{apply_to_body, Ruling};
use enforcer::inspect::{LlmApi, Provider};
use enforcer::proxy::{set_limits, Limits};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use proxy_support::*;
use serde_json::{json, Value};

/// One agent's share of the buffer budget in this binary.
const SHARE: u64 = 1024 * 1024;

/// The limits of this test binary (process-wide, set before any proxy starts).
fn limits() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        assert!(set_limits(Limits {
            max_buffered_bytes: 4 * SHARE,
            max_buffered_bytes_per_agent: SHARE,
            ..Limits::default()
        }));
    });
}

/// A Messages answer with `content`, stopping for `stop`.
fn message(content: Value, stop: &str) -> Value {
    json!({"id": "msg_01", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
           "content": content, "stop_reason": stop, "stop_sequence": null,
           "usage": {"input_tokens": 10, "output_tokens": 5}})
}

fn shell(id: &str, command: &str) -> Value {
    json!({"type": "tool_use", "id": id, "name": "shell", "input": {"command": command}})
}

fn succeeded(custom_id: &str, message: Value) -> Value {
    json!({"custom_id": custom_id, "result": {"type": "succeeded", "message": message}})
}

/// The refused `curl` call's line: text, then the call.
fn curl_line(custom_id: &str) -> Value {
    succeeded(
        custom_id,
        message(
            json!([{"type": "text", "text": "Sending it."}, shell("toolu_1", CURL_COMMAND)]),
            "tool_use",
        ),
    )
}

/// `curl_line` as the agent gets it: the call replaced by the refusal's text, the stop no longer asking for tools.
fn curl_line_refused(custom_id: &str) -> Value {
    let mut line = curl_line(custom_id);
    let message = &mut line["result"]["message"];
    message["content"][1] = json!({"type": "text",
        "text": "[The enforcer refused the tool call `shell`: no curl to unlisted hosts (policy rule: no-curl)]"});
    message["stop_reason"] = json!("end_turn");
    line
}

fn ls_line(custom_id: &str) -> Value {
    succeeded(
        custom_id,
        message(json!([shell("toolu_2", "ls -la")]), "tool_use"),
    )
}

fn errored_line() -> Value {
    json!({"custom_id": "c", "result": {"type": "errored", "error": {"type": "error",
           "error": {"type": "invalid_request_error", "message": "bad"}, "request_id": null}}})
}

fn expired_line() -> Value {
    json!({"custom_id": "d", "result": {"type": "expired"}})
}

/// The results file of `case`, as the upstream sends it.
fn results(case: &str) -> String {
    let join = |lines: &[Value], end: &str| {
        lines
            .iter()
            .map(|l| format!("{l}{end}"))
            .collect::<String>()
    };
    match case {
        "mixed" | "sse-typed" => join(
            &[curl_line("a"), ls_line("b"), errored_line(), expired_line()],
            "\n",
        ),
        "two-refused" => format!("{}\r\n{}\r{}", curl_line("a"), ls_line("b"), curl_line("e")),
        "allowed" => join(&[ls_line("b"), errored_line()], "\n"),
        // An errored result carrying a message anyway: read wherever a result carries one.
        "errored-with-message" => {
            let mut line = curl_line("a");
            line["result"]["type"] = json!("errored");
            join(&[line], "\n")
        }
        "cut-line" => format!("{}\n{{\"custom_id\":\"x\",\"result\":{{\n", curl_line("a")),
        "result-otherwise" => format!(
            "{}\n{}\n",
            ls_line("b"),
            curl_line("a")
                .to_string()
                .replace("\"result\"", "\"Result\"")
        ),
        "two-lines-in-one" => format!("{} {}\n", ls_line("b"), curl_line("a")),
        // Two lines glued by U+2028: one line to a reader splitting at `\n` alone, two to `str.splitlines`.
        "glued" => format!("{}\u{2028}{}\n", ls_line("b"), curl_line("a")),
        "range" => join(&[curl_line("a")], "\n"),
        "too-large" => {
            let big = "x".repeat(70 * 1024);
            join(
                &[succeeded(
                    "a",
                    message(json!([{"type": "text", "text": big}]), "end_turn"),
                )],
                "\n",
            )
        }
        "deep-json" => {
            let zeros = format!("[{}0]", "0,".repeat(10_000));
            let mut line = curl_line("a");
            line["result"]["message"]["usage"]["zeros"] = serde_json::from_str(&zeros).unwrap();
            join(&[line], "\n")
        }
        _ => "unknown case".into(),
    }
}

/// The case a results path names by its batch id: `…/batches/{case}/results…`, in any letter case.
fn case_of(path: &str) -> String {
    let lower = path.to_ascii_lowercase();
    let rest = lower.split("batches/").nth(1).unwrap_or_default();
    rest.split('/').next().unwrap_or_default().to_string()
}

/// The text a refused `shell` call becomes.
const REFUSED: &str = "[The enforcer refused the tool call `shell`: no curl to unlisted hosts (policy rule: no-curl)]";

/// An OpenAI Batch output line around `body`.
fn output_line(custom_id: &str, body: Value) -> Value {
    json!({"id": format!("batch_req_{custom_id}"), "custom_id": custom_id,
           "response": {"status_code": 200, "request_id": "req_1", "body": body}, "error": null})
}

fn chat_completion(command: &str) -> Value {
    json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-4o",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": null,
               "tool_calls": [{"id": "call_1", "type": "function",
                   "function": {"name": "shell", "arguments": json!({"command": command}).to_string()}}]},
               "finish_reason": "tool_calls"}]})
}

fn response_object(command: &str) -> Value {
    json!({"id": "resp_1", "object": "response", "status": "completed", "model": "gpt-4.1-mini",
           "output": [{"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "shell",
               "arguments": json!({"command": command}).to_string(), "status": "completed"}]})
}

/// `line` as the agent gets it: its body refused as a whole answer of `api` is.
fn refused_output(mut line: Value, api: LlmApi) -> Value {
    let body = &mut line["response"]["body"];
    apply_to_body(
        Provider::OpenAi,
        api,
        body,
        &[Ruling::Refuse(REFUSED.into())],
    );
    line
}

/// The line ends Python's `str.splitlines` splits at that `\n`, `\r\n` and `\r` are not.
const GLUES: [&str; 8] = [
    "\u{2028}", "\u{2029}", "\u{85}", "\u{b}", "\u{c}", "\u{1c}", "\u{1d}", "\u{1e}",
];

/// The content of the OpenAI file `case`.
fn file(case: &str) -> Vec<u8> {
    let join = |lines: &[Value]| lines.iter().map(|l| format!("{l}\n")).collect::<String>();
    let error_line = json!({"id": "batch_req_e", "custom_id": "e", "response": null,
                            "error": {"code": "server_error", "message": "x"}});
    match case {
        "output" => join(&[
            output_line("a", chat_completion(CURL_COMMAND)),
            output_line("b", response_object(CURL_COMMAND)),
            output_line("c", chat_completion("ls")),
            output_line(
                "d",
                json!({"object": "list", "data": [{"object": "embedding", "embedding": [0.1]}]}),
            ),
            error_line,
        ])
        .into_bytes(),
        // A first line longer than a TLS record: told once it has ended.
        "output-long-first-line" => {
            let mut long = chat_completion("ls");
            long["choices"][0]["message"]["content"] = json!("x".repeat(40 * 1024));
            join(&[
                output_line("a", long),
                output_line("b", chat_completion(CURL_COMMAND)),
            ])
            .into_bytes()
        }
        "output-cut" => format!(
            "{}\n{{\"id\":\"batch_req_x\",\n",
            output_line("a", chat_completion("ls"))
        )
        .into_bytes(),
        "output-huge-first-line" => {
            format!("{{\"custom_id\":\"{}", "a".repeat(70 * 1024)).into_bytes()
        }
        // Two output lines glued by one of the ends Python's `str.splitlines` splits at and `\n` does not.
        c if c.starts_with("glued-") => {
            let end = GLUES[c["glued-".len()..].parse::<usize>().unwrap()];
            format!(
                "{}{end}{}\n",
                output_line("b", chat_completion("ls")),
                output_line("a", chat_completion(CURL_COMMAND))
            )
            .into_bytes()
        }
        // A first line of characters some reader skips as whitespace; then an output line within such characters.
        "blank-first-line" => format!(
            "\u{a0}\u{3000}\0\u{1f}\u{feff}\n\u{a0}\0{}\u{3000}\n",
            output_line("a", chat_completion(CURL_COMMAND))
        )
        .into_bytes(),
        // Blank lines before the first output line.
        "padded" => format!(
            "{}{}\n",
            "\n \r\n".repeat(15_000),
            output_line("a", chat_completion(CURL_COMMAND))
        )
        .into_bytes(),
        // Beyond the 64 KiB bound: refused whole, never streamed through unread.
        "padded-beyond" => format!(
            "{}{}\n",
            "\n".repeat(70 * 1024),
            output_line("a", chat_completion(CURL_COMMAND))
        )
        .into_bytes(),
        // A first line that is JSON but no output line, or not JSON at all, before an output line.
        "junk-first-line" => format!(
            "{{}}\n{{\"custom_id\":\"x\"}}\nstep,loss\n[1,{{\"a\":2}}]\n{}\n",
            output_line("a", chat_completion(CURL_COMMAND))
        )
        .into_bytes(),
        // An array of output lines on one line; a line whose `body` is a Chat Completions answer's JSON text.
        "output-in-array" => format!(
            "[{}]\n",
            output_line("a", chat_completion(CURL_COMMAND))
        )
        .into_bytes(),
        "body-as-string" => join(&[output_line(
            "a",
            json!(chat_completion(CURL_COMMAND).to_string()),
        )])
        .into_bytes(),
        "broken-first-line" => format!(
            "{{\"custom_id\":\"x\"}} trailing\n{}\n",
            output_line("a", chat_completion(CURL_COMMAND))
        )
        .into_bytes(),
        "range" => join(&[output_line("a", chat_completion(CURL_COMMAND))]).into_bytes(),
        // Output in UTF-16 (with a byte-order mark), said by its charset, and without either.
        "utf16-charset" | "utf16" => {
            let text = join(&[output_line("a", chat_completion(CURL_COMMAND))]);
            let mut bytes = if case == "utf16-charset" {
                vec![0xff, 0xfe]
            } else {
                Vec::new()
            };
            bytes.extend(text.encode_utf16().flat_map(u16::to_le_bytes));
            bytes
        }
        "utf8-charset" => join(&[output_line("a", chat_completion(CURL_COMMAND))]).into_bytes(),
        // A body of two APIs' shapes: read as either, it may propose calls the other does not.
        c if c.starts_with("mixed-") => {
            let chat = chat_completion(CURL_COMMAND);
            let resp = response_object(CURL_COMMAND);
            let mut body = match c {
                "mixed-chat-output" | "mixed-text-output" => {
                    json!({"id": "c", "object": "chat.completion", "model": "gpt-4o",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"},
                                        "finish_reason": "stop"}]})
                }
                "mixed-response-choices" => resp.clone(),
                "mixed-text-message" => json!({"id": "t", "object": "text_completion", "model": "g",
                    "choices": [{"index": 0, "text": "x", "message": chat["choices"][0]["message"],
                                 "finish_reason": "stop"}]}),
                _ => json!({"object": "list", "data": []}),
            };
            match c {
                "mixed-chat-output" | "mixed-text-output" | "mixed-list-output" => {
                    body["output"] = resp["output"].clone();
                }
                "mixed-response-choices" => {
                    body["output"] = json!([]);
                    body["choices"] = chat["choices"].clone();
                }
                _ => {}
            }
            if c == "mixed-text-output" {
                body["object"] = json!("text_completion");
            }
            join(&[output_line("a", body)]).into_bytes()
        }
        // Embeddings' output: every line's parsed JSON is many times its text; the file's many times the share.
        "embeddings" => join(
            &(0..100)
                .map(|i| {
                    output_line(
                        &format!("e{i}"),
                        json!({"object": "list", "model": "text-embedding-3-small",
                               "data": [{"object": "embedding", "index": 0, "embedding": vec![0.5; 100]}]}),
                    )
                })
                .collect::<Vec<_>>(),
        )
        .into_bytes(),
        "csv-small" => "step,train_loss\n1,0.5\n2,0.4\n".into(),
        // A batch's input file: its lines are requests, not answers.
        "input" => join(&[
            json!({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": CURL_COMMAND}]}}),
        ])
        .into_bytes(),
        // Beyond the policy's 64 KiB `max_body_bytes`: a binary file, and text whose first line opens no object.
        "binary" => (0..200_000u32).map(|i| (i % 251) as u8).collect(),
        "csv" => format!("step,train_loss\n{}", "1,0.5\n".repeat(20_000)).into_bytes(),
        _ => b"unknown case".to_vec(),
    }
}

/// The file a content path names: `/v1/files/{case}/content`.
fn file_of(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v1/files/")?;
    Some(rest.split('/').next().unwrap_or_default().to_string())
}

async fn answer(req: Request<Incoming>) -> Response<TestBody> {
    if req.uri().path() == "/v1/messages" {
        // A part (`206`) of a whole Messages answer that proposes the refused call.
        let body = message(json!([shell("toolu_1", CURL_COMMAND)]), "tool_use").to_string();
        return Response::builder()
            .status(206)
            .header("content-type", "application/json")
            .header("content-range", format!("bytes 0-{}/*", body.len() - 1))
            .body(Full::new(Bytes::from(body)).boxed())
            .unwrap();
    }
    if let Some(case) = file_of(req.uri().path()) {
        let content_type = match case.as_str() {
            "utf16-charset" => "application/octet-stream; charset=utf-16",
            "utf8-charset" => "application/octet-stream; charset=\"UTF-8\"",
            _ => "application/octet-stream",
        };
        let body = file(&case);
        // A part (`206`, as to `Range: bytes=0-…`): the body given, all of it one range.
        let status = if case == "range" { 206 } else { 200 };
        return Response::builder()
            .status(status)
            .header("content-type", content_type)
            .header(
                "content-range",
                format!("bytes 0-{}/*", body.len().max(1) - 1),
            )
            .body(Full::new(Bytes::from(body)).boxed())
            .unwrap();
    }
    let case = case_of(req.uri().path());
    let content_type = if case == "sse-typed" {
        "text/event-stream"
    } else {
        "application/x-jsonl"
    };
    let status = if case == "range" { 206 } else { 200 };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(results(&case))).boxed())
        .unwrap()
}

struct World {
    proxy: Proxy,
    anthropic: SocketAddr,
}

async fn world() -> World {
    limits();
    let ca = TestCa::new("batch results test CA");
    let proxy = start_proxy(NO_CURL_POLICY, &[&ca], false).await;
    let anthropic = answering_upstream(&ca, &["api.anthropic.com", "api.openai.com"], answer).await;
    World { proxy, anthropic }
}

/// `GET path` on Anthropic's host through the proxy: status and body as the agent got them, and the exchange's
/// records after the request's.
async fn fetch(w: &World, path: &str) -> (u16, String, Vec<Value>) {
    let (status, body, recs) = fetch_from(w, "api.anthropic.com", path).await;
    (status, String::from_utf8_lossy(&body).into_owned(), recs)
}

/// `GET path` on `host` through the proxy: status and body bytes as the agent got them, and the exchange's records
/// after the request's.
async fn fetch_from(w: &World, host: &str, path: &str) -> (u16, Vec<u8>, Vec<Value>) {
    let before = w.proxy.audit_records().await.len();
    let tls = w.proxy.tls_to(w.anthropic, host, &[b"http/1.1"]).await;
    let (status, _, body) = send(tls, false, get(path, host)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let recs = w.proxy.audit_records().await;
    (status, body, recs[before + 1..].to_vec())
}

/// One record of the `no-curl` rule refusing the `shell` call of the results at `path`, on the line whose
/// `custom_id` is `line`, whose answer `provider`'s `model` gave.
fn assert_refusal_record(path: &str, (provider, model, line): (&str, &str, &str), r: &Value) {
    assert_eq!(r["request"]["phase"], "proposal", "{r}");
    assert_eq!(r["request"]["llm_provider"], provider, "{r}");
    assert_eq!(r["request"]["llm_model"], model, "{r}");
    assert_eq!(r["request"]["custom_id"], line, "{r}");
    assert_eq!(r["request"]["method"], "GET", "{r}");
    assert_eq!(r["request"]["path"], path, "{r}");
    assert_eq!(r["request"]["tool"], "shell", "{r}");
    assert_eq!(r["decision"]["rule"], "no-curl", "{r}");
    assert_eq!(r["decision"]["verdict"], "block", "{r}");
    assert_eq!(r["outcome"]["disposition"], "blocked", "{r}");
}

/// The refused call's line is rewritten as a refused Messages answer is; every other line (an allowed call, an errored
/// and an expired result) and every line end reach the agent as they came; one record, of the refusal.
#[tokio::test]
async fn each_line_s_message_is_decided_as_a_messages_answer() {
    let w = world().await;
    let path = "/v1/messages/batches/mixed/results";
    let (status, body, recs) = fetch(&w, path).await;
    assert_eq!(status, 200, "{body}");
    let expected = format!(
        "{}\n{}\n{}\n{}\n",
        curl_line_refused("a"),
        ls_line("b"),
        errored_line(),
        expired_line()
    );
    assert_eq!(body, expected);
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_refusal_record(path, ("anthropic", "claude-sonnet-4-5", "a"), &recs[0]);

    // Two refused calls on two lines: two records, in order; the `\r\n` and `\r` ends kept.
    let path = "/v1/messages/batches/two-refused/results";
    let (status, body, recs) = fetch(&w, path).await;
    assert_eq!(status, 200, "{body}");
    let expected = format!(
        "{}\r\n{}\r{}",
        curl_line_refused("a"),
        ls_line("b"),
        curl_line_refused("e")
    );
    assert_eq!(body, expected);
    assert_eq!(recs.len(), 2, "{recs:#?}");
    assert_refusal_record(path, ("anthropic", "claude-sonnet-4-5", "a"), &recs[0]);
    assert_refusal_record(path, ("anthropic", "claude-sonnet-4-5", "e"), &recs[1]);

    // Nothing refused: the file as it came, no record.
    let (status, body, recs) = fetch(&w, "/v1/messages/batches/allowed/results").await;
    assert_eq!((status, body), (200, results("allowed")));
    assert!(recs.is_empty(), "{recs:#?}");

    // A result whose type says `errored` but which carries a message: its call is decided too.
    let path = "/v1/messages/batches/errored-with-message/results";
    let (status, body, recs) = fetch(&w, path).await;
    let mut expected = curl_line_refused("a");
    expected["result"]["type"] = json!("errored");
    assert_eq!((status, body), (200, format!("{expected}\n")));
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_refusal_record(path, ("anthropic", "claude-sonnet-4-5", "a"), &recs[0]);
    assert!(w.proxy.close_and_verify().await > 0);
}

/// The results path as a lenient server may route it, under a prefix, in other letter case, with the beta SDK's
/// query, and results sent as another content type: read all the same.
#[tokio::test]
async fn results_paths_are_matched_as_the_other_endpoints_are() {
    let w = world().await;
    for path in [
        "/v1/messages/batches/mixed/results?beta=true",
        "/V1/Messages/Batches/mixed/RESULTS",
        "/v1/messages/batches/mixed/results/",
        "/v1/messages/batches/mixed/results%20",
        "/v1/messages/batches/mixed/results%5C",
        "/gateway/anthropic/v1/messages/batches/mixed/results",
        "/v1/messages/batches/sse-typed/results",
    ] {
        let (status, body, recs) = fetch(&w, path).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(!body.contains("evil.example"), "{path}: {body}");
        assert_eq!(
            body.lines().next().map(str::to_string),
            Some(curl_line_refused("a").to_string()),
            "{path}"
        );
        assert_eq!(recs.len(), 1, "{path}: {recs:#?}");
        assert_eq!(recs[0]["decision"]["rule"], "no-curl", "{path}");
    }
    assert!(w.proxy.close_and_verify().await > 0);
}

/// A line that cannot be read as every SDK reads it — cut short, a wrapper's member in other letter case (Go's
/// `encoding/json` binds `Result` to `result`), two objects on one line — refuses the whole answer: 502, one record
/// (`proposal`, `unparseable`), no call in it decided, nothing of it passed on.
#[tokio::test]
async fn an_unreadable_line_refuses_the_answer() {
    let w = world().await;
    for case in ["cut-line", "result-otherwise", "two-lines-in-one"] {
        let path = format!("/v1/messages/batches/{case}/results");
        let (status, body, recs) = fetch(&w, &path).await;
        assert_eq!(status, 502, "{case}: {body}");
        let expected = json!({"error": {"type": "enforcer_error", "reason": "unparseable",
            "message": "a line of the upstream's batch results could not be read for its tool calls"}});
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap(),
            expected,
            "{case}"
        );
        assert_eq!(recs.len(), 1, "{case}: {recs:#?}");
        let r = &recs[0];
        assert_eq!(r["request"]["phase"], "proposal", "{case}: {r}");
        assert_eq!(r["decision"]["reason"], "unparseable", "{case}: {r}");
        assert_eq!(r["outcome"]["disposition"], "blocked", "{case}: {r}");
        assert_eq!(r["outcome"]["error"], "unparseable", "{case}: {r}");
        assert_eq!(r["outcome"]["status"], 502, "{case}: {r}");
    }
    assert!(w.proxy.close_and_verify().await > 0);
}

/// Results beyond the policy's `max_body_bytes` (64 KiB) are refused (502, `body_too_large`); a line whose parsed
/// JSON the agent's share of the buffer budget cannot hold (10 000 array elements: 1.6 MB at most, the share 1 MiB)
/// is refused before it is parsed (503 with `Retry-After`, `buffer_limit`). Neither is passed on; one record each.
#[tokio::test]
async fn results_are_held_within_the_body_bound_and_the_budget() {
    let w = world().await;
    for (case, status, reason) in [
        ("too-large", 502, "body_too_large"),
        ("deep-json", 503, "buffer_limit"),
    ] {
        let path = format!("/v1/messages/batches/{case}/results");
        let (got, body, recs) = fetch(&w, &path).await;
        assert_eq!(got, status, "{case}: {body}");
        assert!(!body.contains("evil.example"), "{case}: {body}");
        let json: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["error"]["reason"], reason, "{case}: {body}");
        assert_eq!(recs.len(), 1, "{case}: {recs:#?}");
        assert_eq!(recs[0]["outcome"]["error"], reason, "{case}: {:#}", recs[0]);
        assert_eq!(
            recs[0]["outcome"]["status"], status,
            "{case}: {:#}",
            recs[0]
        );
    }
    assert!(w.proxy.close_and_verify().await > 0);
}

/// An OpenAI Batch output file: each line's Chat Completions or Responses answer is decided as a whole one is — a
/// refused call rewritten on its line, one record each — and the other lines (an allowed call, embeddings, an error
/// line) reach the agent as they came.
#[tokio::test]
async fn an_openai_batch_output_file_is_read_line_by_line() {
    let w = world().await;
    let path = "/v1/files/output/content";
    let (status, body, recs) = fetch_from(&w, "api.openai.com", path).await;
    let body = String::from_utf8(body).unwrap();
    assert_eq!(status, 200, "{body}");
    let sent = String::from_utf8(file("output")).unwrap();
    let sent: Vec<&str> = sent.lines().collect();
    let expected = format!(
        "{}\n{}\n{}\n{}\n{}\n",
        refused_output(
            output_line("a", chat_completion(CURL_COMMAND)),
            LlmApi::ChatCompletions
        ),
        refused_output(
            output_line("b", response_object(CURL_COMMAND)),
            LlmApi::Responses
        ),
        sent[2],
        sent[3],
        sent[4],
    );
    assert_eq!(body, expected);
    assert!(!body.contains("evil.example"), "{body}");
    assert_eq!(recs.len(), 2, "{recs:#?}");
    assert_refusal_record(path, ("openai", "gpt-4o", "a"), &recs[0]);
    assert_refusal_record(path, ("openai", "gpt-4.1-mini", "b"), &recs[1]);

    let path = "/v1/files/output-long-first-line/content";
    let (status, body, recs) = fetch_from(&w, "api.openai.com", path).await;
    let body = String::from_utf8(body).unwrap();
    let sent = String::from_utf8(file("output-long-first-line")).unwrap();
    let first = sent.lines().next().unwrap();
    let expected = format!(
        "{first}\n{}\n",
        refused_output(
            output_line("b", chat_completion(CURL_COMMAND)),
            LlmApi::ChatCompletions
        )
    );
    assert_eq!(status, 200);
    assert!(
        body == expected,
        "{}",
        &body[body.len().saturating_sub(600)..]
    );
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_refusal_record(path, ("openai", "gpt-4o", "b"), &recs[0]);
    assert!(w.proxy.close_and_verify().await > 0);
}

/// The refusal of the answer at `path` on `host`: `status`, the enforcer's error of `reason` saying `message`, one
/// record of it in `phase`; nothing of the answer passed on.
async fn assert_refused(
    w: &World,
    (host, path): (&str, &str),
    (status, reason, phase, message): (u16, &str, &str, &str),
) {
    let (got, body, recs) = fetch_from(w, host, path).await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(got, status, "{path}: {}", &body[..body.len().min(300)]);
    let expected =
        json!({"error": {"type": "enforcer_error", "reason": reason, "message": message}});
    assert_eq!(
        serde_json::from_str::<Value>(&body).ok(),
        Some(expected),
        "{path}: {body}"
    );
    assert_eq!(recs.len(), 1, "{path}: {recs:#?}");
    let r = &recs[0];
    assert_eq!(r["request"]["phase"], phase, "{path}: {r:#}");
    assert_eq!(r["decision"]["reason"], reason, "{path}: {r:#}");
    assert_eq!(r["outcome"]["disposition"], "blocked", "{path}: {r:#}");
    assert_eq!(r["outcome"]["error"], reason, "{path}: {r:#}");
    assert_eq!(r["outcome"]["status"], status, "{path}: {r:#}");
}

const UNREADABLE_LINE: &str =
    "a line of the upstream's batch results could not be read for its tool calls";
const TOO_LARGE: &str = "the upstream's answer exceeds the inspection limit";
const NOT_UTF8: &str =
    "the upstream's batch results are not UTF-8 text and could not be read for their tool calls";
const PARTIAL: &str =
    "a part of an answer (206) cannot be read for its tool calls; ask for the whole answer";

/// Any other file passes as it came (a small CSV, a batch's input file), with no record; every file is read whole, so
/// one beyond the 64 KiB bound is refused (502, `body_too_large`), as is an output file whose line is cut short, an
/// array of output lines on one line, or an output line whose `body` is JSON text in a string (502, `unparseable`):
/// an agent may read each for its calls.
#[tokio::test]
async fn other_files_pass_and_unreadable_output_is_refused() {
    let w = world().await;
    for case in ["csv-small", "input"] {
        let path = format!("/v1/files/{case}/content");
        let (status, body, recs) = fetch_from(&w, "api.openai.com", &path).await;
        assert_eq!(status, 200, "{case}");
        assert!(
            body == file(case),
            "{case}: the file did not come through as it was"
        );
        assert!(recs.is_empty(), "{case}: {recs:#?}");
    }
    for (case, reason, phase, message) in [
        ("output-cut", "unparseable", "proposal", UNREADABLE_LINE),
        (
            "output-huge-first-line",
            "body_too_large",
            "response",
            TOO_LARGE,
        ),
        ("binary", "body_too_large", "response", TOO_LARGE),
        ("csv", "body_too_large", "response", TOO_LARGE),
        ("padded-beyond", "body_too_large", "response", TOO_LARGE),
        (
            "output-in-array",
            "unparseable",
            "proposal",
            UNREADABLE_LINE,
        ),
        ("body-as-string", "unparseable", "proposal", UNREADABLE_LINE),
    ] {
        let path = format!("/v1/files/{case}/content");
        assert_refused(&w, ("api.openai.com", &path), (502, reason, phase, message)).await;
    }
    assert!(w.proxy.close_and_verify().await > 0);
}

/// Lines as every reader may split and trim them (a black-box attack's finds): two output lines glued by an end
/// Python's `str.splitlines` splits at (U+2028, U+2029, NEL, VT, FF, FS, GS, RS), a first line of characters a reader
/// skips as whitespace (NBSP, U+3000, NUL, US, a byte-order mark) or an output line within them, blank lines before
/// the first output line, a first line that is JSON but no output line, or no JSON: the output line's call is
/// decided all the same (200, its line rewritten, one record), the other lines kept as they came. A first line that
/// opens an object but is not one refuses the whole file (502, `unparseable`).
#[tokio::test]
async fn every_line_any_reader_finds_is_read() {
    let w = world().await;
    let refused_a = || {
        refused_output(
            output_line("a", chat_completion(CURL_COMMAND)),
            LlmApi::ChatCompletions,
        )
    };
    let mut cases: Vec<(String, String)> = (0..GLUES.len())
        .map(|i| {
            let glued = format!("glued-{i}");
            let first = output_line("b", chat_completion("ls"));
            (glued, format!("{first}{}{}\n", GLUES[i], refused_a()))
        })
        .collect();
    cases.extend([
        (
            "blank-first-line".into(),
            format!("\u{a0}\u{3000}\0\u{1f}\u{feff}\n{}\n", refused_a()),
        ),
        (
            "padded".into(),
            format!("{}{}\n", "\n \r\n".repeat(15_000), refused_a()),
        ),
        (
            "junk-first-line".into(),
            format!(
                "{{}}\n{{\"custom_id\":\"x\"}}\nstep,loss\n[1,{{\"a\":2}}]\n{}\n",
                refused_a()
            ),
        ),
        ("utf8-charset".into(), format!("{}\n", refused_a())),
    ]);
    for (case, expected) in cases {
        let path = format!("/v1/files/{case}/content");
        let (status, body, recs) = fetch_from(&w, "api.openai.com", &path).await;
        let body = String::from_utf8(body).unwrap();
        assert_eq!(status, 200, "{case}: {body}");
        assert!(
            body == expected,
            "{case}: {:?}",
            &body[body.len().saturating_sub(400)..]
        );
        assert_eq!(recs.len(), 1, "{case}: {recs:#?}");
        assert_refusal_record(&path, ("openai", "gpt-4o", "a"), &recs[0]);
    }
    assert_refused(
        &w,
        ("api.openai.com", "/v1/files/broken-first-line/content"),
        (502, "unparseable", "proposal", UNREADABLE_LINE),
    )
    .await;
    // Anthropic's results are split alike: a line glued to another by U+2028 is two lines, each read.
    let path = "/v1/messages/batches/glued/results";
    let (status, body, recs) = fetch(&w, path).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        format!("{}\u{2028}{}\n", ls_line("b"), curl_line_refused("a"))
    );
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_refusal_record(path, ("anthropic", "claude-sonnet-4-5", "a"), &recs[0]);
    assert!(w.proxy.close_and_verify().await > 0);
}

/// A body in another charset than UTF-8 (UTF-16, said by `charset=` or not) is refused as not UTF-8 text, or as a
/// line that opens an object and is not one (502, `unparseable`, one record): a reader may decode it by its charset.
#[tokio::test]
async fn other_charsets_are_refused() {
    let w = world().await;
    for (path, message) in [
        ("/v1/files/utf16-charset/content", NOT_UTF8),
        ("/v1/files/utf16/content", UNREADABLE_LINE),
    ] {
        assert_refused(
            &w,
            ("api.openai.com", path),
            (502, "unparseable", "proposal", message),
        )
        .await;
    }
    assert!(w.proxy.close_and_verify().await > 0);
}

/// A part of batch results (`206`, to a `Range` request) cannot be read alone — it may begin within a line — so it
/// is refused (502, `unparseable`, in the response phase, one record), an OpenAI file's content and Anthropic's
/// results alike, and so is a part of a whole Messages answer.
#[tokio::test]
async fn a_part_of_batch_results_is_refused() {
    let w = world().await;
    for (host, path) in [
        ("api.openai.com", "/v1/files/range/content"),
        ("api.anthropic.com", "/v1/messages/batches/range/results"),
    ] {
        assert_refused(&w, (host, path), (502, "unparseable", "response", PARTIAL)).await;
    }
    // So is a part of any answer read for proposals: a Messages answer to `POST /v1/messages`.
    let before = w.proxy.audit_records().await.len();
    let tls = w
        .proxy
        .tls_to(w.anthropic, "api.anthropic.com", &[b"http/1.1"])
        .await;
    let request = Request::post("/v1/messages")
        .header("host", "api.anthropic.com")
        .header("content-type", "application/json")
        .header("range", "bytes=0-")
        .body(Full::new(Bytes::from(
            json!({"model": "claude-sonnet-4-5", "max_tokens": 16,
                   "messages": [{"role": "user", "content": "hi"}]})
            .to_string(),
        )))
        .unwrap();
    let (status, _, body) = send(tls, false, request).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 502, "{body}");
    assert!(!body.contains("evil.example"), "{body}");
    let recs = w.proxy.audit_records().await;
    // Two records: the request's, and the one refusal of its answer, linked to it.
    let recs = &recs[before..];
    assert_eq!(recs.len(), 2, "{recs:#?}");
    assert!(recs[0]["request"]["phase"].is_null(), "{recs:#?}");
    let refusal = &recs[1];
    assert_eq!(refusal["request"]["phase"], "response", "{refusal:#}");
    assert_eq!(refusal["request"]["parent"], recs[0]["seq"], "{refusal:#}");
    assert_eq!(refusal["decision"]["reason"], "unparseable", "{recs:#?}");
    assert_eq!(refusal["outcome"]["status"], 502, "{refusal:#}");
    assert!(w.proxy.close_and_verify().await > 0);
}

/// An output line whose body carries another API's members than its `object` names — a `chat.completion` with a
/// Responses `output`, a `response` with Chat `choices`, a `text_completion` with either, an embeddings `list` with
/// `output` — may be read by the agent as either API: refused (502, `unparseable`).
#[tokio::test]
async fn a_body_of_two_apis_shapes_is_refused() {
    let w = world().await;
    for case in [
        "mixed-chat-output",
        "mixed-response-choices",
        "mixed-text-message",
        "mixed-text-output",
        "mixed-list-output",
    ] {
        let path = format!("/v1/files/{case}/content");
        assert_refused(
            &w,
            ("api.openai.com", &path),
            (502, "unparseable", "proposal", UNREADABLE_LINE),
        )
        .await;
    }
    assert!(w.proxy.close_and_verify().await > 0);
}

/// Batch results' lines are parsed one at a time, so the budget holds the largest line's parsed JSON, not the
/// file's: embeddings' output within the 64 KiB bound whose whole parse would be about twice the 1 MiB share passes
/// as it came, with no record.
#[tokio::test]
async fn the_budget_holds_the_largest_line_not_the_file() {
    let w = world().await;
    let sent = file("embeddings");
    assert!(sent.len() < 64 * 1024, "{}", sent.len());
    let (status, body, recs) =
        fetch_from(&w, "api.openai.com", "/v1/files/embeddings/content").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(body == sent, "the file did not come through as it was");
    assert!(recs.is_empty(), "{recs:#?}");
    assert!(w.proxy.close_and_verify().await > 0);
}
