//! Sessions end when their cgroup empties: a thread watches each live session's `cgroup.events` with inotify
//! (`IN_MODIFY`: the kernel notifies a change of `populated`, cgroup-v2.rst "cgroup.events") and checks every
//! session when one changes, and every [`SWEEP`] in any case. A session ends when its cgroup reports `populated 0`
//! after having had a process, when the cgroup is gone, or when an exec cgroup never got its process within
//! [`NEVER_STARTED`], or as soon as the `enforcer exec` that registered it has exited (the run ends with it).
//!
//! `enforcer exec` removes its run's cgroup once the run ends; killed (SIGKILL, which also ends its run), it cannot.
//! So when the session of an exec cgroup ends, the watcher keeps the pidfd of the `exec` that registered it, and once
//! that process has exited (its pidfd is readable, pidfd_open(2)), removes the cgroup if it is still there: rmdir(2)
//! removes only a cgroup with no process and no child cgroup, and one still emptying is tried again until
//! [`LEFTOVER_GRACE`] has passed.
//!
//! An `exec` killed after creating its run's cgroup and before registering the run, or while the daemon was down,
//! leaves a cgroup no session knows. Every [`SWEEP`] the watcher also lists the exec cgroups under each profile's
//! cgroup (`exec-PID`, `exec-PID-N`, named after the `exec` that made them: `capture::cli`) and removes one that no
//! live session has once the process its name carries has been gone for [`ABANDONED_AFTER`].

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
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
/// How long the watcher goes on trying to remove an exec cgroup whose `exec` is gone but which is not empty yet.
const LEFTOVER_GRACE: Duration = Duration::from_secs(60);
/// How long an exec cgroup that no live session has, and whose `exec` is gone, is left before the watcher removes it:
/// longer than `exec` waits for its registration, so that a cgroup is never taken from a run about to register (its
/// `exec` in a PID namespace of its own, where the pid its cgroup's name carries means nothing here).
const ABANDONED_AFTER: Duration = Duration::from_secs(60);

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

/// Watch the sessions of `sessions` (cgroup paths relative to `cgroup_root`) and end each as its cgroup empties;
/// remove the abandoned exec cgroups under `exec_parents` (the profiles' cgroups, absolute paths).
pub fn watch(
    sessions: Arc<Sessions>,
    cgroup_root: &Path,
    exec_parents: Vec<PathBuf>,
) -> std::io::Result<SessionWatch> {
    let inotify = Inotify::init()?;
    let stop = Arc::new(AtomicBool::new(false));
    let root = cgroup_root.to_path_buf();
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("session-watch".into())
            .spawn(move || run(&sessions, &root, &exec_parents, inotify, &stop))?
    };
    Ok(SessionWatch {
        stop,
        thread: Some(thread),
    })
}

fn run(
    sessions: &Sessions,
    root: &Path,
    exec_parents: &[PathBuf],
    mut inotify: Inotify,
    stop: &AtomicBool,
) {
    let mut watched: HashMap<String, WatchDescriptor> = HashMap::new();
    let mut buffer = vec![0u8; 4096];
    let mut last_sweep = Instant::now();
    let mut leftovers: Vec<Leftover> = Vec::new();
    let mut abandoned = Abandoned::default();
    while !stop.load(Ordering::SeqCst) {
        leftovers.retain_mut(|l| l.pending(root, sessions));
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
        for (cgroup, populated_before, age, exec_gone) in sessions.cgroups() {
            let events = events_path(root, &cgroup);
            if !watched.contains_key(&cgroup) {
                if let Ok(wd) = inotify.watches().add(&events, WatchMask::MODIFY) {
                    watched.insert(cgroup.clone(), wd);
                }
            }
            let ended = match populated(&events) {
                None => true,
                // `exec` is gone, so is its run (`PR_SET_PDEATHSIG`), even one killed before this thread saw it run.
                Some(_) if exec_gone => true,
                Some(true) => {
                    sessions.mark_populated(&cgroup);
                    false
                }
                Some(false) => populated_before || age > NEVER_STARTED,
            };
            if ended {
                if let Some((_, Some(exec))) = sessions.end(&cgroup) {
                    leftovers.push(Leftover {
                        cgroup: cgroup.clone(),
                        exec,
                        gone_since: None,
                    });
                }
                if let Some(wd) = watched.remove(&cgroup) {
                    let _ = inotify.watches().remove(wd);
                }
            }
        }
        let live: Vec<String> = sessions.cgroups().into_iter().map(|(c, ..)| c).collect();
        watched.retain(|c, _| live.contains(c));
        abandoned.sweep(exec_parents, root, sessions, &leftovers, ABANDONED_AFTER);
    }
}

/// The exec cgroups no session has, with when each was first seen so.
#[derive(Default)]
struct Abandoned {
    seen: HashMap<PathBuf, Instant>,
}

