//! QEMU command line construction.
//!
//! [`build_args`] is a pure function of the spec, the host config, the
//! per-instance paths and the launch mode. Two rules shape it:
//!
//! * **Identical guest hardware on both ends of a migration.** Everything
//!   guest-visible comes from the [`VmSpec`] alone, and every PCI device has
//!   an explicit slot, so adding or removing an optional device never
//!   renumbers the others. Host-side details (socket and log paths, the RAM
//!   file, `-incoming`) may differ between ends.
//! * **Guest RAM is a named file with `share=on`** (`memory-backend-file`
//!   under [`HostConfig::ram_dir`]). Never memfd: QEMU 7.2's
//!   `x-ignore-shared` skips *any* shared block, so a memfd-backed guest
//!   would silently lose its RAM in a same-host migration. A named file also
//!   lets the agent map the guest RAM directly.
//!
//! Guest poweroff makes QEMU exit (no `-no-shutdown`): a powered-off VM is
//! then simply "no process", which the supervisor sees via the pid, and there
//! is no half-dead `shutdown` state to clean up. Guest reboot resets in place.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::spec::{Accel, HostConfig, LaunchMode, NetdevSpec, VmSpec};

/// Name of the virtio-serial port the guest agent opens
/// (`/dev/virtio-ports/org.godwit.guest.0` in the guest).
pub const GUEST_PORT_NAME: &str = "org.godwit.guest.0";

/// QEMU object id of the guest RAM backend.
pub const RAM_BACKEND_ID: &str = "mem0";

/// Device id of the NIC, as used by `announce-self` `interfaces`.
pub const NIC_ID: &str = "nic0";

/// Fixed PCI slots (bus 0). Slots 0-2 are taken by the host bridge, the
/// PIIX/ICH functions and (unused here) VGA; 0x1f is q35's LPC. Fixed slots
/// keep the guest-visible topology independent of which optional devices
/// exist and of argument order.
const PCI_SLOT_VIRTIO_SERIAL: u8 = 0x04;
/// See [`PCI_SLOT_VIRTIO_SERIAL`].
const PCI_SLOT_DISK: u8 = 0x05;
/// See [`PCI_SLOT_VIRTIO_SERIAL`].
const PCI_SLOT_NIC: u8 = 0x06;

/// Host-side files of one QEMU instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstancePaths {
    /// Directory holding everything below except the RAM file.
    pub dir: PathBuf,
    /// QMP unix socket.
    pub qmp_socket: PathBuf,
    /// Guest agent virtio-serial chardev socket (QEMU listens).
    pub guest_socket: PathBuf,
    /// The NIC's `-netdev stream` socket (QEMU listens, the agent's switch
    /// connects; see [`NetdevSpec::Stream`]).
    pub net_socket: PathBuf,
    /// Guest serial console log.
    pub serial_log: PathBuf,
    /// QEMU's own stdout/stderr.
    pub qemu_log: PathBuf,
    /// QEMU-written pidfile.
    pub pidfile: PathBuf,
    /// Guest RAM file (created by QEMU, removed on terminate).
    pub ram_file: PathBuf,
}

impl InstancePaths {
    /// The standard layout: `run_dir/<vm>-<instance>/{qmp.sock,guest.sock,net.sock,
    /// serial.log,qemu.log,qemu.pid}` and `ram_dir/<vm>-<instance>.ram`.
    pub fn new(host: &HostConfig, vm: &str, instance_id: &str) -> Self {
        let dir = host.run_dir.join(format!("{vm}-{instance_id}"));
        Self {
            qmp_socket: dir.join("qmp.sock"),
            guest_socket: dir.join("guest.sock"),
            net_socket: dir.join("net.sock"),
            serial_log: dir.join("serial.log"),
            qemu_log: dir.join("qemu.log"),
            pidfile: dir.join("qemu.pid"),
            ram_file: host.ram_dir.join(format!("{vm}-{instance_id}.ram")),
            dir,
        }
    }
}

