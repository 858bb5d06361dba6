//! The response phase: what the upstream returns, decided by the policy's `phase: response` rules before the agent
//! receives it — a whole body (JSON or text), one server-sent event, one WebSocket message — and carried out as a
//! [`Fate`]: passed, rewritten (redaction, `json_truncate` and the other JSON rewrites), or blocked. A body is read
//! whole only when some rule may decide it (its head, status and content type, already let one match) or a tool call
//! may be proposed in it (in batch results, in the answer on each line: [`rule_lines`]), bounded by the policy's
//! `max_body_bytes`, the proxy's hold timeout and the agent's share of the buffer budget (`budget`: its text, and the
//! JSON it is parsed into, reserved before the parse): a body beyond one is refused and recorded (502; 503 with
//! `Retry-After` for the budget), never passed on unread.

use super::upstream::UpstreamBody;
use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::Response;
use http_body_util::BodyExt;
use serde_json::Value;

use super::answer::{Answering, Batched};
use super::budget::{json_tree_bound, Buffer, Overflow, Reservation, INSPECTED_COPIES};
use super::http::{full, ProxyBody};
use super::refusal::into_response;
use crate::inspect::proposal::batch::{self, Batch};
use crate::inspect::proposal::{self, Ruling};
use crate::inspect::{self, LlmApi, Provider};
use crate::model::{
    Action, Change, Decision, Disposition, HttpResponse, LlmCall, Mode, Outcome, Pairs, Phase,
    Reason, RequestSummary, Verdict,
};

/// What is read of one response, decided before it reaches the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The LLM API whose proposed tool calls are decided (the policy has proposal rules, the call succeeded).
    pub proposals: Option<(Provider, LlmApi)>,
    /// The body is batch results, whose lines' answers are decided as [`Plan::proposals`]' whole answers are (the
    /// policy has proposal rules, the fetch succeeded): read whole, never as events.
    pub batch: Option<Batch>,
    /// Some response rule may decide this response.
    pub responses: bool,
    /// The body is a stream of server-sent events, read event by event.
    pub events: bool,
    /// The body is content-coded: decoded before it is read (and passed on decoded).
    pub encoded: bool,
}

/// The response's head as a response rule sees it.
#[derive(Debug, Clone)]
pub(crate) struct Head {
    pub status: u16,
    pub headers: Pairs,
    pub content_type: Option<String>,
}

impl Head {
    pub fn of(status: u16, headers: &HeaderMap) -> Head {
        let pairs = headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        Head {
            status,
            headers: Pairs(pairs),
            content_type: headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
        }
    }
}

