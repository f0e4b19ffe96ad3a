//! QLoRA on the real all-MiniLM-L6-v2: every encoder linear quantized to NF4 + DQ holds at most 0.52 bytes per
//! parameter (measured from the stored buffers, code tables included), and the quantized model's pooled output
//! stays close to the dense one.

use peft_core::adapter::PeftModel;
use peft_core::nn::Ctx;
use peft_core::testing::require_asset;
use peft_models::bert::{BertForSequenceClassification, Pooling};
use peft_models::tokenizer::TextTokenizer;
use peft_quant::{QloraConfig, QloraExt};

#[test]
fn minilm_nf4_dq_base_is_at_most_0_52_bytes_per_param() {
    let Some(dir) = require_asset("models/all-MiniLM-L6-v2") else { return };
    let tok = TextTokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let batch = tok.batch(&["a gripping, funny film", "dull and far too long"]).unwrap();
    let dense = BertForSequenceClassification::load(&dir, 2, Pooling::Mean, 0).unwrap();
    let model = BertForSequenceClassification::load(&dir, 2, Pooling::Mean, 0).unwrap();
    let q = PeftModel::new(model, QloraConfig::new(["query", "value"]), "default", 0).unwrap();
    let paths: Vec<String> = q.quantized_sites().iter().map(|s| s.path().to_string()).collect();
    assert_eq!(paths.len(), 36, "6 layers x (q, k, v, attention out, intermediate, output)");
    assert!(!paths.iter().any(|p| p.contains("pooler") || *p == "classifier"));
    let m = q.quant_memory();
    assert_eq!(m.params, 6 * (4 * 384 * 384 + 2 * 384 * 1536));
    let bpp = m.bytes_per_param();
    println!(
        "MiniLM NF4-DQ: {} bytes for {} params = {bpp:.4} bytes/param ({:.4} without maps)",
        m.bytes(),
        m.params,
        m.bytes_per_param_without_maps()
    );
    assert!(bpp <= 0.52, "{bpp}");
    // LoRA starts at B = 0: the outputs differ only by the quantisation error.
    let (hd, hq) = (dense.bert.forward(&batch, &Ctx::eval()).unwrap(), q.bert.forward(&batch, &Ctx::eval()).unwrap());
    let (a, b) = (hd.as_slice(), hq.as_slice());
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let cos = dot / (a.iter().map(|x| x * x).sum::<f32>().sqrt() * b.iter().map(|x| x * x).sum::<f32>().sqrt());
    println!("hidden-state cosine dense vs NF4-DQ: {cos:.5}");
    assert!(cos > 0.95, "{cos}");
}
