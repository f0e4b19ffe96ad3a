//! The seed corpora in `fuzz/corpus/<target>/seed-*`: small valid files of every kind the targets read, made
//! with the workspace's own writers (and `hound`/`image` for WAV and images). Rewrite them with
//! `cargo test -p peft-fuzz --test seeds -- --ignored` after a format change; the replay test runs them.

use std::path::Path;

use ndarray::ArrayD;
use peft_core::adapter::{AdapterResult, PeftModel};
use peft_core::io::gguf::test_writer::GgufBuilder;
use peft_core::io::gguf::GgufValueType;
use peft_core::io::{write_safetensors_as, BertConfig, DType, GgmlType, GgufValue};
use peft_core::nn::{named_params, Module, RandomInit, WeightSource};
use peft_models::bert::{BertForSequenceClassification, BertModel, Pooling};
use peft_models::llama::{hf_name_to_gguf, Llama, LlamaSpec};
use peft_quant::{Checkpoint, FloatDtype, Int8Rows, NfPacked, NfQuant, Quant4, Quant4Config, QuantType, RawTensor};

fn corpus(target: &str) -> std::path::PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn put(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(corpus(target).join(format!("seed-{name}")), bytes).unwrap();
}

fn rand_vals(n: usize, seed: u64) -> Vec<f32> {
    RandomInit::new(seed, 1.0).get("x", &[n]).unwrap().iter().copied().collect()
}

fn params(m: &dyn Module, prefix: &str) -> Vec<(String, ArrayD<f32>)> {
    named_params(m).iter().map(|p| (format!("{prefix}{}", p.name()), p.value().to_owned().into_dyn())).collect()
}

fn st_bytes(tensors: &[(String, ArrayD<f32>)], dtype: DType, meta: Option<&[(&str, &str)]>) -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x.safetensors");
    let meta = meta.map(|m| m.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
    write_safetensors_as(&p, tensors.iter().map(|(n, a)| (n, a)), meta.as_ref(), dtype).unwrap();
    std::fs::read(p).unwrap()
}

fn tiny_bert_cfg() -> BertConfig {
    BertConfig {
        vocab_size: 20,
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 16,
        max_position_embeddings: 16,
        ..BertConfig::default()
    }
}

fn bert_json() -> String {
    serde_json::json!({
        "model_type": "bert", "vocab_size": 20, "hidden_size": 8, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16,
        "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12
    })
    .to_string()
}

fn llama_spec() -> LlamaSpec {
    LlamaSpec {
        vocab: 12,
        hidden: 8,
        intermediate: 12,
        layers: 1,
        heads: 2,
        kv_heads: 1,
        head_dim: 4,
        eps: 1e-5,
        rope_theta: 1e4,
        max_positions: 16,
        tie_embeddings: true,
        bos: Some(1),
        eos: vec![2],
    }
}

fn safetensors_seeds() {
    let a = ArrayD::from_shape_vec(vec![2, 3], rand_vals(6, 1)).unwrap();
    let b = ArrayD::from_shape_vec(vec![4], rand_vals(4, 2)).unwrap();
    let s = ArrayD::from_shape_vec(vec![], vec![1.5]).unwrap();
    let t = vec![("a".to_string(), a), ("b.weight".to_string(), b), ("scalar".to_string(), s)];
    put("safetensors", "f32", &st_bytes(&t, DType::F32, Some(&[("format", "pt")])));
    put("safetensors", "f16", &st_bytes(&t, DType::F16, None));
    put("safetensors", "bf16", &st_bytes(&t[..1], DType::BF16, None));
    put("safetensors", "empty", &st_bytes(&[], DType::F32, None));
    // an integer tensor (written by hand: our writer writes floats only)
    let header = br#"{"ids":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},"m":{"dtype":"U8","shape":[1,2],"data_offsets":[16,18]}}"#;
    let mut f = (header.len() as u64).to_le_bytes().to_vec();
    f.extend_from_slice(header);
    f.extend_from_slice(&7i64.to_le_bytes());
    f.extend_from_slice(&(-1i64).to_le_bytes());
    f.extend_from_slice(&[1, 0]);
    put("safetensors", "int", &f);
}

