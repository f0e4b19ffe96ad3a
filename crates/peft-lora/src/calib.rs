//! Calibration statistics for data-driven inits (spec §1.7): a recording adapter that sees the inputs of the
//! target linear sites while calibration batches run, and a helper that accumulates the gradient of frozen dense
//! weights (LoRA-SB).
//!
//! The recorder is a [`LinearAdapter`] named [`RECORDER`] that adds nothing to the site output and keeps running
//! statistics of the rows of its input `x [.., in]` (flattened to `[n, in]`; rows marked as padding by the
//! [`peft_core::nn::TokenMask`] in the context are left out, so run calibration batches in
//! [`peft_core::train::calibration_ctx`]; with a label mask value, rows whose [`peft_core::nn::TokenLabels`] equal it
//! are left out too):
//! - [`RecordMode::Moments`]: row count, `Σ x` and `XᵀX` (f64), enough for an exact streaming PCA (EVA);
//! - [`RecordMode::CordaCovariance`]: CorDA's covariance, per forward call (one calibration sample)
//!   `C += (X/|max X|)ᵀ(X/|max X|)`, where `max X` is the largest *element* (not the max-abs), as CorDA does.

use std::sync::{Arc, Mutex};

use ndarray::{Array1, Array2, ArrayD, Ix2};
use peft_core::autograd::no_grad;
use peft_core::nn::{Ctx, Linear, LinearAdapter, LinearBase, TokenLabels};
use peft_core::{Error, Param, Result, Tensor};

/// The name the recorder is attached under.
pub const RECORDER: &str = "__calibration_recorder__";

/// What the recorder accumulates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordMode {
    /// Row count, row sum and `XᵀX` over all rows.
    Moments,
    /// CorDA's per-sample max-normalised `XᵀX`.
    CordaCovariance,
}

/// The statistics one site has seen.
#[derive(Clone, Debug)]
pub struct InputStats {
    /// Rows (tokens) seen.
    pub rows: usize,
    /// Forward calls (calibration samples) seen.
    pub samples: usize,
    /// `Σ x` over rows (zero in CorDA mode).
    pub sum: Array1<f64>,
    /// `XᵀX` (Moments) or the max-normalised sum (CorDA), `[in, in]`.
    pub xtx: Array2<f64>,
    /// True once a non-finite input (or a zero max element in CorDA mode) was seen.
    pub nonfinite: bool,
}

impl InputStats {
    fn new(d: usize) -> Self {
        InputStats { rows: 0, samples: 0, sum: Array1::zeros(d), xtx: Array2::zeros((d, d)), nonfinite: false }
    }

    /// The mean-centred sample covariance `(XᵀX − n·μμᵀ)/(n − 1)` (Moments mode; `n ≥ 2`).
    pub fn centered_covariance(&self) -> Array2<f64> {
        let n = self.rows as f64;
        let mu = &self.sum / n.max(1.0);
        let mut c = self.xtx.clone();
        let d = mu.len();
        for i in 0..d {
            for j in 0..d {
                c[[i, j]] -= n * mu[i] * mu[j];
            }
        }
        c / (n - 1.0).max(1.0)
    }
}

struct Recorder {
    mode: RecordMode,
    label_mask: Option<i64>,
    stats: Mutex<InputStats>,
}

impl Recorder {
    /// Records the rows of `x`; with a token mask in `ctx` that covers them, padding rows are left out, and with a
    /// label mask value and token labels in `ctx` that cover them, rows with that label too.
    fn record(&self, x: &Tensor, ctx: &Ctx) -> Result<()> {
        let d = self.stats.lock().unwrap_or_else(|p| p.into_inner()).sum.len();
        let n = x.shape().iter().product::<usize>() / d.max(1);
        let rows = x.data().to_owned().into_shape_with_order((n, d)).map_err(|_| Error::Shape {
            op: "calibration",
            lhs: x.shape().to_vec(),
            rhs: vec![d],
        })?;
        let valid = ctx.token_mask().and_then(|m| m.flags_for(n));
        let labels = self.label_mask.and_then(|v| Some((v, ctx.get::<TokenLabels>()?.labels_for(n)?)));
        let rows = if valid.is_some() || labels.is_some() {
            let keep: Vec<usize> =
                (0..n).filter(|&i| valid.is_none_or(|f| f[i]) && labels.is_none_or(|(v, l)| l[i] != v)).collect();
            rows.select(ndarray::Axis(0), &keep)
        } else {
            rows
        };
        let n = rows.nrows();
        if n == 0 {
            return Ok(());
        }
        let mut xs = rows.mapv(f64::from);
        let mut st = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if xs.iter().any(|v| !v.is_finite()) {
            st.nonfinite = true;
            return Ok(());
        }
        st.rows += n;
        st.samples += 1;
        match self.mode {
            RecordMode::Moments => {
                st.sum += &xs.sum_axis(ndarray::Axis(0));
            }
            RecordMode::CordaCovariance => {
                let mx = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max).abs();
                if mx == 0.0 || !mx.is_finite() {
                    st.nonfinite = true;
                    return Ok(());
                }
                xs /= mx;
            }
        }
        st.xtx += &xs.t().dot(&xs);
        Ok(())
    }
}

