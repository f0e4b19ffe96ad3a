//! Dequantisation of hand-built blocks against the formulas of each format.
//!
//! Blocks are packed here the way ggml's *quantisers* pack them (an independent code path from the dequantisers
//! under test), from chosen integer codes, scales and mins. Scales are powers of two and codes small integers, so
//! every expected value is exact and compared with `==`.
#![allow(clippy::needless_range_loop)] // index loops mirror ggml's C formulas

use half::f16;

use super::*;

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

/// Deterministic codes in `0..=max`.
fn codes(n: usize, max: u32, seed: u32) -> Vec<u8> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            ((s >> 16) % (max + 1)) as u8
        })
        .collect()
}

fn deq(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
    let (bs, ts) = ty.block_layout().unwrap();
    assert_eq!(bytes.len() % ts, 0, "test built a partial block");
    let y = dequantize(ty, bytes).unwrap();
    assert_eq!(y.len(), bytes.len() / ts * bs);
    y
}

#[test]
fn q4_0_is_nibble_minus_8_times_d() {
    // Byte j holds element j (low nibble) and element j + 16 (high nibble).
    let mut b = h(0.5).to_vec();
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let y = deq(GgmlType::Q4_0, &b);
    assert_eq!((y[0], y[8], y[15], y[16], y[31]), (-4.0, 0.0, 3.5, 3.5, -4.0));
    for j in 0..16 {
        assert_eq!(y[j], (j as f32 - 8.0) * 0.5);
        assert_eq!(y[j + 16], (7.0 - j as f32) * 0.5);
    }
}

#[test]
fn q4_1_is_nibble_times_d_plus_m() {
    let mut b = h(0.25).to_vec();
    b.extend(h(-1.0));
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let y = deq(GgmlType::Q4_1, &b);
    assert_eq!((y[0], y[15], y[16], y[31]), (-1.0, 2.75, 2.75, -1.0));
    for j in 0..16 {
        assert_eq!(y[j], j as f32 * 0.25 - 1.0);
    }
}

#[test]
fn q5_0_takes_fifth_bit_from_qh() {
    // All nibbles 0; qh bit j is element j's high bit (bits 16..32 for elements 16..32).
    let qh: u32 = 1 | (1 << 3) | (1 << 16) | (1 << 31);
    let mut b = h(2.0).to_vec();
    b.extend(qh.to_le_bytes());
    b.extend([0u8; 16]);
    b[6] = 0x0F | 0xA0; // element 0 nibble 15, element 16 nibble 10
    let y = deq(GgmlType::Q5_0, &b);
    // (15 | 16) - 16 = 15; (0 | 16) - 16 = 0; 0 - 16 = -16; (10 | 16) - 16 = 10.
    assert_eq!((y[0], y[3], y[1], y[16], y[31], y[17]), (30.0, 0.0, -32.0, 20.0, 0.0, -32.0));
}

#[test]
fn q5_1_is_five_bit_code_times_d_plus_m() {
    let qh: u32 = (1 << 2) | (1 << 20);
    let mut b = h(0.5).to_vec();
    b.extend(h(10.0));
    b.extend(qh.to_le_bytes());
    b.extend((0..16u8).map(|j| j | (j << 4)));
    let y = deq(GgmlType::Q5_1, &b);
    assert_eq!((y[0], y[2], y[3], y[20], y[21]), (10.0, 19.0, 11.5, 20.0, 12.5));
    for j in 0..32 {
        let hi = if j == 2 || j == 20 { 16 } else { 0 };
        assert_eq!(y[j], ((j % 16) + hi) as f32 * 0.5 + 10.0, "element {j}");
    }
}

#[test]
fn q8_0_is_signed_byte_times_d() {
    let mut b = h(0.125).to_vec();
    b.extend((0..32).map(|i| (i as i8 * 4 - 64) as u8));
    b[2 + 31] = (-128i8) as u8;
    let y = deq(GgmlType::Q8_0, &b);
    assert_eq!((y[0], y[16], y[30], y[31]), (-8.0, 0.0, 7.0, -16.0));
}

