//! Low-bit LoRA on the real all-MiniLM-L6-v2 with the bench's placement (`"lora-1bit"`: r=8 on query/value, the
//! classifier head saved as `modules_to_save`): a few training steps, then the packed file (1-4 bits) is loaded
//! back with a bit-identical forward, and the file bytes are compared with the fp32 adapter file (printed; run
//! with `--nocapture`).

use peft_core::adapter::{PeftModel, TunerConfig};
use peft_core::nn::Ctx;
use peft_core::testing::require_asset;
use peft_models::bert::{BertForSequenceClassification, Pooling};
use peft_models::tokenizer::TextTokenizer;
use peft_quant::{LowBitLoraConfig, LowBitModelExt};

#[test]
fn minilm_lowbit_adapter_round_trips_and_is_smaller_than_fp32() {
    let Some(dir) = require_asset("models/all-MiniLM-L6-v2") else { return };
    let tok = TextTokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let batch = tok.batch(&["a gripping, funny film", "dull and far too long"]).unwrap();
    let registry_cfg = peft_quant::methods().into_iter().find(|m| m.name.0 == "lora-1bit").unwrap();
    let base = registry_cfg.config.as_any().downcast_ref::<LowBitLoraConfig>().unwrap().clone();
    for bits in 1..=4u8 {
        let mut cfg = LowBitLoraConfig { bits, ..base.clone() };
        cfg.set_modules_to_save(vec!["classifier".into()]).unwrap();
        let model = BertForSequenceClassification::load(&dir, 2, Pooling::Mean, 0).unwrap();
        let m = PeftModel::new(model, cfg, "default", 0).unwrap();
        let mut opt = peft_core::AdamW::with_lr(m.trainable_params(), 1e-2, 0.0).unwrap();
        for step in 0..3 {
            let loss = m.forward(&batch, &Ctx::train(step)).unwrap().cross_entropy(&[1, 0], None, 0.0).unwrap();
            let g = loss.backward().unwrap();
            drop(loss);
            peft_core::Optimizer::step(&mut opt, &g).unwrap();
        }
        let y0 = m.forward(&batch, &Ctx::eval()).unwrap();
        let (packed, fp32) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        m.save_lowbit(packed.path(), "default").unwrap();
        m.save_pretrained(fp32.path()).unwrap();
        let model = BertForSequenceClassification::load(&dir, 2, Pooling::Mean, 0).unwrap();
        let (m2, _) = PeftModel::from_pretrained(model, packed.path(), &peft_quant::registry()).unwrap();
        assert_eq!(m2.forward(&batch, &Ctx::eval()).unwrap().as_slice(), y0.as_slice(), "{bits} bits");
        let size = |d: &std::path::Path| std::fs::metadata(d.join("adapter_model.safetensors")).unwrap().len();
        let (p, f) = (size(packed.path()), size(fp32.path()));
        println!("MiniLM-L6 lora-{bits}bit adapter file (LoRA q,v r=8 + classifier f32): packed {p} B, fp32 {f} B");
        assert!(p * 5 < f, "{p} vs {f}");
    }
}
