//! Source side: QEMU's stream in, compact messages for the destination out.
//!
//! The [`Encoder`] parses the stream ([`crate::parser`]) and turns each
//! page record into the cheapest op the destination can rebuild it from:
//!
//! 1. zero pages become runs (a few bytes per run instead of 9 per page);
//! 2. a page whose content was already sent in this migration becomes a
//!    reference ([`Origin::Intra`]);
//! 3. a page the destination's summaries (Bloom filters it sent at the
//!    start) say it holds becomes a reference to its earlier image of this
//!    VM, the guest's disk blocks, or its site store;
//! 4. a re-sent page whose previous version is still in the delta cache
//!    becomes a delta when that is small;
//! 5. anything else is sent literally.
//!
//! Ops are gathered into batches of about [`EncoderConfig::batch_bytes`],
//! each compressed with the codec the [`CodecChooser`] picks. References
//! taken on a summary's word are optimistic: the page stays retained here
//! until the destination acknowledged the batch, so a NEED (a false
//! positive, or a page evicted since) is answered with a FILL without
//! rereading anything.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::bloom::Bloom;
use crate::compress::{Codec, CodecChooser, Compressor};
use crate::delta;
use crate::hash::PageHash;
use crate::ops::{put_op, Hdr, Message, Op, Origin, SummaryKind};
use crate::parser::{Event, Fallback, PageBody, PageRecord, StreamParser};
use crate::qemu::{QemuFormat, PAGE_SIZE};
use crate::CodecError;

/// Tunables of the encoder.
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    /// Target size of a batch's ops before compression.
    pub batch_bytes: usize,
    /// Pages whose last-sent version is kept for deltas.
    pub delta_cache_pages: usize,
    /// Largest delta worth sending; beyond it the literal page compresses
    /// about as well and costs the destination nothing to apply.
    pub delta_limit: usize,
    /// Most pages retained for optimistic references at once. When full,
    /// summary hits are sent literally until acknowledgements free room.
    pub max_retained_pages: usize,
    /// Reference pages the destination holds (summaries); off makes the
    /// encoder use only zero runs, intra-migration refs, deltas and
    /// compression.
    pub use_summaries: bool,
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig {
            batch_bytes: 256 << 10,
            // 64 MiB: QEMU re-sends the pages a guest keeps dirtying, a hot
            // set far smaller than RAM for guests that converge at all.
            delta_cache_pages: 16 << 10,
            delta_limit: 2048,
            // 64 MiB, about a window of references at 100 Mbit/s × 520 ms.
            max_retained_pages: 16 << 10,
            use_summaries: true,
        }
    }
}

/// What the encoder did, for reports and metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EncoderStats {
    /// QEMU stream bytes taken in.
    pub stream_bytes: u64,
    /// Page records.
    pub pages: u64,
    /// Zero-page records.
    pub zero_pages: u64,
    /// Runs they were sent as.
    pub zero_runs: u64,
    /// Pages sent literally.
    pub literal_pages: u64,
    /// Pages sent as deltas.
    pub delta_pages: u64,
    /// Bytes of those deltas.
    pub delta_bytes: u64,
    /// Pages sent as references, by [`Origin`].
    pub ref_pages: [u64; 4],
    /// Bytes carried verbatim (framing, device state, fallback).
    pub raw_bytes: u64,
    /// Batches, by [`Codec`].
    pub batches: [u64; 3],
    /// Op bytes before compression.
    pub batch_raw_bytes: u64,
    /// Message bytes after compression.
    pub message_bytes: u64,
    /// Time spent compressing.
    pub compress_time: Duration,
    /// NEEDs answered.
    pub fills: u64,
    /// Guest pages whose last version sent was not a zero page: the
    /// guest's non-zero RAM, for figures per GiB of it.
    pub nonzero_pages: u64,
}

/// An encoded message and whether it may bypass the flow window.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// Frame payload.
    pub payload: Bytes,
    /// FILLs answer a destination that is blocked waiting for them: they
    /// must go out even when the window is full, or the two sides wait on
    /// each other.
    pub priority: bool,
}

