//! OpenAI Realtime API server events (`wss://…/v1/realtime`), by their GA names and by the beta's (`OpenAI-Beta:
//! realtime=v1`), as openai-python declares them (`types/realtime/realtime_server_event.py`, formerly
//! `types/beta/realtime/`). Items are read as the Responses reader reads its output items (`responses`):
//! `function_call` and `mcp_call` are calls, messages, call outputs, MCP listings and approvals are not, an item of
//! any other type is refused as unreadable. Unlike a Responses stream, one item reaches the agent through several
//! events, and any of them is enough for an SDK to run it (openai-agents-python and openai-agents-js run a
//! `function_call` item whose `status` is `completed` from `response.output_item.added` or `.done`):
//!
//! - its `item`, whole or partial: `response.output_item.added`/`.done`, `conversation.item.created` (beta),
//!   `conversation.item.added`/`.done` (GA), `conversation.item.retrieved`, and any other event with a call `item`;
//! - its `item_id`: `response.function_call_arguments.delta`/`.done` (GA's `.done` names the function too),
//!   `response.mcp_call_arguments.delta`/`.done`, `response.mcp_call.in_progress`/`.completed`/`.failed`;
//! - `response.output[]` of `response.created` and `response.done`, each item whole.
//!
//! A call is held, by its item id, from the first event naming it until one carries it whole (an item of
//! `response.output_item.done`, `conversation.item.done` or `.retrieved`, an item whose `status` is `completed` or
//! `incomplete`, a listing in `response.output`); its events must agree on it (name, `call_id`, the deltas joined,
//! every `.done` text and every item's). Every other event passes at once. Passed, the held events are re-sent as
//! they came; rewritten, they carry the new arguments; refused, the item becomes an assistant `message` with the same
//! id (the conversation the server keeps, and the next item's `previous_item_id`, still name it) whose one text part
//! says so: its item events carry the message, and its argument and MCP events give way, within a response, to a
//! content part and its text (GA `response.output_text.*`, beta `response.text.*`). A later event naming a settled
//! call is sent as the call was settled (a refused call's argument events are dropped, its item is the message);
//! one that disagrees with what was decided, or adds to its arguments, is unreadable.

use bytes::Bytes;
use serde_json::{json, Value};

use super::responses::{args_field, item_call, kind_of, with_args};
use super::{args_text, event_json, str_of, typed, Call, Emit, Event, Ruling, Rulings, Unreadable};

#[derive(Debug, Default)]
pub(super) struct Stream {
    /// Calls being held, in the order they opened.
    open: Vec<Held>,
    /// Calls ruled on, by item id.
    settled: Vec<(String, Settled)>,
    /// The beta interface's event names and content types, else the GA's.
    beta: bool,
    pending: Vec<Item>,
}

#[derive(Debug)]
struct Held {
    id: String,
    /// Each item the events carried, in order; the last one whole once the call is complete.
    items: Vec<Value>,
    /// The held events, with what each carries of the call.
    events: Vec<(Bytes, Value, Piece)>,
}

/// What became of a call.
#[derive(Debug, Clone)]
struct Settled {
    /// The item as the model proposed it, whole.
    proposed: Value,
    outcome: Outcome,
}

#[derive(Debug, Clone)]
enum Outcome {
    Pass,
    Rewrite(Value),
    /// Refused with this text.
    Refuse(String),
}

#[derive(Debug)]
enum Item {
    Emit(Emit),
    Call(Held),
    /// An event naming calls settled by the time it is released.
    Settled(Bytes, Value),
}

/// What an event carries of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// Its `item`, not yet complete.
    Partial,
    /// Its `item`, whole.
    Whole,
    /// A piece of its arguments' text (`….arguments.delta`).
    Delta,
    /// Its arguments' text, final (`….arguments.done`).
    Done,
    /// Its progress (`response.mcp_call.*`).
    Mark,
}

/// The events that name a call by `item_id`, and what they carry of it.
fn call_event(ty: &str) -> Option<Piece> {
    match ty {
        "response.function_call_arguments.delta" | "response.mcp_call_arguments.delta" => {
            Some(Piece::Delta)
        }
        "response.function_call_arguments.done" | "response.mcp_call_arguments.done" => {
            Some(Piece::Done)
        }
        "response.mcp_call.in_progress"
        | "response.mcp_call.completed"
        | "response.mcp_call.failed" => Some(Piece::Mark),
        _ => None,
    }
}

