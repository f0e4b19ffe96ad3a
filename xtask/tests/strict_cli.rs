//! `cargo xtask merge` / `embed` surface the adapter loader's warnings (options this library does not apply) and
//! fail under `--strict` (audit item of issue 12: they used to be discarded).

mod common;

use common::{xtask, xtask_fails};
use peft_core::adapter::PeftModel;
use peft_core::io::{write_safetensors, BertConfig};
use peft_core::nn::{named_params, RandomInit};
use peft_lora::{InitLoraWeights, LoraConfig};
use peft_models::bert::BertModel;

/// A 2-layer BERT folder and a LoRA adapter for it whose config asks for `trainable_token_indices`, which the
/// loader reports as not applied.
fn model_and_adapter(root: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let model_dir = root.join("tiny");
    std::fs::create_dir_all(&model_dir).unwrap();
    let cfg = BertConfig {
        vocab_size: 16,
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 12,
        max_position_embeddings: 16,
        ..BertConfig::default()
    };
    let json = serde_json::json!({
        "model_type": "bert", "architectures": ["BertModel"], "vocab_size": 16, "hidden_size": 8,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 12, "max_position_embeddings": 16,
        "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12
    });
    std::fs::write(model_dir.join("config.json"), json.to_string()).unwrap();
    let m = BertModel::from_source(&cfg, &RandomInit::new(1, 0.2)).unwrap();
    let ps = named_params(&m);
    let names: Vec<String> = ps.iter().map(|p| p.name().to_string()).collect();
    let vals: Vec<_> = ps.iter().map(|p| p.value().to_owned()).collect();
    write_safetensors(model_dir.join("model.safetensors"), names.iter().zip(vals.iter()), None).unwrap();
    let mut lc = LoraConfig::new(2, 4.0, ["query", "value"]);
    lc.init_lora_weights = InitLoraWeights::Bool(false);
    let adapter = root.join("adapter");
    PeftModel::new(&m, lc, "default", 0).unwrap().save_pretrained(&adapter).unwrap();
    let path = adapter.join("adapter_config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["trainable_token_indices"] = serde_json::json!([1, 2]);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    (model_dir, adapter)
}

#[test]
fn merge_prints_the_load_report_and_strict_refuses_what_was_not_applied() {
    let d = tempfile::tempdir().unwrap();
    let (model, adapter) = model_and_adapter(d.path());
    let out = d.path().join("merged");
    let text = xtask(&[&"merge", &"--model", &model, &"--adapter", &adapter, &"--out", &out]);
    assert!(text.contains("trainable_token_indices"), "the warning is printed: {text}");
    let strict_out = d.path().join("merged-strict");
    let err = xtask_fails(&[&"merge", &"--model", &model, &"--adapter", &adapter, &"--out", &strict_out, &"--strict"]);
    assert!(err.contains("--strict") && err.contains("trainable_token_indices"), "{err}");
    assert!(!strict_out.exists(), "nothing is written under --strict");
}
