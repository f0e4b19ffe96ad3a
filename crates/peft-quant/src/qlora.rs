//! QLoRA (Dettmers et al. 2023): a frozen 4-bit (NF4 + double quantisation) base with LoRA adapters on top.
//!
//! [`QloraConfig`] is a tuner: injecting it quantizes the linear sites of the model selected by its `quant` pattern
//! (by default every linear except the output layer / task head, `modules_to_save` and `pooler.dense`, see
//! [`default_quant_spec`]) into [`QuantLinear`] bases, then injects LoRA with its [`LoraConfig`]. The adapter file
//! is a plain PEFT LoRA adapter (QLoRA saves only the adapter; the base is re-quantized from the original
//! checkpoint): to load one, quantize the model ([`quantize_sites`]) and load it as LoRA. Forward of an adapted
//! site is
//! `y = x · dequant(W_q)ᵀ + b + s·(drop(x) Aᵀ) Bᵀ`; gradients reach the input, LoRA and trainable biases, never the
//! quantized weight. Compute is f32 (bnb casts the dequantised weight to bf16 first; not done here).
//!
//! Merging, two options:
//! * (a) [`QloraExt::merged_dense_weights`] / [`QloraExt::merge_and_unload_dense`]: dequantize `W_q`, add the
//!   adapters' `ΔW = s·B·A` (and a `lora_bias` term into the bias), export f32 (or f16/bf16-rounded) dense
//!   weights. The paper's recipe (export bf16).
//! * (b) [`QloraExt::merge_requantized`]: re-quantize `dequant(W_q) + ΔW` with the same format (lossy: every
//!   element is rounded again to its block's new absmax) and report the rounding error ([`RoundingError`]).
//!
//! Memory: [`QuantMemory`] counts the bytes of the quantized base as stored (packed codes, absmax, nested absmax +
//! offset, and the code tables serialized with each tensor).
//!
//! Registry entries ([`methods`]): `"qlora"`, LoRA r=8 alpha=16 on `query,value` over an NF4-DQ base (small, for
//! the bench), and `"qlora-paper"`, the paper's recipe ([`QloraConfig::paper`]: r=64, alpha=16, dropout 0.1 on
//! all linear layers).
//!
//! Loading the base without a dense detour (from a bnb 4-bit checkpoint, or quantizing layer by layer):
//! [`crate::load`]; [`QloraConfig`] keeps bases that are already quantized in its format.

use std::sync::Arc;

use ndarray::ArrayD;
use peft_core::adapter::{
    not_supported, AdapterError, AdapterResult, AdapterTensors, InjectCx, MethodName, MethodSpec, ModulePattern,
    PeftModel, TargetSpec, Tuner, TunerConfig,
};
use peft_core::nn::{linear_sites, Dense, Linear, LinearBase, Module};
use peft_core::{Error, Param, Result};
use peft_lora::LoraConfig;

use crate::block4::{Absmax, FloatDtype};
use crate::linear::{QuantFormat, QuantLinear, QuantWeight};

/// Bytes held by quantized weights, by component, and the parameters they encode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuantMemory {
    /// Parameters (weight elements) encoded.
    pub params: usize,
    /// Packed codes (4-bit: two per byte; int8: one per byte).
    pub codes: usize,
    /// First-level block scales (f32 each, or u8 codes under double quantisation; int8: f32 per row).
    pub absmax: usize,
    /// Double quantisation: the f32 scales of the nested 8-bit blocks plus the f32 offset.
    pub nested_absmax: usize,
    /// Code tables as bitsandbytes serializes them with every tensor (`quant_map` 16 f32, `nested_quant_map`
    /// 256 f32). In memory peft-quant shares them as constants; they are counted here per tensor (the stored
    /// layout), which is the conservative figure.
    pub maps: usize,
}

impl QuantMemory {
    /// The breakdown of one quantized weight.
    pub fn of(w: &QuantWeight) -> Self {
        match w {
            QuantWeight::Block4(q) => {
                let (absmax, nested, maps) = match q.absmax() {
                    Absmax::Plain(v) => (4 * v.len(), 0, 16 * 4),
                    Absmax::Double { q: q8, .. } => (q8.codes().len(), 4 * q8.absmax().len() + 4, 16 * 4 + 256 * 4),
                };
                QuantMemory { params: q.numel(), codes: q.packed().len(), absmax, nested_absmax: nested, maps }
            }
            QuantWeight::Nf(q) => QuantMemory {
                params: q.numel(),
                codes: q.code_bytes(),
                absmax: q.scale_code_bytes(),
                nested_absmax: q.storage_bytes() - q.code_bytes() - q.scale_code_bytes(),
                maps: 0,
            },
            QuantWeight::Int8(q) => QuantMemory {
                params: q.rows() * q.cols(),
                codes: q.rows() * q.cols(),
                absmax: 4 * q.rows(),
                nested_absmax: 0,
                maps: 0,
            },
        }
    }

