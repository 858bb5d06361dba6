//! LLM API classification: which endpoint a request on a provider host calls, and the few fields of its body the
//! policy acts on (model, stream flag, declared tools including hosted MCP servers, presence of tool results).
//! Everything else in the body is left alone.

use serde_json::Value;

use super::keys::misspelt;

use super::{LlmApi, Provider};
use crate::model::{LlmCall, Pairs};

/// The LLM endpoint `method path` calls on a provider's host, if it is one, read from the path's shape whichever
/// provider's host it is: Anthropic and Gemini serve OpenAI's Chat Completions too
/// (`api.anthropic.com/v1/chat/completions`, Gemini `/v1beta/openai/chat/completions` and `/embeddings`), called by
/// the OpenAI SDK with a `base_url`.
///
/// Every provider's paths are matched without regard to ASCII case (`/v1/Responses` is the Responses API,
/// `/V1BETA/Models/{model}:GenerateContent` Gemini's generateContent) and as [`lenient`] reads them: a gateway or
/// server that routes paths so serves them, and reading them costs nothing where the real API answers 404.
pub(super) fn endpoint(method: &str, path: &str) -> Option<LlmApi> {
    let path = lenient(path);
    let path = path.as_ref();
    let lower = path.to_ascii_lowercase();
    if method.eq_ignore_ascii_case("PATCH") {
        // Gemini `cachedContents.patch` (`PATCH /v1beta/{cachedContent.name=cachedContents/*}`): its body is a
        // CachedContent, read as a create's is. `batches.updateGenerateContentBatch` and `.updateEmbedContentBatch`
        // (`PATCH /v1beta/{…name=batches/*}:update…Batch`): its body is a batch, read as a create's `batch` is.
        let update = lower.ends_with(":updategeneratecontentbatch")
            || lower.ends_with(":updateembedcontentbatch");
        return (cached_content(&lower, true) || update).then_some(LlmApi::GenerateContent);
    }
    if !method.eq_ignore_ascii_case("POST") {
        return None;
    }
    let ends = |suffix: &str| lower.ends_with(suffix);
    if cached_content(&lower, false) {
        Some(LlmApi::GenerateContent)
    } else if ends("/chat/completions") {
        Some(LlmApi::ChatCompletions)
    } else if ends("/responses") {
        Some(LlmApi::Responses)
    } else if ends("/completions") || ends("/embeddings") {
        Some(LlmApi::Other)
    } else if ends("/v1/messages") || lower == "/messages" {
        Some(LlmApi::Messages)
    } else if ends("/v1/complete") || lower == "/complete" {
        Some(LlmApi::Other)
    } else if eval_path(&lower) {
        // An OpenAI eval or a run of one: the provider calls the models it names ([`eval_calls`]).
        Some(LlmApi::Other)
    } else if ends("/messages/batches") {
        // An Anthropic Message Batch create: each element a Messages call ([`message_batch_params`]), one Action
        // each; its answer is a batch object, not a message, hence not read as one.
        Some(LlmApi::Other)
    } else {
        gemini_target(path).map(|t| t.api)
    }
}

/// The LLM API whose answer `method path` fetches again on a host of `provider`, when it is not a create endpoint:
/// the answer is the object a create returns, with the tool calls the agent runs (OpenAI API reference, "Responses":
/// `GET /v1/responses/{response_id}`, whole or with `stream=true` the events again, a background response polled or
/// its stream resumed; `POST /v1/responses/{response_id}/cancel`; "Chat Completions": `GET` and `POST` (update)
/// `/v1/chat/completions/{completion_id}`, a stored completion). The request carries no model or tools: it is no
/// LLM call (`llm` unset), only its answer is read for proposals. The path is read as [`endpoint`] reads one: in
/// any ASCII letter case, as [`lenient`] reads it.
pub(super) fn retrieval(provider: Provider, method: &str, path: &str) -> Option<LlmApi> {
    if provider == Provider::Gemini {
        return gemini_batch(method, path).then_some(LlmApi::GenerateContent);
    }
    if provider != Provider::OpenAi {
        return None;
    }
    // Read as [`endpoint`] reads a create's path (the id is only looked for, never kept).
    let path = lenient(path).to_ascii_lowercase();
    let path = path.as_str();
    let one_id = |prefix: &str| {
        path.rsplit_once(prefix)
            .is_some_and(|(_, id)| !id.is_empty() && !id.contains('/'))
    };
    let get = method.eq_ignore_ascii_case("GET");
    let post = method.eq_ignore_ascii_case("POST");
    let cancel = path
        .strip_suffix("/cancel")
        .and_then(|p| p.rsplit_once("/responses/"))
        .is_some_and(|(_, id)| !id.is_empty() && !id.contains('/'));
    if (get && one_id("/responses/")) || (post && cancel) {
        Some(LlmApi::Responses)
    } else if (get || post) && one_id("/chat/completions/") {
        Some(LlmApi::ChatCompletions)
    } else {
        None
    }
}

/// Whether `method path` fetches Gemini Batch API batches (Gemini API reference, "Batch API": `GET
/// /v1beta/batches/{batch}`, an Operation whose `response` or `metadata.output` holds the `inlinedResponses`, each a
/// generateContent answer; `GET /v1beta/batches`, a listing of them), read with the generateContent answer reader.
/// Matched as [`endpoint`] matches paths.
fn gemini_batch(method: &str, path: &str) -> bool {
    if !method.eq_ignore_ascii_case("GET") {
        return false;
    }
    let lower = lenient(path).to_ascii_lowercase();
    lower.ends_with("/batches")
        || lower
            .rsplit_once("/batches/")
            .is_some_and(|(_, id)| !id.is_empty() && !id.contains('/') && !id.contains(':'))
}

