//! The fuzz targets: one function per reader, `fn(&[u8])`, each returning normally unless it found a bug (see the
//! crate docs). Two-file targets take their input through [`crate::split2`].

use std::collections::BTreeMap;
use std::path::Path;

use peft_core::adapter::{ConfigRegistry, PeftModel};
use peft_core::io::gguf::GgufFile;
use peft_core::io::{BertConfig, SafeTensorsFile};
use peft_core::nn::{Ctx, RandomInit};
use peft_models::bert::{BertForSequenceClassification, Pooling};
use peft_models::tokenizer::Batch;

use crate::scratch;

use crate::{glue, quantize};

/// Our safetensors parser ([`SafeTensorsFile::open`]) against the `safetensors` crate: both accept or both reject,
/// except where ours documents a stricter rule (below); on accepted files every tensor's dtype, shape and bytes
/// agree, and every tensor converts to f32 (or is refused with a typed error).
///
/// Documented differences, each checked to be the reason when the crate accepts and we reject:
/// - dtypes this reader does not implement (sub-byte `F4`, `F6_*`, `F8_E8M0`, complex, ...):
///   [`peft_core::io::IoError::UnsupportedDType`];
/// - a header with a duplicate JSON key at any depth (a tensor named twice, two `__metadata__` values of one
///   key): the crate keeps the last one, we reject the file as ambiguous ([`peft_core::io::IoError::Json`],
///   "duplicate key"); the crate rejects only a duplicate field inside a tensor entry;
/// - everything else must agree.
pub fn safetensors(data: &[u8]) {
    let dir = scratch::dir("safetensors");
    let path = scratch::file(&dir, "x.safetensors", data);
    let ours = SafeTensorsFile::open(&path);
    let theirs = safetensors::SafeTensors::deserialize(data);
    match (&ours, &theirs) {
        (Ok(f), Ok(t)) => {
            let mut names: Vec<String> = t.names().into_iter().map(str::to_string).collect();
            names.sort();
            let mine: Vec<&str> = f.names().collect();
            assert_eq!(mine, names, "tensor names differ");
            for n in &names {
                let tv = t.tensor(n).expect("named by the crate");
                let info = f.info(n).expect("named by us");
                assert_eq!(info.dtype.name(), tv.dtype().to_string(), "{n}: dtype");
                assert_eq!(info.shape, tv.shape(), "{n}: shape");
                assert_eq!(f.bytes(n).expect("in range"), tv.data(), "{n}: bytes");
                let _ = f.get(n); // conversion: typed error for non-float dtypes, never a panic
            }
            let (_, m) = safetensors::SafeTensors::read_metadata(data).expect("deserialized above");
            let meta: BTreeMap<String, String> = m.metadata().clone().unwrap_or_default().into_iter().collect();
            assert_eq!(f.metadata(), &meta, "__metadata__ differs");
        }
        (Err(_), Err(_)) => {}
        (Err(e), Ok(_)) => {
            let unsupported = matches!(e, peft_core::io::IoError::UnsupportedDType { .. });
            let duplicate = matches!(e, peft_core::io::IoError::Json { source, .. }
                if source.to_string().starts_with("duplicate key"));
            assert!(unsupported || duplicate, "we reject a file the safetensors crate accepts: {e}");
        }
        (Ok(_), Err(e)) => panic!("we accept a file the safetensors crate rejects: {e:?}"),
    }
}

/// The bitsandbytes checkpoint reader ([`peft_quant::Checkpoint::read`], as `cargo xtask dequantize` reads
/// `--in`), then xtask's `dequantize` of every 4-bit and int8 weight, then the writer: the written bytes must
/// parse again (with both our reader and the `safetensors` crate) and hold the dequantized tensors.
pub fn bnb(data: &[u8]) {
    let dir = scratch::dir("bnb");
    let path = scratch::file(&dir, "in.safetensors", data);
    let Ok(ckpt) = peft_quant::Checkpoint::read(&path) else { return };
    let bytes = ckpt.to_bytes();
    let again = peft_quant::Checkpoint::from_bytes(&bytes).expect("a checkpoint we read writes a file we can read");
    assert_eq!(again.names(), ckpt.names(), "names survive a write");
    let Ok((out, done)) = quantize::dequantize(&ckpt) else { return };
    let out_path = dir.join("out.safetensors");
    out.write(&out_path).expect("writing the dequantized checkpoint");
    let back = peft_quant::Checkpoint::read(&out_path).expect("the dequantized file parses again");
    safetensors::SafeTensors::deserialize(&std::fs::read(&out_path).expect("just written"))
        .expect("the dequantized file is valid safetensors");
    for w in &done {
        let t = back.get(w).expect("a dequantized weight is in the output");
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{w}: dequantized to F32");
    }
}

