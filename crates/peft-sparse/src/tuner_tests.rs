use ndarray::{ArrayD, IxDyn};
use peft_core::adapter::{PeftModel, TunerConfig};
use peft_core::nn::Ctx;
use peft_core::testing::max_abs_diff;
use peft_core::train::{Loss, Trainer, TrainerConfig};

use crate::memory::{adamw_bytes_for, optimizer_state_bytes, sparse_memory};
use crate::testutil::{input, Tiny};
use crate::tuner::MaskInit;
use crate::{registry, LtSftConfig, SparseError, SparseFtConfig, SparseTuner, SpielConfig, ENCODER_WEIGHTS};

const TARGET: &str = r".*encoder\.layer\.\d+\..*\.weight";

fn sparse(m: &PeftModel<Tiny>) -> &SparseTuner {
    m.tuner("default").unwrap().as_any().downcast_ref::<SparseTuner>().unwrap()
}

fn train(m: &PeftModel<Tiny>, d: usize, steps: usize, lr: f64) -> Trainer<'_> {
    let x = input(6, d, 4);
    let cfg = TrainerConfig { lr, total_steps: steps, ..TrainerConfig::default() };
    let mut t = Trainer::new(m.trainable_params(), m, cfg).unwrap();
    for _ in 0..steps {
        t.step(|ctx| Ok(Loss::Single(m.forward(&x, ctx)?.square().mean_all()))).unwrap();
    }
    t
}

/// Saves, loads into a fresh model, saves again: both files byte-identical, outputs equal.
fn assert_round_trip(config: impl TunerConfig + Clone, d: usize) {
    let m = PeftModel::new(Tiny::new(d, 2, 1), config, "default", 5).unwrap();
    drop(train(&m, d, 4, 1e-2));
    let x = input(3, d, 8);
    let y = m.forward(&x, &Ctx::eval()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path()).unwrap();
    let (m2, report) = PeftModel::from_pretrained(Tiny::new(d, 2, 1), dir.path(), &registry()).unwrap();
    assert!(report.unexpected.is_empty(), "{report:?}");
    let y2 = m2.forward(&x, &Ctx::eval()).unwrap();
    assert!(max_abs_diff(y.as_slice(), y2.as_slice()) <= 1e-6);
    let dir2 = tempfile::tempdir().unwrap();
    m2.save_pretrained(dir2.path()).unwrap();
    crate::testutil::assert_same_adapter_files(dir.path(), dir2.path());
}

#[test]
fn sparse_ft_save_load_save_is_byte_identical() {
    assert_round_trip(SparseFtConfig::new(TARGET, 0.25), 8);
}

#[test]
fn spiel_save_load_save_is_byte_identical() {
    let mut c = SpielConfig::new(TARGET, 0.25);
    (c.reselection_steps, c.accumulation_steps) = (3, 1);
    assert_round_trip(c, 8);
}

#[test]
fn lt_sft_save_load_save_is_byte_identical() {
    let mut c = LtSftConfig::new(TARGET, 0.25);
    c.full_steps = 2;
    assert_round_trip(c, 8);
}

#[test]
fn file_holds_indices_and_values_per_tensor_with_peft_type() {
    let m = PeftModel::new(Tiny::new(8, 2, 1), SparseFtConfig::new(TARGET, 0.25), "default", 5).unwrap();
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "SPARSE_FT");
    let f = peft_core::io::SafeTensorsFile::open(dir.path().join("adapter_model.safetensors")).unwrap();
    let key = "base_model.model.encoder.layer.0.attention.self.query.weight";
    assert_eq!(f.shape(&format!("{key}.indices")).unwrap(), &[16]);
    assert_eq!(f.shape(&format!("{key}.values")).unwrap(), &[16]);
    assert_eq!(f.len(), 12);
}

