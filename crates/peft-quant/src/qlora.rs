//! QLoRA (Dettmers et al. 2023): a frozen 4-bit (NF4 + double quantisation) base with LoRA adapters on top.
//!
//! [`Qlora::new`] quantizes the linear sites of a loaded model selected by a [`TargetSpec`] (by default every
//! linear except the output layer / task head and `pooler.dense`, see [`default_quant_spec`]) into
//! [`QuantLinear`] bases, then injects LoRA with a [`LoraConfig`] ([`LoraModel`]). Forward of an adapted site is
//! `y = x · dequant(W_q)ᵀ + b + s·(drop(x) Aᵀ) Bᵀ`; gradients reach the input, LoRA and trainable biases, never the
//! quantized weight. Compute is f32 (bnb casts the dequantised weight to bf16 first; not done here).
//!
//! Merging, two options:
//! * (a) [`Qlora::merged_dense_weights`] / [`Qlora::merge_and_unload_dense`]: dequantize `W_q`, add the adapters'
//!   `ΔW = s·B·A`, export f32 (or f16/bf16-rounded) dense weights. The paper's recipe (export bf16).
//! * (b) [`Qlora::merge_requantized`]: re-quantize `dequant(W_q) + ΔW` with the same format (lossy: every element
//!   is rounded again to its block's new absmax) and report the rounding error ([`RoundingError`]).
//!
//! Memory: [`QuantMemory`] counts the bytes of the quantized base as stored (packed codes, absmax, nested absmax +
//! offset, and the code tables serialized with each tensor).
//!
//! The registry entry [`QloraMethod`] (`"qlora"`) is LoRA r=8 alpha=16 on `query,value` over an NF4-DQ base.

use std::path::Path;
use std::sync::Arc;

use ndarray::{ArrayD, Zip};
use peft_core::adapter::{Method, ModulePattern, Prepared, TargetSpec};
use peft_core::nn::{linear_sites, Dense, Linear, LinearBase, Module};
use peft_core::{Error, Param, Result};
use peft_lora::{LoraConfig, LoraMethod, LoraModel};

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

/// A model with a quantized base and LoRA adapters.
pub struct Qlora {
    /// The LoRA bookkeeping (adapters, activation, save/load in PEFT's layout).
    pub lora: LoraModel,
    quantized: Vec<(Linear, Arc<QuantLinear>)>,
}

/// Quantizes the sites of `model` selected by `spec` and returns them with their new bases.
///
/// # Errors
/// As [`crate::quantize_linear_sites`].
pub fn quantize_sites(
    model: &dyn Module,
    spec: &TargetSpec,
    format: &QuantFormat,
) -> Result<Vec<(Linear, Arc<QuantLinear>)>> {
    let sites = linear_sites(model);
    let selected = spec.select(sites.iter().map(|s| (s.path(), s.is_output())))?;
    let mut out = Vec::with_capacity(selected.len());
    for site in sites.into_iter().filter(|s| selected.iter().any(|p| p == s.path())) {
        if out.iter().any(|(l, _): &(Linear, _)| l.path() == site.path()) {
            continue;
        }
        let q = Arc::new(QuantLinear::from_base(site.base().as_ref(), format)?);
        site.replace_base(q.clone())?;
        out.push((site, q));
    }
    Ok(out)
}

impl Qlora {
    /// Quantizes the sites of `model` selected by `quant` to `format`, then injects LoRA adapter `name` with
    /// `config` (initial values from `seed`).
    ///
    /// # Errors
    /// [`Error::NoTargetMatched`] when either selection is empty; quantizer and config errors.
    pub fn new(
        model: &dyn Module,
        quant: &TargetSpec,
        format: &QuantFormat,
        config: LoraConfig,
        name: &str,
        seed: u64,
    ) -> Result<Self> {
        let quantized = quantize_sites(model, quant, format)?;
        let lora = LoraModel::new(model, config, name, seed)?;
        Ok(Qlora { lora, quantized })
    }

