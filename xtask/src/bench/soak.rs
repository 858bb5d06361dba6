//! `--soak SECS`: a long saturation run through the explicit proxy that checks the audit trail afterwards — every
//! answered request has its record (the count of records appended meanwhile equals the responses, plus at most the
//! requests the client cut off in flight when its time was up), and `enforcer audit verify` passes on the whole trail.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::measure::{Bench, Measurement};
use super::plan::Test;

/// The soak's client connections (closed loop).
const CONNECTIONS: u32 = 16;
/// The contender it runs against.
const CONTENDER: &str = "enforcer-explicit";

/// What a soak found.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Soak {
    pub measurement: Measurement,
    /// Records the trail gained during the run (by `seq`).
    pub records: u64,
    /// `enforcer audit verify`'s first line afterwards.
    pub verify: String,
}

impl Soak {
    /// Responses the client received (any status).
    pub fn responses(&self) -> u64 {
        self.measurement.ok + self.measurement.other_status
    }

    /// Whether every response has its record, and no more records than the requests in flight at the end explain.
    pub fn records_match(&self) -> bool {
        let r = self.responses();
        self.records >= r && self.records <= r + u64::from(CONNECTIONS)
    }

    /// One paragraph for the summary.
    pub fn describe(&self) -> String {
        let m = &self.measurement;
        format!(
            "Soak: {CONNECTIONS} keep-alive conns for {:.0} s through the explicit proxy: {} responses ({:.1}k req/s, \
             {} µs proxy CPU per response), {} records appended meanwhile ({}), then `enforcer audit verify`: {}",
            m.seconds,
            self.responses(),
            m.ok_per_sec() / 1000.0,
            m.proxy_us_per_request()
                .map_or("–".into(), |us| format!("{us:.0}")),
            self.records,
            if self.records_match() {
                format!(
                    "{} for requests the client cut off in flight at the end",
                    self.records - self.responses()
                )
            } else {
                "MISMATCH".into()
            },
            self.verify
        )
    }
}

/// Run the soak for `seconds`; an error if the trail does not verify or the counts do not match.
pub fn run(bench: &Bench<'_>, enforcer: &Path, seconds: u64) -> anyhow::Result<Soak> {
    let c = bench
        .stack
        .contenders
        .iter()
        .find(|c| c.name == CONTENDER)
        .context("the explicit proxy is not running")?;
    let trail = bench.stack.work.join(CONTENDER).join("state/audit");
    let (before, _) = verify(enforcer, &trail)?;
    eprintln!("xtask: bench: soak: {seconds} s of sat{CONNECTIONS} against {CONTENDER}");
    let measurement = bench.measure_for(c, Test::Saturation(CONNECTIONS), 0, seconds)?;
    // Records are appended before forwarding; the last answers' records are in the file already.
    std::thread::sleep(Duration::from_millis(500));
    let (after, line) = verify(enforcer, &trail)?;
    let soak = Soak {
        measurement,
        records: after.saturating_sub(before),
        verify: line,
    };
    if !soak.records_match() {
        bail!("{}", soak.describe());
    }
    Ok(soak)
}

/// `enforcer audit verify DIR`: the last record's seq and the report's first line; an error unless it passes.
fn verify(enforcer: &Path, trail: &Path) -> anyhow::Result<(u64, String)> {
    let out = Command::new(enforcer)
        .args(["audit", "verify"])
        .arg(trail)
        .output()
        .with_context(|| format!("running {} audit verify", enforcer.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let first = stdout.lines().next().unwrap_or_default().to_string();
    if !out.status.success() {
        bail!("enforcer audit verify {} failed: {stdout}", trail.display());
    }
    Ok((last_seq(&first).unwrap_or(0), first))
}

/// The `b` of "OK: N records (seq a to b) in …".
fn last_seq(line: &str) -> Option<u64> {
    let range = line.split_once("(seq ")?.1;
    range.split_once(" to ")?.1.split(')').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_seq_reads_the_verify_line() {
        let line =
            "OK: 12 records (seq 3 to 14) in 1 files, 0.1 MB; 2 checkpoints verified against k";
        assert_eq!(last_seq(line), Some(14));
        assert_eq!(last_seq("OK: 0 records (empty) in 0 files"), None);
    }

    #[test]
    fn records_match_the_responses_up_to_the_requests_in_flight() {
        let soak = |records| Soak {
            measurement: Measurement {
                ok: 1000,
                ..Measurement::default()
            },
            records,
            verify: String::new(),
        };
        assert!(soak(1000).records_match());
        assert!(soak(1016).records_match());
        assert!(!soak(999).records_match());
        assert!(!soak(1017).records_match());
    }
}
