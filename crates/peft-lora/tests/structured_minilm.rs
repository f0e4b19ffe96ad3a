//! The structured LoRA registry methods (`hydra`, `mos`, `mixlora`, `poly`) on the real MiniLM-L6 classifier: each leaves
//! the model output unchanged at prepare, lowers the SST-2 training loss in a few AdamW steps, and saves.
//!
//! MIGRATING (issue 12): compiled out until hydra/mos/mixlora/poly are ported onto `PeftModel`; the port
//! rewrites this test on the registry.
#![cfg(any())]

use peft_core::nn::Ctx;
use peft_core::testing::require_asset;
use peft_core::{AdamW, Optimizer};
use peft_models::bert::{BertForSequenceClassification, BertModel, Pooling};
use peft_models::tokenizer::TextTokenizer;

#[test]
fn structured_methods_train_minilm_on_sst2() {
    let (Some(dir), Some(tsv)) = (require_asset("models/all-MiniLM-L6-v2"), require_asset("data/glue/SST-2/train.tsv"))
    else {
        return;
    };
    let text = std::fs::read_to_string(tsv).unwrap();
    let rows: Vec<(&str, f32)> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once('\t'))
        .map(|(s, y)| (s.trim(), y.trim().parse::<f32>().unwrap()))
        .take(16)
        .collect();
    let mut tok = TextTokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tok.set_max_length(Some(32)).unwrap();
    let texts: Vec<&str> = rows.iter().map(|r| r.0).collect();
    let labels: Vec<f32> = rows.iter().map(|r| r.1).collect();
    let batch = tok.batch(&texts).unwrap();
    for m in peft_lora::struct_methods::methods_for(&["query", "value"]) {
        let model = BertForSequenceClassification::new(BertModel::load(&dir).unwrap(), 2, Pooling::Mean, 0).unwrap();
        let eval_loss = || model.loss(&batch, &labels, &Ctx::eval()).unwrap().item().unwrap();
        let before = eval_loss();
        let prep = m.prepare(&model, &model.classifier.base().params()).unwrap();
        let at_init = eval_loss();
        assert!((at_init - before).abs() < 1e-5, "{}: {before} vs {at_init} at init", m.name());
        let mut opt = AdamW::with_lr(prep.trainable(), m.default_lr() * 4.0, 0.0).unwrap();
        for step in 0..4 {
            let loss = model.loss(&batch, &labels, &Ctx::train(step)).unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads).unwrap();
        }
        let after = eval_loss();
        let n: usize = prep.trainable().iter().map(peft_core::Param::numel).sum();
        println!("{}: {} trainable, loss {before:.4} -> {after:.4}", m.describe(), n);
        assert!(after < before - 0.01, "{}: {before} -> {after}", m.name());
        let out = tempfile::tempdir().unwrap();
        assert!(prep.save(out.path()).unwrap() > 0);
    }
}
