//! ALLoRA (Huang et al., 2024), spec §2.8: LoRA without dropout and without the `α/r` scaling (`s = 1`), whose
//! LoRA gradients are rescaled by a coefficient inversely proportional to the parameters' ℓ2 norm.
//!
//! **Unconfirmed** (only the abstract is available): the coefficient form and its granularity. This implements
//! the spec's reconstruction, configurable: for each row `θ_j` of a LoRA matrix ([`Granularity::Row`]) or for the
//! whole matrix ([`Granularity::Matrix`]), `g_j ← g_j / √(‖θ_j‖² + 1/η²)` — bounded (= η) at `θ = 0` (B at init),
//! decreasing in `‖θ‖`. The paper rescales per sample; with the batch gradient this rescales the batch mean.
//! [`Allora`] applies it before any base [`Optimizer`] (the paper's base optimizer is unconfirmed; AdamW is the
//! usual choice, though Adam's normalisation cancels a constant per-tensor factor, so the row form matters there).

use peft_core::adapter::{AdapterError, AdapterResult, InjectCx, Tuner, TunerConfig};
use peft_core::autograd::GradStore;
use peft_core::nn::Module;
use peft_core::optim::{Optimizer, ParamGroup, StateDict};
use peft_core::{Param, Result};

use crate::config::LoraConfig;

/// Which parameter blocks share one norm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Granularity {
    /// Each row of a matrix (the spec's reconstruction).
    #[default]
    Row,
    /// The whole tensor.
    Matrix,
}

/// ALLoRA's hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AlloraConfig {
    /// The bound η of the coefficient (its value at θ = 0).
    pub eta: f64,
    /// Row or matrix norms.
    pub granularity: Granularity,
}

impl Default for AlloraConfig {
    fn default() -> Self {
        AlloraConfig { eta: 1.0, granularity: Granularity::Row }
    }
}

/// The coefficient `1/√(‖θ‖² + 1/η²)`.
pub fn allora_coefficient(norm: f64, eta: f64) -> f64 {
    1.0 / (norm * norm + 1.0 / (eta * eta)).sqrt()
}

/// A LoRA config in ALLoRA's setting: rank `r`, `lora_alpha = r` (so `s = 1`), no dropout.
pub fn allora_lora_config<S: Into<String>>(r: usize, targets: impl IntoIterator<Item = S>) -> LoraConfig {
    LoraConfig::new(r, r as f64, targets)
}

/// An optimizer wrapper that rescales the gradients of `scaled` parameters by [`allora_coefficient`] (from the
/// current parameter values) before the inner optimizer steps; other gradients pass unchanged.
pub struct Allora<O: Optimizer> {
    inner: O,
    scaled: Vec<Param>,
    config: AlloraConfig,
}

impl<O: Optimizer> Allora<O> {
    /// Wraps `inner`, rescaling the gradients of `scaled` (the LoRA A/B matrices).
    ///
    /// # Errors
    /// [`crate::LoraError::Field`] for a non-positive or non-finite η.
    pub fn new(inner: O, scaled: Vec<Param>, config: AlloraConfig) -> Result<Self> {
        if !(config.eta > 0.0 && config.eta.is_finite()) {
            crate::error::fail!(crate::LoraError::Field {
                method: "allora",
                field: "eta",
                value: config.eta.to_string(),
                rule: "must be positive and finite",
            });
        }
        Ok(Allora { inner, scaled, config })
    }

    /// The wrapped optimizer.
    pub fn inner(&self) -> &O {
        &self.inner
    }

    /// `grads` with the ALLoRA rescaling applied.
    pub fn rescale(&self, grads: &GradStore) -> GradStore {
        rescale(grads, &self.scaled, &self.config)
    }
}

