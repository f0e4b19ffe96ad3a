//! LLaMA-architecture causal language models (LLaMA 1-3, SmolLM2, TinyLlama, ...): `model.embed_tokens`, N
//! [`DecoderLayer`]s (RMSNorm, rotate-half RoPE, SwiGLU, grouped-query attention), `model.norm` and a tied or
//! separate `lm_head`.
//!
//! Loads Hugging Face checkpoints (`config.json` + `model.safetensors`) and llama.cpp GGUF files. GGUF tensors are
//! dequantised to f32, renamed to the Hugging Face names ([`hf_name_to_gguf`]) and the q/k rows that llama.cpp's
//! converter permuted for its interleaved RoPE are put back ([`unpermute_qk`]), so one forward pass (rotate-half
//! RoPE with the file's base) serves both. Every linear layer is an adapter site at its Hugging Face path
//! (`model.layers.3.self_attn.q_proj`, ...); the LM head is marked as the output layer.
//!
//! Generation runs with a per-layer [`KvCache`], greedily or by seeded sampling (temperature, top-k, top-p), and
//! stops at an end-of-sequence id. [`tokenizer`] builds the matching byte-level BPE tokenizer.

#[cfg(feature = "text")]
pub mod tokenizer;

use std::path::{Path, PathBuf};

use ndarray::{ArrayD, Ix2};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use peft_core::error::{Error, Result};
use peft_core::io::unused::check_unused;
#[cfg(feature = "gguf")]
use peft_core::io::GgufFile;
use peft_core::io::{IoError, IoResult, LlamaConfig, SafeTensorsFile};
use peft_core::nn::{
    Ctx, DecoderConfig, DecoderLayer, Embedding, KvCache, Linear, Module, PromptedSeq, RandomInit, RmsNorm, Rope, Site,
    Visitor, WeightSource,
};
use peft_core::ops::attention::RopeLayout;
use peft_core::tensor::Tensor;

#[cfg(feature = "text")]
pub use tokenizer::tokenizer_from_file;
#[cfg(all(feature = "text", feature = "gguf"))]
pub use tokenizer::tokenizer_from_gguf;

/// The sizes and options of a LLaMA model, from a `config.json` ([`LlamaSpec::from_hf`]) or GGUF metadata
/// ([`LlamaSpec::from_gguf`]).
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaSpec {
    /// Vocabulary size.
    pub vocab: usize,
    /// Hidden size.
    pub hidden: usize,
    /// SwiGLU inner size.
    pub intermediate: usize,
    /// Number of decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Per-head dimension.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Context length the model was trained for.
    pub max_positions: usize,
    /// Whether `lm_head` shares `model.embed_tokens.weight`.
    pub tie_embeddings: bool,
    /// Beginning-of-sequence id, if known.
    pub bos: Option<usize>,
    /// End-of-sequence ids (generation stops at any of them).
    pub eos: Vec<usize>,
}

