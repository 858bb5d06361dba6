//! A response streamed as server-sent events, decided event by event while it streams: each event is read whole
//! (`inspect::sse`), decided by the response rules when some may apply, then handed to the proposal reader of its
//! LLM API when proposal rules exist; what comes out is sent as soon as the upstream's chunk that carried it is read.
//! Text and reasoning events are never held; only a proposed tool call is, until its arguments are complete, within
//! the policy's `max_body_bytes`, the proxy's hold timeout and the agent's share of the buffer budget (`budget`, which
//! also counts the JSON each event is parsed into, reserved before the parse; beyond any of them the stream ends with
//! the protocol's error event, recorded), and then while a review of it waits (up to the review's timeout; what came
//! before the call has been sent, and an SSE comment line every `review_keepalive` keeps the stream alive). A stream that ends early ends the agent's too (an error, not a clean
//! end); a content-coded stream is read whole and decoded first.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::header;
use http::Response;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};

use super::upstream::{HttpError, UpstreamBody};
use serde_json::Value;
use tokio::sync::mpsc;

use super::answer::Answering;
use super::budget::{json_tree_bound, Buffer, Reservation};
use super::hold::Holding;
use super::http::ProxyBody;
use super::response::{self, Fate, Head, Plan};
use crate::inspect::proposal::{Call, Emit, Event, Proposals, Ruling, Unreadable};
use crate::inspect::sse::{self, SseEvent, SseReader};
use crate::inspect::{self, StreamBlock};
use crate::model::{Action, Phase, Reason};

const UNDECODABLE: &str = "the upstream's answer could not be decoded for inspection";

/// One frame of the agent's body, or the upstream's error that ends it.
pub(crate) type Sent = Result<Frame<Bytes>, HttpError>;

/// The agent's body: frames the reading task sends.
struct Channel(mpsc::Receiver<Sent>);

impl Body for Channel {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Sent>> {
        self.0.poll_recv(cx)
    }
}

/// The agent's response: the upstream's head at once, the body as the reading task decides it.
pub(crate) fn stream(
    resp: Response<UpstreamBody>,
    ans: Answering,
    plan: Plan,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    let head = Head::of(parts.status.as_u16(), &parts.headers);
    let coding = inspect::content_coding(&parts.headers);
    // Events may be rewritten and a coded stream is passed on decoded: the length is the stream's own.
    parts.headers.remove(header::CONTENT_LENGTH);
    if plan.encoded {
        parts.headers.remove(header::CONTENT_ENCODING);
    }
    ans.trace_head(parts.status.as_u16(), &parts.headers);
    let (tx, rx) = mpsc::channel(16);
    let props = plan
        .proposals
        .and_then(|(provider, api)| Proposals::new(provider, api));
    let response = plan
        .responses
        .then(|| response::action(&ans, &head, String::new(), None));
    let held = super::limits::budget().reserve(&ans.agent);
    let reading = Reading {
        ans,
        plan,
        response,
        reader: SseReader::new(),
        props,
        held_since: None,
        ended: false,
        tx,
        held,
        held_tree: 0,
    };
    tokio::spawn(reading.run(body, coding));
    Response::from_parts(parts, Channel(rx).boxed())
}

struct Reading {
    ans: Answering,
    plan: Plan,
    /// The response Action every event is decided with, its body the event's data (when response rules may apply):
    /// built once, not once per event.
    response: Option<Action>,
    reader: SseReader,
    props: Option<Proposals>,
    /// Since when a tool call has been held.
    held_since: Option<Instant>,
    /// The stream was ended by a refusal: nothing more is sent.
    ended: bool,
    /// The agent's body.
    tx: mpsc::Sender<Sent>,
    /// What the reading holds (a partial event, a held call, a coded stream read whole) in the buffer budget.
    held: Reservation,
    /// Of `held`, the parsed JSON of the events since the proposal reader began holding a call (`json_tree_bound`).
    held_tree: u64,
}

/// What the upstream's body gave next.
enum Next {
    Data(Bytes),
    Trailers(Frame<Bytes>),
    End,
    Broken(HttpError),
    /// A held call did not complete in time.
    TimedOut,
}

