//! Destination-only decisions for bytes that are neither TLS nor HTTP: the policy sees scheme `tcp`, the original
//! IP and port (and the host only when an explicit CONNECT named it). Allowed connections are relayed both ways to
//! the original destination; blocked ones are closed. Either way one audit record is written first.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::accept::Target;
use super::upstream::{connect_tcp, UpstreamError};
use super::ProxyContext;
use crate::model::{
    Action, AuditEvent, Disposition, Mode, Outcome, RequestSummary, Scheme, Transport, Verdict,
};

pub(crate) async fn relay<S>(ctx: Arc<ProxyContext>, mut io: S, target: Target)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let action = Action {
        agent: target.agent.clone(),
        transport: Transport {
            scheme: Scheme::Tcp,
            host: target.host_hint.clone(),
            ip: Some(target.dst.ip()),
            port: target.dst.port(),
        },
        ..Action::default()
    };
    let summary = RequestSummary {
        scheme: Some(Scheme::Tcp),
        host: target.host_hint.clone(),
        ip: Some(target.dst.ip()),
        port: target.dst.port(),
        ..RequestSummary::default()
    };
    let policy = ctx.policy.current();
    let mut decision = policy.evaluate(&action);
    // The DNS stage's stand-in address for a refused name: never relayed (see `dns::stand_in_decision`).
    if crate::dns::is_synthetic(target.dst.ip()) {
        let host = target.host_hint.as_deref();
        decision = crate::dns::stand_in_decision(&policy, &target.agent, host, decision);
    }
    // A byte stream cannot be rewritten, so a constrain verdict on raw TCP is carried out as a block.
    let enforced_block = decision.mode == Mode::Enforce && decision.verdict >= Verdict::Constrain;
    if enforced_block {
        super::record_block(&ctx, decision, &target.agent, summary, None).await;
        return;
    }
    let mut upstream = match connect_tcp(target.dst).await {
        Ok(s) => s,
        Err(e) => {
            let reason = UpstreamError::reason(&e);
            let d = super::proxy_decision(&policy, reason, "the destination could not be reached");
            super::record_block(&ctx, d, &target.agent, summary, None).await;
            return;
        }
    };
    let event = AuditEvent {
        decision,
        agent: target.agent.clone(),
        request: summary,
        outcome: Outcome {
            disposition: Disposition::Forwarded,
            status: None,
            error: None,
        },
    };
    if let Err(e) = ctx.record(event).await {
        tracing::error!(error = %e, "audit write failed: not relaying");
        return;
    }
    match tokio::io::copy_bidirectional(&mut io, &mut upstream).await {
        Ok((up, down)) => {
            tracing::debug!(dst = %target.dst, up, down, "tcp relay finished");
        }
        Err(e) => tracing::debug!(dst = %target.dst, error = %e, "tcp relay ended with an error"),
    }
}
