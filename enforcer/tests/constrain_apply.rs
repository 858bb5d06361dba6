//! CONSTRAIN rewrites on golden provider requests: redaction (JSON strings, text, query, headers), JSON set, remove
//! and cap, header changes, dropping tools, and the refusal to touch opaque signed fields.

use bytes::Bytes;
use enforcer::constrain::{apply_with, ConstrainError, ConstrainOptions};
use enforcer::model::{Change, PlannedRewrite, Rewrite};
use enforcer::policy::detect::Detectors;
use serde_json::{json, Value};

/// The policy's built-in detectors, as `apply` uses them.
fn detectors() -> Detectors {
    Detectors::builtin()
}

const OPENAI_KEY: &str = "sk-proj-abcdefghijklmnopqrstuvwxyz012345";
const AWS_KEY: &str = "AKIAIOSFODNN7EXAMPLE";
const GH_TOKEN: &str = "ghp_abcdefghijklmnopqrstuvwxyz0123456789";

fn fixture_body(name: &str) -> Value {
    let path = format!(
        "{}/../tests/fixtures/protocols/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["request"]["body"].clone()
}

fn parts(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = http::Request::builder().method("POST").uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn rw(rule: &str, rewrite: Rewrite) -> PlannedRewrite {
    PlannedRewrite {
        rule: rule.into(),
        rewrite,
    }
}

fn redact(names: &[&str]) -> PlannedRewrite {
    rw(
        "redact-secrets",
        Rewrite::Redact {
            detectors: names.iter().map(|s| s.to_string()).collect(),
        },
    )
}

struct Run {
    result: Result<Vec<Change>, ConstrainError>,
    parts: http::request::Parts,
    body: Bytes,
}

/// The options for a request to OpenAI's API: its own key in a credential header is the client's.
fn to_openai() -> ConstrainOptions {
    ConstrainOptions {
        credential_provider: Some("openai".into()),
        ..ConstrainOptions::default()
    }
}

fn run(rewrites: &[PlannedRewrite], mut parts: http::request::Parts, body: &Value) -> Run {
    let mut body = Bytes::from(serde_json::to_vec(body).unwrap());
    let result = apply_with(rewrites, &detectors(), &to_openai(), &mut parts, &mut body);
    Run {
        result,
        parts,
        body,
    }
}

fn json_of(b: &Bytes) -> Value {
    serde_json::from_slice(b).unwrap()
}

fn change(path: &str, cause: &str) -> Change {
    Change {
        path: path.parse().unwrap(),
        cause: cause.into(),
    }
}

#[test]
fn redacts_a_key_pasted_into_a_prompt_and_keeps_everything_else() {
    let mut body = fixture_body("openai_chat");
    body["messages"][1]["content"] =
        json!(format!("Use my key {OPENAI_KEY} and \"quote\"\n— thanks"));
    let p = parts(
        "https://api.openai.com/v1/chat/completions",
        &[
            ("content-length", "1"),
            ("content-encoding", "gzip"),
            (
                "authorization",
                "Bearer sk-proj-abcdefghijklmnopqrstuvwxyz999",
            ),
        ],
    );
    let out = run(&[redact(&["openai-key", "aws-access-key"])], p, &body);
    let changes = out.result.unwrap();
    assert_eq!(
        changes,
        vec![change("$.messages[1].content", "redact:openai-key")]
    );

    let mut want = body.clone();
    want["messages"][1]["content"] =
        json!("Use my key [REDACTED:openai-key] and \"quote\"\n— thanks");
    assert_eq!(json_of(&out.body), want);
    // Unknown fields and key order are preserved: the output is the input re-serialised with one string changed.
    assert_eq!(out.body, Bytes::from(serde_json::to_vec(&want).unwrap()));
    assert_eq!(
        out.parts.headers["content-length"],
        out.body.len().to_string().as_str()
    );
    assert!(out.parts.headers.get("content-encoding").is_none());
    // The provider credential header is left alone.
    assert!(out.parts.headers["authorization"]
        .to_str()
        .unwrap()
        .contains("sk-proj-"));
}

#[test]
fn overlapping_and_multiple_detections_in_one_string() {
    let text = format!("a {AWS_KEY} b me@example.com c {AWS_KEY}");
    let body = json!({"messages": [{"role": "user", "content": text}], "n": 1});
    let out = run(
        &[redact(&["email", "aws-access-key"])],
        parts("/x", &[]),
        &body,
    );
    let mut changes = out.result.unwrap();
    changes.sort_by(|a, b| a.cause.cmp(&b.cause));
    assert_eq!(
        changes,
        vec![
            change("$.messages[0].content", "redact:aws-access-key"),
            change("$.messages[0].content", "redact:email"),
        ]
    );
    assert_eq!(
        json_of(&out.body)["messages"][0]["content"],
        json!("a [REDACTED:aws-access-key] b [REDACTED:email] c [REDACTED:aws-access-key]")
    );
}

#[test]
fn redacts_mcp_tool_arguments_and_keys_order() {
    let body = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "http_get", "arguments": {"url": format!("https://x.test/?t={GH_TOKEN}"), "headers": ["Authorization: token ", GH_TOKEN]}}});
    let out = run(&[redact(&["github-token"])], parts("/mcp", &[]), &body);
    assert_eq!(
        out.result.unwrap(),
        vec![
            change("$.params.arguments.url", "redact:github-token"),
            change("$.params.arguments.headers[1]", "redact:github-token"),
        ]
    );
    let got = json_of(&out.body);
    assert_eq!(
        got["params"]["arguments"]["headers"][1],
        json!("[REDACTED:github-token]")
    );
    assert_eq!(got["id"], json!(3));
}