impl LlamaSpec {
    /// From a transformers `LlamaConfig`.
    ///
    /// # Errors
    /// [`crate::ModelError::Config`] for `rope_scaling`, biases or a `hidden_act` other than SiLU (not implemented).
    pub fn from_hf(c: &LlamaConfig) -> Result<Self> {
        let unsupported = |field: &'static str, value: String| {
            Err(crate::ModelError::Config { model: "Llama", field, value, reason: "not implemented" }.into())
        };
        if let Some(r) = &c.rope_scaling {
            return unsupported("rope_scaling", format!("{r:?}"));
        }
        if c.attention_bias {
            return unsupported("attention_bias", "true".into());
        }
        if c.mlp_bias {
            return unsupported("mlp_bias", "true".into());
        }
        if !matches!(c.hidden_act.as_str(), "silu" | "swish") {
            return unsupported("hidden_act", c.hidden_act.clone());
        }
        let ids = |t: &Option<peft_core::io::hf_config::TokenIds>| -> Vec<usize> {
            t.as_ref()
                .map(|t| t.as_slice().iter().filter_map(|&i| usize::try_from(i).ok()).collect())
                .unwrap_or_default()
        };
        Ok(LlamaSpec {
            vocab: c.vocab_size,
            hidden: c.hidden_size,
            intermediate: c.intermediate_size,
            layers: c.num_hidden_layers,
            heads: c.num_attention_heads,
            kv_heads: c.num_kv_heads(),
            head_dim: c.head_dim(),
            eps: c.rms_norm_eps,
            rope_theta: c.rope_theta(),
            max_positions: c.max_position_embeddings,
            tie_embeddings: c.tie_word_embeddings,
            bos: ids(&c.bos_token_id).first().copied(),
            eos: ids(&c.eos_token_id),
        })
    }

    /// From the `llama.*` and `tokenizer.ggml.*` metadata of a GGUF file.
    ///
    /// # Errors
    /// [`IoError::UnknownArchitecture`] naming the architecture when `general.architecture` is not `llama`;
    /// [`IoError::MissingKey`] / [`IoError::MetadataType`] for absent or mistyped keys; [`IoError::InvalidConfig`]
    /// for inconsistent head counts.
    #[cfg(feature = "gguf")]
    pub fn from_gguf(f: &GgufFile) -> IoResult<Self> {
        match f.architecture() {
            Some("llama") => {}
            other => {
                return Err(IoError::UnknownArchitecture {
                    path: f.path().to_path_buf(),
                    model_type: Some(other.unwrap_or("<missing general.architecture>").to_string()),
                    architectures: Vec::new(),
                })
            }
        }
        let u = |k: &str| f.meta_u64(&format!("llama.{k}")).map(|v| v as usize);
        let hidden = u("embedding_length")?;
        let heads = u("attention.head_count")?;
        let kv_heads =
            if f.meta("llama.attention.head_count_kv").is_some() { u("attention.head_count_kv")? } else { heads };
        let invalid = |field, reason: String| IoError::InvalidConfig { path: f.path().to_path_buf(), field, reason };
        if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || !hidden.is_multiple_of(heads) {
            return Err(invalid(
                "llama.attention.head_count",
                format!("{heads} heads, {kv_heads} kv heads, width {hidden}"),
            ));
        }
        let head_dim =
            if f.meta("llama.attention.key_length").is_some() { u("attention.key_length")? } else { hidden / heads };
        if !head_dim.is_multiple_of(2) {
            return Err(invalid("llama.attention.key_length", format!("head dim {head_dim} is odd")));
        }
        let vocab = match f.tensor_info("token_embd.weight")?.shape().as_slice() {
            &[vocab, h] if h == hidden && vocab > 0 => vocab,
            other => {
                return Err(invalid(
                    "token_embd.weight",
                    format!("must be a [vocab > 0, llama.embedding_length = {hidden}] matrix, found shape {other:?}"),
                ))
            }
        };
        let layers = u("block_count")?;
        if layers == 0 {
            return Err(invalid("llama.block_count", "0 blocks: the file describes no decoder layer".into()));
        }
        let id = |k: &str| f.meta(k).and_then(|v| v.as_u64()).map(|v| v as usize);
        Ok(LlamaSpec {
            vocab,
            hidden,
            intermediate: u("feed_forward_length")?,
            layers,
            heads,
            kv_heads,
            head_dim,
            eps: f.meta_f64("llama.attention.layer_norm_rms_epsilon")?,
            rope_theta: if f.meta("llama.rope.freq_base").is_some() {
                f.meta_f64("llama.rope.freq_base")?
            } else {
                1e4
            },
            max_positions: if f.meta("llama.context_length").is_some() { u("context_length")? } else { 2048 },
            tie_embeddings: f.tensor_info("output.weight").is_err(),
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        })
    }

    fn decoder(&self) -> DecoderConfig {
        DecoderConfig {
            hidden: self.hidden,
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            intermediate: self.intermediate,
            eps: self.eps,
            rope: Rope { theta: self.rope_theta, layout: RopeLayout::RotateHalf },
        }
    }
}

