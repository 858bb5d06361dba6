//! The WebSocket phases (RFC 6455). After the upstream accepted a WebSocket upgrade, the proxy speaks WebSocket on
//! both sides (tungstenite: framing, fragments reassembled into messages, control frames, masking towards the
//! upstream), so every message is whole before anything is decided, and nothing is relayed unread:
//!
//! - a message from the agent is a request-phase Action with the upgrade request's head and the message as its
//!   body (`inspect::classify_message`: OpenAI Responses and Realtime events, JSON-RPC, or plain data), decided,
//!   recorded (linked to the upgrade's record), then forwarded, rewritten and re-framed, or refused in its
//!   protocol's own shape (an `error` event, a JSON-RPC error) — or, where the protocol has none, by closing the
//!   connection with 1008 (policy violation);
//! - a message from the upstream is a response-phase Action when the policy has response rules, and passes
//!   untouched (unrecorded) when none matches;
//! - a message over the policy's `max_body_bytes` closes the connection with 1009 (message too big), recorded: it is
//!   never relayed uninspected. `permessage-deflate` is never negotiated (the upgrade request's
//!   `Sec-WebSocket-Extensions` is removed), so every frame is read as sent.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use sha2::Digest;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::answer::Answering;
use crate::inspect::{self, InspectError, Protocol};
use crate::model::{
    Decision, Disposition, HttpResponse, Mode, Outcome, Phase, Reason, RequestSummary, Verdict,
};

type Ws = WebSocketStream<TokioIo<Upgraded>>;
type Sink = Arc<Mutex<SplitSink<Ws, Message>>>;

/// Relay the two upgraded connections message by message until either side closes.
pub(crate) async fn relay(client: TokioIo<Upgraded>, upstream: TokioIo<Upgraded>, ans: Answering) {
    let max = usize::try_from(ans.policy.max_body_bytes()).unwrap_or(usize::MAX);
    let config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let client = WebSocketStream::from_raw_socket(client, Role::Server, Some(config)).await;
    let upstream = WebSocketStream::from_raw_socket(upstream, Role::Client, Some(config)).await;
    let (client_tx, client_rx) = client.split();
    let (upstream_tx, upstream_rx) = upstream.split();
    let (client_tx, upstream_tx) = (
        Arc::new(Mutex::new(client_tx)),
        Arc::new(Mutex::new(upstream_tx)),
    );
    let ans = Arc::new(ans);
    tokio::select! {
        () = from_agent(&ans, client_rx, &client_tx, &upstream_tx) => {}
        () = from_upstream(&ans, upstream_rx, &client_tx, &upstream_tx) => {}
    }
}

/// What becomes of one message.
enum Fate {
    Forward(Message),
    /// Answer the agent with this message instead, keeping the connection.
    Answer(Message),
    /// Close both sides with this code and reason.
    Close(CloseCode, &'static str),
}

async fn from_agent(ans: &Answering, mut rx: SplitStream<Ws>, client: &Sink, upstream: &Sink) {
    while let Some(next) = rx.next().await {
        let fate = match next {
            Ok(msg @ (Message::Text(_) | Message::Binary(_))) => agent_message(ans, msg).await,
            Ok(Message::Close(frame)) => {
                let _ = upstream.lock().await.send(Message::Close(frame)).await;
                return;
            }
            Ok(_) => continue,
            Err(e) => {
                too_big(ans, &e, Phase::Request).await;
                close_both(client, upstream, close_code(&e), "").await;
                return;
            }
        };
        if !carry_out(fate, client, upstream, upstream).await {
            return;
        }
    }
}

async fn from_upstream(ans: &Answering, mut rx: SplitStream<Ws>, client: &Sink, upstream: &Sink) {
    while let Some(next) = rx.next().await {
        let fate = match next {
            Ok(msg @ (Message::Text(_) | Message::Binary(_))) => upstream_message(ans, msg).await,
            Ok(Message::Close(frame)) => {
                let _ = client.lock().await.send(Message::Close(frame)).await;
                return;
            }
            Ok(_) => continue,
            Err(e) => {
                too_big(ans, &e, Phase::Response).await;
                close_both(client, upstream, close_code(&e), "").await;
                return;
            }
        };
        if !carry_out(fate, client, upstream, client).await {
            return;
        }
    }
}

/// Carry a message's fate out: forward it to `to`, answer the agent, or close both. False once closed.
async fn carry_out(fate: Fate, client: &Sink, upstream: &Sink, to: &Sink) -> bool {
    let sent = match fate {
        Fate::Forward(msg) => to.lock().await.send(msg).await,
        Fate::Answer(msg) => client.lock().await.send(msg).await,
        Fate::Close(code, reason) => {
            close_both(client, upstream, code, reason).await;
            return false;
        }
    };
    sent.is_ok()
}

async fn close_both(client: &Sink, upstream: &Sink, code: CloseCode, reason: &'static str) {
    let frame = || {
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))
    };
    let _ = client.lock().await.send(frame()).await;
    let _ = upstream.lock().await.send(frame()).await;
}

