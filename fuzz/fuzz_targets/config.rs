//! Config parsing and validation, the path `elsinore check` runs before it
//! touches files: YAML text → raw serde structs → `validate` → typed
//! `Config` (`gateway/src/config.rs`, `config/validate.rs`).
//!
//! Beyond "does not crash": parsing is deterministic (the same text gives
//! the same effective config, or the same errors); every error names a
//! problem; a valid config renders as the effective-config JSON that
//! `elsinore check --effective`-style output and the admin page show, with
//! no changed keys against itself, and yields a VIP table plan.
#![no_main]

use std::path::Path;

use elsinore_gateway::catalog::routes::TablePlan;
use elsinore_gateway::config::Config;
use elsinore_gateway::config::effective::{changed_keys, to_json};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let base = Path::new("/etc/elsinore");
    match Config::from_yaml_str(text, base) {
        Ok(config) => {
            let json = to_json(&config);
            assert!(changed_keys(&config, &config).is_empty());
            let _ = TablePlan::from_config(&config);
            let again = Config::from_yaml_str(text, base).expect("the same text parses again");
            assert_eq!(to_json(&again), json, "parsing is not deterministic");
        }
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error list with no error");
            for e in &errors.0 {
                assert!(
                    !e.message.is_empty(),
                    "an error without a message at {:?}",
                    e.path
                );
            }
            let again = Config::from_yaml_str(text, base).expect_err("the same text fails again");
            assert_eq!(again.to_string(), errors.to_string());
        }
    }
});
