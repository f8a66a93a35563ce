//! libFuzzer entry of the `package` target (`mcim_fuzz::package`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mcim_fuzz::package(data));
