//! Sessions: one agent run — an `enforcer exec` invocation (its own cgroup) or a configured profile cgroup — from
//! its first connection until its cgroup empties. The daemon keeps per-session state that rules read and write:
//! labels (a rule's `label:`), counters (`requests`, `bytes_sent`, `bytes_received`, and a rule's `count:`, each
//! with its history at one-minute resolution for `within:` windows) and the previous tool call; and the identity of
//! the person the agent acts for (registered by `enforcer exec`, or configured per profile). Owns that state and its
//! bounds; knows nothing of how rules are written (the policy reads a [`SessionState`] snapshot) or of sockets.
//!
//! The state lives in the daemon, not in the policy, so a policy reload keeps it. It is bounded: at most
//! [`SessionLimits::max_sessions`] sessions (the least recently active is forgotten first), labels and counters per
//! session, and 24 hours of one-minute counter history.
//!
//! The API every phase calls (request phase today; proposal and response phases the same way):
//!
//! - [`Sessions::identify`] once per connection: fills `Agent::session`, `user`, `groups` from the agent's cgroup;
//! - [`Sessions::fill`] before deciding Actions: puts the session's [`SessionState`] (only the counters and windows
//!   the policy reads, [`crate::policy::Policy::session_counters`]) into each Action;
//! - [`Sessions::note`] after deciding each Action with its own Decision: applies the decision's `labels` and
//!   `counts`, the phase's own counters (`requests` and `bytes_sent` for a request, `bytes_received` for a
//!   response: the body's size) and the previous tool (an MCP `tools/call`, a proposal's tool).

mod watch;

pub mod cli;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::{Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::model::{Action, Agent, Decision, Phase, SessionState, Shared};

pub use watch::{watch, SessionWatch};

/// Minutes of counter history kept (the longest `within:` window).
const HISTORY_MINUTES: u32 = 24 * 60;

/// Bounds on what the registry keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionLimits {
    /// Live sessions kept at once; beyond it the least recently active one is forgotten.
    pub max_sessions: usize,
    /// Labels per session; further labels are not set (and logged).
    pub max_labels: usize,
    /// Counters per session (the three built-in ones included).
    pub max_counters: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            max_sessions: 1024,
            max_labels: 64,
            max_counters: 32,
        }
    }
}

/// The person an agent acts for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Person {
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Group names, primary first.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// How a session came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Registered by `enforcer exec` before it ran its command.
    Exec,
    /// Seen first in traffic from a profile cgroup (configured, or tagged at runtime).
    Cgroup,
}

/// What `enforcer exec` tells the daemon before it runs the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// The exec cgroup, relative to the cgroup root (`/…/enforcer/PROFILE/exec-PID`).
    pub cgroup: String,
    pub profile: String,
    pub person: Person,
}

/// One session as `enforcer session list|show` print it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub id: String,
    pub cgroup: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub person: Option<Person>,
    pub source: Source,
    /// RFC 3339 UTC.
    pub started: String,
    pub idle_secs: u64,
    pub labels: Vec<String>,
    /// Every counter's session total.
    pub counters: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_tool: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("cgroup path {0:?} is not a path below the cgroup root")]
    BadCgroup(String),
}

/// A counter's total and its recent history, one bucket per active minute.
#[derive(Debug, Clone, Default)]
struct Counter {
    total: u64,
    minutes: VecDeque<(u32, u64)>,
}

impl Counter {
    fn add(&mut self, by: u64, minute: u32) {
        self.total = self.total.saturating_add(by);
        match self.minutes.back_mut() {
            Some((m, n)) if *m == minute => *n = n.saturating_add(by),
            _ => self.minutes.push_back((minute, by)),
        }
        while self
            .minutes
            .front()
            .is_some_and(|(m, _)| minute.saturating_sub(*m) >= HISTORY_MINUTES)
        {
            self.minutes.pop_front();
        }
    }

    /// The sum over the last `secs` seconds, counted in whole minutes (the current one included).
    fn within(&self, secs: u64, minute: u32) -> u64 {
        let span = u32::try_from(secs.div_ceil(60)).unwrap_or(HISTORY_MINUTES);
        self.minutes
            .iter()
            .rev()
            .take_while(|(m, _)| minute.saturating_sub(*m) < span)
            .map(|(_, n)| *n)
            .fold(0u64, u64::saturating_add)
    }
}