/// Escape a value for QEMU's `key=value,...` option syntax (a comma is
/// written as two commas).
fn opt_escape(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

fn kv(a: &mut Vec<OsString>, k: &str, v: String) {
    a.push(k.into());
    a.push(v.into());
}

/// Extra guest RAM under TCG, KiB: works around a QEMU dirty-tracking bug.
///
/// QEMU (seen on 7.2) syncs the migration dirty bitmap of a RAM block on
/// a fast path when the block starts and ends on 64-page (256 KiB)
/// boundaries. That path clears the dirty bits but does not re-arm TCG's
/// softmmu TLB write trap (`tlb_reset_dirty`; only KVM implements the
/// `log_clear` hook it calls instead), so guest writes through TLB entries
/// cached before the sync are never recorded again. Kernel data behind
/// long-lived global TLB entries then arrives stale at the destination and
/// the guest crashes after migration (an hrtimer callback jumping to a
/// garbage address, reproduced with plain QEMU-to-QEMU migration and both
/// file and anonymous RAM). A block length that is not a multiple of
/// 256 KiB sends QEMU down the per-page path, which does re-arm the trap.
/// 8 KiB because QEMU rounds `-m` up to 8 KiB. KVM tracks dirty pages in
/// the kernel and needs no padding.
pub const TCG_DIRTY_SYNC_PAD_KIB: u64 = 8;

/// Guest RAM as given to QEMU, KiB (see [`TCG_DIRTY_SYNC_PAD_KIB`]).
pub fn guest_ram_kib(spec: &VmSpec, accel: Accel) -> u64 {
    let base = spec.memory_mib * 1024;
    match accel {
        Accel::Tcg => base + TCG_DIRTY_SYNC_PAD_KIB,
        Accel::Kvm => base,
    }
}

/// The full QEMU argument vector (without the binary).
pub fn build_args(
    spec: &VmSpec,
    host: &HostConfig,
    inst: &InstancePaths,
    mode: LaunchMode,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    kv(&mut a, "-name", format!("{},debug-threads=on", spec.name));
    if let Some(u) = &spec.uuid {
        kv(&mut a, "-uuid", u.clone());
    }
    kv(
        &mut a,
        "-machine",
        format!("{},memory-backend={RAM_BACKEND_ID}", spec.machine),
    );
    kv(
        &mut a,
        "-accel",
        match host.accel {
            // Multi-threaded TCG is what makes more than one vCPU actually
            // run in parallel under emulation.
            Accel::Tcg if spec.vcpus > 1 => "tcg,thread=multi".to_owned(),
            Accel::Tcg => "tcg".to_owned(),
            Accel::Kvm => "kvm".to_owned(),
        },
    );
    if let Some(cpu) = &spec.cpu {
        kv(&mut a, "-cpu", cpu.clone());
    }
    let ram_kib = guest_ram_kib(spec, host.accel);
    kv(&mut a, "-m", format!("{ram_kib}k"));
    kv(&mut a, "-smp", spec.vcpus.to_string());
    kv(
        &mut a,
        "-object",
        format!(
            "memory-backend-file,id={RAM_BACKEND_ID},size={ram_kib}k,mem-path={},share=on",
            opt_escape(&inst.ram_file)
        ),
    );
    a.push("-nodefaults".into());
    kv(&mut a, "-display", "none".into());
    kv(&mut a, "-vga", "none".into());
    kv(
        &mut a,
        "-chardev",
        format!("file,id=serial0,path={}", opt_escape(&inst.serial_log)),
    );
    kv(&mut a, "-serial", "chardev:serial0".into());
    if let Some(k) = &spec.kernel {
        a.push("-kernel".into());
        a.push(k.clone().into_os_string());
        if let Some(i) = &spec.initrd {
            a.push("-initrd".into());
            a.push(i.clone().into_os_string());
        }
        if !spec.cmdline.is_empty() {
            a.push("-append".into());
            a.push(spec.cmdline.clone().into());
        }
    }
    kv(
        &mut a,
        "-device",
        format!("virtio-serial-pci,id=vser0,addr={PCI_SLOT_VIRTIO_SERIAL:#x}"),
    );
    kv(
        &mut a,
        "-chardev",
        format!(
            "socket,id=guestport,path={},server=on,wait=off",
            opt_escape(&inst.guest_socket)
        ),
    );
    kv(
        &mut a, "-device",
        format!("virtserialport,bus=vser0.0,nr=1,chardev=guestport,id=guestport0,name={GUEST_PORT_NAME}"),
    );
    if let Some(d) = &spec.disk {
        let ro = if d.readonly { "on" } else { "off" };
        kv(
            &mut a,
            "-blockdev",
            format!(
                "driver=file,node-name=disk0-file,filename={},read-only={ro}",
                opt_escape(&d.path)
            ),
        );
        kv(
            &mut a,
            "-blockdev",
            format!(
                "driver={},node-name=disk0,file=disk0-file,read-only={ro}",
                d.format
            ),
        );
        kv(
            &mut a,
            "-device",
            format!("virtio-blk-pci,id=disk0dev,drive=disk0,addr={PCI_SLOT_DISK:#x}"),
        );
    }
    if let Some(n) = &spec.nic {
        let netdev = match &n.netdev {
            NetdevSpec::None => None,
            NetdevSpec::User => Some("user,id=net0".to_owned()),
            // QEMU listens: on 7.2 it listens again when the switch's
            // connection ends, while a 7.2 client never reconnects
            // (reference network-continuity §1.1), so an agent restart
            // must find QEMU as the server.
            NetdevSpec::Stream => Some(format!(
                "stream,id=net0,server=on,addr.type=unix,addr.path={}",
                opt_escape(&inst.net_socket)
            )),
        };
        let mut dev = format!(
            "virtio-net-pci,id={NIC_ID},mac={},addr={PCI_SLOT_NIC:#x}",
            n.mac
        );
        if let Some(nd) = netdev {
            kv(&mut a, "-netdev", nd);
            dev.push_str(",netdev=net0");
        }
        kv(&mut a, "-device", dev);
    }
    kv(
        &mut a,
        "-qmp",
        format!("unix:{},server=on,wait=off", opt_escape(&inst.qmp_socket)),
    );
    a.push("-pidfile".into());
    a.push(inst.pidfile.clone().into_os_string());
    kv(&mut a, "-msg", "timestamp=on".into());
    if mode == LaunchMode::Incoming {
        kv(&mut a, "-incoming", "defer".into());
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{DiskSpec, NicSpec};

    fn spec() -> VmSpec {
        VmSpec {
            name: "vm1".into(),
            memory_mib: 256,
            vcpus: 2,
            machine: "pc-i440fx-7.2".into(),
            cpu: None,
            kernel: Some("/img/vmlinuz".into()),
            initrd: Some("/img/initrd".into()),
            cmdline: "console=ttyS0 quiet".into(),
            disk: Some(DiskSpec {
                path: "/img/a,b.qcow2".into(),
                format: "qcow2".into(),
                readonly: false,
            }),
            nic: Some(NicSpec {
                mac: "52:54:00:12:34:56".into(),
                netdev: NetdevSpec::User,
            }),
            uuid: Some("6b3a1f0e-0000-4000-8000-000000000001".into()),
        }
    }

    fn strs(v: &[OsString]) -> Vec<String> {
        v.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    fn value_of<'a>(args: &'a [String], key: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == key)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn a_stream_nic_listens_on_the_instance_socket() {
        let host = HostConfig::default();
        let p = InstancePaths::new(&host, "vm1", "abc");
        let mut s = spec();
        if let Some(n) = &mut s.nic {
            n.netdev = NetdevSpec::Stream;
        }
        let a = strs(&build_args(&s, &host, &p, LaunchMode::Incoming));
        assert_eq!(
            value_of(&a, "-netdev"),
            [format!(
                "stream,id=net0,server=on,addr.type=unix,addr.path={}",
                p.net_socket.display()
            )]
        );
        assert!(p.net_socket.starts_with(&p.dir));
    }

    #[test]
    fn full_command_line() {
        let host = HostConfig::default();
        let p = InstancePaths::new(&host, "vm1", "abc");
        let a = strs(&build_args(&spec(), &host, &p, LaunchMode::Fresh));
        assert_eq!(value_of(&a, "-accel"), ["tcg,thread=multi"]);
        assert_eq!(
            value_of(&a, "-machine"),
            ["pc-i440fx-7.2,memory-backend=mem0"]
        );
        assert_eq!(
            value_of(&a, "-object"),
            ["memory-backend-file,id=mem0,size=262152k,mem-path=/dev/shm/godwit/vm1-abc.ram,share=on"]
        );
        assert!(!a.iter().any(|s| s.contains("memfd")));
        assert_eq!(value_of(&a, "-append"), ["console=ttyS0 quiet"]);
        assert!(value_of(&a, "-blockdev")[0].contains("filename=/img/a,,b.qcow2"));
        assert_eq!(
            value_of(&a, "-qmp"),
            ["unix:/run/godwit/vm1-abc/qmp.sock,server=on,wait=off"]
        );
        assert!(value_of(&a, "-device")
            .iter()
            .any(|d| d.contains("name=org.godwit.guest.0")));
        assert!(value_of(&a, "-device")
            .iter()
            .any(|d| d.starts_with("virtio-net-pci") && d.ends_with("netdev=net0")));
        assert!(!a.contains(&"-incoming".to_owned()));
        assert!(!a.contains(&"-no-shutdown".to_owned()));
    }

    #[test]
    fn guest_hardware_identical_across_instances_and_modes() {
        // Strip host-side values (paths) and compare the rest: this is the
        // migration-compatibility invariant.
        let host = HostConfig::default();
        let norm = |inst: &str, mode| {
            let p = InstancePaths::new(&host, "vm1", inst);
            strs(&build_args(&spec(), &host, &p, mode))
                .into_iter()
                .map(|s| s.replace(inst, "X"))
                .filter(|s| s != "-incoming" && s != "defer")
                .collect::<Vec<_>>()
        };
        assert_eq!(
            norm("src1", LaunchMode::Fresh),
            norm("dst2", LaunchMode::Incoming)
        );
        let p = InstancePaths::new(&host, "vm1", "d");
        let a = strs(&build_args(&spec(), &host, &p, LaunchMode::Incoming));
        assert_eq!(value_of(&a, "-incoming"), ["defer"]);
    }

    #[test]
    fn minimal_spec_has_no_kernel_or_optional_devices() {
        let mut s = spec();
        s.kernel = None;
        s.initrd = None;
        s.cmdline.clear();
        s.disk = None;
        s.nic = None;
        s.uuid = None;
        s.vcpus = 1;
        let host = HostConfig::default();
        let p = InstancePaths::new(&host, "vm1", "abc");
        let a = strs(&build_args(&s, &host, &p, LaunchMode::Fresh));
        for k in [
            "-kernel",
            "-initrd",
            "-append",
            "-blockdev",
            "-netdev",
            "-uuid",
        ] {
            assert!(!a.contains(&k.to_owned()), "{k}");
        }
        assert_eq!(value_of(&a, "-accel"), ["tcg"]);
    }
}
