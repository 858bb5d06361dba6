//! The run's results as markdown: one side-by-side table (medians over the reps, with ratios to direct and to
//! mitmproxy), every rep's figure under it, and a CSV of every measurement. Rendered from the measurements alone, so
//! `cargo xtask bench --report DIR` prints an earlier (or interrupted) run again.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::measure::Measurement;
use super::plan::Test;
use super::soak::Soak;

/// What the run was: written first as `run.json`, completed at the end.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Meta {
    /// When it started (`date -Is`).
    pub started: String,
    /// Kernel, CPUs, CPU model.
    pub machine: String,
    /// The enforcer's commit (`git describe --always --dirty`).
    pub commit: String,
    /// Versions of oha, nginx and mitmproxy.
    pub tools: Vec<String>,
    pub reps: u32,
    pub seconds: u64,
    pub skip: f64,
    pub tests: Vec<String>,
    /// (name, column label), in column order; the first is direct.
    pub contenders: Vec<(String, String)>,
    /// /proc/loadavg's first three fields at the start and the end.
    pub load_start: String,
    pub load_end: String,
    /// Each proxy's resident memory after start-up, before any load, in KiB.
    pub idle_rss_kib: Vec<(String, u64)>,
    /// The disk's floor under a durable record: `fdatasync(2)` after a 300-byte append in the work directory,
    /// (p50, p99) in milliseconds; `None` in runs from before it was measured.
    #[serde(default)]
    pub fdatasync_ms: Option<(f64, f64)>,
    /// The `--soak` run and what the audit trail showed after it.
    #[serde(default)]
    pub soak: Option<Soak>,
    /// The command that made the run (`cargo xtask bench` and its options); empty in runs from before it was kept.
    #[serde(default)]
    pub command: String,
}

const DIRECT: &str = "direct";
const MITMPROXY: &str = "mitmproxy";

/// The summary: header, the side-by-side table, the ratios' legend, every rep.
pub fn render(meta: &Meta, ms: &[Measurement]) -> String {
    let mut out = String::new();
    let reps = ms.iter().map(|m| m.rep).max().unwrap_or(0);
    let _ = writeln!(out, "# Egress overhead, side by side\n");
    let _ = writeln!(
        out,
        "{} · {} · enforcer {} · {}\n",
        meta.started,
        meta.machine,
        meta.commit,
        meta.tools.join(", ")
    );
    if !meta.command.is_empty() {
        let _ = writeln!(out, "Command: `{}`\n", meta.command);
    }
    let _ = writeln!(
        out,
        "Loopback: oha → proxy → nginx, TLS 1.3 on both legs, 1 KiB JSON answers (llm tests: a 32 KiB LLM call \
         answered with a tool call). {reps} rep(s) × {} s per test and contender, \
         interleaved (contender order reversed every other rep); medians over the reps.",
        meta.seconds
    );
    let _ = writeln!(out, "{}\n", machine_load(meta, ms));
    out.push_str(&table(meta, ms));
    let _ = writeln!(
        out,
        "\n× direct: this ÷ direct. +: added to direct's latency. N× mitm: how many times better than mitmproxy \
         (throughput: this ÷ mitmproxy; CPU, memory: mitmproxy ÷ this). Proxy CPU is user + system time of the \
         proxy's process tree per response. Fixed-rate latencies count from each request's scheduled time (oha \
         --latency-correction); requests scheduled in the first {} s are left out. Upstream TLS resumed: share of \
         the connections nginx accepted on /newconn that resumed a session. nginx as proxy: a second nginx \
         terminating the client's TLS and forwarding over pooled TLS connections to the same upstream, with no policy \
         and no record (bench/nginx-proxy.conf): what the transport work alone costs a proxy in C on this machine.",
        meta.skip
    );
    if !meta.idle_rss_kib.is_empty() {
        let idle: Vec<String> = meta
            .idle_rss_kib
            .iter()
            .map(|(name, kib)| format!("{name} {:.1} MiB", *kib as f64 / 1024.0))
            .collect();
        let _ = writeln!(
            out,
            "Resident memory after start-up, before load: {}.",
            idle.join(", ")
        );
    }
    if let Some((p50, p99)) = meta.fdatasync_ms {
        let _ = writeln!(
            out,
            "The disk under the audit trail: fdatasync after a 300-byte append took p50 {p50:.2} ms, p99 {p99:.2} ms \
             (the floor of the latency a durable record adds when the upstream answers faster than that)."
        );
    }
    if let Some(soak) = &meta.soak {
        let _ = writeln!(out, "\n{}", soak.describe());
    }
    out.push_str(&every_rep(meta, ms, reps));
    out
}

