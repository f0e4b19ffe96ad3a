//! SquareHead in the GLUE bench: the dense teacher (full fine-tuning with the `full` method's recipe, trained once
//! per task and seed and shared by `squarehead-50/75/90`), the student started from it, and the CPU cost of the
//! pruned model's linear layers: our dense GEMM against the CSR kernel of `peft_sparse::csr` on the student's own
//! pruned matrices.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ndarray::{Array2, ArrayD};
use peft_core::adapter::{BaseTuneConfig, PeftModel, TunerConfig, FULL};
use peft_core::nn::named_params;
use peft_core::{no_grad, Param, Tensor};
use peft_sparse::csr::CsrMatrix;
use peft_sparse::squarehead_tuner::SquareheadTuner;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::glue::tasks::Task;
use crate::model::{load_minilm, SeqClassifier};
use crate::train::{self, Split, TrainConfig};

/// What a SquareHead run reports beyond the common record.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SparseInference {
    /// Fraction of zeros over the pruned matrices after training.
    pub sparsity: f64,
    /// Dev metrics of the dense teacher the student was distilled from.
    pub teacher_metrics: BTreeMap<String, f64>,
    /// Seconds the teacher trained (once per task and seed; not in the student's `train_seconds`).
    pub teacher_train_seconds: f64,
    /// The pruned matrices as dense f32.
    pub dense_bytes: u64,
    /// The same in CSR (`u32` column + `f32` value per non-zero, `u32` row pointers).
    pub csr_bytes: u64,
    /// `x · Wᵀ` over every pruned matrix, per number of input rows (tokens).
    pub timings: Vec<GemmTiming>,
}

/// Best-of-5 time of one pass over every pruned matrix.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct GemmTiming {
    /// Input rows (tokens).
    pub rows: usize,
    /// Seconds with peft-core's dense `linear` (no grad).
    pub dense_s: f64,
    /// Seconds with the CSR kernel (its AVX2 path where the CPU has one).
    pub csr_s: f64,
    /// Seconds with the CSR kernel's portable path (AVX2 off); equal in kind to `csr_s` where there is no AVX2.
    #[serde(default)]
    pub csr_portable_s: f64,
}

/// A trained dense teacher: its parameter values and how it scored.
pub struct Teacher {
    values: Vec<(String, ArrayD<f32>)>,
    /// Dev metrics of the teacher model itself (rebuilt from the values, as the student sees it).
    pub metrics: BTreeMap<String, f64>,
    /// Training seconds.
    pub train_seconds: f64,
}

impl Teacher {
    /// The trained parameter values by name.
    pub fn values(&self) -> &[(String, ArrayD<f32>)] {
        &self.values
    }
}

/// Teachers by task and seed.
pub type Teachers = HashMap<(Task, u64), Teacher>;

/// The modules of the task head (the `modules_to_save` of every method).
pub fn head_modules(model: &dyn SeqClassifier) -> Vec<String> {
    let mut head: Vec<String> = Vec::new();
    for p in model.head() {
        let m = p.name().rsplit_once('.').map_or(p.name(), |(m, _)| m).to_string();
        if !head.contains(&m) {
            head.push(m);
        }
    }
    head
}

/// Writes `values` into the parameters of `model` of the same names; every value must find its parameter.
///
/// # Errors
/// A name the model lacks or a shape that differs.
pub fn copy_values(model: &dyn SeqClassifier, values: &[(String, ArrayD<f32>)]) -> Result<()> {
    let params: HashMap<String, Param> = named_params(model).into_iter().map(|p| (p.name().to_string(), p)).collect();
    for (name, v) in values {
        let Some(p) = params.get(name) else { bail!("teacher parameter `{name}` is not in the student") };
        p.set(v.clone()).with_context(|| format!("copying teacher parameter `{name}`"))?;
    }
    Ok(())
}

/// A model holding the teacher's values, for distillation and evaluation.
///
/// # Errors
/// Loading errors.
pub fn teacher_model(t: &Teacher, model_dir: &Path, task: Task, seed: u64) -> Result<Box<dyn SeqClassifier>> {
    let m = load_minilm(model_dir, task.num_outputs(), seed)?;
    copy_values(m.as_ref(), &t.values)?;
    for p in named_params(m.as_ref()) {
        p.set_trainable(false);
    }
    Ok(m)
}

