//! Fuzzes the agent-to-agent frame codec (`godwit_wire::FrameCodec`) and the
//! JSON messages carried in `Open`/`Control` frames: everything a peer agent
//! (or anyone who got past TLS) can put on a QUIC stream.
//!
//! Invariants checked:
//! - decoding never panics; `check` agrees with `decode`;
//! - feeding the same bytes in small chunks yields the same frames and the
//!   same terminal error as feeding them at once (partial frames consume
//!   nothing);
//! - every decoded frame re-encodes to exactly the bytes it came from
//!   (except `Abort` with invalid UTF-8, which is decoded lossily);
//! - a control message that parses re-encodes into a frame that parses back
//!   to the same message (when it holds no float, which JSON may round).
#![no_main]

use bytes::BytesMut;
use godwit_wire::{
    ControlEnvelope, ControlResponse, Frame, FrameCodec, MemoryOpen, WireError, FRAME_HEADER_LEN,
    MAX_FRAME_LEN,
};
use libfuzzer_sys::fuzz_target;
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;

/// Result of decoding a whole input: the frames, then either the error that
/// stopped decoding or how many bytes were left waiting for more.
#[derive(Debug, PartialEq)]
struct Decoded {
    frames: Vec<Frame>,
    end: Result<usize, WireError>,
}

fn decode_all_at_once(data: &[u8]) -> Decoded {
    let mut buf = BytesMut::from(data);
    let mut frames = Vec::new();
    loop {
        let before = buf.len();
        let checked = FrameCodec::check(&buf);
        let snapshot = buf.clone();
        match FrameCodec::decode(&mut buf) {
            Ok(Some(frame)) => {
                let consumed = before - buf.len();
                assert_eq!(checked, Ok(Some(consumed)), "check disagrees with decode");
                check_reencode(&frame, &snapshot[..consumed]);
                check_json(&frame);
                frames.push(frame);
            }
            Ok(None) => {
                assert_eq!(checked, Ok(None), "check disagrees with decode");
                assert_eq!(buf.len(), before, "a partial frame consumed bytes");
                return Decoded {
                    frames,
                    end: Ok(buf.len()),
                };
            }
            Err(e) => {
                // Header errors come from `check`; payload layout errors
                // (Ack/End length) only once the whole frame is there.
                if let Err(ce) = &checked {
                    assert_eq!(ce, &e);
                }
                return Decoded {
                    frames,
                    end: Err(e),
                };
            }
        }
    }
}

fn decode_in_chunks(data: &[u8], chunk: usize) -> Decoded {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match FrameCodec::decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    return Decoded {
                        frames,
                        end: Err(e),
                    }
                }
            }
        }
    }
    Decoded {
        frames,
        end: Ok(buf.len()),
    }
}

fn check_reencode(frame: &Frame, original: &[u8]) {
    if let Frame::Abort(_) = frame {
        if std::str::from_utf8(&original[FRAME_HEADER_LEN..]).is_err() {
            // Decoded lossily: U+FFFD replaces the bad bytes, so the
            // re-encoding legitimately differs.
            return;
        }
    }
    let mut out = BytesMut::new();
    FrameCodec::encode(frame, &mut out);
    assert_eq!(frame.encoded_len(), out.len());
    assert_eq!(
        &out[..],
        original,
        "frame {frame:?} does not re-encode to its bytes"
    );
}

fn has_float(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Number(n) => n.is_f64(),
        serde_json::Value::Array(a) => a.iter().any(has_float),
        serde_json::Value::Object(o) => o.values().any(has_float),
        _ => false,
    }
}

fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + Debug>(frame: &Frame) {
    let Ok(msg) = frame.json::<T>() else { return };
    let again = match frame {
        Frame::Open(_) => Frame::open(&msg),
        _ => Frame::control(&msg),
    };
    if again.encoded_len() - FRAME_HEADER_LEN > MAX_FRAME_LEN {
        // Re-serialising can lengthen numbers ("1e5" -> "100000.0").
        return;
    }
    let back: T = again
        .json()
        .unwrap_or_else(|e| panic!("re-encoded {msg:?} does not parse: {e}"));
    let has_float = serde_json::to_value(&msg).map_or(true, |v| has_float(&v));
    if !has_float {
        assert_eq!(back, msg);
    }
}

fn check_json(frame: &Frame) {
    match frame {
        Frame::Open(_) | Frame::Control(_) => {
            roundtrip::<ControlEnvelope>(frame);
            roundtrip::<ControlResponse>(frame);
            roundtrip::<MemoryOpen>(frame);
            if let Ok(env) = frame.json::<ControlEnvelope>() {
                // The server negotiates with whatever range the peer sent.
                let _ = godwit_wire::VersionRange::ours().negotiate(env.versions);
            }
        }
        other => {
            assert!(other.json::<serde_json::Value>().is_err());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = decode_all_at_once(data);
    // QUIC hands over arbitrary slices; the codec must not care where.
    for chunk in [1, 3, 8, 9, 64] {
        let split = decode_in_chunks(data, chunk);
        assert_eq!(split, whole, "chunk size {chunk} changed the outcome");
    }
});
