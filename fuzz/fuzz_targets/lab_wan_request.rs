//! Fuzzes the WAN emulator's control protocol (`godwit_lab::wan`): each line
//! on the control socket is parsed as a [`WanRequest`], `set_link`
//! parameters are validated (`LinkParamsUpdate::validate`, the check the
//! daemon runs before the data plane sees them), and accepted parameters are
//! applied to a live [`Link`] that then carries a few packets, as the daemon
//! would.
//!
//! The daemon's own `check_request` is private; it adds only the site-name
//! lookup on top of `validate`.
//!
//! Invariants checked:
//! - parsing, validation and applying never panic;
//! - a parsed request serialises and parses back (equal unless it holds a
//!   float, which JSON may round);
//! - with validated parameters the link never panics, never reorders
//!   packets, delivers only packets it accepted, and delivers each one
//!   at its `poll_timeout`.
#![no_main]

use std::time::{Duration, Instant};

use godwit_lab::link::{Link, LinkParams};
use godwit_lab::wan::WanRequest;
use libfuzzer_sys::fuzz_target;

/// Packets pushed through a link per accepted `set_link`.
const PACKETS: usize = 16;

fn has_float(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Number(n) => n.is_f64(),
        serde_json::Value::Array(a) => a.iter().any(has_float),
        serde_json::Value::Object(o) => o.values().any(has_float),
        _ => false,
    }
}

/// Drives one link with `params` and packet sizes taken from `sizes`.
fn exercise_link(start: LinkParams, params: LinkParams, sizes: &[u8], seed: u64) {
    let t0 = Instant::now();
    let mut link: Link<usize> = Link::new(start, seed);
    let mut now = t0;
    let mut offered = Vec::new();
    let mut delivered = Vec::new();
    let mut next_size = sizes.iter().cycle();
    for i in 0..PACKETS {
        if i == PACKETS / 2 {
            // Change parameters with packets in flight, as `set_link` does.
            let _flushed = link.set_params(params.clone());
        }
        let b = usize::from(*next_size.next().unwrap_or(&0));
        let len = 20 + b * 257; // 20..=65_555 bytes, about IPv4's range
        now += Duration::from_micros((b as u64) * 37);
        if link.handle_packet(now, len, i).is_ok() {
            offered.push((i, now));
        }
        while let Some(p) = link.poll_deliver(now) {
            delivered.push(p);
        }
        let snap = link.snapshot(now);
        assert!(serde_json::to_string(&snap).is_ok());
    }
    // Let everything due arrive: validated delays are at most
    // godwit_lab::MAX_DELAY; serialisation may take longer at low rates.
    while let Some(at) = link.poll_timeout() {
        now = now.max(at);
        let p = link
            .poll_deliver(now)
            .expect("a packet due at its poll_timeout");
        delivered.push(p);
    }
    // No reordering: deliveries are an ordered subsequence of what was accepted.
    assert!(
        delivered.windows(2).all(|w| w[0] < w[1]),
        "reordered: {delivered:?}"
    );
    let accepted: Vec<usize> = offered.iter().map(|&(i, _)| i).collect();
    let mut it = accepted.iter();
    assert!(
        delivered.iter().all(|d| it.any(|a| a == d)),
        "delivered {delivered:?} not a subsequence of accepted {accepted:?}"
    );
}

fn check_line(line: &str, seed: u64) {
    if line.trim().is_empty() {
        return;
    }
    let Ok(req) = serde_json::from_str::<WanRequest>(line) else {
        return;
    };
    let text = serde_json::to_string(&req).expect("a request always serialises");
    let back: WanRequest = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("re-encoded {req:?} as {text:?} does not parse: {e}"));
    let floaty = serde_json::to_value(&req).map_or(true, |v| has_float(&v));
    if !floaty {
        assert_eq!(back, req);
    }
    if let WanRequest::SetLink { params, .. } = &req {
        if params.validate().is_ok() {
            let mut p = LinkParams::default();
            p.apply(params);
            // From an idle default link, and from a slow lossy one with a
            // queue, so that the change hits packets in flight.
            exercise_link(LinkParams::default(), p.clone(), line.as_bytes(), seed);
            let slow = LinkParams {
                rate_bps: 1_000_000,
                delay: Duration::from_millis(5),
                jitter: Duration::from_millis(2),
                loss: 0.1,
                queue_bytes: Some(64 * 1024),
                cut: false,
            };
            let mut q = slow.clone();
            q.apply(params);
            exercise_link(slow, q, line.as_bytes(), seed);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The daemon reads lines with `BufRead::lines`: invalid UTF-8 ends the
    // connection before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let seed = data.len() as u64;
    for line in text.lines() {
        check_line(line, seed);
    }
});
