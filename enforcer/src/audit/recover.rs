//! Recovery on open: what a crash can leave behind, and how the trail is brought back to its longest intact prefix
//! before the writer continues it (docs/audit.md, "Crash recovery").
//!
//! A crash can leave bytes that were written but never synced: a torn line, page-sized gaps of NULs, preallocated
//! NUL padding, and, because the writer keeps appending to a new file while the file it rotated away from is still
//! being sealed, an unsynced tail in the last two plain files. Such bytes are moved aside (never deleted) and the
//! chain continues from the last whole record. What a killed writer left whole in the page cache is synced before the
//! chain continues, so nothing acknowledged after it can outlive it. A compression interrupted half way leaves a `.tmp` file or a file that
//! exists both plain and compressed; the plain one is the original.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use super::checkpoint::Checkpoint;
use super::read::{content_len, list_files, load, whole_lines, LogFile, ZSTD};
use super::record::{parse_line, GENESIS};
use super::AuditError;

/// UTC now as RFC 3339 with microseconds, e.g. `2026-11-26T23:18:55.123456Z`.
pub(crate) fn now_ts() -> String {
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    time::OffsetDateTime::now_utc()
        .format(&fmt)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00.000000Z"))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| AuditError::io(dir, e))
}

/// Open (or create, `0600`) a log file or `checkpoints.jsonl` for writing at explicit offsets.
pub(crate) fn open_log(path: &Path) -> Result<File, AuditError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| AuditError::io(path, e))
}

fn cut(path: &Path, len: u64) -> Result<(), AuditError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.set_len(len).and_then(|()| f.sync_all()))
        .map_err(|e| AuditError::io(path, e))
}

fn sync_file(path: &Path) -> Result<(), AuditError> {
    File::open(path)
        .and_then(|f| f.sync_data())
        .map_err(|e| AuditError::io(path, e))
}

/// Move `data[from..]` of `path` aside to `<path>.torn-<ts>` and cut the file back to `from` (also dropping anything
/// after `data`, such as NUL padding).
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
    cut(path, from as u64)?;
    tracing::warn!(
        file = %path.display(),
        aside = %aside.display(),
        bytes = data.len() - from,
        "audit log ended in bytes that were never synced; moved them aside"
    );
    Ok(aside)
}

/// Where the chain stands after recovery.
pub(crate) struct Tail {
    /// The file to append to and its length; `None` to start a new file named by `next_seq`.
    pub file: Option<(PathBuf, u64)>,
    pub next_seq: u64,
    pub prev: [u8; 32],
}

/// The longest prefix of `data` made of whole records, each with a correct hash, consecutive seqs and linked to the
/// one before: its length and the seq and hash of its last record.
fn valid_prefix(data: &[u8]) -> (usize, Option<(u64, [u8; 32])>) {
    let mut keep = 0;
    let mut last: Option<(u64, [u8; 32])> = None;
    for line in whole_lines(data) {
        let Ok(p) = parse_line(line) else { break };
        if p.computed() != p.hash {
            break;
        }
        if let Some((seq, hash)) = last {
            if p.seq != seq + 1 || p.prev != hash {
                break;
            }
        }
        last = Some((p.seq, p.hash));
        keep += line.len() + 1;
    }
    (keep, last)
}

/// Whether the first record of `data` follows `last` (the last record of the file before it).
fn links_to(data: &[u8], last: Option<(u64, [u8; 32])>) -> bool {
    let first = whole_lines(data).next().and_then(|l| parse_line(l).ok());
    match (first, last) {
        (None, _) => true,
        (Some(p), Some((seq, hash))) => p.seq == seq + 1 && p.prev == hash,
        (Some(_), None) => false,
    }
}

