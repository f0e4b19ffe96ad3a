//! Tests of `config.json` parsing, on inline copies of the shipped configs and hand-made edge cases.

use super::*;

const MINILM: &str = r#"{
  "_name_or_path": "nreimers/MiniLM-L6-H384-uncased",
  "architectures": ["BertModel"],
  "attention_probs_dropout_prob": 0.1,
  "gradient_checkpointing": false,
  "hidden_act": "gelu",
  "hidden_dropout_prob": 0.1,
  "hidden_size": 384,
  "initializer_range": 0.02,
  "intermediate_size": 1536,
  "layer_norm_eps": 1e-12,
  "max_position_embeddings": 512,
  "model_type": "bert",
  "num_attention_heads": 12,
  "num_hidden_layers": 6,
  "pad_token_id": 0,
  "position_embedding_type": "absolute",
  "transformers_version": "4.8.2",
  "type_vocab_size": 2,
  "use_cache": true,
  "vocab_size": 30522
}"#;

const DINOV2_SMALL: &str = r#"{
  "architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": 384, "num_hidden_layers": 12,
  "num_attention_heads": 6, "mlp_ratio": 4, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
  "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "layer_norm_eps": 1e-06, "image_size": 518,
  "patch_size": 14, "num_channels": 3, "qkv_bias": true, "layerscale_value": 1.0, "drop_path_rate": 0.0,
  "use_swiglu_ffn": false, "apply_layernorm": true, "reshape_hidden_states": true, "use_mask_token": false,
  "torch_dtype": "float16"
}"#;

const WHISPER_TINY_EN: &str = r#"{
  "architectures": ["WhisperEncoder"], "model_type": "whisper", "d_model": 384, "encoder_layers": 4,
  "encoder_attention_heads": 6, "encoder_ffn_dim": 1536, "num_mel_bins": 80, "max_source_positions": 1500,
  "activation_function": "gelu", "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
  "encoder_layerdrop": 0.0, "scale_embedding": false, "init_std": 0.02, "decoder_layers": 4,
  "decoder_attention_heads": 6, "decoder_ffn_dim": 1536, "vocab_size": 51864, "max_target_positions": 448,
  "num_hidden_layers": 4, "is_encoder_decoder": true, "bos_token_id": 50257, "eos_token_id": 50256,
  "pad_token_id": 50256, "decoder_start_token_id": 50257, "torch_dtype": "float16"
}"#;

const SMOLLM2: &str = r#"{
 "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
 "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
 "rms_norm_eps": 9.999999747378752e-06, "rope_theta": 100000.0, "max_position_embeddings": 8192,
 "vocab_size": 49152, "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
 "torch_dtype": "float32"
}"#;

#[test]
fn minilm_config_parses_with_all_fields() {
    let ArchConfig::Bert(c) = ArchConfig::from_json(MINILM).unwrap() else { panic!("not bert") };
    assert_eq!((c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size), (384, 6, 12, 1536));
    assert_eq!((c.vocab_size, c.type_vocab_size, c.max_position_embeddings), (30522, 2, 512));
    assert_eq!(c.layer_norm_eps, 1e-12);
    assert_eq!(c.hidden_act, "gelu");
    assert_eq!(c.pad_token_id, Some(0));
    assert_eq!(c.head_dim(), 32);
    assert_eq!(c.architectures, ["BertModel"]);
    // Unknown keys are kept, not rejected.
    assert_eq!(c.extra["transformers_version"], "4.8.2");
    assert_eq!(c.extra["gradient_checkpointing"], false);
}