fn close_code(e: &WsError) -> CloseCode {
    match e {
        WsError::Capacity(_) => CloseCode::Size,
        _ => CloseCode::Protocol,
    }
}

/// A message over the size limit is recorded as refused (never relayed uninspected).
async fn too_big(ans: &Answering, e: &WsError, phase: Phase) {
    if !matches!(e, WsError::Capacity(_)) {
        tracing::debug!(error = %e, "websocket relay ended with an error");
        return;
    }
    let message = "a WebSocket message exceeds the inspection limit";
    let decision = super::enforcer_decision(&ans.policy, Reason::BodyTooLarge, message);
    let outcome = refused(Some(Reason::BodyTooLarge));
    ans.record(phase, decision, ans.summary.clone(), outcome)
        .await;
}

fn refused(error: Option<Reason>) -> Outcome {
    Outcome {
        disposition: Disposition::Blocked,
        status: None,
        error,
    }
}

fn forwarded() -> Outcome {
    Outcome {
        disposition: Disposition::Forwarded,
        status: None,
        error: None,
    }
}

/// The text inspection reads of a message (binary as lossy UTF-8) and its JSON, when it is JSON.
fn contents(msg: &Message) -> (Bytes, String, Option<serde_json::Value>) {
    let raw = match msg {
        Message::Text(t) => Bytes::copy_from_slice(t.as_bytes()),
        Message::Binary(b) => b.clone(),
        _ => Bytes::new(),
    };
    let text = String::from_utf8_lossy(&raw).into_owned();
    let json = serde_json::from_str(&text).ok();
    (raw, text, json)
}

/// The record's view of a message: the upgrade's head, the message's size and digest.
fn summary(ans: &Answering, raw: &Bytes) -> RequestSummary {
    RequestSummary {
        body_size: raw.len() as u64,
        body_sha256: (!raw.is_empty()).then(|| hex::encode(sha2::Sha256::digest(raw))),
        changes: Vec::new(),
        ..ans.summary.clone()
    }
}

/// Decide one message from the agent.
async fn agent_message(ans: &Answering, msg: Message) -> Fate {
    let (raw, text, json) = contents(&msg);
    let mut summary = summary(ans, &raw);
    // A message claiming JSON that does not parse is refused, never decided as plain data (see the request path).
    if json.is_none() && inspect::claims_json(None, &text) {
        let e = InspectError::BadJson { protocol: "JSON" };
        let decision = super::enforcer_decision(&ans.policy, Reason::Unparseable, &e.to_string());
        ans.record(
            Phase::Request,
            decision,
            summary,
            refused(Some(Reason::Unparseable)),
        )
        .await;
        return Fate::Close(CloseCode::Invalid, "message is not valid JSON");
    }
    let mut action = ans.request.clone();
    if let Some(http) = action.http.as_mut() {
        http.body_size = raw.len() as u64;
        http.body = text;
        http.json = json;
    }
    let inspected = inspect::classify_message(action, &ans.ctx.inspect);
    let decided = ans.policy.decide_all(&inspected.actions);
    if let Some(a) = inspected.actions.get(decided.index) {
        if let Some(llm) = &a.llm {
            summary.llm_provider = Some(llm.provider.clone());
            summary.llm_model = llm.model.clone();
        }
        if let Some(mcp) = &a.mcp {
            summary.mcp_method = Some(mcp.method.clone());
            summary.mcp_tool = mcp.tool.clone();
        }
    }
    let json = inspected
        .actions
        .get(decided.index)
        .and_then(|a| a.http.as_ref())
        .and_then(|h| h.json.clone());
    let judged = Judged {
        phase: Phase::Request,
        protocol: &inspected.protocol,
        each: &decided.each,
        decision: decided.decision.clone(),
        json,
        summary,
    };
    carry_out_decision(ans, judged, msg).await
}

