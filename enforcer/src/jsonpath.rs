//! The policy's JSONPath subset: `$`, `.key`, `["key"]` (or `['key']`), `[N]`, `[*]` and `.*`. Used by `json:` and
//! `mcp.args` conditions and by the constrain stage's JSON rewrites. Selection never allocates copies of values;
//! mutation reports the concrete paths it touched (e.g. `$.messages[0].content`).

#![forbid(unsafe_code)]

use std::fmt::Write as _;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonPathError {
    #[error("a JSONPath must start with `$`")]
    NoRoot,
    #[error("unexpected `{found}` at offset {offset}, expected `.key`, `[\"key\"]`, `[N]`, `[*]` or `.*`")]
    Unexpected { found: char, offset: usize },
    #[error("the path ends inside a segment, expected a key, index or `*`")]
    Truncated,
    #[error("`{text}` is not an array index, expected a non-negative integer or `*`")]
    BadIndex { text: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
    Wild,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    src: String,
    segs: Vec<Seg>,
}

impl JsonPath {
    pub fn parse(src: &str) -> Result<JsonPath, JsonPathError> {
        let bytes: Vec<char> = src.chars().collect();
        if bytes.first() != Some(&'$') {
            return Err(JsonPathError::NoRoot);
        }
        let mut segs = Vec::new();
        let mut i = 1;
        while i < bytes.len() {
            match bytes[i] {
                '.' => {
                    i += 1;
                    if bytes.get(i) == Some(&'*') {
                        segs.push(Seg::Wild);
                        i += 1;
                        continue;
                    }
                    let start = i;
                    while i < bytes.len()
                        && (bytes[i].is_alphanumeric() || matches!(bytes[i], '_' | '-'))
                    {
                        i += 1;
                    }
                    if i == start {
                        return match bytes.get(i) {
                            Some(&found) => Err(JsonPathError::Unexpected { found, offset: i }),
                            None => Err(JsonPathError::Truncated),
                        };
                    }
                    segs.push(Seg::Key(bytes[start..i].iter().collect()));
                }
                '[' => {
                    i += 1;
                    match bytes.get(i) {
                        Some('*') => {
                            i += 1;
                            segs.push(Seg::Wild);
                        }
                        Some(&q @ ('"' | '\'')) => {
                            i += 1;
                            let mut key = String::new();
                            loop {
                                match bytes.get(i) {
                                    None => return Err(JsonPathError::Truncated),
                                    Some('\\') => {
                                        let Some(&c) = bytes.get(i + 1) else {
                                            return Err(JsonPathError::Truncated);
                                        };
                                        key.push(c);
                                        i += 2;
                                    }
                                    Some(&c) if c == q => {
                                        i += 1;
                                        break;
                                    }
                                    Some(&c) => {
                                        key.push(c);
                                        i += 1;
                                    }
                                }
                            }
                            segs.push(Seg::Key(key));
                        }
                        Some(_) => {
                            let start = i;
                            while i < bytes.len() && bytes[i] != ']' {
                                i += 1;
                            }
                            let text: String = bytes[start..i].iter().collect();
                            let n = text
                                .trim()
                                .parse::<usize>()
                                .map_err(|_| JsonPathError::BadIndex { text: text.clone() })?;
                            segs.push(Seg::Index(n));
                        }
                        None => return Err(JsonPathError::Truncated),
                    }
                    match bytes.get(i) {
                        Some(']') => i += 1,
                        Some(&found) => return Err(JsonPathError::Unexpected { found, offset: i }),
                        None => return Err(JsonPathError::Truncated),
                    }
                }
                found => return Err(JsonPathError::Unexpected { found, offset: i }),
            }
        }
        Ok(JsonPath {
            src: src.to_owned(),
            segs,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.src
    }

    /// The values the path selects, as a receiver reads the document: a key is the member of that name, else the
    /// one member whose name folds to it (`inspect::json_member`: `Command` for `.command`), as Go's
    /// `encoding/json` binds it — so a condition on `$.command` is not dodged by spelling the member `Command`. (A
    /// document with two such members is refused before it is decided: [`JsonPath::reads_twins`].) Rewrites
    /// ([`JsonPath::for_each_mut`], [`JsonPath::set`], [`JsonPath::remove`]) work on the same members.
    pub fn select<'a>(&self, root: &'a Value) -> Vec<&'a Value> {
        let mut out = Vec::new();
        select_into(&self.segs, root, &mut out);
        out
    }

    /// Whether selecting meets, for one of its keys, an object with two members whose names fold to it
    /// (`inspect::json_member_twins`: `command` and `Command` for `.command`): a decoder matching names exactly reads
    /// the one, Go's `encoding/json` the last of the two, so what the path selects depends on the receiver.
    pub fn reads_twins(&self, root: &Value) -> bool {
        twins_within(&self.segs, root)
    }

    /// Calls `f` with each matching value and its concrete path (e.g. `$.messages[0].content`).
    pub fn for_each_mut(&self, root: &mut Value, f: &mut dyn FnMut(&str, &mut Value)) {
        let mut path = String::from("$");
        walk_mut(&self.segs, root, &mut path, f);
    }

    /// Sets the value at the path, creating the final object key if missing; returns concrete paths changed.
    pub fn set(&self, root: &mut Value, value: Value) -> Vec<String> {
        let mut changed = Vec::new();
        let Some((last, parents)) = self.segs.split_last() else {
            *root = value;
            changed.push("$".to_owned());
            return changed;
        };
        let mut path = String::from("$");
        walk_mut(
            parents,
            root,
            &mut path,
            &mut |p, parent| match (last, parent) {
                (Seg::Key(k), Value::Object(map)) => {
                    let name = bound_name(map, k);
                    changed.push(child_path(p, last, &name, 0));
                    map.insert(name, value.clone());
                }
                (Seg::Index(n), Value::Array(items)) => {
                    if let Some(slot) = items.get_mut(*n) {
                        *slot = value.clone();
                        changed.push(child_path(p, last, "", *n));
                    }
                }
                (Seg::Wild, Value::Array(items)) => {
                    for (i, slot) in items.iter_mut().enumerate() {
                        *slot = value.clone();
                        changed.push(child_path(p, &Seg::Index(i), "", i));
                    }
                }
                (Seg::Wild, Value::Object(map)) => {
                    for (k, slot) in map.iter_mut() {
                        *slot = value.clone();
                        changed.push(child_path(p, &Seg::Key(k.clone()), k, 0));
                    }
                }
                _ => {}
            },
        );
        changed
    }

    /// Removes matching object keys / array elements; returns concrete paths removed.
    pub fn remove(&self, root: &mut Value) -> Vec<String> {
        let mut removed = Vec::new();
        let Some((last, parents)) = self.segs.split_last() else {
            return removed;
        };
        let mut path = String::from("$");
        walk_mut(
            parents,
            root,
            &mut path,
            &mut |p, parent| match (last, parent) {
                (Seg::Key(k), Value::Object(map)) => {
                    let name = bound_name(map, k);
                    removed.extend(
                        map.shift_remove(&name)
                            .map(|_| child_path(p, last, &name, 0)),
                    );
                }
                (Seg::Index(n), Value::Array(items)) if *n < items.len() => {
                    items.remove(*n);
                    removed.push(child_path(p, last, "", *n));
                }
                (Seg::Wild, Value::Array(items)) => {
                    for i in 0..items.len() {
                        removed.push(child_path(p, &Seg::Index(i), "", i));
                    }
                    items.clear();
                }
                (Seg::Wild, Value::Object(map)) => {
                    for k in map.keys() {
                        removed.push(child_path(p, &Seg::Key(k.clone()), k, 0));
                    }
                    map.clear();
                }
                _ => {}
            },
        );
        removed
    }
}

impl std::fmt::Display for JsonPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.src)
    }
}

