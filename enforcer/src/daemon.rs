//! `enforcer run`: wires the stages together. Loads the configuration and policy, opens the audit trail, loads the
//! CA, checks the host's setup, attaches the eBPF capture, starts the proxy, DNS, control-socket and metrics
//! listeners and the cgroup watcher, reports readiness (`READY proxy_port=N` on stdout, and `READY=1` to systemd when
//! `NOTIFY_SOCKET` is set: only once all of that is in place), pings the systemd watchdog while healthy, reloads the
//! policy on SIGHUP or `enforcer reload` (`RELOADING=1` … `READY=1`), and shuts down cleanly on SIGTERM/SIGINT
//! (`STOPPING=1`).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tokio::net::{TcpListener, UdpSocket};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::audit::record::{CgroupAction, CgroupChange, CgroupSource};
use crate::audit::AuditLog;
use crate::capture::{Capture, CaptureConfig};
use crate::config::Config;
use crate::control::{ReloadReply, StatusSources};
use crate::metrics::{Metrics, ReloadResult};
use crate::model::{Origin, OriginLookup};
use crate::policy::{Policy, PolicyError, SharedPolicy};
use crate::proxy::{CancellationToken, CertAuthority, HostBinder, ProxyContext, UpstreamTls};
use crate::service::preflight::bind_error;
use crate::service::{Health, Notifier};

