//! `enforcer exec` and `enforcer cgroup`: commands that reach the running daemon through the pinned `TAGGED` map.
//! `anyhow` is allowed here because this is the binary's edge.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use super::tags::{map_in_use, TagTable};
use crate::config::Config;

/// Variables through which common clients (OpenSSL and what builds on it — Python, Ruby, Go —, Python requests,
/// Node, curl, git, the AWS SDKs and CLI) learn the CA bundle.
pub const CA_VARIABLES: [&str; 6] = [
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
    "CURL_CA_BUNDLE",
    "GIT_SSL_CAINFO",
    "AWS_CA_BUNDLE",
];

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The daemon's configuration file (to find its pin directory, cgroups and CA bundle).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Profile to tag the new cgroup with.
    #[arg(long, default_value = "default")]
    pub profile: String,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true)]
    pub command: Vec<OsString>,
}

#[derive(Debug, Subcommand)]
pub enum CgroupCommand {
    /// Tag a cgroup (and every cgroup below it) with a profile, at runtime.
    Tag {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        profile: String,
        /// The cgroup: absolute, or relative to the cgroup v2 root.
        path: PathBuf,
    },
    /// Remove a cgroup's tag, at runtime (new connections are no longer redirected).
    Untag {
        #[arg(long)]
        config: Option<PathBuf>,
        path: PathBuf,
    },
    /// List the tagged cgroups.
    List {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Open the running daemon's tag map, refusing clearly when the daemon is not running. Tagging the daemon's own
/// cgroup (or an ancestor) through it is refused; should the daemon's pid file be unreadable, the kernel programs
/// still refuse rather than loop the daemon's sockets back to it.
fn open_daemon_tags(config: &Config) -> anyhow::Result<TagTable> {
    let mut tags = TagTable::open_pinned(&config.capture.pin_dir, &config.cgroup_root)?;
    let alive = tags.map_id().is_some_and(map_in_use);
    if !alive {
        bail!(
            "the enforcer daemon is not running (the tag map pinned in {} is not used by any loaded program)",
            config.capture.pin_dir.display()
        );
    }
    let daemon = crate::daemon::running_daemon_pid(config)
        .ok()
        .and_then(|pid| super::process_cgroup(u32::try_from(pid).ok(), &config.cgroup_root));
    if let Some(cgroup) = daemon {
        tags.protect_daemon_cgroup(cgroup);
    }
    Ok(tags)
}

pub fn cgroup_command(cmd: CgroupCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        CgroupCommand::Tag {
            config,
            profile,
            path,
        } => {
            let config = Config::load_or_default(config.as_deref())?;
            let mut tags = open_daemon_tags(&config)?;
            tags.tag(&path, &profile)?;
            println!(
                "tagged {} with profile {profile}",
                tags.resolve(&path).display()
            );
        }
        CgroupCommand::Untag { config, path } => {
            let config = Config::load_or_default(config.as_deref())?;
            let mut tags = open_daemon_tags(&config)?;
            tags.untag(&path)?;
            println!("untagged {}", tags.resolve(&path).display());
        }
        CgroupCommand::List { config } => {
            let config = Config::load_or_default(config.as_deref())?;
            let tags = open_daemon_tags(&config)?;
            for (id, profile) in tags.entries() {
                let path = super::cgroup_path(id, 0, &config.cgroup_root)
                    .unwrap_or_else(|| format!("<cgroup id {id}>"));
                println!("{profile}\t{path}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Removes the exec cgroup when dropped (also when spawning fails).
struct ExecCgroup(PathBuf);

impl Drop for ExecCgroup {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir(&self.0) {
            eprintln!(
                "enforcer exec: leaving cgroup {} in place: {err} (processes still running in it?)",
                self.0.display()
            );
        }
    }
}

pub fn exec(args: ExecArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load_or_default(args.config.as_deref())?;
    let tags = open_daemon_tags(&config)?;
    let profile_cgroup = config.profile_cgroup(&args.profile);
    let effective = tags.effective_profile(&profile_cgroup).with_context(|| {
        format!(
            "profile {:?} has no cgroup at {} (is it configured in the daemon?)",
            args.profile,
            profile_cgroup.display()
        )
    })?;
    if effective.as_deref() != Some(args.profile.as_str()) {
        bail!(
            "cgroup {} is not tagged with profile {:?} (it is {}); is the profile configured in the daemon?",
            profile_cgroup.display(),
            args.profile,
            effective.map_or("untagged".to_string(), |p| format!("tagged {p:?}"))
        );
    }
    let bundle = config.ca_bundle();
    if !bundle.is_file() {
        bail!(
            "CA bundle {} is missing (the daemon writes it at start-up)",
            bundle.display()
        );
    }

    let cgroup = profile_cgroup.join(format!("exec-{}", std::process::id()));
    std::fs::create_dir(&cgroup)
        .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
    let cgroup = ExecCgroup(cgroup);
    let status = run_in_cgroup(&cgroup.0, &bundle, &args.command)?;
    drop(cgroup);
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    };
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX)))
}

fn run_in_cgroup(
    cgroup: &Path,
    bundle: &Path,
    command: &[OsString],
) -> anyhow::Result<std::process::ExitStatus> {
    let Some((program, rest)) = command.split_first() else {
        bail!("no command given");
    };
    let procs_path = cgroup.join("cgroup.procs");
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .with_context(|| format!("opening {}", procs_path.display()))?;
    let procs_fd = procs.as_raw_fd();
    let mut cmd = std::process::Command::new(program);
    cmd.args(rest);
    for var in CA_VARIABLES {
        cmd.env(var, bundle);
    }
    // SAFETY: the closure only calls write(2), which is async-signal-safe, on an fd that stays open until spawn
    // returns. Writing "0" moves the calling (child) process into the cgroup before it execs, so every socket the
    // command creates is captured.
    unsafe {
        cmd.pre_exec(move || {
            let buf = b"0";
            if libc::write(procs_fd, buf.as_ptr().cast(), buf.len()) == 1 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    install_signal_forwarding();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", program.to_string_lossy()))?;
    drop(procs);
    forward_signals_to(child.id());
    Ok(child.wait()?)
}

/// The command's pid, for the signal handler (0 until it is spawned).
static CHILD_PID: AtomicI32 = AtomicI32::new(0);
/// A SIGTERM/SIGHUP that arrived before the command was spawned.
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(signal: libc::c_int) {
    let pid = CHILD_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe {
            libc::kill(pid, signal);
        }
    } else {
        PENDING_SIGNAL.store(signal, Ordering::SeqCst);
    }
}

/// SIGTERM and SIGHUP sent to us are passed on to the command (handlers are reset by exec, so the command starts
/// with default dispositions), and we live to remove the cgroup.
fn install_signal_forwarding() {
    let handler = forward_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only touches atomics and calls kill(2).
    unsafe {
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGHUP, handler);
    }
}

/// Like a shell waiting for its job: terminal signals (sent to the whole process group) reach the command on their
/// own, so from now on we ignore them; a signal that arrived while spawning is delivered now.
fn forward_signals_to(pid: u32) {
    let pid = i32::try_from(pid).unwrap_or(0);
    CHILD_PID.store(pid, Ordering::SeqCst);
    // SAFETY: SIG_IGN has no preconditions; kill(2) on our own child.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
        let pending = PENDING_SIGNAL.swap(0, Ordering::SeqCst);
        if pending != 0 && pid > 0 {
            libc::kill(pid, pending);
        }
    }
}
