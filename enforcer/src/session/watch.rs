//! Sessions end when their cgroup empties: a thread watches each live session's `cgroup.events` with inotify
//! (`IN_MODIFY`: the kernel notifies a change of `populated`, cgroup-v2.rst "cgroup.events") and checks every
//! session when one changes, and every [`SWEEP`] in any case. A session ends when its cgroup reports `populated 0`
//! after having had a process, when the cgroup is gone, or when an exec cgroup never got its process within
//! [`NEVER_STARTED`].

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use inotify::{Inotify, WatchDescriptor, WatchMask};

use super::Sessions;

/// Every session is checked at least this often.
const SWEEP: Duration = Duration::from_secs(2);
/// An exec session whose cgroup never had a process is dropped after this long.
const NEVER_STARTED: Duration = Duration::from_secs(60);
const POLL_MS: i32 = 500;

/// The watching thread; dropping it stops the thread.
pub struct SessionWatch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for SessionWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Watch the sessions of `sessions` (cgroup paths relative to `cgroup_root`) and end each as its cgroup empties.
pub fn watch(sessions: Arc<Sessions>, cgroup_root: &Path) -> std::io::Result<SessionWatch> {
    let inotify = Inotify::init()?;
    let stop = Arc::new(AtomicBool::new(false));
    let root = cgroup_root.to_path_buf();
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("session-watch".into())
            .spawn(move || run(&sessions, &root, inotify, &stop))?
    };
    Ok(SessionWatch {
        stop,
        thread: Some(thread),
    })
}

fn run(sessions: &Sessions, root: &Path, mut inotify: Inotify, stop: &AtomicBool) {
    let mut watched: HashMap<String, WatchDescriptor> = HashMap::new();
    let mut buffer = vec![0u8; 4096];
    let mut last_sweep = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: inotify.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own, for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
        let changed = match inotify.read_events(&mut buffer) {
            Ok(events) => events.count() > 0,
            Err(_) => false,
        };
        if !changed && last_sweep.elapsed() < SWEEP {
            continue;
        }
        last_sweep = Instant::now();
        for (cgroup, populated_before, age) in sessions.cgroups() {
            let events = events_path(root, &cgroup);
            if !watched.contains_key(&cgroup) {
                if let Ok(wd) = inotify.watches().add(&events, WatchMask::MODIFY) {
                    watched.insert(cgroup.clone(), wd);
                }
            }
            let ended = match populated(&events) {
                None => true,
                Some(true) => {
                    sessions.mark_populated(&cgroup);
                    false
                }
                Some(false) => populated_before || age > NEVER_STARTED,
            };
            if ended {
                sessions.end(&cgroup);
                if let Some(wd) = watched.remove(&cgroup) {
                    let _ = inotify.watches().remove(wd);
                }
            }
        }
        let live: Vec<String> = sessions.cgroups().into_iter().map(|(c, ..)| c).collect();
        watched.retain(|c, _| live.contains(c));
    }
}

fn events_path(root: &Path, cgroup: &str) -> PathBuf {
    root.join(cgroup.trim_start_matches('/'))
        .join("cgroup.events")
}

/// `populated` from a `cgroup.events` file; `None` when the cgroup is gone.
fn populated(events: &Path) -> Option<bool> {
    let text = std::fs::read_to_string(events).ok()?;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix("populated "))
        .map(str::trim);
    Some(value == Some("1"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn populated_is_read_from_cgroup_events() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("cgroup.events");
        std::fs::write(&f, "populated 1\nfrozen 0\n").unwrap();
        assert_eq!(populated(&f), Some(true));
        std::fs::write(&f, "populated 0\nfrozen 0\n").unwrap();
        assert_eq!(populated(&f), Some(false));
        assert_eq!(populated(&dir.path().join("gone")), None);
    }
}
