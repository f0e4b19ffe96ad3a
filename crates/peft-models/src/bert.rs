//! BERT-family encoders (BERT, MiniLM, RoBERTa-style position ids) with Hugging Face tensor names, sentence
//! pooling (masked mean + L2 norm, as sentence-transformers; CLS + `pooler.dense` + tanh, as BERT) and a
//! sequence-classification head.
//!
//! Parameter and adapter-site names equal the checkpoint names of a transformers `BertModel`
//! (`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query`, `pooler.dense`); checkpoints
//! saved from `BertFor*` / `RobertaFor*` models carry a `bert.` / `roberta.` prefix, which [`BertModel::from_source`]
//! detects and strips. The classification head adds `classifier.weight` / `classifier.bias`.
//!
//! Dropout: `hidden_dropout_prob` after the embeddings and after each sub-layer, and `classifier_dropout` (or
//! `hidden_dropout_prob`) before the classifier, active only when `ctx.train`. The fused attention kernel has no
//! attention-probability dropout, so `attention_probs_dropout_prob` is not applied.

use std::path::Path;

use ndarray::{ArrayD, IxDyn};

use crate::tokenizer::Batch;
use peft_core::error::{Error, Result};
use peft_core::io::{BertConfig, IoResult, SafeTensorsFile};
use peft_core::nn::{
    Activation, Ctx, Embedding, EmbeddingSite, EncoderConfig, EncoderLayer, EncoderNames, LayerNorm, Linear, Module,
    NormPlacement, PromptedSeq, RandomInit, Visitor, WeightSource,
};
use peft_core::param::Param;
use peft_core::tensor::Tensor;

/// A [`WeightSource`] that prepends a fixed prefix to every name.
struct Prefixed<'a> {
    inner: &'a dyn WeightSource,
    prefix: &'a str,
}

impl WeightSource for Prefixed<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
        self.inner.get(&format!("{}{name}", self.prefix), shape)
    }
    fn get_or(&self, name: &str, shape: &[usize], fill: f32) -> Result<ArrayD<f32>> {
        self.inner.get_or(&format!("{}{name}", self.prefix), shape, fill)
    }
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(&format!("{}{name}", self.prefix))
    }
}

/// The name prefix of the backbone tensors in `src`: `""`, `"bert."` or `"roberta."`.
pub fn detect_prefix(src: &dyn WeightSource) -> &'static str {
    ["", "bert.", "roberta."]
        .into_iter()
        .find(|p| src.contains(&format!("{p}embeddings.word_embeddings.weight")))
        .unwrap_or("")
}

/// `embeddings.*`: word + position + token-type embeddings, then LayerNorm.
#[derive(Clone)]
pub struct BertEmbeddings {
    /// `embeddings.word_embeddings`.
    pub word: Embedding,
    /// `embeddings.position_embeddings`.
    pub position: Embedding,
    /// `embeddings.token_type_embeddings`.
    pub token_type: Embedding,
    /// `embeddings.LayerNorm`.
    pub norm: LayerNorm,
}

impl Module for BertEmbeddings {
    fn visit(&self, v: &mut dyn Visitor) {
        self.word.visit(v);
        self.position.visit(v);
        self.token_type.visit(v);
        self.norm.visit(v);
    }
}

/// A BERT encoder (transformers `BertModel`).
#[derive(Clone)]
pub struct BertModel {
    /// The config it was built from.
    pub cfg: BertConfig,
    /// Embedding block.
    pub embeddings: BertEmbeddings,
    /// The embedding-output site (`<prefix>embeddings`): invertible adapters after the embedding block.
    pub embedding_site: EmbeddingSite,
    /// `encoder.layer.N`.
    pub layers: Vec<EncoderLayer>,
    /// `pooler.dense` when the checkpoint has one.
    pub pooler: Option<Linear>,
    /// The prefix found on the checkpoint's backbone names (`""`, `"bert."`, `"roberta."`).
    pub prefix: String,
    /// RoBERTa position ids (`padding_idx + 1 + rank among non-pad tokens`) instead of `0..L`.
    pub roberta_positions: bool,
}