/// The llama.cpp name of the Hugging Face tensor `name`, with the head count to un-permute by for q/k
/// projections (`model.layers.0.self_attn.k_proj.weight` -> `blk.0.attn_k.weight`, kv heads).
#[cfg(feature = "gguf")]
pub fn hf_name_to_gguf(name: &str, spec: &LlamaSpec) -> Option<(String, Option<usize>)> {
    match name {
        "model.embed_tokens.weight" => return Some(("token_embd.weight".into(), None)),
        "model.norm.weight" => return Some(("output_norm.weight".into(), None)),
        "lm_head.weight" => return Some(("output.weight".into(), None)),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (n, rest) = rest.split_once('.')?;
    let n: usize = n.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let (g, heads) = match module {
        "input_layernorm" => ("attn_norm", None),
        "post_attention_layernorm" => ("ffn_norm", None),
        "self_attn.q_proj" => ("attn_q", Some(spec.heads)),
        "self_attn.k_proj" => ("attn_k", Some(spec.kv_heads)),
        "self_attn.v_proj" => ("attn_v", None),
        "self_attn.o_proj" => ("attn_output", None),
        "mlp.gate_proj" => ("ffn_gate", None),
        "mlp.up_proj" => ("ffn_up", None),
        "mlp.down_proj" => ("ffn_down", None),
        _ => return None,
    };
    Some((format!("blk.{n}.{g}.{kind}"), heads.filter(|_| kind == "weight")))
}

/// Undoes llama.cpp's q/k row permutation of a `[rows, in]` weight:
/// `w.reshape(heads, rows/heads/2, 2, in).swapaxes(1, 2).reshape(rows, in)`.
///
/// # Errors
/// [`Error::Shape`] when `w` is not a matrix whose rows split into `heads` heads of even size.
#[cfg(feature = "gguf")]
pub fn unpermute_qk(w: ArrayD<f32>, heads: usize) -> Result<ArrayD<f32>> {
    let shape = w.shape().to_vec();
    let bad = || Error::Shape { op: "unpermute_qk", lhs: shape.clone(), rhs: vec![heads] };
    let w = w.into_dimensionality::<Ix2>().map_err(|_| bad())?;
    let (rows, cols) = w.dim();
    if heads == 0 || !rows.is_multiple_of(2 * heads) {
        return Err(bad());
    }
    let w = w.as_standard_layout().to_owned();
    let w4 = w.into_shape_with_order((heads, rows / heads / 2, 2, cols)).map_err(|_| bad())?;
    let swapped = w4.permuted_axes([0, 2, 1, 3]).as_standard_layout().to_owned();
    Ok(swapped.into_shape_with_order((rows, cols)).map_err(|_| bad())?.into_dyn())
}

/// A [`WeightSource`] over a GGUF LLaMA file answering Hugging Face names: dequantises on demand and undoes the
/// q/k permutation.
#[cfg(feature = "gguf")]
pub struct GgufLlamaWeights<'a> {
    file: &'a GgufFile,
    spec: LlamaSpec,
}

#[cfg(feature = "gguf")]
impl<'a> GgufLlamaWeights<'a> {
    /// Wraps `file`, whose metadata gave `spec`.
    pub fn new(file: &'a GgufFile, spec: LlamaSpec) -> Self {
        GgufLlamaWeights { file, spec }
    }
}

#[cfg(feature = "gguf")]
impl WeightSource for GgufLlamaWeights<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<ArrayD<f32>> {
        let unknown = || Error::UnknownName { name: format!("{name} (in {})", self.file.path().display()) };
        let (g, heads) = hf_name_to_gguf(name, &self.spec).ok_or_else(unknown)?;
        let w = match self.file.get(&g) {
            Ok(w) => w,
            Err(IoError::MissingTensor { .. }) => return Err(unknown()),
            Err(e) => return Err(Error::file(self.file.path(), e)),
        };
        if w.shape() != shape {
            return Err(Error::WeightShape {
                origin: self.file.path().display().to_string(),
                name: format!("{g}` (`{name}`"),
                expected: shape.to_vec(),
                found: w.shape().to_vec(),
            });
        }
        match heads {
            Some(h) => unpermute_qk(w, h),
            None => Ok(w),
        }
    }
    fn contains(&self, name: &str) -> bool {
        hf_name_to_gguf(name, &self.spec).is_some_and(|(g, _)| self.file.tensor_info(&g).is_ok())
    }
}

