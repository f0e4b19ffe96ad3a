//! bitsandbytes' blockwise 8-bit quantisation with a 256-entry code (`quantize_blockwise` / `dequantize_blockwise`),
//! used here for double quantisation of the 4-bit block scales.
//!
//! The rule is that of bitsandbytes 0.50.2's CPU backend (`quantize_cpu_impl` in `csrc/cpu_ops.cpp`, reached from
//! `backends/cpu/ops.py` for float32 input): per block of `blocksize` values (the last block may be partial, it is
//! handled like the others), `absmax = max|x|`; a block whose absmax is 0 stores code index **0** everywhere (bnb
//! `out[i] = 0`, which dequantises to `code[0] · 0 = -0.0`); otherwise `inv = 1 / absmax` once per block and the
//! code index is [`DynamicLut::code`]`(x · inv)` (a 65536-entry lookup table, not a nearest-entry search; see
//! [`crate::codes`]). Dequantisation (`dequantizeBlockwise8bitCpu`): `code[q] · absmax[i / blocksize]` in f32.

use rayon::prelude::*;

use crate::codes::DynamicLut;
use crate::error::{size, QuantError, Result};

/// Blockwise 8-bit codes with one f32 absmax per block and the code they index.
#[derive(Clone, Debug, PartialEq)]
pub struct Blockwise8 {
    codes: Vec<u8>,
    absmax: Vec<f32>,
    blocksize: usize,
    code: Box<[f32; 256]>,
}

impl Blockwise8 {
    /// Quantizes `x` in blocks of `blocksize` against the sorted 256-entry `code`, exactly as bnb's CPU backend
    /// (module docs).
    ///
    /// # Errors
    /// [`QuantError::Empty`] for empty input, [`QuantError::NonFinite`] for NaN/inf values,
    /// [`QuantError::Blocksize`] for a zero blocksize.
    pub fn quantize(x: &[f32], blocksize: usize, code: &[f32; 256]) -> Result<Self> {
        if blocksize == 0 {
            return Err(QuantError::Blocksize(0));
        }
        if x.is_empty() {
            return Err(QuantError::Empty("quantize_blockwise"));
        }
        let lut = DynamicLut::new(code);
        let nblocks = x.len().div_ceil(blocksize);
        let mut codes = vec![0u8; x.len()];
        let mut absmax = vec![0f32; nblocks];
        let ok = codes
            .par_chunks_mut(blocksize)
            .zip(absmax.par_iter_mut())
            .zip(x.par_chunks(blocksize))
            .map(|((q, am), xs)| {
                let mut m = 0f32;
                let mut finite = true;
                for &v in xs {
                    finite &= v.is_finite();
                    m = m.max(v.abs());
                }
                *am = m;
                if m == 0.0 {
                    q.fill(0);
                } else {
                    // A subnormal absmax can make inv infinite; bnb then maps v * inv (±inf, or NaN for 0) through
                    // the same clamp and index, and so do we.
                    let inv = 1.0 / m;
                    for (qi, &v) in q.iter_mut().zip(xs) {
                        *qi = lut.code(v * inv);
                    }
                }
                finite
            })
            .reduce(|| true, |a, b| a && b);
        if !ok {
            return Err(QuantError::NonFinite("quantize_blockwise input".into()));
        }
        Ok(Blockwise8 { codes, absmax, blocksize, code: Box::new(*code) })
    }

    /// Assembles a state read from a checkpoint.
    ///
    /// # Errors
    /// [`QuantError::Size`] when `absmax` does not have one entry per block of `codes`;
    /// [`QuantError::Blocksize`] for a zero blocksize.
    pub fn from_parts(codes: Vec<u8>, absmax: Vec<f32>, blocksize: usize, code: [f32; 256]) -> Result<Self> {
        if blocksize == 0 {
            return Err(QuantError::Blocksize(0));
        }
        size("nested absmax blocks", codes.len().div_ceil(blocksize), absmax.len())?;
        Ok(Blockwise8 { codes, absmax, blocksize, code: Box::new(code) })
    }

