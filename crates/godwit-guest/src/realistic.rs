//! The realistic memory load: page cache and anonymous memory built from
//! real files, for honest dedup and compression figures.
//!
//! Random bytes make compression look useless and zeros make it look
//! magic; a real guest is neither. This module reads a corpus of real
//! files (the image ships kernel modules and package documentation at
//! `/corpus`) and:
//!
//! * **page cache**: reads every corpus file, then copies `cache_mib` MiB
//!   of it into a tmpfs directory, so the same data sits in the cache
//!   twice, as on a real system (package files plus a copy in a container
//!   layer or a build tree). In the test image the corpus lives in the
//!   initramfs, i.e. already in memory; the copy is the part this load
//!   adds;
//! * **anonymous memory**: builds what programs actually keep on the heap
//!   from such data, in phases that each get a share of `anon_mib`
//!   ([`PHASE_SHARES`]):
//!   1. file contents loaded into buffers;
//!   2. a table of line records (text lines, and printable strings from
//!      binaries) with hashes, sorted by text, as an index or database
//!      would hold;
//!   3. an inverted word index (`HashMap<String, Vec<u32>>`);
//!   4. a JSON re-encoding of the records, as a service caching responses.
//!
//!   If the target exceeds what one round yields, later rounds repeat the
//!   phases (the data repeats, like several worker processes would).

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::proto::RealisticStats;
use crate::sys;

/// Where the image ships the corpus.
pub const DEFAULT_CORPUS_DIR: &str = "/corpus";

/// Where the second cached copy goes; the image's init mounts a tmpfs on
/// `/tmp`.
pub const DEFAULT_TMPFS_DIR: &str = "/tmp/godwit-cache";

/// Cumulative share of the anonymous target given to phases 1..=4 of a
/// round, so even a small target holds every kind of structure.
pub const PHASE_SHARES: [f64; 4] = [0.4, 0.7, 0.85, 1.0];

/// Rounds over the corpus before giving up on reaching `anon_mib`: bounds
/// the build time when the corpus is tiny or unreadable.
pub const MAX_ROUNDS: u32 = 64;

/// Shortest run of printable bytes kept as a string from a binary file
/// (the `strings(1)` default).
pub const MIN_STRING_LEN: usize = 4;

/// Estimated per-allocation overhead of a heap object (malloc header and
/// rounding), used in our accounting of what we built.
const ALLOC_OVERHEAD: u64 = 16;

