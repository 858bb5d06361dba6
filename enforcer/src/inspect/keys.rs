//! JSON object member names as the receivers of a body read them. RFC 8259 §4 only says names SHOULD be unique,
//! and decoders resolve a repeated name differently: most keep the last value (serde_json, Python, JavaScript), some
//! the first, some refuse. Go's `encoding/json` also matches names to struct fields case-insensitively (Unicode
//! simple case folding, so `ſ` is `s` and the Kelvin sign `k`), the last of two matching members winning
//! (CVE-2026-27896): to it, `{"command":"ls","Command":"rm -rf /"}` runs `rm -rf /` while a policy reading
//! `$.command` saw `ls`. Two members of one object named exactly alike are refused wherever JSON is read
//! ([`twin_members`] with [`Twins::Exact`]): no producer makes them (RFC 8259 §4; I-JSON, RFC 7493 §2.3, forbids
//! them). Members named alike only once folded are ordinary data in a request (a database row `{"ID":1,"id":2}` a
//! tool returns): they are refused only where a reader looks the name up — the protocol members the classifier
//! reads ([`misspelt`], [`misspelt_within`]) and the members a policy condition's or JSON rewrite's JSONPath
//! selects (`JsonPath::reads_twins`, `Policy::reads_twin_member`). What an LLM answers (tool calls and their arguments, `proposal`) is read by the
//! agent's own decoder wherever it looks: there [`Twins::Folded`] refuses them anywhere.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// A member name as a case-insensitive decoder compares it: every character upper-cased, then lower-cased, so each
/// character of a Unicode case-folding orbit becomes one (`ς`, `σ` and `Σ` are `σ`; `ſ` is `s`; `K` is `k`; `µ` is
/// `μ`). Only simple (one-to-one) mappings, as Go's `bytes.EqualFold`: `ß` and `ss` are not the same name. Borrows
/// a name that is lower-case ASCII already.
pub(crate) fn fold(name: &str) -> Cow<'_, str> {
    if name.is_ascii() && !name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Cow::Borrowed(name);
    }
    if name.is_ascii() {
        return Cow::Owned(name.to_ascii_lowercase());
    }
    // Simple case mappings only (one character to one), as Go's folding uses: `ß` stays `ß` (its full upper case
    // is `SS`, which Go does not match to it).
    Cow::Owned(
        name.chars()
            .map(|c| single(c.to_uppercase()).unwrap_or(c))
            .map(|c| single(c.to_lowercase()).unwrap_or(c))
            .collect(),
    )
}

/// The one character a case mapping gives, when it gives one (a simple mapping), else `None`.
fn single(mut mapped: impl Iterator<Item = char>) -> Option<char> {
    let c = mapped.next()?;
    mapped.next().is_none().then_some(c)
}

/// Whether `name` folds to `member` (lower-case ASCII), without allocating for an ASCII name.
pub(crate) fn folds_to(name: &str, member: &str) -> bool {
    if name.is_ascii() {
        name.eq_ignore_ascii_case(member)
    } else {
        fold(name) == member
    }
}

/// The member `name` of `map`, else the first whose name folds ([`fold`]) to `name`'s fold: the member a
/// case-insensitive decoder binds to a field `name`.
pub(crate) fn member<'a>(
    map: &'a serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Option<&'a serde_json::Value> {
    member_name(map, name).and_then(|k| map.get(k))
}

/// The name of the member [`member`] binds to `name`: `name` itself when `map` has it, else the first name that
/// folds to it (`Max_tokens` for `max_tokens`).
pub(crate) fn member_name<'a>(
    map: &'a serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Option<&'a str> {
    match map.get_key_value(name) {
        Some((k, _)) => Some(k),
        None => {
            let want = fold(name);
            map.keys().find(|k| fold(k) == want).map(String::as_str)
        }
    }
}

/// Whether `map` has more than one member whose name folds to `name`'s fold: an exact decoder and a
/// case-insensitive one bind different members to a field `name` ([`member`]).
pub(crate) fn has_twins(map: &serde_json::Map<String, serde_json::Value>, name: &str) -> bool {
    let want = fold(name);
    map.keys().filter(|k| fold(k) == want).nth(1).is_some()
}

/// Whether `map` has a member whose name folds to one of `members` (lower-case) without being it: a name a
/// case-insensitive decoder binds to a field the policy reads under its exact name (`Model`, `paramſ`).
pub(crate) fn misspelt(map: &serde_json::Map<String, serde_json::Value>, members: &[&str]) -> bool {
    map.keys().any(|k| misspelt_name(k, members))
}

