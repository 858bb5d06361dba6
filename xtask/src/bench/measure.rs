//! One measurement: one test against one contender. Runs oha (its JSON summary, and for fixed-rate tests its
//! per-request database), and around it reads the CPU time of the proxy's process tree, nginx and the client, the
//! whole machine's CPU, the proxy's resident memory and the connections it holds (sampled while the test runs), and
//! for `/newconn` whether each upstream TLS session was resumed (nginx's log).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::interrupted;
use super::plan::{Plan, Test, RATE_CONNECTIONS};
use super::procfs::{self, MachineCpu};
use super::stack::{wrapped, Contender, Stack};

/// What one measurement found. Times in seconds unless named otherwise; CPU shares in percent of one CPU.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Measurement {
    pub contender: String,
    pub test: String,
    pub rep: u32,
    /// oha's run time.
    pub seconds: f64,
    /// Responses with a 2xx status.
    pub ok: u64,
    /// Responses with another status.
    pub other_status: u64,
    /// Requests that got no response (connection or TLS errors); those cut off by the end of the run excluded.
    pub errors: u64,
    /// Latency percentiles over the whole run, in ms (oha's).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Fixed-rate tests: 2xx latencies from the scheduled time, after the first [`Plan::skip`] seconds.
    pub steady: Option<Percentiles>,
    /// CPU time of the proxy's process tree (none for direct).
    pub proxy_cpu_s: Option<f64>,
    pub upstream_cpu_s: f64,
    pub client_cpu_s: f64,
    /// Wall time between the CPU readings (a little longer than `seconds`).
    pub wall_s: f64,
    /// The whole machine's busy CPU (100 = one CPU) and steal over that time.
    pub machine_busy_pct: f64,
    pub steal_pct: f64,
    /// The 1-minute load average when the measurement started.
    pub load1: f64,
    /// Peak resident memory of the proxy's process tree while the test ran, in KiB.
    pub proxy_rss_peak_kib: Option<u64>,
    /// Peak of client connections established at the contender's port (conns tests).
    pub conns_peak: Option<u64>,
    /// `/newconn`: requests nginx logged, connections they arrived on (first requests), and how many of those
    /// connections resumed a TLS session.
    pub upstream_requests: Option<u64>,
    pub upstream_connections: Option<u64>,
    pub upstream_resumed: Option<u64>,
}

/// Latency percentiles in ms, over `n` requests.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Percentiles {
    pub n: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
}

impl Measurement {
    /// 2xx responses per second.
    pub fn ok_per_sec(&self) -> f64 {
        if self.seconds > 0.0 {
            self.ok as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Proxy CPU time per response, in µs.
    pub fn proxy_us_per_request(&self) -> Option<f64> {
        let answered = self.ok + self.other_status;
        self.proxy_cpu_s
            .filter(|_| answered > 0)
            .map(|s| s * 1e6 / answered as f64)
    }

    /// CPU the rest of the machine used meanwhile (other work on a shared machine), in percent of one CPU.
    pub fn others_pct(&self) -> f64 {
        if self.wall_s <= 0.0 {
            return 0.0;
        }
        let ours = self.proxy_cpu_s.unwrap_or(0.0) + self.upstream_cpu_s + self.client_cpu_s;
        (self.machine_busy_pct - 100.0 * ours / self.wall_s).max(0.0)
    }
}

/// What a measurement needs from the run.
pub struct Bench<'a> {
    pub oha: &'a Path,
    pub sqlite3: &'a Path,
    pub stack: &'a Stack,
    pub plan: &'a Plan,
    /// `raw/` of the results directory: oha's output per measurement.
    pub raw: PathBuf,
    pub ticks_per_sec: u64,
}

/// How the client loads the contender.
#[derive(Debug, Clone, Copy)]
pub enum Load {
    Test(Test),
    /// Closed loop on 16 connections, unrecorded: caches, certificates and sessions settle before the first test.
    Warmup,
}

impl Bench<'_> {
    /// oha's command line for one load.
    fn client(&self, c: &Contender, load: Load, seconds: u64, db: Option<&Path>) -> Command {
        let mut cmd = wrapped(&c.wrap, self.oha);
        cmd.args(["--no-tui", "--output-format", "json", "-z"])
            .arg(format!("{seconds}s"))
            .arg("--cacert")
            .arg(&c.ca);
        if let Some(proxy) = &c.proxy {
            cmd.args(["-x", proxy]);
        }
        let path = match load {
            Load::Warmup => {
                cmd.args(["-c", "16"]);
                "/"
            }
            Load::Test(t) => {
                match t {
                    Test::Rate(q) => {
                        cmd.args(["-c", &RATE_CONNECTIONS.to_string(), "-q", &q.to_string()])
                            .arg("--latency-correction");
                        if let Some(db) = db {
                            cmd.arg("--db-url").arg(db);
                        }
                    }
                    Test::Saturation(n) | Test::Connections(n) => {
                        cmd.args(["-c", &n.to_string()]);
                    }
                    Test::NewConnection(n) => {
                        cmd.args(["-c", &n.to_string(), "--disable-keepalive"]);
                    }
                    Test::Llm(n) => {
                        cmd.args(["-c", &n.to_string(), "-m", "POST"])
                            .args(["-T", "application/json", "-D"])
                            .arg(self.stack.llm_request());
                    }
                }
                t.path()
            }
        };
        cmd.arg(format!("https://localhost:{}{path}", c.url_port))
            .current_dir(self.stack.work.join("client"))
            .stdin(Stdio::null());
        cmd
    }

