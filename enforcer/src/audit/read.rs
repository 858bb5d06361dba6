//! Reading the trail back: the file naming scheme, listing the log files in order (plain and zstd-compressed alike),
//! loading a file's records, the last N records, following a live log across rotations and compression, and the
//! filters of `enforcer audit query`. Readers never check the chain (that is `verify`); they skip what they cannot
//! parse, such as a torn final line.

use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::record::{parse_entry, Entry, Record};
use super::AuditError;
use crate::model::Verdict;

const PREFIX: &str = "audit-";
const SUFFIX: &str = ".jsonl";
/// Appended to a sealed file's name once it is compressed.
pub const ZSTD: &str = ".zst";

/// The name of the log file whose first record is `first_seq`: names sort in chain order.
pub fn file_name(first_seq: u64) -> String {
    format!("{PREFIX}{first_seq:020}{SUFFIX}")
}

/// The name of that file once compressed.
pub fn compressed_name(first_seq: u64) -> String {
    format!("{PREFIX}{first_seq:020}{SUFFIX}{ZSTD}")
}

/// `(first seq, compressed)` for a log file's name.
fn parse_file_name(name: &str) -> Option<(u64, bool)> {
    let (name, compressed) = match name.strip_suffix(ZSTD) {
        Some(n) => (n, true),
        None => (name, false),
    };
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, compressed))
}

/// One log file of the trail.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogFile {
    /// The seq of its first record, as its name says.
    pub first_seq: u64,
    pub path: PathBuf,
    /// zstd-compressed (`….jsonl.zst`): a sealed file.
    pub compressed: bool,
}

/// Every log file in `dir`, in chain order. Where a file exists both plain and compressed (a crash while it was being
/// compressed), only the plain one is listed: it is the original, and the writer compresses it again.
pub fn list_files(dir: &Path) -> Result<Vec<LogFile>, AuditError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| AuditError::io(dir, e))? {
        let entry = entry.map_err(|e| AuditError::io(dir, e))?;
        if let Some((first_seq, compressed)) = entry.file_name().to_str().and_then(parse_file_name)
        {
            out.push(LogFile {
                first_seq,
                path: entry.path(),
                compressed,
            });
        }
    }
    // Plain sorts before compressed for the same seq: keep the first of each.
    out.sort();
    out.dedup_by_key(|f| f.first_seq);
    Ok(out)
}

/// A log file's bytes: decompressed when compressed, without the trailing NUL padding of a live file. A compressed
/// file that does not decompress (or fails its checksum) is [`AuditError::Damaged`].
pub fn load(file: &LogFile) -> Result<Vec<u8>, AuditError> {
    let path = &file.path;
    let mut data = if file.compressed {
        let f = fs::File::open(path).map_err(|e| AuditError::io(path, e))?;
        let mut out = Vec::new();
        zstd::stream::read::Decoder::new(f)
            .and_then(|mut d| d.read_to_end(&mut out))
            .map_err(|e| AuditError::Damaged {
                path: path.display().to_string(),
                why: format!("not a readable zstd file ({e})"),
            })?;
        out
    } else {
        fs::read(path).map_err(|e| AuditError::io(path, e))?
    };
    data.truncate(content_len(&data));
    Ok(data)
}

/// The first whole line of a log file (reads no more of it than needed, compressed or not).
pub fn first_line(file: &LogFile) -> Result<Option<Vec<u8>>, AuditError> {
    let path = &file.path;
    let f = fs::File::open(path).map_err(|e| AuditError::io(path, e))?;
    let reader: Box<dyn std::io::Read> = if file.compressed {
        Box::new(zstd::stream::read::Decoder::new(f).map_err(|e| AuditError::io(path, e))?)
    } else {
        Box::new(f)
    };
    let mut line = Vec::new();
    let mut reader = std::io::BufReader::new(reader);
    std::io::BufRead::read_until(&mut reader, b'\n', &mut line)
        .map_err(|e| AuditError::io(path, e))?;
    Ok(line.pop().filter(|&b| b == b'\n').map(|_| line))
}

/// The length of `data` without its trailing NUL padding (space the writer preallocates ahead of its records).
pub fn content_len(data: &[u8]) -> usize {
    data.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)
}