/// Whether `name` is spelt otherwise than one of `members` (ASCII) but folds to it (`Tool_calls`, `functioncall`,
/// `paramſ`). Allocates only for a name that is not ASCII.
pub(crate) fn misspelt_name(name: &str, members: &[&str]) -> bool {
    if name.is_ascii() {
        return members
            .iter()
            .any(|m| *m != name && m.eq_ignore_ascii_case(name));
    }
    let folded = fold(name);
    members.iter().any(|m| folded.eq_ignore_ascii_case(m))
}

/// Whether `value` has, at any depth, a member spelt otherwise than one of `members` that folds to it
/// ([`misspelt_name`]); the values of members named exactly as one of `opaque` (arguments a tool reads by its own
/// schema) are not looked into.
pub(crate) fn misspelt_within(
    value: &serde_json::Value,
    members: &[&str],
    opaque: &[&str],
) -> bool {
    match value {
        serde_json::Value::Object(map) => map.iter().any(|(k, v)| {
            misspelt_name(k, members)
                || (!opaque.contains(&k.as_str()) && misspelt_within(v, members, opaque))
        }),
        serde_json::Value::Array(items) => {
            items.iter().any(|v| misspelt_within(v, members, opaque))
        }
        _ => false,
    }
}

/// Which member names of one object are twins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Twins {
    /// Names equal once unescaped (`"a"` and `"\u0061"`).
    Exact,
    /// Names equal once folded ([`fold`]): `command` and `Command` too.
    Folded,
}

/// An object in a JSON text names one member twice (as [`Twins`] compares names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TwinMembers;

/// The JSON text `text` as one value: `Ok(None)` when it is not JSON (trailing whitespace aside, as
/// `serde_json::from_str`), and [`TwinMembers`] when an object names one member twice, as `twins` compares names.
/// One pass, which builds the value as `serde_json::Value`'s own reader does and compares each name with the
/// object's names so far; the same as `serde_json::from_str` followed by [`twin_members`], at the cost of the parse
/// alone (on a 33 KiB Chat Completions request the second pass added about a quarter to the parse).
pub(crate) fn read_json(
    text: &str,
    twins: Twins,
) -> Result<Option<serde_json::Value>, TwinMembers> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = UniqueValue(twins)
        .deserialize(&mut de)
        .and_then(|v| de.end().map(|()| v));
    match value {
        Ok(v) => Ok(Some(v)),
        // Our own error is the only data error a visitor that accepts every JSON value can raise.
        Err(e) if e.classify() == serde_json::error::Category::Data => Err(TwinMembers),
        Err(_) => Ok(None),
    }
}

/// A JSON value built as `serde_json::Value`'s reader builds it, refusing an object that names a member twice (as
/// `.0` compares names).
#[derive(Clone, Copy)]
struct UniqueValue(Twins);

