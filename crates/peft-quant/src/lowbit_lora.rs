//! Low-bit LoRA (spec §4.5, "precision redundancy" of adapters; Bi-LoRA in the reference): a LoRA adapter whose
//! `lora_A` and `lora_B` are fake-quantized to `bits` ∈ {1, 2, 3, 4} bits in every forward during training
//! ([`crate::onebit::fake_quant_ste_with`]), so the adapter that is trained is the adapter that is stored.
//!
//! * **Forward** at an adapted site: `y = base(x) + s · (drop(x) Âᵀ) B̂ᵀ` with `Ŵ = Q_b((W − μ)/(σ + 1e-5))·σ + μ`
//!   per matrix (`μ`, `σ` over the whole matrix, `σ` unbiased), `s = α/r`.
//! * **Backward**: straight-through rounding; by default ([`SteGradient::ThroughStats`], the reference code) the
//!   gradient also flows through `μ` and `σ`; `ste_gradient = "identity"` passes `∂L/∂Ŵ` unchanged.
//! * **Init**: PEFT's LoRA init (`A` Kaiming-uniform, `B = 0`). The all-zero `B` has `σ = 0`, and quantizes to
//!   exactly 0 (`level·0 + 0`), so the adapted model equals the base at init; its gradient is the identity STE
//!   until `σ > 0` (the statistics have no derivative at `σ = 0`). The reference instead starts `B` from a
//!   truncated `N(0, 0.001²)`, which is only nearly the identity: `init_b_std = 0.001` selects that.
//! * **Merge**: `W += s · B̂ · Â` (the quantized matrices: merged and unmerged forwards agree to rounding).
//!
//! ## Files
//! `PeftModel::save_pretrained` writes the f32 latent weights (`<site>.lora_A.weight`, `<site>.lora_B.weight`,
//! PEFT's LoRA keys; for resuming training) with `peft_type = "LORA_LOWBIT"`. [`LowBitModelExt::save_lowbit`]
//! writes the storage format, same folder layout and config, in `adapter_model.safetensors` per adapted site
//! (keys prefixed `base_model.model.`):
//!
//! | key | dtype | shape | content |
//! |---|---|---|---|
//! | `<site>.lora_A.codes` | U8 | `[⌈r·in·b/8⌉]` | codes of `A` (row-major), LSB-first bit stream: code `i` occupies bits `i·b .. i·b+b` (element `i` in bit-field `i mod 8/b` of byte `⌊i·b/8⌋` for b ∈ {1, 2, 4}; 3-bit codes straddle bytes) |
//! | `<site>.lora_A.stats` | F32 | `[2]` | `[μ, σ]` of `A` |
//! | `<site>.lora_B.codes` | U8 | `[⌈out·r·b/8⌉]` | codes of `B` |
//! | `<site>.lora_B.stats` | F32 | `[2]` | `[μ, σ]` of `B` |
//!
//! plus `modules_to_save` tensors in F32, and metadata `format = "pt"`, `peft_rs.lowbit_bits = "<b>"`. A code `q`
//! decodes to `levels(b)[q]·σ + μ` ([`crate::onebit::levels`]): `⌈n·b/8⌉ + 8` bytes per matrix plus the
//! safetensors header. Loading (`PeftModel::load_adapter` with [`crate::registry`]) reads either form; a packed
//! adapter's forward uses the decoded weights as stored (as the reference's `fake_quan = False`), bit-identical to
//! the forward that was saved. The packed keys are read outside [`AdapterTensors::get`] (it decodes floats only) and
//! recorded with [`AdapterTensors::mark_used`], so a load report lists them under `applied`.
//!
//! ## Measured (all-MiniLM-L6-v2, LoRA r=8 on query/value + the f32 classifier head)
//! Adapter file (`adapter_model.safetensors`): fp32 301,392 B; packed 1-bit 18,720 B, 2-bit 27,960 B, 3-bit
//! 37,200 B, 4-bit 46,424 B (`tests/lowbit_minilm.rs`; the safetensors header with its 48 key names is about 6 KB of
//! the packed files). SST-2 dev accuracy (`docs/bench/glue-lowbit*`, 3 seeds): 1,000 examples LoRA 77.4±1.4 vs
//! 1-bit 77.7±1.5; 4,000 examples LoRA 82.7±0.8 vs 1-bit 81.5±1.1.
//!
//! ```
//! use peft_quant::lowbit_lora::LowBitLoraConfig;
//! use peft_core::adapter::TunerConfig;
//!
//! let cfg = LowBitLoraConfig::new(8, 16.0, ["query", "value"], 1);
//! let json = cfg.to_json()?;
//! assert_eq!(json["peft_type"], "LORA_LOWBIT");
//! assert_eq!(json["bits"], 1);
//! assert_eq!(json["ste_gradient"], "through_stats");
//! # Ok::<(), peft_core::adapter::AdapterError>(())
//! ```

