//! Reply encoding: option replies in negotiation, simple and structured
//! replies in transmission. Encoders append [`Bytes`] pieces to an output
//! queue so READ payloads are never copied.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes, BytesMut};

use super::{
    NbdErrno, MAX_ERROR_MESSAGE_LEN, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR,
    REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REP_MAGIC, SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
};

/// One piece of a READ reply, in order from the request's offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadChunk {
    /// Bytes read from the backend.
    Data(Bytes),
    /// This many bytes that read as zeros (a hole in a sparse image). Sent
    /// as `NBD_REPLY_TYPE_OFFSET_HOLE` with structured replies, as zeros
    /// otherwise.
    Hole(u32),
}

impl ReadChunk {
    /// Length in bytes covered by the chunk.
    pub fn len(&self) -> u64 {
        match self {
            ReadChunk::Data(b) => b.len() as u64,
            ReadChunk::Hole(n) => u64::from(*n),
        }
    }

    /// Whether the chunk covers no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One `base:allocation` extent of a BLOCK_STATUS reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (non-zero).
    pub length: u32,
    /// [`STATE_HOLE`](super::STATE_HOLE) | [`STATE_ZERO`](super::STATE_ZERO), or 0 for data.
    pub flags: u32,
}

/// The backend's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Success without data (WRITE, FLUSH, TRIM, WRITE_ZEROES).
    Ok,
    /// Failure.
    Error(NbdErrno),
    /// READ data: chunks covering exactly the requested range.
    Read(Vec<ReadChunk>),
    /// BLOCK_STATUS extents starting at the request's offset.
    BlockStatus(Vec<Extent>),
}

/// Zeros used to expand holes for simple replies without allocating.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

pub(crate) fn option_reply(out: &mut VecDeque<Bytes>, option: u32, kind: u32, data: &[u8]) {
    let mut b = BytesMut::with_capacity(20 + data.len());
    b.put_u64(REP_MAGIC);
    b.put_u32(option);
    b.put_u32(kind);
    // Every option reply payload we build is far below 4 GiB (names are
    // bounded by MAX_STRING_LEN and the export list by the caller).
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    out.push_back(b.freeze());
}

pub(crate) fn simple_reply(out: &mut VecDeque<Bytes>, cookie: u64, error: u32) {
    let mut b = BytesMut::with_capacity(16);
    b.put_u32(SIMPLE_REPLY_MAGIC);
    b.put_u32(error);
    b.put_u64(cookie);
    out.push_back(b.freeze());
}

fn chunk_header(b: &mut BytesMut, flags: u16, kind: u16, cookie: u64, length: u32) {
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(flags);
    b.put_u16(kind);
    b.put_u64(cookie);
    b.put_u32(length);
}

pub(crate) fn structured_none(out: &mut VecDeque<Bytes>, cookie: u64) {
    let mut b = BytesMut::with_capacity(20);
    chunk_header(&mut b, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
    out.push_back(b.freeze());
}

pub(crate) fn structured_error(out: &mut VecDeque<Bytes>, cookie: u64, err: NbdErrno, msg: &str) {
    let msg = &msg.as_bytes()[..msg.len().min(MAX_ERROR_MESSAGE_LEN)];
    let mut b = BytesMut::with_capacity(26 + msg.len());
    // msg is at most MAX_ERROR_MESSAGE_LEN (4096) bytes: both casts fit.
    chunk_header(
        &mut b,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    );
    b.put_u32(err.code());
    b.put_u16(msg.len() as u16);
    b.put_slice(msg);
    out.push_back(b.freeze());
}

/// A structured READ reply: OFFSET_DATA / OFFSET_HOLE chunks, the last one
/// flagged DONE. `chunks` must be non-empty and cover at most
/// `MAX_PAYLOAD_LEN` bytes (checked by the caller).
pub(crate) fn structured_read(
    out: &mut VecDeque<Bytes>,
    cookie: u64,
    mut offset: u64,
    chunks: Vec<ReadChunk>,
) {
    let last = chunks.len().saturating_sub(1);
    for (i, chunk) in chunks.into_iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        let mut b = BytesMut::with_capacity(32);
        let len = chunk.len();
        match chunk {
            ReadChunk::Data(data) => {
                // Caller bounded the total by MAX_PAYLOAD_LEN (32 MiB).
                chunk_header(
                    &mut b,
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    cookie,
                    8 + data.len() as u32,
                );
                b.put_u64(offset);
                out.push_back(b.freeze());
                out.push_back(data);
            }
            ReadChunk::Hole(n) => {
                chunk_header(&mut b, flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12);
                b.put_u64(offset);
                b.put_u32(n);
                out.push_back(b.freeze());
            }
        }
        offset += len;
    }
}

/// A simple READ reply: header then the data, holes expanded to zeros.
pub(crate) fn simple_read(out: &mut VecDeque<Bytes>, cookie: u64, chunks: Vec<ReadChunk>) {
    simple_reply(out, cookie, 0);
    for chunk in chunks {
        match chunk {
            ReadChunk::Data(d) => out.push_back(d),
            ReadChunk::Hole(n) => push_zeros(out, n as usize),
        }
    }
}

/// `n` zero bytes as one contiguous piece (DF reads and simple replies).
pub(crate) fn push_zeros(out: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let k = n.min(ZEROS.len());
        out.push_back(Bytes::from_static(&ZEROS[..k]));
        n -= k;
    }
}

pub(crate) fn structured_block_status(
    out: &mut VecDeque<Bytes>,
    cookie: u64,
    context_id: u32,
    extents: &[Extent],
) {
    let mut b = BytesMut::with_capacity(24 + 8 * extents.len());
    // The caller capped `extents` at MAX_EXTENTS (64 Ki), so this fits.
    chunk_header(
        &mut b,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        4 + 8 * extents.len() as u32,
    );
    b.put_u32(context_id);
    for e in extents {
        b.put_u32(e.length);
        b.put_u32(e.flags);
    }
    out.push_back(b.freeze());
}
