//! Small layers: embedding, LayerNorm, RMSNorm, activations, the two-layer MLP and the SwiGLU feed-forward.

use crate::error::{Error, Result};
use crate::nn::{Ctx, Linear, Module, Visitor, WeightSource};
use crate::param::Param;
use crate::tensor::Tensor;

/// A lookup table `[vocab, dim]` named `<path>.weight`.
#[derive(Clone)]
pub struct Embedding {
    /// The table.
    pub weight: Param,
}

impl Embedding {
    /// Loads `<path>.weight [vocab, dim]` (frozen).
    ///
    /// # Errors
    /// Missing or mis-shaped tensor.
    pub fn load(path: &str, vocab: usize, dim: usize, src: &dyn WeightSource) -> Result<Self> {
        let name = format!("{path}.weight");
        Ok(Embedding { weight: Param::new(name.clone(), src.get(&name, &[vocab, dim])?, false) })
    }

    /// Rows for `ids` laid out in `shape` (e.g. `[batch, seq]`), giving `[.., dim]`.
    ///
    /// # Errors
    /// An id beyond the vocabulary, or `ids.len()` not matching `shape`.
    pub fn forward(&self, ids: &[usize], shape: &[usize]) -> Result<Tensor> {
        self.weight.tensor().embedding(ids, shape)
    }
}

impl Module for Embedding {
    fn visit(&self, v: &mut dyn Visitor) {
        v.param(&self.weight);
    }
}

/// LayerNorm over the last axis with `<path>.weight` and `<path>.bias`.
#[derive(Clone)]
pub struct LayerNorm {
    /// Scale `[dim]`.
    pub weight: Param,
    /// Shift `[dim]`.
    pub bias: Param,
    /// Epsilon inside the square root.
    pub eps: f64,
}

impl LayerNorm {
    /// Loads `<path>.weight` and `<path>.bias` (frozen; ones/zeros under random init).
    ///
    /// # Errors
    /// Missing or mis-shaped tensors.
    pub fn load(path: &str, dim: usize, eps: f64, src: &dyn WeightSource) -> Result<Self> {
        let w = format!("{path}.weight");
        let b = format!("{path}.bias");
        Ok(LayerNorm {
            weight: Param::new(w.clone(), src.get_or(&w, &[dim], 1.0)?, false),
            bias: Param::new(b.clone(), src.get_or(&b, &[dim], 0.0)?, false),
            eps,
        })
    }

    /// Normalises `x [.., dim]`.
    ///
    /// # Errors
    /// Shape mismatch on the last axis.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.layer_norm(Some(&self.weight.tensor()), Some(&self.bias.tensor()), self.eps)
    }
}

impl Module for LayerNorm {
    fn visit(&self, v: &mut dyn Visitor) {
        v.param(&self.weight);
        v.param(&self.bias);
    }
}

/// RMSNorm over the last axis (LLaMA) with `<path>.weight`.
#[derive(Clone)]
pub struct RmsNorm {
    /// Scale `[dim]`.
    pub weight: Param,
    /// Epsilon.
    pub eps: f64,
}

impl RmsNorm {
    /// Loads `<path>.weight` (frozen; ones under random init).
    ///
    /// # Errors
    /// Missing or mis-shaped tensor.
    pub fn load(path: &str, dim: usize, eps: f64, src: &dyn WeightSource) -> Result<Self> {
        let w = format!("{path}.weight");
        Ok(RmsNorm { weight: Param::new(w.clone(), src.get_or(&w, &[dim], 1.0)?, false), eps })
    }

    /// Normalises `x [.., dim]`.
    ///
    /// # Errors
    /// Shape mismatch on the last axis.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.rms_norm(Some(&self.weight.tensor()), self.eps)
    }
}

impl Module for RmsNorm {
    fn visit(&self, v: &mut dyn Visitor) {
        v.param(&self.weight);
    }
}

/// Activation functions by their Hugging Face `hidden_act` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU (`"gelu"`).
    Gelu,
    /// Tanh-approximated GELU (`"gelu_new"`, `"gelu_pytorch_tanh"`, `"gelu_fast"`).
    GeluTanh,
    /// ReLU.
    Relu,
    /// SiLU / swish.
    Silu,
    /// Tanh.
    Tanh,
}

impl Activation {
    /// Parses a `hidden_act` string.
    ///
    /// # Errors
    /// [`Error::Unsupported`] naming an unsupported activation.
    pub fn from_hf(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            "tanh" => Activation::Tanh,
            other => {
                return Err(Error::Unsupported {
                    op: "hidden_act",
                    what: "activation",
                    value: other.to_string(),
                    expected: "gelu, gelu_new, relu, silu, tanh, ...",
                })
            }
        })
    }

    /// Applies it.
    pub fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::Gelu => x.gelu(),
            Activation::GeluTanh => x.gelu_tanh(),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
            Activation::Tanh => x.tanh(),
        }
    }
}

/// `fc2(act(fc1(x)))`, the transformer feed-forward block.
#[derive(Clone)]
pub struct Mlp {
    /// Up projection.
    pub fc1: Linear,
    /// Down projection.
    pub fc2: Linear,
    /// Activation.
    pub act: Activation,
}

impl Mlp {
    /// Applies the block.
    ///
    /// # Errors
    /// Shape errors.
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.fc2.forward(&self.act.apply(&self.fc1.forward(x, ctx)?), ctx)
    }
}

impl Module for Mlp {
    fn visit(&self, v: &mut dyn Visitor) {
        self.fc1.visit(v);
        self.fc2.visit(v);
    }
}

/// LLaMA's `down(silu(gate(x)) * up(x))`.
#[derive(Clone)]
pub struct SwiGlu {
    /// Gate projection.
    pub gate: Linear,
    /// Up projection.
    pub up: Linear,
    /// Down projection.
    pub down: Linear,
}

impl SwiGlu {
    /// Applies the block.
    ///
    /// # Errors
    /// Shape errors.
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let h = self.gate.forward(x, ctx)?.silu().mul(&self.up.forward(x, ctx)?)?;
        self.down.forward(&h, ctx)
    }
}

impl Module for SwiGlu {
    fn visit(&self, v: &mut dyn Visitor) {
        self.gate.visit(v);
        self.up.visit(v);
        self.down.visit(v);
    }
}
