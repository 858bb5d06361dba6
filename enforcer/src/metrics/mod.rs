//! Operational metrics: counters and histograms the stages feed through typed methods on [`Metrics`], exposed for
//! Prometheus by [`serve`] (`metrics: { listen: 127.0.0.1:9464 }`, off by default). Owns no decision: the audit trail
//! stays the record of what was decided; these are aggregates for dashboards and alerts, and carry no host, path,
//! body or query value (label values are verdicts, reasons, profiles and outcomes only).
//!
//! Exposition uses the `prometheus-client` crate (the Prometheus project's Rust client): the Prometheus text format
//! 0.0.4 by default, OpenMetrics 1.0 when the scraper asks for it (`Accept: application/openmetrics-text`).
//! Names follow the Prometheus conventions (<https://prometheus.io/docs/practices/naming/>): `enforcer_` prefix,
//! base units in the name (`_seconds`, `_bytes`), `_total` on counters.
//!
//! Fed today: every audited decision ([`Metrics::decision`], called from `ProxyContext::record`, so HTTP, TCP and DNS
//! alike; refusals for the proxy's buffer budget are counted on their own too), the bytes the proxy's buffers hold
//! (read at each scrape from the budget, `proxy.max_buffered_bytes`), policy reloads, cgroups tagged by the watcher, the audit writer's acknowledgement latency. Registered but fed
//! only once the proxy calls them: [`Metrics::connection_opened`], [`Metrics::connection_refused`],
//! [`Metrics::decision_latency`], [`Metrics::request_latency`].

mod http;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::audit::{Appended, AuditError, AuditLog};
use crate::model::{AuditEvent, Reason, Scheme, Verdict};

pub use http::{bind, serve, MetricsError};

/// The label value used when a record names no profile (an unidentified sender).
const NO_PROFILE: &str = "none";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    verdict: &'static str,
    reason: &'static str,
    profile: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    verdict: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProfileLabels {
    profile: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// How a policy reload ended (`enforcer_policy_reloads_total{result}`, and the control socket's reload answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReloadResult {
    /// A new policy is in force.
    Loaded,
    /// The file's bytes were those already in force.
    Unchanged,
    /// The file did not load: the previous policy stays in force.
    Failed,
}

impl ReloadResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Loaded => "loaded",
            ReloadResult::Unchanged => "unchanged",
            ReloadResult::Failed => "failed",
        }
    }
}

/// Counts by verdict since start, for `enforcer status` (the Prometheus families hold the same by label).
#[derive(Debug, Default)]
struct VerdictCounts([AtomicU64; Verdict::ALL.len()]);

/// The daemon's metrics. One per process ([`global`]); tests build their own with [`Metrics::new`].
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    dns_queries: Family<VerdictLabels, Counter>,
    upstream_errors: Family<ReasonLabels, Counter>,
    buffer_refusals: Family<PhaseLabels, Counter>,
    audit_write: Histogram,
    audit_errors: Counter,
    audit_last_seq: Gauge,
    reloads: Family<ResultLabels, Counter>,
    cgroups_tagged: Family<ProfileLabels, Counter>,
    connections_open: Gauge,
    connections: Counter,
    connections_refused: Counter,
    decision_seconds: Histogram,
    request_seconds: Histogram,
    verdicts: VerdictCounts,
    last_seq: AtomicU64,
    any_seq: AtomicBool,
    /// Audit shipping's counters, read at each scrape (set once the trail is open, when it is shipped).
    shipping: Arc<OnceLock<crate::audit::ship::ShipProbe>>,
}

/// Exposes audit shipping's own counters at scrape time: `enforcer_audit_shipped_total`,
/// `enforcer_audit_ship_dropped_total`, `enforcer_audit_ship_queue_depth`, `enforcer_audit_ship_connected`.
#[derive(Debug)]
struct ShipCollector(Arc<OnceLock<crate::audit::ship::ShipProbe>>);