/// The shared machine's state: load average, CPU used by others while we measured, steal.
fn machine_load(meta: &Meta, ms: &[Measurement]) -> String {
    let mut others: Vec<f64> = ms.iter().map(Measurement::others_pct).collect();
    others.sort_by(f64::total_cmp);
    let steal = ms.iter().map(|m| m.steal_pct).fold(0.0, f64::max);
    format!(
        "Machine load: load average {} at the start, {} at the end; other work used a median {:.0}% of one CPU \
         (max {:.0}%) during the measurements; steal max {steal:.1}%.",
        meta.load_start,
        if meta.load_end.is_empty() { "–" } else { &meta.load_end },
        median(&others).unwrap_or(0.0),
        others.last().copied().unwrap_or(0.0),
    )
}

/// One row of the table: what it shows and how each contender's cell reads.
struct Row {
    measure: &'static str,
    cell: fn(&Cells<'_>, &str) -> String,
}

/// The measurements of one test, by contender.
struct Cells<'a> {
    test: Test,
    ms: Vec<&'a Measurement>,
}

impl Cells<'_> {
    fn of(&self, contender: &str) -> Vec<&Measurement> {
        self.ms
            .iter()
            .copied()
            .filter(|m| m.contender == contender)
            .collect()
    }

    fn median(&self, contender: &str, f: impl Fn(&Measurement) -> Option<f64>) -> Option<f64> {
        let mut v: Vec<f64> = self.of(contender).into_iter().filter_map(f).collect();
        v.sort_by(f64::total_cmp);
        median(&v)
    }

    /// Throughput with its ratios: to direct, and as a multiple of mitmproxy's.
    fn throughput(&self, contender: &str) -> String {
        let f = |m: &Measurement| Some(m.ok_per_sec());
        let Some(v) = self.median(contender, f) else {
            return "–".into();
        };
        let mut notes = Vec::new();
        if contender != DIRECT {
            if let Some(d) = self.median(DIRECT, f).filter(|d| *d > 0.0) {
                notes.push(format!("{} direct", times(v / d)));
            }
        }
        if contender != MITMPROXY && contender != DIRECT {
            if let Some(x) = self.median(MITMPROXY, f).filter(|x| *x > 0.0) {
                notes.push(format!("{} mitm", multiple(v / x)));
            }
        }
        with_notes(rate(v), &notes)
    }

    /// A cost (lower is better) with how many times mitmproxy's it is below.
    fn cost(
        &self,
        contender: &str,
        f: fn(&Measurement) -> Option<f64>,
        fmt: fn(f64) -> String,
    ) -> String {
        let Some(v) = self.median(contender, f) else {
            return "–".into();
        };
        let mut notes = Vec::new();
        if contender != MITMPROXY {
            if let Some(x) = self.median(MITMPROXY, f).filter(|_| v > 0.0) {
                notes.push(format!("{} mitm", multiple(x / v)));
            }
        }
        with_notes(fmt(v), &notes)
    }

    /// p50 / p99 in ms, with what they add to direct's.
    fn latency(
        &self,
        contender: &str,
        p50: fn(&Measurement) -> Option<f64>,
        p99: fn(&Measurement) -> Option<f64>,
    ) -> String {
        let (Some(a), Some(b)) = (self.median(contender, p50), self.median(contender, p99)) else {
            return "–".into();
        };
        let mut notes = Vec::new();
        if contender != DIRECT {
            if let (Some(da), Some(db)) = (self.median(DIRECT, p50), self.median(DIRECT, p99)) {
                notes.push(format!("{} / {}", added(a - da), added(b - db)));
            }
        }
        with_notes(format!("{} / {}", ms_fmt(a), ms_fmt(b)), &notes)
    }
}

