//! The daemon's configuration file (`enforcer run --config FILE`): where the policy, CA and audit trail live, which
//! ports the proxy listens on, which cgroups belong to which profile. Everything has a default, so the daemon runs
//! without a file. Parsing only; the stages read the plain structs.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default location of the daemon's state (CA, audit trail).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/enforcer";
/// Default for `proxy.max_connections`: client connections served at once over every listener.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default for `proxy.max_connections_per_agent`: one agent's (cgroup's) share of them.
pub const DEFAULT_MAX_CONNECTIONS_PER_AGENT: usize = 256;
/// Default for `proxy.max_buffered_bytes`: bytes held in buffers (bodies and messages read whole before they are
/// decided, each counted twice: the buffer and inspection's text of it) at once, over every agent. 512 MiB is 64
/// bodies of the default `max_body_bytes` (4 MiB): four agents at their full share, and a daemon that stays well
/// inside a 1 GiB memory limit.
pub const DEFAULT_MAX_BUFFERED_BYTES: u64 = 512 * 1024 * 1024;
/// Default for `proxy.max_buffered_bytes_per_agent`: one agent's share of them. 128 MiB is 16 bodies of the default
/// `max_body_bytes` at once, and hundreds of the sizes agents send (LLM and tool calls of tens of KiB); one HTTP/2
/// connection (100 streams) cannot fill the total, and it takes four agents to.
pub const DEFAULT_MAX_BUFFERED_BYTES_PER_AGENT: u64 = 128 * 1024 * 1024;
/// Default cgroup v2 mount point on hosts where `/sys/fs/cgroup` is not cgroup2 (hybrid hierarchy).
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
    /// A setting out of its range, or at odds with another: `field` names it.
    #[error("{path}: {field} {why}")]
    Invalid {
        path: String,
        field: &'static str,
        why: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Policy file. Default: the shipped default policy.
    pub policy: Option<PathBuf>,
    /// State directory (made 0711: others may reach files by name, not list it). `ca/` (the CA key, 0700) and
    /// `audit/` (0700) live under it unless set explicitly, and `public/` (0755: the CA certificate and the trust
    /// bundle agents read, 0644).
    pub state_dir: PathBuf,
    /// The cgroup v2 mount point.
    pub cgroup_root: PathBuf,
    #[serde(deserialize_with = "null_as_default")]
    pub capture: CaptureSettings,
    #[serde(deserialize_with = "null_as_default")]
    pub proxy: ProxyConfig,
    /// The DNS listener tagged processes' DNS datagrams are redirected to.
    #[serde(deserialize_with = "null_as_default")]
    pub dns: DnsConfig,
    #[serde(deserialize_with = "null_as_default")]
    pub audit: AuditSettings,
    /// How LLM providers are recognised (host lists, per-host overrides for self-hosted or test endpoints).
    #[serde(deserialize_with = "null_as_default")]
    pub inspect: crate::inspect::InspectConfig,
    /// Profiles and the cgroups (paths relative to `cgroup_root`) that belong to each. `enforcer exec` also creates
    /// cgroups under `<cgroup_root>/enforcer/<profile>/`, which the daemon tags for every profile listed here.
    pub profiles: BTreeMap<String, ProfileConfig>,
    /// The Prometheus endpoint (off unless `listen` is set).
    #[serde(deserialize_with = "null_as_default")]
    pub metrics: MetricsConfig,
    /// The local control socket (`<state_dir>/control.sock`) that `enforcer status` and `enforcer reload` use.
    #[serde(deserialize_with = "null_as_default")]
    pub control: ControlConfig,
    /// Human review of exchanges a `review` verdict holds: bounds and the optional webhook.
    #[serde(deserialize_with = "null_as_default")]
    pub review: crate::review::ReviewSettings,
    /// Bounds on the per-session state the daemon keeps.
    #[serde(deserialize_with = "null_as_default")]
    pub sessions: crate::session::SessionLimits,
    /// Retained traces: the recipient they are encrypted to, where they live, their size and age limits.
    #[serde(deserialize_with = "null_as_default")]
    pub traces: crate::trace::TraceSettings,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the `/metrics` endpoint, e.g. `127.0.0.1:9464`. Off when unset.
    pub listen: Option<SocketAddr>,
    /// Serve on a non-loopback address (the endpoint has no authentication; refused unless set).
    pub allow_non_loopback: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// A group (name or gid) whose members may use the control socket besides root (`enforcer status`).
    pub group: Option<String>,
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
    /// Seconds between full rescans of the cgroup tree for profile cgroups (paths and globs) that appeared; new
    /// cgroups are normally seen at once through inotify, the rescan is the safety net.
    pub rescan_secs: u64,
}

