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

/// `AF_INET` / `AF_INET6` as stored in [`OriginalDst::family`] and [`PortKey::family`].
pub const FAMILY_V4: u16 = 2;
pub const FAMILY_V6: u16 = 10;

/// Map names, shared so the loader and the kernel object cannot drift apart.
pub const MAP_TAGGED: &str = "TAGGED";
pub const MAP_SOCKETS: &str = "SOCKETS";
pub const MAP_ORIGINS: &str = "ORIGINS";
/// DNS sockets redirected to the daemon's DNS listener, by socket cookie: the resolver they were sent to and the
/// caller (value [`OriginalDst`]). Read by the recvmsg programs to restore the resolver's address on replies.
pub const MAP_DNS_SOCKETS: &str = "DNS_SOCKETS";
/// The same entries keyed by the client's local port and the datagram's family ([`PortKey`]), filled when a
/// redirected DNS socket sends: what the daemon's DNS listener sees as its peer.
pub const MAP_DNS_PEERS: &str = "DNS_PEERS";
/// Global patched by the loader: the proxy port connects are redirected to.
pub const GLOBAL_PROXY_PORT: &str = "PROXY_PORT";
/// Global patched by the loader: the port of the daemon's DNS listener on 127.0.0.1 and ::1.
pub const GLOBAL_DNS_PORT: &str = "DNS_PORT";
/// Global patched by the loader: the daemon's process id (its connects are never redirected).
pub const GLOBAL_DAEMON_TGID: &str = "DAEMON_TGID";

/// Value of the `TAGGED` map (key: cgroup id, `u64`): the profile the cgroup and all its descendants belong to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    /// Profile name, UTF-8, NUL-padded.
    pub profile: [u8; PROFILE_NAME_LEN],
}

/// Key of the `ORIGINS` and `DNS_PEERS` maps: the client side of a redirected connection (or DNS socket) as the
/// daemon sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortKey {
    /// Local (client) port, host byte order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`]: the family of the socket as redirected (for `DNS_PEERS`: of the datagram,
    /// which is IPv4 when an IPv6 socket sent to an IPv4-mapped address).
    pub family: u16,
}

/// Value of the `SOCKETS` (by socket cookie) and `ORIGINS` (by [`PortKey`]) maps: what the connect really was.
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
    // SAFETY (all three): `#[repr(C)]`, only integer/array fields, no padding bytes, every bit pattern valid.
    unsafe impl aya::Pod for super::Tag {}
    unsafe impl aya::Pod for super::PortKey {}
    unsafe impl aya::Pod for super::OriginalDst {}
}

const _: () = assert!(
    core::mem::size_of::<OriginalDst>() == 8 + 16 + 2 + 2 + 4 + 4 + 4 + COMM_LEN + PROFILE_NAME_LEN
);
const _: () = assert!(core::mem::size_of::<PortKey>() == 4);
