//! The hold phase: an enforced `review` verdict holds the exchange — nothing reaches the upstream — until a person
//! approves or denies it, or the review's timeout passes and its fallback verdict applies. The held record is
//! written first (durable before anyone can answer); the review's id is its seq. An approval (or an `allow`/`log`
//! fallback) lets the exchange go on to the forward phases, whose record says how the review ended; a denial (or a
//! `block` fallback) is a refusal, answered exactly like a block. In shadow mode nothing is held: the record says
//! `review` ("would review") and the request is forwarded.
//!
//! A proposed tool call ([`proposal`]) is held the same way inside the response phases: its own held record (phase
//! `proposal`, linked to the request's record), the same review table and webhook, and a closing record; a streamed
//! call's stream gets an SSE comment line every `review_keepalive` while it waits ([`Holding`]), a whole response
//! just waits, and a WebSocket message is not held (`review_unavailable`).
//!
//! Bounds: a held exchange keeps its client connection (and one of `proxy.max_connections`), and its body's bytes in
//! the agent's share of the buffer budget (`budget`), for at most the review's timeout (1 hour at most, 5 minutes by
//! default); at most `review.max_pending` — requests and proposals
//! together — are held at once, beyond which the fallback applies at once (`review_unavailable`).

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::StatusCode;
use hyper::body::Frame;
use tokio::sync::mpsc::{self, error::TrySendError};

use super::answer::Answering;
use super::events::Sent;
use super::record::ExchangeRecord;
use super::refusal::Refusal;
use crate::audit::record::rfc3339;
use crate::model::{
    Approver, AuditEvent, Decision, Disposition, Mode, Outcome, Phase, Reason, RequestSummary,
    ReviewNote, ReviewResult, ReviewSpec, Verdict, DEFAULT_REVIEW,
};
use crate::review::{Held, Pending, Resolution};

/// What a review refusal tells the client when the rule has no message of its own.
const REVIEW_MESSAGE: &str = "this action needs a person's approval";

/// Hold the exchange when its decision is an enforced review; `Ok` when it may go on.
pub(crate) async fn review(rec: &mut ExchangeRecord) -> Result<(), Refusal> {
    let Some(d) = rec.decision() else {
        return Ok(());
    };
    if d.verdict != Verdict::Review || d.mode == Mode::Shadow {
        return Ok(());
    }
    let spec = d.review.unwrap_or(DEFAULT_REVIEW);
    // Boxed: every exchange's future would otherwise keep room for the few that are held.
    Box::pin(hold(rec, spec)).await
}

/// Hold the exchange for a person's answer under `spec`.
async fn hold(rec: &mut ExchangeRecord, spec: ReviewSpec) -> Result<(), Refusal> {
    let reviews = rec.ctx().reviews.clone();
    if !reviews.has_room() {
        return conclude(rec, spec, None, ReviewResult::Unavailable, None);
    }
    let held_seq = rec.held(spec).await?;
    let pending = pending(rec, held_seq, spec);
    let resolution = match reviews.hold(pending) {
        Ok(held) => held.wait().await,
        Err(e) => {
            tracing::warn!(error = %e, "review could not be held: its fallback applies");
            return conclude(rec, spec, Some(held_seq), ReviewResult::Unavailable, None);
        }
    };
    match resolution {
        Resolution::Answered(a) => {
            let result = if a.approved {
                ReviewResult::Approved
            } else {
                ReviewResult::Denied
            };
            let answer = (a.by, a.reason, a.at);
            conclude(rec, spec, Some(held_seq), result, Some(answer))
        }
        Resolution::TimedOut(_) => conclude(rec, spec, Some(held_seq), ReviewResult::Timeout, None),
    }
}

/// What a reviewer is shown of this exchange.
fn pending(rec: &ExchangeRecord, held_seq: u64, spec: ReviewSpec) -> Pending {
    let review = Review {
        decision: rec.decision(),
        spec,
        agent: rec.agent(),
    };
    review.pending(held_seq, rec.policy(), rec.summary().clone(), None)
}

/// The facts of one held review, whatever it holds.
struct Review<'a> {
    decision: Option<&'a Decision>,
    spec: ReviewSpec,
    agent: &'a crate::model::Agent,
}

