//! Who an agent started by `enforcer exec` runs as, and the switch to that identity in the forked child just before
//! it executes the command.
//!
//! The agent runs as a user without privileges: the one named by `--user`, or the user who ran `sudo enforcer exec`
//! (`SUDO_UID`, `SUDO_GID`), with that user's supplementary groups from the user database (getgrouplist(3)). It
//! keeps no capability (permitted, effective, inheritable, ambient and bounding sets all empty, capabilities(7)) and
//! has `no_new_privs` set (prctl(2) `PR_SET_NO_NEW_PRIVS`), so neither a setuid program (sudo, su) nor file
//! capabilities can give any back. Without a user it refuses, unless `--allow-root` asks for a root agent.
//!
//! Last, the child enters its confinement ([`super::confine`]), which keeps it from acting through processes outside
//! its run. Everything the child does between fork and exec is a raw system call on memory prepared in the parent
//! (no allocation, no lock): see [`Switch::apply`].

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::confine::Confinement;

/// The user an agent runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Identity {
    pub name: String,
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    /// Supplementary groups (the primary group included), from the user database.
    pub groups: Vec<libc::gid_t>,
    pub home: PathBuf,
}

/// What `enforcer exec` was asked for, and by whom.
#[derive(Debug, Clone, Default)]
pub(super) struct Request<'a> {
    /// `--user NAME` (a name or a numeric uid).
    pub user: Option<&'a str>,
    /// `--allow-root`.
    pub allow_root: bool,
    /// `SUDO_UID` / `SUDO_GID` as sudo(8) sets them for the command it runs.
    pub sudo_uid: Option<&'a str>,
    pub sudo_gid: Option<&'a str>,
    /// The effective uid of `enforcer exec` itself.
    pub caller_uid: libc::uid_t,
}

/// Who the agent will be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum RunAs {
    /// Switch to this user (from root), dropping every capability.
    User(Identity),
    /// `enforcer exec` itself is not root: the agent keeps its caller's ids, and still loses every capability.
    Caller,
    /// `--allow-root`: the agent runs as root, with root's capabilities.
    Root,
}

