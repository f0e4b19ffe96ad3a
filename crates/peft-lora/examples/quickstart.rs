//! Quickstart: LoRA on MiniLM-L6 for SST-2 sentiment, trained a few steps, saved as a PEFT adapter, reloaded.
//!
//! ```text
//! cargo run -p peft-lora --example quickstart
//! ```
//! Needs the asset pack (`PEFT_ASSETS`, or `../shared/assets`; `cargo xtask assets` says what is missing).

use peft_core::adapter::{get_peft_model, PeftModel};
use peft_core::nn::Ctx;
use peft_core::train::{Loss, Trainer, TrainerConfig};
use peft_lora::LoraConfig;
use peft_models::bert::{BertForSequenceClassification, Pooling};
use peft_models::tokenizer::TextTokenizer;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let assets = peft_core::io::assets_dir().ok_or("asset pack not found: set PEFT_ASSETS")?;
    let dir = assets.join("models/all-MiniLM-L6-v2");
    let base = BertForSequenceClassification::load(&dir, 2, Pooling::Mean, 0)?;

    // PEFT's `get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))`.
    let mut config = LoraConfig::new(8, 16.0, ["query", "value"]);
    config.modules_to_save = Some(vec!["classifier".into()]);
    let model = get_peft_model(base, config)?;
    println!("{}", model.trainable_summary());

    // 32 SST-2 training sentences, one batch.
    let tsv = std::fs::read_to_string(assets.join("data/glue/SST-2/train.tsv"))?;
    let rows: Vec<(&str, f32)> = tsv
        .lines()
        .skip(1)
        .take(32)
        .filter_map(|l| l.split_once('\t'))
        .map(|(s, y)| (s, y.trim().parse().unwrap_or(0.0)))
        .collect();
    let tok = TextTokenizer::from_file(dir.join("tokenizer.json"))?;
    let batch = tok.batch(&rows.iter().map(|r| r.0).collect::<Vec<_>>())?;
    let labels: Vec<f32> = rows.iter().map(|r| r.1).collect();

    let cfg = TrainerConfig { lr: 2e-3, total_steps: 10, ..TrainerConfig::default() };
    let mut trainer = Trainer::new(model.trainable_params(), &model, cfg)?;
    for _ in 0..10 {
        let r = trainer.step(|ctx| Ok(Loss::Single(model.loss(&batch, &labels, ctx)?)))?;
        println!("step {:2}  loss {:.4}", r.step, r.loss);
    }
    drop(trainer);

    let out = std::env::temp_dir().join("peft-rs-quickstart");
    model.save_pretrained(&out)?; // adapter_config.json + adapter_model.safetensors, as PEFT writes them
    let fresh = BertForSequenceClassification::load(&dir, 2, Pooling::Mean, 1)?; // another random head
    let (reloaded, report) = PeftModel::from_pretrained(fresh, &out, &peft_lora::registry())?;
    let (a, b) = (model.forward(&batch, &Ctx::eval())?, reloaded.forward(&batch, &Ctx::eval())?);
    let diff = a.as_slice().iter().zip(b.as_slice()).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    println!("saved to {}; reloaded ({report}); max |logit difference| = {diff:e}", out.display());
    assert!(diff < 1e-5, "the reloaded adapter must reproduce the trained model");
    Ok(())
}
