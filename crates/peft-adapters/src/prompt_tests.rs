use ndarray::{ArrayD, IxDyn};
use peft_core::adapter::{PeftModel, CONFIG_NAME, WEIGHTS_NAME};
use peft_core::nn::Ctx;
use peft_core::testing::max_abs_diff;
use peft_core::Tensor;
use peft_models::bert::BertModel;
use peft_models::tokenizer::Batch;

use super::*;
use crate::testutil::{batch, fd_check, out, tiny, weighted_sum, D};

type Model = PeftModel<BertModel>;

fn tuner(m: &Model) -> &PromptTuningTuner {
    m.tuner("default").unwrap().as_any().downcast_ref::<PromptTuningTuner>().unwrap()
}

fn model(n: usize) -> Model {
    PeftModel::new(tiny(0), PromptTuningConfig::new(n), "default", 0).unwrap()
}

/// The prompted forward written out as PEFT runs it on BERT: the prompt in front of the word embeddings, positions
/// `0..P+L` and token type 0 for the prompt added, the embedding LayerNorm over all, the prompt valid in the mask,
/// the layers, the prompt positions dropped.
fn by_hand(m: &BertModel, prompt: &ArrayD<f32>, b: &Batch) -> Vec<f32> {
    let ctx = Ctx::eval();
    let [bs, l] = b.shape;
    let p = prompt.shape()[0];
    let e = &m.embeddings;
    let words = e.word.forward(&b.input_ids, &[bs, l]).unwrap();
    let pt = Tensor::new(prompt.clone()).unsqueeze(0).unwrap().broadcast_to(&[bs, p, D]).unwrap();
    let x = Tensor::concat(&[&pt, &words], 1).unwrap();
    let pos = e.position.forward(&(0..p + l).collect::<Vec<_>>(), &[1, p + l]).unwrap();
    let types: Vec<usize> =
        b.token_type_ids.chunks(l).flat_map(|r| std::iter::repeat_n(0, p).chain(r.iter().copied())).collect();
    let x = x.add(&pos).unwrap().add(&e.token_type.forward(&types, &[bs, p + l]).unwrap()).unwrap();
    let mut h = e.norm.forward(&x).unwrap();
    let mask =
        ArrayD::from_shape_fn(IxDyn(&[bs, p + l]), |ix| ix[1] < p || b.attention_mask[ix[0] * l + ix[1] - p] != 0);
    for layer in &m.layers {
        h = layer.forward(&h, Some(&mask), &ctx).unwrap();
    }
    h.narrow(1, p, l).unwrap().to_vec()
}

#[test]
fn the_prompt_enters_the_first_layer_and_is_stripped_from_the_outputs() {
    let m = model(3);
    let table = tuner(&m).encoder().table().value().to_owned();
    let base = tiny(0);
    let got = m.forward(&batch(), &Ctx::eval()).unwrap();
    assert_eq!(got.shape(), &[2, 4, D], "outputs keep their positions");
    assert!(max_abs_diff(&got.to_vec(), &by_hand(&base, &table, &batch())) < 1e-5);
    assert!(max_abs_diff(&got.to_vec(), &out(&base)) > 1e-3, "the attention sees the prompt");
    assert_eq!(tuner(&m).sites().len(), 1, "one site: the first layer's");
    assert_eq!(m.param_counts().0, 3 * D);
}

#[test]
fn disabled_it_is_the_base_model_and_padding_still_does_not_leak() {
    let mut m = model(2);
    let one = Batch::from_rows(&[vec![1, 7, 2]]).unwrap();
    let single = m.forward(&one, &Ctx::eval()).unwrap().to_vec();
    let full = out(&m);
    // Row 1 of `batch()` is `[1, 7, 2]` plus one padding token: its real positions match the unpadded row.
    assert!(max_abs_diff(&single, &full[4 * D..7 * D]) < 1e-5);
    m.disable_adapters().unwrap();
    assert_eq!(out(&m), out(&tiny(0)));
}

#[test]
fn gradients_match_finite_differences() {
    let m = model(2);
    let params = tuner(&m).params();
    fd_check(&|| weighted_sum(&m, &Ctx::eval()), &params, 1e-2, 2e-2);
}

#[test]
fn sample_vocab_copies_word_embedding_rows_and_text_is_refused() {
    let cfg = PromptTuningConfig { prompt_tuning_init: PromptTuningInit::SampleVocab, ..PromptTuningConfig::new(4) };
    let m = PeftModel::new(tiny(0), cfg, "default", 0).unwrap();
    let emb =
        m.base_params().iter().find(|p| p.name() == "embeddings.word_embeddings.weight").unwrap().value().to_owned();
    let table = tuner(&m).encoder().table().value().to_owned();
    for row in table.outer_iter() {
        assert!(emb.outer_iter().any(|e| e == row), "every prompt row is a vocabulary row");
    }
    let text = PromptTuningConfig { prompt_tuning_init: PromptTuningInit::Text, ..PromptTuningConfig::new(4) };
    assert!(matches!(text.check_init(), Err(AdaptersError::Unsupported { .. })));
    assert!(PeftModel::new(tiny(0), text, "default", 0).is_err());
    assert!(PromptTuningConfig::new(0).validate().is_err());
    let wrong = PromptTuningConfig { token_dim: Some(5), ..PromptTuningConfig::new(2) };
    assert!(PeftModel::new(tiny(0), wrong, "default", 0).is_err(), "token_dim must agree with the model");
}

#[test]
fn saved_files_have_peft_keys_and_round_trip_byte_identical() {
    let m = model(3);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    m.save_pretrained(&a).unwrap();
    let cfg: Value = serde_json::from_slice(&std::fs::read(a.join(CONFIG_NAME)).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "PROMPT_TUNING");
    assert_eq!(cfg["prompt_tuning_init"], "RANDOM");
    for (k, v) in [
        ("num_virtual_tokens", 3),
        ("token_dim", D),
        ("num_transformer_submodules", 1),
        ("num_attention_heads", 2),
        ("num_layers", 2),
    ] {
        assert_eq!(cfg[k], v, "{k}");
    }
    let sd = m.state_dict("default").unwrap();
    assert_eq!(sd.keys().collect::<Vec<_>>(), ["prompt_embeddings"]);
    assert_eq!(sd["prompt_embeddings"].shape(), &[3, D]);
    let (loaded, report) = PeftModel::from_pretrained(tiny(0), &a, &crate::registry()).unwrap();
    assert!(report.unexpected.is_empty() && report.ignored_config.is_empty(), "{report:?}");
    assert_eq!(out(&loaded), out(&m));
    loaded.save_pretrained(&b).unwrap();
    for f in [CONFIG_NAME, WEIGHTS_NAME] {
        assert_eq!(std::fs::read(a.join(f)).unwrap(), std::fs::read(b.join(f)).unwrap(), "{f}");
    }
}
