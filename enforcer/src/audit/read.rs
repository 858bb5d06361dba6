//! Reading the trail back: the file naming scheme, listing the log files in order, the last N records, following a
//! live log across rotations, and the filters of `enforcer audit query`. Readers never check the chain (that is
//! `verify`); they skip what they cannot parse, such as a torn final line.

use std::fs;
use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::record::{parse_record, Record};
use super::AuditError;
use crate::model::Verdict;

const PREFIX: &str = "audit-";
const SUFFIX: &str = ".jsonl";

/// The name of the log file whose first record is `first_seq`: names sort in chain order.
pub fn file_name(first_seq: u64) -> String {
    format!("{PREFIX}{first_seq:020}{SUFFIX}")
}

fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Every log file in `dir`, in chain order, with the first seq its name claims.
pub fn list_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, AuditError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| AuditError::io(dir, e))? {
        let entry = entry.map_err(|e| AuditError::io(dir, e))?;
        if let Some(seq) = entry.file_name().to_str().and_then(parse_file_name) {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
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

/// A record together with its exact line (what `--json` prints).
#[derive(Debug, Clone)]
pub struct Line {
    pub text: String,
    pub record: Record,
}

fn parse_lines(data: &[u8], out: &mut Vec<Line>) {
    for line in whole_lines(data) {
        if let (Ok(record), Ok(text)) = (parse_record(line), std::str::from_utf8(line)) {
            out.push(Line {
                text: text.to_owned(),
                record,
            });
        }
    }
}

/// Every readable record of one file.
pub fn read_file(path: &Path) -> Result<Vec<Line>, AuditError> {
    let data = fs::read(path).map_err(|e| AuditError::io(path, e))?;
    let mut out = Vec::new();
    parse_lines(&data, &mut out);
    Ok(out)
}

/// The last `n` readable records of the trail, oldest first.
pub fn last(dir: &Path, n: usize) -> Result<Vec<Line>, AuditError> {
    let mut out: Vec<Line> = Vec::new();
    for (_, path) in list_files(dir)?.iter().rev() {
        if out.len() >= n {
            break;
        }
        let mut lines = read_file(path)?;
        lines.append(&mut out);
        out = lines;
    }
    let skip = out.len().saturating_sub(n);
    Ok(out.split_off(skip))
}

/// Follows a live trail: each [`Follower::poll`] returns the records appended since the last one, across rotations.
#[derive(Debug)]
pub struct Follower {
    dir: PathBuf,
    file: Option<PathBuf>,
    offset: u64,
}

impl Follower {
    /// Start after everything currently in the trail.
    pub fn at_end(dir: &Path) -> Result<Follower, AuditError> {
        let file = list_files(dir)?.pop().map(|(_, p)| p);
        let offset = match &file {
            Some(p) => complete_len(p)?,
            None => 0,
        };
        Ok(Follower {
            dir: dir.to_owned(),
            file,
            offset,
        })
    }

    pub fn poll(&mut self) -> Result<Vec<Line>, AuditError> {
        let mut out = Vec::new();
        loop {
            self.drain(&mut out)?;
            let files = list_files(&self.dir)?;
            let next = match &self.file {
                Some(cur) => files.into_iter().find(|(_, p)| p > cur),
                None => files.into_iter().next(),
            };
            let Some((_, next)) = next else {
                return Ok(out);
            };
            // The writer finishes a file before it creates the next one: read what was added meanwhile.
            self.drain(&mut out)?;
            self.file = Some(next);
            self.offset = 0;
        }
    }

    /// Read the whole records added to the current file since the last call.
    fn drain(&mut self, out: &mut Vec<Line>) -> Result<(), AuditError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let mut f = fs::File::open(path).map_err(|e| AuditError::io(path, e))?;
        f.seek(SeekFrom::Start(self.offset))
            .map_err(|e| AuditError::io(path, e))?;
        // Read up to the writer's NUL padding, not through it.
        let mut data = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut chunk).map_err(|e| AuditError::io(path, e))?;
            data.extend_from_slice(&chunk[..n]);
            if n == 0 || chunk[..n].contains(&0) {
                break;
            }
        }
        let end = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        parse_lines(&data[..end], out);
        self.offset += end as u64;
        Ok(())
    }
}

fn complete_len(path: &Path) -> Result<u64, AuditError> {
    let data = fs::read(path).map_err(|e| AuditError::io(path, e))?;
    Ok(data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) as u64)
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
    pub fn matches(&self, r: &Record) -> bool {
        if self.since.is_some() || self.until.is_some() {
            let Ok(ts) = OffsetDateTime::parse(&r.ts, &Rfc3339) else {
                return false;
            };
            if self.since.is_some_and(|s| ts < s) || self.until.is_some_and(|u| ts >= u) {
                return false;
            }
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
        assert_eq!(parse_file_name(&file_name(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_file_name("audit-1.jsonl"), None);
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
