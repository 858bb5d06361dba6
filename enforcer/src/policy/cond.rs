//! `when:` conditions: compiled from the located YAML tree into a small tree of typed tests, then evaluated
//! against one [`Action`]. Keys inside a mapping are ANDed, a list value means any-of, and `not`, `any`, `all`
//! combine sub-conditions. Detector results are computed at most once per evaluation and shared by all rules.

use std::borrow::Cow;
use std::cell::{OnceCell, RefCell};

use regex::Regex;
use serde_json::Value;

use super::detect::Detectors;
use super::yaml::{Kind, Loc, Node};
use crate::encoding;
use crate::glob::Glob;
use crate::jsonpath::JsonPath;
use crate::model::{Action, Phase, Scheme};

/// A compile failure at one node (turned into a `PolicyError` with the file name by the caller), with the
/// failures of later, independent parts of the same file (other rules) in `more`.
#[derive(Debug)]
pub struct Fault {
    pub loc: Loc,
    pub message: String,
    pub more: Vec<Fault>,
}

pub type CResult<T> = Result<T, Fault>;

pub fn fault<T>(loc: Loc, message: impl Into<String>) -> CResult<T> {
    Err(Fault {
        loc,
        message: message.into(),
        more: Vec::new(),
    })
}

/// Every key a `when:` mapping accepts (besides `query.<name>` and `header.<name>`).
pub const CONDITION_KEYS: &[&str] = &[
    "profile",
    "exe",
    "uid",
    "user",
    "groups",
    "session.labels",
    "session.count",
    "session.previous_tool",
    "host",
    "port",
    "scheme",
    "method",
    "path",
    "upgrade",
    "query.<name>",
    "header.<name>",
    "body.size",
    "content_type",
    "json",
    "mcp.method",
    "mcp.tool",
    "mcp.args",
    "mcp.resource",
    "llm.provider",
    "llm.model",
    "llm.tools",
    "proposal.tool",
    "proposal.kind",
    "proposal.args",
    "response.status",
    "response.content_type",
    "response.json",
    "detect",
    "not",
    "any",
    "all",
];

#[derive(Debug)]
pub enum Cond {
    All(Vec<Cond>),
    Any(Vec<Cond>),
    Not(Box<Cond>),
    Profile(Vec<Glob>),
    Exe(Vec<Glob>),
    Uid(Vec<u32>),
    /// The user the agent acts for.
    User(Vec<Glob>),
    /// Any of that user's groups.
    Groups(Vec<Glob>),
    /// Any label on the session.
    SessionLabels(Vec<Glob>),
    /// Counters of the session, each compared over its window (all must hold).
    SessionCount(Vec<CounterTest>),
    SessionPreviousTool(Vec<Glob>),
    Host(Vec<Glob>),
    Port(Vec<u16>),
    Scheme(Vec<Scheme>),
    Method(Vec<String>),
    Path(Vec<Glob>),
    Upgrade(Vec<Glob>),
    Query(String, StrTest),
    Header(String, StrTest),
    BodySize {
        gt: Option<u64>,
        lt: Option<u64>,
    },
    ContentType(Vec<Glob>),
    Json(Vec<(JsonPath, Vec<Op>)>),
    McpMethod(Vec<Glob>),
    McpTool(Vec<Glob>),
    McpArgs(Vec<(JsonPath, Vec<Op>)>),
    /// The resource URI of `resources/read` (and subscribe, unsubscribe).
    McpResource(Vec<Glob>),
    LlmProvider(Vec<Glob>),
    LlmModel(Vec<Glob>),
    LlmTools(Vec<Glob>),
    ProposalTool(Vec<Glob>),
    ProposalKind(Vec<Glob>),
    ProposalArgs(Vec<(JsonPath, Vec<Op>)>),
    /// Status codes, each an exact code or a class (`4xx` as 400..=499).
    ResponseStatus(Vec<(u16, u16)>),
    ResponseContentType(Vec<Glob>),
    ResponseJson(Vec<(JsonPath, Vec<Op>)>),
    Detect(Vec<usize>),
}

/// One `session.count` entry: `NAME: { gt: N, lt: N, within: DURATION }`.
#[derive(Debug)]
pub struct CounterTest {
    pub counter: String,
    /// Seconds to look back; `None`: the whole session.
    pub within: Option<u64>,
    pub gt: Option<u64>,
    pub lt: Option<u64>,
}

impl CounterTest {
    /// The key the session state holds this counter's value under: `NAME` or `NAME@SECONDS`.
    fn key(&self) -> String {
        match self.within {
            Some(secs) => format!("{}@{secs}", self.counter),
            None => self.counter.clone(),
        }
    }

    fn eval(&self, state: Option<&crate::model::SessionState>) -> bool {
        let value = state.map_or(0, |s| {
            s.counts
                .get(&self.key())
                .or_else(|| s.counts.get(&self.counter))
                .copied()
                .unwrap_or(0)
        });
        self.gt.is_none_or(|g| value > g) && self.lt.is_none_or(|l| value < l)
    }
}

#[derive(Debug)]
pub enum StrTest {
    Globs(Vec<Glob>),
    Ops(Vec<Op>),
}

