use peft_core::nn::{Linear, RandomInit, ResidualSite, Visitor, WeightSource};
use peft_core::testing::max_abs_diff;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;
use crate::structured::fdcheck;
use crate::testutil::input;

/// One post-norm-style layer with BERT names: `h = x + tanh(q(x)) + v(x)`, `out = h + res(fc2(gelu(fc1(h))), h)`,
/// then a classifier.
struct Block {
    q: Linear,
    v: Linear,
    res_attn: ResidualSite,
    fc1: Linear,
    fc2: Linear,
    res: ResidualSite,
    cls: Linear,
}

fn block(d: usize, i: usize) -> Block {
    let init = RandomInit::new(0, 0.4);
    let l = |p: &str, a, b| Linear::load(p, a, b, true, &init).unwrap();
    Block {
        q: l("encoder.layer.0.attention.self.query", d, d),
        v: l("encoder.layer.0.attention.self.value", d, d),
        res_attn: ResidualSite::new("encoder.layer.0.attention.output"),
        fc1: l("encoder.layer.0.intermediate.dense", d, i),
        fc2: l("encoder.layer.0.output.dense", i, d),
        res: ResidualSite::new("encoder.layer.0.output"),
        cls: l("classifier", d, 3).as_output(),
    }
}

impl Block {
    fn ffn_in(&self, x: &Tensor, ctx: &Ctx) -> Tensor {
        let a = self.q.forward(x, ctx).unwrap().tanh().add(&self.v.forward(x, ctx).unwrap()).unwrap();
        x.add(&self.res_attn.forward(a, x, ctx).unwrap()).unwrap()
    }
    fn forward(&self, x: &Tensor, ctx: &Ctx) -> Tensor {
        let h = self.ffn_in(x, ctx);
        let f = self.fc2.forward(&self.fc1.forward(&h, ctx).unwrap().gelu(), ctx).unwrap();
        let f = self.res.forward(f, &h, ctx).unwrap();
        self.cls.forward(&h.add(&f).unwrap(), ctx).unwrap()
    }
}

impl Module for Block {
    fn visit(&self, v: &mut dyn Visitor) {
        for s in [&self.q, &self.v] {
            s.visit(v);
        }
        self.res_attn.visit(v);
        for s in [&self.fc1, &self.fc2] {
            s.visit(v);
        }
        self.res.visit(v);
        self.cls.visit(v);
    }
}

fn cfg(e: usize, k: usize, attention: &[&str]) -> MixLoraConfig {
    let mut c = MixLoraConfig::bert(attention.iter().copied());
    c.num_experts = e;
    c.top_k = k;
    c.r = 2;
    c.lora_alpha = 3.0;
    c.router_init_range = 0.5;
    c
}

fn perturb(params: &[Param], seed: u64) {
    for (i, p) in params.iter().enumerate() {
        p.set(RandomInit::new(seed + i as u64, 0.3).get("p", &p.shape()).unwrap()).unwrap();
    }
}

fn m2(p: &Param) -> Array2<f32> {
    p.value().to_owned().into_dimensionality().unwrap()
}

fn t2(t: &Tensor) -> Array2<f32> {
    t.data()
        .to_owned()
        .into_shape_with_order((t.len() / t.shape().last().unwrap(), *t.shape().last().unwrap()))
        .unwrap()
}

#[test]
fn mixlora_is_identity_at_init() {
    let b = block(6, 10);
    let x = input(5, 6, 1);
    let y0 = b.forward(&x, &Ctx::eval()).to_vec();
    let mm = MixLoraModel::new(&b, cfg(4, 2, &["query", "value"]), "default", 0).unwrap();
    assert_eq!(mm.ffns.len(), 1, "the attention residual site has no FFN");
    assert!(max_abs_diff(&b.forward(&x, &Ctx::eval()).to_vec(), &y0) < 1e-6);
    // Router E·d + E experts · r·(d + i + i + d) + attention 2 sites · r·2d.
    let n: usize = mm.trainable_params().iter().map(Param::numel).sum();
    assert_eq!(n, 4 * 6 + 4 * 2 * 32 + 2 * 2 * 12);
}

