//! Device egress: the `device_egress` program on every network device of the daemon's network namespace except
//! loopback, so no frame owned by a tagged cgroup's socket leaves the host through a device (whatever socket kind
//! got past the socket hooks). Devices that appear later are covered within [`RESCAN_EVERY`]. Each link is pinned
//! like the cgroup programs' (`link_device_egress_<ifindex>`), so a dead daemon keeps the devices covered.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use aya::programs::{SchedClassifier, TcAttachType};
use aya::Ebpf;

use super::links::{self, Earlier};
use super::{program_error, program_mut, CaptureError};

/// The program, by function name in `enforcer-ebpf`.
pub(super) const PROGRAM: &str = "device_egress";
/// How often new devices are looked for.
pub(super) const RESCAN_EVERY: Duration = Duration::from_secs(2);
const SYS_CLASS_NET: &str = "/sys/class/net";
const LOOPBACK_IFINDEX: u32 = 1;

/// The devices covered so far, by interface index.
#[derive(Debug, Default)]
pub(super) struct Covered(HashSet<u32>);

/// Load the program (once, before the first [`cover`]).
pub(super) fn load(ebpf: &mut Ebpf) -> Result<(), CaptureError> {
    program_mut::<SchedClassifier>(ebpf, PROGRAM)?
        .load()
        .map_err(program_error(PROGRAM))
}

/// Attach the program to every device not covered yet (loopback excepted) and pin each link in `pin_dir`.
/// Returns how many devices were newly covered; a device that cannot be covered (it went away meanwhile) is
/// logged and tried again at the next call.
pub(super) fn cover(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    covered: &mut Covered,
    earlier: &mut Earlier,
) -> Result<usize, CaptureError> {
    use std::os::fd::AsFd as _;
    let prog: &mut SchedClassifier = program_mut(ebpf, PROGRAM)?;
    let mut added = 0;
    for (name, ifindex) in devices() {
        if ifindex == LOOPBACK_IFINDEX || covered.0.contains(&ifindex) {
            continue;
        }
        let pin = format!("{PROGRAM}_{ifindex}");
        let taken = prog
            .fd()
            .is_ok_and(|fd| earlier.take_over(pin_dir, &pin, fd.as_fd()));
        let attached = if taken {
            Ok(())
        } else {
            prog.attach(&name, TcAttachType::Egress)
                .and_then(|id| prog.take_link(id))
                .map_err(program_error(PROGRAM))
                .and_then(|link| links::pin_named(link, pin_dir, PROGRAM, &pin))
        };
        match attached {
            Ok(()) => {
                covered.0.insert(ifindex);
                added += 1;
                tracing::debug!(device = %name, ifindex, "device egress covered");
            }
            Err(err) => {
                tracing::warn!(device = %name, error = %err, "cannot cover a network device")
            }
        }
    }
    Ok(added)
}

/// The network devices of this namespace: (name, interface index).
fn devices() -> Vec<(String, u32)> {
    let Ok(entries) = std::fs::read_dir(SYS_CLASS_NET) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let ifindex = std::fs::read_to_string(e.path().join("ifindex"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some((name, ifindex))
        })
        .collect()
}
