//! Host binding for plain HTTP: a `Host` the agent merely claims must really live at the connection's original
//! destination before a policy `host:` rule may see it. (TLS needs none of this: the upstream certificate is verified
//! for the SNI at the original IP, which binds the name.) The binding holds when the host is an IP literal equal to
//! the destination, when it is pinned in the daemon's `proxy.static_hosts` table to a set containing the destination
//! (the table is authoritative for its names: no DNS), or when the system resolver answers, within a short timeout,
//! with a set containing the destination. Successful resolutions are cached for a short TTL in a bounded map, at
//! most a few lookups run at once, and callers asking for a name already being looked up share that lookup. The explicit proxy resolves its CONNECT targets here too ([`HostBinder::addresses`]).
//! Owns only this check; the caller answers 421 and audits `Reason::HostMismatch` when it fails.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OnceCell, Semaphore};

/// How long one resolution may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a resolved address set is trusted.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// Most names cached at once.
const CACHE_MAX: usize = 1024;
/// Most system-resolver lookups running at once. Each runs `getaddrinfo` on a blocking thread that a timeout cannot
/// stop, so the bound holds until the lookup itself returns: names an agent chooses cannot grow the daemon's threads.
const LOOKUPS_MAX: usize = 16;

/// Why a host is not bound to the destination. Messages name no host (they may reach logs).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HostBindError {
    #[error("the host is an IP address other than the connection's destination")]
    OtherIp,
    #[error(
        "the host is pinned in static_hosts to other addresses than the connection's destination"
    )]
    PinnedElsewhere,
    #[error("the host does not resolve to the connection's destination")]
    NotAtDestination,
    #[error("the host could not be resolved")]
    Unresolved,
    #[error("resolving the host timed out")]
    Timeout,
}

/// How a binding was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binding {
    /// The host is the destination's IP literal.
    IpLiteral,
    /// The host is pinned in `static_hosts` to (among others) the destination.
    Pinned,
    /// The system resolver maps the host to (among others) the destination.
    Resolved,
}

struct Cached {
    addrs: Vec<IpAddr>,
    at: Instant,
}

/// One lookup on its way, shared by every caller asking for its name meanwhile.
type Lookup = Arc<OnceCell<Result<Vec<IpAddr>, HostBindError>>>;

/// Checks that a claimed host lives at a destination IP. Cheap to share (hold it in `ProxyContext`).
pub struct HostBinder {
    static_hosts: BTreeMap<String, Vec<IpAddr>>,
    cache: Mutex<HashMap<String, Cached>>,
    lookups: Arc<Semaphore>,
    /// Lookups on their way, by name: a burst of connections to one name (a thousand CONNECTs at once) costs one
    /// blocking lookup, not one each.
    in_flight: Mutex<HashMap<String, Lookup>>,
}

