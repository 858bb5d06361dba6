//! How many queries the DNS stage handles at once, and for whom: every agent (the cgroup the origin lookup names)
//! has its own share of places, inside one overall bound, so an agent that floods the stage uses up its own share
//! and no one else's. A place is held from the decision until the answer is sent (including the wait for the
//! upstream), and given back when the [`Place`] drops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::model::Agent;

/// Idle agents' entries are swept once the table has this many.
const SWEEP_AT: usize = 256;

/// The shares of places in flight.
pub struct Admission {
    total: Arc<Semaphore>,
    places: usize,
    per_agent: usize,
    agents: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// One query's place: held while it is handled.
#[derive(Debug)]
pub struct Place {
    _agent: OwnedSemaphorePermit,
    _total: OwnedSemaphorePermit,
}

impl Admission {
    /// At most `total` queries at once, at most `per_agent` of them for any one agent (each at least 1).
    pub fn new(total: usize, per_agent: usize) -> Admission {
        Admission {
            total: Arc::new(Semaphore::new(total.max(1))),
            places: total.max(1),
            per_agent: per_agent.max(1),
            agents: Mutex::new(HashMap::new()),
        }
    }

    /// A place for `agent` now, or `None` when its share or the total is in use (UDP: the datagram is dropped and
    /// the client retries).
    pub fn try_admit(&self, agent: Option<&Agent>) -> Option<Place> {
        let own = self.share(agent).try_acquire_owned().ok()?;
        let total = self.total.clone().try_acquire_owned().ok()?;
        Some(Place {
            _agent: own,
            _total: total,
        })
    }

    /// A place for `agent`, waiting for one (TCP: the connection's next query waits, as backpressure).
    pub async fn admit(&self, agent: Option<&Agent>) -> Place {
        let share = self.share(agent);
        // The semaphores are never closed, so acquiring cannot fail; the fallback only keeps this total.
        let own = match share.acquire_owned().await {
            Ok(p) => p,
            Err(_) => return std::future::pending().await,
        };
        let total = match self.total.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return std::future::pending().await,
        };
        Place {
            _agent: own,
            _total: total,
        }
    }

    /// Whether more than half of `agent`'s share, or of the total, is in use: the proxy then gives new connections
    /// less time to send their request head.
    pub fn pressed(&self, agent: Option<&Agent>) -> bool {
        self.share(agent).available_permits() < self.per_agent.div_ceil(2)
            || self.total.available_permits() < self.places.div_ceil(2)
    }

    /// The semaphore of `agent`'s share, created on first use.
    fn share(&self, agent: Option<&Agent>) -> Arc<Semaphore> {
        let key = agent_key(agent);
        let mut agents = self.agents.lock().unwrap_or_else(PoisonError::into_inner);
        if agents.len() >= SWEEP_AT && !agents.contains_key(&key) {
            // An entry nobody holds a place of (only the table refers to it) is idle.
            agents.retain(|_, share| Arc::strong_count(share) > 1);
        }
        agents
            .entry(key)
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_agent)))
            .clone()
    }
}

/// Whose share a query takes: the agent's cgroup; else (cgroup unknown) its profile, then its process; queries
/// whose sender is unknown share one.
pub(crate) fn agent_key(agent: Option<&Agent>) -> String {
    match agent {
        Some(Agent {
            cgroup: Some(cgroup),
            ..
        }) => format!("cgroup:{cgroup}"),
        Some(Agent {
            profile: Some(profile),
            ..
        }) => format!("profile:{profile}"),
        Some(Agent { pid: Some(pid), .. }) => format!("pid:{pid}"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(cgroup: &str) -> Agent {
        Agent {
            cgroup: Some(cgroup.into()),
            profile: Some("p".into()),
            ..Agent::default()
        }
    }

    #[test]
    fn an_agent_over_its_share_does_not_take_anothers() {
        let admission = Admission::new(8, 3);
        let (a, b) = (agent("/a"), agent("/b"));
        let held: Vec<Place> = (0..3)
            .filter_map(|_| admission.try_admit(Some(&a)))
            .collect();
        assert_eq!(held.len(), 3);
        assert!(
            admission.try_admit(Some(&a)).is_none(),
            "a's share is used up"
        );
        let b_place = admission.try_admit(Some(&b));
        assert!(b_place.is_some(), "b still has its share");
        drop(held);
        assert!(admission.try_admit(Some(&a)).is_some(), "places come back");
        // Unknown senders share one pool.
        let unknown: Vec<Place> = (0..5).filter_map(|_| admission.try_admit(None)).collect();
        assert_eq!(unknown.len(), 3);
    }

    #[test]
    fn the_total_bounds_every_share() {
        let admission = Admission::new(4, 3);
        let held: Vec<Place> = ["/a", "/b", "/c"]
            .iter()
            .flat_map(|c| {
                let a = agent(c);
                (0..2)
                    .filter_map(|_| admission.try_admit(Some(&a)))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(held.len(), 4);
    }

    #[test]
    fn idle_agents_are_swept() {
        let admission = Admission::new(1, 1);
        for i in 0..(SWEEP_AT * 3) {
            drop(admission.try_admit(Some(&agent(&format!("/{i}")))));
        }
        let len = admission
            .agents
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        assert!(len <= SWEEP_AT, "{len} entries kept");
    }

    #[tokio::test]
    async fn admit_waits_for_a_place() {
        let admission = Arc::new(Admission::new(4, 1));
        let a = agent("/a");
        let first = admission.admit(Some(&a)).await;
        let waiting = {
            let (admission, a) = (admission.clone(), a.clone());
            tokio::spawn(async move { admission.admit(Some(&a)).await })
        };
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        drop(first);
        let second = tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await;
        assert!(matches!(second, Ok(Ok(_))));
    }
}
