//! libFuzzer entry of the `rehabilitation_token` target (`mcim_fuzz::rehabilitation_token`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mcim_fuzz::rehabilitation_token(data));
