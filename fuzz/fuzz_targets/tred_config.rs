//! libFuzzer entry of the `tred_config` target (`mcim_fuzz::tred_config`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mcim_fuzz::tred_config(data));
