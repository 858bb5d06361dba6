//! What a rule does besides its verdict: `review:` (how a `review` verdict waits), `label:` and `count:` (what a
//! match leaves on the agent's session for later rules to read), and `retain:` (keep the whole exchange as an
//! encrypted trace). Compiled with the rule; evaluated into the [`Decision`](crate::model::Decision)'s `review`,
//! `labels`, `counts` and `retain`, which the proxy hands to the session registry and the trace store.

use serde_json::Value;

use super::cond::{self, fault, CResult};
use super::ratelimit::parse_duration;
use super::yaml::{Kind, Node};
use crate::jsonpath::JsonPath;
use crate::model::{Action, CountAdd, Phase, ReviewSpec, Verdict, DEFAULT_REVIEW};

/// The longest a review may hold an exchange: one hour (clients and their SDKs give up long before; see
/// docs/policy.md "Review").
pub const MAX_REVIEW_SECS: u64 = 3600;
/// Counters the enforcer keeps itself; rules cannot add to them.
pub const BUILTIN_COUNTERS: &[&str] = &["requests", "bytes_sent", "bytes_received"];
/// The longest window a `session.count` condition may look back (the session keeps this much history).
pub const MAX_WINDOW_SECS: u64 = 24 * 3600;

/// A rule's `count:` entry: a fixed amount, or the number of values a JSONPath selects in what the phase is about
/// (the request's JSON body, the proposal's arguments, the response's JSON body).
#[derive(Debug, Clone)]
pub enum CountBy {
    Fixed(u64),
    Selected(JsonPath),
}

/// The session effects of one rule.
#[derive(Debug, Clone, Default)]
pub struct Effects {
    pub review: Option<ReviewSpec>,
    pub labels: Vec<String>,
    pub counts: Vec<(String, CountBy)>,
    pub retain: Option<f64>,
}

impl Effects {
    /// The counter additions this rule makes for `action`.
    pub fn count_adds<'a>(&'a self, action: &'a Action) -> impl Iterator<Item = CountAdd> + 'a {
        let json = phase_json(action);
        self.counts.iter().filter_map(move |(counter, by)| {
            let n = match by {
                CountBy::Fixed(n) => *n,
                CountBy::Selected(path) => json.map_or(0, |j| path.select(j).len() as u64),
            };
            (n > 0).then(|| CountAdd {
                counter: counter.clone(),
                by: n,
            })
        })
    }
}

impl Effects {
    /// Whether a `count:` reads the Action's JSON (a path whose matches it counts).
    pub fn reads_json(&self) -> bool {
        self.counts
            .iter()
            .any(|(_, by)| matches!(by, CountBy::Selected(_)))
    }
}

/// The JSON a `count:` path reads for this Action's phase.
fn phase_json(action: &Action) -> Option<&Value> {
    match action.phase() {
        Phase::Request => action.http.as_ref().and_then(|h| h.json.as_deref()),
        Phase::Proposal => action.proposal.as_ref().and_then(|p| p.args.as_ref()),
        Phase::Response => action.response.as_ref().and_then(|r| r.json.as_ref()),
    }
}

/// The larger of two retention fractions (`None` is nothing retained).
pub fn larger(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.max(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

/// A label or counter name: letters, digits, `-`, `_`, `.`, `:`; 1 to 64 characters.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'))
}

const NAME_RULE: &str = "letters, digits, `-`, `_`, `.` or `:`, at most 64 characters";

/// Compile a rule's `review`, `label`, `count` and `retain` keys (`get` looks a key up in the rule's mapping).
pub fn compile<'n>(
    get: impl Fn(&str) -> Option<(&'n Node, &'n Node)>,
    verdict: Verdict,
    what: &str,
) -> CResult<Effects> {
    let review = match (get("review"), verdict) {
        (Some((_, v)), Verdict::Review) => Some(compile_review(v)?),
        (None, Verdict::Review) => Some(DEFAULT_REVIEW),
        (Some((k, _)), _) => {
            return fault(
                k.loc,
                format!("{what} has `review:` but its verdict is not review"),
            )
        }
        (None, _) => None,
    };
    let labels = match get("label") {
        Some((_, v)) => cond::strings(v)?
            .into_iter()
            .map(|(loc, s)| {
                if valid_name(&s) {
                    Ok(s)
                } else {
                    fault(loc, format!("bad label `{s}`, expected {NAME_RULE}"))
                }
            })
            .collect::<CResult<_>>()?,
        None => Vec::new(),
    };
    let counts = match get("count") {
        Some((_, v)) => compile_count(v)?,
        None => Vec::new(),
    };
    let retain = get("retain").map(|(_, v)| compile_retain(v)).transpose()?;
    Ok(Effects {
        review,
        labels,
        counts,
        retain: retain.flatten(),
    })
}