#[derive(Debug)]
struct Session {
    id: String,
    profile: Option<String>,
    person: Option<Person>,
    source: Source,
    started: SystemTime,
    last_active: Instant,
    /// Whether the cgroup has had a process in it (an exec cgroup is empty until the command starts).
    populated: bool,
    labels: Vec<String>,
    counters: BTreeMap<String, Counter>,
    previous_tool: Option<String>,
    /// The `enforcer exec` that registered the session (a pidfd, pidfd_open(2)): when it is gone, the watcher removes
    /// the exec cgroup it would have removed itself ([`watch`]).
    exec: Option<OwnedFd>,
}

/// The daemon's sessions, keyed by cgroup path. Shared by every connection; the lock is held only for one map
/// operation, never across an await.
#[derive(Debug)]
pub struct Sessions {
    table: Mutex<HashMap<String, Session>>,
    limits: SessionLimits,
    /// The person configured for each profile's cgroups (`profiles.NAME.user` / `groups`).
    configured: HashMap<String, Person>,
    /// Minute 0 of the counters' history.
    epoch: Instant,
}

impl Sessions {
    pub fn new(limits: SessionLimits, configured: HashMap<String, Person>) -> Sessions {
        Sessions {
            table: Mutex::new(HashMap::new()),
            limits,
            configured,
            epoch: Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn minute(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.epoch).as_secs() / 60).unwrap_or(u32::MAX)
    }

    /// Start the session of an `enforcer exec` cgroup (replacing any state a former cgroup of that path left). `exec`:
    /// the registering process (a pidfd), whose cgroup the session watcher removes should it die without doing so.
    pub fn register(
        &self,
        reg: Registration,
        exec: Option<OwnedFd>,
    ) -> Result<SessionInfo, SessionError> {
        let cgroup = normalise_cgroup(&reg.cgroup)?;
        let now = Instant::now();
        let mut table = self.lock();
        table.remove(&cgroup);
        self.make_room(&mut table);
        let mut session = new_session(Some(reg.profile), Some(reg.person), Source::Exec, now);
        session.exec = exec;
        tracing::info!(session = %session.id, cgroup = %cgroup, "session registered by enforcer exec");
        let info = info(&cgroup, &session, now);
        table.insert(cgroup, session);
        Ok(info)
    }

    /// Name the session of `agent`'s cgroup in `agent` (id, the person it acts for, their groups), starting one for a
    /// cgroup seen for the first time (with the person configured for its profile, if any). An agent without a
    /// cgroup (the explicit proxy) has no session.
    pub fn identify(&self, agent: &mut Agent) {
        let Some(cgroup) = agent.cgroup.as_deref() else {
            return;
        };
        let Ok(cgroup) = normalise_cgroup(cgroup) else {
            return;
        };
        let now = Instant::now();
        let mut table = self.lock();
        if !table.contains_key(&cgroup) {
            self.make_room(&mut table);
            let person = agent
                .profile
                .as_ref()
                .and_then(|p| self.configured.get(p))
                .cloned();
            let session = new_session(agent.profile.clone(), person, Source::Cgroup, now);
            tracing::info!(session = %session.id, cgroup = %cgroup, "session started");
            table.insert(cgroup.clone(), session);
        }
        if let Some(s) = table.get_mut(&cgroup) {
            s.populated = true;
            s.last_active = now;
            agent.session = Some(s.id.clone());
            if let Some(p) = &s.person {
                agent.user = Some(p.user.clone());
                agent.groups.clone_from(&p.groups);
            }
        }
    }

    /// Put the state of each Action's session into it, with the counters `wanted` (counter, window in seconds) —
    /// the ones the policy reads ([`crate::policy::Policy::session_counters`]).
    pub fn fill(&self, actions: &mut [Action], wanted: &[(String, Option<u64>)]) {
        self.fill_at(actions, wanted, Instant::now());
    }

    /// [`Sessions::fill`] as of `now` (tests and policy cases advance a simulated clock).
    pub fn fill_at(&self, actions: &mut [Action], wanted: &[(String, Option<u64>)], now: Instant) {
        let minute = self.minute(now);
        let table = self.lock();
        // The Actions of one request (a JSON-RPC batch's elements) share one agent: its state is made once and shared.
        let mut last: Option<(Shared<Agent>, Shared<SessionState>)> = None;
        for action in actions {
            if let Some((agent, state)) = &last {
                if Shared::same(agent, &action.agent) || *agent == action.agent {
                    action.session = Some(state.clone());
                    continue;
                }
            }
            let Some(s) = session_key(&action.agent)
                .and_then(|(cgroup, id)| table.get(&cgroup).filter(|s| s.id == id))
            else {
                continue;
            };
            let mut counts = BTreeMap::new();
            for (name, within) in wanted {
                let c = s.counters.get(name);
                let (key, value) = match within {
                    Some(secs) => (
                        format!("{name}@{secs}"),
                        c.map_or(0, |c| c.within(*secs, minute)),
                    ),
                    None => (name.clone(), c.map_or(0, |c| c.total)),
                };
                counts.insert(key, value);
            }
            let state = Shared::new(SessionState {
                labels: s.labels.clone(),
                counts,
                previous_tool: s.previous_tool.clone(),
            });
            action.session = Some(state.clone());
            last = Some((action.agent.clone(), state));
        }
    }

