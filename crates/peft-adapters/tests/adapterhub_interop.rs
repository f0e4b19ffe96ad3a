//! AdapterHub-written bottleneck adapters on the real all-MiniLM-L6-v2 (fixtures from
//! `tests/fixtures/gen_adapterhub_minilm.py`, adapters 1.3.0 + transformers 4.57.6): SeqBn (Pfeiffer), DoubleSeqBn
//! (Houlsby), ParBn and a SeqBn with reduction 12, GELU and dropout each load with a clean report, give AdapterHub's
//! last_hidden_state, and are written back by `adapterhub::save` byte for byte (config and weights).

use std::path::{Path, PathBuf};

use peft_adapters::adapterhub::{self, CONFIG_FILE, WEIGHTS_FILE};
use peft_adapters::bottleneck::BottleneckConfig;
use peft_core::adapter::PeftModel;
use peft_core::io::SafeTensorsFile;
use peft_core::nn::Ctx;
use peft_core::testing::require_asset;
use peft_models::bert::BertModel;
use peft_models::tokenizer::TextTokenizer;

/// The sentences of gen_adapterhub_minilm.py.
const SENTENCES: [&str; 3] = [
    "A man is playing a guitar.",
    "Parameter-efficient fine-tuning adapts large models cheaply.",
    "The quick brown fox jumps over the lazy dog!",
];

const NAMES: [&str; 4] = ["seq_bn", "double_seq_bn", "par_bn", "seq_bn_r12"];

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adapterhub")
}

/// Max |ours - AdapterHub| of last_hidden_state over the sentences (token ids checked equal first).
fn worst_error(model: &PeftModel<BertModel>, tok: &TextTokenizer, reference: &SafeTensorsFile) -> f32 {
    let mut worst = 0f32;
    for (i, s) in SENTENCES.iter().enumerate() {
        let b = tok.batch(&[s]).unwrap();
        let ids: Vec<usize> =
            reference.get_i64(&format!("s{i}.input_ids")).unwrap().iter().map(|&x| x as usize).collect();
        assert_eq!(b.input_ids, ids, "token ids of sentence {i}");
        let out = model.forward(&b, &Ctx::eval()).unwrap().to_vec();
        let want = reference.get(&format!("s{i}.last_hidden_state")).unwrap();
        let want = want.as_slice().unwrap();
        assert_eq!(want.len(), out.len());
        worst = worst.max(out.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max));
    }
    worst
}

#[test]
fn adapterhub_bottleneck_adapters_give_adapterhub_outputs() {
    let Some(dir) = require_asset("models/all-MiniLM-L6-v2") else { return };
    let tok = TextTokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    for name in NAMES {
        let mut pm = PeftModel::wrap(BertModel::load(&dir).unwrap(), 0);
        let (meta, report) = adapterhub::load(&mut pm, &fixtures().join(name), "a").unwrap();
        assert!(report.is_clean() && !report.applied.is_empty(), "{name}: {report}");
        assert_eq!(meta.name, name);
        pm.set_adapter("a").unwrap();
        let reference = SafeTensorsFile::open(fixtures().join(format!("{name}_outputs.safetensors"))).unwrap();
        let err = worst_error(&pm, &tok, &reference);
        pm.disable_adapters().unwrap();
        let base = worst_error(&pm, &tok, &reference);
        println!("{name}: max |ours - AdapterHub| = {err:.3e} (base model vs AdapterHub: {base:.3e})");
        assert!(err <= 1e-4, "{name}: {err}");
        assert!(base > 1e-2, "{name}: the adapter must matter: {base}");
        let cfg = pm.config("a").unwrap().as_any().downcast_ref::<BottleneckConfig>().unwrap().clone();
        assert!(cfg.dropout_on_output, "{name}: AdapterHub drops the adapter output");
    }
}

#[test]
fn adapterhub_folders_survive_load_save_byte_for_byte() {
    let Some(dir) = require_asset("models/all-MiniLM-L6-v2") else { return };
    for name in NAMES {
        let mut pm = PeftModel::wrap(BertModel::load(&dir).unwrap(), 0);
        let (meta, _) = adapterhub::load(&mut pm, &fixtures().join(name), "x").unwrap();
        let out = tempfile::tempdir().unwrap();
        adapterhub::save(&pm, "x", out.path(), &meta).unwrap();
        for f in [CONFIG_FILE, WEIGHTS_FILE] {
            let (a, b) =
                (std::fs::read(fixtures().join(name).join(f)).unwrap(), std::fs::read(out.path().join(f)).unwrap());
            assert!(a == b, "{name}/{f}: {} vs {} bytes differ", a.len(), b.len());
        }
    }
}

/// A Houlsby adapter's file read into a model that has a classification head in front of the sites (keys with a
/// `bert.` prefix, as AdapterHub writes them for `BertForSequenceClassification`) maps to the same sites.
#[test]
fn a_model_prefix_in_the_keys_is_dropped() {
    let Some(dir) = require_asset("models/all-MiniLM-L6-v2") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let src = SafeTensorsFile::open(fixtures().join("double_seq_bn").join(WEIGHTS_FILE)).unwrap();
    let renamed: Vec<(String, ndarray::ArrayD<f32>)> =
        src.names().map(|k| (format!("bert.{k}"), src.get(k).unwrap())).collect();
    peft_core::io::safetensors::write_safetensors(
        tmp.path().join(WEIGHTS_FILE),
        renamed.iter().map(|(k, v)| (k, v)),
        None,
    )
    .unwrap();
    std::fs::copy(fixtures().join("double_seq_bn").join(CONFIG_FILE), tmp.path().join(CONFIG_FILE)).unwrap();
    let mut a = PeftModel::wrap(BertModel::load(&dir).unwrap(), 0);
    let mut b = PeftModel::wrap(BertModel::load(&dir).unwrap(), 0);
    let (_, ra) = adapterhub::load(&mut a, &fixtures().join("double_seq_bn"), "h").unwrap();
    let (_, rb) = adapterhub::load(&mut b, tmp.path(), "h").unwrap();
    assert!(rb.is_clean() && rb.applied.len() == ra.applied.len(), "{rb}");
    assert_eq!(a.state_dict("h").unwrap(), b.state_dict("h").unwrap());
}
