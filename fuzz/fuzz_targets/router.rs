//! See `wraithgate_fuzzing::router` for what this target checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wraithgate_fuzzing::router::check(data));
