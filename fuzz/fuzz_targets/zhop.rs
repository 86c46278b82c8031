//! See `wraithgate_fuzzing::zhop` for what this target checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wraithgate_fuzzing::zhop::check(data));
