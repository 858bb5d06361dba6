//! One audit record: what a line of the log contains, how the writer lays it out byte by byte, and how its hash is
//! computed and checked. The layout and the hash are specified in docs/audit.md; this module is the one place that
//! implements them.
//!
//! A line is `{"seq":N,"ts":"…","prev":"<64 hex>","decision":{…},"agent":{…},"request":{…},"outcome":{…},"hash":"<64 hex>"}`.
//! Its hash is `SHA-256(prev_raw_32_bytes || line_without_hash_member)`, where the line without its hash member is the
//! line with its final `,"hash":"<64 hex>"}` replaced by `}`.
//!
//! Besides decision records the chain holds retention records, written when retention deletes old files:
//! `{"seq":N,"ts":"…","prev":"<64 hex>","retention":{…},"hash":"<64 hex>"}`, chained and hashed the same way.

use std::io::Write as _;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{Agent, AuditEvent, Mode, Outcome, Reason, RequestSummary, Verdict};

/// The `prev` of record 0.
pub const GENESIS: [u8; 32] = [0; 32];

/// `,"hash":"` + 64 hex digits + `"}`.
pub(crate) const HASH_SUFFIX_LEN: usize = 9 + 64 + 2;

/// The decision as recorded: the policy's answer without its block message or rewrite values (those come from the
/// policy and may carry header values; what a rewrite changed is in `request.changes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordDecision {
    pub verdict: Verdict,
    /// The deciding rule; `null` when the policy default applied.
    pub rule: Option<String>,
    /// Every matching rule id, in policy file order.
    pub matched: Vec<String>,
    pub reason: Reason,
    pub mode: Mode,
    pub policy_hash: String,
}

/// A record as read back from the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub ts: String,
    pub prev: String,
    pub decision: RecordDecision,
    pub agent: Agent,
    pub request: RequestSummary,
    pub outcome: Outcome,
    pub hash: String,
}

/// Why retention deleted files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetentionReason {
    /// The trail's files took more than `audit.max_total_bytes`.
    MaxBytes,
    /// Every record in the files was older than `audit.max_age_days`.
    MaxAge,
}

impl RetentionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RetentionReason::MaxBytes => "max_bytes",
            RetentionReason::MaxAge => "max_age",
        }
    }
}

/// One file deleted by retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeletedFile {
    /// Its name in the trail's directory.
    pub file: String,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Its size on disk.
    pub bytes: u64,
}

/// What a retention record says: which files were deleted, the seq range they held, the hash of the last record in
/// them (the `prev` of the first record kept) and why. Written, made durable and signed before the files are deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    pub reason: RetentionReason,
    pub deleted: Vec<DeletedFile>,
    /// The first and last seq deleted.
    pub first_seq: u64,
    pub last_seq: u64,
    /// 64 lowercase hex digits: the hash of record `last_seq`.
    pub last_hash: String,
    /// The seq the trail starts at once the files are gone (`last_seq + 1`).
    pub kept_from: u64,
}

/// A retention record as read back from the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRecord {
    pub seq: u64,
    pub ts: String,
    pub prev: String,
    pub retention: Retention,
    pub hash: String,
}

/// A line of the trail: a decision record or a retention record.
#[derive(Debug, Clone, PartialEq)]
pub enum Entry {
    Decision(Box<Record>),
    Retention(RetentionRecord),
}

impl Entry {
    pub fn seq(&self) -> u64 {
        match self {
            Entry::Decision(r) => r.seq,
            Entry::Retention(r) => r.seq,
        }
    }

    pub fn ts(&self) -> &str {
        match self {
            Entry::Decision(r) => &r.ts,
            Entry::Retention(r) => &r.ts,
        }
    }
}

#[derive(Serialize)]
struct RetentionBody<'a> {
    retention: &'a Retention,
}

/// The body of a retention record: `{"retention":{…}}`, for [`compose`].
pub(crate) fn encode_retention(r: &Retention) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(&RetentionBody { retention: r })
}

#[derive(Serialize)]
struct DecisionRef<'a> {
    verdict: Verdict,
    rule: Option<&'a str>,
    matched: &'a [String],
    reason: Reason,
    mode: Mode,
    policy_hash: &'a str,
}

#[derive(Serialize)]
struct BodyRef<'a> {
    decision: DecisionRef<'a>,
    agent: &'a Agent,
    request: &'a RequestSummary,
    outcome: &'a Outcome,
}