/// The MoE FFN output computed densely: `Σ_e w_e · FFN_e(x)` with every expert run on every token.
fn dense_moe(f: &MixLoraFfn, fc1: &Linear, fc2: &Linear, x: &Tensor) -> Array2<f32> {
    let routing = f.route(x, &Ctx::eval()).unwrap();
    let w = t2(&routing.weights);
    let s = f.scaling;
    let x2 = t2(x);
    let (w1, b1) = (
        m2(&fc1.base().params()[0]),
        fc1.base().params()[1].value().to_owned().into_dimensionality::<ndarray::Ix1>().unwrap(),
    );
    let (w2, b2) = (
        m2(&fc2.base().params()[0]),
        fc2.base().params()[1].value().to_owned().into_dimensionality::<ndarray::Ix1>().unwrap(),
    );
    let mut out = Array2::<f32>::zeros((x2.nrows(), w2.nrows()));
    for e in 0..f.experts.len() {
        let ex = f.expert(e);
        let i = x2.dot(&w1.t()) + &b1 + x2.dot(&m2(ex[0].0).t()).dot(&m2(ex[0].1).t()).mapv(|v| v * s);
        let a = t2(&Tensor::new(i.into_dyn()).gelu());
        let o = a.dot(&w2.t()) + &b2 + a.dot(&m2(ex[1].0).t()).dot(&m2(ex[1].1).t()).mapv(|v| v * s);
        for t in 0..x2.nrows() {
            for j in 0..o.ncols() {
                out[[t, j]] += w[[t, e]] * o[[t, j]];
            }
        }
    }
    out
}

#[test]
fn moe_output_equals_dense_weighted_sum_of_experts() {
    let b = block(6, 10);
    let mm = MixLoraModel::new(&b, cfg(4, 2, &[]), "default", 0).unwrap();
    perturb(&mm.trainable_params(), 3);
    let f = &mm.ffns[0];
    let x = input(7, 6, 2);
    let (y, _) = f.forward(&x, None, &Ctx::eval()).unwrap();
    let want = dense_moe(f, &b.fc1, &b.fc2, &x);
    assert!(max_abs_diff(y.as_slice(), want.as_slice().unwrap()) < 1e-5);
    // Through the residual site: the block's output uses the same FFN.
    let xb = input(7, 6, 3);
    let h = b.ffn_in(&xb, &Ctx::eval());
    let ffn = dense_moe(f, &b.fc1, &b.fc2, &h);
    let want = b.cls.forward(&h.add(&Tensor::new(ffn.into_dyn())).unwrap(), &Ctx::eval()).unwrap();
    assert!(max_abs_diff(b.forward(&xb, &Ctx::eval()).as_slice(), want.as_slice()) < 1e-5);
}

#[test]
fn one_expert_top_one_is_plain_lora_on_the_ffn() {
    let b = block(5, 7);
    let mm = MixLoraModel::new(&b, cfg(1, 1, &[]), "default", 0).unwrap();
    perturb(&mm.trainable_params(), 5);
    let f = &mm.ffns[0];
    let x = input(4, 5, 1);
    let (y, aux) = f.forward(&x, None, &Ctx::eval()).unwrap();
    assert!((aux.item().unwrap() - 1.0).abs() < 1e-6);
    // Plain LoRA (same factors) on intermediate.dense and output.dense.
    let lm = LoraModel::new(&b, LoraConfig::new(2, 3.0, ["intermediate.dense", "output.dense"]), "lora", 0).unwrap();
    for ((_, l), (a, bb)) in lm.adapter("lora").unwrap().layers.iter().zip(f.expert(0)) {
        l.lora_a().set(a.value().to_owned()).unwrap();
        l.lora_b().set(bb.value().to_owned()).unwrap();
    }
    let want = b.fc2.forward(&b.fc1.forward(&x, &Ctx::eval()).unwrap().gelu(), &Ctx::eval()).unwrap();
    assert!(max_abs_diff(y.as_slice(), want.as_slice()) < 1e-5);
}

#[test]
fn top_k_weights_sum_to_one_and_pick_the_largest_probabilities() {
    let b = block(6, 10);
    let mm = MixLoraModel::new(&b, cfg(5, 2, &[]), "default", 0).unwrap();
    let f = &mm.ffns[0];
    let x = input(9, 6, 4);
    let r = f.route(&x, &Ctx::eval()).unwrap();
    let (p, w) = (t2(&r.probs), t2(&r.weights));
    for t in 0..9 {
        assert!((w.row(t).sum() - 1.0).abs() < 1e-6);
        let c = &r.choices[t];
        assert_eq!(c.len(), 2);
        let kth = p[[t, c[1]]];
        for e in 0..5 {
            if c.contains(&e) {
                assert!((w[[t, e]] - p[[t, e]] / (p[[t, c[0]]] + kth)).abs() < 1e-6);
            } else {
                assert_eq!(w[[t, e]], 0.0);
                assert!(p[[t, e]] <= kth);
            }
        }
    }
}

