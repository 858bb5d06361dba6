//! A trace being gathered: started when an exchange's decision retains it ([`retain`]), linked to the exchange's
//! record once that is written, fed the response as it streams to the agent ([`Tee`], which passes every frame on
//! unchanged and unbuffered), and finished — encrypted, written, recorded — when the response ends, or at once when
//! the exchange was refused. A proposal's trace ([`Draft::new`]) is fed the response as the upstream sent it,
//! before any rewrite, and is written only when a retained proposal names its record ([`Draft::retain`]).
//!
//! What a draft keeps counts in its agent's share of the proxy's buffer budget (`proxy::budget`), reserved before it
//! is copied and given back once the trace is written or dropped: the request's body, the response's as it grows,
//! their text and the plaintext and encrypted file while the trace is written. A copy the budget cannot hold is not
//! kept, and the exchange goes on: the request's body is left out, the response's cut where it stopped fitting, the
//! trace says so (`over_budget`) and so does its record (`outcome.error: buffer_limit`). A trace is forensics of an
//! exchange already decided and recorded: refusing the exchange for want of room for its copy would let the traces
//! decide what passes, and keeping the copy uncounted would let them grow the daemon past the budget.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::{Trace, TraceStore, TracedRequest, TracedResponse};
use crate::model::{
    Agent, AuditEvent, Decision, Disposition, Mode, Outcome, Reason, RequestSummary, TraceNote,
    Verdict,
};
use crate::policy::Policy;
use crate::proxy::{ProxyContext, Reservation};

/// Header fields a trace never keeps (credentials): any name containing one of these.
const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "cookie",
    "key",
    "token",
    "secret",
    "password",
];

