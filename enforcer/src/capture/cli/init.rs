//! The run's own PID, mount and IPC namespaces, and the init that holds them (pid_namespaces(7),
//! mount_namespaces(7), ipc_namespaces(7)).
//!
//! `enforcer exec` forks an init into a fresh PID namespace with its own `/proc`, and the init starts the agent as
//! the namespace's second process. Everything the agent can name by pid is then a process of its run: a process
//! outside it, even one of its own user (the shell of the person who ran `sudo enforcer exec`, another agent's run),
//! cannot be traced, signalled or opened (ptrace(2), `/proc/PID/mem`, process_vm_writev(2), pidfd_open(2), kill(2)
//! all fail with `ESRCH` or `ENOENT`), so the agent cannot make it act for it outside capture, whatever
//! `kernel.yama.ptrace_scope` allows.
//!
//! The init stays root and in `exec`'s own cgroup, so the agent's cgroup holds only the agent's processes and the
//! agent (another uid) cannot signal or trace it. It passes SIGTERM and SIGHUP on to the agent (an init receives
//! only signals it has a handler for, so the agent itself could not be the init), reaps the orphans the agent
//! leaves, and exits with the agent's status when the agent exits. The kernel then kills every process left in the
//! namespace, so nothing the agent started outlives its run. The init is killed when `exec` dies
//! (`PR_SET_PDEATHSIG`; an init whose `exec` died before that was armed exits at once), which ends the run the same
//! way; so `exec`, like the init, ignores the SIGINT and SIGQUIT a terminal sends to its whole foreground process
//! group, and leaves them to the agent. When the agent has a pty of its own ([`super::pty`]), the init leads the
//! pty's session, tells `exec` each time the agent is stopped (a byte on the stop pipe: the signal), and continues
//! the agent's process group when `exec` sends it SIGCONT; `exec` relays the terminal while it waits.
//!
//! A stop request is escalated, as `docker stop` and systemd's `TimeoutStopSec=` do: once `exec` has passed on the
//! first SIGTERM or SIGHUP, it waits the run's stop timeout (`--stop-timeout`, whole seconds, alarm(2)); if the init
//! has not exited by then, `exec` sends the init SIGKILL, and exits 137 as a shell reports a process SIGKILL ended.
//! Killing the init, rather than writing `cgroup.kill` of the run's cgroup, is what is sure to leave nothing behind:
//! when a PID namespace's init exits, the kernel stops new processes being created in it and SIGKILLs every process
//! it holds (pid_namespaces(7)), and reports the init exited only once all of them are gone (`zap_pid_ns_processes`
//! in the kernel's `kernel/pid_namespace.c` waits for them), so when `exec`'s waitpid(2) returns, no process of the
//! run is left. No process can leave its PID namespace, whereas one can leave a cgroup (a root agent can write itself
//! into another's `cgroup.procs`); nor does it need `cgroup.kill` (Linux 5.14). Later SIGTERMs and SIGHUPs are passed
//! on too but keep the first deadline: systemd sends SIGHUP right after SIGTERM (`SendSIGHUP=`, as every login
//! session's scope has it), so a second signal cannot mean "kill now".

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, Ordering};

use anyhow::{bail, Context};

/// Which side of [`fork`] this process is on.
pub(super) enum Forked {
    /// `exec`, outside the namespace: wait for the init with [`Outside::wait`].
    Outside(Outside),
    /// The namespace's init (pid 1): start the agent, then [`Init::run`] never returns.
    Init(Init),
}

/// `exec`'s handle on the init it forked.
pub(super) struct Outside {
    /// The init's pid, as `exec` (outside the namespace) sees it.
    pid: libc::pid_t,
    /// Read end of the pipe the init writes an error to when the agent could not be started.
    errors: File,
    /// With job control ([`super::pty`]): read end of the pipe the init writes the signal that stopped the agent to.
    stops: Option<File>,
}

/// The namespace's init, before the agent is started.
pub(super) struct Init {
    /// Write end of the error pipe (close-on-exec, so the agent does not hold it).
    errors: File,
    /// Write end of the stop pipe (close-on-exec), with job control.
    stops: Option<File>,
}