fn rows(test: Test) -> Vec<Row> {
    let cpu = Row {
        measure: "proxy CPU µs/req",
        cell: |c, n| c.cost(n, Measurement::proxy_us_per_request, us),
    };
    match test {
        Test::Rate(_) => vec![
            Row {
                measure: "achieved req/s",
                cell: |c, n| {
                    let Some(v) = c.median(n, |m| Some(m.ok_per_sec())) else {
                        return "–".into();
                    };
                    let target = match c.test {
                        Test::Rate(q) => f64::from(q),
                        _ => v,
                    };
                    if v < 0.95 * target {
                        format!("{} (cannot sustain)", rate(v))
                    } else {
                        rate(v)
                    }
                },
            },
            Row {
                measure: "p50 / p99 ms",
                cell: |c, n| {
                    c.latency(
                        n,
                        |m| m.steady.as_ref().map(|s| s.p50),
                        |m| m.steady.as_ref().map(|s| s.p99),
                    )
                },
            },
            cpu,
        ],
        Test::Saturation(_) | Test::Llm(_) => vec![
            Row {
                measure: "req/s",
                cell: |c, n| c.throughput(n),
            },
            Row {
                measure: "p50 / p99 ms",
                cell: |c, n| c.latency(n, |m| m.p50_ms, |m| m.p99_ms),
            },
            cpu,
        ],
        Test::NewConnection(_) => vec![
            Row {
                measure: "connections/s",
                cell: |c, n| c.throughput(n),
            },
            Row {
                measure: "proxy CPU µs/conn",
                cell: |c, n| c.cost(n, Measurement::proxy_us_per_request, us),
            },
            Row {
                measure: "upstream TLS resumed",
                cell: |c, n| {
                    let ms = c.of(n);
                    let conns: u64 = ms.iter().filter_map(|m| m.upstream_connections).sum();
                    let resumed: u64 = ms.iter().filter_map(|m| m.upstream_resumed).sum();
                    if conns == 0 {
                        return "–".into();
                    }
                    format!("{:.1}%", 100.0 * resumed as f64 / conns as f64)
                },
            },
        ],
        Test::Connections(_) => vec![
            Row {
                measure: "proxy RSS, peak MiB",
                cell: |c, n| {
                    c.cost(
                        n,
                        |m| m.proxy_rss_peak_kib.map(|k| k as f64 / 1024.0),
                        |v| format!("{v:.1}"),
                    )
                },
            },
            Row {
                measure: "client conns held, peak",
                cell: |c, n| {
                    c.median(n, |m| m.conns_peak.map(|v| v as f64))
                        .map_or("–".into(), |v| format!("{v:.0}"))
                },
            },
            Row {
                measure: "req/s",
                cell: |c, n| c.throughput(n),
            },
        ],
    }
}

