//! Batch input files through the real proxy from real TLS upstreams. A provider's Batch API runs the LLM calls of a
//! JSON Lines file uploaded before (OpenAI `POST /v1/files` with `purpose=batch`, then `POST /v1/batches` naming its
//! `input_file_id`; Gemini's resumable upload to `/upload/v1beta/files`, then `:batchGenerateContent` naming
//! `batch.inputConfig.fileName`). Each line is decided as the same call sent to its endpoint is: an OpenAI line
//! (naming its model) when the file is uploaded, a Gemini line (naming none) at the create, with the create's model,
//! as the same requests inline. A batch runs only on a file the enforcer read whole at its upload: one uploaded
//! elsewhere, in chunks, never, or forgotten is refused as `unread_input`, and its calls never run undecided.

mod proxy_support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use proxy_support::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

const OPENAI: &str = "api.openai.com";
const GEMINI: &str = "generativelanguage.googleapis.com";

/// Request rules on the model and on a declared tool, and a constrain on one call's body.
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
  - id: cap-tokens
    when: { llm.model: "capped-*" }
    verdict: constrain
    constrain: { json_cap: { $.max_tokens: 100 } }
"#;

/// What the upstreams received: each request's method and path, in order.
type Seen = Arc<std::sync::Mutex<Vec<String>>>;

/// Google's resumable upload sessions: the file name each `upload_id`'s start request chose, if any, and what it
/// holds so far.
type Sessions = Arc<std::sync::Mutex<HashMap<String, (Option<String>, Vec<u8>)>>>;

/// Standard base64 with padding (RFC 4648 §4).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                char::from(ABC[(n >> (18 - 6 * i)) as usize & 63])
            } else {
                '='
            });
        }
    }
    out
}

/// A provider that stores every upload as a new file (OpenAI's File object, Gemini's `{"file": …}`) and answers a
/// batch create with a batch object. A Gemini resumable session holds what each `upload` request of it sent, in
/// order, and its file is all of that once a request finalizes it; its answer names the file's size and its SHA-256
/// (`sizeBytes`, `sha256Hash`: base64 of the hex digest, as Google's File resource gives it).
async fn answer(
    seen: Seen,
    files: Arc<AtomicU64>,
    sessions: Sessions,
    req: Request<Incoming>,
) -> Response<TestBody> {
    let path = req.uri().path().to_string();
    seen.lock()
        .unwrap()
        .push(format!("{} {path}", req.method()));
    let session = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .find_map(|p| p.strip_prefix("upload_id="))
        .unwrap_or_default()
        .to_string();
    let command = req
        .headers()
        .get("x-goog-upload-command")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let gzip = req
        .headers()
        .get("accept-encoding")
        .is_some_and(|v| v.to_str().unwrap_or_default().contains("gzip"));
    let sent = req.into_body().collect().await.unwrap().to_bytes();
    let n = files.fetch_add(1, Ordering::SeqCst) + 1;
    let body = if path.starts_with("/upload/") {
        let mut sessions = sessions.lock().unwrap();
        if command == "start" {
            // The start request's metadata may name the file (`{"file": {"name": "files/…"}}`).
            let metadata: Value = serde_json::from_slice(&sent).unwrap_or_default();
            let name = metadata["file"]["name"].as_str().map(str::to_string);
            sessions.insert(session.clone(), (name, Vec::new()));
        }
        let (name, held) = sessions.entry(session.clone()).or_default();
        if command != "start" {
            held.extend_from_slice(&sent);
        }
        let name = name.clone().unwrap_or(format!("files/g{n}"));
        let content = held.clone();
        if command.contains("finalize") {
            sessions.remove(&session);
        }
        let digest = hex::encode(Sha256::digest(&content));
        json!({"file": {"name": name, "mimeType": "application/jsonl",
                        "sizeBytes": content.len().to_string(), "sha256Hash": base64(digest.as_bytes())}})
    } else if path.ends_with("/files") {
        json!({"id": format!("file-{n}"), "object": "file", "purpose": "batch", "bytes": 10})
    } else {
        json!({"id": "batch_1", "object": "batch", "name": "batches/b1"})
    };
    // Compressed when the request accepts gzip, as OpenAI's and Google's frontends answer.
    if gzip {
        let mut coder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut coder, body.to_string().as_bytes()).unwrap();
        return Response::builder()
            .header("content-type", "application/json")
            .header("content-encoding", "gzip")
            .body(Full::new(Bytes::from(coder.finish().unwrap())).boxed())
            .unwrap();
    }
    Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

struct World {
    proxy: Proxy,
    upstream: SocketAddr,
    seen: Seen,
}

async fn world() -> World {
    world_with(POLICY).await
}

/// [`world`] under `policy`.
async fn world_with(policy: &str) -> World {
    let ca = TestCa::new("batch inputs test CA");
    let proxy = start_proxy(policy, &[&ca], false).await;
    let seen = Seen::default();
    let files = Arc::new(AtomicU64::new(0));
    let sessions = Sessions::default();
    let s = seen.clone();
    let upstream = answering_upstream(&ca, &[OPENAI, GEMINI], move |req| {
        answer(s.clone(), files.clone(), sessions.clone(), req)
    })
    .await;
    World {
        proxy,
        upstream,
        seen,
    }
}

/// `req` to `host` through the proxy: status and body as the agent got them, the exchange's records, and what the
/// upstream received meanwhile.
async fn exchange(
    w: &World,
    host: &str,
    req: Request<Full<Bytes>>,
) -> (u16, Value, Vec<Value>, Vec<String>) {
    let before = w.proxy.audit_records().await.len();
    let seen_before = w.seen.lock().unwrap().len();
    let tls = w.proxy.tls_to(w.upstream, host, &[b"http/1.1"]).await;
    let (status, headers, mut body) = send(tls, false, req).await;
    if headers.get("content-encoding").is_some_and(|c| c == "gzip") {
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut plain)
            .unwrap();
        body = plain;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let recs = w.proxy.audit_records().await;
    let text = String::from_utf8_lossy(&body).into_owned();
    let got = serde_json::from_str(&text).unwrap_or(Value::String(text));
    let seen = w.seen.lock().unwrap()[seen_before..].to_vec();
    (status, got, recs[before..].to_vec(), seen)
}

/// An OpenAI batch input line calling Chat Completions with `model`, declaring `tool`.
fn line(model: &str, tool: &str) -> String {
    json!({"custom_id": format!("{model}-{tool}"), "method": "POST", "url": "/v1/chat/completions",
           "body": {"model": model, "messages": [{"role": "user", "content": "hi"}],
                    "tools": [{"type": "function", "function": {"name": tool, "parameters": {}}}]}})
    .to_string()
}

