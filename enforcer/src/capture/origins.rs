//! The proxy's side of capture: turns an accepted connection's peer address into the [`Origin`] the kernel
//! recorded (original destination, process, profile), consuming the entry. The kernel keys its entries by the
//! client's full local address ([`SockKey`]), which is the peer address the daemon sees.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::{HashMap, MapData};
use enforcer_common::{OriginalDst, SockKey, FAMILY_V4, FAMILY_V6, UID_UNKNOWN};

use crate::model::{Agent, Origin, OriginLookup};

use super::tags::decode_profile;

/// Upper bound on cgroup directories visited when a cgroup id has to be found by walking the tree.
const WALK_LIMIT: usize = 4096;

/// [`OriginLookup`] over the kernel's `ORIGINS` map (entries consumed), or `DNS_PEERS` (entries only read: a DNS
/// socket sends many datagrams, and the kernel refreshes the entry on each).
pub struct BpfOrigins {
    map: Mutex<HashMap<MapData, SockKey, OriginalDst>>,
    cgroup_root: PathBuf,
    consume: bool,
}

impl BpfOrigins {
    pub(super) fn new(
        map: HashMap<MapData, SockKey, OriginalDst>,
        cgroup_root: &Path,
    ) -> BpfOrigins {
        BpfOrigins {
            map: Mutex::new(map),
            cgroup_root: cgroup_root.to_path_buf(),
            consume: true,
        }
    }

    pub(super) fn new_peeking(
        map: HashMap<MapData, SockKey, OriginalDst>,
        cgroup_root: &Path,
    ) -> BpfOrigins {
        BpfOrigins {
            consume: false,
            ..BpfOrigins::new(map, cgroup_root)
        }
    }

    fn take(&self, key: &SockKey) -> Option<OriginalDst> {
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let value = map.get(key, 0).ok()?;
        if self.consume {
            // The entry is ours now; a failed delete only leaves it to the LRU.
            let _ = map.remove(key);
        }
        Some(value)
    }
}

impl OriginLookup for BpfOrigins {
    fn lookup(&self, client: SocketAddr) -> Option<Origin> {
        let raw = self.take(&sock_key(client))?;
        let origin = to_origin(&raw, &self.cgroup_root);
        tracing::debug!(client = %client, dst = %origin.dst, pid = raw.pid, "original destination recovered");
        Some(origin)
    }
}

/// The map key the kernel files a socket under: its local address, IPv4-mapped IPv6 as IPv4.
pub fn sock_key(local: SocketAddr) -> SockKey {
    match local.ip().to_canonical() {
        IpAddr::V4(ip) => SockKey {
            addr: [u32::from_ne_bytes(ip.octets()), 0, 0, 0],
            port: local.port(),
            family: FAMILY_V4,
        },
        IpAddr::V6(ip) => {
            let mut addr = [0u32; 4];
            for (word, chunk) in addr.iter_mut().zip(ip.octets().chunks_exact(4)) {
                *word = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            }
            SockKey {
                addr,
                port: local.port(),
                family: FAMILY_V6,
            }
        }
    }
}

/// The address in a kernel record: IPv4-mapped IPv6 addresses are reported as IPv4 (what policy rules name).
/// `None` when the record carries no address (family 0).
pub fn original_dst(raw: &OriginalDst) -> Option<SocketAddr> {
    let ip = match raw.family {
        FAMILY_V4 => IpAddr::V4(Ipv4Addr::from(raw.addr[0].to_ne_bytes())),
        FAMILY_V6 => {
            let mut bytes = [0u8; 16];
            for (chunk, word) in bytes.chunks_exact_mut(4).zip(raw.addr) {
                chunk.copy_from_slice(&word.to_ne_bytes());
            }
            Ipv6Addr::from(bytes).to_canonical()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, raw.port))
}

fn to_origin(raw: &OriginalDst, cgroup_root: &Path) -> Origin {
    let dst = original_dst(raw).unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], raw.port)));
    Origin {
        dst,
        agent: agent_of(raw, cgroup_root),
    }
}