fn table(meta: &Meta, ms: &[Measurement]) -> String {
    let mut out = String::new();
    let labels: Vec<&str> = meta.contenders.iter().map(|(_, l)| l.as_str()).collect();
    let _ = writeln!(out, "| test | measure | {} |", labels.join(" | "));
    let _ = writeln!(out, "|---|---|{}", "---|".repeat(labels.len()));
    for name in &meta.tests {
        let Ok(test) = name.parse::<Test>() else {
            continue;
        };
        let cells = Cells {
            test,
            ms: ms.iter().filter(|m| &m.test == name).collect(),
        };
        if cells.ms.is_empty() {
            continue;
        }
        let mut rows = rows(test);
        if cells.ms.iter().any(|m| m.errors + m.other_status > 0) {
            rows.push(Row {
                measure: "errors / non-2xx (all reps)",
                cell: |c, n| {
                    let ms = c.of(n);
                    if ms.is_empty() {
                        return "–".into();
                    }
                    let errors: u64 = ms.iter().map(|m| m.errors).sum();
                    let other: u64 = ms.iter().map(|m| m.other_status).sum();
                    format!("{errors} / {other}")
                },
            });
        }
        for (i, row) in rows.iter().enumerate() {
            let first = if i == 0 {
                format!("**{test}**: {}", test.describe())
            } else {
                String::new()
            };
            let values: Vec<String> = meta
                .contenders
                .iter()
                .map(|(n, _)| (row.cell)(&cells, n))
                .collect();
            let _ = writeln!(
                out,
                "| {first} | {} | {} |",
                row.measure,
                values.join(" | ")
            );
        }
    }
    out
}

/// Each rep's headline figure, for the spread (and the load of other work at the time).
fn every_rep(meta: &Meta, ms: &[Measurement], reps: u32) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n## Every rep\n");
    let heads: Vec<String> = (1..=reps).map(|r| format!("rep {r}")).collect();
    let _ = writeln!(
        out,
        "| test | contender | figure | {} | others' CPU % |",
        heads.join(" | ")
    );
    let _ = writeln!(out, "|---|---|---|{}---|", "---|".repeat(heads.len()));
    for name in &meta.tests {
        let Ok(test) = name.parse::<Test>() else {
            continue;
        };
        let (figure, f): (&str, fn(&Measurement) -> String) = match test {
            Test::Rate(_) => ("p50 / p99 ms", |m| {
                m.steady.as_ref().map_or("–".into(), |s| {
                    format!("{} / {}", ms_fmt(s.p50), ms_fmt(s.p99))
                })
            }),
            Test::Saturation(_) | Test::NewConnection(_) | Test::Llm(_) => {
                ("per s, CPU µs", |m| {
                    let cpu = m.proxy_us_per_request().map(us).unwrap_or_default();
                    format!("{} {cpu}", rate(m.ok_per_sec()))
                })
            }
            Test::Connections(_) => ("RSS MiB", |m| {
                m.proxy_rss_peak_kib
                    .map_or("–".into(), |k| format!("{:.1}", k as f64 / 1024.0))
            }),
        };
        for (contender, label) in &meta.contenders {
            let mine: Vec<&Measurement> = ms
                .iter()
                .filter(|m| &m.test == name && &m.contender == contender)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let per_rep: Vec<String> = (1..=reps)
                .map(|r| {
                    mine.iter()
                        .find(|m| m.rep == r)
                        .map_or("–".into(), |m| f(m))
                })
                .collect();
            let others: Vec<String> = mine
                .iter()
                .map(|m| format!("{:.0}", m.others_pct()))
                .collect();
            let _ = writeln!(
                out,
                "| {test} | {label} | {figure} | {} | {} |",
                per_rep.join(" | "),
                others.join(", ")
            );
        }
    }
    out
}

