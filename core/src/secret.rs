//! Fixed-size secrets that are wiped on drop and never shown.
//!
//! K, OP, OPc, CK and IK pass through this type. `Debug` prints only the type name and
//! length, there is no `Display`, and the bytes are zeroized when the value is dropped
//! (developers' guide, non-negotiable 3).

use std::fmt;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// `N` secret bytes, zeroized on drop, redacted in `Debug`, compared in constant time.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SecretBytes<const N: usize>([u8; N]);

impl<const N: usize> SecretBytes<N> {
    /// Takes ownership of the bytes. The caller should zeroize its own copy, if any.
    pub fn new(bytes: [u8; N]) -> Self {
        Self(bytes)
    }

    /// Copies `N` bytes from a slice; `None` when the length differs.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let arr: [u8; N] = bytes.try_into().ok()?;
        Some(Self(arr))
    }

    /// The secret bytes. Keep the borrow short; never log them.
    pub fn expose(&self) -> &[u8; N] {
        &self.0
    }
}

impl<const N: usize> fmt::Debug for SecretBytes<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes<{N}>(redacted)")
    }
}

impl<const N: usize> PartialEq for SecretBytes<N> {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

impl<const N: usize> Eq for SecretBytes<N> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_bytes() {
        let s = SecretBytes::new([0xAB; 16]);
        let shown = format!("{s:?}");
        assert!(!shown.to_lowercase().contains("ab"), "{shown}");
        assert!(!shown.contains("171"), "{shown}");
        assert_eq!(shown, "SecretBytes<16>(redacted)");
    }

    #[test]
    fn from_slice_checks_length() {
        assert!(SecretBytes::<16>::from_slice(&[0; 15]).is_none());
        assert!(SecretBytes::<16>::from_slice(&[0; 17]).is_none());
        assert_eq!(
            SecretBytes::<16>::from_slice(&[7; 16]).map(|s| *s.expose()),
            Some([7; 16])
        );
    }

    #[test]
    fn equality_compares_content() {
        assert_eq!(SecretBytes::new([1u8; 8]), SecretBytes::new([1u8; 8]));
        assert_ne!(SecretBytes::new([1u8; 8]), SecretBytes::new([2u8; 8]));
    }
}
