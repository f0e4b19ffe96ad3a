use super::*;
use ndarray::array;
use peft_core::testing::gradcheck;

fn rand_arr(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = Normal::new(0.0, 1.0).unwrap();
    ArrayD::from_shape_fn(IxDyn(shape), |_| n.sample(&mut rng))
}

fn cfg(kind: HeadKind) -> RetrievalConfig {
    RetrievalConfig { image_dim: 6, text_dim: 5, joint_dim: 4, kind, temperature: 0.1 }
}

#[test]
fn info_nce_gradients_match_finite_differences() {
    let f = |x: &[Tensor<f64>]| -> peft_core::Result<Tensor<f64>> {
        info_nce(&l2_rows(&x[0])?, &l2_rows(&x[1])?, 0.2)?.reshape(&[1])
    };
    gradcheck(f, &[rand_arr(&[3, 4], 1), rand_arr(&[3, 4], 2)], 1e-6, 1e-7, 1e-5).unwrap();
}

#[test]
fn adapter_gradients_match_finite_differences() {
    let f = |x: &[Tensor<f64>]| -> peft_core::Result<Tensor<f64>> {
        let p: [Tensor<f64>; 6] = std::array::from_fn(|i| x[i + 1].clone());
        adapter_forward(&x[0], &p)
    };
    // a non-zero up projection, so every parameter gets a gradient
    let inputs = [
        rand_arr(&[3, 4], 3),
        rand_arr(&[4], 4).mapv(|v| 1.0 + 0.1 * v),
        rand_arr(&[4], 5),
        rand_arr(&[2, 4], 6),
        rand_arr(&[2], 7),
        rand_arr(&[4, 2], 8),
        rand_arr(&[4], 9),
    ];
    gradcheck(f, &inputs, 1e-6, 1e-7, 1e-5).unwrap();
}

#[test]
fn adapter_heads_equal_linear_heads_at_init() {
    let lin = RetrievalHeads::new(cfg(HeadKind::Linear), 7).unwrap();
    let img = rand_arr(&[3, 6], 10).mapv(|v| v as f32).into_dimensionality().unwrap();
    let txt = rand_arr(&[3, 5], 11).mapv(|v| v as f32).into_dimensionality().unwrap();
    for shared in [true, false] {
        let ad = RetrievalHeads::new(cfg(HeadKind::Adapter { bottleneck: 2, shared }), 7).unwrap();
        assert_eq!(ad.embed_images(&img).unwrap(), lin.embed_images(&img).unwrap());
        assert_eq!(ad.embed_texts(&txt).unwrap(), lin.embed_texts(&txt).unwrap());
    }
}

#[test]
fn shared_adapter_is_one_set_of_tensors_for_both_modalities() {
    let shared = RetrievalHeads::new(cfg(HeadKind::Adapter { bottleneck: 2, shared: true }), 0).unwrap();
    let (a, b) = (shared.image_adapter.as_ref().unwrap(), shared.text_adapter.as_ref().unwrap());
    assert_eq!(a.down_weight.id(), b.down_weight.id());
    assert_eq!(a.up_weight.id(), b.up_weight.id());
    let proj = 4 * 6 + 4 + 4 * 5 + 4;
    let adapter = 4 + 4 + 2 * 4 + 2 + 4 * 2 + 4;
    assert_eq!(shared.num_trainable(), proj + adapter);
    let separate = RetrievalHeads::new(cfg(HeadKind::Adapter { bottleneck: 2, shared: false }), 0).unwrap();
    assert_ne!(
        separate.image_adapter.as_ref().unwrap().up_weight.id(),
        separate.text_adapter.as_ref().unwrap().up_weight.id()
    );
    assert_eq!(separate.num_trainable(), proj + 2 * adapter);
    assert_eq!(RetrievalHeads::new(cfg(HeadKind::Untrained), 0).unwrap().num_trainable(), 0);
}