    /// Quantizes like [`Qlora::new`] and loads the PEFT adapter saved in `dir` as `name` (active).
    ///
    /// # Errors
    /// As [`Qlora::new`] and [`LoraModel::load_adapter`].
    pub fn load(
        model: &dyn Module,
        quant: &TargetSpec,
        format: &QuantFormat,
        dir: &Path,
        name: &str,
    ) -> Result<(Self, Vec<String>)> {
        let quantized = quantize_sites(model, quant, format)?;
        let mut lora = LoraModel::wrap(model, 0);
        let warnings = lora.load_adapter(dir, name)?;
        lora.set_adapter(name)?;
        Ok((Qlora { lora, quantized }, warnings))
    }

    /// The quantized site paths, in visit order.
    pub fn quantized_paths(&self) -> Vec<&str> {
        self.quantized.iter().map(|(s, _)| s.path()).collect()
    }

    /// The quantized bases (snapshots of the current ones).
    pub fn quantized_layers(&self) -> impl Iterator<Item = (&str, &QuantLinear)> {
        self.quantized.iter().map(|(s, q)| (s.path(), q.as_ref()))
    }

    /// Bytes held by the quantized base weights.
    pub fn memory(&self) -> QuantMemory {
        quant_memory(self.quantized.iter().map(|(_, q)| q.as_ref()))
    }

    /// Saves the adapters in PEFT's layout (the base is not saved: it is re-quantized from the original
    /// checkpoint on load, as QLoRA does).
    ///
    /// # Errors
    /// IO errors.
    pub fn save_pretrained(&self, dir: &Path) -> Result<u64> {
        self.lora.save_pretrained(dir)
    }

    /// The active, unmerged adapter deltas `ΔW` of `site`, summed (`None` when it has none).
    fn active_delta(&self, site: &Linear) -> Result<Option<ArrayD<f32>>> {
        let base = site.base();
        let mut acc: Option<ArrayD<f32>> = None;
        for name in site.active() {
            if site.is_merged(&name)? {
                continue;
            }
            let ad = site.adapter(&name).ok_or(Error::UnknownName { name })?;
            let Some(d) = ad.delta_weight(base.as_ref())? else {
                return Err(Error::Invalid {
                    op: "qlora merge",
                    msg: format!("adapter `{}` on `{}` is not mergeable", ad.name(), site.path()),
                });
            };
            acc = Some(match acc {
                Some(a) => a + &d,
                None => d,
            });
        }
        Ok(acc)
    }

    /// Merge option (a), non-destructive: for every quantized site, `dequant(W_q) + Σ ΔW` of the active adapters,
    /// rounded to `dtype` (f32 leaves it exact). Returns `(site path, [out, in] weight)`.
    ///
    /// # Errors
    /// Adapter errors.
    pub fn merged_dense_weights(&self, dtype: FloatDtype) -> Result<Vec<(String, ArrayD<f32>)>> {
        let mut out = Vec::with_capacity(self.quantized.len());
        for (site, _) in &self.quantized {
            let mut w = site.base().dense_weight()?;
            if let Some(d) = self.active_delta(site)? {
                w += &d;
            }
            round_to(&mut w, dtype);
            out.push((site.path().to_string(), w));
        }
        Ok(out)
    }

    /// Merge option (a): replaces every quantized base by a frozen dense one holding
    /// [`Qlora::merged_dense_weights`] (`<path>.weight`, bias kept) and removes all adapters. The model is a
    /// plain dense model afterwards.
    ///
    /// # Errors
    /// Adapter errors; [`Error::Invalid`] when an adapter is merged already.
    pub fn merge_and_unload_dense(mut self, dtype: FloatDtype) -> Result<Vec<(String, ArrayD<f32>)>> {
        let merged = self.merged_dense_weights(dtype)?;
        let names: Vec<String> = self.lora.adapters().iter().map(|a| a.name.clone()).collect();
        for n in &names {
            self.lora.delete_adapter(n)?;
        }
        for ((site, q), (_, w)) in self.quantized.iter().zip(&merged) {
            let weight = Param::new(format!("{}.weight", site.path()), w.clone(), false);
            site.replace_base(Arc::new(Dense { weight, bias: q.bias() }))?;
        }
        Ok(merged)
    }

