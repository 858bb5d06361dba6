//! The `TAGGED` map (cgroup id → profile), shared by the daemon (which owns it) and `enforcer exec` /
//! `enforcer cgroup` (which open its pin). The profile name lives in the map value, so no side table is needed.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, IterableMap, Map, MapData};
use enforcer_common::{Tag, MAP_TAGGED, PROFILE_NAME_LEN};

use super::CaptureError;

/// Where the `TAGGED` map is pinned inside a pin directory.
pub fn pin_path(pin_dir: &Path) -> PathBuf {
    pin_dir.join(MAP_TAGGED)
}

/// Encode a profile name for the map: non-empty, at most [`PROFILE_NAME_LEN`] bytes, no NUL.
pub fn encode_profile(profile: &str) -> Result<Tag, CaptureError> {
    let bytes = profile.as_bytes();
    if bytes.is_empty() || bytes.len() > PROFILE_NAME_LEN || bytes.contains(&0) {
        return Err(CaptureError::BadProfileName(profile.to_string()));
    }
    let mut tag = Tag {
        profile: [0; PROFILE_NAME_LEN],
    };
    tag.profile[..bytes.len()].copy_from_slice(bytes);
    Ok(tag)
}

/// Decode a profile name written by [`encode_profile`] (lossy on invalid UTF-8, which we never write).
pub fn decode_profile(tag: &Tag) -> String {
    let len = tag
        .profile
        .iter()
        .position(|b| *b == 0)
        .unwrap_or(PROFILE_NAME_LEN);
    String::from_utf8_lossy(&tag.profile[..len]).into_owned()
}

