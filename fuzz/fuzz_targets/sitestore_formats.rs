//! Fuzzes the site store's on-disk formats (`godwit_sitestore::format`):
//! record headers, segment scans, segment indexes and image manifests.
//! The files are ours, but a crash, a full disk or a bad sector can leave
//! anything in them: reading must end in "not valid" (rescan, truncate,
//! skip), never a panic, and a scan must never claim bytes past the end.
#![no_main]

use std::io::Cursor;

use godwit_sitestore::format::{decode_idx, decode_manifest, parse_header, scan_records, RECORD_HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = <&[u8; RECORD_HEADER_LEN]>::try_from(data.get(..RECORD_HEADER_LEN).unwrap_or(&[])) {
        let _ = parse_header(h);
    }
    if let Ok((_, valid)) = scan_records(Cursor::new(data), data.len() as u64) {
        assert!(valid <= data.len() as u64, "valid prefix past the end");
    }
    let _ = decode_idx(data, data.len() as u64);
    let _ = decode_manifest(data).count();
});