/// What is read of a response with this head, or `None` when nothing is (it streams through untouched, as does a
/// response that has no body: to `HEAD`, `204`, `304`).
pub(crate) fn plan(ans: &Answering, head: &Head, headers: &HeaderMap) -> Option<Plan> {
    let head_request = ans
        .request
        .http
        .as_ref()
        .is_some_and(|h| h.method.eq_ignore_ascii_case("HEAD"));
    if head_request || matches!(head.status, 204 | 304) {
        return None;
    }
    let proposals =
        inspect::answered_api(&ans.protocol, &ans.request).filter(|&(provider, api)| {
            answers_with_calls(head.status, headers.contains_key(header::LOCATION))
                && ans.policy.has_rules_for(Phase::Proposal)
                && proposal::Proposals::new(provider, api).is_some()
        });
    let batch = inspect::answered_batch(&ans.protocol, &ans.request).filter(|_| {
        answers_with_calls(head.status, headers.contains_key(header::LOCATION))
            && ans.policy.has_rules_for(Phase::Proposal)
    });
    let responses = ans.policy.has_rules_for(Phase::Response)
        && ans
            .policy
            .response_may_match(&action(ans, head, String::new(), None));
    if proposals.is_none() && batch.is_none() && !responses {
        return None;
    }
    let media = head
        .content_type
        .as_deref()
        .and_then(|c| c.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase());
    let encoded = headers
        .get_all(header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    Some(Plan {
        proposals,
        batch,
        responses,
        // The SDKs read batch results as JSON Lines whatever their content type says.
        // A part (`206`) of an answer read for calls is refused whole (`answer_whole`), never read as events.
        events: batch.is_none()
            && !(head.status == 206 && proposals.is_some())
            && media.as_deref() == Some("text/event-stream"),
        encoded,
    })
}

/// Whether an LLM answer with `status` may hand the agent's SDK proposed tool calls: `2xx`, and a `3xx` that some
/// client hands to its caller as it came. Not every SDK lets a redirect through: openai-python and anthropic-python
/// (httpx with `follow_redirects=True`, then `raise_for_status` or `is_success`: 2xx only) and openai-node (`fetch`
/// follows, then `response.ok`: 2xx only) never read one's body as an answer. But go-openai takes every status
/// below 400 as the answer (`isFailureStatusCode`: `< 200 || >= 400`, `client.go`), decoding its body (streamed or
/// whole) into a completion whose calls the agent runs, and Go's net/http returns every `3xx` but a `301`, `302`,
/// `303`, `307` or `308` with a `Location` as it came (`redirectBehavior`, `client.go`; it reads the body of the
/// ones it follows only to discard it). So those redirects (`located`: the answer has a `Location` field), and
/// `304`, which has no body, are passed on unread: an ordinary redirect's HTML page is nobody's answer.
fn answers_with_calls(status: u16, located: bool) -> bool {
    let followed = matches!(status, 301 | 302 | 303 | 307 | 308) && located;
    (200..300).contains(&status) || ((300..400).contains(&status) && status != 304 && !followed)
}

/// The response Action: the request's (its body dropped) with the response's head and `body`. A stream decides
/// each of its events with one such Action, its body replaced event by event.
pub(crate) fn action(ans: &Answering, head: &Head, body: String, json: Option<Value>) -> Action {
    let mut action = ans.request.clone();
    action.response = Some(HttpResponse {
        status: head.status,
        headers: head.headers.clone(),
        content_type: head.content_type.clone(),
        body_size: body.len() as u64,
        body,
        json,
    });
    action
}

/// Whether the response rules need `body`'s parsed JSON to decide it: some rule reads JSON (`response.json`, a
/// `count:` path), or the text has escapes a detector must see through (`encoding::decoded_body`). When they do
/// not, the body is decided as text and its JSON parsed only if the decision rewrites or blocks it (see [`decide`]).
pub(crate) fn needs_json(policy: &crate::policy::Policy, body: &str) -> bool {
    policy.response_reads_json() || crate::encoding::json_escapes(body)
}

/// What becomes of one body, event or message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Fate {
    Pass,
    /// Passed on as this text instead.
    Rewrite(String),
    /// Refused under this decision (the caller answers in the protocol's shape).
    Block(Decision),
}

