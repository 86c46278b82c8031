//! See `wraithgate_fuzzing::api` for what this target checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wraithgate_fuzzing::api::check(data));