/// The whole lines of `data` (without `\n`); bytes after the last `\n` are not a line.
pub fn whole_lines(data: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    memchr::memchr_iter(b'\n', data).map(move |end| {
        let line = &data[start..end];
        start = end + 1;
        line
    })
}

/// An entry of the trail together with its exact line (what `--json` prints).
#[derive(Debug, Clone)]
pub struct Line {
    pub text: String,
    pub entry: Entry,
}

impl Line {
    /// The decision record, unless this line is a retention record.
    pub fn record(&self) -> Option<&Record> {
        match &self.entry {
            Entry::Decision(r) => Some(r),
            Entry::Retention(_) => None,
        }
    }
}

fn parse_lines(data: &[u8], out: &mut Vec<Line>) {
    for line in whole_lines(data) {
        if let (Ok(entry), Ok(text)) = (parse_entry(line), std::str::from_utf8(line)) {
            out.push(Line {
                text: text.to_owned(),
                entry,
            });
        }
    }
}

/// Every readable entry of one file.
pub fn read_file(file: &LogFile) -> Result<Vec<Line>, AuditError> {
    let data = load(file)?;
    let mut out = Vec::new();
    parse_lines(&data, &mut out);
    Ok(out)
}

/// The last `n` readable entries of the trail, oldest first.
pub fn last(dir: &Path, n: usize) -> Result<Vec<Line>, AuditError> {
    let mut out: Vec<Line> = Vec::new();
    for file in list_files(dir)?.iter().rev() {
        if out.len() >= n {
            break;
        }
        // A file deleted by retention while we list is simply gone.
        let mut lines = match read_file(file) {
            Err(AuditError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                continue
            }
            other => other?,
        };
        lines.append(&mut out);
        out = lines;
    }
    let skip = out.len().saturating_sub(n);
    Ok(out.split_off(skip))
}

/// Follows a live trail: each [`Follower::poll`] returns the entries appended since the last one, across rotations
/// and the compression of the files it has not finished reading.
#[derive(Debug)]
pub struct Follower {
    dir: PathBuf,
    /// The first seq of the file being read, and how many of its (uncompressed) bytes have been read.
    file: Option<u64>,
    offset: u64,
}

impl Follower {
    /// Start after everything currently in the trail.
    pub fn at_end(dir: &Path) -> Result<Follower, AuditError> {
        let mut f = Follower {
            dir: dir.to_owned(),
            file: list_files(dir)?.pop().map(|f| f.first_seq),
            offset: 0,
        };
        let mut skipped = Vec::new();
        f.drain(&mut skipped)?;
        Ok(f)
    }

    pub fn poll(&mut self) -> Result<Vec<Line>, AuditError> {
        let mut out = Vec::new();
        loop {
            self.drain(&mut out)?;
            let files = list_files(&self.dir)?;
            let next = match self.file {
                Some(cur) => files.into_iter().find(|f| f.first_seq > cur),
                None => files.into_iter().next(),
            };
            let Some(next) = next else {
                return Ok(out);
            };
            // The writer finishes a file before it writes the next one: read what was added meanwhile.
            self.drain(&mut out)?;
            self.file = Some(next.first_seq);
            self.offset = 0;
        }
    }

    /// Read the whole records added to the current file since the last call.
    fn drain(&mut self, out: &mut Vec<Line>) -> Result<(), AuditError> {
        let Some(first_seq) = self.file else {
            return Ok(());
        };
        let plain = self.dir.join(file_name(first_seq));
        let data = match fs::File::open(&plain) {
            Ok(mut f) => {
                f.seek(SeekFrom::Start(self.offset))
                    .map_err(|e| AuditError::io(&plain, e))?;
                // Read up to the writer's NUL padding, not through it.
                let mut data = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                loop {
                    let n = f.read(&mut chunk).map_err(|e| AuditError::io(&plain, e))?;
                    data.extend_from_slice(&chunk[..n]);
                    if n == 0 || chunk[..n].contains(&0) {
                        break;
                    }
                }
                data
            }
            // Compressed (or pruned) since the last call.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let compressed = LogFile {
                    first_seq,
                    path: self.dir.join(compressed_name(first_seq)),
                    compressed: true,
                };
                match load(&compressed) {
                    Ok(mut d) => d.split_off((self.offset as usize).min(d.len())),
                    Err(AuditError::Io { source, .. })
                        if source.kind() == std::io::ErrorKind::NotFound =>
                    {
                        Vec::new()
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(AuditError::io(&plain, e)),
        };
        let end = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        parse_lines(&data[..end], out);
        self.offset += end as u64;
        Ok(())
    }
}

/// The filters of `enforcer audit query`; every set filter must match.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
    pub verdict: Option<Verdict>,
    pub profile: Option<String>,
    /// Exact host (case-insensitive), or `*.example.com` for the domain and its subdomains.
    pub host: Option<String>,
    /// Matches the deciding rule or any matching rule.
    pub rule: Option<String>,
    /// The MCP tool.
    pub tool: Option<String>,
}