/// One JSON operator. Positive operators hold when any selected value satisfies them; `not_matches` holds when
/// nothing is selected or some selected value is not a string matching the regex; `exists: false` holds when
/// nothing is selected.
#[derive(Debug)]
pub enum Op {
    Equals(Value),
    In(Vec<Value>),
    Glob(Glob),
    Matches(Regex),
    NotMatches(Regex),
    Gt(f64),
    Lt(f64),
    Exists(bool),
    Contains(Value),
    /// More than N values selected (`$.records[*]` selects each element).
    CountGt(usize),
    /// Fewer than N values selected.
    CountLt(usize),
}

pub const OPS: &str =
    "equals, in, glob, matches, not_matches, gt, lt, exists, contains, count_gt, count_lt";

// ---------------------------------------------------------------------------------------------------------------
// Compilation

/// Names the compiler must resolve while compiling conditions.
pub struct Scope<'a> {
    pub detectors: &'a Detectors,
    pub profiles: &'a [String],
    /// The part of an exchange the rule decides (its `phase:`): `proposal.*` and `response.*` conditions need theirs.
    pub phase: Phase,
}

pub fn compile_when(node: &Node, scope: &Scope) -> CResult<Cond> {
    let entries = match &node.kind {
        Kind::Null => return Ok(Cond::All(Vec::new())),
        Kind::Map(m) => m,
        _ => {
            return fault(
                node.loc,
                format!(
                    "expected a mapping of conditions, found {}",
                    node.type_name()
                ),
            )
        }
    };
    let mut all = Vec::with_capacity(entries.len());
    for (k, v) in entries {
        let Kind::Str(key) = &k.kind else {
            return fault(k.loc, "condition keys must be strings");
        };
        all.push(compile_key(key, k.loc, v, scope)?);
    }
    Ok(Cond::All(all))
}

