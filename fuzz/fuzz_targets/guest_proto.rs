//! Fuzzes the host<->guest line protocol (`godwit_guest::proto`): reports
//! come from the guest (untrusted: it is the migrated VM), commands from the
//! host side of the virtio-serial port.
//!
//! Invariants checked:
//! - `decode_report` / `decode_command` never panic, on the whole input and
//!   on each of its lines;
//! - a decoded command re-encodes (`encode_line`) to a line that decodes to
//!   the same command; a decoded report re-encodes to a line that decodes
//!   (to the same report when it holds no float, which JSON may round).
#![no_main]

use godwit_guest::proto::{decode_command, decode_report, encode_line, LINE_PREFIX};
use libfuzzer_sys::fuzz_target;

fn has_float(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Number(n) => n.is_f64(),
        serde_json::Value::Array(a) => a.iter().any(has_float),
        serde_json::Value::Object(o) => o.values().any(has_float),
        _ => false,
    }
}

fn check_line(line: &str) {
    let cmd = decode_command(line);
    let report = decode_report(line);
    if !line.contains(LINE_PREFIX) && line.len() <= godwit_guest::proto::MAX_LINE_LEN {
        assert!(matches!(cmd, Ok(None)), "noise line decoded as {cmd:?}");
        assert!(
            matches!(report, Ok(None)),
            "noise line decoded as {report:?}"
        );
    }
    if let Ok(Some(cmd)) = cmd {
        let enc = encode_line(&cmd);
        assert!(enc.starts_with(LINE_PREFIX) && enc.ends_with('\n'));
        match decode_command(&enc) {
            Ok(Some(back)) => assert_eq!(back, cmd, "command changed through {enc:?}"),
            other => panic!("re-encoded command {enc:?} decodes to {other:?}"),
        }
        let _ = cmd.id();
    }
    if let Ok(Some(report)) = report {
        let enc = encode_line(&report);
        match decode_report(&enc) {
            Ok(Some(back)) => {
                let floaty = serde_json::to_value(&report).map_or(true, |v| has_float(&v));
                if !floaty {
                    assert_eq!(back, report, "report changed through {enc:?}");
                }
            }
            other => panic!("re-encoded report {enc:?} decodes to {other:?}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // The guest's port reader and the host both take one line at a time and
    // require UTF-8; also try the lossy form so odd bytes reach the decoder.
    let text = String::from_utf8_lossy(data);
    check_line(&text);
    for line in text.split('\n') {
        check_line(line);
    }
});
