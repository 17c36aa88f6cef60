//! Destination side: messages in, QEMU's exact stream out.
//!
//! The [`Decoder`] decompresses batches and replays their ops in order,
//! re-emitting each page record byte for byte ([`crate::emit`]). Pages
//! given by reference come from a [`PageStore`] (the site store, the VM's
//! earlier image, the guest's disk blocks, and every page of this
//! migration); deltas apply to the version of the same page last emitted.
//! A reference the store cannot resolve blocks the output at that op and
//! asks the source for the page (NEED); later batches keep arriving and
//! wait, so a miss costs one round trip, never a wrong byte: a FILL is
//! accepted only if its fingerprint is the referenced one.

use std::collections::{HashMap, VecDeque};

use bytes::{Bytes, BytesMut};

use crate::compress;
use crate::delta;
use crate::emit;
use crate::hash::PageHash;
use crate::ops::{read_ops, Hdr, Message, Op};
use crate::parser::{BlockId, PageBody, PageRecord};
use crate::qemu::PAGE_SIZE;
use crate::CodecError;

/// Where the destination finds pages by fingerprint.
pub trait PageStore {
    /// The page with fingerprint `h`, verified, if held.
    fn get(&mut self, h: &PageHash) -> Option<Bytes>;
    /// Keeps a page of this migration (it may be referenced or be a delta
    /// base later in the migration, so it must stay until the end).
    fn put(&mut self, h: &PageHash, page: &Bytes) -> Result<(), String>;
}

impl<T: PageStore + ?Sized> PageStore for Box<T> {
    fn get(&mut self, h: &PageHash) -> Option<Bytes> {
        (**self).get(h)
    }
    fn put(&mut self, h: &PageHash, page: &Bytes) -> Result<(), String> {
        (**self).put(h, page)
    }
}

/// A [`PageStore`] in memory (tests, and migrations without a site store).
#[derive(Debug, Default)]
pub struct MemStore(pub HashMap<PageHash, Bytes>);

impl PageStore for MemStore {
    fn get(&mut self, h: &PageHash) -> Option<Bytes> {
        self.0.get(h).cloned()
    }
    fn put(&mut self, h: &PageHash, page: &Bytes) -> Result<(), String> {
        self.0.insert(*h, page.clone());
        Ok(())
    }
}

/// Most batches buffered ahead of a blocked op. The source's flow window
/// bounds this in practice; the limit stops a peer that ignores it.
pub const MAX_QUEUED_BATCHES: usize = 4096;

/// What the decoder did, for reports.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DecoderStats {
    /// Stream bytes emitted.
    pub stream_bytes: u64,
    /// Page records emitted.
    pub pages: u64,
    /// Of which zero pages.
    pub zero_pages: u64,
    /// References resolved locally, by [`Origin`].
    pub refs: [u64; 4],
    /// References that had to be asked for (NEED).
    pub misses: u64,
    /// Deltas applied.
    pub deltas: u64,
    /// Literal pages.
    pub literals: u64,
}

struct Queued {
    ops: VecDeque<Op>,
    wire: u64,
}

/// The destination-side decoder. See the module docs.
pub struct Decoder<S> {
    store: S,
    blocks: Vec<Option<Bytes>>,
    /// Fingerprint of the version last emitted per (block, page); absent
    /// for zero pages and pages not yet seen.
    shadow: HashMap<(u16, u64), PageHash>,
    queue: VecDeque<Queued>,
    ref_seq: u64,
    needed: Option<u64>,
    fills: HashMap<u64, Bytes>,
    needs_out: VecDeque<u64>,
    out: BytesMut,
    completed_wire: u64,
    stats: DecoderStats,
}

impl<S> std::fmt::Debug for Decoder<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("stats", &self.stats)
            .finish()
    }
}

impl<S: PageStore> Decoder<S> {
    /// A decoder resolving references from `store`.
    pub fn new(store: S) -> Self {
        Decoder {
            store,
            blocks: Vec::new(),
            shadow: HashMap::new(),
            queue: VecDeque::new(),
            ref_seq: 0,
            needed: None,
            fills: HashMap::new(),
            needs_out: VecDeque::new(),
            out: BytesMut::new(),
            completed_wire: 0,
            stats: DecoderStats::default(),
        }
    }

    /// Takes a message from the source; `wire` is what it cost on the
    /// wire (acknowledged once its ops are all emitted).
    pub fn push_message(&mut self, payload: &Bytes, wire: u64) -> Result<(), CodecError> {
        match Message::decode(payload)? {
            Message::Batch {
                codec,
                raw_len,
                data,
            } => {
                if self.queue.len() >= MAX_QUEUED_BATCHES {
                    return Err(CodecError::Malformed("too many batches ahead of a miss"));
                }
                let raw = Bytes::from(compress::decompress(codec, &data, raw_len)?);
                self.queue.push_back(Queued {
                    ops: read_ops(&raw)?.into(),
                    wire,
                });
            }
            Message::Fill { seq, page } => {
                // FILLs bypass the flow window, so they are not acknowledged.
                if self.needed != Some(seq) {
                    return Err(CodecError::Malformed("fill for a page not asked for"));
                }
                self.fills.insert(seq, page);
            }
            _ => {
                return Err(CodecError::Malformed(
                    "destination received a destination message",
                ))
            }
        }
        self.process()
    }

