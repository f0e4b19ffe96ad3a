//! A tiny random BERT (peft-models' encoder, built in code) and gradient-check helpers, for tests.

use peft_core::io::BertConfig;
use peft_core::nn::{Ctx, RandomInit};
use peft_core::{Param, Tensor};
use peft_models::bert::BertModel;
use peft_models::tokenizer::Batch;

/// Hidden width of [`tiny`].
pub const D: usize = 8;

/// A 2-layer, 8-wide, 2-head BERT with random weights from `seed`.
pub fn tiny(seed: u64) -> BertModel {
    let cfg = BertConfig {
        vocab_size: 20,
        hidden_size: D,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 16,
        max_position_embeddings: 16,
        ..BertConfig::default()
    };
    BertModel::from_source(&cfg, &RandomInit::new(seed, 0.3)).expect("tiny bert")
}

/// Two sequences of 4 tokens, the second with one padding position.
pub fn batch() -> Batch {
    Batch {
        input_ids: vec![1, 5, 6, 2, 1, 7, 2, 0],
        token_type_ids: vec![0; 8],
        attention_mask: vec![1, 1, 1, 1, 1, 1, 1, 0],
        shape: [2, 4],
    }
}

/// `last_hidden_state` of `m` on [`batch`] in evaluation mode.
pub fn out(m: &BertModel) -> Vec<f32> {
    m.forward(&batch(), &Ctx::eval()).expect("forward").to_vec()
}

/// Sets every entry of `p` from N(0, std²) (seeded).
pub fn perturb(p: &Param, seed: u64, std: f32) {
    use peft_core::nn::WeightSource;
    p.set(RandomInit::new(seed, std).get("p", &p.shape()).expect("init")).expect("set");
}

/// A fixed random weighting of `m`'s output, summed: the scalar whose gradients the checks compare.
pub fn weighted_sum(m: &BertModel, ctx: &Ctx) -> Tensor {
    use peft_core::nn::WeightSource;
    let y = m.forward(&batch(), ctx).expect("forward");
    let r = Tensor::new(RandomInit::new(99, 1.0).get("r", y.shape()).expect("r"));
    y.mul(&r).expect("weight").sum_all()
}

/// Checks the gradient of `f()` w.r.t. each of `params` against central differences of step `eps` (f32
/// forwards, differences in f64); entries pass when within `tol` of the largest numeric entry of that parameter
/// (f32 rounding of the forward limits how tight this can be; the exact f64 checks are on the maps themselves).
pub fn fd_check(f: &dyn Fn() -> Tensor, params: &[Param], eps: f32, tol: f64) {
    let g = f().backward().expect("backward");
    let scalar = || f64::from(peft_core::no_grad(f).item().expect("scalar"));
    for p in params {
        let an = g.get_id(p.id()).map(|a| a.to_owned()).unwrap_or_else(|| ndarray::ArrayD::zeros(p.shape()));
        let mut num = Vec::with_capacity(p.numel());
        for i in 0..p.numel() {
            let v0 = p.value().to_owned();
            let mut vp = v0.clone();
            vp.as_slice_mut().expect("contiguous")[i] += eps;
            p.set(vp).expect("set");
            let lp = scalar();
            let mut vm = v0.clone();
            vm.as_slice_mut().expect("contiguous")[i] -= eps;
            p.set(vm).expect("set");
            let lm = scalar();
            p.set(v0).expect("set");
            num.push((lp - lm) / (2.0 * f64::from(eps)));
        }
        let scale = num.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        for (i, (a, n)) in an.iter().zip(&num).enumerate() {
            assert!(
                (f64::from(*a) - n).abs() <= tol * scale,
                "{}[{i}]: analytic {a} vs numeric {n} (scale {scale})",
                p.name()
            );
        }
        assert!(num.iter().any(|v| v.abs() > 1e-4), "{}: the check saw no gradient at all", p.name());
    }
}
