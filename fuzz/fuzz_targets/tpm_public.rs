//! libFuzzer entry of the `tpm_public` target (`mcim_fuzz::tpm_public`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mcim_fuzz::tpm_public(data));
