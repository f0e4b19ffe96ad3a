//! Training-free (and nearly training-free) classifiers on frozen, L2-normalised image features (specs §2):
//! GDA, Tip-Adapter, Tip-Adapter-F and TIP-X, each written with the CLIP formulas and a [`TextPrior`] supplying
//! the zero-shot class weights `W_txt [D, C]`.
//!
//! No CLIP text tower is available here, so the numbers this crate reports use the **image-only** variant the
//! papers ablate: [`PrototypePrior`], whose "text" weights are the L2-normalised class means of the few-shot
//! support features (the zero-shot term becomes a nearest-class-mean classifier, `100·f·μ̂_k`). Real CLIP text
//! features plug in unchanged through [`ClassEmbeddings`] (columns = normalised prompt-ensemble embeddings).
//!
//! Formulas (f: a query feature, `F [N, D]`: support keys, `L [N, C]`: one-hot support labels):
//! - zero-shot: `100·f·W_txt`;
//! - Tip-Adapter: `+ α·exp(−β(1 − f·Fᵀ))·L`;
//! - Tip-Adapter-F: the same with `F` a trainable parameter initialised from the keys (AdamW lr 1e-3, eps 1e-4,
//!   cosine, 20 epochs, cross-entropy on the logits);
//! - TIP-X: `+ γ·(−rescale(KL)·L)`, `KL_ij = KL(p(f_i) ‖ p(s_j))` with `p(x) = softmax(x·W_txt / 0.5)`, the KL
//!   matrix min-max rescaled into the value range of the affinities `f·Fᵀ` of the same queries;
//! - GDA: `+ α·(f·Wᵀ + b)`, `w_k = P μ_k`, `b_k = log(1/C) − ½ μ_kᵀ P μ_k`, with the shrinkage precision
//!   `P = D · pinv((N−1)Σ̂ + tr(Σ̂)·I)` and `Σ̂` the pooled within-class covariance (divided by N−1).
//!
//! Hyper-parameters (α, β, γ) are searched on a validation split with the grids of the reference code
//! ([`tip_grid`], [`tipx_grid`], [`GDA_ALPHAS`]). The augmented views the references average over (10 random
//! crops per support image) are not used: one view per image, as the VTAB recipe has no augmentation.

use ndarray::{Array1, Array2, Axis};
use peft_core::nn::Ctx;
use peft_core::param::Param;
use peft_core::train::{Loss, NoHooks, NonFinitePolicy, ScheduleKind, Trainer, TrainerConfig};
use peft_core::{no_grad, Tensor};

use crate::error::{Result, VisionError};
use crate::features::FeatureSet;
use crate::harness::{accuracy, argmax_rows, epoch_batches};

/// Where the zero-shot class weights come from.
pub trait TextPrior {
    /// `W_txt [D, C]` with unit-norm columns, or `None` when there is no zero-shot branch.
    fn class_weights(&self) -> Option<&Array2<f32>>;

    /// The zero-shot logits `100·f·W_txt` of `f [N, D]` (zeros `[N, classes]` without a branch).
    ///
    /// # Errors
    /// [`VisionError::Mismatch`] when the widths or class counts differ.
    fn zero_shot(&self, f: &Array2<f32>, classes: usize) -> Result<Array2<f32>> {
        match self.class_weights() {
            None => Ok(Array2::zeros((f.nrows(), classes))),
            Some(w) => {
                if w.nrows() != f.ncols() || w.ncols() != classes {
                    return Err(VisionError::mismatch(
                        "TextPrior::zero_shot",
                        format!(
                            "W_txt is {:?}, features have width {} and there are {classes} classes",
                            w.dim(),
                            f.ncols()
                        ),
                    ));
                }
                Ok(f.dot(w) * 100.0)
            }
        }
    }
}

/// No zero-shot branch (cache / discriminant terms only).
pub struct NoTextPrior;

impl TextPrior for NoTextPrior {
    fn class_weights(&self) -> Option<&Array2<f32>> {
        None
    }
}

