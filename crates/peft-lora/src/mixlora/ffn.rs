//! The mixture around one feed-forward block ([`MixLoraFfn`]): the router, the experts, the routing rules and
//! the router losses; attached to a block site as a [`BlockAdapter`].

use std::sync::Mutex;

use ndarray::{Array2, ArrayD, IxDyn};
use peft_core::adapter::{AdapterError, AdapterResult, SavedTensors};
use peft_core::nn::{BlockAdapter, Ctx, Ffn, Linear};
use peft_core::{Param, Result, Tensor};
use rand::Rng;
use rand_distr::{Distribution, Normal};

use super::{MixLoraConfig, Router, RouterLosses, MIXLORA_TYPE};
use crate::structured::kaiming;

/// The projections of `ffn` in data-flow order (`fc1, fc2` or `gate, up, down`).
pub(super) fn sites_of(ffn: &Ffn) -> Vec<Linear> {
    ffn.linears()
}

/// The longest common module path of `paths` (`encoder.layer.3` for BERT's `intermediate.dense` and
/// `output.dense`), the prefix of the router key.
pub(super) fn common_prefix(paths: &[&str]) -> String {
    let split: Vec<Vec<&str>> = paths.iter().map(|p| p.split('.').collect()).collect();
    let Some(first) = split.first() else { return String::new() };
    let mut n = 0;
    while n < first.len() - 1 && split.iter().all(|s| s.len() > n + 1 && s[n] == first[n]) {
        n += 1;
    }
    first[..n].join(".")
}

/// One expert's LoRA on one projection.
pub(super) struct ExpertLora {
    a: Param,
    b: Param,
}

impl ExpertLora {
    fn apply(&self, x: &Tensor, s: f32) -> Result<Tensor> {
        Ok(x.linear(&self.a.tensor(), None)?.linear(&self.b.tensor(), None)?.mul_scalar(s))
    }
}

/// What the router decided for a batch of tokens.
pub struct Routing {
    /// Router logits `[N, E]` (of the jittered input in training).
    pub logits: Tensor,
    /// Router probabilities `[N, E]`.
    pub probs: Tensor,
    /// Each expert's output weight per token `[N, E]`, zero for experts not run on the token: top-k renormalised to
    /// sum 1; dynamic: the kept (temperature-divided) probabilities; Switch: `p_max` on the chosen expert, all zero
    /// for a dropped token.
    pub weights: Tensor,
    /// The chosen experts per token, best first (Switch: the top-1 before the capacity check), as counted by the
    /// load-balancing loss.
    pub choices: Vec<Vec<usize>>,
    /// Switch only: tokens over their expert's capacity (FFN output `p_max · x`); all false otherwise.
    pub dropped: Vec<bool>,
}

/// A MixLoRA mixture around one FFN.
pub struct MixLoraFfn {
    name: String,
    prefix: String,
    kind: Ffn,
    sites: Vec<Linear>,
    router: Router,
    pub(super) scaling: f32,
    jitter: f64,
    aux_coef: f64,
    gate: Param,
    /// `experts[e][projection]`, projections in [`Ffn::linears`] order.
    pub(super) experts: Vec<Vec<ExpertLora>>,
    last_aux: Mutex<Option<Tensor>>,
}

