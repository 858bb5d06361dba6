//! Capture: loads and attaches the eBPF programs (`enforcer-ebpf`), tags cgroups with profiles through the pinned
//! `TAGGED` map, tells the kernel which profiles may serve (`PROFILES`), recovers the original destination and
//! calling process of each redirected connection for the proxy ([`crate::model::OriginLookup`]), and turns what the
//! kernel refused into audit records ([`Refusals`]). Also the `enforcer exec` and `enforcer cgroup` commands, which
//! reach the running daemon through the pinned map. It owns no policy: the kernel only asks "is this cgroup tagged"
//! and "may its profile serve".
//!
//! The daemon is recognised by its cgroup, never by its pid: the kernel programs leave untagged processes alone and
//! never exempt a tagged one, and the daemon refuses to tag its own cgroup or an ancestor of it (were it tagged
//! anyway, the kernel refuses its sockets rather than redirect them back to it).

mod cli;
mod devices;
mod links;
mod origins;
mod refusals;
mod tags;
mod watch;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aya::maps::{HashMap, RingBuf};
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, CgroupSockopt,
    LsmCgroup, SockOps,
};
use aya::{Ebpf, EbpfLoader};
use enforcer_common::{
    ProfileFlags, GLOBAL_DAEMON_CGROUP, GLOBAL_DNS_PORT, GLOBAL_PROXY_PORT, MAP_DAEMON_PORTS,
    MAP_DNS_PEERS, MAP_ORIGINS, MAP_PROFILES, MAP_REFUSALS, MAP_REFUSAL_RATE, MAP_TAGGED,
    PROFILE_ACCEPT_INBOUND,
};

pub use cli::{cgroup_command, exec, user_name, CgroupCommand, ExecArgs};
pub use origins::{cgroup_path, BpfOrigins};
pub use refusals::{operation, socket_kind, Refusals};
pub use tags::{cgroup_id, map_in_use, pin_path, process_cgroup, TagTable};
pub use watch::{child_cgroups, start as watch_cgroups, CgroupPattern, CgroupSink, Watcher};

/// The kernel object built by `build.rs` (aya-build).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer"));

