//! The writer: appends on the callers' own threads, and one sync thread for everything that waits for the disk.
//!
//! An append takes the state mutex for a few microseconds: it assigns the record's `seq`, stamps and hashes it, and
//! writes the line to the current file with one `pwrite(2)` (page cache). A rotation (the current file is full) opens
//! the next file on the spot; the file left behind is sealed by the sync thread.
//!
//! The sync thread runs whenever there is unsynced data: it snapshots how far the files go, runs `fdatasync` outside
//! the mutex (the file rotated away from first, then the directory, then the current file) and then answers every
//! waiter the round covered, each exactly once (group commit: one `fdatasync` for all of them; a round that would
//! carry fewer records than the last one answered waits a moment for those writers to append again). Waiters are
//! queued in seq order as records are appended, so a round wakes only the records it made durable; a watch channel
//! that wakes every waiter on each round and lets the uncovered ones sleep again measured about 5% more CPU per record
//! in the proxy pattern (enforcer/benches/audit.rs). The sync thread also preallocates the current file ahead of its
//! records (so the `fdatasync` is a data-only flush), signs checkpoints, hands sealed files to the seal thread (`seal`)
//! and keeps the health state.
//!
//! Failures: an append whose write fails cuts the file back to the last record and returns the error; the next append
//! tries again. An `fdatasync` that fails fails the waiters of that batch, makes appends refuse until a retry succeeds,
//! and is retried with a backoff after the unsynced bytes are rewritten from memory (the kernel may have dropped the
//! dirty pages it could not write). Each change of state is logged once; a sync failure episode lasts until rounds
//! have succeeded for a whole backoff period, so a device that fails again as soon as it is retried logs once.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt as _, FileExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use super::checkpoint::{Signer, Syslog, CHECKPOINT_FILE};
use super::read::file_name;
use super::record::compose;
use super::recover::{
    clean_compression, now_ts, open_log, recover_checkpoints, recover_log, sealed_plain, sync_dir,
};
use super::seal::{SealMsg, Sealer};
use super::ship::{Kind, Shipper};
use super::{AuditConfig, AuditError, Health};

/// How far ahead of its records the current file is preallocated, in one step.
const PREALLOCATE: u64 = 8 * 1024 * 1024;
/// A new step starts when fewer than this many preallocated bytes are left.
const PREALLOCATE_LOW: u64 = 1024 * 1024;
/// Zeros written per mutex hold while preallocating.
const ZERO_CHUNK: usize = 256 * 1024;
/// Files smaller than this are not preallocated.
const PREALLOCATE_MIN_FILE: u64 = 1024 * 1024;
/// Longest a sync round waits for the writers the last round woke to append again (group commit).
const GATHER_MAX: Duration = Duration::from_micros(200);
/// Backoff between retries of a failed `fdatasync`.
const RETRY_FIRST: Duration = Duration::from_millis(10);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// What becomes of a record's `fdatasync`, sent to its waiter.
#[derive(Debug)]
pub(crate) enum Synced {
    Durable,
    Failed(Arc<std::io::Error>),
    /// The writer stopped first.
    Closed,
}

/// How [`super::Appended::durable`] waits.
#[derive(Debug)]
pub(crate) enum DurableWait {
    /// `durable: false`: nothing to wait for.
    Now,
    /// Answered once by the sync thread, when the round that covers the record ends.
    Sync(oneshot::Receiver<Synced>),
}

impl DurableWait {
    pub async fn wait(self, seq: u64) -> Result<u64, AuditError> {
        let DurableWait::Sync(rx) = self else {
            return Ok(seq);
        };
        match rx.await {
            Ok(Synced::Durable) => Ok(seq),
            Ok(Synced::Failed(source)) => Err(AuditError::NotDurable { seq, source }),
            Ok(Synced::Closed) | Err(_) => Err(AuditError::Closed),
        }
    }
}

/// A log file the writer has open.
#[derive(Debug)]
struct OpenFile {
    file: Arc<File>,
    path: PathBuf,
    first_seq: u64,
    /// Bytes of whole records.
    len: u64,
    /// Size on disk: records, then NUL padding written ahead of them.
    allocated: u64,
    /// End of the preallocation step in progress (zeros are written up to here before the next step starts).
    fill_to: u64,
    /// Bytes covered by a completed `fdatasync`.
    synced: u64,
    /// With `durable`, a copy of bytes `synced..len`, rewritten after a failed `fdatasync`.
    unsynced: Vec<u8>,
    /// Preallocation has not failed in this file.
    prealloc: bool,
}

