//! The pure pipeline with a real policy: classify a request, evaluate it with `policies/default.yaml`, carry the
//! CONSTRAIN out with `constrain::apply` (the policy's built-in detectors), and check what the upstream would get.

use bytes::Bytes;
use enforcer::constrain;
use enforcer::inspect::{classify, InspectConfig, Protocol};
use enforcer::model::{Action, HttpRequest, Transport, Verdict};
use enforcer::policy::Policy;
use serde_json::{json, Value};

fn default_policy() -> Policy {
    let path = format!("{}/../policies/default.yaml", env!("CARGO_MANIFEST_DIR"));
    Policy::load(std::path::Path::new(&path)).unwrap()
}

fn llm_request(host: &str, path: &str, body: &Value) -> (Action, http::request::Parts, Bytes) {
    let text = body.to_string();
    let action = Action {
        transport: Transport {
            host: Some(host.into()),
            port: 443,
            ..Transport::default()
        },
        http: Some(
            HttpRequest {
                method: "POST".into(),
                path: path.into(),
                body_size: text.len() as u64,
                body: text.clone().into(),
                ..HttpRequest::default()
            }
            .into(),
        ),
        ..Action::default()
    };
    let parts = http::Request::builder()
        .method("POST")
        .uri(format!("https://{host}{path}"))
        .header("content-length", text.len())
        .body(())
        .unwrap()
        .into_parts()
        .0;
    (action, parts, Bytes::from(text))
}

const SECRETS: &[(&str, &str)] = &[
    ("aws-access-key", "AKIAIOSFODNN7EXAMPLE"),
    ("github-token", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
    ("openai-key", "sk-proj-abcdefghijklmnopqrstuvwxyz012345"),
    ("anthropic-key", "sk-ant-api03-abcdefghijklmnopqrstuvwxyz"),
    ("slack-token", "xoxb-1234567890-abcdefghij"),
    ("email", "ops@example.com"),
    ("card-number", "4111 1111 1111 1111"),
    (
        "private-key",
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk\n-----END OPENSSH PRIVATE KEY-----",
    ),
];

#[test]
fn every_builtin_secret_in_a_prompt_reaches_the_upstream_redacted() {
    let policy = default_policy();
    for (detector, secret) in SECRETS {
        let body = json!({
            "model": "claude-sonnet-4-5",
            "max_tokens": 100,
            "messages": [{"role": "user", "content": format!("fn x() {{}}\n credentials: {secret}\nthanks")}],
            "metadata": {"user_id": "u-1"},
        });
        let (action, mut parts, mut raw) = llm_request("api.anthropic.com", "/v1/messages", &body);
        let inspected = classify(action, &InspectConfig::default()).unwrap();
        assert!(matches!(inspected.protocol, Protocol::Llm { .. }));
        let decision = policy.evaluate(&inspected.actions[0]);
        assert_eq!(decision.verdict, Verdict::Constrain, "{detector}");
        let changes =
            constrain::apply(&decision.rewrites, &policy, None, &mut parts, &mut raw).unwrap();
        assert_eq!(changes.len(), 1, "{detector}: {changes:?}");
        assert_eq!(changes[0].path, "$.messages[0].content");
        assert_eq!(changes[0].cause, format!("redact:{detector}"));
        let sent: Value = serde_json::from_slice(&raw).unwrap();
        let mut want = body.clone();
        want["messages"][0]["content"] = json!(format!(
            "fn x() {{}}\n credentials: [REDACTED:{detector}]\nthanks"
        ));
        assert_eq!(sent, want, "{detector}");
        assert_eq!(
            parts.headers["content-length"],
            raw.len().to_string().as_str()
        );
    }
}

#[test]
fn a_clean_prompt_is_not_constrained() {
    let policy = default_policy();
    let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}]});
    let (action, _, _) = llm_request("api.openai.com", "/v1/chat/completions", &body);
    let inspected = classify(action, &InspectConfig::default()).unwrap();
    let decision = policy.evaluate(&inspected.actions[0]);
    assert_ne!(decision.verdict, Verdict::Constrain);
    assert_ne!(decision.verdict, Verdict::Block);
}

#[test]
fn the_policy_sets_the_redaction_marker() {
    let src = r#"
version: 1
default: block
redaction_marker: "<removed {detector}>"
rules:
  - id: redact
    when: { detect: [github-token] }
    verdict: constrain
    constrain: { redact: [github-token] }
"#;
    let policy = Policy::from_yaml(src, "marker.yaml").unwrap();
    assert_eq!(policy.redaction_marker(), "<removed {detector}>");
    let token = "ghp_abcdefghijklmnopqrstuvwxyz0123456789";
    let body = json!({"note": format!("token {token} here"), "keep": 1});
    let (action, mut parts, mut bytes) = llm_request("paste.test", "/notes", &body);
    let decision = policy.evaluate(&action);
    assert_eq!(decision.verdict, Verdict::Constrain);
    let changes =
        constrain::apply(&decision.rewrites, &policy, None, &mut parts, &mut bytes).unwrap();
    assert_eq!(changes.len(), 1);
    let sent: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        sent,
        json!({"note": "token <removed github-token> here", "keep": 1})
    );

    let empty = "version: 1\ndefault: block\nredaction_marker: \"\"\n";
    let err = Policy::from_yaml(empty, "empty.yaml")
        .unwrap_err()
        .to_string();
    assert!(err.contains("empty.yaml:3:"), "{err}");
}
