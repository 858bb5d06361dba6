//! One HTTP exchange, as ordered phases. [`handle`] opens the exchange's record before anything can fail, runs
//! [`phases`], and turns a [`Refusal`] from any phase into the client's answer and the record — so every exit leaves
//! exactly one record. The phases read top to bottom as the exchange happens, phases 1–11 in [`prepare`] and the rest
//! in [`phases`]; each is a function of its own module returning `Result<_, Refusal>`:
//!
//! 1. `head::read`, `head::check` — the authority the request names and the host the policy sees (in the record
//!    from here on), and the head's other checks;
//! 2. `head::bind_to_sni` — over TLS, that host is the server name the session was opened for;
//! 3. `body::read`, `body::decode` — the whole body, bounded (by `max_body_bytes`, and by the agent's share of the
//!    buffer budget, held until the request has been sent: `budget`), and its content-coding undone;
//! 4. `classify::classify` — the Actions and the protocol (and, for a request that reads more than one way, each
//!    other reading's: `readings`); `batch_input::look_up`, `batch_input::carry_named` — the input files a batch
//!    create names, as kept since their upload: a Gemini file's lines become the create's calls, with its model;
//! 5. `Sessions::fill` — what the agent's session did so far, for `session.*` conditions;
//! 6. `Policy::decide_all` — the decision, under the policy snapshot the exchange started with; a request whose
//!    other readings the policy decides otherwise is blocked by the policy's block of any reading
//!    (`readings::blocking`), else refused as ambiguous (`readings::agree`);
//! 7. `Sessions::note` — what each decided Action leaves on the session (labels, counters, the tool it called);
//! 8. `head::bind_to_destination` — over plain HTTP, the host lives at the destination (only when forwarding);
//! 9. `batch_input::check_named`, `enforce::enforce` — a batch naming an input file the enforcer did not read (not
//!    kept, as looked up in phase 4) is blocked; block, or constrain the request;
//! 10. `hold::review` — a `review` verdict waits for a person's answer (or its timeout) before anything goes on;
//! 11. `forward::connect`, `forward::request` — the verified upstream and the request as it will see it;
//! 12. `ExchangeRecord::forwarded` — the record, in the trail before anything reaches the upstream;
//! 13. `forward::send` — the request sent, the response head received, while the record is made durable
//!     (`ExchangeRecord::durable`): the agent sees nothing of the answer before both;
//! 14. `answer::respond` (else `answer::pass_on`) — the response phases: what the agent receives (proposed tool
//!     calls and data decided when the policy has rules for them; copied into the exchange's trace when its decision
//!     retains it: `trace::attach`); an uploaded batch input file's answer names the file kept as read
//!     (`batch_input::Stored::note`).

use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use hyper::upgrade::OnUpgrade;

use super::body::ClientBody;
use super::budget::Reservation;
use super::http::{Conn, ProxyBody};
use super::record::ExchangeRecord;
use super::refusal::Refusal;
use super::{
    answer, batch_input, body, classify, enforce, forward, head, hold, readings, ProxyContext,
};
use crate::inspect::Carried;
use crate::model::{Action, RequestSummary};

/// Take one request through the phases; the response the client gets. The request is boxed: passed down by value,
/// it would keep a copy's room (a few hundred bytes) in each phase's future for as long as the exchange runs.
pub(crate) async fn handle(
    ctx: &Arc<ProxyContext>,
    conn: &Conn,
    req: Box<Request<ClientBody>>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let summary = RequestSummary {
        scheme: Some(conn.scheme),
        ip: Some(conn.dst.ip()),
        port: conn.dst.port(),
        method: Some(req.method().as_str().to_string()),
        path: Some(req.uri().path().to_string()),
        ..RequestSummary::default()
    };
    let mut rec = ExchangeRecord::open(ctx.clone(), &conn.agent, summary);
    let resp = match phases(&mut rec, conn, req).await {
        Ok(resp) => resp,
        // Boxed, as the cold paths below are: an exchange's future is held (boxed by hyper) for as long as the
        // exchange runs, and is as large as its largest state.
        Err(refusal) => Box::pin(rec.refuse(refusal)).await,
    };
    crate::metrics::global().request_latency(started.elapsed());
    resp
}

