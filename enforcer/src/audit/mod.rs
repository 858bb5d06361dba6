//! The audit trail: an append-only, hash-chained, durably written log of every security decision, with signed
//! checkpoints, and the verifier and readers for it. The only sink for security decisions; knows nothing of how
//! decisions are made. The on-disk format is specified in docs/audit.md.
//!
//! - [`record`]: the line layout and the hash chain.
//! - `writer`: recovery on open and the single group-committing writer thread (rotation, checkpoints).
//! - [`checkpoint`]: the Ed25519 key, signed checkpoint lines, the syslog copy.
//! - [`verify`]: the verifier; [`read`]: tail, follow and query.
//! - [`cli`]: `enforcer audit verify|tail|query`.

#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod cli;
pub mod read;
pub mod record;
pub mod verify;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use crate::model::AuditEvent;

pub use checkpoint::PublicKey;
pub use record::Record;
pub use verify::{verify, Problem, VerifyReport};

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
    #[error("the audit writer failed to write and refuses further records until restarted")]
    Failed,
    #[error("could not encode an audit record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("could not generate the audit signing key")]
    KeyGen,
    #[error("{path} is not a usable Ed25519 key")]
    BadKey { path: String },
    #[error("another process holds the audit log in {path}")]
    Locked { path: String },
    #[error("the audit log ends before record {checkpoint}, which a checkpoint signs (next seq would be {next}): the log was truncated; run `enforcer audit verify`")]
    BehindCheckpoint { checkpoint: u64, next: u64 },
}

impl AuditError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> AuditError {
        AuditError::Io {
            path: path.display().to_string(),
            source,
        }
    }
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

/// Handle to the running writer; clone it freely. When the last clone is dropped the writer signs what is unsigned
/// and stops; [`AuditLog::close`] does the same and waits for it.
#[derive(Debug, Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    tx: mpsc::Sender<writer::Msg>,
    dir: PathBuf,
}

impl AuditLog {
    /// Open (or create) the trail in `cfg.dir`, recover from a torn tail and start the writer.
    pub async fn open(cfg: AuditConfig) -> Result<AuditLog, AuditError> {
        let dir = cfg.dir.clone();
        let (w, lock) = tokio::task::spawn_blocking(move || writer::Writer::open(cfg))
            .await
            .map_err(|_| AuditError::Closed)??;
        tracing::info!(dir = %dir.display(), next_seq = w.next_seq(), "audit log open");
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || w.run(rx, lock))
            .map_err(|e| AuditError::io(&dir, e))?;
        Ok(AuditLog {
            inner: Arc::new(Inner { tx, dir }),
        })
    }

    /// The directory the trail lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Append one record; returns its `seq` once it is durable.
    pub async fn record(&self, event: AuditEvent) -> Result<u64, AuditError> {
        let event = record::encode_event(&event)?;
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(writer::Msg::Record { event, reply })
            .map_err(|_| AuditError::Closed)?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// Flush, write a final checkpoint and stop the writer. Records sent afterwards fail with
    /// [`AuditError::Closed`]; closing twice is fine.
    pub async fn close(&self) -> Result<(), AuditError> {
        let (reply, rx) = oneshot::channel();
        if self.inner.tx.send(writer::Msg::Close(reply)).is_err() {
            return Ok(());
        }
        rx.await.unwrap_or(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handle_is_cheap_to_share() {
        fn shareable<T: Send + Sync + Clone + 'static>() {}
        shareable::<AuditLog>();
        assert!(std::mem::size_of::<AuditLog>() <= std::mem::size_of::<usize>());
    }
}
