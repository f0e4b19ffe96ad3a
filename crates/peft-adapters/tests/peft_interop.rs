//! PEFT-written IA3, PREFIX_TUNING and PROMPT_TUNING adapters on the real all-MiniLM-L6-v2 (fixtures from
//! `tests/fixtures/gen_peft_minilm.py`, PEFT 0.21.2 + transformers 4.57.6): each loads with a clean report, gives
//! PEFT's last_hidden_state, and survives load -> save byte for byte; adapters saved here give, in PEFT, the outputs
//! they give here.

use std::path::{Path, PathBuf};

use peft_core::adapter::{PeftModel, CONFIG_NAME, WEIGHTS_NAME};
use peft_core::io::SafeTensorsFile;
use peft_core::nn::Ctx;
use peft_core::testing::require_asset;
use peft_models::bert::BertModel;
use peft_models::tokenizer::TextTokenizer;

/// The sentences of gen_peft_minilm.py.
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

/// Max |ours - PEFT| of last_hidden_state over the sentences (token ids checked equal first); `skip` leading
/// rows of PEFT's output (prompt tuning's virtual tokens) are not compared.
fn worst_error(model: &PeftModel<BertModel>, tok: &TextTokenizer, reference: &SafeTensorsFile, skip: usize) -> f32 {
    let mut worst = 0f32;
    for (i, s) in SENTENCES.iter().enumerate() {
        let b = tok.batch(&[s]).unwrap();
        let ids: Vec<usize> =
            reference.get_i64(&format!("s{i}.input_ids")).unwrap().iter().map(|&x| x as usize).collect();
        assert_eq!(b.input_ids, ids, "token ids of sentence {i}");
        let out = model.forward(&b, &Ctx::eval()).unwrap().to_vec();
        let want = reference.get(&format!("s{i}.last_hidden_state")).unwrap();
        let want = want.as_slice().unwrap();
        assert_eq!(want.len(), out.len() + skip * 384, "rows of sentence {i}");
        worst = worst.max(max_abs(&out, &want[skip * 384..]));
    }
    worst
}

/// Loads fixture `name` on MiniLM; returns the model, the tokenizer, PEFT's outputs.
fn load(name: &str) -> Option<(PeftModel<BertModel>, TextTokenizer, SafeTensorsFile)> {
    let dir = require_asset("models/all-MiniLM-L6-v2")?;
    let model = BertModel::load(&dir).unwrap();
    let tok = TextTokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let (pm, report) = PeftModel::from_pretrained(model, &fixtures().join(name), &peft_adapters::registry()).unwrap();
    println!("{name}: {report}");
    assert!(report.is_clean(), "{name}: {report}");
    let reference = SafeTensorsFile::open(fixtures().join(format!("{name}_outputs.safetensors"))).unwrap();
    Some((pm, tok, reference))
}

/// Ours vs PEFT with the adapter, and the base model vs PEFT (which must differ: the adapter matters).
fn errors(name: &str, skip: usize) -> Option<(f32, f32)> {
    let (mut pm, tok, reference) = load(name)?;
    let err = worst_error(&pm, &tok, &reference, skip);
    pm.disable_adapters().unwrap();
    let base = worst_error(&pm, &tok, &reference, skip);
    println!("{name}: max |ours - PEFT| = {err:.3e} (base model vs PEFT: {base:.3e})");
    Some((err, base))
}

#[test]
fn peft_ia3_gives_peft_outputs_unmerged_and_merged() {
    let Some((err, base)) = errors("ia3", 0) else { return };
    assert!(err <= 1e-4, "{err}");
    assert!(base > 1e-2, "the adapter must matter: {base}");
    let (mut pm, tok, reference) = load("ia3").unwrap();
    pm.merge_adapter().unwrap();
    let merged = worst_error(&pm, &tok, &reference, 0);
    println!("ia3 merged: {merged:.3e}");
    assert!(merged <= 1e-4, "{merged}");
}

#[test]
fn peft_prefix_tuning_gives_peft_outputs() {
    for name in ["prefix", "prefix_mlp"] {
        let Some((err, base)) = errors(name, 0) else { return };
        assert!(err <= 1e-4, "{name}: {err}");
        assert!(base > 1e-2, "{name}: the adapter must matter: {base}");
    }
}

#[test]
fn peft_prompt_tuning_gives_peft_outputs() {
    // PEFT's output has the 4 virtual tokens in front; ours strips them (pooling and heads see the usual rows).
    let Some((err, base)) = errors("prompt", 4) else { return };
    assert!(err <= 1e-4, "{err}");
    assert!(base > 1e-2, "the adapter must matter: {base}");
}

#[test]
fn peft_files_survive_load_save_byte_for_byte() {
    let Some(dir) = require_asset("models/all-MiniLM-L6-v2") else { return };
    for name in ["ia3", "prefix", "prefix_mlp", "prompt"] {
        let model = BertModel::load(&dir).unwrap();
        let (pm, _) = PeftModel::from_pretrained(model, &fixtures().join(name), &peft_adapters::registry()).unwrap();
        let out = tempfile::tempdir().unwrap();
        pm.save_pretrained(out.path()).unwrap();
        for f in [CONFIG_NAME, WEIGHTS_NAME] {
            let (a, b) =
                (std::fs::read(fixtures().join(name).join(f)).unwrap(), std::fs::read(out.path().join(f)).unwrap());
            assert!(a == b, "{name}/{f} differs after load -> save ({} vs {} bytes)", a.len(), b.len());
        }
    }
}

/// The adapters peft-rs writes for the reverse check (`rust_*` fixture folders).
fn rust_configs() -> Vec<(&'static str, Box<dyn peft_core::adapter::TunerConfig>)> {
    use peft_adapters::ia3::Ia3Config;
    use peft_adapters::prefix::PrefixTuningConfig;
    use peft_adapters::prompt::PromptTuningConfig;
    vec![
        // N(0, 1) vectors (PEFT's `init_ia3_weights=False`) so the adapter matters.
        ("rust_ia3", Box::new(Ia3Config { init_ia3_weights: false, ..Ia3Config::bert() })),
        ("rust_prefix", Box::new(PrefixTuningConfig::p_tuning_v2(4))),
        ("rust_prompt", Box::new(PromptTuningConfig::new(3))),
    ]
}

#[test]
fn rust_saved_adapters_give_the_same_outputs_in_peft() {
    for (name, _) in rust_configs() {
        let Some((err, base)) = errors(name, if name == "rust_prompt" { 3 } else { 0 }) else { return };
        assert!(err <= 1e-4, "{name}: {err}");
        assert!(base > 1e-2, "{name}: the adapter must matter: {base}");
    }
}

/// Writes `tests/fixtures/minilm/rust_*` (then run gen_peft_minilm.py for PEFT's outputs with them). Ignored: it
/// regenerates committed fixtures.
#[test]
#[ignore = "regenerates committed fixtures"]
fn write_rust_adapter_fixtures() {
    let Some(dir) = require_asset("models/all-MiniLM-L6-v2") else { return };
    for (i, (name, cfg)) in rust_configs().into_iter().enumerate() {
        let mut pm = PeftModel::wrap(BertModel::load(&dir).unwrap(), 7 + i as u64);
        pm.add_adapter_boxed("default", cfg).unwrap();
        pm.save_pretrained(&fixtures().join(name)).unwrap();
    }
}
