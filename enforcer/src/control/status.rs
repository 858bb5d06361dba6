//! `enforcer status`: what the daemon reports about itself (up since, health, programs attached and where, tagged
//! cgroups and live agents per profile, the policy in force, the audit trail's position, decisions since start) and
//! how the CLI prints it. Collected on request, from the daemon's own state and from what the kernel and the audit
//! directory show; nothing here changes anything.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::service::Health;

/// Most cgroup directories visited when counting tagged cgroups and agents.
const WALK_LIMIT: usize = 8192;
/// Bytes read from the end of `checkpoints.jsonl` to find its last line.
const CHECKPOINT_TAIL: u64 = 4096;

/// The answer to `{"request":"status"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub daemon: DaemonStatus,
    pub capture: CaptureStatus,
    pub profiles: Vec<ProfileStatus>,
    pub policy: PolicyStatus,
    pub audit: AuditStatus,
    /// Decisions since the daemon started, by verdict (`allow`, `log`, `constrain`, `review`, `block`).
    pub decisions: BTreeMap<String, u64>,
    /// Exchanges held for review now (`enforcer review list`).
    #[serde(default)]
    pub reviews_pending: usize,
    /// Live agent sessions now (`enforcer session list`).
    #[serde(default)]
    pub sessions_live: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DaemonStatus {
    pub pid: u32,
    pub version: String,
    /// RFC 3339, UTC.
    pub started: String,
    pub uptime_secs: u64,
    pub healthy: bool,
    /// What is wrong when not healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// The Prometheus endpoint, when enabled (`http://ADDR/metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureStatus {
    pub enabled: bool,
    /// The cgroup the programs are attached to (absolute path).
    pub cgroup: String,
    pub pin_dir: String,
    /// The programs attached (their pinned links), by function name.
    pub programs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileStatus {
    pub name: String,
    /// Cgroups tagged with this profile (relative to the cgroup root); everything below each is covered too.
    pub cgroups: Vec<String>,
    /// Cgroup paths and globs the configuration names for the profile (tagged as they appear).
    pub configured: Vec<String>,
    /// Processes running now in cgroups this profile covers.
    pub agents: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// The policy file, or `built-in default`.
    pub path: String,
    /// Hex SHA-256 of the policy in force (as in every audit record's `policy_hash`).
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditStatus {
    pub dir: String,
    /// Seq of the last record written (or, before this daemon wrote one, of the last signed checkpoint).
    pub last_seq: Option<u64>,
    pub last_checkpoint: Option<CheckpointStatus>,
    /// Bytes of all files in the audit directory.
    pub bytes: u64,
    /// Shipping to the central collector, when configured (`audit.ship`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipping: Option<crate::audit::ShipStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointStatus {
    pub seq: u64,
    pub ts: String,
}

/// What the daemon hands the control socket to answer `status` from.
pub struct StatusSources {
    pub config: Config,
    /// The proxy's shared state: the policy in force.
    pub proxy: Arc<crate::proxy::ProxyContext>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
    pub started: SystemTime,
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl StatusSources {
    /// Collect the status now (blocking: reads the cgroup tree, the pin directory and the audit directory).
    pub fn collect(&self) -> Status {
        let config = &self.config;
        let health = self.health.check();
        let attach = config.attach_cgroup();
        let (tagged, agents) = if config.capture.enabled {
            tagged_cgroups(config, &attach)
        } else {
            (BTreeMap::new(), BTreeMap::new())
        };
        let profiles = config
            .profiles
            .iter()
            .map(|(name, p)| ProfileStatus {
                name: name.clone(),
                cgroups: tagged.get(name).cloned().unwrap_or_default(),
                configured: p.cgroups.iter().map(|c| c.display().to_string()).collect(),
                agents: agents.get(name).copied().unwrap_or(0),
            })
            .collect();
        let audit_dir = config.audit_dir();
        let last_checkpoint = last_checkpoint(&audit_dir);
        Status {
            daemon: DaemonStatus {
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                started: rfc3339(self.started),
                uptime_secs: self.started.elapsed().map_or(0, |d| d.as_secs()),
                healthy: health.is_ok(),
                problem: health.err(),
                metrics: self.metrics_listen.map(|a| format!("http://{a}/metrics")),
            },
            capture: CaptureStatus {
                enabled: config.capture.enabled,
                cgroup: attach.display().to_string(),
                pin_dir: config.capture.pin_dir.display().to_string(),
                programs: if config.capture.enabled {
                    programs(&config.capture.pin_dir)
                } else {
                    Vec::new()
                },
            },
            profiles,
            policy: PolicyStatus {
                path: config
                    .policy
                    .as_ref()
                    .map_or_else(|| "built-in default".into(), |p| p.display().to_string()),
                hash: self.proxy.policy.current().hash().to_string(),
            },
            audit: AuditStatus {
                dir: audit_dir.display().to_string(),
                last_seq: self
                    .metrics
                    .last_seq()
                    .or(last_checkpoint.as_ref().map(|c| c.seq)),
                last_checkpoint,
                bytes: dir_bytes(&audit_dir),
                shipping: self.metrics.shipping(),
            },
            decisions: self
                .metrics
                .verdict_counts()
                .into_iter()
                .map(|(v, n)| (v.as_str().to_string(), n))
                .collect(),
            reviews_pending: self.proxy.reviews.list().len(),
            sessions_live: self.proxy.sessions.list().len(),
        }
    }
}

impl Status {
    /// Render for a terminal.
    pub fn render(&self) -> String {
        let d = &self.daemon;
        let mut out = format!(
            "enforcer {}, pid {}, up since {} ({})\n",
            d.version,
            d.pid,
            d.started,
            duration(d.uptime_secs)
        );
        match &d.problem {
            None => out.push_str("health:    ok\n"),
            Some(p) => out.push_str(&format!("health:    UNHEALTHY: {p}\n")),
        }
        let c = &self.capture;
        if c.enabled {
            out.push_str(&format!(
                "capture:   {} programs attached at {} (links pinned in {}): {}\n",
                c.programs.len(),
                c.cgroup,
                c.pin_dir,
                c.programs.join(", ")
            ));
        } else {
            out.push_str("capture:   disabled (explicit proxy only)\n");
        }
        out.push_str("profiles:\n");
        for p in &self.profiles {
            out.push_str(&format!(
                "  {:<16} {} agents; tagged: {}",
                p.name,
                p.agents,
                list_or_none(&p.cgroups)
            ));
            if !p.configured.is_empty() {
                out.push_str(&format!("; configured: {}", p.configured.join(", ")));
            }
            out.push('\n');
        }
        out.push_str(&format!(
            "policy:    {} (sha256 {})\n",
            self.policy.path, self.policy.hash
        ));
        let a = &self.audit;
        out.push_str(&format!(
            "audit:     {}: last seq {}, last checkpoint {}, {} bytes on disk\n",
            a.dir,
            a.last_seq.map_or_else(|| "none".into(), |s| s.to_string()),
            a.last_checkpoint
                .as_ref()
                .map_or_else(|| "none".into(), |c| format!("seq {} at {}", c.seq, c.ts)),
            a.bytes
        ));
        if let Some(sh) = &a.shipping {
            out.push_str(&format!(
                "shipping:  to {} ({}): {} shipped, {} dropped, {} queued, last record shipped {}\n",
                sh.collector,
                if sh.connected { "connected" } else { "not connected" },
                sh.shipped,
                sh.dropped,
                sh.queued,
                sh.last_seq.map_or_else(|| "none".into(), |s| s.to_string()),
            ));
        }
        let counts: Vec<String> = crate::model::Verdict::ALL
            .iter()
            .map(|v| v.as_str())
            .map(|v| format!("{v} {}", self.decisions.get(v).copied().unwrap_or(0)))
            .collect();
        out.push_str(&format!("decisions: {} (since start)\n", counts.join(", ")));
        out.push_str(&format!(
            "sessions:  {} live; reviews: {} pending\n",
            self.sessions_live, self.reviews_pending
        ));
        if let Some(m) = &d.metrics {
            out.push_str(&format!("metrics:   {m}\n"));
        }
        out
    }

    #[cfg(test)]
    pub(crate) fn example() -> Status {
        Status {
            daemon: DaemonStatus {
                pid: 1,
                version: "0.1.0".into(),
                started: "2026-11-30T05:00:00Z".into(),
                uptime_secs: 3725,
                healthy: true,
                problem: None,
                metrics: Some("http://127.0.0.1:9464/metrics".into()),
            },
            capture: CaptureStatus {
                enabled: true,
                cgroup: "/sys/fs/cgroup/unified".into(),
                pin_dir: "/sys/fs/bpf/enforcer".into(),
                programs: vec!["redirect_connect4".into(), "redirect_connect6".into()],
            },
            profiles: vec![ProfileStatus {
                name: "agents".into(),
                cgroups: vec!["enforcer/agents".into(), "agents-1.scope".into()],
                configured: vec!["agents-*.scope".into()],
                agents: 2,
            }],
            policy: PolicyStatus {
                path: "/etc/enforcer/policy.yaml".into(),
                hash: "ab".repeat(32),
            },
            audit: AuditStatus {
                dir: "/var/lib/enforcer/audit".into(),
                last_seq: Some(41),
                last_checkpoint: Some(CheckpointStatus {
                    seq: 40,
                    ts: "2026-11-30T05:01:00.000000Z".into(),
                }),
                bytes: 12345,
                shipping: None,
            },
            decisions: BTreeMap::from([("allow".into(), 3), ("block".into(), 27)]),
            reviews_pending: 1,
            sessions_live: 2,
        }
    }
}

/// Tagged cgroups (relative to the cgroup root) and live processes, by profile: a bounded walk below the attach
/// cgroup, following the kernel's rule that a cgroup's nearest tagged ancestor decides.
fn tagged_cgroups(
    config: &Config,
    attach: &Path,
) -> (BTreeMap<String, Vec<String>>, BTreeMap<String, u64>) {
    let mut tagged: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut agents: BTreeMap<String, u64> = BTreeMap::new();
    let Ok(table) =
        crate::capture::TagTable::open_pinned(&config.capture.pin_dir, &config.cgroup_root)
    else {
        return (tagged, agents);
    };
    let tags: HashMap<u64, String> = table.entries().into_iter().collect();
    let mut queue: Vec<(PathBuf, Option<String>)> = vec![(attach.to_path_buf(), None)];
    let mut visited = 0;
    while let Some((dir, inherited)) = queue.pop() {
        visited += 1;
        if visited > WALK_LIMIT {
            break;
        }
        let own = std::fs::metadata(&dir)
            .ok()
            .and_then(|m| tags.get(&m.ino()).cloned());
        if let Some(profile) = &own {
            let rel = dir.strip_prefix(&config.cgroup_root).unwrap_or(&dir);
            tagged
                .entry(profile.clone())
                .or_default()
                .push(rel.display().to_string());
        }
        let effective = own.or(inherited);
        if let Some(profile) = &effective {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs"))
                .map(|p| p.lines().filter(|l| !l.trim().is_empty()).count() as u64)
                .unwrap_or(0);
            *agents.entry(profile.clone()).or_default() += procs;
        }
        queue.extend(
            crate::capture::child_cgroups(&dir)
                .into_iter()
                .map(|child| (child, effective.clone())),
        );
    }
    for list in tagged.values_mut() {
        list.sort();
    }
    (tagged, agents)
}

/// The programs whose links are pinned in `pin_dir` (`link_<program>`).
fn programs(pin_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(pin_dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .strip_prefix("link_")
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// The last signed checkpoint in `<dir>/checkpoints.jsonl`.
fn last_checkpoint(dir: &Path) -> Option<CheckpointStatus> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(dir.join(crate::audit::checkpoint::CHECKPOINT_FILE)).ok()?;
    let len = f.metadata().ok()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(CHECKPOINT_TAIL)))
        .ok()?;
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).ok()?;
    let line = tail.split(|b| *b == b'\n').rev().find(|l| !l.is_empty())?;
    let cp = crate::audit::checkpoint::Checkpoint::parse(line).ok()?;
    Some(CheckpointStatus {
        seq: cp.seq,
        ts: cp.ts,
    })
}

/// Bytes of the regular files directly in `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// RFC 3339 in UTC, to the second.
fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_part() {
        let text = Status::example().render();
        assert!(
            text.starts_with("enforcer 0.1.0, pid 1, up since 2026-11-30T05:00:00Z (1h 2m)\n"),
            "{text}"
        );
        assert!(text.contains("health:    ok\n"));
        assert!(text.contains("2 programs attached at /sys/fs/cgroup/unified"));
        assert!(text.contains("  agents           2 agents; tagged: enforcer/agents, agents-1.scope; configured: agents-*.scope\n"), "{text}");
        assert!(text.contains("last seq 41, last checkpoint seq 40 at 2026-11-30T05:01:00.000000Z, 12345 bytes on disk"));
        assert!(text.contains(
            "decisions: allow 3, log 0, constrain 0, review 0, block 27 (since start)\n"
        ));
        assert!(
            text.contains("sessions:  2 live; reviews: 1 pending\n"),
            "{text}"
        );
    }

    #[test]
    fn json_round_trips() {
        let s = Status::example();
        let back: Status = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[tokio::test]
    async fn audit_position_comes_from_the_trail() {
        let dir = tempfile::tempdir().unwrap();
        let audit = crate::audit::AuditLog::open(crate::audit::AuditConfig::new(dir.path()))
            .await
            .unwrap();
        audit.close().await.unwrap();
        // A fresh trail has no records and so no checkpoint yet; the key files count as bytes.
        assert_eq!(last_checkpoint(dir.path()), None);
        assert!(dir_bytes(dir.path()) > 0);
        std::fs::write(
            dir.path().join("checkpoints.jsonl"),
            "garbage\n{\"seq\":7,\"hash\":\"".to_string()
                + &"0".repeat(64)
                + "\",\"ts\":\"T\",\"key\":\"0000000000000000\",\"sig\":\""
                + &"0".repeat(128)
                + "\"}\n",
        )
        .unwrap();
        assert_eq!(
            last_checkpoint(dir.path()),
            Some(CheckpointStatus {
                seq: 7,
                ts: "T".into()
            })
        );
    }
}
