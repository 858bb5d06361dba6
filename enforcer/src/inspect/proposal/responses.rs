//! OpenAI Responses: `function_call`, `custom_tool_call`, `local_shell_call`, `shell_call`, `apply_patch_call`,
//! `computer_call` and `mcp_call` items (and items of a type this reader does not know, refused) of `output` in a
//! whole response; in a stream (server-sent events, or the same events as WebSocket messages),
//! `response.output_item.added` opens an item at its `output_index`, events naming that `output_index` or `item_id`
//! build it (`response.function_call_arguments.delta`/`.done`, `response.custom_tool_call_input.delta`/`.done`,
//! `response.mcp_call_arguments.delta`/`.done`, …), `response.output_item.done` carries it whole, and
//! `response.completed` (`.incomplete`, `.failed`) carries the whole response again. Every event has a
//! `sequence_number`.
//!
//! A call is held from `output_item.added` to `output_item.done`. Passed on it is re-sent as it came; rewritten, the
//! same events carry the new arguments (the first delta all of them, the others none) so sequence numbers stay;
//! refused, it becomes an assistant `message` item with one `output_text` at the same `output_index`, and the
//! sequence numbers after it move by the difference in event count. The final response lists the items as sent.

use bytes::Bytes;
use serde_json::{json, Value};

use super::{
    args_text, event_json, function_args, position, proposal, str_of, typed, Call, Emit, Event,
    Ruling, Rulings, Unreadable,
};

#[derive(Debug, Default)]
pub(super) struct Stream {
    open: Option<Held>,
    /// How far sequence numbers from here on move (events a refusal added or removed).
    shift: i64,
    /// Output items sent in another form: item id → the item as the agent got it.
    replaced: Vec<(String, Value)>,
    /// The calls passed on (as passed, or as rewritten): a lifecycle event's `response.output` may list only these.
    sent: Vec<Call>,
    named: bool,
    pending: Vec<Item>,
}

#[derive(Debug)]
struct Held {
    output_index: u64,
    item_id: Option<String>,
    /// The item as `output_item.added` had it, then as `output_item.done` completed it.
    item: Value,
    /// The item as `output_item.added` had it.
    added: Value,
    events: Vec<(Bytes, Value)>,
}

#[derive(Debug)]
enum Item {
    Emit(Emit),
    Call(Held),
    Final(Bytes, Value),
}

/// The output item types that are no call of the agent's (openai-python `types/responses/response_output_item.py`):
/// messages and reasoning, calls the API runs itself and reports (file search, web search, image generation, code
/// interpreter, tool search), MCP listings and approvals (the approved call comes back as an `mcp_call`), and the
/// outputs of calls, which the agent already ran.
const NOT_CALLS: &[&str] = &[
    "message",
    "reasoning",
    "compaction",
    "file_search_call",
    "web_search_call",
    "image_generation_call",
    "code_interpreter_call",
    "tool_search_call",
    "tool_search_output",
    "additional_tools",
    "mcp_list_tools",
    "mcp_approval_request",
    "mcp_approval_response",
    "program_output",
    "function_call_output",
    "custom_tool_call_output",
    "computer_call_output",
    "local_shell_call_output",
    "shell_call_output",
    "apply_patch_call_output",
];

/// The proposal kind of an output item type, when it is a tool call the agent would see: the calls the agent runs
/// (`function_call`, `custom_tool_call`, `local_shell_call`/`shell_call`, `apply_patch_call` — a file created,
/// deleted or patched —, `computer_call` — a click, a keypress, text typed on the agent's machine) and `mcp_call`.
/// An item type outside these and [`NOT_CALLS`] (a type added to the API after this reader, or `program`) is
/// `unknown`: held as a call, and refused as unreadable ([`item_call`]).
pub(super) fn kind_of(item_type: &str) -> Option<&'static str> {
    match item_type {
        "function_call" => Some("function"),
        "custom_tool_call" => Some("custom"),
        "local_shell_call" | "shell_call" => Some("shell"),
        "mcp_call" => Some("mcp"),
        "apply_patch_call" => Some("apply_patch"),
        "computer_call" => Some("computer"),
        t if NOT_CALLS.contains(&t) => None,
        _ => Some("unknown"),
    }
}