/// Fork the init into a new PID namespace. Call with one thread only (fork(2) copies only the calling thread);
/// signals sent to `exec` before [`forward_signals_to`] are held and passed on afterwards. With `job_control` (the
/// agent has a pty of its own, [`super::pty`]), the init tells `exec` when the agent is stopped, and continues the
/// agent's process group when `exec` sends it SIGCONT.
///
/// Errors: `exec` has other threads; unshare(2) refused (`exec` needs `CAP_SYS_ADMIN`); pipe(2) or fork(2)
/// failed.
pub(super) fn fork(job_control: bool) -> anyhow::Result<Forked> {
    let threads = std::fs::read_dir("/proc/self/task")
        .context("reading /proc/self/task")?
        .count();
    if threads != 1 {
        bail!("enforcer exec runs {threads} threads; it forks the agent's init with one only");
    }
    let (read, write) = super::cloexec_pipe(false).context("creating the init's error pipe")?;
    let (stops_read, stops_write) = if job_control {
        let (read, write) = super::cloexec_pipe(false).context("creating the init's stop pipe")?;
        (Some(read), Some(write))
    } else {
        (None, None)
    };
    // SAFETY: unshare(2) with a constant flag: only this process's later children go into the new namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(std::io::Error::last_os_error())
            .context("creating the agent's PID namespace (exec needs root)");
    }
    let forwarded = blocked_forwarded_signals();
    // SAFETY: this process has one thread (checked above), so the child may run any code after fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let err = std::io::Error::last_os_error();
        forwarded.unblock();
        return Err(err).context("forking the agent's init");
    }
    if pid > 0 {
        drop(write);
        drop(stops_write);
        // Signals that came while blocked are delivered to the handler once unblocked, which passes them on.
        CHILD_PID.store(pid, Ordering::SeqCst);
        pass_on_pending();
        ignore_terminal_signals();
        forwarded.unblock();
        return Ok(Forked::Outside(Outside {
            pid,
            errors: read,
            stops: stops_read,
        }));
    }
    // The init. Signals pending in exec are not inherited; the ones it received before forking `exec` passes on
    // (`pass_on_pending`), so the init forgets its copy.
    drop(read);
    drop(stops_read);
    CHILD_PID.store(0, Ordering::SeqCst);
    PENDING_SIGNAL.store(0, Ordering::SeqCst);
    // The stop timeout is `exec`'s: the init passes signals on and never kills the run itself (nor takes SIGALRM
    // from a process of its namespace: an init receives only signals it has a handler for).
    STOP_TIMEOUT.store(NO_STOP_TIMEOUT, Ordering::SeqCst);
    // SAFETY: SIG_DFL has no preconditions.
    unsafe {
        libc::signal(libc::SIGALRM, libc::SIG_DFL);
    }
    // SAFETY: prctl with constant arguments.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
    }
    // `exec` killed before the line above: the death signal was never armed. Its end of the error pipe closed with it.
    if reader_gone(&write) {
        // SAFETY: _exit(2), as in `Init::run`.
        unsafe { libc::_exit(1) }
    }
    forwarded.unblock();
    Ok(Forked::Init(Init {
        errors: write,
        stops: stops_write,
    }))
}

/// Whether every read end of the pipe whose write end is `pipe` is closed (poll(2) reports `POLLERR` on a write end
/// then): here, whether `exec`, which holds the read end until the init has exited, is gone.
fn reader_gone(pipe: &File) -> bool {
    let mut fd = libc::pollfd {
        fd: pipe.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: poll(2) on one pollfd we own, without waiting.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) };
    ready > 0 && fd.revents & libc::POLLERR != 0
}

