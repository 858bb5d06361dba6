//! Liveness as the watchdog and `enforcer status` see it: every long-running task the daemon depends on (the proxy's
//! accept loops, the DNS listeners, the control socket) is still running, and the audit trail still takes records.
//! A task that ends or panics before shutdown marks the daemon unhealthy for good: only a restart brings it back,
//! which is what the watchdog then asks systemd for.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::metrics::Metrics;

/// The daemon's health, shared by its tasks.
#[derive(Debug)]
pub struct Health {
    /// Names of tasks that ended before shutdown.
    ended: Mutex<Vec<String>>,
    stopping: AtomicBool,
    metrics: Arc<Metrics>,
    /// The audit directory: the writer holds its files open, so a directory removed under it would swallow records.
    audit_dir: PathBuf,
}

/// Held by a task for as long as it runs; dropping it before [`Health::stopping`] marks the task ended.
#[derive(Debug)]
pub struct TaskGuard {
    health: Arc<Health>,
    name: String,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        if !self.health.stopping.load(Ordering::SeqCst) {
            tracing::error!(task = %self.name, "a daemon task ended: the daemon is unhealthy");
            self.health
                .ended
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(std::mem::take(&mut self.name));
        }
    }
}

impl Health {
    pub fn new(metrics: Arc<Metrics>, audit_dir: PathBuf) -> Arc<Health> {
        Arc::new(Health {
            ended: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            metrics,
            audit_dir,
        })
    }

    /// A guard for the task `name` (e.g. `proxy 127.0.0.1:15001`), to move into the task.
    pub fn task(self: &Arc<Self>, name: impl Into<String>) -> TaskGuard {
        TaskGuard {
            health: self.clone(),
            name: name.into(),
        }
    }

    /// Shutdown has begun: tasks ending from now on are expected.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// `Ok` when healthy, else what is wrong (one line, for `STATUS=` and `enforcer status`).
    pub fn check(&self) -> Result<(), String> {
        let ended = self
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !ended.is_empty() {
            return Err(format!("stopped: {}", ended.join(", ")));
        }
        if self.metrics.audit_failed() {
            return Err("the audit writer failed and refuses records until restarted".into());
        }
        if !self.audit_dir.join("audit.lock").exists() {
            return Err(format!(
                "the audit directory {} is gone",
                self.audit_dir.display()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_that_ends_early_makes_the_daemon_unhealthy() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("audit.lock"), "").unwrap();
        let health = Health::new(Arc::new(Metrics::new()), dir.path().to_path_buf());
        let guard = health.task("proxy 127.0.0.1:1");
        assert_eq!(health.check(), Ok(()));
        let panicking = std::thread::spawn(move || {
            let _guard = guard;
            panic!("accept loop died");
        });
        assert!(panicking.join().is_err());
        assert_eq!(health.check(), Err("stopped: proxy 127.0.0.1:1".into()));
    }

    #[test]
    fn tasks_ending_at_shutdown_and_a_missing_audit_dir() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("audit.lock"), "").unwrap();
        let health = Health::new(Arc::new(Metrics::new()), dir.path().to_path_buf());
        let guard = health.task("dns");
        health.stopping();
        drop(guard);
        assert_eq!(health.check(), Ok(()));
        std::fs::remove_file(dir.path().join("audit.lock")).unwrap();
        assert!(health.check().unwrap_err().contains("is gone"));
    }
}
