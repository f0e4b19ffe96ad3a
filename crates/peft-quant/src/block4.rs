//! bitsandbytes' blockwise 4-bit quantisation (NF4 / FP4), optionally with double quantisation of the block scales.
//!
//! **Layout** (identical to `bitsandbytes.functional.quantize_4bit`): the tensor is flattened row-major (blocks may
//! cross row boundaries); each block of `blocksize` values (the last may be partial) stores `absmax = max|x|` as f32
//! and each value becomes the nearest code of `x · (1/absmax)` ([`crate::codes::quantize_nf4`] /
//! [`crate::codes::quantize_fp4`], bnb's CUDA decision trees). Two codes per byte, **first element in the high
//! nibble**: `byte_k = q[2k] << 4 | q[2k+1]`; an odd element count pads the last low nibble with the code of 0.0
//! (NF4: 7, FP4: 0), as bnb does.
//!
//! **Double quantisation** (`compress_statistics=True`): `offset = mean(absmax)` (f32), then `absmax − offset` is
//! quantized with [`Blockwise8`] in blocks of 256 against the signed dynamic map. Dequantised scale:
//! `dyn[q8] · absmax₂[j / 256] + offset`.
//!
//! **Dequantisation**: `x̂ = table[q] · scale[block]` in f32 (bnb computes in f32 and then casts to `dtype`;
//! [`Quant4::dequantize_as_dtype`] applies that final cast).
//!
//! **Differences from bnb** (all confined to degenerate inputs): a block whose absmax is 0 gets the zero code (CUDA
//! divides by zero and stores code 0, which also dequantises to 0); a block whose absmax is so small that `1/absmax`
//! overflows divides instead of multiplying by the reciprocal; NaN/inf inputs are rejected. The offset is the mean
//! accumulated in f64 and rounded once, which can differ from torch's f32 `mean()` in the last bit.

use rayon::prelude::*;

use crate::blockwise8::Blockwise8;
use crate::codes::{dynamic_map, quantize_fp4, quantize_nf4, FP4, NF4};
use crate::error::{checked_numel, size, QuantError, Result};

/// The 4-bit data type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4 (QLoRA).
    Nf4,
    /// bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit).
    Fp4,
}

impl QuantType {
    /// bnb's name: `"nf4"` or `"fp4"`.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// Parses bnb's name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "nf4" => Some(QuantType::Nf4),
            "fp4" => Some(QuantType::Fp4),
            _ => None,
        }
    }

    /// The code table (index = 4-bit code).
    pub fn table(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4,
            QuantType::Fp4 => &FP4,
        }
    }

    /// The code of a normalised value (bnb's decision tree).
    #[inline(always)]
    pub fn code(self, x: f32) -> u8 {
        match self {
            QuantType::Nf4 => quantize_nf4(x),
            QuantType::Fp4 => quantize_fp4(x),
        }
    }

    /// The code 0.0 maps to (NF4: 7, FP4: 0).
    pub fn zero_code(self) -> u8 {
        self.code(0.0)
    }
}

/// The floating dtype recorded in the quant state (`"dtype"`): the weight's original dtype, which bnb casts the
/// dequantised values to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FloatDtype {
    /// `float32`.
    F32,
    /// `bfloat16`.
    Bf16,
    /// `float16`.
    F16,
}

impl FloatDtype {
    /// The torch name bnb writes (`"float32"`, `"bfloat16"`, `"float16"`).
    pub fn name(self) -> &'static str {
        match self {
            FloatDtype::F32 => "float32",
            FloatDtype::Bf16 => "bfloat16",
            FloatDtype::F16 => "float16",
        }
    }

    /// Parses the torch name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "float32" => Some(FloatDtype::F32),
            "bfloat16" => Some(FloatDtype::Bf16),
            "float16" => Some(FloatDtype::F16),
            _ => None,
        }
    }

    /// Rounds an f32 to this dtype (round-to-nearest-even, as torch's casts) and back.
    pub fn round(self, v: f32) -> f32 {
        match self {
            FloatDtype::F32 => v,
            FloatDtype::Bf16 => half::bf16::from_f32(v).to_f32(),
            FloatDtype::F16 => half::f16::from_f32(v).to_f32(),
        }
    }
}