impl Outside {
    /// Wait for the init; its exit code is the agent's (a signal as 128 + the signal), or 137 when `exec` killed the
    /// run after its stop timeout (then said on stderr). With the agent's `pty`, relay between it and the operator's
    /// terminal until the init has exited, then pass on the agent's last output and restore the operator's terminal
    /// ([`super::pty::Relay`]). Errors: the init could not set up the namespace or start the agent (its message),
    /// waiting failed, or relaying failed (the run is then killed).
    pub(super) fn wait(mut self, pty: Option<super::pty::Pty>) -> anyhow::Result<i32> {
        let mut relay = match (pty, &self.stops) {
            (Some(pty), Some(stops)) => {
                let relayed = pty
                    .into_relay()
                    .and_then(|mut relay| relay.run(stops, self.pid).map(|()| relay));
                match relayed {
                    Ok(relay) => Some(relay),
                    Err(err) => {
                        // SAFETY: kill(2) on our own child; SIGKILL ends the init and with it the run.
                        unsafe { libc::kill(self.pid, libc::SIGKILL) };
                        let _ = reap_init(self.pid);
                        return Err(err)
                            .context("relaying the agent's terminal (the run was ended)");
                    }
                }
            }
            _ => None,
        };
        let status = reap_init(self.pid).context("waiting for the agent's init")?;
        if let Some(relay) = relay.as_mut() {
            relay.drain();
        }
        // Closes the master (hanging up the agent's terminal wherever it was handed) and restores the operator's.
        drop(relay);
        if let Some(stop) = killed_after_stop_timeout(status) {
            eprintln!(
                "enforcer exec: the run did not end within {} s of {} (--stop-timeout): every process of it was \
                 killed",
                stop.timeout,
                signal_name(stop.signal)
            );
        }
        let mut message = String::new();
        // Every holder of the write end has exited (the init; the agent's copy closed at exec).
        let _ = self.errors.read_to_string(&mut message);
        if !message.is_empty() {
            bail!("{message}");
        }
        Ok(exit_code(status))
    }
}

impl Init {
    /// Give the init its own IPC namespace (ipc_namespaces(7): System V shared memory, semaphores and message
    /// queues, and POSIX message queues, of processes outside the run cannot be reached from it) and its own mount
    /// namespace, with a `/proc` of the new PID namespace over the host's and no other procfs mounted anywhere (one
    /// would show every process of the host). Mounts made on the host later still propagate in (`MS_SLAVE`; the
    /// agent's Landlock domain, [`super::confine`], keeps a procfs among them from reaching outside processes);
    /// nothing mounted here propagates out.
    pub(super) fn enter_namespaces(&self) -> anyhow::Result<()> {
        // SAFETY (all calls below): system calls on constant, NUL-terminated strings.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC) != 0 {
                return Err(std::io::Error::last_os_error())
                    .context("creating the agent's mount and IPC namespaces");
            }
            if libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error())
                    .context("making the agent's mounts private to it");
            }
            if libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error()).context("mounting the agent's /proc");
            }
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .context("reading the agent's /proc/self/mountinfo")?;
        for point in other_procfs_mounts(&mountinfo) {
            let path = std::ffi::CString::new(point.as_bytes())
                .context("a procfs mount point with a NUL byte")?;
            // SAFETY: umount2 on a NUL-terminated path.
            if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("unmounting the host's procfs at {point}"));
            }
        }
        Ok(())
    }

    /// Run as the namespace's init once the agent (`agent`, its pid here) has started: pass signals on, reap every
    /// child, and exit with the agent's status when it ends. With `Err` (the agent could not be started), write the
    /// error for `exec` and exit.
    pub(super) fn run(mut self, agent: anyhow::Result<libc::pid_t>) -> ! {
        let code = match agent {
            Ok(pid) => {
                forward_signals_to(pid);
                match self.stops.take() {
                    Some(stops) => {
                        continue_on_sigcont();
                        reap_reporting_stops(pid, stops)
                    }
                    None => reap_until(pid),
                }
            }
            Err(err) => {
                let _ = self
                    .errors
                    .write_all(crate::cli::error_message(&err).as_bytes());
                1
            }
        };
        // SAFETY: _exit(2) ends this process without running exec's destructors (the init is a copy of exec: its
        // cgroup guard belongs to exec).
        unsafe { libc::_exit(code) }
    }
}

