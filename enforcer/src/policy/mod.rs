//! The policy engine: loads a YAML policy straight into its compiled form and answers one [`Decision`] per
//! [`Action`]. Pure and synchronous apart from rate-limit counters. Owns the policy language; knows nothing of
//! sockets, TLS or the audit trail.
//!
//! SCAFFOLD: the API below is the contract the other stages code against; the engine replaces the bodies.

pub mod cli;

use std::path::Path;

use crate::model::{Action, Decision, Mode, Reason, Verdict};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A loaded, compiled policy. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Policy {
    hash: String,
}

impl Policy {
    /// Load and compile a policy file. A policy either loads whole or not at all.
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let src = std::fs::read_to_string(path).map_err(|source| PolicyError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&src, &path.display().to_string())
    }

    /// Compile a policy from YAML text; `origin` names it in errors (usually the file path).
    pub fn from_yaml(src: &str, _origin: &str) -> Result<Policy, PolicyError> {
        use sha2::Digest;
        Ok(Policy {
            hash: hex::encode(sha2::Sha256::digest(src.as_bytes())),
        })
    }

    /// Decide one action.
    pub fn evaluate(&self, _action: &Action) -> Decision {
        Decision {
            verdict: Verdict::Block,
            deciding_rule: None,
            matched_rules: Vec::new(),
            reason: Reason::Default,
            message: None,
            rewrites: Vec::new(),
            mode: Mode::Enforce,
            policy_hash: self.hash.clone(),
        }
    }

    /// Hex SHA-256 of the policy source.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The largest request body the proxy buffers for inspection; larger bodies are refused.
    pub fn max_body_bytes(&self) -> u64 {
        4 * 1024 * 1024
    }
}
