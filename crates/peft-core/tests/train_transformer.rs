//! A 2-layer transformer encoder (built from the nn layers) learns a synthetic sequence task: classify whether
//! token 1 occurs before token 2 in a random sequence (needs attention across positions, not just a bag of tokens).

use ndarray::{ArrayD, IxDyn};
use peft_core::nn::{
    named_params, Activation, Ctx, EncoderConfig, EncoderLayer, EncoderNames, Linear, Module, NormPlacement,
    RandomInit, Visitor,
};
use peft_core::optim::Optimizer;
use peft_core::{AdamW, Tensor};
use rand::{Rng, SeedableRng};

const VOCAB: usize = 6;
const SEQ: usize = 8;
const HID: usize = 32;

struct Model {
    emb: peft_core::Param,
    pos: peft_core::Param,
    layers: Vec<EncoderLayer>,
    head: Linear,
}

impl Module for Model {
    fn visit(&self, v: &mut dyn Visitor) {
        v.param(&self.emb);
        v.param(&self.pos);
        for l in &self.layers {
            l.visit(v);
        }
        self.head.visit(v);
    }
}

impl Model {
    fn forward(&self, ids: &[usize], batch: usize, ctx: &Ctx) -> peft_core::Result<Tensor> {
        let x = self.emb.tensor().embedding(ids, &[batch, SEQ])?.add(&self.pos.tensor())?;
        let mut h = x;
        for l in &self.layers {
            h = l.forward(&h, None, ctx)?;
        }
        self.head.forward(&h.mean(&[1], false)?, ctx)
    }
}

fn batch(rng: &mut impl Rng, n: usize) -> (Vec<usize>, Vec<i64>) {
    let mut ids = Vec::with_capacity(n * SEQ);
    let mut y = Vec::with_capacity(n);
    for _ in 0..n {
        // filler tokens 3..VOCAB, then tokens 1 and 2 at two distinct random positions
        let mut s: Vec<usize> = (0..SEQ).map(|_| rng.gen_range(3..VOCAB)).collect();
        let a = rng.gen_range(0..SEQ);
        let mut b = rng.gen_range(0..SEQ);
        while b == a {
            b = rng.gen_range(0..SEQ);
        }
        s[a] = 1;
        s[b] = 2;
        y.push(i64::from(a < b));
        ids.extend(s);
    }
    (ids, y)
}

#[test]
fn two_layer_transformer_learns_order_task() {
    let init = RandomInit::new(7, 0.1);
    let cfg = EncoderConfig {
        hidden: HID,
        heads: 4,
        intermediate: 64,
        act: Activation::Gelu,
        eps: 1e-5,
        norm: NormPlacement::Pre,
        k_bias: true,
        dropout: 0.0,
    };
    let layers = (0..2)
        .map(|i| EncoderLayer::load(&format!("layer.{i}"), &EncoderNames::BERT, &cfg, &init))
        .collect::<peft_core::Result<Vec<_>>>()
        .unwrap();
    let model = Model {
        emb: peft_core::Param::new("emb", init.get_arr(&[VOCAB, HID]), true),
        pos: peft_core::Param::new("pos", init.get_arr(&[SEQ, HID]), true),
        layers,
        head: Linear::load("head", HID, 2, true, &init).unwrap(),
    };
    let params = named_params(&model);
    for p in &params {
        p.set_trainable(true);
    }
    let mut opt = AdamW::with_lr(params, 3e-3, 0.0).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let ctx = Ctx::eval();
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..300 {
        let (ids, y) = batch(&mut rng, 32);
        let loss = model.forward(&ids, 32, &ctx).unwrap().cross_entropy(&y, None, 0.0).unwrap();
        let l = loss.item().unwrap();
        first.get_or_insert(l);
        last = l;
        let grads = loss.backward().unwrap();
        drop(loss);
        opt.step(&grads).unwrap();
    }
    // held-out accuracy
    let (ids, y) = batch(&mut rng, 256);
    let logits = peft_core::no_grad(|| model.forward(&ids, 256, &ctx).unwrap());
    let acc = logits.as_slice().chunks(2).zip(&y).filter(|(l, &t)| i64::from(l[1] > l[0]) == t).count() as f64 / 256.0;
    let first = first.unwrap();
    eprintln!("loss {first:.4} -> {last:.4}, held-out accuracy {acc:.3}");
    assert!(first > 0.6, "chance-level start expected, got {first}");
    assert!(last < 0.2, "final training loss {last} not below 0.2");
    assert!(acc > 0.9, "held-out accuracy {acc} not above 0.9");
}

trait GetArr {
    fn get_arr(&self, shape: &[usize]) -> ArrayD<f32>;
}
impl GetArr for RandomInit {
    fn get_arr(&self, shape: &[usize]) -> ArrayD<f32> {
        use peft_core::nn::WeightSource;
        self.get("x", shape).unwrap_or_else(|_| ArrayD::zeros(IxDyn(shape)))
    }
}