use std::any::Any;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use ndarray::{ArrayD, Ix2};
use peft_core::adapter::{
    adapter_dir, not_supported, AdapterError, AdapterResult, AdapterTensors, InjectCx, LinearTuner, MethodName,
    MethodSpec, PeftConfig, PeftModel, SavedTensors, Tuner, TunerConfig,
};
use peft_core::nn::{Ctx, Linear, LinearAdapter, LinearBase, Module};
use peft_core::{Param, Tensor};
use peft_lora::tuner::{lora_sites, spec_at};
use peft_lora::{LoraConfig, LoraLinear, LoraSpec};
use serde_json::Value;

use crate::onebit::{fake_quant, fake_quant_ste_with, LowBitWeight, SteGradient};
use crate::storage::{Checkpoint, RawTensor};

/// The `peft_type` of low-bit LoRA adapters.
pub const PEFT_TYPE: &str = "LORA_LOWBIT";

/// Low-bit LoRA's configuration: a LoRA config plus the bit width and the STE gradient rule.
#[derive(Clone, Debug)]
pub struct LowBitLoraConfig {
    /// The LoRA part (plain LoRA: no DoRA, no `lora_bias`, no base-rewriting or data-driven init).
    pub lora: LoraConfig,
    /// Bits per adapter weight, 1..=4.
    pub bits: u8,
    /// How the gradient passes the quantizer.
    pub ste: SteGradient,
    /// `Some(std)`: the reference's init of `B`, a normal `N(0, std²)` truncated to `±2·std` (the reference uses
    /// 0.001), which is near- but not exactly the identity; `None` (default): LoRA's `B = 0`, exactly the identity.
    pub init_b_std: Option<f64>,
}

impl LowBitLoraConfig {
    /// LoRA rank `r`, `alpha` on `targets`, quantized to `bits`, reference gradient.
    pub fn new<S: Into<String>>(r: usize, alpha: f64, targets: impl IntoIterator<Item = S>, bits: u8) -> Self {
        LowBitLoraConfig {
            lora: LoraConfig::new(r, alpha, targets),
            bits,
            ste: SteGradient::ThroughStats,
            init_b_std: None,
        }
    }

    fn validate(&self) -> AdapterResult<()> {
        if !(1..=4).contains(&self.bits) {
            return Err(AdapterError::config(PEFT_TYPE, "bits", format!("{}: supported are 1, 2, 3, 4", self.bits)));
        }
        self.lora.validate()?;
        let bad = |field: &str, why: &str| Err(AdapterError::config(PEFT_TYPE, field, why));
        if self.lora.use_dora {
            return bad("use_dora", "low-bit LoRA quantizes plain LoRA matrices only");
        }
        if self.lora.lora_bias {
            return bad("lora_bias", "low-bit LoRA has no lora_B bias");
        }
        if let Some(std) = self.init_b_std {
            if !(std > 0.0 && std.is_finite()) {
                return bad("init_b_std", "must be positive and finite");
            }
        }
        let init = self.lora.init()?;
        if init.mutates_base() || self.lora.needs_calibration() {
            return bad("init_lora_weights", "only PEFT's plain inits (true, false, gaussian) are supported");
        }
        Ok(())
    }
}

