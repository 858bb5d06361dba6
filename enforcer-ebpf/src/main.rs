//! Kernel programs of the enforcer: cgroup hooks that hold a tagged process (its cgroup or an ancestor is in
//! `TAGGED`) to what the proxy and the DNS stage carry, and redirect its connections there. Untagged processes are
//! untouched; the tag is always checked first, so nothing about a tagged process (not its pid, not a socket mark it
//! could set) ever exempts it.
//!
//! - `socket_create` (lsm_cgroup, when the kernel runs the BPF LSM) and `sock_create` (cgroup/sock_create): a tagged
//!   process may create Unix, netlink, TCP (and MPTCP) and UDP (and UDP-Lite) sockets, nothing else: raw, packet,
//!   ICMP "ping", SCTP, vsock and every other family and type are refused with `EPERM`. `socket_create` decides the
//!   families other than IPv4/IPv6 (the inet hook never sees them), `sock_create` the IPv4/IPv6 types and protocols.
//! - `connect4` / `connect6`: a tagged TCP connect is redirected to 127.0.0.1 / ::1 at `PROXY_PORT`, the original
//!   destination and the caller recorded by socket cookie in `SOCKETS` (refused when they cannot be recorded). A
//!   connect straight to the proxy port is recorded too (with the proxy as its destination), so the proxy can name
//!   the agent when it refuses it. A tagged UDP connect is refused unless its destination port is 53 (DNS): that is
//!   redirected to the daemon's DNS listener (127.0.0.1 / ::1 at `DNS_PORT`), the resolver it named and the caller
//!   recorded by cookie in `DNS_SOCKETS` (refused when it cannot be recorded). Any other socket kind is refused.
//!   IPv4-mapped IPv6 destinations take the IPv6 hook and the same rules.
//! - `sendmsg4` / `sendmsg6`: the same refusal and DNS redirect for unconnected UDP sends (`sendto`/`sendmsg` with an
//!   address; the kernel runs the IPv4 hook for IPv4-mapped destinations of IPv6 sockets). Sends on a connected
//!   socket need no hook: its connect already passed `connect4`/`connect6`. An unconnected socket that sends to
//!   several resolvers keeps the last one.
//! - `recvmsg4` / `recvmsg6`: on a redirected DNS socket, a datagram from the DNS listener is reported as coming from
//!   the recorded resolver, so resolvers that check the reply's source (glibc does) accept it.
//! - `getpeername4` / `getpeername6`: a redirected socket reports its original destination as its peer, not the
//!   proxy (TCP and MPTCP through `PEERS`, DNS sockets through `DNS_SOCKETS`).
//! - `bind4` / `bind6`: a tagged process may bind a non-loopback address (the wildcard included) only with port 0,
//!   i.e. as a client choosing its source; a server's bind is refused unless its profile accepts inbound
//!   connections (`PROFILES`). A port the daemon listens on or depends on (`DAEMON_PORTS`: its proxy, DNS, explicit
//!   proxy, metrics and review ports, a loopback webhook receiver's) is refused on every address, loopback included,
//!   whatever the profile: an agent holding the proxy or DNS port while the daemon restarts would be sent the other
//!   agents' redirected connections and queries (the pinned programs keep redirecting there).
//! - `inbound` (cgroup_skb ingress): a packet from another host (anything not received on the loopback device) to
//!   a socket of a tagged cgroup is dropped unless its profile accepts inbound connections. This also covers
//!   `listen()` on a socket that was never bound (the kernel binds it to the wildcard without running the bind
//!   hook).
//! - `device_egress` (tc egress, on every network device but loopback): a frame owned by a socket of a tagged cgroup
//!   never leaves through a device unless its profile serves. Tagged connections and DNS only ever reach loopback,
//!   so this drops nothing they carry; it stops whatever got past the socket hooks (a packet socket where the BPF
//!   LSM cannot run, a raw socket created before its process was tagged). `setsockopt` keeps sockets from
//!   bypassing that check (`PACKET_QDISC_BYPASS`, AF_XDP rings).
//! - `dns_peer` (cgroup_skb egress): when a redirected DNS socket sends, copy its `DNS_SOCKETS` entry to `DNS_PEERS`
//!   keyed by the datagram's source address and port, which is what the DNS listener sees as its peer.
//! - `rekey_established` (sock_ops): when a redirected connection is established, move its entry to `ORIGINS` and
//!   `PEERS`, keyed by its local address, which is what the proxy sees as its peer; `PEERS` is cleared when the
//!   connection closes.
//! - `sock_release` (cgroup/sock_release): a closed socket's cookie-keyed entries are removed.
//!
//! Every refusal is sent to the daemon through the `REFUSALS` ring buffer, at most `REFUSAL_BURST` per cgroup and
//! kind each second; `REFUSAL_RATE` counts all of them, so the daemon knows how many it was not sent.
//!
//! No policy here: only "is this cgroup tagged", "may its profile serve" and "is this the proxy itself".
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{
            bpf_sock_addr, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB,
            BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE,
        },
        cty::c_void,
        helpers::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
            bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_get_socket_cookie,
            bpf_get_socket_uid, bpf_ktime_get_ns, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
        },
        macros::{
            cgroup_skb, cgroup_sock, cgroup_sock_addr, cgroup_sockopt, classifier, lsm_cgroup, map,
            sock_ops,
        },
        maps::{HashMap, LruHashMap, RingBuf},
        programs::{
            LsmContext, SkBuffContext, SockAddrContext, SockContext, SockOpsContext,
            SockoptContext, TcContext,
        },
        EbpfContext,
    };
    use aya_log_ebpf::debug;
    use enforcer_common::{
        OriginalDst, ProfileFlags, RateKey, RateState, Refusal, SockKey, Tag, COMM_LEN,
        DAEMON_PORTS_MAX, FAMILY_V4, FAMILY_V6, MAX_CGROUP_DEPTH, PROFILE_ACCEPT_INBOUND,
        REFUSALS_BYTES, REFUSAL_BURST, REFUSAL_WINDOW_NS, REFUSED_BIND, REFUSED_CONNECT,
        REFUSED_INBOUND, REFUSED_SENDMSG, REFUSED_SOCKET, REFUSED_SOCKOPT, REFUSED_TRANSMIT,
        UID_UNKNOWN,
    };

    const ALLOW: i32 = 1;
    const REFUSE: i32 = 0;
    const AF_UNIX: i32 = 1;
    const AF_INET: u32 = 2;
    const AF_INET6: u32 = 10;
    const AF_NETLINK: i32 = 16;
    const SOCK_STREAM: u32 = 1;
    const SOCK_DGRAM: u32 = 2;
    const IPPROTO_TCP: u32 = 6;
    const IPPROTO_UDP: u32 = 17;
    const IPPROTO_UDPLITE: u32 = 136;
    const IPPROTO_MPTCP: u32 = 262;
    const TC_ACT_OK: i32 = 0;
    const TC_ACT_SHOT: i32 = 2;
    const SOL_PACKET: i32 = 263;
    const PACKET_QDISC_BYPASS: i32 = 20;
    const SOL_XDP: i32 = 283;
    /// The only UDP destination port a tagged cgroup may use (and it is redirected to the daemon).
    const DNS: u16 = 53;
    const ETH_P_IPV6: u16 = 0x86dd;
    /// The loopback device's index, the same in every network namespace.
    const LOOPBACK_IFINDEX: u32 = 1;
    /// Offsets in the IPv4 and IPv6 headers (cgroup skb programs see the packet from L3).
    const IPV4_PROTOCOL: usize = 9;
    const IPV4_SADDR: usize = 12;
    const IPV6_NEXT_HEADER: usize = 6;
    const IPV6_SADDR: usize = 8;
    const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
    const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
    const V6_LOOPBACK_LAST: u32 = u32::from_ne_bytes([0, 0, 0, 1]);

    /// Patched by the loader (`EbpfLoader::override_global`).
    #[no_mangle]
    static PROXY_PORT: u16 = 15001;

    /// Patched by the loader: the daemon's DNS listener port.
    #[no_mangle]
    static DNS_PORT: u16 = 15053;

    /// Patched by the loader: the cgroup the daemon runs in (see `in_daemon_cgroup`).
    #[no_mangle]
    static DAEMON_CGROUP: u64 = 0;

    #[map(name = "TAGGED")]
    static TAGGED: HashMap<u64, Tag> = HashMap::with_max_entries(4096, 0);

    #[map(name = "PROFILES")]
    static PROFILES: HashMap<Tag, ProfileFlags> = HashMap::with_max_entries(1024, 0);

    #[map(name = "DAEMON_PORTS")]
    static DAEMON_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(DAEMON_PORTS_MAX, 0);

    #[map(name = "SOCKETS")]
    static SOCKETS: LruHashMap<u64, OriginalDst> = LruHashMap::with_max_entries(65536, 0);

    #[map(name = "ORIGINS")]
    static ORIGINS: LruHashMap<SockKey, OriginalDst> = LruHashMap::with_max_entries(65536, 0);

    #[map(name = "PEERS")]
    static PEERS: LruHashMap<SockKey, OriginalDst> = LruHashMap::with_max_entries(65536, 0);

    #[map(name = "DNS_SOCKETS")]
    static DNS_SOCKETS: LruHashMap<u64, OriginalDst> = LruHashMap::with_max_entries(65536, 0);

    #[map(name = "DNS_PEERS")]
    static DNS_PEERS: LruHashMap<SockKey, OriginalDst> = LruHashMap::with_max_entries(65536, 0);

    #[map(name = "REFUSALS")]
    static REFUSALS: RingBuf = RingBuf::with_byte_size(REFUSALS_BYTES, 0);

    #[map(name = "REFUSAL_RATE")]
    static REFUSAL_RATE: LruHashMap<RateKey, RateState> = LruHashMap::with_max_entries(4096, 0);

    #[inline(always)]
    fn proxy_port() -> u16 {
        // SAFETY: a read-only global patched before load; volatile so the compiler keeps the load.
        unsafe { core::ptr::read_volatile(&PROXY_PORT) }
    }

    #[inline(always)]
    fn dns_port() -> u16 {
        // SAFETY: a read-only global patched before load; volatile so the compiler keeps the load.
        unsafe { core::ptr::read_volatile(&DNS_PORT) }
    }

    /// Whether the current task runs in the daemon's own cgroup. Asked only of tagged tasks: a tagged task there
    /// means the daemon's cgroup was tagged behind its back, and its sockets are refused (never redirected back to
    /// itself, never exempted).
    #[inline(always)]
    fn in_daemon_cgroup() -> bool {
        // SAFETY: a read-only global patched before load; volatile so the compiler keeps the load.
        let daemon = unsafe { core::ptr::read_volatile(&DAEMON_CGROUP) };
        // SAFETY: plain helper call.
        daemon != 0 && unsafe { bpf_get_current_cgroup_id() } == daemon
    }

    /// The tag of the deepest tagged cgroup on a path from the root, walked with `ancestor(level)` (0 = the root;
    /// 0 returned past the leaf), if any.
    #[inline(always)]
    fn deepest_tag(ancestor: impl Fn(i32) -> u64) -> Option<Tag> {
        let mut found = 0;
        let mut level = 0;
        while level < MAX_CGROUP_DEPTH {
            let id = ancestor(level);
            if id == 0 {
                break;
            }
            if TAGGED.get_ptr(&id).is_some() {
                found = id;
            }
            level += 1;
        }
        if found == 0 {
            return None;
        }
        let ptr = TAGGED.get_ptr(&found)?;
        // SAFETY: a non-null pointer into a map value of type Tag, copied out at once.
        Some(unsafe { core::ptr::read_volatile(ptr) })
    }

    /// The tag of the current task's deepest tagged cgroup, if any.
    #[inline(always)]
    fn current_tag() -> Option<Tag> {
        // SAFETY: plain helper call, no pointers.
        deepest_tag(|level| unsafe { bpf_get_current_ancestor_cgroup_id(level) })
    }

    /// Whether a tagged cgroup's profile may serve (bind non-loopback addresses, receive from other hosts).
    #[inline(always)]
    fn accepts_inbound(tag: &Tag) -> bool {
        PROFILES
            .get_ptr(tag)
            // SAFETY: a non-null pointer into a map value, read at once.
            .is_some_and(
                |p| unsafe { core::ptr::read_volatile(&(*p).flags) } & PROFILE_ACCEPT_INBOUND != 0,
            )
    }

    /// The current task as the caller of a connect, send or refusal; the address part is left empty.
    #[inline(always)]
    fn caller(tag: Tag) -> OriginalDst {
        let comm = bpf_get_current_comm().unwrap_or([0u8; COMM_LEN]);
        OriginalDst {
            // SAFETY: plain helper call.
            cgroup_id: unsafe { bpf_get_current_cgroup_id() },
            addr: [0; 4],
            port: 0,
            family: 0,
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            uid: bpf_get_current_uid_gid() as u32,
            _pad: 0,
            comm,
            tag,
        }
    }

    /// What a socket was, for a refusal event: (`AF_*`, `SOCK_*`, protocol).
    #[derive(Clone, Copy)]
    struct SockKind {
        family: u16,
        type_: u16,
        protocol: u32,
    }

    /// Count a refusal in `REFUSAL_RATE` and send it to the daemon, unless this cgroup already sent
    /// `REFUSAL_BURST` of this kind in the current window (then it is only counted).
    #[inline(always)]
    fn report(kind: u16, who: &OriginalDst, sock: SockKind) {
        let key = RateKey {
            cgroup_id: who.cgroup_id,
            kind: u32::from(kind),
            _pad: 0,
        };
        // SAFETY: plain helper call.
        let now = unsafe { bpf_ktime_get_ns() };
        let total = match REFUSAL_RATE.get_ptr_mut(&key) {
            Some(state) => {
                // SAFETY: a non-null pointer into a map value. The BPF target has no atomic read-modify-write in
                // Rust: refusals of one cgroup on several CPUs at the same instant may count once (an
                // undercount of the unreported, never a record lost).
                unsafe {
                    let total = core::ptr::read_volatile(&(*state).total) + 1;
                    core::ptr::write_volatile(&mut (*state).total, total);
                    if now.wrapping_sub((*state).window_start) >= REFUSAL_WINDOW_NS {
                        (*state).window_start = now;
                        (*state).in_window = 0;
                    }
                    if (*state).in_window >= REFUSAL_BURST {
                        return;
                    }
                    (*state).in_window += 1;
                    total
                }
            }
            None => {
                let state = RateState {
                    total: 1,
                    window_start: now,
                    in_window: 1,
                    tag: who.tag,
                };
                let _ = REFUSAL_RATE.insert(&key, &state, 0);
                1
            }
        };
        if let Some(mut entry) = REFUSALS.reserve::<Refusal>(0) {
            let e = entry.as_mut_ptr();
            // SAFETY: `e` points at reserved ring buffer memory of a `Refusal`; every field is written (in place,
            // so the event never sits on the small BPF stack) before it is submitted.
            unsafe {
                core::ptr::addr_of_mut!((*e).total).write(total);
                core::ptr::addr_of_mut!((*e).who).write(*who);
                core::ptr::addr_of_mut!((*e).kind).write(kind);
                core::ptr::addr_of_mut!((*e).sock_family).write(sock.family);
                core::ptr::addr_of_mut!((*e).sock_type).write(sock.type_);
                core::ptr::addr_of_mut!((*e)._pad).write(0);
                core::ptr::addr_of_mut!((*e).protocol).write(sock.protocol);
                core::ptr::addr_of_mut!((*e)._pad2).write(0);
            }
            entry.submit(0);
        }
    }

    /// Refuse (and report) something the current, tagged task tried on a socket; `addr`, `port`, `family` name
    /// the address involved.
    #[inline(always)]
    fn refuse(kind: u16, tag: Tag, sock: SockKind, addr: [u32; 4], port: u16, family: u16) -> i32 {
        let mut who = caller(tag);
        who.addr = addr;
        who.port = port;
        who.family = family;
        report(kind, &who, sock);
        REFUSE
    }

    #[inline(always)]
    fn is_tcp(protocol: u32) -> bool {
        protocol == IPPROTO_TCP || protocol == IPPROTO_MPTCP
    }

    #[inline(always)]
    fn is_udp(protocol: u32) -> bool {
        protocol == IPPROTO_UDP || protocol == IPPROTO_UDPLITE
    }

    /// The IPv4/IPv6 sockets the proxy and the DNS stage carry.
    #[inline(always)]
    fn carried(type_: u32, protocol: u32) -> bool {
        (type_ == SOCK_STREAM && is_tcp(protocol)) || (type_ == SOCK_DGRAM && is_udp(protocol))
    }

    #[inline(always)]
    fn is_loopback4(ip4: u32) -> bool {
        ip4.to_ne_bytes()[0] == 127
    }

    #[inline(always)]
    fn is_loopback6(ip6: &[u32; 4]) -> bool {
        ip6[0] == 0
            && ip6[1] == 0
            && ((ip6[2] == 0 && ip6[3] == V6_LOOPBACK_LAST)
                || (ip6[2] == V4_MAPPED_PREFIX && is_loopback4(ip6[3])))
    }

    /// A socket's local address as a map key: IPv4-mapped IPv6 addresses become IPv4 (what the daemon sees).
    #[inline(always)]
    fn sock_key(family: u16, ip4: u32, ip6: [u32; 4], port: u16) -> SockKey {
        if family == FAMILY_V6 && !(ip6[0] == 0 && ip6[1] == 0 && ip6[2] == V4_MAPPED_PREFIX) {
            SockKey {
                addr: ip6,
                port,
                family: FAMILY_V6,
            }
        } else {
            let ip4 = if family == FAMILY_V6 { ip6[3] } else { ip4 };
            SockKey {
                addr: [ip4, 0, 0, 0],
                port,
                family: FAMILY_V4,
            }
        }
    }

    /// The fields of a sock_addr context every program reads: (type, protocol, port).
    #[inline(always)]
    fn sock_addr_fields(p: *const bpf_sock_addr) -> (u32, u32, u16) {
        // SAFETY: ctx fields readable by every cgroup sock_addr program (4-byte loads).
        let (type_, protocol, port_be) = unsafe {
            (
                core::ptr::read_volatile(&(*p).type_),
                core::ptr::read_volatile(&(*p).protocol),
                core::ptr::read_volatile(&(*p).user_port),
            )
        };
        (type_, protocol, u16::from_be(port_be as u16))
    }

    /// A sock_addr program's address family: the IPv4 programs (`V6 = false`) may touch only `user_ip4`, the IPv6
    /// ones only `user_ip6` (the verifier rejects the other), so every access goes through these, whose other
    /// branch is compiled out.
    struct Family<const V6: bool>;

    impl<const V6: bool> Family<V6> {
        /// `AF_INET` / `AF_INET6`.
        const AF: u16 = if V6 { AF_INET6 as u16 } else { AF_INET as u16 };
        /// How addresses of this family are stored ([`FAMILY_V4`] / [`FAMILY_V6`]).
        const STORED: u16 = if V6 { FAMILY_V6 } else { FAMILY_V4 };
        /// 127.0.0.1 / ::1, as the kernel holds it (IPv4 in the first word).
        const LOOPBACK: [u32; 4] = if V6 {
            [0, 0, 0, V6_LOOPBACK_LAST]
        } else {
            [LOOPBACK4, 0, 0, 0]
        };

        /// The address the program sees (IPv4 in the first word).
        #[inline(always)]
        fn user_addr(p: *const bpf_sock_addr) -> [u32; 4] {
            // SAFETY: only the user_ip field of this program's family is read (4-byte loads).
            unsafe {
                if V6 {
                    [
                        core::ptr::read_volatile(&(*p).user_ip6[0]),
                        core::ptr::read_volatile(&(*p).user_ip6[1]),
                        core::ptr::read_volatile(&(*p).user_ip6[2]),
                        core::ptr::read_volatile(&(*p).user_ip6[3]),
                    ]
                } else {
                    [core::ptr::read_volatile(&(*p).user_ip4), 0, 0, 0]
                }
            }
        }

        /// Rewrite the address and port the program sees. Only programs that may write them call this.
        #[inline(always)]
        fn write(p: *mut bpf_sock_addr, addr: [u32; 4], port: u16) {
            // SAFETY: only this family's user_ip field (one 4-byte store per word) and user_port are written.
            unsafe {
                if V6 {
                    core::ptr::write_volatile(&mut (*p).user_ip6[0], addr[0]);
                    core::ptr::write_volatile(&mut (*p).user_ip6[1], addr[1]);
                    core::ptr::write_volatile(&mut (*p).user_ip6[2], addr[2]);
                    core::ptr::write_volatile(&mut (*p).user_ip6[3], addr[3]);
                } else {
                    core::ptr::write_volatile(&mut (*p).user_ip4, addr[0]);
                }
                core::ptr::write_volatile(&mut (*p).user_port, u32::from(port.to_be()));
            }
        }

        #[inline(always)]
        fn is_loopback(addr: &[u32; 4]) -> bool {
            if V6 {
                is_loopback6(addr)
            } else {
                is_loopback4(addr[0])
            }
        }

        /// A stored address (`FAMILY_V4` or `FAMILY_V6`) as this family reports it: IPv4 on an IPv6 socket reads
        /// back IPv4-mapped; `None` when it cannot be reported on this family.
        #[inline(always)]
        fn reported(dst: &OriginalDst) -> Option<[u32; 4]> {
            match (V6, dst.family) {
                (false, FAMILY_V4) | (true, FAMILY_V6) => Some(dst.addr),
                (true, FAMILY_V4) => Some([0, 0, V4_MAPPED_PREFIX, dst.addr[0]]),
                _ => None,
            }
        }
    }

    // ---- socket creation ----

    /// Families other than IPv4/IPv6: a tagged task may create Unix and netlink sockets only. Kernel-internal
    /// sockets are never refused.
    #[lsm_cgroup(hook = "socket_create")]
    pub fn socket_create(ctx: LsmContext) -> i32 {
        let family: i32 = ctx.arg(0);
        let type_: i32 = ctx.arg(1);
        let protocol: i32 = ctx.arg(2);
        let kern: i32 = ctx.arg(3);
        if kern != 0
            || family == AF_UNIX
            || family == AF_NETLINK
            || family == AF_INET as i32
            || family == AF_INET6 as i32
        {
            return ALLOW;
        }
        let Some(tag) = current_tag() else {
            return ALLOW;
        };
        let sock = SockKind {
            family: family as u16,
            type_: type_ as u16,
            protocol: protocol as u32,
        };
        refuse(REFUSED_SOCKET, tag, sock, [0; 4], 0, 0)
    }

    /// IPv4/IPv6 sockets: a tagged task may create TCP, MPTCP, UDP and UDP-Lite sockets only.
    #[cgroup_sock(sock_create)]
    pub fn sock_create(ctx: SockContext) -> i32 {
        let sk = ctx.sock;
        // SAFETY: family, type and protocol are readable in sock_create (4-byte loads).
        let (family, type_, protocol) = unsafe {
            (
                core::ptr::read_volatile(&(*sk).family),
                core::ptr::read_volatile(&(*sk).type_),
                core::ptr::read_volatile(&(*sk).protocol),
            )
        };
        if carried(type_, protocol) {
            return ALLOW;
        }
        let Some(tag) = current_tag() else {
            return ALLOW;
        };
        let sock = SockKind {
            family: family as u16,
            type_: type_ as u16,
            protocol,
        };
        refuse(REFUSED_SOCKET, tag, sock, [0; 4], 0, 0)
    }

    /// A closed socket's cookie-keyed entries (a connect that never completed, a DNS socket) go at once.
    #[cgroup_sock(sock_release)]
    pub fn sock_release(ctx: SockContext) -> i32 {
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let _ = SOCKETS.remove(&cookie);
        let _ = DNS_SOCKETS.remove(&cookie);
        ALLOW
    }

    // ---- connect and send ----

    #[cgroup_sock_addr(connect4)]
    pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
        connect::<false>(&ctx)
    }

    #[cgroup_sock_addr(connect6)]
    pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
        connect::<true>(&ctx)
    }

    /// A connect: untagged, left alone; tagged, redirected or refused (and reported).
    #[inline(always)]
    fn connect<const V6: bool>(ctx: &SockAddrContext) -> i32 {
        let p = ctx.sock_addr;
        let (type_, protocol, port) = sock_addr_fields(p);
        let addr = Family::<V6>::user_addr(p);
        let Some(tag) = current_tag() else {
            return ALLOW;
        };
        if redirect::<V6>(ctx, tag, type_, protocol, addr, port).is_ok() {
            return ALLOW;
        }
        if V6 {
            debug!(ctx, "connect6 refused: port {}", port);
        } else {
            debug!(ctx, "connect4 refused: port {}", port);
        }
        let sock = SockKind {
            family: Family::<V6>::AF,
            type_: type_ as u16,
            protocol,
        };
        refuse(REFUSED_CONNECT, tag, sock, addr, port, Family::<V6>::STORED)
    }

    /// A tagged connect: redirected (`Ok`) or to be refused (`Err`).
    #[inline(always)]
    fn redirect<const V6: bool>(
        ctx: &SockAddrContext,
        tag: Tag,
        type_: u32,
        protocol: u32,
        addr: [u32; 4],
        port: u16,
    ) -> Result<(), ()> {
        if in_daemon_cgroup() || !carried(type_, protocol) {
            return Err(());
        }
        if type_ == SOCK_DGRAM {
            return if port == DNS {
                redirect_dns::<V6>(ctx, tag, addr)
            } else {
                Err(())
            };
        }
        let mut dst = caller(tag);
        // A connect to the proxy itself is recorded as one: the proxy then names the agent when it refuses it.
        dst.addr = if Family::<V6>::is_loopback(&addr) && port == proxy_port() {
            Family::<V6>::LOOPBACK
        } else {
            addr
        };
        dst.port = port;
        dst.family = Family::<V6>::STORED;
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if SOCKETS.insert(&cookie, &dst, 0).is_err() {
            debug!(
                ctx,
                "connect: could not record the original destination; refused"
            );
            return Err(());
        }
        Family::<V6>::write(ctx.sock_addr, Family::<V6>::LOOPBACK, proxy_port());
        if V6 {
            debug!(ctx, "connect6 redirected: pid {} port {}", dst.pid, port);
        } else {
            debug!(ctx, "connect4 redirected: pid {} port {}", dst.pid, port);
        }
        Ok(())
    }

    /// Send a tagged DNS datagram (connect or sendmsg; an IPv4-mapped one takes the IPv6 path on connect, the IPv4
    /// one on sendmsg) to the daemon's listener on 127.0.0.1 / ::1, its resolver and caller recorded by cookie;
    /// `Err` (refuse) when they could not be recorded.
    #[inline(always)]
    fn redirect_dns<const V6: bool>(
        ctx: &SockAddrContext,
        tag: Tag,
        addr: [u32; 4],
    ) -> Result<(), ()> {
        let mut dst = caller(tag);
        dst.addr = addr;
        dst.port = DNS;
        dst.family = Family::<V6>::STORED;
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if DNS_SOCKETS.insert(&cookie, &dst, 0).is_err() {
            debug!(ctx, "dns: could not record the resolver; refused");
            return Err(());
        }
        Family::<V6>::write(ctx.sock_addr, Family::<V6>::LOOPBACK, dns_port());
        Ok(())
    }

    #[cgroup_sock_addr(sendmsg4)]
    pub fn udp_sendmsg4(ctx: SockAddrContext) -> i32 {
        sendmsg::<false>(&ctx)
    }

    #[cgroup_sock_addr(sendmsg6)]
    pub fn udp_sendmsg6(ctx: SockAddrContext) -> i32 {
        sendmsg::<true>(&ctx)
    }

    /// An unconnected UDP send: untagged, left alone; tagged, DNS redirected, anything else refused.
    #[inline(always)]
    fn sendmsg<const V6: bool>(ctx: &SockAddrContext) -> i32 {
        let p = ctx.sock_addr;
        let (type_, protocol, port) = sock_addr_fields(p);
        let addr = Family::<V6>::user_addr(p);
        let Some(tag) = current_tag() else {
            return ALLOW;
        };
        if is_udp(protocol)
            && port == DNS
            && !in_daemon_cgroup()
            && redirect_dns::<V6>(ctx, tag, addr).is_ok()
        {
            return ALLOW;
        }
        if V6 {
            debug!(ctx, "sendmsg6 refused: port {}", port);
        } else {
            debug!(ctx, "sendmsg4 refused: port {}", port);
        }
        let sock = SockKind {
            family: Family::<V6>::AF,
            type_: type_ as u16,
            protocol,
        };
        refuse(REFUSED_SENDMSG, tag, sock, addr, port, Family::<V6>::STORED)
    }

    // ---- what a redirected socket reports ----

    /// recvmsg and getpeername programs must return 1; they only rewrite the reported address.
    const REPORT_OK: i32 = 1;

    #[cgroup_sock_addr(recvmsg4)]
    pub fn dns_recvmsg4(ctx: SockAddrContext) -> i32 {
        recvmsg::<false>(&ctx)
    }

    #[cgroup_sock_addr(recvmsg6)]
    pub fn dns_recvmsg6(ctx: SockAddrContext) -> i32 {
        recvmsg::<true>(&ctx)
    }

    /// A datagram from the DNS listener to a redirected DNS socket reads as coming from the recorded resolver.
    #[inline(always)]
    fn recvmsg<const V6: bool>(ctx: &SockAddrContext) -> i32 {
        let p = ctx.sock_addr;
        let (_, _, port) = sock_addr_fields(p);
        let from = Family::<V6>::user_addr(p);
        if Family::<V6>::is_loopback(&from) && port == dns_port() {
            restore_dns::<V6>(ctx);
        }
        REPORT_OK
    }

    /// Report a redirected DNS socket's resolver instead of the DNS listener.
    #[inline(always)]
    fn restore_dns<const V6: bool>(ctx: &SockAddrContext) {
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: the value is copied out immediately.
        if let Some(dst) = (unsafe { DNS_SOCKETS.get(&cookie) }).copied() {
            if let Some(addr) = Family::<V6>::reported(&dst) {
                Family::<V6>::write(ctx.sock_addr, addr, dst.port);
            }
        }
    }

    #[cgroup_sock_addr(getpeername4)]
    pub fn peer_getpeername4(ctx: SockAddrContext) -> i32 {
        getpeername::<false>(&ctx)
    }

    #[cgroup_sock_addr(getpeername6)]
    pub fn peer_getpeername6(ctx: SockAddrContext) -> i32 {
        getpeername::<true>(&ctx)
    }

    /// A redirected socket's peer is its original destination: TCP/MPTCP from `PEERS` (keyed by the socket's local
    /// address, which an MPTCP socket shares with the subflow that was redirected), DNS from `DNS_SOCKETS`.
    #[inline(always)]
    fn getpeername<const V6: bool>(ctx: &SockAddrContext) -> i32 {
        let p = ctx.sock_addr;
        let (_, _, port) = sock_addr_fields(p);
        if !Family::<V6>::is_loopback(&Family::<V6>::user_addr(p)) {
            return REPORT_OK;
        }
        if port == dns_port() {
            restore_dns::<V6>(ctx);
        } else if port == proxy_port() {
            // SAFETY: `sk` is readable by every sock_addr program (an 8-byte load of a non-null socket pointer);
            // its source address and port are readable through it (4-byte loads).
            let key = unsafe {
                let sk = core::ptr::read_volatile(&(*p).__bindgen_anon_1.sk);
                let src_port = core::ptr::read_volatile(&(*sk).src_port) as u16;
                if V6 {
                    let src = [
                        core::ptr::read_volatile(&(*sk).src_ip6[0]),
                        core::ptr::read_volatile(&(*sk).src_ip6[1]),
                        core::ptr::read_volatile(&(*sk).src_ip6[2]),
                        core::ptr::read_volatile(&(*sk).src_ip6[3]),
                    ];
                    sock_key(FAMILY_V6, 0, src, src_port)
                } else {
                    let src = core::ptr::read_volatile(&(*sk).src_ip4);
                    sock_key(FAMILY_V4, src, [0; 4], src_port)
                }
            };
            // SAFETY: the value is copied out immediately.
            if let Some(dst) = (unsafe { PEERS.get(&key) }).copied() {
                if let Some(addr) = Family::<V6>::reported(&dst) {
                    Family::<V6>::write(p, addr, dst.port);
                }
            }
        }
        REPORT_OK
    }

    // ---- serving ----

    #[cgroup_sock_addr(bind4)]
    pub fn serve_bind4(ctx: SockAddrContext) -> i32 {
        bind::<false>(&ctx)
    }

    #[cgroup_sock_addr(bind6)]
    pub fn serve_bind6(ctx: SockAddrContext) -> i32 {
        bind::<true>(&ctx)
    }

    /// A tagged server's bind (a non-loopback address with a port) is refused unless its profile serves; a tagged
    /// bind of one of the daemon's ports is refused on any address.
    #[inline(always)]
    fn bind<const V6: bool>(ctx: &SockAddrContext) -> i32 {
        let p = ctx.sock_addr;
        let (type_, protocol, port) = sock_addr_fields(p);
        let addr = Family::<V6>::user_addr(p);
        if port == 0 {
            return ALLOW;
        }
        let daemons = DAEMON_PORTS.get_ptr(&port).is_some();
        if !daemons && Family::<V6>::is_loopback(&addr) {
            return ALLOW;
        }
        let Some(tag) = current_tag() else {
            return ALLOW;
        };
        if !daemons && accepts_inbound(&tag) {
            return ALLOW;
        }
        let sock = SockKind {
            family: Family::<V6>::AF,
            type_: type_ as u16,
            protocol,
        };
        refuse(REFUSED_BIND, tag, sock, addr, port, Family::<V6>::STORED)
    }

    /// Every ingress packet of the attached cgroups' sockets passes here. From the loopback device: passed at once.
    /// From another host to a socket of a tagged cgroup whose profile does not serve: dropped and reported.
    #[cgroup_skb(ingress)]
    pub fn inbound(ctx: SkBuffContext) -> i32 {
        let skb = ctx.skb.skb;
        // SAFETY: ingress_ifindex is readable by cgroup skb programs (4-byte load).
        if unsafe { core::ptr::read_volatile(&(*skb).ingress_ifindex) } == LOOPBACK_IFINDEX {
            return ALLOW;
        }
        // SAFETY: plain helper call on the program's own context.
        let Some(tag) = deepest_tag(|level| unsafe { bpf_skb_ancestor_cgroup_id(skb, level) })
        else {
            return ALLOW;
        };
        if accepts_inbound(&tag) {
            return ALLOW;
        }
        let v6 = u16::from_be(ctx.skb.protocol() as u16) == ETH_P_IPV6;
        let mut who = OriginalDst {
            // SAFETY: plain helper calls on the program's own context.
            cgroup_id: unsafe { bpf_skb_cgroup_id(skb) },
            addr: [0; 4],
            port: ctx.skb.local_port() as u16,
            family: if v6 { FAMILY_V6 } else { FAMILY_V4 },
            pid: 0,
            // SAFETY: as above.
            uid: unsafe { bpf_get_socket_uid(skb) },
            _pad: 0,
            comm: [0; COMM_LEN],
            tag,
        };
        let protocol = if v6 {
            if let Ok(addr) = ctx.load::<[u32; 4]>(IPV6_SADDR) {
                who.addr = addr;
            }
            ctx.load::<u8>(IPV6_NEXT_HEADER)
        } else {
            if let Ok(addr) = ctx.load::<u32>(IPV4_SADDR) {
                who.addr[0] = addr;
            }
            ctx.load::<u8>(IPV4_PROTOCOL)
        };
        // The socket type is not known here; the packet's protocol is.
        let sock = SockKind {
            family: if v6 { AF_INET6 as u16 } else { AF_INET as u16 },
            type_: 0,
            protocol: u32::from(protocol.unwrap_or(0)),
        };
        report(REFUSED_INBOUND, &who, sock);
        REFUSE
    }

    /// Every frame leaving a network device other than loopback passes here. One owned by a socket of a tagged
    /// cgroup whose profile does not serve is dropped and reported; frames without a socket (forwarded, or sent by
    /// the kernel itself) and untagged sockets' frames pass at once.
    #[classifier]
    pub fn device_egress(ctx: TcContext) -> i32 {
        let skb = ctx.skb.skb;
        // SAFETY: plain helper call on the program's own context (0 when the frame has no full socket).
        let Some(tag) = deepest_tag(|level| unsafe { bpf_skb_ancestor_cgroup_id(skb, level) })
        else {
            return TC_ACT_OK;
        };
        if accepts_inbound(&tag) {
            return TC_ACT_OK;
        }
        let who = OriginalDst {
            // SAFETY: plain helper call on the program's own context.
            cgroup_id: unsafe { bpf_skb_cgroup_id(skb) },
            addr: [0; 4],
            port: 0,
            family: 0,
            pid: 0,
            uid: UID_UNKNOWN,
            _pad: 0,
            comm: [0; COMM_LEN],
            tag,
        };
        // The socket is not known here: the frame's protocol (EtherType, network byte order) is.
        let sock = SockKind {
            family: 0,
            type_: 0,
            protocol: ctx.skb.protocol(),
        };
        report(REFUSED_TRANSMIT, &who, sock);
        TC_ACT_SHOT
    }

    /// Socket options that would take a tagged socket's frames past `device_egress`: packet sockets' qdisc bypass
    /// and every AF_XDP option (an XDP socket cannot be used without them).
    #[cgroup_sockopt(setsockopt)]
    pub fn bypass_sockopt(ctx: SockoptContext) -> i32 {
        let p = ctx.sockopt;
        // SAFETY: level and optname are readable by setsockopt programs (4-byte loads).
        let (level, optname) = unsafe {
            (
                core::ptr::read_volatile(&(*p).level),
                core::ptr::read_volatile(&(*p).optname),
            )
        };
        if !(level == SOL_XDP || (level == SOL_PACKET && optname == PACKET_QDISC_BYPASS)) {
            return ALLOW;
        }
        let Some(tag) = current_tag() else {
            return ALLOW;
        };
        let sock = SockKind {
            family: 0,
            type_: 0,
            protocol: ((level as u32) << 16) | (optname as u32 & 0xffff),
        };
        refuse(REFUSED_SOCKOPT, tag, sock, [0; 4], 0, 0)
    }

    // ---- where the daemon finds a redirected socket's origin ----

    /// Every egress packet of the attached cgroups passes here: one cookie lookup, and for a redirected DNS socket
    /// its entry copied to `DNS_PEERS` under the datagram's source address. Never drops anything.
    #[cgroup_skb(egress)]
    pub fn dns_peer(ctx: SkBuffContext) -> i32 {
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut c_void) };
        // SAFETY: the value is copied out immediately.
        if let Some(dst) = (unsafe { DNS_SOCKETS.get(&cookie) }).copied() {
            let port = ctx.skb.local_port() as u16;
            let key = if u16::from_be(ctx.skb.protocol() as u16) == ETH_P_IPV6 {
                ctx.load::<[u32; 4]>(IPV6_SADDR)
                    .map(|src| sock_key(FAMILY_V6, 0, src, port))
            } else {
                ctx.load::<u32>(IPV4_SADDR)
                    .map(|src| sock_key(FAMILY_V4, src, [0; 4], port))
            };
            if let Ok(key) = key {
                let _ = DNS_PEERS.insert(&key, &dst, 0);
            }
        }
        1
    }

    #[sock_ops]
    pub fn rekey_established(ctx: SockOpsContext) -> u32 {
        let op = ctx.op();
        if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_STATE_CB {
            return 1;
        }
        let key = if ctx.family() == AF_INET6 {
            sock_key(FAMILY_V6, 0, ctx.local_ip6(), ctx.local_port() as u16)
        } else {
            sock_key(FAMILY_V4, ctx.local_ip4(), [0; 4], ctx.local_port() as u16)
        };
        if op == BPF_SOCK_OPS_STATE_CB {
            // Only redirected connections asked for state callbacks: clear what getpeername read.
            if ctx.arg(1) == BPF_TCP_CLOSE {
                let _ = PEERS.remove(&key);
            }
            return 1;
        }
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: the value is copied out immediately.
        let Some(dst) = (unsafe { SOCKETS.get(&cookie) }).copied() else {
            return 1;
        };
        if ORIGINS.insert(&key, &dst, 0).is_err() {
            debug!(&ctx, "sockops: could not re-key a redirected socket");
        }
        if PEERS.insert(&key, &dst, 0).is_ok() {
            let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        }
        let _ = SOCKETS.remove(&cookie);
        1
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(target_arch = "bpf")]
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
