//! `add_weighted_adapter`: a new adapter from a weighted combination of existing ones (all of PEFT 0.21's
//! combination types: `linear`, `cat`, `svd`, `ties`, `ties_svd`, `dare_linear`, `dare_ties`, `dare_linear_svd`,
//! `dare_ties_svd`, `magnitude_prune`, `magnitude_prune_svd`).
//!
//! With adapters `i` (scaling `sᵢ`, weight `wᵢ`), the *intended* update is `ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ`.
//! - `Cat` realises it exactly with rank `Σ rᵢ`: `A = [w₁s₁A₁; w₂s₂A₂; …]`, `B = [B₁, B₂, …]` (as PEFT 0.21).
//! - `Svd { rank, clamp }` is the best rank-`rank` approximation of the exact `ΔW` (truncated SVD, `B = U·S`,
//!   `A = Vᵀ`). `rank: None` is PEFT's default, the largest `r` among the combined adapters. `clamp: Some(q)` is
//!   PEFT's `svd_clamp`: the `q`-quantile `h` (linear interpolation, as `torch.quantile`) of the signed entries of
//!   `B` and `A` together, then every entry clamped to `[-h, h]`. The SVD fixes each singular pair only up to a
//!   joint sign, and the quantile of the signed entries depends on those signs, so a clamped result is
//!   reproducible here but can differ from PEFT's (whose signs come from its LAPACK) where the two SVDs disagree.
//!   Even `clamp: Some(1.0)` clips: the bound is the largest signed entry, so more negative entries are cut.
//! - `Linear` follows PEFT 0.21 exactly (equal ranks required): with `cᵢ = wᵢ·sᵢ`, `A = Σ sign(cᵢ)·√|cᵢ|·Aᵢ`,
//!   `B = Σ √|cᵢ|·Bᵢ`. Its `B·A` contains the cross terms `√|cᵢ|·sign(cⱼ)√|cⱼ|·Bᵢ·Aⱼ` (i ≠ j), so it equals the
//!   weighted sum `Σ wᵢ·ΔWᵢ` only for a single adapter or adapters sharing `A` (or `B`); in general no rank-`r`
//!   adapter can hold the sum (its rank reaches `Σ rᵢ`): use `Cat` for the exact sum, `Svd` for its best rank-`r`
//!   approximation.
//! - `Factors { merge }` (PEFT's `ties`, `dare_linear`, `dare_ties`, `magnitude_prune`) is `Linear` with the
//!   [`Merge`] applied to the `Aᵢ` (weights `sign(cᵢ)·√|cᵢ|`) and, separately, to the `Bᵢ` (weights `√|cᵢ|`).
//!   Equal ranks required.
//! - `DeltaSvd { merge, rank }` (PEFT's `*_svd`) applies the [`Merge`] to the `ΔWᵢ = sᵢ·Bᵢ·Aᵢ` with weights `wᵢ`,
//!   then truncates to `rank` by SVD like `Svd`.
//!
//! As in PEFT, a single adapter is always combined as `Linear` (whatever the combination type). DARE masks are
//! drawn from the merge's `seed`, a distinct stream per site (and per factor), so results are reproducible.
//!
//! The new adapter has `lora_alpha = r` per site (scaling 1), rsLoRA off, and targets exactly the combined sites.

use ndarray::{concatenate, s, Array2, ArrayD, Axis, Ix2};
use peft_core::adapter::ModulePattern;
use peft_core::{Error, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::Value;

use crate::config::{num, InitLoraWeights, LoraConfig};
use crate::error::{CombineProblem, LoraError};
use crate::merge_utils::{MajoritySign, Merge};
use peft_core::adapter::{AdapterResult, PeftModel};
use peft_core::nn::{Linear, Module};

use crate::layer::LoraLinear;
use crate::tuner::LoraModelExt;

/// How adapters are combined.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Combination {
    /// PEFT's `linear` (√|w·s|-weighted sums of A and B; equal ranks).
    Linear,
    /// Concatenation: the exact weighted sum, rank `Σ rᵢ`.
    Cat,
    /// Truncated SVD of the exact weighted sum.
    Svd {
        /// The new rank (`None`: the largest adapter `r`, as PEFT).
        rank: Option<usize>,
        /// PEFT's `svd_clamp` quantile in `[0, 1]` (`None`: no clamping).
        clamp: Option<f64>,
    },
    /// A [`Merge`] of the A factors and of the B factors (PEFT's `ties`, `dare_linear`, `dare_ties`,
    /// `magnitude_prune`; `Merge::TaskArithmetic` is `Linear`). Equal ranks.
    Factors {
        /// The merge.
        merge: Merge,
    },
    /// A [`Merge`] of the `ΔWᵢ`, truncated by SVD (PEFT's `ties_svd`, `dare_linear_svd`, `dare_ties_svd`,
    /// `magnitude_prune_svd`; `Merge::TaskArithmetic` is `Svd`).
    DeltaSvd {
        /// The merge.
        merge: Merge,
        /// The new rank (`None`: the largest adapter `r`, as PEFT).
        rank: Option<usize>,
        /// PEFT's `svd_clamp` quantile in `[0, 1]` (`None`: no clamping).
        clamp: Option<f64>,
    },
}

