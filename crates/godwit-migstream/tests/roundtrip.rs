//! The codec end to end on synthetic QEMU streams: whatever the stream and
//! however it is chunked, the decoder's output is the encoder's input.

use bytes::{BufMut, Bytes};
use godwit_migstream::bloom::Bloom;
use godwit_migstream::synth::{random_page, StreamBuilder};
use godwit_migstream::{
    Decoder, Encoder, EncoderConfig, MemStore, Message, PageHash, QemuFormat, StreamParser,
    SummaryKind,
};
use proptest::prelude::*;

/// An incompressible page with one byte set, so reductions are not
/// compression.
fn page_with(seed: u32, tweak: u8) -> Vec<u8> {
    let mut p = random_page(u64::from(seed));
    p[100] = tweak;
    p
}

/// Records with the CONTINUE rule QEMU follows: named when the block
/// changes (or first in the stream).
fn records(spec: &[(u8, u64, u8)], last: &mut Option<u8>) -> Vec<(u8, u64, bool, Vec<u8>)> {
    spec.iter()
        .map(|&(block, page, kind)| {
            let named = *last != Some(block);
            *last = Some(block);
            let body = match kind {
                0 => vec![0u8],
                k => page_with((page % 50) as u32, k),
            };
            (block, page, named, body)
        })
        .collect()
}

struct Run {
    wire: u64,
    needs: u64,
    nonzero: u64,
    store: MemStore,
}

/// Encodes `stream` in `chunks`, delivers every message, checks the output.
fn run(stream: &[u8], chunks: &[usize], store: MemStore, summary: Option<Bloom>) -> Run {
    let mut enc = Encoder::new(QemuFormat::default(), EncoderConfig::default()).unwrap();
    if let Some(b) = summary {
        let bytes = b.to_bytes();
        // Two chunks, to exercise reassembly.
        let half = bytes.len() / 2 / 8 * 8;
        for (off, part) in [(0, &bytes[..half]), (half, &bytes[half..])] {
            let m = Message::Summary {
                kind: SummaryKind::Store,
                probes: b.probes(),
                total: bytes.len() as u64,
                offset: off as u64,
                bytes: Bytes::copy_from_slice(part),
            };
            enc.handle_message(&m.encode()).unwrap();
        }
    }
    let mut dec = Decoder::new(store);
    let mut out = Vec::new();
    let (mut wire, mut needs) = (0u64, 0u64);
    let mut at = 0;
    let mut i = 0;
    let mut pump = |enc: &mut Encoder, dec: &mut Decoder<MemStore>, out: &mut Vec<u8>| {
        while let Some(m) = enc.poll_message() {
            wire += m.payload.len() as u64;
            enc.on_sent(wire);
            dec.push_message(&m.payload, m.payload.len() as u64)
                .unwrap();
            while let Some(n) = dec.poll_need() {
                needs += 1;
                enc.handle_message(&n).unwrap();
            }
            enc.on_acked(dec.completed_wire());
            if let Some(o) = dec.take_output() {
                out.extend_from_slice(&o);
            }
        }
    };
    while at < stream.len() {
        let n = chunks[i % chunks.len()].clamp(1, stream.len() - at);
        i += 1;
        enc.push(&stream[at..at + n]).unwrap();
        at += n;
        if i % 3 == 0 {
            enc.flush().unwrap();
        }
        pump(&mut enc, &mut dec, &mut out);
    }
    enc.finish().unwrap();
    pump(&mut enc, &mut dec, &mut out);
    assert!(dec.is_idle());
    assert_eq!(out.len(), stream.len());
    assert!(out == stream, "decoded stream differs");
    Run {
        wire,
        needs,
        nonzero: enc.stats().nonzero_pages,
        store: dec.into_store(),
    }
}

fn sample_stream() -> Vec<u8> {
    let mut s = StreamBuilder::new();
    let mut last = None;
    let mut first: Vec<(u8, u64, u8)> = (0..300)
        .map(|p| (0, p, if p % 3 == 0 { 1 } else { 0 }))
        .collect();
    first.push((1, 0, 2));
    first.push((1, 1, 0));
    s.section(false, &records(&first, &mut last));
    // Re-dirtied pages (a tweak: delta), and moved content (intra refs).
    let second: Vec<(u8, u64, u8)> = (0..60).map(|p| (0, p * 3, 9)).collect();
    s.section(true, &records(&second, &mut last));
    s.finish()
}

#[test]
fn parser_sees_pages_and_tail() {
    let stream = sample_stream();
    let mut p = StreamParser::new(QemuFormat::default());
    p.push(&stream);
    while p.next_event().is_some() {}
    assert!(p.finish().is_none());
    assert!(p.fallback().is_none(), "{:?}", p.fallback());
    let st = p.stats();
    assert_eq!(st.pages, 362);
    assert_eq!(st.zero_pages, 201);
    assert_eq!(p.blocks().len(), 2);
}

