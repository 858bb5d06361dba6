//! What a run measures: the tests (by name on the command line), how long and how often, and which contenders.

use std::fmt;
use std::str::FromStr;

use anyhow::bail;

/// One load shape, run against every contender. Names are what `--tests` takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Test {
    /// `rate<Q>`: a fixed Q requests/s over [`RATE_CONNECTIONS`] keep-alive connections; latency is measured from
    /// each request's scheduled time (oha `--latency-correction`), so a stall counts against every request it delays.
    Rate(u32),
    /// `sat<N>`: closed loop on N keep-alive connections: throughput.
    Saturation(u32),
    /// `newconn<N>`: closed loop on N connections, a new TCP connection and TLS handshake per request.
    NewConnection(u32),
    /// `conns<N>`: closed loop on N keep-alive connections held at once: the proxy's resident memory.
    Connections(u32),
    /// `llm<N>`: closed loop on N keep-alive connections, each request a 32 KiB Chat Completions call answered
    /// with a proposed tool call ([`super::llm`]): the cost of an agent's LLM traffic.
    Llm(u32),
}

/// Keep-alive connections the fixed-rate tests spread their requests over.
pub const RATE_CONNECTIONS: u32 = 16;

/// The default test list: the rows of the performance table.
pub const DEFAULT_TESTS: &[Test] = &[
    Test::Rate(200),
    Test::Rate(1000),
    Test::Saturation(16),
    Test::Saturation(64),
    Test::NewConnection(16),
    Test::Connections(1000),
    Test::Llm(16),
];

/// The short mode's tests: every kind once, small enough for the debug build and a second each.
pub const SHORT_TESTS: &[Test] = &[
    Test::Rate(100),
    Test::Saturation(4),
    Test::NewConnection(4),
    Test::Connections(100),
    Test::Llm(4),
];

impl Test {
    /// One line for the table: what the client does.
    pub fn describe(self) -> String {
        match self {
            Test::Rate(q) => format!(
                "fixed {} req/s over {RATE_CONNECTIONS} keep-alive conns",
                thousands(q)
            ),
            Test::Saturation(n) => format!("{n} keep-alive conns, closed loop"),
            Test::NewConnection(n) => format!("new TLS connection per request, {n} conns"),
            Test::Connections(n) => {
                format!("{} keep-alive conns at once, closed loop", thousands(n))
            }
            Test::Llm(n) => format!(
                "{n} keep-alive conns, closed loop, 32 KiB LLM call answered with a tool call"
            ),
        }
    }

    /// The URL path the client asks for: `/newconn` is where nginx logs whether each upstream TLS session resumed.
    pub fn path(self) -> &'static str {
        match self {
            Test::NewConnection(_) => "/newconn",
            Test::Llm(_) => super::llm::PATH,
            _ => "/",
        }
    }
}

fn thousands(n: u32) -> String {
    if n >= 1000 && n.is_multiple_of(1000) {
        format!("{},000", n / 1000)
    } else {
        n.to_string()
    }
}

impl fmt::Display for Test {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Test::Rate(n) => write!(f, "rate{n}"),
            Test::Saturation(n) => write!(f, "sat{n}"),
            Test::NewConnection(n) => write!(f, "newconn{n}"),
            Test::Connections(n) => write!(f, "conns{n}"),
            Test::Llm(n) => write!(f, "llm{n}"),
        }
    }
}

impl FromStr for Test {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Test> {
        let split = s.find(|c: char| c.is_ascii_digit()).unwrap_or(s.len());
        let (kind, n) = s.split_at(split);
        let n: u32 = match n.parse() {
            Ok(n) if n > 0 => n,
            _ => bail!("test {s:?}: expected a name and a positive number, e.g. sat16, rate1000"),
        };
        Ok(match kind {
            "rate" => Test::Rate(n),
            "sat" => Test::Saturation(n),
            "newconn" => Test::NewConnection(n),
            "conns" => Test::Connections(n),
            "llm" => Test::Llm(n),
            _ => bail!(
                "unknown test {s:?}: the tests are rate<Q>, sat<N>, newconn<N>, conns<N>, llm<N>"
            ),
        })
    }
}

