//! Greedy decode throughput of SmolLM2-135M (LLaMA architecture, GGUF from `PEFT_SMOLLM2_GGUF`) with the KV
//! cache, for docs/perf.md; compare with `benches/baselines/torch_llama_decode.py` (same weights, prompt, token
//! count and thread count).
//!
//! ```sh
//! export PEFT_SMOLLM2_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf
//! cargo run --release -p peft-core --example llama_decode -- --tokens 64 --threads 2 [--export DIR]
//! python3 benches/baselines/torch_llama_decode.py --model DIR --tokens 64 --threads 2
//! ```
//! `--export DIR` also writes the dequantised weights as a Hugging Face folder (`config.json`, F32
//! `model.safetensors` with transformers' names, q/k rows un-permuted) for the PyTorch script. The prompt is
//! `"The capital of France is"` (5 tokens, no BOS); exactly `--tokens` new tokens are generated (EOS does not stop
//! the run). One warm-up run of 4 tokens, then the best of `--iters` timed runs (prefill + decode). Prints one
//! JSON line. Without `PEFT_SMOLLM2_GGUF` it prints why and exits successfully.

use std::time::Instant;

use peft_core::io::{write_safetensors, GgufFile};
use peft_core::nn::named_params;
use peft_models::llama::{tokenizer_from_gguf, GenerateOptions, Llama};

const PROMPT: &str = "The capital of France is";

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned()).unwrap_or_else(|| default.into())
}

fn export(model: &Llama, dir: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let params = named_params(model);
    let tensors: Vec<(String, ndarray::ArrayD<f32>)> =
        params.iter().map(|p| (p.name().to_string(), p.value().to_owned())).collect();
    write_safetensors(dir.join("model.safetensors"), tensors.iter().map(|(n, a)| (n, a)), None)?;
    let s = &model.spec;
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s.hidden,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "rms_norm_eps": s.eps,
        "rope_theta": s.rope_theta,
        "max_position_embeddings": s.max_positions,
        "vocab_size": s.vocab,
        "tie_word_embeddings": s.tie_embeddings,
        "bos_token_id": s.bos,
        "eos_token_id": s.eos.first(),
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tokens: usize = arg("--tokens", "64").parse()?;
    let threads: usize = arg("--threads", "2").parse()?;
    let iters: usize = arg("--iters", "1").parse()?;
    let Some(path) = std::env::var_os("PEFT_SMOLLM2_GGUF") else {
        println!("llama_decode: PEFT_SMOLLM2_GGUF is not set (path to SmolLM2-135M-Instruct.Q4_1.gguf); skipping");
        return Ok(());
    };
    if !std::path::Path::new(&path).is_file() {
        println!("llama_decode: PEFT_SMOLLM2_GGUF={} is not a file; skipping", path.to_string_lossy());
        return Ok(());
    }
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global()?;
    let model = Llama::from_gguf(&path)?;
    let tok = tokenizer_from_gguf(&GgufFile::open(&path)?)?;
    let prompt: Vec<usize> =
        tok.encode(PROMPT, false).map_err(|e| e.to_string())?.get_ids().iter().map(|&i| i as usize).collect();
    let export_dir = arg("--export", "");
    if !export_dir.is_empty() {
        export(&model, std::path::Path::new(&export_dir))?;
    }
    let opts = |n| GenerateOptions { eos: Some(Vec::new()), ..GenerateOptions::greedy(n) };
    model.generate(&prompt, &opts(4))?;
    let mut best = f64::INFINITY;
    let mut out = Vec::new();
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        out = model.generate(&prompt, &opts(tokens))?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let first: Vec<usize> = out.iter().take(8).copied().collect();
    println!(
        "{{\"impl\":\"peft-rs\",\"threads\":{threads},\"prompt_tokens\":{},\"new_tokens\":{},\"seconds\":{best:.4},\"tokens_per_s\":{:.2},\"first_ids\":{first:?}}}",
        prompt.len(),
        out.len(),
        out.len() as f64 / best
    );
    Ok(())
}
