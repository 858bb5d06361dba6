//! TLS on both sides of the proxy: the per-connection server configuration presented to the agent (the minted leaf,
//! ALPN chosen from the client's offer), the record left when an agent's client refuses that certificate, and the
//! client configuration used upstream (the host's trust store, or the bundled Mozilla roots when configured, plus
//! the extra roots the daemon config names), all on the one aws-lc-rs provider.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::server::{
    ClientHello, NoServerSessionStorage, ProducesTickets, ResolvesServerCert,
    ServerSessionMemoryCache,
};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::ca::crypto_provider;
use super::{ProxyContext, Target};
use crate::config::UpstreamRoots;
use crate::model::{Reason, RequestSummary, Scheme};

pub(crate) const H2: &[u8] = b"h2";
pub(crate) const HTTP11: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no usable PEM certificate ({detail})")]
    Pem { path: String, detail: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error(
        "the system trust store has no usable certificate ({detail}); install the CA certificates \
         (Debian: ca-certificates), point SSL_CERT_FILE at a PEM bundle, or set proxy.upstream_roots: bundled"
    )]
    NoSystemRoots { detail: String },
}

/// The upstream TLS client configurations: one offering `h2, http/1.1` (every request but an upgrade, whichever
/// version the agent spoke) and one offering `http/1.1` only (upgrades, RFC 9110 §7.8).
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub(crate) h2: Arc<ClientConfig>,
    pub(crate) h1: Arc<ClientConfig>,
}

impl UpstreamTls {
    /// Trust `source` (the host's store, or the bundled Mozilla roots) plus every certificate in the `extra_roots`
    /// PEM files.
    ///
    /// The system store is what OpenSSL would use (rustls-native-certs, through openssl-probe: on Debian
    /// `/etc/ssl/certs/ca-certificates.crt` and `/etc/ssl/certs`), or only the `SSL_CERT_FILE` / `SSL_CERT_DIR` of
    /// the daemon's environment when either is set. It is read once, at start-up. Errors: an unreadable
    /// `extra_roots` file or one without a certificate; a system store without a single usable certificate.
    pub fn new(
        source: UpstreamRoots,
        extra_roots: &[impl AsRef<Path>],
    ) -> Result<UpstreamTls, TlsSetupError> {
        let mut roots = RootCertStore::empty();
        match source {
            UpstreamRoots::System => {
                let found = rustls_native_certs::load_native_certs();
                for error in &found.errors {
                    tracing::warn!(%error, "part of the system trust store could not be read");
                }
                let (added, ignored) = roots.add_parsable_certificates(found.certs);
                if ignored > 0 {
                    tracing::warn!(ignored, "system trust store certificates rustls cannot use");
                }
                if added == 0 {
                    let detail = match found.errors.first() {
                        Some(e) => e.to_string(),
                        None => "no certificate found".to_string(),
                    };
                    return Err(TlsSetupError::NoSystemRoots { detail });
                }
                tracing::info!(roots = added, "upstream roots: the system trust store");
            }
            UpstreamRoots::Bundled => {
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
                tracing::info!(
                    roots = roots.len(),
                    "upstream roots: the bundled Mozilla roots"
                );
            }
        }
        for path in extra_roots {
            let path = path.as_ref();
            let bytes = std::fs::read(path).map_err(|source| TlsSetupError::Io {
                path: path.display().to_string(),
                source,
            })?;
            let mut added = 0usize;
            for cert in CertificateDer::pem_slice_iter(&bytes) {
                let cert = cert.map_err(|e| TlsSetupError::Pem {
                    path: path.display().to_string(),
                    detail: e.to_string(),
                })?;
                roots.add(cert)?;
                added += 1;
            }
            if added == 0 {
                return Err(TlsSetupError::Pem {
                    path: path.display().to_string(),
                    detail: "no CERTIFICATE block".into(),
                });
            }
        }
        Self::with_roots(roots)
    }