/// The policy enforced when the configuration names none: `policies/default.yaml`, built in.
pub const DEFAULT_POLICY: &str = include_str!("../../policies/default.yaml");

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Daemon configuration file (YAML). Without it the built-in defaults apply.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Operational log format on stderr: `text` (readable) or `json` (one object per line, for journald and log
    /// shippers). The level comes from `RUST_LOG` (default `info`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    /// Daemon configuration file (YAML), as given to `enforcer run`.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Where a running daemon writes its pid, under the state directory (removed on clean shutdown).
const PID_FILE: &str = "enforcer.pid";

/// `enforcer reload`: check the configured policy, then ask the running daemon to load it over the control socket
/// and report what it did (exit 1 when the daemon could not load it). A daemon without a control socket is sent
/// SIGHUP through the pid in `<state_dir>/enforcer.pid`. A policy that does not load is reported here and the daemon
/// is not asked.
pub fn reload(args: ReloadArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load_or_default(args.config.as_deref())?;
    let policy = match load_servable_policy(&config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            eprintln!("the daemon was not signalled: it keeps enforcing its current policy");
            return Ok(ExitCode::FAILURE);
        }
    };
    let socket = crate::control::socket_path(&config.state_dir);
    match crate::control::request(&socket, &crate::control::Request::Reload) {
        Ok(answer) => {
            let reply: ReloadReply = serde_json::from_value(answer)
                .with_context(|| format!("unreadable reload answer from {}", socket.display()))?;
            return Ok(print_reload(&reply));
        }
        Err(crate::control::ControlError::NotRunning(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let pid = running_daemon_pid(&config)?;
    // SAFETY: kill(2) with a checked pid and a valid signal number has no memory-safety preconditions.
    if unsafe { libc::kill(pid, libc::SIGHUP) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("signalling the daemon (pid {pid})"));
    }
    println!(
        "policy {} checked; the daemon (pid {pid}) is loading it",
        policy.hash()
    );
    Ok(ExitCode::SUCCESS)
}

/// The pid of the `enforcer run` that runs with `config`, from `<state_dir>/enforcer.pid`, checked to be a running
/// `enforcer run` (a stale pid file never names an unrelated process).
pub fn running_daemon_pid(config: &Config) -> anyhow::Result<i32> {
    let pid_path = config.state_dir.join(PID_FILE);
    let text = std::fs::read_to_string(&pid_path).with_context(|| {
        format!(
            "reading {} (is `enforcer run` running with this configuration?)",
            pid_path.display()
        )
    })?;
    let pid: i32 = text
        .trim()
        .parse()
        .with_context(|| format!("{} does not hold a pid", pid_path.display()))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut argv = cmdline.split(|b| *b == 0);
    let is_daemon =
        argv.next().is_some_and(|exe| exe.ends_with(b"enforcer")) && argv.any(|a| a == b"run");
    if !is_daemon {
        anyhow::bail!(
            "process {pid} from {} is not a running `enforcer run` (stale pid file?)",
            pid_path.display()
        );
    }
    Ok(pid)
}

fn print_reload(reply: &ReloadReply) -> ExitCode {
    match reply.result {
        ReloadResult::Loaded => {
            println!(
                "policy {} loaded (was {})",
                reply.policy_hash, reply.previous_hash
            );
            ExitCode::SUCCESS
        }
        ReloadResult::Unchanged => {
            println!("policy {} unchanged", reply.policy_hash);
            ExitCode::SUCCESS
        }
        ReloadResult::Failed => {
            eprintln!(
                "the daemon could not load the policy: {}",
                reply.error.as_deref().unwrap_or("no reason given")
            );
            eprintln!("it keeps enforcing policy {}", reply.policy_hash);
            ExitCode::FAILURE
        }
    }
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    init_tracing(args.log_format);
    let config = Config::load_or_default(args.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config))?;
    Ok(ExitCode::SUCCESS)
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second initialisation (tests calling run twice) keeps the first subscriber.
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        // One JSON object per line: timestamp, level, target, and the event's fields flattened beside `message`.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
}

/// Load the configured policy, or the built-in default.
pub fn load_policy(config: &Config) -> Result<Policy, PolicyError> {
    match &config.policy {
        Some(path) => Policy::load(path),
        None => Policy::from_yaml(DEFAULT_POLICY, "policies/default.yaml (built in)"),
    }
}

/// Why the daemon cannot serve the configured policy.
#[derive(Debug, thiserror::Error)]
pub enum Unservable {
    #[error(transparent)]
    Load(#[from] PolicyError),
    /// The policy is at odds with the daemon's configuration (`field` names the setting).
    #[error("{field} {why}")]
    Config { field: &'static str, why: String },
}

/// [`load_policy`], and the policy fits the daemon's configuration: one body of its `max_body_bytes` (and
/// inspection's text of it) within one agent's share of the buffer budget (`proxy.max_buffered_bytes_per_agent`),
/// else a body it allows could never be read.
pub fn load_servable_policy(config: &Config) -> Result<Policy, Unservable> {
    let policy = load_policy(config)?;
    config
        .proxy
        .check_body_limit(policy.max_body_bytes())
        .map_err(|(field, why)| Unservable::Config { field, why })?;
    Ok(policy)
}

/// SIGHUP: load the configured policy again. A policy that loads is put in force for every request that starts from
/// now on (requests already being decided finish under the old one; its rate-limit counters start fresh); the same
/// bytes again change nothing. A policy that fails to load is rejected: the old one stays in force.
pub fn reload_policy(config: &Config, live: &SharedPolicy) -> ReloadReply {
    let old = live.current();
    let previous_hash = old.hash().to_string();
    let (result, policy_hash, error) = match load_servable_policy(config) {
        Ok(policy) if policy.hash() == old.hash() => {
            tracing::info!(policy_hash = %old.hash(), "policy unchanged, nothing reloaded");
            (ReloadResult::Unchanged, previous_hash.clone(), None)
        }
        Ok(policy) => {
            let new_hash = policy.hash().to_string();
            live.replace(policy);
            tracing::info!(old_hash = %old.hash(), new_hash = %new_hash, "policy reloaded");
            (ReloadResult::Loaded, new_hash, None)
        }
        Err(e) => {
            tracing::error!(
                error = %e,
                policy_hash = %old.hash(),
                "policy reload failed: still enforcing the previous policy"
            );
            (
                ReloadResult::Failed,
                previous_hash.clone(),
                Some(e.to_string()),
            )
        }
    };
    ReloadReply {
        result,
        policy_hash,
        previous_hash,
        error,
    }
}

/// Reloads announced to systemd (`RELOADING=1` … `READY=1`) and counted; used by SIGHUP and the control socket.
struct Reloader {
    config: Config,
    proxy: Arc<ProxyContext>,
    notifier: Arc<Notifier>,
    metrics: Arc<Metrics>,
    port: u16,
}

impl Reloader {
    fn reload(&self) -> ReloadReply {
        self.notifier.reloading();
        let reply = reload_policy(&self.config, &self.proxy.policy);
        self.metrics.reload(reply.result);
        self.notifier
            .ready(&status_line(&self.proxy.policy, self.port));
        reply
    }
}

/// What the control socket answers with.
struct ControlHandler {
    sources: StatusSources,
    reloader: Arc<Reloader>,
    proxy: Arc<ProxyContext>,
    /// How often agents' refused control requests are recorded.
    agent_refusals: Arc<crate::control::RecordBound>,
}

impl crate::control::Handler for ControlHandler {
    fn status(&self) -> crate::control::Status {
        self.sources.collect()
    }

    fn reload(&self) -> ReloadReply {
        self.reloader.reload()
    }

    fn reviews(&self) -> Option<&crate::review::Reviews> {
        Some(&self.proxy.reviews)
    }

    fn sessions(&self) -> Option<&crate::session::Sessions> {
        Some(&self.proxy.sessions)
    }

    /// An `enforcer exec` run starts its session, unless the policy in force keeps its profile from its person.
    fn register(
        &self,
        reg: crate::session::Registration,
        exec: Option<std::os::fd::OwnedFd>,
    ) -> Result<crate::session::SessionInfo, String> {
        let agent = crate::model::Agent {
            profile: Some(reg.profile.clone()),
            user: Some(reg.person.user.clone()),
            groups: reg.person.groups.clone(),
            ..crate::model::Agent::default()
        };
        if !self.proxy.policy.current().profile_admits(&agent) {
            return Err(format!(
                "the policy keeps profile {:?} from user {:?}",
                reg.profile, reg.person.user
            ));
        }
        self.proxy
            .sessions
            .register(reg, exec)
            .map_err(|e| e.to_string())
    }

    /// Process `pid` is an agent when its cgroup, or one above it, is tagged in the capture's map (as the kernel
    /// programs see it). Without capture no process is.
    fn enforced(&self, pid: i32) -> Result<Option<crate::model::Agent>, String> {
        let config = &self.sources.config;
        if !config.capture.enabled {
            return Ok(None);
        }
        let pid = u32::try_from(pid).map_err(|_| format!("pid {pid}"))?;
        let cgroup = crate::capture::process_cgroup(Some(pid), &config.cgroup_root)
            .ok_or_else(|| format!("/proc/{pid}/cgroup cannot be read"))?;
        let table =
            crate::capture::TagTable::open_pinned(&config.capture.pin_dir, &config.cgroup_root)
                .map_err(|e| e.to_string())?;
        let Some(profile) = table
            .effective_profile(&cgroup)
            .map_err(|e| e.to_string())?
        else {
            return Ok(None);
        };
        let rel = cgroup.strip_prefix(&config.cgroup_root).unwrap_or(&cgroup);
        let mut agent = crate::model::Agent {
            profile: Some(profile),
            cgroup: Some(format!("/{}", rel.display())),
            pid: Some(pid),
            exe: std::fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .map(|p| p.display().to_string()),
            uid: process_uid(pid),
            ..crate::model::Agent::default()
        };
        self.proxy.sessions.identify(&mut agent);
        Ok(Some(agent))
    }

    /// One record per agent a second (`control::RecordBound`), reason `control_from_agent`.
    fn refused_agent(
        &self,
        agent: crate::model::Agent,
        request: Option<&'static str>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>> {
        let (proxy, bound) = (self.proxy.clone(), self.agent_refusals.clone());
        Box::pin(async move {
            let key = agent.cgroup.clone().unwrap_or_default();
            match bound.note(&key, std::time::Instant::now()) {
                crate::control::Bound::Record(count) => {
                    record_control_refusal(&proxy, &agent, request, count).await;
                }
                crate::control::Bound::Later(Some(after)) => {
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        let count = bound.flush(&key, std::time::Instant::now());
                        if count > 0 {
                            record_control_refusal(&proxy, &agent, None, count).await;
                        }
                    });
                }
                crate::control::Bound::Later(None) => {}
            }
        })
    }
}

/// The record of `count` control requests of `agent` refused (`request`: their type, when one record stands for
/// one request): `request.method` is the type, nothing else of the request is recorded.
async fn record_control_refusal(
    proxy: &ProxyContext,
    agent: &crate::model::Agent,
    request: Option<&'static str>,
    count: u64,
) {
    tracing::warn!(cgroup = ?agent.cgroup, profile = ?agent.profile, request, count,
        "control socket: refused a process in an enforced cgroup");
    let summary = crate::model::RequestSummary {
        scheme: None,
        method: request.map(str::to_string),
        count: Some(count),
        ..crate::model::RequestSummary::default()
    };
    let policy = proxy.policy.current();
    let reason = (crate::model::Reason::ControlFromAgent, None);
    proxy
        .record_refusal(
            &policy,
            agent,
            summary,
            reason,
            "the control socket does not answer agents",
        )
        .await;
}

/// The real uid of process `pid` (`Uid:` in /proc/PID/status, proc(5)).
fn process_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Uid:"))?;
    line.split_whitespace().next()?.parse().ok()
}

