//! Fuzz target `pop3_reply`: see `mailqueue_fuzz::fuzz_pop3_reply` (fuzz/src/lib.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| mailqueue_fuzz::fuzz_pop3_reply(data));
