//! The tokio shell: accept connections on a unix socket and drive one
//! [`ServerConnection`] per connection against the exports' backends.
//!
//! Each connection is one task. Requests run on the blocking pool (the
//! backends do pread/pwrite/fdatasync) with up to [`MAX_IN_FLIGHT`] at once
//! per connection; replies go out in completion order, which NBD allows
//! (cookies match them up). Several connections may use the same export at
//! once (multi-conn): the backends are `Sync` and FLUSH covers them all.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn, Instrument};

use crate::export::{execute, Backend};
use crate::proto::{ExportInfo, ProtoError, Reply, Request, ServerConnection, ServerEvent};

/// Requests of one connection running at once. QEMU keeps up to 16 in
/// flight per connection; more only adds memory (up to 32 MiB each).
pub const MAX_IN_FLIGHT: usize = 16;
/// Concurrent connections per server: a few per guest disk is normal; the
/// cap stops a runaway client from exhausting fds and memory.
pub const MAX_CONNECTIONS: usize = 256;
/// Bytes read from the socket at once; the core parses them all before the
/// next read, so this also bounds how far a client can pipeline ahead.
pub const READ_BUF_LEN: usize = 256 * 1024;
/// Longest back-off after a failed `accept` (fd exhaustion and the like).
pub const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Errors of the server shell.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The unix socket could not be bound.
    #[error("bind NBD socket {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// Socket I/O failed.
    #[error("NBD connection I/O")]
    Io(#[source] io::Error),
    /// The client broke the protocol.
    #[error("NBD protocol violation")]
    Proto(#[source] ProtoError),
    /// A request task panicked or was cancelled.
    #[error("NBD request task failed")]
    Task(#[source] tokio::task::JoinError),
    /// No exports were given.
    #[error("no exports to serve")]
    NoExports,
}

/// One export: a name and the backend behind it.
#[derive(Clone)]
pub struct ServedExport {
    /// Name clients ask for (`""` selects the first export).
    pub name: String,
    /// The data.
    pub backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for ServedExport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedExport")
            .field("name", &self.name)
            .field("size", &self.backend.size())
            .finish()
    }
}

impl ServedExport {
    /// An export named `name` backed by `backend`.
    pub fn new(name: impl Into<String>, backend: Arc<dyn Backend>) -> Self {
        Self {
            name: name.into(),
            backend,
        }
    }
}

/// Bind `path` (replacing a stale socket file) and serve `exports` until the
/// task is dropped.
pub async fn serve_unix(
    path: impl AsRef<Path>,
    exports: Vec<ServedExport>,
) -> Result<(), ServerError> {
    let listener = bind_unix(path)?;
    serve_listener(listener, exports, std::future::pending()).await
}

/// Bind a unix socket at `path`, removing a stale socket file first.
pub fn bind_unix(path: impl AsRef<Path>) -> Result<UnixListener, ServerError> {
    let path = path.as_ref();
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            // A previous agent's socket: nobody can be listening on it once
            // we hold the name again.
            let _ = std::fs::remove_file(path);
        }
    }
    UnixListener::bind(path).map_err(|source| ServerError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

/// Serve `exports` on `listener` until `shutdown` completes; then stop
/// accepting and wait for open connections to finish.
pub async fn serve_listener(
    listener: UnixListener,
    exports: Vec<ServedExport>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    if exports.is_empty() {
        return Err(ServerError::NoExports);
    }
    let exports: Arc<[ServedExport]> = exports.into();
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    let next_id = AtomicU64::new(1);
    let mut backoff = Duration::from_millis(10);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                // The semaphore is never closed.
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok((s, _)) => {
                    backoff = Duration::from_millis(10);
                    s
                }
                Err(e) => {
                    error!(cause = %e, "failed to accept NBD connection");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    continue;
                }
            },
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let exports = exports.clone();
        let span = tracing::info_span!("nbd_conn", conn = id);
        conns.spawn(
            async move {
                debug!("NBD client connected");
                match serve_connection(stream, exports).await {
                    Ok(()) => debug!("NBD client disconnected"),
                    Err(e) => warn!(cause = %error_chain(&e), "NBD connection closed on error"),
                }
                drop(permit);
            }
            .instrument(span),
        );
        // Reap finished connections so the set does not grow forever.
        while conns.try_join_next().is_some() {}
    }
    info!(
        open = conns.len(),
        "NBD server stopping; waiting for connections"
    );
    while conns.join_next().await.is_some() {}
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Drive one connection to completion over any byte stream.
pub async fn serve_connection<S>(stream: S, exports: Arc<[ServedExport]>) -> Result<(), ServerError>
where
    S: AsyncRead + AsyncWrite + Send,
{
    let infos: Vec<ExportInfo> = exports
        .iter()
        .map(|e| e.backend.export_info(&e.name))
        .collect();
    let mut conn = ServerConnection::new(infos);
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut buf = vec![0u8; READ_BUF_LEN];
    let mut backend: Option<Arc<dyn Backend>> = None;
    let mut pending: VecDeque<Request> = VecDeque::new();
    let mut inflight: JoinSet<(Request, Reply)> = JoinSet::new();
    let mut reading = true;
    let mut failure: Option<ServerError> = None;
    loop {
        while let Some(ev) = conn.poll_event() {
            match ev {
                ServerEvent::Negotiated(n) => {
                    backend = exports.get(n.export).map(|e| e.backend.clone());
                }
                ServerEvent::Request(r) => pending.push_back(r),
                ServerEvent::Disconnect => reading = false,
            }
        }
        while inflight.len() < MAX_IN_FLIGHT {
            let Some(req) = pending.pop_front() else {
                break;
            };
            // Invariant: requests only come after Negotiated, which set it.
            let Some(b) = backend.clone() else { break };
            inflight.spawn_blocking(move || {
                let reply = execute(&*b, &req.command);
                (req, reply)
            });
        }
        while let Some(bytes) = conn.poll_transmit() {
            wr.write_all(&bytes).await.map_err(ServerError::Io)?;
        }
        if !reading && inflight.is_empty() && pending.is_empty() {
            break;
        }
        let can_read = reading && pending.is_empty() && inflight.len() < MAX_IN_FLIGHT;
        tokio::select! {
            r = rd.read(&mut buf), if can_read => {
                let n = r.map_err(ServerError::Io)?;
                if n == 0 {
                    if conn.buffered_input() > 0 {
                        debug!(bytes = conn.buffered_input(), "client closed mid-message");
                    }
                    reading = false;
                    continue;
                }
                if let Err(e) = conn.handle_input(&buf[..n]) {
                    reading = false;
                    pending.clear();
                    failure = Some(ServerError::Proto(e));
                }
            }
            Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                let (req, reply) = done.map_err(ServerError::Task)?;
                conn.handle_reply(&req, reply);
            }
        }
    }
    wr.flush().await.map_err(ServerError::Io)?;
    let _ = wr.shutdown().await;
    failure.map_or(Ok(()), Err)
}