/// Whether `method path` on Gemini's host downloads a file's content (Gemini API reference, "Files"; the Batch API's
/// results file, `batch.dest.fileName`, is fetched so: `GET /download/v1beta/files/{file}:download?alt=media`),
/// whose lines naming `response` are a batch's results (`proposal::batch::read_line`). Matched as [`endpoint`]
/// matches paths; any prefix before `/files/`.
pub(super) fn gemini_file_download(provider: Provider, method: &str, path: &str) -> bool {
    if provider != Provider::Gemini || !method.eq_ignore_ascii_case("GET") {
        return false;
    }
    one_resource(path, "/files/", ":download")
}

/// Whether `method path` on a host of `provider` fetches an Anthropic Message Batch's results (Anthropic API
/// reference, "Retrieve Message Batch Results": `GET /v1/messages/batches/{message_batch_id}/results`, the batch's
/// `results_url`), whose lines are Messages answers with the tool calls the agent runs. Matched as [`endpoint`]
/// matches paths: any prefix, any letter case, the spellings a lenient server routes ([`lenient`]).
pub(super) fn message_batch_results(provider: Provider, method: &str, path: &str) -> bool {
    if provider != Provider::Anthropic || !method.eq_ignore_ascii_case("GET") {
        return false;
    }
    one_resource(path, "/messages/batches/", "/results")
}

/// Whether `method path` creates an Anthropic Message Batch (Anthropic API reference, "Create a Message Batch":
/// `POST /v1/messages/batches`, body `{"requests": [{"custom_id", "params": <a Messages create body>}, …]}`), on
/// whichever provider's host as [`endpoint`] reads its paths: any prefix, any letter case, as [`lenient`] reads it.
/// Each element's `params` is an LLM call ([`message_batch_params`]).
pub(super) fn message_batch_create(method: &str, path: &str) -> bool {
    method.eq_ignore_ascii_case("POST")
        && lenient(path)
            .to_ascii_lowercase()
            .ends_with("/messages/batches")
}

/// The Messages create bodies an Anthropic Message Batch create carries (`requests[].params`, in order), or `None`
/// when the body cannot be read so: not an object, `requests` not an array, an element not an object or without an
/// object `params`, a member of the body or of an element spelt in another letter case (`Requests`, `Params`: a
/// case-insensitive decoder reads it where the policy found nothing), or a `params` that [`misread`] refuses.
pub(super) fn message_batch_params(body: &Value) -> Option<Vec<&Value>> {
    let top = body.as_object()?;
    if misspelt(top, &["requests"]) {
        return None;
    }
    let mut out = Vec::new();
    for element in top.get("requests")?.as_array()? {
        let element = element.as_object()?;
        if misspelt(element, &["custom_id", "params"]) {
            return None;
        }
        let params = element.get("params").filter(|p| p.is_object())?;
        if misread(params) {
            return None;
        }
        out.push(params);
    }
    Some(out)
}

/// Whether the lower-cased `lower` (as [`lenient`] reads it) creates an OpenAI eval or runs one (OpenAI API reference,
/// "Evals": `POST /v1/evals`, `POST /v1/evals/{eval_id}/runs`), for which the provider calls models itself.
fn eval_path(lower: &str) -> bool {
    lower.ends_with("/evals")
        || lower
            .strip_suffix("/runs")
            .and_then(|p| p.rsplit_once("/evals/"))
            .is_some_and(|(_, id)| !id.is_empty() && !id.contains('/'))
}

/// Whether `method path` creates an OpenAI eval or a run of one ([`eval_path`]; any prefix, any letter case).
pub(super) fn eval(method: &str, path: &str) -> bool {
    method.eq_ignore_ascii_case("POST") && eval_path(&lenient(path).to_ascii_lowercase())
}

/// Members of an eval or a run whose values are data, not the eval's own settings: the run's rows (`source`, and
/// the `item` of each), templates' text, metadata, a tool's or a response format's JSON schema. Not looked into for
/// models or misspelt names.
const EVAL_DATA: &[&str] = &[
    "source",
    "item",
    "metadata",
    "content",
    "labels",
    "passing_labels",
    "parameters",
    "schema",
    "input_schema",
];

