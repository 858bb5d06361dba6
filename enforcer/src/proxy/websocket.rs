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
//!   untouched (unrecorded) when none matches; on an OpenAI Responses connection (`/v1/responses`) its events then
//!   go through the proposal reader, as the same events do over server-sent events (`proposal`), and on a Realtime
//!   connection (`/v1/realtime`) through its Realtime reader: a proposed tool call is held until complete (none of
//!   its events reaches the agent meanwhile), decided with the model of the agent's last forwarded LLM call (a
//!   `response.create`; over Realtime also a `session.update` or a `conversation.item.create`), recorded linked to
//!   that call's record, and passed, rewritten or replaced by a message saying it was refused;
//! - a message under an enforced `review` is refused like a block (reason `review_unavailable`): it cannot be held,
//!   since the connection's later messages would wait behind it and the protocols have no "pending" answer;
//! - every message is an Action of the agent's session: it sees the session's labels and counters and leaves its own
//!   (`Sessions::fill`, `Sessions::note`), as a request does;
//! - a message over the policy's `max_body_bytes` closes the connection with 1009 (message too big), recorded: it is
//!   never relayed uninspected. `permessage-deflate` is never negotiated (the upgrade request's
//!   `Sec-WebSocket-Extensions` is removed), so every frame is read as sent;
//! - what each side has sent of a message not yet relayed (and a tool call the proposal reader holds) counts in the
//!   agent's share of the buffer budget (`budget`): the bytes are reserved as they are read from the socket, and
//!   given back once the message has been carried out; so does the JSON a message is parsed into (reserved before
//!   the parse, `budget::json_tree_bound`). A message the budget cannot take closes the connection with
//!   1013 (try again later, RFC 6455 §7.4.2 / the IANA close-code registry), recorded with reason `buffer_limit`.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::answer::Answering;
use super::budget::{json_tree_bound, Reservation, INSPECTED_COPIES};
use crate::inspect::proposal::{Emit, Event, Proposals};
use crate::inspect::{self, InspectConfig, InspectError, Inspected, LlmApi, Protocol, Provider};
use crate::model::{
    Action, Decision, Disposition, HttpResponse, LlmCall, Mode, Outcome, Phase, Reason,
    RequestSummary, Shared, Verdict,
};

type Ws = WebSocketStream<Metered<TokioIo<Upgraded>>>;
type Sink = Arc<Mutex<SplitSink<Ws, Message>>>;

/// Relay the two upgraded connections message by message until either side closes.
pub(crate) async fn relay(client: TokioIo<Upgraded>, upstream: TokioIo<Upgraded>, ans: Answering) {
    let config = config(ans.policy.max_body_bytes());
    let budget = super::limits::budget();
    let (client, from_client) = Metered::new(client, budget.reserve(&ans.agent));
    let (upstream, from_upstream_held) = Metered::new(upstream, budget.reserve(&ans.agent));
    let client = WebSocketStream::from_raw_socket(client, Role::Server, Some(config)).await;
    let upstream = WebSocketStream::from_raw_socket(upstream, Role::Client, Some(config)).await;
    let (client_tx, client_rx) = client.split();
    let (upstream_tx, upstream_rx) = upstream.split();
    let (client_tx, upstream_tx) = (
        Arc::new(Mutex::new(client_tx)),
        Arc::new(Mutex::new(upstream_tx)),
    );
    let ans = Arc::new(ans);
    let turn = Turn(std::sync::Mutex::new(
        crate::inspect::connection_call(&ans.request, &ans.ctx.inspect)
            .map(|llm| (llm, ans.parent)),
    ));
    tokio::select! {
        () = from_agent(&ans, &turn, (client_rx, &from_client), &client_tx, &upstream_tx) => {}
        () = from_upstream(&ans, &turn, (upstream_rx, &from_upstream_held), &client_tx, &upstream_tx) => {}
    }
}

/// One side's bytes read and not yet carried out, in the buffer budget.
type Held = Arc<std::sync::Mutex<Reservation>>;

/// A side of the relay whose reads are reserved in the buffer budget before tungstenite buffers them: a read the
/// budget cannot take fails with [`OverBudget`].
struct Metered<S> {
    inner: S,
    held: Held,
}

