//! A simulated device of the fleet benchmark (issue 16 item 4), named as such everywhere: its
//! keys are software keys in this process's memory. It is not a TRE, nothing in `tred` uses
//! it, and no flow or TRE test runs on it. It does what a device with a PKCS#11 TRE does on the
//! wire (tre-daemon's `provision`), with the same cryptography:
//!
//! - supply time (5.1.3.3.4): a storage (unwrap) key, an attestation key and a TLS key, all
//!   P-256, certified by the supplier's CertifyDevice; the PCID's credential embedded by the
//!   supplier (CCIF mode 2, 5.1.3.4.1);
//! - the owner's proof of ownership (annex x.2.3), signed with the TLS key;
//! - AKA (TS 33.102 6.3.3): MILENAGE in software, AUTN checked, SQN kept per TS 33.102 Annex C;
//! - integrity evidence (5.1.3.6.2 step 8): `mcim_core::token_evidence`, signed by the
//!   attestation key, which the PVA checks against the platform credential;
//! - the package (5.1.3.6.2 steps 12-13): the SHO's signature and certificate checked, K and
//!   OPc unwrapped (ECDH + AES-KWP, `mcim_core::token_wrap`).

use std::sync::Arc;

use mcim_core::aka::{
    Autn, Constants, DeviceResponse, K, Milenage, MsSqnState, Opc, Rand, SoftKernel, SqnProfile,
};
use mcim_core::token_wrap::{P256_SPKI_PREFIX, TokenBlob, unwrap_in_software};
use mcim_pki::Role;
use mcim_proto::mcim::common::v1 as common;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::elliptic_curve::Generate;
use p256::elliptic_curve::sec1::ToSec1Point;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The measurement every simulated device reports (a token-style device's "SHA-256 of the
/// daemon's executable and configuration"): SHA-256 of this string, registered at the PVA as
/// the fleet model's reference value.
pub const MEASURED: &[u8] = b"mcim fleet simulated device";

/// The measurement of [`MEASURED`].
pub fn measurement() -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(MEASURED).into()
}

/// An MCIM's secrets as the simulated device keeps them (in memory, zeroized on drop).
pub struct Credential {
    milenage: Milenage<SoftKernel>,
    sqn: MsSqnState,
}

impl Credential {
    /// From K, OPc and the MILENAGE constants.
    pub fn new(k: &K, opc: Opc, constants: Constants) -> Self {
        Self {
            milenage: Milenage::with_opc(SoftKernel::new(k), opc, constants),
            sqn: MsSqnState::new(&SqnProfile::default()),
        }
    }

    /// The USIM side of AKA: RES, or AUTS on a synchronisation failure; an AUTN that is not
    /// genuine is refused.
    pub fn authenticate(&mut self, rand: &[u8], autn: &[u8]) -> Result<Answer, String> {
        let block = |what: &str, v: &[u8]| -> Result<[u8; 16], String> {
            v.try_into()
                .map_err(|_| format!("{what} is {} octets, not 16", v.len()))
        };
        let (rand, autn) = (Rand(block("RAND", rand)?), Autn(block("AUTN", autn)?));
        match mcim_core::aka::authenticate(
            &self.milenage,
            &mut self.sqn,
            &SqnProfile::default(),
            &rand,
            &autn,
        )
        .map_err(|e| e.to_string())?
        {
            DeviceResponse::Success { res, .. } => Ok(Answer::Res(res.0.to_vec())),
            DeviceResponse::SyncFailure { auts, .. } => Ok(Answer::Auts(auts.0.to_vec())),
        }
    }
}

/// A device's answer to a challenge.
pub enum Answer {
    /// RES.
    Res(Vec<u8>),
    /// AUTS (resynchronisation).
    Auts(Vec<u8>),
}

/// One simulated device: its identity, software keys and certificates, and its MCIMs.
pub struct SimulatedDevice {
    /// Its identity (the PCID among it).
    pub identity: common::DeviceIdentity,
    storage: p256::SecretKey,
    /// Signs the evidence on the timed path: held by ring, as the roles hold theirs.
    attestation: mcim_core::es256::Signer,
    tls: SigningKey,
    /// The TLS key as PKCS#8, made once: the `p256` crate recomputes the public key for each
    /// encoding (a scalar multiplication per connection, 12 % of the simulator's CPU).
    tls_pkcs8: zeroize::Zeroizing<Vec<u8>>,
    /// The supplier's platform credential (chain, DER).
    pub platform_credential: Vec<Vec<u8>>,
    /// The supplier's certificate of the TLS key (chain, DER).
    pub tls_certificate: Vec<Vec<u8>>,
    /// The PCID's initial credential (5.1.3.4.1).
    pub pcid_credential: Option<Credential>,
}

/// The SPKI of a P-256 public key (what a token reports).
fn spki(point: &[u8]) -> Vec<u8> {
    let mut v = P256_SPKI_PREFIX.to_vec();
    v.extend_from_slice(point);
    v
}

