//! The exchange's one audit record. It is opened before anything can fail, filled as the phases learn facts (the
//! host, the body's size and digest, the protocol, the policy's decision, what a rewrite changed), and written
//! exactly once: when the request is about to be forwarded ([`ExchangeRecord::forwarded`]), when the enforcer
//! answers instead ([`ExchangeRecord::refuse`], the one place a [`Refusal`] becomes an answer and an outcome), or,
//! if the exchange is abandoned before either (the client went away), when it is dropped. An exchange held for
//! review also has a held record before it ([`ExchangeRecord::held`]); its closing record says how the review
//! ended and links to the held one (`review.held_seq`).
//!
//! The record keeps two facts apart: the decision (the policy's — verdict, deciding and matching rules — or, when the
//! enforcer refused before the policy could decide or on facts the decision rested on, the enforcer's own) and the
//! outcome (forwarded, refused, or failed upstream, with the reason and the status the agent got). Host, path and
//! detectors are scrubbed under the same policy snapshot the exchange was decided under.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use sha2::Digest;

use super::answer::Answering;
use super::http::ProxyBody;
use super::refusal::{into_response, shaped_response, Refusal};
use super::{enforcer_decision, ProxyContext};
use crate::audit::Appended;
use crate::inspect::{self, Protocol};
use crate::model::{
    Action, Agent, AuditEvent, Decided, Decision, Disposition, Mode, Outcome, Reason, Relay,
    RequestSummary, ReviewNote, ReviewSpec, Shared, Verdict,
};
use crate::policy::Policy;

/// What is known about one exchange so far, and its record.
pub(crate) struct ExchangeRecord {
    ctx: Arc<ProxyContext>,
    /// The policy this exchange is decided, scrubbed and recorded under (a reload does not change it mid-way).
    policy: Arc<Policy>,
    agent: Agent,
    summary: RequestSummary,
    /// The request's head as recorded (scheme, host, address, method, path, upgrade): what the records of the
    /// exchange's later parts name.
    head: RequestSummary,
    /// What the request speaks, once classified (`Http` until then): the shape of a policy block's answer.
    protocol: Protocol,
    decided: Option<Decided>,
    /// How a review of this exchange ended (or, while held, its held record's link).
    review: Option<ReviewNote>,
    /// The seq of the closing record, once written.
    seq: Option<u64>,
    /// The exchange's trace, when its decision retains it: linked to the closing record once written. Boxed, as
    /// the other: most exchanges have none, and a record is held for as long as its exchange runs.
    trace: Option<Box<crate::trace::Draft>>,
    /// The exchange kept aside for a proposal a `retain:` rule may keep (the policy has such rules).
    proposal_trace: Option<Box<crate::trace::Draft>>,
    written: bool,
}

