//! The proposal phase: each tool call a model proposes in an LLM response (found by `inspect::proposal`, streamed
//! or whole, over HTTP or the WebSocket mode) becomes an Action of its own — the exchange's transport, agent and
//! `llm`, and the call as `proposal` — decided by the policy's `phase: proposal` rules under the exchange's policy
//! snapshot before the agent receives it, recorded (linked to the request's record) when a rule matched, and carried
//! out as a [`Ruling`]: passed, its arguments rewritten (`constrain`: redaction, `json_*`), or refused (`block`, and a
//! rewrite that would touch a signed call or could not remove a secret).
//!
//! [`decide`] is where every proposal's verdict is settled, one at a time and in order, while the stream holds the
//! call: a verdict that must wait (a human review) waits there, and the stream with it.

use super::answer::Answering;
use crate::inspect::proposal::{refusal_text, Call, Ruling};
use crate::model::{
    Action, Change, Decision, Mode, Outcome, Phase, Reason, RequestSummary, Verdict,
};

/// The rulings on `calls`, in order.
pub(crate) async fn rule(ans: &Answering, calls: &[Call]) -> Vec<Ruling> {
    let mut rulings = Vec::with_capacity(calls.len());
    for call in calls {
        rulings.push(rule_one(ans, call).await);
    }
    rulings
}

async fn rule_one(ans: &Answering, call: &Call) -> Ruling {
    let mut action = ans.request.clone();
    action.proposal = Some(call.proposal.clone());
    let decision = decide(ans, &action).await;
    if decision.matched_rules.is_empty() && decision.verdict == Verdict::Allow {
        return Ruling::Pass;
    }
    let (ruling, decision, changes) = carry_out(ans, call, decision);
    let blocked = matches!(ruling, Ruling::Refuse(_));
    let outcome = Outcome::of(&decision, blocked, None);
    let tool = call.proposal.tool.clone();
    if !ans
        .record(
            Phase::Proposal,
            decision,
            summary(ans, call, changes),
            outcome,
        )
        .await
    {
        // What was not recorded is not passed on.
        return Ruling::Refuse(refusal_text(
            &tool,
            "the enforcer could not record this tool call",
        ));
    }
    ruling
}

/// The decision on one proposal Action. The hook for verdicts that wait: a review would be awaited here, before the
/// call is released; the stream holding it waits too (its hold bound still applies).
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
    // A proposal is not held for a person's answer (yet): an enforced review refuses it, saying so.
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
