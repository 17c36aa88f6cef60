//! Building blocks shared by the demo and the benchmarks: boot the test
//! guest on a lab site, load it, migrate it, verify it.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use godwit_agent::api::types::{MigrationInfo, StartMigration, VmInfo};
use godwit_agent::client::ApiClient;
use serde::Serialize;
use serde_json::{json, Value};

use crate::cmd::vm::{create_request, guest_call, CreateArgs};
use crate::labenv;
use crate::output::Out;

/// How long a freshly booted guest may take to greet (TCG is slow).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Client of a lab site's agent.
pub fn site(name: &str) -> ApiClient {
    ApiClient::new(labenv::site_socket(name))
}

/// Boots the test guest on `client`'s host and waits for its tool.
pub async fn boot(client: &ApiClient, name: &str, memory_mib: u64, out: Out) -> Result<String> {
    boot_with_ip(client, name, memory_mib, None, out).await
}

/// [`boot`], with a NIC on the agent's switch and eth0 at `ip`
/// (`ADDR/PREFIX`) when given.
pub async fn boot_with_ip(
    client: &ApiClient,
    name: &str,
    memory_mib: u64,
    ip: Option<&str>,
    out: Out,
) -> Result<String> {
    let args = CreateArgs {
        name: name.into(),
        memory: memory_mib,
        vcpus: 1,
        machine: "pc".into(),
        kernel: None,
        initrd: None,
        cmdline: String::new(),
        disk: None,
        mac: None,
        ip: ip.map(str::to_owned),
        gateway: None,
        wait: false,
    };
    let req = create_request(&args, out).await?;
    let _: VmInfo = client
        .post("/v1/vms", &req)
        .await
        .context("creating the VM")?;
    let hello = guest_call(client, name, json!({"cmd": "ping"}), BOOT_TIMEOUT)
        .await
        .context("waiting for the guest to boot")?;
    let _ = hello;
    let vm: VmInfo = client.get(&format!("/v1/vms/{name}")).await?;
    vm.guest
        .and_then(|g| g.boot_id)
        .context("the guest tool did not report a boot id")
}

/// Starts memdirty in the guest.
pub async fn memdirty(client: &ApiClient, vm: &str, mib: u64, rate_pages_per_s: u64) -> Result<()> {
    let cmd = json!({"cmd": "memdirty_start", "mib": mib, "rate_pages_per_s": rate_pages_per_s, "pattern": "random"});
    guest_call(client, vm, cmd, Duration::from_secs(120))
        .await
        .context("starting memdirty")?;
    Ok(())
}

/// Result of verifying the guest after a migration.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    /// Pages memdirty checked.
    pub pages: u64,
    /// Pages with wrong content.
    pub errors: u64,
    /// The guest did not reboot (same boot id).
    pub same_boot: bool,
    /// Guest uptime after the migration, ms.
    pub uptime_ms: u64,
}

/// Verifies every memdirty page and the guest's continuity.
pub async fn verify(client: &ApiClient, vm: &str, boot_id: &str) -> Result<Verification> {
    let v = guest_call(
        client,
        vm,
        json!({"cmd": "memdirty_verify"}),
        Duration::from_secs(300),
    )
    .await
    .context("verifying guest memory")?;
    let u = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    Ok(Verification {
        pages: u(&v, "pages"),
        errors: u(&v, "errors"),
        ..continuity(client, vm, boot_id).await?
    })
}

/// Checks that the guest answers and did not reboot (no page check: for
/// workloads other than memdirty).
pub async fn continuity(client: &ApiClient, vm: &str, boot_id: &str) -> Result<Verification> {
    let st = guest_call(
        client,
        vm,
        json!({"cmd": "status"}),
        Duration::from_secs(60),
    )
    .await?;
    let info: VmInfo = client.get(&format!("/v1/vms/{vm}")).await?;
    let u = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    Ok(Verification {
        pages: 0,
        errors: 0,
        same_boot: info.guest.and_then(|g| g.boot_id).as_deref() == Some(boot_id),
        uptime_ms: u(&st, "uptime_ms"),
    })
}

/// Migrates and follows to the end.
pub async fn migrate(
    from: &ApiClient,
    vm: &str,
    to: &str,
    direct: bool,
    timeout_s: u64,
    out: Out,
) -> Result<MigrationInfo> {
    let req = StartMigration {
        vm: vm.into(),
        to: to.into(),
        downtime_limit_ms: None,
        timeout_s: Some(timeout_s),
        direct,
        qemu: None,
        copy: false,
    };
    crate::cmd::migrate::migrate(from, &req, out).await
}

/// Stops a VM wherever it is in the lab (best effort).
pub async fn stop_everywhere(sites: &[&str], vm: &str) {
    for s in sites {
        let _: Result<Value, _> = site(s).delete(&format!("/v1/vms/{vm}")).await;
    }
}

/// Fails unless the VM is gone from a site.
pub async fn assert_gone(client: &ApiClient, vm: &str) -> Result<()> {
    match client.get::<VmInfo>(&format!("/v1/vms/{vm}")).await {
        Err(godwit_agent::client::ClientError::Api { status: 404, .. }) => Ok(()),
        Ok(v) => bail!("{vm} still exists at the source ({:?})", v.state),
        Err(e) => Err(e.into()),
    }
}
