//! Opaque signed fields: the parts of an LLM request a provider verifies byte for byte and that no rewrite may
//! touch. Anthropic `thinking` blocks (their text is covered by `signature`) and `redacted_thinking` blocks (`data`),
//! OpenAI `encrypted_content` values, and Gemini parts carrying a `thoughtSignature`.

use serde_json::{Map, Value};

/// The `thoughtSignature` values Gemini documents as "skip validation" (for histories the client did not get from
/// the model): they sign nothing, so a part carrying one is not a signed region.
const THOUGHT_SIGNATURE_SENTINELS: &[&str] = &[
    "skip_thought_signature_validator",
    "context_engineering_is_the_way_to_go",
];

/// Whether the object `map` is, as a whole, a signed region (an Anthropic thinking block, or a Gemini part with a
/// thought signature other than the skip-validation sentinels).
pub fn is_signed_object(map: &Map<String, Value>) -> bool {
    let signature = map
        .get("thoughtSignature")
        .or_else(|| map.get("thought_signature"));
    matches!(
        map.get("type").and_then(Value::as_str),
        Some("thinking" | "redacted_thinking")
    ) || signature.is_some_and(|s| {
        !s.as_str()
            .is_some_and(|s| THOUGHT_SIGNATURE_SENTINELS.contains(&s))
    })
}

/// Whether the value under `key` is a signed region by itself.
pub(super) fn is_signed_key(key: &str) -> bool {
    key == "encrypted_content"
}

/// Every signed region of `doc` in document order, with its concrete path.
pub(super) fn regions(doc: &Value) -> Vec<(String, &Value)> {
    let mut out = Vec::new();
    let mut path = String::from("$");
    collect(doc, &mut path, &mut out);
    out
}

fn collect<'a>(v: &'a Value, path: &mut String, out: &mut Vec<(String, &'a Value)>) {
    match v {
        Value::Object(map) => {
            if is_signed_object(map) {
                out.push((path.clone(), v));
                return;
            }
            for (k, child) in map {
                let len = path.len();
                push_key(path, k);
                if is_signed_key(k) {
                    out.push((path.clone(), child));
                } else {
                    collect(child, path, out);
                }
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                let len = path.len();
                push_index(path, i);
                collect(child, path, out);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

/// The path of the first signed region of `before` that is not present, unchanged and in the same order, in
/// `after`; `None` when every signed region survived untouched (regions may have moved, e.g. when an earlier array
/// element was removed).
pub(super) fn first_touched(before: &[(String, Value)], after: &Value) -> Option<String> {
    let now = regions(after);
    for (i, (path, value)) in before.iter().enumerate() {
        match now.get(i) {
            Some((_, v)) if *v == value => {}
            Some((p, _)) if before.len() < now.len() => return Some(p.clone()),
            _ => return Some(path.clone()),
        }
    }
    now.get(before.len()).map(|(p, _)| p.clone())
}

/// Append `.key` (or `["key"]` when the key is not a plain identifier) to a concrete path.
pub(super) fn push_key(path: &mut String, key: &str) {
    // Same spelling as the policy's JSONPath concrete paths.
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-'));
    if plain {
        path.push('.');
        path.push_str(key);
    } else {
        path.push('[');
        path.push_str(&serde_json::Value::from(key).to_string());
        path.push(']');
    }
}

pub(super) fn push_index(path: &mut String, i: usize) {
    use std::fmt::Write;
    let _ = write!(path, "[{i}]");
}
