//! The agent's end of the in-guest tool's channel.
//!
//! QEMU exposes the guest's virtio-serial port `org.godwit.guest.0` as a
//! unix socket on the host; this module keeps a connection to it, sends
//! commands as `GW1 {json}` lines and matches answers to requests by `id`.
//! After a migration the VM's new QEMU has a new socket and the agent on
//! the destination host opens a new channel; the guest tool notices the
//! reconnection and says hello again.
//!
//! Reports are kept as JSON values: the agent relays them to clients, which
//! decode them into `godwit_guest::proto::Report` themselves; the agent
//! only needs the `id` and the hello fields.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, watch};
use tracing::{debug, trace};

use crate::api::types::GuestInfo;

/// How many recent reports are kept for clients that poll.
pub const REPORT_BACKLOG: usize = 4096;
/// Longest line accepted from the guest; a longer one means the channel is
/// garbage and is dropped.
pub const MAX_LINE: usize = 1 << 20;
/// Delay between connection attempts while QEMU is not yet listening.
const RECONNECT_DELAY: Duration = Duration::from_millis(100);

/// Errors talking to the guest tool.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// No connection to the guest channel.
    #[error("the guest channel is not connected")]
    NotConnected,
    /// The guest did not answer in time.
    #[error("the guest tool did not answer within {0:?}")]
    Timeout(Duration),
    /// The command is not a JSON object.
    #[error("guest command must be a JSON object with a \"cmd\" field")]
    BadCommand,
    /// Writing to the channel failed.
    #[error("writing to the guest channel failed")]
    Io(#[source] std::io::Error),
    /// The guest answered with an error report.
    #[error("the guest tool reported: {0}")]
    Guest(String),
}

#[derive(Default)]
struct State {
    connected: bool,
    boot_id: Option<String>,
    uptime_ms: Option<u64>,
    waiters: HashMap<u64, oneshot::Sender<Value>>,
    reports: VecDeque<(u64, Value)>,
    report_seq: u64,
    writer: Option<Arc<tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>>>,
}

/// A self-reconnecting channel to one VM's guest tool.
#[derive(Clone)]
pub struct GuestChannel {
    state: Arc<Mutex<State>>,
    next_id: Arc<AtomicU64>,
    stop: watch::Sender<bool>,
}

impl GuestChannel {
    /// Starts maintaining a connection to `socket`.
    pub fn spawn(vm: String, socket: PathBuf) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let ch = Self {
            state: Arc::new(Mutex::new(State::default())),
            // Ids start high so they never collide with ids a person typed
            // in the guest's own shell.
            next_id: Arc::new(AtomicU64::new(1_000_000)),
            stop,
        };
        let state = ch.state.clone();
        tokio::spawn(async move { run(vm, socket, state, stop_rx).await });
        ch
    }

    /// Stops the channel task.
    pub fn close(&self) {
        let _ = self.stop.send(true);
    }

    /// What is known of the guest.
    pub fn info(&self) -> GuestInfo {
        let s = lock(&self.state);
        GuestInfo {
            connected: s.connected,
            boot_id: s.boot_id.clone(),
            uptime_ms: s.uptime_ms,
        }
    }

    /// Reports received after sequence number `since`, and the newest
    /// sequence number.
    pub fn reports_since(&self, since: u64) -> (u64, Vec<Value>) {
        let s = lock(&self.state);
        let items = s
            .reports
            .iter()
            .filter(|(seq, _)| *seq > since)
            .map(|(_, v)| v.clone())
            .collect();
        (s.report_seq, items)
    }

    /// Waits until the guest tool has said hello on the current connection.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<GuestInfo, GuestError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let info = self.info();
            if info.connected && info.boot_id.is_some() {
                return Ok(info);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(GuestError::Timeout(timeout));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `command` (a JSON object with `cmd`) and waits for the report
    /// carrying the same id.
    pub async fn request(
        &self,
        mut command: Value,
        timeout: Duration,
    ) -> Result<Value, GuestError> {
        let obj = command.as_object_mut().ok_or(GuestError::BadCommand)?;
        if !obj.get("cmd").is_some_and(Value::is_string) {
            return Err(GuestError::BadCommand);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        obj.insert("id".into(), Value::from(id));
        let (tx, rx) = oneshot::channel();
        let writer = {
            let mut s = lock(&self.state);
            let w = s.writer.clone().ok_or(GuestError::NotConnected)?;
            s.waiters.insert(id, tx);
            w
        };
        let line = format!("{}{}\n", godwit_guest::proto::LINE_PREFIX, command);
        let write = async {
            let mut w = writer.lock().await;
            w.write_all(line.as_bytes()).await?;
            w.flush().await
        };
        if let Err(e) = write.await {
            lock(&self.state).waiters.remove(&id);
            return Err(GuestError::Io(e));
        }
        let answer = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(v)) => v,
            Ok(Err(_)) => return Err(GuestError::NotConnected),
            Err(_) => {
                lock(&self.state).waiters.remove(&id);
                return Err(GuestError::Timeout(timeout));
            }
        };
        if answer.get("report").and_then(Value::as_str) == Some("error") {
            let msg = answer
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("unknown error")
                .to_owned();
            return Err(GuestError::Guest(msg));
        }
        Ok(answer)
    }
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // A panic while holding this lock would be a bug in this module; the
    // state stays usable, so recover the guard rather than propagate.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn run(
    vm: String,
    socket: PathBuf,
    state: Arc<Mutex<State>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        let stream = tokio::select! {
            r = UnixStream::connect(&socket) => r,
            _ = stop.changed() => return,
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                trace!(vm, cause = %e, "guest channel not available yet");
                tokio::select! {
                    _ = tokio::time::sleep(RECONNECT_DELAY) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        debug!(vm, "guest channel connected");
        let (rd, wr) = stream.into_split();
        {
            let mut s = lock(&state);
            s.connected = true;
            s.boot_id = None;
            s.writer = Some(Arc::new(tokio::sync::Mutex::new(wr)));
        }
        let mut lines = BufReader::new(rd);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = tokio::select! {
                r = read_bounded_line(&mut lines, &mut buf) => r,
                _ = stop.changed() => return,
            };
            match n {
                Ok(0) | Err(_) => break,
                Ok(_) => handle_line(&state, &buf),
            }
        }
        debug!(vm, "guest channel disconnected");
        {
            let mut s = lock(&state);
            s.connected = false;
            s.writer = None;
            // Pending requests can no longer be answered on this connection.
            s.waiters.clear();
        }
        tokio::select! {
            _ = tokio::time::sleep(RECONNECT_DELAY) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn read_bounded_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    loop {
        let avail = r.fill_buf().await?;
        if avail.is_empty() {
            return Ok(buf.len());
        }
        if let Some(pos) = avail.iter().position(|&b| b == b'\n') {
            buf.extend_from_slice(&avail[..pos]);
            r.consume(pos + 1);
            return Ok(buf.len() + 1);
        }
        let n = avail.len();
        buf.extend_from_slice(avail);
        r.consume(n);
        if buf.len() > MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "guest line too long",
            ));
        }
    }
}