impl LinearAdapter for Recorder {
    fn name(&self) -> &str {
        RECORDER
    }
    fn kind(&self) -> &str {
        "calibration-recorder"
    }
    fn delta(&self, x: &Tensor, _base_out: &Tensor, _base: &dyn LinearBase, ctx: &Ctx) -> Result<Option<Tensor>> {
        self.record(x, ctx)?;
        Ok(None)
    }
    fn params(&self) -> Vec<Param> {
        Vec::new()
    }
    fn delta_weight(&self, _base: &dyn LinearBase) -> Result<Option<ArrayD<f32>>> {
        Ok(None)
    }
}

/// Recorders attached to a set of sites; detached (and the previous active sets restored) on
/// [`Calibration::finish`] or drop.
pub struct Calibration {
    sites: Vec<(Linear, Arc<Recorder>, Vec<String>)>,
}

impl Calibration {
    /// Attaches a recorder in `mode` to every site in `sites` (keeping their active adapters active).
    ///
    /// # Errors
    /// [`Error::AdapterState`] when a site already carries a recorder.
    pub fn attach(sites: &[Linear], mode: RecordMode) -> Result<Self> {
        Self::attach_masked(sites, mode, None)
    }

    /// As [`Calibration::attach`]; with `label_mask = Some(v)`, rows whose token label in the context's
    /// [`TokenLabels`] is `v` are left out (EVA's `use_label_mask`).
    ///
    /// # Errors
    /// As [`Calibration::attach`].
    pub fn attach_masked(sites: &[Linear], mode: RecordMode, label_mask: Option<i64>) -> Result<Self> {
        let mut me = Calibration { sites: Vec::new() };
        for s in sites {
            let rec = Arc::new(Recorder { mode, label_mask, stats: Mutex::new(InputStats::new(s.in_features())) });
            let prev = s.active();
            s.attach(rec.clone())?;
            let mut act: Vec<&str> = prev.iter().map(String::as_str).collect();
            act.push(RECORDER);
            s.set_active(&act);
            me.sites.push((s.clone(), rec, prev));
        }
        Ok(me)
    }

    /// A snapshot of the statistics, in site order.
    pub fn stats(&self) -> Vec<InputStats> {
        self.sites.iter().map(|(_, r, _)| r.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()).collect()
    }

    /// Detaches the recorders and returns the final statistics, in site order.
    ///
    /// # Errors
    /// Detach errors (none in practice).
    pub fn finish(mut self) -> Result<Vec<InputStats>> {
        let out = self.stats();
        self.detach()?;
        Ok(out)
    }

    fn detach(&mut self) -> Result<()> {
        for (s, _, prev) in self.sites.drain(..) {
            s.detach(RECORDER)?;
            s.set_active(&prev.iter().map(String::as_str).collect::<Vec<_>>());
        }
        Ok(())
    }
}

impl Drop for Calibration {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}

/// The error for a calibration source that yields no batch.
pub fn empty_calibration(method: &str) -> Error {
    crate::LoraError::EmptyCalibration { method: method.to_string() }.into()
}

/// Runs calibration batches `0, 1, ..` forward without recording a graph, calling `after(i)` after each; stops
/// when `calib` is exhausted, after `max` batches, or when `after` returns true. Returns the batch count.
///
/// # Errors
/// [`empty_calibration`] when the first batch is missing; errors of `calib` and `after`.
pub fn run_forward(
    method: &str,
    calib: &mut dyn FnMut(usize) -> Result<Option<Tensor>>,
    max: Option<usize>,
    mut after: impl FnMut(usize) -> Result<bool>,
) -> Result<usize> {
    let mut i = 0;
    while max.is_none_or(|m| i < m) {
        if no_grad(|| calib(i))?.is_none() {
            break;
        }
        i += 1;
        if after(i - 1)? {
            break;
        }
    }
    if i == 0 {
        return Err(empty_calibration(method));
    }
    Ok(i)
}

/// The dense `[out, in]` weight parameter of a site's base.
///
/// # Errors
/// [`crate::LoraError::NoDenseWeight`] when the base exposes no such parameter (a quantised base).
pub fn weight_param(site: &Linear) -> Result<Param> {
    let (o, i) = (site.out_features(), site.in_features());
    site.base()
        .params()
        .into_iter()
        .find(|p| p.shape() == [o, i])
        .ok_or_else(|| crate::LoraError::NoDenseWeight { site: site.path().to_string() }.into())
}

