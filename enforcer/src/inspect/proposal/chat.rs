//! OpenAI Chat Completions: `choices[].message.tool_calls` in a whole response; in a stream, `chat.completion.chunk`
//! events whose `choices[].delta.tool_calls[]` carry each call in pieces by `index` (`id`, `type` and name first,
//! then argument text), a chunk with the choice's `finish_reason`, and `data: [DONE]`. Function (`function.name`,
//! `function.arguments`) and custom (`custom.name`, `custom.input`) calls; and the legacy single function call of
//! the `functions` parameter, `message.function_call` (`name`, `arguments`; streamed as `delta.function_call`
//! pieces, `finish_reason: function_call`), which the SDKs still assemble and hand to the agent.
//!
//! A call is held from its first piece until its choice finishes. Passed on unchanged it is re-sent as it came (or as
//! one chunk, renumbered, when an earlier call was refused or its pieces shared a chunk with other content); a
//! refused call becomes a `content` delta, and `finish_reason: tool_calls` becomes `stop` when no call is left.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::{
    args_text, event_json, function_args, position, proposal, str_of, Call, Emit, Event, Ruling,
    Rulings, Unreadable,
};

#[derive(Debug, Default)]
pub(super) struct Stream {
    /// Open calls by choice index, then by tool-call index.
    open: BTreeMap<u64, BTreeMap<u64, Held>>,
    choices: BTreeMap<u64, Choice>,
    pending: Vec<Item>,
}

/// What the agent has been sent for one choice.
#[derive(Debug, Default)]
struct Choice {
    /// Calls passed on so far: the next one's index.
    passed: u64,
    /// Text was sent (a refusal then starts on a new paragraph).
    text: bool,
    /// A legacy `function_call` was passed on.
    legacy: bool,
    /// Calls the upstream opened in this choice (the length of the SDK's list of them).
    calls: u64,
    /// The upstream opened a legacy `function_call` in this choice.
    legacy_seen: bool,
    refused: bool,
}

/// The key of a choice's legacy `function_call` among its open calls (after every tool-call index).
const LEGACY: u64 = u64::MAX;

#[derive(Debug)]
struct Held {
    index: u64,
    /// A legacy `function_call`, not a `tool_calls` entry.
    legacy: bool,
    id: Option<String>,
    /// `function` or `custom`.
    kind: String,
    name: String,
    args: String,
    /// The `role` the call's first chunk carried, to keep when that chunk is not re-sent.
    role: Option<Value>,
    /// The chunk the call started in, without its choices: the envelope of a chunk written for it.
    envelope: Value,
    raws: Vec<Bytes>,
    /// Every chunk of the call carried only this call, so its bytes can be re-sent as they came.
    pure: bool,
    /// A name or argument piece was not a string: not read as the SDKs join it.
    odd: bool,
    /// A piece named the call's `type`.
    typed: bool,
}

/// One call piece of a delta: a `tool_calls` entry or the legacy `function_call`.
#[derive(Debug)]
enum Piece {
    Tool(Value),
    Legacy(Value),
}

#[derive(Debug)]
enum Item {
    Emit(Emit),
    Call {
        choice: u64,
        held: Held,
    },
    /// A chunk finishing choices, sent once their calls are ruled on.
    Finish {
        name: Option<String>,
        chunk: Value,
        raw: Bytes,
        changed: bool,
    },
}

impl Stream {
    pub(super) fn push(&mut self, ev: Event) -> Result<Vec<Call>, Unreadable> {
        if ev.data.trim() == "[DONE]" {
            let calls = self.close_all();
            self.pending.push(Item::Emit(Emit::Raw(ev.raw)));
            return Ok(calls);
        }
        if super::assistants_event(ev.name.as_deref()) {
            return Err(Unreadable);
        }
        if let Some(text) = no_calls(&ev.data) {
            for index in text {
                self.choices.entry(index).or_default().text = true;
            }
            self.pending.push(Item::Emit(Emit::Raw(ev.raw)));
            return Ok(Vec::new());
        }
        let Some(chunk) = event_json(&ev.data)? else {
            self.pending.push(Item::Emit(Emit::Raw(ev.raw)));
            return Ok(Vec::new());
        };
        self.read(ev, chunk)
    }

