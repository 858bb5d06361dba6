//! The local control socket: how `enforcer status` and `enforcer reload` talk to the running daemon.
//!
//! A Unix stream socket at `<state_dir>/control.sock`, mode 0660, owned by root and by `control.group` when one is
//! configured. Each connection is checked with `SO_PEERCRED` (unix(7)): the peer must run as root, or have the
//! configured group as its primary or a supplementary group; anyone else gets one error line and is closed.
//!
//! Protocol: line-delimited JSON. The client writes one request object per line, the daemon answers each with one
//! response object per line, in order; a connection may carry several requests. A request names its type in
//! `"request"`; further fields are the type's own:
//!
//! ```text
//! → {"request":"status"}
//! ← {"ok":true,"result":{"daemon":{…},"capture":{…},"profiles":[…],"policy":{…},"audit":{…},"decisions":{…}}}
//! → {"request":"reload"}
//! ← {"ok":true,"result":{"result":"loaded","policy_hash":"…","previous_hash":"…"}}
//! → {"request":"review_list"}
//! ← {"ok":true,"result":[{"id":1234,"rule":"…","agent":{…},"request":{…},"deadline":"…",…}]}
//! → {"request":"review_answer","id":1234,"approve":true,"reason":"checked with the team"}
//! ← {"ok":true,"result":{"id":1234,"result":"approved","by":{"via":"cli","uid":1000,"name":"alice"}}}
//! → {"request":"session_list"}            (also "session_show" with "id")
//! ← {"ok":true,"result":[{"id":"9f…","cgroup":"/…/exec-77","labels":["customer-data"],"counters":{…},…}]}
//! → {"request":"session_start","cgroup":"/…/exec-77","profile":"coder","person":{"user":"alice","uid":1000,"groups":["alice"]}}
//! ← {"ok":true,"result":{"id":"9f…",…}}   (root peers only: `enforcer exec` registering its run)
//! → {"request":"frobnicate"}
//! ← {"ok":false,"error":"unknown variant `frobnicate`, expected one of `status`, `reload`, … at line 1 column 24"}
//! ```
//!
//! Further commands become further [`Request`] variants with their own result objects; clients that do not know a
//! field ignore it. A request line longer than [`MAX_REQUEST`] bytes is refused and the connection closed. Who
//! answered a review is the peer's uid from `SO_PEERCRED` and its name from the user database.
//!
//! **Agents are never answered.** A peer process that runs in a cgroup the capture enforces is an agent, whatever
//! its uid or groups: its first request is refused with one error line, the refusal recorded in the audit trail
//! (reason `control_from_agent`, [`Handler::refused_agent`]), and the connection closed. At most `MAX_CLIENTS` (64)
//! connections are served at once, so a peer looping on connect cannot take the daemon's descriptors. Reviews, the policy and
//! sessions are for people and the daemon's own tools; an agent that runs as a reviewer (or as root without
//! capabilities) would otherwise approve its own held call or register a run of its choosing. The peer is the
//! process that connected, held by a pidfd (`SO_PEERPIDFD`, Linux 6.5): its groups and cgroup are read from `/proc`
//! and the pidfd is then checked to still name a live process, so a pid reused in between cannot stand in for it.
//! A peer that cannot be told apart (its cgroup or the tag map unreadable) is refused too.

pub mod status;

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

pub use status::{Status, StatusSources};

/// The socket's file name under the state directory.
pub const SOCKET_NAME: &str = "control.sock";
/// Longest request line accepted, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long a client may take to send a request or read its answer.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an agent's refused connection waits for its request (read only to record what it asked; a client sends
/// it on connecting).
const AGENT_READ: Duration = Duration::from_millis(50);
/// Connections served at once; more are closed unanswered.
const MAX_CLIENTS: usize = 64;

