//! Block answers in each protocol's own language, against golden answers (tests/fixtures/protocols/blocks/*.json),
//! for requests classified from the golden requests.

use enforcer::inspect::{
    block_batch_response, block_response, classify, BlockResponse, InspectConfig, McpMessage,
    Protocol, Provider,
};
use enforcer::model::{Action, Decision, HttpRequest, Mode, Reason, Transport, Verdict};
use serde_json::{json, Value};

fn read(name: &str) -> Value {
    let path = format!(
        "{}/../tests/fixtures/protocols/{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn decision(verdict: Verdict, rule: Option<&str>, message: Option<&str>) -> Decision {
    Decision {
        verdict,
        deciding_rule: rule.map(str::to_string),
        matched_rules: rule.into_iter().map(str::to_string).collect(),
        reason: Reason::Rule,
        message: message.map(str::to_string),
        rewrites: Vec::new(),
        mode: Mode::Enforce,
        policy_hash: "00".into(),
        review: None,
        labels: Vec::new(),
        counts: Vec::new(),
        retain: None,
    }
}

fn no_deletes() -> Decision {
    decision(
        Verdict::Block,
        Some("no-deletes"),
        Some("Deleting files is not allowed"),
    )
}

/// Classify a golden request the way the proxy would.
fn protocol_of(fixture: &str) -> (Protocol, String) {
    let req = read(fixture)["request"].clone();
    let body = req["body"].to_string();
    let action = Action {
        transport: Transport {
            host: req["host"].as_str().map(str::to_string),
            port: 443,
            ..Transport::default()
        },
        http: Some(
            HttpRequest {
                method: req["method"].as_str().unwrap().into(),
                path: req["path"].as_str().unwrap().into(),
                headers: req
                    .get("headers")
                    .map(|h| serde_json::from_value(h.clone()).unwrap())
                    .unwrap_or_default(),
                query: req
                    .get("query")
                    .map(|h| serde_json::from_value(h.clone()).unwrap())
                    .unwrap_or_default(),
                body: body.clone().into(),
                ..HttpRequest::default()
            }
            .into(),
        ),
        ..Action::default()
    };
    (
        classify(action, &InspectConfig::default())
            .unwrap()
            .protocol,
        body,
    )
}

fn assert_golden(resp: &BlockResponse, golden: &str) {
    let want = read(&format!("blocks/{golden}"));
    assert_eq!(
        u64::from(resp.status),
        want["status"].as_u64().unwrap(),
        "{golden}"
    );
    let headers: serde_json::Map<String, Value> = resp
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
        .collect();
    assert_eq!(Value::Object(headers), want["headers"], "{golden}");
    let body: Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(body, want["body"], "{golden}");
}

#[test]
fn llm_blocks_use_the_provider_error_shape() {
    for (fixture, golden) in [
        ("openai_chat", "openai"),
        ("openai_responses", "openai"),
        ("anthropic_messages", "anthropic"),
        ("gemini_generate", "gemini"),
    ] {
        let (protocol, _) = protocol_of(fixture);
        assert_golden(&block_response(&protocol, &no_deletes()), golden);
    }
    // Other requests to a provider host are answered in the provider's shape too.
    assert_golden(
        &block_response(&Protocol::Provider(Provider::Anthropic), &no_deletes()),
        "anthropic",
    );
}

#[test]
fn plain_http_block() {
    assert_golden(&block_response(&Protocol::Http, &no_deletes()), "http");
}

#[test]
fn mcp_tools_call_is_a_tool_error_with_the_same_id() {
    let (protocol, _) = protocol_of("mcp_tools_call");
    assert_golden(&block_response(&protocol, &no_deletes()), "mcp_tools_call");
}

#[test]
fn mcp_other_methods_are_json_rpc_errors() {
    let (protocol, _) = protocol_of("mcp_legacy_sse_post");
    let resp = block_response(&protocol, &no_deletes());
    assert_eq!(resp.status, 200);
    let body: Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(body["id"], json!(0));
    assert_eq!(body["error"]["code"], json!(-32001));
    assert!(body.get("result").is_none());
}

#[test]
fn mcp_batch_answers_every_request_element() {
    let (protocol, _) = protocol_of("mcp_batch");
    // Notifications, client responses and invalid elements expect no answer of their own.
    assert_golden(&block_response(&protocol, &no_deletes()), "mcp_batch");
}

#[test]
fn mcp_batch_with_per_element_decisions() {
    let (protocol, _) = protocol_of("mcp_batch");
    let allow = decision(Verdict::Allow, None, None);
    let decisions = vec![
        allow.clone(),
        allow.clone(),
        allow.clone(),
        decision(Verdict::Block, Some("no-search"), Some("Search is off")),
        allow.clone(),
        allow,
    ];
    let resp = block_batch_response(&protocol, &decisions);
    assert_eq!(resp.status, 200);
    let body: Value = serde_json::from_slice(&resp.body).unwrap();
    let answers = body.as_array().unwrap();
    assert_eq!(answers.len(), 3);
    assert_eq!(answers[0]["id"], json!("a"));
    assert_eq!(answers[0]["error"]["code"], json!(-32001));
    assert!(answers[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("another message"));
    assert_eq!(answers[2]["id"], json!(3));
    assert_eq!(answers[2]["result"]["isError"], json!(true));
    assert_eq!(
        answers[2]["result"]["content"][0]["text"],
        json!("Search is off (policy rule: no-search)")
    );
}

#[test]
fn notification_only_input_is_refused_with_an_error_status() {
    let protocol = Protocol::Mcp {
        batch: false,
        messages: vec![McpMessage {
            id: None,
            method: "notifications/initialized".into(),
        }],
    };
    assert_golden(
        &block_response(&protocol, &no_deletes()),
        "mcp_notification",
    );
}

#[test]
fn default_block_without_message_says_so() {
    let resp = block_response(
        &Protocol::Provider(Provider::OpenAi),
        &decision(Verdict::Block, None, None),
    );
    let body: Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(
        body["error"]["message"],
        json!("blocked by policy (policy default)")
    );
}

#[test]
fn block_answers_never_echo_request_data() {
    for fixture in [
        "openai_chat",
        "openai_responses",
        "anthropic_messages",
        "gemini_generate",
        "mcp_tools_call",
        "mcp_batch",
    ] {
        let (protocol, body) = protocol_of(fixture);
        let resp = String::from_utf8(block_response(&protocol, &no_deletes()).body).unwrap();
        // Nothing distinctive from the request (arguments, paths, models, tool names) appears in the answer.
        for needle in [
            "acme/prod",
            "/etc/",
            "gpt-4o",
            "claude-sonnet",
            "delete_repo",
            "sk-test",
            "Paris",
            "rust",
        ] {
            if body.contains(needle) {
                assert!(!resp.contains(needle), "{fixture}: answer echoes {needle}");
            }
        }
    }
}
