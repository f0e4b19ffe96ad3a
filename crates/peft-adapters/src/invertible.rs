//! Invertible adapters (Pfeiffer et al., 2020, MAD-X; used by "Small Models, Big Impact" as `seq_bn_inv`): a NICE
//! coupling block on the embedding-output site (spec §1.2-6). With `x = [x1 | x2]`, `|x1| = ⌊d/2⌋`:
//!
//! - forward: `y1 = x1 + F(x2)`, `y2 = x2 + G(y1)`;
//! - inverse: `x2 = y2 − G(y1)`, `x1 = y1 − F(x2)`;
//!
//! `F: d2 → ⌊d2/r⌋ → d1` and `G: d1 → ⌊d1/r⌋ → d2` are Linear → activation → Linear (AdapterHub's
//! `NICECouplingBlock` with `inv_adapter_reduction_factor` r = 2, ReLU). The model applies the forward map after
//! its embedding block and, where it has a head over the vocabulary (masked-LM), the inverse before that head
//! ([`peft_core::nn::EmbeddingSite`]), so a language adapter trained with MLM moves the token representations in
//! and back out.
//!
//! Init (`init_weights`): `"default"` (AdapterHub's: PyTorch's `nn.Linear` default, U(±1/√fan_in) for weights and
//! biases; the model is **not** the base model at init) or `"identity"` (the second linear of F and G zero: exact
//! identity at init, for adding to a trained model without changing it). AdapterHub's `seq_bn_inv` is a SeqBn
//! adapter plus this one: here two adapters (`BottleneckConfig::seq_bn()` and [`InvertibleConfig::nice()`]),
//! active together. Files: `peft_type = "INVERTIBLE"` (this crate's own); tensors `<site>.F.0.weight`,
//! `<site>.F.0.bias`, `<site>.F.2.weight`, `<site>.F.2.bias` and the same for `G` (AdapterHub's suffixes under
//! `invertible_adapters.<name>.`; reading AdapterHub's invertible adapters is not implemented).
//!
//! ```
//! use peft_core::adapter::PeftModel;
//! use peft_core::io::BertConfig;
//! use peft_core::nn::{embedding_sites, Ctx, RandomInit};
//! use peft_adapters::invertible::InvertibleConfig;
//! use peft_models::bert::BertModel;
//! use peft_models::tokenizer::Batch;
//!
//! let cfg = BertConfig { vocab_size: 10, hidden_size: 8, num_hidden_layers: 1, num_attention_heads: 2,
//!     intermediate_size: 16, max_position_embeddings: 8, ..BertConfig::default() };
//! let bert = BertModel::from_source(&cfg, &RandomInit::new(0, 0.1))?;
//! let batch = Batch::from_rows(&[vec![1, 4, 2]])?;
//! let model = PeftModel::new(bert, InvertibleConfig::nice(), "lang", 0)?;
//! let site = &embedding_sites(model.model())[0];
//! let e = model.embed(&batch, &Ctx::eval())?; // the adapter's forward map is applied here
//! let back = site.inverse(e.clone(), &Ctx::eval())?;
//! assert_ne!(back.to_vec(), e.to_vec());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::any::Any;
use std::sync::Arc;

use ndarray::ArrayD;
use peft_core::adapter::{
    site_rng, AdapterResult, AdapterTensors, InjectCx, PeftConfig, SavedTensors, Tuner, TunerConfig,
};
use peft_core::nn::{embedding_sites, Ctx, EmbeddingAdapter, EmbeddingSite, Module};
use peft_core::{Elem, Param, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::common::{config_json, kaiming, parse_config, uniform, Activation, SiteLayer, SiteTuner};
use crate::error::{AdaptersError, Result};

/// The invertible adapters' `peft_type` (this crate's own).
pub const INVERTIBLE_TYPE: &str = "INVERTIBLE";

/// How F and G start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InvInit {
    /// PyTorch's `nn.Linear` default for every layer (AdapterHub's).
    Default,
    /// The second linear of F and G zero: exact identity at init.
    Identity,
}

fn d_peft_type() -> String {
    INVERTIBLE_TYPE.into()
}
fn d_block() -> String {
    "nice".into()
}
fn d_act() -> Activation {
    Activation::Relu
}
fn d_r() -> f64 {
    2.0
}
fn d_init() -> InvInit {
    InvInit::Default
}

/// An invertible adapter's config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InvertibleConfig {
    /// Always `"INVERTIBLE"`.
    #[serde(default = "d_peft_type")]
    pub peft_type: String,
    /// The coupling block: `"nice"` (the only one implemented; AdapterHub's `"glow"` is refused).
    #[serde(default = "d_block")]
    pub inv_adapter: String,
    /// The non-linearity inside F and G.
    #[serde(default = "d_act")]
    pub non_linearity: Activation,
    /// F and G are `⌊in / r⌋` wide inside.
    #[serde(default = "d_r")]
    pub inv_adapter_reduction_factor: f64,
    /// Initialisation.
    #[serde(default = "d_init")]
    pub init_weights: InvInit,
    /// Modules trained and saved in full next to the adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    /// True in saved files.
    #[serde(default)]
    pub inference_mode: bool,
}

