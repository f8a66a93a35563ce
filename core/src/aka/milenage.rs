//! MILENAGE (3GPP TS 35.206) over a pluggable 128-bit block-cipher kernel.
//!
//! Every use of K is one call of [`Kernel::encrypt_blocks`]. A full computation makes two
//! calls: TEMP = E_K(RAND ⊕ OPc), then the five output blocks OUT1..OUT5 in one batch, so
//! a TRE backend (TPM2_EncryptDecrypt2 in ECB, PKCS#11 CKM_AES_ECB) pays two round trips,
//! and the software kernel lets AES-NI pipeline the five blocks.
//!
//! Operator-defined constants c1..c5 and rotations r1..r5 (TS 35.206 4.1) are supported;
//! [`Constants::default`] holds the values of the specification.

use super::{Amf, Ck, Ik, K, Op, Opc, Rand, Res};
use aes::Aes128;
use aes::cipher::consts::U16;
use aes::cipher::inout::InOutBuf;
use aes::cipher::{
    Array, BlockCipherEncBackend, BlockCipherEncClosure, BlockCipherEncrypt, BlockSizeUser, KeyInit,
};
use std::convert::Infallible;
use zeroize::Zeroize;

/// One 128-bit block.
pub type Block = [u8; 16];

/// The one operation of MILENAGE that touches K: E_K on each block, in place.
///
/// Implementations: [`SoftKernel`] (AES-128 in memory, for network nodes and tests) and the
/// TRE's backends in `mcim-tre` (K held by the TPM or the PKCS#11 token).
pub trait Kernel {
    /// What can go wrong in the kernel (a TPM command failing, say).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Replaces each block by E_K(block). Called with one block (TEMP) or with the batch of
    /// output blocks.
    fn encrypt_blocks(&self, blocks: &mut [Block]) -> Result<(), Self::Error>;

    /// Two dependent rounds: E_K on `first`, then `between` builds `second` from the
    /// encrypted `first`, then E_K on `second`. MILENAGE's TEMP followed by OUT1..OUT5 has
    /// this shape. The default makes two [`Kernel::encrypt_blocks`] calls; a kernel with a
    /// per-call set-up cost does both rounds in one session.
    fn encrypt_two_rounds(
        &self,
        first: &mut [Block],
        second: &mut [Block],
        between: &mut dyn FnMut(&[Block], &mut [Block]),
    ) -> Result<(), Self::Error> {
        self.encrypt_blocks(first)?;
        between(first, second);
        self.encrypt_blocks(second)
    }
}

/// AES-128 with its key schedule expanded once and kept; zeroized on drop.
#[derive(Clone)]
pub struct SoftKernel(Aes128);

impl SoftKernel {
    /// Expands the key schedule of K.
    pub fn new(k: &K) -> Self {
        Self(Aes128::new(&Array::from(*k.expose())))
    }
}

impl std::fmt::Debug for SoftKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SoftKernel(redacted)")
    }
}

impl Kernel for SoftKernel {
    type Error = Infallible;

    fn encrypt_blocks(&self, blocks: &mut [Block]) -> Result<(), Infallible> {
        self.0
            .encrypt_blocks(Array::cast_slice_from_core_mut(blocks));
        Ok(())
    }

    fn encrypt_two_rounds(
        &self,
        first: &mut [Block],
        second: &mut [Block],
        between: &mut dyn FnMut(&[Block], &mut [Block]),
    ) -> Result<(), Infallible> {
        // One backend session for both rounds: with AES-NI/VAES the set-up of a session
        // costs more than the blocks themselves (BENCHMARKS.md).
        self.0.encrypt_with_backend(TwoRounds {
            first,
            second,
            between,
        });
        Ok(())
    }
}

struct TwoRounds<'a> {
    first: &'a mut [Block],
    second: &'a mut [Block],
    between: &'a mut dyn FnMut(&[Block], &mut [Block]),
}

impl BlockSizeUser for TwoRounds<'_> {
    type BlockSize = U16;
}

impl BlockCipherEncClosure for TwoRounds<'_> {
    fn call<B: BlockCipherEncBackend<BlockSize = U16>>(self, backend: &B) {
        encrypt_with(backend, self.first);
        (self.between)(self.first, self.second);
        encrypt_with(backend, self.second);
    }
}

fn encrypt_with<B: BlockCipherEncBackend<BlockSize = U16>>(backend: &B, blocks: &mut [Block]) {
    let buf: InOutBuf<'_, '_, Array<u8, U16>> = Array::cast_slice_from_core_mut(blocks).into();
    let (chunks, tail) = buf.into_chunks::<B::ParBlocksSize>();
    for chunk in chunks {
        backend.encrypt_par_blocks(chunk);
    }
    backend.encrypt_tail_blocks(tail);
}

