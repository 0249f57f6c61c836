//! Fuzz target `config`: see `mailqueue_fuzz::fuzz_config` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailqueue_fuzz::fuzz_config(data));