/// The item events whose item is whole whatever its `status` says.
const WHOLE: [&str; 3] = [
    "response.output_item.done",
    "conversation.item.done",
    "conversation.item.retrieved",
];

/// Event types only the beta interface sends, and only the GA interface sends.
const BETA_ONLY: [&str; 6] = [
    "response.text.delta",
    "response.text.done",
    "response.audio.delta",
    "response.audio.done",
    "response.audio_transcript.delta",
    "response.audio_transcript.done",
];
const GA_ONLY: [&str; 8] = [
    "response.output_text.delta",
    "response.output_text.done",
    "response.output_audio.delta",
    "response.output_audio.done",
    "response.output_audio_transcript.delta",
    "response.output_audio_transcript.done",
    "conversation.item.added",
    "conversation.item.done",
];

/// Whether an item is one the readers hold as a call (an unknown type included, refused as unreadable).
fn is_call(item: &Value) -> bool {
    str_of(item, "type").and_then(kind_of).is_some()
}

/// A call item's id: the events of a call without one could not be told from another's.
fn id_of(item: &Value) -> Result<String, Unreadable> {
    str_of(item, "id").map(str::to_string).ok_or(Unreadable)
}

/// The call items of `response.output[]`, whole, by id.
fn listed(v: &Value) -> Result<Vec<(String, Value)>, Unreadable> {
    let output = v.get("response").and_then(|r| r.get("output"));
    let mut out: Vec<(String, Value)> = Vec::new();
    for item in output.and_then(Value::as_array).into_iter().flatten() {
        if is_call(item) {
            let id = id_of(item)?;
            if out.iter().any(|(seen, _)| *seen == id) {
                return Err(Unreadable);
            }
            out.push((id, item.clone()));
        }
    }
    Ok(out)
}

impl Stream {
    /// A reader for a connection opened in the beta interface (`beta`) or the GA one; the events it reads may say
    /// otherwise (their names differ).
    pub(super) fn new(beta: bool) -> Stream {
        Stream {
            beta,
            ..Stream::default()
        }
    }

    pub(super) fn push(&mut self, ev: Event) -> Result<Vec<Call>, Unreadable> {
        let Some(v) = event_json(&ev.data)? else {
            self.pending.push(Item::Emit(Emit::Raw(ev.raw)));
            return Ok(Vec::new());
        };
        // Every event is one JSON object; anything else (an array of events in one message) is no event an SDK
        // reads, and is not passed on unread.
        if !v.is_object() {
            return Err(Unreadable);
        }
        self.learn(&v);
        self.read(ev.raw, v)
    }

    /// The interface the events speak: beta and GA name their text and audio events apart, and a GA session
    /// says `"type": "realtime"`.
    fn learn(&mut self, v: &Value) {
        let ty = str_of(v, "type").unwrap_or_default();
        if BETA_ONLY.contains(&ty) {
            self.beta = true;
        } else if GA_ONLY.contains(&ty) {
            self.beta = false;
        } else if matches!(ty, "session.created" | "session.updated") {
            let session = v.get("session");
            if session.and_then(|s| str_of(s, "type")) == Some("realtime") {
                self.beta = false;
            } else if session.is_some_and(|s| s.get("modalities").is_some()) {
                self.beta = true;
            }
        }
    }

    /// One event of JSON `v`: the calls it completed.
    ///
    /// # Errors
    /// [`Unreadable`] for an event naming a call it cannot be told apart from (no item id, an `item_id` naming
    /// another item than its `item`, a call listed twice), one whose call's events disagree ([`agrees`]), or one
    /// naming a settled call otherwise than it was settled ([`Stream::check`]).
    fn read(&mut self, raw: Bytes, v: Value) -> Result<Vec<Call>, Unreadable> {
        let ty = str_of(&v, "type").unwrap_or_default();
        let mut named: Option<(String, Piece)> = None;
        if let Some(piece) = call_event(ty) {
            if v.get("item").is_some() {
                return Err(Unreadable);
            }
            let id = str_of(&v, "item_id").ok_or(Unreadable)?;
            named = Some((id.to_string(), piece));
        }
        if let Some(item) = v.get("item").filter(|i| is_call(i)) {
            let id = id_of(item)?;
            if str_of(&v, "item_id").is_some_and(|other| other != id) {
                return Err(Unreadable);
            }
            let whole = WHOLE.contains(&ty)
                || matches!(str_of(item, "status"), Some("completed" | "incomplete"));
            named = Some((id, if whole { Piece::Whole } else { Piece::Partial }));
        }
        let listed = listed(&v)?;
        match (named, listed.is_empty()) {
            (None, true) => {
                self.pending.push(Item::Emit(Emit::Raw(raw)));
                Ok(Vec::new())
            }
            (Some((id, piece)), true) => self.read_one(raw, v, id, piece),
            (None, false) => self.read_listed(raw, v, listed),
            (Some(_), false) => Err(Unreadable),
        }
    }

