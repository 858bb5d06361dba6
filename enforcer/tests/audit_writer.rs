//! The writer on real files: rotation continuity, crash recovery, group commit under many concurrent writers,
//! checkpoints by count and by time, closing, locking and permissions.

mod audit_support;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::time::Duration;

use audit_support::{config, event, log_files, read_lines, write};
use enforcer::audit::checkpoint::{Checkpoint, CHECKPOINT_FILE, KEY_FILE};
use enforcer::audit::record::parse_record;
use enforcer::audit::{verify, AuditError, AuditLog};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_one_chain_across_files_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.rotate_bytes = 4096;
    write(cfg.clone(), 120).await;
    write(cfg.clone(), 30).await;
    let files = log_files(dir.path());
    assert!(files.len() > 5, "{files:?}");
    let mut next = 0u64;
    for f in &files {
        let lines = read_lines(f);
        let first = parse_record(lines[0].as_bytes()).unwrap().seq;
        // Files are named by their first record.
        assert_eq!(
            f.file_name().unwrap().to_string_lossy(),
            format!("audit-{first:020}.jsonl")
        );
        assert_eq!(first, next);
        // No file grows past the limit by more than one record.
        assert!(fs::metadata(f).unwrap().len() <= 4096 + lines[0].len() as u64 + 1);
        next += lines.len() as u64;
    }
    assert_eq!(next, 150);
    let r = verify(dir.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!((r.records, r.files), (150, files.len()));

    // Deleting a whole middle file is a deletion.
    fs::remove_file(&files[2]).unwrap();
    let r = verify(dir.path(), None).unwrap();
    assert!(
        matches!(r.problems[0], enforcer::audit::Problem::Deleted { .. }),
        "{:?}",
        r.problems
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_final_line_is_moved_aside_and_the_chain_continues() {
    let dir = tempfile::tempdir().unwrap();
    write(config(dir.path()), 20).await;
    let file = log_files(dir.path()).pop().unwrap();
    let lines = read_lines(&file);
    // A crash in the middle of writing record 20: half a line, no newline.
    let torn = &lines[5][..lines[5].len() / 2];
    let mut data = fs::read(&file).unwrap();
    data.extend_from_slice(torn.as_bytes());
    fs::write(&file, &data).unwrap();
    let r = verify(dir.path(), None).unwrap();
    assert!(matches!(
        r.problems[0],
        enforcer::audit::Problem::Torn { .. }
    ));

    let log = AuditLog::open(config(dir.path())).await.unwrap();
    assert_eq!(log.record(event(0, 20)).await.unwrap(), 20);
    assert_eq!(log.record(event(0, 21)).await.unwrap(), 21);
    log.close().await.unwrap();

    let aside: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".torn-"))
        .collect();
    assert_eq!(aside.len(), 1);
    assert_eq!(fs::read(&aside[0]).unwrap(), torn.as_bytes());
    let r = verify(dir.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!(r.records, 22);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_line_with_a_bad_hash_is_moved_aside_too() {
    let dir = tempfile::tempdir().unwrap();
    write(config(dir.path()), 5).await;
    let file = log_files(dir.path()).pop().unwrap();
    let mut lines = read_lines(&file);
    // Whole line, wrong content (e.g. a block of a lost page): not a record the writer completed.
    let bad = lines[4].replace("\"seq\":4", "\"seq\":5");
    lines.push(bad.clone());
    audit_support::write_lines(&file, &lines);
    let log = AuditLog::open(config(dir.path())).await.unwrap();
    assert_eq!(log.record(event(0, 5)).await.unwrap(), 5);
    log.close().await.unwrap();
    let r = verify(dir.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    let aside = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains(".torn-"))
        .unwrap();
    assert_eq!(fs::read_to_string(aside).unwrap(), format!("{bad}\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsynced_tail_with_gaps_and_padding_is_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    write(config(dir.path()), 20).await;
    let file = log_files(dir.path()).pop().unwrap();
    let lines = read_lines(&file);
    // A crash before the batch's fsync: a page that never reached the disk (NULs), then a later page that did,
    // then the preallocated padding.
    let mut junk = vec![0u8; 300];
    junk.extend_from_slice(&lines[3].as_bytes()[40..]);
    junk.push(b'\n');
    junk.extend_from_slice(lines[4].as_bytes());
    junk.push(b'\n');
    let mut data = fs::read(&file).unwrap();
    let len = data.len();
    data.extend_from_slice(&junk);
    data.extend_from_slice(&[0u8; 8192]);
    fs::write(&file, &data).unwrap();

    let log = AuditLog::open(config(dir.path())).await.unwrap();
    // Padding alone is cut, not moved aside (the writer may have preallocated afresh since).
    let kept = fs::read(&file).unwrap();
    assert_eq!(kept.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1), len);
    assert_eq!(log.record(event(0, 20)).await.unwrap(), 20);
    log.close().await.unwrap();
    let aside = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains(".torn-"))
        .unwrap();
    assert_eq!(fs::read(aside).unwrap(), junk);
    let r = verify(dir.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!(r.records, 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_log_verifies_with_its_padding() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(config(dir.path())).await.unwrap();
    for i in 0..25 {
        log.record(event(0, i)).await.unwrap();
    }
    let file = log_files(dir.path()).pop().unwrap();
    let on_disk = fs::metadata(&file).unwrap().len();
    let records: u64 = read_lines(&file).iter().map(|l| l.len() as u64 + 1).sum();
    assert!(on_disk > records, "the writer preallocates ahead");
    let r = verify(dir.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!((r.records, r.unsigned()), (25, 5));
    log.close().await.unwrap();
    // A closed file holds records only.
    assert_eq!(fs::metadata(&file).unwrap().len(), records);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_writers_lose_nothing_and_get_a_strict_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.checkpoint_every = 1000;
    cfg.rotate_bytes = 1 << 20;
    let log = AuditLog::open(cfg).await.unwrap();
    let mut tasks = Vec::new();
    for task in 0..64u32 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..200u32 {
                seqs.push((i, log.record(event(task, i)).await.unwrap()));
            }
            (task, seqs)
        }));
    }
    let mut all = HashSet::new();
    let mut by_seq = vec![None; 64 * 200];
    for t in tasks {
        let (task, seqs) = t.await.unwrap();
        // Each writer's own records come out in the order it wrote them.
        assert!(seqs.windows(2).all(|w| w[0].1 < w[1].1));
        for (i, seq) in seqs {
            assert!(all.insert(seq));
            by_seq[usize::try_from(seq).unwrap()] = Some((task, i));
        }
    }
    log.close().await.unwrap();
    assert_eq!(all.len(), 64 * 200);
    assert_eq!(all.iter().max(), Some(&(64 * 200 - 1)));

    // The file holds every record once, in seq order, each with the content its writer sent.
    let mut seq = 0u64;
    for f in log_files(dir.path()) {
        for line in read_lines(&f) {
            let r = parse_record(line.as_bytes()).unwrap();
            assert_eq!(r.seq, seq);
            let (task, i) = by_seq[usize::try_from(seq).unwrap()].unwrap();
            assert_eq!(r.agent.pid, Some(task));
            assert_eq!(r.request.path, Some(format!("/v1/item/{i}")));
            seq += 1;
        }
    }
    assert_eq!(seq, 64 * 200);
    let r = verify(dir.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    // The first batch, every 1000 records, and the final one.
    assert_eq!(r.checkpoints, 14);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_is_on_disk_when_record_returns() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(config(dir.path())).await.unwrap();
    for i in 0..3 {
        let seq = log.record(event(1, i)).await.unwrap();
        let lines = read_lines(&log_files(dir.path())[0]);
        assert_eq!(lines.len() as u64, seq + 1);
    }
    log.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_come_by_time_as_well_as_by_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.checkpoint_every = 1_000_000;
    cfg.checkpoint_interval = Duration::from_millis(200);
    cfg.syslog = true; // best effort: must not fail whether or not /dev/log exists
    let log = AuditLog::open(cfg).await.unwrap();
    for i in 0..3 {
        log.record(event(0, i)).await.unwrap();
    }
    // The first record is signed at once (a fresh trail), the other two within the interval.
    let cp = dir.path().join(CHECKPOINT_FILE);
    let first = read_lines(&cp)
        .first()
        .map(|l| Checkpoint::parse(l.as_bytes()).unwrap().seq);
    assert_eq!(first, Some(0));
    let mut signed = None;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        signed = read_lines(&cp)
            .last()
            .map(|l| Checkpoint::parse(l.as_bytes()).unwrap().seq);
        if signed == Some(2) {
            break;
        }
    }
    assert_eq!(signed, Some(2));
    // Nothing new: no new checkpoint.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(read_lines(&cp).len(), 2);
    log.close().await.unwrap();
    assert_eq!(read_lines(&cp).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_lock_and_permissions() {
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("audit");
    let log = AuditLog::open(config(&dir)).await.unwrap();
    assert!(matches!(
        AuditLog::open(config(&dir)).await,
        Err(AuditError::Locked { .. })
    ));
    log.record(event(0, 0)).await.unwrap();
    let other = log.clone();
    log.close().await.unwrap();
    assert!(matches!(
        other.record(event(0, 1)).await,
        Err(AuditError::Closed)
    ));
    other.close().await.unwrap();

    let mode = |p: &std::path::Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
    assert_eq!(mode(&log_files(&dir)[0]), 0o600);

    // Reopening right after close works and continues the chain.
    let log = AuditLog::open(config(&dir)).await.unwrap();
    assert_eq!(log.record(event(0, 1)).await.unwrap(), 1);
    drop(log);
    // Dropping every handle also signs and stops the writer.
    for _ in 0..50 {
        let r = verify(&dir, None).unwrap();
        if r.ok() && r.unsigned() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = verify(&dir, None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!((r.records, r.unsigned()), (2, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_truncated_behind_its_checkpoints_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write(config(dir.path()), 15).await;
    let file = log_files(dir.path()).pop().unwrap();
    let mut lines = read_lines(&file);
    lines.truncate(12);
    audit_support::write_lines(&file, &lines);
    assert!(matches!(
        AuditLog::open(config(dir.path())).await,
        Err(AuditError::BehindCheckpoint {
            checkpoint: 14,
            next: 12
        })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_writes_the_record_and_durable_waits_for_its_fdatasync() {
    let dir = tempfile::tempdir().unwrap();
    // Small files are not preallocated: the test reads the file after each append.
    let mut cfg = config(dir.path());
    cfg.rotate_bytes = 512 * 1024;
    let log = AuditLog::open(cfg).await.unwrap();
    assert!(log.is_healthy());
    let mut pending = Vec::new();
    for i in 0..20 {
        let a = log.append(&event(2, i)).unwrap();
        assert_eq!(a.seq(), u64::from(i));
        // In the file as soon as append returns (before any fdatasync): the daemon may die now and it stays.
        let lines = read_lines(&log_files(dir.path())[0]);
        assert_eq!(
            parse_record(lines[i as usize].as_bytes()).unwrap().seq,
            a.seq()
        );
        pending.push(a);
    }
    // Awaited in any order, each resolves with its own seq.
    for a in pending.into_iter().rev() {
        let seq = a.seq();
        assert_eq!(a.durable().await.unwrap(), seq);
    }
    let mut health = log.health();
    log.close().await.unwrap();
    assert!(matches!(
        *health.wait_for(|h| !h.is_healthy()).await.unwrap(),
        enforcer::audit::Health::Closed
    ));
    assert!(matches!(log.append(&event(2, 20)), Err(AuditError::Closed)));

    // The explicit opt-out: durable() resolves at once, without waiting for a sync.
    let mut cfg = config(dir.path());
    cfg.durable = false;
    let log = AuditLog::open(cfg).await.unwrap();
    let a = log.append(&event(2, 20)).unwrap();
    assert_eq!(
        tokio::time::timeout(Duration::from_millis(1), a.durable())
            .await
            .unwrap()
            .unwrap(),
        20
    );
    log.close().await.unwrap();
    let r = verify(dir.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!((r.records, r.unsigned()), (21, 0));
}

/// The sync thread runs as `SCHED_BATCH` (sched(7)), so that waking it to flush a record does not preempt the thread
/// that appended it: every `audit-sync` thread of this process reports policy 3 (`SCHED_BATCH`) once it has started
/// (other tests' logs have theirs too, possibly just starting: hence the short wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_thread_does_not_preempt_the_threads_that_append() {
    const SCHED_BATCH: u32 = 3;
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(config(dir.path())).await.unwrap();
    // Durable, so this log's sync thread has run a round.
    assert_eq!(log.record(event(0, 0)).await.unwrap(), 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let policies = loop {
        let policies = sync_thread_policies();
        if policies.iter().all(|p| *p == SCHED_BATCH) || std::time::Instant::now() > deadline {
            break policies;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(!policies.is_empty(), "no audit-sync thread");
    assert!(policies.iter().all(|p| *p == SCHED_BATCH), "{policies:?}");
    log.close().await.unwrap();
}

/// The scheduling policy of each of this process's `audit-sync` threads: field 41 of `/proc/self/task/<tid>/stat`
/// (proc_pid_stat(5)), counted after the parenthesised name, which may hold spaces.
fn sync_thread_policies() -> Vec<u32> {
    fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| {
            let task = task.ok()?.path();
            (fs::read_to_string(task.join("comm")).ok()?.trim() == "audit-sync").then_some(())?;
            let stat = fs::read_to_string(task.join("stat")).ok()?;
            let (_, after_name) = stat.rsplit_once(')')?;
            // After the name come fields 3 (state) onwards.
            after_name.split_whitespace().nth(41 - 3)?.parse().ok()
        })
        .collect()
}
