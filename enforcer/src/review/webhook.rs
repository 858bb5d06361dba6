//! The review webhook: when an exchange is held, the daemon POSTs a summary of it (a [`super::Pending`]: names,
//! sizes and digests, no body, header value or secret) with two signed links, one to approve and one to deny, to a
//! configured URL (a chat bot, a ticketing hook). The links point at a small HTTP listener of the daemon
//! ([`serve_links`]); each carries the review id, the action, an expiry (the review's deadline) and an HMAC-SHA256
//! over the three under a key only the daemon holds (`<state_dir>/review.key`, 0600), so a link can neither be
//! forged nor turned into the other action. Opening a link (GET) shows a confirmation form; only its POST answers
//! the review (link previews and prefetchers fetch with GET). The approval is recorded as by the webhook's
//! configured `name`, with the approver the receiver names (`approver=`) as its claim.
//!
//! POSTed JSON: `{"review": {…Pending…}, "approve": "<url>", "deny": "<url>", "expires": "<RFC 3339>"}`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_lc_rs::hmac;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{Pending, Reviews};
use crate::model::Approver;

/// How long the webhook receiver may take to accept a summary.
const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer body (a reason and an approver name) the link listener reads.
const MAX_ANSWER_BODY: usize = 8 * 1024;
/// The key file under the state directory.
pub const KEY_FILE: &str = "review.key";

/// `review.webhook` in the daemon configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// Where each new review's summary is POSTed (`http://` or `https://`; HTTPS is verified like an upstream).
    pub url: String,
    /// The identity approvals through the links are recorded under.
    #[serde(default = "default_name")]
    pub name: String,
    /// Where the daemon serves the signed links.
    pub listen: SocketAddr,
    /// The links' base URL, as the receiver reaches `listen` (default `http://<listen>`).
    #[serde(default)]
    pub link_base: Option<String>,
    /// Serve the links on a non-loopback address (refused unless set).
    #[serde(default)]
    pub allow_non_loopback: bool,
}

fn default_name() -> String {
    "webhook".into()
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("review.webhook.url {0:?} is not an http:// or https:// URL")]
    Url(String),
    #[error(
        "review.webhook.listen {0} is not a loopback address; set allow_non_loopback to serve it"
    )]
    NotLoopback(SocketAddr),
    #[error("review key {path}: {source}")]
    Key {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The configured webhook: where summaries go and how links are signed.
pub struct Webhook {
    url: Uri,
    name: String,
    link_base: String,
    key: hmac::Key,
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.url)
            .field("name", &self.name)
            .finish()
    }
}