impl OpenFile {
    fn open(
        path: PathBuf,
        first_seq: u64,
        len: u64,
        rotate_bytes: u64,
    ) -> Result<OpenFile, AuditError> {
        let file = open_log(&path)?;
        Ok(OpenFile {
            file: Arc::new(file),
            path,
            first_seq,
            len,
            allocated: len,
            fill_to: len,
            synced: len,
            unsynced: Vec::new(),
            prealloc: rotate_bytes >= PREALLOCATE_MIN_FILE,
        })
    }
}

struct State {
    current: OpenFile,
    /// The file rotated away from, until its final `fdatasync` (at most one: a rotation waits for it).
    sealing: Option<OpenFile>,
    next_seq: u64,
    prev: [u8; 32],
    /// A failed write may have left bytes after the last record that could not be cut: cut before the next write.
    cut_needed: bool,
    /// A file was created since the directory was last synced.
    dir_dirty: bool,
    /// The sync thread is writing zeros after `allocated` into the file whose first seq this is, outside the mutex:
    /// no append may write past `allocated` in that file until it is done.
    zeroing: Option<u64>,
    write_error: Option<Arc<std::io::Error>>,
    /// The last sync round failed: appends are refused until a retry succeeds.
    sync_error: Option<Arc<std::io::Error>>,
    /// When to retry after `sync_error`, and the next backoff.
    retry_at: Option<Instant>,
    backoff: Duration,
    /// A failure episode: from the first failed round until rounds have succeeded for a whole backoff period (so a
    /// device that fails again as soon as records are taken again is one episode, logged once).
    episode: Option<Arc<std::io::Error>>,
    /// Since when rounds have succeeded in the episode, and when to look again.
    ok_since: Option<Instant>,
    probe_at: Option<Instant>,
    /// Seq of the last signed record.
    signed: Option<u64>,
    /// When the oldest record not covered by a checkpoint was written.
    unsigned_since: Instant,
    /// A checkpoint is wanted that covers at least this seq (retention signs its record before deleting).
    checkpoint_wanted: Option<u64>,
    closing: bool,
    stopped: bool,
    close_replies: Vec<oneshot::Sender<Result<(), AuditError>>>,
    /// The sync thread is waiting for work.
    sync_idle: bool,
    /// Group commit: records appended since the last round's snapshot, how many the last round answered, until when
    /// the next round waits for as many to have arrived, and how long the last `fdatasync` took.
    appended_since: usize,
    gather_want: usize,
    gather_until: Option<Instant>,
    last_sync: Duration,
    /// Scratch for the line being composed.
    line: Vec<u8>,
    /// The waiters of records not durable yet, in seq order (appends push under the mutex, so in order).
    waiters: VecDeque<(u64, oneshot::Sender<Synced>)>,
}

impl State {
    fn unsigned(&self) -> bool {
        match (self.next_seq, self.signed) {
            (0, _) => false,
            (n, Some(s)) => n - 1 > s,
            (_, None) => true,
        }
    }

    fn health(&self) -> Health {
        if self.stopped {
            Health::Closed
        } else if let Some(e) = self.sync_error.as_ref().or(self.episode.as_ref()) {
            Health::SyncFailing(e.clone())
        } else if let Some(e) = &self.write_error {
            Health::WriteFailing(e.clone())
        } else {
            Health::Healthy
        }
    }

    fn file_mut(&mut self, path: &Path) -> Option<&mut OpenFile> {
        if self.current.path == path {
            Some(&mut self.current)
        } else {
            self.sealing.as_mut().filter(|f| f.path == path)
        }
    }
}

/// What the threads share.
pub(crate) struct Shared {
    pub cfg: AuditConfig,
    state: Mutex<State>,
    /// Wakes the sync thread.
    work: Condvar,
    /// Signalled after every sync round: rotations waiting for the previous file to be sealed, and the seal thread
    /// waiting for a checkpoint.
    progress: Condvar,
    health: watch::Sender<Health>,
    /// Ships each line as it is written (`cfg.ship`).
    ship: Option<Shipper>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("dir", &self.cfg.dir)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn checkpoint_due_by_count(&self, st: &State) -> bool {
        let every = self.cfg.checkpoint_every.max(1);
        st.next_seq > 0
            && st
                .signed
                .is_none_or(|s| st.next_seq / every > (s + 1) / every)
    }

    fn checkpoint_wanted(st: &State) -> bool {
        st.checkpoint_wanted
            .is_some_and(|w| w < st.next_seq && st.signed.is_none_or(|s| s < w))
    }