/// Every measurement, one CSV line each.
pub fn csv(ms: &[Measurement]) -> String {
    let mut out = String::from(
        "contender,test,rep,seconds,ok,other_status,errors,ok_per_sec,p50_ms,p99_ms,steady_n,steady_p50_ms,\
         steady_p90_ms,steady_p99_ms,steady_p999_ms,proxy_cpu_s,proxy_us_per_req,upstream_cpu_s,client_cpu_s,\
         wall_s,machine_busy_pct,others_pct,steal_pct,load1,proxy_rss_peak_kib,conns_peak,upstream_requests,\
         upstream_connections,upstream_resumed\n",
    );
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.4}"));
    let int = |v: Option<u64>| v.map_or(String::new(), |v| v.to_string());
    for m in ms {
        let s = m.steady.as_ref();
        let fields = [
            m.contender.clone(),
            m.test.clone(),
            m.rep.to_string(),
            format!("{:.3}", m.seconds),
            m.ok.to_string(),
            m.other_status.to_string(),
            m.errors.to_string(),
            format!("{:.1}", m.ok_per_sec()),
            opt(m.p50_ms),
            opt(m.p99_ms),
            int(s.map(|s| s.n)),
            opt(s.map(|s| s.p50)),
            opt(s.map(|s| s.p90)),
            opt(s.map(|s| s.p99)),
            opt(s.map(|s| s.p999)),
            opt(m.proxy_cpu_s),
            opt(m.proxy_us_per_request()),
            format!("{:.3}", m.upstream_cpu_s),
            format!("{:.3}", m.client_cpu_s),
            format!("{:.3}", m.wall_s),
            format!("{:.1}", m.machine_busy_pct),
            format!("{:.1}", m.others_pct()),
            format!("{:.1}", m.steal_pct),
            format!("{:.2}", m.load1),
            int(m.proxy_rss_peak_kib),
            int(m.conns_peak),
            int(m.upstream_requests),
            int(m.upstream_connections),
            int(m.upstream_resumed),
        ];
        let _ = writeln!(out, "{}", fields.join(","));
    }
    out
}

fn median(sorted: &[f64]) -> Option<f64> {
    match sorted.len() {
        0 => None,
        n if n % 2 == 1 => Some(sorted[n / 2]),
        n => Some((sorted[n / 2 - 1] + sorted[n / 2]) / 2.0),
    }
}

fn with_notes(value: String, notes: &[String]) -> String {
    if notes.is_empty() {
        value
    } else {
        format!("{value} ({})", notes.join(", "))
    }
}

/// Requests or connections per second: `59.8k`, `3.04k`, `468`.
fn rate(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1}k", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.2}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

fn times(r: f64) -> String {
    if r >= 0.1 {
        format!("{r:.2}×")
    } else {
        format!("{r:.3}×")
    }
}

fn multiple(r: f64) -> String {
    if r >= 10.0 {
        format!("{r:.0}×")
    } else {
        format!("{r:.1}×")
    }
}

