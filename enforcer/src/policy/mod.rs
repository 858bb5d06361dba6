//! The policy engine: loads a YAML policy straight into its compiled form and answers one [`Decision`] per
//! [`Action`]. Pure and synchronous apart from rate-limit counters. Owns the policy language (see docs/policy.md),
//! its error messages (`FILE:LINE:COL: what was wrong, what was expected`), the JSONPath subset and the detectors
//! the constrain stage reuses; knows nothing of sockets, TLS or the audit trail.
//!
//! Semantics: every matching rule is collected; the verdict is the most restrictive (block > constrain > log >
//! allow); the deciding rule is the first in file order with that verdict; a rule over its rate limit turns into a
//! block and decides; the rewrites of all matching constrain rules apply in file order; no match → `default`.
//! Rules are indexed by exact host so evaluation only visits rules that can match. DNS queries (scheme `dns`) follow
//! their own short procedure in `dns.rs`. [`SharedPolicy`] holds the policy in force so the daemon can replace it
//! while it runs.

#![forbid(unsafe_code)]

pub mod cases;
pub mod cli;
mod cond;
pub mod detect;
mod dns;
mod effects;
mod ratelimit;
mod shared;
mod yaml;

use std::collections::HashMap;
use std::io::Read as _;
use std::path::Path;
use std::time::Instant;

use cond::{fault, CResult, Cond, Ctx, Fault, Scope};
use ratelimit::Tokens;
use yaml::{Kind, Loc, Node};

use crate::model::{
    Action, Decided, Decision, Mode, Phase, PlannedRewrite, Reason, Relay, Rewrite, Verdict,
};

pub use effects::{BUILTIN_COUNTERS, MAX_REVIEW_SECS, MAX_WINDOW_SECS};

pub use cond::{header_values, same_header};
pub use dns::RefusedAnswer;
pub use shared::SharedPolicy;
pub use yaml::MAX_SOURCE_BYTES;

/// The largest body the proxy buffers for inspection unless the policy says otherwise.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 4 * 1024 * 1024;
/// The default replacement for a redacted secret; `{detector}` stands for the detector's name.
pub const DEFAULT_REDACTION_MARKER: &str = "[REDACTED:{detector}]";

/// The client-facing message of the default block when the policy does not set `default_message`.
pub const DEFAULT_BLOCK_MESSAGE: &str = "blocked by policy: no rule allows this request";

/// The message of a constrain rule carried out as a block on an Action with nothing to rewrite.
pub const UNREWRITABLE_MESSAGE: &str =
    "blocked by policy: a constrain rule matched, and this connection has nothing it could rewrite";

/// The client-facing message of a rate-limited rule without its own `message`.
pub const RATE_LIMIT_MESSAGE: &str = "rate limit exceeded";

/// The client-facing message when a profile restricted to some users is used by another.
pub const USER_NOT_ALLOWED_MESSAGE: &str =
    "blocked by policy: this agent profile is not for the user the agent acts for";

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{origin}: file is larger than the {max} byte limit for policy files")]
    TooLarge { origin: String, max: usize },
    /// The file is not valid YAML, or breaks the parse budget (alias bombs, nesting, size).
    #[error("{}", located(origin, *line, *column, message))]
    Yaml {
        origin: String,
        line: u64,
        column: u64,
        message: String,
    },
    /// Valid YAML that is not a valid policy (or cases file). `more` holds the errors of other rules in the same
    /// file as (line, column, message), printed one per line after the first.
    #[error("{}", located_all(origin, *line, *column, message, more))]
    Invalid {
        origin: String,
        line: u64,
        column: u64,
        message: String,
        more: Vec<(u64, u64, String)>,
    },
}

impl PolicyError {
    /// Line and column (1-based) when known.
    pub fn location(&self) -> Option<(u64, u64)> {
        match self {
            PolicyError::Yaml { line, column, .. } | PolicyError::Invalid { line, column, .. }
                if *line > 0 =>
            {
                Some((*line, *column))
            }
            _ => None,
        }
    }

    fn yaml(origin: &str, e: yaml::YamlError) -> PolicyError {
        PolicyError::Yaml {
            origin: origin.to_owned(),
            line: e.loc.line,
            column: e.loc.column,
            message: e.message,
        }
    }

    fn invalid(origin: &str, f: Fault) -> PolicyError {
        PolicyError::Invalid {
            origin: origin.to_owned(),
            line: f.loc.line,
            column: f.loc.column,
            message: f.message,
            more: f
                .more
                .into_iter()
                .map(|m| (m.loc.line, m.loc.column, m.message))
                .collect(),
        }
    }
}

fn located_all(
    origin: &str,
    line: u64,
    column: u64,
    message: &str,
    more: &[(u64, u64, String)],
) -> String {
    let mut out = located(origin, line, column, message);
    for (line, column, message) in more {
        out.push('\n');
        out.push_str(&located(origin, *line, *column, message));
    }
    out
}

fn located(origin: &str, line: u64, column: u64, message: &str) -> String {
    if line == 0 {
        format!("{origin}: {message}")
    } else {
        format!("{origin}:{line}:{column}: {message}")
    }
}

