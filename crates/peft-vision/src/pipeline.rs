//! The image pipeline: decode, resize, rescale and normalise once (peft-models' [`Preprocess`], transformers'
//! `BitImageProcessor` numerics), keep the pixel tensors of a split in memory, and cut batches from them.
//!
//! VTAB-1k splits are small (1,000 training images; CIFAR-10's 32x32 images at 56 px take 37 KB each), so a split
//! is decoded once (in parallel on the rayon pool) and every epoch and method reuses the tensors.

use ndarray::{ArrayD, IxDyn};
use peft_core::Tensor;
use peft_models::image_proc::Preprocess;
use rayon::prelude::*;

use crate::data::Example;
use crate::error::{Result, VisionError};

/// The VTAB-1k recipe's preprocessing at `size` px: a direct bicubic resize to `size x size` (no crop), /255,
/// ImageNet mean/std (NOAH's and FacT's normalisation; DINOv2 is trained with it).
pub fn vtab_preprocess(size: usize) -> Preprocess {
    Preprocess::direct(size)
}

/// The decoded, preprocessed images of a split with their labels.
#[derive(Clone, Debug)]
pub struct PixelSet {
    data: Vec<f32>,
    chw: [usize; 3],
    labels: Vec<usize>,
}

impl PixelSet {
    /// Builds a set from pixel tensors `[C, H, W]` (all the same shape) and labels.
    ///
    /// # Errors
    /// [`VisionError::Mismatch`] for different lengths or shapes, [`VisionError::Empty`] for no images.
    pub fn from_arrays(images: &[ArrayD<f32>], labels: Vec<usize>) -> Result<Self> {
        if images.len() != labels.len() {
            return Err(VisionError::mismatch(
                "PixelSet",
                format!("{} images but {} labels", images.len(), labels.len()),
            ));
        }
        let first = images.first().ok_or_else(|| VisionError::Empty { what: "the image list".into() })?;
        let s = first.shape();
        if s.len() != 3 {
            return Err(VisionError::mismatch("PixelSet", format!("images must be [C, H, W], found {s:?}")));
        }
        let chw = [s[0], s[1], s[2]];
        let mut data = Vec::with_capacity(images.len() * chw.iter().product::<usize>());
        for (i, im) in images.iter().enumerate() {
            if im.shape() != s {
                return Err(VisionError::mismatch(
                    "PixelSet",
                    format!("image {i} has shape {:?}, image 0 {s:?}", im.shape()),
                ));
            }
            data.extend(im.iter().copied());
        }
        Ok(PixelSet { data, chw, labels })
    }

