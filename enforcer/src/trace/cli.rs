//! `enforcer trace show|keygen`: read a retained trace with the private key (which never lives on the daemon's
//! host, ideally), and make a key pair. `show` finds the trace's record in the audit trail, refuses a file that does
//! not match the digest recorded for it (swapped or altered) and one whose deletion is recorded, then decrypts.
//! `anyhow` is allowed here because this is the binary's edge.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Subcommand;
use sha2::Digest;

use crate::model::{TraceEvent, TraceNote};

#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// Decrypt and print the trace of an exchange (by the seq of the exchange's record, or of the trace's record).
    Show {
        seq: u64,
        /// The age identity file holding the private key (`AGE-SECRET-KEY-1…`), as `enforcer trace keygen` or
        /// `age-keygen` writes it.
        #[arg(long, value_name = "KEYFILE")]
        identity: PathBuf,
        /// The audit trail's directory.
        #[arg(long, default_value = crate::audit::cli::DEFAULT_DIR)]
        audit_dir: PathBuf,
        /// The trace directory (default `<audit dir>/traces`).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Make a key pair: the identity (private key) is written to FILE (0600); the recipient (public key) for
    /// `traces.recipient` is printed.
    Keygen {
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

pub fn run(cmd: TraceCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        TraceCommand::Show {
            seq,
            identity,
            audit_dir,
            dir,
        } => {
            let dir = dir.unwrap_or_else(|| audit_dir.join(super::DIR_NAME));
            let text = show(&audit_dir, &dir, seq, &identity)?;
            println!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        TraceCommand::Keygen { out } => {
            let recipient = keygen(&out)?;
            println!("{recipient}");
            eprintln!(
                "identity written to {}; put the line above in traces.recipient",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The recorded note of the trace of record `seq` (the exchange's or the trace's own record).
fn find(audit_dir: &Path, seq: u64) -> anyhow::Result<TraceNote> {
    let mut stored: Option<TraceNote> = None;
    let mut deleted: Option<(u64, TraceEvent)> = None;
    for file in crate::audit::read::list_files(audit_dir).map_err(|e| anyhow::anyhow!("{e}"))? {
        for line in crate::audit::read::read_file(&file).map_err(|e| anyhow::anyhow!("{e}"))? {
            let Some(r) = line.record() else { continue };
            let Some(note) = r.trace.clone() else {
                continue;
            };
            let ours = note.of == seq || (r.seq == seq && note.event == TraceEvent::Stored);
            let stored_of = stored.as_ref().map(|s| s.of);
            match note.event {
                TraceEvent::Stored if ours => stored = Some(note),
                _ if stored_of == Some(note.of) => deleted = Some((r.seq, note.event)),
                _ => {}
            }
        }
    }
    let Some(note) = stored else {
        bail!(
            "no trace is recorded for record {seq} in {}",
            audit_dir.display()
        );
    };
    if let Some((at, why)) = deleted {
        bail!(
            "the trace of record {} was deleted ({why:?}, record {at})",
            note.of
        );
    }
    Ok(note)
}

/// The trace of record `seq`, decrypted with the identity in `identity`, as pretty JSON.
pub fn show(audit_dir: &Path, dir: &Path, seq: u64, identity: &Path) -> anyhow::Result<String> {
    let note = find(audit_dir, seq)?;
    if super::parse_file_name(&note.file).is_none() {
        bail!(
            "record names {:?}, which is not a trace file name",
            note.file
        );
    }
    let path = dir.join(&note.file);
    let sealed = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    if hex::encode(sha2::Sha256::digest(&sealed)) != note.sha256 {
        bail!(
            "{} does not match the digest recorded for it: the file was swapped or altered (run `enforcer audit verify`)",
            path.display()
        );
    }
    let keys =
        std::fs::read(identity).with_context(|| format!("reading {}", identity.display()))?;
    let identities = age::IdentityFile::from_buffer(&keys[..])
        .ok()
        .and_then(|f| f.into_identities().ok())
        .filter(|i| !i.is_empty())
        .with_context(|| format!("{} holds no age identity", identity.display()))?;
    let decryptor = age::Decryptor::new_buffered(&sealed[..])
        .map_err(|e| anyhow::anyhow!("{}: not an age file: {e}", path.display()))?;
    let mut reader = decryptor
        .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .map_err(|_| {
            anyhow::anyhow!(
                "{} cannot decrypt this trace (it was encrypted to another key)",
                identity.display()
            )
        })?;
    let mut plain = Vec::new();
    reader
        .read_to_end(&mut plain)
        .context("decrypting the trace")?;
    let value: serde_json::Value =
        serde_json::from_slice(&plain).context("the decrypted trace is not JSON")?;
    Ok(serde_json::to_string_pretty(&value)?)
}

/// Write a new identity to `out` (0600, refusing to overwrite); its recipient.
pub fn keygen(out: &Path) -> anyhow::Result<String> {
    use age::secrecy::ExposeSecret;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {}", out.display()))?;
    writeln!(
        f,
        "# created: {}\n# public key: {recipient}\n{}",
        crate::audit::record::rfc3339(std::time::SystemTime::now()),
        identity.to_string().expose_secret()
    )?;
    Ok(recipient)
}
