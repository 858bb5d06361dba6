//! The policy loader on arbitrary text: `Policy::from_yaml` either compiles it or returns an error that names a
//! place (never panics, never loops); a policy that compiles decides the shipped policies' sample Actions.

#![no_main]

use std::sync::OnceLock;

use enforcer::model::{Action, Scheme, Transport};
use enforcer::policy::Policy;
use libfuzzer_sys::fuzz_target;

/// What each compiled policy decides: an empty Action, a chat completion carrying a secret (built by the proxy's
/// own request phases) and a DNS query.
fn samples() -> &'static [Action] {
    static SAMPLES: OnceLock<Vec<Action>> = OnceLock::new();
    SAMPLES.get_or_init(|| {
        let body =
            r#"{"model":"gpt-4o","messages":[{"role":"user","content":"AKIAIOSFODNN7EXAMPLE"}]}"#;
        let chat = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let dns = Action {
            transport: Transport {
                scheme: Scheme::Dns,
                host: Some("exfil.example".into()),
                ip: None,
                port: 53,
                provider: None,
            },
            ..Action::default()
        };
        vec![Action::default(), enforcer_fuzz::request_action(&chat), dns]
    })
}

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
    let decided = policy.decide_all(samples());
    let _ = policy.relay(&decided.decision);
    let _ = (policy.hash(), policy.rule_ids().count());
});