fn compile_key(key: &str, kloc: Loc, v: &Node, scope: &Scope) -> CResult<Cond> {
    for (prefix, phase) in [
        ("proposal.", Phase::Proposal),
        ("response.", Phase::Response),
    ] {
        if key.starts_with(prefix) && scope.phase != phase {
            return fault(
                kloc,
                format!(
                    "`{key}` applies to {}s, expected `phase: {}` on this rule",
                    phase.as_str(),
                    phase.as_str()
                ),
            );
        }
    }
    Ok(match key {
        "profile" => {
            let globs = globs(v, Glob::plain)?;
            if !scope.profiles.is_empty() {
                for (loc, s) in strings(v)? {
                    if !s.contains(['*', '?']) && !scope.profiles.contains(&s) {
                        return fault(
                            loc,
                            format!(
                                "unknown profile `{s}`, expected one declared under `profiles:` ({})",
                                scope.profiles.join(", ")
                            ),
                        );
                    }
                }
            }
            Cond::Profile(globs)
        }
        "exe" => Cond::Exe(globs(v, Glob::plain)?),
        "upgrade" => Cond::Upgrade(globs(v, |s| Glob::plain(&s.to_ascii_lowercase()))?),
        "uid" => Cond::Uid(ints(v, "a uid")?),
        "user" => Cond::User(globs(v, Glob::plain)?),
        "groups" => Cond::Groups(globs(v, Glob::plain)?),
        "session.labels" => Cond::SessionLabels(globs(v, Glob::plain)?),
        "session.previous_tool" => Cond::SessionPreviousTool(globs(v, Glob::plain)?),
        "session.count" => Cond::SessionCount(counter_tests(v)?),
        "host" => Cond::Host(globs(v, Glob::host)?),
        "port" => Cond::Port(ints(v, "a port number (1-65535)")?),
        "scheme" => Cond::Scheme(
            strings(v)?
                .into_iter()
                .map(|(loc, s)| match s.as_str() {
                    "http" => Ok(Scheme::Http),
                    "https" => Ok(Scheme::Https),
                    "tcp" => Ok(Scheme::Tcp),
                    "dns" => Ok(Scheme::Dns),
                    _ => fault(
                        loc,
                        format!("unknown scheme `{s}`, expected http, https, tcp or dns"),
                    ),
                })
                .collect::<CResult<_>>()?,
        ),
        "method" => Cond::Method(
            strings(v)?
                .into_iter()
                .map(|(loc, s)| {
                    if s.is_empty() || !s.chars().all(|c| c.is_ascii_alphabetic()) {
                        fault(
                            loc,
                            format!("`{s}` is not an HTTP method, expected e.g. GET or POST"),
                        )
                    } else {
                        Ok(s.to_ascii_uppercase())
                    }
                })
                .collect::<CResult<_>>()?,
        ),
        "path" => Cond::Path(globs(v, Glob::path)?),
        "body.size" => {
            let Some(entries) = v.as_map() else {
                return fault(
                    v.loc,
                    "expected a mapping such as `{ gt: 1MiB }` (keys gt, lt)",
                );
            };
            let (mut gt, mut lt) = (None, None);
            for (k, val) in entries {
                let n = size(val)?;
                match k.scalar_text().as_deref() {
                    Some("gt") => gt = Some(n),
                    Some("lt") => lt = Some(n),
                    _ => return fault(k.loc, "unknown key, expected gt or lt"),
                }
            }
            Cond::BodySize { gt, lt }
        }
        "content_type" => Cond::ContentType(globs(v, |s| Glob::plain(&s.to_ascii_lowercase()))?),
        "json" => Cond::Json(json_tests(v)?),
        "mcp.method" => Cond::McpMethod(globs(v, Glob::plain)?),
        "mcp.tool" => Cond::McpTool(globs(v, Glob::plain)?),
        "mcp.args" => Cond::McpArgs(json_tests(v)?),
        "mcp.resource" => Cond::McpResource(globs(v, Glob::plain)?),
        "llm.provider" => Cond::LlmProvider(globs(v, Glob::plain)?),
        "llm.model" => Cond::LlmModel(globs(v, Glob::plain)?),
        "llm.tools" => Cond::LlmTools(globs(v, Glob::plain)?),
        "proposal.tool" => Cond::ProposalTool(globs(v, Glob::plain)?),
        "proposal.kind" => Cond::ProposalKind(globs(v, Glob::plain)?),
        "proposal.args" => Cond::ProposalArgs(json_tests(v)?),
        "response.status" => Cond::ResponseStatus(
            strings(v)?
                .into_iter()
                .map(|(loc, s)| {
                    status_range(&s).map_or_else(
                        || {
                            fault(
                                loc,
                                format!("`{s}` is not a status, expected e.g. 200, 403 or 4xx"),
                            )
                        },
                        Ok,
                    )
                })
                .collect::<CResult<_>>()?,
        ),
        "response.content_type" => {
            Cond::ResponseContentType(globs(v, |s| Glob::plain(&s.to_ascii_lowercase()))?)
        }
        "response.json" => Cond::ResponseJson(json_tests(v)?),
        "detect" => Cond::Detect(
            strings(v)?
                .into_iter()
                .map(|(loc, s)| {
                    scope
                        .detectors
                        .index(&s)
                        .map_or_else(|| fault(loc, unknown_detector(&s, scope.detectors)), Ok)
                })
                .collect::<CResult<_>>()?,
        ),
        "not" => match &v.kind {
            Kind::Map(_) => Cond::Not(Box::new(compile_when(v, scope)?)),
            Kind::Seq(items) => Cond::Not(Box::new(Cond::Any(
                items
                    .iter()
                    .map(|i| compile_when(i, scope))
                    .collect::<CResult<_>>()?,
            ))),
            _ => {
                return fault(
                    v.loc,
                    "expected a mapping of conditions (or a list of them) under `not`",
                )
            }
        },
        "any" | "all" => {
            let Kind::Seq(items) = &v.kind else {
                return fault(
                    v.loc,
                    format!("expected a list of condition mappings under `{key}`"),
                );
            };
            let subs = items
                .iter()
                .map(|i| compile_when(i, scope))
                .collect::<CResult<_>>()?;
            if key == "any" {
                Cond::Any(subs)
            } else {
                Cond::All(subs)
            }
        }
        _ => {
            if let Some(name) = key.strip_prefix("query.").filter(|n| !n.is_empty()) {
                Cond::Query(name.to_owned(), str_test(v)?)
            } else if let Some(name) = key.strip_prefix("header.").filter(|n| !n.is_empty()) {
                Cond::Header(name.to_ascii_lowercase(), str_test(v)?)
            } else {
                return fault(
                    kloc,
                    format!(
                        "unknown condition `{key}`, expected one of {}",
                        CONDITION_KEYS.join(", ")
                    ),
                );
            }
        }
    })
}

/// `session.count: { NAME: { gt: N, lt: N, within: 1h } }`.
fn counter_tests(v: &Node) -> CResult<Vec<CounterTest>> {
    let Some(entries) = v.as_map().filter(|e| !e.is_empty()) else {
        return fault(
            v.loc,
            "expected a mapping of counters such as `{ records: { gt: 100, within: 1h } }`",
        );
    };
    let mut out = Vec::new();
    for (k, body) in entries {
        let counter = k.scalar_text().unwrap_or_default();
        if !super::effects::valid_name(&counter) {
            return fault(k.loc, format!("bad counter name `{counter}`"));
        }
        let Some(ops) = body.as_map() else {
            return fault(body.loc, "expected a mapping with gt, lt and within");
        };
        let mut test = CounterTest {
            counter,
            within: None,
            gt: None,
            lt: None,
        };
        for (op, val) in ops {
            let count = || match val.kind {
                Kind::Int(n) if n >= 0 => Ok(n as u64),
                _ => fault(val.loc, "expected a non-negative whole number"),
            };
            match op.scalar_text().as_deref() {
                Some("gt") => test.gt = Some(count()?),
                Some("lt") => test.lt = Some(count()?),
                Some("within") => {
                    let secs = val
                        .scalar_text()
                        .and_then(|s| super::ratelimit::parse_duration(&s))
                        .map(|d| d.as_secs())
                        .filter(|s| (60..=super::effects::MAX_WINDOW_SECS).contains(s));
                    test.within = Some(secs.map_or_else(
                        || {
                            fault(
                                val.loc,
                                "expected a window from 1m to 24h such as 10m or 1h",
                            )
                        },
                        Ok,
                    )?);
                }
                _ => return fault(op.loc, "unknown key, expected gt, lt or within"),
            }
        }
        if test.gt.is_none() && test.lt.is_none() {
            return fault(body.loc, "expected `gt` or `lt`");
        }
        out.push(test);
    }
    Ok(out)
}

