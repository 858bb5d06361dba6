//! Types shared by the kernel programs (`enforcer-ebpf`) and the daemon (`enforcer`): the keys and values of the
//! BPF maps, laid out `#[repr(C)]` so both sides agree byte for byte. `no_std`; `aya::Pod` impls live behind the
//! `user` feature so the kernel side never links aya.
#![no_std]

/// Bytes of a profile name stored in a [`Tag`] (NUL-padded; longer names are refused by the daemon).
pub const PROFILE_NAME_LEN: usize = 32;
/// Bytes of a task's command name (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;
/// How many cgroup levels the kernel programs walk looking for a tagged ancestor.
pub const MAX_CGROUP_DEPTH: i32 = 16;

/// `AF_INET` / `AF_INET6` as stored in [`OriginalDst::family`] and [`SockKey::family`].
pub const FAMILY_V4: u16 = 2;
pub const FAMILY_V6: u16 = 10;

/// Map names, shared so the loader and the kernel object cannot drift apart.
pub const MAP_TAGGED: &str = "TAGGED";
pub const MAP_SOCKETS: &str = "SOCKETS";
/// Redirected connections by the client's local address ([`SockKey`]), filled when a connection is established and
/// consumed by the proxy when it accepts it.
pub const MAP_ORIGINS: &str = "ORIGINS";
/// The same entries, kept for the connection's life (removed when it closes): what `getpeername` reports.
pub const MAP_PEERS: &str = "PEERS";
/// DNS sockets redirected to the daemon's DNS listener, by socket cookie: the resolver they were sent to and the
/// caller (value [`OriginalDst`]). Read by the recvmsg programs to restore the resolver's address on replies.
pub const MAP_DNS_SOCKETS: &str = "DNS_SOCKETS";
/// The same entries keyed by the datagram's source address ([`SockKey`]), filled when a redirected DNS socket sends:
/// what the daemon's DNS listener sees as its peer.
pub const MAP_DNS_PEERS: &str = "DNS_PEERS";
/// Per-profile settings the kernel enforces (key: [`Tag`], value: [`ProfileFlags`]), written by the daemon.
pub const MAP_PROFILES: &str = "PROFILES";
/// Ring buffer of [`Refusal`] events: what the kernel programs refused, for the audit trail.
pub const MAP_REFUSALS: &str = "REFUSALS";
/// Refusal counters and the rate bound's state, by [`RateKey`] (value [`RateState`]).
pub const MAP_REFUSAL_RATE: &str = "REFUSAL_RATE";
/// The ports the daemon listens on, and those of loopback services it depends on (key: port in host order, value
/// unused), written by the daemon before the programs attach. A tagged process may not bind one of them on any
/// address: while the daemon restarts, an agent holding its proxy or DNS port would be sent every other agent's
/// redirected traffic.
pub const MAP_DAEMON_PORTS: &str = "DAEMON_PORTS";
/// How many ports [`MAP_DAEMON_PORTS`] holds at most.
pub const DAEMON_PORTS_MAX: u32 = 64;
/// Global patched by the loader: the proxy port connects are redirected to.
pub const GLOBAL_PROXY_PORT: &str = "PROXY_PORT";
/// Global patched by the loader: the port of the daemon's DNS listener on 127.0.0.1 and ::1.
pub const GLOBAL_DNS_PORT: &str = "DNS_PORT";
/// Global patched by the loader: the id of the cgroup the daemon runs in. A task of that cgroup is never tagged (the
/// daemon refuses to tag it or an ancestor); should it be tagged anyway, its sockets are refused rather than
/// redirected back to the daemon.
pub const GLOBAL_DAEMON_CGROUP: &str = "DAEMON_CGROUP";

/// [`ProfileFlags::flags`]: the profile's agents may serve: bind non-loopback addresses and receive packets from
/// other hosts.
pub const PROFILE_ACCEPT_INBOUND: u32 = 1;

/// At most this many [`Refusal`] events per cgroup and kind in each [`REFUSAL_WINDOW_NS`]; the rest are only counted.
pub const REFUSAL_BURST: u64 = 10;
/// The rate bound's window.
pub const REFUSAL_WINDOW_NS: u64 = 1_000_000_000;
/// Bytes of the `REFUSALS` ring buffer (a power of two, a multiple of the page size).
pub const REFUSALS_BYTES: u32 = 256 * 1024;

/// [`Refusal::kind`]: what was refused.
pub const REFUSED_SOCKET: u16 = 1;
/// `bind()` to a non-loopback address with a port (a server).
pub const REFUSED_BIND: u16 = 2;
/// A packet from another host to a tagged socket (dropped).
pub const REFUSED_INBOUND: u16 = 3;
/// `connect()`: a datagram destination other than DNS, a socket kind the proxy does not carry, or a connection
/// whose original destination could not be recorded.
pub const REFUSED_CONNECT: u16 = 4;
/// An unconnected `sendto()`/`sendmsg()` to a destination other than DNS.
pub const REFUSED_SENDMSG: u16 = 5;
/// A frame a tagged cgroup's socket (a packet socket, say) tried to send out of a network device (dropped).
pub const REFUSED_TRANSMIT: u16 = 6;
/// A socket option that would let a socket send past the device egress check (`PACKET_QDISC_BYPASS`, AF_XDP).
pub const REFUSED_SOCKOPT: u16 = 7;
/// [`OriginalDst::uid`] when the uid is not known (Linux's invalid uid, `(uid_t)-1`).
pub const UID_UNKNOWN: u32 = u32::MAX;

