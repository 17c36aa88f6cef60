//! The sans-IO NBD protocol core: constants from the specification, the
//! server side of the fixed-newstyle handshake and the transmission phase.
//!
//! Nothing here touches a socket, a file or a clock: [`ServerConnection`]
//! takes the client's bytes in arbitrary chunks and hands out events and
//! bytes to send. A shell (the tokio one in `server`, or a test) moves the
//! bytes and runs requests against a backend.
//!
//! # Wire format (all integers big-endian)
//!
//! | message | layout |
//! |---|---|
//! | server greeting | `NBDMAGIC`(8) `IHAVEOPT`(8) handshake-flags(2) |
//! | client flags | flags(4) |
//! | option | `IHAVEOPT`(8) option(4) length(4) data |
//! | option reply | `REP_MAGIC`(8) option(4) type(4) length(4) data |
//! | EXPORT_NAME reply | size(8) transmission-flags(2) zeros(124, unless NO_ZEROES) |
//! | request | `REQUEST_MAGIC`(4) flags(2) type(2) cookie(8) offset(8) length(4) \[payload\] |
//! | simple reply | `SIMPLE_REPLY_MAGIC`(4) error(4) cookie(8) \[data\] |
//! | structured chunk | `STRUCTURED_REPLY_MAGIC`(4) flags(2) type(2) cookie(8) length(4) payload |
//!
//! # Connection states
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> ClientFlags: greeting sent
//!     ClientFlags --> Options: fixed newstyle flags
//!     ClientFlags --> Closed: non-fixed client / unknown flags
//!     Options --> Options: INFO, LIST, STRUCTURED_REPLY, *_META_CONTEXT, unknown (ERR_UNSUP)
//!     Options --> Transmission: GO / EXPORT_NAME
//!     Options --> Closed: ABORT, malformed header
//!     Transmission --> Transmission: requests / replies
//!     Transmission --> Closed: DISC, bad magic, oversized payload
//! ```
//!
//! Any error returned by [`ServerConnection::handle_input`] means the
//! connection must be closed (after sending whatever
//! [`ServerConnection::poll_transmit`] still yields); it never panics on
//! peer input.

mod conn;
mod options;
mod reply;
mod request;

pub use conn::{Negotiated, ProtoError, ServerConnection, ServerEvent};
pub use reply::{Extent, ReadChunk, Reply};
pub use request::{encode_request, Command, Request};

/// Encode an option request (client side): for tests, fuzz seeds and tools.
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    // Test helper: callers pass small payloads; saturate rather than wrap.
    v.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// `"NBDMAGIC"`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `"IHAVEOPT"`: newstyle greeting magic and the magic of every option header.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Oldstyle `cliserv_magic`; never sent (oldstyle is not supported).
pub const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Magic of every option reply (fixed newstyle).
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a (compact) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended-header request (experimental, not negotiated here).
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server may omit the 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option: select an export and enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: upgrade to TLS (not supported: answered with ERR_UNSUP).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export, stay in negotiation.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: extended headers (experimental; answered with ERR_UNSUP).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: success, end of the reply.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a LIST.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of information for INFO/GO.
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31: the option reply is an error.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option error: option unknown or unsupported.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Option error: syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Option error: not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// Option error: TLS required.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Option error: server shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Option error: block size negotiation required.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Option error: the request or its reply is too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Info type: export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info type: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Info type: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: flags are present (always set).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: FLUSH is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: the FUA command flag is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: rotational medium (hint).
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: TRIM is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: WRITE_ZEROES (and NO_HOLE) is supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: the DF command flag is supported (structured replies only).
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: FLUSH/FUA on one connection cover all connections.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: CACHE is supported.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: the FAST_ZERO command flag is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (followed by `length` bytes of payload).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect (no reply).
pub const CMD_DISC: u16 = 2;
/// Command: flush to stable storage.
pub const CMD_FLUSH: u16 = 3;
/// Command: discard (hint).
pub const CMD_TRIM: u16 = 4;
/// Command: prefetch hint (not advertised).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status query.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: WRITE_ZEROES must not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: READ reply in one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: BLOCK_STATUS with exactly one extent.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: WRITE_ZEROES must fail fast if not faster than WRITE.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured chunk: no payload (final chunk).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured chunk: offset(8) data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured chunk: offset(8) hole-size(4), reads as zeros.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured chunk: context-id(4) {length(4) flags(4)}+.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured chunk: error(4) message-length(2) message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// `base:allocation` status: the extent is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` status: the extent reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;

