//! `LoraLinear`: one LoRA (or DoRA) adapter on one linear site, with PEFT's initialisations (Kaiming/zero,
//! Gaussian, PiSSA, OLoRA) and exact merge/unmerge.
//!
//! Forward (PEFT `lora.Linear.forward`): `y = base(x) + s · B(A(dropout(x)))` with `s = alpha / r` (or
//! `alpha / √r` for rsLoRA); with `lora_bias`, `B` carries a bias `c` (`s·(B·A·x + c)`; merging adds `s·c` to the
//! base bias).
//!
//! DoRA (PEFT `DoraLinearLayer.forward`): with `V = W + s·B·A` and the row norms `‖V‖` **detached** (treated as a
//! constant, as PEFT does to save memory, following §4.3 of the DoRA paper), `f = m / ‖V‖` and
//! `base₀ = W·dropout(x)` (the base output without bias), the adapter adds
//! `(f − 1) ⊙ base₀ + f ⊙ s·B·A·dropout(x) = f ⊙ (base₀ + s·B·A·x') − base₀`, so without dropout
//! `y = f ⊙ (V·x) + b`: exactly the merged weight `f ⊙ V` with the bias untouched.

use std::sync::Mutex;

use ndarray::{s, Array1, Array2, ArrayD, Axis, Ix2};
use peft_core::nn::{Ctx, LinearAdapter, LinearBase};
use peft_core::{Error, Param, Result, Tensor};
use rand::Rng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::config::Init;

/// Hyper-parameters of one adapter at one site.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraSpec {
    /// Rank.
    pub r: usize,
    /// `lora_alpha` at this site.
    pub alpha: f64,
    /// rsLoRA scaling.
    pub use_rslora: bool,
    /// Input dropout probability in training.
    pub dropout: f64,
    /// Initialisation.
    pub init: Init,
    /// DoRA magnitude vector.
    pub use_dora: bool,
    /// A trainable bias on `lora_B` (PEFT's `lora_bias`; merged into the base bias).
    pub lora_bias: bool,
}

impl LoraSpec {
    /// `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// A LoRA/DoRA adapter on one linear site. Parameters are named `<site>.lora_A.<name>.weight` `[r, in]`,
/// `<site>.lora_B.<name>.weight` `[out, r]`, (DoRA) `<site>.lora_magnitude_vector.<name>.weight` `[out]` and
/// (`lora_bias`) `<site>.lora_B.<name>.bias` `[out]`.
pub struct LoraLinear {
    name: String,
    spec: LoraSpec,
    scaling: f64,
    a: Param,
    b: Param,
    magnitude: Option<Param>,
    /// `lora_B`'s bias (`lora_bias`), scaled by `s` like the rest of the adapter output.
    bias: Option<Param>,
    /// Row norms used by the last DoRA merge (PEFT caches `<name>-weight_norm` the same way), for exact unmerge.
    merge_norm: Mutex<Option<Array1<f32>>>,
    /// `(A₀, B₀)` of a base-mutating init (PiSSA/OLoRA), for converting the trained adapter to plain LoRA.
    initial: Option<(ArrayD<f32>, ArrayD<f32>)>,
}

fn mat(a: &ArrayD<f32>) -> Result<ndarray::ArrayView2<'_, f32>> {
    a.view().into_dimensionality::<Ix2>().map_err(|_| {
        crate::LoraError::NotMatrix {
            method: "lora",
            what: "weight".into(),
            expected: "a matrix",
            shape: a.shape().to_vec(),
        }
        .into()
    })
}

/// Row norms of a `[out, in]` matrix, accumulated in f64.
fn row_norms(w: &Array2<f32>) -> Array1<f32> {
    w.map_axis(Axis(1), |r| r.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt() as f32)
}