#[test]
fn redacts_query_values_and_header_values() {
    let uri = format!("https://api.example.test/search?q=key%3D{AWS_KEY}&page=2&flag");
    let p = parts(
        &uri,
        &[
            ("x-debug", &format!("token {GH_TOKEN}")),
            ("x-other", "fine"),
        ],
    );
    let mut body = Bytes::new();
    let mut p2 = p;
    let changes = apply_with(
        &[redact(&["aws-access-key", "github-token"])],
        &detectors(),
        &ConstrainOptions::default(),
        &mut p2,
        &mut body,
    )
    .unwrap();
    assert!(changes.contains(&change("query.q", "redact:aws-access-key")));
    assert!(changes.contains(&change("header.x-debug", "redact:github-token")));
    assert_eq!(
        p2.uri.to_string(),
        "https://api.example.test/search?q=key%3D%5BREDACTED%3Aaws-access-key%5D&page=2&flag"
    );
    assert_eq!(p2.headers["x-debug"], "token [REDACTED:github-token]");
    assert_eq!(p2.headers["x-other"], "fine");
    assert!(body.is_empty());
}

#[test]
fn custom_marker() {
    let body = json!({"prompt": format!("mail me@example.com")});
    let mut p = parts("/", &[]);
    let mut b = Bytes::from(body.to_string());
    let options = ConstrainOptions {
        marker: "<{detector} removed>".into(),
        ..ConstrainOptions::default()
    };
    apply_with(
        &[redact(&["email"])],
        &detectors(),
        &options,
        &mut p,
        &mut b,
    )
    .unwrap();
    assert_eq!(json_of(&b)["prompt"], json!("mail <email removed>"));
}

#[test]
fn text_bodies_are_redacted_as_text() {
    let mut p = parts("/upload", &[("content-length", "10")]);
    let mut b = Bytes::from(format!("line one\nkey={AWS_KEY}\n"));
    let changes = apply_with(
        &[redact(&["aws-access-key"])],
        &detectors(),
        &ConstrainOptions::default(),
        &mut p,
        &mut b,
    )
    .unwrap();
    assert_eq!(changes, vec![change("body", "redact:aws-access-key")]);
    assert_eq!(b, "line one\nkey=[REDACTED:aws-access-key]\n");
    assert_eq!(p.headers["content-length"], b.len().to_string().as_str());
}

#[test]
fn nothing_found_leaves_the_body_bytes_untouched() {
    // Odd but valid spacing survives when nothing changes: the body is not re-serialised.
    let raw = "{ \"a\" :  \"plain text\" }";
    let mut p = parts("/", &[("content-length", "24"), ("content-encoding", "br")]);
    let mut b = Bytes::from(raw);
    let changes = apply_with(
        &[redact(&["email"])],
        &detectors(),
        &ConstrainOptions::default(),
        &mut p,
        &mut b,
    )
    .unwrap();
    assert!(changes.is_empty());
    assert_eq!(b, raw);
    assert_eq!(p.headers["content-length"], "24");
}