/// The read error of a side whose bytes the buffer budget cannot take.
#[derive(Debug, thiserror::Error)]
#[error("the proxy's buffer budget cannot hold more of this WebSocket's messages")]
struct OverBudget;

impl<S> Metered<S> {
    fn new(inner: S, held: Reservation) -> (Metered<S>, Held) {
        let held = Arc::new(std::sync::Mutex::new(held));
        (
            Metered {
                inner,
                held: held.clone(),
            },
            held,
        )
    }
}

/// The side's messages so far are carried out: what it holds now is `kept` bytes (a held tool call), the bytes
/// read past them are counted from the next read. `false` when the budget cannot take `kept`.
fn settle(held: &Held, kept: u64) -> bool {
    let mut held = held
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    held.shrink_to(kept);
    held.grow_to(kept).is_ok()
}

/// Bytes the JSON of `msg` can be parsed into (`json_tree_bound`).
fn message_tree(msg: &Message) -> u64 {
    match msg {
        Message::Text(t) => json_tree_bound(t.as_bytes()),
        Message::Binary(b) => json_tree_bound(b),
        _ => 0,
    }
}

/// Reserve `n` more bytes for the side's message being decided (given back when it is settled); `false` when the
/// budget cannot take them.
fn reserve(held: &Held, n: u64) -> bool {
    held.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .grow(n)
        .is_ok()
}

/// Reserve the room `msg`'s JSON can take before it is parsed.
fn reserve_tree(held: &Held, msg: &Message) -> bool {
    reserve(held, message_tree(msg))
}

fn over_budget(e: &WsError) -> bool {
    matches!(e, WsError::Io(io) if io.get_ref().is_some_and(|inner| inner.is::<OverBudget>()))
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Metered<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before) as u64;
        if n > 0 {
            let mut held = self
                .held
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // The message, and inspection's copies of it while it is decided (`contents`).
            if held.grow(n * INSPECTED_COPIES).is_err() {
                return std::task::Poll::Ready(Err(std::io::Error::other(OverBudget)));
            }
        }
        read
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Metered<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The LLM call the upstream's events answer: the last message from the agent that made one (a Responses
/// `response.create`; a Realtime `session.update`, `response.create` or `conversation.item.create`) and was
/// forwarded, with its record's `seq`; before any, the call the connection makes by being opened
/// (`inspect::connection_call`: provider `openai`, Realtime's model from the URL), with the upgrade's `seq`.
/// Proposals in the events are decided with that call's `llm` (its provider and model, as over server-sent events)
/// and their records, refusals included, name it and link to its record.
struct Turn(std::sync::Mutex<Option<(LlmCall, u64)>>);

impl Turn {
    /// The exchange as answering the current call, when there is one.
    fn answering(&self, ans: &Answering) -> Option<Answering> {
        self.get().map(|(llm, seq)| ans.for_turn(llm, seq))
    }

    fn set(&self, llm: LlmCall, seq: u64) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((llm, seq));
    }

    fn get(&self) -> Option<(LlmCall, u64)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The proxy's WebSocket settings under a policy whose `max_body_bytes` is `limit`: a message or frame larger than
/// that is a read error (`Error::Capacity`), never a message.
fn config(limit: u64) -> WebSocketConfig {
    let max = usize::try_from(limit).unwrap_or(usize::MAX);
    WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
}

/// What becomes of one message.
enum Fate {
    Forward(Message),
    /// Answer the agent with this message instead, keeping the connection.
    Answer(Message),
    /// Close both sides with this code and reason.
    Close(CloseCode, &'static str),
}

async fn from_agent(
    ans: &Answering,
    turn: &Turn,
    (mut rx, held): (SplitStream<Ws>, &Held),
    client: &Sink,
    upstream: &Sink,
) {
    while let Some(next) = rx.next().await {
        let fate = match next {
            Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                if !reserve_tree(held, &msg) {
                    too_big(ans, &over_budget_error(), Phase::Request).await;
                    close_both(client, upstream, CloseCode::Again, "").await;
                    return;
                }
                agent_message(ans, turn, msg).await
            }
            Ok(Message::Close(frame)) => {
                let _ = upstream.lock().await.send(Message::Close(frame)).await;
                return;
            }
            Ok(_) => {
                // A control frame: carried out by tungstenite.
                settle(held, 0);
                continue;
            }
            Err(e) => {
                too_big(ans, &e, Phase::Request).await;
                close_both(client, upstream, close_code(&e), "").await;
                return;
            }
        };
        if !carry_out(fate, client, upstream, upstream).await {
            return;
        }
        settle(held, 0);
    }
}

