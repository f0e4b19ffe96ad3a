//! The structured LoRA registry methods (`hydra`, `mos`, `mixlora`, `poly`) on the real MiniLM-L6 classifier
//! through `PeftModel` and the core trainer: each leaves the model output unchanged at init, lowers the SST-2
//! training loss in a few steps (MixLoRA's router loss added through the hooks), and saves.

use peft_core::adapter::PeftModel;
use peft_core::nn::Ctx;
use peft_core::testing::{max_abs_diff, require_asset};
use peft_core::train::{Loss, ScheduleKind, Trainer, TrainerConfig};
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
    let specs: Vec<_> =
        peft_lora::methods().into_iter().filter(|m| ["hydra", "mos", "mixlora", "poly"].contains(&m.name.0)).collect();
    assert_eq!(specs.len(), 4);
    for m in specs {
        let model = BertForSequenceClassification::new(BertModel::load(&dir).unwrap(), 2, Pooling::Mean, 0).unwrap();
        let y0 = model.forward(&batch, &Ctx::eval()).unwrap().to_vec();
        let mut cfg = m.config();
        cfg.set_modules_to_save(vec!["classifier".into()]).unwrap();
        let mut pm = PeftModel::wrap(model, 0);
        pm.add_adapter_boxed("default", cfg).unwrap();
        pm.set_adapter("default").unwrap();
        let eval_loss = || pm.loss(&batch, &labels, &Ctx::eval()).unwrap().item().unwrap();
        let y1 = pm.forward(&batch, &Ctx::eval()).unwrap().to_vec();
        assert!(max_abs_diff(&y0, &y1) < 1e-5, "{}: output changed at init", m.name);
        let before = eval_loss();
        // As before the port: AdamW at 4x the registry rate, constant, no clipping.
        let tc = TrainerConfig {
            lr: m.lr * 4.0,
            total_steps: 4,
            max_grad_norm: None,
            schedule: ScheduleKind::Constant,
            ..TrainerConfig::default()
        };
        let mut t = Trainer::new(pm.trainable_params(), &pm, tc).unwrap();
        for _ in 0..4 {
            t.step(|ctx: &mut Ctx| Ok(Loss::Single(pm.loss(&batch, &labels, ctx)?))).unwrap();
        }
        let after = eval_loss();
        let n: usize = pm.trainable_params().iter().map(peft_core::Param::numel).sum();
        println!("{}: {} trainable, loss {before:.4} -> {after:.4}", m.describe(), n);
        assert!(after < before - 0.01, "{}: {before} -> {after}", m.name);
        let out = tempfile::tempdir().unwrap();
        assert!(pm.save_pretrained(out.path()).unwrap() > 0);
        let (back, report) = PeftModel::from_pretrained(
            BertForSequenceClassification::new(BertModel::load(&dir).unwrap(), 2, Pooling::Mean, 0).unwrap(),
            out.path(),
            &peft_lora::registry(),
        )
        .unwrap();
        assert!(report.is_clean(), "{}: {report}", m.name);
        let y2 = back.forward(&batch, &Ctx::eval()).unwrap().to_vec();
        assert!(max_abs_diff(&y2, &pm.forward(&batch, &Ctx::eval()).unwrap().to_vec()) < 1e-5, "{}", m.name);
    }
}