impl HostBinder {
    /// A binder with the configured `static_hosts` (names are matched case-insensitively, trailing dot ignored).
    pub fn new(static_hosts: &BTreeMap<String, Vec<IpAddr>>) -> HostBinder {
        let static_hosts = static_hosts
            .iter()
            .map(|(name, ips)| {
                (
                    crate::host::normalise(name).into_owned(),
                    ips.iter()
                        .map(|ip| crate::host::canonical_ip(*ip))
                        .collect(),
                )
            })
            .collect();
        HostBinder {
            static_hosts,
            cache: Mutex::new(HashMap::new()),
            lookups: Arc::new(Semaphore::new(LOOKUPS_MAX)),
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// Does `host` (already normalised: lower case, no port, no brackets) live at `dst`? An IP literal in any
    /// spelling `host::ip_literal` reads binds only to itself; a string `getaddrinfo` would read as an address
    /// without looking it up is never resolved (`Unresolved`).
    pub async fn bind(&self, host: &str, dst: IpAddr) -> Result<Binding, HostBindError> {
        let dst = crate::host::canonical_ip(dst);
        if let Some(ip) = crate::host::ip_literal(host) {
            return if ip == dst {
                Ok(Binding::IpLiteral)
            } else {
                Err(HostBindError::OtherIp)
            };
        }
        if let Some(pinned) = self.static_hosts.get(host) {
            return if pinned.contains(&dst) {
                Ok(Binding::Pinned)
            } else {
                Err(HostBindError::PinnedElsewhere)
            };
        }
        if self.addresses(host).await?.contains(&dst) {
            Ok(Binding::Resolved)
        } else {
            Err(HostBindError::NotAtDestination)
        }
    }

    /// The addresses `host` (normalised, not an IP literal) lives at: its `static_hosts` pin, else the system
    /// resolver's answer (within 2 s; cached for 60 s, at most 1,024 names; failures are not cached; concurrent
    /// callers for one name share one lookup and its answer), in the resolver's order. Errors: the name did not
    /// resolve, or not in time.
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, HostBindError> {
        if let Some(pinned) = self.static_hosts.get(host) {
            return Ok(pinned.clone());
        }
        if !resolvable(host) {
            return Err(HostBindError::Unresolved);
        }
        if let Some(addrs) = self.cached(host) {
            return Ok(addrs);
        }
        let joined = Joined::new(&self.in_flight, host);
        let lookup = joined.lookup();
        // Only one caller's `resolve` runs; should that caller go away, the next waiting one runs its own.
        let answer = lookup
            .get_or_init(|| resolve(&self.lookups, host))
            .await
            .clone();
        if let Ok(addrs) = &answer {
            self.store(host, addrs.clone());
        }
        answer
    }

    fn cached(&self, host: &str) -> Option<Vec<IpAddr>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache
            .get(host)
            .filter(|c| c.at.elapsed() < CACHE_TTL)
            .map(|c| c.addrs.clone())
    }

    fn store(&self, host: &str, addrs: Vec<IpAddr>) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_MAX && !cache.contains_key(host) {
            cache.retain(|_, c| c.at.elapsed() < CACHE_TTL);
            if cache.len() >= CACHE_MAX {
                let oldest = cache
                    .iter()
                    .min_by_key(|(_, c)| c.at)
                    .map(|(k, _)| k.clone());
                if let Some(k) = oldest {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(
            host.to_string(),
            Cached {
                addrs,
                at: Instant::now(),
            },
        );
    }
}

/// Whether `host` may be handed to the system resolver: a name of letters, digits, `-`, `_` and dots whose last
/// label is not a number. `getaddrinfo` reads other strings as addresses without a lookup — numeric IPv4 forms
/// (`inet_aton(3)`) that `host::ip_literal` does not read (`08.0.0.1`, `4294967297`), IPv6 with a zone
/// (`fd00::7%1`) — which would bind a host the policy never saw as that address.
fn resolvable(host: &str) -> bool {
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !crate::host::ends_in_a_number(host)
}

/// A caller's share of the lookup of one name, in `in_flight` while its lookup is on its way: the entry goes when
/// the answer is in (answers live in the cache, failures nowhere) or when its last caller goes away without one.
struct Joined<'a> {
    in_flight: &'a Mutex<HashMap<String, Lookup>>,
    host: &'a str,
    lookup: Option<Lookup>,
}

impl<'a> Joined<'a> {
    fn new(in_flight: &'a Mutex<HashMap<String, Lookup>>, host: &'a str) -> Joined<'a> {
        let mut map = in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let lookup = map.entry(host.to_string()).or_default().clone();
        Joined {
            in_flight,
            host,
            lookup: Some(lookup),
        }
    }

    fn lookup(&self) -> &Lookup {
        self.lookup.as_ref().expect("held until dropped")
    }
}

impl Drop for Joined<'_> {
    fn drop(&mut self) {
        let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        let Some(lookup) = self.lookup.take() else {
            return;
        };
        // Shares are taken and given back only under the lock, so the count is exact: the map's and this one.
        let last = Arc::strong_count(&lookup) == 2;
        if (lookup.initialized() || last)
            && map.get(self.host).is_some_and(|l| Arc::ptr_eq(l, &lookup))
        {
            map.remove(self.host);
        }
        drop(lookup);
    }
}

