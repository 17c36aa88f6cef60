//! `godwit bench codec`: what a re-sent page costs on the wire when the
//! guest changed only a little of it (issue 3's delta target), measured on
//! the codec alone (encoder and decoder in one process, no WAN).
//!
//! Per change size and layout: a synthetic QEMU 7.2 stream sends
//! [`PAGES`] incompressible pages, then sends every one again with
//! `change_bytes` bytes changed, contiguous or as scattered 8-byte words.
//! The row's `bytes_per_page` is the wire bytes of the second pass (codec
//! messages plus the relay's frame headers) divided by the pages; the
//! decoded stream must equal the input.

use anyhow::{bail, Result};
use godwit_migstream::synth::{random_page, StreamBuilder};
use godwit_migstream::{Decoder, Encoder, EncoderConfig, MemStore, QemuFormat};
use serde_json::{json, Value};

/// Pages per pass (16 MiB).
const PAGES: u64 = 4096;
/// Change sizes measured, bytes.
const CHANGE_BYTES: [usize; 7] = [8, 16, 32, 64, 128, 256, 1024];
/// Relay frame header per codec message (`godwit_wire::frame`).
const FRAME_HEADER: u64 = 8;

/// Runs the suite.
pub fn run() -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    for layout in ["contiguous", "scattered"] {
        for &n in &CHANGE_BYTES {
            rows.push(one(n, layout == "scattered")?);
        }
    }
    Ok(rows)
}

/// Delivers every message the encoder has, counting wire bytes.
fn pump(
    enc: &mut Encoder,
    dec: &mut Decoder<MemStore>,
    out: &mut Vec<u8>,
    wire: &mut u64,
) -> Result<()> {
    while let Some(m) = enc.poll_message() {
        let w = m.payload.len() as u64 + FRAME_HEADER;
        *wire += w;
        enc.on_sent(*wire);
        dec.push_message(&m.payload, w)?;
        enc.on_acked(dec.completed_wire());
        while let Some(o) = dec.take_output() {
            out.extend_from_slice(&o);
        }
    }
    Ok(())
}

/// Changes `n` bytes of `p` to new random values (what a guest writing
/// counters, pointers or small records does): one run, or `n / 8` words
/// spread over the page.
fn change(p: &mut [u8], n: usize, scattered: bool, seed: u64) {
    let noise = random_page(seed ^ 0x5eed_0000_0000);
    // Never leave a byte unchanged (noise may equal it by chance).
    let mut set = |i: usize, k: usize| p[i] ^= noise[k].max(1);
    if scattered {
        let words = (n / 8).max(1);
        let stride = 4096 / words;
        for w in 0..words {
            let at = w * stride + (seed as usize * 8 + w * 24) % (stride - 8) / 8 * 8;
            for i in 0..8 {
                set(at + i, w * 8 + i);
            }
        }
    } else {
        let at = (seed as usize * 64) % (4096 - n);
        for i in 0..n {
            set(at + i, i);
        }
    }
}

fn one(n: usize, scattered: bool) -> Result<Value> {
    let first: Vec<Vec<u8>> = (0..PAGES).map(random_page).collect();
    let mut second = first.clone();
    for (i, p) in second.iter_mut().enumerate() {
        change(p, n, scattered, i as u64);
    }
    let mut s1 = StreamBuilder::new();
    s1.pages(
        false,
        first
            .iter()
            .enumerate()
            .map(|(i, p)| (0, i as u64, p.clone()))
            .collect(),
    );
    // Where pass 1 ends, to split the wire count.
    let pass1_len = s1.len();
    s1.pages(
        true,
        second
            .iter()
            .enumerate()
            .map(|(i, p)| (0, i as u64, p.clone()))
            .collect(),
    );
    let stream = s1.finish();

    let mut enc = Encoder::new(QemuFormat::default(), EncoderConfig::default())?;
    enc.set_link_rate(100e6 / 8.0);
    let mut dec = Decoder::new(MemStore::default());
    let mut out = Vec::with_capacity(stream.len());
    let mut wire = 0u64;
    enc.push(&stream[..pass1_len])?;
    enc.flush()?;
    pump(&mut enc, &mut dec, &mut out, &mut wire)?;
    let wire_pass1 = wire;
    enc.push(&stream[pass1_len..])?;
    enc.finish()?;
    pump(&mut enc, &mut dec, &mut out, &mut wire)?;
    if out != stream {
        bail!("decoded stream differs from the input");
    }
    let st = enc.stats();
    let pass2 = wire - wire_pass1;
    Ok(json!({
        "change_bytes": n,
        "layout": if scattered { "scattered" } else { "contiguous" },
        "pages": PAGES,
        "bytes_per_page": pass2 as f64 / PAGES as f64,
        "delta_pages": st.delta_pages,
        "literal_pages": st.literal_pages - PAGES,
        "delta_bytes_per_page": st.delta_bytes as f64 / st.delta_pages.max(1) as f64,
        "wire_bytes_pass1": wire_pass1,
        "wire_bytes_pass2": pass2,
    }))
}