pub fn unknown_detector(name: &str, detectors: &Detectors) -> String {
    let known: Vec<&str> = detectors.names().collect();
    format!(
        "unknown detector `{name}`, expected a built-in or policy-defined detector ({})",
        known.join(", ")
    )
}

/// A scalar or a list of scalars, as text with locations.
pub fn strings(v: &Node) -> CResult<Vec<(Loc, String)>> {
    let one = |n: &Node| match (&n.kind, n.scalar_text()) {
        (Kind::Str(_) | Kind::Int(_) | Kind::Float(_) | Kind::Bool(_), Some(s)) => Ok((n.loc, s)),
        _ => fault(n.loc, format!("expected a string, found {}", n.type_name())),
    };
    match &v.kind {
        Kind::Seq(items) if !items.is_empty() => items.iter().map(one).collect(),
        Kind::Seq(_) => fault(v.loc, "expected a string or a non-empty list of strings"),
        _ => Ok(vec![one(v)?]),
    }
}

fn globs(v: &Node, f: impl Fn(&str) -> Result<Glob, crate::glob::GlobError>) -> CResult<Vec<Glob>> {
    strings(v)?
        .into_iter()
        .map(|(loc, s)| f(&s).or_else(|e| fault(loc, format!("bad glob `{s}`: {e}"))))
        .collect()
}

fn ints<T: TryFrom<i64>>(v: &Node, what: &str) -> CResult<Vec<T>> {
    let one = |n: &Node| match n.kind {
        Kind::Int(i) => T::try_from(i)
            .or_else(|_| fault(n.loc, format!("{i} is out of range, expected {what}"))),
        _ => fault(n.loc, format!("expected {what}, found {}", n.type_name())),
    };
    match &v.kind {
        Kind::Seq(items) if !items.is_empty() => items.iter().map(one).collect(),
        Kind::Seq(_) => fault(
            v.loc,
            format!("expected {what} or a non-empty list of them"),
        ),
        _ => Ok(vec![one(v)?]),
    }
}

/// A byte size: an integer, or a number with a unit (`512KiB`, `1MiB`, `2MB`, `100B`).
pub fn size(v: &Node) -> CResult<u64> {
    let bad = || {
        fault(
            v.loc,
            "expected a byte size such as 1048576, `512KiB` or `1MiB`",
        )
    };
    match &v.kind {
        Kind::Int(i) => u64::try_from(*i).or_else(|_| bad()),
        Kind::Str(s) => {
            let s = s.trim();
            let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            let Ok(n) = num.parse::<u64>() else {
                return bad();
            };
            let mult: u64 = match unit.trim() {
                "" | "B" => 1,
                "KB" | "kB" => 1_000,
                "KiB" => 1 << 10,
                "MB" => 1_000_000,
                "MiB" => 1 << 20,
                "GB" => 1_000_000_000,
                "GiB" => 1 << 30,
                _ => return bad(),
            };
            n.checked_mul(mult).map_or_else(bad, Ok)
        }
        _ => bad(),
    }
}

pub fn regex(v: &Node) -> CResult<Regex> {
    let Kind::Str(src) = &v.kind else {
        return fault(
            v.loc,
            format!("expected a regex string, found {}", v.type_name()),
        );
    };
    regex::RegexBuilder::new(src)
        .size_limit(1 << 20)
        .dfa_size_limit(2 << 20)
        .build()
        .or_else(|e| fault(v.loc, format!("bad regex: {}", one_line(&e.to_string()))))
}

pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn json_path(loc: Loc, s: &str) -> CResult<JsonPath> {
    JsonPath::parse(s).or_else(|e| fault(loc, format!("bad JSONPath `{s}`: {e}")))
}

fn json_tests(v: &Node) -> CResult<Vec<(JsonPath, Vec<Op>)>> {
    let Some(entries) = v.as_map() else {
        return fault(v.loc, "expected a mapping of JSONPath to operators, e.g. `{ \"$.query\": { matches: \"...\" } }`");
    };
    entries
        .iter()
        .map(|(k, val)| {
            let Some(path) = k.scalar_text() else {
                return fault(k.loc, "expected a JSONPath string such as `$.a.b`");
            };
            let path = json_path(k.loc, &path)?;
            let ops = match &val.kind {
                Kind::Map(_) => ops(val)?,
                _ => vec![Op::Equals(val.to_json())],
            };
            Ok((path, ops))
        })
        .collect()
}