impl prometheus_client::collector::Collector for ShipCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let Some(probe) = self.0.get() else {
            return Ok(());
        };
        let s = probe.status();
        let counters = [
            ("audit_shipped", "Audit records and checkpoints shipped to the syslog collector", s.shipped),
            ("audit_ship_dropped", "Audit records and checkpoints dropped from shipping (queue full or collector down; the local trail keeps them)", s.dropped),
        ];
        for (name, help, value) in counters {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let gauges = [
            (
                "audit_ship_queue_depth",
                "Audit messages waiting to be shipped",
                i64::try_from(s.queued).unwrap_or(i64::MAX),
            ),
            (
                "audit_ship_connected",
                "1 while connected to the syslog collector",
                i64::from(s.connected),
            ),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(value);
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        Ok(())
    }
}

/// Exposes the bytes the proxy's buffers hold (`enforcer_buffered_bytes`), read from the buffer budget at scrape
/// time so the gauge is exactly what the budget counts.
#[derive(Debug)]
struct BufferCollector;

impl prometheus_client::collector::Collector for BufferCollector {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        use prometheus_client::metrics::gauge::ConstGauge;
        let g = ConstGauge::new(i64::try_from(crate::proxy::buffered_bytes()).unwrap_or(i64::MAX));
        g.encode(encoder.encode_descriptor(
            "buffered",
            "Bytes the proxy holds in buffers now (bodies, events and WebSocket messages read whole before they are decided), over every agent: what proxy.max_buffered_bytes bounds",
            Some(&Unit::Bytes),
            g.metric_type(),
        )?)
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

static GLOBAL: LazyLock<Arc<Metrics>> = LazyLock::new(|| Arc::new(Metrics::new()));

/// The process's metrics, fed by every stage and served by [`serve`].
pub fn global() -> &'static Arc<Metrics> {
    &GLOBAL
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh set with every family registered under the `enforcer_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("enforcer");
        let shipping = Arc::new(OnceLock::new());
        registry.register_collector(Box::new(ShipCollector(shipping.clone())));
        registry.register_collector(Box::new(BufferCollector));
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests decided and audited (HTTP, TCP), by verdict, reason and agent profile",
            requests.clone(),
        );
        let dns_queries = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "dns_queries",
            "DNS queries from tagged agents decided and audited, by verdict",
            dns_queries.clone(),
        );
        let upstream_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "upstream_errors",
            "Requests refused because the upstream failed (certificate verification, unreachable), by reason",
            upstream_errors.clone(),
        );
        let buffer_refusals = Family::<PhaseLabels, Counter>::default();
        registry.register(
            "buffer_refusals",
            "Requests, responses and WebSocket messages refused because the proxy's buffer budget could not hold them (reason buffer_limit: proxy.max_buffered_bytes or _per_agent), by phase: request, response, proposal",
            buffer_refusals.clone(),
        );
        // 100 µs .. ~3.3 s
        let audit_write = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register_with_unit(
            "audit_write_duration",
            "Time from handing a record to the audit writer to its durable acknowledgement (queue, write, fsync)",
            Unit::Seconds,
            audit_write.clone(),
        );
        let audit_errors = Counter::default();
        registry.register(
            "audit_write_errors",
            "Audit records the writer refused or failed to make durable",
            audit_errors.clone(),
        );
        let audit_last_seq = Gauge::default();
        registry.register(
            "audit_last_seq",
            "Sequence number of the last audit record written by this daemon",
            audit_last_seq.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy reloads (SIGHUP, enforcer reload), by result: loaded, unchanged, failed",
            reloads.clone(),
        );
        let cgroups_tagged = Family::<ProfileLabels, Counter>::default();
        registry.register(
            "cgroups_tagged",
            "Cgroups tagged by the daemon as they appeared (profile cgroup globs), by profile",
            cgroups_tagged.clone(),
        );
        let connections_open = Gauge::default();
        registry.register(
            "connections_open",
            "Client connections the proxy is serving now",
            connections_open.clone(),
        );
        let connections = Counter::default();
        registry.register(
            "connections",
            "Client connections accepted by the proxy",
            connections.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Client connections closed without serving them (no recorded original destination)",
            connections_refused.clone(),
        );
        // 10 µs .. ~330 ms
        let decision_seconds = Histogram::new(exponential_buckets(0.00001, 2.0, 16));
        registry.register_with_unit(
            "decision_duration",
            "Time to evaluate the policy for one request, its body already read and classified",
            Unit::Seconds,
            decision_seconds.clone(),
        );
        // 1 ms .. ~33 s
        let request_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register_with_unit(
            "request_duration",
            "Time from a request's head arriving to its response head leaving the proxy",
            Unit::Seconds,
            request_seconds.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "The running enforcer's version", build);
        let start = Gauge::<f64, AtomicU64>::default();
        start.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        );
        registry.register_with_unit(
            "start_time",
            "When the daemon started, Unix time",
            Unit::Seconds,
            start,
        );
        Metrics {
            registry,
            requests,
            dns_queries,
            upstream_errors,
            buffer_refusals,
            audit_write,
            audit_errors,
            audit_last_seq,
            reloads,
            cgroups_tagged,
            connections_open,
            connections,
            connections_refused,
            decision_seconds,
            request_seconds,
            verdicts: VerdictCounts::default(),
            last_seq: AtomicU64::new(0),
            any_seq: AtomicBool::new(false),
            shipping,
        }
    }

    /// Count one decision as it goes to the audit trail: requests (or DNS queries) by verdict, reason and profile,
    /// upstream failures by reason, and refusals for the buffer budget (the record's reason or its outcome's error
    /// `buffer_limit`) by phase.
    pub fn decision(&self, event: &AuditEvent) {
        let verdict = event.decision.verdict;
        self.verdicts.0[verdict as usize].fetch_add(1, Ordering::Relaxed);
        if event.request.scheme == Some(Scheme::Dns) {
            self.dns_queries
                .get_or_create(&VerdictLabels {
                    verdict: verdict.as_str(),
                })
                .inc();
            return;
        }
        self.requests
            .get_or_create(&RequestLabels {
                verdict: verdict.as_str(),
                reason: crate::model::Reason::as_str(event.decision.reason),
                profile: event
                    .agent
                    .profile
                    .clone()
                    .unwrap_or_else(|| NO_PROFILE.to_string()),
            })
            .inc();
        if let Some(reason @ (Reason::UpstreamTls | Reason::UpstreamUnreachable)) =
            event.outcome.error
        {
            self.upstream_errors
                .get_or_create(&ReasonLabels {
                    reason: crate::model::Reason::as_str(reason),
                })
                .inc();
        }
        if event.decision.reason == Reason::BufferLimit
            || event.outcome.error == Some(Reason::BufferLimit)
        {
            self.buffer_refusals
                .get_or_create(&PhaseLabels {
                    phase: event.request.phase.unwrap_or_default().as_str(),
                })
                .inc();
        }
    }

    /// Count `event` ([`Metrics::decision`]) and hand it to `audit` (appended, not yet durable): the seq it got, or
    /// the failure. (Whether the writer takes records right now is `AuditLog::health`, which the daemon's readiness
    /// follows.)
    pub fn appended(&self, audit: &AuditLog, event: &AuditEvent) -> Result<Appended, AuditError> {
        self.decision(event);
        let result = audit.append(event);
        match &result {
            Ok(appended) => self.recorded(appended.seq()),
            Err(_) => {
                self.audit_errors.inc();
            }
        }
        result
    }

    /// Wait for `appended` to be durable, observing how long that took from its append (or counting the failure).
    pub async fn durable(&self, appended: Appended) -> Result<u64, AuditError> {
        let start = appended.appended_at();
        let result = appended.durable().await;
        self.audit_write.observe(start.elapsed().as_secs_f64());
        if result.is_err() {
            self.audit_errors.inc();
        }
        result
    }

    /// A record with `seq` is in the audit trail (decisions through [`Metrics::appended`]; the daemon's cgroup records
    /// directly): the audit position `enforcer status` and `enforcer_audit_last_seq` report.
    pub fn recorded(&self, seq: u64) {
        self.last_seq.fetch_max(seq, Ordering::Relaxed);
        self.any_seq.store(true, Ordering::Relaxed);
        self.audit_last_seq
            .set(i64::try_from(self.last_seq.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
    }

    /// A policy reload ended with `result`.
    pub fn reload(&self, result: ReloadResult) {
        self.reloads
            .get_or_create(&ResultLabels {
                result: result.as_str(),
            })
            .inc();
    }

    /// Expose audit shipping's counters (once; later calls are ignored).
    pub fn watch_shipping(&self, probe: crate::audit::ship::ShipProbe) {
        let _ = self.shipping.set(probe);
    }

    /// Audit shipping's state, when the trail is shipped.
    pub fn shipping(&self) -> Option<crate::audit::ShipStatus> {
        self.shipping.get().map(|p| p.status())
    }

    /// The cgroup watcher tagged a new cgroup with `profile`.
    pub fn cgroup_tagged(&self, profile: &str) {
        self.cgroups_tagged
            .get_or_create(&ProfileLabels {
                profile: profile.to_string(),
            })
            .inc();
    }

    /// The proxy accepted a client connection; the open-connections gauge goes down when the guard drops.
    pub fn connection_opened(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.inc();
        self.connections_open.inc();
        ConnectionGuard(self.clone())
    }

    /// The proxy closed a client connection without serving it.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// Time spent deciding one request.
    pub fn decision_latency(&self, elapsed: Duration) {
        self.decision_seconds.observe(elapsed.as_secs_f64());
    }

    /// Time from a request's head arriving to its response head leaving.
    pub fn request_latency(&self, elapsed: Duration) {
        self.request_seconds.observe(elapsed.as_secs_f64());
    }

    /// Decisions since start by verdict, in [`Verdict`] order (allow, log, constrain, review, block).
    pub fn verdict_counts(&self) -> [(Verdict, u64); Verdict::ALL.len()] {
        Verdict::ALL.map(|v| (v, self.verdicts.0[v as usize].load(Ordering::Relaxed)))
    }

    /// Seq of the last record this daemon wrote, if it wrote any.
    pub fn last_seq(&self) -> Option<u64> {
        self.any_seq
            .load(Ordering::Relaxed)
            .then(|| self.last_seq.load(Ordering::Relaxed))
    }

    /// The Prometheus text format 0.0.4 (`openmetrics: false`) or OpenMetrics 1.0 text.
    pub fn encode(&self, openmetrics: bool) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
        };
        out
    }
}

/// Held while the proxy serves one client connection.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<Metrics>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections_open.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Agent, Decision, Disposition, Mode, Outcome, Phase, RequestSummary};

    fn event(
        verdict: Verdict,
        reason: Reason,
        scheme: Scheme,
        profile: Option<&str>,
    ) -> AuditEvent {
        AuditEvent {
            decision: Decision::bare(verdict, reason, Mode::Enforce, "00".into()),
            agent: Agent {
                profile: profile.map(str::to_string),
                ..Agent::default()
            },
            request: RequestSummary {
                scheme: Some(scheme),
                host: Some("secret-host.example".into()),
                path: Some("/v1/x".into()),
                ..RequestSummary::default()
            },
            outcome: Outcome {
                disposition: Disposition::Blocked,
                status: None,
                error: (reason == Reason::UpstreamTls).then_some(reason),
            },
            review: None,
            trace: None,
        }
    }

    #[test]
    fn decisions_are_counted_by_verdict_reason_and_profile() {
        let m = Metrics::new();
        m.decision(&event(
            Verdict::Block,
            Reason::Rule,
            Scheme::Https,
            Some("ci"),
        ));
        m.decision(&event(
            Verdict::Block,
            Reason::Rule,
            Scheme::Https,
            Some("ci"),
        ));
        m.decision(&event(Verdict::Allow, Reason::Default, Scheme::Http, None));
        m.decision(&event(
            Verdict::Block,
            Reason::UpstreamTls,
            Scheme::Https,
            Some("ci"),
        ));
        m.decision(&event(
            Verdict::Block,
            Reason::Rule,
            Scheme::Dns,
            Some("ci"),
        ));
        let text = m.encode(false);
        assert!(
            text.contains(
                "enforcer_requests_total{verdict=\"block\",reason=\"rule\",profile=\"ci\"} 2\n"
            ),
            "{text}"
        );
        assert!(text.contains(
            "enforcer_requests_total{verdict=\"allow\",reason=\"default\",profile=\"none\"} 1\n"
        ));
        assert!(text.contains("enforcer_upstream_errors_total{reason=\"upstream_tls\"} 1\n"));
        assert!(text.contains("enforcer_dns_queries_total{verdict=\"block\"} 1\n"));
        assert!(!text.contains("secret-host"), "{text}");
        assert_eq!(
            m.verdict_counts(),
            [
                (Verdict::Allow, 1),
                (Verdict::Log, 0),
                (Verdict::Constrain, 0),
                (Verdict::Review, 0),
                (Verdict::Block, 4)
            ]
        );
    }

    #[test]
    fn both_formats_name_units_and_totals() {
        let m = Arc::new(Metrics::new());
        m.reload(ReloadResult::Failed);
        m.cgroup_tagged("agents");
        let guard = m.connection_opened();
        m.connection_refused();
        let prom = m.encode(false);
        assert!(
            prom.contains("# TYPE enforcer_policy_reloads_total counter\n"),
            "{prom}"
        );
        assert!(prom.contains("enforcer_policy_reloads_total{result=\"failed\"} 1\n"));
        assert!(prom.contains("enforcer_cgroups_tagged_total{profile=\"agents\"} 1\n"));
        assert!(prom.contains("enforcer_connections_open 1\n"));
        assert!(prom.contains("# TYPE enforcer_audit_write_duration_seconds histogram\n"));
        assert!(prom.contains("enforcer_build_info{version=\""));
        assert!(!prom.contains("# EOF"));
        drop(guard);
        assert!(m.encode(false).contains("enforcer_connections_open 0\n"));
        let om = m.encode(true);
        assert!(
            om.contains("# TYPE enforcer_policy_reloads counter\n"),
            "{om}"
        );
        assert!(om.ends_with("# EOF\n"));
    }

    #[test]
    fn buffer_budget_refusals_are_counted_by_phase_and_the_buffered_bytes_shown() {
        let m = Metrics::new();
        let refused = |phase: Option<Phase>, in_outcome: bool| {
            let mut e = event(
                Verdict::Block,
                Reason::BufferLimit,
                Scheme::Https,
                Some("ci"),
            );
            e.request.phase = phase;
            if in_outcome {
                // A response refused for the budget: the exchange's record names the reason in its outcome.
                e.decision.reason = Reason::Rule;
                e.outcome.error = Some(Reason::BufferLimit);
            }
            m.decision(&e);
        };
        refused(None, true);
        refused(None, false);
        refused(Some(Phase::Request), false);
        refused(Some(Phase::Response), true);
        refused(Some(Phase::Proposal), true);
        m.decision(&event(
            Verdict::Block,
            Reason::Rule,
            Scheme::Https,
            Some("ci"),
        ));
        let text = m.encode(false);
        assert!(
            text.contains("# TYPE enforcer_buffer_refusals_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("enforcer_buffer_refusals_total{phase=\"request\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("enforcer_buffer_refusals_total{phase=\"response\"} 1\n"));
        assert!(text.contains("enforcer_buffer_refusals_total{phase=\"proposal\"} 1\n"));
        assert!(
            text.contains("# TYPE enforcer_buffered_bytes gauge\n"),
            "{text}"
        );
        // No proxy buffers anything in this test.
        assert!(text.contains("\nenforcer_buffered_bytes 0\n"), "{text}");
    }

    #[tokio::test]
    async fn audited_records_note_the_seq_and_failures() {
        let dir = tempfile::tempdir().unwrap();
        let audit = AuditLog::open(crate::audit::AuditConfig::new(dir.path()))
            .await
            .unwrap();
        let m = Metrics::new();
        assert_eq!(m.last_seq(), None);
        let e = event(Verdict::Allow, Reason::Rule, Scheme::Https, Some("p"));
        for want in [0, 1] {
            let appended = m.appended(&audit, &e).unwrap();
            assert_eq!(m.durable(appended).await.unwrap(), want);
        }
        assert_eq!(m.last_seq(), Some(1));
        assert!(m.encode(false).contains("enforcer_audit_last_seq 1\n"));
        assert!(m
            .encode(false)
            .contains("enforcer_audit_write_duration_seconds_count 2\n"));
        audit.close().await.unwrap();
        assert!(m.appended(&audit, &e).is_err());
        assert!(m
            .encode(false)
            .contains("enforcer_audit_write_errors_total 1\n"));
    }
}
