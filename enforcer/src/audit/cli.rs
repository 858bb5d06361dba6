//! `enforcer audit verify|tail|query`: the operator's view of the trail. Verification and reading live in the library
//! ([`super::verify`], [`super::read`]); this file parses arguments and prints.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Subcommand;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::read::{self, Line, Query};
use super::record::{Entry, RetentionRecord};
use crate::model::{Disposition, Verdict};

/// Default trail location (`<state dir>/audit`).
pub const DEFAULT_DIR: &str = "/var/lib/enforcer/audit";

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check every record, the chain across files and every signed checkpoint.
    Verify {
        /// The trail's directory.
        #[arg(default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Public key to check checkpoint signatures against: a copy of audit.pub kept outside the log directory.
        /// Default: the audit.pub inside it.
        #[arg(long, value_name = "PUBKEY")]
        key: Option<PathBuf>,
    },
    /// Print the last records; with -f, keep printing new ones.
    Tail {
        #[arg(default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Follow the trail as it grows (across rotations).
        #[arg(short = 'f', long)]
        follow: bool,
        /// How many records to print first.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: usize,
        /// Print the records as stored (JSON lines) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the records that match every given filter.
    Query {
        #[arg(default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// From this time: RFC 3339 (2026-01-31T12:00:00Z) or an age such as 30s, 15m, 2h, 7d.
        #[arg(long)]
        since: Option<String>,
        /// Before this time (same forms as --since).
        #[arg(long)]
        until: Option<String>,
        /// allow, log, constrain or block.
        #[arg(long)]
        verdict: Option<String>,
        /// Agent profile.
        #[arg(long)]
        profile: Option<String>,
        /// Destination host; `*.example.com` matches the domain and its subdomains.
        #[arg(long)]
        host: Option<String>,
        /// A rule id that decided or matched.
        #[arg(long)]
        rule: Option<String>,
        /// MCP tool name.
        #[arg(long)]
        tool: Option<String>,
        /// Print the records as stored (JSON lines) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match run_inner(cmd) {
        // `enforcer audit query | head` is not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(ExitCode::SUCCESS)
        }
        other => other,
    }
}

fn run_inner(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    let (AuditCommand::Verify { dir, .. }
    | AuditCommand::Tail { dir, .. }
    | AuditCommand::Query { dir, .. }) = &cmd;
    if !dir.is_dir() {
        bail!("no audit trail at {}: not a directory", dir.display());
    }
    match cmd {
        AuditCommand::Verify { dir, key } => verify(&dir, key.as_deref()),
        AuditCommand::Tail {
            dir,
            follow,
            lines,
            json,
        } => tail(&dir, follow, lines, json),
        AuditCommand::Query {
            dir,
            since,
            until,
            verdict,
            profile,
            host,
            rule,
            tool,
            json,
        } => {
            let now = OffsetDateTime::now_utc();
            let q = Query {
                since: since.map(|s| parse_time(&s, now)).transpose()?,
                until: until.map(|s| parse_time(&s, now)).transpose()?,
                verdict: verdict.map(|v| parse_verdict(&v)).transpose()?,
                profile,
                host,
                rule,
                tool,
            };
            query(&dir, &q, json)
        }
    }
}

fn verify(dir: &Path, key: Option<&Path>) -> anyhow::Result<ExitCode> {
    let r = super::verify(dir, key).map_err(flat)?;
    let mb = r.bytes as f64 / 1e6;
    if r.ok() {
        let range = match (r.first_seq, r.last_seq) {
            (Some(f), Some(l)) => format!("seq {f} to {l}"),
            _ => "empty".to_owned(),
        };
        println!(
            "OK: {} records ({range}) in {} files, {mb:.1} MB; {} checkpoints verified against {}",
            r.records,
            r.files,
            r.checkpoints,
            r.key.display()
        );
        if let (Some(by), Some(f)) = (r.pruned_by, r.first_seq) {
            println!(
                "records 0 to {} were deleted by retention, as the signed retention record {by} says",
                f - 1
            );
        }
        if let Some(c) = r.last_checkpoint {
            println!(
                "last checkpoint signs record {c}; {} records after it are chained but not yet signed",
                r.unsigned()
            );
        }
        if key.is_none() {
            println!("note: checked against the key inside the log directory; pass --key with a copy kept elsewhere");
        }
        return Ok(ExitCode::SUCCESS);
    }
    for p in &r.problems {
        println!("FAILED: {p}");
    }
    println!(
        "{} records in {} files checked before the first bad record; {} checkpoints verified",
        r.records, r.files, r.checkpoints
    );
    Ok(ExitCode::from(1))
}

fn tail(dir: &Path, follow: bool, n: usize, json: bool) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    let mut follower = follow
        .then(|| read::Follower::at_end(dir))
        .transpose()
        .map_err(flat)?;
    let lines = read::last(dir, n).map_err(flat)?;
    if !json {
        writeln!(out, "{}", header())?;
    }
    print_lines(&mut out, &lines, json)?;
    out.flush()?;
    let Some(f) = follower.as_mut() else {
        return Ok(ExitCode::SUCCESS);
    };
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let lines = f.poll().map_err(flat)?;
        print_lines(&mut out, &lines, json)?;
        out.flush()?;
    }
}