impl Webhook {
    /// The webhook of `settings`, its key loaded from (or created in) `state_dir`; HTTPS receivers are verified
    /// with `tls`.
    pub fn new(
        settings: &WebhookSettings,
        state_dir: &Path,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Webhook, WebhookError> {
        let url: Uri = settings
            .url
            .parse()
            .ok()
            .filter(|u: &Uri| {
                matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some()
            })
            .ok_or_else(|| WebhookError::Url(settings.url.clone()))?;
        if !settings.listen.ip().is_loopback() && !settings.allow_non_loopback {
            return Err(WebhookError::NotLoopback(settings.listen));
        }
        let key = load_or_create_key(&state_dir.join(KEY_FILE))?;
        let link_base = settings
            .link_base
            .clone()
            .unwrap_or_else(|| format!("http://{}", settings.listen));
        Ok(Webhook {
            url,
            name: settings.name.clone(),
            link_base: link_base.trim_end_matches('/').to_owned(),
            key: hmac::Key::new(hmac::HMAC_SHA256, &key),
            tls,
        })
    }

    fn message(id: u64, action: &str, expires: u64) -> String {
        format!("enforcer-review:{id}:{action}:{expires}")
    }

    /// The signed link that answers review `id` with `action` (`approve` or `deny`) until `expires` (Unix seconds).
    pub fn link(&self, id: u64, action: &str, expires: u64) -> String {
        let sig = hmac::sign(&self.key, Self::message(id, action, expires).as_bytes());
        format!(
            "{}/review/{id}/{action}?expires={expires}&sig={}",
            self.link_base,
            hex::encode(sig.as_ref())
        )
    }

    fn verify(&self, id: u64, action: &str, expires: u64, sig: &str) -> bool {
        let Ok(sig) = hex::decode(sig) else {
            return false;
        };
        hmac::verify(
            &self.key,
            Self::message(id, action, expires).as_bytes(),
            &sig,
        )
        .is_ok()
    }

    /// POST `pending`'s summary and links to the receiver (best effort: a failure is logged, the review still waits
    /// for an answer through `enforcer review`).
    pub(super) async fn announce(&self, pending: &Pending) {
        let expires = unix_now() + pending.timeout_secs;
        let body = serde_json::json!({
            "review": pending,
            "approve": self.link(pending.id, "approve", expires),
            "deny": self.link(pending.id, "deny", expires),
            "expires": pending.deadline,
        });
        match tokio::time::timeout(POST_TIMEOUT, self.post(body.to_string().into_bytes())).await {
            Ok(Ok(status)) if (200..300).contains(&status) => {
                tracing::info!(
                    review = pending.id,
                    status,
                    "review announced to the webhook"
                );
            }
            Ok(Ok(status)) => {
                tracing::warn!(
                    review = pending.id,
                    status,
                    "the review webhook refused the summary"
                )
            }
            Ok(Err(e)) => tracing::warn!(review = pending.id, error = %e, "review webhook failed"),
            Err(_) => tracing::warn!(review = pending.id, "review webhook timed out"),
        }
    }

    async fn post(&self, body: Vec<u8>) -> Result<u16, Box<dyn std::error::Error + Send + Sync>> {
        let host = self.url.host().unwrap_or_default().to_owned();
        let https = self.url.scheme_str() == Some("https");
        let port = self.url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await?
            .next()
            .ok_or("the webhook host has no address")?;
        let tcp = TcpStream::connect(addr).await?;
        let authority = self.url.authority().map_or(host.clone(), |a| a.to_string());
        let req = Request::post(self.url.path_and_query().map_or("/", |p| p.as_str()))
            .header(header::HOST, authority)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::USER_AGENT, "enforcer-review")
            .body(Full::new(Bytes::from(body)))?;
        if https {
            let name = rustls::pki_types::ServerName::try_from(host)?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(name, tcp)
                .await?;
            Ok(send(tls, req).await?)
        } else {
            Ok(send(tcp, req).await?)
        }
    }
}

async fn send<S>(io: S, req: Request<Full<Bytes>>) -> Result<u16, hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await?;
    Ok(resp.status().as_u16())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// The HMAC key: 32 random bytes, created 0600 on first use.
