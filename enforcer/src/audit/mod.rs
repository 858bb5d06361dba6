//! The audit trail: an append-only, hash-chained, durably written log of every security decision, with signed
//! checkpoints, and the verifier and readers for it. The only sink for security decisions; knows nothing of how
//! decisions are made.
//!
//! SCAFFOLD: the API below is the contract the other stages code against; the writer replaces the bodies.

pub mod cli;

use std::path::PathBuf;
use std::time::Duration;

use crate::model::AuditEvent;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the audit writer has stopped")]
    Closed,
}

/// Where and how the trail is written.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub dir: PathBuf,
    /// Rotate to a new file once the current one exceeds this many bytes.
    pub rotate_bytes: u64,
    /// Emit a signed checkpoint every this many records ...
    pub checkpoint_every: u64,
    /// ... or after this much time with unsigned records, whichever comes first.
    pub checkpoint_interval: Duration,
    /// fsync before acknowledging a record (default true).
    pub durable: bool,
    /// Also send checkpoints to syslog/journald.
    pub syslog: bool,
}

impl AuditConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        AuditConfig {
            dir: dir.into(),
            rotate_bytes: 64 * 1024 * 1024,
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(10),
            durable: true,
            syslog: false,
        }
    }
}

/// Handle to the running writer; clone it freely.
#[derive(Debug, Clone)]
pub struct AuditLog {
    _dir: PathBuf,
}

impl AuditLog {
    /// Open (or create) the trail in `cfg.dir`, recover from a torn tail and start the writer.
    pub async fn open(cfg: AuditConfig) -> Result<AuditLog, AuditError> {
        Ok(AuditLog { _dir: cfg.dir })
    }

    /// Append one record; returns its `seq` once it is durable.
    pub async fn record(&self, _event: AuditEvent) -> Result<u64, AuditError> {
        Ok(0)
    }

    /// Flush, write a final checkpoint and stop the writer.
    pub async fn close(&self) -> Result<(), AuditError> {
        Ok(())
    }
}
