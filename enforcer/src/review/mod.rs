//! Human review: the exchanges a `review` verdict holds until a person approves or denies them, or the review's
//! timeout passes and its fallback verdict applies. Owns the table of pending reviews, the waiting, and the ways a
//! person answers — `enforcer review approve|deny ID` over the control socket, and the signed links the optional
//! webhook ([`webhook`]) hands out. Knows nothing of HTTP exchanges or the audit trail: the phase that holds an
//! exchange writes its held record, calls [`Reviews::hold`], waits on the [`Held`] and records how it ended.
//!
//! A review's id is the seq of its held record, so the trail links the two records without a second numbering.
//! The table is bounded ([`ReviewSettings::max_pending`]); a [`Held`] that is dropped (the client went away)
//! withdraws its review.
//!
//! Holding a proposal works the same way (the response phases call the same API, `proxy::hold::proposal`): build a
//! [`Pending`] (`phase: proposal`, `proposal_tool`), [`Reviews::hold`] it, keep the stream alive while
//! [`Held::wait`] runs (server-sent events: a comment line every 15 s), then pass it on or answer it as a block.

mod webhook;

pub mod cli;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::model::{Agent, Approver, Phase, RequestSummary, Verdict};

pub use webhook::{serve_links, Webhook, WebhookSettings};

/// The `review:` section of the daemon configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReviewSettings {
    /// Reviews pending at once; an exchange beyond it gets its review's fallback verdict at once
    /// (`review_unavailable`).
    pub max_pending: usize,
    /// Where summaries of new reviews are POSTed, and where the signed approve/deny links are served.
    pub webhook: Option<WebhookSettings>,
}

impl Default for ReviewSettings {
    fn default() -> Self {
        ReviewSettings {
            max_pending: 256,
            webhook: None,
        }
    }
}

/// What a reviewer sees of a held exchange: names, sizes and digests as the audit record has them (host and path
/// scrubbed of detector hits), never a body, a header value or a secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    /// The review's id: the seq of the held record.
    pub id: u64,
    pub phase: Phase,
    /// RFC 3339 UTC.
    pub held_at: String,
    /// When the fallback applies, RFC 3339 UTC.
    pub deadline: String,
    pub timeout_secs: u64,
    pub fallback: Verdict,
    /// The review rule.
    pub rule: Option<String>,
    /// Every matching rule.
    pub matched: Vec<String>,
    /// The rule's message.
    pub message: Option<String>,
    pub agent: Agent,
    pub request: RequestSummary,
    /// The tool a held proposal calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proposal_tool: Option<String>,
}

/// A person's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub approved: bool,
    pub by: Approver,
    pub reason: Option<String>,
    pub at: SystemTime,
}

/// How a held review ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Answered(Answer),
    /// Nobody answered before the deadline.
    TimedOut(SystemTime),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReviewError {
    #[error("{0} reviews are pending, the most allowed (review.max_pending)")]
    Full(usize),
    #[error("no pending review {0} (answered already, timed out, or its client went away)")]
    NotPending(u64),
    #[error("a reason is at most {MAX_REASON} characters")]
    ReasonTooLong,
}

/// The longest reason an approver may give (it goes into the audit trail).
pub const MAX_REASON: usize = 1000;

struct Entry {
    pending: Pending,
    answer: oneshot::Sender<Answer>,
}

/// The pending reviews.
pub struct Reviews {
    table: Mutex<BTreeMap<u64, Entry>>,
    max_pending: usize,
    webhook: Option<Arc<Webhook>>,
}

impl std::fmt::Debug for Reviews {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reviews")
            .field("pending", &self.lock().len())
            .finish()
    }
}

