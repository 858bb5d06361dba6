//! Inspect: decodes request bodies, classifies a request's protocol (plain HTTP, OpenAI Chat Completions and
//! Responses, Anthropic Messages, Gemini generateContent, MCP JSON-RPC), fills the `llm` and `mcp` parts of the
//! `Action` (one Action per JSON-RPC batch element), and shapes block answers in each protocol's own language.
//! Pure functions over plain data; no I/O. It does not decide anything (policy) and does not rewrite (constrain).

#![forbid(unsafe_code)]

pub mod batch_input;
mod block;
mod decode;
mod keys;
mod llm;
mod mcp;
mod message;
mod method;
mod multipart;
pub mod proposal;
pub mod sse;

use serde::{Deserialize, Serialize};

use crate::model::{Action, Shared};

pub use block::{
    block_batch_response, block_message, block_response, refusal_response, stream_block,
    BlockResponse, StreamBlock, MCP_POLICY_ERROR_CODE,
};
pub use decode::{check_json_charset, content_coding, decode_body, field_list};
pub(crate) use keys::{
    has_twins as json_member_twins, member as json_member, member_name as json_member_name,
    misspelt_within, read_json, twin_members, TwinMembers, Twins,
};
pub(crate) use llm::{gemini_json_name, namespaced_tools, tool_name};
pub(crate) use mcp::ambiguous as ambiguous_json_rpc;
pub use message::{
    classify_message, connection_call, is_realtime_websocket, is_responses_websocket, message_block,
};
pub use method::other_methods;
pub use multipart::{
    check as check_body_encodings, decoded_params as multipart_params, Undecodable,
};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The unsupported coding is kept for callers, but never shown: it is request data.
    #[error("the content-encoding is not supported for inspection (gzip, deflate, br, zstd and identity are)")]
    UnsupportedEncoding(String),
    #[error("the body could not be decoded as {encoding}")]
    Corrupt { encoding: &'static str },
    #[error("decoded body exceeds the inspection limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("the body is not valid JSON for a {protocol} endpoint")]
    BadJson { protocol: &'static str },
    /// JSON in UTF-16/32 or behind a byte-order mark: some servers read it (Python's `json.loads` on bytes does),
    /// inspection does not, so it is refused rather than forwarded unclassified.
    #[error("JSON request bodies must be UTF-8 without a byte-order mark (RFC 8259)")]
    NotUtf8Json,
    /// An object names one member twice, or two whose names differ only in letter case where a reader looks the
    /// name up (a protocol member, a member a condition's JSONPath selects): decoders read such JSON differently
    /// (first or last, case-sensitive or not), so what the policy read may not be what the receiver acts on (see
    /// `keys`).
    #[error("an object in the JSON body names a member twice (or twice in different letter case)")]
    TwinMembers,
    /// Text the receiver decodes in a way inspection does not: a charset that does not spell ASCII as ASCII, a
    /// multipart part's own transfer or content coding, a boundary or content type that reads more than one way.
    #[error(transparent)]
    Encoded(Undecodable),
    /// The request names a method in a `_method` part of a multipart body, whose value is not read (see `method`):
    /// the upstream may route it as a method no reading was decided under.
    #[error("the request names a method in a multipart part (a method override that is not read)")]
    MethodOverride,
    /// The request reads more than one way (a method override, a field the policy reads given several values, a
    /// backslash in the path: `proxy::readings`) and the policy decides the readings differently, or it reads too
    /// many ways to decide each: the receiver may act on a reading the enforced decision did not see.
    #[error("the request reads more than one way: {0}")]
    Readings(String),
    /// A batch input file (or a batch naming one) that cannot be read as the provider's Batch API reads it: its
    /// calls would run undecided. The message names what is wrong, never the data.
    #[error("the batch input cannot be read: {0}")]
    BatchInput(&'static str),
}

/// An LLM provider whose API shapes are understood.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    OpenAi,
    Anthropic,
    Gemini,
}

impl Provider {
    /// The name used in `Action.llm.provider`.
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::Anthropic => "anthropic",
            Provider::Gemini => "gemini",
        }
    }
}

/// Which LLM endpoint a request calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LlmApi {
    /// OpenAI `POST /v1/chat/completions`.
    ChatCompletions,
    /// OpenAI `POST /v1/responses`.
    Responses,
    /// Anthropic `POST /v1/messages`.
    Messages,
    /// Gemini `POST .../models/{model}:generateContent` or `:streamGenerateContent` (also `tunedModels/`).
    GenerateContent,
    /// The other calls that send content to a model: OpenAI legacy `POST /v1/completions` and `POST
    /// /v1/embeddings`, Anthropic legacy `POST /v1/complete`, Gemini `:embedContent`, `:batchEmbedContents` and
    /// `:countTokens`. Model and stream flag only; they declare no tools.
    Other,
}