impl LoraLinear {
    /// Creates the adapter `name` for `base` (the site's current base) with `spec`. PiSSA and OLoRA rewrite the
    /// base weight (`W ← W − s·B·A`) so that the model output is unchanged at init; the caller must make sure no
    /// other adapter is merged into this base.
    ///
    /// # Errors
    /// [`crate::LoraError::Rank`] for `r = 0` or a PiSSA/OLoRA rank above `min(out, in)`, [`crate::LoraError::Incompatible`]
    /// for `lora_bias` with DoRA or a data-driven init; errors of a base that cannot absorb the
    /// residual; linear-algebra errors.
    pub fn new(path: &str, name: &str, base: &dyn LinearBase, spec: LoraSpec, rng: &mut impl Rng) -> Result<Self> {
        let (in_f, out_f, r) = (base.in_features(), base.out_features(), spec.r);
        if r == 0 {
            crate::error::fail!(crate::LoraError::Rank { method: "lora", site: path.into(), r, max: in_f.min(out_f) });
        }
        if spec.lora_bias && (spec.use_dora || !matches!(spec.init, Init::Default | Init::Random | Init::Gaussian)) {
            crate::error::fail!(crate::LoraError::Incompatible {
                method: "lora",
                site: path.into(),
                what: "lora_bias",
                with: "DoRA or an init other than true, false or gaussian",
            });
        }
        let scaling = spec.scaling();
        let kaiming = |fan_in: usize, shape: (usize, usize), rng: &mut dyn rand::RngCore| {
            // torch.nn.init.kaiming_uniform_(a=√5): bound = gain·√(3/fan_in) with gain = √(2/(1+5)) → 1/√fan_in.
            let bound = 1.0 / (fan_in as f32).sqrt();
            let u = Uniform::new_inclusive(-bound, bound);
            Array2::from_shape_fn(shape, |_| u.sample(rng))
        };
        let mut initial = None;
        let (a, b) = match spec.init {
            Init::Default => (kaiming(in_f, (r, in_f), rng), Array2::zeros((out_f, r))),
            Init::Random => (kaiming(in_f, (r, in_f), rng), kaiming(r, (out_f, r), rng)),
            Init::Gaussian => {
                let n = Normal::new(0.0f32, 1.0 / r as f32).map_err(|_| {
                    Error::arg("lora", "gaussian init std (1/r)", 1.0 / r as f32, "must be finite and > 0")
                })?;
                (Array2::from_shape_fn((r, in_f), |_| n.sample(rng)), Array2::zeros((out_f, r)))
            }
            Init::Pissa { .. } | Init::Olora => {
                if r > in_f.min(out_f) {
                    crate::error::fail!(crate::LoraError::Rank {
                        method: if matches!(spec.init, Init::Olora) { "olora" } else { "pissa" },
                        site: path.into(),
                        r,
                        max: in_f.min(out_f),
                    });
                }
                let w = base.dense_weight()?.mapv(f64::from);
                let (a, b) = if matches!(spec.init, Init::Olora) {
                    // PEFT olora_init: Q, R = qr(W); A = R[:r], B = Q[:, :r].
                    let (q, rr) = peft_core::linalg::qr(&w)?;
                    (rr.slice(s![..r, ..]).mapv(|v| v as f32), q.slice(s![.., ..r]).mapv(|v| v as f32))
                } else {
                    // PEFT pissa_init: U, S, Vh = svd(W); S_r /= scaling; A = diag(√S_r)·Vh_r; B = U_r·diag(√S_r).
                    let (u, sv, vt) = peft_core::linalg::svd(&w)?;
                    let sq: Array1<f64> = sv.slice(s![..r]).mapv(|x| (x / scaling).sqrt());
                    let a = Array2::from_shape_fn((r, in_f), |(i, j)| (sq[i] * vt[[i, j]]) as f32);
                    let b = Array2::from_shape_fn((out_f, r), |(i, j)| (u[[i, j]] * sq[j]) as f32);
                    (a, b)
                };
                let delta = b.dot(&a).mapv(|v| -(scaling as f32) * v).into_dyn();
                base.add_to_weight(&delta)?;
                initial = Some((a.clone().into_dyn(), b.clone().into_dyn()));
                (a, b)
            }
        };
        let bias = spec.lora_bias.then(|| {
            // PEFT: zeros with B (init true / gaussian); nn.Linear's default U(±1/√r) for init false.
            let v = if matches!(spec.init, Init::Random) {
                let bound = 1.0 / (r as f32).sqrt();
                let u = Uniform::new_inclusive(-bound, bound);
                Array1::from_shape_fn(out_f, |_| u.sample(rng))
            } else {
                Array1::zeros(out_f)
            };
            Param::new(format!("{path}.lora_B.{name}.bias"), v.into_dyn(), true)
        });
        let a = Param::new(format!("{path}.lora_A.{name}.weight"), a.into_dyn(), true);
        let b = Param::new(format!("{path}.lora_B.{name}.weight"), b.into_dyn(), true);
        let mut me = LoraLinear {
            name: name.to_string(),
            spec,
            scaling,
            a,
            b,
            magnitude: None,
            bias,
            merge_norm: Mutex::new(None),
            initial,
        };
        if spec.use_dora {
            // PEFT DoraLinearLayer.update_layer: m = ‖W + s·B·A‖ per output row (W after any mutating init).
            let w = base.dense_weight()?;
            let m = row_norms(&(&mat(&w)? + &me.lora_weight()?));
            me.magnitude = Some(Param::new(format!("{path}.lora_magnitude_vector.{name}.weight"), m.into_dyn(), true));
        }
        Ok(me)
    }