/// The teacher of `task` and `seed`, trained (full fine-tuning at `full_lr`, the run's recipe otherwise) the first
/// time it is asked for.
///
/// # Errors
/// Loading and training errors.
#[allow(clippy::too_many_arguments)]
pub fn teacher<'a>(
    teachers: &'a mut Teachers,
    task: Task,
    seed: u64,
    cfg: &TrainConfig,
    full_lr: f64,
    model_dir: &Path,
    train_split: &Split,
    dev_split: &Split,
) -> Result<&'a Teacher> {
    use std::collections::hash_map::Entry;
    let slot = match teachers.entry((task, seed)) {
        Entry::Occupied(o) => return Ok(o.into_mut()),
        Entry::Vacant(v) => v,
    };
    let model = load_minilm(model_dir, task.num_outputs(), seed)?;
    let mut config = BaseTuneConfig::full();
    config.set_modules_to_save(head_modules(model.as_ref()))?;
    let mut pm = PeftModel::wrap(model, seed);
    pm.add_adapter_boxed("default", Box::new(config))?;
    pm.set_adapter("default")?;
    let bar = train::progress_bar(format!("{} {FULL} teacher s{seed}", task.name()));
    let out = train::run(task, &pm, cfg, full_lr, seed, train_split, dev_split, None, &bar);
    bar.finish_and_clear();
    let out = out.context("training the SquareHead teacher")?;
    let values: Vec<(String, ArrayD<f32>)> =
        named_params(pm.model().as_ref()).iter().map(|p| (p.name().to_string(), p.value().to_owned())).collect();
    let mut t = Teacher { values, metrics: BTreeMap::new(), train_seconds: out.train_seconds };
    // Scored as rebuilt, so the figure is that of the model the students copy and distil from.
    let rebuilt = teacher_model(&t, model_dir, task, seed)?;
    let outputs = train::predict(rebuilt.as_ref(), &dev_split.enc, cfg.batch_size.max(32))?;
    t.metrics = train::score(task, &outputs, &dev_split.labels);
    eprintln!("{task} / squarehead teacher (full fine-tuning) / seed {seed}: {:?}", t.metrics);
    Ok(slot.insert(t))
}

/// Best of 5 timed passes of `f`, each running it `inner` times.
fn best_of(inner: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t0 = Instant::now();
        for _ in 0..inner {
            f()?;
        }
        best = best.min(t0.elapsed().as_secs_f64() / inner as f64);
    }
    Ok(best)
}

/// Sparsity, storage and GEMM times of the pruned matrices of `tuner`, at 1 and 128 input rows.
///
/// # Errors
/// Kernel errors.
pub fn measure(tuner: &SquareheadTuner) -> Result<(f64, u64, u64, Vec<GemmTiming>)> {
    let mut dense = Vec::new();
    let mut csr = Vec::new();
    let (mut dense_bytes, mut csr_bytes) = (0u64, 0u64);
    for p in tuner.targets() {
        let v = p.value().to_owned();
        let s = v.shape().to_vec();
        if s.len() != 2 {
            bail!("`{}` is not a matrix", p.name());
        }
        let flat: Vec<f32> = v.iter().copied().collect();
        let c = CsrMatrix::from_dense(&flat, s[0], s[1])?;
        dense_bytes += 4 * flat.len() as u64;
        csr_bytes += 8 * c.nnz() as u64 + 4 * (s[0] as u64 + 1);
        csr.push(c);
        dense.push(Tensor::new(v));
    }
    let mut timings = Vec::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for (rows, inner) in [(1usize, 50usize), (128, 2)] {
        // One input per distinct width (MiniLM: 384 and 1536).
        let mut inputs: HashMap<usize, (Tensor, Array2<f32>)> = HashMap::new();
        for c in &csr {
            inputs.entry(c.cols()).or_insert_with(|| {
                let x = Array2::from_shape_fn((rows, c.cols()), |_| rng.gen_range(-1.0f32..1.0));
                (Tensor::new(x.clone().into_dyn()), x)
            });
        }
        let dense_s = best_of(inner, || {
            for w in &dense {
                let (xt, _) = &inputs[&w.shape()[1]];
                std::hint::black_box(no_grad(|| xt.linear(w, None))?);
            }
            Ok(())
        })?;
        let csr_pass = || -> Result<()> {
            for c in &csr {
                let (_, x) = &inputs[&c.cols()];
                std::hint::black_box(c.matmul_t(x.view())?);
            }
            Ok(())
        };
        let csr_s = best_of(inner, csr_pass)?;
        peft_sparse::csr::set_simd(false);
        let portable = best_of(inner, csr_pass);
        peft_sparse::csr::set_simd(true);
        timings.push(GemmTiming { rows, dense_s, csr_s, csr_portable_s: portable? });
    }
    Ok((tuner.sparsity(), dense_bytes, csr_bytes, timings))
}
