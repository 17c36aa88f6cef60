//! Fuzzes the agent's configuration file parser: `toml::from_str` into
//! `godwit_agent::config::AgentConfig`, then `validate()`. The file is
//! operator input, but a typo must produce an error, never a panic.
//!
//! Invariants checked:
//! - parsing and validation never panic;
//! - a parsed config serialises as `AgentConfig::save` does
//!   (`toml::to_string_pretty`), parses back, validates the same way and
//!   serialises to the same text.
#![no_main]

use godwit_agent::config::AgentConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = toml::from_str::<AgentConfig>(text) else {
        return;
    };
    let valid = cfg.validate().is_ok();
    let _ = cfg.identity_dir();
    let _ = cfg.migration_timeout();
    let saved = toml::to_string_pretty(&cfg)
        .unwrap_or_else(|e| panic!("parsed config {cfg:?} does not serialise: {e}"));
    let back: AgentConfig = toml::from_str(&saved)
        .unwrap_or_else(|e| panic!("saved config does not parse: {e}\n{saved}"));
    assert_eq!(
        back.validate().is_ok(),
        valid,
        "validity changed through save:\n{saved}"
    );
    let again = toml::to_string_pretty(&back).expect("serialised once already");
    assert_eq!(again, saved, "save/load is not stable");
});
