//! Tokio QMP client: a thin shell around [`QmpConnection`].
//!
//! One driver task owns the unix socket and the codec. [`QmpClient`] handles
//! are cheap clones that send requests to the driver over a channel; replies
//! are matched to callers by command id, so many tasks can issue commands
//! concurrently over one QMP connection. Events fan out on a
//! `tokio::sync::broadcast` channel.
//!
//! ```text
//!  QmpClient ──mpsc──▶ driver task ──socket──▶ QEMU
//!  (oneshot) ◀─────── pending[id]  ◀─────────
//!  broadcast::Receiver<QmpEvent> ◀── events
//! ```
//!
//! When the socket closes or the codec fails, the driver fails every
//! pending call with [`QmpError::Disconnected`], drops its request channel
//! (so later calls fail the same way) and resolves [`QmpClient::closed`].

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{debug, trace, warn};

use crate::codec::{CodecError, ErrorReply, Greeting, QmpConnection, QmpEvent, QmpOutput};
use crate::commands::{QmpCapabilities, QmpCommand};

/// Capacity of the event broadcast channel. A receiver that falls further
/// behind gets `RecvError::Lagged`; QEMU emits few events (a migration emits
/// about ten), so 1024 only overflows if a receiver is never polled.
pub const EVENT_CHANNEL_CAPACITY: usize = 1024;

