//! Dequantisation of ggml block formats to f32, following the reference `dequantize_row_*` functions of ggml's
//! `ggml-quants.c` exactly (same block layouts, same order of float operations, so results are bit-identical to
//! ggml's scalar path and to gguf-py's numpy dequantiser).
//!
//! Block layouts (little-endian; `f16` is IEEE half; 32-element blocks for legacy quants, 256 for k-quants):
//!
//! | type | elems | bytes | layout | value |
//! |---|---|---|---|---|
//! | Q4_0 | 32 | 18 | `d:f16, qs[16]` | `(nibble - 8) * d`; low nibbles are elements 0..16, high 16..32 |
//! | Q4_1 | 32 | 20 | `d:f16, m:f16, qs[16]` | `nibble * d + m` |
//! | Q5_0 | 32 | 22 | `d:f16, qh:u32, qs[16]` | `((nibble \| hbit << 4) - 16) * d`; bit j of qh is element j's 5th bit |
//! | Q5_1 | 32 | 24 | `d:f16, m:f16, qh:u32, qs[16]` | `(nibble \| hbit << 4) * d + m` |
//! | Q8_0 | 32 | 34 | `d:f16, qs:i8[32]` | `q * d` |
//! | Q2_K | 256 | 84 | `scales[16], qs[64], d:f16, dmin:f16` | `d*(sc&15) * q2 - dmin*(sc>>4)` per 16 |
//! | Q3_K | 256 | 110 | `hmask[32], qs[64], scales[12], d:f16` | `d*(sc6-32) * (q2 - (hbit ? 0 : 4))` per 16 |
//! | Q4_K | 256 | 144 | `d:f16, dmin:f16, scales[12], qs[128]` | `d*sc6 * q4 - dmin*m6` per 32 |
//! | Q5_K | 256 | 176 | `d:f16, dmin:f16, scales[12], qh[32], qs[128]` | `d*sc6 * q5 - dmin*m6` per 32 |
//! | Q6_K | 256 | 210 | `ql[128], qh[64], scales:i8[16], d:f16` | `d * sc8 * (q6 - 32)` per 16 |
//! | Q8_K | 256 | 292 | `d:f32, qs:i8[256], bsums:i16[16]` | `d * q` |

use half::{bf16, f16};
use rayon::prelude::*;

use super::GgmlType;

/// Elements per k-quant super-block.
pub(crate) const QK_K: usize = 256;

#[inline]
fn f16_at(x: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([x[i], x[i + 1]]).to_f32()
}

/// Block dequantiser: one block of bytes in, `block_size` floats out.
type BlockFn = fn(&[u8], &mut [f32]);

/// The block function of `ty`, if it can be dequantised.
fn block_fn(ty: GgmlType) -> Option<BlockFn> {
    Some(match ty {
        GgmlType::F32 => |x, y| y[0] = f32::from_le_bytes([x[0], x[1], x[2], x[3]]),
        GgmlType::F16 => |x, y| y[0] = f16_at(x, 0),
        GgmlType::BF16 => |x, y| y[0] = bf16::from_le_bytes([x[0], x[1]]).to_f32(),
        GgmlType::F64 => |x, y| y[0] = f64::from_le_bytes(x[..8].try_into().expect("8 bytes")) as f32,
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q2_K => q2_k,
        GgmlType::Q3_K => q3_k,
        GgmlType::Q4_K => q4_k,
        GgmlType::Q5_K => q5_k,
        GgmlType::Q6_K => q6_k,
        GgmlType::Q8_K => q8_k,
        _ => return None,
    })
}

/// Whether [`dequantize`] supports `ty`.
pub(crate) fn supported(ty: GgmlType) -> bool {
    block_fn(ty).is_some()
}

/// Dequantises `bytes` (a whole number of blocks of `ty`) to f32; `None` if `ty` has no dequantiser.
///
/// The caller guarantees `bytes.len() == numel / block_size * type_size`.
pub(crate) fn dequantize(ty: GgmlType, bytes: &[u8]) -> Option<Vec<f32>> {
    let f = block_fn(ty)?;
    let (bs, ts) = ty.block_layout().expect("peft-rs bug: dequantisable type without a layout");
    let numel = bytes.len() / ts * bs;
    let mut out = vec![0f32; numel];
    // Work items of ~8K elements (whole blocks), spread over rayon's pool for large tensors.
    let group = (8192 / bs).max(1);
    let run = |(y, x): (&mut [f32], &[u8])| y.chunks_mut(bs).zip(x.chunks(ts)).for_each(|(y, x)| f(x, y));
    if numel >= 1 << 16 {
        out.par_chunks_mut(bs * group).zip(bytes.par_chunks(ts * group)).for_each(run);
    } else {
        out.chunks_mut(bs * group).zip(bytes.chunks(ts * group)).for_each(run);
    }
    Some(out)
}

