//! Loading a model's linears straight into quantized bases, never materialising the dense f32 model.
//!
//! Backbone constructors build every linear site with [`peft_core::nn::Linear::load`], which first asks its
//! [`WeightSource`] for a ready-made base ([`WeightSource::linear_base`]). Two sources here answer:
//!
//! * [`QuantizeOnLoad`] wraps a dense source (a safetensors file, a GGUF file, a map) and quantizes layer by layer:
//!   each selected linear's f32 weight is read, quantized and dropped before the constructor asks for the next
//!   tensor, so at most one dense linear weight is alive at a time (`tests/layerwise_memory.rs` checks this with
//!   a counting allocator). The result is bit-identical to loading the dense model and then quantizing it with
//!   [`crate::quantize_linear_sites`].
//! * [`BnbWeights`] reads a bitsandbytes checkpoint ([`Checkpoint`], memory-mapped by [`Checkpoint::read`]): linears
//!   stored 4-bit (`<p>.weight` packed + `quant_state.bitsandbytes__nf4|fp4`) or int8 (`<p>.SCB`) become
//!   [`QuantLinear`] bases holding the stored codes as they are; every other tensor (embeddings, norms, a dense
//!   head) is converted to f32 on request. [`bnb_checkpoint`] writes such a checkpoint from a model whose linears
//!   are quantized. Linears in LQ-LoRA's NF-b storage, which bitsandbytes has no layout for, are stored and read
//!   under this crate's keys ([`crate::Checkpoint::insert_nf`]), so an LQ-LoRA base round-trips through the same
//!   checkpoint.
//!
//! Peak RSS loading SmolLM2-135M with an NF4-DQ base (`examples/load_rss.rs`, numbers and commands there):
//! dense-then-quantize 648.5 MB, layer by layer 316.6 MB, from a bnb 4-bit checkpoint 376.5 MB.
//!
//! QLoRA on a model loaded either way ([`crate::QloraConfig`]) keeps the quantized bases as they are (a site
//! already quantized in the requested format is not re-quantized).
//!
//! ```
//! use peft_core::nn::{Linear, LinearBase, RandomInit};
//! use peft_quant::load::QuantizeOnLoad;
//! use peft_quant::{QuantFormat, QuantLinear};
//!
//! let dense = RandomInit::new(0, 0.02);
//! let src = QuantizeOnLoad::new(&dense, QuantFormat::default());
//! let lin = Linear::load("layers.0.mlp.up_proj", 64, 128, false, &src)?;
//! assert!(lin.base().as_any().downcast_ref::<QuantLinear>().is_some());
//! assert_eq!(src.quantized(), vec!["layers.0.mlp.up_proj".to_string()]);
//! # Ok::<(), peft_core::Error>(())
//! ```

use std::sync::{Arc, Mutex};

use ndarray::{ArrayD, IxDyn};
use peft_core::nn::{named_params, LinearBase, Module, WeightSource};
use peft_core::{Error, Param};

use crate::block4::QuantType;
use crate::linear::{QuantFormat, QuantLinear, QuantWeight};
use crate::qlora::quantized_sites;
use crate::storage::{Checkpoint, RawTensor};

/// The module names [`QuantizeOnLoad`] leaves dense by default: output layers and heads (QLoRA keeps `lm_head`
/// in 16/32 bits) and BERT's pooler.
pub const DEFAULT_KEEP_DENSE: [&str; 4] = ["lm_head", "classifier", "score", "pooler.dense"];

/// True when module path `path` is `name` or ends with `.name` (PEFT's list matching).
fn matches_name(path: &str, name: &str) -> bool {
    path == name || path.strip_suffix(name).is_some_and(|head| head.ends_with('.'))
}

/// A [`WeightSource`] that quantizes linear weights while the model is built (see the module docs).
///
/// Every linear site built through it with [`peft_core::nn::Linear::load`] is quantized with `format`, except the
/// module names in `keep_dense` (default [`DEFAULT_KEEP_DENSE`]); biases stay f32 (frozen). Other tensors pass
/// through from the inner source.
pub struct QuantizeOnLoad<'a> {
    inner: &'a dyn WeightSource,
    format: QuantFormat,
    keep_dense: Vec<String>,
    done: Mutex<Vec<String>>,
}

impl<'a> QuantizeOnLoad<'a> {
    /// Quantizes the linears read from `inner` with `format`, all but [`DEFAULT_KEEP_DENSE`].
    pub fn new(inner: &'a dyn WeightSource, format: QuantFormat) -> Self {
        QuantizeOnLoad {
            inner,
            format,
            keep_dense: DEFAULT_KEEP_DENSE.iter().map(|s| s.to_string()).collect(),
            done: Mutex::new(Vec::new()),
        }
    }

    /// The same source with another list of module names to keep dense (matched as PEFT matches target lists:
    /// the whole path or its dotted suffix).
    pub fn keep_dense<S: Into<String>>(mut self, names: impl IntoIterator<Item = S>) -> Self {
        self.keep_dense = names.into_iter().map(Into::into).collect();
        self
    }

    /// The module paths quantized so far, in load order.
    pub fn quantized(&self) -> Vec<String> {
        self.done.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// True when the linear at `path` is quantized.
    pub fn selects(&self, path: &str) -> bool {
        !self.keep_dense.iter().any(|n| matches_name(path, n))
    }
}

impl WeightSource for QuantizeOnLoad<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> peft_core::Result<ArrayD<f32>> {
        self.inner.get(name, shape)
    }