/// The cgroup programs, by function name in `enforcer-ebpf`.
const SOCK_ADDR_PROGRAMS: [&str; 10] = [
    "redirect_connect4",
    "redirect_connect6",
    "udp_sendmsg4",
    "udp_sendmsg6",
    "dns_recvmsg4",
    "dns_recvmsg6",
    "peer_getpeername4",
    "peer_getpeername6",
    "serve_bind4",
    "serve_bind6",
];
const SOCK_PROGRAMS: [&str; 2] = ["sock_create", "sock_release"];
const SOCK_OPS_PROGRAM: &str = "rekey_established";
const DNS_PEER_PROGRAM: &str = "dns_peer";
const INBOUND_PROGRAM: &str = "inbound";
const SOCKOPT_PROGRAM: &str = "bypass_sockopt";
/// The lsm_cgroup program and the LSM hook it attaches to (families other than IPv4/IPv6).
const LSM_PROGRAM: &str = "socket_create";
const LSM_HOOK: &str = "socket_create";
/// Where the kernel lists its active LSMs (securityfs).
const LSM_LIST: &str = "/sys/kernel/security/lsm";
/// bpffs mount point; mounted by [`Capture::start`] when missing.
const BPFFS: &str = "/sys/fs/bpf";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("eBPF link of {name}: {source}")]
    Link {
        name: &'static str,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("eBPF program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("eBPF map {0} missing from the object")]
    MissingMap(&'static str),
    #[error("eBPF map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("pinning the tag map: {0}")]
    Pin(#[from] aya::pin::PinError),
    #[error("kernel log forwarding: {0}")]
    Log(#[from] aya_log::Error),
    #[error("cgroup {}: {source}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pin directory {}: {source}", path.display())]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: is not on a bpf filesystem", .0.display())]
    NotBpffs(PathBuf),
    #[error("profile name {0:?} must be 1 to 32 bytes without NUL")]
    BadProfileName(String),
    #[error("the enforcer daemon is not running (no tag map pinned at {})", .0.display())]
    NotRunning(PathBuf),
    #[error("kernel log forwarding needs a tokio runtime: {0}")]
    NoRuntime(std::io::Error),
    #[error("refusing to tag {}: the enforcer daemon runs in {} (its own connections would be redirected to itself)", cgroup.display(), daemon.display())]
    DaemonCgroup { cgroup: PathBuf, daemon: PathBuf },
    #[error("kernel BTF (needed for the socket_create LSM program): {0}")]
    Btf(#[from] aya::BtfError),
}

/// What [`Capture::start`] needs; the daemon builds it from [`crate::config::Config`].
#[derive(Debug, Clone)]
pub struct CaptureConfig {
    /// The cgroup2 mount (`/sys/fs/cgroup/unified` here).
    pub cgroup_root: PathBuf,
    /// Where the programs attach: the root in production; tests use their own cgroup.
    pub attach_cgroup: PathBuf,
    /// bpffs directory for the `TAGGED` pin (e.g. `/sys/fs/bpf/enforcer`).
    pub pin_dir: PathBuf,
    /// The transparent proxy's port on 127.0.0.1 and ::1.
    pub proxy_port: u16,
    /// The DNS listener's port on 127.0.0.1 and ::1 (where tagged DNS datagrams are redirected).
    pub dns_port: u16,
    /// Ports no tagged process may bind, on any address, beside `proxy_port` and `dns_port`: the daemon's other
    /// listeners and the loopback services it depends on ([`crate::config::Config::daemon_ports`]).
    pub daemon_ports: Vec<u16>,
    /// The profiles to tag cgroups with.
    pub profiles: Vec<CaptureProfile>,
}

/// One profile as capture sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureProfile {
    pub name: String,
    /// Cgroup paths (relative to `cgroup_root`) to tag, beside `<attach_cgroup>/enforcer/<name>`.
    pub cgroups: Vec<PathBuf>,
    /// Its agents may bind non-loopback addresses and receive packets from other hosts.
    pub accept_inbound: bool,
}

impl CaptureProfile {
    /// A profile with no configured cgroups that does not serve.
    pub fn new(name: &str) -> CaptureProfile {
        CaptureProfile {
            name: name.to_string(),
            cgroups: Vec::new(),
            accept_inbound: false,
        }
    }
}

impl CaptureConfig {
    /// The daemon's capture settings from its configuration file: programs attach to `config.attach_cgroup()`, and
    /// every configured profile gets its `<attach>/enforcer/<profile>` cgroup plus the cgroups the config names.
    pub fn from_config(config: &crate::config::Config) -> CaptureConfig {
        CaptureConfig {
            cgroup_root: config.cgroup_root.clone(),
            attach_cgroup: config.attach_cgroup(),
            pin_dir: config.capture.pin_dir.clone(),
            proxy_port: config.proxy.port,
            dns_port: config.dns.port,
            daemon_ports: config.daemon_ports(),
            profiles: config
                .profiles
                .iter()
                .map(|(name, profile)| CaptureProfile {
                    name: name.clone(),
                    cgroups: profile.cgroups.clone(),
                    accept_inbound: profile.accept_inbound,
                })
                .collect(),
        }
    }
}

/// The loaded and attached capture. Dropping it cleans up like [`Capture::shutdown`], which also reports errors.
pub struct Capture {
    /// Shared with the task that covers new network devices ([`devices`]).
    ebpf: Arc<Mutex<Option<Ebpf>>>,
    tags: Mutex<TagTable>,
    origins: Arc<BpfOrigins>,
    dns_peers: Arc<BpfOrigins>,
    pin: PathBuf,
    pin_dir: PathBuf,
    pin_dir_created: bool,
    /// Where the programs are attached: agents in tagged cgroups below it keep them attached at shutdown.
    attach_cgroup: PathBuf,
    /// `enforcer` and `enforcer/<profile>` cgroups created by start, removed (when empty) at shutdown.
    created_cgroups: Vec<PathBuf>,
    log_task: Option<tokio::task::JoinHandle<()>>,
    device_task: Option<tokio::task::JoinHandle<()>>,
    /// The refusal channel, until the daemon takes it ([`Capture::take_refusals`]).
    refusals: Option<Refusals>,
}

impl Capture {
    /// Load the programs with the proxy and DNS ports and this process's cgroup patched in, attach them to
    /// `attach_cgroup`, pin `TAGGED`, record which profiles serve, tag `<attach_cgroup>/enforcer/<profile>`
    /// (created) and the configured cgroups of every profile, and forward kernel logs to `tracing` (debug level).
    /// Refuses ([`CaptureError::DaemonCgroup`]) a configured cgroup that contains this process. Must be called inside
    /// a tokio runtime.
    pub fn start(cfg: &CaptureConfig) -> Result<Capture, CaptureError> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|e| CaptureError::NoRuntime(std::io::Error::other(e)))?;
        for profile in &cfg.profiles {
            tags::encode_profile(&profile.name)?;
        }
        let pin = pin_path(&cfg.pin_dir);
        let pin_dir_created = prepare_pin_dir(&cfg.pin_dir)?;
        if pin.exists() {
            tracing::warn!(pin = %pin.display(), "removing a stale tag map pin (earlier daemon did not shut down)");
            std::fs::remove_file(&pin).map_err(|source| CaptureError::PinDir {
                path: pin.clone(),
                source,
            })?;
        }

        // The daemon is known to the kernel by its cgroup (see the module docs).
        let daemon_cgroup = process_cgroup(None, &cfg.cgroup_root);
        let daemon_cgroup_id = daemon_cgroup
            .as_deref()
            .and_then(|c| cgroup_id(c).ok())
            .unwrap_or(0);
        let mut ebpf = EbpfLoader::new()
            .override_global(GLOBAL_PROXY_PORT, &cfg.proxy_port, true)
            .override_global(GLOBAL_DNS_PORT, &cfg.dns_port, true)
            .override_global(GLOBAL_DAEMON_CGROUP, &daemon_cgroup_id, true)
            .load(EBPF_OBJECT)?;
        let log_task = start_log_forwarding(&mut ebpf, &runtime)?;

        let tag_map = ebpf
            .take_map(MAP_TAGGED)
            .ok_or(CaptureError::MissingMap(MAP_TAGGED))?;
        let mut tags = TagTable::new(tag_map, &cfg.cgroup_root)?;
        match daemon_cgroup {
            Some(cgroup) => tags.protect_daemon_cgroup(cgroup),
            None => tracing::warn!("cannot read this process's cgroup: tagging it is not refused"),
        }
        let mut daemon_ports: HashMap<_, u16, u8> = HashMap::try_from(
            ebpf.map_mut(MAP_DAEMON_PORTS)
                .ok_or(CaptureError::MissingMap(MAP_DAEMON_PORTS))?,
        )?;
        let mut reserved: Vec<u16> = [cfg.proxy_port, cfg.dns_port]
            .into_iter()
            .chain(cfg.daemon_ports.iter().copied())
            .filter(|&p| p != 0)
            .collect();
        reserved.sort_unstable();
        reserved.dedup();
        for port in reserved {
            daemon_ports.insert(port, 1, 0)?;
        }
        let mut profiles: HashMap<_, _, ProfileFlags> = HashMap::try_from(
            ebpf.take_map(MAP_PROFILES)
                .ok_or(CaptureError::MissingMap(MAP_PROFILES))?,
        )?;
        for profile in &cfg.profiles {
            let flags = if profile.accept_inbound {
                PROFILE_ACCEPT_INBOUND
            } else {
                0
            };
            profiles.insert(
                tags::encode_profile(&profile.name)?,
                ProfileFlags { flags },
                0,
            )?;
        }
        let refusals = Refusals::new(
            RingBuf::try_from(
                ebpf.take_map(MAP_REFUSALS)
                    .ok_or(CaptureError::MissingMap(MAP_REFUSALS))?,
            )?,
            HashMap::try_from(
                ebpf.take_map(MAP_REFUSAL_RATE)
                    .ok_or(CaptureError::MissingMap(MAP_REFUSAL_RATE))?,
            )?,
            &cfg.cgroup_root,
        );
        let origin_map = ebpf
            .take_map(MAP_ORIGINS)
            .ok_or(CaptureError::MissingMap(MAP_ORIGINS))?;
        let origins = Arc::new(BpfOrigins::new(
            HashMap::try_from(origin_map)?,
            &cfg.cgroup_root,
        ));
        let peer_map = ebpf
            .take_map(MAP_DNS_PEERS)
            .ok_or(CaptureError::MissingMap(MAP_DNS_PEERS))?;
        // A DNS socket sends several queries (A, AAAA, retries): its entry is read, never consumed.
        let dns_peers = Arc::new(BpfOrigins::new_peeking(
            HashMap::try_from(peer_map)?,
            &cfg.cgroup_root,
        ));

        let mut capture = Capture {
            ebpf: Arc::new(Mutex::new(None)),
            tags: Mutex::new(tags),
            origins,
            dns_peers,
            pin: pin.clone(),
            pin_dir: cfg.pin_dir.clone(),
            pin_dir_created,
            attach_cgroup: cfg.attach_cgroup.clone(),
            created_cgroups: Vec::new(),
            log_task: Some(log_task),
            device_task: None,
            refusals: Some(refusals),
        };
        // From here on, errors unwind through Capture's Drop.
        capture.lock_tags().pin(&pin)?;
        capture.tag_profiles(cfg)?;
        // An earlier daemon that died (or stopped with agents running) left its programs attached, holding tagged
        // agents fail-closed until now: its links take our programs over, each in one step (see `links`).
        let mut earlier = links::Earlier::find(&cfg.pin_dir);
        if earlier.len() > 0 {
            tracing::warn!(
                links = earlier.len(),
                "replacing the programs an earlier daemon left attached"
            );
        }
        attach(&mut ebpf, &cfg.attach_cgroup, &cfg.pin_dir, &mut earlier)?;
        devices::load(&mut ebpf)?;
        let mut covered = devices::Covered::default();
        devices::cover(&mut ebpf, &cfg.pin_dir, &mut covered, &mut earlier)?;
        let released = earlier.release_rest()?;
        if released > 0 {
            tracing::info!(
                links = released,
                "removed earlier links no program of this daemon took over"
            );
        }
        *capture.lock_ebpf() = Some(ebpf);
        capture.device_task = Some(runtime.spawn(cover_new_devices(
            capture.ebpf.clone(),
            cfg.pin_dir.clone(),
            covered,
        )));
        tracing::info!(
            cgroup = %cfg.attach_cgroup.display(),
            port = cfg.proxy_port,
            dns_port = cfg.dns_port,
            pin = %pin.display(),
            "capture attached"
        );
        Ok(capture)
    }

    /// The lookup the proxy uses: the original destination and process of an accepted connection, by its peer.
    pub fn origins(&self) -> Arc<dyn crate::model::OriginLookup> {
        self.origins.clone()
    }

    /// The lookup the DNS listener uses: the resolver a redirected DNS datagram was sent to and its process, by
    /// the datagram's source address.
    pub fn dns_origins(&self) -> Arc<dyn crate::model::OriginLookup> {
        self.dns_peers.clone()
    }

    /// The kernel's refusal reports, for the task that records them (once; `None` afterwards).
    pub fn take_refusals(&mut self) -> Option<Refusals> {
        self.refusals.take()
    }

    /// Tag `cgroup` (absolute, or relative to the cgroup root) and everything below it with `profile`. Refused for
    /// the daemon's own cgroup and its ancestors ([`CaptureError::DaemonCgroup`]).
    pub fn tag(&self, cgroup: &Path, profile: &str) -> Result<(), CaptureError> {
        self.lock_tags().tag(cgroup, profile)
    }

    /// The tagged cgroups now: (cgroup id, profile).
    pub fn tagged(&self) -> Vec<(u64, String)> {
        self.lock_tags().entries()
    }

    /// Remove the tag of `cgroup` itself.
    pub fn untag(&self, cgroup: &Path) -> Result<(), CaptureError> {
        self.lock_tags().untag(cgroup)
    }

    /// Remove the tag map pin and the cgroups start created (if empty), and detach the programs — unless agents
    /// still run in tagged cgroups: then the programs stay attached (pinned links) and those agents fail closed
    /// until they exit or a daemon starts again. Without agents it leaves no trace.
    pub fn shutdown(mut self) -> Result<(), CaptureError> {
        self.cleanup()
    }

    fn lock_ebpf(&self) -> std::sync::MutexGuard<'_, Option<Ebpf>> {
        self.ebpf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_tags(&self) -> std::sync::MutexGuard<'_, TagTable> {
        self.tags
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn tag_profiles(&mut self, cfg: &CaptureConfig) -> Result<(), CaptureError> {
        let base = cfg.attach_cgroup.join("enforcer");
        for CaptureProfile {
            name: profile,
            cgroups,
            ..
        } in &cfg.profiles
        {
            let dir = base.join(profile);
            for d in [&base, &dir] {
                if !d.exists() {
                    std::fs::create_dir(d).map_err(|source| CaptureError::Cgroup {
                        path: d.clone(),
                        source,
                    })?;
                    self.created_cgroups.push(d.clone());
                }
            }
            self.tag(&dir, profile)?;
            for cgroup in cgroups {
                let path = cfg.cgroup_root.join(cgroup);
                match self.tag(&path, profile) {
                    Ok(()) => {}
                    Err(CaptureError::Cgroup { path, source }) => {
                        // A configured slice that does not exist yet is not fatal: tag it later.
                        tracing::warn!(cgroup = %path.display(), profile, error = %source, "cannot tag cgroup");
                    }
                    Err(err) => return Err(err),
                }
            }
        }
        Ok(())
    }

    fn cleanup(&mut self) -> Result<(), CaptureError> {
        let mut first_error = None;
        let tagged: Vec<u64> = self
            .lock_tags()
            .entries()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        let agents = links::agents_in_tagged_cgroups(&self.attach_cgroup, &tagged);
        if let Some(task) = self.device_task.take() {
            task.abort();
        }
        // The links are pinned: dropping the object only closes our handles.
        drop(self.lock_ebpf().take());
        if agents > 0 {
            tracing::warn!(
                agents,
                pin_dir = %self.pin_dir.display(),
                "agents still run in tagged cgroups: the programs stay attached and their connections fail closed"
            );
        } else if let Err(err) = links::unpin_all(&self.pin_dir) {
            first_error.get_or_insert(err);
        }
        if let Some(task) = self.log_task.take() {
            task.abort();
        }
        if let Err(source) = std::fs::remove_file(&self.pin) {
            if source.kind() != std::io::ErrorKind::NotFound {
                first_error.get_or_insert(CaptureError::PinDir {
                    path: self.pin.clone(),
                    source,
                });
            }
        }
        if self.pin_dir_created && agents == 0 {
            self.pin_dir_created = false;
            let _ = std::fs::remove_dir(&self.pin_dir);
        }
        while let Some(dir) = self.created_cgroups.pop() {
            if let Err(err) = std::fs::remove_dir(&dir) {
                tracing::warn!(cgroup = %dir.display(), error = %err, "leaving cgroup in place (not empty?)");
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Err(err) = self.cleanup() {
            tracing::warn!(error = %err, "capture cleanup");
        }
    }
}

/// Every [`devices::RESCAN_EVERY`], cover the network devices that appeared since (until aborted at cleanup).
async fn cover_new_devices(
    ebpf: Arc<Mutex<Option<Ebpf>>>,
    pin_dir: PathBuf,
    mut covered: devices::Covered,
) {
    loop {
        tokio::time::sleep(devices::RESCAN_EVERY).await;
        let mut guard = ebpf
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(ebpf) = guard.as_mut() else { return };
        if let Err(err) = devices::cover(ebpf, &pin_dir, &mut covered, &mut links::Earlier::none())
        {
            tracing::warn!(error = %err, "cannot cover new network devices");
        }
    }
}

/// Load program `$name` as `$ty`; have the earlier daemon's link of that name run it (`$earlier`), else attach it
/// with `$attach` (an expression using the program `$p`) and pin the link.
macro_rules! attach_pinned {
    ($ebpf:expr, $pin_dir:expr, $earlier:expr, $name:expr, $ty:ty, |$p:ident| $attach:expr) => {{
        use std::os::fd::AsFd as _;
        let name = $name;
        let err = program_error(name);
        let $p: &mut $ty = program_mut($ebpf, name)?;
        $p.load().map_err(err)?;
        if !$earlier.take_over($pin_dir, name, $p.fd().map_err(err)?.as_fd()) {
            let link = $attach.and_then(|id| $p.take_link(id)).map_err(err)?;
            links::pin(link, $pin_dir, name)?;
        }
    }};
}

/// Program `name` of the object, as the program type `T`.
pub(super) fn program_mut<'a, T>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut T, CaptureError>
where
    &'a mut aya::programs::Program: TryInto<&'a mut T, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(CaptureError::MissingProgram(name))?
        .try_into()
        .map_err(program_error(name))
}

/// How an error of program `name` is reported.
pub(super) fn program_error(
    name: &'static str,
) -> impl Fn(aya::programs::ProgramError) -> CaptureError + Copy {
    move |source| CaptureError::Program { name, source }
}

/// Load and attach every program to `cgroup`, pinning each link in `pin_dir`, or have an earlier daemon's link of
/// its name run it (see [`links`]).
fn attach(
    ebpf: &mut Ebpf,
    cgroup: &Path,
    pin_dir: &Path,
    earlier: &mut links::Earlier,
) -> Result<(), CaptureError> {
    let file = std::fs::File::open(cgroup).map_err(|source| CaptureError::Cgroup {
        path: cgroup.to_path_buf(),
        source,
    })?;
    for name in SOCK_ADDR_PROGRAMS {
        attach_pinned!(ebpf, pin_dir, earlier, name, CgroupSockAddr, |p| p
            .attach(&file, CgroupAttachMode::Single));
    }
    for name in SOCK_PROGRAMS {
        attach_pinned!(ebpf, pin_dir, earlier, name, CgroupSock, |p| p
            .attach(&file, CgroupAttachMode::Single));
    }
    attach_pinned!(ebpf, pin_dir, earlier, SOCK_OPS_PROGRAM, SockOps, |p| p
        .attach(&file, CgroupAttachMode::Single));
    attach_pinned!(ebpf, pin_dir, earlier, DNS_PEER_PROGRAM, CgroupSkb, |p| p
        .attach(&file, CgroupSkbAttachType::Egress, CgroupAttachMode::Single));
    attach_pinned!(ebpf, pin_dir, earlier, INBOUND_PROGRAM, CgroupSkb, |p| p
        .attach(
            &file,
            CgroupSkbAttachType::Ingress,
            CgroupAttachMode::Single
        ));
    attach_sockopt(ebpf, &file, pin_dir, earlier)?;
    attach_lsm(ebpf, &file, pin_dir, earlier)
}

/// The setsockopt guard, linked and pinned by hand (see [`links::create_and_pin`]).
fn attach_sockopt(
    ebpf: &mut Ebpf,
    file: &std::fs::File,
    pin_dir: &Path,
    earlier: &mut links::Earlier,
) -> Result<(), CaptureError> {
    use std::os::fd::AsFd;
    const BPF_CGROUP_SETSOCKOPT: u32 = 22;
    let err = program_error(SOCKOPT_PROGRAM);
    let p: &mut CgroupSockopt = program_mut(ebpf, SOCKOPT_PROGRAM)?;
    p.load().map_err(err)?;
    let prog = p.fd().map_err(err)?;
    if earlier.take_over(pin_dir, SOCKOPT_PROGRAM, prog.as_fd()) {
        return Ok(());
    }
    links::create_and_pin(
        prog.as_fd(),
        file.as_fd(),
        BPF_CGROUP_SETSOCKOPT,
        pin_dir,
        SOCKOPT_PROGRAM,
    )
}

/// The socket families other than IPv4/IPv6 are refused by an lsm_cgroup program, which runs only when the kernel
/// was booted with the BPF LSM active (`lsm=...,bpf`) and lets BPF LSM programs load. Where it cannot run, the
/// daemon says so (a warning, not a failure: the IPv4/IPv6 side is enforced either way, and packet sockets' frames
/// are dropped at the devices).
fn attach_lsm(
    ebpf: &mut Ebpf,
    file: &std::fs::File,
    pin_dir: &Path,
    earlier: &mut links::Earlier,
) -> Result<(), CaptureError> {
    const UNCOVERED: &str = "tagged processes' non-IP sockets are not refused at creation: packet \
        sockets' frames are dropped at the network devices, vsock and the other families are limited only by \
        the agent's capabilities";
    if bpf_lsm_active() == Some(false) {
        tracing::warn!("the BPF LSM is not active (boot with lsm=...,bpf): {UNCOVERED}");
        return Ok(());
    }
    let attached = (|| {
        let btf = aya::Btf::from_sys_fs()?;
        let err = program_error(LSM_PROGRAM);
        let p: &mut LsmCgroup = program_mut(ebpf, LSM_PROGRAM)?;
        p.load(LSM_HOOK, &btf).map_err(err)?;
        if earlier.take_over(
            pin_dir,
            LSM_PROGRAM,
            std::os::fd::AsFd::as_fd(p.fd().map_err(err)?),
        ) {
            return Ok(());
        }
        let link = p.attach(file).and_then(|id| p.take_link(id)).map_err(err)?;
        links::pin_fd(link.into(), pin_dir, LSM_PROGRAM)
    })();
    if let Err(err) = attached {
        tracing::warn!(error = %err, "cannot attach the socket_create LSM program: {UNCOVERED}");
    }
    Ok(())
}

/// Whether the kernel runs the BPF LSM, from securityfs's LSM list (mounted for the read on a private directory
/// when it is not mounted); `None` when that cannot be told.
fn bpf_lsm_active() -> Option<bool> {
    let list = match std::fs::read_to_string(LSM_LIST) {
        Ok(list) => list,
        Err(_) => read_lsm_list_from_private_securityfs()?,
    };
    Some(list.trim().split(',').any(|lsm| lsm == "bpf"))
}

fn read_lsm_list_from_private_securityfs() -> Option<String> {
    use std::os::unix::ffi::OsStrExt;
    let dir = std::env::temp_dir().join(format!("enforcer-securityfs-{}", std::process::id()));
    std::fs::create_dir(&dir).ok()?;
    let c_dir = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok();
    let list = c_dir.and_then(|c_dir| {
        // SAFETY: C strings we own; mount and umount do not retain them.
        let mounted = unsafe {
            libc::mount(
                c"securityfs".as_ptr(),
                c_dir.as_ptr(),
                c"securityfs".as_ptr(),
                0,
                std::ptr::null(),
            )
        } == 0;
        if !mounted {
            return None;
        }
        let list = std::fs::read_to_string(dir.join("lsm")).ok();
        // SAFETY: as above.
        unsafe {
            libc::umount2(c_dir.as_ptr(), libc::MNT_DETACH);
        }
        list
    });
    let _ = std::fs::remove_dir(&dir);
    list
}

/// Make sure `pin_dir` exists on a bpffs, mounting bpffs at `/sys/fs/bpf` when nothing is mounted there.
/// Returns whether the directory was created (so shutdown removes it).
fn prepare_pin_dir(pin_dir: &Path) -> Result<bool, CaptureError> {
    let pin_err = |source| CaptureError::PinDir {
        path: pin_dir.to_path_buf(),
        source,
    };
    if pin_dir.starts_with(BPFFS) && !is_bpffs(Path::new(BPFFS)) {
        mount_bpffs().map_err(pin_err)?;
    }
    let created = if pin_dir.is_dir() {
        false
    } else {
        std::fs::create_dir_all(pin_dir).map_err(pin_err)?;
        true
    };
    if !is_bpffs(pin_dir) {
        return Err(CaptureError::NotBpffs(pin_dir.to_path_buf()));
    }
    Ok(created)
}

fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own; the path is a valid C string.
    unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(c_path.as_ptr(), &mut buf) == 0 && buf.f_type as i64 == BPF_FS_MAGIC
    }
}

fn mount_bpffs() -> std::io::Result<()> {
    let target = c"/sys/fs/bpf";
    // SAFETY: static C strings; mount does not retain them.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        tracing::info!("mounted bpffs at /sys/fs/bpf");
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Forwards aya-log records from the kernel programs to `tracing` at debug level.
struct TracingLog;

impl log::Log for TracingLog {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        tracing::debug!(target: "enforcer::ebpf", "{}", record.args());
    }

    fn flush(&self) {}
}

fn start_log_forwarding(
    ebpf: &mut Ebpf,
    runtime: &tokio::runtime::Handle,
) -> Result<tokio::task::JoinHandle<()>, CaptureError> {
    let logger = aya_log::EbpfLogger::init_with_logger(ebpf, TracingLog)?;
    let _guard = runtime.enter();
    // SAFETY: the logger owns its ring buffer fd and keeps it open, unreplaced, for as long as the AsyncFd owns it.
    let mut fd = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    }
    .map_err(|e| CaptureError::NoRuntime(e.into_parts().1))?;
    Ok(runtime.spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}
