//! A quantized linear base: `y = x · dequant(W)ᵀ + b` with the weight held 4-bit (NF4/FP4, optionally double
//! quantized) or int8, dequantised on the fly in tiles of output rows.
//!
//! **Forward**: the output rows are split into tiles of [`QuantLinear::tile_rows`] rows; tiles run in parallel, each
//! dequantising its rows into a per-thread f32 buffer (`tile_rows × in` floats, never the whole weight) and
//! computing `yᵀ[tile] = W[tile] · xᵀ` with [`peft_core::backend::gemm`]. The result equals
//! `x · dequant(W)ᵀ` up to GEMM summation order.
//!
//! **Backward**: gradient to the input only (`dx = dy · dequant(W)`, again tile by tile); the quantized weight is
//! frozen and gets none. A trainable bias gets its gradient through the ordinary broadcast add.
//!
//! Computation is in f32 on the dequantised values; the cast to the state's recorded dtype (bf16 in QLoRA) that
//! bnb applies before its matmul is not applied.
//!
//! **Merging** ([`LinearBase::add_to_weight`]): dequantise, add the delta, and re-quantize with the same format
//! (quant type, blocksize, double quantisation, recorded dtype). This is lossy: every element is rounded again to
//! the nearest code of its block's *new* absmax (error ≤ half the largest code gap × absmax, per element, per
//! merge), so `merge` followed by `unmerge` does not restore the original codes. Without double quantisation,
//! re-quantizing an unchanged dequantised weight reproduces the same codes and scales.

use std::sync::{Arc, RwLock};

use ndarray::{ArrayD, IxDyn};
use peft_core::adapter::TargetSpec;
use peft_core::autograd::record;
use peft_core::backend::{gemm, MatRef};
use peft_core::nn::{linear_sites, LinearBase, Module};
use peft_core::{Error, Param, Tensor};
use rayon::prelude::*;

use crate::block4::{Absmax, FloatDtype, Quant4, Quant4Config};
use crate::int8::Int8Rows;
use crate::lq_lora::NfQuant;
use crate::nf_storage::NfPacked;
use crate::storage::{Checkpoint, RawTensor};

/// How to quantize a dense weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantFormat {
    /// bitsandbytes 4-bit (NF4/FP4, blocksize, double quantisation).
    Block4(Quant4Config),
    /// Row-wise int8 absmax (LLM.int8() without outliers).
    Int8,
    /// LQ-LoRA's blockwise-NF(b, b0, b1, B0, B1) ([`NfQuant`], bit-packed [`NfPacked`]).
    Nf(NfQuant),
}

impl Default for QuantFormat {
    /// QLoRA's NF4 + double quantisation, blocksize 64.
    fn default() -> Self {
        QuantFormat::Block4(Quant4Config::default())
    }
}

/// A quantized `[out, in]` weight.
#[derive(Clone, Debug, PartialEq)]
pub enum QuantWeight {
    /// 4-bit bitsandbytes layout (shape `[out, in]`).
    Block4(Quant4),
    /// Row-wise int8.
    Int8(Int8Rows),
    /// LQ-LoRA's NF-b storage (shape `[out, in]`).
    Nf(NfPacked),
}

impl QuantWeight {
    /// Quantizes a row-major `[rows, cols]` matrix.
    ///
    /// # Errors
    /// The quantizer's errors (bad blocksize, non-finite or empty input).
    pub fn quantize(w: &[f32], rows: usize, cols: usize, format: &QuantFormat) -> crate::Result<Self> {
        Ok(match format {
            QuantFormat::Block4(cfg) => QuantWeight::Block4(Quant4::quantize(w, &[rows, cols], cfg)?),
            QuantFormat::Int8 => QuantWeight::Int8(Int8Rows::quantize(w, rows, cols)?),
            QuantFormat::Nf(cfg) => QuantWeight::Nf(NfPacked::quantize(w, &[rows, cols], cfg)?),
        })
    }

    /// `(rows, cols)`, or `None` for a 4-bit state whose shape is not 2-D.
    pub fn dims(&self) -> Option<(usize, usize)> {
        match self {
            QuantWeight::Block4(q) => match q.shape() {
                [r, c] => Some((*r, *c)),
                _ => None,
            },
            QuantWeight::Int8(q) => Some((q.rows(), q.cols())),
            QuantWeight::Nf(q) => match q.shape() {
                [r, c] => Some((*r, *c)),
                _ => None,
            },
        }
    }

