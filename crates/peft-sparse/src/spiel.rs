//! SpIEL (Ansell et al. 2024, "Scaling Sparse Fine-Tuning to Large Language Models"): a sparse delta of `k`
//! entries per target whose support changes during training by *drop and grow*, in O(k) memory throughout.
//!
//! - Start: a random k-subset per tensor, values 0 (identity).
//! - Selection phases (spec §3.2): one starts at injection and after every step `s` with
//!   `(s + 1) % reselection_steps == 0`; during a phase each delta's dense-gradient tap
//!   ([`crate::indices::GradTap`]) records, at its first backward, the `k` positions of largest `|∂L/∂W|` as
//!   candidates, then accumulates their gradient sum, squared sum and sample count (O(k): 12 bytes per candidate
//!   with u32 indices, as many candidates as active entries like the reference's `num_candidates =
//!   len(values)`; fewer with [`SpielConfig::candidate_fraction`] below 1).
//! - After `accumulation_steps` steps of a phase: drop the `⌊k·p⌋` active entries of smallest `|value|` and grow
//!   the same number of candidates (not remaining active) of largest `|accumulated grad|`; an entry dropped and
//!   regrown keeps its value and state. `p = 1` at the first selection (full reselection), then
//!   `drop_fraction · (1 − step/total_steps)` (constant `drop_fraction` without `total_steps`). New entries start
//!   at 0 with SftAdamW state seeded from their accumulated gradients (`age` = the phase's optimizer steps,
//!   `exp_avg = mean_g·(1−β₁^age)`, `exp_avg_sq = mean_g²·(1−β₂^age)` with `mean_g²` the mean squared
//!   gradient), so Adam's bias correction un-biases them.
//! - Seed scale ([`SpielConfig::seeds`], [`SeedRule::Clipped`] by default; not in the spec): the tap sees the raw
//!   gradient, but the optimizer steps the values with the gradient clipped to `max_grad_norm`. The seeds are put
//!   in the optimizer's scale: `mean_g` times the phase's mean clip coefficient, `mean_g²` times the mean of its
//!   square, and both per optimizer step rather than per micro-batch (`age = samples / grad_accum` as in the
//!   reference; the trainer scales each micro-batch's loss by `1/grad_accum`). The reference (AlanAnsell/peft
//!   `SftSelector`) seeds from the raw hook gradients, which the HF trainer clips only afterwards: with the values'
//!   gradient norm at 2-23 against a clip of 1.0 (DINOv2-S on CIFAR-10), such seeds are 2-20 times the scale of
//!   every gradient the entry sees next, so a grown entry's first steps follow its seed, not its current
//!   gradient, and SpIEL's loss jumped after every drop/grow. VTAB-1k, DINOv2-S, seed 0: CIFAR-10* 17.6 → 41.6,
//!   F-MNIST* 57.3 → 77.5 with the seeds in the clipped scale; GLUE SST-2 (3 seeds) 75.9±3.2 → 74.5±3.4, within
//!   noise (`docs/bench/vtab-sparse/notes.md`, which also has [`SeedRule::None`]'s figures). The mean
//!   coefficient is exact when the clip is constant over the phase's steps or inactive; exact per-step scaling
//!   would need a fourth 4-byte buffer per candidate.
//! - The values are stepped by the adapter's own [`crate::adamw::SparseAdamW`] ([`crate::stepper`]).
//!
//! The SM3 variant and quantized bases are not implemented.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use peft_core::adapter::{AdapterResult, InjectCx, ModulePattern, PeftConfig, Tuner, TunerConfig};
use peft_core::autograd::GradStore;
use peft_core::nn::Module;

use crate::adamw::{Seed, SparseAdamWConfig};
use crate::delta::SparseDelta;
use crate::indices::SparseIndices;
use crate::select::top_k_indices;
use crate::stepper::ValueStepper;
use crate::tuner::{
    common_config_impl, fixed_deltas, parse, select_params, to_json, unknown_keys, MaskInit, SparseTuner, StepHooks,
};

