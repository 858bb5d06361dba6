//! `cargo xtask bench`: what the enforcer costs, measured side by side with a direct connection and with mitmproxy
//! in one run on this machine, so every figure is a ratio to direct taken under the same conditions.
//!
//! The topology is all loopback: oha → proxy → nginx (`bench/nginx.conf`), TLS 1.3 on both legs, a 1 KiB JSON body.
//! The contenders are direct (no proxy), nginx as a plain TLS-terminating proxy (`bench/nginx-proxy.conf`: the same
//! transport work with no policy and no record), the enforcer as an explicit proxy, the enforcer with transparent
//! eBPF capture (the client in a tagged cgroup through `enforcer exec --user`), and mitmproxy. Each test ([`plan::Test`])
//! runs against every contender, interleaved, for several reps; the table gives medians. The run installs what it
//! needs ([`tools`]), builds the release enforcer, starts everything ([`stack`]), measures ([`measure`]), and writes
//! the table and raw data to `target/bench/<stamp>/` ([`report`]). Everything it started is stopped and removed on
//! exit, on failure and on Ctrl-C.

mod llm;
mod measure;
mod plan;
mod procfs;
mod report;
mod soak;
mod stack;
mod tools;

use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::setup::{is_root, quiet_output};
use crate::{cargo, run_checked, target_dir, workspace_root};
use measure::{Bench, Measurement};
use plan::{Plan, Test};
use report::Meta;

/// Set by SIGINT, SIGTERM or SIGHUP: the run stops at once, cleans up and reports what it has.
static STOP: LazyLock<Arc<AtomicBool>> = LazyLock::new(|| Arc::new(AtomicBool::new(false)));

fn interrupted() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// The environment variable that selects the short mode (set by `cargo xtask test`).
pub const SHORT_ENV: &str = "ENFORCER_BENCH_SHORT";

#[derive(Debug, Default, clap::Args)]
pub struct BenchArgs {
    /// Every path once, as `cargo xtask test` runs it (also when `ENFORCER_BENCH_SHORT` is set): the library benches
    /// in the debug build, and one rep of 1 s per test kind against direct, nginx as proxy and the debug daemons, no
    /// mitmproxy.
    /// Checks the harness; the figures mean nothing.
    #[arg(long)]
    pub short: bool,
    /// The tests, comma-separated: rate<Q> (fixed Q req/s), sat<N> (N keep-alive connections, closed loop),
    /// newconn<N> (a new TLS connection per request), conns<N> (N connections at once: the proxy's memory),
    /// llm<N> (N keep-alive connections, each request a 32 KiB LLM call answered with a tool call).
    /// Default: rate200,rate1000,sat16,sat64,newconn16,conns1000,llm16 (short: rate100,sat4,newconn4,conns100,llm4).
    #[arg(long, value_delimiter = ',')]
    tests: Vec<Test>,
    /// Reps of every test (default 3; 1 short).
    #[arg(long)]
    reps: Option<u32>,
    /// Seconds per measurement (default 15; 1 short).
    #[arg(long)]
    duration: Option<u64>,
    /// Leave mitmproxy out.
    #[arg(long)]
    no_mitmproxy: bool,
    /// Leave the library benches (`enforcer/benches`) out: only the side-by-side table.
    #[arg(long)]
    no_library: bool,
    /// Also measure the explicit proxy with `audit.durable: false` (contender `enforcer-not-durable`): the share of
    /// the cost that is the audit trail's `fdatasync` before each answer.
    #[arg(long)]
    not_durable: bool,
    /// Also measure another enforcer binary as an explicit proxy (contender `enforcer-baseline`), e.g. a release
    /// build of an earlier commit: before and after in the same run. It is given the minimal configuration every
    /// version reads (bench/enforcer-baseline.yaml).
    #[arg(long, value_name = "BINARY")]
    baseline: Option<PathBuf>,
    /// After the tests, a saturation run of this many seconds through the explicit proxy, then a check that the audit
    /// trail gained one record per answered request and that `enforcer audit verify` passes (e.g. 600).
    #[arg(long, value_name = "SECS")]
    soak: Option<u64>,
    /// Print the summary of an earlier run's results directory again (measures nothing).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["short", "tests", "reps", "duration", "baseline", "soak"])]
    report: Option<PathBuf>,
}

