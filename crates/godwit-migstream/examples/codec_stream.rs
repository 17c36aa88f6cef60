//! Runs a captured migration stream through the page-aware codec: encoder
//! → messages → decoder, checks the decoder's output is the input byte for
//! byte, and prints what it cost on the wire. With `--warm`, the stream is
//! sent twice and the second run gets the destination's summary of what
//! the first one left in its store (a VM returning to a site).
//!
//! `cargo run --release -p godwit-migstream --example codec_stream -- FILE [--warm]`

use std::time::Instant;

use bytes::Bytes;
use godwit_migstream::bloom::Bloom;
use godwit_migstream::{
    Decoder, Encoder, EncoderConfig, MemStore, Message, QemuFormat, SummaryKind,
};

fn run(data: &[u8], store: MemStore, warm: bool) -> Result<MemStore, Box<dyn std::error::Error>> {
    let mut enc = Encoder::new(QemuFormat::default(), EncoderConfig::default())?;
    enc.set_link_rate(12.5e6);
    if warm {
        let mut b = Bloom::with_capacity(store.0.len());
        for h in store.0.keys() {
            b.insert(h);
        }
        let m = Message::Summary {
            kind: SummaryKind::Image,
            probes: b.probes(),
            total: b.to_bytes().len() as u64,
            offset: 0,
            bytes: Bytes::from(b.to_bytes()),
        };
        enc.handle_message(&m.encode())?;
    }
    let mut dec = Decoder::new(store);
    let mut out = Vec::with_capacity(data.len());
    let mut wire = 0u64;
    let t0 = Instant::now();
    let mut enc_time = std::time::Duration::ZERO;
    // The relay reads QEMU in 256 KiB pieces and flushes when QEMU pauses;
    // GODWIT_FLUSH_EVERY (bytes) models how often that happens.
    let flush_every: usize = std::env::var("GODWIT_FLUSH_EVERY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 20);
    let mut since_flush = 0;
    for chunk in data.chunks(256 << 10) {
        let t = Instant::now();
        enc.push(chunk)?;
        since_flush += chunk.len();
        if since_flush >= flush_every {
            enc.flush()?;
            since_flush = 0;
        }
        enc_time += t.elapsed();
        while let Some(m) = enc.poll_message() {
            wire += m.payload.len() as u64 + 8;
            enc.on_sent(wire);
            dec.push_message(&m.payload, m.payload.len() as u64 + 8)?;
            enc.on_acked(dec.completed_wire());
            while let Some(n) = dec.poll_need() {
                enc.handle_message(&n)?;
            }
        }
        if let Some(o) = dec.take_output() {
            out.extend_from_slice(&o);
        }
    }
    enc.finish()?;
    while let Some(m) = enc.poll_message() {
        wire += m.payload.len() as u64 + 8;
        dec.push_message(&m.payload, 0)?;
    }
    if let Some(o) = dec.take_output() {
        out.extend_from_slice(&o);
    }
    println!("identical: {}  ({} bytes)", out == data, out.len());
    println!(
        "wire: {} bytes = {:.3} of the stream; encode {:?} total {:?}",
        wire,
        wire as f64 / data.len() as f64,
        enc_time,
        t0.elapsed()
    );
    println!("encoder: {:?}", enc.stats());
    println!("decoder: {:?}", dec.stats());
    Ok(dec.into_store())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .ok_or("usage: codec_stream FILE [--warm]")?;
    let warm = std::env::args().any(|a| a == "--warm");
    let data = std::fs::read(&path)?;
    let store = run(&data, MemStore::default(), false)?;
    if warm {
        println!("--- warm");
        run(&data, store, true)?;
    }
    Ok(())
}
