//! The audit trail: an append-only, hash-chained log of every security decision, with signed checkpoints, sealed
//! files compressed and old ones pruned by retention, and the verifier and readers for it. The only sink for security
//! decisions; knows nothing of how decisions are made. The on-disk format and the crash semantics are specified in
//! docs/audit.md.
//!
//! Writing a record is two steps, so the `fdatasync` is never on a request's path: [`AuditLog::append`] puts the record
//! in the file (it then survives the daemon being killed) and [`Appended::durable`] waits until an `fdatasync` covering
//! it has completed (it then survives a power cut). The proxy forwards after the first and answers the agent after the
//! second.
//!
//! - [`record`]: the line layout and the hash chain.
//! - `writer`: recovery on open, the append path (callers' threads, under a short mutex) and the sync thread (group
//!   commit, rotation, checkpoints, health).
//! - `seal`: compression of rotated files and retention.
//! - [`checkpoint`]: the Ed25519 key, signed checkpoint lines, the syslog copy.
//! - [`ship`]: every record and checkpoint shipped to a central collector (RFC 5424 over TLS), never blocking.
//! - [`fleet`]: `audit verify` of a collected, multi-host file.
//! - [`verify`]: the verifier; [`read`]: tail, follow and query.
//! - [`cli`]: `enforcer audit verify|tail|query`.

#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod cli;
pub mod fleet;
pub mod read;
pub mod record;
mod recover;
mod seal;
pub mod ship;
pub mod verify;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::model::AuditEvent;

pub use checkpoint::PublicKey;
pub use record::Record;
pub use ship::{ShipConfig, ShipStatus};
pub use verify::{verify, Problem, VerifyReport};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file operation failed. From [`AuditLog::append`]: this record could not be written (for example
    /// `ENOSPC`); nothing of it is in the trail and the next append tries again.
    #[error("audit log {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The record is in the file but the `fdatasync` that should have made it durable failed: a power cut could
    /// still lose it. The writer keeps the record and retries; the caller must treat the action as unrecorded.
    #[error("audit record {seq} was written but could not be made durable: {source}")]
    NotDurable {
        seq: u64,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Records are refused while the trail cannot be made durable (an `fdatasync` or checkpoint keeps failing).
    #[error("the audit trail cannot take records: {source}")]
    Unavailable {
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("the audit writer has stopped")]
    Closed,
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
    #[error("audit.max_total_bytes ({max_total_bytes}) must be 0 (no limit) or at least twice audit.rotate_bytes ({rotate_bytes}): the current file and the one being sealed are never deleted")]
    RetentionTooSmall {
        max_total_bytes: u64,
        rotate_bytes: u64,
    },
    #[error("{path} is damaged: {why}; run `enforcer audit verify`")]
    Damaged { path: String, why: String },
    #[error(transparent)]
    Ship(#[from] ship::ShipError),
}

impl AuditError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> AuditError {
        AuditError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// The default bound on the trail's files on disk (`max_total_bytes`): 4 GiB, about 50 million compressed records.
pub const DEFAULT_MAX_TOTAL_BYTES: u64 = 4 << 30;

/// Where and how the trail is written. The daemon fills it from the `audit:` section of its configuration
/// ([`crate::config::AuditSettings`]).
#[derive(Debug, Clone)]
pub struct AuditConfig {
    pub dir: PathBuf,
    /// Rotate to a new file once the current one would exceed this many bytes.
    pub rotate_bytes: u64,
    /// Emit a signed checkpoint every this many records ...
    pub checkpoint_every: u64,
    /// ... or after this much time with unsigned records, whichever comes first.
    pub checkpoint_interval: Duration,
    /// `fdatasync` before [`Appended::durable`] resolves (default true). With `false` it resolves at once: records
    /// survive the daemon being killed but not a power cut.
    pub durable: bool,
    /// Also send checkpoints to syslog/journald.
    pub syslog: bool,
    /// Compress rotated files with zstd (`audit-<seq>.jsonl.zst`).
    pub compress: bool,
    /// Delete the oldest rotated files so the trail's files stay within this many bytes on disk, counting the files
    /// not sealed yet at `rotate_bytes` each (0: no limit; otherwise at least `2 * rotate_bytes`). The current file
    /// is never deleted.
    pub max_total_bytes: u64,
    /// Delete rotated files whose newest record is older than this (`None`: no limit).
    pub max_age: Option<Duration>,
    /// Ship every record and checkpoint to a central collector ([`ship`]); `None`: local only.
    pub ship: Option<ShipConfig>,
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
            compress: true,
            max_total_bytes: DEFAULT_MAX_TOTAL_BYTES,
            max_age: None,
            ship: None,
        }
    }
}

/// Whether the trail takes records. Watch it with [`AuditLog::health`]: it changes only when the state does.
#[derive(Debug, Clone)]
pub enum Health {
    /// Records are written and made durable.
    Healthy,
    /// The last append could not be written (`write(2)` failed, e.g. `ENOSPC`): appends fail with
    /// [`AuditError::Io`]; each one tries again, and the first that succeeds makes the trail healthy.
    WriteFailing(Arc<std::io::Error>),
    /// The last `fdatasync` (or checkpoint) failed: appends fail with [`AuditError::Unavailable`] while the writer
    /// rewrites the unsynced records and retries with a backoff of up to a second.
    SyncFailing(Arc<std::io::Error>),
    /// The writer has stopped ([`AuditLog::close`]).
    Closed,
}

impl Health {
    pub fn is_healthy(&self) -> bool {
        matches!(self, Health::Healthy)
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Health::Healthy => write!(f, "healthy"),
            Health::WriteFailing(e) => write!(f, "audit records cannot be written: {e}"),
            Health::SyncFailing(e) => write!(f, "audit records cannot be made durable: {e}"),
            Health::Closed => write!(f, "the audit writer has stopped"),
        }
    }
}