/// Where the daemon with state directory `state_dir` listens.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// One request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The daemon's state: [`Status`].
    Status,
    /// Load the configured policy again (as SIGHUP does) and report how it went: [`ReloadReply`].
    Reload,
    /// The pending reviews: a list of [`crate::review::Pending`].
    ReviewList,
    /// One pending review.
    ReviewShow { id: u64 },
    /// Approve or deny a pending review: [`ReviewReply`].
    ReviewAnswer {
        id: u64,
        approve: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The live sessions: a list of [`crate::session::SessionInfo`].
    SessionList,
    /// One session, by id or cgroup path.
    SessionShow { id: String },
    /// `enforcer exec` registers its run before starting the agent (root peers only).
    SessionStart(crate::session::Registration),
}

/// How `review_answer` went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReviewReply {
    pub id: u64,
    /// `approved` or `denied`.
    pub result: crate::model::ReviewResult,
    pub by: crate::model::Approver,
}

/// Who is asking, from `SO_PEERCRED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

impl Request {
    /// The request's type as it is spelt on the wire (`review_answer`): what a refusal record names.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Reload => "reload",
            Request::ReviewList => "review_list",
            Request::ReviewShow { .. } => "review_show",
            Request::ReviewAnswer { .. } => "review_answer",
            Request::SessionList => "session_list",
            Request::SessionShow { .. } => "session_show",
            Request::SessionStart(_) => "session_start",
        }
    }
}

/// One response line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    fn ok(result: impl Serialize) -> Response {
        match serde_json::to_value(result) {
            Ok(v) => Response {
                ok: true,
                result: Some(v),
                error: None,
            },
            Err(e) => Response::error(format!("encoding the answer: {e}")),
        }
    }

    fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            result: None,
            error: Some(message.into()),
        }
    }
}

/// How a reload requested over the socket ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReply {
    /// `loaded`, `unchanged` or `failed`.
    pub result: crate::metrics::ReloadResult,
    /// The hash of the policy in force after the reload.
    pub policy_hash: String,
    /// The hash in force before it.
    pub previous_hash: String,
    /// Why the file did not load (with file, line and column), when `result` is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the daemon answers with.
pub trait Handler: Send + Sync + 'static {
    fn status(&self) -> Status;
    fn reload(&self) -> ReloadReply;
    /// The pending reviews, when the daemon holds any.
    fn reviews(&self) -> Option<&crate::review::Reviews> {
        None
    }
    /// The live sessions.
    fn sessions(&self) -> Option<&crate::session::Sessions> {
        None
    }
    /// Register an `enforcer exec` run; refused when the policy keeps its profile from the person. `exec`: a pidfd of
    /// the registering process, when the kernel gave one (`SO_PEERPIDFD`).
    fn register(
        &self,
        reg: crate::session::Registration,
        exec: Option<std::os::fd::OwnedFd>,
    ) -> Result<crate::session::SessionInfo, String> {
        let _ = (reg, exec);
        Err("this daemon keeps no sessions".into())
    }
    /// The agent process `pid` is, when it runs in a cgroup the capture enforces; `None` for any other process.
    /// Blocking (reads `/proc/<pid>/cgroup` and the tag map). `Err` when that cannot be told: the peer is refused.
    fn enforced(&self, pid: i32) -> Result<Option<crate::model::Agent>, String> {
        let _ = pid;
        Ok(None)
    }
    /// Record that `agent`'s control request was refused; `request` is its type ([`Request::name`]), `None` when
    /// it sent no request that parsed.
    fn refused_agent(
        &self,
        agent: crate::model::Agent,
        request: Option<&'static str>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let _ = (agent, request);
        Box::pin(std::future::ready(()))
    }
}

/// How often an agent's refused control requests are recorded: at most one record per agent (its cgroup) a
/// second, each with the count of refusals it stands for, so that an agent looping on the socket cannot flood the
/// audit trail. The refusals after a record within its second are counted into one record written when the second
/// ends (the caller schedules it: [`Bound::Later`]), so the counts add up to every refusal.
#[derive(Debug, Default)]
pub struct RecordBound {
    windows: std::sync::Mutex<std::collections::HashMap<String, Window>>,
}