/// Read a policy or cases file, refusing files over [`MAX_SOURCE_BYTES`] without reading them whole.
pub(crate) fn read_source(path: &Path) -> Result<String, PolicyError> {
    let io = |source| PolicyError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut buf = Vec::new();
    file.take(MAX_SOURCE_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(io)?;
    if buf.len() > MAX_SOURCE_BYTES {
        return Err(PolicyError::TooLarge {
            origin: path.display().to_string(),
            max: MAX_SOURCE_BYTES,
        });
    }
    String::from_utf8(buf).map_err(|_| PolicyError::Invalid {
        origin: path.display().to_string(),
        line: 0,
        column: 0,
        message: "file is not UTF-8 text".into(),
        more: Vec::new(),
    })
}

#[derive(Debug)]
struct Rule {
    id: String,
    description: Option<String>,
    when: Cond,
    verdict: Verdict,
    message: Option<String>,
    rewrites: Vec<Rewrite>,
    rate_limit: Option<ratelimit::RateLimit>,
    relay: Relay,
    /// The part of an exchange the rule decides.
    on: Phase,
    /// `review:`, `label:`, `count:`, `retain:`.
    effects: effects::Effects,
}

/// Who may use a profile (`profiles: NAME: { users, groups }`): a user named in `users` or a member of one of
/// `groups`. A profile with neither is open to everyone.
#[derive(Debug, Clone, Default)]
struct ProfileAccess {
    users: Vec<String>,
    groups: Vec<String>,
}

impl ProfileAccess {
    fn is_open(&self) -> bool {
        self.users.is_empty() && self.groups.is_empty()
    }

    fn admits(&self, agent: &crate::model::Agent) -> bool {
        self.is_open()
            || agent.user.as_ref().is_some_and(|u| self.users.contains(u))
            || agent.groups.iter().any(|g| self.groups.contains(g))
    }
}

/// A loaded, compiled policy. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Policy {
    hash: String,
    mode: Mode,
    default: Verdict,
    default_message: Option<String>,
    max_body_bytes: u64,
    redaction_marker: String,
    detectors: detect::Detectors,
    /// The detectors' names, in their order: what redaction runs, named once per policy, not per use.
    detector_names: Vec<String>,
    profiles: Vec<String>,
    /// Profiles restricted to some users, by name.
    access: HashMap<String, ProfileAccess>,
    /// Every (counter, window) a `session.count` condition reads, so the session registry fills exactly those.
    session_counters: Vec<(String, Option<u64>)>,
    /// The header names (lower-case) and query parameter names some condition reads ([`Policy::read_fields`]).
    read_headers: Vec<String>,
    read_queries: Vec<String>,
    rules: Vec<Rule>,
    /// The `dns:` settings (how refused names are answered).
    dns: dns::DnsSettings,
    /// Rule indices (ascending) per exact lower-case host.
    by_host: HashMap<String, Vec<usize>>,
    /// Rules without an exact-host condition (ascending): checked for every action.
    unindexed: Vec<usize>,
    limiter: ratelimit::Limiter,
}