/// Given class embeddings (e.g. CLIP text features), columns normalised to unit length.
pub struct ClassEmbeddings {
    w: Array2<f32>,
}

impl ClassEmbeddings {
    /// From `[D, C]` embeddings (normalised here).
    pub fn new(w: Array2<f32>) -> Self {
        ClassEmbeddings { w: normalize_cols(w) }
    }
}

impl TextPrior for ClassEmbeddings {
    fn class_weights(&self) -> Option<&Array2<f32>> {
        Some(&self.w)
    }
}

/// The image-only stand-in: the normalised class means of the support features.
pub struct PrototypePrior {
    w: Array2<f32>,
}

impl PrototypePrior {
    /// Class means of `support` (L2-normalise the features first), normalised.
    ///
    /// # Errors
    /// A class without support examples.
    pub fn new(support: &FeatureSet, classes: usize) -> Result<Self> {
        Ok(PrototypePrior { w: normalize_cols(class_means(support, classes)?.reversed_axes()) })
    }
}

impl TextPrior for PrototypePrior {
    fn class_weights(&self) -> Option<&Array2<f32>> {
        Some(&self.w)
    }
}

fn normalize_cols(mut w: Array2<f32>) -> Array2<f32> {
    for mut c in w.columns_mut() {
        let n = c.dot(&c).sqrt();
        if n > 0.0 {
            c /= n;
        }
    }
    w
}

/// Class means `[C, D]` of a feature set.
///
/// # Errors
/// [`VisionError::FewShot`] for a class without examples, [`VisionError::Mismatch`] for a label `>= classes`.
pub fn class_means(set: &FeatureSet, classes: usize) -> Result<Array2<f32>> {
    let mut m = Array2::<f32>::zeros((classes, set.dim()));
    let mut n = vec![0usize; classes];
    for (row, &y) in set.features.rows().into_iter().zip(&set.labels) {
        if y >= classes {
            return Err(VisionError::mismatch("class_means", format!("label {y} with {classes} classes")));
        }
        m.row_mut(y).scaled_add(1.0, &row);
        n[y] += 1;
    }
    for (k, &c) in n.iter().enumerate() {
        if c == 0 {
            return Err(VisionError::FewShot {
                what: "class means".into(),
                reason: format!("class {k} has no examples"),
            });
        }
        m.row_mut(k).mapv_inplace(|v| v / c as f32);
    }
    Ok(m)
}

fn one_hot(labels: &[usize], classes: usize) -> Array2<f32> {
    let mut l = Array2::zeros((labels.len(), classes));
    for (i, &y) in labels.iter().enumerate() {
        if y < classes {
            l[[i, y]] = 1.0;
        }
    }
    l
}

fn check_width(op: &'static str, a: &Array2<f32>, b: &Array2<f32>) -> Result<()> {
    if a.ncols() != b.ncols() {
        return Err(VisionError::mismatch(op, format!("feature widths {} and {}", a.ncols(), b.ncols())));
    }
    Ok(())
}

/// `exp(−β(1 − A))` elementwise.
pub fn cache_affinity(aff: &Array2<f32>, beta: f32) -> Array2<f32> {
    aff.mapv(|a| (-beta * (1.0 - a)).exp())
}

/// Tip-Adapter's cache: keys (normalised support features) and one-hot values.
#[derive(Clone, Debug)]
pub struct TipAdapter {
    /// Keys `F [N, D]`.
    pub keys: Array2<f32>,
    /// Values `L [N, C]`.
    pub values: Array2<f32>,
    /// Sharpness β.
    pub beta: f32,
    /// Cache weight α.
    pub alpha: f32,
}

impl TipAdapter {
    /// A cache over `support` (normalised features) with β = α = 1 (Tip-Adapter's init).
    pub fn new(support: &FeatureSet, classes: usize) -> Self {
        TipAdapter { keys: support.features.clone(), values: one_hot(&support.labels, classes), beta: 1.0, alpha: 1.0 }
    }

    /// Number of classes.
    pub fn classes(&self) -> usize {
        self.values.ncols()
    }