impl Review<'_> {
    /// What a reviewer is shown: `request` as the record names it (host and path scrubbed under `policy`), and the
    /// tool a held proposal calls.
    fn pending(
        &self,
        held_seq: u64,
        policy: &crate::policy::Policy,
        mut request: RequestSummary,
        proposal_tool: Option<String>,
    ) -> Pending {
        let now = SystemTime::now();
        let d = self.decision;
        crate::constrain::scrub_for_record(
            policy,
            [&mut request.host, &mut request.path].into_iter().flatten(),
        );
        Pending {
            id: held_seq,
            phase: if proposal_tool.is_some() {
                Phase::Proposal
            } else {
                Phase::Request
            },
            held_at: rfc3339(now),
            deadline: rfc3339(now + Duration::from_secs(self.spec.timeout_secs)),
            timeout_secs: self.spec.timeout_secs,
            fallback: self.spec.fallback,
            rule: d.and_then(|d| d.deciding_rule.clone()),
            matched: d.map(|d| d.matched_rules.clone()).unwrap_or_default(),
            message: d.and_then(|d| d.message.clone()),
            agent: self.agent.clone(),
            request,
            proposal_tool,
        }
    }
}

/// Note how the review ended on the record; a refusal when what is carried out is a block.
fn conclude(
    rec: &mut ExchangeRecord,
    spec: ReviewSpec,
    held_seq: Option<u64>,
    result: ReviewResult,
    answer: Option<(Approver, Option<String>, SystemTime)>,
) -> Result<(), Refusal> {
    let Some(d) = rec.decision() else {
        return Ok(());
    };
    let ended = Ended::of(d, spec, held_seq, result, answer);
    let carried_out = ended.note.carried_out;
    rec.note_review(ended.note);
    match ended.refusal {
        Some((why, message)) if carried_out == Some(Verdict::Block) => Err(Refusal::new(
            why,
            StatusCode::FORBIDDEN,
            Cow::Owned(message),
        )),
        _ => Ok(()),
    }
}

/// How a review ended: the closing record's review note and, for a result that is not an approval, the reason and
/// the message a block carried out for it tells the agent.
struct Ended {
    note: ReviewNote,
    refusal: Option<(Reason, String)>,
}

impl Ended {
    fn of(
        d: &Decision,
        spec: ReviewSpec,
        held_seq: Option<u64>,
        result: ReviewResult,
        answer: Option<(Approver, Option<String>, SystemTime)>,
    ) -> Ended {
        let carried_out = match result {
            ReviewResult::Approved if !d.rewrites.is_empty() => Verdict::Constrain,
            ReviewResult::Approved => Verdict::Allow,
            ReviewResult::Denied => Verdict::Block,
            ReviewResult::Timeout | ReviewResult::Unavailable => spec.fallback,
        };
        let (by, reason, at) = match answer {
            Some((by, reason, at)) => (Some(by), reason, at),
            None => (None, None, SystemTime::now()),
        };
        let base = d.message.as_deref().unwrap_or(REVIEW_MESSAGE);
        let refusal = match result {
            ReviewResult::Approved => None,
            ReviewResult::Denied => Some((
                Reason::ReviewDenied,
                match &reason {
                    Some(r) => format!("{base}: denied by a reviewer: {r}"),
                    None => format!("{base}: denied by a reviewer"),
                },
            )),
            ReviewResult::Timeout => Some((
                Reason::ReviewTimeout,
                format!("{base}: nobody approved it in time"),
            )),
            ReviewResult::Unavailable => Some((Reason::ReviewUnavailable, unavailable(base))),
        };
        let note = ReviewNote {
            held_seq,
            result: Some(result),
            by,
            reason,
            at: Some(rfc3339(at)),
            carried_out: Some(carried_out),
            ..ReviewNote::default()
        };
        Ended { note, refusal }
    }

    /// The decision carried out in place of the review: its verdict the one carried out; a block says why.
    fn carried(&self, d: &Decision) -> Decision {
        let mut d = d.clone();
        d.verdict = self.note.carried_out.unwrap_or(Verdict::Block);
        if d.verdict == Verdict::Block {
            if let Some((why, message)) = &self.refusal {
                d.reason = *why;
                d.message = Some(message.clone());
            }
        }
        d
    }
}

/// What the agent is told of a review that could not be held, after the rule's message (or the default one).
fn unavailable(base: &str) -> String {
    format!("{base}: it could not be held for review")
}

/// `decision`, an enforced review that cannot be held (a WebSocket message, a proposed tool call mid-stream, a
/// response), as the block it is carried out as: reason `review_unavailable`, and its message says why.
pub(crate) fn unheld(decision: &Decision) -> Decision {
    let mut d = decision.clone();
    if d.verdict == Verdict::Review {
        d.verdict = Verdict::Block;
        d.reason = Reason::ReviewUnavailable;
        d.message = Some(unavailable(d.message.as_deref().unwrap_or(REVIEW_MESSAGE)));
    }
    d
}

/// Where a proposal under an enforced review is held.
pub(crate) enum Holding<'a> {
    /// It cannot be held (a WebSocket message: holding it would stall every message after it): refused as
    /// `review_unavailable`.
    No,
    /// A whole response body: held as it is, nothing to keep alive.
    Whole,
    /// A stream of server-sent events: what came before the call has been sent; a comment line every
    /// `review_keepalive` keeps the stream alive while the call waits.
    Events(&'a mpsc::Sender<Sent>),
}