impl Policy {
    /// Load and compile a policy file. A policy either loads whole or not at all.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let src = read_source(path)?;
        Self::from_yaml(&src, &path.display().to_string())
    }

    /// Compile a policy from YAML text; `origin` names it in errors (usually the file path).
    pub fn from_yaml(src: &str, origin: &str) -> Result<Policy, PolicyError> {
        use sha2::Digest;
        if src.len() > MAX_SOURCE_BYTES {
            return Err(PolicyError::TooLarge {
                origin: origin.to_owned(),
                max: MAX_SOURCE_BYTES,
            });
        }
        let root = yaml::parse(src).map_err(|e| PolicyError::yaml(origin, e))?;
        let hash = hex::encode(sha2::Sha256::digest(src.as_bytes()));
        compile(&root, hash).map_err(|f| PolicyError::invalid(origin, f))
    }

    /// Decide one action.
    pub fn evaluate(&self, action: &Action) -> Decision {
        self.evaluate_at(action, Instant::now())
    }

    /// Decide everything one exchange asks for: each Action on its own, then the most restrictive decision wins
    /// (the first among equals, and an enforced decision over a shadow one with the same verdict). The winner
    /// carries every rule any Action matched and, when it is constrain, every constrain rewrite of every Action, each
    /// once, in order. No Actions decide like one empty Action (the default).
    pub fn decide_all(&self, actions: &[Action]) -> Decided {
        self.decide_all_with(actions, Tokens::Take)
    }

    /// [`Policy::decide_all`] for another reading of a request (`proxy::readings`): rate limits are looked at, no
    /// token is taken — the request is counted once, by the decision enforced. Called before that decision, so a
    /// reading sees the buckets as the enforced decision does.
    pub fn decide_reading(&self, actions: &[Action]) -> Decided {
        self.decide_all_with(actions, Tokens::Look)
    }

    fn decide_all_with(&self, actions: &[Action], tokens: Tokens) -> Decided {
        let now = Instant::now();
        let each: Vec<Decision> = actions
            .iter()
            .map(|a| self.evaluate_with(a, now, tokens))
            .collect();
        let mut index = 0;
        for (i, d) in each.iter().enumerate().skip(1) {
            let b = &each[index];
            if d.verdict > b.verdict
                || (d.verdict == b.verdict && d.mode == Mode::Enforce && b.mode == Mode::Shadow)
            {
                index = i;
            }
        }
        let Some(winner) = each.get(index) else {
            let decision = self.evaluate_with(&Action::default(), now, tokens);
            return Decided {
                decision: decision.clone(),
                index: 0,
                each: vec![decision],
            };
        };
        let mut decision = winner.clone();
        decision.matched_rules.clear();
        decision.rewrites.clear();
        decision.labels.clear();
        decision.counts.clear();
        // A review carries the rewrites it would forward with once approved.
        let rewrites = |v: Verdict| matches!(v, Verdict::Constrain | Verdict::Review);
        for d in &each {
            for m in &d.matched_rules {
                if !decision.matched_rules.contains(m) {
                    decision.matched_rules.push(m.clone());
                }
            }
            if rewrites(decision.verdict) && rewrites(d.verdict) {
                for r in &d.rewrites {
                    if !decision.rewrites.contains(r) {
                        decision.rewrites.push(r.clone());
                    }
                }
            }
            for l in &d.labels {
                if !decision.labels.contains(l) {
                    decision.labels.push(l.clone());
                }
            }
            decision.counts.extend(d.counts.iter().cloned());
            decision.retain = effects::larger(decision.retain, d.retain);
        }
        Decided {
            decision,
            index,
            each,
        }
    }

    /// Decide one action as of `now` (rate limits refill against this clock; tests and cases advance it).
    /// A DNS query (scheme `dns`) is decided as docs/policy.md describes (see [`Policy::evaluate_dns`]).
    pub fn evaluate_at(&self, action: &Action, now: Instant) -> Decision {
        self.evaluate_with(action, now, Tokens::Take)
    }

    fn evaluate_with(&self, action: &Action, now: Instant, tokens: Tokens) -> Decision {
        if let Some(decision) = self.profile_refusal(action) {
            return decision;
        }
        if action.transport.scheme == crate::model::Scheme::Dns {
            return self.evaluate_dns(action, now);
        }
        let phase = action.phase();
        let cx = Ctx::new(action, &self.detectors);
        let indexed: &[usize] = cx
            .host
            .as_deref()
            .and_then(|h| self.by_host.get(h))
            .map_or(&[], Vec::as_slice);
        let mut matched: Vec<usize> = Vec::new();
        let (mut i, mut j) = (0, 0);
        loop {
            let next = match (indexed.get(i), self.unindexed.get(j)) {
                (Some(&a), Some(&b)) if a < b => {
                    i += 1;
                    a
                }
                (Some(&a), Some(&b)) if a == b => {
                    i += 1;
                    j += 1;
                    a
                }
                (_, Some(&b)) => {
                    j += 1;
                    b
                }
                (Some(&a), None) => {
                    i += 1;
                    a
                }
                (None, None) => break,
            };
            if self
                .rules
                .get(next)
                .is_some_and(|r| r.on == phase && r.when.eval(&cx))
            {
                matched.push(next);
            }
        }
        self.decide(action, &matched, now, tokens)
    }

    /// A request from a profile restricted to other users (`profiles: NAME: { users, groups }`) is blocked
    /// before any rule is read.
    fn profile_refusal(&self, action: &Action) -> Option<Decision> {
        let profile = action.agent.profile.as_deref()?;
        let access = self.access.get(profile)?;
        if action.phase() != Phase::Request || access.admits(&action.agent) {
            return None;
        }
        let mut decision = self.decision(Verdict::Block, Reason::UserNotAllowed);
        decision.message = Some(USER_NOT_ALLOWED_MESSAGE.to_owned());
        Some(decision)
    }

    /// A decision with nothing but a verdict and a reason, under this policy's mode and hash.
    fn decision(&self, verdict: Verdict, reason: Reason) -> Decision {
        Decision::bare(verdict, reason, self.mode, self.hash.clone())
    }

    fn decide(&self, action: &Action, matched: &[usize], now: Instant, tokens: Tokens) -> Decision {
        // What the agent sends is decided by the policy's default when no rule matches; what comes back (a proposal,
        // a response) passes unless a rule says otherwise.
        let default = match action.phase() {
            Phase::Request => self.default,
            Phase::Proposal | Phase::Response => Verdict::Allow,
        };
        let mut decision = self.decision(default, Reason::Default);
        let rules: Vec<(usize, &Rule)> = matched
            .iter()
            .filter_map(|&i| self.rules.get(i).map(|r| (i, r)))
            .collect();
        decision.matched_rules = rules.iter().map(|(_, r)| r.id.clone()).collect();
        // What a match leaves on the session, and whether the exchange is kept, whatever the verdict.
        for (_, rule) in &rules {
            for label in &rule.effects.labels {
                if !decision.labels.contains(label) {
                    decision.labels.push(label.clone());
                }
            }
            decision.counts.extend(rule.effects.count_adds(action));
            decision.retain = effects::larger(decision.retain, rule.effects.retain);
        }
        if rules.is_empty() {
            if default == Verdict::Block {
                decision.message = Some(
                    self.default_message
                        .clone()
                        .unwrap_or_else(|| DEFAULT_BLOCK_MESSAGE.to_owned()),
                );
            }
            return decision;
        }
        // Every matching rate-limited rule takes a token, so each limit counts every request it saw.
        let mut limited: Option<&Rule> = None;
        for (i, rule) in &rules {
            if let Some(limit) = &rule.rate_limit {
                if !self.limiter.admit(*i, limit, action, now, tokens) && limited.is_none() {
                    limited = Some(rule);
                }
            }
        }
        if let Some(rule) = limited {
            decision.verdict = Verdict::Block;
            decision.deciding_rule = Some(rule.id.clone());
            decision.reason = Reason::RateLimited;
            decision.message = Some(
                rule.message
                    .clone()
                    .unwrap_or_else(|| RATE_LIMIT_MESSAGE.to_owned()),
            );
            return decision;
        }
        let verdict = rules
            .iter()
            .map(|(_, r)| r.verdict)
            .max()
            .unwrap_or(default);
        let deciding = rules
            .iter()
            .find(|(_, r)| r.verdict == verdict)
            .map(|(_, r)| *r);
        decision.verdict = verdict;
        decision.reason = Reason::Rule;
        decision.deciding_rule = deciding.map(|r| r.id.clone());
        decision.message = deciding.and_then(|r| r.message.clone());
        decision.review = deciding.and_then(|r| r.effects.review);
        let constrained = rules.iter().any(|(_, r)| r.verdict == Verdict::Constrain);
        let rewrites_apply =
            verdict == Verdict::Constrain || (verdict == Verdict::Review && constrained);
        if rewrites_apply && action.phase() == Phase::Request && action.http.is_none() {
            // Raw TCP (and anything else without an HTTP part) has nothing a rewrite could change.
            decision.verdict = Verdict::Block;
            decision.reason = Reason::Unrewritable;
            decision.message = Some(UNREWRITABLE_MESSAGE.to_owned());
            decision.review = None;
            return decision;
        }
        if rewrites_apply {
            decision.rewrites = rules
                .iter()
                .filter(|(_, r)| r.verdict == Verdict::Constrain)
                .flat_map(|(_, r)| {
                    r.rewrites.iter().map(|rw| PlannedRewrite {
                        rule: r.id.clone(),
                        rewrite: rw.clone(),
                    })
                })
                .collect();
        }
        decision
    }

    /// Whether any rule decides `phase` (a rule's `phase:`): without one, proposals and responses are not read at all
    /// and stream through as they come.
    pub fn has_rules_for(&self, phase: Phase) -> bool {
        self.rules.iter().any(|r| r.on == phase)
    }

    /// Whether any rule of `phase` retains what it matches (`retain:`): a proposal's exchange is kept aside while its
    /// response streams, in case one of its proposals is retained.
    pub fn retains_in(&self, phase: Phase) -> bool {
        self.rules
            .iter()
            .any(|r| r.on == phase && r.effects.retain.is_some())
    }

    /// Whether a `phase: response` rule could match the response whose head `action` carries (its `response` has
    /// status, headers and content type, no body): rules whose other conditions already fail are left out, so only
    /// a response some rule may decide is read whole or event by event.
    pub fn response_may_match(&self, action: &Action) -> bool {
        let cx = Ctx::new(action, &self.detectors);
        self.rules
            .iter()
            .any(|r| r.on == Phase::Response && r.when.on_head(&cx) != Some(false))
    }

    /// Whether a `phase: response` rule reads a response body's parsed JSON (a `response.json` condition, a `count:`
    /// path). Without one, a body's JSON is parsed only for what else needs it (escapes a detector must see through,
    /// a rewrite, a block), see `proxy::response`.
    pub fn response_reads_json(&self) -> bool {
        self.rules.iter().any(|r| {
            r.on == Phase::Response && (r.when.reads_response_json() || r.effects.reads_json())
        })
    }

    /// How a connection the upstream agreed to upgrade may be relayed under `decision`: as its deciding rule's
    /// `relay:` says (`inspect` unless the rule says `opaque`); the default decision always inspects.
    pub fn relay(&self, decision: &Decision) -> Relay {
        decision
            .deciding_rule
            .as_deref()
            .and_then(|id| self.rules.iter().find(|r| r.id == id))
            .map_or(Relay::Inspect, |r| r.relay)
    }

    /// Hex SHA-256 of the policy source.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The largest request body the proxy buffers for inspection; larger bodies are refused.
    pub fn max_body_bytes(&self) -> u64 {
        self.max_body_bytes
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// What redaction puts in place of a detected secret; `{detector}` stands for the detector's name.
    pub fn redaction_marker(&self) -> &str {
        &self.redaction_marker
    }

    /// The verdict when no rule matches.
    pub fn default_verdict(&self) -> Verdict {
        self.default
    }

    /// How the DNS stage answers a query this policy refuses (`dns.refused_answer`).
    pub fn dns_refused_answer(&self) -> RefusedAnswer {
        self.dns.refused_answer
    }

    /// Built-in and policy-defined detectors, for redaction.
    pub fn detectors(&self) -> &detect::Detectors {
        &self.detectors
    }

    /// The names of [`Policy::detectors`], in order.
    pub fn detector_names(&self) -> &[String] {
        &self.detector_names
    }

    /// Profile names declared under `profiles:`.
    pub fn profiles(&self) -> &[String] {
        &self.profiles
    }

    /// Whether the profile is open to an agent acting for this user (`profiles: NAME: { users, groups }`); a
    /// profile the policy does not restrict is open to everyone.
    pub fn profile_admits(&self, agent: &crate::model::Agent) -> bool {
        agent
            .profile
            .as_deref()
            .and_then(|p| self.access.get(p))
            .is_none_or(|a| a.admits(agent))
    }

    /// The header names (lower-case, `cookie` left out) and query parameter names some condition reads: the fields
    /// whose several values make a request read several ways (`proxy::readings`). Cookie lines are one list of
    /// cookies (RFC 9113 §8.2.3 lets an HTTP/2 client split them), not rivals.
    pub fn read_fields(
        &self,
    ) -> (
        impl Iterator<Item = &str>,
        impl Iterator<Item = &str> + Clone,
    ) {
        (
            self.read_headers
                .iter()
                .map(String::as_str)
                .filter(|name| *name != "cookie"),
            self.read_queries.iter().map(String::as_str),
        )
    }

    /// Whether a condition or a JSON rewrite of a rule deciding requests selects, in `action`, a JSON member that
    /// has a twin named alike once folded (`{"command":…,"Command":…}` for `$.command`; `{"limit":5,"LIMIT":1e9}`
    /// for a `json_cap` on `$.limit`): a case-insensitive decoder may act on the other. The proxy refuses such a
    /// request, rather than decide it under each member. Members no rule reads may be named alike: they are data.
    pub fn reads_twin_member(&self, action: &Action) -> bool {
        let body = action.http.as_ref().and_then(|h| h.json.as_ref());
        let rewrites_twin = |r: &Rule| {
            body.is_some_and(|json| {
                r.rewrites.iter().any(|w| match w {
                    Rewrite::JsonSet { path, .. }
                    | Rewrite::JsonRemove { path }
                    | Rewrite::JsonCap { path, .. }
                    | Rewrite::JsonTruncate { path, .. } => path.reads_twins(json),
                    _ => false,
                })
            })
        };
        self.rules.iter().any(|r| {
            r.on == Phase::Request && (r.when.reads_twin_member(action) || rewrites_twin(r))
        })
    }

    /// Every (counter, window in seconds) a `session.count` condition reads; `None` is the session's total.
    pub fn session_counters(&self) -> &[(String, Option<u64>)] {
        &self.session_counters
    }

    /// Rule ids in file order.
    pub fn rule_ids(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.id.as_str())
    }

    /// A rule's description, when it has one.
    pub fn rule_description(&self, id: &str) -> Option<&str> {
        self.rules
            .iter()
            .find(|r| r.id == id)
            .and_then(|r| r.description.as_deref())
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Compilation

const TOP_KEYS: &[&str] = &[
    "version",
    "description",
    "default",
    "default_message",
    "mode",
    "max_body_bytes",
    "redaction_marker",
    "profiles",
    "detectors",
    "exempt",
    "dns",
    "rules",
];
const RULE_KEYS: &[&str] = &[
    "id",
    "description",
    "when",
    "verdict",
    "message",
    "constrain",
    "rate_limit",
    "relay",
    "phase",
    "review",
    "label",
    "count",
    "retain",
];
const CONSTRAIN_KEYS: &[&str] = &[
    "redact",
    "json_set",
    "json_remove",
    "json_cap",
    "json_truncate",
    "header_set",
    "header_remove",
    "drop_tools",
];

/// `exempt:` — per detector, globs of matched values that are no findings (`email: ["noreply@*"]`), compared
/// lower-case.
fn exempt_values(v: &Node, detectors: &mut detect::Detectors) -> CResult<()> {
    let Kind::Map(entries) = &v.kind else {
        if matches!(v.kind, Kind::Null) {
            return Ok(());
        }
        return fault(
            v.loc,
            "expected `exempt` to map detector names to lists of values, e.g. `email: [\"noreply@*\"]`",
        );
    };
    for (k, list) in entries {
        let name = string(k, "a detector name")?;
        let globs = cond::strings(list)?
            .into_iter()
            .map(|(loc, s)| {
                crate::glob::Glob::plain(&s.to_ascii_lowercase())
                    .or_else(|e| fault(loc, format!("bad glob `{s}`: {e}")))
            })
            .collect::<CResult<Vec<_>>>()?;
        detectors
            .exempt(&name, globs)
            .or_else(|name| fault(k.loc, cond::unknown_detector(&name, detectors)))?;
    }
    Ok(())
}

/// A mapping's entries keyed by their string key, rejecting unknown and non-string keys.
fn fields<'n>(
    node: &'n Node,
    allowed: &[&str],
    what: &str,
) -> CResult<HashMap<String, (&'n Node, &'n Node)>> {
    let Some(entries) = node.as_map() else {
        return fault(
            node.loc,
            format!("expected {what} (a mapping), found {}", node.type_name()),
        );
    };
    let mut out = HashMap::new();
    for (k, v) in entries {
        let Kind::Str(key) = &k.kind else {
            return fault(k.loc, format!("expected a string key in {what}"));
        };
        if !allowed.contains(&key.as_str()) {
            return fault(
                k.loc,
                format!(
                    "unknown key `{key}` in {what}, expected one of {}",
                    allowed.join(", ")
                ),
            );
        }
        if out.insert(key.clone(), (k, v)).is_some() {
            return fault(k.loc, format!("duplicate key `{key}` in {what}"));
        }
    }
    Ok(out)
}