/// The one-line `STATUS=` systemd shows.
fn status_line(policy: &SharedPolicy, port: u16) -> String {
    let hash = policy.current().hash().to_string();
    format!(
        "enforcing policy {}, proxy on port {port}",
        hash.get(..12).unwrap_or(&hash)
    )
}

/// The origin lookup when capture is off: nothing is redirected, so nothing is known.
struct NoCapture;

impl OriginLookup for NoCapture {
    fn lookup(&self, _client: SocketAddr) -> Option<Origin> {
        None
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Handlers first: a SIGHUP must never end the daemon (the default action); one that arrives while it starts is
    // handled once it is ready.
    let mut signals = Signals::install()?;
    let started = std::time::SystemTime::now();
    let notifier = Arc::new(Notifier::from_env());
    notifier.status("starting");
    let metrics = crate::metrics::global().clone();
    let policy = load_servable_policy(&config).context("loading the policy")?;
    tracing::info!(policy_hash = %policy.hash(), "policy loaded");

    prepare_state_dir(&config.state_dir)?;
    let ca = CertAuthority::load_or_create(&config.ca_dir())?;
    let public = ca.write_public(&config.public_dir())?;
    tracing::info!(bundle = %public.bundle.display(), ca = %public.ca_cert.display(), "CA ready");
    let upstream = UpstreamTls::new(config.proxy.upstream_roots, &config.proxy.extra_roots)?;
    let audit = AuditLog::open(config.audit_config()).await?;
    if let Some(probe) = audit.ship_probe() {
        crate::metrics::global().watch_shipping(probe);
    }
    restrict_to_owner(&config.audit_dir())?;
    let health = Health::new(audit.health(), config.audit_dir());

    // Listeners first: the kernel programs must never redirect to a port nobody listens on.
    let port = config.proxy.port;
    let v4 = bind_tcp("proxy.port", SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    let v6 = bind_tcp("proxy.port", SocketAddr::from((Ipv6Addr::LOCALHOST, port))).await?;
    let explicit = match &config.proxy.explicit {
        Some(e) => {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, e.port));
            Some((
                bind_tcp("proxy.explicit.port", addr).await?,
                e.profile.clone(),
            ))
        }
        None => None,
    };
    let dns_port = config.dns.port;
    let dns4 = bind_udp(
        "dns.port",
        SocketAddr::from((Ipv4Addr::LOCALHOST, dns_port)),
    )
    .await?;
    let dns6 = bind_udp(
        "dns.port",
        SocketAddr::from((Ipv6Addr::LOCALHOST, dns_port)),
    )
    .await?;
    let dns_upstream = config
        .dns
        .upstream
        .or_else(|| crate::dns::resolv_conf_nameserver(std::path::Path::new("/etc/resolv.conf")));
    match dns_upstream {
        Some(upstream) => tracing::info!(%upstream, port = dns_port, "DNS listener ready"),
        None => tracing::warn!(
            "no DNS upstream (dns.upstream unset, no nameserver in /etc/resolv.conf): allowed queries get SERVFAIL"
        ),
    }
    let metrics_listener = match config.metrics.listen {
        Some(addr) => {
            let listener = crate::metrics::bind(addr, config.metrics.allow_non_loopback).await?;
            tracing::info!(%addr, "metrics endpoint ready");
            Some(listener)
        }
        None => None,
    };
    let access = crate::control::Access::from_group(config.control.group.as_deref())?;
    let control_path = crate::control::socket_path(&config.state_dir);
    let control = crate::control::bind(&control_path, access)?;

