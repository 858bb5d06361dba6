//! Kernel programs of the enforcer: cgroup connect hooks that redirect tagged processes' sockets to the proxy.
//!
//! - `connect4` / `connect6`: for a TCP socket of a tagged cgroup (the task's cgroup or an ancestor is in `TAGGED`),
//!   record the original destination and the caller by socket cookie in `SOCKETS` and rewrite the destination to
//!   127.0.0.1 / ::1 at `PROXY_PORT`. A UDP (or UDP-Lite) connect from a tagged cgroup is refused (`EPERM`) unless
//!   its destination port is 53 (DNS): no datagram channel out of a tagged cgroup, and QUIC clients fall back to
//!   TCP. IPv4-mapped IPv6 destinations take the IPv6 hook and the same rule. A tagged UDP connect to port 53 is
//!   redirected to the daemon's DNS listener (127.0.0.1 / ::1 at `DNS_PORT`), the resolver it named and the caller
//!   recorded by socket cookie in `DNS_SOCKETS` (refused when it cannot be recorded: DNS never bypasses the policy).
//! - `sendmsg4` / `sendmsg6`: the same refusal and DNS redirect for unconnected UDP sends (`sendto`/`sendmsg` with an
//!   address; the kernel runs the IPv4 hook for IPv4-mapped destinations of IPv6 sockets). Sends on a connected
//!   socket need no hook: its connect already passed `connect4`/`connect6`. An unconnected socket that sends to
//!   several resolvers keeps the last one.
//! - `recvmsg4` / `recvmsg6`: on a redirected DNS socket, a datagram from the DNS listener is reported as coming from
//!   the recorded resolver, so resolvers that check the reply's source (glibc does) accept it.
//! - `dns_peer` (cgroup_skb egress): when a redirected DNS socket sends, copy its `DNS_SOCKETS` entry to `DNS_PEERS`
//!   keyed by its local port (known only once the socket is bound, after connect) and the datagram's family, which
//!   is what the DNS listener sees as its peer.
//! - `rekey_established` (sock_ops): when a redirected socket is established, move its entry to `ORIGINS` keyed by its local port, which
//!   is what the proxy sees as its peer.
//!
//! No policy here: only "is this cgroup tagged", "is this the proxy itself" and "is this the daemon" (its
//! upstream connects and datagrams are never redirected or refused, whatever cgroup it runs in). Untagged processes
//! are untouched.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
mod programs {
    use aya_ebpf::{
        bindings::{bpf_sock_addr, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
        cty::c_void,
        helpers::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_comm,
            bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_get_socket_cookie,
        },
        macros::{cgroup_skb, cgroup_sock_addr, map, sock_ops},
        maps::{HashMap, LruHashMap},
        programs::{SkBuffContext, SockAddrContext, SockOpsContext},
        EbpfContext,
    };
    use aya_log_ebpf::debug;
    use enforcer_common::{
        OriginalDst, PortKey, Tag, COMM_LEN, FAMILY_V4, FAMILY_V6, MAX_CGROUP_DEPTH,
    };

    const ALLOW: i32 = 1;
    const REFUSE: i32 = 0;
    const SOCK_STREAM: u32 = 1;
    const IPPROTO_UDP: u32 = 17;
    const IPPROTO_UDPLITE: u32 = 136;
    /// The only UDP destination port a tagged cgroup may use (and it is redirected to the daemon).
    const DNS: u16 = 53;
    const ETH_P_IPV6: u16 = 0x86dd;
    const LOOPBACK4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
    const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
    const V6_LOOPBACK_LAST: u32 = u32::from_ne_bytes([0, 0, 0, 1]);

    /// Patched by the loader (`EbpfLoader::override_global`).
    #[no_mangle]
    static PROXY_PORT: u16 = 15001;

    /// Patched by the loader: the daemon's DNS listener port.
    #[no_mangle]
    static DNS_PORT: u16 = 15053;

    /// Patched by the loader: the daemon's own process id, whose (upstream) connects are never redirected.
    #[no_mangle]
    static DAEMON_TGID: u32 = 0;

    #[map(name = "TAGGED")]
    static TAGGED: HashMap<u64, Tag> = HashMap::with_max_entries(4096, 0);

