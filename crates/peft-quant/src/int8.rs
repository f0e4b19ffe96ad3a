//! Row-wise int8 absmax quantisation (LLM.int8() without outlier decomposition, bnb `int8_vectorwise_quant` with
//! `threshold=0`).
//!
//! What of LLM.int8() (Dettmers et al. 2022) is implemented: the **weight storage** — row-wise (vector-wise)
//! absmax int8 codes plus one f32 scale (`SCB`) per row, byte-identical to bitsandbytes 0.50.2's CPU backend
//! (`int8_vectorwise_quant(threshold=0.0)` codes and SCB, `int8_vectorwise_dequant` values, checked bit for bit
//! by `tests/bnb_int8.rs` on fixtures bnb generated, `tests/fixtures/int8/gen_bnb_int8.py`, f32 and f16 inputs).
//! What is **not** implemented:
//! * the **mixed-precision outlier decomposition** (`threshold > 0`, 6.0 in the paper): input feature columns with
//!   any `|x| ≥ threshold` are not split off into an fp16 matmul; every column goes through int8;
//! * **int8 activations and the int8 GEMM** (`int8_linear_matmul` with vector-wise quantized inputs and
//!   `int8_mm_dequant`): [`crate::QuantLinear`] dequantizes the int8 weight to f32 tiles and multiplies in f32;
//! * bnb's `Int8Params`/`Linear8bitLt` training state (`CB`/`SCB` kept with `has_fp16_weights`).
//!
//! A row of zeros is stored as `SCB = 0` and zero codes; bnb computes `0 · (127/0) = NaN` there and casts it to
//! int8 (platform-defined), so such rows are not in the fixture.
//!
//! Per row: `SCB = max|x|` (f32), `q = round(x · ((1/SCB)·127))` with round-half-to-even (torch.round); the
//! factor is computed as torch computes bnb's `127.0 / row_stats` (reciprocal, then times 127). Dequantise:
//! `q · SCB · (1/127)`, evaluated left to right in f32 as bnb's `int8_vectorwise_dequant`
//! (`A * stats * 7.874015718698502e-3`). An all-zero row stores `SCB = 0` and zero codes.

use rayon::prelude::*;

use crate::error::{size, QuantError, Result};

/// bnb's `1/127` constant.
const INV_127: f32 = 7.874_016e-3;

/// An int8 matrix with one f32 absmax per row.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Rows {
    rows: usize,
    cols: usize,
    q: Vec<i8>,
    scb: Vec<f32>,
}

impl Int8Rows {
    /// Quantizes a row-major `rows x cols` matrix.
    ///
    /// # Errors
    /// [`QuantError::Size`] when `x.len() != rows * cols`; [`QuantError::Empty`]; [`QuantError::NonFinite`].
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Result<Self> {
        size("int8 quantize: rows x cols", rows * cols, x.len())?;
        if x.is_empty() {
            return Err(QuantError::Empty("int8 quantize"));
        }
        let mut q = vec![0i8; x.len()];
        let mut scb = vec![0f32; rows];
        let ok = q
            .par_chunks_mut(cols)
            .zip(scb.par_iter_mut())
            .zip(x.par_chunks(cols))
            .map(|((qr, s), xr)| {
                let finite = xr.iter().all(|v| v.is_finite());
                let m = xr.iter().fold(0f32, |m, v| m.max(v.abs()));
                *s = m;
                if m > 0.0 {
                    // bnb writes `127.0 / row_stats`, which torch evaluates as `reciprocal(row_stats) * 127`
                    // (one ulp off `127 / m` for some m; `tests/bnb_int8.rs` has such a row).
                    let f = (1.0 / m) * 127.0;
                    for (qi, &v) in qr.iter_mut().zip(xr) {
                        // |v·f| <= 127 up to one rounding, so the cast saturates nothing in practice.
                        *qi = (v * f).round_ties_even().clamp(-127.0, 127.0) as i8;
                    }
                }
                finite
            })
            .reduce(|| true, |a, b| a && b);
        if !ok {
            return Err(QuantError::NonFinite("int8 quantize input".into()));
        }
        Ok(Int8Rows { rows, cols, q, scb })
    }

