//! The attention-prefix site: one per attention layer. Adapters attached to it either prepend learned key/value
//! rows to that layer's keys and values (prefix tuning, P-tuning v2, LLaMA-Adapter style), or insert learned
//! tokens into the hidden sequence entering the layer (prompt tuning and VPT-shallow at the first layer, VPT-deep
//! at every layer).
//!
//! Key/value prefixes are handled inside [`crate::nn::MultiHeadAttention::forward`]. Prompt tokens change the
//! sequence length, so the layer stack drives them through a [`PromptedSeq`]: before each layer it drops the
//! prompt positions the previous layer produced and inserts that layer's prompt (if any) at the front of the
//! sequence, marked as valid keys; after the last layer it strips them, so the model's outputs keep their usual
//! positions and pooling is unchanged. Positional embeddings are added before the first layer, so prompt tokens
//! inserted here carry none (VPT's convention); a backbone whose embedding block should see the first layer's
//! prompt, as PEFT feeds prompt tuning to BERT, takes it from [`PrefixSite::tokens`] itself and starts with
//! [`PromptedSeq::with_prompt`].

use std::sync::{Arc, RwLock};

use ndarray::{ArrayD, IxDyn};

use crate::error::{AdapterProblem, Error, Result};
use crate::nn::{Ctx, Module, Site, Visitor};
use crate::param::Param;
use crate::tensor::Tensor;

/// What a prefix adapter contributes to one forward.
pub enum Prefix {
    /// Keys and values `[B, H_kv, P, D]` each, prepended to the layer's keys and values (visible to every query,
    /// causal or not).
    KeyValue {
        /// Keys.
        keys: Tensor,
        /// Values.
        values: Tensor,
    },
    /// Tokens `[B, P, hidden]` inserted at the front of the hidden sequence entering the layer.
    Tokens(Tensor),
}

/// A method attached to an attention-prefix site.
pub trait PrefixAdapter: Send + Sync {
    /// The adapter's name.
    fn name(&self) -> &str;
    /// Its prefix for a batch of `batch` sequences.
    ///
    /// # Errors
    /// Shape errors from the underlying ops.
    fn prefix(&self, batch: usize, ctx: &Ctx) -> Result<Prefix>;
    /// Its parameters.
    fn params(&self) -> Vec<Param>;
    /// How many key/value positions its [`Prefix::KeyValue`] adds (0 for token adapters), when known without
    /// building the prefix; `None` (the default) makes [`PrefixSite::key_value_len`] build it to find out.
    fn key_value_len(&self) -> Option<usize> {
        None
    }
}

struct Inner {
    path: String,
    hidden: usize,
    kv_heads: usize,
    head_dim: usize,
    adapters: RwLock<Vec<(Arc<dyn PrefixAdapter>, bool)>>,
}

/// A named attention-prefix site (`encoder.layer.3.attention.self`, `model.layers.3.self_attn`, ...), with the
/// dimensions an adapter needs to build its prefix.
#[derive(Clone)]
pub struct PrefixSite(Arc<Inner>);

impl PrefixSite {
    /// A site with no adapters for an attention of `kv_heads × head_dim` keys over a `hidden`-wide stream.
    pub fn new(path: impl Into<String>, hidden: usize, kv_heads: usize, head_dim: usize) -> Self {
        PrefixSite(Arc::new(Inner { path: path.into(), hidden, kv_heads, head_dim, adapters: RwLock::new(Vec::new()) }))
    }

    /// The path.
    pub fn path(&self) -> &str {
        &self.0.path
    }

    /// Width of the hidden stream (the size of a prompt token).
    pub fn hidden(&self) -> usize {
        self.0.hidden
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.0.kv_heads
    }

    /// Per-head dimension.
    pub fn head_dim(&self) -> usize {
        self.0.head_dim
    }

    /// Attaches an adapter (active).
    ///
    /// # Errors
    /// [`Error::AdapterState`] when the name is taken.
    pub fn attach(&self, a: Arc<dyn PrefixAdapter>) -> Result<()> {
        let mut ads = self.0.adapters.write().unwrap_or_else(|p| p.into_inner());
        if ads.iter().any(|(b, _)| b.name() == a.name()) {
            return Err(Error::AdapterState {
                op: "attach",
                site: self.path().to_string(),
                adapter: a.name().to_string(),
                problem: AdapterProblem::Exists,
            });
        }
        ads.push((a, true));
        Ok(())
    }

