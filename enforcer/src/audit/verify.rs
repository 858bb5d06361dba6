//! `verify`: walks every log file in order (compressed ones decompressed), recomputes every record's hash, checks that
//! `seq` runs on without a gap and that each record links to the one before it (across rotations too), checks every
//! checkpoint's signature and that the log still holds each checkpoint's (seq, hash). A trail whose start was deleted
//! by retention is checked from its first kept record on: a signed retention record must account for exactly the
//! records missing before it. Reports counts, or the first bad record and why.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use super::checkpoint::{Checkpoint, CheckpointProblem, PublicKey, CHECKPOINT_FILE, PUB_FILE};
use super::read::{list_files, load, whole_lines, LogFile};
use super::record::{parse_line, Malformed, GENESIS};
use super::AuditError;

/// A line of a file: `file:line` (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.file.file_name().unwrap_or(self.file.as_os_str());
        write!(f, "{}:{}", name.to_string_lossy(), self.line)
    }
}

/// What is wrong, and where. Checkpoints are numbered from 1 in `checkpoints.jsonl` order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A line that is not a record at all (a flipped byte in its structure, a blank line).
    Malformed { at: Location, why: Malformed },
    /// A record whose content no longer matches its own hash.
    Edited { at: Location, seq: u64 },
    /// A file that ends in an incomplete line.
    Torn { at: Location },
    /// Records `from..=to` are missing.
    Deleted { at: Location, from: u64, to: u64 },
    /// A record out of place: `found` stands where `expected` should be, and `expected` is later at `elsewhere`.
    Reordered {
        at: Location,
        expected: u64,
        found: u64,
        elsewhere: Location,
    },
    /// A record whose seq was already used: one of the two copies was inserted.
    Inserted {
        at: Location,
        seq: u64,
        first: Option<Location>,
    },
    /// A record with the right seq and a correct hash of itself that does not link to the record before it.
    BrokenLink { at: Location, seq: u64 },
    /// The chain is consistent but differs from what a signed checkpoint covers: it was recomputed after records were
    /// edited, inserted or deleted.
    Rewritten {
        at: Location,
        seq: u64,
        checkpoint: usize,
    },
    /// A checkpoint signs a record the log no longer has.
    Truncated {
        checkpoint: usize,
        seq: u64,
        last: Option<u64>,
    },
    /// A checkpoint line that is malformed, signed by another key or badly signed.
    Checkpoint {
        checkpoint: usize,
        problem: CheckpointProblem,
    },
    /// Checkpoints whose seqs do not increase.
    CheckpointOrder { checkpoint: usize },
    /// Records but no checkpoint at all.
    NoCheckpoint,
    /// A compressed file that does not decompress or fails its checksum.
    Unreadable { file: PathBuf, why: String },
    /// The trail starts at record `to + 1`, and no signed retention record deleted exactly records `from..=to` (up to
    /// the hash the first kept record links to).
    Pruned { at: Location, from: u64, to: u64 },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Malformed { at, why } => {
                write!(f, "edited: {at} is not a well-formed record: {why}")
            }
            Problem::Edited { at, seq } => write!(
                f,
                "edited: record {seq} at {at} does not match its own hash"
            ),
            Problem::Torn { at } => write!(f, "truncated: {at} is an incomplete final line"),
            Problem::Deleted { at, from, to } if from == to => {
                write!(f, "deleted: record {from} is missing before {at}")
            }
            Problem::Deleted { at, from, to } => {
                write!(f, "deleted: records {from} to {to} are missing before {at}")
            }
            Problem::Reordered {
                at,
                expected,
                found,
                elsewhere,
            } => write!(
                f,
                "reordered: record {found} is at {at} where record {expected} belongs; record {expected} is at {elsewhere}"
            ),
            Problem::Inserted { at, seq, first } => {
                write!(f, "inserted: record {seq} at {at} repeats a seq")?;
                if let Some(first) = first {
                    write!(f, " already used at {first}")?;
                }
                write!(f, "; one of them was inserted")
            }
            Problem::BrokenLink { at, seq } => write!(
                f,
                "inserted: record {seq} at {at} does not link to record {} (its prev is not that record's hash)",
                seq.saturating_sub(1)
            ),
            Problem::Rewritten {
                at,
                seq,
                checkpoint,
            } => write!(
                f,
                "edited, inserted or deleted before checkpoint {checkpoint}: record {seq} at {at} is not the record \
                 checkpoint {checkpoint} signed, so the chain up to it was recomputed"
            ),
            Problem::Truncated {
                checkpoint,
                seq,
                last: Some(last),
            } => write!(
                f,
                "truncated after checkpoint {checkpoint}: it signs record {seq} but the log ends at record {last}"
            ),
            Problem::Truncated {
                checkpoint, seq, ..
            } => write!(
                f,
                "truncated after checkpoint {checkpoint}: it signs record {seq} but the log has no records"
            ),
            Problem::Checkpoint {
                checkpoint,
                problem: CheckpointProblem::Malformed,
            } => write!(
                f,
                "bad signature: checkpoint {checkpoint} in {CHECKPOINT_FILE} is damaged (not a well-formed checkpoint)"
            ),
            Problem::Checkpoint {
                checkpoint,
                problem,
            } => write!(f, "bad signature: checkpoint {checkpoint} in {CHECKPOINT_FILE}: {problem}"),
            Problem::CheckpointOrder { checkpoint } => write!(
                f,
                "reordered: checkpoint {checkpoint} in {CHECKPOINT_FILE} does not follow the one before it"
            ),
            Problem::NoCheckpoint => write!(
                f,
                "truncated: the log has records but {CHECKPOINT_FILE} has no signed checkpoint"
            ),
            Problem::Unreadable { file, why } => {
                let name = file.file_name().unwrap_or(file.as_os_str());
                write!(f, "edited: {} is damaged: {why}", name.to_string_lossy())
            }
            Problem::Pruned { at, from, to } => write!(
                f,
                "deleted: records {from} to {to} are missing before {at} and no signed retention record accounts for \
                 them"
            ),
        }
    }
}

