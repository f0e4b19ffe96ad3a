//! The frozen-feature cache: run the frozen backbone once over a split and keep the head's input features, so
//! every frozen-backbone method (linear probe, GDA, Tip-Adapter, TIP-X) trains and scores on the same features
//! without another forward pass.
//!
//! Features are what [`Dinov2Classifier::features`] gives the head (CLS, or CLS ‖ patch mean as transformers'
//! `Dinov2ForImageClassification`), computed in evaluation mode without recording a graph. A cache can be written
//! to and read back from a safetensors file (`features [N, D]`, `labels [N]` as f32, and metadata naming what
//! produced it) so repeated runs skip the backbone altogether.

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::{Array2, ArrayD, Axis, Ix2, IxDyn};
use peft_core::io::{write_safetensors, SafeTensorsFile};
use peft_core::nn::Ctx;
use peft_core::{no_grad, Tensor};
use peft_models::vit::Dinov2Classifier;

use crate::error::{Result, VisionError};
use crate::pipeline::PixelSet;

/// Features `[N, D]` of a split and its labels.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureSet {
    /// One row per image.
    pub features: Array2<f32>,
    /// Class index per row.
    pub labels: Vec<usize>,
}

impl FeatureSet {
    /// A set from rows and labels.
    ///
    /// # Errors
    /// [`VisionError::Mismatch`] when the counts differ.
    pub fn new(features: Array2<f32>, labels: Vec<usize>) -> Result<Self> {
        if features.nrows() != labels.len() {
            return Err(VisionError::mismatch(
                "FeatureSet",
                format!("{} feature rows but {} labels", features.nrows(), labels.len()),
            ));
        }
        Ok(FeatureSet { features, labels })
    }