/// How the 4-bit weight is quantized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quant4Config {
    /// NF4 or FP4.
    pub quant_type: QuantType,
    /// Values per scale: 32, 64, …, 4096 (powers of two, as bnb).
    pub blocksize: usize,
    /// Quantize the scales too (bnb `compress_statistics`, transformers `bnb_4bit_use_double_quant`).
    pub double_quant: bool,
}

impl Default for Quant4Config {
    /// QLoRA's setting: NF4, blocksize 64, double quantisation (bnb `Params4bit`'s defaults but NF4).
    fn default() -> Self {
        Quant4Config { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true }
    }
}

/// Checks a 4-bit blocksize against bnb's list (32, 64, …, 4096).
///
/// # Errors
/// [`QuantError::Blocksize`] otherwise.
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if (32..=4096).contains(&blocksize) && blocksize.is_power_of_two() {
        Ok(())
    } else {
        Err(QuantError::Blocksize(blocksize))
    }
}

/// The blocksize of the second (8-bit) level of double quantisation.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The per-block scales of a 4-bit tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// Double quantized: 8-bit codes of `absmax − offset` with their own f32 scales.
    Double {
        /// The 8-bit quantized `absmax − offset`.
        q: Blockwise8,
        /// The mean that was subtracted.
        offset: f32,
    },
}

impl Absmax {
    /// Number of blocks.
    pub fn len(&self) -> usize {
        match self {
            Absmax::Plain(v) => v.len(),
            Absmax::Double { q, .. } => q.len(),
        }
    }

    /// True when there are no blocks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The scales as f32 (`dyn[q8] · absmax₂ + offset` when double quantized).
    pub fn scales(&self) -> Vec<f32> {
        match self {
            Absmax::Plain(v) => v.clone(),
            Absmax::Double { q, offset } => (0..q.len()).map(|i| q.value(i) + offset).collect(),
        }
    }

    /// The scale of block `j`.
    #[inline]
    pub fn scale(&self, j: usize) -> f32 {
        match self {
            Absmax::Plain(v) => v[j],
            Absmax::Double { q, offset } => q.value(j) + offset,
        }
    }

    /// Bytes held: 4 per block, or 1 per block + 4 per nested block + 4 for the offset.
    pub fn storage_bytes(&self) -> usize {
        match self {
            Absmax::Plain(v) => 4 * v.len(),
            Absmax::Double { q, .. } => q.storage_bytes() + 4,
        }
    }

    /// Double quantizes plain f32 scales (bnb: `offset = absmax.mean()`, `quantize_blockwise(absmax - offset, 256)`).
    ///
    /// # Errors
    /// [`QuantError::Empty`] / [`QuantError::NonFinite`] for empty or non-finite scales.
    pub fn double_quantize(absmax: &[f32]) -> Result<Self> {
        if absmax.is_empty() {
            return Err(QuantError::Empty("double_quantize"));
        }
        let offset = (absmax.iter().map(|&v| f64::from(v)).sum::<f64>() / absmax.len() as f64) as f32;
        let centered: Vec<f32> = absmax.iter().map(|&v| v - offset).collect();
        let q = Blockwise8::quantize(&centered, NESTED_BLOCKSIZE, &dynamic_map())?;
        Ok(Absmax::Double { q, offset })
    }
}

/// Where the packed bytes were stored (bnb `quant_storage`: other dtypes only reinterpret the same bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantStorage {
    /// `uint8`, shape `[(n+1)/2, 1]` (the default).
    U8,
    /// Reinterpreted as a float dtype, shape `[bytes / size, 1]`.
    Float(FloatDtype),
}

