//! Synthetic QEMU 7.2 precopy streams, for tests and benchmarks of the
//! codec: a real header, configuration and return-path commands, a RAM
//! START section with a block list (`pc.ram` 64 MiB, `pc.bios` 256 KiB),
//! PART/END sections of page records in any order and a device tail. The
//! layout follows `shared/reference/qemu-migration-stream.md`; the
//! capture test checks the parser against real QEMU streams too.

use bytes::BufMut;

use crate::qemu::PAGE_SIZE;

/// RAM blocks of the synthetic stream: name and size.
pub const BLOCKS: [(&[u8], u64); 2] = [(b"pc.ram", 64 << 20), (b"pc.bios", 256 << 10)];

/// A page record: block index into [`BLOCKS`], page number, whether the
/// block is named (QEMU names it when it changes), and the body: one byte
/// (a zero page's fill) or a whole page.
pub type Record = (u8, u64, bool, Vec<u8>);

/// Builds a stream section by section.
#[derive(Debug)]
pub struct StreamBuilder {
    out: Vec<u8>,
    last_block: Option<u8>,
}

impl Default for StreamBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamBuilder {
    /// Header, configuration, commands and the RAM START section.
    pub fn new() -> Self {
        let mut out = Vec::new();
        out.put_u32(0x5145_564d);
        out.put_u32(3);
        out.put_u8(0x07);
        out.put_u32(13);
        out.put_slice(b"pc-i440fx-7.2");
        // OPEN_RETURN_PATH, PING(1)
        out.put_slice(&[0x08, 0, 1, 0, 0]);
        out.put_slice(&[0x08, 0, 2, 0, 4, 0, 0, 0, 1]);
        // START ram, id 2
        out.put_u8(0x01);
        out.put_u32(2);
        out.put_u8(3);
        out.put_slice(b"ram");
        out.put_u32(0);
        out.put_u32(4);
        let total: u64 = BLOCKS.iter().map(|b| b.1).sum();
        out.put_u64(total | 0x004);
        for (n, l) in BLOCKS {
            out.put_u8(n.len() as u8);
            out.put_slice(n);
            out.put_u64(l);
        }
        out.put_u64(0x010);
        out.put_u8(0x7e);
        out.put_u32(2);
        StreamBuilder {
            out,
            last_block: None,
        }
    }

    /// A PART (or, with `end`, END) section of `records`.
    pub fn section(&mut self, end: bool, records: &[Record]) {
        self.out.put_u8(if end { 0x03 } else { 0x02 });
        self.out.put_u32(2);
        for (block, page, named, body) in records {
            let name = BLOCKS[*block as usize].0;
            let zero = body.len() == 1;
            let mut w = (page * PAGE_SIZE as u64) | if zero { 0x002 } else { 0x008 };
            if !named {
                w |= 0x020;
            }
            self.out.put_u64(w);
            if *named {
                self.out.put_u8(name.len() as u8);
                self.out.put_slice(name);
            }
            self.out.put_slice(body);
        }
        self.out.put_u64(0x010);
        self.out.put_u8(0x7e);
        self.out.put_u32(2);
    }

    /// A section of pages with QEMU's naming rule (named when the block
    /// changes), each `(block, page, body)`.
    pub fn pages(&mut self, end: bool, pages: Vec<(u8, u64, Vec<u8>)>) {
        let records: Vec<Record> = pages
            .into_iter()
            .map(|(block, page, body)| {
                let named = self.last_block != Some(block);
                self.last_block = Some(block);
                (block, page, named, body)
            })
            .collect();
        self.section(end, &records);
    }

    /// Bytes built so far.
    pub fn len(&self) -> usize {
        self.out.len()
    }

    /// Whether nothing was built (never: the header is always there).
    pub fn is_empty(&self) -> bool {
        self.out.is_empty()
    }

    /// A device section, EOF and a VMDESC: the stream's end.
    pub fn finish(mut self) -> Vec<u8> {
        self.out.put_u8(0x04);
        self.out.put_u32(3);
        self.out.put_u8(5);
        self.out.put_slice(b"timer");
        self.out.put_u32(0);
        self.out.put_u32(2);
        self.out
            .put_slice(&[1, 2, 3, 4, 5, 6, 7, 8, 0x7e, 0, 0, 0, 3]);
        self.out.put_u8(0x00);
        self.out.put_u8(0x06);
        self.out.put_u32(2);
        self.out.put_slice(b"{}");
        self.out
    }
}

/// An incompressible page (xorshift from `seed`), so reductions measured
/// on it are not compression.
pub fn random_page(seed: u64) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed.wrapping_add(1);
    (0..PAGE_SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