fn q4_0(x: &[u8], y: &mut [f32]) {
    let d = f16_at(x, 0);
    let qs = &x[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1(x: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(x, 0), f16_at(x, 2));
    let qs = &x[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

fn q5_0(x: &[u8], y: &mut [f32]) {
    let d = f16_at(x, 0);
    let qh = u32::from_le_bytes([x[2], x[3], x[4], x[5]]);
    let qs = &x[6..22];
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = (((qs[j] & 0x0F) | xh0) as i32 - 16) as f32 * d;
        y[j + 16] = (((qs[j] >> 4) | xh1) as i32 - 16) as f32 * d;
    }
}

fn q5_1(x: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(x, 0), f16_at(x, 2));
    let qh = u32::from_le_bytes([x[4], x[5], x[6], x[7]]);
    let qs = &x[8..24];
    for j in 0..16 {
        let xh0 = (((qh >> j) << 4) & 0x10) as u8;
        let xh1 = ((qh >> (j + 12)) & 0x10) as u8;
        y[j] = ((qs[j] & 0x0F) | xh0) as f32 * d + m;
        y[j + 16] = ((qs[j] >> 4) | xh1) as f32 * d + m;
    }
}

fn q8_0(x: &[u8], y: &mut [f32]) {
    let d = f16_at(x, 0);
    for (yj, &q) in y.iter_mut().zip(&x[2..34]) {
        *yj = (q as i8) as f32 * d;
    }
}

fn q2_k(x: &[u8], y: &mut [f32]) {
    let scales = &x[0..16];
    let (d, dmin) = (f16_at(x, 80), f16_at(x, 82));
    let mut is = 0;
    let mut out = 0;
    for n in 0..2 {
        let q = &x[16 + 32 * n..16 + 32 * (n + 1)];
        for shift in [0u32, 2, 4, 6] {
            for half in 0..2 {
                let sc = scales[is];
                is += 1;
                let dl = d * (sc & 0x0F) as f32;
                let ml = dmin * (sc >> 4) as f32;
                for l in 0..16 {
                    y[out] = dl * ((q[l + 16 * half] >> shift) & 3) as f32 - ml;
                    out += 1;
                }
            }
        }
    }
}

/// The sixteen signed 6-bit scales of a Q3_K block (`scales[12]` packed as ggml packs them), minus 32.
fn q3_k_scales(s: &[u8]) -> [i32; 16] {
    let mut out = [0i32; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let low = if j < 8 { s[j] & 0x0F } else { s[j - 8] >> 4 };
        let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = (low | (high << 4)) as i32 - 32;
    }
    out
}

fn q3_k(x: &[u8], y: &mut [f32]) {
    let hm = &x[0..32];
    let d_all = f16_at(x, 108);
    let scales = q3_k_scales(&x[96..108]);
    let mut is = 0;
    let mut m = 1u8;
    let mut out = 0;
    for n in 0..2 {
        let q = &x[32 + 32 * n..32 + 32 * (n + 1)];
        for shift in [0u32, 2, 4, 6] {
            for half in 0..2 {
                let dl = d_all * scales[is] as f32;
                is += 1;
                for l in 16 * half..16 * (half + 1) {
                    let q3 = ((q[l] >> shift) & 3) as i32 - if hm[l] & m != 0 { 0 } else { 4 };
                    y[out] = dl * q3 as f32;
                    out += 1;
                }
            }
            m <<= 1;
        }
    }
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes of a Q4_K/Q5_K block (ggml's
/// `get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

fn q4_k(x: &[u8], y: &mut [f32]) {
    let (d, min) = (f16_at(x, 0), f16_at(x, 2));
    let scales = &x[4..16];
    for (c, q) in x[16..144].chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let y = &mut y[64 * c..64 * (c + 1)];
        for l in 0..32 {
            y[l] = d1 * (q[l] & 0x0F) as f32 - m1;
            y[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
        }
    }
}

fn q5_k(x: &[u8], y: &mut [f32]) {
    let (d, min) = (f16_at(x, 0), f16_at(x, 2));
    let scales = &x[4..16];
    let qh = &x[16..48];
    let (mut u1, mut u2) = (1u8, 2u8);
    for (c, ql) in x[48..176].chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
        let y = &mut y[64 * c..64 * (c + 1)];
        for l in 0..32 {
            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
            y[l] = d1 * ((ql[l] & 0x0F) + h1) as f32 - m1;
            y[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
        }
        u1 <<= 2;
        u2 <<= 2;
    }
}

fn q6_k(x: &[u8], y: &mut [f32]) {
    let d = f16_at(x, 208);
    for n in 0..2 {
        let ql = &x[64 * n..64 * (n + 1)];
        let qh = &x[128 + 32 * n..128 + 32 * (n + 1)];
        let sc = &x[192 + 8 * n..192 + 8 * (n + 1)];
        let y = &mut y[128 * n..128 * (n + 1)];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * (sc[is + k] as i8) as f32;
            y[l] = s(0) * q1 as f32;
            y[l + 32] = s(2) * q2 as f32;
            y[l + 64] = s(4) * q3 as f32;
            y[l + 96] = s(6) * q4 as f32;
        }
    }
}

fn q8_k(x: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
    for (yj, &q) in y.iter_mut().zip(&x[4..4 + QK_K]) {
        *yj = d * (q as i8) as f32;
    }
}

#[cfg(test)]
#[path = "dequant_tests.rs"]
mod tests;
