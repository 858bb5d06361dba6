//! `verify` of a collected file: what a central syslog collector (rsyslog, syslog-ng) wrote from the messages many
//! hosts shipped ([`super::ship`]), one message per line, in RFC 5424 form (rsyslog's `RSYSLOG_SyslogProtocol23Format`
//! or any template that keeps the structured data and the MSG). Lines without our structured-data element are other
//! traffic and are skipped.
//!
//! Records are grouped by host, the host being the checkpoint-signing key named in each message (`key`, with the
//! hostname as its label). For each host: every record must match its own hash and link to the record before it when
//! that one was collected; a seq that jumps is a gap (records not collected: shipping dropped them while the collector
//! was down or the queue was full; the host's local trail still has them), not tampering; every checkpoint must be
//! signed by the host's key from the trusted-keys directory and, when the record it signs was collected, sign exactly
//! that record. Anything else — an edited record, a broken link, a repeated seq with other content, a bad signature,
//! a key not in the directory — is tampering.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use super::checkpoint::{Checkpoint, CheckpointProblem, PublicKey};
use super::record::parse_line;
use super::ship::SD_ID;
use super::AuditError;

/// What is wrong on one host, with the collected file's line (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tamper {
    /// A record whose content no longer matches its own hash (or not a record at all).
    Edited { line: usize, seq: Option<u64> },
    /// A record that does not link to the collected record before it.
    BrokenLink { line: usize, seq: u64 },
    /// The same seq collected twice with different content.
    Conflict { line: usize, seq: u64, first: usize },
    /// The message's `seq` parameter is not the record's seq.
    SeqMismatch { line: usize, seq: u64, stated: u64 },
    /// A checkpoint that is malformed or not signed by the host's trusted key.
    Checkpoint {
        line: usize,
        problem: CheckpointProblem,
    },
    /// A correctly signed checkpoint whose record was collected with another hash.
    Rewritten { line: usize, seq: u64 },
}

impl fmt::Display for Tamper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tamper::Edited { line, seq: Some(seq) } => {
                write!(f, "record {seq} (line {line}) does not match its own hash: edited")
            }
            Tamper::Edited { line, seq: None } => {
                write!(f, "line {line} is not a well-formed record or checkpoint: edited")
            }
            Tamper::BrokenLink { line, seq } => write!(
                f,
                "record {seq} (line {line}) does not link to record {}: one of them was edited or replaced",
                seq.saturating_sub(1)
            ),
            Tamper::Conflict { line, seq, first } => write!(
                f,
                "record {seq} at line {line} differs from the record {seq} at line {first}: one was inserted or edited"
            ),
            Tamper::SeqMismatch { line, seq, stated } => write!(
                f,
                "record {seq} (line {line}) was shipped as seq {stated}: edited"
            ),
            Tamper::Checkpoint { line, problem } => {
                write!(f, "checkpoint at line {line}: {problem}")
            }
            Tamper::Rewritten { line, seq } => write!(
                f,
                "checkpoint at line {line} signs record {seq}, but the collected record {seq} has another hash: edited"
            ),
        }
    }
}

/// One host's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    pub key_id: String,
    /// Hostnames its messages carried (normally one).
    pub hostnames: BTreeSet<String>,
    /// The trusted key file it was checked against; `None`: its key is not in the directory (untrusted).
    pub key_file: Option<PathBuf>,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Checkpoints whose signature checked.
    pub checkpoints: u64,
    /// Of those, how many signed a record that was collected (and matched).
    pub checkpoints_matched: u64,
    /// Seq ranges not collected (inclusive).
    pub gaps: Vec<(u64, u64)>,
    pub tampering: Vec<Tamper>,
}

impl HostReport {
    pub fn trusted(&self) -> bool {
        self.key_file.is_some()
    }

    pub fn ok(&self) -> bool {
        self.trusted() && self.tampering.is_empty()
    }

    /// `web-1 (key 0123456789abcdef)`.
    pub fn name(&self) -> String {
        let names: Vec<&str> = self.hostnames.iter().map(String::as_str).collect();
        format!("{} (key {})", names.join(","), self.key_id)
    }
}

/// The outcome of [`verify_collected`].
#[derive(Debug, Clone)]
pub struct FleetReport {
    pub hosts: Vec<HostReport>,
    /// Lines without our structured-data element (other syslog traffic).
    pub other_lines: u64,
}

impl FleetReport {
    pub fn ok(&self) -> bool {
        self.hosts.iter().all(HostReport::ok)
    }
}

/// One shipped message as found in a collected line.
struct Shipped<'a> {
    key: String,
    host: String,
    seq: u64,
    msg: &'a [u8],
}