fn string(v: &Node, what: &str) -> CResult<String> {
    match &v.kind {
        Kind::Str(s) => Ok(s.clone()),
        _ => fault(
            v.loc,
            format!("expected {what} (a string), found {}", v.type_name()),
        ),
    }
}

fn verdict(v: &Node) -> CResult<Verdict> {
    match v.scalar_text().as_deref() {
        Some("allow") => Ok(Verdict::Allow),
        Some("log") => Ok(Verdict::Log),
        Some("constrain") => Ok(Verdict::Constrain),
        Some("review") => Ok(Verdict::Review),
        Some("block") => Ok(Verdict::Block),
        _ => fault(
            v.loc,
            "unknown verdict, expected allow, log, constrain, review or block",
        ),
    }
}

fn compile(root: &Node, hash: String) -> CResult<Policy> {
    let top = fields(root, TOP_KEYS, "the policy")?;
    match top.get("version") {
        Some((_, v)) if matches!(v.kind, Kind::Int(1)) => {}
        Some((_, v)) => return fault(v.loc, "unsupported version, expected `version: 1`"),
        None => {
            return fault(
                root.loc,
                "missing `version`, expected `version: 1` at the top",
            )
        }
    }
    let default = match top.get("default") {
        Some((_, v)) => {
            let d = verdict(v)?;
            if matches!(d, Verdict::Constrain | Verdict::Review) {
                return fault(v.loc, format!("`default` cannot be {} (it has no rule to say how), expected allow, log or block", d.as_str()));
            }
            d
        }
        None => {
            return fault(
                root.loc,
                "missing `default`, expected e.g. `default: block`",
            )
        }
    };
    let mode = match top.get("mode") {
        None => Mode::Enforce,
        Some((_, v)) => match v.scalar_text().as_deref() {
            Some("enforce") => Mode::Enforce,
            Some("shadow") => Mode::Shadow,
            _ => return fault(v.loc, "unknown mode, expected enforce or shadow"),
        },
    };
    let default_message = top
        .get("default_message")
        .map(|(_, v)| string(v, "a message"))
        .transpose()?;
    if let Some((_, v)) = top.get("description") {
        string(v, "a description")?;
    }
    let max_body_bytes = top
        .get("max_body_bytes")
        .map(|(_, v)| cond::size(v))
        .transpose()?
        .unwrap_or(DEFAULT_MAX_BODY_BYTES);
    let redaction_marker = match top.get("redaction_marker") {
        Some((_, v)) => {
            let marker = string(v, "a redaction marker")?;
            if marker.is_empty() {
                return fault(v.loc, "expected a non-empty redaction marker");
            }
            marker
        }
        None => DEFAULT_REDACTION_MARKER.to_string(),
    };

    let mut profiles = Vec::new();
    let mut access = HashMap::new();
    if let Some((_, v)) = top.get("profiles") {
        match &v.kind {
            Kind::Null => {}
            Kind::Map(entries) => {
                for (k, body) in entries {
                    let name = string(k, "a profile name")?;
                    let f = fields(
                        body,
                        &["description", "users", "groups"],
                        &format!("profile `{name}`"),
                    )?;
                    let names = |key: &str| -> CResult<Vec<String>> {
                        f.get(key).map_or(Ok(Vec::new()), |(_, v)| {
                            Ok(cond::strings(v)?.into_iter().map(|(_, s)| s).collect())
                        })
                    };
                    let a = ProfileAccess {
                        users: names("users")?,
                        groups: names("groups")?,
                    };
                    if !a.is_open() {
                        access.insert(name.clone(), a);
                    }
                    profiles.push(name);
                }
            }
            _ => {
                return fault(
                    v.loc,
                    "expected `profiles` to be a mapping of profile names",
                )
            }
        }
    }

    let mut detectors = detect::Detectors::builtin();
    if let Some((_, v)) = top.get("detectors") {
        match &v.kind {
            Kind::Null => {}
            Kind::Map(entries) => {
                for (k, body) in entries {
                    let name = string(k, "a detector name")?;
                    let what = format!("detector `{name}`");
                    let f = fields(body, &["regex", "keywords", "validator", "provider"], &what)?;
                    let Some((_, re)) = f.get("regex") else {
                        return fault(
                            body.loc,
                            format!("{what} has no `regex`, expected `regex: \"...\"`"),
                        );
                    };
                    let re_src = string(re, "a regex")?;
                    let keywords = match f.get("keywords") {
                        Some((_, kw)) => cond::strings(kw)?.into_iter().map(|(_, s)| s).collect(),
                        None => Vec::new(),
                    };
                    let validator = match f.get("validator") {
                        Some((_, val)) => Some(
                            detect::Validator::parse(&string(val, "a validator")?)
                                .or_else(|e| fault(val.loc, e.to_string()))?,
                        ),
                        None => None,
                    };
                    let provider = match f.get("provider") {
                        Some((_, p)) => Some(string(p, "a provider name")?),
                        None => None,
                    };
                    detectors
                        .add(&name, &re_src, keywords, validator, provider)
                        .or_else(|e| match e {
                            detect::DetectError::Regex(e) => fault(
                                re.loc,
                                format!("bad regex: {}", cond::one_line(&e.to_string())),
                            ),
                            other => fault(k.loc, other.to_string()),
                        })?;
                }
            }
            _ => {
                return fault(
                    v.loc,
                    "expected `detectors` to be a mapping of detector names",
                )
            }
        }
    }

    if let Some((_, v)) = top.get("exempt") {
        exempt_values(v, &mut detectors)?;
    }

    let dns = top
        .get("dns")
        .map(|(_, v)| dns::compile_settings(v))
        .transpose()?
        .unwrap_or_default();

    let scope = Scope {
        detectors: &detectors,
        profiles: &profiles,
        phase: Phase::Request,
    };
    let mut rules: Vec<Rule> = Vec::new();
    let mut seen: HashMap<String, Loc> = HashMap::new();
    if let Some((_, v)) = top.get("rules") {
        let items: &[Node] = match &v.kind {
            Kind::Seq(items) => items,
            Kind::Null => &[],
            _ => return fault(v.loc, "expected `rules` to be a list of rules"),
        };
        // Rules are independent: every broken one is reported, not just the first.
        let mut faults = Vec::new();
        for item in items {
            let rule = match compile_rule(item, &scope) {
                Ok(rule) => rule,
                Err(f) => {
                    faults.push(f);
                    continue;
                }
            };
            if let Some(first) = seen.get(&rule.id) {
                faults.push(Fault {
                    loc: item.loc,
                    message: format!(
                        "duplicate rule id `{}` (first defined at line {}), expected unique ids",
                        rule.id, first.line
                    ),
                    more: Vec::new(),
                });
                continue;
            }
            seen.insert(rule.id.clone(), item.loc);
            rules.push(rule);
        }
        if !faults.is_empty() {
            let mut first = faults.remove(0);
            first.more = faults;
            return Err(first);
        }
    }

    let mut session_counters = Vec::new();
    let (mut read_headers, mut read_queries) = (Vec::new(), Vec::new());
    for rule in &rules {
        rule.when.session_counters(&mut session_counters);
        rule.when.field_names(&mut read_headers, &mut read_queries);
    }
    let mut by_host: HashMap<String, Vec<usize>> = HashMap::new();
    let mut unindexed = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        match rule.when.exact_hosts() {
            Some(hosts) => {
                for h in hosts {
                    let list = by_host.entry(h).or_default();
                    if list.last() != Some(&i) {
                        list.push(i);
                    }
                }
            }
            None => unindexed.push(i),
        }
    }

    Ok(Policy {
        hash,
        mode,
        default,
        default_message,
        max_body_bytes,
        redaction_marker,
        detector_names: detectors.names().map(String::from).collect(),
        detectors,
        profiles,
        access,
        session_counters,
        read_headers,
        read_queries,
        rules,
        dns,
        by_host,
        unindexed,
        limiter: ratelimit::Limiter::default(),
    })
}