impl std::str::FromStr for JsonPath {
    type Err = JsonPathError;
    fn from_str(src: &str) -> Result<JsonPath, JsonPathError> {
        JsonPath::parse(src)
    }
}

/// Serialised as the text it was compiled from.
impl serde::Serialize for JsonPath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.src)
    }
}

/// Compiled from its text; a path outside the subset is a deserialisation error.
impl<'de> serde::Deserialize<'de> for JsonPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<JsonPath, D::Error> {
        let src = String::deserialize(d)?;
        JsonPath::parse(&src).map_err(serde::de::Error::custom)
    }
}

fn select_into<'a>(segs: &[Seg], v: &'a Value, out: &mut Vec<&'a Value>) {
    let Some((seg, rest)) = segs.split_first() else {
        out.push(v);
        return;
    };
    match (seg, v) {
        (Seg::Key(k), Value::Object(map)) => {
            if let Some(child) = crate::inspect::json_member(map, k) {
                select_into(rest, child, out);
            }
        }
        (Seg::Index(n), Value::Array(items)) => {
            if let Some(child) = items.get(*n) {
                select_into(rest, child, out);
            }
        }
        (Seg::Wild, Value::Array(items)) => {
            for child in items {
                select_into(rest, child, out);
            }
        }
        (Seg::Wild, Value::Object(map)) => {
            for child in map.values() {
                select_into(rest, child, out);
            }
        }
        _ => {}
    }
}