impl ExchangeRecord {
    /// Open the record of a request as it arrived (method and path as sent), under the policy in force now.
    pub fn open(ctx: Arc<ProxyContext>, agent: &Agent, summary: RequestSummary) -> Self {
        ExchangeRecord {
            policy: ctx.policy.current(),
            ctx,
            agent: agent.clone(),
            head: summary.clone(),
            summary,
            protocol: Protocol::Http,
            decided: None,
            review: None,
            seq: None,
            trace: None,
            proposal_trace: None,
            written: false,
        }
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    pub fn ctx(&self) -> &ProxyContext {
        &self.ctx
    }

    pub fn agent(&self) -> &Agent {
        &self.agent
    }

    /// The request as recorded so far.
    pub fn summary(&self) -> &RequestSummary {
        &self.summary
    }

    /// Start the exchange's trace when its decision retains it (`retain:`) and traces are configured; and keep the
    /// exchange aside for its proposals when a proposal rule retains what it matches.
    pub fn start_trace(&mut self, scheme: &str, parts: &http::request::Parts, body: &[u8]) {
        let Some(decision) = self.decided.as_ref().map(|d| &d.decision) else {
            return;
        };
        let host = self.summary.host.clone().unwrap_or_default();
        let (ctx, policy, agent) = (&self.ctx, &self.policy, &self.agent);
        let draft = || {
            crate::trace::Draft::new(ctx, policy, decision, agent, scheme, &host, parts, body)
                .map(Box::new)
        };
        if crate::trace::Draft::sampled(decision) {
            self.trace = draft();
        }
        if policy.retains_in(crate::model::Phase::Proposal) {
            self.proposal_trace = draft();
        }
    }

    /// The trace of a forwarded exchange, to be fed its response.
    pub fn take_trace(&mut self) -> Option<Box<crate::trace::Draft>> {
        self.trace.take()
    }

    /// Write the held record of an exchange a review holds (outcome `held`, the review's terms); its seq is the
    /// review's id. Nothing may be held unrecorded: a failure is a refusal.
    pub async fn held(&mut self, spec: ReviewSpec) -> Result<u64, Refusal> {
        let decision = self.decision().cloned().ok_or_else(|| {
            Refusal::new(
                Reason::BadRequest,
                StatusCode::BAD_REQUEST,
                "the request was not decided",
            )
        })?;
        let mut event = AuditEvent::new(
            decision,
            self.agent.clone(),
            self.summary.clone(),
            Outcome {
                disposition: Disposition::Held,
                status: None,
                error: None,
            },
        );
        event.review = Some(ReviewNote {
            timeout_secs: Some(spec.timeout_secs),
            fallback: Some(spec.fallback),
            ..ReviewNote::default()
        });
        let seq = self.ctx.record(&self.policy, event).await.map_err(|e| {
            tracing::error!(error = %e, "audit write failed for a held exchange");
            Refusal::new(
                Reason::AuditUnavailable,
                StatusCode::SERVICE_UNAVAILABLE,
                "the enforcer could not record the request, so it was not held for review",
            )
        })?;
        self.review = Some(ReviewNote {
            held_seq: Some(seq),
            ..ReviewNote::default()
        });
        Ok(seq)
    }

    /// How the review of this exchange ended: carried by its closing record.
    pub fn note_review(&mut self, note: ReviewNote) {
        self.review = Some(note);
    }

    /// What the request head names: the host as the policy sees it, and the upgrade it asks for.
    pub fn note_head(&mut self, head: &super::head::Head) {
        self.summary.host = Some(head.host.clone());
        self.summary.upgrade.clone_from(&head.upgrade);
        self.head = self.summary.clone();
    }

    /// The body as received from the agent: its size and SHA-256.
    pub fn note_body(&mut self, raw: &Bytes) {
        self.summary.body_size = raw.len() as u64;
        if !raw.is_empty() {
            self.summary.body_sha256 = Some(hex::encode(sha2::Sha256::digest(raw)));
        }
    }

    /// What a constrain (or the removal of an upgrade) changed: paths and causes, never values.
    pub fn note_changes(&mut self, changes: Vec<crate::model::Change>) {
        self.summary.changes.extend(changes);
    }

    /// A constrain whose rewrites changed nothing (say, a redaction whose detector fired only where redaction does
    /// not rewrite and nothing remains to remove): the request is forwarded as received, so the record says so —
    /// verdict `log`, reason `unchanged`, the deciding (constrain) rule kept — instead of a constrain that did not
    /// happen.
    pub fn note_unchanged(&mut self) {
        if let Some(decided) = self.decided.as_mut() {
            let d = &mut decided.decision;
            d.verdict = Verdict::Log;
            d.reason = Reason::Unchanged;
            d.rewrites.clear();
        }
    }

    /// The protocol and the policy's decision; the record names what the deciding Action asked for.
    pub fn note_decided(&mut self, protocol: Protocol, decided: Decided, actions: &[Action]) {
        if let Some(action) = actions.get(decided.index) {
            if let Some(mcp) = &action.mcp {
                self.summary.mcp_method = Some(mcp.method.clone());
                self.summary.mcp_tool = mcp.tool.clone();
            }
            if let Some(llm) = &action.llm {
                self.summary.llm_provider = Some(llm.provider.clone());
                self.summary.llm_model = llm.model.clone();
            }
        }
        self.protocol = protocol;
        self.decided = Some(decided);
    }

    /// The provider of an LLM call that could not be classified, known from its host and path
    /// (`inspect::claimed_llm_provider`).
    pub fn note_llm_provider(&mut self, provider: Option<inspect::Provider>) {
        if let Some(provider) = provider {
            self.summary.llm_provider = Some(provider.as_str().to_string());
        }
    }

    /// The protocol a request that could not be classified claims to speak: the shape of its refusal.
    pub fn note_protocol(&mut self, protocol: Protocol) {
        self.protocol = protocol;
    }

    /// The decision carried out (the most restrictive of the exchange's Actions).
    pub fn decision(&self) -> Option<&Decision> {
        self.decided.as_ref().map(|d| &d.decision)
    }

    /// Turn the decision into a block the enforcer carries out for the policy (a constrain that could not be
    /// applied): `reason` and `message` (policy words only) replace the decision's, and the deciding Action's own
    /// decision says the same, so a batch's answer names it.
    pub fn block_instead(&mut self, reason: Reason, message: Option<String>) -> Option<&Decision> {
        let decided = self.decided.as_mut()?;
        let d = &mut decided.decision;
        d.verdict = Verdict::Block;
        d.reason = reason;
        d.rewrites.clear();
        if message.is_some() {
            d.message = message;
        }
        if let Some(own) = decided.each.get_mut(decided.index) {
            own.clone_from(d);
        }
        Some(&decided.decision)
    }

    /// Whether the decision, as carried out, sends the request on (everything but an enforced block).
    pub fn will_forward(&self) -> bool {
        self.decision()
            .is_some_and(|d| !(d.mode == Mode::Enforce && d.verdict == Verdict::Block))
    }

    /// What the response phases of this exchange need, once its record is written as `seq`: `request` is the
    /// deciding Action (its body dropped).
    pub fn answering(&mut self, mut request: Action, seq: u64) -> Answering {
        if let Some(http) = request.http.as_mut() {
            http.body = Shared::default();
            http.json = None;
        }
        let relay = self
            .decision()
            .map_or(Relay::Inspect, |d| self.policy.relay(d));
        Answering {
            ctx: self.ctx.clone(),
            policy: self.policy.clone(),
            agent: self.agent.clone(),
            protocol: self.protocol.clone(),
            request,
            summary: self.head.clone(),
            parent: seq,
            relay,
            proposal_trace: self
                .proposal_trace
                .take()
                .map(|d| std::sync::Mutex::new(*d)),
        }
    }

    /// Append the record of a request about to be forwarded: once this returns the record survives the daemon being
    /// killed; the caller forwards and waits for [`Appended::durable`] before the agent sees the answer. On failure
    /// nothing may be forwarded: the refusal says so (and no second record is attempted).
    pub fn forwarded(&mut self) -> Result<Appended, Refusal> {
        let Some(decision) = self.decision().cloned() else {
            return Err(Refusal::new(
                Reason::BadRequest,
                StatusCode::BAD_REQUEST,
                "the request was not decided",
            ));
        };
        let outcome = Outcome {
            disposition: Disposition::Forwarded,
            status: None,
            error: None,
        };
        self.written = true;
        self.append(decision, outcome).map_err(|()| {
            audit_unavailable("the enforcer could not record the request, so it was not forwarded")
        })
    }

    /// Wait until the forwarded request's record is durable; until then the agent must not see the answer.
    pub async fn durable(appended: Appended) -> Result<u64, Refusal> {
        crate::metrics::global()
            .durable(appended)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "audit record not durable: withholding the answer");
                audit_unavailable("the enforcer could not make the request's record durable")
            })
    }

    /// Answer `refusal` and, unless the exchange is already recorded, record it: the one place a refusal becomes
    /// the client's answer (the protocol's own block for a policy block, else the enforcer's JSON error) and the
    /// record's outcome.
    pub async fn refuse(mut self, refusal: Refusal) -> Response<ProxyBody> {
        // A review that ended in a block (denied, or timed out to a block) is answered exactly like one.
        let review_block = self
            .review
            .as_ref()
            .is_some_and(|r| r.carried_out == Some(Verdict::Block));
        let policy_block = review_block
            || self
                .decision()
                .is_some_and(|d| d.mode == Mode::Enforce && d.verdict == Verdict::Block);
        let answer = match &self.decided {
            Some(decided) if review_block => {
                block_answer(&self.protocol, &as_review_block(decided, &refusal))
            }
            Some(decided) if policy_block => block_answer(&self.protocol, decided),
            _ => shaped_response(
                &self.protocol,
                refusal.status,
                refusal.reason,
                &refusal.message,
            ),
        };
        let answer = match refusal.retry_after {
            Some(after) => super::refusal::with_retry_after(answer, after),
            None => answer,
        };
        if self.written {
            return answer;
        }
        self.written = true;
        // A client that went away got no answer: no status (docs/audit.md), as when the exchange is dropped.
        let status = (refusal.reason != Reason::ClientClosed).then(|| answer.status().as_u16());
        let (decision, disposition, error) = match self.decided.take() {
            Some(d) if review_block => (d.decision, Disposition::Blocked, Some(refusal.reason)),
            Some(d) if policy_block => {
                let error = decision_error(d.decision.reason);
                (d.decision, Disposition::Blocked, error)
            }
            Some(d) if refusal.is_upstream() => (
                d.decision,
                disposition(refusal.reason),
                Some(refusal.reason),
            ),
            _ => (
                enforcer_decision(&self.policy, refusal.reason, &refusal.message),
                disposition(refusal.reason),
                Some(refusal.reason),
            ),
        };
        let outcome = Outcome {
            disposition,
            status,
            error,
        };
        let _ = self.write(decision, outcome).await;
        answer
    }

    async fn write(&mut self, decision: Decision, outcome: Outcome) -> Result<u64, ()> {
        let appended = self.append(decision, outcome)?;
        crate::metrics::global()
            .durable(appended)
            .await
            .map_err(|e| tracing::error!(error = %e, "audit record not durable"))
    }

    /// The record in the trail (not yet durable), linked to the exchange's trace.
    fn append(&mut self, decision: Decision, outcome: Outcome) -> Result<Appended, ()> {
        let disposition = outcome.disposition;
        let traced = self.trace.as_ref().map(|_| self.summary.clone());
        let mut event = AuditEvent::new(
            decision,
            self.agent.clone(),
            std::mem::take(&mut self.summary),
            outcome,
        );
        event.review = self.review.take();
        let appended = self
            .ctx
            .append(&self.policy, event)
            .map_err(|e| tracing::error!(error = %e, "audit write failed"))?;
        let seq = appended.seq();
        self.seq = Some(seq);
        if let (Some(draft), Some(summary)) = (self.trace.as_mut(), traced) {
            draft.linked(seq, summary, disposition);
        }
        // Refused: nothing more will come; the trace holds the request alone.
        if disposition != Disposition::Forwarded {
            if let Some(draft) = self.trace.take() {
                draft.finish();
            }
        }
        Ok(appended)
    }
}

