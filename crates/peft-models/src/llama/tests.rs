use std::collections::HashMap;

use ndarray::{ArrayD, IxDyn};

use super::*;
use peft_core::io::gguf::test_writer::GgufBuilder;
use peft_core::io::gguf::GgufValueType;
use peft_core::io::{GgmlType, GgufValue};
use peft_core::nn::{linear_sites, named_params};
use peft_core::ops::attention::RopePositions;
use peft_core::optim::Optimizer;
use peft_core::AdamW;

fn spec(tie: bool) -> LlamaSpec {
    LlamaSpec {
        vocab: 40,
        hidden: 16,
        intermediate: 24,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 4,
        eps: 1e-5,
        rope_theta: 1e4,
        max_positions: 64,
        tie_embeddings: tie,
        bos: Some(1),
        eos: vec![2],
    }
}

/// llama.cpp's converter permutation (the inverse of [`unpermute_qk`]).
fn permute(w: &ArrayD<f32>, heads: usize) -> ArrayD<f32> {
    let (rows, cols) = (w.shape()[0], w.shape()[1]);
    let w4 = w.clone().into_shape_with_order((heads, 2, rows / heads / 2, cols)).unwrap();
    w4.permuted_axes([0, 2, 1, 3]).as_standard_layout().to_owned().into_shape_with_order(IxDyn(&[rows, cols])).unwrap()
}

fn weights(m: &Llama) -> HashMap<String, ArrayD<f32>> {
    named_params(m).iter().map(|p| (p.name().to_string(), p.value().to_owned().into_dyn())).collect()
}

fn gguf_image(arch: &str, s: &LlamaSpec, w: &HashMap<String, ArrayD<f32>>) -> Vec<u8> {
    gguf_builder(arch, s, w).build()
}