impl Reviews {
    pub fn new(max_pending: usize, webhook: Option<Arc<Webhook>>) -> Arc<Reviews> {
        Arc::new(Reviews {
            table: Mutex::new(BTreeMap::new()),
            max_pending,
            webhook,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Entry>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether one more review can be held now.
    pub fn has_room(&self) -> bool {
        self.lock().len() < self.max_pending
    }

    /// Hold `pending` until it is answered or its deadline passes; announce it to the webhook, if one is set.
    pub fn hold(self: &Arc<Self>, pending: Pending) -> Result<Held, ReviewError> {
        let (tx, rx) = oneshot::channel();
        let id = pending.id;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(pending.timeout_secs);
        {
            let mut table = self.lock();
            if table.len() >= self.max_pending {
                return Err(ReviewError::Full(table.len()));
            }
            table.insert(
                id,
                Entry {
                    pending: pending.clone(),
                    answer: tx,
                },
            );
        }
        tracing::info!(review = id, rule = ?pending.rule, "exchange held for review");
        if let Some(webhook) = &self.webhook {
            let webhook = webhook.clone();
            tokio::spawn(async move { webhook.announce(&pending).await });
        }
        Ok(Held {
            reviews: self.clone(),
            id,
            rx: Some(rx),
            deadline,
        })
    }

    /// Answer review `id`: the held exchange goes on (approved) or is refused (denied).
    pub fn answer(
        &self,
        id: u64,
        approved: bool,
        by: Approver,
        reason: Option<String>,
    ) -> Result<Pending, ReviewError> {
        if reason
            .as_ref()
            .is_some_and(|r| r.chars().count() > MAX_REASON)
        {
            return Err(ReviewError::ReasonTooLong);
        }
        let entry = self.lock().remove(&id).ok_or(ReviewError::NotPending(id))?;
        tracing::info!(review = id, approved, by = ?by, "review answered");
        let answer = Answer {
            approved,
            by,
            reason,
            at: SystemTime::now(),
        };
        // The exchange may have gone in between: then nobody waits for the answer.
        let _ = entry.answer.send(answer);
        Ok(entry.pending)
    }

    /// Every pending review, oldest first.
    pub fn list(&self) -> Vec<Pending> {
        self.lock().values().map(|e| e.pending.clone()).collect()
    }

    /// One pending review.
    pub fn get(&self, id: u64) -> Option<Pending> {
        self.lock().get(&id).map(|e| e.pending.clone())
    }

    fn withdraw(&self, id: u64) -> bool {
        self.lock().remove(&id).is_some()
    }
}

/// A review being waited for. Dropping it withdraws the review (nobody can answer it any more).
pub struct Held {
    reviews: Arc<Reviews>,
    id: u64,
    rx: Option<oneshot::Receiver<Answer>>,
    deadline: tokio::time::Instant,
}

impl Held {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Wait for the answer or the deadline, whichever comes first.
    pub async fn wait(mut self) -> Resolution {
        let Some(mut rx) = self.rx.take() else {
            return Resolution::TimedOut(SystemTime::now());
        };
        tokio::select! {
            answer = &mut rx => match answer {
                Ok(a) => Resolution::Answered(a),
                Err(_) => Resolution::TimedOut(SystemTime::now()),
            },
            () = tokio::time::sleep_until(self.deadline) => {
                if self.reviews.withdraw(self.id) {
                    tracing::info!(review = self.id, "review timed out");
                    Resolution::TimedOut(SystemTime::now())
                } else {
                    // Answered just as the deadline passed: the answer is already sent.
                    match rx.await {
                        Ok(a) => Resolution::Answered(a),
                        Err(_) => Resolution::TimedOut(SystemTime::now()),
                    }
                }
            }
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.reviews.withdraw(self.id) {
            tracing::info!(review = self.id, "review withdrawn: the exchange went away");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Verdict;

    fn pending(id: u64, timeout_secs: u64) -> Pending {
        Pending {
            id,
            phase: Phase::Request,
            held_at: String::new(),
            deadline: String::new(),
            timeout_secs,
            fallback: Verdict::Block,
            rule: Some("r".into()),
            matched: vec!["r".into()],
            message: None,
            agent: Agent::default(),
            request: RequestSummary::default(),
            proposal_tool: None,
        }
    }

    fn cli() -> Approver {
        Approver::Cli {
            uid: 0,
            name: Some("root".into()),
        }
    }

    #[tokio::test]
    async fn an_answer_reaches_the_waiter_once() {
        let reviews = Reviews::new(4, None);
        let held = reviews.hold(pending(7, 60)).unwrap();
        assert_eq!(reviews.list().len(), 1);
        let waiter = tokio::spawn(held.wait());
        reviews
            .answer(7, false, cli(), Some("not today".into()))
            .unwrap();
        let Resolution::Answered(a) = waiter.await.unwrap() else {
            panic!("not answered");
        };
        assert!(!a.approved);
        assert_eq!(a.reason.as_deref(), Some("not today"));
        assert_eq!(
            reviews.answer(7, true, cli(), None),
            Err(ReviewError::NotPending(7))
        );
        assert!(reviews.list().is_empty());
    }

    #[tokio::test]
    async fn the_deadline_withdraws_the_review() {
        let reviews = Reviews::new(4, None);
        let held = reviews.hold(pending(8, 1)).unwrap();
        assert!(matches!(held.wait().await, Resolution::TimedOut(_)));
        assert!(reviews.get(8).is_none());
        assert!(reviews.answer(8, true, cli(), None).is_err());
    }

    #[tokio::test]
    async fn the_table_is_bounded_and_a_dropped_hold_withdraws() {
        let reviews = Reviews::new(1, None);
        let held = reviews.hold(pending(1, 60)).unwrap();
        assert!(!reviews.has_room());
        assert_eq!(
            reviews.hold(pending(2, 60)).err(),
            Some(ReviewError::Full(1))
        );
        drop(held);
        assert!(reviews.has_room());
        assert!(reviews.answer(1, true, cli(), None).is_err());
    }
}
