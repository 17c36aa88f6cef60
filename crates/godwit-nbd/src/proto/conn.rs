//! [`ServerConnection`]: one client connection, handshake then transmission,
//! as a sans-IO state machine.
//!
//! Calling order for a shell:
//!
//! 1. create it with the exports, then send everything
//!    [`poll_transmit`](ServerConnection::poll_transmit) yields (the greeting);
//! 2. on every read from the socket, call
//!    [`handle_input`](ServerConnection::handle_input); on `Err`, send what is
//!    left in `poll_transmit` and close;
//! 3. drain [`poll_event`](ServerConnection::poll_event): run each
//!    [`ServerEvent::Request`] against the backend and pass the result to
//!    [`handle_reply`](ServerConnection::handle_reply); stop reading after
//!    [`ServerEvent::Disconnect`];
//! 4. send what `poll_transmit` yields; close once
//!    [`is_closed`](ServerConnection::is_closed) and nothing is left to send.
//!
//! Input is processed eagerly, so a shell that wants backpressure drains the
//! events before reading more.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tracing::{debug, trace};

use super::options::{list_query_matches, parse_go, parse_meta, OptionDataError};
use super::reply::{self, Extent, ReadChunk, Reply};
use super::request::{self, Command, Request, Validated};
use super::{
    ExportInfo, NbdErrno, BASE_ALLOCATION, BASE_ALLOCATION_ID, EXPORT_NAME_PADDING,
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT,
    INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME, MAX_EXTENTS, MAX_OPTIONS,
    MAX_OPTION_LEN, MAX_PAYLOAD_LEN, MIN_BLOCK_SIZE, NBDMAGIC, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO,
    OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY,
    PREFERRED_BLOCK_SIZE, REP_ACK, REP_ERR_INVALID, REP_ERR_TOO_BIG, REP_ERR_UNKNOWN,
    REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, REP_SERVER,
};

/// Fatal protocol errors: the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The client did not set `NBD_FLAG_C_FIXED_NEWSTYLE` (oldstyle and
    /// plain newstyle clients are refused).
    #[error("client is not fixed-newstyle (client flags {flags:#x})")]
    NotFixedNewstyle {
        /// Client flags received.
        flags: u32,
    },
    /// The client set flags this server does not know or did not offer.
    #[error("unknown client flags {flags:#x}")]
    UnknownClientFlags {
        /// Client flags received.
        flags: u32,
    },
    /// An option header did not start with `IHAVEOPT`.
    #[error("bad option magic {magic:#x}")]
    BadOptionMagic {
        /// Magic received.
        magic: u64,
    },
    /// More than [`MAX_OPTIONS`](super::MAX_OPTIONS) options.
    #[error("too many options in negotiation")]
    TooManyOptions,
    /// NBD_OPT_EXPORT_NAME named an export that does not exist (this option
    /// has no error reply: the spec mandates a disconnect).
    #[error("export name {name:?} not found")]
    UnknownExport {
        /// Requested name (lossily decoded).
        name: String,
    },
    /// NBD_OPT_EXPORT_NAME longer than [`MAX_OPTION_LEN`](super::MAX_OPTION_LEN).
    #[error("export name option of {length} bytes is too long")]
    ExportNameTooLong {
        /// Declared length.
        length: u32,
    },
    /// A transmission request did not start with `NBD_REQUEST_MAGIC`.
    #[error("bad request magic {magic:#x}")]
    BadRequestMagic {
        /// Magic received.
        magic: u32,
    },
    /// A WRITE payload over [`MAX_PAYLOAD_LEN`](super::MAX_PAYLOAD_LEN).
    #[error("write payload of {length} bytes is too large")]
    PayloadTooLarge {
        /// Declared length.
        length: u32,
    },
}

/// Something the shell must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerEvent {
    /// Negotiation finished (GO or EXPORT_NAME); requests follow.
    Negotiated(Negotiated),
    /// A validated request to run against the backend, then answer with
    /// [`ServerConnection::handle_reply`].
    Request(Request),
    /// The client sent NBD_CMD_DISC or NBD_OPT_ABORT: answer outstanding
    /// requests, flush the output and close.
    Disconnect,
}

/// The outcome of negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Index of the export in the list given to [`ServerConnection::new`].
    pub export: usize,
    /// Transmission flags sent to the client.
    pub transmission_flags: u16,
    /// Structured replies are in use.
    pub structured_replies: bool,
    /// `base:allocation` was selected (BLOCK_STATUS allowed).
    pub base_allocation: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Greeting sent, waiting for the 4 bytes of client flags.
    ClientFlags,
    /// Waiting for the next option header and data.
    Options,
    /// Skipping the data of an oversized option, then ERR_TOO_BIG.
    SkipOption { option: u32, remaining: u64 },
    /// Requests and replies.
    Transmission,
    /// ABORT, DISC or a fatal error: input is ignored.
    Closed,
}

/// The metadata context selection of the last SET_META_CONTEXT.
#[derive(Debug, Clone, Copy)]
struct MetaSelection {
    export: usize,
    base_allocation: bool,
}

