//! `add_weighted_adapter`: a new adapter from a weighted combination of existing ones (PEFT's `linear`, `cat`,
//! `svd` combination types).
//!
//! With adapters `i` (scaling `sᵢ`, weight `wᵢ`), the *intended* update is `ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ`.
//! - `Cat` realises it exactly with rank `Σ rᵢ`: `A = [w₁s₁A₁; w₂s₂A₂; …]`, `B = [B₁, B₂, …]` (as PEFT 0.21).
//! - `Svd { rank }` is the best rank-`rank` approximation of the exact `ΔW` (truncated SVD, `B = U·S`, `A = Vᵀ`);
//!   PEFT's optional `svd_clamp` (off by default) is not implemented.
//! - `Linear` follows PEFT 0.21 exactly (equal ranks required): with `cᵢ = wᵢ·sᵢ`, `A = Σ sign(cᵢ)·√|cᵢ|·Aᵢ`,
//!   `B = Σ √|cᵢ|·Bᵢ`. Its `B·A` contains the cross terms `√|cᵢ|·sign(cⱼ)√|cⱼ|·Bᵢ·Aⱼ`, so it equals the weighted
//!   sum only for a single adapter or adapters sharing `A`; use `Cat` for the exact sum.
//!
//! The new adapter has `lora_alpha = r` per site (scaling 1), rsLoRA off, and targets exactly the combined sites.

use ndarray::{concatenate, s, Array2, ArrayD, Axis, Ix2};
use peft_core::adapter::ModulePattern;
use peft_core::{Error, Result};
use serde_json::Value;

use crate::config::{num, InitLoraWeights, LoraConfig};
use crate::model::LoraModel;

/// How adapters are combined.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Combination {
    /// PEFT's `linear` (√|w·s|-weighted sums of A and B; equal ranks).
    Linear,
    /// Concatenation: the exact weighted sum, rank `Σ rᵢ`.
    Cat,
    /// Truncated SVD of the exact weighted sum at this rank.
    Svd {
        /// The new rank.
        rank: usize,
    },
}

fn m2(a: &ArrayD<f32>) -> Array2<f64> {
    a.mapv(f64::from).into_dimensionality::<Ix2>().expect("peft-rs bug: adapter weights are matrices")
}

