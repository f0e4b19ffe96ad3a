//! `cargo xtask embed` end to end on MiniLM (needs the asset pack; skipped without it).

mod common;

use common::{max_diff, tensor, xtask, xtask_fails};
use ndarray::{ArrayD, Axis};
use peft_core::adapter::PeftModel;
use peft_core::io::SafeTensorsFile;
use peft_core::nn::Ctx;
use peft_core::testing::require_asset;
use peft_lora::{InitLoraWeights, LoraConfig};
use peft_models::registry::{self, Model};
use peft_models::tokenizer::TextTokenizer;

fn reference_sentences(dir: &std::path::Path) -> Vec<String> {
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("minilm_l6_v2.json")).unwrap()).unwrap();
    j["sentences"].as_array().unwrap().iter().map(|s| s["text"].as_str().unwrap().to_string()).collect()
}

#[test]
fn minilm_pooled_matches_parity_reference_and_metadata_lists_inputs() {
    let (Some(model), Some(refdir)) = (require_asset("models/all-MiniLM-L6-v2"), require_asset("reference")) else {
        return;
    };
    let texts = reference_sentences(&refdir);
    let d = tempfile::tempdir().unwrap();
    let list = d.path().join("inputs.txt");
    std::fs::write(&list, texts.join("\n") + "\n").unwrap();
    let out = d.path().join("emb.safetensors");
    xtask(&[&"embed", &"--model", &model, &"--input", &list, &"--out", &out, &"--batch", &"2"]);
    let reff = SafeTensorsFile::open(refdir.join("minilm_l6_v2.safetensors")).unwrap();
    let pooled = tensor(&out, "pooled");
    assert_eq!(pooled.shape(), &[texts.len(), 384]);
    for i in 0..texts.len() {
        let want = reff.get(&format!("s{i}.sentence_embedding")).unwrap();
        let got = pooled.index_axis(Axis(0), i).to_owned().into_dyn();
        let d = max_diff(&got, &want);
        assert!(d <= 1e-4, "sentence {i}: pooled differs by {d}");
        let h = tensor(&out, &format!("hidden_states.{i}"));
        let want_h = reff.get(&format!("s{i}.last_hidden_state")).unwrap();
        assert_eq!(h.shape(), want_h.shape(), "hidden states are unpadded");
        assert!(max_diff(&h, &want_h) <= 1e-3);
    }
    let f = SafeTensorsFile::open(&out).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&f.metadata()["peft_rs_embed"]).unwrap();
    assert_eq!(meta["arch"], "bert");
    assert_eq!(meta["inputs"].as_array().unwrap().len(), texts.len());
    assert_eq!(meta["inputs"][0], texts[0].as_str());
}

#[test]
fn minilm_adapter_changes_output_and_equals_in_process_lora_forward() {
    let Some(model_dir) = require_asset("models/all-MiniLM-L6-v2") else { return };
    let texts = ["a first sentence", "LoRA adapters are small.", "x"];
    let d = tempfile::tempdir().unwrap();
    let Model::Bert(bert) = registry::load(&model_dir).unwrap() else { panic!("MiniLM is BERT") };
    let mut cfg = LoraConfig::new(4, 8.0, ["query", "value", "dense"]);
    cfg.init_lora_weights = InitLoraWeights::Bool(false);
    let lm = PeftModel::new(&bert, cfg, "default", 7).unwrap();
    let adapter = d.path().join("adapter");
    lm.save_pretrained(&adapter).unwrap();
    let tok = TextTokenizer::from_file(model_dir.join("tokenizer.json")).unwrap();
    let want: Vec<ArrayD<f32>> = texts
        .iter()
        .map(|t| {
            let b = tok.batch(&[t]).unwrap();
            peft_core::no_grad(|| bert.sentence_embedding(&b, &Ctx::eval())).unwrap().data().to_owned()
        })
        .collect();

    let list = d.path().join("in.txt");
    std::fs::write(&list, texts.join("\n")).unwrap();
    let (plain, adapted) = (d.path().join("plain.safetensors"), d.path().join("adapted.safetensors"));
    xtask(&[&"embed", &"--model", &model_dir, &"--input", &list, &"--out", &plain]);
    xtask(&[&"embed", &"--model", &model_dir, &"--input", &list, &"--out", &adapted, &"--adapter", &adapter]);
    let (p, a) = (tensor(&plain, "pooled"), tensor(&adapted, "pooled"));
    assert!(max_diff(&p, &a) > 1e-3, "the adapter changes the embeddings");
    for (i, w) in want.iter().enumerate() {
        let got = a.index_axis(Axis(0), i).to_owned().into_dyn();
        let d = max_diff(&got, &w.index_axis(Axis(0), 0).to_owned().into_dyn());
        assert!(d <= 1e-5, "input {i}: CLI with adapter vs in-process PeftModel differ by {d}");
    }
}

#[test]
fn missing_files_and_bad_inputs_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("o.safetensors");
    let err = xtask_fails(&[&"embed", &"--model", &d.path().join("nope"), &"--input", &"x", &"--out", &out]);
    assert!(err.contains("does not exist"), "{err}");
    let Some(model) = require_asset("models/dinov2-small") else { return };
    let list = d.path().join("in.txt");
    std::fs::write(&list, "not_an_image.png\n").unwrap();
    let err = xtask_fails(&[&"embed", &"--model", &model, &"--input", &list, &"--out", &out]);
    assert!(err.contains("line 1") && err.contains("image"), "{err}");
    std::fs::write(d.path().join("fake.png"), b"not png bytes").unwrap();
    std::fs::write(&list, "fake.png\n").unwrap();
    let err = xtask_fails(&[&"embed", &"--model", &model, &"--input", &list, &"--out", &out]);
    assert!(err.contains("not a readable image"), "{err}");
}
