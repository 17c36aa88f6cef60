//! `godwit vm …` and `godwit guest`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use godwit_agent::api::types::{CreateVm, GuestRequest, VmInfo};
use serde_json::Value;

use crate::output::Out;
use crate::Global;

/// VM subcommands.
#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Create and boot a VM on the agent's host.
    Create(CreateArgs),
    /// List VMs.
    List,
    /// Show one VM.
    Show {
        /// VM name.
        name: String,
    },
    /// Stop a VM (hard power-off).
    Stop {
        /// VM name.
        name: String,
    },
    /// Print the tail of the VM's serial console.
    Console {
        /// VM name.
        name: String,
        /// How many bytes of the tail.
        #[arg(long, default_value_t = 16384)]
        bytes: u64,
    },
}

/// `godwit vm create`.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// VM name.
    pub name: String,
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 256)]
    pub memory: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Machine type or alias.
    #[arg(long, default_value = "pc")]
    pub machine: String,
    /// Kernel (default: the godwit test guest image).
    #[arg(long, requires = "initrd")]
    pub kernel: Option<PathBuf>,
    /// Initramfs.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Extra kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Disk image (raw or .qcow2) both ends of a migration can read.
    #[arg(long)]
    pub disk: Option<PathBuf>,
    /// NIC MAC address (default with --ip: derived from the VM name,
    /// locally administered).
    #[arg(long)]
    pub mac: Option<String>,
    /// The guest's eth0 address, ADDR/PREFIX (test guest image; gives the
    /// VM a NIC on the agent's switch).
    #[arg(long)]
    pub ip: Option<String>,
    /// The guest's default gateway (test guest image).
    #[arg(long, requires = "ip")]
    pub gateway: Option<String>,
    /// Wait until the in-guest tool has said hello.
    #[arg(long)]
    pub wait: bool,
}

/// `godwit guest VM JSON`.
#[derive(Args, Debug)]
pub struct GuestCmd {
    /// VM name.
    pub vm: String,
    /// The command, e.g. '{"cmd":"memdirty_start","mib":64,"rate_pages_per_s":500,"pattern":"random"}'.
    pub command: String,
    /// How long to wait for the answer, seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// For a probe that reports while it runs (udp_send, udp_recv,
    /// tcp_echo_client): wait for its final report (within --timeout) and
    /// print that one.
    #[arg(long)]
    pub until_done: bool,
}

/// Builds the create request, using the cached guest image by default.
pub async fn create_request(a: &CreateArgs, out: Out) -> Result<CreateVm> {
    let (kernel, initrd, cmdline) = match (&a.kernel, &a.initrd) {
        (Some(k), Some(i)) => (k.clone(), i.clone(), a.cmdline.clone()),
        _ => {
            let img = crate::guestimg::ensure(out, None, PathBuf::from("/var/cache/godwit/image"))
                .await?;
            let cmdline = if a.cmdline.is_empty() {
                img.cmdline.clone()
            } else {
                format!("{} {}", img.cmdline, a.cmdline)
            };
            (img.kernel, img.initrd, cmdline)
        }
    };
    let mut cmdline = cmdline;
    if let Some(ip) = &a.ip {
        // Read by the image's init (godwit-image's init.sh).
        cmdline.push_str(&format!(" godwit.ip={ip}"));
        if let Some(gw) = &a.gateway {
            cmdline.push_str(&format!(" godwit.gw={gw}"));
        }
    }
    let mac = a
        .mac
        .clone()
        .or_else(|| a.ip.as_ref().map(|_| mac_for(&a.name)));
    Ok(CreateVm {
        name: a.name.clone(),
        memory_mib: a.memory,
        vcpus: a.vcpus,
        machine: a.machine.clone(),
        kernel: Some(kernel),
        initrd: Some(initrd),
        cmdline,
        disk: a.disk.clone(),
        mac,
    })
}

/// A MAC for VM `name`: the same on every run and at every site, unicast
/// and locally administered (`0x02` in the first byte), so it never takes
/// a vendor's address. FNV-1a over the name gives the low four bytes.
pub fn mac_for(name: &str) -> String {
    let h = name.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    let [b0, b1, b2, b3] = h.to_be_bytes();
    format!("02:67:{b0:02x}:{b1:02x}:{b2:02x}:{b3:02x}")
}

/// Sends one guest command through an agent and returns the report.
pub async fn guest_call(
    client: &godwit_agent::client::ApiClient,
    vm: &str,
    command: Value,
    timeout: Duration,
) -> Result<Value> {
    let req = GuestRequest {
        command,
        timeout_ms: timeout.as_millis() as u64,
    };
    Ok(client.post(&format!("/v1/vms/{vm}/guest"), &req).await?)
}

