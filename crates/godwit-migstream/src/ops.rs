//! The agents' page-aware messages, carried in `Codec` frames.
//!
//! ```text
//! source → destination
//!   BATCH  u8 type=1, u8 codec, varint raw_len, compressed ops
//!   FILL   u8 type=2, varint ref_seq, 4096 page bytes        (answer to NEED)
//! destination → source
//!   SUMMARY u8 type=3, u8 kind, u8 probes, varint total, varint offset, bytes
//!   NEED    u8 type=4, varint ref_seq                        (unresolvable REF)
//!
//! ops (inside a decompressed BATCH), each: u8 op, fields
//!   RAW   varint len, bytes                  stream bytes carried verbatim
//!   BLOCK varint id, u8 len, name            names block `id` (ids in order)
//!   ZERO  hdr, u8 fill                       one zero-page record
//!   ZRUN  hdr, varint n                      n ≥ 2 zero records: the first as
//!                                            hdr, the rest CONTINUE at the
//!                                            following pages, fill 0
//!   LIT   hdr, 4096 bytes                    a page record with its bytes
//!   REF   hdr, u8 origin, 32-byte BLAKE3     a page the destination holds
//!   DELTA hdr, varint len, bytes             a page as a delta against the
//!                                            version last sent at (block, offset)
//!   hdr = u8 named (0/1), varint block id, varint page index
//! ```
//! Every REF, in stream order, has a sequence number (0, 1, …) that NEED
//! and FILL name. Decoding is strict: anything malformed is an error that
//! aborts the migration (the destination QEMU never sees a guessed byte).

use bytes::{BufMut, Bytes};

use crate::compress::Codec;
use crate::hash::PageHash;
use crate::qemu::PAGE_SIZE;
use crate::varint::{self, Reader};
use crate::CodecError;

/// Largest decompressed batch accepted (the encoder makes ~256 KiB ones).
pub const MAX_BATCH_RAW: usize = 4 << 20;
/// Highest block id a peer may name (as the parser's block bound).
pub const MAX_BLOCK_ID: u64 = crate::parser::MAX_BLOCKS as u64 - 1;
/// Highest page index (a 2^52-byte block).
pub const MAX_PAGE_INDEX: u64 = 1 << 40;

/// Message types.
pub mod msg {
    /// A batch of ops.
    pub const BATCH: u8 = 1;
    /// A page answering a NEED.
    pub const FILL: u8 = 2;
    /// A chunk of a Bloom summary.
    pub const SUMMARY: u8 = 3;
    /// A REF the destination cannot resolve.
    pub const NEED: u8 = 4;
}

/// Op codes.
pub mod op {
    /// Verbatim bytes.
    pub const RAW: u8 = 1;
    /// Block name.
    pub const BLOCK: u8 = 2;
    /// One zero record.
    pub const ZERO: u8 = 3;
    /// A run of zero records.
    pub const ZRUN: u8 = 4;
    /// A literal page.
    pub const LIT: u8 = 5;
    /// A page by reference.
    pub const REF: u8 = 6;
    /// A page as a delta.
    pub const DELTA: u8 = 7;
}

/// Where the source expects the destination to find a referenced page;
/// counted separately in reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Origin {
    /// Sent earlier in this migration.
    Intra = 0,
    /// In the destination site's content store.
    Store = 1,
    /// In this VM's earlier image at the destination.
    Image = 2,
    /// In the guest's disk blocks at the destination.
    Disk = 3,
}

impl Origin {
    /// All origins.
    pub const ALL: [Origin; 4] = [Origin::Intra, Origin::Store, Origin::Image, Origin::Disk];

    /// From its wire byte.
    pub fn from_u8(b: u8) -> Result<Self, CodecError> {
        Origin::ALL
            .get(b as usize)
            .copied()
            .ok_or(CodecError::Malformed("unknown reference origin"))
    }
}

/// Summary kinds: what a Bloom filter describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SummaryKind {
    /// Everything in the site store.
    Store = 1,
    /// The migrating VM's earlier image.
    Image = 2,
    /// The guest's disk blocks.
    Disk = 3,
}

impl SummaryKind {
    /// From its wire byte.
    pub fn from_u8(b: u8) -> Result<Self, CodecError> {
        match b {
            1 => Ok(SummaryKind::Store),
            2 => Ok(SummaryKind::Image),
            3 => Ok(SummaryKind::Disk),
            _ => Err(CodecError::Malformed("unknown summary kind")),
        }
    }

    /// The origin a hit in this summary counts as.
    pub fn origin(self) -> Origin {
        match self {
            SummaryKind::Store => Origin::Store,
            SummaryKind::Image => Origin::Image,
            SummaryKind::Disk => Origin::Disk,
        }
    }
}

/// A page record's header as the ops carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hdr {
    /// The record carried its block's idstr.
    pub named: bool,
    /// Block id.
    pub block: u16,
    /// Page index in the block.
    pub page: u64,
}