#[derive(Debug)]
struct Window {
    start: std::time::Instant,
    unrecorded: u64,
    flush_due: bool,
}

/// What to do with one refusal.
#[derive(Debug, PartialEq, Eq)]
pub enum Bound {
    /// Record now, with this count.
    Record(u64),
    /// Counted for later; `Some(after)`: call [`RecordBound::flush`] after this long (once per second and agent).
    Later(Option<Duration>),
}

/// The window of [`RecordBound`].
const RECORD_WINDOW: Duration = Duration::from_secs(1);
/// Agents whose windows are kept before ended ones are dropped.
const BOUND_KEPT: usize = 4096;

impl RecordBound {
    /// Note one refusal of agent `key` at `now`.
    pub fn note(&self, key: &str, now: std::time::Instant) -> Bound {
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if windows.len() >= BOUND_KEPT {
            windows.retain(|_, w| w.flush_due || now.duration_since(w.start) < RECORD_WINDOW);
        }
        let fresh = Window {
            start: now,
            unrecorded: 0,
            flush_due: false,
        };
        match windows.get_mut(key) {
            Some(w) if now.duration_since(w.start) < RECORD_WINDOW => {
                w.unrecorded += 1;
                if w.flush_due {
                    return Bound::Later(None);
                }
                w.flush_due = true;
                Bound::Later(Some(RECORD_WINDOW - now.duration_since(w.start)))
            }
            Some(w) => {
                let count = 1 + std::mem::replace(w, fresh).unrecorded;
                Bound::Record(count)
            }
            None => {
                windows.insert(key.to_string(), fresh);
                Bound::Record(1)
            }
        }
    }

    /// The refusals of `key` counted since its last record, to record now (its window starts again at `now`).
    pub fn flush(&self, key: &str, now: std::time::Instant) -> u64 {
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        windows.get_mut(key).map_or(0, |w| {
            let count = std::mem::take(&mut w.unrecorded);
            w.start = now;
            w.flush_due = false;
            count
        })
    }
}

/// What is known of a peer before its requests are read.
#[derive(Debug)]
enum Screen {
    /// Root or the control group, in no enforced cgroup.
    Person,
    /// Neither root nor in the control group.
    Denied,
    /// A process in an enforced cgroup.
    Agent(crate::model::Agent),
    /// Whether it is an agent could not be told.
    Unknown(String),
    /// The process that connected has exited: what was read of it may be another's.
    Gone,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control.group {0:?}: no such group")]
    NoSuchGroup(String),
    #[error("control socket {}: the daemon is not running (no socket; is `enforcer run` running with this configuration?)", .0.display())]
    NotRunning(PathBuf),
    #[error("control socket {}: {message}", path.display())]
    Protocol { path: PathBuf, message: String },
    #[error("control socket {}: the daemon did not answer within {} s", .0.display(), IO_TIMEOUT.as_secs())]
    NoAnswer(PathBuf),
    #[error("the daemon refused the request: {0}")]
    Refused(String),
}

/// Who may use the socket besides root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub gid: Option<u32>,
}

impl Access {
    /// Resolve `control.group` (a group name or a numeric gid).
    pub fn from_group(group: Option<&str>) -> Result<Access, ControlError> {
        let Some(group) = group else {
            return Ok(Access { gid: None });
        };
        if let Ok(gid) = group.parse::<u32>() {
            return Ok(Access { gid: Some(gid) });
        }
        group_gid(group)
            .map(|gid| Access { gid: Some(gid) })
            .ok_or_else(|| ControlError::NoSuchGroup(group.to_string()))
    }

    /// Whether a peer with these credentials may talk to the daemon.
    fn allows(&self, uid: u32, gid: u32, pid: Option<i32>) -> bool {
        if uid == 0 {
            return true;
        }
        let Some(allowed) = self.gid else {
            return false;
        };
        gid == allowed || pid.is_some_and(|pid| supplementary_groups(pid).contains(&allowed))
    }
}