#[test]
fn aux_loss_is_top_k_for_a_uniform_router_and_matches_a_hand_computed_case() {
    let b = block(2, 4);
    for k in [1, 2, 3] {
        let mm = MixLoraModel::new(&b, cfg(4, k, &[]), &format!("k{k}"), 0).unwrap();
        let f = &mm.ffns[0];
        f.router().set(ArrayD::zeros(IxDyn(&[4, 2]))).unwrap();
        let r = f.route(&input(8, 2, 1), &Ctx::eval()).unwrap();
        assert!((f.aux_loss(&r, None).unwrap().item().unwrap() - k as f32).abs() < 1e-6, "k = {k}");
    }
    // E = 3, k = 1, gate rows (1,0), (0,1), (0,0); tokens (2,0), (0,1), (−1,−1) (the last one padding).
    let mm = MixLoraModel::new(&b, cfg(3, 1, &[]), "hand", 0).unwrap();
    let f = &mm.ffns[0];
    f.router().set(ArrayD::from_shape_vec(IxDyn(&[3, 2]), vec![1., 0., 0., 1., 0., 0.]).unwrap()).unwrap();
    let x = Tensor::from_vec(vec![2., 0., 0., 1., -1., -1.], &[3, 2]).unwrap();
    let r = f.route(&x, &Ctx::eval()).unwrap();
    let soft = |l: [f64; 3]| {
        let z: f64 = l.iter().map(|v| v.exp()).sum();
        l.map(|v| v.exp() / z)
    };
    let (p0, p1) = (soft([2., 0., 0.]), soft([0., 1., 0.]));
    // Token 0 picks expert 0, token 1 expert 1: f = (1/2, 1/2, 0), P = mean of p over the two valid tokens.
    let want = 3.0 * (0.5 * (p0[0] + p1[0]) / 2.0 + 0.5 * (p0[1] + p1[1]) / 2.0);
    let got = f.aux_loss(&r, Some(&[true, true, false])).unwrap().item().unwrap();
    assert!((f64::from(got) - want).abs() < 1e-6, "{got} vs {want}");
    assert!(matches!(f.aux_loss(&r, Some(&[true])), Err(Error::Invalid { .. })));
}

#[test]
fn residual_forward_records_the_weighted_aux_loss_once() {
    let b = block(6, 10);
    let mm = MixLoraModel::new(&b, cfg(4, 2, &[]), "default", 0).unwrap();
    assert!(mm.take_aux_loss().unwrap().is_none());
    b.forward(&input(3, 6, 1), &Ctx::eval());
    let aux = mm.take_aux_loss().unwrap().unwrap().item().unwrap();
    // 0.01 · L_aux, and L_aux ≥ 1 (E·Σ f·P with Σ_e f_e = k, spread over E).
    assert!(aux > 0.0 && aux < 0.01 * 4.0 * 2.0, "{aux}");
    assert!(mm.take_aux_loss().unwrap().is_none());
}

#[test]
fn mixlora_gradients_match_finite_differences() {
    // k = E: no routing discontinuity; the loss includes the aux term, so the router gets both gradients.
    let b = block(4, 6);
    let mm = MixLoraModel::new(&b, cfg(2, 2, &["query"]), "default", 0).unwrap();
    perturb(&mm.trainable_params(), 7);
    let x = input(3, 4, 4);
    let r = input(3, 3, 5);
    let f = || {
        let y = b.forward(&x, &Ctx::eval()).mul(&r).unwrap().sum_all();
        y.add(&mm.take_aux_loss().unwrap().unwrap().mul_scalar(10.0)).unwrap()
    };
    fdcheck::check(&f, &mm.trainable_params(), 1e-2, 3e-3);
}

#[test]
fn mixlora_top_k_gradients_match_finite_differences_away_from_ties() {
    let b = block(4, 6);
    let mm = MixLoraModel::new(&b, cfg(3, 2, &[]), "default", 0).unwrap();
    perturb(&mm.trainable_params(), 11);
    let x = input(3, 4, 4);
    let r = input(3, 3, 5);
    let h = b.ffn_in(&x, &Ctx::eval());
    // A router whose 2nd and 3rd probabilities are well apart for every token, so ±eps keeps the choices.
    let gap = |seed: u64| {
        mm.ffns[0].router().set(RandomInit::new(seed, 2.0).get("g", &[3, 4]).unwrap()).unwrap();
        let p = t2(&mm.ffns[0].route(&h, &Ctx::eval()).unwrap().probs);
        (0..3).all(|t| {
            let mut v: Vec<f32> = p.row(t).to_vec();
            v.sort_by(|a, b| b.total_cmp(a));
            v[1] - v[2] > 0.05
        })
    };
    let seed = (0..200).find(|&s| gap(s)).expect("a well-separated router");
    assert!(gap(seed));
    let f = || b.forward(&x, &Ctx::eval()).mul(&r).unwrap().sum_all();
    fdcheck::check(&f, &mm.trainable_params(), 1e-3, 5e-3);
}