    /// Total bytes, code tables included.
    pub fn bytes(&self) -> usize {
        self.codes + self.absmax + self.nested_absmax + self.maps
    }

    /// Total bytes without the code tables (what [`QuantWeight::storage_bytes`] counts).
    pub fn bytes_without_maps(&self) -> usize {
        self.codes + self.absmax + self.nested_absmax
    }

    /// Bytes per parameter, code tables included (NaN for no parameters).
    pub fn bytes_per_param(&self) -> f64 {
        self.bytes() as f64 / self.params as f64
    }

    /// Bytes per parameter without the code tables.
    pub fn bytes_per_param_without_maps(&self) -> f64 {
        self.bytes_without_maps() as f64 / self.params as f64
    }
}

impl std::ops::Add for QuantMemory {
    type Output = Self;

    /// The component-wise sum.
    fn add(self, o: Self) -> Self {
        QuantMemory {
            params: self.params + o.params,
            codes: self.codes + o.codes,
            absmax: self.absmax + o.absmax,
            nested_absmax: self.nested_absmax + o.nested_absmax,
            maps: self.maps + o.maps,
        }
    }
}

/// The memory of the quantized bases among `layers`.
pub fn quant_memory<'a>(layers: impl IntoIterator<Item = &'a QuantLinear>) -> QuantMemory {
    layers.into_iter().fold(QuantMemory::default(), |m, l| m + QuantMemory::of(&l.weight()))
}

/// QLoRA's default quantization targets: every linear site except the output layer (task head / `lm_head`,
/// PEFT's `"all-linear"` rule) and `pooler.dense` (not part of the encoder stack).
///
/// # Errors
/// Never in practice (fixed patterns).
pub fn default_quant_spec() -> Result<TargetSpec> {
    TargetSpec::new(
        &ModulePattern::Regex("all-linear".into()),
        Some(&ModulePattern::list(["pooler.dense"])),
        None,
        None,
        &[],
    )
}

/// Rounding error of a re-quantized merge (option b), per site.
#[derive(Clone, Debug, PartialEq)]
pub struct RoundingError {
    /// The site path.
    pub path: String,
    /// `max |Ŵ − W|` where `W = dequant(W_q) + ΔW` and `Ŵ` its re-quantization.
    pub max_abs: f32,
    /// `mean |Ŵ − W|`.
    pub mean_abs: f32,
    /// `‖Ŵ − W‖_F / ‖W‖_F`.
    pub relative: f32,
}

impl RoundingError {
    /// Compares `target` (exact merge) and `got` (re-quantized merge).
    pub fn measure(path: &str, target: &[f32], got: &[f32]) -> Self {
        let (mut max, mut sum, mut sq, mut nsq) = (0f32, 0f64, 0f64, 0f64);
        for (a, b) in target.iter().zip(got) {
            let d = (a - b).abs();
            max = max.max(d);
            sum += f64::from(d);
            sq += f64::from(d) * f64::from(d);
            nsq += f64::from(*a) * f64::from(*a);
        }
        let n = target.len().max(1) as f64;
        RoundingError {
            path: path.to_string(),
            max_abs: max,
            mean_abs: (sum / n) as f32,
            relative: if nsq > 0.0 { (sq / nsq).sqrt() as f32 } else { 0.0 },
        }
    }
}

/// Rounds every element to `dtype` (f32: unchanged).
fn round_to(w: &mut ArrayD<f32>, dtype: FloatDtype) {
    if dtype != FloatDtype::F32 {
        w.mapv_inplace(|v| dtype.round(v));
    }
}