fn handle_line(state: &Mutex<State>, line: &[u8]) {
    let Ok(text) = std::str::from_utf8(line) else {
        return;
    };
    let text = text.trim_end_matches('\r');
    let Some(json) = text.strip_prefix(godwit_guest::proto::LINE_PREFIX) else {
        return;
    };
    let Ok(v) = serde_json::from_str::<Value>(json) else {
        debug!(line = json, "undecodable guest report");
        return;
    };
    let mut s = lock(state);
    if v.get("report").and_then(Value::as_str) == Some("hello") {
        s.boot_id = v.get("boot_id").and_then(Value::as_str).map(str::to_owned);
    }
    if let Some(up) = v.get("uptime_ms").and_then(Value::as_u64) {
        s.uptime_ms = Some(up);
    }
    s.report_seq += 1;
    let seq = s.report_seq;
    s.reports.push_back((seq, v.clone()));
    while s.reports.len() > REPORT_BACKLOG {
        s.reports.pop_front();
    }
    if let Some(id) = v.get("id").and_then(Value::as_u64) {
        if let Some(tx) = s.waiters.remove(&id) {
            let _ = tx.send(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn request_matches_answer_by_id_and_survives_reconnect() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let ch = GuestChannel::spawn("vm".into(), path.clone());
        for round in 0..2 {
            let (s, _) = listener.accept().await.unwrap();
            let (rd, mut wr) = s.into_split();
            let boot = format!("boot{round}");
            wr.write_all(
                format!(
                    "noise\nGW1 {{\"report\":\"hello\",\"boot_id\":\"{boot}\",\"uptime_ms\":5}}\n"
                )
                .as_bytes(),
            )
            .await
            .unwrap();
            let info = ch.wait_ready(Duration::from_secs(5)).await.unwrap();
            assert_eq!(info.boot_id.as_deref(), Some(boot.as_str()));
            let guest = tokio::spawn(async move {
                let mut lines = BufReader::new(rd).lines();
                let l = lines.next_line().await.unwrap().unwrap();
                let v: Value = serde_json::from_str(l.strip_prefix("GW1 ").unwrap()).unwrap();
                let id = v["id"].as_u64().unwrap();
                wr.write_all(
                    format!("GW1 {{\"report\":\"pong\",\"id\":{id},\"uptime_ms\":9}}\n").as_bytes(),
                )
                .await
                .unwrap();
                // Keep the connection open until the reply was read.
                tokio::time::sleep(Duration::from_millis(200)).await;
            });
            let ans = ch
                .request(serde_json::json!({"cmd": "ping"}), Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(ans["report"], "pong");
            guest.await.unwrap();
        }
        assert!(matches!(
            ch.request(serde_json::json!({"nocmd": 1}), Duration::from_secs(1))
                .await,
            Err(GuestError::BadCommand)
        ));
        ch.close();
    }
}