impl Default for CaptureSettings {
    fn default() -> Self {
        CaptureSettings {
            enabled: true,
            cgroup: PathBuf::new(),
            pin_dir: PathBuf::from("/sys/fs/bpf/enforcer"),
            rescan_secs: 10,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProfileConfig {
    /// Cgroups of this profile, relative to `cgroup_root`: paths or globs (`*` and `?` within a segment, `**` any
    /// number of segments, e.g. `agents-*.scope` or `kubepods.slice/**/kubepods-*pod<uid>.slice`). The daemon tags
    /// those that exist at start and each one that appears later.
    pub cgroups: Vec<PathBuf>,
    /// Let this profile's agents serve: bind non-loopback addresses (the wildcard included) and receive packets from
    /// other hosts. Off by default: the kernel refuses such binds and drops such packets (docs/proxy.md). What an
    /// agent sends back over a connection it accepted is not seen by the proxy.
    pub accept_inbound: bool,
    /// The person this profile's cgroups act for (the `user` condition), when they are not started by
    /// `enforcer exec` (which names the user who ran it).
    pub user: Option<String>,
    /// That person's groups (the `groups` condition).
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Transparent proxy port on 127.0.0.1 and ::1 (where the eBPF programs redirect tagged connections).
    pub port: u16,
    /// Explicit proxy (HTTP CONNECT / absolute-form) listener; off unless set.
    pub explicit: Option<ExplicitProxy>,
    /// Where upstream certificates are verified from: `system` (default: the host's trust store, as OpenSSL finds it
    /// — `/etc/ssl/certs` on Debian, or the files `SSL_CERT_FILE` / `SSL_CERT_DIR` name in the daemon's
    /// environment) or `bundled` (the Mozilla roots compiled into the binary, for hosts without a usable store).
    pub upstream_roots: UpstreamRoots,
    /// Extra PEM files of CA certificates trusted for upstream connections, added to `upstream_roots`.
    pub extra_roots: Vec<PathBuf>,
    /// Host names pinned to addresses, for binding plain-HTTP `Host` headers to the original destination in
    /// transparent mode (checked before DNS, and authoritative for the names listed: no DNS for them). Air-gapped
    /// hosts and tests use it; other names are bound through the system resolver.
    pub static_hosts: BTreeMap<String, Vec<IpAddr>>,
    /// Most client connections served at once over every listener; more are closed unserved (and recorded).
    pub max_connections: usize,
    /// Most client connections served at once for one agent (cgroup): its share of `max_connections`.
    pub max_connections_per_agent: usize,
    /// Most bytes held at once in buffers — request bodies, and responses, events and WebSocket messages read whole
    /// for their decision — over every agent. A request that would take more is refused with 503 and `Retry-After`
    /// (recorded, reason `buffer_limit`). Default 512 MiB.
    pub max_buffered_bytes: u64,
    /// Most bytes one agent's (cgroup's) buffers hold at once: its share of `max_buffered_bytes`, at most that and at
    /// least twice the policy's `max_body_bytes` (one body and inspection's text of it). Default 128 MiB.
    pub max_buffered_bytes_per_agent: u64,
}

impl ProxyConfig {
    /// The buffer budget's fields, checked against each other: `(field, why)` of the first that is wrong.
    pub fn check_budget(&self) -> Result<(), (&'static str, String)> {
        if self.max_buffered_bytes == 0 {
            return Err(("proxy.max_buffered_bytes", "must be more than 0".into()));
        }
        if self.max_buffered_bytes_per_agent > self.max_buffered_bytes {
            return Err((
                "proxy.max_buffered_bytes_per_agent",
                format!(
                    "({}) must not exceed proxy.max_buffered_bytes ({})",
                    self.max_buffered_bytes_per_agent, self.max_buffered_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Whether a policy whose `max_body_bytes` is `max_body_bytes` can be served: an agent's share of the buffer
    /// budget must take one body of that size (counted twice: the body and inspection's text of it), else a body the
    /// policy allows could never be read. `(field, why)`.
    pub fn check_body_limit(&self, max_body_bytes: u64) -> Result<(), (&'static str, String)> {
        let needed = max_body_bytes.saturating_mul(crate::proxy::INSPECTED_COPIES);
        if self.max_buffered_bytes_per_agent < needed {
            return Err((
                "proxy.max_buffered_bytes_per_agent",
                format!(
                    "({}) is below what one body of the policy's max_body_bytes ({max_body_bytes}) takes while it is \
                     read and inspected ({needed}): a body the policy allows could never be read",
                    self.max_buffered_bytes_per_agent
                ),
            ));
        }
        Ok(())
    }
}

/// The source of the roots upstream certificates are verified against (`proxy.upstream_roots`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamRoots {
    /// The host's trust store, found like OpenSSL finds it (rustls-native-certs): follows the host's CA updates, a
    /// corporate TLS proxy's CA and internal CAs the administrator installed.
    #[default]
    System,
    /// The Mozilla roots compiled into the binary (webpki-roots): updated only by a rebuild.
    Bundled,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// UDP port of the DNS listener on 127.0.0.1 and ::1. (DNS over TCP port 53 arrives through the proxy's port.)
    pub port: u16,
    /// The resolver allowed queries are forwarded to (over UDP, or over TCP for queries that came over TCP).
    /// Default: the first `nameserver` in /etc/resolv.conf.
    pub upstream: Option<SocketAddr>,
    /// How long to wait for the upstream's answer before answering SERVFAIL.
    pub timeout_ms: u64,
    /// Queries handled at once, over every agent; datagrams beyond this are dropped (the client retries).
    pub max_in_flight: usize,
    /// Queries one agent (one cgroup) may have in flight at once: its share, so an agent that floods the listener
    /// cannot take the places of the others. Datagrams beyond it are dropped; a TCP connection waits.
    pub max_in_flight_per_agent: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            port: 15053,
            upstream: None,
            timeout_ms: 2000,
            max_in_flight: 512,
            max_in_flight_per_agent: 64,
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
    /// Ship every record and checkpoint to a central syslog collector (RFC 5424 over TLS, docs/audit.md
    /// "Shipping"). Default: not shipped.
    pub ship: Option<crate::audit::ShipConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            policy: None,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            cgroup_root: default_cgroup_root(),
            capture: CaptureSettings::default(),
            proxy: ProxyConfig::default(),
            dns: DnsConfig::default(),
            audit: AuditSettings::default(),
            inspect: crate::inspect::InspectConfig::default(),
            profiles: BTreeMap::from([("default".to_string(), ProfileConfig::default())]),
            metrics: MetricsConfig::default(),
            control: ControlConfig::default(),
            review: crate::review::ReviewSettings::default(),
            sessions: crate::session::SessionLimits::default(),
            traces: crate::trace::TraceSettings::default(),
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            port: 15001,
            explicit: None,
            upstream_roots: UpstreamRoots::default(),
            extra_roots: Vec::new(),
            static_hosts: BTreeMap::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_agent: DEFAULT_MAX_CONNECTIONS_PER_AGENT,
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
            max_buffered_bytes_per_agent: DEFAULT_MAX_BUFFERED_BYTES_PER_AGENT,
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
            ship: None,
        }
    }
}

/// The port of `url` when its host is on the loopback interface (`127.0.0.0/8`, `::1`, `localhost`): the port
/// given, else the scheme's (80, 443). `None` for any other host or a URL that does not parse.
fn loopback_port(url: &str) -> Option<u16> {
    let uri: http::Uri = url.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return None;
    }
    uri.port_u16().or(match uri.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    })
}

/// A section written with nothing but comments under it (`metrics:`) is YAML null: read it as the defaults.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The cgroup v2 mount: `/sys/fs/cgroup` on hosts with the unified hierarchy (systemd's default), else
/// [`DEFAULT_CGROUP_ROOT`] (hybrid hosts).
fn default_cgroup_root() -> PathBuf {
    let unified = Path::new("/sys/fs/cgroup");
    if crate::service::preflight::is_cgroup2(unified) {
        unified.to_path_buf()
    } else {
        PathBuf::from(DEFAULT_CGROUP_ROOT)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let config: Config = serde_saphyr::from_str(&src).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source: Box::new(source),
        })?;
        config
            .proxy
            .check_budget()
            .map_err(|(field, why)| ConfigError::Invalid {
                path: path.display().to_string(),
                field,
                why,
            })?;
        Ok(config)
    }

    /// Load `path` if given, else the built-in defaults.
    pub fn load_or_default(path: Option<&Path>) -> Result<Config, ConfigError> {
        path.map_or_else(|| Ok(Config::default()), Config::load)
    }

    /// The cgroup the programs attach to (absolute path).
    pub fn attach_cgroup(&self) -> PathBuf {
        self.cgroup_root.join(&self.capture.cgroup)
    }

    /// The ports no tagged process may bind (`capture::CaptureConfig::daemon_ports`), beside the proxy's and the
    /// DNS listener's: the explicit proxy's, the metrics endpoint's, the review links' and, when the review webhook
    /// is on the loopback interface (`127.0.0.0/8`, `::1`, `localhost`), the receiver's, which an agent binding it
    /// first would get every review's signed links from. Each port is reserved on every address: a listener on
    /// 127.0.0.1 alone could otherwise be shadowed on ::1 for a client that dials `localhost`.
    pub fn daemon_ports(&self) -> Vec<u16> {
        let webhook = self.review.webhook.as_ref();
        let receiver = webhook.and_then(|w| loopback_port(&w.url));
        let mut ports: Vec<u16> = [
            Some(self.proxy.port),
            Some(self.dns.port),
            self.proxy.explicit.as_ref().map(|e| e.port),
            self.metrics.listen.map(|a| a.port()),
            webhook.map(|w| w.listen.port()),
            receiver,
        ]
        .into_iter()
        .flatten()
        .filter(|&p| p != 0)
        .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Where `enforcer exec` creates the cgroups of `profile` (absolute path).
    pub fn profile_cgroup(&self, profile: &str) -> PathBuf {
        self.attach_cgroup().join("enforcer").join(profile)
    }

    /// Where the daemon publishes what agents must read (0755, files 0644): the CA certificate and the bundle.
    pub fn public_dir(&self) -> PathBuf {
        self.state_dir.join("public")
    }

    /// The bundle of system roots + the enforcer CA that `enforcer exec` hands to clients.
    pub fn ca_bundle(&self) -> PathBuf {
        self.public_dir().join("bundle.pem")
    }

    /// The enforcer CA certificate alone, for clients that add it to roots of their own.
    pub fn ca_cert(&self) -> PathBuf {
        self.public_dir().join("ca.pem")
    }

    pub fn audit_dir(&self) -> PathBuf {
        self.audit
            .dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("audit"))
    }

    /// The CA's private directory (0700): its certificate and key.
    pub fn ca_dir(&self) -> PathBuf {
        self.state_dir.join("ca")
    }

    /// The person configured for each profile's cgroups (`profiles.NAME.user`, `groups`).
    pub fn profile_people(&self) -> std::collections::HashMap<String, crate::session::Person> {
        self.profiles
            .iter()
            .filter_map(|(name, p)| {
                let user = p.user.clone()?;
                Some((
                    name.clone(),
                    crate::session::Person {
                        user,
                        uid: None,
                        groups: p.groups.clone(),
                    },
                ))
            })
            .collect()
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
        cfg.ship = self.audit.ship.clone();
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
    fn the_buffer_budget_is_checked_at_load_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("enforcer.yaml");
        let load = |yaml: &str| {
            std::fs::write(&path, yaml).unwrap();
            Config::load(&path)
        };
        let ok = load(
            "proxy:\n  max_buffered_bytes: 1073741824\n  max_buffered_bytes_per_agent: 268435456\n",
        )
        .unwrap();
        assert_eq!(
            (
                ok.proxy.max_buffered_bytes,
                ok.proxy.max_buffered_bytes_per_agent
            ),
            (1 << 30, 1 << 28)
        );
        let d = Config::default().proxy;
        assert_eq!(
            (d.max_buffered_bytes, d.max_buffered_bytes_per_agent),
            (512 << 20, 128 << 20)
        );
        assert!(d.check_budget().is_ok());
        assert!(d
            .check_body_limit(crate::policy::DEFAULT_MAX_BODY_BYTES)
            .is_ok());

        let e = load("proxy:\n  max_buffered_bytes: 1000\n  max_buffered_bytes_per_agent: 2000\n")
            .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    field: "proxy.max_buffered_bytes_per_agent",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("proxy.max_buffered_bytes_per_agent (2000) must not exceed proxy.max_buffered_bytes (1000)"), "{e}");
        let e = load("proxy:\n  max_buffered_bytes: 0\n  max_buffered_bytes_per_agent: 0\n")
            .unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::Invalid {
                    field: "proxy.max_buffered_bytes",
                    ..
                }
            ),
            "{e}"
        );

        assert!(d.check_body_limit(64 << 20).is_ok());
        let (field, why) = d.check_body_limit((64 << 20) + 1).unwrap_err();
        assert_eq!(field, "proxy.max_buffered_bytes_per_agent");
        assert!(
            why.starts_with(
                "(134217728) is below what one body of the policy's max_body_bytes (67108865) takes while it is \
                 read and inspected (134217730)"
            ),
            "{why}"
        );
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
        let yaml = "audit:\n  ship:\n    collector: logs.example.net:6514\n    ca_file: /etc/enforcer/collector-ca.pem\n";
        let ship = serde_saphyr::from_str::<Config>(yaml)
            .unwrap()
            .audit_config()
            .ship
            .unwrap();
        assert_eq!(
            (ship.collector.as_str(), ship.queue),
            ("logs.example.net:6514", 4096)
        );
        assert!(serde_saphyr::from_str::<Config>("audit:\n  ship:\n    collector: x:1\n").is_err());
    }

    #[test]
    fn sections_with_only_comments_take_the_defaults() {
        let yaml = "metrics:\n  #listen: x\ncontrol:\ncapture:\n  #cgroup: x\nproxy:\n";
        let config: Config = serde_saphyr::from_str(yaml).unwrap();
        assert!(config.metrics.listen.is_none());
        assert!(config.capture.enabled);
        assert_eq!(config.proxy.port, 15001);
    }

    #[test]
    fn the_packaged_config_parses_to_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/enforcer.yaml");
        let config = Config::load(&path).unwrap();
        assert_eq!(config.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert!(config.policy.is_none());
        assert_eq!(config.proxy.port, Config::default().proxy.port);
        assert_eq!(config.profiles.keys().collect::<Vec<_>>(), ["default"]);
        assert!(config.metrics.listen.is_none());
    }

    #[test]
    fn ops_settings_parse_and_default() {
        let yaml = "metrics: { listen: \"127.0.0.1:9464\" }\ncontrol: { group: enforcer }\ncapture: { rescan_secs: 3 }\n";
        let config: Config = serde_saphyr::from_str(yaml).unwrap();
        assert_eq!(
            config.metrics.listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 9464)))
        );
        assert!(!config.metrics.allow_non_loopback);
        assert_eq!(config.control.group.as_deref(), Some("enforcer"));
        assert_eq!(config.capture.rescan_secs, 3);
        let default = Config::default();
        assert!(default.metrics.listen.is_none());
        assert!(default.control.group.is_none());
        assert!(serde_saphyr::from_str::<Config>("metrics: { listen: nowhere }\n").is_err());
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
        assert_eq!(
            (config.dns.max_in_flight, config.dns.max_in_flight_per_agent),
            (512, 64)
        );
        let config: Config =
            serde_saphyr::from_str("dns: { max_in_flight_per_agent: 8 }\n").unwrap();
        assert_eq!(config.dns.max_in_flight_per_agent, 8);
        let default = Config::default();
        assert_eq!(default.dns.port, 15053);
        assert!(default.dns.upstream.is_none());
        assert!(serde_saphyr::from_str::<Config>("dns: { upstream: nowhere }\n").is_err());
    }

    #[test]
    fn upstream_roots_default_to_the_system_store() {
        assert_eq!(
            Config::default().proxy.upstream_roots,
            UpstreamRoots::System
        );
        let config: Config =
            serde_saphyr::from_str("proxy: { upstream_roots: bundled }\n").unwrap();
        assert_eq!(config.proxy.upstream_roots, UpstreamRoots::Bundled);
        assert!(serde_saphyr::from_str::<Config>("proxy: { upstream_roots: mozilla }\n").is_err());
    }

    #[test]
    fn profiles_refuse_inbound_unless_configured_to_serve() {
        let yaml = "profiles:\n  coder: {}\n  devserver: { accept_inbound: true }\n";
        let config: Config = serde_saphyr::from_str(yaml).unwrap();
        assert!(!config.profiles["coder"].accept_inbound);
        assert!(config.profiles["devserver"].accept_inbound);
        assert!(!Config::default().profiles["default"].accept_inbound);
        assert!(serde_saphyr::from_str::<Config>("profiles: { a: { serve: true } }\n").is_err());
    }

    #[test]
    fn the_daemons_ports_are_its_listeners_and_a_loopback_webhook_receiver() {
        let yaml = "proxy: { port: 15001, explicit: { port: 3128, profile: p } }\n\
                    dns: { port: 15053 }\nmetrics: { listen: \"127.0.0.1:9464\" }\n\
                    review: { webhook: { url: \"http://localhost:8088/hook\", listen: \"127.0.0.1:15080\" } }\n";
        let config: Config = serde_saphyr::from_str(yaml).unwrap();
        assert_eq!(
            config.daemon_ports(),
            [3128, 8088, 9464, 15001, 15053, 15080]
        );
        for (url, port) in [
            ("http://127.0.0.2/hook", Some(80)),
            ("https://[::1]/hook", Some(443)),
            ("http://LOCALHOST:81/", Some(81)),
            ("https://hooks.example.com/x", None),
            ("http://10.0.0.1:8088/", None),
        ] {
            assert_eq!(loopback_port(url), port, "{url}");
        }
    }
}