/// The outcome of [`verify`].
#[derive(Debug, Clone)]
pub struct VerifyReport {
    pub files: usize,
    /// Records checked before the first problem (all of them when there is none).
    pub records: u64,
    pub bytes: u64,
    pub checkpoints: usize,
    /// The first record's seq: above 0 when retention deleted the oldest files.
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub last_checkpoint: Option<u64>,
    /// The signed retention record that accounts for the records missing before `first_seq`.
    pub pruned_by: Option<u64>,
    /// The public key the signatures were checked against.
    pub key: PathBuf,
    /// The first record problem, or (when every record checked out) a start that no retention record accounts for
    /// and a tail shorter than the checkpoints say; then the first checkpoint problem.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Records after the last checkpoint: chained, not signed yet.
    pub fn unsigned(&self) -> u64 {
        match (self.last_seq, self.last_checkpoint) {
            (Some(l), Some(c)) => l.saturating_sub(c),
            (Some(l), None) => l + 1,
            (None, _) => 0,
        }
    }
}

/// Verify the trail in `dir`, checking signatures against `key` (default `<dir>/audit.pub`).
pub fn verify(dir: &Path, key: Option<&Path>) -> Result<VerifyReport, AuditError> {
    let key_path = key.map_or_else(|| dir.join(PUB_FILE), Path::to_path_buf);
    let public = PublicKey::load(&key_path)?;
    let mut report = VerifyReport {
        files: 0,
        records: 0,
        bytes: 0,
        checkpoints: 0,
        first_seq: None,
        last_seq: None,
        last_checkpoint: None,
        pruned_by: None,
        key: key_path,
        problems: Vec::new(),
    };

    // Checkpoints first: the record walk compares against them as it goes.
    let cp_path = dir.join(CHECKPOINT_FILE);
    let cp_data = match fs::read(&cp_path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(AuditError::io(&cp_path, e)),
    };
    let mut signed: HashMap<u64, (usize, [u8; 32])> = HashMap::new();
    let mut cp_problem = None;
    let mut cp_lines: Vec<&[u8]> = whole_lines(&cp_data).collect();
    let complete = cp_data.last().is_none_or(|&b| b == b'\n');
    if !complete {
        let start = cp_data
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        cp_lines.push(&cp_data[start..]);
    }
    let mut last_cp: Option<u64> = None;
    for (i, line) in cp_lines.iter().enumerate() {
        let n = i + 1;
        let cp = match Checkpoint::parse(line).and_then(|cp| cp.check(&public).map(|()| cp)) {
            Ok(cp) => cp,
            Err(problem) => {
                cp_problem.get_or_insert(Problem::Checkpoint {
                    checkpoint: n,
                    problem,
                });
                continue;
            }
        };
        if last_cp.is_some_and(|l| cp.seq <= l) {
            cp_problem.get_or_insert(Problem::CheckpointOrder { checkpoint: n });
            continue;
        }
        last_cp = Some(cp.seq);
        report.checkpoints += 1;
        signed.insert(cp.seq, (n, cp.hash));
    }
    report.last_checkpoint = last_cp;

    let files = list_files(dir)?;
    report.files = files.len();
    let mut walked = Walk::default();
    let record_problem = walk(&files, &signed, &mut report, &mut walked)?;
    if let Some(p) = record_problem {
        // The walk stopped there: what it did not reach is not missing.
        report.problems.push(p);
    } else {
        if let Some(p) = check_start(&walked, last_cp, &mut report) {
            report.problems.push(p);
        }
        if let Some((&seq, &(n, _))) = signed
            .iter()
            .filter(|(&s, _)| report.last_seq.is_none_or(|l| s > l))
            .min_by_key(|(&s, _)| s)
        {
            // The first checkpoint that signs a record the log no longer has.
            report.problems.push(Problem::Truncated {
                checkpoint: n,
                seq,
                last: report.last_seq,
            });
        } else if report.last_seq.is_some() && cp_lines.is_empty() {
            report.problems.push(Problem::NoCheckpoint);
        }
    }
    if let Some(p) = cp_problem {
        report.problems.push(p);
    }
    Ok(report)
}