#[derive(Debug, Default)]
struct PartialSummary {
    probes: u8,
    bytes: Vec<u8>,
    received: u64,
}

/// The source-side encoder. See the module docs.
pub struct Encoder {
    cfg: EncoderConfig,
    parser: StreamParser,
    block_names: Vec<Bytes>,
    ops: Vec<u8>,
    zero_run: Option<(Hdr, u64)>,
    out: VecDeque<Outgoing>,
    sent: HashSet<PageHash>,
    delta_cache: HashMap<(u16, u64), Bytes>,
    delta_order: VecDeque<(u16, u64)>,
    summaries: HashMap<SummaryKind, Bloom>,
    partial: HashMap<SummaryKind, PartialSummary>,
    ref_seq: u64,
    /// Pages behind optimistic references: (ref seq, page).
    retained: VecDeque<(u64, Bytes)>,
    /// (message end in the shell's wire count, first ref seq after it).
    marks: VecDeque<(u64, u64)>,
    /// Ref seq at the end of the last finished batch.
    batch_ref_end: u64,
    chooser: CodecChooser,
    compressor: Compressor,
    link_rate: Option<f64>,
    new_pages: Vec<(PageHash, Bytes)>,
    keep_new_pages: bool,
    /// Per block, a bitmap of pages whose last version was not zero.
    nonzero: Vec<Vec<u64>>,
    stats: EncoderStats,
    clock: fn() -> Instant,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("stats", &self.stats)
            .finish()
    }
}

impl Encoder {
    /// An encoder for a stream in `format`.
    pub fn new(format: QemuFormat, cfg: EncoderConfig) -> Result<Self, CodecError> {
        Ok(Encoder {
            cfg,
            parser: StreamParser::new(format),
            block_names: Vec::new(),
            ops: Vec::new(),
            zero_run: None,
            out: VecDeque::new(),
            sent: HashSet::new(),
            delta_cache: HashMap::new(),
            delta_order: VecDeque::new(),
            summaries: HashMap::new(),
            partial: HashMap::new(),
            ref_seq: 0,
            retained: VecDeque::new(),
            marks: VecDeque::new(),
            batch_ref_end: 0,
            chooser: CodecChooser::default(),
            compressor: Compressor::new()?,
            link_rate: None,
            new_pages: Vec::new(),
            keep_new_pages: false,
            nonzero: Vec::new(),
            stats: EncoderStats::default(),
            clock: Instant::now,
        })
    }

    /// Keep every page sent for the first time in this migration, to be
    /// taken with [`Self::take_new_pages`] (the source site records the
    /// VM's image so a later return trip finds it).
    pub fn keep_new_pages(&mut self, on: bool) {
        self.keep_new_pages = on;
    }

    /// Pages sent for the first time since the last call.
    pub fn take_new_pages(&mut self) -> Vec<(PageHash, Bytes)> {
        std::mem::take(&mut self.new_pages)
    }

    /// The link's measured rate, bytes per second (for the codec choice).
    pub fn set_link_rate(&mut self, bytes_per_s: f64) {
        self.link_rate = Some(bytes_per_s);
    }

    /// Takes bytes QEMU wrote. Full batches become messages at once.
    pub fn push(&mut self, data: &[u8]) -> Result<(), CodecError> {
        self.stats.stream_bytes += data.len() as u64;
        self.parser.push(data);
        while let Some(e) = self.parser.next_event() {
            self.handle_event(e)?;
        }
        Ok(())
    }

    /// QEMU has nothing more for now: send what is gathered, so nothing
    /// QEMU flushed waits for more input.
    pub fn flush(&mut self) -> Result<(), CodecError> {
        self.finish_batch()
    }

    /// QEMU closed its stream: flushes everything, including an item QEMU
    /// never finished.
    pub fn finish(&mut self) -> Result<(), CodecError> {
        if let Some(rest) = self.parser.finish() {
            self.raw(rest)?;
        }
        self.finish_batch()
    }

