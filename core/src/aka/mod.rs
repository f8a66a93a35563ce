//! 3GPP AKA: MILENAGE, the SQN scheme of TS 33.102 Annex C, authentication vectors and
//! resynchronisation.
//!
//! TR 33.812 5.1.2.2 asks the TRE to be "sufficiently secure as to allow the storage and
//! execution of AKA functions"; 5.1.3.6.2 steps 1-3 authenticate the PCID with AVs from the
//! RO's ICF, and the SHO authenticates the operational IMSI the same way. Both sides use this
//! module:
//!
//! - [`milenage`]: f1, f1*, f2, f3, f4, f5, f5* of TS 35.206 over a [`Kernel`], the one
//!   operation that touches K (E_K on 128-bit blocks). [`SoftKernel`] keeps an AES-128 key
//!   schedule in memory (network side); the TRE supplies a kernel whose key never leaves it.
//! - [`sqn`]: SQN = SEQ || IND with per-IND freshness arrays, the Δ wrap-around limit and the
//!   optional age limit L (TS 33.102 Annex C).
//! - [`network`]: authentication vectors and resynchronisation from AUTS (TS 33.102 6.3.2, 6.3.5).
//! - [`device`]: AUTN verification (MAC-A in constant time), SQN freshness, RES/CK/IK or AUTS
//!   (TS 33.102 6.3.3).

pub mod device;
pub mod milenage;
pub mod network;
pub mod sqn;

pub use device::{DeviceResponse, authenticate};
pub use milenage::{Constants, Kernel, Milenage, MilenageOutput, SoftKernel};
pub use network::{AuthVector, generate_av, generate_avs, recover_sqn_ms, resynchronise};
pub use sqn::{HeSqnState, MsSqnState, Sqn, SqnProfile};

use crate::secret::SecretBytes;
use subtle::ConstantTimeEq;

macro_rules! secret_newtype {
    ($(#[$doc:meta])* $name:ident, $n:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Debug)]
        pub struct $name(SecretBytes<$n>);

        impl $name {
            /// Takes ownership of the bytes.
            pub fn new(bytes: [u8; $n]) -> Self {
                Self(SecretBytes::new(bytes))
            }

            /// Copies from a slice; `None` when the length is not exactly the expected one.
            pub fn from_slice(bytes: &[u8]) -> Option<Self> {
                SecretBytes::from_slice(bytes).map(Self)
            }

            /// The secret bytes; keep the borrow short and never log them.
            pub fn expose(&self) -> &[u8; $n] {
                self.0.expose()
            }
        }
    };
}

secret_newtype!(
    /// K: the subscriber key (128 bits), the one input MILENAGE must never reveal.
    K,
    16
);
secret_newtype!(
    /// OP: the operator variant algorithm configuration field (TS 35.206 2.2).
    Op,
    16
);
secret_newtype!(
    /// OPc = OP ⊕ E_K(OP) (TS 35.206 4.1).
    Opc,
    16
);
secret_newtype!(
    /// CK: the cipher key (f3).
    Ck,
    16
);
secret_newtype!(
    /// IK: the integrity key (f4).
    Ik,
    16
);

/// RAND: the network's 128-bit challenge.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct Rand(pub [u8; 16]);

impl Rand {
    /// A fresh RAND from a cryptographically secure generator.
    pub fn random<R: rand::CryptoRng + ?Sized>(rng: &mut R) -> Self {
        let mut r = [0u8; 16];
        rng.fill_bytes(&mut r);
        Self(r)
    }
}

/// AMF: the 16-bit authentication management field.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct Amf(pub [u8; 2]);

impl Amf {
    /// The dummy AMF used for MAC-S in resynchronisation (TS 33.102 6.3.3: all zeros).
    pub const RESYNC: Amf = Amf([0, 0]);
}

/// AUTN = SQN ⊕ AK || AMF || MAC-A (TS 33.102 6.3.2).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct Autn(pub [u8; 16]);

/// AUTS = SQN_MS ⊕ AK* || MAC-S (TS 33.102 6.3.3).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct Auts(pub [u8; 14]);

/// RES (device) or XRES (network): the f2 output, 64 bits with MILENAGE.
///
/// `Debug` is redacted because an XRES held by a network node is as good as the answer.
#[derive(Clone, Copy)]
pub struct Res(pub [u8; 8]);

impl Res {
    /// Constant-time comparison of RES against XRES (developers' guide, non-negotiable 3).
    pub fn ct_matches(&self, other: &Res) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl std::fmt::Debug for Res {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Res(redacted)")
    }
}

impl zeroize::Zeroize for Res {
    fn zeroize(&mut self) {
        self.0.zeroize();
    }
}

/// a ⊕ b over six octets: conceals or reveals SQN with AK / AK*.
pub(crate) fn xor6(a: &[u8], b: &[u8; 6]) -> [u8; 6] {
    let mut out = [0u8; 6];
    for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
        *o = x ^ y;
    }
    out
}