fn twins_within(segs: &[Seg], v: &Value) -> bool {
    let Some((seg, rest)) = segs.split_first() else {
        return false;
    };
    match (seg, v) {
        (Seg::Key(k), Value::Object(map)) => {
            crate::inspect::json_member_twins(map, k)
                || crate::inspect::json_member(map, k)
                    .is_some_and(|child| twins_within(rest, child))
        }
        (Seg::Index(n), Value::Array(items)) => {
            items.get(*n).is_some_and(|c| twins_within(rest, c))
        }
        (Seg::Wild, Value::Array(items)) => items.iter().any(|c| twins_within(rest, c)),
        (Seg::Wild, Value::Object(map)) => map.values().any(|c| twins_within(rest, c)),
        _ => false,
    }
}

/// The member a rewrite of key `k` works on: the one [`JsonPath::select`] reads (`k` itself, else the one member
/// whose name folds to it, as Go's `encoding/json` binds it), so a `json_cap` on `$.max_tokens` caps a lone
/// `Max_tokens` the upstream may read; `k` itself when there is none (a `json_set` adds it).
fn bound_name(map: &serde_json::Map<String, Value>, k: &str) -> String {
    crate::inspect::json_member_name(map, k)
        .unwrap_or(k)
        .to_owned()
}

fn walk_mut(segs: &[Seg], v: &mut Value, path: &mut String, f: &mut dyn FnMut(&str, &mut Value)) {
    let Some((seg, rest)) = segs.split_first() else {
        f(path, v);
        return;
    };
    let len = path.len();
    match (seg, v) {
        (Seg::Key(k), Value::Object(map)) => {
            let name = bound_name(map, k);
            if let Some(child) = map.get_mut(&name) {
                push_seg(path, seg, &name, 0);
                walk_mut(rest, child, path, f);
            }
        }
        (Seg::Index(n), Value::Array(items)) => {
            if let Some(child) = items.get_mut(*n) {
                push_seg(path, seg, "", *n);
                walk_mut(rest, child, path, f);
            }
        }
        (Seg::Wild, Value::Array(items)) => {
            for (i, child) in items.iter_mut().enumerate() {
                push_seg(path, &Seg::Index(i), "", i);
                walk_mut(rest, child, path, f);
                path.truncate(len);
            }
        }
        (Seg::Wild, Value::Object(map)) => {
            for (k, child) in map.iter_mut() {
                push_seg(path, &Seg::Key(String::new()), k, 0);
                walk_mut(rest, child, path, f);
                path.truncate(len);
            }
        }
        _ => {}
    }
    path.truncate(len);
}

fn child_path(parent: &str, seg: &Seg, key: &str, index: usize) -> String {
    let mut p = parent.to_owned();
    push_seg(&mut p, seg, key, index);
    p
}

