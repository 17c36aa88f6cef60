//! Fuzzes the sans-IO QMP connection (`godwit_qmp::QmpConnection`) with
//! arbitrary bytes from the "QEMU" side of the socket. A compromised or
//! buggy QEMU must not be able to panic the agent.
//!
//! Invariants checked:
//! - `handle_input` never panics; after an error the connection is failed
//!   and stays so (`Poisoned`);
//! - the first output, if any, is the greeting, and there is only one;
//! - how the bytes are chunked does not change the outputs or the error.
#![no_main]

use godwit_qmp::{CodecError, QmpConnection, QmpOutput};
use libfuzzer_sys::fuzz_target;

/// Outputs in order, and the first error (if any).
#[derive(Debug, PartialEq)]
struct Outcome {
    outputs: Vec<QmpOutput>,
    error: Option<CodecError>,
}

fn run(data: &[u8], chunk: usize) -> Outcome {
    let mut conn = QmpConnection::new();
    let mut outputs = Vec::new();
    let mut error = None;
    for piece in data.chunks(chunk) {
        let res = conn.handle_input(piece);
        while let Some(out) = conn.poll_event() {
            outputs.push(out);
        }
        if let Err(e) = res {
            assert!(conn.is_failed());
            assert_eq!(conn.handle_input(b"\n"), Err(CodecError::Poisoned));
            assert!(conn.poll_event().is_none());
            error = Some(e);
            break;
        }
        assert!(!conn.is_failed());
    }
    let greetings = outputs
        .iter()
        .filter(|o| matches!(o, QmpOutput::Greeting(_)))
        .count();
    assert!(greetings <= 1, "{greetings} greetings accepted");
    if let Some(first) = outputs.first() {
        assert!(
            matches!(first, QmpOutput::Greeting(_)),
            "first output {first:?}"
        );
        assert!(conn.is_greeted());
    }
    // The owner may send commands at any point; that must not disturb parsing state.
    if !conn.is_failed() {
        let id = conn.send_command("query-status", None);
        assert!(id >= 1);
        let line = conn.poll_transmit().expect("a queued command");
        assert_eq!(line.last(), Some(&b'\n'));
    }
    Outcome { outputs, error }
}

fuzz_target!(|data: &[u8]| {
    let whole = run(data, data.len().max(1));
    // A unix socket read returns any prefix; the result must not depend on it.
    for chunk in [1, 7, 64] {
        assert_eq!(
            run(data, chunk),
            whole,
            "chunk size {chunk} changed the outcome"
        );
    }
});
