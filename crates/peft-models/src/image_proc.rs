//! Image preprocessing as transformers' `BitImageProcessor` (the DINOv2 / ViT one) does it with Pillow: RGB,
//! resize (exact `height x width`, or shortest edge), center crop, rescale, normalise, HWC -> CHW.
//!
//! The resize is a port of Pillow's `ImagingResample` for 8-bit images (convolution with support scaled by the
//! downscale factor, so it antialiases when shrinking; coefficients normalised and rounded to 22-bit fixed point;
//! a horizontal pass into an 8-bit image, then a vertical pass; rounding and clipping to 0..=255 after each).
//! Pillow's bicubic kernel uses a = -0.5 (not PyTorch's -0.75). Decoding uses the `image` crate (PNG, JPEG);
//! its JPEG decoder may differ from libjpeg-turbo by a unit in some pixels (see `tests/dinov2_parity.rs`).

use std::path::Path;

use ndarray::{Array3, ArrayD, IxDyn};
use serde_json::Value;

use peft_core::error::{Error, Result};
use peft_core::tensor::Tensor;

/// Pillow resampling filters (transformers' `resample` codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    /// `PIL.Image.BILINEAR` (2): triangle filter, support 1.
    Bilinear,
    /// `PIL.Image.BICUBIC` (3): cubic, a = -0.5, support 2.
    Bicubic,
}

impl Resample {
    /// From transformers' integer code (2 bilinear, 3 bicubic).
    ///
    /// # Errors
    /// Other codes.
    pub fn from_code(code: i64) -> Result<Self> {
        match code {
            2 => Ok(Resample::Bilinear),
            3 => Ok(Resample::Bicubic),
            c => crate::error::fail!(crate::ModelError::Preprocess {
                field: "resample".into(),
                reason: format!("code {c} is not supported (only 2 bilinear and 3 bicubic)")
            }),
        }
    }

    fn support(self) -> f64 {
        match self {
            Resample::Bilinear => 1.0,
            Resample::Bicubic => 2.0,
        }
    }

    fn filter(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Resample::Bilinear => (1.0 - x).max(0.0),
            Resample::Bicubic => {
                const A: f64 = -0.5;
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
        }
    }
}

/// Target size of the resize step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resize {
    /// Exactly `height x width` (aspect ratio not kept).
    Exact {
        /// Output height.
        height: usize,
        /// Output width.
        width: usize,
    },
    /// The shorter side becomes this, the longer `int(size · long / short)` (transformers' `shortest_edge`).
    ShortestEdge(usize),
}

/// A preprocessing pipeline; [`Preprocess::dinov2_default`] is facebook/dinov2's, [`Preprocess::from_json`]
/// reads a `preprocessor_config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    /// Resize step (`None`: keep the size).
    pub resize: Option<Resize>,
    /// Resampling filter of the resize.
    pub resample: Resample,
    /// Center crop to `(height, width)`.
    pub center_crop: Option<(usize, usize)>,
    /// Multiply the 0..=255 values by this (`None`: keep them).
    pub rescale: Option<f32>,
    /// Per-channel `(mean, std)`: `x = (x - mean) / std`.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

/// ImageNet mean.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet std.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

impl Preprocess {
    /// facebook/dinov2-*: shortest edge 256 bicubic, center crop 224, /255, ImageNet mean/std.
    pub fn dinov2_default() -> Self {
        Preprocess {
            resize: Some(Resize::ShortestEdge(256)),
            resample: Resample::Bicubic,
            center_crop: Some((224, 224)),
            rescale: Some(1.0 / 255.0),
            normalize: Some((IMAGENET_MEAN, IMAGENET_STD)),
        }
    }

    /// A direct bicubic resize to `size x size` with no crop, /255, ImageNet mean/std (the assets' references).
    pub fn direct(size: usize) -> Self {
        Preprocess {
            resize: Some(Resize::Exact { height: size, width: size }),
            center_crop: None,
            ..Self::dinov2_default()
        }
    }