    /// An adapter with given `a [r, in]` and `b [out, r]` from a base-mutating data-driven init (CorDA): the base
    /// becomes `W − s·B·A` and `(A, B)` are recorded as the initial values (see [`convert_mutated_to_lora`]).
    ///
    /// # Errors
    /// [`Error::Shape`] for matrices that do not fit the base; [`crate::LoraError::Incompatible`] for DoRA; base errors.
    pub fn from_mutating_init(
        path: &str,
        name: &str,
        base: &dyn LinearBase,
        spec: LoraSpec,
        a: Array2<f32>,
        b: Array2<f32>,
    ) -> Result<Self> {
        let (in_f, out_f, r) = (base.in_features(), base.out_features(), spec.r);
        if a.dim() != (r, in_f) || b.dim() != (out_f, r) {
            return Err(Error::Shape { op: "lora", lhs: a.shape().to_vec(), rhs: b.shape().to_vec() });
        }
        if spec.use_dora || spec.lora_bias {
            crate::error::fail!(crate::LoraError::Incompatible {
                method: "lora",
                site: path.into(),
                what: "a mutating data-driven init",
                with: "DoRA or lora_bias",
            });
        }
        let scaling = spec.scaling();
        base.add_to_weight(&b.dot(&a).mapv(|v| -(scaling as f32) * v).into_dyn())?;
        let initial = Some((a.clone().into_dyn(), b.clone().into_dyn()));
        Ok(LoraLinear {
            name: name.to_string(),
            spec,
            scaling,
            a: Param::new(format!("{path}.lora_A.{name}.weight"), a.into_dyn(), true),
            b: Param::new(format!("{path}.lora_B.{name}.weight"), b.into_dyn(), true),
            magnitude: None,
            bias: None,
            merge_norm: Mutex::new(None),
            initial,
        })
    }

    /// The hyper-parameters.
    pub fn spec(&self) -> &LoraSpec {
        &self.spec
    }

    /// The scaling `s`.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// `lora_A` `[r, in]`.
    pub fn lora_a(&self) -> &Param {
        &self.a
    }

    /// `lora_B` `[out, r]`.
    pub fn lora_b(&self) -> &Param {
        &self.b
    }

    /// The DoRA magnitude vector `[out]`.
    pub fn magnitude(&self) -> Option<&Param> {
        self.magnitude.as_ref()
    }

    /// `lora_B`'s bias `[out]` (`lora_bias`).
    pub fn lora_b_bias(&self) -> Option<&Param> {
        self.bias.as_ref()
    }

    /// `(A₀, B₀)` recorded by a base-mutating init.
    pub fn initial(&self) -> Option<&(ArrayD<f32>, ArrayD<f32>)> {
        self.initial.as_ref()
    }

    /// `s·B·A` `[out, in]`.
    ///
    /// # Errors
    /// Never for well-formed parameters.
    pub fn lora_weight(&self) -> Result<Array2<f32>> {
        let (a, b) = (self.a.value(), self.b.value());
        let a = a.view().into_dimensionality::<Ix2>().map_err(|_| shape_err(a.shape()))?;
        let b = b.view().into_dimensionality::<Ix2>().map_err(|_| shape_err(b.shape()))?;
        Ok(b.dot(&a).mapv(|v| v * self.scaling as f32))
    }

    /// The merge delta and the row norms `‖W + s·B·A‖` (DoRA) for base weight `w`.
    fn merged_delta(&self, w: &Array2<f32>) -> Result<(Array2<f32>, Option<Array1<f32>>)> {
        let dw = self.lora_weight()?;
        let Some(m) = &self.magnitude else { return Ok((dw, None)) };
        let v = w + &dw;
        let norm = row_norms(&v);
        let m = m.value();
        let f = Array1::from_shape_fn(norm.len(), |i| m[[i]] / norm[i]);
        let new = &v * &f.view().insert_axis(Axis(1));
        Ok((new - w, Some(norm)))
    }
}

fn shape_err(s: &[usize]) -> Error {
    crate::LoraError::NotMatrix {
        method: "lora",
        what: "adapter weight".into(),
        expected: "a matrix",
        shape: s.to_vec(),
    }
    .into()
}

impl LinearAdapter for LoraLinear {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &str {
        if self.magnitude.is_some() {
            "dora"
        } else {
            "lora"
        }
    }