fn check_config(cfg: &BertConfig) -> Result<()> {
    if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads) {
        crate::error::fail!(crate::ModelError::Config {
            model: "BertModel",
            field: "hidden_size",
            value: cfg.hidden_size.to_string(),
            reason: "must be a multiple of a positive num_attention_heads",
        });
    }
    if cfg.position_embedding_type != "absolute" {
        crate::error::fail!(crate::ModelError::Config {
            model: "BertModel",
            field: "position_embedding_type",
            value: cfg.position_embedding_type.clone(),
            reason: "only `absolute` is supported",
        });
    }
    Ok(())
}

impl BertModel {
    /// Builds the encoder from `src` (a checkpoint, possibly with a `bert.`/`roberta.` prefix, or [`RandomInit`]).
    /// `pooler.dense` is loaded when present. All parameters start frozen.
    ///
    /// # Errors
    /// An unsupported config, or missing / mis-shaped tensors.
    pub fn from_source(cfg: &BertConfig, src: &dyn WeightSource) -> Result<Self> {
        check_config(cfg)?;
        let prefix = detect_prefix(src);
        let src = Prefixed { inner: src, prefix };
        let h = cfg.hidden_size;
        let embeddings = BertEmbeddings {
            word: Embedding::load("embeddings.word_embeddings", cfg.vocab_size, h, &src)?,
            position: Embedding::load("embeddings.position_embeddings", cfg.max_position_embeddings, h, &src)?,
            token_type: Embedding::load("embeddings.token_type_embeddings", cfg.type_vocab_size.max(1), h, &src)?,
            norm: LayerNorm::load("embeddings.LayerNorm", h, cfg.layer_norm_eps, &src)?,
        };
        let enc = EncoderConfig {
            hidden: h,
            heads: cfg.num_attention_heads,
            intermediate: cfg.intermediate_size,
            act: Activation::from_hf(&cfg.hidden_act)?,
            eps: cfg.layer_norm_eps,
            norm: NormPlacement::Post,
            k_bias: true,
            dropout: cfg.hidden_dropout_prob,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::load(&format!("encoder.layer.{i}"), &EncoderNames::BERT, &enc, &src))
            .collect::<Result<Vec<_>>>()?;
        let pooler = if src.contains("pooler.dense.weight") {
            Some(Linear::load("pooler.dense", h, h, true, &src)?)
        } else {
            None
        };
        let roberta_positions = cfg.model_type == "roberta" || prefix == "roberta.";
        let embedding_site = EmbeddingSite::new(format!("{prefix}embeddings"));
        Ok(BertModel {
            cfg: cfg.clone(),
            embeddings,
            embedding_site,
            layers,
            pooler,
            prefix: prefix.to_string(),
            roberta_positions,
        })
    }

    /// Loads `dir/config.json` and `dir/model.safetensors` (F16/BF16 weights upcast to f32).
    ///
    /// # Errors
    /// IO, config and weight errors.
    pub fn load(dir: impl AsRef<Path>) -> IoResult<Self> {
        let dir = dir.as_ref();
        let cfg = BertConfig::load(dir.join("config.json"))?;
        let st = SafeTensorsFile::open(dir.join("model.safetensors"))?;
        Ok(Self::from_source(&cfg, &st)?)
    }

    /// Hidden size.
    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    fn position_ids(&self, batch: &Batch) -> Vec<usize> {
        let [b, l] = batch.shape;
        if !self.roberta_positions {
            return (0..b).flat_map(|_| 0..l).collect();
        }
        let pad = self.cfg.pad_token_id.unwrap_or(1).max(0) as usize;
        let mut out = Vec::with_capacity(b * l);
        for row in batch.input_ids.chunks(l.max(1)) {
            let mut count = 0;
            for &id in row {
                if id == pad {
                    out.push(pad);
                } else {
                    count += 1;
                    out.push(pad + count);
                }
            }
        }
        out
    }

    fn dropout(&self, x: Tensor, p: f64, ctx: &Ctx) -> Result<Tensor> {
        if ctx.train && p > 0.0 {
            ctx.with_rng(|rng| x.dropout(p, true, rng))
        } else {
            Ok(x)
        }
    }