/// How [`Llama::generate`] picks each next token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// The arg-max token (lowest id on ties).
    Greedy,
    /// Sampling from `softmax(logits / temperature)` restricted to the `top_k` most likely tokens (0: all) and then
    /// to the smallest set whose probability reaches `top_p`, with a seeded RNG.
    Sample {
        /// Softmax temperature (> 0).
        temperature: f64,
        /// Keep only the k most likely tokens (0 keeps all).
        top_k: usize,
        /// Nucleus threshold in (0, 1].
        top_p: f64,
        /// RNG seed.
        seed: u64,
    },
}

/// Options of [`Llama::generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// Stop ids (the stop id is included in the output); defaults to the model's EOS ids.
    pub eos: Option<Vec<usize>>,
}

impl GenerateOptions {
    /// Greedy decoding of up to `max_new_tokens` tokens, stopping at the model's EOS.
    pub fn greedy(max_new_tokens: usize) -> Self {
        GenerateOptions { max_new_tokens, sampling: Sampling::Greedy, eos: None }
    }
}

/// A LLaMA causal language model.
#[derive(Clone)]
pub struct Llama {
    /// Sizes and options.
    pub spec: LlamaSpec,
    /// `model.embed_tokens`.
    pub embed: Embedding,
    /// `model.layers.N`.
    pub layers: Vec<DecoderLayer>,
    /// `model.norm`.
    pub norm: RmsNorm,
    /// `lm_head` (sharing the embedding's parameter when tied), marked as the output layer.
    pub lm_head: Linear,
}

impl Llama {
    /// Builds the model from `src`, which answers Hugging Face names; all parameters start frozen.
    ///
    /// # Errors
    /// Missing or mis-shaped tensors.
    pub fn load(spec: &LlamaSpec, src: &dyn WeightSource) -> Result<Self> {
        let embed = Embedding::load("model.embed_tokens", spec.vocab, spec.hidden, src)?;
        let dc = spec.decoder();
        let layers = (0..spec.layers)
            .map(|i| DecoderLayer::load(&format!("model.layers.{i}"), &dc, src))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load("model.norm", spec.hidden, spec.eps, src)?;
        let lm_head = if spec.tie_embeddings {
            Linear::new("lm_head", embed.weight.clone(), None)
        } else {
            Linear::load("lm_head", spec.hidden, spec.vocab, false, src)?
        }
        .as_output();
        Ok(Llama { spec: spec.clone(), embed, layers, norm, lm_head })
    }

    /// A randomly initialised model (normal(0, `std`) matrices, unit norms), for tests and smoke runs.
    ///
    /// # Errors
    /// Invalid sizes.
    pub fn random(spec: &LlamaSpec, seed: u64, std: f32) -> Result<Self> {
        Self::load(spec, &RandomInit::new(seed, std))
    }

    /// Loads a llama.cpp GGUF file (any quantisation the GGUF reader dequantises).
    ///
    /// # Errors
    /// [`IoError::UnknownArchitecture`] naming the file's architecture when it is not `llama`, the metadata errors
    /// of [`LlamaSpec::from_gguf`], and [`IoError::Core`] for missing or mis-shaped tensors.
    #[cfg(feature = "gguf")]
    pub fn from_gguf(path: impl AsRef<Path>) -> IoResult<Self> {
        let f = GgufFile::open(path)?;
        let spec = LlamaSpec::from_gguf(&f)?;
        let m = Self::load(&spec, &GgufLlamaWeights::new(&f, spec.clone()))?;
        let used: std::collections::HashSet<String> =
            m.param_names().iter().filter_map(|p| hf_name_to_gguf(p, &spec).map(|(g, _)| g)).collect();
        let names = f.tensors().iter().map(|t| t.name.as_str());
        let hint = format!("llama.block_count = {}", spec.layers);
        check_unused(f.path(), names, |n| used.contains(n), &hint)?;
        Ok(m)
    }