/// How often [`guest_until_done`] looks for the final report.
const REPORT_POLL: Duration = Duration::from_millis(250);

/// Sends a probe command and waits for its final report (the one with the
/// same id and `"done": true`), which the agent keeps in the VM's report
/// log. The VM must stay on this agent's host meanwhile.
pub async fn guest_until_done(
    client: &godwit_agent::client::ApiClient,
    vm: &str,
    command: Value,
    timeout: Duration,
) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + timeout;
    let first = guest_call(client, vm, command, timeout).await?;
    let is_final = |r: &Value| r.get("done").and_then(Value::as_bool) != Some(false);
    if is_final(&first) {
        return Ok(first);
    }
    let id = first
        .get("id")
        .cloned()
        .context("the guest's report has no id")?;
    let mut since = 0u64;
    loop {
        let page: Value = client
            .get(&format!("/v1/vms/{vm}/guest/reports?since={since}"))
            .await?;
        if let Some(done) = page["reports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r.get("id") == Some(&id) && r.get("done") == Some(&Value::Bool(true)))
        {
            return Ok(done.clone());
        }
        since = page["seq"].as_u64().unwrap_or(since);
        if tokio::time::Instant::now() >= deadline {
            bail!("no final report from {vm}'s probe {id} within {timeout:?}");
        }
        tokio::time::sleep(REPORT_POLL).await;
    }
}

fn vm_line(v: &VmInfo) -> String {
    format!(
        "{:<16} {:<14} {:>6} MiB {:>2} vcpu  qemu {:<12} pid {}  guest {}",
        v.name,
        format!("{:?}", v.state).to_lowercase(),
        v.memory_mib,
        v.vcpus,
        v.qemu_status.as_deref().unwrap_or("?"),
        v.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        match &v.guest {
            Some(gi) if gi.connected && gi.boot_id.is_some() => "ready",
            Some(gi) if gi.connected => "connected",
            _ => "-",
        }
    )
}

/// Runs a VM subcommand.
pub async fn run(c: VmCmd, g: &Global, out: Out) -> Result<()> {
    let client = g.client();
    match c {
        VmCmd::Create(a) => {
            let req = create_request(&a, out).await?;
            let v: VmInfo = client.post("/v1/vms", &req).await?;
            if a.wait {
                guest_call(
                    &client,
                    &a.name,
                    serde_json::json!({"cmd": "ping"}),
                    Duration::from_secs(120),
                )
                .await
                .context("waiting for the guest tool")?;
            }
            out.result("vm", &v, || vm_line(&v));
        }
        VmCmd::List => {
            let vs: Vec<VmInfo> = client.get("/v1/vms").await?;
            out.result("vms", &vs, || {
                vs.iter().map(vm_line).collect::<Vec<_>>().join("\n")
            });
        }
        VmCmd::Show { name } => {
            let v: VmInfo = client.get(&format!("/v1/vms/{name}")).await?;
            out.result("vm", &v, || {
                serde_json::to_string_pretty(&v).unwrap_or_default()
            });
        }
        VmCmd::Stop { name } => {
            let v: Value = client.delete(&format!("/v1/vms/{name}")).await?;
            out.result("stopped", &v, || format!("stopped {name}"));
        }
        VmCmd::Console { name, bytes } => {
            let t = client
                .get_text(&format!("/v1/vms/{name}/console?bytes={bytes}"))
                .await?;
            out.result("console", &t, || t.clone());
        }
    }
    Ok(())
}

/// Runs `godwit guest`.
pub async fn guest(c: GuestCmd, g: &Global, out: Out) -> Result<()> {
    let command: Value =
        serde_json::from_str(&c.command).context("the guest command must be JSON")?;
    let timeout = Duration::from_secs(c.timeout);
    let v = if c.until_done {
        guest_until_done(&g.client(), &c.vm, command, timeout).await?
    } else {
        guest_call(&g.client(), &c.vm, command, timeout).await?
    };
    out.result("guest", &v, || {
        serde_json::to_string_pretty(&v).unwrap_or_default()
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn derived_macs_are_stable_unicast_and_local() {
        let m = super::mac_for("vm1");
        assert_eq!(m, super::mac_for("vm1"));
        assert_ne!(m, super::mac_for("vm2"));
        let first = u8::from_str_radix(&m[..2], 16).unwrap();
        assert_eq!(first & 0x03, 0x02, "{m}");
        let bytes: Vec<_> = m.split(':').map(|b| u8::from_str_radix(b, 16)).collect();
        assert!(bytes.len() == 6 && bytes.iter().all(Result::is_ok), "{m}");
    }
}