impl BenchArgs {
    /// The short mode with every other option at its default.
    pub fn short() -> BenchArgs {
        BenchArgs {
            short: true,
            ..BenchArgs::default()
        }
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(dir) = &args.report {
        let (meta, ms) = load_results(dir)?;
        print!("{}", report::render(&meta, &ms));
        return Ok(());
    }
    if !is_root() {
        bail!("the benchmark attaches eBPF programs and runs its client as another user: run it as root");
    }
    let short = args.short || std::env::var_os(SHORT_ENV).is_some();
    let mut plan = Plan::new(
        short,
        args.tests,
        args.reps,
        args.duration,
        args.no_mitmproxy,
    );
    plan.not_durable = args.not_durable;
    plan.soak = args.soak.unwrap_or(0);
    plan.baseline = match args.baseline {
        Some(b) => {
            Some(std::fs::canonicalize(&b).with_context(|| format!("--baseline {}", b.display()))?)
        }
        None => None,
    };
    let started = Instant::now();
    crate::setup::run()?;
    let tools = tools::install(plan.mitmproxy)?;
    let out = target_dir().join("bench").join(stamp());
    let (raw, logs) = (out.join("raw"), out.join("logs"));
    std::fs::create_dir_all(&raw)?;
    std::fs::create_dir_all(&logs)?;
    if !args.no_library {
        library_benches(&plan, &out.join("library.txt"))?;
    }
    // Short: the workspace's debug build, as `cargo xtask test` has just made it (`-p enforcer` alone would unify
    // features differently and rebuild it).
    let mut build = cargo();
    build.arg("build");
    if !plan.short {
        build.args(["--release", "-p", "enforcer"]);
    }
    run_checked(&mut build)?;
    raise_open_files_limit()?;
    // From here on a Ctrl-C stops the run and cleans up; a second one exits at once.
    for signal in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&STOP))?;
        signal_hook::flag::register(signal, Arc::clone(&STOP))?;
    }
    let enforcer = target_dir().join(plan.profile()).join("enforcer");
    let stack = stack::Stack::start(&tools, &enforcer, &logs, &plan)?;
    let mut meta = meta(&plan, &tools, &stack);
    meta.fdatasync_ms = fdatasync_latency(&stack.work)
        .inspect_err(|e| eprintln!("xtask: bench: warning: measuring fdatasync: {e:#}"))
        .ok();
    write_json(&out.join("run.json"), &meta)?;
    eprintln!(
        "xtask: bench: {} test(s) × {} contender(s) × {} rep(s) of {} s; results in {}",
        plan.tests.len(),
        stack.contenders.len(),
        plan.reps,
        plan.seconds,
        out.display()
    );

    let bench = Bench {
        oha: &tools.oha,
        sqlite3: &tools.sqlite3,
        stack: &stack,
        plan: &plan,
        raw,
        ticks_per_sec: procfs::clock_ticks_per_sec(),
    };
    let (ms, mut failures) = measure_all(&bench, &out.join("measurements.jsonl"));
    if plan.soak > 0 && !interrupted() {
        match soak::run(&bench, &enforcer, plan.soak) {
            Ok(s) => meta.soak = Some(s),
            Err(err) => {
                failures += 1;
                eprintln!("xtask: bench: warning: soak: {err:#}");
            }
        }
    }
    meta.load_end = loadavg();
    drop(bench);
    drop(stack);

    write_json(&out.join("run.json"), &meta)?;
    let summary = report::render(&meta, &ms);
    std::fs::write(out.join("summary.md"), &summary)?;
    std::fs::write(out.join("measurements.csv"), report::csv(&ms))?;
    print!("{summary}");
    println!(
        "\nresults: {} (summary.md, measurements.jsonl/.csv, run.json, library.txt); {:.0} s in all",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    if interrupted() {
        bail!("interrupted; the summary covers the measurements done");
    }
    if failures > 0 {
        bail!(
            "{failures} measurement(s) failed (see the warnings above and {}/raw/*.err)",
            out.display()
        );
    }
    Ok(())
}

