//! Per-batch compression and the choice of codec.
//!
//! Each batch is compressed on its own (so a batch decodes without its
//! predecessors) with one of [`Codec`]. Which one is a question of what
//! limits the migration: on a slow link every byte saved shortens it, on a
//! fast one the compressor's CPU time is the bottleneck. The
//! [`CodecChooser`] keeps a running estimate of each codec's speed
//! (input bytes per CPU-second, measured on the batches it compressed) and
//! ratio, and picks the codec that minimises `max(cpu time, wire time)`
//! for the link rate the relay measures. Every [`PROBE_EVERY`]-th batch
//! is compressed with every codec, so the ratios are compared on the same
//! data and the estimates follow it.

use std::time::Duration;

use crate::CodecError;

/// zstd level: level 1 gives most of zstd's ratio at 2–3× the speed of
/// level 3 on page data (shared/reference/performance-anchors.md §5b).
pub const ZSTD_LEVEL: i32 = 1;
/// One batch in [`PROBE_EVERY`] is compressed with every codec.
pub const PROBE_EVERY: u64 = 32;
/// Weight of a new sample in the running estimates.
const EWMA: f64 = 0.2;

/// Batch codecs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Codec {
    /// Stored as is.
    None = 0,
    /// LZ4 block.
    Lz4 = 1,
    /// zstd frame at [`ZSTD_LEVEL`].
    Zstd = 2,
}

impl Codec {
    /// All codecs.
    pub const ALL: [Codec; 3] = [Codec::None, Codec::Lz4, Codec::Zstd];

    /// From its wire byte.
    pub fn from_u8(b: u8) -> Result<Self, CodecError> {
        match b {
            0 => Ok(Codec::None),
            1 => Ok(Codec::Lz4),
            2 => Ok(Codec::Zstd),
            _ => Err(CodecError::Malformed("unknown batch codec")),
        }
    }

    /// Lower-case name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }
}

/// Reusable compression state (a zstd context costs more to set up than
/// to compress a batch).
pub struct Compressor {
    zstd: zstd::bulk::Compressor<'static>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compressor")
    }
}

impl Compressor {
    /// A compressor.
    pub fn new() -> Result<Self, CodecError> {
        let zstd = zstd::bulk::Compressor::new(ZSTD_LEVEL)
            .map_err(|_| CodecError::Compress("zstd context"))?;
        Ok(Compressor { zstd })
    }

    /// Compresses `raw` with `codec`, appending to `out`.
    pub fn compress(
        &mut self,
        codec: Codec,
        raw: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), CodecError> {
        if codec == Codec::Zstd {
            let c = self
                .zstd
                .compress(raw)
                .map_err(|_| CodecError::Compress("zstd failed"))?;
            out.extend_from_slice(&c);
            return Ok(());
        }
        compress(codec, raw, out)
    }
}

/// Compresses `raw` with `codec`, appending to `out` (one-off; see
/// [`Compressor`] for repeated use).
pub fn compress(codec: Codec, raw: &[u8], out: &mut Vec<u8>) -> Result<(), CodecError> {
    match codec {
        Codec::None => out.extend_from_slice(raw),
        Codec::Lz4 => {
            let start = out.len();
            out.resize(
                start + lz4_flex::block::get_maximum_output_size(raw.len()),
                0,
            );
            let n = lz4_flex::block::compress_into(raw, &mut out[start..])
                .map_err(|_| CodecError::Compress("lz4 output buffer too small"))?;
            out.truncate(start + n);
        }
        Codec::Zstd => {
            let c = zstd::bulk::compress(raw, ZSTD_LEVEL)
                .map_err(|_| CodecError::Compress("zstd failed"))?;
            out.extend_from_slice(&c);
        }
    }
    Ok(())
}

