//! A full disk on real, small file systems (root only): the writer refuses records while they cannot be written or
//! made durable, says so once, reports unhealthy, and takes records again, with the chain intact, once space returns.
//!
//! - A 4 MiB tmpfs: the 8 MiB preallocation cannot succeed, so the writer appends without it; then the file system is
//!   filled, appends fail with `ENOSPC`, the filler is removed and appends succeed again.
//! - ext4 on a loop device whose image lives on a full tmpfs: writes land in the page cache, but the `fdatasync`
//!   fails when the device cannot store the blocks. The batch's waiters get an error, appends are refused, and once
//!   space returns the writer rewrites the records from memory, syncs them and takes records again.

mod audit_support;

use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use audit_support::{event, root_or_skip, Mount};
use enforcer::audit::{verify, AuditConfig, AuditError, AuditLog, Health};

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Everything this test binary logs through `tracing`.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        tracing_subscriber::fmt()
            .with_env_filter("enforcer=info")
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .init();
        buf
    })
    .clone()
}

/// How many log lines about `dir` contain `text`.
fn logged(dir: &Path, text: &str) -> usize {
    let logs = logs();
    let logs = logs.lock().unwrap();
    String::from_utf8_lossy(&logs)
        .lines()
        .filter(|l| l.contains(text) && l.contains(dir.to_str().unwrap()))
        .count()
}

/// Fill the file system holding `path` with it, until `ENOSPC`.
fn fill(path: &Path) {
    let mut f = fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 64 * 1024];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                break;
            }
        }
    }
    // Whatever is left is smaller than a page.
    let _ = f.write_all(&chunk[..4096]);
}

fn config(dir: &Path) -> AuditConfig {
    let mut cfg = AuditConfig::new(dir);
    cfg.checkpoint_interval = Duration::from_secs(3600);
    cfg
}

async fn wait_health(log: &AuditLog, healthy: bool) -> Health {
    let mut rx = log.health();
    let h = tokio::time::timeout(
        Duration::from_secs(20),
        rx.wait_for(|h| h.is_healthy() == healthy),
    )
    .await
    .expect("health did not change")
    .unwrap()
    .clone();
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_tmpfs_refuses_records_until_space_returns() {
    if !root_or_skip() {
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let mount = Mount::tmpfs(&base.path().join("fs"), "4m");
    let dir = mount.dir.join("audit");
    logs();
    // Default settings: 64 MiB files preallocated 8 MiB at a time, which a 4 MiB file system cannot hold.
    let log = AuditLog::open(config(&dir)).await.unwrap();
    let mut written = 0u64;
    for i in 0..100 {
        assert_eq!(log.record(event(0, i)).await.unwrap(), written);
        written += 1;
    }
    assert!(log.is_healthy());

    fill(&mount.dir.join("filler"));
    let mut refused = 0;
    for i in 100..400 {
        match log.record(event(0, i)).await {
            Ok(seq) => {
                assert_eq!(seq, written, "a refused record used up a seq");
                written += 1;
            }
            Err(AuditError::Io { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOSPC), "{source}");
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused > 250, "only {refused} refused");
    assert!(!log.is_healthy());
    assert!(matches!(
        wait_health(&log, false).await,
        Health::WriteFailing(_)
    ));
    // What is in the file is whole records, chained.
    let r = verify(&dir, None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!(r.records, written);

    fs::remove_file(mount.dir.join("filler")).unwrap();
    for i in 400..450 {
        assert_eq!(log.record(event(0, i)).await.unwrap(), written);
        written += 1;
    }
    wait_health(&log, true).await;
    log.close().await.unwrap();
    let r = verify(&dir, None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!((r.records, r.unsigned()), (written, 0));
    // One line when records stop being written, one when they are again: not one per refused record.
    assert_eq!(logged(&dir, "audit records cannot be written"), 1);
    assert_eq!(logged(&dir, "audit records are written again"), 1);
    assert_eq!(logged(&dir, "could not preallocate"), 1);
    drop(log);
    drop(mount);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_fdatasync_refuses_records_until_the_device_has_space() {
    if !root_or_skip() {
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let backing = Mount::tmpfs(&base.path().join("backing"), "40m");
    let image = backing.dir.join("disk.img");
    Mount::make_ext4(&image, 32);
    Mount::back_only_used_blocks(&image);
    let disk = Mount::loop_ext4(&image, &base.path().join("disk"));
    let dir = disk.dir.join("audit");
    logs();
    // A first run puts the directory, key and files on the device while it still has room.
    let log = AuditLog::open(config(&dir)).await.unwrap();
    for i in 0..50 {
        log.record(event(0, i)).await.unwrap();
    }
    log.close().await.unwrap();

    // Now the device cannot store a single new block: ext4 still has free space, so writes succeed, and the
    // failure comes from the fdatasync that pushes the blocks to the device.
    fill(&backing.dir.join("filler"));
    let log = AuditLog::open(config(&dir)).await.unwrap();
    let mut durable = 50u64;
    let mut not_durable = Vec::new();
    let start = Instant::now();
    while log.is_healthy() && start.elapsed() < Duration::from_secs(20) {
        let mut batch = Vec::new();
        for i in 0..200 {
            match log.append(&event(1, i)) {
                Ok(a) => batch.push(a),
                Err(AuditError::Unavailable { .. }) => break,
                Err(e) => panic!("{e}"),
            }
        }
        for a in batch {
            let seq = a.seq();
            match a.durable().await {
                Ok(_) => durable += 1,
                Err(AuditError::NotDurable { .. }) => not_durable.push(seq),
                Err(e) => panic!("{e}"),
            }
        }
    }
    assert!(
        matches!(log.health().borrow().clone(), Health::SyncFailing(_)),
        "{}",
        *log.health().borrow()
    );
    assert!(!not_durable.is_empty());

    fs::remove_file(backing.dir.join("filler")).unwrap();
    wait_health(&log, true).await;
    let seq = log.record(event(3, 0)).await.unwrap();
    log.close().await.unwrap();
    drop(log);
    drop(disk);
    // What the device holds after the file system is gone: every record, the ones whose first fdatasync failed
    // included (the writer wrote them again).
    let disk = Mount::loop_ext4(&image, &base.path().join("again"));
    let dir = disk.dir.join("audit");
    let r = verify(&dir, None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!(r.last_seq, Some(seq));
    assert!(durable + not_durable.len() as u64 <= seq);
    let first = disk_dir_name(&dir);
    assert_eq!(logged(&first, "audit records cannot be made durable"), 1);
    assert_eq!(logged(&first, "audit records are made durable again"), 1);
    drop(disk);
    drop(backing);
}

/// The directory as the first mount logged it (the remount has another path).
fn disk_dir_name(dir: &Path) -> std::path::PathBuf {
    dir.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("disk")
        .join("audit")
}
