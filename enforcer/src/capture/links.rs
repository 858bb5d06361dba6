//! Fail closed: every attached program's link is pinned as `<pin_dir>/link_<program>`, so the programs stay attached
//! when the daemon dies (crash, SIGKILL, OOM). Tagged agents then still have their connects redirected, to a port
//! nobody listens on: refused, never direct. A daemon that stops while agents still run in tagged cgroups leaves the
//! links pinned for the same reason; one that stops with no agent left removes them (nothing stays attached).
//!
//! The next daemon takes the links it finds pinned over ([`Earlier`]): each is made to run the new daemon's program
//! of the same name in one step (`BPF_LINK_UPDATE`), so no attach point is ever without a program while daemons
//! change (before, the old links were removed and the new programs attached after: for some hundred milliseconds a
//! tagged process could send datagrams anywhere and bind the daemon's ports). Only programs without an earlier link
//! are attached anew, and earlier links no program took over are removed last.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, LinkError};

use super::CaptureError;

/// The bpf(2) commands used here, as numbered in `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// The attribute of `BPF_OBJ_PIN` and `BPF_OBJ_GET` (`union bpf_attr`, the `pathname` member group).
#[repr(C)]
struct ObjAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    pad: u32,
    rest: [u64; 8],
}

impl ObjAttr {
    /// For the path `c_path` (which must outlive the call) and, to pin, the object `bpf_fd`.
    fn new(c_path: &std::ffi::CStr, bpf_fd: u32) -> ObjAttr {
        ObjAttr {
            pathname: c_path.as_ptr() as u64,
            bpf_fd,
            file_flags: 0,
            path_fd: 0,
            pad: 0,
            rest: [0; 8],
        }
    }
}

/// Pin files are named after this prefix and the program's function name.
const LINK_PREFIX: &str = "link_";
/// Upper bound on cgroup directories visited when looking for agents in tagged cgroups.
const WALK_LIMIT: usize = 4096;

/// Pin an attached program's link in `pin_dir`, named after the program.
pub(super) fn pin(
    link: impl TryInto<FdLink, Error = LinkError>,
    pin_dir: &Path,
    name: &'static str,
) -> Result<(), CaptureError> {
    pin_named(link, pin_dir, name, name)
}

/// Pin a link of program `name` as `link_<pin>` (one program attached at several places has one pin per place).
pub(super) fn pin_named(
    link: impl TryInto<FdLink, Error = LinkError>,
    pin_dir: &Path,
    name: &'static str,
    pin: &str,
) -> Result<(), CaptureError> {
    let fd: FdLink = link
        .try_into()
        .map_err(|source| CaptureError::Link { name, source })?;
    pin_fd(fd, pin_dir, pin)
}

/// Pin a link that is an fd link already, as `link_<pin>` (replacing a stale pin of that name).
pub(super) fn pin_fd(fd: FdLink, pin_dir: &Path, pin: &str) -> Result<(), CaptureError> {
    let path = pin_dir.join(format!("{LINK_PREFIX}{pin}"));
    if path.exists() {
        std::fs::remove_file(&path).map_err(|source| CaptureError::PinDir {
            path: path.clone(),
            source,
        })?;
    }
    // The returned handle is dropped: the pin alone keeps the link, and the program, attached.
    fd.pin(path)?;
    Ok(())
}

/// Attach program `prog` (named `name`) to `cgroup` as `attach_type` with `BPF_LINK_CREATE`, and pin the link as
/// `link_<name>`. For program types whose aya link cannot be turned into an fd link (aya 0.14's cgroup sockopt
/// links); the kernel interface is bpf(2)'s `BPF_LINK_CREATE` and `BPF_OBJ_PIN`.
pub(super) fn create_and_pin(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
    pin_dir: &Path,
    name: &'static str,
) -> Result<(), CaptureError> {
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        rest: [u64; 8],
    }
    let syscall_error = |call| CaptureError::Link {
        name,
        source: LinkError::SyscallError(aya::sys::SyscallError {
            call,
            io_error: std::io::Error::last_os_error(),
        }),
    };
    let create = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        flags: 0,
        rest: [0; 8],
    };
    let link = bpf(BPF_LINK_CREATE, &create);
    if link < 0 {
        return Err(syscall_error("bpf_link_create"));
    }
    // SAFETY: a fresh fd the kernel just returned, owned by nobody else.
    let link = unsafe { OwnedFd::from_raw_fd(link as RawFd) };
    let path = pin_dir.join(format!("{LINK_PREFIX}{name}"));
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| CaptureError::NotBpffs(path.clone()))?;
    let pin = ObjAttr::new(&c_path, link.as_raw_fd() as u32);
    // The path outlives the call.
    if bpf(BPF_OBJ_PIN, &pin) < 0 {
        return Err(syscall_error("bpf_obj_pin"));
    }
    // Our fd closes here; the pin keeps the link, and the program, attached.
    Ok(())
}