    /// The stored shape.
    pub fn shape(&self) -> Vec<usize> {
        match self {
            QuantWeight::Block4(q) => q.shape().to_vec(),
            QuantWeight::Int8(q) => vec![q.rows(), q.cols()],
            QuantWeight::Nf(q) => q.shape().to_vec(),
        }
    }

    /// The format that re-quantizing this weight uses.
    pub fn format(&self) -> QuantFormat {
        match self {
            QuantWeight::Block4(q) => QuantFormat::Block4(Quant4Config {
                quant_type: q.quant_type(),
                blocksize: q.blocksize(),
                double_quant: matches!(q.absmax(), Absmax::Double { .. }),
            }),
            QuantWeight::Int8(_) => QuantFormat::Int8,
            QuantWeight::Nf(q) => QuantFormat::Nf(q.config()),
        }
    }

    /// Dequantises rows `r0 .. r0 + out.len() / cols` into `out` (a caller bug panics).
    pub fn dequantize_rows_into(&self, r0: usize, cols: usize, out: &mut [f32]) {
        match self {
            QuantWeight::Block4(q) => q.dequantize_range_into(r0 * cols, out),
            QuantWeight::Int8(q) => q.dequantize_rows_into(r0, out),
            QuantWeight::Nf(q) => q.dequantize_range_into(r0 * cols, out),
        }
    }

    /// The whole weight, dequantised in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            QuantWeight::Block4(q) => q.dequantize(),
            QuantWeight::Int8(q) => q.dequantize(),
            QuantWeight::Nf(q) => q.dequantize(),
        }
    }

    /// Bytes held (codes and scales).
    pub fn storage_bytes(&self) -> usize {
        match self {
            QuantWeight::Block4(q) => q.storage_bytes(),
            QuantWeight::Int8(q) => q.storage_bytes(),
            QuantWeight::Nf(q) => q.storage_bytes(),
        }
    }
}

/// The automatic tile height: about 256 K f32 (1 MiB) of dequantised weight per task for a few input rows (the
/// product is a GEMV, bound by dequantisation), 1 M f32 for larger batches (GEMM efficiency grows with the
/// tile); 16..=256 rows. Measured on 4096 x 4096: batch 1 is flat between 16 and 128 rows, batch 32 runs about
/// 2x faster with 256 rows than with 16.
fn auto_tile_rows(in_f: usize, m: usize) -> usize {
    let floats = if m <= 4 { 256 * 1024 } else { 1024 * 1024 };
    (floats / in_f.max(1)).clamp(16, 256)
}

/// A frozen quantized linear base for a [`peft_core::nn::Linear`] site.
///
/// ```
/// use peft_core::nn::LinearBase;
/// use peft_core::Tensor;
/// use peft_quant::{QuantFormat, QuantLinear};
/// let w: Vec<f32> = (0..8 * 64).map(|i| ((i % 17) as f32 - 8.0) / 8.0).collect();
/// let lin = QuantLinear::quantize(&w, 8, 64, None, &QuantFormat::default())?;
/// let y = lin.forward(&Tensor::ones(&[2, 64]))?;
/// assert_eq!(y.shape(), &[2, 8]);
/// # Ok::<(), peft_core::Error>(())
/// ```
pub struct QuantLinear {
    weight: RwLock<Arc<QuantWeight>>,
    bias: Option<Param>,
    out_f: usize,
    in_f: usize,
    tile_rows: Option<usize>,
}

impl QuantLinear {
    /// A base over a quantized `[out, in]` weight and an optional `[out]` bias.
    ///
    /// # Errors
    /// [`Error::Shape`] when the weight is not 2-D or the bias is not `[out]`.
    pub fn new(weight: QuantWeight, bias: Option<Param>) -> peft_core::Result<Self> {
        let Some((out_f, in_f)) = weight.dims() else {
            return Err(Error::Shape { op: "QuantLinear::new", lhs: weight.shape(), rhs: vec![0, 0] });
        };
        if let Some(b) = &bias {
            if b.shape() != [out_f] {
                return Err(Error::Shape { op: "QuantLinear::new", lhs: b.shape(), rhs: vec![out_f] });
            }
        }
        Ok(QuantLinear { weight: RwLock::new(Arc::new(weight)), bias, out_f, in_f, tile_rows: None })
    }