    fn delta(&self, x: &Tensor, base_out: &Tensor, base: &dyn LinearBase, ctx: &Ctx) -> Result<Option<Tensor>> {
        let dropped = ctx.train && self.spec.dropout > 0.0;
        let xd = if dropped { ctx.with_rng(|r| x.dropout(self.spec.dropout, true, r))? } else { x.clone() };
        let bias = self.bias.as_ref().map(Param::tensor);
        let lora =
            xd.linear(&self.a.tensor(), None)?.linear(&self.b.tensor(), bias.as_ref())?.mul_scalar(self.scaling as f32);
        let Some(m) = &self.magnitude else { return Ok(Some(lora)) };
        let w = base.dense_weight()?;
        let w2 = mat(&w)?.to_owned();
        // ‖W + s·B·A‖ from the current values: a constant in the graph (detached as in PEFT).
        let norm = row_norms(&(&w2 + &self.lora_weight()?));
        let f = m.tensor().div(&Tensor::new(norm.into_dyn()))?;
        let base0 = if dropped {
            xd.linear(&Tensor::new(w), None)?
        } else {
            match base.bias() {
                Some(b) => base_out.sub(&b.tensor())?,
                None => base_out.clone(),
            }
        };
        f.mul(&base0.add(&lora)?)?.sub(&base0).map(Some)
    }

    fn params(&self) -> Vec<Param> {
        let mut v = vec![self.a.clone(), self.b.clone()];
        v.extend(self.magnitude.clone());
        v.extend(self.bias.clone());
        v
    }

    fn delta_bias(&self) -> Result<Option<ArrayD<f32>>> {
        Ok(self.bias.as_ref().map(|b| b.value().mapv(|v| v * self.scaling as f32)))
    }

    fn delta_weight(&self, base: &dyn LinearBase) -> Result<Option<ArrayD<f32>>> {
        let w = base.dense_weight()?;
        let (delta, norm) = self.merged_delta(&mat(&w)?.to_owned())?;
        if norm.is_some() {
            *self.merge_norm.lock().unwrap_or_else(|p| p.into_inner()) = norm;
        }
        Ok(Some(delta.into_dyn()))
    }

    fn unmerge_delta_weight(&self, base: &dyn LinearBase) -> Result<Option<ArrayD<f32>>> {
        let Some(m) = &self.magnitude else { return self.delta_weight(base) };
        // PEFT unmerge: W = W' / (m / ‖V‖) − s·B·A with the norms cached at merge time.
        let Some(norm) = self.merge_norm.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Err(Error::AdapterState {
                op: "unmerge",
                site: String::new(),
                adapter: self.name.clone(),
                problem: peft_core::AdapterProblem::NoMergeCache,
            });
        };
        let wm = base.dense_weight()?;
        let wm = mat(&wm)?;
        let m = m.value();
        let dw = self.lora_weight()?;
        let f = Array1::from_shape_fn(norm.len(), |i| m[[i]] / norm[i]);
        let orig = &wm / &f.view().insert_axis(Axis(1)) - &dw;
        Ok(Some((&wm - &orig).into_dyn()))
    }
}

/// Turns an adapter trained from a base-mutating init (PiSSA/OLoRA: base `W_res = W − s·B₀·A₀`) into a plain
/// LoRA adapter for the *original* `W`, as PEFT's `path_initial_model_for_weight_conversion`:
/// `A' = [A; A₀]` (`[2r, in]`), `B' = [B, −B₀]` (`[out, 2r]`), so `s·B'·A' = s·B·A − s·B₀·A₀`. Rank doubles; keep the
/// scaling by doubling alpha (or multiplying it by √2 under rsLoRA).
///
/// # Errors
/// [`Error::Shape`] when the four matrices do not fit.
pub fn convert_mutated_to_lora(
    a: &ArrayD<f32>,
    b: &ArrayD<f32>,
    a0: &ArrayD<f32>,
    b0: &ArrayD<f32>,
) -> Result<(ArrayD<f32>, ArrayD<f32>)> {
    let cat = |x: &ArrayD<f32>, y: &ArrayD<f32>, axis: usize| {
        ndarray::concatenate(Axis(axis), &[x.view(), y.view()]).map_err(|_| Error::Shape {
            op: "convert_mutated_to_lora",
            lhs: x.shape().to_vec(),
            rhs: y.shape().to_vec(),
        })
    };
    Ok((cat(a, a0, 0)?, cat(b, &b0.mapv(|v| -v), 1)?))
}

#[cfg(test)]
#[path = "layer_tests.rs"]
mod tests;
