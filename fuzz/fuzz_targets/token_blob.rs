//! libFuzzer entry of the `token_blob` target (`mcim_fuzz::token_blob`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mcim_fuzz::token_blob(data));
