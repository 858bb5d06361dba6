//! The scheduling policy of the daemon's own background threads (sched(7)): the audit trail's sync thread runs as
//! `SCHED_BATCH`, so that waking it to flush a record does not preempt the thread that appended it.

/// Make the calling thread `SCHED_BATCH` (sched(7), "SCHED_BATCH: Scheduling batch processes"): it keeps its nice value
/// and its fair share of the CPU, but its wake-ups do not preempt a running thread. Woken while a CPU is idle, it runs
/// there at once; while every CPU is busy, it waits for the running thread's turn to end instead of taking the CPU
/// from it. Errors: what sched_setscheduler(2) returns (`EPERM` under a seccomp or security policy that forbids it;
/// lowering one's own policy needs no privilege).
pub(crate) fn batch_current_thread() -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler(2) on the calling thread (0), with a parameter that lives for the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
