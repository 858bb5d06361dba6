//! The plain-data types that pass between the pipeline stages, defined once in one visible place.
//!
//! capture produces an [`Origin`] for each redirected connection; the proxy and inspect stages turn each request into
//! one [`Action`]; the policy turns an `Action` into a [`Decision`]; constrain applies the decision's
//! [`PlannedRewrite`]s and reports [`Change`]s; the audit stage records an [`AuditEvent`]. None of these types carry
//! behaviour beyond small helpers, and all of them serialise so tests and the CLI can write them as YAML or JSON.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::glob::NameGlob;
use crate::jsonpath::JsonPath;

/// Who is acting: the agent process behind a connection. Every field may be unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Agent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The session (one agent run: an `enforcer exec` invocation or a configured cgroup) the process belongs to:
    /// see [`crate::session`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// The person the agent acts for: the user who ran `enforcer exec` (through `sudo`, the invoking user, not
    /// root), or the user configured for the profile's cgroups. Not the account the agent runs as (that is `uid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// That person's groups (names), primary group first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
}

/// How the agent reached out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    #[default]
    Https,
    /// Bytes that are neither TLS nor HTTP: decided on destination only.
    Tcp,
    /// A DNS query: `host` is the queried name (lower-case, no trailing dot), port 53, no HTTP part. Decided by
    /// [`crate::policy::Policy::evaluate`] under the DNS rules of docs/policy.md.
    Dns,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
            Scheme::Tcp => "tcp",
            Scheme::Dns => "dns",
        }
    }
}

/// Where the agent was going.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transport {
    #[serde(default)]
    pub scheme: Scheme,
    /// SNI for TLS, the Host header for plain HTTP; `None` when neither is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<IpAddr>,
    #[serde(default)]
    pub port: u16,
    /// The LLM provider whose API this host serves (`openai`, `anthropic`, `gemini`; inspect's provider hosts), if
    /// it is one: a key of that provider in a credential header is the agent's own, not a finding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
}

/// An ordered list of name/value pairs that serialises as a map (headers, query parameters).
/// Names of headers are lower-cased by whoever builds the request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pairs(pub Vec<(String, String)>);

impl Pairs {
    /// Every value stored under `name`.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The first value stored under `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Serialize for Pairs {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (k, v) in &self.0 {
            map.entry(k).or_default().push(v);
        }
        s.collect_map(map.into_iter().map(|(k, v)| {
            let v = if v.len() == 1 {
                serde_json::Value::from(v[0])
            } else {
                serde_json::Value::from(v)
            };
            (k, v)
        }))
    }
}

impl<'de> Deserialize<'de> for Pairs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let map: BTreeMap<String, OneOrMany> = BTreeMap::deserialize(d)?;
        let mut out = Vec::new();
        for (k, v) in map {
            match v {
                OneOrMany::One(v) => out.push((k, v)),
                OneOrMany::Many(vs) => out.extend(vs.into_iter().map(|v| (k.clone(), v))),
            }
        }
        Ok(Pairs(out))
    }
}

/// The HTTP layer of a request. `body` is the decoded request body (what inspection sees); `json` is the body parsed
/// once when it is JSON, so policy conditions and rewrites never parse it again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRequest {
    pub method: String,
    /// Without the query string. From the proxy it is canonical (percent-escapes decoded once, `;parameters` and
    /// repeated slashes dropped, trailing slash kept): the path the upstream's router will read.
    pub path: String,
    #[serde(default)]
    pub query: Pairs,
    #[serde(default)]
    pub headers: Pairs,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Size in bytes of the body as sent; filled from `body` when a test case leaves it out.
    #[serde(default)]
    pub body_size: u64,
    /// The body as text (lossy for binary bodies). Kept as a string so cases and audit tooling can write it. Shared,
    /// with `json`, by every Action of the request (each element of a JSON-RPC batch, each reading, each response
    /// and proposal Action): an Action's clone never copies the body.
    #[serde(default, skip_serializing_if = "Shared::is_empty")]
    pub body: Shared<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<Shared<serde_json::Value>>,
    /// The protocol an HTTP/1.1 request asks to switch the connection to (its `Upgrade` tokens, lower-cased, as
    /// sent: `websocket`, `h2c`, …; RFC 9110 §7.8), when it asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<String>,
}

