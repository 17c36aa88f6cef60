//! Resumable, page-granular parser of QEMU's outgoing precopy stream.
//!
//! Bytes go in as QEMU writes them ([`StreamParser::push`]); [`Event`]s
//! come out: page records (zero or literal, with their block and offset)
//! and everything else as raw bytes to be carried verbatim. Concatenating
//! the events with [`crate::emit`] gives back the exact input, which is
//! what lets the destination agent hand its QEMU a byte-identical stream.
//!
//! The parser understands the header, the configuration, commands, and
//! the RAM sections (START with its block list, PART, END). It treats the
//! first non-iterable device section (`FULL`, always after RAM's END in
//! precopy) or `EOF` as the start of the device-state tail and passes the
//! rest through raw: device state has no length fields and is small.
//! Anything it does not understand — a newer QEMU's construct, postcopy,
//! another iterable handler, a malformed record — switches the parser to
//! raw mode *at the first byte of that construct* ([`Event::Fallback`]), so
//! the stream is never corrupted and never stalls; only acceleration is
//! lost.
//!
//! An item (record, command, section header) is emitted only once it is
//! complete, and QEMU flushes only whole items, so the parser never holds
//! back bytes QEMU has flushed for longer than the next push.

use bytes::{Buf, Bytes, BytesMut};

use crate::qemu::{self, command, ram, section, QemuFormat, PAGE_SIZE};

/// Longest command payload the parser buffers to skip it. Commands godwit
/// sees are a few bytes; a longer one is passed on raw after a fallback.
pub const MAX_COMMAND_LEN: usize = 64 << 10;
/// Most RAM blocks a stream may name (QEMU has a handful: RAM, ROMs,
/// option ROMs, ACPI tables). Bounds the parser's memory on hostile input.
pub const MAX_BLOCKS: usize = 4096;

/// Identifies a RAM block by the order the stream first named it, so both
/// agents can refer to blocks with a small integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u16);

/// A RAM block named by the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The block's idstr, e.g. `pc.ram` or `mem0`.
    pub name: Bytes,
    /// Its size from the START section's block list, when it was listed.
    pub used_length: Option<u64>,
}

/// Body of a page record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageBody {
    /// `RAM_SAVE_FLAG_ZERO` with its fill byte (always 0 in practice).
    Zero(u8),
    /// `RAM_SAVE_FLAG_PAGE` with the page's bytes ([`PAGE_SIZE`] long).
    Data(Bytes),
}

/// One RAM page record as QEMU wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRecord {
    /// The block the page belongs to (named or implied by CONTINUE).
    pub block: BlockId,
    /// Whether the record carried the block's idstr (no CONTINUE flag).
    pub named: bool,
    /// Byte offset of the page within its block (page aligned).
    pub offset: u64,
    /// Zero fill or page bytes.
    pub body: PageBody,
}

/// Why the parser gave up interpreting the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// Stream offset of the first byte passed on raw because of it.
    pub at: u64,
    /// What was not understood.
    pub reason: String,
}

/// What the parser produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Bytes to carry verbatim.
    Raw(Bytes),
    /// A RAM block named for the first time (before its first page event).
    NewBlock(BlockId, Bytes),
    /// A page record.
    Page(PageRecord),
    /// From here on everything is [`Event::Raw`].
    Fallback(Fallback),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting the 8-byte file header.
    Header,
    /// Right after the header: CONFIGURATION may follow.
    AfterHeader,
    /// Inside the configuration: subsections may follow.
    Config,
    /// Between top-level items.
    Top,
    /// Inside a RAM section body (`start`: the START section, where the
    /// block list is allowed).
    Ram { section_id: u32, start: bool },
    /// After a RAM body's EOS: the footer is next.
    Footer { section_id: u32 },
    /// Device-state tail, passed on raw (not a fallback).
    Tail,
    /// Not understood; passed on raw.
    Raw,
}

/// Outcome of one parsing step over the buffered bytes.
enum Step {
    /// The item at the front is incomplete.
    NeedMore,
    /// `n` bytes form a complete item passed on raw.
    Raw(usize),
    /// `n` bytes form a page record.
    Page(usize, PageRecord),
    /// The construct at the front is not understood.
    Unknown(String),
}

