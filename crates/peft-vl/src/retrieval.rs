//! Image-text retrieval on frozen features: projection heads, a VL-Adapter-style shared adapter, the symmetric
//! InfoNCE loss and Recall@K in both directions.
//!
//! The towers (DINOv2 for images, MiniLM for text in the bench) stay frozen and their features are computed once;
//! what trains sits on top of them:
//!
//! - [`HeadKind::Untrained`]: random linear projections into the joint space, nothing trained (the
//!   untrained-projection baseline; chance-level by construction, since the two random maps are unrelated).
//! - [`HeadKind::Linear`]: trainable linear projections `W_img x + b`, `W_txt t + b` (the linear-projection
//!   baseline, as a CLIP-style dual encoder's projection layers).
//! - [`HeadKind::Adapter`]: the linear projections plus a bottleneck adapter on the joint embedding,
//!   `z + U·gelu(D·LN(z))` with `U = 0` at init (so it starts as `Linear`). With `shared = true` one adapter
//!   (one set of tensors) serves both modalities: VL-Adapter's weight-sharing idea ("single adapter", spec §5.1)
//!   applied to a dual encoder's output; `shared = false` gives each modality its own, for comparison.
//!
//! Embeddings are L2-normalised; the loss is the mean of the image->text and text->image cross-entropies of
//! `I Tᵀ / τ` over a batch of matched pairs (InfoNCE, as CLIP). [`recall_at_k`] ranks by cosine similarity: an
//! image's rank is the number of captions scoring strictly higher than its best own caption (any of its captions
//! counts, spec §7.3), a caption's rank the number of images scoring strictly higher than its own image.
//!
//! ```
//! use peft_vl::retrieval::{HeadKind, RetrievalConfig, RetrievalHeads};
//! let cfg = RetrievalConfig { image_dim: 6, text_dim: 4, joint_dim: 3, kind: HeadKind::Linear, temperature: 0.07 };
//! let heads = RetrievalHeads::new(cfg, 0)?;
//! let img = ndarray::Array2::<f32>::ones((2, 6));
//! let z = heads.embed_images(&img)?;
//! assert_eq!(z.shape(), &[2, 3]);
//! assert_eq!(heads.trainable().len(), 4); // W and b of both projections
//! # Ok::<(), peft_vl::VlError>(())
//! ```

use ndarray::{Array2, ArrayD, Axis, IxDyn};
use peft_core::{no_grad, Elem, Param, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

use crate::error::{Result, VlError};

/// What trains on top of the frozen features.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HeadKind {
    /// Random projections, frozen.
    Untrained,
    /// Trainable linear projections.
    Linear,
    /// Trainable projections plus a bottleneck adapter on the joint embedding.
    Adapter {
        /// Bottleneck width.
        bottleneck: usize,
        /// One adapter for both modalities (VL-Adapter's sharing) or one per modality.
        shared: bool,
    },
}

/// Shapes and the temperature.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetrievalConfig {
    /// Image feature width.
    pub image_dim: usize,
    /// Text feature width.
    pub text_dim: usize,
    /// Joint embedding width.
    pub joint_dim: usize,
    /// The heads.
    pub kind: HeadKind,
    /// InfoNCE temperature τ (logits are cosine / τ).
    pub temperature: f64,
}

/// A bottleneck adapter `z + U·gelu(D·LN(z) + d) + u` on the joint embedding (pre-LN, as VL-Adapter's
/// AdapterController with its optional pre-LN on).
#[derive(Clone)]
pub struct JointAdapter {
    /// LayerNorm weight `[joint]` (ones at init).
    pub ln_weight: Param,
    /// LayerNorm bias `[joint]`.
    pub ln_bias: Param,
    /// Down projection `[bottleneck, joint]`.
    pub down_weight: Param,
    /// Down bias `[bottleneck]`.
    pub down_bias: Param,
    /// Up projection `[joint, bottleneck]` (zero at init).
    pub up_weight: Param,
    /// Up bias `[joint]` (zero at init).
    pub up_bias: Param,
}