    /// The checkpoint names of this model's parameters.
    fn param_names(&self) -> Vec<String> {
        peft_core::nn::named_params(self).iter().map(|p| p.name().to_string()).collect()
    }

    /// Loads a Hugging Face checkpoint: `config.json` (transformers `LlamaConfig`) and a safetensors file.
    ///
    /// # Errors
    /// Config and safetensors errors; [`IoError::Core`] for unsupported options and missing or mis-shaped tensors.
    pub fn from_hf(config: impl AsRef<Path>, weights: impl AsRef<Path>) -> IoResult<Self> {
        let cfg = LlamaConfig::load(config)?;
        let spec = LlamaSpec::from_hf(&cfg)?;
        let st = SafeTensorsFile::open(weights)?;
        let m = Self::load(&spec, &st)?;
        let used: std::collections::HashSet<String> = m.param_names().into_iter().collect();
        check_unused(st.path(), st.names(), |n| used.contains(n), &format!("num_hidden_layers = {}", spec.layers))?;
        Ok(m)
    }

    /// Loads `dir/config.json` and `dir/model.safetensors`.
    ///
    /// # Errors
    /// As [`Llama::from_hf`].
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> IoResult<Self> {
        let dir: PathBuf = dir.as_ref().to_path_buf();
        Self::from_hf(dir.join("config.json"), dir.join("model.safetensors"))
    }

    /// One empty [`KvCache`] per layer.
    pub fn new_cache(&self) -> Vec<KvCache> {
        vec![KvCache::default(); self.layers.len()]
    }

    /// Final hidden states `[B, L, hidden]` (after `model.norm`) of `ids` laid out as `[B, L]`, continuing the
    /// sequences in `cache` (one per layer) when given.
    ///
    /// # Errors
    /// An id beyond the vocabulary, `ids.len() != B * L`, or a cache of the wrong length.
    pub fn hidden_states(
        &self,
        ids: &[usize],
        shape: [usize; 2],
        mut cache: Option<&mut [KvCache]>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        if let Some(c) = &cache {
            if c.len() != self.layers.len() {
                return Err(Error::Count {
                    op: "Llama::forward",
                    what: "KV-cache layers",
                    expected: self.layers.len(),
                    got: c.len(),
                });
            }
        }
        // Prompt tokens from the attention-prefix sites enter with the first call of a sequence only (later calls
        // see them in the cache).
        let fresh = cache.as_deref().is_none_or(|c| c.iter().all(KvCache::is_empty));
        let mut seq = PromptedSeq::new(self.embed.forward(ids, &shape)?, None);
        for (i, layer) in self.layers.iter().enumerate() {
            if fresh {
                seq.enter(&layer.attn.prefix, ctx)?;
            }
            let c = cache.as_deref_mut().map(|c| &mut c[i]);
            let h = layer.forward(seq.hidden(), seq.mask(), c, ctx)?;
            seq.set_hidden(h)?;
        }
        self.norm.forward(&seq.finish()?)
    }

    /// Logits `[B, L, vocab]` of `ids` laid out as `[B, L]` (see [`Llama::hidden_states`]).
    ///
    /// # Errors
    /// As [`Llama::hidden_states`].
    pub fn forward(
        &self,
        ids: &[usize],
        shape: [usize; 2],
        cache: Option<&mut [KvCache]>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        self.lm_head.forward(&self.hidden_states(ids, shape, cache, ctx)?, ctx)
    }

    /// Mean next-token cross-entropy of `ids [B, L]` (predicting position `t + 1` from positions `<= t`).
    ///
    /// # Errors
    /// As [`Llama::forward`]; [`Error::Arg`] when `L < 2`.
    pub fn lm_loss(&self, ids: &[usize], shape: [usize; 2], ctx: &Ctx) -> Result<Tensor> {
        let [b, l] = shape;
        if l < 2 {
            return Err(Error::arg("Llama::lm_loss", "sequence length", l, "must be >= 2 (a next token to predict)"));
        }
        let logits = self.forward(ids, shape, None, ctx)?.narrow(1, 0, l - 1)?;
        let targets: Vec<i64> = (0..b).flat_map(|i| ids[i * l + 1..(i + 1) * l].iter().map(|&t| t as i64)).collect();
        logits.reshape(&[b * (l - 1), self.spec.vocab])?.cross_entropy(&targets, None, 0.0)
    }

