//! QmpClient against a real `qemu-system-x86_64 -machine none` (installed on
//! every godwit dev and CI host; this test does not skip).
#![cfg(feature = "tokio")]

use std::process::Stdio;
use std::time::Duration;

use godwit_qmp::commands::{
    HumanMonitorCommand, MigrateSetCapabilities, MigrateSetParameters, MigrationCapabilityStatus,
    MigrationParameters, QueryMachines, QueryMigrate, QueryMigrateCapabilities,
    QueryMigrateParameters, QueryStatus, QueryVersion, Quit, Stop,
};
use godwit_qmp::{QmpClient, QmpError};

#[tokio::test]
async fn real_qemu_machine_none() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp.sock");
    let mut child = tokio::process::Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("qemu-system-x86_64 must be installed");
    let mut tries = 0;
    let (client, mut events) = loop {
        match QmpClient::connect(&sock).await {
            Ok(c) => break c,
            Err(QmpError::Connect { .. }) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert!(client.greeting().version.qemu.major >= 7);
    let v = client.execute_typed(&QueryVersion).await.unwrap();
    assert_eq!(v, client.greeting().version);
    let s = client.execute_typed(&QueryStatus).await.unwrap();
    assert_eq!(s.status, "running");

    let machines = client.execute_typed(&QueryMachines).await.unwrap();
    let pc = machines
        .iter()
        .find(|m| m.alias.as_deref() == Some("pc"))
        .unwrap();
    assert!(pc.name.starts_with("pc-i440fx-"), "{pc:?}");

    client
        .execute_typed(&MigrateSetCapabilities {
            capabilities: vec![
                MigrationCapabilityStatus::new("events", true),
                MigrationCapabilityStatus::new("return-path", true),
            ],
        })
        .await
        .unwrap();
    let caps = client
        .execute_typed(&QueryMigrateCapabilities)
        .await
        .unwrap();
    assert!(caps
        .iter()
        .any(|c| c.capability == "return-path" && c.state));
    client
        .execute_typed(&MigrateSetParameters(MigrationParameters {
            max_bandwidth: Some(10_000_000_000),
            downtime_limit: Some(500),
            announce_rounds: Some(7),
            ..Default::default()
        }))
        .await
        .unwrap();
    let p = client.execute_typed(&QueryMigrateParameters).await.unwrap();
    assert_eq!(p.downtime_limit, Some(500));
    assert_eq!(p.announce_rounds, Some(7));
    assert_eq!(
        client.execute_typed(&QueryMigrate).await.unwrap().status(),
        "none"
    );

    let hmp = client
        .execute_typed(&HumanMonitorCommand {
            command_line: "info status".into(),
        })
        .await
        .unwrap();
    assert!(hmp.contains("running"), "{hmp}");

    // A QEMU error surfaces as a Command error and the connection survives.
    let e = client
        .execute(
            "migrate-set-parameters",
            serde_json::json!({"downtime-limit": 1u64 << 40}),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, QmpError::Command { .. }), "{e:?}");

    client.execute_typed(&Stop).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ev.name, "STOP");

    // `quit` replies, then QEMU exits and the client notices.
    client.execute_typed(&Quit).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), client.closed())
        .await
        .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    assert!(client
        .execute_typed(&QueryStatus)
        .await
        .unwrap_err()
        .is_disconnected());
}
