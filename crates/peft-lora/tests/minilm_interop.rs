//! PEFT <-> peft-rs interop on the real all-MiniLM-L6-v2 (fixtures from `tests/fixtures/gen_minilm_interop.py`):
//! a PEFT-saved LoRA loads here and gives PEFT's last_hidden_state; an adapter saved by peft-rs gives, in PEFT,
//! the outputs it gives here; PEFT's files survive load -> save byte for byte.

use std::path::{Path, PathBuf};

use peft_core::adapter::{PeftModel, CONFIG_NAME, WEIGHTS_NAME};
use peft_core::io::SafeTensorsFile;
use peft_core::nn::{Ctx, RandomInit, WeightSource};
use peft_core::testing::require_asset;
use peft_lora::config::IntOrList;
use peft_lora::{LoraConfig, LoraModelExt};
use peft_models::bert::BertModel;
use peft_models::tokenizer::TextTokenizer;

/// The sentences of gen_minilm_interop.py.
const SENTENCES: [&str; 3] = [
    "A man is playing a guitar.",
    "Parameter-efficient fine-tuning adapts large models cheaply.",
    "The quick brown fox jumps over the lazy dog!",
];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm")
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Max |ours - reference| of last_hidden_state over the sentences (token ids checked equal first).
fn worst_error(model: &BertModel, tok: &TextTokenizer, reference: &SafeTensorsFile) -> f32 {
    let mut worst = 0f32;
    for (i, s) in SENTENCES.iter().enumerate() {
        let b = tok.batch(&[s]).unwrap();
        let ids: Vec<usize> =
            reference.get_i64(&format!("s{i}.input_ids")).unwrap().iter().map(|&x| x as usize).collect();
        assert_eq!(b.input_ids, ids, "token ids of sentence {i}");
        let out = model.forward(&b, &Ctx::eval()).unwrap().to_vec();
        let want = reference.get(&format!("s{i}.last_hidden_state")).unwrap();
        worst = worst.max(max_abs(&out, want.as_slice().unwrap()));
    }
    worst
}

fn load(model_dir: &Path) -> (BertModel, TextTokenizer) {
    (BertModel::load(model_dir).unwrap(), TextTokenizer::from_file(model_dir.join("tokenizer.json")).unwrap())
}

#[test]
fn peft_saved_adapter_gives_peft_outputs() {
    let Some(model_dir) = require_asset("models/all-MiniLM-L6-v2") else {
        return;
    };
    let (model, tok) = load(&model_dir);
    let reference = SafeTensorsFile::open(fixtures().join("peft_outputs.safetensors")).unwrap();
    let (mut lm, report) =
        PeftModel::from_pretrained(model, &fixtures().join("peft_adapter"), &peft_lora::registry()).unwrap();
    println!("{report}");
    // 2 layers × (query, value, attention.output.dense, intermediate.dense, output.dense); no pooler.
    assert_eq!(lm.lora_layers("default").unwrap().len(), 10);
    let err = worst_error(&lm, &tok, &reference);
    lm.disable_adapters().unwrap();
    let base_err = worst_error(&lm, &tok, &reference);
    lm.enable_adapters().unwrap();
    println!("PEFT adapter: max |ours - PEFT| = {err:.3e} (base model vs PEFT: {base_err:.3e})");
    assert!(err <= 1e-4, "{err}");
    assert!(base_err > 1e-2, "the adapter must matter: {base_err}");
    // Merged, too.
    lm.merge_adapter().unwrap();
    let merged = worst_error(&lm, &tok, &reference);
    println!("merged: {merged:.3e}");
    assert!(merged <= 1e-4, "{merged}");
}

#[test]
fn rust_saved_adapter_gives_the_same_outputs_in_peft() {
    let Some(model_dir) = require_asset("models/all-MiniLM-L6-v2") else {
        return;
    };
    let (model, tok) = load(&model_dir);
    let reference = SafeTensorsFile::open(fixtures().join("rust_outputs.safetensors")).unwrap();
    let (mut lm, report) =
        PeftModel::from_pretrained(model, &fixtures().join("rust_adapter"), &peft_lora::registry()).unwrap();
    assert!(report.is_clean(), "{report}");
    let err = worst_error(&lm, &tok, &reference);
    lm.disable_adapters().unwrap();
    let base_err = worst_error(&lm, &tok, &reference);
    println!("peft-rs adapter: max |ours - PEFT| = {err:.3e} (base model vs PEFT: {base_err:.3e})");
    assert!(err <= 1e-4, "{err}");
    assert!(base_err > 1e-2, "the adapter must matter: {base_err}");
}

#[test]
fn peft_adapter_load_save_is_byte_identical() {
    let Some(model_dir) = require_asset("models/all-MiniLM-L6-v2") else {
        return;
    };
    for sub in ["peft_adapter", "rust_adapter"] {
        let model = BertModel::load(&model_dir).unwrap();
        let (lm, _) = PeftModel::from_pretrained(model, &fixtures().join(sub), &peft_lora::registry()).unwrap();
        let out = tempfile::tempdir().unwrap();
        lm.save_pretrained(out.path()).unwrap();
        for f in [CONFIG_NAME, WEIGHTS_NAME] {
            let (a, b) =
                (std::fs::read(fixtures().join(sub).join(f)).unwrap(), std::fs::read(out.path().join(f)).unwrap());
            assert!(a == b, "{sub}/{f} differs after load -> save ({} vs {} bytes)", a.len(), b.len());
        }
    }
}

/// Writes `tests/fixtures/minilm/rust_adapter` (then run gen_minilm_interop.py for PEFT's outputs with it):
/// `cargo test -p peft-lora --test minilm_interop -- --ignored write_rust_adapter_fixture`.
#[test]
#[ignore = "regenerates a committed fixture"]
fn write_rust_adapter_fixture() {
    let Some(model_dir) = require_asset("models/all-MiniLM-L6-v2") else {
        return;
    };
    let model = BertModel::load(&model_dir).unwrap();
    let mut cfg = LoraConfig::new(4, 8.0, ["query", "value", "dense"]);
    cfg.layers_to_transform = Some(IntOrList::Many(vec![1, 3]));
    cfg.use_rslora = true;
    let lm = PeftModel::new(model, cfg, "default", 7).unwrap();
    // B starts at zero: give it small random values so the adapter changes the outputs.
    let init = RandomInit::new(11, 0.05);
    for p in lm.adapter_params("default").unwrap() {
        if p.name().contains("lora_B") {
            p.set(init.get(p.name(), &p.shape()).unwrap()).unwrap();
        }
    }
    let dir = fixtures().join("rust_adapter");
    lm.save_pretrained(&dir).unwrap();
    println!("wrote {}", dir.display());
}
