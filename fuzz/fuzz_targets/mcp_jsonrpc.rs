//! A JSON-RPC / MCP body (Streamable HTTP POST to `/mcp`): `inspect::classify` on it, every message decided under
//! every shipped policy, and the protocol-native answers (a block per message of a batch, a refusal in the shape
//! the request claims). Nothing may panic; a batch yields one Action per element.

#![no_main]

use bytes::Bytes;
use enforcer::inspect::{self, Protocol};
use enforcer::model::{Action, HttpRequest, Pairs, Reason, Transport};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cfg = enforcer_fuzz::inspect_config();
    let json: Option<serde_json::Value> = serde_json::from_slice(data).ok();
    let action = Action {
        transport: Transport {
            host: Some("mcp.example".into()),
            port: 443,
            ..Transport::default()
        },
        http: Some(HttpRequest {
            method: "POST".into(),
            path: "/mcp".into(),
            headers: Pairs(vec![
                ("content-type".into(), "application/json".into()),
                ("mcp-session-id".into(), "s1".into()),
            ]),
            content_type: Some("application/json".into()),
            body_size: data.len() as u64,
            body: String::from_utf8_lossy(data).into_owned().into(),
            json: json.map(Into::into),
            ..HttpRequest::default()
        }.into()),
        ..Action::default()
    };
    let claimed = inspect::claimed_protocol(&action, cfg);
    let inspected = match inspect::classify(action, cfg) {
        Ok(inspected) => inspected,
        Err(e) => {
            let _ = inspect::refusal_response(&claimed, 400, Reason::Unparseable, &e.to_string());
            return;
        }
    };
    if let Protocol::Mcp { messages, .. } = &inspected.protocol {
        assert_eq!(messages.len(), inspected.actions.len());
    }
    let (parts, ()) = http::Request::post("/mcp")
        .header("content-type", "application/json")
        .body(())
        .expect("request")
        .into_parts();
    let body = Bytes::copy_from_slice(data);
    for policy in enforcer_fuzz::policies() {
        let decided = enforcer_fuzz::decide_and_carry_out(policy, &inspected, &parts, &body);
        assert_eq!(decided.each.len(), inspected.actions.len().max(1));
    }
});
