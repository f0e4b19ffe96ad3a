//! ViT / DINOv2 backbone (transformers `Dinov2Model` names and numerics) and an image-classification head.
//!
//! The forward pass is transformers' one: a `patch_size` x `patch_size` stride-`patch_size` convolution turns
//! `pixel_values [B, C, H, W]` into `(H/p)·(W/p)` patch tokens, the CLS token is prepended, the stored position
//! table (CLS + a square grid, 37x37 for DINOv2's 518 px) is resized to the input grid with PyTorch's bicubic
//! interpolation (a = -0.75, `align_corners=False`, no antialias, computed as transformers ≥ 4.45 does with
//! `size=(H/p, W/p)`, i.e. scale = in/out) and added, then pre-LN encoder layers with layer scale and a final
//! LayerNorm. Adapter sites: `encoder.layer.N.attention.attention.{query,key,value}`,
//! `encoder.layer.N.attention.output.dense`, `encoder.layer.N.mlp.fc{1,2}` (linear) and
//! `encoder.layer.N.{attention.output,mlp}` (residual); the head is the output layer `classifier`.

use ndarray::Array2;

use peft_core::error::Result;
use peft_core::io::hf_config::Dinov2Config;
use peft_core::nn::{
    named_params, Activation, Ctx, EncoderConfig, EncoderLayer, EncoderNames, LayerNorm, Linear, Module, NormPlacement,
    PromptedSeq, RandomInit, Visitor, WeightSource,
};
use peft_core::param::Param;
use peft_core::tensor::Tensor;

/// What [`Dinov2::forward`] returns.
#[derive(Clone)]
pub struct VitOutput {
    /// Output of the final LayerNorm (or of the last layer when `apply_layernorm` is off), `[B, 1 + N, hidden]`.
    pub last_hidden_state: Tensor,
    /// The CLS token of `last_hidden_state`, `[B, hidden]`.
    pub cls: Tensor,
    /// The mean of the patch tokens of `last_hidden_state`, `[B, hidden]`.
    pub patch_mean: Tensor,
}

/// The DINOv2 / ViT backbone (`Dinov2Model`).
#[derive(Clone)]
pub struct Dinov2 {
    /// The config it was built from.
    pub cfg: Dinov2Config,
    /// `embeddings.cls_token [1, 1, hidden]`.
    pub cls_token: Param,
    /// `embeddings.mask_token [1, hidden]` when `use_mask_token` (unused by the forward pass here).
    pub mask_token: Option<Param>,
    /// `embeddings.position_embeddings [1, 1 + g², hidden]` (CLS position first, then a `g x g` grid).
    pub position_embeddings: Param,
    /// `embeddings.patch_embeddings.projection.weight [hidden, C, p, p]`.
    pub patch_weight: Param,
    /// `embeddings.patch_embeddings.projection.bias [hidden]`.
    pub patch_bias: Param,
    /// `encoder.layer.N`.
    pub layers: Vec<EncoderLayer>,
    /// `layernorm` when `apply_layernorm`.
    pub layernorm: Option<LayerNorm>,
}

