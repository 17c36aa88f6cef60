//! What a VM is (`VmSpec`) and how this host runs QEMU (`HostConfig`).
//!
//! A `VmSpec` fully determines the guest-visible device set. Live migration
//! requires an identical device set on both ends, so the spec is resolved
//! once at create time (for example the machine alias `pc` becomes the
//! concrete `pc-i440fx-7.2`) and then carried unchanged to every host.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::QemuError;

/// Longest VM name. Names become file and socket names, and unix socket
/// paths are limited to 107 bytes, so names must stay short.
pub const MAX_VM_NAME_LEN: usize = 48;

/// Largest accepted guest RAM, MiB (4 TiB): a sanity bound against typos
/// such as bytes given as MiB.
pub const MAX_MEMORY_MIB: u64 = 4 * 1024 * 1024;

/// Most vCPUs accepted; QEMU's `pc` machine allows 255.
pub const MAX_VCPUS: u32 = 255;

/// Accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Software emulation (dev hosts whose KVM cannot boot guests).
    Tcg,
    /// Hardware virtualisation (production).
    Kvm,
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Image path.
    pub path: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
    /// Open read-only.
    #[serde(default)]
    pub readonly: bool,
}

/// Host side of the NIC. Pluggable: the device is the same whatever the
/// backend, so a migration can switch backends without the guest noticing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum NetdevSpec {
    /// The NIC exists but is not connected to anything.
    None,
    /// QEMU user-mode networking (slirp). Dev only.
    User,
    /// `-netdev stream` server on the instance's unix socket
    /// ([`InstancePaths::net_socket`](crate::InstancePaths)), QEMU 7.2+:
    /// raw Ethernet frames, each prefixed with a be32 length. The agent's
    /// switch connects to it.
    Stream,
}

/// A virtio-net NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// MAC address, `52:54:00:xx:xx:xx` style.
    pub mac: String,
    /// Host backend.
    pub netdev: NetdevSpec,
}

/// Everything that defines a VM's hardware and boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Name: `[A-Za-z0-9_.-]`, at most [`MAX_VM_NAME_LEN`] bytes, not starting with `.`.
    pub name: String,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPU count.
    pub vcpus: u32,
    /// Concrete versioned machine type, e.g. `pc-i440fx-7.2` (see
    /// [`resolve_machine`](crate::resolve_machine)).
    pub machine: String,
    /// CPU model (`-cpu`); `None` = QEMU's default (`qemu64`). Must be a
    /// named model, never `host`, for migration between different hosts.
    #[serde(default)]
    pub cpu: Option<String>,
    /// Direct kernel boot; `None` boots firmware only (SeaBIOS idles).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// Initrd for direct kernel boot.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; must be empty without a kernel.
    #[serde(default)]
    pub cmdline: String,
    /// Optional virtio-blk disk.
    #[serde(default)]
    pub disk: Option<DiskSpec>,
    /// Optional virtio-net NIC.
    #[serde(default)]
    pub nic: Option<NicSpec>,
    /// SMBIOS UUID.
    #[serde(default)]
    pub uuid: Option<String>,
}

impl VmSpec {
    /// Check everything that would otherwise surface as an obscure QEMU
    /// error or an unsafe file name.
    pub fn validate(&self) -> Result<(), QemuError> {
        let bad = |what: &str| Err(QemuError::InvalidSpec(format!("{}: {what}", self.name)));
        if !is_safe_name(&self.name, MAX_VM_NAME_LEN) {
            return Err(QemuError::InvalidSpec(format!(
                "VM name {:?} must be 1-{MAX_VM_NAME_LEN} chars of [A-Za-z0-9_.-], not starting with '.'",
                self.name
            )));
        }
        if self.memory_mib == 0 || self.memory_mib > MAX_MEMORY_MIB {
            return bad("memory_mib out of range");
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return bad("vcpus out of range");
        }
        if !is_safe_name(&self.machine, 64) {
            return bad("machine type must be a plain name such as pc-i440fx-7.2");
        }
        if let Some(cpu) = &self.cpu {
            // CPU models may carry feature flags (`Skylake-Server,-hle`); forbid
            // only what would break the argument vector.
            if cpu.is_empty() || cpu.chars().any(|c| c.is_whitespace()) {
                return bad("cpu model is empty or has whitespace");
            }
        }
        if self.kernel.is_none() && (self.initrd.is_some() || !self.cmdline.is_empty()) {
            return bad("initrd/cmdline need a kernel");
        }
        if let Some(d) = &self.disk {
            if d.format != "raw" && d.format != "qcow2" {
                return bad("disk format must be raw or qcow2");
            }
        }
        if let Some(n) = &self.nic {
            if !is_mac(&n.mac) {
                return bad("nic mac must look like 52:54:00:12:34:56");
            }
        }
        if let Some(u) = &self.uuid {
            if !is_uuid(u) {
                return bad("uuid must be 8-4-4-4-12 hex");
            }
        }
        Ok(())
    }
}