fn gguf_builder(arch: &str, s: &LlamaSpec, w: &HashMap<String, ArrayD<f32>>) -> GgufBuilder {
    let mut b = GgufBuilder::new()
        .kv("general.architecture", GgufValue::String(arch.into()))
        .kv("llama.block_count", GgufValue::U32(s.layers as u32))
        .kv("llama.embedding_length", GgufValue::U32(s.hidden as u32))
        .kv("llama.feed_forward_length", GgufValue::U32(s.intermediate as u32))
        .kv("llama.attention.head_count", GgufValue::U32(s.heads as u32))
        .kv("llama.attention.head_count_kv", GgufValue::U32(s.kv_heads as u32))
        .kv("llama.rope.freq_base", GgufValue::F32(s.rope_theta as f32))
        .kv("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(s.eps as f32))
        .kv("llama.context_length", GgufValue::U32(s.max_positions as u32))
        .kv("tokenizer.ggml.eos_token_id", GgufValue::U32(2));
    let mut names: Vec<_> = w.keys().cloned().collect();
    names.sort();
    for n in names {
        let (g, heads) = hf_name_to_gguf(&n, s).unwrap();
        let a = match heads {
            Some(h) => permute(&w[&n], h),
            None => w[&n].clone(),
        };
        let dims: Vec<u64> = a.shape().iter().rev().map(|&d| d as u64).collect();
        let bytes = a.iter().flat_map(|x| x.to_le_bytes()).collect();
        b = b.tensor(&g, &dims, GgmlType::F32, bytes);
    }
    b
}

/// Issue 14 item 5: a 0-dimensional `token_embd.weight` (indexed `shape()[0]`) and `block_count` 0 are typed
/// errors; item 7: a `block_count` smaller than the file's blocks is refused (the model would be truncated).
#[test]
fn malformed_gguf_llama_metadata_is_a_typed_error() {
    let s = spec(true);
    let m = Llama::random(&s, 3, 0.2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    let mut w = weights(&m);
    w.remove("model.embed_tokens.weight");
    std::fs::write(
        &path,
        gguf_builder("llama", &s, &w).tensor("token_embd.weight", &[], GgmlType::F32, vec![0; 4]).build(),
    )
    .unwrap();
    let e = LlamaSpec::from_gguf(&GgufFile::open(&path).unwrap()).unwrap_err();
    assert!(matches!(&e, IoError::InvalidConfig { field: "token_embd.weight", .. }), "{e}");
    for layers in [0, 1] {
        let short = LlamaSpec { layers, ..s.clone() };
        std::fs::write(&path, gguf_image("llama", &short, &weights(&m))).unwrap();
        let e = Llama::from_gguf(&path).err().expect("refused");
        let msg = e.to_string();
        match layers {
            0 => assert!(matches!(&e, IoError::InvalidConfig { field: "llama.block_count", .. }), "{msg}"),
            _ => assert!(
                matches!(&e, IoError::UnusedTensors { count: 9, ref first, .. } if first.starts_with("blk.1.")),
                "{msg}"
            ),
        }
        assert!(msg.contains("bad.gguf"), "{msg}");
    }
}

/// Issue 14 item 7: a Hugging Face config with fewer layers than `model.safetensors` is refused.
#[test]
fn hf_config_with_fewer_layers_than_the_checkpoint_is_refused() {
    let m = Llama::random(&spec(false), 3, 0.2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let w = weights(&m);
    peft_core::io::write_safetensors(dir.path().join("model.safetensors"), w.iter(), None).unwrap();
    let cfg = serde_json::json!({
        "model_type": "llama", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "max_position_embeddings": 64,
        "tie_word_embeddings": false, "hidden_act": "silu"
    });
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let e = Llama::from_hf_dir(dir.path()).err().expect("refused");
    assert!(matches!(&e, IoError::UnusedTensors { ref hint, .. } if hint == "num_hidden_layers = 1"), "{e}");
    assert!(e.to_string().contains("model.layers.1."), "{e}");
}

fn logits(m: &Llama, ids: &[usize]) -> Vec<f32> {
    m.forward(ids, [1, ids.len()], None, &Ctx::eval()).unwrap().as_slice().to_vec()
}

#[test]
fn unpermute_inverts_the_gguf_permutation_and_turns_interleaved_rope_into_rotate_half() {
    let w = RandomInit::new(1, 1.0).get("w", &[16, 5]).unwrap();
    let p = permute(&w, 4);
    assert_ne!(p, w);
    assert_eq!(unpermute_qk(p.clone(), 4).unwrap(), w);
    // q = x·Wᵀ per head: interleaved RoPE on the permuted rows equals rotate-half RoPE on the original rows.
    let x = RandomInit::new(2, 1.0).get("x", &[3, 5]).unwrap();
    let head = |m: &ArrayD<f32>| -> Tensor {
        let y = Tensor::new(x.clone()).matmul(&Tensor::new(m.clone()).transpose(0, 1).unwrap()).unwrap();
        y.reshape(&[1, 3, 4, 4]).unwrap().permute(&[0, 2, 1, 3]).unwrap()
    };
    let a = head(&w).rotary_embedding(RopePositions::Offset(2), 100.0, RopeLayout::RotateHalf).unwrap();
    let b = head(&p).rotary_embedding(RopePositions::Offset(2), 100.0, RopeLayout::Interleaved).unwrap();
    // a's channel i (< D/2) pairs with i + D/2; b's channel 2i with 2i+1: same values after regrouping.
    let b = b.reshape(&[1, 4, 3, 2, 2]).unwrap().permute(&[0, 1, 2, 4, 3]).unwrap().reshape(&[1, 4, 3, 4]).unwrap();
    for (u, v) in a.as_slice().iter().zip(b.as_slice()) {
        assert!((u - v).abs() < 1e-5, "{u} vs {v}");
    }
    assert!(matches!(unpermute_qk(w, 3), Err(Error::Shape { .. })));
}

#[test]
fn gguf_load_maps_names_unpermutes_qk_and_reads_config() {
    for tie in [true, false] {
        let s = spec(tie);
        let m = Llama::random(&s, 3, 0.2).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        std::fs::write(&path, gguf_image("llama", &s, &weights(&m))).unwrap();
        let f = GgufFile::open(&path).unwrap();
        let got = LlamaSpec::from_gguf(&f).unwrap();
        assert_eq!(got, LlamaSpec { bos: None, eps: f64::from(1e-5f32), ..s.clone() });
        let g = Llama::from_gguf(&path).unwrap();
        let ids = [5, 7, 1, 30, 2, 9];
        assert_eq!(logits(&g, &ids), logits(&m, &ids), "tie {tie}");
    }
}

#[test]
fn gguf_with_another_architecture_is_a_typed_error_naming_it() {
    let s = spec(true);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bert.gguf");
    std::fs::write(&path, gguf_image("bert", &s, &HashMap::new())).unwrap();
    let Err(e) = Llama::from_gguf(&path) else { panic!("loaded a bert GGUF as llama") };
    assert!(matches!(&e, IoError::UnknownArchitecture { model_type: Some(t), .. } if t == "bert"), "{e:?}");
    assert!(e.to_string().contains("bert"), "{e}");
}

#[test]
fn hf_safetensors_checkpoint_round_trips() {
    let s = spec(false);
    let m = Llama::random(&s, 4, 0.2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = json_config(&s);
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let w = weights(&m);
    peft_core::io::write_safetensors(dir.path().join("model.safetensors"), w.iter(), None).unwrap();
    let h = Llama::from_hf_dir(dir.path()).unwrap();
    assert_eq!(h.spec, s);
    assert_eq!(logits(&h, &[3, 4, 5]), logits(&m, &[3, 4, 5]));
    // A missing tensor is reported by name.
    let mut w2 = w.clone();
    w2.remove("model.layers.1.mlp.up_proj.weight");
    peft_core::io::write_safetensors(dir.path().join("model.safetensors"), w2.iter(), None).unwrap();
    let e = Llama::from_hf_dir(dir.path()).err().unwrap();
    assert!(e.to_string().contains("model.layers.1.mlp.up_proj.weight"), "{e}");
}

fn json_config(s: &LlamaSpec) -> String {
    serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": s.vocab,
        "hidden_size": s.hidden, "intermediate_size": s.intermediate, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "rms_norm_eps": s.eps,
        "rope_theta": s.rope_theta, "max_position_embeddings": s.max_positions,
        "tie_word_embeddings": s.tie_embeddings, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"
    })
    .to_string()
}

#[test]
fn sites_use_hf_names_and_tied_head_is_an_output_site_without_duplicate_params() {
    let m = Llama::random(&spec(true), 5, 0.2).unwrap();
    let sites: Vec<String> = linear_sites(&m).iter().map(|l| l.path().to_string()).collect();
    assert_eq!(sites.len(), 2 * 7 + 1);
    assert_eq!(sites[0], "model.layers.0.self_attn.q_proj");
    assert!(sites.contains(&"model.layers.1.mlp.down_proj".to_string()));
    let head = linear_sites(&m).into_iter().find(|l| l.path() == "lm_head").unwrap();
    assert!(head.is_output());
    let params = named_params(&m);
    let mut ids: Vec<_> = params.iter().map(|p| p.id()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), params.len());
    assert_eq!(params.len(), 1 + 2 * 9 + 1);
}

#[test]
fn cached_greedy_generation_matches_full_recomputation_and_stops_at_eos() {
    let m = Llama::random(&spec(true), 6, 0.5).unwrap();
    let prompt = [3, 9, 14];
    let got = m.generate(&prompt, &GenerateOptions { eos: Some(vec![]), ..GenerateOptions::greedy(6) }).unwrap();
    let mut seq = prompt.to_vec();
    for _ in 0..6 {
        let l = logits(&m, &seq);
        let last = &l[(seq.len() - 1) * 40..];
        seq.push(pick(last, Sampling::Greedy, &mut StdRng::seed_from_u64(0)));
    }
    assert_eq!(got, seq[3..]);
    // Declaring the 2nd generated token an EOS stops right after it.
    let stop = m.generate(&prompt, &GenerateOptions { eos: Some(vec![got[1]]), ..GenerateOptions::greedy(6) }).unwrap();
    assert_eq!(stop, got[..=got.iter().position(|&t| t == got[1]).unwrap()]);
    assert!(m.generate(&[], &GenerateOptions::greedy(1)).is_err());
}

#[test]
fn sampling_is_seeded_and_top_k_one_is_greedy() {
    let m = Llama::random(&spec(true), 7, 0.5).unwrap();
    let opts = |top_k, seed| GenerateOptions {
        max_new_tokens: 8,
        sampling: Sampling::Sample { temperature: 1.5, top_k, top_p: 0.95, seed },
        eos: Some(vec![]),
    };
    let a = m.generate(&[1, 2], &opts(0, 11)).unwrap();
    assert_eq!(a, m.generate(&[1, 2], &opts(0, 11)).unwrap());
    let greedy = m.generate(&[1, 2], &GenerateOptions { eos: Some(vec![]), ..GenerateOptions::greedy(8) }).unwrap();
    assert_eq!(m.generate(&[1, 2], &opts(1, 12)).unwrap(), greedy);
    let bad = GenerateOptions {
        sampling: Sampling::Sample { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 },
        ..opts(0, 0)
    };
    assert!(matches!(m.generate(&[1], &bad), Err(Error::Arg { arg, .. }) if arg == "temperature"));
}

#[test]
fn top_p_keeps_the_smallest_nucleus() {
    // probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.5 always picks token 0; top_p 0.8 never picks 2 or 3.
    let logits = [2.0f32, 1.0, 0.0, -1.0];
    let mut rng = StdRng::seed_from_u64(3);
    let s = |p| Sampling::Sample { temperature: 1.0, top_k: 0, top_p: p, seed: 0 };
    assert!((0..200).all(|_| pick(&logits, s(0.5), &mut rng) == 0));
    let picks: Vec<usize> = (0..400).map(|_| pick(&logits, s(0.8), &mut rng)).collect();
    assert!(picks.iter().all(|&t| t < 2) && picks.contains(&1));
    let all: Vec<usize> = (0..2000).map(|_| pick(&logits, s(1.0), &mut rng)).collect();
    assert!(all.contains(&3));
}

#[test]
fn fine_tuning_a_tiny_llama_lowers_next_token_loss() {
    let s = spec(true);
    let m = Llama::random(&s, 8, 0.1).unwrap();
    let params = named_params(&m);
    for p in &params {
        p.set_trainable(true);
    }
    let mut opt = AdamW::with_lr(params, 1e-2, 0.0).unwrap();
    // A fixed repeating pattern: next token = (t * 3 + 1) mod 40.
    let ids: Vec<usize> = (0..2)
        .flat_map(|b| std::iter::successors(Some(b * 7 % 40), |t| Some((t * 3 + 1) % 40)).take(12).collect::<Vec<_>>())
        .collect();
    let ctx = Ctx::train(0);
    let mut losses = Vec::new();
    for _ in 0..25 {
        let loss = m.lm_loss(&ids, [2, 12], &ctx).unwrap();
        losses.push(loss.item().unwrap());
        let g = loss.backward().unwrap();
        drop(loss);
        opt.step(&g).unwrap();
    }
    assert!(losses[0] > 3.0, "near-uniform start expected, got {}", losses[0]);
    assert!(*losses.last().unwrap() < 0.5 * losses[0], "{losses:?}");
    assert!(m.lm_loss(&ids[..1], [1, 1], &ctx).is_err());
}

#[test]
fn gguf_tokenizer_builds_byte_level_bpe_with_special_tokens() {
    let tokens = ["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġab", "1", "2"];
    let strs = |v: &[&str]| {
        GgufValue::Array(GgufValueType::String, v.iter().map(|s| GgufValue::String(s.to_string())).collect())
    };
    let types = GgufValue::Array(GgufValueType::I32, [3, 1, 1, 1, 1, 1, 1, 1].map(GgufValue::I32).to_vec());
    let image = |pre: &str| {
        GgufBuilder::new()
            .kv("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
            .kv("tokenizer.ggml.pre", GgufValue::String(pre.into()))
            .kv("tokenizer.ggml.tokens", strs(&tokens))
            .kv("tokenizer.ggml.merges", strs(&["a b", "Ġ ab"]))
            .kv("tokenizer.ggml.token_type", types.clone())
            .build()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tok.gguf");
    std::fs::write(&path, image("smollm")).unwrap();
    let tok = tokenizer_from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let enc = tok.encode("ab ab<|endoftext|>12", false).unwrap();
    assert_eq!(enc.get_ids(), [3, 5, 0, 6, 7]);
    assert_eq!(tok.decode(&[3, 5], true).unwrap(), "ab ab");
    std::fs::write(&path, image("llama-bpe")).unwrap();
    let e = tokenizer_from_gguf(&GgufFile::open(&path).unwrap()).unwrap_err();
    assert!(matches!(&e, IoError::InvalidConfig { field: "tokenizer.ggml.pre", .. }), "{e:?}");
    // Issue 14 item 5: a token_type array longer than the token list (indexed `tokens[i]`) is a typed error.
    let long_types = GgufValue::Array(GgufValueType::I32, [3, 1, 1, 1, 1, 1, 1, 1, 3].map(GgufValue::I32).to_vec());
    let bytes = GgufBuilder::new()
        .kv("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .kv("tokenizer.ggml.tokens", strs(&tokens))
        .kv("tokenizer.ggml.merges", strs(&["a b"]))
        .kv("tokenizer.ggml.token_type", long_types)
        .build();
    std::fs::write(&path, bytes).unwrap();
    let e = tokenizer_from_gguf(&GgufFile::open(&path).unwrap()).unwrap_err();
    assert!(matches!(&e, IoError::InvalidConfig { field: "tokenizer.ggml.token_type", .. }), "{e:?}");
}
