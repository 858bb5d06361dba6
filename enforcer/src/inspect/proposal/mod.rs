//! Tool calls a model proposes in an LLM response, found and rewritten before the agent sees them: OpenAI Chat
//! Completions `tool_calls`, OpenAI Responses `function_call`, `custom_tool_call`, `local_shell_call`, `shell_call`,
//! `apply_patch_call`, `computer_call` and `mcp_call` items (over server-sent events, the WebSocket mode, or JSON),
//! OpenAI Realtime `function_call` and `mcp_call` items (its WebSocket server events, GA and beta), Anthropic
//! Messages `tool_use`, `server_tool_use` and `mcp_tool_use` blocks, Gemini `functionCall` parts; streamed and whole,
//! and the Messages answers of Anthropic Message Batch results, one per line ([`batch`]).
//!
//! A stream is read event by event ([`Proposals`]): text, reasoning and every other event pass at once, as they
//! came; only the events of a tool call are held until its arguments are complete. [`Proposals::push`] returns the
//! calls an event completed, the caller rules on each (pass, rewrite the arguments, or refuse with a text), and
//! [`Proposals::release`] returns what to send. A refused call becomes a text (block or part) saying so, and the
//! stop/finish reason no longer asks the agent to run tools when none is left; indices, ids and sequence numbers of
//! everything after it stay consistent for the SDKs' stream accumulators. Whole bodies: [`body_calls`] and
//! [`apply_to_body`]; batch results line by line with the same two ([`batch::read_line`], [`batch::answer_mut`]).
//! Pure functions over plain data; deciding is the proxy's (`proxy::proposal`).

pub mod batch;
mod chat;
mod gemini;
mod messages;
mod realtime;
mod responses;

use bytes::Bytes;
use serde_json::Value;

use super::{LlmApi, Provider};
use crate::model::Proposal;

/// One event of a stream: a server-sent event (its name and data) or one WebSocket message (data only).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The SSE `event:` name; `None` for unnamed events and WebSocket messages.
    pub name: Option<String>,
    pub data: String,
    /// The event's bytes as received, re-sent as they are when nothing in it changes.
    pub raw: Bytes,
}

/// What to send the agent: an event exactly as it came, or a new or rewritten one.
#[derive(Debug, Clone, PartialEq)]
pub enum Emit {
    Raw(Bytes),
    New { name: Option<String>, data: String },
}

/// A proposed tool call, complete.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub proposal: Proposal,
    /// The call is covered by an opaque signature (a Gemini part's `thoughtSignature`): its arguments may not be
    /// rewritten, only passed or refused.
    pub signed: bool,
    /// The arguments cannot be read as the agent's SDK reads them ([`function_args`]): the call is refused, never
    /// decided on a reading the agent would not share (its `proposal.args` is what could be read, for the record).
    pub unreadable: bool,
}

/// What becomes of a proposed call.
#[derive(Debug, Clone, PartialEq)]
pub enum Ruling {
    /// Passed on untouched.
    Pass,
    /// Passed on with these arguments.
    Rewrite(Value),
    /// Replaced by this text; the agent runs nothing.
    Refuse(String),
}

/// The text that replaces a refused call: the tool's name and the policy's block text, nothing else.
pub fn refusal_text(tool: &str, block_message: &str) -> String {
    format!("[The enforcer refused the tool call `{tool}`: {block_message}]")
}

/// An event whose data is neither empty nor JSON the reader can parse (a number beyond `f64`, nesting beyond the
/// parser's depth limit, a stray byte): the calls it may carry cannot be decided, so it must not be passed on. An
/// SDK's parser may well read it (Python's `json.loads` and JavaScript's `JSON.parse` take both examples).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("an event of the upstream's answer could not be read for its tool calls")]
pub struct Unreadable;

/// The proposal-aware reader of one response stream.
#[derive(Debug)]
pub struct Proposals(Flavour);

#[derive(Debug)]
enum Flavour {
    Chat(chat::Stream),
    Messages(messages::Stream),
    Responses(responses::Stream),
    Realtime(realtime::Stream),
    Gemini(gemini::Stream),
}

