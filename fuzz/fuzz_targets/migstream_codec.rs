//! Fuzzes both ends of the page-aware codec against a hostile peer: the
//! destination's decoder fed arbitrary messages (what a source agent can
//! send), and the source's encoder fed arbitrary replies (summaries and
//! NEEDs a destination agent can send).
//!
//! Invariants checked: no panic, no unbounded allocation; errors are
//! returned, never guessed around.
#![no_main]

use bytes::Bytes;
use godwit_migstream::{Decoder, Encoder, EncoderConfig, MemStore, QemuFormat};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Messages separated by a 0xff 0xfe marker, so one input holds several.
    let mut dec = Decoder::new(MemStore::default());
    let mut enc = Encoder::new(QemuFormat::default(), EncoderConfig::default()).unwrap();
    let mut start = 0;
    let mut i = 0;
    while i <= data.len() {
        let at_end = i == data.len();
        if at_end || (i + 1 < data.len() && data[i] == 0xff && data[i + 1] == 0xfe) {
            let msg = Bytes::copy_from_slice(&data[start..i]);
            let _ = dec.push_message(&msg, msg.len() as u64);
            while dec.take_output().is_some() {}
            while dec.poll_need().is_some() {}
            let _ = enc.handle_message(&msg);
            while enc.poll_message().is_some() {}
            start = i + 2;
            i += 2;
            if at_end {
                break;
            }
            continue;
        }
        i += 1;
    }
});