fn bnb_seeds() {
    let mut c = Checkpoint::new();
    let x = rand_vals(8 * 64, 3);
    for (prefix, qt, dq) in [("l.nf4", QuantType::Nf4, true), ("l.fp4", QuantType::Fp4, false)] {
        let cfg = Quant4Config { quant_type: qt, blocksize: 64, double_quant: dq };
        c.insert_quant4(prefix, &Quant4::quantize(&x, &[8, 64], &cfg).unwrap()).unwrap();
    }
    c.insert_int8("l.int8", &Int8Rows::quantize(&x[..4 * 16], 4, 16).unwrap()).unwrap();
    c.insert("l.bias", RawTensor::from_f32(vec![8], &x[..8]).unwrap());
    put("bnb", "mixed", &c.to_bytes());
    let mut one = Checkpoint::new();
    let cfg = Quant4Config { quant_type: QuantType::Nf4, blocksize: 32, double_quant: false };
    one.insert_quant4("w", &Quant4::quantize(&x[..3 * 32], &[3, 32], &cfg).unwrap()).unwrap();
    put("bnb", "nf4-plain", &one.to_bytes());
    // LQ-LoRA's NF-b storage (peft-quant's own keys): 3-bit codes, 5-bit scales, bf16 group maxes, a partial block.
    let mut nf = Checkpoint::new();
    let cfg = NfQuant { bits: 3, scale_bits: 5, block: 24, group: 3, group_dtype: FloatDtype::Bf16 };
    nf.insert_nf("lq.q", &NfPacked::quantize(&x[..5 * 20], &[5, 20], &cfg).unwrap()).unwrap();
    nf.insert("lq.bias", RawTensor::from_f32(vec![5], &x[..5]).unwrap());
    put("bnb", "nf3-lq-lora", &nf.to_bytes());
}

fn llama_weights(s: &LlamaSpec) -> Vec<(String, ArrayD<f32>)> {
    params(&Llama::random(s, 4, 0.2).unwrap(), "")
}

fn strs(v: &[&str]) -> GgufValue {
    GgufValue::Array(GgufValueType::String, v.iter().map(|s| GgufValue::String(s.to_string())).collect())
}