/// Quantizes the sites of `model` selected by `spec` (each once) and returns them. A site whose base is already a
/// [`QuantLinear`] in `format` (loaded from a 4-bit checkpoint or quantized while loading, [`crate::load`]) keeps
/// it as it is: re-quantizing a dequantized weight is lossy (with double quantisation it need not reproduce the
/// codes), and there is no dense weight to start from.
///
/// # Errors
/// [`Error::NoTargetMatched`]; quantizer errors; a site with a merged adapter.
pub fn quantize_sites(model: &dyn Module, spec: &TargetSpec, format: &QuantFormat) -> Result<Vec<Linear>> {
    let sites = linear_sites(model);
    let selected = spec.select(sites.iter().map(|s| (s.path(), s.is_output())))?;
    let mut out: Vec<Linear> = Vec::with_capacity(selected.len());
    for site in sites.into_iter().filter(|s| selected.iter().any(|p| p == s.path())) {
        if out.iter().any(|l| l.path() == site.path()) {
            continue;
        }
        let base = site.base();
        let same = base.as_any().downcast_ref::<QuantLinear>().is_some_and(|q| q.weight().format() == *format);
        if !same {
            site.replace_base(Arc::new(QuantLinear::from_base(base.as_ref(), format)?))?;
        }
        out.push(site);
    }
    Ok(out)
}

/// QLoRA as a tuner: quantize, then LoRA. Saved as a plain PEFT LoRA adapter (`peft_type = "LORA"`).
#[derive(Clone, Debug)]
pub struct QloraConfig {
    /// The LoRA part.
    pub lora: LoraConfig,
    /// Which linear sites to quantize (`None`: [`default_quant_spec`]). `modules_to_save` are never quantized.
    pub quant: Option<ModulePattern>,
    /// The quantized format.
    pub format: QuantFormat,
}

impl QloraConfig {
    /// LoRA r=8, alpha=16 on `targets` over an NF4-DQ base of every linear except head and pooler.
    pub fn new<S: Into<String>>(targets: impl IntoIterator<Item = S>) -> Self {
        QloraConfig { lora: LoraConfig::new(8, 16.0, targets), quant: None, format: QuantFormat::default() }
    }

    /// The quantization selection, `modules_to_save` excluded.
    ///
    /// # Errors
    /// Regex errors.
    pub fn quant_spec(&self) -> Result<TargetSpec> {
        let mts = self.lora.modules_to_save.clone().unwrap_or_default();
        match &self.quant {
            None => TargetSpec::new(
                &ModulePattern::Regex("all-linear".into()),
                Some(&ModulePattern::list(["pooler.dense"])),
                None,
                None,
                &mts,
            ),
            Some(p) => TargetSpec::new(p, None, None, None, &mts),
        }
    }
}

