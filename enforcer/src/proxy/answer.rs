//! The response phases: what the agent receives of the upstream's answer, after the request's record. Connection-
//! scoped fields are removed and the body streams through frame by frame (server-sent events are never buffered).
//! An upgrade the upstream accepted (`101`) is relayed: a WebSocket message by message, each decided (`websocket`),
//! an upgrade a rule lets through unread (`relay: opaque`) byte for byte.
//!
//! When the policy has `phase: proposal` or `phase: response` rules, the exchange is answered with an
//! [`Answering`] and the response is read where a rule may decide it (`response::plan`): a stream of server-sent
//! events event by event (`events`), any other body whole (`response::whole`); proposed tool calls are decided in
//! `proposal`, data in `response`. Each decides under the exchange's policy snapshot and leaves a record linked to
//! the request's ([`Answering::record`]). Without such rules, or when none may apply, the body streams through as
//! it came: nothing is buffered or parsed.

use std::sync::{Arc, Mutex, PoisonError};

use super::upstream::UpstreamBody;
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::forward::strip_hop_by_hop;
use super::http::ProxyBody;
use super::{events, response, websocket, ProxyContext};
use crate::inspect::Protocol;
use crate::model::{
    Action, Agent, AuditEvent, Change, Decision, LlmCall, Outcome, Phase, Relay, RequestSummary,
};
use crate::policy::Policy;
use crate::trace::Draft;
use sha2::Digest;

/// What the response phases need of the exchange they answer.
pub(crate) struct Answering {
    pub ctx: Arc<ProxyContext>,
    /// The policy the exchange was decided under.
    pub policy: Arc<Policy>,
    pub agent: Agent,
    pub protocol: Protocol,
    /// The request's deciding Action without its body: the transport and head every later Action carries.
    pub request: Action,
    /// The request record's summary (scheme, host, address, method, path): what later records name.
    pub summary: RequestSummary,
    /// The `seq` of the request's record.
    pub parent: u64,
    /// How an accepted upgrade is relayed (the deciding rule's `relay:`).
    pub relay: Relay,
    /// The exchange kept aside for a retained proposal (`trace::Draft::new`): fed the response as the
    /// upstream sent it, written when a proposal's decision retains it.
    pub proposal_trace: Option<Mutex<Draft>>,
}

impl Answering {
    /// Decide Actions of what passes after the request (a proposal, a response, a WebSocket message) with the agent's
    /// session as it is now (`session.*` conditions), and note on the session what each decision leaves (labels,
    /// counters, the tool called): the same session step the request took (`exchange.rs`).
    pub fn decide_in_session(&self, actions: &mut [crate::model::Action]) -> crate::model::Decided {
        self.ctx.sessions.decide(&self.policy, &self.agent, actions)
    }

    /// The record's view of one later part of the exchange: the request's summary with the part's size and
    /// SHA-256 digest (hex, none for an empty part) and what a rewrite changed.
    pub fn part_summary(&self, part: &[u8], changes: Vec<Change>) -> RequestSummary {
        RequestSummary {
            body_size: part.len() as u64,
            body_sha256: (!part.is_empty()).then(|| hex::encode(sha2::Sha256::digest(part))),
            changes,
            ..self.summary.clone()
        }
    }

    /// The record's view of a later part the enforcer refused without reading it whole (an answer it could not read
    /// or hold, a stream it ended): the request's summary, naming the LLM call it answers (provider and model, as
    /// proposal records do).
    pub fn refusal_summary(&self) -> RequestSummary {
        let llm = self.request.llm.as_ref();
        RequestSummary {
            llm_provider: llm.map(|l| l.provider.clone()),
            llm_model: llm.and_then(|l| l.model.clone()),
            ..self.summary.clone()
        }
    }

    /// Record one later part of the exchange (`phase`), linked to the request's record; `request` holds what
    /// differs from the request's summary (body size and digest, protocol fields, changes). A failing write is
    /// logged and reported as `false`: the caller must not pass on what was not recorded.
    pub async fn record(
        &self,
        phase: Phase,
        decision: Decision,
        request: RequestSummary,
        outcome: Outcome,
    ) -> bool {
        self.record_seq(phase, decision, request, outcome)
            .await
            .is_some()
    }

    /// [`Answering::record`], giving the record's `seq` (`None` when the write failed).
    pub async fn record_seq(
        &self,
        phase: Phase,
        decision: Decision,
        request: RequestSummary,
        outcome: Outcome,
    ) -> Option<u64> {
        let event = AuditEvent::new(decision, self.agent.clone(), request, outcome);
        self.record_event(phase, event).await
    }

    /// `request` as the record of a later part (`phase`) names it: linked to the request's record.
    pub fn linked(&self, phase: Phase, request: RequestSummary) -> RequestSummary {
        RequestSummary {
            parent: Some(self.parent),
            phase: Some(phase),
            ..request
        }
    }

    /// The upstream's response head, for the proposal trace.
    pub fn trace_head(&self, status: u16, headers: &http::HeaderMap) {
        self.with_trace(|d| d.response_head(status, headers));
    }

    /// More of the upstream's body as it sent it (decoded), for the proposal trace.
    pub fn trace_body(&self, data: &[u8]) {
        self.with_trace(|d| d.push(data));
    }

    /// Keep the proposal trace for the proposal recorded as `seq`, when `decision` retains it.
    pub fn retain_for(
        &self,
        seq: u64,
        summary: RequestSummary,
        disposition: crate::model::Disposition,
        decision: &Decision,
    ) {
        self.with_trace(|d| {
            d.retain(seq, summary, disposition, decision);
        });
    }

