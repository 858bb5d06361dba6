//! WebSocket messages (RFC 6455) on an upgraded connection, classified like requests: a message from the agent
//! becomes an Action with the same fields as its HTTP form, so the same rules decide it. Recognised: the OpenAI
//! Responses API over WebSocket (`wss://…/v1/responses`, at any path the HTTP classifier reads as the Responses
//! endpoint, `/openai/v1/responses` too: a `response.create` event carries what a `POST /v1/responses` body
//! carries — model, tools, input), the OpenAI Realtime API (`…/realtime`: `session.update` declares the tools, the
//! model is the `model` query parameter, and `session.update`, `response.create` and `conversation.item.create` —
//! which returns a tool's result as a `function_call_output` item — are LLM calls), and JSON-RPC (MCP over
//! WebSocket). Anything else is plain data: host, path and `detect` still apply. Also the refusal of a message in
//! its protocol's own shape.

use serde_json::{json, Value};

use super::{block, llm, mcp, InspectConfig, Inspected, LlmApi, Protocol, Provider};
use crate::model::{Action, Decision, LlmCall};

/// Classify one message from the agent. `action` is the upgrade request's Action (transport, head) with the
/// message as its body (`http.body`, and `http.json` when it is JSON).
pub fn classify_message(mut action: Action, cfg: &InspectConfig) -> Inspected {
    let Some(http) = action.http.as_ref() else {
        return Inspected {
            carried: None,
            inputs: Vec::new(),
            protocol: Protocol::Http,
            actions: vec![action],
        };
    };
    let provider = super::host_provider(&action, cfg);
    let path = super::routed_path(http);
    let json = http.json.clone();
    if let (Some(Provider::OpenAi), Some(event)) = (provider, json.as_deref()) {
        let kind = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let call = match kind {
            "response.create" if llm::responses_websocket(&path) => {
                // The event is the create body itself; some clients nest it under `response`.
                let body = event.get("response").unwrap_or(event);
                Some(llm::describe(
                    Provider::OpenAi,
                    LlmApi::Responses,
                    &path,
                    &http.query,
                    body,
                ))
            }
            "session.update" | "response.create" | "conversation.item.create"
                if llm::realtime_websocket(&path) =>
            {
                Some(realtime_call(event, http.query.get("model")))
            }
            _ => None,
        };
        return match call {
            Some(call) => {
                action.llm = Some(call);
                Inspected {
                    carried: None,
                    inputs: Vec::new(),
                    protocol: Protocol::Llm {
                        provider: Provider::OpenAi,
                        api: LlmApi::Responses,
                    },
                    actions: vec![action],
                }
            }
            None => Inspected {
                carried: None,
                inputs: Vec::new(),
                protocol: Protocol::Provider(Provider::OpenAi),
                actions: vec![action],
            },
        };
    }
    if let Some(elements) = json.as_deref().and_then(mcp::parse) {
        let batch = json.as_deref().is_some_and(Value::is_array);
        let (messages, actions) = elements
            .into_iter()
            .map(|(message, call)| {
                let mut a = action.clone();
                a.mcp = Some(call);
                (message, a)
            })
            .unzip();
        return Inspected {
            carried: None,
            inputs: Vec::new(),
            protocol: Protocol::Mcp { batch, messages },
            actions,
        };
    }
    let protocol = match provider {
        Some(p) => Protocol::Provider(p),
        None => Protocol::Http,
    };
    Inspected {
        carried: None,
        inputs: Vec::new(),
        protocol,
        actions: vec![action],
    }
}

/// The LLM call a WebSocket connection of the OpenAI Realtime API or the Responses WebSocket mode makes by being
/// opened (`action`: the upgrade request's Action), before any message of the agent's makes one: provider `openai`
/// and, for Realtime, the model the `model` query parameter names (the session's model until an event names
/// another). What the model proposes on the connection before the agent's first call answers this one. `None` for
/// any other connection.
pub fn connection_call(action: &Action, cfg: &InspectConfig) -> Option<LlmCall> {
    let http = action.http.as_ref()?;
    let provider = super::host_provider(action, cfg)?;
    if provider != Provider::OpenAi {
        return None;
    }
    let path = super::routed_path(http);
    if llm::realtime_websocket(&path) {
        Some(realtime_call(&Value::Null, http.query.get("model")))
    } else if llm::responses_websocket(&path) {
        Some(LlmCall {
            provider: provider.as_str().to_string(),
            stream: true,
            ..LlmCall::default()
        })
    } else {
        None
    }
}

