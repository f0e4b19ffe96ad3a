//! The code tables of bitsandbytes' 4-bit and 8-bit formats and its exact nearest-code rules.
//!
//! * [`NF4`]: `get_4bit_type("nf4")`, the hard-coded f32 table (`create_normal_map(0.9677083, use_extra_value=True)`),
//!   sorted, exact 0 at index 7.
//! * [`FP4`]: `get_4bit_type("fp4")`, indexed by bit pattern (sign = bit 3, 2 exponent bits, 1 mantissa bit, bias
//!   2), values `[0, 0.0625, 8, 12, 4, 6, 2, 3] / 12` and negatives. Pattern `0b1000` is +0.0 in bnb's table (the
//!   Python literal `-0` is the integer 0).
//! * [`dynamic_map`]: `create_dynamic_map(signed=True)`, the 256-entry signed 8-bit dynamic map used by double
//!   quantisation; stored bit-exactly as bnb builds it (its f32 `linspace` rounding included).
//!
//! Nearest-code rules are those of bitsandbytes 0.50.2's **CPU backend** (checked byte for byte by
//! `tests/bnb_identity.rs`):
//!
//! * 4-bit (`backends/default/ops.py`, `quantize_4bit`, which the CPU backend uses): `torch.bucketize(scaled,
//!   bounds)` with `bounds` the f32 midpoints of the *sorted* table (`_get_4bit_quantize_bounds`), i.e. the bucket
//!   is the number of bounds strictly below `x` (a value exactly on a bound takes the lower bucket), mapped back to
//!   a code through the table's sort order. For NF4 the order is the identity and the bounds are
//!   [`NF4_THRESHOLDS`] (the same thresholds and `>` tests as the CUDA tree `dQuantizeNF4`). For FP4 the bounds
//!   are [`FP4_BOUNDS`] and the order [`FP4_ORDER`]; this differs from the CUDA tree `dQuantizeFP4` (sign bit from
//!   `x < 0`, rounded literal thresholds on `|x|`) in three ways: the two zero codes swap (`(-0.0026, 0]` → code 0,
//!   `(0, 0.0026]` → code 8, `-0` pattern), a negative value exactly on a bound rounds away from zero, and the
//!   bounds are exact midpoints instead of CUDA's 7-digit literals.
//! * 8-bit (`csrc/cpu_ops.cpp`, `quantize_cpu_impl` behind `quantize_blockwise` on CPU): not a search but a
//!   65536-entry lookup table ([`DynamicLut`]): `x` is clamped to `[-1, 1]`, mapped to `i = trunc(fma((x + 1) ·
//!   0.5, 65535, 0.5))`, and the code is the nearest table entry of the grid point `-1 + 2i/65535`. Values closer
//!   together than the grid step `2/65535 ≈ 3.05e-5` share a code, so near 0 (where the dynamic map's entries are
//!   ~1e-7 apart) it is much coarser than a true nearest-entry search (CUDA's `dQuantize`).

/// The NF4 table (index = 4-bit code), bitsandbytes' hard-coded f32 values.
pub const NF4: [f32; 16] = [
    -1.0,
    -0.6961928,
    -0.52507305,
    -0.3949175,
    -0.28444138,
    -0.18477343,
    -0.091050036,
    0.0,
    0.0795803,
    0.1609302,
    0.2461123,
    0.33791524,
    0.44070983,
    0.562617,
    0.72295684,
    1.0,
];

/// The FP4 table indexed by bit pattern, computed as bnb does (`value / 12` in f32).
pub const FP4: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0,
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -1.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// The NF4 bucket boundaries, ascending: the f32 midpoints of consecutive [`NF4`] values, which are both bnb's CPU
/// `bucketize` bounds and the thresholds of the CUDA tree `dQuantizeNF4`.
pub const NF4_THRESHOLDS: [f32; 15] = [
    -0.8480964,
    -0.6106329,
    -0.45999527,
    -0.33967942,
    -0.2346074,
    -0.13791174,
    -0.045525018,
    0.03979015,
    0.12025525,
    0.20352125,
    0.29201376,
    0.38931254,
    0.50166345,
    0.6427869,
    0.86147845,
];

