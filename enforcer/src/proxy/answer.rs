//! The response phases: what the agent receives of the upstream's answer, after the request's record. Connection-
//! scoped fields are removed and the body streams through frame by frame (server-sent events are never buffered).
//! An upgrade the upstream accepted (`101`) is relayed: a WebSocket message by message, each decided (`websocket`),
//! an upgrade a rule lets through unread (`relay: opaque`) byte for byte. Response-side decisions on a response
//! body, a server-sent event or a proposed tool call are phases of their own, added here; each decides under the
//! exchange's policy snapshot and leaves a record linked to the request's ([`Answering::record`]).

use std::sync::Arc;

use http::{Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::forward::strip_hop_by_hop;
use super::http::ProxyBody;
use super::{websocket, ProxyContext};
use crate::inspect::Protocol;
use crate::model::{Action, Agent, AuditEvent, Decision, Outcome, Phase, Relay, RequestSummary};
use crate::policy::Policy;

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
}

impl Answering {
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
        let request = RequestSummary {
            parent: Some(self.parent),
            phase: Some(phase),
            ..request
        };
        let event = AuditEvent {
            decision,
            agent: self.agent.clone(),
            request,
            outcome,
        };
        match self.ctx.record(&self.policy, event).await {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(error = %e, phase = phase.as_str(), "audit write failed");
                false
            }
        }
    }
}

/// The agent's answer from the upstream's `resp`. `upgrade` is the client side of an `Upgrade` request and what
/// its relay needs.
pub(crate) fn respond(
    mut resp: Response<Incoming>,
    upgrade: Option<(OnUpgrade, Answering)>,
) -> Response<ProxyBody> {
    match upgrade {
        Some((client, answering)) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let upstream = hyper::upgrade::on(&mut resp);
            tokio::spawn(relay_upgraded(client, upstream, answering));
        }
        _ => strip_hop_by_hop(resp.headers_mut(), false),
    }
    resp.map(|b| b.boxed())
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
