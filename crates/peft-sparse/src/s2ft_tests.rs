use ndarray::{ArrayD, IxDyn};
use peft_core::adapter::{AdapterError, PeftModel};
use peft_core::nn::Ctx;
use peft_core::testing::{array_strategy, assert_grads, max_abs_diff};
use peft_core::train::{Loss, Trainer, TrainerConfig};
use proptest::prelude::*;

use super::*;
use crate::registry;
use crate::testutil::{input, Tiny};

const D: usize = 8;
const VALUE: &str = r".*encoder\.layer\.\d+\.attention\.self\.value";
const DOWN: &str = r".*encoder\.layer\.\d+\.output\.dense";

fn config() -> S2ftConfig {
    S2ftConfig {
        peft_type: S2ftConfig::PEFT_TYPE.into(),
        value_modules: Some(ModulePattern::Regex(VALUE.into())),
        attn_output_modules: None,
        up_modules: None,
        down_modules: Some(ModulePattern::Regex(DOWN.into())),
        num_heads: 4,
        v_ratio: 0.5,
        o_ratio: 0.0,
        u_ratio: 0.0,
        d_ratio: 0.25,
        selected: None,
        modules_to_save: None,
        inference_mode: false,
    }
}

fn model(c: S2ftConfig, seed: u64) -> PeftModel<Tiny> {
    PeftModel::new(Tiny::new(D, 2, 1), c, "default", seed).unwrap()
}

fn s2ft(m: &PeftModel<Tiny>) -> &S2ftTuner {
    m.tuner("default").unwrap().as_any().downcast_ref::<S2ftTuner>().unwrap()
}

fn train(m: &PeftModel<Tiny>, steps: usize) {
    let x = input(6, D, 4);
    let cfg = TrainerConfig { lr: 2e-2, total_steps: steps, ..TrainerConfig::default() };
    let mut t = Trainer::new(m.trainable_params(), m, cfg).unwrap();
    for _ in 0..steps {
        t.step(|ctx| Ok(Loss::Single(m.forward(&x, ctx)?.square().mean_all()))).unwrap();
    }
}

#[test]
fn identity_at_init_and_the_trainable_count_of_the_spec() {
    let x = input(5, D, 9);
    let y0 = Tiny::new(D, 2, 1).forward(&x, &Ctx::eval()).unwrap();
    let m = model(config(), 3);
    assert_eq!(m.forward(&x, &Ctx::eval()).unwrap().to_vec(), y0.to_vec());
    let t = s2ft(&m);
    let (mut heads, mut channels) = (0, 0);
    for (s, l) in t.layers() {
        match l.kind() {
            BlockKind::Rows => {
                assert!(s.path().ends_with("value"));
                heads += l.units().len();
                assert_eq!(l.covered().len(), 2 * l.units().len());
            }
            BlockKind::Cols => {
                assert!(s.path().ends_with("output.dense"));
                channels += l.units().len();
                assert_eq!(l.covered(), l.units());
            }
        }
    }
    // Global draws: ⌊0.5 · 2 layers · 4 heads⌋ heads and ⌊0.25 · 2 · 8⌋ channels.
    assert_eq!((heads, channels), (4, 4));
    let trainable: usize = m.trainable_params().iter().map(|p| p.numel()).sum();
    assert_eq!(trainable, heads * 2 * D + channels * D);
}

#[test]
fn blocks_touch_only_their_rows_or_columns_and_merge_equals_unmerged() {
    let mut m = model(config(), 3);
    let before: Vec<Vec<f32>> = m.base_params().iter().map(|p| p.value().iter().copied().collect()).collect();
    train(&m, 5);
    let x = input(5, D, 2);
    let y = m.forward(&x, &Ctx::eval()).unwrap();
    for (s, l) in s2ft(&m).layers() {
        let dw = l.delta_weight(s.base().as_ref()).unwrap().unwrap();
        assert!(dw.iter().any(|v| *v != 0.0));
        for ((r, c), v) in dw.indexed_iter().map(|(i, v)| ((i[0], i[1]), v)) {
            let inside = match l.kind() {
                BlockKind::Rows => l.covered().contains(&r),
                BlockKind::Cols => l.covered().contains(&c),
            };
            if !inside {
                assert_eq!(*v, 0.0);
            }
        }
        // The block's term is x ΔWᵀ.
        let want = x.linear(&Tensor::new(dw), None).unwrap();
        let got = block_delta(&x, &l.block().tensor(), l.kind(), l.covered(), D, D).unwrap();
        assert!(max_abs_diff(want.as_slice(), got.as_slice()) <= 1e-6);
    }
    m.merge_adapter().unwrap();
    assert!(max_abs_diff(m.forward(&x, &Ctx::eval()).unwrap().as_slice(), y.as_slice()) <= 1e-5);
    m.unmerge_adapter().unwrap();
    let after: Vec<Vec<f32>> = m.base_params().iter().map(|p| p.value().iter().copied().collect()).collect();
    for (a, b) in after.iter().zip(&before) {
        assert!(max_abs_diff(a, b) <= 1e-6);
    }
}

