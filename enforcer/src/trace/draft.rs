//! A trace being gathered: started when an exchange's decision retains it ([`retain`]), linked to the exchange's
//! record once that is written, fed the response as it streams to the agent ([`Tee`], which passes every frame on
//! unchanged and unbuffered), and finished — encrypted, written, recorded — when the response ends, or at once when
//! the exchange was refused. A proposal's trace ([`Draft::new`]) is fed the response as the upstream sent it,
//! before any rewrite, and is written only when a retained proposal names its record ([`Draft::retain`]).

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
use crate::proxy::ProxyContext;

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
                body: String::from_utf8_lossy(body).into_owned(),
            },
            record: None,
            response: None,
            body: Vec::new(),
            truncated: false,
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

    /// More of the response body, kept up to `traces.max_trace_bytes` (the rest is cut, and the trace says so).
    pub fn push(&mut self, data: &[u8]) {
        let room = self.store.max_trace_bytes().saturating_sub(self.body.len());
        if data.len() > room {
            self.truncated = true;
        }
        self.body.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// Encrypt, write and record the trace (in the background); a trace whose exchange was never recorded is
    /// dropped.
    pub fn finish(mut self) {
        self.done = true;
        let Some((of, summary, disposition)) = self.record.take() else {
            return;
        };
        let response = self.response.take().map(|(status, headers, coding)| {
            let raw = Bytes::from(std::mem::take(&mut self.body));
            let limit = self.store.settings.max_trace_bytes;
            let body =
                crate::inspect::decode_body(coding.as_deref(), raw.clone(), limit).unwrap_or(raw);
            TracedResponse {
                status,
                headers,
                body: String::from_utf8_lossy(&body).into_owned(),
                truncated: self.truncated,
            }
        });
        let status = response.as_ref().map(|r| r.status);
        let trace = Trace {
            version: 1,
            of,
            ts: crate::audit::record::rfc3339(SystemTime::now()),
            agent: self.agent.clone(),
            decision: serde_json::to_value(&self.decision).unwrap_or_default(),
            request: self.request.clone(),
            response,
        };
        let (ctx, store, policy) = (self.ctx.clone(), self.store.clone(), self.policy.clone());
        let (decision, agent) = (self.decision.clone(), self.agent.clone());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let written = tokio::task::spawn_blocking(move || store.write(&trace)).await;
            let note = match written {
                Ok(Ok(note)) => note,
                Ok(Err(e)) => return tracing::error!(error = %e, "trace not written"),
                Err(_) => return,
            };
            let outcome = Outcome {
                disposition: Disposition::Retained,
                status,
                error: None,
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
            request: self.request.clone(),
            record: self.record.take(),
            response: self.response.take(),
            body: std::mem::take(&mut self.body),
            truncated: cut,
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
