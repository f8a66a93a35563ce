//! libFuzzer entry of the `saved_run` target (`mcim_fuzz::saved_run`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mcim_fuzz::saved_run(data));
