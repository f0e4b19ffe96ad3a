//! Hydra (Kim et al., 2024; extremebird/Hydra): a parallel and a sequential low-rank branch on one linear site.
//!
//! For a site `h = W₀x + b₀` the adapter gives `y = h + s·B_p A_p x + s·B_s A_s h` with `A_p [r_p, in]`,
//! `B_p [out, r_p]`, `A_s [r_s, out]`, `B_s [out, r_s]` (the NLU code: no branch biases). Init: `A_p`, `A_s`
//! Kaiming-uniform, `B_p = B_s = 0`, so the adapted site is the base site at init. The map is linear in `x`, so
//! it merges exactly: `W' = W₀ + s·B_pA_p + s·B_sA_sW₀`, `b' = b₀ + s·B_sA_s b₀`.
//!
//! Files: the LoRA layout with `peft_type = "HYDRA"`; the parallel branch is saved as `lora_A.weight` /
//! `lora_B.weight`, the sequential one as `hydra_seq_A.weight` / `hydra_seq_B.weight`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use ndarray::{Array1, Array2, ArrayD, Ix1, Ix2};
use peft_core::adapter::ModulePattern;
use peft_core::nn::{Ctx, LinearAdapter, LinearBase, Module};
use peft_core::{Error, Param, Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::structured::{kaiming, read_adapter, write_adapter, Injected, SavedTensors};

fn d_peft_type() -> String {
    "HYDRA".into()
}

/// Hydra's config (`adapter_config.json`, LoRA-style keys plus `sequential_r`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HydraConfig {
    /// Always `"HYDRA"`.
    #[serde(default = "d_peft_type")]
    pub peft_type: String,
    /// Rank `r_p` of the parallel branch (NLU recipe: 4).
    pub r: usize,
    /// Rank `r_s` of the sequential branch (NLU recipe: 8).
    pub sequential_r: usize,
    /// Scaling `s` applied to both branches (the authors' `scale`; 1.0 in the NLU code).
    pub scale: f64,
    /// Sites to adapt (NLU recipe: the FFN output dense, `output.dense`).
    pub target_modules: ModulePattern,
    /// Sites never adapted.
    #[serde(default)]
    pub exclude_modules: Option<ModulePattern>,
    /// `"SEQ_CLS"`, ... (informational).
    #[serde(default)]
    pub task_type: Option<String>,
    /// True in saved files (as PEFT writes).
    #[serde(default)]
    pub inference_mode: bool,
}

impl HydraConfig {
    /// Ranks `r_p`, `r_s`, scale 1 on `targets`.
    pub fn new<S: Into<String>>(r: usize, sequential_r: usize, targets: impl IntoIterator<Item = S>) -> Self {
        HydraConfig {
            peft_type: d_peft_type(),
            r,
            sequential_r,
            scale: 1.0,
            target_modules: ModulePattern::list(targets),
            exclude_modules: None,
            task_type: None,
            inference_mode: false,
        }
    }

    /// Checks ranks and scale.
    ///
    /// # Errors
    /// [`Error::Invalid`] for a zero rank or a non-finite scale.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 || self.sequential_r == 0 {
            crate::bail!(
                "HydraConfig",
                "ranks must be positive (r = {}, sequential_r = {})",
                self.r,
                self.sequential_r
            );
        }
        if !self.scale.is_finite() {
            crate::bail!("HydraConfig", "scale {} is not finite", self.scale);
        }
        Ok(())
    }
}

/// The weight delta of a merge and the bias it replaced.
type MergeRecord = (ArrayD<f32>, Option<ArrayD<f32>>);

/// Hydra on one linear site.
pub struct HydraLinear {
    name: String,
    scale: f32,
    ap: Param,
    bp: Param,
    a_s: Param,
    b_s: Param,
    /// The weight delta and the original bias of the last merge, for an exact unmerge.
    merged: Mutex<Option<MergeRecord>>,
}

fn m2(p: &Param) -> Result<Array2<f32>> {
    p.value()
        .to_owned()
        .into_dimensionality::<Ix2>()
        .map_err(|_| Error::Invalid { op: "hydra", msg: format!("{} is not a matrix", p.name()) })
}

impl HydraLinear {
    /// Creates adapter `name` for the site at `path` over `base`, initialised from `rng`.
    ///
    /// # Errors
    /// [`Error::Invalid`] for zero ranks.
    pub fn new(
        path: &str,
        name: &str,
        base: &dyn LinearBase,
        cfg: &HydraConfig,
        rng: &mut impl rand::Rng,
    ) -> Result<Self> {
        cfg.validate()?;
        let (i, o) = (base.in_features(), base.out_features());
        let p = |k: &str, v: Array2<f32>| Param::new(format!("{path}.{k}.{name}.weight"), v.into_dyn(), true);
        Ok(HydraLinear {
            name: name.to_string(),
            scale: cfg.scale as f32,
            ap: p("lora_A", kaiming(i, cfg.r, i, rng)),
            bp: p("lora_B", Array2::zeros((o, cfg.r))),
            a_s: p("hydra_seq_A", kaiming(o, cfg.sequential_r, o, rng)),
            b_s: p("hydra_seq_B", Array2::zeros((o, cfg.sequential_r))),
            merged: Mutex::new(None),
        })
    }