/// What the walk saw beyond the counts: where the trail starts, and the retention records in it.
#[derive(Default)]
struct Walk {
    /// The first record: its location, seq and `prev`.
    start: Option<(Location, u64, [u8; 32])>,
    /// (seq, kept_from, last_hash) of every retention record.
    retentions: Vec<(u64, u64, String)>,
}

/// A trail that starts after record 0 must be accounted for by a signed retention record: one that deleted exactly
/// the records before the first kept one, whose `last_hash` is what that record links to.
fn check_start(w: &Walk, last_cp: Option<u64>, report: &mut VerifyReport) -> Option<Problem> {
    let (at, first, prev) = w.start.clone()?;
    if first == 0 {
        return None;
    }
    let prev = hex::encode(prev);
    let by = w.retentions.iter().find(|(seq, kept_from, last_hash)| {
        *kept_from == first && *last_hash == prev && last_cp.is_some_and(|c| c >= *seq)
    });
    match by {
        Some(&(seq, ..)) => {
            report.pruned_by = Some(seq);
            None
        }
        None => Some(Problem::Pruned {
            at,
            from: 0,
            to: first - 1,
        }),
    }
}

/// The fast pass over every record; returns the first problem.
fn walk(
    files: &[LogFile],
    signed: &HashMap<u64, (usize, [u8; 32])>,
    report: &mut VerifyReport,
    walked: &mut Walk,
) -> Result<Option<Problem>, AuditError> {
    let mut expected: Option<u64> = None;
    let mut prev = GENESIS;
    for (fi, file) in files.iter().enumerate() {
        let path = &file.path;
        let data = match load(file) {
            Ok(d) => d,
            Err(AuditError::Damaged { why, .. }) => {
                return Ok(Some(Problem::Unreadable {
                    file: path.clone(),
                    why,
                }))
            }
            Err(e) => return Err(e),
        };
        report.bytes += data.len() as u64;
        let lines: Vec<&[u8]> = whole_lines(&data).collect();
        let bad = first_bad(&lines);
        let mut line_no = 0;
        for (i, line) in lines.iter().enumerate() {
            line_no += 1;
            let at = || Location {
                file: path.clone(),
                line: line_no,
            };
            let p = match parse_line(line) {
                Ok(p) => p,
                Err(why) => return Ok(Some(Problem::Malformed { at: at(), why })),
            };
            if bad == Some(i) {
                return Ok(Some(Problem::Edited {
                    at: at(),
                    seq: p.seq,
                }));
            }
            let want = match expected {
                Some(e) => e,
                None => {
                    // The first record: record 0, or the first one retention kept.
                    walked.start = Some((at(), p.seq, p.prev));
                    report.first_seq = Some(p.seq);
                    if p.seq > 0 {
                        prev = p.prev;
                    }
                    p.seq
                }
            };
            if p.seq != want {
                return Ok(Some(classify(files, fi, line_no, want, p.seq)?));
            }
            if p.prev != prev {
                return Ok(Some(Problem::BrokenLink {
                    at: at(),
                    seq: p.seq,
                }));
            }
            if let Some(&(n, hash)) = signed.get(&p.seq) {
                if hash != p.hash {
                    return Ok(Some(Problem::Rewritten {
                        at: at(),
                        seq: p.seq,
                        checkpoint: n,
                    }));
                }
            }
            if let Some(r) = p.retention() {
                walked.retentions.push((p.seq, r.kept_from, r.last_hash));
            }
            report.records += 1;
            report.last_seq = Some(p.seq);
            expected = Some(p.seq + 1);
            prev = p.hash;
        }
        if data.last().is_some_and(|&b| b != b'\n') {
            return Ok(Some(Problem::Torn {
                at: Location {
                    file: path.clone(),
                    line: line_no + 1,
                },
            }));
        }
    }
    Ok(None)
}

