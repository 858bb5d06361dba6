//! `enforcer review list|show|approve|deny`: the approver's side of human review, over the daemon's control
//! socket (root or `control.group` only; the daemon records the approver's uid and name from the socket's peer
//! credentials). `anyhow` is allowed here because this is the binary's edge.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::Pending;
use crate::control::{request, socket_path, Request, ReviewReply};

#[derive(Debug, Subcommand)]
pub enum ReviewCommand {
    /// The exchanges waiting for a person's answer.
    List {
        #[arg(long)]
        config: Option<PathBuf>,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One pending review in full.
    Show {
        #[arg(long)]
        config: Option<PathBuf>,
        id: u64,
    },
    /// Let the held exchange go on (forwarded once).
    Approve {
        #[arg(long)]
        config: Option<PathBuf>,
        id: u64,
        /// Why; recorded in the audit trail with who approved.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Refuse the held exchange (answered like a block; never forwarded).
    Deny {
        #[arg(long)]
        config: Option<PathBuf>,
        id: u64,
        #[arg(long)]
        reason: Option<String>,
    },
}

pub fn run(cmd: ReviewCommand) -> anyhow::Result<ExitCode> {
    let (ReviewCommand::List { config, .. }
    | ReviewCommand::Show { config, .. }
    | ReviewCommand::Approve { config, .. }
    | ReviewCommand::Deny { config, .. }) = &cmd;
    let config = crate::config::Config::load_or_default(config.as_deref())?;
    let socket = socket_path(&config.state_dir);
    match cmd {
        ReviewCommand::List { json, .. } => {
            let answer = request(&socket, &Request::ReviewList)?;
            if json {
                println!("{answer}");
                return Ok(ExitCode::SUCCESS);
            }
            let pending: Vec<Pending> = serde_json::from_value(answer)?;
            println!("{}", row_header());
            for p in &pending {
                println!("{}", row(p));
            }
        }
        ReviewCommand::Show { id, .. } => {
            let answer = request(&socket, &Request::ReviewShow { id })?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
        }
        ReviewCommand::Approve { id, reason, .. } => answer(&socket, id, true, reason)?,
        ReviewCommand::Deny { id, reason, .. } => answer(&socket, id, false, reason)?,
    }
    Ok(ExitCode::SUCCESS)
}

fn answer(
    socket: &std::path::Path,
    id: u64,
    approve: bool,
    reason: Option<String>,
) -> anyhow::Result<()> {
    let request_line = Request::ReviewAnswer {
        id,
        approve,
        reason,
    };
    let reply: ReviewReply = serde_json::from_value(request(socket, &request_line)?)?;
    let verb = if approve { "approved" } else { "denied" };
    println!("review {} {verb}", reply.id);
    Ok(())
}

fn row_header() -> String {
    format!(
        "{:>8}  {:<24}  {:<20}  {:<12}  {:<8}  {}",
        "ID", "DEADLINE", "RULE", "USER", "FALLBACK", "REQUEST"
    )
}

fn row(p: &Pending) -> String {
    let r = &p.request;
    let what = match (&r.mcp_tool, &p.proposal_tool, &r.llm_model) {
        (Some(tool), _, _) => format!("mcp {tool}"),
        (_, Some(tool), _) => format!("proposal {tool}"),
        (_, _, Some(model)) => format!("llm {model}"),
        _ => String::new(),
    };
    format!(
        "{:>8}  {:<24}  {:<20}  {:<12}  {:<8}  {} {}{} {}",
        p.id,
        p.deadline,
        p.rule.as_deref().unwrap_or("-"),
        p.agent.user.as_deref().unwrap_or("-"),
        p.fallback.as_str(),
        r.method.as_deref().unwrap_or("-"),
        r.host.as_deref().unwrap_or("-"),
        r.path.as_deref().unwrap_or(""),
        what
    )
}