/// Sums `∂L/∂W` of every site's dense weight over calibration batches `0..max` (or until exhausted): the weights
/// are made trainable for the duration, `backward` runs on each loss, and the trainable flags are restored
/// (also on error). Returns the summed gradients `[out, in]` in f64 and the batch count.
///
/// # Errors
/// [`empty_calibration`]; [`weight_param`] errors; errors of `calib` and `backward`.
pub fn accumulate_weight_grads(
    method: &str,
    sites: &[Linear],
    calib: &mut dyn FnMut(usize) -> Result<Option<Tensor>>,
    max: usize,
) -> Result<(Vec<Array2<f64>>, usize)> {
    let ws: Vec<Param> = sites.iter().map(weight_param).collect::<Result<_>>()?;
    let flags: Vec<bool> = ws.iter().map(Param::trainable).collect();
    for w in &ws {
        w.set_trainable(true);
    }
    let result = (|| {
        let mut acc: Vec<Array2<f64>> = ws
            .iter()
            .map(|w| {
                let s = w.shape();
                Array2::zeros((s[0], s[1]))
            })
            .collect();
        let mut n = 0;
        while n < max {
            let Some(loss) = calib(n)? else { break };
            let grads = loss.backward()?;
            drop(loss);
            for (a, w) in acc.iter_mut().zip(&ws) {
                if let Some(g) = grads.get_id(w.id()) {
                    let g = g.view().into_dimensionality::<Ix2>().map_err(|_| Error::Shape {
                        op: "calibration",
                        lhs: g.shape().to_vec(),
                        rhs: w.shape(),
                    })?;
                    a.zip_mut_with(&g, |x, &y| *x += f64::from(y));
                }
            }
            n += 1;
        }
        if n == 0 {
            return Err(empty_calibration(method));
        }
        Ok((acc, n))
    })();
    for (w, f) in ws.iter().zip(flags) {
        w.set_trainable(f);
    }
    result
}

/// `Regex`-escapes `s` (PEFT's `rank_pattern` keys are regexes; a full site path must match literally).
pub fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{input, Tiny};

    #[test]
    fn recorder_adds_zero_and_collects_exact_moments() {
        let model = Tiny::new(4, 1, 0);
        let site = model.layers[0][0].clone();
        let x = input(5, 4, 1);
        let y0 = site.forward(&x, &Ctx::eval()).unwrap().to_vec();
        let cal = Calibration::attach(std::slice::from_ref(&site), RecordMode::Moments).unwrap();
        assert_eq!(site.forward(&x, &Ctx::eval()).unwrap().to_vec(), y0);
        let st = cal.finish().unwrap();
        assert!(site.adapters().is_empty());
        let xs = x.data().to_owned().into_dimensionality::<Ix2>().unwrap().mapv(f64::from);
        assert_eq!(st[0].rows, 5);
        assert!((&st[0].xtx - &xs.t().dot(&xs)).iter().all(|v| v.abs() < 1e-9));
    }

    /// Audit item: calibration counted padding tokens. Rows the token mask marks as padding are left out.
    #[test]
    fn recorder_skips_padding_rows_of_the_token_mask() {
        let model = Tiny::new(4, 1, 0);
        let site = model.layers[0][0].clone();
        let x = input(6, 4, 2).reshape(&[2, 3, 4]).unwrap();
        let cal = Calibration::attach(std::slice::from_ref(&site), RecordMode::Moments).unwrap();
        let ctx = peft_core::train::calibration_ctx(Some(peft_core::nn::TokenMask::from_lengths(&[3, 1], 3)));
        site.forward(&x, &ctx).unwrap();
        let st = cal.finish().unwrap();
        assert_eq!(st[0].rows, 4, "3 real tokens in row 0, 1 in row 1");
        let xs = x.data().to_owned().into_shape_with_order((6, 4)).unwrap().mapv(f64::from);
        let kept = xs.select(ndarray::Axis(0), &[0, 1, 2, 3]);
        assert!((&st[0].xtx - &kept.t().dot(&kept)).iter().all(|v| v.abs() < 1e-9));
    }

    #[test]
    fn corda_covariance_divides_by_the_largest_element() {
        let site = Linear::load("s", 2, 2, false, &peft_core::nn::RandomInit::new(0, 0.1)).unwrap();
        let cal = Calibration::attach(std::slice::from_ref(&site), RecordMode::CordaCovariance).unwrap();
        // max element 2 (not max-abs 4): X/2 = [[1, -2]] → XᵀX = [[1, -2], [-2, 4]].
        let x = Tensor::new(ndarray::arr2(&[[2.0f32, -4.0]]).into_dyn());
        site.forward(&x, &Ctx::eval()).unwrap();
        let st = cal.finish().unwrap();
        assert_eq!(st[0].xtx, ndarray::arr2(&[[1.0, -2.0], [-2.0, 4.0]]));
    }

    #[test]
    fn empty_calibration_is_a_typed_error() {
        let e = run_forward("x", &mut |_| Ok(None), None, |_| Ok(false)).unwrap_err();
        assert!(matches!(crate::LoraError::of(&e), Some(crate::LoraError::EmptyCalibration { .. })), "{e}");
        let model = Tiny::new(4, 1, 0);
        let e = accumulate_weight_grads("x", &[model.layers[0][0].clone()], &mut |_| Ok(None), 3).unwrap_err();
        assert!(matches!(crate::LoraError::of(&e), Some(crate::LoraError::EmptyCalibration { .. })), "{e}");
        assert!(!model.layers[0][0].base().params()[0].trainable());
    }

    #[test]
    fn regex_escape_escapes_dots() {
        assert_eq!(regex_escape("a.b_0"), "a\\.b_0");
    }
}
