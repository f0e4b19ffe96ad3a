//! `cargo xtask merge`: the merged folder's forward equals the unmerged adapter forward.

mod common;

use common::{max_diff, xtask, xtask_fails};
use peft_core::adapter::PeftModel;
use peft_core::io::{write_safetensors, BertConfig, SafeTensorsFile};
use peft_core::nn::{named_params, Ctx, RandomInit};
use peft_core::testing::require_asset;
use peft_lora::{InitLoraWeights, LoraConfig};
use peft_models::bert::BertModel;
use peft_models::registry::{self, Model};
use peft_models::tokenizer::Batch;

fn batch() -> Batch {
    let mut b = Batch::from_rows(&[vec![1, 5, 9, 3, 7, 2], vec![4, 4, 8, 1, 6, 0]]).unwrap();
    b.attention_mask[11] = 0;
    b
}

fn forward(m: &BertModel) -> ndarray::ArrayD<f32> {
    peft_core::no_grad(|| m.forward(&batch(), &Ctx::eval())).unwrap().data().to_owned()
}

/// Writes an adapter for `model` into `dir` and returns the model's output with it active (unmerged).
fn adapter_and_unmerged_output(model: &BertModel, dir: &std::path::Path, targets: &[&str]) -> ndarray::ArrayD<f32> {
    let mut cfg = LoraConfig::new(4, 8.0, targets.iter().copied());
    cfg.init_lora_weights = InitLoraWeights::Bool(false);
    let lm = PeftModel::new(model, cfg, "default", 3).unwrap();
    lm.save_pretrained(dir).unwrap();
    forward(model)
}

#[test]
fn tiny_bert_merged_folder_matches_unmerged_adapter_forward() {
    let d = tempfile::tempdir().unwrap();
    let model_dir = d.path().join("tiny");
    std::fs::create_dir_all(model_dir.join("sub")).unwrap();
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
    std::fs::write(model_dir.join("tokenizer.json"), "{}").unwrap();
    std::fs::write(model_dir.join("sub/extra.txt"), "x").unwrap();
    let m = BertModel::from_source(&cfg, &RandomInit::new(1, 0.2)).unwrap();
    let ps = named_params(&m);
    // stored under the `bert.` prefix, as BertFor* checkpoints are
    let names: Vec<String> = ps.iter().map(|p| format!("bert.{}", p.name())).collect();
    let vals: Vec<_> = ps.iter().map(|p| p.value().to_owned()).collect();
    write_safetensors(model_dir.join("model.safetensors"), names.iter().zip(vals.iter()), None).unwrap();

    let Model::Bert(base) = registry::load(&model_dir).unwrap() else { panic!("bert") };
    let plain = forward(&base);
    let adapter = d.path().join("adapter");
    let want = adapter_and_unmerged_output(&base, &adapter, &["query", "value", "dense"]);
    assert!(max_diff(&plain, &want) > 1e-3, "the adapter changes the output");

    let out = d.path().join("merged");
    xtask(&[&"merge", &"--model", &model_dir, &"--adapter", &adapter, &"--out", &out]);
    let merged = BertModel::load(&out).unwrap();
    let diff = max_diff(&forward(&merged), &want);
    assert!(diff <= 1e-5, "merged vs unmerged: {diff}");
    // same tensor names, F32, tokenizer and other files copied
    let f = SafeTensorsFile::open(out.join("model.safetensors")).unwrap();
    let mut got: Vec<&str> = f.names().collect();
    got.sort_unstable();
    let mut want_names: Vec<&str> = names.iter().map(String::as_str).collect();
    want_names.sort_unstable();
    assert_eq!(got, want_names);
    assert!(got.iter().all(|n| f.dtype(n).unwrap() == peft_core::io::DType::F32));
    assert!(out.join("tokenizer.json").is_file() && out.join("config.json").is_file());
    assert!(out.join("sub/extra.txt").is_file());
    // existing output needs --force
    let err = xtask_fails(&[&"merge", &"--model", &model_dir, &"--adapter", &adapter, &"--out", &out]);
    assert!(err.contains("--force"), "{err}");
    xtask(&[&"merge", &"--model", &model_dir, &"--adapter", &adapter, &"--out", &out, &"--force"]);
    assert!(BertModel::load(&out).is_ok());
    let leftovers: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary folders removed");
}

#[test]
fn minilm_merged_folder_matches_unmerged_adapter_forward() {
    let Some(model_dir) = require_asset("models/all-MiniLM-L6-v2") else { return };
    let d = tempfile::tempdir().unwrap();
    let Model::Bert(base) = registry::load(&model_dir).unwrap() else { panic!("bert") };
    let adapter = d.path().join("adapter");
    let want = adapter_and_unmerged_output(&base, &adapter, &["query", "key", "value", "dense"]);
    let out = d.path().join("merged");
    xtask(&[&"merge", &"--model", &model_dir, &"--adapter", &adapter, &"--out", &out]);
    let merged = BertModel::load(&out).unwrap();
    let diff = max_diff(&forward(&merged), &want);
    assert!(diff <= 1e-5, "merged vs unmerged: {diff}");
    assert!(out.join("tokenizer.json").is_file() && out.join("1_Pooling/config.json").is_file());
}

#[test]
fn tiny_tied_llama_merged_folder_matches_unmerged_adapter_forward() {
    use peft_models::llama::{Llama, LlamaSpec};
    let d = tempfile::tempdir().unwrap();
    let model_dir = d.path().join("tiny-llama");
    std::fs::create_dir_all(&model_dir).unwrap();
    let json = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
        "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": true,
        "hidden_act": "silu"
    });
    std::fs::write(model_dir.join("config.json"), json.to_string()).unwrap();
    let cfg = peft_core::io::LlamaConfig::load(model_dir.join("config.json")).unwrap();
    let m = Llama::random(&LlamaSpec::from_hf(&cfg).unwrap(), 5, 0.3).unwrap();
    let ps = named_params(&m);
    let vals: Vec<_> = ps.iter().map(|p| (p.name().to_string(), p.value().to_owned())).collect();
    write_safetensors(model_dir.join("model.safetensors"), vals.iter().map(|(n, v)| (n, v)), None).unwrap();

    let Model::Llama(base) = registry::load(&model_dir).unwrap() else { panic!("llama") };
    let ids = [3usize, 17, 9, 30, 1, 4];
    let fwd = |m: &Llama| -> ndarray::ArrayD<f32> {
        peft_core::no_grad(|| m.forward(&ids, [1, ids.len()], None, &Ctx::eval())).unwrap().data().to_owned()
    };
    let plain = fwd(&base);
    let mut cfg = LoraConfig::new(4, 8.0, ["q_proj", "v_proj", "down_proj"]);
    cfg.init_lora_weights = InitLoraWeights::Bool(false);
    let lm = PeftModel::new(&base, cfg, "default", 3).unwrap();
    let adapter = d.path().join("adapter");
    lm.save_pretrained(&adapter).unwrap();
    let want = fwd(&base);
    assert!(max_diff(&plain, &want) > 1e-3, "the adapter changes the output");
    let out = d.path().join("merged");
    xtask(&[&"merge", &"--model", &model_dir, &"--adapter", &adapter, &"--out", &out]);
    let merged = Llama::from_hf_dir(&out).unwrap();
    let diff = max_diff(&fwd(&merged), &want);
    assert!(diff <= 1e-5, "merged vs unmerged: {diff}");
    assert!(!SafeTensorsFile::open(out.join("model.safetensors")).unwrap().contains("lm_head.weight"));
}
