//! Kernel refusals into the audit trail. The kernel programs refuse, in the kernel, what a tagged process tries
//! beyond what the proxy and the DNS stage carry (a raw or packet socket, a server's bind, a packet from another host,
//! a datagram that is not DNS, a connect whose destination could not be recorded) and report each refusal through
//! the `REFUSALS` ring buffer — at most `REFUSAL_BURST` per cgroup and kind each second, counting the rest in
//! `REFUSAL_RATE`. This module reads both and writes one audit record per reported refusal (reason `kernel`) and, for
//! refusals the bound left out, one summary record per cgroup and kind; each record's `request.count` says how many
//! refusals it stands for, so the counts add up to what the kernel refused. It decides nothing.

use std::collections::HashMap as StdHashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use aya::maps::{HashMap, MapData, RingBuf};
use enforcer_common::{
    RateKey, RateState, Refusal, REFUSAL_WINDOW_NS, REFUSED_BIND, REFUSED_CONNECT, REFUSED_INBOUND,
    REFUSED_SENDMSG, REFUSED_SOCKET, REFUSED_SOCKOPT, REFUSED_TRANSMIT,
};
use tokio_util::sync::CancellationToken;

use crate::model::{Agent, Reason, RequestSummary};
use crate::proxy::ProxyContext;

use super::origins::{agent_of, cgroup_path, original_dst};
use super::tags::decode_profile;

/// How often refusals the rate bound left out are summed up into records.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The kernel's refusal channel, handed from [`super::Capture`] to the daemon's recording task.
pub struct Refusals {
    ring: RingBuf<MapData>,
    counts: Counts,
}

/// The kernel's refusal counters and how far records have been written for each.
struct Counts {
    rate: HashMap<MapData, RateKey, RateState>,
    cgroup_root: PathBuf,
    /// Per cgroup and kind: the kernel's count up to which records have been written.
    recorded: StdHashMap<(u64, u32), u64>,
}

impl Refusals {
    pub(super) fn new(
        ring: RingBuf<MapData>,
        rate: HashMap<MapData, RateKey, RateState>,
        cgroup_root: &Path,
    ) -> Refusals {
        Refusals {
            ring,
            counts: Counts {
                rate,
                cgroup_root: cgroup_root.to_path_buf(),
                recorded: StdHashMap::new(),
            },
        }
    }

    /// Record every refusal the kernel reports until `shutdown` fires (then what is already reported is recorded).
    /// Must run inside a tokio runtime.
    pub async fn record(self, ctx: Arc<ProxyContext>, shutdown: CancellationToken) {
        let Refusals { ring, mut counts } = self;
        // SAFETY: the ring buffer owns its fd and keeps it open, unreplaced, for as long as the AsyncFd owns it.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)
        };
        let mut fd = match fd {
            Ok(fd) => fd,
            Err(e) => {
                let e = e.into_parts().1;
                tracing::error!(error = %e, "kernel refusals cannot be read: they are not recorded");
                return;
            }
        };
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    counts.write_events(&ctx, drain(fd.get_mut())).await;
                    return;
                }
                ready = fd.readable_mut() => {
                    let Ok(mut guard) = ready else { return };
                    let events = drain(guard.get_inner_mut());
                    guard.clear_ready();
                    counts.write_events(&ctx, events).await;
                }
                _ = sweep.tick() => {
                    // Whatever is in the ring first, so a summary never counts a refusal that has its own record.
                    counts.write_events(&ctx, drain(fd.get_mut())).await;
                    counts.write_summaries(&ctx).await;
                }
            }
        }
    }
}

impl Counts {
    async fn write_events(&mut self, ctx: &ProxyContext, events: Vec<Refusal>) {
        for event in events {
            let seen = self
                .recorded
                .entry((event.who.cgroup_id, u32::from(event.kind)))
                .or_insert(0);
            // The kernel's count goes up by one per refusal; what lies between two records was left out.
            let count = event.total.saturating_sub(*seen).max(1);
            *seen = (*seen).max(event.total);
            let mut agent = agent_of(&event.who, &self.cgroup_root);
            ctx.sessions.identify(&mut agent);
            write(ctx, agent, request(&event, count)).await;
        }
    }

