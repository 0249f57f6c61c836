//! Fuzz target `compose`: see `mailqueue_fuzz::fuzz_compose` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailqueue_fuzz::fuzz_compose(data));