    /// The embedding block's output `[B, L, H]` (after LayerNorm and dropout, then the active adapters of the
    /// embedding-output site).
    ///
    /// # Errors
    /// Inconsistent batch vectors or ids out of range.
    pub fn embed(&self, batch: &Batch, ctx: &Ctx) -> Result<Tensor> {
        self.embed_with_prompt(batch, None, ctx)
    }

    /// [`BertModel::embed`] with prompt tokens `[B, P, H]` (prompt tuning) placed in front of the word embeddings
    /// *before* the embedding block, as PEFT does (`inputs_embeds = cat(prompt, word_embeddings(ids))`): the prompt
    /// takes positions `0..P` and token type 0, the real tokens `P..P+L`, and all go through the LayerNorm.
    /// Output `[B, P + L, H]`.
    fn embed_with_prompt(&self, batch: &Batch, prompt: Option<&Tensor>, ctx: &Ctx) -> Result<Tensor> {
        let [b, l] = batch.shape;
        let n = b * l;
        if batch.input_ids.len() != n || batch.token_type_ids.len() != n || batch.attention_mask.len() != n {
            return Err(Error::Shape {
                op: "BertModel::forward",
                lhs: vec![b, l],
                rhs: vec![batch.input_ids.len(), batch.token_type_ids.len(), batch.attention_mask.len()],
            });
        }
        // As transformers' BERT with `past_key_values` (which PEFT's prefix tuning passes), the real tokens'
        // positions continue after the first layer's key/value prefix.
        let shift = match self.layers.first() {
            Some(layer) => layer.attn.prefix.key_value_len(b, ctx)?,
            None => 0,
        };
        let e = &self.embeddings;
        let x = e.word.forward(&batch.input_ids, &[b, l])?;
        let (x, p) = match prompt {
            Some(t) => (Tensor::concat(&[t, &x], 1)?, t.shape().get(1).copied().unwrap_or(0)),
            None => (x, 0),
        };
        let pad = self.cfg.pad_token_id.unwrap_or(1).max(0) as usize;
        let pos = if self.roberta_positions && p > 0 {
            // transformers' RoBERTa numbers `inputs_embeds` positions sequentially from padding_idx + 1.
            e.position.forward(&(0..p + l).map(|i| pad + 1 + shift + i).collect::<Vec<_>>(), &[1, p + l])?
        } else if self.roberta_positions {
            let ids: Vec<usize> =
                self.position_ids(batch).into_iter().map(|q| if q == pad { q } else { q + shift }).collect();
            e.position.forward(&ids, &[b, l])?
        } else {
            e.position.forward(&(shift..shift + p + l).collect::<Vec<_>>(), &[1, p + l])?
        };
        let types: Vec<usize> = batch
            .token_type_ids
            .chunks(l.max(1))
            .flat_map(|row| std::iter::repeat_n(0, p).chain(row.iter().copied()))
            .collect();
        let x = x.add(&pos)?.add(&e.token_type.forward(&types, &[b, p + l])?)?;
        let x = self.dropout(e.norm.forward(&x)?, self.cfg.hidden_dropout_prob, ctx)?;
        self.embedding_site.forward(x, ctx)
    }

    /// `last_hidden_state [B, L, H]` for a right- or left-padded batch; padding keys are masked out of attention.
    ///
    /// # Errors
    /// Inconsistent batch vectors, ids out of range, or a sequence longer than `max_position_embeddings`.
    pub fn forward(&self, batch: &Batch, ctx: &Ctx) -> Result<Tensor> {
        self.run(batch, ctx, None)
    }

    /// transformers' `hidden_states` (`output_hidden_states=True`): the embedding output, then the output of each
    /// layer, `num_hidden_layers + 1` tensors `[B, L, H]`; the last equals [`BertModel::forward`]. Prompt positions
    /// (prompt tuning, deep prompts) are cut from every state, so each lines up with the batch's tokens and its
    /// `attention_mask`.
    ///
    /// # Errors
    /// As [`BertModel::forward`].
    pub fn forward_hidden_states(&self, batch: &Batch, ctx: &Ctx) -> Result<Vec<Tensor>> {
        let mut states = Vec::with_capacity(self.layers.len() + 1);
        let last = self.run(batch, ctx, Some(&mut states))?;
        states.push(last);
        Ok(states)
    }

