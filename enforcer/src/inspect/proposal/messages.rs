//! Anthropic Messages: `tool_use` (the agent's tools), `server_tool_use` (tools Anthropic runs, such as web search)
//! and `mcp_tool_use` (the MCP connector) blocks of `content` in a whole message; in a stream, the named events
//! `content_block_start` (the block, `input: {}`), `content_block_delta` (`input_json_delta.partial_json`, the input's
//! JSON text in pieces) and `content_block_stop`, each with the block's `index`, then `message_delta` with the
//! `stop_reason`.
//!
//! A tool block is held from its start to its stop. A refused call becomes a text block at the same index; the result
//! block of a refused server-side call (its `tool_use_id`) is dropped and later indices close up; `stop_reason:
//! tool_use` becomes `end_turn` when no call of the agent's is left.

use bytes::Bytes;
use serde_json::{json, Value};

use super::{
    event_json, function_args, proposal, str_of, typed, Call, Emit, Event, Ruling, Rulings,
    Unreadable,
};

#[derive(Debug, Default)]
pub(super) struct Stream {
    /// The tool block being read (blocks stream one after another).
    open: Option<Held>,
    /// Upstream indices of blocks not sent (results of refused server-side calls), in this message.
    dropped: Vec<u64>,
    /// The index of the block being dropped.
    dropping: Option<u64>,
    /// Blocks started in this message: the next block's index (the SDKs append every started block, and read a
    /// delta's `index` as the position in that list).
    started: u64,
    /// Indices of the tool blocks in this message.
    tools: Vec<u64>,
    /// Ids of refused server-side and MCP calls, whose result blocks are dropped.
    refused_ids: Vec<String>,
    /// The agent's own calls passed in this message, and whether any call was refused.
    passed: u64,
    refused: bool,
    /// Events carry SSE names (`event: content_block_start`); written events do too.
    named: bool,
    pending: Vec<Item>,
}

#[derive(Debug)]
struct Held {
    index: u64,
    id: Option<String>,
    tool: String,
    kind: &'static str,
    /// The `input` of the start event (the whole input when no delta follows).
    input: Value,
    json: String,
    /// The block's events as received: bytes and parsed data.
    events: Vec<(Bytes, Value)>,
}

#[derive(Debug)]
enum Item {
    Emit(Emit),
    Call(Held),
    /// `message_delta`, sent once the calls before it are ruled on.
    Final(Bytes, Value),
}

/// The proposal kind of a content block type, when it is a tool call.
fn kind_of(block_type: &str) -> Option<&'static str> {
    match block_type {
        "tool_use" => Some("function"),
        "server_tool_use" => Some("server"),
        "mcp_tool_use" => Some("mcp"),
        _ => None,
    }
}

/// The tool's name as a policy sees it (`mcp:<server>/<tool>` through the MCP connector); `None` when `name` or
/// `server_name` is there but not a string, which an agent's JavaScript would still turn into a name
/// (`tools[["shell"]]` looks up `shell`).
fn tool_name(block: &Value) -> Option<String> {
    let not_text = |key| block.get(key).is_some_and(|v| !v.is_string());
    if not_text("name") || not_text("server_name") {
        return None;
    }
    let name = str_of(block, "name").unwrap_or_default();
    Some(match str_of(block, "server_name") {
        Some(server) if str_of(block, "type") == Some("mcp_tool_use") => {
            format!("mcp:{server}/{name}")
        }
        _ => name.to_string(),
    })
}

impl Stream {
    pub(super) fn push(&mut self, ev: Event) -> Result<Vec<Call>, Unreadable> {
        self.named |= ev.name.is_some();
        let Some(v) = event_json(&ev.data)? else {
            self.pending.push(Item::Emit(Emit::Raw(ev.raw)));
            return Ok(Vec::new());
        };
        if !named_as_typed(ev.name.as_deref(), &v) || !delta_as_typed(&v) {
            return Err(Unreadable);
        }
        self.read(ev, v)
    }