async fn from_upstream(
    ans: &Answering,
    turn: &Turn,
    (mut rx, held): (SplitStream<Ws>, &Held),
    client: &Sink,
    upstream: &Sink,
) {
    let mut props = proposals_for(ans);
    let parses = props.is_some() || ans.policy.has_rules_for(Phase::Response);
    // The parsed JSON of the messages since the proposal reader began holding a call (each held event keeps its
    // own; the call's arguments are parsed once complete), in the budget until it holds none.
    let mut held_tree = 0u64;
    while let Some(next) = rx.next().await {
        let fate = match next {
            Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                let tree = if parses { message_tree(&msg) } else { 0 };
                if !reserve(held, tree) {
                    let now = turn.answering(ans);
                    too_big(
                        now.as_ref().unwrap_or(ans),
                        &over_budget_error(),
                        Phase::Response,
                    )
                    .await;
                    close_both(client, upstream, CloseCode::Again, "").await;
                    return;
                }
                match (upstream_message(ans, turn, msg).await, props.as_mut()) {
                    (Fate::Forward(msg), Some(props)) => {
                        for fate in proposed(ans, turn, props, msg).await {
                            if !carry_out(fate, client, upstream, client).await {
                                return;
                            }
                        }
                        held_tree = match props.held_bytes() {
                            0 => 0,
                            _ => held_tree.saturating_add(tree),
                        };
                        // A tool call the reader still holds stays in the budget.
                        if !settle(held, props.held_bytes() as u64 + held_tree) {
                            let now = turn.answering(ans);
                            let now = now.as_ref().unwrap_or(ans);
                            too_big(now, &over_budget_error(), Phase::Proposal).await;
                            close_both(client, upstream, CloseCode::Again, "").await;
                            return;
                        }
                        continue;
                    }
                    (fate, _) => fate,
                }
            }
            Ok(Message::Close(frame)) => {
                let _ = client.lock().await.send(Message::Close(frame)).await;
                return;
            }
            Ok(_) => {
                let kept = props.as_ref().map_or(0, |p| p.held_bytes() as u64);
                settle(held, kept + held_tree);
                continue;
            }
            Err(e) => {
                let now = turn.answering(ans);
                too_big(now.as_ref().unwrap_or(ans), &e, Phase::Response).await;
                close_both(client, upstream, close_code(&e), "").await;
                return;
            }
        };
        if !carry_out(fate, client, upstream, client).await {
            return;
        }
        let kept = props.as_ref().map_or(0, |p| p.held_bytes() as u64);
        settle(held, kept + held_tree);
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
        e if over_budget(e) => CloseCode::Again,
        _ => CloseCode::Protocol,
    }
}

/// The read error of a side the buffer budget cannot take more of.
fn over_budget_error() -> WsError {
    WsError::Io(std::io::Error::other(OverBudget))
}

/// A message over the size limit, or one the buffer budget cannot hold, is recorded as refused (never relayed
/// uninspected).
async fn too_big(ans: &Answering, e: &WsError, phase: Phase) {
    let (reason, message) = match e {
        WsError::Capacity(_) => (
            Reason::BodyTooLarge,
            "a WebSocket message exceeds the inspection limit",
        ),
        e if over_budget(e) => (
            Reason::BufferLimit,
            "the proxy's buffer budget cannot hold the agent's WebSocket messages; retry later",
        ),
        _ => {
            tracing::debug!(error = %e, "websocket relay ended with an error");
            return;
        }
    };
    let decision = super::enforcer_decision(&ans.policy, reason, message);
    let outcome = refused(Some(reason));
    // Naming the LLM call `ans` answers, if any (the agent's messages are answered by none).
    ans.record(phase, decision, ans.refusal_summary(), outcome)
        .await;
}