fn compile_rule(node: &Node, scope: &Scope) -> CResult<Rule> {
    let f = fields(node, RULE_KEYS, "a rule")?;
    let Some((_, id_node)) = f.get("id") else {
        return fault(node.loc, "rule has no `id`, expected `id: some-name`");
    };
    let id = id_node
        .scalar_text()
        .filter(|s| !s.trim().is_empty())
        .map_or_else(|| fault(id_node.loc, "expected a non-empty rule id"), Ok)?;
    let what = format!("rule `{id}`");
    let Some((_, v)) = f.get("verdict") else {
        return fault(
            node.loc,
            format!("{what} has no `verdict`, expected allow, log, constrain or block"),
        );
    };
    let verdict = verdict(v)?;
    let effects = effects::compile(|k| f.get(k).copied(), verdict, &what)?;
    let on = match f.get("phase") {
        None => Phase::Request,
        Some((_, p)) => match p.scalar_text().as_deref() {
            Some("request") => Phase::Request,
            Some("proposal") => Phase::Proposal,
            Some("response") => Phase::Response,
            _ => {
                return fault(
                    p.loc,
                    "unknown `phase`, expected request, proposal or response",
                )
            }
        },
    };
    let scope = &Scope {
        phase: on,
        ..*scope
    };
    let when = match f.get("when") {
        Some((_, w)) => cond::compile_when(w, scope)?,
        None => Cond::All(Vec::new()),
    };
    let message = f
        .get("message")
        .map(|(_, m)| string(m, "a message"))
        .transpose()?;
    let description = f
        .get("description")
        .map(|(_, d)| string(d, "a description"))
        .transpose()?;
    let rewrites = match (f.get("constrain"), verdict) {
        (Some((_, c)), Verdict::Constrain) => compile_rewrites(c, scope)?,
        (None, Verdict::Constrain) => {
            return fault(
                v.loc,
                format!("{what} has verdict constrain but no `constrain:` rewrites, expected e.g. `constrain: {{ redact: [email] }}`"),
            )
        }
        (Some((k, _)), _) => {
            return fault(k.loc, format!("{what} has `constrain:` but its verdict is not constrain"))
        }
        (None, _) => Vec::new(),
    };
    let rate_limit = f
        .get("rate_limit")
        .map(|(_, r)| compile_rate_limit(r))
        .transpose()?;
    let relay = match f.get("relay") {
        None => Relay::Inspect,
        Some((_, r)) => match (r.scalar_text().as_deref(), verdict) {
            (Some("inspect"), _) => Relay::Inspect,
            (Some("opaque"), Verdict::Allow | Verdict::Log) => Relay::Opaque,
            (Some("opaque"), _) => {
                return fault(
                    r.loc,
                    format!("{what} relays opaque but its verdict is not allow or log: only a rule that lets a connection through can let it through unread"),
                )
            }
            _ => return fault(r.loc, "unknown relay, expected inspect or opaque"),
        },
    };
    Ok(Rule {
        id,
        description,
        when,
        verdict,
        message,
        rewrites,
        rate_limit,
        relay,
        on,
        effects,
    })
}