    /// The 8-bit codes.
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// One absmax per block.
    pub fn absmax(&self) -> &[f32] {
        &self.absmax
    }

    /// The blocksize.
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }

    /// The code table the indices refer to.
    pub fn code(&self) -> &[f32; 256] {
        &self.code
    }

    /// Number of quantized values.
    pub fn len(&self) -> usize {
        self.codes.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    /// The dequantized value `i`: `code[q_i] · absmax[i / blocksize]`.
    pub fn value(&self, i: usize) -> f32 {
        self.code[usize::from(self.codes[i])] * self.absmax[i / self.blocksize]
    }

    /// All dequantized values.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.codes.len()).map(|i| self.value(i)).collect()
    }

    /// Bytes held: one per code plus four per block absmax.
    pub fn storage_bytes(&self) -> usize {
        self.codes.len() + 4 * self.absmax.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codes::dynamic_map;

    #[test]
    fn dequantize_of_quantize_is_within_half_the_local_code_gap_plus_one_lut_step() {
        let code = dynamic_map();
        let x: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let q = Blockwise8::quantize(&x, 256, &code).unwrap();
        assert_eq!(q.absmax().len(), 4);
        for (i, &v) in x.iter().enumerate() {
            let am = q.absmax()[i / 256];
            let k = usize::from(q.codes()[i]);
            let lo = if k > 0 { code[k] - code[k - 1] } else { 0.0 };
            let hi = if k < 255 { code[k + 1] - code[k] } else { 0.0 };
            // The lookup table resolves the normalised value only to its grid step 2/65535.
            let bound = (0.5 * lo.max(hi) + 2.0 / 65535.0) * am * (1.0 + 1e-5) + 1e-7;
            assert!((q.value(i) - v).abs() <= bound, "element {i}: {v} -> {}", q.value(i));
        }
    }

    #[test]
    fn block_maximum_maps_to_the_extreme_codes_and_zero_to_the_grid_points_code() {
        let code = dynamic_map();
        let q = Blockwise8::quantize(&[2.0, -2.0, 0.0, 1.0], 256, &code).unwrap();
        assert_eq!(q.codes()[0], 255);
        assert_eq!(q.codes()[1], 0, "-1 is below every code; the nearest is code 0 = -0.99296875");
        // 0 lands on grid index 32768, whose value 2·32768/65535 − 1 = 1.5259e-5 is nearest a small positive
        // entry, not code 127 (= 0.0): bnb's CPU quantizer does not reproduce an exact 0 at 8 bits.
        let z = usize::from(q.codes()[2]);
        assert!(z > 127, "code {z}");
        let grid = 2.0 * 32768.0f32 / 65535.0 - 1.0;
        let nearest = (0..256).min_by(|&a, &b| (code[a] - grid).abs().total_cmp(&(code[b] - grid).abs())).unwrap();
        assert_eq!(z, nearest);
        assert_eq!(q.value(0), 2.0);
    }

    #[test]
    fn all_zero_block_and_bad_inputs() {
        let code = dynamic_map();
        let q = Blockwise8::quantize(&[0.0; 10], 4, &code).unwrap();
        assert!(q.codes().iter().all(|&c| c == 0), "bnb stores code index 0 for an all-zero block");
        assert!(q.dequantize().iter().all(|&v| v == 0.0));
        assert!(matches!(Blockwise8::quantize(&[], 4, &code), Err(QuantError::Empty(_))));
        assert!(matches!(Blockwise8::quantize(&[f32::NAN], 4, &code), Err(QuantError::NonFinite(_))));
        assert!(matches!(Blockwise8::quantize(&[1.0], 0, &code), Err(QuantError::Blocksize(0))));
        assert!(matches!(Blockwise8::from_parts(vec![0; 300], vec![1.0], 256, code), Err(QuantError::Size { .. })));
    }
}