fn gguf_seeds() {
    let s = llama_spec();
    let mut b = GgufBuilder::new()
        .kv("general.architecture", GgufValue::String("llama".into()))
        .kv("llama.block_count", GgufValue::U32(s.layers as u32))
        .kv("llama.embedding_length", GgufValue::U32(s.hidden as u32))
        .kv("llama.feed_forward_length", GgufValue::U32(s.intermediate as u32))
        .kv("llama.attention.head_count", GgufValue::U32(s.heads as u32))
        .kv("llama.attention.head_count_kv", GgufValue::U32(s.kv_heads as u32))
        .kv("llama.rope.freq_base", GgufValue::F32(s.rope_theta as f32))
        .kv("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(s.eps as f32))
        .kv("llama.context_length", GgufValue::U32(s.max_positions as u32))
        .kv("tokenizer.ggml.eos_token_id", GgufValue::U32(2))
        .kv("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .kv("tokenizer.ggml.pre", GgufValue::String("smollm".into()))
        .kv("tokenizer.ggml.tokens", strs(&["<|endoftext|>", "a", "b", "ab", "Ġ", "Ġab", "1", "2", "H", "e", "l", "o"]))
        .kv("tokenizer.ggml.merges", strs(&["a b", "Ġ ab"]))
        .kv(
            "tokenizer.ggml.token_type",
            GgufValue::Array(GgufValueType::I32, [3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1].map(GgufValue::I32).to_vec()),
        );
    let mut w = llama_weights(&s);
    w.sort_by(|x, y| x.0.cmp(&y.0));
    for (n, a) in &w {
        let (g, _) = hf_name_to_gguf(n, &s).unwrap();
        let dims: Vec<u64> = a.shape().iter().rev().map(|&d| d as u64).collect();
        b = b.tensor(&g, &dims, GgmlType::F32, a.iter().flat_map(|x| x.to_le_bytes()).collect());
    }
    put("gguf", "llama", &b.build());
    // quantized block types the reader dequantizes: one block each (Q8_0: f16 scale + 32 i8; Q4_0: f16 + 16 B)
    let mut q8 = half_bytes(0.05);
    q8.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let mut q4 = half_bytes(0.1);
    q4.extend((0..16u8).map(|i| i.wrapping_mul(17)));
    let types = GgufBuilder::new()
        .kv("general.architecture", GgufValue::String("llama".into()))
        .kv("general.name", GgufValue::String("blocks".into()))
        .tensor("q8", &[32], GgmlType::Q8_0, q8)
        .tensor("q4", &[32], GgmlType::Q4_0, q4)
        .tensor("f16", &[2, 2], GgmlType::F16, [1.0f32, -2.0, 0.5, 3.0].iter().flat_map(|&v| half_bytes(v)).collect())
        .build();
    put("gguf", "blocks", &types);
}

/// IEEE half bytes of `v` (little-endian), without the `half` crate.
fn half_bytes(v: f32) -> Vec<u8> {
    let a = ArrayD::from_shape_vec(vec![1], vec![v]).unwrap();
    let f = st_bytes(&[("h".into(), a)], DType::F16, None);
    f[f.len() - 2..].to_vec()
}

fn adapter_seeds() {
    // `add` adds adapter "default"; a config that does not fit the tiny model is skipped with the reason.
    let save = |name: &str, add: &dyn Fn(&mut PeftModel<BertForSequenceClassification>) -> AdapterResult<()>| {
        let base =
            BertForSequenceClassification::from_source(&tiny_bert_cfg(), &RandomInit::new(0, 0.1), 2, Pooling::Mean, 0)
                .unwrap();
        let mut m = PeftModel::wrap(base, 3);
        if let Err(e) = add(&mut m) {
            eprintln!("no adapter seed for {name}: {e}");
            return;
        }
        m.set_adapter("default").unwrap();
        let d = tempfile::tempdir().unwrap();
        m.save_pretrained(d.path()).unwrap();
        let cfg = std::fs::read(d.path().join("adapter_config.json")).unwrap();
        let w = std::fs::read(d.path().join("adapter_model.safetensors")).unwrap();
        put("adapter", name, &peft_fuzz::join2(&cfg, &w));
    };
    save("lora", &|m| {
        let mut c = peft_lora::LoraConfig::new(2, 4.0, ["query", "value"]);
        c.modules_to_save = Some(vec!["classifier".into()]);
        m.add_adapter("default", c)
    });
    save("dora", &|m| {
        let mut c = peft_lora::LoraConfig::new(1, 2.0, ["dense"]);
        c.use_dora = true;
        m.add_adapter("default", c)
    });
    // Every sparse method of the bench's registry (their loaders are reached only through a valid peft_type).
    // SquareHead's registry entries leave the run length unset (the bench sets it): one seed below instead.
    for spec in peft_sparse::methods().into_iter().filter(|s| !s.name.0.starts_with("squarehead")) {
        save(spec.name.0, &|m| m.add_adapter_boxed("default", spec.config.clone_box()));
    }
    // SquareHead saves the whole (pruned) model as trained base rows.
    save("squarehead", &|m| {
        let mut c = peft_sparse::SquareheadConfig::new(peft_sparse::ENCODER_WEIGHTS, 0.5, Some(2));
        c.modules_to_save = Some(vec!["classifier".into()]);
        m.add_adapter("default", c)
    });
    // The bench's S²FT recipe assumes 12 heads and selects nothing on the tiny model: 2 heads, larger ratios.
    save("s2ft", &|m| {
        let mut c = peft_sparse::S2ftConfig::bert(2);
        (c.o_ratio, c.d_ratio, c.v_ratio) = (0.5, 0.25, 0.5);
        m.add_adapter("default", c)
    });
    // SPT scores sensitivity on calibration batches (two here); the saved config records the allocation.
    save("spt", &|m| {
        let c = peft_sparse::SptConfig::new(peft_sparse::ENCODER_LAYER_PARAMS, 60);
        let batch = peft_models::tokenizer::Batch::from_rows(&[vec![1, 5, 7, 2], vec![1, 9, 3, 2]])?;
        let mut calib = |b: &BertForSequenceClassification, i: usize| -> peft_core::Result<Option<peft_core::Tensor>> {
            if i >= 2 {
                return Ok(None);
            }
            Ok(Some(b.forward(&batch, &peft_core::train::calibration_ctx(None))?.square().mean_all()))
        };
        m.add_adapter_calibrated("default", Box::new(c), &mut calib)
    });
    save("ia3", &|m| {
        m.add_adapter("default", peft_adapters::ia3::Ia3Config::new(["key", "value", "output.dense"], ["output.dense"]))
    });
    save("invertible", &|m| m.add_adapter("default", peft_adapters::invertible::InvertibleConfig::nice()));
    // An AdapterHub SeqBn folder (`adapter_config.json` + `adapter.safetensors`), which the target also reads
    // through `peft_adapters::adapterhub::load`.
    let base =
        BertForSequenceClassification::from_source(&tiny_bert_cfg(), &RandomInit::new(0, 0.1), 2, Pooling::Mean, 0)
            .unwrap();
    let mut m = PeftModel::wrap(base, 3);
    let cfg = peft_adapters::bottleneck::BottleneckConfig {
        init_weights: peft_adapters::bottleneck::AdapterInit::Bert,
        dropout: 0.1,
        dropout_on_output: true,
        ..peft_adapters::bottleneck::BottleneckConfig::seq_bn()
    };
    m.add_adapter("hub", cfg).unwrap();
    let meta = peft_adapters::adapterhub::Meta {
        name: "hub".into(),
        hidden_size: 8,
        model_class: "BertModel".into(),
        model_name: "tiny".into(),
        model_type: "bert".into(),
        version: peft_adapters::adapterhub::VERSION.into(),
    };
    let d = tempfile::tempdir().unwrap();
    peft_adapters::adapterhub::save(&m, "hub", d.path(), &meta).unwrap();
    let cfg = std::fs::read(d.path().join(peft_adapters::adapterhub::CONFIG_FILE)).unwrap();
    let w = std::fs::read(d.path().join(peft_adapters::adapterhub::WEIGHTS_FILE)).unwrap();
    put("adapter", "adapterhub-seq-bn", &peft_fuzz::join2(&cfg, &w));
}

fn hf_model_seeds() {
    let bert = BertModel::from_source(&tiny_bert_cfg(), &RandomInit::new(1, 0.2)).unwrap();
    let w = st_bytes(&params(&bert, "bert."), DType::F32, None);
    put("hf_model", "bert", &peft_fuzz::join2(bert_json().as_bytes(), &w));
    let s = llama_spec();
    let cfg = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": s.vocab,
        "hidden_size": s.hidden, "intermediate_size": s.intermediate, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "rms_norm_eps": s.eps,
        "rope_theta": s.rope_theta, "max_position_embeddings": s.max_positions,
        "tie_word_embeddings": s.tie_embeddings, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"
    })
    .to_string();
    let w = st_bytes(&llama_weights(&s), DType::F16, None);
    put("hf_model", "llama", &peft_fuzz::join2(cfg.as_bytes(), &w));
    for (name, json) in [
        (
            "dinov2-config",
            r#"{"model_type":"dinov2","hidden_size":8,"num_hidden_layers":1,"num_attention_heads":2,"image_size":28,"patch_size":14}"#,
        ),
        (
            "whisper-config",
            r#"{"model_type":"whisper","d_model":8,"encoder_layers":1,"encoder_attention_heads":2,"num_mel_bins":4,"max_source_positions":4}"#,
        ),
    ] {
        put("hf_model", name, &peft_fuzz::join2(json.as_bytes(), &st_bytes(&[], DType::F32, None)));
    }
}