/// Server side of one NBD connection (sans-IO); see the module docs for the
/// calling order.
#[derive(Debug)]
pub struct ServerConnection {
    exports: Vec<ExportInfo>,
    state: State,
    input: BytesMut,
    out: VecDeque<Bytes>,
    events: VecDeque<ServerEvent>,
    structured: bool,
    no_zeroes: bool,
    meta: Option<MetaSelection>,
    options_seen: u32,
    session: Option<Negotiated>,
    failed: Option<ProtoError>,
}

impl ServerConnection {
    /// A connection offering `exports`; the greeting is queued for
    /// [`poll_transmit`](Self::poll_transmit).
    pub fn new(exports: Vec<ExportInfo>) -> Self {
        let mut greeting = BytesMut::with_capacity(18);
        greeting.put_u64(NBDMAGIC);
        greeting.put_u64(IHAVEOPT);
        greeting.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        let mut out = VecDeque::new();
        out.push_back(greeting.freeze());
        Self {
            exports,
            state: State::ClientFlags,
            input: BytesMut::new(),
            out,
            events: VecDeque::new(),
            structured: false,
            no_zeroes: false,
            meta: None,
            options_seen: 0,
            session: None,
            failed: None,
        }
    }

    /// Feed bytes received from the client (any chunking). An error is
    /// fatal and sticky: every later call returns it again.
    pub fn handle_input(&mut self, data: &[u8]) -> Result<(), ProtoError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.state == State::Closed {
            return Ok(());
        }
        self.input.extend_from_slice(data);
        loop {
            match self.step() {
                Ok(true) => {}
                Ok(false) => return Ok(()),
                Err(e) => {
                    debug!(error = %e, "closing NBD connection");
                    self.state = State::Closed;
                    self.input.clear();
                    self.failed = Some(e.clone());
                    return Err(e);
                }
            }
        }
    }

    /// Answer `request` with the backend's `reply`. Replies may be given in
    /// any order. A reply that does not fit the request (a backend bug) is
    /// turned into `EIO` rather than sent malformed. Requests handed out
    /// before a fatal input error are still answered (the shell may flush
    /// them before closing), so what the client gets does not depend on how
    /// its bytes were split.
    pub fn handle_reply(&mut self, request: &Request, reply: Reply) {
        let cookie = request.cookie;
        let reply = sanitize(&request.command, reply);
        match (reply, &request.command) {
            (Reply::Error(err), cmd) => self.send_error(cookie, cmd, err),
            (Reply::Ok, _) => reply::simple_reply(&mut self.out, cookie, 0),
            (Reply::Read(chunks), &Command::Read { offset, df, .. }) => {
                if !self.structured {
                    reply::simple_read(&mut self.out, cookie, chunks);
                } else if chunks.is_empty() {
                    reply::structured_none(&mut self.out, cookie);
                } else if df && chunks.len() > 1 {
                    let total: u64 = chunks.iter().map(ReadChunk::len).sum();
                    let mut buf = BytesMut::with_capacity(total as usize);
                    for c in chunks {
                        match c {
                            ReadChunk::Data(d) => buf.extend_from_slice(&d),
                            ReadChunk::Hole(n) => buf.put_bytes(0, n as usize),
                        }
                    }
                    let one = vec![ReadChunk::Data(buf.freeze())];
                    reply::structured_read(&mut self.out, cookie, offset, one);
                } else if df {
                    // A single hole chunk is still one content chunk, but DF
                    // clients expect data: expand it.
                    let chunks = chunks
                        .into_iter()
                        .map(|c| match c {
                            ReadChunk::Hole(n) => ReadChunk::Data(Bytes::from(vec![0; n as usize])),
                            d => d,
                        })
                        .collect();
                    reply::structured_read(&mut self.out, cookie, offset, chunks);
                } else {
                    reply::structured_read(&mut self.out, cookie, offset, chunks);
                }
            }
            (Reply::BlockStatus(extents), _) => {
                reply::structured_block_status(&mut self.out, cookie, BASE_ALLOCATION_ID, &extents)
            }
            // `sanitize` only lets Read through for READ.
            (Reply::Read(_), cmd) => self.send_error(cookie, cmd, NbdErrno::Io),
        }
    }

    /// Next event for the shell.
    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    /// Next piece of bytes to send to the client.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.out.pop_front()
    }

    /// Whether bytes are waiting in [`poll_transmit`](Self::poll_transmit).
    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    /// The connection is over (ABORT, DISC or a fatal error): stop reading,
    /// finish sending, close.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The negotiated export, once in transmission.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.session.as_ref()
    }

    /// Bytes received but not yet consumed (a partial message).
    pub fn buffered_input(&self) -> usize {
        self.input.len()
    }

    /// One parsing step. `Ok(true)` if progress was made.
    fn step(&mut self) -> Result<bool, ProtoError> {
        match self.state {
            State::ClientFlags => {
                if self.input.len() < 4 {
                    return Ok(false);
                }
                let flags = self.input.get_u32();
                if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
                    return Err(ProtoError::NotFixedNewstyle { flags });
                }
                if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
                    return Err(ProtoError::UnknownClientFlags { flags });
                }
                self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                self.state = State::Options;
                Ok(true)
            }
            State::Options => self.step_option(),
            State::SkipOption { option, remaining } => {
                let n = remaining.min(self.input.len() as u64);
                // n <= input.len(), a usize.
                self.input.advance(n as usize);
                let remaining = remaining - n;
                if remaining > 0 {
                    self.state = State::SkipOption { option, remaining };
                    return Ok(false);
                }
                self.state = State::Options;
                self.option_error(option, REP_ERR_TOO_BIG, "option data too long");
                Ok(true)
            }
            State::Transmission => self.step_request(),
            State::Closed => {
                self.input.clear();
                Ok(false)
            }
        }
    }

    fn step_option(&mut self) -> Result<bool, ProtoError> {
        if self.input.len() < 16 {
            return Ok(false);
        }
        let magic = u64::from_be_bytes(header_bytes(&self.input[0..8]));
        if magic != IHAVEOPT {
            return Err(ProtoError::BadOptionMagic { magic });
        }
        let option = u32::from_be_bytes(header_bytes(&self.input[8..12]));
        let length = u32::from_be_bytes(header_bytes(&self.input[12..16]));
        if length > MAX_OPTION_LEN {
            if option == OPT_EXPORT_NAME {
                return Err(ProtoError::ExportNameTooLong { length });
            }
            self.count_option()?;
            self.input.advance(16);
            self.state = State::SkipOption {
                option,
                remaining: u64::from(length),
            };
            return Ok(true);
        }
        // length <= MAX_OPTION_LEN (64 KiB).
        let total = 16 + length as usize;
        if self.input.len() < total {
            return Ok(false);
        }
        self.count_option()?;
        let msg = self.input.split_to(total);
        self.handle_option(option, &msg[16..])?;
        Ok(true)
    }

    fn count_option(&mut self) -> Result<(), ProtoError> {
        self.options_seen += 1;
        if self.options_seen > MAX_OPTIONS {
            return Err(ProtoError::TooManyOptions);
        }
        Ok(())
    }

    fn handle_option(&mut self, option: u32, data: &[u8]) -> Result<(), ProtoError> {
        trace!(option, len = data.len(), "NBD option");
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(data).into_owned();
                let Some(idx) = self.find_export(&name) else {
                    return Err(ProtoError::UnknownExport { name });
                };
                let export = &self.exports[idx];
                let flags = export.transmission_flags(self.structured);
                let mut b = BytesMut::with_capacity(10 + EXPORT_NAME_PADDING);
                b.put_u64(export.size);
                b.put_u16(flags);
                if !self.no_zeroes {
                    b.put_bytes(0, EXPORT_NAME_PADDING);
                }
                self.out.push_back(b.freeze());
                self.enter_transmission(idx);
            }
            OPT_ABORT => {
                // Data is ignored (spec: SHOULD ignore rather than reject).
                reply::option_reply(&mut self.out, option, REP_ACK, &[]);
                self.state = State::Closed;
                self.input.clear();
                self.events.push_back(ServerEvent::Disconnect);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.option_error(option, REP_ERR_INVALID, "LIST takes no data");
                    return Ok(());
                }
                for export in &self.exports {
                    let mut b = BytesMut::new();
                    // Export names come from our own configuration.
                    b.put_u32(export.name.len() as u32);
                    b.put_slice(export.name.as_bytes());
                    if let Some(d) = &export.description {
                        b.put_slice(d.as_bytes());
                    }
                    reply::option_reply(&mut self.out, option, REP_SERVER, &b);
                }
                reply::option_reply(&mut self.out, option, REP_ACK, &[]);
            }
            OPT_INFO | OPT_GO => {
                let go = match parse_go(data) {
                    Ok(go) => go,
                    Err(e) => {
                        self.option_data_error(option, e);
                        return Ok(());
                    }
                };
                let Some(idx) = self.find_export(&go.name) else {
                    self.option_error(option, REP_ERR_UNKNOWN, "no such export");
                    return Ok(());
                };
                let export = &self.exports[idx];
                let mut b = BytesMut::with_capacity(12);
                b.put_u16(INFO_EXPORT);
                b.put_u64(export.size);
                b.put_u16(export.transmission_flags(self.structured));
                reply::option_reply(&mut self.out, option, REP_INFO, &b);
                for info in go.info_requests {
                    let mut b = BytesMut::new();
                    match info {
                        INFO_NAME => {
                            b.put_u16(INFO_NAME);
                            b.put_slice(export.name.as_bytes());
                        }
                        INFO_DESCRIPTION => {
                            let Some(d) = &export.description else {
                                continue;
                            };
                            b.put_u16(INFO_DESCRIPTION);
                            b.put_slice(d.as_bytes());
                        }
                        INFO_BLOCK_SIZE => {
                            b.put_u16(INFO_BLOCK_SIZE);
                            b.put_u32(MIN_BLOCK_SIZE);
                            b.put_u32(PREFERRED_BLOCK_SIZE);
                            b.put_u32(MAX_PAYLOAD_LEN);
                        }
                        // INFO_EXPORT is always sent; unknown types are ignored.
                        _ => continue,
                    }
                    reply::option_reply(&mut self.out, option, REP_INFO, &b);
                }
                reply::option_reply(&mut self.out, option, REP_ACK, &[]);
                if option == OPT_GO {
                    self.enter_transmission(idx);
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.option_error(option, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data");
                    return Ok(());
                }
                self.structured = true;
                reply::option_reply(&mut self.out, option, REP_ACK, &[]);
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set && !self.structured {
                    self.option_error(option, REP_ERR_INVALID, "structured replies not negotiated");
                    return Ok(());
                }
                let meta = match parse_meta(data) {
                    Ok(m) => m,
                    Err(e) => {
                        self.option_data_error(option, e);
                        return Ok(());
                    }
                };
                let Some(idx) = self.find_export(&meta.name) else {
                    self.option_error(option, REP_ERR_UNKNOWN, "no such export");
                    return Ok(());
                };
                let matched = if set {
                    meta.queries.iter().any(|q| q == BASE_ALLOCATION)
                } else {
                    meta.queries.is_empty() || meta.queries.iter().any(|q| list_query_matches(q))
                };
                if set {
                    // Each SET replaces the previous selection.
                    self.meta = Some(MetaSelection {
                        export: idx,
                        base_allocation: matched,
                    });
                }
                if matched {
                    // Context ids in LIST replies are reserved, SHOULD be 0.
                    let id = if set { BASE_ALLOCATION_ID } else { 0 };
                    let mut b = BytesMut::new();
                    b.put_u32(id);
                    b.put_slice(BASE_ALLOCATION.as_bytes());
                    reply::option_reply(&mut self.out, option, REP_META_CONTEXT, &b);
                }
                reply::option_reply(&mut self.out, option, REP_ACK, &[]);
            }
            // STARTTLS, EXTENDED_HEADERS and everything unknown.
            _ => self.option_error(option, REP_ERR_UNSUP, "option not supported"),
        }
        Ok(())
    }

    fn option_data_error(&mut self, option: u32, e: OptionDataError) {
        match e {
            OptionDataError::Invalid(msg) => self.option_error(option, REP_ERR_INVALID, msg),
            OptionDataError::TooBig => {
                self.option_error(option, REP_ERR_TOO_BIG, "string too long")
            }
        }
    }

    fn option_error(&mut self, option: u32, kind: u32, msg: &str) {
        debug!(
            option,
            kind = format_args!("{kind:#x}"),
            msg,
            "NBD option refused"
        );
        reply::option_reply(&mut self.out, option, kind, msg.as_bytes());
    }

    /// `""` is the default export: the first one.
    fn find_export(&self, name: &str) -> Option<usize> {
        if name.is_empty() && !self.exports.is_empty() {
            return Some(0);
        }
        self.exports.iter().position(|e| e.name == name)
    }

    fn enter_transmission(&mut self, idx: usize) {
        let export = &self.exports[idx];
        let negotiated = Negotiated {
            export: idx,
            transmission_flags: export.transmission_flags(self.structured),
            structured_replies: self.structured,
            // Only if the last SET_META_CONTEXT named this same export.
            base_allocation: self.structured
                && self
                    .meta
                    .is_some_and(|m| m.export == idx && m.base_allocation),
        };
        debug!(export = %export.name, ?negotiated, "NBD negotiation done");
        self.session = Some(negotiated.clone());
        self.events.push_back(ServerEvent::Negotiated(negotiated));
        self.state = State::Transmission;
    }

    fn step_request(&mut self) -> Result<bool, ProtoError> {
        let Some(total) = request::check(&self.input)? else {
            return Ok(false);
        };
        let (header, payload) = request::parse(&mut self.input, total);
        // Invariant: state Transmission is only entered with a session.
        let Some(s) = &self.session else {
            return Ok(false);
        };
        let export = &self.exports[s.export];
        match request::validate(
            &header,
            payload,
            export.size,
            export.read_only,
            s.transmission_flags,
            s.base_allocation,
        ) {
            Validated::Command(command) => {
                trace!(
                    cookie = header.cookie,
                    command = command.name(),
                    "NBD request"
                );
                self.events.push_back(ServerEvent::Request(Request {
                    cookie: header.cookie,
                    command,
                }));
            }
            Validated::Disconnect => {
                self.state = State::Closed;
                self.input.clear();
                self.events.push_back(ServerEvent::Disconnect);
                return Ok(false);
            }
            Validated::Refused(err, msg) => {
                debug!(
                    cookie = header.cookie,
                    kind = header.kind,
                    ?err,
                    msg,
                    "NBD request refused"
                );
                if self.structured {
                    reply::structured_error(&mut self.out, header.cookie, err, msg);
                } else {
                    reply::simple_reply(&mut self.out, header.cookie, err.code());
                }
            }
        }
        Ok(true)
    }

    fn send_error(&mut self, cookie: u64, cmd: &Command, err: NbdErrno) {
        if self.structured {
            let msg = format!("{} failed: {err:?}", cmd.name());
            reply::structured_error(&mut self.out, cookie, err, &msg);
        } else {
            reply::simple_reply(&mut self.out, cookie, err.code());
        }
    }
}