    fn preallocation_due(&self, st: &State) -> bool {
        let f = &st.current;
        let cap = self.cfg.rotate_bytes;
        self.cfg.durable
            && f.prealloc
            && f.allocated < cap
            && (f.allocated < f.fill_to || f.allocated < f.len + PREALLOCATE_LOW)
    }

    /// Whether the sync thread has something to do now.
    fn sync_needed(&self, st: &State) -> bool {
        st.closing
            || st.sealing.is_some()
            || st.dir_dirty
            || (self.cfg.durable && st.current.len > st.current.synced)
            || (st.unsigned() && self.checkpoint_due_by_count(st))
            || Self::checkpoint_wanted(st)
            || self.preallocation_due(st)
    }

    /// Whether only records are waiting (nothing else the sync thread must do at once).
    fn only_records(&self, st: &State) -> bool {
        !(st.closing
            || st.sealing.is_some()
            || st.dir_dirty
            || st.sync_error.is_some()
            || (st.unsigned() && self.checkpoint_due_by_count(st))
            || Self::checkpoint_wanted(st)
            || self.preallocation_due(st))
    }

    /// Wake the sync thread if it sleeps and has work now. Call with the state locked, then drop the guard and call
    /// [`Shared::notify_sync`] when this says so: the thread is woken after the mutex is released, so that it does not
    /// run (on the appender's CPU, preempting it) only to block on the mutex the appender still holds. No wake-up is
    /// lost: `sync_idle` is cleared under the mutex, and the sync thread sets it and sleeps in one step under it.
    #[must_use = "notify_sync after dropping the guard"]
    fn wake_sync(&self, st: &mut State) -> bool {
        // While the sync thread gathers a batch it sleeps until its deadline, or until the batch is complete.
        let gathering = st.gather_until.is_some()
            && st.appended_since < st.gather_want
            && self.only_records(st);
        if st.sync_idle && !gathering && self.sync_needed(st) {
            st.sync_idle = false;
            return true;
        }
        false
    }

    fn notify_sync(&self, wake: bool) {
        if wake {
            self.work.notify_one();
        }
    }

    fn publish_health(&self, st: &State) {
        let h = st.health();
        self.health.send_if_modified(|old| {
            let changed = std::mem::discriminant(old) != std::mem::discriminant(&h);
            *old = h;
            changed
        });
    }

