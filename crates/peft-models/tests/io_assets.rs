//! IO against the real shared assets (models, configs, parity references), found through `require_asset`.
//!
//! Expected numbers were computed independently with Python's `struct` module (`'<e'` half-float decoding) on
//! the same files.

use peft_core::io::{ArchConfig, DType, SafeTensorsFile};
use peft_core::testing::require_asset;

fn sum_f64(a: &ndarray::ArrayD<f32>) -> f64 {
    a.iter().map(|&x| f64::from(x)).sum()
}

#[test]
fn shipped_configs_parse_to_their_architectures() {
    for (rel, kind, hidden, layers) in [
        ("models/all-MiniLM-L6-v2/config.json", "bert", 384, 6),
        ("models/dinov2-small/config.json", "dinov2", 384, 12),
        ("models/whisper-tiny.en-encoder/config.json", "whisper", 384, 4),
        ("reference/smollm2-135m/config.json", "llama", 576, 30),
    ] {
        let Some(p) = require_asset(rel) else { return };
        let cfg = ArchConfig::load(&p).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((cfg.model_type(), cfg.hidden_size(), cfg.num_layers()), (kind, hidden, layers), "{rel}");
        match cfg {
            ArchConfig::Dinov2(c) => assert_eq!((c.patch_size, c.image_size, c.use_mask_token), (14, 518, false)),
            ArchConfig::Llama(c) => assert_eq!((c.num_kv_heads(), c.head_dim(), c.rope_theta()), (3, 64, 1e5)),
            ArchConfig::Whisper(c) => assert_eq!((c.num_mel_bins, c.vocab_size), (80, 51864)),
            ArchConfig::Bert(c) => assert_eq!((c.intermediate_size, c.vocab_size), (1536, 30522)),
            _ => unreachable!(),
        }
    }
}

#[test]
fn minilm_f16_weights_decode_exactly() {
    let Some(p) = require_asset("models/all-MiniLM-L6-v2/model.safetensors") else { return };
    let f = SafeTensorsFile::open(&p).unwrap();
    assert_eq!(f.len(), 103);
    assert_eq!(f.metadata()["format"], "pt");
    assert_eq!(f.dtype("embeddings.word_embeddings.weight").unwrap(), DType::F16);
    assert_eq!(f.shape("embeddings.word_embeddings.weight").unwrap(), &[30522, 384]);
    let ln = f.get_checked("embeddings.LayerNorm.weight", &[384]).unwrap();
    let first: Vec<f64> = ln.iter().take(3).map(|&x| x.into()).collect();
    assert_eq!(first, [0.59912109375, 0.58349609375, 0.63330078125]);
    assert!((sum_f64(&ln) - 236.852294921875).abs() < 1e-9);
    let b = f.get("encoder.layer.5.output.dense.bias").unwrap();
    assert!((sum_f64(&b) - 1.1644557118415833).abs() < 1e-9);
    let all = f.load_all().unwrap();
    assert!(all.values().all(|a| a.iter().all(|x| x.is_finite())));
}

#[test]
fn dinov2_and_whisper_weights_open() {
    let Some(p) = require_asset("models/dinov2-small/model.safetensors") else { return };
    let f = SafeTensorsFile::open(&p).unwrap();
    assert_eq!(f.shape("embeddings.patch_embeddings.projection.weight").unwrap(), &[384, 3, 14, 14]);
    let cls = f.get("embeddings.cls_token").unwrap();
    assert_eq!(cls.shape(), &[1, 1, 384]);
    assert!((sum_f64(&cls) - -0.04392164945602417).abs() < 1e-9);
    assert!(f.contains("encoder.layer.0.layer_scale1.lambda1"));

    let Some(p) = require_asset("models/whisper-tiny.en-encoder/model.safetensors") else { return };
    let f = SafeTensorsFile::open(&p).unwrap();
    assert_eq!(f.shape("conv1.weight").unwrap(), &[384, 80, 3]);
    assert_eq!(f.get("embed_positions.weight").unwrap().shape(), &[1500, 384]);
}

#[test]
fn reference_token_ids_are_int64() {
    let Some(p) = require_asset("reference/minilm_l6_v2.safetensors") else { return };
    let f = SafeTensorsFile::open(&p).unwrap();
    assert_eq!(f.dtype("s0.input_ids").unwrap(), DType::I64);
    let ids = f.get_i64("s0.input_ids").unwrap();
    assert_eq!(ids.as_slice().unwrap(), &[101, 1996, 4248, 2829, 4419, 14523, 2058, 1996, 13971, 3899, 1012, 102]);
    assert!(matches!(f.get("s0.input_ids"), Err(peft_core::io::IoError::UnsupportedDType { .. })));
}