/// The members of a `computer_call` the agent acts on: one `action`, or the batched `actions` (either may be
/// there), read together as the call's arguments.
const COMPUTER_ACTIONS: [&str; 2] = ["action", "actions"];

/// The field of an item holding its arguments, and whether it is text (else a JSON value).
pub(super) fn args_field(item_type: &str) -> (&'static str, bool) {
    match item_type {
        "custom_tool_call" => ("input", true),
        "local_shell_call" | "shell_call" => ("action", false),
        "apply_patch_call" => ("operation", false),
        _ => ("arguments", true),
    }
}

pub(super) fn item_call(item: &Value) -> Option<Call> {
    let ty = str_of(item, "type")?;
    let kind = kind_of(ty)?;
    let name = str_of(item, "name").unwrap_or_default();
    let tool = match ty {
        "local_shell_call" => "local_shell".to_string(),
        "shell_call" => "shell".to_string(),
        "apply_patch_call" => "apply_patch".to_string(),
        "computer_call" => "computer_use".to_string(),
        "mcp_call" => format!(
            "mcp:{}/{name}",
            str_of(item, "server_label").unwrap_or_default()
        ),
        "function_call" | "custom_tool_call" => name.to_string(),
        other => other.to_string(),
    };
    let (field, text) = args_field(ty);
    // Arguments text of a type the SDKs do not hand on as text, a name not a string: unreadable.
    let (args, unreadable) = match item.get(field) {
        _ if ty == "computer_call" => {
            let actions = COMPUTER_ACTIONS
                .iter()
                .filter_map(|k| Some((k.to_string(), item.get(*k)?.clone())))
                .collect();
            (Value::Object(actions), false)
        }
        Some(Value::String(s)) if ty == "custom_tool_call" => (Value::String(s.clone()), false),
        Some(Value::String(s)) => function_args(s),
        Some(v) if !text => (v.clone(), false),
        None | Some(Value::Null) => (json!({}), false),
        Some(v) => (v.clone(), true),
    };
    let odd_name = item
        .get("name")
        .is_some_and(|n| !n.is_string() && !n.is_null());
    let id = str_of(item, "call_id").or_else(|| str_of(item, "id"));
    Some(Call {
        proposal: proposal(&tool, kind, args, id),
        signed: false,
        unreadable: unreadable || odd_name || kind == "unknown",
    })
}

/// `item` with its arguments replaced by `args`.
pub(super) fn with_args(item: &Value, args: &Value) -> Value {
    let mut item = item.clone();
    let ty = str_of(&item, "type").unwrap_or_default();
    if ty == "computer_call" {
        for key in COMPUTER_ACTIONS {
            match args.get(key) {
                Some(v) => item[key] = v.clone(),
                None => {
                    if let Some(o) = item.as_object_mut() {
                        o.remove(key);
                    }
                }
            }
        }
        return item;
    }
    let (field, text) = args_field(ty);
    item[field] = if text {
        json!(args_text(args))
    } else {
        args.clone()
    };
    item
}

/// The assistant message that stands for a refused call (`id` derived from the call's).
fn message_item(item_id: &str, text: &str, done: bool) -> Value {
    let content = if done {
        json!([{"type": "output_text", "annotations": [], "text": text}])
    } else {
        json!([])
    };
    json!({"id": format!("msg_refused_{item_id}"), "type": "message", "role": "assistant",
           "status": if done { "completed" } else { "in_progress" }, "content": content})
}

impl Stream {
    pub(super) fn push(&mut self, ev: Event) -> Result<Vec<Call>, Unreadable> {
        self.named |= ev.name.is_some();
        let Some(v) = event_json(&ev.data)? else {
            self.pending.push(Item::Emit(Emit::Raw(ev.raw)));
            return Ok(Vec::new());
        };
        // Every event is one JSON object; anything else (an array of events in one message) is no event an SDK
        // reads, and is not passed on unread.
        if !v.is_object() {
            return Err(Unreadable);
        }
        // The openai SDKs read an event by its data's `type`, except one named `thread.…`, which they hand on
        // wrapped as an Assistants event (`{"event": …, "data": …}`): read here, skipped by their accumulators.
        let ty = str_of(&v, "type");
        if super::assistants_event(ev.name.as_deref())
            || ev.name.as_deref().is_some_and(|n| Some(n) != ty)
        {
            return Err(Unreadable);
        }
        self.read(ev, v)
    }

