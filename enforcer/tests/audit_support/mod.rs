//! Shared helpers for the audit integration tests: sample events, writing a trail, editing its files, and a
//! re-chainer written from docs/audit.md alone (what a forger with write access to the directory would run).

#![allow(
    dead_code,
    reason = "each test binary uses a different subset of these helpers"
)]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use enforcer::audit::{AuditConfig, AuditLog};
use enforcer::model::{
    Agent, AuditEvent, Change, Decision, Disposition, Mode, Outcome, Reason, RequestSummary,
    Verdict,
};
use sha2::{Digest, Sha256};

/// A varied event: record `i` of writer `task`.
pub fn event(task: u32, i: u32) -> AuditEvent {
    let verdict = match i % 4 {
        0 => Verdict::Allow,
        1 => Verdict::Log,
        2 => Verdict::Constrain,
        _ => Verdict::Block,
    };
    AuditEvent {
        decision: Decision {
            verdict,
            deciding_rule: (!i.is_multiple_of(5)).then(|| format!("rule-{}", i % 3)),
            matched_rules: vec![format!("rule-{}", i % 3), "log-everything".into()],
            reason: Reason::Rule,
            message: None,
            rewrites: vec![],
            mode: Mode::Enforce,
            policy_hash: "0f".repeat(32),
            review: None,
            labels: Vec::new(),
            counts: Vec::new(),
            retain: None,
        },
        agent: Agent {
            profile: Some(
                if task.is_multiple_of(2) {
                    "coder"
                } else {
                    "researcher"
                }
                .into(),
            ),
            cgroup: Some(format!("/enforcer/agent-{task}")),
            pid: Some(task),
            exe: Some("/usr/bin/python3".into()),
            uid: Some(1000),
            ..Agent::default()
        },
        request: RequestSummary {
            scheme: Some(enforcer::model::Scheme::Https),
            host: Some(
                if i.is_multiple_of(2) {
                    "api.example.com"
                } else {
                    "pastebin.com"
                }
                .into(),
            ),
            ip: None,
            port: 443,
            method: Some("POST".into()),
            path: Some(format!("/v1/item/{i}")),
            mcp_method: (i.is_multiple_of(3)).then(|| "tools/call".into()),
            mcp_tool: (i.is_multiple_of(3)).then(|| "read_file".into()),
            llm_provider: None,
            llm_model: None,
            body_size: u64::from(i) * 10,
            body_sha256: Some(hex::encode(Sha256::digest(i.to_le_bytes()))),
            changes: if verdict == Verdict::Constrain {
                vec![Change {
                    path: "$.messages[0].content".into(),
                    cause: "redact:aws_key".into(),
                }]
            } else {
                vec![]
            },
            ..RequestSummary::default()
        },
        outcome: Outcome {
            disposition: if verdict == Verdict::Block {
                Disposition::Blocked
            } else {
                Disposition::Forwarded
            },
            status: Some(if verdict == Verdict::Block { 403 } else { 200 }),
            error: None,
        },
        review: None,
        trace: None,
    }
}

pub fn config(dir: &Path) -> AuditConfig {
    let mut cfg = AuditConfig::new(dir);
    cfg.checkpoint_every = 10;
    cfg.checkpoint_interval = Duration::from_secs(3600);
    cfg
}

/// Write `n` records (sequentially) and close.
pub async fn write(cfg: AuditConfig, n: u32) {
    let log = AuditLog::open(cfg).await.unwrap();
    for i in 0..n {
        log.record(event(0, i)).await.unwrap();
    }
    log.close().await.unwrap();
}

pub fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with("audit-") && n.ends_with(".jsonl")
        })
        .collect();
    v.sort();
    v
}

/// The lines of a log file, without the NUL padding a live writer keeps ahead of its records.
pub fn read_lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap()
        .trim_end_matches('\0')
        .lines()
        .map(str::to_owned)
        .collect()
}

pub fn write_lines(path: &Path, lines: &[String]) {
    let mut s = lines.join("\n");
    if !lines.is_empty() {
        s.push('\n');
    }
    fs::write(path, s).unwrap();
}

/// Rebuild the chain over `lines` (from `prev`) as docs/audit.md defines it, renumbering seq from `first_seq`:
/// hash = SHA-256(prev raw bytes || the line with its final `,"hash":"<64 hex>"}` replaced by `}`).
pub fn rechain(lines: &mut [String], first_seq: u64, mut prev: [u8; 32]) {
    for (i, line) in lines.iter_mut().enumerate() {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        let obj = v.as_object_mut().unwrap();
        obj.remove("hash");
        obj.insert("seq".into(), (first_seq + i as u64).into());
        obj.insert("prev".into(), hex::encode(prev).into());
        let body = serde_json::to_string(&v).unwrap();
        let hash: [u8; 32] = Sha256::new()
            .chain_update(prev)
            .chain_update(body.as_bytes())
            .finalize()
            .into();
        *line = format!(
            "{},\"hash\":\"{}\"}}",
            &body[..body.len() - 1],
            hex::encode(hash)
        );
        prev = hash;
    }
}

/// The hash a line states.
pub fn stated_hash(line: &str) -> [u8; 32] {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    let mut out = [0u8; 32];
    hex::decode_to_slice(v["hash"].as_str().unwrap(), &mut out).unwrap();
    out
}