/// The request path, phase by phase. Every `?` is a refusal [`handle`] answers and records.
async fn phases(
    rec: &mut ExchangeRecord,
    conn: &Conn,
    req: Box<Request<ClientBody>>,
) -> Result<Response<ProxyBody>, Refusal> {
    let Prepared {
        upstream,
        request,
        answered,
        upgrade,
        held,
        stored,
    } = prepare(rec, conn, req).await?;
    let appended = rec.forwarded()?;
    let seq = appended.seq();
    // The record's fdatasync runs on the sync thread while the request is upstream; the answer waits for both.
    // Awaited in turn, not joined: a record made durable before the answer came costs no second wake-up.
    let resp = forward::send(rec.ctx(), conn, upstream, request).await;
    // The body has been sent (or never will be): its bytes go back to the budget.
    drop(held);
    let durable = ExchangeRecord::durable(appended).await;
    let resp = resp?;
    durable?;

    let traced = rec.take_trace().filter(|_| upgrade.is_none());
    let answer = match answered {
        None => answer::pass_on(resp),
        // Boxed: the response phases are a large future only this path needs (see `handle`).
        Some(request) => {
            Box::pin(answer::respond(resp, rec.answering(*request, seq), upgrade)).await
        }
    };
    // An uploaded batch input file whose lines were decided: its answer names the file a batch may run.
    let answer = match stored {
        Some(stored) => stored.note(&rec.ctx().batch_inputs, answer).await,
        None => answer,
    };
    Ok(crate::trace::attach(answer, traced))
}

/// A request decided, cleared to go on, and made ready for its verified upstream: what the forwarding phases take.
struct Prepared {
    upstream: forward::Upstream,
    /// The request as the upstream will see it.
    request: forward::UpstreamRequest,
    /// The deciding Action, when the response phases read the answer. Boxed, so the exchange holds a pointer's room
    /// for it while its request is upstream.
    answered: Option<Box<Action>>,
    /// The client's side of an HTTP/1.1 upgrade the upstream is asked for.
    upgrade: Option<OnUpgrade>,
    /// The body's bytes in the buffer budget, held until it has been sent.
    held: Reservation,
    /// An upload of a batch input file whose lines were decided: the answer names the file kept as read.
    stored: Option<batch_input::Stored>,
}

/// The body's JSON as the classify phase parsed it, taken from the request's Actions (which go) for the enforce
/// phase's rewrites, so the request holds one parse of its body, the one `tree` bytes of `held` were reserved for.
/// `None` when there is none, or when it is not what the rewrites would parse (a body that is not UTF-8 was parsed
/// from its lossy text). Should another holder still share it, the rewrites' own parse is reserved as well.
fn parsed_body(
    actions: Vec<Action>,
    readings: readings::Readings,
    body: &super::body::Body,
    tree: u64,
    held: &mut Reservation,
) -> Result<Option<serde_json::Value>, Refusal> {
    let shared = actions
        .first()
        .and_then(|a| a.http.as_ref())
        .and_then(|h| h.json.clone());
    drop((actions, readings));
    let Some(shared) = shared else {
        return Ok(None);
    };
    match shared.try_into_inner() {
        Ok(json) => Ok(std::str::from_utf8(&body.decoded).is_ok().then_some(json)),
        Err(_still_shared) => {
            held.grow(tree).map_err(Refusal::over_budget)?;
            Ok(None)
        }
    }
}

