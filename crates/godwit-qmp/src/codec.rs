//! Sans-IO QMP connection core.
//!
//! This module owns the QMP wire format: newline-delimited JSON objects in
//! both directions. It never touches a socket, a clock or a task; the caller
//! moves bytes in and out.
//!
//! # Wire format
//!
//! | Direction | Shape | Meaning |
//! |---|---|---|
//! | server → client | `{"QMP":{"version":{..},"capabilities":[..]}}` | greeting, exactly once, first |
//! | client → server | `{"execute":NAME,"arguments":{..},"id":N}` | command (`arguments` omitted when empty) |
//! | server → client | `{"return":VALUE,"id":N}` | success reply |
//! | server → client | `{"error":{"class":C,"desc":D},"id":N}` | error reply |
//! | server → client | `{"event":NAME,"data":{..},"timestamp":{"seconds":S,"microseconds":U}}` | asynchronous event |
//!
//! QEMU terminates its lines with `\r\n`; both `\n` and `\r\n` are accepted.
//! Replies may lack `id` (QEMU answers a line it could not parse without
//! one), so [`QmpOutput::Response::id`] is an `Option`.
//!
//! # Calling order
//!
//! 1. [`QmpConnection::handle_input`] with every chunk read from the socket.
//! 2. [`QmpConnection::poll_event`] until `None`, acting on each output.
//! 3. [`QmpConnection::send_command`] whenever a command is wanted, then
//!    [`QmpConnection::poll_transmit`] until `None`, writing every chunk.
//!
//! Any [`CodecError`] is fatal: the connection is poisoned and every later
//! `handle_input` fails with [`CodecError::Poisoned`]. A peer that sends
//! something we cannot parse is not a peer we can keep talking to safely,
//! because we might lose a reply and leave a caller waiting forever.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest line (one JSON message) we accept from QEMU, in bytes.
///
/// The largest real replies (`query-machines`, `query-qmp-schema`) are a few
/// hundred KiB; 16 MiB leaves ample headroom while bounding memory if the
/// peer never sends a newline.
pub const MAX_LINE_LEN: usize = 16 * 1024 * 1024;

/// How many bytes of an offending line an error message quotes.
const ERROR_SNIPPET_LEN: usize = 120;

/// Errors of the sans-IO QMP codec. All of them are fatal for the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    /// The peer sent more than [`MAX_LINE_LEN`] bytes without a newline.
    #[error("QMP line longer than {limit} bytes")]
    LineTooLong {
        /// The limit that was exceeded.
        limit: usize,
    },
    /// A line was not a JSON object of a known QMP shape.
    #[error("malformed QMP message ({reason}): {snippet:?}")]
    Malformed {
        /// What was wrong.
        reason: String,
        /// The start of the offending line, lossily decoded.
        snippet: String,
    },
    /// The first message was not the greeting.
    #[error("QMP peer sent a message before its greeting: {snippet:?}")]
    MissingGreeting {
        /// The start of the offending line.
        snippet: String,
    },
    /// A second greeting arrived.
    #[error("QMP peer sent a second greeting")]
    DuplicateGreeting,
    /// An earlier error poisoned the connection.
    #[error("QMP connection already failed")]
    Poisoned,
}

/// QEMU's version triple, as found in the greeting and `query-version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuVersionTriple {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

/// The `version` object of the greeting and of `query-version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Upstream version.
    pub qemu: QemuVersionTriple,
    /// Distribution package string (may be empty).
    #[serde(default)]
    pub package: String,
}

/// The server greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    /// QEMU version.
    pub version: VersionInfo,
    /// Advertised capabilities (e.g. `"oob"`).
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// An error reply: `{"error":{"class":..,"desc":..}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct ErrorReply {
    /// Error class, e.g. `GenericError`, `CommandNotFound`.
    pub class: String,
    /// Human-readable description.
    pub desc: String,
}

/// Event timestamp as sent by QEMU (host wall clock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    /// Seconds since the epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QmpEvent {
    /// Event name, e.g. `MIGRATION`, `STOP`, `SHUTDOWN`.
    pub name: String,
    /// Event payload (`Value::Null` when QEMU sends none).
    pub data: Value,
    /// When QEMU emitted it.
    pub timestamp: Timestamp,
}

/// What the connection reports to its owner.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpOutput {
    /// The server greeting (always the first output).
    Greeting(Greeting),
    /// A reply to a command.
    Response {
        /// The id of the command; `None` for replies QEMU sends without one.
        id: Option<u64>,
        /// The `return` value or the `error` object.
        result: Result<Value, ErrorReply>,
    },
    /// An asynchronous event.
    Event(QmpEvent),
}