    /// Stream bytes ready for QEMU.
    pub fn take_output(&mut self) -> Option<Bytes> {
        (!self.out.is_empty()).then(|| self.out.split().freeze())
    }

    /// A NEED to send to the source.
    pub fn poll_need(&mut self) -> Option<Bytes> {
        self.needs_out
            .pop_front()
            .map(|seq| Message::Need { seq }.encode())
    }

    /// Wire bytes of messages fully emitted (for acknowledgements).
    pub fn completed_wire(&self) -> u64 {
        self.completed_wire
    }

    /// Whether output waits for a FILL.
    pub fn is_blocked(&self) -> bool {
        self.needed.is_some()
    }

    /// Whether everything received has been emitted.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
    }

    /// Counters.
    pub fn stats(&self) -> &DecoderStats {
        &self.stats
    }

    /// The store (to release it after the migration).
    pub fn into_store(self) -> S {
        self.store
    }

    fn process(&mut self) -> Result<(), CodecError> {
        while let Some(q) = self.queue.front_mut() {
            let Some(op) = q.ops.pop_front() else {
                self.completed_wire += q.wire;
                self.queue.pop_front();
                continue;
            };
            if let Some(op) = self.apply(op)? {
                // Blocked on a miss: put the op back and wait for the FILL.
                if let Some(q) = self.queue.front_mut() {
                    q.ops.push_front(op);
                }
                return Ok(());
            }
        }
        Ok(())
    }

    /// Emits one op; gives it back when it must wait for a FILL.
    fn apply(&mut self, op: Op) -> Result<Option<Op>, CodecError> {
        match op {
            Op::Raw(b) => {
                self.stats.stream_bytes += b.len() as u64;
                self.out.extend_from_slice(&b);
            }
            Op::Block(id, name) => {
                let i = id as usize;
                if i != self.blocks.len() {
                    return Err(CodecError::Malformed("block ids out of order"));
                }
                self.blocks.push(Some(name));
            }
            Op::Zero(h, fill) => self.zero(h, fill)?,
            Op::ZeroRun(h, n) => {
                self.zero(h, 0)?;
                for i in 1..n {
                    let h = Hdr {
                        named: false,
                        block: h.block,
                        page: h.page + i,
                    };
                    self.zero(h, 0)?;
                }
            }
            Op::Lit(h, page) => {
                let hash = PageHash::of(&page);
                self.stats.literals += 1;
                self.data(h, hash, page)?;
            }
            Op::Delta(h, d) => {
                let base_hash = self
                    .shadow
                    .get(&(h.block, h.page))
                    .copied()
                    .ok_or(CodecError::Malformed("delta without a base"))?;
                let base = self.store.get(&base_hash).ok_or(CodecError::Store(
                    "a delta base of this migration is gone".into(),
                ))?;
                let mut page = base.to_vec();
                delta::apply(&mut page, &d)?;
                let page = Bytes::from(page);
                self.stats.deltas += 1;
                self.data(h, PageHash::of(&page), page)?;
            }
            Op::Ref(h, origin, hash) => {
                let seq = self.ref_seq;
                let page = match self.fills.remove(&seq) {
                    Some(p) => {
                        if PageHash::of(&p) != hash {
                            return Err(CodecError::Malformed("fill does not match its reference"));
                        }
                        self.needed = None;
                        self.stats.misses += 1;
                        p
                    }
                    None => match self.store.get(&hash) {
                        Some(p) => {
                            self.stats.refs[origin as usize] += 1;
                            p
                        }
                        None => {
                            if self.needed != Some(seq) {
                                tracing::debug!(
                                    seq,
                                    ?origin,
                                    "reference missed; asking the source"
                                );
                                self.needed = Some(seq);
                                self.needs_out.push_back(seq);
                            }
                            return Ok(Some(Op::Ref(h, origin, hash)));
                        }
                    },
                };
                self.ref_seq += 1;
                self.data(h, hash, page)?;
            }
        }
        Ok(None)
    }

    fn block_name(&self, h: Hdr) -> Result<Bytes, CodecError> {
        self.blocks
            .get(h.block as usize)
            .cloned()
            .flatten()
            .ok_or(CodecError::Malformed("page of an unnamed block"))
    }

    fn record(&mut self, h: Hdr, body: PageBody) -> Result<(), CodecError> {
        let name = self.block_name(h)?;
        let rec = PageRecord {
            block: BlockId(h.block),
            named: h.named,
            offset: h.page * PAGE_SIZE as u64,
            body,
        };
        let before = self.out.len();
        emit::page(&rec, &name, &mut self.out);
        self.stats.stream_bytes += (self.out.len() - before) as u64;
        self.stats.pages += 1;
        Ok(())
    }

    fn zero(&mut self, h: Hdr, fill: u8) -> Result<(), CodecError> {
        self.shadow.remove(&(h.block, h.page));
        self.stats.zero_pages += 1;
        self.record(h, PageBody::Zero(fill))
    }

    fn data(&mut self, h: Hdr, hash: PageHash, page: Bytes) -> Result<(), CodecError> {
        if page.len() != PAGE_SIZE {
            return Err(CodecError::Malformed("page of the wrong size"));
        }
        self.store.put(&hash, &page).map_err(CodecError::Store)?;
        self.shadow.insert((h.block, h.page), hash);
        self.record(h, PageBody::Data(page))
    }
}