    /// Record what one decided Action leaves on its agent's session: see the module documentation.
    pub fn note(&self, agent: &Agent, decision: &Decision, action: &Action) {
        self.note_at(agent, decision, action, Instant::now());
    }

    /// Decide `actions` under `policy` with `agent`'s session as it is now (`session.*` conditions), and note on the
    /// session what each decision leaves (labels, counters, the tool called): the session step of every phase that
    /// decides (a raw TCP connection, a WebSocket message, a proposal, a response).
    pub fn decide(
        &self,
        policy: &crate::policy::Policy,
        agent: &Agent,
        actions: &mut [Action],
    ) -> crate::model::Decided {
        self.fill(actions, policy.session_counters());
        let decided = policy.decide_all(actions);
        for (action, decision) in actions.iter().zip(&decided.each) {
            self.note(agent, decision, action);
        }
        decided
    }

    /// [`Sessions::note`] as of `now`.
    pub fn note_at(&self, agent: &Agent, decision: &Decision, action: &Action, now: Instant) {
        let Some((cgroup, id)) = session_key(agent) else {
            return;
        };
        let minute = self.minute(now);
        let limits = self.limits;
        let mut table = self.lock();
        let Some(s) = table.get_mut(&cgroup).filter(|s| s.id == id) else {
            return;
        };
        s.last_active = now;
        for label in &decision.labels {
            if s.labels.contains(label) {
                continue;
            }
            if s.labels.len() >= limits.max_labels {
                tracing::warn!(session = %s.id, limit = limits.max_labels, "session label limit reached: label not set");
                break;
            }
            s.labels.push(label.clone());
        }
        let body = |size: u64, body: &str| size.max(body.len() as u64);
        let mut adds: Vec<(&str, u64)> = Vec::new();
        match action.phase() {
            Phase::Request => {
                adds.push(("requests", 1));
                if let Some(h) = &action.http {
                    adds.push(("bytes_sent", body(h.body_size, &h.body)));
                }
            }
            Phase::Response => {
                if let Some(r) = &action.response {
                    adds.push(("bytes_received", body(r.body_size, &r.body)));
                }
            }
            Phase::Proposal => {}
        }
        adds.extend(decision.counts.iter().map(|c| (c.counter.as_str(), c.by)));
        for (name, by) in adds {
            if !s.counters.contains_key(name) && s.counters.len() >= limits.max_counters {
                tracing::warn!(session = %s.id, limit = limits.max_counters, "session counter limit reached");
                continue;
            }
            s.counters
                .entry(name.to_owned())
                .or_default()
                .add(by, minute);
        }
        if let Some(tool) = tool_of(action) {
            s.previous_tool = Some(tool.to_owned());
        }
    }

    /// Make `agent`'s session hold at least what `state` says (its labels, its counters' totals as of `now`, its
    /// previous tool): how a policy test case states a session's history.
    pub fn seed_at(&self, agent: &Agent, state: &SessionState, now: Instant) {
        let Some((cgroup, id)) = session_key(agent) else {
            return;
        };
        let minute = self.minute(now);
        let mut table = self.lock();
        let Some(s) = table.get_mut(&cgroup).filter(|s| s.id == id) else {
            return;
        };
        for label in &state.labels {
            if !s.labels.contains(label) && s.labels.len() < self.limits.max_labels {
                s.labels.push(label.clone());
            }
        }
        for (name, value) in state.counts.iter().filter(|(k, _)| !k.contains('@')) {
            let c = s.counters.entry(name.clone()).or_default();
            if c.total < *value {
                c.add(value - c.total, minute);
            }
        }
        if state.previous_tool.is_some() {
            s.previous_tool.clone_from(&state.previous_tool);
        }
    }

    /// Every live session, oldest first.
    pub fn list(&self) -> Vec<SessionInfo> {
        let now = Instant::now();
        let table = self.lock();
        let mut out: Vec<SessionInfo> = table.iter().map(|(c, s)| info(c, s, now)).collect();
        out.sort_by(|a, b| a.started.cmp(&b.started).then(a.id.cmp(&b.id)));
        out
    }

