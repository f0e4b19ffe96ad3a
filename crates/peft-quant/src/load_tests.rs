use super::*;
use crate::block4::Quant4Config;
use crate::linear::quantize_linear_sites;
use crate::qlora::QloraConfig;
use peft_core::adapter::{ModulePattern, PeftModel};
use peft_core::nn::{linear_sites, Ctx, Dense, MapWeights};
use peft_models::llama::{Llama, LlamaSpec};

/// A 2-layer LLaMA with GQA; `tied`: `lm_head` shares the embedding (SmolLM2), else it is loaded.
fn spec(tied: bool) -> LlamaSpec {
    LlamaSpec {
        vocab: 48,
        hidden: 64,
        intermediate: 96,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 16,
        eps: 1e-5,
        rope_theta: 10_000.0,
        max_positions: 64,
        tie_embeddings: tied,
        bos: None,
        eos: vec![],
    }
}

/// Every parameter of a random model of `spec`, as a dense checkpoint.
fn dense_weights(spec: &LlamaSpec) -> MapWeights {
    let m = Llama::random(spec, 7, 0.05).unwrap();
    MapWeights(named_params(&m).into_iter().map(|p| (p.name().to_string(), p.value().to_owned())).collect())
}

fn formats() -> Vec<QuantFormat> {
    vec![
        QuantFormat::default(),
        QuantFormat::Block4(Quant4Config { quant_type: QuantType::Fp4, blocksize: 32, double_quant: false }),
        QuantFormat::Int8,
        // LQ-LoRA's NF-b storage (this crate's keys; 3 bits, bf16 group maxes, blocks that do not divide a row).
        QuantFormat::Nf(crate::NfQuant {
            bits: 3,
            scale_bits: 6,
            block: 24,
            group: 5,
            group_dtype: crate::FloatDtype::Bf16,
        }),
    ]
}

fn all_linear() -> peft_core::adapter::TargetSpec {
    peft_core::adapter::TargetSpec::new(&ModulePattern::Regex("all-linear".into()), None, None, None, &[]).unwrap()
}

/// `(path, quantized weight)` of every quantized site, in visit order.
fn quant_weights(m: &dyn Module) -> Vec<(String, Arc<QuantWeight>)> {
    quantized_sites(m)
        .iter()
        .map(|s| {
            let b = s.base();
            (s.path().to_string(), b.as_any().downcast_ref::<QuantLinear>().unwrap().weight())
        })
        .collect()
}

fn logits(m: &Llama) -> Vec<f32> {
    let ids = [1, 5, 9, 2, 47, 0];
    m.forward(&ids, [2, 3], None, &Ctx::eval()).unwrap().as_slice().to_vec()
}

fn dense_then_quantize(spec: &LlamaSpec, src: &MapWeights, fmt: &QuantFormat) -> Llama {
    let m = Llama::load(spec, src).unwrap();
    quantize_linear_sites(&m, &all_linear(), fmt).unwrap();
    m
}

#[test]
fn quantizing_while_loading_is_bit_identical_to_quantizing_the_dense_model() {
    let spec = spec(true);
    let src = dense_weights(&spec);
    for fmt in formats() {
        let reference = dense_then_quantize(&spec, &src, &fmt);
        let on_load = QuantizeOnLoad::new(&src, fmt);
        let m = Llama::load(&spec, &on_load).unwrap();
        let (a, b) = (quant_weights(&reference), quant_weights(&m));
        // 7 linears per layer; the tied lm_head is never loaded as a linear.
        assert_eq!(a.len(), 14, "{fmt:?}");
        // Load order (MLP before attention in a decoder layer) differs from visit order.
        let mut loaded = on_load.quantized();
        let mut visited: Vec<String> = a.iter().map(|(p, _)| p.clone()).collect();
        loaded.sort();
        visited.sort();
        assert_eq!(loaded, visited);
        for ((pa, wa), (pb, wb)) in a.iter().zip(&b) {
            assert_eq!(pa, pb);
            assert_eq!(wa, wb, "{fmt:?} {pa}: codes and scales must be identical");
        }
        assert_eq!(logits(&reference), logits(&m), "{fmt:?}");
    }
}

#[test]
fn loading_a_bnb_checkpoint_gives_the_stored_codes_bit_for_bit() {
    for tied in [true, false] {
        let spec = spec(tied);
        let src = dense_weights(&spec);
        for fmt in formats() {
            let reference = dense_then_quantize(&spec, &src, &fmt);
            let ckpt = bnb_checkpoint(&reference).unwrap();
            // A 4-bit entry per quantized linear, with bnb's keys.
            if matches!(fmt, QuantFormat::Block4(_)) {
                assert_eq!(ckpt.quant4_modules().len(), 14);
            }
            assert!(ckpt.get("model.embed_tokens.weight").is_some());
            assert!(ckpt.get("model.layers.0.self_attn.q_proj.weight").is_some());
            assert_eq!(ckpt.get("lm_head.weight").is_some(), !tied, "the tied head is the embedding");
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("model.safetensors");
            ckpt.write(&path).unwrap();
            let read = Checkpoint::read(&path).unwrap();
            let m = Llama::load(&spec, &BnbWeights::new(&read, path.display().to_string())).unwrap();
            let (a, b) = (quant_weights(&reference), quant_weights(&m));
            assert_eq!(a.len(), 14);
            assert_eq!(a, b, "{fmt:?} tied={tied}");
            // Dense parameters (embeddings, norms, an untied head) round-trip exactly as f32.
            let dense = |m: &Llama| {
                let mut v: Vec<(String, Vec<f32>)> = named_params(m)
                    .iter()
                    .map(|p| (p.name().to_string(), p.value().iter().copied().collect()))
                    .collect();
                v.sort_by(|x, y| x.0.cmp(&y.0));
                v
            };
            assert_eq!(dense(&reference), dense(&m));
            assert_eq!(logits(&reference), logits(&m), "{fmt:?} tied={tied}");
            if !tied {
                assert!(m.lm_head.base().as_any().downcast_ref::<Dense>().is_some(), "lm_head stays dense");
            }
        }
    }
}