    /// The forward pass; with `states`, the embedding output and every layer's output but the last are pushed there
    /// without their prompt positions.
    fn run(&self, batch: &Batch, ctx: &Ctx, mut states: Option<&mut Vec<Tensor>>) -> Result<Tensor> {
        // Prompt tokens of the first layer's prefix site (prompt tuning) go through the embedding block as PEFT
        // feeds them; prompts of later layers (deep prompts) enter the hidden sequence there.
        let prompt = match self.layers.first() {
            Some(layer) => layer.attn.prefix.tokens(batch.shape[0], ctx)?,
            None => None,
        };
        let x = self.embed_with_prompt(batch, prompt.as_ref(), ctx)?;
        let p = prompt.as_ref().and_then(|t| t.shape().get(1).copied()).unwrap_or(0);
        let [b, l] = batch.shape;
        let mask = if batch.attention_mask.iter().all(|&m| m != 0) {
            None
        } else {
            let m = &batch.attention_mask;
            Some(ArrayD::from_shape_fn(IxDyn(&[b, p + l]), |ix| ix[1] < p || m[ix[0] * l + ix[1] - p] != 0))
        };
        let mut seq = PromptedSeq::with_prompt(x, mask, p)?;
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(st) = states.as_deref_mut() {
                st.push(without_prompt(&seq)?);
            }
            if i > 0 {
                seq.enter(&layer.attn.prefix, ctx)?;
            }
            let h = layer.forward(seq.hidden(), seq.mask(), ctx)?;
            seq.set_hidden(h)?;
        }
        seq.finish()
    }

    /// BERT's pooled output `tanh(pooler.dense(h[:, 0]))`, `[B, H]`.
    ///
    /// # Errors
    /// [`Error::UnknownName`] (`pooler.dense`) when the checkpoint has no pooler; shape errors.
    pub fn pool_cls(&self, hidden: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let Some(p) = &self.pooler else {
            return Err(Error::UnknownName { name: "pooler.dense".into() });
        };
        Ok(p.forward(&cls_token(hidden)?, ctx)?.tanh())
    }

    /// sentence-transformers embeddings: masked mean pooling then L2 normalisation, `[B, H]`.
    ///
    /// # Errors
    /// As [`BertModel::forward`].
    pub fn sentence_embedding(&self, batch: &Batch, ctx: &Ctx) -> Result<Tensor> {
        l2_normalize(&mean_pool(&self.forward(batch, ctx)?, &batch.attention_mask)?)
    }
}

impl Module for BertModel {
    fn visit(&self, v: &mut dyn Visitor) {
        self.embeddings.visit(v);
        self.embedding_site.visit(v);
        for l in &self.layers {
            l.visit(v);
        }
        if let Some(p) = &self.pooler {
            p.visit(v);
        }
    }
}

/// The hidden states of `seq` without its prompt positions.
pub(crate) fn without_prompt(seq: &PromptedSeq) -> Result<Tensor> {
    let (h, p) = (seq.hidden(), seq.n_prompt());
    if p == 0 {
        return Ok(h.clone());
    }
    let l = h.shape()[1];
    h.narrow(1, p, l - p)
}

/// The first token's hidden state `h[:, 0]`, `[B, H]`.
///
/// # Errors
/// A `hidden` that is not `[B, L, H]` with `L >= 1`.
pub fn cls_token(hidden: &Tensor) -> Result<Tensor> {
    let s = hidden.shape().to_vec();
    if s.len() != 3 {
        return Err(Error::Shape { op: "cls_token", lhs: s, rhs: vec![0, 0, 0] });
    }
    hidden.narrow(1, 0, 1)?.reshape(&[s[0], s[2]])
}

