//! Tagging without `enforcer exec`: profiles name cgroups by path or glob, relative to the cgroup root
//! (`agents-*.scope`, `system.slice/agent@*.service`, `kubepods.slice/**/kubepods-*pod<uid>.slice`), and the daemon
//! tags each matching cgroup as it appears. `*` and `?` match within one path segment, `**` any number of segments.
//!
//! How it sees new cgroups: inotify (inotify(7)) `IN_CREATE` on every directory under a pattern's literal prefix
//! that could lead to a match (cgroup2 directories report `mkdir` like any directory: it goes through the VFS),
//! plus a full rescan every `capture.rescan_secs` as a safety net (queue overflow, the watch limit). The gap between
//! a cgroup's creation and its tag is the event's delivery (milliseconds); a process that connects inside that gap
//! is not redirected, so a launcher that creates the cgroup should start the agent in it only afterwards — as
//! systemd does for a scope's first process, which it moves in after `mkdir`.
//!
//! A cgroup the configuration or `enforcer cgroup tag` tagged directly is left as it is. Each tag is logged and
//! counted (`enforcer_cgroups_tagged_total`); `enforcer status` lists the tagged cgroups.
//!
//! Every change is also recorded in the audit trail through the [`CgroupSink`] the daemon passes: a glob-matched
//! cgroup tagged, and untagged when it is removed (`IN_DELETE`: its tag is taken out of the map); and each
//! `enforcer exec` cgroup (`enforcer/<profile>/exec-*`, covered by its parent's tag, so not tagged itself) from its
//! creation to its removal.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

use super::{CaptureError, TagTable};
use crate::audit::record::{CgroupAction, CgroupChange, CgroupSource};
use crate::metrics::Metrics;

/// Where the watcher reports each cgroup it tags or untags (the daemon appends it to the audit trail).
pub type CgroupSink = Arc<dyn Fn(&CgroupChange) + Send + Sync>;

/// Most directories watched (and visited per rescan).
const MAX_DIRS: usize = 8192;
/// How long one poll(2) waits before checking for shutdown and the rescan deadline.
const POLL_MS: i32 = 500;

/// One configured cgroup pattern.
#[derive(Debug, Clone)]
pub struct CgroupPattern {
    pub profile: String,
    /// As written in the configuration, relative to the cgroup root.
    pub pattern: String,
    segments: Vec<String>,
    /// `Glob`: tag what matches. `Exec`: `enforcer exec` cgroups, covered by their parent's tag: only recorded.
    source: CgroupSource,
}

impl CgroupPattern {
    pub fn new(profile: &str, pattern: &Path) -> CgroupPattern {
        let text = pattern.to_string_lossy().trim_matches('/').to_string();
        CgroupPattern {
            profile: profile.to_string(),
            segments: text
                .split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            pattern: text,
            source: CgroupSource::Glob,
        }
    }

    /// The cgroups `enforcer exec` creates for `profile` under `profile_dir` (relative to the cgroup root):
    /// recorded as they come and go, never tagged themselves.
    pub fn exec(profile: &str, profile_dir: &Path) -> CgroupPattern {
        CgroupPattern {
            source: CgroupSource::Exec,
            ..CgroupPattern::new(profile, &profile_dir.join("exec-*"))
        }
    }

    /// Whether the cgroup at `rel` (segments below the cgroup root) matches.
    pub fn matches(&self, rel: &[&str]) -> bool {
        path_match(&self.segments, rel)
    }

    /// Whether some cgroup below `rel` (or `rel` itself) could match: worth watching.
    fn could_contain(&self, rel: &[&str]) -> bool {
        prefix_possible(&self.segments, rel)
    }
}

/// The running watcher; stops (and joins its thread) when dropped.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Start watching for cgroups that match `patterns`, tagging them through the map pinned in `pin_dir`. Cgroups that
/// match already are tagged before this returns.
pub fn start(
    cgroup_root: &Path,
    pin_dir: &Path,
    patterns: Vec<CgroupPattern>,
    rescan: Duration,
    metrics: Arc<Metrics>,
    sink: Option<CgroupSink>,
) -> Result<Watcher, CaptureError> {
    let tags = TagTable::open_pinned(pin_dir, cgroup_root)?;
    let inotify = Inotify::init().map_err(|source| CaptureError::Cgroup {
        path: cgroup_root.to_path_buf(),
        source,
    })?;
    let mut state = State {
        root: cgroup_root.to_path_buf(),
        patterns,
        tags,
        inotify,
        watched: HashMap::new(),
        metrics,
        sink,
        tagged: HashMap::new(),
    };
    state.rescan();
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("cgroup-watch".into())
            .spawn(move || state.run(&stop, rescan))
            .map_err(|source| CaptureError::Cgroup {
                path: cgroup_root.to_path_buf(),
                source,
            })?
    };
    Ok(Watcher {
        stop,
        thread: Some(thread),
    })
}