/// `grads` with the gradients of `scaled` multiplied by [`allora_coefficient`] of their current values (per row
/// or per matrix); other gradients are copied unchanged.
pub fn rescale(grads: &GradStore, scaled: &[Param], config: &AlloraConfig) -> GradStore {
    let mut out = GradStore::default();
    for (id, g) in grads.iter() {
        out.insert(*id, g.clone());
    }
    for p in scaled {
        let Some(mut g) = out.remove(p.id()) else { continue };
        let v = p.value();
        let rows = match (config.granularity, v.ndim()) {
            (Granularity::Row, n) if n >= 2 => v.shape()[0],
            _ => 1,
        };
        let per = v.len() / rows.max(1);
        if let (Some(vs), Some(gs)) = (v.as_slice(), g.as_slice_mut()) {
            for j in 0..rows {
                let n = vs[j * per..(j + 1) * per].iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
                let c = allora_coefficient(n, config.eta) as f32;
                gs[j * per..(j + 1) * per].iter_mut().for_each(|x| *x *= c);
            }
        }
        out.insert(p.id(), g);
    }
    out
}

impl<O: Optimizer> Optimizer for Allora<O> {
    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let g = self.rescale(grads);
        self.inner.step(&g)
    }
    fn set_lr_factor(&mut self, factor: f64) {
        self.inner.set_lr_factor(factor);
    }
    fn lr_factor(&self) -> f64 {
        self.inner.lr_factor()
    }
    fn groups(&self) -> &[ParamGroup] {
        self.inner.groups()
    }
    fn steps(&self) -> u64 {
        self.inner.steps()
    }
    fn state_dict(&self) -> StateDict {
        self.inner.state_dict()
    }
    fn load_state_dict(&mut self, state: &StateDict) -> Result<()> {
        self.inner.load_state_dict(state)
    }
}

/// ALLoRA as a tuner: LoRA with `lora_alpha = r` (`s = 1`) and no dropout, whose A and B gradients are rescaled
/// by [`rescale`] before the trainer clips them and steps its optimizer (the `transform_grads` hook). Saved as a
/// plain LoRA adapter (`peft_type = "LORA"`): ALLoRA differs from LoRA only in training. The registry's `"allora"`
/// (r 8) trains at LoRA's registry rate (2.5e-3), not tuned for ALLoRA.
#[derive(Clone, Debug)]
pub struct AlloraLoraConfig {
    /// The LoRA part.
    pub lora: LoraConfig,
    /// ALLoRA's coefficient.
    pub allora: AlloraConfig,
}

impl AlloraLoraConfig {
    /// ALLoRA with rank `r` on `targets`.
    pub fn new<S: Into<String>>(r: usize, targets: impl IntoIterator<Item = S>, allora: AlloraConfig) -> Self {
        AlloraLoraConfig { lora: allora_lora_config(r, targets), allora }
    }
}

