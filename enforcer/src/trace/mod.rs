//! Retained traces: for decisions a `retain:` rule matches, the whole exchange — the request as the agent sent it
//! (credentials left out), the response with the model's reasoning text and tool calls — kept for forensics,
//! encrypted to an X25519 recipient in the age format (age-encryption.org/v1, the `age` crate). The daemon holds only
//! the recipient (the public key): it can write traces but never read them back; `enforcer trace show SEQ --identity
//! KEYFILE` decrypts one with the private key.
//!
//! Each trace is one file `trace-<SEQ>.age` (SEQ: the seq of the exchange's record, 20 digits) in the trace
//! directory (`<audit dir>/traces`, 0700, files 0600), and one audit record (`outcome.disposition: retained`,
//! `trace: {of, file, sha256, bytes, event: stored}`) whose digest of the encrypted file makes a swapped or altered
//! file visible to `enforcer audit verify`. The directory is bounded by age and total size; each deletion is recorded
//! first (`deleted`, `event: expired|over_size`) and then carried out. Owns the files and their format; the proxy
//! decides what to retain ([`Draft`]), the audit trail records it.

mod draft;

pub mod cli;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::model::{TraceEvent, TraceNote};

pub use draft::{attach, Draft, Tee};

/// The trace directory's name under the audit directory.
pub const DIR_NAME: &str = "traces";

/// `traces:` in the daemon configuration. Nothing is retained without a `recipient`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TraceSettings {
    /// The age X25519 recipient (`age1…`, the public key) traces are encrypted to.
    pub recipient: Option<String>,
    /// Default `<audit dir>/traces`.
    pub dir: Option<PathBuf>,
    /// The most of a response one trace keeps, in bytes; the rest is cut (the trace says so).
    pub max_trace_bytes: u64,
    /// The most all traces together may take; the oldest are deleted first beyond it.
    pub max_total_bytes: u64,
    /// Traces older than this many days are deleted.
    pub max_age_days: u64,
}

