//! The store's error type: every failure names the file and the step.

use std::path::PathBuf;

/// Errors of the site store.
///
/// None of them can make the store return a wrong page: reads that fail
/// verification are misses, not errors. These are the failures of opening,
/// writing and indexing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file-system operation failed.
    #[error("site store: cannot {what} {path}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The operation, as a verb phrase ("open segment", "write index").
        what: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration is out of range.
    #[error("site store: invalid configuration: {0}")]
    Config(String),
    /// A page is larger than a record may hold.
    #[error("site store: a page of {len} bytes exceeds the record limit of {max} bytes")]
    PageTooLarge {
        /// The page's length.
        len: usize,
        /// [`crate::format::MAX_RECORD_DATA`].
        max: usize,
    },
    /// In debug builds, a page whose BLAKE3 is not the fingerprint given.
    #[error("site store: page does not match its fingerprint {hash}")]
    HashMismatch {
        /// The fingerprint given (hex prefix).
        hash: String,
    },
    /// A VM name that is not safe as a file name.
    #[error("site store: invalid VM name {name:?}: {why}")]
    BadVmName {
        /// The name given.
        name: String,
        /// The rule it breaks.
        why: &'static str,
    },
    /// A disk chunk is out of range.
    #[error("site store: disk chunk at offset {offset} of {path} has length {len}: {why}")]
    BadChunk {
        /// The disk file.
        path: PathBuf,
        /// The chunk's file offset.
        offset: u64,
        /// The chunk's length.
        len: u32,
        /// The rule it breaks.
        why: &'static str,
    },
}

impl StoreError {
    /// An [`StoreError::Io`] for `path`.
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> StoreError {
        let path = path.into();
        move |source| StoreError::Io { path, what, source }
    }
}