#[test]
fn secrets_inside_signed_fields_block() {
    // Anthropic thinking text is covered by its signature.
    let mut body = fixture_body("anthropic_messages");
    body["messages"][1]["content"][0]["thinking"] = json!(format!("the key is {AWS_KEY}"));
    let original = body.clone();
    let p = parts("/v1/messages", &[("content-length", "5")]);
    let out = run(&[redact(&["aws-access-key"])], p, &body);
    match out.result {
        Err(ConstrainError::SignedField { path }) => {
            assert_eq!(path, "$.messages[1].content[0].thinking")
        }
        other => panic!("expected SignedField, got {other:?}"),
    }
    // Nothing was modified.
    assert_eq!(json_of(&out.body), original);
    assert_eq!(out.parts.headers["content-length"], "5");

    // OpenAI encrypted_content and Gemini parts with a thought signature.
    let mut body = fixture_body("openai_responses");
    body["input"][1]["encrypted_content"] = json!(format!("blob {OPENAI_KEY}"));
    assert!(matches!(
        run(&[redact(&["openai-key"])], parts("/", &[]), &body).result,
        Err(ConstrainError::SignedField { path }) if path == "$.input[1].encrypted_content"
    ));
    let mut body = fixture_body("gemini_generate");
    body["contents"][1]["parts"][0]["functionCall"]["args"]["note"] = json!("me@example.com");
    assert!(matches!(
        run(&[redact(&["email"])], parts("/", &[]), &body).result,
        Err(ConstrainError::SignedField { .. })
    ));
}

#[test]
fn secrets_elsewhere_in_a_body_with_signed_fields_are_redacted_and_signatures_kept() {
    let mut body = fixture_body("anthropic_messages");
    body["messages"][2]["content"][0]["content"] = json!(format!("token {GH_TOKEN}"));
    let out = run(&[redact(&["github-token"])], parts("/", &[]), &body);
    assert_eq!(
        out.result.unwrap(),
        vec![change(
            "$.messages[2].content[0].content",
            "redact:github-token"
        )]
    );
    let got = json_of(&out.body);
    assert_eq!(got["messages"][1], body["messages"][1]);
    assert_eq!(
        got["messages"][1]["content"][0]["signature"],
        json!("EqQBCkYIARgCIkBsignedopaque")
    );
}

#[test]
fn json_cap_set_remove() {
    let body = fixture_body("openai_chat");
    let rewrites = [
        rw(
            "cap",
            Rewrite::JsonCap {
                path: "$.max_tokens".parse().unwrap(),
                max: 1024.0,
            },
        ),
        rw(
            "cap-missing",
            Rewrite::JsonCap {
                path: "$.max_completion_tokens".parse().unwrap(),
                max: 10.0,
            },
        ),
        rw(
            "set",
            Rewrite::JsonSet {
                path: "$.user".parse().unwrap(),
                value: json!("agent-7"),
            },
        ),
        rw(
            "set-nested",
            Rewrite::JsonSet {
                path: "$.stream_options.include_usage".parse().unwrap(),
                value: json!(false),
            },
        ),
        rw(
            "remove",
            Rewrite::JsonRemove {
                path: "$.x_unknown_vendor_field".parse().unwrap(),
            },
        ),
        rw(
            "remove-missing",
            Rewrite::JsonRemove {
                path: "$.nope".parse().unwrap(),
            },
        ),
    ];
    let out = run(&rewrites, parts("/", &[("content-length", "1")]), &body);
    assert_eq!(
        out.result.unwrap(),
        vec![
            change("$.max_tokens", "json_cap"),
            change("$.user", "json_set"),
            change("$.stream_options.include_usage", "json_set"),
            change("$.x_unknown_vendor_field", "json_remove"),
        ]
    );
    let got = json_of(&out.body);
    assert_eq!(got["max_tokens"], json!(1024));
    assert!(got["max_tokens"].is_u64() || got["max_tokens"].is_i64());
    assert_eq!(got["user"], json!("agent-7"));
    assert_eq!(got["stream_options"], json!({"include_usage": false}));
    assert!(got.get("x_unknown_vendor_field").is_none());
    assert_eq!(got["messages"], body["messages"]);
    assert_eq!(
        out.parts.headers["content-length"],
        out.body.len().to_string().as_str()
    );
}

