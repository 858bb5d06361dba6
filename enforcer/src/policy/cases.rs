//! Policy test cases (`policies/NAME.cases.yaml`): an Action in YAML plus the expected decision. Shared by
//! `enforcer policy test` and the test suite, so both run exactly the same code. Each case gets a freshly compiled
//! policy (independent rate-limit state), a simulated clock for `repeat` and `then` steps, and one simulated agent
//! session kept by the daemon's own session registry: what a step's decision labels or counts is what later steps'
//! `session.*` conditions read, exactly as in the proxy. A `then` step may name its own Action (the request after
//! the response, the second tool call).

use std::path::Path;
use std::time::Instant;

use serde::Deserialize;

use std::collections::HashMap;

use super::{read_source, yaml, Policy, PolicyError};
use crate::model::{Action, Decision, PlannedRewrite, Reason, Shared, Verdict};
use crate::session::{SessionLimits, Sessions};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CasesFile {
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub action: Action,
    /// Evaluate the action this many times at the same instant; `expect` applies to the last decision.
    #[serde(default = "one")]
    pub repeat: u32,
    pub expect: Expect,
    /// Further steps after the first: wait (simulated), evaluate the same action again, check.
    #[serde(default)]
    pub then: Vec<Step>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// A duration such as `6s` or `1m`, added to the simulated clock before evaluating.
    #[serde(default)]
    pub wait: Option<String>,
    /// The Action of this step (and of the steps after it that name none); default: the case's.
    #[serde(default)]
    pub action: Option<Action>,
    #[serde(default = "one")]
    pub repeat: u32,
    pub expect: Expect,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    pub verdict: Verdict,
    /// The deciding rule id.
    #[serde(default)]
    pub rule: Option<String>,
    #[serde(default)]
    pub reason: Option<Reason>,
    /// Every matching rule id, in file order.
    #[serde(default)]
    pub matched: Option<Vec<String>>,
    #[serde(default)]
    pub rewrites: Option<Vec<PlannedRewrite>>,
    #[serde(default)]
    pub message: Option<String>,
    /// The labels the decision puts on the session, in order.
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    /// Whether the decision keeps the exchange as a trace (`retain:` on a matching rule).
    #[serde(default)]
    pub retain: Option<bool>,
    /// A review's timeout in seconds and fallback (`{ timeout_secs: 300, fallback: block }`).
    #[serde(default)]
    pub review: Option<crate::model::ReviewSpec>,
}

/// The result of one case.
#[derive(Debug)]
pub struct Outcome {
    pub name: String,
    /// What did not match, one line each; empty when the case passed.
    pub failures: Vec<String>,
    pub decision: Decision,
}

impl Outcome {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Parse a cases file.
pub fn parse(src: &str, origin: &str) -> Result<CasesFile, PolicyError> {
    if src.len() > yaml::MAX_SOURCE_BYTES {
        return Err(PolicyError::TooLarge {
            origin: origin.to_owned(),
            max: yaml::MAX_SOURCE_BYTES,
        });
    }
    serde_saphyr::from_str_with_options(src, yaml::options()).map_err(|e| {
        let e = yaml::yaml_error(&e);
        PolicyError::Invalid {
            origin: origin.to_owned(),
            line: e.loc.line,
            column: e.loc.column,
            message: e.message,
            more: Vec::new(),
        }
    })
}

/// The default cases file of a policy: `NAME.yaml` → `NAME.cases.yaml`.
pub fn default_cases_path(policy: &Path) -> std::path::PathBuf {
    let name = policy
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name
        .strip_suffix(".yaml")
        .or_else(|| name.strip_suffix(".yml"))
        .unwrap_or(&name);
    policy.with_file_name(format!("{stem}.cases.yaml"))
}

/// Load a policy and its cases and run every case.
pub fn run_files(policy: &Path, cases: &Path) -> Result<Vec<Outcome>, PolicyError> {
    let src = read_source(policy)?;
    let origin = policy.display().to_string();
    Policy::from_yaml(&src, &origin)?;
    let file = parse(&read_source(cases)?, &cases.display().to_string())?;
    run(&src, &origin, &file)
}

/// Run every case of `file` against the policy source `src`.
pub fn run(src: &str, origin: &str, file: &CasesFile) -> Result<Vec<Outcome>, PolicyError> {
    let mut out = Vec::with_capacity(file.cases.len());
    for case in &file.cases {
        let policy = Policy::from_yaml(src, origin)?;
        let session = SimulatedSession::new();
        let mut action = case.action.clone();
        normalize(&mut action);
        let mut now = Instant::now();
        let mut decision = session.evaluate_n(&policy, &action, case.repeat, now);
        let mut failures = check(&case.expect, &decision, "");
        for (n, step) in case.then.iter().enumerate() {
            if let Some(a) = &step.action {
                action = a.clone();
                normalize(&mut action);
            }
            if let Some(w) = &step.wait {
                match super::ratelimit::parse_duration(w) {
                    Some(d) => now += d,
                    None => {
                        failures.push(format!("then[{n}]: bad wait `{w}`, expected e.g. 6s or 1m"))
                    }
                }
            }
            decision = session.evaluate_n(&policy, &action, step.repeat, now);
            failures.extend(check(&step.expect, &decision, &format!("then[{n}]: ")));
        }
        out.push(Outcome {
            name: case.name.clone(),
            failures,
            decision,
        });
    }
    Ok(out)
}

/// The one agent run a case's steps belong to, in a session registry of its own.
struct SimulatedSession(Sessions);

/// The cgroup a case's agent is taken to run in when its Action names none.
const CASE_CGROUP: &str = "/policy-case";

impl SimulatedSession {
    fn new() -> SimulatedSession {
        SimulatedSession(Sessions::new(SessionLimits::default(), HashMap::new()))
    }