impl Combination {
    /// The same combination with PEFT 0.21's DARE behaviour: kept entries are not divided by the density (PEFT
    /// discards that division; see [`crate::merge_utils`]). Other combinations are returned unchanged.
    #[must_use]
    pub fn peft_dare(self) -> Self {
        let off = |m: Merge| match m {
            Merge::DareLinear { density, seed, .. } => Merge::DareLinear { density, seed, rescale: false },
            Merge::DareTies { density, sign, seed, .. } => Merge::DareTies { density, sign, seed, rescale: false },
            m => m,
        };
        match self {
            Combination::Factors { merge } => Combination::Factors { merge: off(merge) },
            Combination::DeltaSvd { merge, rank, clamp } => Combination::DeltaSvd { merge: off(merge), rank, clamp },
            c => c,
        }
    }

    /// PEFT's `combination_type` with its arguments: `svd_rank` and `svd_clamp` (used by the `svd` types; `None`
    /// as in PEFT: the largest adapter rank, no clamping), `density` (required by the pruning types),
    /// `majority_sign_method` (`"total"` or `"frequency"`), and `seed` for the DARE masks. DARE rescales kept
    /// entries by `1/density` as in the paper; chain [`Combination::peft_dare`] for PEFT 0.21's output.
    ///
    /// # Errors
    /// [`crate::LoraError::Unknown`] for an unknown type, [`crate::LoraError::Combine`] for a missing density,
    /// [`crate::LoraError::Field`] for a clamp outside `[0, 1]`.
    pub fn from_peft(
        combination_type: &str,
        svd_rank: Option<usize>,
        svd_clamp: Option<f64>,
        density: Option<f64>,
        majority_sign_method: &str,
        seed: u64,
    ) -> Result<Self> {
        const OP: &str = "combination_type";
        let sign = MajoritySign::from_peft(majority_sign_method)?;
        let (base, svd) = match combination_type.strip_suffix("_svd") {
            Some(b) => (b, true),
            None if combination_type == "svd" => ("svd", true),
            None => (combination_type, false),
        };
        let dens = || -> Result<f64> {
            density.ok_or_else(|| {
                LoraError::Combine { problem: CombineProblem::NeedsDensity { combination: combination_type.into() } }
                    .into()
            })
        };
        let merge = match base {
            "linear" if !svd => return Ok(Combination::Linear),
            "cat" if !svd => return Ok(Combination::Cat),
            "svd" => Merge::TaskArithmetic,
            "ties" => Merge::Ties { density: dens()?, sign },
            "dare_linear" => Merge::DareLinear { density: dens()?, seed, rescale: true },
            "dare_ties" => Merge::DareTies { density: dens()?, sign, seed, rescale: true },
            "magnitude_prune" => Merge::MagnitudePrune { density: dens()? },
            _ => crate::error::fail!(LoraError::Unknown {
                what: "combination_type",
                value: combination_type.into(),
                expected: "linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune or their _svd forms",
            }),
        };
        if !svd {
            return Ok(Combination::Factors { merge });
        }
        if let Some(q) = svd_clamp.filter(|q| !(0.0..=1.0).contains(q)) {
            crate::error::fail!(LoraError::Field {
                method: OP,
                field: "svd_clamp",
                value: q.to_string(),
                rule: "must be a quantile in [0, 1]"
            });
        }
        let (rank, clamp) = (svd_rank, svd_clamp);
        Ok(if merge == Merge::TaskArithmetic {
            Combination::Svd { rank, clamp }
        } else {
            Combination::DeltaSvd { merge, rank, clamp }
        })
    }
}

fn m2(a: &ArrayD<f32>) -> Array2<f64> {
    a.mapv(f64::from).into_dimensionality::<Ix2>().expect("peft-rs bug: adapter weights are matrices")
}

fn d2(a: ArrayD<f64>) -> Array2<f64> {
    a.into_dimensionality::<Ix2>().expect("peft-rs bug: merged factors are matrices")
}

/// FNV-1a, for the per-site DARE streams.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Per-site parts: `(A, B, scaling)` of each adapter.
type Parts = [(Array2<f64>, Array2<f64>, f64)];

/// PEFT's `_generalized_task_arithmetic_weighted_adapter`: `merge` over the A and the B factors.
fn combine_factors(
    parts: &Parts,
    weights: &[f64],
    merge: &Merge,
    path: &str,
    rng: &mut StdRng,
) -> Result<(Array2<f64>, Array2<f64>)> {
    let r = parts[0].0.nrows();
    if parts.iter().any(|p| p.0.nrows() != r) {
        crate::error::fail!(LoraError::Combine { problem: CombineProblem::UnequalRanks { site: path.into() } });
    }
    let c: Vec<f64> = parts.iter().zip(weights).map(|(p, &w)| w * p.2).collect();
    let wa: Vec<f64> = c.iter().map(|&c| if c >= 0.0 { c.abs().sqrt() } else { -c.abs().sqrt() }).collect();
    let wb: Vec<f64> = c.iter().map(|&c| c.abs().sqrt()).collect();
    let a_s: Vec<ArrayD<f64>> = parts.iter().map(|p| p.0.clone().into_dyn()).collect();
    let b_s: Vec<ArrayD<f64>> = parts.iter().map(|p| p.1.clone().into_dyn()).collect();
    let a = merge.apply(&a_s, &wa, rng)?;
    let b = merge.apply(&b_s, &wb, rng)?;
    Ok((d2(a), d2(b)))
}