/// Masked mean over the sequence axis: `sum_t h_t m_t / max(sum_t m_t, 1e-9)`, `[B, L, H] -> [B, H]`.
///
/// # Errors
/// A mask that is not `B·L` long or a `hidden` that is not rank 3.
pub fn mean_pool(hidden: &Tensor, mask: &[u8]) -> Result<Tensor> {
    let s = hidden.shape().to_vec();
    if s.len() != 3 || mask.len() != s[0] * s[1] {
        return Err(Error::Shape { op: "mean_pool", lhs: s, rhs: vec![mask.len()] });
    }
    let (b, l) = (s[0], s[1]);
    let m = Tensor::from_vec(mask.iter().map(|&x| f32::from(u8::from(x != 0))).collect(), &[b, l, 1])?;
    let counts: Vec<f32> =
        mask.chunks(l.max(1)).map(|r| (r.iter().filter(|&&x| x != 0).count() as f32).max(1e-9)).collect();
    let counts = Tensor::from_vec(counts, &[b, 1])?;
    hidden.mul(&m)?.sum(&[1], false)?.div(&counts)
}

/// Row-wise L2 normalisation of `[B, H]` (`x / ‖x‖`, with `1e-24` added under the square root).
///
/// # Errors
/// A rank other than 2.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    if x.shape().len() != 2 {
        return Err(Error::Shape { op: "l2_normalize", lhs: x.shape().to_vec(), rhs: vec![0, 0] });
    }
    x.div(&x.square().sum(&[1], true)?.add_scalar(1e-24).sqrt())
}

/// How a sequence is reduced to one vector for classification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pooling {
    /// `tanh(pooler.dense(h[:, 0]))` (transformers `BertForSequenceClassification`).
    Cls,
    /// Masked mean over real tokens (sentence-transformers), no normalisation.
    Mean,
}

/// transformers `BertForSequenceClassification`: backbone, pooling, dropout and a `classifier` Linear.
/// `num_labels == 1` is regression (MSE loss), otherwise single-label classification (cross-entropy).
#[derive(Clone)]
pub struct BertForSequenceClassification {
    /// The encoder.
    pub bert: BertModel,
    /// Pooling choice.
    pub pooling: Pooling,
    /// `classifier` (`[num_labels, H]`), trainable.
    pub classifier: Linear,
    /// Number of outputs.
    pub num_labels: usize,
    /// Dropout before the classifier (training only).
    pub dropout: f64,
}

fn fresh_linear(path: &str, in_f: usize, out_f: usize, std: f32, seed: u64) -> Result<Linear> {
    let w = RandomInit::new(seed, std).get(&format!("{path}.weight"), &[out_f, in_f])?;
    Ok(Linear::new(
        path,
        Param::new(format!("{path}.weight"), w, true),
        Some(Param::new(format!("{path}.bias"), ArrayD::zeros(IxDyn(&[out_f])), true)),
    ))
}

impl BertForSequenceClassification {
    /// A fresh head on `bert`: `classifier` drawn from N(0, `initializer_range`) with `seed` (bias 0), trainable.
    /// With [`Pooling::Cls`] and a backbone without pooler, a fresh trainable `pooler.dense` is made too.
    ///
    /// # Errors
    /// `num_labels == 0`.
    pub fn new(mut bert: BertModel, num_labels: usize, pooling: Pooling, seed: u64) -> Result<Self> {
        if num_labels == 0 {
            crate::error::fail!(crate::ModelError::Config {
                model: "BertForSequenceClassification",
                field: "num_labels",
                value: "0".into(),
                reason: "must be positive",
            });
        }
        let (h, std) = (bert.cfg.hidden_size, bert.cfg.initializer_range as f32);
        if pooling == Pooling::Cls && bert.pooler.is_none() {
            bert.pooler = Some(fresh_linear("pooler.dense", h, h, std, seed.wrapping_add(1))?);
        }
        let classifier = fresh_linear("classifier", h, num_labels, std, seed)?.as_output();
        let dropout = bert.cfg.classifier_dropout.unwrap_or(bert.cfg.hidden_dropout_prob);
        Ok(BertForSequenceClassification { bert, pooling, classifier, num_labels, dropout })
    }