    let mut capture = if config.capture.enabled {
        if let Some(created) = crate::service::preflight::check_capture(&config)? {
            tracing::info!(cgroup = %created.display(), "created the capture cgroup (capture.cgroup)");
        }
        let capture = Capture::start(&CaptureConfig::from_config(&config))?;
        release_freed_memory();
        Some(capture)
    } else {
        tracing::warn!("capture disabled: only the explicit proxy enforces");
        None
    };
    let origins: Arc<dyn OriginLookup> = match &capture {
        Some(c) => c.origins(),
        None => Arc::new(NoCapture),
    };
    let dns_origins: Arc<dyn OriginLookup> = match &capture {
        Some(c) => c.dns_origins(),
        None => Arc::new(NoCapture),
    };
    let cgroup_sink = cgroup_sink(&audit, &metrics);
    if let Some(c) = &capture {
        record_config_tags(&config, c, &cgroup_sink, CgroupAction::Tag);
    }
    let patterns: Vec<crate::capture::CgroupPattern> = config
        .profiles
        .iter()
        .flat_map(|(profile, p)| {
            let exec_dir = config.profile_cgroup(profile);
            let exec_dir = exec_dir
                .strip_prefix(&config.cgroup_root)
                .unwrap_or(&exec_dir)
                .to_path_buf();
            p.cgroups
                .iter()
                .map(|c| crate::capture::CgroupPattern::new(profile, c))
                .chain([crate::capture::CgroupPattern::exec(profile, &exec_dir)])
        })
        .collect();
    let watcher = match &capture {
        Some(_) => Some(crate::capture::watch_cgroups(
            &config.cgroup_root,
            &config.capture.pin_dir,
            patterns,
            std::time::Duration::from_secs(config.capture.rescan_secs.max(1)),
            metrics.clone(),
            Some(cgroup_sink.clone()),
        )?),
        None => None,
    };

