//! LQ-LoRA's quantized storage: a matrix quantized with [`NfQuant`] ("blockwise-NF(b, b0, b1, B0, B1)") held as
//! it is stored, not dequantised.
//!
//! [`NfPacked`] keeps the `b`-bit value codes and the `b0`-bit block-scale codes bit-packed (little-endian bit
//! order: value `i` occupies bits `i·b .. (i+1)·b` of the byte stream), one group max per group of `B1` scales
//! (rounded to `b1`'s dtype, held as f32 but counted at `b1`'s width) and the f32 minimum scale. Its
//! [`NfPacked::storage_bytes`] is the whole-byte size of that layout; the nominal `b + b0/B0 + bits(b1)/(B0·B1)`
//! bits per parameter ([`NfQuant::bits_per_param`]) is reached up to the final partial byte of each stream and the
//! 4-byte minimum. Dequantisation reproduces [`NfQuant::quant_dequant`] bit for bit.

use crate::lq_lora::{nf_table, NfQuant};
use crate::{QuantError, Result};

/// Packs `bits`-wide codes (each `< 2^bits`) little-endian into bytes.
fn pack(codes: impl Iterator<Item = u8>, bits: u8, n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity((n * usize::from(bits)).div_ceil(8));
    let (mut acc, mut have) = (0u32, 0u8);
    for c in codes {
        acc |= u32::from(c) << have;
        have += bits;
        while have >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            have -= 8;
        }
    }
    if have > 0 {
        out.push(acc as u8);
    }
    out
}

/// Code `i` of a stream packed by [`pack`].
fn unpack(bytes: &[u8], bits: u8, i: usize) -> u8 {
    let bit = i * usize::from(bits);
    let (byte, sh) = (bit / 8, bit % 8);
    let lo = u16::from(bytes[byte]);
    let hi = u16::from(bytes.get(byte + 1).copied().unwrap_or(0));
    (((lo | hi << 8) >> sh) & ((1u16 << bits) - 1)) as u8
}

/// A matrix (or any tensor, flattened row-major) quantized with [`NfQuant`], as stored (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct NfPacked {
    cfg: NfQuant,
    shape: Vec<usize>,
    numel: usize,
    codes: Vec<u8>,
    scale_codes: Vec<u8>,
    group_max: Vec<f32>,
    min: f32,
    table: Vec<f32>,
}