/// GGUF: open and validate the file, dequantize every tensor, derive the LLaMA spec, build the tokenizer (and
/// encode a string with it), and load the whole model through the registry.
pub fn gguf(data: &[u8]) {
    let dir = scratch::dir("gguf");
    let path = scratch::file(&dir, "m.gguf", data);
    let Ok(f) = GgufFile::open(&path) else { return };
    for t in f.tensors() {
        let _ = f.get(&t.name);
    }
    let _ = peft_models::llama::LlamaSpec::from_gguf(&f);
    if let Ok(tok) = peft_models::llama::tokenizer::tokenizer_from_gguf(&f) {
        let _ = tok.encode("Hello, world! 123", true);
    }
    let _ = peft_models::registry::load(&path);
}

/// Tiny BERT classifier for the adapter target: 2 layers, hidden 8, vocabulary 20.
fn tiny_bert() -> BertForSequenceClassification {
    let cfg = BertConfig {
        vocab_size: 20,
        hidden_size: 8,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 16,
        max_position_embeddings: 16,
        ..BertConfig::default()
    };
    BertForSequenceClassification::from_source(&cfg, &RandomInit::new(0, 0.1), 2, Pooling::Mean, 0)
        .expect("tiny BERT config is valid")
}

/// The registries `xtask embed`/`merge` load adapters with, plus the adapter and sparse families.
fn registries() -> [ConfigRegistry; 3] {
    [peft_quant::registry(), peft_adapters::registry(), peft_sparse::registry()]
}

/// `adapter_config.json` + `adapter_model.safetensors` (input split by [`crate::split2`]) loaded onto a tiny BERT
/// as `xtask merge` does ([`PeftModel::from_pretrained`]), then a forward pass and `merge_and_unload`; the same two
/// parts also as an AdapterHub folder (`adapter_config.json` + `adapter.safetensors`) through
/// [`peft_adapters::adapterhub::load`], then a forward pass and a save back.
pub fn adapter(data: &[u8]) {
    let (config, weights) = crate::split2(data);
    let dir = scratch::dir("adapter");
    scratch::file(&dir, "adapter_config.json", config);
    scratch::file(&dir, "adapter_model.safetensors", weights);
    scratch::file(&dir, peft_adapters::adapterhub::WEIGHTS_FILE, weights);
    let mut hub = PeftModel::wrap(tiny_bert(), 0);
    if let Ok((meta, _report)) = peft_adapters::adapterhub::load(&mut hub, &dir, "hub") {
        let batch = Batch {
            input_ids: vec![1, 5, 6, 2],
            token_type_ids: vec![0; 4],
            attention_mask: vec![1, 1, 1, 1],
            shape: [1, 4],
        };
        if hub.set_adapter("hub").is_ok() {
            let _ = hub.forward(&batch, &Ctx::eval());
        }
        let _ = peft_adapters::adapterhub::save(&hub, "hub", &scratch::dir("adapter-hub-out"), &meta);
    }
    for reg in registries() {
        let base = tiny_bert();
        let lm = match PeftModel::from_pretrained(&base, &dir, &reg) {
            Ok((lm, _report)) => lm,
            // another family's `peft_type`: try the next registry
            Err(peft_core::adapter::AdapterError::UnknownPeftType { .. }) => continue,
            Err(_) => return,
        };
        let batch = Batch {
            input_ids: vec![1, 5, 6, 2, 1, 7, 2, 0],
            token_type_ids: vec![0; 8],
            attention_mask: vec![1, 1, 1, 1, 1, 1, 1, 0],
            shape: [2, 4],
        };
        let _ = base.forward(&batch, &Ctx::eval());
        let _ = lm.merge_and_unload();
        let _ = base.forward(&batch, &Ctx::eval());
        return;
    }
}

/// `config.json` + `model.safetensors` (input split by [`crate::split2`]) loaded as a Hugging Face folder through
/// [`peft_models::registry::load`]: config parsing, architecture dispatch, model construction and the unused
/// tensor check.
pub fn hf_model(data: &[u8]) {
    let (config, weights) = crate::split2(data);
    let dir = scratch::dir("hf_model");
    scratch::file(&dir, "config.json", config);
    scratch::file(&dir, "model.safetensors", weights);
    let _ = peft_models::registry::load(&dir);
}