    /// An event naming one call.
    fn read_one(
        &mut self,
        raw: Bytes,
        v: Value,
        id: String,
        piece: Piece,
    ) -> Result<Vec<Call>, Unreadable> {
        if let Some(settled) = self.settled(&id) {
            check(settled, &v, piece)?;
            self.pending.push(Item::Settled(raw, v));
            return Ok(Vec::new());
        }
        let at = match self.open.iter().position(|h| h.id == id) {
            Some(at) => at,
            None => {
                self.open.push(Held {
                    id,
                    items: Vec::new(),
                    events: Vec::new(),
                });
                self.open.len() - 1
            }
        };
        let held = &mut self.open[at];
        if matches!(piece, Piece::Partial | Piece::Whole) {
            held.items.push(v.get("item").cloned().unwrap_or_default());
        }
        held.events.push((raw, v, piece));
        if piece != Piece::Whole {
            return Ok(Vec::new());
        }
        let held = self.open.remove(at);
        self.complete(held)
    }

    /// A lifecycle event listing calls whole (`response.done`'s `response.output`): each one not yet settled is
    /// complete now.
    fn read_listed(
        &mut self,
        raw: Bytes,
        v: Value,
        listed: Vec<(String, Value)>,
    ) -> Result<Vec<Call>, Unreadable> {
        let mut calls = Vec::new();
        for (id, item) in listed {
            if let Some(settled) = self.settled(&id) {
                check_item(settled, &item, true)?;
                continue;
            }
            let mut held = match self.open.iter().position(|h| h.id == id) {
                Some(at) => self.open.remove(at),
                None => Held {
                    id,
                    items: Vec::new(),
                    events: Vec::new(),
                },
            };
            held.items.push(item);
            calls.extend(self.complete(held)?);
        }
        self.pending.push(Item::Settled(raw, v));
        Ok(calls)
    }

    /// The held call, complete.
    fn complete(&mut self, held: Held) -> Result<Vec<Call>, Unreadable> {
        if !agrees(&held) {
            return Err(Unreadable);
        }
        let call = held.items.last().and_then(item_call).ok_or(Unreadable)?;
        self.pending.push(Item::Call(held));
        Ok(vec![call])
    }

    fn settled(&self, id: &str) -> Option<&Settled> {
        self.settled.iter().find(|(s, _)| s == id).map(|(_, s)| s)
    }

    /// The end of the stream: calls still held are dropped, never sent.
    pub(super) fn finish(&mut self) -> Vec<Call> {
        self.open.clear();
        Vec::new()
    }

