//! Inspect: decodes request bodies, classifies a request's protocol (plain HTTP, OpenAI, Anthropic, Gemini, MCP
//! JSON-RPC), fills the `llm` and `mcp` parts of the `Action` (one Action per JSON-RPC batch element), and shapes
//! block answers in each protocol's own language. Pure functions over plain data; no I/O.
//!
//! SCAFFOLD: the seam the proxy calls; the protocol classifiers replace the bodies.

use bytes::Bytes;

use crate::model::{Action, Decision};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("content-encoding {0:?} is not supported for inspection")]
    UnsupportedEncoding(String),
    #[error("decoded body exceeds the inspection limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the body is not valid JSON for a {protocol} endpoint")]
    BadJson { protocol: &'static str },
}

/// Which protocol a request speaks, with what the block answer needs to echo back.
#[derive(Debug, Clone, PartialEq)]
pub enum Protocol {
    Http,
}

/// The outcome of classification: the protocol and one Action per thing the request asks for.
#[derive(Debug, Clone)]
pub struct Inspected {
    pub protocol: Protocol,
    pub actions: Vec<Action>,
}

/// Settings for recognising providers (host lists) — filled from the daemon config.
#[derive(Debug, Clone, Default)]
pub struct InspectConfig {}

/// An answer the proxy sends instead of forwarding.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Decode a request body according to its `Content-Encoding` so inspection sees what the upstream will see.
/// The decoded size is capped at `limit`.
pub fn decode_body(encoding: Option<&str>, body: Bytes, limit: u64) -> Result<Bytes, InspectError> {
    match encoding.map(str::trim) {
        None | Some("") | Some("identity") => {
            if body.len() as u64 > limit {
                return Err(InspectError::TooLarge { limit });
            }
            Ok(body)
        }
        Some(other) => Err(InspectError::UnsupportedEncoding(other.to_string())),
    }
}

/// Classify the request in `action.http` and return the Actions to decide.
pub fn classify(action: Action, _cfg: &InspectConfig) -> Result<Inspected, InspectError> {
    Ok(Inspected {
        protocol: Protocol::Http,
        actions: vec![action],
    })
}

/// The answer for a blocked request, in the protocol's own shape. Never contains request data.
pub fn block_response(_protocol: &Protocol, decision: &Decision) -> BlockResponse {
    let body = serde_json::json!({
        "error": {
            "type": "policy_violation",
            "rule": decision.deciding_rule,
            "message": decision.message.as_deref().unwrap_or("blocked by policy"),
        }
    });
    BlockResponse {
        status: 403,
        headers: vec![("content-type".into(), "application/json".into())],
        body: body.to_string().into_bytes(),
    }
}
