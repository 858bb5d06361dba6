//! Destination-only decisions for bytes that are neither TLS nor HTTP: the policy sees scheme `tcp`, the original
//! IP and port (and the host only when an explicit CONNECT named it). Allowed connections are relayed both ways to
//! the original destination; blocked ones are closed. Either way one audit record is written first. A raw connection
//! cannot be held for review: a `review` verdict on one is carried out as a block (`review_unavailable`).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use super::upstream::connect_tcp;
use super::{ProxyContext, Target};
use crate::model::{
    Action, AuditEvent, Disposition, Mode, Outcome, RequestSummary, Scheme, Transport, Verdict,
};

pub(crate) async fn relay<S>(ctx: Arc<ProxyContext>, mut io: S, target: Target)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut action = Action {
        agent: target.agent.clone(),
        transport: Transport {
            scheme: Scheme::Tcp,
            host: target.host_hint.clone(),
            ip: Some(target.dst.ip()),
            port: target.dst.port(),
            provider: None,
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
    let decided = ctx
        .sessions
        .decide(&policy, &target.agent, std::slice::from_mut(&mut action));
    // A connection cannot be held for a person's answer: an enforced review refuses it, saying so.
    let mut decision = match decided.decision.mode {
        Mode::Enforce => super::hold::unheld(&decided.decision),
        Mode::Shadow => decided.decision,
    };
    // The DNS stage's stand-in address for a refused name: never relayed (see `dns::stand_in_decision`).
    if crate::dns::is_synthetic(target.dst.ip()) {
        let host = target.host_hint.as_deref();
        decision = crate::dns::stand_in_decision(&policy, &target.agent, host, decision);
    }
    let blocked = decision.mode == Mode::Enforce && decision.verdict == Verdict::Block;
    let (disposition, error, upstream) = if blocked {
        (Disposition::Blocked, None, None)
    } else {
        match connect_tcp(target.dst).await {
            Ok(s) => (Disposition::Forwarded, None, Some(s)),
            Err(e) => {
                tracing::info!(dst = %target.dst, error = %e, "tcp destination unreachable");
                (Disposition::Failed, Some(e.reason()), None)
            }
        }
    };
    let outcome = Outcome {
        disposition,
        status: None,
        error,
    };
    let event = AuditEvent::new(decision, target.agent.clone(), summary, outcome);
    if let Err(e) = ctx.record(&policy, event).await {
        tracing::error!(error = %e, "audit write failed: not relaying");
        return;
    }
    let Some(mut upstream) = upstream else {
        return;
    };
    match tokio::io::copy_bidirectional(&mut io, &mut upstream).await {
        Ok((up, down)) => {
            tracing::debug!(dst = %target.dst, up, down, "tcp relay finished");
        }
        Err(e) => tracing::debug!(dst = %target.dst, error = %e, "tcp relay ended with an error"),
    }
}