impl LlmApi {
    /// The provider whose request, answer and error shapes the call uses: OpenAI's for Chat Completions and
    /// Responses, Anthropic's for Messages, Gemini's for generateContent, whichever provider's host serves it; the
    /// host's provider (`host`) for the other calls.
    pub fn shape(self, host: Provider) -> Provider {
        match self {
            LlmApi::ChatCompletions | LlmApi::Responses => Provider::OpenAi,
            LlmApi::Messages => Provider::Anthropic,
            LlmApi::GenerateContent => Provider::Gemini,
            LlmApi::Other => host,
        }
    }
}

/// What a JSON-RPC message is, as far as its block answer is concerned.
#[derive(Debug, Clone, PartialEq)]
pub struct McpMessage {
    /// The request id, echoed in the answer; `None` for notifications and for messages without an id.
    pub id: Option<serde_json::Value>,
    /// The JSON-RPC method; `response` for a JSON-RPC response the client sends back to the server.
    pub method: String,
}

impl McpMessage {
    /// Notifications (and responses) expect no answer of their own.
    pub fn expects_answer(&self) -> bool {
        self.id.is_some() && self.method != mcp::RESPONSE_METHOD
    }
}

/// Which protocol a request speaks, with what the block answer needs to echo back.
#[derive(Debug, Clone, PartialEq)]
pub enum Protocol {
    /// Anything not recognised below.
    Http,
    /// A request to a provider's host that is not one of the recognised LLM calls (e.g. `GET /v1/models`): its
    /// block answer still uses the provider's error shape.
    Provider(Provider),
    /// A recognised LLM API call; `provider` is the one whose shapes the API uses ([`LlmApi::shape`]): OpenAI's for
    /// Chat Completions on Anthropic's or Gemini's host.
    Llm { provider: Provider, api: LlmApi },
    /// MCP JSON-RPC over HTTP (Streamable HTTP, or a POST of the older HTTP+SSE transport). `messages` has one
    /// element for a single message and one per element, in order, for a batch array.
    Mcp {
        batch: bool,
        messages: Vec<McpMessage>,
    },
}

/// The outcome of classification: the protocol and one Action per thing the request asks for (one for plain HTTP
/// and LLM calls, one per element of an MCP batch, in the same order as `Protocol::Mcp::messages`).
#[derive(Debug, Clone)]
pub struct Inspected {
    pub protocol: Protocol,
    pub actions: Vec<Action>,
    /// Set when the request carries LLM calls for a provider to run later (the elements of an Anthropic Message
    /// Batch, the lines of a batch input file, those of a Gemini input file a create names) rather than being one
    /// call itself: a rewrite written for one call's body cannot reach them.
    pub carried: Option<Carried>,
    /// The batch input files a batch create names ([`batch_input::named_inputs`]): each must have been read when it
    /// was uploaded, its lines decided, for the batch to run.
    pub inputs: Vec<batch_input::NamedInput>,
}

/// What carries the LLM calls of a request that carries them for later ([`Inspected::carried`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// An Anthropic Message Batch create (`POST /v1/messages/batches`): one call per `requests[].params`.
    MessageBatch,
    /// An OpenAI eval or eval run (`POST …/evals`, `…/evals/{id}/runs`): one call per model the provider runs.
    Eval,
    /// An uploaded batch input file; the upstream's answer names the file as given. OpenAI's: one call per line.
    /// Gemini's: the upload's own Action, its lines read and decided at the create that names the file.
    InputFile(batch_input::StoredAs),
    /// A Gemini batch create naming an input file kept since its upload: the file's lines are its calls
    /// ([`batch_input::InputLines`]), in the file the upstream holds.
    InputLines,
}

/// Settings for recognising providers, filled from the daemon config. Hosts are compared case-insensitively,
/// without a trailing dot; an entry may carry a port (`127.0.0.1:8443`) to match only that port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InspectConfig {
    pub openai_hosts: Vec<String>,
    pub anthropic_hosts: Vec<String>,
    pub gemini_hosts: Vec<String>,
    /// Extra hosts (or `host:port`) treated as a provider, e.g. a provider-compatible test server. Checked first.
    pub provider_overrides: Vec<ProviderOverride>,
}

/// One host recognised as a provider regardless of the lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderOverride {
    pub host: String,
    pub provider: Provider,
}

impl Default for InspectConfig {
    fn default() -> Self {
        InspectConfig {
            openai_hosts: vec!["api.openai.com".into()],
            anthropic_hosts: vec!["api.anthropic.com".into()],
            gemini_hosts: vec!["generativelanguage.googleapis.com".into()],
            provider_overrides: Vec::new(),
        }
    }
}