/// SpIEL's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpielConfig {
    /// Always `"SPIEL"`.
    pub peft_type: String,
    /// Parameter names (full match of a regex, or names / dotted suffixes).
    pub target_parameters: ModulePattern,
    /// Fraction of each target's entries tuned, in `(0, 1]`.
    pub density: f64,
    /// Learning rate of the values (SftAdamW).
    pub lr: f64,
    /// Decoupled weight decay of the values (toward 0, i.e. toward the pretrained weights).
    pub weight_decay: f64,
    /// SftAdamW's epsilon.
    pub eps: f64,
    /// Gradient-norm clip over the values (`None`: none).
    pub max_grad_norm: Option<f64>,
    /// Linear warmup steps of the values' rate.
    pub warmup_steps: usize,
    /// Planned steps: the values' rate and the drop fraction decay linearly to 0 there (`None`: constant).
    pub total_steps: Option<usize>,
    /// Steps between selection phases.
    pub reselection_steps: usize,
    /// Steps a selection phase accumulates candidate gradients.
    pub accumulation_steps: usize,
    /// Fraction of entries swapped at a selection (after the first).
    pub drop_fraction: f64,
    /// How grown entries' optimizer state starts (see [`SeedRule`]).
    #[serde(default)]
    pub seeds: SeedRule,
    /// Regrowth candidates a selection phase tracks, as a fraction of each delta's `k`, in `(0, 1]` (rounded up,
    /// at least 1). `1.0` (the default) is the reference's `num_candidates = len(values)`; not in the paper. Each
    /// candidate costs 12 bytes for the phase, on top of the 12 bytes per entry SftAdamW keeps, so the phase peak
    /// is `12·k + 12·⌈f·k⌉` bytes: 3.0x the `8·k` of two f32 moments at `1.0`, 2.0x at `1/3`. Fewer candidates
    /// than drops (the first, full reselection drops all `k`) grow every candidate and keep the largest dropped
    /// entries for the rest (`docs/bench/glue-sparse/spiel-candidates/` measures the accuracy cost).
    #[serde(default = "one")]
    pub candidate_fraction: f64,
    /// Modules trained and saved in full (the task head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Loaded frozen.
    #[serde(default)]
    pub inference_mode: bool,
}

/// How a grown entry's SftAdamW state starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeedRule {
    /// Seeded from the phase's accumulated gradients in the scale the optimizer steps with (times the phase's
    /// mean clip coefficient, per optimizer step; module docs). The default.
    #[default]
    Clipped,
    /// Seeded from the raw accumulated gradients, as the reference implementation does (per optimizer step).
    Raw,
    /// Not seeded: zero moments at age 0, like an entry Adam has never seen (RigL's choice for regrown weights).
    None,
}

impl SpielConfig {
    /// SpIEL at `density` on the parameters whose names fully match the regex `target`, with the reference
    /// schedule (reselect every 20 steps, accumulate 5, drop 20%) and lr 2e-3.
    pub fn new(target: &str, density: f64) -> Self {
        SpielConfig {
            peft_type: Self::PEFT_TYPE.into(),
            target_parameters: ModulePattern::Regex(target.into()),
            density,
            lr: 2e-3,
            weight_decay: 0.0,
            eps: 1e-6,
            max_grad_norm: Some(1.0),
            warmup_steps: 0,
            total_steps: None,
            reselection_steps: 20,
            accumulation_steps: 5,
            drop_fraction: 0.2,
            seeds: SeedRule::Clipped,
            candidate_fraction: 1.0,
            modules_to_save: None,
            inference_mode: false,
        }
    }