#[test]
fn output_layers_stay_dense_and_keep_dense_is_configurable() {
    let spec = spec(false);
    let src = dense_weights(&spec);
    let on_load = QuantizeOnLoad::new(&src, QuantFormat::default());
    let m = Llama::load(&spec, &on_load).unwrap();
    assert!(m.lm_head.base().as_any().downcast_ref::<Dense>().is_some());
    assert!(!on_load.quantized().iter().any(|p| p == "lm_head"));
    let only_attn = QuantizeOnLoad::new(&src, QuantFormat::default()).keep_dense(["lm_head", "gate_proj", "up_proj"]);
    let m = Llama::load(&spec, &only_attn).unwrap();
    let q: Vec<String> = quantized_sites(&m).iter().map(|s| s.path().to_string()).collect();
    assert_eq!(q.len(), 2 * 5, "q, k, v, o and down_proj per layer: {q:?}");
    assert!(q.iter().all(|p| !p.ends_with("gate_proj") && !p.ends_with("up_proj")));
    assert!(only_attn.selects("model.layers.0.mlp.down_proj"));
    assert!(!only_attn.selects("model.layers.0.mlp.gate_proj"));
    // A suffix match is on whole module names.
    assert!(QuantizeOnLoad::new(&src, QuantFormat::default()).selects("my_lm_head"));
}

#[test]
fn bad_checkpoints_are_typed_errors() {
    let spec = spec(true);
    let src = dense_weights(&spec);
    let reference = dense_then_quantize(&spec, &src, &QuantFormat::default());
    let ckpt = bnb_checkpoint(&reference).unwrap();
    // Another model size: the stored 4-bit shape does not fit.
    let mut bigger = spec.clone();
    bigger.intermediate = 128;
    let r = Llama::load(&bigger, &BnbWeights::new(&ckpt, "ckpt"));
    assert!(matches!(r, Err(Error::WeightShape { .. })), "{:?}", r.err());
    // A missing dense tensor.
    let mut missing = ckpt.clone();
    missing.remove("model.norm.weight");
    let r = Llama::load(&spec, &BnbWeights::new(&missing, "ckpt"));
    assert!(matches!(r, Err(Error::UnknownName { .. })), "{:?}", r.err());
    // A quant state without its absmax.
    let mut corrupt = ckpt.clone();
    corrupt.remove("model.layers.1.mlp.up_proj.weight.absmax");
    assert!(Llama::load(&spec, &BnbWeights::new(&corrupt, "ckpt")).is_err());
    // A mis-shaped dense tensor through the quantizing source.
    let mut bad = src.clone();
    bad.0.insert("model.layers.0.self_attn.q_proj.weight".into(), ndarray::ArrayD::zeros(IxDyn(&[64, 63])));
    let r = Llama::load(&spec, &QuantizeOnLoad::new(&bad, QuantFormat::default()));
    assert!(matches!(r, Err(Error::WeightShape { .. })), "{:?}", r.err());
}

#[test]
fn qlora_keeps_bases_loaded_quantized_and_requantizes_other_formats() {
    let spec = spec(true);
    let src = dense_weights(&spec);
    let m = Llama::load(&spec, &QuantizeOnLoad::new(&src, QuantFormat::default())).unwrap();
    let before = quant_weights(&m);
    let cfg = QloraConfig::new(["q_proj", "v_proj"]);
    let p = PeftModel::new(m, cfg.clone(), "default", 7).unwrap();
    let after = quant_weights(p.model());
    assert_eq!(before.len(), after.len());
    for ((pa, a), (_, b)) in before.iter().zip(&after) {
        assert!(Arc::ptr_eq(a, b), "{pa}: the loaded NF4-DQ base must not be re-quantized");
    }
    // A base loaded in another format is re-quantized into the requested one.
    let m = Llama::load(&spec, &QuantizeOnLoad::new(&src, QuantFormat::Int8)).unwrap();
    let p = PeftModel::new(m, cfg.clone(), "default", 7).unwrap();
    assert!(quant_weights(p.model()).iter().all(|(_, w)| w.format() == QuantFormat::default()));
    assert_eq!(linear_sites(p.model()).len(), 15, "14 quantized linears and the tied lm_head");
}
