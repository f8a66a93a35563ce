#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mcim_fuzz::platform_credential(data));