#[test]
fn loading_corrupt_indices_is_a_typed_error() {
    let m = PeftModel::new(Tiny::new(8, 2, 1), SparseFtConfig::new(TARGET, 0.25), "default", 5).unwrap();
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path()).unwrap();
    let path = dir.path().join("adapter_model.safetensors");
    let key = "base_model.model.encoder.layer.1.output.dense.weight.indices";
    type Check = fn(&SparseError) -> bool;
    let unsorted: Check = |e| matches!(e, SparseError::Unsorted { .. });
    let out_of_range: Check = |e| matches!(e, SparseError::IndexOutOfRange { index: 64, numel: 64, .. });
    let fractional: Check = |e| matches!(e, SparseError::BadIndexValue { .. });
    for (bad, want, typed) in [
        (vec![3.0f32, 1.0], "strictly increasing", unsorted),
        (vec![1.0, 1.0], "strictly increasing", unsorted),
        (vec![1.0, 64.0], "out of range", out_of_range),
        (vec![0.5, 2.0], "not a non-negative integer", fractional),
    ] {
        let mut tensors = peft_core::io::read_safetensors(&path).unwrap();
        let t = tensors.get_mut(key).unwrap();
        let mut v: Vec<f32> = (0..16).map(|i| i as f32).collect();
        v[..2].copy_from_slice(&bad);
        if bad[1] == 64.0 {
            v = (0..16).map(|i| i as f32).collect();
            v[15] = 64.0;
        }
        *t = ArrayD::from_shape_vec(IxDyn(&[16]), v).unwrap();
        let bad_dir = tempfile::tempdir().unwrap();
        std::fs::copy(dir.path().join("adapter_config.json"), bad_dir.path().join("adapter_config.json")).unwrap();
        peft_core::io::write_safetensors(bad_dir.path().join("adapter_model.safetensors"), tensors.iter(), None)
            .unwrap();
        let Err(e) = PeftModel::from_pretrained(Tiny::new(8, 2, 1), bad_dir.path(), &registry()) else {
            panic!("loaded corrupt indices {bad:?}")
        };
        assert!(e.to_string().contains(want), "{e}");
        assert!(SparseError::of_adapter(&e).is_some_and(typed), "{e:?}");
    }
}

#[test]
fn length_mismatch_in_file_is_refused() {
    let m = PeftModel::new(Tiny::new(8, 2, 1), SparseFtConfig::new(TARGET, 0.25), "default", 5).unwrap();
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path()).unwrap();
    let path = dir.path().join("adapter_model.safetensors");
    let mut tensors = peft_core::io::read_safetensors(&path).unwrap();
    let key = "base_model.model.encoder.layer.0.attention.self.value.weight.values";
    *tensors.get_mut(key).unwrap() = ArrayD::zeros(IxDyn(&[15]));
    peft_core::io::write_safetensors(&path, tensors.iter(), None).unwrap();
    let Err(e) = PeftModel::from_pretrained(Tiny::new(8, 2, 1), dir.path(), &registry()) else {
        panic!("loaded a length mismatch")
    };
    assert!(e.to_string().contains("16 indices but 15 values"), "{e}");
    assert!(
        matches!(SparseError::of_adapter(&e), Some(SparseError::LengthMismatch { indices: 16, values: 15, .. })),
        "{e:?}"
    );
}

#[test]
fn training_leaves_the_base_weights_untouched_and_moves_only_k_entries() {
    let m = PeftModel::new(Tiny::new(8, 2, 1), SparseFtConfig::new(TARGET, 0.25), "default", 5).unwrap();
    let before: Vec<Vec<u32>> =
        m.base_params().iter().map(|p| p.value().iter().map(|x| x.to_bits()).collect()).collect();
    drop(train(&m, 8, 5, 1e-2));
    let after: Vec<Vec<u32>> =
        m.base_params().iter().map(|p| p.value().iter().map(|x| x.to_bits()).collect()).collect();
    assert_eq!(before, after);
    for (_, d) in sparse(&m).entries() {
        assert!(d.values().value().iter().all(|v| *v != 0.0 && v.is_finite()));
    }
}

