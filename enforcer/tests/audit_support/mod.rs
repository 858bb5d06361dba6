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
    }
}

/// Checkpoints every 10 records, none by time, files left uncompressed (so tests can edit them as text).
pub fn config(dir: &Path) -> AuditConfig {
    let mut cfg = AuditConfig::new(dir);
    cfg.checkpoint_every = 10;
    cfg.checkpoint_interval = Duration::from_secs(3600);
    cfg.compress = false;
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

/// The log files, plain (`.jsonl`) and compressed (`.jsonl.zst`), in name order.
pub fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with("audit-") && (n.ends_with(".jsonl") || n.ends_with(".jsonl.zst"))
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

/// The lines a child writes to `out`, as they come (a thread reads them).
pub fn lines(out: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead as _;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Tests that mount file systems need root; without it they are skipped, unless `CI` is set (where skipping would
/// hide a broken writer), so they fail.
pub fn root_or_skip() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "this test mounts file systems and needs root; CI is set: refusing to skip"
    );
    println!("skipped: needs root");
    false
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A file system mounted for one test: unmounted (and its loop device detached) when dropped, also on failure.
pub struct Mount {
    pub dir: PathBuf,
    loop_dev: Option<String>,
}

impl Mount {
    /// A tmpfs of `size` (e.g. `4m`) at `dir`.
    pub fn tmpfs(dir: &Path, size: &str) -> Mount {
        fs::create_dir_all(dir).unwrap();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        );
        Mount {
            dir: dir.to_owned(),
            loop_dev: None,
        }
    }

    /// Make an ext4 file system in the (new, sparse) file `image` of `mib` MiB, with its journal and inode tables
    /// written out at once (so later writes to the device only fill data blocks).
    pub fn make_ext4(image: &Path, mib: u64) {
        let f = fs::File::create(image).unwrap();
        f.set_len(mib << 20).unwrap();
        drop(f);
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-E",
                "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                image.to_str().unwrap(),
            ],
        );
    }

    /// Make `image` (from [`Mount::make_ext4`]) hold storage for every block ext4 uses and none for the blocks it has
    /// free, so that once the file system holding `image` is full, only writes of newly allocated data fail (never
    /// the journal's or an inode table's). mke2fs zeroes with hole punching, so on a tmpfs its metadata is holes too.
    pub fn back_only_used_blocks(image: &Path) {
        let path = image.to_str().unwrap();
        let len = fs::metadata(image).unwrap().len().to_string();
        run("fallocate", &["-l", &len, path]);
        let info = run("dumpe2fs", &[path]);
        let block: u64 = info
            .lines()
            .find_map(|l| l.strip_prefix("Block size:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        for ranges in info
            .lines()
            .filter_map(|l| l.strip_prefix("  Free blocks: "))
        {
            for range in ranges.split(", ").filter(|r| !r.is_empty()) {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
                run(
                    "fallocate",
                    &[
                        "-p",
                        "-o",
                        &(a * block).to_string(),
                        "-l",
                        &((b - a + 1) * block).to_string(),
                        path,
                    ],
                );
            }
        }
    }

    /// The ext4 file system in `image`, through a loop device, at `dir`.
    pub fn loop_ext4(image: &Path, dir: &Path) -> Mount {
        fs::create_dir_all(dir).unwrap();
        let dev = run("losetup", &["--find", "--show", image.to_str().unwrap()]);
        let m = Mount {
            dir: dir.to_owned(),
            loop_dev: Some(dev.clone()),
        };
        run("mount", &["-t", "ext4", &dev, dir.to_str().unwrap()]);
        m
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let umounted = std::process::Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !umounted {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.dir)
                .status();
        }
        if let Some(dev) = &self.loop_dev {
            let _ = std::process::Command::new("losetup")
                .args(["-d", dev])
                .status();
        }
    }
}
