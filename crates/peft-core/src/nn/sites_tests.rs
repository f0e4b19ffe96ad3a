//! The attention-prefix and block-replacement sites inside the shared transformer blocks.

use std::sync::Arc;

use ndarray::{ArrayD, IxDyn};

use crate::nn::block::length_mask;
use crate::nn::{
    site_counts, Activation, BlockAdapter, Ctx, DecoderConfig, DecoderLayer, EncoderConfig, EncoderLayer, EncoderNames,
    KvCache, NormPlacement, Prefix, PrefixAdapter, PromptedSeq, RandomInit, Rope, SiteCounts, WeightSource,
};
use crate::ops::attention::RopeLayout;
use crate::param::Param;
use crate::tensor::Tensor;
use crate::testing::max_abs_diff;

fn encoder(norm: NormPlacement) -> EncoderLayer {
    let cfg = EncoderConfig {
        hidden: 8,
        heads: 2,
        intermediate: 16,
        act: Activation::Gelu,
        eps: 1e-12,
        norm,
        k_bias: true,
        dropout: 0.0,
    };
    EncoderLayer::load("encoder.layer.0", &EncoderNames::BERT, &cfg, &RandomInit::new(1, 0.3)).unwrap()
}

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

fn rand(shape: &[usize], seed: u64) -> Tensor {
    Tensor::new(RandomInit::new(seed, 1.0).get("x", shape).unwrap())
}

/// A fixed prefix (tokens or key/values).
struct Fixed {
    kv: Option<(Tensor, Tensor)>,
    tokens: Option<Tensor>,
}

impl PrefixAdapter for Fixed {
    fn name(&self) -> &str {
        "p"
    }
    fn prefix(&self, _batch: usize, _ctx: &Ctx) -> crate::Result<Prefix> {
        Ok(match (&self.kv, &self.tokens) {
            (Some((k, v)), _) => Prefix::KeyValue { keys: k.clone(), values: v.clone() },
            (None, Some(t)) => Prefix::Tokens(t.clone()),
            (None, None) => unreachable!(),
        })
    }
    fn params(&self) -> Vec<Param> {
        Vec::new()
    }
}

#[test]
fn every_block_exposes_one_prefix_and_one_block_site() {
    let c = site_counts(&encoder(NormPlacement::Post));
    assert_eq!(c, SiteCounts { params: 16, linear: 6, residual: 2, prefix: 1, block: 1, embedding: 0 });
    let c = site_counts(&decoder());
    assert_eq!(c, SiteCounts { params: 9, linear: 7, residual: 2, prefix: 1, block: 1, embedding: 0 });
    assert_eq!(encoder(NormPlacement::Pre).attn.prefix.path(), "encoder.layer.0.attention.self");
    assert_eq!(decoder().ffn.path(), "model.layers.0.mlp");
}

/// Prefix key/values equal the keys/values of extra tokens: a decoder layer with the key/value projections of
/// `P` prompt tokens as its prefix gives, at the real positions, what the plain layer gives on `[prompt; x]`
/// (positions of the real tokens start at `P` in both), with and without a KV cache.
#[test]
fn prefix_key_values_act_like_prepended_tokens() {
    let layer = decoder();
    let (b, p, l) = (2, 3, 4);
    let prompt = rand(&[b, p, 16], 5);
    let x = rand(&[b, l, 16], 6);
    let ctx = Ctx::eval();
    // Reference: the whole sequence through the plain layer.
    let full = layer.forward(&Tensor::concat(&[&prompt, &x], 1).unwrap(), None, None, &ctx).unwrap();
    let want = full.narrow(1, p, l).unwrap();
    // The prompt's keys/values as the plain layer computes them (normed input, projections, RoPE at 0..P).
    let mut cache = KvCache::default();
    layer.forward(&prompt, None, Some(&mut cache), &ctx).unwrap();
    let (k, v) = (cache.k.clone().unwrap(), cache.v.clone().unwrap());
    layer.attn.prefix.attach(Arc::new(Fixed { kv: Some((k, v)), tokens: None })).unwrap();
    let got = layer.forward(&x, None, None, &ctx).unwrap();
    assert!(max_abs_diff(got.as_slice(), want.as_slice()) < 1e-5);
    // With a cache: the prefix enters once, then decoding continues.
    let mut cache = KvCache::default();
    let first = layer.forward(&x.narrow(1, 0, 2).unwrap(), None, Some(&mut cache), &ctx).unwrap();
    let second = layer.forward(&x.narrow(1, 2, 2).unwrap(), None, Some(&mut cache), &ctx).unwrap();
    assert_eq!((cache.len(), cache.prefix), (p + l, p));
    let inc = Tensor::concat(&[&first, &second], 1).unwrap();
    assert!(max_abs_diff(inc.as_slice(), want.as_slice()) < 1e-5);
    // With a padding mask that does not count the prefix.
    let mask = length_mask(&[l, l], l);
    let masked = layer.forward(&x, Some(&mask), None, &ctx).unwrap();
    assert!(max_abs_diff(masked.as_slice(), want.as_slice()) < 1e-5);
}