impl<'de> DeserializeSeed<'de> for UniqueValue {
    type Value = serde_json::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<serde_json::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UniqueValue {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<serde_json::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<serde_json::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<serde_json::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<serde_json::Value, E> {
        Ok(serde_json::Number::from_f64(v)
            .map_or(serde_json::Value::Null, serde_json::Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<serde_json::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<serde_json::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> Result<serde_json::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<serde_json::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element_seed(self)? {
            items.push(item);
        }
        Ok(serde_json::Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<serde_json::Value, A::Error> {
        let twin = || de::Error::custom("an object names one member twice");
        let mut members = serde_json::Map::new();
        // Folded names of an object beyond SCAN_MEMBERS (as `NoTwins` keeps them).
        let mut folds: Option<HashSet<String>> = None;
        while let Some(name) = map.next_key::<String>()? {
            if self.0 == Twins::Exact {
                // One hash of the name: its slot is found once, for the check and the insert.
                match members.entry(name) {
                    serde_json::map::Entry::Occupied(_) => return Err(twin()),
                    serde_json::map::Entry::Vacant(slot) => {
                        slot.insert(map.next_value_seed(self)?);
                    }
                }
                continue;
            }
            let seen = match &mut folds {
                Some(set) => !set.insert(fold(&name).into_owned()),
                None => members.keys().any(|k| NoTwins(self.0).same(k, &name)),
            };
            if seen {
                return Err(twin());
            }
            let value = map.next_value_seed(self)?;
            members.insert(name, value);
            if self.0 == Twins::Folded && folds.is_none() && members.len() > SCAN_MEMBERS {
                folds = Some(members.keys().map(|k| fold(k).into_owned()).collect());
            }
        }
        Ok(serde_json::Value::Object(members))
    }
}

/// Whether the JSON text `json` has an object, at any depth, with two members whose names are `twins`; meant for
/// text that parses (text that does not is refused on that ground). One pass over the text, without building a
/// value: names without escapes are borrowed from it.
pub(crate) fn twin_members(json: &str, twins: Twins) -> bool {
    let mut de = serde_json::Deserializer::from_str(json);
    match NoTwins(twins).deserialize(&mut de) {
        Ok(()) => false,
        // Our own error is the only data error a visitor that accepts every JSON value can raise.
        Err(e) => e.classify() == serde_json::error::Category::Data,
    }
}

/// A JSON value, any shape, whose objects have no twin members.
#[derive(Clone, Copy)]
struct NoTwins(Twins);

impl<'de> DeserializeSeed<'de> for NoTwins {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NoTwins {
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
        // Names so far, while the object is small; the set of their keys (folded for `Twins::Folded`) once it is not.
        let mut names: Vec<Cow<'de, str>> = Vec::new();
        let mut keys: Option<HashSet<Cow<'de, str>>> = None;
        while let Some(name) = map.next_key_seed(Name)? {
            let twin = match &mut keys {
                Some(set) => !set.insert(self.key(name)),
                None => {
                    let twin = names.iter().any(|seen| self.same(seen, &name));
                    names.push(name);
                    if names.len() > SCAN_MEMBERS {
                        keys = Some(names.drain(..).map(|n| self.key(n)).collect());
                    }
                    twin
                }
            };
            if twin {
                return Err(de::Error::custom("an object names one member twice"));
            }
            map.next_value_seed(self)?;
        }
        Ok(())
    }
}

/// Objects of up to this many members are checked by comparing each name with the ones before it: no hashing, and
/// no folded copy of an ASCII name. Larger ones switch to a set of their names (folded, for `Twins::Folded`), so a huge object stays linear. On
/// a 33 KiB Chat Completions request the pass took 42 µs with a set for every object, 27–31 µs this way (and on a
/// Gemini request whose rows have camel-case names, 44 µs and 17–19 µs).
const SCAN_MEMBERS: usize = 16;

impl NoTwins {
    /// Whether two member names are twins.
    fn same(self, a: &str, b: &str) -> bool {
        match self.0 {
            Twins::Exact => a == b,
            Twins::Folded if a.is_ascii() && b.is_ascii() => a.eq_ignore_ascii_case(b),
            Twins::Folded => fold(a) == fold(b),
        }
    }

    /// A member name as the set of a large object's names holds it: folded for `Twins::Folded`.
    fn key(self, name: Cow<'_, str>) -> Cow<'_, str> {
        match (self.0, name) {
            (Twins::Exact, name) => name,
            (Twins::Folded, Cow::Borrowed(b)) => fold(b),
            (Twins::Folded, Cow::Owned(o)) => Cow::Owned(fold(&o).into_owned()),
        }
    }
}

/// A member name, borrowed from the text when it has no escapes.
struct Name;

impl<'de> DeserializeSeed<'de> for Name {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Name {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a member name")
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(s))
    }

    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twins_are_found_at_any_depth_however_spelt() {
        for twins in [
            r#"{"command":"ls","command":"rm -rf /"}"#,
            r#"{"command":"ls","Command":"rm -rf /"}"#,
            r#"{"command":"ls","COMMAND":"rm -rf /"}"#,
            r#"{"path":"/tmp","paths":1,"Path":"/etc"}"#,
            r#"{"aſk":1,"ask":2}"#,
            "{\"kind\":1,\"\u{212a}ind\":2}",
            r#"{"σ":1,"ς":2}"#,
            r#"{"\u0063ommand":"ls","command":"rm"}"#,
            r#"[1,{"a":{"b":[{"x":1,"X":2}]}}]"#,
            r#"{"messages":[{"role":"user","content":"hi","Content":"other"}]}"#,
        ] {
            assert!(twin_members(twins, Twins::Folded), "{twins}");
        }
        for exact in [
            r#"{"command":"ls","command":"rm -rf /"}"#,
            r#"{"\u0063ommand":"ls","command":"rm"}"#,
            r#"[1,{"a":{"b":[{"x":1,"x":2}]}}]"#,
        ] {
            assert!(twin_members(exact, Twins::Exact), "{exact}");
        }
        for folded_only in [
            r#"{"command":"ls","Command":"rm -rf /"}"#,
            r#"{"ID":1,"id":2}"#,
            r#"{"σ":1,"ς":2}"#,
        ] {
            assert!(!twin_members(folded_only, Twins::Exact), "{folded_only}");
        }
        // Objects beyond SCAN_MEMBERS are checked by a set of their names (folded): twins before, across and after
        // the switch, in both modes.
        let wide = |extra: &str| {
            let members: Vec<String> = (0..40).map(|i| format!("\"m{i}\":{i}")).collect();
            format!("{{{},{extra}}}", members.join(","))
        };
        for extra in [
            r#""M3":0"#,
            r#""M39":0"#,
            r#""x":1,"X":2"#,
            r#""ſ":1,"s":2"#,
        ] {
            assert!(twin_members(&wide(extra), Twins::Folded), "{extra}");
            assert!(!twin_members(&wide(extra), Twins::Exact), "{extra}");
        }
        for extra in [r#""m3":0"#, r#""m39":0"#, r#""x":1,"x":2"#] {
            assert!(twin_members(&wide(extra), Twins::Exact), "{extra}");
        }
        let german = wide(r#""x":1,"straße":2,"strasse":3"#);
        assert!(!twin_members(&german, Twins::Folded));
        let early = r#"{"a":1,"A":2,"b":3,"c":4,"d":5,"e":6,"f":7,"g":8,"h":9,"i":10,"j":11,"k":12,"l":13,"m":14,"n":15,"o":16,"p":17,"q":18}"#;
        assert!(twin_members(early, Twins::Folded));
        assert!(!twin_members(early, Twins::Exact));
        for fine in [
            r#"{"command":"ls","args":["Command","command"]}"#,
            r#"{"a":{"x":1},"b":{"x":2}}"#,
            r#"{"Command":"ls"}"#,
            // Only one-to-one case mappings, as Go's: `ß` is not `ss`.
            r#"{"straße":1,"strasse":2}"#,
            r#""just a string""#,
            "not json",
            "",
        ] {
            assert!(!twin_members(fine, Twins::Folded), "{fine}");
        }
    }

    /// `read_json` is `serde_json::from_str` followed by the exact twin check, in one pass.
    #[test]
    fn reading_json_finds_exact_twins_as_it_parses() {
        for text in [
            r#"{"a":1,"b":[1,-2,3.5,1e300,18446744073709551615,-9223372036854775808],"c":{"d":null,"e":true}}"#,
            r#"{"\u0063ommand":"ls","Command":"rm","s":"\ud83d\ude00 \n"}"#,
            r#"  [1, {"x": {"y": [{}]}}] "#,
            r#""just a string""#,
            "12",
            r#"{"command":"ls","command":"rm -rf /"}"#,
            r#"{"\u0063ommand":"ls","command":"rm"}"#,
            r#"[1,{"a":{"b":[{"x":1,"x":2}]}}]"#,
            "not json",
            r#"{"a":1} trailing"#,
            r#"{"a":1,}"#,
            "",
        ] {
            for twins in [Twins::Exact, Twins::Folded] {
                let expected = match serde_json::from_str::<serde_json::Value>(text) {
                    Ok(_) if twin_members(text, twins) => Err(TwinMembers),
                    Ok(v) => Ok(Some(v)),
                    Err(_) => Ok(None),
                };
                assert_eq!(read_json(text, twins), expected, "{twins:?} {text}");
            }
        }
        // Beyond SCAN_MEMBERS, as `twin_members` reads them.
        let members: Vec<String> = (0..40).map(|i| format!("\"m{i}\":{i}")).collect();
        for extra in [
            r#""M3":0"#,
            r#""m39":0"#,
            r#""x":1,"X":2"#,
            r#""ſ":1,"s":2"#,
            r#""y":1"#,
        ] {
            let text = format!("{{{},{extra}}}", members.join(","));
            for twins in [Twins::Exact, Twins::Folded] {
                let expected = twin_members(&text, twins);
                assert_eq!(
                    read_json(&text, twins).is_err(),
                    expected,
                    "{twins:?} {extra}"
                );
            }
        }
        // Member order is kept, as the crate's `preserve_order` keeps it.
        let read = read_json(r#"{"z":1,"a":2,"m":3}"#, Twins::Folded)
            .unwrap()
            .unwrap();
        let names: Vec<&String> = read.as_object().unwrap().keys().collect();
        assert_eq!(names, ["z", "a", "m"]);
    }

    #[test]
    fn names_fold_as_a_case_insensitive_decoder_folds_them() {
        assert_eq!(fold("jsonrpc"), "jsonrpc");
        assert!(matches!(fold("jsonrpc"), Cow::Borrowed(_)));
        assert_eq!(fold("JsonRpc"), "jsonrpc");
        assert_eq!(fold("paramſ"), "params");
        assert_eq!(fold("\u{212a}"), "k");
        assert!(folds_to("Method", "method"));
        assert!(folds_to("paramſ", "params"));
        assert!(!folds_to("methods", "method"));
        assert!(misspelt_name("Tool_calls", &["tool_calls"]));
        assert!(misspelt_name("functioncall", &["functionCall"]));
        assert!(misspelt_name("paramſ", &["params"]));
        assert!(!misspelt_name("tool_calls", &["tool_calls"]));
        assert!(!misspelt_name("tool_call", &["tool_calls"]));
    }
}