    /// Append one record (`body` from [`super::record::encode_event`] or `encode_retention`); returns its seq and,
    /// with `durable` and `wait`, the receiver its sync outcome is sent to.
    pub fn append(
        &self,
        body: &[u8],
        wait: bool,
    ) -> Result<(u64, Option<oneshot::Receiver<Synced>>), AuditError> {
        let mut st = self.lock();
        loop {
            if st.closing || st.stopped {
                return Err(AuditError::Closed);
            }
            if let Some(e) = &st.sync_error {
                return Err(AuditError::Unavailable { source: e.clone() });
            }
            if st.cut_needed {
                let f = &st.current;
                if let Err(e) = f.file.set_len(f.len) {
                    return Err(self.write_failed(&mut st, e));
                }
                st.cut_needed = false;
            }
            let mut line = std::mem::take(&mut st.line);
            line.clear();
            let ts = now_ts();
            let hash = compose(&mut line, st.next_seq, &ts, &st.prev, body);
            let n = line.len() as u64;
            if st.current.len > 0 && st.current.len + n > self.cfg.rotate_bytes {
                st.line = line;
                if st.sealing.is_some() {
                    // The file before is still being synced: at most one file is ever unsealed behind the current
                    // one, so recovery never has to look further back.
                    st = self
                        .progress
                        .wait(st)
                        .unwrap_or_else(PoisonError::into_inner);
                    continue;
                }
                let path = self.cfg.dir.join(file_name(st.next_seq));
                match OpenFile::open(path, st.next_seq, 0, self.cfg.rotate_bytes) {
                    Ok(f) => {
                        let old = std::mem::replace(&mut st.current, f);
                        st.sealing = Some(old);
                        st.dir_dirty = true;
                        tracing::debug!(file = %st.current.path.display(), "audit log rotated");
                        continue;
                    }
                    Err(AuditError::Io { source, .. }) => {
                        return Err(self.write_failed(&mut st, source))
                    }
                    Err(e) => return Err(e),
                }
            }
            if st.zeroing == Some(st.current.first_seq) && st.current.len + n > st.current.allocated
            {
                // Zeros are being written where this record goes (only at the start of a file, where nothing is
                // preallocated yet): wait for that chunk.
                st.line = line;
                st = self
                    .progress
                    .wait(st)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let f = &mut st.current;
            if let Err(e) = f.file.write_all_at(&line, f.len) {
                st.line = line;
                return Err(self.write_failed(&mut st, e));
            }
            f.len += n;
            if self.cfg.durable {
                f.unsynced.extend_from_slice(&line);
            }
            if let Some(ship) = &self.ship {
                // Under the mutex, so messages are queued in seq order; never blocks.
                ship.offer(Kind::Record, st.next_seq, &line);
            }
            st.line = line;
            if !st.unsigned() {
                st.unsigned_since = Instant::now();
            }
            let seq = st.next_seq;
            st.next_seq += 1;
            st.prev = hash;
            st.appended_since += 1;
            if st.write_error.take().is_some() {
                tracing::warn!(file = %st.current.path.display(), seq, "audit records are written again");
                self.publish_health(&st);
            }
            let rx = (wait && self.cfg.durable).then(|| {
                let (tx, rx) = oneshot::channel();
                st.waiters.push_back((seq, tx));
                rx
            });
            let wake = self.wake_sync(&mut st);
            drop(st);
            self.notify_sync(wake);
            return Ok((seq, rx));
        }
    }

    /// A write to the current file failed: cut it back to its last record (a partial line or padding may follow) and
    /// enter the write-failing state (logged once).
    fn write_failed(&self, st: &mut State, e: std::io::Error) -> AuditError {
        let f = &mut st.current;
        match f.file.set_len(f.len) {
            Ok(()) => {
                f.allocated = f.len;
                f.fill_to = f.len;
            }
            Err(_) => st.cut_needed = true,
        }
        let path = st.current.path.clone();
        if st.write_error.is_none() {
            tracing::error!(file = %path.display(), error = %e,
                "audit records cannot be written: refusing every action until they can (each new record retries)");
        }
        let err = AuditError::io(&path, e);
        if let AuditError::Io { source, .. } = &err {
            st.write_error = Some(Arc::new(std::io::Error::new(
                source.kind(),
                source.to_string(),
            )));
        }
        self.publish_health(st);
        err
    }

    /// Ask for a checkpoint covering `seq` and wait until it is written (or the writer stops: `false`).
    pub fn sign_through(&self, seq: u64) -> bool {
        let mut st = self.lock();
        st.checkpoint_wanted = Some(st.checkpoint_wanted.map_or(seq, |w| w.max(seq)));
        let wake = self.wake_sync(&mut st);
        drop(st);
        self.notify_sync(wake);
        let mut st = self.lock();
        loop {
            if st.signed.is_some_and(|s| s >= seq) {
                return true;
            }
            if st.closing || st.stopped {
                return false;
            }
            st = self
                .progress
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The first seq of the oldest file not yet sealed: retention never touches it or anything after it.
    pub fn unsealed_from(&self) -> u64 {
        let st = self.lock();
        st.sealing
            .as_ref()
            .map_or(st.current.first_seq, |f| f.first_seq)
    }
}

/// The owner of the threads: dropping the last [`super::AuditLog`] clone closes the writer.
#[derive(Debug)]
pub(crate) struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Create the directory, take the lock, load or create the key, recover, sign what recovery found unsigned and
    /// start the sync and seal threads.
    pub fn open(cfg: AuditConfig) -> Result<Handle, AuditError> {
        if cfg.max_total_bytes > 0 && cfg.max_total_bytes < cfg.rotate_bytes.saturating_mul(2) {
            return Err(AuditError::RetentionTooSmall {
                max_total_bytes: cfg.max_total_bytes,
                rotate_bytes: cfg.rotate_bytes,
            });
        }
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
        let (signed, cp_len) = recover_checkpoints(&cp_path)?;
        clean_compression(&cfg.dir)?;
        let tail = recover_log(&cfg.dir, signed)?;
        let (path, len) = tail
            .file
            .unwrap_or_else(|| (cfg.dir.join(file_name(tail.next_seq)), 0));
        let first_seq = super::read::list_files(&cfg.dir)?
            .into_iter()
            .find(|f| f.path == path)
            .map_or(tail.next_seq, |f| f.first_seq);
        let current = OpenFile::open(path, first_seq, len, cfg.rotate_bytes)?;
        // Written at the end of its whole lines, so a failed write can be cut back.
        let checkpoints = open_log(&cp_path)?;
        // New files (key, log, checkpoints, anything moved aside) exist durably from here on.
        sync_dir(&cfg.dir)?;
        let to_seal = sealed_plain(&cfg.dir)?;
        let next_seq = tail.next_seq;
        let state = State {
            current,
            sealing: None,
            next_seq,
            prev: tail.prev,
            cut_needed: false,
            dir_dirty: false,
            zeroing: None,
            write_error: None,
            sync_error: None,
            retry_at: None,
            backoff: RETRY_FIRST,
            episode: None,
            ok_since: None,
            probe_at: None,
            signed,
            unsigned_since: Instant::now(),
            checkpoint_wanted: None,
            closing: false,
            stopped: false,
            close_replies: Vec::new(),
            sync_idle: false,
            appended_since: 0,
            gather_want: 0,
            gather_until: None,
            last_sync: Duration::ZERO,
            line: Vec::with_capacity(1024),
            waiters: VecDeque::new(),
        };
        let (health, _) = watch::channel(Health::Healthy);
        let ship = cfg
            .ship
            .as_ref()
            .map(|s| Shipper::start(s, &signer.public.key_id()))
            .transpose()?;
        let shared = Arc::new(Shared {
            ship,
            cfg,
            state: Mutex::new(state),
            work: Condvar::new(),
            progress: Condvar::new(),
            health,
        });
        let mut syncer = Syncer {
            signer,
            syslog: Syslog::new(shared.cfg.syslog),
            checkpoints,
            cp_path,
            cp_len,
            seal_tx: None,
            sealer: None,
            seal_stop: Arc::new(AtomicBool::new(false)),
            failure: None,
            last_sync: Duration::ZERO,
            _lock: lock,
            shared: shared.clone(),
        };
        // Recovery may have left the last record unsigned.
        {
            let st = shared.lock();
            if st.unsigned() {
                let (seq, prev) = (st.next_seq - 1, st.prev);
                let file = st.current.file.clone();
                drop(st);
                file.sync_data()
                    .map_err(|e| AuditError::io(&shared.cfg.dir, e))?;
                syncer
                    .sign(seq, &prev)
                    .map_err(|e| AuditError::io(&syncer.cp_path, e))?;
                shared.lock().signed = Some(seq);
            }
        }
        tracing::info!(dir = %shared.cfg.dir.display(), next_seq, key = %syncer.signer.public.key_id(), "audit log open");
        let (seal_tx, seal_rx) = mpsc::channel();
        let sealer = Sealer::new(shared.clone(), seal_rx, syncer.seal_stop.clone());
        let dir = shared.cfg.dir.clone();
        syncer.sealer = Some(
            std::thread::Builder::new()
                .name("audit-seal".into())
                .spawn(move || sealer.run(to_seal))
                .map_err(|e| AuditError::io(&dir, e))?,
        );
        syncer.seal_tx = Some(seal_tx);
        std::thread::Builder::new()
            .name("audit-sync".into())
            .spawn(move || {
                // Waking this thread for a record's flush must not take the CPU from the worker that appended it (it
                // goes on to forward the request): on a busy machine the flush waits for the worker's turn to end,
                // and more records share it. docs/audit.md, "Durability and crashes".
                if let Err(e) = crate::sched::batch_current_thread() {
                    tracing::warn!(error = %e, "the audit sync thread runs with the default scheduling policy");
                }
                syncer.run()
            })
            .map_err(|e| AuditError::io(&dir, e))?;
        Ok(Handle { shared })
    }

    pub fn dir(&self) -> &Path {
        &self.shared.cfg.dir
    }

    pub fn append(&self, body: &[u8]) -> Result<(u64, DurableWait), AuditError> {
        let (seq, rx) = self.shared.append(body, true)?;
        Ok((seq, rx.map_or(DurableWait::Now, DurableWait::Sync)))
    }

    pub fn health(&self) -> watch::Receiver<Health> {
        self.shared.health.subscribe()
    }

    pub fn shipping(&self) -> Option<super::ship::ShipProbe> {
        self.shared.ship.as_ref().map(Shipper::probe)
    }

    pub async fn close(&self) -> Result<(), AuditError> {
        let rx = {
            let mut st = self.shared.lock();
            if st.stopped {
                return Ok(());
            }
            let (tx, rx) = oneshot::channel();
            st.close_replies.push(tx);
            st.closing = true;
            self.shared.work.notify_one();
            self.shared.progress.notify_all();
            rx
        };
        rx.await.unwrap_or(Ok(()))
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.closing = true;
        self.shared.work.notify_one();
        self.shared.progress.notify_all();
    }
}

/// One sync round, as snapshotted under the mutex.
struct Round {
    /// The file rotated away from: trim its padding and sync it.
    seal: Option<FileSync>,
    dir: bool,
    /// The current file, when it needs an `fdatasync`.
    current: Option<FileSync>,
    /// Records below this seq are in the files up to the snapshotted lengths.
    next_seq: u64,
    prev: [u8; 32],
    checkpoint: bool,
    closing: bool,
}

struct FileSync {
    file: Arc<File>,
    path: PathBuf,
    len: u64,
    /// Trim NUL padding down to `len` first.
    trim: bool,
    /// After a failed `fdatasync`: bytes to rewrite at `synced` first.
    rewrite: Option<(u64, Vec<u8>)>,
}

impl FileSync {
    fn snapshot(f: &OpenFile, trim: bool, rewrite: bool) -> FileSync {
        FileSync {
            file: f.file.clone(),
            path: f.path.clone(),
            len: f.len,
            trim: trim && f.allocated > f.len,
            rewrite: (rewrite && !f.unsynced.is_empty()).then(|| (f.synced, f.unsynced.clone())),
        }
    }

    fn run(&self) -> std::io::Result<()> {
        if let Some((at, bytes)) = &self.rewrite {
            self.file.write_all_at(bytes, *at)?;
        }
        if self.trim {
            self.file.set_len(self.len)?;
        }
        self.file.sync_data()
    }
}

/// The sync thread.
struct Syncer {
    shared: Arc<Shared>,
    signer: Signer,
    syslog: Syslog,
    checkpoints: File,
    cp_path: PathBuf,
    /// Length of the whole lines of `checkpoints.jsonl`.
    cp_len: u64,
    seal_tx: Option<mpsc::Sender<SealMsg>>,
    sealer: Option<std::thread::JoinHandle<()>>,
    seal_stop: Arc<AtomicBool>,
    /// The error of the last failed round.
    failure: Option<Arc<std::io::Error>>,
    /// How long the last `fdatasync` of the current file took.
    last_sync: Duration,
    /// The directory's `flock`, held until the threads have stopped.
    _lock: File,
}

impl Syncer {
    /// Append a signed checkpoint for (`seq`, `hash`) and sync it; a failed write is cut back.
    fn sign(&mut self, seq: u64, hash: &[u8; 32]) -> std::io::Result<()> {
        let line = self.signer.line(seq, hash, &now_ts());
        let res = self
            .checkpoints
            .write_all_at(&line, self.cp_len)
            .and_then(|()| self.checkpoints.sync_data());
        if let Err(e) = res {
            let _ = self.checkpoints.set_len(self.cp_len);
            return Err(e);
        }
        self.cp_len += line.len() as u64;
        self.syslog.send(&line);
        if let Some(ship) = &self.shared.ship {
            ship.offer(Kind::Checkpoint, seq, &line);
        }
        Ok(())
    }

    fn run(mut self) {
        let shared = self.shared.clone();
        loop {
            let round = self.wait_for_work();
            let result = self.io(&round);
            let mut st = shared.lock();
            let ok = result.is_ok();
            match result {
                Ok(()) => self.succeeded(&mut st, &round),
                Err(e) => self.failed(&mut st, &round, e),
            }
            // The waiters this round answers: every record it covered (all of them when it synced the current file).
            let covered = if ok && !(shared.cfg.durable && round.current.is_some()) {
                0
            } else {
                st.waiters.partition_point(|(seq, _)| *seq < round.next_seq)
            };
            let answered: Vec<_> = st.waiters.drain(..covered).collect();
            st.gather_want = if ok { answered.len() } else { 0 };
            shared.progress.notify_all();
            drop(st);
            for (_, tx) in answered {
                let outcome = match &self.failure {
                    Some(e) if !ok => Synced::Failed(e.clone()),
                    _ => Synced::Durable,
                };
                let _ = tx.send(outcome);
            }
            if round.closing {
                self.stop(result_of(&shared));
                return;
            }
        }
    }

    /// Sleep until there is something to do (or a timed checkpoint or retry is due), preallocate, and snapshot.
    fn wait_for_work(&mut self) -> Round {
        let shared = self.shared.clone();
        let cfg = &shared.cfg;
        let mut st = shared.lock();
        loop {
            let now = Instant::now();
            if st.closing {
                break;
            }
            // After a failure nothing is done until the retry is due; then the retry runs even with nothing new.
            let failed = st.sync_error.is_some();
            let retry_wait = st.retry_at.filter(|&t| failed && t > now);
            let checkpoint_at = st
                .unsigned()
                .then(|| st.unsigned_since + cfg.checkpoint_interval);
            let timed = checkpoint_at.is_some_and(|t| t <= now);
            let probe = st.probe_at.is_some_and(|t| t <= now);
            let mut gather = None;
            if retry_wait.is_none() && (failed || probe || timed || shared.sync_needed(&st)) {
                // Group commit: when records alone call for a round, give the writers the last round woke a moment
                // (a quarter of an fdatasync, at most GATHER_MAX) to append again, so they share this round.
                let batch_open = st.appended_since < st.gather_want
                    && !(failed || probe || timed)
                    && shared.only_records(&st);
                if !batch_open {
                    break;
                }
                let wait = (st.last_sync / 4).min(GATHER_MAX);
                let until = *st.gather_until.get_or_insert(now + wait);
                if until <= now {
                    break;
                }
                gather = Some(until);
            }
            let deadline = [retry_wait, checkpoint_at, st.probe_at, gather]
                .into_iter()
                .flatten()
                .min();
            st.sync_idle = true;
            st = match deadline {
                Some(d) => {
                    shared
                        .work
                        .wait_timeout(st, d.saturating_duration_since(now))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => shared.work.wait(st).unwrap_or_else(PoisonError::into_inner),
            };
            st.sync_idle = false;
        }
        // Preallocate, a chunk at a time, outside the mutex; at most 1 MiB per round, so records waiting for this
        // round's fdatasync wait for little zeroing (a step is spread over a few rounds, well ahead of the records).
        for _ in 0..4 {
            if st.closing || st.sync_error.is_some() || !shared.preallocation_due(&st) {
                break;
            }
            st = Self::zero_chunk(&shared, st);
        }
        let now = Instant::now();
        let timed = st.unsigned() && st.unsigned_since + cfg.checkpoint_interval <= now;
        let checkpoint = st.sync_error.is_none()
            && st.unsigned()
            && (timed || shared.checkpoint_due_by_count(&st) || Shared::checkpoint_wanted(&st))
            || st.closing && st.unsigned();
        let rewrite = st.sync_error.is_some() && cfg.durable;
        let closing = st.closing;
        let seal = st
            .sealing
            .as_ref()
            .map(|f| FileSync::snapshot(f, true, rewrite));
        let cur = &st.current;
        let current = (checkpoint || closing || (cfg.durable && cur.len > cur.synced) || rewrite)
            .then(|| FileSync::snapshot(cur, closing, rewrite));
        let dir = std::mem::take(&mut st.dir_dirty);
        st.appended_since = 0;
        st.gather_until = None;
        Round {
            seal,
            dir,
            current,
            next_seq: st.next_seq,
            prev: st.prev,
            checkpoint,
            closing,
        }
    }

    /// Write one chunk of zeros ahead of the current file's records. The range is reserved under the mutex
    /// (`zeroing`) and written outside it, since appends write below `allocated`. On failure, give the space back and
    /// fall back to plain appends for this file.
    fn zero_chunk<'a>(shared: &'a Shared, mut st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        static ZEROS: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];
        let f = &mut st.current;
        if f.allocated < f.len {
            f.allocated = f.len;
        }
        if f.allocated >= f.fill_to {
            f.fill_to = (f.allocated + PREALLOCATE).min(shared.cfg.rotate_bytes);
        }
        let (at, n) = (
            f.allocated,
            (f.fill_to - f.allocated).min(ZERO_CHUNK as u64),
        );
        let (file, first_seq) = (f.file.clone(), f.first_seq);
        st.zeroing = Some(first_seq);
        drop(st);
        let res = file.write_all_at(&ZEROS[..n as usize], at);
        let mut st = shared.lock();
        st.zeroing = None;
        if let Some(sealing) = st.sealing.as_mut().filter(|f| f.first_seq == first_seq) {
            // Rotated away from meanwhile: its seal trims what was written.
            sealing.allocated = sealing.allocated.max(at + n);
        } else if st.current.first_seq == first_seq {
            let f = &mut st.current;
            match res {
                Ok(()) => f.allocated = at + n,
                Err(e) => {
                    // Give back what was allocated ahead: the records need the space more.
                    let _ = f.file.set_len(f.len);
                    f.allocated = f.len;
                    f.fill_to = f.len;
                    f.prealloc = false;
                    tracing::warn!(file = %f.path.display(), error = %e,
                        "audit log: could not preallocate space; appending without preallocation in this file");
                }
            }
        }
        shared.progress.notify_all();
        st
    }

    fn io(&mut self, round: &Round) -> std::io::Result<()> {
        if let Some(f) = &round.seal {
            f.run()?;
        }
        if round.dir {
            File::open(&self.shared.cfg.dir).and_then(|d| d.sync_all())?;
        }
        if let Some(f) = &round.current {
            let start = Instant::now();
            f.run()?;
            self.last_sync = start.elapsed();
        }
        if round.checkpoint {
            self.sign(round.next_seq - 1, &round.prev)?;
        }
        Ok(())
    }

    fn succeeded(&mut self, st: &mut State, round: &Round) {
        st.last_sync = self.last_sync;
        for f in round.seal.iter().chain(&round.current) {
            if let Some(open) = st.file_mut(&f.path) {
                let done = (f.len - open.synced.min(f.len)) as usize;
                open.unsynced.drain(..done.min(open.unsynced.len()));
                open.synced = open.synced.max(f.len);
                if f.trim {
                    open.allocated = f.len;
                    open.fill_to = f.len;
                }
            }
        }
        if let Some(f) = &round.seal {
            if st.sealing.as_ref().is_some_and(|s| s.path == f.path) {
                let sealed = st.sealing.take();
                if let (Some(tx), Some(sealed)) = (&self.seal_tx, sealed) {
                    let _ = tx.send(SealMsg::Sealed {
                        path: sealed.path,
                        first_seq: sealed.first_seq,
                    });
                }
            }
        }
        if round.checkpoint {
            st.signed = Some(round.next_seq - 1);
            if st.checkpoint_wanted.is_some_and(|w| w < round.next_seq) {
                st.checkpoint_wanted = None;
            }
        }
        st.sync_error = None;
        st.retry_at = None;
        if let Some(e) = st.episode.clone() {
            let now = Instant::now();
            let since = *st.ok_since.get_or_insert(now);
            if now >= since + st.backoff {
                tracing::warn!(dir = %self.shared.cfg.dir.display(), error = %e,
                    "audit records are made durable again");
                st.episode = None;
                st.ok_since = None;
                st.probe_at = None;
                st.backoff = RETRY_FIRST;
            } else {
                st.probe_at = Some(since + st.backoff);
            }
        }
        self.shared.publish_health(st);
    }

    fn failed(&mut self, st: &mut State, round: &Round, e: std::io::Error) {
        let e = Arc::new(e);
        if st.episode.is_none() {
            tracing::error!(dir = %self.shared.cfg.dir.display(), error = %e,
                "audit records cannot be made durable: refusing every action until a retry succeeds");
            st.episode = Some(e.clone());
        }
        st.ok_since = None;
        st.probe_at = None;
        st.sync_error = Some(e.clone());
        st.retry_at = Some(Instant::now() + st.backoff);
        st.backoff = (st.backoff * 2).min(RETRY_MAX);
        st.dir_dirty |= round.dir;
        self.shared.publish_health(st);
        self.failure = Some(e);
    }

    /// Stop the seal thread, publish that nothing more becomes durable, release the directory and answer `close`.
    fn stop(mut self, result: Result<(), AuditError>) {
        self.seal_stop.store(true, Ordering::SeqCst);
        self.seal_tx = None;
        self.shared.progress.notify_all();
        if let Some(t) = self.sealer.take() {
            let _ = t.join();
        }
        let (replies, waiters) = {
            let mut st = self.shared.lock();
            st.stopped = true;
            self.shared.publish_health(&st);
            (
                std::mem::take(&mut st.close_replies),
                std::mem::take(&mut st.waiters),
            )
        };
        for (_, tx) in waiters {
            let _ = tx.send(Synced::Closed);
        }
        if let Some(ship) = &self.shared.ship {
            // The final checkpoint is queued: ship what is left (bounded), then stop.
            ship.close();
        }
        self.shared.progress.notify_all();
        // Release the directory before answering, so a caller may reopen it at once.
        drop(self);
        let mut result = Some(result);
        for reply in replies {
            let r = match result.take() {
                Some(r) => r,
                None => Ok(()),
            };
            let _ = reply.send(r);
        }
    }
}

/// The outcome of the final round, for `close`.
fn result_of(shared: &Shared) -> Result<(), AuditError> {
    let st = shared.lock();
    match &st.sync_error {
        Some(e) => Err(AuditError::Unavailable { source: e.clone() }),
        None => Ok(()),
    }
}