/// A value the Actions of one request share, read through `Deref`: cloning it copies a pointer, so the memory a
/// request's Actions hold stays that of one body whatever the number of Actions (a JSON-RPC batch of 40,000
/// elements in a 3 MB body made 40,000 copies of the body and its parsed JSON). A write (`DerefMut`) copies the value
/// first when another Action still shares it (`Arc::make_mut`). Serialises as the value itself.
#[derive(Debug, Default, PartialEq)]
pub struct Shared<T>(Arc<T>);

impl<T: Serialize> Serialize for Shared<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Shared<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Shared::new)
    }
}

impl<T> Shared<T> {
    pub fn new(value: T) -> Self {
        Shared(Arc::new(value))
    }

    /// The value, copied only when another Action still shares it.
    pub fn into_inner(self) -> T
    where
        T: Clone,
    {
        Arc::unwrap_or_clone(self.0)
    }

    /// The value, when no other Action shares it; else the shared value back.
    pub fn try_into_inner(self) -> Result<T, Self> {
        Arc::try_unwrap(self.0).map_err(Shared)
    }

    /// Whether `a` and `b` are the one shared value (not only equal ones).
    pub fn same(a: &Self, b: &Self) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }
}

impl Shared<String> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Shared(Arc::clone(&self.0))
    }
}

impl<T> std::ops::Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T: Clone> std::ops::DerefMut for Shared<T> {
    fn deref_mut(&mut self) -> &mut T {
        Arc::make_mut(&mut self.0)
    }
}

impl<T> From<T> for Shared<T> {
    fn from(value: T) -> Self {
        Shared::new(value)
    }
}

impl From<&str> for Shared<String> {
    fn from(value: &str) -> Self {
        Shared::new(value.to_string())
    }
}

/// An MCP JSON-RPC message (one element of a batch), filled by the protocol classifier.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpCall {
    pub method: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// An LLM API call, filled by the protocol classifier.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmCall {
    /// `openai`, `anthropic` or `gemini`.
    pub provider: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    #[serde(default)]
    pub has_tool_results: bool,
}

/// A tool call the model proposes in an LLM response, before the agent runs it: OpenAI Chat Completions
/// `tool_calls`, OpenAI Responses `function_call`/`custom_tool_call`/`local_shell_call`/`shell_call`/
/// `apply_patch_call`/`computer_call`/`mcp_call` items, Anthropic `tool_use`/`server_tool_use` blocks, Gemini
/// `functionCall` parts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proposal {
    /// The tool's name as the model called it (an MCP tool through the provider: `mcp:<server label>/<tool>`).
    pub tool: String,
    /// `function`, `custom`, `shell`, `mcp` or `server` (a provider-hosted tool), in the providers' vocabulary.
    #[serde(default)]
    pub kind: String,
    /// The arguments as parsed JSON (a custom tool's free-form input as a JSON string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<serde_json::Value>,
    /// The provider's id of the call (`call_…`, `toolu_…`), when it gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
}

/// What an upstream answered, as a response rule sees it: the status, the head and the body (decoded from its
/// content-coding; one server-sent event's data, or one WebSocket message, when the body is a stream of them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpResponse {
    pub status: u16,
    #[serde(default)]
    pub headers: Pairs,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// Size in bytes of `body`; filled from `body` when a test case leaves it out.
    #[serde(default)]
    pub body_size: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub body: String,
    /// `body` parsed once when it is JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<serde_json::Value>,
}

/// Which part of an exchange an Action is, and so which rules decide it (a rule's `phase:`): the request the agent
/// sends (a WebSocket message from the agent too), a tool call the model proposes in the response, or the data the
/// response returns to the agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    #[default]
    Request,
    Proposal,
    Response,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Request => "request",
            Phase::Proposal => "proposal",
            Phase::Response => "response",
        }
    }
}