    crate::proxy::set_limits(crate::proxy::Limits {
        max_connections: config.proxy.max_connections,
        max_connections_per_agent: config.proxy.max_connections_per_agent,
        max_buffered_bytes: config.proxy.max_buffered_bytes,
        max_buffered_bytes_per_agent: config.proxy.max_buffered_bytes_per_agent,
        ..crate::proxy::Limits::default()
    });
    let dns = Arc::new(crate::dns::DnsStage::new(
        &config.dns,
        dns_upstream,
        dns_origins,
    ));
    let webhook = match &config.review.webhook {
        Some(settings) => {
            let hook =
                crate::review::Webhook::new(settings, &config.state_dir, upstream.h1.clone())?;
            let listener = bind_tcp("review.webhook.listen", settings.listen).await?;
            tracing::info!(listen = %settings.listen, "review links ready");
            Some((Arc::new(hook), listener))
        }
        None => None,
    };
    let reviews = crate::review::Reviews::new(
        config.review.max_pending,
        webhook.as_ref().map(|(h, _)| h.clone()),
    );
    let sessions = Arc::new(crate::session::Sessions::new(
        config.sessions,
        config.profile_people(),
    ));
    let exec_parents = config
        .profiles
        .keys()
        .map(|profile| config.profile_cgroup(profile))
        .collect();
    let session_watch = crate::session::watch(sessions.clone(), &config.cgroup_root, exec_parents)
        .context("watching session cgroups")?;
    let traces = crate::trace::TraceStore::open(&config.traces, &config.audit_dir())?.map(Arc::new);
    if let Some(t) = &traces {
        tracing::info!(dir = %t.dir().display(), "retained traces are encrypted to the configured recipient");
    }
    crate::proxy::set_daemon_ports(config.daemon_ports());
    let ctx = Arc::new(ProxyContext {
        policy: SharedPolicy::new(policy),
        audit: audit.clone(),
        ca: Arc::new(ca),
        upstream,
        pool: Default::default(),
        origins,
        inspect: config.inspect.clone(),
        hosts: HostBinder::new(&config.proxy.static_hosts),
        dns: Some(dns.clone()),
        sessions,
        reviews: reviews.clone(),
        traces: traces.clone(),
        batch_inputs: Default::default(),
    });
    let reloader = Arc::new(Reloader {
        config: config.clone(),
        proxy: ctx.clone(),
        notifier: notifier.clone(),
        metrics: metrics.clone(),
        port,
    });
    let handler = Arc::new(ControlHandler {
        sources: StatusSources {
            config: config.clone(),
            proxy: ctx.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            started,
            metrics_listen: metrics_listener.as_ref().and_then(|l| l.local_addr().ok()),
        },
        reloader: reloader.clone(),
        proxy: ctx.clone(),
        agent_refusals: Arc::default(),
    });

    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    // Each long-running task holds a health guard: one that ends before shutdown makes the daemon unhealthy.
    let mut spawn =
        |name: String, task: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>| {
            let guard = health.task(name);
            tasks.spawn(async move {
                let _guard = guard;
                task.await;
            });
        };
    spawn(
        format!("proxy 127.0.0.1:{port}"),
        Box::pin(crate::proxy::serve_transparent(
            v4,
            ctx.clone(),
            shutdown.clone(),
        )),
    );
    spawn(
        format!("proxy [::1]:{port}"),
        Box::pin(crate::proxy::serve_transparent(
            v6,
            ctx.clone(),
            shutdown.clone(),
        )),
    );
    for (name, socket) in [("127.0.0.1", dns4), ("[::1]", dns6)] {
        spawn(
            format!("dns {name}:{dns_port}"),
            Box::pin(crate::dns::serve_udp(
                socket,
                ctx.clone(),
                dns.clone(),
                shutdown.clone(),
            )),
        );
    }
    if let Some(refusals) = capture.as_mut().and_then(Capture::take_refusals) {
        spawn(
            "kernel refusals".into(),
            Box::pin(refusals.record(ctx.clone(), shutdown.clone())),
        );
    }
    if let Some((listener, profile)) = explicit {
        spawn(
            "explicit proxy".into(),
            Box::pin(crate::proxy::serve_explicit(
                listener,
                ctx.clone(),
                profile,
                shutdown.clone(),
            )),
        );
    }
    spawn(
        "control socket".into(),
        Box::pin(crate::control::serve(
            control,
            control_path,
            access,
            handler,
            shutdown.clone(),
        )),
    );
    if let Some(store) = traces {
        spawn(
            "trace retention".into(),
            Box::pin(crate::trace::sweep(
                ctx.clone(),
                store,
                std::time::Duration::from_secs(60),
                shutdown.clone(),
            )),
        );
    }
    if let Some((hook, listener)) = webhook {
        spawn(
            "review links".into(),
            Box::pin(crate::review::serve_links(
                listener,
                reviews.clone(),
                hook,
                shutdown.clone(),
            )),
        );
    }
    if let Some(listener) = metrics_listener {
        spawn(
            "metrics endpoint".into(),
            Box::pin(crate::metrics::serve(
                listener,
                metrics.clone(),
                shutdown.clone(),
            )),
        );
    }

