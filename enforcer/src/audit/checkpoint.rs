//! Signed checkpoints: the Ed25519 key (created on first start), the layout of a line of `checkpoints.jsonl`, signing
//! and checking it, and the optional copy sent to syslog/journald through `/dev/log`.
//!
//! A checkpoint line is `{"seq":N,"hash":"<64 hex>","ts":"…","key":"<16 hex>","sig":"<128 hex>"}`; the signature
//! covers the line with its final `,"sig":"<128 hex>"}` replaced by `}` (see docs/audit.md).

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _, UnparsedPublicKey, ED25519};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::AuditError;

pub const KEY_FILE: &str = "audit.key";
pub const PUB_FILE: &str = "audit.pub";
pub const CHECKPOINT_FILE: &str = "checkpoints.jsonl";

/// `,"sig":"` + 128 hex digits + `"}`.
const SIG_SUFFIX_LEN: usize = 8 + 128 + 2;

/// An Ed25519 public key as kept in `audit.pub`: 64 lowercase hex digits and a newline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

impl PublicKey {
    /// First 16 hex digits of SHA-256 of the raw key: names the key in every checkpoint.
    pub fn key_id(&self) -> String {
        hex::encode(&Sha256::digest(self.0)[..8])
    }

    pub fn parse(text: &str) -> Option<PublicKey> {
        let mut raw = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut raw).ok()?;
        Some(PublicKey(raw))
    }

    pub fn load(path: &Path) -> Result<PublicKey, AuditError> {
        let text = fs::read_to_string(path).map_err(|e| AuditError::io(path, e))?;
        PublicKey::parse(&text).ok_or_else(|| AuditError::BadKey {
            path: path.display().to_string(),
        })
    }

    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, self.0)
            .verify(msg, sig)
            .is_ok()
    }
}

/// The writer's signing key.
pub(crate) struct Signer {
    key: Ed25519KeyPair,
    pub public: PublicKey,
    key_id: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Load `<dir>/audit.key`, or create it (0600, PKCS#8 v2) and `<dir>/audit.pub` on first start.
    pub fn load_or_create(dir: &Path) -> Result<Signer, AuditError> {
        let key_path = dir.join(KEY_FILE);
        let pkcs8 = match fs::read(&key_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                    .map_err(|_| AuditError::KeyGen)?;
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&key_path)
                    .map_err(|e| AuditError::io(&key_path, e))?;
                f.write_all(doc.as_ref())
                    .and_then(|()| f.sync_all())
                    .map_err(|e| AuditError::io(&key_path, e))?;
                tracing::info!(path = %key_path.display(), "created the audit signing key");
                doc.as_ref().to_vec()
            }
            Err(e) => return Err(AuditError::io(&key_path, e)),
        };
        let key = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|_| AuditError::BadKey {
            path: key_path.display().to_string(),
        })?;
        let mut raw = [0u8; 32];
        raw.copy_from_slice(key.public_key().as_ref());
        let public = PublicKey(raw);
        let pub_path = dir.join(PUB_FILE);
        if PublicKey::load(&pub_path).ok() != Some(public) {
            write_synced(
                &pub_path,
                format!("{}\n", hex::encode(raw)).as_bytes(),
                0o644,
            )?;
        }
        Ok(Signer {
            key,
            key_id: public.key_id(),
            public,
        })
    }

    /// One signed checkpoint line, with its `\n`.
    pub fn line(&self, seq: u64, hash: &[u8; 32], ts: &str) -> Vec<u8> {
        let mut out = format!(
            "{{\"seq\":{seq},\"hash\":\"{}\",\"ts\":\"{ts}\",\"key\":\"{}\"}}",
            hex::encode(hash),
            self.key_id
        )
        .into_bytes();
        let sig = self.key.sign(&out);
        out.pop();
        out.extend_from_slice(b",\"sig\":\"");
        out.extend_from_slice(hex::encode(sig.as_ref()).as_bytes());
        out.extend_from_slice(b"\"}\n");
        out
    }
}

fn write_synced(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AuditError> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| AuditError::io(&tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| AuditError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| AuditError::io(path, e))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    seq: u64,
    hash: String,
    ts: String,
    key: String,
}

