//! Crash semantics (docs/audit.md, "Durability and crashes"), each crash point injected for real, then recovery on
//! reopen and `verify`:
//!
//! - the daemon killed (SIGKILL) while records are appended but not yet durable: nothing appended is lost;
//! - a kernel crash: the file cut back to what an `fdatasync` covered, then torn bytes: every record that was
//!   acknowledged durable survives, the rest is moved aside;
//! - a crash while the file rotated away from was still being sealed: the newer file, which follows lost records, is
//!   moved aside whole;
//! - a power cut on a real ext4 file system on a loop device: the device's image copied while the killed writer's
//!   unsynced records are still only in the page cache, then mounted (journal replay) and reopened (root only).
//!
//! The writer runs in a child process (this test binary, re-run with `CHILD_DIR` set) that appends as the proxy does:
//! append, then `durable()` awaited in its own task. It prints `A <seq> <task> <i>` once a record is appended and
//! `D <seq>` once it is durable, so the parent knows exactly what each crash may and may not lose.

mod audit_support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use audit_support::{config, event, log_files, read_lines, root_or_skip, Mount};
use enforcer::audit::read::{list_files, read_file};
use enforcer::audit::record::{parse_record, Entry};
use enforcer::audit::{verify, AuditLog};
use tokio::sync::Semaphore;

const CHILD_DIR: &str = "AUDIT_CRASH_CHILD_DIR";
const CHILD_ROTATE: &str = "AUDIT_CRASH_CHILD_ROTATE";
const CHILD_COMPRESS: &str = "AUDIT_CRASH_CHILD_COMPRESS";

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// In the child: run the writer until killed. Returns `false` in the parent.
fn child() -> bool {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return false;
    };
    let rotate: u64 = std::env::var(CHILD_ROTATE).unwrap().parse().unwrap();
    let compress = std::env::var_os(CHILD_COMPRESS).is_some();
    block_on(async move {
        let mut cfg = config(Path::new(&dir));
        cfg.rotate_bytes = rotate;
        cfg.compress = compress;
        // Only the first records are signed: a simulated crash may then cut anything not acknowledged durable.
        cfg.checkpoint_every = 1_000_000;
        let log = AuditLog::open(cfg).await.unwrap();
        for task in 0..8u32 {
            let log = log.clone();
            tokio::spawn(async move {
                let window = Arc::new(Semaphore::new(16));
                for i in 0.. {
                    let permit = window.clone().acquire_owned().await.unwrap();
                    let appended = log.append(&event(task, i)).unwrap();
                    let seq = appended.seq();
                    say(&format!("A {seq} {task} {i}\n"));
                    tokio::spawn(async move {
                        if appended.durable().await.is_ok() {
                            say(&format!("D {seq}\n"));
                        }
                        drop(permit);
                    });
                }
            });
        }
        tokio::time::sleep(Duration::from_secs(120)).await;
    });
    true
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes()).unwrap();
    out.flush().unwrap();
}

/// What the child reported before it was killed.
struct Crashed {
    /// seq → (task, i) of every record reported appended.
    appended: BTreeMap<u64, (u32, u32)>,
    /// Every record reported durable.
    durable: BTreeSet<u64>,
    /// Records appended but not (yet) reported durable when the kill was sent.
    pending_at_kill: usize,
}

/// Run this test's child on `dir` and SIGKILL it once `target` records are appended while some are not yet durable.
fn crash_child(test: &str, dir: &Path, rotate: u64, compress: bool, target: usize) -> Crashed {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR, dir)
        .env(CHILD_ROTATE, rotate.to_string())
        .stdout(Stdio::piped());
    if compress {
        cmd.env(CHILD_COMPRESS, "1");
    }
    let mut child = cmd.spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let rx = audit_support::lines(out);
    let mut c = Crashed {
        appended: BTreeMap::new(),
        durable: BTreeSet::new(),
        pending_at_kill: 0,
    };
    let note = |c: &mut Crashed, line: &str| {
        // The test harness's own "test … ... " has no newline of its own: look at the end of the line.
        let f: Vec<&str> = line.split(' ').collect();
        let tail = |n: usize| &f[f.len().saturating_sub(n)..];
        match (tail(4), tail(2)) {
            (["A", seq, task, i], _) => {
                c.appended.insert(
                    seq.parse().unwrap(),
                    (task.parse().unwrap(), i.parse().unwrap()),
                );
            }
            (_, ["D", seq]) => {
                c.durable.insert(seq.parse().unwrap());
            }
            _ => {}
        }
    };
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the child stopped reporting");
        note(&mut c, &line);
        if c.appended.len() >= target && c.durable.len() > 100 {
            let pending = c.appended.keys().filter(|s| !c.durable.contains(s)).count();
            if pending > 0 {
                child.kill().unwrap();
                c.pending_at_kill = pending;
                break;
            }
        }
    }
    // Whatever the child printed before it died is still in the pipe.
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(10)) {
        note(&mut c, &line);
    }
    child.wait().unwrap();
    assert!(c.pending_at_kill > 0);
    assert!(c.durable.iter().all(|s| c.appended.contains_key(s)));
    c
}

