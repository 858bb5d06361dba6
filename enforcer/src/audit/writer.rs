//! The single writer: recovery of the trail's tail on open, then one dedicated thread that drains the request channel,
//! appends every pending record with one `write`, makes the batch durable with one `fsync` (group commit), answers
//! every waiter, rotates files by size and emits signed checkpoints every N records or T seconds.
//!
//! A thread rather than a tokio task: every batch ends in a blocking `fsync`, and a thread of its own keeps that off
//! the runtime's workers without a `spawn_blocking` hop per batch.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Instant;

use tokio::sync::oneshot;

use super::checkpoint::{self, Checkpoint, Signer, Syslog, CHECKPOINT_FILE};
use super::read::{content_len, file_name, list_files, whole_lines};
use super::record::{compose, parse_line, GENESIS};
use super::{AuditConfig, AuditError};

/// Most records written in one batch.
const MAX_BATCH: usize = 4096;
/// Largest step by which a log file's NUL padding grows ahead of its records.
const PREALLOCATE: u64 = 8 * 1024 * 1024;

pub(crate) enum Msg {
    Record {
        event: Vec<u8>,
        reply: oneshot::Sender<Result<u64, AuditError>>,
    },
    Close(oneshot::Sender<Result<(), AuditError>>),
}

/// UTC now as RFC 3339 with microseconds, e.g. `2026-11-26T23:18:55.123456Z`.
pub(crate) fn now_ts() -> String {
    super::record::rfc3339(std::time::SystemTime::now())
}

fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| AuditError::io(dir, e))
}

fn open_log(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| AuditError::io(path, e))
}

/// Move `data[from..]` of `path` aside to `<path>.torn-<ts>` and cut the file back to `from` (also dropping anything
/// after `data`, such as NUL padding).
fn move_aside(path: &Path, data: &[u8], from: usize) -> Result<PathBuf, AuditError> {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".torn-{}", now_ts().replace(':', "")));
    let aside = PathBuf::from(name);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&aside)
        .map_err(|e| AuditError::io(&aside, e))?;
    f.write_all(&data[from..])
        .and_then(|()| f.sync_all())
        .map_err(|e| AuditError::io(&aside, e))?;
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| AuditError::io(path, e))?;
    f.set_len(from as u64)
        .and_then(|()| f.sync_all())
        .map_err(|e| AuditError::io(path, e))?;
    tracing::warn!(
        file = %path.display(),
        aside = %aside.display(),
        bytes = data.len() - from,
        "audit log ended in a torn line; moved it aside"
    );
    Ok(aside)
}

/// Where the chain stands after recovery.
struct Tail {
    /// The file to append to and its length.
    file: Option<(PathBuf, u64)>,
    next_seq: u64,
    prev: [u8; 32],
}

/// The longest prefix of `data` made of whole records, each with a correct hash, consecutive seqs and linked to the
/// one before: its length and the seq and hash of its last record.
fn valid_prefix(data: &[u8]) -> (usize, Option<(u64, [u8; 32])>) {
    let mut keep = 0;
    let mut last: Option<(u64, [u8; 32])> = None;
    for line in whole_lines(data) {
        let Ok(p) = parse_line(line) else { break };
        if p.computed() != p.hash {
            break;
        }
        if let Some((seq, hash)) = last {
            if p.seq != seq + 1 || p.prev != hash {
                break;
            }
        }
        last = Some((p.seq, p.hash));
        keep += line.len() + 1;
    }
    (keep, last)
}

/// Recover the last log file. A crash can leave an incomplete tail: bytes that were written but never synced
/// (and so never acknowledged), possibly with gaps of NULs. Everything after the last record of the file's valid
/// prefix is moved aside, NUL padding is cut off, and empty trailing files are removed. Nothing is touched if that
/// would remove a record a checkpoint signs (`signed`): that is tampering, not a crash.
fn recover_log(dir: &Path, signed: Option<u64>) -> Result<Tail, AuditError> {
    let mut files = list_files(dir)?;
    while let Some((first, path)) = files.pop() {
        let data = fs::read(&path).map_err(|e| AuditError::io(&path, e))?;
        let end = content_len(&data);
        let (keep, last) = valid_prefix(&data[..end]);
        let next = last.map_or(first, |(seq, _)| seq + 1);
        if let Some(s) = signed.filter(|&s| s >= next) {
            return Err(AuditError::BehindCheckpoint {
                checkpoint: s,
                next,
            });
        }
        if keep < end {
            move_aside(&path, &data[..end], keep)?;
        } else if end < data.len() {
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| AuditError::io(&path, e))?;
            f.set_len(end as u64)
                .and_then(|()| f.sync_all())
                .map_err(|e| AuditError::io(&path, e))?;
        }
        match last {
            Some((seq, hash)) => {
                return Ok(Tail {
                    file: Some((path, keep as u64)),
                    next_seq: seq + 1,
                    prev: hash,
                })
            }
            // The only file, now empty: reuse it when its name fits the start of the chain.
            None if files.is_empty() && first == 0 => {
                return Ok(Tail {
                    file: Some((path, 0)),
                    next_seq: 0,
                    prev: GENESIS,
                })
            }
            None => fs::remove_file(&path).map_err(|e| AuditError::io(&path, e))?,
        }
    }
    Ok(Tail {
        file: None,
        next_seq: 0,
        prev: GENESIS,
    })
}