fn refused(error: Option<Reason>) -> Outcome {
    Outcome {
        disposition: Disposition::Blocked,
        status: None,
        error,
    }
}

/// The text inspection reads of a message (binary as lossy UTF-8) and its JSON, when it is JSON.
fn contents(msg: &Message) -> (Bytes, String) {
    let raw = match msg {
        Message::Text(t) => Bytes::copy_from_slice(t.as_bytes()),
        Message::Binary(b) => b.clone(),
        _ => Bytes::new(),
    };
    let text = crate::encoding::lossy_text(&raw);
    (raw, text)
}

/// Decide one message from the agent; a forwarded LLM call becomes the `turn` the upstream's events answer.
async fn agent_message(ans: &Answering, turn: &Turn, msg: Message) -> Fate {
    let (raw, text) = contents(&msg);
    let mut summary = ans.part_summary(&raw, Vec::new());
    // As a request body: a member a condition selects must not have a twin named alike once folded.
    let classified =
        classify_agent_message(&ans.request, &raw, text, &ans.ctx.inspect).and_then(|inspected| {
            let twins = inspected
                .actions
                .iter()
                .any(|a| ans.policy.reads_twin_member(a));
            if twins {
                Err(inspect::InspectError::TwinMembers)
            } else {
                Ok(inspected)
            }
        });
    let mut inspected = match classified {
        Ok(inspected) => inspected,
        Err(e) => {
            let decision =
                super::enforcer_decision(&ans.policy, Reason::Unparseable, &e.to_string());
            ans.record(
                Phase::Request,
                decision,
                summary,
                refused(Some(Reason::Unparseable)),
            )
            .await;
            return Fate::Close(CloseCode::Invalid, "message is not valid JSON");
        }
    };
    let decided = ans.decide_in_session(&mut inspected.actions);
    let llm = inspected
        .actions
        .get(decided.index)
        .and_then(|a| a.llm.clone());
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
    // The message's JSON, taken from the Actions rather than copied: the budget holds room for one parsed tree.
    let json = inspected
        .actions
        .get_mut(decided.index)
        .and_then(|a| a.http.as_mut())
        .and_then(|h| h.json.take());
    inspected.actions.clear();
    let json = json.map(Shared::into_inner);
    let judged = Judged {
        phase: Phase::Request,
        protocol: &inspected.protocol,
        each: &decided.each,
        decision: decided.decision.clone(),
        json,
        summary,
    };
    let (fate, seq) = carry_out_decision(ans, judged, msg).await;
    if let (Fate::Forward(_), Some(llm), Some(seq)) = (&fate, llm, seq) {
        turn.set(llm, seq);
    }
    fate
}

/// The Actions of one message from the agent (`raw`, read as `text` and, when it parses, as JSON): the upgrade
/// request's Action `request` with the message as its body, classified by `inspect::classify_message`. A message
/// claiming JSON that does not parse, or JSON-RPC whose members a server could read otherwise
/// (`inspect::ambiguous_json_rpc`), is refused (`BadJson`), never decided as plain data (see the request path).
fn classify_agent_message(
    request: &Action,
    raw: &Bytes,
    text: String,
    cfg: &InspectConfig,
) -> Result<Inspected, InspectError> {
    // One pass reads the JSON and finds a member named twice; only then is the text read again, for the checks
    // below to refuse in their order.
    let (json, twins) = match inspect::read_json(&text, inspect::Twins::Exact) {
        Ok(json) => (json, false),
        Err(inspect::TwinMembers) => (serde_json::from_str(&text).ok(), true),
    };
    if json.is_none() && inspect::claims_json(None, &text) {
        return Err(InspectError::BadJson { protocol: "JSON" });
    }
    // JSON-RPC a server could read otherwise than the policy, or JSON naming a member twice (see the request path).
    if json.as_ref().is_some_and(inspect::ambiguous_json_rpc) {
        return Err(InspectError::BadJson { protocol: "MCP" });
    }
    if twins {
        return Err(InspectError::TwinMembers);
    }
    let mut action = request.clone();
    if let Some(http) = action.http.as_mut() {
        http.body_size = raw.len() as u64;
        http.body = text.into();
        http.json = json.map(Shared::new);
    }
    Ok(inspect::classify_message(action, cfg))
}