    /// One event of JSON `v`: the calls it completed.
    ///
    /// # Errors
    /// [`Unreadable`] for an event that makes the call ambiguous (see [`Stream::lifecycle_lists_sent`] and
    /// [`agrees`]), or whose `output_index` is not a non-negative integer: the openai SDKs file an event under the
    /// output item at that place (`snapshot.output[event.output_index]`), which a string, a fraction or a negative
    /// number names otherwise than this reader would, or not at all (see [`position`]).
    fn read(&mut self, ev: Event, v: Value) -> Result<Vec<Call>, Unreadable> {
        let output_index = position(&v, "output_index", 0).ok_or(Unreadable)?;
        let ty = str_of(&v, "type").unwrap_or_default();
        if ty == "response.output_item.added" {
            let item = v.get("item").cloned().unwrap_or_default();
            if str_of(&item, "type").and_then(kind_of).is_some() {
                if self.open.is_some() {
                    // Items stream one after another; a second one open would be read into the wrong call.
                    return Err(Unreadable);
                }
                self.open = Some(Held {
                    output_index,
                    item_id: str_of(&item, "id").map(str::to_string),
                    added: item.clone(),
                    item,
                    events: vec![(ev.raw, v)],
                });
                return Ok(Vec::new());
            }
        }
        if self.open.as_ref().is_some_and(|h| half_named(h, &v)) {
            return Err(Unreadable);
        }
        if let Some(held) = self.open.as_mut().filter(|h| belongs(h, &v)) {
            if ty == "response.output_item.done" {
                if let Some(item) = v.get("item") {
                    held.item = item.clone();
                }
                held.events.push((ev.raw, v));
                return self.finish();
            }
            held.events.push((ev.raw, v));
            return Ok(Vec::new());
        }
        if LIFECYCLE.contains(&ty) && !self.lifecycle_lists_sent(&v) {
            return Err(Unreadable);
        }
        if matches!(
            ty,
            "response.completed" | "response.incomplete" | "response.failed" | "response.done"
        ) {
            self.pending.push(Item::Final(ev.raw, v));
            return Ok(Vec::new());
        }
        let emit = self.shifted(ev.raw, v);
        self.pending.push(Item::Emit(emit));
        Ok(Vec::new())
    }