    /// Merge option (b): merges every active adapter into its quantized base by re-quantizing
    /// `dequant(W_q) + ΔW` (same quant type, blocksize, double quantisation), and reports the rounding error
    /// against the exact merge per merged site. The adapters stay attached, marked merged (forward skips them).
    ///
    /// # Errors
    /// Adapter and quantizer errors.
    pub fn merge_requantized(&self) -> Result<Vec<RoundingError>> {
        let mut out = Vec::new();
        for (site, q) in &self.quantized {
            for name in site.active() {
                if site.is_merged(&name)? {
                    continue;
                }
                let ad = site.adapter(&name).ok_or_else(|| Error::UnknownName { name: name.clone() })?;
                let base = site.base();
                let Some(d) = ad.delta_weight(base.as_ref())? else { continue };
                let mut target = base.dense_weight()?;
                Zip::from(&mut target).and(&d).for_each(|t, &v| *t += v);
                site.merge(&name)?;
                let got = q.dense_weight()?;
                let (t, g) = (target.as_standard_layout(), got.as_standard_layout());
                out.push(RoundingError::measure(
                    site.path(),
                    t.as_slice().expect("peft-rs bug: standard layout"),
                    g.as_slice().expect("peft-rs bug: standard layout"),
                ));
            }
        }
        Ok(out)
    }
}

/// The `"qlora"` registry entry: LoRA (by default r=8, alpha=16 on `query,value`) over a base whose linear
/// sites selected by `quant` (default [`default_quant_spec`]) are quantized to `format` (default NF4 + double
/// quantisation, blocksize 64).
///
/// Learning rate: LoRA's registry default for the bench's short runs (2.5e-3; the paper uses 1e-4..2e-4 for
/// long LLM runs).
pub struct QloraMethod {
    /// The LoRA part (config, rate, seed).
    pub lora: LoraMethod,
    /// Which linear sites to quantize (`None`: [`default_quant_spec`]). The task head is always excluded.
    pub quant: Option<ModulePattern>,
    /// The quantized format.
    pub format: QuantFormat,
}

impl QloraMethod {
    /// LoRA r=8, alpha=16 on `targets` over an NF4-DQ base of every linear except head and pooler.
    pub fn new<S: Into<String>>(targets: impl IntoIterator<Item = S>) -> Self {
        QloraMethod {
            lora: LoraMethod::new("qlora", LoraConfig::new(8, 16.0, targets), 2.5e-3),
            quant: None,
            format: QuantFormat::default(),
        }
    }

    /// The quantization selection, with the head modules excluded.
    fn quant_spec(&self, head: &[Param]) -> Result<TargetSpec> {
        let head_modules: Vec<String> =
            head.iter().map(|h| h.name().rsplit_once('.').map_or(h.name(), |(m, _)| m).to_string()).collect();
        match &self.quant {
            None => TargetSpec::new(
                &ModulePattern::Regex("all-linear".into()),
                Some(&ModulePattern::list(["pooler.dense"])),
                None,
                None,
                &head_modules,
            ),
            Some(p) => TargetSpec::new(p, None, None, None, &head_modules),
        }
    }
}

impl Method for QloraMethod {
    fn name(&self) -> &str {
        "qlora"
    }

    fn describe(&self) -> String {
        let t = match &self.lora.config.target_modules {
            Some(ModulePattern::List(v)) => v.join(","),
            Some(ModulePattern::Regex(s)) => s.clone(),
            None => "-".into(),
        };
        let q = match self.format {
            QuantFormat::Block4(c) => {
                format!("{}{} b{}", c.quant_type.name(), if c.double_quant { "-DQ" } else { "" }, c.blocksize)
            }
            QuantFormat::Int8 => "int8".into(),
        };
        format!("QLoRA: LoRA r={} alpha={} on {t} over {q} linears", self.lora.config.r, self.lora.config.alpha())
    }

    fn default_lr(&self) -> f64 {
        self.lora.default_lr()
    }

    fn prepare(&self, model: &dyn Module, head: &[Param]) -> Result<Box<dyn Prepared>> {
        quantize_sites(model, &self.quant_spec(head)?, &self.format)?;
        self.lora.prepare(model, head)
    }
}

/// The QLoRA registry entries with LoRA on `query,value` (BERT site names).
pub fn methods() -> Vec<Box<dyn Method>> {
    methods_for(&["query", "value"])
}

/// The QLoRA registry entries with LoRA on the given target names.
pub fn methods_for(targets: &[&str]) -> Vec<Box<dyn Method>> {
    vec![Box::new(QloraMethod::new(targets.iter().map(|s| s.to_string())))]
}

#[cfg(test)]
#[path = "qlora_tests.rs"]
mod tests;
