//! MCP classification by JSON-RPC shape: a JSON-RPC 2.0 message or a batch array of them, on any host. Types only
//! what the policy acts on (method, tool name and arguments, resource URI, prompt name, session id).

use serde_json::Value;

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