/// The rotation and constant of TS 35.206 4.1 that were given out of range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("MILENAGE rotation r{index} = {value} is out of range (0..=127)")]
pub struct InvalidConstants {
    /// 1..=5
    pub index: usize,
    /// the value given
    pub value: u32,
}

/// The operator-definable constants c1..c5 (128 bits) and rotations r1..r5 (bits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Constants {
    c: [u128; 5],
    r: [u32; 5],
}

impl Default for Constants {
    /// TS 35.206 4.1: r1=64, r2=0, r3=32, r4=64, r5=96; c1=0, c2=1, c3=2, c4=4, c5=8.
    fn default() -> Self {
        Self {
            c: [0, 1, 2, 4, 8],
            r: [64, 0, 32, 64, 96],
        }
    }
}

impl Constants {
    /// Operator-defined constants; each r must be below 128.
    pub fn new(c: [Block; 5], r: [u32; 5]) -> Result<Self, InvalidConstants> {
        if let Some((i, &value)) = r.iter().enumerate().find(|(_, v)| **v > 127) {
            return Err(InvalidConstants {
                index: i + 1,
                value,
            });
        }
        Ok(Self {
            c: c.map(u128::from_be_bytes),
            r,
        })
    }

    /// c1..c5 as blocks.
    pub fn c_blocks(&self) -> [Block; 5] {
        self.c.map(u128::to_be_bytes)
    }

    /// r1..r5.
    pub fn rotations(&self) -> [u32; 5] {
        self.r
    }
}

/// f2..f5* of one RAND.
#[derive(Clone, Debug)]
pub struct F2345 {
    /// f2: RES / XRES
    pub res: Res,
    /// f3: CK
    pub ck: Ck,
    /// f4: IK
    pub ik: Ik,
    /// f5: AK
    pub ak: [u8; 6],
    /// f5*: AK for resynchronisation
    pub ak_star: [u8; 6],
}

/// Every MILENAGE output for one (RAND, SQN, AMF).
#[derive(Clone, Debug)]
pub struct MilenageOutput {
    /// f1: MAC-A
    pub mac_a: [u8; 8],
    /// f1*: MAC-S
    pub mac_s: [u8; 8],
    /// f2..f5*
    pub f2345: F2345,
}

/// MILENAGE with one subscriber's OPc and a kernel holding K.
pub struct Milenage<Kn: Kernel> {
    kernel: Kn,
    opc: Opc,
    consts: Constants,
}

impl<Kn: Kernel> std::fmt::Debug for Milenage<Kn> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Milenage")
            .field("opc", &self.opc)
            .field("consts", &self.consts)
            .finish_non_exhaustive()
    }
}

fn rot(x: u128, r: u32) -> u128 {
    // TS 35.206 4.1: rotate towards the most significant bit.
    x.rotate_left(r)
}

impl<Kn: Kernel> Milenage<Kn> {
    /// MILENAGE with a known OPc.
    pub fn with_opc(kernel: Kn, opc: Opc, consts: Constants) -> Self {
        Self {
            kernel,
            opc,
            consts,
        }
    }

    /// MILENAGE from OP: OPc = OP ⊕ E_K(OP) (TS 35.206 4.1), one kernel call.
    pub fn with_op(kernel: Kn, op: &Op, consts: Constants) -> Result<Self, Kn::Error> {
        let opc = derive_opc(&kernel, op)?;
        Ok(Self::with_opc(kernel, opc, consts))
    }

    /// The OPc in use.
    pub fn opc(&self) -> &Opc {
        &self.opc
    }

    /// The kernel.
    pub fn kernel(&self) -> &Kn {
        &self.kernel
    }

    /// TEMP = E_K(RAND ⊕ OPc): one kernel call; the input of every function.
    pub fn temp(&self, rand: &Rand) -> Result<u128, Kn::Error> {
        let mut opc = u128::from_be_bytes(*self.opc.expose());
        let mut block = [(u128::from_be_bytes(rand.0) ^ opc).to_be_bytes()];
        opc.zeroize();
        let r = self.kernel.encrypt_blocks(&mut block);
        let temp = u128::from_be_bytes(block[0]);
        block.zeroize();
        r.map(|()| temp)
    }

    /// Input of OUT1 (before E_K): TEMP ⊕ rot(IN1 ⊕ OPc, r1) ⊕ c1, IN1 = SQN||AMF||SQN||AMF.
    fn in1(&self, temp: u128, opc: u128, sqn: &[u8; 6], amf: &Amf) -> Block {
        let mut half = [0u8; 8];
        half[..6].copy_from_slice(sqn);
        half[6..].copy_from_slice(&amf.0);
        let h = u64::from_be_bytes(half) as u128;
        let in1 = (h << 64) | h;
        (temp ^ rot(in1 ^ opc, self.consts.r[0]) ^ self.consts.c[0]).to_be_bytes()
    }