    /// One record per cgroup and kind whose refusals since its last record were all left out by the rate bound,
    /// once its window is over (no report of it can still be on its way).
    async fn write_summaries(&mut self, ctx: &ProxyContext) {
        let now = monotonic_ns();
        let mut pending = Vec::new();
        for (key, state) in self.rate.iter().filter_map(Result::ok) {
            let seen = self
                .recorded
                .get(&(key.cgroup_id, key.kind))
                .copied()
                .unwrap_or(0);
            if state.total > seen && now.saturating_sub(state.window_start) >= 2 * REFUSAL_WINDOW_NS
            {
                pending.push((key, state));
            }
        }
        for (key, state) in pending {
            let seen = self
                .recorded
                .insert((key.cgroup_id, key.kind), state.total)
                .unwrap_or(0);
            let profile = decode_profile(&state.tag);
            let agent = Agent {
                profile: (!profile.is_empty()).then_some(profile),
                cgroup: cgroup_path(key.cgroup_id, 0, &self.cgroup_root),
                ..Agent::default()
            };
            let summary = RequestSummary {
                method: Some(operation(key.kind as u16).to_string()),
                count: Some(state.total - seen),
                ..RequestSummary::default()
            };
            write(ctx, agent, summary).await;
        }
    }
}

/// Every event in the ring now.
fn drain(ring: &mut RingBuf<MapData>) -> Vec<Refusal> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<Refusal>() {
            // SAFETY: the kernel wrote a whole `Refusal` (a plain `#[repr(C)]` integer struct, any bit pattern
            // valid); the ring does not promise its alignment, hence the unaligned read.
            events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Refusal>()) });
        }
    }
    events
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own (CLOCK_MONOTONIC is bpf_ktime_get_ns's clock).
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// What a refusal record says about the attempt: the operation (`method`), the socket (`path`), the address
/// involved (`ip`, `port`) and how many refusals the record stands for.
fn request(event: &Refusal, count: u64) -> RequestSummary {
    let addr = original_dst(&event.who);
    let socket = match event.kind {
        // The frame's EtherType, as the device saw it (network byte order).
        REFUSED_TRANSMIT => format!("frame/0x{:04x}", u16::from_be(event.protocol as u16)),
        // Level and option name, packed by the kernel program.
        REFUSED_SOCKOPT => socket_option(event.protocol >> 16, event.protocol & 0xffff),
        _ => socket_kind(event.sock_family, event.sock_type, event.protocol),
    };
    RequestSummary {
        ip: addr.map(|a| a.ip()),
        port: addr.map_or(0, |a| a.port()),
        method: Some(operation(event.kind).to_string()),
        path: Some(socket),
        count: Some(count),
        ..RequestSummary::default()
    }
}

async fn write(ctx: &ProxyContext, agent: Agent, request: RequestSummary) {
    tracing::info!(
        operation = request.method.as_deref().unwrap_or_default(),
        socket = request.path.as_deref().unwrap_or_default(),
        profile = agent.profile.as_deref().unwrap_or_default(),
        pid = agent.pid.unwrap_or(0),
        count = request.count.unwrap_or(1),
        "refused in the kernel"
    );
    let policy = ctx.policy.current();
    let refusal = (Reason::Kernel, None);
    ctx.record_refusal(&policy, &agent, request, refusal, "refused in the kernel")
        .await;
}

/// The refused operation's name in the record (`request.method`).
pub fn operation(kind: u16) -> &'static str {
    match kind {
        REFUSED_SOCKET => "socket",
        REFUSED_BIND => "bind",
        REFUSED_INBOUND => "inbound",
        REFUSED_CONNECT => "connect",
        REFUSED_SENDMSG => "sendmsg",
        REFUSED_TRANSMIT => "transmit",
        REFUSED_SOCKOPT => "setsockopt",
        _ => "refused",
    }
}

