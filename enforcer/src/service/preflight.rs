//! Setup checks run before the capture starts, so a host that is not ready gets an error naming the setting, the
//! missing thing and the fix, instead of the first system call's errno on some derived path.

use std::path::{Path, PathBuf};

/// `statfs(2)` `f_type` of cgroup v2 (`CGROUP2_SUPER_MAGIC`, linux/magic.h).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// `f_type` of cgroup v1 (`CGROUP_SUPER_MAGIC`).
const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
/// `f_type` of bpffs (`BPF_FS_MAGIC`).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where the capture mounts bpffs itself when nothing is mounted there.
const BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cgroup_root {}: does not exist; mount cgroup v2 there (mount -t cgroup2 none {}) or set cgroup_root to the cgroup2 mount listed in /proc/mounts", .0.display(), .0.display())]
    CgroupRootMissing(PathBuf),
    #[error("cgroup_root {}: {found}, not a cgroup v2 mount; set cgroup_root to the cgroup2 mount listed in /proc/mounts (mount -t cgroup2 none DIR if there is none)", path.display())]
    NotCgroup2 { path: PathBuf, found: &'static str },
    #[error("capture.cgroup {setting:?}: the cgroup {} does not exist and could not be created: {source}", path.display())]
    AttachCgroup {
        setting: PathBuf,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("capture.pin_dir {}: {} is not a bpf filesystem; mount one there (mount -t bpf bpf {1}) or put capture.pin_dir under /sys/fs/bpf", path.display(), mount.display())]
    PinDirNotBpffs { path: PathBuf, mount: PathBuf },
}

/// Check the cgroup2 mount and the pin directory's filesystem, and create the attach cgroup when it is missing
/// (returns it when created, for the log).
pub fn check_capture(config: &crate::config::Config) -> Result<Option<PathBuf>, SetupError> {
    check_cgroup2(&config.cgroup_root)?;
    check_pin_dir(&config.capture.pin_dir)?;
    ensure_attach_cgroup(&config.cgroup_root, &config.capture.cgroup)
}

fn check_cgroup2(root: &Path) -> Result<(), SetupError> {
    match fs_magic(root) {
        Err(_) => Err(SetupError::CgroupRootMissing(root.to_path_buf())),
        Ok(CGROUP2_SUPER_MAGIC) => Ok(()),
        Ok(CGROUP_SUPER_MAGIC) => Err(SetupError::NotCgroup2 {
            path: root.to_path_buf(),
            found: "a cgroup v1 hierarchy",
        }),
        Ok(_) => Err(SetupError::NotCgroup2 {
            path: root.to_path_buf(),
            found: "an ordinary directory",
        }),
    }
}

/// The attach cgroup (`cgroup_root/setting`), created with its parents when missing.
fn ensure_attach_cgroup(root: &Path, setting: &Path) -> Result<Option<PathBuf>, SetupError> {
    let path = root.join(setting);
    if path.is_dir() {
        return Ok(None);
    }
    std::fs::create_dir_all(&path).map_err(|source| SetupError::AttachCgroup {
        setting: setting.to_path_buf(),
        path: path.clone(),
        source,
    })?;
    Ok(Some(path))
}

/// A pin directory outside /sys/fs/bpf must lie on a bpffs already (the capture mounts only /sys/fs/bpf itself).
fn check_pin_dir(pin_dir: &Path) -> Result<(), SetupError> {
    if pin_dir.starts_with(BPFFS) {
        return Ok(());
    }
    let mut mount = pin_dir;
    while !mount.exists() {
        match mount.parent() {
            Some(parent) => mount = parent,
            None => break,
        }
    }
    if fs_magic(mount).is_ok_and(|m| m == BPF_FS_MAGIC) {
        Ok(())
    } else {
        Err(SetupError::PinDirNotBpffs {
            path: pin_dir.to_path_buf(),
            mount: mount.to_path_buf(),
        })
    }
}

/// Whether `path` is a cgroup v2 mount.
pub fn is_cgroup2(path: &Path) -> bool {
    fs_magic(path).is_ok_and(|m| m == CGROUP2_SUPER_MAGIC)
}

/// The filesystem type (`f_type`) of `path`.
fn fs_magic(path: &Path) -> std::io::Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is a valid C string.
    unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        if libc::statfs(c_path.as_ptr(), &mut buf) == 0 {
            Ok(buf.f_type as i64)
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

/// A listener's bind error, naming the setting and, for the common cases, the fix.
pub fn bind_error(setting: &str, addr: std::net::SocketAddr, err: std::io::Error) -> anyhow::Error {
    let hint = match err.kind() {
        std::io::ErrorKind::AddrInUse => {
            format!("; another process listens there (another enforcer? `ss -lntup | grep :{}`), or choose another port for {setting}", addr.port())
        }
        std::io::ErrorKind::PermissionDenied => format!(
            "; ports below 1024 need CAP_NET_BIND_SERVICE, or choose another port for {setting}"
        ),
        _ => String::new(),
    };
    anyhow::anyhow!("{setting}: cannot listen on {addr}: {err}{hint}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ordinary_directory_is_not_a_cgroup2_mount() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_cgroup2(dir.path()).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "cgroup_root {}: an ordinary directory",
                dir.path().display()
            )),
            "{err}"
        );
        let missing = dir.path().join("nope");
        let err = check_cgroup2(&missing).unwrap_err().to_string();
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn a_missing_attach_cgroup_is_created_or_named() {
        let dir = tempfile::tempdir().unwrap();
        let made = ensure_attach_cgroup(dir.path(), Path::new("agents/ci")).unwrap();
        assert_eq!(made, Some(dir.path().join("agents/ci")));
        assert_eq!(
            ensure_attach_cgroup(dir.path(), Path::new("agents/ci")).unwrap(),
            None
        );
        std::fs::write(dir.path().join("file"), "").unwrap();
        let err = ensure_attach_cgroup(dir.path(), Path::new("file/x"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "capture.cgroup \"file/x\": the cgroup {}/file/x does not exist",
                dir.path().display()
            )),
            "{err}"
        );
    }

    #[test]
    fn a_pin_dir_outside_bpffs_is_named_with_its_mount() {
        let dir = tempfile::tempdir().unwrap();
        let pin = dir.path().join("a/b");
        let err = check_pin_dir(&pin).unwrap_err().to_string();
        assert!(
            err.contains(&format!("{} is not a bpf filesystem", dir.path().display())),
            "{err}"
        );
        assert!(check_pin_dir(Path::new("/sys/fs/bpf/enforcer")).is_ok());
    }

    #[test]
    fn a_port_in_use_names_the_setting() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let err = std::net::TcpListener::bind(addr).unwrap_err();
        let msg = bind_error("proxy.port", addr, err).to_string();
        assert!(
            msg.starts_with(&format!("proxy.port: cannot listen on {addr}: ")),
            "{msg}"
        );
        assert!(msg.contains("another process listens there"), "{msg}");
    }
}