    /// The next message to send.
    pub fn poll_message(&mut self) -> Option<Outgoing> {
        self.out.pop_front()
    }

    /// Whether a message is waiting (and whether it is a priority one).
    pub fn peek_priority(&self) -> Option<bool> {
        self.out.front().map(|o| o.priority)
    }

    /// The shell sent the last polled message; `wire_end` is its running
    /// count of bytes sent, which acknowledgements refer to.
    pub fn on_sent(&mut self, wire_end: u64) {
        self.marks.push_back((wire_end, self.batch_ref_end));
    }

    /// The destination acknowledged `wire` bytes: pages behind references
    /// in fully acknowledged batches are released.
    pub fn on_acked(&mut self, wire: u64) {
        let mut release = None;
        while let Some(&(end, seq)) = self.marks.front() {
            if end > wire {
                break;
            }
            release = Some(seq);
            self.marks.pop_front();
        }
        if let Some(seq) = release {
            while self.retained.front().is_some_and(|(s, _)| *s < seq) {
                self.retained.pop_front();
            }
        }
    }

    /// A message from the destination (summary chunk or NEED).
    pub fn handle_message(&mut self, payload: &Bytes) -> Result<(), CodecError> {
        match Message::decode(payload)? {
            Message::Summary {
                kind,
                probes,
                total,
                offset,
                bytes,
            } => {
                let p = self.partial.entry(kind).or_default();
                if p.bytes.is_empty() {
                    p.bytes = vec![0; total as usize];
                    p.probes = probes;
                } else if p.bytes.len() as u64 != total || p.probes != probes {
                    return Err(CodecError::Malformed("summary chunks disagree"));
                }
                let at = offset as usize;
                p.bytes[at..at + bytes.len()].copy_from_slice(&bytes);
                p.received += bytes.len() as u64;
                if p.received >= total {
                    let p = self.partial.remove(&kind).unwrap_or_default();
                    let bloom = Bloom::from_parts(p.probes, &p.bytes)?;
                    tracing::debug!(?kind, bytes = total, "destination summary received");
                    self.summaries.insert(kind, bloom);
                }
                Ok(())
            }
            Message::Need { seq } => {
                let i = self
                    .retained
                    .binary_search_by_key(&seq, |(s, _)| *s)
                    .map_err(|_| CodecError::Unresolvable(seq))?;
                let page = self.retained[i].1.clone();
                self.stats.fills += 1;
                self.out.push_back(Outgoing {
                    payload: Message::Fill { seq, page }.encode(),
                    priority: true,
                });
                Ok(())
            }
            _ => Err(CodecError::Malformed("source received a source message")),
        }
    }

    /// Whether ops are gathered that [`Self::flush`] would send.
    pub fn has_unflushed(&self) -> bool {
        !self.ops.is_empty() || self.zero_run.is_some()
    }

    /// Counters.
    pub fn stats(&self) -> &EncoderStats {
        &self.stats
    }

    /// The parser's fallback, if the stream was not understood.
    pub fn fallback(&self) -> Option<&Fallback> {
        self.parser.fallback()
    }

    /// Whether the summary of `kind` has arrived.
    pub fn has_summary(&self, kind: SummaryKind) -> bool {
        self.summaries.contains_key(&kind)
    }

    /// Pages currently retained for optimistic references.
    pub fn retained_pages(&self) -> usize {
        self.retained.len()
    }

    fn handle_event(&mut self, e: Event) -> Result<(), CodecError> {
        match e {
            Event::Raw(b) => self.raw(b),
            Event::NewBlock(id, name) => {
                self.block_names.push(name.clone());
                self.op(&Op::Block(id.0, name))
            }
            Event::Page(rec) => self.page(rec),
            Event::Fallback(_) => Ok(()),
        }
    }

