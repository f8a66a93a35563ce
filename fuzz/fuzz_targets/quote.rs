//! libFuzzer entry of the `quote` target (`mcim_fuzz::quote`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mcim_fuzz::quote(data));