/// `POST {prefix}/files` uploading `lines` as a batch input file, as the OpenAI SDK sends it.
fn upload(prefix: &str, host: &str, lines: &[String]) -> Request<Full<Bytes>> {
    let body = format!(
        "--bnd\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--bnd\r\n\
         Content-Disposition: form-data; name=\"file\"; filename=\"input.jsonl\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n{}\n\r\n--bnd--\r\n",
        lines.join("\n")
    );
    Request::builder()
        .method("POST")
        .uri(format!("{prefix}/files"))
        .header("host", host)
        .header("content-type", "multipart/form-data; boundary=bnd")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// `POST path` on `host` with the JSON `body`.
fn post(path: &str, host: &str, body: &Value) -> Request<Full<Bytes>> {
    Request::builder()
        .method("POST")
        .uri(path)
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// `POST {prefix}/batches` naming `file` as its input.
fn create(prefix: &str, host: &str, file: &str) -> Request<Full<Bytes>> {
    let body = json!({"input_file_id": file, "endpoint": "/v1/chat/completions",
                      "completion_window": "24h"});
    Request::builder()
        .method("POST")
        .uri(format!("{prefix}/batches"))
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// `record` is a batch create refused because it names a file the enforcer did not read (`what`: the case).
fn assert_unread(record: &Value, what: &str) {
    assert_eq!(
        decided(record),
        ("block".into(), "null".into(), "unread_input".into()),
        "{what}"
    );
}

/// The record's decision: verdict, rule, reason.
fn decided(r: &Value) -> (String, String, String) {
    let s = |v: &Value| v.as_str().unwrap_or("null").to_string();
    (
        s(&r["decision"]["verdict"]),
        s(&r["decision"]["rule"]),
        s(&r["decision"]["reason"]),
    )
}

/// Before, an agent could upload a file of calls the policy refuses (a blocked model, a blocked tool) and have the
/// provider's Batch API run them: the upload was a file and the batch named only its id. Now each line is decided
/// at the upload, as the call sent to its endpoint is (the same rule, the same refusal), and a batch runs only on a
/// file the enforcer read: one it did not is refused, and the upstream never sees the create. On OpenAI's host and
/// on Gemini's OpenAI-compatible one.
#[tokio::test]
async fn a_batch_input_file_is_decided_line_by_line_and_only_a_file_read_runs() {
    let w = world().await;
    let ok = line("gpt-ok", "read_file");
    for (prefix, host) in [("/v1", OPENAI), ("/v1beta/openai", GEMINI)] {
        for (bad, rule, message) in [
            (
                line("evil-x", "read_file"),
                "no-evil-model",
                "that model is not allowed",
            ),
            (
                line("gpt-ok", "delete_everything"),
                "no-declared-delete",
                "that tool may not be declared",
            ),
        ] {
            // The line's call sent to its endpoint: the refusal the upload must get.
            let call: Value = serde_json::from_str::<Value>(&bad).unwrap()["body"].clone();
            let (direct, refused, _, _) = exchange(
                &w,
                host,
                post(&format!("{prefix}/chat/completions"), host, &call),
            )
            .await;
            assert!(
                refused
                    .to_string()
                    .contains(&format!("{message} (policy rule: {rule})")),
                "{refused}"
            );
            let (status, got, recs, seen) =
                exchange(&w, host, upload(prefix, host, &[ok.clone(), bad])).await;
            assert_eq!((status, &got), (direct, &refused), "{prefix} {rule}");
            assert_eq!(recs.len(), 1, "{recs:#?}");
            assert_eq!(
                decided(&recs[0]),
                ("block".into(), rule.into(), "rule".into())
            );
            assert_eq!(recs[0]["outcome"]["disposition"], "blocked");
            assert!(seen.is_empty(), "{seen:?}");
        }

        // A file of allowed calls goes on; the id its answer gives may be run, and only it.
        let (status, got, recs, seen) =
            exchange(&w, host, upload(prefix, host, &[ok.clone(), ok.clone()])).await;
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["object"], "file");
        let file = got["id"].as_str().unwrap().to_string();
        assert_eq!(recs.len(), 1, "{recs:#?}");
        assert_eq!(recs[0]["outcome"]["disposition"], "forwarded");
        assert_eq!(recs[0]["request"]["llm_model"], "gpt-ok");
        assert_eq!(seen, [format!("POST {prefix}/files")]);

        let (status, got, recs, seen) = exchange(&w, host, create(prefix, host, &file)).await;
        assert_eq!((status, &got["id"]), (200, &json!("batch_1")), "{got}");
        assert_eq!(recs.len(), 1, "{recs:#?}");
        assert_eq!(recs[0]["outcome"]["disposition"], "forwarded");
        assert_eq!(seen, [format!("POST {prefix}/batches")]);

        let blocked = if host == OPENAI { 400 } else { 403 };
        for other in ["file-uploaded-elsewhere", "file-999"] {
            let (status, got, recs, seen) = exchange(&w, host, create(prefix, host, other)).await;
            assert_eq!(status, blocked, "{got}");
            assert!(
                got.to_string().contains("was not read by the enforcer"),
                "{got}"
            );
            assert_eq!(recs.len(), 1, "{recs:#?}");
            assert_unread(&recs[0], "");
            assert_eq!(recs[0]["outcome"]["disposition"], "blocked");
            assert!(seen.is_empty(), "{seen:?}");
        }
    }
    assert!(w.proxy.close_and_verify().await > 0);
}

/// A batch input file whose lines cannot all be read as the calls they ask for (not JSON, a method other than POST,
/// an endpoint that is no LLM call the enforcer reads, a member spelt otherwise) is refused as unreadable, never
/// forwarded; a constrain written for one call's body refuses the file it cannot rewrite. A file uploaded for
/// another purpose is not read, and cannot be run as a batch.
#[tokio::test]
async fn an_unreadable_or_constrained_batch_input_file_is_refused() {
    let w = world().await;
    let ok = line("gpt-ok", "read_file");
    for bad in [
        "not json".to_string(),
        ok.replace("\"POST\"", "\"GET\""),
        ok.replace("/v1/chat/completions", "/v1/moderations"),
        ok.replace("\"model\"", "\"Model\""),
        ok.replace("\"body\"", "\"BODY\""),
    ] {
        let (status, got, recs, seen) = exchange(
            &w,
            OPENAI,
            upload("/v1", OPENAI, &[ok.clone(), bad.clone()]),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {got}");
        assert!(
            got.to_string().contains("the batch input cannot be read"),
            "{got}"
        );
        assert_eq!(recs.len(), 1, "{recs:#?}");
        assert_eq!(recs[0]["decision"]["reason"], "unparseable");
        assert!(seen.is_empty(), "{seen:?}");
    }

    let (status, got, recs, seen) = exchange(
        &w,
        OPENAI,
        upload("/v1", OPENAI, &[ok.clone(), line("capped-1", "read_file")]),
    )
    .await;
    assert_eq!(status, 400, "{got}");
    assert!(got.to_string().contains("batch input file"), "{got}");
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(
        decided(&recs[0]),
        ("block".into(), "cap-tokens".into(), "unrewritable".into())
    );
    assert!(seen.is_empty(), "{seen:?}");

    // Another purpose: forwarded unread, and not a batch's input.
    let mut fine_tune = upload("/v1", OPENAI, &[line("evil-x", "read_file")]);
    let body = String::from_utf8(
        fine_tune
            .body()
            .clone()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
    .replace("\r\n\r\nbatch\r\n", "\r\n\r\nfine-tune\r\n");
    *fine_tune.body_mut() = Full::new(Bytes::from(body));
    let (status, got, recs, _) = exchange(&w, OPENAI, fine_tune).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(recs.len(), 1, "{recs:#?}");
    let file = got["id"].as_str().unwrap().to_string();
    let (status, got, recs, seen) = exchange(&w, OPENAI, create("/v1", OPENAI, &file)).await;
    assert_eq!(status, 400, "{got}");
    assert_eq!(recs[0]["decision"]["reason"], "unread_input");
    assert!(seen.is_empty(), "{seen:?}");
    assert!(w.proxy.close_and_verify().await > 0);
}

/// A redaction matched by a line of an OpenAI batch input upload refuses the upload (`unrewritable`): the lines are
/// inside a form part, which the proxy does not rewrite. Before, the rewrite replaced the whole upload with the
/// first line's JSON, redacted, and forwarded that.
#[tokio::test]
async fn a_redaction_matched_in_a_batch_input_upload_refuses_it() {
    let w = world_with(&format!(
        "{POLICY}  - id: redact-emails\n    when: {{ llm.model: \"redacted-*\" }}\n    verdict: constrain\n    \
         constrain: {{ redact: [email] }}\n"
    ))
    .await;
    let mail = line("redacted-1", "read_file").replace("\"read_file\"", "\"mail a@example.com\"");
    assert!(mail.contains("a@example.com"), "{mail}");
    let (status, got, recs, seen) = exchange(
        &w,
        OPENAI,
        upload("/v1", OPENAI, &[mail, line("gpt-ok", "read_file")]),
    )
    .await;
    assert_eq!(status, 400, "{got}");
    assert!(
        got.to_string()
            .contains("a batch input file, whose requests it cannot rewrite"),
        "{got}"
    );
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(
        decided(&recs[0]),
        (
            "block".into(),
            "redact-emails".into(),
            "unrewritable".into()
        )
    );
    assert!(seen.is_empty(), "{seen:?}");
    assert!(w.proxy.close_and_verify().await > 0);
}

/// A Gemini batch input line: a generateContent request declaring `tool`.
fn gemini_line(key: &str, tool: &str) -> String {
    json!({"key": key, "request": {"contents": [{"role": "user", "parts": [{"text": "hi"}]}],
           "tools": [{"functionDeclarations": [{"name": tool}]}]}})
    .to_string()
}

/// The request of Google's resumable upload that carries `content` to the session `upload_id` (`command`: `upload,
/// finalize` sends it whole from offset 0; `upload` is one chunk of several).
fn gemini_upload(content: &str, command: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method("POST")
        .uri("/upload/v1beta/files?upload_id=u-1&upload_protocol=resumable")
        .header("host", GEMINI)
        .header("x-goog-upload-protocol", "resumable")
        .header("x-goog-upload-command", command)
        .header("x-goog-upload-offset", "0")
        .header("content-type", "application/jsonl")
        .body(Full::new(Bytes::from(content.to_string())))
        .unwrap()
}

/// `POST …:batchGenerateContent` naming `file` as its input.
fn gemini_create(file: &str) -> Request<Full<Bytes>> {
    gemini_create_on("gemini-2.5-flash", file)
}

/// `POST …/models/{model}:batchGenerateContent` naming `file` as its input.
fn gemini_create_on(model: &str, file: &str) -> Request<Full<Bytes>> {
    let body = json!({"batch": {"displayName": "b", "inputConfig": {"fileName": file}}});
    post(
        &format!("/v1beta/models/{model}:batchGenerateContent"),
        GEMINI,
        &body,
    )
}

/// `POST …/models/{model}:batchGenerateContent` carrying the requests of `lines` (Gemini batch input lines) inline,
/// as `batch.inputConfig.requests.requests[]`: the batch an input file of those lines runs.
fn gemini_inline_on(model: &str, lines: &[String]) -> Request<Full<Bytes>> {
    let requests: Vec<Value> = lines
        .iter()
        .map(|l| {
            let l: Value = serde_json::from_str(l).unwrap();
            json!({"request": l["request"], "metadata": {"key": l["key"]}})
        })
        .collect();
    let body =
        json!({"batch": {"displayName": "b", "inputConfig": {"requests": {"requests": requests}}}});
    post(
        &format!("/v1beta/models/{model}:batchGenerateContent"),
        GEMINI,
        &body,
    )
}

/// Gemini's Batch API with an input file: a file uploaded whole is read when its lines name requests; the requests
/// are decided at the batch create that names the `file.name` its answer gave, with the create's model, as the same
/// requests sent inline are (the upload itself is the request it is). A file sent in chunks or not through the
/// enforcer may not be run.
#[tokio::test]
async fn a_gemini_batch_runs_only_on_a_file_whose_requests_were_decided() {
    let w = world().await;
    let ok = gemini_line("k1", "read_file");
    let bad = gemini_line("k2", "delete_everything");
    let (status, got, recs, seen) = exchange(
        &w,
        GEMINI,
        gemini_upload(&format!("{ok}\n{bad}\n"), "upload, finalize"),
    )
    .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(
        decided(&recs[0]),
        ("allow".into(), "null".into(), "default".into())
    );
    assert_eq!(seen.len(), 1, "{seen:?}");
    let blocked = got["file"]["name"].as_str().unwrap().to_string();
    let (status, got, recs, seen) = exchange(&w, GEMINI, gemini_create(&blocked)).await;
    assert_eq!(status, 403, "{got}");
    assert_eq!(
        got,
        json!({"error": {"code": 403, "status": "PERMISSION_DENIED",
            "message": "that tool may not be declared (policy rule: no-declared-delete)"}})
    );
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(
        decided(&recs[0]),
        ("block".into(), "no-declared-delete".into(), "rule".into())
    );
    assert_eq!(recs[0]["request"]["llm_model"], "gemini-2.5-flash");
    assert!(seen.is_empty(), "{seen:?}");

    let (status, got, recs, _) = exchange(
        &w,
        GEMINI,
        gemini_upload(&format!("{ok}\n{ok}\n"), "upload, finalize"),
    )
    .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(recs.len(), 1, "{recs:#?}");
    let file = got["file"]["name"].as_str().unwrap().to_string();
    let (status, got, recs, seen) = exchange(&w, GEMINI, gemini_create(&file)).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(recs[0]["outcome"]["disposition"], "forwarded");
    assert_eq!(seen.len(), 1, "{seen:?}");

    // Sent in chunks: the content is not read whole, so the file it makes cannot be run.
    let (status, got, _, seen) =
        exchange(&w, GEMINI, gemini_upload(&format!("{bad}\n"), "upload")).await;
    assert_eq!((status, seen.len()), (200, 1), "{got}");
    let chunked = got["file"]["name"].as_str().unwrap().to_string();
    for file in [chunked.as_str(), "files/elsewhere"] {
        let (status, got, recs, seen) = exchange(&w, GEMINI, gemini_create(file)).await;
        assert_eq!(status, 403, "{file}: {got}");
        assert!(
            got.to_string().contains("was not read by the enforcer"),
            "{got}"
        );
        assert_eq!(recs.len(), 1, "{recs:#?}");
        assert_eq!(recs[0]["decision"]["reason"], "unread_input");
        assert!(seen.is_empty(), "{seen:?}");
    }
    assert!(w.proxy.close_and_verify().await > 0);
}

/// `POST {prefix}/batches` with `body` as sent, labelled `content_type`.
fn create_raw(
    prefix: &str,
    host: &str,
    content_type: &str,
    body: String,
    headers: &[(&str, &str)],
) -> Request<Full<Bytes>> {
    let mut req = Request::builder()
        .method("POST")
        .uri(format!("{prefix}/batches"))
        .header("host", host)
        .header("content-type", content_type);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.body(Full::new(Bytes::from(body))).unwrap()
}

/// Before, a file read as one API's batch lines could be run by the other's batch: Gemini's host serves both
/// (`:batchGenerateContent` reads `{"key", "request"}` lines, `/v1beta/openai/batches` OpenAI's `{"custom_id", "url",
/// "body"}` lines), each reader ignores the other's members, and the file was kept by its name alone. An agent
/// uploaded lines whose `request` was allowed and whose `body` called a blocked model (or the other way round), and
/// had the other API's batch run the calls no rule saw. Now a file is kept as read for the API it was read as: a
/// batch of the other API naming it is refused as `unread_input`, and the upstream never sees the create.
#[tokio::test]
async fn a_file_read_as_one_apis_batch_lines_is_not_run_by_the_others_batch() {
    let w = world().await;
    let evil: Value = serde_json::from_str(&line("evil-x", "delete_everything")).unwrap();
    let mut both: Value = serde_json::from_str(&gemini_line("k1", "read_file")).unwrap();
    for member in ["custom_id", "method", "url", "body"] {
        both[member] = evil[member].clone();
    }
    let (status, got, recs, _) = exchange(
        &w,
        GEMINI,
        gemini_upload(&format!("{both}\n"), "upload, finalize"),
    )
    .await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(recs[0]["outcome"]["disposition"], "forwarded");
    let read_as_gemini = got["file"]["name"].as_str().unwrap().to_string();
    // Run by the Gemini batch it was read for: allowed.
    let (status, got, _, seen) = exchange(&w, GEMINI, gemini_create(&read_as_gemini)).await;
    assert_eq!((status, seen.len()), (200, 1), "{got}");

    let mut both: Value = serde_json::from_str(&line("gpt-ok", "read_file")).unwrap();
    both["key"] = json!("k1");
    both["request"] = serde_json::from_str::<Value>(&gemini_line("k1", "delete_everything"))
        .unwrap()["request"]
        .clone();
    let (status, got, _, _) = exchange(
        &w,
        GEMINI,
        upload("/v1beta/openai", GEMINI, &[both.to_string()]),
    )
    .await;
    assert_eq!(status, 200, "{got}");
    let read_as_openai = got["id"].as_str().unwrap().to_string();

    for (req, file) in [
        (
            create("/v1beta/openai", GEMINI, &read_as_gemini),
            &read_as_gemini,
        ),
        (gemini_create(&read_as_openai), &read_as_openai),
    ] {
        let (status, got, recs, seen) = exchange(&w, GEMINI, req).await;
        assert_eq!(status, 403, "{file}: {got}");
        assert!(
            got.to_string().contains("was not read by the enforcer"),
            "{got}"
        );
        assert_eq!(recs.len(), 1, "{recs:#?}");
        assert_unread(&recs[0], "");
        assert!(seen.is_empty(), "{seen:?}");
    }
    assert!(w.proxy.close_and_verify().await > 0);
}

/// Before, a batch create was read for its input file only when the proxy took it for no other protocol: a create
/// whose JSON was also a JSON-RPC message (`"jsonrpc": "2.0", "method": …` beside `input_file_id`) was decided as
/// MCP and forwarded naming any file; a create in a form (`input_file_id=…`), or naming its file as proto3 JSON's
/// `inputFileId` (Gemini's OpenAI-compatible API), or sent as `GET` with `X-HTTP-Method-Override: POST` (which
/// Google's frontends honour), named nothing the proxy read. Each ran a file no rule saw. Now every reading of a
/// create names its files, and a create whose body is not a JSON object is refused as unreadable.
#[tokio::test]
async fn a_batch_create_names_its_file_however_it_is_spelt_or_sent() {
    let w = world().await;
    let json_rpc = json!({"jsonrpc": "2.0", "id": 1, "method": "batches/create",
                          "input_file_id": "file-unread", "endpoint": "/v1/chat/completions",
                          "completion_window": "24h"});
    let camel = json!({"inputFileId": "files/unread", "endpoint": "/v1/chat/completions",
                       "completion_window": "24h"});
    let unread = [
        (
            OPENAI,
            create_raw("/v1", OPENAI, "application/json", json_rpc.to_string(), &[]),
        ),
        (
            GEMINI,
            create_raw(
                "/v1beta/openai",
                GEMINI,
                "application/json",
                camel.to_string(),
                &[],
            ),
        ),
        (GEMINI, {
            let mut get = create("/v1beta/openai", GEMINI, "files/unread");
            *get.method_mut() = hyper::Method::GET;
            get.headers_mut()
                .insert("x-http-method-override", "POST".parse().unwrap());
            get
        }),
    ];
    for (i, (host, req)) in unread.into_iter().enumerate() {
        let what = format!("{} {}", req.method(), req.uri());
        let (status, got, recs, seen) = exchange(&w, host, req).await;
        if i == 0 {
            // Read as a JSON-RPC request too, it is answered as one: a JSON-RPC error.
            assert_eq!(
                (status, &got["error"]["code"]),
                (200, &json!(-32001)),
                "{got}"
            );
        } else {
            assert_eq!(status, 403, "{what}: {got}");
        }
        assert!(
            got.to_string().contains("was not read by the enforcer"),
            "{got}"
        );
        assert_eq!(recs.len(), 1, "{recs:#?}");
        assert_unread(&recs[0], &what);
        assert!(seen.is_empty(), "{seen:?}");
    }
    let form = create_raw(
        "/v1",
        OPENAI,
        "application/x-www-form-urlencoded",
        "input_file_id=file-unread&endpoint=%2Fv1%2Fchat%2Fcompletions&completion_window=24h"
            .into(),
        &[],
    );
    let (status, got, recs, seen) = exchange(&w, OPENAI, form).await;
    assert_eq!(status, 400, "{got}");
    assert!(
        got.to_string().contains("the batch input cannot be read"),
        "{got}"
    );
    assert_eq!(recs[0]["decision"]["reason"], "unparseable");
    assert!(seen.is_empty(), "{seen:?}");
    assert!(w.proxy.close_and_verify().await > 0);
}

/// Before, a Gemini file was kept as read when its `upload, finalize` request at offset 0 was read, whatever the
/// session held already: an agent sent its blocked lines as an `upload` chunk of a session (forwarded unread, as any
/// chunk), then finalized the same session with allowed lines from offset 0; the upstream's file held the blocked
/// lines (a server keeps what it has, or ignores bytes it already holds), the proxy kept its name as read, and a batch
/// ran it. Now a file is kept only when the answer's `sizeBytes` and `sha256Hash` are those of the bytes the proxy
/// read and forwarded.
#[tokio::test]
async fn a_gemini_file_is_kept_only_when_the_upstream_stored_what_was_read() {
    let w = world().await;
    let ok = gemini_line("k1", "read_file");
    let bad = gemini_line("k2", "delete_everything");
    let request = |content: &str, command: &str| {
        let mut req = gemini_upload(content, command);
        *req.uri_mut() = "/upload/v1beta/files?upload_id=u-2&upload_protocol=resumable"
            .parse()
            .unwrap();
        req
    };
    let (status, got, _, seen) = exchange(&w, GEMINI, request(&format!("{bad}\n"), "upload")).await;
    assert_eq!((status, seen.len()), (200, 1), "{got}");
    let (status, got, recs, seen) =
        exchange(&w, GEMINI, request(&format!("{ok}\n"), "upload, finalize")).await;
    assert_eq!((status, seen.len()), (200, 1), "{got}");
    assert_eq!(recs[0]["outcome"]["disposition"], "forwarded");
    let file = got["file"]["name"].as_str().unwrap().to_string();
    let (status, got, recs, seen) = exchange(&w, GEMINI, gemini_create(&file)).await;
    assert_eq!(status, 403, "{got}");
    assert_unread(&recs[0], "");
    assert!(seen.is_empty(), "{seen:?}");
    assert!(w.proxy.close_and_verify().await > 0);
}

/// Before, a batch input file whose bytes were not UTF-8 was read from their lossy text (each bad byte a U+FFFD),
/// as no LLM call's body is: a receiver that decodes such bytes otherwise (an overlong `\xC0\xA2` as `"`) reads
/// other members than the lines decided — here a second `model`. Now an upload read as batch input must be UTF-8,
/// as an LLM call's body must: refused as unreadable, never forwarded.
#[tokio::test]
async fn a_batch_input_file_that_is_not_utf8_is_refused() {
    let w = world().await;
    let req = upload("/v1", OPENAI, &[line("gpt-ok", "read_file")]);
    let (parts, body) = req.into_parts();
    let text = String::from_utf8(body.collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let (before, after) = text.split_once("\"model\":\"gpt-ok\"").unwrap();
    // `"model":"gpt-ok\xC0\xA2,\xC0\xA2model\xC0\xA2:\xC0\xA2evil-x"`: one model to the proxy's lossy reading,
    // `"model":"gpt-ok","model":"evil-x"` to a decoder that reads the overlong `\xC0\xA2` as `"`.
    let q = b"\xC0\xA2";
    let sent = [
        before.as_bytes(),
        b"\"model\":\"gpt-ok",
        q,
        b",",
        q,
        b"model",
        q,
        b":",
        q,
        b"evil-x\"",
        after.as_bytes(),
    ]
    .concat();
    let req = Request::from_parts(parts, Full::new(Bytes::from(sent)));
    let (status, got, recs, seen) = exchange(&w, OPENAI, req).await;
    assert_eq!(status, 400, "{got}");
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(recs[0]["decision"]["reason"], "unparseable");
    assert!(seen.is_empty(), "{seen:?}");
    assert!(w.proxy.close_and_verify().await > 0);
}

/// Before, a Gemini file name was kept as read for as long as the daemon remembered it, while the name itself is
/// the client's to choose (a start request's `file.name`) once no file holds it: an agent uploaded allowed lines
/// (kept as `files/x`), deleted the file, uploaded its blocked lines in chunks (never read) under the same name, and
/// a batch naming `files/x` ran them. Now a `DELETE` of a file on Gemini's host forgets every file kept by that
/// name (a file that expires, after its `expirationTime` or 48 hours, is forgotten too), so the batch is refused as
/// `unread_input`.
#[tokio::test]
async fn a_gemini_file_name_deleted_and_reused_is_not_run() {
    let w = world().await;
    let ok = gemini_line("k1", "read_file");
    let bad = gemini_line("k2", "delete_everything");
    let (status, got, _, _) = exchange(
        &w,
        GEMINI,
        gemini_upload(&format!("{ok}\n"), "upload, finalize"),
    )
    .await;
    assert_eq!(status, 200, "{got}");
    let file = got["file"]["name"].as_str().unwrap().to_string();
    let id = file.strip_prefix("files/").unwrap();
    let delete = Request::builder()
        .method("DELETE")
        .uri(format!("/v1beta/files/{id}"))
        .header("host", GEMINI)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, _, seen) = exchange(&w, GEMINI, delete).await;
    assert_eq!((status, seen.len()), (200, 1));
    // The same name, chosen by a start request, for blocked lines sent in a chunk and finalized apart: none read.
    let at = |command: &str, body: String| {
        Request::builder()
            .method("POST")
            .uri("/upload/v1beta/files?upload_id=u-3&upload_protocol=resumable")
            .header("host", GEMINI)
            .header("x-goog-upload-protocol", "resumable")
            .header("x-goog-upload-command", command)
            .header("x-goog-upload-offset", "0")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    let start = json!({"file": {"name": file, "displayName": "again"}}).to_string();
    let (status, _, _, _) = exchange(&w, GEMINI, at("start", start)).await;
    assert_eq!(status, 200);
    let (status, _, _, _) = exchange(&w, GEMINI, at("upload", format!("{bad}\n"))).await;
    assert_eq!(status, 200);
    let (status, got, _, _) = exchange(&w, GEMINI, at("finalize", String::new())).await;
    assert_eq!((status, &got["file"]["name"]), (200, &json!(file)), "{got}");

    let (status, got, recs, seen) = exchange(&w, GEMINI, gemini_create(&file)).await;
    assert_eq!(status, 403, "{got}");
    assert_unread(&recs[0], "");
    assert!(seen.is_empty(), "{seen:?}");
    assert!(w.proxy.close_and_verify().await > 0);
}

/// Before, an upload's answer was read for the file's name as it came: the OpenAI SDK (httpx) and google-genai send
/// `Accept-Encoding: gzip`, the provider's frontend compresses its answer, and the compressed File object named
/// nothing: every file uploaded so was refused at its batch as `unread_input`. Now an upload read as batch input
/// asks the upstream for its answer uncoded, so its name is read and kept.
#[tokio::test]
async fn a_batch_input_file_uploaded_accepting_gzip_is_kept() {
    let w = world().await;
    let mut req = upload("/v1", OPENAI, &[line("gpt-ok", "read_file")]);
    req.headers_mut()
        .insert("accept-encoding", "gzip, deflate".parse().unwrap());
    let (status, got, _, _) = exchange(&w, OPENAI, req).await;
    assert_eq!(status, 200, "{got}");
    let file = got["id"].as_str().unwrap().to_string();
    let (status, got, recs, seen) = exchange(&w, OPENAI, create("/v1", OPENAI, &file)).await;
    assert_eq!((status, &got["id"]), (200, &json!("batch_1")), "{got}");
    assert_eq!(recs[0]["outcome"]["disposition"], "forwarded");
    assert_eq!(seen, ["POST /v1/batches"]);

    let mut req = gemini_upload(
        &format!("{}\n", gemini_line("k1", "read_file")),
        "upload, finalize",
    );
    req.headers_mut()
        .insert("accept-encoding", "gzip".parse().unwrap());
    let (status, got, _, _) = exchange(&w, GEMINI, req).await;
    assert_eq!(status, 200, "{got}");
    let file = got["file"]["name"].as_str().unwrap().to_string();
    let (status, got, _, seen) = exchange(&w, GEMINI, gemini_create(&file)).await;
    assert_eq!((status, seen.len()), (200, 1), "{got}");
    assert!(w.proxy.close_and_verify().await > 0);
}

/// OpenAI's Evals API has the provider call models itself: a run calls its `data_source.model` over the eval's rows,
/// with `data_source.sampling_params.tools`; an eval's model graders call theirs. Before, both were plain HTTP to
/// the policy, so a blocked model or tool ran through them. Now each model named is an LLM call decided as one (one
/// Action each, the tools declared beside it), a body that cannot be read so is refused, and a constrain written
/// for one call's body refuses it.
#[tokio::test]
async fn an_eval_run_and_its_graders_are_decided_as_the_model_calls_they_make() {
    let w = world().await;
    let run = |model: &str, tool: &str| {
        json!({"name": "nightly", "data_source": {"type": "responses", "model": model,
            "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.q}}"}]},
            "sampling_params": {"temperature": 0, "tools": [{"type": "function", "name": tool,
                "parameters": {"type": "object", "properties": {"model": {"type": "string"}}}}]},
            "source": {"type": "file_content", "content": [{"item": {"q": "hi", "model": 7, "Model": "x"}}]}}})
    };
    let grader = |model: &str| {
        json!({"name": "graded", "data_source_config": {"type": "custom", "item_schema": {"type": "object"}},
            "testing_criteria": [{"type": "string_check", "name": "exact", "input": "{{sample.output_text}}",
                "reference": "{{item.a}}", "operation": "eq"},
                {"type": "multi", "name": "m", "calculate_output": "g", "graders": {"g": {"type": "score_model",
                    "name": "judge", "model": model, "input": [{"role": "system", "content": "score it"}]}}}]})
    };
    for (path, body, rule, model) in [
        (
            "/v1/evals/eval_1/runs",
            run("evil-x", "read_file"),
            "no-evil-model",
            "evil-x",
        ),
        (
            "/V1/Evals/eval_1/Runs/",
            run("gpt-ok", "delete_everything"),
            "no-declared-delete",
            "gpt-ok",
        ),
        (
            "/v1/evals",
            grader("evil-judge"),
            "no-evil-model",
            "evil-judge",
        ),
    ] {
        let (status, got, recs, seen) = exchange(&w, OPENAI, post(path, OPENAI, &body)).await;
        assert_eq!(status, 400, "{path}: {got}");
        assert_eq!(got["error"]["code"], "blocked_by_policy", "{got}");
        assert_eq!(recs.len(), 1, "{recs:#?}");
        assert_eq!(
            decided(&recs[0]),
            ("block".into(), rule.into(), "rule".into())
        );
        assert_eq!(recs[0]["request"]["llm_model"], model, "{path}");
        assert!(seen.is_empty(), "{seen:?}");
    }
    // Allowed: forwarded, recorded as the model call it makes.
    for (path, body) in [
        ("/v1/evals/eval_1/runs", run("gpt-ok", "read_file")),
        ("/v1/evals", grader("gpt-ok")),
    ] {
        let (status, got, recs, seen) = exchange(&w, OPENAI, post(path, OPENAI, &body)).await;
        assert_eq!(status, 200, "{path}: {got}");
        assert_eq!(recs[0]["request"]["llm_model"], "gpt-ok");
        assert_eq!(recs[0]["outcome"]["disposition"], "forwarded");
        assert_eq!(seen.len(), 1, "{seen:?}");
    }
    // Unreadable (a model that is no string, a member spelt otherwise outside the data), or constrained: refused.
    let mut misspelt = run("gpt-ok", "read_file");
    misspelt["data_source"]["Model"] = json!("evil-x");
    let mut numeric = run("gpt-ok", "read_file");
    numeric["data_source"]["model"] = json!(4);
    for body in [misspelt, numeric, json!(["not", "an", "object"])] {
        let (status, got, recs, seen) =
            exchange(&w, OPENAI, post("/v1/evals/eval_1/runs", OPENAI, &body)).await;
        assert_eq!(status, 400, "{got}");
        assert_eq!(recs[0]["decision"]["reason"], "unparseable", "{got}");
        assert!(seen.is_empty(), "{seen:?}");
    }
    let (status, got, recs, _) = exchange(
        &w,
        OPENAI,
        post(
            "/v1/evals/eval_1/runs",
            OPENAI,
            &run("capped-1", "read_file"),
        ),
    )
    .await;
    assert_eq!(status, 400, "{got}");
    assert_eq!(
        decided(&recs[0]),
        ("block".into(), "cap-tokens".into(), "unrewritable".into())
    );
    assert!(w.proxy.close_and_verify().await > 0);
}

/// A file of JSON Lines that is not batch input (rows of data), or batch lines sent as one chunk of several, is a
/// file's bytes to Gemini's upload endpoint: stored, not a request. Before, such a body, opening `{` and not one JSON
/// value, was refused as JSON that does not parse (400); now it is forwarded as the upload it is, and recorded. Its
/// file still cannot run as a batch: its lines were not read as calls.
#[tokio::test]
async fn a_gemini_upload_of_data_lines_is_stored_not_refused() {
    let w = world().await;
    let rows = "{\"city\": \"Paris\", \"t\": 21}\n{\"city\": \"Oslo\", \"t\": 4}\n";
    let chunk = format!(
        "{}\n{}\n",
        gemini_line("k1", "read_file"),
        gemini_line("k2", "delete_everything")
    );
    for (content, command) in [(rows, "upload, finalize"), (chunk.as_str(), "upload")] {
        let (status, got, recs, seen) = exchange(&w, GEMINI, gemini_upload(content, command)).await;
        assert_eq!((status, seen.len()), (200, 1), "{command}: {got}");
        assert_eq!(recs.len(), 1, "{recs:#?}");
        assert_eq!(recs[0]["outcome"]["disposition"], "forwarded");
        let file = got["file"]["name"].as_str().unwrap().to_string();
        let (status, got, recs, seen) = exchange(&w, GEMINI, gemini_create(&file)).await;
        assert_eq!(status, 403, "{file}: {got}");
        assert_eq!(recs[0]["decision"]["reason"], "unread_input");
        assert!(seen.is_empty(), "{seen:?}");
    }
    assert!(w.proxy.close_and_verify().await > 0);
}

/// A model allow-list: LLM calls only to the listed models (shell not declared to the pro one), anything else on
/// Gemini's host only when it is no LLM call (its files, its batches), a blocked tool refused everywhere.
const ALLOW_LIST: &str = r#"version: 1
default: block
default_message: not on the allow-list
max_body_bytes: 12MiB
rules:
  - id: listed-models
    when: { llm.model: [gemini-2.5-flash, gemini-2.5-pro, gemini-2.5-redacted] }
    verdict: allow
  - id: gemini-files
    when: { host: generativelanguage.googleapis.com, not: { llm.provider: "*" } }
    verdict: allow
  - id: no-declared-delete
    when: { llm.tools: delete_everything }
    verdict: block
    message: that tool may not be declared
  - id: no-shell-on-pro
    when: { llm.model: gemini-2.5-pro, llm.tools: shell }
    verdict: block
    message: shell may not be declared to the pro model
  - id: no-keys-to-models
    when: { llm.provider: gemini, detect: [aws-access-key] }
    verdict: block
    message: no keys to a model
  - id: redact-emails
    when: { llm.model: gemini-2.5-redacted }
    verdict: constrain
    constrain: { redact: [email] }
"#;

/// Uploads `lines` whole to Gemini and returns the file's name: the upload forwarded, recorded once as the request it
/// is (allowed by `gemini-files`, no LLM call).
async fn gemini_file(w: &World, lines: &[String]) -> String {
    let content = format!("{}\n", lines.join("\n"));
    let (status, got, recs, seen) =
        exchange(w, GEMINI, gemini_upload(&content, "upload, finalize")).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(
        decided(&recs[0]),
        ("allow".into(), "gemini-files".into(), "rule".into())
    );
    assert_eq!(recs[0]["request"]["llm_model"], Value::Null);
    assert_eq!(recs[0]["outcome"]["disposition"], "forwarded");
    assert_eq!(seen, ["POST /upload/v1beta/files"]);
    got["file"]["name"].as_str().unwrap().to_string()
}

/// What a record says of a request's decision and call: the decision, the LLM provider and model, the disposition.
fn verdict_of(r: &Value) -> Value {
    json!({"decision": r["decision"], "llm_provider": r["request"]["llm_provider"],
           "llm_model": r["request"]["llm_model"], "disposition": r["outcome"]["disposition"]})
}

/// Before, every line of a Gemini batch input file was decided at the upload as an LLM call, though Gemini's lines
/// name no model (the create's path does): under a model allow-list every Gemini batch file upload was refused, and
/// a rule on a tool for one model could not be decided. Now the upload is the request it is, and the lines are
/// decided at the create, with its model, exactly as the same requests sent inline in the create: the same status,
/// message and record; the upstream never sees a create refused.
#[tokio::test]
async fn a_gemini_batch_file_is_decided_at_its_create_with_the_create_s_model() {
    let w = world_with(ALLOW_LIST).await;
    let read = gemini_line("k1", "read_file");
    let delete = gemini_line("k2", "delete_everything");
    let shell = gemini_line("k3", "shell");
    let allowed = gemini_file(&w, &[read.clone(), read.clone()]).await;
    let with_delete = gemini_file(&w, &[read.clone(), delete.clone()]).await;
    let with_shell = gemini_file(&w, std::slice::from_ref(&shell)).await;

    // Allowed lines on a listed model: forwarded upstream, recorded as the create's call.
    let (status, got, recs, seen) =
        exchange(&w, GEMINI, gemini_create_on("gemini-2.5-flash", &allowed)).await;
    assert_eq!((status, &got["name"]), (200, &json!("batches/b1")), "{got}");
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(
        decided(&recs[0]),
        ("allow".into(), "listed-models".into(), "rule".into())
    );
    assert_eq!(recs[0]["request"]["llm_model"], "gemini-2.5-flash");
    assert_eq!(recs[0]["outcome"]["disposition"], "forwarded");
    assert_eq!(
        seen,
        ["POST /v1beta/models/gemini-2.5-flash:batchGenerateContent"]
    );

    // Refused as the same lines sent inline are: a blocked tool on any model, a model off the list, shell on pro.
    let refused = [
        (
            "gemini-2.5-flash",
            &with_delete,
            vec![read.clone(), delete.clone()],
            403,
            "that tool may not be declared (policy rule: no-declared-delete)",
        ),
        (
            "gemini-1.0-evil",
            &allowed,
            vec![read.clone(), read.clone()],
            403,
            "not on the allow-list (policy default)",
        ),
        (
            "gemini-2.5-pro",
            &with_shell,
            vec![shell.clone()],
            403,
            "shell may not be declared to the pro model (policy rule: no-shell-on-pro)",
        ),
    ];
    for (model, file, lines, code, message) in refused {
        let (inline_status, inline_got, inline_recs, inline_seen) =
            exchange(&w, GEMINI, gemini_inline_on(model, &lines)).await;
        assert_eq!(
            (inline_status, &inline_got),
            (
                code,
                &json!({"error": {"code": code, "message": message, "status": "PERMISSION_DENIED"}})
            ),
            "{model}"
        );
        assert!(inline_seen.is_empty(), "{inline_seen:?}");
        let (status, got, recs, seen) = exchange(&w, GEMINI, gemini_create_on(model, file)).await;
        assert_eq!((status, &got), (inline_status, &inline_got), "{model}");
        assert_eq!((recs.len(), inline_recs.len()), (1, 1), "{recs:#?}");
        assert_eq!(verdict_of(&recs[0]), verdict_of(&inline_recs[0]), "{model}");
        assert_eq!(recs[0]["request"]["llm_model"], model);
        assert_eq!(recs[0]["outcome"]["disposition"], "blocked");
        assert!(seen.is_empty(), "{model}: {seen:?}");
    }
    // Shell is refused on pro only: the same file runs on flash.
    let (status, got, recs, seen) = exchange(
        &w,
        GEMINI,
        gemini_create_on("gemini-2.5-flash", &with_shell),
    )
    .await;
    assert_eq!((status, &got["name"]), (200, &json!("batches/b1")), "{got}");
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(recs[0]["decision"]["rule"], "listed-models");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(w.proxy.close_and_verify().await > 0);
}

/// A Gemini batch input file whose lines cannot all be read is still refused at its upload (400, `unparseable`),
/// under a model allow-list too, and never forwarded; a line whose request names another model than the create's
/// refuses the create as the same request inline does (400, `unparseable`).
#[tokio::test]
async fn an_unreadable_gemini_batch_file_is_refused_at_its_upload() {
    let w = world_with(ALLOW_LIST).await;
    let ok = gemini_line("k1", "read_file");
    for bad in [
        "not json".to_string(),
        json!({"key": "k2"}).to_string(),
        ok.replace("\"request\"", "\"Request\""),
        json!({"key": "k2", "request": "hi"}).to_string(),
    ] {
        let (status, got, recs, seen) = exchange(
            &w,
            GEMINI,
            gemini_upload(&format!("{ok}\n{bad}\n"), "upload, finalize"),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {got}");
        assert!(
            got.to_string().contains("the batch input cannot be read"),
            "{got}"
        );
        assert_eq!(recs.len(), 1, "{recs:#?}");
        assert_eq!(recs[0]["decision"]["reason"], "unparseable");
        assert!(seen.is_empty(), "{seen:?}");
    }

    let mut other: Value = serde_json::from_str(&ok).unwrap();
    other["request"]["model"] = json!("models/gemini-1.0-evil");
    let other = other.to_string();
    let file = gemini_file(&w, &[ok.clone(), other.clone()]).await;
    let (inline_status, inline_got, inline_recs, _) = exchange(
        &w,
        GEMINI,
        gemini_inline_on("gemini-2.5-flash", &[ok.clone(), other]),
    )
    .await;
    assert_eq!(inline_status, 400, "{inline_got}");
    let (status, got, recs, seen) =
        exchange(&w, GEMINI, gemini_create_on("gemini-2.5-flash", &file)).await;
    assert_eq!((status, &got), (inline_status, &inline_got));
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(verdict_of(&recs[0]), verdict_of(&inline_recs[0]));
    assert_eq!(recs[0]["decision"]["reason"], "unparseable");
    assert!(seen.is_empty(), "{seen:?}");
    assert!(w.proxy.close_and_verify().await > 0);
}

/// The lines of Gemini files are kept in memory until their create, [`enforcer::proxy::KEPT_INPUT_BYTES`] bytes at
/// most: the oldest file is forgotten first, and a create naming it is refused as `unread_input` (its lines can no
/// longer be decided); the newer files still run.
#[tokio::test]
async fn a_gemini_file_forgotten_for_room_is_not_run() {
    let w = world_with(ALLOW_LIST).await;
    // Four files each a little over a quarter of the bound: the fourth leaves no room for the first.
    let quarter = enforcer::proxy::KEPT_INPUT_BYTES / 4;
    let mut files = Vec::new();
    for i in 0..4 {
        let mut line: Value =
            serde_json::from_str(&gemini_line(&format!("k{i}"), "read_file")).unwrap();
        line["request"]["contents"][0]["parts"][0]["text"] = json!("x".repeat(quarter));
        files.push(gemini_file(&w, &[line.to_string()]).await);
    }
    let (status, got, recs, seen) =
        exchange(&w, GEMINI, gemini_create_on("gemini-2.5-flash", &files[0])).await;
    assert_eq!(status, 403, "{got}");
    assert!(
        got.to_string().contains("was not read by the enforcer"),
        "{got}"
    );
    assert_eq!(recs.len(), 1, "{recs:#?}");
    // The create's own decision (its model listed) turned into the block.
    assert_eq!(
        decided(&recs[0]),
        (
            "block".into(),
            "listed-models".into(),
            "unread_input".into()
        )
    );
    assert!(seen.is_empty(), "{seen:?}");
    for file in &files[1..] {
        let (status, got, recs, seen) =
            exchange(&w, GEMINI, gemini_create_on("gemini-2.5-flash", file)).await;
        assert_eq!(status, 200, "{file}: {got}");
        assert_eq!(recs[0]["decision"]["rule"], "listed-models");
        assert_eq!(seen.len(), 1, "{seen:?}");
    }
    assert!(w.proxy.close_and_verify().await > 0);
}

/// In shadow mode a create whose file holds a refused line is recorded as the block it would be, and forwarded.
#[tokio::test]
async fn a_gemini_file_create_in_shadow_mode_is_recorded_and_forwarded() {
    let w =
        world_with(&ALLOW_LIST.replace("default: block\n", "default: block\nmode: shadow\n")).await;
    let file = gemini_file(&w, &[gemini_line("k1", "delete_everything")]).await;
    let (status, got, recs, seen) =
        exchange(&w, GEMINI, gemini_create_on("gemini-2.5-flash", &file)).await;
    assert_eq!((status, &got["name"]), (200, &json!("batches/b1")), "{got}");
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(
        decided(&recs[0]),
        ("block".into(), "no-declared-delete".into(), "rule".into())
    );
    assert_eq!(recs[0]["decision"]["mode"], "shadow");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(w.proxy.close_and_verify().await > 0);
}

/// The text detectors read at a create whose requests are in a file is the create's and the file's (escapes undone),
/// as the same requests inline are read: a key in a line refuses the create under a rule for LLM calls, though the
/// upload, no LLM call, went on. A constrain cannot rewrite the lines in the file the upstream holds: a redaction
/// refuses the create (`unrewritable`), where the same requests inline are redacted and forwarded.
#[tokio::test]
async fn a_gemini_file_create_is_read_for_secrets_and_is_not_rewritten() {
    let w = world_with(ALLOW_LIST).await;
    // `AKIAQWERTYUIOPASDFGH` with its first letter escaped: a detector reads it once the escape is undone.
    let key_line =
        gemini_line("k1", "read_file").replace("\"hi\"", "\"\\u0041KIAQWERTYUIOPASDFGH\"");
    assert!(key_line.contains("\\u0041KIA"), "{key_line}");
    let file = gemini_file(&w, std::slice::from_ref(&key_line)).await;
    let (inline_status, inline_got, inline_recs, _) = exchange(
        &w,
        GEMINI,
        gemini_inline_on("gemini-2.5-flash", &[key_line]),
    )
    .await;
    assert_eq!(
        (inline_status, &inline_got),
        (
            403,
            &json!({"error": {"code": 403, "status": "PERMISSION_DENIED",
                "message": "no keys to a model (policy rule: no-keys-to-models)"}})
        )
    );
    let (status, got, recs, seen) =
        exchange(&w, GEMINI, gemini_create_on("gemini-2.5-flash", &file)).await;
    assert_eq!((status, &got), (inline_status, &inline_got));
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(verdict_of(&recs[0]), verdict_of(&inline_recs[0]));
    assert!(seen.is_empty(), "{seen:?}");

    let mail_line = gemini_line("k1", "read_file").replace("\"hi\"", "\"write to a@example.com\"");
    let file = gemini_file(&w, std::slice::from_ref(&mail_line)).await;
    let (status, got, recs, seen) = exchange(
        &w,
        GEMINI,
        gemini_inline_on("gemini-2.5-redacted", &[mail_line]),
    )
    .await;
    assert_eq!((status, seen.len()), (200, 1), "{got}");
    assert_eq!(recs[0]["decision"]["verdict"], "constrain");
    let (status, got, recs, seen) =
        exchange(&w, GEMINI, gemini_create_on("gemini-2.5-redacted", &file)).await;
    assert_eq!(
        (status, got),
        (
            403,
            json!({"error": {"code": 403, "status": "PERMISSION_DENIED", "message":
                "a constrain rule matched a batch whose requests are in an input file, which it cannot rewrite: \
                 send them inline (policy rule: redact-emails)"}})
        )
    );
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(
        decided(&recs[0]),
        (
            "block".into(),
            "redact-emails".into(),
            "unrewritable".into()
        )
    );
    assert!(seen.is_empty(), "{seen:?}");
    assert!(w.proxy.close_and_verify().await > 0);
}