/// The links an earlier daemon left pinned in a pin directory, as this daemon starts.
pub(super) struct Earlier {
    pins: Vec<PathBuf>,
    taken: std::collections::HashSet<PathBuf>,
}

impl Earlier {
    /// The link pins in `pin_dir` now.
    pub(super) fn find(pin_dir: &Path) -> Earlier {
        Earlier {
            pins: pins(pin_dir),
            taken: Default::default(),
        }
    }

    /// None (links attached after start-up, such as new devices', have no earlier ones).
    pub(super) fn none() -> Earlier {
        Earlier {
            pins: Vec::new(),
            taken: Default::default(),
        }
    }

    /// How many earlier links there are.
    pub(super) fn len(&self) -> usize {
        self.pins.len()
    }

    /// Make the earlier link pinned as `link_<pin>` run `prog` from now on (`BPF_LINK_UPDATE`, bpf(2): the attach
    /// point goes from the old program to the new one at once). `false` when there is no such link, or it cannot
    /// take the program (another program type or hook): then the caller attaches the program anew.
    pub(super) fn take_over(&mut self, pin_dir: &Path, pin: &str, prog: BorrowedFd<'_>) -> bool {
        let path = pin_dir.join(format!("{LINK_PREFIX}{pin}"));
        if !self.pins.contains(&path) || self.taken.contains(&path) {
            return false;
        }
        let Some(link) = obj_get(&path) else {
            return false;
        };
        #[repr(C)]
        struct LinkUpdate {
            link_fd: u32,
            new_prog_fd: u32,
            flags: u32,
            old_prog_fd: u32,
            rest: [u64; 8],
        }
        let update = LinkUpdate {
            link_fd: link.as_raw_fd() as u32,
            new_prog_fd: prog.as_raw_fd() as u32,
            flags: 0,
            old_prog_fd: 0,
            rest: [0; 8],
        };
        if bpf(BPF_LINK_UPDATE, &update) < 0 {
            tracing::debug!(pin, error = %std::io::Error::last_os_error(),
                "an earlier link cannot take the new program: attaching it anew");
            return false;
        }
        self.taken.insert(path);
        true
    }

    /// Remove the earlier links no program took over (a link nothing else holds is detached at once); how many.
    pub(super) fn release_rest(self) -> Result<usize, CaptureError> {
        let mut released = 0;
        for path in self.pins.iter().filter(|p| !self.taken.contains(*p)) {
            match std::fs::remove_file(path) {
                Ok(()) => released += 1,
                // Replaced meanwhile by a new pin of the same name (a program attached anew): that one stays.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(CaptureError::PinDir {
                        path: path.clone(),
                        source,
                    })
                }
            }
        }
        Ok(released)
    }
}

/// The object pinned at `path` (`BPF_OBJ_GET`), read-write.
fn obj_get(path: &Path) -> Option<OwnedFd> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let get = ObjAttr::new(&c_path, 0);
    let fd = bpf(BPF_OBJ_GET, &get);
    // SAFETY: a fresh fd the kernel just returned, owned by nobody else.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// bpf(2) with command `cmd` and attribute `attr` (a `#[repr(C)]` struct, zero-padded to the command's size).
fn bpf<T>(cmd: libc::c_long, attr: &T) -> libc::c_long {
    // SAFETY: the kernel reads `size_of::<T>()` bytes of an attribute we own and keep alive for the call; pointers
    // inside it are the caller's, valid for the call. It returns a new fd, 0, or -1 with errno set.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>(),
        )
    }
}

/// The link pins in `pin_dir`.
fn pins(pin_dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(pin_dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(LINK_PREFIX))
        .map(|e| e.path())
        .collect()
}

/// Remove every link pin in `pin_dir`: a link nothing else holds is detached at once. Returns how many there were.
pub(super) fn unpin_all(pin_dir: &Path) -> Result<usize, CaptureError> {
    let pins = pins(pin_dir);
    for path in &pins {
        std::fs::remove_file(path).map_err(|source| CaptureError::PinDir {
            path: path.clone(),
            source,
        })?;
    }
    Ok(pins.len())
}

/// How many processes live in cgroups under `root` that are tagged (`tagged` holds cgroup ids) or lie below a
/// tagged cgroup. Bounded walk; unreadable directories count as empty.
pub(super) fn agents_in_tagged_cgroups(root: &Path, tagged: &[u64]) -> usize {
    let mut processes = 0;
    let mut queue = vec![(root.to_path_buf(), false)];
    let mut visited = 0;
    while let Some((dir, inherited)) = queue.pop() {
        visited += 1;
        if visited > WALK_LIMIT {
            break;
        }
        let is_tagged =
            inherited || std::fs::metadata(&dir).is_ok_and(|m| tagged.contains(&m.ino()));
        if is_tagged {
            processes += std::fs::read_to_string(dir.join("cgroup.procs"))
                .map(|procs| procs.lines().filter(|l| !l.trim().is_empty()).count())
                .unwrap_or(0);
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            queue.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| (e.path(), is_tagged)),
            );
        }
    }
    processes
}
