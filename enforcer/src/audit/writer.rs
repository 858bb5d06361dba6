//! The single writer: recovery of the trail's tail on open, then one dedicated thread that drains the request channel,
//! appends every pending record with one `write`, makes the batch durable with one `fsync` (group commit), answers
//! every waiter, rotates files by size and emits signed checkpoints every N records or T seconds.
//!
//! A thread rather than a tokio task: every batch ends in a blocking `fsync`, and a thread of its own keeps that off
//! the runtime's workers without a `spawn_blocking` hop per batch.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Instant;

use tokio::sync::oneshot;

use super::checkpoint::{self, Checkpoint, Signer, Syslog, CHECKPOINT_FILE};
use super::read::{file_name, list_files};
use super::record::{compose, parse_line, GENESIS};
use super::{AuditConfig, AuditError};

/// Most records written in one batch.
const MAX_BATCH: usize = 4096;

pub(crate) enum Msg {
    Record {
        event: Vec<u8>,
        reply: oneshot::Sender<Result<u64, AuditError>>,
    },
    Close(oneshot::Sender<Result<(), AuditError>>),
}

/// UTC now as RFC 3339 with microseconds, e.g. `2026-11-26T23:18:55.123456Z`.
pub(crate) fn now_ts() -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&fmt)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00.000000Z"))
}

fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| AuditError::io(dir, e))
}

fn open_log(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| AuditError::io(path, e))
}

/// Move `data[from..]` of `path` aside to `<path>.torn-<ts>` and cut the file back to `from`.
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

/// The seq and hash of the last line of `data` (which ends in `\n`), if it is a whole record.
fn last_record(data: &[u8]) -> Option<(u64, [u8; 32])> {
    let body = data.strip_suffix(b"\n")?;
    let start = body.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let p = parse_line(&body[start..]).ok()?;
    (p.computed() == p.hash).then_some((p.seq, p.hash))
}

/// Where the chain stands after recovery.
struct Tail {
    /// The file to append to and its length.
    file: Option<(PathBuf, u64)>,
    next_seq: u64,
    prev: [u8; 32],
}

/// Recover the last log file: a torn final line (no `\n`, or a last line that is not a whole record with a correct
/// hash) is moved aside. Empty trailing files are removed. Returns where the chain continues.
fn recover_log(dir: &Path) -> Result<Tail, AuditError> {
    let mut files = list_files(dir)?;
    while let Some((first, path)) = files.pop() {
        let data = fs::read(&path).map_err(|e| AuditError::io(&path, e))?;
        let end = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut keep = end;
        let mut last = None;
        if end > 0 {
            let start = data[..end - 1]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            match parse_line(&data[start..end - 1]) {
                Ok(p) if p.computed() == p.hash => last = Some((p.seq, p.hash)),
                // Only the final line can be torn; it goes aside with whatever follows it.
                _ => keep = start,
            }
        }
        if keep < data.len() {
            move_aside(&path, &data, keep)?;
        }
        if keep == 0 {
            if files.is_empty() {
                // The only file, now empty: reuse it when its name fits the start of the chain.
                if first == 0 {
                    return Ok(Tail {
                        file: Some((path, 0)),
                        next_seq: 0,
                        prev: GENESIS,
                    });
                }
            }
            fs::remove_file(&path).map_err(|e| AuditError::io(&path, e))?;
            continue;
        }
        let last = match last {
            Some(l) => l,
            // The bad final line went aside; the one before it must be a whole record.
            None => last_record(&data[..keep]).ok_or_else(|| AuditError::Corrupt {
                path: path.display().to_string(),
            })?,
        };
        let (seq, hash) = last;
        return Ok(Tail {
            file: Some((path, keep as u64)),
            next_seq: seq + 1,
            prev: hash,
        });
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
    file_len: u64,
    next_seq: u64,
    prev: [u8; 32],
    /// Seq of the last signed record, if any.
    signed: Option<u64>,
    last_checkpoint: Instant,
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
        let tail = recover_log(&cfg.dir)?;
        let cp_path = cfg.dir.join(CHECKPOINT_FILE);
        let signed = recover_checkpoints(&cp_path)?;
        if let Some(s) = signed {
            if tail.next_seq <= s {
                return Err(AuditError::BehindCheckpoint {
                    checkpoint: s,
                    next: tail.next_seq,
                });
            }
        }
        let (path, len) = match tail.file {
            Some(f) => f,
            None => (cfg.dir.join(file_name(tail.next_seq)), 0),
        };
        let file = open_log(&path)?;
        sync_dir(&cfg.dir)?;
        let checkpoints = checkpoint::open_append(&cp_path)?;
        let mut w = Writer {
            syslog: Syslog::new(cfg.syslog),
            cfg,
            signer,
            file,
            file_len: len,
            next_seq: tail.next_seq,
            prev: tail.prev,
            signed,
            last_checkpoint: Instant::now(),
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
        self.last_checkpoint = Instant::now();
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

    fn rotate(&mut self) -> Result<(), AuditError> {
        let path = self.cfg.dir.join(file_name(self.next_seq));
        self.file
            .sync_data()
            .map_err(|e| AuditError::io(&path, e))?;
        self.file = open_log(&path)?;
        sync_dir(&self.cfg.dir)?;
        self.file_len = 0;
        tracing::debug!(file = %path.display(), "audit log rotated");
        Ok(())
    }

    fn flush(&mut self) -> Result<(), AuditError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let res = self.file.write_all(&self.buf).and_then(|()| {
            if self.cfg.durable {
                self.file.sync_data()
            } else {
                Ok(())
            }
        });
        self.file_len += self.buf.len() as u64;
        self.buf.clear();
        res.map_err(|e| AuditError::io(&self.cfg.dir, e))
    }

    /// Write one batch; returns the seq given to each record, in order.
    fn write_batch(&mut self, events: &[Vec<u8>]) -> Result<Vec<u64>, AuditError> {
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
                let due = self.last_checkpoint + self.cfg.checkpoint_interval;
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
                let due = self
                    .signed
                    .map_or(self.next_seq, |s| self.next_seq.saturating_sub(s + 1))
                    >= self.cfg.checkpoint_every;
                if due && !self.failed {
                    self.checkpoint_or_fail();
                }
            }
            if let Some(reply) = close {
                let res = if self.failed {
                    Err(AuditError::Failed)
                } else {
                    self.checkpoint()
                };
                // Release the directory before answering, so a caller may reopen it at once.
                drop(rx);
                drop(lock);
                let _ = reply.send(res);
                return;
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