    /// Continues `prompt` (one sequence) with up to `opts.max_new_tokens` tokens using a KV cache, stopping after
    /// an EOS id. Returns the new tokens only.
    ///
    /// # Errors
    /// An empty prompt, an id beyond the vocabulary, or invalid sampling parameters.
    pub fn generate(&self, prompt: &[usize], opts: &GenerateOptions) -> Result<Vec<usize>> {
        const OP: &str = "Llama::generate";
        if prompt.is_empty() {
            return Err(Error::Empty { op: OP, what: "the prompt" });
        }
        if let Sampling::Sample { temperature, top_p, .. } = opts.sampling {
            if !(temperature.is_finite() && temperature > 0.0) {
                return Err(Error::arg(OP, "temperature", temperature, "must be finite and > 0"));
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(Error::arg(OP, "top_p", top_p, "must lie in (0, 1]"));
            }
        }
        let seed = match opts.sampling {
            Sampling::Sample { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        let mut rng = StdRng::seed_from_u64(seed);
        let eos = opts.eos.as_deref().unwrap_or(&self.spec.eos);
        let ctx = Ctx::eval();
        let mut cache = self.new_cache();
        let mut out = Vec::new();
        peft_core::autograd::no_grad(|| {
            let mut input = prompt.to_vec();
            while out.len() < opts.max_new_tokens {
                let h = self.hidden_states(&input, [1, input.len()], Some(&mut cache), &ctx)?;
                let last = h.narrow(1, input.len() - 1, 1)?;
                let logits = self.lm_head.forward(&last, &ctx)?;
                let next = pick(logits.as_slice(), opts.sampling, &mut rng);
                out.push(next);
                if eos.contains(&next) {
                    break;
                }
                input = vec![next];
            }
            Ok(out)
        })
    }
}

/// Chooses a token from one row of logits.
fn pick(logits: &[f32], sampling: Sampling, rng: &mut StdRng) -> usize {
    let argmax =
        || logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0;
    let Sampling::Sample { temperature, top_k, top_p, .. } = sampling else { return argmax() };
    let mut order: Vec<usize> = (0..logits.len()).filter(|&i| logits[i].is_finite()).collect();
    if order.is_empty() {
        return argmax();
    }
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if top_k > 0 {
        order.truncate(top_k);
    }
    let m = f64::from(logits[order[0]]);
    let mut probs: Vec<f64> = order.iter().map(|&i| ((f64::from(logits[i]) - m) / temperature).exp()).collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    let mut acc = 0.0;
    let mut keep = probs.len();
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if acc >= top_p {
            keep = i + 1;
            break;
        }
    }
    let z: f64 = probs[..keep].iter().sum();
    let mut u = rng.gen::<f64>() * z;
    for (i, p) in probs[..keep].iter().enumerate() {
        u -= p;
        if u <= 0.0 {
            return order[i];
        }
    }
    order[keep - 1]
}

impl Module for Llama {
    fn visit(&self, v: &mut dyn Visitor) {
        self.embed.visit(v);
        for l in &self.layers {
            l.visit(v);
        }
        self.norm.visit(v);
        if self.spec.tie_embeddings {
            // The tied weight was reported by the embedding; report only the site (and its adapters' params).
            struct NoBase<'a>(&'a mut dyn Visitor, peft_core::tensor::TensorId);
            impl Visitor for NoBase<'_> {
                fn site(&mut self, s: Site<'_>) {
                    match s {
                        Site::Param(p) if p.id() == self.1 => {}
                        other => self.0.site(other),
                    }
                }
            }
            self.lm_head.visit(&mut NoBase(v, self.embed.weight.id()));
        } else {
            self.lm_head.visit(v);
        }
    }
}

#[cfg(all(test, feature = "gguf", feature = "text"))]
mod tests;