/// The model calls an OpenAI eval or eval run asks the provider to make (OpenAI API reference, "Evals": a run's
/// `data_source.model` with `data_source.sampling_params.tools`; an eval's model graders, `testing_criteria[]` of
/// type `label_model` or `score_model`, also inside a `multi` grader's `graders`): one [`LlmCall`] per model named
/// at any depth outside the data members ([`EVAL_DATA`]), each with every tool declared beside a model; one without a
/// model when none is named (a run over stored outputs). `None` when the body cannot be read so: not an object, a
/// `model` that is not a string, or a member spelt in another letter case where a case-insensitive decoder would
/// read a model or tools the policy did not.
pub(super) fn eval_calls(provider: Provider, body: &Value) -> Option<Vec<LlmCall>> {
    body.as_object()?;
    let members = [
        "model",
        "tools",
        "data_source",
        "sampling_params",
        "testing_criteria",
        "graders",
    ];
    if super::keys::misspelt_within(body, &members, EVAL_DATA) {
        return None;
    }
    let (mut models, mut tools) = (Vec::new(), Vec::new());
    fn walk(v: &Value, models: &mut Vec<String>, tools: &mut Vec<String>) -> Option<()> {
        match v {
            Value::Object(map) => {
                if let Some(model) = map.get("model") {
                    push_unique(models, model.as_str()?.to_string());
                }
                if map.contains_key("tools") {
                    for t in declared_tools(v) {
                        push_unique(tools, t);
                    }
                }
                for (k, child) in map {
                    if !EVAL_DATA.contains(&k.as_str()) {
                        walk(child, models, tools)?;
                    }
                }
            }
            Value::Array(items) => {
                for item in items {
                    walk(item, models, tools)?;
                }
            }
            _ => {}
        }
        Some(())
    }
    walk(body, &mut models, &mut tools)?;
    let call = |model: Option<String>| LlmCall {
        provider: provider.as_str().to_string(),
        model,
        tools: tools.clone(),
        ..LlmCall::default()
    };
    if models.is_empty() {
        return Some(vec![call(None)]);
    }
    Some(models.into_iter().map(|m| call(Some(m))).collect())
}

/// Whether `method path` on a host of `provider` fetches an OpenAI file's content (OpenAI API reference, "Files":
/// `GET /v1/files/{file_id}/content`; Gemini serves OpenAI's Files and Batch APIs too, under `/v1beta/openai/`),
/// whose lines naming `response` are a Batch's output (`proposal::batch::read_line`). Matched as
/// [`message_batch_results`] is.
pub(super) fn openai_file_content(provider: Provider, method: &str, path: &str) -> bool {
    if provider == Provider::Anthropic || !method.eq_ignore_ascii_case("GET") {
        return false;
    }
    one_resource(path, "/files/", "/content")
}

/// Whether `path`, read as a lenient server routes it ([`lenient`]) in any letter case, ends with `collection`, one
/// resource id (a segment, not empty) and `tail`: `…/files/{file_id}/content`.
fn one_resource(path: &str, collection: &str, tail: &str) -> bool {
    lenient(path)
        .to_ascii_lowercase()
        .strip_suffix(tail)
        .and_then(|p| p.rsplit_once(collection))
        .is_some_and(|(_, id)| !id.is_empty() && !id.contains('/'))
}

/// Whether the lower-cased `lower` is Gemini's `cachedContents` collection (`one`: false; `cachedContents.create`,
/// `POST /v1beta/cachedContents`) or one cached content in it (`one`: true; `cachedContents/{id}`). A CachedContent
/// (Gemini API reference, "Caching") names the `model` it is for and carries `contents`, `tools`, `toolConfig` and
/// `systemInstruction` that every generateContent naming it (`cachedContent`) runs with, so it is read as a
/// generateContent request is.
fn cached_content(lower: &str, one: bool) -> bool {
    if one {
        lower
            .rsplit_once("/cachedcontents/")
            .is_some_and(|(_, id)| !id.is_empty() && !id.contains('/') && !id.contains(':'))
    } else {
        lower.ends_with("/cachedcontents")
    }
}

/// Whether the WebSocket connection at `path` (canonical, without its query) is the OpenAI Responses API's WebSocket
/// mode: the path [`endpoint`] reads as the Responses endpoint over HTTP (any prefix before `/responses`, as a
/// gateway or an SDK's `base_url` puts there), so a `response.create` there is read as a create body is.
pub(super) fn responses_websocket(path: &str) -> bool {
    endpoint("POST", path) == Some(LlmApi::Responses)
}

/// Whether the WebSocket connection at `path` (canonical, without its query) is the OpenAI Realtime API, by the
/// same rule: any prefix before `/realtime`, in any letter case (as [`endpoint`] reads the HTTP paths: a gateway may
/// route them so).
pub(super) fn realtime_websocket(path: &str) -> bool {
    lenient(path).to_ascii_lowercase().ends_with("/realtime")
}

/// `path` (canonical: percent-decoded) as a lenient server may route it: `\` as `/` (IIS and ASP.NET), nothing from a
/// `#` or a `?` on (a fragment or a query sent percent-encoded), and no trailing slashes, dots, spaces or control characters (IIS drops
/// trailing dots and spaces). So `/v1/chat/completions%20`, `/v1/realtime%5C` or `/v1/realtime%23x` are read as the
/// endpoint they may reach, and their answers are read for tool calls; where the real API answers 404 it costs
/// nothing.
fn lenient(path: &str) -> std::borrow::Cow<'_, str> {
    let path = path.split(['#', '?']).next().unwrap_or_default();
    let trailing = lenient_tail;
    if path.contains('\\') {
        std::borrow::Cow::Owned(
            path.replace('\\', "/")
                .trim_end_matches(trailing)
                .to_string(),
        )
    } else {
        std::borrow::Cow::Borrowed(path.trim_end_matches(trailing))
    }
}