/// The FP4 values in ascending order (`FP4[FP4_ORDER[k]]`), as `torch.argsort` orders bnb's table: the two
/// zeros keep their index order (pattern 0 before pattern 8).
const FP4_SORTED: [f32; 16] = {
    let mut v = [0f32; 16];
    let mut k = 0;
    while k < 16 {
        v[k] = FP4[FP4_ORDER[k] as usize];
        k += 1;
    }
    v
};

/// The FP4 code of each bucket: `torch.argsort(get_4bit_type("fp4"))` as bnb 0.50.2's CPU backend computes it
/// (`_get_4bit_quantize_bounds`, checked against the fixture `tables.safetensors`).
pub const FP4_ORDER: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];

/// The 15 bucket boundaries of bnb's CPU FP4 quantizer, ascending: `(sorted[k] + sorted[k + 1]) / 2` in f32. The
/// middle one is 0 (between the two zero codes).
pub const FP4_BOUNDS: [f32; 15] = {
    let mut b = [0f32; 15];
    let mut k = 0;
    while k < 15 {
        b[k] = (FP4_SORTED[k] + FP4_SORTED[k + 1]) / 2.0;
        k += 1;
    }
    b
};

/// The nearest NF4 code of a normalised value, as bnb's CPU backend (`torch.bucketize` on [`NF4_THRESHOLDS`]) and
/// equally the CUDA tree `dQuantizeNF4`: the number of thresholds strictly below `x` (a value on a threshold takes
/// the lower code; NaN gives code 0).
#[inline(always)]
pub fn quantize_nf4(x: f32) -> u8 {
    // A u32 count keeps the compare lanes as wide as the f32 lanes, which lets the loop vectorise across elements.
    let mut c = 0u32;
    for t in NF4_THRESHOLDS {
        c += u32::from(t < x);
    }
    c as u8
}

/// The FP4 code (bit pattern) of a normalised value, as bnb's CPU backend: `FP4_ORDER[#{b in FP4_BOUNDS : b < x}]`.
/// Tiny positives `(0, 0.0026]` get pattern `0b1000` and `(-0.0026, 0]` (0.0 and -0.0 included) pattern 0, the
/// reverse of CUDA's sign-bit rule; both decode to 0.0.
#[inline(always)]
pub fn quantize_fp4(x: f32) -> u8 {
    let mut c = 0u32;
    for t in FP4_BOUNDS {
        c += u32::from(t < x);
    }
    FP4_ORDER[c as usize]
}

/// The signed dynamic map as f32 bit patterns, dumped from bitsandbytes 0.50.2 `create_dynamic_map(signed=True)`.
const DYNAMIC_SIGNED_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000, 0xbf616666,
    0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333, 0xbf44999a, 0xbf410000,
    0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666, 0xbf27cccd, 0xbf243334, 0xbf20999a,
    0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a, 0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333,
    0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a, 0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a,
    0xbeb86666, 0xbeb13333, 0xbeaa0000, 0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999,
    0xbe6f3333, 0xbe60cccd, 0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000,
    0xbddb3334, 0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d, 0xbd5b851f,
    0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148, 0xbcfeb852, 0xbce7ae15,
    0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148, 0xbc1f3b64, 0xbc160418, 0xbc0ccccd,
    0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4, 0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a,
    0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d, 0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01,
    0xb9c7e283, 0xb98ce705, 0xb923d70b, 0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94,
    0xb513a3b7, 0x00000000, 0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b,
    0x3923d70b, 0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4, 0x3bcfdf3b,
    0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148, 0x3c68f5c3, 0x3c8b851f,
    0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148, 0x3d166667, 0x3d21eb85, 0x3d2d70a3,
    0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d, 0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d,
    0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a, 0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667,
    0x3dc428f7, 0x3dc9eb85, 0x3ddb3334, 0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000,
    0x3e526666, 0x3e60cccd, 0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc,
    0x3eaa0000, 0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a, 0x3f123334,
    0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666, 0x3f2f0000, 0x3f32999a,
    0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333, 0x3f4bcccd, 0x3f4f6666, 0x3f530000,
    0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000, 0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666,
    0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

/// The signed 8-bit dynamic map (sorted, 256 entries: min -0.99296875, 0 at index 127, max 1.0).
pub fn dynamic_map() -> [f32; 256] {
    DYNAMIC_SIGNED_BITS.map(f32::from_bits)
}

