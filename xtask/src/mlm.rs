//! Masked language modelling on MiniLM, for LT-SFT's **language** sparse fine-tuning (Ansell et al. 2022): the
//! recipe trains a language SFT with MLM on unlabelled text of the target language, trains the task SFT on top of
//! it, and applies both at inference.
//!
//! The checkpoint (`all-MiniLM-L6-v2`, a sentence-embedding model) ships without BERT's MLM head, so
//! [`MaskedLm`] adds a fresh one with transformers' `BertLMPredictionHead` layout: `transform.dense` (H→H), the
//! configured activation, `transform.LayerNorm`, then a decoder **tied to the frozen word embeddings** plus a
//! trainable per-token bias. The head trains densely beside the sparse delta and is not saved: only the delta
//! is the language SFT. Masking is BERT's: 15% of the real, non-special tokens (at least one per batch), of
//! which 80% become `[MASK]`, 10% a random token and 10% stay as they are.

use peft_core::nn::{Activation, Ctx, LayerNorm, Linear, Module, RandomInit, Visitor};
use peft_core::{Param, Tensor};
use peft_models::bert::BertModel;
use rand::rngs::StdRng;
use rand::Rng;

use crate::model::TokBatch;

/// MiniLM with a fresh MLM head (see the module docs).
pub struct MaskedLm {
    /// The encoder (parameter names as in the sequence classifier, so a delta trained here applies there).
    pub bert: BertModel,
    /// `cls.predictions.transform.dense` `[H, H]`.
    pub transform: Linear,
    /// The encoder's `hidden_act`, as `BertPredictionHeadTransform` applies it.
    pub act: Activation,
    /// `cls.predictions.transform.LayerNorm`.
    pub norm: LayerNorm,
    /// `cls.predictions.bias` `[vocab]`.
    pub bias: Param,
}

impl MaskedLm {
    /// A fresh head on `bert`, drawn from N(0, `initializer_range`) with `seed` (LayerNorm ones/zeros, bias 0);
    /// the head's parameters are trainable, the encoder's untouched.
    ///
    /// # Errors
    /// Shape errors while building the head; an unknown `hidden_act`.
    pub fn new(bert: BertModel, seed: u64) -> peft_core::Result<Self> {
        let (h, v) = (bert.cfg.hidden_size, bert.cfg.vocab_size);
        let act = Activation::from_hf(&bert.cfg.hidden_act)?;
        let init = RandomInit::new(seed, bert.cfg.initializer_range as f32);
        let transform = Linear::load("cls.predictions.transform.dense", h, h, true, &init)?;
        let norm = LayerNorm::load("cls.predictions.transform.LayerNorm", h, bert.cfg.layer_norm_eps, &init)?;
        let bias = Param::new("cls.predictions.bias", ndarray::ArrayD::zeros(ndarray::IxDyn(&[v])), true);
        let me = MaskedLm { bert, transform, act, norm, bias };
        for p in me.head() {
            p.set_trainable(true);
        }
        Ok(me)
    }

    /// The head's parameters (the tied decoder is the encoder's word embedding table, not among them).
    pub fn head(&self) -> Vec<Param> {
        let mut v = self.transform.base().params();
        v.extend([self.norm.weight.clone(), self.norm.bias.clone(), self.bias.clone()]);
        v
    }

    /// Vocabulary logits `[positions.len(), vocab]` at the flat positions `b·L + t` of `batch`.
    ///
    /// # Errors
    /// Shape errors; a position outside the batch.
    pub fn logits_at(&self, batch: &TokBatch, positions: &[usize], ctx: &Ctx) -> peft_core::Result<Tensor> {
        let h = self.bert.forward(batch, ctx)?;
        let d = h.shape().last().copied().unwrap_or(0);
        let rows = h.reshape(&[batch.shape[0] * batch.shape[1], d])?.index_select(0, positions)?;
        // Invertible adapters (MAD-X): their inverse before the head tied to the word embeddings.
        let rows = self.bert.embedding_site.inverse(rows, ctx)?;
        let t = self.transform.forward(&rows, ctx)?;
        let t = self.norm.forward(&self.act.apply(&t))?;
        t.matmul_nt(&self.bert.embeddings.word.weight.tensor())?.add(&self.bias.tensor())
    }

    /// Mean cross-entropy of the masked tokens' original ids.
    ///
    /// # Errors
    /// As [`MaskedLm::logits_at`].
    pub fn loss(&self, m: &Masked, ctx: &Ctx) -> peft_core::Result<Tensor> {
        self.logits_at(&m.batch, &m.positions, ctx)?.cross_entropy(&m.targets, None, 0.0)
    }
}

