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

use crate::block4::{Absmax, Quant4, Quant4Config};
use crate::int8::Int8Rows;

/// How to quantize a dense weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantFormat {
    /// bitsandbytes 4-bit (NF4/FP4, blocksize, double quantisation).
    Block4(Quant4Config),
    /// Row-wise int8 absmax (LLM.int8() without outliers).
    Int8,
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
        }
    }

    /// Dequantises rows `r0 .. r0 + out.len() / cols` into `out` (a caller bug panics).
    pub fn dequantize_rows_into(&self, r0: usize, cols: usize, out: &mut [f32]) {
        match self {
            QuantWeight::Block4(q) => q.dequantize_range_into(r0 * cols, out),
            QuantWeight::Int8(q) => q.dequantize_rows_into(r0, out),
        }
    }

    /// The whole weight, dequantised in f32.
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            QuantWeight::Block4(q) => q.dequantize(),
            QuantWeight::Int8(q) => q.dequantize(),
        }
    }

    /// Bytes held (codes and scales).
    pub fn storage_bytes(&self) -> usize {
        match self {
            QuantWeight::Block4(q) => q.storage_bytes(),
            QuantWeight::Int8(q) => q.storage_bytes(),
        }
    }
}

/// Default tile: about 256 K f32 (1 MiB) of dequantised weight per thread, 16..=256 rows.
fn default_tile_rows(in_f: usize) -> usize {
    ((256 * 1024) / in_f.max(1)).clamp(16, 256)
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
    tile_rows: usize,
}

impl QuantLinear {
    /// A base over a quantized `[out, in]` weight and an optional `[out]` bias.
    ///
    /// # Errors
    /// [`Error::Shape`] when the weight is not 2-D or the bias is not `[out]`.
    pub fn new(weight: QuantWeight, bias: Option<Param>) -> peft_core::Result<Self> {
        let Some((out_f, in_f)) = weight.dims() else {
            let shape = match &weight {
                QuantWeight::Block4(q) => q.shape().to_vec(),
                QuantWeight::Int8(q) => vec![q.rows(), q.cols()],
            };
            return Err(Error::Shape { op: "QuantLinear::new", lhs: shape, rhs: vec![0, 0] });
        };
        if let Some(b) = &bias {
            if b.shape() != [out_f] {
                return Err(Error::Shape { op: "QuantLinear::new", lhs: b.shape(), rhs: vec![out_f] });
            }
        }
        Ok(QuantLinear { weight: RwLock::new(Arc::new(weight)), bias, out_f, in_f, tile_rows: default_tile_rows(in_f) })
    }

    /// Quantizes a row-major `[out, in]` weight.
    ///
    /// # Errors
    /// Quantizer errors (as [`Error::Invalid`] / [`Error::NonFinite`]); shape errors as [`QuantLinear::new`].
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

    /// The same layer with another tile height (output rows dequantised at once per task; at least 1).
    pub fn with_tile_rows(mut self, rows: usize) -> Self {
        self.tile_rows = rows.max(1);
        self
    }

    /// Output rows dequantised at once per task.
    pub fn tile_rows(&self) -> usize {
        self.tile_rows
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
        let (out_f, in_f, tile) = (self.out_f, self.in_f, self.tile_rows);
        let shape = x.shape().to_vec();
        if shape.last() != Some(&in_f) {
            return Err(Error::Shape { op: "quant_linear", lhs: shape, rhs: vec![out_f, in_f] });
        }
        let m = x.len() / in_f.max(1);
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
}

/// Replaces the base of every linear site of `model` selected by `spec` with a [`QuantLinear`] of `format`
/// (QLoRA: `TargetSpec` with `"all-linear"`, which skips the output layer, and NF4 + double quantisation).
/// Returns the quantized paths in visit order. A site that is already quantized is re-quantized from its
/// dequantised weight (lossy).
///
/// # Errors
/// [`Error::NoTargetMatched`] when nothing is selected; quantizer errors; [`Error::Invalid`] for a site with
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