impl InspectConfig {
    /// The provider serving `host` (optionally on `port`), if any.
    pub fn provider_for(&self, host: &str, port: u16) -> Option<Provider> {
        let host = crate::host::normalise(host);
        let matches = |entry: &str| host_matches(entry, &host, port);
        if let Some(o) = self.provider_overrides.iter().find(|o| matches(&o.host)) {
            return Some(o.provider);
        }
        [
            (&self.openai_hosts, Provider::OpenAi),
            (&self.anthropic_hosts, Provider::Anthropic),
            (&self.gemini_hosts, Provider::Gemini),
        ]
        .into_iter()
        .find(|(list, _)| list.iter().any(|e| matches(e)))
        .map(|(_, p)| p)
    }
}

/// `entry` is `host`, `host:port`, `[v6]` or `[v6]:port`.
fn host_matches(entry: &str, host: &str, port: u16) -> bool {
    let entry = crate::host::normalise(entry);
    let (entry_host, entry_port) = crate::host::split_host_port(&entry);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    entry_host == host && entry_port.is_none_or(|p| p == port)
}

/// Classify the request in `action.http` and return the Actions to decide. A recognised LLM call whose body is not
/// JSON is an error (the proxy refuses it); MCP is recognised by the JSON-RPC shape of the body on any host.
pub fn classify(mut action: Action, cfg: &InspectConfig) -> Result<Inspected, InspectError> {
    let Some(http) = action.http.as_mut() else {
        return Ok(Inspected {
            carried: None,
            inputs: Vec::new(),
            protocol: Protocol::Http,
            actions: vec![action],
        });
    };
    let raw_path = http.path.split('?').next().unwrap_or_default();
    let path = canonical_path(raw_path);
    // The policy matches the path as the upstream's router will read it, so `/%61dmin` or `/admin;x` cannot
    // dodge a rule written for `/admin/**`. The audit record keeps the path as sent.
    http.path = policy_path(raw_path, &path);
    let host = action
        .transport
        .host
        .as_deref()
        .or_else(|| http.headers.get("host"))
        .map(|h| crate::host::authority_host(h).to_string());
    let provider = host
        .as_deref()
        .and_then(|h| cfg.provider_for(h, action.transport.port));
    action.transport.provider = provider.map(|p| p.as_str().to_string());

    // A member named twice: a receiver may read either value (see `keys`). Members named alike only once folded
    // are refused where a reader looks the name up: the protocol members below (`misspelt`), and the members a
    // condition's JSONPath selects (`Policy::reads_twin_member`).
    // A `json` already set was read with `keys::read_json` too (the proxy's classify phase parses once for every
    // reading of a request), so it names no member twice.
    if http.json.is_none() && !http.body.trim().is_empty() {
        http.json = keys::read_json(&http.body, keys::Twins::Exact)
            .map_err(|keys::TwinMembers| InspectError::TwinMembers)?
            .map(Shared::new);
    }

    if let Some(provider) = provider {
        if let Some(api) = llm::endpoint(&http.method, &path) {
            // `llm.provider` is the host's provider; the protocol, the shape the call is read and answered in.
            let shape = api.shape(provider);
            let Some(json) = http.json.as_ref() else {
                return Err(InspectError::BadJson {
                    protocol: shape.as_str(),
                });
            };
            let protocol = Protocol::Llm {
                provider: shape,
                api,
            };
            if llm::eval(&http.method, &path) {
                // An eval or a run of one: one Action per model the provider is asked to call.
                let calls = llm::eval_calls(provider, json).ok_or(InspectError::BadJson {
                    protocol: shape.as_str(),
                })?;
                return Ok(carried_calls(&action, protocol, Carried::Eval, calls));
            }
            if llm::message_batch_create(&http.method, &path) {
                // Each `requests[].params` decided as the `/v1/messages` body it is: one Action each, as a JSON-RPC
                // batch's elements are, so each names its own model. The http part is shared.
                let calls: Vec<crate::model::LlmCall> = llm::message_batch_params(json)
                    .filter(|p| !p.is_empty())
                    .ok_or(InspectError::BadJson {
                        protocol: shape.as_str(),
                    })?
                    .into_iter()
                    .map(|p| llm::describe(provider, LlmApi::Messages, &path, &http.query, p))
                    .collect();
                return Ok(carried_calls(
                    &action,
                    protocol,
                    Carried::MessageBatch,
                    calls,
                ));
            }
            let misread = if shape == Provider::Gemini {
                llm::gemini_misread(&path, json)
            } else {
                llm::misread(json)
            };
            if misread {
                return Err(InspectError::BadJson {
                    protocol: shape.as_str(),
                });
            }
            let inputs = batch_input::named_inputs(provider, &http.method, &path, Some(json))?;
            let call = llm::describe(provider, api, &path, &http.query, json);
            action.llm = Some(call);
            return Ok(Inspected {
                carried: None,
                inputs,
                protocol,
                actions: vec![action],
            });
        }
    }

    if let Some(provider) = provider {
        if let Some(file) = batch_input::upload(provider, http, &path)? {
            return Ok(input_file(action, provider, file));
        }
    }

    // The files a batch create names, whatever else its body reads as (a JSON-RPC message too): each must have been
    // read when it was uploaded.
    let inputs = match provider {
        Some(p) => batch_input::named_inputs(p, &http.method, &path, http.json.as_deref())?,
        None => Vec::new(),
    };

    // A file's bytes sent to Gemini's upload endpoint are stored, not read as a request (batch input was read
    // above): a JSON Lines data file is not refused as JSON that does not parse, nor read as JSON-RPC.
    if provider == Some(Provider::Gemini) && batch_input::gemini_media(http, &path) {
        return Ok(Inspected {
            carried: None,
            inputs,
            protocol: Protocol::Provider(Provider::Gemini),
            actions: vec![action],
        });
    }

    if http.method.eq_ignore_ascii_case("POST") {
        // A body an MCP client marks as MCP (its session or protocol-version header) must be JSON-RPC that can be
        // read; otherwise the server might read a tool call the policy never saw.
        if http.json.is_none() && !http.body.trim().is_empty() && mcp::marked(&http.headers) {
            return Err(InspectError::BadJson { protocol: "MCP" });
        }
    }
    // A body that says it is JSON and does not parse is refused, never decided as something else: servers parse
    // more leniently (NaN, Infinity, 1e400, deeper nesting) and could read a JSON-RPC call the policy never saw.
    if http.json.is_none() && claims_json(http.content_type.as_deref(), &http.body) {
        return Err(InspectError::BadJson { protocol: "JSON" });
    }
    if http.method.eq_ignore_ascii_case("POST") {
        if let Some(json) = http.json.as_ref() {
            if mcp::ambiguous(json) {
                return Err(InspectError::BadJson { protocol: "MCP" });
            }
            if let Some(elements) = mcp::parse(json) {
                let session = mcp::session_id(&http.headers, &http.query);
                let batch = json.is_array();
                let mut messages = Vec::with_capacity(elements.len());
                let mut actions = Vec::with_capacity(elements.len());
                for (message, mut call) in elements {
                    call.session.clone_from(&session);
                    let mut a = action.clone();
                    a.mcp = Some(call);
                    actions.push(a);
                    messages.push(message);
                }
                return Ok(Inspected {
                    carried: None,
                    inputs,
                    protocol: Protocol::Mcp { batch, messages },
                    actions,
                });
            }
        }
    }

    let protocol = match provider {
        Some(p) => Protocol::Provider(p),
        None => Protocol::Http,
    };
    Ok(Inspected {
        carried: None,
        inputs,
        protocol,
        actions: vec![action],
    })
}