/// One decoded op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Verbatim bytes.
    Raw(Bytes),
    /// Block `id` is called `name`.
    Block(u16, Bytes),
    /// One zero record.
    Zero(Hdr, u8),
    /// `n` zero records from `hdr` on.
    ZeroRun(Hdr, u64),
    /// A literal page.
    Lit(Hdr, Bytes),
    /// A page by reference.
    Ref(Hdr, Origin, PageHash),
    /// A page as a delta against the last version of (block, page).
    Delta(Hdr, Bytes),
}

fn put_hdr(out: &mut Vec<u8>, h: Hdr) {
    out.put_u8(h.named as u8);
    varint::put(out, u64::from(h.block));
    varint::put(out, h.page);
}

fn read_hdr(r: &mut Reader<'_>) -> Result<Hdr, CodecError> {
    let named = match r.u8()? {
        0 => false,
        1 => true,
        _ => return Err(CodecError::Malformed("named flag")),
    };
    let block = r.varint_max(MAX_BLOCK_ID, "block id")? as u16;
    let page = r.varint_max(MAX_PAGE_INDEX, "page index")?;
    Ok(Hdr { named, block, page })
}

/// Appends `op` to a batch under construction.
pub fn put_op(out: &mut Vec<u8>, o: &Op) {
    match o {
        Op::Raw(b) => {
            out.put_u8(op::RAW);
            varint::put(out, b.len() as u64);
            out.put_slice(b);
        }
        Op::Block(id, name) => {
            out.put_u8(op::BLOCK);
            varint::put(out, u64::from(*id));
            out.put_u8(name.len() as u8);
            out.put_slice(name);
        }
        Op::Zero(h, fill) => {
            out.put_u8(op::ZERO);
            put_hdr(out, *h);
            out.put_u8(*fill);
        }
        Op::ZeroRun(h, n) => {
            out.put_u8(op::ZRUN);
            put_hdr(out, *h);
            varint::put(out, *n);
        }
        Op::Lit(h, page) => {
            out.put_u8(op::LIT);
            put_hdr(out, *h);
            out.put_slice(page);
        }
        Op::Ref(h, origin, hash) => {
            out.put_u8(op::REF);
            put_hdr(out, *h);
            out.put_u8(*origin as u8);
            out.put_slice(&hash.0);
        }
        Op::Delta(h, d) => {
            out.put_u8(op::DELTA);
            put_hdr(out, *h);
            varint::put(out, d.len() as u64);
            out.put_slice(d);
        }
    }
}

/// Decodes every op of a decompressed batch.
pub fn read_ops(batch: &Bytes) -> Result<Vec<Op>, CodecError> {
    let mut r = Reader::new(batch);
    let mut ops = Vec::new();
    while r.remaining() > 0 {
        let o = match r.u8()? {
            op::RAW => {
                let n = r.varint_max(MAX_BATCH_RAW as u64, "raw length")? as usize;
                Op::Raw(r.bytes_of(batch, n)?)
            }
            op::BLOCK => {
                let id = r.varint_max(MAX_BLOCK_ID, "block id")? as u16;
                let n = r.u8()? as usize;
                if n == 0 {
                    return Err(CodecError::Malformed("empty block name"));
                }
                Op::Block(id, r.bytes_of(batch, n)?)
            }
            op::ZERO => {
                let h = read_hdr(&mut r)?;
                Op::Zero(h, r.u8()?)
            }
            op::ZRUN => {
                let h = read_hdr(&mut r)?;
                let n = r.varint_max(MAX_PAGE_INDEX, "zero run length")?;
                if n < 2 || h.page.checked_add(n).is_none_or(|end| end > MAX_PAGE_INDEX) {
                    return Err(CodecError::Malformed("zero run length"));
                }
                Op::ZeroRun(h, n)
            }
            op::LIT => {
                let h = read_hdr(&mut r)?;
                Op::Lit(h, r.bytes_of(batch, PAGE_SIZE)?)
            }
            op::REF => {
                let h = read_hdr(&mut r)?;
                let origin = Origin::from_u8(r.u8()?)?;
                Op::Ref(h, origin, PageHash(r.array()?))
            }
            op::DELTA => {
                let h = read_hdr(&mut r)?;
                let n = r.varint_max(2 * PAGE_SIZE as u64, "delta length")? as usize;
                Op::Delta(h, r.bytes_of(batch, n)?)
            }
            _ => return Err(CodecError::Malformed("unknown op")),
        };
        ops.push(o);
    }
    Ok(ops)
}