/// Decide one message from the upstream, when response rules exist; untouched and unrecorded otherwise, or when
/// none matches.
async fn upstream_message(ans: &Answering, msg: Message) -> Fate {
    if !ans.policy.has_rules_for(Phase::Response) {
        return Fate::Forward(msg);
    }
    let (raw, text, json) = contents(&msg);
    let mut action = ans.request.clone();
    action.response = Some(HttpResponse {
        status: 101,
        body_size: raw.len() as u64,
        body: text,
        json: json.clone(),
        ..HttpResponse::default()
    });
    let decision = ans.policy.evaluate(&action);
    if decision.matched_rules.is_empty() && decision.verdict == Verdict::Allow {
        return Fate::Forward(msg);
    }
    let each = [decision.clone()];
    let judged = Judged {
        phase: Phase::Response,
        protocol: &ans.protocol,
        each: &each,
        decision,
        json,
        summary: summary(ans, &raw),
    };
    carry_out_decision(ans, judged, msg).await
}

/// A message and what was decided about it.
struct Judged<'a> {
    phase: Phase,
    protocol: &'a Protocol,
    /// Each Action's own decision (a JSON-RPC batch's elements).
    each: &'a [Decision],
    /// The decision carried out.
    decision: Decision,
    /// The message's JSON, when it is JSON.
    json: Option<serde_json::Value>,
    summary: RequestSummary,
}

/// Record the decision for a message and carry it out: forward it as it is, rewritten, or refuse it.
async fn carry_out_decision(ans: &Answering, judged: Judged<'_>, msg: Message) -> Fate {
    let Judged {
        phase,
        protocol,
        each,
        mut decision,
        json,
        mut summary,
    } = judged;
    let enforce = decision.mode == Mode::Enforce;
    let mut fate = Fate::Forward(msg);
    if enforce && decision.verdict == Verdict::Constrain {
        match rewrite(ans, &decision, json) {
            Ok((rewritten, changes)) => {
                summary.changes = changes;
                fate = Fate::Forward(rewritten);
            }
            Err(reason) => {
                decision.verdict = Verdict::Block;
                decision.reason = reason;
                decision.rewrites.clear();
            }
        }
    }
    let blocked = enforce && decision.verdict == Verdict::Block;
    if blocked {
        let refusal_each: Vec<Decision> = if each.len() == 1 {
            vec![decision.clone()]
        } else {
            each.to_vec()
        };
        fate = match inspect::message_block(protocol, &refusal_each) {
            Some(text) if phase == Phase::Request => Fate::Answer(Message::Text(text.into())),
            _ => Fate::Close(CloseCode::Policy, "blocked by policy"),
        };
    }
    let error = matches!(decision.reason, Reason::SignedField | Reason::Unredactable)
        .then_some(decision.reason);
    let outcome = if blocked { refused(error) } else { forwarded() };
    if !ans.record(phase, decision, summary, outcome).await {
        return Fate::Close(
            CloseCode::Error,
            "the enforcer could not record the message",
        );
    }
    fate
}

/// A constrained message, rewritten: JSON through the constrain stage, re-serialised as a text message. A message
/// that is not JSON cannot be rewritten safely: refused as unparseable.
fn rewrite(
    ans: &Answering,
    decision: &Decision,
    json: Option<serde_json::Value>,
) -> Result<(Message, Vec<crate::model::Change>), Reason> {
    let Some(mut value) = json else {
        return Err(Reason::Unparseable);
    };
    match crate::constrain::apply_to_json(&decision.rewrites, &ans.policy, &mut value) {
        Ok(changes) => Ok((Message::Text(value.to_string().into()), changes)),
        Err(crate::constrain::ConstrainError::SignedField { .. }) => Err(Reason::SignedField),
        Err(crate::constrain::ConstrainError::Unredactable { .. }) => Err(Reason::Unredactable),
        Err(_) => Err(Reason::Unparseable),
    }
}