/// Phases 1–11: read, decide, enforce, hold for review, connect, and build the upstream request. A function of its
/// own so that what only deciding needs (the head's parts, the body, the Actions) is gone before the request is sent:
/// an exchange's future keeps room for each value its current phase may still reach.
async fn prepare(
    rec: &mut ExchangeRecord,
    conn: &Conn,
    req: Box<Request<ClientBody>>,
) -> Result<Prepared, Refusal> {
    let policy = rec.policy().clone();
    let (mut parts, incoming) = req.into_parts();
    let client_upgrade = parts.extensions.remove::<OnUpgrade>();

    let head = head::read(&parts)?;
    rec.note_head(&head);
    head::check(&parts, &head)?;
    head::bind_to_sni(conn, &head)?;

    // Reserved in the agent's share of the buffer budget as it is read; given back on every way out (the
    // reservation drops), else once the request has been sent.
    let held = super::limits::budget().reserve(&conn.agent);
    let (raw, mut held) =
        body::read(incoming, &parts.headers, policy.max_body_bytes(), held).await?;
    rec.note_body(&raw);
    let body = body::decode(raw, &parts.headers, policy.max_body_bytes())?;
    if body.was_coded() {
        // The decoded copy is held beside the received one, and inspection's text is of the decoded bytes.
        let (raw, decoded) = (body.raw.len() as u64, body.decoded.len() as u64);
        held.grow_to(raw + super::budget::INSPECTED_COPIES * decoded)
            .map_err(Refusal::over_budget)?;
    }

    // The JSON the classify phase parses the body into is held as long as the body: its room is reserved first.
    // A form may carry a batch input file, whose lines are parsed wherever they stand.
    let tree = match super::budget::json_tree_bound(&body.decoded) {
        0 if crate::inspect::may_upload_batch_input(parts.method.as_str(), parts.uri.path()) => {
            super::budget::lines_tree_bound(&body.decoded)
        }
        tree => tree,
    };
    held.grow(tree).map_err(Refusal::over_budget)?;
    let (mut inspected, mut readings) = classify::classify(rec, conn, &head, &parts, &body)?;
    let provider = inspected
        .actions
        .first()
        .and_then(|a| a.transport.provider.clone());
    // A batch create's input files, looked up once: a Gemini file's lines become the create's calls, decided with it.
    let named = batch_input::look_up(rec, &conn.agent, provider.as_deref(), &inspected.inputs);
    batch_input::carry_named(rec, &named, (&mut inspected, &mut readings), &mut held)?;
    let sessions = rec.ctx().sessions.clone();
    sessions.fill(&mut inspected.actions, policy.session_counters());
    for actions in &mut readings.actions {
        sessions.fill(actions, policy.session_counters());
    }
    let deciding = Instant::now();
    let others = readings.decide(&policy);
    let mut decided = policy.decide_all(&inspected.actions);
    if !readings::agree(&decided, &others) {
        // The policy's enforced block of any reading is the request's decision; else no one decision fits.
        let Some(blocked) = readings::blocking(&decided, &others) else {
            rec.note_protocol(inspected.protocol);
            return Err(readings.refusal());
        };
        decided = blocked;
    }
    // The DNS stage's stand-in address for a refused name: never forwarded (see `dns::stand_in_decision`).
    if crate::dns::is_synthetic(conn.dst.ip()) {
        let d =
            crate::dns::stand_in_decision(&policy, &conn.agent, Some(&head.host), decided.decision);
        decided.each = vec![d.clone(); decided.each.len()];
        decided.decision = d;
    }
    crate::metrics::global().decision_latency(deciding.elapsed());
    for (action, decision) in inspected.actions.iter().zip(&decided.each) {
        sessions.note(&conn.agent, decision, action);
    }
    let deciding = inspected.actions.get(decided.index);
    let reads_responses = answer::reads_answer(&policy, &inspected.protocol, deciding);
    // The response phases see the deciding Action (an upgrade's, or any whose answer the policy may read).
    // Without the body's JSON, which the response phases never read (`ExchangeRecord::answering`).
    let answered = (head.upgrade.is_some() || reads_responses)
        .then(|| deciding.cloned())
        .flatten()
        .map(|mut a| {
            if let Some(http) = a.http.as_mut() {
                http.json = None;
            }
            Box::new(a)
        });
    rec.note_decided(inspected.protocol, decided, &inspected.actions);
    rec.start_trace(conn.scheme.as_str(), &parts, &body.decoded);

    batch_input::check_named(rec, &named)?;
    batch_input::forget_touched(rec, provider.as_deref(), inspected.actions.first());
    if rec.will_forward() {
        head::bind_to_destination(rec.ctx(), conn, &head).await?;
    }
    let carried = inspected.carried;
    let parsed = parsed_body(inspected.actions, readings, &body, tree, &mut held)?;
    let mut outgoing = enforce::enforce(
        rec,
        &head,
        (provider.as_deref(), carried),
        parts,
        (body, parsed),
    )?;
    if reads_responses || matches!(carried, Some(Carried::InputFile(_))) {
        // What the response phases read must not be content-coded; a coded answer is still decoded. An uploaded
        // batch input file's answer is read for the file's name (`batch_input::Stored::note`).
        outgoing.parts.headers.insert(
            http::header::ACCEPT_ENCODING,
            http::HeaderValue::from_static("identity"),
        );
    }
    hold::review(rec).await?;

    let upstream = forward::connect(rec.ctx(), conn, &head, &outgoing).await?;
    let upgrade = client_upgrade.filter(|_| upstream.is_upgrade());
    let stored = match carried {
        Some(Carried::InputFile(stored_as)) => batch_input::Stored::after(
            rec,
            &conn.agent,
            provider.as_deref(),
            stored_as,
            &outgoing.body,
        ),
        _ => None,
    };
    let request = forward::request(outgoing, &head.authority, &upstream)?;
    Ok(Prepared {
        upstream,
        request,
        answered,
        upgrade,
        held,
        stored,
    })
}