impl Reading {
    async fn run(mut self, body: UpstreamBody, coding: Option<String>) {
        let agent = self.tx.clone();
        tokio::select! {
            () = self.pass_on(body, coding) => {}
            // The agent went away: the upstream's stream is dropped at once (its connection closed or its HTTP/2
            // stream reset), and what the reading held is given back, however long the upstream would have
            // stalled. Waiting for the next send to fail would wait for the upstream.
            () = agent.closed() => {}
        }
        self.ans.finish_trace();
    }

    async fn pass_on(&mut self, mut body: UpstreamBody, coding: Option<String>) {
        let tx = self.tx.clone();
        if self.plan.encoded {
            match self.decoded(&mut body, coding.as_deref()).await {
                Ok(Whole::All(all)) => {
                    let mut out = self.chunk(&all).await;
                    out.extend(self.end().await);
                    let _ = tx.send(Ok(Frame::data(out.freeze()))).await;
                }
                // Broken off upstream: broken off for the agent, nothing of it read or sent.
                Ok(Whole::Broken(e)) => drop(tx.send(Err(e)).await),
                Err(out) => drop(tx.send(Ok(Frame::data(out))).await),
            }
            return;
        }
        // Trailers (RFC 9110 §6.5) end the upstream's body, but what is still held is sent after them: they are
        // kept and sent last.
        let mut trailers = None;
        loop {
            let out = match self.next(&mut body).await {
                Next::Data(data) => self.chunk(&data).await,
                Next::End => self.end().await,
                Next::Trailers(t) => {
                    trailers = Some(t);
                    continue;
                }
                Next::Broken(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                Next::TimedOut => {
                    let out = self.refuse(Reason::HoldTimeout, response::TOO_SLOW).await;
                    BytesMut::from(&out[..])
                }
            };
            if !out.is_empty() && tx.send(Ok(Frame::data(out.freeze()))).await.is_err() {
                return;
            }
            if self.ended {
                if let Some(t) = trailers {
                    let _ = tx.send(Ok(t)).await;
                }
                return;
            }
        }
    }

    /// The next frame, waiting no longer than the hold bound while a call is held.
    async fn next(&mut self, body: &mut UpstreamBody) -> Next {
        let frame = match self.held_since {
            Some(since) => {
                let left = super::limits::limits()
                    .hold_timeout
                    .saturating_sub(since.elapsed());
                match tokio::time::timeout(left, body.frame()).await {
                    Ok(f) => f,
                    Err(_) => return Next::TimedOut,
                }
            }
            None => body.frame().await,
        };
        match frame {
            None => Next::End,
            Some(Err(e)) => Next::Broken(e),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => Next::Data(data),
                Err(frame) => Next::Trailers(frame),
            },
        }
    }

    /// The events `data` completed, decided; what to send for them.
    async fn chunk(&mut self, data: &[u8]) -> BytesMut {
        self.ans.trace_body(data);
        let events = self.reader.push(data);
        let mut out = self.events(events).await;
        let held = self.reader.pending() + self.props.as_ref().map_or(0, Proposals::held_bytes);
        if !self.ended && held as u64 > self.ans.policy.max_body_bytes() {
            out.extend_from_slice(&self.refuse(Reason::BodyTooLarge, response::TOO_LARGE).await);
        } else if !self.ended {
            // What is held (a partial event, a tool call's arguments and the parsed JSON of its events) counts in
            // the agent's share of the buffer budget for as long as it is held.
            let held = (held as u64).saturating_add(self.held_tree);
            self.held.shrink_to(held);
            if self.held.grow_to(held).is_err() {
                out.extend_from_slice(
                    &self
                        .refuse(Reason::BufferLimit, response::OVER_BUDGET)
                        .await,
                );
            }
        }
        out
    }

    /// The end of the upstream's stream: what is still buffered or held, decided and sent.
    async fn end(&mut self) -> BytesMut {
        let events = self.reader.finish();
        let mut out = self.events(events).await;
        if self.ended {
            return out;
        }
        if let Some(props) = self.props.as_mut() {
            let Ok(calls) = props.finish() else {
                out.extend_from_slice(&self.unreadable().await);
                self.ended = true;
                return out;
            };
            let rulings = self.rule(&calls, &mut out).await;
            if let Some(props) = self.props.as_mut() {
                emit(props.release(&rulings), &mut out);
            }
        }
        self.ended = true;
        out
    }