fn compile_review(node: &Node) -> CResult<ReviewSpec> {
    let Some(entries) = node.as_map() else {
        return fault(
            node.loc,
            "expected a mapping such as `{ timeout: 5m, fallback: block }`",
        );
    };
    let mut spec = DEFAULT_REVIEW;
    for (k, v) in entries {
        match k.scalar_text().as_deref() {
            Some("timeout") => {
                let secs = v
                    .scalar_text()
                    .and_then(|s| parse_duration(&s))
                    .map(|d| d.as_secs())
                    .filter(|s| (1..=MAX_REVIEW_SECS).contains(s));
                spec.timeout_secs = secs.map_or_else(
                    || {
                        fault(
                            v.loc,
                            format!("expected a duration from 1s to 1h such as 30s or 5m (at most {MAX_REVIEW_SECS}s)"),
                        )
                    },
                    Ok,
                )?;
            }
            Some("fallback") => {
                spec.fallback = match v.scalar_text().as_deref() {
                    Some("allow") => Verdict::Allow,
                    Some("log") => Verdict::Log,
                    Some("block") => Verdict::Block,
                    _ => return fault(v.loc, "unknown fallback, expected allow, log or block"),
                }
            }
            _ => {
                return fault(
                    k.loc,
                    "unknown key in `review`, expected timeout or fallback",
                )
            }
        }
    }
    Ok(spec)
}

fn compile_count(node: &Node) -> CResult<Vec<(String, CountBy)>> {
    let Some(entries) = node.as_map() else {
        return fault(
            node.loc,
            "expected a mapping of counters, e.g. `{ records: \"$.rows[*]\" }` or `{ sql_calls: 1 }`",
        );
    };
    let mut out = Vec::new();
    for (k, v) in entries {
        let name = k.scalar_text().unwrap_or_default();
        if !valid_name(&name) {
            return fault(
                k.loc,
                format!("bad counter name `{name}`, expected {NAME_RULE}"),
            );
        }
        if BUILTIN_COUNTERS.contains(&name.as_str()) {
            return fault(
                k.loc,
                format!(
                    "`{name}` is counted by the enforcer itself, expected another counter name"
                ),
            );
        }
        let by =
            match &v.kind {
                Kind::Int(n) if *n > 0 => CountBy::Fixed(*n as u64),
                Kind::Str(path) => CountBy::Selected(cond::json_path(v.loc, path)?),
                _ => return fault(
                    v.loc,
                    "expected a positive number or a JSONPath whose selected values are counted",
                ),
            };
        out.push((name, by));
    }
    Ok(out)
}

fn compile_retain(node: &Node) -> CResult<Option<f64>> {
    let bad = || {
        fault(
            node.loc,
            "expected true, false or `{ sample: F }` with F a fraction above 0 and at most 1",
        )
    };
    match &node.kind {
        Kind::Bool(true) => Ok(Some(1.0)),
        Kind::Bool(false) => Ok(None),
        Kind::Map(entries) => {
            let [(k, v)] = entries.as_slice() else {
                return bad();
            };
            let f = match (k.scalar_text().as_deref(), &v.kind) {
                (Some("sample"), Kind::Float(f)) => *f,
                (Some("sample"), Kind::Int(1)) => 1.0,
                _ => return bad(),
            };
            if f > 0.0 && f <= 1.0 {
                Ok(Some(f))
            } else {
                bad()
            }
        }
        _ => bad(),
    }
}