/// A socket as `family/type/protocol` with the names of socket(2), address_families(7) and protocols(5), lower case
/// without prefixes (`inet/raw/udp`, `packet/raw/0x0003`, `inet6/dgram/icmpv6`, `vsock/stream/0`); numbers where a
/// name is not known. A type of 0 (inbound packets, where only the packet's protocol is known) is left out.
pub fn socket_kind(family: u16, type_: u16, protocol: u32) -> String {
    let fam = match family {
        1 => "unix".to_string(),
        2 => "inet".to_string(),
        10 => "inet6".to_string(),
        16 => "netlink".to_string(),
        17 => "packet".to_string(),
        38 => "alg".to_string(),
        40 => "vsock".to_string(),
        43 => "smc".to_string(),
        44 => "xdp".to_string(),
        n => format!("af{n}"),
    };
    let ty = match type_ {
        0 => None,
        1 => Some("stream".to_string()),
        2 => Some("dgram".to_string()),
        3 => Some("raw".to_string()),
        4 => Some("rdm".to_string()),
        5 => Some("seqpacket".to_string()),
        6 => Some("dccp".to_string()),
        10 => Some("packet".to_string()),
        n => Some(format!("type{n}")),
    };
    let proto = match family {
        // The Ethernet protocol, as given to socket(2) in network byte order.
        17 => format!("0x{:04x}", u16::from_be(protocol as u16)),
        2 | 10 => match protocol {
            0 => "ip".to_string(),
            1 => "icmp".to_string(),
            6 => "tcp".to_string(),
            17 => "udp".to_string(),
            33 => "dccp".to_string(),
            58 => "icmpv6".to_string(),
            132 => "sctp".to_string(),
            136 => "udplite".to_string(),
            255 => "raw".to_string(),
            256 => "smc".to_string(),
            262 => "mptcp".to_string(),
            n => n.to_string(),
        },
        _ => protocol.to_string(),
    };
    match ty {
        Some(ty) => format!("{fam}/{ty}/{proto}"),
        None => format!("{fam}/{proto}"),
    }
}

/// A socket option as `level/option`: `packet/qdisc_bypass`, `xdp/<n>`.
fn socket_option(level: u32, name: u32) -> String {
    match (level, name) {
        (263, 20) => "packet/qdisc_bypass".to_string(),
        (283, n) => format!("xdp/{n}"),
        (level, n) => format!("sol{level}/{n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_named_as_socket2_names_them() {
        assert_eq!(socket_kind(2, 3, 17), "inet/raw/udp");
        assert_eq!(socket_kind(10, 2, 58), "inet6/dgram/icmpv6");
        assert_eq!(socket_kind(2, 2, 1), "inet/dgram/icmp");
        assert_eq!(socket_kind(2, 1, 132), "inet/stream/sctp");
        // socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL)): the protocol arrives in network byte order.
        assert_eq!(
            socket_kind(17, 3, u32::from(0x0003u16.to_be())),
            "packet/raw/0x0003"
        );
        assert_eq!(socket_kind(40, 1, 0), "vsock/stream/0");
        assert_eq!(socket_kind(99, 7, 5), "af99/type7/5");
        assert_eq!(socket_kind(2, 0, 6), "inet/tcp");
    }

    #[test]
    fn socket_options_are_named() {
        assert_eq!(socket_option(263, 20), "packet/qdisc_bypass");
        assert_eq!(socket_option(283, 4), "xdp/4");
        assert_eq!(socket_option(1, 2), "sol1/2");
    }

    #[test]
    fn operations_have_stable_names() {
        assert_eq!(operation(REFUSED_SOCKET), "socket");
        assert_eq!(operation(REFUSED_BIND), "bind");
        assert_eq!(operation(REFUSED_INBOUND), "inbound");
        assert_eq!(operation(REFUSED_CONNECT), "connect");
        assert_eq!(operation(REFUSED_SENDMSG), "sendmsg");
    }
}
