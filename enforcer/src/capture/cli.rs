//! `enforcer exec` and `enforcer cgroup`: commands that reach the running daemon through the pinned `TAGGED` map.
//! `exec` runs its command in a fresh tagged cgroup and a PID namespace of its own ([`init`]), as an unprivileged user
//! ([`identity`]), with the environment that makes its clients trust the enforcer CA ([`trust`]), and on a
//! pseudo-terminal of its own when started from a terminal ([`pty`]). `anyhow` is allowed here because this is the
//! binary's edge.

mod confine;
mod identity;
mod init;
mod pty;
mod trust;

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use super::tags::{map_in_use, TagTable};
use crate::config::Config;
use identity::{RunAs, StepReport, Switch};

pub use identity::user_name;

#[derive(Debug, Args)]
#[command(
    after_help = "The command runs as an unprivileged user with no capabilities and no_new_privs set: \
    the user who ran `sudo enforcer exec` (SUDO_UID, SUDO_GID, supplementary groups from the user database), or \
    the one --user names. HOME, USER and LOGNAME are that user's. Run as root without either, exec refuses \
    unless --allow-root is given. The CA trust variables (SSL_CERT_FILE, PIP_CERT, NPM_CONFIG_CAFILE, ... see \
    docs/agents.md) are set to the daemon's published bundle, replacing inherited values. The command runs in a PID \
    namespace of its own with its own /proc: it cannot see or trace processes outside its run, and every process it \
    leaves ends with it (and when exec is killed). Where the kernel has Landlock ABI 6 (Linux 6.12), it also runs in \
    a Landlock domain that refuses it ptrace access and signals to any process outside its run, however named; and \
    under a system call filter that refuses TIOCSTI and TIOCLINUX (typing into the terminal) and pidfd_getfd. \
    Started from a terminal, the command gets a pseudo-terminal of its own, which exec relays to yours (put in raw \
    mode for the run and restored after it): what it holds of it is dead once the run ends. SIGTERM and SIGHUP sent \
    to exec are passed on to the command; if the run has not ended --stop-timeout seconds after the first, exec \
    kills every process of it and exits 137. The exit status is the command's (a signal as 128 + the signal), or 2 \
    when exec itself fails."
)]
pub struct ExecArgs {
    /// The daemon's configuration file (to find its pin directory, cgroups and CA bundle).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Profile to tag the new cgroup with.
    #[arg(long, default_value = "default")]
    pub profile: String,
    /// Run the command as this user (a name or a numeric uid), with its groups from the user database.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
    /// DANGEROUS: run the command as root, with root's capabilities. A root agent can move itself out of its
    /// cgroup, open raw sockets, untag itself, remove the pinned programs, read the CA and audit keys and stop
    /// the daemon: nothing it does is then enforced.
    #[arg(long, conflicts_with = "user")]
    pub allow_root: bool,
    /// Seconds to wait, once SIGTERM or SIGHUP sent to exec has been passed on to the command, for the run to end
    /// before killing every process of it (SIGKILL; exec exits 137). Later signals do not restart or shorten the
    /// wait. 0: kill the run as soon as the signal has been passed on.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_STOP_TIMEOUT)]
    pub stop_timeout: u32,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, required = true)]
    pub command: Vec<OsString>,
}

/// `--stop-timeout`'s default, in seconds: `docker stop`'s.
const DEFAULT_STOP_TIMEOUT: u32 = 10;

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

/// Runs whose cgroup name is taken that a new run tries another for.
const EXEC_CGROUP_TRIES: u32 = 100;

/// Create this run's cgroup under `profile_cgroup`: `exec-<pid>`, or `exec-<pid>-<n>` when an earlier run with the same
/// pid left its cgroup behind (its `exec` was killed before it could remove it).
fn create_exec_cgroup(profile_cgroup: &Path, pid: u32) -> anyhow::Result<PathBuf> {
    let mut name = format!("exec-{pid}");
    for n in 1..=EXEC_CGROUP_TRIES {
        let cgroup = profile_cgroup.join(&name);
        match std::fs::create_dir(&cgroup) {
            Ok(()) => return Ok(cgroup),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                name = format!("exec-{pid}-{n}");
            }
            Err(e) => {
                return Err(e).with_context(|| format!("creating cgroup {}", cgroup.display()))
            }
        }
    }
    bail!(
        "creating a cgroup for this run under {}: exec-{pid} and {EXEC_CGROUP_TRIES} others are taken",
        profile_cgroup.display()
    )
}

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
    // SAFETY: geteuid has no preconditions.
    let caller_uid = unsafe { libc::geteuid() };
    let sudo_uid = std::env::var("SUDO_UID").ok();
    let sudo_gid = std::env::var("SUDO_GID").ok();
    let request = identity::Request {
        user: args.user.as_deref(),
        allow_root: args.allow_root,
        sudo_uid: sudo_uid.as_deref(),
        sudo_gid: sudo_gid.as_deref(),
        caller_uid,
    };
    let run_as = identity::choose(&request)?;
    let person = identity::launching_user(&request)?;
    if run_as == RunAs::Root {
        eprintln!(
            "enforcer exec: WARNING: --allow-root: the agent runs as root. It can leave its cgroup, open raw \
             sockets, untag itself, detach the enforcer's programs, read its keys and stop the daemon; nothing it \
             does is guaranteed to be enforced."
        );
    }
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
    let trust = Trust {
        bundle: config.ca_bundle(),
        ca_cert: config.ca_cert(),
    };
    for file in [&trust.bundle, &trust.ca_cert] {
        if !file.is_file() {
            bail!(
                "{} is missing (the daemon publishes the CA bundle and certificate at start-up)",
                file.display()
            );
        }
    }

    let cgroup = ExecCgroup(create_exec_cgroup(&profile_cgroup, std::process::id())?);
    register_session(&config, &cgroup.0, &args.profile, &person)?;
    let code = run_in_cgroup(&cgroup.0, &run_as, &trust, &args.command, args.stop_timeout)?;
    drop(cgroup);
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX)))
}