fn kept_headers(headers: &http::HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .filter(|(k, _)| !SECRET_HEADERS.iter().any(|s| k.as_str().contains(s)))
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// A response's status, the header fields a trace keeps, and its `Content-Encoding`.
type ResponseHead = (u16, Vec<(String, String)>, Option<String>);

/// A trace being gathered for one exchange.
pub struct Draft {
    ctx: Arc<ProxyContext>,
    store: Arc<TraceStore>,
    policy: Arc<Policy>,
    decision: Decision,
    agent: Agent,
    request: TracedRequest,
    /// The exchange's record: its seq, what it says of the request, and what became of it.
    record: Option<(u64, RequestSummary, Disposition)>,
    /// The response head: status, header fields kept, content-coding.
    response: Option<ResponseHead>,
    body: Vec<u8>,
    truncated: bool,
    /// The budget could not hold more of the response's body: nothing more is kept.
    over_budget: bool,
    /// What the draft holds in its agent's share of the buffer budget (`None` only once it is handed on).
    held: Option<Reservation>,
    done: bool,
}

impl Draft {
    /// Whether an exchange decided as `decision` is traced: its policy retains it (and the sample says so).
    pub fn sampled(decision: &Decision) -> bool {
        decision.retain.is_some_and(TraceStore::sample)
    }

    /// A draft of the exchange decided as `decision`, when a trace store is configured: the exchange's own trace (when
    /// [`Draft::sampled`]), or one kept aside in case one of its proposals is retained — written only once
    /// [`Draft::retain`] names the proposal's record (else dropped unwritten), with `decision` the request's until then.
    #[allow(
        clippy::too_many_arguments,
        reason = "the facts of one exchange, each needed once"
    )]
    pub fn new(
        ctx: &Arc<ProxyContext>,
        policy: &Arc<Policy>,
        decision: &Decision,
        agent: &Agent,
        scheme: &str,
        host: &str,
        parts: &http::request::Parts,
        body: &[u8],
    ) -> Option<Draft> {
        let store = ctx.traces.clone()?;
        let mut held = crate::proxy::buffer_budget().reserve(agent);
        // The request's body, as text, is kept only if the budget holds it.
        let text = String::from_utf8_lossy(body);
        let over_budget = held.grow(text.len() as u64).is_err();
        let body = if over_budget {
            String::new()
        } else {
            text.into_owned()
        };
        Some(Draft {
            ctx: ctx.clone(),
            store,
            policy: policy.clone(),
            decision: decision.clone(),
            agent: agent.clone(),
            request: TracedRequest {
                method: parts.method.as_str().to_owned(),
                scheme: scheme.to_owned(),
                host: host.to_owned(),
                target: parts
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_owned(),
                headers: kept_headers(&parts.headers),
                body,
                over_budget,
            },
            record: None,
            response: None,
            body: Vec::new(),
            truncated: false,
            over_budget: false,
            held: Some(held),
            done: false,
        })
    }

    /// Keep this candidate as the trace of the proposal recorded as `seq` (`summary`, ending in `disposition`) and
    /// decided as `decision`, when that decision retains it and the sample says so; the first such proposal of the
    /// exchange wins. Whether it is kept for this one.
    pub fn retain(
        &mut self,
        seq: u64,
        summary: RequestSummary,
        disposition: Disposition,
        decision: &Decision,
    ) -> bool {
        if self.record.is_some() {
            return false;
        }
        match decision.retain {
            Some(f) if TraceStore::sample(f) => {}
            _ => return false,
        }
        self.decision = decision.clone();
        self.record = Some((seq, summary, disposition));
        true
    }

    /// The exchange's record is written: `seq`, with `summary`, ending in `disposition`.
    pub fn linked(&mut self, seq: u64, summary: RequestSummary, disposition: Disposition) {
        self.record = Some((seq, summary, disposition));
    }

    /// The response head the agent gets.
    pub fn response_head(&mut self, status: u16, headers: &http::HeaderMap) {
        let coding = crate::inspect::content_coding(headers);
        self.response = Some((status, kept_headers(headers), coding));
    }

    /// More of the response body, kept up to `traces.max_trace_bytes` and while the buffer budget holds it (the
    /// rest is cut, and the trace says so). The room is reserved before it is allocated: doubling, as a `Vec`
    /// grows, never past `max_trace_bytes`.
    pub fn push(&mut self, data: &[u8]) {
        if self.over_budget {
            return;
        }
        let max = self.store.max_trace_bytes();
        let room = max.saturating_sub(self.body.len());
        if data.len() > room {
            self.truncated = true;
        }
        let take = &data[..data.len().min(room)];
        if take.is_empty() {
            return;
        }
        let needed = self.body.len() + take.len();
        let cap = self.body.capacity();
        if needed > cap {
            let doubled = cap.saturating_mul(2).max(1024).min(max).max(needed);
            let Some(held) = self.held.as_mut() else {
                return;
            };
            let target = [doubled, needed]
                .into_iter()
                .find(|&t| held.grow((t - cap) as u64).is_ok());
            let Some(target) = target else {
                self.over_budget = true;
                self.truncated = true;
                return;
            };
            self.body.reserve_exact(target - self.body.len());
        }
        self.body.extend_from_slice(take);
    }

    /// Encrypt, write and record the trace (in the background); a trace whose exchange was never recorded is
    /// dropped.
    pub fn finish(mut self) {
        self.done = true;
        let Some((of, summary, disposition)) = self.record.take() else {
            return;
        };
        let Some(mut held) = self.held.take() else {
            return;
        };
        let response = self.response.take().map(|(status, headers, coding)| {
            let raw = Bytes::from(std::mem::take(&mut self.body));
            let body = self.decoded(&mut held, coding.as_deref(), raw);
            // Its text, when the budget holds that copy too.
            let text = String::from_utf8_lossy(&body);
            let body = if held.grow(text.len() as u64).is_ok() {
                text.into_owned()
            } else {
                self.over_budget = true;
                self.truncated = true;
                String::new()
            };
            TracedResponse {
                status,
                headers,
                body,
                truncated: self.truncated,
                over_budget: self.over_budget,
            }
        });
        let mut trace = Trace {
            version: 1,
            of,
            ts: crate::audit::record::rfc3339(SystemTime::now()),
            agent: self.agent.clone(),
            decision: serde_json::to_value(&self.decision).unwrap_or_default(),
            request: std::mem::replace(&mut self.request, empty_request()),
            response,
        };
        // The response's bytes are gone (only its text is kept); writing holds the plaintext and the encrypted file
        // besides. A trace the budget cannot write with its bodies is written without them.
        let kept = trace.request.body.len() + trace.response.as_ref().map_or(0, |r| r.body.len());
        held.shrink_to(kept as u64);
        if held.grow(TraceStore::write_bound(&trace)).is_err() {
            leave_out_bodies(&mut trace);
            held.shrink_to(0);
            // What is left is the heads, within the proxy's head limits: written all the same.
            let _ = held.grow(TraceStore::write_bound(&trace));
        }
        let over_budget =
            trace.request.over_budget || trace.response.as_ref().is_some_and(|r| r.over_budget);
        let status = trace.response.as_ref().map(|r| r.status);
        let (ctx, store, policy) = (self.ctx.clone(), self.store.clone(), self.policy.clone());
        let (decision, agent) = (self.decision.clone(), self.agent.clone());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let written = tokio::task::spawn_blocking(move || store.write(&trace)).await;
            // Written (or not): the trace's bytes are let go.
            drop(held);
            let note = match written {
                Ok(Ok(note)) => note,
                Ok(Err(e)) => return tracing::error!(error = %e, "trace not written"),
                Err(_) => return,
            };
            let outcome = Outcome {
                disposition: Disposition::Retained,
                status,
                // A trace that lost a body to the budget says so in the trail, for a reader without the key.
                error: over_budget.then_some(Reason::BufferLimit),
            };
            let mut event = AuditEvent::new(decision, agent, summary, outcome);
            event.trace = Some(note.clone());
            if let Err(e) = ctx.record(&policy, event).await {
                // A trace the trail does not name would look inserted: it goes.
                tracing::error!(error = %e, "audit write failed for a trace: trace removed");
                if let Some(store) = ctx.traces.as_ref() {
                    store.delete(&note);
                }
            }
            tracing::debug!(of, ?disposition, "trace retained");
        });
    }
}