    /// One session by id, or by its cgroup path.
    pub fn show(&self, id: &str) -> Option<SessionInfo> {
        let now = Instant::now();
        let table = self.lock();
        table
            .iter()
            .find(|(c, s)| s.id == id || c.as_str() == id)
            .map(|(c, s)| info(c, s, now))
    }

    /// End the session of `cgroup` (its cgroup emptied or went away); its state is dropped. Returns its id, and the
    /// pidfd of the `enforcer exec` that registered it, if one did.
    pub fn end(&self, cgroup: &str) -> Option<(String, Option<OwnedFd>)> {
        let s = self.lock().remove(cgroup)?;
        tracing::info!(session = %s.id, cgroup, "session ended");
        Some((s.id, s.exec))
    }

    /// Whether a live session has the cgroup `cgroup` (as [`Sessions::end`] names it).
    fn is_live(&self, cgroup: &str) -> bool {
        self.lock().contains_key(cgroup)
    }

    /// The cgroups of the live sessions, with whether each has had a process in it, its age, and whether the
    /// `enforcer exec` that registered it has exited (its run is over: the run ends with `exec`).
    fn cgroups(&self) -> Vec<(String, bool, std::time::Duration, bool)> {
        let now = SystemTime::now();
        self.lock()
            .iter()
            .map(|(c, s)| {
                let age = now.duration_since(s.started).unwrap_or_default();
                let exec_gone = s.exec.as_ref().is_some_and(crate::pidfd::exited);
                (c.clone(), s.populated, age, exec_gone)
            })
            .collect()
    }

    fn mark_populated(&self, cgroup: &str) {
        if let Some(s) = self.lock().get_mut(cgroup) {
            s.populated = true;
        }
    }

    /// Forget the least recently active sessions until one more fits.
    fn make_room(&self, table: &mut HashMap<String, Session>) {
        while table.len() >= self.limits.max_sessions.max(1) {
            let Some(oldest) = table
                .iter()
                .min_by_key(|(_, s)| s.last_active)
                .map(|(c, _)| c.clone())
            else {
                return;
            };
            if let Some(s) = table.remove(&oldest) {
                tracing::warn!(session = %s.id, limit = self.limits.max_sessions, "too many sessions: forgetting the least recently active");
            }
        }
    }
}

fn new_session(
    profile: Option<String>,
    person: Option<Person>,
    source: Source,
    now: Instant,
) -> Session {
    Session {
        id: new_id(),
        profile,
        person,
        source,
        started: SystemTime::now(),
        last_active: now,
        populated: source == Source::Cgroup,
        labels: Vec::new(),
        counters: BTreeMap::new(),
        previous_tool: None,
        exec: None,
    }
}

fn info(cgroup: &str, s: &Session, now: Instant) -> SessionInfo {
    SessionInfo {
        id: s.id.clone(),
        cgroup: cgroup.to_owned(),
        profile: s.profile.clone(),
        person: s.person.clone(),
        source: s.source,
        started: crate::audit::record::rfc3339(s.started),
        idle_secs: now.saturating_duration_since(s.last_active).as_secs(),
        labels: s.labels.clone(),
        counters: s
            .counters
            .iter()
            .map(|(k, c)| (k.clone(), c.total))
            .collect(),
        previous_tool: s.previous_tool.clone(),
    }
}

/// The tool an Action calls: an MCP `tools/call`'s tool, or the tool a proposal names.
fn tool_of(action: &Action) -> Option<&str> {
    match action.phase() {
        Phase::Proposal => action.proposal.as_ref().map(|p| p.tool.as_str()),
        Phase::Request => action
            .mcp
            .as_ref()
            .filter(|m| m.method == "tools/call")
            .and_then(|m| m.tool.as_deref()),
        Phase::Response => None,
    }
}

/// Where an identified agent's session is kept (its cgroup) and which session it is (its id: a later session of the
/// same cgroup path is another one).
fn session_key(agent: &Agent) -> Option<(String, &str)> {
    let id = agent.session.as_deref()?;
    let cgroup = normalise_cgroup(agent.cgroup.as_deref()?).ok()?;
    Some((cgroup, id))
}

/// A session id: 16 random hex digits.
fn new_id() -> String {
    let mut bytes = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        // Unique enough within one daemon: the clock's nanoseconds.
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = (nanos as u64).to_be_bytes();
    }
    hex::encode(bytes)
}