/// Serialise the event part of a record (done by the caller, off the writer thread). Returns the JSON object
/// `{"decision":…,"agent":…,"request":…,"outcome":…}`. A path that still carries a query string is cut at `?`.
pub(crate) fn encode_event(event: &AuditEvent) -> Result<Vec<u8>, serde_json::Error> {
    let stripped;
    let mut request = &event.request;
    if request.path.as_deref().is_some_and(|p| p.contains('?')) {
        let mut r = event.request.clone();
        r.path = r
            .path
            .map(|p| p.split('?').next().unwrap_or_default().to_owned());
        stripped = r;
        request = &stripped;
    }
    let d = &event.decision;
    let body = BodyRef {
        decision: DecisionRef {
            verdict: d.verdict,
            rule: d.deciding_rule.as_deref(),
            matched: &d.matched_rules,
            reason: d.reason,
            mode: d.mode,
            policy_hash: &d.policy_hash,
        },
        agent: &event.agent,
        request,
        outcome: &event.outcome,
    };
    let mut out = Vec::with_capacity(512);
    serde_json::to_writer(&mut out, &body)?;
    Ok(out)
}

/// Append one full line (with its `\n`) for `seq` to `out` and return its hash. `event` is what
/// [`encode_event`] produced: a JSON object starting with `{` and ending with `}`.
pub(crate) fn compose(
    out: &mut Vec<u8>,
    seq: u64,
    ts: &str,
    prev: &[u8; 32],
    event: &[u8],
) -> [u8; 32] {
    let start = out.len();
    let mut hex = [0u8; 64];
    out.extend_from_slice(b"{\"seq\":");
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{seq}");
    out.extend_from_slice(b",\"ts\":\"");
    out.extend_from_slice(ts.as_bytes());
    out.extend_from_slice(b"\",\"prev\":\"");
    let _ = hex::encode_to_slice(prev, &mut hex);
    out.extend_from_slice(&hex);
    out.extend_from_slice(b"\",");
    out.extend_from_slice(event.get(1..).unwrap_or(b"}"));
    let hash: [u8; 32] = Sha256::new()
        .chain_update(prev)
        .chain_update(&out[start..])
        .finalize()
        .into();
    out.pop();
    out.extend_from_slice(b",\"hash\":\"");
    let _ = hex::encode_to_slice(hash, &mut hex);
    out.extend_from_slice(&hex);
    out.extend_from_slice(b"\"}\n");
    hash
}

/// Why a line is not a well-formed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("it does not start with {{\"seq\":N,\"ts\":\"…\",\"prev\":\"<64 hex>\",")]
    Head,
    #[error("it does not end with ,\"hash\":\"<64 hex>\"}}")]
    Tail,
}

/// The parts of a line the chain needs, borrowed from it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Parsed<'a> {
    pub seq: u64,
    pub prev: [u8; 32],
    /// The hash the line states.
    pub hash: [u8; 32],
    /// The line without its hash member and without the closing `}`.
    pub unhashed: &'a [u8],
    /// The members after `prev`: `"decision":{…},…,"outcome":{…}` or `"retention":{…}`.
    pub body: &'a [u8],
}

impl Parsed<'_> {
    /// The hash the line should state.
    pub fn computed(&self) -> [u8; 32] {
        Sha256::new()
            .chain_update(self.prev)
            .chain_update(self.unhashed)
            .chain_update(b"}")
            .finalize()
            .into()
    }

    /// What a retention record says; `None` for a decision record (or a retention member that does not parse).
    pub fn retention(&self) -> Option<Retention> {
        if !self.body.starts_with(b"\"retention\":") {
            return None;
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            retention: Retention,
        }
        let mut obj = Vec::with_capacity(self.body.len() + 2);
        obj.push(b'{');
        obj.extend_from_slice(self.body);
        obj.push(b'}');
        serde_json::from_slice::<Body>(&obj)
            .ok()
            .map(|b| b.retention)
    }
}

fn strip<'a>(s: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    s.strip_prefix(prefix)
}

fn hex32(s: &[u8]) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 || s.iter().any(|b| b.is_ascii_uppercase()) {
        return None;
    }
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Parse the fixed head and tail of a line (without its `\n`). Does not check the hash.
pub(crate) fn parse_line(line: &[u8]) -> Result<Parsed<'_>, Malformed> {
    let rest = strip(line, b"{\"seq\":").ok_or(Malformed::Head)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 20 || (digits > 1 && rest[0] == b'0') {
        return Err(Malformed::Head);
    }
    let seq: u64 = std::str::from_utf8(&rest[..digits])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(Malformed::Head)?;
    let rest = strip(&rest[digits..], b",\"ts\":\"").ok_or(Malformed::Head)?;
    let ts_len = rest
        .iter()
        .position(|&b| b == b'"' || b == b'\\')
        .ok_or(Malformed::Head)?;
    std::str::from_utf8(&rest[..ts_len]).map_err(|_| Malformed::Head)?;
    let rest = strip(&rest[ts_len..], b"\",\"prev\":\"").ok_or(Malformed::Head)?;
    let prev = rest.get(..64).and_then(hex32).ok_or(Malformed::Head)?;
    let rest = strip(&rest[64..], b"\",").ok_or(Malformed::Head)?;
    // The tail must lie entirely after the head.
    if rest.len() < HASH_SUFFIX_LEN + 2 {
        return Err(Malformed::Tail);
    }
    let cut = line.len() - HASH_SUFFIX_LEN;
    let tail = &line[cut..];
    if !tail.starts_with(b",\"hash\":\"") || !tail.ends_with(b"\"}") {
        return Err(Malformed::Tail);
    }
    let hash = hex32(&tail[9..73]).ok_or(Malformed::Tail)?;
    let body_start = line.len() - rest.len();
    Ok(Parsed {
        seq,
        prev,
        hash,
        unhashed: &line[..cut],
        body: &line[body_start..cut],
    })
}