    /// One event of JSON `v`: the calls it completed.
    ///
    /// # Errors
    /// [`Unreadable`] for an event the SDKs would assemble otherwise than this reader ([`Stream::in_order`]).
    fn read(&mut self, ev: Event, v: Value) -> Result<Vec<Call>, Unreadable> {
        if !self.in_order(&v) {
            return Err(Unreadable);
        }
        let index = v.get("index").and_then(Value::as_u64);
        match (str_of(&v, "type").unwrap_or_default(), index) {
            ("message_start", _) => {
                self.dropped.clear();
                self.tools.clear();
                self.started = 0;
                self.passed = 0;
                self.refused = false;
            }
            ("content_block_start", Some(index)) => {
                let block = v.get("content_block").unwrap_or(&Value::Null);
                if let Some(kind) = str_of(block, "type").and_then(kind_of) {
                    let tool = tool_name(block).ok_or(Unreadable)?;
                    self.tools.push(index);
                    self.open = Some(Held {
                        index,
                        id: str_of(block, "id").map(str::to_string),
                        tool,
                        kind,
                        input: block.get("input").cloned().unwrap_or(json!({})),
                        json: String::new(),
                        events: vec![(ev.raw, v)],
                    });
                    return Ok(Vec::new());
                }
                let answers = str_of(block, "tool_use_id");
                if answers.is_some_and(|id| self.refused_ids.iter().any(|r| r == id)) {
                    self.dropping = Some(index);
                    self.dropped.push(index);
                    return Ok(Vec::new());
                }
            }
            ("content_block_delta" | "content_block_stop", Some(index))
                if self.open.as_ref().is_some_and(|h| h.index == index) =>
            {
                return self.absorb(ev.raw, v);
            }
            ("content_block_delta" | "content_block_stop", Some(index))
                if self.dropping == Some(index) =>
            {
                if str_of(&v, "type") == Some("content_block_stop") {
                    self.dropping = None;
                }
                return Ok(Vec::new());
            }
            // anthropic-sdk-go applies a delta to the last block started, whatever its `index`: a piece of input
            // for any block but the open tool block may be joined to a tool's input there.
            ("content_block_delta", _)
                if v.get("delta").and_then(|d| str_of(d, "type")) == Some("input_json_delta") =>
            {
                return Err(Unreadable);
            }
            ("message_delta", _) => {
                self.pending.push(Item::Final(ev.raw, v));
                return Ok(Vec::new());
            }
            _ => {}
        }
        let emit = self.shifted(ev.raw, v);
        self.pending.push(Item::Emit(emit));
        Ok(Vec::new())
    }