/// `fdatasync(2)` latency on the work directory's file system, as the audit trail's writer meets it: 200 rounds of a
/// 300-byte append (about one record) to a preallocated file, then its fdatasync. (p50, p99) in milliseconds.
fn fdatasync_latency(work: &Path) -> anyhow::Result<(f64, f64)> {
    use std::os::unix::fs::FileExt as _;
    let path = work.join("fdatasync-probe");
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    file.set_len(1 << 20)?;
    file.sync_all()?;
    let record = [b'x'; 300];
    let mut took = Vec::with_capacity(200);
    for i in 0..200u64 {
        file.write_all_at(&record, i * 300)?;
        let t = Instant::now();
        file.sync_data()?;
        took.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    std::fs::remove_file(&path)?;
    took.sort_by(f64::total_cmp);
    Ok((took[took.len() / 2], took[took.len() * 99 / 100]))
}

/// Warm every contender up, then every rep: every test, every contender (in reversed order every other rep).
/// Measurements go to `jsonl` as they are taken. Returns them and the number that failed.
fn measure_all(bench: &Bench<'_>, jsonl: &Path) -> (Vec<Measurement>, usize) {
    let contenders = &bench.stack.contenders;
    let mut ms = Vec::new();
    let mut failures = 0;
    for c in contenders.iter().filter(|_| bench.plan.warmup > 0) {
        if interrupted() {
            return (ms, failures);
        }
        eprintln!("xtask: bench: warming up {}", c.label);
        if let Err(err) = bench.warm_up(c) {
            eprintln!("xtask: bench: warning: warm-up of {}: {err:#}", c.name);
        }
    }
    for rep in 1..=bench.plan.reps {
        let mut order: Vec<_> = contenders.iter().collect();
        if rep % 2 == 0 {
            order.reverse();
        }
        for &test in &bench.plan.tests {
            for c in &order {
                if interrupted() {
                    return (ms, failures);
                }
                match bench.measure(c, test, rep) {
                    Ok(m) => {
                        eprintln!(
                            "xtask: bench: rep {rep}/{}  {test:<10} {:<22} {}",
                            bench.plan.reps,
                            c.label,
                            brief(&m)
                        );
                        if let Err(err) = append_json(jsonl, &m) {
                            eprintln!("xtask: bench: warning: {err:#}");
                        }
                        ms.push(m);
                    }
                    Err(err) => {
                        if interrupted() {
                            return (ms, failures);
                        }
                        failures += 1;
                        eprintln!("xtask: bench: warning: {test} against {}: {err:#}", c.name);
                    }
                }
                pause(bench.plan.settle);
            }
        }
    }
    (ms, failures)
}

/// The enforcer's own benches (`enforcer/benches`: the proxy library against direct connections, the audit trail,
/// policy evaluation, redaction): `cargo bench` in the release profile, or in the short mode `cargo test --benches`
/// (the debug build `cargo xtask test` has just made) with [`SHORT_ENV`] set so each runs its paths once. Their
/// output is printed and kept in `out`.
fn library_benches(plan: &Plan, out: &Path) -> anyhow::Result<()> {
    let mut cmd = cargo();
    if plan.short {
        cmd.args(["test", "-p", "enforcer", "--benches"])
            .env(SHORT_ENV, "1");
    } else {
        cmd.args(["bench", "-p", "enforcer"]).env_remove(SHORT_ENV);
    }
    eprintln!("xtask: running {cmd:?}");
    let output = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    let text = String::from_utf8_lossy(&output.stdout);
    print!("{text}");
    std::fs::write(out, text.as_bytes()).with_context(|| format!("writing {}", out.display()))?;
    if !output.status.success() {
        bail!("{cmd:?} failed: {}", output.status);
    }
    Ok(())
}

/// One line of progress.
fn brief(m: &Measurement) -> String {
    let mut s = format!("{:.0}/s", m.ok_per_sec());
    if let Some(p) = &m.steady {
        s += &format!("  p50 {:.2} ms  p99 {:.2} ms", p.p50, p.p99);
    }
    if let Some(us) = m.proxy_us_per_request() {
        s += &format!("  proxy {us:.0} µs/req");
    }
    if let Some(kib) = m.proxy_rss_peak_kib {
        s += &format!("  RSS {:.1} MiB", kib as f64 / 1024.0);
    }
    if m.errors + m.other_status > 0 {
        s += &format!("  errors {} non-2xx {}", m.errors, m.other_status);
    }
    s
}

/// Sleep, waking early on Ctrl-C.
fn pause(seconds: f64) {
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < until && !interrupted() {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn meta(plan: &Plan, tools: &tools::Tools, stack: &stack::Stack) -> Meta {
    let output = |cmd: &mut Command| quiet_output(cmd).unwrap_or_default().trim().to_string();
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    // `nginx -v` prints to stderr.
    let nginx = Command::new(&tools.nginx)
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default();
    let mut tool_versions = vec![
        output(Command::new(&tools.oha).arg("--version")),
        nginx.trim_start_matches("nginx version: ").to_string(),
    ];
    tool_versions.extend(
        stack
            .contenders
            .iter()
            .filter(|c| c.name == "mitmproxy")
            .map(|c| c.label.clone()),
    );
    if let Some(baseline) = &plan.baseline {
        tool_versions.push(format!("baseline {}", baseline.display()));
    }
    let options: Vec<String> = std::env::args().skip(1).collect();
    Meta {
        command: format!("cargo xtask {}", options.join(" ")),
        started: output(Command::new("date").arg("-Is")),
        machine: format!(
            "Linux {}, {cpus} CPUs ({cpu_model})",
            output(Command::new("uname").arg("-r"))
        ),
        commit: output(
            Command::new("git")
                .arg("-C")
                .arg(workspace_root())
                .args(["describe", "--always", "--dirty"]),
        ),
        tools: tool_versions,
        reps: plan.reps,
        seconds: plan.seconds,
        skip: plan.skip,
        tests: plan.tests.iter().map(Test::to_string).collect(),
        contenders: stack
            .contenders
            .iter()
            .map(|c| (c.name.to_string(), c.label.clone()))
            .collect(),
        load_start: loadavg(),
        load_end: String::new(),
        idle_rss_kib: stack
            .contenders
            .iter()
            .filter_map(|c| c.pid().map(|p| (c.label.clone(), procfs::tree_rss_kib(p))))
            .collect(),
        fdatasync_ms: None,
        soak: None,
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The results directory's name: the local time the run started.
fn stamp() -> String {
    quiet_output(Command::new("date").arg("+%Y%m%d-%H%M%S"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| std::process::id().to_string())
}

/// 1,000 connections through a proxy take over 2,000 descriptors in it: lift the soft limit (inherited by everything
/// the run starts) to 65,536 where the hard limit allows.
fn raise_open_files_limit() -> anyhow::Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let Some(line) = limits.lines().find(|l| l.starts_with("Max open files")) else {
        return Ok(());
    };
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (fields.get(3), fields.get(4));
    let parse = |v: Option<&&str>| match v {
        Some(&"unlimited") => Some(u64::MAX),
        Some(v) => v.parse::<u64>().ok(),
        None => None,
    };
    let (Some(soft), Some(hard)) = (parse(soft), parse(hard)) else {
        return Ok(());
    };
    let want = hard.min(65_536);
    if soft >= want {
        return Ok(());
    }
    let hard_arg = if hard == u64::MAX {
        "unlimited".to_string()
    } else {
        hard.to_string()
    };
    run_checked(
        Command::new("prlimit")
            .arg("--pid")
            .arg(std::process::id().to_string())
            .arg(format!("--nofile={want}:{hard_arg}")),
    )
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn append_json(path: &Path, m: &Measurement) -> anyhow::Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(m)?)?;
    Ok(())
}

/// `run.json` and `measurements.jsonl` of a results directory.
fn load_results(dir: &Path) -> anyhow::Result<(Meta, Vec<Measurement>)> {
    let meta_path = dir.join("run.json");
    let meta: Meta = serde_json::from_str(
        &std::fs::read_to_string(&meta_path)
            .with_context(|| format!("reading {}", meta_path.display()))?,
    )
    .with_context(|| format!("parsing {}", meta_path.display()))?;
    let jsonl = dir.join("measurements.jsonl");
    let text =
        std::fs::read_to_string(&jsonl).with_context(|| format!("reading {}", jsonl.display()))?;
    let ms = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}", jsonl.display(), i + 1))
        })
        .collect::<anyhow::Result<Vec<Measurement>>>()?;
    Ok((meta, ms))
}
