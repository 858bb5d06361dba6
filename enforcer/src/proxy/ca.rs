//! The enforcer's certificate authority: creates or loads the CA (ECDSA P-256) in a private directory (0700, key
//! 0600), publishes what clients must read (the CA certificate and a bundle of system roots + the CA, 0644 in a 0755
//! directory, whatever the daemon's umask), and mints leaf certificates for intercepted hosts. All leaves share one
//! leaf key (never the CA key); each host's leaf is minted once and cached, with concurrent first requests for the
//! same host waiting on the same mint (single-flight).

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::{CertifiedKey, SigningKey};
use time::{Duration, OffsetDateTime};
use tokio::sync::OnceCell;

/// File names inside the CA directory (private) and the public directory.
const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
const BUNDLE: &str = "bundle.pem";
/// Modes: the CA directory and key are root's alone; what agents read is readable by everyone.
const PRIVATE_DIR_MODE: u32 = 0o700;
const PRIVATE_FILE_MODE: u32 = 0o600;
const PUBLIC_DIR_MODE: u32 = 0o755;
const PUBLIC_FILE_MODE: u32 = 0o644;
/// The system trust store that goes into the bundle when present.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Leaves cached before the cache is emptied (bounds memory against clients inventing host names).
const LEAF_CACHE_MAX: usize = 10_000;
/// The common name of the CA certificate.
const CA_NAME: &str = "Agent Egress Enforcer Local CA";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Cert {
        path: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the TLS library refused the leaf key: {0}")]
    Key(#[from] rustls::Error),
    #[error("{host:?} is not a name a certificate can carry")]
    BadName { host: String },
}

type LeafCell = Arc<OnceCell<Arc<CertifiedKey>>>;

/// The CA: its certificate, the issuer used to sign leaves, the shared leaf key and the leaf cache.
pub struct CertAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
    leaf_key: KeyPair,
    leaf_signer: Arc<dyn SigningKey>,
    leaves: Mutex<HashMap<String, LeafCell>>,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertAuthority").finish_non_exhaustive()
    }
}

impl CertAuthority {
    /// Load the CA from `dir` (`ca.pem`, `ca.key`), creating it when absent. `dir` is made 0700 and the key 0600
    /// (also when they already existed with wider modes), so only the daemon's user can read the key.
    pub fn load_or_create(dir: &Path) -> Result<CertAuthority, CaError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        ensure_dir(dir, PRIVATE_DIR_MODE)?;
        if cert_path.exists() && key_path.exists() {
            set_mode(&key_path, PRIVATE_FILE_MODE)?;
            let cert_pem = read(&cert_path)?;
            let key_pem = read(&key_path)?;
            let key = KeyPair::from_pem(&key_pem).map_err(|source| CaError::Cert {
                path: key_path.display().to_string(),
                source,
            })?;
            let issuer =
                Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|source| CaError::Cert {
                    path: cert_path.display().to_string(),
                    source,
                })?;
            return Self::with_issuer(cert_pem, issuer);
        }
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, CA_NAME);
        dn.push(DnType::OrganizationName, "enforcer");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        write_file(&key_path, key.serialize_pem().as_bytes(), PRIVATE_FILE_MODE)?;
        write_file(&cert_path, cert_pem.as_bytes(), PUBLIC_FILE_MODE)?;
        Self::with_issuer(cert_pem, Issuer::new(params, key))
    }

    fn with_issuer(
        cert_pem: String,
        issuer: Issuer<'static, KeyPair>,
    ) -> Result<CertAuthority, CaError> {
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let leaf_signer = crypto_provider().key_provider.load_private_key(der)?;
        Ok(CertAuthority {
            cert_pem,
            issuer,
            leaf_key,
            leaf_signer,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Publish what clients read into `dir` (made 0755): `ca.pem`, the CA certificate, and `bundle.pem`, the system
    /// roots (`/etc/ssl/certs/ca-certificates.crt`, when present) followed by the CA. Both are 0644 whatever the
    /// umask, and replaced atomically (a client never reads half a file).
    pub fn write_public(&self, dir: &Path) -> Result<PublicFiles, CaError> {
        ensure_dir(dir, PUBLIC_DIR_MODE)?;
        let mut bundle = match std::fs::read_to_string(SYSTEM_ROOTS) {
            Ok(roots) => roots,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(io_err(Path::new(SYSTEM_ROOTS), source)),
        };
        if !bundle.is_empty() && !bundle.ends_with('\n') {
            bundle.push('\n');
        }
        bundle.push_str(&self.cert_pem);
        let files = PublicFiles {
            ca_cert: dir.join(CA_CERT),
            bundle: dir.join(BUNDLE),
        };
        replace_file(&files.ca_cert, self.cert_pem.as_bytes(), PUBLIC_FILE_MODE)?;
        replace_file(&files.bundle, bundle.as_bytes(), PUBLIC_FILE_MODE)?;
        Ok(files)
    }

    /// The leaf for `host` (a DNS name or an IP literal), minted on first use and cached.
    pub async fn leaf(&self, host: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let host = crate::host::normalise(host).into_owned();
        let cell = {
            let mut leaves = self.leaves.lock().unwrap_or_else(|p| p.into_inner());
            if leaves.len() >= LEAF_CACHE_MAX && !leaves.contains_key(&host) {
                leaves.clear();
            }
            leaves.entry(host.clone()).or_default().clone()
        };
        cell.get_or_try_init(|| async { self.mint(&host) })
            .await
            .cloned()
    }

    /// Mint a leaf for `host` now (no cache).
    pub fn mint(&self, host: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let san = match host.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(host.try_into().map_err(|_| CaError::BadName {
                host: host.to_string(),
            })?),
        };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![san];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(30);
        let cert = params.signed_by(&self.leaf_key, &self.issuer)?;
        let ca_der = ca_der(&self.cert_pem);
        let mut chain = vec![cert.der().clone()];
        chain.extend(ca_der);
        Ok(Arc::new(CertifiedKey::new(chain, self.leaf_signer.clone())))
    }
}

/// The world-readable files [`CertAuthority::write_public`] wrote.
#[derive(Debug, Clone)]
pub struct PublicFiles {
    /// The CA certificate alone (PEM), for clients that add it to roots of their own (`NODE_EXTRA_CA_CERTS`).
    pub ca_cert: PathBuf,
    /// System roots + the CA (PEM), for clients that replace their roots with a file (`SSL_CERT_FILE`, ...).
    pub bundle: PathBuf,
}

/// The DER of the CA certificate, for the chain sent with each leaf.
fn ca_der(pem: &str) -> Option<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).ok()
}