    /// Whether event `v` is read here as the anthropic SDKs read it: their accumulators start from `message_start`'s
    /// `content` (which must hold no tool call), append every `content_block_start` whatever its `index` (which must
    /// be the next position, and no block start while a tool block is open), and apply a delta or stop to the block
    /// at its `index` (which must be a started block, and a tool block only while it is open).
    fn in_order(&mut self, v: &Value) -> bool {
        let ty = str_of(v, "type").unwrap_or_default();
        if ty == "message_start" {
            let content = v.get("message").and_then(|m| m.get("content"));
            return !content
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|b| str_of(b, "type").and_then(kind_of).is_some());
        }
        if !ty.starts_with("content_block_") {
            return true;
        }
        let Some(index) = v.get("index").and_then(Value::as_u64) else {
            return false;
        };
        if ty == "content_block_start" {
            let next = index == self.started && self.open.is_none();
            self.started += 1;
            return next;
        }
        let open = self.open.as_ref().is_some_and(|h| h.index == index);
        index < self.started && (open || !self.tools.contains(&index))
    }

    /// A delta or the stop of the open tool block.
    ///
    /// # Errors
    /// [`Unreadable`] for a delta that is not an `input_json_delta` with its `partial_json` text: the SDKs apply a
    /// delta by its `type` (anthropic-python's `accumulate_event`, anthropic-sdk-go's `Accumulate`), so a
    /// `text_delta` or `thinking_delta` on a tool block adds nothing to its input in one SDK and text to the last
    /// block in another, and a missing `partial_json` is `bytes(None)` (an error) in Python but `"undefined"` in
    /// JavaScript's `+=`, which writes any other value into the text too (`null`, an array's elements, a number's
    /// digits).
    fn absorb(&mut self, raw: Bytes, v: Value) -> Result<Vec<Call>, Unreadable> {
        let Some(held) = self.open.as_mut() else {
            return Ok(Vec::new());
        };
        let stop = str_of(&v, "type") == Some("content_block_stop");
        if !stop {
            let delta = v.get("delta").unwrap_or(&Value::Null);
            match (str_of(delta, "type"), delta.get("partial_json")) {
                (Some("input_json_delta"), Some(Value::String(piece))) => {
                    held.json.push_str(piece);
                }
                _ => return Err(Unreadable),
            }
        }
        held.events.push((raw, v));
        if stop {
            return self.finish();
        }
        Ok(Vec::new())
    }

    /// The open tool block, complete.
    ///
    /// # Errors
    /// [`Unreadable`] when its input's JSON text is not one whole JSON value: the anthropic SDKs parse it partially
    /// (`jiter` in `partial_mode`), so an object left open still reads as the arguments it holds. Also when pieces
    /// follow a start whose `input` is not `{}`: anthropic-python replaces the start's input with the pieces,
    /// anthropic-sdk-go appends the pieces to it (`Accumulate`: only a `{}` input is replaced).
    pub(super) fn finish(&mut self) -> Result<Vec<Call>, Unreadable> {
        let Some(held) = self.open.take() else {
            return Ok(Vec::new());
        };
        let (args, unreadable) = if held.json.trim().is_empty() {
            (held.input.clone(), !held.input.is_object())
        } else {
            if held.input != json!({}) {
                return Err(Unreadable);
            }
            serde_json::from_str::<Value>(&held.json).map_err(|_| Unreadable)?;
            function_args(&held.json)
        };
        let call = Call {
            proposal: proposal(&held.tool, held.kind, args, held.id.as_deref()),
            signed: false,
            unreadable,
        };
        self.pending.push(Item::Call(held));
        Ok(vec![call])
    }

    pub(super) fn held_bytes(&self) -> usize {
        self.open.as_ref().map_or(0, |h| {
            h.json.len() + h.events.iter().map(|(b, _)| b.len()).sum::<usize>()
        })
    }

    /// How far `index` moves down: the dropped blocks before it.
    fn shift(&self, index: u64) -> u64 {
        self.dropped.iter().filter(|&&d| d < index).count() as u64
    }

    /// An event as it came, or with its `index` closed up over dropped blocks.
    fn shifted(&self, raw: Bytes, mut v: Value) -> Emit {
        match v.get("index").and_then(Value::as_u64) {
            Some(i) if self.shift(i) > 0 => {
                v["index"] = json!(i - self.shift(i));
                typed(self.named, v)
            }
            _ => Emit::Raw(raw),
        }
    }

    pub(super) fn release(&mut self, rulings: &mut Rulings) -> Vec<Emit> {
        let mut out = Vec::new();
        for item in std::mem::take(&mut self.pending) {
            match item {
                Item::Emit(e) => out.push(e),
                Item::Call(held) => {
                    let ruling = rulings.next();
                    self.render_call(held, ruling, &mut out);
                }
                Item::Final(raw, mut v) => {
                    let none_left = self.refused && self.passed == 0;
                    let asks =
                        v.get("delta").and_then(|d| str_of(d, "stop_reason")) == Some("tool_use");
                    if none_left && asks {
                        v["delta"]["stop_reason"] = json!("end_turn");
                        out.push(typed(self.named, v));
                    } else {
                        out.push(Emit::Raw(raw));
                    }
                }
            }
        }
        out
    }

    fn render_call(&mut self, held: Held, ruling: Ruling, out: &mut Vec<Emit>) {
        let index = held.index - self.shift(held.index);
        match ruling {
            Ruling::Pass => {
                self.passed += u64::from(held.kind == "function");
                for (raw, v) in held.events {
                    out.push(self.shifted(raw, v));
                }
            }
            Ruling::Rewrite(args) => {
                self.passed += u64::from(held.kind == "function");
                let mut start = held
                    .events
                    .first()
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                start["index"] = json!(index);
                start["content_block"]["input"] = json!({});
                out.push(typed(self.named, start));
                out.push(typed(
                    self.named,
                    json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": args.to_string()}}),
                ));
                out.push(typed(
                    self.named,
                    json!({"type": "content_block_stop", "index": index}),
                ));
            }
            Ruling::Refuse(text) => {
                self.refused = true;
                if held.kind != "function" {
                    self.refused_ids.extend(held.id);
                }
                out.push(typed(
                    self.named,
                    json!({"type": "content_block_start", "index": index,
                    "content_block": {"type": "text", "text": ""}}),
                ));
                out.push(typed(
                    self.named,
                    json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": text}}),
                ));
                out.push(typed(
                    self.named,
                    json!({"type": "content_block_stop", "index": index}),
                ));
            }
        }
    }
}