impl MixLoraFfn {
    /// Builds adapter `name` around `kind` (a feed-forward block), initialised from `rng`. The router is saved
    /// under the common module path of the projections.
    ///
    /// # Errors
    /// Invalid config; projections whose widths do not chain.
    pub fn new(name: &str, kind: Ffn, cfg: &MixLoraConfig, rng: &mut impl Rng) -> AdapterResult<Self> {
        cfg.validate()?;
        let sites = sites_of(&kind);
        let paths: Vec<&str> = sites.iter().map(Linear::path).collect();
        let prefix = common_prefix(&paths);
        let (Some(first), Some(down)) = (sites.first(), sites.last()) else {
            crate::error::fail!(crate::LoraError::FfnShape { prefix: String::new(), width: 0 });
        };
        let d = first.in_features();
        if down.out_features() != d
            || sites[..sites.len() - 1].iter().any(|s| s.in_features() != d || s.out_features() != down.in_features())
        {
            crate::error::fail!(crate::LoraError::FfnShape { prefix: prefix.to_string(), width: d });
        }
        let n = Normal::new(0.0f32, cfg.router_init_range as f32)
            .map_err(|e| AdapterError::config(MIXLORA_TYPE, "router_init_range", e.to_string()))?;
        let gate = Array2::from_shape_fn((cfg.num_experts, d), |_| n.sample(rng));
        let gate = Param::new(format!("{prefix}.mixlora_router.{name}.weight"), gate.into_dyn(), true);
        let r = cfg.r;
        let experts = (0..cfg.num_experts)
            .map(|e| {
                sites
                    .iter()
                    .map(|s| {
                        let (i, o, p) = (s.in_features(), s.out_features(), s.path());
                        ExpertLora {
                            a: Param::new(
                                format!("{p}.experts.{e}.lora_A.{name}.weight"),
                                kaiming(i, r, i, rng).into_dyn(),
                                true,
                            ),
                            b: Param::new(
                                format!("{p}.experts.{e}.lora_B.{name}.weight"),
                                ArrayD::zeros(IxDyn(&[o, r])),
                                true,
                            ),
                        }
                    })
                    .collect()
            })
            .collect();
        Ok(MixLoraFfn {
            name: name.to_string(),
            prefix,
            kind,
            sites,
            router: cfg.router()?,
            scaling: cfg.scaling(),
            jitter: cfg.jitter_noise,
            aux_coef: cfg.router_aux_loss_coef,
            gate,
            experts,
            last_aux: Mutex::new(None),
        })
    }

    /// The router weight `[E, d]`.
    pub fn router(&self) -> &Param {
        &self.gate
    }

    /// Expert `e`'s `(lora_A, lora_B)` on each projection, in FFN order.
    pub fn expert(&self, e: usize) -> Vec<(&Param, &Param)> {
        self.experts.get(e).map(|v| v.iter().map(|x| (&x.a, &x.b)).collect()).unwrap_or_default()
    }

    /// The saved tensors, keyed relative to the model root: the router at `<prefix>.mixlora_router.weight`, the
    /// experts at `<projection>.experts.<e>.lora_{A,B}.weight`.
    pub(super) fn saved(&self) -> Vec<(String, Param)> {
        let mut v = vec![(format!("{}.mixlora_router.weight", self.prefix), self.gate.clone())];
        for (e, projs) in self.experts.iter().enumerate() {
            for (s, x) in self.sites.iter().zip(projs) {
                v.push((format!("{}.experts.{e}.lora_A.weight", s.path()), x.a.clone()));
                v.push((format!("{}.experts.{e}.lora_B.weight", s.path()), x.b.clone()));
            }
        }
        v
    }

    /// The module path the router is saved under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The feed-forward block this mixture wraps.
    pub fn ffn(&self) -> &Ffn {
        &self.kind
    }

    /// Routes tokens `x [N, d]` as one sequence (the Switch capacity counts over all `N` rows).
    ///
    /// # Errors
    /// Shape errors.
    pub fn route(&self, x: &Tensor, ctx: &Ctx) -> Result<Routing> {
        let n = x.shape().first().copied().unwrap_or(0);
        self.route_seq(x, n, ctx)
    }