    pub(super) fn held_bytes(&self) -> usize {
        self.open
            .iter()
            .flat_map(|h| h.events.iter())
            .map(|(b, _, _)| b.len())
            .sum()
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
                Item::Settled(raw, v) => out.extend(self.render_settled(raw, v)),
            }
        }
        out
    }

    fn render_call(&mut self, held: Held, ruling: Ruling, out: &mut Vec<Emit>) {
        let proposed = held.items.last().cloned().unwrap_or_default();
        let outcome = match ruling {
            Ruling::Pass => {
                out.extend(held.events.into_iter().map(|(raw, _, _)| Emit::Raw(raw)));
                Outcome::Pass
            }
            Ruling::Rewrite(args) => {
                let text = args_text(&args);
                let mut first_delta = true;
                for (raw, mut v, piece) in held.events {
                    match piece {
                        Piece::Mark => {
                            out.push(Emit::Raw(raw));
                            continue;
                        }
                        Piece::Partial | Piece::Whole => {
                            let item = v.get("item").cloned().unwrap_or_default();
                            let (field, _) = args_field(str_of(&item, "type").unwrap_or_default());
                            // A partial item without arguments yet stays as it is: the deltas carry them.
                            if piece == Piece::Partial
                                && str_of(&item, field).is_none_or(str::is_empty)
                            {
                                out.push(Emit::Raw(raw));
                                continue;
                            }
                            v["item"] = with_args(&item, &args);
                        }
                        Piece::Delta => {
                            v["delta"] = json!(if first_delta { text.as_str() } else { "" });
                            first_delta = false;
                        }
                        Piece::Done => v["arguments"] = json!(text),
                    }
                    out.push(typed(false, v));
                }
                Outcome::Rewrite(args)
            }
            Ruling::Refuse(text) => {
                self.render_refusal(&held, &text, out);
                Outcome::Refuse(text)
            }
        };
        self.settled.push((held.id, Settled { proposed, outcome }));
    }

    /// The refused call's item events carry the message instead; its argument and MCP events are dropped, and
    /// within a response the message's text part is streamed before the item is done.
    fn render_refusal(&self, held: &Held, text: &str, out: &mut Vec<Emit>) {
        let place = held.events.iter().find_map(|(_, v, _)| {
            Some((str_of(v, "response_id")?, v.get("output_index")?.clone()))
        });
        let mut streamed = place.is_none();
        for (_, v, piece) in &held.events {
            let mut v = v.clone();
            match piece {
                Piece::Delta | Piece::Done | Piece::Mark => continue,
                Piece::Partial => v["item"] = self.message(&held.id, text, false),
                Piece::Whole => {
                    if let (false, Some((response, index))) = (streamed, &place) {
                        out.extend(self.text_events(&held.id, text, response, index));
                        streamed = true;
                    }
                    v["item"] = self.message(&held.id, text, true);
                }
            }
            out.push(typed(false, v));
        }
        if let (false, Some((response, index))) = (streamed, &place) {
            out.extend(self.text_events(&held.id, text, response, index));
        }
    }

    /// An event naming settled calls, as they were settled: `None` when it is dropped (an argument or MCP event of a
    /// refused call).
    fn render_settled(&self, raw: Bytes, mut v: Value) -> Option<Emit> {
        let ty = str_of(&v, "type").unwrap_or_default();
        if let Some(piece) = call_event(ty) {
            let settled = self.settled(str_of(&v, "item_id")?)?;
            return match (&settled.outcome, piece) {
                (Outcome::Refuse(_), _) => None,
                (Outcome::Rewrite(args), Piece::Done) => {
                    v["arguments"] = json!(args_text(args));
                    Some(typed(false, v))
                }
                _ => Some(Emit::Raw(raw)),
            };
        }
        if let Some(item) = v.get("item").filter(|i| is_call(i)).cloned() {
            let id = str_of(&item, "id")?;
            let whole = WHOLE.contains(&ty)
                || matches!(str_of(&item, "status"), Some("completed" | "incomplete"));
            v["item"] = match &self.settled(id)?.outcome {
                Outcome::Pass => return Some(Emit::Raw(raw)),
                Outcome::Rewrite(args) => with_args(&item, args),
                Outcome::Refuse(text) => self.message(id, text, whole),
            };
            return Some(typed(false, v));
        }
        let mut changed = false;
        let output = v
            .get_mut("response")
            .and_then(|r| r.get_mut("output"))
            .and_then(Value::as_array_mut);
        for item in output.into_iter().flatten() {
            if !is_call(item) {
                continue;
            }
            let id = str_of(item, "id")?.to_string();
            match &self.settled(&id)?.outcome {
                Outcome::Pass => continue,
                Outcome::Rewrite(args) => *item = with_args(item, args),
                Outcome::Refuse(text) => *item = self.message(&id, text, true),
            }
            changed = true;
        }
        if changed {
            Some(typed(false, v))
        } else {
            Some(Emit::Raw(raw))
        }
    }

    /// The assistant message that stands for a refused call, with the call's item id; its text part `output_text`
    /// (GA) or `text` (beta).
    fn message(&self, id: &str, text: &str, done: bool) -> Value {
        let kind = if self.beta { "text" } else { "output_text" };
        let content = if done {
            json!([{"type": kind, "text": text}])
        } else {
            json!([])
        };
        json!({"id": id, "object": "realtime.item", "type": "message", "role": "assistant",
               "status": if done { "completed" } else { "in_progress" }, "content": content})
    }

    /// The message's text streamed within response `response` at `index`: a content part added, its text in one
    /// delta, done, the part done (each event with the fields the SDKs' event types require).
    fn text_events(&self, id: &str, text: &str, response: &str, index: &Value) -> Vec<Emit> {
        let (delta, done) = if self.beta {
            ("response.text.delta", "response.text.done")
        } else {
            ("response.output_text.delta", "response.output_text.done")
        };
        let event = |n: usize, ty: &str, key: &str, value: Value| {
            let mut e = json!({"type": ty, "event_id": format!("event_refused_{id}_{n}"),
                "response_id": response, "item_id": id, "output_index": index, "content_index": 0});
            e[key] = value;
            typed(false, e)
        };
        vec![
            event(
                0,
                "response.content_part.added",
                "part",
                json!({"type": "text", "text": ""}),
            ),
            event(1, delta, "delta", json!(text)),
            event(2, done, "text", json!(text)),
            event(
                3,
                "response.content_part.done",
                "part",
                json!({"type": "text", "text": text}),
            ),
        ]
    }
}