    async fn events(&mut self, events: Vec<SseEvent>) -> BytesMut {
        let mut out = BytesMut::new();
        for e in events {
            if self.ended {
                break;
            }
            if e.unknown_field && self.props.is_some() {
                // Not an event a provider sends: the body may be read as something else (JSON labelled as events).
                out.extend_from_slice(&self.unreadable().await);
                break;
            }
            // The JSON the event's data is parsed into (by the response rules, the proposal reader) is reserved
            // before the parse; beyond the budget the stream ends, the event unsent.
            let tree = e
                .data
                .as_deref()
                .map_or(0, |d| json_tree_bound(d.as_bytes()));
            let before = self.held.held();
            if self.held.grow(tree).is_err() {
                out.extend_from_slice(
                    &self
                        .refuse(Reason::BufferLimit, response::OVER_BUDGET)
                        .await,
                );
                break;
            }
            let Some(event) = self.respond(e, &mut out).await else {
                self.held.shrink_to(before);
                continue;
            };
            match self.props.as_mut() {
                Some(props) => {
                    let Ok(calls) = props.push(event) else {
                        out.extend_from_slice(&self.unreadable().await);
                        break;
                    };
                    let rulings = self.rule(&calls, &mut out).await;
                    if let Some(props) = self.props.as_mut() {
                        emit(props.release(&rulings), &mut out);
                        self.held_since = match props.held_bytes() {
                            0 => None,
                            _ => self.held_since.or_else(|| Some(Instant::now())),
                        };
                    }
                }
                None => out.extend_from_slice(&event.raw),
            }
            self.keep_tree(before, tree);
        }
        out
    }

    /// After an event whose parsed JSON (`tree` bytes) was reserved on top of `before`: while the proposal reader
    /// holds a call, the trees of the events since it began holding stay reserved (a held event keeps its parsed
    /// JSON, and the call's arguments are parsed once complete, a tree bounded by the structure of the events that
    /// carried them); once it holds none, they are given back.
    fn keep_tree(&mut self, before: u64, tree: u64) {
        let holding = self.props.as_ref().is_some_and(|p| p.held_bytes() > 0);
        if holding {
            self.held_tree = self.held_tree.saturating_add(tree);
        } else {
            self.held.shrink_to(before.saturating_sub(self.held_tree));
            self.held_tree = 0;
        }
    }

    /// The rulings on `calls`. What `out` holds of the events before them is sent first: only the calls wait for
    /// their decision (a review holds them, with keep-alives meanwhile: `hold::proposal`).
    async fn rule(&mut self, calls: &[Call], out: &mut BytesMut) -> Vec<Ruling> {
        if calls.is_empty() {
            return Vec::new();
        }
        if !out.is_empty() {
            // A client gone shows when the held call's keep-alive or release is sent.
            let _ = self.tx.send(Ok(Frame::data(out.split().freeze()))).await;
        }
        let rulings = super::proposal::rule(&self.ans, calls, &Holding::Events(&self.tx)).await;
        // Time spent waiting for a person is not the upstream's: a call still streaming behind the ruled ones gets
        // the whole hold bound from here.
        self.held_since = self.held_since.map(|_| Instant::now());
        rulings
    }

    /// One event through the response rules: as it came, rewritten, or answered by a block (written to `out`).
    async fn respond(&mut self, e: SseEvent, out: &mut BytesMut) -> Option<Event> {
        let has_data = e.data.is_some();
        let mut event = Event {
            name: e.event,
            data: e.data.unwrap_or_default(),
            raw: e.raw,
        };
        let Some(action) = self.response.as_mut().filter(|_| has_data) else {
            return Some(event);
        };
        let json = (inspect::claims_json(None, &event.data)
            && response::needs_json(&self.ans.policy, &event.data))
        .then(|| serde_json::from_str::<Value>(&event.data).ok())
        .flatten();
        // Each event is decided as the request's own response Action would be: its session as of now.
        action.session.clone_from(&self.ans.request.session);
        if let Some(r) = action.response.as_mut() {
            r.body_size = event.data.len() as u64;
            r.body = std::mem::take(&mut event.data);
            r.json = json;
        }
        let fate = response::decide(&self.ans, action, false).await;
        let json = match action.response.as_mut() {
            Some(r) => {
                event.data = std::mem::take(&mut r.body);
                r.json.take()
            }
            None => None,
        };
        match fate {
            Fate::Pass => Some(event),
            Fate::Rewrite(data) => {
                event.raw = sse::encode(event.name.as_deref(), &data);
                event.data = data;
                Some(event)
            }
            Fate::Block(decision) => {
                match inspect::stream_block(&self.ans.protocol, &decision, json.as_ref()) {
                    StreamBlock::Replace(data) => {
                        event.raw = sse::encode(event.name.as_deref(), &data);
                        event.data = data;
                        Some(event)
                    }
                    StreamBlock::Drop => None,
                    StreamBlock::End { event: name, data } => {
                        out.extend_from_slice(&sse::encode(name, &data));
                        self.ended = true;
                        None
                    }
                }
            }
        }
    }