struct State {
    root: PathBuf,
    patterns: Vec<CgroupPattern>,
    tags: TagTable,
    inotify: Inotify,
    watched: HashMap<WatchDescriptor, PathBuf>,
    metrics: Arc<Metrics>,
    sink: Option<CgroupSink>,
    /// Cgroups this watcher tagged (or recorded, for exec), with their cgroup id and pattern: untagged on removal.
    tagged: HashMap<PathBuf, (u64, CgroupPattern)>,
}

impl State {
    fn run(mut self, stop: &AtomicBool, rescan: Duration) {
        let mut buffer = vec![0u8; 64 * 1024];
        let mut next_scan = Instant::now() + rescan;
        while !stop.load(Ordering::SeqCst) {
            let mut pfd = libc::pollfd {
                fd: self.inotify.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own, for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
            let mut created = Vec::new();
            let mut removed = Vec::new();
            let mut overflow = false;
            match self.inotify.read_events(&mut buffer) {
                Ok(events) => {
                    for event in events {
                        if event.mask.contains(EventMask::Q_OVERFLOW) {
                            overflow = true;
                        } else if event.mask.contains(EventMask::IGNORED) {
                            self.watched.remove(&event.wd);
                        } else if let (Some(dir), Some(name)) =
                            (self.watched.get(&event.wd), event.name)
                        {
                            if event.mask.contains(EventMask::CREATE | EventMask::ISDIR) {
                                created.push(dir.join(name));
                            } else if event.mask.contains(EventMask::DELETE | EventMask::ISDIR) {
                                removed.push(dir.join(name));
                            }
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => tracing::warn!(error = %e, "reading cgroup events"),
            }
            for dir in created {
                self.visit_tree(&dir);
            }
            for dir in removed {
                self.removed(&dir);
            }
            if overflow || Instant::now() >= next_scan {
                self.rescan();
                next_scan = Instant::now() + rescan;
            }
        }
    }

    /// Visit every directory under the cgroup root that could lead to a match.
    fn rescan(&mut self) {
        let root = self.root.clone();
        self.visit_tree(&root);
    }

    /// Watch and check `top` and everything below it that could lead to a match (bounded).
    fn visit_tree(&mut self, top: &Path) {
        let mut queue = vec![top.to_path_buf()];
        let mut visited = 0;
        while let Some(dir) = queue.pop() {
            visited += 1;
            if visited > MAX_DIRS {
                tracing::warn!(
                    limit = MAX_DIRS,
                    "cgroup watch: too many cgroups, some are not checked"
                );
                return;
            }
            let Some(rel) = self.relative(&dir) else {
                continue;
            };
            let segs: Vec<&str> = rel.iter().map(String::as_str).collect();
            if !self.patterns.iter().any(|p| p.could_contain(&segs)) {
                continue;
            }
            // Watch first, then list: a child created in between is seen by one or the other.
            self.watch(&dir);
            if let Some(p) = self.patterns.iter().find(|p| p.matches(&segs)).cloned() {
                self.tag(&dir, &p);
            }
            queue.extend(child_cgroups(&dir));
        }
    }

    fn relative(&self, dir: &Path) -> Option<Vec<String>> {
        let rel = dir.strip_prefix(&self.root).ok()?;
        Some(
            rel.iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect(),
        )
    }

    fn watch(&mut self, dir: &Path) {
        // Adding a watch twice returns the same descriptor: no duplicate entry.
        if self.watched.len() >= MAX_DIRS {
            return;
        }
        match self.inotify.watches().add(
            dir,
            WatchMask::CREATE | WatchMask::DELETE | WatchMask::ONLYDIR,
        ) {
            Ok(wd) => {
                self.watched.insert(wd, dir.to_path_buf());
            }
            Err(e) => tracing::debug!(cgroup = %dir.display(), error = %e, "cannot watch cgroup"),
        }
    }

    fn tag(&mut self, dir: &Path, pattern: &CgroupPattern) {
        if pattern.source == CgroupSource::Exec {
            // Covered by its parent's tag from its creation on: recorded once, not tagged.
            if !self.tagged.contains_key(dir) {
                self.tagged.insert(dir.to_path_buf(), (0, pattern.clone()));
                self.record(CgroupAction::Tag, dir, pattern);
            }
            return;
        }
        match self.tags.direct_profile(dir) {
            Ok(Some(_)) => return,
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(cgroup = %dir.display(), error = %e, "cgroup vanished before tagging");
                return;
            }
        }
        let id = super::cgroup_id(dir);
        match self.tags.tag(dir, &pattern.profile).and(id) {
            Ok(id) => {
                tracing::info!(
                    cgroup = %dir.display(),
                    profile = %pattern.profile,
                    pattern = %pattern.pattern,
                    "tagged a new cgroup"
                );
                self.metrics.cgroup_tagged(&pattern.profile);
                self.tagged.insert(dir.to_path_buf(), (id, pattern.clone()));
                self.record(CgroupAction::Tag, dir, pattern);
            }
            Err(e) => tracing::warn!(cgroup = %dir.display(), error = %e, "cannot tag cgroup"),
        }
    }

    /// A cgroup directory was removed: take a glob tag out of the map (by id: the path is gone) and record it.
    fn removed(&mut self, dir: &Path) {
        let Some((id, pattern)) = self.tagged.remove(dir) else {
            return;
        };
        if pattern.source == CgroupSource::Glob {
            if let Err(e) = self.tags.untag_id(id) {
                tracing::warn!(cgroup = %dir.display(), error = %e, "cannot untag a removed cgroup");
            }
        }
        tracing::info!(cgroup = %dir.display(), profile = %pattern.profile, "tagged cgroup removed");
        self.record(CgroupAction::Untag, dir, &pattern);
    }

    fn record(&self, action: CgroupAction, dir: &Path, pattern: &CgroupPattern) {
        if let Some(sink) = &self.sink {
            sink(&CgroupChange {
                action,
                profile: pattern.profile.clone(),
                path: dir.display().to_string(),
                source: pattern.source,
                pattern: (pattern.source == CgroupSource::Glob).then(|| pattern.pattern.clone()),
            });
        }
    }
}

/// The cgroups directly below `dir` (none when it cannot be read).
pub fn child_cgroups(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// One segment against a segment glob: `*` any run of characters, `?` one character.
fn segment_match(pattern: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), s.chars().collect());
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(c) if *c == '?' || *c == s[si] => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A whole path against segment globs, `**` matching any number of segments.
fn path_match(pattern: &[String], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((first, rest)) if first == "**" => {
            (0..=path.len()).any(|skip| path_match(rest, &path[skip..]))
        }
        Some((first, rest)) => path
            .split_first()
            .is_some_and(|(seg, tail)| segment_match(first, seg) && path_match(rest, tail)),
    }
}

/// Whether `path` could be `pattern`'s match or an ancestor of one.
fn prefix_possible(pattern: &[String], path: &[&str]) -> bool {
    match (pattern.split_first(), path.split_first()) {
        (_, None) => true,
        (None, Some(_)) => false,
        (Some((first, _)), Some(_)) if first == "**" => true,
        (Some((first, rest)), Some((seg, tail))) => {
            segment_match(first, seg) && prefix_possible(rest, tail)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pat(p: &str) -> CgroupPattern {
        CgroupPattern::new("x", Path::new(p))
    }

    fn segs(p: &str) -> Vec<&str> {
        p.split('/').filter(|s| !s.is_empty()).collect()
    }

    #[test]
    fn globs_match_within_segments_and_across_with_double_star() {
        let scope = pat("agents-*.scope");
        assert!(scope.matches(&segs("agents-1.scope")));
        assert!(scope.matches(&segs("agents-.scope")));
        assert!(!scope.matches(&segs("agents-1.scope/child")));
        assert!(!scope.matches(&segs("user.slice/agents-1.scope")));
        let pod = pat("kubepods.slice/**/kubepods-*pod1234_5678.slice");
        assert!(pod.matches(&segs("kubepods.slice/kubepods-pod1234_5678.slice")));
        assert!(pod.matches(&segs(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234_5678.slice"
        )));
        assert!(!pod.matches(&segs("kubepods.slice/kubepods-pod9999.slice")));
        assert!(pat("a?c").matches(&segs("abc")));
        assert!(!pat("a?c").matches(&segs("ac")));
        assert!(pat("/exact/path/").matches(&segs("exact/path")));
    }

    #[test]
    fn only_directories_that_can_lead_to_a_match_are_watched() {
        let pod = pat("kubepods.slice/**/x.slice");
        assert!(pod.could_contain(&segs("")));
        assert!(pod.could_contain(&segs("kubepods.slice")));
        assert!(pod.could_contain(&segs("kubepods.slice/a/b/c")));
        assert!(!pod.could_contain(&segs("system.slice")));
        let scope = pat("agents-*.scope");
        assert!(scope.could_contain(&segs("agents-2.scope")));
        assert!(!scope.could_contain(&segs("agents-2.scope/sub")));
        assert!(!scope.could_contain(&segs("user.slice")));
    }

    #[test]
    fn segment_globs() {
        assert!(segment_match("*", ""));
        assert!(segment_match("a*b*c", "aXXbYYc"));
        assert!(!segment_match("a*b*c", "aXXbYY"));
        assert!(segment_match("*pod*", "kubepods-podabc.slice"));
        assert!(!segment_match("abc", "abcd"));
    }
}
