//! `enforcer session list|show`: the running daemon's live sessions, their labels and counters, over its control
//! socket (root or `control.group` only). `anyhow` is allowed here because this is the binary's edge.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

use super::SessionInfo;
use crate::control::{request, socket_path, Request};

#[derive(Debug, Subcommand)]
pub enum SessionCommand {
    /// Every live session.
    List {
        #[arg(long)]
        config: Option<PathBuf>,
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One session (by id or cgroup path) with its labels and counters.
    Show {
        #[arg(long)]
        config: Option<PathBuf>,
        id: String,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: SessionCommand) -> anyhow::Result<ExitCode> {
    let (SessionCommand::List { config, .. } | SessionCommand::Show { config, .. }) = &cmd;
    let config = crate::config::Config::load_or_default(config.as_deref())?;
    let socket = socket_path(&config.state_dir);
    match cmd {
        SessionCommand::List { json, .. } => {
            let answer = request(&socket, &Request::SessionList)?;
            if json {
                println!("{answer}");
                return Ok(ExitCode::SUCCESS);
            }
            let sessions: Vec<SessionInfo> = serde_json::from_value(answer)?;
            println!(
                "{:<16}  {:<12}  {:<12}  {:<24}  {:>8}  LABELS",
                "ID", "PROFILE", "USER", "STARTED", "REQUESTS"
            );
            for s in &sessions {
                println!(
                    "{:<16}  {:<12}  {:<12}  {:<24}  {:>8}  {}",
                    s.id,
                    s.profile.as_deref().unwrap_or("-"),
                    s.person.as_ref().map_or("-", |p| p.user.as_str()),
                    s.started,
                    s.counters.get("requests").copied().unwrap_or(0),
                    s.labels.join(",")
                );
            }
        }
        SessionCommand::Show { id, json, .. } => {
            let answer = request(&socket, &Request::SessionShow { id })?;
            if json {
                println!("{answer}");
            } else {
                println!("{}", serde_json::to_string_pretty(&answer)?);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