/// A checkpoint read back from `checkpoints.jsonl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: [u8; 32],
    pub ts: String,
    pub key_id: String,
    sig: Vec<u8>,
    signed: Vec<u8>,
}

/// Why a checkpoint line is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointProblem {
    #[error("not a well-formed checkpoint")]
    Malformed,
    #[error("signed by key {found}, not by the expected key {expected}")]
    WrongKey { found: String, expected: String },
    #[error("bad signature")]
    BadSignature,
}

impl Checkpoint {
    /// Parse a line (without `\n`); the signature is checked by [`Checkpoint::check`].
    pub fn parse(line: &[u8]) -> Result<Checkpoint, CheckpointProblem> {
        if line.len() < SIG_SUFFIX_LEN + 2 {
            return Err(CheckpointProblem::Malformed);
        }
        let cut = line.len() - SIG_SUFFIX_LEN;
        let tail = &line[cut..];
        if !tail.starts_with(b",\"sig\":\"") || !tail.ends_with(b"\"}") {
            return Err(CheckpointProblem::Malformed);
        }
        let sig = hex::decode(&tail[8..8 + 128]).map_err(|_| CheckpointProblem::Malformed)?;
        let mut signed = line[..cut].to_vec();
        signed.push(b'}');
        let body: Body =
            serde_json::from_slice(&signed).map_err(|_| CheckpointProblem::Malformed)?;
        let mut hash = [0u8; 32];
        if body.hash.len() != 64 || body.hash.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(CheckpointProblem::Malformed);
        }
        hex::decode_to_slice(&body.hash, &mut hash).map_err(|_| CheckpointProblem::Malformed)?;
        Ok(Checkpoint {
            seq: body.seq,
            hash,
            ts: body.ts,
            key_id: body.key,
            sig,
            signed,
        })
    }

    pub fn check(&self, key: &PublicKey) -> Result<(), CheckpointProblem> {
        let expected = key.key_id();
        if self.key_id != expected {
            return Err(CheckpointProblem::WrongKey {
                found: self.key_id.clone(),
                expected,
            });
        }
        if key.verify(&self.signed, &self.sig) {
            Ok(())
        } else {
            Err(CheckpointProblem::BadSignature)
        }
    }
}

/// Best-effort copy of checkpoints to the local syslog socket (journald listens there too). Never fails.
#[derive(Debug)]
pub(crate) struct Syslog {
    sock: Option<std::os::unix::net::UnixDatagram>,
    path: PathBuf,
}

impl Syslog {
    pub fn new(enabled: bool) -> Syslog {
        let path = PathBuf::from("/dev/log");
        let sock = if enabled {
            std::os::unix::net::UnixDatagram::unbound()
                .and_then(|s| s.set_nonblocking(true).map(|()| s))
                .map_err(|e| tracing::debug!(error = %e, "no syslog socket"))
                .ok()
        } else {
            None
        };
        Syslog { sock, path }
    }

    pub fn send(&self, line: &[u8]) {
        let Some(sock) = &self.sock else { return };
        // <86> = facility authpriv (10), severity info (6).
        let mut msg =
            format!("<86>enforcer-audit[{}]: checkpoint ", std::process::id()).into_bytes();
        msg.extend_from_slice(line.strip_suffix(b"\n").unwrap_or(line));
        if let Err(e) = sock.send_to(&msg, &self.path) {
            tracing::debug!(error = %e, "checkpoint not sent to syslog");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_line_checks_and_tampering_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let s = Signer::load_or_create(dir.path()).unwrap();
        let again = Signer::load_or_create(dir.path()).unwrap();
        assert_eq!(s.public, again.public);
        let line = s.line(9, &[7; 32], "2026-01-01T00:00:00.000000Z");
        let cp = Checkpoint::parse(&line[..line.len() - 1]).unwrap();
        assert_eq!(cp.seq, 9);
        let key = PublicKey::load(&dir.path().join(PUB_FILE)).unwrap();
        cp.check(&key).unwrap();
        let forged = String::from_utf8(line.clone())
            .unwrap()
            .replace("\"seq\":9", "\"seq\":8");
        let cp = Checkpoint::parse(forged.trim_end().as_bytes()).unwrap();
        assert_eq!(cp.check(&key), Err(CheckpointProblem::BadSignature));
        let mode = fs::metadata(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
    }
}