impl Abandoned {
    /// Remove the exec cgroups under `parents` (absolute) that no run will remove: no live session has one, no
    /// [`Leftover`] is in hand for it, and the process its name carries is gone, all of it for `after`. rmdir(2)
    /// removes only a cgroup with no process and no child; one that refuses is tried again at the next sweep.
    fn sweep(
        &mut self,
        parents: &[PathBuf],
        root: &Path,
        sessions: &Sessions,
        leftovers: &[Leftover],
        after: Duration,
    ) {
        let now = Instant::now();
        let mut still = HashMap::new();
        for parent in parents {
            let Ok(entries) = std::fs::read_dir(parent) else {
                continue;
            };
            for entry in entries.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(exec_pid) else {
                    continue;
                };
                let path = entry.path();
                let cgroup = match path.strip_prefix(root) {
                    Ok(rel) => format!("/{}", rel.display()),
                    Err(_) => continue,
                };
                if !entry.file_type().is_ok_and(|t| t.is_dir())
                    || sessions.is_live(&cgroup)
                    || leftovers.iter().any(|l| l.cgroup == cgroup)
                    || process_exists(pid)
                {
                    continue;
                }
                let since = self.seen.get(&path).copied().unwrap_or(now);
                if now.duration_since(since) < after {
                    still.insert(path, since);
                    continue;
                }
                match std::fs::remove_dir(&path) {
                    Ok(()) => tracing::info!(cgroup = %path.display(),
                        "removed an exec cgroup no run registered whose exec is gone"),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => {
                        tracing::debug!(cgroup = %path.display(), error = %e, "abandoned exec cgroup not removable yet");
                        still.insert(path, since);
                    }
                }
            }
        }
        self.seen = still;
    }
}