    /// Load the contender for the warm-up time; nothing is recorded.
    pub fn warm_up(&self, c: &Contender) -> anyhow::Result<()> {
        let out = self.raw.join(format!("{}.warmup", c.name));
        self.run_client(c, Load::Warmup, self.plan.warmup, None, &out, || {})?;
        Ok(())
    }

    /// One measurement of `test` against `c`, for the plan's duration.
    pub fn measure(&self, c: &Contender, test: Test, rep: u32) -> anyhow::Result<Measurement> {
        self.measure_for(c, test, rep, self.plan.seconds)
    }

    /// One measurement of `test` against `c` lasting `seconds`.
    pub fn measure_for(
        &self,
        c: &Contender,
        test: Test,
        rep: u32,
        seconds: u64,
    ) -> anyhow::Result<Measurement> {
        let stem = self.raw.join(format!("{}.{test}.r{rep}", c.name));
        let db = matches!(test, Test::Rate(_)).then(|| {
            self.stack
                .work
                .join("client")
                .join(format!("{}.{test}.sqlite", c.name))
        });
        if let Some(db) = &db {
            let _ = std::fs::remove_file(db);
        }
        let newconn = matches!(test, Test::NewConnection(_));
        if newconn {
            File::create(self.stack.newconn_log()).context("truncating nginx's /newconn log")?;
        }
        let pid = c.pid();
        let nginx = self.stack.nginx_pid();
        let mut m = Measurement {
            contender: c.name.to_string(),
            test: test.to_string(),
            rep,
            load1: procfs::load1(),
            ..Measurement::default()
        };
        let (proxy0, nginx0, client0, cpu0) = (
            pid.map(procfs::tree_ticks),
            procfs::tree_ticks(nginx),
            procfs::waited_children_ticks(),
            MachineCpu::read(),
        );
        let started = Instant::now();
        let mut rss_peak = 0;
        let mut conns_peak = 0;
        let sample_conns = matches!(test, Test::Connections(_));
        let json = self.run_client(c, Load::Test(test), seconds, db.as_deref(), &stem, || {
            if let Some(pid) = pid {
                rss_peak = rss_peak.max(procfs::tree_rss_kib(pid));
            }
            if sample_conns {
                conns_peak = conns_peak.max(procfs::established(c.port) as u64);
            }
        })?;
        let wall = started.elapsed().as_secs_f64();
        let (proxy1, nginx1, client1, cpu1) = (
            pid.map(procfs::tree_ticks),
            procfs::tree_ticks(nginx),
            procfs::waited_children_ticks(),
            MachineCpu::read(),
        );
        let hz = self.ticks_per_sec as f64;
        m.wall_s = wall;
        m.proxy_cpu_s = proxy0
            .zip(proxy1)
            .map(|(a, b)| b.saturating_sub(a) as f64 / hz);
        m.upstream_cpu_s = nginx1.saturating_sub(nginx0) as f64 / hz;
        m.client_cpu_s = client1.saturating_sub(client0) as f64 / hz;
        let busy = cpu1.busy.saturating_sub(cpu0.busy) as f64;
        let total = busy
            + cpu1.idle.saturating_sub(cpu0.idle) as f64
            + cpu1.steal.saturating_sub(cpu0.steal) as f64;
        let cpus = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        if total > 0.0 {
            m.machine_busy_pct = 100.0 * cpus * busy / total;
            m.steal_pct = 100.0 * cpus * cpu1.steal.saturating_sub(cpu0.steal) as f64 / total;
        }
        m.proxy_rss_peak_kib = pid.map(|_| rss_peak);
        m.conns_peak = sample_conns.then_some(conns_peak);
        read_summary(&json, &mut m)?;
        if let Some(db) = &db {
            m.steady = Some(self.steady_percentiles(db)?);
            let _ = std::fs::remove_file(db);
        }
        if newconn {
            // nginx flushes the buffered log every second.
            std::thread::sleep(Duration::from_millis(1300));
            let log = std::fs::read_to_string(self.stack.newconn_log()).unwrap_or_default();
            let (requests, connections, resumed) = upstream_sessions(&log);
            m.upstream_requests = Some(requests);
            m.upstream_connections = Some(connections);
            m.upstream_resumed = Some(resumed);
        }
        Ok(m)
    }