/// The incremental stream parser. See the module docs.
#[derive(Debug)]
pub struct StreamParser {
    format: QemuFormat,
    state: State,
    buf: BytesMut,
    /// Bytes consumed from `buf` so far (stream offset of `buf[0]`).
    consumed: u64,
    /// Raw bytes parsed but not yet handed out (coalesced).
    raw: BytesMut,
    /// Events ready to hand out (new blocks, a page, a fallback).
    ready: std::collections::VecDeque<Event>,
    ram_section: Option<u32>,
    ignore_shared: bool,
    blocks: Vec<Block>,
    last_block: Option<BlockId>,
    fallback: Option<Fallback>,
    /// Bytes seen in each mode, for the report.
    stats: ParserStats,
}

/// Byte counts by how the parser handled them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ParserStats {
    /// Bytes of page records (headers included).
    pub page_bytes: u64,
    /// Page records.
    pub pages: u64,
    /// Of which zero-page records.
    pub zero_pages: u64,
    /// Bytes understood but carried verbatim (headers, commands, EOS…).
    pub framing_bytes: u64,
    /// Bytes of the device-state tail.
    pub tail_bytes: u64,
    /// Bytes carried raw after a fallback.
    pub fallback_bytes: u64,
}

impl StreamParser {
    /// A parser for a stream in `format`.
    pub fn new(format: QemuFormat) -> Self {
        StreamParser {
            format,
            state: State::Header,
            buf: BytesMut::new(),
            consumed: 0,
            raw: BytesMut::new(),
            ready: Default::default(),
            ram_section: None,
            ignore_shared: false,
            blocks: Vec::new(),
            last_block: None,
            fallback: None,
            stats: ParserStats::default(),
        }
    }

