//! Fuzzes the QEMU migration stream parser (`godwit_migstream::StreamParser`)
//! and the source-side encoder: the bytes a source QEMU (a guest-controlled
//! process, from the agent's point of view) writes into the relay.
//!
//! Invariants checked:
//! - parsing and encoding never panic, whatever the bytes and chunking;
//! - re-emitting the parser's events gives back exactly the input;
//! - the destination's decoder turns the encoder's messages back into
//!   exactly the input.
#![no_main]

use bytes::BytesMut;
use godwit_migstream::{
    emit, Decoder, Encoder, EncoderConfig, Event, MemStore, QemuFormat, StreamParser,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, so splits land everywhere.
    let Some((&k, stream)) = data.split_first() else { return };
    let chunk = usize::from(k) * 7 + 1;

    let mut p = StreamParser::new(QemuFormat::default());
    let mut out = BytesMut::new();
    let mut names = Vec::new();
    for c in stream.chunks(chunk) {
        p.push(c);
        while let Some(e) = p.next_event() {
            match e {
                Event::Raw(b) => out.extend_from_slice(&b),
                Event::NewBlock(_, n) => names.push(n),
                Event::Page(r) => emit::page(&r, &names[r.block.0 as usize], &mut out),
                Event::Fallback(_) => {}
            }
        }
    }
    if let Some(rest) = p.finish() {
        out.extend_from_slice(&rest);
    }
    assert_eq!(&out[..], stream);

    let mut enc = Encoder::new(QemuFormat::default(), EncoderConfig::default()).unwrap();
    let mut dec = Decoder::new(MemStore::default());
    let mut got = Vec::new();
    for c in stream.chunks(chunk) {
        enc.push(c).unwrap();
        enc.flush().unwrap();
        while let Some(m) = enc.poll_message() {
            dec.push_message(&m.payload, 0).unwrap();
        }
    }
    enc.finish().unwrap();
    while let Some(m) = enc.poll_message() {
        dec.push_message(&m.payload, 0).unwrap();
    }
    while let Some(o) = dec.take_output() {
        got.extend_from_slice(&o);
    }
    assert_eq!(&got[..], stream);
});