impl Drop for ExchangeRecord {
    /// An exchange abandoned before it was forwarded or answered (the client reset the stream or closed the
    /// connection) is still recorded: not forwarded, reason `client_closed`.
    fn drop(&mut self) {
        if self.written {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let decision = match self.decided.take() {
            Some(d) => d.decision,
            None => enforcer_decision(
                &self.policy,
                Reason::ClientClosed,
                "the client went away before the exchange completed",
            ),
        };
        let outcome = Outcome {
            disposition: Disposition::Failed,
            status: None,
            error: Some(Reason::ClientClosed),
        };
        let mut event = AuditEvent::new(
            decision,
            std::mem::take(&mut self.agent),
            std::mem::take(&mut self.summary),
            outcome,
        );
        event.review = self.review.take();
        let (ctx, policy) = (self.ctx.clone(), self.policy.clone());
        runtime.spawn(async move {
            if let Err(e) = ctx.record(&policy, event).await {
                tracing::error!(error = %e, "audit write failed for an abandoned exchange");
            }
        });
    }
}

fn audit_unavailable(message: &'static str) -> Refusal {
    Refusal::new(
        Reason::AuditUnavailable,
        StatusCode::SERVICE_UNAVAILABLE,
        message,
    )
}

/// What became of an exchange the enforcer answered itself for `reason`: not sent because the upstream could not be
/// reached or the client left (failed), or refused (blocked).
fn disposition(reason: Reason) -> Disposition {
    match reason {
        Reason::UpstreamUnreachable | Reason::ClientClosed => Disposition::Failed,
        _ => Disposition::Blocked,
    }
}

/// A decision reason that is itself an error the outcome names (not a rule, the default or a rate limit).
fn decision_error(reason: Reason) -> Option<Reason> {
    match reason {
        Reason::Rule | Reason::Default | Reason::RateLimited => None,
        other => Some(other),
    }
}

/// The decisions a review refusal is answered with: each held element as a block carrying the refusal's message.
fn as_review_block(decided: &Decided, refusal: &Refusal) -> Decided {
    let block = |d: &Decision| {
        let mut d = d.clone();
        if d.verdict == Verdict::Review {
            d.verdict = Verdict::Block;
            d.message = Some(refusal.message.to_string());
        }
        d
    };
    Decided {
        decision: block(&decided.decision),
        index: decided.index,
        each: decided.each.iter().map(block).collect(),
    }
}

/// The protocol's own block answer: for a JSON-RPC batch, each element answered with its own decision.
fn block_answer(protocol: &Protocol, decided: &Decided) -> Response<ProxyBody> {
    into_response(inspect::block_batch_response(protocol, &decided.each))
}