/// The one crypto provider the proxy uses (aws-lc-rs), built once: every TLS configuration shares it. Its suites
/// are aws-lc-rs's defaults with TLS 1.3's mandatory TLS_AES_128_GCM_SHA256 (RFC 8446 §9.1) moved first: its key
/// schedule runs on SHA-256, which x86-64 computes in hardware (SHA-NI), where TLS_AES_256_GCM_SHA384's SHA-384
/// took a tenth of the proxy's CPU per new agent connection.
pub(crate) fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            let mut provider = rustls::crypto::aws_lc_rs::default_provider();
            provider
                .cipher_suites
                .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
            Arc::new(provider)
        })
        .clone()
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| io_err(path, source))
}

fn io_err(path: &Path, source: std::io::Error) -> CaError {
    CaError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Create `dir` (and its parents) if needed, then give it `mode` (also when it existed: an older install may have
/// left it wider or narrower).
pub(crate) fn ensure_dir(dir: &Path, mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|source| io_err(dir, source))?;
    set_mode(dir, mode)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|source| io_err(path, source))
}

/// Write `bytes` to a new file at `path` with exactly `mode` (the umask does not narrow or widen it).
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|source| io_err(path, source))?;
    f.write_all(bytes).map_err(|source| io_err(path, source))?;
    set_mode(path, mode)
}

/// [`write_file`] to a temporary name beside `path`, then rename over it.
fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    write_file(&tmp, bytes, mode)?;
    std::fs::rename(&tmp, path).map_err(|source| io_err(path, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_then_reloads_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let a = CertAuthority::load_or_create(dir.path()).unwrap();
        let b = CertAuthority::load_or_create(dir.path()).unwrap();
        assert_eq!(a.cert_pem(), b.cert_pem());
        assert!(a.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let public = a.write_public(&dir.path().join("public")).unwrap();
        let bundle = std::fs::read_to_string(&public.bundle).unwrap();
        assert!(bundle.ends_with(a.cert_pem()));
        assert_eq!(
            std::fs::read_to_string(&public.ca_cert).unwrap(),
            a.cert_pem()
        );
    }

    #[tokio::test]
    async fn leaves_are_cached_per_host_and_verify_against_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertAuthority::load_or_create(dir.path()).unwrap();
        let first = ca.leaf("Allowed.Test.").await.unwrap();
        let again = ca.leaf("allowed.test").await.unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        let ip = ca.leaf("127.0.0.1").await.unwrap();
        assert!(!Arc::ptr_eq(&first, &ip));

        // A reloaded CA (as after a daemon restart) signs leaves that verify against the stored certificate.
        let reloaded = CertAuthority::load_or_create(dir.path()).unwrap();
        let leaf = reloaded.mint("allowed.test").unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_der(ca.cert_pem()).unwrap()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            crypto_provider(),
        )
        .build()
        .unwrap();
        use rustls::client::danger::ServerCertVerifier;
        let name = rustls::pki_types::ServerName::try_from("allowed.test").unwrap();
        verifier
            .verify_server_cert(
                &leaf.cert[0],
                &leaf.cert[1..],
                &name,
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .unwrap();
        assert!(ca.mint("bäd.test").is_err());
    }
}