impl TunerConfig for AlloraLoraConfig {
    fn peft_type(&self) -> &str {
        "LORA"
    }
    fn describe(&self) -> String {
        let g = match self.allora.granularity {
            Granularity::Row => "row",
            Granularity::Matrix => "matrix",
        };
        format!(
            "ALLoRA r={} alpha={} (s=1, no dropout), eta={} per {g}",
            self.lora.r,
            self.lora.alpha(),
            self.allora.eta
        )
    }
    fn to_json(&self) -> AdapterResult<serde_json::Value> {
        TunerConfig::to_json(&self.lora)
    }
    fn modules_to_save(&self) -> Vec<String> {
        self.lora.modules_to_save()
    }
    fn set_modules_to_save(&mut self, modules: Vec<String>) -> AdapterResult<()> {
        self.lora.set_modules_to_save(modules)
    }
    fn inference_mode(&self) -> bool {
        self.lora.inference_mode
    }
    fn set_inference_mode(&mut self, on: bool) {
        self.lora.inference_mode = on;
    }
    fn trains_base_param(&self, name: &str, wrapped: &[String]) -> bool {
        self.lora.trains_base_param(name, wrapped)
    }
    fn inject(&self, model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        if !(self.allora.eta > 0.0 && self.allora.eta.is_finite()) {
            return Err(AdapterError::config(
                "ALLORA",
                "eta",
                format!("must be positive and finite, got {}", self.allora.eta),
            ));
        }
        let inner = self.lora.inject(model, cx)?;
        let scaled = inner.params();
        Ok(Box::new(AlloraTuner { inner, scaled, config: self.allora }))
    }
    fn clone_box(&self) -> Box<dyn TunerConfig> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// A LoRA adapter trained with ALLoRA's gradient rescaling.
struct AlloraTuner {
    inner: Box<dyn Tuner>,
    scaled: Vec<Param>,
    config: AlloraConfig,
}

impl Tuner for AlloraTuner {
    peft_core::forward_tuner!(inner => name, params, state_dict, wrapped_modules, set_active, merge, unmerge, is_merged, detach);
    fn kind(&self) -> &str {
        "ALLORA"
    }
    fn as_any(&self) -> &dyn std::any::Any {
        // The LoRA layers, for `LoraModelExt`.
        self.inner.as_any()
    }
    fn transform_grads(&self, grads: GradStore) -> Result<GradStore> {
        Ok(rescale(&grads, &self.scaled, &self.config))
    }
}

#[cfg(test)]
mod tests {
    use ndarray::{arr2, ArrayD, IxDyn};
    use peft_core::optim::{Sgd, SgdConfig};
    use peft_core::Tensor;

    use super::*;

    #[test]
    fn coefficient_is_eta_at_zero_and_decreases_with_the_norm() {
        for eta in [0.5, 1.0, 4.0] {
            assert!((allora_coefficient(0.0, eta) - eta).abs() < 1e-12);
            let mut last = f64::INFINITY;
            for n in [0.0, 0.1, 1.0, 10.0] {
                let c = allora_coefficient(n, eta);
                assert!(c < last);
                last = c;
            }
        }
    }

    #[test]
    fn rescale_divides_each_row_by_its_norm_term() {
        let p = Param::new("l.lora_B.default.weight", arr2(&[[3.0f32, 4.0], [0.0, 0.0]]).into_dyn(), true);
        let q = Param::new("head.weight", ArrayD::<f32>::zeros(IxDyn(&[2])), true);
        let loss = p.tensor().sum_all().add(&q.tensor().sum_all()).unwrap();
        let grads = loss.backward().unwrap();
        drop(loss);
        for (gran, c0, c1) in [
            (Granularity::Row, allora_coefficient(5.0, 2.0), 2.0),
            (Granularity::Matrix, allora_coefficient(5.0, 2.0), allora_coefficient(5.0, 2.0)),
        ] {
            let opt =
                Sgd::new(vec![ParamGroup::new(vec![p.clone(), q.clone()], 0.1, 0.0)], SgdConfig::default()).unwrap();
            let a = Allora::new(opt, vec![p.clone()], AlloraConfig { eta: 2.0, granularity: gran }).unwrap();
            let g = a.rescale(&grads);
            let gp = g.get_id(p.id()).unwrap();
            assert!((f64::from(gp[[0, 0]]) - c0).abs() < 1e-6 && (f64::from(gp[[1, 1]]) - c1).abs() < 1e-6, "{gran:?}");
            // Parameters not listed pass unchanged.
            assert_eq!(g.get_id(q.id()).unwrap().iter().copied().collect::<Vec<_>>(), vec![1.0, 1.0]);
        }
    }