    /// Detaches adapter `name`, returning it.
    ///
    /// # Errors
    /// [`Error::UnknownName`].
    pub fn detach(&self, name: &str) -> Result<Arc<dyn PrefixAdapter>> {
        let mut ads = self.0.adapters.write().unwrap_or_else(|p| p.into_inner());
        let i = ads
            .iter()
            .position(|(a, _)| a.name() == name)
            .ok_or_else(|| Error::UnknownName { name: format!("{}: adapter `{name}`", self.0.path) })?;
        Ok(ads.remove(i).0)
    }

    /// Turns adapter `name` on or off (a no-op when it is not attached here).
    pub fn activate(&self, name: &str, on: bool) {
        for (a, active) in self.0.adapters.write().unwrap_or_else(|p| p.into_inner()).iter_mut() {
            if a.name() == name {
                *active = on;
            }
        }
    }

    /// Makes exactly `names` active.
    pub fn set_active(&self, names: &[&str]) {
        for (a, on) in self.0.adapters.write().unwrap_or_else(|p| p.into_inner()).iter_mut() {
            *on = names.contains(&a.name());
        }
    }

    /// The attached adapters.
    pub fn adapters(&self) -> Vec<Arc<dyn PrefixAdapter>> {
        self.0.adapters.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(a, _)| a.clone()).collect()
    }

    fn active(&self) -> Vec<Arc<dyn PrefixAdapter>> {
        let ads = self.0.adapters.read().unwrap_or_else(|p| p.into_inner());
        ads.iter().filter(|(_, on)| *on).map(|(a, _)| a.clone()).collect()
    }

    /// The key/value rows of the active key/value adapters, concatenated along the position axis:
    /// `([B, H_kv, P, D], [B, H_kv, P, D])`, or `None`.
    ///
    /// # Errors
    /// Shape errors, including a prefix of the wrong size.
    pub fn key_values(&self, batch: usize, ctx: &Ctx) -> Result<Option<(Tensor, Tensor)>> {
        let (mut ks, mut vs) = (Vec::new(), Vec::new());
        for a in self.active() {
            if let Prefix::KeyValue { keys, values } = a.prefix(batch, ctx)? {
                for t in [&keys, &values] {
                    let s = t.shape();
                    if s.len() != 4 || s[0] != batch || s[1] != self.0.kv_heads || s[3] != self.0.head_dim {
                        return Err(Error::Shape {
                            op: "prefix key/values",
                            lhs: s.to_vec(),
                            rhs: vec![batch, self.0.kv_heads, 0, self.0.head_dim],
                        });
                    }
                }
                ks.push(keys);
                vs.push(values);
            }
        }
        if ks.is_empty() {
            return Ok(None);
        }
        let cat = |v: &[Tensor]| Tensor::concat(&v.iter().collect::<Vec<_>>(), 2);
        Ok(Some((cat(&ks)?, cat(&vs)?)))
    }

    /// How many key/value positions the active adapters prepend (the `P` of [`PrefixSite::key_values`]), without
    /// building the prefix when every adapter knows its length. Encoders whose absolute positions continue after
    /// a key/value prefix, as transformers' BERT does with `past_key_values`, read it before embedding.
    ///
    /// # Errors
    /// Shape errors from an adapter that has to build its prefix.
    pub fn key_value_len(&self, batch: usize, ctx: &Ctx) -> Result<usize> {
        let mut n = 0;
        for a in self.active() {
            n += match a.key_value_len() {
                Some(p) => p,
                None => match a.prefix(batch, ctx)? {
                    Prefix::KeyValue { keys, .. } => keys.shape().get(2).copied().unwrap_or(0),
                    Prefix::Tokens(_) => 0,
                },
            };
        }
        Ok(n)
    }

    /// The prompt tokens of the active token adapters, concatenated: `[B, P, hidden]`, or `None`.
    ///
    /// # Errors
    /// Shape errors, including tokens of the wrong width.
    pub fn tokens(&self, batch: usize, ctx: &Ctx) -> Result<Option<Tensor>> {
        let mut ts = Vec::new();
        for a in self.active() {
            if let Prefix::Tokens(t) = a.prefix(batch, ctx)? {
                let s = t.shape();
                if s.len() != 3 || s[0] != batch || s[2] != self.0.hidden {
                    return Err(Error::Shape {
                        op: "prompt tokens",
                        lhs: s.to_vec(),
                        rhs: vec![batch, 0, self.0.hidden],
                    });
                }
                ts.push(t);
            }
        }
        match ts.len() {
            0 => Ok(None),
            1 => Ok(ts.pop()),
            _ => Tensor::concat(&ts.iter().collect::<Vec<_>>(), 1).map(Some),
        }
    }
}