fn load_or_create_key(path: &Path) -> Result<Vec<u8>, WebhookError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| WebhookError::Key {
        path: path.display().to_string(),
        source,
    };
    match std::fs::read(path) {
        Ok(key) if key.len() == 32 => return Ok(key),
        Ok(_) => {
            return Err(err(std::io::Error::other(
                "not a 32-byte key (remove it to make a new one)",
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut key = vec![0u8; 32];
    aws_lc_rs::rand::fill(&mut key).map_err(|_| err(std::io::Error::other("no randomness")))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    file.write_all(&key).map_err(err)?;
    Ok(key)
}

/// Serve the signed links on `listener` until `shutdown` fires.
pub async fn serve_links(
    listener: TcpListener,
    reviews: Arc<Reviews>,
    webhook: Arc<Webhook>,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "review link listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (reviews, webhook) = (reviews.clone(), webhook.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (reviews, webhook) = (reviews.clone(), webhook.clone());
                async move { Ok::<_, Infallible>(answer_link(&reviews, &webhook, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "review link connection");
            }
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

/// A link's parts: `/review/ID/ACTION?expires=E&sig=S`.
fn parse_link(uri: &Uri) -> Option<(u64, bool, u64, String)> {
    let mut segs = uri.path().trim_matches('/').split('/');
    let (Some("review"), Some(id), Some(action), None) =
        (segs.next(), segs.next(), segs.next(), segs.next())
    else {
        return None;
    };
    let approved = match action {
        "approve" => true,
        "deny" => false,
        _ => return None,
    };
    let query = form(uri.query().unwrap_or(""));
    let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    Some((
        id.parse().ok()?,
        approved,
        get("expires")?.parse().ok()?,
        get("sig")?,
    ))
}

fn form(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                crate::encoding::percent_decode(k, true),
                crate::encoding::percent_decode(v, true),
            )
        })
        .collect()
}

async fn answer_link(
    reviews: &Reviews,
    webhook: &Webhook,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let text = |status, body: &str| reply(status, "text/plain; charset=utf-8", format!("{body}\n"));
    let Some((id, approved, expires, sig)) = parse_link(req.uri()) else {
        return text(StatusCode::NOT_FOUND, "not a review link");
    };
    let action = if approved { "approve" } else { "deny" };
    if !webhook.verify(id, action, expires, &sig) {
        return text(StatusCode::FORBIDDEN, "bad signature");
    }
    if unix_now() > expires {
        return text(StatusCode::GONE, "this link has expired");
    }
    match *req.method() {
        Method::GET => {
            // Only a POST answers: link previews and prefetchers GET links.
            let page = format!(
                "<!doctype html><meta charset=utf-8><title>review {id}</title>\
                 <form method=post><p>{action} review {id}</p>\
                 <p><label>reason <input name=reason></label></p>\
                 <p><label>approver <input name=approver></label></p>\
                 <button type=submit>{action}</button></form>\n"
            );
            reply(StatusCode::OK, "text/html; charset=utf-8", page)
        }
        Method::POST => {
            let body = match Limited::new(req.into_body(), MAX_ANSWER_BODY)
                .collect()
                .await
            {
                Ok(b) => b.to_bytes(),
                Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "answer too large"),
            };
            let fields = answer_fields(&body);
            let get = |k: &str| {
                fields
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, v)| v.trim().to_owned())
                    .filter(|v| !v.is_empty())
            };
            let by = Approver::Webhook {
                webhook: webhook.name.clone(),
                claimed_by: get("approver"),
            };
            match reviews.answer(id, approved, by, get("reason")) {
                Ok(_) => text(
                    StatusCode::OK,
                    &format!(
                        "review {id} {}",
                        if approved { "approved" } else { "denied" }
                    ),
                ),
                Err(e) => text(StatusCode::NOT_FOUND, &e.to_string()),
            }
        }
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET or POST"),
    }
}

/// The answer's fields from a form (`reason=…&approver=…`) or a JSON object body.
fn answer_fields(body: &[u8]) -> Vec<(String, String)> {
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body) {
        return map
            .into_iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_owned())))
            .collect();
    }
    form(&String::from_utf8_lossy(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook(dir: &Path) -> Webhook {
        let settings = WebhookSettings {
            url: "http://127.0.0.1:9/hook".into(),
            name: "chat".into(),
            listen: "127.0.0.1:15080".parse().unwrap(),
            link_base: None,
            allow_non_loopback: false,
        };
        let tls =
            crate::proxy::UpstreamTls::new(crate::config::UpstreamRoots::Bundled, &[] as &[&Path])
                .unwrap();
        Webhook::new(&settings, dir, tls.h1.clone()).unwrap()
    }

    #[test]
    fn links_are_signed_per_id_action_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let w = webhook(dir.path());
        let link: Uri = w.link(42, "approve", 1_900_000_000).parse().unwrap();
        let (id, approved, expires, sig) = parse_link(&link).unwrap();
        assert_eq!((id, approved, expires), (42, true, 1_900_000_000));
        assert!(w.verify(42, "approve", expires, &sig));
        // The same signature does not deny, answer another review or live longer.
        assert!(!w.verify(42, "deny", expires, &sig));
        assert!(!w.verify(43, "approve", expires, &sig));
        assert!(!w.verify(42, "approve", expires + 1, &sig));
        // The key persists: a restarted daemon honours its links.
        assert!(webhook(dir.path()).verify(42, "approve", expires, &sig));
        let mode = std::fs::metadata(dir.path().join(KEY_FILE)).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
    }

    #[test]
    fn answers_are_read_from_forms_and_json() {
        assert_eq!(
            answer_fields(b"reason=looks+fine&approver=alice%40example.com"),
            vec![
                ("reason".to_string(), "looks fine".to_string()),
                ("approver".to_string(), "alice@example.com".to_string())
            ]
        );
        assert_eq!(
            answer_fields(br#"{"reason":"ok","approver":"bob","n":1}"#),
            vec![
                ("reason".to_string(), "ok".to_string()),
                ("approver".to_string(), "bob".to_string())
            ]
        );
    }
}
