//! The proposal phase: each tool call a model proposes in an LLM response (found by `inspect::proposal`, streamed
//! or whole, over HTTP or the WebSocket mode) becomes an Action of its own — the exchange's transport, agent and
//! `llm`, and the call as `proposal` — decided by the policy's `phase: proposal` rules under the exchange's policy
//! snapshot before the agent receives it, recorded (linked to the request's record) when a rule matched, and carried
//! out as a [`Ruling`]: passed, its arguments rewritten (`constrain`: redaction, `json_*`), or refused (`block`, and a
//! rewrite that would touch a signed call or could not remove a secret).
//!
//! Every proposal's verdict is settled one at a time and in order, while the stream holds the call: an enforced
//! `review` waits there for a person's answer (`hold::proposal`: held record, published like a held request, the
//! stream kept alive meanwhile), and the stream's later events with it; the closing record links the held one.

use super::answer::Answering;
use super::hold::Holding;
use crate::inspect::proposal::{refusal_text, Call, Ruling};
use crate::model::{
    Action, AuditEvent, Change, Decision, Disposition, Mode, Outcome, Phase, Reason,
    RequestSummary, Verdict,
};

/// The rulings on `calls`, in order; a call under an enforced review is held as `holding` allows
/// (`hold::proposal`).
pub(crate) async fn rule(ans: &Answering, calls: &[Call], holding: &Holding<'_>) -> Vec<Ruling> {
    let mut rulings = Vec::with_capacity(calls.len());
    for call in calls {
        rulings.push(rule_one(ans, call, holding).await);
    }
    rulings
}

/// Why a call whose arguments cannot be read as the agent's SDK reads them is refused, undecided.
const UNREADABLE_ARGS: &str =
    "its arguments could not be read as the agent would read them, so they could not be decided";

async fn rule_one(ans: &Answering, call: &Call, holding: &Holding<'_>) -> Ruling {
    if call.unreadable {
        return refuse_unreadable(ans, call).await;
    }
    let mut action = ans.request.clone();
    action.proposal = Some(call.proposal.clone());
    let decision = decide(ans, &action).await;
    if decision.matched_rules.is_empty() && decision.verdict == Verdict::Allow {
        return Ruling::Pass;
    }
    let reviewed =
        super::hold::proposal(ans, &decision, &summary(ans, call, Vec::new()), holding).await;
    let (ruling, carried, changes) = carry_out(ans, call, reviewed.carried);
    let blocked = matches!(ruling, Ruling::Refuse(_));
    let mut outcome = Outcome::of(&carried, blocked, None);
    // A held call's closing record keeps the policy's `review` decision; its outcome and review part say how it
    // ended (as a held request's does).
    let recorded = match &reviewed.note {
        Some(_) if reviewed.gone => {
            outcome.disposition = Disposition::Failed;
            outcome.error = Some(Reason::ClientClosed);
            decision
        }
        Some(_) => {
            if blocked {
                outcome.error = Some(carried.reason);
            }
            decision
        }
        None => carried,
    };
    let disposition = outcome.disposition;
    let summary = summary(ans, call, changes);
    let mut event = AuditEvent::new(
        recorded.clone(),
        ans.agent.clone(),
        summary.clone(),
        outcome,
    );
    event.review = reviewed.note;
    let Some(seq) = ans.record_event(Phase::Proposal, event).await else {
        // What was not recorded is not passed on.
        let tool = &call.proposal.tool;
        return Ruling::Refuse(refusal_text(
            tool,
            "the enforcer could not record this tool call",
        ));
    };
    // A `retain:` rule keeps the exchange that carried the call, as the model proposed it.
    let traced = ans.linked(Phase::Proposal, summary);
    ans.retain_for(seq, traced, disposition, &recorded);
    ruling
}

/// A call the reader could not read as the agent would (`Call::unreadable`): refused whatever the policy's mode,
/// recorded as the enforcer's own block (phase `proposal`, reason `unparseable`).
async fn refuse_unreadable(ans: &Answering, call: &Call) -> Ruling {
    let decision = super::enforcer_decision(&ans.policy, Reason::Unparseable, UNREADABLE_ARGS);
    let outcome = Outcome {
        disposition: Disposition::Blocked,
        status: None,
        error: Some(Reason::Unparseable),
    };
    let summary = summary(ans, call, Vec::new());
    let _recorded = ans
        .record(Phase::Proposal, decision, summary, outcome)
        .await;
    Ruling::Refuse(refusal_text(&call.proposal.tool, UNREADABLE_ARGS))
}

/// The decision on one proposal Action, under the agent's session.
async fn decide(ans: &Answering, action: &Action) -> Decision {
    let mut actions = [action.clone()];
    ans.decide_in_session(&mut actions).decision
}

/// The ruling for `decision` (shadow mode passes everything), the decision as carried out (a constrain that could
/// not be carried out is a block) and what a rewrite changed.
fn carry_out(ans: &Answering, call: &Call, decision: Decision) -> (Ruling, Decision, Vec<Change>) {
    if decision.mode == Mode::Shadow {
        return (Ruling::Pass, decision, Vec::new());
    }
    // A review still standing here could not be held: refused, saying so.
    let mut decision = super::hold::unheld(&decision);
    if decision.verdict == Verdict::Constrain {
        let failed = if call.signed {
            Some(Reason::SignedField)
        } else {
            let mut args = call.proposal.args.clone().unwrap_or_default();
            match crate::constrain::apply_to_json(&decision.rewrites, &ans.policy, &mut args) {
                Ok(changes) if changes.is_empty() => return (Ruling::Pass, decision, changes),
                Ok(changes) => return (Ruling::Rewrite(args), decision, changes),
                Err(e) => Some(e.reason()),
            }
        };
        if let Some(reason) = failed {
            decision.block_instead(reason);
        }
    }
    if decision.verdict == Verdict::Block {
        let text = refusal_text(
            &call.proposal.tool,
            &crate::inspect::block_message(&decision),
        );
        return (Ruling::Refuse(text), decision, Vec::new());
    }
    (Ruling::Pass, decision, Vec::new())
}

/// The record's view of a proposal: the exchange's head and model, the tool, the size and digest of its arguments
/// (as JSON text), and what a rewrite changed (paths under the arguments).
fn summary(ans: &Answering, call: &Call, changes: Vec<Change>) -> RequestSummary {
    let args = call
        .proposal
        .args
        .as_ref()
        .map(serde_json::Value::to_string)
        .unwrap_or_default();
    let llm = ans.request.llm.as_ref();
    RequestSummary {
        llm_provider: llm.map(|l| l.provider.clone()),
        llm_model: llm.and_then(|l| l.model.clone()),
        tool: Some(call.proposal.tool.clone()),
        ..ans.part_summary(args.as_bytes(), changes)
    }
}