    /// Trust exactly `roots` (tests and callers that build their own store).
    pub fn with_roots(roots: RootCertStore) -> Result<UpstreamTls, TlsSetupError> {
        let roots = Arc::new(roots);
        let build = |alpn: Vec<Vec<u8>>| -> Result<Arc<ClientConfig>, TlsSetupError> {
            let mut cfg = ClientConfig::builder_with_provider(crypto_provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            cfg.alpn_protocols = alpn;
            Ok(Arc::new(cfg))
        };
        Ok(UpstreamTls {
            h2: build(vec![H2.to_vec(), HTTP11.to_vec()])?,
            h1: build(vec![HTTP11.to_vec()])?,
        })
    }
}

/// What the agent's ClientHello offered.
#[derive(Debug, Clone)]
pub(crate) struct Hello {
    pub sni: Option<String>,
    /// The ALPN protocols the proxy will offer back: `[h2, http/1.1]` ∩ the client's (in our order).
    pub alpn: Vec<Vec<u8>>,
    /// The client sent an ALPN extension.
    pub client_sent_alpn: bool,
}

impl Hello {
    pub fn read(hello: &ClientHello<'_>) -> Hello {
        let offered: Vec<&[u8]> = hello.alpn().map(|a| a.collect()).unwrap_or_default();
        let alpn = [H2, HTTP11]
            .iter()
            .filter(|p| offered.contains(p))
            .map(|p| p.to_vec())
            .collect();
        Hello {
            sni: hello
                .server_name()
                .map(|n| crate::host::normalise(n).into_owned()),
            alpn,
            client_sent_alpn: hello.alpn().is_some(),
        }
    }
}

/// Sessions agents' TLS clients can resume, shared by every accepted connection that sent a server name: TLS 1.3
/// tickets (RFC 8446 §4.6.1) sealed with keys held in memory and rotated every 6 hours (rustls's RFC 5077 §4
/// construction: AES-256-CBC and HMAC-SHA256), so the proxy keeps nothing per session; TLS 1.2 session IDs in a
/// shared cache of at most [`TLS12_SESSIONS`]. rustls resumes a session only under the server name it was made for
/// (RFC 6066 §3), so a session never carries one name's leaf to another.
struct AgentSessions {
    /// `None` when the ticket keys could not be made (the system's random source failed): then TLS 1.3 sessions
    /// are kept in `tls12`'s cache instead.
    tickets: Option<Arc<dyn ProducesTickets>>,
    tls12: Arc<ServerSessionMemoryCache>,
}

/// TLS 1.2 sessions kept (each ~200 bytes; rustls's cache scans them when one is taken, so it stays small).
const TLS12_SESSIONS: usize = 256;

fn agent_sessions() -> &'static AgentSessions {
    static SESSIONS: OnceLock<AgentSessions> = OnceLock::new();
    SESSIONS.get_or_init(|| AgentSessions {
        tickets: rustls::crypto::aws_lc_rs::Ticketer::new()
            .inspect_err(|e| {
                tracing::warn!(error = %e, "no TLS ticket keys: agents' sessions resume from memory instead")
            })
            .ok(),
        tls12: ServerSessionMemoryCache::new(TLS12_SESSIONS),
    })
}

/// The server configuration for one accepted connection: the leaf for its name, the ALPN overlap, and, when the
/// agent sent a server name (`resumable`), the sessions shared across connections ([`AgentSessions`]), so its next
/// connection resumes instead of doing a full handshake (no certificate, no signature; rustls's per-configuration
/// default would be a fresh cache per connection that no later connection sees). A connection without a server
/// name gets its leaf from the destination or the CONNECT target, which rustls does not see: it neither makes nor
/// resumes a session, so it always gets the leaf for where it goes. The suite is the proxy's choice, not the
/// agent's: TLS 1.3's mandatory TLS_AES_128_GCM_SHA256 first ([`crypto_provider`]).
pub(crate) fn server_config(
    leaf: Arc<CertifiedKey>,
    alpn: Vec<Vec<u8>>,
    resumable: bool,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let mut cfg = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(leaf)));
    cfg.alpn_protocols = alpn;
    cfg.ignore_client_order = true;
    if resumable {
        let sessions = agent_sessions();
        if let Some(tickets) = &sessions.tickets {
            cfg.ticketer = tickets.clone();
        }
        cfg.session_storage = sessions.tls12.clone();
    } else {
        cfg.session_storage = Arc::new(NoServerSessionStorage {});
        cfg.send_tls13_tickets = 0;
    }
    Ok(Arc::new(cfg))
}

/// Record an agent's TLS client that did not complete the handshake with the minted leaf — typically one that does
/// not trust the enforcer CA (its own CA setting names another file) and answered with a fatal alert: a block with
/// reason `client_tls`, the SNI as host, the original destination, the agent, and in the message the alert it sent
/// (RFC 8446 §6 name) or what happened instead. `error` is `None` when the handshake timed out.
pub(crate) async fn record_agent_handshake_failure(
    ctx: &ProxyContext,
    target: &Target,
    sni: Option<String>,
    error: Option<&std::io::Error>,
) {
    let message = agent_handshake_failure_message(error);
    let summary = RequestSummary {
        scheme: Some(Scheme::Https),
        host: sni.or_else(|| target.host_hint.clone()),
        ip: Some(target.dst.ip()),
        port: target.dst.port(),
        tls_alert: error.and_then(received_alert).map(alert_name),
        ..RequestSummary::default()
    };
    let policy = ctx.policy.current();
    let refusal = (Reason::ClientTls, None);
    ctx.record_refusal(&policy, &target.agent, summary, refusal, &message)
        .await;
}