    /// Input of OUTi for i in 2..=5 (before E_K): rot(TEMP ⊕ OPc, ri) ⊕ ci.
    fn in_i(&self, temp: u128, opc: u128, i: usize) -> Block {
        (rot(temp ^ opc, self.consts.r[i - 1]) ^ self.consts.c[i - 1]).to_be_bytes()
    }

    fn split_f2345(out: &[Block; 4], opc: u128) -> F2345 {
        let o2 = (u128::from_be_bytes(out[0]) ^ opc).to_be_bytes();
        let o3 = (u128::from_be_bytes(out[1]) ^ opc).to_be_bytes();
        let o4 = (u128::from_be_bytes(out[2]) ^ opc).to_be_bytes();
        let o5 = (u128::from_be_bytes(out[3]) ^ opc).to_be_bytes();
        let mut res = [0u8; 8];
        res.copy_from_slice(&o2[8..]);
        let mut ak = [0u8; 6];
        ak.copy_from_slice(&o2[..6]);
        let mut ak_star = [0u8; 6];
        ak_star.copy_from_slice(&o5[..6]);
        F2345 {
            res: Res(res),
            ck: Ck::new(o3),
            ik: Ik::new(o4),
            ak,
            ak_star,
        }
    }

    fn split_f1(out1: &Block, opc: u128) -> ([u8; 8], [u8; 8]) {
        let o1 = (u128::from_be_bytes(*out1) ^ opc).to_be_bytes();
        let mut mac_a = [0u8; 8];
        let mut mac_s = [0u8; 8];
        mac_a.copy_from_slice(&o1[..8]);
        mac_s.copy_from_slice(&o1[8..]);
        (mac_a, mac_s)
    }

    /// f1 and f1* (MAC-A, MAC-S) given TEMP: one kernel call.
    pub fn f1_with_temp(
        &self,
        temp: u128,
        sqn: &[u8; 6],
        amf: &Amf,
    ) -> Result<([u8; 8], [u8; 8]), Kn::Error> {
        let mut opc = u128::from_be_bytes(*self.opc.expose());
        let mut blocks = [self.in1(temp, opc, sqn, amf)];
        let r = self.kernel.encrypt_blocks(&mut blocks);
        let out = r.map(|()| Self::split_f1(&blocks[0], opc));
        blocks.zeroize();
        opc.zeroize();
        out
    }

    /// f2, f3, f4, f5, f5* given TEMP: one kernel call with four blocks.
    pub fn f2345_with_temp(&self, temp: u128) -> Result<F2345, Kn::Error> {
        let mut opc = u128::from_be_bytes(*self.opc.expose());
        let mut blocks = [
            self.in_i(temp, opc, 2),
            self.in_i(temp, opc, 3),
            self.in_i(temp, opc, 4),
            self.in_i(temp, opc, 5),
        ];
        let r = self.kernel.encrypt_blocks(&mut blocks);
        let out = r.map(|()| Self::split_f2345(&blocks, opc));
        blocks.zeroize();
        opc.zeroize();
        out
    }

    /// f1 and f1*: two kernel calls.
    pub fn f1(
        &self,
        rand: &Rand,
        sqn: &[u8; 6],
        amf: &Amf,
    ) -> Result<([u8; 8], [u8; 8]), Kn::Error> {
        let temp = self.temp(rand)?;
        self.f1_with_temp(temp, sqn, amf)
    }

    /// f2, f3, f4, f5, f5*: two kernel calls.
    pub fn f2345(&self, rand: &Rand) -> Result<F2345, Kn::Error> {
        let temp = self.temp(rand)?;
        self.f2345_with_temp(temp)
    }

    /// Everything for one (RAND, SQN, AMF): TEMP, then OUT1..OUT5 batched, in one
    /// [`Kernel::encrypt_two_rounds`].
    pub fn compute(
        &self,
        rand: &Rand,
        sqn: &[u8; 6],
        amf: &Amf,
    ) -> Result<MilenageOutput, Kn::Error> {
        let mut opc = u128::from_be_bytes(*self.opc.expose());
        // Buffers are u128 so that wiping them is one volatile store per block.
        let mut first = [0u128; 1];
        let mut second = [0u128; 5];
        let first_b: &mut [Block] = bytemuck::cast_slice_mut(&mut first);
        first_b[0] = (u128::from_be_bytes(rand.0) ^ opc).to_be_bytes();
        let second_b: &mut [Block] = bytemuck::cast_slice_mut(&mut second);
        let r = self
            .kernel
            .encrypt_two_rounds(first_b, second_b, &mut |temps, five| {
                self.fill_outputs_input(u128::from_be_bytes(temps[0]), opc, sqn, amf, five);
            });
        let out = r.map(|()| Self::split_outputs(bytemuck::cast_slice(&second), opc));
        first.zeroize();
        second.zeroize();
        opc.zeroize();
        out
    }