/// The agent a kernel record names: its profile, cgroup, process (pid 0: none, as for inbound packets), executable
/// (from `/proc`, or the command name when the process is gone) and uid.
pub(super) fn agent_of(raw: &OriginalDst, cgroup_root: &Path) -> Agent {
    let profile = decode_profile(&raw.tag);
    let pid = (raw.pid != 0).then_some(raw.pid);
    let exe = pid.and_then(|pid| {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| p.display().to_string())
            .or_else(|| {
                // The process is gone: its command name is all that is left.
                let len = raw
                    .comm
                    .iter()
                    .position(|b| *b == 0)
                    .unwrap_or(raw.comm.len());
                (len > 0).then(|| String::from_utf8_lossy(&raw.comm[..len]).into_owned())
            })
    });
    Agent {
        profile: (!profile.is_empty()).then_some(profile),
        cgroup: cgroup_path(raw.cgroup_id, raw.pid, cgroup_root),
        pid,
        exe,
        uid: (raw.uid != UID_UNKNOWN).then_some(raw.uid),
        ..Agent::default()
    }
}

/// The path (relative to the cgroup root, starting with `/`) of the cgroup with id `id`: from the process's
/// `/proc/<pid>/cgroup` when it is still there, else by walking the tree (bounded).
pub fn cgroup_path(id: u64, pid: u32, cgroup_root: &Path) -> Option<String> {
    let matches = |rel: &str| {
        std::fs::metadata(cgroup_root.join(rel.trim_start_matches('/')))
            .is_ok_and(|m| m.ino() == id)
    };
    if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
        if let Some(rel) = text.lines().find_map(|l| l.strip_prefix("0::")) {
            if matches(rel) {
                return Some(rel.to_string());
            }
        }
    }
    let mut queue = std::collections::VecDeque::from([cgroup_root.to_path_buf()]);
    let mut visited = 0;
    while let Some(dir) = queue.pop_front() {
        visited += 1;
        if visited > WALK_LIMIT {
            break;
        }
        if std::fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            let rel = dir.strip_prefix(cgroup_root).ok()?;
            return Some(format!("/{}", rel.display()));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            queue.extend(
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use enforcer_common::{Tag, PROFILE_NAME_LEN};

    fn raw(family: u16, addr: [u32; 4], port: u16) -> OriginalDst {
        OriginalDst {
            cgroup_id: 0,
            addr,
            port,
            family,
            pid: 0,
            uid: 0,
            _pad: 0,
            comm: [0; 16],
            tag: Tag {
                profile: [0; PROFILE_NAME_LEN],
            },
        }
    }

    #[test]
    fn decodes_destinations_as_the_kernel_stores_them() {
        let v4 = raw(
            FAMILY_V4,
            [u32::from_ne_bytes([10, 77, 0, 2]), 0, 0, 0],
            443,
        );
        assert_eq!(original_dst(&v4), Some("10.77.0.2:443".parse().unwrap()));
        let mapped = raw(
            FAMILY_V6,
            [
                0,
                0,
                u32::from_ne_bytes([0, 0, 0xff, 0xff]),
                u32::from_ne_bytes([127, 0, 0, 2]),
            ],
            80,
        );
        assert_eq!(original_dst(&mapped), Some("127.0.0.2:80".parse().unwrap()));
        let v6 = raw(
            FAMILY_V6,
            [
                u32::from_ne_bytes([0xfd, 0x77, 0, 0]),
                0,
                0,
                u32::from_ne_bytes([0, 0, 0, 2]),
            ],
            8443,
        );
        assert_eq!(original_dst(&v6), Some("[fd77::2]:8443".parse().unwrap()));
        assert_eq!(original_dst(&raw(99, [0; 4], 1)), None);
    }

    #[test]
    fn keys_are_full_local_addresses_as_the_kernel_files_them() {
        let v4 = sock_key("127.0.0.2:40000".parse().unwrap());
        assert_eq!(
            v4,
            SockKey {
                addr: [u32::from_ne_bytes([127, 0, 0, 2]), 0, 0, 0],
                port: 40000,
                family: FAMILY_V4
            }
        );
        // Two sockets on one port, different addresses: different keys.
        assert_ne!(v4, sock_key("127.0.0.3:40000".parse().unwrap()));
        // An IPv4-mapped peer (an IPv6 listener accepting IPv4) is filed as IPv4.
        assert_eq!(v4, sock_key("[::ffff:127.0.0.2]:40000".parse().unwrap()));
        let v6 = sock_key("[::1]:40000".parse().unwrap());
        assert_eq!(v6.family, FAMILY_V6);
        assert_eq!(v6.addr, [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]);
    }
}