impl NfPacked {
    /// Quantizes `x` (row-major, `shape`'s element count) with `cfg`.
    ///
    /// # Errors
    /// [`QuantError::BadConfig`] for an unsupported config; [`QuantError::Empty`]; [`QuantError::NonFinite`];
    /// [`QuantError::Size`] when `x` does not have `shape`'s element count.
    pub fn quantize(x: &[f32], shape: &[usize], cfg: &NfQuant) -> Result<Self> {
        cfg.validate()?;
        let numel = crate::error::checked_numel("NF-b quantizer input", shape)?;
        crate::error::size("NF-b quantizer input", numel, x.len())?;
        if x.is_empty() {
            return Err(QuantError::Empty("NF-b quantizer"));
        }
        if x.iter().any(|v| !v.is_finite()) {
            return Err(QuantError::NonFinite("LQ-LoRA quantizer input".into()));
        }
        let table = nf_table(cfg.bits);
        let mids: Vec<f32> = table.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let zero = table.iter().position(|&v| v == 0.0).expect("peft-rs bug: NF tables hold 0") as u8;
        let absmax: Vec<f32> = x.chunks(cfg.block).map(|b| b.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
        let min = absmax.iter().copied().fold(f32::INFINITY, f32::min);
        let levels = ((1u32 << cfg.scale_bits) - 1) as f32;
        let mut scale_q = Vec::with_capacity(absmax.len());
        let mut group_max = Vec::with_capacity(absmax.len().div_ceil(cfg.group));
        for g in absmax.chunks(cfg.group) {
            let gmax = cfg.group_dtype.round(g.iter().fold(0f32, |m, &v| m.max(v - min)));
            group_max.push(gmax);
            for &a in g {
                let q = if gmax > 0.0 { ((a - min) / gmax * levels).round().clamp(0.0, levels) } else { 0.0 };
                scale_q.push(q as u8);
            }
        }
        let scales = Self::scales_of(&scale_q, &group_max, min, cfg);
        let codes = x.chunks(cfg.block).zip(&scales).flat_map(|(blk, &sc)| {
            let mids = &mids;
            blk.iter().map(move |&v| {
                if sc <= 0.0 {
                    zero
                } else {
                    mids.partition_point(|&m| m < (v / sc).clamp(-1.0, 1.0)) as u8
                }
            })
        });
        let codes = pack(codes, cfg.bits, numel);
        let scale_codes = pack(scale_q.iter().copied(), cfg.scale_bits, scale_q.len());
        Ok(NfPacked { cfg: *cfg, shape: shape.to_vec(), numel, codes, scale_codes, group_max, min, table })
    }

    /// Rebuilds a stored tensor from its parts (as [`crate::Checkpoint::insert_nf`] writes them): packed value
    /// codes, packed block-scale codes, one group max per group of `B1` scales and the minimum scale.
    ///
    /// # Errors
    /// [`QuantError::BadConfig`] for an unsupported config; [`QuantError::Overflow`] / [`QuantError::Empty`] for
    /// the shape; [`QuantError::Size`] when a part's length does not follow from the shape and config;
    /// [`QuantError::NonFinite`] for a non-finite group max or minimum, or a group max that is negative or not
    /// representable in `b1`'s dtype.
    pub fn from_parts(
        cfg: NfQuant,
        shape: &[usize],
        codes: Vec<u8>,
        scale_codes: Vec<u8>,
        group_max: Vec<f32>,
        min: f32,
    ) -> Result<Self> {
        cfg.validate()?;
        let numel = crate::error::checked_numel("NF-b stored tensor", shape)?;
        if numel == 0 {
            return Err(QuantError::Empty("NF-b stored tensor"));
        }
        let blocks = numel.div_ceil(cfg.block);
        crate::error::size(
            "NF-b packed value codes (bytes)",
            numel.saturating_mul(usize::from(cfg.bits)).div_ceil(8),
            codes.len(),
        )?;
        crate::error::size(
            "NF-b packed scale codes (bytes)",
            blocks.saturating_mul(usize::from(cfg.scale_bits)).div_ceil(8),
            scale_codes.len(),
        )?;
        crate::error::size("NF-b group maxes", blocks.div_ceil(cfg.group), group_max.len())?;
        if !min.is_finite() || group_max.iter().any(|g| !g.is_finite() || *g < 0.0 || cfg.group_dtype.round(*g) != *g) {
            return Err(QuantError::NonFinite(
                "NF-b stored scales (a group max that is negative, non-finite or not in its dtype, or a non-finite \
                 minimum)"
                    .into(),
            ));
        }
        let table = nf_table(cfg.bits);
        Ok(NfPacked { cfg, shape: shape.to_vec(), numel, codes, scale_codes, group_max, min, table })
    }

    /// The packed value codes (`b` bits each, little-endian bit order).
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// The packed block-scale codes (`b0` bits each).
    pub fn scale_codes(&self) -> &[u8] {
        &self.scale_codes
    }

    /// One max per group of `B1` block scales (values of `b1`'s dtype, held as f32).
    pub fn group_max(&self) -> &[f32] {
        &self.group_max
    }

    /// The minimum block scale (f32).
    pub fn min(&self) -> f32 {
        self.min
    }

    /// The block scales `q/(2^b0 − 1)·gmax + min`.
    fn scales_of(q: &[u8], group_max: &[f32], min: f32, cfg: &NfQuant) -> Vec<f32> {
        let levels = ((1u32 << cfg.scale_bits) - 1) as f32;
        q.iter().enumerate().map(|(i, &c)| f32::from(c) / levels * group_max[i / cfg.group] + min).collect()
    }

    /// The scale of block `b`.
    fn scale(&self, b: usize) -> f32 {
        let levels = ((1u32 << self.cfg.scale_bits) - 1) as f32;
        f32::from(unpack(&self.scale_codes, self.cfg.scale_bits, b)) / levels * self.group_max[b / self.cfg.group]
            + self.min
    }

    /// The quantizer configuration.
    pub fn config(&self) -> NfQuant {
        self.cfg
    }

    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Element count.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Dequantises elements `start .. start + out.len()` (flattened row-major) into `out` (a caller bug panics).
    pub fn dequantize_range_into(&self, start: usize, out: &mut [f32]) {
        assert!(start + out.len() <= self.numel, "peft-rs bug: NF-b range out of bounds");
        let (mut block, mut sc) = (usize::MAX, 0f32);
        for (k, v) in out.iter_mut().enumerate() {
            let i = start + k;
            if i / self.cfg.block != block {
                block = i / self.cfg.block;
                sc = self.scale(block);
            }
            *v = if sc <= 0.0 { 0.0 } else { self.table[usize::from(unpack(&self.codes, self.cfg.bits, i))] * sc };
        }
    }

    /// The whole tensor dequantised (flattened row-major).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel];
        self.dequantize_range_into(0, &mut out);
        out
    }