/// Handle to the running writer; clone it freely. When the last clone is dropped the writer syncs, signs what is
/// unsigned and stops; [`AuditLog::close`] does the same and waits for it.
#[derive(Debug, Clone)]
pub struct AuditLog {
    inner: Arc<writer::Handle>,
}

/// A record that is in the trail's file (page cache): it survives the daemon being killed. Await
/// [`Appended::durable`] before letting anyone see the result of the action it records.
#[derive(Debug)]
#[must_use = "a record is not durable until `durable()` resolves"]
pub struct Appended {
    seq: u64,
    wait: writer::DurableWait,
    at: std::time::Instant,
}

impl Appended {
    /// The record's `seq`.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// When its bytes reached the file: where the wait for durability starts.
    pub fn appended_at(&self) -> std::time::Instant {
        self.at
    }

    /// Resolves with the record's `seq` once an `fdatasync` that covers it has completed (at once with
    /// `durable: false`). Many records share one `fdatasync`; the sync thread wakes every waiter of the batch, each
    /// once, as soon as it completes. The sync runs whether or not this is awaited yet: await it after other work
    /// (the upstream's answer) and a record already durable costs no wake-up.
    ///
    /// Errors: [`AuditError::NotDurable`] when that `fdatasync` failed (the record stays in the file and the writer
    /// retries, but nothing may rely on it), [`AuditError::Closed`] when the writer stopped before syncing it.
    pub async fn durable(self) -> Result<u64, AuditError> {
        self.wait.wait(self.seq).await
    }
}

impl AuditLog {
    /// Open (or create) the trail in `cfg.dir`, recover from a crash (torn tail, unsealed files) and start the sync
    /// and seal threads.
    pub async fn open(cfg: AuditConfig) -> Result<AuditLog, AuditError> {
        let handle = tokio::task::spawn_blocking(move || writer::Handle::open(cfg))
            .await
            .map_err(|_| AuditError::Closed)??;
        Ok(AuditLog {
            inner: Arc::new(handle),
        })
    }

    /// The directory the trail lives in.
    pub fn dir(&self) -> &Path {
        self.inner.dir()
    }

    /// Write one record to the trail's file and return once its bytes are there (assigned a `seq`, chained, one
    /// `write(2)` to the page cache): from then on it survives the daemon being killed. Never waits for the disk;
    /// blocks only for that `write(2)` under a short mutex (microseconds), and, when a file was rotated and the one
    /// before it is not sealed yet, for that file's final `fdatasync`.
    ///
    /// Errors: [`AuditError::Io`] when the write failed (nothing was appended; the file is cut back to the last
    /// record and the next append tries again), [`AuditError::Unavailable`] while `fdatasync` keeps failing,
    /// [`AuditError::Closed`] after [`AuditLog::close`], [`AuditError::Encode`] for an event that does not serialise.
    pub fn append(&self, event: &AuditEvent) -> Result<Appended, AuditError> {
        let body = record::encode_event(event)?;
        let (seq, wait) = self.inner.append(&body)?;
        Ok(Appended {
            seq,
            wait,
            at: std::time::Instant::now(),
        })
    }

    /// Record that the daemon tagged or untagged a cgroup ([`record::CgroupChange`]); returns once it is in the file.
    /// Errors as [`AuditLog::append`].
    pub fn append_cgroup(&self, change: &record::CgroupChange) -> Result<u64, AuditError> {
        let body = record::encode_cgroup(change)?;
        let (seq, _wait) = self.inner.append(&body)?;
        Ok(seq)
    }

    /// [`AuditLog::append`], then [`Appended::durable`]: returns the record's `seq` once it is durable.
    pub async fn record(&self, event: AuditEvent) -> Result<u64, AuditError> {
        self.append(&event)?.durable().await
    }

    /// Whether records are being taken right now.
    pub fn is_healthy(&self) -> bool {
        self.inner.health().borrow().is_healthy()
    }

    /// The writer's health, updated on every change of state (for readiness and `enforcer status`).
    pub fn health(&self) -> watch::Receiver<Health> {
        self.inner.health()
    }

    /// Shipping's state now (`None` when the trail is not shipped).
    pub fn shipping(&self) -> Option<ShipStatus> {
        self.inner.shipping().map(|p| p.status())
    }

    /// A handle that reads shipping's state later (metrics, status) without keeping the writer open.
    pub fn ship_probe(&self) -> Option<ship::ShipProbe> {
        self.inner.shipping()
    }

    /// Sync, write a final checkpoint, finish the current file and stop the threads. Records appended afterwards fail
    /// with [`AuditError::Closed`]; closing twice is fine.
    pub async fn close(&self) -> Result<(), AuditError> {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_handles_are_cheap_to_share() {
        fn shareable<T: Send + Sync + Clone + 'static>() {}
        fn sendable<T: Send + 'static>() {}
        shareable::<AuditLog>();
        sendable::<Appended>();
        assert!(std::mem::size_of::<AuditLog>() <= std::mem::size_of::<usize>());
    }
}