    fn raw(&mut self, b: Bytes) -> Result<(), CodecError> {
        self.stats.raw_bytes += b.len() as u64;
        // Split so one op never outgrows a batch.
        let mut at = 0;
        while at < b.len() {
            let n = (b.len() - at).min(self.cfg.batch_bytes);
            self.op(&Op::Raw(b.slice(at..at + n)))?;
            at += n;
        }
        Ok(())
    }

    fn page(&mut self, rec: PageRecord) -> Result<(), CodecError> {
        self.stats.pages += 1;
        let hdr = Hdr {
            named: rec.named,
            block: rec.block.0,
            page: rec.offset / PAGE_SIZE as u64,
        };
        let key = (hdr.block, hdr.page);
        self.mark_nonzero(key, matches!(rec.body, PageBody::Data(_)));
        let data = match rec.body {
            PageBody::Zero(fill) => {
                self.stats.zero_pages += 1;
                // The destination's version is now a zero page: no delta base.
                self.delta_cache.remove(&key);
                if fill != 0 {
                    return self.op(&Op::Zero(hdr, fill));
                }
                if let Some((h, n)) = &mut self.zero_run {
                    if !hdr.named && hdr.block == h.block && hdr.page == h.page + *n {
                        *n += 1;
                        return Ok(());
                    }
                }
                self.end_zero_run()?;
                self.zero_run = Some((hdr, 1));
                return Ok(());
            }
            PageBody::Data(d) => d,
        };
        let hash = PageHash::of(&data);
        let op = if self.sent.contains(&hash) {
            self.stats.ref_pages[Origin::Intra as usize] += 1;
            self.reference(hdr, Origin::Intra, hash, None)
        } else if let Some(origin) = self.summary_hit(&hash) {
            self.stats.ref_pages[origin as usize] += 1;
            self.reference(hdr, origin, hash, Some(data.clone()))
        } else {
            let mut d = Vec::new();
            match self.delta_cache.get(&key) {
                Some(old) if delta::encode(old, &data, self.cfg.delta_limit, &mut d).is_some() => {
                    self.stats.delta_pages += 1;
                    self.stats.delta_bytes += d.len() as u64;
                    Op::Delta(hdr, Bytes::from(d))
                }
                _ => {
                    self.stats.literal_pages += 1;
                    Op::Lit(hdr, data.clone())
                }
            }
        };
        if self.sent.insert(hash) && self.keep_new_pages {
            self.new_pages.push((hash, data.clone()));
        }
        self.remember(key, data);
        self.op(&op)
    }

    /// Keeps [`EncoderStats::nonzero_pages`]. Blocks the stream did not
    /// size (not in the START list) are not counted: their bitmap would
    /// have no bound.
    fn mark_nonzero(&mut self, (block, page): (u16, u64), nonzero: bool) {
        let b = block as usize;
        let Some(len) = self.parser.blocks().get(b).and_then(|bl| bl.used_length) else {
            return;
        };
        if self.nonzero.len() <= b {
            self.nonzero.resize_with(b + 1, Vec::new);
        }
        let map = &mut self.nonzero[b];
        if map.is_empty() {
            map.resize((len / PAGE_SIZE as u64).div_ceil(64) as usize, 0);
        }
        // The parser refuses offsets beyond the block, so this is in range;
        // `get_mut` keeps a bug from becoming a panic.
        let Some(word) = map.get_mut((page / 64) as usize) else {
            return;
        };
        let bit = 1u64 << (page % 64);
        match (nonzero, *word & bit != 0) {
            (true, false) => {
                *word |= bit;
                self.stats.nonzero_pages += 1;
            }
            (false, true) => {
                *word &= !bit;
                self.stats.nonzero_pages -= 1;
            }
            _ => {}
        }
    }