    /// Whether every tool call a lifecycle event's `response.output` lists is one the agent was sent as it is
    /// listed (passed or rewritten), or one refused (its item is replaced there). The openai SDK's
    /// `get_final_response()` is `response.completed`'s `response.output`, and its snapshot starts from
    /// `response.created`'s: a call listed only there, or there otherwise than streamed, would reach the agent
    /// undecided.
    fn lifecycle_lists_sent(&self, v: &Value) -> bool {
        let output = v.get("response").and_then(|r| r.get("output"));
        output
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|item| str_of(item, "type").and_then(kind_of).is_some())
            .all(|item| {
                let id = str_of(item, "id");
                let refused = id.is_some_and(|id| self.replaced.iter().any(|(r, _)| r == id));
                refused || item_call(item).is_some_and(|call| self.sent.contains(&call))
            })
    }

    /// The held call, complete.
    ///
    /// # Errors
    /// [`Unreadable`] when its events disagree on it ([`agrees`]).
    pub(super) fn finish(&mut self) -> Result<Vec<Call>, Unreadable> {
        let Some(held) = self.open.take() else {
            return Ok(Vec::new());
        };
        if !agrees(&held) {
            return Err(Unreadable);
        }
        let call = item_call(&held.item);
        self.pending.push(Item::Call(held));
        Ok(call.into_iter().collect())
    }

    pub(super) fn held_bytes(&self) -> usize {
        self.open
            .as_ref()
            .map_or(0, |h| h.events.iter().map(|(b, _)| b.len()).sum())
    }

    fn shifted(&self, raw: Bytes, mut v: Value) -> Emit {
        match v.get("sequence_number").and_then(Value::as_i64) {
            Some(n) if self.shift != 0 => {
                v["sequence_number"] = json!(n + self.shift);
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
                    let output = v.get_mut("response").and_then(|r| r.get_mut("output"));
                    let changed = output.is_some_and(|o| replace_items(o, &self.replaced));
                    if changed {
                        if let Some(n) = v.get("sequence_number").and_then(Value::as_i64) {
                            v["sequence_number"] = json!(n + self.shift);
                        }
                        out.push(typed(self.named, v));
                    } else {
                        out.push(self.shifted(raw, v));
                    }
                }
            }
        }
        out
    }

    fn render_call(&mut self, held: Held, ruling: Ruling, out: &mut Vec<Emit>) {
        match ruling {
            Ruling::Pass => {
                self.sent.extend(item_call(&held.item));
                for (raw, v) in held.events {
                    out.push(self.shifted(raw, v));
                }
            }
            Ruling::Rewrite(args) => {
                let item = with_args(&held.item, &args);
                self.sent.extend(item_call(&item));
                let text = args_text(&args);
                let mut first_delta = true;
                for (_, mut v) in held.events {
                    if v.get("delta").is_some_and(Value::is_string) {
                        v["delta"] = json!(if first_delta { text.as_str() } else { "" });
                        first_delta = false;
                    }
                    for field in ["arguments", "input"] {
                        if v.get(field).is_some_and(Value::is_string) {
                            v[field] = json!(text);
                        }
                    }
                    if str_of(&v, "type") == Some("response.output_item.done") {
                        v["item"] = item.clone();
                    }
                    if let Some(n) = v.get("sequence_number").and_then(Value::as_i64) {
                        v["sequence_number"] = json!(n + self.shift);
                    }
                    out.push(typed(self.named, v));
                }
                if let Some(id) = held.item_id {
                    self.replaced.push((id, item));
                }
            }
            Ruling::Refuse(text) => self.render_refusal(held, &text, out),
        }
    }

    /// The refused call's events replaced by a message item's, at least as many (padded with empty deltas).
    fn render_refusal(&mut self, held: Held, text: &str, out: &mut Vec<Emit>) {
        let id = held.item_id.clone().unwrap_or_default();
        let msg_id = format!("msg_refused_{id}");
        let oi = held.output_index;
        let part = |t: &str| json!({"type": "output_text", "annotations": [], "text": t});
        let mut events = vec![
            json!({"type": "response.output_item.added", "output_index": oi, "item": message_item(&id, text, false)}),
            json!({"type": "response.content_part.added", "item_id": msg_id, "output_index": oi, "content_index": 0, "part": part("")}),
            json!({"type": "response.output_text.delta", "item_id": msg_id, "output_index": oi, "content_index": 0, "delta": text, "logprobs": []}),
        ];
        for _ in 6..held.events.len() {
            events.push(json!({"type": "response.output_text.delta", "item_id": msg_id, "output_index": oi, "content_index": 0, "delta": "", "logprobs": []}));
        }
        events.extend([
            json!({"type": "response.output_text.done", "item_id": msg_id, "output_index": oi, "content_index": 0, "text": text, "logprobs": []}),
            json!({"type": "response.content_part.done", "item_id": msg_id, "output_index": oi, "content_index": 0, "part": part(text)}),
            json!({"type": "response.output_item.done", "output_index": oi, "item": message_item(&id, text, true)}),
        ]);
        let first = held
            .events
            .first()
            .and_then(|(_, v)| v.get("sequence_number"))
            .and_then(Value::as_i64);
        if let Some(first) = first {
            for (i, e) in (0_i64..).zip(events.iter_mut()) {
                e["sequence_number"] = json!(first + self.shift + i);
            }
        }
        let added = i64::try_from(events.len()).unwrap_or(0);
        let removed = i64::try_from(held.events.len()).unwrap_or(0);
        for e in events {
            out.push(typed(self.named, e));
        }
        self.shift += added - removed;
        self.replaced
            .push((id.clone(), message_item(&id, text, true)));
    }
}