    /// Reads a transformers `preprocessor_config.json` (`do_resize`, `size`, `resample`, `do_center_crop`,
    /// `crop_size`, `do_rescale`, `rescale_factor`, `do_normalize`, `image_mean`, `image_std`; missing keys take
    /// `BitImageProcessor`'s defaults).
    ///
    /// # Errors
    /// [`Error::File`] (with the path) for an unreadable file, invalid JSON or unsupported values.
    pub fn from_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        Self::from_json_str(&text).map_err(|e| Error::file(path, e))
    }

    /// As [`Preprocess::from_json`] from a string.
    ///
    /// # Errors
    /// Invalid JSON or unsupported values.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| crate::ModelError::Preprocess { field: "<json>".into(), reason: e.to_string() })?;
        let flag = |k: &str, d: bool| v.get(k).and_then(Value::as_bool).unwrap_or(d);
        let size_of = |s: &Value| -> Result<Resize> {
            let get = |k: &str| s.get(k).and_then(Value::as_u64).map(|x| x as usize);
            if let Some(e) = s.as_u64() {
                return Ok(Resize::ShortestEdge(e as usize));
            }
            match (get("shortest_edge"), get("height"), get("width")) {
                (Some(e), _, _) => Ok(Resize::ShortestEdge(e)),
                (None, Some(height), Some(width)) => Ok(Resize::Exact { height, width }),
                _ => crate::error::fail!(crate::ModelError::Preprocess {
                    field: "size".into(),
                    reason: format!("unsupported size {s}")
                }),
            }
        };
        let resize = if flag("do_resize", true) {
            Some(match v.get("size").cloned() {
                Some(s) => size_of(&s)?,
                None => Resize::ShortestEdge(224),
            })
        } else {
            None
        };
        let resample = match v.get("resample").and_then(Value::as_i64) {
            Some(c) => Resample::from_code(c)?,
            None => Resample::Bicubic,
        };
        let center_crop = if flag("do_center_crop", true) {
            match v.get("crop_size").cloned() {
                Some(s) => match size_of(&s)? {
                    Resize::Exact { height, width } => Some((height, width)),
                    Resize::ShortestEdge(e) => Some((e, e)),
                },
                None => Some((224, 224)),
            }
        } else {
            None
        };
        let rescale = if flag("do_rescale", true) {
            Some(v.get("rescale_factor").and_then(Value::as_f64).map_or(1.0 / 255.0, |f| f as f32))
        } else {
            None
        };
        let triple = |k: &str, dflt: [f32; 3]| -> Result<[f32; 3]> {
            match v.get(k).and_then(Value::as_array) {
                None => Ok(dflt),
                Some(a) if a.len() == 3 => {
                    let mut o = [0.0; 3];
                    for (o, x) in o.iter_mut().zip(a) {
                        *o = x.as_f64().ok_or_else(|| crate::ModelError::Preprocess {
                            field: k.into(),
                            reason: "holds a non-number".into(),
                        })? as f32;
                    }
                    Ok(o)
                }
                Some(a) => crate::error::fail!(crate::ModelError::Preprocess {
                    field: k.into(),
                    reason: format!("has {} values, expected 3", a.len())
                }),
            }
        };
        let normalize = if flag("do_normalize", true) {
            Some((triple("image_mean", IMAGENET_MEAN)?, triple("image_std", IMAGENET_STD)?))
        } else {
            None
        };
        Ok(Preprocess { resize, resample, center_crop, rescale, normalize })
    }

    /// Preprocesses an RGB image `[H, W, 3]` (u8) into `[3, H', W']` f32.
    ///
    /// # Errors
    /// A crop larger than the resized image, or an empty image.
    pub fn apply_rgb(&self, img: &Array3<u8>) -> Result<ArrayD<f32>> {
        let (h, w, _) = img.dim();
        if h == 0 || w == 0 {
            crate::error::fail!(crate::ModelError::Image {
                op: "Preprocess",
                problem: crate::ImageProblem::Empty { h, w }
            });
        }
        let (oh, ow) = match self.resize {
            None => (h, w),
            Some(Resize::Exact { height, width }) => (height, width),
            Some(Resize::ShortestEdge(e)) => {
                let (short, long) = (h.min(w), h.max(w));
                let l = (e as f64 * long as f64 / short as f64) as usize;
                if h <= w {
                    (e, l)
                } else {
                    (l, e)
                }
            }
        };
        let (top, left, ch, cw) = match self.center_crop {
            None => (0, 0, oh, ow),
            Some((ch, cw)) => {
                if ch > oh || cw > ow {
                    crate::error::fail!(crate::ModelError::Image {
                        op: "Preprocess",
                        problem: crate::ImageProblem::CropTooLarge { ch, cw, h: oh, w: ow },
                    });
                }
                ((oh - ch) / 2, (ow - cw) / 2, ch, cw)
            }
        };
        // Only the crop window of the resized image is computed (the same pixels: each output pixel of a pass
        // depends on its own coefficients only), so a 3 x 1024 image resized to 87,381 x 256 costs a 224 x 224 crop.
        let img = match self.resize {
            None => img.slice(ndarray::s![top..top + ch, left..left + cw, ..]).to_owned(),
            Some(_) => resize_u8_window(img, oh, ow, self.resample, (top, left, ch, cw))?,
        };
        let (top, left) = (0, 0);
        let (mean, std) = self.normalize.unwrap_or(([0.0; 3], [1.0; 3]));
        Ok(ArrayD::from_shape_fn(IxDyn(&[3, ch, cw]), |ix| {
            let (c, y, x) = (ix[0], ix[1], ix[2]);
            let v = img[[top + y, left + x, c]] as f32;
            let v = match self.rescale {
                // 1/255 as the division numpy's `uint8 / 255` does; other factors multiply.
                Some(f) if (f - 1.0 / 255.0).abs() < 1e-12 => v / 255.0,
                Some(f) => v * f,
                None => v,
            };
            (v - mean[c]) / std[c]
        }))
    }

    /// Decodes an image file (PNG or JPEG, any colour type converted to RGB) and preprocesses it.
    ///
    /// # Errors
    /// Unreadable or undecodable file, and as [`Preprocess::apply_rgb`].
    #[cfg(feature = "image")]
    pub fn load(&self, path: impl AsRef<Path>) -> Result<ArrayD<f32>> {
        self.apply_rgb(&read_rgb(path)?)
    }

    /// Loads and stacks several images into `pixel_values [B, 3, H, W]`.
    ///
    /// # Errors
    /// As [`Preprocess::load`], or images that end up with different sizes.
    #[cfg(feature = "image")]
    pub fn load_batch<P: AsRef<Path>>(&self, paths: &[P]) -> Result<Tensor> {
        let ts = paths.iter().map(|p| self.load(p).map(Tensor::new)).collect::<Result<Vec<_>>>()?;
        if ts.is_empty() {
            return Err(Error::Empty { op: "Preprocess::load_batch", what: "the image list" });
        }
        Tensor::stack(&ts.iter().collect::<Vec<_>>(), 0)
    }
}