    /// Runs the frozen backbone of `model` over `set` in batches of `batch_size` (evaluation mode, no graph) and
    /// keeps the head's input features.
    ///
    /// # Errors
    /// Model errors; `batch_size = 0`.
    pub fn extract(model: &Dinov2Classifier, set: &PixelSet, batch_size: usize) -> Result<Self> {
        if batch_size == 0 {
            return Err(VisionError::config("FeatureSet::extract", "batch_size", "must be at least 1"));
        }
        let ctx = Ctx::eval();
        let mut rows: Vec<f32> = Vec::new();
        let mut d = 0;
        let idx: Vec<usize> = (0..set.len()).collect();
        for chunk in idx.chunks(batch_size) {
            let px = set.batch(chunk)?;
            let f = no_grad(|| -> peft_core::Result<Tensor> {
                let out = model.backbone.forward(&px, &ctx)?;
                model.features(&out)
            })?;
            d = f.shape()[1];
            rows.extend_from_slice(f.as_slice());
        }
        let features = Array2::from_shape_vec((set.len(), d), rows)
            .map_err(|e| VisionError::mismatch("FeatureSet::extract", e.to_string()))?;
        Self::new(features, set.labels().to_vec())
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Feature width.
    pub fn dim(&self) -> usize {
        self.features.ncols()
    }

    /// The rows `idx` (in that order).
    pub fn select(&self, idx: &[usize]) -> FeatureSet {
        FeatureSet {
            features: self.features.select(Axis(0), idx),
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
        }
    }

    /// The same set with every row scaled to unit L2 norm (zero rows stay zero).
    pub fn l2_normalized(&self) -> FeatureSet {
        let mut f = self.features.clone();
        for mut r in f.rows_mut() {
            let n = r.dot(&r).sqrt();
            if n > 0.0 {
                r /= n;
            }
        }
        FeatureSet { features: f, labels: self.labels.clone() }
    }

    /// Writes the cache (`features`, `labels`; `meta` as safetensors metadata) atomically.
    ///
    /// # Errors
    /// IO errors.
    pub fn save(&self, path: &Path, meta: &BTreeMap<String, String>) -> Result<()> {
        let f = self.features.clone().into_dyn();
        let l = ArrayD::from_shape_vec(IxDyn(&[self.len()]), self.labels.iter().map(|&x| x as f32).collect())
            .map_err(|e| VisionError::mismatch("FeatureSet::save", e.to_string()))?;
        write_safetensors(path, [("features", &f), ("labels", &l)], Some(meta))?;
        Ok(())
    }

    /// Reads a cache written by [`FeatureSet::save`] when its metadata equals `meta` (`None` otherwise: a cache
    /// from another model, resolution or split is not used).
    ///
    /// # Errors
    /// A file that exists but is unreadable or malformed.
    pub fn load(path: &Path, meta: &BTreeMap<String, String>) -> Result<Option<Self>> {
        if !path.is_file() {
            return Ok(None);
        }
        let file = SafeTensorsFile::open(path)?;
        if file.metadata() != meta {
            return Ok(None);
        }
        let f = file
            .get("features")?
            .into_dimensionality::<Ix2>()
            .map_err(|e| VisionError::mismatch("FeatureSet::load", format!("features: {e}")))?;
        let labels = file
            .get("labels")?
            .iter()
            .map(|&x| {
                if x >= 0.0 && x.fract() == 0.0 {
                    Ok(x as usize)
                } else {
                    Err(VisionError::mismatch("FeatureSet::load", format!("label {x} is not a class index")))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Self::new(f, labels).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peft_core::io::hf_config::Dinov2Config;
    use peft_core::nn::RandomInit;
    use peft_models::vit::{Dinov2, HeadInput};

    fn tiny() -> Dinov2Classifier {
        let cfg = Dinov2Config {
            hidden_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            image_size: 8,
            patch_size: 4,
            use_mask_token: false,
            ..Dinov2Config::default()
        };
        let b = Dinov2::load(&cfg, &RandomInit::new(3, 0.2)).unwrap();
        Dinov2Classifier::new(b, 3, HeadInput::ClsAndPatchMean, 0).unwrap()
    }

    fn pixels(n: usize) -> PixelSet {
        let ims: Vec<ArrayD<f32>> = (0..n)
            .map(|k| {
                ArrayD::from_shape_fn(IxDyn(&[3, 8, 8]), |ix| ((ix[0] + 2 * ix[1] + 3 * ix[2] + k) % 7) as f32 / 7.0)
            })
            .collect();
        PixelSet::from_arrays(&ims, (0..n).map(|i| i % 3).collect()).unwrap()
    }

    #[test]
    fn cached_features_give_the_full_models_logits_whatever_the_batching() {
        let m = tiny();
        let px = pixels(5);
        let a = FeatureSet::extract(&m, &px, 2).unwrap();
        let b = FeatureSet::extract(&m, &px, 5).unwrap();
        assert_eq!((a.len(), a.dim()), (5, 16));
        for (x, y) in a.features.iter().zip(b.features.iter()) {
            assert!((x - y).abs() < 1e-5);
        }
        let full = no_grad(|| m.forward(&px.batch(&[0, 1, 2, 3, 4]).unwrap(), &Ctx::eval())).unwrap();
        let head = no_grad(|| m.classifier.forward(&Tensor::new(a.features.clone().into_dyn()), &Ctx::eval())).unwrap();
        for (x, y) in full.as_slice().iter().zip(head.as_slice()) {
            assert!((x - y).abs() < 1e-5);
        }
        assert!(matches!(FeatureSet::extract(&m, &px, 0), Err(VisionError::Config { .. })));
    }

    #[test]
    fn cache_file_round_trips_and_ignores_other_metadata() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("c.safetensors");
        let fs = FeatureSet::new(ndarray::arr2(&[[1.0, 2.0], [3.0, -4.0]]), vec![1, 0]).unwrap();
        let meta: BTreeMap<String, String> = [("res".to_string(), "56".to_string())].into();
        assert_eq!(FeatureSet::load(&p, &meta).unwrap(), None);
        fs.save(&p, &meta).unwrap();
        assert_eq!(FeatureSet::load(&p, &meta).unwrap(), Some(fs.clone()));
        let other: BTreeMap<String, String> = [("res".to_string(), "112".to_string())].into();
        assert_eq!(FeatureSet::load(&p, &other).unwrap(), None);
        let n = fs.l2_normalized();
        assert!((n.features[[1, 0]] - 0.6).abs() < 1e-6 && (n.features[[1, 1]] + 0.8).abs() < 1e-6);
        assert_eq!(fs.select(&[1]).labels, vec![0]);
        assert!(matches!(FeatureSet::new(ndarray::Array2::zeros((2, 2)), vec![0]), Err(VisionError::Mismatch { .. })));
    }
}