/// Every record of the trail in `dir`, by seq, as (pid, path) — what `event(task, i)` puts in it.
fn contents(dir: &Path) -> BTreeMap<u64, (Option<u32>, Option<String>)> {
    let mut out = BTreeMap::new();
    for f in list_files(dir).unwrap() {
        for l in read_file(&f).unwrap() {
            if let Entry::Decision(r) = l.entry {
                out.insert(r.seq, (r.agent.pid, r.request.path));
            }
        }
    }
    out
}

fn assert_holds(dir: &Path, seqs: impl IntoIterator<Item = u64>, c: &Crashed) {
    let have = contents(dir);
    for seq in seqs {
        let (task, i) = c.appended[&seq];
        assert_eq!(
            have.get(&seq),
            Some(&(Some(task), Some(format!("/v1/item/{i}")))),
            "record {seq} (writer {task}, #{i}) was lost or changed"
        );
    }
}

fn torn_files(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains(".torn-"))
        .collect()
}

/// Reopen (recovery), check `verify`, and that the chain continues right after `last`.
async fn reopen_and_continue(dir: &Path, last: u64) {
    let log = AuditLog::open(config(dir)).await.unwrap();
    let r = verify(dir, None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!(r.last_seq, Some(last));
    assert_eq!(log.record(event(99, 0)).await.unwrap(), last + 1);
    log.close().await.unwrap();
    let r = verify(dir, None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!((r.records, r.unsigned()), (last + 2, 0));
}

#[test]
fn a_killed_daemon_loses_no_appended_record() {
    if child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Small files: the kill also lands amid rotations and compressions.
    let c = crash_child(
        "a_killed_daemon_loses_no_appended_record",
        dir.path(),
        32 * 1024,
        true,
        3000,
    );
    // The page cache survives the process: every record reported appended is there, durable or not.
    assert_holds(dir.path(), c.appended.keys().copied(), &c);
    let last = *contents(dir.path()).keys().last().unwrap();
    assert!(last >= *c.appended.keys().last().unwrap());
    block_on(reopen_and_continue(dir.path(), last));
    eprintln!(
        "killed with {} of {} appended records not yet reported durable; all {} kept",
        c.pending_at_kill,
        c.appended.len(),
        last + 1
    );
}

#[test]
fn a_kernel_crash_loses_only_records_not_yet_durable() {
    if child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = crash_child(
        "a_kernel_crash_loses_only_records_not_yet_durable",
        dir.path(),
        64 << 20,
        false,
        3000,
    );
    let durable_max = *c.durable.last().unwrap();
    // The kernel loses everything after the last fdatasync: cut the file right after the newest record reported
    // durable (the fdatasync covered at least that much), then leave what a crash leaves in unsynced pages: a gap of
    // NULs and half a record.
    let files = log_files(dir.path());
    assert_eq!(files.len(), 1);
    let file = &files[0];
    let lines = read_lines(file);
    let keep: usize = lines
        .iter()
        .take_while(|l| parse_record(l.as_bytes()).unwrap().seq <= durable_max)
        .map(|l| l.len() + 1)
        .sum();
    let mut data = fs::read(file).unwrap();
    data.truncate(keep);
    let mut junk = vec![0u8; 4096];
    // Half of the record after the last durable one; when every record was durable at the crash, half of a copy of
    // the last one (what the unsynced pages held does not matter, only that a torn tail is kept aside whole).
    let next = lines
        .get(usize::try_from(durable_max).unwrap() + 1)
        .unwrap_or(&lines[lines.len() - 1]);
    junk.extend_from_slice(&next.as_bytes()[next.len() / 2..]);
    junk.push(b'\n');
    data.extend_from_slice(&junk);
    fs::write(file, &data).unwrap();

    block_on(reopen_and_continue(dir.path(), durable_max));
    assert_holds(dir.path(), c.durable.iter().copied(), &c);
    let torn = torn_files(dir.path());
    assert_eq!(torn.len(), 1);
    assert_eq!(fs::read(&torn[0]).unwrap(), junk);
}

#[test]
fn a_crash_while_the_previous_file_was_being_sealed_is_recovered() {
    if child() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    crash_child(
        "a_crash_while_the_previous_file_was_being_sealed_is_recovered",
        dir.path(),
        8 * 1024,
        false,
        600,
    );
    // A file created just before the crash may hold nothing (or not exist at all after a power cut).
    let mut files = log_files(dir.path());
    while read_lines(files.last().unwrap()).is_empty() {
        fs::remove_file(files.pop().unwrap()).unwrap();
    }
    assert!(files.len() >= 3, "{files:?}");
    // The writer had rotated and written records to the newest file while the file before it was still being synced:
    // the crash kept the newer file's pages but lost the older file's last two records, and left half a line.
    let (older, newer) = (&files[files.len() - 2], &files[files.len() - 1]);
    let mut lines = read_lines(older);
    let lost = lines.split_off(lines.len() - 2);
    let mut data = lines.join("\n").into_bytes();
    data.push(b'\n');
    data.extend_from_slice(&lost[0].as_bytes()[..lost[0].len() / 3]);
    fs::write(older, &data).unwrap();
    let newer_bytes = fs::read(newer).unwrap();
    let last = parse_record(lines.last().unwrap().as_bytes()).unwrap().seq;

    block_on(reopen_and_continue(dir.path(), last));
    // Nothing was deleted: the newer file's records and the torn half line were moved aside.
    let torn = torn_files(dir.path());
    assert_eq!(torn.len(), 2, "{torn:?}");
    let aside: Vec<Vec<u8>> = torn.iter().map(|p| fs::read(p).unwrap()).collect();
    let trimmed = &newer_bytes[..newer_bytes.iter().rposition(|&b| b != 0).unwrap() + 1];
    assert!(
        aside.iter().any(|a| a == trimmed),
        "the newer file was not kept aside"
    );
    assert!(aside
        .iter()
        .any(|a| a.as_slice() == &lost[0].as_bytes()[..lost[0].len() / 3]));
}

#[test]
fn a_power_cut_on_ext4_keeps_every_durable_record() {
    if child() || !root_or_skip() {
        return;
    }
    let base = tempfile::tempdir().unwrap();
    let image = base.path().join("disk.img");
    let crashed = base.path().join("crashed.img");
    Mount::make_ext4(&image, 128);
    let c;
    {
        let disk = Mount::loop_ext4(&image, &base.path().join("disk"));
        let dir = disk.dir.join("audit");
        c = crash_child(
            "a_power_cut_on_ext4_keeps_every_durable_record",
            &dir,
            64 << 20,
            false,
            3000,
        );
        // The power cut: the device's content right now is what a crash would leave. The killed writer's unsynced
        // records are still dirty pages of the mounted file system, not on the device.
        fs::copy(&image, &crashed).unwrap();
        assert_holds(&dir, c.appended.keys().copied(), &c);
    }
    let disk = Mount::loop_ext4(&crashed, &base.path().join("after"));
    let dir = disk.dir.join("audit");
    block_on(async {
        let log = AuditLog::open(config(&dir)).await.unwrap();
        log.close().await.unwrap();
    });
    let r = verify(&dir, None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    // Every record acknowledged durable survived the power cut, with its content.
    assert_holds(&dir, c.durable.iter().copied(), &c);
    let kept = r.last_seq.unwrap();
    assert!(kept >= *c.durable.last().unwrap());
    let lost = c.appended.keys().filter(|&&s| s > kept).count();
    eprintln!(
        "power cut: {} records appended, {} acknowledged durable, {kept} + 1 on the device, {lost} lost",
        c.appended.len(),
        c.durable.len()
    );
    drop(disk);
}