impl Draft {
    /// The response's kept bytes with their content-coding undone, the decoded copy reserved first (up to
    /// `max_trace_bytes` per coding); as kept when they cannot be decoded, or the budget cannot hold the decoding
    /// (then the trace says so).
    fn decoded(&mut self, held: &mut Reservation, coding: Option<&str>, raw: Bytes) -> Bytes {
        let Some(coding) = coding else {
            return raw;
        };
        let limit = self.store.settings.max_trace_bytes;
        let before = held.held();
        let layers = coding.split(',').count() as u64;
        if held.grow(limit.saturating_mul(layers)).is_err() {
            self.over_budget = true;
            return raw;
        }
        let body = crate::inspect::decode_body(Some(coding), raw.clone(), limit).unwrap_or(raw);
        held.shrink_to(before.saturating_add(body.len() as u64));
        body
    }
}

/// A trace's request and response without their bodies, each marked as left out for the budget.
fn leave_out_bodies(trace: &mut Trace) {
    trace.request.body = String::new();
    trace.request.over_budget = true;
    if let Some(r) = trace.response.as_mut() {
        r.body = String::new();
        r.over_budget = true;
        r.truncated = true;
    }
}

/// A placeholder for a request already handed on.
fn empty_request() -> TracedRequest {
    TracedRequest {
        method: String::new(),
        scheme: String::new(),
        host: String::new(),
        target: String::new(),
        headers: Vec::new(),
        body: String::new(),
        over_budget: false,
    }
}

impl Drop for Draft {
    /// A draft dropped before its response ended (the agent went away mid-stream) keeps what it saw, marked cut.
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let cut = self.truncated || self.response.is_some();
        let draft = Draft {
            ctx: self.ctx.clone(),
            store: self.store.clone(),
            policy: self.policy.clone(),
            decision: self.decision.clone(),
            agent: std::mem::take(&mut self.agent),
            request: std::mem::replace(&mut self.request, empty_request()),
            record: self.record.take(),
            response: self.response.take(),
            body: std::mem::take(&mut self.body),
            truncated: cut,
            over_budget: self.over_budget,
            held: self.held.take(),
            done: false,
        };
        self.done = true;
        draft.finish();
    }
}

/// The agent's answer `resp`, with its body copied into `draft` as it streams (passed on unchanged).
pub fn attach(
    resp: http::Response<crate::proxy::ProxyBody>,
    draft: Option<Box<Draft>>,
) -> http::Response<crate::proxy::ProxyBody> {
    use http_body_util::BodyExt;
    let Some(mut draft) = draft else {
        return resp;
    };
    draft.response_head(resp.status().as_u16(), resp.headers());
    resp.map(|b| Tee::new(b, *draft).boxed())
}

/// A response body passed on frame by frame, copied into the trace as it goes.
pub struct Tee<B> {
    inner: B,
    draft: Option<Draft>,
}

impl<B> Tee<B> {
    pub fn new(inner: B, draft: Draft) -> Tee<B> {
        Tee {
            inner,
            draft: Some(draft),
        }
    }
}

impl<B> Body for Tee<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(d)) = (frame.data_ref(), this.draft.as_mut()) {
                    d.push(data);
                }
            }
            Poll::Ready(None) => {
                if let Some(d) = this.draft.take() {
                    d.finish();
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut d) = this.draft.take() {
                    d.truncated = true;
                    d.finish();
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Record that a trace is deleted by the retention limits; whether the record was written.
pub(super) async fn record_deletion(ctx: &ProxyContext, note: &TraceNote) -> bool {
    let policy = ctx.policy.current();
    let decision = Decision::bare(
        Verdict::Log,
        Reason::Retention,
        Mode::Enforce,
        policy.hash().to_owned(),
    );
    let outcome = Outcome {
        disposition: Disposition::Deleted,
        status: None,
        error: None,
    };
    let mut event = AuditEvent::new(
        decision,
        Agent::default(),
        RequestSummary::default(),
        outcome,
    );
    event.trace = Some(note.clone());
    match ctx.record(&policy, event).await {
        Ok(_) => true,
        Err(e) => {
            tracing::error!(error = %e, "audit write failed: trace not deleted");
            false
        }
    }
}