    /// One chunk of JSON `chunk`: the calls it completed.
    fn read(&mut self, ev: Event, mut chunk: Value) -> Result<Vec<Call>, Unreadable> {
        let (pieces, finishing, bare) = self.take_pieces(&mut chunk)?;
        if pieces.is_empty() && finishing.is_empty() {
            self.pending.push(Item::Emit(Emit::Raw(ev.raw)));
            return Ok(Vec::new());
        }
        let pure = pieces.len() == 1 && bare && finishing.is_empty();
        let took = !pieces.is_empty();
        let mut envelope = chunk.clone();
        if let Some(o) = envelope.as_object_mut() {
            o.insert("choices".into(), Value::Array(Vec::new()));
            o.remove("usage");
        }
        for (choice, role, piece) in pieces {
            self.absorb(choice, role, piece, &envelope, pure.then(|| ev.raw.clone()))?;
        }
        if !finishing.is_empty() {
            let calls = finishing.iter().flat_map(|&c| self.close(c)).collect();
            self.pending.push(Item::Finish {
                name: ev.name,
                chunk,
                raw: ev.raw,
                changed: took,
            });
            return Ok(calls);
        }
        if !bare {
            self.pending.push(Item::Emit(Emit::New {
                name: ev.name,
                data: chunk.to_string(),
            }));
        }
        Ok(Vec::new())
    }

    /// Remove the tool-call pieces from `chunk`: the pieces (choice, the delta's role, piece), the choices it
    /// finishes, and whether nothing else of note is left in it (a role, nulls and empty text aside).
    ///
    /// # Errors
    /// [`Unreadable`] when a choice's `index` is not a non-negative integer: the SDKs would file its pieces under
    /// another choice than this reader, or fail (see [`position`]). A choice without one is choice 0.
    #[expect(clippy::type_complexity, reason = "a private triple read once by push")]
    fn take_pieces(
        &mut self,
        chunk: &mut Value,
    ) -> Result<(Vec<(u64, Option<Value>, Piece)>, Vec<u64>, bool), Unreadable> {
        let (mut pieces, mut finishing, mut bare) = (Vec::new(), Vec::new(), true);
        if chunk.get("usage").is_some_and(|u| !u.is_null()) {
            bare = false;
        }
        let Some(choices) = chunk.get_mut("choices").and_then(Value::as_array_mut) else {
            return Ok((pieces, finishing, false));
        };
        for c in choices.iter_mut() {
            let index = position(c, "index", 0).ok_or(Unreadable)?;
            if c.get("finish_reason").is_some_and(|f| !f.is_null()) {
                finishing.push(index);
            }
            let Some(delta) = c.get_mut("delta").and_then(Value::as_object_mut) else {
                continue;
            };
            if delta
                .get("content")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
            {
                self.choices.entry(index).or_default().text = true;
            }
            let role = delta.get("role").cloned();
            if let Some(Value::Array(calls)) = delta.remove("tool_calls") {
                pieces.extend(
                    calls
                        .into_iter()
                        .map(|p| (index, role.clone(), Piece::Tool(p))),
                );
            }
            if let Some(call) = delta.remove("function_call").filter(|c| !c.is_null()) {
                pieces.push((index, role.clone(), Piece::Legacy(call)));
            }
            bare &= delta
                .iter()
                .all(|(k, v)| k == "role" || v.is_null() || v.as_str().is_some_and(str::is_empty));
        }
        Ok((pieces, finishing, bare))
    }