/// A message between the agents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Ops, compressed with `codec`, `raw_len` bytes once decompressed.
    Batch {
        /// Codec.
        codec: Codec,
        /// Decompressed length.
        raw_len: usize,
        /// Compressed ops.
        data: Bytes,
    },
    /// The page of REF number `seq`.
    Fill {
        /// REF sequence number.
        seq: u64,
        /// The page.
        page: Bytes,
    },
    /// A chunk of a Bloom filter of `total` bytes.
    Summary {
        /// What it summarises.
        kind: SummaryKind,
        /// Probes per lookup.
        probes: u8,
        /// The whole filter's size.
        total: u64,
        /// Where this chunk goes.
        offset: u64,
        /// The chunk.
        bytes: Bytes,
    },
    /// REF number `seq` cannot be resolved; send its page.
    Need {
        /// REF sequence number.
        seq: u64,
    },
}

impl Message {
    /// Encodes the message as a frame payload.
    pub fn encode(&self) -> Bytes {
        let mut out = Vec::new();
        match self {
            Message::Batch {
                codec,
                raw_len,
                data,
            } => {
                out.reserve(12 + data.len());
                out.put_u8(msg::BATCH);
                out.put_u8(*codec as u8);
                varint::put(&mut out, *raw_len as u64);
                out.put_slice(data);
            }
            Message::Fill { seq, page } => {
                out.put_u8(msg::FILL);
                varint::put(&mut out, *seq);
                out.put_slice(page);
            }
            Message::Summary {
                kind,
                probes,
                total,
                offset,
                bytes,
            } => {
                out.put_u8(msg::SUMMARY);
                out.put_u8(*kind as u8);
                out.put_u8(*probes);
                varint::put(&mut out, *total);
                varint::put(&mut out, *offset);
                out.put_slice(bytes);
            }
            Message::Need { seq } => {
                out.put_u8(msg::NEED);
                varint::put(&mut out, *seq);
            }
        }
        Bytes::from(out)
    }

    /// Decodes a frame payload.
    pub fn decode(b: &Bytes) -> Result<Message, CodecError> {
        let mut r = Reader::new(b);
        let m = match r.u8()? {
            msg::BATCH => {
                let codec = Codec::from_u8(r.u8()?)?;
                let raw_len = r.varint_max(MAX_BATCH_RAW as u64, "batch length")? as usize;
                let n = r.remaining();
                Message::Batch {
                    codec,
                    raw_len,
                    data: r.bytes_of(b, n)?,
                }
            }
            msg::FILL => {
                let seq = r.varint()?;
                if r.remaining() != PAGE_SIZE {
                    return Err(CodecError::Malformed("fill is not one page"));
                }
                Message::Fill {
                    seq,
                    page: r.bytes_of(b, PAGE_SIZE)?,
                }
            }
            msg::SUMMARY => {
                let kind = SummaryKind::from_u8(r.u8()?)?;
                let probes = r.u8()?;
                let total = r.varint_max(crate::bloom::MAX_BYTES, "summary size")?;
                let offset = r.varint()?;
                let n = r.remaining();
                if offset.checked_add(n as u64).is_none_or(|e| e > total) {
                    return Err(CodecError::Malformed("summary chunk beyond its size"));
                }
                Message::Summary {
                    kind,
                    probes,
                    total,
                    offset,
                    bytes: r.bytes_of(b, n)?,
                }
            }
            msg::NEED => {
                let seq = r.varint()?;
                if r.remaining() != 0 {
                    return Err(CodecError::Malformed("trailing bytes after need"));
                }
                Message::Need { seq }
            }
            _ => return Err(CodecError::Malformed("unknown message type")),
        };
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ops_roundtrip() {
        let h = Hdr {
            named: true,
            block: 3,
            page: 77,
        };
        let ops = vec![
            Op::Raw(Bytes::from_static(b"QEVM")),
            Op::Block(3, Bytes::from_static(b"pc.ram")),
            Op::Zero(h, 0),
            Op::ZeroRun(Hdr { named: false, ..h }, 1000),
            Op::Lit(h, Bytes::from(vec![9u8; PAGE_SIZE])),
            Op::Ref(h, Origin::Image, PageHash([4; 32])),
            Op::Delta(h, Bytes::from_static(&[1, 2, 3])),
        ];
        let mut b = Vec::new();
        for o in &ops {
            put_op(&mut b, o);
        }
        assert_eq!(read_ops(&Bytes::from(b)).unwrap(), ops);
    }

    #[test]
    fn messages_roundtrip() {
        for m in [
            Message::Batch {
                codec: Codec::Zstd,
                raw_len: 5,
                data: Bytes::from_static(b"xyz"),
            },
            Message::Fill {
                seq: 9,
                page: Bytes::from(vec![1u8; PAGE_SIZE]),
            },
            Message::Summary {
                kind: SummaryKind::Disk,
                probes: 10,
                total: 100,
                offset: 96,
                bytes: Bytes::from_static(b"abcd"),
            },
            Message::Need { seq: 12345 },
        ] {
            assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }
    }

    proptest! {
        #[test]
        fn decoders_never_panic(b: Vec<u8>) {
            let b = Bytes::from(b);
            let _ = read_ops(&b);
            let _ = Message::decode(&b);
        }
    }
}
