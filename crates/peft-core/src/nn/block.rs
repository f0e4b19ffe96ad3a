//! Transformer blocks: the encoder layer (post-LN as BERT, pre-LN with optional layer scale as ViT/DINOv2 and
//! Whisper) and the LLaMA decoder layer (RMSNorm, RoPE, SwiGLU, GQA, KV cache).
//!
//! Each block exposes, besides its linear layers and parameters: two residual adapter sites (after the attention
//! sub-layer and after the feed-forward sub-layer, applied to the sub-layer output before the residual addition),
//! an attention-prefix site (inside the attention) and a block-replacement site around the feed-forward block.

use ndarray::{ArrayD, IxDyn};

use crate::error::Result;
use crate::nn::attention::{KvCache, MultiHeadAttention, Rope};
use crate::nn::layers::{Activation, LayerNorm, Mlp, RmsNorm, SwiGlu};
use crate::nn::{BlockSite, Ctx, Ffn, Linear, Module, PrefixSite, ResidualSite, Visitor, WeightSource};
use crate::param::Param;
use crate::tensor::Tensor;

/// Where the LayerNorms sit in an encoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormPlacement {
    /// `x = LN(x + sublayer(x))` (BERT).
    Post,
    /// `x = x + sublayer(LN(x))` (ViT, DINOv2, Whisper).
    Pre,
}

/// Checkpoint names inside one encoder layer (relative to the layer's prefix), so one implementation serves
/// BERT, DINOv2 and Whisper.
#[derive(Clone, Debug)]
pub struct EncoderNames {
    /// Query projection.
    pub q: &'static str,
    /// Key projection.
    pub k: &'static str,
    /// Value projection.
    pub v: &'static str,
    /// Attention output projection.
    pub o: &'static str,
    /// Norm around attention.
    pub ln_attn: &'static str,
    /// Feed-forward up projection.
    pub fc1: &'static str,
    /// Feed-forward down projection.
    pub fc2: &'static str,
    /// Norm around the feed-forward block.
    pub ln_ffn: &'static str,
    /// Layer-scale vector after attention (`None`: no layer scale).
    pub ls_attn: Option<&'static str>,
    /// Layer-scale vector after the feed-forward block.
    pub ls_ffn: Option<&'static str>,
    /// Residual site after attention.
    pub res_attn: &'static str,
    /// Residual site after the feed-forward block.
    pub res_ffn: &'static str,
}

impl EncoderNames {
    /// BERT / RoBERTa names.
    pub const BERT: EncoderNames = EncoderNames {
        q: "attention.self.query",
        k: "attention.self.key",
        v: "attention.self.value",
        o: "attention.output.dense",
        ln_attn: "attention.output.LayerNorm",
        fc1: "intermediate.dense",
        fc2: "output.dense",
        ln_ffn: "output.LayerNorm",
        ls_attn: None,
        ls_ffn: None,
        res_attn: "attention.output",
        res_ffn: "output",
    };
    /// DINOv2 names.
    pub const DINOV2: EncoderNames = EncoderNames {
        q: "attention.attention.query",
        k: "attention.attention.key",
        v: "attention.attention.value",
        o: "attention.output.dense",
        ln_attn: "norm1",
        fc1: "mlp.fc1",
        fc2: "mlp.fc2",
        ln_ffn: "norm2",
        ls_attn: Some("layer_scale1.lambda1"),
        ls_ffn: Some("layer_scale2.lambda1"),
        res_attn: "attention.output",
        res_ffn: "mlp",
    };
    /// Whisper encoder names.
    pub const WHISPER: EncoderNames = EncoderNames {
        q: "self_attn.q_proj",
        k: "self_attn.k_proj",
        v: "self_attn.v_proj",
        o: "self_attn.out_proj",
        ln_attn: "self_attn_layer_norm",
        fc1: "fc1",
        fc2: "fc2",
        ln_ffn: "final_layer_norm",
        ls_attn: None,
        ls_ffn: None,
        res_attn: "self_attn",
        res_ffn: "mlp",
    };
}

