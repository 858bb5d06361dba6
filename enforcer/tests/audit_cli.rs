//! `enforcer audit verify|tail|query` run as the built binary against a trail on disk.

mod audit_support;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use audit_support::{config, event, log_files, read_lines, write, write_lines};
use enforcer::audit::record::parse_record;
use enforcer::audit::AuditLog;

fn enforcer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn seqs(out: &str) -> Vec<u64> {
    out.lines()
        .map(|l| parse_record(l.as_bytes()).unwrap().seq)
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_ok_and_failures_with_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    write(config(dir.path()), 50).await;
    let o = enforcer(&["audit", "verify", s(dir.path())]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(
        stdout(&o).starts_with("OK: 50 records (seq 0 to 49) in 1 files"),
        "{}",
        stdout(&o)
    );
    assert!(
        stdout(&o).contains("6 checkpoints verified"),
        "{}",
        stdout(&o)
    );

    let kept = tempfile::tempdir().unwrap();
    let key = kept.path().join("audit.pub");
    std::fs::copy(dir.path().join("audit.pub"), &key).unwrap();
    let o = enforcer(&["audit", "verify", s(dir.path()), "--key", s(&key)]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));

    // Another key: every signature is rejected.
    let other = tempfile::tempdir().unwrap();
    write(config(other.path()), 1).await;
    let o = enforcer(&[
        "audit",
        "verify",
        s(dir.path()),
        "--key",
        s(&other.path().join("audit.pub")),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("FAILED: bad signature: checkpoint 1"),
        "{}",
        stdout(&o)
    );

    let file = &log_files(dir.path())[0];
    let mut lines = read_lines(file);
    lines.remove(30);
    write_lines(file, &lines);
    let o = enforcer(&["audit", "verify", s(dir.path())]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).starts_with(
            "FAILED: deleted: record 30 is missing before audit-00000000000000000000.jsonl:31"
        ),
        "{}",
        stdout(&o)
    );

    let o = enforcer(&["audit", "verify", s(&dir.path().join("nope"))]);
    assert_ne!(o.status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_the_last_records() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.rotate_bytes = 2048;
    write(cfg, 40).await;
    let o = enforcer(&["audit", "tail", s(dir.path()), "-n", "12", "--json"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(seqs(&stdout(&o)), (28..40).collect::<Vec<_>>());
    let o = enforcer(&["audit", "tail", s(dir.path()), "-n", "3"]);
    let out = stdout(&o);
    let rows: Vec<&str> = out.lines().collect();
    assert_eq!(rows.len(), 4, "{out}");
    assert!(rows[0].contains("VERDICT") && rows[0].contains("DESTINATION"));
    assert!(rows[3].trim_start().starts_with("39 "), "{out}");
    assert!(
        rows[3].contains("block")
            && rows[3].contains("pastebin.com:443")
            && rows[3].contains("blocked 403")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follow_prints_new_records_across_rotation_and_compression() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.rotate_bytes = 2048;
    cfg.compress = true;
    write(cfg.clone(), 5).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .args(["audit", "tail", s(dir.path()), "-f", "-n", "1", "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let rx = audit_support::lines(out);
    let first = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(parse_record(first.as_bytes()).unwrap().seq, 4);
    let log = AuditLog::open(cfg).await.unwrap();
    for i in 5..25 {
        log.record(event(3, i)).await.unwrap();
    }
    log.close().await.unwrap();
    assert!(log_files(dir.path()).len() > 2);
    let mut got = Vec::new();
    while got.len() < 20 {
        let line = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        got.push(parse_record(line.as_bytes()).unwrap().seq);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(got, (5..25).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_filters() {
    let dir = tempfile::tempdir().unwrap();
    write(config(dir.path()), 40).await;
    let d = s(dir.path());
    let q = |args: &[&str]| {
        let mut all = vec!["audit", "query", d, "--json"];
        all.extend_from_slice(args);
        let o = enforcer(&all);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        seqs(&stdout(&o))
    };
    assert_eq!(q(&[]).len(), 40);
    assert_eq!(
        q(&["--verdict", "block"]),
        (0..40).filter(|i| i % 4 == 3).collect::<Vec<_>>()
    );
    assert_eq!(
        q(&["--host", "*.example.com"]),
        (0..40).filter(|i| i % 2 == 0).collect::<Vec<_>>()
    );
    assert_eq!(
        q(&["--host", "pastebin.com", "--verdict", "log"]),
        (0..40).filter(|i| i % 4 == 1).collect::<Vec<_>>()
    );
    assert_eq!(
        q(&["--tool", "read_file"]),
        (0..40).filter(|i| i % 3 == 0).collect::<Vec<_>>()
    );
    // Matches the deciding rule or any matching rule.
    assert_eq!(
        q(&["--rule", "rule-1"]),
        (0..40).filter(|i| i % 3 == 1).collect::<Vec<_>>()
    );
    assert_eq!(q(&["--rule", "log-everything"]).len(), 40);
    assert_eq!(q(&["--profile", "coder"]).len(), 40);
    assert_eq!(q(&["--profile", "researcher"]).len(), 0);
    assert_eq!(q(&["--since", "1h"]).len(), 40);
    assert_eq!(q(&["--until", "2000-01-01T00:00:00Z"]).len(), 0);
    assert_eq!(
        q(&["--since", "2000-01-01T00:00:00Z", "--until", "1h"]).len(),
        0
    );

    let o = enforcer(&["audit", "query", d, "--verdict", "constrain"]);
    let out = stdout(&o);
    assert_eq!(out.lines().count(), 11, "{out}");
    assert!(out.lines().nth(1).unwrap().contains("[1 changed]"), "{out}");

    let o = enforcer(&["audit", "query", d, "--verdict", "deny"]);
    assert_eq!(o.status.code(), Some(2));
}

/// Run `args` with a standard output whose reader is already gone, as in `enforcer audit tail | head -1` once `head`
/// has exited: the first write fails with EPIPE.
fn closed_stdout(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_enforcer"))
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_printing_command_ends_quietly_when_its_reader_is_gone() {
    use std::os::unix::process::ExitStatusExt as _;
    let dir = tempfile::tempdir().unwrap();
    write(config(dir.path()), 30).await;
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "version: 1\ndefault: allow\n").unwrap();
    let d = s(dir.path());
    for args in [
        &["audit", "verify", d][..],
        &["audit", "tail", d, "-n", "20"],
        &["audit", "tail", d, "-n", "20", "--json"],
        &["audit", "query", d, "--json"],
        &["audit", "query", d, "--verdict", "block"],
        &["policy", "check", s(&policy)],
    ] {
        let o = closed_stdout(args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
        // Ended by SIGPIPE, as `cat` or `grep` would be.
        assert_eq!(
            o.status.signal(),
            Some(libc::SIGPIPE),
            "{args:?}: {:?}",
            o.status
        );
    }
    // And in a real pipeline.
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} audit tail {d} -n 30 --json | head -1",
            env!("CARGO_BIN_EXE_enforcer")
        ))
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(seqs(&stdout(&o)), vec![0]);
}
