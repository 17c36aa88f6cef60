//! Parses a captured migration stream (a file written by QEMU's
//! `migrate exec:cat > FILE`), checks that re-emitting the events gives the
//! file back byte for byte, and prints what the parser saw.
//!
//! `cargo run --release -p godwit-migstream --example parse_stream -- FILE`

use bytes::BytesMut;
use godwit_migstream::{emit, Event, QemuFormat, StreamParser};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: parse_stream FILE")?;
    let data = std::fs::read(&path)?;
    let mut p = StreamParser::new(QemuFormat::default());
    let mut out = BytesMut::with_capacity(data.len());
    let mut names: Vec<bytes::Bytes> = Vec::new();
    // Feed in odd-sized chunks to exercise resumption.
    for chunk in data.chunks(32_771) {
        p.push(chunk);
        while let Some(e) = p.next_event() {
            match e {
                Event::Raw(b) => out.extend_from_slice(&b),
                Event::NewBlock(id, name) => {
                    assert_eq!(id.0 as usize, names.len());
                    names.push(name);
                }
                Event::Page(r) => emit::page(&r, &names[r.block.0 as usize], &mut out),
                Event::Fallback(f) => println!("fallback at {}: {}", f.at, f.reason),
            }
        }
    }
    if let Some(rest) = p.finish() {
        out.extend_from_slice(&rest);
    }
    println!("identical: {}", out[..] == data[..]);
    println!("stats: {:?}", p.stats());
    for b in p.blocks() {
        println!(
            "block {:?} {:?}",
            String::from_utf8_lossy(&b.name),
            b.used_length
        );
    }
    Ok(())
}