/// The Actions of a request that carries `calls` for later (`carried`): one per call, each `action` with the call's
/// `llm`, the http part shared.
fn carried_calls(
    action: &Action,
    protocol: Protocol,
    carried: Carried,
    calls: Vec<crate::model::LlmCall>,
) -> Inspected {
    let actions = calls
        .into_iter()
        .map(|call| {
            let mut a = action.clone();
            a.llm = Some(call);
            a
        })
        .collect();
    Inspected {
        protocol,
        actions,
        carried: Some(carried),
        inputs: Vec::new(),
    }
}

/// The Actions of a batch input file uploaded to a host of `provider`. OpenAI's lines (each naming its model): one
/// Action per line, each the LLM call the line asks for, as the same body sent to its endpoint would be decided (its
/// `http` is the upload's, with the line's method, endpoint path and body as its JSON; the text detectors read is
/// the whole upload's). Gemini's lines name no model, which the create does: the upload is its own one Action, the
/// request it is, and its lines are decided at the create ([`batch_input::InputLines`]). A file without lines is the
/// upload's one Action.
fn input_file(action: Action, provider: Provider, file: batch_input::InputFile) -> Inspected {
    let stored_as = file.stored_as;
    let carried = Some(Carried::InputFile(stored_as));
    if stored_as == batch_input::StoredAs::FileName {
        return Inspected {
            protocol: Protocol::Provider(Provider::Gemini),
            actions: vec![action],
            carried,
            inputs: Vec::new(),
        };
    }
    let mut actions = Vec::with_capacity(file.calls.len().max(1));
    for call in file.calls {
        let mut a = action.clone();
        let path = if call.path.is_empty() {
            a.http.as_ref().map(|h| h.path.clone()).unwrap_or_default()
        } else {
            call.path
        };
        a.llm = Some(llm::describe(
            provider,
            call.api,
            &path,
            &crate::model::Pairs::default(),
            &call.body,
        ));
        if let Some(http) = a.http.as_mut() {
            http.method = "POST".to_string();
            http.path = path;
            http.json = Some(Shared::new(call.body));
        }
        actions.push(a);
    }
    if actions.is_empty() {
        actions.push(action);
    }
    // Refused in the shape of the API the file was uploaded with: OpenAI's Files API (Gemini serves it too,
    // under `/v1beta/openai/`, to the OpenAI SDK) or Gemini's own.
    let shape = match stored_as {
        batch_input::StoredAs::FileId => Provider::OpenAi,
        batch_input::StoredAs::FileName => Provider::Gemini,
    };
    Inspected {
        protocol: Protocol::Provider(shape),
        actions,
        carried,
        inputs: Vec::new(),
    }
}