/// Whether an event's SSE name and its data's `type` agree wherever either is an event the accumulators read
/// (`message_*`, `content_block_*`). The SDKs choose events by name and apply them by `type`, each differently:
/// anthropic-python skips unnamed and `ping` events and reads every other name by its data's `type`;
/// anthropic-sdk-go and anthropic-typescript read only the names they know, then apply the data by its `type`. A
/// piece of a tool input in an unnamed event, a `ping` or an unknown name is joined by one SDK and skipped by
/// another; this reader reads `type`, so it must be the name too. `{"type":"ping"}` named `ping` and the `error`
/// event pass as they are.
fn named_as_typed(name: Option<&str>, v: &Value) -> bool {
    let ty = str_of(v, "type");
    let read = |t: &str| t.starts_with("message_") || t.starts_with("content_block_");
    name == ty || !(ty.is_some_and(read) || name.is_some_and(read))
}

/// Whether a `content_block_delta` carries what its `delta.type` names: `partial_json` only in an
/// `input_json_delta`. The SDKs read a delta's members by its type (a `text_delta` carrying `partial_json` adds
/// nothing to a tool's input), so a piece carried otherwise is read by no SDK as this reader would read it.
fn delta_as_typed(v: &Value) -> bool {
    let Some(delta) = v.get("delta") else {
        return true;
    };
    delta.get("partial_json").is_none() || str_of(delta, "type") == Some("input_json_delta")
}

pub(super) fn body_calls(body: &Value) -> Vec<Call> {
    let content = body.get("content").and_then(Value::as_array);
    content
        .into_iter()
        .flatten()
        .filter_map(|b| {
            let kind = kind_of(str_of(b, "type")?)?;
            let args = b.get("input").cloned().unwrap_or(json!({}));
            let tool = tool_name(b);
            Some(Call {
                // A tool's input is an object (its `input_schema`); anything else, or a name that is not a string,
                // is not decided as it stands.
                unreadable: !args.is_object() || tool.is_none(),
                proposal: proposal(&tool.unwrap_or_default(), kind, args, str_of(b, "id")),
                signed: false,
            })
        })
        .collect()
}

pub(super) fn apply_to_body(body: &mut Value, rulings: &mut Rulings) {
    let Some(content) = body.get_mut("content").and_then(Value::as_array_mut) else {
        return;
    };
    let (mut passed, mut refused, mut refused_ids) = (0, false, Vec::new());
    for block in content.iter_mut() {
        let Some(kind) = str_of(block, "type").and_then(kind_of) else {
            continue;
        };
        match rulings.next() {
            Ruling::Pass => passed += u64::from(kind == "function"),
            Ruling::Rewrite(args) => {
                passed += u64::from(kind == "function");
                block["input"] = args;
            }
            Ruling::Refuse(text) => {
                refused = true;
                if kind != "function" {
                    refused_ids.extend(str_of(block, "id").map(str::to_string));
                }
                *block = json!({"type": "text", "text": text});
            }
        }
    }
    content.retain(|b| {
        !str_of(b, "tool_use_id").is_some_and(|id| refused_ids.iter().any(|r| r == id))
    });
    if refused && passed == 0 && str_of(body, "stop_reason") == Some("tool_use") {
        body["stop_reason"] = json!("end_turn");
    }
}
