//! Destination-only decisions for bytes that are neither TLS nor HTTP: the policy sees scheme `tcp`, the original
//! IP and port (and the host only when an explicit CONNECT named it). Allowed connections are relayed both ways to
//! the original destination; blocked ones are closed. Either way one audit record is written before any byte is
//! relayed. A raw connection cannot be held for review: a `review` verdict on one is carried out as a block
//! (`review_unavailable`).
//!
//! A client that stays silent may be speaking a server-speaks-first protocol (SMTP, MySQL): [`server_first`]
//! connects and lets whichever side speaks first decide. If it is the client and its bytes are TLS or HTTP after
//! all (a slow client, or one waiting on purpose), the connection goes back to be intercepted: a raw relay never
//! carries a TLS session or an HTTP request the policy has not read.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::accept::{patient, sniff, Kind, SNIFF_TIMEOUT};
use super::upstream::connect_tcp;
use super::{ProxyContext, Target};
use crate::model::{
    Action, AuditEvent, Decision, Disposition, Mode, Outcome, Reason, RequestSummary, Scheme,
    Transport, Verdict,
};
use crate::policy::Policy;

/// Relay a connection whose client spoke first with bytes that are neither TLS nor HTTP (`first`, already read).
pub(crate) async fn relay<S>(ctx: Arc<ProxyContext>, io: S, target: Target, first: Bytes)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let opened = open(&ctx, &target).await;
    if let Some(upstream) = opened.record(&ctx, &target).await {
        pipe(io, upstream, &target, first, Bytes::new()).await;
    }
}

/// A connection whose client has sent nothing: decide it, connect, and wait (up to the head timeout) for the first
/// bytes from either side. The server's: a server-speaks-first protocol, recorded and relayed. The client's: sniffed
/// as any connection's first bytes; neither TLS nor HTTP, recorded and relayed; TLS or HTTP, handed back
/// (`Some`, with the bytes read) unrecorded and with the upstream connection closed, to be intercepted.
pub(crate) async fn server_first<S>(
    ctx: &Arc<ProxyContext>,
    mut io: S,
    target: &Target,
) -> Option<(BytesMut, S)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut opened = open(ctx, target).await;
    let Some(mut upstream) = opened.upstream.take() else {
        opened.record(ctx, target).await;
        return None;
    };
    let mut client = BytesMut::with_capacity(64);
    let mut server = BytesMut::with_capacity(4096);
    let first = tokio::time::timeout(target.head_timeout, async {
        tokio::select! {
            r = io.read_buf(&mut client) => r.map(|n| (n, true)),
            r = upstream.read_buf(&mut server) => r.map(|n| (n, false)),
        }
    })
    .await;
    let relayed = match first {
        Ok(Ok((n, true))) if n > 0 => {
            // The client spoke first: the rest of its sniffed prefix, as for any connection.
            let mut complete = true;
            while complete && sniff(&client).is_none() {
                let wait = if patient(&client) {
                    target.head_timeout
                } else {
                    SNIFF_TIMEOUT
                };
                match tokio::time::timeout(wait, io.read_buf(&mut client)).await {
                    Ok(Ok(n)) => complete = n > 0,
                    // A word and then silence: a text protocol's client waiting for its answer.
                    Err(_) if !patient(&client) => break,
                    _ => complete = false,
                }
            }
            if matches!(sniff(&client), Some(Kind::Tls | Kind::Http)) {
                return Some((client, io));
            }
            complete
        }
        Ok(Ok((n, false))) => n > 0,
        // Either side closed or failed, or neither spoke in time: recorded (the connection was made), not relayed.
        _ => false,
    };
    opened.upstream = Some(upstream).filter(|_| relayed);
    if let Some(upstream) = opened.record(ctx, target).await {
        pipe(io, upstream, target, client.freeze(), server.freeze()).await;
    }
    None
}

/// A raw connection decided, and its upstream connection when allowed and reachable.
struct Opened {
    policy: Arc<Policy>,
    decision: Decision,
    action: Action,
    summary: RequestSummary,
    disposition: Disposition,
    error: Option<Reason>,
    upstream: Option<TcpStream>,
}

/// Decide `target` as a `tcp` Action and, unless blocked, connect to it.
async fn open(ctx: &ProxyContext, target: &Target) -> Opened {
    let action = Action {
        agent: target.agent.clone().into(),
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
    let mut actions = [action];
    ctx.sessions.fill(&mut actions, policy.session_counters());
    let [action] = actions;
    let decided = policy.decide_all(std::slice::from_ref(&action));
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
    Opened {
        policy,
        decision,
        action,
        summary,
        disposition,
        error,
        upstream,
    }
}

impl Opened {
    /// Note the decision on the agent's session and write its record; the upstream connection to relay to, when
    /// there is one and the record was written.
    async fn record(self, ctx: &ProxyContext, target: &Target) -> Option<TcpStream> {
        ctx.sessions
            .note(&target.agent, &self.decision, &self.action);
        let outcome = Outcome {
            disposition: self.disposition,
            status: None,
            error: self.error,
        };
        let event = AuditEvent::new(self.decision, target.agent.clone(), self.summary, outcome);
        if let Err(e) = ctx.record(&self.policy, event).await {
            tracing::error!(error = %e, "audit write failed: not relaying");
            return None;
        }
        self.upstream
    }
}

/// Relay both ways, after passing on the bytes already read from the client (`up`) and the server (`down`).
async fn pipe<S>(mut io: S, mut upstream: TcpStream, target: &Target, up: Bytes, down: Bytes)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if upstream.write_all(&up).await.is_err() || io.write_all(&down).await.is_err() {
        return;
    }
    match tokio::io::copy_bidirectional(&mut io, &mut upstream).await {
        Ok((up, down)) => {
            tracing::debug!(dst = %target.dst, up, down, "tcp relay finished");
        }
        Err(e) => tracing::debug!(dst = %target.dst, error = %e, "tcp relay ended with an error"),
    }
}