/// Tell the daemon about this run before the agent starts: its cgroup, profile, and the person it acts for (see
/// [`crate::session`]). Fails closed: when the daemon refuses the profile for that person, is not running, or does
/// not answer within the control socket's timeout (30 s), the agent is not started. A run the daemon never
/// registered would be decided, once the daemon answers again, without its person and session history, so rules on
/// the user, the groups and the session would not apply to it.
fn register_session(
    config: &Config,
    cgroup: &Path,
    profile: &str,
    person: &identity::Identity,
) -> anyhow::Result<()> {
    let rel = cgroup.strip_prefix(&config.cgroup_root).with_context(|| {
        format!(
            "{} is not under {}",
            cgroup.display(),
            config.cgroup_root.display()
        )
    })?;
    let mut groups: Vec<String> = Vec::new();
    for gid in std::iter::once(person.gid).chain(person.groups.iter().copied()) {
        let name = identity::group_name(gid);
        if !groups.contains(&name) {
            groups.push(name);
        }
    }
    let reg = crate::session::Registration {
        cgroup: format!("/{}", rel.display()),
        profile: profile.to_owned(),
        person: crate::session::Person {
            user: person.name.clone(),
            uid: Some(person.uid),
            groups,
        },
    };
    let socket = crate::control::socket_path(&config.state_dir);
    match crate::control::request(&socket, &crate::control::Request::SessionStart(reg)) {
        Ok(_) => Ok(()),
        Err(crate::control::ControlError::Refused(e)) => {
            bail!("the daemon refused to start this agent: {e}")
        }
        Err(e) => bail!(
            "the agent is not started: the run could not be registered with the daemon ({e}); without it, rules \
             on the user, the groups and the session would not see the run"
        ),
    }
}

/// A pipe, both ends close-on-exec and, when `nonblocking`, non-blocking (pipe2(2)): (read end, write end).
fn cloexec_pipe(nonblocking: bool) -> std::io::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let flags = libc::O_CLOEXEC | if nonblocking { libc::O_NONBLOCK } else { 0 };
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned only here.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

/// The published files the agent's clients are pointed at.
struct Trust {
    bundle: PathBuf,
    ca_cert: PathBuf,
}

/// Start the command in `cgroup` as `run_as`, as the second process of its own PID namespace ([`init`]), and wait
/// for it, killing the run `stop_timeout` seconds after a SIGTERM or SIGHUP passed on to it. Returns its exit code (a
/// signal as 128 + the signal; 137 when killed after the stop timeout); errors name the step that kept it from
/// starting.
fn run_in_cgroup(
    cgroup: &Path,
    run_as: &RunAs,
    trust: &Trust,
    command: &[OsString],
    stop_timeout: u32,
) -> anyhow::Result<i32> {
    let Some((program, rest)) = command.split_first() else {
        bail!("no command given");
    };
    let procs_path = cgroup.join("cgroup.procs");
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .with_context(|| format!("opening {}", procs_path.display()))?;
    let mut cmd = std::process::Command::new(program);
    cmd.args(rest);
    for (var, path) in trust::trust_env(&trust.bundle, &trust.ca_cert) {
        cmd.env(var, path);
    }
    if let RunAs::User(user) = run_as {
        cmd.env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
    }
    let confine = confine::Confinement::prepare()?;
    let owner = match run_as {
        RunAs::User(user) => Some(user.uid),
        RunAs::Caller | RunAs::Root => None,
    };
    pty::keep_terminals_from_agent().context("listing the descriptors exec inherited")?;
    let pty = pty::Pty::open(owner).context("giving the agent a terminal of its own")?;
    if let Some(pty) = &pty {
        pty.prepare_agent(&mut cmd)
            .context("giving the agent a terminal of its own")?;
    }
    let (switch, report) = Switch::new(
        run_as,
        procs.as_raw_fd(),
        &[&trust.bundle, &trust.ca_cert],
        confine,
    )
    .context("preparing the agent's identity")?;
    // SAFETY: `Switch::apply` makes only async-signal-safe system calls on memory prepared before the fork (see its
    // documentation), on descriptors that stay open until spawn returns. Writing "0" to cgroup.procs moves the child
    // into the cgroup before it execs, so every socket the command creates is captured.
    unsafe {
        cmd.pre_exec(move || switch.apply());
    }
    init::install_signal_forwarding(stop_timeout);
    match init::fork(pty.is_some())? {
        init::Forked::Outside(run) => {
            drop(procs);
            // The command's copies of the pty's slave: only the run may hold it.
            drop(cmd);
            run.wait(pty)
        }
        init::Forked::Init(init) => {
            // The slave stays open in the init until it exits (`Init::run` does not return).
            let session = pty.map(pty::Pty::into_session);
            let agent = init.enter_namespaces().and_then(|()| {
                if let Some(session) = &session {
                    session
                        .lead()
                        .context("making the agent's pseudo-terminal the run's terminal")?;
                }
                let spawned = cmd.spawn();
                drop(procs);
                let child = spawned.map_err(|e| spawn_error(e, &report, program, trust))?;
                Ok(i32::try_from(child.id()).unwrap_or(0))
            });
            init.run(agent)
        }
    }
}