/// Whether a held call's events agree on it: every item names the type, tool and `call_id` the whole one names, its
/// arguments are none yet or the whole one's; the deltas joined, and every `.done` event's text, are the whole
/// item's arguments, and the events naming a function or `call_id` name the item's.
fn agrees(held: &Held) -> bool {
    let Some(whole) = held.items.last() else {
        return false;
    };
    let ty = str_of(whole, "type").unwrap_or_default();
    let (field, text) = args_field(ty);
    let same = |a: &Value, key: &str| a.get(key) == whole.get(key);
    let args = str_of(whole, field).unwrap_or_default();
    for item in &held.items {
        if ["type", "name", "call_id", "server_label"]
            .iter()
            .any(|key| !same(item, key))
        {
            return false;
        }
        if text && !str_of(item, field).is_none_or(|a| a.is_empty() || a == args) {
            return false;
        }
    }
    let mut joined: Option<String> = None;
    for (_, v, piece) in &held.events {
        let named_otherwise = ["name", "call_id"]
            .iter()
            .any(|key| v.get(*key).is_some_and(|n| Some(n) != whole.get(*key)));
        match piece {
            Piece::Delta | Piece::Done if named_otherwise => return false,
            Piece::Delta => match v.get("delta") {
                Some(Value::String(d)) => joined.get_or_insert_with(String::new).push_str(d),
                _ => return false,
            },
            Piece::Done if str_of(v, "arguments") != Some(args) => return false,
            _ => {}
        }
    }
    joined.is_none_or(|j| j == args)
}

/// Whether a later event naming a settled call agrees with what was decided (a refused call's are dropped or
/// replaced, whatever they say).
///
/// # Errors
/// [`Unreadable`] when the event disagrees with the call as proposed, or adds to its arguments.
fn check(settled: &Settled, v: &Value, piece: Piece) -> Result<(), Unreadable> {
    if matches!(settled.outcome, Outcome::Refuse(_)) {
        return Ok(());
    }
    let proposed = &settled.proposed;
    let (field, _) = args_field(str_of(proposed, "type").unwrap_or_default());
    let agrees = match piece {
        Piece::Partial | Piece::Whole => {
            return check_item(
                settled,
                v.get("item").unwrap_or(&Value::Null),
                piece == Piece::Whole,
            )
        }
        Piece::Delta => str_of(v, "delta") == Some(""),
        Piece::Done => {
            str_of(v, "arguments") == str_of(proposed, field)
                && ["name", "call_id"]
                    .iter()
                    .all(|k| v.get(*k).is_none_or(|n| Some(n) == proposed.get(*k)))
        }
        Piece::Mark => true,
    };
    agrees.then_some(()).ok_or(Unreadable)
}

/// Whether a later item of a settled call is the call as proposed (a partial one may have no arguments yet).
fn check_item(settled: &Settled, item: &Value, whole: bool) -> Result<(), Unreadable> {
    if matches!(settled.outcome, Outcome::Refuse(_)) {
        return Ok(());
    }
    let proposed = &settled.proposed;
    let (field, _) = args_field(str_of(proposed, "type").unwrap_or_default());
    let same = |key: &str| item.get(key) == proposed.get(key);
    let args = item.get(field);
    let args_agree = args == proposed.get(field)
        || (!whole && args.is_none_or(|a| a.as_str().is_some_and(str::is_empty)));
    (same("type") && same("name") && same("call_id") && same("server_label") && args_agree)
        .then_some(())
        .ok_or(Unreadable)
}