fn ops(v: &Node) -> CResult<Vec<Op>> {
    let entries = v.as_map().unwrap_or_default();
    if entries.is_empty() {
        return fault(v.loc, format!("expected at least one operator ({OPS})"));
    }
    entries
        .iter()
        .map(|(k, val)| {
            let name = k.scalar_text().unwrap_or_default();
            Ok(match name.as_str() {
                "equals" => Op::Equals(val.to_json()),
                "in" => match val.to_json() {
                    Value::Array(items) => Op::In(items),
                    _ => return fault(val.loc, "expected a list of values for `in`"),
                },
                "glob" => {
                    let Kind::Str(s) = &val.kind else {
                        return fault(val.loc, "expected a glob string");
                    };
                    Op::Glob(
                        Glob::plain(s)
                            .or_else(|e| fault(val.loc, format!("bad glob `{s}`: {e}")))?,
                    )
                }
                "matches" => Op::Matches(regex(val)?),
                "not_matches" => Op::NotMatches(regex(val)?),
                "gt" | "lt" => {
                    let n = match val.kind {
                        Kind::Int(i) => i as f64,
                        Kind::Float(f) => f,
                        _ => {
                            return fault(
                                val.loc,
                                format!(
                                    "expected a number for `{name}`, found {}",
                                    val.type_name()
                                ),
                            )
                        }
                    };
                    if name == "gt" {
                        Op::Gt(n)
                    } else {
                        Op::Lt(n)
                    }
                }
                "exists" => match val.kind {
                    Kind::Bool(b) => Op::Exists(b),
                    _ => return fault(val.loc, "expected true or false for `exists`"),
                },
                "contains" => Op::Contains(val.to_json()),
                "count_gt" | "count_lt" => {
                    let Kind::Int(n) = val.kind else {
                        return fault(val.loc, format!("expected a whole number for `{name}`"));
                    };
                    let n = usize::try_from(n).or_else(|_| {
                        fault(
                            val.loc,
                            format!("expected a non-negative number for `{name}`"),
                        )
                    })?;
                    if name == "count_gt" {
                        Op::CountGt(n)
                    } else {
                        Op::CountLt(n)
                    }
                }
                _ => {
                    return fault(
                        k.loc,
                        format!("unknown operator `{name}`, expected one of {OPS}"),
                    )
                }
            })
        })
        .collect()
}

fn str_test(v: &Node) -> CResult<StrTest> {
    match &v.kind {
        Kind::Map(_) => Ok(StrTest::Ops(ops(v)?)),
        _ => Ok(StrTest::Globs(globs(v, Glob::plain)?)),
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Evaluation

/// Per-evaluation state: the normalised host (`host::request_host`, a DNS query's name `host::normalise`) and
/// lazily computed detector results.
pub struct Ctx<'a> {
    pub action: &'a Action,
    pub host: Option<Cow<'a, str>>,
    detectors: &'a Detectors,
    /// 0 = not computed, 1 = does not fire, 2 = fires.
    detected: RefCell<Vec<u8>>,
    /// The body as the upstream reads it, when that differs from its bytes (see [`encoding::decoded_body`]).
    decoded_body: OnceCell<Option<String>>,
}

impl<'a> Ctx<'a> {
    pub fn new(action: &'a Action, detectors: &'a Detectors) -> Ctx<'a> {
        // A query's name is a name; every other host is matched as requests name it (an address in one spelling).
        let host = action.transport.host.as_deref().map(|h| {
            if action.transport.scheme == crate::model::Scheme::Dns {
                crate::host::normalise(h)
            } else {
                crate::host::request_host(h)
            }
        });
        Ctx {
            action,
            host,
            detectors,
            detected: RefCell::new(Vec::new()),
            decoded_body: OnceCell::new(),
        }
    }

    fn detect(&self, i: usize) -> bool {
        let mut cache = self.detected.borrow_mut();
        if cache.is_empty() {
            cache.resize(self.detectors.len(), 0);
        }
        match cache.get(i) {
            Some(2) => return true,
            Some(1) => return false,
            _ => {}
        }
        let fires = self.scan(i);
        if let Some(slot) = cache.get_mut(i) {
            *slot = if fires { 2 } else { 1 };
        }
        fires
    }

    /// The LLM provider the request goes to: its host's (`transport.provider`), else the LLM call's.
    fn provider(&self) -> Option<&str> {
        let a = self.action;
        a.transport
            .provider
            .as_deref()
            .or_else(|| a.llm.as_ref().map(|l| l.provider.as_str()))
    }

    /// Runs detector `i` over what the Action's phase is about. A request: the host (also upper-cased: names
    /// arrive lower-cased; scanned even for a DNS query, which has nothing else), the URL path and query, every
    /// header value (but the client's own credential for the provider it talks to, see
    /// `Detectors::own_credential`) and the body, the body also as the upstream will read it (JSON escapes undone,
    /// a form decoded), so neither case nor an escape can hide a secret. A proposal: its arguments, as JSON text and
    /// with escapes undone. A response: its body, likewise.
    fn scan(&self, i: usize) -> bool {
        let d = self.detectors;
        let json_text = |text: &str, json: Option<&Value>, content_type: Option<&str>| {
            d.fires(i, text)
                || self
                    .decoded_body
                    .get_or_init(|| encoding::decoded_body(text, json, content_type))
                    .as_deref()
                    .is_some_and(|t| d.fires(i, t))
        };
        match self.action.phase() {
            Phase::Proposal => {
                let Some(args) = self.action.proposal.as_ref().and_then(|p| p.args.as_ref()) else {
                    return false;
                };
                let text = args.to_string();
                return json_text(&text, Some(args), Some("application/json"));
            }
            Phase::Response => {
                let Some(r) = self.action.response.as_ref() else {
                    return false;
                };
                return json_text(&r.body, r.json.as_ref(), r.content_type.as_deref());
            }
            Phase::Request => {}
        }
        if self
            .host
            .as_deref()
            .is_some_and(|h| d.fires(i, h) || d.fires(i, &h.to_ascii_uppercase()))
        {
            return true;
        }
        let Some(http) = &self.action.http else {
            return false;
        };
        d.fires(i, &http.path)
            || http
                .query
                .0
                .iter()
                .any(|(k, v)| d.fires(i, k) || d.fires(i, v))
            || http
                .headers
                .0
                .iter()
                .any(|(k, v)| !d.own_credential(i, k, self.provider()) && d.fires(i, v))
            || json_text(
                &http.body,
                http.json.as_deref(),
                http.content_type.as_deref(),
            )
    }
}