impl Dinov2 {
    /// Loads the backbone from `src` with transformers' `Dinov2Model` names; all parameters start frozen.
    ///
    /// # Errors
    /// Unsupported config options (SwiGLU FFN, a non-square position table) and missing or mis-shaped tensors.
    pub fn load(cfg: &Dinov2Config, src: &dyn WeightSource) -> Result<Self> {
        if cfg.use_swiglu_ffn {
            crate::error::fail!(crate::ModelError::Config {
                model: "Dinov2",
                field: "use_swiglu_ffn",
                value: true.to_string(),
                reason: "not supported"
            });
        }
        if cfg.hidden_size == 0
            || cfg.num_attention_heads == 0
            || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            crate::error::fail!(crate::ModelError::Config {
                model: "Dinov2",
                field: "hidden_size",
                value: cfg.hidden_size.to_string(),
                reason: if cfg.num_attention_heads == 0 {
                    "num_attention_heads is 0"
                } else {
                    "must be a positive multiple of num_attention_heads"
                },
            });
        }
        if cfg.patch_size == 0 {
            crate::error::fail!(crate::ModelError::Config {
                model: "Dinov2",
                field: "patch_size",
                value: 0.to_string(),
                reason: "must be positive"
            });
        }
        let (h, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let g = cfg.image_size / p;
        let frozen =
            |name: &str, shape: &[usize]| -> Result<Param> { Ok(Param::new(name, src.get(name, shape)?, false)) };
        let mask_token = if cfg.use_mask_token && src.contains("embeddings.mask_token") {
            Some(frozen("embeddings.mask_token", &[1, h])?)
        } else {
            None
        };
        let ecfg = EncoderConfig {
            hidden: h,
            heads: cfg.num_attention_heads,
            intermediate: cfg.intermediate_size(),
            act: Activation::from_hf(&cfg.hidden_act)?,
            eps: cfg.layer_norm_eps,
            norm: NormPlacement::Pre,
            k_bias: cfg.qkv_bias,
            dropout: cfg.hidden_dropout_prob,
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::load(&format!("encoder.layer.{i}"), &EncoderNames::DINOV2, &ecfg, src))
            .collect::<Result<Vec<_>>>()?;
        let layernorm =
            if cfg.apply_layernorm { Some(LayerNorm::load("layernorm", h, cfg.layer_norm_eps, src)?) } else { None };
        Ok(Dinov2 {
            cfg: cfg.clone(),
            cls_token: frozen("embeddings.cls_token", &[1, 1, h])?,
            mask_token,
            position_embeddings: frozen("embeddings.position_embeddings", &[1, 1 + g * g, h])?,
            patch_weight: frozen("embeddings.patch_embeddings.projection.weight", &[h, c, p, p])?,
            patch_bias: frozen("embeddings.patch_embeddings.projection.bias", &[h])?,
            layers,
            layernorm,
        })
    }

    /// The position table for a `gh x gw` patch grid, `[1, 1 + gh·gw, hidden]`: the stored one when the grid
    /// matches it, else its patch part resized with PyTorch bicubic interpolation (CLS position kept).
    /// Differentiable in the stored table.
    ///
    /// # Errors
    /// A stored table whose patch part is not a square grid, or an empty target grid.
    pub fn position_embeddings_for(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let pos = self.position_embeddings.tensor();
        let (n, h) = (pos.shape()[1] - 1, pos.shape()[2]);
        let g = (n as f64).sqrt().round() as usize;
        if g * g != n {
            crate::error::fail!(crate::ModelError::PositionGrid { positions: n });
        }
        if gh == 0 || gw == 0 {
            crate::error::fail!(crate::ModelError::Image {
                op: "position_embeddings",
                problem: crate::ImageProblem::Empty { h: gh, w: gw },
            });
        }
        if gh == g && gw == g {
            return Ok(pos);
        }
        let m = kron(&bicubic_matrix(g, gh), &bicubic_matrix(g, gw));
        let patch = pos.narrow(1, 1, n)?.reshape(&[n, h])?;
        let resized = Tensor::new(m.into_dyn()).matmul(&patch)?.reshape(&[1, gh * gw, h])?;
        Tensor::concat(&[&pos.narrow(1, 0, 1)?, &resized], 1)
    }

    /// Patch embedding + CLS token + (interpolated) position embeddings: the input of layer 0, `[B, 1 + N, hidden]`.
    ///
    /// # Errors
    /// `pixel_values` not `[B, num_channels, H, W]` with `H, W ≥ patch_size`.
    pub fn embeddings(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let s = pixel_values.shape();
        let (p, h) = (self.cfg.patch_size, self.cfg.hidden_size);
        if s.len() != 4 || s[1] != self.cfg.num_channels || s[2] < p || s[3] < p {
            return Err(peft_core::Error::Shape {
                op: "Dinov2::embeddings",
                lhs: s.to_vec(),
                rhs: vec![0, self.cfg.num_channels, p, p],
            });
        }
        let b = s[0];
        let x = pixel_values.conv2d(&self.patch_weight.tensor(), Some(&self.patch_bias.tensor()), (p, p), (0, 0))?;
        let (gh, gw) = (x.shape()[2], x.shape()[3]);
        let x = x.reshape(&[b, h, gh * gw])?.transpose(1, 2)?;
        let cls = self.cls_token.tensor().broadcast_to(&[b, 1, h])?;
        let x = Tensor::concat(&[&cls, &x], 1)?;
        // transformers interpolates from the pixel size: new grid = H // p, which is the conv's grid.
        x.add(&self.position_embeddings_for(gh, gw)?)
    }