#[test]
fn swiglu_mixture_is_identity_at_init_and_equals_dense_sum() {
    let init = RandomInit::new(2, 0.4);
    let l = |p: &str, a, b| Linear::load(p, a, b, false, &init).unwrap();
    let kind =
        FfnKind::SwiGlu { gate: l("mlp.gate_proj", 4, 6), up: l("mlp.up_proj", 4, 6), down: l("mlp.down_proj", 6, 4) };
    let f = MixLoraFfn::new("mlp", "default", kind.clone(), &cfg(3, 2, &[]), &mut StdRng::seed_from_u64(0)).unwrap();
    let x = input(5, 4, 1);
    let FfnKind::SwiGlu { gate, up, down } = &kind else { unreachable!() };
    let base = down
        .forward(
            &gate.forward(&x, &Ctx::eval()).unwrap().silu().mul(&up.forward(&x, &Ctx::eval()).unwrap()).unwrap(),
            &Ctx::eval(),
        )
        .unwrap();
    let (y, _) = f.forward(&x, None, &Ctx::eval()).unwrap();
    assert!(max_abs_diff(y.as_slice(), base.as_slice()) < 1e-6);
    perturb(&f.params(), 4);
    let (y, _) = f.forward(&x, None, &Ctx::eval()).unwrap();
    let rt = f.route(&x, &Ctx::eval()).unwrap();
    let w = t2(&rt.weights);
    let mut want = Array2::<f32>::zeros((5, 4));
    for e in 0..3 {
        let ex = f.expert(e);
        let lo = |i: usize, v: &Tensor| {
            v.linear(&ex[i].0.tensor(), None).unwrap().linear(&ex[i].1.tensor(), None).unwrap().mul_scalar(1.5)
        };
        let g = gate.forward(&x, &Ctx::eval()).unwrap().add(&lo(0, &x)).unwrap();
        let u = up.forward(&x, &Ctx::eval()).unwrap().add(&lo(1, &x)).unwrap();
        let h = g.silu().mul(&u).unwrap();
        let o = t2(&down.forward(&h, &Ctx::eval()).unwrap().add(&lo(2, &h)).unwrap());
        for t in 0..5 {
            for j in 0..4 {
                want[[t, j]] += w[[t, e]] * o[[t, j]];
            }
        }
    }
    assert!(max_abs_diff(y.as_slice(), want.as_slice().unwrap()) < 1e-5);
}

#[test]
fn mixlora_save_load_save_is_byte_identical() {
    let b = block(6, 10);
    let mm = MixLoraModel::new(&b, cfg(3, 2, &["query", "value"]), "default", 0).unwrap();
    perturb(&mm.trainable_params(), 9);
    let d1 = tempfile::tempdir().unwrap();
    mm.save_pretrained(d1.path()).unwrap();
    let b2 = block(6, 10);
    let mm2 = MixLoraModel::load(&b2, d1.path(), "default").unwrap();
    let x = input(4, 6, 1);
    assert_eq!(b.forward(&x, &Ctx::eval()).to_vec(), b2.forward(&x, &Ctx::eval()).to_vec());
    let d2 = tempfile::tempdir().unwrap();
    mm2.save_pretrained(d2.path()).unwrap();
    for f in [crate::io::CONFIG_NAME, crate::io::WEIGHTS_NAME] {
        assert_eq!(std::fs::read(d1.path().join(f)).unwrap(), std::fs::read(d2.path().join(f)).unwrap(), "{f}");
    }
}

#[test]
fn mixlora_bad_configs_are_typed_errors() {
    let b = block(4, 6);
    let bad = |c: MixLoraConfig| MixLoraModel::new(&b, c, "a", 0).err().unwrap();
    assert!(matches!(bad(cfg(2, 3, &[])), Error::Invalid { .. }), "top_k > n_experts");
    assert!(matches!(bad(cfg(2, 0, &[])), Error::Invalid { .. }));
    assert!(matches!(bad(cfg(0, 0, &[])), Error::Invalid { .. }));
    let mut c = cfg(2, 1, &[]);
    c.hidden_act = "nope".into();
    assert!(matches!(bad(c), Error::Invalid { .. }));
    let mut c = cfg(2, 1, &[]);
    c.ffn_up = "mlp.fc1".into();
    assert!(matches!(bad(c), Error::NoTargetMatched { .. }));
}