    /// Add one piece to its call.
    ///
    /// # Errors
    /// [`Unreadable`] when the SDKs' accumulator files the piece under another call than its `index` says. The
    /// openai SDK keeps a choice's calls in a list (`lib/streaming/_deltas.py`, `accumulate_delta`): a piece is
    /// joined to the entry at its index when there is one — a call already decided, after its choice finished,
    /// included — and a new call is inserted at that index, which Python's `list.insert` clamps to the list's end.
    /// So a new call's index must be the number of calls the choice has had (indices dense from 0), a non-negative
    /// integer (none is 0; see [`position`]), and a piece may not come for a call already closed; the legacy
    /// `function_call` is likewise one per choice.
    fn absorb(
        &mut self,
        choice: u64,
        role: Option<Value>,
        piece: Piece,
        envelope: &Value,
        raw: Option<Bytes>,
    ) -> Result<(), Unreadable> {
        let (legacy, piece) = match piece {
            Piece::Tool(p) => (false, p),
            Piece::Legacy(p) => (true, p),
        };
        let index = if legacy {
            LEGACY
        } else {
            // Without one the SDK keeps the piece as its list's first entry: index 0.
            position(&piece, "index", 0).ok_or(Unreadable)?
        };
        let open = self.open.entry(choice).or_default();
        if !open.contains_key(&index) {
            let seen = self.choices.entry(choice).or_default();
            if legacy {
                if std::mem::replace(&mut seen.legacy_seen, true) {
                    return Err(Unreadable);
                }
            } else if index == seen.calls {
                seen.calls += 1;
            } else {
                return Err(Unreadable);
            }
        }
        let held = open.entry(index).or_insert_with(|| Held {
            index,
            legacy,
            id: None,
            kind: "function".into(),
            name: String::new(),
            args: String::new(),
            role,
            envelope: envelope.clone(),
            raws: Vec::new(),
            pure: true,
            odd: false,
            typed: false,
        });
        if let Some(id) = str_of(&piece, "id") {
            held.id = Some(id.to_string());
        }
        if let Some(kind) = str_of(&piece, "type") {
            // The SDKs keep the last `type` and read the member it names from every piece joined: a call whose
            // type changes is read from pieces this reader did not join as that member.
            held.odd |= held.typed && held.kind != kind;
            held.kind = kind.to_string();
            held.typed = true;
        }
        let (body, field) = if legacy {
            (Some(&piece), "arguments")
        } else {
            let (body, field, both) = call_body(&piece, &held.kind);
            held.odd |= both;
            (body, field)
        };
        if let Some(body) = body {
            // The SDKs' accumulators join string pieces; a piece of another type is not text they join.
            for (key, into) in [("name", &mut held.name), (field, &mut held.args)] {
                match body.get(key) {
                    None | Some(Value::Null) => {}
                    Some(Value::String(s)) => into.push_str(s),
                    Some(_) => held.odd = true,
                }
            }
        }
        match raw {
            Some(raw) if held.pure => held.raws.push(raw),
            _ => held.pure = false,
        }
        Ok(())
    }

    /// The open calls of `choice`, complete now, in index order.
    fn close(&mut self, choice: u64) -> Vec<Call> {
        let Some(open) = self.open.remove(&choice) else {
            return Vec::new();
        };
        let mut calls = Vec::with_capacity(open.len());
        for held in open.into_values() {
            let (args, unreadable) = call_args(&held.kind, &held.args);
            calls.push(Call {
                proposal: proposal(&held.name, &held.kind, args, held.id.as_deref()),
                signed: false,
                unreadable: unreadable || held.odd,
            });
            self.pending.push(Item::Call { choice, held });
        }
        calls
    }

    fn close_all(&mut self) -> Vec<Call> {
        let choices: Vec<u64> = self.open.keys().copied().collect();
        choices.into_iter().flat_map(|c| self.close(c)).collect()
    }

    pub(super) fn finish(&mut self) -> Vec<Call> {
        self.close_all()
    }

    pub(super) fn release(&mut self, rulings: &mut Rulings) -> Vec<Emit> {
        let mut out = Vec::new();
        for item in std::mem::take(&mut self.pending) {
            match item {
                Item::Emit(e) => out.push(e),
                Item::Call { choice, held } => {
                    let ruling = rulings.next();
                    out.extend(self.render_call(choice, held, ruling));
                }
                Item::Finish {
                    name,
                    mut chunk,
                    raw,
                    mut changed,
                } => {
                    changed |= self.finish_reasons(&mut chunk);
                    out.push(if changed {
                        Emit::New {
                            name,
                            data: chunk.to_string(),
                        }
                    } else {
                        Emit::Raw(raw)
                    });
                }
            }
        }
        out
    }

    pub(super) fn held_bytes(&self) -> usize {
        self.open
            .values()
            .flat_map(BTreeMap::values)
            .map(|h| h.args.len() + h.raws.iter().map(Bytes::len).sum::<usize>())
            .sum()
    }