/// One thing an agent is trying to do: the input of the policy.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// Shared by the Actions of one request (each element of a JSON-RPC batch), as `http` is.
    #[serde(default)]
    pub agent: Shared<Agent>,
    #[serde(default)]
    pub transport: Transport,
    /// The request, shared by every Action made of it (each element of a JSON-RPC batch, each response and proposal
    /// Action): the head and body are held once whatever the number of Actions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Shared<HttpRequest>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mcp: Option<McpCall>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm: Option<LlmCall>,
    /// A tool call the model proposed (a proposal Action: `http` then describes the request it answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposal: Option<Proposal>,
    /// What the upstream answered (a response Action: `http` then describes the request it answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<HttpResponse>,
    /// What the agent's session has done so far, as `session.*` conditions read it (filled by
    /// [`crate::session::Sessions::fill`] before each decision; written by hand in policy test cases).
    /// Shared by the Actions of one request (each element of a JSON-RPC batch): held once whatever their number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<Shared<SessionState>>,
}

/// A session's state at the moment an Action is decided: what earlier Actions of the same agent run left behind.
/// Plain data, so a policy decides it without reaching into the daemon.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionState {
    /// Labels earlier decisions put on the session (a rule's `label:`), in the order they were first set.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Counter values: `NAME` is the session's total, `NAME@SECONDS` the sum over the last SECONDS (1-minute
    /// resolution). A condition on a window reads `NAME@SECONDS` when present, else `NAME`; a counter that is absent
    /// is 0.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counts: BTreeMap<String, u64>,
    /// The tool of the session's previous tool call (an MCP `tools/call` the agent sent, or a tool call the model
    /// proposed), whatever its verdict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_tool: Option<String>,
}

impl Action {
    /// The part of an exchange this Action is: a proposal if it carries one, else a response if it carries one,
    /// else a request.
    pub fn phase(&self) -> Phase {
        if self.proposal.is_some() {
            Phase::Proposal
        } else if self.response.is_some() {
            Phase::Response
        } else {
            Phase::Request
        }
    }
}

/// The five verdicts, ordered from least to most restrictive so `max` picks the one that wins:
/// block > review > constrain > log > allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Log,
    Constrain,
    /// Held until a person approves or denies it (or the review times out and its fallback applies).
    Review,
    Block,
}

impl Verdict {
    /// Every verdict, least restrictive first.
    pub const ALL: [Verdict; 5] = [
        Verdict::Allow,
        Verdict::Log,
        Verdict::Constrain,
        Verdict::Review,
        Verdict::Block,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Log => "log",
            Verdict::Constrain => "constrain",
            Verdict::Review => "review",
            Verdict::Block => "block",
        }
    }
}

/// How a `review` verdict waits (a rule's `review:`): at most `timeout_secs` for a person's answer, then `fallback`
/// (allow, log or block) applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReviewSpec {
    pub timeout_secs: u64,
    pub fallback: Verdict,
}

/// What a review rule waits for by default: five minutes (under the OpenAI and Anthropic SDKs' ten-minute request
/// timeouts), then block.
pub const DEFAULT_REVIEW: ReviewSpec = ReviewSpec {
    timeout_secs: 300,
    fallback: Verdict::Block,
};

/// A session counter a matching rule adds to (a rule's `count:`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CountAdd {
    pub counter: String,
    pub by: u64,
}

/// How a connection the upstream agreed to upgrade is relayed (a rule's `relay:`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Relay {
    /// Read: WebSocket messages are decided one by one; any other upgrade is not relayed at all (its `Upgrade`
    /// is removed, so the request goes on as a plain request).
    #[default]
    Inspect,
    /// Relayed unread, and recorded as such. Only where a rule that decides says so.
    Opaque,
}

/// `enforce` carries decisions out; `shadow` records them but forwards everything unmodified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Shadow,
}