#[test]
fn q8_k_is_signed_byte_times_f32_d() {
    let mut b = 0.75f32.to_le_bytes().to_vec();
    b.extend((0..256).map(|i| (i as u8).wrapping_sub(128)));
    b.extend([0u8; 32]); // bsums, unused
    let y = deq(GgmlType::Q8_K, &b);
    assert_eq!((y[0], y[128], y[255]), (-96.0, 0.0, 95.25));
}

/// Packs 2-bit codes `l[256]` as ggml's Q2_K/Q3_K quantisers do.
fn pack_2bit(l: &[u8]) -> Vec<u8> {
    let mut qs = vec![0u8; 64];
    for j in [0, 128] {
        for i in 0..32 {
            qs[j / 4 + i] =
                (l[j + i] & 3) | ((l[j + i + 32] & 3) << 2) | ((l[j + i + 64] & 3) << 4) | ((l[j + i + 96] & 3) << 6);
        }
    }
    qs
}

#[test]
fn q2_k_uses_per_16_scale_and_min() {
    let l = codes(256, 3, 1);
    let sc: Vec<u8> = (0..16).map(|i| (i as u8 % 16) | (((15 - i) as u8) << 4)).collect();
    let (d, dmin) = (0.5f32, 0.25f32);
    let mut b = sc.clone();
    b.extend(pack_2bit(&l));
    b.extend(h(d));
    b.extend(h(dmin));
    let y = deq(GgmlType::Q2_K, &b);
    for e in 0..256 {
        let s = sc[e / 16];
        assert_eq!(y[e], d * (s & 15) as f32 * l[e] as f32 - dmin * (s >> 4) as f32, "element {e}");
    }
    // By hand: element 0 uses scale byte 0x0F -> scale 0, min 15: 0 - 0.25 * 15.
    assert_eq!(y[0], -3.75);
}

#[test]
fn q3_k_uses_signed_6bit_scales_and_high_mask() {
    let l = codes(256, 7, 2); // 3-bit codes; value = code - 4
    let ls: Vec<u8> = (0..16).map(|j| (j * 4 + 1) as u8).collect(); // 6-bit scale codes; scale = code - 32
    let mut scales = [0u8; 12];
    for (j, &code) in ls.iter().enumerate() {
        if j < 8 {
            scales[j] = code & 0xF;
        } else {
            scales[j - 8] |= (code & 0xF) << 4;
        }
        scales[j % 4 + 8] |= (code >> 4) << (2 * (j / 4));
    }
    let mut hmask = [0u8; 32];
    let mut low = l.clone();
    for (j, c) in low.iter_mut().enumerate() {
        if *c > 3 {
            hmask[j % 32] |= 1 << (j / 32);
            *c -= 4;
        }
    }
    let d = 0.25f32;
    let mut b = hmask.to_vec();
    b.extend(pack_2bit(&low));
    b.extend(scales);
    b.extend(h(d));
    let y = deq(GgmlType::Q3_K, &b);
    for e in 0..256 {
        assert_eq!(y[e], d * (ls[e / 16] as f32 - 32.0) * (l[e] as f32 - 4.0), "element {e}");
    }
    // By hand: element 255 has scale code 61 -> 29.
    assert_eq!(y[255], 0.25 * 29.0 * (l[255] as f32 - 4.0));
}

/// Packs eight 6-bit scales and mins as ggml's Q4_K/Q5_K quantisers do.
fn pack_k4(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            s[j] = sc[j];
            s[j + 4] = m[j];
        } else {
            s[j + 4] = (sc[j] & 0xF) | ((m[j] & 0xF) << 4);
            s[j - 4] |= (sc[j] >> 4) << 6;
            s[j] |= (m[j] >> 4) << 6;
        }
    }
    s
}

const SC: [u8; 8] = [1, 63, 17, 32, 48, 5, 63, 40];
const MN: [u8; 8] = [0, 3, 63, 16, 31, 62, 7, 33];

