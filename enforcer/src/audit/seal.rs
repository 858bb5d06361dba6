//! The seal thread: what happens to a log file once the writer has rotated away from it and synced it. It is
//! compressed with zstd (`audit-<seq>.jsonl` → `audit-<seq>.jsonl.zst`, written to a `.tmp` file, synced, renamed,
//! then the plain file removed), and retention deletes the oldest sealed files while the trail is over
//! `max_total_bytes` or their records are older than `max_age`.
//!
//! Retention never deletes silently: it first appends a retention record to the chain naming the files, their seq
//! range, the hash of the last record deleted and the reason, waits until a signed checkpoint covers that record, and
//! only then deletes. `verify` accepts a trail that starts after record 0 only when such a signed record accounts for
//! exactly the records that are missing (docs/audit.md, "Retention").

use std::fs::{self, File, OpenOptions};
use std::io::{Read as _, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::read::{compressed_name, first_line, list_files, LogFile};
use super::record::{encode_retention, parse_line, DeletedFile, Retention, RetentionReason};
use super::recover::sync_dir;
use super::writer::Shared;
use super::AuditError;

/// zstd level 1: about 10x on audit records at several hundred MB/s (docs/audit.md, "Compression").
const LEVEL: i32 = 1;
/// How often retention looks at the trail when no file is sealed (ages pass without new files).
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// From the sync thread: a file it has rotated away from, trimmed and synced.
pub(crate) enum SealMsg {
    Sealed { path: PathBuf, first_seq: u64 },
}

pub(crate) struct Sealer {
    shared: Arc<Shared>,
    rx: Receiver<SealMsg>,
    stop: Arc<AtomicBool>,
}

impl Sealer {
    pub fn new(shared: Arc<Shared>, rx: Receiver<SealMsg>, stop: Arc<AtomicBool>) -> Sealer {
        Sealer { shared, rx, stop }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Compress `initial` (sealed files found on open), then every file the sync thread seals, and apply retention
    /// after each and every minute. Returns when the sync thread stops it.
    pub fn run(self, initial: Vec<LogFile>) {
        for f in initial {
            self.compress(&f.path, f.first_seq);
        }
        self.retention();
        let every = self.shared.cfg.max_age.map_or(RETENTION_EVERY, |a| {
            (a / 4).clamp(Duration::from_millis(100), RETENTION_EVERY)
        });
        loop {
            if self.stopping() {
                return;
            }
            match self.rx.recv_timeout(every) {
                Ok(SealMsg::Sealed { path, first_seq }) => self.compress(&path, first_seq),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if self.stopping() {
                return;
            }
            self.retention();
        }
    }

    fn compress(&self, plain: &std::path::Path, first_seq: u64) {
        if !self.shared.cfg.compress || self.stopping() {
            return;
        }
        match self.try_compress(plain, first_seq) {
            Ok(true) => tracing::debug!(file = %plain.display(), "audit log file compressed"),
            Ok(false) => {}
            Err(e) => tracing::warn!(file = %plain.display(), error = %e,
                "could not compress a sealed audit log file; it stays uncompressed"),
        }
    }

    /// `Ok(false)` when stopped half way (the `.tmp` file is removed).
    fn try_compress(&self, plain: &std::path::Path, first_seq: u64) -> Result<bool, AuditError> {
        let dir = &self.shared.cfg.dir;
        let target = dir.join(compressed_name(first_seq));
        let mut tmp_name = target.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let mut src = File::open(plain).map_err(|e| AuditError::io(plain, e))?;
        let out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| AuditError::io(&tmp, e))?;
        let io = |e| AuditError::io(&tmp, e);
        let mut enc = zstd::stream::write::Encoder::new(out, LEVEL).map_err(io)?;
        enc.include_checksum(true).map_err(io)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            if self.stopping() {
                drop(enc);
                let _ = fs::remove_file(&tmp);
                return Ok(false);
            }
            let n = src.read(&mut buf).map_err(|e| AuditError::io(plain, e))?;
            if n == 0 {
                break;
            }
            enc.write_all(&buf[..n]).map_err(io)?;
        }
        let out = enc.finish().map_err(io)?;
        out.sync_all().map_err(io)?;
        drop(out);
        fs::rename(&tmp, &target).map_err(|e| AuditError::io(&target, e))?;
        sync_dir(dir)?;
        fs::remove_file(plain).map_err(|e| AuditError::io(plain, e))?;
        sync_dir(dir)?;
        Ok(true)
    }

    fn retention(&self) {
        let cfg = &self.shared.cfg;
        if cfg.max_total_bytes == 0 && cfg.max_age.is_none() {
            return;
        }
        if let Err(e) = self.try_retention() {
            tracing::warn!(error = %e, "audit retention could not run; it tries again later");
        }
    }

    fn try_retention(&self) -> Result<(), AuditError> {
        let cfg = &self.shared.cfg;
        let files = list_files(&cfg.dir)?;
        let unsealed = self.shared.unsealed_from();
        // Only sealed files are candidates; the file after each gives its last seq.
        let candidates = files.iter().take_while(|f| f.first_seq < unsealed).count();
        let mut delete = 0;
        if let Some(max_age) = cfg.max_age {
            let cutoff = OffsetDateTime::now_utc() - max_age;
            while delete < candidates {
                // Every record of a file is older than the first record of the file after it.
                match first_ts(&files[delete + 1])? {
                    Some(ts) if ts < cutoff => delete += 1,
                    _ => break,
                }
            }
            self.delete(&files, delete, RetentionReason::MaxAge)?;
        }
        if cfg.max_total_bytes > 0 {
            let sizes: Vec<u64> = files[..candidates]
                .iter()
                .map(|f| fs::metadata(&f.path).map_or(0, |m| m.len()))
                .collect();
            // The files not sealed yet count at the size they may grow to, so the trail stays within the bound
            // until the next file is sealed and retention runs again.
            let reserve = (files.len() - candidates) as u64 * cfg.rotate_bytes;
            let mut total: u64 = sizes[delete..].iter().sum::<u64>() + reserve;
            let start = delete;
            while delete < candidates && total > cfg.max_total_bytes {
                total -= sizes[delete];
                delete += 1;
            }
            self.delete(&files[start..], delete - start, RetentionReason::MaxBytes)?;
        }
        Ok(())
    }

    /// Record, sign, then delete `files[..n]`.
    fn delete(
        &self,
        files: &[LogFile],
        n: usize,
        reason: RetentionReason,
    ) -> Result<(), AuditError> {
        if n == 0 || self.stopping() {
            return Ok(());
        }
        let kept = &files[n];
        let Some(first) = first_line(kept)? else {
            return Ok(());
        };
        let head = parse_line(&first).map_err(|why| AuditError::Damaged {
            path: kept.path.display().to_string(),
            why: why.to_string(),
        })?;
        let deleted: Vec<DeletedFile> = files[..n]
            .iter()
            .zip(&files[1..=n])
            .map(|(f, next)| DeletedFile {
                file: f
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                first_seq: f.first_seq,
                last_seq: next.first_seq - 1,
                bytes: fs::metadata(&f.path).map_or(0, |m| m.len()),
            })
            .collect();
        let record = Retention {
            reason,
            first_seq: files[0].first_seq,
            last_seq: head.seq - 1,
            last_hash: hex::encode(head.prev),
            kept_from: head.seq,
            deleted,
        };
        let (seq, _) = self.shared.append(&encode_retention(&record)?, false)?;
        if !self.shared.sign_through(seq) {
            return Ok(());
        }
        for f in &files[..n] {
            fs::remove_file(&f.path).map_err(|e| AuditError::io(&f.path, e))?;
        }
        sync_dir(&self.shared.cfg.dir)?;
        let bytes: u64 = record.deleted.iter().map(|d| d.bytes).sum();
        tracing::info!(
            files = n,
            first_seq = record.first_seq,
            last_seq = record.last_seq,
            bytes,
            reason = reason.as_str(),
            record = seq,
            "audit retention deleted old files"
        );
        Ok(())
    }
}

/// The time of a file's first record.
fn first_ts(file: &LogFile) -> Result<Option<OffsetDateTime>, AuditError> {
    let Some(line) = first_line(file)? else {
        return Ok(None);
    };
    Ok(super::record::parse_entry(&line)
        .ok()
        .and_then(|e| OffsetDateTime::parse(e.ts(), &Rfc3339).ok()))
}