/// How this host runs QEMU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// QEMU binary; a bare name is looked up in `PATH`.
    pub qemu_binary: PathBuf,
    /// Accelerator.
    pub accel: Accel,
    /// Per-instance sockets, logs and pidfiles live in `run_dir/<vm>-<instance>/`.
    pub run_dir: PathBuf,
    /// Guest RAM files (`<vm>-<instance>.ram`); must be a tmpfs or hugetlbfs
    /// so RAM is not written back to a disk.
    pub ram_dir: PathBuf,
}

impl Default for HostConfig {
    /// `qemu-system-x86_64` from `PATH`, TCG (safe everywhere; production
    /// configs set `kvm`), `/run/godwit`, `/dev/shm/godwit`.
    fn default() -> Self {
        Self {
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Tcg,
            run_dir: PathBuf::from("/run/godwit"),
            ram_dir: PathBuf::from("/dev/shm/godwit"),
        }
    }
}

/// Whether QEMU starts a fresh guest or waits for an incoming migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LaunchMode {
    /// Boot.
    Fresh,
    /// `-incoming defer`: wait for `migrate-incoming`.
    Incoming,
}

pub(crate) fn is_safe_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_uuid(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    parts.len() == 5
        && parts
            .iter()
            .zip(lens)
            .all(|(p, l)| p.len() == l && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec() -> VmSpec {
        VmSpec {
            name: "vm1".into(),
            memory_mib: 128,
            vcpus: 1,
            machine: "pc-i440fx-7.2".into(),
            cpu: None,
            kernel: None,
            initrd: None,
            cmdline: String::new(),
            disk: None,
            nic: None,
            uuid: None,
        }
    }

    #[test]
    fn validation() {
        assert!(spec().validate().is_ok());
        for f in [
            |s: &mut VmSpec| s.name = "../x".into(),
            |s: &mut VmSpec| s.name = String::new(),
            |s: &mut VmSpec| s.name = "a,b".into(),
            |s: &mut VmSpec| s.memory_mib = 0,
            |s: &mut VmSpec| s.vcpus = 0,
            |s: &mut VmSpec| s.machine = "pc,accel=kvm".into(),
            |s: &mut VmSpec| s.cmdline = "console=ttyS0".into(),
            |s: &mut VmSpec| {
                s.nic = Some(NicSpec {
                    mac: "52:54:00:12:34".into(),
                    netdev: NetdevSpec::None,
                })
            },
            |s: &mut VmSpec| s.uuid = Some("nope".into()),
            |s: &mut VmSpec| {
                s.disk = Some(DiskSpec {
                    path: "/x".into(),
                    format: "vmdk".into(),
                    readonly: false,
                })
            },
        ] {
            let mut s = spec();
            f(&mut s);
            assert!(s.validate().is_err(), "{s:?}");
        }
    }

    #[test]
    fn serde_roundtrip() {
        let mut s = spec();
        s.nic = Some(NicSpec {
            mac: "52:54:00:12:34:56".into(),
            netdev: NetdevSpec::Stream,
        });
        let j = serde_json::to_string(&s).unwrap();
        assert!(j.contains("\"type\":\"stream\""), "{j}");
        assert_eq!(serde_json::from_str::<VmSpec>(&j).unwrap(), s);
        assert_eq!(serde_json::to_string(&Accel::Kvm).unwrap(), "\"kvm\"");
    }
}