/// The index of the first line that is not a well-formed record with a correct hash. Each line's hash depends only
/// on its own bytes (its `prev` is stated in it), so the lines are checked on every core; the links between them are
/// checked afterwards in order.
fn first_bad(lines: &[&[u8]]) -> Option<usize> {
    let check = |chunk: &[&[u8]]| {
        chunk
            .iter()
            .position(|l| parse_line(l).map_or(true, |p| p.computed() != p.hash))
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    if threads < 2 || lines.len() < 1024 {
        return check(lines);
    }
    let size = lines.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = lines
            .chunks(size)
            .enumerate()
            .map(|(k, chunk)| s.spawn(move || check(chunk).map(|i| k * size + i)))
            .collect();
        // A panicked checker cannot vouch for its lines: count its first line as bad.
        handles
            .into_iter()
            .enumerate()
            .filter_map(|(k, h)| h.join().unwrap_or(Some(k * size)))
            .min()
    })
}

/// The seq at `files[fi]` line `line_no` is `found`, not `expected`: work out whether records were deleted,
/// reordered or inserted. Only runs once, on failure, so it simply rescans.
fn classify(
    files: &[LogFile],
    fi: usize,
    line_no: usize,
    expected: u64,
    found: u64,
) -> Result<Problem, AuditError> {
    let at = Location {
        file: files[fi].path.clone(),
        line: line_no,
    };
    let mut before = None;
    let mut after = None;
    let mut past = false;
    for (i, file) in files.iter().enumerate() {
        let path = &file.path;
        // An unreadable file was reported before the walk got here, or comes after the problem.
        let data = load(file).unwrap_or_default();
        for (n, line) in whole_lines(&data).enumerate() {
            let here = (i, n + 1);
            if here == (fi, line_no) {
                past = true;
                continue;
            }
            let Ok(p) = parse_line(line) else { continue };
            let loc = || Location {
                file: path.clone(),
                line: n + 1,
            };
            if !past && p.seq == found && before.is_none() {
                before = Some(loc());
            }
            if past && p.seq == expected && after.is_none() {
                after = Some(loc());
            }
        }
    }
    Ok(if found < expected {
        Problem::Inserted {
            at,
            seq: found,
            first: before,
        }
    } else if let Some(elsewhere) = after {
        Problem::Reordered {
            at,
            expected,
            found,
            elsewhere,
        }
    } else {
        Problem::Deleted {
            at,
            from: expected,
            to: found - 1,
        }
    })
}