    /// The five inputs of OUT1..OUT5 (before E_K) from TEMP.
    fn fill_outputs_input(
        &self,
        temp: u128,
        opc: u128,
        sqn: &[u8; 6],
        amf: &Amf,
        five: &mut [Block],
    ) {
        for (i, slot) in five.iter_mut().enumerate() {
            *slot = if i == 0 {
                self.in1(temp, opc, sqn, amf)
            } else {
                self.in_i(temp, opc, i + 1)
            };
        }
    }

    /// MilenageOutput from E_K of the five inputs.
    fn split_outputs(o: &[Block], opc: u128) -> MilenageOutput {
        let (mac_a, mac_s) = Self::split_f1(&o[0], opc);
        let f2345 = Self::split_f2345(&[o[1], o[2], o[3], o[4]], opc);
        MilenageOutput {
            mac_a,
            mac_s,
            f2345,
        }
    }

    /// Everything for several (RAND, SQN, AMF) at once: all TEMPs in the first round, all
    /// OUT1..OUT5 in the second, one [`Kernel::encrypt_two_rounds`] for the lot.
    pub fn compute_many(
        &self,
        inputs: &[(Rand, [u8; 6], Amf)],
    ) -> Result<Vec<MilenageOutput>, Kn::Error> {
        let mut opc = u128::from_be_bytes(*self.opc.expose());
        let mut first = vec![0u128; inputs.len()];
        let mut second = vec![0u128; 5 * inputs.len()];
        let first_b: &mut [Block] = bytemuck::cast_slice_mut(&mut first);
        for (slot, (rand, _, _)) in first_b.iter_mut().zip(inputs) {
            *slot = (u128::from_be_bytes(rand.0) ^ opc).to_be_bytes();
        }
        let second_b: &mut [Block] = bytemuck::cast_slice_mut(&mut second);
        let r = self
            .kernel
            .encrypt_two_rounds(first_b, second_b, &mut |temps, ins| {
                for ((temp, (_, sqn, amf)), five) in
                    temps.iter().zip(inputs).zip(ins.chunks_exact_mut(5))
                {
                    self.fill_outputs_input(u128::from_be_bytes(*temp), opc, sqn, amf, five);
                }
            });
        let out = r.map(|()| {
            bytemuck::cast_slice::<u128, Block>(&second)
                .chunks_exact(5)
                .map(|o| Self::split_outputs(o, opc))
                .collect()
        });
        first.zeroize();
        second.zeroize();
        opc.zeroize();
        out
    }
}

/// OPc = OP ⊕ E_K(OP) (TS 35.206 4.1): one kernel call.
pub fn derive_opc<Kn: Kernel>(kernel: &Kn, op: &Op) -> Result<Opc, Kn::Error> {
    let mut block = [*op.expose()];
    kernel.encrypt_blocks(&mut block)?;
    let mut opc = [0u8; 16];
    for (o, (e, p)) in opc.iter_mut().zip(block[0].iter().zip(op.expose())) {
        *o = e ^ p;
    }
    block.zeroize();
    let out = Opc::new(opc);
    opc.zeroize();
    Ok(out)
}

/// Unwraps a result whose error cannot exist (the software kernel's).
pub fn infallible<T>(r: Result<T, Infallible>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => match e {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_is_towards_the_msb() {
        assert_eq!(rot(1, 1), 2);
        assert_eq!(rot(1u128 << 127, 1), 1);
        assert_eq!(rot(0xAB, 0), 0xAB);
        assert_eq!(rot(1, 64), 1u128 << 64);
    }

    #[test]
    fn constants_reject_rotations_of_128_or_more() {
        let c = [[0u8; 16]; 5];
        assert_eq!(
            Constants::new(c, [64, 0, 128, 64, 96]),
            Err(InvalidConstants {
                index: 3,
                value: 128
            })
        );
        assert_eq!(Constants::new(c, [64, 0, 127, 64, 96]).map(|_| ()), Ok(()));
    }

    #[test]
    fn soft_kernel_debug_is_redacted() {
        let k = SoftKernel::new(&K::new([0x42; 16]));
        assert_eq!(format!("{k:?}"), "SoftKernel(redacted)");
    }
}