/// One rewrite a CONSTRAIN decision asks for, compiled when the policy loads (JSONPaths parsed, header names and
/// values checked, globs built), so carrying it out parses nothing. Serialises as the policy wrote it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Rewrite {
    /// Replace what these detectors (by name) find with the policy's redaction marker.
    Redact {
        detectors: Vec<String>,
    },
    JsonSet {
        path: JsonPath,
        value: serde_json::Value,
    },
    JsonRemove {
        path: JsonPath,
    },
    JsonCap {
        path: JsonPath,
        max: f64,
    },
    /// Arrays at the path keep their first `max` elements.
    JsonTruncate {
        path: JsonPath,
        max: usize,
    },
    HeaderSet {
        #[serde(with = "header_text::name")]
        name: HeaderName,
        #[serde(with = "header_text::value")]
        value: HeaderValue,
    },
    HeaderRemove {
        #[serde(with = "header_text::name")]
        name: HeaderName,
    },
    /// Drop declared LLM tools whose names match (plain globs).
    DropTools {
        globs: Vec<NameGlob>,
    },
}

/// Header names and values as text in serialised rewrites (RFC 9110 §5.1 names, visible-ASCII values).
mod header_text {
    pub mod name {
        use http::HeaderName;
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(name: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(name.as_str())
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<HeaderName, D::Error> {
            let text = String::deserialize(d)?;
            HeaderName::from_bytes(text.as_bytes()).map_err(serde::de::Error::custom)
        }
    }

    pub mod value {
        use http::HeaderValue;
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(value: &HeaderValue, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&String::from_utf8_lossy(value.as_bytes()))
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<HeaderValue, D::Error> {
            let text = String::deserialize(d)?;
            HeaderValue::from_str(&text).map_err(serde::de::Error::custom)
        }
    }
}

/// A rewrite together with the rule that asked for it, in policy file order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedRewrite {
    pub rule: String,
    #[serde(flatten)]
    pub rewrite: Rewrite,
}

/// Why a decision is what it is, beyond the rules (closed set, used by audit, logs and block messages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A matching rule decided.
    Rule,
    /// No rule matched: the policy default applied.
    Default,
    /// A rule's rate limit was exceeded.
    RateLimited,
    /// The request body exceeded the inspection limit.
    BodyTooLarge,
    /// The body could not be decoded or parsed where inspection needs it.
    Unparseable,
    /// A rewrite would have touched an opaque signed field.
    SignedField,
    /// A secret a redaction named was still in the rewritten request (URL path, object key, binary body, ...).
    Unredactable,
    /// A constrain rule matched an Action with nothing to rewrite (raw TCP, a DNS query): carried out as a block.
    Unrewritable,
    /// A constrain rule decided, but its rewrites changed nothing in the request: forwarded as received, recorded
    /// with verdict `log`.
    Unchanged,
    /// Host/:authority did not match SNI.
    HostMismatch,
    /// The upstream's certificate failed verification.
    UpstreamTls,
    /// The upstream could not be reached.
    UpstreamUnreachable,
    /// The client sent something the proxy could not parse.
    BadRequest,
    /// The audit record could not be written, so nothing was forwarded.
    AuditUnavailable,
    /// The client went away (closed the connection, reset the stream) before the exchange was forwarded.
    ClientClosed,
    /// The agent's TLS client did not complete the handshake with the enforcer's certificate (it sent an alert,
    /// typically `unknown_ca`: it does not trust the enforcer CA).
    ClientTls,
    /// A tool call or response body held for its decision did not complete within the proxy's time bound.
    HoldTimeout,
    /// Refused in the kernel by the capture programs, before anything left the socket: a socket kind, a bind, an
    /// inbound packet or a datagram the enforcer does not carry (see docs/proxy.md).
    Kernel,
    /// The policy restricts the agent's profile to other users (`profiles: NAME: { users, groups }`).
    UserNotAllowed,
    /// A person denied the held exchange.
    ReviewDenied,
    /// Nobody answered the review in time: its fallback verdict applied.
    ReviewTimeout,
    /// A retained trace was deleted because it outgrew the retention limits (age or total size).
    Retention,
    /// The review could not be held (too many pending, or no way to ask anyone): its fallback verdict applied.
    ReviewUnavailable,
    /// The agent already had its share of the proxy's connections (`proxy.max_connections_per_agent`), or all
    /// agents together the total (`proxy.max_connections`): the connection was closed unserved.
    ConnectionLimit,
    /// The agent's buffers already held its share of the proxy's buffer budget
    /// (`proxy.max_buffered_bytes_per_agent`), or all agents' together the total (`proxy.max_buffered_bytes`): the
    /// request (or response, or message) was refused, answered 503 with `Retry-After`, never forwarded.
    BufferLimit,
    /// A batch create named an input file the enforcer did not read when it was uploaded (uploaded elsewhere, in
    /// chunks, before the daemon started or the policy changed): its LLM calls were never decided, so the batch is
    /// refused (`proxy::batch_input`).
    UnreadInput,
    /// A process in a cgroup the enforcer confines asked something of the daemon's control socket (approve a review,
    /// reload, register a run, …): agents are never answered there, whatever their uid or groups (`control`).
    ControlFromAgent,
    /// The request's destination is one of the enforcer's own listeners on loopback (its proxy, DNS, metrics or
    /// review-link ports): never forwarded to, whatever the policy allows.
    DaemonEndpoint,
}

