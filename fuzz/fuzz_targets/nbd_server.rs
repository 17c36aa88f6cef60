//! Fuzzes godwit's NBD server core (`godwit_nbd::ServerConnection`): the
//! fixed-newstyle handshake, option parsing and the transmission-phase
//! request parser, with requests answered by an in-memory export. These are
//! the bytes any local process that can reach the agent's NBD socket sends.
//!
//! Invariants checked:
//! - `handle_input` never panics; an error is sticky;
//! - buffered input stays within the largest message the core accepts;
//! - output is bounded: each fed chunk adds at most a bounded number of
//!   bytes per 16 input bytes (a 28-byte READ of the whole export is the
//!   worst case);
//! - how the bytes are chunked does not change the events, the error or the
//!   amount of output. (The order of replies may change: requests the core
//!   refuses itself are answered at once, valid ones when the harness runs
//!   them, and NBD allows replies in any order.)
#![no_main]

use godwit_nbd::export::{execute, Backend, MemExport};
use godwit_nbd::proto::{
    ExportInfo, ProtoError, ServerConnection, ServerEvent, MAX_OPTION_LEN, MAX_PAYLOAD_LEN,
    REQUEST_HEADER_LEN,
};
use libfuzzer_sys::fuzz_target;

/// Small, so a READ of the whole export stays cheap.
const EXPORT_SIZE: usize = 64 * 1024;

#[derive(Debug, PartialEq)]
struct Outcome {
    events: Vec<ServerEvent>,
    output: Vec<u8>,
    error: Option<ProtoError>,
}

fn run(data: &[u8], chunk: usize) -> Outcome {
    let disk = MemExport::new(EXPORT_SIZE, false);
    let ro = MemExport::new(4096, true);
    let exports: Vec<ExportInfo> = vec![disk.export_info("disk"), ro.export_info("ro")];
    let mut conn = ServerConnection::new(exports);
    let mut events = Vec::new();
    let mut output = Vec::new();
    let mut active: Option<usize> = None;
    let mut error = None;
    while let Some(b) = conn.poll_transmit() {
        output.extend_from_slice(&b);
    }
    for piece in data.chunks(chunk.max(1)) {
        let before = output.len();
        let res = conn.handle_input(piece);
        // Less than one complete message stays buffered: at most an option
        // header plus MAX_OPTION_LEN, or a request header plus a WRITE payload.
        let max_message =
            (16 + MAX_OPTION_LEN as usize).max(REQUEST_HEADER_LEN + MAX_PAYLOAD_LEN as usize);
        assert!(
            conn.buffered_input() < max_message,
            "buffered {} bytes",
            conn.buffered_input()
        );
        while let Some(ev) = conn.poll_event() {
            match &ev {
                ServerEvent::Negotiated(n) => active = Some(n.export),
                ServerEvent::Request(r) => {
                    let backend: &dyn Backend = if active == Some(1) { &ro } else { &disk };
                    let reply = execute(backend, &r.command);
                    conn.handle_reply(r, reply);
                }
                ServerEvent::Disconnect => {}
            }
            events.push(ev);
        }
        while let Some(b) = conn.poll_transmit() {
            output.extend_from_slice(&b);
        }
        let bound = (piece.len() / 16 + 1) * (2 * EXPORT_SIZE + 4096);
        assert!(
            output.len() - before <= bound,
            "{} output bytes for {} input bytes",
            output.len() - before,
            piece.len()
        );
        if let Err(e) = res {
            assert!(conn.is_closed());
            assert_eq!(conn.handle_input(b"more"), Err(e.clone()));
            error = Some(e);
            break;
        }
    }
    Outcome {
        events,
        output,
        error,
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = run(data, data.len());
    for chunk in [1, 5, 16, 28, 100] {
        let split = run(data, chunk);
        assert_eq!(
            split.events, whole.events,
            "chunk size {chunk} changed the events"
        );
        assert_eq!(
            split.error, whole.error,
            "chunk size {chunk} changed the error"
        );
        assert_eq!(
            split.output.len(),
            whole.output.len(),
            "chunk size {chunk} changed the output length"
        );
    }
});
