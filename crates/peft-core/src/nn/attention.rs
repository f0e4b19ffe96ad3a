//! Multi-head self-attention with grouped-query KV heads, optional rotary embedding and a KV cache.

use ndarray::ArrayD;

use crate::error::Result;
use crate::nn::{Ctx, Linear, Module, PrefixSite, Visitor};
use crate::ops::attention::{RopeLayout, RopePositions};
use crate::tensor::Tensor;

/// Rotary position embedding settings (LLaMA).
#[derive(Clone, Copy, Debug)]
pub struct Rope {
    /// Base frequency (`rope_theta`).
    pub theta: f64,
    /// Pairing of dimensions.
    pub layout: RopeLayout,
}

/// Cached keys and values of earlier positions, `[B, Hkv, L, D]` each.
#[derive(Clone, Default)]
pub struct KvCache {
    /// Keys.
    pub k: Option<Tensor>,
    /// Values.
    pub v: Option<Tensor>,
    /// How many of the cached positions are prefix key/values (from the attention-prefix site); the caller's
    /// key masks do not count them.
    pub prefix: usize,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.shape()[2])
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Self-attention: `o(softmax(q kᵀ / √d + masks) v)` over `heads` query heads and `kv_heads` key/value heads.
#[derive(Clone)]
pub struct MultiHeadAttention {
    /// Query projection.
    pub q: Linear,
    /// Key projection.
    pub k: Linear,
    /// Value projection.
    pub v: Linear,
    /// Output projection.
    pub o: Linear,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// Rotary embedding, if the model uses it.
    pub rope: Option<Rope>,
    /// The attention-prefix site (prefix key/values are prepended here; prompt tokens are driven by the layer
    /// stack through [`crate::nn::PromptedSeq`]).
    pub prefix: PrefixSite,
}

impl MultiHeadAttention {
    /// `[B, L, H*D] -> [B, H, L, D]`.
    fn split(&self, t: &Tensor, h: usize) -> Result<Tensor> {
        let s = t.shape();
        t.reshape(&[s[0], s[1], h, self.head_dim])?.permute(&[0, 2, 1, 3])
    }

    /// Attends `x [B, L, hidden]` to itself (plus cached positions). `key_mask [B, L_total]` marks valid keys
    /// (false = padding); `causal` masks future keys. When `cache` is given, new keys/values are appended to it.
    ///
    /// # Errors
    /// Shape errors.
    pub fn forward(
        &self,
        x: &Tensor,
        key_mask: Option<&ArrayD<bool>>,
        causal: bool,
        cache: Option<&mut KvCache>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let (b, l) = (x.shape()[0], x.shape()[1]);
        let mut q = self.split(&self.q.forward(x, ctx)?, self.heads)?;
        let mut k = self.split(&self.k.forward(x, ctx)?, self.kv_heads)?;
        let v = self.split(&self.v.forward(x, ctx)?, self.kv_heads)?;
        let cached = cache.as_ref().map_or(0, |c| c.len());
        // Prefix key/values: prepended once per sequence (with a cache, only while it is empty; they are then
        // cached like ordinary positions). As with past key/values in transformers, the real tokens then start
        // at position P for the rotary embedding.
        let new_prefix = if cached == 0 { self.prefix.key_values(b, ctx)? } else { None };
        let n_new = new_prefix.as_ref().map_or(0, |(pk, _)| pk.shape()[2]);
        let offset = cached + n_new;
        if let Some(r) = self.rope {
            q = q.rotary_embedding(RopePositions::Offset(offset), r.theta, r.layout)?;
            k = k.rotary_embedding(RopePositions::Offset(offset), r.theta, r.layout)?;
        }
        let (k, v) = match new_prefix {
            Some((pk, pv)) => (Tensor::concat(&[&pk, &k], 2)?, Tensor::concat(&[&pv, &v], 2)?),
            None => (k, v),
        };
        let mut n_prefix = n_new;
        let (k, v) = match cache {
            Some(c) => {
                let k = match &c.k {
                    Some(old) => Tensor::concat(&[old, &k], 2)?,
                    None => k,
                };
                let v = match &c.v {
                    Some(old) => Tensor::concat(&[old, &v], 2)?,
                    None => v,
                };
                c.k = Some(k.clone());
                c.v = Some(v.clone());
                if cached == 0 {
                    c.prefix = n_new;
                }
                n_prefix = c.prefix;
                (k, v)
            }
            None => (k, v),
        };
        let valid = key_mask.map(|m| {
            let m: Vec<bool> = m.iter().copied().collect();
            if n_prefix == 0 {
                return m;
            }
            // Prefix positions are valid keys in front of each row's mask.
            let lk = m.len() / b.max(1);
            (0..b)
                .flat_map(|r| std::iter::repeat_n(true, n_prefix).chain(m[r * lk..(r + 1) * lk].iter().copied()))
                .collect()
        });
        let a = q.scaled_dot_product_attention(&k, &v, valid.as_deref(), causal, None)?;
        let a = a.permute(&[0, 2, 1, 3])?.reshape(&[b, l, self.heads * self.head_dim])?;
        self.o.forward(&a, ctx)
    }
}

impl Module for MultiHeadAttention {
    fn visit(&self, v: &mut dyn Visitor) {
        self.q.visit(v);
        self.k.visit(v);
        self.v.visit(v);
        self.o.visit(v);
        self.prefix.visit(v);
    }
}