#[test]
fn dinov2_config_parses_and_derives_mlp_width() {
    let cfg = ArchConfig::from_json(DINOV2_SMALL).unwrap();
    assert_eq!((cfg.model_type(), cfg.hidden_size(), cfg.num_layers()), ("dinov2", 384, 12));
    let ArchConfig::Dinov2(c) = cfg else { panic!() };
    assert_eq!((c.patch_size, c.image_size, c.num_channels), (14, 518, 3));
    assert_eq!((c.layerscale_value, c.mlp_ratio, c.layer_norm_eps), (1.0, 4.0, 1e-6));
    assert!(!c.use_mask_token && c.qkv_bias && !c.use_swiglu_ffn);
    assert_eq!(c.intermediate_size(), 1536);
    assert_eq!(c.grid_size(), 37);
    assert_eq!(c.head_dim(), 64);
    let swiglu = Dinov2Config { use_swiglu_ffn: true, hidden_size: 1536, ..c };
    // giant: int(1536 * 4) = 6144 -> int(6144 * 2 / 3) = 4096 -> rounded up to a multiple of 8: 4096.
    assert_eq!(swiglu.intermediate_size(), 4096);
}

#[test]
fn whisper_config_parses_encoder_fields() {
    let ArchConfig::Whisper(c) = ArchConfig::from_json(WHISPER_TINY_EN).unwrap() else { panic!() };
    assert_eq!((c.d_model, c.encoder_layers, c.encoder_attention_heads, c.encoder_ffn_dim), (384, 4, 6, 1536));
    assert_eq!((c.num_mel_bins, c.max_source_positions, c.vocab_size), (80, 1500, 51864));
    assert_eq!(c.activation_function, "gelu");
    assert_eq!(c.bos_token_id, Some(50257));
    assert_eq!(c.encoder_head_dim(), 64);
    assert_eq!(c.extra["num_hidden_layers"], 4);
}

#[test]
fn llama_config_parses_gqa_and_rope() {
    let ArchConfig::Llama(c) = ArchConfig::from_json(SMOLLM2).unwrap() else { panic!() };
    assert_eq!((c.hidden_size, c.intermediate_size, c.num_hidden_layers), (576, 1536, 30));
    assert_eq!((c.num_attention_heads, c.num_kv_heads(), c.head_dim()), (9, 3, 64));
    assert_eq!(c.rms_norm_eps, 9.999999747378752e-06);
    assert_eq!(c.rope_theta(), 100000.0);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.eos_token_id, Some(TokenIds::One(2)));
    assert_eq!(c.max_position_embeddings, 8192);
}