#[test]
fn json_cap_leaves_smaller_values_and_caps_wildcards() {
    let body = json!({"items": [{"limit": 5}, {"limit": 500}, {"limit": "x"}, {"limit": 2.5}]});
    let out = run(
        &[rw(
            "cap",
            Rewrite::JsonCap {
                path: "$.items[*].limit".parse().unwrap(),
                max: 100.0,
            },
        )],
        parts("/", &[]),
        &body,
    );
    assert_eq!(
        out.result.unwrap(),
        vec![change("$.items[1].limit", "json_cap")]
    );
    assert_eq!(
        json_of(&out.body),
        json!({"items": [{"limit": 5}, {"limit": 100}, {"limit": "x"}, {"limit": 2.5}]})
    );
    let out = run(
        &[rw(
            "cap",
            Rewrite::JsonCap {
                path: "$.items[*].limit".parse().unwrap(),
                max: 1.5,
            },
        )],
        parts("/", &[]),
        &body,
    );
    assert_eq!(out.result.unwrap().len(), 3);
    assert_eq!(json_of(&out.body)["items"][3]["limit"], json!(1.5));
}

#[test]
fn json_rewrites_touching_signed_fields_block() {
    let body = fixture_body("anthropic_messages");
    for (path, rewrite) in [
        (
            "$.messages[1].content[0]",
            Rewrite::JsonRemove {
                path: "$.messages[1].content[0].signature".parse().unwrap(),
            },
        ),
        (
            "$.messages[1].content[1]",
            Rewrite::JsonSet {
                path: "$.messages[1].content[1].data".parse().unwrap(),
                value: json!("x"),
            },
        ),
        (
            "$.messages[1].content[0]",
            Rewrite::JsonRemove {
                path: "$.messages[1]".parse().unwrap(),
            },
        ),
        (
            "$.messages[1].content[0]",
            Rewrite::JsonSet {
                path: "$.messages[*].content[*].cache_control".parse().unwrap(),
                value: json!({"type": "ephemeral"}),
            },
        ),
    ] {
        let out = run(&[rw("r", rewrite.clone())], parts("/", &[]), &body);
        match out.result {
            Err(ConstrainError::SignedField { path: got }) => assert_eq!(got, path, "{rewrite:?}"),
            other => panic!("{rewrite:?}: expected SignedField, got {other:?}"),
        }
        assert_eq!(json_of(&out.body), body);
    }
    // Removing an earlier message moves the signed blocks but does not touch them.
    let out = run(
        &[rw(
            "r",
            Rewrite::JsonRemove {
                path: "$.messages[0]".parse().unwrap(),
            },
        )],
        parts("/", &[]),
        &body,
    );
    assert_eq!(
        out.result.unwrap(),
        vec![change("$.messages[0]", "json_remove")]
    );
    assert_eq!(json_of(&out.body)["messages"][0], body["messages"][1]);
}

#[test]
fn header_set_and_remove() {
    let p = parts("/", &[("x-trace", "1"), ("user-agent", "agent/1")]);
    let rewrites = [
        rw(
            "h1",
            Rewrite::HeaderSet {
                name: "X-Enforcer".parse().unwrap(),
                value: "constrained".parse().unwrap(),
            },
        ),
        rw(
            "h2",
            Rewrite::HeaderRemove {
                name: "X-Trace".parse().unwrap(),
            },
        ),
        rw(
            "h3",
            Rewrite::HeaderRemove {
                name: "x-absent".parse().unwrap(),
            },
        ),
    ];
    let out = run(&rewrites, p, &json!({}));
    assert_eq!(
        out.result.unwrap(),
        vec![
            change("header.x-enforcer", "header_set"),
            change("header.x-trace", "header_remove")
        ]
    );
    assert_eq!(out.parts.headers["x-enforcer"], "constrained");
    assert!(out.parts.headers.get("x-trace").is_none());
    assert_eq!(out.body, "{}");

    // Rewrites are compiled when the policy loads: an invalid header name cannot even be written down.
    assert!("bad name".parse::<http::HeaderName>().is_err());
}

fn drop_tools(globs: &[&str]) -> PlannedRewrite {
    rw(
        "no-delete-tools",
        Rewrite::DropTools {
            globs: globs.iter().map(|g| g.parse().unwrap()).collect(),
        },
    )
}

#[test]
fn drop_tools_openai_chat() {
    let body = fixture_body("openai_chat");
    let out = run(&[drop_tools(&["delete_*"])], parts("/", &[]), &body);
    assert_eq!(
        out.result.unwrap(),
        vec![change("$.tools[1]", "drop_tools")]
    );
    let got = json_of(&out.body);
    assert_eq!(got["tools"], json!([body["tools"][0]]));
    assert_eq!(got["tool_choice"], json!("auto"));
    // Dropping every tool removes the declaration array and what only makes sense with tools.
    let out = run(&[drop_tools(&["*"])], parts("/", &[]), &body);
    assert_eq!(out.result.unwrap().len(), 5);
    let got = json_of(&out.body);
    for key in ["tools", "tool_choice", "parallel_tool_calls"] {
        assert!(got.get(key).is_none(), "{key}");
    }
    assert_eq!(got["messages"], body["messages"]);
}