/// A Realtime event that sends the model something, as an LLM call: the session's model (the `model` query parameter
/// of the connection, unless the event names one), the tools a `session.update` (or a `response.create` overriding the
/// session) declares, and whether it returns tool results to the model — a `conversation.item.create` adding a
/// `function_call_output` item (any `…_output`, as a Responses `input[]` item is read), or a `response.create` whose
/// `response.input[]` holds one (OpenAI API reference, Realtime client events).
fn realtime_call(event: &Value, model: Option<&str>) -> LlmCall {
    let session = event
        .get("session")
        .or_else(|| event.get("response"))
        .unwrap_or(&Value::Null);
    let is_output = |item: &Value| {
        item.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| t.ends_with("_output"))
    };
    let input = session.get("input").and_then(Value::as_array);
    LlmCall {
        provider: Provider::OpenAi.as_str().to_string(),
        model: session
            .get("model")
            .and_then(Value::as_str)
            .or(model)
            .map(str::to_string),
        stream: true,
        tools: session
            .get("tools")
            .and_then(Value::as_array)
            .map(|tools| tools.iter().filter_map(llm::tool_name).collect())
            .unwrap_or_default(),
        has_tool_results: event.get("item").is_some_and(is_output)
            || input.into_iter().flatten().any(is_output),
    }
}

/// What to send the agent instead of a blocked message, in its protocol's own shape; `None` when the protocol has
/// no way to say it in a message (plain data: the connection is closed with 1008, policy violation) or expects no
/// answer (a JSON-RPC notification).
///
/// - OpenAI (Responses WebSocket mode, Realtime): an `error` event with the status a `POST` would have had
///   (`{"type":"error","status":403,"error":{"type":"permission_error","code":"blocked_by_policy",…}}`), which
///   clients surface as the HTTP error it stands for.
/// - JSON-RPC: each element's answer, as for a `POST` (a blocked `tools/call` is a tool error).
pub fn message_block(protocol: &Protocol, decisions: &[Decision]) -> Option<String> {
    match protocol {
        Protocol::Llm {
            provider: Provider::OpenAi,
            ..
        }
        | Protocol::Provider(Provider::OpenAi) => {
            let decision = decisions
                .iter()
                .find(|d| d.verdict == crate::model::Verdict::Block)
                .or(decisions.first())?;
            Some(
                json!({
                    "type": "error",
                    "status": 403,
                    "error": {
                        "type": "permission_error",
                        "code": "blocked_by_policy",
                        "message": block::block_message(decision),
                        "param": null,
                    }
                })
                .to_string(),
            )
        }
        Protocol::Mcp { .. } => {
            let answer = block::block_batch_response(protocol, decisions);
            (answer.status == 200).then(|| String::from_utf8_lossy(&answer.body).into_owned())
        }
        _ => None,
    }
}

/// Whether a WebSocket connection opened at `raw_path` (as the agent sent it, query included) is the OpenAI
/// Responses API's WebSocket mode, whose server events carry proposed tool calls: the path rule the HTTP classifier
/// uses, on the canonical path.
pub fn is_responses_websocket(raw_path: &str) -> bool {
    llm::responses_websocket(&super::canonical_path(
        raw_path.split('?').next().unwrap_or_default(),
    ))
}

/// Whether a WebSocket connection opened at `raw_path` (as the agent sent it, query included) is the OpenAI Realtime
/// API, whose server events carry proposed tool calls: the path rule [`classify_message`] uses, on the canonical path.
pub fn is_realtime_websocket(raw_path: &str) -> bool {
    llm::realtime_websocket(&super::canonical_path(
        raw_path.split('?').next().unwrap_or_default(),
    ))
}