impl Proposals {
    /// The reader for a response of `api`; `None` when the API proposes no tool calls.
    pub fn new(provider: Provider, api: LlmApi) -> Option<Proposals> {
        Some(Proposals(match (provider, api) {
            (Provider::OpenAi, LlmApi::ChatCompletions) => Flavour::Chat(chat::Stream::default()),
            (Provider::OpenAi, LlmApi::Responses) => {
                Flavour::Responses(responses::Stream::default())
            }
            (Provider::Anthropic, LlmApi::Messages) => {
                Flavour::Messages(messages::Stream::default())
            }
            (Provider::Gemini, LlmApi::GenerateContent) => {
                Flavour::Gemini(gemini::Stream::default())
            }
            _ => return None,
        }))
    }

    /// The reader for the server events of an OpenAI Realtime API connection (`…/realtime`), opened in the beta
    /// interface (`beta`: the upgrade asked for `OpenAI-Beta: realtime=v1`) or the GA one. The events themselves
    /// correct `beta` as they come: the two name their text and audio events apart.
    pub fn realtime(beta: bool) -> Proposals {
        Proposals(Flavour::Realtime(realtime::Stream::new(beta)))
    }

    /// Read one event; the calls it completed, in order. [`Proposals::release`] must follow, with one ruling per
    /// call, before the next event. An event without data (a comment, a keep-alive) passes as it came.
    ///
    /// # Errors
    /// [`Unreadable`] when the event's data cannot be read: the caller ends the stream (fail closed).
    pub fn push(&mut self, event: Event) -> Result<Vec<Call>, Unreadable> {
        match &mut self.0 {
            Flavour::Chat(s) => s.push(event),
            Flavour::Messages(s) => s.push(event),
            Flavour::Responses(s) => s.push(event),
            Flavour::Realtime(s) => s.push(event),
            Flavour::Gemini(s) => s.push(event),
        }
    }

    /// The end of the stream: calls still open are complete now (their arguments as far as they came); a Realtime
    /// connection's are dropped, never sent (its items are whole only when an event says so).
    ///
    /// # Errors
    /// [`Unreadable`] when a call still open cannot be read as an SDK would assemble it: the caller ends the stream.
    pub fn finish(&mut self) -> Result<Vec<Call>, Unreadable> {
        match &mut self.0 {
            Flavour::Chat(s) => Ok(s.finish()),
            Flavour::Messages(s) => s.finish(),
            Flavour::Responses(s) => s.finish(),
            Flavour::Realtime(s) => Ok(s.finish()),
            Flavour::Gemini(_) => Ok(Vec::new()),
        }
    }

    /// What to send now, given the rulings on the calls the last `push` or `finish` returned (in their order; a
    /// missing ruling refuses).
    pub fn release(&mut self, rulings: &[Ruling]) -> Vec<Emit> {
        let mut rulings = Rulings(rulings.iter());
        match &mut self.0 {
            Flavour::Chat(s) => s.release(&mut rulings),
            Flavour::Messages(s) => s.release(&mut rulings),
            Flavour::Responses(s) => s.release(&mut rulings),
            Flavour::Realtime(s) => s.release(&mut rulings),
            Flavour::Gemini(s) => s.release(&mut rulings),
        }
    }

    /// Bytes held for calls not yet complete.
    pub fn held_bytes(&self) -> usize {
        match &self.0 {
            Flavour::Chat(s) => s.held_bytes(),
            Flavour::Messages(s) => s.held_bytes(),
            Flavour::Responses(s) => s.held_bytes(),
            Flavour::Realtime(s) => s.held_bytes(),
            Flavour::Gemini(_) => 0,
        }
    }
}

/// The calls proposed in a whole (non-streamed) response body of `api`, in order.
pub fn body_calls(provider: Provider, api: LlmApi, body: &Value) -> Vec<Call> {
    match (provider, api) {
        (Provider::OpenAi, LlmApi::ChatCompletions) => chat::body_calls(body),
        (Provider::OpenAi, LlmApi::Responses) => responses::body_calls(body),
        (Provider::Anthropic, LlmApi::Messages) => messages::body_calls(body),
        (Provider::Gemini, LlmApi::GenerateContent) => gemini::body_calls(body),
        _ => Vec::new(),
    }
}

