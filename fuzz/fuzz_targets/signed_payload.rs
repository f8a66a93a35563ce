//! libFuzzer entry of the `signed_payload` target (`mcim_fuzz::signed_payload`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mcim_fuzz::signed_payload(data));