/// Load the trusted host keys: every `*.pub` file in `dir` (64 hex digits each, as the hosts' `audit.pub`), by key id.
pub fn trusted_keys(dir: &Path) -> Result<HashMap<String, (PathBuf, PublicKey)>, AuditError> {
    let mut keys = HashMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| AuditError::io(dir, e))?;
    for entry in entries {
        let path = entry.map_err(|e| AuditError::io(dir, e))?.path();
        if path.extension().is_some_and(|e| e == "pub") {
            let key = PublicKey::load(&path)?;
            keys.insert(key.key_id(), (path, key));
        }
    }
    Ok(keys)
}

/// Verify the collected file `file` against the trusted host keys in `keys_dir`.
pub fn verify_collected(file: &Path, keys_dir: &Path) -> Result<FleetReport, AuditError> {
    let keys = trusted_keys(keys_dir)?;
    let data = std::fs::read(file).map_err(|e| AuditError::io(file, e))?;
    let mut hosts: BTreeMap<String, Host> = BTreeMap::new();
    let mut other_lines = 0;
    for (i, raw) in data.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.is_empty() {
            continue;
        }
        let Some(m) = parse_shipped(raw) else {
            other_lines += 1;
            continue;
        };
        let host = hosts.entry(m.key.clone()).or_default();
        host.hostnames.insert(m.host.clone());
        host.add(i + 1, &m);
    }
    let hosts = hosts
        .into_iter()
        .map(|(key_id, h)| h.check(key_id, &keys))
        .collect();
    Ok(FleetReport { hosts, other_lines })
}

/// Find `[enforcer@32473 …]` in a line and split out its parameters and the MSG after it.
fn parse_shipped(line: &[u8]) -> Option<Shipped<'_>> {
    let marker = format!("[{SD_ID} ");
    let start = memchr::memmem::find(line, marker.as_bytes())? + marker.len();
    let mut params: HashMap<String, String> = HashMap::new();
    let mut rest = &line[start..];
    loop {
        rest = rest.strip_prefix(b" ").unwrap_or(rest);
        if let Some(after) = rest.strip_prefix(b"]") {
            rest = after;
            break;
        }
        let eq = rest.iter().position(|&b| b == b'=')?;
        let name = std::str::from_utf8(&rest[..eq]).ok()?.to_string();
        rest = rest[eq..].strip_prefix(b"=\"")?;
        let mut value = Vec::new();
        let mut i = 0;
        loop {
            match *rest.get(i)? {
                b'\\' if matches!(rest.get(i + 1), Some(b'"' | b'\\' | b']')) => {
                    value.push(rest[i + 1]);
                    i += 2;
                }
                b'"' => break,
                b => {
                    value.push(b);
                    i += 1;
                }
            }
        }
        rest = &rest[i + 1..];
        params.insert(name, String::from_utf8(value).ok()?);
    }
    // Another SD element may follow ours (a relay's); the MSG starts after the last one and a space.
    while let Some(r) = rest.strip_prefix(b"[") {
        let close = r.iter().position(|&b| b == b']')?;
        rest = &r[close + 1..];
    }
    let msg = rest.strip_prefix(b" ").unwrap_or(rest);
    Some(Shipped {
        key: params.remove("key")?,
        host: params.remove("host").unwrap_or_else(|| "-".into()),
        seq: params.get("seq")?.parse().ok()?,
        msg,
    })
}

#[derive(Default)]
struct Host {
    hostnames: BTreeSet<String>,
    /// seq → (line, the record line).
    records: BTreeMap<u64, (usize, Vec<u8>)>,
    checkpoints: Vec<(usize, Result<Checkpoint, CheckpointProblem>)>,
    tampering: Vec<Tamper>,
}

impl Host {
    fn add(&mut self, line: usize, m: &Shipped<'_>) {
        if let Ok(p) = parse_line(m.msg) {
            if p.seq != m.seq {
                self.tampering.push(Tamper::SeqMismatch {
                    line,
                    seq: p.seq,
                    stated: m.seq,
                });
            }
            match self.records.get(&p.seq) {
                // The same message twice (resent after a reconnect): harmless.
                Some((_, first)) if first == m.msg => {}
                Some(&(first, _)) => self.tampering.push(Tamper::Conflict {
                    line,
                    seq: p.seq,
                    first,
                }),
                None => {
                    self.records.insert(p.seq, (line, m.msg.to_vec()));
                }
            }
        } else if m.msg.ends_with(b"\"}") && memchr::memmem::find(m.msg, b",\"sig\":\"").is_some() {
            self.checkpoints.push((line, Checkpoint::parse(m.msg)));
        } else {
            self.tampering.push(Tamper::Edited { line, seq: None });
        }
    }

