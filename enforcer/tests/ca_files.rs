//! The CA's files on disk: agents (any user) read the published certificate and bundle; only the daemon's user
//! reads the key. The modes hold whatever the process umask (changed here, in a test binary of its own, since the
//! umask is process-wide), and a CA directory an older install left open is narrowed again.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use enforcer::proxy::CertAuthority;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn key_stays_private_and_published_files_are_world_readable() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = dir.path().join("ca");
    // SAFETY: umask(2) has no memory-safety preconditions; a wide-open umask shows the modes are explicit.
    let old = unsafe { libc::umask(0o000) };
    let ca = CertAuthority::load_or_create(&ca_dir).unwrap();
    let public = ca.write_public(&dir.path().join("public")).unwrap();
    // SAFETY: as above; and a umask that hides everything from others.
    unsafe { libc::umask(0o077) };
    let again = ca.write_public(&dir.path().join("public")).unwrap();
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    assert_eq!(mode(&ca_dir), 0o700);
    assert_eq!(mode(&ca_dir.join("ca.key")), 0o600);
    assert_eq!(mode(&again.bundle), 0o644);
    assert_eq!(mode(&again.ca_cert), 0o644);
    assert_eq!(mode(public.bundle.parent().unwrap()), 0o755);

    set_mode(&ca_dir, 0o755);
    set_mode(&ca_dir.join("ca.key"), 0o644);
    CertAuthority::load_or_create(&ca_dir).unwrap();
    assert_eq!(mode(&ca_dir), 0o700);
    assert_eq!(mode(&ca_dir.join("ca.key")), 0o600);
}