/// WAV: read the first 30 s (as `xtask embed` does for Whisper), then resample to 16 kHz.
pub fn wav(data: &[u8]) {
    let dir = scratch::dir("wav");
    let path = scratch::file(&dir, "a.wav", data);
    let Ok(audio) = peft_models::audio::read_wav_prefix(&path, Some(30.0)) else { return };
    // Float WAVs may hold NaN/inf; they are passed through as scipy.io.wavfile does (not a finding).
    let finite = audio.samples.iter().all(|s| s.is_finite());
    if let Ok(x) = peft_models::audio::resample(&audio.samples, audio.sample_rate, 16_000) {
        let expect = (audio.samples.len() as u64 * 16_000).div_ceil(u64::from(audio.sample_rate.max(1)));
        assert!((x.len() as u64).abs_diff(expect) <= 1, "resampled length {} vs {expect}", x.len());
        assert!(!finite || x.iter().all(|v| v.is_finite()), "finite samples resample to finite values");
    }
}

/// Image: decode (PNG/JPEG, strict) and run DINOv2's preprocessing (shortest-edge resize, center crop,
/// normalisation) on the pixels.
pub fn image(data: &[u8]) {
    let dir = scratch::dir("image");
    let path = scratch::file(&dir, "i.img", data);
    let Ok(img) = peft_models::image_proc::read_rgb(&path) else { return };
    if let Ok(x) = peft_models::image_proc::Preprocess::dinov2_default().apply_rgb(&img) {
        assert_eq!(x.shape(), [3, 224, 224], "DINOv2 preprocessing output shape");
    }
}

/// The GLUE TSV parser of `xtask bench` (every task's dialect) on the input as text.
pub fn tsv(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for task in glue::tasks::Task::ALL {
        if let Ok(rows) = glue::data::parse(text, task) {
            assert!(rows.len() <= text.lines().count(), "{task:?}: more rows than lines");
        }
    }
}

/// COCO annotations (peft-vl): the input splits ([`crate::split2`] twice) into a captions file, an instances file
/// (empty: none) and a Karpathy split file. A split that parses is internally consistent (every caption and
/// instance belongs to a listed image, ids are unique, every instance's category is defined), and regrouping it
/// by a Karpathy split that parses places every entry exactly once (or counts it missing).
pub fn coco(data: &[u8]) {
    use peft_vl::coco::{Coco, CocoSplit, KarpathySplit};
    let (captions, rest) = crate::split2(data);
    let (instances, karpathy) = crate::split2(rest);
    let (Ok(captions), Ok(instances), Ok(karpathy)) =
        (std::str::from_utf8(captions), std::str::from_utf8(instances), std::str::from_utf8(karpathy))
    else {
        return;
    };
    let instances = (!instances.is_empty()).then_some(instances);
    let Ok(split) = CocoSplit::from_json_str("fuzz", "images", captions, instances) else { return };
    let (texts, owners) = split.caption_pairs();
    assert_eq!(texts.len(), owners.len(), "one owner per caption");
    assert_eq!(texts.len(), split.num_captions(), "num_captions counts caption_pairs");
    assert!(owners.iter().all(|&i| i < split.images.len()), "a caption's owner is a listed image");
    assert_eq!(split.image_paths().len(), split.images.len(), "one path per image");
    let mut ids = std::collections::HashSet::new();
    for im in &split.images {
        assert!(ids.insert(im.id), "image id {} kept twice", im.id);
        for inst in &im.instances {
            assert!(split.category_name(inst.category_id).is_some(), "instance of undefined category");
        }
    }
    let Ok(k) = KarpathySplit::from_json_str("fuzz", karpathy) else { return };
    let coco = Coco { train: split.clone(), val: split };
    let out = coco.karpathy(&k);
    let placed = out.train.images.len() + out.val.images.len() + out.test.images.len();
    assert_eq!(placed + out.missing, k.images.len(), "every Karpathy entry placed once or counted missing");
}

/// A target: its name and its function.
pub type Target = (&'static str, fn(&[u8]));

/// Every target by name (the replay test and `fuzz/run.sh` list them from here).
pub const ALL: [Target; 9] = [
    ("safetensors", safetensors),
    ("bnb", bnb),
    ("gguf", gguf),
    ("adapter", adapter),
    ("hf_model", hf_model),
    ("wav", wav),
    ("image", image),
    ("tsv", tsv),
    ("coco", coco),
];

/// Runs target `name` on every file in `dir` (sorted); returns how many it ran.
///
/// # Panics
/// An unknown target name or an unreadable folder; and whatever the target panics with.
pub fn replay_dir(name: &str, dir: &Path) -> usize {
    let f = ALL.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("no target {name}")).1;
    let mut files: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.map(|e| e.expect("listing corpus").path()).filter(|p| p.is_file()).collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    files.sort();
    for p in &files {
        let data = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        eprintln!("{name}: {}", p.display());
        f(&data);
    }
    files.len()
}
