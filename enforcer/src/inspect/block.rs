//! Block answers in each protocol's own language: MCP tool errors and JSON-RPC errors with the request's id, the
//! provider's own error JSON for LLM APIs (status 403, `x-should-retry: false`), and a plain 403 JSON otherwise.
//! The text comes only from the policy (its message and rule id), never from request data.

use serde_json::{json, Value};

use super::{McpMessage, Protocol, Provider};
use crate::model::{Decision, Verdict};

/// The JSON-RPC error code used for MCP methods other than `tools/call`.
pub const MCP_POLICY_ERROR_CODE: i64 = -32001;

/// An answer the proxy sends instead of forwarding.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// The answer for a blocked request, in the protocol's own shape. Every element of an MCP batch gets the same
/// answer; use [`block_batch_response`] when elements were decided separately.
pub fn block_response(protocol: &Protocol, decision: &Decision) -> BlockResponse {
    match protocol {
        Protocol::Http => plain(decision),
        Protocol::Provider(provider) | Protocol::Llm { provider, .. } => {
            provider_error(*provider, decision)
        }
        Protocol::Mcp { batch, messages } => {
            let per: Vec<Option<&Decision>> = messages.iter().map(|_| Some(decision)).collect();
            mcp_answer(*batch, messages, &per)
        }
    }
}

/// The answer for an MCP batch whose elements were decided one by one (`decisions[i]` for element `i`, as
/// returned by `classify`). Blocked elements carry their own rule's message; the others are answered with a
/// JSON-RPC error saying they were not forwarded because another element of the batch was blocked. For a
/// non-MCP protocol this is [`block_response`] with the first blocking decision.
pub fn block_batch_response(protocol: &Protocol, decisions: &[Decision]) -> BlockResponse {
    let first_block = decisions
        .iter()
        .find(|d| d.verdict == Verdict::Block)
        .or(decisions.first());
    match protocol {
        Protocol::Mcp { batch, messages } => {
            let per: Vec<Option<&Decision>> = (0..messages.len())
                .map(|i| {
                    decisions.get(i).filter(|d| d.verdict == Verdict::Block).or(
                        if decisions.get(i).is_none() {
                            first_block
                        } else {
                            None
                        },
                    )
                })
                .collect();
            mcp_answer(*batch, messages, &per)
        }
        _ => match first_block {
            Some(d) => block_response(protocol, d),
            None => plain(&Decision::bare(
                Verdict::Block,
                crate::model::Reason::Default,
                crate::model::Mode::Enforce,
                String::new(),
            )),
        },
    }
}

/// The answer when the enforcer refuses a request itself (not a policy block): a malformed or unreadable request,
/// an upstream that failed. Requests the client got wrong (4xx) are answered in the protocol's own error shape, so
/// SDKs and MCP clients report them as what they are: the provider's `invalid_request_error` (Gemini
/// `INVALID_ARGUMENT`) with `x-should-retry: false`, or a JSON-RPC error (-32700 for an unparseable body) with a null id (JSON-RPC 2.0 specification §5.1). Anything else gets the enforcer's JSON error
/// `{"error":{"type":"enforcer_error","reason":…,"message":…}}`. `message` never carries request data.
pub fn refusal_response(
    protocol: &Protocol,
    status: u16,
    reason: crate::model::Reason,
    message: &str,
) -> BlockResponse {
    let client_error = (400..500).contains(&status);
    match protocol {
        Protocol::Provider(provider) | Protocol::Llm { provider, .. } if client_error => {
            let body = match provider {
                Provider::OpenAi => json!({
                    "error": {"message": message, "type": "invalid_request_error", "param": null,
                              "code": reason}
                }),
                Provider::Anthropic => json!({
                    "type": "error",
                    "error": {"type": "invalid_request_error", "message": message},
                }),
                Provider::Gemini => json!({
                    "error": {"code": status, "message": message, "status": "INVALID_ARGUMENT"}
                }),
            };
            json_response(status, &[("x-should-retry", "false")], &body)
        }
        Protocol::Mcp { .. } if client_error => {
            let code = match reason {
                crate::model::Reason::Unparseable => JSONRPC_PARSE_ERROR,
                _ => JSONRPC_INVALID_REQUEST,
            };
            let body = json!({
                "jsonrpc": "2.0",
                "id": null,
                "error": {"code": code, "message": message, "data": {"reason": reason}},
            });
            json_response(status, &[], &body)
        }
        _ => json_response(
            status,
            &[],
            &json!({"error": {"type": "enforcer_error", "reason": reason, "message": message}}),
        ),
    }
}

