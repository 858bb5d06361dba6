//! What an agent sends on an upgraded WebSocket connection (RFC 6455): the first byte picks the upgrade request
//! (`enforcer_fuzz::upgrade_actions`: OpenAI Responses, OpenAI Realtime, MCP, plain), the rest is the agent's masked
//! frames. The proxy's own reader (`enforcer::proxy::fuzz_agent_messages`: tungstenite with the proxy's limits,
//! fragments reassembled) and message classification run under every shipped policy's size limit; each message is
//! decided, a block gets its protocol-native answer and a constrain its rewrite. Nothing may panic.

#![no_main]

use enforcer::model::Verdict;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, wire)) = data.split_first() else {
        return;
    };
    let upgrades = enforcer_fuzz::upgrade_actions();
    let request = &upgrades[usize::from(pick) % upgrades.len()];
    let cfg = enforcer_fuzz::inspect_config();
    for policy in enforcer_fuzz::policies() {
        let (messages, _close) =
            enforcer::proxy::fuzz_agent_messages(request, wire, policy.max_body_bytes(), cfg);
        for inspected in messages.into_iter().flatten() {
            assert!(!inspected.actions.is_empty());
            let decided = policy.decide_all(&inspected.actions);
            assert_eq!(decided.each.len(), inspected.actions.len());
            let _ = enforcer::inspect::message_block(&inspected.protocol, &decided.each);
            if decided.decision.verdict == Verdict::Constrain {
                let json = inspected.actions[decided.index]
                    .http
                    .as_ref()
                    .and_then(|h| h.json.clone());
                if let Some(mut value) = json {
                    let _ = enforcer::constrain::apply_to_json(
                        &decided.decision.rewrites,
                        policy,
                        &mut value,
                    );
                }
            }
        }
    }
});