/// How the review of one proposal ended.
pub(crate) struct Reviewed {
    /// The decision to carry out: the policy's own when no review held it.
    pub carried: Decision,
    /// The closing record's review part, when it was held (or could not be).
    pub note: Option<ReviewNote>,
    /// The agent went away while it was held: nothing is carried out.
    pub gone: bool,
}

/// Hold `call` (its record's view `summary`) when `decision` is an enforced review: its held record first (durable),
/// then published for review like a held request, waited for under `holding`'s terms.
pub(crate) async fn proposal(
    ans: &Answering,
    decision: &Decision,
    summary: &RequestSummary,
    holding: &Holding<'_>,
) -> Reviewed {
    let not_held = |carried: Decision, note: Option<ReviewNote>| Reviewed {
        carried,
        note,
        gone: false,
    };
    if decision.verdict != Verdict::Review || decision.mode == Mode::Shadow {
        return not_held(decision.clone(), None);
    }
    if matches!(holding, Holding::No) {
        return not_held(unheld(decision), None);
    }
    let spec = decision.review.unwrap_or(DEFAULT_REVIEW);
    let ending = |result, seq, answer| {
        let ended = Ended::of(decision, spec, seq, result, answer);
        not_held(ended.carried(decision), Some(ended.note))
    };
    if !ans.ctx.reviews.has_room() {
        return ending(ReviewResult::Unavailable, None, None);
    }
    let Some(held_seq) = held_record(ans, decision, summary, spec).await else {
        let message = "the enforcer could not record the tool call, so it was not held for review";
        let refused = super::enforcer_decision(&ans.policy, Reason::AuditUnavailable, message);
        return not_held(refused, None);
    };
    let review = Review {
        decision: Some(decision),
        spec,
        agent: &ans.agent,
    };
    let tool = summary.tool.clone().unwrap_or_default();
    let pending = review.pending(held_seq, &ans.policy, summary.clone(), Some(tool));
    let held = match ans.ctx.reviews.hold(pending) {
        Ok(held) => held,
        Err(e) => {
            tracing::warn!(error = %e, "proposal review could not be held: its fallback applies");
            return ending(ReviewResult::Unavailable, Some(held_seq), None);
        }
    };
    match wait(held, holding).await {
        Some(Resolution::Answered(a)) => {
            let result = if a.approved {
                ReviewResult::Approved
            } else {
                ReviewResult::Denied
            };
            ending(result, Some(held_seq), Some((a.by, a.reason, a.at)))
        }
        Some(Resolution::TimedOut(_)) => ending(ReviewResult::Timeout, Some(held_seq), None),
        None => Reviewed {
            carried: decision.clone(),
            note: Some(ReviewNote {
                held_seq: Some(held_seq),
                ..ReviewNote::default()
            }),
            gone: true,
        },
    }
}

/// The held record of a proposal (outcome `held`, the review's terms, linked to the request's record); its seq is
/// the review's id.
async fn held_record(
    ans: &Answering,
    decision: &Decision,
    summary: &RequestSummary,
    spec: ReviewSpec,
) -> Option<u64> {
    let outcome = Outcome {
        disposition: Disposition::Held,
        status: None,
        error: None,
    };
    let mut event = AuditEvent::new(
        decision.clone(),
        ans.agent.clone(),
        summary.clone(),
        outcome,
    );
    event.review = Some(ReviewNote {
        timeout_secs: Some(spec.timeout_secs),
        fallback: Some(spec.fallback),
        ..ReviewNote::default()
    });
    ans.record_event(Phase::Proposal, event).await
}

/// What a held stream is sent while its review waits: an SSE comment (WHATWG HTML, "Server-sent events" §9.2.6: a
/// line starting with a colon is ignored by every event-stream parser).
pub(crate) const KEEPALIVE: &[u8] = b": held for review by the enforcer\n\n";

/// The review's resolution, keeping a stream alive meanwhile; `None` when the agent went away (its review is
/// withdrawn: the dropped `Held` takes it out of the table).
async fn wait(held: Held, holding: &Holding<'_>) -> Option<Resolution> {
    let wait = held.wait();
    tokio::pin!(wait);
    let Holding::Events(tx) = holding else {
        return Some(wait.await);
    };
    let every = super::limits::limits().review_keepalive;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    loop {
        tokio::select! {
            resolution = &mut wait => return Some(resolution),
            _ = tick.tick() => {
                // A full channel is an agent not reading: a keep-alive would not help it.
                if let Err(TrySendError::Closed(_)) =
                    tx.try_send(Ok(Frame::data(Bytes::from_static(KEEPALIVE))))
                {
                    return None;
                }
            }
        }
    }
}