fn wav_bytes(spec: hound::WavSpec, n: usize) -> Vec<u8> {
    let mut cur = std::io::Cursor::new(Vec::new());
    {
        let mut w = hound::WavWriter::new(&mut cur, spec).unwrap();
        for i in 0..n * spec.channels as usize {
            let v = ((i as f32) * 0.3).sin() * 0.5;
            match (spec.sample_format, spec.bits_per_sample) {
                (hound::SampleFormat::Float, _) => w.write_sample(v).unwrap(),
                (_, 8) => w.write_sample((v * 127.0) as i8).unwrap(),
                (_, 16) => w.write_sample((v * 32767.0) as i16).unwrap(),
                (_, b) => w.write_sample((v * ((1i64 << (b - 1)) - 1) as f32) as i32).unwrap(),
            }
        }
        w.finalize().unwrap();
    }
    cur.into_inner()
}

fn wav_seeds() {
    let spec = |channels, sample_rate, bits, float| hound::WavSpec {
        channels,
        sample_rate,
        bits_per_sample: bits,
        sample_format: if float { hound::SampleFormat::Float } else { hound::SampleFormat::Int },
    };
    put("wav", "mono16-8k", &wav_bytes(spec(1, 8000, 16, false), 64));
    put("wav", "stereo24-44k", &wav_bytes(spec(2, 44100, 24, false), 32));
    put("wav", "float-16k", &wav_bytes(spec(1, 16000, 32, true), 40));
    put("wav", "u8-22k", &wav_bytes(spec(1, 22050, 8, false), 50));
}

