//! One HTTP exchange, as ordered phases. [`handle`] opens the exchange's record before anything can fail, runs
//! [`phases`], and turns a [`Refusal`] from any phase into the client's answer and the record — so every exit leaves
//! exactly one record. The phases read top to bottom as the exchange happens; each is a function of its own module
//! returning `Result<_, Refusal>`:
//!
//! 1. `head::read` — the authority the request names and the host the policy sees;
//! 2. `head::bind_to_sni` — over TLS, that host is the server name the session was opened for;
//! 3. `body::read`, `body::decode` — the whole body, bounded, and its content-coding undone;
//! 4. `classify::classify` — the Actions and the protocol;
//! 5. `Policy::decide_all` — the decision, under the policy snapshot the exchange started with;
//! 6. `head::bind_to_destination` — over plain HTTP, the host lives at the destination (only when forwarding);
//! 7. `enforce::enforce` — block, or constrain the request;
//! 8. `forward::connect`, `forward::request` — the verified upstream and the request as it will see it;
//! 9. `ExchangeRecord::forwarded` — the record, in the trail before anything reaches the upstream;
//! 10. `forward::send` — the request sent, the response head received, while the record is made durable
//!     (`ExchangeRecord::durable`): the agent sees nothing of the answer before both;
//! 11. `answer::respond` — the response phases: what the agent receives.

use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;

use super::http::{Conn, ProxyBody};
use super::record::ExchangeRecord;
use super::refusal::Refusal;
use super::{answer, body, classify, enforce, forward, head, ProxyContext};
use crate::model::RequestSummary;

/// Take one request through the phases; the response the client gets.
pub(crate) async fn handle(
    ctx: &Arc<ProxyContext>,
    conn: &Conn,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let summary = RequestSummary {
        scheme: Some(conn.scheme),
        ip: Some(conn.dst.ip()),
        port: conn.dst.port(),
        method: Some(req.method().as_str().to_string()),
        path: Some(req.uri().path().to_string()),
        ..RequestSummary::default()
    };
    let started = Instant::now();
    let mut rec = ExchangeRecord::open(ctx.clone(), &conn.agent, summary);
    let resp = match phases(&mut rec, conn, req).await {
        Ok(resp) => resp,
        Err(refusal) => rec.refuse(refusal).await,
    };
    crate::metrics::global().request_latency(started.elapsed());
    resp
}

/// The request path, phase by phase. Every `?` is a refusal [`handle`] answers and records.
async fn phases(
    rec: &mut ExchangeRecord,
    conn: &Conn,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Refusal> {
    let policy = rec.policy().clone();
    let (mut parts, incoming) = req.into_parts();
    let client_upgrade = parts.extensions.remove::<OnUpgrade>();

    let head = head::read(&parts)?;
    rec.note_head(&head);
    head::bind_to_sni(conn, &head)?;

    let raw = body::read(incoming, &parts.headers, policy.max_body_bytes()).await?;
    rec.note_body(&raw);
    let body = body::decode(raw, &parts.headers, policy.max_body_bytes())?;

    let inspected = classify::classify(rec, conn, &head, &parts, &body)?;
    let upgrading = head
        .upgrade
        .is_some()
        .then(|| inspected.actions.first().cloned());
    let deciding = Instant::now();
    let mut decided = policy.decide_all(&inspected.actions);
    // The DNS stage's stand-in address for a refused name: never forwarded (see `dns::stand_in_decision`).
    if crate::dns::is_synthetic(conn.dst.ip()) {
        let d =
            crate::dns::stand_in_decision(&policy, &conn.agent, Some(&head.host), decided.decision);
        decided.each = vec![d.clone(); decided.each.len()];
        decided.decision = d;
    }
    crate::metrics::global().decision_latency(deciding.elapsed());
    rec.note_decided(inspected.protocol, decided, &inspected.actions);

    if rec.will_forward() {
        head::bind_to_destination(rec.ctx(), conn, &head).await?;
    }
    let outgoing = enforce::enforce(rec, &head, parts, body)?;

    let upstream = forward::connect(rec.ctx(), conn, &head, &outgoing).await?;
    let upgrade = client_upgrade.filter(|_| upstream.is_upgrade());
    let upstream_req = forward::request(outgoing, &head.authority, &upstream)?;
    let appended = rec.forwarded()?;
    let seq = appended.seq();
    // The record's fdatasync runs while the request is upstream; the answer waits for both.
    let (resp, durable) = tokio::join!(
        forward::send(rec.ctx(), conn, upstream, upstream_req),
        ExchangeRecord::durable(appended),
    );
    let resp = resp?;
    durable?;

    let upgrade = upgrade.zip(upgrading.flatten()).map(|(client, request)| {
        let answering = rec.answering(request, seq);
        (client, answering)
    });
    Ok(answer::respond(resp, upgrade))
}