/// The most pixels an image may have when decoded or after a resize (2^25, about 33.5 million: an 8K frame;
/// 100 MB as RGB u8). Larger images, and resizes that would produce them (a 1 x 65535 image resized to a
/// shortest edge of 256 would be 256 x 16.8 million), are refused before anything is allocated.
pub const MAX_PIXELS: usize = 1 << 25;

/// The largest image file [`read_rgb`] reads (256 MiB: an uncompressed [`MAX_PIXELS`] RGB image is 100 MB).
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// Fails unless `h x w` (checked) is at most [`MAX_PIXELS`].
fn check_pixels(op: &'static str, what: &str, h: usize, w: usize) -> Result<()> {
    match h.checked_mul(w) {
        Some(n) if n <= MAX_PIXELS => Ok(()),
        _ => crate::error::fail!(crate::ModelError::Image {
            op,
            problem: crate::ImageProblem::TooLarge { what: what.to_string(), h, w, cap: MAX_PIXELS },
        }),
    }
}

/// Decodes an image file to RGB `[H, W, 3]` u8. The size in the header is checked against [`MAX_PIXELS`]
/// before decoding; JPEGs are decoded strictly (`zune-jpeg` strict mode: a truncated or corrupt entropy-coded
/// stream is an error, as Pillow raises for truncated files, instead of grey-filled pixels); PNGs are decoded by
/// the `png` crate, which fails on truncated data and on chunk CRC mismatches.
///
/// # Errors
/// Unreadable, undecodable, truncated or corrupt file; an image over [`MAX_PIXELS`].
#[cfg(feature = "image")]
pub fn read_rgb(path: impl AsRef<Path>) -> Result<Array3<u8>> {
    let path = path.as_ref();
    let fail = |e: &dyn std::fmt::Display| Error::file(path, e.to_string());
    let len = std::fs::metadata(path).map_err(|e| fail(&e))?.len();
    if len > MAX_FILE_BYTES {
        return Err(fail(&format!("{len} bytes, more than the {MAX_FILE_BYTES}-byte cap for an image file")));
    }
    let bytes = std::fs::read(path).map_err(|e| fail(&e))?;
    let format = image::guess_format(&bytes).map_err(|e| fail(&e))?;
    let reader = image::ImageReader::with_format(std::io::Cursor::new(&bytes), format);
    let (w, h) = reader.into_dimensions().map_err(|e| fail(&e))?;
    let (w, h) = (w as usize, h as usize);
    check_pixels("read_rgb", &format!("{}: the decoded image", path.display()), h, w)?;
    let raw = if format == image::ImageFormat::Jpeg {
        decode_jpeg_strict(&bytes).map_err(|e| fail(&e))?
    } else {
        if format == image::ImageFormat::Png && !bytes.windows(8).any(|w| w == b"\0\0\0\0IEND") {
            return Err(fail(&"truncated PNG: no IEND chunk"));
        }
        let mut reader = image::ImageReader::with_format(std::io::Cursor::new(&bytes), format);
        let mut limits = image::Limits::default();
        // RGBA16 is the widest decoded form: 8 bytes a pixel, plus the RGB8 copy.
        limits.max_alloc = Some((MAX_PIXELS * 11) as u64);
        reader.limits(limits);
        reader.decode().map_err(|e| fail(&e))?.to_rgb8().into_raw()
    };
    Array3::from_shape_vec((h, w, 3), raw).map_err(|e| Error::file(path, format!("decoded size: {e}")))
}

