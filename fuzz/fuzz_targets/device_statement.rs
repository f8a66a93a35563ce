//! libFuzzer entry of the `device_statement` target (`mcim_fuzz::device_statement`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mcim_fuzz::device_statement(data));