impl JointAdapter {
    fn new(prefix: &str, joint: usize, bottleneck: usize, rng: &mut StdRng) -> Self {
        let p = |n: &str, a: ArrayD<f32>| Param::new(format!("{prefix}.{n}"), a, true);
        JointAdapter {
            ln_weight: p("ln.weight", ArrayD::ones(IxDyn(&[joint]))),
            ln_bias: p("ln.bias", ArrayD::zeros(IxDyn(&[joint]))),
            down_weight: p("down.weight", normal(&[bottleneck, joint], 1.0 / (joint as f64).sqrt(), rng)),
            down_bias: p("down.bias", ArrayD::zeros(IxDyn(&[bottleneck]))),
            up_weight: p("up.weight", ArrayD::zeros(IxDyn(&[joint, bottleneck]))),
            up_bias: p("up.bias", ArrayD::zeros(IxDyn(&[joint]))),
        }
    }

    fn params(&self) -> Vec<Param> {
        vec![
            self.ln_weight.clone(),
            self.ln_bias.clone(),
            self.down_weight.clone(),
            self.down_bias.clone(),
            self.up_weight.clone(),
            self.up_bias.clone(),
        ]
    }

    fn forward(&self, z: &Tensor) -> peft_core::Result<Tensor> {
        adapter_forward(
            z,
            &[
                self.ln_weight.tensor(),
                self.ln_bias.tensor(),
                self.down_weight.tensor(),
                self.down_bias.tensor(),
                self.up_weight.tensor(),
                self.up_bias.tensor(),
            ],
        )
    }
}

/// `z + up(gelu(down(LN(z))))` with `p = [ln_w, ln_b, down_w, down_b, up_w, up_b]`; generic so that gradient
/// checks run it in f64.
///
/// # Errors
/// Shape errors of the ops.
pub fn adapter_forward<E: Elem>(z: &Tensor<E>, p: &[Tensor<E>; 6]) -> peft_core::Result<Tensor<E>> {
    let h = z.layer_norm(Some(&p[0]), Some(&p[1]), 1e-5)?;
    let h = h.linear(&p[2], Some(&p[3]))?.gelu();
    z.add(&h.linear(&p[4], Some(&p[5]))?)
}

/// Row-wise L2 normalisation `x / sqrt(Σx² + 1e-12)`, generic for gradient checks.
///
/// # Errors
/// A rank other than 2.
pub fn l2_rows<E: Elem>(x: &Tensor<E>) -> peft_core::Result<Tensor<E>> {
    x.div(&x.square().sum(&[1], true)?.add_scalar(E::of(1e-12)).sqrt())
}

/// The symmetric InfoNCE loss of matched rows: `(CE(I Tᵀ/τ, diag) + CE(T Iᵀ/τ, diag)) / 2` on L2-normalised
/// `img [B, D]` and `txt [B, D]` (row i of each is a pair).
///
/// # Errors
/// Shape errors (different batch sizes or widths).
pub fn info_nce<E: Elem>(img: &Tensor<E>, txt: &Tensor<E>, temperature: f64) -> peft_core::Result<Tensor<E>> {
    let logits = img.matmul_nt(txt)?.mul_scalar(E::of(1.0 / temperature));
    let b = img.shape()[0];
    let targets: Vec<i64> = (0..b as i64).collect();
    let a = logits.cross_entropy(&targets, None, 0.0)?;
    let c = logits.transpose(0, 1)?.cross_entropy(&targets, None, 0.0)?;
    Ok(a.add(&c)?.mul_scalar(E::of(0.5)))
}

fn normal(shape: &[usize], std: f64, rng: &mut StdRng) -> ArrayD<f32> {
    let n = Normal::new(0.0, std).unwrap_or_else(|_| Normal::new(0.0, 1.0).expect("unit normal"));
    ArrayD::from_shape_fn(IxDyn(shape), |_| n.sample(rng) as f32)
}

