//! The audit reader and verifier on damaged trails: the input is a trail directory written as files, each one
//! introduced by a line `==> NAME <==` (NAME: `checkpoints.jsonl`, `audit-<20 digits>.jsonl` or a sealed
//! `audit-<20 digits>.jsonl.zst`; others are still written, so the listing skips them), checked against the public
//! key of the trail the seeds came from (`fuzz/data/audit.pub`). `audit::verify`, `read::last`, `read::read_file` and a `Follower` must read anything
//! without panicking; a trail `verify` passes reads back to exactly the records it counted.

#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use enforcer::audit::checkpoint::PUB_FILE;
use enforcer::audit::{read, verify, AuditError};
use libfuzzer_sys::fuzz_target;

const KEY: &str = include_str!("../data/audit.pub");
const MARK: &[u8] = b"==> ";

/// This process's scratch directory (in memory where /dev/shm exists), emptied before each input.
fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("enforcer-fuzz-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        dir
    })
}

/// The files of `data`: (name, contents), each section starting at a line that begins with `==> `; names are
/// single path components of safe characters (others are skipped, and so is a second section of the same name).
fn files(data: &[u8]) -> Vec<(String, &[u8])> {
    let starts: Vec<usize> = (0..data.len())
        .filter(|&i| data[i..].starts_with(MARK) && (i == 0 || data[i - 1] == b'\n'))
        .collect();
    let mut out: Vec<(String, &[u8])> = Vec::new();
    for (k, &start) in starts.iter().enumerate() {
        let end = starts.get(k + 1).copied().unwrap_or(data.len());
        let section = &data[start + MARK.len()..end];
        let Some(eol) = section.iter().position(|&b| b == b'\n') else {
            continue;
        };
        let name = String::from_utf8_lossy(&section[..eol]);
        let name = name.trim_end_matches(" <==");
        let safe = !name.is_empty()
            && name.len() <= 64
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if safe && name != PUB_FILE && out.iter().all(|(n, _)| n != name) {
            out.push((name.to_string(), &section[eol + 1..]));
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    for entry in std::fs::read_dir(dir).expect("scratch").flatten() {
        let _ = std::fs::remove_file(entry.path());
    }
    std::fs::write(dir.join(PUB_FILE), KEY).expect("key");
    for (name, contents) in files(data) {
        std::fs::write(dir.join(name), contents).expect("scratch file");
    }
    let report = verify(dir, None).expect("a readable trail directory");
    let _ = (
        report.unsigned(),
        report.problems.iter().map(ToString::to_string).count(),
    );
    let listed = read::list_files(dir).expect("listing");
    let mut readable = 0u64;
    for file in &listed {
        match read::read_file(file) {
            Ok(lines) => readable += lines.len() as u64,
            // A sealed file that is not zstd is damaged, never a panic.
            Err(AuditError::Damaged { .. }) if file.compressed => {}
            Err(e) => panic!("{}: {e}", file.path.display()),
        }
    }
    if report.ok() {
        assert_eq!(
            readable, report.records,
            "the readers see the records verify counted"
        );
    }
    // A sealed file that does not decompress is named (`Damaged`), as `audit tail` reports it; plain files are read
    // line by line, skipping what does not parse, so only a damaged sealed file can fail the readers.
    let damaged_seal = |e: &AuditError| {
        matches!(e, AuditError::Damaged { .. })
            && !report.ok()
            && listed.iter().any(|f| f.compressed)
    };
    match read::last(dir, 3) {
        Ok(_) => {}
        Err(e) if damaged_seal(&e) => {}
        Err(e) => panic!("last: {e}"),
    }
    match read::Follower::at_end(dir) {
        Ok(mut follower) => assert!(
            follower.poll().expect("poll").is_empty(),
            "nothing was appended"
        ),
        Err(e) if damaged_seal(&e) => {}
        Err(e) => panic!("follower: {e}"),
    }
});