/// Whether `path`, as [`lenient`] reads it, ends with `suffix` (lower-case ASCII) in any letter case, without a
/// lower-cased copy of the path.
pub(super) fn lenient_ends_with(path: &str, suffix: &str) -> bool {
    let path = lenient(path);
    let (path, suffix) = (path.as_bytes(), suffix.as_bytes());
    path.len() >= suffix.len() && path[path.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
}

/// `path` as [`lenient`] reads it, lower-cased: what the endpoint matchers compare.
pub(super) fn lenient_lower(path: &str) -> String {
    lenient(path).to_ascii_lowercase()
}

/// The characters a lenient server drops from the end of a path ([`lenient`]) or of a Gemini model's name before
/// its method ([`gemini_target`]).
fn lenient_tail(c: char) -> bool {
    c == '/' || c == '.' || c == ' ' || c.is_ascii_control()
}

/// Whether a Gemini call's query asks for its answer as server-sent events: the system parameter `alt` (or `$alt`,
/// `%24alt` percent-encoded; Google Cloud "System parameters") is `sse`, in any letter case (Google's documentation
/// does not say whether its frontend reads the value case-insensitively, so it is taken to). This sets `llm.stream`
/// only: the answer itself is read as what its body turns out to be, events when it is labelled
/// `text/event-stream` and JSON otherwise, and a body that is not what its label says is refused as unreadable.
fn alt_sse(query: &Pairs) -> bool {
    query
        .get_all("alt")
        .chain(query.get_all("$alt"))
        .any(|v| v.eq_ignore_ascii_case("sse"))
}

/// A Gemini call's target, from a path `.../models/{model}:{method}` or `.../tunedModels/{model}:{method}`.
struct GeminiTarget<'a> {
    model: &'a str,
    api: LlmApi,
    streaming: bool,
}

/// The Gemini call `path` (as [`lenient`] reads it) targets, read as the OpenAI and Anthropic paths are: the
/// collection (`models`, `tunedModels`) and the method (`generateContent`, …) in any ASCII letter case, the method
/// after the last `:` of the last segment (Google's HTTP rule template `{model=models/*}:generateContent`: a verb
/// follows the last colon). The model keeps its own spelling, without what a lenient server drops from a path's end
/// (`models/{model}/:generateContent`).
fn gemini_target(path: &str) -> Option<GeminiTarget<'_>> {
    let lower = path.to_ascii_lowercase();
    // ASCII lower-casing keeps every byte offset, so an index into `lower` is one into `path`.
    let (at, len) = match (lower.rfind("/models/"), lower.rfind("/tunedmodels/")) {
        (Some(m), Some(t)) if t > m => (t, "/tunedmodels/".len()),
        (Some(m), _) => (m, "/models/".len()),
        (None, Some(t)) => (t, "/tunedmodels/".len()),
        (None, None) => return None,
    };
    let tail = &path[at + len..];
    let (model, method) = tail.rsplit_once(':')?;
    // `models/{model}/:generateContent` (`\` read as `/`): the model as a lenient server routes a path's end.
    let model = model.trim_end_matches(lenient_tail);
    if model.is_empty() || model.contains('/') {
        return None;
    }
    let is = |name: &str| method.eq_ignore_ascii_case(name);
    // `batchGenerateContent` (Gemini Batch API, `models.batchGenerateContent`) carries generateContent requests:
    // `batch.inputConfig.requests.requests[].request` ([`gemini_requests`]), each read as one.
    let (api, streaming) = if is("generateContent") || is("batchGenerateContent") {
        (LlmApi::GenerateContent, false)
    } else if is("streamGenerateContent") {
        (LlmApi::GenerateContent, true)
    } else if is("embedContent")
        || is("batchEmbedContents")
        || is("asyncBatchEmbedContent")
        || is("countTokens")
    {
        (LlmApi::Other, false)
    } else {
        return None;
    };
    Some(GeminiTarget {
        model,
        api,
        streaming,
    })
}

/// The `llm` part of an Action for a call to `api`.
pub(super) fn describe(
    provider: Provider,
    api: LlmApi,
    path: &str,
    query: &Pairs,
    body: &Value,
) -> LlmCall {
    let mut call = LlmCall {
        provider: provider.as_str().to_string(),
        ..LlmCall::default()
    };
    match api {
        LlmApi::Other => {
            if let Some(t) = gemini_target(&lenient(path)) {
                call.model = Some(t.model.to_string());
                return call;
            }
            call.model = body
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_string);
            call.stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
        }
        LlmApi::GenerateContent => {
            if let Some(t) = gemini_target(&lenient(path)) {
                call.model = Some(t.model.to_string());
                call.stream = t.streaming || alt_sse(query);
            } else {
                // A CachedContent names its model in its body (`models/{model}`), read as the path's is.
                call.model = gemini_body_models(body)
                    .next()
                    .map(|m| model_id(m).to_string());
            }
            add_gemini_requests(&mut call, gemini_requests(body));
        }
        LlmApi::ChatCompletions | LlmApi::Responses | LlmApi::Messages => {
            call.model = body
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_string);
            call.stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
            call.tools = declared_tools(body);
            call.has_tool_results = match api {
                LlmApi::ChatCompletions => each(body.get("messages")).any(|m| {
                    matches!(
                        m.get("role").and_then(Value::as_str),
                        Some("tool" | "function")
                    )
                }),
                LlmApi::Responses => each(body.get("input"))
                    .any(|item| item_type(item).is_some_and(|t| t.ends_with("_output"))),
                _ => each(body.get("messages"))
                    .flat_map(|m| each(m.get("content")))
                    .any(|b| {
                        item_type(b)
                            .is_some_and(|t| t == "tool_result" || t.ends_with("_tool_result"))
                    }),
            };
        }
    }
    call
}

