//! Sealing and retention on a real trail: rotated files compressed with zstd and the oldest deleted by size and by age,
//! under many concurrent writers; the pruned trail still verifies from its first kept record, the deletion is a
//! signed record in the chain, the readers read compressed files, and tampering with what is kept (inside a compressed
//! file too) or deleting more than retention did is still found.

mod audit_support;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use audit_support::{config, event, log_files, rechain, stated_hash};
use enforcer::audit::read::{list_files, read_file};
use enforcer::audit::record::{parse_record, Entry, RetentionReason};
use enforcer::audit::{verify, AuditConfig, AuditLog, Problem};

fn sealing(dir: &Path) -> AuditConfig {
    let mut cfg = config(dir);
    cfg.compress = true;
    cfg.rotate_bytes = 16 * 1024;
    cfg.checkpoint_every = 100;
    cfg
}

/// Wait until every file but the newest is compressed (the seal thread works in the background).
fn wait_sealed(dir: &Path) {
    let start = Instant::now();
    loop {
        let files = list_files(dir).unwrap();
        if files.iter().rev().skip(1).all(|f| f.compressed) {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{files:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every retention record in the trail.
fn retentions(dir: &Path) -> Vec<enforcer::audit::record::RetentionRecord> {
    let mut out = Vec::new();
    for f in list_files(dir).unwrap() {
        // While the writer runs, retention may delete (or sealing replace) a file between the listing and the read.
        let Ok(lines) = read_file(&f) else { continue };
        for l in lines {
            if let Entry::Retention(r) = l.entry {
                out.push(r);
            }
        }
    }
    out
}

/// The bytes of the trail's files. Called while retention runs: a file it deletes between the listing and the
/// `stat` counts for nothing, as it is gone.
fn on_disk(dir: &Path) -> u64 {
    log_files(dir)
        .iter()
        .map(|p| fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}

/// 64 writers, each appending and awaiting durability the way the proxy does.
async fn load(log: &AuditLog, writers: u32, each: u32) {
    let mut tasks = Vec::new();
    for task in 0..writers {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                let a = log.append(&event(task, i)).unwrap();
                a.durable().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trail_rotated_compressed_and_pruned_under_load_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = sealing(dir.path());
    cfg.max_total_bytes = 64 * 1024;
    let log = AuditLog::open(cfg.clone()).await.unwrap();
    load(&log, 64, 100).await;
    // Retention runs after each file is sealed: wait for the last ones.
    let start = Instant::now();
    while list_files(dir.path())
        .unwrap()
        .iter()
        .rev()
        .skip(1)
        .any(|f| !f.compressed)
        || on_disk(dir.path()) > cfg.max_total_bytes
    {
        assert!(start.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    log.close().await.unwrap();

    let r = verify(dir.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    let first = r.first_seq.unwrap();
    let last = r.last_seq.unwrap();
    assert!(first > 0, "nothing was pruned");
    assert_eq!(r.records, last - first + 1);
    // Retention deletes the oldest records: what is kept of each writer's 100 records is the newest ones, in order.
    let mut kept: Vec<Vec<u32>> = vec![Vec::new(); 64];
    let mut entries = 0;
    for f in list_files(dir.path()).unwrap() {
        for l in read_file(&f).unwrap() {
            entries += 1;
            if let Entry::Decision(rec) = l.entry {
                let i: u32 = rec.request.path.unwrap()["/v1/item/".len()..]
                    .parse()
                    .unwrap();
                kept[rec.agent.pid.unwrap() as usize].push(i);
            }
        }
    }
    assert_eq!(entries, r.records);
    for (task, is) in kept.iter().enumerate() {
        let from = 100 - is.len() as u32;
        assert_eq!(*is, (from..100).collect::<Vec<_>>(), "writer {task}");
    }
    let rets = retentions(dir.path());
    assert!(!rets.is_empty());
    // The retention record that accounts for the start is signed and names exactly the records before it.
    let by = rets.iter().find(|x| Some(x.seq) == r.pruned_by).unwrap();
    assert_eq!(by.retention.kept_from, first);
    assert_eq!(by.retention.reason, RetentionReason::MaxBytes);
    assert!(by
        .retention
        .deleted
        .iter()
        .all(|d| !dir.path().join(&d.file).exists()));
    assert!(r.last_checkpoint.unwrap() >= by.seq);
    // Everything but the newest file is compressed, and the trail is within its bound.
    let files = list_files(dir.path()).unwrap();
    assert!(files.len() > 2);
    assert!(files[..files.len() - 1].iter().all(|f| f.compressed));
    assert!(on_disk(dir.path()) <= cfg.max_total_bytes);

    // The readers read compressed files: every kept record, retention records included.
    let o = Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .args([
            "audit",
            "tail",
            dir.path().to_str().unwrap(),
            "-n",
            "100000",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    let out = String::from_utf8(o.stdout).unwrap();
    assert_eq!(out.lines().count() as u64, r.records);
    let o = Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .args([
            "audit",
            "query",
            dir.path().to_str().unwrap(),
            "--since",
            "1h",
        ])
        .output()
        .unwrap();
    let table = String::from_utf8(o.stdout).unwrap();
    assert!(
        table
            .lines()
            .any(|l| l.contains("retention") && l.contains("max_bytes")),
        "{table}"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .args(["audit", "verify", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let said = String::from_utf8(o.stdout).unwrap();
    assert!(
        said.starts_with(&format!(
            "OK: {} records (seq {first} to {last})",
            r.records
        )),
        "{said}"
    );
    assert!(
        said.contains(&format!(
            "records 0 to {} were deleted by retention",
            first - 1
        )),
        "{said}"
    );

    // The chain goes on after a restart.
    let log = AuditLog::open(cfg).await.unwrap();
    assert_eq!(log.record(event(0, 0)).await.unwrap(), last + 1);
    log.close().await.unwrap();
    assert!(verify(dir.path(), None).unwrap().ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_older_than_the_age_limit_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = sealing(dir.path());
    cfg.rotate_bytes = 4096;
    cfg.max_age = Some(Duration::from_secs(1));
    let log = AuditLog::open(cfg).await.unwrap();
    for i in 0..60 {
        log.record(event(0, i)).await.unwrap();
    }
    let old_files = list_files(dir.path()).unwrap().len();
    assert!(old_files > 3);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A new file: the old ones now end more than a second before it starts.
    for i in 60..70 {
        log.record(event(0, i)).await.unwrap();
    }
    let start = Instant::now();
    while retentions(dir.path()).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(20));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    log.close().await.unwrap();
    let rets = retentions(dir.path());
    assert!(rets
        .iter()
        .all(|r| r.retention.reason == RetentionReason::MaxAge));
    let r = verify(dir.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert!(r.first_seq.unwrap() > 0);
    // Only files whose records were all older than the limit went.
    assert!(r.first_seq.unwrap() <= 60);
}

/// A pruned trail in plain files (so the test can edit them), closed and verified.
async fn pruned_trail() -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = sealing(dir.path());
    cfg.compress = false;
    cfg.rotate_bytes = 4096;
    cfg.max_total_bytes = 24 * 1024;
    cfg.checkpoint_every = 10;
    let log = AuditLog::open(cfg).await.unwrap();
    for i in 0..300 {
        log.record(event(0, i)).await.unwrap();
    }
    let start = Instant::now();
    while retentions(dir.path()).is_empty() || on_disk(dir.path()) > 24 * 1024 {
        if start.elapsed() > Duration::from_secs(20) {
            for f in fs::read_dir(dir.path()).unwrap() {
                let f = f.unwrap();
                eprintln!("{:?} {}", f.file_name(), f.metadata().unwrap().len());
            }
            panic!("retention did not bring the trail under its bound");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    log.close().await.unwrap();
    let r = verify(dir.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert!(r.first_seq.unwrap() > 0);
    let files = log_files(dir.path());
    (dir, files)
}

/// The seq and prev of a line, decision or retention record.
fn head(line: &str) -> (u64, String) {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    (
        v["seq"].as_u64().unwrap(),
        v["prev"].as_str().unwrap().to_owned(),
    )
}

fn first_line(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned()
}

/// Delete the files retention deleted or was about to (a close can stop the seal thread between signing its record
/// and deleting), and one more: return the seq and prev of the record the trail now starts with.
fn delete_past_retention(dir: &Path, files: &[PathBuf]) -> (u64, String) {
    let kept_from = retentions(dir)
        .iter()
        .map(|r| r.retention.kept_from)
        .max()
        .unwrap();
    for f in files {
        if head(&first_line(f)).0 <= kept_from {
            fs::remove_file(f).unwrap();
        }
    }
    let rest = log_files(dir);
    head(&first_line(&rest[0]))
}

fn first_problem(dir: &Path) -> Problem {
    let r = verify(dir, None).unwrap();
    assert!(!r.ok(), "tampering went unnoticed");
    r.problems[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_more_than_retention_did_is_found() {
    let (dir, files) = pruned_trail().await;
    let first = verify(dir.path(), None).unwrap().first_seq.unwrap();
    let (gone, _) = delete_past_retention(dir.path(), &files);
    let p = first_problem(dir.path());
    assert!(
        matches!(p, Problem::Pruned { from: 0, to, .. } if to == gone - 1),
        "{p}"
    );
    assert!(
        p.to_string()
            .contains("no signed retention record accounts for them"),
        "{p}"
    );
    assert!(gone > first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_retention_record_after_the_last_checkpoint_does_not_explain_a_deletion() {
    let (dir, files) = pruned_trail().await;
    // Delete the oldest kept file and append, past the last checkpoint, a retention record that would account for it,
    // chained as the format says (no key is needed for records no checkpoint signs yet).
    let (head_seq, head_prev) = delete_past_retention(dir.path(), &files);
    let newest = files.last().unwrap();
    let mut lines: Vec<String> = fs::read_to_string(newest)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let (last_seq, _) = head(lines.last().unwrap());
    let mut forged = vec![format!(
        "{{\"seq\":0,\"ts\":\"2026-01-01T00:00:00.000000Z\",\"prev\":\"\",\"retention\":{{\"reason\":\"max_bytes\",\
         \"deleted\":[],\"first_seq\":0,\"last_seq\":{},\"last_hash\":\"{}\",\"kept_from\":{}}},\"hash\":\"\"}}",
        head_seq - 1,
        head_prev,
        head_seq
    )];
    rechain(
        &mut forged,
        last_seq + 1,
        stated_hash(lines.last().unwrap()),
    );
    lines.extend(forged);
    audit_support::write_lines(newest, &lines);
    let p = first_problem(dir.path());
    assert!(matches!(p, Problem::Pruned { .. }), "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_in_a_pruned_trail_are_found() {
    let (dir, files) = pruned_trail().await;
    // An edit of the first kept record, with the chain recomputed up to the end: the signed checkpoints disagree.
    let mut all: Vec<(PathBuf, Vec<String>)> = files
        .iter()
        .map(|f| {
            (
                f.clone(),
                fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .map(str::to_owned)
                    .collect(),
            )
        })
        .collect();
    let original: Vec<(PathBuf, Vec<String>)> = all.clone();
    all[0].1[0] = all[0].1[0].replacen("\"ts\":\"2", "\"ts\":\"1", 1);
    let mut flat: Vec<String> = all.iter().flat_map(|(_, l)| l.clone()).collect();
    let (first, first_prev) = head(&original[0].1[0]);
    let mut prev = [0u8; 32];
    hex::decode_to_slice(&first_prev, &mut prev).unwrap();
    rechain(&mut flat, first, prev);
    let mut at = 0;
    for (path, lines) in &all {
        audit_support::write_lines(path, &flat[at..at + lines.len()]);
        at += lines.len();
    }
    let p = first_problem(dir.path());
    assert!(matches!(p, Problem::Rewritten { .. }), "{p}");
    for (path, lines) in &original {
        audit_support::write_lines(path, lines);
    }
    assert!(verify(dir.path(), None).unwrap().ok());

    // Two kept records swapped.
    let mut lines = original[1].1.clone();
    lines.swap(0, 1);
    audit_support::write_lines(&original[1].0, &lines);
    let p = first_problem(dir.path());
    assert!(
        matches!(p, Problem::Reordered { .. } | Problem::Inserted { .. }),
        "{p}"
    );
    audit_support::write_lines(&original[1].0, &original[1].1);

    // The newest file dropped (with the checkpoints that sign it left in place).
    fs::remove_file(&original.last().unwrap().0).unwrap();
    let r = verify(dir.path(), None).unwrap();
    assert!(
        r.problems
            .iter()
            .any(|p| matches!(p, Problem::Truncated { .. })),
        "{:?}",
        r.problems
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_inside_a_compressed_file_is_found() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = sealing(dir.path());
    cfg.rotate_bytes = 4096;
    let log = AuditLog::open(cfg).await.unwrap();
    for i in 0..120 {
        log.record(event(0, i)).await.unwrap();
    }
    wait_sealed(dir.path());
    log.close().await.unwrap();
    assert!(verify(dir.path(), None).unwrap().ok());
    let files = list_files(dir.path()).unwrap();
    let target = files
        .iter()
        .filter(|f| f.compressed)
        .nth(2)
        .unwrap()
        .clone();
    let packed = fs::read(&target.path).unwrap();
    let text = String::from_utf8(zstd::decode_all(&packed[..]).unwrap()).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let seq = parse_record(lines[2].as_bytes()).unwrap().seq;
    lines[2] = lines[2].replace("\"status\":", "\"status\":1");
    let mut edited = lines.join("\n");
    edited.push('\n');
    fs::write(
        &target.path,
        zstd::encode_all(edited.as_bytes(), 1).unwrap(),
    )
    .unwrap();
    let p = first_problem(dir.path());
    assert!(
        matches!(p, Problem::Edited { seq: s, .. } if s == seq),
        "{p}"
    );
    let name = target
        .path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(p.to_string().contains(&format!("{name}:3")), "{p}");

    // A flipped byte in the compressed bytes themselves: the frame's checksum (or the format) fails.
    let mut flipped = packed.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x40;
    fs::write(&target.path, &flipped).unwrap();
    let p = first_problem(dir.path());
    assert!(
        matches!(&p, Problem::Unreadable { file, .. } if *file == target.path)
            || matches!(p, Problem::Edited { .. } | Problem::Malformed { .. }),
        "{p}"
    );
    fs::write(&target.path, &packed).unwrap();
    assert!(verify(dir.path(), None).unwrap().ok());
}

#[tokio::test]
async fn a_bound_that_cannot_hold_two_files_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = sealing(dir.path());
    cfg.max_total_bytes = cfg.rotate_bytes * 2 - 1;
    let e = AuditLog::open(cfg).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("must be 0 (no limit) or at least twice audit.rotate_bytes"),
        "{e}"
    );
}