    fn summary_hit(&self, hash: &PageHash) -> Option<Origin> {
        if !self.cfg.use_summaries || self.retained.len() >= self.cfg.max_retained_pages {
            return None;
        }
        // The most specific first: the VM's own image, then its disk, then
        // anything in the store (which also holds both).
        [SummaryKind::Image, SummaryKind::Disk, SummaryKind::Store]
            .into_iter()
            .find(|k| self.summaries.get(k).is_some_and(|b| b.contains(hash)))
            .map(SummaryKind::origin)
    }

    fn reference(&mut self, hdr: Hdr, origin: Origin, hash: PageHash, retain: Option<Bytes>) -> Op {
        let seq = self.ref_seq;
        self.ref_seq += 1;
        if let Some(page) = retain {
            self.retained.push_back((seq, page));
        }
        Op::Ref(hdr, origin, hash)
    }

    fn remember(&mut self, key: (u16, u64), data: Bytes) {
        if self.cfg.delta_cache_pages == 0 {
            return;
        }
        if self.delta_cache.insert(key, data).is_none() {
            self.delta_order.push_back(key);
            while self.delta_cache.len() > self.cfg.delta_cache_pages {
                match self.delta_order.pop_front() {
                    Some(k) => {
                        self.delta_cache.remove(&k);
                    }
                    None => break,
                }
            }
        }
        // Keys removed by a zero page linger in `delta_order`; bound it.
        if self.delta_order.len() > 2 * self.cfg.delta_cache_pages.max(1) {
            let cache = &self.delta_cache;
            self.delta_order.retain(|k| cache.contains_key(k));
        }
    }

    fn end_zero_run(&mut self) -> Result<(), CodecError> {
        match self.zero_run.take() {
            None => {}
            Some((h, 1)) => put_op(&mut self.ops, &Op::Zero(h, 0)),
            Some((h, n)) => {
                self.stats.zero_runs += 1;
                put_op(&mut self.ops, &Op::ZeroRun(h, n));
            }
        }
        Ok(())
    }

    /// Appends an op after any pending zero run, keeping stream order.
    fn op(&mut self, o: &Op) -> Result<(), CodecError> {
        self.end_zero_run()?;
        put_op(&mut self.ops, o);
        if self.ops.len() >= self.cfg.batch_bytes {
            self.finish_batch()?;
        }
        Ok(())
    }

    fn finish_batch(&mut self) -> Result<(), CodecError> {
        self.end_zero_run()?;
        if self.ops.is_empty() {
            return Ok(());
        }
        let raw = std::mem::take(&mut self.ops);
        let probe = self.chooser.probe_now();
        let mut took = Duration::ZERO;
        let mut data = Vec::with_capacity(raw.len() / 2);
        let mut codec = self.chooser.choose(self.link_rate);
        if probe {
            // Measure every codec on this batch, then send the best.
            for c in Codec::ALL {
                let t0 = (self.clock)();
                let mut d = Vec::with_capacity(raw.len() / 2);
                self.compressor.compress(c, &raw, &mut d)?;
                let t = (self.clock)().saturating_duration_since(t0);
                took += t;
                self.chooser.record(c, raw.len(), d.len(), t);
            }
            codec = self.chooser.choose(self.link_rate);
        }
        let t0 = (self.clock)();
        self.compressor.compress(codec, &raw, &mut data)?;
        let t = (self.clock)().saturating_duration_since(t0);
        took += t;
        if !probe {
            self.chooser.record(codec, raw.len(), data.len(), t);
        }
        // Incompressible batches go out as they are.
        let (codec, data) = if data.len() >= raw.len() && codec != Codec::None {
            (Codec::None, raw.clone())
        } else {
            (codec, data)
        };
        self.stats.compress_time += took;
        self.stats.batches[codec as usize] += 1;
        self.stats.batch_raw_bytes += raw.len() as u64;
        let payload = Message::Batch {
            codec,
            raw_len: raw.len(),
            data: Bytes::from(data),
        }
        .encode();
        self.stats.message_bytes += payload.len() as u64;
        self.batch_ref_end = self.ref_seq;
        self.out.push_back(Outgoing {
            payload,
            priority: false,
        });
        Ok(())
    }
}