/// Errors of the realistic load.
#[derive(Debug, thiserror::Error)]
pub enum RealisticError {
    /// The corpus has no readable files.
    #[error("corpus {dir} has no readable files")]
    EmptyCorpus {
        /// Corpus directory.
        dir: PathBuf,
    },
    /// Copying into tmpfs failed.
    #[error("cannot copy corpus into {dir}")]
    Copy {
        /// Target directory.
        dir: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// What to build.
#[derive(Debug, Clone)]
pub struct RealisticConfig {
    /// Corpus directory.
    pub corpus: PathBuf,
    /// tmpfs directory for the second cached copy.
    pub tmpfs_dir: PathBuf,
    /// Anonymous memory to build, MiB.
    pub anon_mib: u64,
    /// Size of the tmpfs copy, MiB.
    pub cache_mib: u64,
}

impl RealisticConfig {
    /// Defaults for the shipped image.
    pub fn new(anon_mib: u64, cache_mib: u64) -> Self {
        Self {
            corpus: PathBuf::from(DEFAULT_CORPUS_DIR),
            tmpfs_dir: PathBuf::from(DEFAULT_TMPFS_DIR),
            anon_mib,
            cache_mib,
        }
    }
}

/// One line of text (or string from a binary) with where it came from.
#[derive(Debug, Clone)]
pub struct Record {
    /// FNV-1a hash of the text.
    pub hash: u64,
    /// Index of the corpus file.
    pub file: u32,
    /// Line (or string) number in the file.
    pub line: u32,
    /// The text.
    pub text: String,
}

/// The anonymous-memory structures, kept alive while the load is held.
#[derive(Default)]
pub struct Built {
    buffers: Vec<Vec<u8>>,
    records: Vec<Vec<Record>>,
    index: Vec<HashMap<String, Vec<u32>>>,
    json: Vec<Vec<String>>,
}

impl Built {
    /// Number of line records held, over all rounds.
    pub fn record_count(&self) -> usize {
        self.records.iter().map(Vec::len).sum()
    }
}

/// A realistic load being built or held.
pub struct Realistic {
    stats: Arc<Mutex<RealisticStats>>,
    built: Arc<Mutex<Option<Built>>>,
}

impl Realistic {
    /// Build synchronously (call from a worker thread).
    pub fn build(cfg: &RealisticConfig) -> Self {
        let this = Self {
            stats: Arc::new(Mutex::new(RealisticStats::default())),
            built: Arc::new(Mutex::new(None)),
        };
        let res = build_into(cfg, &this.stats);
        let mut st = this.stats.lock().unwrap_or_else(PoisonError::into_inner);
        match res {
            Ok(b) => {
                *this.built.lock().unwrap_or_else(PoisonError::into_inner) = Some(b);
                st.ready = true;
            }
            Err(e) => st.error = Some(error_chain(&e)),
        }
        st.rss_anon_bytes = sys::rss_anon_bytes();
        drop(st);
        this
    }

    /// Figures (RssAnon refreshed).
    pub fn stats(&self) -> RealisticStats {
        let mut st = self
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        st.rss_anon_bytes = sys::rss_anon_bytes();
        st
    }

    /// Record count of the built structures (0 if the build failed).
    pub fn record_count(&self) -> usize {
        self.built
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or(0, Built::record_count)
    }
}

/// Render an error with its sources, `a: b: c`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// All regular files under `dir`, sorted for determinism.
pub fn corpus_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for entry in rd.flatten() {
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_file() {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    out
}

/// FNV-1a over bytes.
pub fn fnv1a(data: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Whether data looks like text (no NUL in the first 4 KiB).
fn is_text(data: &[u8]) -> bool {
    !data[..data.len().min(4096)].contains(&0)
}

/// Lines of a text file, or printable strings of a binary one.
pub fn extract_strings(data: &[u8]) -> Vec<String> {
    if is_text(data) {
        return String::from_utf8_lossy(data)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_owned)
            .collect();
    }
    let mut out = Vec::new();
    let mut start = None;
    for (i, b) in data.iter().enumerate() {
        let printable = b.is_ascii_graphic() || *b == b' ' || *b == b'\t';
        match (printable, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                if i - s >= MIN_STRING_LEN {
                    out.push(String::from_utf8_lossy(&data[s..i]).into_owned());
                }
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        if data.len() - s >= MIN_STRING_LEN {
            out.push(String::from_utf8_lossy(&data[s..]).into_owned());
        }
    }
    out
}

fn read_file(path: &Path) -> Option<Vec<u8>> {
    let mut f = fs::File::open(path).ok()?;
    let mut v = Vec::new();
    f.read_to_end(&mut v).ok()?;
    Some(v)
}

fn build_into(
    cfg: &RealisticConfig,
    stats: &Mutex<RealisticStats>,
) -> Result<Built, RealisticError> {
    let update = |f: &dyn Fn(&mut RealisticStats)| {
        f(&mut stats.lock().unwrap_or_else(PoisonError::into_inner));
    };
    let files = corpus_files(&cfg.corpus);
    let anon_target = cfg.anon_mib << 20;
    let cache_target = cfg.cache_mib << 20;

    // Page cache, first copy: read everything once.
    let mut corpus_bytes = 0u64;
    let mut readable = Vec::new();
    for path in &files {
        if let Some(data) = read_file(path) {
            corpus_bytes += data.len() as u64;
            readable.push(path.clone());
            update(&|s| {
                s.files += 1;
                s.cache_read_bytes = corpus_bytes;
            });
        }
    }
    if readable.is_empty() {
        return Err(RealisticError::EmptyCorpus {
            dir: cfg.corpus.clone(),
        });
    }

    // Page cache, second copy: tmpfs copies until the target is reached.
    let mut copied = 0u64;
    let mut round = 0u32;
    'copy: while copied < cache_target && round < MAX_ROUNDS {
        let dir = cfg.tmpfs_dir.join(format!("copy{round}"));
        for (i, path) in readable.iter().enumerate() {
            if copied >= cache_target {
                break 'copy;
            }
            let name = path.file_name().map_or_else(
                || format!("f{i}"),
                |n| format!("{i}-{}", n.to_string_lossy()),
            );
            fs::create_dir_all(&dir).map_err(|source| RealisticError::Copy {
                dir: dir.clone(),
                source,
            })?;
            let n = fs::copy(path, dir.join(name)).map_err(|source| RealisticError::Copy {
                dir: dir.clone(),
                source,
            })?;
            copied += n;
            update(&|s| s.tmpfs_copy_bytes = copied);
        }
        round += 1;
    }

    // Anonymous memory, in phases, until the target is reached.
    let mut built = Built::default();
    let mut anon = 0u64;
    let account = |anon: u64| update(&|s| s.anon_built_bytes = anon);
    let mut round = 0u32;
    while anon < anon_target && round < MAX_ROUNDS {
        let base = anon;
        let rem = (anon_target - anon) as f64;
        let limit = |phase: usize| base + (rem * PHASE_SHARES[phase]) as u64;
        // Phase 1: file buffers.
        let mut bufs = Vec::new();
        for path in &readable {
            if anon >= limit(0) {
                break;
            }
            if let Some(data) = read_file(path) {
                anon += data.capacity() as u64 + ALLOC_OVERHEAD;
                bufs.push(data);
            }
        }
        built.buffers.append(&mut bufs);
        account(anon);
        // Phase 2: sorted record table.
        let mut records = Vec::new();
        for (fi, path) in readable.iter().enumerate() {
            if anon >= limit(1) {
                break;
            }
            let Some(data) = read_file(path) else {
                continue;
            };
            for (li, text) in extract_strings(&data).into_iter().enumerate() {
                anon += (std::mem::size_of::<Record>() + text.capacity()) as u64 + ALLOC_OVERHEAD;
                records.push(Record {
                    hash: fnv1a(text.as_bytes()),
                    // Fits: corpora have far fewer than 2^32 files/lines;
                    // saturate rather than wrap if not.
                    file: u32::try_from(fi).unwrap_or(u32::MAX),
                    line: u32::try_from(li).unwrap_or(u32::MAX),
                    text,
                });
            }
        }
        records.sort_unstable_by(|a, b| a.text.cmp(&b.text).then(a.file.cmp(&b.file)));
        account(anon);
        // Phase 3: inverted word index over the records.
        let mut index: HashMap<String, Vec<u32>> = HashMap::new();
        for (ri, r) in records.iter().enumerate() {
            if anon >= limit(2) {
                break;
            }
            for word in r
                .text
                .split(|c: char| !c.is_alphanumeric() && c != '_')
                .filter(|w| w.len() >= 3)
            {
                let ri = u32::try_from(ri).unwrap_or(u32::MAX);
                match index.get_mut(word) {
                    Some(v) => {
                        if v.len() == v.capacity() {
                            anon += (v.capacity().max(4) * 4) as u64;
                        }
                        v.push(ri);
                    }
                    None => {
                        anon += (word.len() + 48 + 16) as u64 + 2 * ALLOC_OVERHEAD;
                        index.insert(word.to_owned(), vec![ri]);
                    }
                }
            }
        }
        account(anon);
        // Phase 4: JSON re-encoding of the records.
        let mut json = Vec::new();
        for r in &records {
            if anon >= limit(3) {
                break;
            }
            let s = serde_json::json!({
                "hash": format!("{:016x}", r.hash),
                "file": r.file,
                "line": r.line,
                "text": r.text,
            })
            .to_string();
            anon += (s.capacity() + 24) as u64 + ALLOC_OVERHEAD;
            json.push(s);
        }
        account(anon);
        built.records.push(records);
        built.index.push(index);
        built.json.push(json);
        round += 1;
    }
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_from_text_and_binary() {
        assert_eq!(
            extract_strings(b"a b\n\nsecond line\n"),
            ["a b", "second line"]
        );
        let bin = b"\x7fELF\0\0module_init\0ab\0vermagic=6.1\x01xyz";
        assert_eq!(extract_strings(bin), ["module_init", "vermagic=6.1"]);
    }

    #[test]
    fn builds_from_a_small_corpus() {
        let dir = std::env::temp_dir().join(format!("godwit-realistic-{}", std::process::id()));
        let corpus = dir.join("corpus");
        fs::create_dir_all(corpus.join("sub")).unwrap();
        // Real-ish text: this crate's own sources, repeated.
        for (i, src) in [include_str!("lib.rs"), include_str!("proto.rs")]
            .iter()
            .enumerate()
        {
            fs::write(corpus.join(format!("t{i}.txt")), src.repeat(20)).unwrap();
        }
        let mut bin = Vec::new();
        for i in 0..50_000u32 {
            bin.extend_from_slice(&i.to_le_bytes());
            bin.extend_from_slice(b"symbol_name\0");
        }
        fs::write(corpus.join("sub/m.ko"), &bin).unwrap();
        let cfg = RealisticConfig {
            corpus,
            tmpfs_dir: dir.join("tmpfs"),
            anon_mib: 4,
            cache_mib: 2,
        };
        let r = Realistic::build(&cfg);
        let st = r.stats();
        assert!(st.ready, "{st:?}");
        assert_eq!(st.files, 3);
        assert!(st.anon_built_bytes >= 4 << 20, "{st:?}");
        assert!(st.tmpfs_copy_bytes >= 2 << 20, "{st:?}");
        assert!(st.cache_read_bytes > 0, "{st:?}");
        assert!(r.record_count() > 1000);
        fs::remove_dir_all(&dir).unwrap();

        let bad = Realistic::build(&RealisticConfig::new(1, 1).with_corpus("/nonexistent"));
        assert!(bad.stats().error.unwrap().contains("no readable files"));
    }

    impl RealisticConfig {
        fn with_corpus(mut self, dir: &str) -> Self {
            self.corpus = dir.into();
            self
        }
    }
}