    /// Assembles a state read from a checkpoint (`weight` int8 `[rows, cols]`, `SCB` f32 `[rows]`).
    ///
    /// # Errors
    /// [`QuantError::Size`] when the lengths disagree with `rows x cols`.
    pub fn from_parts(rows: usize, cols: usize, q: Vec<i8>, scb: Vec<f32>) -> Result<Self> {
        size("int8 weight elements", rows * cols, q.len())?;
        size("int8 SCB rows", rows, scb.len())?;
        Ok(Int8Rows { rows, cols, q, scb })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The int8 codes, row-major.
    pub fn codes(&self) -> &[i8] {
        &self.q
    }

    /// The per-row absmax (bnb `SCB`).
    pub fn scb(&self) -> &[f32] {
        &self.scb
    }

    /// Dequantises rows `r0 .. r0 + out.len() / cols` into `out`. Panics (a caller bug) on a bad range.
    pub fn dequantize_rows_into(&self, r0: usize, out: &mut [f32]) {
        assert!(out.len().is_multiple_of(self.cols.max(1)), "peft-rs bug: partial int8 row");
        let start = r0 * self.cols;
        let src = &self.q[start..start + out.len()];
        for (r, (o, q)) in out.chunks_mut(self.cols).zip(src.chunks(self.cols)).enumerate() {
            let s = self.scb[r0 + r];
            for (ov, &qv) in o.iter_mut().zip(q) {
                *ov = f32::from(qv) * s * INV_127;
            }
        }
    }

    /// The whole matrix, dequantised.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.q.len()];
        out.par_chunks_mut(self.cols.max(1)).enumerate().for_each(|(r, o)| self.dequantize_rows_into(r, o));
        out
    }

    /// Bytes held: one per code plus four per row.
    pub fn storage_bytes(&self) -> usize {
        self.q.len() + 4 * self.scb.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rowwise_codes_match_hand_computed_values_with_half_even_rounding() {
        // Row 0: absmax 127 -> factor 1: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -127 -> -127.
        let x = [0.5f32, 1.5, 2.5, -127.0, 0.0, 0.0, 0.0, 0.0];
        let q = Int8Rows::quantize(&x, 2, 4).unwrap();
        assert_eq!(&q.codes()[..4], &[0, 2, 2, -127]);
        assert_eq!(q.scb(), &[127.0, 0.0]);
        assert_eq!(&q.codes()[4..], &[0, 0, 0, 0], "all-zero row stores zero codes");
        let d = q.dequantize();
        assert_eq!(d[3], -127.0 * 127.0 * INV_127);
        assert!(d[4..].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn error_is_at_most_half_a_step_per_row() {
        let x: Vec<f32> = (0..600).map(|i| ((i * 7919 % 613) as f32 - 306.0) / 97.0).collect();
        let q = Int8Rows::quantize(&x, 6, 100).unwrap();
        let d = q.dequantize();
        for (i, (a, b)) in x.iter().zip(&d).enumerate() {
            let step = q.scb()[i / 100] / 127.0;
            assert!((a - b).abs() <= 0.5 * step * (1.0 + 1e-5) + 1e-6, "element {i}");
        }
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        assert!(matches!(Int8Rows::quantize(&[1.0; 5], 2, 3), Err(QuantError::Size { .. })));
        assert!(matches!(Int8Rows::quantize(&[], 0, 3), Err(QuantError::Empty(_))));
        assert!(matches!(Int8Rows::quantize(&[f32::INFINITY], 1, 1), Err(QuantError::NonFinite(_))));
        assert!(matches!(Int8Rows::from_parts(2, 2, vec![0; 4], vec![1.0]), Err(QuantError::Size { .. })));
    }
}
