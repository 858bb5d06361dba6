//! How the proxy carries decisions out beyond allow/block: constrain rewrites the forwarded request (and the audit
//! lists what changed), shadow mode records the real decision but forwards unmodified.

mod proxy_support;

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use proxy_support::*;

const H1: &[u8] = b"http/1.1";

async fn upstream(ca: &TestCa) -> (std::net::SocketAddr, std::sync::Arc<Seen>) {
    let (chain, key) = ca.leaf(&["allowed.test", "blocked.test"]);
    https_upstream(chain, key, true).await
}

fn post_json(path: &str, host: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder()
        .method("POST")
        .uri(path)
        .header("host", host)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap()
}

#[tokio::test]
async fn constrain_rewrites_the_forwarded_body_and_records_the_changes() {
    let ca = TestCa::new("decisions CA");
    let yaml = r#"version: 1
default: block
rules:
 - id: ok
   when: { host: allowed.test }
   verdict: allow
 - id: cap
   when: { host: allowed.test, path: /cap }
   verdict: constrain
   constrain: { json_cap: { "$.limit": 100 } }
"#;
    let proxy = start_proxy(yaml, &[&ca], false).await;
    let (up, seen) = upstream(&ca).await;
    let tls = proxy.tls_to(up, "allowed.test", &[H1]).await;
    let (status, _, body) = send(
        tls,
        false,
        post_json("/cap", "allowed.test", r#"{"limit":5000,"q":"x"}"#),
    )
    .await;
    let body = String::from_utf8(body).unwrap();
    assert_eq!(status, 200, "{body}");
    let sent = body.split("body=").nth(1).unwrap();
    let sent: serde_json::Value = serde_json::from_str(sent).unwrap();
    assert_eq!(sent["limit"], 100);
    assert_eq!(sent["q"], "x");
    assert_eq!(seen.count(), 1);
    let records = proxy.audit_records().await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["decision"]["verdict"], "constrain");
    assert_eq!(records[0]["outcome"]["disposition"], "forwarded");
    let changes = records[0]["request"]["changes"].as_array().unwrap();
    assert!(
        changes.iter().any(|c| c["cause"] == "json_cap"),
        "{changes:?}"
    );
}

#[tokio::test]
async fn shadow_mode_forwards_unmodified_but_records_the_block() {
    let ca = TestCa::new("decisions CA");
    let yaml = "version: 1\nmode: shadow\ndefault: allow\nrules:\n - id: no-blocked\n   when: { host: blocked.test }\n   verdict: block\n";
    let proxy = start_proxy(yaml, &[&ca], false).await;
    let (up, seen) = upstream(&ca).await;
    let tls = proxy.tls_to(up, "blocked.test", &[H1]).await;
    let (status, _, _) = send(tls, false, get("/", "blocked.test")).await;
    assert_eq!(status, 200);
    assert_eq!(seen.count(), 1);
    let records = proxy.audit_records().await;
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["decision"]["verdict"], "block");
    assert_eq!(records[0]["decision"]["mode"], "shadow");
    assert_eq!(records[0]["outcome"]["disposition"], "forwarded");
}

#[tokio::test]
async fn constrain_header_rewrite_reaches_the_upstream() {
    let ca = TestCa::new("decisions CA");
    let yaml = r#"version: 1
default: block
rules:
 - id: tag
   when: { host: allowed.test }
   verdict: constrain
   constrain: { header_set: { x-tag: enforced } }
"#;
    let proxy = start_proxy(yaml, &[&ca], false).await;
    let (up, seen) = upstream(&ca).await;
    let tls = proxy.tls_to(up, "allowed.test", &[b"h2"]).await;
    let req = Request::builder()
        .uri("https://allowed.test/t")
        .header("x-tag", "original")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let (status, _, body) = send(tls, true, req).await;
    let body = String::from_utf8(body).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("tag=enforced"), "{body}");
    assert_eq!(seen.count(), 1);
    let records = proxy.audit_records().await;
    assert_eq!(records[0]["request"]["changes"][0]["cause"], "header_set");
}

