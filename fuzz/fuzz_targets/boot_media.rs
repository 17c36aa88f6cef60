//! Fuzzes the boot-media parsers of the migration codec's disk hook
//! (`godwit_image::ramimage`): newc cpio, ELF64 program headers and the
//! bzImage header. The files are named by a VM spec that a peer sends, so
//! they may be anything: the parsers must return an error or extents that
//! lie inside the data, never panic or loop.
#![no_main]

use godwit_image::ramimage::{bzimage_payload, cpio_members, elf_segments, PAGE};
use libfuzzer_sys::fuzz_target;

fn check(data: &[u8], chunks: &[(u64, u32)]) {
    for &(off, len) in chunks {
        assert!(len as u64 <= PAGE && len > 0, "chunk length {len}");
        assert!(off + len as u64 <= data.len() as u64, "chunk beyond the data");
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = cpio_members(data) {
        check(data, &c);
    }
    if let Ok(c) = elf_segments(data) {
        check(data, &c);
    }
    if let Ok(p) = bzimage_payload(data) {
        assert!(p.len() <= data.len());
    }
});