impl Reason {
    /// The name used in records, logs and metrics (`rule`, `upstream_tls`, …; the serialised form).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Rule => "rule",
            Reason::Default => "default",
            Reason::RateLimited => "rate_limited",
            Reason::BodyTooLarge => "body_too_large",
            Reason::Unparseable => "unparseable",
            Reason::SignedField => "signed_field",
            Reason::Unredactable => "unredactable",
            Reason::Unrewritable => "unrewritable",
            Reason::Unchanged => "unchanged",
            Reason::HostMismatch => "host_mismatch",
            Reason::UpstreamTls => "upstream_tls",
            Reason::UpstreamUnreachable => "upstream_unreachable",
            Reason::BadRequest => "bad_request",
            Reason::AuditUnavailable => "audit_unavailable",
            Reason::ClientClosed => "client_closed",
            Reason::ClientTls => "client_tls",
            Reason::HoldTimeout => "hold_timeout",
            Reason::Kernel => "kernel",
            Reason::UserNotAllowed => "user_not_allowed",
            Reason::ReviewDenied => "review_denied",
            Reason::ReviewTimeout => "review_timeout",
            Reason::Retention => "retention",
            Reason::ReviewUnavailable => "review_unavailable",
            Reason::ConnectionLimit => "connection_limit",
            Reason::BufferLimit => "buffer_limit",
            Reason::UnreadInput => "unread_input",
            Reason::ControlFromAgent => "control_from_agent",
            Reason::DaemonEndpoint => "daemon_endpoint",
        }
    }
}

/// The policy's answer for one Action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub verdict: Verdict,
    /// The rule whose verdict won (first in file order among the most restrictive); `None` for the default.
    pub deciding_rule: Option<String>,
    /// Every matching rule id, in file order.
    pub matched_rules: Vec<String>,
    pub reason: Reason,
    /// Shown to the client on block. Comes from the policy only, never from request data.
    pub message: Option<String>,
    /// Rewrites of all matching constrain rules, in file order (empty unless the verdict is constrain).
    pub rewrites: Vec<PlannedRewrite>,
    pub mode: Mode,
    /// Hex SHA-256 of the policy file's bytes.
    pub policy_hash: String,
    /// How the review waits, when the verdict is `review` (the deciding rule's `review:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<ReviewSpec>,
    /// Labels every matching rule puts on the session (`label:`), each once, in file order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// What matching rules add to the session's counters (`count:`), in file order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub counts: Vec<CountAdd>,
    /// The fraction (0 to 1] of such decisions whose whole exchange is kept as an encrypted trace (the largest
    /// `retain:` of the matching rules); `None`: not retained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retain: Option<f64>,
}

