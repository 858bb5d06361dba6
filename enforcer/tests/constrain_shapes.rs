//! Untrusted bodies of odd shapes: classification and every rewrite either succeed or fail with an error, never
//! panic, and never lose data they were not asked to change.

use bytes::Bytes;
use enforcer::constrain::{apply_with, ConstrainOptions};
use enforcer::inspect::{block_response, classify, InspectConfig};
use enforcer::model::{
    Action, Decision, HttpRequest, Mode, PlannedRewrite, Reason, Rewrite, Transport, Verdict,
};
use enforcer::policy::detect::Detectors;
use serde_json::{json, Value};

fn odd_bodies() -> Vec<Value> {
    vec![
        json!(null),
        json!(42),
        json!("a string"),
        json!([]),
        json!([null, 1, "x", {"jsonrpc": "2.0", "id": {"nested": true}, "method": "tools/call", "params": "not an object"}]),
        json!({"jsonrpc": "2.0", "id": [1], "method": "tools/call", "params": {"name": 5, "arguments": "x"}}),
        json!({"jsonrpc": "2.0", "method": "resources/read", "params": {"uri": {"not": "a string"}}}),
        json!({"model": 5, "stream": "yes", "tools": "none", "messages": {"role": "tool"}}),
        json!({"model": "m", "tools": [1, "x", null, {"function": 3}, {"type": "mcp"}, {"functionDeclarations": "x"}, {"functionDeclarations": [1, {"name": 2}]}],
               "tool_choice": 7, "functions": [{}], "mcp_servers": [1], "toolConfig": {"functionCallingConfig": {"allowedFunctionNames": [1, "x"]}}}),
        json!({"contents": [{"parts": "x"}, {"parts": [1, {"functionResponse": null}]}], "input": [1, {"type": 2}]}),
        json!({"messages": [{"content": [{"type": "thinking"}, {"type": "redacted_thinking", "data": 1}, {"thoughtSignature": null}]}], "encrypted_content": [1, 2]}),
    ]
}

fn action(host: &str, path: &str, body: &Value) -> Action {
    Action {
        transport: Transport {
            host: Some(host.into()),
            port: 443,
            ..Transport::default()
        },
        http: Some(
            HttpRequest {
                method: "POST".into(),
                path: path.parse().unwrap(),
                body: body.to_string().into(),
                ..HttpRequest::default()
            }
            .into(),
        ),
        ..Action::default()
    }
}

#[test]
fn classification_and_blocks_of_odd_bodies_do_not_panic() {
    let decision = Decision {
        verdict: Verdict::Block,
        deciding_rule: Some("r".into()),
        matched_rules: vec!["r".into()],
        reason: Reason::Rule,
        message: Some("no".into()),
        rewrites: Vec::new(),
        mode: Mode::Enforce,
        policy_hash: String::new(),
        review: None,
        labels: Vec::new(),
        counts: Vec::new(),
        retain: None,
    };
    for body in odd_bodies() {
        for (host, path) in [
            ("api.openai.com", "/v1/chat/completions"),
            ("api.openai.com", "/v1/responses"),
            ("api.anthropic.com", "/v1/messages"),
            (
                "generativelanguage.googleapis.com",
                "/v1beta/models/m:generateContent",
            ),
            (
                "generativelanguage.googleapis.com",
                "/v1beta/models/:generateContent",
            ),
            ("mcp.test", "/mcp"),
        ] {
            if let Ok(out) = classify(action(host, path, &body), &InspectConfig::default()) {
                assert!(!out.actions.is_empty());
                let resp = block_response(&out.protocol, &decision);
                assert!(serde_json::from_slice::<Value>(&resp.body).is_ok());
            }
        }
    }
}

#[test]
fn rewrites_on_odd_bodies_do_not_panic() {
    let detectors = Detectors::builtin();
    let rewrites: Vec<PlannedRewrite> = [
        Rewrite::Redact {
            detectors: detectors.names().map(str::to_string).collect(),
        },
        Rewrite::DropTools {
            globs: vec!["*".parse().unwrap()],
        },
        Rewrite::JsonCap {
            path: "$.*".parse().unwrap(),
            max: 1.0,
        },
        Rewrite::JsonRemove {
            path: "$.messages[0].content[*]".parse().unwrap(),
        },
        Rewrite::JsonSet {
            path: "$.a.b".parse().unwrap(),
            value: json!(1),
        },
        Rewrite::JsonSet {
            path: "$".parse().unwrap(),
            value: json!({}),
        },
    ]
    .into_iter()
    .map(|rewrite| PlannedRewrite {
        rule: "r".into(),
        rewrite,
    })
    .collect();
    for body in odd_bodies() {
        for rw in &rewrites {
            let mut parts = http::Request::builder()
                .uri("/?a=b&&=&%zz=%")
                .body(())
                .unwrap()
                .into_parts()
                .0;
            let mut b = Bytes::from(body.to_string());
            if let Ok(_changes) = apply_with(
                std::slice::from_ref(rw),
                &detectors,
                &ConstrainOptions::default(),
                &mut parts,
                &mut b,
            ) {
                assert!(
                    serde_json::from_slice::<Value>(&b).is_ok(),
                    "{rw:?} on {body}"
                );
            }
        }
    }
}