    /// Feeds bytes QEMU wrote.
    pub fn push(&mut self, data: &[u8]) {
        if self.is_raw() && self.buf.is_empty() {
            self.count_raw_mode(data.len());
            self.raw.extend_from_slice(data);
            self.consumed += data.len() as u64;
            return;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next event, or `None` when more input is needed. Raw bytes are
    /// coalesced up to the next page record or the end of the input.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.ready.pop_front() {
                return Some(e);
            }
            match self.step() {
                Step::NeedMore => return self.take_raw(),
                Step::Raw(n) => {
                    let b = self.buf.split_to(n);
                    self.consumed += n as u64;
                    self.raw.extend_from_slice(&b);
                }
                Step::Page(n, rec) => {
                    self.buf.advance(n);
                    self.consumed += n as u64;
                    self.stats.page_bytes += n as u64;
                    self.stats.pages += 1;
                    if matches!(rec.body, PageBody::Zero(_)) {
                        self.stats.zero_pages += 1;
                    }
                    let raw = self.take_raw();
                    self.ready.push_back(Event::Page(rec));
                    if let Some(r) = raw {
                        return Some(r);
                    }
                }
                Step::Unknown(reason) => {
                    let fb = Fallback {
                        at: self.consumed,
                        reason,
                    };
                    tracing::debug!(at = fb.at, reason = %fb.reason, "stream parser falls back to raw");
                    self.fallback = Some(fb.clone());
                    self.state = State::Raw;
                    let raw = self.take_raw();
                    self.ready.push_back(Event::Fallback(fb));
                    if let Some(r) = raw {
                        return Some(r);
                    }
                }
            }
        }
    }

    /// Ends the stream: whatever is buffered (an item QEMU never finished)
    /// is handed out raw, so the destination QEMU sees exactly what the
    /// source wrote and fails the same way.
    pub fn finish(&mut self) -> Option<Bytes> {
        let rest = self.buf.split();
        self.consumed += rest.len() as u64;
        self.stats.fallback_bytes += rest.len() as u64;
        self.raw.extend_from_slice(&rest);
        self.take_raw_bytes()
    }

    /// Why the parser fell back to raw, if it did.
    pub fn fallback(&self) -> Option<&Fallback> {
        self.fallback.as_ref()
    }

    /// The blocks named so far.
    pub fn blocks(&self) -> &[Block] {
        &self.blocks
    }

    /// Byte counts so far.
    pub fn stats(&self) -> ParserStats {
        self.stats
    }

    /// Stream bytes consumed so far (handed out or coalescing).
    pub fn offset(&self) -> u64 {
        self.consumed
    }

    fn is_raw(&self) -> bool {
        matches!(self.state, State::Raw | State::Tail)
    }

    fn count_raw_mode(&mut self, n: usize) {
        if self.state == State::Tail {
            self.stats.tail_bytes += n as u64;
        } else {
            self.stats.fallback_bytes += n as u64;
        }
    }

    fn take_raw(&mut self) -> Option<Event> {
        self.take_raw_bytes().map(Event::Raw)
    }

    fn take_raw_bytes(&mut self) -> Option<Bytes> {
        (!self.raw.is_empty()).then(|| self.raw.split().freeze())
    }

    fn step(&mut self) -> Step {
        let b = &self.buf[..];
        match self.state {
            State::Raw | State::Tail => {
                if b.is_empty() {
                    return Step::NeedMore;
                }
                let n = b.len();
                self.count_raw_mode(n);
                Step::Raw(n)
            }
            State::Header => {
                let Some(magic) = be32(b, 0) else {
                    return Step::NeedMore;
                };
                let Some(version) = be32(b, 4) else {
                    return Step::NeedMore;
                };
                if magic != qemu::FILE_MAGIC || version != qemu::FILE_VERSION {
                    return Step::Unknown(format!(
                        "not a QEMU v3 stream (magic {magic:#010x}, version {version})"
                    ));
                }
                self.state = State::AfterHeader;
                self.framing(8)
            }
            State::AfterHeader => {
                let Some(&t) = b.first() else {
                    return Step::NeedMore;
                };
                if t != section::CONFIGURATION {
                    self.state = State::Top;
                    return self.step();
                }
                let Some(len) = be32(b, 1) else {
                    return Step::NeedMore;
                };
                if len > 256 {
                    return Step::Unknown(format!("machine type name of {len} bytes"));
                }
                let n = 5 + len as usize;
                if b.len() < n {
                    return Step::NeedMore;
                }
                self.state = State::Config;
                self.framing(n)
            }
            State::Config => self.config_subsection(),
            State::Top => self.top_level(),
            State::Ram { section_id, start } => self.ram_record(section_id, start),
            State::Footer { section_id } => {
                if b.len() < 5 {
                    return Step::NeedMore;
                }
                if b[0] != section::FOOTER || be32(b, 1) != Some(section_id) {
                    return Step::Unknown(format!(
                        "expected the footer of section {section_id}, found byte {:#04x}",
                        b[0]
                    ));
                }
                self.state = State::Top;
                self.framing(5)
            }
        }
    }

    fn framing(&mut self, n: usize) -> Step {
        self.stats.framing_bytes += n as u64;
        Step::Raw(n)
    }

    /// One configuration subsection, or the end of the configuration.
    fn config_subsection(&mut self) -> Step {
        let b = &self.buf[..];
        let Some(&t) = b.first() else {
            return Step::NeedMore;
        };
        if t != section::SUBSECTION {
            self.state = State::Top;
            return self.step();
        }
        let Some(&nlen) = b.get(1) else {
            return Step::NeedMore;
        };
        let nlen = nlen as usize;
        let body = 2 + nlen + 4;
        if b.len() < body {
            return Step::NeedMore;
        }
        let name = &b[2..2 + nlen];
        let end = match name {
            b"configuration/target-page-bits" => body + 4,
            b"configuration/uuid" => body + 16,
            b"configuration/capabilities" => {
                let Some(count) = be32(b, body) else {
                    return Step::NeedMore;
                };
                if count > 64 {
                    return Step::Unknown(format!("{count} validated capabilities"));
                }
                let mut at = body + 4;
                let mut ignore_shared = false;
                for _ in 0..count {
                    let Some(&l) = b.get(at) else {
                        return Step::NeedMore;
                    };
                    let l = l as usize;
                    if b.len() < at + 1 + l {
                        return Step::NeedMore;
                    }
                    ignore_shared |= &b[at + 1..at + 1 + l] == qemu::CAP_IGNORE_SHARED;
                    at += 1 + l;
                }
                self.ignore_shared = ignore_shared;
                at
            }
            other => {
                return Step::Unknown(format!(
                    "configuration subsection {:?}",
                    String::from_utf8_lossy(other)
                ))
            }
        };
        if b.len() < end {
            return Step::NeedMore;
        }
        self.framing(end)
    }

    fn top_level(&mut self) -> Step {
        let b = &self.buf[..];
        let Some(&t) = b.first() else {
            return Step::NeedMore;
        };
        match t {
            section::COMMAND => {
                if b.len() < 5 {
                    return Step::NeedMore;
                }
                let cmd = u16::from_be_bytes([b[1], b[2]]);
                let len = u16::from_be_bytes([b[3], b[4]]) as usize;
                match cmd {
                    command::PACKAGED => {
                        return Step::Unknown("packaged (postcopy) command".into())
                    }
                    command::POSTCOPY_ADVISE => return Step::Unknown("postcopy advise".into()),
                    _ => {}
                }
                if len > MAX_COMMAND_LEN {
                    return Step::Unknown(format!("command {cmd} of {len} bytes"));
                }
                if b.len() < 5 + len {
                    return Step::NeedMore;
                }
                self.framing(5 + len)
            }
            section::START | section::FULL => {
                let Some(id) = be32(b, 1) else {
                    return Step::NeedMore;
                };
                let Some(&idlen) = b.get(5) else {
                    return Step::NeedMore;
                };
                let n = 6 + idlen as usize + 8;
                if b.len() < n {
                    return Step::NeedMore;
                }
                let idstr = &b[6..6 + idlen as usize];
                if t == section::FULL {
                    // Device state: in precopy it follows RAM's END and
                    // runs to the end of the stream.
                    self.state = State::Tail;
                    return self.step();
                }
                if idstr != qemu::RAM_IDSTR {
                    return Step::Unknown(format!(
                        "iterable section {:?}",
                        String::from_utf8_lossy(idstr)
                    ));
                }
                if self.ram_section.is_some() {
                    return Step::Unknown("a second RAM START section".into());
                }
                self.ram_section = Some(id);
                self.state = State::Ram {
                    section_id: id,
                    start: true,
                };
                self.framing(n)
            }
            section::PART | section::END => {
                let Some(id) = be32(b, 1) else {
                    return Step::NeedMore;
                };
                if Some(id) != self.ram_section {
                    return Step::Unknown(format!("section {id} is not RAM"));
                }
                self.state = State::Ram {
                    section_id: id,
                    start: false,
                };
                self.framing(5)
            }
            section::EOF => {
                self.state = State::Tail;
                self.step()
            }
            other => Step::Unknown(format!("top-level byte {other:#04x}")),
        }
    }

    fn ram_record(&mut self, section_id: u32, start: bool) -> Step {
        let b = &self.buf[..];
        let Some(word) = be64(b, 0) else {
            return Step::NeedMore;
        };
        let flags = word & ram::FLAG_MASK;
        let addr = word & !ram::FLAG_MASK;
        let cont = flags & ram::CONTINUE != 0;
        match flags & !ram::CONTINUE {
            ram::EOS if !cont && addr == 0 => {
                self.state = State::Footer { section_id };
                self.framing(8)
            }
            ram::MULTIFD_FLUSH if self.format.multifd_flush && !cont && addr == 0 => {
                self.framing(8)
            }
            ram::MEM_SIZE if start && !cont => self.block_list(addr),
            kind @ (ram::ZERO | ram::PAGE) => {
                if addr & (PAGE_SIZE as u64 - 1) != 0 {
                    return Step::Unknown(format!("page offset {addr:#x} not page aligned"));
                }
                // Past any real block (2^52 bytes), and past what the
                // relay's codec carries: relay the rest raw.
                if addr / PAGE_SIZE as u64 >= crate::ops::MAX_PAGE_INDEX {
                    return Step::Unknown(format!("page offset {addr:#x} beyond 2^52"));
                }
                let mut at = 8;
                let block = if cont {
                    match self.last_block {
                        Some(id) => Some(id),
                        None => return Step::Unknown("CONTINUE before any block".into()),
                    }
                } else {
                    let Some(&l) = b.get(8) else {
                        return Step::NeedMore;
                    };
                    // QEMU never names a block "" (and the relay's codec
                    // could not carry one): stop understanding here.
                    if l == 0 {
                        return Step::Unknown("empty block name in a page record".into());
                    }
                    let l = l as usize;
                    if b.len() < 9 + l {
                        return Step::NeedMore;
                    }
                    at = 9 + l;
                    let name = &b[9..9 + l];
                    // A new block is registered only once the whole record
                    // is here (None until then).
                    self.blocks
                        .iter()
                        .position(|bl| bl.name == name)
                        .map(|i| BlockId(i as u16))
                };
                let body_len = if kind == ram::ZERO { 1 } else { PAGE_SIZE };
                if b.len() < at + body_len {
                    return Step::NeedMore;
                }
                let block = match block {
                    Some(id) => id,
                    None => {
                        let name = Bytes::copy_from_slice(&b[9..at]);
                        match self.register_block(name, None) {
                            Ok(id) => id,
                            Err(e) => return e,
                        }
                    }
                };
                // QEMU refuses such a record on load; we would have to
                // track it, so stop understanding the stream here instead.
                if let Some(len) = self.blocks[block.0 as usize].used_length {
                    if addr >= len {
                        return Step::Unknown(format!(
                            "page offset {addr:#x} beyond its block's {len:#x} bytes"
                        ));
                    }
                }
                let b = &self.buf[..];
                let body = if kind == ram::ZERO {
                    PageBody::Zero(b[at])
                } else {
                    PageBody::Data(Bytes::copy_from_slice(&b[at..at + PAGE_SIZE]))
                };
                self.last_block = Some(block);
                Step::Page(
                    at + body_len,
                    PageRecord {
                        block,
                        named: !cont,
                        offset: addr,
                        body,
                    },
                )
            }
            _ => Step::Unknown(format!("RAM record word {word:#018x}")),
        }
    }

    /// The START section's block list: `total` bytes of blocks, each
    /// `u8 len, idstr, be64 used_length [, be64 gpa with x-ignore-shared]`.
    fn block_list(&mut self, total: u64) -> Step {
        let b = &self.buf[..];
        let mut at = 8;
        let mut sum = 0u64;
        let mut found = Vec::new();
        while sum < total {
            let Some(&l) = b.get(at) else {
                return Step::NeedMore;
            };
            if l == 0 {
                return Step::Unknown("empty block name in the block list".into());
            }
            let l = l as usize;
            let extra = if self.ignore_shared { 8 } else { 0 };
            if b.len() < at + 1 + l + 8 + extra {
                return Step::NeedMore;
            }
            let name = Bytes::copy_from_slice(&b[at + 1..at + 1 + l]);
            let Some(len) = be64(b, at + 1 + l) else {
                return Step::NeedMore;
            };
            sum = match sum.checked_add(len) {
                Some(s) if s <= total => s,
                _ => return Step::Unknown("block list lengths exceed the total".into()),
            };
            found.push((name, len));
            at += 1 + l + 8 + extra;
        }
        for (name, len) in found {
            match self.blocks.iter().position(|bl| bl.name == name) {
                Some(i) => self.blocks[i].used_length = Some(len),
                None => {
                    if let Err(e) = self.register_block(name, Some(len)) {
                        return e;
                    }
                }
            }
        }
        self.framing(at)
    }

    fn register_block(&mut self, name: Bytes, used_length: Option<u64>) -> Result<BlockId, Step> {
        if self.blocks.len() >= MAX_BLOCKS {
            return Err(Step::Unknown(format!("more than {MAX_BLOCKS} RAM blocks")));
        }
        let id = BlockId(self.blocks.len() as u16);
        self.blocks.push(Block {
            name: name.clone(),
            used_length,
        });
        self.ready.push_back(Event::NewBlock(id, name));
        Ok(id)
    }
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8).map(|s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_be_bytes(a)
    })
}