impl Module for PrefixSite {
    fn visit(&self, v: &mut dyn Visitor) {
        v.site(Site::Prefix(self));
        for a in self.adapters() {
            for p in a.params() {
                v.param(&p);
            }
        }
    }
}

/// A hidden sequence `[B, L, hidden]` with its key mask, carrying the prompt tokens the layers' prefix sites
/// insert (always at the front).
pub struct PromptedSeq {
    hidden: Tensor,
    mask: Option<ArrayD<bool>>,
    n_prompt: usize,
}

impl PromptedSeq {
    /// A sequence without prompt tokens; `mask [B, L]` marks real tokens.
    pub fn new(hidden: Tensor, mask: Option<ArrayD<bool>>) -> Self {
        PromptedSeq { hidden, mask, n_prompt: 0 }
    }

    /// A sequence whose first `n_prompt` positions are prompt tokens already embedded by the model (prompt tuning
    /// on BERT, where PEFT puts the tokens through the embedding block); `mask [B, L]` covers the prompt too.
    ///
    /// # Errors
    /// [`Error::Shape`] when the sequence is shorter than `n_prompt` or the mask does not match it.
    pub fn with_prompt(hidden: Tensor, mask: Option<ArrayD<bool>>, n_prompt: usize) -> Result<Self> {
        let s = hidden.shape().to_vec();
        let mask_ok = mask.as_ref().is_none_or(|m| s.len() == 3 && m.shape() == [s[0], s[1]]);
        if s.len() != 3 || s[1] < n_prompt || !mask_ok {
            return Err(Error::Shape {
                op: "PromptedSeq::with_prompt",
                lhs: s,
                rhs: mask.map_or(vec![n_prompt], |m| m.shape().to_vec()),
            });
        }
        Ok(PromptedSeq { hidden, mask, n_prompt })
    }

    /// Before a layer: when `site` has prompt tokens, the current prompt positions are dropped and the new ones
    /// inserted at the front (valid in the mask). Otherwise the sequence passes unchanged (a prompt inserted by an
    /// earlier layer travels on, as in VPT-shallow).
    ///
    /// # Errors
    /// Shape errors.
    pub fn enter(&mut self, site: &PrefixSite, ctx: &Ctx) -> Result<()> {
        let s = self.hidden.shape().to_vec();
        let Some(tokens) = site.tokens(s[0], ctx)? else { return Ok(()) };
        let rest = if self.n_prompt > 0 {
            self.hidden.narrow(1, self.n_prompt, s[1] - self.n_prompt)?
        } else {
            self.hidden.clone()
        };
        let p = tokens.shape()[1];
        self.hidden = Tensor::concat(&[&tokens, &rest], 1)?;
        if let Some(m) = &self.mask {
            let (b, l) = (m.shape()[0], m.shape()[1] - self.n_prompt);
            let old = m.clone();
            let n_old = self.n_prompt;
            self.mask =
                Some(ArrayD::from_shape_fn(IxDyn(&[b, p + l]), |ix| ix[1] < p || old[[ix[0], ix[1] - p + n_old]]));
        }
        self.n_prompt = p;
        Ok(())
    }

    /// The hidden states, prompt positions included.
    pub fn hidden(&self) -> &Tensor {
        &self.hidden
    }

    /// The key mask matching [`PromptedSeq::hidden`].
    pub fn mask(&self) -> Option<&ArrayD<bool>> {
        self.mask.as_ref()
    }

    /// Number of prompt positions at the front.
    pub fn n_prompt(&self) -> usize {
        self.n_prompt
    }

    /// Replaces the hidden states (a layer's output; same length).
    ///
    /// # Errors
    /// [`Error::Shape`] when the sequence length changed.
    pub fn set_hidden(&mut self, h: Tensor) -> Result<()> {
        if h.shape().get(1) != self.hidden.shape().get(1) {
            return Err(Error::Shape { op: "PromptedSeq", lhs: self.hidden.shape().to_vec(), rhs: h.shape().to_vec() });
        }
        self.hidden = h;
        Ok(())
    }

    /// The hidden states without the prompt positions.
    ///
    /// # Errors
    /// Shape errors.
    pub fn finish(self) -> Result<Tensor> {
        if self.n_prompt == 0 {
            return Ok(self.hidden);
        }
        let l = self.hidden.shape()[1];
        self.hidden.narrow(1, self.n_prompt, l - self.n_prompt)
    }
}
