//! The plain-data types that pass between the pipeline stages, defined once in one visible place.
//!
//! capture produces an [`Origin`] for each redirected connection; the proxy and inspect stages turn each request into
//! one [`Action`]; the policy turns an `Action` into a [`Decision`]; constrain applies the decision's
//! [`PlannedRewrite`]s and reports [`Change`]s; the audit stage records an [`AuditEvent`]. None of these types carry
//! behaviour beyond small helpers, and all of them serialise so tests and the CLI can write them as YAML or JSON.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

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

/// `enforce` carries decisions out; `shadow` records them but forwards everything unmodified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Shadow,
}

/// One rewrite a CONSTRAIN decision asks for. Paths are the policy's JSONPath subset, as written in the policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Rewrite {
    Redact {
        detectors: Vec<String>,
    },
    JsonSet {
        path: String,
        value: serde_json::Value,
    },
    JsonRemove {
        path: String,
    },
    JsonCap {
        path: String,
        max: f64,
    },
    HeaderSet {
        name: String,
        value: String,
    },
    HeaderRemove {
        name: String,
    },
    DropTools {
        globs: Vec<String>,
    },
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
    /// Host/:authority did not match SNI.
    HostMismatch,
    /// The upstream's certificate failed verification.
    UpstreamTls,
    /// The upstream could not be reached.
    UpstreamUnreachable,
    /// The client sent something the proxy could not parse.
    BadRequest,
    /// Refused in the kernel by the capture programs, before anything left the socket: a socket kind, a bind, an
    /// inbound packet or a datagram the enforcer does not carry (see docs/proxy.md).
    Kernel,
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
    /// Kernel refusals only: how many refusals this record stands for (itself, and those of the same cgroup and
    /// kind before it that the kernel's rate bound left unrecorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

/// What the enforcer did with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Disposition {
    Forwarded,
    Blocked,
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
