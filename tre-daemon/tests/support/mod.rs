//! Test support: a private swtpm per test (mcim-e2e), TS 35.208 sets, the SHO-side wrap.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[allow(unused_imports)] // not every test file of every backend starts a swtpm
pub use mcim_e2e::Swtpm;

/// One TS 35.208 MILENAGE test set (core/testdata), as the conformance suite uses it.
#[derive(serde::Deserialize)]
#[allow(dead_code)]
pub struct TestSet {
    pub set: u32,
    pub k: String,
    pub rand: String,
    pub sqn: String,
    pub amf: String,
    pub opc: String,
    pub f2: String,
    pub f3: String,
    pub f4: String,
}

/// TS 35.208 sets 1-20.
#[allow(dead_code)]
pub fn ts35208_sets() -> Vec<TestSet> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../core/testdata/milenage_ts35208.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Hex to a fixed-size array.
#[allow(dead_code)]
pub fn arr<const N: usize>(h: &str) -> [u8; N] {
    hex::decode(h).unwrap().try_into().unwrap()
}

/// How the SHO wraps K for a device: as a TRE key (AKA in the TRE) or as sealed data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KForm {
    Key,
    Sealed,
}

/// The SHO's side for a TPM: duplication blobs built in software by mcim-core.
pub fn tpm_wrap(
    public: &mcim_tre::tre::DevicePublic,
    k: &mcim_core::aka::K,
    opc: &mcim_core::aka::Opc,
    form: KForm,
) -> mcim_tre::tre::WrappedSecrets {
    use mcim_core::tpm::import::{ObjectPolicy, wrap_aes128_key, wrap_sealed_data};
    let parent = mcim_core::tpm::public::EccPublic::from_tpm2b(&public.storage_public).unwrap();
    let mut rng = rand::rng();
    let k_blob = match form {
        KForm::Key => wrap_aes128_key(&parent, k, ObjectPolicy::default(), &mut rng),
        KForm::Sealed => wrap_sealed_data(&parent, k.expose(), ObjectPolicy::default(), &mut rng),
    }
    .unwrap();
    let opc_blob =
        wrap_sealed_data(&parent, opc.expose(), ObjectPolicy::default(), &mut rng).unwrap();
    mcim_tre::tre::WrappedSecrets {
        k: k_blob.to_bytes().unwrap(),
        opc: opc_blob.to_bytes().unwrap(),
    }
}