impl Decision {
    /// A decision with only a verdict and a reason, under `mode` and `policy_hash`: no rule, message or effects.
    pub fn bare(verdict: Verdict, reason: Reason, mode: Mode, policy_hash: String) -> Decision {
        Decision {
            verdict,
            deciding_rule: None,
            matched_rules: Vec::new(),
            reason,
            message: None,
            rewrites: Vec::new(),
            mode,
            policy_hash,
            review: None,
            labels: Vec::new(),
            counts: Vec::new(),
            retain: None,
        }
    }
}

impl Decision {
    /// Turn a constrain that could not be carried out into a block for `reason` (its rewrites dropped).
    pub fn block_instead(&mut self, reason: Reason) {
        self.verdict = Verdict::Block;
        self.reason = reason;
        self.rewrites.clear();
    }

    /// The reason an outcome records as its error when a constrain could not be carried out (a signed field or
    /// an unredactable secret), else none.
    pub fn rewrite_failure(&self) -> Option<Reason> {
        matches!(self.reason, Reason::SignedField | Reason::Unredactable).then_some(self.reason)
    }
}

/// The policy's answer for everything one exchange asks for (one Action for a plain request or an LLM call, one
/// per element of a JSON-RPC batch): see [`crate::policy::Policy::decide_all`].
#[derive(Debug, Clone, PartialEq)]
pub struct Decided {
    /// The most restrictive of `each`, carrying every matched rule of every Action and, for constrain, every
    /// constrain rewrite: what is carried out and recorded.
    pub decision: Decision,
    /// The index of the Action whose decision `decision` is.
    pub index: usize,
    /// Each Action's own decision, in order: a batch's block answer names each element's own reason.
    pub each: Vec<Decision>,
}

/// What a connection redirected by the kernel really was: recovered by the capture stage for the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The address the agent connected to before redirection.
    pub dst: SocketAddr,
    pub agent: Agent,
}

/// Recovers the [`Origin`] of an accepted connection from the client's address. The eBPF capture implements it;
/// proxy tests implement it with a table.
pub trait OriginLookup: Send + Sync + 'static {
    fn lookup(&self, client: SocketAddr) -> Option<Origin>;
}

/// What a CONSTRAIN changed, by location and cause only: never the values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// A JSON path (`$.messages[0].content`), `header.<name>`, `query.<name>` or `tools`.
    pub path: String,
    /// `redact:<detector>`, `json_set`, `json_remove`, `json_cap`, `header_set`, `header_remove`, `drop_tools`.
    pub cause: String,
}

/// A request as the audit trail sees it: names, sizes and digests only.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestSummary {
    pub scheme: Option<Scheme>,
    pub host: Option<String>,
    pub ip: Option<IpAddr>,
    pub port: u16,
    pub method: Option<String>,
    /// Path without the query string, as the client sent it.
    pub path: Option<String>,
    pub mcp_method: Option<String>,
    pub mcp_tool: Option<String>,
    pub llm_provider: Option<String>,
    pub llm_model: Option<String>,
    pub body_size: u64,
    /// Hex SHA-256 of the body as received from the agent.
    pub body_sha256: Option<String>,
    pub changes: Vec<Change>,
    /// The protocol the request asked to upgrade the connection to (`Upgrade`), when it asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<String>,
    /// A later part of an exchange (a WebSocket message, a proposal, a response): the `seq` of the exchange's
    /// request record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<u64>,
    /// Which part of the exchange a record with a `parent` is (`request` for a WebSocket message from the agent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The TLS alert the agent's client sent when it ended the handshake with the proxy (IANA name, `unknown_ca`);
    /// only in `client_tls` records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_alert: Option<String>,
    /// A proposal's record: the tool the model proposed to call (never its arguments).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// A tool call proposed in one line of batch results (Anthropic Message Batch results, OpenAI Batch output): the
    /// line's `custom_id`, the caller's name for the batched request (scrubbed as `path` is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub custom_id: Option<String>,
    /// Kernel refusals only: how many refusals this record stands for (itself, and those of the same cgroup and
    /// kind before it that the kernel's rate bound left unrecorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// What the enforcer did with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    /// Sent to the upstream (rewritten when the decision constrained it).
    Forwarded,
    /// Refused by the enforcer: the policy blocked it, or a check failed (malformed request, host not bound to the
    /// destination, upstream certificate not verified, the audit record not written).
    Blocked,
    /// Allowed, but the upstream could not be reached: nothing was sent.
    Failed,
    /// Held for a person's review: nothing was sent yet. The exchange's closing record (linked by
    /// `review.held_seq`) says how it ended.
    Held,
    /// A trace of the exchange (record `trace.of`) was stored.
    Retained,
    /// A stored trace was deleted by the retention limits.
    Deleted,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub disposition: Disposition,
    /// HTTP status sent to the client when the enforcer answered itself, or the upstream's when known.
    pub status: Option<u16>,
    pub error: Option<Reason>,
}

