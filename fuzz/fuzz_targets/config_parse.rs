//! The configuration parser on arbitrary files: an error naming the file and key, never a panic.
//!
//! ```text
//!  bytes ──► UTF-8 ──► Config::parse (TOML → ${VAR} → typed structs → checks) ──► Ok / ConfigError
//! ```
#![no_main]

use bitclone9_config::Config;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Every ${VAR} is set, so the checks past interpolation are reached.
    let env = |name: &str| (name != "UNSET").then(|| format!("value-of-{name}"));
    if let Err(e) = Config::parse(Path::new("fuzz.toml"), text, &env) {
        let message = e.to_string();
        assert!(
            message.contains("fuzz.toml"),
            "the error names the file: {message}"
        );
    }
});