#[test]
fn recall_counts_any_own_caption_for_images_and_the_own_image_for_captions() {
    // 2 images, 3 captions: captions 0, 1 belong to image 0; caption 2 to image 1
    let sim = array![[0.1f32, 0.9, 0.5], [0.8, 0.2, 0.3]];
    let r = recall_at_k(&sim, &[0, 0, 1], &[1, 2]).unwrap();
    // image 0: best own caption (1, 0.9) ranks first; image 1: own caption 2 (0.3) is beaten by 0.8 -> rank 1
    assert_eq!(r.i2t, vec![0.5, 1.0]);
    // caption 0: own image scores 0.1 < 0.8 -> rank 1; caption 1: rank 0; caption 2: 0.3 < 0.5 -> rank 1
    assert_eq!(r.t2i, vec![1.0 / 3.0, 1.0]);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let sim = array![[0.1f32, 0.9]];
    assert!(matches!(recall_at_k(&sim, &[0], &[1]), Err(VlError::Count { .. })));
    assert!(matches!(recall_at_k(&sim, &[0, 1], &[1]), Err(VlError::Count { .. })));
    assert!(matches!(recall_at_k(&array![[0.1f32], [0.2]], &[0], &[1]), Err(VlError::Empty { .. })));
    let mut c = cfg(HeadKind::Linear);
    c.temperature = 0.0;
    assert!(matches!(RetrievalHeads::new(c, 0), Err(VlError::InvalidConfig { what: "temperature", .. })));
    c = cfg(HeadKind::Adapter { bottleneck: 0, shared: true });
    assert!(matches!(RetrievalHeads::new(c, 0), Err(VlError::InvalidConfig { what: "bottleneck", .. })));
    let h = RetrievalHeads::new(cfg(HeadKind::Linear), 0).unwrap();
    assert!(matches!(h.embed_images(&Array2::zeros((2, 5))), Err(VlError::Count { .. })));
    let un = RetrievalHeads::new(cfg(HeadKind::Untrained), 0).unwrap();
    let tc = TrainConfig { epochs: 1, batch_size: 2, lr: 1e-2, weight_decay: 0.0, seed: 0 };
    let e = train(&un, &Array2::zeros((2, 6)), &Array2::zeros((2, 5)), &[0, 1], &tc).unwrap_err();
    assert!(matches!(e, VlError::Empty { .. }), "{e}");
}

/// Synthetic paired data: text features are a fixed random linear map of the image features plus noise, two
/// captions per image. Training must lift held-out R@1 well above the untrained heads' chance level.
#[test]
fn training_learns_a_linear_correspondence() {
    let (di, dt, n) = (12, 10, 64);
    let map = rand_arr(&[di, dt], 20).mapv(|v| v as f32).into_dimensionality::<ndarray::Ix2>().unwrap();
    let mk = |seed: u64| {
        let img: Array2<f32> = rand_arr(&[n, di], seed).mapv(|v| v as f32).into_dimensionality().unwrap();
        let noise: Array2<f32> =
            rand_arr(&[2 * n, dt], seed + 1).mapv(|v| 0.3 * v as f32).into_dimensionality().unwrap();
        let owner: Vec<usize> = (0..2 * n).map(|j| j / 2).collect();
        let txt = img.select(Axis(0), &owner).dot(&map) + noise;
        (img, txt, owner)
    };
    let (tri, trt, tro) = mk(100);
    let (vi, vt, vo) = mk(200);
    let c = RetrievalConfig { image_dim: di, text_dim: dt, joint_dim: 8, kind: HeadKind::Linear, temperature: 0.1 };
    let eval = |h: &RetrievalHeads| {
        recall_at_k(&similarity(&h.embed_images(&vi).unwrap(), &h.embed_texts(&vt).unwrap()), &vo, &[1]).unwrap()
    };
    let before = eval(&RetrievalHeads::new(RetrievalConfig { kind: HeadKind::Untrained, ..c }, 0).unwrap());
    let heads = RetrievalHeads::new(c, 0).unwrap();
    let tc = TrainConfig { epochs: 40, batch_size: 16, lr: 1e-2, weight_decay: 0.0, seed: 0 };
    let losses = train(&heads, &tri, &trt, &tro, &tc).unwrap();
    assert_eq!(losses.len(), 40 * 4);
    let first: f32 = losses[..4].iter().sum::<f32>() / 4.0;
    let last: f32 = losses[losses.len() - 4..].iter().sum::<f32>() / 4.0;
    assert!(last < 0.5 * first, "loss {first} -> {last}");
    let after = eval(&heads);
    assert!(after.t2i[0] > 0.5 && after.i2t[0] > 0.5, "trained R@1 {after:?}");
    assert!(before.t2i[0] < 0.2, "untrained R@1 {before:?}");
}