    let pid_path = config.state_dir.join(PID_FILE);
    std::fs::write(&pid_path, format!("{}\n", std::process::id()))
        .with_context(|| format!("writing {}", pid_path.display()))?;
    // Programs attached, listeners bound, audit trail open: ready.
    report_ready(port);
    notifier.ready(&status_line(&ctx.policy, port));
    if let Some(every) = notifier.watchdog_interval() {
        let proxy = ctx.clone();
        tasks.spawn(watchdog(
            notifier.clone(),
            health.clone(),
            every,
            shutdown.clone(),
            move || status_line(&proxy.policy, port),
        ));
    }
    signals.serve(&reloader).await;
    tracing::info!("shutting down");
    notifier.stopping();
    health.stopping();
    let _ = std::fs::remove_file(&pid_path);
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    drop(watcher);
    drop(session_watch);
    if let Some(capture) = capture {
        record_config_tags(&config, &capture, &cgroup_sink, CgroupAction::Untag);
        capture.shutdown()?;
    }
    audit.close().await?;
    tracing::info!("stopped");
    Ok(())
}

async fn bind_tcp(setting: &str, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| bind_error(setting, addr, e))
}

/// The DNS listener at `addr`, with room in its kernel buffer for bursts ([`widen_receive_buffer`]; when that
/// fails the listener keeps the default, with a warning).
async fn bind_udp(setting: &str, addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr)
        .await
        .map_err(|e| bind_error(setting, addr, e))?;
    if let Err(e) = widen_receive_buffer(&socket) {
        tracing::warn!(%addr, error = %e, "dns: the listener keeps the default receive buffer");
    }
    Ok(socket)
}