/// Say which step failed when the child did not get to run the command.
fn spawn_error(
    err: std::io::Error,
    report: &StepReport,
    program: &OsString,
    trust: &Trust,
) -> anyhow::Error {
    match report.failed_step() {
        Some(identity::Step::TrustFiles) => anyhow::anyhow!(
            "{} ({}, {}): {err}",
            identity::Step::TrustFiles.describe(),
            trust.bundle.display(),
            trust.ca_cert.display()
        ),
        Some(step) => anyhow::anyhow!("{}: {err}", step.describe()),
        None => {
            let name = program.to_string_lossy();
            // execvp(3) reports EACCES when a directory of PATH the agent's user cannot search came before the
            // ones where the name is not found: either way, nothing it may run has that name.
            let looked_up = !name.contains('/')
                && matches!(
                    err.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                );
            let context = if looked_up {
                format!(
                    "starting {name}: no directory of PATH that the agent's user can search holds a program it \
                     may run by that name"
                )
            } else {
                format!("starting {name}")
            };
            anyhow::Error::new(err).context(context)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup an earlier run with the same pid left behind does not keep a new run from starting: it gets a name
    /// of its own beside it.
    #[test]
    fn a_run_whose_cgroup_name_is_taken_gets_another() {
        let dir = tempfile::tempdir().unwrap();
        let first = create_exec_cgroup(dir.path(), 77).unwrap();
        assert_eq!(first, dir.path().join("exec-77"));
        let second = create_exec_cgroup(dir.path(), 77).unwrap();
        assert_eq!(second, dir.path().join("exec-77-1"));
        assert_eq!(
            create_exec_cgroup(dir.path(), 77).unwrap(),
            dir.path().join("exec-77-2")
        );
        assert!(create_exec_cgroup(&dir.path().join("missing"), 77).is_err());
    }

    /// `--stop-timeout SECS`: whole seconds that fit in 32 bits, 10 when not given, 0 allowed; nothing negative,
    /// fractional, with a unit or empty.
    #[test]
    fn the_stop_timeout_is_whole_seconds_ten_by_default() {
        use clap::Parser;
        let parse = |options: &[&str]| {
            let argv = ["enforcer", "exec"]
                .iter()
                .chain(options)
                .chain(&["--", "sh", "-c", "exit 0"]);
            match crate::cli::Cli::try_parse_from(argv) {
                Ok(crate::cli::Cli {
                    command: crate::cli::Command::Exec(args),
                }) => Ok((args.stop_timeout, args.command.len())),
                Ok(other) => panic!("not exec: {other:?}"),
                Err(err) => Err(err.kind()),
            }
        };
        assert_eq!(parse(&[]), Ok((10, 3)));
        assert_eq!(parse(&["--stop-timeout", "1"]), Ok((1, 3)));
        assert_eq!(parse(&["--stop-timeout=0"]), Ok((0, 3)));
        assert_eq!(parse(&["--stop-timeout", "4294967295"]), Ok((u32::MAX, 3)));
        for bad in ["1.5", "10s", "ten", "4294967296", ""] {
            assert_eq!(
                parse(&["--stop-timeout", bad]),
                Err(clap::error::ErrorKind::ValueValidation),
                "{bad}"
            );
        }
        assert_eq!(
            parse(&["--stop-timeout=-1"]),
            Err(clap::error::ErrorKind::ValueValidation)
        );
        // Read as an option of its own, not as the value.
        assert_eq!(
            parse(&["--stop-timeout", "-1"]),
            Err(clap::error::ErrorKind::UnknownArgument)
        );
    }
}