    #[map(name = "SOCKETS")]
    static SOCKETS: LruHashMap<u64, OriginalDst> = LruHashMap::with_max_entries(65536, 0);

    #[map(name = "ORIGINS")]
    static ORIGINS: LruHashMap<PortKey, OriginalDst> = LruHashMap::with_max_entries(65536, 0);

    #[map(name = "DNS_SOCKETS")]
    static DNS_SOCKETS: LruHashMap<u64, OriginalDst> = LruHashMap::with_max_entries(65536, 0);

    #[map(name = "DNS_PEERS")]
    static DNS_PEERS: LruHashMap<PortKey, OriginalDst> = LruHashMap::with_max_entries(65536, 0);

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

    #[inline(always)]
    fn is_daemon() -> bool {
        // SAFETY: a read-only global patched before load; volatile so the compiler keeps the load.
        let daemon = unsafe { core::ptr::read_volatile(&DAEMON_TGID) };
        (bpf_get_current_pid_tgid() >> 32) as u32 == daemon
    }

    /// The id of the deepest tagged cgroup on the current task's path from the root, 0 if none.
    #[inline(always)]
    fn tagged_ancestor() -> u64 {
        let mut found = 0;
        let mut level = 0;
        while level < MAX_CGROUP_DEPTH {
            // SAFETY: plain helper call, no pointers.
            let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
            if id == 0 {
                break;
            }
            if TAGGED.get_ptr(&id).is_some() {
                found = id;
            }
            level += 1;
        }
        found
    }

    /// The tag of the current task's deepest tagged cgroup, if any.
    #[inline(always)]
    fn current_tag() -> Option<Tag> {
        let id = tagged_ancestor();
        if id == 0 {
            return None;
        }
        let ptr = TAGGED.get_ptr(&id)?;
        // SAFETY: a non-null pointer into a map value of type Tag, copied out at once.
        Some(unsafe { core::ptr::read_volatile(ptr) })
    }

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

    #[inline(always)]
    fn sa(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
        ctx.sock_addr
    }

    #[cgroup_sock_addr(connect4)]
    pub fn redirect_connect4(ctx: SockAddrContext) -> i32 {
        try_connect4(&ctx)
    }

    fn try_connect4(ctx: &SockAddrContext) -> i32 {
        let p = sa(ctx);
        // SAFETY: ctx fields the verifier allows connect4 to read (4-byte loads).
        let (type_, protocol, ip4, port_be) = unsafe {
            (
                core::ptr::read_volatile(&(*p).type_),
                core::ptr::read_volatile(&(*p).protocol),
                core::ptr::read_volatile(&(*p).user_ip4),
                core::ptr::read_volatile(&(*p).user_port),
            )
        };
        let port = u16::from_be(port_be as u16);
        if type_ != SOCK_STREAM {
            if is_udp(protocol) && port == DNS {
                return redirect_dns4(ctx, ip4);
            }
            if udp_refused(protocol, port) {
                debug!(ctx, "refused udp4 connect to port {}", port);
                return REFUSE;
            }
            return ALLOW;
        }
        let loopback = ip4.to_ne_bytes()[0] == 127;
        if (loopback && port == proxy_port()) || is_daemon() {
            return ALLOW;
        }
        let Some(tag) = current_tag() else {
            return ALLOW;
        };
        let mut dst = caller(tag);
        dst.addr = [ip4, 0, 0, 0];
        dst.port = port;
        dst.family = FAMILY_V4;
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if SOCKETS.insert(&cookie, &dst, 0).is_err() {
            debug!(
                ctx,
                "connect4: could not record the original destination; not redirected"
            );
            return ALLOW;
        }
        // SAFETY: connect4 may write user_ip4 and user_port (4-byte stores).
        unsafe {
            core::ptr::write_volatile(&mut (*p).user_ip4, u32::from_ne_bytes([127, 0, 0, 1]));
            core::ptr::write_volatile(&mut (*p).user_port, u32::from(proxy_port().to_be()));
        }
        debug!(ctx, "connect4 redirected: pid {} port {}", dst.pid, port);
        ALLOW
    }

    #[cgroup_sock_addr(connect6)]
    pub fn redirect_connect6(ctx: SockAddrContext) -> i32 {
        try_connect6(&ctx)
    }