/// A 4-bit quantized tensor in bitsandbytes' layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Quant4 {
    quant_type: QuantType,
    blocksize: usize,
    shape: Vec<usize>,
    dtype: FloatDtype,
    storage: QuantStorage,
    packed: Vec<u8>,
    absmax: Absmax,
}

impl Quant4 {
    /// Quantizes `x` (row-major, of shape `shape`) with `cfg`. The recorded dtype is float32.
    ///
    /// # Errors
    /// [`QuantError::Blocksize`], [`QuantError::Empty`], [`QuantError::NonFinite`], or [`QuantError::Size`] when
    /// `x.len()` is not the product of `shape`.
    pub fn quantize(x: &[f32], shape: &[usize], cfg: &Quant4Config) -> Result<Self> {
        check_blocksize(cfg.blocksize)?;
        size("quantize_4bit: elements of the shape", checked_numel("quantize_4bit", shape)?, x.len())?;
        if x.is_empty() {
            return Err(QuantError::Empty("quantize_4bit"));
        }
        let (packed, absmax) = quantize_blocks(x, cfg.quant_type, cfg.blocksize)?;
        let absmax = if cfg.double_quant { Absmax::double_quantize(&absmax)? } else { Absmax::Plain(absmax) };
        Ok(Quant4 {
            quant_type: cfg.quant_type,
            blocksize: cfg.blocksize,
            shape: shape.to_vec(),
            dtype: FloatDtype::F32,
            storage: QuantStorage::U8,
            packed,
            absmax,
        })
    }

    /// Assembles a state (e.g. read from a checkpoint), checking that every size agrees.
    ///
    /// # Errors
    /// [`QuantError::Blocksize`]; [`QuantError::Size`] when the packed bytes or the block count do not match the
    /// shape.
    pub fn from_parts(
        quant_type: QuantType,
        blocksize: usize,
        shape: Vec<usize>,
        dtype: FloatDtype,
        packed: Vec<u8>,
        absmax: Absmax,
    ) -> Result<Self> {
        check_blocksize(blocksize)?;
        let n = checked_numel("4-bit weight", &shape)?;
        size("packed 4-bit bytes", n.div_ceil(2), packed.len())?;
        size("4-bit block scales", n.div_ceil(blocksize), absmax.len())?;
        Ok(Quant4 { quant_type, blocksize, shape, dtype, storage: QuantStorage::U8, packed, absmax })
    }

    /// The same state with another recorded dtype (what bnb casts dequantised values to).
    pub fn with_dtype(mut self, dtype: FloatDtype) -> Self {
        self.dtype = dtype;
        self
    }

    /// The same state with another `quant_storage` (affects only how the bytes are written).
    pub fn with_storage(mut self, storage: QuantStorage) -> Self {
        self.storage = storage;
        self
    }

    /// NF4 or FP4.
    pub fn quant_type(&self) -> QuantType {
        self.quant_type
    }