/// `drop_tools` reads the tool names `llm.tools` reads: a Chat custom tool by `custom.name`; a tool inside a Responses
/// `namespace` by its own name (the namespace kept with the rest, and dropped when emptied), a namespace by its name.
#[test]
fn drop_tools_reads_custom_and_namespaced_tools() {
    let chat = json!({
        "model": "gpt-5",
        "messages": [],
        "tools": [
            {"type": "custom", "custom": {"name": "delete_repo"}},
            {"type": "function", "function": {"name": "get_weather"}}
        ]
    });
    let out = run(&[drop_tools(&["delete_*"])], parts("/", &[]), &chat);
    assert_eq!(
        out.result.unwrap(),
        vec![change("$.tools[0]", "drop_tools")]
    );
    assert_eq!(json_of(&out.body)["tools"], json!([chat["tools"][1]]));

    let responses = json!({
        "model": "gpt-5",
        "input": "hi",
        "tools": [
            {"type": "namespace", "name": "crm", "description": "CRM", "tools": [
                {"type": "function", "name": "delete_account"},
                {"type": "function", "name": "lookup"}
            ]},
            {"type": "namespace", "name": "admin", "description": "x", "tools": [
                {"type": "custom", "name": "delete_all"}
            ]},
            {"type": "namespace", "name": "delete_ns", "description": "x", "tools": [
                {"type": "function", "name": "read"}
            ]}
        ]
    });
    let out = run(&[drop_tools(&["delete_*"])], parts("/", &[]), &responses);
    assert_eq!(
        out.result.unwrap(),
        vec![
            change("$.tools[0].tools[0]", "drop_tools"),
            change("$.tools[1]", "drop_tools"),
            change("$.tools[2]", "drop_tools"),
        ]
    );
    let got = json_of(&out.body);
    assert_eq!(
        got["tools"],
        json!([{"type": "namespace", "name": "crm", "description": "CRM", "tools": [
            {"type": "function", "name": "lookup"}
        ]}])
    );
}

#[test]
fn drop_tools_openai_responses_hosted_mcp_by_url() {
    let body = fixture_body("openai_responses");
    let out = run(
        &[drop_tools(&["mcp:https://mcp.deepwiki.com/*"])],
        parts("/", &[]),
        &body,
    );
    assert_eq!(
        out.result.unwrap(),
        vec![change("$.tools[2]", "drop_tools")]
    );
    let got = json_of(&out.body);
    assert_eq!(got["tools"].as_array().unwrap().len(), 2);
    // The reasoning item's encrypted_content is untouched.
    assert_eq!(got["input"][1], body["input"][1]);
}

