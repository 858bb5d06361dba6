//! Every tamper case of issue 2 against a real trail on disk: each must make `verify` fail and say why and where.

mod audit_support;

use std::fs;
use std::path::Path;

use audit_support::{config, log_files, read_lines, rechain, stated_hash, write, write_lines};
use enforcer::audit::checkpoint::{Checkpoint, CheckpointProblem, CHECKPOINT_FILE, PUB_FILE};
use enforcer::audit::record::GENESIS;
use enforcer::audit::{verify, Problem};

/// A trail of 50 records, checkpoints at once and every 10 (signing seqs 0, 9, 19, 29, 39, 49), in one file.
async fn trail() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(config(dir.path()), 50).await;
    let r = verify(dir.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);
    assert_eq!((r.records, r.checkpoints, r.last_seq), (50, 6, Some(49)));
    dir
}

fn only_file(dir: &Path) -> std::path::PathBuf {
    let files = log_files(dir);
    assert_eq!(files.len(), 1);
    files[0].clone()
}

fn first_problem(dir: &Path) -> Problem {
    let r = verify(dir, None).unwrap();
    assert!(!r.ok(), "tampering went unnoticed");
    r.problems[0].clone()
}

#[tokio::test]
async fn every_single_byte_flip_in_a_record_is_caught() {
    let dir = trail().await;
    let file = only_file(dir.path());
    let original = fs::read(&file).unwrap();
    let lines = read_lines(&file);
    let start: usize = lines[..20].iter().map(|l| l.len() + 1).sum();
    let end = start + lines[20].len() + 1;
    let mut edited = 0;
    for pos in start..end {
        let mut data = original.clone();
        data[pos] ^= 0x01;
        fs::write(&file, &data).unwrap();
        let p = first_problem(dir.path());
        if matches!(p, Problem::Edited { seq: 20, .. }) {
            edited += 1;
        }
        assert!(
            matches!(
                p,
                Problem::Edited { .. } | Problem::Malformed { .. } | Problem::Torn { .. }
            ),
            "byte {}: {p}",
            pos - start
        );
        assert!(p.to_string().starts_with("edited") || p.to_string().starts_with("truncated"));
    }
    // Most flips land in the content and are reported as an edit of record 20 exactly.
    assert!(edited > lines[20].len() / 2, "{edited}");
    fs::write(&file, &original).unwrap();
    assert!(verify(dir.path(), None).unwrap().ok());
}

#[tokio::test]
async fn an_edited_value_names_the_record() {
    let dir = trail().await;
    let file = only_file(dir.path());
    let mut lines = read_lines(&file);
    lines[7] = lines[7].replace("\"verdict\":\"block\"", "\"verdict\":\"allow\"");
    write_lines(&file, &lines);
    let p = first_problem(dir.path());
    assert!(matches!(p, Problem::Edited { seq: 7, .. }), "{p}");
    assert!(
        p.to_string()
            .contains("record 7 at audit-00000000000000000000.jsonl:8"),
        "{p}"
    );
}

#[tokio::test]
async fn a_deleted_line_is_caught() {
    let dir = trail().await;
    let file = only_file(dir.path());
    let mut lines = read_lines(&file);
    lines.remove(20);
    write_lines(&file, &lines);
    let p = first_problem(dir.path());
    assert!(
        matches!(
            p,
            Problem::Deleted {
                from: 20,
                to: 20,
                ..
            }
        ),
        "{p}"
    );
    assert!(
        p.to_string().starts_with("deleted: record 20 is missing"),
        "{p}"
    );
}

#[tokio::test]
async fn swapped_lines_are_caught() {
    let dir = trail().await;
    let file = only_file(dir.path());
    let mut lines = read_lines(&file);
    lines.swap(20, 21);
    write_lines(&file, &lines);
    let p = first_problem(dir.path());
    assert!(
        matches!(
            p,
            Problem::Reordered {
                expected: 20,
                found: 21,
                ..
            }
        ),
        "{p}"
    );
    assert!(p.to_string().starts_with("reordered"), "{p}");
}

#[tokio::test]
async fn an_inserted_forged_line_is_caught() {
    let dir = trail().await;
    let file = only_file(dir.path());
    let lines = read_lines(&file);

    // A forged record that links correctly to record 20, without touching what follows.
    let mut forged = vec![lines[21].replace("pastebin.com", "innocent.example")];
    rechain(&mut forged, 21, stated_hash(&lines[20]));
    let mut tampered = lines.clone();
    tampered.insert(21, forged[0].clone());
    write_lines(&file, &tampered);
    let p = first_problem(dir.path());
    assert!(matches!(p, Problem::Inserted { seq: 21, .. }), "{p}");
    assert!(p.to_string().starts_with("inserted"), "{p}");

    // The same forgery with the rest of the chain recomputed: only the signed checkpoints can tell.
    let mut tampered = lines.clone();
    tampered.insert(21, forged[0].clone());
    rechain(&mut tampered, 0, GENESIS);
    write_lines(&file, &tampered);
    let p = first_problem(dir.path());
    assert!(
        matches!(
            p,
            Problem::Rewritten {
                seq: 29,
                checkpoint: 4,
                ..
            }
        ),
        "{p}"
    );
    assert!(p.to_string().contains("inserted"), "{p}");
}