/// Mount points of procfs mounts other than `/proc`, from `/proc/self/mountinfo` (proc(5): field 5 is the mount
/// point, with spaces, tabs, newlines and backslashes as octal escapes; the filesystem type follows the `-`).
fn other_procfs_mounts(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, fs) = line.split_once(" - ")?;
            let point = unescape(mount.split(' ').nth(4)?);
            (fs.split(' ').next() == Some("proc") && point != "/proc").then_some(point)
        })
        .collect()
}

/// Undo mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let s = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(s, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reap children until `agent` exits; its exit code (a signal as 128 + the signal).
fn reap_until(agent: libc::pid_t) -> i32 {
    wait_until(-1, agent, 0, |_| {}).map_or(1, exit_code)
}

/// [`reap_until`], also writing the signal that stopped `agent` to `stops` (one byte) each time it is stopped.
fn reap_reporting_stops(agent: libc::pid_t, mut stops: File) -> i32 {
    let report = |signal: libc::c_int| {
        let _ = stops.write_all(&[u8::try_from(signal).unwrap_or(0)]);
    };
    wait_until(-1, agent, libc::WUNTRACED, report).map_or(1, exit_code)
}

/// Reap the children waitpid(2) selects with `which` (a pid, or -1 for any) until `want` has exited; its wait
/// status. With `WUNTRACED` in `options`, `stopped` is called with the signal each time `want` is stopped. A
/// forwarded signal interrupting the wait is retried.
fn wait_until(
    which: libc::pid_t,
    want: libc::pid_t,
    options: libc::c_int,
    mut stopped: impl FnMut(libc::c_int),
) -> std::io::Result<libc::c_int> {
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) into a local.
        let pid = unsafe { libc::waitpid(which, &mut status, options) };
        if pid == want && libc::WIFSTOPPED(status) {
            stopped(libc::WSTOPSIG(status));
            continue;
        }
        if pid == want {
            return Ok(status);
        }
        if pid < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(err);
            }
        }
    }
}