fn compile_rewrites(node: &Node, scope: &Scope) -> CResult<Vec<Rewrite>> {
    let Some(entries) = node.as_map() else {
        return fault(
            node.loc,
            format!(
                "expected a mapping of rewrites ({})",
                CONSTRAIN_KEYS.join(", ")
            ),
        );
    };
    let mut out = Vec::new();
    for (k, v) in entries {
        let key = k.scalar_text().unwrap_or_default();
        let pairs = |v: &Node| -> CResult<Vec<(Loc, String, Node)>> {
            let Some(m) = v.as_map() else {
                return fault(v.loc, format!("expected a mapping under `{key}`"));
            };
            m.iter()
                .map(|(pk, pv)| {
                    let name = pk
                        .scalar_text()
                        .map_or_else(|| fault(pk.loc, "expected a string key"), Ok)?;
                    Ok((pk.loc, name, pv.clone()))
                })
                .collect()
        };
        match key.as_str() {
            "redact" => {
                let mut names = Vec::new();
                for (loc, name) in cond::strings(v)? {
                    if !scope.detectors.contains(&name) {
                        return fault(loc, cond::unknown_detector(&name, scope.detectors));
                    }
                    names.push(name);
                }
                out.push(Rewrite::Redact { detectors: names });
            }
            "json_set" => {
                for (loc, path, value) in pairs(v)? {
                    out.push(Rewrite::JsonSet {
                        path: cond::json_path(loc, &path)?,
                        value: value.to_json(),
                    });
                }
            }
            "json_remove" => {
                for (loc, path) in cond::strings(v)? {
                    out.push(Rewrite::JsonRemove {
                        path: cond::json_path(loc, &path)?,
                    });
                }
            }
            "json_cap" => {
                for (loc, path, value) in pairs(v)? {
                    let path = cond::json_path(loc, &path)?;
                    let max = match value.kind {
                        Kind::Int(i) => i as f64,
                        Kind::Float(f) => f,
                        _ => {
                            return fault(
                                value.loc,
                                format!("expected a number to cap `{path}` at"),
                            )
                        }
                    };
                    out.push(Rewrite::JsonCap { path, max });
                }
            }
            "json_truncate" => {
                for (loc, path, value) in pairs(v)? {
                    let path = cond::json_path(loc, &path)?;
                    let Kind::Int(n) = value.kind else {
                        return fault(value.loc, "expected the number of elements to keep");
                    };
                    let Ok(max) = usize::try_from(n) else {
                        return fault(value.loc, "expected a non-negative number of elements");
                    };
                    out.push(Rewrite::JsonTruncate { path, max });
                }
            }
            "header_set" if scope.phase != Phase::Request => {
                return fault(k.loc, "header rewrites apply to requests only")
            }
            "header_remove" if scope.phase != Phase::Request => {
                return fault(k.loc, "header rewrites apply to requests only")
            }
            "drop_tools" if scope.phase != Phase::Request => {
                return fault(
                    k.loc,
                    "`drop_tools` applies to requests (the tools an LLM call declares) only",
                )
            }
            "header_set" => {
                for (loc, name, value) in pairs(v)? {
                    let name = header_name(loc, &name)?;
                    let Some(text) = value.scalar_text() else {
                        return fault(value.loc, "expected a header value string");
                    };
                    let Ok(value) = http::HeaderValue::from_str(&text) else {
                        return fault(
                            loc,
                            "header values must be visible ASCII, spaces and tabs (RFC 9110 §5.5)",
                        );
                    };
                    out.push(Rewrite::HeaderSet { name, value });
                }
            }
            "header_remove" => {
                for (loc, name) in cond::strings(v)? {
                    out.push(Rewrite::HeaderRemove {
                        name: header_name(loc, &name)?,
                    });
                }
            }
            "drop_tools" => {
                let mut globs = Vec::new();
                for (loc, g) in cond::strings(v)? {
                    let glob = crate::glob::NameGlob::new(&g)
                        .or_else(|e| fault(loc, format!("bad glob `{g}`: {e}")))?;
                    globs.push(glob);
                }
                out.push(Rewrite::DropTools { globs });
            }
            _ => {
                return fault(
                    k.loc,
                    format!(
                        "unknown rewrite `{key}`, expected one of {}",
                        CONSTRAIN_KEYS.join(", ")
                    ),
                )
            }
        }
    }
    if out.is_empty() {
        return fault(
            node.loc,
            format!(
                "no rewrites, expected at least one of {}",
                CONSTRAIN_KEYS.join(", ")
            ),
        );
    }
    Ok(out)
}