/// Value of the `TAGGED` map (key: cgroup id, `u64`): the profile the cgroup and all its descendants belong to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    /// Profile name, UTF-8, NUL-padded.
    pub profile: [u8; PROFILE_NAME_LEN],
}

/// Key of the `ORIGINS`, `PEERS` and `DNS_PEERS` maps: the client side of a redirected connection (or DNS socket)
/// as the daemon sees it — its full local address, so two sockets that share a port on different addresses never
/// share an entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockKey {
    /// Local (client) address as the kernel holds it (network byte order words); IPv4 uses `addr[0]` only, and an
    /// IPv4-mapped IPv6 address is stored as IPv4.
    pub addr: [u32; 4],
    /// Local (client) port, host byte order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`]: the family of the address (for `DNS_PEERS`: of the datagram, which is IPv4
    /// when an IPv6 socket sent to an IPv4-mapped address).
    pub family: u16,
}

/// Value of the `PROFILES` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProfileFlags {
    /// [`PROFILE_ACCEPT_INBOUND`] or 0.
    pub flags: u32,
}

/// One event of the `REFUSALS` ring buffer: something a tagged process tried that the kernel refused.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// How many refusals of this kind the cgroup has had so far, this one included (from `REFUSAL_RATE`): the
    /// daemon learns from the gaps how many the rate bound left out.
    pub total: u64,
    /// Who, and the address involved: the destination of a connect or send, the address of a bind, the remote
    /// peer of an inbound packet (whose `port` is then the local port it was sent to). `pid` and `comm` are zero
    /// for inbound packets (they are not sent by any task of the cgroup).
    pub who: OriginalDst,
    /// `REFUSED_*`.
    pub kind: u16,
    /// The socket's address family (`AF_*`), type (`SOCK_*`) and protocol as the program saw them.
    pub sock_family: u16,
    pub sock_type: u16,
    pub _pad: u16,
    pub protocol: u32,
    pub _pad2: u32,
}

/// Key of the `REFUSAL_RATE` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateKey {
    /// The refusing task's cgroup (for inbound packets: the receiving socket's).
    pub cgroup_id: u64,
    /// `REFUSED_*`.
    pub kind: u32,
    pub _pad: u32,
}

/// Value of the `REFUSAL_RATE` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateState {
    /// Refusals so far (monotonic).
    pub total: u64,
    /// Start of the current window (`bpf_ktime_get_ns`).
    pub window_start: u64,
    /// Events sent in the current window.
    pub in_window: u64,
    /// The cgroup's profile when the entry was created.
    pub tag: Tag,
}

/// Value of the `SOCKETS` (by socket cookie) and `ORIGINS` / `PEERS` (by [`SockKey`]) maps: what the connect really
/// was.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst {
    /// Cgroup id of the connecting task.
    pub cgroup_id: u64,
    /// Destination address as the kernel holds it (network byte order words); IPv4 uses `addr[0]` only.
    pub addr: [u32; 4],
    /// Destination port, host byte order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`] (an IPv4-mapped IPv6 destination stays `FAMILY_V6`).
    pub family: u16,
    /// Thread-group id (the process id) of the connecting task.
    pub pid: u32,
    pub uid: u32,
    pub _pad: u32,
    /// Command name of the connecting task, NUL-padded.
    pub comm: [u8; COMM_LEN],
    /// The profile of the tagged cgroup that matched (copied from the `TAGGED` value at connect time).
    pub tag: Tag,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY (all): `#[repr(C)]`, only integer/array fields, no padding bytes (asserted below), every bit pattern
    // valid.
    unsafe impl aya::Pod for super::Tag {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::OriginalDst {}
    unsafe impl aya::Pod for super::ProfileFlags {}
    unsafe impl aya::Pod for super::Refusal {}
    unsafe impl aya::Pod for super::RateKey {}
    unsafe impl aya::Pod for super::RateState {}
}

const _: () = assert!(
    core::mem::size_of::<OriginalDst>() == 8 + 16 + 2 + 2 + 4 + 4 + 4 + COMM_LEN + PROFILE_NAME_LEN
);
const _: () = assert!(core::mem::size_of::<SockKey>() == 16 + 2 + 2);
const _: () = assert!(
    core::mem::size_of::<Refusal>() == 8 + core::mem::size_of::<OriginalDst>() + 2 * 4 + 4 + 4
);
const _: () = assert!(core::mem::size_of::<RateKey>() == 16);
const _: () = assert!(core::mem::size_of::<RateState>() == 3 * 8 + PROFILE_NAME_LEN);