/// Whether the header field `field` is `name` (lower-case) as a receiver may read it: case-insensitively, and with
/// `_` and `-` alike, as CGI-style servers name fields (`HTTP_X_ROLE` for both `X-Role` and `X_Role`: WSGI, Django,
/// PHP).
pub fn same_header(field: &str, name: &str) -> bool {
    field.len() == name.len()
        && field.bytes().zip(name.bytes()).all(|(f, n)| {
            let f = if f == b'_' {
                b'-'
            } else {
                f.to_ascii_lowercase()
            };
            let n = if n == b'_' { b'-' } else { n };
            f == n
        })
}

/// Every value of the header fields a receiver may read as `name` ([`same_header`]).
pub fn header_values<'a>(
    headers: &'a crate::model::Pairs,
    name: &'a str,
) -> impl Iterator<Item = &'a str> + 'a {
    headers
        .0
        .iter()
        .filter(move |(k, _)| same_header(k, name))
        .map(|(_, v)| v.as_str())
}

fn any_glob(globs: &[Glob], s: Option<&str>) -> bool {
    s.is_some_and(|s| globs.iter().any(|g| g.is_match(s)))
}

/// Whether a `Content-Type` value's media type (parameters dropped, lower-cased) matches one of `globs`.
fn media_type_matches(globs: &[Glob], content_type: Option<&str>) -> bool {
    content_type.is_some_and(|ct| {
        let media = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        globs.iter().any(|g| g.is_match(&media))
    })
}

/// `404` as (404, 404), `4xx` as (400, 499); `None` for anything else.
fn status_range(s: &str) -> Option<(u16, u16)> {
    let s = s.trim().to_ascii_lowercase();
    if let Some(class) = s.strip_suffix("xx") {
        let c: u16 = class.parse().ok().filter(|c| (1..=5).contains(c))?;
        return Some((c * 100, c * 100 + 99));
    }
    let code: u16 = s.parse().ok().filter(|c| (100..=599).contains(c))?;
    Some((code, code))
}