/// Wait until the init `pid` has exited, then stop passing signals on to it and cancel the stop timeout, and only then
/// reap it: until it is reaped its pid names its zombie, so a SIGTERM passed on, or the stop timeout's SIGKILL, that
/// comes meanwhile reaches no other process (as it could once the pid is free for reuse). Its wait status.
fn reap_init(pid: libc::pid_t) -> std::io::Result<libc::c_int> {
    loop {
        // SAFETY: an all-zero siginfo_t is valid; waitid(2) fills it. WNOWAIT leaves the child waitable.
        let rc = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                libc::id_t::try_from(pid).unwrap_or(0),
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
    CHILD_PID.store(0, Ordering::SeqCst);
    // SAFETY: alarm(2) with 0 cancels a pending alarm; no preconditions.
    unsafe {
        libc::alarm(0);
    }
    wait_until(pid, pid, 0, |_| {})
}

/// The stop request a run was killed for.
#[derive(Debug, PartialEq, Eq)]
struct StopTimedOut {
    /// The first SIGTERM or SIGHUP `exec` passed on.
    signal: libc::c_int,
    /// The stop timeout, in seconds.
    timeout: i64,
}

/// Whether the init, whose wait status is `status`, ended because `exec` killed it after the stop timeout: `exec`
/// sent SIGKILL and the init died of it (an init that had already exited keeps its own status).
fn killed_after_stop_timeout(status: libc::c_int) -> Option<StopTimedOut> {
    let killed = KILLED.load(Ordering::SeqCst)
        && libc::WIFSIGNALED(status)
        && libc::WTERMSIG(status) == libc::SIGKILL;
    killed.then(|| StopTimedOut {
        signal: STOP_SIGNAL.load(Ordering::SeqCst),
        timeout: STOP_TIMEOUT.load(Ordering::SeqCst),
    })
}

fn signal_name(signal: libc::c_int) -> String {
    match signal {
        libc::SIGTERM => "SIGTERM".to_string(),
        libc::SIGHUP => "SIGHUP".to_string(),
        other => format!("signal {other}"),
    }
}

/// A shell's exit code for a wait status: the exit code, or 128 + the signal that ended it.
fn exit_code(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

/// The pid signals are passed on to (0 until there is one).
static CHILD_PID: AtomicI32 = AtomicI32::new(0);
/// A SIGTERM/SIGHUP that arrived before there was a pid to pass it on to.
static PENDING_SIGNAL: AtomicI32 = AtomicI32::new(0);
/// `exec`'s stop timeout in seconds ([`NO_STOP_TIMEOUT`] in the init, which never escalates).
static STOP_TIMEOUT: AtomicI64 = AtomicI64::new(NO_STOP_TIMEOUT);
const NO_STOP_TIMEOUT: i64 = -1;
/// The first SIGTERM/SIGHUP `exec` passed on (0: none yet): the stop request whose timeout runs.
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
/// `exec` sent the init SIGKILL because the stop timeout ran out.
static KILLED: AtomicBool = AtomicBool::new(false);

extern "C" fn forward_signal(signal: libc::c_int) {
    let pid = CHILD_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe.
        unsafe {
            libc::kill(pid, signal);
        }
        // `exec` only (the init has no stop timeout), and the first stop request only: its deadline stays.
        if let Ok(secs) = libc::c_uint::try_from(STOP_TIMEOUT.load(Ordering::SeqCst)) {
            let first = STOP_SIGNAL
                .compare_exchange(0, signal, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok();
            if first {
                stop_after(secs);
            }
        }
    } else {
        PENDING_SIGNAL.store(signal, Ordering::SeqCst);
    }
}

/// Pass on a SIGTERM/SIGHUP that came before there was a process to pass it on to (stored by [`forward_signal`]):
/// in `exec`, to the init once forked (with both signals blocked), starting its stop timeout; in the init, to the
/// agent once started.
fn pass_on_pending() {
    let pending = PENDING_SIGNAL.swap(0, Ordering::SeqCst);
    if pending != 0 {
        forward_signal(pending);
    }
}

/// Start the stop timeout of `secs` seconds (0: kill the run now).
fn stop_after(secs: libc::c_uint) {
    if secs == 0 {
        kill_run();
    } else {
        // SAFETY: alarm(2) is async-signal-safe.
        unsafe {
            libc::alarm(secs);
        }
    }
}

/// SIGALRM: the stop timeout ran out. A SIGALRM with no stop request pending changes nothing.
extern "C" fn stop_timeout_expired(_: libc::c_int) {
    if STOP_SIGNAL.load(Ordering::SeqCst) != 0 {
        kill_run();
    }
}

/// SIGKILL to the init, which ends every process of the run (see the module's documentation).
fn kill_run() {
    let pid = CHILD_PID.load(Ordering::SeqCst);
    if pid > 0 {
        KILLED.store(true, Ordering::SeqCst);
        // SAFETY: kill(2) is async-signal-safe; `pid` is the init, not yet reaped (see `reap_init`).
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

extern "C" fn continue_agent(_: libc::c_int) {
    let pid = CHILD_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe; the agent leads its process group ([`super::pty`]).
        unsafe {
            libc::kill(-pid, libc::SIGCONT);
        }
    }
}

/// With job control, SIGCONT from `exec` (once `exec` itself is continued after the agent was stopped) continues
/// the agent's process group. The agent, in the init's session, may send the init SIGCONT too where its Landlock
/// domain does not scope signals (kill(2) allows SIGCONT within a session): that only continues the agent's own
/// group, which it can do itself.
fn continue_on_sigcont() {
    let handler = continue_agent as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only reads an atomic and calls kill(2).
    unsafe {
        libc::signal(libc::SIGCONT, handler);
    }
}

/// SIGTERM and SIGHUP sent to `exec` are passed on to the init, and by the init to the agent (handlers are reset by
/// exec, so the agent starts with default dispositions); `exec` lives to remove the cgroup. `stop_timeout` seconds
/// after the first, if the init has not exited, `exec` kills it, and with it the run (0: at once).
pub(super) fn install_signal_forwarding(stop_timeout: u32) {
    install_stop_timeout(stop_timeout);
    let handler = forward_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only touches atomics and calls kill(2) and alarm(2).
    unsafe {
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGHUP, handler);
    }
}

/// Set the stop timeout and the SIGALRM handler that ends the run when it runs out.
fn install_stop_timeout(stop_timeout: u32) {
    STOP_TIMEOUT.store(i64::from(stop_timeout), Ordering::SeqCst);
    let handler = stop_timeout_expired as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only touches atomics and calls kill(2).
    unsafe {
        libc::signal(libc::SIGALRM, handler);
    }
}

/// Once the agent is started, the init passes SIGTERM and SIGHUP on to it and ignores the terminal's signals (see
/// [`ignore_terminal_signals`]); a signal that arrived before is passed on now.
fn forward_signals_to(pid: libc::pid_t) {
    CHILD_PID.store(pid, Ordering::SeqCst);
    ignore_terminal_signals();
    pass_on_pending();
}

/// Like a shell waiting for its job: the terminal sends SIGINT (`Ctrl-C`) and SIGQUIT (`Ctrl-\`) to its whole
/// foreground process group, which holds `exec`, the init and every agent that does no job control of its own, so
/// they reach the agent on their own and `exec` and the init ignore them. Were `exec` to die of them, the run would
/// end at once (the init's `PR_SET_PDEATHSIG`), the agent killed before it could handle them, and its cgroup left
/// behind. Called after fork only: ignored signals stay ignored across execve(2), and the agent must start with them
/// at their defaults.
fn ignore_terminal_signals() {
    // SAFETY: SIG_IGN has no preconditions.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGQUIT, libc::SIG_IGN);
    }
}

/// SIGTERM and SIGHUP held back while the init is forked, so each reaches exactly one of the two processes.
struct BlockedSignals(libc::sigset_t);

fn blocked_forwarded_signals() -> BlockedSignals {
    // SAFETY: sigset operations on locals; sigprocmask on this (only) thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        BlockedSignals(set)
    }
}