    /// Routes tokens `x [N, d]` that are sequences of `seq_len` consecutive rows (`[B, L, d]` flattened; the
    /// Switch capacity is counted per sequence, in row order, as in Switch Transformers).
    ///
    /// # Errors
    /// Shape errors; [`peft_core::Error::Rank`] when `x` is not 2-D.
    pub fn route_seq(&self, x: &Tensor, seq_len: usize, ctx: &Ctx) -> Result<Routing> {
        if x.rank() != 2 {
            return Err(peft_core::Error::Rank {
                op: "mixlora route",
                expected: "tokens [N, d]",
                shape: x.shape().to_vec(),
            });
        }
        let xr = if ctx.train && self.jitter > 0.0 {
            let j = self.jitter as f32;
            let noise =
                ctx.with_rng(|rng| ArrayD::from_shape_fn(IxDyn(x.shape()), |_| rng.gen_range(1.0 - j..=1.0 + j)));
            x.mul(&Tensor::new(noise))?
        } else {
            x.clone()
        };
        let logits = xr.linear(&self.gate.tensor(), None)?;
        let probs = logits.softmax(1)?;
        let (n, e) = (probs.shape()[0], probs.shape()[1]);
        let pv = probs.data();
        // Experts by decreasing probability; the stable sort keeps the lower expert first on ties (torch's argmax
        // also returns the first maximum).
        let sorted = |t: usize| {
            let mut order: Vec<usize> = (0..e).collect();
            order.sort_by(|&a, &b| pv[[t, b]].total_cmp(&pv[[t, a]]));
            order
        };
        let mut dropped = vec![false; n];
        let choices: Vec<Vec<usize>> = match self.router {
            Router::TopK(k) => (0..n).map(|t| sorted(t)[..k].to_vec()).collect(),
            Router::Dynamic { top_p, temperature } => {
                let div = if temperature > 0.0 { temperature as f32 } else { 1.0 };
                (0..n)
                    .map(|t| {
                        let order = sorted(t);
                        let mut cum = 0f32;
                        let keep = order
                            .iter()
                            .position(|&c| {
                                cum += pv[[t, c]] / div;
                                f64::from(cum) > top_p
                            })
                            .map_or(e, |i| i + 1);
                        order[..keep].to_vec()
                    })
                    .collect()
            }
            Router::Switch { capacity, .. } => {
                let mut used = vec![0usize; e];
                (0..n)
                    .map(|t| {
                        if t % seq_len.max(1) == 0 {
                            used.fill(0);
                        }
                        let c = sorted(t)[0];
                        used[c] += 1;
                        dropped[t] = used[c] > capacity;
                        vec![c]
                    })
                    .collect()
            }
        };
        let mut mask = ArrayD::<f32>::zeros(IxDyn(&[n, e]));
        for (t, cs) in choices.iter().enumerate() {
            if !dropped[t] {
                for &c in cs {
                    mask[[t, c]] = 1.0;
                }
            }
        }
        let pm = probs.mul(&Tensor::new(mask))?;
        let weights = match self.router {
            Router::TopK(_) => pm.div(&pm.sum(&[1], true)?)?,
            Router::Dynamic { temperature, .. } if temperature > 0.0 => pm.mul_scalar((1.0 / temperature) as f32),
            Router::Dynamic { .. } | Router::Switch { .. } => pm,
        };
        Ok(Routing { logits, probs, weights, choices, dropped })
    }

    /// The Mixtral load-balancing loss `E · Σ_{k,e} f[k,e]·P[e]` over the tokens with `valid[t]` (all when `None`),
    /// not multiplied by the coefficient.
    ///
    /// # Errors
    /// Shape errors; [`peft_core::Error::Empty`] when no token is valid, [`peft_core::Error::Count`] when the mask length differs.
    pub fn aux_loss(&self, routing: &Routing, valid: Option<&[bool]>) -> Result<Tensor> {
        let rows = valid_rows(routing.choices.len(), valid)?;
        let e = self.experts.len();
        let mut f = vec![0f32; e];
        for &t in &rows {
            for &c in &routing.choices[t] {
                f[c] += 1.0 / rows.len() as f32;
            }
        }
        let p = routing.probs.index_select(0, &rows)?.mean(&[0], false)?;
        Ok(p.mul(&Tensor::from_vec(f, &[e])?)?.sum_all().mul_scalar(e as f32))
    }

    /// The router z-loss `mean_t(logsumexp(logits_t)²)` over the valid tokens (all when `None`), unweighted.
    ///
    /// # Errors
    /// As [`MixLoraFfn::aux_loss`].
    pub fn z_loss(&self, routing: &Routing, valid: Option<&[bool]>) -> Result<Tensor> {
        let rows = valid_rows(routing.choices.len(), valid)?;
        let l = routing.logits.index_select(0, &rows)?;
        // logsumexp(l) = l_0 − log_softmax(l)_0, stable and differentiable.
        let lse = l.narrow(1, 0, 1)?.sub(&l.log_softmax(1)?.narrow(1, 0, 1)?)?;
        Ok(lse.square().mean_all())
    }

    /// The router losses over the valid tokens, with the strategy's weighted sum for the trainer.
    ///
    /// # Errors
    /// As [`MixLoraFfn::aux_loss`].
    pub fn router_losses(&self, routing: &Routing, valid: Option<&[bool]>) -> Result<RouterLosses> {
        let load_balance = self.aux_loss(routing, valid)?;
        let mut weighted = load_balance.mul_scalar(self.aux_coef as f32);
        let z = match self.router {
            Router::Switch { z_coef, .. } => {
                let z = self.z_loss(routing, valid)?;
                weighted = weighted.add(&z.mul_scalar(z_coef as f32))?;
                Some(z)
            }
            _ => None,
        };
        Ok(RouterLosses { load_balance, z, weighted })
    }