    fn check(&self) -> AdapterResult<()> {
        let bad =
            |field: &str, reason: String| Err(peft_core::adapter::AdapterError::config(Self::PEFT_TYPE, field, reason));
        if self.reselection_steps == 0
            || self.accumulation_steps == 0
            || self.accumulation_steps >= self.reselection_steps
        {
            return bad(
                "accumulation_steps",
                format!(
                    "need 0 < accumulation_steps ({}) < reselection_steps ({})",
                    self.accumulation_steps, self.reselection_steps
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.drop_fraction) {
            return bad("drop_fraction", format!("{} must lie in [0, 1]", self.drop_fraction));
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", format!("{} must be finite and >= 0", self.lr));
        }
        if !(self.candidate_fraction > 0.0 && self.candidate_fraction <= 1.0) {
            return bad("candidate_fraction", format!("{} must lie in (0, 1]", self.candidate_fraction));
        }
        Ok(())
    }
}

fn one() -> f64 {
    1.0
}

/// Candidates tracked for a delta of `k` entries at `fraction` (see [`SpielConfig::candidate_fraction`]).
pub(crate) fn candidate_count(k: usize, fraction: f64) -> usize {
    ((k as f64 * fraction).ceil() as usize).clamp(k.min(1), k)
}

/// Regrowth candidates of one delta during a selection phase: 12 bytes each (a u32 flat index unless the tensor
/// has more than 2³² entries, the gradient sum and the squared sum) and one sample count per delta.
#[derive(Debug)]
struct Candidates {
    idx: SparseIndices,
    sum: Vec<f32>,
    sq: Vec<f32>,
    samples: u32,
}

impl Candidates {
    fn bytes(&self) -> usize {
        self.idx.bytes() + 4 * self.sum.len() + 4 * self.sq.len()
    }
}

#[derive(Debug, Default)]
struct SiteSel {
    active: bool,
    /// Candidates to record (`candidate_count` of the delta's k).
    n_cand: usize,
    cand: Option<Candidates>,
}

impl SiteSel {
    fn observe(&mut self, g: &[f32]) {
        if !self.active {
            return;
        }
        match &mut self.cand {
            None => {
                let scores: Vec<f32> = g.iter().map(|x| x.abs()).collect();
                // Sorted, distinct and below `g.len()` by construction, so `new` cannot fail.
                let Ok(idx) = SparseIndices::new("spiel candidates", top_k_indices(&scores, self.n_cand), g.len())
                else {
                    return;
                };
                let sum: Vec<f32> = idx.iter().map(|i| g[i]).collect();
                let sq = sum.iter().map(|x| x * x).collect();
                self.cand = Some(Candidates { idx, sum, sq, samples: 1 });
            }
            Some(c) => {
                for (j, i) in c.idx.iter().enumerate() {
                    let x = g[i];
                    c.sum[j] += x;
                    c.sq[j] += x * x;
                }
                c.samples += 1;
            }
        }
    }
}

struct Phase {
    steps_in: usize,
    first_done: bool,
    /// Sums of the values' clip coefficient and of its square over the phase's steps.
    clip_sum: f64,
    clip_sq_sum: f64,
}

struct SpielHooks {
    cfg: SpielConfig,
    stepper: ValueStepper,
    sites: Vec<Arc<Mutex<SiteSel>>>,
    phase: Mutex<Phase>,
}

/// One drop/grow on a delta: the new sorted indices and values, and the seeds of the new entries.
///
/// `p` is the swap fraction. Returns `None` when nothing changes.
pub(crate) fn drop_grow(
    old: &SparseIndices,
    values: &[f32],
    cand_idx: &SparseIndices,
    cand_score: &[f32],
    p: f64,
) -> Option<(Vec<u64>, Vec<f32>)> {
    let k = old.len();
    let n = ((k as f64 * p).floor() as usize).min(k);
    if n == 0 {
        return None;
    }
    // Drop: the n smallest |value| (ties: lower position first).
    let neg_abs: Vec<f32> = values.iter().map(|v| -v.abs()).collect();
    let dropped = top_k_indices(&neg_abs, n); // positions into old
    let mut is_dropped = vec![false; k];
    for &d in &dropped {
        is_dropped[d as usize] = true;
    }
    let remaining: Vec<u64> = (0..k).filter(|&j| !is_dropped[j]).map(|j| old.get(j) as u64).collect();
    // Grow: candidates not remaining active, by |score|.
    let pool: Vec<usize> =
        (0..cand_idx.len()).filter(|&j| remaining.binary_search(&(cand_idx.get(j) as u64)).is_err()).collect();
    let pool_scores: Vec<f32> = pool.iter().map(|&j| cand_score[j].abs()).collect();
    let grown_pos = top_k_indices(&pool_scores, n);
    let grown: Vec<u64> = grown_pos.iter().map(|&j| cand_idx.get(pool[j as usize]) as u64).collect();
    // Fewer candidates than drops: keep the largest dropped ones that were not regrown (a regrown entry is
    // already back), so the support keeps k entries.
    let short = n - grown.len();
    let mut keep_back: Vec<u64> = Vec::new();
    if short > 0 {
        let mut grown_sorted = grown.clone();
        grown_sorted.sort_unstable();
        let back: Vec<u64> = dropped
            .iter()
            .map(|&d| old.get(d as usize) as u64)
            .filter(|i| grown_sorted.binary_search(i).is_err())
            .collect();
        let b_abs: Vec<f32> = back.iter().map(|&i| old.position(i as usize).map_or(0.0, |j| values[j].abs())).collect();
        keep_back = top_k_indices(&b_abs, short).iter().map(|&j| back[j as usize]).collect();
    }
    let mut new: Vec<u64> = remaining.into_iter().chain(grown).chain(keep_back).collect();
    new.sort_unstable();
    new.dedup();
    let vals: Vec<f32> = new.iter().map(|&i| old.position(i as usize).map_or(0.0, |j| values[j])).collect();
    Some((new, vals))
}

impl SpielHooks {
    /// `steps`: optimizer steps the phase accumulated; `clip`, `clip_sq`: the mean clip coefficient of those steps
    /// and the mean of its square.
    fn reselect(
        &self,
        tuner: &SparseTuner,
        step: usize,
        first: bool,
        steps: usize,
        (clip, clip_sq): (f64, f64),
    ) -> peft_core::Result<()> {
        let (clip, clip_sq) = if self.cfg.seeds == SeedRule::Clipped { (clip, clip_sq) } else { (1.0, 1.0) };
        let seeded = self.cfg.seeds != SeedRule::None;
        let p = if first {
            1.0
        } else {
            let decay = self.cfg.total_steps.map_or(1.0, |t| (1.0 - step as f64 / t.max(1) as f64).max(0.0));
            self.cfg.drop_fraction * decay
        };
        let mut opt = self.stepper.opt.lock().unwrap_or_else(|e| e.into_inner());
        for (slot, ((_, d), site)) in tuner.entries().iter().zip(&self.sites).enumerate() {
            let mut s = site.lock().unwrap_or_else(|e| e.into_inner());
            s.active = false;
            let Some(c) = s.cand.take() else { continue };
            let old = d.indices();
            let vals: Vec<f32> = d.values().value().iter().copied().collect();
            let Some((new, new_vals)) = drop_grow(&old, &vals, &c.idx, &c.sum, p) else { continue };
            let numel: usize = d.shape().iter().product();
            let Ok(new_idx) = SparseIndices::new(d.param_name(), new, numel) else { continue };
            // Per optimizer step: each micro-batch's gradient carries 1/grad_accum of the step's.
            let samples = f64::from(c.samples.max(1));
            let steps = steps.max(1) as f64;
            let g_scale = (clip / steps) as f32;
            let sq_scale = (clip_sq * samples / (steps * steps)) as f32;
            let age = steps as u32;
            opt.remap(slot, &old, &new_idx, |flat| {
                let j = c.idx.position(flat).filter(|_| seeded)?;
                Some(Seed { mean_grad: c.sum[j] * g_scale, mean_sq: c.sq[j] * sq_scale, age })
            });
            if d.set(new_idx, new_vals).is_err() {
                continue;
            }
        }
        Ok(())
    }
}

impl StepHooks for SpielHooks {
    fn state_bytes(&self) -> usize {
        let cand: usize = self
            .sites
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).cand.as_ref().map_or(0, Candidates::bytes))
            .sum();
        self.stepper.state_bytes() + cand
    }
    fn transform_grads(&self, tuner: &SparseTuner, grads: GradStore) -> peft_core::Result<GradStore> {
        let ds: Vec<Arc<SparseDelta>> = tuner.entries().iter().map(|(_, d)| d.clone()).collect();
        Ok(self.stepper.take(&ds, grads, true))
    }