/// Carry out `rulings` (one per call of [`body_calls`], in order) on the body.
pub fn apply_to_body(provider: Provider, api: LlmApi, body: &mut Value, rulings: &[Ruling]) {
    let mut rulings = Rulings(rulings.iter());
    match (provider, api) {
        (Provider::OpenAi, LlmApi::ChatCompletions) => chat::apply_to_body(body, &mut rulings),
        (Provider::OpenAi, LlmApi::Responses) => responses::apply_to_body(body, &mut rulings),
        (Provider::Anthropic, LlmApi::Messages) => messages::apply_to_body(body, &mut rulings),
        (Provider::Gemini, LlmApi::GenerateContent) => {
            gemini::apply_to_body(body, &mut rulings);
        }
        _ => {}
    }
}

/// The rulings in call order; a missing one refuses (a caller's mistake must never pass a call unread).
struct Rulings<'a>(std::slice::Iter<'a, Ruling>);

impl Rulings<'_> {
    fn next(&mut self) -> Ruling {
        self.0
            .next()
            .cloned()
            .unwrap_or_else(|| Ruling::Refuse("[The enforcer refused this tool call.]".into()))
    }
}

/// The position `v`'s member `key` gives (Chat `index`, Responses `output_index`), `absent` when it has none; `None`
/// when it is not a non-negative JSON integer. The SDKs file a piece by that number and disagree on anything else:
/// openai-python keeps a choice's `"1"` and `1.0` as they came (`construct_type`, unvalidated) but validates a tool
/// call's `"1"`, `1.0` and `true` to `1` (pydantic's lax mode), and its stream accumulator raises on a non-`int`
/// (`lib/streaming/_deltas.py`); openai-node uses it as an array key, where `"1"` and `1.0` are `1`; go-openai's
/// `int` fails to decode a string or a fraction. A piece whose place cannot be told as the agent tells it is not
/// read (fail closed).
fn position(v: &Value, key: &str, absent: u64) -> Option<u64> {
    match v.get(key) {
        None => Some(absent),
        Some(i) => i.as_u64(),
    }
}

/// Whether an SSE event's name makes the openai SDKs read it as an Assistants event (`thread.…`): openai-python,
/// openai-node and openai-go hand its data on wrapped (`{"event": name, "data": …}`), so the Chat and Responses
/// accumulators never apply it, while this reader would read its data as a piece of a call.
fn assistants_event(name: Option<&str>) -> bool {
    name.is_some_and(|n| n.starts_with("thread."))
}

/// The JSON of a whole response body whose tool calls are to be decided; `None` for an empty body. A UTF-8
/// byte-order mark before it is ignored, as the SDKs' parsers ignore it (RFC 8259 §8.1 allows either).
///
/// # Errors
/// [`Unreadable`] when the body is not JSON the reader can parse: it must not be passed on (fail closed).
pub fn body_json(text: &str) -> Result<Option<Value>, Unreadable> {
    event_json(text.strip_prefix('\u{feff}').unwrap_or(text))
}

/// The JSON of an event's `data`; `None` for an event without data, passed on as it came.
///
/// # Errors
/// [`Unreadable`] when it is not JSON the reader parses, or when another reader would read its members otherwise:
/// an object that names a member twice, or twice in different letter case (`inspect::twin_members`), or a member
/// the readers find calls by spelt otherwise ([`misspelt`]). The agent's decoder may read another member than the
/// policy did (Go's `encoding/json` matches `Command` to `command`, and keeps the last).
fn event_json(data: &str) -> Result<Option<Value>, Unreadable> {
    if data.trim().is_empty() {
        return Ok(None);
    }
    let json = crate::inspect::read_json(data, crate::inspect::Twins::Folded)
        .ok()
        .flatten()
        .ok_or(Unreadable)?;
    if misspelt(&json) {
        return Err(Unreadable);
    }
    Ok(Some(json))
}

