//! Each data-driven / structured init runs on the real MiniLM-L6 with SST-2 calibration batches: the init
//! completes, base-equivalent inits keep the logits, and one training step on the prepared parameters works.

use peft_core::adapter::PeftModel;
use peft_core::nn::{Ctx, TokenMask};
use peft_core::testing::max_abs_diff;
use peft_core::testing::require_asset;
use peft_core::train::calibration_ctx;
use peft_core::{AdamW, Optimizer};
use peft_models::bert::{BertForSequenceClassification, BertModel, Pooling};
use peft_models::tokenizer::TextTokenizer;

#[test]
fn each_init_runs_on_minilm() {
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
        .take(24)
        .collect();
    let mut tok = TextTokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tok.set_max_length(Some(32)).unwrap();
    let chunks: Vec<_> = rows
        .chunks(8)
        .map(|c| {
            let texts: Vec<&str> = c.iter().map(|r| r.0).collect();
            (tok.batch(&texts).unwrap(), c.iter().map(|r| r.1).collect::<Vec<f32>>())
        })
        .collect();
    let specs: Vec<_> =
        peft_lora::methods().into_iter().filter(|m| ["corda", "eva", "loldu", "lora-sb"].contains(&m.name.0)).collect();
    assert!(specs.len() >= 2, "corda and eva at least");
    for m in specs {
        let model = BertForSequenceClassification::new(BertModel::load(&dir).unwrap(), 2, Pooling::Mean, 0).unwrap();
        let y0 = model.forward(&chunks[0].0, &Ctx::eval()).unwrap().to_vec();
        let mut cfg = m.config();
        cfg.set_modules_to_save(vec!["classifier".into()]).unwrap();
        let mut pm = PeftModel::wrap(model, 0);
        let t = std::time::Instant::now();
        // Calibration as the bench runs it: evaluation mode, padding masked.
        let mut calib =
            |model: &BertForSequenceClassification, i: usize| -> peft_core::Result<Option<peft_core::Tensor>> {
                let Some((b, y)) = chunks.get(i) else { return Ok(None) };
                let mask = TokenMask { valid: b.attention_mask.iter().map(|&v| v != 0).collect(), shape: b.shape };
                model.loss(b, y, &calibration_ctx(Some(mask))).map(Some)
            };
        pm.add_adapter_calibrated("default", cfg, &mut calib).unwrap();
        pm.set_adapter("default").unwrap();
        let secs = t.elapsed().as_secs_f64();
        let y1 = pm.forward(&chunks[0].0, &Ctx::eval()).unwrap().to_vec();
        let diff = max_abs_diff(&y0, &y1);
        println!("{}: init {secs:.2} s, max |Δlogit| at init {diff:.2e}", m.describe());
        if m.name.0 != "lora-sb" {
            assert!(diff < 1e-3, "{}: not base-equivalent ({diff})", m.name);
        }
        let mut opt = AdamW::with_lr(pm.trainable_params(), m.lr, 0.0).unwrap();
        let loss = pm.loss(&chunks[1].0, &chunks[1].1, &Ctx::train(0)).unwrap();
        let g = loss.backward().unwrap();
        assert!(loss.item().unwrap().is_finite());
        drop(loss);
        opt.step(&g).unwrap();
    }
}
