//! The JSONPath operations the JSON rewrites need (`for_each_mut`, `set`, `remove`) over the policy's subset:
//! `$`, `.key`, `["key"]`, `[N]`, `[*]`, `.*`. Interim stand-in with the same API as `crate::policy::jsonpath`,
//! which replaces it once the policy engine is merged.

use serde_json::Value;

use super::signed::{push_index, push_key};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid JSONPath")]
pub struct JsonPathError;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
    Wild,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    segs: Vec<Seg>,
}

impl JsonPath {
    pub fn parse(src: &str) -> Result<JsonPath, JsonPathError> {
        let rest = src.strip_prefix('$').ok_or(JsonPathError)?;
        let chars: Vec<char> = rest.chars().collect();
        let mut segs = Vec::new();
        let mut i = 0;
        while let Some(&c) = chars.get(i) {
            match c {
                '.' => {
                    i += 1;
                    if chars.get(i) == Some(&'*') {
                        segs.push(Seg::Wild);
                        i += 1;
                        continue;
                    }
                    let start = i;
                    while chars
                        .get(i)
                        .is_some_and(|c| c.is_alphanumeric() || matches!(c, '_' | '-'))
                    {
                        i += 1;
                    }
                    if i == start {
                        return Err(JsonPathError);
                    }
                    segs.push(Seg::Key(
                        chars.get(start..i).unwrap_or_default().iter().collect(),
                    ));
                }
                '[' => {
                    let close = chars
                        .get(i..)
                        .and_then(|t| t.iter().position(|&c| c == ']'))
                        .ok_or(JsonPathError)?;
                    let inner: String = chars
                        .get(i + 1..i + close)
                        .unwrap_or_default()
                        .iter()
                        .collect();
                    let inner = inner.trim();
                    if inner == "*" {
                        segs.push(Seg::Wild);
                    } else if let Some(q) = inner
                        .strip_prefix('"')
                        .and_then(|s| s.strip_suffix('"'))
                        .or_else(|| inner.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
                    {
                        segs.push(Seg::Key(q.to_string()));
                    } else {
                        segs.push(Seg::Index(inner.parse().map_err(|_| JsonPathError)?));
                    }
                    i += close + 1;
                }
                _ => return Err(JsonPathError),
            }
        }
        Ok(JsonPath { segs })
    }

    /// Calls `f` with each matching value and its concrete path.
    pub fn for_each_mut(&self, root: &mut Value, f: &mut dyn FnMut(&str, &mut Value)) {
        let mut path = String::from("$");
        walk(&self.segs, root, &mut path, f);
    }

    /// Sets the value at the path, creating the final object key if missing; returns concrete paths changed.
    pub fn set(&self, root: &mut Value, value: Value) -> Vec<String> {
        let mut changed = Vec::new();
        let Some((last, parents)) = self.segs.split_last() else {
            *root = value;
            changed.push("$".to_string());
            return changed;
        };
        let mut path = String::from("$");
        walk(parents, root, &mut path, &mut |p, parent| {
            let mut at = |p: &str, slot: &mut Value, seg: Child<'_>| {
                *slot = value.clone();
                changed.push(seg.path(p));
            };
            match (last, parent) {
                (Seg::Key(k), Value::Object(map)) => {
                    let slot = map.entry(k.clone()).or_insert(Value::Null);
                    at(p, slot, Child::Key(k));
                }
                (Seg::Index(n), Value::Array(items)) => {
                    if let Some(slot) = items.get_mut(*n) {
                        at(p, slot, Child::Index(*n));
                    }
                }
                (Seg::Wild, Value::Array(items)) => {
                    for (i, slot) in items.iter_mut().enumerate() {
                        at(p, slot, Child::Index(i));
                    }
                }
                (Seg::Wild, Value::Object(map)) => {
                    for (k, slot) in map.iter_mut() {
                        at(p, slot, Child::Key(k));
                    }
                }
                _ => {}
            }
        });
        changed
    }

    /// Removes matching object keys / array elements; returns concrete paths removed.
    pub fn remove(&self, root: &mut Value) -> Vec<String> {
        let mut removed = Vec::new();
        let Some((last, parents)) = self.segs.split_last() else {
            return removed;
        };
        let mut path = String::from("$");
        walk(
            parents,
            root,
            &mut path,
            &mut |p, parent| match (last, parent) {
                (Seg::Key(k), Value::Object(map)) if map.contains_key(k) => {
                    map.shift_remove(k);
                    removed.push(Child::Key(k).path(p));
                }
                (Seg::Index(n), Value::Array(items)) if *n < items.len() => {
                    items.remove(*n);
                    removed.push(Child::Index(*n).path(p));
                }
                (Seg::Wild, Value::Array(items)) => {
                    removed.extend((0..items.len()).map(|i| Child::Index(i).path(p)));
                    items.clear();
                }
                (Seg::Wild, Value::Object(map)) => {
                    removed.extend(map.keys().map(|k| Child::Key(k).path(p)));
                    map.clear();
                }
                _ => {}
            },
        );
        removed
    }
}

enum Child<'a> {
    Key(&'a str),
    Index(usize),
}

impl Child<'_> {
    fn path(&self, parent: &str) -> String {
        let mut p = parent.to_string();
        match self {
            Child::Key(k) => push_key(&mut p, k),
            Child::Index(i) => push_index(&mut p, *i),
        }
        p
    }
}

fn walk(segs: &[Seg], v: &mut Value, path: &mut String, f: &mut dyn FnMut(&str, &mut Value)) {
    let Some((seg, rest)) = segs.split_first() else {
        f(path, v);
        return;
    };
    let len = path.len();
    match (seg, v) {
        (Seg::Key(k), Value::Object(map)) => {
            if let Some(child) = map.get_mut(k) {
                push_key(path, k);
                walk(rest, child, path, f);
            }
        }
        (Seg::Index(n), Value::Array(items)) => {
            if let Some(child) = items.get_mut(*n) {
                push_index(path, *n);
                walk(rest, child, path, f);
            }
        }
        (Seg::Wild, Value::Array(items)) => {
            for (i, child) in items.iter_mut().enumerate() {
                push_index(path, i);
                walk(rest, child, path, f);
                path.truncate(len);
            }
        }
        (Seg::Wild, Value::Object(map)) => {
            for (k, child) in map.iter_mut() {
                push_key(path, k);
                walk(rest, child, path, f);
                path.truncate(len);
            }
        }
        _ => {}
    }
    path.truncate(len);
}