/// The members the readers find tool calls by (and the SDKs' structs declare), in every provider's events and
/// bodies, spelt as the providers write them.
const MEMBERS: &[&str] = &[
    // Chat Completions
    "choices",
    "message",
    "delta",
    "tool_calls",
    "function_call",
    "function",
    "custom",
    "arguments",
    "finish_reason",
    "index",
    "role",
    // Responses
    "output",
    "item",
    "item_id",
    "output_index",
    "content_index",
    "call_id",
    "server_label",
    "response",
    "sequence_number",
    "part",
    "action",
    // Messages
    "content",
    "content_block",
    "partial_json",
    "server_name",
    "stop_reason",
    "tool_use_id",
    "input",
    // Gemini (the JSON mapping of its protos accepts the field names as written in the proto too)
    "candidates",
    "parts",
    "functionCall",
    "args",
    "thoughtSignature",
    "thought_signature",
    // Gemini batches (`gemini::WRAPPERS`)
    "inlinedResponses",
    "operations",
    "batches",
    // every API
    "type",
    "name",
    "id",
    "text",
];

/// The members holding data named by someone else than the provider, not looked into for [`MEMBERS`] (their names
/// are data, which no decoder binds to a field; `inspect::twin_members` still reads them):
/// - a call's arguments, read by the tool's own schema;
/// - what a Responses answer echoes of the request (`response.created`, `response.completed` and the whole body
///   repeat `tools[].parameters`, `text.format.schema`, `metadata`, `prompt.variables`; `mcp_list_tools` lists
///   `input_schema`s; file search results carry `attributes`): JSON Schemas and maps whose keys are the user's, where
///   a property named `Name` or `Type` is ordinary (OpenAI API reference, "The response object").
const ARGUMENTS: &[&str] = &[
    "input",
    "args",
    "arguments",
    "action",
    "parameters",
    "schema",
    "input_schema",
    "properties",
    "metadata",
    "attributes",
    "variables",
];

/// Whether an event or body spells one of [`MEMBERS`] otherwise, at any depth outside a call's arguments
/// (`Tool_calls`, `functioncall`, `NAME`, `tool_callſ`): an agent built on Go's `encoding/json` (go-openai, the
/// Gemini Go SDK) binds it to the field the reader found absent, so it would run a call the reader never saw.
fn misspelt(json: &Value) -> bool {
    crate::inspect::misspelt_within(json, MEMBERS, ARGUMENTS)
}

/// A function call's arguments text (Chat `function.arguments`, Responses `arguments`, Anthropic's streamed input
/// JSON) as the policy reads it, and whether the agent's SDK reads it the same way. The SDKs hand the text to the
/// agent, which parses it as JSON with its own parser: Python's `json.loads` also reads `NaN`, `Infinity`, numbers
/// beyond `f64` and lone surrogate escapes; a last-duplicate-wins reader and Go's case-insensitive
/// `encoding/json` read `{"command":"echo ok","Command":"curl …"}` as the second command. So the text is readable
/// only when it is empty (no arguments: `{}`) or one JSON object this parser reads with no object naming a member
/// twice, even in other letter case (`inspect::twin_members`). A function's arguments are always an object (its
/// parameters are a JSON Schema object: OpenAI `parameters`, Anthropic `input_schema`); any other value — a string
/// holding the object again, which an agent decoding until it has an object would run — is not decided as a
/// string. What is not readable is returned as the text itself, unreadable.
fn function_args(text: &str) -> (Value, bool) {
    if text.trim().is_empty() {
        return (Value::Object(serde_json::Map::new()), false);
    }
    match crate::inspect::read_json(text, crate::inspect::Twins::Folded) {
        Ok(Some(v)) if v.is_object() => (v, false),
        _ => (Value::String(text.to_string()), true),
    }
}