/// A cgroup path as the kernel origins name it: `/a/b`, no `..`, no trailing slash.
fn normalise_cgroup(path: &str) -> Result<String, SessionError> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if segs.iter().any(|s| *s == "." || *s == "..") || path.contains('\0') {
        return Err(SessionError::BadCgroup(path.to_owned()));
    }
    Ok(format!("/{}", segs.join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CountAdd, HttpRequest, McpCall, Mode, Reason, Verdict};
    use std::time::Duration;

    fn decision(labels: &[&str], counts: &[(&str, u64)]) -> Decision {
        Decision {
            labels: labels.iter().map(|s| s.to_string()).collect(),
            counts: counts
                .iter()
                .map(|(c, by)| CountAdd {
                    counter: c.to_string(),
                    by: *by,
                })
                .collect(),
            ..Decision::bare(Verdict::Allow, Reason::Rule, Mode::Enforce, String::new())
        }
    }

    fn agent(cgroup: &str) -> Agent {
        Agent {
            profile: Some("p".into()),
            cgroup: Some(cgroup.into()),
            ..Agent::default()
        }
    }

    #[test]
    fn labels_counters_and_the_previous_tool_reach_later_actions() {
        let sessions = Sessions::new(SessionLimits::default(), HashMap::new());
        let mut a = agent("/x/exec-1");
        sessions.identify(&mut a);
        let id = a.session.clone().unwrap();
        let request = Action {
            agent: a.clone().into(),
            http: Some(
                HttpRequest {
                    body: "12345".into(),
                    ..HttpRequest::default()
                }
                .into(),
            ),
            mcp: Some(McpCall {
                method: "tools/call".into(),
                tool: Some("read_inbox".into()),
                ..McpCall::default()
            }),
            ..Action::default()
        };
        let t0 = Instant::now();
        sessions.note_at(&a, &decision(&["inbox"], &[("records", 7)]), &request, t0);
        sessions.note_at(
            &a,
            &decision(&[], &[("records", 5)]),
            &request,
            t0 + Duration::from_secs(3600),
        );
        let wanted = vec![
            ("records".to_string(), None),
            ("records".to_string(), Some(3600)),
            ("requests".to_string(), None),
            ("bytes_sent".to_string(), None),
        ];
        // The Actions of one request (a JSON-RPC batch's elements) share one state, however many they are.
        let mut next = vec![
            Action {
                agent: a.clone().into(),
                ..Action::default()
            };
            3
        ];
        sessions.fill_at(&mut next, &wanted, t0 + Duration::from_secs(3600));
        let state = next[0].session.clone().unwrap();
        for other in &next[1..] {
            assert!(Shared::same(other.session.as_ref().unwrap(), &state));
        }
        assert_eq!(state.labels, ["inbox"]);
        assert_eq!(state.previous_tool.as_deref(), Some("read_inbox"));
        assert_eq!(state.counts["records"], 12);
        // The first addition is an hour old: outside the window.
        assert_eq!(state.counts["records@3600"], 5);
        assert_eq!(state.counts["requests"], 2);
        assert_eq!(state.counts["bytes_sent"], 10);
        let shown = sessions.show(&id).unwrap();
        assert_eq!(shown.cgroup, "/x/exec-1");
        assert_eq!(sessions.end("/x/exec-1").map(|(id, _)| id), Some(id));
        assert!(sessions.list().is_empty());
    }

    #[test]
    fn exec_registration_names_the_person_and_memory_is_bounded() {
        let limits = SessionLimits {
            max_sessions: 2,
            max_labels: 1,
            max_counters: 4,
        };
        let sessions = Sessions::new(limits, HashMap::new());
        let person = Person {
            user: "alice".into(),
            uid: Some(1000),
            groups: vec!["alice".into(), "dba".into()],
        };
        sessions
            .register(
                Registration {
                    cgroup: "/e/exec-1/".into(),
                    profile: "p".into(),
                    person: person.clone(),
                },
                None,
            )
            .unwrap();
        let mut a = agent("/e/exec-1");
        sessions.identify(&mut a);
        assert_eq!(a.user.as_deref(), Some("alice"));
        assert_eq!(a.groups, ["alice", "dba"]);
        sessions.note(&a, &decision(&["one", "two"], &[]), &Action::default());
        assert_eq!(
            sessions.show(a.session.as_deref().unwrap()).unwrap().labels,
            ["one"]
        );
        for n in 2..5 {
            sessions.identify(&mut agent(&format!("/e/exec-{n}")));
        }
        assert_eq!(sessions.list().len(), 2);
        assert!(sessions
            .register(
                Registration {
                    cgroup: "/e/../x".into(),
                    profile: "p".into(),
                    person,
                },
                None,
            )
            .is_err());
    }
}
