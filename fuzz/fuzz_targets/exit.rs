//! See `wraithgate_fuzzing::exit` for what this target checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wraithgate_fuzzing::exit::check(data));