/// How long and how often.
#[derive(Debug, Clone)]
pub struct Plan {
    pub tests: Vec<Test>,
    pub reps: u32,
    /// Seconds per measurement.
    pub seconds: u64,
    /// Seconds of quiet between measurements.
    pub settle: f64,
    /// Seconds of closed-loop load per contender before the first measurement (0: none).
    pub warmup: u64,
    /// Fixed-rate percentiles leave out requests scheduled in the first this many seconds (connection set-up).
    pub skip: f64,
    pub mitmproxy: bool,
    /// Also the explicit proxy with `audit.durable: false`: what the `fdatasync` before each answer costs.
    pub not_durable: bool,
    /// Also another enforcer binary as an explicit proxy (a build of an earlier commit): before and after in one run.
    pub baseline: Option<std::path::PathBuf>,
    /// Seconds of the soak after the tests (`--soak`; 0: none).
    pub soak: u64,
    /// The short mode (`cargo xtask test`): every path once, figures meaningless; the debug build is measured.
    pub short: bool,
}

impl Plan {
    /// The full run (3 reps of 15 s, mitmproxy included) or the short one ([`SHORT_TESTS`], 1 rep of 1 s, no
    /// warm-up, no mitmproxy); explicit options win.
    pub fn new(
        short: bool,
        tests: Vec<Test>,
        reps: Option<u32>,
        seconds: Option<u64>,
        no_mitmproxy: bool,
    ) -> Plan {
        let seconds = seconds.unwrap_or(if short { 1 } else { 15 }).max(1);
        let default_tests = if short { SHORT_TESTS } else { DEFAULT_TESTS };
        Plan {
            tests: if tests.is_empty() {
                default_tests.to_vec()
            } else {
                tests
            },
            reps: reps.unwrap_or(if short { 1 } else { 3 }).max(1),
            seconds,
            settle: if short { 0.2 } else { 2.0 },
            warmup: if short { 0 } else { 3 },
            skip: (seconds as f64 / 5.0).min(1.0),
            mitmproxy: !short && !no_mitmproxy,
            not_durable: false,
            baseline: None,
            soak: 0,
            short,
        }
    }

    /// The cargo profile whose enforcer is measured: release, or the debug build in the short mode.
    pub fn profile(&self) -> &'static str {
        if self.short {
            "debug"
        } else {
            "release"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_names_round_trip_and_bad_names_are_refused() {
        for t in DEFAULT_TESTS {
            assert_eq!(t.to_string().parse::<Test>().ok(), Some(*t));
        }
        assert!("sat".parse::<Test>().is_err());
        assert!("sat0".parse::<Test>().is_err());
        assert!("fast16".parse::<Test>().is_err());
    }

    #[test]
    fn short_is_every_test_kind_once_for_a_second_without_mitmproxy() {
        let short = Plan::new(true, vec![], None, None, false);
        assert_eq!(
            (short.reps, short.seconds, short.warmup, short.mitmproxy),
            (1, 1, 0, false)
        );
        assert_eq!(short.profile(), "debug");
        let kinds = |ts: &[Test]| {
            let mut k: Vec<_> = ts.iter().map(std::mem::discriminant).collect();
            k.dedup();
            k
        };
        assert_eq!(kinds(&short.tests), kinds(DEFAULT_TESTS));
        let full = Plan::new(false, vec![Test::Saturation(16)], Some(5), Some(10), false);
        assert_eq!((full.reps, full.seconds, full.mitmproxy), (5, 10, true));
        assert_eq!(full.skip, 1.0);
        assert!(!Plan::new(false, vec![], None, None, true).mitmproxy);
    }
}
