//! The daemon's configuration file (`enforcer run --config FILE`): where the policy, CA and audit trail live, which
//! ports the proxy listens on, which cgroups belong to which profile. Everything has a default, so the daemon runs
//! without a file. Parsing only; the stages read the plain structs.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default location of the daemon's state (CA, audit trail).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/enforcer";
/// Default cgroup v2 mount point.
pub const DEFAULT_CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: Box<serde_saphyr::Error>,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Policy file. Default: the shipped default policy.
    pub policy: Option<PathBuf>,
    /// State directory: `ca/` and `audit/` live under it unless set explicitly.
    pub state_dir: PathBuf,
    /// The cgroup v2 mount point.
    pub cgroup_root: PathBuf,
    pub capture: CaptureSettings,
    pub proxy: ProxyConfig,
    /// The DNS listener tagged processes' DNS datagrams are redirected to.
    pub dns: DnsConfig,
    pub audit: AuditSettings,
    /// How LLM providers are recognised (host lists, per-host overrides for self-hosted or test endpoints).
    pub inspect: crate::inspect::InspectConfig,
    /// Profiles and the cgroups (paths relative to `cgroup_root`) that belong to each. `enforcer exec` also creates
    /// cgroups under `<cgroup_root>/enforcer/<profile>/`, which the daemon tags for every profile listed here.
    pub profiles: BTreeMap<String, ProfileConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureSettings {
    /// Load and attach the eBPF programs (off only on hosts that use the explicit proxy alone).
    pub enabled: bool,
    /// The cgroup (relative to `cgroup_root`) the programs attach to; `enforcer exec` cgroups are created under
    /// `<this>/enforcer/<profile>/`. Default: the root, so every process on the host is covered.
    pub cgroup: PathBuf,
    /// bpffs directory where the tag map is pinned (so `enforcer exec` and `enforcer cgroup` can reach it).
    pub pin_dir: PathBuf,
}

impl Default for CaptureSettings {
    fn default() -> Self {
        CaptureSettings {
            enabled: true,
            cgroup: PathBuf::new(),
            pin_dir: PathBuf::from("/sys/fs/bpf/enforcer"),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileConfig {
    pub cgroups: Vec<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Transparent proxy port on 127.0.0.1 and ::1 (where the eBPF programs redirect tagged connections).
    pub port: u16,
    /// Explicit proxy (HTTP CONNECT / absolute-form) listener; off unless set.
    pub explicit: Option<ExplicitProxy>,
    /// Extra PEM files of CA certificates trusted for upstream connections, beside the webpki roots.
    pub extra_roots: Vec<PathBuf>,
    /// Host names pinned to addresses, for binding plain-HTTP `Host` headers to the original destination in
    /// transparent mode (checked before DNS, and authoritative for the names listed: no DNS for them). Air-gapped
    /// hosts and tests use it; other names are bound through the system resolver.
    pub static_hosts: BTreeMap<String, Vec<IpAddr>>,
    /// Most client connections served at once over every listener; more wait in the kernel's backlog.
    pub max_connections: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// UDP port of the DNS listener on 127.0.0.1 and ::1.
    pub port: u16,
    /// The resolver allowed queries are forwarded to. Default: the first `nameserver` in /etc/resolv.conf.
    pub upstream: Option<SocketAddr>,
    /// How long to wait for the upstream's answer before answering SERVFAIL.
    pub timeout_ms: u64,
    /// Queries handled at once; datagrams beyond this are dropped (the client retries).
    pub max_in_flight: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            port: 15053,
            upstream: None,
            timeout_ms: 2000,
            max_in_flight: 256,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplicitProxy {
    pub port: u16,
    /// The profile applied to every client of this listener.
    pub profile: String,
}

/// The `audit:` section: where the trail lives, when files rotate and checkpoints are signed, durability, and how
/// much is kept (docs/audit.md, "Configuration").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditSettings {
    /// Default: `<state_dir>/audit`.
    pub dir: Option<PathBuf>,
    /// Start a new file before one would grow past this many bytes. Default 64 MiB.
    pub rotate_bytes: u64,
    /// Sign a checkpoint every this many records ... Default 1000.
    pub checkpoint_every: u64,
    /// ... or this many seconds after the first unsigned record. Default 10.
    pub checkpoint_interval_secs: u64,
    /// Hold the agent's response until its record is on disk (`fdatasync`): it then survives a power cut, not just
    /// the daemon being killed. Default true; `false` is the explicit opt-out.
    pub durable: bool,
    /// Copy each checkpoint to the local syslog socket `/dev/log`. Default false.
    pub syslog: bool,
    /// Compress rotated files with zstd (`audit-<seq>.jsonl.zst`, about a tenth of the size). Default true.
    pub compress: bool,
    /// Delete the oldest rotated files (recording the deletion in the chain first) so the trail's files stay within
    /// this many bytes on disk; 0 keeps everything. Must be 0 or at least twice `rotate_bytes`. Default 4 GiB.
    pub max_total_bytes: u64,
    /// Delete rotated files whose records are all older than this many days (recorded likewise); 0 keeps them.
    /// Default 0.
    pub max_age_days: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy: None,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            cgroup_root: PathBuf::from(DEFAULT_CGROUP_ROOT),
            capture: CaptureSettings::default(),
            proxy: ProxyConfig::default(),
            dns: DnsConfig::default(),
            audit: AuditSettings::default(),
            inspect: crate::inspect::InspectConfig::default(),
            profiles: BTreeMap::from([("default".to_string(), ProfileConfig::default())]),
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            port: 15001,
            explicit: None,
            extra_roots: Vec::new(),
            static_hosts: BTreeMap::new(),
            max_connections: crate::proxy::Limits::default().max_connections,
        }
    }
}

impl Default for AuditSettings {
    fn default() -> Self {
        AuditSettings {
            dir: None,
            rotate_bytes: 64 * 1024 * 1024,
            checkpoint_every: 1000,
            checkpoint_interval_secs: 10,
            durable: true,
            syslog: false,
            compress: true,
            max_total_bytes: crate::audit::DEFAULT_MAX_TOTAL_BYTES,
            max_age_days: 0,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        serde_saphyr::from_str(&src).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source: Box::new(source),
        })
    }

