//! The policy loader on arbitrary text: `Policy::from_yaml` either compiles it or returns an error that names a
//! place (never panics, never loops); a policy that compiles decides the shipped policies' sample Actions.

#![no_main]

use enforcer::model::{Action, HttpRequest, Scheme, Transport};
use enforcer::policy::Policy;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else {
        return;
    };
    let policy = match Policy::from_yaml(src, "fuzz.yaml") {
        Ok(policy) => policy,
        Err(e) => {
            let _ = (e.to_string(), e.location());
            return;
        }
    };
    let actions = [
        Action::default(),
        Action {
            transport: Transport {
                scheme: Scheme::Https,
                host: Some("api.openai.com".into()),
                ip: None,
                port: 443,
            },
            http: Some(HttpRequest {
                method: "POST".into(),
                path: "/v1/chat/completions".into(),
                content_type: Some("application/json".into()),
                body: r#"{"messages":[{"role":"user","content":"AKIAIOSFODNN7EXAMPLE"}]}"#.into(),
                json: Some(
                    serde_json::json!({"messages":[{"role":"user","content":"AKIAIOSFODNN7EXAMPLE"}]}),
                ),
                ..HttpRequest::default()
            }),
            ..Action::default()
        },
        Action {
            transport: Transport {
                scheme: Scheme::Dns,
                host: Some("exfil.example".into()),
                ip: None,
                port: 53,
            },
            ..Action::default()
        },
    ];
    let decided = policy.decide_all(&actions);
    let _ = policy.relay(&decided.decision);
    let _ = (policy.hash(), policy.rule_ids().count());
});