/// Copy a fixed-size header field (the caller checked the length).
fn header_bytes<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&s[..N]);
    a
}

/// Make a backend reply fit its request, or turn it into EIO: the wire must
/// never carry a READ of the wrong length or an empty BLOCK_STATUS.
fn sanitize(cmd: &Command, reply: Reply) -> Reply {
    match (cmd, reply) {
        (_, Reply::Error(e)) => Reply::Error(e),
        (Command::Read { length, .. }, Reply::Read(chunks)) => {
            let chunks: Vec<ReadChunk> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
            let total: u64 = chunks.iter().map(ReadChunk::len).sum();
            if total == u64::from(*length) {
                Reply::Read(chunks)
            } else {
                Reply::Error(NbdErrno::Io)
            }
        }
        (Command::Read { .. }, _) => Reply::Error(NbdErrno::Io),
        (
            Command::BlockStatus {
                length, req_one, ..
            },
            Reply::BlockStatus(extents),
        ) => {
            let limit = if *req_one { 1 } else { MAX_EXTENTS };
            let mut left = *length;
            let mut out: Vec<Extent> = Vec::new();
            for e in extents.into_iter().filter(|e| e.length > 0) {
                if out.len() == limit || left == 0 {
                    break;
                }
                let len = e.length.min(left);
                left -= len;
                out.push(Extent {
                    length: len,
                    flags: e.flags,
                });
            }
            if out.is_empty() {
                Reply::Error(NbdErrno::Io)
            } else {
                Reply::BlockStatus(out)
            }
        }
        (Command::BlockStatus { .. }, _) => Reply::Error(NbdErrno::Io),
        (_, Reply::Ok) => Reply::Ok,
        (_, _) => Reply::Error(NbdErrno::Io),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{
        encode_option, encode_request, CMD_BLOCK_STATUS, CMD_DISC, CMD_FLAG_DF, CMD_READ,
        CMD_WRITE, OPT_STARTTLS, REPLY_TYPE_ERROR, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE,
        REP_ERR_UNSUP, SIMPLE_REPLY_MAGIC, STATE_HOLE, STATE_ZERO, STRUCTURED_REPLY_MAGIC,
    };
    use proptest::prelude::*;

    fn exports() -> Vec<ExportInfo> {
        vec![
            ExportInfo {
                name: "disk".into(),
                description: Some("test disk".into()),
                size: 1 << 20,
                read_only: false,
                fast_zero: true,
            },
            ExportInfo {
                name: "other".into(),
                description: None,
                size: 4096,
                read_only: true,
                fast_zero: false,
            },
        ]
    }

    fn drain(c: &mut ServerConnection) -> Vec<u8> {
        let mut v = Vec::new();
        while let Some(b) = c.poll_transmit() {
            v.extend_from_slice(&b);
        }
        v
    }

    fn events(c: &mut ServerConnection) -> Vec<ServerEvent> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            v.extend_from_slice(&i.to_be_bytes());
        }
        v
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut v = (name.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            v.extend_from_slice(&(q.len() as u32).to_be_bytes());
            v.extend_from_slice(q.as_bytes());
        }
        v
    }

    /// Option replies as (option, type, data).
    fn parse_option_replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while b.len() >= 20 {
            assert_eq!(
                u64::from_be_bytes(b[0..8].try_into().unwrap()),
                super::super::REP_MAGIC
            );
            let opt = u32::from_be_bytes(b[8..12].try_into().unwrap());
            let kind = u32::from_be_bytes(b[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
            v.push((opt, kind, b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        assert!(b.is_empty(), "trailing bytes");
        v
    }

    /// A connection past the greeting and client flags.
    fn started(flags: u32) -> ServerConnection {
        let mut c = ServerConnection::new(exports());
        let greeting = drain(&mut c);
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        assert_eq!(greeting[16..18], [0, 3]);
        c.handle_input(&flags.to_be_bytes()).unwrap();
        c
    }

    /// Structured replies + base:allocation + GO on "disk".
    fn negotiated_structured() -> ServerConnection {
        let mut c = started(3);
        let mut input = encode_option(OPT_STRUCTURED_REPLY, &[]);
        input.extend(encode_option(
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &[BASE_ALLOCATION]),
        ));
        input.extend(encode_option(OPT_GO, &go_data("disk", &[])));
        c.handle_input(&input).unwrap();
        drain(&mut c);
        let ev = events(&mut c);
        assert!(matches!(
            &ev[..],
            [ServerEvent::Negotiated(Negotiated {
                export: 0,
                structured_replies: true,
                base_allocation: true,
                ..
            })]
        ));
        c
    }

    #[test]
    fn refuses_non_fixed_and_unknown_client_flags() {
        let mut c = ServerConnection::new(exports());
        assert_eq!(
            c.handle_input(&0u32.to_be_bytes()),
            Err(ProtoError::NotFixedNewstyle { flags: 0 })
        );
        assert!(c.is_closed());
        // Sticky.
        assert!(c.handle_input(&[1, 2, 3]).is_err());
        let mut c = ServerConnection::new(exports());
        assert!(matches!(
            c.handle_input(&5u32.to_be_bytes()),
            Err(ProtoError::UnknownClientFlags { flags: 5 })
        ));
    }

    #[test]
    fn unknown_options_get_err_unsup_and_stay_in_sync() {
        let mut c = started(1);
        let mut input = encode_option(OPT_STARTTLS, &[]);
        input.extend(encode_option(0x1234, b"whatever data"));
        input.extend(encode_option(OPT_LIST, &[]));
        c.handle_input(&input).unwrap();
        let r = parse_option_replies(&drain(&mut c));
        assert_eq!(r[0].0, OPT_STARTTLS);
        assert_eq!(r[0].1, REP_ERR_UNSUP);
        assert_eq!((r[1].0, r[1].1), (0x1234, REP_ERR_UNSUP));
        assert_eq!((r[2].1, &r[2].2[4..8]), (REP_SERVER, &b"disk"[..]));
        assert_eq!(r[3].1, REP_SERVER);
        assert_eq!(r[4], (OPT_LIST, REP_ACK, vec![]));
    }

    #[test]
    fn oversized_option_is_skipped_with_too_big() {
        let mut c = started(1);
        let len = MAX_OPTION_LEN + 10;
        let mut input = IHAVEOPT.to_be_bytes().to_vec();
        input.extend_from_slice(&OPT_GO.to_be_bytes());
        input.extend_from_slice(&len.to_be_bytes());
        c.handle_input(&input).unwrap();
        for _ in 0..(len / 1000) {
            c.handle_input(&[0xee; 1000]).unwrap();
        }
        assert!(c.buffered_input() < 1000);
        let rest = (len % 1000) as usize;
        let mut tail = vec![0xee; rest];
        tail.extend(encode_option(OPT_ABORT, &[]));
        c.handle_input(&tail).unwrap();
        let r = parse_option_replies(&drain(&mut c));
        assert_eq!((r[0].0, r[0].1), (OPT_GO, REP_ERR_TOO_BIG));
        assert_eq!(r[1], (OPT_ABORT, REP_ACK, vec![]));
        assert_eq!(events(&mut c), vec![ServerEvent::Disconnect]);
        assert!(c.is_closed());
    }

    #[test]
    fn export_name_padding_follows_no_zeroes() {
        for (flags, len) in [(1u32, 134usize), (3, 10)] {
            let mut c = started(flags);
            c.handle_input(&encode_option(OPT_EXPORT_NAME, b"disk"))
                .unwrap();
            let out = drain(&mut c);
            assert_eq!(out.len(), len);
            assert_eq!(u64::from_be_bytes(out[0..8].try_into().unwrap()), 1 << 20);
            assert!(matches!(&events(&mut c)[..], [ServerEvent::Negotiated(_)]));
        }
        let mut c = started(1);
        assert!(matches!(
            c.handle_input(&encode_option(OPT_EXPORT_NAME, b"nope")),
            Err(ProtoError::UnknownExport { .. })
        ));
    }

    #[test]
    fn go_replies_info_and_block_size() {
        let mut c = started(1);
        c.handle_input(&encode_option(
            OPT_GO,
            &go_data("", &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION, 99]),
        ))
        .unwrap();
        let r = parse_option_replies(&drain(&mut c));
        assert_eq!(r.len(), 5);
        let mut export = INFO_EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&(1u64 << 20).to_be_bytes());
        export.extend_from_slice(&exports()[0].transmission_flags(false).to_be_bytes());
        assert_eq!(r[0], (OPT_GO, REP_INFO, export));
        assert_eq!(&r[1].2[..2], &INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(&r[1].2[10..14], &MAX_PAYLOAD_LEN.to_be_bytes());
        assert_eq!(&r[2].2[2..], b"disk");
        assert_eq!(&r[3].2[2..], b"test disk");
        assert_eq!(r[4].1, REP_ACK);
        let ev = events(&mut c);
        assert!(matches!(
            &ev[..],
            [ServerEvent::Negotiated(Negotiated {
                structured_replies: false,
                base_allocation: false,
                ..
            })]
        ));
    }

    #[test]
    fn info_unknown_export_and_bad_data_are_answered() {
        let mut c = started(1);
        let mut input = encode_option(OPT_INFO, &go_data("missing", &[]));
        input.extend(encode_option(OPT_INFO, &[0, 0, 0, 9, b'x']));
        input.extend(encode_option(OPT_SET_META_CONTEXT, &meta_data("disk", &[])));
        input.extend(encode_option(OPT_STRUCTURED_REPLY, &[1]));
        c.handle_input(&input).unwrap();
        let kinds: Vec<u32> = parse_option_replies(&drain(&mut c))
            .iter()
            .map(|r| r.1)
            .collect();
        assert_eq!(
            kinds,
            vec![
                REP_ERR_UNKNOWN,
                REP_ERR_INVALID,
                REP_ERR_INVALID,
                REP_ERR_INVALID
            ]
        );
        assert!(!c.is_closed());
    }

    #[test]
    fn meta_context_for_another_export_is_not_selected() {
        let mut c = started(1);
        let mut input = encode_option(OPT_STRUCTURED_REPLY, &[]);
        input.extend(encode_option(
            OPT_LIST_META_CONTEXT,
            &meta_data("disk", &["base:"]),
        ));
        input.extend(encode_option(
            OPT_SET_META_CONTEXT,
            &meta_data("other", &[BASE_ALLOCATION, "qemu:dirty-bitmap:x"]),
        ));
        input.extend(encode_option(OPT_GO, &go_data("disk", &[])));
        c.handle_input(&input).unwrap();
        let r = parse_option_replies(&drain(&mut c));
        let mut list_ctx = 0u32.to_be_bytes().to_vec();
        list_ctx.extend_from_slice(BASE_ALLOCATION.as_bytes());
        assert_eq!(r[1], (OPT_LIST_META_CONTEXT, REP_META_CONTEXT, list_ctx));
        assert_eq!(
            (r[3].1, &r[3].2[..4]),
            (REP_META_CONTEXT, &BASE_ALLOCATION_ID.to_be_bytes()[..])
        );
        let ev = events(&mut c);
        assert!(matches!(
            &ev[..],
            [ServerEvent::Negotiated(Negotiated {
                base_allocation: false,
                ..
            })]
        ));
        // BLOCK_STATUS is refused with a structured error.
        c.handle_input(&encode_request(0, CMD_BLOCK_STATUS, 9, 0, 512))
            .unwrap();
        let out = drain(&mut c);
        assert_eq!(&out[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&out[20..24], &22u32.to_be_bytes());
    }

    #[test]
    fn simple_read_expands_holes() {
        let mut c = started(1);
        c.handle_input(&encode_option(OPT_GO, &go_data("disk", &[])))
            .unwrap();
        drain(&mut c);
        events(&mut c);
        c.handle_input(&encode_request(0, CMD_READ, 42, 4096, 12))
            .unwrap();
        let ev = events(&mut c);
        let [ServerEvent::Request(req)] = &ev[..] else {
            panic!("{ev:?}")
        };
        assert_eq!(
            req.command,
            Command::Read {
                offset: 4096,
                length: 12,
                df: false
            }
        );
        c.handle_reply(
            req,
            Reply::Read(vec![
                ReadChunk::Data(Bytes::from_static(b"abcd")),
                ReadChunk::Hole(8),
            ]),
        );
        let out = drain(&mut c);
        assert_eq!(&out[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[4..8], &[0; 4]);
        assert_eq!(&out[8..16], &42u64.to_be_bytes());
        assert_eq!(&out[16..], b"abcd\0\0\0\0\0\0\0\0");
        // A reply of the wrong length becomes EIO.
        c.handle_reply(req, Reply::Read(vec![ReadChunk::Hole(3)]));
        let out = drain(&mut c);
        assert_eq!(out.len(), 16);
        assert_eq!(&out[4..8], &5u32.to_be_bytes());
    }

    #[test]
    fn structured_read_sends_hole_chunks_and_df_coalesces() {
        let mut c = negotiated_structured();
        c.handle_input(&encode_request(0, CMD_READ, 1, 100, 12))
            .unwrap();
        c.handle_input(&encode_request(CMD_FLAG_DF, CMD_READ, 2, 100, 12))
            .unwrap();
        let ev = events(&mut c);
        assert_eq!(ev.len(), 2);
        let chunks = vec![
            ReadChunk::Data(Bytes::from_static(b"abcd")),
            ReadChunk::Hole(8),
        ];
        for e in &ev {
            let ServerEvent::Request(r) = e else { panic!() };
            c.handle_reply(r, Reply::Read(chunks.clone()));
        }
        let out = drain(&mut c);
        // cookie 1: OFFSET_DATA(100, "abcd") then OFFSET_HOLE(104, 8) + DONE.
        assert_eq!(&out[4..6], &0u16.to_be_bytes());
        assert_eq!(&out[6..8], &REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&out[16..20], &12u32.to_be_bytes());
        assert_eq!(&out[20..28], &100u64.to_be_bytes());
        assert_eq!(&out[28..32], b"abcd");
        let hole = &out[32..];
        assert_eq!(&hole[4..6], &REPLY_FLAG_DONE_BE);
        assert_eq!(&hole[6..8], &REPLY_TYPE_OFFSET_HOLE.to_be_bytes());
        assert_eq!(&hole[20..28], &104u64.to_be_bytes());
        assert_eq!(&hole[28..32], &8u32.to_be_bytes());
        // cookie 2 (DF): one OFFSET_DATA chunk of 12 bytes, DONE.
        let df = &hole[32..];
        assert_eq!(&df[4..6], &REPLY_FLAG_DONE_BE);
        assert_eq!(&df[8..16], &2u64.to_be_bytes());
        assert_eq!(&df[16..20], &20u32.to_be_bytes());
        assert_eq!(&df[28..], b"abcd\0\0\0\0\0\0\0\0");
    }

    const REPLY_FLAG_DONE_BE: [u8; 2] = super::super::REPLY_FLAG_DONE.to_be_bytes();

    #[test]
    fn block_status_is_clamped_and_req_one_honoured() {
        let mut c = negotiated_structured();
        c.handle_input(&encode_request(
            CMD_FLAG_REQ_ONE_,
            CMD_BLOCK_STATUS,
            5,
            0,
            1000,
        ))
        .unwrap();
        let ev = events(&mut c);
        let [ServerEvent::Request(r)] = &ev[..] else {
            panic!()
        };
        c.handle_reply(
            r,
            Reply::BlockStatus(vec![
                Extent {
                    length: 0,
                    flags: 0,
                },
                Extent {
                    length: 4096,
                    flags: STATE_HOLE | STATE_ZERO,
                },
                Extent {
                    length: 4096,
                    flags: 0,
                },
            ]),
        );
        let out = drain(&mut c);
        assert_eq!(
            &out[6..8],
            &super::super::REPLY_TYPE_BLOCK_STATUS.to_be_bytes()
        );
        assert_eq!(&out[16..20], &12u32.to_be_bytes());
        assert_eq!(&out[20..24], &BASE_ALLOCATION_ID.to_be_bytes());
        assert_eq!(&out[24..28], &1000u32.to_be_bytes());
        assert_eq!(&out[28..32], &3u32.to_be_bytes());
    }

    const CMD_FLAG_REQ_ONE_: u16 = super::super::CMD_FLAG_REQ_ONE;

    #[test]
    fn bad_request_magic_is_fatal_and_disc_closes() {
        let mut c = negotiated_structured();
        assert!(matches!(
            c.handle_input(&[0x12, 0x56, 0x09, 0x53]),
            Err(ProtoError::BadRequestMagic { .. })
        ));
        let mut c = negotiated_structured();
        let mut input = encode_request(0, CMD_DISC, 0, 0, 0).to_vec();
        input.extend(encode_request(0, CMD_READ, 1, 0, 1));
        c.handle_input(&input).unwrap();
        assert_eq!(events(&mut c), vec![ServerEvent::Disconnect]);
        assert!(c.is_closed());
    }

    /// A valid client exchange: handshake, then writes, reads and flushes.
    fn exchange(structured: bool, writes: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut v = 3u32.to_be_bytes().to_vec();
        v.extend(encode_option(0x77, b"junk"));
        if structured {
            v.extend(encode_option(OPT_STRUCTURED_REPLY, &[]));
            v.extend(encode_option(
                OPT_SET_META_CONTEXT,
                &meta_data("disk", &[BASE_ALLOCATION]),
            ));
        }
        v.extend(encode_option(
            OPT_INFO,
            &go_data("disk", &[INFO_BLOCK_SIZE]),
        ));
        v.extend(encode_option(OPT_GO, &go_data("disk", &[])));
        for (i, (off, data)) in writes.iter().enumerate() {
            let off = u64::from(*off);
            v.extend(encode_request(
                0,
                CMD_WRITE,
                i as u64,
                off,
                data.len() as u32,
            ));
            v.extend_from_slice(data);
            v.extend(encode_request(
                0,
                CMD_READ,
                1000 + i as u64,
                off,
                data.len() as u32,
            ));
            if structured {
                v.extend(encode_request(
                    0,
                    CMD_BLOCK_STATUS,
                    2000 + i as u64,
                    off,
                    512,
                ));
            }
        }
        v.extend(encode_request(0, CMD_DISC, 0, 0, 0));
        v
    }

    /// Feed `input` in pieces cut at `cuts`, answering requests against an
    /// in-memory disk; return all events and all output bytes.
    fn run(input: &[u8], cuts: &[usize]) -> (Vec<ServerEvent>, Vec<u8>, Option<ProtoError>) {
        let disk = crate::export::MemExport::new(1 << 20, false);
        let mut c = ServerConnection::new(exports());
        let mut evs = Vec::new();
        let mut out = drain(&mut c);
        let mut cuts: Vec<usize> = cuts.iter().map(|&x| x % (input.len() + 1)).collect();
        cuts.push(0);
        cuts.push(input.len());
        cuts.sort_unstable();
        let mut err = None;
        for w in cuts.windows(2) {
            if let Err(e) = c.handle_input(&input[w[0]..w[1]]) {
                err = Some(e);
                break;
            }
            while let Some(ev) = c.poll_event() {
                if let ServerEvent::Request(r) = &ev {
                    let reply = crate::export::execute(&disk, &r.command);
                    c.handle_reply(r, reply);
                }
                evs.push(ev);
            }
            out.extend(drain(&mut c));
        }
        (evs, out, err)
    }

    proptest! {
        #[test]
        fn chunking_does_not_change_events_or_output(
            structured in any::<bool>(),
            writes in proptest::collection::vec(
                (0u16..60000, proptest::collection::vec(any::<u8>(), 0..300)),
                0..6,
            ),
            cuts in proptest::collection::vec(any::<usize>(), 0..40),
        ) {
            let input = exchange(structured, &writes);
            let (ev_whole, out_whole, err_whole) = run(&input, &[]);
            prop_assert!(err_whole.is_none());
            prop_assert_eq!(ev_whole.last(), Some(&ServerEvent::Disconnect));
            let (ev, out, err) = run(&input, &cuts);
            prop_assert_eq!(ev, ev_whole);
            prop_assert_eq!(out, out_whole);
            prop_assert_eq!(err, err_whole);
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut input = 1u32.to_be_bytes().to_vec();
            input.extend(encode_option(OPT_GO, &go_data("disk", &[])));
            input.extend(data);
            let _ = run(&input, &[7, 100]);
        }
    }
}