/// Exists for fuzzing (`fuzz/fuzz_targets/websocket_messages.rs`), and nothing else calls it: the bytes an agent
/// sends on an upgraded connection (`wire`: RFC 6455 frames, masked as a client's must be, §5.3) read with the
/// proxy's own settings under a policy whose `max_body_bytes` is `limit` — fragments reassembled into messages,
/// control frames answered (the answers discarded), the size limit enforced — and every text or binary message
/// classified as the proxy's agent side does, on the connection upgraded by `request` (the deciding Action of the
/// upgrade request). Returns, in order, each message's Actions or the reason it would be refused, and the close
/// code the read error that ended the stream would get (`None` when it ended with a close frame or the input).
pub fn fuzz_agent_messages(
    request: &Action,
    wire: &[u8],
    limit: u64,
    cfg: &InspectConfig,
) -> (Vec<Result<Inspected, Reason>>, Option<u16>) {
    let stream = Wire(std::io::Cursor::new(wire));
    let mut ws = tungstenite::WebSocket::from_raw_socket(stream, Role::Server, Some(config(limit)));
    let mut out = Vec::new();
    loop {
        match ws.read() {
            Ok(msg @ (Message::Text(_) | Message::Binary(_))) => {
                let (raw, text) = contents(&msg);
                let classified = classify_agent_message(request, &raw, text, cfg);
                out.push(classified.map_err(|_| Reason::Unparseable));
            }
            Ok(Message::Close(_)) => return (out, None),
            Ok(_) => {}
            Err(WsError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return (out, None)
            }
            Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => return (out, None),
            Err(e) => return (out, Some(close_code(&e).into())),
        }
    }
}

/// An agent's bytes as a connection: read from the input, writes (pongs, the close reply) discarded.
struct Wire<'a>(std::io::Cursor<&'a [u8]>);

impl std::io::Read for Wire<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl std::io::Write for Wire<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Decide one message from the upstream, when response rules exist; untouched and unrecorded otherwise, or when
/// none matches. It answers the current turn's LLM call (`Turn`): decided with that call's `llm`, recorded linked to
/// its record, as a proposal in it is.
async fn upstream_message(ans: &Answering, turn: &Turn, msg: Message) -> Fate {
    if !ans.policy.has_rules_for(Phase::Response) {
        return Fate::Forward(msg);
    }
    let now = turn.answering(ans);
    let ans = now.as_ref().unwrap_or(ans);
    let (raw, text) = contents(&msg);
    let mut action = ans.request.clone();
    action.response = Some(HttpResponse {
        status: 101,
        body_size: raw.len() as u64,
        json: serde_json::from_str(&text).ok(),
        body: text,
        ..HttpResponse::default()
    });
    let decision = ans
        .decide_in_session(std::slice::from_mut(&mut action))
        .decision;
    if decision.matched_rules.is_empty() && decision.verdict == Verdict::Allow {
        return Fate::Forward(msg);
    }
    // Taken back from the Action rather than copied: the budget holds room for one parsed tree.
    let json = action.response.as_mut().and_then(|r| r.json.take());
    let each = [decision.clone()];
    let judged = Judged {
        phase: Phase::Response,
        protocol: &ans.protocol,
        each: &each,
        decision,
        json,
        summary: super::response::summary(ans, &raw, Vec::new()),
    };
    carry_out_decision(ans, judged, msg).await.0
}

/// The proposal reader of an OpenAI connection whose server events carry proposed tool calls, when the policy has
/// proposal rules: the Responses WebSocket mode (its events are its server-sent events) and the Realtime API (its
/// own events, in the beta interface when the upgrade asked for it with `OpenAI-Beta: realtime=v1`).
fn proposals_for(ans: &Answering) -> Option<Proposals> {
    let openai = matches!(
        ans.protocol,
        Protocol::Provider(Provider::OpenAi)
            | Protocol::Llm {
                provider: Provider::OpenAi,
                ..
            }
    );
    if !openai || !ans.policy.has_rules_for(Phase::Proposal) {
        return None;
    }
    let http = ans.request.http.as_ref()?;
    if crate::inspect::is_responses_websocket(&http.path) {
        return Proposals::new(Provider::OpenAi, LlmApi::Responses);
    }
    if crate::inspect::is_realtime_websocket(&http.path) {
        let beta = http
            .headers
            .get_all("openai-beta")
            .flat_map(|v| v.split(','))
            .any(|v| v.trim().eq_ignore_ascii_case("realtime=v1"));
        return Some(Proposals::realtime(beta));
    }
    None
}