/// Decompresses `data` that must expand to exactly `raw_len` bytes.
pub fn decompress(codec: Codec, data: &[u8], raw_len: usize) -> Result<Vec<u8>, CodecError> {
    let out = match codec {
        Codec::None => data.to_vec(),
        Codec::Lz4 => lz4_flex::block::decompress(data, raw_len)
            .map_err(|_| CodecError::Malformed("bad lz4 block"))?,
        Codec::Zstd => {
            // `decompress` trusts its capacity argument as an upper bound
            // only; the length check below makes it exact.
            let mut d = zstd::bulk::Decompressor::new()
                .map_err(|_| CodecError::Malformed("zstd context"))?;
            d.decompress(data, raw_len)
                .map_err(|_| CodecError::Malformed("bad zstd frame"))?
        }
    };
    if out.len() != raw_len {
        return Err(CodecError::Malformed(
            "batch length differs from its header",
        ));
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy)]
struct Estimate {
    /// Input bytes per CPU-second.
    speed: f64,
    /// Output over input.
    ratio: f64,
}

/// Chooses each batch's codec. See the module docs.
#[derive(Debug, Clone)]
pub struct CodecChooser {
    est: [Estimate; 3],
    batches: u64,
}

impl Default for CodecChooser {
    fn default() -> Self {
        // Priors from shared/reference/performance-anchors.md §5b (one core,
        // page data): refined by the first samples.
        CodecChooser {
            est: [
                Estimate {
                    speed: 20e9,
                    ratio: 1.0,
                },
                Estimate {
                    speed: 0.9e9,
                    ratio: 0.45,
                },
                Estimate {
                    speed: 0.5e9,
                    ratio: 0.3,
                },
            ],
            batches: 0,
        }
    }
}

impl CodecChooser {
    /// Whether the next batch should be compressed with every codec.
    pub fn probe_now(&mut self) -> bool {
        self.batches += 1;
        self.batches % PROBE_EVERY == 1
    }

    /// The codec for the next batch, given the link's rate in bytes per
    /// second (`None` before the relay has measured it).
    pub fn choose(&self, link_rate: Option<f64>) -> Codec {
        // Unknown link: assume it is the scarce resource (a WAN).
        let Some(rate) = link_rate.filter(|r| *r > 0.0) else {
            return Codec::Zstd;
        };
        Codec::ALL
            .iter()
            .copied()
            .min_by(|a, b| self.cost(*a, rate).total_cmp(&self.cost(*b, rate)))
            .unwrap_or(Codec::Zstd)
    }

    /// Seconds per input byte with `codec` on a link of `rate` bytes/s.
    fn cost(&self, codec: Codec, rate: f64) -> f64 {
        let e = self.est[codec as usize];
        (1.0 / e.speed).max(e.ratio / rate)
    }

    /// Records how a batch compressed.
    pub fn record(&mut self, codec: Codec, raw: usize, out: usize, cpu: Duration) {
        if raw == 0 {
            return;
        }
        let e = &mut self.est[codec as usize];
        let secs = cpu.as_secs_f64().max(1e-7);
        e.speed = (1.0 - EWMA) * e.speed + EWMA * (raw as f64 / secs);
        e.ratio = (1.0 - EWMA) * e.ratio + EWMA * (out as f64 / raw as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codecs_roundtrip() {
        let raw: Vec<u8> = (0..100_000u32).map(|i| (i % 97) as u8).collect();
        for c in Codec::ALL {
            let mut out = Vec::new();
            compress(c, &raw, &mut out).unwrap();
            assert_eq!(decompress(c, &out, raw.len()).unwrap(), raw);
            assert!(decompress(c, &out, raw.len() + 1).is_err());
        }
    }

    #[test]
    fn slow_link_prefers_zstd_fast_link_prefers_speed() {
        let mut ch = CodecChooser::default();
        assert_eq!(ch.choose(Some(12.5e6)), Codec::Zstd);
        // A 100 Gbit/s link: compression would be the bottleneck.
        assert_eq!(ch.choose(Some(12.5e9)), Codec::None);
        // If zstd turns out slow, a 5 Gbit/s link prefers lz4.
        for _ in 0..20 {
            ch.record(Codec::Zstd, 1 << 20, 300 << 10, Duration::from_millis(10));
        }
        assert_eq!(ch.choose(Some(0.625e9)), Codec::Lz4);
    }

    #[test]
    fn probes_now_and_then() {
        let mut ch = CodecChooser::default();
        let probes = (0..PROBE_EVERY * 4).filter(|_| ch.probe_now()).count();
        assert_eq!(probes, 4);
    }
}
