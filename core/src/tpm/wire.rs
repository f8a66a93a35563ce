//! The TPM's marshalling (TPM 2.0 Part 2 clause 4, Part 3 clause 4.5): big-endian integers and
//! TPM2B = 16-bit size || bytes.

use super::TpmStructError;

/// Appends big-endian fields to a buffer.
#[derive(Default)]
pub struct Writer(pub Vec<u8>);

impl Writer {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// A UINT16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// A UINT32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }

    /// A TPM2B: 16-bit size then the bytes. Fails when `b` exceeds 65535 bytes.
    pub fn tpm2b(&mut self, what: &'static str, b: &[u8]) -> Result<&mut Self, TpmStructError> {
        let n = u16::try_from(b.len()).map_err(|_| TpmStructError::BadSize(what))?;
        self.u16(n);
        self.0.extend_from_slice(b);
        Ok(self)
    }

    /// The bytes written.
    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// Reads big-endian fields from a byte slice, naming the structure in every error.
pub struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Reads `buf`, which holds a `what`.
    pub fn new(what: &'static str, buf: &'a [u8]) -> Self {
        Self { buf, what }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], TpmStructError> {
        if self.buf.len() < n {
            return Err(TpmStructError::Truncated(self.what));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// A fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], TpmStructError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// A UINT8.
    pub fn u8(&mut self) -> Result<u8, TpmStructError> {
        Ok(self.array::<1>()?[0])
    }

    /// A UINT16.
    pub fn u16(&mut self) -> Result<u16, TpmStructError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    /// A UINT32.
    pub fn u32(&mut self) -> Result<u32, TpmStructError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// A UINT64.
    pub fn u64(&mut self) -> Result<u64, TpmStructError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A TPM2B's contents.
    pub fn tpm2b(&mut self) -> Result<&'a [u8], TpmStructError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    /// What is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }

    /// Succeeds only when everything was read.
    pub fn finish(self) -> Result<(), TpmStructError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(TpmStructError::Trailing {
                what: self.what,
                extra: self.buf.len(),
            })
        }
    }
}

/// The contents of a whole TPM2B held in `buf`: the size prefix must match exactly.
pub fn unwrap_tpm2b<'a>(what: &'static str, buf: &'a [u8]) -> Result<&'a [u8], TpmStructError> {
    let mut r = Reader::new(what, buf);
    let inner = r.tpm2b()?;
    r.finish()?;
    Ok(inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpm2b_round_trip_and_errors() {
        let mut w = Writer::new();
        w.u16(0x0102).u32(0x03040506);
        w.tpm2b("t", &[9, 9, 9]).map(|_| ()).unwrap_or_default();
        let b = w.finish();
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 0, 3, 9, 9, 9]);
        let mut r = Reader::new("t", &b);
        assert_eq!(r.u16(), Ok(0x0102));
        assert_eq!(r.u32(), Ok(0x03040506));
        assert_eq!(r.tpm2b(), Ok(&[9u8, 9, 9][..]));
        assert_eq!(r.finish(), Ok(()));
        assert_eq!(
            unwrap_tpm2b("x", &[0, 2, 1]),
            Err(TpmStructError::Truncated("x"))
        );
        assert_eq!(
            unwrap_tpm2b("x", &[0, 1, 1, 7]),
            Err(TpmStructError::Trailing {
                what: "x",
                extra: 1
            })
        );
        assert!(Writer::new().tpm2b("big", &vec![0u8; 70_000]).is_err());
    }
}