/// The image and text heads.
#[derive(Clone)]
pub struct RetrievalHeads {
    /// The config.
    pub cfg: RetrievalConfig,
    /// `image_proj.weight [joint, image_dim]`.
    pub image_weight: Param,
    /// `image_proj.bias [joint]`.
    pub image_bias: Param,
    /// `text_proj.weight [joint, text_dim]`.
    pub text_weight: Param,
    /// `text_proj.bias [joint]`.
    pub text_bias: Param,
    /// The image path's adapter (the same tensors as `text_adapter` when shared).
    pub image_adapter: Option<JointAdapter>,
    /// The text path's adapter.
    pub text_adapter: Option<JointAdapter>,
}

impl RetrievalHeads {
    /// Builds the heads; projections are `N(0, 1/d_in)`, biases zero, adapters as [`JointAdapter`] (identity at
    /// init).
    ///
    /// # Errors
    /// [`VlError::InvalidConfig`] for a zero width, a zero bottleneck or a temperature that is not a finite
    /// positive number.
    pub fn new(cfg: RetrievalConfig, seed: u64) -> Result<Self> {
        for (what, v) in [("image_dim", cfg.image_dim), ("text_dim", cfg.text_dim), ("joint_dim", cfg.joint_dim)] {
            if v == 0 {
                return Err(VlError::InvalidConfig { what, value: "0".into(), rule: "must be at least 1" });
            }
        }
        if !(cfg.temperature.is_finite() && cfg.temperature > 0.0) {
            return Err(VlError::InvalidConfig {
                what: "temperature",
                value: cfg.temperature.to_string(),
                rule: "must be a finite number > 0",
            });
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let trainable = cfg.kind != HeadKind::Untrained;
        let d = cfg.joint_dim;
        let w = |name: &str, din: usize, rng: &mut StdRng| {
            Param::new(format!("{name}.weight"), normal(&[d, din], 1.0 / (din as f64).sqrt(), rng), trainable)
        };
        let image_weight = w("image_proj", cfg.image_dim, &mut rng);
        let text_weight = w("text_proj", cfg.text_dim, &mut rng);
        let b = |name: &str| Param::new(format!("{name}.bias"), ArrayD::zeros(IxDyn(&[d])), trainable);
        let (image_adapter, text_adapter) = match cfg.kind {
            HeadKind::Adapter { bottleneck: 0, .. } => {
                return Err(VlError::InvalidConfig {
                    what: "bottleneck",
                    value: "0".into(),
                    rule: "must be at least 1",
                })
            }
            HeadKind::Adapter { bottleneck, shared: true } => {
                let a = JointAdapter::new("adapter.shared", d, bottleneck, &mut rng);
                (Some(a.clone()), Some(a))
            }
            HeadKind::Adapter { bottleneck, shared: false } => (
                Some(JointAdapter::new("adapter.image", d, bottleneck, &mut rng)),
                Some(JointAdapter::new("adapter.text", d, bottleneck, &mut rng)),
            ),
            _ => (None, None),
        };
        Ok(RetrievalHeads {
            cfg,
            image_weight,
            image_bias: b("image_proj"),
            text_weight,
            text_bias: b("text_proj"),
            image_adapter,
            text_adapter,
        })
    }

    /// The trainable parameters (each once; a shared adapter's tensors appear once).
    pub fn trainable(&self) -> Vec<Param> {
        let mut v =
            vec![self.image_weight.clone(), self.image_bias.clone(), self.text_weight.clone(), self.text_bias.clone()];
        if let Some(a) = &self.image_adapter {
            v.extend(a.params());
        }
        if let (Some(a), false) = (&self.text_adapter, matches!(self.cfg.kind, HeadKind::Adapter { shared: true, .. }))
        {
            v.extend(a.params());
        }
        v.retain(Param::trainable);
        v
    }

    /// Number of trainable scalars.
    pub fn num_trainable(&self) -> usize {
        self.trainable().iter().map(Param::numel).sum()
    }

    fn path(&self, x: &Tensor, w: &Param, b: &Param, a: Option<&JointAdapter>) -> peft_core::Result<Tensor> {
        let mut z = x.linear(&w.tensor(), Some(&b.tensor()))?;
        if let Some(a) = a {
            z = a.forward(&z)?;
        }
        l2_rows(&z)
    }

    /// L2-normalised joint embeddings of image features `x [N, image_dim]` (a graph is recorded when parameters
    /// are trainable).
    ///
    /// # Errors
    /// [`VlError::Count`] for a feature width other than `image_dim`.
    pub fn image_tensor(&self, x: &Tensor) -> Result<Tensor> {
        check_width("image feature width", self.cfg.image_dim, x)?;
        Ok(self.path(x, &self.image_weight, &self.image_bias, self.image_adapter.as_ref())?)
    }

    /// As [`RetrievalHeads::image_tensor`] for text features `[N, text_dim]`.
    ///
    /// # Errors
    /// [`VlError::Count`] for a feature width other than `text_dim`.
    pub fn text_tensor(&self, x: &Tensor) -> Result<Tensor> {
        check_width("text feature width", self.cfg.text_dim, x)?;
        Ok(self.path(x, &self.text_weight, &self.text_bias, self.text_adapter.as_ref())?)
    }

    /// Joint embeddings of image features, without a graph.
    ///
    /// # Errors
    /// As [`RetrievalHeads::image_tensor`].
    pub fn embed_images(&self, x: &Array2<f32>) -> Result<Array2<f32>> {
        no_grad(|| to2(&self.image_tensor(&Tensor::new(x.clone().into_dyn()))?))
    }

    /// Joint embeddings of text features, without a graph.
    ///
    /// # Errors
    /// As [`RetrievalHeads::text_tensor`].
    pub fn embed_texts(&self, x: &Array2<f32>) -> Result<Array2<f32>> {
        no_grad(|| to2(&self.text_tensor(&Tensor::new(x.clone().into_dyn()))?))
    }
}

fn check_width(what: &'static str, want: usize, x: &Tensor) -> Result<()> {
    let got = if x.rank() == 2 { x.shape()[1] } else { 0 };
    if x.rank() != 2 || got != want {
        return Err(VlError::Count { what, expected: want, got });
    }
    Ok(())
}

fn to2(t: &Tensor) -> Result<Array2<f32>> {
    let s = t.shape().to_vec();
    Array2::from_shape_vec((s[0], s[1]), t.to_vec()).map_err(|_| VlError::Count {
        what: "embedding elements",
        expected: s[0] * s[1],
        got: t.len(),
    })
}

/// Recall@K in both directions.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Recall {
    /// The K values.
    pub ks: Vec<usize>,
    /// Image->text recall per K (fraction of images with one of their captions in the top K).
    pub i2t: Vec<f64>,
    /// Text->image recall per K (fraction of captions with their image in the top K).
    pub t2i: Vec<f64>,
}

