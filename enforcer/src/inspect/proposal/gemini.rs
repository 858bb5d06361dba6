//! Gemini `generateContent`: `functionCall` parts (`name`, `args`, optional `id`) of `candidates[].content.parts` in
//! a response; `streamGenerateContent` sends whole `GenerateContentResponse` chunks (server-sent events with
//! `alt=sse`, else one JSON array), and a function call always arrives whole in one chunk, so nothing is held. A
//! Batch API batch fetched carries its answers whole (`inlinedResponses`), each read as one ([`WRAPPERS`]).
//!
//! A refused call's part becomes a `text` part. A part carrying a `thoughtSignature` is covered by it: its call is
//! [`Call::signed`] (its arguments may not be rewritten), unless the signature is the documented sentinel that skips
//! validation.

use serde_json::{json, Value};

use super::{event_json, proposal, str_of, Call, Emit, Event, Ruling, Rulings, Unreadable};

#[derive(Debug, Default)]
pub(super) struct Stream {
    pending: Vec<Pending>,
}

#[derive(Debug)]
enum Pending {
    Emit(Emit),
    /// A chunk with calls, sent once they are ruled on.
    Chunk(Option<String>, bytes::Bytes, Value),
}

impl Stream {
    pub(super) fn push(&mut self, ev: Event) -> Result<Vec<Call>, Unreadable> {
        let calls = event_json(&ev.data)?.map(|v| (body_calls(&v), v));
        Ok(match calls {
            Some((calls, v)) if !calls.is_empty() => {
                self.pending.push(Pending::Chunk(ev.name, ev.raw, v));
                calls
            }
            _ => {
                self.pending.push(Pending::Emit(Emit::Raw(ev.raw)));
                Vec::new()
            }
        })
    }

    pub(super) fn release(&mut self, rulings: &mut Rulings) -> Vec<Emit> {
        std::mem::take(&mut self.pending)
            .into_iter()
            .map(|p| match p {
                Pending::Emit(e) => e,
                Pending::Chunk(name, raw, mut v) => {
                    if apply_to_body(&mut v, rulings) {
                        Emit::New {
                            name,
                            data: v.to_string(),
                        }
                    } else {
                        Emit::Raw(raw)
                    }
                }
            })
            .collect()
    }
}

/// The members a GenerateContentResponse is carried in, looked into where an object is no response itself (has no
/// `candidates`): a Batch API batch fetched (`GET /v1beta/batches/{id}`, an Operation: its `response`, a
/// GenerateContentBatchOutput, or its `metadata`, the GenerateContentBatch, whose `output` is one), its
/// `inlinedResponses.inlinedResponses[]` (each an InlinedResponse: `response`, or `error`, and `metadata`), and a
/// listing's `operations[]` (`GET /v1beta/batches`; Gemini API reference, "Batch API"; google-genai `batches.py`
/// reads `metadata.output.inlinedResponses.inlinedResponses[].response` and `operations`).
const WRAPPERS: &[&str] = &[
    "response",
    "metadata",
    "output",
    "inlinedResponses",
    "operations",
    "batches",
];

/// The GenerateContentResponses in `v`: `v` itself when it has `candidates`, each element of an array (the non-SSE
/// stream), and those a batch carries ([`WRAPPERS`]), in document order.
fn responses<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| responses(i, out)),
        Value::Object(map) if map.contains_key("candidates") => out.push(v),
        Value::Object(map) => map
            .iter()
            .filter(|(k, _)| WRAPPERS.contains(&k.as_str()))
            .for_each(|(_, child)| responses(child, out)),
        _ => {}
    }
}

/// [`responses`], to be changed.
fn responses_mut<'a>(v: &'a mut Value, out: &mut Vec<&'a mut Value>) {
    if v.get("candidates").is_some() {
        out.push(v);
        return;
    }
    match v {
        Value::Array(items) => items.iter_mut().for_each(|i| responses_mut(i, out)),
        Value::Object(map) => map
            .iter_mut()
            .filter(|(k, _)| WRAPPERS.contains(&k.as_str()))
            .for_each(|(_, child)| responses_mut(child, out)),
        _ => {}
    }
}

/// The parts of every candidate of one response, or of each response of an array (the non-SSE stream), or of each
/// a batch carries ([`responses`]).
fn parts_mut(body: &mut Value) -> Vec<&mut Value> {
    let mut found = Vec::new();
    responses_mut(body, &mut found);
    found
        .into_iter()
        .filter_map(|r| r.get_mut("candidates")?.as_array_mut())
        .flatten()
        .filter_map(|c| c.get_mut("content")?.get_mut("parts")?.as_array_mut())
        .flatten()
        .collect()
}

fn parts(body: &Value) -> Vec<&Value> {
    let mut found = Vec::new();
    responses(body, &mut found);
    found
        .into_iter()
        .filter_map(|r| r.get("candidates")?.as_array())
        .flatten()
        .filter_map(|c| c.get("content")?.get("parts")?.as_array())
        .flatten()
        .collect()
}

fn function_call(part: &Value) -> Option<&Value> {
    part.get("functionCall")
        .or_else(|| part.get("function_call"))
}

pub(super) fn body_calls(body: &Value) -> Vec<Call> {
    parts(body)
        .into_iter()
        .filter_map(|part| {
            let call = function_call(part)?;
            Some(Call {
                proposal: proposal(
                    str_of(call, "name").unwrap_or_default(),
                    "function",
                    call.get("args").cloned().unwrap_or(json!({})),
                    str_of(call, "id"),
                ),
                signed: part
                    .as_object()
                    .is_some_and(crate::constrain::is_signed_object),
                // Both spellings in one part: which one a reader takes is its own (`functionCall` here). `args` is
                // a `Struct` (an object) when given.
                unreadable: (part.get("functionCall").is_some()
                    && part.get("function_call").is_some())
                    || call
                        .get("args")
                        .is_some_and(|a| !a.is_object() && !a.is_null()),
            })
        })
        .collect()
}

/// Whether anything changed.
pub(super) fn apply_to_body(body: &mut Value, rulings: &mut Rulings) -> bool {
    let mut changed = false;
    for part in parts_mut(body) {
        if function_call(part).is_none() {
            continue;
        }
        let ruling = rulings.next();
        changed |= ruling != Ruling::Pass;
        match ruling {
            Ruling::Pass => {}
            Ruling::Rewrite(args) => {
                let key = if part.get("functionCall").is_some() {
                    "functionCall"
                } else {
                    "function_call"
                };
                part[key]["args"] = args;
            }
            Ruling::Refuse(text) => *part = json!({ "text": text }),
        }
    }
    changed
}