    /// The response ended: the proposal trace is written if a proposal retained it, else dropped.
    pub fn finish_trace(&mut self) {
        if let Some(d) = self.proposal_trace.take() {
            d.into_inner()
                .unwrap_or_else(PoisonError::into_inner)
                .finish();
        }
    }

    fn with_trace(&self, f: impl FnOnce(&mut Draft)) {
        if let Some(d) = &self.proposal_trace {
            f(&mut d.lock().unwrap_or_else(PoisonError::into_inner));
        }
    }

    /// [`Answering::record`] of a whole `event` (one that also carries a review or a trace): its seq once durable,
    /// `None` when the write failed (logged).
    pub async fn record_event(&self, phase: Phase, mut event: AuditEvent) -> Option<u64> {
        event.request = self.linked(phase, event.request);
        match self.ctx.record(&self.policy, event).await {
            Ok(seq) => Some(seq),
            Err(e) => {
                tracing::error!(error = %e, phase = phase.as_str(), "audit write failed");
                None
            }
        }
    }

    /// The same exchange answering one LLM call made within it (a WebSocket message such as a Responses
    /// `response.create`, recorded as `parent`): what is decided after it carries that call's `llm` (provider,
    /// model, tools) and its records are linked to the call's record.
    /// The turn keeps no proposal trace (the WebSocket mode's messages are not retained).
    pub fn for_turn(&self, llm: LlmCall, parent: u64) -> Answering {
        let mut request = self.request.clone();
        request.llm = Some(llm);
        Answering {
            ctx: self.ctx.clone(),
            policy: self.policy.clone(),
            agent: self.agent.clone(),
            protocol: self.protocol.clone(),
            request,
            summary: self.summary.clone(),
            parent,
            relay: self.relay,
            proposal_trace: None,
        }
    }
}

/// What one line of batch results answers (`response::rule_lines`): the LLM call whose answer the line carries and the
/// line's `custom_id`, which the decisions on its calls carry and their records name.
#[derive(Debug, Clone, Default)]
pub(crate) struct Batched {
    pub llm: Option<LlmCall>,
    pub custom_id: Option<String>,
}

impl Answering {
    /// Decide and record what follows as answering `line` (batch results' line), until the next call: the request's
    /// `llm` and its records' `custom_id` become the line's. Gives back what they were, to restore once the line is
    /// decided. The exchange (parent record, proposal trace) stays the same.
    pub fn answer_line(&mut self, line: Batched) -> Batched {
        Batched {
            llm: std::mem::replace(&mut self.request.llm, line.llm),
            custom_id: std::mem::replace(&mut self.summary.custom_id, line.custom_id),
        }
    }
}

/// Whether responses of exchanges under `policy` are read at all (it has proposal or response rules).
pub(crate) fn reads_responses(policy: &Policy) -> bool {
    policy.has_rules_for(Phase::Proposal) || policy.has_rules_for(Phase::Response)
}

/// Whether the response phases may read the answer to `action` (the deciding Action of a request classified as
/// `protocol`) under `policy`: it has response rules, or proposal rules and the answer is one `response::plan` reads
/// for proposed calls (an LLM call's, a retrieval's, batch results). Otherwise the answer streams through untouched,
/// and nothing of the exchange is kept for the response phases.
pub(crate) fn reads_answer(policy: &Policy, protocol: &Protocol, action: Option<&Action>) -> bool {
    policy.has_rules_for(Phase::Response)
        || (policy.has_rules_for(Phase::Proposal)
            && action.is_some_and(|a| {
                crate::inspect::answered_api(protocol, a).is_some()
                    || crate::inspect::answered_batch(protocol, a).is_some()
            }))
}

/// The agent's answer from the upstream's `resp` when no response phase sees the exchange: passed on as it comes,
/// without its connection-specific fields.
pub(crate) fn pass_on(mut resp: Response<UpstreamBody>) -> Response<ProxyBody> {
    strip_hop_by_hop(resp.headers_mut(), false);
    resp.map(|b| b.boxed())
}

/// The agent's answer from the upstream's `resp` through the response phases. `answering` is what they need
/// (present for an upgrade and when the policy reads responses); `client` is the client side of an `Upgrade`
/// request.
pub(crate) async fn respond(
    mut resp: Response<UpstreamBody>,
    answering: Answering,
    client: Option<OnUpgrade>,
) -> Response<ProxyBody> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client) = client {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(relay_upgraded(client, upstream, answering));
            return resp.map(|b| b.boxed());
        }
    }
    strip_hop_by_hop(resp.headers_mut(), false);
    if !reads_responses(&answering.policy) {
        return resp.map(|b| b.boxed());
    }
    let head = response::Head::of(resp.status().as_u16(), resp.headers());
    match response::plan(&answering, &head, resp.headers()) {
        None => resp.map(|b| b.boxed()),
        Some(plan) if plan.events => events::stream(resp, answering, plan),
        Some(plan) => response::whole(resp, answering, plan).await,
    }
}

async fn relay_upgraded(client: OnUpgrade, upstream: OnUpgrade, answering: Answering) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    let websocket = answering.request.http.as_ref().is_some_and(|h| {
        h.upgrade
            .as_deref()
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
    });
    if websocket && answering.relay == Relay::Inspect {
        websocket::relay(client, upstream, answering).await;
        return;
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded relay ended with an error");
    }
}
