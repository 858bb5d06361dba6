//! Per-rule rate limits: a token bucket per (rule, `by` key values), refilled continuously at `requests / per`.
//! The buckets live behind a `Mutex` that is only held for one map operation (evaluation is synchronous), and the
//! table is bounded: when it grows past its cap, buckets that have refilled completely (each by its own rule's
//! capacity and rate) are forgotten first, and a request needing a bucket the table still has no room for is over
//! the limit — to a look (another reading of a request) as to a take.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::Action;

/// Upper bound on live buckets before idle ones are pruned.
const MAX_BUCKETS: usize = 65_536;

/// What a rate limit is keyed by (besides the rule itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    Profile,
    Host,
    Rule,
    Tool,
}

impl By {
    pub fn parse(s: &str) -> Option<By> {
        match s {
            "profile" => Some(By::Profile),
            "host" => Some(By::Host),
            "rule" => Some(By::Rule),
            "tool" => Some(By::Tool),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RateLimit {
    pub requests: u32,
    pub per: Duration,
    pub by: Vec<By>,
}

/// Whether a decision takes a token from the buckets it meets, or only looks whether one is there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokens {
    Take,
    Look,
}

/// One bucket, with its own rule's capacity and refill rate (tokens per second), so the table can tell a refilled
/// bucket of any rule.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
    capacity: f64,
    rate: f64,
}

impl Bucket {
    /// The tokens the bucket holds at `now`.
    fn refilled(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * self.rate).min(self.capacity)
    }
}