    fn after_step(&self, tuner: &SparseTuner, step: usize) -> peft_core::Result<()> {
        let ds: Vec<Arc<SparseDelta>> = tuner.entries().iter().map(|(_, d)| d.clone()).collect();
        let clip = self.stepper.apply(&ds, step);
        let mut ph = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        let collecting = self.sites.first().is_some_and(|s| s.lock().unwrap_or_else(|e| e.into_inner()).active);
        if collecting {
            ph.steps_in += 1;
            ph.clip_sum += clip;
            ph.clip_sq_sum += clip * clip;
            if ph.steps_in >= self.cfg.accumulation_steps {
                let first = !ph.first_done;
                let n = ph.steps_in as f64;
                let means = (ph.clip_sum / n, ph.clip_sq_sum / n);
                let steps = ph.steps_in;
                ph.first_done = true;
                (ph.steps_in, ph.clip_sum, ph.clip_sq_sum) = (0, 0.0, 0.0);
                self.reselect(tuner, step, first, steps, means)?;
            }
        } else if (step + 1).is_multiple_of(self.cfg.reselection_steps) {
            for s in &self.sites {
                let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
                s.active = true;
                s.cand = None;
            }
        }
        Ok(())
    }
}

impl TunerConfig for SpielConfig {
    fn peft_type(&self) -> &str {
        Self::PEFT_TYPE
    }
    fn describe(&self) -> String {
        let cand = if self.candidate_fraction < 1.0 {
            format!(", candidates {:.3} of k", self.candidate_fraction)
        } else {
            String::new()
        };
        format!(
            "SpIEL density {} (reselect every {} steps, accumulate {}, drop {}{cand})",
            self.density, self.reselection_steps, self.accumulation_steps, self.drop_fraction
        )
    }
    fn to_json(&self) -> AdapterResult<Value> {
        to_json(self, Self::PEFT_TYPE)
    }
    fn inject(&self, _model: &dyn Module, cx: InjectCx<'_>) -> AdapterResult<Box<dyn Tuner>> {
        self.check()?;
        let targets = select_params(Self::PEFT_TYPE, &self.target_parameters, &self.modules_to_save(), cx.base_params)?;
        let deltas = fixed_deltas(Self::PEFT_TYPE, "spiel", targets, self.density, MaskInit::Random, &cx)?;
        let ks: Vec<usize> = deltas.iter().map(|(_, d)| d.k()).collect();
        let mut sites = Vec::new();
        for (_, d) in &deltas {
            let site = Arc::new(Mutex::new(SiteSel {
                active: !self.inference_mode,
                n_cand: candidate_count(d.k(), self.candidate_fraction),
                cand: None,
            }));
            let s2 = site.clone();
            d.set_tap(Some(Arc::new(move |g: &ndarray::ArrayD<f32>| {
                if let Some(gs) = g.as_slice() {
                    s2.lock().unwrap_or_else(|e| e.into_inner()).observe(gs);
                }
            })));
            sites.push(site);
        }
        let opt =
            SparseAdamWConfig { lr: self.lr, eps: self.eps, weight_decay: self.weight_decay, ..Default::default() };
        let stepper = ValueStepper::new(opt, &ks, self.warmup_steps, self.total_steps, self.max_grad_norm);
        let hooks = SpielHooks {
            cfg: self.clone(),
            stepper,
            sites,
            phase: Mutex::new(Phase { steps_in: 0, first_done: false, clip_sum: 0.0, clip_sq_sum: 0.0 }),
        };
        Ok(Box::new(SparseTuner::attach(cx.name, Self::PEFT_TYPE, deltas)?.with_hooks(Box::new(hooks))))
    }
    common_config_impl!();
}

impl PeftConfig for SpielConfig {
    const PEFT_TYPE: &'static str = "SPIEL";
    fn from_json(v: &Value) -> AdapterResult<(Self, Vec<String>)> {
        let known = [
            "peft_type",
            "target_parameters",
            "density",
            "lr",
            "weight_decay",
            "eps",
            "max_grad_norm",
            "warmup_steps",
            "total_steps",
            "reselection_steps",
            "accumulation_steps",
            "drop_fraction",
            "seeds",
            "candidate_fraction",
            "modules_to_save",
            "inference_mode",
        ];
        let ignored = unknown_keys(v, &known, Self::PEFT_TYPE);
        let c: Self = parse(v, Self::PEFT_TYPE)?;
        c.check()?;
        crate::tuner::budget(Self::PEFT_TYPE, c.density, 1)?;
        Ok((c, ignored))
    }
}

#[cfg(test)]
#[path = "spiel_tests.rs"]
mod tests;