/// One server event through the proposal reader: the messages to send now (none while a call is held). A call held
/// beyond the policy's `max_body_bytes` closes the connection (1009), recorded.
async fn proposed(ans: &Answering, turn: &Turn, props: &mut Proposals, msg: Message) -> Vec<Fate> {
    let (raw, text) = contents(&msg);
    let pushed = props.push(Event {
        name: None,
        data: text,
        raw,
    });
    // What is decided or refused here answers the current call (`Turn`), named in its records.
    let Ok(calls) = pushed else {
        // What the reader cannot read may carry a call: the connection ends (fail closed), recorded.
        let message = crate::inspect::proposal::Unreadable.to_string();
        let reason = Reason::Unparseable;
        let now = turn.answering(ans);
        let now = now.as_ref().unwrap_or(ans);
        super::response::record_refusal(now, Phase::Proposal, reason, &message, None).await;
        return vec![Fate::Close(CloseCode::Invalid, "message is not valid JSON")];
    };
    let hold = super::hold::Holding::No;
    let now = if calls.is_empty() {
        None
    } else {
        turn.answering(ans)
    };
    let rulings = super::proposal::rule(now.as_ref().unwrap_or(ans), &calls, &hold).await;
    let mut out: Vec<Fate> = props
        .release(&rulings)
        .into_iter()
        .map(|e| match e {
            Emit::Raw(b) => Fate::Forward(Message::Text(crate::encoding::lossy_text(&b).into())),
            Emit::New { data, .. } => Fate::Forward(Message::Text(data.into())),
        })
        .collect();
    if props.held_bytes() as u64 > ans.policy.max_body_bytes() {
        let message = "a proposed tool call exceeds the inspection limit";
        let reason = Reason::BodyTooLarge;
        let now = now.or_else(|| turn.answering(ans));
        let now = now.as_ref().unwrap_or(ans);
        super::response::record_refusal(now, Phase::Proposal, reason, message, None).await;
        out.push(Fate::Close(
            CloseCode::Size,
            "a tool call exceeds the inspection limit",
        ));
    }
    out
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

/// Record the decision for a message and carry it out: forward it as it is, rewritten, or refuse it. The fate, and
/// the record's `seq` once written.
async fn carry_out_decision(
    ans: &Answering,
    judged: Judged<'_>,
    msg: Message,
) -> (Fate, Option<u64>) {
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
            Err(reason) => decision.block_instead(reason),
        }
    }
    let unheld = enforce && decision.verdict == Verdict::Review;
    let blocked = enforce && (decision.verdict == Verdict::Block || unheld);
    if blocked {
        let refusal_each: Vec<Decision> = if each.len() == 1 {
            vec![super::hold::unheld(&decision)]
        } else {
            each.iter().map(super::hold::unheld).collect()
        };
        fate = match inspect::message_block(protocol, &refusal_each) {
            Some(text) if phase == Phase::Request => Fate::Answer(Message::Text(text.into())),
            _ => Fate::Close(CloseCode::Policy, "blocked by policy"),
        };
    }
    let mut outcome = Outcome::of(&decision, blocked, None);
    if unheld {
        outcome.error = Some(Reason::ReviewUnavailable);
    }
    match ans.record_seq(phase, decision, summary, outcome).await {
        Some(seq) => (fate, Some(seq)),
        None => (
            Fate::Close(
                CloseCode::Error,
                "the enforcer could not record the message",
            ),
            None,
        ),
    }
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
        Err(e) => Err(e.reason()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Scheme;

    /// A client's frame (RFC 6455 §5.2), masked, payload under 64 KiB.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![u8::from(fin) << 7 | opcode];
        match u8::try_from(payload.len()) {
            Ok(len) if len < 126 => out.push(0x80 | len),
            _ => {
                out.push(0x80 | 126);
                out.extend(u16::try_from(payload.len()).unwrap().to_be_bytes());
            }
        }
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        out
    }

    fn upgrade(host: &str, path: &str, cfg: &InspectConfig) -> Action {
        let parts = http::Request::get(path)
            .header("host", host)
            .header("upgrade", "websocket")
            .header("connection", "Upgrade")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let dst = (Scheme::Https, "203.0.113.7:443".parse().unwrap());
        let inspected =
            super::super::fuzz_request_to_action(&parts, Bytes::new(), dst, cfg, 1 << 20).unwrap();
        inspected.actions[0].clone()
    }

    #[test]
    fn the_fuzzing_entry_reassembles_and_classifies_agent_messages() {
        let cfg = InspectConfig::default();
        let realtime = upgrade("api.openai.com", "/v1/realtime?model=gpt-4o-realtime", &cfg);
        let mut wire = frame(
            false,
            1,
            br#"{"type":"session.update","session":{"tools":[{"#,
        );
        wire.extend(frame(true, 9, b"ping"));
        wire.extend(frame(
            true,
            0,
            br#""type":"function","name":"run_shell"}]}}"#,
        ));
        wire.extend(frame(true, 1, br#"{"type":"session.update","#));
        wire.extend(frame(true, 8, &[0x03, 0xe8]));
        let (messages, close) = fuzz_agent_messages(&realtime, &wire, 1 << 20, &cfg);
        assert_eq!(close, None);
        assert_eq!(messages.len(), 2);
        let first = messages[0].as_ref().unwrap();
        let llm = first.actions[0].llm.as_ref().unwrap();
        assert_eq!(llm.model.as_deref(), Some("gpt-4o-realtime"));
        assert_eq!(llm.tools, ["run_shell"]);
        assert_eq!(messages[1].as_ref().unwrap_err(), &Reason::Unparseable);

        let plain = upgrade("example.com", "/socket", &cfg);
        let (messages, close) = fuzz_agent_messages(&plain, &frame(true, 2, &[7; 64]), 16, &cfg);
        assert!(messages.is_empty());
        assert_eq!(close, Some(1009));
        let unmasked = [0x81, 0x02, b'h', b'i'];
        let (messages, close) = fuzz_agent_messages(&plain, &unmasked, 16, &cfg);
        assert!(messages.is_empty());
        assert_eq!(close, Some(1002));
    }

    /// Over Realtime, returning a tool's result is an LLM call with tool results, as a Responses `input[]`
    /// `function_call_output` is: a `conversation.item.create` adding one, or a `response.create` whose own `input`
    /// holds one; a user message added is an LLM call without.
    #[test]
    fn realtime_tool_results_are_llm_calls_with_tool_results() {
        let cfg = InspectConfig::default();
        let realtime = upgrade("api.openai.com", "/v1/realtime?model=gpt-realtime", &cfg);
        let messages = [
            (
                r#"{"type":"conversation.item.create","item":{"type":"function_call_output","call_id":"c","output":"42"}}"#,
                true,
            ),
            (
                r#"{"type":"response.create","response":{"input":[{"type":"function_call_output","call_id":"c","output":"42"}]}}"#,
                true,
            ),
            (
                r#"{"type":"conversation.item.create","item":{"type":"message","role":"user","content":[{"type":"input_text","text":"hi"}]}}"#,
                false,
            ),
        ];
        for (message, results) in messages {
            let mut wire = frame(true, 1, message.as_bytes());
            wire.extend(frame(true, 8, &[0x03, 0xe8]));
            let (out, close) = fuzz_agent_messages(&realtime, &wire, 1 << 20, &cfg);
            assert_eq!(close, None);
            let llm = out[0].as_ref().unwrap().actions[0]
                .llm
                .clone()
                .expect(message);
            assert_eq!(llm.model.as_deref(), Some("gpt-realtime"), "{message}");
            assert_eq!(llm.has_tool_results, results, "{message}");
        }
    }
}