impl Cond {
    pub fn eval(&self, cx: &Ctx) -> bool {
        let a = cx.action;
        let http = a.http.as_ref();
        match self {
            Cond::All(cs) => cs.iter().all(|c| c.eval(cx)),
            Cond::Any(cs) => cs.iter().any(|c| c.eval(cx)),
            Cond::Not(c) => !c.eval(cx),
            Cond::Profile(g) => any_glob(g, a.agent.profile.as_deref()),
            Cond::Exe(g) => any_glob(g, a.agent.exe.as_deref()),
            Cond::Uid(u) => a.agent.uid.is_some_and(|uid| u.contains(&uid)),
            Cond::User(g) => any_glob(g, a.agent.user.as_deref()),
            Cond::Groups(g) => a.agent.groups.iter().any(|n| any_glob(g, Some(n))),
            Cond::SessionLabels(g) => a
                .session
                .as_ref()
                .is_some_and(|s| s.labels.iter().any(|l| any_glob(g, Some(l)))),
            Cond::SessionCount(tests) => tests.iter().all(|t| t.eval(a.session.as_deref())),
            Cond::SessionPreviousTool(g) => any_glob(
                g,
                a.session.as_ref().and_then(|s| s.previous_tool.as_deref()),
            ),
            Cond::Host(g) => any_glob(g, cx.host.as_deref()),
            Cond::Port(p) => p.contains(&a.transport.port),
            Cond::Scheme(s) => s.contains(&a.transport.scheme),
            Cond::Method(m) => {
                http.is_some_and(|h| m.iter().any(|m| m.eq_ignore_ascii_case(&h.method)))
            }
            Cond::Path(g) => http.is_some_and(|h| {
                let path = h.path.split('?').next().unwrap_or("");
                g.iter().any(|g| g.is_match(path))
            }),
            Cond::Upgrade(g) => http.is_some_and(|h| {
                h.upgrade
                    .as_deref()
                    .is_some_and(|tokens| tokens.split(',').any(|t| any_glob(g, Some(t.trim()))))
            }),
            Cond::Query(name, t) => http.is_some_and(|h| t.eval(h.query.get_all(name))),
            Cond::Header(name, t) => http.is_some_and(|h| t.eval(header_values(&h.headers, name))),
            Cond::BodySize { gt, lt } => http.is_some_and(|h| {
                let size = h.body_size.max(h.body.len() as u64);
                gt.is_none_or(|g| size > g) && lt.is_none_or(|l| size < l)
            }),
            Cond::ContentType(g) => {
                http.is_some_and(|h| media_type_matches(g, h.content_type.as_deref()))
            }
            Cond::Json(tests) => http.is_some_and(|h| json_eval(tests, h.json.as_deref())),
            Cond::McpMethod(g) => any_glob(g, a.mcp.as_ref().map(|m| m.method.as_str())),
            Cond::McpTool(g) => any_glob(g, a.mcp.as_ref().and_then(|m| m.tool.as_deref())),
            Cond::McpArgs(tests) => match &a.mcp {
                Some(m) => json_eval(tests, m.args.as_ref()),
                None => false,
            },
            Cond::McpResource(g) => any_glob(g, a.mcp.as_ref().and_then(|m| m.resource.as_deref())),
            Cond::LlmProvider(g) => any_glob(g, a.llm.as_ref().map(|l| l.provider.as_str())),
            Cond::LlmModel(g) => any_glob(g, a.llm.as_ref().and_then(|l| l.model.as_deref())),
            Cond::LlmTools(g) => a
                .llm
                .as_ref()
                .is_some_and(|l| l.tools.iter().any(|t| g.iter().any(|g| g.is_match(t)))),
            Cond::ProposalTool(g) => any_glob(g, a.proposal.as_ref().map(|p| p.tool.as_str())),
            Cond::ProposalKind(g) => any_glob(g, a.proposal.as_ref().map(|p| p.kind.as_str())),
            Cond::ProposalArgs(tests) => match &a.proposal {
                Some(p) => json_eval(tests, p.args.as_ref()),
                None => false,
            },
            Cond::ResponseStatus(ranges) => a.response.as_ref().is_some_and(|r| {
                ranges
                    .iter()
                    .any(|(lo, hi)| (*lo..=*hi).contains(&r.status))
            }),
            Cond::ResponseContentType(g) => a
                .response
                .as_ref()
                .is_some_and(|r| media_type_matches(g, r.content_type.as_deref())),
            Cond::ResponseJson(tests) => match &a.response {
                Some(r) => json_eval(tests, r.json.as_ref()),
                None => false,
            },
            Cond::Detect(ids) => ids.iter().any(|&i| cx.detect(i)),
        }
    }

    /// Whether this condition can still hold once the response body is known, judged on a response Action that
    /// has only its head (status, headers, content type): `Some(v)` when the head alone decides, `None` when it
    /// depends on the body (`response.json`, `detect`).
    pub fn on_head(&self, cx: &Ctx) -> Option<bool> {
        match self {
            Cond::All(cs) => cs
                .iter()
                .try_fold(Some(true), |acc, c| match c.on_head(cx) {
                    Some(false) => Err(()),
                    None => Ok(None),
                    Some(true) => Ok(acc),
                })
                .unwrap_or(Some(false)),
            Cond::Any(cs) => cs
                .iter()
                .try_fold(Some(false), |acc, c| match c.on_head(cx) {
                    Some(true) => Err(()),
                    None => Ok(None),
                    Some(false) => Ok(acc),
                })
                .map_or(Some(true), |r| r),
            Cond::Not(c) => c.on_head(cx).map(|v| !v),
            Cond::ResponseJson(_) | Cond::Detect(_) => None,
            other => Some(other.eval(cx)),
        }
    }

    /// Whether this condition reads a response body's parsed JSON (`response.json`). `detect` reads the body's text
    /// and its JSON only where escapes could hide a secret (`encoding::decoded_body`).
    pub fn reads_response_json(&self) -> bool {
        match self {
            Cond::All(cs) | Cond::Any(cs) => cs.iter().any(Cond::reads_response_json),
            Cond::Not(c) => c.reads_response_json(),
            Cond::ResponseJson(_) => true,
            _ => false,
        }
    }

    /// Whether a `json:` or `mcp.args` path of this condition selects, in `a`, a member that has a twin named alike
    /// once folded (`JsonPath::reads_twins`): the receiver may read the other one.
    pub fn reads_twin_member(&self, a: &Action) -> bool {
        let twins = |tests: &[(JsonPath, Vec<Op>)], root: Option<&Value>| {
            root.is_some_and(|r| tests.iter().any(|(path, _)| path.reads_twins(r)))
        };
        match self {
            Cond::All(cs) | Cond::Any(cs) => cs.iter().any(|c| c.reads_twin_member(a)),
            Cond::Not(c) => c.reads_twin_member(a),
            Cond::Json(tests) => twins(tests, a.http.as_ref().and_then(|h| h.json.as_deref())),
            Cond::McpArgs(tests) => twins(tests, a.mcp.as_ref().and_then(|m| m.args.as_ref())),
            _ => false,
        }
    }