    fn render_call(&mut self, choice: u64, held: Held, ruling: Ruling) -> Vec<Emit> {
        let st = self.choices.entry(choice).or_default();
        let args = match ruling {
            Ruling::Pass if held.pure && (held.legacy || held.index == st.passed) => {
                if held.legacy {
                    st.legacy = true;
                } else {
                    st.passed += 1;
                }
                return held.raws.into_iter().map(Emit::Raw).collect();
            }
            Ruling::Pass => held.args.clone(),
            Ruling::Rewrite(v) => args_text(&v),
            Ruling::Refuse(text) => {
                let text = if st.text { format!("\n\n{text}") } else { text };
                st.text = true;
                st.refused = true;
                let mut delta = json!({ "content": text });
                if let Some(role) = held.role {
                    delta["role"] = role;
                }
                return vec![chunk_with(&held.envelope, choice, delta)];
            }
        };
        if held.legacy {
            st.legacy = true;
            let mut delta = json!({ "function_call": { "name": held.name, "arguments": args } });
            if let Some(role) = held.role {
                delta["role"] = role;
            }
            return vec![chunk_with(&held.envelope, choice, delta)];
        }
        let (body, field) = if held.kind == "custom" {
            ("custom", "input")
        } else {
            ("function", "arguments")
        };
        let mut piece = json!({ "index": st.passed, "type": held.kind });
        if let Some(id) = &held.id {
            piece["id"] = json!(id);
        }
        piece[body] = json!({ "name": held.name, field: args });
        st.passed += 1;
        let mut delta = json!({ "tool_calls": [piece] });
        if let Some(role) = held.role {
            delta["role"] = role;
        }
        vec![chunk_with(&held.envelope, choice, delta)]
    }

    /// `finish_reason: tool_calls` becomes `stop` for a choice whose calls were all refused. Whether it changed.
    fn finish_reasons(&self, chunk: &mut Value) -> bool {
        let mut changed = false;
        for c in chunk
            .get_mut("choices")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            // Read by `take_pieces` when the chunk came: a non-negative integer, or none (choice 0).
            let index = position(c, "index", 0).unwrap_or_default();
            let none_left = self
                .choices
                .get(&index)
                .is_some_and(|s| s.refused && s.passed == 0 && !s.legacy);
            let asks = matches!(
                str_of(c, "finish_reason"),
                Some("tool_calls" | "function_call")
            );
            if none_left && asks {
                c["finish_reason"] = json!("stop");
                changed = true;
            }
        }
        changed
    }
}

/// A JSON object read one level deep: its members' text, not yet parsed (only for text without twin members: see
/// [`no_calls`]).
type Members<'a> = BTreeMap<&'a str, &'a RawValue>;

/// The choices (their `index`) whose delta carries text, when the chunk `data` holds no tool-call piece and finishes
/// no choice: all [`Stream::push`] reads of such a chunk, which is passed on as it came. Read without building
/// the chunk's JSON (most of a stream is such chunks: text deltas). `None` whenever that cannot be told this way (a
/// piece or a `finish_reason`, a choice's `index` that is not a non-negative integer, or a shape read otherwise: not
/// an object, an escaped member name): then the chunk is read whole. (It also reads as text a chunk whole parsing
/// would refuse, a number beyond `f64` or nesting beyond 128 levels: its members, read as any JSON parser reads them,
/// hold no piece and no finish, so it is passed on as it came; a chunk that holds one is read whole and, when that
/// fails, refused as [`Unreadable`].)
fn no_calls(data: &str) -> Option<Vec<u64>> {
    // A map keeps the last of a repeated name: a chunk naming a member twice (`"tool_calls":[…],"tool_calls":null`)
    // would pass as text what a first-wins reader reads as a call. Read whole, it is refused (`event_json`).
    if crate::inspect::twin_members(data, crate::inspect::Twins::Folded) {
        return None;
    }
    let chunk: Members = plain(data)?;
    let mut text = Vec::new();
    let Some(choices) = chunk.get("choices") else {
        return Some(text);
    };
    let choices: Vec<&RawValue> = serde_json::from_str(choices.get()).ok()?;
    let given = |v: Option<&&RawValue>| v.is_some_and(|v| v.get() != "null");
    for choice in choices {
        if !choice.get().starts_with('{') {
            continue;
        }
        let choice: Members = plain(choice.get())?;
        if given(choice.get("finish_reason")) {
            return None;
        }
        // A choice's place that is not a non-negative integer is refused when the chunk is read whole.
        let index = match choice.get("index") {
            Some(i) => serde_json::from_str::<Value>(i.get()).ok()?.as_u64()?,
            None => 0,
        };
        let Some(delta) = choice.get("delta").filter(|d| d.get().starts_with('{')) else {
            continue;
        };
        let delta: Members = plain(delta.get())?;
        if given(delta.get("tool_calls")) || given(delta.get("function_call")) {
            return None;
        }
        let content = delta.get("content").map_or("", |c| c.get());
        if content.starts_with('"') && content != "\"\"" {
            text.push(index);
        }
    }
    Some(text)
}