/// Whether a body claims to be JSON: by its media type (`*/json`, `*/*+json`) or by its shape (its first
/// non-whitespace character opens an object or an array).
pub fn claims_json(content_type: Option<&str>, body: &str) -> bool {
    let by_type = content_type.is_some_and(|ct| {
        let ct = ct
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase();
        ct.ends_with("/json") || ct.ends_with("+json")
    });
    let trimmed = body.trim_start();
    !trimmed.is_empty() && (by_type || trimmed.starts_with(['{', '[']))
}

/// The provider of a request to an LLM endpoint (`POST /v1/chat/completions`, `/v1/messages`, …) on a provider's
/// host, known from the host and the path alone: what the record of such a request names as `llm_provider` even when
/// its body could not be read. `None` for any other request.
pub fn claimed_llm_provider(action: &Action, cfg: &InspectConfig) -> Option<Provider> {
    let http = action.http.as_ref()?;
    let provider = host_provider(action, cfg)?;
    let path = routed_path(http);
    llm::endpoint(&http.method, &path).map(|_| provider)
}

/// Whether `method path` (the request's path as sent) may upload a batch input file (`POST …/files`, matched as the
/// LLM endpoints are): its body, a form, may carry lines of JSON ([`batch_input::upload`]) whatever it opens with.
pub fn may_upload_batch_input(method: &str, path: &str) -> bool {
    method.eq_ignore_ascii_case("POST")
        && llm::lenient_lower(&canonical_path(path.split('?').next().unwrap_or_default()))
            .ends_with("/files")
}

/// The file a request to a provider's host may delete or replace, by its id (the last segment of its name:
/// `abc` for `files/abc`): any request but a `GET` or `HEAD` without a method override to `…/files/{id}` (with a
/// `:method` after it, or the OpenAI-compatible `…/openai/files/{id}`), matched as the LLM endpoints are. `None` for
/// any other request.
pub fn touched_file(action: &Action, cfg: &InspectConfig) -> Option<String> {
    let http = action.http.as_ref()?;
    host_provider(action, cfg)?;
    let reads = ["GET", "HEAD"]
        .iter()
        .any(|m| http.method.eq_ignore_ascii_case(m))
        && other_methods(http).is_some_and(|o| o.is_empty());
    if reads {
        return None;
    }
    let path = llm::lenient_lower(&routed_path(http));
    let (_, id) = path.rsplit_once("/files/")?;
    let id = id.rsplit('/').next()?;
    let id = id.split(':').next().unwrap_or_default();
    (!id.is_empty()).then(|| id.to_string())
}

/// The protocol a request speaks as far as its answer's shape is concerned, when it could not be classified (its
/// body did not parse): an LLM endpoint or another request to a provider's host gets the provider's error shape, a
/// request carrying MCP headers or JSON-RPC text gets a JSON-RPC error, anything else the enforcer's own.
pub fn claimed_protocol(action: &Action, cfg: &InspectConfig) -> Protocol {
    let Some(http) = action.http.as_ref() else {
        return Protocol::Http;
    };
    let provider = host_provider(action, cfg);
    if let Some(provider) = provider {
        let path = routed_path(http);
        return match llm::endpoint(&http.method, &path) {
            Some(api) => Protocol::Llm {
                provider: api.shape(provider),
                api,
            },
            None => Protocol::Provider(provider),
        };
    }
    if mcp::marked(&http.headers) || http.body.contains("\"jsonrpc\"") {
        return Protocol::Mcp {
            batch: http.body.trim_start().starts_with('['),
            messages: Vec::new(),
        };
    }
    Protocol::Http
}