#[test]
fn q4_k_uses_per_32_six_bit_scale_and_min() {
    let l = codes(256, 15, 3);
    let (d, dmin) = (0.5f32, 0.125f32);
    let mut b = h(d).to_vec();
    b.extend(h(dmin));
    b.extend(pack_k4(&SC, &MN));
    for j in [0, 64, 128, 192] {
        b.extend((0..32).map(|i| l[j + i] | (l[j + i + 32] << 4)));
    }
    let y = deq(GgmlType::Q4_K, &b);
    for e in 0..256 {
        let c = e / 32;
        assert_eq!(y[e], d * SC[c] as f32 * l[e] as f32 - dmin * MN[c] as f32, "element {e}");
    }
    // By hand, sub-block 6 (scale 63, min 7): code 15 -> 0.5*63*15 - 0.125*7 = 471.625.
    let mut b2 = b.clone();
    b2[16 + 3 * 32] = 0x0F | (l[192 + 32] << 4);
    assert_eq!(deq(GgmlType::Q4_K, &b2)[192], 471.625);
}

#[test]
fn q5_k_adds_high_bit_from_qh() {
    let l = codes(256, 31, 4);
    let (d, dmin) = (0.25f32, 0.5f32);
    let mut qh = [0u8; 32];
    let mut ql = Vec::new();
    for (k, n) in [0usize, 64, 128, 192].into_iter().enumerate() {
        let (m1, m2) = (1u8 << (2 * k), 2u8 << (2 * k));
        for j in 0..32 {
            let (mut l1, mut l2) = (l[n + j], l[n + j + 32]);
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            ql.push(l1 | (l2 << 4));
        }
    }
    let mut b = h(d).to_vec();
    b.extend(h(dmin));
    b.extend(pack_k4(&SC, &MN));
    b.extend(qh);
    b.extend(ql);
    let y = deq(GgmlType::Q5_K, &b);
    for e in 0..256 {
        let c = e / 32;
        assert_eq!(y[e], d * SC[c] as f32 * l[e] as f32 - dmin * MN[c] as f32, "element {e}");
    }
}

#[test]
fn q6_k_uses_signed_8bit_scales_per_16() {
    let l = codes(256, 63, 5); // value = code - 32
    let sc: Vec<i8> = (0..16).map(|i| if i % 2 == 0 { i as i8 * 8 - 64 } else { 127 - i as i8 }).collect();
    let d = 0.5f32;
    let mut ql = vec![0u8; 128];
    let mut qh = vec![0u8; 64];
    for (n, j) in [0usize, 128].into_iter().enumerate() {
        for i in 0..32 {
            let q = |k: usize| l[j + i + 32 * k];
            ql[64 * n + i] = (q(0) & 0xF) | ((q(2) & 0xF) << 4);
            ql[64 * n + i + 32] = (q(1) & 0xF) | ((q(3) & 0xF) << 4);
            qh[32 * n + i] = (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
        }
    }
    let mut b = ql;
    b.extend(qh);
    b.extend(sc.iter().map(|&s| s as u8));
    b.extend(h(d));
    let y = deq(GgmlType::Q6_K, &b);
    for e in 0..256 {
        assert_eq!(y[e], d * sc[e / 16] as f32 * (l[e] as f32 - 32.0), "element {e}");
    }
    // By hand: element 0 has scale -64.
    assert_eq!(y[0], 0.5 * -64.0 * (l[0] as f32 - 32.0));
}

#[test]
fn multi_block_rows_are_dequantised_in_order() {
    // Three Q4_0 blocks with different scales; also exercises the parallel path with many blocks.
    let blocks = 3000;
    let mut b = Vec::new();
    for i in 0..blocks {
        b.extend(h((i % 4) as f32));
        b.extend([0x99u8; 16]); // every nibble 9 -> value 1 * d
    }
    let y = deq(GgmlType::Q4_0, &b);
    assert_eq!(y.len(), blocks * 32);
    for (i, blk) in y.chunks(32).enumerate() {
        assert!(blk.iter().all(|&v| v == (i % 4) as f32), "block {i}");
    }
}

#[test]
fn plain_float_types_decode_per_element() {
    let b: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(deq(GgmlType::F32, &b), [1.5, -2.0]);
    let b: Vec<u8> = [h(0.5), h(-65504.0)].concat();
    assert_eq!(deq(GgmlType::F16, &b), [0.5, -65504.0]);
    assert!(dequantize(GgmlType::I32, &[0; 4]).is_none());
}