/// A JSON-RPC batch whose elements are decided one by one: each blocked element is answered with its own rule's
/// message (a tool error for `tools/call`, a `-32001` error otherwise), each allowed element — not forwarded,
/// because the batch goes upstream whole or not at all — with an error saying so and naming the rules that blocked
/// the batch; the notification gets no answer, nothing reaches the server, one record names the batch's decision.
#[tokio::test]
async fn mcp_batch_answers_name_each_elements_own_reason() {
    let ca = TestCa::new("decisions CA");
    let yaml = r#"version: 1
default: block
rules:
 - id: no-deletes
   when: { mcp.tool: "delete_*" }
   verdict: block
   message: Deleting is not allowed
 - id: no-system-files
   when: { mcp.method: resources/read }
   verdict: block
   message: System files are off limits
 - id: cap-search
   when: { mcp.tool: search }
   verdict: constrain
   constrain: { json_cap: { "$[*].params.arguments.limit": 10 } }
 - id: mcp
   when: { host: allowed.test }
   verdict: log
"#;
    let proxy = start_proxy(yaml, &[&ca], false).await;
    let (up, seen) = upstream(&ca).await;
    for h2 in [false, true] {
        let alpn: &[u8] = if h2 { b"h2" } else { H1 };
        let tls = proxy.tls_to(up, "allowed.test", &[alpn]).await;
        let batch = r#"[
            {"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"delete_repo","arguments":{"repo":"acme/prod"}}},
            {"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"search","arguments":{"q":"x","limit":50}}},
            {"jsonrpc":"2.0","id":"three","method":"resources/read","params":{"uri":"file:///etc/shadow"}},
            {"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":1,"progress":1}},
            {"jsonrpc":"2.0","id":4,"method":"tools/list"}
        ]"#;
        let uri = if h2 {
            "https://allowed.test/mcp"
        } else {
            "/mcp"
        };
        let (status, _, body) = send(tls, h2, post_json(uri, "allowed.test", batch)).await;
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status, 200, "{body}");
        let answers = body.as_array().expect("one answer per request element");
        let ids: Vec<_> = answers.iter().map(|a| a["id"].clone()).collect();
        assert_eq!(
            ids,
            [serde_json::json!(1), 2.into(), "three".into(), 4.into()],
            "{body}"
        );

        let deleted = &answers[0];
        assert_eq!(deleted["result"]["isError"], true, "{deleted}");
        assert_eq!(
            deleted["result"]["content"][0]["text"],
            "Deleting is not allowed (policy rule: no-deletes)"
        );
        let system = &answers[2];
        assert_eq!(system["error"]["code"], -32001, "{system}");
        assert_eq!(
            system["error"]["message"],
            "System files are off limits (policy rule: no-system-files)"
        );
        assert_eq!(system["error"]["data"]["rule"], "no-system-files");
        for allowed in [&answers[1], &answers[3]] {
            assert_eq!(allowed["error"]["code"], -32001, "{allowed}");
            let message = allowed["error"]["message"].as_str().unwrap();
            assert!(message.starts_with("not forwarded"), "{allowed}");
            assert!(
                message.contains("no-deletes") && message.contains("no-system-files"),
                "the answer names what blocked the batch: {allowed}"
            );
            assert_eq!(
                allowed["error"]["data"]["reason"], "batch_blocked",
                "{allowed}"
            );
            assert!(allowed["error"]["data"]["rule"].is_null(), "{allowed}");
        }
    }
    assert_eq!(
        seen.count(),
        0,
        "nothing of a blocked batch reaches the server"
    );
    let records = proxy.audit_records().await;
    assert_eq!(records.len(), 2, "{records:#?}");
    for r in &records {
        assert_eq!(r["decision"]["verdict"], "block", "{r}");
        assert_eq!(r["outcome"]["disposition"], "blocked", "{r}");
        assert_eq!(r["outcome"]["status"], 200, "{r}");
        let matched = r["decision"]["matched"].as_array().unwrap();
        for rule in ["no-deletes", "no-system-files", "cap-search"] {
            assert!(matched.iter().any(|m| m == rule), "{r}");
        }
    }
}

