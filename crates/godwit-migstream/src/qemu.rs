//! What godwit knows of QEMU's migration stream format, by QEMU version.
//!
//! The constants come from QEMU's `migration/savevm.c`, `migration/ram.c`
//! and `migration/savevm.h` (7.2, with the changes up to 10.x noted in
//! `shared/reference/qemu-migration-stream.md`). The format depends on the
//! QEMU version, so everything version-dependent sits in [`QemuFormat`]:
//! the parser treats any construct the format does not list as unknown and
//! falls back to raw relaying from that byte.

/// `QEMU_VM_FILE_MAGIC`, "QEVM".
pub const FILE_MAGIC: u32 = 0x5145_564d;
/// `QEMU_VM_FILE_VERSION`.
pub const FILE_VERSION: u32 = 3;

/// Top-level section type bytes (savevm.h).
pub mod section {
    /// End of the device stream.
    pub const EOF: u8 = 0x00;
    /// First section of an iterable handler.
    pub const START: u8 = 0x01;
    /// Middle section of an iterable handler.
    pub const PART: u8 = 0x02;
    /// Last section of an iterable handler.
    pub const END: u8 = 0x03;
    /// Whole state of a non-iterable device.
    pub const FULL: u8 = 0x04;
    /// Subsection inside vmstate bodies and the configuration.
    pub const SUBSECTION: u8 = 0x05;
    /// The machine configuration, right after the header.
    pub const CONFIGURATION: u8 = 0x07;
    /// A length-delimited command.
    pub const COMMAND: u8 = 0x08;
    /// Footer after every START/PART/END/FULL body.
    pub const FOOTER: u8 = 0x7e;
}

/// Command numbers (`enum qemu_vm_cmd`, savevm.c).
pub mod command {
    /// Postcopy advise: makes the MEM_SIZE list ambiguous (page sizes).
    pub const POSTCOPY_ADVISE: u16 = 3;
    /// A nested stream whose length follows the command.
    pub const PACKAGED: u16 = 7;
}

/// RAM record flags (ram.c `RAM_SAVE_FLAG_*`).
pub mod ram {
    /// Page of one repeated byte (always 0 in practice).
    pub const ZERO: u64 = 0x002;
    /// The block list (START section only).
    pub const MEM_SIZE: u64 = 0x004;
    /// A literal page.
    pub const PAGE: u64 = 0x008;
    /// End of this section's RAM body.
    pub const EOS: u64 = 0x010;
    /// Same block as the previous record on this channel.
    pub const CONTINUE: u64 = 0x020;
    /// Multifd flush barrier (8.1+), no payload.
    pub const MULTIFD_FLUSH: u64 = 0x200;
    /// Mask of the flag bits (below the smallest target page).
    pub const FLAG_MASK: u64 = 0x3ff;
}

/// x86's target page size; every page record carries this many bytes.
pub const PAGE_SIZE: usize = 4096;
/// The section idstr of RAM.
pub const RAM_IDSTR: &[u8] = b"ram";
/// The validated capability that adds a GPA to each MEM_SIZE entry.
pub const CAP_IGNORE_SHARED: &[u8] = b"x-ignore-shared";

/// Version-dependent rules of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QemuFormat {
    /// QEMU release this format describes, (major, minor).
    pub version: (u16, u16),
    /// `RAM_SAVE_FLAG_MULTIFD_FLUSH` may appear in RAM bodies (8.1+).
    pub multifd_flush: bool,
}

impl QemuFormat {
    /// The format of QEMU `major.minor`. Versions before 7.2 are treated as
    /// 7.2 (the RAM format godwit relies on is unchanged since 4.x);
    /// later ones gain the constructs listed in the reference notes.
    pub fn for_version(major: u16, minor: u16) -> Self {
        QemuFormat {
            version: (major, minor),
            multifd_flush: (major, minor) >= (8, 1),
        }
    }
}

impl Default for QemuFormat {
    /// QEMU 7.2, the deployment baseline.
    fn default() -> Self {
        Self::for_version(7, 2)
    }
}