#[test]
fn absent_keys_take_transformers_defaults() {
    let ArchConfig::Bert(b) = ArchConfig::from_json(r#"{"model_type": "bert"}"#).unwrap() else { panic!() };
    assert_eq!(b, BertConfig::default());
    assert_eq!((b.hidden_size, b.intermediate_size, b.layer_norm_eps), (768, 3072, 1e-12));
    let d = Dinov2Config::from_json("{}").unwrap();
    assert_eq!((d.image_size, d.patch_size, d.layerscale_value, d.use_mask_token), (224, 14, 1.0, true));
    let w = WhisperConfig::from_json("{}").unwrap();
    assert_eq!((w.vocab_size, w.d_model, w.max_source_positions, w.pad_token_id), (51865, 384, 1500, Some(50256)));
    let l = LlamaConfig::from_json("{}").unwrap();
    assert_eq!((l.num_kv_heads(), l.head_dim(), l.rope_theta(), l.rms_norm_eps), (32, 128, 10000.0, 1e-6));
    assert!(!l.tie_word_embeddings);
    assert_eq!(l.bos_token_id, Some(TokenIds::One(1)));
}

#[test]
fn explicit_null_overrides_default() {
    let b = BertConfig::from_json(r#"{"pad_token_id": null}"#).unwrap();
    assert_eq!(b.pad_token_id, None);
}

#[test]
fn llama_accepts_eos_list_head_dim_and_rope_parameters() {
    let c = LlamaConfig::from_json(
        r#"{"eos_token_id": [128001, 128009], "head_dim": 96, "hidden_size": 100, "num_attention_heads": 4,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "pad_token_id": -1}"#,
    )
    .unwrap();
    assert_eq!(c.eos_token_id.as_ref().unwrap().as_slice(), &[128001, 128009]);
    assert_eq!(c.head_dim(), 96, "explicit head_dim need not divide hidden_size");
    assert_eq!(c.rope_theta(), 500000.0);
    assert_eq!(c.pad_token_id, Some(-1));
}

#[test]
fn architecture_is_taken_from_architectures_when_model_type_absent_or_unknown() {
    let c = ArchConfig::from_json(r#"{"architectures": ["LlamaForCausalLM"], "num_attention_heads": 32}"#).unwrap();
    assert_eq!(c.model_type(), "llama");
    let c = ArchConfig::from_json(r#"{"model_type": "smollm", "architectures": ["BertForMaskedLM"]}"#).unwrap();
    assert_eq!(c.model_type(), "bert");
}

#[test]
fn unknown_architecture_is_named_in_error() {
    let e = ArchConfig::from_json(r#"{"model_type": "mistral", "architectures": ["MistralForCausalLM"]}"#).unwrap_err();
    match &e {
        IoError::UnknownArchitecture { model_type, architectures, .. } => {
            assert_eq!(model_type.as_deref(), Some("mistral"));
            assert_eq!(architectures, &["MistralForCausalLM"]);
        }
        other => panic!("wrong error {other}"),
    }
    assert!(e.to_string().contains("mistral"), "{e}");
    assert!(matches!(ArchConfig::from_json("{}"), Err(IoError::UnknownArchitecture { model_type: None, .. })));
}

#[test]
fn malformed_json_and_wrong_types_are_json_errors() {
    assert!(matches!(ArchConfig::from_json("{\"model_type\": "), Err(IoError::Json { .. })));
    let e = ArchConfig::from_json(r#"{"model_type": "bert", "hidden_size": "big"}"#).unwrap_err();
    assert!(matches!(e, IoError::Json { .. }), "{e}");
    assert!(e.to_string().contains("hidden_size") || e.to_string().contains("invalid type"), "{e}");
    assert!(matches!(BertConfig::from_json(r#"{"num_hidden_layers": -1}"#), Err(IoError::Json { .. })));
}

#[test]
fn inconsistent_head_counts_are_invalid_config() {
    let e = BertConfig::from_json(r#"{"hidden_size": 100, "num_attention_heads": 12}"#).unwrap_err();
    assert!(matches!(e, IoError::InvalidConfig { field: "num_attention_heads", .. }), "{e}");
    let e = LlamaConfig::from_json(r#"{"num_attention_heads": 9, "num_key_value_heads": 2, "hidden_size": 576}"#)
        .unwrap_err();
    assert!(matches!(e, IoError::InvalidConfig { field: "num_key_value_heads", .. }), "{e}");
    let e = WhisperConfig::from_json(r#"{"encoder_attention_heads": 0}"#).unwrap_err();
    assert!(matches!(e, IoError::InvalidConfig { .. }), "{e}");
    let e = Dinov2Config::from_json(r#"{"patch_size": 0}"#).unwrap_err();
    assert!(matches!(e, IoError::InvalidConfig { field: "patch_size", .. }), "{e}");
}

#[test]
fn load_reports_missing_file_and_names_path_in_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("config.json");
    assert!(matches!(ArchConfig::load(&p), Err(IoError::NotFound { .. })));
    std::fs::write(&p, MINILM).unwrap();
    assert_eq!(ArchConfig::load(&p).unwrap().model_type(), "bert");
    assert_eq!(BertConfig::load(&p).unwrap().hidden_size, 384);
    std::fs::write(&p, "{oops").unwrap();
    assert_eq!(ArchConfig::load(&p).unwrap_err().path(), Some(p.as_path()));
}

#[test]
fn config_serializes_back_with_extra_keys() {
    let c = BertConfig::from_json(MINILM).unwrap();
    let again = BertConfig::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(again, c);
}