/// The members of the JSON object `text` when every name is in lower case ASCII (as the API writes them all):
/// another spelling may be read otherwise by another reader, so the chunk is then read whole and refused there if
/// so (`event_json`: twin members, a member spelt otherwise).
fn plain(text: &str) -> Option<Members<'_>> {
    let members: Members = serde_json::from_str(text).ok()?;
    members
        .keys()
        .all(|k| !k.chars().any(|c| c.is_uppercase() || !c.is_ascii()))
        .then_some(members)
}

/// A call's arguments as the policy reads them, and whether they are unreadable (`function_args`); a custom tool's
/// free-form input is its text.
fn call_args(kind: &str, text: &str) -> (Value, bool) {
    if kind == "custom" {
        return (Value::String(text.to_string()), false);
    }
    function_args(text)
}

fn chunk_with(envelope: &Value, choice: u64, delta: Value) -> Emit {
    let mut chunk = envelope.clone();
    chunk["choices"] =
        json!([{ "index": choice, "delta": delta, "logprobs": null, "finish_reason": null }]);
    Emit::New {
        name: None,
        data: chunk.to_string(),
    }
}

/// The call of one entry of `message.tool_calls` (`legacy`: of `message.function_call`, the function itself). A
/// name or arguments that are not a string are not what the SDKs hand on as one: the call is unreadable.
fn body_call(tc: &Value, legacy: bool) -> Call {
    let kind = if legacy {
        "function"
    } else {
        str_of(tc, "type").unwrap_or("function")
    };
    let (body, field, both) = if legacy {
        (Some(tc), "arguments", false)
    } else {
        call_body(tc, kind)
    };
    let body = body.unwrap_or(&Value::Null);
    let text = |key: &str| match body.get(key) {
        None | Some(Value::Null) => Some(""),
        Some(v) => v.as_str(),
    };
    let (name, args) = (text("name"), text(field));
    let (value, unreadable) = call_args(kind, args.unwrap_or_default());
    Call {
        proposal: proposal(
            name.unwrap_or_default(),
            kind,
            value,
            str_of(tc, "id").filter(|_| !legacy),
        ),
        signed: false,
        unreadable: unreadable || both || name.is_none() || args.is_none(),
    }
}

/// The member holding a call's name and arguments, chosen by the call's `type` as the SDKs choose the variant of
/// their tagged union (`custom` → `custom.input`, else `function.arguments`), its arguments field, and whether the
/// entry also carries the other member (a reader choosing by the member present would read that one).
fn call_body<'a>(tc: &'a Value, kind: &str) -> (Option<&'a Value>, &'static str, bool) {
    let given = |k: &str| tc.get(k).filter(|v| !v.is_null());
    if kind == "custom" {
        (given("custom"), "input", given("function").is_some())
    } else {
        (given("function"), "arguments", given("custom").is_some())
    }
}

/// The calls of a whole response: each choice's `message.tool_calls`, then its legacy `message.function_call`. A
/// call whose choice's `index` (or its own, which the API does not send in a whole response) is there but not a
/// non-negative integer is unreadable: go-openai fails to decode the answer, the other SDKs keep it as it came (see
/// [`position`]).
pub(super) fn body_calls(body: &Value) -> Vec<Call> {
    let mut calls = Vec::new();
    let choices = body.get("choices").and_then(Value::as_array);
    for c in choices.into_iter().flatten() {
        let Some(message) = c.get("message") else {
            continue;
        };
        let placed = position(c, "index", 0).is_some();
        if let Some(tcs) = message.get("tool_calls").and_then(Value::as_array) {
            calls.extend(tcs.iter().map(|tc| {
                let mut call = body_call(tc, false);
                call.unreadable |= !placed || position(tc, "index", 0).is_none();
                call
            }));
        }
        if let Some(fc) = message.get("function_call").filter(|f| !f.is_null()) {
            let mut call = body_call(fc, true);
            call.unreadable |= !placed;
            calls.push(call);
        }
    }
    calls
}