    /// Backbone from `src`; the head from `src` (`classifier.*`, trainable) when present, else fresh with `seed`.
    ///
    /// # Errors
    /// As [`BertModel::from_source`] and [`BertForSequenceClassification::new`].
    pub fn from_source(
        cfg: &BertConfig,
        src: &dyn WeightSource,
        num_labels: usize,
        pooling: Pooling,
        seed: u64,
    ) -> Result<Self> {
        let mut m = Self::new(BertModel::from_source(cfg, src)?, num_labels, pooling, seed)?;
        if src.contains("classifier.weight") {
            let h = cfg.hidden_size;
            let w = src.get("classifier.weight", &[num_labels, h])?;
            let b = src.get_or("classifier.bias", &[num_labels], 0.0)?;
            m.classifier = Linear::new(
                "classifier",
                Param::new("classifier.weight", w, true),
                Some(Param::new("classifier.bias", b, true)),
            )
            .as_output();
        }
        Ok(m)
    }

    /// Loads `dir/config.json` + `dir/model.safetensors` and adds the head (see [`Self::from_source`]).
    ///
    /// # Errors
    /// IO, config and weight errors.
    pub fn load(dir: impl AsRef<Path>, num_labels: usize, pooling: Pooling, seed: u64) -> IoResult<Self> {
        let dir = dir.as_ref();
        let cfg = BertConfig::load(dir.join("config.json"))?;
        let st = SafeTensorsFile::open(dir.join("model.safetensors"))?;
        Ok(Self::from_source(&cfg, &st, num_labels, pooling, seed)?)
    }

    /// The pooled representation `[B, H]` of a hidden state.
    ///
    /// # Errors
    /// Shape errors.
    pub fn pool(&self, hidden: &Tensor, batch: &Batch, ctx: &Ctx) -> Result<Tensor> {
        match self.pooling {
            Pooling::Cls => self.bert.pool_cls(hidden, ctx),
            Pooling::Mean => mean_pool(hidden, &batch.attention_mask),
        }
    }

    /// Logits `[B, num_labels]`.
    ///
    /// # Errors
    /// As [`BertModel::forward`].
    pub fn forward(&self, batch: &Batch, ctx: &Ctx) -> Result<Tensor> {
        let h = self.bert.forward(batch, ctx)?;
        let p = self.pool(&h, batch, ctx)?;
        let p = self.bert.dropout(p, self.dropout, ctx)?;
        self.classifier.forward(&p, ctx)
    }

    /// Logits `[B, num_labels]` and the backbone's `hidden_states` ([`BertModel::forward_hidden_states`]) from one
    /// forward pass, for distillation of intermediate layers (SquareHead).
    ///
    /// # Errors
    /// As [`BertModel::forward`].
    pub fn forward_with_hidden_states(&self, batch: &Batch, ctx: &Ctx) -> Result<(Tensor, Vec<Tensor>)> {
        let states = self.bert.forward_hidden_states(batch, ctx)?;
        let Some(h) = states.last() else {
            return Err(Error::Shape { op: "BertForSequenceClassification::hidden_states", lhs: vec![], rhs: vec![] });
        };
        let p = self.pool(h, batch, ctx)?;
        let p = self.bert.dropout(p, self.dropout, ctx)?;
        Ok((self.classifier.forward(&p, ctx)?, states))
    }

    /// Mean loss over the batch: cross-entropy against class ids (`labels[i]` an integer in `0..num_labels`),
    /// or MSE against `labels` when `num_labels == 1`.
    ///
    /// # Errors
    /// A label count other than the batch size, a class id out of range, forward errors.
    pub fn loss(&self, batch: &Batch, labels: &[f32], ctx: &Ctx) -> Result<Tensor> {
        let logits = self.forward(batch, ctx)?;
        self.loss_from_logits(&logits, labels)
    }

    /// The loss of [`Self::loss`] for precomputed logits.
    ///
    /// # Errors
    /// As [`Self::loss`].
    pub fn loss_from_logits(&self, logits: &Tensor, labels: &[f32]) -> Result<Tensor> {
        let b = logits.shape()[0];
        if labels.len() != b {
            return Err(Error::Shape {
                op: "BertForSequenceClassification::loss",
                lhs: vec![b],
                rhs: vec![labels.len()],
            });
        }
        if self.num_labels == 1 {
            logits.mse_loss(&Tensor::from_vec(labels.to_vec(), &[b, 1])?)
        } else {
            let t: Vec<i64> = labels.iter().map(|&y| y as i64).collect();
            if let Some(y) = labels.iter().find(|&&y| y.fract() != 0.0) {
                return Err(Error::arg("BertForSequenceClassification::loss", "class label", y, "must be an integer"));
            }
            logits.cross_entropy(&t, None, 0.0)
        }
    }
}