    fn get_or(&self, name: &str, shape: &[usize], fill: f32) -> peft_core::Result<ArrayD<f32>> {
        self.inner.get_or(name, shape, fill)
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn linear_base(
        &self,
        path: &str,
        in_f: usize,
        out_f: usize,
        bias: bool,
    ) -> peft_core::Result<Option<Arc<dyn LinearBase>>> {
        if let Some(base) = self.inner.linear_base(path, in_f, out_f, bias)? {
            return Ok(Some(base));
        }
        if !self.selects(path) {
            return Ok(None);
        }
        let q = {
            // The dense weight lives only inside this block: quantized, then dropped.
            let w = self.inner.get(&format!("{path}.weight"), &[out_f, in_f])?;
            let w = w.as_standard_layout();
            let s = w.as_slice().expect("peft-rs bug: standard layout is contiguous");
            QuantWeight::quantize(s, out_f, in_f, &self.format)?
        };
        let b = if bias {
            let name = format!("{path}.bias");
            Some(Param::new(name.as_str(), self.inner.get_or(&name, &[out_f], 0.0)?, false))
        } else {
            None
        };
        let base = QuantLinear::new(q, b)?;
        self.done.lock().unwrap_or_else(|p| p.into_inner()).push(path.to_string());
        Ok(Some(Arc::new(base)))
    }
}

/// A [`WeightSource`] over a bitsandbytes checkpoint (see the module docs): quantized linears load as
/// [`QuantLinear`] bases with the stored codes, other tensors as f32.
pub struct BnbWeights<'a> {
    ckpt: &'a Checkpoint,
    origin: String,
}

impl<'a> BnbWeights<'a> {
    /// Wraps `ckpt`; `origin` names it in error messages (e.g. the file path).
    pub fn new(ckpt: &'a Checkpoint, origin: impl Into<String>) -> Self {
        BnbWeights { ckpt, origin: origin.into() }
    }

    /// True when `path` holds a quantized (4-bit, int8 or NF-b) weight.
    pub fn is_quantized(&self, path: &str) -> bool {
        let w = if path.is_empty() { "weight".to_string() } else { format!("{path}.weight") };
        let scb = if path.is_empty() { "SCB".to_string() } else { format!("{path}.SCB") };
        self.ckpt.get(&scb).is_some()
            || self.ckpt.has_nf(path)
            || [QuantType::Nf4, QuantType::Fp4]
                .iter()
                .any(|t| self.ckpt.get(&format!("{w}.quant_state.bitsandbytes__{}", t.name())).is_some())
    }

    fn dense(&self, name: &str, shape: &[usize]) -> peft_core::Result<ArrayD<f32>> {
        let t = self.ckpt.get(name).ok_or_else(|| Error::UnknownName { name: name.to_string() })?;
        if t.shape() != shape {
            return Err(Error::WeightShape {
                origin: self.origin.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: t.shape().to_vec(),
            });
        }
        let v = t.to_f32(name)?;
        Ok(ArrayD::from_shape_vec(IxDyn(shape), v).expect("peft-rs bug: byte length checked when the file was read"))
    }
}

impl WeightSource for BnbWeights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> peft_core::Result<ArrayD<f32>> {
        self.dense(name, shape)
    }

    fn contains(&self, name: &str) -> bool {
        self.ckpt.get(name).is_some()
    }

    fn linear_base(
        &self,
        path: &str,
        in_f: usize,
        out_f: usize,
        bias: bool,
    ) -> peft_core::Result<Option<Arc<dyn LinearBase>>> {
        if !self.is_quantized(path) {
            return Ok(None);
        }
        let weight = if self.ckpt.get(&format!("{path}.SCB")).is_some() {
            QuantWeight::Int8(self.ckpt.int8(path)?)
        } else if self.ckpt.has_nf(path) {
            QuantWeight::Nf(self.ckpt.nf(path)?)
        } else {
            QuantWeight::Block4(self.ckpt.quant4(path)?)
        };
        if weight.dims() != Some((out_f, in_f)) {
            return Err(Error::WeightShape {
                origin: self.origin.clone(),
                name: format!("{path}.weight"),
                expected: vec![out_f, in_f],
                found: weight.shape(),
            });
        }
        let b = if bias {
            let name = format!("{path}.bias");
            Some(Param::new(name.as_str(), self.dense(&name, &[out_f])?, false))
        } else {
            None
        };
        Ok(Some(Arc::new(QuantLinear::new(weight, b)?)))
    }
}

/// A bitsandbytes checkpoint of `model`'s base: every quantized linear site with bnb's keys
/// ([`QuantLinear::save`]: packed codes, scales, quant state, bias in the state's dtype) and every other
/// parameter as f32 under its name (embeddings, norms, dense linears; a tied parameter once). Reading it back with
/// [`BnbWeights`] rebuilds the same quantized model. Call it on the base model (adapter parameters would be
/// written too).
///
/// # Errors
/// The checkpoint's errors (a `quant_storage` the packed bytes do not fit).
pub fn bnb_checkpoint(model: &dyn Module) -> crate::Result<Checkpoint> {
    let mut ckpt = Checkpoint::new();
    let sites = quantized_sites(model);
    for site in &sites {
        let base = site.base();
        let q = base.as_any().downcast_ref::<QuantLinear>().expect("peft-rs bug: quantized_sites returns QuantLinear");
        q.save(&mut ckpt, site.path())?;
    }
    for p in named_params(model) {
        let name = p.name().to_string();
        if sites.iter().any(|s| name.strip_prefix(s.path()).is_some_and(|leaf| leaf == ".bias"))
            || ckpt.get(&name).is_some()
        {
            continue;
        }
        let v = p.value();
        let v = v.as_standard_layout();
        let t = RawTensor::from_f32(p.shape(), v.as_slice().expect("peft-rs bug: standard layout is contiguous"))?;
        ckpt.insert(name, t);
    }
    Ok(ckpt)
}

#[cfg(test)]
#[path = "load_tests.rs"]
mod tests;