    /// `Σ_e w_e (out_e(x) − base(x))` for tokens `x [N, d]`, each expert run only on its (kept) tokens.
    fn moe_delta(&self, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        let s = self.scaling;
        let n = x.shape()[0];
        let Some(down) = self.sites.last().map(Linear::base) else {
            crate::error::fail!(crate::LoraError::FfnShape { prefix: String::new(), width: 0 });
        };
        let d_out = down.out_features();
        let mut acc = Tensor::zeros(&[n, d_out]);
        // Base projections once for all experts.
        let pre: Vec<Tensor> = match &self.kind {
            Ffn::Mlp(m) => vec![m.fc1.base().forward(x)?],
            Ffn::SwiGlu(g) => vec![g.gate.base().forward(x)?, g.up.base().forward(x)?],
        };
        let w_down = Tensor::new(down.dense_weight()?);
        for (e, ex) in self.experts.iter().enumerate() {
            let rows: Vec<usize> = (0..n).filter(|&t| !routing.dropped[t] && routing.choices[t].contains(&e)).collect();
            if rows.is_empty() {
                continue;
            }
            let xe = x.index_select(0, &rows)?;
            let (h, h0) = match &self.kind {
                Ffn::Mlp(m) => {
                    let act = m.act;
                    let i0 = pre[0].index_select(0, &rows)?;
                    let i = i0.add(&ex[0].apply(&xe, s)?)?;
                    (act.apply(&i), act.apply(&i0))
                }
                Ffn::SwiGlu(_) => {
                    let (g0, u0) = (pre[0].index_select(0, &rows)?, pre[1].index_select(0, &rows)?);
                    let g = g0.add(&ex[0].apply(&xe, s)?)?;
                    let u = u0.add(&ex[1].apply(&xe, s)?)?;
                    (g.silu().mul(&u)?, g0.silu().mul(&u0)?)
                }
            };
            let Some(last) = ex.last() else {
                crate::error::fail!(crate::LoraError::FfnShape { prefix: String::new(), width: 0 })
            };
            let de = h.sub(&h0)?.linear(&w_down, None)?.add(&last.apply(&h, s)?)?;
            let we = routing.weights.narrow(1, e, 1)?.index_select(0, &rows)?;
            let index = ArrayD::from_shape_fn(IxDyn(&[rows.len(), d_out]), |ix| rows[ix[0]]);
            acc = acc.scatter_add(0, &index, &de.mul(&we)?)?;
        }
        Ok(acc)
    }

    /// The mixture output `Σ_e w_e out_e(x)` (+ `p_max · x` for Switch's dropped tokens, then Switch's FFN
    /// dropout in training) for tokens `x [N, d]`, given `base [N, d]`, the base FFN output of the same tokens:
    /// `(Σ_e w_e)·base + Σ_e w_e (out_e(x) − base(x))`; top-k's weights sum to 1, so there it is `base + Σ…`
    /// exactly.
    fn mixture(&self, x: &Tensor, base: &Tensor, routing: &Routing, ctx: &Ctx) -> Result<Tensor> {
        let delta = self.moe_delta(x, routing)?;
        if let Router::TopK(_) = self.router {
            return base.add(&delta);
        }
        let mut y = base.mul(&routing.weights.sum(&[1], true)?)?.add(&delta)?;
        let rows: Vec<usize> = (0..routing.dropped.len()).filter(|&t| routing.dropped[t]).collect();
        if !rows.is_empty() {
            let p_max = routing.probs.index_select(0, &rows)?.max(1, true)?;
            let pass = x.index_select(0, &rows)?.mul(&p_max)?;
            let index = ArrayD::from_shape_fn(IxDyn(pass.shape()), |ix| rows[ix[0]]);
            y = y.scatter_add(0, &index, &pass)?;
        }
        match self.router {
            Router::Switch { dropout, .. } if ctx.train && dropout > 0.0 => {
                ctx.with_rng(|rng| y.dropout(dropout, true, rng))
            }
            _ => Ok(y),
        }
    }

