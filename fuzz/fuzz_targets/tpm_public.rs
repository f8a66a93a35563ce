#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mcim_fuzz::tpm_public(data));
