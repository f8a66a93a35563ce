//! libFuzzer entry of the `platform_credential` target (`mcim_fuzz::platform_credential`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mcim_fuzz::platform_credential(data));