    /// Runs the backbone on normalised `pixel_values [B, C, H, W]`.
    ///
    /// # Errors
    /// As [`Dinov2::embeddings`].
    pub fn forward(&self, pixel_values: &Tensor, ctx: &Ctx) -> Result<VitOutput> {
        self.run(pixel_values, ctx, None)
    }

    /// [`Dinov2::forward`] plus transformers' `hidden_states`: the embedding output, then each layer's output
    /// (before the final LayerNorm), without prompt positions; for layer-wise distillation (SquareHead).
    ///
    /// # Errors
    /// As [`Dinov2::embeddings`].
    pub fn forward_hidden_states(&self, pixel_values: &Tensor, ctx: &Ctx) -> Result<(VitOutput, Vec<Tensor>)> {
        let mut states = Vec::with_capacity(self.layers.len() + 1);
        let out = self.run(pixel_values, ctx, Some(&mut states))?;
        Ok((out, states))
    }

    fn run(&self, pixel_values: &Tensor, ctx: &Ctx, mut states: Option<&mut Vec<Tensor>>) -> Result<VitOutput> {
        let mut seq = PromptedSeq::new(self.embeddings(pixel_values)?, None);
        if let Some(st) = states.as_deref_mut() {
            st.push(seq.hidden().clone());
        }
        for layer in &self.layers {
            seq.enter(&layer.attn.prefix, ctx)?;
            let h = layer.forward(seq.hidden(), None, ctx)?;
            seq.set_hidden(h)?;
            if let Some(st) = states.as_deref_mut() {
                st.push(crate::bert::without_prompt(&seq)?);
            }
        }
        let mut x = seq.finish()?;
        if let Some(ln) = &self.layernorm {
            x = ln.forward(&x)?;
        }
        let n = x.shape()[1] - 1;
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
        let patch_mean = x.narrow(1, 1, n)?.mean(&[1], false)?;
        Ok(VitOutput { last_hidden_state: x, cls, patch_mean })
    }
}

impl Module for Dinov2 {
    fn visit(&self, v: &mut dyn Visitor) {
        v.param(&self.cls_token);
        if let Some(m) = &self.mask_token {
            v.param(m);
        }
        v.param(&self.position_embeddings);
        v.param(&self.patch_weight);
        v.param(&self.patch_bias);
        for l in &self.layers {
            l.visit(v);
        }
        if let Some(ln) = &self.layernorm {
            ln.visit(v);
        }
    }
}

/// What the classification head reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadInput {
    /// The CLS token (`hidden` features).
    Cls,
    /// CLS concatenated with the patch mean (`2·hidden` features), as `Dinov2ForImageClassification`.
    ClsAndPatchMean,
}

/// A backbone with a linear classification head named `classifier` (the model's output layer).
#[derive(Clone)]
pub struct Dinov2Classifier {
    /// The backbone.
    pub backbone: Dinov2,
    /// `classifier.{weight,bias}`.
    pub classifier: Linear,
    /// What the head reads.
    pub input: HeadInput,
}

impl Dinov2Classifier {
    /// A fresh trainable head over `backbone`: weight ~ N(0, `initializer_range`) (seeded), bias 0.
    ///
    /// # Errors
    /// `num_labels == 0`.
    pub fn new(backbone: Dinov2, num_labels: usize, input: HeadInput, seed: u64) -> Result<Self> {
        let init = RandomInit::new(seed, backbone.cfg.initializer_range as f32);
        Self::load(backbone, num_labels, input, &init).inspect(|m| {
            for p in named_params(&m.classifier) {
                p.set_trainable(true);
            }
        })
    }

    /// Loads `classifier.{weight,bias}` from `src` (frozen, like every loaded parameter).
    ///
    /// # Errors
    /// `num_labels == 0`, missing or mis-shaped tensors.
    pub fn load(backbone: Dinov2, num_labels: usize, input: HeadInput, src: &dyn WeightSource) -> Result<Self> {
        if num_labels == 0 {
            crate::error::fail!(crate::ModelError::Config {
                model: "Dinov2Classifier",
                field: "num_labels",
                value: 0.to_string(),
                reason: "must be positive"
            });
        }
        let h = backbone.cfg.hidden_size;
        let in_f = match input {
            HeadInput::Cls => h,
            HeadInput::ClsAndPatchMean => 2 * h,
        };
        let classifier = Linear::load("classifier", in_f, num_labels, true, src)?.as_output();
        Ok(Dinov2Classifier { backbone, classifier, input })
    }