const KNOWN: &[&str] = &[
    "peft_type",
    "inv_adapter",
    "non_linearity",
    "inv_adapter_reduction_factor",
    "init_weights",
    "modules_to_save",
    "inference_mode",
];

impl InvertibleConfig {
    /// AdapterHub's NICE block: reduction 2, ReLU, PyTorch-default init.
    pub fn nice() -> Self {
        InvertibleConfig {
            peft_type: d_peft_type(),
            inv_adapter: d_block(),
            non_linearity: d_act(),
            inv_adapter_reduction_factor: d_r(),
            init_weights: d_init(),
            modules_to_save: None,
            inference_mode: false,
        }
    }

    /// [`InvertibleConfig::nice`] starting as the identity.
    pub fn nice_identity() -> Self {
        InvertibleConfig { init_weights: InvInit::Identity, ..Self::nice() }
    }

    /// Checks the values.
    ///
    /// # Errors
    /// [`AdaptersError::InvalidConfig`] / [`AdaptersError::Unsupported`] naming the field.
    pub fn validate(&self) -> Result<()> {
        if self.inv_adapter != "nice" {
            return Err(AdaptersError::Unsupported {
                method: INVERTIBLE_TYPE,
                what: format!("inv_adapter = {:?}", self.inv_adapter),
                reason: "only the NICE coupling block is implemented".into(),
            });
        }
        let r = self.inv_adapter_reduction_factor;
        if !(r.is_finite() && r > 0.0) {
            return Err(AdaptersError::config(
                INVERTIBLE_TYPE,
                "inv_adapter_reduction_factor",
                format!("must be a positive number, got {r}"),
            ));
        }
        Ok(())
    }

    /// `(d1, d2, hidden of F, hidden of G)` on a `d`-wide stream.
    pub fn widths(&self, d: usize) -> (usize, usize, usize, usize) {
        let (d1, d2) = (d / 2, d - d / 2);
        let w = |n: usize| ((n as f64 / self.inv_adapter_reduction_factor).floor() as usize).max(1);
        (d1, d2, w(d2), w(d1))
    }
}

/// `Linear → act → Linear`, generic over the element type (gradient checks in f64).
fn subnet<E: Elem>(x: &Tensor<E>, w: [&Tensor<E>; 4], act: Activation) -> peft_core::Result<Tensor<E>> {
    act.apply(&x.linear(w[0], Some(w[1]))?).linear(w[2], Some(w[3]))
}

/// The NICE forward (`inverse = false`) or inverse map on the last axis, `f` and `g` each
/// `[w1, b1, w2, b2]`.
///
/// # Errors
/// Shape errors.
pub fn nice_map<E: Elem>(
    x: &Tensor<E>,
    f: [&Tensor<E>; 4],
    g: [&Tensor<E>; 4],
    act: Activation,
    inverse: bool,
) -> peft_core::Result<Tensor<E>> {
    let axis = x.rank().saturating_sub(1);
    let d = x.shape().last().copied().unwrap_or(0);
    let d1 = d / 2;
    let (a, b) = (x.narrow(axis, 0, d1)?, x.narrow(axis, d1, d - d1)?);
    if inverse {
        let x2 = b.sub(&subnet(&a, g, act)?)?;
        let x1 = a.sub(&subnet(&x2, f, act)?)?;
        Tensor::concat(&[&x1, &x2], axis)
    } else {
        let y1 = a.add(&subnet(&b, f, act)?)?;
        let y2 = b.add(&subnet(&y1, g, act)?)?;
        Tensor::concat(&[&y1, &y2], axis)
    }
}

/// The NICE block of one adapter.
pub struct InvertibleLayer {
    name: String,
    f: [Param; 4],
    g: [Param; 4],
    act: Activation,
}

impl InvertibleLayer {
    fn new(path: &str, name: &str, d: usize, cfg: &InvertibleConfig, rng: &mut impl rand::Rng) -> Result<Self> {
        cfg.validate()?;
        let (d1, d2, hf, hg) = cfg.widths(d);
        let key = |k: &str| format!("{path}.adapters.{name}.{k}");
        let mut net = |tag: &str, din: usize, hidden: usize, dout: usize| -> [Param; 4] {
            let b1 = 1.0 / (din.max(1) as f32).sqrt();
            let b2 = 1.0 / (hidden.max(1) as f32).sqrt();
            let (w2, bb2) = match cfg.init_weights {
                InvInit::Default => (kaiming(dout, hidden, rng), uniform(&[dout], b2, rng)),
                InvInit::Identity => (ArrayD::zeros(vec![dout, hidden]), ArrayD::zeros(vec![dout])),
            };
            [
                Param::new(key(&format!("{tag}.0.weight")), kaiming(hidden, din, rng), true),
                Param::new(key(&format!("{tag}.0.bias")), uniform(&[hidden], b1, rng), true),
                Param::new(key(&format!("{tag}.2.weight")), w2, true),
                Param::new(key(&format!("{tag}.2.bias")), bb2, true),
            ]
        };
        let f = net("F", d2, hf, d1);
        let g = net("G", d1, hg, d2);
        Ok(InvertibleLayer { name: name.into(), f, g, act: cfg.non_linearity })
    }