/// Sans-IO QMP client connection state. See the module docs for the calling order.
#[derive(Debug)]
pub struct QmpConnection {
    /// Bytes received but not yet split into lines.
    inbuf: BytesMut,
    /// Prefix of `inbuf` already known to hold no newline, so a long line
    /// arriving in many chunks is scanned once, not once per chunk.
    scanned: usize,
    /// Encoded commands waiting for `poll_transmit`.
    outq: VecDeque<Bytes>,
    /// Parsed outputs waiting for `poll_event`.
    events: VecDeque<QmpOutput>,
    /// Next command id; ids are never reused within a connection.
    next_id: u64,
    greeted: bool,
    poisoned: bool,
}

impl Default for QmpConnection {
    fn default() -> Self {
        Self::new()
    }
}

impl QmpConnection {
    /// A fresh connection that expects the greeting first.
    pub fn new() -> Self {
        Self {
            inbuf: BytesMut::new(),
            scanned: 0,
            outq: VecDeque::new(),
            events: VecDeque::new(),
            next_id: 1,
            greeted: false,
            poisoned: false,
        }
    }

    /// Feed bytes read from the socket. Complete lines are parsed and queued
    /// for [`poll_event`](Self::poll_event); a partial line is kept.
    ///
    /// Outputs parsed before an error stay available from `poll_event`.
    pub fn handle_input(&mut self, data: &[u8]) -> Result<(), CodecError> {
        if self.poisoned {
            return Err(CodecError::Poisoned);
        }
        self.inbuf.extend_from_slice(data);
        let res = self.drain_lines();
        if res.is_err() {
            self.poisoned = true;
            self.inbuf = BytesMut::new();
            self.scanned = 0;
        }
        res
    }

    /// Queue a command and return its id. `args` of `None` or `Value::Null`
    /// omits the `arguments` member, as QEMU requires for argument-less commands.
    pub fn send_command(&mut self, name: &str, args: Option<&Value>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = serde_json::Map::new();
        msg.insert("execute".into(), Value::String(name.to_owned()));
        if let Some(a) = args.filter(|a| !a.is_null()) {
            msg.insert("arguments".into(), a.clone());
        }
        msg.insert("id".into(), Value::from(id));
        // Serialising a `Value` map cannot fail: all keys are strings.
        let mut line = serde_json::to_vec(&Value::Object(msg)).unwrap_or_default();
        line.push(b'\n');
        tracing::trace!(id, command = name, "qmp command queued");
        self.outq.push_back(Bytes::from(line));
        id
    }

    /// Next chunk of bytes to write to the socket, if any.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.outq.pop_front()
    }

    /// Next parsed output, if any.
    pub fn poll_event(&mut self) -> Option<QmpOutput> {
        self.events.pop_front()
    }

    /// Whether the greeting has been received.
    pub fn is_greeted(&self) -> bool {
        self.greeted
    }

    /// Whether an error has poisoned the connection.
    pub fn is_failed(&self) -> bool {
        self.poisoned
    }

    fn drain_lines(&mut self) -> Result<(), CodecError> {
        loop {
            let Some(nl) = self.inbuf[self.scanned..]
                .iter()
                .position(|&b| b == b'\n')
                .map(|p| p + self.scanned)
            else {
                self.scanned = self.inbuf.len();
                if self.inbuf.len() > MAX_LINE_LEN {
                    return Err(CodecError::LineTooLong {
                        limit: MAX_LINE_LEN,
                    });
                }
                return Ok(());
            };
            if nl > MAX_LINE_LEN {
                return Err(CodecError::LineTooLong {
                    limit: MAX_LINE_LEN,
                });
            }
            let line = self.inbuf.split_to(nl);
            self.inbuf.advance(1);
            self.scanned = 0;
            let line = trim_ascii_ws(&line);
            if line.is_empty() {
                continue;
            }
            let out = parse_line(line)?;
            match (&out, self.greeted) {
                (QmpOutput::Greeting(_), true) => return Err(CodecError::DuplicateGreeting),
                (QmpOutput::Greeting(_), false) => self.greeted = true,
                (_, false) => {
                    return Err(CodecError::MissingGreeting {
                        snippet: snippet(line),
                    })
                }
                _ => {}
            }
            self.events.push_back(out);
        }
    }
}

fn trim_ascii_ws(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |p| p + 1);
    &b[start..end]
}

fn snippet(line: &[u8]) -> String {
    let cut = &line[..line.len().min(ERROR_SNIPPET_LEN)];
    String::from_utf8_lossy(cut).into_owned()
}