    /// The cache term `exp(−β(1 − f·Fᵀ))·L` for queries `[M, D]`.
    ///
    /// # Errors
    /// Width mismatch.
    pub fn cache_logits(&self, f: &Array2<f32>) -> Result<Array2<f32>> {
        check_width("TipAdapter", f, &self.keys)?;
        Ok(cache_affinity(&f.dot(&self.keys.t()), self.beta).dot(&self.values))
    }

    /// `zero_shot + α·cache`.
    ///
    /// # Errors
    /// Width or class-count mismatch.
    pub fn logits(&self, f: &Array2<f32>, prior: &dyn TextPrior) -> Result<Array2<f32>> {
        Ok(prior.zero_shot(f, self.classes())? + self.cache_logits(f)? * self.alpha)
    }

    /// Chooses (β, α) on `val` over [`tip_grid`]`(s0, s1)`; returns the best validation accuracy.
    ///
    /// # Errors
    /// Width or class-count mismatch.
    pub fn search(&mut self, val: &FeatureSet, prior: &dyn TextPrior, s0: f32, s1: f32) -> Result<f64> {
        check_width("TipAdapter::search", &val.features, &self.keys)?;
        let zs = prior.zero_shot(&val.features, self.classes())?;
        let aff = val.features.dot(&self.keys.t());
        let (betas, alphas) = tip_grid(s0, s1);
        let mut best = (-1.0, self.beta, self.alpha);
        for &b in &betas {
            let cache = cache_affinity(&aff, b).dot(&self.values);
            for &a in &alphas {
                let acc = accuracy(&argmax_rows(&(&zs + &(&cache * a))), &val.labels);
                if acc > best.0 {
                    best = (acc, b, a);
                }
            }
        }
        (self.beta, self.alpha) = (best.1, best.2);
        Ok(best.0)
    }

    /// Top-1 accuracy on a (normalised) feature set.
    ///
    /// # Errors
    /// As [`TipAdapter::logits`].
    pub fn accuracy(&self, set: &FeatureSet, prior: &dyn TextPrior) -> Result<f64> {
        Ok(accuracy(&argmax_rows(&self.logits(&set.features, prior)?), &set.labels))
    }

    /// Tip-Adapter-F: trains the keys (only) on `train` with the cross-entropy of [`TipAdapter::logits`]
    /// (AdamW, lr `lr`, eps 1e-4, no weight decay, cosine without warmup, `epochs` epochs of batch
    /// `batch_size`); β and α stay as they are. Returns the mean loss of the last epoch.
    ///
    /// # Errors
    /// Width mismatch, trainer errors.
    pub fn fine_tune(
        &mut self,
        train: &FeatureSet,
        prior: &dyn TextPrior,
        epochs: usize,
        batch_size: usize,
        lr: f64,
        seed: u64,
    ) -> Result<f64> {
        check_width("TipAdapter::fine_tune", &train.features, &self.keys)?;
        if epochs == 0 || batch_size == 0 {
            return Err(VisionError::config("Tip-Adapter-F", "epochs / batch_size", "must be at least 1"));
        }
        let keys = Param::new("tip_adapter.keys", self.keys.clone().into_dyn(), true);
        let values = Tensor::new(self.values.clone().into_dyn());
        let zs = prior.zero_shot(&train.features, self.classes())?;
        let batches = epoch_batches(train.len(), batch_size, epochs, seed);
        let per_epoch = batches.len() / epochs;
        let tcfg = TrainerConfig {
            lr,
            weight_decay: 0.0,
            max_grad_norm: None,
            warmup_steps: 0,
            total_steps: batches.len(),
            schedule: ScheduleKind::Cosine,
            eps: 1e-4,
            seed,
            non_finite: NonFinitePolicy::Skip { max_in_a_row: 20, max_fraction: 0.1 },
            ..TrainerConfig::default()
        };
        let mut trainer = Trainer::new(vec![keys.clone()], &NoHooks, tcfg)?;
        let (beta, alpha) = (self.beta, self.alpha);
        let mut last = Vec::new();
        for (s, idx) in batches.iter().enumerate() {
            let f = Tensor::new(train.features.select(Axis(0), idx).into_dyn());
            let z = Tensor::new(zs.select(Axis(0), idx).into_dyn());
            let y: Vec<i64> = idx.iter().map(|&i| train.labels[i] as i64).collect();
            let r = trainer.step(|_ctx: &mut Ctx| {
                let aff = f.matmul_nt(&keys.tensor())?;
                let cache = aff.add_scalar(-1.0).mul_scalar(beta).exp().matmul(&values)?;
                let logits = z.add(&cache.mul_scalar(alpha))?;
                Ok(Loss::Single(logits.cross_entropy(&y, None, 0.0)?))
            })?;
            if s >= batches.len() - per_epoch && !r.skipped {
                last.push(r.loss);
            }
        }
        drop(trainer);
        self.keys = no_grad(|| keys.value().to_owned())
            .into_dimensionality()
            .map_err(|e| VisionError::mismatch("Tip-Adapter-F", e.to_string()))?;
        Ok(last.iter().sum::<f64>() / last.len().max(1) as f64)
    }
}