#[test]
fn prefix_of_the_wrong_shape_is_an_error() {
    let layer = decoder();
    let bad = (rand(&[2, 3, 1, 4], 1), rand(&[2, 3, 1, 4], 2)); // 3 heads, the layer has 2
    layer.attn.prefix.attach(Arc::new(Fixed { kv: Some(bad), tokens: None })).unwrap();
    assert!(layer.forward(&rand(&[2, 4, 16], 3), None, None, &Ctx::eval()).is_err());
}

/// Prompt tokens inserted by a layer's prefix site: the real positions see them as extra (valid) tokens, the
/// output has the input's length, and padding still does not leak.
#[test]
fn prompt_tokens_are_inserted_masked_correctly_and_stripped() {
    let layer = encoder(NormPlacement::Pre);
    let (b, p, l) = (2, 2, 3);
    let prompt = rand(&[b, p, 8], 8);
    let x = rand(&[b, l, 8], 9);
    let ctx = Ctx::eval();
    let want = layer.forward(&Tensor::concat(&[&prompt, &x], 1).unwrap(), None, &ctx).unwrap().narrow(1, p, l).unwrap();
    layer.attn.prefix.attach(Arc::new(Fixed { kv: None, tokens: Some(prompt.clone()) })).unwrap();
    let mut seq = PromptedSeq::new(x.clone(), Some(length_mask(&[l, 2], l)));
    seq.enter(&layer.attn.prefix, &ctx).unwrap();
    assert_eq!((seq.n_prompt(), seq.hidden().shape()[1]), (p, p + l));
    let m = seq.mask().unwrap();
    assert!(m[[1, 0]] && m[[1, 1]] && m[[1, 3]] && !m[[1, 4]], "prompt valid, row 1 keeps its padding");
    let h = layer.forward(seq.hidden(), seq.mask(), &ctx).unwrap();
    seq.set_hidden(h).unwrap();
    // A second layer with the same site replaces the prompt positions rather than adding more.
    seq.enter(&layer.attn.prefix, &ctx).unwrap();
    assert_eq!(seq.hidden().shape()[1], p + l);
    let out = seq.finish().unwrap();
    assert_eq!(out.shape(), &[b, l, 8]);
    // Row 0 (no padding) after one layer equals the plain layer on [prompt; x].
    let mut one = PromptedSeq::new(x.clone(), None);
    one.enter(&layer.attn.prefix, &ctx).unwrap();
    let h = layer.forward(one.hidden(), None, &ctx).unwrap();
    one.set_hidden(h).unwrap();
    let got = one.finish().unwrap();
    assert!(max_abs_diff(got.as_slice(), want.as_slice()) < 1e-5);
}

/// Doubles the block's output.
struct Twice(Param);

impl BlockAdapter for Twice {
    fn name(&self) -> &str {
        "twice"
    }
    fn forward(
        &self,
        x: &Tensor,
        base: &dyn Fn(&Tensor) -> crate::Result<Tensor>,
        _ctx: &Ctx,
    ) -> crate::Result<Tensor> {
        base(x)?.mul(&self.0.tensor())
    }
    fn params(&self) -> Vec<Param> {
        vec![self.0.clone()]
    }
}

#[test]
fn block_site_replaces_the_ffn_and_detaches_cleanly() {
    let layer = encoder(NormPlacement::Post);
    let x = rand(&[2, 3, 8], 4);
    let ctx = Ctx::eval();
    let y0 = layer.forward(&x, None, &ctx).unwrap();
    let scale = Param::new("s", ArrayD::from_elem(IxDyn(&[1]), 1.0), true);
    layer.ffn.attach(Arc::new(Twice(scale.clone()))).unwrap();
    assert!(max_abs_diff(layer.forward(&x, None, &ctx).unwrap().as_slice(), y0.as_slice()) < 1e-6, "x1 = base");
    scale.set(ArrayD::from_elem(IxDyn(&[1]), 2.0)).unwrap();
    let ffn_in = rand(&[2, 3, 8], 10);
    let want = layer.mlp.forward(&ffn_in, &ctx).unwrap().mul_scalar(2.0);
    assert!(max_abs_diff(layer.ffn.forward(&ffn_in, &ctx).unwrap().as_slice(), want.as_slice()) < 1e-6);
    // Gradient reaches the replacement's parameter through the whole layer.
    let g = layer.forward(&x, None, &ctx).unwrap().sum_all().backward().unwrap();
    assert!(g.get_id(scale.id()).is_some());
    layer.ffn.activate("twice", false);
    assert!(max_abs_diff(layer.forward(&x, None, &ctx).unwrap().as_slice(), y0.as_slice()) < 1e-6);
    layer.ffn.detach("twice").unwrap();
    assert!(layer.ffn.adapters().is_empty());
    assert!(layer.ffn.detach("twice").is_err());
}