fn ms_fmt(v: f64) -> String {
    if v < 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

fn added(v: f64) -> String {
    if v >= 0.0 {
        format!("+{}", ms_fmt(v))
    } else {
        format!("−{}", ms_fmt(-v))
    }
}

fn us(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::measure::Percentiles;

    fn m(contender: &str, test: &str, rep: u32, ok: u64, cpu: Option<f64>) -> Measurement {
        Measurement {
            contender: contender.into(),
            test: test.into(),
            rep,
            seconds: 10.0,
            ok,
            proxy_cpu_s: cpu,
            wall_s: 10.0,
            ..Measurement::default()
        }
    }

    fn meta(tests: &[&str]) -> Meta {
        Meta {
            reps: 3,
            seconds: 10,
            skip: 1.0,
            tests: tests.iter().map(|t| t.to_string()).collect(),
            contenders: vec![
                ("direct".into(), "direct".into()),
                ("enforcer-explicit".into(), "enforcer explicit".into()),
                ("mitmproxy".into(), "mitmproxy 12.3.1".into()),
            ],
            ..Meta::default()
        }
    }

    #[test]
    fn the_summary_names_the_command_that_made_it_when_the_run_kept_it() {
        let ms = vec![m("direct", "sat16", 1, 600_000, None)];
        let mut meta = meta(&["sat16"]);
        assert!(!render(&meta, &ms).contains("Command:"));
        meta.command = "cargo xtask bench --tests sat16 --reps 1".into();
        assert!(
            render(&meta, &ms).contains("\nCommand: `cargo xtask bench --tests sat16 --reps 1`\n")
        );
        // A run.json from before the field was kept still reads.
        let mut old = serde_json::to_value(&meta).expect("json");
        old.as_object_mut().expect("object").remove("command");
        let back: Meta = serde_json::from_value(old).expect("an older run.json");
        assert_eq!(back.command, "");
    }

    #[test]
    fn throughput_cells_are_medians_with_ratios_to_direct_and_mitmproxy() {
        let ms = vec![
            m("direct", "sat16", 1, 600_000, None),
            m("direct", "sat16", 2, 590_000, None),
            m("direct", "sat16", 3, 610_000, None),
            m("enforcer-explicit", "sat16", 1, 100_000, Some(8.0)),
            m("enforcer-explicit", "sat16", 2, 105_000, Some(8.4)),
            m("enforcer-explicit", "sat16", 3, 200_000, Some(30.0)),
            m("mitmproxy", "sat16", 1, 4_680, Some(10.0)),
        ];
        let t = table(&meta(&["sat16"]), &ms);
        // Medians: direct 60.0k, enforcer 10.5k (0.175×, 22× mitmproxy's 468), CPU 80 µs vs 2137 µs.
        assert!(
            t.contains("| 60.0k | 10.5k (0.17× direct, 22× mitm) | 468 (0.008× direct) |"),
            "{t}"
        );
        assert!(
            t.contains("| proxy CPU µs/req | – | 80 (27× mitm) | 2137 |"),
            "{t}"
        );
        assert!(!t.contains("errors"), "{t}");
    }

    #[test]
    fn fixed_rate_cells_show_added_latency_and_flag_a_rate_not_sustained() {
        let steady = |p50, p99| {
            Some(Percentiles {
                n: 1,
                p50,
                p90: p99,
                p99,
                p999: p99,
            })
        };
        let ms = vec![
            Measurement {
                steady: steady(0.18, 0.96),
                ..m("direct", "rate1000", 1, 10_000, None)
            },
            Measurement {
                steady: steady(0.78, 4.7),
                ..m("enforcer-explicit", "rate1000", 1, 10_000, Some(1.0))
            },
            Measurement {
                steady: steady(40.0, 90.0),
                errors: 3,
                ..m("mitmproxy", "rate1000", 1, 4_660, Some(9.0))
            },
        ];
        let t = table(&meta(&["rate1000"]), &ms);
        assert!(
            t.contains("| achieved req/s | 1.00k | 1.00k | 466 (cannot sustain) |"),
            "{t}"
        );
        assert!(t.contains("| p50 / p99 ms | 0.18 / 0.96 | 0.78 / 4.7 (+0.60 / +3.7) | 40.0 / 90.0 (+39.8 / +89.0) |"), "{t}");
        assert!(
            t.contains("| errors / non-2xx (all reps) | 0 / 0 | 0 / 0 | 3 / 0 |"),
            "{t}"
        );
    }

    #[test]
    fn resumption_is_per_upstream_connection_over_all_reps() {
        let ms = vec![
            Measurement {
                upstream_connections: Some(90),
                upstream_resumed: Some(80),
                ..m("enforcer-explicit", "newconn16", 1, 90, Some(0.1))
            },
            Measurement {
                upstream_connections: Some(10),
                upstream_resumed: Some(10),
                ..m("enforcer-explicit", "newconn16", 2, 10, Some(0.1))
            },
        ];
        let t = table(&meta(&["newconn16"]), &ms);
        assert!(
            t.contains("| upstream TLS resumed | – | 90.0% | – |"),
            "{t}"
        );
    }

    #[test]
    fn the_csv_has_a_line_per_measurement_and_as_many_fields_as_its_header() {
        let ms = vec![
            m("direct", "sat16", 1, 10, None),
            m("mitmproxy", "sat16", 1, 5, Some(1.0)),
        ];
        let csv = csv(&ms);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 3);
        let n = lines[0].split(',').count();
        assert!(lines.iter().all(|l| l.split(',').count() == n));
    }
}