impl Outcome {
    /// What became of a part of an exchange under `decision`: `blocked` or forwarded, with the status the agent got
    /// (when it got one) and, as the error, the reason a constrain could not be carried out.
    pub fn of(decision: &Decision, blocked: bool, status: Option<u16>) -> Outcome {
        Outcome {
            disposition: if blocked {
                Disposition::Blocked
            } else {
                Disposition::Forwarded
            },
            status,
            error: decision.rewrite_failure(),
        }
    }
}

/// Who answered a review.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "via")]
pub enum Approver {
    /// `enforcer review approve|deny` over the control socket: the peer's uid (`SO_PEERCRED`) and its user name.
    Cli { uid: u32, name: Option<String> },
    /// A signed link the review webhook handed out: the webhook's configured name, and the approver the receiver
    /// says acted (its word, not checked by the enforcer).
    Webhook {
        webhook: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        claimed_by: Option<String>,
    },
}

/// How a review ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewResult {
    Approved,
    Denied,
    /// Nobody answered in time: the fallback verdict applied.
    Timeout,
    /// The review could not be held (too many pending): the fallback verdict applied at once.
    Unavailable,
}

/// The review part of a record. The held record states the terms of the wait (`timeout_secs`, `fallback`); the
/// exchange's closing record says how the review ended, by whom and when, and links to the held record by
/// `held_seq` — which is also the review's id (what `enforcer review approve ID` names).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewNote {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<Verdict>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ReviewResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<Approver>,
    /// The approver's reason, as they wrote it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the answer (or the timeout) came, RFC 3339 UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
    /// The verdict carried out: the decision's own after an approval, `block` after a denial, the fallback after a
    /// timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carried_out: Option<Verdict>,
}

/// A retained trace, as its record names it: see [`crate::trace`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceNote {
    /// The seq of the exchange's record the trace belongs to.
    pub of: u64,
    /// The trace file's name in the trace directory.
    pub file: String,
    /// Hex SHA-256 of the file's bytes (the encrypted trace), so `enforcer audit verify` notices a swapped file.
    pub sha256: String,
    pub bytes: u64,
    /// `stored`, or why it was deleted (`expired`, `over_size`).
    pub event: TraceEvent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceEvent {
    Stored,
    /// Deleted because it was older than `traces.max_age`.
    Expired,
    /// Deleted to keep the trace directory under `traces.max_total_bytes`.
    OverSize,
}

/// One security decision handed to the audit sink; the sink adds `seq`, `ts` and the chain hashes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub decision: Decision,
    pub agent: Agent,
    pub request: RequestSummary,
    pub outcome: Outcome,
    /// A held exchange's review (its held record, and its closing record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub review: Option<ReviewNote>,
    /// A retained trace stored or deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceNote>,
}

impl AuditEvent {
    /// An event without review or trace parts.
    pub fn new(
        decision: Decision,
        agent: Agent,
        request: RequestSummary,
        outcome: Outcome,
    ) -> AuditEvent {
        AuditEvent {
            decision,
            agent,
            request,
            outcome,
            review: None,
            trace: None,
        }
    }
}