    /// Bytes held: packed value codes, packed scale codes, the group maxes at `b1`'s width and the f32 minimum.
    pub fn storage_bytes(&self) -> usize {
        let w = if self.cfg.group_dtype == crate::FloatDtype::F32 { 4 } else { 2 };
        self.codes.len() + self.scale_codes.len() + w * self.group_max.len() + 4
    }

    /// Bytes of the packed value codes.
    pub fn code_bytes(&self) -> usize {
        self.codes.len()
    }

    /// Bytes of the packed block-scale codes.
    pub fn scale_code_bytes(&self) -> usize {
        self.scale_codes.len()
    }

    /// Measured storage bits per parameter ([`NfPacked::storage_bytes`] · 8 / elements).
    pub fn bits_per_param(&self) -> f64 {
        8.0 * self.storage_bytes() as f64 / self.numel as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FloatDtype;

    fn data(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 % 1013) as f32 / 506.0 - 1.0) * (1.0 + (i / 64) as f32 * 0.1)).collect()
    }

    #[test]
    fn packing_round_trips_every_width() {
        for bits in 1..=8u8 {
            let codes: Vec<u8> = (0..103).map(|i| ((i * 37 + 5) % (1usize << bits)) as u8).collect();
            let p = pack(codes.iter().copied(), bits, codes.len());
            assert_eq!(p.len(), (codes.len() * usize::from(bits)).div_ceil(8));
            assert!(codes.iter().enumerate().all(|(i, &c)| unpack(&p, bits, i) == c), "bits {bits}");
        }
    }

    #[test]
    fn dequantization_equals_quant_dequant_bit_for_bit_and_ranges_agree() {
        let x = data(64 * 300 + 17);
        for cfg in [
            NfQuant::new(2),
            NfQuant::new(3),
            NfQuant::new(4),
            NfQuant { bits: 3, scale_bits: 4, block: 32, group: 16, group_dtype: FloatDtype::Bf16 },
            NfQuant::new(8),
        ] {
            let q = NfPacked::quantize(&x, &[x.len()], &cfg).unwrap();
            let reference = cfg.quant_dequant(&x).unwrap();
            let d = q.dequantize();
            assert!(d.iter().zip(&reference).all(|(a, b)| a.to_bits() == b.to_bits()), "{cfg:?}");
            let mut part = vec![0f32; 1000];
            q.dequantize_range_into(123, &mut part);
            assert_eq!(part, d[123..1123]);
        }
    }

    #[test]
    fn storage_bytes_are_the_nominal_bits_up_to_rounding() {
        let n = 64 * 256 * 4;
        let x = data(n);
        for (bits, nominal) in [(2u8, 2.127), (3, 3.127), (4, 4.127)] {
            let cfg = NfQuant::new(bits);
            let q = NfPacked::quantize(&x, &[256, 256], &cfg).unwrap();
            assert_eq!(q.code_bytes(), n * usize::from(bits) / 8);
            assert_eq!(q.scale_code_bytes(), n / 64);
            assert_eq!(q.storage_bytes(), n * usize::from(bits) / 8 + n / 64 + 4 * 4 + 4);
            assert_eq!(8 * q.storage_bytes(), cfg.storage_bits(n));
            assert!((q.bits_per_param() - nominal).abs() < 2e-3, "{}", q.bits_per_param());
        }
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let cfg = NfQuant::new(4);
        assert!(matches!(NfPacked::quantize(&[], &[0], &cfg), Err(QuantError::Empty(_))));
        assert!(matches!(NfPacked::quantize(&[1.0, f32::NAN], &[2], &cfg), Err(QuantError::NonFinite(_))));
        assert!(matches!(NfPacked::quantize(&[1.0; 3], &[2, 2], &cfg), Err(QuantError::Size { .. })));
        let bad = NfQuant { bits: 9, ..cfg };
        assert!(matches!(NfPacked::quantize(&[1.0; 4], &[4], &bad), Err(QuantError::BadConfig(_))));
    }
}