/// `torch.quantile(values, q)` (linear interpolation between the order statistics at `q·(n-1)`).
fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    let pos = q * (values.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    values[lo] + (values[hi] - values[lo]) * (pos - lo as f64)
}

/// PEFT's `svd_clamp`: clamps `A` and `B` to `±` the `q`-quantile of their signed entries together.
fn clamp_factors(a: &mut Array2<f64>, b: &mut Array2<f64>, q: f64) {
    let mut all: Vec<f64> = b.iter().chain(a.iter()).copied().collect();
    if all.is_empty() {
        return;
    }
    let h = quantile(&mut all, q);
    // As torch's clamp(min=-h, max=h): with h < 0 every entry becomes h (max wins).
    let c = |v: &mut f64| *v = v.max(-h).min(h);
    a.map_inplace(c);
    b.map_inplace(c);
}

/// PEFT's `_svd_generalized_task_arithmetic_weighted_adapter`: `merge` over the `ΔWᵢ`, then a rank-`rank` SVD,
/// then the optional `svd_clamp`.
#[allow(clippy::too_many_arguments)]
fn combine_deltas(
    parts: &Parts,
    weights: &[f64],
    merge: &Merge,
    rank: usize,
    clamp: Option<f64>,
    path: &str,
    rng: &mut StdRng,
) -> Result<(Array2<f64>, Array2<f64>)> {
    let (out_f, in_f) = (parts[0].1.nrows(), parts[0].0.ncols());
    if rank == 0 || rank > out_f.min(in_f) {
        crate::error::fail!(LoraError::Rank {
            method: "add_weighted_adapter",
            site: path.into(),
            r: rank,
            max: out_f.min(in_f)
        });
    }
    let deltas: Vec<ArrayD<f64>> = parts.iter().map(|(pa, pb, s)| (pb.dot(pa) * *s).into_dyn()).collect();
    let dw = d2(merge.apply(&deltas, weights, rng)?);
    let (u, sv, vt) = peft_core::linalg::svd(&dw)?;
    let mut b = Array2::from_shape_fn((out_f, rank), |(i, j)| u[[i, j]] * sv[j]);
    let mut a = vt.slice(s![..rank, ..]).to_owned();
    if let Some(q) = clamp {
        clamp_factors(&mut a, &mut b, q);
    }
    Ok((a, b))
}

/// PEFT's `add_weighted_adapter` on a [`PeftModel`] with LoRA adapters.
pub trait WeightedExt {
    /// Adds adapter `name` combining the LoRA `adapters` with `weights` (see the module docs). The new adapter is
    /// inactive.
    ///
    /// # Errors
    /// [`peft_core::Error::Count`] (as an adapter error) for mismatched lengths, [`crate::LoraError::Combine`] for unequal ranks under
    /// `Linear`/`Factors`, DoRA adapters, adapters on different sites, a zero SVD rank, or a bad density;
    /// [`peft_core::adapter::AdapterError::UnknownAdapter`]; adapters that are not LoRA.
    fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        name: &str,
        how: Combination,
    ) -> AdapterResult<()>;
}

struct Source {
    name: String,
    config: LoraConfig,
    layers: Vec<(Linear, std::sync::Arc<LoraLinear>)>,
}