#[derive(Debug, thiserror::Error)]
pub(super) enum IdentityError {
    #[error(
        "refusing to run the agent as root: a root agent can leave its cgroup, open raw sockets, read the \
         enforcer's keys and stop the daemon. Run `sudo enforcer exec ...` from your own account (the agent runs as \
         you), pass --user NAME to run it as another user, or pass --allow-root if it really must be root"
    )]
    RootRefused,
    #[error("--user {0}: no such user in the user database")]
    NoSuchUser(String),
    #[error("--user {0} is root; pass --allow-root (and no --user) to run a root agent")]
    UserIsRoot(String),
    #[error("{var}={value:?} is not a numeric id")]
    BadSudoId { var: &'static str, value: String },
    #[error("SUDO_UID={0}: no such user in the user database")]
    NoSudoUser(libc::uid_t),
    #[error("looking up the user database: {0}")]
    Lookup(#[source] std::io::Error),
}

/// Decide who the agent runs as. `--user` wins, then `--allow-root`, then the sudo caller; a root caller with none of
/// them is refused. `SUDO_UID=0` (root ran sudo) counts as no sudo caller.
pub(super) fn choose(req: &Request<'_>) -> Result<RunAs, IdentityError> {
    if let Some(user) = req.user {
        let identity = match user.parse::<libc::uid_t>() {
            Ok(uid) => lookup_uid(uid)?,
            Err(_) => lookup_name(user)?,
        }
        .ok_or_else(|| IdentityError::NoSuchUser(user.to_string()))?;
        if identity.uid == 0 {
            return Err(IdentityError::UserIsRoot(user.to_string()));
        }
        return Ok(RunAs::User(identity));
    }
    if req.allow_root {
        return Ok(RunAs::Root);
    }
    if req.caller_uid != 0 {
        return Ok(RunAs::Caller);
    }
    let Some(sudo_uid) = req.sudo_uid else {
        return Err(IdentityError::RootRefused);
    };
    let uid = parse_id("SUDO_UID", sudo_uid)?;
    if uid == 0 {
        return Err(IdentityError::RootRefused);
    }
    let mut identity = lookup_uid(uid)?.ok_or(IdentityError::NoSudoUser(uid))?;
    if let Some(gid) = req.sudo_gid {
        let gid = parse_id("SUDO_GID", gid)?;
        if gid != identity.gid {
            identity.gid = gid;
            identity.groups = group_list(&identity.name, gid)?;
        }
    }
    Ok(RunAs::User(identity))
}

/// The person `enforcer exec` acts for, whoever the agent runs as: the user who ran `sudo` (`SUDO_UID`, with
/// `SUDO_GID` as the primary group) when sudo was run by someone other than root, else the caller itself.
pub(super) fn launching_user(req: &Request<'_>) -> Result<Identity, IdentityError> {
    let sudo = match req.sudo_uid {
        Some(uid) => Some(parse_id("SUDO_UID", uid)?).filter(|uid| *uid != 0),
        None => None,
    };
    let uid = sudo.unwrap_or(req.caller_uid);
    let mut identity = lookup_uid(uid)?.ok_or(IdentityError::NoSudoUser(uid))?;
    if let (Some(_), Some(gid)) = (sudo, req.sudo_gid) {
        let gid = parse_id("SUDO_GID", gid)?;
        if gid != identity.gid {
            identity.gid = gid;
            identity.groups = group_list(&identity.name, gid)?;
        }
    }
    Ok(identity)
}

/// The name of user `uid` in the user database (getpwuid_r(3)).
pub fn user_name(uid: libc::uid_t) -> Option<String> {
    lookup_uid(uid).ok().flatten().map(|i| i.name)
}

/// The name of group `gid` in the group database (getgrgid_r(3)); its number when it has none.
pub(super) fn group_name(gid: libc::gid_t) -> String {
    let mut buf: Vec<libc::c_char> = vec![0; 16 * 1024];
    // SAFETY: an all-zero group is a valid value of this plain C struct.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrgid_r writes only into `grp` and `buf` (whose length it is given) and sets `out`.
    let rc = unsafe { libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() || grp.gr_name.is_null() {
        return gid.to_string();
    }
    // SAFETY: on success gr_name points at a NUL-terminated string inside `buf`, alive here.
    unsafe { CStr::from_ptr(grp.gr_name) }
        .to_string_lossy()
        .into_owned()
}

fn parse_id(var: &'static str, value: &str) -> Result<u32, IdentityError> {
    value.trim().parse().map_err(|_| IdentityError::BadSudoId {
        var,
        value: value.to_string(),
    })
}

/// getpwnam_r(3).
fn lookup_name(name: &str) -> Result<Option<Identity>, IdentityError> {
    let Ok(cname) = CString::new(name) else {
        return Ok(None);
    };
    // SAFETY: getpwnam_r writes only into `pwd` and `buf` (whose length it is given) and sets `result`.
    passwd_lookup(|pwd, buf, len, result| unsafe {
        libc::getpwnam_r(cname.as_ptr(), pwd, buf, len, result)
    })
}

/// getpwuid_r(3).
fn lookup_uid(uid: libc::uid_t) -> Result<Option<Identity>, IdentityError> {
    // SAFETY: getpwuid_r writes only into `pwd` and `buf` (whose length it is given) and sets `result`.
    passwd_lookup(|pwd, buf, len, result| unsafe { libc::getpwuid_r(uid, pwd, buf, len, result) })
}

/// Run a reentrant passwd lookup (`call(pwd, buf, buflen, result)`), growing the buffer on ERANGE; `None` when
/// there is no such entry.
fn passwd_lookup(
    call: impl Fn(*mut libc::passwd, *mut libc::c_char, usize, *mut *mut libc::passwd) -> libc::c_int,
) -> Result<Option<Identity>, IdentityError> {
    let mut buf: Vec<libc::c_char> = vec![0; 1024];
    loop {
        // SAFETY: an all-zero passwd is a valid value of this plain C struct (null pointers, zero ids).
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = call(&mut pwd, buf.as_mut_ptr(), buf.len(), &mut result);
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        if rc != 0 {
            return Err(IdentityError::Lookup(std::io::Error::from_raw_os_error(rc)));
        }
        if result.is_null() {
            return Ok(None);
        }
        // SAFETY: on success pw_name and pw_dir point at NUL-terminated strings inside `buf`, alive here.
        let (name, home) = unsafe {
            (
                CStr::from_ptr(pwd.pw_name).to_string_lossy().into_owned(),
                PathBuf::from(OsStr::from_bytes(CStr::from_ptr(pwd.pw_dir).to_bytes())),
            )
        };
        let groups = group_list(&name, pwd.pw_gid)?;
        return Ok(Some(Identity {
            name,
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            groups,
            home,
        }));
    }
}

/// getgrouplist(3): every group `name` belongs to, `gid` first.
fn group_list(name: &str, gid: libc::gid_t) -> Result<Vec<libc::gid_t>, IdentityError> {
    let cname = CString::new(name).map_err(|e| IdentityError::Lookup(e.into()))?;
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut n = libc::c_int::try_from(groups.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: getgrouplist writes at most `n` entries into `groups` and stores the real count in `n`.
        let rc = unsafe { libc::getgrouplist(cname.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        let n = usize::try_from(n).unwrap_or(0);
        if rc >= 0 {
            groups.truncate(n);
            return Ok(groups);
        }
        if n <= groups.len() || n > 65_536 {
            return Err(IdentityError::Lookup(std::io::Error::other(
                "getgrouplist failed",
            )));
        }
        groups.resize(n, 0);
    }
}

/// One step of [`Switch::apply`], reported to the parent when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Step {
    JoinCgroup = 1,
    BoundingSet,
    AmbientSet,
    Groups,
    Gid,
    Uid,
    Capabilities,
    NoNewPrivs,
    Landlock,
    TrustFiles,
    SyscallFilter,
}

impl Step {
    const ALL: [Step; 11] = [
        Step::JoinCgroup,
        Step::BoundingSet,
        Step::AmbientSet,
        Step::Groups,
        Step::Gid,
        Step::Uid,
        Step::Capabilities,
        Step::NoNewPrivs,
        Step::Landlock,
        Step::TrustFiles,
        Step::SyscallFilter,
    ];

    fn from_byte(b: u8) -> Option<Step> {
        Step::ALL.into_iter().find(|s| *s as u8 == b)
    }

    /// What failed, for the error message.
    pub(super) fn describe(self) -> &'static str {
        match self {
            Step::JoinCgroup => "moving the agent into its cgroup",
            Step::BoundingSet => "emptying the capability bounding set",
            Step::AmbientSet => "clearing the ambient capabilities",
            Step::Groups => "setting the supplementary groups",
            Step::Gid => "setting the group id",
            Step::Uid => "setting the user id",
            Step::Capabilities => "clearing the capability sets",
            Step::NoNewPrivs => "setting no_new_privs",
            Step::Landlock => "entering the agent's Landlock domain",
            Step::TrustFiles => {
                "the agent's user cannot read the CA bundle or certificate (every directory above them must be \
                 searchable by it; the daemon makes its state directory 0711 and public/ 0755)"
            }
            Step::SyscallFilter => "installing the agent's system call filter",
        }
    }
}

/// Everything the child needs between fork and exec, prepared in the parent.
pub(super) struct Switch {
    /// `cgroup.procs` of the agent's cgroup, open for writing.
    procs: RawFd,
    /// The ids to switch to; `None` keeps the caller's (root with `--allow-root`, or a caller that is not root).
    ids: Option<(libc::uid_t, libc::gid_t, Vec<libc::gid_t>)>,
    /// Drop every capability and set no_new_privs (all but `--allow-root`).
    drop_privileges: bool,
    /// Highest capability number the kernel knows (`/proc/sys/kernel/cap_last_cap`).
    cap_last: libc::c_ulong,
    /// Files the agent must be able to read (checked with access(2) as the agent).
    trust_files: Vec<CString>,
    /// What keeps the agent from acting through processes outside its run.
    confine: Confinement,
    /// Write end of the pipe that tells the parent which step failed (close-on-exec).
    report: OwnedFd,
}

/// The read end of [`Switch`]'s report pipe.
pub(super) struct StepReport(OwnedFd);

impl StepReport {
    /// The step that failed in the child, if one did. Call after spawn returned (the child has exec'd or failed).
    pub(super) fn failed_step(&self) -> Option<Step> {
        let mut byte = 0u8;
        // SAFETY: reads at most one byte into a local; the fd is ours and open.
        let n = unsafe { libc::read(self.0.as_raw_fd(), (&mut byte as *mut u8).cast(), 1) };
        if n == 1 {
            Step::from_byte(byte)
        } else {
            None
        }
    }
}

impl Switch {
    /// Prepare the switch to `run_as` for a child joining the cgroup whose `cgroup.procs` is open as `procs`.
    pub(super) fn new(
        run_as: &RunAs,
        procs: RawFd,
        trust_files: &[&Path],
        confine: Confinement,
    ) -> std::io::Result<(Switch, StepReport)> {
        let (read, write) = super::cloexec_pipe(true)?;
        let (read, write) = (OwnedFd::from(read), OwnedFd::from(write));
        let cap_last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(63);
        let ids = match run_as {
            RunAs::User(id) => Some((id.uid, id.gid, id.groups.clone())),
            RunAs::Caller | RunAs::Root => None,
        };
        let trust_files = trust_files
            .iter()
            .filter_map(|p| CString::new(p.as_os_str().as_bytes()).ok())
            .collect();
        Ok((
            Switch {
                procs,
                ids,
                drop_privileges: *run_as != RunAs::Root,
                cap_last,
                trust_files,
                confine,
                report: write,
            },
            StepReport(read),
        ))
    }

    /// In the child, between fork and exec: join the cgroup (while still root), empty the bounding and ambient sets
    /// (needs CAP_SETPCAP, so before the uid changes), set groups, gid and uid (all three of each: real, effective,
    /// saved), clear the remaining capability sets, set no_new_privs, enter the Landlock domain, check that the agent
    /// can read the trust files, and install the system call filter. On failure the step is written to the report
    /// pipe and the error returned (spawn fails with it).
    ///
    /// Only async-signal-safe system calls on memory prepared by [`Switch::new`]; nothing is allocated.
    pub(super) fn apply(&self) -> std::io::Result<()> {
        let fail = |step: Step| -> std::io::Error {
            let err = std::io::Error::last_os_error();
            let byte = step as u8;
            // SAFETY: write(2) of one byte from a local to the pipe we own.
            unsafe {
                libc::write(self.report.as_raw_fd(), (&byte as *const u8).cast(), 1);
            }
            err
        };
        // SAFETY (all calls below): plain system calls with constant arguments or pointers into `self`, which lives
        // until exec; none of them touches memory the parent's other threads could hold.
        unsafe {
            let buf = b"0";
            if libc::write(self.procs, buf.as_ptr().cast(), buf.len()) != 1 {
                return Err(fail(Step::JoinCgroup));
            }
            if self.drop_privileges {
                if libc::geteuid() == 0 {
                    for cap in 0..=self.cap_last {
                        if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && !einval() {
                            return Err(fail(Step::BoundingSet));
                        }
                    }
                }
                let clear_all = libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong;
                // EINVAL: a kernel without ambient capabilities (before 4.3) has none to clear.
                if libc::prctl(libc::PR_CAP_AMBIENT, clear_all, 0, 0, 0) != 0 && !einval() {
                    return Err(fail(Step::AmbientSet));
                }
            }
            if let Some((uid, gid, groups)) = &self.ids {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
                    return Err(fail(Step::Groups));
                }
                if libc::setresgid(*gid, *gid, *gid) != 0 {
                    return Err(fail(Step::Gid));
                }
                if libc::setresuid(*uid, *uid, *uid) != 0 {
                    return Err(fail(Step::Uid));
                }
            }
            if self.drop_privileges {
                let mut header = CapHeader {
                    version: LINUX_CAPABILITY_VERSION_3,
                    pid: 0,
                };
                let data = [CapData::default(); 2];
                if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) != 0 {
                    return Err(fail(Step::Capabilities));
                }
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(fail(Step::NoNewPrivs));
                }
            }
            if self.confine.enter_landlock_domain().is_err() {
                return Err(fail(Step::Landlock));
            }
            for file in &self.trust_files {
                if libc::access(file.as_ptr(), libc::R_OK) != 0 {
                    return Err(fail(Step::TrustFiles));
                }
            }
            if self.confine.install_filter().is_err() {
                return Err(fail(Step::SyscallFilter));
            }
        }
        Ok(())
    }
}