    /// Values per scale.
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }

    /// The logical shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of quantized values.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The recorded dtype.
    pub fn dtype(&self) -> FloatDtype {
        self.dtype
    }

    /// The `quant_storage` the bytes are written as.
    pub fn storage(&self) -> QuantStorage {
        self.storage
    }

    /// The packed codes (`ceil(n/2)` bytes, first element in the high nibble).
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// The block scales.
    pub fn absmax(&self) -> &Absmax {
        &self.absmax
    }

    /// The 4-bit code of element `i`.
    pub fn code(&self, i: usize) -> u8 {
        let b = self.packed[i / 2];
        if i.is_multiple_of(2) {
            b >> 4
        } else {
            b & 0x0F
        }
    }

    /// The block scales as f32 (double quantisation resolved).
    pub fn scales(&self) -> Vec<f32> {
        self.absmax.scales()
    }

    /// All values, dequantised in f32 (no cast to the recorded dtype).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.dequantize_into(&mut out);
        out
    }

    /// [`Quant4::dequantize`] into a caller's buffer of `numel` values (in parallel).
    ///
    /// # Panics
    /// When `out.len() != numel` (a caller bug).
    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.numel(), "peft-rs bug: dequantize_into buffer size");
        let chunk = self.blocksize * (16384 / self.blocksize).max(1);
        out.par_chunks_mut(chunk).enumerate().for_each(|(i, o)| self.dequantize_range_into(i * chunk, o));
    }

    /// [`Quant4::dequantize`] followed by bnb's cast to the recorded dtype.
    pub fn dequantize_as_dtype(&self) -> Vec<f32> {
        let mut v = self.dequantize();
        if self.dtype != FloatDtype::F32 {
            v.iter_mut().for_each(|x| *x = self.dtype.round(*x));
        }
        v
    }

    /// Dequantises elements `start .. start + out.len()` (flat, row-major) into `out`, resolving only the scales
    /// of the blocks it touches. Panics (a caller bug) when the range exceeds the tensor.
    pub fn dequantize_range_into(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        assert!(end <= self.numel(), "peft-rs bug: dequantize range {start}..{end} beyond {}", self.numel());
        if out.is_empty() {
            return;
        }
        let bs = self.blocksize;
        let b0 = start / bs;
        let scales: Vec<f32> = (b0..(end - 1) / bs + 1).map(|j| self.absmax.scale(j)).collect();
        let table = self.quant_type.table();
        let lut = match self.quant_type {
            QuantType::Nf4 => &NF4_PAIRS,
            QuantType::Fp4 => &FP4_PAIRS,
        };
        let (mut e, mut o) = (start, 0);
        if e % 2 == 1 {
            out[0] = table[usize::from(self.packed[e / 2] & 0x0F)] * scales[e / bs - b0];
            e += 1;
            o = 1;
        }
        while e < end {
            let s = scales[e / bs - b0];
            let blk_end = ((e / bs + 1) * bs).min(end);
            let pairs = (blk_end - e) / 2;
            let bytes = &self.packed[e / 2..e / 2 + pairs];
            for (d, &byte) in out[o..o + 2 * pairs].chunks_exact_mut(2).zip(bytes) {
                let p = lut[usize::from(byte)];
                d[0] = p[0] * s;
                d[1] = p[1] * s;
            }
            e += 2 * pairs;
            o += 2 * pairs;
            if e < blk_end {
                out[o] = table[usize::from(self.packed[e / 2] >> 4)] * s;
                e += 1;
                o += 1;
            }
        }
    }

    /// Bytes held by the quantized weight: packed codes plus scales (and nested scales and offset). The code
    /// tables are shared constants and not counted.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + self.absmax.storage_bytes()
    }
}

/// `lut[byte] = [table[byte >> 4], table[byte & 15]]`.
const fn pair_lut(table: &[f32; 16]) -> [[f32; 2]; 256] {
    let mut lut = [[0f32; 2]; 256];
    let mut b = 0;
    while b < 256 {
        lut[b] = [table[b >> 4], table[b & 0x0F]];
        b += 1;
    }
    lut
}

static NF4_PAIRS: [[f32; 2]; 256] = pair_lut(&NF4);
static FP4_PAIRS: [[f32; 2]; 256] = pair_lut(&FP4);

/// Packs codes and computes the plain f32 absmax per block.
fn quantize_blocks(x: &[f32], qt: QuantType, bs: usize) -> Result<(Vec<u8>, Vec<f32>)> {
    match qt {
        QuantType::Nf4 => quantize_blocks_with(x, bs, quantize_nf4),
        QuantType::Fp4 => quantize_blocks_with(x, bs, quantize_fp4),
    }
}