impl<M: Module> WeightedExt for PeftModel<M> {
    fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        name: &str,
        how: Combination,
    ) -> AdapterResult<()> {
        const OP: &str = "add_weighted_adapter";
        if adapters.is_empty() {
            return Err(Error::Empty { op: OP, what: "the adapter list" }.into());
        }
        if adapters.len() != weights.len() {
            return Err(Error::Count {
                op: OP,
                what: "weights per adapter",
                expected: adapters.len(),
                got: weights.len(),
            }
            .into());
        }
        // PEFT: "if there is only one adapter, we can only use linear merging".
        let how = if adapters.len() == 1 { Combination::Linear } else { how };
        let seed = match how {
            Combination::Factors { merge: Merge::DareLinear { seed, .. } | Merge::DareTies { seed, .. } }
            | Combination::DeltaSvd { merge: Merge::DareLinear { seed, .. } | Merge::DareTies { seed, .. }, .. } => {
                seed
            }
            _ => 0,
        };
        let mut sets = Vec::new();
        for n in adapters {
            let config = self
                .config(n)?
                .as_any()
                .downcast_ref::<LoraConfig>()
                .cloned()
                .ok_or_else(|| peft_core::adapter::not_supported(n, "?", OP, "not a LoRA adapter"))?;
            sets.push(Source { name: n.to_string(), config, layers: self.lora_layers(n)? });
        }
        // PEFT: `new_rank = svd_rank or max(adapters_ranks)` (the configs' `r`).
        let max_r = sets.iter().map(|s| s.config.r).max().unwrap_or(0);
        let paths: Vec<String> = sets[0].layers.iter().map(|(s, _)| s.path().to_string()).collect();
        for s in &sets {
            if s.config.use_dora || s.config.lora_bias {
                crate::error::fail!(LoraError::Combine {
                    problem: CombineProblem::NotCombinable { adapter: s.name.clone() }
                });
            }
            if s.layers.iter().map(|(l, _)| l.path()).ne(paths.iter().map(String::as_str)) {
                crate::error::fail!(LoraError::Combine {
                    problem: CombineProblem::DifferentSites { first: sets[0].name.clone(), other: s.name.clone() },
                });
            }
        }
        let mut new = Vec::new();
        for (k, path) in paths.iter().enumerate() {
            let parts: Vec<(Array2<f64>, Array2<f64>, f64)> = sets
                .iter()
                .map(|s| {
                    let l = &s.layers[k].1;
                    (m2(&l.lora_a().value().to_owned()), m2(&l.lora_b().value().to_owned()), l.scaling())
                })
                .collect();
            let mut rng = StdRng::seed_from_u64(seed ^ fnv(path));
            let (a, b) = match how {
                Combination::Linear => combine_factors(&parts, weights, &Merge::TaskArithmetic, path, &mut rng)?,
                Combination::Factors { merge } => combine_factors(&parts, weights, &merge, path, &mut rng)?,
                Combination::Cat => {
                    let as_: Vec<Array2<f64>> = parts.iter().zip(weights).map(|(p, &w)| &p.0 * (w * p.2)).collect();
                    let av: Vec<_> = as_.iter().map(|a| a.view()).collect();
                    let bv: Vec<_> = parts.iter().map(|p| p.1.view()).collect();
                    let shape_err =
                        |_| LoraError::Combine { problem: CombineProblem::ShapeMismatch { site: path.clone() } };
                    (concatenate(Axis(0), &av).map_err(shape_err)?, concatenate(Axis(1), &bv).map_err(shape_err)?)
                }
                Combination::Svd { rank, clamp } => combine_deltas(
                    &parts,
                    weights,
                    &Merge::TaskArithmetic,
                    rank.unwrap_or(max_r),
                    clamp,
                    path,
                    &mut rng,
                )?,
                Combination::DeltaSvd { merge, rank, clamp } => {
                    combine_deltas(&parts, weights, &merge, rank.unwrap_or(max_r), clamp, path, &mut rng)?
                }
            };
            new.push((path.clone(), a.mapv(|v| v as f32), b.mapv(|v| v as f32)));
        }
        // Config: exact site list, per-site rank with alpha = rank (scaling 1).
        let mut cfg = LoraConfig {
            init_lora_weights: InitLoraWeights::Bool(true),
            use_rslora: false,
            use_dora: false,
            target_modules: Some(ModulePattern::List(paths.clone())),
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            ..sets[0].config.clone()
        };
        cfg.r = new[0].1.nrows();
        cfg.lora_alpha = num(cfg.r as f64);
        cfg.rank_pattern.clear();
        cfg.alpha_pattern.clear();
        for (p, a, _) in &new {
            if a.nrows() != cfg.r {
                cfg.rank_pattern.insert(regex_escape(p), a.nrows().into());
                cfg.alpha_pattern.insert(regex_escape(p), Value::Number(num(a.nrows() as f64)));
            }
        }
        self.add_adapter(name, cfg)?;
        for ((_, l), (_, a, b)) in self.lora_layers(name)?.iter().zip(&new) {
            l.lora_a().set(a.clone().into_dyn())?;
            l.lora_b().set(b.clone().into_dyn())?;
        }
        Ok(())
    }
}

fn regex_escape(p: &str) -> String {
    p.replace('.', r"\.")
}

#[cfg(test)]
mod tests {
    use peft_core::nn::Ctx;
    use peft_core::testing::max_abs_diff;

    use peft_core::adapter::PeftModel;

    use super::*;
    use crate::layer::LoraLinear;
    use crate::testutil::{input, Tiny};

    type LoraModel = PeftModel<Tiny>;

    fn two() -> LoraModel {
        let mut lm = PeftModel::new(Tiny::new(6, 1, 1), LoraConfig::new(2, 4.0, ["query", "value"]), "a", 0).unwrap();
        let mut c = LoraConfig::new(3, 6.0, ["query", "value"]);
        c.use_rslora = true;
        lm.add_adapter("b", c).unwrap();
        for n in ["a", "b"] {
            for p in lm.adapter_params(n).unwrap() {
                p.update(|v| v.mapv_inplace(|x| x + 0.05));
            }
        }
        lm
    }

    fn delta(lm: &LoraModel, n: &str) -> Vec<Array2<f32>> {
        lm.lora_layers(n).unwrap().iter().map(|(_, l)| l.lora_weight().unwrap()).collect()
    }