/// The last system call failed with EINVAL (reading errno allocates nothing).
fn einval() -> bool {
    std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL)
}

/// `_LINUX_CAPABILITY_VERSION_3` (linux/capability.h): 64-bit sets in two 32-bit halves.
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// `struct __user_cap_header_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_request() -> Request<'static> {
        Request {
            caller_uid: 0,
            ..Request::default()
        }
    }

    #[test]
    fn a_root_caller_without_a_user_is_refused_and_told_what_to_pass() {
        let err = choose(&root_request()).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, IdentityError::RootRefused));
        for hint in ["sudo enforcer exec", "--user NAME", "--allow-root"] {
            assert!(text.contains(hint), "{text}");
        }
        // sudo run by root itself is no user either.
        let req = Request {
            sudo_uid: Some("0"),
            ..root_request()
        };
        assert!(matches!(choose(&req), Err(IdentityError::RootRefused)));
    }

    #[test]
    fn user_then_allow_root_then_sudo() {
        // uid 0 resolves to root in every user database: refused as --user.
        let req = Request {
            user: Some("0"),
            ..root_request()
        };
        assert!(matches!(choose(&req), Err(IdentityError::UserIsRoot(_))));
        let req = Request {
            allow_root: true,
            sudo_uid: Some("65534"),
            ..root_request()
        };
        assert_eq!(choose(&req).unwrap(), RunAs::Root);
        let req = Request {
            user: Some("no-such-user-for-enforcer-tests"),
            ..root_request()
        };
        assert!(matches!(choose(&req), Err(IdentityError::NoSuchUser(_))));
        let req = Request {
            sudo_uid: Some("x"),
            ..root_request()
        };
        assert!(matches!(choose(&req), Err(IdentityError::BadSudoId { .. })));
        let req = Request {
            caller_uid: 1000,
            ..Request::default()
        };
        assert_eq!(choose(&req).unwrap(), RunAs::Caller);
    }

    #[test]
    fn sudo_uid_names_the_user_and_sudo_gid_its_group() {
        // nobody (65534) exists on Debian and most distributions.
        let Some(nobody) = lookup_uid(65534).unwrap() else {
            return;
        };
        let req = Request {
            sudo_uid: Some("65534"),
            sudo_gid: Some("65534"),
            ..root_request()
        };
        let RunAs::User(id) = choose(&req).unwrap() else {
            panic!("not a user");
        };
        assert_eq!(
            (id.uid, id.gid, id.name.as_str()),
            (65534, 65534, nobody.name.as_str())
        );
        assert_eq!(id.groups.first(), Some(&65534));
        assert_eq!(lookup_name(&nobody.name).unwrap().unwrap().uid, 65534);
    }
}