/// The nearest 8-bit code of a normalised value in a sorted 256-entry `code`, exactly as CUDA `dQuantize<0>`: a
/// 7-step binary search from pivot 127, then a midpoint test against the neighbour on the side of `x` (ties go to
/// the pivot).
///
/// This is the CUDA rule, kept for comparison; bitsandbytes' CPU backend (and [`crate::Blockwise8`]) uses the
/// coarser lookup table [`DynamicLut`] instead.
pub fn quantize_dynamic(code: &[f32; 256], x: f32) -> u8 {
    let mut pivot: usize = 127;
    let mut upper_pivot: usize = 255;
    let mut lower_pivot: usize = 0;
    let mut lower = -1.0f32;
    let mut upper = 1.0f32;
    let mut val = code[pivot];
    let mut i = 64;
    while i > 0 {
        if x > val {
            lower_pivot = pivot;
            lower = val;
            pivot += i;
        } else {
            upper_pivot = pivot;
            upper = val;
            pivot -= i;
        }
        val = code[pivot];
        i >>= 1;
    }
    if upper_pivot == 255 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    // The pivots are in 0..=255 by construction (127 ± at most 127), so the casts cannot truncate.
    if x > val {
        let midpoint = (upper + val) * 0.5;
        if x > midpoint {
            upper_pivot as u8
        } else {
            pivot as u8
        }
    } else {
        let midpoint = (lower + val) * 0.5;
        if x < midpoint {
            lower_pivot as u8
        } else {
            pivot as u8
        }
    }
}

/// Entries of the 8-bit quantizer's lookup table (`kLUTSize` in bnb's `csrc/cpu_ops.cpp`).
pub const LUT_SIZE: usize = 65536;

/// bitsandbytes' CPU 8-bit quantizer (`quantize_cpu_impl` / `build_quantize_lut` / `norm_to_lut_index` in
/// `csrc/cpu_ops.cpp`, 0.50.2): a 65536-entry table from grid index to code index, built once per code table.
///
/// Built as bnb does: `mid[k] = 0.5 · (code[k] + code[k + 1])` (f32), and for `i` in `0..65536` the grid value
/// `v_i = (2 · i) / 65535 − 1` (f32 division) gets the smallest code index `k` with `k == 255 || !(v_i > mid[k])`,
/// i.e. the number of midpoints strictly below `v_i`. Looking up a normalised `x`: clamp to `[-1, 1]`, then `i =
/// trunc(fma((x + 1) · 0.5, 65535, 0.5))` (the library is compiled with FMA contraction; one rounding), truncated to
/// 16 bits. NaN maps to index 0 (`cvttss2si` gives `0x80000000`; Rust's saturating cast gives 0; both keep the low
/// 16 bits 0).
#[derive(Clone)]
pub struct DynamicLut {
    lut: Box<[u8]>,
}

impl std::fmt::Debug for DynamicLut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamicLut").field("entries", &self.lut.len()).finish()
    }
}

impl DynamicLut {
    /// Builds the table for a sorted 256-entry code (bnb assumes it sorted and so do we; an unsorted code gives
    /// bnb's result for it, not the nearest entry).
    pub fn new(code: &[f32; 256]) -> Self {
        let mut mid = [0f32; 255];
        for (k, m) in mid.iter_mut().enumerate() {
            *m = 0.5 * (code[k] + code[k + 1]);
        }
        let mut lut = vec![0u8; LUT_SIZE].into_boxed_slice();
        let mut k = 0usize;
        for (i, slot) in lut.iter_mut().enumerate() {
            // i < 65536 is exact in f32.
            let v = (2.0 * i as f32) / 65535.0 - 1.0;
            while k < 255 && v > mid[k] {
                k += 1;
            }
            // k <= 255 by the loop bound.
            *slot = k as u8;
        }
        DynamicLut { lut }
    }

    /// The grid index of a normalised value.
    #[inline(always)]
    pub fn index(x: f32) -> usize {
        let h = (x.clamp(-1.0, 1.0) + 1.0) * 0.5;
        // In range the value is in [0.5, 65535.5], so the cast truncates like cvttss2si; NaN gives 0 either way.
        usize::from(h.mul_add(65535.0, 0.5) as i32 as u16)
    }

