//! Earlier images: per-VM manifests of the pages a VM had when it last
//! migrated out of this site.
//!
//! A VM that comes back finds most of its memory unchanged; the manifest
//! lets the destination send the source a small Bloom filter of just that
//! VM's pages (kind `Image`) instead of relying on the site-wide one. The
//! pages themselves live in the segment log like any other; the manifest
//! only names them, so the summary covers only hashes the store still holds.
//!
//! VM names come from the control API, so they are checked before they
//! become file names ([`check_vm_name`]).

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};

use godwit_migstream::PageHash;

use crate::error::StoreError;
use crate::format::decode_manifest;

/// Longest VM name accepted: keeps `<name>.img` and its temporaries within
/// every file system's 255-byte name limit.
pub const MAX_VM_NAME_LEN: usize = 128;

/// Checks that `vm` is safe as a single path component.
pub fn check_vm_name(vm: &str) -> Result<(), StoreError> {
    let bad = |why| {
        Err(StoreError::BadVmName {
            name: vm.to_owned(),
            why,
        })
    };
    if vm.is_empty() {
        return bad("empty");
    }
    if vm.len() > MAX_VM_NAME_LEN {
        return bad("too long");
    }
    if vm.contains('/') || vm.contains('\\') {
        return bad("contains a path separator");
    }
    if vm.contains('\0') {
        return bad("contains NUL");
    }
    if vm.contains("..") || vm == "." {
        return bad("contains a relative path component");
    }
    if vm.chars().any(char::is_control) {
        return bad("contains a control character");
    }
    Ok(())
}

/// The manifest file of `vm` under `img_dir` (name already checked).
pub(crate) fn manifest_path(img_dir: &Path, vm: &str) -> PathBuf {
    img_dir.join(format!("{vm}.img"))
}

/// Starts a new manifest for `vm` (an empty file, replacing any earlier).
pub(crate) fn begin(img_dir: &Path, vm: &str) -> Result<(), StoreError> {
    check_vm_name(vm)?;
    let path = manifest_path(img_dir, vm);
    File::create(&path).map_err(StoreError::io("truncate image manifest", &path))?;
    Ok(())
}

/// Appends `hashes` to `vm`'s manifest, creating it if needed. Not synced:
/// a manifest lost in a crash only costs bandwidth on the VM's return.
pub(crate) fn append(img_dir: &Path, vm: &str, hashes: &[PageHash]) -> Result<(), StoreError> {
    check_vm_name(vm)?;
    let path = manifest_path(img_dir, vm);
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(StoreError::io("open image manifest", &path))?;
    // Whole fingerprints only: if an earlier append was torn, realign so
    // the torn bytes do not shift every later fingerprint.
    let len = f
        .metadata()
        .map_err(StoreError::io("stat image manifest", &path))?
        .len();
    if len % 32 != 0 {
        f.set_len(len - len % 32)
            .map_err(StoreError::io("realign image manifest", &path))?;
    }
    let mut w = BufWriter::new(f);
    for h in hashes {
        w.write_all(&h.0)
            .map_err(StoreError::io("append to image manifest", &path))?;
    }
    w.flush()
        .map_err(StoreError::io("append to image manifest", &path))?;
    Ok(())
}

/// The fingerprints in `vm`'s manifest; `Ok(None)` if it has none.
pub(crate) fn read(img_dir: &Path, vm: &str) -> Result<Option<Vec<PageHash>>, StoreError> {
    check_vm_name(vm)?;
    let path = manifest_path(img_dir, vm);
    match fs::read(&path) {
        Ok(b) => Ok(Some(decode_manifest(&b).collect())),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::io("read image manifest", &path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names() {
        for ok in ["vm1", "web-01.prod", "a_b", "x.y.z", ".hidden", "ünïcode"] {
            assert!(check_vm_name(ok).is_ok(), "{ok}");
        }
        let long = "a".repeat(MAX_VM_NAME_LEN + 1);
        for bad in [
            "",
            ".",
            "..",
            "../etc",
            "a/b",
            "/abs",
            "a\\b",
            "a\0b",
            "x..y",
            "tab\tname",
            long.as_str(),
        ] {
            assert!(
                matches!(check_vm_name(bad), Err(StoreError::BadVmName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn torn_manifest_is_realigned_on_append() {
        let d = tempfile::tempdir().unwrap();
        let a = PageHash::of(b"a");
        let b = PageHash::of(b"b");
        append(d.path(), "vm", &[a]).unwrap();
        // A crash tore a second append after 5 bytes.
        let p = manifest_path(d.path(), "vm");
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&b.0[..5]).unwrap();
        drop(f);
        assert_eq!(read(d.path(), "vm").unwrap(), Some(vec![a]));
        append(d.path(), "vm", &[b]).unwrap();
        assert_eq!(read(d.path(), "vm").unwrap(), Some(vec![a, b]));
        begin(d.path(), "vm").unwrap();
        assert_eq!(read(d.path(), "vm").unwrap(), Some(vec![]));
        assert_eq!(read(d.path(), "other").unwrap(), None);
    }
}