    /// Decide `action` `n` times at `now` as the proxy does: the session's state filled in (unless the Action
    /// states it), decided, and what the decision leaves noted on the session. Returns the last decision.
    fn evaluate_n(&self, policy: &Policy, action: &Action, n: u32, now: Instant) -> Decision {
        let mut last = None;
        for _ in 0..n.max(1) {
            let mut a = action.clone();
            if a.agent.cgroup.is_none() {
                a.agent.cgroup = Some(CASE_CGROUP.into());
            }
            self.0.identify(&mut a.agent);
            match &action.session {
                Some(stated) => self.0.seed_at(&a.agent, stated, now),
                None => {
                    self.0
                        .fill_at(std::slice::from_mut(&mut a), policy.session_counters(), now)
                }
            }
            let d = policy.evaluate_at(&a, now);
            self.0.note_at(&a.agent, &d, &a, now);
            last = Some(d);
        }
        last.unwrap_or_else(|| policy.evaluate_at(action, now))
    }
}

fn check(want: &Expect, got: &Decision, prefix: &str) -> Vec<String> {
    let mut f = Vec::new();
    if want.verdict != got.verdict {
        f.push(format!(
            "{prefix}verdict: expected {}, got {}",
            want.verdict.as_str(),
            got.verdict.as_str()
        ));
    }
    if let Some(rule) = &want.rule {
        if got.deciding_rule.as_deref() != Some(rule.as_str()) {
            f.push(format!(
                "{prefix}deciding rule: expected {rule}, got {}",
                got.deciding_rule.as_deref().unwrap_or("(default)")
            ));
        }
    }
    if let Some(reason) = want.reason {
        if reason != got.reason {
            f.push(format!(
                "{prefix}reason: expected {reason:?}, got {:?}",
                got.reason
            ));
        }
    }
    if let Some(matched) = &want.matched {
        if *matched != got.matched_rules {
            f.push(format!(
                "{prefix}matched rules: expected [{}], got [{}]",
                matched.join(", "),
                got.matched_rules.join(", ")
            ));
        }
    }
    if let Some(rewrites) = &want.rewrites {
        if *rewrites != got.rewrites {
            f.push(format!(
                "{prefix}rewrites: expected {}, got {}",
                serde_json::to_string(rewrites).unwrap_or_default(),
                serde_json::to_string(&got.rewrites).unwrap_or_default()
            ));
        }
    }
    if let Some(labels) = &want.labels {
        if *labels != got.labels {
            f.push(format!(
                "{prefix}labels: expected [{}], got [{}]",
                labels.join(", "),
                got.labels.join(", ")
            ));
        }
    }
    if let Some(retain) = want.retain {
        if retain != got.retain.is_some() {
            f.push(format!(
                "{prefix}retain: expected {retain}, got {:?}",
                got.retain
            ));
        }
    }
    if want.review.is_some() && want.review != got.review {
        f.push(format!(
            "{prefix}review: expected {:?}, got {:?}",
            want.review, got.review
        ));
    }
    if let Some(message) = &want.message {
        if got.message.as_deref() != Some(message.as_str()) {
            f.push(format!(
                "{prefix}message: expected {message:?}, got {:?}",
                got.message.as_deref().unwrap_or("")
            ));
        }
    }
    f
}

/// Fill what a hand-written Action leaves out, as the inspect stage would: lower-case header names, `json` from a
/// JSON body (or the body from `json`), `body_size` from the body; for a response Action the same of its `response`.
pub fn normalize(action: &mut Action) {
    if let Some(r) = &mut action.response {
        for (k, _) in &mut r.headers.0 {
            k.make_ascii_lowercase();
        }
        complete_body(
            &mut r.body,
            &mut r.json,
            r.content_type.as_deref(),
            &mut r.body_size,
        );
    }
    let Some(http) = action.http.as_deref_mut() else {
        return;
    };
    for (k, _) in &mut http.headers.0 {
        k.make_ascii_lowercase();
    }
    let mut body = std::mem::take(&mut http.body).into_inner();
    let mut json = http.json.take().map(Shared::into_inner);
    complete_body(
        &mut body,
        &mut json,
        http.content_type.as_deref(),
        &mut http.body_size,
    );
    http.body = body.into();
    http.json = json.map(Shared::new);
}

fn complete_body(
    body: &mut String,
    json: &mut Option<serde_json::Value>,
    content_type: Option<&str>,
    size: &mut u64,
) {
    if json.is_none() && !body.is_empty() {
        let looks_json = content_type.is_some_and(|ct| ct.to_ascii_lowercase().contains("json"))
            || body.trim_start().starts_with(['{', '[']);
        if looks_json {
            // A body naming a member twice stays unparsed here, so classification refuses it as the proxy does.
            *json = crate::inspect::read_json(body, crate::inspect::Twins::Exact)
                .ok()
                .flatten();
        }
    } else if body.is_empty() {
        if let Some(j) = json {
            *body = j.to_string();
        }
    }
    if *size == 0 {
        *size = body.len() as u64;
    }
}