    /// Quantizes a row-major `[out, in]` weight.
    ///
    /// # Errors
    /// Quantizer errors (a [`crate::QuantError`] inside [`Error::Method`], or [`Error::NonFinite`]); shape errors as [`QuantLinear::new`].
    pub fn quantize(
        w: &[f32],
        out_f: usize,
        in_f: usize,
        bias: Option<Param>,
        format: &QuantFormat,
    ) -> peft_core::Result<Self> {
        Self::new(QuantWeight::quantize(w, out_f, in_f, format)?, bias)
    }

    /// Quantizes another base's effective weight, keeping its bias parameter.
    ///
    /// # Errors
    /// As [`QuantLinear::quantize`] and the base's `dense_weight`.
    pub fn from_base(base: &dyn LinearBase, format: &QuantFormat) -> peft_core::Result<Self> {
        let w = base.dense_weight()?;
        let w = w.as_standard_layout();
        let slice = w.as_slice().expect("peft-rs bug: standard layout is contiguous");
        Self::quantize(slice, base.out_features(), base.in_features(), base.bias(), format)
    }

    /// Loads the layer at module path `prefix` from a bitsandbytes checkpoint: a 4-bit weight (`quant_state`
    /// entry present), an int8 one (`<prefix>.SCB` present) or an NF-b one ([`Checkpoint::insert_nf`]'s keys),
    /// and `<prefix>.bias` if stored (as a frozen parameter named `<prefix>.bias`, converted to f32).
    ///
    /// # Errors
    /// The checkpoint's errors (missing or corrupt quant state, sizes, dtypes) as a [`crate::QuantError`] inside [`Error::Method`]; shape errors
    /// as [`QuantLinear::new`].
    pub fn load(ckpt: &Checkpoint, prefix: &str) -> peft_core::Result<Self> {
        let key = |leaf: &str| if prefix.is_empty() { leaf.to_string() } else { format!("{prefix}.{leaf}") };
        let weight = if ckpt.get(&key("SCB")).is_some() {
            QuantWeight::Int8(ckpt.int8(prefix)?)
        } else if ckpt.has_nf(prefix) {
            QuantWeight::Nf(ckpt.nf(prefix)?)
        } else {
            QuantWeight::Block4(ckpt.quant4(prefix)?)
        };
        let bk = key("bias");
        let bias = match ckpt.get(&bk) {
            Some(t) => {
                let v = t.to_f32(&bk)?;
                let arr = ArrayD::from_shape_vec(IxDyn(t.shape()), v).map_err(|_| Error::Shape {
                    op: "QuantLinear::load",
                    lhs: t.shape().to_vec(),
                    rhs: vec![],
                })?;
                Some(Param::new(bk, arr, false))
            }
            None => None,
        };
        Self::new(weight, bias)
    }

    /// Stores the layer under module path `prefix` with bitsandbytes' keys (LQ-LoRA's NF-b storage, which has no
    /// bitsandbytes layout, under this crate's keys: [`Checkpoint::insert_nf`]); the bias is written in the 4-bit
    /// state's recorded dtype (bnb saves it in the layer dtype), f32 for int8 and NF-b.
    ///
    /// # Errors
    /// The checkpoint's errors (e.g. a `quant_storage` the packed bytes do not fit).
    pub fn save(&self, ckpt: &mut Checkpoint, prefix: &str) -> peft_core::Result<()> {
        let w = self.weight();
        let dtype = match w.as_ref() {
            QuantWeight::Block4(q) => {
                ckpt.insert_quant4(prefix, q)?;
                q.dtype()
            }
            QuantWeight::Int8(q) => {
                ckpt.insert_int8(prefix, q)?;
                FloatDtype::F32
            }
            QuantWeight::Nf(q) => {
                ckpt.insert_nf(prefix, q)?;
                FloatDtype::F32
            }
        };
        if let Some(b) = &self.bias {
            let v = b.value();
            let v = v.as_standard_layout();
            let t = RawTensor::from_f32_as(dtype, b.shape(), v.as_slice().expect("peft-rs bug: contiguous bias"))?;
            ckpt.insert(if prefix.is_empty() { "bias".to_string() } else { format!("{prefix}.bias") }, t);
        }
        Ok(())
    }

    /// The same layer with a fixed tile height (output rows dequantised at once per task; at least 1) instead of
    /// the automatic one.
    pub fn with_tile_rows(mut self, rows: usize) -> Self {
        self.tile_rows = Some(rows.max(1));
        self
    }

