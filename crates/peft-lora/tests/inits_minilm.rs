//! Each data-driven / structured init runs on the real MiniLM-L6 with SST-2 calibration batches: the init
//! completes, base-equivalent inits keep the logits, and one training step on the prepared parameters works.

use peft_core::nn::{named_params, Ctx};
use peft_core::testing::max_abs_diff;
use peft_core::testing::require_asset;
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
    for m in peft_lora::init_methods::init_methods_for(&["query", "value"]) {
        let model = BertForSequenceClassification::new(BertModel::load(&dir).unwrap(), 2, Pooling::Mean, 0).unwrap();
        let head: Vec<_> = named_params(&model).into_iter().filter(|p| p.name().starts_with("classifier")).collect();
        let y0 = model.forward(&chunks[0].0, &Ctx::eval()).unwrap().to_vec();
        let mut calib = |i: usize| -> peft_core::Result<Option<peft_core::Tensor>> {
            let Some((b, y)) = chunks.get(i) else { return Ok(None) };
            model.loss(b, y, &Ctx::train(i as u64)).map(Some)
        };
        let t = std::time::Instant::now();
        let prep = m.prepare_calibrated(&model, &head, &mut calib).unwrap();
        let secs = t.elapsed().as_secs_f64();
        let y1 = model.forward(&chunks[0].0, &Ctx::eval()).unwrap().to_vec();
        let diff = max_abs_diff(&y0, &y1);
        println!("{}: init {secs:.2} s, max |Δlogit| at init {diff:.2e}", m.describe());
        if m.name() != "lora-sb" {
            assert!(diff < 1e-3, "{}: not base-equivalent ({diff})", m.name());
        }
        let mut opt = AdamW::with_lr(prep.trainable(), m.default_lr(), 0.0).unwrap();
        let loss = model.loss(&chunks[1].0, &chunks[1].1, &Ctx::train(0)).unwrap();
        let g = loss.backward().unwrap();
        assert!(loss.item().unwrap().is_finite());
        drop(loss);
        opt.step(&g).unwrap();
    }
}