    /// The code index of a normalised value.
    #[inline(always)]
    pub fn code(&self, x: f32) -> u8 {
        self.lut[Self::index(x)]
    }
}

/// The largest gap between consecutive sorted values of a table (the worst-case rounding step is half of it).
pub fn max_gap(table: &[f32]) -> f32 {
    let mut v = table.to_vec();
    v.sort_by(f32::total_cmp);
    v.windows(2).map(|w| w[1] - w[0]).fold(0.0, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Acklam's rational approximation of the standard normal quantile (relative error < 1.2e-9).
    fn norm_ppf(p: f64) -> f64 {
        const A: [f64; 6] = [
            -3.969_683_028_665_376e1,
            2.209_460_984_245_205e2,
            -2.759_285_104_469_687e2,
            1.383_577_518_672_69e2,
            -3.066_479_806_614_716e1,
            2.506_628_277_459_239,
        ];
        const B: [f64; 5] = [
            -5.447_609_879_822_406e1,
            1.615_858_368_580_409e2,
            -1.556_989_798_598_866e2,
            6.680_131_188_771_972e1,
            -1.328_068_155_288_572e1,
        ];
        const C: [f64; 6] = [
            -7.784_894_002_430_293e-3,
            -3.223_964_580_411_365e-1,
            -2.400_758_277_161_838,
            -2.549_732_539_343_734,
            4.374_664_141_464_968,
            2.938_163_982_698_783,
        ];
        const D: [f64; 4] =
            [7.784_695_709_041_462e-3, 3.224_671_290_700_398e-1, 2.445_134_137_142_996, 3.754_408_661_907_416];
        let tail = |q: f64| {
            (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
                / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
        };
        if p < 0.02425 {
            tail((-2.0 * p.ln()).sqrt())
        } else if p > 1.0 - 0.02425 {
            -tail((-2.0 * (1.0 - p).ln()).sqrt())
        } else {
            let q = p - 0.5;
            let r = q * q;
            (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
                / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
        }
    }

    fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
        (0..n).map(|i| a + (b - a) * i as f64 / (n - 1) as f64).collect()
    }

    #[test]
    fn nf4_table_is_bnb_hard_coded_f32_values() {
        let bnb: [f64; 16] = [
            -1.0,
            -0.6961928009986877,
            -0.5250730514526367,
            -0.39491748809814453,
            -0.28444138169288635,
            -0.18477343022823334,
            -0.09105003625154495,
            0.0,
            0.07958029955625534,
            0.16093020141124725,
            0.24611230194568634,
            0.33791524171829224,
            0.44070982933044434,
            0.5626170039176941,
            0.7229568362236023,
            1.0,
        ];
        for (i, (&a, &b)) in NF4.iter().zip(&bnb).enumerate() {
            assert_eq!(a.to_bits(), (b as f32).to_bits(), "code {i}");
        }
        assert_eq!(quantize_nf4(0.0), 7);
        assert_eq!(NF4[7], 0.0);
    }

    #[test]
    fn nf4_table_matches_its_normal_quantile_derivation() {
        // create_normal_map(offset=0.9677083, use_extra_value=True): 8 positive, 7 negative quantiles, 0, / max.
        let o = 0.9677083;
        let mut v: Vec<f64> = linspace(o, 0.5, 9)[..8].iter().map(|&p| norm_ppf(p)).collect();
        v.extend(linspace(o, 0.5, 8)[..7].iter().map(|&p| -norm_ppf(p)));
        v.push(0.0);
        v.sort_by(f64::total_cmp);
        let max = v[15];
        for (i, (&t, d)) in NF4.iter().zip(v.iter().map(|x| x / max)).enumerate() {
            assert!((f64::from(t) - d).abs() < 2e-7, "code {i}: table {t}, derived {d}");
        }
    }

    #[test]
    fn fp4_table_decodes_sign_two_exponent_bits_one_mantissa_bit() {
        for (bits, &v) in FP4.iter().enumerate() {
            let sign = if bits & 8 != 0 { -1.0 } else { 1.0 };
            let exp = (bits >> 1) & 3;
            let man = bits & 1;
            let mag = if exp == 0 { 0.0625 * man as f64 } else { 2f64.powi(4 - exp as i32) * (1.0 + 0.5 * man as f64) };
            assert_eq!(v, (sign * mag / 12.0) as f32, "pattern {bits:04b}");
        }
        assert_eq!(FP4[0b1000].to_bits(), 0, "bnb's table holds +0.0 for pattern 1000");
        assert_eq!(FP4[3], 1.0);
        assert_eq!(FP4[11], -1.0);
    }

    #[test]
    fn nf4_thresholds_and_fp4_bounds_are_exact_f32_midpoints_of_the_sorted_tables() {
        for i in 0..15 {
            assert_eq!(NF4_THRESHOLDS[i], (NF4[i] + NF4[i + 1]) / 2.0, "threshold {i}");
        }
        let mut sorted = FP4;
        sorted.sort_by(f32::total_cmp);
        for i in 0..15 {
            assert_eq!(FP4_BOUNDS[i].to_bits(), ((sorted[i] + sorted[i + 1]) / 2.0).to_bits(), "fp4 bound {i}");
        }
        assert_eq!(FP4_BOUNDS[7], 0.0);
        // FP4_ORDER is a permutation that sorts the table, the +0.0 pattern before the -0 pattern.
        let mut seen = [false; 16];
        for w in FP4_ORDER.windows(2) {
            assert!(FP4[usize::from(w[0])] <= FP4[usize::from(w[1])]);
        }
        FP4_ORDER.iter().for_each(|&c| seen[usize::from(c)] = true);
        assert!(seen.iter().all(|&s| s));
        assert_eq!((FP4_ORDER[7], FP4_ORDER[8]), (0, 8));
        // CUDA's rounded literals are within 5e-7 of the exact positive bounds.
        for (lit, exact) in CUDA_FP4_THRESHOLDS.iter().zip(&FP4_BOUNDS[8..]) {
            assert!((lit - exact).abs() < 5e-7, "{lit} vs {exact}");
        }
    }

    /// The thresholds of CUDA's `dQuantizeFP4` on `|x|` (rounded literals).
    const CUDA_FP4_THRESHOLDS: [f32; 7] =
        [0.00260417, 0.0859375, 0.20833333, 0.29166666, 0.4166667, 0.583333, 0.8333333];

    /// `dQuantizeNF4` from csrc/kernels.cu, transcribed literally.
    fn nf4_tree(x: f32) -> u8 {
        if x > 0.03979015 {
            if x > 0.38931254 {
                if x > 0.6427869 {
                    if x > 0.86147845 {
                        0b1111
                    } else {
                        0b1110
                    }
                } else if x > 0.50166345 {
                    0b1101
                } else {
                    0b1100
                }
            } else if x > 0.20352125 {
                if x > 0.29201376 {
                    0b1011
                } else {
                    0b1010
                }
            } else if x > 0.12025525 {
                0b1001
            } else {
                0b1000
            }
        } else if x > -0.33967942 {
            if x > -0.13791174 {
                if x > -0.045525018 {
                    0b0111
                } else {
                    0b0110
                }
            } else if x > -0.2346074 {
                0b0101
            } else {
                0b0100
            }
        } else if x > -0.6106329 {
            if x > -0.45999527 {
                0b0011
            } else {
                0b0010
            }
        } else if x > -0.8480964 {
            0b0001
        } else {
            0b0000
        }
    }

    /// `dQuantizeFP4` from csrc/kernels.cu, transcribed literally.
    fn fp4_tree(x: f32) -> u8 {
        let sign = if x < 0.0 { 0b1000 } else { 0 };
        let x = x.abs();
        if x > 0.29166666 {
            if x > 0.583333 {
                if x > 0.8333333 {
                    0b0011 + sign
                } else {
                    0b0010 + sign
                }
            } else if x > 0.4166667 {
                0b101 + sign
            } else {
                0b100 + sign
            }
        } else if x > 0.0859375 {
            if x > 0.20833333 {
                0b0111 + sign
            } else {
                0b0110 + sign
            }
        } else if x > 0.00260417 {
            0b0001 + sign
        } else {
            sign
        }
    }

    fn edge_values() -> Vec<f32> {
        let mut v = vec![0.0, -0.0, 1.0, -1.0, 2.0, -2.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-30, -1e-30];
        for t in NF4_THRESHOLDS.iter().chain(&FP4_BOUNDS).chain(&CUDA_FP4_THRESHOLDS).flat_map(|&t| [t, -t]) {
            v.extend([t, t.next_up(), t.next_down()]);
        }
        v.extend(NF4.iter().chain(&FP4));
        v
    }

    /// bnb's CPU rule, literally: `order[torch.bucketize(x, bounds)]` with `right=False`, i.e. the first bucket
    /// `k` with `x <= bounds[k]`.
    fn bucketize(x: f32, bounds: &[f32], order: &[u8]) -> u8 {
        let k = bounds.iter().position(|&b| x <= b).unwrap_or(bounds.len());
        order[k]
    }

    #[test]
    fn codes_equal_bnb_cpu_bucketize_and_nf4_equals_the_cuda_tree_on_every_threshold_and_its_neighbours() {
        let identity: Vec<u8> = (0..16).collect();
        for x in edge_values().into_iter().filter(|x| !x.is_nan()) {
            assert_eq!(quantize_nf4(x), bucketize(x, &NF4_THRESHOLDS, &identity), "nf4 at {x:e}");
            assert_eq!(quantize_nf4(x), nf4_tree(x), "nf4 vs CUDA at {x:e}");
            assert_eq!(quantize_fp4(x), bucketize(x, &FP4_BOUNDS, &FP4_ORDER), "fp4 at {x:e}");
            // Against the CUDA FP4 tree: same value everywhere except ties and the gaps between CUDA's rounded
            // literals and the exact bounds; the zero codes differ only in which pattern encodes 0.0.
            let (ours, cuda) = (FP4[usize::from(quantize_fp4(x))], FP4[usize::from(fp4_tree(x))]);
            let near_bound = FP4_BOUNDS.iter().chain(&CUDA_FP4_THRESHOLDS).any(|b| (x.abs() - b.abs()).abs() < 1e-6);
            assert!(ours == cuda || near_bound, "fp4 at {x:e}: {ours} vs CUDA {cuda}");
        }
        // Ties go to the lower code.
        assert_eq!(quantize_nf4(NF4_THRESHOLDS[7]), 7);
        assert_eq!(quantize_nf4(NF4_THRESHOLDS[7].next_up()), 8);
        assert_eq!(quantize_nf4(f32::NAN), 0, "NaN is below no threshold: code 0");
        // The sign-of-zero rule of the CPU backend is the reverse of CUDA's sign bit.
        assert_eq!((quantize_fp4(1e-30), fp4_tree(1e-30)), (0b1000, 0));
        assert_eq!((quantize_fp4(-1e-30), fp4_tree(-1e-30)), (0, 0b1000));
        assert_eq!((quantize_fp4(0.0), quantize_fp4(-0.0)), (0, 0));
        // A negative value exactly on a bound rounds away from zero (lower bucket), a positive one toward zero.
        assert_eq!(quantize_fp4(FP4_BOUNDS[5]), 14, "-(2/12 + 0.0625/12)/2 -> -2/12");
        assert_eq!(quantize_fp4(FP4_BOUNDS[9]), 1, "(2/12 + 0.0625/12)/2 -> 0.0625/12");
    }

    #[test]
    fn dynamic_map_has_bnb_shape_and_matches_its_construction() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] < w[1]), "sorted, distinct");
        assert_eq!(m[127], 0.0);
        assert_eq!(m[255], 1.0);
        assert_eq!(m[0], -0.99296875);
        assert_eq!(m[128], 5.5e-7_f32.next_up(), "smallest magnitude = f32 of 1e-6 * 0.55");
        // For i in 0..7: 2^i means of linspace(0.1, 1, 2^i + 1), times 10^(i-6), both signs; plus 0 and 1.
        let mut d = vec![0.0f64, 1.0];
        for i in 0..7i32 {
            let b = linspace(0.1, 1.0, (1 << i) + 1);
            for w in b.windows(2) {
                let v = 10f64.powi(i - 6) * (w[0] + w[1]) / 2.0;
                d.extend([v, -v]);
            }
        }
        d.sort_by(f64::total_cmp);
        for (i, (&a, &b)) in m.iter().zip(&d).enumerate() {
            assert!((f64::from(a) - b).abs() <= 1e-6 * b.abs(), "entry {i}: {a} vs {b}");
        }
    }

    #[test]
    fn max_gap_of_the_tables() {
        assert!((max_gap(&NF4) - (1.0 - 0.6961928)).abs() < 1e-7, "largest NF4 gap is -1 .. -0.696");
        assert!((max_gap(&FP4) - (1.0 - 8.0 / 12.0)).abs() < 1e-7);
    }

    proptest! {
        #![proptest_config(peft_core::testing::proptest_config(256))]

        #[test]
        fn four_bit_codes_are_nearest_table_entries(x in -1.0f32..1.0) {
            for (code, table) in [(quantize_nf4(x), &NF4), (quantize_fp4(x), &FP4)] {
                let d = (table[usize::from(code)] - x).abs();
                let best = table.iter().map(|t| (t - x).abs()).fold(f32::INFINITY, f32::min);
                prop_assert!(d <= best + 1e-6, "x {} code {} dist {} best {}", x, code, d, best);
            }
        }

        #[test]
        fn dynamic_codes_are_nearest_map_entries(x in -1.0f32..1.0) {
            let m = dynamic_map();
            let q = quantize_dynamic(&m, x);
            let d = (m[usize::from(q)] - x).abs();
            let best = m.iter().map(|t| (t - x).abs()).fold(f32::INFINITY, f32::min);
            prop_assert!(d <= best + 1e-7, "x {} code {} dist {} best {}", x, q, d, best);
        }
    }

    #[test]
    fn dynamic_lut_follows_bnb_build_and_index_rules() {
        let m = dynamic_map();
        let lut = DynamicLut::new(&m);
        assert_eq!(DynamicLut::index(-1.0), 0);
        assert_eq!(DynamicLut::index(1.0), 65535);
        assert_eq!(DynamicLut::index(2.0), 65535, "clamped");
        assert_eq!(DynamicLut::index(f32::NAN), 0);
        assert_eq!(DynamicLut::index(0.0), 32768, "fma(0.5, 65535, 0.5) = 32768 exactly");
        assert_eq!(lut.code(1.0), 255);
        assert_eq!(lut.code(-1.0), 0);
        // Near zero the grid step (2/65535) is far coarser than the map: 0 and every small positive value land on
        // grid index 32768 (+1.53e-5), every small negative one on 32767 (-1.53e-5; `x + 1` rounds below 1).
        let (c0, cn) = (lut.code(0.0), lut.code(-1e-6));
        assert_eq!((DynamicLut::index(1e-7), DynamicLut::index(-1e-7)), (32768, 32767));
        assert!([1e-7f32, 1e-6, 5e-6].iter().all(|&x| lut.code(x) == c0));
        assert!([-1e-7f32, -5e-6].iter().all(|&x| lut.code(x) == cn));
        assert!(c0 > 127 && cn < 127, "neither is the exact-zero code 127");
        assert_ne!(quantize_dynamic(&m, 1e-6), quantize_dynamic(&m, -1e-6), "CUDA's search tells them apart");
        // Each table entry holds the number of midpoints strictly below its grid value.
        for i in (0..LUT_SIZE).step_by(97).chain([LUT_SIZE - 1]) {
            let v = (2.0 * i as f32) / 65535.0 - 1.0;
            let below = (0..255).filter(|&k| 0.5 * (m[k] + m[k + 1]) < v).count();
            assert_eq!(usize::from(lut.lut[i]), below, "entry {i}");
        }
    }

    proptest! {
        #![proptest_config(peft_core::testing::proptest_config(256))]

        /// The table's code is the nearest entry to a grid point at most one grid step `2/65535` from `x`.
        #[test]
        fn dynamic_lut_codes_are_within_a_grid_step_of_the_nearest_entry(x in -1.0f32..1.0) {
            let m = dynamic_map();
            let lut = DynamicLut::new(&m);
            let d = (m[usize::from(lut.code(x))] - x).abs();
            let best = m.iter().map(|t| (t - x).abs()).fold(f32::INFINITY, f32::min);
            prop_assert!(d <= best + 2.0 / 65535.0 + 1e-7, "x {} dist {} best {}", x, d, best);
        }
    }

    #[test]
    fn dynamic_codes_map_every_entry_to_itself() {
        let m = dynamic_map();
        for (i, &v) in m.iter().enumerate() {
            assert_eq!(usize::from(quantize_dynamic(&m, v)), i, "entry {i} ({v})");
        }
    }
}