    /// Load `path` if given, else the built-in defaults.
    pub fn load_or_default(path: Option<&Path>) -> Result<Config, ConfigError> {
        path.map_or_else(|| Ok(Config::default()), Config::load)
    }

    /// The cgroup the programs attach to (absolute path).
    pub fn attach_cgroup(&self) -> PathBuf {
        self.cgroup_root.join(&self.capture.cgroup)
    }

    /// Where `enforcer exec` creates the cgroups of `profile` (absolute path).
    pub fn profile_cgroup(&self, profile: &str) -> PathBuf {
        self.attach_cgroup().join("enforcer").join(profile)
    }

    /// The bundle of system roots + the enforcer CA that `enforcer exec` hands to clients.
    pub fn ca_bundle(&self) -> PathBuf {
        self.ca_dir().join("bundle.pem")
    }

    pub fn audit_dir(&self) -> PathBuf {
        self.audit
            .dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("audit"))
    }

    pub fn ca_dir(&self) -> PathBuf {
        self.state_dir.join("ca")
    }

    pub fn audit_config(&self) -> crate::audit::AuditConfig {
        let mut cfg = crate::audit::AuditConfig::new(self.audit_dir());
        cfg.rotate_bytes = self.audit.rotate_bytes;
        cfg.checkpoint_every = self.audit.checkpoint_every;
        cfg.checkpoint_interval =
            std::time::Duration::from_secs(self.audit.checkpoint_interval_secs);
        cfg.durable = self.audit.durable;
        cfg.syslog = self.audit.syslog;
        cfg.compress = self.audit.compress;
        cfg.max_total_bytes = self.audit.max_total_bytes;
        cfg.max_age = (self.audit.max_age_days > 0).then(|| {
            std::time::Duration::from_secs(self.audit.max_age_days.saturating_mul(86_400))
        });
        cfg
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_hosts_parse_v4_and_v6_and_default_to_empty() {
        let yaml = "proxy:\n  port: 15009\n  static_hosts:\n    api.e2e.test: [\"10.77.1.2\", \"fd77:1::2\"]\n";
        let config: Config = serde_saphyr::from_str(yaml).unwrap();
        let ips = &config.proxy.static_hosts["api.e2e.test"];
        assert_eq!(ips.len(), 2);
        assert_eq!(ips[0], IpAddr::from([10, 77, 1, 2]));
        assert!(ips[1].is_ipv6());
        assert!(Config::default().proxy.static_hosts.is_empty());
        let bad = "proxy:\n  static_hosts:\n    x.test: [\"not-an-ip\"]\n";
        assert!(serde_saphyr::from_str::<Config>(bad).is_err());
    }

    #[test]
    fn audit_retention_settings_parse_and_default() {
        let yaml = "audit:\n  max_total_bytes: 1073741824\n  max_age_days: 30\n  compress: false\n";
        let config: Config = serde_saphyr::from_str(yaml).unwrap();
        let cfg = config.audit_config();
        assert_eq!(cfg.max_total_bytes, 1 << 30);
        assert_eq!(
            cfg.max_age,
            Some(std::time::Duration::from_secs(30 * 86_400))
        );
        assert!(!cfg.compress && cfg.durable);
        let cfg = Config::default().audit_config();
        assert_eq!(
            (cfg.max_total_bytes, cfg.max_age, cfg.compress),
            (4 << 30, None, true)
        );
        assert!(serde_saphyr::from_str::<Config>("audit:\n  max_total_byte: 1\n").is_err());
    }

    #[test]
    fn dns_settings_parse_and_default() {
        let yaml = "dns: { port: 15099, upstream: \"10.77.0.2:53\" }\n";
        let config: Config = serde_saphyr::from_str(yaml).unwrap();
        assert_eq!(config.dns.port, 15099);
        assert_eq!(
            config.dns.upstream,
            Some(SocketAddr::from(([10, 77, 0, 2], 53)))
        );
        assert_eq!(config.dns.timeout_ms, 2000);
        let default = Config::default();
        assert_eq!(default.dns.port, 15053);
        assert!(default.dns.upstream.is_none());
        assert!(serde_saphyr::from_str::<Config>("dns: { upstream: nowhere }\n").is_err());
    }
}