impl TunerConfig for LowBitLoraConfig {
    fn peft_type(&self) -> &str {
        PEFT_TYPE
    }
    fn describe(&self) -> String {
        let g = match self.ste {
            SteGradient::ThroughStats => "through stats",
            SteGradient::Identity => "identity",
        };
        format!("{}-bit {} (STE {g})", self.bits, TunerConfig::describe(&self.lora))
    }
    fn to_json(&self) -> AdapterResult<Value> {
        let mut v = TunerConfig::to_json(&self.lora)?;
        let o = v.as_object_mut().ok_or_else(|| AdapterError::config(PEFT_TYPE, "<config>", "not an object"))?;
        o.insert("peft_type".into(), PEFT_TYPE.into());
        o.insert("bits".into(), self.bits.into());
        let ste = serde_json::to_value(self.ste)
            .map_err(|e| AdapterError::config(PEFT_TYPE, "ste_gradient", e.to_string()))?;
        o.insert("ste_gradient".into(), ste);
        o.insert("init_b_std".into(), self.init_b_std.into());
        Ok(v)
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
        self.validate()?;
        let sites = lora_sites(model, &self.lora)?;
        let inner = LinearTuner::attach(cx.name, PEFT_TYPE, &sites, |site| {
            let spec = spec_at(&self.lora, site)?;
            let mut rng = peft_core::adapter::site_rng(cx.seed, cx.name, site.path());
            let lora = LoraLinear::new(site.path(), cx.name, site.base().as_ref(), spec, &mut rng)?;
            if let Some(std) = self.init_b_std {
                let b = lora.lora_b();
                let normal = rand_distr::Normal::new(0.0, std)
                    .map_err(|e| AdapterError::config(PEFT_TYPE, "init_b_std", e.to_string()))?;
                let v = ArrayD::from_shape_simple_fn(ndarray::IxDyn(&b.shape()), || loop {
                    let x: f64 = rand_distr::Distribution::sample(&normal, &mut rng);
                    if x.abs() <= 2.0 * std {
                        break x as f32;
                    }
                });
                b.set(v)?;
            }
            Ok(LowBitLoraLinear { lora, spec, bits: self.bits, ste: self.ste, stored: Mutex::new(None) })
        })?;
        Ok(Box::new(LowBitTuner { inner, bits: self.bits }))
    }
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.validate()?;
        for site in lora_sites(model, &self.lora)? {
            let (r, _) = self.lora.rank_alpha(site.path())?;
            for (m, shape) in [("lora_A", [r, site.in_features()]), ("lora_B", [site.out_features(), r])] {
                let (wkey, ckey) = (format!("{}.{m}.weight", site.path()), format!("{}.{m}.codes", site.path()));
                let (key, want, found) = match (file.shape(&wkey), file.shape(&ckey)) {
                    (Some(s), _) => (wkey, shape.to_vec(), s),
                    (None, Some(s)) => (ckey, vec![(shape[0] * shape[1] * usize::from(self.bits)).div_ceil(8)], s),
                    (None, None) => {
                        return Err(AdapterError::MissingTensor {
                            file: file.path().to_path_buf(),
                            key: format!("base_model.model.{wkey} (or .codes)"),
                        })
                    }
                };
                if found != want {
                    return Err(AdapterError::TensorShape {
                        file: file.path().to_path_buf(),
                        key: format!("base_model.model.{key}"),
                        expected: want,
                        found,
                    });
                }
            }
        }
        Ok(())
    }
    fn clone_box(&self) -> Box<dyn TunerConfig> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl PeftConfig for LowBitLoraConfig {
    const PEFT_TYPE: &'static str = PEFT_TYPE;
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let mut v = v.clone();
        let o = v.as_object_mut().ok_or_else(|| AdapterError::config(PEFT_TYPE, "<config>", "not an object"))?;
        let bits = match o.remove("bits").as_ref().and_then(Value::as_u64) {
            Some(b @ 1..=4) => b as u8,
            other => return Err(AdapterError::config(PEFT_TYPE, "bits", format!("{other:?}: expected 1, 2, 3 or 4"))),
        };
        let ste = match o.remove("ste_gradient") {
            None | Some(Value::Null) => SteGradient::default(),
            Some(s) => serde_json::from_value(s.clone()).map_err(|_| {
                AdapterError::config(
                    PEFT_TYPE,
                    "ste_gradient",
                    format!("{s}: expected \"through_stats\" or \"identity\""),
                )
            })?,
        };
        let init_b_std = match o.remove("init_b_std") {
            None | Some(Value::Null) => None,
            Some(x) => Some(x.as_f64().ok_or_else(|| {
                AdapterError::config(PEFT_TYPE, "init_b_std", format!("{x}: expected a number or null"))
            })?),
        };
        o.insert("peft_type".into(), "LORA".into());
        let (lora, warnings) = LoraConfig::from_value(v)?;
        let c = LowBitLoraConfig { lora, bits, ste, init_b_std };
        c.validate()?;
        Ok((c, warnings))
    }
}