    /// Decodes and preprocesses `examples` with `pre` (in parallel).
    ///
    /// # Errors
    /// An undecodable or unreadable image (the core error names the file), images of different final sizes, an
    /// empty list.
    pub fn load(examples: &[Example], pre: &Preprocess) -> Result<Self> {
        let images = examples.par_iter().map(|e| pre.load(&e.path)).collect::<peft_core::Result<Vec<_>>>()?;
        Self::from_arrays(&images, examples.iter().map(|e| e.label).collect())
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no images (never, for a set that was built).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// `[C, H, W]` of every image.
    pub fn chw(&self) -> [usize; 3] {
        self.chw
    }

    /// The labels.
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// `pixel_values [idx.len(), C, H, W]` of the images `idx`.
    ///
    /// # Errors
    /// [`VisionError::Mismatch`] for an index past the end; [`VisionError::Empty`] for no indices.
    pub fn batch(&self, idx: &[usize]) -> Result<Tensor> {
        if idx.is_empty() {
            return Err(VisionError::Empty { what: "the batch index list".into() });
        }
        let n = self.chw.iter().product::<usize>();
        let mut out = Vec::with_capacity(idx.len() * n);
        for &i in idx {
            if i >= self.len() {
                return Err(VisionError::mismatch("PixelSet::batch", format!("index {i} of {} images", self.len())));
            }
            out.extend_from_slice(&self.data[i * n..(i + 1) * n]);
        }
        let shape = [idx.len(), self.chw[0], self.chw[1], self.chw[2]];
        let arr = ArrayD::from_shape_vec(IxDyn(&shape), out)
            .map_err(|e| VisionError::mismatch("PixelSet::batch", e.to_string()))?;
        Ok(Tensor::new(arr))
    }

    /// The labels of the images `idx` as class indices for the cross-entropy.
    pub fn batch_labels(&self, idx: &[usize]) -> Vec<i64> {
        idx.iter().filter_map(|&i| self.labels.get(i)).map(|&l| l as i64).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn img(v: f32) -> ArrayD<f32> {
        ArrayD::from_shape_fn(IxDyn(&[3, 2, 2]), |ix| v + ix[0] as f32 * 0.1 + ix[1] as f32 * 0.01 + ix[2] as f32)
    }

    #[test]
    fn batches_stack_the_chosen_images_in_order() {
        let s = PixelSet::from_arrays(&[img(0.0), img(10.0), img(20.0)], vec![0, 1, 2]).unwrap();
        assert_eq!((s.len(), s.chw()), (3, [3, 2, 2]));
        let b = s.batch(&[2, 0]).unwrap();
        assert_eq!(b.shape(), &[2, 3, 2, 2]);
        assert_eq!(b.data().index_axis(ndarray::Axis(0), 0), img(20.0));
        assert_eq!(b.data().index_axis(ndarray::Axis(0), 1), img(0.0));
        assert_eq!(s.batch_labels(&[2, 0]), vec![2, 0]);
        assert!(matches!(s.batch(&[3]), Err(VisionError::Mismatch { .. })));
        assert!(matches!(s.batch(&[]), Err(VisionError::Empty { .. })));
    }

    #[test]
    fn inconsistent_inputs_are_refused() {
        assert!(matches!(PixelSet::from_arrays(&[img(0.0)], vec![0, 1]), Err(VisionError::Mismatch { .. })));
        let small = ArrayD::zeros(IxDyn(&[3, 1, 2]));
        assert!(matches!(PixelSet::from_arrays(&[img(0.0), small], vec![0, 1]), Err(VisionError::Mismatch { .. })));
        assert!(matches!(PixelSet::from_arrays(&[], vec![]), Err(VisionError::Empty { .. })));
    }

    #[test]
    fn load_decodes_pngs_through_the_preprocessing() {
        let t = tempfile::tempdir().unwrap();
        let mut ex = Vec::new();
        for (i, (c, gray)) in [([255u8, 0, 0], false), ([0, 0, 255], false), ([128, 128, 128], true)].iter().enumerate()
        {
            let p = t.path().join(format!("{i}.png"));
            if *gray {
                image::GrayImage::from_pixel(7, 5, image::Luma([c[0]])).save(&p).unwrap();
            } else {
                image::RgbImage::from_pixel(7, 5, image::Rgb(*c)).save(&p).unwrap();
            }
            ex.push(Example { path: p, label: i });
        }
        let s = PixelSet::load(&ex, &vtab_preprocess(4)).unwrap();
        assert_eq!((s.len(), s.chw()), (3, [3, 4, 4]));
        let b = s.batch(&[0, 2]).unwrap();
        let d = b.data();
        // Solid red: channel 0 at (1 - mean) / std, channel 2 at (0 - mean) / std.
        assert!((d[[0, 0, 1, 1]] - (1.0 - 0.485) / 0.229).abs() < 1e-4);
        assert!((d[[0, 2, 3, 0]] - (0.0 - 0.406) / 0.225).abs() < 1e-4);
        // A grayscale PNG becomes three equal channels before normalisation.
        let g = 128.0 / 255.0;
        assert!((d[[1, 1, 0, 0]] - (g - 0.456) / 0.224).abs() < 1e-4);
        let missing = [Example { path: PathBuf::from("/nonexistent/x.png"), label: 0 }];
        assert!(matches!(PixelSet::load(&missing, &vtab_preprocess(4)), Err(VisionError::Core(_))));
    }
}
