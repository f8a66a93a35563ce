//! Fixed-length hexadecimal arguments, checked by clap so that a bad value names the
//! argument and exits with status 2.

use zeroize::Zeroize;

/// Parses exactly `N` bytes of hex (an optional `0x` prefix, either case).
pub fn parse<const N: usize>(s: &str) -> Result<[u8; N], String> {
    let t = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if t.len() != 2 * N {
        return Err(format!(
            "expected {} hex digits ({N} bytes), got {} characters",
            2 * N,
            t.len()
        ));
    }
    let mut out = [0u8; N];
    hex::decode_to_slice(t, &mut out).map_err(|e| {
        out.zeroize();
        format!("not hexadecimal: {e}")
    })?;
    Ok(out)
}

/// Bytes of variable length (a newtype: clap takes a bare `Vec<u8>` for many `u8` values).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

/// A nonce: 16 to 64 bytes of hex (what tred and a PVA accept).
pub fn nonce(s: &str) -> Result<Bytes, String> {
    let t = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if !t.len().is_multiple_of(2) || !(32..=128).contains(&t.len()) {
        return Err(format!(
            "expected 32 to 128 hex digits (16 to 64 bytes), got {} characters",
            t.len()
        ));
    }
    hex::decode(t)
        .map(Bytes)
        .map_err(|e| format!("not hexadecimal: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_exact_length_any_case_and_prefix() {
        assert_eq!(parse::<2>("b9B9"), Ok([0xb9, 0xb9]));
        assert_eq!(parse::<2>("0xb9b9"), Ok([0xb9, 0xb9]));
    }

    #[test]
    fn nonce_is_16_to_64_bytes() {
        assert_eq!(nonce(&"ab".repeat(16)), Ok(Bytes(vec![0xab; 16])));
        assert_eq!(nonce(&"ab".repeat(64)), Ok(Bytes(vec![0xab; 64])));
        assert!(nonce("123").unwrap_err().contains("32 to 128 hex digits"));
        assert!(nonce(&"ab".repeat(15)).is_err());
        assert!(nonce(&"ab".repeat(65)).is_err());
        assert!(
            nonce(&"zz".repeat(16))
                .unwrap_err()
                .contains("not hexadecimal")
        );
    }

    #[test]
    fn refuses_wrong_length_and_non_hex() {
        assert!(
            parse::<2>("b9b")
                .unwrap_err()
                .contains("expected 4 hex digits")
        );
        assert!(parse::<2>("b9b9b9").is_err());
        assert!(parse::<2>("zzzz").unwrap_err().contains("not hexadecimal"));
    }
}