/// JSON-RPC 2.0 §5.1: invalid JSON was received.
const JSONRPC_PARSE_ERROR: i64 = -32700;
/// JSON-RPC 2.0 §5.1: the JSON sent is not a valid request object.
const JSONRPC_INVALID_REQUEST: i64 = -32600;

/// The human-readable text of a block: the policy's message and the deciding rule, nothing from the request.
pub fn block_message(decision: &Decision) -> String {
    let message = decision.message.as_deref().unwrap_or("blocked by policy");
    match &decision.deciding_rule {
        Some(rule) => format!("{message} (policy rule: {rule})"),
        None => format!("{message} (policy default)"),
    }
}

fn json_response(status: u16, extra: &[(&str, &str)], body: &Value) -> BlockResponse {
    let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
    headers.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    BlockResponse {
        status,
        headers,
        body: body.to_string().into_bytes(),
    }
}

fn plain(decision: &Decision) -> BlockResponse {
    json_response(
        403,
        &[],
        &json!({
            "error": {
                "type": "policy_violation",
                "rule": decision.deciding_rule,
                "message": block_message(decision),
            }
        }),
    )
}

fn provider_error(provider: Provider, decision: &Decision) -> BlockResponse {
    let message = block_message(decision);
    let body = match provider {
        Provider::OpenAi => json!({
            "error": {
                "message": message,
                "type": "permission_error",
                "param": null,
                "code": "blocked_by_policy",
            }
        }),
        Provider::Anthropic => json!({
            "type": "error",
            "error": {"type": "permission_error", "message": message},
        }),
        Provider::Gemini => json!({
            "error": {"code": 403, "message": message, "status": "PERMISSION_DENIED"}
        }),
    };
    json_response(403, &[("x-should-retry", "false")], &body)
}

fn mcp_error(id: Option<&Value>, message: String, rule: Option<&String>) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id.cloned().unwrap_or(Value::Null),
        "error": {
            "code": MCP_POLICY_ERROR_CODE,
            "message": message,
            "data": {"rule": rule},
        }
    })
}

fn mcp_element(message: &McpMessage, decision: Option<&Decision>) -> Value {
    let Some(decision) = decision else {
        return mcp_error(
            message.id.as_ref(),
            "not forwarded: another message in the same batch was blocked by policy".to_string(),
            None,
        );
    };
    if message.method == "tools/call" {
        json!({
            "jsonrpc": "2.0",
            "id": message.id.clone().unwrap_or(Value::Null),
            "result": {
                "content": [{"type": "text", "text": block_message(decision)}],
                "isError": true,
                // Required by the 2026-07-28 MCP schema (clients of that revision reject a result without it);
                // older peers ignore it, as the official SDKs' servers always send it.
                "resultType": "complete",
            }
        })
    } else {
        mcp_error(
            message.id.as_ref(),
            block_message(decision),
            decision.deciding_rule.as_ref(),
        )
    }
}

/// Requests are answered with status 200 and a JSON-RPC answer per request (an array for a batch). Input that
/// expects no answer (notifications, client responses) is refused with 403 and a JSON-RPC error without id, as
/// the Streamable HTTP transport prescribes for input the server does not accept.
fn mcp_answer(
    batch: bool,
    messages: &[McpMessage],
    decisions: &[Option<&Decision>],
) -> BlockResponse {
    let answers: Vec<Value> = messages
        .iter()
        .zip(decisions)
        .filter(|(m, _)| m.expects_answer())
        .map(|(m, d)| mcp_element(m, *d))
        .collect();
    if answers.is_empty() {
        let decision = decisions.iter().flatten().next().copied();
        let message = decision.map_or_else(|| "blocked by policy".to_string(), block_message);
        let rule = decision.and_then(|d| d.deciding_rule.as_ref());
        return json_response(403, &[], &mcp_error(None, message, rule));
    }
    let body = if batch {
        Value::Array(answers)
    } else {
        answers.into_iter().next().unwrap_or(Value::Null)
    };
    json_response(200, &[], &body)
}