/// Decide the response Action `action` (its `response` carries the body and, when parsed, its JSON) under the
/// response rules, record it when a rule matched, and say what becomes of it. A body that claims JSON but was decided
/// without it ([`needs_json`]) has its JSON parsed into `action` here when a rule matched, for the rewrite and the
/// block's shape. `whole`: the body is the whole response, so a block is answered with the protocol's own status
/// (else the stream's status stands).
pub(crate) async fn decide(ans: &Answering, action: &mut Action, whole: bool) -> Fate {
    let mut decision = ans.decide_in_session(std::slice::from_mut(action)).decision;
    if decision.matched_rules.is_empty() && decision.verdict == Verdict::Allow {
        return Fate::Pass;
    }
    let r = action.response.get_or_insert_with(HttpResponse::default);
    if r.json.is_none() && inspect::claims_json(r.content_type.as_deref(), &r.body) {
        r.json = serde_json::from_str::<Value>(&r.body).ok();
    }
    let enforce = decision.mode == Mode::Enforce;
    if enforce {
        // A response is not held for a person's answer: an enforced review refuses it, saying so.
        decision = super::hold::unheld(&decision);
    }
    let (mut fate, mut changes) = (Fate::Pass, Vec::new());
    if enforce && decision.verdict == Verdict::Constrain {
        // The JSON is rewritten where it lies, not copied: the budget holds one parse of the body.
        match rewrite(ans, &decision, &r.body, r.json.as_mut()) {
            Ok((text, ch)) => {
                changes = ch;
                if !changes.is_empty() {
                    fate = Fate::Rewrite(text);
                }
            }
            Err(reason) => decision.block_instead(reason),
        }
    }
    let blocked = enforce && decision.verdict == Verdict::Block;
    if blocked {
        fate = Fate::Block(decision.clone());
    }
    let status = if blocked && whole {
        inspect::block_response(&ans.protocol, &decision).status
    } else {
        r.status
    };
    let outcome = Outcome::of(&decision, blocked, Some(status));
    let summary = summary(ans, r.body.as_bytes(), changes);
    if !ans
        .record(Phase::Response, decision, summary, outcome)
        .await
    {
        let message = "the enforcer could not record the response, so it was not passed on";
        return Fate::Block(super::enforcer_decision(
            &ans.policy,
            Reason::AuditUnavailable,
            message,
        ));
    }
    fate
}

/// Carry out a constrain on a body: its JSON (rewritten where it lies: on error it may be rewritten in part, and is
/// never passed on), or its text when it is not JSON. The new text and what changed.
fn rewrite(
    ans: &Answering,
    decision: &Decision,
    body: &str,
    json: Option<&mut Value>,
) -> Result<(String, Vec<Change>), Reason> {
    use crate::constrain::{apply_to_text, rewrite_json};
    let result = match json {
        Some(v) => rewrite_json(&decision.rewrites, &ans.policy, v),
        None => {
            let mut text = body.to_string();
            apply_to_text(&decision.rewrites, &ans.policy, &mut text).map(|c| (text, c))
        }
    };
    result.map_err(|e| e.reason())
}

/// The record's view of a response: the exchange's head, model and MCP method, the body's size and digest (as the
/// upstream sent it, decoded), what a rewrite changed.
pub(crate) fn summary(ans: &Answering, body: &[u8], changes: Vec<Change>) -> RequestSummary {
    let (llm, mcp) = (ans.request.llm.as_ref(), ans.request.mcp.as_ref());
    RequestSummary {
        llm_provider: llm.map(|l| l.provider.clone()),
        llm_model: llm.and_then(|l| l.model.clone()),
        mcp_method: mcp.map(|m| m.method.clone()),
        mcp_tool: mcp.and_then(|m| m.tool.clone()),
        ..ans.part_summary(body, changes)
    }
}

/// Record a refusal of the enforcer's own in `phase` (a body or held call over a bound) with the status the agent
/// got, when it got one.
pub(crate) async fn record_refusal(
    ans: &Answering,
    phase: Phase,
    reason: Reason,
    message: &str,
    status: Option<u16>,
) -> Decision {
    let decision = super::enforcer_decision(&ans.policy, reason, message);
    let outcome = Outcome {
        disposition: Disposition::Blocked,
        status,
        error: Some(reason),
    };
    ans.record(phase, decision.clone(), ans.refusal_summary(), outcome)
        .await;
    decision
}

/// A whole (not streamed) response, read, decided and answered: its proposed tool calls ruled on, then the
/// response rules on what is left.
pub(crate) async fn whole(
    resp: Response<UpstreamBody>,
    mut ans: Answering,
    plan: Plan,
) -> Response<ProxyBody> {
    let answer = answer_whole(resp, &mut ans, plan).await;
    ans.finish_trace();
    answer
}