impl Query {
    /// Whether `entry` matches. A retention record matches a query that filters on time only.
    pub fn matches_entry(&self, entry: &Entry) -> bool {
        match entry {
            Entry::Decision(r) => self.matches(r),
            Entry::Retention(r) => {
                self.verdict.is_none()
                    && self.profile.is_none()
                    && self.host.is_none()
                    && self.rule.is_none()
                    && self.tool.is_none()
                    && self.in_time(&r.ts)
            }
        }
    }

    fn in_time(&self, ts: &str) -> bool {
        if self.since.is_none() && self.until.is_none() {
            return true;
        }
        let Ok(ts) = OffsetDateTime::parse(ts, &Rfc3339) else {
            return false;
        };
        !(self.since.is_some_and(|s| ts < s) || self.until.is_some_and(|u| ts >= u))
    }

    pub fn matches(&self, r: &Record) -> bool {
        if !self.in_time(&r.ts) {
            return false;
        }
        if self.verdict.is_some_and(|v| v != r.decision.verdict) {
            return false;
        }
        if let Some(p) = &self.profile {
            if r.agent.profile.as_deref() != Some(p.as_str()) {
                return false;
            }
        }
        if let Some(h) = &self.host {
            let Some(host) = r.request.host.as_deref() else {
                return false;
            };
            if !host_matches(h, host) {
                return false;
            }
        }
        if let Some(rule) = &self.rule {
            if r.decision.rule.as_deref() != Some(rule.as_str())
                && !r.decision.matched.iter().any(|m| m == rule)
            {
                return false;
            }
        }
        if let Some(t) = &self.tool {
            if r.request.mcp_tool.as_deref() != Some(t.as_str()) {
                return false;
            }
        }
        true
    }
}

fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.');
    match pattern.strip_prefix("*.") {
        Some(domain) => {
            host.eq_ignore_ascii_case(domain)
                || (host.len() > domain.len()
                    && host[host.len() - domain.len()..].eq_ignore_ascii_case(domain)
                    && host.as_bytes()[host.len() - domain.len() - 1] == b'.')
        }
        None => host.eq_ignore_ascii_case(pattern.trim_end_matches('.')),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_and_parse() {
        assert_eq!(file_name(12), "audit-00000000000000000012.jsonl");
        assert_eq!(
            parse_file_name(&file_name(u64::MAX)),
            Some((u64::MAX, false))
        );
        assert_eq!(parse_file_name(&compressed_name(7)), Some((7, true)));
        assert_eq!(parse_file_name("audit-1.jsonl"), None);
        assert_eq!(
            parse_file_name("audit-00000000000000000012.jsonl.zst.tmp"),
            None
        );
        assert_eq!(
            parse_file_name("audit-00000000000000000012.jsonl.torn-x"),
            None
        );
    }

    #[test]
    fn whole_lines_ignores_a_torn_tail() {
        let v: Vec<&[u8]> = whole_lines(b"a\nb\nc").collect();
        assert_eq!(v, vec![&b"a"[..], &b"b"[..]]);
        assert_eq!(whole_lines(b"abc").count(), 0);
        assert_eq!(whole_lines(b"\n").count(), 1);
    }

    #[test]
    fn host_patterns() {
        assert!(host_matches("*.example.com", "api.EXAMPLE.com"));
        assert!(host_matches("*.example.com", "example.com"));
        assert!(!host_matches("*.example.com", "badexample.com"));
        assert!(host_matches("Example.com", "example.com."));
    }
}