fn header_name(loc: Loc, name: &str) -> CResult<http::HeaderName> {
    // RFC 9110 §5.1: a token; stored lower-cased, as HTTP/2 sends it.
    http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .or_else(|_| fault(loc, format!("`{name}` is not a valid header name")))
}

fn compile_rate_limit(node: &Node) -> CResult<ratelimit::RateLimit> {
    let f = fields(node, &["requests", "per", "by"], "a rate limit")?;
    let requests = match f.get("requests") {
        Some((_, v)) => match v.kind {
            Kind::Int(n) if n > 0 && n <= i64::from(u32::MAX) => n as u32,
            _ => return fault(v.loc, "expected a positive number of requests"),
        },
        None => {
            return fault(
                node.loc,
                "rate limit has no `requests`, expected e.g. `requests: 10`",
            )
        }
    };
    let per = match f.get("per") {
        Some((_, v)) => v
            .scalar_text()
            .and_then(|s| ratelimit::parse_duration(&s))
            .map_or_else(
                || fault(v.loc, "expected a duration such as 30s, 1m or 1h"),
                Ok,
            )?,
        None => return fault(node.loc, "rate limit has no `per`, expected e.g. `per: 1m`"),
    };
    let by = match f.get("by") {
        Some((_, v)) => cond::strings(v)?
            .into_iter()
            .map(|(loc, s)| {
                ratelimit::By::parse(&s).map_or_else(
                    || fault(loc, format!("unknown rate-limit key `{s}`, expected profile, host, rule or tool")),
                    Ok,
                )
            })
            .collect::<CResult<_>>()?,
        None => Vec::new(),
    };
    Ok(ratelimit::RateLimit { requests, per, by })
}