/// Bind the socket (replacing a stale one), mode 0660, group `access.gid`.
pub fn bind(path: &Path, access: Access) -> Result<UnixListener, ControlError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
    if let Some(gid) = access.gid {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(err)?;
    }
    Ok(listener)
}

/// Serve requests until `shutdown` fires, then remove the socket.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    access: Access,
    handler: Arc<dyn Handler>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Beyond the bound the connection is closed unanswered: a peer looping on connect (an agent, refused
        // anyway) must not take the descriptors the proxy needs.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!("control socket: {MAX_CLIENTS} clients served already; closed");
            continue;
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_client(stream, access, handler).await {
                tracing::debug!(error = %e, "control client");
            }
            drop(slot);
        });
    }
    let _ = std::fs::remove_file(&path);
}

/// Who the peer is: its credentials, then whether its process runs in an enforced cgroup, then whether that
/// process (held by `pidfd`) is still alive, so that what was read under its pid was its own.
async fn screen(
    peer: Peer,
    pidfd: Option<Arc<std::os::fd::OwnedFd>>,
    access: Access,
    handler: Arc<dyn Handler>,
) -> Screen {
    let read = tokio::task::spawn_blocking(move || {
        let allowed = access.allows(peer.uid, peer.gid, peer.pid);
        let enforced = match peer.pid {
            Some(pid) => handler.enforced(pid),
            None => Err("the peer's process is unknown".to_string()),
        };
        (
            allowed,
            enforced,
            pidfd.is_none_or(|fd| !crate::pidfd::exited(&fd)),
        )
    })
    .await;
    match read {
        Err(_) => Screen::Unknown("the peer could not be identified".into()),
        Ok((_, _, false)) => Screen::Gone,
        Ok((_, Ok(Some(agent)), true)) => Screen::Agent(agent),
        Ok((_, Err(e), true)) => Screen::Unknown(e),
        Ok((false, Ok(None), true)) => Screen::Denied,
        Ok((true, Ok(None), true)) => Screen::Person,
    }
}

async fn serve_client(
    stream: UnixStream,
    access: Access,
    handler: Arc<dyn Handler>,
) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    let pidfd = peer_pidfd(&stream).map(Arc::new);
    let peer = Peer {
        uid: cred.uid(),
        gid: cred.gid(),
        pid: cred.pid(),
    };
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64 + 1);
    let mut line = Vec::new();
    match screen(peer, pidfd.clone(), access, handler.clone()).await {
        Screen::Person => {}
        Screen::Gone => return Ok(()),
        Screen::Denied => {
            tracing::warn!(
                uid = cred.uid(),
                pid = cred.pid(),
                "control socket: peer is neither root nor in control.group; refused"
            );
            let resp =
                Response::error("permission denied: root or the configured control.group only");
            return send(&mut write, &resp).await;
        }
        Screen::Unknown(e) => {
            tracing::warn!(uid = cred.uid(), pid = cred.pid(), error = %e,
                "control socket: cannot tell whether the peer is an agent; refused");
            let resp = Response::error(format!(
                "permission denied: cannot tell whether this process is an agent the enforcer confines ({e})"
            ));
            return send(&mut write, &resp).await;
        }
        Screen::Agent(agent) => {
            // Its first request, for the record of what it tried (none when it sends nothing in time).
            let request =
                match tokio::time::timeout(AGENT_READ, reader.read_until(b'\n', &mut line)).await {
                    Ok(Ok(n)) if n > 0 && line.len() <= MAX_REQUEST => {
                        serde_json::from_slice::<Request>(&line)
                            .ok()
                            .map(|r| r.name())
                    }
                    _ => None,
                };
            // Logged with its record (at most once a second per agent), not per connection.
            tracing::debug!(uid = cred.uid(), pid = cred.pid(), cgroup = ?agent.cgroup, profile = ?agent.profile,
                request, "control socket: peer runs in an enforced cgroup; refused");
            let resp = Response::error(format!(
                "permission denied: this process runs in a cgroup the enforcer confines ({}, profile {}); \
                 the control socket does not answer agents",
                agent.cgroup.as_deref().unwrap_or("?"),
                agent.profile.as_deref().unwrap_or("?"),
            ));
            handler.refused_agent(agent, request).await;
            return send(&mut write, &resp).await;
        }
    }
    loop {
        line.clear();
        reader.set_limit(MAX_REQUEST as u64 + 1);
        let n = match tokio::time::timeout(IO_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
            Ok(n) => n?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_REQUEST {
            let resp = Response::error(format!("request longer than {MAX_REQUEST} bytes"));
            return send(&mut write, &resp).await;
        }
        let resp = match serde_json::from_slice::<Request>(&line) {
            Err(e) => Response::error(e.to_string()),
            Ok(request) => {
                let (handler, pidfd) = (handler.clone(), pidfd.clone());
                // Status walks the cgroup tree and reload compiles a file: both block.
                let answered =
                    tokio::task::spawn_blocking(move || answer(&*handler, &request, peer, pidfd));
                match answered.await {
                    Ok(resp) => resp,
                    Err(_) => Response::error("the request failed inside the daemon"),
                }
            }
        };
        send(&mut write, &resp).await?;
    }
}