/// Remove what an interrupted compression left: `….zst.tmp` files, and the compressed copy of a file that still
/// exists plain (the plain one is the original; the sealer compresses it again).
pub(crate) fn clean_compression(dir: &Path) -> Result<(), AuditError> {
    let plain: Vec<u64> = list_files(dir)?
        .into_iter()
        .filter(|f| !f.compressed)
        .map(|f| f.first_seq)
        .collect();
    for entry in fs::read_dir(dir).map_err(|e| AuditError::io(dir, e))? {
        let entry = entry.map_err(|e| AuditError::io(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let stale_tmp = name.starts_with("audit-") && name.ends_with(&format!("{ZSTD}.tmp"));
        let duplicate = plain
            .iter()
            .any(|&s| name == super::read::compressed_name(s));
        if stale_tmp || duplicate {
            fs::remove_file(entry.path()).map_err(|e| AuditError::io(&entry.path(), e))?;
        }
    }
    Ok(())
}

/// Recover the end of the chain. The last plain file, and the plain file before it (the writer may have been
/// appending to a new file while the previous one was still being synced), may end in bytes that were never synced;
/// everything after the longest valid prefix is moved aside, NUL padding is cut off, a last file that does not link to
/// the one before it (because that one lost its tail) is moved aside whole, and empty trailing files are removed.
/// Nothing is touched if that would remove a record a checkpoint signs (`signed`): that is tampering, not a crash.
pub(crate) fn recover_log(dir: &Path, signed: Option<u64>) -> Result<Tail, AuditError> {
    let mut files = list_files(dir)?;
    let behind = |next: u64| match signed.filter(|&s| s >= next) {
        Some(checkpoint) => Err(AuditError::BehindCheckpoint { checkpoint, next }),
        None => Ok(()),
    };
    while let Some(file) = files.pop() {
        if file.compressed {
            // Sealed, so complete: the chain continues in a new file after it.
            let data = load(&file)?;
            let (keep, last) = valid_prefix(&data);
            if keep < data.len() {
                return Err(AuditError::Damaged {
                    path: file.path.display().to_string(),
                    why: "a sealed file does not hold whole, chained records".into(),
                });
            }
            let Some((seq, hash)) = last else {
                fs::remove_file(&file.path).map_err(|e| AuditError::io(&file.path, e))?;
                continue;
            };
            behind(seq + 1)?;
            return Ok(Tail {
                file: None,
                next_seq: seq + 1,
                prev: hash,
            });
        }
        let path = &file.path;
        let data = fs::read(path).map_err(|e| AuditError::io(path, e))?;
        let end = content_len(&data);
        let (keep, last) = valid_prefix(&data[..end]);

        if let Some(before) = files.last().filter(|f| !f.compressed) {
            let bdata = fs::read(&before.path).map_err(|e| AuditError::io(&before.path, e))?;
            let bend = content_len(&bdata);
            let (bkeep, blast) = valid_prefix(&bdata[..bend]);
            if bkeep < bend || !links_to(&data[..end], blast) {
                // The file before lost records this one follows: none of this file's records was ever durable.
                behind(blast.map_or(before.first_seq, |(s, _)| s + 1))?;
                move_aside(path, &data, 0)?;
                fs::remove_file(path).map_err(|e| AuditError::io(path, e))?;
                continue;
            }
            if bend < bdata.len() {
                cut(&before.path, bend as u64)?;
            } else {
                // A killed writer leaves its records in the page cache: make them durable before anything is
                // acknowledged after them.
                sync_file(&before.path)?;
            }
        }

        let next = last.map_or(file.first_seq, |(seq, _)| seq + 1);
        behind(next)?;
        if keep < end {
            move_aside(path, &data[..end], keep)?;
        } else if end < data.len() {
            cut(path, end as u64)?;
        } else {
            sync_file(path)?;
        }
        match last {
            Some((seq, hash)) => {
                return Ok(Tail {
                    file: Some((file.path, keep as u64)),
                    next_seq: seq + 1,
                    prev: hash,
                })
            }
            // The only file, now empty: reuse it when its name fits the start of the chain.
            None if files.is_empty() && file.first_seq == 0 => {
                return Ok(Tail {
                    file: Some((file.path, 0)),
                    next_seq: 0,
                    prev: GENESIS,
                })
            }
            None => fs::remove_file(path).map_err(|e| AuditError::io(path, e))?,
        }
    }
    Ok(Tail {
        file: None,
        next_seq: 0,
        prev: GENESIS,
    })
}

/// Recover `checkpoints.jsonl` (move a torn tail aside) and return the seq of its last checkpoint and the length of
/// its whole lines.
pub(crate) fn recover_checkpoints(path: &Path) -> Result<(Option<u64>, u64), AuditError> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, 0)),
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
    Ok((last, keep as u64))
}

/// The plain files before the newest one: rotated away from, so sealed once recovery is done (to be compressed).
pub(crate) fn sealed_plain(dir: &Path) -> Result<Vec<LogFile>, AuditError> {
    let mut files = list_files(dir)?;
    files.pop();
    Ok(files.into_iter().filter(|f| !f.compressed).collect())
}