    /// The head's input features for a backbone output, `[B, in_features]`.
    ///
    /// # Errors
    /// Shape errors.
    pub fn features(&self, out: &VitOutput) -> Result<Tensor> {
        match self.input {
            HeadInput::Cls => Ok(out.cls.clone()),
            HeadInput::ClsAndPatchMean => Tensor::concat(&[&out.cls, &out.patch_mean], 1),
        }
    }

    /// Logits `[B, num_labels]` for `pixel_values [B, C, H, W]`.
    ///
    /// # Errors
    /// As [`Dinov2::forward`].
    pub fn forward(&self, pixel_values: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let out = self.backbone.forward(pixel_values, ctx)?;
        self.classifier.forward(&self.features(&out)?, ctx)
    }

    /// Logits and the backbone's hidden states ([`Dinov2::forward_hidden_states`]) from one pass.
    ///
    /// # Errors
    /// As [`Dinov2::forward`].
    pub fn forward_with_hidden_states(&self, pixel_values: &Tensor, ctx: &Ctx) -> Result<(Tensor, Vec<Tensor>)> {
        let (out, states) = self.backbone.forward_hidden_states(pixel_values, ctx)?;
        Ok((self.classifier.forward(&self.features(&out)?, ctx)?, states))
    }
}

impl Module for Dinov2Classifier {
    fn visit(&self, v: &mut dyn Visitor) {
        self.backbone.visit(v);
        self.classifier.visit(v);
    }
}

/// PyTorch's cubic convolution kernel with `a = -0.75` (`upsample_bicubic2d`).
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// The `[out, inp]` matrix of 1-d bicubic resampling as `F.interpolate(size=out, mode="bicubic",
/// align_corners=False)`: source `(i + 0.5)·inp/out - 0.5`, four taps with border-clamped indices.
pub fn bicubic_matrix(inp: usize, out: usize) -> Array2<f32> {
    let mut m = Array2::<f64>::zeros((out, inp));
    let scale = inp as f64 / out as f64;
    for i in 0..out {
        let src = (i as f64 + 0.5) * scale - 0.5;
        let f = src.floor();
        let w = cubic_weights(src - f);
        for (k, wk) in w.iter().enumerate() {
            let j = (f as i64 - 1 + k as i64).clamp(0, inp as i64 - 1) as usize;
            m[[i, j]] += wk;
        }
    }
    m.mapv(|v| v as f32)
}