/// The cgroup id of a cgroup v2 directory: its inode number on cgroupfs.
pub fn cgroup_id(path: &Path) -> Result<u64, CaptureError> {
    let meta = std::fs::metadata(path).map_err(|source| CaptureError::Cgroup {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(CaptureError::Cgroup {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a cgroup directory"),
        });
    }
    Ok(meta.ino())
}

/// The cgroup (absolute path under `cgroup_root`) process `pid` runs in, from `/proc/<pid>/cgroup`; `None` for the
/// calling process. `None` when it cannot be read.
pub fn process_cgroup(pid: Option<u32>, cgroup_root: &Path) -> Option<PathBuf> {
    let file = match pid {
        Some(pid) => format!("/proc/{pid}/cgroup"),
        None => "/proc/self/cgroup".to_string(),
    };
    let text = std::fs::read_to_string(file).ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(cgroup_root.join(rel.trim_start_matches('/')))
}

/// A handle on the `TAGGED` map, owned by the daemon or opened from its pin.
pub struct TagTable {
    map: HashMap<MapData, u64, Tag>,
    cgroup_root: PathBuf,
    /// The daemon's own cgroup: neither it nor an ancestor may be tagged (the daemon's connections would be
    /// redirected to itself).
    daemon_cgroup: Option<PathBuf>,
}

impl TagTable {
    pub(super) fn new(map: Map, cgroup_root: &Path) -> Result<TagTable, CaptureError> {
        Ok(TagTable {
            map: HashMap::try_from(map)?,
            cgroup_root: cgroup_root.to_path_buf(),
            daemon_cgroup: None,
        })
    }

    /// Open the map the running daemon pinned in `pin_dir`.
    pub fn open_pinned(pin_dir: &Path, cgroup_root: &Path) -> Result<TagTable, CaptureError> {
        let path = pin_path(pin_dir);
        if !path.exists() {
            return Err(CaptureError::NotRunning(path));
        }
        let data = MapData::from_pin(&path)?;
        TagTable::new(Map::HashMap(data), cgroup_root)
    }

    /// Absolute path of a cgroup given absolute or relative to the cgroup root.
    pub fn resolve(&self, cgroup: &Path) -> PathBuf {
        self.cgroup_root.join(cgroup)
    }

    /// From now on refuse to tag `daemon_cgroup` (absolute) or any cgroup above it: the daemon's own cgroup.
    pub fn protect_daemon_cgroup(&mut self, daemon_cgroup: PathBuf) {
        self.daemon_cgroup = Some(daemon_cgroup);
    }

    /// Tag `cgroup` (and so every cgroup below it) with `profile`; replaces an earlier tag. Refused
    /// ([`CaptureError::DaemonCgroup`]) for the daemon's own cgroup and its ancestors.
    pub fn tag(&mut self, cgroup: &Path, profile: &str) -> Result<(), CaptureError> {
        let tag = encode_profile(profile)?;
        let path = self.resolve(cgroup);
        let id = cgroup_id(&path)?;
        if let Some(daemon) = &self.daemon_cgroup {
            let path = std::fs::canonicalize(&path).unwrap_or(path);
            let daemon_real = std::fs::canonicalize(daemon).unwrap_or_else(|_| daemon.clone());
            if daemon_real.starts_with(&path) {
                return Err(CaptureError::DaemonCgroup {
                    cgroup: path,
                    daemon: daemon.clone(),
                });
            }
        }
        self.map.insert(id, tag, 0)?;
        Ok(())
    }

    /// Remove the tag of `cgroup` itself (a tagged ancestor still applies). Untagging an untagged cgroup is not an
    /// error.
    pub fn untag(&mut self, cgroup: &Path) -> Result<(), CaptureError> {
        let id = cgroup_id(&self.resolve(cgroup))?;
        match self.map.remove(&id) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    /// Remove the tag of the cgroup with inode `id` (one that no longer exists, so has no path).
    pub fn untag_id(&mut self, id: u64) -> Result<(), CaptureError> {
        match self.map.remove(&id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    /// The profile `cgroup` itself is tagged with, if any.
    pub fn direct_profile(&self, cgroup: &Path) -> Result<Option<String>, CaptureError> {
        let id = cgroup_id(&self.resolve(cgroup))?;
        match self.map.get(&id, 0) {
            Ok(tag) => Ok(Some(decode_profile(&tag))),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// The profile that applies to `cgroup`: its own tag or the nearest tagged ancestor's (as the kernel sees it).
    pub fn effective_profile(&self, cgroup: &Path) -> Result<Option<String>, CaptureError> {
        let mut current = self.resolve(cgroup);
        loop {
            if let Some(profile) = self.direct_profile(&current)? {
                return Ok(Some(profile));
            }
            if current == self.cgroup_root
                || !current.pop()
                || !current.starts_with(&self.cgroup_root)
            {
                return Ok(None);
            }
        }
    }

    /// Every tag: (cgroup id, profile).
    pub fn entries(&self) -> Vec<(u64, String)> {
        self.map
            .iter()
            .filter_map(Result::ok)
            .map(|(id, tag)| (id, decode_profile(&tag)))
            .collect()
    }

    /// The map's kernel id (to check that loaded programs still use it).
    pub fn map_id(&self) -> Option<u32> {
        self.map.map().info().ok().map(|info| info.id())
    }

    /// Pin the map at `path` (bpffs).
    pub(super) fn pin(&self, path: &Path) -> Result<(), CaptureError> {
        self.map.map().pin(path)?;
        Ok(())
    }
}

/// Whether some loaded BPF program uses the map with id `map_id` (i.e. the daemon that pinned it is alive).
pub fn map_in_use(map_id: u32) -> bool {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .any(|prog| {
            prog.map_ids()
                .ok()
                .flatten()
                .is_some_and(|ids| ids.contains(&map_id))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_names_round_trip() {
        let tag = encode_profile("agents-prod").unwrap();
        assert_eq!(decode_profile(&tag), "agents-prod");
        let long = "x".repeat(PROFILE_NAME_LEN);
        assert_eq!(decode_profile(&encode_profile(&long).unwrap()), long);
    }

    #[test]
    fn bad_profile_names_are_refused() {
        assert!(encode_profile("").is_err());
        assert!(encode_profile(&"x".repeat(PROFILE_NAME_LEN + 1)).is_err());
        assert!(encode_profile("a\0b").is_err());
    }
}