impl TunerConfig for QloraConfig {
    fn peft_type(&self) -> &str {
        "LORA"
    }
    fn describe(&self) -> String {
        let t = match &self.lora.target_modules {
            Some(ModulePattern::List(v)) => v.join(","),
            Some(ModulePattern::Regex(s)) => s.clone(),
            None => "-".into(),
        };
        let q = match self.format {
            QuantFormat::Block4(c) => {
                format!("{}{} b{}", c.quant_type.name(), if c.double_quant { "-DQ" } else { "" }, c.blocksize)
            }
            QuantFormat::Int8 => "int8".into(),
            QuantFormat::Nf(c) => format!("NF{} b0={} B0={} B1={}", c.bits, c.scale_bits, c.block, c.group),
        };
        format!("QLoRA: LoRA r={} alpha={} on {t} over {q} linears", self.lora.r, self.lora.alpha())
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
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.lora.preflight(model, file)
    }
    fn inject(&self, model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        self.lora.validate()?;
        quantize_sites(model, &self.quant_spec()?, &self.format)?;
        self.lora.inject(model, cx)
    }
    fn clone_box(&self) -> Box<dyn TunerConfig> {
        Box::new(self.clone())
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The quantized linear sites of `model` (those whose base is a [`QuantLinear`]), in visit order, each once.
pub fn quantized_sites(model: &dyn Module) -> Vec<Linear> {
    let mut out: Vec<Linear> = Vec::new();
    for s in linear_sites(model) {
        if s.base().as_any().downcast_ref::<QuantLinear>().is_some() && !out.iter().any(|o| o.path() == s.path()) {
            out.push(s);
        }
    }
    out
}

/// Parameter paths with their dense values.
pub type NamedWeights = Vec<(String, ArrayD<f32>)>;

/// A weight change and its optional bias change.
type WeightBiasDelta = (ArrayD<f32>, Option<ArrayD<f32>>);

/// The active, unmerged adapters' weight and bias changes at `site`, summed (`None` when it has none).
fn active_delta(site: &Linear) -> AdapterResult<Option<WeightBiasDelta>> {
    let base = site.base();
    let mut acc: Option<WeightBiasDelta> = None;
    for name in site.active() {
        if site.is_merged(&name)? {
            continue;
        }
        let ad = site.adapter(&name).ok_or(Error::UnknownName { name })?;
        let Some(d) = ad.delta_weight(base.as_ref())? else {
            return Err(not_supported(ad.name(), ad.kind(), "merge", format!("not mergeable on `{}`", site.path())));
        };
        let db = ad.delta_bias()?;
        acc = Some(match acc {
            Some((a, ab)) => {
                let bias = match (ab, db) {
                    (Some(x), Some(y)) => Some(x + &y),
                    (x, y) => x.or(y),
                };
                (a + &d, bias)
            }
            None => (d, db),
        });
    }
    Ok(acc)
}

/// QLoRA's operations on a [`PeftModel`] whose base has quantized sites.
pub trait QloraExt<M: Module> {
    /// The quantized sites.
    fn quantized_sites(&self) -> Vec<Linear>;

    /// Bytes held by the quantized base weights.
    fn quant_memory(&self) -> QuantMemory;

    /// Merge option (a), non-destructive: for every quantized site, `dequant(W_q) + Σ ΔW` of the active adapters,
    /// rounded to `dtype` (f32 leaves it exact). Returns `(site path, [out, in] weight)`.
    ///
    /// # Errors
    /// A non-mergeable active adapter (typed, naming it); adapter errors.
    fn merged_dense_weights(&self, dtype: FloatDtype) -> AdapterResult<Vec<(String, ArrayD<f32>)>>;

    /// Merge option (a): replaces every quantized base by a frozen dense one holding
    /// [`QloraExt::merged_dense_weights`] (`<path>.weight`; the bias gets any `lora_bias` term), removes every
    /// adapter and returns the plain dense model with the merged weights.
    ///
    /// # Errors
    /// As [`QloraExt::merged_dense_weights`]; an adapter merged already.
    fn merge_and_unload_dense(self, dtype: FloatDtype) -> AdapterResult<(M, NamedWeights)>;

    /// Merge option (b): merges the active adapters into their quantized bases by re-quantizing
    /// `dequant(W_q) + ΔW` (same quant type, blocksize, double quantisation) and reports, per quantized site with
    /// an adapter, the rounding error against the exact merge. Forward then skips the merged adapters.
    ///
    /// # Errors
    /// A non-mergeable active adapter (nothing is merged then); quantizer errors.
    fn merge_requantized(&mut self) -> AdapterResult<Vec<RoundingError>>;
}

impl<M: Module> QloraExt<M> for PeftModel<M> {
    fn quantized_sites(&self) -> Vec<Linear> {
        quantized_sites(self.model())
    }

    fn quant_memory(&self) -> QuantMemory {
        let sites = self.quantized_sites();
        let bases: Vec<Arc<dyn LinearBase>> = sites.iter().map(Linear::base).collect();
        quant_memory(bases.iter().filter_map(|b| b.as_any().downcast_ref::<QuantLinear>()))
    }

    fn merged_dense_weights(&self, dtype: FloatDtype) -> AdapterResult<Vec<(String, ArrayD<f32>)>> {
        let sites = self.quantized_sites();
        let mut out = Vec::with_capacity(sites.len());
        for site in &sites {
            let mut w = site.base().dense_weight()?;
            if let Some((d, _)) = active_delta(site)? {
                w += &d;
            }
            round_to(&mut w, dtype);
            out.push((site.path().to_string(), w));
        }
        Ok(out)
    }

    fn merge_and_unload_dense(self, dtype: FloatDtype) -> AdapterResult<(M, NamedWeights)> {
        let sites = self.quantized_sites();
        let mut biases = Vec::with_capacity(sites.len());
        for site in &sites {
            let bias = site.base().bias();
            let db = active_delta(site)?.and_then(|(_, db)| db);
            let new_bias = match (bias, db) {
                (Some(b), Some(db)) => {
                    let v = &b.value().to_owned() + &db;
                    if v.iter().any(|x| !x.is_finite()) {
                        return Err(Error::NonFinite { what: format!("merged bias of {}", b.name()) }.into());
                    }
                    Some(Param::new(b.name(), v, false))
                }
                (None, Some(_)) => {
                    return Err(not_supported(
                        "?",
                        "LORA",
                        "merge",
                        format!("an adapter has a lora_bias but `{}` has no bias", site.path()),
                    ))
                }
                (b, None) => b,
            };
            biases.push(new_bias);
        }
        let merged = self.merged_dense_weights(dtype)?;
        let model = self.into_base()?;
        for ((site, bias), (_, w)) in sites.iter().zip(biases).zip(&merged) {
            let weight = Param::new(format!("{}.weight", site.path()), w.clone(), false);
            site.replace_base(Arc::new(Dense { weight, bias }))?;
        }
        Ok((model, merged))
    }

    fn merge_requantized(&mut self) -> AdapterResult<Vec<RoundingError>> {
        // The exact targets first; checking every adapter is mergeable before anything is written.
        let mut targets = Vec::new();
        for site in self.quantized_sites() {
            if let Some((d, _)) = active_delta(&site)? {
                let mut t = site.base().dense_weight()?;
                t += &d;
                targets.push((site, t));
            }
        }
        self.merge_adapter()?;
        let mut out = Vec::with_capacity(targets.len());
        for (site, target) in targets {
            let got = site.base().dense_weight()?;
            let (t, g) = (target.as_standard_layout(), got.as_standard_layout());
            out.push(RoundingError::measure(
                site.path(),
                t.as_slice().expect("peft-rs bug: standard layout"),
                g.as_slice().expect("peft-rs bug: standard layout"),
            ));
        }
        Ok(out)
    }
}

/// `"qlora"`: the small entry, LoRA r=8 alpha=16 on the given targets (`query,value`) over an NF4-DQ base.
pub const QLORA: MethodName = MethodName("qlora");

/// `"qlora-paper"`: the QLoRA paper's recipe ([`QloraConfig::paper`]).
pub const QLORA_PAPER: MethodName = MethodName("qlora-paper");

/// The paper's learning rate for 7B/13B models (1e-4 for 33B/65B).
pub const QLORA_PAPER_LR: f64 = 2e-4;

impl QloraConfig {
    /// The QLoRA paper's recipe (Dettmers et al. 2023 §4 and its 7B scripts): LoRA r=64, alpha=16 (s = 0.25),
    /// dropout 0.1 on **all** linear layers but the output layer (`target_modules = "all-linear"`), over an NF4 +
    /// double quantisation (blocksize 64) base of the same layers. The paper's optimizer side (paged AdamW, lr
    /// 2e-4, constant schedule after 3% warm-up, max grad norm 0.3) is the trainer's, not the config's.
    pub fn paper() -> Self {
        let mut lora = LoraConfig::new(64, 16.0, Vec::<String>::new());
        lora.target_modules = Some(ModulePattern::Regex("all-linear".into()));
        lora.lora_dropout = 0.1;
        QloraConfig { lora, quant: None, format: QuantFormat::default() }
    }
}

/// The QLoRA registry entries with LoRA on `query,value` (BERT site names) for the small entry.
///
/// Learning rates: `"qlora"` uses LoRA's registry default for the bench's short runs (2.5e-3); `"qlora-paper"`
/// the paper's [`QLORA_PAPER_LR`].
pub fn methods() -> Vec<MethodSpec> {
    methods_for(&["query", "value"])
}

/// peft-quant's registry entries: `"qlora"` with LoRA on the given target names, `"qlora-paper"` (all linear
/// layers, whatever `targets` says), `"lora-1bit"` ([`crate::lowbit_lora::method`]) on `targets`, and the
/// LQ-LoRA budgets ([`crate::lq_lora::methods`], all linear layers).
pub fn methods_for(targets: &[&str]) -> Vec<MethodSpec> {
    vec![
        MethodSpec::new(QLORA, QloraConfig::new(targets.iter().map(|s| s.to_string())), 2.5e-3),
        MethodSpec::new(QLORA_PAPER, QloraConfig::paper(), QLORA_PAPER_LR),
        crate::lowbit_lora::method(targets),
    ]
    .into_iter()
    .chain(crate::lq_lora::methods())
    .collect()
}

/// An error for a QLoRA operation on a model without quantized sites.
pub fn no_quantized_sites() -> AdapterError {
    crate::QuantError::NoQuantizedSite { op: "qlora" }.into()
}

#[cfg(test)]
#[path = "qlora_tests.rs"]
mod tests;