    /// End the stream for an event the proposal reader cannot read (fail closed): what it held is dropped.
    async fn unreadable(&mut self) -> Bytes {
        let message = Unreadable.to_string();
        self.refuse_in(Phase::Proposal, Reason::Unparseable, &message)
            .await
    }

    /// End the stream for a bound the enforcer holds it to: recorded, and answered with the protocol's error event.
    async fn refuse(&mut self, reason: Reason, message: &str) -> Bytes {
        let phase = if self.held_since.is_some() {
            Phase::Proposal
        } else {
            Phase::Response
        };
        self.refuse_in(phase, reason, message).await
    }

    /// End the stream for the enforcer's own refusal, recorded in `phase`.
    async fn refuse_in(&mut self, phase: Phase, reason: Reason, message: &str) -> Bytes {
        self.ended = true;
        let decision = response::record_refusal(&self.ans, phase, reason, message, None).await;
        match inspect::stream_block(&self.ans.protocol, &decision, None) {
            StreamBlock::End { event, data } => sse::encode(event, &data),
            // MCP: the enforcer's own event (nothing to answer by id).
            _ => sse::encode(
                Some("error"),
                &serde_json::json!({"error": {"type": "enforcer_error", "reason": reason, "message": message}})
                    .to_string(),
            ),
        }
    }

    /// A content-coded stream, whole (within the bounds) and decoded, or the upstream's error when it broke off
    /// (a coded body cut where a coding's own frame ends still decodes); or the refusal to send instead.
    async fn decoded(
        &mut self,
        body: &mut UpstreamBody,
        coding: Option<&str>,
    ) -> Result<Whole, Bytes> {
        let limit = self.ans.policy.max_body_bytes();
        let mut buf = Buffer::new(limit, 1, super::limits::budget().reserve(&self.ans.agent));
        let read = async {
            while let Some(frame) = body.frame().await {
                let frame = match frame {
                    Ok(frame) => frame,
                    Err(e) => return Ok(Err(e)),
                };
                if let Some(d) = frame.data_ref() {
                    buf.push(d).map_err(response::overflow)?;
                }
            }
            Ok(Ok(()))
        };
        match tokio::time::timeout(super::limits::limits().hold_timeout, read).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Ok(Whole::Broken(e)),
            Ok(Err((reason, message))) => return Err(self.refuse(reason, message).await),
            Err(_) => return Err(self.refuse(Reason::HoldTimeout, response::TOO_SLOW).await),
        }
        let (raw, held) = buf.finish();
        match inspect::decode_body(coding, raw, limit) {
            Ok(all) => {
                // The decoded stream is what the reading holds from now on.
                self.held = held;
                self.held.shrink_to(0);
                if self.held.grow(all.len() as u64).is_err() {
                    return Err(self
                        .refuse(Reason::BufferLimit, response::OVER_BUDGET)
                        .await);
                }
                Ok(Whole::All(all))
            }
            Err(_) => Err(self.refuse(Reason::Unparseable, UNDECODABLE).await),
        }
    }
}

/// A content-coded stream read whole.
enum Whole {
    /// Decoded.
    All(Bytes),
    /// The upstream's body broke off with this error.
    Broken(HttpError),
}

fn emit(emits: Vec<Emit>, out: &mut BytesMut) {
    for e in emits {
        match e {
            Emit::Raw(b) => out.extend_from_slice(&b),
            Emit::New { name, data } => out.extend_from_slice(&sse::encode(name.as_deref(), &data)),
        }
    }
}