/// The lifecycle events, each carrying the whole response (`response.output` as far as it is).
const LIFECYCLE: [&str; 7] = [
    "response.created",
    "response.queued",
    "response.in_progress",
    "response.completed",
    "response.incomplete",
    "response.failed",
    "response.done",
];

/// Whether the held call's events agree on it: `output_item.done` names the tool `output_item.added` named, and
/// where the arguments are text, the deltas joined, every `.done` event's text and the item's own are one text (the
/// openai SDK's snapshot joins the deltas, its `.done` event is read by agents as is, and the item by others).
fn agrees(held: &Held) -> bool {
    let ty = str_of(&held.item, "type").unwrap_or_default();
    let same = |key: &str| held.added.get(key) == held.item.get(key);
    if str_of(&held.added, "type") != Some(ty) || !same("name") || !same("call_id") {
        return false;
    }
    let (field, text) = args_field(ty);
    if !text {
        return true;
    }
    let whole = str_of(&held.item, field).unwrap_or_default();
    let added = str_of(&held.added, field).unwrap_or_default();
    let mut joined: Option<String> = None;
    for (_, v) in &held.events[1..] {
        if str_of(v, "type") == Some("response.output_item.done") {
            continue;
        }
        if let Some(piece) = str_of(v, "delta") {
            joined.get_or_insert_with(String::new).push_str(piece);
        }
        if str_of(v, field).is_some_and(|done| done != whole) {
            return false;
        }
    }
    (added.is_empty() || added == whole) && joined.is_none_or(|j| j == whole)
}

/// Whether event `v` names the held item by one of `output_index` and `item_id` and another item by the other (the
/// openai SDK reads the `output_index`).
fn half_named(held: &Held, v: &Value) -> bool {
    let index = v
        .get("output_index")
        .map(|i| i.as_u64() == Some(held.output_index));
    let id = match (&held.item_id, str_of(v, "item_id")) {
        (Some(held_id), Some(id)) => Some(held_id == id),
        _ => None,
    };
    matches!((index, id), (Some(a), Some(b)) if a != b)
}

/// Whether event `v` builds the held item: it names the item's `output_index` or `item_id`.
fn belongs(held: &Held, v: &Value) -> bool {
    v.get("output_index").and_then(Value::as_u64) == Some(held.output_index)
        || (held.item_id.is_some() && str_of(v, "item_id") == held.item_id.as_deref())
}

/// Replace the items of `output` listed in `replaced` (by id); whether any was.
fn replace_items(output: &mut Value, replaced: &[(String, Value)]) -> bool {
    let mut changed = false;
    for item in output.as_array_mut().into_iter().flatten() {
        let id = str_of(item, "id").unwrap_or_default();
        if let Some((_, new)) = replaced.iter().find(|(r, _)| r == id) {
            *item = new.clone();
            changed = true;
        }
    }
    changed
}

pub(super) fn body_calls(body: &Value) -> Vec<Call> {
    let output = body
        .get("output")
        .or_else(|| body.get("response").and_then(|r| r.get("output")));
    output
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(item_call)
        .collect()
}

pub(super) fn apply_to_body(body: &mut Value, rulings: &mut Rulings) {
    let output = if body.get("output").is_some() {
        body.get_mut("output")
    } else {
        body.get_mut("response").and_then(|r| r.get_mut("output"))
    };
    for item in output.and_then(Value::as_array_mut).into_iter().flatten() {
        if str_of(item, "type").and_then(kind_of).is_none() {
            continue;
        }
        match rulings.next() {
            Ruling::Pass => {}
            Ruling::Rewrite(args) => *item = with_args(item, &args),
            Ruling::Refuse(text) => {
                let id = str_of(item, "id").unwrap_or_default().to_string();
                *item = message_item(&id, &text, true);
            }
        }
    }
}