/// The members of the Gemini object `v` that proto3 JSON reads as the field `json_name` (lowerCamelCase): each
/// member whose name is it or spells it as its proto name ([`gemini_json_name`]). A body giving both spellings is
/// read under each.
pub(super) fn fields<'a>(v: &'a Value, json_name: &'a str) -> impl Iterator<Item = &'a Value> {
    v.as_object()
        .into_iter()
        .flatten()
        .filter(move |(k, _)| k.as_str() == json_name || gemini_json_name(k) == json_name)
        .map(|(_, v)| v)
}

/// The generateContent requests a Gemini body carries: the body itself, and the inline requests of a Batch API
/// batch (Gemini API reference, "Batch API": `models.batchGenerateContent` and `models.asyncBatchEmbedContent` take
/// `{"batch": {"model", "displayName", "inputConfig": {"fileName" | "requests": {"requests": [{"request": …,
/// "metadata": …}]}}}}`; google-genai `batches.py` writes them so), each an InlinedRequest's `request`. A batch
/// whose requests are in a file (`fileName`) carries none here: the file was uploaded before, as any file is. A batch
/// updated (`batches.updateGenerateContentBatch`) is the body itself: its `inputConfig` is read too.
fn gemini_requests(body: &Value) -> Vec<&Value> {
    let mut out = vec![body];
    out.extend(
        fields(body, "batch")
            .chain(std::iter::once(body))
            .flat_map(|b| fields(b, "inputConfig"))
            .flat_map(|c| fields(c, "requests"))
            .flat_map(|r| fields(r, "requests"))
            .flat_map(|r| each(Some(r)))
            .flat_map(|r| fields(r, "request")),
    );
    out
}

/// Read the generateContent `requests` a Gemini call carries into its `call`: each one's declared tools (added once
/// each, in order) and whether any sends a tool's result (a `functionResponse` part). The body's own and its inline
/// requests ([`gemini_requests`]), and the lines of a batch input file its create names (`batch_input::InputLines`),
/// are read alike.
pub(super) fn add_gemini_requests<'a>(
    call: &mut LlmCall,
    requests: impl IntoIterator<Item = &'a Value>,
) {
    for request in requests {
        for tool in gemini_tools(request) {
            push_unique(&mut call.tools, tool);
        }
        call.has_tool_results |= fields(request, "contents")
            .flat_map(|c| each(Some(c)))
            .flat_map(|c| fields(c, "parts"))
            .flat_map(|p| each(Some(p)))
            .any(|p| fields(p, "functionResponse").next().is_some());
    }
}

/// Whether a generateContent `request` carried by a call to `model` (the call's `llm.model`; `None` when the call
/// names none) names another model: a `model` member (in either proto3 JSON spelling) that is not a string, is
/// empty, or is not `model` (`models/{model}` or `{model}`). An inline request so is refused ([`gemini_misread`]);
/// so is a batch input file's line, at the create that runs it with its model.
pub(super) fn gemini_names_other_model(model: Option<&str>, request: &Value) -> bool {
    fields(request, "model").any(|m| {
        let m = m.as_str().unwrap_or_default();
        m.is_empty() || model.is_none_or(|model| model_id(m) != model)
    })
}

/// Every model a Gemini body names, as written (`models/{model}`): its own `model` (a CachedContent's, a
/// generateContent request's), its batch's (`batch.model`), and each request's it carries (a batch's inline
/// requests, `batchEmbedContents`' `requests[].model`).
fn gemini_body_models(body: &Value) -> impl Iterator<Item = &str> {
    let batch_requests = gemini_requests(body).into_iter().skip(1);
    fields(body, "model")
        .chain(fields(body, "batch").flat_map(|b| fields(b, "model")))
        .chain(batch_requests.flat_map(|r| fields(r, "model")))
        .chain(
            fields(body, "requests")
                .flat_map(|r| each(Some(r)))
                .flat_map(|r| fields(r, "model")),
        )
        .map(|m| m.as_str().unwrap_or_default())
}

/// A Gemini model name without its collection (`models/gemini-2.0-flash` is `gemini-2.0-flash`), as the path's model
/// is read ([`gemini_target`]).
fn model_id(name: &str) -> &str {
    name.rsplit('/').next().unwrap_or(name)
}

/// Whether a Gemini call's body names a model the call's `llm.model` is not: a model in the body (its own, its
/// batch's, an inline request's: [`gemini_body_models`]) that is not a string, or that is not the path's model, or
/// (a CachedContent, whose model is its body's) that differs from the body's first. `llm.model` names one model, so
/// a call that may run another is not read as that one. A body that is not an object (every Gemini method takes one) is not
/// read either.
pub(super) fn gemini_misread(path: &str, body: &Value) -> bool {
    if !body.is_object() {
        // Every Gemini method takes an object.
        return true;
    }
    let path = lenient(path);
    let target = gemini_target(&path).map(|t| t.model);
    let mut models = gemini_body_models(body).peekable();
    let Some(model) = target.or_else(|| models.peek().map(|m| model_id(m))) else {
        return false;
    };
    models.any(|m| m.is_empty() || model_id(m) != model)
}

/// The members an OpenAI or Anthropic request is read by, at each place [`describe`] and `constrain` read them.
const TOP_MEMBERS: [&str; 9] = [
    "model",
    "stream",
    "messages",
    "input",
    "tools",
    "functions",
    "mcp_servers",
    "tool_choice",
    "function_call",
];
const MESSAGE_MEMBERS: [&str; 2] = ["role", "content"];
const TYPE_MEMBERS: [&str; 1] = ["type"];
/// A tool declaration's (also one a `namespace` groups): `custom` is the Chat Completions custom tool's wrapper,
/// `tools` a Responses namespace's tools ([`tool_name`], [`namespaced_tools`]).
const TOOL_MEMBERS: [&str; 8] = [
    "type",
    "name",
    "function",
    "custom",
    "tools",
    "server_label",
    "server_url",
    "mcp_server_name",
];
const NAME_MEMBERS: [&str; 2] = ["name", "url"];