/// A LoRA adapter on one site whose matrices are fake-quantized in the forward.
pub struct LowBitLoraLinear {
    lora: LoraLinear,
    spec: LoraSpec,
    bits: u8,
    ste: SteGradient,
    /// The stored (packed) matrices this adapter was loaded from: while set, the forward uses the parameter values
    /// as they are (the decoded weights) instead of re-quantizing them.
    stored: Mutex<Option<[LowBitWeight; 2]>>,
}

impl LowBitLoraLinear {
    /// The LoRA layer holding the latent f32 `A`, `B`.
    pub fn lora(&self) -> &LoraLinear {
        &self.lora
    }

    /// Bits per weight.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Whether the adapter runs decoded stored weights (loaded from a packed file) rather than fake-quantizing.
    pub fn is_stored(&self) -> bool {
        self.stored.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// Drops the stored form so the next forward fake-quantizes the current values again (to train a loaded
    /// adapter further).
    pub fn resume_quantized_training(&self) {
        *self.stored.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The packed `A` and `B`: the stored ones for a loaded adapter, else the current values quantized.
    ///
    /// # Errors
    /// [`peft_core::Error::NonFinite`] for a non-finite weight.
    pub fn packed(&self) -> peft_core::Result<[LowBitWeight; 2]> {
        if let Some(s) = self.stored.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(s);
        }
        let q = |p: &Param| {
            let v = p.value().to_owned();
            let flat: Vec<f32> = v.iter().copied().collect();
            LowBitWeight::quantize(&flat, v.shape(), self.bits)
        };
        Ok([q(self.lora.lora_a())?, q(self.lora.lora_b())?])
    }

    /// Sets `A`, `B` to the decoded stored weights and keeps them as the stored form.
    fn load_stored(&self, a: LowBitWeight, b: LowBitWeight) -> peft_core::Result<()> {
        for (p, w) in [(self.lora.lora_a(), &a), (self.lora.lora_b(), &b)] {
            let arr = ArrayD::from_shape_vec(ndarray::IxDyn(w.shape()), w.unpack())
                .map_err(|source| crate::QuantError::Layout { what: "low-bit LoRA weight", source })?;
            p.set(arr)?;
        }
        *self.stored.lock().unwrap_or_else(|p| p.into_inner()) = Some([a, b]);
        Ok(())
    }

    /// The forward weight of `p`: as stored, or fake-quantized with the STE.
    fn weight(&self, p: &Param) -> peft_core::Result<Tensor> {
        if self.is_stored() {
            Ok(p.tensor())
        } else {
            fake_quant_ste_with(&p.tensor(), self.bits, self.ste)
        }
    }

    /// The forward value of `p` as an array (no graph).
    fn weight_value(&self, p: &Param) -> peft_core::Result<ArrayD<f32>> {
        let v = p.value().to_owned();
        if self.is_stored() {
            return Ok(v);
        }
        let flat: Vec<f32> = v.iter().copied().collect();
        ArrayD::from_shape_vec(v.raw_dim(), fake_quant(&flat, self.bits)?)
            .map_err(|source| crate::QuantError::Layout { what: "low-bit LoRA weight", source }.into())
    }
}

impl LinearAdapter for LowBitLoraLinear {
    fn name(&self) -> &str {
        LinearAdapter::name(&self.lora)
    }
    fn kind(&self) -> &str {
        "lora-lowbit"
    }
    fn delta(&self, x: &Tensor, _: &Tensor, _: &dyn LinearBase, ctx: &Ctx) -> peft_core::Result<Option<Tensor>> {
        let dropped = ctx.train && self.spec.dropout > 0.0;
        let xd = if dropped { ctx.with_rng(|r| x.dropout(self.spec.dropout, true, r))? } else { x.clone() };
        let a = self.weight(self.lora.lora_a())?;
        let b = self.weight(self.lora.lora_b())?;
        let y = xd.linear(&a, None)?.linear(&b, None)?.mul_scalar(self.lora.scaling() as f32);
        Ok(Some(y))
    }
    fn params(&self) -> Vec<Param> {
        vec![self.lora.lora_a().clone(), self.lora.lora_b().clone()]
    }
    fn delta_weight(&self, _: &dyn LinearBase) -> peft_core::Result<Option<ArrayD<f32>>> {
        let bad = |source| crate::QuantError::Layout { what: "low-bit LoRA factor (merge)", source };
        let a = self.weight_value(self.lora.lora_a())?.into_dimensionality::<Ix2>().map_err(bad)?;
        let b = self.weight_value(self.lora.lora_b())?.into_dimensionality::<Ix2>().map_err(bad)?;
        let s = self.lora.scaling() as f32;
        Ok(Some(b.dot(&a).mapv(|v| v * s).into_dyn()))
    }
}

impl SavedTensors for LowBitLoraLinear {
    fn saved_tensors(&self) -> Vec<(String, Param)> {
        vec![("lora_A.weight".into(), self.lora.lora_a().clone()), ("lora_B.weight".into(), self.lora.lora_b().clone())]
    }
}

/// The injected low-bit LoRA adapter: a [`LinearTuner`] of [`LowBitLoraLinear`] that also reads packed files.
pub struct LowBitTuner {
    inner: LinearTuner<LowBitLoraLinear>,
    bits: u8,
}

impl LowBitTuner {
    /// The adapted sites and their layers.
    pub fn layers(&self) -> &[(Linear, std::sync::Arc<LowBitLoraLinear>)] {
        self.inner.layers()
    }
}

fn quant_err(e: crate::QuantError) -> AdapterError {
    AdapterError::Core(e.into())
}

impl Tuner for LowBitTuner {
    peft_core::forward_tuner!(inner => name, params, state_dict, wrapped_modules, set_active, merge, unmerge, is_merged, detach);
    fn kind(&self) -> &str {
        PEFT_TYPE
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn load_state_dict(&self, src: &AdapterTensors) -> AdapterResult<()> {
        let mut ckpt: Option<Checkpoint> = None;
        for (site, l) in self.inner.layers() {
            let p = site.path();
            if src.contains(&format!("{p}.lora_A.weight")) {
                for (k, param) in l.saved_tensors() {
                    param.set(src.get(&format!("{p}.{k}"), &param.shape())?)?;
                }
                l.resume_quantized_training();
                continue;
            }
            if ckpt.is_none() {
                ckpt = Some(Checkpoint::read(src.path()).map_err(quant_err)?);
            }
            let Some(c) = ckpt.as_ref() else { unreachable!("peft-rs bug: checkpoint just read") };
            let mut parts = Vec::with_capacity(2);
            for (m, param) in [("lora_A", l.lora.lora_a()), ("lora_B", l.lora.lora_b())] {
                let stats = src.get(&format!("{p}.{m}.stats"), &[2])?;
                let key = format!("base_model.model.{p}.{m}.codes");
                let codes = c.require(&key).map_err(quant_err)?;
                if codes.dtype() != safetensors::Dtype::U8 {
                    return Err(quant_err(crate::QuantError::Dtype {
                        name: key,
                        expected: "U8".into(),
                        got: format!("{:?}", codes.dtype()),
                    }));
                }
                let w = LowBitWeight::from_parts(self.bits, &param.shape(), codes.data().to_vec(), stats[0], stats[1])?;
                src.mark_used(&format!("{p}.{m}.codes"));
                parts.push(w);
            }
            let missing =
                |got| peft_core::Error::Count { op: "lowbit load", what: "packed factors (A, B)", expected: 2, got };
            let b = parts.pop().ok_or_else(|| missing(0))?;
            let a = parts.pop().ok_or_else(|| missing(1))?;
            l.load_stored(a, b)?;
        }
        Ok(())
    }
}

/// Low-bit LoRA's operations on a [`PeftModel`].
pub trait LowBitModelExt {
    /// Saves low-bit adapter `name` in the packed layout of the module docs (into `dir`, or `dir/<name>/` for a
    /// name other than `"default"`); returns the bytes written (config + weights).
    ///
    /// # Errors
    /// [`AdapterError::NotSupportedBy`] when `name` is not a low-bit LoRA adapter; non-finite weights; IO errors.
    fn save_lowbit(&self, dir: &Path, name: &str) -> AdapterResult<u64>;
}

impl<M: Module> LowBitModelExt for PeftModel<M> {
    fn save_lowbit(&self, dir: &Path, name: &str) -> AdapterResult<u64> {
        let t = self.tuner(name)?;
        let Some(lt) = t.as_any().downcast_ref::<LowBitTuner>() else {
            return Err(not_supported(name, t.kind(), "save_lowbit", "not a low-bit LoRA adapter"));
        };
        let mut cfg = self.config(name)?.clone_box();
        cfg.set_inference_mode(true);
        let prefix = cfg.key_prefix().to_string();
        let mut tensors: BTreeMap<String, RawTensor> = BTreeMap::new();
        let state = self.state_dict(name)?;
        let mut skip = Vec::new();
        for (site, l) in lt.layers() {
            let [a, b] = l.packed()?;
            for (m, w) in [("lora_A", a), ("lora_B", b)] {
                let p = format!("{prefix}{}.{m}", site.path());
                skip.push(format!("{p}.weight"));
                let (mu, sigma) = w.stats();
                tensors.insert(
                    format!("{p}.codes"),
                    RawTensor::new(safetensors::Dtype::U8, vec![w.packed().len()], w.packed().to_vec())
                        .map_err(quant_err)?,
                );
                tensors.insert(format!("{p}.stats"), RawTensor::from_f32(vec![2], &[mu, sigma]).map_err(quant_err)?);
            }
        }
        for (k, v) in state {
            if !skip.contains(&k) {
                let flat: Vec<f32> = v.iter().copied().collect();
                tensors.insert(k, RawTensor::from_f32(v.shape().to_vec(), &flat).map_err(quant_err)?);
            }
        }
        let mut ck = Checkpoint::new();
        ck.set_metadata("format", "pt");
        ck.set_metadata("peft_rs.lowbit_bits", lt.bits.to_string());
        for (k, v) in tensors {
            ck.insert(k, v);
        }
        let out = adapter_dir(dir, name);
        std::fs::create_dir_all(&out).map_err(|e| peft_core::io::IoError::io(&out, e))?;
        let wpath = out.join(peft_core::adapter::files::WEIGHTS_NAME);
        ck.write(&wpath).map_err(quant_err)?;
        let text = peft_core::adapter::pyjson::dumps(&cfg.to_json()?);
        let cpath = out.join(peft_core::adapter::files::CONFIG_NAME);
        peft_core::io::atomic::atomic_write(&cpath, |w| w.write_all(text.as_bytes()))?;
        let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        Ok(len(&wpath) + len(&cpath))
    }
}

/// `"lora-1bit"`.
pub const LORA_1BIT: MethodName = MethodName("lora-1bit");

/// The registry entry: LoRA r=8, alpha=16 on `targets` (the `"lora"` recipe) with 1-bit `A` and `B`, reference
/// gradient, at LoRA's registry learning rate (2.5e-3; the reference trains at 1e-3 for 100 epochs on VTAB).
pub fn method(targets: &[&str]) -> MethodSpec {
    MethodSpec::new(LORA_1BIT, LowBitLoraConfig::new(8, 16.0, targets.iter().map(|s| s.to_string()), 1), 2.5e-3)
}

#[cfg(test)]
#[path = "lowbit_lora_tests.rs"]
mod tests;
