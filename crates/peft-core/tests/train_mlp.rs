//! End-to-end training: small MLPs built from `Tensor::linear` and `Param`s learn XOR and a 1-D regression with
//! AdamW, a warmup schedule, gradient clipping and (for the regression) gradient accumulation.

use ndarray::{Array2, ArrayD, IxDyn};
use peft_core::optim::{clip_grad_norm, AdamWConfig};
use peft_core::{AdamW, GradAccumulator, LrSchedule, Optimizer, Param, ParamGroup, Result, Schedule, Tensor};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

/// A `sizes[0] → … → sizes[n]` MLP with tanh between layers; weights in PyTorch layout `[out, in]`.
struct Mlp {
    layers: Vec<(Param, Param)>,
}

impl Mlp {
    fn new(sizes: &[usize], seed: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let layers = sizes
            .windows(2)
            .enumerate()
            .map(|(i, io)| {
                let (fan_in, fan_out) = (io[0], io[1]);
                let normal = Normal::new(0.0f32, (1.0 / fan_in as f32).sqrt()).expect("valid std");
                let w = ArrayD::from_shape_fn(IxDyn(&[fan_out, fan_in]), |_| normal.sample(&mut rng));
                let b = ArrayD::from_shape_fn(IxDyn(&[fan_out]), |_| rng.gen_range(-0.1f32..0.1));
                (Param::new(format!("layers.{i}.weight"), w, true), Param::new(format!("layers.{i}.bias"), b, true))
            })
            .collect();
        Mlp { layers }
    }

    fn params(&self) -> Vec<Param> {
        self.layers.iter().flat_map(|(w, b)| [w.clone(), b.clone()]).collect()
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, (w, b)) in self.layers.iter().enumerate() {
            h = h.linear(&w.tensor(), Some(&b.tensor()))?;
            if i + 1 < self.layers.len() {
                h = h.tanh();
            }
        }
        Ok(h)
    }

    fn mse(&self, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        Ok(self.forward(x)?.sub(y)?.square().mean_all())
    }
}

fn tensor(rows: usize, cols: usize, v: Vec<f32>) -> Tensor {
    Tensor::new(Array2::from_shape_vec((rows, cols), v).expect("shape").into_dyn())
}

#[test]
fn mlp_learns_xor_with_adamw() -> Result<()> {
    let x = tensor(4, 2, vec![0., 0., 0., 1., 1., 0., 1., 1.]);
    let y = tensor(4, 1, vec![0., 1., 1., 0.]);
    let mlp = Mlp::new(&[2, 8, 1], 7);
    let steps = 400;
    let groups = ParamGroup::decay_split(mlp.params(), 0.05, 0.01);
    assert_eq!((groups[0].params.len(), groups[1].params.len()), (2, 2), "weights decay, biases do not");
    let mut opt = AdamW::new(groups, AdamWConfig::default())?;
    let sched = Schedule::cosine(20, steps);
    let initial = mlp.mse(&x, &y)?.item()?;
    for step in 0..steps {
        let loss = mlp.mse(&x, &y)?;
        let mut grads = loss.backward()?;
        clip_grad_norm(&mut grads, 1.0)?;
        opt.set_lr_factor(sched.lr_factor(step));
        opt.checked_step(loss.item()?, &grads)?;
    }
    let loss = mlp.mse(&x, &y)?.item()?;
    let pred = mlp.forward(&x)?.to_vec();
    eprintln!("xor: loss {initial:.4} -> {loss:.2e}, predictions {pred:?}");
    assert!(loss < 1e-3, "final XOR loss {loss} (initial {initial})");
    for (p, t) in pred.iter().zip([0.0, 1.0, 1.0, 0.0]) {
        assert!((p - t).abs() < 0.1, "prediction {p} for target {t}");
    }
    Ok(())
}

#[test]
fn mlp_fits_sine_regression_with_accumulation() -> Result<()> {
    // y = sin(2x) on 64 points of [-3, 3], in 4 micro-batches of 16 per step.
    let n = 64;
    let xs: Vec<f32> = (0..n).map(|i| -3.0 + 6.0 * i as f32 / (n - 1) as f32).collect();
    let ys: Vec<f32> = xs.iter().map(|x| (2.0 * x).sin()).collect();
    let (x_all, y_all) = (tensor(n, 1, xs.clone()), tensor(n, 1, ys.clone()));
    let mlp = Mlp::new(&[1, 32, 32, 1], 11);
    let steps = 2000;
    let mut opt = AdamW::with_lr(mlp.params(), 0.01, 0.0)?;
    let sched = Schedule::linear(50, steps);
    let initial = mlp.mse(&x_all, &y_all)?.item()?;
    for step in 0..steps {
        let mut acc = GradAccumulator::new();
        for k in 0..4 {
            // Interleaved micro-batches: points k, k+4, k+8, ...
            let idx: Vec<usize> = (k..n).step_by(4).collect();
            let xb = tensor(idx.len(), 1, idx.iter().map(|&i| xs[i]).collect());
            let yb = tensor(idx.len(), 1, idx.iter().map(|&i| ys[i]).collect());
            let loss = mlp.mse(&xb, &yb)?;
            acc.add(loss.backward()?)?;
        }
        let mut grads = acc.mean()?;
        clip_grad_norm(&mut grads, 5.0)?;
        opt.set_lr_factor(sched.lr_factor(step));
        opt.step(&grads)?;
    }
    let loss = mlp.mse(&x_all, &y_all)?.item()?;
    eprintln!("sine: loss {initial:.4} -> {loss:.2e}");
    assert!(loss < 1e-3, "final regression loss {loss} (initial {initial})");
    Ok(())
}

#[test]
fn frozen_layer_stays_fixed_while_the_rest_trains() -> Result<()> {
    let x = tensor(4, 2, vec![0., 0., 0., 1., 1., 0., 1., 1.]);
    let y = tensor(4, 1, vec![0., 1., 1., 0.]);
    let mlp = Mlp::new(&[2, 8, 1], 3);
    let (w0, b0) = &mlp.layers[0];
    w0.set_trainable(false);
    b0.set_trainable(false);
    let (w0_before, b0_before) = (w0.value().to_owned(), b0.value().to_owned());
    let head_before = mlp.layers[1].0.value().to_owned();
    let mut opt = AdamW::with_lr(mlp.params(), 0.05, 0.01)?;
    for _ in 0..20 {
        let loss = mlp.mse(&x, &y)?;
        opt.step(&loss.backward()?)?;
    }
    assert_eq!(w0.value().to_owned(), w0_before);
    assert_eq!(b0.value().to_owned(), b0_before);
    assert_ne!(mlp.layers[1].0.value().to_owned(), head_before);
    let names: Vec<String> = opt.state_dict().params.into_keys().collect();
    assert_eq!(names, ["layers.1.bias", "layers.1.weight"]);
    Ok(())
}