/// The rustls error inside a tokio-rustls handshake error, if that is what it is.
fn rustls_error(error: &std::io::Error) -> Option<&rustls::Error> {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// The fatal alert the client sent, when that is how the handshake ended.
fn received_alert(error: &std::io::Error) -> Option<rustls::AlertDescription> {
    match rustls_error(error) {
        Some(rustls::Error::AlertReceived(alert)) => Some(*alert),
        _ => None,
    }
}

/// The block message of the record's decision (operational context; the audit record keeps the alert in
/// `request.tls_alert`, not the message).
fn agent_handshake_failure_message(error: Option<&std::io::Error>) -> String {
    let Some(error) = error else {
        return "the TLS handshake with the agent timed out".to_string();
    };
    match rustls_error(error) {
        Some(rustls::Error::AlertReceived(alert)) => {
            let name = alert_name(*alert);
            if is_certificate_alert(*alert) {
                format!(
                    "the agent's TLS client refused the enforcer's certificate (alert {name}): it does not trust \
                     the enforcer CA; its own CA setting names another file (see docs/agents.md)"
                )
            } else {
                format!("the agent's TLS client ended the handshake with alert {name}")
            }
        }
        Some(other) => format!("the TLS handshake with the agent failed: {other}"),
        None if error.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the agent's TLS client closed the connection during the handshake, without an alert"
                .to_string()
        }
        None => format!("the TLS handshake with the agent failed: {}", error.kind()),
    }
}

/// Alerts a client sends when it does not accept the server's certificate (RFC 8446 §6.2).
fn is_certificate_alert(alert: rustls::AlertDescription) -> bool {
    use rustls::AlertDescription as A;
    matches!(
        alert,
        A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::UnknownCA
            | A::AccessDenied
    )
}

/// The IANA TLS Alert Registry name of an alert (`unknown_ca`, `bad_certificate`, ...), or its number.
fn alert_name(alert: rustls::AlertDescription) -> String {
    let name = match u8::from(alert) {
        0 => "close_notify",
        10 => "unexpected_message",
        20 => "bad_record_mac",
        22 => "record_overflow",
        40 => "handshake_failure",
        42 => "bad_certificate",
        43 => "unsupported_certificate",
        44 => "certificate_revoked",
        45 => "certificate_expired",
        46 => "certificate_unknown",
        47 => "illegal_parameter",
        48 => "unknown_ca",
        49 => "access_denied",
        50 => "decode_error",
        51 => "decrypt_error",
        70 => "protocol_version",
        71 => "insufficient_security",
        80 => "internal_error",
        86 => "inappropriate_fallback",
        90 => "user_canceled",
        109 => "missing_extension",
        110 => "unsupported_extension",
        112 => "unrecognized_name",
        113 => "bad_certificate_status_response",
        115 => "unknown_psk_identity",
        116 => "certificate_required",
        120 => "no_application_protocol",
        other => return format!("{other}"),
    };
    name.to_string()
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rustls_io(e: rustls::Error) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn a_refused_certificate_names_the_alert_the_client_sent() {
        let e = rustls_io(rustls::Error::AlertReceived(
            rustls::AlertDescription::UnknownCA,
        ));
        let m = agent_handshake_failure_message(Some(&e));
        assert!(
            m.contains("alert unknown_ca") && m.contains("does not trust"),
            "{m}"
        );
        assert_eq!(
            received_alert(&e).map(alert_name).as_deref(),
            Some("unknown_ca")
        );
        let e = rustls_io(rustls::Error::AlertReceived(
            rustls::AlertDescription::ProtocolVersion,
        ));
        let m = agent_handshake_failure_message(Some(&e));
        assert!(
            m.contains("alert protocol_version") && !m.contains("trust"),
            "{m}"
        );
        let e = std::io::Error::from(std::io::ErrorKind::UnexpectedEof);
        assert!(agent_handshake_failure_message(Some(&e)).contains("without an alert"));
        assert!(received_alert(&e).is_none());
        assert!(agent_handshake_failure_message(None).contains("timed out"));
        assert_eq!(alert_name(rustls::AlertDescription::from(200)), "200");
    }
}