    /// Output rows dequantised at once per task for a batch of `m` input rows.
    pub fn tile_rows(&self, m: usize) -> usize {
        self.tile_rows.unwrap_or_else(|| auto_tile_rows(self.in_f, m))
    }

    /// A snapshot of the quantized weight.
    pub fn weight(&self) -> Arc<QuantWeight> {
        self.weight.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `x [m, in] · dequant(W)ᵀ -> [m, out]` (no bias), tiles in parallel.
    fn matmul_wt(w: &QuantWeight, x: &[f32], m: usize, out_f: usize, in_f: usize, tile: usize) -> Vec<f32> {
        let mut yt = vec![0f32; out_f * m];
        if m == 0 || out_f == 0 {
            return yt;
        }
        let xt = MatRef::row_major(x, m, in_f).t();
        yt.par_chunks_mut(tile * m).enumerate().for_each_init(Vec::new, |buf: &mut Vec<f32>, (t, dst)| {
            let rows = dst.len() / m;
            buf.resize(rows * in_f, 0.0);
            w.dequantize_rows_into(t * tile, in_f, &mut buf[..rows * in_f]);
            gemm(dst, MatRef::row_major(&buf[..rows * in_f], rows, in_f), xt, false);
        });
        if m == 1 {
            return yt;
        }
        let mut y = vec![0f32; m * out_f];
        y.par_chunks_mut(out_f).enumerate().for_each(|(i, row)| {
            for (o, v) in row.iter_mut().enumerate() {
                *v = yt[o * m + i];
            }
        });
        y
    }

    /// `g [m, out] · dequant(W) -> [m, in]`, tile by tile (each tile's dequantisation and GEMM run in parallel).
    fn grad_input(w: &QuantWeight, g: &[f32], m: usize, out_f: usize, in_f: usize, tile: usize) -> Vec<f32> {
        let mut gx = vec![0f32; m * in_f];
        if m == 0 || in_f == 0 {
            return gx;
        }
        let mut buf = vec![0f32; tile.min(out_f) * in_f];
        for (t, r0) in (0..out_f).step_by(tile).enumerate() {
            let rows = tile.min(out_f - r0);
            let b = &mut buf[..rows * in_f];
            let group = in_f * 8;
            b.par_chunks_mut(group).enumerate().for_each(|(i, chunk)| w.dequantize_rows_into(r0 + i * 8, in_f, chunk));
            let gv = MatRef { data: &g[r0..], rows: m, cols: rows, rs: out_f as isize, cs: 1 };
            gemm(&mut gx, gv, MatRef::row_major(b, rows, in_f), t > 0);
        }
        gx
    }
}

impl LinearBase for QuantLinear {
    fn forward(&self, x: &Tensor) -> peft_core::Result<Tensor> {
        let (out_f, in_f) = (self.out_f, self.in_f);
        let shape = x.shape().to_vec();
        if shape.last() != Some(&in_f) {
            return Err(Error::Shape { op: "quant_linear", lhs: shape, rhs: vec![out_f, in_f] });
        }
        let m = x.len() / in_f.max(1);
        let tile = self.tile_rows(m);
        let w = self.weight();
        let y = Self::matmul_wt(&w, x.as_slice(), m, out_f, in_f, tile);
        let mut out_shape = shape.clone();
        *out_shape.last_mut().expect("peft-rs bug: rank checked above") = out_f;
        let y = ArrayD::from_shape_vec(IxDyn(&out_shape), y).expect("peft-rs bug: quant_linear output size");
        let y = record("quant_linear", y, &[x], move |g, needs| {
            if !needs[0] {
                return vec![None];
            }
            let g = g.as_standard_layout();
            let gs = g.as_slice().expect("peft-rs bug: standard layout is contiguous");
            let gx = Self::grad_input(&w, gs, m, out_f, in_f, tile);
            vec![Some(ArrayD::from_shape_vec(IxDyn(&shape), gx).expect("peft-rs bug: quant_linear grad size"))]
        });
        match &self.bias {
            Some(b) => y.add(&b.tensor()),
            None => Ok(y),
        }
    }

    fn in_features(&self) -> usize {
        self.in_f
    }

    fn out_features(&self) -> usize {
        self.out_f
    }

