//! Fine-tuning smoke test: MiniLM with a fresh classifier, backbone frozen, four AdamW steps on 32 SST-2
//! sentences; the training-set loss must go down.

use peft_core::nn::{named_params, Ctx};
use peft_core::testing::require_asset;
use peft_core::{AdamW, Optimizer};
use peft_models::bert::{BertForSequenceClassification, BertModel, Pooling};
use peft_models::tokenizer::TextTokenizer;

#[test]
fn head_only_training_lowers_sst2_loss() {
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
        .take(32)
        .collect();
    assert_eq!(rows.len(), 32);
    let mut tok = TextTokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tok.set_max_length(Some(64)).unwrap();
    let texts: Vec<&str> = rows.iter().map(|r| r.0).collect();
    let labels: Vec<f32> = rows.iter().map(|r| r.1).collect();
    let batch = tok.batch(&texts).unwrap();

    let model = BertForSequenceClassification::new(BertModel::load(&dir).unwrap(), 2, Pooling::Mean, 0).unwrap();
    let trainable: Vec<_> = named_params(&model).into_iter().filter(|p| p.trainable()).collect();
    let names: Vec<&str> = trainable.iter().map(|p| p.name()).collect();
    assert_eq!(names, ["classifier.weight", "classifier.bias"]);
    let mut opt = AdamW::with_lr(trainable, 5e-2, 0.0).unwrap();

    let eval_loss = || model.loss(&batch, &labels, &Ctx::eval()).unwrap().item().unwrap();
    let before = eval_loss();
    for step in 0..4 {
        let loss = model.loss(&batch, &labels, &Ctx::train(step)).unwrap();
        let grads = loss.backward().unwrap();
        opt.step(&grads).unwrap();
    }
    let after = eval_loss();
    println!("SST-2 head-only: loss {before:.4} -> {after:.4} over 4 steps (batch {:?})", batch.shape);
    assert!(after < before - 0.02, "loss did not decrease: {before} -> {after}");
}
