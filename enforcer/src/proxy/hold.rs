//! The hold phase: an enforced `review` verdict holds the exchange — nothing reaches the upstream — until a person
//! approves or denies it, or the review's timeout passes and its fallback verdict applies. The held record is
//! written first (durable before anyone can answer); the review's id is its seq. An approval (or an `allow`/`log`
//! fallback) lets the exchange go on to the forward phases, whose record says how the review ended; a denial (or a
//! `block` fallback) is a refusal, answered exactly like a block. In shadow mode nothing is held: the record says
//! `review` ("would review") and the request is forwarded.
//!
//! Bounds: a held exchange keeps its client connection (and one of `proxy.max_connections`) for at most the
//! review's timeout (1 hour at most, 5 minutes by default); at most `review.max_pending` are held at once, beyond
//! which the fallback applies at once (`review_unavailable`).

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use http::StatusCode;

use super::record::ExchangeRecord;
use super::refusal::Refusal;
use crate::audit::record::rfc3339;
use crate::model::{
    Approver, Mode, Reason, ReviewNote, ReviewResult, ReviewSpec, Verdict, DEFAULT_REVIEW,
};
use crate::review::{Pending, Resolution};

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
    let now = SystemTime::now();
    let d = rec.decision();
    let mut request = rec.summary().clone();
    crate::constrain::scrub_for_record(
        rec.policy(),
        [&mut request.host, &mut request.path].into_iter().flatten(),
    );
    Pending {
        id: held_seq,
        phase: crate::model::Phase::Request,
        held_at: rfc3339(now),
        deadline: rfc3339(now + Duration::from_secs(spec.timeout_secs)),
        timeout_secs: spec.timeout_secs,
        fallback: spec.fallback,
        rule: d.and_then(|d| d.deciding_rule.clone()),
        matched: d.map(|d| d.matched_rules.clone()).unwrap_or_default(),
        message: d.and_then(|d| d.message.clone()),
        agent: rec.agent().clone(),
        request,
        proposal_tool: None,
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
    let rewrites = rec.decision().is_some_and(|d| !d.rewrites.is_empty());
    let carried_out = match result {
        ReviewResult::Approved if rewrites => Verdict::Constrain,
        ReviewResult::Approved => Verdict::Allow,
        ReviewResult::Denied => Verdict::Block,
        ReviewResult::Timeout | ReviewResult::Unavailable => spec.fallback,
    };
    let (by, reason, at) = match answer {
        Some((by, reason, at)) => (Some(by), reason, at),
        None => (None, None, SystemTime::now()),
    };
    let base = rec
        .decision()
        .and_then(|d| d.message.clone())
        .unwrap_or_else(|| REVIEW_MESSAGE.to_owned());
    let (why, message) = match result {
        ReviewResult::Denied => (
            Reason::ReviewDenied,
            match &reason {
                Some(r) => format!("{base}: denied by a reviewer: {r}"),
                None => format!("{base}: denied by a reviewer"),
            },
        ),
        ReviewResult::Timeout => (
            Reason::ReviewTimeout,
            format!("{base}: nobody approved it in time"),
        ),
        _ => (Reason::ReviewUnavailable, unavailable(&base)),
    };
    rec.note_review(ReviewNote {
        held_seq,
        result: Some(result),
        by,
        reason,
        at: Some(rfc3339(at)),
        carried_out: Some(carried_out),
        ..ReviewNote::default()
    });
    if carried_out == Verdict::Block {
        return Err(Refusal::new(
            why,
            StatusCode::FORBIDDEN,
            Cow::Owned(message),
        ));
    }
    Ok(())
}

/// What the agent is told of a review that could not be held, after the rule's message (or the default one).
fn unavailable(base: &str) -> String {
    format!("{base}: it could not be held for review")
}

/// `decision`, an enforced review that cannot be held (a WebSocket message, a proposed tool call mid-stream, a
/// response), as the block it is carried out as: reason `review_unavailable`, and its message says why.
pub(crate) fn unheld(decision: &crate::model::Decision) -> crate::model::Decision {
    let mut d = decision.clone();
    if d.verdict == Verdict::Review {
        d.verdict = Verdict::Block;
        d.reason = Reason::ReviewUnavailable;
        d.message = Some(unavailable(d.message.as_deref().unwrap_or(REVIEW_MESSAGE)));
    }
    d
}