    #[test]
    fn cat_is_the_exact_weighted_sum_and_svd_at_full_rank_too() {
        let mut lm = two();
        lm.add_weighted_adapter(&["a", "b"], &[0.7, -0.4], "c", Combination::Cat).unwrap();
        lm.add_weighted_adapter(&["a", "b"], &[0.7, -0.4], "s", Combination::Svd { rank: Some(5), clamp: None })
            .unwrap();
        let (da, db, dc, ds) = (delta(&lm, "a"), delta(&lm, "b"), delta(&lm, "c"), delta(&lm, "s"));
        for k in 0..da.len() {
            let want = &da[k] * 0.7 + &db[k] * -0.4;
            assert!(max_abs_diff(want.as_slice().unwrap(), dc[k].as_slice().unwrap()) < 1e-5);
            assert!(max_abs_diff(want.as_slice().unwrap(), ds[k].as_slice().unwrap()) < 1e-5);
        }
        assert_eq!(lm.lora_layers("c").unwrap()[0].1.spec().r, 5);
        // Forward with the combined adapter equals forward with both adapters weighted... checked via ΔW above;
        // and the new adapter is usable.
        lm.set_adapter("c").unwrap();
        let x = input(2, 6, 3);
        assert!(lm.forward(&x, &Ctx::eval()).is_ok());
    }

    #[test]
    fn linear_follows_peft_and_is_exact_for_one_adapter() {
        let mut lm = two();
        for (w, n) in [(0.5, "h"), (-0.7, "neg")] {
            lm.add_weighted_adapter(&["a"], &[w], n, Combination::Linear).unwrap();
            let (da, dh) = (delta(&lm, "a"), delta(&lm, n));
            for k in 0..da.len() {
                let want = &da[k] * w as f32;
                assert!(max_abs_diff(want.as_slice().unwrap(), dh[k].as_slice().unwrap()) < 1e-5);
            }
        }
        assert!(lm.add_weighted_adapter(&["a", "b"], &[0.5, 0.5], "x", Combination::Linear).is_err());
        assert!(lm.add_weighted_adapter(&["a", "b"], &[1.0], "z", Combination::Cat).is_err());
    }

