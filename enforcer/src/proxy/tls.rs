//! TLS on both sides of the proxy: the per-connection server configuration presented to the agent (the minted leaf,
//! ALPN chosen from the client's offer) and the client configuration used upstream (webpki roots plus the extra
//! roots the daemon config names), both on the one aws-lc-rs provider.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::ca::crypto_provider;

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
}

/// The upstream TLS client configurations: one offering `h2, http/1.1` (for agents that spoke h2) and one offering
/// `http/1.1` only.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    pub(crate) h2: Arc<ClientConfig>,
    pub(crate) h1: Arc<ClientConfig>,
}

impl UpstreamTls {
    /// Trust the webpki roots plus every certificate in the `extra_roots` PEM files.
    pub fn new(extra_roots: &[impl AsRef<Path>]) -> Result<UpstreamTls, TlsSetupError> {
        let mut roots = RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
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

/// The server configuration for one accepted connection: the leaf for its name and the ALPN overlap.
pub(crate) fn server_config(
    leaf: Arc<CertifiedKey>,
    alpn: Vec<Vec<u8>>,
) -> Result<Arc<ServerConfig>, TlsSetupError> {
    let mut cfg = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(leaf)));
    cfg.alpn_protocols = alpn;
    Ok(Arc::new(cfg))
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}