    fn dense_weight(&self) -> peft_core::Result<ArrayD<f32>> {
        let w = self.weight().dequantize();
        Ok(ArrayD::from_shape_vec(IxDyn(&[self.out_f, self.in_f]), w).expect("peft-rs bug: dequantized weight size"))
    }

    fn bias(&self) -> Option<Param> {
        self.bias.clone()
    }

    /// Re-quantizes `dequant(W) + delta` with the current format (lossy; see the module docs).
    fn add_to_weight(&self, delta: &ArrayD<f32>) -> peft_core::Result<()> {
        if delta.shape() != [self.out_f, self.in_f] {
            return Err(Error::Shape { op: "merge", lhs: vec![self.out_f, self.in_f], rhs: delta.shape().to_vec() });
        }
        let mut guard = self.weight.write().unwrap_or_else(|p| p.into_inner());
        let mut w = guard.dequantize();
        let d = delta.as_standard_layout();
        for (a, b) in w.iter_mut().zip(d.iter()) {
            *a += b;
        }
        if w.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite { what: "merged quantized weight".into() });
        }
        let mut q = QuantWeight::quantize(&w, self.out_f, self.in_f, &guard.format())?;
        if let (QuantWeight::Block4(new), QuantWeight::Block4(old)) = (&mut q, guard.as_ref()) {
            *new = new.clone().with_dtype(old.dtype()).with_storage(old.storage());
        }
        *guard = Arc::new(q);
        Ok(())
    }

    /// The bias only: the quantized weight is not a trainable parameter.
    fn params(&self) -> Vec<Param> {
        self.bias.iter().cloned().collect()
    }

    /// Packed codes plus scales (and nested scales/offset), as held in memory.
    fn weight_bytes(&self) -> usize {
        self.weight().storage_bytes()
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// Replaces the base of every linear site of `model` selected by `spec` with a [`QuantLinear`] of `format`
/// (QLoRA: `TargetSpec` with `"all-linear"`, which skips the output layer, and NF4 + double quantisation).
/// Returns the quantized paths in visit order. A site that is already quantized is re-quantized from its
/// dequantised weight (lossy).
///
/// # Errors
/// [`Error::NoTargetMatched`] when nothing is selected; quantizer errors; [`Error::AdapterState`] for a site with
/// merged adapters.
pub fn quantize_linear_sites(
    model: &dyn Module,
    spec: &TargetSpec,
    format: &QuantFormat,
) -> peft_core::Result<Vec<String>> {
    let sites = linear_sites(model);
    let selected = spec.select(sites.iter().map(|s| (s.path(), s.is_output())))?;
    let mut done = Vec::with_capacity(selected.len());
    for site in sites.iter().filter(|s| selected.iter().any(|p| p == s.path())) {
        let q = QuantLinear::from_base(site.base().as_ref(), format)?;
        site.replace_base(Arc::new(q))?;
        done.push(site.path().to_string());
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block4::QuantType;
    use peft_core::nn::{Ctx, Dense, Linear, RandomInit, Visitor, WeightSource};
    use proptest::prelude::*;

    fn randn(seed: u64, shape: &[usize]) -> ArrayD<f32> {
        RandomInit::new(seed, 1.0).get("x", shape).unwrap()
    }

    fn formats() -> Vec<QuantFormat> {
        vec![
            QuantFormat::default(),
            QuantFormat::Block4(Quant4Config { quant_type: QuantType::Fp4, blocksize: 32, double_quant: false }),
            QuantFormat::Int8,
        ]
    }

    /// The quantized layer (tile 0 = automatic) and a dense twin holding exactly its dequantised weight (same
    /// bias param).
    fn pair(out_f: usize, in_f: usize, fmt: &QuantFormat, tile: usize, bias: bool) -> (QuantLinear, Dense) {
        let w = randn(1, &[out_f, in_f]);
        let b = bias.then(|| Param::new("l.bias", randn(2, &[out_f]), true));
        let q = QuantLinear::quantize(w.as_slice().unwrap(), out_f, in_f, b.clone(), fmt).unwrap();
        let q = if tile == 0 { q } else { q.with_tile_rows(tile) };
        let dense = Dense { weight: Param::new("l.weight", q.dense_weight().unwrap(), false), bias: b };
        (q, dense)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        peft_core::testing::max_abs_diff(a.as_slice(), b.as_slice())
    }

    /// Largest `|a − b| / bound` over the entries of two f32 results of `x [m, k] · w [n, k]ᵀ` summed in different
    /// orders (the tiled and the dense GEMM). Each is within `γ_k·Σ|x||w|` of the exact product (`γ_k = kε/(1−kε)`,
    /// the classical bound for any summation order), so their difference is within twice that: a ratio above 1
    /// is a real error, not rounding. `rows_x`/`rows_w`: the operands as rows of length `k`.
    fn rounding_ratio(a: &[f32], b: &[f32], rows_x: &[Vec<f32>], rows_w: &[Vec<f32>]) -> f64 {
        let k = rows_x.first().map_or(0, Vec::len) as f64;
        let eps = f64::from(f32::EPSILON) / 2.0;
        let gamma = k * eps / (1.0 - k * eps);
        let mut worst = 0.0f64;
        for (i, xr) in rows_x.iter().enumerate() {
            for (j, wr) in rows_w.iter().enumerate() {
                let s: f64 = xr.iter().zip(wr).map(|(x, w)| f64::from(x.abs()) * f64::from(w.abs())).sum();
                let bound = 2.0 * gamma * s + 1e-30;
                let idx = i * rows_w.len() + j;
                worst = worst.max(f64::from((a[idx] - b[idx]).abs()) / bound);
            }
        }
        worst
    }

    fn rows(a: &ArrayD<f32>, k: usize) -> Vec<Vec<f32>> {
        a.as_slice().unwrap().chunks(k.max(1)).map(<[f32]>::to_vec).collect()
    }

    /// A proptest find (sweep with `PEFT_PROPTEST_MULT=400`): FP4, 17 × 85, 3 inputs, 1-row tiles. The tiled and
    /// the dense GEMM sum 85 products in different orders; with |y| up to ~20 they differ by ~1e-5, more than the
    /// old fixed 1e-5, while staying well inside the summation-order bound.
    #[test]
    fn one_row_tiles_differ_from_the_dense_gemm_only_by_summation_order() {
        let fmt = QuantFormat::Block4(Quant4Config { quant_type: QuantType::Fp4, blocksize: 32, double_quant: false });
        let (q, dense) = pair(17, 85, &fmt, 1, false);
        let xa = randn(7, &[3, 85]);
        let x = Tensor::new(xa.clone());
        let (yq, yd) = (q.forward(&x).unwrap(), dense.forward(&x).unwrap());
        let w = q.dense_weight().unwrap();
        let ratio = rounding_ratio(yq.as_slice(), yd.as_slice(), &rows(&xa, 85), &rows(&w, 85));
        assert!(ratio <= 1.0, "beyond the summation-order bound: {ratio}");
    }

    #[test]
    fn forward_equals_dequantize_then_dense_forward() {
        for fmt in formats() {
            // 150 inputs: 4-bit blocks of 32/64 cross row boundaries; tiles of 8 rows leave a ragged last tile.
            let (q, dense) = pair(37, 150, &fmt, 8, true);
            for shape in [vec![4, 150], vec![2, 3, 150], vec![1, 150], vec![150]] {
                let x = Tensor::new(randn(3, &shape));
                let (yq, yd) = (q.forward(&x).unwrap(), dense.forward(&x).unwrap());
                assert_eq!(yq.shape(), yd.shape());
                assert!(max_diff(&yq, &yd) < 1e-5, "{fmt:?} {shape:?}: {}", max_diff(&yq, &yd));
            }
            // Automatic tiles: 300 rows of 64 inputs make a 256-row tile and a 44-row remainder.
            let (q, dense) = pair(300, 64, &fmt, 0, false);
            assert_eq!((q.tile_rows(1), q.tile_rows(5)), (256, 256));
            let x = Tensor::new(randn(3, &[5, 64]));
            assert!(max_diff(&q.forward(&x).unwrap(), &dense.forward(&x).unwrap()) < 1e-5);
        }
    }

    #[test]
    fn input_and_bias_gradients_equal_the_dense_path_and_the_weight_gets_none() {
        for fmt in formats() {
            let (q, dense) = pair(29, 96, &fmt, 5, true);
            let xa = randn(4, &[3, 96]);
            let seed = randn(5, &[3, 29]);
            let run = |base: &dyn LinearBase| {
                let x = Tensor::var(xa.clone());
                let y = base.forward(&x).unwrap();
                let g = y.backward_with(seed.clone()).unwrap();
                let bias = base.bias().unwrap();
                (g.get(&x).unwrap().clone(), g.get_id(bias.id()).unwrap().clone(), g.len())
            };
            let (gq, bq, nq) = run(&q);
            let (gd, bd, _) = run(&dense);
            let d = gq.iter().zip(gd.iter()).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(d < 1e-5, "{fmt:?}: input gradient differs by {d}");
            assert_eq!(bq, bd);
            assert_eq!(nq, 2, "only the input and the bias receive gradients");
            assert_eq!(q.params().len(), 1);
        }
    }

    #[test]
    fn frozen_layer_builds_no_graph_for_a_constant_input() {
        let (q, _) = pair(8, 64, &QuantFormat::default(), 4, false);
        let y = q.forward(&Tensor::new(randn(6, &[2, 64]))).unwrap();
        assert!(!y.tracks());
    }

    proptest! {
        #![proptest_config(peft_core::testing::proptest_config(16))]

        #[test]
        fn tiled_forward_matches_dense_for_random_shapes_and_tiles(
            out_f in 1usize..70, in_f in 1usize..90, m in 0usize..5, tile in 1usize..40, nf4 in any::<bool>()
        ) {
            let qt = if nf4 { QuantType::Nf4 } else { QuantType::Fp4 };
            let fmt = QuantFormat::Block4(Quant4Config { quant_type: qt, blocksize: 32, double_quant: nf4 });
            let (q, dense) = pair(out_f, in_f, &fmt, tile, false);
            let xa = randn(7, &[m, in_f]);
            let x = Tensor::var(xa.clone());
            let (yq, yd) = (q.forward(&x).unwrap(), dense.forward(&x).unwrap());
            let w = q.dense_weight().unwrap();
            let ratio = rounding_ratio(yq.as_slice(), yd.as_slice(), &rows(&xa, in_f), &rows(&w, in_f));
            prop_assert!(ratio <= 1.0, "forward beyond the summation-order bound: {}", ratio);
            if m > 0 {
                let gq = yq.sum_all().backward().unwrap().get(&x).unwrap().clone();
                let gd = yd.sum_all().backward().unwrap().get(&x).unwrap().clone();
                // dx = 1 · W: sums over the output rows, i.e. ones [m, out] times the columns of W.
                let wt = rows(&w.t().as_standard_layout().to_owned().into_dyn(), out_f);
                let ones = vec![vec![1.0f32; out_f]; m];
                let ratio = rounding_ratio(gq.as_slice().unwrap(), gd.as_slice().unwrap(), &ones, &wt);
                prop_assert!(ratio <= 1.0, "gradient beyond the summation-order bound: {}", ratio);
            }
        }
    }

    #[test]
    fn merging_requantizes_within_the_rounding_bound_and_rejects_bad_deltas() {
        let (q, _) =
            pair(16, 64, &QuantFormat::Block4(Quant4Config { double_quant: false, ..Default::default() }), 4, false);
        let w0 = q.dense_weight().unwrap();
        let bytes0 = q.weight_bytes();
        // A zero delta reproduces the same codes and scales (no double quantisation).
        let before = q.weight();
        q.add_to_weight(&ArrayD::zeros(IxDyn(&[16, 64]))).unwrap();
        assert_eq!(*q.weight(), *before);
        let delta = randn(8, &[16, 64]).mapv(|v| 0.1 * v);
        q.add_to_weight(&delta).unwrap();
        let w1 = q.dense_weight().unwrap();
        let target = &w0 + &delta;
        let half_gap = 0.5 * crate::codes::max_gap(QuantType::Nf4.table());
        for (blk_t, blk_w) in target.as_slice().unwrap().chunks(64).zip(w1.as_slice().unwrap().chunks(64)) {
            let absmax = blk_t.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in blk_t.iter().zip(blk_w) {
                assert!((a - b).abs() <= half_gap * absmax * 1.0001);
            }
        }
        assert_eq!(q.weight_bytes(), bytes0);
        let snapshot = q.weight();
        assert!(matches!(q.add_to_weight(&ArrayD::zeros(IxDyn(&[64, 16]))), Err(Error::Shape { .. })));
        let nan = ArrayD::from_elem(IxDyn(&[16, 64]), f32::NAN);
        assert!(matches!(q.add_to_weight(&nan), Err(Error::NonFinite { .. })));
        assert_eq!(*q.weight(), *snapshot, "a failed merge leaves the weight untouched");
    }

    #[test]
    fn weight_bytes_are_the_bytes_actually_held() {
        let w = randn(9, &[64, 256]);
        let s = w.as_slice().unwrap();
        let nf4dq = QuantLinear::quantize(s, 64, 256, None, &QuantFormat::default()).unwrap();
        // 8192 packed + 256 u8 codes + 1 nested f32 + 4 offset.
        assert_eq!(nf4dq.weight_bytes(), 8192 + 256 + 4 + 4);
        let plain = Quant4Config { double_quant: false, ..Default::default() };
        let nf4 = QuantLinear::quantize(s, 64, 256, None, &QuantFormat::Block4(plain)).unwrap();
        assert_eq!(nf4.weight_bytes(), 8192 + 256 * 4);
        let int8 = QuantLinear::quantize(s, 64, 256, None, &QuantFormat::Int8).unwrap();
        assert_eq!(int8.weight_bytes(), 64 * 256 + 64 * 4);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let (q, _) = pair(8, 64, &QuantFormat::default(), 4, false);
        assert!(matches!(q.forward(&Tensor::zeros(&[2, 63])), Err(Error::Shape { .. })));
        assert!(matches!(q.forward(&Tensor::scalar(1.0)), Err(Error::Shape { .. })));
        let w = QuantWeight::quantize(&[0.5; 64], 8, 8, &QuantFormat::default()).unwrap();
        let bias = Param::new("b", ArrayD::zeros(IxDyn(&[7])), false);
        assert!(matches!(QuantLinear::new(w, Some(bias)), Err(Error::Shape { .. })));
        let flat = Quant4::quantize(&[0.5; 64], &[64], &Quant4Config::default()).unwrap();
        assert!(matches!(QuantLinear::new(QuantWeight::Block4(flat), None), Err(Error::Shape { .. })));
        let r = QuantLinear::quantize(
            &[0.5; 64],
            8,
            8,
            None,
            &QuantFormat::Block4(Quant4Config { blocksize: 48, ..Default::default() }),
        );
        let e = r.err().unwrap();
        assert!(matches!(crate::QuantError::of(&e), Some(crate::QuantError::Blocksize(48))), "{e}");
    }

    struct Toy {
        q: Linear,
        v: Linear,
        head: Linear,
    }
    impl Module for Toy {
        fn visit(&self, v: &mut dyn Visitor) {
            self.q.visit(v);
            self.v.visit(v);
            self.head.visit(v);
        }
    }

    #[test]
    fn quantizing_all_linear_sites_skips_the_output_layer_and_keeps_outputs_close() {
        let src = RandomInit::new(11, 0.05);
        let toy = Toy {
            q: Linear::load("layers.0.attn.q_proj", 64, 64, true, &src).unwrap(),
            v: Linear::load("layers.0.attn.v_proj", 64, 64, false, &src).unwrap(),
            head: Linear::load("lm_head", 64, 10, false, &src).unwrap().as_output(),
        };
        let x = Tensor::new(randn(12, &[3, 64]));
        let y0 = toy.q.forward(&x, &Ctx::eval()).unwrap();
        let bias_id = toy.q.base().bias().unwrap().id();
        let spec =
            TargetSpec::new(&peft_core::adapter::ModulePattern::Regex("all-linear".into()), None, None, None, &[])
                .unwrap();
        let done = quantize_linear_sites(&toy, &spec, &QuantFormat::default()).unwrap();
        assert_eq!(done, vec!["layers.0.attn.q_proj", "layers.0.attn.v_proj"]);
        assert_eq!(toy.head.base().weight_bytes(), 64 * 10 * 4, "lm_head stays dense");
        assert_eq!(toy.q.base().weight_bytes(), 64 * 64 / 2 + 64 + 4 + 4);
        assert_eq!(toy.q.base().bias().unwrap().id(), bias_id, "the bias parameter is kept");
        let y1 = toy.q.forward(&x, &Ctx::eval()).unwrap();
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
        let diff: Vec<f32> = y0.as_slice().iter().zip(y1.as_slice()).map(|(a, b)| a - b).collect();
        let rel = norm(&diff) / norm(y0.as_slice());
        assert!(rel < 0.15, "NF4 output relative error {rel}");
        let none = TargetSpec::names(["k_proj"]).unwrap();
        assert!(matches!(
            quantize_linear_sites(&toy, &none, &QuantFormat::default()),
            Err(Error::NoTargetMatched { .. })
        ));
    }
}