pub(super) fn apply_to_body(body: &mut Value, rulings: &mut Rulings) {
    let choices = body.get_mut("choices").and_then(Value::as_array_mut);
    for c in choices.into_iter().flatten() {
        let Some(message) = c.get_mut("message").and_then(Value::as_object_mut) else {
            continue;
        };
        let has_calls = message
            .get("tool_calls")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        let has_legacy = message.get("function_call").is_some_and(|f| !f.is_null());
        if !has_calls && !has_legacy {
            continue;
        }
        let calls = match message.remove("tool_calls") {
            Some(Value::Array(calls)) => calls,
            _ => Vec::new(),
        };
        let legacy = message.remove("function_call").filter(|_| has_legacy);
        let (mut kept, mut refusals) = (Vec::new(), Vec::new());
        for mut tc in calls {
            match rulings.next() {
                Ruling::Pass => kept.push(tc),
                Ruling::Rewrite(v) => {
                    let field = if tc.get("custom").is_some() {
                        ("custom", "input")
                    } else {
                        ("function", "arguments")
                    };
                    tc[field.0][field.1] = json!(args_text(&v));
                    kept.push(tc);
                }
                Ruling::Refuse(text) => refusals.push(text),
            }
        }
        let mut legacy_kept = false;
        if let Some(mut fc) = legacy {
            match rulings.next() {
                Ruling::Pass => legacy_kept = true,
                Ruling::Rewrite(v) => {
                    fc["arguments"] = json!(args_text(&v));
                    legacy_kept = true;
                }
                Ruling::Refuse(text) => refusals.push(text),
            }
            if legacy_kept {
                message.insert("function_call".into(), fc);
            }
        }
        let refused = !refusals.is_empty();
        if refused {
            let mut text = message
                .get("content")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(|s| format!("{s}\n\n"))
                .unwrap_or_default();
            text.push_str(&refusals.join("\n\n"));
            message.insert("content".into(), json!(text));
        }
        let none_left = kept.is_empty() && !legacy_kept;
        if !kept.is_empty() {
            message.insert("tool_calls".into(), Value::Array(kept));
        }
        if refused
            && none_left
            && matches!(
                str_of(c, "finish_reason"),
                Some("tool_calls" | "function_call")
            )
        {
            c["finish_reason"] = json!("stop");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What reading `data` whole gives: whether it is passed on as it came, and the choices it marks as text.
    fn whole(data: &str) -> (bool, Vec<u64>) {
        let mut s = Stream::default();
        let Ok(mut chunk) = serde_json::from_str::<Value>(data) else {
            return (true, Vec::new());
        };
        let (pieces, finishing, _) = s.take_pieces(&mut chunk).unwrap();
        let text = s.choices.iter().filter(|(_, c)| c.text).map(|(i, _)| *i);
        (pieces.is_empty() && finishing.is_empty(), text.collect())
    }

    #[test]
    fn chunks_read_without_their_json_read_as_when_read_whole() {
        let plain = [
            r#"{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":2,"delta":{"role":"assistant","content":""}}]}"#,
            r#"{"choices":[{"index":1,"delta":{"content":"a"}},{"index":3,"delta":{"content":"\u0041"}}]}"#,
            r#"{"choices":[{"delta":{"content":"no index"}},{"index":7,"delta":{"content":"x"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":null,"tool_calls":null}}],"usage":null}"#,
            r#"{"choices":[{"index":0,"delta":"text"},7,[1],null]}"#,
            r#"{"choices":[],"usage":{"total_tokens":3}}"#,
            r#"{"id":"x"}"#,
        ];
        for data in plain {
            let (raw, text) = whole(data);
            assert!(raw, "{data}");
            let mut fast = no_calls(data).unwrap_or_else(|| panic!("{data}: read whole"));
            fast.sort_unstable();
            fast.dedup();
            assert_eq!(fast, text, "{data}");
        }
        // A piece, a finish, or a shape not read member by member: read whole.
        let read_whole = [
            r#"{"choices":[{"index":0,"delta":{"content":"a","tool_calls":[{"index":0}]}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"tool_calls":{}}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"choices":{"0":{"delta":{"content":"a"}}}}"#,
            r#"{"choices":null}"#,
            r#"{"ch\u006fices":[{"index":0,"delta":{"content":"a"}}]}"#,
            r#"[{"choices":[]}]"#,
            "not json",
            r#"{"choices":[{"index":0,"delta":{"content":"a"}}"#,
            // A choice's place the SDKs read otherwise: read whole, and refused there.
            r#"{"choices":[{"index":"7","delta":{"content":"x"}}]}"#,
            r#"{"choices":[{"index":1.0,"delta":{"content":"x"}}]}"#,
            r#"{"choices":[{"index":-1,"delta":{}}]}"#,
            r#"{"choices":[{"index":null}]}"#,
            // Twin members, at any depth: read whole, and refused there.
            r#"{"choices":[{"index":0,"delta":{"content":"a"}}],"choices":[]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"a"},"delta":{}}]}"#,
        ];
        for data in read_whole {
            assert_eq!(no_calls(data), None, "{data}");
        }
    }

    /// A chunk naming `tool_calls` twice, the last `null`: a first-wins reader runs the call; never passed as text.
    #[test]
    fn a_chunk_with_twin_members_is_refused_not_passed_as_text() {
        let call = r#"[{"index":0,"id":"c","type":"function","function":{"name":"shell","arguments":"{}"}}]"#;
        for data in [
            format!(
                r#"{{"choices":[{{"index":0,"delta":{{"tool_calls":{call},"tool_calls":null}}}}]}}"#
            ),
            format!(
                r#"{{"choices":[{{"index":0,"delta":{{"tool_calls":{call}}}}}],"choices":[]}}"#
            ),
        ] {
            assert_eq!(pushed(&data), Err(Unreadable), "{data}");
        }
    }

    /// What a new stream's reader makes of one event carrying `data`.
    fn pushed(data: &str) -> Result<Vec<Call>, Unreadable> {
        Stream::default().push(Event {
            name: None,
            data: data.to_string(),
            raw: Bytes::from(format!("data: {data}\n\n")),
        })
    }

    /// A choice's or a call piece's `index` that is a string, a fraction, negative, `null` or `true` makes the chunk
    /// unreadable: the SDKs file such a piece elsewhere than under the integer this reader would take (or fail).
    #[test]
    fn a_place_that_is_not_a_non_negative_integer_is_unreadable() {
        for bad in [r#""1""#, "1.0", "1e0", "-1", "null", "true"] {
            for data in [
                format!(
                    r#"{{"choices":[{{"index":{bad},"delta":{{"tool_calls":[{{"index":0,"id":"c","type":"function","function":{{"name":"shell","arguments":"{{}}"}}}}]}}}}]}}"#
                ),
                format!(
                    r#"{{"choices":[{{"index":0,"delta":{{"tool_calls":[{{"index":{bad},"id":"c","type":"function","function":{{"name":"shell","arguments":"{{}}"}}}}]}}}}]}}"#
                ),
                format!(r#"{{"choices":[{{"index":{bad},"delta":{{"content":"hi"}}}}]}}"#),
                format!(r#"{{"choices":[{{"index":{bad},"delta":{{}},"finish_reason":"stop"}}]}}"#),
            ] {
                assert_eq!(pushed(&data), Err(Unreadable), "{data}");
            }
            let whole: Value = serde_json::from_str(&format!(
                r#"{{"choices":[{{"index":{bad},"message":{{"tool_calls":[{{"id":"c","type":"function","function":{{"name":"shell","arguments":"{{}}"}}}}]}}}},
                    {{"index":1,"message":{{"tool_calls":[{{"index":{bad},"id":"d","type":"function","function":{{"name":"shell","arguments":"{{}}"}}}}]}}}},
                    {{"index":2,"message":{{"tool_calls":[{{"id":"e","type":"function","function":{{"name":"shell","arguments":"{{}}"}}}}]}}}}]}}"#
            ))
            .unwrap();
            let unreadable: Vec<bool> = body_calls(&whole).iter().map(|c| c.unreadable).collect();
            assert_eq!(unreadable, [true, true, false], "{bad}");
        }
    }
}
