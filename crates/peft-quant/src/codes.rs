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
//! Nearest-code rules follow the CUDA kernels (`csrc/kernels.cu`): NF4 and FP4 use decision trees over fixed f32
//! thresholds with strict `>` (a value exactly on a threshold takes the lower code), evaluated here branch-free as
//! "number of thresholds below x", which is the same function; 8-bit uses `dQuantize<0>`'s binary search with its
//! midpoint test, reproduced literally.

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

/// The NF4 decision-tree thresholds of `dQuantizeNF4` (midpoints of consecutive [`NF4`] values), ascending.
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

/// The thresholds of `dQuantizeFP4` on `|x|`, ascending (bnb's rounded literals, not exact midpoints).
pub const FP4_THRESHOLDS: [f32; 7] = [0.00260417, 0.0859375, 0.20833333, 0.29166666, 0.4166667, 0.583333, 0.8333333];

/// FP4 magnitude bits for "number of [`FP4_THRESHOLDS`] below |x|" (0..=7).
const FP4_MAGNITUDE: [u8; 8] = [0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011];

/// The nearest NF4 code of a normalised value, exactly as `dQuantizeNF4` (strict `>` at every threshold; NaN gives
/// code 0, like the CUDA tree).
#[inline(always)]
pub fn quantize_nf4(x: f32) -> u8 {
    // A u32 count keeps the compare lanes as wide as the f32 lanes, which lets the loop vectorise across elements.
    let mut c = 0u32;
    for t in NF4_THRESHOLDS {
        c += u32::from(x > t);
    }
    c as u8
}

/// The nearest FP4 code (bit pattern) of a normalised value, exactly as `dQuantizeFP4`: sign bit from `x < 0`, then
/// the tree on `|x|`.
#[inline(always)]
pub fn quantize_fp4(x: f32) -> u8 {
    let sign = if x < 0.0 { 0b1000 } else { 0 };
    let a = x.abs();
    let mut c = 0u32;
    for t in FP4_THRESHOLDS {
        c += u32::from(a > t);
    }
    FP4_MAGNITUDE[c as usize] | sign
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
    fn nf4_thresholds_are_exact_f32_midpoints_and_fp4_thresholds_are_near_midpoints() {
        for i in 0..15 {
            assert_eq!(NF4_THRESHOLDS[i], (NF4[i] + NF4[i + 1]) / 2.0, "threshold {i}");
        }
        let mut mags: Vec<f32> = FP4[..8].to_vec();
        mags.sort_by(f32::total_cmp);
        for i in 0..7 {
            let mid = (mags[i] + mags[i + 1]) / 2.0;
            assert!((FP4_THRESHOLDS[i] - mid).abs() < 5e-7, "fp4 threshold {i}: {} vs {mid}", FP4_THRESHOLDS[i]);
        }
    }

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
        for t in NF4_THRESHOLDS.iter().chain(&FP4_THRESHOLDS).flat_map(|&t| [t, -t]) {
            v.extend([t, t.next_up(), t.next_down()]);
        }
        v.extend(NF4.iter().chain(&FP4));
        v
    }

    #[test]
    fn branch_free_codes_equal_the_cuda_decision_trees_on_every_threshold_and_its_neighbours() {
        for x in edge_values() {
            assert_eq!(quantize_nf4(x), nf4_tree(x), "nf4 at {x:e}");
            assert_eq!(quantize_fp4(x), fp4_tree(x), "fp4 at {x:e}");
        }
        // Ties go to the lower code (strict `>`).
        assert_eq!(quantize_nf4(NF4_THRESHOLDS[7]), 7);
        assert_eq!(quantize_nf4(NF4_THRESHOLDS[7].next_up()), 8);
        assert_eq!(quantize_nf4(f32::NAN), 0, "the CUDA tree sends NaN to code 0");
        assert_eq!(quantize_fp4(-1e-30), 0b1000, "tiny negatives keep the sign bit (-0)");
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
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

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
    fn dynamic_codes_map_every_entry_to_itself() {
        let m = dynamic_map();
        for (i, &v) in m.iter().enumerate() {
            assert_eq!(usize::from(quantize_dynamic(&m, v)), i, "entry {i} ({v})");
        }
    }
}