async fn answer_whole(
    resp: Response<UpstreamBody>,
    ans: &mut Answering,
    plan: Plan,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    let head = Head::of(parts.status.as_u16(), &parts.headers);
    let deadline = tokio::time::Instant::now() + super::limits::limits().hold_timeout;
    let buf = Buffer::new(
        ans.policy.max_body_bytes(),
        INSPECTED_COPIES,
        super::limits::budget().reserve(&ans.agent),
    );
    // A part of an answer (`206`, to a `Range` request) read for calls: it cannot be read alone, as a part may begin
    // or end within a line, an event or a JSON value; the client asked for it, and may ask again without `Range`.
    if head.status == 206 && (plan.proposals.is_some() || plan.batch.is_some()) {
        return refused(ans, Phase::Response, Reason::Unparseable, PARTIAL).await;
    }
    // Held in the budget until the answer is built.
    let (raw, mut held) = match read_whole(body, buf, deadline, plan, &parts.headers).await {
        Ok(read) => read,
        Err((reason, message)) => return refused(ans, Phase::Response, reason, message).await,
    };
    // Batch results are read as text whose lines split as every reader splits them: UTF-8 alone (a reader may decode
    // another charset, or bytes that are not UTF-8, otherwise than this one).
    if plan.batch.is_some()
        && (!utf8_charset(head.content_type.as_deref()) || std::str::from_utf8(&raw).is_err())
    {
        return refused(ans, Phase::Proposal, Reason::Unparseable, NOT_UTF8).await;
    }
    // The JSON the body is parsed into (for its tool calls, or for the response rules) is held as long as the body:
    // its room is reserved first, as a request body's is. Batch results' lines are parsed one at a time (and nothing
    // else is): the largest line's room.
    let tree = match plan.batch {
        Some(_) if plan.proposals.is_none() && !plan.responses => {
            let text = std::str::from_utf8(&raw).unwrap_or_default();
            batch::lines(text)
                .iter()
                .map(|l| json_tree_bound(batch::trimmed(l.text).as_bytes()))
                .max()
                .unwrap_or(0)
        }
        _ => json_tree_bound(&raw),
    };
    if held.grow(tree).is_err() {
        return refused(ans, Phase::Response, Reason::BufferLimit, OVER_BUDGET).await;
    }
    // The proposal trace keeps the body decoded, as it was decided.
    let mut traced = parts.headers.clone();
    traced.remove(header::CONTENT_ENCODING);
    ans.trace_head(parts.status.as_u16(), &traced);
    ans.trace_body(&raw);
    let text = crate::encoding::lossy_text(&raw);
    let lines = plan.batch;
    let mut json = if plan.proposals.is_some() {
        // Whatever its content type claims: an SDK may parse the body as JSON (or read it as events) anyway.
        match proposal::body_json(&text) {
            Ok(json) => json,
            Err(e) => {
                return refused(ans, Phase::Proposal, Reason::Unparseable, &e.to_string()).await
            }
        }
    } else if lines.is_some() {
        // Lines of JSON, each read for its calls below; not one JSON document.
        None
    } else {
        inspect::claims_json(head.content_type.as_deref(), &text)
            .then(|| serde_json::from_str::<Value>(&text).ok())
            .flatten()
    };
    let mut changed = plan.encoded;
    let mut body = text;
    if let Some(batch) = lines {
        match rule_lines(ans, batch, &body).await {
            Ok(Some(ruled)) => {
                body = ruled;
                changed = true;
            }
            Ok(None) => {}
            Err((phase, reason, message)) => return refused(ans, phase, reason, message).await,
        }
    }
    if let (Some((provider, api)), Some(doc)) = (plan.proposals, json.as_mut()) {
        let calls = proposal::body_calls(provider, api, doc);
        let rulings = super::proposal::rule(ans, &calls, &super::hold::Holding::Whole).await;
        if rulings.iter().any(|r| *r != Ruling::Pass) {
            proposal::apply_to_body(provider, api, doc, &rulings);
            body = doc.to_string();
            changed = true;
        }
    }
    if plan.responses {
        // The text is lent to the Action and taken back, not copied: the budget holds two copies of the body.
        let mut decided = action(ans, &head, std::mem::take(&mut body), json);
        let fate = decide(ans, &mut decided, true).await;
        body = decided.response.take().map(|r| r.body).unwrap_or_default();
        drop(decided);
        match fate {
            Fate::Pass => {}
            Fate::Rewrite(new) => {
                body = new;
                changed = true;
            }
            Fate::Block(decision) => {
                return into_response(inspect::block_response(&ans.protocol, &decision))
            }
        }
    }
    if !changed {
        // The body as it came (its own `Content-Length`, if it had one, stands).
        return Response::from_parts(parts, full(raw));
    }
    let out = Bytes::from(body);
    parts.headers.remove(header::CONTENT_ENCODING);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, out.len().into());
    Response::from_parts(parts, full(out))
}

