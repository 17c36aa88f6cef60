//! Re-emits parsed events as QEMU wrote them.
//!
//! The inverse of [`crate::parser`]: a page record's bytes are fully
//! determined by its block name, offset, CONTINUE choice and body, so the
//! destination agent rebuilds them exactly instead of carrying them.

use bytes::{BufMut, BytesMut};

use crate::parser::{PageBody, PageRecord};
use crate::qemu::ram;

/// Appends the record's bytes; `block_name` is the idstr of `rec.block`.
pub fn page(rec: &PageRecord, block_name: &[u8], out: &mut BytesMut) {
    let mut flags = match rec.body {
        PageBody::Zero(_) => ram::ZERO,
        PageBody::Data(_) => ram::PAGE,
    };
    if !rec.named {
        flags |= ram::CONTINUE;
    }
    out.put_u64(rec.offset | flags);
    if rec.named {
        // Block names come from the parser, which only accepts u8 lengths.
        out.put_u8(block_name.len() as u8);
        out.put_slice(block_name);
    }
    match &rec.body {
        PageBody::Zero(fill) => out.put_u8(*fill),
        PageBody::Data(d) => out.put_slice(d),
    }
}

/// Bytes [`page`] appends for a record.
pub fn page_len(rec: &PageRecord, block_name: &[u8]) -> usize {
    8 + if rec.named { 1 + block_name.len() } else { 0 }
        + match &rec.body {
            PageBody::Zero(_) => 1,
            PageBody::Data(d) => d.len(),
        }
}