fn kron(a: &Array2<f32>, b: &Array2<f32>) -> Array2<f32> {
    let ((ar, ac), (br, bc)) = (a.dim(), b.dim());
    Array2::from_shape_fn((ar * br, ac * bc), |(i, j)| a[[i / br, j / bc]] * b[[i % br, j % bc]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};
    use peft_core::nn::{linear_sites, RandomInit};
    use peft_core::{no_grad, Error};

    fn tiny() -> Dinov2 {
        let cfg = Dinov2Config {
            hidden_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            image_size: 12,
            patch_size: 4,
            use_mask_token: false,
            ..Dinov2Config::default()
        };
        Dinov2::load(&cfg, &RandomInit::new(1, 0.2)).unwrap()
    }

    fn pixels(b: usize, h: usize, w: usize) -> Tensor {
        Tensor::new(ArrayD::from_shape_fn(IxDyn(&[b, 3, h, w]), |ix| {
            ((ix[1] * 7 + ix[2] * 3 + ix[3]) % 11) as f32 * 0.1
        }))
    }

    #[test]
    fn hidden_states_are_the_embeddings_then_each_layer_output() {
        let m = tiny();
        let x = pixels(2, 12, 12);
        let ctx = Ctx::eval();
        let (out, states) = m.forward_hidden_states(&x, &ctx).unwrap();
        assert_eq!(states.len(), 3);
        assert_eq!(states[0].as_slice(), m.embeddings(&x).unwrap().as_slice());
        // Layer by layer by hand, then the final LayerNorm gives forward's last_hidden_state.
        let mut h = states[0].clone();
        for (i, layer) in m.layers.iter().enumerate() {
            h = layer.forward(&h, None, &ctx).unwrap();
            assert_eq!(h.as_slice(), states[i + 1].as_slice(), "layer {i}");
        }
        let ln = m.layernorm.as_ref().expect("DINOv2 has a final layernorm");
        assert_eq!(ln.forward(&h).unwrap().as_slice(), out.last_hidden_state.as_slice());
        assert_eq!(out.last_hidden_state.as_slice(), m.forward(&x, &ctx).unwrap().last_hidden_state.as_slice());
    }

    #[test]
    fn bicubic_matrix_matches_torch_interpolate() {
        // torch.nn.functional.interpolate(x**2 for x in 0..5, size=3 / 8, mode="bicubic", align_corners=False)
        let x = ndarray::arr1(&[0.0f32, 1.0, 4.0, 9.0, 16.0]);
        let want3 = [0.148_149_01f32, 4.0, 14.074_071];
        let want8 =
            [-0.092_834_47f32, 0.187_561, 1.176_513_7, 2.619_384_8, 5.441_650_4, 8.471_436, 13.395_081, 16.649_841];
        for (out, want) in [(3, &want3[..]), (8, &want8[..])] {
            let got = bicubic_matrix(5, out).dot(&x);
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-5, "{out}: {got} vs {want:?}");
            }
        }
    }

    #[test]
    fn bicubic_matrix_is_identity_at_equal_size_and_keeps_constants() {
        let m = bicubic_matrix(6, 6);
        assert_eq!(m, Array2::<f32>::eye(6));
        for (i, o) in [(37, 16), (16, 37), (3, 1)] {
            for row in bicubic_matrix(i, o).rows() {
                assert!((row.sum() - 1.0).abs() < 1e-6);
            }
        }
    }

    #[test]
    fn forward_shapes_and_pooled_outputs() {
        let m = tiny();
        let out = no_grad(|| m.forward(&pixels(2, 12, 8), &Ctx::eval())).unwrap();
        // 3x2 patch grid, interpolated from the stored 3x3 one.
        assert_eq!(out.last_hidden_state.shape(), &[2, 7, 8]);
        assert_eq!(out.cls.shape(), &[2, 8]);
        let l = out.last_hidden_state.data();
        for d in 0..8 {
            assert_eq!(out.cls.data()[[1, d]], l[[1, 0, d]]);
            let mean = (1..7).map(|t| l[[1, t, d]]).sum::<f32>() / 6.0;
            assert!((out.patch_mean.data()[[1, d]] - mean).abs() < 1e-5);
        }
    }

    #[test]
    fn stored_grid_is_used_unchanged() {
        let m = tiny();
        let p = m.position_embeddings_for(3, 3).unwrap();
        assert_eq!(p.as_slice(), m.position_embeddings.tensor().as_slice());
        let e = m.position_embeddings_for(0, 3).unwrap_err();
        assert!(matches!(crate::ModelError::of(&e), Some(crate::ModelError::Image { .. })), "{e}");
    }

    #[test]
    fn bad_pixel_shapes_are_typed_errors() {
        let m = tiny();
        assert!(matches!(m.forward(&pixels(1, 3, 12), &Ctx::eval()), Err(Error::Shape { .. })));
        let one_channel = Tensor::new(ArrayD::zeros(IxDyn(&[1, 1, 12, 12])));
        assert!(matches!(m.embeddings(&one_channel), Err(Error::Shape { .. })));
    }

    #[test]
    fn classifier_head_is_the_only_trainable_part_and_gets_gradients() {
        let c = Dinov2Classifier::new(tiny(), 3, HeadInput::ClsAndPatchMean, 0).unwrap();
        let trainable: Vec<Param> = named_params(&c).into_iter().filter(|p| p.trainable()).collect();
        assert_eq!(trainable.iter().map(|p| p.name()).collect::<Vec<_>>(), ["classifier.weight", "classifier.bias"]);
        assert_eq!(trainable[0].shape(), vec![3, 16]);
        let sites = linear_sites(&c);
        assert!(sites.iter().any(|l| l.path() == "classifier" && l.is_output()));
        assert!(sites.iter().any(|l| l.path() == "encoder.layer.1.attention.attention.query"));
        let loss = c.forward(&pixels(2, 12, 12), &Ctx::eval()).unwrap().cross_entropy(&[0, 2], None, 0.0).unwrap();
        let g = loss.backward().unwrap();
        assert!(g.get_id(trainable[0].id()).is_some() && g.get_id(trainable[1].id()).is_some());
        let e = Dinov2Classifier::new(tiny(), 0, HeadInput::Cls, 0).err().unwrap();
        assert!(
            matches!(crate::ModelError::of(&e), Some(crate::ModelError::Config { field: "num_labels", .. })),
            "{e}"
        );
    }
}