/// Recall@K from a similarity matrix `sim [images, captions]` and each caption's image index `owner`.
///
/// # Errors
/// [`VlError::Count`] when `owner` does not have one entry per caption or names an image out of range;
/// [`VlError::Empty`] for no images or captions, or an image without captions.
pub fn recall_at_k(sim: &Array2<f32>, owner: &[usize], ks: &[usize]) -> Result<Recall> {
    let (ni, nt) = sim.dim();
    if ni == 0 || nt == 0 {
        return Err(VlError::Empty { what: "the similarity matrix" });
    }
    if owner.len() != nt {
        return Err(VlError::Count { what: "caption owners", expected: nt, got: owner.len() });
    }
    if let Some(&o) = owner.iter().find(|&&o| o >= ni) {
        return Err(VlError::Count { what: "image index of a caption (number of images)", expected: ni, got: o });
    }
    let mut best = vec![usize::MAX; ni];
    for (i, row) in sim.axis_iter(Axis(0)).enumerate() {
        for (j, &o) in owner.iter().enumerate() {
            if o == i {
                let rank = row.iter().filter(|&&v| v > row[j]).count();
                best[i] = best[i].min(rank);
            }
        }
    }
    if best.contains(&usize::MAX) {
        return Err(VlError::Empty { what: "the caption list of an image" });
    }
    let t2i: Vec<usize> = (0..nt)
        .map(|j| {
            let col = sim.column(j);
            col.iter().filter(|&&v| v > col[owner[j]]).count()
        })
        .collect();
    let frac = |ranks: &[usize], k: usize| ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len() as f64;
    Ok(Recall {
        ks: ks.to_vec(),
        i2t: ks.iter().map(|&k| frac(&best, k)).collect(),
        t2i: ks.iter().map(|&k| frac(&t2i, k)).collect(),
    })
}

