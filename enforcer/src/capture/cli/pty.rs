//! The agent's own pseudo-terminal (pty(7)), relayed by `enforcer exec`, as sudo's `use_pty` and script(1) do.
//!
//! An agent given the terminal of the person who ran `exec` (the operator's) can pass its descriptor over a unix
//! socket (`SCM_RIGHTS`, unix(7)) to a process of its user outside the run, which then goes on reading what the
//! operator types, and writing to the operator's screen, after the run has ended. So when stdin, stdout or stderr of
//! `exec` is a terminal, `exec` opens a new pty for the run ([`Pty::open`]): each of the agent's standard streams that
//! was a terminal becomes the pty's slave, which starts with the operator's terminal modes (termios(3)) and window
//! size, is owned by the agent's user (mode 0620) and is the controlling terminal of the run's session: the run's
//! init leads that session ([`Session::lead`]) and the agent is its foreground process group
//! ([`Session::foreground`]). `exec` keeps the master and relays ([`Relay`]) with poll(2): what the operator types
//! goes to the master, what the agent writes goes to the operator's terminal.
//!
//! While `exec` is in its terminal's foreground process group, the operator's terminal is in raw mode
//! (cfmakeraw(3)), so typed `Ctrl-C`, `Ctrl-\` and `Ctrl-Z` arrive as bytes and the pty's line discipline sends the
//! agent SIGINT, SIGQUIT and SIGTSTP (tty_ioctl(4)). A change of the operator's window size (SIGWINCH) is copied to
//! the pty, which signals the agent. `exec` restores the operator's exact modes however the run ends (the agent's
//! exit or signal, SIGTERM or SIGHUP to `exec`, the run killed after its stop timeout, an error); only SIGKILL to
//! `exec` leaves them raw (`stty sane`).
//!
//! Job control is sudo's: when the agent is stopped (`Ctrl-Z`), the init tells `exec` ([`Relay::run`]'s `stops`),
//! which restores the operator's modes and stops its own process group with the same signal, so the operator's shell
//! sees its job stopped. When continued (`fg`, `bg`), `exec` takes the terminal back (raw again only in the
//! foreground) and has the init continue the agent's process group.
//!
//! When the run ends, `exec` reads what the agent wrote until the pty reports that no slave is open (`EIO`), then
//! closes the master: the kernel hangs the slave up, so a descriptor of it the agent handed out reads end of file and
//! writes fail with `EIO`; it never was the operator's terminal. Nor does the agent inherit any other descriptor of
//! a terminal `exec` was given ([`keep_terminals_from_agent`]).

use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// How long `exec` waits, once the run has ended, for output of a pty whose slave is still open outside the run (a
/// descriptor the agent handed out): the agent's last writes are moved to the master by the kernel's work queue.
const DRAIN_QUIET: Duration = Duration::from_millis(100);
/// The most `exec` spends reading the pty once the run has ended, so a slave kept outside cannot hold it.
const DRAIN_MAX: Duration = Duration::from_secs(2);
/// Bytes relayed per read.
const CHUNK: usize = 64 * 1024;
/// How often `exec`, while not in its terminal's foreground, looks whether it has been given it: a shell's `fg` of a
/// job that runs in the background only hands the job the terminal (tcsetpgrp(3)), without a signal.
const BACKGROUND_CHECK_MS: libc::c_int = 200;