    /// The MoE FFN output for `x [.., d]` and the router losses over the tokens marked in `valid` (one flag per
    /// token of `x`'s leading axes; `None`: all). With three or more axes the second-to-last is the sequence (for
    /// Switch's capacity); a 2-D `x` is one sequence.
    ///
    /// # Errors
    /// Shape errors; a mask of the wrong length.
    pub fn forward(&self, x: &Tensor, valid: Option<&[bool]>, ctx: &Ctx) -> Result<(Tensor, RouterLosses)> {
        let shape = x.shape().to_vec();
        let (x2, seq) = tokens(x)?;
        let base = match &self.kind {
            Ffn::Mlp(m) => m.fc2.base().forward(&m.act.apply(&m.fc1.base().forward(&x2)?))?,
            Ffn::SwiGlu(g) => {
                g.down.base().forward(&g.gate.base().forward(&x2)?.silu().mul(&g.up.base().forward(&x2)?)?)?
            }
        };
        let routing = self.route_seq(&x2, seq, ctx)?;
        let losses = self.router_losses(&routing, valid)?;
        let y = self.mixture(&x2, &base, &routing, ctx)?;
        Ok((y.reshape(&shape)?, losses))
    }

    /// Takes the weighted router loss recorded by the last block-site forward.
    pub fn take_aux_loss(&self) -> Option<Tensor> {
        self.last_aux.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// Flattens `x [.., d]` to tokens `[N, d]` and gives the sequence length (second-to-last axis with three or more
/// axes, else `N`).
fn tokens(x: &Tensor) -> Result<(Tensor, usize)> {
    let shape = x.shape();
    let d = *shape.last().unwrap_or(&0);
    let n = x.len() / d.max(1);
    let seq = if shape.len() >= 3 { shape[shape.len() - 2] } else { n };
    Ok((x.reshape(&[n, d])?, seq))
}

/// The token rows counted by a loss: those with `valid[t]`, or all.
fn valid_rows(n: usize, valid: Option<&[bool]>) -> Result<Vec<usize>> {
    let rows: Vec<usize> = match valid {
        Some(v) if v.len() != n => {
            return Err(peft_core::Error::Count {
                op: "mixlora",
                what: "mask entries per token",
                expected: n,
                got: v.len(),
            })
        }
        Some(v) => (0..n).filter(|&t| v[t]).collect(),
        None => (0..n).collect(),
    };
    if rows.is_empty() {
        return Err(peft_core::Error::Empty { op: "mixlora router loss", what: "the set of valid tokens" });
    }
    Ok(rows)
}

impl BlockAdapter for MixLoraFfn {
    fn name(&self) -> &str {
        &self.name
    }

    /// The mixture with `base(x)` (the block as it would be without this adapter) standing for the base FFN
    /// output: top-k gives `base(x) + Σ_e w_e (out_e(x) − base(x))`. Records the weighted router loss over the
    /// tokens the context's [`peft_core::nn::TokenMask`] marks real (all when it has none or another shape).
    fn forward(&self, x: &Tensor, base: &dyn Fn(&Tensor) -> Result<Tensor>, ctx: &Ctx) -> Result<Tensor> {
        let h = base(x)?;
        let (x2, seq) = tokens(x)?;
        let n = x2.shape()[0];
        let routing = self.route_seq(&x2, seq, ctx)?;
        let valid = ctx.token_mask().and_then(|m| m.flags_for(n));
        let losses = self.router_losses(&routing, valid)?;
        *self.last_aux.lock().unwrap_or_else(|p| p.into_inner()) = Some(losses.weighted);
        let h2 = h.reshape(&[n, h.len() / n.max(1)])?;
        self.mixture(&x2, &h2, &routing, ctx)?.reshape(h.shape())
    }

    fn params(&self) -> Vec<Param> {
        let mut v = vec![self.gate.clone()];
        for ex in &self.experts {
            for x in ex {
                v.push(x.a.clone());
                v.push(x.b.clone());
            }
        }
        v
    }
}

/// Keys relative to the model root, not to the block site (the experts live under the projections' paths):
/// [`super::MixLoraTuner`] writes them as they are.
impl SavedTensors for MixLoraFfn {
    fn saved_tensors(&self) -> Vec<(String, Param)> {
        self.saved()
    }
}