    /// PEFT 0.21 fixture: the same two adapters combined by PEFT; `s·B·A` of each combination must agree
    /// (`linear`, `cat` to f32 rounding; `svd` to 1e-4 relative).
    #[test]
    fn combinations_match_peft() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/weighted");
        let base = peft_core::io::SafeTensorsFile::open(dir.join("base.safetensors")).unwrap();
        let want = peft_core::io::SafeTensorsFile::open(dir.join("deltas.safetensors")).unwrap();
        let mut lm = PeftModel::wrap(Tiny::load(8, 2, &base), 0);
        lm.load_adapter(&dir.join("adapters"), "default", &crate::registry()).unwrap();
        lm.load_adapter(&dir.join("adapters/other"), "other", &crate::registry()).unwrap();
        let w = [0.7, -0.4];
        lm.add_weighted_adapter(&["default", "other"], &w, "lin", Combination::Linear).unwrap();
        lm.add_weighted_adapter(&["default", "other"], &w, "cat", Combination::Cat).unwrap();
        lm.add_weighted_adapter(&["default", "other"], &w, "svd", Combination::Svd { rank: Some(3), clamp: None })
            .unwrap();
        for c in ["lin", "cat", "svd"] {
            let mut worst = 0f32;
            let mut scale = 0f32;
            for (site, l) in &lm.lora_layers(c).unwrap() {
                let got = l.lora_weight().unwrap();
                let exp = want.get(&format!("{}.{c}", site.path())).unwrap();
                worst = worst.max(max_abs_diff(got.as_slice().unwrap(), exp.as_slice().unwrap()));
                scale = scale.max(exp.iter().fold(0f32, |m, v| m.max(v.abs())));
            }
            eprintln!("{c}: max |dW - dW_peft| = {worst:e} (max |dW| = {scale})");
            let tol = if c == "svd" { 1e-4 * scale.max(1.0) } else { 1e-5 };
            assert!(worst < tol, "{c}: {worst}");
        }
    }

    fn load_weighted() -> (LoraModel, peft_core::io::SafeTensorsFile) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/weighted");
        let base = peft_core::io::SafeTensorsFile::open(dir.join("base.safetensors")).unwrap();
        let want = peft_core::io::SafeTensorsFile::open(dir.join("merges.safetensors")).unwrap();
        let mut lm = PeftModel::wrap(Tiny::load(8, 2, &base), 0);
        lm.load_adapter(&dir.join("adapters"), "default", &crate::registry()).unwrap();
        lm.load_adapter(&dir.join("adapters/other"), "other", &crate::registry()).unwrap();
        (lm, want)
    }

    /// PEFT 0.21 fixture (gen_merge_fixture.py): ties / magnitude_prune on the factors must give PEFT's A and B,
    /// and every merge (the *_svd ones included) PEFT's ΔW, within 1e-5.
    #[test]
    fn pruning_merges_match_peft() {
        let (mut lm, want) = load_weighted();
        let w = [0.7, -0.4];
        let combos = [
            ("ties_total", "ties", "total"),
            ("ties_frequency", "ties", "frequency"),
            ("magnitude_prune", "magnitude_prune", "total"),
            ("ties_svd_total", "ties_svd", "total"),
            ("ties_svd_frequency", "ties_svd", "frequency"),
            ("magnitude_prune_svd", "magnitude_prune_svd", "total"),
        ];
        for (name, ty, sign) in combos {
            let how = Combination::from_peft(ty, Some(3), None, Some(0.5), sign, 0).unwrap();
            lm.add_weighted_adapter(&["default", "other"], &w, name, how).unwrap();
            let set = lm.lora_layers(name).unwrap();
            assert_eq!(set.len(), 4);
            for (site, l) in &set {
                assert_eq!(l.scaling(), 1.0);
                let key = |t: &str| format!("{}.{name}.{t}", site.path());
                let dw = want.get(&key("dW")).unwrap();
                let err = max_abs_diff(l.lora_weight().unwrap().as_slice().unwrap(), dw.as_slice().unwrap());
                assert!(err < 1e-5, "{name} at {}: ΔW differs by {err}", site.path());
                if !ty.ends_with("_svd") {
                    for (t, p) in [("A", l.lora_a()), ("B", l.lora_b())] {
                        let got = p.value().to_owned();
                        let err = max_abs_diff(got.as_slice().unwrap(), want.get(&key(t)).unwrap().as_slice().unwrap());
                        assert!(err < 1e-5, "{name} at {}: {t} differs by {err}", site.path());
                    }
                } else {
                    assert_eq!(l.spec().r, 3);
                }
            }
        }
    }

    /// DARE: reproducible from the seed, differs across seeds, and its expectation over seeds is the `linear` merge
    /// (factors) / the exact weighted sum (ΔW); about `density` of the entries survive.
    #[test]
    fn dare_is_seeded_and_unbiased() {
        let (mut lm, _) = load_weighted();
        let w = [0.7, -0.4];
        let density = 0.6;
        let factor = |seed| Combination::Factors { merge: Merge::DareLinear { density, seed, rescale: true } };
        lm.add_weighted_adapter(&["default", "other"], &w, "lin", Combination::Linear).unwrap();
        lm.add_weighted_adapter(&["default", "other"], &w, "d1", factor(1)).unwrap();
        lm.add_weighted_adapter(&["default", "other"], &w, "d1b", factor(1)).unwrap();
        lm.add_weighted_adapter(&["default", "other"], &w, "d2", factor(2)).unwrap();
        fn a(lm: &LoraModel, n: &str) -> ndarray::ArrayD<f32> {
            lm.lora_layers(n).unwrap()[0].1.lora_a().value().to_owned()
        }
        assert_eq!(a(&lm, "d1"), a(&lm, "d1b"));
        assert_ne!(a(&lm, "d1"), a(&lm, "d2"));
        // Average of the A factors over many seeds -> the linear merge's A (DARE's mask is unbiased).
        let n = 400;
        let mut mean = ndarray::ArrayD::<f32>::zeros(a(&lm, "lin").raw_dim());
        let mut kept = 0usize;
        let mut total = 0usize;
        for seed in 0..n {
            let name = format!("s{seed}");
            lm.add_weighted_adapter(&["default", "other"], &w, &name, factor(100 + seed)).unwrap();
            let v = a(&lm, &name);
            mean = mean + &v / n as f32;
            lm.delete_adapter(&name).unwrap();
        }
        let l0 = |n: &str| lm.lora_layers(n).unwrap()[0].1.clone();
        let lin = l0("lin").lora_a().value().to_owned();
        // Per entry, the std of the mean is sqrt((1-d)/d · Σᵢ (waᵢ·Aᵢ)² / n); allow 5 of them.
        let mut var = ndarray::ArrayD::<f32>::zeros(lin.raw_dim());
        for (nm, wi) in [("default", w[0]), ("other", w[1])] {
            let l = l0(nm);
            let c = (wi * l.scaling()).abs() as f32;
            var = var + l.lora_a().value().mapv(|v| c * v * v);
        }
        let tol = var.mapv(|v| 5.0 * ((1.0 - density as f32) / density as f32 * v / n as f32).sqrt() + 1e-6);
        for ((m, l), t) in mean.iter().zip(&lin).zip(&tol) {
            assert!((m - l).abs() <= *t, "mean of DARE A {m} vs linear A {l} (tol {t})");
        }
        // Density: the merged factor of one adapter pruned by DARE keeps about `density` of its entries.
        let single = lm.lora_layers("default").unwrap()[0].1.lora_a().value().to_owned();
        let t = single.mapv(f64::from);
        for seed in 0..50 {
            let p = crate::merge_utils::random_prune(&t, density, true, &mut StdRng::seed_from_u64(seed));
            kept += p.iter().filter(|&&x| x != 0.0).count();
            total += p.len();
            assert!(p.iter().zip(&t).all(|(&q, &o)| q == 0.0 || (q - o / density).abs() < 1e-12));
        }
        let frac = kept as f64 / total as f64;
        assert!((frac - density).abs() < 0.03, "kept {frac}");
        // dare_ties and the _svd forms run and are seeded too.
        for ty in ["dare_ties", "dare_linear_svd", "dare_ties_svd"] {
            let how = Combination::from_peft(ty, Some(2), None, Some(density), "frequency", 9).unwrap();
            lm.add_weighted_adapter(&["default", "other"], &w, &format!("{ty}1"), how).unwrap();
            lm.add_weighted_adapter(&["default", "other"], &w, &format!("{ty}2"), how).unwrap();
            let d = |n: String| lm.lora_layers(&n).unwrap()[1].1.lora_weight().unwrap();
            assert_eq!(d(format!("{ty}1")), d(format!("{ty}2")));
        }
    }

    /// The `_svd` DARE merge at full rank with density 1 is the exact weighted sum; `linear` is not (cross terms),
    /// except with one adapter. Documents where `linear` differs from `Σ wᵢ·ΔWᵢ`.
    #[test]
    fn linear_differs_from_the_weighted_sum_by_the_cross_terms() {
        let (mut lm, _) = load_weighted();
        let w = [0.7, -0.4];
        lm.add_weighted_adapter(&["default", "other"], &w, "lin", Combination::Linear).unwrap();
        let full = Combination::DeltaSvd {
            merge: Merge::DareLinear { density: 1.0, seed: 0, rescale: true },
            rank: Some(4),
            clamp: None,
        };
        lm.add_weighted_adapter(&["default", "other"], &w, "exact", full).unwrap();
        for k in 0..4 {
            let l = |n: &str| lm.lora_layers(n).unwrap()[k].1.clone();
            let (d0, d1) = (l("default"), l("other"));
            let sum = d0.lora_weight().unwrap() * 0.7 + d1.lora_weight().unwrap() * -0.4;
            let exact = l("exact").lora_weight().unwrap();
            assert!(max_abs_diff(sum.as_slice().unwrap(), exact.as_slice().unwrap()) < 1e-5);
            // linear = Σᵢⱼ √|cᵢ|·sign(cⱼ)√|cⱼ|·Bᵢ·Aⱼ: the weighted sum plus the i ≠ j cross terms.
            let c = [0.7 * d0.scaling(), -0.4 * d1.scaling()];
            let f = |a: &LoraLinear, ca: f64, b: &LoraLinear, cb: f64| {
                let bm = b.lora_b().value().to_owned().into_dimensionality::<Ix2>().unwrap();
                let am = a.lora_a().value().to_owned().into_dimensionality::<Ix2>().unwrap();
                bm.dot(&am) * (cb.abs().sqrt() * ca.signum() * ca.abs().sqrt()) as f32
            };
            let cross = f(&d1, c[1], &d0, c[0]) + f(&d0, c[0], &d1, c[1]);
            let lin = l("lin").lora_weight().unwrap();
            let want = &sum + &cross;
            assert!(max_abs_diff(want.as_slice().unwrap(), lin.as_slice().unwrap()) < 1e-5);
            assert!(cross.iter().any(|v| v.abs() > 1e-3), "the cross terms matter here");
        }
    }

    #[test]
    fn from_peft_parses_every_combination_type() {
        let p = |t: &str| Combination::from_peft(t, Some(4), Some(0.9), Some(0.3), "total", 5);
        assert_eq!(p("linear").unwrap(), Combination::Linear);
        assert_eq!(p("cat").unwrap(), Combination::Cat);
        assert_eq!(p("svd").unwrap(), Combination::Svd { rank: Some(4), clamp: Some(0.9) });
        let ties = Merge::Ties { density: 0.3, sign: MajoritySign::Total };
        assert_eq!(p("ties").unwrap(), Combination::Factors { merge: ties });
        assert_eq!(p("ties_svd").unwrap(), Combination::DeltaSvd { merge: ties, rank: Some(4), clamp: Some(0.9) });
        assert_eq!(
            p("dare_ties_svd").unwrap(),
            Combination::DeltaSvd {
                merge: Merge::DareTies { density: 0.3, sign: MajoritySign::Total, seed: 5, rescale: true },
                rank: Some(4),
                clamp: Some(0.9),
            }
        );
        assert_eq!(
            p("dare_linear").unwrap(),
            Combination::Factors { merge: Merge::DareLinear { density: 0.3, seed: 5, rescale: true } }
        );
        assert_eq!(
            p("dare_ties_svd").unwrap().peft_dare(),
            Combination::DeltaSvd {
                merge: Merge::DareTies { density: 0.3, sign: MajoritySign::Total, seed: 5, rescale: false },
                rank: Some(4),
                clamp: Some(0.9),
            }
        );
        assert_eq!(p("ties").unwrap().peft_dare(), p("ties").unwrap());
        assert_eq!(
            p("magnitude_prune").unwrap(),
            Combination::Factors { merge: Merge::MagnitudePrune { density: 0.3 } }
        );
        assert!(p("cat_svd").is_err() && p("linear_svd").is_err() && p("nope").is_err());
        assert!(Combination::from_peft("ties", None, None, None, "total", 0).is_err());
        assert!(Combination::from_peft("ties", None, None, Some(0.5), "median", 0).is_err());
        assert!(Combination::from_peft("svd", None, Some(1.5), None, "total", 0).is_err());
        assert!(Combination::from_peft("svd", None, Some(f64::NAN), None, "total", 0).is_err());
        assert_eq!(
            Combination::from_peft("ties_svd", None, None, Some(0.5), "total", 0).unwrap(),
            Combination::DeltaSvd {
                merge: Merge::Ties { density: 0.5, sign: MajoritySign::Total },
                rank: None,
                clamp: None
            }
        );
    }

    /// `torch.quantile` semantics: linear interpolation at `q·(n-1)`; ends are min and max.
    #[test]
    fn quantile_interpolates_like_torch() {
        let v = [3.0, -1.0, 2.0, 10.0];
        let q = |x: f64| quantile(&mut v.to_vec(), x);
        assert_eq!((q(0.0), q(1.0)), (-1.0, 10.0));
        // sorted [-1, 2, 3, 10]: position 0.5·3 = 1.5 -> 2.5; position 0.9·3 = 2.7 -> 3 + 0.7·7 = 7.9.
        assert!((q(0.5) - 2.5).abs() < 1e-12 && (q(0.9) - 7.9).abs() < 1e-12);
        assert_eq!(quantile(&mut [4.0], 0.3), 4.0);
    }

    /// PEFT's defaults and `svd_clamp`: no rank means the largest adapter `r`; a clamp bounds every factor entry
    /// by `±` the quantile of the unclamped signed entries and leaves the rest as they were. Even `clamp = 1` is
    /// not a no-op: the bound is the largest *signed* entry, so a more negative entry is clipped (as in PEFT).
    #[test]
    fn svd_default_rank_and_clamp() {
        let mut lm = two(); // r 2 and r 3
        let w = [0.7, -0.4];
        let svd = |rank, clamp| Combination::Svd { rank, clamp };
        lm.add_weighted_adapter(&["a", "b"], &w, "dflt", svd(None, None)).unwrap();
        lm.add_weighted_adapter(&["a", "b"], &w, "r3", svd(Some(3), None)).unwrap();
        lm.add_weighted_adapter(&["a", "b"], &w, "c1", svd(Some(3), Some(1.0))).unwrap();
        lm.add_weighted_adapter(&["a", "b"], &w, "c8", svd(Some(3), Some(0.8))).unwrap();
        let ties = Merge::Ties { density: 0.5, sign: MajoritySign::Total };
        lm.add_weighted_adapter(&["a", "b"], &w, "t", Combination::DeltaSvd { merge: ties, rank: None, clamp: None })
            .unwrap();
        assert_eq!(lm.lora_layers("dflt").unwrap()[0].1.spec().r, 3);
        assert_eq!(lm.lora_layers("t").unwrap()[0].1.spec().r, 3);
        let n = lm.lora_layers("r3").unwrap().len();
        let mut clamped = [0, 0];
        for k in 0..n {
            let l = |name: &str| lm.lora_layers(name).unwrap()[k].1.clone();
            let fac = |name: &str| {
                let l = l(name);
                let (a, b) = (l.lora_a().value().to_owned(), l.lora_b().value().to_owned());
                b.iter().chain(a.iter()).copied().collect::<Vec<f32>>()
            };
            let (d, r3) = (l("dflt").lora_weight().unwrap(), l("r3").lora_weight().unwrap());
            assert!(max_abs_diff(d.as_slice().unwrap(), r3.as_slice().unwrap()) < 1e-6);
            let raw = fac("r3");
            for (i, (name, q)) in [("c1", 1.0), ("c8", 0.8)].into_iter().enumerate() {
                let mut sorted: Vec<f64> = raw.iter().map(|&v| f64::from(v)).collect();
                let h = quantile(&mut sorted, q) as f32;
                for (&r, &c) in raw.iter().zip(&fac(name)) {
                    let want = r.clamp(-h, h);
                    assert!((c - want).abs() <= 1e-6 * h.abs().max(1.0), "{name}: {r} clamped to {c}, want {want}");
                    clamped[i] += usize::from(r.abs() > h);
                }
            }
        }
        assert!(clamped[1] > clamped[0], "the 0.8 quantile clamps more than the maximum: {clamped:?}");
    }

    #[test]
    fn factor_merges_need_equal_ranks_and_one_adapter_is_linear() {
        let mut lm = two();
        let ties = Combination::Factors { merge: Merge::Ties { density: 0.5, sign: MajoritySign::Total } };
        assert!(lm.add_weighted_adapter(&["a", "b"], &[0.5, 0.5], "t", ties).is_err());
        // One adapter: PEFT falls back to linear whatever the type.
        lm.add_weighted_adapter(&["a"], &[0.5], "t1", ties).unwrap();
        lm.add_weighted_adapter(&["a"], &[0.5], "l1", Combination::Linear).unwrap();
        assert_eq!(delta(&lm, "t1"), delta(&lm, "l1"));
    }
}