impl Module for BertForSequenceClassification {
    fn visit(&self, v: &mut dyn Visitor) {
        self.bert.visit(v);
        self.classifier.visit(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peft_core::nn::{linear_sites, named_params, MapWeights};

    fn tiny_cfg() -> BertConfig {
        BertConfig {
            vocab_size: 20,
            hidden_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 16,
            max_position_embeddings: 16,
            ..BertConfig::default()
        }
    }

    fn tiny() -> BertModel {
        BertModel::from_source(&tiny_cfg(), &RandomInit::new(0, 0.1)).unwrap()
    }

    fn batch() -> Batch {
        Batch {
            input_ids: vec![1, 5, 6, 2, 1, 7, 2, 0],
            token_type_ids: vec![0; 8],
            attention_mask: vec![1, 1, 1, 1, 1, 1, 1, 0],
            shape: [2, 4],
        }
    }

    #[test]
    fn hidden_states_are_the_embedding_output_then_each_layer_output() {
        let m = tiny();
        let b = batch();
        let ctx = Ctx::eval();
        let states = m.forward_hidden_states(&b, &ctx).unwrap();
        assert_eq!(states.len(), 3);
        let e = m.embed(&b, &ctx).unwrap();
        assert_eq!(states[0].as_slice(), e.as_slice());
        let mask = ArrayD::from_shape_fn(IxDyn(&[2, 4]), |ix| b.attention_mask[ix[0] * 4 + ix[1]] != 0);
        let h1 = m.layers[0].forward(&e, Some(&mask), &ctx).unwrap();
        assert_eq!(states[1].as_slice(), h1.as_slice());
        let h2 = m.layers[1].forward(&h1, Some(&mask), &ctx).unwrap();
        assert_eq!(states[2].as_slice(), h2.as_slice());
        assert_eq!(states[2].as_slice(), m.forward(&b, &ctx).unwrap().as_slice());
        assert!(states.iter().all(|s| s.shape() == [2, 4, 8]));
    }

    #[test]
    fn classifier_logits_with_hidden_states_equal_forward_and_carry_gradients() {
        let c = BertForSequenceClassification::new(tiny(), 3, Pooling::Mean, 1).unwrap();
        let (b, ctx) = (batch(), Ctx::eval());
        let (logits, states) = c.forward_with_hidden_states(&b, &ctx).unwrap();
        assert_eq!(logits.as_slice(), c.forward(&b, &ctx).unwrap().as_slice());
        assert_eq!(states.len(), 3);
        let w = named_params(&c.bert).into_iter().find(|p| p.name().ends_with("layer.0.attention.self.query.weight"));
        let w = w.expect("query weight");
        w.set_trainable(true);
        let (_, states) = c.forward_with_hidden_states(&b, &ctx).unwrap();
        let g = states[1].sum_all().backward().unwrap();
        assert!(
            g.get_id(w.id()).is_some_and(|g| g.iter().any(|v| *v != 0.0)),
            "layer 1's state depends on layer 0's query"
        );
    }

    #[test]
    fn names_are_checkpoint_names_and_sites_are_reachable() {
        let m = tiny();
        let names: Vec<String> = named_params(&m).iter().map(|p| p.name().to_string()).collect();
        assert_eq!(names[0], "embeddings.word_embeddings.weight");
        assert!(names.contains(&"encoder.layer.1.output.LayerNorm.bias".to_string()));
        assert!(names.contains(&"pooler.dense.weight".to_string()));
        let sites: Vec<String> = linear_sites(&m).iter().map(|l| l.path().to_string()).collect();
        assert!(sites.contains(&"encoder.layer.0.attention.self.query".to_string()));
        assert_eq!(sites.len(), 2 * 6 + 1);
    }

    #[test]
    fn prefixed_checkpoint_loads_under_plain_names() {
        let m = tiny();
        let mut map = MapWeights::default();
        for p in named_params(&m) {
            map.0.insert(format!("bert.{}", p.name()), p.value().to_owned().into_dimensionality().unwrap());
        }
        let m2 = BertModel::from_source(&tiny_cfg(), &map).unwrap();
        assert_eq!(m2.prefix, "bert.");
        let (a, b) = (m.forward(&batch(), &Ctx::eval()).unwrap(), m2.forward(&batch(), &Ctx::eval()).unwrap());
        assert_eq!(a.to_vec(), b.to_vec());
    }

    #[test]
    fn padding_does_not_change_real_tokens() {
        let m = tiny();
        let full = m.forward(&batch(), &Ctx::eval()).unwrap();
        let single = Batch::from_rows(&[vec![1, 7, 2]]).unwrap();
        let one = m.forward(&single, &Ctx::eval()).unwrap();
        let fv = full.to_vec();
        for (i, x) in one.to_vec().iter().enumerate() {
            assert!((x - fv[4 * 8 + i]).abs() < 1e-5);
        }
    }

    #[test]
    fn roberta_positions_skip_padding() {
        let mut m = tiny();
        m.roberta_positions = true;
        m.cfg.pad_token_id = Some(1);
        let b = Batch {
            input_ids: vec![0, 5, 2, 1],
            token_type_ids: vec![0; 4],
            attention_mask: vec![1, 1, 1, 0],
            shape: [1, 4],
        };
        assert_eq!(m.position_ids(&b), vec![2, 3, 4, 1]);
    }

    #[test]
    fn fresh_head_is_seeded_trainable_and_named() {
        let a = BertForSequenceClassification::new(tiny(), 3, Pooling::Cls, 7).unwrap();
        let b = BertForSequenceClassification::new(tiny(), 3, Pooling::Cls, 7).unwrap();
        let pa = named_params(&a);
        let cls: Vec<_> = pa.iter().filter(|p| p.trainable()).map(|p| p.name().to_string()).collect();
        assert_eq!(cls, vec!["classifier.weight", "classifier.bias"]);
        assert_eq!(a.classifier.base().dense_weight().unwrap(), b.classifier.base().dense_weight().unwrap());
        let logits = a.forward(&batch(), &Ctx::eval()).unwrap();
        assert_eq!(logits.shape(), &[2, 3]);
        let loss = a.loss(&batch(), &[0.0, 2.0], &Ctx::train(1)).unwrap();
        assert!(loss.item().unwrap().is_finite());
        assert!(a.loss(&batch(), &[0.5, 2.0], &Ctx::eval()).is_err());
        assert!(a.loss(&batch(), &[0.0], &Ctx::eval()).is_err());
    }

    #[test]
    fn regression_head_uses_mse_and_mean_pooling_ignores_padding() {
        let m = BertForSequenceClassification::new(tiny(), 1, Pooling::Mean, 3).unwrap();
        let loss = m.loss(&batch(), &[0.5, -0.5], &Ctx::eval()).unwrap();
        let logits = m.forward(&batch(), &Ctx::eval()).unwrap().to_vec();
        let want = ((logits[0] - 0.5).powi(2) + (logits[1] + 0.5).powi(2)) / 2.0;
        assert!((loss.item().unwrap() - want).abs() < 1e-6);
        let h = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0, 100.0, 100.0], &[1, 3, 2]).unwrap();
        assert_eq!(mean_pool(&h, &[1, 1, 0]).unwrap().to_vec(), vec![2.0, 3.0]);
        let n = l2_normalize(&Tensor::from_vec(vec![3.0, 4.0], &[1, 2]).unwrap()).unwrap();
        assert_eq!(n.to_vec(), vec![0.6, 0.8]);
    }

    #[test]
    fn bad_batch_is_a_shape_error() {
        let mut b = batch();
        b.token_type_ids.pop();
        assert!(matches!(tiny().forward(&b, &Ctx::eval()), Err(Error::Shape { .. })));
    }
}