#[derive(Debug, thiserror::Error)]
pub(super) enum PtyError {
    #[error("reading the modes of the terminal on descriptor {fd}: {source}")]
    Modes {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error("opening a pseudo-terminal for the agent: {0}")]
    Open(#[source] io::Error),
    #[error("giving {path} to the agent's user: {source}")]
    Owner {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The run's pty, opened by `exec` before it forks the init.
pub(super) struct Pty {
    master: OwnedFd,
    slave: OwnedFd,
    /// Which of stdin, stdout and stderr were terminals (the agent gets the slave for those).
    streams: [bool; 3],
    operator: Operator,
}

/// The operator's terminal, as `exec` found it.
struct Operator {
    /// The terminal, opened anew for reading and writing (so input is relayed even when only stdout or stderr is
    /// the terminal, as sudo opens `/dev/tty`).
    tty: OwnedFd,
    /// Its modes when `exec` started: what is restored.
    original: libc::termios,
    /// Whether `exec` has put it in raw mode.
    raw: bool,
    /// `exec`'s pid: a forked copy never restores the modes.
    owner: libc::pid_t,
    /// Whether it is `exec`'s controlling terminal (tcgetpgrp(3) answers): only then can `exec` come to its foreground.
    controlling: bool,
}

impl Pty {
    /// Open the run's pty when stdin, stdout or stderr is a terminal (`None` when none is), with the operator's
    /// modes and window size, owned by `owner` (the agent's uid) when given. Puts the operator's terminal in raw
    /// mode when `exec` is in its foreground.
    ///
    /// Errors: the terminal's modes cannot be read; posix_openpt(3), grantpt(3), unlockpt(3) or opening the slave
    /// failed; the slave cannot be given to `owner`.
    pub(super) fn open(owner: Option<libc::uid_t>) -> Result<Option<Pty>, PtyError> {
        // SAFETY: isatty(3) on the standard descriptors.
        let streams = [0, 1, 2].map(|fd| unsafe { libc::isatty(fd) } == 1);
        let Some(fd) = (0..3).find(|&fd| streams[fd as usize]) else {
            return Ok(None);
        };
        let tty = reopen(fd).map_err(|source| PtyError::Modes { fd, source })?;
        // SAFETY: an all-zero termios is a valid value of this plain C struct; tcgetattr(3) fills it.
        let mut original: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr on a descriptor we own, into a local.
        if unsafe { libc::tcgetattr(tty.as_raw_fd(), &mut original) } != 0 {
            let source = io::Error::last_os_error();
            return Err(PtyError::Modes { fd, source });
        }
        // SAFETY: tcgetpgrp only reads.
        let controlling = unsafe { libc::tcgetpgrp(tty.as_raw_fd()) } >= 0;
        let operator = Operator {
            tty,
            original,
            raw: false,
            // SAFETY: getpid has no preconditions.
            owner: unsafe { libc::getpid() },
            controlling,
        };
        let (master, slave, path) = open_pty().map_err(PtyError::Open)?;
        // SAFETY: tcsetattr and TIOCSWINSZ read locals; on the slave we own.
        unsafe {
            if libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &operator.original) != 0 {
                return Err(PtyError::Open(io::Error::last_os_error()));
            }
        }
        copy_window_size(&operator.tty, &slave);
        if let Some(uid) = owner {
            // SAFETY: fchown/fchmod on the slave we own.
            let given = unsafe {
                libc::fchown(slave.as_raw_fd(), uid, libc::gid_t::MAX) == 0
                    && libc::fchmod(slave.as_raw_fd(), 0o620) == 0
            };
            if !given {
                let source = io::Error::last_os_error();
                return Err(PtyError::Owner { path, source });
            }
        }
        let mut pty = Pty {
            master,
            slave,
            streams,
            operator,
        };
        pty.operator.enter_raw_mode();
        Ok(Some(pty))
    }

    /// Give the agent the slave as each of its standard streams that was a terminal, and have it take the pty's
    /// foreground before it runs ([`Session::foreground`]). Call before the init forks the agent.
    pub(super) fn prepare_agent(&self, cmd: &mut Command) -> io::Result<()> {
        let slave = || self.slave.try_clone().map(Stdio::from);
        if self.streams[0] {
            cmd.stdin(slave()?);
        }
        if self.streams[1] {
            cmd.stdout(slave()?);
        }
        if self.streams[2] {
            cmd.stderr(slave()?);
        }
        let fd = self.slave.as_raw_fd();
        // SAFETY: `Session::foreground` makes only async-signal-safe system calls, on the slave's descriptor, which
        // the init keeps open until it exits.
        unsafe {
            cmd.pre_exec(move || Session::foreground(fd));
        }
        Ok(())
    }

    /// `exec`'s side after the fork: the master and the operator's terminal, to relay. The slave is closed here (the
    /// init and the agent hold it), so the master reports `EIO` once the run's last holder is gone.
    pub(super) fn into_relay(self) -> io::Result<Relay> {
        let Pty {
            master, operator, ..
        } = self;
        set_nonblocking(&master)?;
        let signals = install_signal_pipe()?;
        // A resize between the fork and the handler's installation.
        copy_window_size(&operator.tty, &master);
        Ok(Relay {
            master,
            operator,
            signals,
            input: Vec::new(),
            input_open: true,
            output_open: true,
            master_open: true,
        })
    }

    /// The init's side after the fork: the slave only (the master stays `exec`'s alone).
    pub(super) fn into_session(self) -> Session {
        let Pty {
            master,
            slave,
            operator,
            ..
        } = self;
        drop(master);
        // The init is a copy of `exec`: the operator's terminal is `exec`'s to restore (see `Operator::drop`).
        drop(operator);
        Session { slave }
    }
}

/// The run's session in the init: the pty's slave, kept open until the init exits, so the master sees no `EIO`
/// while the run lasts.
pub(super) struct Session {
    slave: OwnedFd,
}

impl Session {
    /// Make the init the leader of a new session whose controlling terminal is the slave (setsid(2),
    /// `TIOCSCTTY`). The agent then runs in a process group of that session that has a parent (the init) in the
    /// session but outside the group, so the terminal's SIGTSTP stops it (a group without one is orphaned, and the
    /// kernel discards terminal stop signals to it).
    pub(super) fn lead(&self) -> io::Result<()> {
        // SAFETY: setsid(2) and ioctl(2) with constant arguments on the slave we own.
        unsafe {
            if libc::setsid() < 0 || libc::ioctl(self.slave.as_raw_fd(), libc::TIOCSCTTY, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// In the agent's process, between fork and exec: a process group of its own, made the foreground group of the
    /// slave `fd` (tcsetpgrp(3), with SIGTTOU blocked for the call, since the group is not yet the foreground one).
    /// Only async-signal-safe system calls.
    fn foreground(fd: RawFd) -> io::Result<()> {
        // SAFETY: setpgid, sigprocmask on locals, tcsetpgrp on an open descriptor.
        unsafe {
            if libc::setpgid(0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTTOU);
            libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
            let rc = libc::tcsetpgrp(fd, libc::getpid());
            let err = io::Error::last_os_error();
            libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
            if rc != 0 {
                return Err(err);
            }
        }
        Ok(())
    }
}

/// `exec` relaying between the operator's terminal and the run's pty.
pub(super) struct Relay {
    master: OwnedFd,
    operator: Operator,
    /// Read end of the pipe SIGWINCH and SIGCONT are written to.
    signals: File,
    /// Typed bytes not yet written to the master.
    input: Vec<u8>,
    /// The operator's terminal still gives input (not hung up).
    input_open: bool,
    /// The operator's terminal still takes output; when not, the agent's is read and dropped.
    output_open: bool,
    /// A slave is open (always while the init, which holds one, runs).
    master_open: bool,
}

impl Relay {
    /// Relay until the init has exited (every write end of `stops` is closed): typed input to the master, the pty's
    /// output to the operator's terminal, window size changes to the pty. A byte on `stops` is the signal that
    /// stopped the agent: `exec` stops as the agent did, then has the init (`init`, which continues the agent's
    /// process group on SIGCONT) continue it.
    ///
    /// Errors: poll(2) or reading the master failed other than with `EINTR`/`EAGAIN`.
    pub(super) fn run(&mut self, stops: &File, init: libc::pid_t) -> io::Result<()> {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let foreground = self.operator.foreground();
            // Given the terminal (`fg`) since the last look: raw again, and its input is the agent's.
            self.operator.enter_raw_mode();
            let typing = self.input_open && self.input.is_empty() && foreground;
            let mut master_events = libc::POLLIN;
            if !self.input.is_empty() {
                master_events |= libc::POLLOUT;
            }
            let mut fds = [
                poll_fd(stops.as_raw_fd(), libc::POLLIN),
                poll_fd(self.signals.as_raw_fd(), libc::POLLIN),
                poll_fd(
                    if self.master_open {
                        self.master.as_raw_fd()
                    } else {
                        -1
                    },
                    master_events,
                ),
                poll_fd(
                    if typing {
                        self.operator.tty.as_raw_fd()
                    } else {
                        -1
                    },
                    libc::POLLIN,
                ),
            ];
            let timeout = if foreground || !self.operator.controlling {
                -1
            } else {
                BACKGROUND_CHECK_MS
            };
            // SAFETY: poll(2) on an array of the length given.
            if unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) } < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(err);
            }
            if fds[1].revents != 0 {
                self.handle_signals();
            }
            if fds[2].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                self.master_open = self.pass_output(&mut buf)?;
            }
            if fds[2].revents & libc::POLLOUT != 0 {
                self.pass_input();
            }
            if fds[3].revents != 0 {
                self.take_input(&mut buf);
            }
            if fds[0].revents != 0 {
                let mut stopped = [0u8; 16];
                match read_fd(stops.as_raw_fd(), &mut stopped) {
                    Ok(0) => return Ok(()),
                    Ok(n) => {
                        for &signal in &stopped[..n] {
                            self.suspend(libc::c_int::from(signal), init);
                        }
                    }
                    Err(e) if retry(&e) => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Once the init has been reaped (every process of the run is gone): pass on what the agent wrote last, until
    /// the pty reports that no slave is open (`EIO`). A slave still open outside the run (handed out by the agent)
    /// gets [`DRAIN_QUIET`] of silence, and [`DRAIN_MAX`] in all.
    pub(super) fn drain(&mut self) {
        let mut buf = vec![0u8; CHUNK];
        let end = Instant::now() + DRAIN_MAX;
        loop {
            let left = end
                .saturating_duration_since(Instant::now())
                .min(DRAIN_QUIET);
            let mut fd = poll_fd(self.master.as_raw_fd(), libc::POLLIN);
            let timeout = libc::c_int::try_from(left.as_millis()).unwrap_or(0);
            // SAFETY: poll(2) on one pollfd.
            let ready = unsafe { libc::poll(&mut fd, 1, timeout) };
            if ready == 0 || left.is_zero() {
                return;
            }
            if ready < 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return;
            }
            match self.pass_output(&mut buf) {
                Ok(true) => {}
                Ok(false) | Err(_) => return,
            }
        }
    }

    /// Read the master once and write what came to the operator's terminal. `Ok(false)`: no slave is open any more.
    fn pass_output(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        match read_fd(self.master.as_raw_fd(), buf) {
            Ok(0) => Ok(false),
            Ok(n) => {
                if self.output_open && write_all(&self.operator.tty, &buf[..n]).is_err() {
                    // The operator's terminal is gone (hung up): the agent's output is dropped from now on.
                    self.output_open = false;
                }
                Ok(true)
            }
            Err(e) if retry(&e) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Read what the operator typed (the terminal is ready).
    fn take_input(&mut self, buf: &mut [u8]) {
        match read_fd(self.operator.tty.as_raw_fd(), buf) {
            Ok(0) => self.input_open = false,
            Ok(n) => self.input.extend_from_slice(&buf[..n]),
            Err(e) if retry(&e) => {}
            // EIO: hung up, or read from the background.
            Err(_) => self.input_open = false,
        }
    }

    /// Write typed bytes to the master, as many as it takes now.
    fn pass_input(&mut self) {
        let fd = self.master.as_raw_fd();
        // SAFETY: write(2) from our buffer, of its length.
        let n = unsafe { libc::write(fd, self.input.as_ptr().cast(), self.input.len()) };
        if let Ok(n) = usize::try_from(n) {
            self.input.drain(..n);
        } else if !retry(&io::Error::last_os_error()) {
            self.input.clear();
        }
    }

    /// SIGWINCH: copy the operator's window size to the pty (the kernel signals the agent). SIGCONT: `exec` was
    /// continued; raw mode follows whether it is now in the foreground.
    fn handle_signals(&mut self) {
        let mut signals = [0u8; 32];
        let Ok(n) = read_fd(self.signals.as_raw_fd(), &mut signals) else {
            return;
        };
        for &signal in &signals[..n] {
            match libc::c_int::from(signal) {
                libc::SIGWINCH => copy_window_size(&self.operator.tty, &self.master),
                libc::SIGCONT => {
                    if self.operator.foreground() {
                        self.operator.enter_raw_mode();
                    } else {
                        self.operator.restore();
                    }
                }
                _ => {}
            }
        }
    }

    /// The agent was stopped by `signal`: as sudo does, a SIGTTIN or SIGTTOU while `exec` is in the foreground only
    /// needs the terminal given back; otherwise restore the operator's modes and stop `exec`'s process group with
    /// the signal (SIGTSTP for one that is not a stop signal), so the operator's shell sees its job stopped. Once
    /// continued (or at once, where the kernel discards the stop: a group no shell controls), take the terminal back
    /// and continue the agent.
    fn suspend(&mut self, signal: libc::c_int, init: libc::pid_t) {
        let foreground_stop =
            matches!(signal, libc::SIGTTIN | libc::SIGTTOU) && self.operator.foreground();
        if !foreground_stop {
            self.operator.restore();
            let signal = match signal {
                libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU => signal,
                _ => libc::SIGTSTP,
            };
            // SAFETY: killpg(2) on our own process group; it returns once we are continued.
            unsafe {
                libc::killpg(libc::getpgrp(), signal);
            }
            copy_window_size(&self.operator.tty, &self.master);
        }
        if self.operator.foreground() {
            self.operator.enter_raw_mode();
        }
        // SAFETY: kill(2) on our own child, the init, whose SIGCONT handler continues the agent's group.
        unsafe {
            libc::kill(init, libc::SIGCONT);
        }
    }
}

impl Operator {
    /// Whether `exec` is in the terminal's foreground process group (tcgetpgrp(3)); not when the terminal is not
    /// its controlling terminal.
    fn foreground(&self) -> bool {
        // SAFETY: tcgetpgrp and getpgrp only read.
        unsafe { libc::tcgetpgrp(self.tty.as_raw_fd()) == libc::getpgrp() }
    }

    /// Raw mode (cfmakeraw(3)), when `exec` is in the foreground (a background process setting it would be stopped
    /// with SIGTTOU).
    fn enter_raw_mode(&mut self) {
        if self.raw || !self.foreground() {
            return;
        }
        let mut raw = self.original;
        // SAFETY: cfmakeraw edits a local copy.
        unsafe { libc::cfmakeraw(&mut raw) };
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        if set_modes(&self.tty, &raw) {
            self.raw = true;
        }
    }

    /// Put back the modes the terminal had when `exec` started.
    fn restore(&mut self) {
        // SAFETY: getpid has no preconditions.
        if self.raw && unsafe { libc::getpid() } == self.owner {
            set_modes(&self.tty, &self.original);
            self.raw = false;
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.restore();
    }
}

/// Make every descriptor above 2 that `exec` inherited and that is a terminal close-on-exec, so the agent holds no
/// terminal but its pty's slave: a descriptor of the operator's terminal could be handed out as its stdin could.
/// Other inherited descriptors are left to the agent.
///
/// Errors: `/proc/self/fd` cannot be read.
pub(super) fn keep_terminals_from_agent() -> io::Result<()> {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: isatty(3) and fcntl(2) on a descriptor number; the listing's own, closed since, fails harmlessly.
        unsafe {
            if libc::isatty(fd) == 1 {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 {
                    libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                }
            }
        }
    }
    Ok(())
}

/// tcsetattr(3) with `TCSADRAIN`, with SIGTTOU blocked so that `exec`, should it be in the background, is not
/// stopped for it. Whether it succeeded.
fn set_modes(tty: &OwnedFd, modes: &libc::termios) -> bool {
    // SAFETY: sigprocmask on locals; tcsetattr reads `modes`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTTOU);
        libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
        let done = loop {
            if libc::tcsetattr(tty.as_raw_fd(), libc::TCSADRAIN, modes) == 0 {
                break true;
            }
            if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break false;
            }
        };
        libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        done
    }
}

/// The terminal on descriptor `fd`, opened anew for reading and writing through `/proc/self/fd` (as root, or as
/// the terminal's owner); a duplicate of `fd` when that fails.
fn reopen(fd: RawFd) -> io::Result<OwnedFd> {
    let path = format!("/proc/self/fd/{fd}\0");
    let path = CStr::from_bytes_with_nul(path.as_bytes()).map_err(io::Error::other)?;
    // SAFETY: open(2) on a NUL-terminated path; the descriptor is ours.
    let reopened = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if reopened >= 0 {
        // SAFETY: just opened, owned only here.
        return Ok(unsafe { OwnedFd::from_raw_fd(reopened) });
    }
    // SAFETY: F_DUPFD_CLOEXEC on a standard descriptor; the copy is ours.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just duplicated, owned only here.
    Ok(unsafe { OwnedFd::from_raw_fd(dup) })
}

/// A new pty (posix_openpt(3), grantpt(3), unlockpt(3)): (master, slave, the slave's path). Both close-on-exec;
/// neither becomes `exec`'s controlling terminal.
fn open_pty() -> io::Result<(OwnedFd, OwnedFd, String)> {
    // SAFETY: posix_openpt returns a new descriptor or -1.
    let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if master < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened, owned only here.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: grantpt/unlockpt on the master; ptsname_r writes at most `name.len()` bytes into `name`.
    unsafe {
        if libc::grantpt(master.as_raw_fd()) != 0 || libc::unlockpt(master.as_raw_fd()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let rc = libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len());
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
    }
    // SAFETY: ptsname_r wrote a NUL-terminated path into `name`.
    let path = unsafe { CStr::from_ptr(name.as_ptr()) };
    // SAFETY: open(2) on that path; the descriptor is ours.
    let slave = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: just opened, owned only here.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    Ok((master, slave, path.to_string_lossy().into_owned()))
}

/// Copy the window size of terminal `from` to `to` (`TIOCGWINSZ`, `TIOCSWINSZ`); nothing when `from` has none.
fn copy_window_size(from: &OwnedFd, to: &OwnedFd) {
    // SAFETY: an all-zero winsize is valid; the ioctls fill and read that local.
    unsafe {
        let mut size: libc::winsize = std::mem::zeroed();
        if libc::ioctl(from.as_raw_fd(), libc::TIOCGWINSZ, &mut size) == 0 {
            libc::ioctl(to.as_raw_fd(), libc::TIOCSWINSZ, &size);
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl(2) on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn poll_fd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn read_fd(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: read(2) into `buf`, of its length.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Write all of `buf` to the operator's terminal, waiting for it to take more when it is non-blocking.
fn write_all(tty: &OwnedFd, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: write(2) from `buf`, of its length.
        let n = unsafe { libc::write(tty.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(_) => {
                let err = io::Error::last_os_error();
                if !retry(&err) {
                    return Err(err);
                }
                let mut fd = poll_fd(tty.as_raw_fd(), libc::POLLOUT);
                // SAFETY: poll(2) on one pollfd.
                unsafe { libc::poll(&mut fd, 1, 100) };
            }
        }
    }
    Ok(())
}

/// `EINTR` or `EAGAIN`: try again.
fn retry(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN))
}

/// Write end of the signal pipe (-1 until there is one).
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn note_signal(signal: libc::c_int) {
    let fd = SIGNAL_PIPE.load(Ordering::SeqCst);
    if fd >= 0 {
        let byte = u8::try_from(signal).unwrap_or(0);
        // SAFETY: write(2) is async-signal-safe; errno is saved around it.
        unsafe {
            let errno = *libc::__errno_location();
            libc::write(fd, (&byte as *const u8).cast(), 1);
            *libc::__errno_location() = errno;
        }
    }
}

/// A pipe that SIGWINCH and SIGCONT are written to (one byte each, the signal number), for [`Relay::run`]'s poll;
/// its read end. Both ends non-blocking and close-on-exec.
fn install_signal_pipe() -> io::Result<File> {
    let (read, write) = super::cloexec_pipe(true)?;
    // The write end stays open for `exec`'s life (the handlers may run until it exits).
    SIGNAL_PIPE.store(write.into_raw_fd(), Ordering::SeqCst);
    let handler = note_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: the handler only writes to the pipe; sigaction on locals.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGWINCH, &action, std::ptr::null_mut());
        libc::sigaction(libc::SIGCONT, &action, std::ptr::null_mut());
    }
    Ok(read)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pty's two ends are connected, and the slave takes a window size the master then reports.
    #[test]
    fn a_new_pty_relays_and_carries_the_window_size() {
        let (master, slave, path) = open_pty().unwrap();
        assert!(path.starts_with("/dev/pts/"), "{path}");
        let size = libc::winsize {
            ws_row: 37,
            ws_col: 101,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a local.
        assert_eq!(
            unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ, &size) },
            0
        );
        copy_window_size(&slave, &master);
        // SAFETY: an all-zero winsize is valid; TIOCGWINSZ fills it.
        let mut got: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: as above, on the master we own.
        assert_eq!(
            unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGWINSZ, &mut got) },
            0
        );
        assert_eq!((got.ws_row, got.ws_col), (37, 101));
        write_all(&slave, b"hi\n").unwrap();
        let mut buf = [0u8; 16];
        let n = read_fd(master.as_raw_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..n], b"hi\r\n");
    }

    /// An inherited terminal above 2 is closed for the agent; an inherited pipe is not.
    #[test]
    fn inherited_terminals_become_close_on_exec_and_nothing_else() {
        let (_master, slave, _) = open_pty().unwrap();
        let mut pipe = [0; 2];
        // SAFETY: pipe(2) fills the array; fcntl(2) on the descriptors we own.
        let (tty, pipe) = unsafe {
            assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
            let tty = libc::fcntl(slave.as_raw_fd(), libc::F_DUPFD, 3);
            (
                OwnedFd::from_raw_fd(tty),
                [OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])],
            )
        };
        // SAFETY: F_GETFD on descriptors we own.
        let cloexec =
            |fd: &OwnedFd| unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) } & libc::FD_CLOEXEC;
        assert_eq!((cloexec(&tty), cloexec(&pipe[0])), (0, 0));
        keep_terminals_from_agent().unwrap();
        assert_eq!((cloexec(&tty), cloexec(&pipe[0])), (libc::FD_CLOEXEC, 0));
    }
}