/// Whether an OpenAI or Anthropic request `body` has, where the policy reads a member, a member spelt otherwise
/// that folds to its name (`{"Model": …}`, a tool's `Name`): servers built on Go's `encoding/json` (OpenAI-compatible
/// gateways and local model servers) bind it to the field the policy found absent, so the call they run names a
/// model or a tool the policy never saw. Gemini reads proto3 JSON, whose parsers match names exactly.
pub(super) fn misread(body: &Value) -> bool {
    let Some(top) = body.as_object() else {
        return false;
    };
    let messages = objects(top.get("messages"));
    let blocks = messages
        .iter()
        .flat_map(|m| objects(m.get("content")))
        .collect::<Vec<_>>();
    // Every tool the body declares, with those a namespace groups: each is read by its name ([`declared_tools`]).
    let tools: Vec<_> = each(top.get("tools"))
        .chain(each(top.get("tools")).flat_map(namespaced_tools))
        .filter_map(Value::as_object)
        .collect();
    // The wrappers a tool's name is read from: `function` (Chat Completions), `custom` (its custom tools).
    let functions = tools.iter().flat_map(|t| {
        ["function", "custom"]
            .into_iter()
            .filter_map(|w| t.get(w).and_then(Value::as_object))
    });
    misspelt(top, &TOP_MEMBERS)
        || messages.iter().any(|m| misspelt(m, &MESSAGE_MEMBERS))
        || blocks.iter().any(|b| misspelt(b, &TYPE_MEMBERS))
        || objects(top.get("input"))
            .iter()
            .any(|i| misspelt(i, &TYPE_MEMBERS))
        || tools.iter().any(|t| misspelt(t, &TOOL_MEMBERS))
        || functions.into_iter().any(|f| misspelt(f, &NAME_MEMBERS))
        || objects(top.get("functions"))
            .iter()
            .any(|f| misspelt(f, &NAME_MEMBERS))
        || objects(top.get("mcp_servers"))
            .iter()
            .any(|s| misspelt(s, &NAME_MEMBERS))
}

/// The objects among the elements of `v` when it is an array.
fn objects(v: Option<&Value>) -> Vec<&serde_json::Map<String, Value>> {
    each(v).filter_map(Value::as_object).collect()
}

fn item_type(v: &Value) -> Option<&str> {
    v.get("type").and_then(Value::as_str)
}

/// The elements of `v` when it is an array, nothing otherwise.
fn each(v: Option<&Value>) -> impl Iterator<Item = &Value> {
    v.and_then(Value::as_array).into_iter().flatten()
}

/// The name a tool declaration in an OpenAI or Anthropic `tools` array is known by: `function.name` (Chat
/// Completions), `custom.name` (Chat Completions custom tools, `ChatCompletionCustomToolParam`), `name` (Responses
/// function/custom/namespace tools, Anthropic), `mcp:<label>` for hosted MCP servers, or the `type` of a built-in
/// tool without a name (`web_search_preview`, `code_interpreter`, ...). The tools inside a Responses `namespace`
/// are [`namespaced_tools`].
pub(crate) fn tool_name(tool: &Value) -> Option<String> {
    let wrapper = match item_type(tool) {
        Some("custom") => "custom",
        _ => "function",
    };
    if let Some(name) = tool
        .get(wrapper)
        .and_then(|f| f.get("name"))
        .and_then(Value::as_str)
    {
        return Some(name.to_string());
    }
    match item_type(tool) {
        Some("mcp") => tool
            .get("server_label")
            .and_then(Value::as_str)
            .map(|l| format!("mcp:{l}")),
        Some("mcp_toolset") => tool
            .get("mcp_server_name")
            .and_then(Value::as_str)
            .map(|l| format!("mcp:{l}")),
        ty => tool
            .get("name")
            .and_then(Value::as_str)
            .or(ty)
            .map(str::to_string),
    }
}

/// The function and custom tools a Responses `namespace` tool groups (`{"type":"namespace","name":"crm","tools":
/// [...]}`, `NamespaceToolParam`): each is declared to the model by its own name. Nothing for other tools.
pub(crate) fn namespaced_tools(tool: &Value) -> impl Iterator<Item = &Value> {
    let nested = (item_type(tool) == Some("namespace")).then(|| tool.get("tools"));
    each(nested.flatten())
}

/// Declared tool names of an OpenAI or Anthropic body. Hosted MCP servers appear as `mcp:<label>` and, when the
/// declaration names it, `mcp:<server_url>` too, so a policy can match either.
fn declared_tools(body: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for tool in each(body.get("tools")) {
        if let Some(name) = tool_name(tool) {
            push_unique(&mut out, name);
        }
        for inner in namespaced_tools(tool) {
            if let Some(name) = tool_name(inner) {
                push_unique(&mut out, name);
            }
        }
        if let Some(url) = tool.get("server_url").and_then(Value::as_str) {
            push_unique(&mut out, format!("mcp:{url}"));
        }
    }
    // Legacy OpenAI `functions`.
    for f in each(body.get("functions")) {
        if let Some(name) = f.get("name").and_then(Value::as_str) {
            push_unique(&mut out, name.to_string());
        }
    }
    // Anthropic MCP connector: `mcp_servers: [{type: url, url, name}]`.
    for server in each(body.get("mcp_servers")) {
        if let Some(name) = server.get("name").and_then(Value::as_str) {
            push_unique(&mut out, format!("mcp:{name}"));
        }
        if let Some(url) = server.get("url").and_then(Value::as_str) {
            push_unique(&mut out, format!("mcp:{url}"));
        }
    }
    out
}