#[test]
fn optimizer_state_is_o_k_and_independent_of_model_size() {
    // Same k = 16 per tensor on 16x16 and 32x32 weights.
    let mut bytes = Vec::new();
    for (d, density) in [(16usize, 1.0 / 16.0), (32, 1.0 / 64.0)] {
        let m = PeftModel::new(Tiny::new(d, 2, 1), SparseFtConfig::new(TARGET, density), "default", 5).unwrap();
        let mem = sparse_memory(sparse(&m));
        assert_eq!(mem.trainable_entries, 96);
        assert_eq!(mem.index_bytes, 4 * 96);
        let t = train(&m, d, 2, 1e-2);
        let b = optimizer_state_bytes(t.optimizer());
        assert!(b <= 2 * adamw_bytes_for(96, 6), "{b}");
        assert_eq!(b, adamw_bytes_for(96, 6));
        bytes.push(b);
    }
    assert_eq!(bytes[0], bytes[1]);
}

#[test]
fn magnitude_mask_picks_the_largest_weights() {
    let mut c = SparseFtConfig::new(TARGET, 0.25);
    c.mask_init = MaskInit::Magnitude;
    let m = PeftModel::new(Tiny::new(8, 2, 1), c, "default", 5).unwrap();
    for (p, d) in sparse(&m).entries() {
        let w: Vec<f32> = p.value().iter().map(|x| x.abs()).collect();
        let idx = d.indices();
        let min_in = idx.iter().map(|i| w[i]).fold(f32::INFINITY, f32::min);
        let max_out = (0..w.len()).filter(|&i| idx.position(i).is_none()).map(|i| w[i]).fold(0.0, f32::max);
        assert!(min_in >= max_out);
    }
}

#[test]
fn bad_density_and_unmatched_targets_are_config_errors() {
    let Err(e) = PeftModel::new(Tiny::new(8, 2, 1), SparseFtConfig::new(TARGET, 1.5), "default", 5) else {
        panic!("accepted")
    };
    assert!(e.to_string().contains("density"), "{e}");
    let Err(e) = PeftModel::new(Tiny::new(8, 2, 1), SparseFtConfig::new("nothing", 0.1), "default", 5) else {
        panic!("accepted")
    };
    assert!(e.to_string().contains("no adapter site matched"), "{e}");
}

#[test]
fn bench_target_regex_matches_bert_encoder_weights_only() {
    let re = regex::Regex::new(&format!(r"\A(?:{ENCODER_WEIGHTS})\z")).unwrap();
    assert!(re.is_match("encoder.layer.3.attention.self.query.weight"));
    assert!(re.is_match("bert.encoder.layer.0.intermediate.dense.weight"));
    assert!(re.is_match("encoder.layer.0.attention.output.dense.weight"));
    assert!(!re.is_match("encoder.layer.0.attention.output.LayerNorm.weight"));
    assert!(!re.is_match("encoder.layer.0.attention.self.query.bias"));
    assert!(!re.is_match("embeddings.word_embeddings.weight"));
    let all = regex::Regex::new(&format!(r"\A(?:{})\z", crate::ENCODER_LAYER_PARAMS)).unwrap();
    assert!(all.is_match("encoder.layer.0.attention.output.LayerNorm.weight"));
    assert!(all.is_match("bert.encoder.layer.5.output.dense.bias"));
    assert!(!all.is_match("embeddings.LayerNorm.weight"));
    assert!(!all.is_match("classifier.weight"));
}

#[test]
fn registry_names_are_unique() {
    assert_eq!(peft_core::adapter::duplicate_name(&crate::methods()), None);
    let names: Vec<&str> = crate::methods().iter().map(|m| m.name.0).collect();
    assert_eq!(
        names,
        [
            "sparse-ft",
            "lt-sft",
            "spiel",
            "spiel-c3",
            "mosa",
            "r-amt",
            "sara",
            "s2ft",
            "spt",
            "squarehead-50",
            "squarehead-75",
            "squarehead-90"
        ]
    );
    let types = registry().peft_types();
    for t in ["SPARSE_FT", "LT_SFT", "SPIEL", "MOSA", "R_AMT", "SARA", "S2FT", "SPT", "SQUAREHEAD"] {
        assert!(types.contains(&t));
    }
}