/// The provider and LLM API whose answer the request of `action` (classified as `protocol`) receives, to be read for
/// proposed tool calls: a create endpoint's ([`Protocol::Llm`]), or an endpoint on a provider host that fetches
/// such an answer again ([`llm::retrieval`]).
pub fn answered_api(protocol: &Protocol, action: &Action) -> Option<(Provider, LlmApi)> {
    match *protocol {
        Protocol::Llm { provider, api } => Some((provider, api)),
        Protocol::Provider(provider) => {
            let http = action.http.as_ref()?;
            let path = routed_path(http);
            llm::retrieval(provider, &http.method, &path).map(|api| (provider, api))
        }
        _ => None,
    }
}

/// The batch results the request of `action` (classified as `protocol`) fetches, each line an LLM answer to be read
/// for proposed tool calls ([`proposal::batch`]): an Anthropic Message Batch's results on Anthropic's host
/// ([`llm::message_batch_results`]), an OpenAI file's content on OpenAI's or Gemini's host ([`llm::openai_file_content`])
/// and a file downloaded from Gemini's ([`llm::gemini_file_download`]), each read whole and its lines naming
/// `response` read as batch output. `None` for any other request.
pub fn answered_batch(protocol: &Protocol, action: &Action) -> Option<proposal::batch::Batch> {
    use proposal::batch::Batch;
    let Protocol::Provider(provider) = *protocol else {
        return None;
    };
    let http = action.http.as_ref()?;
    let path = routed_path(http);
    if llm::message_batch_results(provider, &http.method, &path) {
        Some(Batch::MessageBatch)
    } else if llm::gemini_file_download(provider, &http.method, &path) {
        Some(Batch::GeminiOutput)
    } else {
        llm::openai_file_content(provider, &http.method, &path).then_some(Batch::OpenAiOutput)
    }
}

/// The provider whose host `action` connects to ([`InspectConfig::provider_for`] of its transport's host and port).
fn host_provider(action: &Action, cfg: &InspectConfig) -> Option<Provider> {
    action
        .transport
        .host
        .as_deref()
        .and_then(|h| cfg.provider_for(h, action.transport.port))
}

/// The request's path without its query, as a provider's router reads it ([`canonical_path`]).
fn routed_path(http: &crate::model::HttpRequest) -> String {
    canonical_path(http.path.split('?').next().unwrap_or_default())
}