fn malformed(reason: impl Into<String>, line: &[u8]) -> CodecError {
    CodecError::Malformed {
        reason: reason.into(),
        snippet: snippet(line),
    }
}

/// Decode one line (without its terminator) into a typed output.
fn parse_line(line: &[u8]) -> Result<QmpOutput, CodecError> {
    let v: Value = serde_json::from_slice(line).map_err(|e| malformed(e.to_string(), line))?;
    let Value::Object(mut obj) = v else {
        return Err(malformed("not a JSON object", line));
    };
    if let Some(g) = obj.remove("QMP") {
        let g: Greeting =
            serde_json::from_value(g).map_err(|e| malformed(format!("greeting: {e}"), line))?;
        return Ok(QmpOutput::Greeting(g));
    }
    if let Some(name) = obj.remove("event") {
        let Value::String(name) = name else {
            return Err(malformed("event name is not a string", line));
        };
        let data = obj.remove("data").unwrap_or(Value::Null);
        let timestamp = match obj.remove("timestamp") {
            Some(t) => serde_json::from_value(t)
                .map_err(|e| malformed(format!("event timestamp: {e}"), line))?,
            None => Timestamp::default(),
        };
        return Ok(QmpOutput::Event(QmpEvent {
            name,
            data,
            timestamp,
        }));
    }
    let id = match obj.remove("id") {
        None => None,
        Some(id) => Some(
            id.as_u64()
                .ok_or_else(|| malformed("reply id is not an unsigned integer", line))?,
        ),
    };
    if let Some(ret) = obj.remove("return") {
        return Ok(QmpOutput::Response {
            id,
            result: Ok(ret),
        });
    }
    if let Some(err) = obj.remove("error") {
        let err: ErrorReply = serde_json::from_value(err)
            .map_err(|e| malformed(format!("error reply: {e}"), line))?;
        return Ok(QmpOutput::Response {
            id,
            result: Err(err),
        });
    }
    Err(malformed("unknown message kind", line))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Captured from QEMU 7.2 (Debian build), including its `\r\n` endings.
    const CAPTURE: &[u8] = b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 22, \"minor\": 2, \"major\": 7}, \"package\": \"Debian 1:7.2+dfsg-7+deb12u18+b3\"}, \"capabilities\": [\"oob\"]}}\r\n\
{\"return\": {}, \"id\": 1}\r\n\
{\"return\": {\"status\": \"running\", \"singlestep\": false, \"running\": true}, \"id\": 2}\r\n\
{\"id\": 4, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command bogus has not been found\"}}\r\n\
{\"timestamp\": {\"seconds\": 1795304118, \"microseconds\": 709918}, \"event\": \"SHUTDOWN\", \"data\": {\"guest\": false, \"reason\": \"host-qmp-quit\"}}\r\n\
{\"return\": {}}\r\n";

    fn drain(c: &mut QmpConnection) -> Vec<QmpOutput> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    fn expected() -> Vec<QmpOutput> {
        vec![
            QmpOutput::Greeting(Greeting {
                version: VersionInfo {
                    qemu: QemuVersionTriple {
                        major: 7,
                        minor: 2,
                        micro: 22,
                    },
                    package: "Debian 1:7.2+dfsg-7+deb12u18+b3".into(),
                },
                capabilities: vec!["oob".into()],
            }),
            QmpOutput::Response {
                id: Some(1),
                result: Ok(json!({})),
            },
            QmpOutput::Response {
                id: Some(2),
                result: Ok(json!({"status":"running","singlestep":false,"running":true})),
            },
            QmpOutput::Response {
                id: Some(4),
                result: Err(ErrorReply {
                    class: "CommandNotFound".into(),
                    desc: "The command bogus has not been found".into(),
                }),
            },
            QmpOutput::Event(QmpEvent {
                name: "SHUTDOWN".into(),
                data: json!({"guest":false,"reason":"host-qmp-quit"}),
                timestamp: Timestamp {
                    seconds: 1795304118,
                    microseconds: 709918,
                },
            }),
            QmpOutput::Response {
                id: None,
                result: Ok(json!({})),
            },
        ]
    }

    #[test]
    fn capture_in_one_chunk() {
        let mut c = QmpConnection::new();
        c.handle_input(CAPTURE).unwrap();
        assert!(c.is_greeted());
        assert_eq!(drain(&mut c), expected());
    }

    #[test]
    fn capture_split_at_every_position() {
        for split in 0..=CAPTURE.len() {
            let mut c = QmpConnection::new();
            c.handle_input(&CAPTURE[..split]).unwrap();
            c.handle_input(&CAPTURE[split..]).unwrap();
            assert_eq!(drain(&mut c), expected(), "split at {split}");
        }
    }

    #[test]
    fn capture_byte_by_byte() {
        let mut c = QmpConnection::new();
        let mut out = Vec::new();
        for b in CAPTURE {
            c.handle_input(std::slice::from_ref(b)).unwrap();
            out.extend(drain(&mut c));
        }
        assert_eq!(out, expected());
    }

    #[test]
    fn command_encoding() {
        let mut c = QmpConnection::new();
        let a = c.send_command("qmp_capabilities", None);
        let b = c.send_command("migrate", Some(&json!({"uri":"unix:/x"})));
        let n = c.send_command("cont", Some(&Value::Null));
        assert_eq!((a, b, n), (1, 2, 3));
        let l1 = c.poll_transmit().unwrap();
        let l2 = c.poll_transmit().unwrap();
        let l3 = c.poll_transmit().unwrap();
        assert!(c.poll_transmit().is_none());
        assert!(l1.ends_with(b"\n"));
        let v1: Value = serde_json::from_slice(&l1).unwrap();
        assert_eq!(v1, json!({"execute":"qmp_capabilities","id":1}));
        let v2: Value = serde_json::from_slice(&l2).unwrap();
        assert_eq!(
            v2,
            json!({"execute":"migrate","arguments":{"uri":"unix:/x"},"id":2})
        );
        let v3: Value = serde_json::from_slice(&l3).unwrap();
        assert_eq!(v3, json!({"execute":"cont","id":3}));
    }

    #[test]
    fn malformed_line_is_fatal() {
        let mut c = QmpConnection::new();
        let greeting = &CAPTURE[..CAPTURE.iter().position(|&b| b == b'\n').unwrap() + 1];
        c.handle_input(greeting).unwrap();
        let err = c
            .handle_input(b"{\"return\": {}, \"id\": 1}\n{not json}\n")
            .unwrap_err();
        assert!(matches!(err, CodecError::Malformed { .. }), "{err}");
        assert!(err.to_string().contains("{not json}"), "{err}");
        // Output parsed before the bad line is still delivered.
        assert_eq!(drain(&mut c).len(), 2);
        assert!(c.is_failed());
        assert_eq!(c.handle_input(b"{}\n"), Err(CodecError::Poisoned));
    }

    #[test]
    fn unknown_shapes_are_rejected() {
        for bad in [
            &b"[1,2]\n"[..],
            b"{\"foo\":1}\n",
            b"{\"return\":1,\"id\":\"x\"}\n",
            b"{\"error\":{\"class\":1}}\n",
            b"{\"event\":5}\n",
        ] {
            let mut c = QmpConnection::new();
            c.handle_input(b"{\"QMP\":{\"version\":{\"qemu\":{\"major\":1,\"minor\":2,\"micro\":3}},\"capabilities\":[]}}\n")
                .unwrap();
            assert!(
                c.handle_input(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn greeting_must_come_first_and_once() {
        let mut c = QmpConnection::new();
        let e = c.handle_input(b"{\"return\":{}}\n").unwrap_err();
        assert!(matches!(e, CodecError::MissingGreeting { .. }));
        let mut c = QmpConnection::new();
        let greeting = &CAPTURE[..CAPTURE.iter().position(|&b| b == b'\n').unwrap() + 1];
        c.handle_input(greeting).unwrap();
        assert_eq!(c.handle_input(greeting), Err(CodecError::DuplicateGreeting));
    }

    #[test]
    fn overlong_line_is_rejected_without_newline() {
        let mut c = QmpConnection::new();
        let chunk = vec![b' '; 1024 * 1024];
        let mut res = Ok(());
        for _ in 0..=(MAX_LINE_LEN / chunk.len()) {
            res = c.handle_input(&chunk);
            if res.is_err() {
                break;
            }
        }
        assert_eq!(
            res,
            Err(CodecError::LineTooLong {
                limit: MAX_LINE_LEN
            })
        );
        assert!(c.inbuf.is_empty(), "buffer released on error");
    }

    #[test]
    fn event_without_data_or_timestamp() {
        let mut c = QmpConnection::new();
        c.handle_input(b"{\"QMP\":{\"version\":{\"qemu\":{\"major\":1,\"minor\":2,\"micro\":3}},\"capabilities\":[]}}\n{\"event\":\"STOP\"}\n")
            .unwrap();
        let out = drain(&mut c);
        assert_eq!(
            out[1],
            QmpOutput::Event(QmpEvent {
                name: "STOP".into(),
                data: Value::Null,
                timestamp: Timestamp::default()
            })
        );
    }
}