/// The pid an exec cgroup's name carries: `exec-PID` or `exec-PID-N` (`capture::cli::create_exec_cgroup`).
fn exec_pid(name: &str) -> Option<libc::pid_t> {
    let rest = name.strip_prefix("exec-")?;
    let (pid, n) = match rest.split_once('-') {
        Some((pid, n)) => (pid, Some(n)),
        None => (rest, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !n.is_none_or(digits) {
        return None;
    }
    pid.parse().ok().filter(|&p: &libc::pid_t| p > 0)
}

/// Whether a process `pid` exists (kill(2) with signal 0: `EPERM` means it does, as another user's).
fn process_exists(pid: libc::pid_t) -> bool {
    // SAFETY: signal 0 sends nothing; `pid` is positive, so it names one process, not a group.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// An ended session's exec cgroup, and the `exec` that registered it.
struct Leftover {
    /// Relative to the cgroup root, as sessions name it.
    cgroup: String,
    /// A pidfd of `exec`.
    exec: OwnedFd,
    /// When `exec` was first seen gone.
    gone_since: Option<Instant>,
}

impl Leftover {
    /// Whether to keep watching: `exec` still runs (it removes its cgroup itself), or it is gone and its cgroup is
    /// still there and not empty yet (the run's processes are being killed), for at most [`LEFTOVER_GRACE`]. Removes
    /// the cgroup once `exec` is gone, unless a new run has registered a cgroup of the same path meanwhile.
    fn pending(&mut self, root: &Path, sessions: &Sessions) -> bool {
        if !crate::pidfd::exited(&self.exec) {
            return true;
        }
        if sessions.is_live(&self.cgroup) {
            return false;
        }
        let since = *self.gone_since.get_or_insert_with(Instant::now);
        let path = cgroup_dir(root, &self.cgroup);
        match std::fs::remove_dir(&path) {
            Ok(()) => {
                tracing::info!(cgroup = %path.display(), "removed the cgroup of an exec that ended without removing it");
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) if since.elapsed() < LEFTOVER_GRACE => {
                tracing::debug!(cgroup = %path.display(), error = %e, "exec cgroup not removable yet");
                true
            }
            Err(e) => {
                tracing::warn!(cgroup = %path.display(), error = %e,
                    "leaving the cgroup of an exec that ended in place");
                false
            }
        }
    }
}

/// The directory of `cgroup` (relative to the cgroup root, as sessions name it) under `root`.
fn cgroup_dir(root: &Path, cgroup: &str) -> PathBuf {
    root.join(cgroup.trim_start_matches('/'))
}

fn events_path(root: &Path, cgroup: &str) -> PathBuf {
    cgroup_dir(root, cgroup).join("cgroup.events")
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

    fn sessions() -> Sessions {
        Sessions::new(
            crate::session::SessionLimits {
                max_sessions: 4,
                max_labels: 4,
                max_counters: 4,
            },
            HashMap::new(),
        )
    }

    /// A run registered by `enforcer exec` at `cgroup`.
    fn register(sessions: &Sessions, cgroup: &str) {
        let person = crate::session::Person {
            user: "alice".into(),
            uid: Some(1000),
            groups: vec![],
        };
        let reg = crate::session::Registration {
            cgroup: cgroup.into(),
            profile: "p".into(),
            person,
        };
        sessions.register(reg, None).unwrap();
    }

    fn pidfd_of(child: &std::process::Child) -> OwnedFd {
        crate::pidfd::open(child.id() as libc::pid_t).unwrap()
    }

    #[test]
    fn an_exec_cgroup_is_removed_once_its_exec_is_gone_and_not_before() {
        let dir = tempfile::tempdir().unwrap();
        let sessions = sessions();
        let mut exec = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let path = dir.path().join("exec-1");
        std::fs::create_dir(&path).unwrap();
        let mut left = Leftover {
            cgroup: "/exec-1".into(),
            exec: pidfd_of(&exec),
            gone_since: None,
        };
        // exec runs: it removes its cgroup itself.
        assert!(left.pending(dir.path(), &sessions));
        assert!(path.exists());
        // Not empty yet (here: a child directory, as a cgroup with a process refuses rmdir): tried again.
        exec.kill().unwrap();
        exec.wait().unwrap();
        std::fs::create_dir(path.join("busy")).unwrap();
        assert!(left.pending(dir.path(), &sessions));
        assert!(left.gone_since.is_some());
        std::fs::remove_dir(path.join("busy")).unwrap();
        assert!(!left.pending(dir.path(), &sessions));
        assert!(!path.exists(), "exec is gone: its cgroup is removed");

        // A new run registered at the same path meanwhile: its cgroup is not touched.
        let mut exec = std::process::Command::new("true").spawn().unwrap();
        let exec_fd = pidfd_of(&exec);
        exec.wait().unwrap();
        std::fs::create_dir(&path).unwrap();
        register(&sessions, "/exec-1");
        let mut left = Leftover {
            cgroup: "/exec-1".into(),
            exec: exec_fd,
            gone_since: None,
        };
        assert!(!left.pending(dir.path(), &sessions));
        assert!(path.exists(), "the new run's cgroup is left to it");
    }

    #[test]
    fn exec_pids_are_read_from_exec_cgroup_names_only() {
        assert_eq!(exec_pid("exec-77"), Some(77));
        assert_eq!(exec_pid("exec-77-3"), Some(77));
        for name in [
            "exec-",
            "exec-0",
            "exec-x",
            "exec-77-",
            "exec-77-x",
            "exec--1",
            "exec-7 7",
            "agent",
            "exec",
        ] {
            assert_eq!(exec_pid(name), None, "{name}");
        }
    }

    #[test]
    fn an_abandoned_exec_cgroup_is_removed_once_its_exec_has_been_gone_a_while() {
        let root = tempfile::tempdir().unwrap();
        let parent = root.path().join("enforcer/p");
        std::fs::create_dir_all(&parent).unwrap();
        let sessions = sessions();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        let gone = gone.id();
        let mut running = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let dir = |name: String| {
            let path = parent.join(name);
            std::fs::create_dir(&path).unwrap();
            path
        };
        let abandoned = dir(format!("exec-{gone}"));
        let abandoned_retry = dir(format!("exec-{gone}-1"));
        let busy = dir(format!("exec-{gone}-2"));
        std::fs::create_dir(busy.join("child")).unwrap();
        let registered = dir(format!("exec-{gone}-3"));
        let live_exec = dir(format!("exec-{}", running.id()));
        let other = dir("agent-1".into());
        register(&sessions, &format!("/enforcer/p/exec-{gone}-3"));
        let parents = [parent.clone(), root.path().join("enforcer/missing")];
        let mut sweeper = Abandoned::default();
        let long = Duration::from_secs(3600);

        // First seen: nothing is removed before it has been abandoned for `after`.
        sweeper.sweep(&parents, root.path(), &sessions, &[], long);
        assert!(abandoned.exists() && abandoned_retry.exists());
        assert_eq!(sweeper.seen.len(), 3, "{:?}", sweeper.seen);
        // Long enough: removed, but not a cgroup that is not empty, a live session's, or one whose exec runs.
        sweeper.sweep(&parents, root.path(), &sessions, &[], Duration::ZERO);
        assert!(!abandoned.exists());
        assert!(!abandoned_retry.exists());
        assert!(busy.exists() && registered.exists() && live_exec.exists() && other.exists());
        // Emptied: removed at the next sweep. Its exec gone: the other is too.
        std::fs::remove_dir(busy.join("child")).unwrap();
        running.kill().unwrap();
        running.wait().unwrap();
        sweeper.sweep(&parents, root.path(), &sessions, &[], Duration::ZERO);
        assert!(!busy.exists() && !live_exec.exists());
        assert!(registered.exists() && other.exists());
        assert!(sweeper.seen.is_empty(), "{:?}", sweeper.seen);
    }
}