/// Tip-Adapter's search grids: β_i = i·(s0 − 0.1)/200 + 0.1 (i < 200), α_j = j·(s1 − 0.1)/20 + 0.1 (j < 20).
pub fn tip_grid(s0: f32, s1: f32) -> (Vec<f32>, Vec<f32>) {
    let b = (0..200).map(|i| i as f32 * (s0 - 0.1) / 200.0 + 0.1).collect();
    let a = (0..20).map(|j| j as f32 * (s1 - 0.1) / 20.0 + 0.1).collect();
    (b, a)
}

/// TIP-X's search grids (SuS-X): α 20 values from 0.1 (step 2.5), β 200 values from 1 (step 0.245), γ 50 values
/// from 0.1 (step 0.6).
pub fn tipx_grid() -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let a = (0..20).map(|i| 0.1 + 2.5 * i as f32).collect();
    let b = (0..200).map(|i| 1.0 + 0.245 * i as f32).collect();
    let g = (0..50).map(|i| 0.1 + 0.6 * i as f32).collect();
    (a, b, g)
}

/// Class distributions `softmax(x·W_txt / T)` row by row.
pub fn class_distributions(x: &Array2<f32>, w: &Array2<f32>, temp: f32) -> Array2<f32> {
    let mut p = x.dot(w) / temp;
    for mut r in p.rows_mut() {
        let m = r.fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        r.mapv_inplace(|v| (v - m).exp());
        let s = r.sum();
        r /= s;
    }
    p
}

/// `KL(p_i ‖ q_j)` for every row pair, `[P, Q]` (probabilities clamped at 1e-12 inside the logs).
pub fn kl_matrix(p: &Array2<f32>, q: &Array2<f32>) -> Array2<f32> {
    let lq = q.mapv(|v| v.max(1e-12).ln());
    let plp: Array1<f32> = p
        .rows()
        .into_iter()
        .map(|r| r.iter().map(|&v| if v > 0.0 { v * v.max(1e-12).ln() } else { 0.0 }).sum::<f32>())
        .collect();
    let cross = p.dot(&lq.t());
    let mut kl = -cross;
    for (mut r, &h) in kl.rows_mut().into_iter().zip(&plp) {
        r += h;
    }
    kl
}

/// Min-max rescales `x` into `[lo, hi]` (a constant matrix maps to `lo`).
pub fn rescale(x: &Array2<f32>, lo: f32, hi: f32) -> Array2<f32> {
    let (mn, mx) = x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let span = mx - mn;
    x.mapv(|v| if span > 0.0 { lo + (v - mn) / span * (hi - lo) } else { lo })
}

/// TIP-X: Tip-Adapter's cache plus the KL term between query and support class distributions.
#[derive(Clone, Debug)]
pub struct TipX {
    /// The cache (keys, values, β, α).
    pub tip: TipAdapter,
    /// Weight γ of the KL term.
    pub gamma: f32,
    /// Temperature of the class distributions (0.5).
    pub temperature: f32,
}