/// The system resolver's answer for `host`, canonical (IPv4-mapped IPv6 as IPv4), within [`RESOLVE_TIMEOUT`]
/// (waiting for one of the [`LOOKUPS_MAX`] lookup slots counts). An empty answer is `Unresolved`.
async fn resolve(lookups: &Arc<Semaphore>, host: &str) -> Result<Vec<IpAddr>, HostBindError> {
    let lookup = async {
        let slot = lookups.clone().acquire_owned().await.ok()?;
        let name = host.to_string();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            (name.as_str(), 0).to_socket_addrs()
        })
        .await
        .ok()
    };
    match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
        Err(_) => Err(HostBindError::Timeout),
        Ok(None) => Err(HostBindError::Unresolved),
        Ok(Some(Err(e))) => {
            tracing::debug!(error = %e, "host binding: the name did not resolve");
            Err(HostBindError::Unresolved)
        }
        Ok(Some(Ok(addrs))) => {
            let addrs: Vec<IpAddr> = addrs.map(|a| crate::host::canonical_ip(a.ip())).collect();
            if addrs.is_empty() {
                Err(HostBindError::Unresolved)
            } else {
                Ok(addrs)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn binder() -> HostBinder {
        HostBinder::new(&BTreeMap::from([
            (
                "Pinned.Test.".to_string(),
                vec![ip("10.0.0.1"), ip("fd00::1")],
            ),
            ("mapped.test".to_string(), vec![ip("::ffff:10.0.0.2")]),
        ]))
    }

    #[tokio::test]
    async fn ip_literals_bind_only_to_themselves() {
        let b = binder();
        assert_eq!(
            b.bind("10.0.0.1", ip("10.0.0.1")).await,
            Ok(Binding::IpLiteral)
        );
        assert_eq!(
            b.bind("10.0.0.1", ip("::ffff:10.0.0.1")).await,
            Ok(Binding::IpLiteral)
        );
        assert_eq!(
            b.bind("fd00::1", ip("fd00::1")).await,
            Ok(Binding::IpLiteral)
        );
        assert_eq!(
            b.bind("10.0.0.9", ip("10.0.0.1")).await,
            Err(HostBindError::OtherIp)
        );
    }

    /// Strings `getaddrinfo` reads as an address are never resolved: every numeric form binds only as the address
    /// it spells, and the forms the canonical spelling does not cover (or a zone) do not bind at all.
    #[tokio::test]
    async fn numeric_hosts_bind_only_as_their_address() {
        let b = binder();
        assert_eq!(
            b.bind("167772167", ip("10.0.0.7")).await,
            Ok(Binding::IpLiteral)
        );
        assert_eq!(
            b.bind("0x7f.1", ip("10.0.0.7")).await,
            Err(HostBindError::OtherIp)
        );
        assert_eq!(
            b.bind("0x00000000007f.1", ip("127.0.0.1")).await,
            Ok(Binding::IpLiteral)
        );
        for host in ["4294967297", "08.0.0.1", "fd00::7%1", "127.0.0.1 x"] {
            assert_eq!(
                b.bind(host, ip("127.0.0.1")).await,
                Err(HostBindError::Unresolved),
                "{host}"
            );
        }
    }

    #[tokio::test]
    async fn static_hosts_are_authoritative() {
        let b = binder();
        assert_eq!(
            b.bind("pinned.test", ip("10.0.0.1")).await,
            Ok(Binding::Pinned)
        );
        assert_eq!(
            b.bind("pinned.test", ip("fd00::1")).await,
            Ok(Binding::Pinned)
        );
        assert_eq!(
            b.bind("pinned.test", ip("10.0.0.2")).await,
            Err(HostBindError::PinnedElsewhere)
        );
        assert_eq!(
            b.bind("mapped.test", ip("::ffff:10.0.0.2")).await,
            Ok(Binding::Pinned)
        );
        assert_eq!(
            b.bind("mapped.test", ip("10.0.0.2")).await,
            Ok(Binding::Pinned)
        );
    }

    #[tokio::test]
    async fn resolver_answers_bind_and_unresolvable_names_do_not() {
        let b = binder();
        // `localhost` is answered from /etc/hosts by the system resolver.
        assert_eq!(
            b.bind("localhost", ip("127.0.0.1")).await,
            Ok(Binding::Resolved)
        );
        assert_eq!(
            b.bind("localhost", ip("127.0.0.1")).await,
            Ok(Binding::Resolved)
        );
        assert_eq!(
            b.bind("localhost", ip("10.9.9.9")).await,
            Err(HostBindError::NotAtDestination)
        );
        let err = b
            .bind("nowhere.invalid", ip("127.0.0.1"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, HostBindError::Unresolved | HostBindError::Timeout),
            "{err:?}"
        );
    }

    /// The explicit proxy's CONNECT targets: a pin without DNS, else one lookup then the cache (before, every
    /// CONNECT ran `getaddrinfo` on a blocking thread, without a timeout).
    #[tokio::test]
    async fn addresses_come_from_the_pin_else_one_lookup_then_the_cache() {
        let b = binder();
        assert_eq!(b.addresses("mapped.test").await, Ok(vec![ip("10.0.0.2")]));
        assert!(b.cached("mapped.test").is_none(), "a pin is not cached");
        assert!(b.cached("localhost").is_none());
        let first = b.addresses("localhost").await.unwrap();
        assert!(first.contains(&ip("127.0.0.1")), "{first:?}");
        assert_eq!(b.cached("localhost"), Some(first.clone()));
        assert_eq!(b.addresses("localhost").await, Ok(first));
        assert!(b.addresses("nowhere.invalid").await.is_err());
        assert!(
            b.cached("nowhere.invalid").is_none(),
            "failures are not cached"
        );
    }

    /// Every lookup slot, held until dropped.
    async fn every_lookup_slot(b: &HostBinder) -> tokio::sync::OwnedSemaphorePermit {
        let all = LOOKUPS_MAX as u32;
        b.lookups.clone().acquire_many_owned(all).await.unwrap()
    }

    /// Names an agent chooses cannot hold more than LOOKUPS_MAX blocking lookups: with every slot taken, a lookup
    /// waits for one within its timeout and fails with `Timeout`; a slot freed, it runs.
    #[tokio::test]
    async fn lookups_beyond_the_bound_wait_within_the_timeout() {
        let b = binder();
        let held = every_lookup_slot(&b).await;
        assert_eq!(b.addresses("localhost").await, Err(HostBindError::Timeout));
        drop(held);
        assert!(b.addresses("localhost").await.is_ok());
    }

    /// A burst of callers for one name shares one lookup: with every lookup slot taken, twenty callers wait on one
    /// entry; the slots freed, all get the same answer and the entry is gone. A caller that gives up leaves nothing.
    #[tokio::test]
    async fn concurrent_callers_for_one_name_share_one_lookup() {
        let b = Arc::new(binder());
        let held = every_lookup_slot(&b).await;
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let b = b.clone();
                tokio::spawn(async move { b.addresses("localhost").await })
            })
            .collect();
        while b
            .in_flight
            .lock()
            .unwrap()
            .get("localhost")
            .map(Arc::strong_count)
            != Some(21)
        {
            tokio::task::yield_now().await;
        }
        assert_eq!(b.in_flight.lock().unwrap().len(), 1);
        drop(held);
        let mut answers = Vec::new();
        for caller in callers {
            answers.push(caller.await.unwrap().unwrap());
        }
        assert!(answers[0].contains(&ip("127.0.0.1")), "{answers:?}");
        assert!(answers.iter().all(|a| *a == answers[0]));
        assert!(b.in_flight.lock().unwrap().is_empty());

        let held = every_lookup_slot(&b).await;
        let gave_up =
            tokio::time::timeout(Duration::from_millis(20), b.addresses("other.localhost")).await;
        assert!(gave_up.is_err());
        assert!(b.in_flight.lock().unwrap().is_empty());
        drop(held);
    }

    #[test]
    fn the_cache_is_bounded() {
        let b = binder();
        for i in 0..(CACHE_MAX + 10) {
            b.store(&format!("h{i}.test"), vec![ip("10.0.0.1")]);
        }
        let len = b.cache.lock().unwrap().len();
        assert!(len <= CACHE_MAX, "{len}");
        assert!(b.cached(&format!("h{}.test", CACHE_MAX + 9)).is_some());
    }
}