/// `pidfd`: the peer's process (`SO_PEERPIDFD`), for a registration.
fn answer(
    handler: &dyn Handler,
    request: &Request,
    peer: Peer,
    pidfd: Option<Arc<std::os::fd::OwnedFd>>,
) -> Response {
    let no_reviews = || Response::error("this daemon holds no reviews");
    let no_sessions = || Response::error("this daemon keeps no sessions");
    match request {
        Request::Status => Response::ok(handler.status()),
        Request::Reload => Response::ok(handler.reload()),
        Request::ReviewList => handler
            .reviews()
            .map_or_else(no_reviews, |r| Response::ok(r.list())),
        Request::ReviewShow { id } => match handler.reviews().map(|r| r.get(*id)) {
            None => no_reviews(),
            Some(None) => Response::error(crate::review::ReviewError::NotPending(*id).to_string()),
            Some(Some(p)) => Response::ok(p),
        },
        Request::ReviewAnswer {
            id,
            approve,
            reason,
        } => {
            let Some(reviews) = handler.reviews() else {
                return no_reviews();
            };
            let by = crate::model::Approver::Cli {
                uid: peer.uid,
                name: crate::capture::user_name(peer.uid),
            };
            match reviews.answer(*id, *approve, by.clone(), reason.clone()) {
                Ok(_) => Response::ok(ReviewReply {
                    id: *id,
                    result: if *approve {
                        crate::model::ReviewResult::Approved
                    } else {
                        crate::model::ReviewResult::Denied
                    },
                    by,
                }),
                Err(e) => Response::error(e.to_string()),
            }
        }
        Request::SessionList => handler
            .sessions()
            .map_or_else(no_sessions, |s| Response::ok(s.list())),
        Request::SessionShow { id } => match handler.sessions().map(|s| s.show(id)) {
            None => no_sessions(),
            Some(None) => Response::error(format!("no live session {id:?}")),
            Some(Some(s)) => Response::ok(s),
        },
        Request::SessionStart(reg) if peer.uid == 0 => {
            let exec = pidfd.and_then(|fd| fd.try_clone().ok());
            match handler.register(reg.clone(), exec) {
                Ok(info) => Response::ok(info),
                Err(e) => Response::error(e),
            }
        }
        Request::SessionStart(_) => {
            Response::error("permission denied: only root registers sessions")
        }
    }
}