impl BlockedSignals {
    fn unblock(self) {
        // SAFETY: unblocks the set this blocked.
        unsafe {
            libc::sigprocmask(libc::SIG_UNBLOCK, &self.0, std::ptr::null_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// The init knows `exec` is gone when `exec` died before the init could arm its death signal.
    #[test]
    fn a_closed_read_end_means_exec_is_gone() {
        let (read, write) = super::super::cloexec_pipe(false).unwrap();
        assert!(!reader_gone(&write));
        drop(read);
        assert!(reader_gone(&write));
    }

    /// Only procfs mounts other than /proc are unmounted, their escaped mount points read back.
    #[test]
    fn other_procfs_mounts_are_found_with_their_escaped_paths() {
        let mountinfo = "\
22 1 0:21 / /proc rw,relatime shared:5 - proc proc rw
23 1 0:22 / /sys rw shared:6 - sysfs sysfs rw
40 1 0:21 / /srv/chroot\\040one/proc rw - proc proc rw
41 1 0:30 / /proc/sys/fs/binfmt_misc rw - binfmt_misc binfmt_misc rw
42 1 0:31 / /mnt/not\\134proc rw - tmpfs proc rw
";
        assert_eq!(
            other_procfs_mounts(mountinfo),
            ["/srv/chroot one/proc".to_string()]
        );
        assert_eq!(unescape("a\\040b\\011c\\\\"), "a b\tc\\\\");
        assert_eq!(exit_code(7 << 8), 7);
        assert_eq!(exit_code(libc::SIGTERM), 128 + 15);
    }

    /// What is left of the alarm (the stop timeout's deadline), without changing it.
    fn alarm_left() -> Duration {
        // SAFETY: an all-zero itimerval is valid; getitimer(2) fills it.
        let mut timer: libc::itimerval = unsafe { std::mem::zeroed() };
        // SAFETY: as above, into a local.
        assert_eq!(unsafe { libc::getitimer(libc::ITIMER_REAL, &mut timer) }, 0);
        let value = timer.it_value;
        Duration::from_secs(u64::try_from(value.tv_sec).unwrap())
            + Duration::from_micros(u64::try_from(value.tv_usec).unwrap())
    }

    /// `sleep 30` as the run's init stands in, with SIGTERM and SIGHUP ignored when `ignore_term` (exec(2) keeps them
    /// ignored); `exec`'s side passes signals on to it.
    fn stand_in_init(ignore_term: bool) -> libc::pid_t {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        if ignore_term {
            // SAFETY: signal(2) only, between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::signal(libc::SIGTERM, libc::SIG_IGN);
                    libc::signal(libc::SIGHUP, libc::SIG_IGN);
                    Ok(())
                });
            }
        }
        // Dropping the Child neither waits nor kills: `reap_init` reaps it.
        let pid = i32::try_from(cmd.spawn().unwrap().id()).unwrap();
        CHILD_PID.store(pid, Ordering::SeqCst);
        STOP_SIGNAL.store(0, Ordering::SeqCst);
        KILLED.store(false, Ordering::SeqCst);
        pid
    }

