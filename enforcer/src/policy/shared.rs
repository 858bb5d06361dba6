//! The policy in force, shared by every connection and replaceable while the daemon runs (`SIGHUP`, see
//! docs/policy.md). A request takes a snapshot ([`SharedPolicy::current`]) when it starts and is decided entirely
//! under it; [`SharedPolicy::replace`] swaps the policy atomically for requests that start afterwards. The lock is
//! held only to clone or swap an `Arc`, never across an evaluation or an await.

use std::sync::{Arc, PoisonError, RwLock};

use super::Policy;

pub struct SharedPolicy {
    current: RwLock<Arc<Policy>>,
}

impl SharedPolicy {
    pub fn new(policy: Policy) -> SharedPolicy {
        SharedPolicy {
            current: RwLock::new(Arc::new(policy)),
        }
    }

    /// The policy in force now; it stays valid (and unchanged) for as long as the caller holds it.
    pub fn current(&self) -> Arc<Policy> {
        // Nothing can panic while the lock is held, so a poisoned lock still holds a whole policy.
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Put `policy` in force for every later [`current`](Self::current); returns the one it replaces.
    pub fn replace(&self, policy: Policy) -> Arc<Policy> {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        std::mem::replace(&mut *current, Arc::new(policy))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Verdict;

    fn policy(default: &str) -> Policy {
        Policy::from_yaml(&format!("version: 1\ndefault: {default}\n"), "test.yaml").unwrap()
    }

    #[test]
    fn replace_swaps_for_later_snapshots_only() {
        let shared = SharedPolicy::new(policy("block"));
        let before = shared.current();
        let old = shared.replace(policy("allow"));
        assert_eq!(old.hash(), before.hash());
        // A snapshot taken before the swap keeps deciding under the old policy.
        assert_eq!(before.default_verdict(), Verdict::Block);
        assert_eq!(shared.current().default_verdict(), Verdict::Allow);
        assert_ne!(shared.current().hash(), before.hash());
    }
}
