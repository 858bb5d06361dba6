//! What keeps the agent from acting through processes outside its run where its PID namespace ([`super::init`])
//! does not: a Landlock domain and a seccomp filter, both set in the agent's process between fork and exec and
//! inherited by everything the agent starts.
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
//!
//! The terminal is the other way out: an agent started from a shell shares that shell's terminal, and `TIOCSTI`
//! (ioctl_tty(2)) pushes bytes into its input queue, which the shell reads as typed once the agent exits (as the
//! person who ran `enforcer exec`, often root, outside capture); `TIOCLINUX` subcode 3 does the same with a virtual
//! console's selection. The seccomp filter (seccomp(2), `SECCOMP_SET_MODE_FILTER`) refuses both ioctls with `EPERM`,
//! comparing only the low 32 bits of the request (the kernel's `unsigned int cmd`), and pidfd_getfd(2) as well, so
//! that kernels without the Landlock domain refuse it too. It knows every system call ABI the agent's process can
//! call into (x86-64, x32 and i386 through `int 0x80` on x86-64; AArch64 and AArch32 on AArch64) and kills a process
//! that calls through any other.

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
    #[error(
        "enforcer exec has no system call filter for this architecture (it knows x86-64 and AArch64): the agent \
         could type into the terminal it shares with the shell that started it"
    )]
    NoFilter,
}

/// The agent's confinement, prepared in `exec` before it forks and applied in the agent's process by
/// [`Confinement::apply`].
#[derive(Debug)]
pub(super) struct Confinement {
    /// A Landlock ruleset that scopes signals and handles nothing else (close-on-exec); `None` where the kernel has
    /// no Landlock ABI 6.
    landlock: Option<OwnedFd>,
    /// The seccomp filter ([`filter_program`]).
    filter: Vec<libc::sock_filter>,
}

impl Confinement {
    /// Prepare the confinement this kernel allows. Errors: the kernel has Landlock ABI 6 but refused the ruleset; no
    /// filter is known for this architecture.
    pub(super) fn prepare() -> Result<Confinement, ConfineError> {
        if ARCHES.is_empty() {
            return Err(ConfineError::NoFilter);
        }
        let landlock = match landlock_abi() {
            Some(abi) if abi >= LANDLOCK_ABI_SCOPES => {
                Some(scoped_ruleset().map_err(ConfineError::Landlock)?)
            }
            _ => None,
        };
        Ok(Confinement {
            landlock,
            filter: filter_program(ARCHES),
        })
    }