    /// Add the header names (lower-case) and query parameter names this condition reads (`header.<name>`,
    /// `query.<name>`) to `headers` and `queries`, once each.
    pub fn field_names(&self, headers: &mut Vec<String>, queries: &mut Vec<String>) {
        match self {
            Cond::All(cs) | Cond::Any(cs) => {
                cs.iter().for_each(|c| c.field_names(headers, queries))
            }
            Cond::Not(c) => c.field_names(headers, queries),
            Cond::Header(name, _) if !headers.contains(name) => headers.push(name.clone()),
            Cond::Query(name, _) if !queries.contains(name) => queries.push(name.clone()),
            _ => {}
        }
    }

    /// Add every (counter, window) a `session.count` in this condition reads to `out`, once each.
    pub fn session_counters(&self, out: &mut Vec<(String, Option<u64>)>) {
        match self {
            Cond::All(cs) | Cond::Any(cs) => cs.iter().for_each(|c| c.session_counters(out)),
            Cond::Not(c) => c.session_counters(out),
            Cond::SessionCount(tests) => {
                for t in tests {
                    let key = (t.counter.clone(), t.within);
                    if !out.contains(&key) {
                        out.push(key);
                    }
                }
            }
            _ => {}
        }
    }

    /// Whether the rule's own (top-level) `scheme:` condition lists `scheme`.
    pub fn names_scheme(&self, scheme: Scheme) -> bool {
        let Cond::All(cs) = self else { return false };
        cs.iter()
            .any(|c| matches!(c, Cond::Scheme(list) if list.contains(&scheme)))
    }

    /// The rule's own (top-level) `host:` globs, when it has that condition.
    /// (`exact_hosts` below gives the exact hosts this condition requires, for the host index.)
    pub fn host_globs(&self) -> Option<&[Glob]> {
        let Cond::All(cs) = self else { return None };
        cs.iter().find_map(|c| match c {
            Cond::Host(globs) => Some(globs.as_slice()),
            _ => None,
        })
    }

    /// The host globs of a rule whose only condition is `host:`.
    pub fn only_host(&self) -> Option<&[Glob]> {
        match self {
            Cond::All(cs) if cs.len() == 1 => self.host_globs(),
            _ => None,
        }
    }

    pub fn exact_hosts(&self) -> Option<Vec<String>> {
        let Cond::All(cs) = self else { return None };
        cs.iter().find_map(|c| match c {
            Cond::Host(globs) => globs.iter().map(|g| g.exact().map(str::to_owned)).collect(),
            _ => None,
        })
    }
}

impl StrTest {
    fn eval<'v>(&self, mut values: impl Iterator<Item = &'v str>) -> bool {
        match self {
            StrTest::Globs(g) => values.any(|v| g.iter().any(|g| g.is_match(v))),
            StrTest::Ops(ops) => {
                let vals: Vec<Value> = values.map(|v| Value::String(v.to_owned())).collect();
                let refs: Vec<&Value> = vals.iter().collect();
                ops.iter().all(|op| op.eval(&refs))
            }
        }
    }
}

/// Missing JSON (no body, not JSON) selects nothing; operators then decide as documented on [`Op`].
fn json_eval(tests: &[(JsonPath, Vec<Op>)], root: Option<&Value>) -> bool {
    tests.iter().all(|(path, ops)| {
        let selected = root.map(|r| path.select(r)).unwrap_or_default();
        ops.iter().all(|op| op.eval(&selected))
    })
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

impl Op {
    fn eval(&self, vals: &[&Value]) -> bool {
        match self {
            Op::Equals(want) => vals.iter().any(|v| json_eq(v, want)),
            Op::In(set) => vals.iter().any(|v| set.iter().any(|w| json_eq(v, w))),
            Op::Glob(g) => vals
                .iter()
                .any(|v| v.as_str().is_some_and(|s| g.is_match(s))),
            Op::Matches(re) => vals
                .iter()
                .any(|v| v.as_str().is_some_and(|s| re.is_match(s))),
            Op::NotMatches(re) => {
                vals.is_empty()
                    || vals
                        .iter()
                        .any(|v| !v.as_str().is_some_and(|s| re.is_match(s)))
            }
            Op::Gt(n) => vals.iter().any(|v| num(v).is_some_and(|x| x > *n)),
            Op::Lt(n) => vals.iter().any(|v| num(v).is_some_and(|x| x < *n)),
            Op::Exists(want) => vals.is_empty() != *want,
            Op::CountGt(n) => vals.len() > *n,
            Op::CountLt(n) => vals.len() < *n,
            Op::Contains(want) => vals.iter().any(|v| match (v, want) {
                (Value::String(s), Value::String(w)) => s.contains(w.as_str()),
                (Value::Array(items), w) => items.iter().any(|i| json_eq(i, w)),
                (Value::Object(map), Value::String(k)) => map.contains_key(k),
                _ => false,
            }),
        }
    }
}