/// A JSON-RPC batch of thousands of elements in a body of about 1.5 MB is decided element by element, as any
/// batch: every element's Action shares the one request (head, body, parsed JSON), so the memory its Actions hold
/// does not grow with elements × body (a copy per element made a 3 MB batch of 40,000 elements hold 16 GB, and a
/// batch of 2,000 elements in 200 KB abort the daemon). The allowed batch is forwarded whole; the one naming a
/// blocked tool in element 4,321 is answered element by element and not forwarded; one record each.
#[tokio::test]
async fn a_batch_of_thousands_of_elements_is_decided_without_a_copy_per_element() {
    let ca = TestCa::new("decisions CA");
    let yaml = r#"version: 1
default: block
rules:
 - id: no-deletes
   when: { mcp.tool: "delete_*" }
   verdict: block
   message: Deleting is not allowed
 - id: mcp
   when: { host: allowed.test }
   verdict: log
"#;
    let proxy = start_proxy(yaml, &[&ca], false).await;
    let (up, seen) = upstream(&ca).await;
    const ELEMENTS: usize = 5000;
    let padding = "x".repeat(240);
    let batch = |blocked: Option<usize>| {
        let elements: Vec<String> = (0..ELEMENTS)
            .map(|i| {
                let tool = if blocked == Some(i) { "delete_repo" } else { "search" };
                format!(
                    r#"{{"jsonrpc":"2.0","id":{i},"method":"tools/call","params":{{"name":"{tool}","arguments":{{"q":"{padding}"}}}}}}"#
                )
            })
            .collect();
        format!("[{}]", elements.join(","))
    };
    let post = |body: String| post_json("/mcp", "allowed.test", body);
    let allowed = batch(None);
    assert!(allowed.len() > 1_400_000, "{}", allowed.len());
    let tls = proxy.tls_to(up, "allowed.test", &[H1]).await;
    let (status, _, _) = send(tls, false, post(allowed)).await;
    assert_eq!(status, 200);
    assert_eq!(seen.count(), 1, "the allowed batch is forwarded whole");

    let tls = proxy.tls_to(up, "allowed.test", &[H1]).await;
    let (status, _, body) = send(tls, false, post(batch(Some(4321)))).await;
    assert_eq!(status, 200);
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let answers = body.as_array().expect("one answer per element");
    assert_eq!(answers.len(), ELEMENTS);
    let deleted = &answers[4321];
    assert_eq!(deleted["id"], 4321);
    assert_eq!(
        deleted["result"]["content"][0]["text"],
        "Deleting is not allowed (policy rule: no-deletes)"
    );
    assert_eq!(answers[0]["error"]["data"]["reason"], "batch_blocked");
    assert_eq!(
        seen.count(),
        1,
        "nothing of the blocked batch reaches the server"
    );

    let records = proxy.audit_records().await;
    assert_eq!(records.len(), 2, "one record per batch");
    assert_eq!(
        records[0]["decision"]["verdict"], "log",
        "{}",
        records[0]["decision"]
    );
    assert_eq!(records[0]["outcome"]["disposition"], "forwarded");
    assert_eq!(
        records[1]["decision"]["verdict"], "block",
        "{}",
        records[1]["decision"]
    );
    assert_eq!(records[1]["decision"]["rule"], "no-deletes");
    assert_eq!(records[1]["outcome"]["disposition"], "blocked");
}

/// A batch whose deciding element is constrained by a rewrite that cannot be applied (a secret in an object key,
/// which redaction cannot reach) is blocked instead: that element's answer names the rule and why, the other
/// element's says it was not forwarded because of it.
#[tokio::test]
async fn mcp_batch_constrain_turned_block_names_the_element() {
    let ca = TestCa::new("decisions CA");
    let yaml = r#"version: 1
default: block
rules:
 - id: redact-keys
   when: { detect: [aws-access-key] }
   verdict: constrain
   constrain: { redact: [aws-access-key] }
 - id: mcp
   when: { host: allowed.test }
   verdict: log
"#;
    let proxy = start_proxy(yaml, &[&ca], false).await;
    let (up, seen) = upstream(&ca).await;
    let tls = proxy.tls_to(up, "allowed.test", &[H1]).await;
    let batch = r#"[
        {"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"put","arguments":{"AKIAIOSFODNN7EXAMPLE":"v"}}},
        {"jsonrpc":"2.0","id":2,"method":"tools/list"}
    ]"#;
    let (status, _, body) = send(tls, false, post_json("/mcp", "allowed.test", batch)).await;
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200, "{body}");
    let answers = body.as_array().unwrap();
    assert_eq!(answers.len(), 2, "{body}");
    let text = answers[0]["result"]["content"][0]["text"].as_str().unwrap();
    assert!(
        text.contains("aws-access-key") && text.ends_with("(policy rule: redact-keys)"),
        "{text}"
    );
    assert!(!text.contains("AKIA"), "the secret is never echoed: {text}");
    let other = &answers[1];
    assert_eq!(other["error"]["data"]["reason"], "batch_blocked", "{other}");
    assert!(
        other["error"]["message"]
            .as_str()
            .unwrap()
            .contains("policy rule: redact-keys"),
        "{other}"
    );
    assert_eq!(seen.count(), 0);
    let records = proxy.audit_records().await;
    assert_eq!(
        records[0]["decision"]["reason"], "unredactable",
        "{}",
        records[0]
    );
}