    /// In the agent's process between fork and exec, once it has no_new_privs (or is root): enter the Landlock
    /// domain. One system call on a descriptor prepared before the fork; nothing is allocated.
    pub(super) fn enter_landlock_domain(&self) -> std::io::Result<()> {
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

    /// In the agent's process between fork and exec, once it has no_new_privs (or is root), as its last step:
    /// install the seccomp filter. One system call on the program prepared before the fork; nothing is allocated.
    pub(super) fn install_filter(&self) -> std::io::Result<()> {
        install(&self.filter)
    }
}

/// Install `filter` on the calling thread (it has no_new_privs, or `CAP_SYS_ADMIN`).
fn install(filter: &[libc::sock_filter]) -> std::io::Result<()> {
    let len = libc::c_ushort::try_from(filter.len())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let prog = libc::sock_fprog {
        len,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: seccomp(2) copies `prog.len` instructions from `prog.filter`, both alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            0 as libc::c_uint,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// `SECCOMP_SET_MODE_FILTER` (linux/seccomp.h).
const SECCOMP_SET_MODE_FILTER: libc::c_uint = 1;
/// `__X32_SYSCALL_BIT` (arch/x86/include/uapi/asm/unistd.h): set in the number of every x32 system call.
#[cfg(target_arch = "x86_64")]
const X32: u32 = 0x4000_0000;

/// A system call ABI the agent's process can call the kernel through, as seccomp reports it (`seccomp_data.arch`,
/// an `AUDIT_ARCH_*` of linux/audit.h), with the numbers of the calls the filter refuses in it.
struct Arch {
    audit: u32,
    /// ioctl(2), refused for `TIOCSTI` and `TIOCLINUX`.
    ioctl: &'static [u32],
    /// pidfd_getfd(2), refused.
    pidfd_getfd: &'static [u32],
}

/// x86-64 (with x32's numbers: same `AUDIT_ARCH`, `X32` set), then i386 (`int 0x80`; its own numbers,
/// arch/x86/entry/syscalls/syscall_32.tbl).
#[cfg(target_arch = "x86_64")]
const ARCHES: &[Arch] = &[
    Arch {
        audit: 0xC000_003E,
        ioctl: &[16, X32 | 514],
        pidfd_getfd: &[438, X32 | 438],
    },
    Arch {
        audit: 0x4000_0003,
        ioctl: &[54],
        pidfd_getfd: &[438],
    },
];
/// AArch64 (include/uapi/asm-generic/unistd.h), then AArch32 (arch/arm/tools/syscall.tbl).
#[cfg(target_arch = "aarch64")]
const ARCHES: &[Arch] = &[
    Arch {
        audit: 0xC000_00B7,
        ioctl: &[29],
        pidfd_getfd: &[438],
    },
    Arch {
        audit: 0x4000_0028,
        ioctl: &[54],
        pidfd_getfd: &[438],
    },
];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ARCHES: &[Arch] = &[];

/// The ioctl requests the filter refuses (ioctl_tty(2)): pushing bytes into a terminal's input, and the virtual
/// console's ioctl whose subcode 3 pastes its selection there.
const REFUSED_IOCTLS: [u32; 2] = [libc::TIOCSTI as u32, libc::TIOCLINUX as u32];

/// Offsets into `struct seccomp_data`: the ABI, the system call number, and the low 32 bits of its second argument
/// (an ioctl's request).
const ARCH_OFFSET: u32 = std::mem::offset_of!(libc::seccomp_data, arch) as u32;
const NR_OFFSET: u32 = std::mem::offset_of!(libc::seccomp_data, nr) as u32;
const ARG1_LOW_OFFSET: u32 = std::mem::offset_of!(libc::seccomp_data, args) as u32
    + 8
    + if cfg!(target_endian = "big") { 4 } else { 0 };

/// The filter as classic BPF: per ABI in `arches`, its ioctl(2) goes on to the request check and its pidfd_getfd(2)
/// is refused; every other call is allowed; a call through an ABI not in `arches` kills the process.
///
/// ```text
///        ld arch
///   A:   jeq arches[0].audit, 0, B    ; one block per ABI
///        ld nr
///        jeq ioctl, IOCTL             ; each of its ioctl numbers
///        jeq pidfd_getfd, DENY        ; each of its pidfd_getfd numbers
///        ret ALLOW
///   B:   ...
///        ret KILL_PROCESS
///   IOCTL: ld args[1] (low 32 bits)
///        jeq TIOCSTI, DENY            ; each refused request
///        ret ALLOW
///   DENY: ret ERRNO(EPERM)
/// ```
fn filter_program(arches: &[Arch]) -> Vec<libc::sock_filter> {
    const LD: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    let stmt = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    // A forward jump from instruction `at` to `to`, as the offset from the next instruction.
    let offset = |at: usize, to: usize| u8::try_from(to - at - 1).expect("a short filter");
    // Append: if the loaded word equals `k`, go to instruction `to`, else on to the next.
    let jump_if_equal = |program: &mut Vec<libc::sock_filter>, k: u32, to: usize| {
        let at = program.len();
        program.push(libc::sock_filter {
            code: JEQ,
            jt: offset(at, to),
            jf: 0,
            k,
        });
    };
    let block = |arch: &Arch| 3 + arch.ioctl.len() + arch.pidfd_getfd.len();
    let kill = 1 + arches.iter().map(block).sum::<usize>();
    let ioctl = kill + 1;
    let deny = ioctl + 2 + REFUSED_IOCTLS.len();

    let mut program = vec![stmt(LD, ARCH_OFFSET)];
    for arch in arches {
        let next = program.len() + block(arch);
        let at = program.len();
        program.push(libc::sock_filter {
            code: JEQ,
            jt: 0,
            jf: offset(at, next),
            k: arch.audit,
        });
        program.push(stmt(LD, NR_OFFSET));
        for (numbers, to) in [(arch.ioctl, ioctl), (arch.pidfd_getfd, deny)] {
            for &nr in numbers {
                jump_if_equal(&mut program, nr, to);
            }
        }
        program.push(stmt(RET, libc::SECCOMP_RET_ALLOW));
    }
    program.push(stmt(RET, libc::SECCOMP_RET_KILL_PROCESS));
    program.push(stmt(LD, ARG1_LOW_OFFSET));
    for request in REFUSED_IOCTLS {
        jump_if_equal(&mut program, request, deny);
    }
    program.push(stmt(RET, libc::SECCOMP_RET_ALLOW));
    program.push(stmt(
        RET,
        libc::SECCOMP_RET_ERRNO | (libc::EPERM as u32 & libc::SECCOMP_RET_DATA),
    ));
    debug_assert_eq!(program.len(), deny + 1);
    program
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    /// The outcome of the calls [`probe`] makes, in order.
    const PROBES: usize = 8;

    /// In a forked child with `filter` installed (if any): ioctl(2) on /dev/null with `TIOCSTI`, with `TIOCSTI` in
    /// the low 32 bits of a request whose high bits are set (the kernel ignores them), with `TIOCLINUX` and with
    /// `TIOCGWINSZ`; pidfd_getfd(2) on no pidfd; and, through i386's `int 0x80`, ioctl with `TIOCSTI` and
    /// `TIOCGWINSZ` and pidfd_getfd. Each outcome is its errno (0: it succeeded). Only raw system calls run in the
    /// child.
    // `libc::Ioctl` is `c_ulong` with glibc and `c_int` with musl: the casts to u64 are needed with one of them.
    #[allow(clippy::unnecessary_cast)]
    fn probe(filter: Option<&[libc::sock_filter]>) -> [i32; PROBES] {
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        let fd = null.as_raw_fd();
        let mut pipe = [0; 2];
        // SAFETY: pipe(2) fills the two-element array.
        assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
        // SAFETY: the child makes only raw system calls on memory that exists before the fork, then _exit(2)s.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork");
        if child == 0 {
            let mut out = [-1i32; PROBES];
            // SAFETY (all calls below): system calls on locals and on descriptors open before the fork.
            unsafe {
                let errno = |rc: libc::c_long| {
                    if rc < 0 {
                        *libc::__errno_location()
                    } else {
                        0
                    }
                };
                if let Some(filter) = filter {
                    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                        || install(filter).is_err()
                    {
                        libc::_exit(2);
                    }
                }
                let mut byte = 0u8;
                let byte: *mut u8 = &mut byte;
                let ioctl = |request: u64| errno(libc::syscall(libc::SYS_ioctl, fd, request, byte));
                out[0] = ioctl(libc::TIOCSTI as u64);
                out[1] = ioctl((0xdead_beef << 32) | libc::TIOCSTI as u64);
                out[2] = ioctl(libc::TIOCLINUX as u64);
                out[3] = ioctl(libc::TIOCGWINSZ as u64);
                out[4] = errno(libc::syscall(libc::SYS_pidfd_getfd, -1, 0, 0));
                #[cfg(target_arch = "x86_64")]
                {
                    // i386: ioctl = 54, pidfd_getfd = 438; the pointer is never read (refused, or not a tty).
                    let fd = fd as u32;
                    out[5] = -int80(54, fd, libc::TIOCSTI as u32, 0);
                    out[6] = -int80(54, fd, libc::TIOCGWINSZ as u32, 0);
                    out[7] = -int80(438, u32::MAX, 0, 0);
                }
                libc::write(pipe[1], out.as_ptr().cast(), std::mem::size_of_val(&out));
                libc::_exit(0);
            }
        }
        // SAFETY: our end of the pipe; read(2) into a local array of the size given.
        let mut out = [0i32; PROBES];
        unsafe {
            libc::close(pipe[1]);
            let n = libc::read(
                pipe[0],
                out.as_mut_ptr().cast(),
                std::mem::size_of_val(&out),
            );
            libc::close(pipe[0]);
            let mut status = 0;
            assert_eq!(libc::waitpid(child, &mut status, 0), child);
            assert_eq!(
                (status, n),
                (0, std::mem::size_of_val(&out) as isize),
                "the probe failed"
            );
        }
        out
    }

    /// A system call through i386's `int 0x80` from this 64-bit process; the kernel's return value (`-errno`).
    #[cfg(target_arch = "x86_64")]
    unsafe fn int80(nr: u32, a: u32, b: u32, c: u32) -> i32 {
        let ret: u64;
        // SAFETY: the caller's system call; rbx (reserved by LLVM) is swapped in and back around it.
        unsafe {
            std::arch::asm!(
                "xchg {a}, rbx",
                "int 0x80",
                "xchg {a}, rbx",
                a = inout(reg) u64::from(a) => _,
                inlateout("rax") u64::from(nr) => ret,
                in("rcx") u64::from(b),
                in("rdx") u64::from(c),
                out("r8") _, out("r9") _, out("r10") _, out("r11") _,
            );
        }
        ret as u32 as i32
    }

    /// The filter refuses `TIOCSTI` and `TIOCLINUX` (whatever the request's high 32 bits) and pidfd_getfd with
    /// `EPERM`, through every ABI, and lets other ioctls through (`ENOTTY`: /dev/null is no terminal). Without it,
    /// the same calls fail only as the kernel fails them (`ENOTTY`, `EBADF`), so the probe tells the two apart.
    #[test]
    fn the_filter_refuses_terminal_input_and_pidfd_getfd_through_every_abi() {
        let allowed = probe(None);
        let filtered = probe(Some(&filter_program(ARCHES)));
        let (eperm, enotty, ebadf) = (libc::EPERM, libc::ENOTTY, libc::EBADF);
        #[cfg(target_arch = "x86_64")]
        {
            // A kernel without i386 emulation (ia32_emulation=0) fails int 0x80 with ENOSYS before any filter.
            if allowed[5] != libc::ENOSYS {
                assert_eq!(
                    allowed,
                    [enotty, enotty, enotty, enotty, ebadf, enotty, enotty, ebadf]
                );
                assert_eq!(
                    filtered,
                    [eperm, eperm, eperm, enotty, eperm, eperm, enotty, eperm]
                );
                return;
            }
        }
        assert_eq!(allowed[..5], [enotty, enotty, enotty, enotty, ebadf]);
        assert_eq!(filtered[..5], [eperm, eperm, eperm, enotty, eperm]);
    }
}
