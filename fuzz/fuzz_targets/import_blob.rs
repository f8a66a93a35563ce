//! libFuzzer entry of the `import_blob` target (`mcim_fuzz::import_blob`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mcim_fuzz::import_blob(data));