/// Cosine-similarity retrieval of joint embeddings (rows already L2-normalised): `sim = I Tᵀ`.
pub fn similarity(img: &Array2<f32>, txt: &Array2<f32>) -> Array2<f32> {
    img.dot(&txt.t())
}

/// Training recipe for [`train`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainConfig {
    /// Passes over the training images.
    pub epochs: usize,
    /// Images per batch (one caption each).
    pub batch_size: usize,
    /// AdamW learning rate (cosine decay to 0 after 10% linear warm-up).
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Seed of the batch order and caption choice.
    pub seed: u64,
}

/// Trains the heads with InfoNCE: each epoch shuffles the images, and each batch pairs every image with one of
/// its captions drawn at random (so no two rows of a batch share an image). Returns the loss per step.
///
/// # Errors
/// [`VlError::Count`] when the feature rows and `owner` disagree, [`VlError::Empty`] for no trainable
/// parameters, an image without captions or a batch size below 2, and optimizer errors (a non-finite loss).
pub fn train(
    heads: &RetrievalHeads,
    image_feats: &Array2<f32>,
    text_feats: &Array2<f32>,
    owner: &[usize],
    tc: &TrainConfig,
) -> Result<Vec<f32>> {
    use peft_core::{AdamW, Optimizer, ParamGroup};
    use rand::seq::SliceRandom;
    use rand::Rng;

    let ni = image_feats.nrows();
    if owner.len() != text_feats.nrows() {
        return Err(VlError::Count { what: "caption owners", expected: text_feats.nrows(), got: owner.len() });
    }
    let mut caps: Vec<Vec<usize>> = vec![Vec::new(); ni];
    for (j, &o) in owner.iter().enumerate() {
        if o >= ni {
            return Err(VlError::Count { what: "image index of a caption (number of images)", expected: ni, got: o });
        }
        caps[o].push(j);
    }
    if caps.iter().any(Vec::is_empty) {
        return Err(VlError::Empty { what: "the caption list of an image" });
    }
    if tc.batch_size < 2 {
        return Err(VlError::Empty { what: "a contrastive batch of fewer than 2 pairs" });
    }
    let params = heads.trainable();
    if params.is_empty() {
        return Err(VlError::Empty { what: "the trainable parameter list" });
    }
    let mut opt = AdamW::new(ParamGroup::decay_split(params, tc.lr, tc.weight_decay), Default::default())?;
    let mut rng = StdRng::seed_from_u64(tc.seed);
    let steps_per_epoch = ni.div_ceil(tc.batch_size);
    let total = (steps_per_epoch * tc.epochs).max(1);
    let warm = (total / 10).max(1);
    let mut losses = Vec::with_capacity(total);
    let mut order: Vec<usize> = (0..ni).collect();
    for _ in 0..tc.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(tc.batch_size) {
            if chunk.len() < 2 {
                continue;
            }
            let step = losses.len();
            let f = if step < warm {
                (step + 1) as f64 / warm as f64
            } else {
                0.5 * (1.0 + (std::f64::consts::PI * (step - warm) as f64 / (total - warm).max(1) as f64).cos())
            };
            opt.set_lr_factor(f);
            let ti: Vec<usize> = chunk.iter().map(|&i| caps[i][rng.gen_range(0..caps[i].len())]).collect();
            let x = Tensor::new(image_feats.select(Axis(0), chunk).into_dyn());
            let t = Tensor::new(text_feats.select(Axis(0), &ti).into_dyn());
            let (loss_v, grads) = {
                let loss = info_nce(&heads.image_tensor(&x)?, &heads.text_tensor(&t)?, heads.cfg.temperature)?;
                (loss.item()?, loss.backward()?)
            };
            opt.checked_step(loss_v, &grads)?;
            losses.push(loss_v);
        }
    }
    Ok(losses)
}

#[cfg(test)]
mod tests;
