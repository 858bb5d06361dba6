//! `enforcer run`: wires the stages together. Loads the configuration and policy, opens the audit trail, loads the
//! CA, attaches the eBPF capture, starts the proxy and DNS listeners, reports readiness (`READY proxy_port=N` on stdout,
//! and `READY=1` to systemd when `NOTIFY_SOCKET` is set), reloads the policy on SIGHUP and shuts down cleanly on
//! SIGTERM/SIGINT.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use tokio::net::{TcpListener, UdpSocket};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::audit::AuditLog;
use crate::capture::{Capture, CaptureConfig};
use crate::config::Config;
use crate::model::{Origin, OriginLookup};
use crate::policy::{Policy, PolicyError, SharedPolicy};
use crate::proxy::{CancellationToken, CertAuthority, HostBinder, ProxyContext, UpstreamTls};

/// The policy enforced when the configuration names none: `policies/default.yaml`, built in.
pub const DEFAULT_POLICY: &str = include_str!("../../policies/default.yaml");

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Daemon configuration file (YAML). Without it the built-in defaults apply.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Where a running daemon writes its pid, under the state directory (removed on clean shutdown).
const PID_FILE: &str = "enforcer.pid";

/// `enforcer reload`: check the configured policy, then ask the running daemon to load it (SIGHUP to the pid in
/// `<state_dir>/enforcer.pid`). A policy that does not load is reported here and the daemon is not signalled.
pub fn reload(args: RunArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load_or_default(args.config.as_deref())?;
    let policy = match load_policy(&config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            eprintln!("the daemon was not signalled: it keeps enforcing its current policy");
            return Ok(ExitCode::FAILURE);
        }
    };
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

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    init_tracing();
    let config = Config::load_or_default(args.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config))?;
    Ok(ExitCode::SUCCESS)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A second initialisation (tests calling run twice) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Load the configured policy, or the built-in default.
pub fn load_policy(config: &Config) -> Result<Policy, PolicyError> {
    match &config.policy {
        Some(path) => Policy::load(path),
        None => Policy::from_yaml(DEFAULT_POLICY, "policies/default.yaml (built in)"),
    }
}

/// SIGHUP: load the configured policy again. A policy that loads is put in force for every request that starts from
/// now on (requests already being decided finish under the old one; its rate-limit counters start fresh); the same
/// bytes again change nothing. A policy that fails to load is rejected: the old one stays in force.
pub fn reload_policy(config: &Config, live: &SharedPolicy) {
    let old = live.current();
    match load_policy(config) {
        Ok(policy) if policy.hash() == old.hash() => {
            tracing::info!(policy_hash = %old.hash(), "policy unchanged, nothing reloaded");
        }
        Ok(policy) => {
            let new_hash = policy.hash().to_string();
            live.replace(policy);
            tracing::info!(old_hash = %old.hash(), new_hash = %new_hash, "policy reloaded");
        }
        Err(e) => tracing::error!(
            error = %e,
            policy_hash = %old.hash(),
            "policy reload failed: still enforcing the previous policy"
        ),
    }
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
    let policy = load_policy(&config)?;
    tracing::info!(policy_hash = %policy.hash(), "policy loaded");

    create_private_dir(&config.state_dir)?;
    let ca = CertAuthority::load_or_create(&config.ca_dir())?;
    let bundle = ca.write_bundle(&config.ca_dir())?;
    tracing::info!(bundle = %bundle.display(), "CA ready");
    let upstream = UpstreamTls::new(&config.proxy.extra_roots)?;
    let audit = AuditLog::open(config.audit_config()).await?;

    // Listeners first: the kernel programs must never redirect to a port nobody listens on.
    let port = config.proxy.port;
    let v4 = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
        .with_context(|| format!("binding 127.0.0.1:{port}"))?;
    let v6 = TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, port)))
        .await
        .with_context(|| format!("binding [::1]:{port}"))?;
    let explicit = match &config.proxy.explicit {
        Some(e) => {
            let l = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, e.port)))
                .await
                .with_context(|| format!("binding the explicit proxy on 127.0.0.1:{}", e.port))?;
            Some((l, e.profile.clone()))
        }
        None => None,
    };
    let dns_port = config.dns.port;
    let dns4 = UdpSocket::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, dns_port)))
        .await
        .with_context(|| format!("binding the DNS listener on 127.0.0.1:{dns_port}"))?;
    let dns6 = UdpSocket::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, dns_port)))
        .await
        .with_context(|| format!("binding the DNS listener on [::1]:{dns_port}"))?;
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

    let mut capture = if config.capture.enabled {
        Some(Capture::start(&CaptureConfig::from_config(&config))?)
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

    crate::proxy::set_limits(crate::proxy::Limits {
        max_connections: config.proxy.max_connections,
        ..crate::proxy::Limits::default()
    });
    let ctx = Arc::new(ProxyContext {
        policy: SharedPolicy::new(policy),
        audit: audit.clone(),
        ca: Arc::new(ca),
        upstream,
        origins,
        inspect: config.inspect.clone(),
        hosts: HostBinder::new(&config.proxy.static_hosts),
    });
    let dns = Arc::new(crate::dns::DnsContext {
        proxy: ctx.clone(),
        origins: dns_origins,
        upstream: dns_upstream,
        timeout: std::time::Duration::from_millis(config.dns.timeout_ms),
        max_in_flight: config.dns.max_in_flight,
    });
    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(crate::proxy::serve_transparent(
        v4,
        ctx.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(crate::proxy::serve_transparent(
        v6,
        ctx.clone(),
        shutdown.clone(),
    ));
    for socket in [dns4, dns6] {
        tasks.spawn(crate::dns::serve_dns(socket, dns.clone(), shutdown.clone()));
    }
    if let Some(refusals) = capture.as_mut().and_then(Capture::take_refusals) {
        tasks.spawn(refusals.record(ctx.clone(), shutdown.clone()));
    }
    if let Some((listener, profile)) = explicit {
        tasks.spawn(crate::proxy::serve_explicit(
            listener,
            ctx.clone(),
            profile,
            shutdown.clone(),
        ));
    }

    let pid_path = config.state_dir.join(PID_FILE);
    std::fs::write(&pid_path, format!("{}\n", std::process::id()))
        .with_context(|| format!("writing {}", pid_path.display()))?;
    report_ready(port);
    signals.serve(&config, &ctx.policy).await;
    tracing::info!("shutting down");
    let _ = std::fs::remove_file(&pid_path);
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    if let Some(capture) = capture {
        capture.shutdown()?;
    }
    audit.close().await?;
    tracing::info!("stopped");
    Ok(())
}

fn create_private_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))
}

fn report_ready(port: u16) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "READY proxy_port={port}");
    let _ = out.flush();
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        let sock = std::os::unix::net::UnixDatagram::unbound();
        if let Ok(sock) = sock {
            let _ = sock.send_to(b"READY=1", path);
        }
    }
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
    async fn serve(&mut self, config: &Config, policy: &SharedPolicy) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                // Reading and compiling the file blocks: keep it off the runtime's other tasks.
                _ = self.hup.recv() => tokio::task::block_in_place(|| reload_policy(config, policy)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_same_bytes_keep_the_loaded_policy() {
        let (_dir, config, live) = setup(BLOCK);
        let before = live.current();
        reload_policy(&config, &live);
        assert!(Arc::ptr_eq(&live.current(), &before));
    }
}