/// The widest and tallest JPEG [`read_rgb`] decodes: 65,528 (`u16::MAX - 7`, see `decode_jpeg_strict`).
pub const JPEG_MAX_SIDE: usize = u16::MAX as usize - 7;

/// Decodes a JPEG to RGB u8 with `zune-jpeg` in strict mode (the decoder `image` uses, which `image` runs in
/// lenient mode).
#[cfg(feature = "image")]
fn decode_jpeg_strict(bytes: &[u8]) -> std::result::Result<Vec<u8>, String> {
    use zune_core::bytestream::ZCursor;
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::DecoderOptions;
    // zune-jpeg 0.5 computes `(width + 7) / 8` (and the same of the height) in u16 for grayscale files with a
    // subsampled component (mcu.rs), which overflows above 65,528: a fuzzer-found panic (with overflow checks;
    // a wrapped MCU count without). Such files are refused as too large.
    let side = MAX_PIXELS.min(JPEG_MAX_SIDE);
    let options = DecoderOptions::default()
        .set_strict_mode(true)
        .set_max_width(side)
        .set_max_height(side)
        .jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut d = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), options);
    let px = d.decode().map_err(|e| format!("corrupt or truncated JPEG: {e}"))?;
    // A file cut exactly at an MCU boundary decodes without overread: require the end-of-image marker after the
    // last start-of-scan (entropy-coded data cannot contain a marker, and an EXIF thumbnail's own EOI comes
    // before the main image's scans).
    let marker = |m: u8| bytes.windows(2).rposition(|w| w == [0xFF, m]);
    match (marker(0xDA), marker(0xD9)) {
        (Some(sos), Some(eoi)) if eoi > sos => Ok(px),
        _ => Err("truncated JPEG: no end-of-image marker after the last scan".into()),
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: per output index, the first input index and the
/// fixed-point weights.
/// The first input index and fixed-point weights of the output pixels `outs` of a resize from `in_size` to
/// `out_size` (each entry depends on its own index only).
fn coeffs(in_size: usize, out_size: usize, f: Resample, outs: std::ops::Range<usize>) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = f.support() * filterscale;
    outs.map(|xx| {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize; // C casts truncate toward zero
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let ws: Vec<f64> = (xmin..xmax.max(xmin)).map(|x| f.filter((x as f64 - center + 0.5) * ss)).collect();
        let total: f64 = ws.iter().sum();
        let k = ws
            .iter()
            .map(|&w| {
                let w = if total != 0.0 { w / total } else { w };
                let s = w * (1u64 << PRECISION_BITS) as f64;
                (if s < 0.0 { -0.5 + s } else { 0.5 + s }) as i32
            })
            .collect();
        (xmin, k)
    })
    .collect()
}

fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Pillow's `Image.resize((ow, oh), filter)` for an RGB u8 image `[H, W, 3]`: horizontal pass, then vertical,
/// each in 22-bit fixed point with rounding and clipping; a pass whose size does not change is skipped.
///
/// # Errors
/// A zero output size; an output or intermediate image over [`MAX_PIXELS`].
pub fn resize_u8(img: &Array3<u8>, oh: usize, ow: usize, f: Resample) -> Result<Array3<u8>> {
    resize_u8_window(img, oh, ow, f, (0, 0, oh, ow))
}

/// Rows `top..top + wh` and columns `left..left + ww` of [`resize_u8`]`(img, oh, ow, f)`, bit for bit, computing
/// only those (the horizontal pass makes `[H, ww]`, the vertical one `[wh, ww]`). The size checks are those of
/// the whole resize, so the same images are refused.
///
/// # Errors
/// As [`resize_u8`]; a window outside `oh x ow`.
pub fn resize_u8_window(
    img: &Array3<u8>,
    oh: usize,
    ow: usize,
    f: Resample,
    (top, left, wh, ww): (usize, usize, usize, usize),
) -> Result<Array3<u8>> {
    let (ih, iw, _) = img.dim();
    // the horizontal pass of the whole resize makes an [ih, ow] image, the vertical one [oh, ow]
    check_pixels("resize", &format!("resizing {ih}x{iw} to {oh}x{ow}: the intermediate image"), ih, ow)?;
    check_pixels("resize", &format!("resizing {ih}x{iw}: the output"), oh, ow)?;
    let (h, w, c) = img.dim();
    if oh == 0 || ow == 0 {
        crate::error::fail!(crate::ModelError::Image {
            op: "resize",
            problem: crate::ImageProblem::Empty { h: oh, w: ow }
        });
    }
    if top.checked_add(wh).is_none_or(|b| b > oh) || left.checked_add(ww).is_none_or(|r| r > ow) {
        crate::error::fail!(crate::ModelError::Image {
            op: "resize",
            problem: crate::ImageProblem::CropTooLarge {
                ch: top.saturating_add(wh),
                cw: left.saturating_add(ww),
                h: oh,
                w: ow
            },
        });
    }
    let half = 1i32 << (PRECISION_BITS - 1);
    let mut cur = if ow != w {
        let k = coeffs(w, ow, f, left..left + ww);
        Array3::from_shape_fn((h, ww, c), |(y, x, ch)| {
            let (x0, ws) = &k[x];
            let s = ws.iter().enumerate().fold(half, |s, (i, &wi)| s + img[[y, x0 + i, ch]] as i32 * wi);
            clip8(s)
        })
    } else {
        img.slice(ndarray::s![.., left..left + ww, ..]).to_owned()
    };
    if oh != h {
        let k = coeffs(h, oh, f, top..top + wh);
        cur = Array3::from_shape_fn((wh, ww, c), |(y, x, ch)| {
            let (y0, ws) = &k[y];
            let s = ws.iter().enumerate().fold(half, |s, (i, &wi)| s + cur[[y0 + i, x, ch]] as i32 * wi);
            clip8(s)
        });
    } else {
        cur = cur.slice(ndarray::s![top..top + wh, .., ..]).to_owned();
    }
    Ok(cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_identity_size_is_a_copy() {
        let img = Array3::from_shape_fn((5, 7, 3), |(y, x, c)| (y * 31 + x * 7 + c) as u8);
        assert_eq!(resize_u8(&img, 5, 7, Resample::Bicubic).unwrap(), img);
    }

    #[test]
    fn resize_constant_image_stays_constant() {
        let img = Array3::from_elem((4, 6, 3), 200u8);
        let out = resize_u8(&img, 9, 13, Resample::Bicubic).unwrap();
        assert!(out.iter().all(|&v| v == 200));
        let out = resize_u8(&img, 2, 3, Resample::Bilinear).unwrap();
        assert!(out.iter().all(|&v| v == 200));
    }

    #[test]
    fn bicubic_coeffs_sum_to_one_in_fixed_point() {
        for (i, o) in [(32, 224), (224, 32), (7, 5)] {
            for (_, k) in coeffs(i, o, Resample::Bicubic, 0..o) {
                let s: i64 = k.iter().map(|&x| x as i64).sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= k.len() as i64, "{i}->{o}: {s}");
            }
        }
    }

    #[test]
    fn from_json_reads_exact_size_and_no_crop() {
        let p = Preprocess::from_json_str(
            r#"{"do_resize":true,"size":{"height":224,"width":224},"resample":3,"do_center_crop":false,
               "do_rescale":true,"rescale_factor":0.00392156862745098,"do_normalize":true,
               "image_mean":[0.485,0.456,0.406],"image_std":[0.229,0.224,0.225]}"#,
        )
        .unwrap();
        assert_eq!(p, Preprocess::direct(224));
        let d = Preprocess::from_json_str(r#"{"size":{"shortest_edge":256},"crop_size":{"height":224,"width":224}}"#)
            .unwrap();
        assert_eq!(d, Preprocess::dinov2_default());
    }

    /// A deterministic noisy RGB test image.
    #[cfg(feature = "image")]
    fn noise(w: u32, h: u32) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, y| {
            let v = (x * 37 + y * 91 + x * y * 13) as u8;
            image::Rgb([v, v.wrapping_mul(3), v ^ 0x5a])
        })
    }

    /// Issue 14 item 3: a 1 x 65535 PNG (a few hundred bytes) resized to a shortest edge of 256 would be
    /// 256 x 16.8 million pixels (12.9 GB): refused before allocating; a plain over-cap resize is refused too.
    #[cfg(feature = "image")]
    #[test]
    fn extreme_aspect_ratio_resizes_are_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("thin.png");
        image::GrayImage::new(1, 65535).save(&p).unwrap();
        let e = Preprocess::dinov2_default().load(&p).unwrap_err();
        assert!(e.to_string().contains("pixel cap"), "{e}");
        let e = resize_u8(&Array3::zeros((2, 2, 3)), 100_000, 100_000, Resample::Bicubic).unwrap_err();
        assert!(e.to_string().contains("pixel cap"), "{e}");
        let e = resize_u8(&Array3::zeros((2, 2, 3)), usize::MAX, 2, Resample::Bicubic).unwrap_err();
        assert!(e.to_string().contains("pixel cap"), "{e}");
    }

    /// Issue 14 item 3: truncated or garbled JPEGs and PNGs are errors (the `image` crate decodes JPEGs leniently,
    /// filling missing data with grey); intact files still decode exactly as `image` decodes them.
    #[cfg(feature = "image")]
    #[test]
    fn truncated_or_garbled_images_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let img = noise(64, 48);
        let (jpg, png) = (dir.path().join("a.jpg"), dir.path().join("a.png"));
        img.save(&jpg).unwrap();
        img.save(&png).unwrap();
        for p in [&jpg, &png] {
            let got = read_rgb(p).unwrap();
            let want = image::open(p).unwrap().to_rgb8().into_raw();
            assert_eq!(got.as_slice().unwrap(), &want[..], "{}", p.display());
        }
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        let jb = std::fs::read(&jpg).unwrap();
        let pb = std::fs::read(&png).unwrap();
        let mut garbled_jpg = jb.clone();
        let mid = garbled_jpg.len() * 2 / 3;
        garbled_jpg[mid..mid + 8].copy_from_slice(&[0xFF, 0x05, 0xFF, 0x07, 0xFF, 0x11, 0xFF, 0x23]);
        let mut garbled_png = pb.clone();
        let mid = garbled_png.len() / 2;
        garbled_png[mid] ^= 0x55;
        let cases = [
            write("half.jpg", &jb[..jb.len() / 2]),
            write("no-eoi.jpg", &jb[..jb.len() - 2]),
            write("garbled.jpg", &garbled_jpg),
            write("half.png", &pb[..pb.len() / 2]),
            write("no-iend.png", &pb[..pb.len() - 12]),
            write("garbled.png", &garbled_png),
        ];
        for p in &cases {
            let e = read_rgb(p).expect_err(&p.display().to_string());
            assert!(e.to_string().contains(p.file_name().unwrap().to_str().unwrap()), "{e}");
        }
    }

    #[test]
    fn from_json_rejects_unknown_resample() {
        let e = Preprocess::from_json_str(r#"{"resample":1}"#).unwrap_err();
        assert!(
            matches!(crate::ModelError::of(&e), Some(crate::ModelError::Preprocess { field, .. }) if field == "resample"),
            "{e}"
        );
    }

    #[test]
    fn shortest_edge_resize_then_crop_gives_crop_size() {
        let img = Array3::from_shape_fn((30, 40, 3), |(y, x, c)| (y + x + c) as u8);
        let p =
            Preprocess { resize: Some(Resize::ShortestEdge(16)), center_crop: Some((12, 12)), ..Preprocess::direct(1) };
        let out = p.apply_rgb(&img).unwrap();
        assert_eq!(out.shape(), &[3, 12, 12]);
        let big = Preprocess { center_crop: Some((17, 17)), ..p };
        assert!(big.apply_rgb(&img).is_err());
    }

    /// A deterministic noisy image (every channel different).
    fn noise_rgb(h: usize, w: usize, seed: u32) -> Array3<u8> {
        Array3::from_shape_fn((h, w, 3), |(y, x, c)| {
            let v = (y as u32 * 7919 + x as u32 * 104_729 + c as u32 * 31 + seed).wrapping_mul(2_654_435_761);
            (v >> 24) as u8
        })
    }

    #[test]
    fn a_resize_window_is_the_same_pixels_as_the_whole_resize() {
        let sizes = [(1, 1), (3, 17), (17, 3), (9, 9), (13, 40), (64, 5)];
        let outs = [(1, 1), (4, 30), (30, 4), (9, 9), (25, 7), (2, 96)];
        for (n, &(h, w)) in sizes.iter().enumerate() {
            let img = noise_rgb(h, w, n as u32);
            for &(oh, ow) in &outs {
                for f in [Resample::Bilinear, Resample::Bicubic] {
                    let full = resize_u8(&img, oh, ow, f).unwrap();
                    for (top, left, wh, ww) in
                        [(0, 0, oh, ow), (oh / 3, ow / 2, oh - oh / 3, ow - ow / 2), (oh - 1, 0, 1, ow)]
                    {
                        let win = resize_u8_window(&img, oh, ow, f, (top, left, wh, ww)).unwrap();
                        let want = full.slice(ndarray::s![top..top + wh, left..left + ww, ..]);
                        assert_eq!(win.view(), want, "{h}x{w} -> {oh}x{ow} {f:?} window {top},{left} {wh}x{ww}");
                    }
                }
            }
        }
        let img = noise_rgb(4, 4, 0);
        assert!(resize_u8_window(&img, 8, 8, Resample::Bicubic, (4, 0, 5, 8)).is_err(), "window past the bottom");
        assert!(resize_u8_window(&img, 8, 8, Resample::Bicubic, (0, usize::MAX, 1, 2)).is_err(), "overflowing window");
    }

    /// The fuzz finding: a 3 x 1024 JPEG made DINOv2's preprocessing resize it to 87,381 x 256 (22 million pixels,
    /// 10-16 s per input in the instrumented build) before cropping 224 x 224. Only the crop is computed now; the
    /// output is the crop of the whole resize, pixel for pixel.
    #[test]
    fn an_extreme_aspect_ratio_resizes_only_the_crop() {
        let img = noise_rgb(1024, 3, 5);
        let p = Preprocess::dinov2_default();
        let out = p.apply_rgb(&img).unwrap();
        assert_eq!(out.shape(), &[3, 224, 224]);
        let (oh, ow) = (256 * 1024 / 3, 256);
        let crop = resize_u8_window(&img, oh, ow, p.resample, ((oh - 224) / 2, (ow - 224) / 2, 224, 224)).unwrap();
        let again = Preprocess { resize: None, ..p.clone() }.apply_rgb(&crop).unwrap();
        assert_eq!(out, again);
        // The same image through the whole resize (small enough here: 1024 x 40 -> 6,553 x 256).
        let img = noise_rgb(1024, 40, 6);
        let out = p.apply_rgb(&img).unwrap();
        let full = resize_u8(&img, 6553, 256, p.resample).unwrap();
        let crop = full.slice(ndarray::s![(6553 - 224) / 2..(6553 - 224) / 2 + 224, 16..240, ..]).to_owned();
        assert_eq!(out, Preprocess { resize: None, ..p }.apply_rgb(&crop).unwrap());
    }

    #[test]
    fn normalisation_matches_hand_computation() {
        let img = Array3::from_elem((1, 1, 3), 255u8);
        let p = Preprocess { resize: None, center_crop: None, ..Preprocess::direct(1) };
        let out = p.apply_rgb(&img).unwrap();
        for c in 0..3 {
            assert!((out[[c, 0, 0]] - (1.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]).abs() < 1e-6);
        }
    }
}