    fn check(mut self, key_id: String, keys: &HashMap<String, (PathBuf, PublicKey)>) -> HostReport {
        let trusted = keys.get(&key_id);
        let mut report = HostReport {
            key_id,
            hostnames: std::mem::take(&mut self.hostnames),
            key_file: trusted.map(|(p, _)| p.clone()),
            records: self.records.len() as u64,
            first_seq: self.records.keys().next().copied(),
            last_seq: self.records.keys().next_back().copied(),
            checkpoints: 0,
            checkpoints_matched: 0,
            gaps: Vec::new(),
            tampering: std::mem::take(&mut self.tampering),
        };
        let mut hashes: HashMap<u64, [u8; 32]> = HashMap::new();
        let mut before: Option<(u64, [u8; 32])> = None;
        for (&seq, (line, text)) in &self.records {
            let line = *line;
            let Ok(p) = parse_line(text) else { continue };
            if p.computed() != p.hash {
                report.tampering.push(Tamper::Edited {
                    line,
                    seq: Some(seq),
                });
            }
            match before {
                Some((b, hash)) if b + 1 == seq && p.prev != hash => {
                    report.tampering.push(Tamper::BrokenLink { line, seq });
                }
                Some((b, _)) if b + 1 < seq => report.gaps.push((b + 1, seq - 1)),
                _ => {}
            }
            hashes.insert(seq, p.hash);
            before = Some((seq, p.hash));
        }
        for (line, cp) in self.checkpoints {
            let checked = cp.and_then(|cp| match trusted {
                Some((_, key)) => cp.check(key).map(|()| cp),
                // Untrusted: reported once for the host, not per checkpoint.
                None => Ok(cp),
            });
            match checked {
                Ok(cp) => {
                    if trusted.is_none() {
                        continue;
                    }
                    report.checkpoints += 1;
                    match hashes.get(&cp.seq) {
                        Some(h) if *h == cp.hash => report.checkpoints_matched += 1,
                        Some(_) => report
                            .tampering
                            .push(Tamper::Rewritten { line, seq: cp.seq }),
                        None => {}
                    }
                }
                Err(problem) => report.tampering.push(Tamper::Checkpoint { line, problem }),
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::{compose, GENESIS};
    use crate::audit::ship::{frame, HostIdentity, Kind};

    fn shipped_lines(id: &HostIdentity, seqs: std::ops::Range<u64>) -> Vec<String> {
        let mut prev = GENESIS;
        let mut out = Vec::new();
        for seq in 0..seqs.end {
            let mut line = Vec::new();
            prev = compose(
                &mut line,
                seq,
                "2026-01-01T00:00:00.000000Z",
                &prev,
                b"{\"x\":1}",
            );
            if seqs.contains(&seq) {
                let f = frame(
                    id,
                    1,
                    "2026-01-01T00:00:00.000000Z",
                    Kind::Record,
                    seq,
                    &line[..line.len() - 1],
                );
                // What rsyslog writes: the message without its octet count.
                let text = String::from_utf8(f).unwrap();
                out.push(text.split_once(' ').unwrap().1.to_string());
            }
        }
        out
    }

    #[test]
    fn parses_what_the_shipper_formats() {
        let id = HostIdentity {
            hostname: "h\"1".into(),
            key_id: "abcd".into(),
        };
        let line = &shipped_lines(&id, 0..1)[0];
        let m = parse_shipped(line.as_bytes()).unwrap();
        assert_eq!(
            (m.key.as_str(), m.host.as_str(), m.seq),
            ("abcd", "h\"1", 0)
        );
        assert!(m.msg.starts_with(b"{\"seq\":0,"));
        assert!(parse_shipped(b"<13>1 - host app - - - hello").is_none());
    }

    #[test]
    fn gaps_are_gaps_and_edits_are_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let id = HostIdentity {
            hostname: "web-1".into(),
            key_id: "abcd".into(),
        };
        let mut lines = shipped_lines(&id, 0..10);
        lines.drain(3..6);
        lines.push("<13>1 - other app - - - unrelated".into());
        let file = dir.path().join("collected.log");
        std::fs::write(&file, lines.join("\n") + "\n").unwrap();
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).unwrap();
        let r = verify_collected(&file, &keys).unwrap();
        assert_eq!(r.other_lines, 1);
        let h = &r.hosts[0];
        assert_eq!(h.gaps, vec![(3, 5)]);
        assert!(h.tampering.is_empty(), "{:?}", h.tampering);
        assert!(!h.trusted());
        lines[4] = lines[4].replace("\"x\":1", "\"x\":2");
        std::fs::write(&file, lines.join("\n") + "\n").unwrap();
        let r = verify_collected(&file, &keys).unwrap();
        assert_eq!(
            r.hosts[0].tampering,
            vec![Tamper::Edited {
                line: 5,
                seq: Some(7)
            }]
        );
    }
}
