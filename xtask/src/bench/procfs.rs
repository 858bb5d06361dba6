//! What the benchmark reads from /proc (proc(5)): CPU time and resident memory of a process tree, the CPU time of
//! waited-for children, the whole machine's CPU split, load average, and TCP sockets by local port.

use std::path::Path;

/// A pid and every descendant (through `/proc/<pid>/task/<tid>/children`), depth first.
pub fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for task in tasks.flatten() {
                let children =
                    std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                out.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
        i += 1;
    }
    out
}

/// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces and parentheses): index 0 is
/// field 3 (`state`) of proc(5).
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

/// utime + stime (every thread, dead ones included) of one process, in clock ticks.
fn process_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f = stat_fields(&stat);
    // utime and stime are fields 14 and 15.
    let field = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(14) + field(15)
}

/// CPU time of `pid` and its descendants, in clock ticks.
pub fn tree_ticks(pid: u32) -> u64 {
    tree(pid).into_iter().map(process_ticks).sum()
}

/// Resident memory of `pid` and its descendants (`VmRSS`), in KiB.
pub fn tree_rss_kib(pid: u32) -> u64 {
    tree(pid)
        .into_iter()
        .filter_map(|p| {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

/// cutime + cstime of this process: CPU time of the children it waited for (and theirs), in clock ticks.
pub fn waited_children_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f = stat_fields(&stat);
    // cutime and cstime are fields 16 and 17.
    let field = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(16) + field(17)
}

/// Clock ticks per second of the figures above (`getconf CLK_TCK`; 100 on Linux).
pub fn clock_ticks_per_sec() -> u64 {
    crate::setup::quiet_output(std::process::Command::new("getconf").arg("CLK_TCK"))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// The machine's CPU time so far, all CPUs, in clock ticks (the `cpu` line of /proc/stat).
#[derive(Debug, Clone, Copy, Default)]
pub struct MachineCpu {
    /// user + nice + system + irq + softirq.
    pub busy: u64,
    /// idle + iowait.
    pub idle: u64,
    /// Time a hypervisor gave to other guests.
    pub steal: u64,
}

impl MachineCpu {
    pub fn read() -> MachineCpu {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        parse_machine_cpu(&stat).unwrap_or_default()
    }
}

fn parse_machine_cpu(stat: &str) -> Option<MachineCpu> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Some(MachineCpu {
        busy: at(0) + at(1) + at(2) + at(5) + at(6),
        idle: at(3) + at(4),
        steal: at(7),
    })
}

/// The 1-minute load average.
pub fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// TCP socket states of proc(5)'s `/proc/net/tcp`.
const ESTABLISHED: &str = "01";
const LISTEN: &str = "0A";

/// Sockets in `state` whose local port is `port`, IPv4 and IPv6.
fn count_sockets(port: u16, state: &str) -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .map(|f| count_in_table(&std::fs::read_to_string(f).unwrap_or_default(), port, state))
        .sum()
}

fn count_in_table(table: &str, port: u16, state: &str) -> usize {
    let want = format!("{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let mut f = l.split_whitespace();
            let local = f.nth(1).unwrap_or("");
            let st = f.nth(1).unwrap_or("");
            st == state && local.rsplit_once(':').is_some_and(|(_, p)| p == want)
        })
        .count()
}

/// Whether something listens on TCP `port`.
pub fn listening(port: u16) -> bool {
    count_sockets(port, LISTEN) > 0
}

/// Established connections accepted on TCP `port` (the server's side of each).
pub fn established(port: u16) -> usize {
    count_sockets(port, ESTABLISHED)
}

/// The executable of a live process (to tell a recorded pid from a reused one).
pub fn exe(pid: u32) -> Option<std::path::PathBuf> {
    std::fs::read_link(Path::new("/proc").join(pid.to_string()).join("exe")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_survive_a_command_name_with_spaces_and_parentheses() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 4";
        let f = stat_fields(stat);
        assert_eq!(f[0], "S");
        assert_eq!(f[14 - 3], "250");
        assert_eq!(f[15 - 3], "50");
        assert_eq!(f[16 - 3], "7");
        assert_eq!(f[17 - 3], "3");
    }

    #[test]
    fn machine_cpu_sums_busy_idle_and_steal() {
        let stat = "cpu  100 5 50 1000 20 3 2 9 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        let m = parse_machine_cpu(stat).expect("cpu line");
        assert_eq!((m.busy, m.idle, m.steal), (160, 1020, 9));
    }

    #[test]
    fn sockets_are_counted_by_local_port_and_state() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:482B 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
   1: 0100007F:482B 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n\
   2: 0100007F:9C40 0100007F:482B 01 00000000:00000000 00:00000000 00000000     0        0 3 1\n\
   3: 0100007F:482B 0100007F:9C41 06 00000000:00000000 00:00000000 00000000     0        0 4 1\n";
        assert_eq!(count_in_table(table, 18475, LISTEN), 1);
        assert_eq!(count_in_table(table, 18475, ESTABLISHED), 1);
        assert_eq!(count_in_table(table, 40000, ESTABLISHED), 1);
    }
}
