//! libFuzzer entry of the `token_evidence` target (`mcim_fuzz::token_evidence`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mcim_fuzz::token_evidence(data));