#[tokio::test]
async fn a_dropped_tail_is_caught() {
    let dir = trail().await;
    let file = only_file(dir.path());
    let mut lines = read_lines(&file);
    lines.truncate(45);
    write_lines(&file, &lines);
    let p = first_problem(dir.path());
    assert_eq!(
        p,
        Problem::Truncated {
            checkpoint: 6,
            seq: 49,
            last: Some(44)
        }
    );
    assert!(
        p.to_string().starts_with("truncated after checkpoint 6"),
        "{p}"
    );

    // Dropping everything is caught the same way.
    write_lines(&file, &[]);
    let p = first_problem(dir.path());
    assert!(
        matches!(
            p,
            Problem::Truncated {
                checkpoint: 1,
                seq: 0,
                last: None
            }
        ),
        "{p}"
    );
}

#[tokio::test]
async fn a_rehashed_file_is_caught_by_the_signed_checkpoints() {
    let dir = trail().await;
    let file = only_file(dir.path());
    let mut lines = read_lines(&file);
    lines[3] = lines[3].replace("pastebin.com", "docs.example.com");
    rechain(&mut lines, 0, GENESIS);
    write_lines(&file, &lines);
    let p = first_problem(dir.path());
    assert!(
        matches!(
            p,
            Problem::Rewritten {
                seq: 9,
                checkpoint: 2,
                ..
            }
        ),
        "{p}"
    );
}

#[tokio::test]
async fn a_damaged_checkpoint_is_caught() {
    let dir = trail().await;
    let cp = dir.path().join(CHECKPOINT_FILE);
    let original = read_lines(&cp);

    // Point checkpoint 3 at another record.
    let mut lines = original.clone();
    lines[2] = lines[2].replacen("\"seq\":19", "\"seq\":18", 1);
    write_lines(&cp, &lines);
    let r = verify(dir.path(), None).unwrap();
    assert_eq!(
        r.problems,
        vec![Problem::Checkpoint {
            checkpoint: 3,
            problem: CheckpointProblem::BadSignature
        }]
    );
    assert!(r.problems[0]
        .to_string()
        .starts_with("bad signature: checkpoint 3"));

    // Flip one hex digit of the signature of checkpoint 4.
    let mut lines = original.clone();
    let pos = lines[3].len() - 10;
    let c = if &lines[3][pos..=pos] == "0" {
        "1"
    } else {
        "0"
    };
    lines[3].replace_range(pos..=pos, c);
    write_lines(&cp, &lines);
    let p = first_problem(dir.path());
    assert!(
        matches!(p, Problem::Checkpoint { checkpoint: 4, .. }),
        "{p}"
    );

    // Garbage instead of a checkpoint.
    let mut lines = original.clone();
    lines[0] = "{\"seq\":9}".into();
    write_lines(&cp, &lines);
    let p = first_problem(dir.path());
    assert_eq!(
        p,
        Problem::Checkpoint {
            checkpoint: 1,
            problem: CheckpointProblem::Malformed
        }
    );

    // No checkpoints at all.
    fs::remove_file(&cp).unwrap();
    assert_eq!(first_problem(dir.path()), Problem::NoCheckpoint);
}

#[tokio::test]
async fn a_resigned_forgery_passes_only_without_an_independent_key() {
    let dir = trail().await;
    let kept = tempfile::tempdir().unwrap();
    let kept_pub = kept.path().join("audit.pub");
    fs::copy(dir.path().join(PUB_FILE), &kept_pub).unwrap();

    // The attacker rewrites the log and replaces the key pair with its own, re-signing every checkpoint.
    let file = only_file(dir.path());
    let mut lines = read_lines(&file);
    lines[3] = lines[3].replace("pastebin.com", "docs.example.com");
    rechain(&mut lines, 0, GENESIS);
    let forged = tempfile::tempdir().unwrap();
    write_lines(&forged.path().join(file.file_name().unwrap()), &lines);
    // Let the writer itself create the forged key and checkpoints over the forged records.
    let log = enforcer::audit::AuditLog::open(config(forged.path()))
        .await
        .unwrap();
    log.close().await.unwrap();
    let r = verify(forged.path(), None).unwrap();
    assert!(r.ok(), "{:?}", r.problems);

    let r = verify(forged.path(), Some(&kept_pub)).unwrap();
    let p = &r.problems[0];
    assert!(
        matches!(
            p,
            Problem::Checkpoint {
                problem: CheckpointProblem::WrongKey { .. },
                ..
            }
        ),
        "{p}"
    );
    // The checkpoint file parses: it is the key that does not match.
    let cp = read_lines(&forged.path().join(CHECKPOINT_FILE));
    assert!(Checkpoint::parse(cp[0].as_bytes()).is_ok());
}

#[tokio::test]
async fn an_edit_deep_in_a_large_file_is_found_by_the_parallel_check() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.durable = false;
    cfg.checkpoint_every = 1000;
    write(cfg, 3000).await;
    assert!(verify(dir.path(), None).unwrap().ok());
    let file = only_file(dir.path());
    let mut lines = read_lines(&file);
    for n in [2500, 1100] {
        lines[n] = lines[n].replace("\"port\":443", "\"port\":444");
    }
    write_lines(&file, &lines);
    let p = first_problem(dir.path());
    assert!(matches!(p, Problem::Edited { seq: 1100, .. }), "{p}");
}