impl SimulatedDevice {
    /// A new device with fresh keys (`Err` if ring will not take a P-256 key the `p256`
    /// crate made: a bug of one of them).
    pub fn new(identity: common::DeviceIdentity) -> Result<Self, mcim_core::es256::Es256Error> {
        use p256::pkcs8::EncodePrivateKey;
        let mut rng = rand::rng();
        let attestation = mcim_core::es256::Signer::new(&SigningKey::generate_from_rng(&mut rng))?;
        let tls = SigningKey::generate_from_rng(&mut rng);
        let tls_pkcs8 = zeroize::Zeroizing::new(
            tls.to_pkcs8_der()
                .map_err(|_| mcim_core::es256::Es256Error::BadKey)?
                .as_bytes()
                .to_vec(),
        );
        Ok(Self {
            identity,
            storage: p256::SecretKey::generate_from_rng(&mut rng),
            attestation,
            tls,
            tls_pkcs8,
            platform_credential: Vec::new(),
            tls_certificate: Vec::new(),
            pcid_credential: None,
        })
    }

    /// The storage (unwrap) key's SPKI: what the SHO wraps the MCIM's secrets to.
    pub fn storage_public(&self) -> Vec<u8> {
        spki(self.storage.public_key().to_sec1_point(false).as_bytes())
    }

    /// The attestation key's SPKI.
    pub fn attestation_public(&self) -> Vec<u8> {
        spki(self.attestation.public_point())
    }

    /// The TLS key's SPKI.
    pub fn tls_public(&self) -> Vec<u8> {
        spki(self.tls.verifying_key().to_sec1_point(false).as_bytes())
    }

    /// ECDSA P-256 over SHA-256(message), DER, with the TLS key (the proof of ownership).
    pub fn tls_sign(&self, message: &[u8]) -> Vec<u8> {
        let s: Signature = self.tls.sign(message);
        s.to_der().as_bytes().to_vec()
    }

    /// Token-style evidence for the verifier's `nonce` (5.1.3.6.2 step 8): the payload of
    /// `mcim_core::token_evidence` signed by the attestation key (r || s).
    pub fn evidence(&self, nonce: &[u8]) -> common::Evidence {
        let payload = mcim_core::token_evidence::EvidencePayload::new(
            &self.identity.pcid,
            nonce,
            &measurement(),
        )
        .to_bytes();
        // ES256 of the payload: what a token's CKM_ECDSA over SHA-256(payload) gives. Ring
        // fails only when the system's random source does: then the PVA refuses the
        // evidence, and the device is counted failed with that reason.
        let signature = self.attestation.sign(&payload).unwrap_or_default();
        common::Evidence {
            kind: Some(common::evidence::Kind::Pkcs11Signature(
                common::Pkcs11Signature { payload, signature },
            )),
            aka_execution: common::AkaExecution::InTre as i32,
            platform_credential: self.platform_credential.clone(),
        }
    }

    /// The device's mutual-TLS configuration towards a role whose certificates `ca_pem` issues.
    pub fn tls_config(&self, ca_pem: &[u8]) -> Result<Arc<rustls::ClientConfig>, String> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.tls_pkcs8.to_vec()));
        let chain = self
            .tls_certificate
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        mcim_pki::dev::client_config(ca_pem, chain, key).map(Arc::new)
    }

    /// Opens a package (5.1.3.6.2 steps 12-13): signed by the SHO `sho_id` (its certificate
    /// under `sho_ca_pem`), for this device and this registration, and its K and OPc unwrapped
    /// with the storage key. Returns the IMSI and the credential.
    pub fn open_package(
        &self,
        package: &[u8],
        sho_ca_pem: &[u8],
        sho_id: &str,
        registration_id: &str,
        nonce: &[u8],
    ) -> Result<(String, Credential), String> {
        let cert = mcim_core::signed::signer_certificate(package).map_err(|e| e.to_string())?;
        let sho = mcim_pki::party::verify_party(sho_ca_pem, &cert, Role::Sho, sho_id)?;
        let p =
            mcim_core::package::open(package, &sho, &self.identity.pcid, registration_id, nonce)
                .map_err(|e| e.to_string())?;
        let secret = |what: &str, hex_blob: &str| -> Result<zeroize::Zeroizing<[u8; 16]>, String> {
            let blob = hex::decode(hex_blob).map_err(|e| format!("{what}: {e}"))?;
            let blob = TokenBlob::from_bytes(&blob).map_err(|e| format!("{what}: {e}"))?;
            let clear =
                unwrap_in_software(&self.storage, &blob).map_err(|e| format!("{what}: {e}"))?;
            let mut out = zeroize::Zeroizing::new([0u8; 16]);
            if clear.len() != 16 {
                return Err(format!("{what}: {} octets, not 16", clear.len()));
            }
            out.copy_from_slice(&clear);
            Ok(out)
        };
        let (k, opc) = (
            secret("wrapped_k", &p.wrapped_k)?,
            secret("wrapped_opc", &p.wrapped_opc)?,
        );
        let constants = p.constants().map_err(|e| e.to_string())?;
        Ok((
            p.imsi,
            Credential::new(&K::new(*k), Opc::new(*opc), constants),
        ))
    }
}