    #[test]
    fn allora_steps_the_inner_optimizer_with_scaled_gradients() {
        let p = Param::new("w", arr2(&[[0.0f32, 0.0]]).into_dyn(), true);
        let opt = Sgd::new(vec![ParamGroup::new(vec![p.clone()], 1.0, 0.0)], SgdConfig::default()).unwrap();
        let mut a =
            Allora::new(opt, vec![p.clone()], AlloraConfig { eta: 0.5, granularity: Granularity::Row }).unwrap();
        let loss = p.tensor().mul(&Tensor::new(arr2(&[[1.0f32, -2.0]]).into_dyn())).unwrap().sum_all();
        let g = loss.backward().unwrap();
        drop(loss);
        a.step(&g).unwrap();
        // θ = 0: coefficient η = 0.5, SGD lr 1 → θ = −0.5·g.
        assert_eq!(p.value().iter().copied().collect::<Vec<_>>(), vec![-0.5, 1.0]);
        assert!(Allora::new(
            Sgd::new(vec![], SgdConfig::default()).unwrap(),
            vec![],
            AlloraConfig { eta: 0.0, ..Default::default() }
        )
        .is_err());
    }

    #[test]
    fn allora_config_has_unit_scaling_and_no_dropout() {
        let c = allora_lora_config(4, ["q"]);
        assert_eq!(c.scaling(4, c.alpha()), 1.0);
        assert_eq!(c.lora_dropout, 0.0);
    }

    /// The tuner: s = 1, no dropout, LoRA files; `transform_grads` (through `PeftModel`'s hooks) rescales exactly
    /// the A/B gradients (per row, by the coefficient of the current row norm) and passes the head's through.
    #[test]
    fn allora_tuner_rescales_adapter_gradients_only() {
        use crate::testutil::{input, Tiny};
        use peft_core::adapter::PeftModel;
        use peft_core::nn::Ctx;
        use peft_core::train::TrainHooks;
        let mut cfg =
            AlloraLoraConfig::new(8, ["query", "value"], AlloraConfig { eta: 2.0, granularity: Granularity::Row });
        cfg.set_modules_to_save(vec!["classifier".into()]).unwrap();
        let model = PeftModel::new(Tiny::new(16, 2, 0), cfg.clone(), "default", 0).unwrap();
        let y = model.forward(&input(3, 16, 1), &Ctx::train(0)).unwrap();
        let grads = y.mul(&y).unwrap().sum_all().backward().unwrap();
        let tr = model.trainable_params();
        let adapter: Vec<&Param> = tr.iter().filter(|p| p.name().contains(".lora_")).collect();
        assert_eq!(adapter.len(), 8);
        let before: Vec<_> = tr.iter().map(|p| grads.get_id(p.id()).unwrap().to_owned()).collect();
        let after = model.transform_grads(grads).unwrap();
        let mut changed = 0;
        for (p, g0) in tr.iter().zip(&before) {
            let g1 = after.get_id(p.id()).unwrap();
            if !p.name().contains(".lora_") {
                assert_eq!(g0, g1, "{}", p.name());
                continue;
            }
            let v = p.value();
            let cols = v.shape()[1];
            for j in 0..v.shape()[0] {
                let n = (0..cols).map(|k| f64::from(v[[j, k]]).powi(2)).sum::<f64>().sqrt();
                let c = allora_coefficient(n, 2.0) as f32;
                for k in 0..cols {
                    assert!((g1[[j, k]] - c * g0[[j, k]]).abs() <= 1e-6 * g0[[j, k]].abs().max(1e-6));
                }
            }
            changed += usize::from(g0 != g1);
        }
        assert!(changed >= 4, "the A gradients (nonzero norm rows) change");
        assert_eq!((cfg.lora.r as f64, cfg.lora.alpha(), cfg.lora.lora_dropout), (8.0, 8.0, 0.0));
        assert_eq!(TunerConfig::to_json(&cfg).unwrap()["peft_type"], "LORA");
        let bad = AlloraLoraConfig::new(8, ["query"], AlloraConfig { eta: 0.0, granularity: Granularity::Row });
        assert!(PeftModel::new(Tiny::new(16, 1, 0), bad, "default", 0).is_err());
    }
}