#[derive(Debug, Default)]
pub struct Limiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Limiter {
    /// Take one token for `rule` under `limit` (with [`Tokens::Look`], only look whether there is one); `false` when
    /// the bucket is empty (over the limit), or when it is not in the table and the table has no room for it even
    /// once the buckets that have refilled completely are forgotten (fail closed: a look says what a take would).
    pub fn admit(
        &self,
        rule: usize,
        limit: &RateLimit,
        action: &Action,
        now: Instant,
        tokens: Tokens,
    ) -> bool {
        let key = key(rule, limit, action);
        let capacity = f64::from(limit.requests);
        let rate = capacity / limit.per.as_secs_f64().max(f64::MIN_POSITIVE);
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&key) {
            // A bucket that has refilled completely is as good as none: forgetting it changes no decision.
            buckets.retain(|_, b| b.refilled(now) < b.capacity);
            if buckets.len() >= MAX_BUCKETS {
                // Every bucket is busy: refuse rather than grow without bound.
                return false;
            }
        }
        if tokens == Tokens::Look {
            return buckets.get(&key).is_none_or(|b| b.refilled(now) >= 1.0);
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: capacity,
            last: now,
            capacity,
            rate,
        });
        bucket.tokens = bucket.refilled(now);
        bucket.last = bucket.last.max(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn key(rule: usize, limit: &RateLimit, action: &Action) -> String {
    let mut k = rule.to_string();
    for by in &limit.by {
        k.push('\0');
        let part = match by {
            By::Profile => action.agent.profile.as_deref(),
            By::Host => action.transport.host.as_deref(),
            By::Rule => None,
            // The MCP tool a request calls, or the tool a model proposes (a proposal rule's Action).
            By::Tool => action
                .mcp
                .as_ref()
                .and_then(|m| m.tool.as_deref())
                .or(action.proposal.as_ref().map(|p| p.tool.as_str())),
        };
        if let Some(p) = part {
            k.push_str(&p.to_ascii_lowercase());
        }
    }
    k
}

/// `30s`, `1m`, `1h`, `1d`, `500ms` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let d = match unit.trim() {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(n.checked_mul(60)?),
        "h" => Duration::from_secs(n.checked_mul(3600)?),
        "d" => Duration::from_secs(n.checked_mul(86_400)?),
        _ => return None,
    };
    (!d.is_zero()).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_over_time() {
        let limiter = Limiter::default();
        let limit = RateLimit {
            requests: 2,
            per: Duration::from_secs(10),
            by: vec![By::Host],
        };
        let action = Action::default();
        let t0 = Instant::now();
        assert!(limiter.admit(0, &limit, &action, t0, Tokens::Take));
        assert!(limiter.admit(0, &limit, &action, t0, Tokens::Take));
        assert!(!limiter.admit(0, &limit, &action, t0, Tokens::Take));
        assert!(
            limiter.admit(1, &limit, &action, t0, Tokens::Take),
            "other rules have their own bucket"
        );
        assert!(limiter.admit(
            0,
            &limit,
            &action,
            t0 + Duration::from_secs(5),
            Tokens::Take
        ));
        assert!(!limiter.admit(
            0,
            &limit,
            &action,
            t0 + Duration::from_secs(5),
            Tokens::Take
        ));
        // Looking takes nothing: the bucket that refills one token says yes to each look, then to one take.
        let t1 = t0 + Duration::from_secs(10);
        assert!(limiter.admit(0, &limit, &action, t1, Tokens::Look));
        assert!(limiter.admit(0, &limit, &action, t1, Tokens::Look));
        assert!(limiter.admit(2, &limit, &action, t1, Tokens::Look));
        assert!(limiter.admit(0, &limit, &action, t1, Tokens::Take));
    }

    /// Before, a `by: [tool]` limit keyed only MCP tool calls: every tool a model proposed shared one bucket, so
    /// calls of one tool used up the limit of all. Each proposed tool has its own now.
    #[test]
    fn proposed_tools_have_a_bucket_each() {
        let limiter = Limiter::default();
        let limit = RateLimit {
            requests: 1,
            per: Duration::from_secs(60),
            by: vec![By::Tool],
        };
        let proposing = |tool: &str| Action {
            proposal: Some(crate::model::Proposal {
                tool: tool.into(),
                kind: "function".into(),
                ..Default::default()
            }),
            ..Action::default()
        };
        let t0 = Instant::now();
        assert!(limiter.admit(0, &limit, &proposing("shell"), t0, Tokens::Take));
        assert!(!limiter.admit(0, &limit, &proposing("shell"), t0, Tokens::Take));
        assert!(limiter.admit(0, &limit, &proposing("read_file"), t0, Tokens::Take));
        assert!(!limiter.admit(0, &limit, &proposing("Read_File"), t0, Tokens::Take));
    }

    /// An action to `host` (the key of a `by: [host]` limit).
    fn to_host(host: String) -> Action {
        let mut a = Action::default();
        a.transport.host = Some(host);
        a
    }

    /// The table filled with `MAX_BUCKETS` buckets of rule 0 (`limit`), none refilled at `t0`.
    fn full_table(limiter: &Limiter, limit: &RateLimit, t0: Instant) {
        for i in 0..MAX_BUCKETS {
            assert!(limiter.admit(0, limit, &to_host(format!("h{i}")), t0, Tokens::Take));
        }
    }

    /// A full table refuses a new bucket (fail closed), and a look at one says what a take would: no. Before, a look
    /// at a key the table had no room for said yes, so another reading of a request passed where the decision
    /// enforced was refused.
    #[test]
    fn a_full_table_refuses_a_new_bucket_to_a_look_as_to_a_take() {
        let limiter = Limiter::default();
        let limit = RateLimit {
            requests: 2,
            per: Duration::from_secs(3600),
            by: vec![By::Host],
        };
        let t0 = Instant::now();
        full_table(&limiter, &limit, t0);
        let new = to_host("new".into());
        assert!(!limiter.admit(0, &limit, &new, t0, Tokens::Look));
        assert!(!limiter.admit(0, &limit, &new, t0, Tokens::Take));
        assert!(!limiter.admit(1, &limit, &new, t0, Tokens::Look));
        // A bucket already in the table is looked at and taken from as ever (one token left of two).
        let known = to_host("h7".into());
        assert!(limiter.admit(0, &limit, &known, t0, Tokens::Look));
        assert!(limiter.admit(0, &limit, &known, t0, Tokens::Take));
        assert!(!limiter.admit(0, &limit, &known, t0, Tokens::Look));
        // Once the buckets have refilled they are forgotten, for a look as for a take: room again.
        let later = t0 + Duration::from_secs(3600);
        assert!(limiter.admit(0, &limit, &new, later, Tokens::Look));
        assert!(limiter.admit(0, &limit, &new, later, Tokens::Take));
    }

    /// Each bucket is pruned by its own rule's capacity and rate: another rule's faster refill does not make a busy
    /// bucket look refilled. Before, the table was pruned with the capacity and rate of the rule asking for room, so
    /// a rule of 1 per second forgot an hour-long limit's exhausted buckets, and they admitted again at once.
    #[test]
    fn buckets_are_pruned_by_their_own_rate() {
        let limiter = Limiter::default();
        let slow = RateLimit {
            requests: 1,
            per: Duration::from_secs(3600),
            by: vec![By::Host],
        };
        let fast = RateLimit {
            requests: 1,
            per: Duration::from_secs(1),
            by: vec![By::Host],
        };
        let t0 = Instant::now();
        full_table(&limiter, &slow, t0);
        let t1 = t0 + Duration::from_secs(10);
        assert!(!limiter.admit(1, &fast, &to_host("new".into()), t1, Tokens::Take));
        assert!(!limiter.admit(0, &slow, &to_host("h0".into()), t1, Tokens::Take));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_duration("1w"), None);
        assert_eq!(parse_duration("m"), None);
    }
}