/// Appends one concrete segment: `.key` for identifier-like keys, `["key"]` otherwise, `[N]` for indices.
fn push_seg(path: &mut String, seg: &Seg, key: &str, index: usize) {
    match seg {
        Seg::Index(_) => {
            let _ = write!(path, "[{index}]");
        }
        _ => {
            let plain = !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-'));
            if plain {
                path.push('.');
                path.push_str(key);
            } else {
                let _ = write!(path, "[{}]", serde_json::Value::from(key));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_key_with_twins_on_the_path_is_found_and_twins_elsewhere_are_not() {
        let doc: Value = serde_json::from_str(
            r#"{"rows":[{"ID":1,"id":2}],"args":{"command":"ls","Command":"rm"},"a":{"B":{"c":1,"C":2}}}"#,
        )
        .unwrap();
        for reads in [
            "$.args.command",
            "$.args.COMMAND",
            "$.a.b.c",
            "$.rows[*].id",
            "$.rows[0].Id",
        ] {
            assert!(JsonPath::parse(reads).unwrap().reads_twins(&doc), "{reads}");
        }
        for clear in [
            "$.args",
            "$.a.b",
            "$.rows[0]",
            "$.rows[1].id",
            "$.other.command",
            "$.a.*",
        ] {
            assert!(
                !JsonPath::parse(clear).unwrap().reads_twins(&doc),
                "{clear}"
            );
        }
    }

    #[test]
    fn parses_the_subset() {
        for ok in [
            "$",
            "$.a.b",
            "$.a[0]",
            "$.a[*].b",
            "$.*",
            "$[\"x y\"]",
            "$['k']",
            "$.messages[*].content",
        ] {
            assert!(JsonPath::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["a.b", "$.", "$[", "$[x]", "$.a[0", "$..a", "$.a b", "$[-1]"] {
            assert!(JsonPath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_key_selects_the_member_a_case_insensitive_decoder_binds() {
        let p = JsonPath::parse("$.args.command").unwrap();
        let v = json!({"Args": {"Command": "rm -rf /"}});
        assert_eq!(p.select(&v), vec![&json!("rm -rf /")]);
        let exact = json!({"args": {"command": "ls", "Commands": "x"}});
        assert_eq!(p.select(&exact), vec![&json!("ls")]);
        assert!(p.select(&json!({"args": {"commands": "x"}})).is_empty());
    }

    #[test]
    fn selects_and_mutates() {
        let mut v =
            json!({"messages": [{"content": "a"}, {"content": "b"}], "limit": 500, "x y": 1});
        let p = JsonPath::parse("$.messages[*].content").unwrap();
        assert_eq!(p.select(&v), vec![&json!("a"), &json!("b")]);
        let mut seen = Vec::new();
        p.for_each_mut(&mut v, &mut |path, val| {
            seen.push(path.to_owned());
            *val = json!("z");
        });
        assert_eq!(seen, ["$.messages[0].content", "$.messages[1].content"]);
        assert_eq!(v["messages"][1]["content"], "z");
        let set = JsonPath::parse("$.max_tokens")
            .unwrap()
            .set(&mut v, json!(10));
        assert_eq!(set, ["$.max_tokens"]);
        assert_eq!(v["max_tokens"], 10);
        let removed = JsonPath::parse("$[\"x y\"]").unwrap().remove(&mut v);
        assert_eq!(removed, ["$[\"x y\"]"]);
        assert!(v.get("x y").is_none());
        let removed = JsonPath::parse("$.messages[0]").unwrap().remove(&mut v);
        assert_eq!(removed, ["$.messages[0]"]);
        assert_eq!(v["messages"].as_array().map(Vec::len), Some(1));
        // A rewrite works on the member a condition reads: a lone `Max_tokens` is the `max_tokens` a
        // case-insensitive decoder binds, so it is capped, set and removed under its own name.
        let mut v =
            json!({"Max_tokens": 100000, "Stream_options": {"Include_usage": true}, "Tools": []});
        let cap = JsonPath::parse("$.max_tokens").unwrap();
        let mut seen = Vec::new();
        cap.for_each_mut(&mut v, &mut |path, val| {
            seen.push(path.to_owned());
            *val = json!(1024);
        });
        assert_eq!(seen, ["$.Max_tokens"]);
        let nested = JsonPath::parse("$.stream_options.include_usage").unwrap();
        assert_eq!(
            nested.set(&mut v, json!(false)),
            ["$.Stream_options.Include_usage"]
        );
        let tools = JsonPath::parse("$.tools").unwrap();
        assert_eq!(tools.remove(&mut v), ["$.Tools"]);
        assert_eq!(
            v,
            json!({"Max_tokens": 1024, "Stream_options": {"Include_usage": false}})
        );
        assert!(JsonPath::parse("$.nope.deeper")
            .unwrap()
            .set(&mut v, json!(1))
            .is_empty());
    }
}