#[test]
fn reduces_zero_runs_intra_and_deltas() {
    let stream = sample_stream();
    let r = run(&stream, &[1 << 20], MemStore::default(), None);
    // 51 distinct incompressible pages must go literally; 50 more repeat
    // them, 200 are zero and 60 re-sent ones differ in one byte: all of
    // those together must cost less than one more page each would.
    assert!(
        r.wire < 51 * 4096 + 12_000,
        "{} vs {}",
        r.wire,
        stream.len()
    );
    assert_eq!(r.needs, 0);
    // 100 + 1 non-zero pages; the re-sent ones were non-zero already.
    assert_eq!(r.nonzero, 101);
}

#[test]
fn page_beyond_its_block_falls_back() {
    let mut s = StreamBuilder::new();
    let mut last = None;
    // pc.bios is 256 KiB: page 64 is past its end.
    s.section(true, &records(&[(0, 1, 1), (1, 64, 2)], &mut last));
    let stream = s.finish();
    let mut p = StreamParser::new(QemuFormat::default());
    p.push(&stream);
    while p.next_event().is_some() {}
    let f = p.fallback().expect("a fallback");
    assert!(f.reason.contains("beyond"), "{}", f.reason);
    run(&stream, &[5000], MemStore::default(), None);
}

#[test]
fn warm_store_and_false_positives_resolve_by_fill() {
    let stream = sample_stream();
    let cold = run(&stream, &[4096], MemStore::default(), None);
    // Summary of what the destination holds, then lose half of it: every
    // lost page is a miss that must be filled.
    let mut bloom = Bloom::with_capacity(cold.store.0.len());
    for h in cold.store.0.keys() {
        bloom.insert(h);
    }
    let mut store = cold.store;
    let keys: Vec<PageHash> = store.0.keys().copied().collect();
    for k in keys.iter().step_by(2) {
        store.0.remove(k);
    }
    let held = store.0.len() as u64;
    let warm = run(&stream, &[777, 5000, 1], store, Some(bloom));
    assert!(
        warm.needs > 0 && warm.needs <= keys.len() as u64 - held,
        "{}",
        warm.needs
    );
}

/// Splices `bad` into the middle of the first PART section of the sample
/// stream; checks that the parser falls back exactly there, with a reason
/// containing `reason`, and that the relay still carries the stream
/// byte for byte.
fn falls_back_at_splice(bad: Vec<u8>, reason: &str) {
    let mut stream = sample_stream();
    let at = stream
        .windows(4)
        .position(|w| w == [0x02, 0, 0, 0])
        .unwrap()
        + 5;
    stream.splice(at..at, bad);
    let mut p = StreamParser::new(QemuFormat::default());
    p.push(&stream);
    while p.next_event().is_some() {}
    let f = p.fallback().expect("a fallback");
    assert_eq!(f.at, at as u64);
    assert!(f.reason.contains(reason), "{}", f.reason);
    run(&stream, &[100, 1000], MemStore::default(), None);
}

#[test]
fn unknown_construct_falls_back_and_stays_exact() {
    // An XBZRLE record.
    let mut bad = Vec::new();
    bad.put_u64(0x040 | 0x020);
    bad.extend_from_slice(&[1, 0, 2, 9, 9]);
    falls_back_at_splice(bad, "");
}

#[test]
fn page_record_with_empty_block_name_falls_back() {
    // Found by the migstream_parser fuzz target: a page record naming the
    // block "" used to register it, and the relay's codec then refused to
    // carry that block, failing the migration instead of relaying raw.
    let mut bad = Vec::new();
    bad.put_u64(0x008); // RAM_SAVE_FLAG_PAGE at offset 0, no CONTINUE
    bad.put_u8(0); // idstr length 0
    bad.extend_from_slice(&[7; 4096]);
    falls_back_at_splice(bad, "empty block name");
}

#[test]
fn page_offset_past_2_pow_52_falls_back() {
    // Found by the migstream_parser fuzz target: a block first named by a
    // page record has no known length, and an offset near 2^64 made the
    // codec emit a page index its own decoder refuses.
    let mut bad = Vec::new();
    bad.put_u64(0xffff_ffff_ffff_f000 | 0x002); // RAM_SAVE_FLAG_ZERO
    bad.put_u8(3);
    bad.extend_from_slice(b"new");
    bad.put_u8(0);
    falls_back_at_splice(bad, "beyond 2^52");
}

#[test]
fn not_a_qemu_stream_is_relayed_raw() {
    let junk: Vec<u8> = (0..100_000u32).map(|i| (i % 7) as u8).collect();
    run(&junk, &[3000], MemStore::default(), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_stream_any_chunking_roundtrips(
        spec in proptest::collection::vec((0u8..2, 0u64..64, 0u8..4), 0..200),
        spec2 in proptest::collection::vec((0u8..2, 0u64..64, 0u8..4), 0..100),
        chunks in proptest::collection::vec(1usize..20_000, 1..8),
        cut in 0usize..40_000,
    ) {
        let mut s = StreamBuilder::new();
        let mut last = None;
        s.section(false, &records(&spec, &mut last));
        s.section(true, &records(&spec2, &mut last));
        let stream = s.finish();
        run(&stream, &chunks, MemStore::default(), None);
        // A stream QEMU cut off anywhere is carried exactly too.
        let cut = cut.min(stream.len());
        run(&stream[..cut], &chunks, MemStore::default(), None);
    }
}
