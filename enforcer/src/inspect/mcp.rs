//! MCP classification by JSON-RPC shape: a JSON-RPC 2.0 message or a batch array of them, on any host. Types only
//! what the policy acts on (method, tool name and arguments, resource URI, prompt name, session id).

use serde_json::Value;

use super::keys::{folds_to, misspelt};
use super::McpMessage;
use crate::model::{McpCall, Pairs};

/// The method recorded for a JSON-RPC response the client sends to the server (e.g. the answer to a sampling or
/// elicitation request).
pub(super) const RESPONSE_METHOD: &str = "response";
/// The method recorded for a batch element that is not a JSON-RPC message at all.
pub(super) const INVALID_METHOD: &str = "invalid";

/// Every message of a JSON-RPC body, or `None` when the body is not JSON-RPC. A batch counts as JSON-RPC when any
/// element is; elements that are not become `invalid` messages, so nothing in a batch escapes evaluation.
pub(super) fn parse(body: &Value) -> Option<Vec<(McpMessage, McpCall)>> {
    match body {
        Value::Object(_) => is_jsonrpc(body).then(|| vec![element(body)]),
        Value::Array(items) if items.iter().any(is_jsonrpc) => {
            Some(items.iter().map(element).collect())
        }
        _ => None,
    }
}

/// The members of a JSON-RPC 2.0 message, and of an MCP request's `params`, that the policy reads.
const MESSAGE_MEMBERS: [&str; 6] = ["jsonrpc", "id", "method", "params", "result", "error"];
const PARAMS_MEMBERS: [&str; 4] = ["name", "arguments", "uri", "_meta"];

/// Whether `body` is JSON-RPC (a message, or a batch with one, that has a member named like `jsonrpc` in any case)
/// that a server could read otherwise than the policy does. JSON-RPC member names are case-sensitive, but Go's
/// `encoding/json` (MCP servers built on it) matches them case-insensitively, also folding `ſ` to `s` and `K` (the
/// Kelvin sign) to `k` (GHSA-wvj2-96wp-fq3f, CVE-2026-27896): `"Method"` would be a call the policy never saw. So a
/// message is ambiguous when a member of the message or of its `params` is spelt other than exactly (`Method`,
/// `paramſ`), which also refuses `name` beside `Name` there. Members named exactly alike are refused in every JSON
/// body, this one included ([`super::keys::twin_members`]).
pub(crate) fn ambiguous(body: &Value) -> bool {
    let elements = match body {
        Value::Array(items) => items.as_slice(),
        v => std::slice::from_ref(v),
    };
    elements
        .iter()
        .filter_map(Value::as_object)
        .filter(|m| m.keys().any(|k| folds_to(k, "jsonrpc")))
        .any(|m| {
            let params = m
                .iter()
                .filter(|(k, _)| folds_to(k, "params"))
                .filter_map(|(_, v)| v.as_object());
            misspelt(m, &MESSAGE_MEMBERS) || params.clone().any(|p| misspelt(p, &PARAMS_MEMBERS))
        })
}

fn is_jsonrpc(v: &Value) -> bool {
    v.get("jsonrpc").and_then(Value::as_str) == Some("2.0")
        && (v.get("method").is_some_and(Value::is_string)
            || v.get("result").is_some()
            || v.get("error").is_some())
}

fn element(v: &Value) -> (McpMessage, McpCall) {
    let id = v.get("id").filter(|id| !id.is_null()).cloned();
    let method = if !is_jsonrpc(v) {
        INVALID_METHOD.to_string()
    } else {
        match v.get("method").and_then(Value::as_str) {
            Some(m) => m.to_string(),
            None => RESPONSE_METHOD.to_string(),
        }
    };
    let params = v.get("params");
    let param = |key: &str| params.and_then(|p| p.get(key));
    let mut call = McpCall {
        method: method.clone(),
        ..McpCall::default()
    };
    match method.as_str() {
        "tools/call" | "prompts/get" => {
            call.tool = param("name").and_then(Value::as_str).map(str::to_string);
            call.args = param("arguments").cloned();
        }
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
            call.resource = param("uri").and_then(Value::as_str).map(str::to_string);
        }
        _ => {}
    }
    (McpMessage { id, method }, call)
}

/// The MCP session: the `Mcp-Session-Id` header (Streamable HTTP), or the `session_id`/`sessionId` query parameter
/// of the older HTTP+SSE transport's message endpoint.
/// Whether the request carries a header only MCP clients send (`Mcp-Session-Id`, `MCP-Protocol-Version`).
pub(super) fn marked(headers: &Pairs) -> bool {
    headers.0.iter().any(|(k, _)| {
        k.eq_ignore_ascii_case("mcp-session-id") || k.eq_ignore_ascii_case("mcp-protocol-version")
    })
}

pub(super) fn session_id(headers: &Pairs, query: &Pairs) -> Option<String> {
    headers
        .0
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("mcp-session-id"))
        .map(|(_, v)| v.clone())
        .or_else(|| {
            query
                .get("session_id")
                .or_else(|| query.get("sessionId"))
                .map(str::to_string)
        })
}