impl Default for TraceSettings {
    fn default() -> Self {
        TraceSettings {
            recipient: None,
            dir: None,
            max_trace_bytes: 8 * 1024 * 1024,
            max_total_bytes: 1024 * 1024 * 1024,
            max_age_days: 30,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("traces.recipient {0:?} is not an age X25519 recipient (age1…)")]
    Recipient(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("encrypting a trace: {0}")]
    Encrypt(String),
}

impl TraceError {
    fn io(path: &Path, source: std::io::Error) -> TraceError {
        TraceError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// The plaintext of a trace (JSON, then encrypted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    pub version: u32,
    /// The seq of the exchange's record.
    pub of: u64,
    /// When the trace was finished, RFC 3339 UTC.
    pub ts: String,
    pub agent: crate::model::Agent,
    pub decision: serde_json::Value,
    pub request: TracedRequest,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<TracedResponse>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TracedRequest {
    pub method: String,
    pub scheme: String,
    pub host: String,
    /// Path and query, as sent.
    pub target: String,
    /// Header fields, credentials (`authorization`, `x-api-key`, `cookie`, …) left out.
    pub headers: Vec<(String, String)>,
    /// The body as the enforcer inspected it (content-coding undone), as text; empty when [`Self::over_budget`].
    pub body: String,
    /// The proxy's buffer budget (`proxy.max_buffered_bytes`, the agent's share) could not hold the trace's copy of
    /// the body: it is left out. The exchange itself went on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub over_budget: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TracedResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// The body (content-coding undone when it could be), as text: JSON, or the server-sent event stream with the
    /// model's reasoning deltas and tool calls.
    pub body: String,
    /// The body was longer than `traces.max_trace_bytes` and is cut there, or the stream ended early.
    #[serde(default)]
    pub truncated: bool,
    /// The proxy's buffer budget could not hold more of the trace's copy of the body: it is cut where it stopped
    /// fitting (`truncated` too), or left out. The exchange itself went on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub over_budget: bool,
}

/// The trace directory: where traces are written, and their bounds.
pub struct TraceStore {
    dir: PathBuf,
    recipient: age::x25519::Recipient,
    settings: TraceSettings,
    /// Serialises writes and sweeps (a sweep reads the directory it prunes).
    lock: std::sync::Mutex<()>,
}

impl std::fmt::Debug for TraceStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TraceStore")
            .field("dir", &self.dir)
            .finish()
    }
}

impl TraceStore {
    /// The store `settings` describe (none without a recipient), its directory created 0700.
    pub fn open(
        settings: &TraceSettings,
        audit_dir: &Path,
    ) -> Result<Option<TraceStore>, TraceError> {
        use std::os::unix::fs::PermissionsExt;
        let Some(text) = &settings.recipient else {
            return Ok(None);
        };
        let recipient: age::x25519::Recipient = text
            .trim()
            .parse()
            .map_err(|_| TraceError::Recipient(text.clone()))?;
        let dir = settings
            .dir
            .clone()
            .unwrap_or_else(|| audit_dir.join(DIR_NAME));
        std::fs::create_dir_all(&dir).map_err(|e| TraceError::io(&dir, e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| TraceError::io(&dir, e))?;
        Ok(Some(TraceStore {
            dir,
            recipient,
            settings: settings.clone(),
            lock: std::sync::Mutex::new(()),
        }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The most of a response a trace keeps.
    pub fn max_trace_bytes(&self) -> usize {
        usize::try_from(self.settings.max_trace_bytes).unwrap_or(usize::MAX)
    }

    /// Whether a decision retained with this fraction is kept this time.
    pub fn sample(fraction: f64) -> bool {
        if fraction >= 1.0 {
            return true;
        }
        let mut b = [0u8; 8];
        if aws_lc_rs::rand::fill(&mut b).is_err() {
            return true;
        }
        (u64::from_be_bytes(b) as f64 / u64::MAX as f64) < fraction
    }

    /// Bytes writing `trace` holds at once beyond the trace itself, at most: its plaintext (JSON) and the encrypted
    /// file (the plaintext, a 16-byte tag per 64 KiB chunk and a header under 1 KiB: age-encryption.org/v1,
    /// STREAM). Measured without building the plaintext.
    pub(crate) fn write_bound(trace: &Trace) -> u64 {
        struct Count(u64);
        impl std::io::Write for Count {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0 += buf.len() as u64;
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut plain = Count(0);
        let _ = serde_json::to_writer(&mut plain, trace);
        let plain = plain.0;
        plain
            .saturating_mul(2)
            .saturating_add((plain / 65_536 + 1) * 16)
            .saturating_add(1024)
    }

    /// Encrypt `trace` and write it as the trace of record `trace.of` (durably); its note for the record.
    pub fn write(&self, trace: &Trace) -> Result<TraceNote, TraceError> {
        let plain = serde_json::to_vec(trace).map_err(|e| TraceError::Encrypt(e.to_string()))?;
        let sealed = age::encrypt(&self.recipient, &plain)
            .map_err(|e| TraceError::Encrypt(e.to_string()))?;
        let name = file_name(trace.of);
        let path = self.dir.join(&name);
        let _guard = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        write_new(&path, &sealed).map_err(|e| TraceError::io(&path, e))?;
        Ok(TraceNote {
            of: trace.of,
            file: name,
            sha256: hex::encode(sha2::Sha256::digest(&sealed)),
            bytes: sealed.len() as u64,
            event: TraceEvent::Stored,
        })
    }

    /// The traces the limits say must go, oldest first, each with its note (`expired` or `over_size`).
    pub fn over_limits(&self, now: SystemTime) -> Vec<TraceNote> {
        let _guard = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let max_age = Duration::from_secs(self.settings.max_age_days.saturating_mul(86_400));
        let mut files = self.files();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        let mut out = Vec::new();
        files.sort_by_key(|f| f.0);
        for (of, bytes, modified) in files {
            let expired = now.duration_since(modified).unwrap_or_default() > max_age;
            let over = total > self.settings.max_total_bytes;
            if !expired && !over {
                continue;
            }
            let name = file_name(of);
            let Ok(data) = std::fs::read(self.dir.join(&name)) else {
                continue;
            };
            total = total.saturating_sub(bytes);
            out.push(TraceNote {
                of,
                file: name,
                sha256: hex::encode(sha2::Sha256::digest(&data)),
                bytes,
                event: if expired {
                    TraceEvent::Expired
                } else {
                    TraceEvent::OverSize
                },
            });
        }
        out
    }

    /// Delete a trace whose deletion is recorded.
    pub fn delete(&self, note: &TraceNote) {
        let path = self.dir.join(&note.file);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(file = %note.file, error = %e, "could not delete a trace");
        }
    }

    /// Every trace file: (seq of its exchange, size, modification time).
    fn files(&self) -> Vec<(u64, u64, SystemTime)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let of = parse_file_name(e.file_name().to_str()?)?;
                let meta = e.metadata().ok()?;
                Some((of, meta.len(), meta.modified().ok()?))
            })
            .collect()
    }
}

/// `trace-<20 digits>.age`.
pub fn file_name(of: u64) -> String {
    format!("trace-{of:020}.age")
}

/// The exchange seq a trace file's name carries; `None` for any other name.
pub fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("trace-")?.strip_suffix(".age")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

fn write_new(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Record and carry out what the limits delete, every `every`, until `shutdown`.
pub async fn sweep(
    ctx: Arc<crate::proxy::ProxyContext>,
    store: Arc<TraceStore>,
    every: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = store.clone();
        let Ok(doomed) =
            tokio::task::spawn_blocking(move || s.over_limits(SystemTime::now())).await
        else {
            continue;
        };
        for note in doomed {
            // Recorded first: a deletion the trail does not show would look like tampering.
            if draft::record_deletion(&ctx, &note).await {
                store.delete(&note);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(of: u64) -> Trace {
        Trace {
            version: 1,
            of,
            ts: String::new(),
            agent: crate::model::Agent::default(),
            decision: serde_json::json!({"verdict": "log"}),
            request: TracedRequest {
                method: "POST".into(),
                scheme: "https".into(),
                host: "api.openai.com".into(),
                target: "/v1/responses".into(),
                headers: vec![],
                body: r#"{"input":"hi"}"#.into(),
                over_budget: false,
            },
            response: Some(TracedResponse {
                status: 200,
                headers: vec![],
                body: "reasoning: let me think".into(),
                truncated: false,
                over_budget: false,
            }),
        }
    }

    #[test]
    fn traces_open_with_the_identity_and_not_with_another() {
        let dir = tempfile::tempdir().unwrap();
        let identity = age::x25519::Identity::generate();
        let settings = TraceSettings {
            recipient: Some(identity.to_public().to_string()),
            ..TraceSettings::default()
        };
        let store = TraceStore::open(&settings, dir.path()).unwrap().unwrap();
        let note = store.write(&trace(7)).unwrap();
        assert_eq!(note.file, "trace-00000000000000000007.age");
        let sealed = std::fs::read(store.dir().join(&note.file)).unwrap();
        assert_eq!(hex::encode(sha2::Sha256::digest(&sealed)), note.sha256);
        assert!(!String::from_utf8_lossy(&sealed).contains("reasoning"));
        let plain = age::decrypt(&identity, &sealed).unwrap();
        let back: Trace = serde_json::from_slice(&plain).unwrap();
        assert_eq!(back, trace(7));
        assert!(age::decrypt(&age::x25519::Identity::generate(), &sealed).is_err());
    }

    #[test]
    fn limits_pick_the_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let identity = age::x25519::Identity::generate();
        let settings = TraceSettings {
            recipient: Some(identity.to_public().to_string()),
            max_total_bytes: 1,
            ..TraceSettings::default()
        };
        let store = TraceStore::open(&settings, dir.path()).unwrap().unwrap();
        for of in [3, 1, 2] {
            store.write(&trace(of)).unwrap();
        }
        let doomed = store.over_limits(SystemTime::now());
        assert_eq!(doomed.iter().map(|n| n.of).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(doomed.iter().all(|n| n.event == TraceEvent::OverSize));
        let later = SystemTime::now() + Duration::from_secs(31 * 86_400);
        let settings = TraceSettings {
            recipient: settings.recipient.clone(),
            ..TraceSettings::default()
        };
        let roomy = TraceStore::open(&settings, dir.path()).unwrap().unwrap();
        assert!(roomy.over_limits(SystemTime::now()).is_empty());
        assert!(roomy
            .over_limits(later)
            .iter()
            .all(|n| n.event == TraceEvent::Expired));
        assert_eq!(parse_file_name("trace-00000000000000000042.age"), Some(42));
        assert_eq!(parse_file_name("trace-../../etc.age"), None);
    }
}