/// The lines of batch results `text` (`inspect::proposal::batch`), each line's answer ruled on as a whole answer is:
/// its calls decided and recorded one by one as answering the line's own LLM call (`llm.provider`, and `llm.model` the
/// answer's `model`; the records name it, and the line's `custom_id`), a refused call carried out on that line alone,
/// which is then written anew; every other line, and every line's end, stays as it came. `None` when nothing changed. Every line is read
/// before any call is decided, each line's parsed JSON dropped before the next is parsed (the room of the largest
/// line's JSON is reserved before).
///
/// # Errors
/// The phase, reason and message of the refusal: a line that cannot be read (`unparseable`: the answer is not passed
/// on, and no call in it is decided).
async fn rule_lines(
    ans: &mut Answering,
    batch: Batch,
    text: &str,
) -> Result<Option<String>, (Phase, Reason, &'static str)> {
    let lines = batch::lines(text);
    if lines
        .iter()
        .any(|l| batch::read_line(batch, l.text).is_err())
    {
        return Err((Phase::Proposal, Reason::Unparseable, UNREADABLE_LINE));
    }
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    for line in &lines {
        let mut json = batch::read_line(batch, line.text).ok().flatten();
        let custom_id = json.as_ref().and_then(batch::custom_id).map(|id| {
            let mut id = id.to_string();
            crate::constrain::scrub_for_record(&ans.policy, [&mut id]);
            id
        });
        let mut rewritten = None;
        if let Some((provider, api, answer)) =
            json.as_mut().and_then(|j| batch::answer_mut(batch, j))
        {
            let calls = proposal::body_calls(provider, api, answer);
            // Each call is decided, and recorded, as answering the line's own LLM call.
            let llm = LlmCall {
                provider: provider.as_str().to_string(),
                model: batch::answer_model(answer).map(str::to_string),
                ..LlmCall::default()
            };
            let exchange = ans.answer_line(Batched {
                llm: Some(llm),
                custom_id,
            });
            let rulings = super::proposal::rule(ans, &calls, &super::hold::Holding::Whole).await;
            ans.answer_line(exchange);
            if rulings.iter().any(|r| *r != Ruling::Pass) {
                proposal::apply_to_body(provider, api, answer, &rulings);
                // Written with the line ends JSON lets a string hold escaped, so every reader reads it as one line.
                rewritten = json.as_ref().map(|j| {
                    j.to_string()
                        .replace('\u{85}', "\\u0085")
                        .replace('\u{2028}', "\\u2028")
                        .replace('\u{2029}', "\\u2029")
                });
            }
        }
        changed |= rewritten.is_some();
        out.push_str(rewritten.as_deref().unwrap_or(line.text));
        out.push_str(line.end);
    }
    Ok(changed.then_some(out))
}

/// Whether a `Content-Type` names no charset, or UTF-8 or US-ASCII (RFC 9110 §8.3.2: the `charset` parameter, its
/// value case-insensitive, perhaps quoted).
fn utf8_charset(content_type: Option<&str>) -> bool {
    let Some(content_type) = content_type else {
        return true;
    };
    content_type.split(';').skip(1).all(|param| {
        let Some((name, value)) = param.split_once('=') else {
            return true;
        };
        if !name.trim().eq_ignore_ascii_case("charset") {
            return true;
        }
        let value = value.trim().trim_matches('"').to_ascii_lowercase();
        matches!(value.as_str(), "utf-8" | "utf8" | "us-ascii" | "ascii")
    })
}