/// Name of the only metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Context id handed out for `base:allocation`. Any value works; 0 is avoided
/// because some clients treat it as "unset" when debugging.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Longest option payload accepted into memory. Names are at most 4096 bytes
/// (spec) and the largest legitimate option (SET_META_CONTEXT with a few
/// queries) fits easily; longer options are skipped without buffering and
/// answered with `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest string (export name, context query) the spec allows.
pub const MAX_STRING_LEN: u32 = 4096;
/// Options accepted before the client must pick an export: bounds a client
/// that haggles forever.
pub const MAX_OPTIONS: u32 = 1024;
/// Largest READ/WRITE payload: 32 MiB, the spec's default maximum that every
/// interoperable client respects and the value advertised in INFO_BLOCK_SIZE.
pub const MAX_PAYLOAD_LEN: u32 = 32 * 1024 * 1024;
/// Preferred block size advertised in INFO_BLOCK_SIZE (the page size: raw
/// images on ext4/xfs allocate in 4 KiB blocks).
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Minimum block size advertised: 1, any alignment works (pread/pwrite).
pub const MIN_BLOCK_SIZE: u32 = 1;
/// Most extents in one BLOCK_STATUS chunk (the spec's SHOULD-limit is 2^20;
/// 64 Ki extents = 512 KiB of reply is plenty per round trip).
pub const MAX_EXTENTS: usize = 64 * 1024;
/// Longest error message put in a structured ERROR chunk.
pub const MAX_ERROR_MESSAGE_LEN: usize = 4096;
/// Size of the request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Size of the zero padding after an EXPORT_NAME reply without NO_ZEROES.
pub const EXPORT_NAME_PADDING: usize = 124;

/// NBD error values (the spec's errno subset) carried in replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum NbdErrno {
    /// Operation not permitted (write to a read-only export).
    Perm = 1,
    /// I/O error.
    Io = 5,
    /// Out of memory.
    NoMem = 12,
    /// Invalid argument (bad flags, out of range read/trim).
    Inval = 22,
    /// No space (write beyond the end).
    NoSpc = 28,
    /// Value too large (DF read too large).
    Overflow = 75,
    /// Operation not supported (FAST_ZERO not fast).
    NotSup = 95,
    /// Server shutting down.
    Shutdown = 108,
}

impl NbdErrno {
    /// The value on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// What the server tells clients about one export during negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name; clients asking for `""` get the first export.
    pub name: String,
    /// Optional human-readable description (INFO_DESCRIPTION, LIST).
    pub description: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// Refuse WRITE, TRIM and WRITE_ZEROES with EPERM.
    pub read_only: bool,
    /// WRITE_ZEROES is faster than WRITE (hole punching works), so the
    /// FAST_ZERO flag is advertised.
    pub fast_zero: bool,
}

impl ExportInfo {
    /// Transmission flags for this export. `structured` is whether the client
    /// negotiated structured replies (DF is only meaningful with them).
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES
            // One file, one page cache: fdatasync from any connection covers
            // writes made through all of them.
            | FLAG_CAN_MULTI_CONN;
        if self.read_only {
            flags |= FLAG_READ_ONLY;
        }
        if structured {
            flags |= FLAG_SEND_DF;
        }
        if self.fast_zero {
            flags |= FLAG_SEND_FAST_ZERO;
        }
        flags
    }
}
