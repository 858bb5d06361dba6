//! What keeps the agent from acting through processes outside its run where its PID namespace ([`super::init`])
//! does not: a Landlock domain, entered in the agent's process between fork and exec and inherited by everything the
//! agent starts.
//!
//! The PID namespace takes away the pids of the processes outside the run, but a pid is not their only name. A unix
//! socket names the process at its other end: `SO_PEERPIDFD` and `SCM_PIDFD` (socket(7), unix(7), Linux 6.5) give
//! the agent a pidfd for a process of its user outside the run that it talks to (another run's agent, a server of
//! the user's), and pidfd_getfd(2), which checks ptrace access but not the PID namespace, then copies any of that
//! process's descriptors: its sockets, created outside capture, or a `/proc` of the host. And a procfs the host
//! mounts after the run started on a shared mount (a chroot's `/proc`) propagates into the run's mount namespace
//! (`MS_SLAVE`), where it shows every process of the host and their `/proc/PID/mem`.
//!
//! The Landlock domain (landlock(7), ABI 6: Linux 6.12) handles no file system or network access right, so the
//! agent reads, writes, mounts and connects as before. Being in a domain at all is what counts: the kernel refuses
//! any ptrace-mode access from a process in a domain to a process outside it (ptrace(2), `/proc/PID/mem` and the
//! other files ptrace access guards, process_vm_writev(2), pidfd_getfd(2): `EPERM` or `EACCES`), whatever named that
//! process, and the domain's `LANDLOCK_SCOPE_SIGNAL` refuses its signals to such a process (kill(2),
//! pidfd_send_signal(2), `F_SETOWN`). Every process outside the run is outside the domain; the run's own processes
//! trace and signal each other as before (a debugger in the run still works). Where the kernel has no Landlock ABI 6
//! (older, or Landlock not among the boot's `lsm=`), the agent runs without the domain.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// `LANDLOCK_CREATE_RULESET_VERSION` (linux/landlock.h): landlock_create_ruleset(2) returns the kernel's ABI version.
const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1 << 0;
/// `LANDLOCK_SCOPE_SIGNAL` (linux/landlock.h, ABI 6): no signal to a process outside the domain.
const LANDLOCK_SCOPE_SIGNAL: u64 = 1 << 1;
/// The first Landlock ABI with scopes (Linux 6.12): before it, a ruleset had to handle an access right, and one that
/// handles a file system right keeps its processes from mounting anything (even in a user namespace of their own).
const LANDLOCK_ABI_SCOPES: libc::c_long = 6;

/// `struct landlock_ruleset_attr` (linux/landlock.h), up to `scoped` (ABI 6).
#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum ConfineError {
    #[error("creating the agent's Landlock ruleset: {0}")]
    Landlock(#[source] std::io::Error),
}

/// The agent's confinement, prepared in `exec` before it forks and applied in the agent's process by
/// [`Confinement::apply`].
#[derive(Debug)]
pub(super) struct Confinement {
    /// A Landlock ruleset that scopes signals and handles nothing else (close-on-exec); `None` where the kernel has
    /// no Landlock ABI 6.
    landlock: Option<OwnedFd>,
}

impl Confinement {
    /// Prepare the confinement this kernel allows. Errors: the kernel has Landlock ABI 6 but refused the ruleset.
    pub(super) fn prepare() -> Result<Confinement, ConfineError> {
        let landlock = match landlock_abi() {
            Some(abi) if abi >= LANDLOCK_ABI_SCOPES => {
                Some(scoped_ruleset().map_err(ConfineError::Landlock)?)
            }
            _ => None,
        };
        Ok(Confinement { landlock })
    }

    /// In the agent's process between fork and exec, once it has no_new_privs (or is root): enter the Landlock
    /// domain. One system call on a descriptor prepared before the fork; nothing is allocated.
    pub(super) fn apply(&self) -> std::io::Result<()> {
        if let Some(ruleset) = &self.landlock {
            // SAFETY: landlock_restrict_self(2) on a ruleset descriptor we own, no flags.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_landlock_restrict_self,
                    ruleset.as_raw_fd(),
                    0 as libc::c_uint,
                )
            };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

/// The kernel's Landlock ABI version; `None` when it has no Landlock (`ENOSYS`) or it is not enabled
/// (`EOPNOTSUPP`).
fn landlock_abi() -> Option<libc::c_long> {
    // SAFETY: landlock_create_ruleset(2) with a null attribute, size 0 and the version flag only reads nothing.
    let abi = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    (abi > 0).then_some(abi)
}

/// A ruleset that handles no access right and scopes signals.
fn scoped_ruleset() -> std::io::Result<OwnedFd> {
    let attr = RulesetAttr {
        handled_access_fs: 0,
        handled_access_net: 0,
        scoped: LANDLOCK_SCOPE_SIGNAL,
    };
    // SAFETY: landlock_create_ruleset(2) reads `size_of::<RulesetAttr>()` bytes from `attr`, alive for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            &attr as *const RulesetAttr,
            std::mem::size_of::<RulesetAttr>(),
            0 as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: the kernel just returned this descriptor (close-on-exec) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