fn image_seeds() {
    let enc = |img: image::DynamicImage, fmt: image::ImageFormat| {
        let mut cur = std::io::Cursor::new(Vec::new());
        img.write_to(&mut cur, fmt).unwrap();
        cur.into_inner()
    };
    let rgb = image::RgbImage::from_fn(7, 5, |x, y| image::Rgb([(x * 30) as u8, (y * 50) as u8, 128]));
    put("image", "rgb.png", &enc(rgb.clone().into(), image::ImageFormat::Png));
    put("image", "rgb.jpg", &enc(rgb.into(), image::ImageFormat::Jpeg));
    let gray = image::GrayImage::from_fn(3, 9, |x, y| image::Luma([(x * 40 + y * 9) as u8]));
    put("image", "gray.png", &enc(gray.clone().into(), image::ImageFormat::Png));
    put("image", "gray.jpg", &enc(gray.into(), image::ImageFormat::Jpeg));
    let rgba = image::RgbaImage::from_fn(4, 4, |x, y| image::Rgba([x as u8 * 60, y as u8 * 60, 9, 200]));
    put("image", "rgba.png", &enc(rgba.into(), image::ImageFormat::Png));
}

fn tsv_seeds() {
    put("tsv", "sst2", b"sentence\tlabel\n\"a film \" that works \t1\nit 's dull \t0\n");
    put(
        "tsv",
        "mrpc",
        "\u{feff}Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n1\t11\t12\tHe said \"no.\tShe said no.\r\n".as_bytes(),
    );
    put("tsv", "cola", b"gj04\t1\t\tOur friends won't buy this analysis.\nclc95\t0\t*\tOne more pseudo.\n");
    put("tsv", "stsb", b"index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking off.\t5.000\n");
    put(
        "tsv",
        "qnli",
        b"index\tquestion\tsentence\tlabel\n0\tWhat?\tThat.\tentailment\n1\tWho?\tNo one.\tnot_entailment\n",
    );
}

const COCO_CAPTIONS: &str = r#"{"info": {"year": 2017}, "images": [{"id": 9, "file_name": "000000000009.jpg", "width": 640, "height": 480}, {"id": 4, "file_name": "000000000004.jpg", "width": 500, "height": 375}], "annotations": [{"id": 100, "image_id": 9, "caption": "Two dogs play."}, {"id": 101, "image_id": 4, "caption": "A red bus."}, {"id": 102, "image_id": 9, "caption": "Dogs running on grass"}]}"#;
const COCO_INSTANCES: &str = r#"{"images": [{"id": 9, "file_name": "000000000009.jpg", "width": 640, "height": 480}], "categories": [{"id": 18, "name": "dog", "supercategory": "animal"}, {"id": 6, "name": "bus", "supercategory": "vehicle"}], "annotations": [{"id": 5, "image_id": 9, "category_id": 18, "bbox": [1.5, 2, 30, 40], "area": 900.5, "iscrowd": 0, "segmentation": [[1, 2, 3, 4]]}, {"id": 6, "image_id": 4, "category_id": 6, "bbox": [0, 0, 10, 10], "area": 50, "iscrowd": 1, "segmentation": {"counts": [1, 2], "size": [375, 500]}}]}"#;
const COCO_KARPATHY: &str = r#"{"images": [{"cocoid": 9, "split": "train", "filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg"}, {"cocoid": 4, "split": "test"}, {"cocoid": 77, "split": "restval"}]}"#;

/// A COCO seed: captions, instances (may be empty) and Karpathy texts joined as `peft_fuzz::targets::coco` splits.
fn coco_seed(captions: &str, instances: &str, karpathy: &str) -> Vec<u8> {
    peft_fuzz::join2(captions.as_bytes(), &peft_fuzz::join2(instances.as_bytes(), karpathy.as_bytes()))
}

/// The COCO seeds (also checked by `replay.rs::seeds_are_valid_files`).
fn coco_seeds() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("full", coco_seed(COCO_CAPTIONS, COCO_INSTANCES, COCO_KARPATHY)),
        ("captions-only", coco_seed(COCO_CAPTIONS, "", COCO_KARPATHY)),
    ]
}

/// Writes every seed (ignored: run it by hand after a format change, then commit the files).
#[test]
#[ignore = "regenerates the committed seed corpora"]
fn write_seed_corpora() {
    safetensors_seeds();
    bnb_seeds();
    gguf_seeds();
    adapter_seeds();
    hf_model_seeds();
    wav_seeds();
    image_seeds();
    tsv_seeds();
    for (name, bytes) in coco_seeds() {
        put("coco", name, &bytes);
    }
}
