//! A raw HTTP/1.1 request, as the proxy reads it from an agent: the head parsed off the wire, then the proxy's own
//! request phases (`enforcer::proxy::fuzz_request_to_action`: head, body decoding, the Action and its
//! classification), the decision under every shipped policy, a block's protocol-native answer and a constrain's
//! rewrite. Nothing may panic; a request the proxy refuses names a reason.

#![no_main]

use enforcer::model::Scheme;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((parts, body)) = enforcer_fuzz::parse_http1(data) else {
        return;
    };
    let cfg = enforcer_fuzz::inspect_config();
    for dst in [
        (Scheme::Https, "203.0.113.7:443"),
        (Scheme::Http, "127.0.0.1:8443"),
    ] {
        let to = (dst.0, dst.1.parse().expect("address"));
        for policy in enforcer_fuzz::policies() {
            let limit = policy.max_body_bytes();
            let Ok(inspected) =
                enforcer::proxy::fuzz_request_to_action(&parts, body.clone(), to, cfg, limit)
            else {
                // Refused before any decision (the limit is the policy's).
                continue;
            };
            assert!(!inspected.actions.is_empty());
            enforcer_fuzz::decide_and_carry_out(policy, &inspected, &parts, &body);
        }
    }
});