    fn run(&self, x: &Tensor, inverse: bool) -> peft_core::Result<Tensor> {
        let f: Vec<Tensor> = self.f.iter().map(Param::tensor).collect();
        let g: Vec<Tensor> = self.g.iter().map(Param::tensor).collect();
        nice_map(x, [&f[0], &f[1], &f[2], &f[3]], [&g[0], &g[1], &g[2], &g[3]], self.act, inverse)
    }
}

impl EmbeddingAdapter for InvertibleLayer {
    fn name(&self) -> &str {
        &self.name
    }
    fn forward(&self, x: &Tensor, _ctx: &Ctx) -> peft_core::Result<Tensor> {
        self.run(x, false)
    }
    fn inverse(&self, y: &Tensor, _ctx: &Ctx) -> peft_core::Result<Tensor> {
        self.run(y, true)
    }
    fn params(&self) -> Vec<Param> {
        self.layer_params()
    }
}

const SUFFIXES: [&str; 4] = ["0.weight", "0.bias", "2.weight", "2.bias"];

impl SavedTensors for InvertibleLayer {
    fn saved_tensors(&self) -> Vec<(String, Param)> {
        let mut v = Vec::new();
        for (tag, ps) in [("F", &self.f), ("G", &self.g)] {
            for (s, p) in SUFFIXES.iter().zip(ps.iter()) {
                v.push((format!("{tag}.{s}"), p.clone()));
            }
        }
        v
    }
}

impl SiteLayer<EmbeddingSite> for InvertibleLayer {
    fn attach_to(self: Arc<Self>, site: &EmbeddingSite) -> peft_core::Result<()> {
        site.attach(self)
    }
    fn layer_params(&self) -> Vec<Param> {
        self.f.iter().chain(self.g.iter()).cloned().collect()
    }
}

/// An injected invertible adapter.
pub type InvertibleTuner = SiteTuner<EmbeddingSite, InvertibleLayer>;

impl TunerConfig for InvertibleConfig {
    fn peft_type(&self) -> &str {
        INVERTIBLE_TYPE
    }
    fn describe(&self) -> String {
        format!(
            "invertible adapter (NICE) reduction={} act={:?} init={:?}",
            self.inv_adapter_reduction_factor, self.non_linearity, self.init_weights
        )
    }
    fn to_json(&self) -> AdapterResult<Value> {
        Ok(config_json(self, INVERTIBLE_TYPE)?)
    }
    fn modules_to_save(&self) -> Vec<String> {
        self.modules_to_save.clone().unwrap_or_default()
    }
    fn set_modules_to_save(&mut self, modules: Vec<String>) -> AdapterResult<()> {
        self.modules_to_save = (!modules.is_empty()).then_some(modules);
        Ok(())
    }
    fn inference_mode(&self) -> bool {
        self.inference_mode
    }
    fn set_inference_mode(&mut self, on: bool) {
        self.inference_mode = on;
    }
    fn inject(&self, model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        self.validate()?;
        let sites = embedding_sites(model);
        if sites.is_empty() {
            return Err(AdaptersError::NoSites { method: INVERTIBLE_TYPE, what: "embedding-output site".into() }.into());
        }
        let d = crate::bottleneck::stream_width(model, INVERTIBLE_TYPE)?;
        let t = SiteTuner::attach(cx.name, INVERTIBLE_TYPE, &sites, |_, s| {
            InvertibleLayer::new(s.path(), cx.name, d, self, &mut site_rng(cx.seed, cx.name, s.path()))
        })?;
        Ok(Box::new(t))
    }
    fn preflight(&self, model: &dyn Module, file: &AdapterTensors) -> AdapterResult<()> {
        self.validate()?;
        let d = crate::bottleneck::stream_width(model, INVERTIBLE_TYPE)?;
        let (d1, d2, hf, hg) = self.widths(d);
        for s in embedding_sites(model) {
            let p = s.path();
            for (tag, din, h, dout) in [("F", d2, hf, d1), ("G", d1, hg, d2)] {
                for (suffix, shape) in SUFFIXES.iter().zip([vec![h, din], vec![h], vec![dout, h], vec![dout]]) {
                    crate::common::expect_tensor(file, &format!("{p}.{tag}.{suffix}"), &shape)?;
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

impl PeftConfig for InvertibleConfig {
    const PEFT_TYPE: &'static str = INVERTIBLE_TYPE;
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let (c, ignored): (Self, _) = parse_config(v, INVERTIBLE_TYPE, KNOWN)?;
        c.validate()?;
        Ok((c, ignored))
    }
}

#[cfg(test)]
#[path = "invertible_tests.rs"]
mod tests;