impl Module for MaskedLm {
    fn visit(&self, v: &mut dyn Visitor) {
        self.bert.visit(v);
        self.transform.visit(v);
        self.norm.visit(v);
        v.param(&self.bias);
    }
}

/// BERT's masking rule.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskRule {
    /// Fraction of eligible tokens predicted (0.15).
    pub prob: f64,
    /// `[MASK]`'s id.
    pub mask_id: usize,
    /// Ids never masked (`[CLS]`, `[SEP]`, `[PAD]`, ...).
    pub special: Vec<usize>,
    /// Vocabulary size (random replacements are drawn from it, specials excluded).
    pub vocab: usize,
}

/// A masked batch: the corrupted inputs, the flat positions to predict and their original ids.
#[derive(Clone, Debug, PartialEq)]
pub struct Masked {
    /// Inputs with the chosen tokens replaced.
    pub batch: TokBatch,
    /// Flat positions `b·L + t`, increasing.
    pub positions: Vec<usize>,
    /// The original ids there.
    pub targets: Vec<i64>,
}

/// Masks `batch` with `rule`: each real, non-special token is chosen with probability `prob` (the first eligible
/// one when none is drawn, so every batch has a target); a chosen token becomes `[MASK]` with probability 0.8, a
/// random non-special id with 0.1 and stays with 0.1. A batch without an eligible token gives no positions.
pub fn mask_batch(batch: &TokBatch, rule: &MaskRule, rng: &mut StdRng) -> Masked {
    let mut out = batch.clone();
    let eligible: Vec<usize> = (0..batch.input_ids.len())
        .filter(|&i| batch.attention_mask[i] != 0 && !rule.special.contains(&batch.input_ids[i]))
        .collect();
    let mut positions: Vec<usize> = eligible.iter().copied().filter(|_| rng.gen_bool(rule.prob)).collect();
    if positions.is_empty() {
        positions.extend(eligible.first());
    }
    let mut targets = Vec::with_capacity(positions.len());
    for &i in &positions {
        targets.push(batch.input_ids[i] as i64);
        let u: f64 = rng.gen();
        if u < 0.8 {
            out.input_ids[i] = rule.mask_id;
        } else if u < 0.9 {
            out.input_ids[i] = loop {
                let t = rng.gen_range(0..rule.vocab);
                if !rule.special.contains(&t) {
                    break t;
                }
            };
        }
    }
    Masked { batch: out, positions, targets }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn tiny(seed: u64) -> MaskedLm {
        let bert = BertModel::from_source(&crate::model::tiny_bert_config(), &RandomInit::new(seed, 0.2)).unwrap();
        MaskedLm::new(bert, seed + 1).unwrap()
    }

    fn rule() -> MaskRule {
        MaskRule { prob: 0.15, mask_id: 3, special: vec![0, 1, 2, 3], vocab: 20 }
    }

    /// Rows of `[CLS] tokens [SEP]` right-padded, ids 4..20.
    fn batch(rows: usize, len: usize) -> TokBatch {
        let l = len + 3;
        let mut ids = vec![0; rows * l];
        let mut mask = vec![0u8; rows * l];
        for r in 0..rows {
            let n = len - r % 3;
            ids[r * l] = 1;
            for t in 0..n {
                ids[r * l + 1 + t] = 4 + (r * 7 + t * 5) % 16;
            }
            ids[r * l + 1 + n] = 2;
            mask[r * l..r * l + n + 2].fill(1);
        }
        TokBatch { input_ids: ids, token_type_ids: vec![0; rows * l], attention_mask: mask, shape: [rows, l] }
    }

    #[test]
    fn masking_skips_specials_and_padding_and_follows_bert_proportions() {
        let b = batch(64, 40);
        let eligible = b.attention_mask.iter().zip(&b.input_ids).filter(|(&m, &t)| m == 1 && t >= 4).count();
        let mut rng = StdRng::seed_from_u64(7);
        let (mut chosen, mut masked, mut kept, mut random) = (0usize, 0usize, 0usize, 0usize);
        for _ in 0..20 {
            let m = mask_batch(&b, &rule(), &mut rng);
            assert!(m.positions.windows(2).all(|w| w[0] < w[1]));
            for (&p, &t) in m.positions.iter().zip(&m.targets) {
                assert_eq!(b.attention_mask[p], 1, "padding chosen");
                assert!(b.input_ids[p] >= 4, "special token chosen");
                assert_eq!(t, b.input_ids[p] as i64);
                match m.batch.input_ids[p] {
                    3 => masked += 1,
                    x if x == b.input_ids[p] => kept += 1,
                    x => {
                        assert!(x >= 4, "random replacement {x} is special");
                        random += 1;
                    }
                }
            }
            // Everything not chosen is unchanged.
            for i in 0..b.input_ids.len() {
                if !m.positions.contains(&i) {
                    assert_eq!(m.batch.input_ids[i], b.input_ids[i]);
                }
            }
            chosen += m.positions.len();
        }
        let rate = chosen as f64 / (20 * eligible) as f64;
        assert!((rate - 0.15).abs() < 0.015, "chosen rate {rate}");
        let f = |n: usize| n as f64 / chosen as f64;
        // A random draw may hit the original id (1 in 16 here), so "kept" is a little above 10%.
        assert!((f(masked) - 0.8).abs() < 0.03, "mask {}", f(masked));
        assert!((f(random) - 0.1 * 15.0 / 16.0).abs() < 0.03, "random {}", f(random));
        assert!((f(kept) - (0.1 + 0.1 / 16.0)).abs() < 0.03, "kept {}", f(kept));
    }

    #[test]
    fn a_batch_always_gets_a_target_unless_nothing_is_eligible() {
        let b = batch(1, 1);
        let r = MaskRule { prob: 0.0, ..rule() };
        let m = mask_batch(&b, &r, &mut StdRng::seed_from_u64(0));
        assert_eq!(m.positions, vec![1]);
        let only_specials =
            TokBatch { input_ids: vec![1, 2], token_type_ids: vec![0; 2], attention_mask: vec![1, 1], shape: [1, 2] };
        assert!(mask_batch(&only_specials, &rule(), &mut StdRng::seed_from_u64(0)).positions.is_empty());
    }

    #[test]
    fn logits_are_the_tied_decoder_of_the_transformed_hidden_states() {
        let m = tiny(3);
        m.bias.update(|b| b.iter_mut().enumerate().for_each(|(i, x)| *x = 0.01 * i as f32));
        let b = batch(2, 4);
        let ctx = Ctx::eval();
        let pos = [1usize, 2, 8];
        let got = m.logits_at(&b, &pos, &ctx).unwrap();
        assert_eq!(got.shape(), &[3, 20]);
        // By hand: hidden rows, dense, exact GELU, LayerNorm, dot with every embedding row, plus the bias.
        let h = m.bert.forward(&b, &ctx).unwrap();
        let hs = h.as_slice();
        let w = m.transform.base().params()[0].tensor();
        let bt = m.transform.base().params()[1].tensor();
        let e = m.bert.embeddings.word.weight.tensor();
        let (d, eps) = (8usize, m.bert.cfg.layer_norm_eps);
        for (r, &p) in pos.iter().enumerate() {
            let x = &hs[p * d..(p + 1) * d];
            let mut t: Vec<f64> = (0..d)
                .map(|o| {
                    f64::from(bt.as_slice()[o]) + (0..d).map(|i| f64::from(w.as_slice()[o * d + i] * x[i])).sum::<f64>()
                })
                .collect();
            t.iter_mut().for_each(|v| *v = 0.5 * *v * (1.0 + peft_core::Elem::erf(*v / std::f64::consts::SQRT_2)));
            let mean = t.iter().sum::<f64>() / d as f64;
            let var = t.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
            t.iter_mut().for_each(|v| *v = (*v - mean) / (var + eps).sqrt());
            for tok in 0..20 {
                let want = 0.01 * tok as f64 + (0..d).map(|i| t[i] * f64::from(e.as_slice()[tok * d + i])).sum::<f64>();
                let g = f64::from(got.as_slice()[r * 20 + tok]);
                assert!((g - want).abs() < 1e-4, "row {r} token {tok}: {g} vs {want}");
            }
        }
    }

    #[test]
    fn the_loss_trains_the_head_and_not_the_tied_embeddings() {
        let m = tiny(5);
        let b = batch(3, 6);
        let masked = mask_batch(&b, &rule(), &mut StdRng::seed_from_u64(1));
        let loss = m.loss(&masked, &Ctx::eval()).unwrap();
        assert!(loss.item().unwrap().is_finite());
        let grads = loss.backward().unwrap();
        for p in m.head() {
            let g = grads.get_id(p.id()).unwrap_or_else(|| panic!("{} has no gradient", p.name()));
            assert!(g.iter().any(|&x| x != 0.0), "{} gradient is zero", p.name());
        }
        assert!(grads.get_id(m.bert.embeddings.word.weight.id()).is_none(), "the frozen tied decoder got a gradient");
    }
}