async fn send(write: &mut tokio::net::unix::OwnedWriteHalf, resp: &Response) -> io::Result<()> {
    let mut line = serde_json::to_vec(resp).map_err(io::Error::other)?;
    line.push(b'\n');
    tokio::time::timeout(IO_TIMEOUT, write.write_all(&line))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// Send one request to the daemon listening at `path` and return its result (blocking; for the CLI).
pub fn request(path: &Path, request: &Request) -> Result<serde_json::Value, ControlError> {
    use std::io::{BufRead, Write};
    let io_err = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ControlError::NotRunning(path.to_path_buf()))
        }
        Err(e) => return Err(io_err(e)),
    };
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(io_err)?;
    let mut line = serde_json::to_vec(request).map_err(|e| ControlError::Protocol {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    line.push(b'\n');
    stream.write_all(&line).map_err(io_err)?;
    let mut answer = String::new();
    io::BufReader::new(&stream)
        .read_line(&mut answer)
        .map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                ControlError::NoAnswer(path.to_path_buf())
            }
            _ => io_err(e),
        })?;
    let resp: Response = serde_json::from_str(&answer).map_err(|e| ControlError::Protocol {
        path: path.to_path_buf(),
        message: format!("unreadable answer: {e}"),
    })?;
    match (resp.ok, resp.result, resp.error) {
        (true, Some(result), _) => Ok(result),
        (_, _, error) => Err(ControlError::Refused(
            error.unwrap_or_else(|| "no reason given".into()),
        )),
    }
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Daemon configuration file (YAML), as given to `enforcer run` (it names the state directory).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the status as one JSON object (the control socket's `result`) instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `enforcer status`: ask the daemon and print its answer. Exit 0 when it is healthy, 1 when it is not, 2 when it
/// cannot be reached.
pub fn status_command(args: StatusArgs) -> anyhow::Result<std::process::ExitCode> {
    let config = crate::config::Config::load_or_default(args.config.as_deref())?;
    let answer = request(&socket_path(&config.state_dir), &Request::Status)?;
    let status: Status = serde_json::from_value(answer.clone())
        .map_err(|e| anyhow::anyhow!("unreadable status from the daemon: {e}"))?;
    if args.json {
        println!("{answer}");
    } else {
        print!("{}", status.render());
    }
    Ok(if status.daemon.healthy {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

/// The gid of group `name` (getgrnam_r(3), so NSS sources count too).
fn group_gid(name: &str) -> Option<u32> {
    let c_name = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: all pointers point at memory we own for the call's duration; getgrnam_r writes only into them.
    unsafe {
        let mut grp: libc::group = std::mem::zeroed();
        let mut out: *mut libc::group = std::ptr::null_mut();
        let rc = libc::getgrnam_r(
            c_name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut out,
        );
        (rc == 0 && !out.is_null()).then_some(grp.gr_gid)
    }
}

/// A pidfd for the process that connected (`SO_PEERPIDFD`, socket(7), Linux 6.5); `None` where the kernel has no
/// such option.
fn peer_pidfd(stream: &UnixStream) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into the c_int we own; on success `fd` is a new descriptor
    // nothing else owns, so the OwnedFd takes it.
    unsafe {
        let rc = libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        );
        (rc == 0 && fd >= 0).then(|| std::os::fd::OwnedFd::from_raw_fd(fd))
    }
}

/// The supplementary groups of process `pid` (`Groups:` in /proc/PID/status, proc(5)).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("Groups:")).map(|g| {
                g.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed;

    impl Handler for Fixed {
        fn status(&self) -> Status {
            Status::example()
        }
        fn reload(&self) -> ReloadReply {
            ReloadReply {
                result: crate::metrics::ReloadResult::Unchanged,
                policy_hash: "ab".into(),
                previous_hash: "ab".into(),
                error: None,
            }
        }
    }

    #[test]
    fn requests_are_tagged_objects() {
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"request":"status"}"#
        );
        let err = serde_json::from_str::<Request>(r#"{"request":"frobnicate"}"#).unwrap_err();
        assert!(
            err.to_string().contains("unknown variant `frobnicate`"),
            "{err}"
        );
    }

    /// The socket served in a fresh directory (kept alive by the returned guard) for root peers, with `handler`.
    fn serving(
        handler: Arc<dyn Handler>,
    ) -> (
        tempfile::TempDir,
        PathBuf,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let access = Access { gid: None };
        let listener = bind(&path, access).unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            path.clone(),
            access,
            handler,
            shutdown.clone(),
        ));
        (dir, path, shutdown, task)
    }

    #[test]
    fn root_and_the_configured_group_only() {
        let none = Access { gid: None };
        assert!(none.allows(0, 0, None));
        assert!(!none.allows(1000, 1000, None));
        let group = Access { gid: Some(4242) };
        assert!(group.allows(1000, 4242, None));
        assert!(!group.allows(1000, 1000, None));
        assert_eq!(Access::from_group(Some("root")).unwrap().gid, Some(0));
        assert_eq!(Access::from_group(Some("77")).unwrap().gid, Some(77));
        assert!(matches!(
            Access::from_group(Some("no-such-group-here")),
            Err(ControlError::NoSuchGroup(_))
        ));
    }

    #[test]
    fn agents_refusals_are_recorded_once_a_second_and_add_up() {
        let bound = RecordBound::default();
        let t0 = std::time::Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(bound.note("/a", t0), Bound::Record(1));
        assert_eq!(
            bound.note("/a", ms(100)),
            Bound::Later(Some(Duration::from_millis(900)))
        );
        assert_eq!(bound.note("/a", ms(200)), Bound::Later(None));
        // Another agent has a window of its own.
        assert_eq!(bound.note("/b", ms(300)), Bound::Record(1));
        // The second ends: the two counted are recorded as one.
        assert_eq!(bound.flush("/a", ms(1000)), 2);
        assert_eq!(
            bound.note("/a", ms(1500)),
            Bound::Later(Some(Duration::from_millis(500)))
        );
        assert_eq!(bound.flush("/a", ms(2000)), 1);
        // A refusal after a quiet second is recorded at once; nothing is left to flush.
        assert_eq!(bound.note("/a", ms(3100)), Bound::Record(1));
        assert_eq!(bound.flush("/a", ms(3200)), 0);
    }

    /// A peer the handler says is an agent gets one error line naming its cgroup and profile, whatever it asked,
    /// and its refusal is handed to the handler once with the request's type; the review it asked to approve is not
    /// touched.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn agents_are_refused_and_their_refusal_recorded() {
        struct Agents(std::sync::Mutex<Vec<(Option<String>, Option<&'static str>)>>);
        impl Handler for Agents {
            fn status(&self) -> Status {
                Status::example()
            }
            fn reload(&self) -> ReloadReply {
                panic!("an agent's reload reached the handler")
            }
            fn enforced(&self, pid: i32) -> Result<Option<crate::model::Agent>, String> {
                assert_eq!(pid, std::process::id() as i32);
                Ok(Some(crate::model::Agent {
                    profile: Some("coder".into()),
                    cgroup: Some("/enforcer/coder/exec-7".into()),
                    pid: Some(pid as u32),
                    ..crate::model::Agent::default()
                }))
            }
            fn refused_agent(
                &self,
                agent: crate::model::Agent,
                request: Option<&'static str>,
            ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
                self.0.lock().unwrap().push((agent.cgroup, request));
                Box::pin(std::future::ready(()))
            }
        }
        let handler = Arc::new(Agents(std::sync::Mutex::new(Vec::new())));
        let (_dir, path, shutdown, task) = serving(handler.clone());
        let p = path.clone();
        let (approve, reload) = tokio::task::spawn_blocking(move || {
            let approve = Request::ReviewAnswer {
                id: 12,
                approve: true,
                reason: None,
            };
            (request(&p, &approve), request(&p, &Request::Reload))
        })
        .await
        .unwrap();
        for answer in [approve, reload] {
            match answer {
                Err(ControlError::Refused(e)) => assert_eq!(
                    e,
                    "permission denied: this process runs in a cgroup the enforcer confines \
                     (/enforcer/coder/exec-7, profile coder); the control socket does not answer agents"
                ),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            *handler.0.lock().unwrap(),
            [
                (Some("/enforcer/coder/exec-7".into()), Some("review_answer")),
                (Some("/enforcer/coder/exec-7".into()), Some("reload")),
            ]
        );
        shutdown.cancel();
        task.await.unwrap();
    }

    #[test]
    fn a_live_peer_is_alive_and_an_ended_one_is_not() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let a = UnixStream::from_std(a).unwrap();
        let fd = peer_pidfd(&a).expect("SO_PEERPIDFD on this kernel");
        assert!(!crate::pidfd::exited(&fd), "this very process");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let child_fd = crate::pidfd::open(child.id() as libc::pid_t).unwrap();
        child.wait().unwrap();
        assert!(crate::pidfd::exited(&child_fd), "a reaped child");
    }

    /// Connections beyond `MAX_CLIENTS` are closed unanswered while the others are served; once one ends, a new
    /// one is served again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_beyond_the_bound_are_closed() {
        let (_dir, path, shutdown, task) = serving(Arc::new(Fixed));
        let p = path.clone();
        let (over, again) = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            // Idle clients that hold their connections (each waits for a request line).
            let held: Vec<_> = (0..MAX_CLIENTS)
                .map(|_| std::os::unix::net::UnixStream::connect(&p).unwrap())
                .collect();
            std::thread::sleep(Duration::from_millis(300));
            let mut over = std::os::unix::net::UnixStream::connect(&p).unwrap();
            over.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 64];
            let over = over.read(&mut buf).map(|n| n == 0).unwrap_or(false);
            drop(held);
            std::thread::sleep(Duration::from_millis(300));
            let mut again = std::os::unix::net::UnixStream::connect(&p).unwrap();
            again.write_all(b"{\"request\":\"status\"}\n").unwrap();
            let mut answer = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(again), &mut answer).unwrap();
            (over, answer)
        })
        .await
        .unwrap();
        assert!(over, "the connection over the bound was closed unanswered");
        assert!(again.contains("\"ok\":true"), "{again}");
        shutdown.cancel();
        task.await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn status_reload_and_errors_over_the_socket() {
        let (_dir, path, shutdown, task) = serving(Arc::new(Fixed));
        let p = path.clone();
        let (status, reload, bad, long) = tokio::task::spawn_blocking(move || {
            let status = request(&p, &Request::Status).unwrap();
            let reload = request(&p, &Request::Reload).unwrap();
            // Raw lines: an unknown type, then an over-long line.
            use std::io::{BufRead, Write};
            let mut s = std::os::unix::net::UnixStream::connect(&p).unwrap();
            s.write_all(b"{\"request\":\"frobnicate\"}\n").unwrap();
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            let mut bad = String::new();
            r.read_line(&mut bad).unwrap();
            let _ = s.write_all(&vec![b'x'; MAX_REQUEST + 10]);
            let mut long = String::new();
            r.read_line(&mut long).unwrap();
            (status, reload, bad, long)
        })
        .await
        .unwrap();
        assert_eq!(status["daemon"]["pid"], 1);
        assert_eq!(reload["result"], "unchanged");
        assert!(
            bad.contains("\"ok\":false") && bad.contains("frobnicate"),
            "{bad}"
        );
        assert!(long.contains("longer than"), "{long}");
        let mode = std::fs::metadata(&path).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o660
        );
        shutdown.cancel();
        task.await.unwrap();
        assert!(!path.exists());
        assert!(matches!(
            request(&path, &Request::Status),
            Err(ControlError::NotRunning(_))
        ));
    }
}