impl LoraModel {
    /// Adds adapter `name` combining `adapters` with `weights` (see the module docs). The new adapter is inactive.
    ///
    /// # Errors
    /// [`Error::Invalid`] for mismatched lengths, unequal ranks under `Linear`, DoRA
    /// adapters, adapters on different sites, or a zero SVD rank; [`Error::UnknownName`].
    pub fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        name: &str,
        how: Combination,
    ) -> Result<()> {
        const OP: &str = "add_weighted_adapter";
        if adapters.is_empty() || adapters.len() != weights.len() {
            crate::bail!(OP, "{} adapters but {} weights", adapters.len(), weights.len());
        }
        let sets = adapters.iter().map(|n| self.adapter(n)).collect::<Result<Vec<_>>>()?;
        let paths: Vec<String> = sets[0].layers.iter().map(|(s, _)| s.path().to_string()).collect();
        for s in &sets {
            if s.config.use_dora {
                crate::bail!(OP, "DoRA adapter `{}` cannot be combined", s.name);
            }
            if s.layers.iter().map(|(l, _)| l.path()).ne(paths.iter().map(String::as_str)) {
                crate::bail!(OP, "adapters `{}` and `{}` target different sites", sets[0].name, s.name);
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
            let (a, b) = match how {
                Combination::Linear => {
                    let r = parts[0].0.nrows();
                    if parts.iter().any(|p| p.0.nrows() != r) {
                        crate::bail!(OP, "`linear` needs equal ranks at `{path}`");
                    }
                    let mut a = Array2::zeros(parts[0].0.raw_dim());
                    let mut b = Array2::zeros(parts[0].1.raw_dim());
                    for ((pa, pb, s), &w) in parts.iter().zip(weights) {
                        let c: f64 = w * s;
                        a = a + pa * (c.signum() * c.abs().sqrt());
                        b = b + pb * c.abs().sqrt();
                    }
                    (a, b)
                }
                Combination::Cat => {
                    let as_: Vec<Array2<f64>> = parts.iter().zip(weights).map(|(p, &w)| &p.0 * (w * p.2)).collect();
                    let av: Vec<_> = as_.iter().map(|a| a.view()).collect();
                    let bv: Vec<_> = parts.iter().map(|p| p.1.view()).collect();
                    let shape_err = |_| Error::Invalid { op: OP, msg: format!("shape mismatch at `{path}`") };
                    (concatenate(Axis(0), &av).map_err(shape_err)?, concatenate(Axis(1), &bv).map_err(shape_err)?)
                }
                Combination::Svd { rank } => {
                    let (out_f, in_f) = (parts[0].1.nrows(), parts[0].0.ncols());
                    if rank == 0 || rank > out_f.min(in_f) {
                        crate::bail!(OP, "svd rank {rank} outside 1..={} at `{path}`", out_f.min(in_f));
                    }
                    let mut dw = Array2::<f64>::zeros((out_f, in_f));
                    for ((pa, pb, s), &w) in parts.iter().zip(weights) {
                        dw = dw + pb.dot(pa) * (w * s);
                    }
                    let (u, sv, vt) = peft_core::linalg::svd(&dw)?;
                    let b = Array2::from_shape_fn((out_f, rank), |(i, j)| u[[i, j]] * sv[j]);
                    (vt.slice(s![..rank, ..]).to_owned(), b)
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
        let set = self.adapter(name)?;
        for ((_, l), (_, a, b)) in set.layers.iter().zip(&new) {
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

    use super::*;
    use crate::testutil::{input, Tiny};

    fn two() -> (Tiny, LoraModel) {
        let m = Tiny::new(6, 1, 1);
        let mut lm = LoraModel::new(&m, LoraConfig::new(2, 4.0, ["query", "value"]), "a", 0).unwrap();
        let mut c = LoraConfig::new(3, 6.0, ["query", "value"]);
        c.use_rslora = true;
        lm.add_adapter("b", c).unwrap();
        for n in ["a", "b"] {
            for p in lm.adapter_params(n).unwrap() {
                p.update(|v| v.mapv_inplace(|x| x + 0.05));
            }
        }
        (m, lm)
    }

    fn delta(lm: &LoraModel, n: &str) -> Vec<Array2<f32>> {
        lm.adapter(n).unwrap().layers.iter().map(|(_, l)| l.lora_weight().unwrap()).collect()
    }

    #[test]
    fn cat_is_the_exact_weighted_sum_and_svd_at_full_rank_too() {
        let (m, mut lm) = two();
        lm.add_weighted_adapter(&["a", "b"], &[0.7, -0.4], "c", Combination::Cat).unwrap();
        lm.add_weighted_adapter(&["a", "b"], &[0.7, -0.4], "s", Combination::Svd { rank: 5 }).unwrap();
        let (da, db, dc, ds) = (delta(&lm, "a"), delta(&lm, "b"), delta(&lm, "c"), delta(&lm, "s"));
        for k in 0..da.len() {
            let want = &da[k] * 0.7 + &db[k] * -0.4;
            assert!(max_abs_diff(want.as_slice().unwrap(), dc[k].as_slice().unwrap()) < 1e-5);
            assert!(max_abs_diff(want.as_slice().unwrap(), ds[k].as_slice().unwrap()) < 1e-5);
        }
        assert_eq!(lm.adapter("c").unwrap().layers[0].1.spec().r, 5);
        // Forward with the combined adapter equals forward with both adapters weighted... checked via ΔW above;
        // and the new adapter is usable.
        lm.set_adapter("c").unwrap();
        let x = input(2, 6, 3);
        assert!(m.forward(&x, &Ctx::eval()).is_ok());
    }

    #[test]
    fn linear_follows_peft_and_is_exact_for_one_adapter() {
        let (_m, mut lm) = two();
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
        let m = Tiny::load(8, 2, &base);
        let mut lm = LoraModel::wrap(&m, 0);
        lm.load_adapter(&dir.join("adapters"), "default").unwrap();
        lm.load_adapter(&dir.join("adapters/other"), "other").unwrap();
        let w = [0.7, -0.4];
        lm.add_weighted_adapter(&["default", "other"], &w, "lin", Combination::Linear).unwrap();
        lm.add_weighted_adapter(&["default", "other"], &w, "cat", Combination::Cat).unwrap();
        lm.add_weighted_adapter(&["default", "other"], &w, "svd", Combination::Svd { rank: 3 }).unwrap();
        for c in ["lin", "cat", "svd"] {
            let mut worst = 0f32;
            let mut scale = 0f32;
            for (site, l) in &lm.adapter(c).unwrap().layers {
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
}
