//! The service manager notification protocol (sd_notify(3)): newline-separated `KEY=VALUE` assignments in one
//! datagram to the `AF_UNIX` socket named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
//! A few lines of a datagram send; no crate needed (the `sd-notify` crate does the same, and we also need the
//! watchdog's interval and the `WATCHDOG_PID` check, which are as short). Without `NOTIFY_SOCKET` every call is a
//! no-op, so the daemon runs the same outside systemd.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Sends state changes to the service manager.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` (sd_watchdog_enabled(3): the watchdog applies only
    /// when `WATCHDOG_PID` is unset or names this process).
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let addr = socket_addr(path.as_encoded_bytes())?;
            let sock = UnixDatagram::unbound().ok()?;
            Some((sock, addr))
        });
        let for_us = std::env::var("WATCHDOG_PID")
            .map_or(true, |pid| pid.trim() == std::process::id().to_string());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .filter(|usec| *usec > 0 && for_us)
            .map(Duration::from_micros);
        Notifier { target, watchdog }
    }

    /// How often to send `WATCHDOG=1`: half the manager's `WatchdogSec=` (as sd_watchdog_enabled(3) advises), or
    /// `None` when no watchdog is configured.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    /// Send `state` (assignments separated by `\n`). Best effort: a manager that went away is not our failure.
    pub fn send(&self, state: &str) {
        if let Some((sock, addr)) = &self.target {
            if let Err(e) = sock.send_to_addr(state.as_bytes(), addr) {
                tracing::debug!(error = %e, "sd_notify send failed");
            }
        }
    }

    /// Startup finished: `READY=1` with a status line.
    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// A free-form status line (`systemctl status` shows it).
    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={}", one_line(status)));
    }

    /// A reload starts: `RELOADING=1` with `MONOTONIC_USEC` (which systemd ≥ 253 requires to match it with the
    /// reload request). Follow with [`Notifier::ready`] when it ends, whatever its result.
    pub fn reloading(&self) {
        self.send(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading the policy",
            monotonic_usec()
        ));
    }

    /// Shutdown starts.
    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping");
    }

    /// The daemon is healthy: keep the watchdog from firing.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }
}

/// `NOTIFY_SOCKET` as an address: an absolute path, or `@name` for the abstract namespace.
fn socket_addr(value: &[u8]) -> Option<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    match value.split_first()? {
        (b'@', name) => SocketAddr::from_abstract_name(name).ok(),
        (b'/', _) => SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(value)).ok(),
        _ => None,
    }
}

/// Status text must stay on one line: a newline would start a new assignment.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// CLOCK_MONOTONIC in microseconds.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receiver() -> (tempfile::TempDir, UnixDatagram, Notifier) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let notifier = Notifier {
            target: Some((
                UnixDatagram::unbound().unwrap(),
                socket_addr(path.as_os_str().as_encoded_bytes()).unwrap(),
            )),
            watchdog: Some(Duration::from_secs(10)),
        };
        (dir, sock, notifier)
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn states_arrive_as_datagrams() {
        let (_dir, sock, n) = receiver();
        n.ready("enforcing\npolicy abc");
        assert_eq!(recv(&sock), "READY=1\nSTATUS=enforcing policy abc");
        n.reloading();
        let msg = recv(&sock);
        assert!(msg.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{msg}");
        n.watchdog();
        assert_eq!(recv(&sock), "WATCHDOG=1");
        n.stopping();
        assert_eq!(recv(&sock), "STOPPING=1\nSTATUS=stopping");
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(5)));
    }

    #[test]
    fn socket_addresses_are_paths_or_abstract_names() {
        use std::os::linux::net::SocketAddrExt;
        let abs = socket_addr(b"@/org/freedesktop/systemd1/notify").unwrap();
        assert_eq!(
            abs.as_abstract_name(),
            Some(&b"/org/freedesktop/systemd1/notify"[..])
        );
        assert!(socket_addr(b"/run/systemd/notify")
            .unwrap()
            .as_pathname()
            .is_some());
        assert!(socket_addr(b"relative").is_none());
        assert!(socket_addr(b"").is_none());
    }

    #[test]
    fn without_a_manager_nothing_is_sent() {
        let n = Notifier {
            target: None,
            watchdog: None,
        };
        assert!(n.target.is_none());
        n.ready("x");
        assert_eq!(n.watchdog_interval(), None);
    }
}
