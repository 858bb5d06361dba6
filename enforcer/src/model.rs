//! The plain-data types that pass between the pipeline stages, defined once in one visible place.
//!
//! capture produces an [`Origin`] for each redirected connection; the proxy and inspect stages turn each request into
//! one [`Action`]; the policy turns an `Action` into a [`Decision`]; constrain applies the decision's
//! [`PlannedRewrite`]s and reports [`Change`]s; the audit stage records an [`AuditEvent`]. None of these types carry
//! behaviour beyond small helpers, and all of them serialise so tests and the CLI can write them as YAML or JSON.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

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
    /// The body as text (lossy for binary bodies). Kept as a string so cases and audit tooling can write it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub body: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json: Option<serde_json::Value>,
    /// The protocol an HTTP/1.1 request asks to switch the connection to (its `Upgrade` tokens, lower-cased, as
    /// sent: `websocket`, `h2c`, …; RFC 9110 §7.8), when it asks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<String>,
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
/// `tool_calls`, OpenAI Responses `function_call`/`custom_tool_call`/`local_shell_call`/`mcp_call` items, Anthropic
/// `tool_use`/`server_tool_use` blocks, Gemini `functionCall` parts.
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
    #[serde(default)]
    pub agent: Agent,
    #[serde(default)]
    pub transport: Transport,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpRequest>,
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

/// The four verdicts, ordered from least to most restrictive so `max` picks the one that wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allow,
    Log,
    Constrain,
    Block,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Log => "log",
            Verdict::Constrain => "constrain",
            Verdict::Block => "block",
        }
    }
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
    /// Refused in the kernel by the capture programs, before anything left the socket: a socket kind, a bind, an
    /// inbound packet or a datagram the enforcer does not carry (see docs/proxy.md).
    Kernel,
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
            Reason::HostMismatch => "host_mismatch",
            Reason::UpstreamTls => "upstream_tls",
            Reason::UpstreamUnreachable => "upstream_unreachable",
            Reason::BadRequest => "bad_request",
            Reason::AuditUnavailable => "audit_unavailable",
            Reason::ClientClosed => "client_closed",
            Reason::ClientTls => "client_tls",
            Reason::Kernel => "kernel",
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub disposition: Disposition,
    /// HTTP status sent to the client when the enforcer answered itself, or the upstream's when known.
    pub status: Option<u16>,
    pub error: Option<Reason>,
}

/// One security decision handed to the audit sink; the sink adds `seq`, `ts` and the chain hashes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub decision: Decision,
    pub agent: Agent,
    pub request: RequestSummary,
    pub outcome: Outcome,
}