/// Through the whole pipeline: an agent's own Anthropic key in `x-api-key` to Anthropic's API is not a leaked
/// secret (neither a `detect` block rule nor the redaction rule fires: recorded as the plain log it is), the same
/// key in the prompt is; and a constrain whose rewrites change nothing is recorded as what was done — forwarded as
/// received, verdict `log`, reason `unchanged`, its rule named — not as a constrain.
#[tokio::test]
async fn a_providers_own_key_is_no_secret_and_an_unchanged_constrain_is_recorded_as_such() {
    let ca = TestCa::new("decisions CA");
    let yaml = r#"version: 1
default: block
rules:
 - id: llm-providers
   when: { host: api.anthropic.com }
   verdict: log
 - id: no-anthropic-keys-out
   when: { detect: [anthropic-key] }
   verdict: block
   message: Anthropic keys stay here
 - id: cap-tokens
   when: { path: /v1/capped }
   verdict: constrain
   constrain: { json_cap: { "$.max_tokens": 4096 } }
"#;
    let proxy = start_proxy(yaml, &[&ca], false).await;
    let (chain, key) = ca.leaf(&["api.anthropic.com"]);
    let (up, seen) = https_upstream(chain, key, true).await;
    let own = "sk-ant-api03-abcdefghijklmnopqrstuvwxyz_0123";
    let call = |path: &str, body: String| {
        Request::builder()
            .method("POST")
            .uri(path)
            .header("host", "api.anthropic.com")
            .header("content-type", "application/json")
            .header("x-api-key", own)
            .header("anthropic-version", "2023-06-01")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    let messages = r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"messages":[{"role":"user","content":"hi"}]}"#;
    for (path, status) in [("/v1/messages", 200), ("/v1/capped", 200)] {
        let tls = proxy.tls_to(up, "api.anthropic.com", &[H1]).await;
        let (got, _, body) = send(tls, false, call(path, messages.to_string())).await;
        assert_eq!(got, status, "{path}: {}", String::from_utf8_lossy(&body));
    }
    let leaked = messages.replace("\"hi\"", &format!("\"my key is {own}\""));
    let tls = proxy.tls_to(up, "api.anthropic.com", &[H1]).await;
    let (got, _, body) = send(tls, false, call("/v1/messages", leaked)).await;
    assert_eq!(got, 451, "{}", String::from_utf8_lossy(&body));
    assert_eq!(seen.count(), 2);

    let records = proxy.audit_records().await;
    assert_eq!(records.len(), 3, "{records:#?}");
    let d = |i: usize| &records[i]["decision"];
    assert_eq!(
        (d(0)["verdict"].as_str(), d(0)["rule"].as_str()),
        (Some("log"), Some("llm-providers")),
        "{}",
        records[0]
    );
    assert_eq!(records[0]["request"]["changes"], serde_json::json!([]));
    assert_eq!(d(1)["verdict"], "log", "{}", records[1]);
    assert_eq!(d(1)["reason"], "unchanged", "{}", records[1]);
    assert_eq!(d(1)["rule"], "cap-tokens", "{}", records[1]);
    assert_eq!(records[1]["request"]["changes"], serde_json::json!([]));
    assert_eq!(records[1]["outcome"]["disposition"], "forwarded");
    assert_eq!(
        (d(2)["verdict"].as_str(), d(2)["rule"].as_str()),
        (Some("block"), Some("no-anthropic-keys-out"))
    );
}