    /// Reap the stand-in init `pid` and check it was killed after a stop timeout of `timeout` seconds for SIGTERM.
    fn assert_killed_after_stop_timeout(pid: libc::pid_t, timeout: i64) {
        let status = reap_init(pid).unwrap();
        assert_eq!(exit_code(status), 137);
        assert_eq!(
            killed_after_stop_timeout(status),
            Some(StopTimedOut {
                signal: libc::SIGTERM,
                timeout
            })
        );
    }

    /// The stop timeout, as `exec` runs it: a run that ignores SIGTERM is killed once the timeout has run out after
    /// the first SIGTERM passed on (a second does not move the deadline), and `exec` reports 137 and says so; a run
    /// that ends on SIGTERM keeps its own status (143), is not killed, and its alarm is cancelled once it is reaped;
    /// with 0, the run is killed as the signal is passed on.
    #[test]
    fn a_run_outlasting_its_stop_timeout_is_killed_and_one_that_ends_is_not() {
        install_stop_timeout(1);
        let pid = stand_in_init(true);
        let start = Instant::now();
        forward_signal(libc::SIGTERM);
        assert!(alarm_left() > Duration::ZERO, "not armed");
        std::thread::sleep(Duration::from_millis(500));
        forward_signal(libc::SIGHUP);
        assert!(
            alarm_left() < Duration::from_millis(900),
            "the second signal moved the deadline: {:?} left",
            alarm_left()
        );
        assert_killed_after_stop_timeout(pid, 1);
        let waited = start.elapsed();
        // Not before the timeout; the upper bound is loose (a shared machine).
        assert!(
            waited >= Duration::from_millis(990) && waited < Duration::from_secs(10),
            "{waited:?}"
        );
        assert_eq!(CHILD_PID.load(Ordering::SeqCst), 0);

        let pid = stand_in_init(false);
        forward_signal(libc::SIGTERM);
        let status = reap_init(pid).unwrap();
        assert_eq!(exit_code(status), 143);
        assert_eq!(killed_after_stop_timeout(status), None);
        assert_eq!(alarm_left(), Duration::ZERO, "the alarm outlived the run");
        assert!(!KILLED.load(Ordering::SeqCst));

        // A SIGTERM that came before the init was forked is passed on once it is, and its stop timeout runs.
        forward_signal(libc::SIGTERM);
        assert_eq!(PENDING_SIGNAL.load(Ordering::SeqCst), libc::SIGTERM);
        let pid = stand_in_init(true);
        pass_on_pending();
        assert_eq!(PENDING_SIGNAL.load(Ordering::SeqCst), 0);
        assert!(
            alarm_left() > Duration::ZERO,
            "its stop timeout is not armed"
        );
        assert_killed_after_stop_timeout(pid, 1);

        install_stop_timeout(0);
        let pid = stand_in_init(true);
        forward_signal(libc::SIGTERM);
        assert_killed_after_stop_timeout(pid, 0);

        STOP_TIMEOUT.store(NO_STOP_TIMEOUT, Ordering::SeqCst);
        // SAFETY: SIG_DFL has no preconditions.
        unsafe {
            libc::signal(libc::SIGALRM, libc::SIG_DFL);
        }
    }
}