proptest! {
    #![proptest_config(peft_core::testing::proptest_config(32))]
    #[test]
    fn block_grads_match_finite_differences(
        x in array_strategy(vec![3, 6], -1.0, 1.0),
        rows in array_strategy(vec![2, 6], -1.0, 1.0),
        cols in array_strategy(vec![5, 3], -1.0, 1.0),
        pick in prop::collection::btree_set(0usize..5, 2),
        pick_c in prop::collection::btree_set(0usize..6, 3),
    ) {
        let idx: Vec<usize> = pick.into_iter().collect();
        let idx_c: Vec<usize> = pick_c.into_iter().collect();
        assert_grads(|t| Ok(block_delta(&t[0], &t[1], BlockKind::Rows, &idx, 6, 5)?.tanh()), &[x.clone(), rows]);
        assert_grads(|t| Ok(block_delta(&t[0], &t[1], BlockKind::Cols, &idx_c, 6, 5)?.tanh()), &[x, cols]);
    }
}

#[test]
fn save_load_save_is_byte_identical_and_the_selection_travels_in_the_config() {
    let m = model(config(), 3);
    train(&m, 3);
    let x = input(3, D, 8);
    let y = m.forward(&x, &Ctx::eval()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    let sel = cfg["selected"].as_object().unwrap();
    assert_eq!(sel.len(), s2ft(&m).layers().len());
    // Loading rebuilds the recorded selection (no new draw).
    let (m2, report) = PeftModel::from_pretrained(Tiny::new(D, 2, 1), dir.path(), &registry()).unwrap();
    assert!(report.unexpected.is_empty(), "{report:?}");
    assert_eq!(m2.forward(&x, &Ctx::eval()).unwrap().to_vec(), y.to_vec());
    let dir2 = tempfile::tempdir().unwrap();
    m2.save_pretrained(dir2.path()).unwrap();
    crate::testutil::assert_same_adapter_files(dir.path(), dir2.path());
    // A recorded selection out of range is a typed config error.
    let mut bad = cfg.clone();
    let path = sel.keys().next().unwrap().clone();
    bad["selected"][&path] = serde_json::json!([0, 99]);
    std::fs::write(dir.path().join("adapter_config.json"), serde_json::to_string(&bad).unwrap()).unwrap();
    let Err(e) = PeftModel::from_pretrained(Tiny::new(D, 2, 1), dir.path(), &registry()) else { panic!("loaded") };
    assert!(matches!(&e, AdapterError::InvalidConfig { field, .. } if field == "selected"), "{e:?}");
}

#[test]
fn selection_is_seeded() {
    let sel = |seed| s2ft(&model(config(), seed)).layers().iter().map(|(_, l)| l.units().to_vec()).collect::<Vec<_>>();
    assert_eq!(sel(3), sel(3));
    assert!((0..6).any(|s| sel(s) != sel(3)));
}

#[test]
fn bad_configs_are_typed_errors() {
    let cases: Vec<(S2ftConfig, &str)> = vec![
        (S2ftConfig { num_heads: 0, ..config() }, "num_heads"),
        (S2ftConfig { num_heads: 3, ..config() }, "num_heads"),
        (S2ftConfig { v_ratio: 1.5, ..config() }, "v_ratio"),
        (S2ftConfig { v_ratio: 0.0, d_ratio: 0.01, ..config() }, "ratios"),
        (S2ftConfig { up_modules: Some(ModulePattern::Regex(DOWN.into())), u_ratio: 0.25, ..config() }, "down_modules"),
    ];
    for (c, field) in cases {
        let Err(e) = PeftModel::new(Tiny::new(D, 2, 1), c, "default", 0) else { panic!("accepted {field}") };
        assert!(matches!(&e, AdapterError::InvalidConfig { field: f, .. } if f == field), "{field}: {e:?}");
    }
    let c = config();
    let (back, ignored) = S2ftConfig::from_json(&c.to_json().unwrap()).unwrap();
    assert_eq!(back, c);
    assert!(ignored.is_empty());
    let bert = S2ftConfig::bert(12);
    assert_eq!((bert.o_ratio, bert.d_ratio, bert.v_ratio, bert.u_ratio), (0.052, 0.02, 0.0, 0.0));
    // A group with ratio 0 need not match anything; a used one must.
    let unused = S2ftConfig { up_modules: Some(ModulePattern::Regex("nothing".into())), ..config() };
    assert!(PeftModel::new(Tiny::new(D, 2, 1), unused, "default", 0).is_ok());
    let used = S2ftConfig { up_modules: Some(ModulePattern::Regex("nothing".into())), u_ratio: 0.5, ..config() };
    let Err(e) = PeftModel::new(Tiny::new(D, 2, 1), used, "default", 0) else { panic!("accepted") };
    assert!(e.to_string().contains("no adapter site matched"), "{e}");
}

#[test]
fn selector_gathers_and_scatters() {
    let x = Tensor::new(ArrayD::from_shape_vec(IxDyn(&[1, 4]), vec![1.0f32, 2.0, 3.0, 4.0]).unwrap());
    let eye = Tensor::new(ArrayD::from_shape_vec(IxDyn(&[2, 2]), vec![1.0f32, 0.0, 0.0, 1.0]).unwrap());
    // Cols: x[:, [1, 3]] through an identity block.
    assert_eq!(block_delta(&x, &eye, BlockKind::Cols, &[1, 3], 4, 2).unwrap().to_vec(), vec![2.0, 4.0]);
    // Rows: a 2-vector scattered into positions 0 and 2 of 3.
    let v = Tensor::new(ArrayD::from_shape_vec(IxDyn(&[1, 2]), vec![5.0f32, 6.0]).unwrap());
    assert_eq!(block_delta(&v, &eye, BlockKind::Rows, &[0, 2], 2, 3).unwrap().to_vec(), vec![5.0, 0.0, 6.0]);
}

#[test]
fn co_permutation_preserves_the_function_and_makes_the_blocks_contiguous() {
    // A toy attention-like pair: value rows in 4 heads of 2, output columns in the same heads.
    let (h, hd, d) = (4usize, 2usize, 5usize);
    use peft_core::nn::WeightSource;
    let init = peft_core::nn::RandomInit::new(7, 0.5);
    let wv = init.get("v", &[h * hd, d]).unwrap();
    let wo = init.get("o", &[d, h * hd]).unwrap();
    let x = input(3, d, 1);
    let f = |wv: &ArrayD<f32>, wo: &ArrayD<f32>| {
        x.linear(&Tensor::new(wv.clone()), None).unwrap().tanh().linear(&Tensor::new(wo.clone()), None).unwrap()
    };
    let y = f(&wv, &wo);
    let (v_sel, o_sel) = (vec![1usize, 3], vec![0usize, 3]);
    let order = co_permutation(&v_sel, &o_sel, h);
    assert_eq!(order, vec![1, 3, 0, 2]);
    let rows: Vec<usize> = order.iter().flat_map(|&u| u * hd..(u + 1) * hd).collect();
    let pv = ArrayD::from_shape_fn(IxDyn(&[h * hd, d]), |i| wv[[rows[i[0]], i[1]]]);
    let po = ArrayD::from_shape_fn(IxDyn(&[d, h * hd]), |i| wo[[i[0], rows[i[1]]]]);
    assert!(max_abs_diff(f(&pv, &po).as_slice(), y.as_slice()) <= 1e-6);
    // §3.3's ranges: v heads at [0, |only_v| + |v∩o|), o heads at [|only_v|, |only_v| + |v∩o| + |only_o|).
    let pos = |u: usize| order.iter().position(|&o| o == u).unwrap();
    let (only_v, both, only_o) = (1, 1, 1);
    assert!(v_sel.iter().all(|&u| pos(u) < only_v + both));
    assert!(o_sel.iter().all(|&u| (only_v..only_v + both + only_o).contains(&pos(u))));
}