/// Sizes and options of an encoder layer.
#[derive(Clone, Debug)]
pub struct EncoderConfig {
    /// Hidden size.
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// Feed-forward inner size.
    pub intermediate: usize,
    /// Feed-forward activation.
    pub act: Activation,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// Norm placement.
    pub norm: NormPlacement,
    /// Whether the key projection has a bias (Whisper's has none).
    pub k_bias: bool,
    /// Attention-probability and hidden dropout (training only).
    pub dropout: f64,
}

/// One transformer encoder layer.
#[derive(Clone)]
pub struct EncoderLayer {
    /// Self-attention.
    pub attn: MultiHeadAttention,
    /// Norm around attention.
    pub ln_attn: LayerNorm,
    /// Feed-forward block.
    pub mlp: Mlp,
    /// Norm around the feed-forward block.
    pub ln_ffn: LayerNorm,
    /// Layer scale after attention.
    pub ls_attn: Option<Param>,
    /// Layer scale after the feed-forward block.
    pub ls_ffn: Option<Param>,
    /// Residual site after attention.
    pub res_attn: ResidualSite,
    /// Residual site after the feed-forward block.
    pub res_ffn: ResidualSite,
    /// Block-replacement site around the feed-forward block (path of `res_ffn`).
    pub ffn: BlockSite,
    /// Config.
    pub cfg: EncoderConfig,
}

