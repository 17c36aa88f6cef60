//! Fuzzes the relay flow window (`godwit_wire::RelayWindow`) with arbitrary
//! sequences of sent/ack/RTT events. Acknowledgements come from the peer
//! agent, so they are untrusted: bogus ones must be rejected, never panic.
//!
//! Input: a sequence of operations, each an opcode byte followed by its
//! argument bytes (missing bytes read as zero):
//!
//! | opcode % 5 | argument | event |
//! |---|---|---|
//! | 0 | u32 | `handle_sent(n)` |
//! | 1 | u16 ms, u32 | time passes, then `handle_ack(acked() + n)` (may exceed `sent`) |
//! | 2 | u16 ms, u64 | time passes, then `handle_ack(n)` (anything at all) |
//! | 3 | u64 µs | `handle_rtt` |
//! | 4 | u16 ms | time passes, then ack everything outstanding |
//!
//! Sent amounts are bounded to u32 per event so the cumulative count cannot
//! overflow u64 (a real stream never gets near). RTTs are any whole number
//! of microseconds, far beyond anything QUIC measures. Time only moves
//! forward, as `Instant` does.
#![no_main]

use std::time::{Duration, Instant};

use godwit_wire::window::{INITIAL_WINDOW, MAX_WINDOW, MIN_WINDOW};
use godwit_wire::RelayWindow;
use libfuzzer_sys::fuzz_target;

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

fn check_invariants(w: &RelayWindow) {
    assert!(w.acked() <= w.sent());
    assert_eq!(w.outstanding(), w.sent() - w.acked());
    let win = w.window();
    assert!(
        win == INITIAL_WINDOW || (MIN_WINDOW..=MAX_WINDOW).contains(&win),
        "window {win} out of bounds"
    );
    assert!(w.available() <= win);
    assert_eq!(w.available(), win.saturating_sub(w.outstanding()));
    if let Some(r) = w.max_rate() {
        assert!(r.is_finite() && r >= 0.0, "bad rate {r}");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader(data);
    let mut w = RelayWindow::new();
    let mut now = Instant::now();
    while let Some(op) = r.u8() {
        match op % 5 {
            0 => w.handle_sent(u64::from(r.u32())),
            1 | 2 => {
                now += Duration::from_millis(u64::from(r.u16()));
                let acked = if op % 5 == 1 {
                    w.acked().saturating_add(u64::from(r.u32()))
                } else {
                    r.u64()
                };
                let (sent, prev) = (w.sent(), w.acked());
                let valid = acked <= sent && acked >= prev;
                match w.handle_ack(now, acked) {
                    Ok(()) => {
                        assert!(valid, "ack {acked} accepted with sent {sent}, prev {prev}");
                        assert_eq!(w.acked(), acked);
                    }
                    Err(_) => {
                        assert!(!valid, "ack {acked} rejected with sent {sent}, prev {prev}");
                        assert_eq!(w.acked(), prev, "a rejected ack changed the state");
                        assert_eq!(w.sent(), sent);
                    }
                }
            }
            3 => w.handle_rtt(Duration::from_micros(r.u64())),
            _ => {
                now += Duration::from_millis(u64::from(r.u16()));
                let all = w.sent();
                assert!(w.handle_ack(now, all).is_ok());
                assert_eq!(w.outstanding(), 0);
            }
        }
        check_invariants(&w);
    }
});
