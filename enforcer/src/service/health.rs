//! Liveness and readiness as the watchdog and `enforcer status` see them. Live: every long-running task the daemon
//! depends on (the proxy's accept loops, the DNS listeners, the control socket) is still running and the audit
//! directory is still there. A task that ends or panics before shutdown marks the daemon dead for good: only a
//! restart brings it back, which is what the watchdog then asks systemd for. Healthy: live, and the audit trail takes
//! records right now. The audit writer recovers by itself once it can write again (a full disk freed), so while it
//! cannot the daemon is reported not ready (it refuses every action) but kept alive: a restart would not help.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// The daemon's health, shared by its tasks.
#[derive(Debug)]
pub struct Health {
    /// Names of tasks that ended before shutdown.
    ended: Mutex<Vec<String>>,
    stopping: AtomicBool,
    /// The audit writer's state ([`crate::audit::AuditLog::health`]).
    audit: watch::Receiver<crate::audit::Health>,
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
    pub fn new(audit: watch::Receiver<crate::audit::Health>, audit_dir: PathBuf) -> Arc<Health> {
        Arc::new(Health {
            ended: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            audit,
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

    /// `Ok` while every task runs and the audit directory is there, else what is wrong (one line, for `STATUS=`):
    /// what the watchdog pings on.
    pub fn live(&self) -> Result<(), String> {
        let ended = self
            .ended
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !ended.is_empty() {
            return Err(format!("stopped: {}", ended.join(", ")));
        }
        if !self.audit_dir.join("audit.lock").exists() {
            return Err(format!(
                "the audit directory {} is gone",
                self.audit_dir.display()
            ));
        }
        Ok(())
    }

    /// `Ok` when live and the audit trail takes records, else what is wrong (one line, for `STATUS=` and
    /// `enforcer status`).
    pub fn check(&self) -> Result<(), String> {
        self.live()?;
        let audit = self.audit.borrow();
        if audit.is_healthy() || self.stopping.load(Ordering::SeqCst) {
            Ok(())
        } else {
            Err(format!("not ready: {}", *audit))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_that_ends_early_makes_the_daemon_unhealthy() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("audit.lock"), "").unwrap();
        let health = Health::new(
            watch::channel(crate::audit::Health::Healthy).1,
            dir.path().to_path_buf(),
        );
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
        let health = Health::new(
            watch::channel(crate::audit::Health::Healthy).1,
            dir.path().to_path_buf(),
        );
        let guard = health.task("dns");
        health.stopping();
        drop(guard);
        assert_eq!(health.check(), Ok(()));
        std::fs::remove_file(dir.path().join("audit.lock")).unwrap();
        assert!(health.check().unwrap_err().contains("is gone"));
    }

    #[test]
    fn an_audit_trail_that_takes_no_records_is_not_ready_but_alive() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("audit.lock"), "").unwrap();
        let (audit, rx) = watch::channel(crate::audit::Health::Healthy);
        let health = Health::new(rx, dir.path().to_path_buf());
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        audit.send_replace(crate::audit::Health::WriteFailing(Arc::new(full)));
        assert_eq!(health.live(), Ok(()));
        let problem = health.check().unwrap_err();
        assert!(
            problem
                .starts_with("not ready: audit records cannot be written: No space left on device"),
            "{problem}"
        );
        // The writer takes records again once there is space: so is the daemon.
        audit.send_replace(crate::audit::Health::Healthy);
        assert_eq!(health.check(), Ok(()));
    }
}