    /// Run oha to completion (or until interrupted), calling `sample` every 200 ms meanwhile; returns its JSON.
    fn run_client(
        &self,
        c: &Contender,
        load: Load,
        seconds: u64,
        db: Option<&Path>,
        stem: &Path,
        mut sample: impl FnMut(),
    ) -> anyhow::Result<String> {
        let json_path = suffixed(stem, "json");
        let err_path = suffixed(stem, "err");
        let mut cmd = self.client(c, load, seconds, db);
        let mut child = cmd
            .stdout(File::create(&json_path)?)
            .stderr(File::create(&err_path)?)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let deadline = Instant::now() + Duration::from_secs(seconds + 60);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if interrupted() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                if interrupted() {
                    bail!("interrupted");
                }
                bail!("oha did not finish within {} s: {cmd:?}", seconds + 60);
            }
            sample();
            std::thread::sleep(Duration::from_millis(200));
        };
        let json = std::fs::read_to_string(&json_path).unwrap_or_default();
        if !status.success() || json.trim().is_empty() {
            bail!(
                "oha failed ({status}) for {} / {load:?}: {} (command: {cmd:?})",
                c.name,
                std::fs::read_to_string(&err_path)
                    .unwrap_or_default()
                    .trim()
            );
        }
        Ok(json)
    }

    /// Latencies of the 2xx requests scheduled after the skip, from oha's request database (sqlite3 shell).
    fn steady_percentiles(&self, db: &Path) -> anyhow::Result<Percentiles> {
        let query = format!(
            "select duration from oha where coalesce(start_latency_correction, start) >= {} \
             and status between 200 and 299 order by duration",
            self.plan.skip
        );
        let out = Command::new(self.sqlite3)
            .arg("-readonly")
            .arg(db)
            .arg(query)
            .stdin(Stdio::null())
            .output()
            .context("running sqlite3")?;
        if !out.status.success() {
            bail!(
                "sqlite3 {}: {}",
                db.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let ms: Vec<f64> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse::<f64>().ok())
            .map(|s| s * 1e3)
            .collect();
        Ok(percentiles(&ms))
    }
}

/// `a.b.r1` → `a.b.r1.json` (`with_extension` would replace `r1`).
fn suffixed(stem: &Path, extension: &str) -> PathBuf {
    let mut s = stem.as_os_str().to_owned();
    s.push(".");
    s.push(extension);
    s.into()
}