/// Parse a whole line into a [`Record`] (readers; the chain checks use [`parse_line`]).
pub fn parse_record(line: &[u8]) -> Result<Record, serde_json::Error> {
    serde_json::from_slice(line)
}

/// Parse a whole line into a decision or retention record.
pub fn parse_entry(line: &[u8]) -> Result<Entry, serde_json::Error> {
    match parse_record(line) {
        Ok(r) => Ok(Entry::Decision(Box::new(r))),
        Err(e) => serde_json::from_slice(line)
            .map(Entry::Retention)
            .map_err(|_| e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Decision, Disposition};

    fn event() -> AuditEvent {
        AuditEvent {
            decision: Decision {
                verdict: Verdict::Block,
                deciding_rule: Some("no-paste".into()),
                matched_rules: vec!["no-paste".into(), "log-all".into()],
                reason: Reason::Rule,
                message: Some("pasting is not allowed".into()),
                rewrites: vec![],
                mode: Mode::Enforce,
                policy_hash: "ab".repeat(32),
            },
            agent: Agent {
                profile: Some("coder".into()),
                pid: Some(42),
                ..Agent::default()
            },
            request: RequestSummary {
                host: Some("pastebin.com".into()),
                port: 443,
                path: Some("/api?token=secret".into()),
                ..RequestSummary::default()
            },
            outcome: Outcome {
                disposition: Disposition::Blocked,
                status: Some(403),
                error: None,
            },
        }
    }

    #[test]
    fn composed_line_parses_back_and_hash_matches() {
        let body = encode_event(&event()).unwrap();
        let mut out = Vec::new();
        let h = compose(&mut out, 7, "2026-01-01T00:00:00.000001Z", &GENESIS, &body);
        assert_eq!(out.last(), Some(&b'\n'));
        let line = &out[..out.len() - 1];
        let p = parse_line(line).unwrap();
        assert_eq!(p.seq, 7);
        assert_eq!(p.hash, h);
        assert_eq!(p.computed(), h);
        let r = parse_record(line).unwrap();
        assert_eq!(r.seq, 7);
        assert_eq!(r.request.path.as_deref(), Some("/api"));
        assert_eq!(r.decision.rule.as_deref(), Some("no-paste"));
        assert!(!String::from_utf8_lossy(line).contains("secret"));
        assert!(!String::from_utf8_lossy(line).contains("pasting"));
    }

    #[test]
    fn a_retention_record_chains_like_any_other() {
        let r = Retention {
            reason: RetentionReason::MaxBytes,
            deleted: vec![DeletedFile {
                file: "audit-00000000000000000000.jsonl.zst".into(),
                first_seq: 0,
                last_seq: 9,
                bytes: 1234,
            }],
            first_seq: 0,
            last_seq: 9,
            last_hash: "ab".repeat(32),
            kept_from: 10,
        };
        let body = encode_retention(&r).unwrap();
        let mut out = Vec::new();
        let h = compose(&mut out, 20, "2026-01-01T00:00:00.000001Z", &[1; 32], &body);
        let line = &out[..out.len() - 1];
        let p = parse_line(line).unwrap();
        assert_eq!((p.seq, p.hash, p.computed()), (20, h, h));
        assert_eq!(
            parse_entry(line).unwrap(),
            Entry::Retention(RetentionRecord {
                seq: 20,
                ts: "2026-01-01T00:00:00.000001Z".into(),
                prev: hex::encode([1; 32]),
                retention: r,
                hash: hex::encode(h),
            })
        );
        assert!(String::from_utf8_lossy(line).contains(",\"retention\":{\"reason\":\"max_bytes\","));
        assert!(parse_entry(b"{}").is_err());
    }

    #[test]
    fn malformed_lines_are_rejected() {
        assert_eq!(parse_line(b"").unwrap_err(), Malformed::Head);
        assert_eq!(
            parse_line(b"{\"seq\":01,\"ts\":\"x\"").unwrap_err(),
            Malformed::Head
        );
        let body = encode_event(&event()).unwrap();
        let mut out = Vec::new();
        compose(&mut out, 0, "t", &GENESIS, &body);
        let line = &out[..out.len() - 2];
        assert_eq!(parse_line(line).unwrap_err(), Malformed::Tail);
    }
}