fn query(dir: &Path, q: &Query, json: bool) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    if !json {
        writeln!(out, "{}", header())?;
    }
    for file in read::list_files(dir).map_err(flat)? {
        let lines: Vec<Line> = match read::read_file(&file) {
            // Deleted by retention since the listing.
            Err(super::AuditError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                continue
            }
            other => other.map_err(flat)?,
        }
        .into_iter()
        .filter(|l| q.matches_entry(&l.entry))
        .collect();
        print_lines(&mut out, &lines, json)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_lines(out: &mut impl std::io::Write, lines: &[Line], json: bool) -> anyhow::Result<()> {
    for l in lines {
        if json {
            writeln!(out, "{}", l.text)?;
        } else {
            writeln!(out, "{}", row(l))?;
        }
    }
    Ok(())
}

fn header() -> String {
    format!(
        "{:>8}  {:<23}  {:<9}  {:<20}  {:<12}  {:>7}  {:<32}  {:<40}  {}",
        "SEQ",
        "TIME (UTC)",
        "VERDICT",
        "RULE",
        "PROFILE",
        "PID",
        "DESTINATION",
        "REQUEST",
        "OUTCOME"
    )
}

fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn row(l: &Line) -> String {
    let r = match &l.entry {
        Entry::Decision(r) => r,
        Entry::Retention(r) => return retention_row(r),
    };
    let ts = short_ts(&r.ts);
    let rule = r.decision.rule.as_deref().unwrap_or("(default)");
    let mut verdict = r.decision.verdict.as_str().to_owned();
    if r.decision.mode == crate::model::Mode::Shadow {
        verdict.push('*');
    }
    let q = &r.request;
    let host = q
        .host
        .clone()
        .or_else(|| q.ip.map(|i| i.to_string()))
        .unwrap_or_else(|| "?".into());
    let dest = format!("{host}:{}", q.port);
    let request = if let Some(m) = &q.mcp_method {
        match &q.mcp_tool {
            Some(t) => format!("mcp {m} {t}"),
            None => format!("mcp {m}"),
        }
    } else {
        let mut s = format!(
            "{} {}",
            q.method.as_deref().unwrap_or("-"),
            q.path.as_deref().unwrap_or("")
        );
        if let (Some(p), Some(m)) = (&q.llm_provider, &q.llm_model) {
            s = format!("{p} {m} {s}");
        }
        s
    };
    let mut outcome = match r.outcome.disposition {
        Disposition::Forwarded => "forwarded".to_owned(),
        Disposition::Blocked => "blocked".to_owned(),
        Disposition::Failed => "failed".to_owned(),
    };
    if let Some(s) = r.outcome.status {
        outcome.push_str(&format!(" {s}"));
    }
    if let Some(e) = r.outcome.error {
        outcome.push_str(&format!(
            " ({})",
            serde_json::to_value(e)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        ));
    }
    if !q.changes.is_empty() {
        outcome.push_str(&format!(" [{} changed]", q.changes.len()));
    }
    format!(
        "{:>8}  {:<23}  {:<9}  {:<20}  {:<12}  {:>7}  {:<32}  {:<40}  {}",
        r.seq,
        ts,
        verdict,
        cut(rule, 20),
        cut(r.agent.profile.as_deref().unwrap_or("-"), 12),
        r.agent
            .pid
            .map_or_else(|| "-".to_owned(), |p| p.to_string()),
        cut(&dest, 32),
        cut(&request, 40),
        outcome
    )
}

fn short_ts(ts: &str) -> String {
    let ts = ts.replace('T', " ");
    let ts = ts.trim_end_matches('Z');
    ts.get(..23).unwrap_or(ts).to_owned()
}

/// A retention record as a table row: what was deleted and why.
fn retention_row(r: &RetentionRecord) -> String {
    let d = &r.retention;
    let bytes: u64 = d.deleted.iter().map(|f| f.bytes).sum();
    format!(
        "{:>8}  {:<23}  {:<9}  deleted {} files, records {} to {} ({bytes} bytes; {}); the trail now starts at record {}",
        r.seq,
        short_ts(&r.ts),
        "retention",
        d.deleted.len(),
        d.first_seq,
        d.last_seq,
        d.reason.as_str(),
        d.kept_from
    )
}

/// The library's errors already name their cause; keep anyhow from printing it twice.
fn flat(e: super::AuditError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

fn parse_verdict(s: &str) -> anyhow::Result<Verdict> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "allow" => Verdict::Allow,
        "log" => Verdict::Log,
        "constrain" => Verdict::Constrain,
        "block" => Verdict::Block,
        _ => bail!("unknown verdict {s:?}: expected allow, log, constrain or block"),
    })
}

/// RFC 3339, or an age (`90s`, `15m`, `2h`, `7d`) counted back from `now`.
fn parse_time(s: &str, now: OffsetDateTime) -> anyhow::Result<OffsetDateTime> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: i64 = num
        .parse()
        .with_context(|| format!("{s:?} is neither RFC 3339 nor an age like 15m"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => bail!("{s:?}: an age needs a unit: s, m, h or d"),
    };
    Ok(now - time::Duration::seconds(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_and_verdicts_parse() {
        let now = OffsetDateTime::parse("2026-01-02T00:00:00Z", &Rfc3339).unwrap();
        assert_eq!(
            parse_time("1d", now).unwrap(),
            OffsetDateTime::parse("2026-01-01T00:00:00Z", &Rfc3339).unwrap()
        );
        assert_eq!(parse_time("2026-01-02T00:00:00Z", now).unwrap(), now);
        assert!(parse_time("5y", now).is_err());
        assert_eq!(parse_verdict("BLOCK").unwrap(), Verdict::Block);
        assert!(parse_verdict("deny").is_err());
    }
}
