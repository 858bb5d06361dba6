//! Process file descriptors (pidfd_open(2)): a handle on one process that a later process reusing its pid cannot
//! take over. The control socket gets its peer's (`SO_PEERPIDFD`, unix(7)); the session watcher keeps the one of the
//! `enforcer exec` that registered a run.

use std::os::fd::{AsRawFd, OwnedFd};

/// A pidfd of process `pid` (pidfd_open(2), no flags), for tests of what holds one. Errors: `ESRCH` when no such
/// process (or it was reaped).
#[cfg(test)]
pub(crate) fn open(pid: libc::pid_t) -> std::io::Result<OwnedFd> {
    // SAFETY: a raw syscall with two integer arguments; on success the descriptor is new and ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: just opened, owned only here.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// Whether the process of `pidfd` has exited: its pidfd is readable (pidfd_open(2)), also while it is a zombie.
pub(crate) fn exited(pidfd: &OwnedFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one pollfd we own, for the duration of the call; no wait.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    ready > 0
}