impl TipX {
    /// Over `support` with β = α = 1, γ = 0 (Tip-Adapter), T = 0.5.
    pub fn new(support: &FeatureSet, classes: usize) -> Self {
        TipX { tip: TipAdapter::new(support, classes), gamma: 0.0, temperature: 0.5 }
    }

    /// The KL term `−rescale(KL)·L` for queries `[M, D]` (zeros without a zero-shot branch, which TIP-X needs).
    ///
    /// # Errors
    /// Width mismatch.
    pub fn kl_logits(&self, f: &Array2<f32>, prior: &dyn TextPrior) -> Result<Array2<f32>> {
        check_width("TipX", f, &self.tip.keys)?;
        let Some(w) = prior.class_weights() else { return Ok(Array2::zeros((f.nrows(), self.tip.classes()))) };
        let p = class_distributions(f, w, self.temperature);
        let q = class_distributions(&self.tip.keys, w, self.temperature);
        let aff = f.dot(&self.tip.keys.t());
        let (lo, hi) = aff.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        Ok(-rescale(&kl_matrix(&p, &q), lo, hi).dot(&self.tip.values))
    }

    /// `zero_shot + α·cache + γ·kl`.
    ///
    /// # Errors
    /// Width or class-count mismatch.
    pub fn logits(&self, f: &Array2<f32>, prior: &dyn TextPrior) -> Result<Array2<f32>> {
        Ok(self.tip.logits(f, prior)? + self.kl_logits(f, prior)? * self.gamma)
    }

    /// Chooses (α, β, γ) on `val` over [`tipx_grid`]; returns the best validation accuracy.
    ///
    /// # Errors
    /// Width or class-count mismatch.
    pub fn search(&mut self, val: &FeatureSet, prior: &dyn TextPrior) -> Result<f64> {
        let zs = prior.zero_shot(&val.features, self.tip.classes())?;
        let kl = self.kl_logits(&val.features, prior)?;
        let aff = val.features.dot(&self.tip.keys.t());
        let (alphas, betas, gammas) = tipx_grid();
        let mut best = (-1.0, self.tip.alpha, self.tip.beta, self.gamma);
        for &b in &betas {
            let cache = cache_affinity(&aff, b).dot(&self.tip.values);
            for &a in &alphas {
                let base = &zs + &(&cache * a);
                for &g in &gammas {
                    let acc = accuracy(&argmax_rows(&(&base + &(&kl * g))), &val.labels);
                    if acc > best.0 {
                        best = (acc, a, b, g);
                    }
                }
            }
        }
        (self.tip.alpha, self.tip.beta, self.gamma) = (best.1, best.2, best.3);
        Ok(best.0)
    }

    /// Top-1 accuracy on a (normalised) feature set.
    ///
    /// # Errors
    /// As [`TipX::logits`].
    pub fn accuracy(&self, set: &FeatureSet, prior: &dyn TextPrior) -> Result<f64> {
        Ok(accuracy(&argmax_rows(&self.logits(&set.features, prior)?), &set.labels))
    }
}

/// GDA's α grid: {1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100}.
pub const GDA_ALPHAS: [f32; 7] = [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0];

/// Gaussian discriminant analysis with a shared, shrunk covariance (LDA), in closed form.
#[derive(Clone, Debug)]
pub struct Gda {
    /// `W [C, D]`, rows `P μ_k`.
    pub weight: Array2<f32>,
    /// `b [C]`, `log(1/C) − ½ μ_kᵀ P μ_k`.
    pub bias: Array1<f32>,
    /// Weight α of the discriminant term.
    pub alpha: f32,
}

