//! The policy file as a generic YAML tree whose every node keeps its line and column, so the compiler can point
//! at the exact node it rejects. Parsing runs under a tight serde-saphyr budget (nodes, depth, aliases) and a size
//! cap, so hostile input (alias bombs, deep nesting, huge files) fails fast with an error.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// Largest policy (or cases) file accepted, checked before parsing.
pub const MAX_SOURCE_BYTES: usize = 4 * 1024 * 1024;

const MAX_DEPTH: usize = 48;
const MAX_NODES: usize = 100_000;
const MAX_REPLAYED: usize = 20_000;

/// A 1-based line and column; `0:0` when unknown.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Loc {
    pub line: u64,
    pub column: u64,
}

impl From<serde_saphyr::Location> for Loc {
    fn from(l: serde_saphyr::Location) -> Self {
        Loc {
            line: l.line(),
            column: l.column(),
        }
    }
}

/// One YAML node and where it starts.
#[derive(Debug, Clone)]
pub struct Node {
    pub loc: Loc,
    pub kind: Kind,
}

#[derive(Debug, Clone)]
pub enum Kind {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Entries in document order.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// What kind of node this is, for "expected X, found Y" messages.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::Null => "null",
            Kind::Bool(_) => "a boolean",
            Kind::Int(_) => "an integer",
            Kind::Float(_) => "a number",
            Kind::Str(_) => "a string",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }

    /// A scalar's text (strings as is, numbers and booleans as written by YAML's canonical form).
    pub fn scalar_text(&self) -> Option<String> {
        match &self.kind {
            Kind::Str(s) => Some(s.clone()),
            Kind::Int(i) => Some(i.to_string()),
            Kind::Float(f) => Some(f.to_string()),
            Kind::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.kind {
            Kind::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The node as JSON (mapping keys become their scalar text).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match &self.kind {
            Kind::Null => Value::Null,
            Kind::Bool(b) => Value::Bool(*b),
            Kind::Int(i) => Value::from(*i),
            Kind::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Kind::Str(s) => Value::String(s.clone()),
            Kind::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            Kind::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.scalar_text().unwrap_or_default(), v.to_json()))
                    .collect(),
            ),
        }
    }
}

impl From<Spanned<Kind>> for Node {
    fn from(s: Spanned<Kind>) -> Self {
        Node {
            loc: s.referenced.into(),
            kind: s.value,
        }
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(KindVisitor)
    }
}

struct KindVisitor;

impl<'de> Visitor<'de> for KindVisitor {
    type Value = Kind;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Kind, E> {
        Ok(Kind::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Kind, E> {
        Ok(Kind::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Kind, D::Error> {
        d.deserialize_any(KindVisitor)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Kind, E> {
        Ok(Kind::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Kind, E> {
        Ok(Kind::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Kind, E> {
        Ok(i64::try_from(v).map_or(Kind::Float(v as f64), Kind::Int))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Kind, E> {
        Ok(i64::try_from(v).map_or(Kind::Float(v as f64), Kind::Int))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Kind, E> {
        Ok(i64::try_from(v).map_or(Kind::Float(v as f64), Kind::Int))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Kind, E> {
        Ok(Kind::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Kind, E> {
        Ok(Kind::Str(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Kind, E> {
        Ok(Kind::Str(v))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Kind, E> {
        Ok(Kind::Str(String::from_utf8_lossy(v).into_owned()))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Kind, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Kind>>()? {
            items.push(Node::from(item));
        }
        Ok(Kind::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kind, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<Kind>>()? {
            let value = map.next_value::<Spanned<Kind>>()?;
            entries.push((Node::from(key), Node::from(value)));
        }
        Ok(Kind::Map(entries))
    }
}

/// Parse budget for policy and cases files: generous for real policies (a 1,000-rule policy uses ~20k nodes),
/// small enough that alias bombs and deep nesting stop within milliseconds.
pub fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_reader_input_bytes: Some(MAX_SOURCE_BYTES),
            max_events: 1_000_000,
            max_nodes: MAX_NODES,
            max_aliases: 10_000,
            max_anchors: 10_000,
            max_depth: MAX_DEPTH,
            max_documents: 1,
            max_total_scalar_bytes: MAX_SOURCE_BYTES,
            max_recorded_anchor_events: MAX_REPLAYED,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: MAX_REPLAYED,
            max_replay_stack_depth: 16,
        },
    }
}

/// A YAML-level failure: where and what.
#[derive(Debug, Clone)]
pub struct YamlError {
    pub loc: Loc,
    pub message: String,
}

/// Turn a serde-saphyr error into a located, single-line message (without its snippet).
pub fn yaml_error(err: &serde_saphyr::Error) -> YamlError {
    let loc = err.location().map(Loc::from).unwrap_or_default();
    let text = err.without_snippet().to_string();
    let first = text.lines().next().unwrap_or("invalid YAML").trim();
    // The location is reported as FILE:LINE:COL already; drop the parser's own " at line L, column C" suffixes.
    let mut message = first.to_owned();
    while let Some(start) = message.find(" at line ") {
        let len = location_suffix_len(&message[start..]);
        if len == 0 {
            break;
        }
        message.replace_range(start..start + len, "");
    }
    let mut message = message.replace(" (defined)", "").replace(" (used)", "");
    if let Some(cut) = message.find(", set DuplicateKeyPolicy") {
        message.truncate(cut);
        message.push_str(", expected each key once per mapping");
    }
    let message = if message.contains("budget breached") || message.contains("recursion limit") {
        let what = if message.contains("Depth") || message.contains("recursion") {
            "nesting is too deep"
        } else if message.contains("Anchor")
            || message.contains("Alias")
            || message.contains("alias")
        {
            "alias expansion is too large (an alias bomb?)"
        } else {
            "the document is too large"
        };
        format!("{what} ({message}), expected a policy within the parser's budget (depth {MAX_DEPTH}, {MAX_NODES} nodes, {MAX_REPLAYED} alias-replayed events)")
    } else {
        message
    };
    YamlError { loc, message }
}

/// Length of a leading ` at line L, column C` in `s`, or 0.
fn location_suffix_len(s: &str) -> usize {
    let digits = |t: &str| t.bytes().take_while(u8::is_ascii_digit).count();
    let Some(rest) = s.strip_prefix(" at line ") else {
        return 0;
    };
    let n = digits(rest);
    let Some(rest2) = rest[n..].strip_prefix(", column ") else {
        return 0;
    };
    let m = digits(rest2);
    if n == 0 || m == 0 {
        return 0;
    }
    " at line ".len() + n + ", column ".len() + m
}

/// Parse `src` into a located tree.
pub fn parse(src: &str) -> Result<Node, YamlError> {
    if src.len() > MAX_SOURCE_BYTES {
        return Err(YamlError {
            loc: Loc::default(),
            message: format!(
                "file is {} bytes, larger than the {} byte limit for policy files",
                src.len(),
                MAX_SOURCE_BYTES
            ),
        });
    }
    let root: Spanned<Kind> =
        serde_saphyr::from_str_with_options(src, options()).map_err(|e| yaml_error(&e))?;
    Ok(Node::from(root))
}
