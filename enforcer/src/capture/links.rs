//! Fail closed: every attached program's link is pinned as `<pin_dir>/link_<program>`, so the programs stay attached
//! when the daemon dies (crash, SIGKILL, OOM). Tagged agents then still have their connects redirected, to a port
//! nobody listens on: refused, never direct. A daemon that stops while agents still run in tagged cgroups leaves the
//! links pinned for the same reason; one that stops with no agent left removes them (nothing stays attached). The
//! next daemon replaces links it finds pinned before attaching its own.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, LinkError};

use super::CaptureError;

/// Pin files are named after this prefix and the program's function name.
const LINK_PREFIX: &str = "link_";
/// Upper bound on cgroup directories visited when looking for agents in tagged cgroups.
const WALK_LIMIT: usize = 4096;

/// Pin an attached program's link in `pin_dir`.
pub(super) fn pin(
    link: impl TryInto<FdLink, Error = LinkError>,
    pin_dir: &Path,
    name: &'static str,
) -> Result<(), CaptureError> {
    let fd: FdLink = link
        .try_into()
        .map_err(|source| CaptureError::Link { name, source })?;
    pin_fd(fd, pin_dir, name)
}

/// Pin a link that is an fd link already.
pub(super) fn pin_fd(fd: FdLink, pin_dir: &Path, name: &'static str) -> Result<(), CaptureError> {
    // The returned handle is dropped: the pin alone keeps the link, and the program, attached.
    fd.pin(pin_dir.join(format!("{LINK_PREFIX}{name}")))?;
    Ok(())
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