impl Gda {
    /// Fits class means and the shrinkage precision `P = D · pinv((N−1)Σ̂ + tr(Σ̂)·I)` on `support`.
    ///
    /// # Errors
    /// A class without examples, fewer than 2 examples, an SVD failure.
    pub fn fit(support: &FeatureSet, classes: usize) -> Result<Self> {
        let n = support.len();
        if n < 2 {
            return Err(VisionError::FewShot {
                what: "GDA".into(),
                reason: format!("needs at least 2 examples, got {n}"),
            });
        }
        let mu = class_means(support, classes)?;
        let d = support.dim();
        let mut xc = support.features.mapv(f64::from);
        for (mut r, &y) in xc.rows_mut().into_iter().zip(&support.labels) {
            r -= &mu.row(y).mapv(f64::from);
        }
        let cov = xc.t().dot(&xc) / (n as f64 - 1.0);
        let tr = cov.diag().sum();
        let mut a = cov * (n as f64 - 1.0);
        for i in 0..d {
            a[[i, i]] += tr;
        }
        let p = pinv_sym(&a)? * d as f64;
        Ok(Self::from_precision(&mu, &p, classes))
    }

    /// The classifier for means `[C, D]` and a precision `[D, D]` with equal priors.
    pub fn from_precision(mu: &Array2<f32>, precision: &Array2<f64>, classes: usize) -> Self {
        let mu64 = mu.mapv(f64::from);
        let w = mu64.dot(precision); // P symmetric: rows are (P μ_k)ᵀ.
        let prior = (1.0 / classes as f64).ln();
        let bias: Array1<f64> =
            w.rows().into_iter().zip(mu64.rows()).map(|(wk, mk)| prior - 0.5 * wk.dot(&mk)).collect();
        Gda { weight: w.mapv(|v| v as f32), bias: bias.mapv(|v| v as f32), alpha: 1.0 }
    }

    /// The discriminant term `f·Wᵀ + b`.
    ///
    /// # Errors
    /// Width mismatch.
    pub fn discriminant(&self, f: &Array2<f32>) -> Result<Array2<f32>> {
        check_width("Gda", f, &self.weight)?;
        Ok(f.dot(&self.weight.t()) + &self.bias)
    }

    /// `zero_shot + α·(f·Wᵀ + b)`.
    ///
    /// # Errors
    /// Width or class-count mismatch.
    pub fn logits(&self, f: &Array2<f32>, prior: &dyn TextPrior) -> Result<Array2<f32>> {
        Ok(prior.zero_shot(f, self.weight.nrows())? + self.discriminant(f)? * self.alpha)
    }

    /// Chooses α on `val` over [`GDA_ALPHAS`]; returns the best validation accuracy.
    ///
    /// # Errors
    /// Width or class-count mismatch.
    pub fn search(&mut self, val: &FeatureSet, prior: &dyn TextPrior) -> Result<f64> {
        let zs = prior.zero_shot(&val.features, self.weight.nrows())?;
        let disc = self.discriminant(&val.features)?;
        let mut best = (-1.0, self.alpha);
        for &a in &GDA_ALPHAS {
            let acc = accuracy(&argmax_rows(&(&zs + &(&disc * a))), &val.labels);
            if acc > best.0 {
                best = (acc, a);
            }
        }
        self.alpha = best.1;
        Ok(best.0)
    }

    /// Top-1 accuracy on a (normalised) feature set.
    ///
    /// # Errors
    /// As [`Gda::logits`].
    pub fn accuracy(&self, set: &FeatureSet, prior: &dyn TextPrior) -> Result<f64> {
        Ok(accuracy(&argmax_rows(&self.logits(&set.features, prior)?), &set.labels))
    }
}

/// Pseudo-inverse of a symmetric matrix through the SVD (singular values below `1e-10·s_max` dropped).
///
/// # Errors
/// An SVD failure.
pub fn pinv_sym(a: &Array2<f64>) -> Result<Array2<f64>> {
    let (u, s, vt) = peft_core::linalg::svd(a)?;
    let cut = s.iter().fold(0.0f64, |m, &v| m.max(v)) * 1e-10;
    let inv: Array1<f64> = s.mapv(|v| if v > cut { 1.0 / v } else { 0.0 });
    // pinv = V · diag(1/s) · Uᵀ.
    let vs = vt.t().to_owned() * &inv;
    Ok(vs.dot(&u.t()))
}

#[cfg(test)]
#[path = "fewshot_tests.rs"]
mod tests;