/// Arguments as a provider writes them in a string field: JSON text, or the string itself.
fn args_text(args: &Value) -> String {
    match args {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// An event the rewrite writes: its JSON, named by its own `type` over server-sent events (`named`; the
/// Responses WebSocket mode names none).
fn typed(named: bool, v: Value) -> Emit {
    Emit::New {
        name: named.then(|| str_of(&v, "type").unwrap_or_default().to_string()),
        data: v.to_string(),
    }
}

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn proposal(tool: &str, kind: &str, args: Value, call_id: Option<&str>) -> Proposal {
    Proposal {
        tool: tool.to_string(),
        kind: kind.to_string(),
        args: Some(args),
        call_id: call_id.map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Event data another reader may read otherwise is unreadable: twin members (`inspect::twin_members`) and a
    /// member the readers find calls by spelt otherwise ([`misspelt`]), outside a call's own arguments.
    #[test]
    fn twins_and_members_spelt_otherwise_are_unreadable() {
        for text in [
            r#"{"command":"echo ok","Command":"curl x"}"#,
            r#"{"command":"echo ok","command":"curl x"}"#,
            r#"{"a":[{"k":1,"K":2}]}"#,
            "{\"mask\":1,\"ma\u{17f}k\":2}",
            "{\"kind\":1,\"\u{212a}ind\":2}",
            r#"{"type":"tool_use","input":{"path":"a","Path":"b"}}"#,
            r#"{"choices":[{"message":{"Tool_calls":[]}}]}"#,
            r#"{"choices":[{"delta":{"tool_callſ":[]}}]}"#,
            r#"{"choices":[{"delta":{"Custom":{}}}]}"#,
            r#"{"candidates":[{"content":{"parts":[{"FunctionCall":{}}]}}]}"#,
            r#"{"candidates":[{"content":{"parts":[{"functioncall":{}}]}}]}"#,
            r#"{"candidates":[{"content":{"parts":[{"functionCall":{"Name":"shell"}}]}}]}"#,
            r#"{"candidates":[{"content":{"parts":[{"Thought_Signature":"x"}]}}]}"#,
            r#"{"type":"tool_use","NAME":"shell"}"#,
        ] {
            assert_eq!(event_json(text), Err(Unreadable), "{text}");
        }
        for text in [
            r#"{"choices":[{"message":{"tool_calls":[],"content":"Name"}}]}"#,
            r#"{"candidates":[{"content":{"parts":[{"functionCall":{"name":"f","args":{"Name":"x","ID":1}}}]}}]}"#,
            r#"{"type":"tool_use","input":{"Type":"a"}}"#,
            // What a Responses answer echoes of the request: schemas and maps whose keys are the user's.
            r#"{"type":"response.created","response":{"tools":[{"type":"function","name":"f","parameters":{"type":"object","properties":{"Name":{"type":"string"},"Type":{"type":"string"}}}}],"metadata":{"Id":"7"},"text":{"format":{"type":"json_schema","name":"r","schema":{"properties":{"Content":{}}}}}}}"#,
            r#"{"type":"response.output_item.done","item":{"type":"mcp_list_tools","tools":[{"name":"t","input_schema":{"properties":{"Input":{}}}}]}}"#,
            r#"{"thoughtSignature":"x","function_call":{}}"#,
            r#"{"thought_signature":"x","functionCall":{}}"#,
            "[1,2,\"x\"]",
        ] {
            assert!(event_json(text).is_ok_and(|v| v.is_some()), "{text}");
        }
    }

    /// A function's arguments text: one JSON object without twin members, else unreadable (the call alone refused).
    #[test]
    fn function_arguments_are_one_object_without_twins() {
        assert_eq!(function_args(""), (serde_json::json!({}), false));
        assert_eq!(
            function_args(r#"{"command":"ls"}"#),
            (serde_json::json!({"command": "ls"}), false)
        );
        for text in [
            r#"{"command":"ls","Command":"curl x"}"#,
            r#"{"command":"ls","command":"curl x"}"#,
            r#""{\"command\":\"curl x\"}""#,
            "[1]",
            "{\"command\": NaN}",
            "not json",
        ] {
            assert!(function_args(text).1, "{text}");
        }
    }
}