/// How long [`QmpClient::connect`] waits for the greeting and the
/// `qmp_capabilities` reply. QEMU sends the greeting as soon as the socket is
/// accepted, so this only fires on a wedged or foreign peer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Socket read chunk size.
const READ_CHUNK: usize = 64 * 1024;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// QEMU answered the command with an error.
    #[error("QMP command {command} failed: {reply}")]
    Command {
        /// Command name.
        command: String,
        /// QEMU's error object.
        reply: ErrorReply,
    },
    /// The connection is gone (QEMU exited, socket closed, or protocol error).
    #[error("QMP connection closed")]
    Disconnected,
    /// Connecting to the QMP socket failed.
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer did not complete the greeting / capabilities handshake.
    #[error("QMP handshake failed: {0}")]
    Handshake(String),
    /// The peer violated the protocol.
    #[error("QMP protocol error")]
    Codec(#[from] CodecError),
    /// Arguments could not be encoded.
    #[error("cannot encode arguments of {command}")]
    Encode {
        /// Command name.
        command: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// The reply did not have the expected shape.
    #[error("cannot decode reply of {command}")]
    Decode {
        /// Command name.
        command: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
    /// [`QmpClient::execute_timeout`] gave up waiting.
    #[error("QMP command {command} timed out after {after:?}")]
    Timeout {
        /// Command name.
        command: String,
        /// The timeout.
        after: Duration,
    },
}

impl QmpError {
    /// Whether this is [`QmpError::Disconnected`].
    pub fn is_disconnected(&self) -> bool {
        matches!(self, QmpError::Disconnected)
    }
}

type Reply = Result<Value, ErrorReply>;

struct Request {
    name: String,
    args: Value,
    reply: oneshot::Sender<Reply>,
}

struct Shared {
    tx: mpsc::UnboundedSender<Request>,
    closed: watch::Receiver<bool>,
    greeting: Greeting,
    /// Kept so later users can subscribe to events (see [`QmpClient::subscribe`]).
    events: broadcast::Sender<QmpEvent>,
}

/// Handle to a QMP connection. Cloning is cheap; all clones share one socket.
#[derive(Clone)]
pub struct QmpClient {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("closed", &*self.shared.closed.borrow())
            .finish()
    }
}

impl QmpClient {
    /// Connect to a QMP unix socket, wait for the greeting and leave
    /// capability negotiation mode. The returned receiver sees every event
    /// from the start of the session.
    pub async fn connect(
        path: &Path,
    ) -> Result<(QmpClient, broadcast::Receiver<QmpEvent>), QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.display().to_string(),
                source,
            })?;
        Self::from_stream(stream).await
    }

    /// Like [`connect`](Self::connect) over an already connected stream.
    pub async fn from_stream(
        stream: UnixStream,
    ) -> Result<(QmpClient, broadcast::Receiver<QmpEvent>), QmpError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        let (closed_tx, closed_rx) = watch::channel(false);
        let (greet_tx, greet_rx) = oneshot::channel();
        let driver = Driver {
            conn: QmpConnection::new(),
            rx,
            events: events_tx.clone(),
            pending: HashMap::new(),
            greet: Some(greet_tx),
        };
        tokio::spawn(async move {
            driver.run(stream).await;
            let _ = closed_tx.send(true);
        });
        let greeting = match tokio::time::timeout(HANDSHAKE_TIMEOUT, greet_rx).await {
            Ok(Ok(g)) => g,
            Ok(Err(_)) => {
                return Err(QmpError::Handshake(
                    "connection closed before greeting".into(),
                ))
            }
            Err(_) => return Err(QmpError::Handshake("no greeting".into())),
        };
        let client = QmpClient {
            shared: Arc::new(Shared {
                tx,
                closed: closed_rx,
                greeting,
                events: events_tx,
            }),
        };
        match client
            .execute_timeout(QmpCapabilities::NAME, Value::Null, HANDSHAKE_TIMEOUT)
            .await
        {
            Ok(_) => {}
            Err(e) => return Err(QmpError::Handshake(format!("qmp_capabilities: {e}"))),
        }
        debug!(version = ?client.shared.greeting.version.qemu, "qmp connected");
        Ok((client, events_rx))
    }

    /// A new receiver of the events that arrive from now on (the one
    /// [`connect`](Self::connect) returned sees them from the start).
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.shared.events.subscribe()
    }

    /// The greeting QEMU sent.
    pub fn greeting(&self) -> &Greeting {
        &self.shared.greeting
    }

    /// Run a command with raw JSON arguments (`Value::Null` for none).
    pub async fn execute(&self, name: &str, args: Value) -> Result<Value, QmpError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.shared
            .tx
            .send(Request {
                name: name.to_owned(),
                args,
                reply: reply_tx,
            })
            .map_err(|_| QmpError::Disconnected)?;
        match reply_rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(reply)) => Err(QmpError::Command {
                command: name.to_owned(),
                reply,
            }),
            // The driver dropped the sender: connection gone.
            Err(_) => Err(QmpError::Disconnected),
        }
    }

    /// [`execute`](Self::execute) with a deadline. On timeout the command may
    /// still run in QEMU; its late reply is discarded.
    pub async fn execute_timeout(
        &self,
        name: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        tokio::time::timeout(timeout, self.execute(name, args))
            .await
            .unwrap_or_else(|_| {
                Err(QmpError::Timeout {
                    command: name.to_owned(),
                    after: timeout,
                })
            })
    }

    /// Run a typed command.
    pub async fn execute_typed<C: QmpCommand>(&self, cmd: &C) -> Result<C::Output, QmpError> {
        let args = serde_json::to_value(cmd).map_err(|source| QmpError::Encode {
            command: C::NAME.to_owned(),
            source,
        })?;
        let v = self.execute(C::NAME, args).await?;
        serde_json::from_value(v).map_err(|source| QmpError::Decode {
            command: C::NAME.to_owned(),
            source,
        })
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        *self.shared.closed.borrow()
    }

    /// Resolves once the connection has closed (immediately if it already has).
    pub async fn closed(&self) {
        let mut rx = self.shared.closed.clone();
        // An error means the driver's watch sender is gone, which also means closed.
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// Owns the socket and the codec; lives in its own task.
struct Driver {
    conn: QmpConnection,
    rx: mpsc::UnboundedReceiver<Request>,
    events: broadcast::Sender<QmpEvent>,
    pending: HashMap<u64, (String, oneshot::Sender<Reply>)>,
    greet: Option<oneshot::Sender<Greeting>>,
}

impl Driver {
    async fn run(mut self, mut stream: UnixStream) {
        let mut rbuf = vec![0u8; READ_CHUNK];
        let mut wbuf: Option<Bytes> = None;
        let mut accepting = true;
        let (mut rd, mut wr) = stream.split();
        loop {
            if wbuf.is_none() {
                wbuf = self.conn.poll_transmit();
            }
            tokio::select! {
                req = self.rx.recv(), if accepting => match req {
                    Some(req) => {
                        let args = (!req.args.is_null()).then_some(&req.args);
                        let id = self.conn.send_command(&req.name, args);
                        trace!(id, command = %req.name, "qmp send");
                        self.pending.insert(id, (req.name, req.reply));
                    }
                    // Every client handle is gone; keep reading so events and
                    // late replies drain until QEMU closes, but stop polling rx.
                    None => accepting = false,
                },
                n = rd.read(&mut rbuf) => match n {
                    Ok(0) => { debug!("qmp socket closed by peer"); break; }
                    Ok(n) => {
                        let res = self.conn.handle_input(&rbuf[..n]);
                        self.dispatch();
                        if let Err(e) = res {
                            warn!(cause = %e, "qmp protocol error, closing");
                            break;
                        }
                    }
                    Err(e) => { debug!(cause = %e, "qmp socket read failed"); break; }
                },
                res = write_some(&mut wr, wbuf.as_ref()), if wbuf.is_some() => match res {
                    Ok(n) => {
                        if let Some(b) = wbuf.as_mut() {
                            b.advance(n);
                            if b.is_empty() { wbuf = None; }
                        }
                    }
                    Err(e) => { debug!(cause = %e, "qmp socket write failed"); break; }
                },
            }
        }
        // Dropping the senders wakes every waiter with Disconnected.
        let n = self.pending.len();
        self.pending.clear();
        if n > 0 {
            debug!(pending = n, "qmp calls failed by disconnect");
        }
        self.rx.close();
    }

    fn dispatch(&mut self) {
        while let Some(out) = self.conn.poll_event() {
            match out {
                QmpOutput::Greeting(g) => {
                    if let Some(tx) = self.greet.take() {
                        let _ = tx.send(g);
                    }
                }
                QmpOutput::Response {
                    id: Some(id),
                    result,
                } => match self.pending.remove(&id) {
                    Some((name, tx)) => {
                        trace!(id, command = %name, ok = result.is_ok(), "qmp reply");
                        // The caller may have given up (timeout); that is fine.
                        let _ = tx.send(result);
                    }
                    None => debug!(id, "qmp reply for unknown id"),
                },
                QmpOutput::Response { id: None, result } => {
                    warn!(
                        ?result,
                        "qmp reply without id (QEMU could not parse a command)"
                    );
                }
                QmpOutput::Event(ev) => {
                    trace!(event = %ev.name, "qmp event");
                    // No receivers is fine: nobody is watching events.
                    let _ = self.events.send(ev);
                }
            }
        }
    }
}

/// Write part of `buf`; never resolves when there is nothing to write (the
/// `select!` guard keeps it from being polled then anyway).
async fn write_some(
    wr: &mut tokio::net::unix::WriteHalf<'_>,
    buf: Option<&Bytes>,
) -> std::io::Result<usize> {
    match buf {
        Some(b) => wr.write(b).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commands::{QueryStatus, Stop};
    use serde_json::json;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::UnixListener;

    const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 2, \"major\": 7}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n";

    /// A fake QEMU: greets, answers `qmp_capabilities`, `query-status`
    /// (after a delay proportional to the id, so replies come back out of
    /// order), emits an event on `stop`, and hangs up on `quit` without replying.
    async fn fake_server(listener: UnixListener) {
        let (sock, _) = listener.accept().await.unwrap();
        let (rd, mut wr) = sock.into_split();
        wr.write_all(GREETING.as_bytes()).await.unwrap();
        let (otx, mut orx) = mpsc::unbounded_channel::<String>();
        let writer = tokio::spawn(async move {
            while let Some(l) = orx.recv().await {
                if l.is_empty() {
                    break;
                }
                wr.write_all(l.as_bytes()).await.unwrap();
            }
        });
        let mut lines = BufReader::new(rd).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let v: Value = serde_json::from_str(&line).unwrap();
            let id = v["id"].clone();
            let otx = otx.clone();
            match v["execute"].as_str().unwrap() {
                "qmp_capabilities" => otx.send(format!("{}\r\n", json!({"return":{},"id":id}))).unwrap(),
                "query-status" => {
                    let delay = 50 - (id.as_u64().unwrap() % 5) * 10;
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                        let _ = otx.send(format!(
                            "{}\r\n",
                            json!({"return":{"status":"running","running":true,"singlestep":false},"id":id})
                        ));
                    });
                }
                "stop" => {
                    otx.send(format!(
                        "{}\r\n",
                        json!({"timestamp":{"seconds":1,"microseconds":2},"event":"STOP"})
                    ))
                    .unwrap();
                    otx.send(format!("{}\r\n", json!({"return":{},"id":id}))).unwrap();
                }
                "quit" => {
                    otx.send(String::new()).unwrap();
                    break;
                }
                other => otx
                    .send(format!(
                        "{}\r\n",
                        json!({"error":{"class":"CommandNotFound","desc":format!("The command {other} has not been found")},"id":id})
                    ))
                    .unwrap(),
            }
        }
        writer.await.unwrap();
    }

    #[tokio::test]
    async fn fake_server_multiplexing_events_and_disconnect() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_server(listener));

        let (client, mut events) = QmpClient::connect(&path).await.unwrap();
        assert_eq!(client.greeting().version.qemu.minor, 2);

        // Many concurrent callers on clones of one client.
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let c = client.clone();
            tasks.push(tokio::spawn(
                async move { c.execute_typed(&QueryStatus).await },
            ));
        }
        for t in tasks {
            assert!(t.await.unwrap().unwrap().running);
        }

        client.execute_typed(&Stop).await.unwrap();
        let ev = events.recv().await.unwrap();
        assert_eq!(ev.name, "STOP");
        assert_eq!(ev.timestamp.microseconds, 2);

        let err = client.execute("bogus", Value::Null).await.unwrap_err();
        match err {
            QmpError::Command { command, reply } => {
                assert_eq!(command, "bogus");
                assert_eq!(reply.class, "CommandNotFound");
            }
            other => panic!("unexpected {other:?}"),
        }

        // A pending call fails with Disconnected when the peer hangs up.
        let pending = {
            let c = client.clone();
            tokio::spawn(async move { c.execute("quit", Value::Null).await })
        };
        assert!(pending.await.unwrap().unwrap_err().is_disconnected());
        tokio::time::timeout(Duration::from_secs(5), client.closed())
            .await
            .unwrap();
        assert!(client.is_closed());
        // And so does every later call.
        assert!(client
            .execute_typed(&QueryStatus)
            .await
            .unwrap_err()
            .is_disconnected());
        server.await.unwrap();
    }

    #[tokio::test]
    async fn timeout_and_bad_peer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            sock.write_all(GREETING.as_bytes()).await.unwrap();
            let mut r = BufReader::new(&mut sock);
            let mut l = String::new();
            r.read_line(&mut l).await.unwrap();
            sock.write_all(b"{\"return\": {}, \"id\": 1}\r\n")
                .await
                .unwrap();
            // Swallow the next command, then send garbage.
            let mut r = BufReader::new(&mut sock);
            l.clear();
            r.read_line(&mut l).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            sock.write_all(b"garbage\r\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let (client, _ev) = QmpClient::connect(&path).await.unwrap();
        let e = client
            .execute_timeout("query-status", Value::Null, Duration::from_millis(50))
            .await
            .unwrap_err();
        assert!(matches!(e, QmpError::Timeout { .. }), "{e:?}");
        // The garbage line closes the connection even though QEMU's socket is open.
        tokio::time::timeout(Duration::from_secs(5), client.closed())
            .await
            .unwrap();
        server.await.unwrap();
    }

    #[tokio::test]
    async fn connect_to_missing_socket() {
        let e = QmpClient::connect(Path::new("/nonexistent/qmp.sock"))
            .await
            .unwrap_err();
        assert!(matches!(e, QmpError::Connect { .. }));
    }
}