/// Recover `checkpoints.jsonl` (move a torn tail aside) and return the seq of its last checkpoint.
fn recover_checkpoints(path: &Path) -> Result<Option<u64>, AuditError> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(AuditError::io(path, e)),
    };
    let end = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut keep = end;
    let mut last = None;
    if end > 0 {
        let start = data[..end - 1]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        match Checkpoint::parse(&data[start..end - 1]) {
            Ok(cp) => last = Some(cp.seq),
            Err(_) => keep = start,
        }
    }
    if keep < data.len() {
        move_aside(path, &data, keep)?;
    }
    if last.is_none() && keep > 0 {
        let body = &data[..keep - 1];
        let start = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        last = Checkpoint::parse(&body[start..]).ok().map(|cp| cp.seq);
    }
    Ok(last)
}

pub(crate) struct Writer {
    cfg: AuditConfig,
    signer: Signer,
    syslog: Syslog,
    file: File,
    /// Bytes of records in `file`.
    file_len: u64,
    /// Size of `file` on disk: records, then NUL padding written ahead of them.
    allocated: u64,
    next_seq: u64,
    prev: [u8; 32],
    /// Seq of the last signed record, if any.
    signed: Option<u64>,
    /// When the oldest record not yet covered by a checkpoint was written.
    unsigned_since: Instant,
    checkpoints: File,
    buf: Vec<u8>,
    /// The writer hit an I/O error: the file's tail is unknown, so nothing more is written until restart.
    failed: bool,
}