/// Why batch results that are not UTF-8 text are refused.
const NOT_UTF8: &str =
    "the upstream's batch results are not UTF-8 text and could not be read for their tool calls";

/// Why a part of an answer read for tool calls is refused.
const PARTIAL: &str =
    "a part of an answer (206) cannot be read for its tool calls; ask for the whole answer";

/// Why batch results with a line that cannot be read are refused.
const UNREADABLE_LINE: &str =
    "a line of the upstream's batch results could not be read for its tool calls";

/// The body, whole and decoded, within the size and time bounds and the agent's share of the buffer budget
/// (`budget`); the reservation holding it goes with it.
///
/// `buf` holds what was read of it already, bounded by the policy's `max_body_bytes` and reserving each byte
/// [`INSPECTED_COPIES`] times (it is read as text for the decision, like a request body); `deadline` ends the hold
/// time.
async fn read_whole(
    mut body: UpstreamBody,
    mut buf: Buffer,
    deadline: tokio::time::Instant,
    plan: Plan,
    headers: &HeaderMap,
) -> Result<(Bytes, Reservation), (Reason, &'static str)> {
    let buf_limit = buf.limit();
    let read = async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return Err((
                    Reason::UpstreamUnreachable,
                    "the upstream's answer broke off",
                ));
            };
            if let Some(data) = frame.data_ref() {
                buf.push(data).map_err(overflow)?;
            }
        }
        Ok(())
    };
    tokio::time::timeout_at(deadline, read)
        .await
        .map_err(|_| (Reason::HoldTimeout, TOO_SLOW))??;
    let (raw, mut held) = buf.finish();
    if !plan.encoded {
        return Ok((raw, held));
    }
    let coding = inspect::content_coding(headers);
    let raw_len = raw.len() as u64;
    let decoded = inspect::decode_body(coding.as_deref(), raw, buf_limit).map_err(|_| {
        (
            Reason::Unparseable,
            "the upstream's answer could not be decoded for inspection",
        )
    })?;
    held.grow_to(raw_len + INSPECTED_COPIES * decoded.len() as u64)
        .map_err(|_| (Reason::BufferLimit, OVER_BUDGET))?;
    Ok((decoded, held))
}

/// The refusal for a response buffer that cannot grow.
pub(crate) fn overflow(o: Overflow) -> (Reason, &'static str) {
    match o {
        Overflow::TooLarge => (Reason::BodyTooLarge, TOO_LARGE),
        Overflow::Budget(_) => (Reason::BufferLimit, OVER_BUDGET),
    }
}

pub(crate) const OVER_BUDGET: &str =
    "the proxy's buffer budget cannot hold the upstream's answer for inspection; retry later";
pub(crate) const TOO_LARGE: &str = "the upstream's answer exceeds the inspection limit";
pub(crate) const TOO_SLOW: &str = "the upstream's answer did not complete within the hold time";

/// The answer (and record, in `phase`) when the enforcer refuses to pass a response on: the protocol's error shape,
/// 502 — or 503 with `Retry-After` when the buffer budget could not hold it (it may fit later).
async fn refused(
    ans: &Answering,
    phase: Phase,
    reason: Reason,
    message: &str,
) -> Response<ProxyBody> {
    let budget = reason == Reason::BufferLimit;
    let status = if budget {
        http::StatusCode::SERVICE_UNAVAILABLE
    } else {
        http::StatusCode::BAD_GATEWAY
    }
    .as_u16();
    record_refusal(ans, phase, reason, message, Some(status)).await;
    let resp = into_response(inspect::refusal_response(
        &ans.protocol,
        status,
        reason,
        message,
    ));
    if budget {
        return super::refusal::with_retry_after(resp, super::limits::limits().buffer_retry_after);
    }
    resp
}