/// The path as a provider's router is likely to see it, so an LLM call cannot dodge classification by spelling:
/// percent-escapes decoded, `;parameters` cut from each segment (up to a last `:`, the method of a Google API path),
/// empty and `.` segments dropped, `..` resolved.
fn canonical_path(path: &str) -> String {
    let decoded = crate::encoding::percent_decode(path, false);
    let mut segments: Vec<std::borrow::Cow<'_, str>> = Vec::new();
    for segment in decoded.split('/') {
        // A `;parameter` is cut from its segment, up to a Google method's `:` (`models/{model};x:generateContent`
        // is `models/{model}:generateContent`: the method follows the last colon, `gemini_target`).
        let segment = match segment.split_once(';') {
            Some((kept, params)) => match params.rsplit_once(':') {
                Some((_, verb)) => std::borrow::Cow::Owned(format!("{kept}:{verb}")),
                None => std::borrow::Cow::Borrowed(kept),
            },
            None => std::borrow::Cow::Borrowed(segment),
        };
        match segment.as_ref() {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            _ => segments.push(segment),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in segments {
        out.push('/');
        out.push_str(&s);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// The path the policy matches: `canonical` (the [`canonical_path`] of `raw`) with the trailing slash the client
/// sent, so a rule can still tell `/dir/` from `/dir`.
fn policy_path(raw: &str, canonical: &str) -> String {
    let trailing = raw.ends_with('/') || raw.to_ascii_lowercase().ends_with("%2f");
    let mut path = canonical.to_string();
    if trailing && path != "/" {
        path.push('/');
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_port_forms() {
        assert!(host_matches("[FD77::2]:443", "fd77::2", 443));
        assert!(!host_matches("[fd77::2]:443", "fd77::2", 80));
        assert!(host_matches("api.openai.com.", "api.openai.com", 1));
    }

    #[test]
    fn the_policy_sees_the_canonical_path_with_its_trailing_slash() {
        let cases = [
            ("/%61dmin/users", "/admin/users"),
            ("/admin;x=1/users", "/admin/users"),
            ("//admin//users/", "/admin/users/"),
            ("/repos/acme%2Fwidgets", "/repos/acme/widgets"),
            ("/dir%2F", "/dir/"),
            ("/", "/"),
            ("", "/"),
        ];
        for (raw, want) in cases {
            assert_eq!(policy_path(raw, &canonical_path(raw)), want, "{raw}");
        }
    }

    #[test]
    fn paths_are_canonical_before_endpoint_matching() {
        assert_eq!(
            canonical_path("/v1/chat/completions"),
            "/v1/chat/completions"
        );
        assert_eq!(
            canonical_path("/v1/%63hat/completions"),
            "/v1/chat/completions"
        );
        assert_eq!(
            canonical_path("//v1/./x/../chat//completions/"),
            "/v1/chat/completions"
        );
        assert_eq!(canonical_path("/v1/messages;jsessionid=1"), "/v1/messages");
        assert_eq!(
            canonical_path("/v1beta/models/evil-x;foo:generateContent"),
            "/v1beta/models/evil-x:generateContent"
        );
        assert_eq!(
            canonical_path("/v1beta/models/evil-x%3Bfoo=a:b:generateContent/"),
            "/v1beta/models/evil-x:generateContent"
        );
        assert_eq!(
            canonical_path("/v1beta/models/evil-x:generateContent;x"),
            "/v1beta/models/evil-x:generateContent"
        );
        assert_eq!(
            canonical_path("/v1/chat%2Fcompletions"),
            "/v1/chat/completions"
        );
        assert_eq!(canonical_path("/%zz/%4"), "/%zz/%4");
        assert_eq!(canonical_path("/../.."), "/");
        assert_eq!(canonical_path(""), "/");
        assert_eq!(
            canonical_path("/v1beta/models/gemini-2.5-pro%3AgenerateContent"),
            "/v1beta/models/gemini-2.5-pro:generateContent"
        );
    }

    /// Each element of a JSON-RPC batch is one Action, and all of them share the one request (head, body and parsed
    /// JSON) and agent: a copy per element made a 3 MB batch of 40,000 elements hold 16 GB.
    #[test]
    fn the_actions_of_a_batch_share_the_request() {
        use crate::model::{HttpRequest, Shared, Transport};
        let batch: Vec<String> = (0..2000)
            .map(|i| {
                format!(
                    r#"{{"jsonrpc":"2.0","id":{i},"method":"tools/call","params":{{"name":"t{i}","arguments":{{}}}}}}"#
                )
            })
            .collect();
        let action = Action {
            transport: Transport {
                host: Some("mcp.example.com".into()),
                port: 443,
                ..Transport::default()
            },
            http: Some(Shared::new(HttpRequest {
                method: "POST".into(),
                path: "/mcp".into(),
                body: format!("[{}]", batch.join(",")).into(),
                ..HttpRequest::default()
            })),
            ..Action::default()
        };
        let out = classify(action, &InspectConfig::default()).unwrap();
        assert_eq!(out.actions.len(), 2000);
        let first = out.actions[0].http.as_ref().unwrap();
        assert!(first.json.as_ref().is_some_and(|j| j.is_array()));
        for (i, a) in out.actions.iter().enumerate() {
            assert!(Shared::same(a.http.as_ref().unwrap(), first), "element {i}");
            assert!(Shared::same(&a.agent, &out.actions[0].agent), "element {i}");
            let tool = a.mcp.as_ref().and_then(|m| m.tool.clone());
            assert_eq!(tool, Some(format!("t{i}")));
        }
    }

    #[test]
    fn each_request_of_a_message_batch_is_one_messages_call() {
        use crate::model::{HttpRequest, Shared, Transport};
        let action = |path: &str, body: &str| Action {
            transport: Transport {
                host: Some("api.anthropic.com".into()),
                port: 443,
                ..Transport::default()
            },
            http: Some(Shared::new(HttpRequest {
                method: "POST".into(),
                path: path.into(),
                body: body.into(),
                ..HttpRequest::default()
            })),
            ..Action::default()
        };
        let cfg = InspectConfig::default();
        let body = r#"{"requests":[
            {"custom_id":"a","params":{"model":"m-a","max_tokens":1,"messages":[],
              "tools":[{"name":"read_file","input_schema":{}},{"type":"web_search_20250305","name":"web_search"}]}},
            {"custom_id":"b","params":{"model":"m-b","max_tokens":1,"stream":true,"messages":[{"role":"user",
              "content":[{"type":"tool_result","tool_use_id":"t","content":"x"}]}]}}]}"#;
        for path in [
            "/v1/messages/batches",
            "/V1/MESSAGES/BATCHES/",
            "/proxy/v1/messages//batches",
            "/v1/messages/batches?beta=true",
        ] {
            let out = classify(action(path, body), &cfg).unwrap();
            assert!(
                matches!(
                    out.protocol,
                    Protocol::Llm {
                        provider: Provider::Anthropic,
                        api: LlmApi::Other
                    }
                ),
                "{path}: {:?}",
                out.protocol
            );
            let calls: Vec<_> = out.actions.iter().map(|a| a.llm.clone().unwrap()).collect();
            assert_eq!(calls.len(), 2, "{path}");
            assert_eq!(calls[0].model.as_deref(), Some("m-a"));
            assert_eq!(calls[0].tools, ["read_file", "web_search"]);
            assert!(!calls[0].has_tool_results && !calls[0].stream);
            assert_eq!(calls[1].model.as_deref(), Some("m-b"));
            assert!(calls[1].tools.is_empty() && calls[1].has_tool_results && calls[1].stream);
            let first = out.actions[0].http.as_ref().unwrap();
            assert!(Shared::same(out.actions[1].http.as_ref().unwrap(), first));
            assert_eq!(out.carried, Some(Carried::MessageBatch), "{path}");
        }
        for bad in [
            "[]",
            r#"{"requests":{}}"#,
            r#"{"requests":[]}"#,
            r#"{"requests":[1]}"#,
            r#"{"requests":[{"custom_id":"a"}]}"#,
            r#"{"requests":[{"custom_id":"a","params":[]}]}"#,
            r#"{"Requests":[{"custom_id":"a","params":{"model":"m"}}],"requests":[]}"#,
            r#"{"requests":[{"custom_id":"a","params":{"model":"m"},"PARAMS":{"model":"x"}}]}"#,
            r#"{"requests":[{"custom_id":"a","params":{"model":"m","Tools":[{"name":"x"}]}}]}"#,
        ] {
            let got = classify(action("/v1/messages/batches", bad), &cfg);
            assert!(
                matches!(
                    got,
                    Err(InspectError::BadJson {
                        protocol: "anthropic"
                    })
                ),
                "{bad}: {got:?}"
            );
        }
        // Reading a batch's results, listing batches: not a create.
        assert!(!llm::message_batch_create("GET", "/v1/messages/batches"));
        assert!(!llm::message_batch_create(
            "POST",
            "/v1/messages/batches/b1/cancel"
        ));
    }

    #[test]
    fn a_request_that_may_delete_a_file_names_it() {
        use crate::model::{HttpRequest, Pairs, Transport};
        let action = |method: &str, path: &str, headers: &[(&str, &str)]| Action {
            transport: Transport {
                host: Some("generativelanguage.googleapis.com".into()),
                port: 443,
                ..Transport::default()
            },
            http: Some(
                HttpRequest {
                    method: method.into(),
                    path: path.into(),
                    headers: Pairs(
                        headers
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                    ),
                    ..HttpRequest::default()
                }
                .into(),
            ),
            ..Action::default()
        };
        let cfg = InspectConfig::default();
        let override_delete = [("x-http-method-override", "DELETE")];
        for (a, want) in [
            (action("DELETE", "/v1beta/files/abc", &[]), Some("abc")),
            (action("delete", "/V1BETA/Files/abc/", &[]), Some("abc")),
            (
                action("DELETE", "/v1beta/openai/files/files%2Fabc", &[]),
                Some("abc"),
            ),
            (action("POST", "/v1beta/files/abc:delete", &[]), Some("abc")),
            (
                action("GET", "/v1beta/files/abc", &override_delete),
                Some("abc"),
            ),
            (action("GET", "/v1beta/files/abc", &[]), None),
            (action("DELETE", "/v1beta/batches/abc", &[]), None),
            (action("POST", "/upload/v1beta/files", &[]), None),
        ] {
            let path = a.http.as_ref().unwrap().path.clone();
            assert_eq!(touched_file(&a, &cfg).as_deref(), want, "{path}");
        }
    }

    #[test]
    fn a_disguised_llm_path_is_still_an_llm_call() {
        use crate::model::{HttpRequest, Transport};
        let action = |path: &str, body: &str| Action {
            transport: Transport {
                host: Some("api.openai.com".into()),
                port: 443,
                ..Transport::default()
            },
            http: Some(
                HttpRequest {
                    method: "POST".into(),
                    path: path.into(),
                    body: body.into(),
                    ..HttpRequest::default()
                }
                .into(),
            ),
            ..Action::default()
        };
        let cfg = InspectConfig::default();
        for path in [
            "/v1/%63hat/completions",
            "/v1//chat/completions",
            "/v1/x/../chat/completions",
            "/v1/chat/completions;x",
        ] {
            let out = classify(action(path, r#"{"model":"gpt-x","messages":[]}"#), &cfg).unwrap();
            assert!(
                matches!(
                    out.protocol,
                    Protocol::Llm {
                        provider: Provider::OpenAi,
                        api: LlmApi::ChatCompletions
                    }
                ),
                "{path}: {:?}",
                out.protocol
            );
            assert_eq!(
                out.actions[0].llm.as_ref().and_then(|l| l.model.as_deref()),
                Some("gpt-x")
            );
            // And, being an LLM call, a body that is not JSON is refused rather than passed as plain HTTP.
            assert!(matches!(
                classify(action(path, "not json"), &cfg),
                Err(InspectError::BadJson { .. })
            ));
        }
    }
}