/// The module path above `name` (`attention.self.query` -> `attention.self`).
fn parent(name: &str) -> &str {
    name.rsplit_once('.').map_or("", |(p, _)| p)
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

impl EncoderLayer {
    /// Loads a layer whose tensors live under `prefix` with `names`.
    ///
    /// # Errors
    /// Missing or mis-shaped tensors.
    pub fn load(prefix: &str, names: &EncoderNames, cfg: &EncoderConfig, src: &dyn WeightSource) -> Result<Self> {
        let (h, i) = (cfg.hidden, cfg.intermediate);
        let p = |n: &str| join(prefix, n);
        let attn = MultiHeadAttention {
            q: Linear::load(&p(names.q), h, h, true, src)?,
            k: Linear::load(&p(names.k), h, h, cfg.k_bias, src)?,
            v: Linear::load(&p(names.v), h, h, true, src)?,
            o: Linear::load(&p(names.o), h, h, true, src)?,
            heads: cfg.heads,
            kv_heads: cfg.heads,
            head_dim: h / cfg.heads,
            rope: None,
            prefix: PrefixSite::new(p(parent(names.q)), h, cfg.heads, h / cfg.heads),
        };
        let ls = |n: Option<&str>| -> Result<Option<Param>> {
            n.map(|n| Ok(Param::new(p(n), src.get_or(&p(n), &[h], 1.0)?, false))).transpose()
        };
        let mlp = Mlp {
            fc1: Linear::load(&p(names.fc1), h, i, true, src)?,
            fc2: Linear::load(&p(names.fc2), i, h, true, src)?,
            act: cfg.act,
        };
        Ok(EncoderLayer {
            attn,
            ln_attn: LayerNorm::load(&p(names.ln_attn), h, cfg.eps, src)?,
            ffn: BlockSite::new(p(names.res_ffn), Ffn::Mlp(mlp.clone())),
            mlp,
            ln_ffn: LayerNorm::load(&p(names.ln_ffn), h, cfg.eps, src)?,
            ls_attn: ls(names.ls_attn)?,
            ls_ffn: ls(names.ls_ffn)?,
            res_attn: ResidualSite::new(p(names.res_attn)),
            res_ffn: ResidualSite::new(p(names.res_ffn)),
            cfg: cfg.clone(),
        })
    }

    fn dropout(&self, x: Tensor, ctx: &Ctx) -> Result<Tensor> {
        if ctx.train && self.cfg.dropout > 0.0 {
            ctx.with_rng(|rng| x.dropout(self.cfg.dropout, true, rng))
        } else {
            Ok(x)
        }
    }

    fn scale(h: Tensor, ls: &Option<Param>) -> Result<Tensor> {
        match ls {
            Some(p) => h.mul(&p.tensor()),
            None => Ok(h),
        }
    }

    /// Applies the layer to `x [B, L, hidden]`; `key_mask [B, L]` marks real (non-padding) tokens.
    ///
    /// # Errors
    /// Shape errors.
    pub fn forward(&self, x: &Tensor, key_mask: Option<&ArrayD<bool>>, ctx: &Ctx) -> Result<Tensor> {
        match self.cfg.norm {
            NormPlacement::Post => {
                let a = self.attn.forward(x, key_mask, false, None, ctx)?;
                let a = self.res_attn.forward(self.dropout(a, ctx)?, x, ctx)?;
                let x = self.ln_attn.forward(&x.add(&a)?)?;
                let f = self.ffn.forward(&x, ctx)?;
                let f = self.res_ffn.forward(self.dropout(f, ctx)?, &x, ctx)?;
                self.ln_ffn.forward(&x.add(&f)?)
            }
            NormPlacement::Pre => {
                let a = self.attn.forward(&self.ln_attn.forward(x)?, key_mask, false, None, ctx)?;
                let a = Self::scale(a, &self.ls_attn)?;
                let a = self.res_attn.forward(self.dropout(a, ctx)?, x, ctx)?;
                let x = x.add(&a)?;
                let f = self.ffn.forward(&self.ln_ffn.forward(&x)?, ctx)?;
                let f = Self::scale(f, &self.ls_ffn)?;
                let f = self.res_ffn.forward(self.dropout(f, ctx)?, &x, ctx)?;
                x.add(&f)
            }
        }
    }
}

impl Module for EncoderLayer {
    fn visit(&self, v: &mut dyn Visitor) {
        self.attn.visit(v);
        self.ln_attn.visit(v);
        if let Some(p) = &self.ls_attn {
            v.param(p);
        }
        self.res_attn.visit(v);
        self.mlp.visit(v);
        self.ffn.visit(v);
        self.ln_ffn.visit(v);
        if let Some(p) = &self.ls_ffn {
            v.param(p);
        }
        self.res_ffn.visit(v);
    }
}

/// Sizes and options of a LLaMA decoder layer.
#[derive(Clone, Debug)]
pub struct DecoderConfig {
    /// Hidden size.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// SwiGLU inner size.
    pub intermediate: usize,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// Rotary settings.
    pub rope: Rope,
}

/// One LLaMA decoder layer (`model.layers.N`).
#[derive(Clone)]
pub struct DecoderLayer {
    /// Pre-attention RMSNorm.
    pub input_norm: RmsNorm,
    /// Causal self-attention.
    pub attn: MultiHeadAttention,
    /// Pre-MLP RMSNorm.
    pub post_attn_norm: RmsNorm,
    /// SwiGLU feed-forward.
    pub mlp: SwiGlu,
    /// Residual site after attention (`<prefix>.self_attn`).
    pub res_attn: ResidualSite,
    /// Residual site after the MLP (`<prefix>.mlp`).
    pub res_ffn: ResidualSite,
    /// Block-replacement site around the MLP (`<prefix>.mlp`).
    pub ffn: BlockSite,
}

impl DecoderLayer {
    /// Loads `model.layers.N` style tensors under `prefix` (Hugging Face LLaMA names).
    ///
    /// # Errors
    /// Missing or mis-shaped tensors.
    pub fn load(prefix: &str, cfg: &DecoderConfig, src: &dyn WeightSource) -> Result<Self> {
        let p = |n: &str| join(prefix, n);
        let (h, qd, kvd) = (cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim);
        let mlp = SwiGlu {
            gate: Linear::load(&p("mlp.gate_proj"), h, cfg.intermediate, false, src)?,
            up: Linear::load(&p("mlp.up_proj"), h, cfg.intermediate, false, src)?,
            down: Linear::load(&p("mlp.down_proj"), cfg.intermediate, h, false, src)?,
        };
        Ok(DecoderLayer {
            input_norm: RmsNorm::load(&p("input_layernorm"), h, cfg.eps, src)?,
            attn: MultiHeadAttention {
                q: Linear::load(&p("self_attn.q_proj"), h, qd, false, src)?,
                k: Linear::load(&p("self_attn.k_proj"), h, kvd, false, src)?,
                v: Linear::load(&p("self_attn.v_proj"), h, kvd, false, src)?,
                o: Linear::load(&p("self_attn.o_proj"), qd, h, false, src)?,
                heads: cfg.heads,
                kv_heads: cfg.kv_heads,
                head_dim: cfg.head_dim,
                rope: Some(cfg.rope),
                prefix: PrefixSite::new(p("self_attn"), h, cfg.kv_heads, cfg.head_dim),
            },
            post_attn_norm: RmsNorm::load(&p("post_attention_layernorm"), h, cfg.eps, src)?,
            ffn: BlockSite::new(p("mlp"), Ffn::SwiGlu(mlp.clone())),
            mlp,
            res_attn: ResidualSite::new(p("self_attn")),
            res_ffn: ResidualSite::new(p("mlp")),
        })
    }

    /// Applies the layer to `x [B, L, hidden]` causally, appending to `cache` when given.
    ///
    /// # Errors
    /// Shape errors.
    pub fn forward(
        &self,
        x: &Tensor,
        key_mask: Option<&ArrayD<bool>>,
        cache: Option<&mut KvCache>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let a = self.attn.forward(&self.input_norm.forward(x)?, key_mask, true, cache, ctx)?;
        let a = self.res_attn.forward(a, x, ctx)?;
        let x = x.add(&a)?;
        let f = self.ffn.forward(&self.post_attn_norm.forward(&x)?, ctx)?;
        let f = self.res_ffn.forward(f, &x, ctx)?;
        x.add(&f)
    }
}

impl Module for DecoderLayer {
    fn visit(&self, v: &mut dyn Visitor) {
        self.input_norm.visit(v);
        self.attn.visit(v);
        self.res_attn.visit(v);
        self.post_attn_norm.visit(v);
        self.mlp.visit(v);
        self.ffn.visit(v);
        self.res_ffn.visit(v);
    }
}

/// A `[B, L]` key mask from per-sequence lengths (true for the first `len` positions).
pub fn length_mask(lens: &[usize], max_len: usize) -> ArrayD<bool> {
    ArrayD::from_shape_fn(IxDyn(&[lens.len(), max_len]), |ix| ix[1] < lens[ix[0]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::{named_params, residual_sites, RandomInit};
    use crate::ops::attention::RopeLayout;
    use crate::testing::max_abs_diff;

    fn decoder() -> DecoderLayer {
        let cfg = DecoderConfig {
            hidden: 16,
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
            intermediate: 24,
            eps: 1e-5,
            rope: Rope { theta: 10000.0, layout: RopeLayout::RotateHalf },
        };
        DecoderLayer::load("model.layers.0", &cfg, &RandomInit::new(3, 0.2)).unwrap()
    }

    #[test]
    fn incremental_decoding_with_kv_cache_equals_full_causal_forward() {
        let layer = decoder();
        let x = Tensor::new(RandomInit::new(9, 1.0).get("x", &[2, 5, 16]).unwrap());
        let ctx = Ctx::eval();
        let full = layer.forward(&x, None, None, &ctx).unwrap();
        let mut cache = KvCache::default();
        // prompt of 3 positions, then 2 single-token steps
        let mut outs = vec![layer.forward(&x.narrow(1, 0, 3).unwrap(), None, Some(&mut cache), &ctx).unwrap()];
        for t in 3..5 {
            outs.push(layer.forward(&x.narrow(1, t, 1).unwrap(), None, Some(&mut cache), &ctx).unwrap());
        }
        assert_eq!(cache.len(), 5);
        let refs: Vec<&Tensor> = outs.iter().collect();
        let inc = Tensor::concat(&refs, 1).unwrap();
        let err = max_abs_diff(full.as_slice(), inc.as_slice());
        assert!(err < 1e-5, "cached decode differs from full forward by {err}");
    }

    #[test]
    fn future_tokens_do_not_change_earlier_outputs() {
        let layer = decoder();
        let x = RandomInit::new(9, 1.0).get("x", &[1, 4, 16]).unwrap();
        let mut y = x.clone();
        y.as_slice_mut().unwrap()[3 * 16..].iter_mut().for_each(|v| *v += 1.0);
        let ctx = Ctx::eval();
        let a = layer.forward(&Tensor::new(x), None, None, &ctx).unwrap();
        let b = layer.forward(&Tensor::new(y), None, None, &ctx).unwrap();
        assert!(max_abs_diff(&a.as_slice()[..3 * 16], &b.as_slice()[..3 * 16]) < 1e-6);
        assert!(max_abs_diff(&a.as_slice()[3 * 16..], &b.as_slice()[3 * 16..]) > 1e-3);
    }

    #[test]
    fn encoder_layer_exposes_named_sites_and_padding_does_not_leak() {
        let cfg = EncoderConfig {
            hidden: 8,
            heads: 2,
            intermediate: 16,
            act: Activation::Gelu,
            eps: 1e-12,
            norm: NormPlacement::Post,
            k_bias: true,
            dropout: 0.1,
        };
        let layer = EncoderLayer::load("encoder.layer.0", &EncoderNames::BERT, &cfg, &RandomInit::new(1, 0.2)).unwrap();
        let sites: Vec<String> = crate::nn::linear_sites(&layer).iter().map(|l| l.path().to_string()).collect();
        assert_eq!(
            sites,
            [
                "encoder.layer.0.attention.self.query",
                "encoder.layer.0.attention.self.key",
                "encoder.layer.0.attention.self.value",
                "encoder.layer.0.attention.output.dense",
                "encoder.layer.0.intermediate.dense",
                "encoder.layer.0.output.dense"
            ]
        );
        let res: Vec<String> = residual_sites(&layer).iter().map(|r| r.path().to_string()).collect();
        assert_eq!(res, ["encoder.layer.0.attention.output", "encoder.layer.0.output"]);
        assert_eq!(named_params(&layer).len(), 16);
        // a padded position's content must not affect real positions
        let x = RandomInit::new(2, 1.0).get("x", &[1, 3, 8]).unwrap();
        let mut y = x.clone();
        y.as_slice_mut().unwrap()[16..].iter_mut().for_each(|v| *v = 5.0);
        let mask = length_mask(&[2], 3);
        let ctx = Ctx::eval();
        let a = layer.forward(&Tensor::new(x), Some(&mask), &ctx).unwrap();
        let b = layer.forward(&Tensor::new(y), Some(&mask), &ctx).unwrap();
        assert!(max_abs_diff(&a.as_slice()[..16], &b.as_slice()[..16]) < 1e-6);
        // dropout only in training mode, and seeded
        let x = Tensor::new(RandomInit::new(2, 1.0).get("x", &[1, 3, 8]).unwrap());
        let e1 = layer.forward(&x, None, &Ctx::eval()).unwrap();
        let t1 = layer.forward(&x, None, &Ctx::train(5)).unwrap();
        let t2 = layer.forward(&x, None, &Ctx::train(5)).unwrap();
        assert_eq!(t1.as_slice(), t2.as_slice());
        assert!(max_abs_diff(e1.as_slice(), t1.as_slice()) > 1e-4);
    }
}
