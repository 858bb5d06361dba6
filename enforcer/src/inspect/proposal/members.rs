//! Member names as other JSON readers match them. The reader here (serde_json) matches a member's name exactly and
//! keeps the last of a repeated one; the agent's side may not: Go's `encoding/json` (the Go SDKs and clients built
//! on it) matches a struct field's name case-insensitively (Unicode simple folding: `ſ` is `s`, the Kelvin sign is
//! `k`) and keeps the last match, so `{"name":"read","Name":"shell"}` is `shell` to it, and `{"Tool_calls":[…]}`
//! is the message's tool calls; a reader that keeps the first of a repeated name sees another value again. An
//! answer read for its tool calls is therefore unreadable when ([`ambiguous`])
//!
//! - some object names a member twice, in the same or another letter case ([`twins`]), or
//! - outside a call's own arguments (`args`, `input`, `arguments`, `action`), a member's name is one a provider
//!   writes (`tool_calls`, `functionCall`, `name` …) in other letter case.
//!
//! Should be shared with the request side's twin check (`inspect`) once both exist.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// The member names the proposal readers read (and the SDKs' structs declare), folded ([`fold`]).
const NAMES: &[&str] = &[
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
    "call_id",
    "server_label",
    "response",
    "sequence_number",
    // Messages
    "content",
    "content_block",
    "content_block_start",
    "partial_json",
    "server_name",
    "stop_reason",
    "tool_use_id",
    "input",
    // Gemini
    "candidates",
    "parts",
    "functioncall",
    "args",
    "thoughtsignature",
    "thought_signature",
    // every API
    "type",
    "name",
    "id",
    "text",
];

/// Members whose value is a call's own arguments: their names are the tool's, checked for twins only.
const ARGUMENTS: &[&str] = &["args", "input", "arguments", "action"];

/// Whether another reader may read the members of the JSON text `text` otherwise (see the module doc). Text that is
/// not JSON is not ambiguous (its parse fails elsewhere).
pub(super) fn ambiguous(text: &str) -> bool {
    check(text, true)
}

/// Whether some object of the JSON text `text` names a member twice, in the same or another letter case.
pub(super) fn twins(text: &str) -> bool {
    check(text, false)
}

fn check(text: &str, names: bool) -> bool {
    let mut de = serde_json::Deserializer::from_str(text);
    let seen = Walk { names }.deserialize(&mut de);
    matches!(seen, Err(e) if e.is_data())
}

/// A name as Go's `encoding/json` compares it: lower case, with the non-ASCII letters that fold onto ASCII ones
/// (`ſ` → `s`, Kelvin sign → `k`) folded.
fn fold(name: &str) -> String {
    name.chars()
        .flat_map(char::to_lowercase)
        .map(|c| if c == 'ſ' { 's' } else { c })
        .collect()
}

/// One JSON value, walked; fails (a data error) on the first ambiguous member.
#[derive(Clone, Copy)]
struct Walk {
    /// Also refuse a provider's member name in other letter case.
    names: bool,
}

impl<'de> DeserializeSeed<'de> for Walk {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        while let Some(name) = map.next_key::<String>()? {
            let folded = fold(&name);
            if !seen.insert(folded.clone()) {
                return Err(de::Error::custom("a member named twice"));
            }
            // The providers' own camel-case spellings (Gemini) aside.
            let provider = matches!(name.as_str(), "functionCall" | "thoughtSignature");
            if self.names && name != folded && !provider && NAMES.contains(&folded.as_str()) {
                return Err(de::Error::custom("a member name in other letter case"));
            }
            let names = self.names && !ARGUMENTS.contains(&folded.as_str());
            map.next_value_seed(Walk { names })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twins_and_other_cases_are_ambiguous() {
        for text in [
            r#"{"command":"echo ok","Command":"curl x"}"#,
            r#"{"command":"echo ok","command":"curl x"}"#,
            r#"{"a":[{"k":1,"K":2}]}"#,
            "{\"mask\":1,\"ma\u{17f}k\":2}",
            "{\"kind\":1,\"\u{212a}ind\":2}",
        ] {
            assert!(twins(text), "{text}");
            assert!(ambiguous(text), "{text}");
        }
        for text in [
            r#"{"choices":[{"message":{"Tool_calls":[]}}]}"#,
            r#"{"candidates":[{"content":{"parts":[{"FunctionCall":{}}]}}]}"#,
            r#"{"candidates":[{"content":{"parts":[{"functionCall":{"Name":"shell"}}]}}]}"#,
            r#"{"type":"tool_use","NAME":"shell"}"#,
        ] {
            assert!(!twins(text), "{text}");
            assert!(ambiguous(text), "{text}");
        }
        for text in [
            r#"{"choices":[{"message":{"tool_calls":[],"content":"Name"}}]}"#,
            r#"{"candidates":[{"content":{"parts":[{"functionCall":{"name":"f","args":{"Name":"x","ID":1}}}]}}]}"#,
            r#"{"type":"tool_use","input":{"Type":"a"}}"#,
            r#"{"thoughtSignature":"x","function_call":{}}"#,
            "not json",
            "[1,2,\"x\"]",
        ] {
            assert!(!ambiguous(text), "{text}");
        }
    }
}