/// Fill counts and whole-run percentiles from oha's JSON summary (`--output-format json`).
fn read_summary(json: &str, m: &mut Measurement) -> anyhow::Result<()> {
    let v: serde_json::Value = serde_json::from_str(json).context("oha's JSON output")?;
    m.seconds = v["summary"]["total"].as_f64().unwrap_or(0.0);
    if let Some(codes) = v["statusCodeDistribution"].as_object() {
        for (code, n) in codes {
            let n = n.as_u64().unwrap_or(0);
            if code.starts_with('2') {
                m.ok += n;
            } else {
                m.other_status += n;
            }
        }
    }
    if let Some(errors) = v["errorDistribution"].as_object() {
        // Requests still in flight when the run's time is up are aborted; they are not failures.
        m.errors = errors
            .iter()
            .filter(|(what, _)| !what.contains("deadline"))
            .map(|(_, n)| n.as_u64().unwrap_or(0))
            .sum();
    }
    let ms = |p: &str| v["latencyPercentiles"][p].as_f64().map(|s| s * 1e3);
    m.p50_ms = ms("p50");
    m.p99_ms = ms("p99");
    Ok(())
}

/// Nearest-rank percentiles of sorted values.
fn percentiles(sorted: &[f64]) -> Percentiles {
    let at = |p: f64| {
        if sorted.is_empty() {
            return 0.0;
        }
        let rank = (p * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    };
    Percentiles {
        n: sorted.len() as u64,
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        p999: at(0.999),
    }
}

/// From nginx's `/newconn` log (`$ssl_session_reused $connection_requests` per line): requests, connections
/// (requests that were their connection's first), and connections whose TLS session was resumed.
fn upstream_sessions(log: &str) -> (u64, u64, u64) {
    let mut requests = 0;
    let mut connections = 0;
    let mut resumed = 0;
    for line in log.lines() {
        let mut f = line.split_whitespace();
        let (Some(reused), Some(nth)) = (f.next(), f.next()) else {
            continue;
        };
        requests += 1;
        if nth == "1" {
            connections += 1;
            if reused == "r" {
                resumed += 1;
            }
        }
    }
    (requests, connections, resumed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        let p = percentiles(&v);
        assert_eq!(
            (p.n, p.p50, p.p90, p.p99, p.p999),
            (1000, 500.0, 900.0, 990.0, 999.0)
        );
        let one = percentiles(&[7.0]);
        assert_eq!((one.p50, one.p999), (7.0, 7.0));
        assert_eq!(percentiles(&[]).n, 0);
    }

    #[test]
    fn oha_summary_counts_statuses_and_leaves_out_deadline_aborts() {
        let json = r#"{"summary":{"total":15.0,"requestsPerSec":1000.0},
            "latencyPercentiles":{"p50":0.0005,"p99":0.002},
            "statusCodeDistribution":{"200":14990,"403":3},
            "errorDistribution":{"aborted due to deadline":16,"connection closed before message completed":2}}"#;
        let mut m = Measurement::default();
        read_summary(json, &mut m).expect("parse");
        assert_eq!((m.ok, m.other_status, m.errors), (14990, 3, 2));
        assert_eq!((m.p50_ms, m.p99_ms), (Some(0.5), Some(2.0)));
        assert!((m.ok_per_sec() - 14990.0 / 15.0).abs() < 1e-9);
    }

    #[test]
    fn upstream_sessions_count_connections_by_their_first_request() {
        let log = "r 1\n. 1\nr 2\nr 1\n. 1\nr 3\n\n";
        assert_eq!(upstream_sessions(log), (6, 4, 2));
    }

    #[test]
    fn cpu_per_request_and_the_load_of_others() {
        let m = Measurement {
            ok: 9_000,
            other_status: 1_000,
            proxy_cpu_s: Some(0.5),
            upstream_cpu_s: 1.0,
            client_cpu_s: 1.5,
            wall_s: 10.0,
            machine_busy_pct: 80.0,
            ..Measurement::default()
        };
        assert_eq!(m.proxy_us_per_request(), Some(50.0));
        assert!((m.others_pct() - 50.0).abs() < 1e-9);
    }
}