/// Give the DNS listener `socket` a [`crate::dns::RECEIVE_BUFFER`] of kernel buffer: `SO_RCVBUFFORCE` (the daemon runs as root,
/// so `net.core.rmem_max` does not cap it), else `SO_RCVBUF` (capped). Errors: neither option could be set.
fn widen_receive_buffer(socket: &UdpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let fd = socket.as_raw_fd();
    let size = libc::c_int::try_from(crate::dns::RECEIVE_BUFFER).unwrap_or(libc::c_int::MAX);
    let set = |option| {
        // SAFETY: `fd` is the open socket `socket` owns, and the value is a live c_int of the length given.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                std::ptr::from_ref(&size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    if set(libc::SO_RCVBUFFORCE) == 0 || set(libc::SO_RCVBUF) == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Ping the systemd watchdog every `every` (half of `WatchdogSec=`) while the daemon is alive. Dead (a task ended), it
/// stops pinging and says why in `STATUS=`: systemd then restarts the service (`Restart=on-failure`). Alive but not
/// ready (the audit trail takes no records, so every action is refused), it keeps pinging — a restart would not free a
/// disk — and says why in `STATUS=` until the trail takes records again, then restores `ready_status`.
async fn watchdog(
    notifier: Arc<Notifier>,
    health: Arc<Health>,
    every: std::time::Duration,
    shutdown: CancellationToken,
    ready_status: impl Fn() -> String,
) {
    let mut tick = tokio::time::interval(every);
    let mut dead = false;
    let mut not_ready = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(problem) = health.live() {
            if !dead {
                tracing::error!(%problem, "unhealthy: no more watchdog pings");
                notifier.status(&format!("unhealthy: {problem}"));
                dead = true;
            }
            continue;
        }
        notifier.watchdog();
        match health.check() {
            Err(problem) if !not_ready => {
                notifier.status(&problem);
                not_ready = true;
            }
            Ok(()) if not_ready => {
                notifier.status(&ready_status());
                not_ready = false;
            }
            _ => {}
        }
    }
}

/// Mode of the state directory: others may pass through it to the files they are meant to read (`public/`), by
/// name, but not list it. What is private inside it has its own 0700 directory (`ca/`, `audit/`).
const STATE_DIR_MODE: u32 = 0o711;

/// Create the state directory, or give an existing one (an older install made it 0700) [`STATE_DIR_MODE`].
fn prepare_state_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(STATE_DIR_MODE)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(STATE_DIR_MODE))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}

/// The audit trail as the place cgroup changes are recorded (a failure is logged: the trail's health already
/// refuses every action while it cannot take records).
/// Give memory freed so far back to the system. Loading the eBPF programs parses the kernel's BTF (~40 MiB resident,
/// freed once the programs are loaded); mimalloc purges freed memory only when later allocations come round to it,
/// which an idle daemon never does, so without this the daemon idled at ~57 MiB instead of ~18 MiB.
fn release_freed_memory() {
    // SAFETY: `mi_collect` takes no pointers and may be called from any thread at any time (mimalloc.h).
    unsafe { libmimalloc_sys::mi_collect(true) }
}

fn cgroup_sink(audit: &AuditLog, metrics: &Arc<Metrics>) -> crate::capture::CgroupSink {
    let (audit, metrics) = (audit.clone(), metrics.clone());
    Arc::new(
        move |change: &CgroupChange| match audit.append_cgroup(change) {
            Ok(seq) => metrics.recorded(seq),
            Err(e) => {
                tracing::error!(cgroup = %change.path, error = %e, "cannot record a cgroup change in the audit trail")
            }
        },
    )
}

/// Record the cgroups tagged at start (the profiles' own cgroups and the configured paths), or their untagging at
/// shutdown (the tag map is removed with the daemon).
fn record_config_tags(
    config: &Config,
    capture: &Capture,
    sink: &crate::capture::CgroupSink,
    action: CgroupAction,
) {
    for (id, profile) in capture.tagged() {
        let Some(rel) = crate::capture::cgroup_path(id, 0, &config.cgroup_root) else {
            continue;
        };
        sink(&CgroupChange {
            action,
            profile,
            path: config
                .cgroup_root
                .join(rel.trim_start_matches('/'))
                .display()
                .to_string(),
            source: CgroupSource::Config,
            pattern: None,
        });
    }
}

/// Make `dir` 0700 (the audit trail and its signing key are the daemon's alone; an older install may have left the
/// directory wider).
fn restrict_to_owner(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}

/// `READY proxy_port=N` on stdout (for scripts and tests that start the daemon themselves).
fn report_ready(port: u16) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "READY proxy_port={port}");
    let _ = out.flush();
    tracing::info!(port, "ready");
}