    /// `(A_p, B_p, A_s, B_s)`.
    pub fn factors(&self) -> [&Param; 4] {
        [&self.ap, &self.bp, &self.a_s, &self.b_s]
    }
}

impl LinearAdapter for HydraLinear {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> &str {
        "hydra"
    }

    fn delta(&self, x: &Tensor, base_out: &Tensor, _base: &dyn LinearBase, _ctx: &Ctx) -> Result<Tensor> {
        let par = x.linear(&self.ap.tensor(), None)?.linear(&self.bp.tensor(), None)?;
        let seq = base_out.linear(&self.a_s.tensor(), None)?.linear(&self.b_s.tensor(), None)?;
        Ok(par.add(&seq)?.mul_scalar(self.scale))
    }

    fn params(&self) -> Vec<Param> {
        vec![self.ap.clone(), self.bp.clone(), self.a_s.clone(), self.b_s.clone()]
    }

    /// `s·B_pA_p + s·B_sA_sW₀`; also folds `s·B_sA_s b₀` into the bias (the trait merges weights only, so the bias
    /// is updated here and restored exactly by the unmerge).
    fn delta_weight(&self, base: &dyn LinearBase) -> Result<Option<ArrayD<f32>>> {
        let w = base.dense_weight()?;
        let w =
            w.view().into_dimensionality::<Ix2>().map_err(|_| Error::Invalid { op: "hydra", msg: "weight".into() })?;
        let s = self.scale;
        let seq = m2(&self.b_s)?.dot(&m2(&self.a_s)?);
        let dw = (m2(&self.bp)?.dot(&m2(&self.ap)?) + seq.dot(&w)).mapv(|v| v * s).into_dyn();
        if dw.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite { what: format!("hydra merge delta of `{}`", self.name) });
        }
        let old_bias = match base.bias() {
            Some(b) => {
                let b0 = b.value().to_owned();
                let b1 = b0
                    .view()
                    .into_dimensionality::<Ix1>()
                    .map_err(|_| Error::Invalid { op: "hydra", msg: "bias".into() })?;
                let nb: Array1<f32> = &b1 + &seq.dot(&b1).mapv(|v| v * s);
                b.set(nb.into_dyn())?;
                Some(b0)
            }
            None => None,
        };
        *self.merged.lock().unwrap_or_else(|p| p.into_inner()) = Some((dw.clone(), old_bias));
        Ok(Some(dw))
    }

    fn unmerge_delta_weight(&self, base: &dyn LinearBase) -> Result<Option<ArrayD<f32>>> {
        let Some((dw, b0)) = self.merged.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            crate::bail!("unmerge", "hydra adapter `{}` has no recorded merge", self.name);
        };
        if let (Some(b), Some(b0)) = (base.bias(), b0) {
            b.set(b0)?;
        }
        Ok(Some(dw))
    }
}

/// The tensors saved for this site, by key suffix.
impl SavedTensors for HydraLinear {
    fn saved_tensors(&self) -> Vec<(&'static str, &Param)> {
        vec![
            ("lora_A.weight", &self.ap),
            ("lora_B.weight", &self.bp),
            ("hydra_seq_A.weight", &self.a_s),
            ("hydra_seq_B.weight", &self.b_s),
        ]
    }
}

/// A model with one Hydra adapter.
pub struct HydraModel {
    /// The config.
    pub config: HydraConfig,
    /// The adapted sites.
    pub adapter: Injected<HydraLinear>,
}

impl HydraModel {
    /// Injects adapter `name` into the sites of `model` selected by `config`, initialised from `seed`.
    ///
    /// # Errors
    /// Invalid config; [`Error::NoTargetMatched`].
    pub fn new(model: &dyn Module, config: HydraConfig, name: &str, seed: u64) -> Result<Self> {
        config.validate()?;
        let (targets, exclude) = (&config.target_modules, config.exclude_modules.as_ref());
        let adapter = Injected::inject(model, targets, exclude, name, seed, |s, rng| {
            HydraLinear::new(s.path(), name, s.base().as_ref(), &config, rng)
        })?;
        Ok(HydraModel { config, adapter })
    }

    /// The trainable parameters.
    pub fn trainable_params(&self) -> Vec<Param> {
        self.adapter.trainable_params()
    }

    /// The tensors as saved, by file key.
    pub fn state_dict(&self) -> BTreeMap<String, ArrayD<f32>> {
        self.adapter.state_dict()
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`.
    ///
    /// # Errors
    /// IO errors.
    pub fn save_pretrained(&self, dir: &Path) -> Result<u64> {
        let cfg = HydraConfig { inference_mode: true, ..self.config.clone() };
        write_adapter(dir, &cfg, &self.state_dict())
    }

    /// Injects the adapter saved in `dir` into `model` under `name`.
    ///
    /// # Errors
    /// IO errors; a config of another type; missing or mis-shaped tensors.
    pub fn load(model: &dyn Module, dir: &Path, name: &str) -> Result<Self> {
        let (config, file) = read_adapter::<HydraConfig>(dir, "HYDRA")?;
        let mut me = Self::new(model, config, name, 0)?;
        me.adapter.load_tensors(&file)?;
        Ok(me)
    }
}

#[cfg(test)]
#[path = "hydra_tests.rs"]
mod tests;