    fn try_connect6(ctx: &SockAddrContext) -> i32 {
        let p = sa(ctx);
        // SAFETY: ctx fields the verifier allows connect6 to read (4-byte loads).
        let (type_, protocol, port_be, ip6) = unsafe {
            (
                core::ptr::read_volatile(&(*p).type_),
                core::ptr::read_volatile(&(*p).protocol),
                core::ptr::read_volatile(&(*p).user_port),
                [
                    core::ptr::read_volatile(&(*p).user_ip6[0]),
                    core::ptr::read_volatile(&(*p).user_ip6[1]),
                    core::ptr::read_volatile(&(*p).user_ip6[2]),
                    core::ptr::read_volatile(&(*p).user_ip6[3]),
                ],
            )
        };
        let port = u16::from_be(port_be as u16);
        if type_ != SOCK_STREAM {
            if is_udp(protocol) && port == DNS {
                return redirect_dns6(ctx, ip6);
            }
            if udp_refused(protocol, port) {
                debug!(ctx, "refused udp6 connect to port {}", port);
                return REFUSE;
            }
            return ALLOW;
        }
        let v4_mapped =
            ip6[0] == 0 && ip6[1] == 0 && ip6[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]);
        let v6_loopback =
            ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && ip6[3] == u32::from_ne_bytes([0, 0, 0, 1]);
        let loopback = v6_loopback || (v4_mapped && ip6[3].to_ne_bytes()[0] == 127);
        if (loopback && port == proxy_port()) || is_daemon() {
            return ALLOW;
        }
        let Some(tag) = current_tag() else {
            return ALLOW;
        };
        let mut dst = caller(tag);
        dst.addr = ip6;
        dst.port = port;
        dst.family = FAMILY_V6;
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        if SOCKETS.insert(&cookie, &dst, 0).is_err() {
            debug!(
                ctx,
                "connect6: could not record the original destination; not redirected"
            );
            return ALLOW;
        }
        // SAFETY: connect6 may write user_ip6 (one 4-byte store per word) and user_port.
        unsafe {
            core::ptr::write_volatile(&mut (*p).user_ip6[0], 0);
            core::ptr::write_volatile(&mut (*p).user_ip6[1], 0);
            core::ptr::write_volatile(&mut (*p).user_ip6[2], 0);
            core::ptr::write_volatile(&mut (*p).user_ip6[3], u32::from_ne_bytes([0, 0, 0, 1]));
            core::ptr::write_volatile(&mut (*p).user_port, u32::from(proxy_port().to_be()));
        }
        debug!(ctx, "connect6 redirected: pid {} port {}", dst.pid, port);
        ALLOW
    }

    #[inline(always)]
    fn is_udp(protocol: u32) -> bool {
        protocol == IPPROTO_UDP || protocol == IPPROTO_UDPLITE
    }

    /// A UDP datagram of a tagged cgroup to `port` is refused unless it is DNS. The daemon is exempt.
    #[inline(always)]
    fn udp_refused(protocol: u32, port: u16) -> bool {
        is_udp(protocol) && port != DNS && !is_daemon() && tagged_ancestor() != 0
    }

    /// Record a tagged DNS socket's resolver and caller by cookie. `None`: not tagged (or the daemon), leave it.
    /// `Some(false)`: tagged but not recorded, refuse.
    #[inline(always)]
    fn record_dns(ctx: &SockAddrContext, addr: [u32; 4], family: u16) -> Option<bool> {
        if is_daemon() {
            return None;
        }
        let tag = current_tag()?;
        let mut dst = caller(tag);
        dst.addr = addr;
        dst.port = DNS;
        dst.family = family;
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        Some(DNS_SOCKETS.insert(&cookie, &dst, 0).is_ok())
    }

    /// Send a tagged IPv4 DNS datagram (connect or sendmsg) to the daemon's listener on 127.0.0.1.
    #[inline(always)]
    fn redirect_dns4(ctx: &SockAddrContext, ip4: u32) -> i32 {
        match record_dns(ctx, [ip4, 0, 0, 0], FAMILY_V4) {
            None => ALLOW,
            Some(false) => {
                debug!(ctx, "dns4: could not record the resolver; refused");
                REFUSE
            }
            Some(true) => {
                let p = sa(ctx);
                // SAFETY: connect4 and sendmsg4 may write user_ip4 and user_port (4-byte stores).
                unsafe {
                    core::ptr::write_volatile(&mut (*p).user_ip4, LOOPBACK4);
                    core::ptr::write_volatile(&mut (*p).user_port, u32::from(dns_port().to_be()));
                }
                ALLOW
            }
        }
    }

    /// Send a tagged IPv6 DNS datagram (connect or sendmsg; IPv4-mapped too) to the daemon's listener on ::1.
    #[inline(always)]
    fn redirect_dns6(ctx: &SockAddrContext, ip6: [u32; 4]) -> i32 {
        match record_dns(ctx, ip6, FAMILY_V6) {
            None => ALLOW,
            Some(false) => {
                debug!(ctx, "dns6: could not record the resolver; refused");
                REFUSE
            }
            Some(true) => {
                let p = sa(ctx);
                // SAFETY: connect6 and sendmsg6 may write user_ip6 (one 4-byte store per word) and user_port.
                unsafe {
                    core::ptr::write_volatile(&mut (*p).user_ip6[0], 0);
                    core::ptr::write_volatile(&mut (*p).user_ip6[1], 0);
                    core::ptr::write_volatile(&mut (*p).user_ip6[2], 0);
                    core::ptr::write_volatile(&mut (*p).user_ip6[3], V6_LOOPBACK_LAST);
                    core::ptr::write_volatile(&mut (*p).user_port, u32::from(dns_port().to_be()));
                }
                ALLOW
            }
        }
    }

    #[cgroup_sock_addr(sendmsg4)]
    pub fn udp_sendmsg4(ctx: SockAddrContext) -> i32 {
        let p = sa(&ctx);
        // SAFETY: protocol, user_ip4 and user_port are readable in sendmsg4 (4-byte loads).
        let (protocol, ip4, port_be) = unsafe {
            (
                core::ptr::read_volatile(&(*p).protocol),
                core::ptr::read_volatile(&(*p).user_ip4),
                core::ptr::read_volatile(&(*p).user_port),
            )
        };
        let port = u16::from_be(port_be as u16);
        if is_udp(protocol) && port == DNS {
            return redirect_dns4(&ctx, ip4);
        }
        if udp_refused(protocol, port) {
            debug!(&ctx, "refused udp sendmsg to port {}", port);
            return REFUSE;
        }
        ALLOW
    }

    #[cgroup_sock_addr(sendmsg6)]
    pub fn udp_sendmsg6(ctx: SockAddrContext) -> i32 {
        let p = sa(&ctx);
        // SAFETY: protocol, user_ip6 and user_port are readable in sendmsg6 (4-byte loads).
        let (protocol, port_be, ip6) = unsafe {
            (
                core::ptr::read_volatile(&(*p).protocol),
                core::ptr::read_volatile(&(*p).user_port),
                [
                    core::ptr::read_volatile(&(*p).user_ip6[0]),
                    core::ptr::read_volatile(&(*p).user_ip6[1]),
                    core::ptr::read_volatile(&(*p).user_ip6[2]),
                    core::ptr::read_volatile(&(*p).user_ip6[3]),
                ],
            )
        };
        let port = u16::from_be(port_be as u16);
        if is_udp(protocol) && port == DNS {
            return redirect_dns6(&ctx, ip6);
        }
        if udp_refused(protocol, port) {
            debug!(&ctx, "refused udp sendmsg to port {}", port);
            return REFUSE;
        }
        ALLOW
    }

    /// recvmsg programs must return 1; they only rewrite the reported source.
    const RECV_OK: i32 = 1;

    #[cgroup_sock_addr(recvmsg4)]
    pub fn dns_recvmsg4(ctx: SockAddrContext) -> i32 {
        let p = sa(&ctx);
        // SAFETY: user_ip4 and user_port are readable in recvmsg4 (4-byte loads).
        let (ip4, port_be) = unsafe {
            (
                core::ptr::read_volatile(&(*p).user_ip4),
                core::ptr::read_volatile(&(*p).user_port),
            )
        };
        if ip4 != LOOPBACK4 || u16::from_be(port_be as u16) != dns_port() {
            return RECV_OK;
        }
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: the value is copied out immediately.
        let Some(dst) = (unsafe { DNS_SOCKETS.get(&cookie) }).copied() else {
            return RECV_OK;
        };
        if dst.family != FAMILY_V4 {
            return RECV_OK;
        }
        // SAFETY: recvmsg4 may write user_ip4 and user_port (4-byte stores).
        unsafe {
            core::ptr::write_volatile(&mut (*p).user_ip4, dst.addr[0]);
            core::ptr::write_volatile(&mut (*p).user_port, u32::from(dst.port.to_be()));
        }
        RECV_OK
    }

    #[cgroup_sock_addr(recvmsg6)]
    pub fn dns_recvmsg6(ctx: SockAddrContext) -> i32 {
        let p = sa(&ctx);
        // SAFETY: user_ip6 and user_port are readable in recvmsg6 (4-byte loads).
        let (port_be, ip6) = unsafe {
            (
                core::ptr::read_volatile(&(*p).user_port),
                [
                    core::ptr::read_volatile(&(*p).user_ip6[0]),
                    core::ptr::read_volatile(&(*p).user_ip6[1]),
                    core::ptr::read_volatile(&(*p).user_ip6[2]),
                    core::ptr::read_volatile(&(*p).user_ip6[3]),
                ],
            )
        };
        let from_listener = ip6[0] == 0
            && ip6[1] == 0
            && ((ip6[2] == 0 && ip6[3] == V6_LOOPBACK_LAST)
                || (ip6[2] == V4_MAPPED_PREFIX && ip6[3] == LOOPBACK4));
        if !from_listener || u16::from_be(port_be as u16) != dns_port() {
            return RECV_OK;
        }
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: the value is copied out immediately.
        let Some(dst) = (unsafe { DNS_SOCKETS.get(&cookie) }).copied() else {
            return RECV_OK;
        };
        // An IPv4 resolver reached from an IPv6 socket (IPv4-mapped, through sendmsg4) reads back IPv4-mapped.
        let addr = if dst.family == FAMILY_V4 {
            [0, 0, V4_MAPPED_PREFIX, dst.addr[0]]
        } else {
            dst.addr
        };
        // SAFETY: recvmsg6 may write user_ip6 (one 4-byte store per word) and user_port.
        unsafe {
            core::ptr::write_volatile(&mut (*p).user_ip6[0], addr[0]);
            core::ptr::write_volatile(&mut (*p).user_ip6[1], addr[1]);
            core::ptr::write_volatile(&mut (*p).user_ip6[2], addr[2]);
            core::ptr::write_volatile(&mut (*p).user_ip6[3], addr[3]);
            core::ptr::write_volatile(&mut (*p).user_port, u32::from(dst.port.to_be()));
        }
        RECV_OK
    }

    /// Every egress packet of the attached cgroups passes here: one cookie lookup, and for a redirected DNS socket
    /// its entry copied to `DNS_PEERS` under the local port it now has. Never drops anything.
    #[cgroup_skb(egress)]
    pub fn dns_peer(ctx: SkBuffContext) -> i32 {
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut c_void) };
        // SAFETY: the value is copied out immediately.
        if let Some(dst) = (unsafe { DNS_SOCKETS.get(&cookie) }).copied() {
            let family = if u16::from_be(ctx.skb.protocol() as u16) == ETH_P_IPV6 {
                FAMILY_V6
            } else {
                FAMILY_V4
            };
            let key = PortKey {
                port: ctx.skb.local_port() as u16,
                family,
            };
            let _ = DNS_PEERS.insert(&key, &dst, 0);
        }
        1
    }

    #[sock_ops]
    pub fn rekey_established(ctx: SockOpsContext) -> u32 {
        if ctx.op() != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
            return 1;
        }
        // SAFETY: helper on the program's own context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // SAFETY: the value is copied out immediately.
        let Some(dst) = (unsafe { SOCKETS.get(&cookie) }).copied() else {
            return 1;
        };
        let family = if ctx.family() == 10 {
            FAMILY_V6
        } else {
            FAMILY_V4
        };
        let key = PortKey {
            port: ctx.local_port() as u16,
            family,
        };
        if ORIGINS.insert(&key, &dst, 0).is_err() {
            debug!(&ctx, "sockops: could not re-key a redirected socket");
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