/// The signals the daemon acts on: SIGTERM and SIGINT stop it, SIGHUP reloads the policy.
struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    /// Reload the policy on every SIGHUP; return on SIGTERM or SIGINT.
    async fn serve(&mut self, reloader: &Reloader) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                // Reading and compiling the file blocks: keep it off the runtime's other tasks.
                _ = self.hup.recv() => {
                    tokio::task::block_in_place(|| reloader.reload());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listener's receive buffer as the kernel reports it (`SO_RCVBUF`: twice the size set, socket(7)).
    fn receive_buffer(socket: &UdpSocket) -> usize {
        use std::os::fd::AsRawFd as _;
        let mut size: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: a live socket, and a c_int-sized out-parameter with its length.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                std::ptr::from_mut(&mut size).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        usize::try_from(size).unwrap()
    }

    /// A burst of 300 queries from one agent filled the default buffer (about 270 datagrams) whenever the daemon
    /// fell behind, and the kernel dropped another agent's query (the e2e test
    /// `dns_one_agent_flooding_does_not_starve_another` failed so, with `RcvbufErrors` rising in /proc/net/snmp).
    /// As root the listener gets the whole [`crate::dns::RECEIVE_BUFFER`], past `net.core.rmem_max`.
    #[tokio::test]
    async fn the_listener_has_room_for_bursts() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let default = receive_buffer(&socket);
        widen_receive_buffer(&socket).unwrap();
        let widened = receive_buffer(&socket);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert!(widened >= crate::dns::RECEIVE_BUFFER, "{widened} bytes");
        } else {
            assert!(widened >= default, "{widened} < {default} bytes");
        }
    }

    const BLOCK: &str = "version: 1\ndefault: block\n";
    const ALLOW: &str = "version: 1\ndefault: allow\n";

    fn setup(initial: &str) -> (tempfile::TempDir, Config, SharedPolicy) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, initial).unwrap();
        let config = Config {
            policy: Some(path),
            ..Config::default()
        };
        let live = SharedPolicy::new(load_policy(&config).unwrap());
        (dir, config, live)
    }

    fn rewrite(config: &Config, yaml: &str) {
        std::fs::write(config.policy.as_ref().unwrap(), yaml).unwrap();
    }

    #[test]
    fn a_good_policy_replaces_the_old_one() {
        let (_dir, config, live) = setup(BLOCK);
        let before = live.current();
        rewrite(&config, ALLOW);
        reload_policy(&config, &live);
        assert_ne!(live.current().hash(), before.hash());
        assert_eq!(
            live.current().default_verdict(),
            crate::model::Verdict::Allow
        );
    }

    #[test]
    fn a_policy_that_fails_to_load_changes_nothing() {
        let (_dir, config, live) = setup(BLOCK);
        let before = live.current();
        rewrite(
            &config,
            "version: 1\ndefault: allow\nrules:\n  - id: a\n    when: { hots: x }\n",
        );
        reload_policy(&config, &live);
        assert!(Arc::ptr_eq(&live.current(), &before));
        std::fs::remove_file(config.policy.as_ref().unwrap()).unwrap();
        reload_policy(&config, &live);
        assert!(Arc::ptr_eq(&live.current(), &before));
    }

    #[test]
    fn a_policy_whose_bodies_exceed_an_agents_buffer_share_is_not_loaded() {
        let (_dir, mut config, live) = setup(BLOCK);
        config.proxy.max_buffered_bytes_per_agent = 8 * 1024 * 1024;
        let before = live.current();
        rewrite(
            &config,
            "version: 1\ndefault: allow\nmax_body_bytes: 5MiB\n",
        );
        let reply = reload_policy(&config, &live);
        assert_eq!(reply.result, ReloadResult::Failed);
        let error = reply.error.unwrap_or_default();
        assert!(
            error.starts_with("proxy.max_buffered_bytes_per_agent (8388608) is below what one body of the policy's max_body_bytes (5242880) takes while it is read and inspected (10485760)"),
            "{error}"
        );
        assert!(Arc::ptr_eq(&live.current(), &before));
        rewrite(
            &config,
            "version: 1\ndefault: allow\nmax_body_bytes: 4MiB\n",
        );
        assert_eq!(reload_policy(&config, &live).result, ReloadResult::Loaded);
    }

    #[test]
    fn the_same_bytes_keep_the_loaded_policy() {
        let (_dir, config, live) = setup(BLOCK);
        let before = live.current();
        reload_policy(&config, &live);
        assert!(Arc::ptr_eq(&live.current(), &before));
    }
}