#[test]
fn drop_tools_anthropic_with_forced_choice() {
    let mut body = fixture_body("anthropic_messages");
    body["tool_choice"] = json!({"type": "tool", "name": "delete_file"});
    let out = run(
        &[drop_tools(&["delete_*", "mcp:example"])],
        parts("/", &[]),
        &body,
    );
    assert_eq!(
        out.result.unwrap(),
        vec![
            change("$.tools[1]", "drop_tools"),
            change("$.mcp_servers[0]", "drop_tools"),
            change("$.mcp_servers", "drop_tools"),
            change("$.tool_choice", "drop_tools"),
        ]
    );
    let got = json_of(&out.body);
    let names: Vec<&str> = got["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["read_file", "web_search"]);
    assert_eq!(got["messages"], body["messages"]);
}

/// Gemini's built-in tools are named in `llm.tools` by their keys (`googleSearch`), so `drop_tools` drops them by
/// those names too, in either spelling Gemini reads (`google_search`, proto3 JSON), and declarations under
/// `function_declarations` as under `functionDeclarations`.
#[test]
fn drop_tools_gemini_builtin_tools_in_either_spelling() {
    let body = json!({
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "tools": [
            {"google_search": {}},
            {"codeExecution": {}},
            {"function_declarations": [{"name": "delete_all"}, {"name": "set_light"}], "googleSearch": {}}
        ]
    });
    let out = run(
        &[drop_tools(&["googleSearch", "delete_*"])],
        parts("/", &[]),
        &body,
    );
    assert_eq!(
        out.result.unwrap(),
        vec![
            change("$.tools[0]", "drop_tools"),
            change("$.tools[2].functionDeclarations[0]", "drop_tools"),
            change("$.tools[2]", "drop_tools"),
        ]
    );
    let got = json_of(&out.body);
    assert_eq!(
        got["tools"],
        json!([
            {"codeExecution": {}},
            {"function_declarations": [{"name": "set_light"}]}
        ])
    );
    assert_eq!(got["contents"], body["contents"]);
}

/// A Gemini Batch API batch declares its tools in each inline request (`batch.inputConfig.requests.requests[]
/// .request.tools`, either spelling), which `llm.tools` names: `drop_tools` drops them there too. Before, only the
/// body's own `tools` were looked at and the batch was forwarded with the tool a rule dropped.
#[test]
fn drop_tools_reaches_a_gemini_batch_s_inline_requests() {
    let request = |names: &[&str]| {
        let declarations: Vec<Value> = names.iter().map(|n| json!({"name": n})).collect();
        json!({"contents": [{"parts": [{"text": "hi"}]}], "tools": [{"functionDeclarations": declarations}]})
    };
    let body = json!({"batch": {"display_name": "x", "input_config": {"requests": {"requests": [
        {"request": request(&["read_file", "delete_all"]), "metadata": {"key": "a"}},
        {"request": request(&["read_file"])}]}}}});
    let out = run(&[drop_tools(&["delete_*"])], parts("/", &[]), &body);
    assert_eq!(
        out.result.unwrap(),
        vec![change(
            "$.batch.input_config.requests.requests[0].request.tools[0].functionDeclarations[1]",
            "drop_tools"
        )]
    );
    let mut expected = body.clone();
    expected["batch"]["input_config"]["requests"]["requests"][0]["request"] =
        request(&["read_file"]);
    assert_eq!(json_of(&out.body), expected);
    // A batch updated (`batches.updateGenerateContentBatch`): the body is the batch itself.
    let updated =
        json!({"inputConfig": {"requests": {"requests": [{"request": request(&["delete_all"])}]}}});
    let out = run(&[drop_tools(&["delete_*"])], parts("/", &[]), &updated);
    assert_eq!(
        out.result.unwrap(),
        vec![
            change(
                "$.inputConfig.requests.requests[0].request.tools[0].functionDeclarations[0]",
                "drop_tools"
            ),
            change(
                "$.inputConfig.requests.requests[0].request.tools",
                "drop_tools"
            ),
        ]
    );
    let got = json_of(&out.body);
    assert_eq!(
        got["inputConfig"]["requests"]["requests"][0]["request"]["tools"],
        json!(null)
    );
}

#[test]
fn drop_tools_gemini_declarations() {
    let body = fixture_body("gemini_generate");
    let out = run(&[drop_tools(&["delete_*"])], parts("/", &[]), &body);
    assert_eq!(
        out.result.unwrap(),
        vec![
            change("$.tools[0].functionDeclarations[1]", "drop_tools"),
            change(
                "$.toolConfig.functionCallingConfig.allowedFunctionNames",
                "drop_tools"
            ),
        ]
    );
    let got = json_of(&out.body);
    assert_eq!(
        got["tools"][0]["functionDeclarations"],
        json!([{"name": "set_light", "parameters": {"type": "object"}}])
    );
    assert_eq!(
        got["toolConfig"]["functionCallingConfig"]["allowedFunctionNames"],
        json!(["set_light"])
    );
    assert_eq!(got["contents"], body["contents"]);
    // Nothing matching: body bytes unchanged.
    let out = run(&[drop_tools(&["nothing_*"])], parts("/", &[]), &body);
    assert!(out.result.unwrap().is_empty());
    assert_eq!(out.body, Bytes::from(serde_json::to_vec(&body).unwrap()));
}

#[test]
fn errors_for_non_json_bodies_unknown_detectors_and_bad_paths() {
    let mut p = parts("/", &[]);
    let mut b = Bytes::from_static(b"not json");
    let r = apply_with(
        &[rw(
            "s",
            Rewrite::JsonSet {
                path: "$.a".parse().unwrap(),
                value: json!(1),
            },
        )],
        &detectors(),
        &ConstrainOptions::default(),
        &mut p,
        &mut b,
    );
    assert!(matches!(r, Err(ConstrainError::NotJson { rule }) if rule == "s"));
    // An empty body has nothing to remove, cap or drop.
    let mut b = Bytes::new();
    let r = apply_with(
        &[
            rw(
                "r",
                Rewrite::JsonRemove {
                    path: "$.a".parse().unwrap(),
                },
            ),
            rw(
                "c",
                Rewrite::JsonCap {
                    path: "$.a".parse().unwrap(),
                    max: 1.0,
                },
            ),
            drop_tools(&["*"]),
        ],
        &detectors(),
        &ConstrainOptions::default(),
        &mut p,
        &mut b,
    );
    assert_eq!(r.unwrap(), vec![]);
    let out = run(
        &[redact(&["no-such-detector"])],
        parts("/", &[]),
        &json!({}),
    );
    assert!(
        matches!(out.result, Err(ConstrainError::UnknownDetector { detector, .. }) if detector == "no-such-detector")
    );
    // Rewrites are compiled when the policy loads: a path outside the JSONPath subset cannot be written down.
    assert!("messages[0]"
        .parse::<enforcer::jsonpath::JsonPath>()
        .is_err());
}

#[test]
fn secrets_in_keys_and_query_names_block_without_leaking_into_the_error() {
    // Redaction rewrites values, not names: a secret used as a name cannot be removed, so the request is refused,
    // and neither the error nor its message carries the secret.
    let body = json!({ AWS_KEY: format!("value {GH_TOKEN}") });
    let uri = format!("/?{AWS_KEY}={GH_TOKEN}");
    let out = run(
        &[redact(&["aws-access-key", "github-token"])],
        parts(&uri, &[]),
        &body,
    );
    let err = out.result.unwrap_err();
    assert!(matches!(
        err,
        ConstrainError::Unredactable {
            location: "query",
            ..
        }
    ));
    for text in [err.to_string(), format!("{err:?}")] {
        assert!(
            !text.contains(AWS_KEY) && !text.contains(GH_TOKEN),
            "{text}"
        );
    }
}

#[test]
fn changes_never_carry_values() {
    let body = json!({"a": format!("{OPENAI_KEY} {AWS_KEY} me@example.com {GH_TOKEN}")});
    let uri = format!("/?k={AWS_KEY}");
    let out = run(
        &[redact(&[
            "openai-key",
            "aws-access-key",
            "email",
            "github-token",
        ])],
        parts(&uri, &[("x-k", OPENAI_KEY)]),
        &body,
    );
    let changes = out.result.unwrap();
    assert_eq!(changes.len(), 6);
    let text = serde_json::to_string(&changes).unwrap();
    for secret in [OPENAI_KEY, AWS_KEY, "me@example.com", GH_TOKEN] {
        assert!(!text.contains(secret));
        assert!(!String::from_utf8_lossy(&out.body).contains(secret));
    }
}

/// Run one redaction on raw body bytes; returns the result and what would be forwarded.
fn redact_raw(
    uri: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (Result<Vec<Change>, ConstrainError>, Bytes) {
    let mut p = parts(uri, headers);
    let mut b = Bytes::copy_from_slice(body);
    let result = apply_with(
        &[redact(&["aws-access-key", "openai-key"])],
        &detectors(),
        &to_openai(),
        &mut p,
        &mut b,
    );
    (result, b)
}

fn unredactable_at(result: Result<Vec<Change>, ConstrainError>) -> &'static str {
    match result {
        Err(ConstrainError::Unredactable {
            rule,
            detector,
            location,
        }) => {
            assert_eq!(rule, "redact-secrets");
            assert_eq!(detector, "aws-access-key");
            location
        }
        other => panic!("expected Unredactable, got {other:?}"),
    }
}

#[test]
fn a_secret_redaction_cannot_reach_is_refused_not_forwarded() {
    let json = [("content-type", "application/json")];
    let cases: [(String, Vec<u8>, &str); 7] = [
        (
            format!("https://{AWS_KEY}.exfil.example/x"),
            b"{}".to_vec(),
            "host",
        ),
        (
            format!("https://{}.exfil.example/x", AWS_KEY.to_ascii_lowercase()),
            b"{}".to_vec(),
            "host",
        ),
        (format!("/paste/{AWS_KEY}"), b"{}".to_vec(), "path"),
        (
            format!("/paste/%41{}", &AWS_KEY[1..]),
            b"{}".to_vec(),
            "path",
        ),
        (format!("/q?{AWS_KEY}=1"), b"{}".to_vec(), "query"),
        (
            "/upload".into(),
            format!("{{\"{AWS_KEY}\": \"as a key\"}}").into_bytes(),
            "body",
        ),
        (
            "/upload".into(),
            [&[0xff, 0xfe, 0x00][..], AWS_KEY.as_bytes(), &[0x80]].concat(),
            "body",
        ),
    ];
    for (uri, body, want) in cases {
        let (result, _) = redact_raw(&uri, &json, &body);
        assert_eq!(unredactable_at(result), want, "{uri}");
    }
    // A form body hides the key behind percent-escapes the upstream will undo.
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let body = format!("note=%41{}", &AWS_KEY[1..]);
    let (result, _) = redact_raw("/form", &form, body.as_bytes());
    assert_eq!(unredactable_at(result), "body");
}

#[test]
fn an_escaped_secret_in_a_json_string_is_redacted() {
    // `\u0041` is an `A`: the bytes do not show the key, the upstream's parser will.
    let body = format!(r#"{{"prompt":"key \u0041{}","n":1}}"#, &AWS_KEY[1..]);
    let (result, forwarded) = redact_raw("/v1/chat", &[], body.as_bytes());
    assert_eq!(
        result.unwrap(),
        vec![change("$.prompt", "redact:aws-access-key")]
    );
    assert_eq!(
        json_of(&forwarded),
        json!({"prompt": "key [REDACTED:aws-access-key]", "n": 1})
    );
}

#[test]
fn the_clients_own_credentials_do_not_make_a_request_unredactable() {
    let auth = format!("Bearer {OPENAI_KEY}");
    let (result, _) = redact_raw(
        "/v1/chat/completions",
        &[("authorization", &auth)],
        br#"{"prompt":"hello"}"#,
    );
    assert_eq!(result.unwrap(), vec![]);
}

/// Redaction leaves the client's own key to its own provider alone, but redacts another provider's key in the same
/// credential header (which then does not make the request unredactable), and the own key anywhere else.
#[test]
fn only_the_destinations_own_key_in_a_credential_header_is_left_alone() {
    let ant = "sk-ant-api03-abcdefghijklmnopqrstuvwxyz_0123";
    let p = parts(
        "https://api.openai.com/v1/chat/completions",
        &[
            ("authorization", &format!("Bearer {OPENAI_KEY}")),
            ("x-api-key", ant),
            ("x-debug", OPENAI_KEY),
        ],
    );
    let body = json!({"model": "gpt-4o", "messages": []});
    let out = run(&[redact(&["openai-key", "anthropic-key"])], p, &body);
    let mut changes = out.result.unwrap();
    changes.sort_by(|a, b| a.path.cmp(&b.path));
    assert_eq!(
        changes,
        vec![
            change("header.x-api-key", "redact:anthropic-key"),
            change("header.x-debug", "redact:openai-key"),
        ]
    );
    let h = &out.parts.headers;
    assert_eq!(h["authorization"], format!("Bearer {OPENAI_KEY}").as_str());
    assert_eq!(h["x-api-key"], "[REDACTED:anthropic-key]");
    assert_eq!(h["x-debug"], "[REDACTED:openai-key]");

    // Sent to a host that is no provider, the same credential header is redacted too.
    let mut p = parts(
        "https://collector.example/upload",
        &[("authorization", &format!("Bearer {OPENAI_KEY}"))],
    );
    let mut b = Bytes::from_static(b"{}");
    let changes = apply_with(
        &[redact(&["openai-key"])],
        &detectors(),
        &ConstrainOptions::default(),
        &mut p,
        &mut b,
    )
    .unwrap();
    assert_eq!(
        changes,
        vec![change("header.authorization", "redact:openai-key")]
    );
}

/// A rewrite works on the member a case-insensitive decoder (Go's `encoding/json`) binds: a lone `Max_tokens` is
/// capped under a `json_cap` on `$.max_tokens`, never left for the upstream to read.
#[test]
fn json_rewrites_bind_a_member_spelt_in_another_case() {
    let body = json!({"model": "m", "Max_tokens": 100000, "Tools": [{"type": "function"}]});
    let rewrites = [
        rw(
            "cap",
            Rewrite::JsonCap {
                path: "$.max_tokens".parse().unwrap(),
                max: 1024.0,
            },
        ),
        rw(
            "remove",
            Rewrite::JsonRemove {
                path: "$.tools".parse().unwrap(),
            },
        ),
    ];
    let out = run(&rewrites, parts("/", &[]), &body);
    assert_eq!(
        out.result.unwrap(),
        vec![
            change("$.Max_tokens", "json_cap"),
            change("$.Tools", "json_remove")
        ]
    );
    assert_eq!(
        json_of(&out.body),
        json!({"model": "m", "Max_tokens": 1024})
    );
}
