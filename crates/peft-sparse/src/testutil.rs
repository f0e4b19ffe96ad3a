//! A tiny BERT-named model for tests: two layers of query/value/dense linears and a classifier.

use peft_core::nn::{Ctx, Linear, Module, RandomInit, Visitor, WeightSource};
use peft_core::{Result, Tensor};

/// Two or more layers of `query`/`value`/`output.dense` linears plus a `classifier` head.
pub struct Tiny {
    /// Per layer: query, value, dense.
    pub layers: Vec<[Linear; 3]>,
    /// The head.
    pub classifier: Linear,
}

impl Tiny {
    /// Width `d`, `n` layers, weights from `seed`.
    pub fn new(d: usize, n: usize, seed: u64) -> Self {
        let init = RandomInit::new(seed, 0.3);
        let l = |p: String| Linear::load(&p, d, d, true, &init).expect("tiny");
        let layers = (0..n)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                [
                    l(format!("{p}.attention.self.query")),
                    l(format!("{p}.attention.self.value")),
                    l(format!("{p}.output.dense")),
                ]
            })
            .collect();
        let classifier = Linear::load("classifier", d, 3, true, &init).expect("tiny").as_output();
        Tiny { layers, classifier }
    }

    /// `h ← dense(tanh(query(h)) + value(h))` per layer, then the head.
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let mut h = x.clone();
        for [q, v, o] in &self.layers {
            h = o.forward(&q.forward(&h, ctx)?.tanh().add(&v.forward(&h, ctx)?)?, ctx)?;
        }
        self.classifier.forward(&h, ctx)
    }
}

impl Module for Tiny {
    fn visit(&self, v: &mut dyn Visitor) {
        for l in &self.layers {
            for s in l {
                s.visit(v);
            }
        }
        self.classifier.visit(v);
    }
}

/// A random input `[rows, d]`.
pub fn input(rows: usize, d: usize, seed: u64) -> Tensor {
    Tensor::new(RandomInit::new(seed, 1.0).get("x", &[rows, d]).expect("input"))
}

/// Asserts that two saved adapter folders hold byte-identical `adapter_config.json` and
/// `adapter_model.safetensors` (the save -> load -> save check of every method).
pub fn assert_same_adapter_files(a: &std::path::Path, b: &std::path::Path) {
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        let x = std::fs::read(a.join(f)).expect("first adapter file");
        let y = std::fs::read(b.join(f)).expect("second adapter file");
        assert!(x == y, "{f} differs after save -> load -> save");
    }
}