/// Gemini: `tools[].functionDeclarations[].name`, and the key of each built-in tool as its JSON name
/// ([`gemini_json_name`]: `googleSearch` also when the body spells it `google_search`).
fn gemini_tools(body: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for tool in fields(body, "tools").flat_map(|t| each(Some(t))) {
        let Some(obj) = tool.as_object() else {
            continue;
        };
        for (key, value) in obj {
            let key = gemini_json_name(key);
            if key == "functionDeclarations" {
                for decl in each(Some(value)) {
                    if let Some(name) = decl.get("name").and_then(Value::as_str) {
                        push_unique(&mut out, name.to_string());
                    }
                }
            } else {
                push_unique(&mut out, key);
            }
        }
    }
    out
}

/// A field name of Gemini's API as its lowerCamelCase JSON name (`google_search` → `googleSearch`): the API reads
/// request bodies as proto3 JSON, whose parsers accept a field's original proto name as well as its lowerCamelCase
/// JSON name (the proto3 JSON mapping, protobuf.dev/programming-guides/json), so each field has one name however it
/// is spelt. The JSON name is the proto name with every
/// `_` removed and the letter after it upper-cased.
pub(crate) fn gemini_json_name(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut upper = false;
    for c in key.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn push_unique(out: &mut Vec<String>, name: String) {
    if !out.contains(&name) {
        out.push(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by a black-box attack: these spellings of an endpoint's path were not read as the endpoint, so a tool
    /// call in the answer reached the agent undecided wherever a lenient server routed them.
    #[test]
    fn endpoint_paths_a_lenient_server_may_route_are_read_as_the_endpoint() {
        for tail in [" ", ".", "\\", "\t", "\0", "#x", "/.", " .", "\\\\"] {
            let chat = format!("/v1/chat/completions{tail}");
            assert_eq!(
                endpoint("POST", &chat),
                Some(LlmApi::ChatCompletions),
                "{chat:?}"
            );
            let realtime = format!("/v1/realtime{tail}");
            assert!(realtime_websocket(&realtime), "{realtime:?}");
        }
        assert!(realtime_websocket("/v1\\realtime"));
        assert_eq!(
            endpoint("POST", "/v1/chat/completions"),
            Some(LlmApi::ChatCompletions)
        );
        assert_eq!(endpoint("POST", "/v1/chat/completions.json"), None);
        for tail in ["", "/", " ", ".", "\\", "#x"] {
            let results = format!("/v1/messages/batches/msgbatch_01/results{tail}");
            assert!(
                message_batch_results(Provider::Anthropic, "GET", &results),
                "{results:?}"
            );
        }
        assert!(message_batch_results(
            Provider::Anthropic,
            "get",
            "/V1/Messages/Batches/msgbatch_01/RESULTS"
        ));
        assert!(message_batch_results(
            Provider::Anthropic,
            "GET",
            "/v1\\messages\\batches\\msgbatch_01\\results"
        ));
        for (provider, method, path) in [
            (
                Provider::OpenAi,
                "GET",
                "/v1/messages/batches/msgbatch_01/results",
            ),
            (
                Provider::Anthropic,
                "POST",
                "/v1/messages/batches/msgbatch_01/results",
            ),
            (
                Provider::Anthropic,
                "GET",
                "/v1/messages/batches/msgbatch_01",
            ),
            (Provider::Anthropic, "GET", "/v1/messages/batches//results"),
            (
                Provider::Anthropic,
                "GET",
                "/v1/messages/batches/a/b/results",
            ),
        ] {
            assert!(!message_batch_results(provider, method, path), "{path}");
        }
        assert!(openai_file_content(
            Provider::OpenAi,
            "GET",
            "/v1/files/file-abc/content "
        ));
        assert!(!openai_file_content(
            Provider::OpenAi,
            "GET",
            "/v1/files/file-abc"
        ));
        assert!(!openai_file_content(
            Provider::Anthropic,
            "GET",
            "/v1/files/file-abc/content"
        ));
        assert!(!realtime_websocket("/v1/realtime-notes"));
    }

    /// Gemini paths are read as a lenient server routes them, as the other providers' are: in any letter case, with
    /// the tail a lenient server drops; the model keeps its own spelling. Before, `:GenerateContent` or `/V1BETA/Models/`
    /// was plain HTTP and a blocked function call in its answer reached the agent undecided.
    #[test]
    fn gemini_s_alt_sse_is_read_in_any_letter_case_and_as_the_system_parameter_dollar_alt() {
        let body = serde_json::json!({"contents": []});
        let path = "/v1beta/models/gemini-2.0-flash:generateContent";
        // The query as the classify phase reads it: names and values percent-decoded (`%24alt` is `$alt`).
        for (pairs, stream) in [
            (&[("alt", "sse")][..], true),
            (&[("alt", "SSE")], true),
            (&[("alt", "Sse")], true),
            (&[("$alt", "sse")], true),
            (&[("alt", "json"), ("alt", "sse")], true),
            (&[("alt", "json")], false),
            (&[("alt", "proto")], false),
            (&[("salt", "sse")], false),
            (&[("ALT", "sse")], false),
            (&[], false),
        ] {
            let query = Pairs(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
            let call = describe(
                Provider::Gemini,
                LlmApi::GenerateContent,
                path,
                &query,
                &body,
            );
            assert_eq!(call.stream, stream, "{query:?}");
        }
    }

    #[test]
    fn gemini_paths_are_read_in_any_letter_case_and_with_a_lenient_tail() {
        let body = serde_json::json!({"contents": [], "tools": [{"functionDeclarations": [{"name": "shell"}]}]});
        let query = Pairs::default();
        for (path, api, model, stream) in [
            (
                "/v1beta/models/gemini-2.0-flash:GenerateContent",
                LlmApi::GenerateContent,
                "gemini-2.0-flash",
                false,
            ),
            (
                "/V1BETA/Models/Gemini-2.0-Flash:streamGenerateContent",
                LlmApi::GenerateContent,
                "Gemini-2.0-Flash",
                true,
            ),
            (
                "/v1beta/MODELS/gemini-2.0-flash:STREAMGENERATECONTENT",
                LlmApi::GenerateContent,
                "gemini-2.0-flash",
                true,
            ),
            (
                "/v1beta/TunedModels/my-tuned:generatecontent",
                LlmApi::GenerateContent,
                "my-tuned",
                false,
            ),
            (
                "/v1beta/models/gemini-2.0-flash:generateContent ",
                LlmApi::GenerateContent,
                "gemini-2.0-flash",
                false,
            ),
            (
                "/v1beta/models/gemini-2.0-flash:streamGenerateContent#x",
                LlmApi::GenerateContent,
                "gemini-2.0-flash",
                true,
            ),
            (
                "\\v1beta\\models\\gemini-2.0-flash:generateContent.",
                LlmApi::GenerateContent,
                "gemini-2.0-flash",
                false,
            ),
            (
                "/v1beta/models/tuned:v2:generateContent",
                LlmApi::GenerateContent,
                "tuned:v2",
                false,
            ),
            (
                "/v1beta/models/text-embedding-004:EmbedContent",
                LlmApi::Other,
                "text-embedding-004",
                false,
            ),
            (
                "/v1beta/models/gemini-2.0-flash:CountTokens/",
                LlmApi::Other,
                "gemini-2.0-flash",
                false,
            ),
        ] {
            assert_eq!(endpoint("POST", path), Some(api), "{path:?}");
            let call = describe(Provider::Gemini, api, path, &query, &body);
            assert_eq!(call.provider, "gemini", "{path:?}");
            assert_eq!(call.model.as_deref(), Some(model), "{path:?}");
            assert_eq!(call.stream, stream, "{path:?}");
            let tools: &[&str] = if api == LlmApi::GenerateContent {
                &["shell"]
            } else {
                &[]
            };
            assert_eq!(call.tools, tools, "{path:?}");
        }
        for (path, model) in [
            ("/v1beta/models/evil-x/:generateContent", "evil-x"),
            ("/v1beta/models/evil-x\\:generateContent", "evil-x"),
            ("/v1beta/models/evil-x. /:generateContent", "evil-x"),
            ("/v1beta/models/evil-x:generateContent?x", "evil-x"),
            ("/v1beta/models/evil-x:generateContent?x:y", "evil-x"),
        ] {
            assert_eq!(
                endpoint("POST", path),
                Some(LlmApi::GenerateContent),
                "{path:?}"
            );
            let call = describe(
                Provider::Gemini,
                LlmApi::GenerateContent,
                path,
                &query,
                &body,
            );
            assert_eq!(call.model.as_deref(), Some(model), "{path:?}");
        }
        for path in [
            "/v1beta/models/gemini-2.0-flash:generateContentX",
            "/v1beta/models//:generateContent",
            "/v1beta/models/gemini-2.0-flash",
            "/v1beta/models/:generateContent",
            "/v1beta/models/a/b:generateContent",
            "/v1beta/mymodels/gemini:generateContent",
        ] {
            assert_eq!(endpoint("POST", path), None, "{path:?}");
        }
    }

    /// An answer fetched again is read wherever its path is spelt as a lenient server routes it, as a create's is.
    #[test]
    fn retrieval_paths_are_read_in_any_letter_case_and_with_a_lenient_tail() {
        for (method, path, api) in [
            ("GET", "/v1/Responses/resp_AbC", Some(LlmApi::Responses)),
            ("GET", "/V1/RESPONSES/resp_AbC.", Some(LlmApi::Responses)),
            (
                "POST",
                "/v1/responses/resp_AbC/Cancel",
                Some(LlmApi::Responses),
            ),
            (
                "post",
                "\\v1\\responses\\resp_1\\cancel ",
                Some(LlmApi::Responses),
            ),
            (
                "GET",
                "/v1/Chat/Completions/chatcmpl-1#x",
                Some(LlmApi::ChatCompletions),
            ),
            ("GET", "/v1/responses/", None),
            ("GET", "/v1/responses/a/b", None),
            ("DELETE", "/v1/responses/resp_1", None),
        ] {
            assert_eq!(
                retrieval(Provider::OpenAi, method, path),
                api,
                "{method} {path:?}"
            );
        }
        assert_eq!(
            retrieval(Provider::Gemini, "GET", "/v1/responses/resp_1"),
            None
        );
    }
}