impl Writer {
    /// Create the directory, load or create the key, recover the tail and sign what recovery found unsigned.
    pub fn open(cfg: AuditConfig) -> Result<(Writer, File), AuditError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cfg.dir)
            .map_err(|e| AuditError::io(&cfg.dir, e))?;
        let lock_path = cfg.dir.join("audit.lock");
        let lock = open_log(&lock_path)?;
        lock.try_lock().map_err(|_| AuditError::Locked {
            path: cfg.dir.display().to_string(),
        })?;
        let signer = Signer::load_or_create(&cfg.dir)?;
        let cp_path = cfg.dir.join(CHECKPOINT_FILE);
        let signed = recover_checkpoints(&cp_path)?;
        let tail = recover_log(&cfg.dir, signed)?;
        let (path, len) = match tail.file {
            Some(f) => f,
            None => (cfg.dir.join(file_name(tail.next_seq)), 0),
        };
        let file = open_log(&path)?;
        let checkpoints = checkpoint::open_append(&cp_path)?;
        // New files (key, log, checkpoints, anything moved aside) exist durably from here on.
        sync_dir(&cfg.dir)?;
        let mut w = Writer {
            syslog: Syslog::new(cfg.syslog),
            cfg,
            signer,
            file,
            file_len: len,
            allocated: len,
            next_seq: tail.next_seq,
            prev: tail.prev,
            signed,
            unsigned_since: Instant::now(),
            checkpoints,
            buf: Vec::with_capacity(1 << 16),
            failed: false,
        };
        w.checkpoint()?;
        tracing::info!(key = %w.signer.public.key_id(), "audit signing key loaded");
        Ok((w, lock))
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn unsigned(&self) -> bool {
        match (self.next_seq, self.signed) {
            (0, _) => false,
            (n, Some(s)) => n - 1 > s,
            (_, None) => true,
        }
    }

    /// Sign the last record if it is not signed yet. The log is synced first so a checkpoint never covers data
    /// that could still be lost.
    fn checkpoint(&mut self) -> Result<(), AuditError> {
        if !self.unsigned() {
            return Ok(());
        }
        let cp_path = self.cfg.dir.join(CHECKPOINT_FILE);
        self.file
            .sync_data()
            .map_err(|e| AuditError::io(&self.cfg.dir, e))?;
        let seq = self.next_seq - 1;
        let line = self.signer.line(seq, &self.prev, &now_ts());
        self.checkpoints
            .write_all(&line)
            .and_then(|()| self.checkpoints.sync_data())
            .map_err(|e| AuditError::io(&cp_path, e))?;
        self.signed = Some(seq);
        self.syslog.send(&line);
        Ok(())
    }

    /// Cut the current file's padding so a finished file holds records only.
    fn finish_file(&mut self) -> Result<(), AuditError> {
        if self.allocated > self.file_len {
            self.file
                .set_len(self.file_len)
                .map_err(|e| AuditError::io(&self.cfg.dir, e))?;
            self.allocated = self.file_len;
        }
        self.file
            .sync_data()
            .map_err(|e| AuditError::io(&self.cfg.dir, e))
    }

    fn rotate(&mut self) -> Result<(), AuditError> {
        self.finish_file()?;
        let path = self.cfg.dir.join(file_name(self.next_seq));
        self.file = open_log(&path)?;
        sync_dir(&self.cfg.dir)?;
        self.file_len = 0;
        self.allocated = 0;
        tracing::debug!(file = %path.display(), "audit log rotated");
        Ok(())
    }

    /// Make sure the file extends to `len` bytes, writing NULs ahead in large steps. Overwriting allocated blocks
    /// makes the per-batch `fdatasync` a data-only flush; appending would also commit the size change each time.
    fn preallocate(&mut self, len: u64) -> std::io::Result<()> {
        if len <= self.allocated {
            return Ok(());
        }
        let step = self.cfg.rotate_bytes.clamp(64 * 1024, PREALLOCATE);
        let target = len.div_ceil(step) * step;
        let zeros = vec![0u8; 256 * 1024];
        let mut at = self.allocated;
        while at < target {
            let n = (target - at).min(zeros.len() as u64);
            self.file.write_all_at(&zeros[..n as usize], at)?;
            at += n;
        }
        self.file.sync_data()?;
        self.allocated = target;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), AuditError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let end = self.file_len + self.buf.len() as u64;
        let res = self
            .preallocate(end)
            .and_then(|()| self.file.write_all_at(&self.buf, self.file_len))
            .and_then(|()| {
                if self.cfg.durable {
                    self.file.sync_data()
                } else {
                    Ok(())
                }
            });
        self.file_len = end;
        self.buf.clear();
        res.map_err(|e| AuditError::io(&self.cfg.dir, e))
    }

    /// Write one batch; returns the seq given to each record, in order.
    fn write_batch(&mut self, events: &[Vec<u8>]) -> Result<Vec<u64>, AuditError> {
        if !self.unsigned() {
            self.unsigned_since = Instant::now();
        }
        let mut seqs = Vec::with_capacity(events.len());
        for event in events {
            let start = self.buf.len();
            let ts = now_ts();
            let seq = self.next_seq;
            let hash = compose(&mut self.buf, seq, &ts, &self.prev, event);
            let pending = self.file_len + self.buf.len() as u64;
            if pending > self.cfg.rotate_bytes && self.file_len + (start as u64) > 0 {
                let line = self.buf.split_off(start);
                self.flush()?;
                self.rotate()?;
                self.buf = line;
            }
            self.prev = hash;
            self.next_seq += 1;
            seqs.push(seq);
        }
        self.flush()?;
        Ok(seqs)
    }

    /// The writer thread's loop: runs until `Close` or until every handle is dropped.
    pub fn run(mut self, rx: Receiver<Msg>, lock: File) {
        let mut events = Vec::new();
        let mut replies = Vec::new();
        loop {
            let first = if self.unsigned() {
                let due = self.unsigned_since + self.cfg.checkpoint_interval;
                match rx.recv_timeout(due.saturating_duration_since(Instant::now())) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => {
                        self.checkpoint_or_fail();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => None,
                }
            } else {
                rx.recv().ok()
            };
            let Some(first) = first else {
                self.checkpoint_or_fail();
                self.finish_or_log();
                return;
            };
            let mut close = None;
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Record { event, reply } => {
                        events.push(event);
                        replies.push(reply);
                    }
                    Msg::Close(reply) => {
                        close = Some(reply);
                        break;
                    }
                }
                if events.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if !events.is_empty() {
                let result = if self.failed {
                    Err(AuditError::Failed)
                } else {
                    self.write_batch(&events)
                };
                match result {
                    Ok(seqs) => {
                        for (reply, seq) in replies.drain(..).zip(seqs) {
                            let _ = reply.send(Ok(seq));
                        }
                    }
                    Err(e) => {
                        if !self.failed {
                            tracing::error!(error = %e, "audit write failed; refusing further records");
                        }
                        self.failed = true;
                        for reply in replies.drain(..) {
                            let _ = reply.send(Err(AuditError::Failed));
                        }
                    }
                }
                events.clear();
                // Due when the records crossed a multiple of `checkpoint_every` since the last checkpoint, and at
                // once for a trail's first records, so `verify` on a fresh live log has a checkpoint to check.
                let every = self.cfg.checkpoint_every.max(1);
                let due = self
                    .signed
                    .is_none_or(|s| self.next_seq / every > (s + 1) / every);
                if due && !self.failed {
                    self.checkpoint_or_fail();
                }
            }
            if let Some(reply) = close {
                let res = if self.failed {
                    Err(AuditError::Failed)
                } else {
                    self.checkpoint().and_then(|()| self.finish_file())
                };
                // Release the directory before answering, so a caller may reopen it at once.
                drop(rx);
                drop(lock);
                let _ = reply.send(res);
                return;
            }
        }
    }

    fn finish_or_log(&mut self) {
        if !self.failed {
            if let Err(e) = self.finish_file() {
                tracing::error!(error = %e, "could not finish the audit log file");
            }
        }
    }

    fn checkpoint_or_fail(&mut self) {
        if self.failed {
            return;
        }
        if let Err(e) = self.checkpoint() {
            tracing::error!(error = %e, "audit checkpoint failed; refusing further records");
            self.failed = true;
        }
    }
}