/// [`quantize_blocks`] for one code function (monomorphised so the per-element loop vectorises).
fn quantize_blocks_with<F: Fn(f32) -> u8 + Copy + Sync>(x: &[f32], bs: usize, code: F) -> Result<(Vec<u8>, Vec<f32>)> {
    let n = x.len();
    let mut packed = vec![0u8; n.div_ceil(2)];
    let mut absmax = vec![0f32; n.div_ceil(bs)];
    let zero = code(0.0);
    let ok = packed
        .par_chunks_mut(bs / 2)
        .zip(absmax.par_iter_mut())
        .zip(x.par_chunks(bs))
        .map_init(
            || vec![0u8; bs],
            |codes, ((bytes, am), xs)| {
                let mut m = 0f32;
                let mut finite = true;
                for &v in xs {
                    finite &= v.is_finite();
                    m = m.max(v.abs());
                }
                *am = m;
                let inv = 1.0 / m;
                let c = &mut codes[..xs.len()];
                if m == 0.0 {
                    c.fill(zero);
                } else if inv.is_finite() {
                    c.iter_mut().zip(xs).for_each(|(ci, &v)| *ci = code(v * inv));
                } else {
                    c.iter_mut().zip(xs).for_each(|(ci, &v)| *ci = code(v / m));
                }
                let mut pairs = c.chunks_exact(2);
                for (b, p) in bytes.iter_mut().zip(&mut pairs) {
                    *b = p[0] << 4 | p[1];
                }
                if let [last] = pairs.remainder() {
                    bytes[xs.len() / 2] = last << 4 | zero;
                }
                finite
            },
        )
        .reduce(|| true, |a, b| a && b);
    if !ok {
        return Err(QuantError::NonFinite("quantize_4bit input".into()));
    }
    Ok((packed, absmax))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes::{dynamic_map, max_gap};
    use proptest::prelude::*;

    fn cfg(quant_type: QuantType, blocksize: usize, double_quant: bool) -> Quant4Config {
        Quant4Config { quant_type, blocksize, double_quant }
    }

    #[test]
    fn packing_puts_the_first_element_in_the_high_nibble() {
        let mut x = vec![0.0f32; 32];
        x[..4].copy_from_slice(&[1.0, -1.0, 0.0, 0.5]);
        let q = Quant4::quantize(&x, &[32], &cfg(QuantType::Nf4, 32, false)).unwrap();
        // 1.0 -> 15, -1.0 -> 0, 0.0 -> 7, 0.5 -> 12 (below the 0.50166 threshold).
        assert_eq!(q.packed()[0], 0xF0);
        assert_eq!(q.packed()[1], 0x7C);
        assert_eq!((q.code(0), q.code(1), q.code(2), q.code(3)), (15, 0, 7, 12));
        let f = Quant4::quantize(&x, &[32], &cfg(QuantType::Fp4, 32, false)).unwrap();
        // FP4: 1.0 -> 0b0011, -1.0 -> 0b1011, 0 -> 0, 0.5 -> 0b0101.
        assert_eq!(f.packed()[0], 0x3B);
        assert_eq!(f.packed()[1], 0x05);
    }

    #[test]
    fn odd_length_pads_the_last_low_nibble_with_the_zero_code_and_the_tail_block_has_its_own_scale() {
        let x: Vec<f32> = (0..67).map(|i| if i < 64 { 1.0 } else { -0.25 }).collect();
        let q = Quant4::quantize(&x, &[67], &cfg(QuantType::Nf4, 64, false)).unwrap();
        assert_eq!(q.packed().len(), 34);
        assert_eq!(q.packed()[33] & 0x0F, 7);
        assert_eq!(q.scales(), vec![1.0, 0.25]);
        let f = Quant4::quantize(&x, &[67], &cfg(QuantType::Fp4, 64, false)).unwrap();
        assert_eq!(f.packed()[33] & 0x0F, 0);
        assert_eq!(q.dequantize()[64..], [-0.25, -0.25, -0.25]);
    }

    #[test]
    fn zero_maps_to_code_7_and_a_zero_block_dequantizes_to_zeros() {
        let mut x = vec![0.0f32; 128];
        x[64] = 3.0;
        for dq in [false, true] {
            let q = Quant4::quantize(&x, &[2, 64], &cfg(QuantType::Nf4, 64, dq)).unwrap();
            assert!((0..64).all(|i| q.code(i) == 7));
            assert_eq!(q.code(65), 7);
            let d = q.dequantize();
            assert!(d[..64].iter().all(|&v| v == 0.0), "dq {dq}");
            assert!(d[65..].iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn blocks_run_across_row_boundaries() {
        // 3 x 40 = 120 values, blocksize 32: block 1 spans rows 0 and 1.
        let x: Vec<f32> = (0..120).map(|i| if i == 40 { 8.0 } else { 1.0 }).collect();
        let q = Quant4::quantize(&x, &[3, 40], &cfg(QuantType::Nf4, 32, false)).unwrap();
        assert_eq!(q.scales(), vec![1.0, 8.0, 1.0, 1.0]);
    }

    #[test]
    fn invalid_blocksizes_and_inputs_are_typed_errors() {
        for bs in [0, 16, 48, 100, 8192] {
            assert!(
                matches!(Quant4::quantize(&[1.0; 64], &[64], &cfg(QuantType::Nf4, bs, false)), Err(QuantError::Blocksize(b)) if b == bs)
            );
        }
        for bs in [32, 64, 128, 256, 512, 1024, 2048, 4096] {
            assert!(check_blocksize(bs).is_ok());
        }
        let c = Quant4Config::default();
        assert!(matches!(Quant4::quantize(&[1.0; 6], &[2, 4], &c), Err(QuantError::Size { .. })));
        assert!(matches!(Quant4::quantize(&[], &[0], &c), Err(QuantError::Empty(_))));
        assert!(matches!(Quant4::quantize(&[1.0, f32::NAN], &[2], &c), Err(QuantError::NonFinite(_))));
        let q = Quant4::quantize(&[1.0; 64], &[64], &c).unwrap();
        let bad =
            Quant4::from_parts(QuantType::Nf4, 64, vec![66], FloatDtype::F32, q.packed().to_vec(), q.absmax().clone());
        assert!(matches!(bad, Err(QuantError::Size { .. })));
        let bad =
            Quant4::from_parts(QuantType::Nf4, 32, vec![64], FloatDtype::F32, q.packed().to_vec(), q.absmax().clone());
        assert!(matches!(bad, Err(QuantError::Size { .. })));
    }

    #[test]
    fn double_quantized_scales_are_within_the_8bit_dynamic_error() {
        let x: Vec<f32> =
            (0..64 * 600).map(|i| ((i * 7919 % 10007) as f32 / 10007.0 - 0.5) * (1.0 + (i / 64 % 13) as f32)).collect();
        let plain = Quant4::quantize(&x, &[x.len()], &cfg(QuantType::Nf4, 64, false)).unwrap();
        let dq = Quant4::quantize(&x, &[x.len()], &cfg(QuantType::Nf4, 64, true)).unwrap();
        let Absmax::Double { q, offset } = dq.absmax() else { panic!("expected double quant") };
        let code = dynamic_map();
        let (a, s) = (plain.scales(), dq.scales());
        assert_eq!(q.absmax().len(), 600usize.div_ceil(256));
        let mean = a.iter().map(|&v| f64::from(v)).sum::<f64>() / a.len() as f64;
        assert!((f64::from(*offset) - mean).abs() < 1e-6 * mean);
        for j in 0..a.len() {
            let k = usize::from(q.codes()[j]);
            let gap =
                if k > 0 { code[k] - code[k - 1] } else { 0.0 }.max(if k < 255 { code[k + 1] - code[k] } else { 0.0 });
            let bound = 0.5 * gap * q.absmax()[j / 256] * 1.0001 + 1e-6;
            assert!((a[j] - s[j]).abs() <= bound, "block {j}: {} vs {}", a[j], s[j]);
        }
        // The codes of the 4-bit values are the same; only the scales differ.
        assert_eq!(plain.packed(), dq.packed());
    }

    #[test]
    fn storage_is_4_5_bits_per_parameter_plain_and_4_127_with_double_quant() {
        let x = vec![0.5f32; 64 * 256 * 4];
        let plain = Quant4::quantize(&x, &[x.len()], &cfg(QuantType::Nf4, 64, false)).unwrap();
        let dq = Quant4::quantize(&x, &[x.len()], &cfg(QuantType::Nf4, 64, true)).unwrap();
        let bits = |b: usize| 8.0 * b as f64 / x.len() as f64;
        assert_eq!(bits(plain.storage_bytes()), 4.5);
        // 4 + 8/64 + 32/(64*256) = 4.126953125, plus the 32-bit offset once per tensor.
        assert_eq!(bits(dq.storage_bytes() - 4), 4.126953125);
    }

    #[test]
    fn range_dequantisation_matches_the_full_tensor_on_unaligned_ranges() {
        let x: Vec<f32> = (0..1001).map(|i| ((i * 31 % 97) as f32 - 48.0) / 7.0).collect();
        for dq in [false, true] {
            let q = Quant4::quantize(&x, &[7, 143], &cfg(QuantType::Fp4, 32, dq)).unwrap();
            let full = q.dequantize();
            for (s, e) in [(0, 1001), (1, 2), (3, 70), (31, 33), (64, 65), (999, 1001), (500, 500)] {
                let mut out = vec![0f32; e - s];
                q.dequantize_range_into(s, &mut out);
                assert_eq!(out, full[s..e], "range {s}..{e}");
            }
        }
    }

    #[test]
    fn dtype_cast_rounds_like_torch() {
        let x: Vec<f32> = (0..64).map(|i| i as f32 * 0.123_456_7).collect();
        let q = Quant4::quantize(&x, &[64], &Quant4Config::default()).unwrap().with_dtype(FloatDtype::Bf16);
        let d = q.dequantize();
        for (a, b) in d.iter().zip(q.dequantize_as_dtype()) {
            assert_eq!(b, half::bf16::from_f32(*a).to_f32());
        }
    }

    fn shapes_and_values() -> impl Strategy<Value = (Vec<f32>, usize, QuantType, bool)> {
        (1usize..700, prop::sample::select(vec![32usize, 64, 128, 256]), any::<bool>(), any::<bool>()).prop_flat_map(
            |(n, bs, nf4, dq)| {
                let qt = if nf4 { QuantType::Nf4 } else { QuantType::Fp4 };
                (prop::collection::vec(-50.0f32..50.0, n), Just(bs), Just(qt), Just(dq))
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn error_is_at_most_half_the_largest_code_gap_times_the_block_absmax((x, bs, qt, dq) in shapes_and_values()) {
            let q = Quant4::quantize(&x, &[x.len()], &cfg(qt, bs, dq)).unwrap();
            let half_gap = 0.5 * max_gap(qt.table());
            let d = q.dequantize();
            let s = q.scales();
            for (i, (&a, &b)) in x.iter().zip(&d).enumerate() {
                let blk = &x[i / bs * bs..((i / bs + 1) * bs).min(x.len())];
                let absmax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
                // With double quantisation the stored scale differs from the absmax; the element error grows by
                // at most |scale - absmax| (codes are bounded by 1).
                let bound = half_gap * absmax * (1.0 + 1e-5) + (s[i / bs] - absmax).abs() + 1e-6;
                prop_assert!((a - b).abs() <= bound, "element {}: {} -> {} (bound {})", i, a, b, bound);
            }
        }
    }
}
