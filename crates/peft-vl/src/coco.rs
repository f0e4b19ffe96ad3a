//! The COCO dataset in its official annotation layout.
//!
//! A COCO root holds `annotations/captions_<split>.json` (and optionally `annotations/instances_<split>.json`)
//! next to the image folders `<split>/` (`train2017/`, `val2017/`, ...), as the official download unpacks. The
//! captions file lists `images` (`id`, `file_name`, `width`, `height`) and `annotations` (`id`, `image_id`,
//! `caption`); the instances file adds `categories` and object `annotations` (`bbox [x, y, w, h]` in original
//! pixels, `category_id`, `area`, `iscrowd`; polygon/RLE segmentations are not read). Unknown keys are ignored,
//! so the full files and the shipped COCO-mini subset read alike.
//!
//! [`CocoSplit::load`] reads one split; [`Coco::load`] reads `train2017` + `val2017`. A Karpathy split file
//! (`dataset_coco.json`: `images[]` with `cocoid` and `split` in `train`/`restval`/`val`/`test`) regroups the
//! images of the official splits with [`Coco::karpathy`]. Malformed JSON is a [`VlError::Json`]; JSON that
//! names an image it does not list, or gives an id twice, is a [`VlError::Inconsistent`].
//!
//! ```
//! use peft_vl::coco::CocoSplit;
//! let captions = r#"{"images": [{"id": 7, "file_name": "a.jpg", "width": 640, "height": 480}],
//!     "annotations": [{"id": 1, "image_id": 7, "caption": "A cat on a mat."}]}"#;
//! let split = CocoSplit::from_json_str("val", "imgs", captions, None)?;
//! assert_eq!(split.images[0].captions[0].text, "A cat on a mat.");
//! assert_eq!(split.image_path(&split.images[0]), std::path::Path::new("imgs/a.jpg"));
//! # Ok::<(), peft_vl::VlError>(())
//! ```

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Result, VlError};

/// One caption of an image.
#[derive(Clone, Debug, PartialEq)]
pub struct Caption {
    /// The annotation id.
    pub id: u64,
    /// The caption as written (not tokenized).
    pub text: String,
}

/// One object instance (from `instances_*.json`).
#[derive(Clone, Debug, PartialEq)]
pub struct Instance {
    /// The annotation id.
    pub id: u64,
    /// The category id (see [`CocoSplit::categories`]).
    pub category_id: u64,
    /// `[x, y, width, height]` in pixels of the ORIGINAL image (`CocoImage::width` x `height`).
    pub bbox: [f64; 4],
    /// Segmentation area in original pixels.
    pub area: f64,
    /// A crowd region (RLE segmentation).
    pub iscrowd: bool,
}

/// An object category.
#[derive(Clone, Debug, PartialEq)]
pub struct Category {
    /// The category id.
    pub id: u64,
    /// Its name (`person`, `bicycle`, ...).
    pub name: String,
    /// Its super-category.
    pub supercategory: String,
}

/// One image with its captions and instances.
#[derive(Clone, Debug, PartialEq)]
pub struct CocoImage {
    /// The COCO image id.
    pub id: u64,
    /// File name inside the split's image folder.
    pub file_name: String,
    /// Original width in pixels (annotations refer to it; the file on disk may be smaller, as in COCO-mini).
    pub width: u32,
    /// Original height in pixels.
    pub height: u32,
    /// Captions in file order.
    pub captions: Vec<Caption>,
    /// Object instances in file order (empty when no instances file was read).
    pub instances: Vec<Instance>,
}

/// One split (`train2017`, `val2017`, or a Karpathy split): images in ascending id order.
#[derive(Clone, Debug, PartialEq)]
pub struct CocoSplit {
    /// The split's name.
    pub name: String,
    /// The folder holding the images of this split (Karpathy splits mix folders: see [`CocoSplit::image_path`]).
    pub image_dir: PathBuf,
    /// Images, ascending by id.
    pub images: Vec<CocoImage>,
    /// Categories of the instances file (empty without one).
    pub categories: Vec<Category>,
    /// Per image (same order as `images`), the folder holding it when it differs from `image_dir`.
    dirs: Vec<Option<PathBuf>>,
}

#[derive(Deserialize)]
struct RawImage {
    id: u64,
    file_name: String,
    #[serde(default)]
    width: u32,
    #[serde(default)]
    height: u32,
}

#[derive(Deserialize)]
struct RawCaption {
    id: u64,
    image_id: u64,
    caption: String,
}

#[derive(Deserialize)]
struct RawCaptions {
    images: Vec<RawImage>,
    annotations: Vec<RawCaption>,
}

#[derive(Deserialize)]
struct RawInstance {
    id: u64,
    image_id: u64,
    category_id: u64,
    bbox: [f64; 4],
    #[serde(default)]
    area: f64,
    #[serde(default)]
    iscrowd: u8,
}

#[derive(Deserialize)]
struct RawCategory {
    id: u64,
    name: String,
    #[serde(default)]
    supercategory: String,
}

#[derive(Deserialize)]
struct RawInstances {
    #[serde(default)]
    images: Vec<RawImage>,
    annotations: Vec<RawInstance>,
    #[serde(default)]
    categories: Vec<RawCategory>,
}

fn parse<T: for<'de> Deserialize<'de>>(origin: &str, what: &'static str, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|source| VlError::Json { origin: origin.to_string(), what, source })
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| VlError::Io { path: path.to_path_buf(), source })
}

fn inconsistent(origin: &str, reason: String) -> VlError {
    VlError::Inconsistent { origin: origin.to_string(), reason }
}

impl CocoSplit {
    /// Builds a split from the text of a captions file and optionally an instances file.
    ///
    /// # Errors
    /// [`VlError::Json`] for malformed JSON or missing fields; [`VlError::Inconsistent`] for an image id listed
    /// twice, an annotation naming an unlisted image or a category the instances file does not define, a
    /// negative box size, or an annotation id given twice.
    pub fn from_json_str(
        name: &str,
        image_dir: impl Into<PathBuf>,
        captions: &str,
        instances: Option<&str>,
    ) -> Result<Self> {
        Self::parse(
            name,
            image_dir.into(),
            captions,
            &format!("{name} captions"),
            instances.map(|t| (t, format!("{name} instances"))),
        )
    }

    fn parse(
        name: &str,
        image_dir: PathBuf,
        captions: &str,
        cap_origin: &str,
        instances: Option<(&str, String)>,
    ) -> Result<Self> {
        let raw: RawCaptions = parse(cap_origin, "COCO captions", captions)?;
        let mut index: HashMap<u64, usize> = HashMap::with_capacity(raw.images.len());
        let mut images: Vec<CocoImage> = Vec::with_capacity(raw.images.len());
        for im in raw.images {
            if index.insert(im.id, images.len()).is_some() {
                return Err(inconsistent(cap_origin, format!("image id {} is listed twice", im.id)));
            }
            images.push(CocoImage {
                id: im.id,
                file_name: im.file_name,
                width: im.width,
                height: im.height,
                captions: Vec::new(),
                instances: Vec::new(),
            });
        }
        let mut seen = HashSet::new();
        for a in raw.annotations {
            let Some(&i) = index.get(&a.image_id) else {
                return Err(inconsistent(
                    cap_origin,
                    format!("caption {} names image {}, which `images` does not list", a.id, a.image_id),
                ));
            };
            if !seen.insert(a.id) {
                return Err(inconsistent(cap_origin, format!("caption id {} is given twice", a.id)));
            }
            images[i].captions.push(Caption { id: a.id, text: a.caption });
        }
        let mut categories = Vec::new();
        if let Some((text, origin)) = instances {
            let raw: RawInstances = parse(&origin, "COCO instances", text)?;
            for im in &raw.images {
                if !index.contains_key(&im.id) {
                    return Err(inconsistent(
                        &origin,
                        format!("image {} is not in the captions file of the same split", im.id),
                    ));
                }
            }
            let cats: HashSet<u64> = raw.categories.iter().map(|c| c.id).collect();
            if cats.len() != raw.categories.len() {
                return Err(inconsistent(&origin, "a category id is given twice".into()));
            }
            let mut seen = HashSet::new();
            for a in raw.annotations {
                let Some(&i) = index.get(&a.image_id) else {
                    return Err(inconsistent(
                        &origin,
                        format!("instance {} names image {}, which the captions file does not list", a.id, a.image_id),
                    ));
                };
                if !cats.contains(&a.category_id) {
                    return Err(inconsistent(
                        &origin,
                        format!("instance {} has category {}, which `categories` does not define", a.id, a.category_id),
                    ));
                }
                if !seen.insert(a.id) {
                    return Err(inconsistent(&origin, format!("instance id {} is given twice", a.id)));
                }
                if !(a.bbox[2] >= 0.0 && a.bbox[3] >= 0.0) || a.bbox.iter().any(|v| !v.is_finite()) {
                    return Err(inconsistent(&origin, format!("instance {} has bbox {:?}", a.id, a.bbox)));
                }
                images[i].instances.push(Instance {
                    id: a.id,
                    category_id: a.category_id,
                    bbox: a.bbox,
                    area: a.area,
                    iscrowd: a.iscrowd != 0,
                });
            }
            categories = raw
                .categories
                .into_iter()
                .map(|c| Category { id: c.id, name: c.name, supercategory: c.supercategory })
                .collect();
        }
        images.sort_by_key(|im| im.id);
        let dirs = vec![None; images.len()];
        Ok(CocoSplit { name: name.to_string(), image_dir, images, categories, dirs })
    }

    /// Reads split `name` (`train2017`, `val2017`, ...) under a COCO root: `annotations/captions_<name>.json`,
    /// `annotations/instances_<name>.json` when present, images in `<root>/<name>/`.
    ///
    /// # Errors
    /// A missing or unreadable captions file ([`VlError::Io`]), and as [`CocoSplit::from_json_str`].
    pub fn load(root: impl AsRef<Path>, name: &str) -> Result<Self> {
        let root = root.as_ref();
        let cap_path = root.join("annotations").join(format!("captions_{name}.json"));
        let captions = read(&cap_path)?;
        let inst_path = root.join("annotations").join(format!("instances_{name}.json"));
        let instances = if inst_path.is_file() { Some(read(&inst_path)?) } else { None };
        Self::parse(
            name,
            root.join(name),
            &captions,
            &cap_path.display().to_string(),
            instances.as_deref().map(|t| (t, inst_path.display().to_string())),
        )
    }

    /// The path of an image of this split.
    pub fn image_path(&self, image: &CocoImage) -> PathBuf {
        let dir = self
            .images
            .iter()
            .position(|im| im.id == image.id)
            .and_then(|i| self.dirs[i].as_ref())
            .unwrap_or(&self.image_dir);
        dir.join(&image.file_name)
    }

    /// Every image path, in `images` order.
    pub fn image_paths(&self) -> Vec<PathBuf> {
        self.images
            .iter()
            .zip(&self.dirs)
            .map(|(im, d)| d.as_ref().unwrap_or(&self.image_dir).join(&im.file_name))
            .collect()
    }

    /// All captions flattened in image order, with the index (into `images`) of the image each describes.
    pub fn caption_pairs(&self) -> (Vec<&str>, Vec<usize>) {
        let mut texts = Vec::new();
        let mut owner = Vec::new();
        for (i, im) in self.images.iter().enumerate() {
            for c in &im.captions {
                texts.push(c.text.as_str());
                owner.push(i);
            }
        }
        (texts, owner)
    }

    /// Number of captions over all images.
    pub fn num_captions(&self) -> usize {
        self.images.iter().map(|im| im.captions.len()).sum()
    }

    /// The name of a category id, if the instances file defines it.
    pub fn category_name(&self, id: u64) -> Option<&str> {
        self.categories.iter().find(|c| c.id == id).map(|c| c.name.as_str())
    }
}

/// The official `train2017` and `val2017` splits of a COCO root.
#[derive(Clone, Debug, PartialEq)]
pub struct Coco {
    /// `train2017`.
    pub train: CocoSplit,
    /// `val2017`.
    pub val: CocoSplit,
}

/// One entry of a Karpathy split file.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct KarpathyEntry {
    /// The COCO image id.
    pub cocoid: u64,
    /// `train`, `restval`, `val` or `test`.
    pub split: String,
    /// The folder the file name is in (`train2014`/`val2014`), informational.
    #[serde(default)]
    pub filepath: String,
    /// The 2014 file name, informational (2017 names differ; images are matched by `cocoid`).
    #[serde(default)]
    pub filename: String,
}

/// A Karpathy split file (`dataset_coco.json`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct KarpathySplit {
    /// Its images.
    pub images: Vec<KarpathyEntry>,
}

impl KarpathySplit {
    /// Parses the text of a Karpathy split file.
    ///
    /// # Errors
    /// [`VlError::Json`] for malformed JSON; [`VlError::Inconsistent`] for a `cocoid` listed twice or a split
    /// name other than `train`, `restval`, `val`, `test`.
    pub fn from_json_str(origin: &str, text: &str) -> Result<Self> {
        let k: KarpathySplit = parse(origin, "Karpathy split", text)?;
        let mut seen = HashSet::new();
        for e in &k.images {
            if !seen.insert(e.cocoid) {
                return Err(inconsistent(origin, format!("cocoid {} is listed twice", e.cocoid)));
            }
            if !matches!(e.split.as_str(), "train" | "restval" | "val" | "test") {
                return Err(inconsistent(origin, format!("cocoid {}: unknown split `{}`", e.cocoid, e.split)));
            }
        }
        Ok(k)
    }

    /// Reads a Karpathy split file.
    ///
    /// # Errors
    /// As [`KarpathySplit::from_json_str`], and [`VlError::Io`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_json_str(&path.display().to_string(), &read(path)?)
    }
}

/// The Karpathy train (`train` + `restval`), val and test splits, built from the official splits.
#[derive(Clone, Debug, PartialEq)]
pub struct KarpathySplits {
    /// `train` + `restval`.
    pub train: CocoSplit,
    /// `val`.
    pub val: CocoSplit,
    /// `test`.
    pub test: CocoSplit,
    /// Karpathy entries whose image the official splits do not hold (a subset such as COCO-mini).
    pub missing: usize,
}

impl Coco {
    /// Reads `train2017` and `val2017` under `root` (the official layout; COCO-mini uses it too).
    ///
    /// # Errors
    /// As [`CocoSplit::load`].
    pub fn load(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        Ok(Coco { train: CocoSplit::load(root, "train2017")?, val: CocoSplit::load(root, "val2017")? })
    }

    /// Regroups the official images by a Karpathy split, matching `cocoid` to image ids (captions and instances
    /// come from the official files; each image keeps the folder it was found in). Entries whose image is in
    /// neither split are counted in [`KarpathySplits::missing`].
    pub fn karpathy(&self, split: &KarpathySplit) -> KarpathySplits {
        let mut by_id: HashMap<u64, (&CocoImage, &Path)> = HashMap::new();
        for s in [&self.train, &self.val] {
            for (im, d) in s.images.iter().zip(&s.dirs) {
                by_id.insert(im.id, (im, d.as_deref().unwrap_or(&s.image_dir)));
            }
        }
        let mut out: [Vec<(CocoImage, PathBuf)>; 3] = Default::default();
        let mut missing = 0;
        for e in &split.images {
            let Some((im, dir)) = by_id.get(&e.cocoid) else {
                missing += 1;
                continue;
            };
            let k = match e.split.as_str() {
                "train" | "restval" => 0,
                "val" => 1,
                _ => 2,
            };
            out[k].push(((*im).clone(), dir.to_path_buf()));
        }
        let categories = self.train.categories.clone();
        let [tr, va, te] = out;
        let mk = |name: &str, mut v: Vec<(CocoImage, PathBuf)>| {
            v.sort_by_key(|(im, _)| im.id);
            let (images, dirs): (Vec<_>, Vec<_>) = v.into_iter().map(|(im, d)| (im, Some(d))).unzip();
            CocoSplit { name: name.into(), image_dir: PathBuf::new(), images, categories: categories.clone(), dirs }
        };
        KarpathySplits {
            train: mk("karpathy-train", tr),
            val: mk("karpathy-val", va),
            test: mk("karpathy-test", te),
            missing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: &str = r#"{"info": {"year": 2017}, "licenses": [],
        "images": [{"id": 9, "file_name": "000000000009.jpg", "width": 640, "height": 480, "license": 3},
                   {"id": 4, "file_name": "000000000004.jpg", "width": 500, "height": 375}],
        "annotations": [{"id": 100, "image_id": 9, "caption": "Two dogs play."},
                        {"id": 101, "image_id": 4, "caption": "A red bus."},
                        {"id": 102, "image_id": 9, "caption": "Dogs running on grass"}]}"#;
    const INST: &str = r#"{"images": [{"id": 9, "file_name": "000000000009.jpg", "width": 640, "height": 480}],
        "categories": [{"id": 18, "name": "dog", "supercategory": "animal"}],
        "annotations": [{"id": 5, "image_id": 9, "category_id": 18, "bbox": [1.5, 2, 30, 40], "area": 900.5,
                         "iscrowd": 0, "segmentation": [[1, 2, 3, 4]]},
                        {"id": 6, "image_id": 9, "category_id": 18, "bbox": [0, 0, 10, 10], "area": 50,
                         "iscrowd": 1, "segmentation": {"counts": [1, 2], "size": [480, 640]}}]}"#;

    fn split() -> CocoSplit {
        CocoSplit::from_json_str("val2017", "/c/val2017", CAPS, Some(INST)).unwrap()
    }

    #[test]
    fn images_are_sorted_by_id_with_captions_in_file_order() {
        let s = split();
        assert_eq!(s.images.iter().map(|i| i.id).collect::<Vec<_>>(), vec![4, 9]);
        let texts: Vec<&str> = s.images[1].captions.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, vec!["Two dogs play.", "Dogs running on grass"]);
        assert_eq!((s.images[1].width, s.images[1].height), (640, 480));
        let (t, owner) = s.caption_pairs();
        assert_eq!(t, vec!["A red bus.", "Two dogs play.", "Dogs running on grass"]);
        assert_eq!(owner, vec![0, 1, 1]);
        assert_eq!(s.num_captions(), 3);
        assert_eq!(s.image_paths()[0], PathBuf::from("/c/val2017/000000000004.jpg"));
    }

    #[test]
    fn instances_attach_to_their_images_with_boxes_in_original_pixels() {
        let s = split();
        let dog = &s.images[1];
        assert_eq!(dog.instances.len(), 2);
        assert_eq!(dog.instances[0].bbox, [1.5, 2.0, 30.0, 40.0]);
        assert_eq!(dog.instances[0].area, 900.5);
        assert!(!dog.instances[0].iscrowd && dog.instances[1].iscrowd);
        assert!(s.images[0].instances.is_empty());
        assert_eq!(s.category_name(18), Some("dog"));
        assert_eq!(s.category_name(1), None);
    }

    #[test]
    fn malformed_json_is_a_typed_error() {
        for bad in ["{", r#"{"images": []}"#, r#"{"images": [{"id": "x"}], "annotations": []}"#] {
            let e = CocoSplit::from_json_str("v", "d", bad, None).unwrap_err();
            assert!(matches!(e, VlError::Json { what: "COCO captions", .. }), "{bad}: {e}");
        }
        let e = CocoSplit::from_json_str("v", "d", CAPS, Some(r#"{"annotations": [{"id": 1}]}"#)).unwrap_err();
        assert!(matches!(e, VlError::Json { what: "COCO instances", .. }), "{e}");
    }

    #[test]
    fn inconsistent_annotations_are_refused() {
        let dangling = r#"{"images": [{"id": 1, "file_name": "a.jpg"}],
            "annotations": [{"id": 1, "image_id": 2, "caption": "x"}]}"#;
        let twice = r#"{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 1, "file_name": "b.jpg"}],
            "annotations": []}"#;
        let dup_ann = r#"{"images": [{"id": 1, "file_name": "a.jpg"}],
            "annotations": [{"id": 1, "image_id": 1, "caption": "x"}, {"id": 1, "image_id": 1, "caption": "y"}]}"#;
        for bad in [dangling, twice, dup_ann] {
            let e = CocoSplit::from_json_str("v", "d", bad, None).unwrap_err();
            assert!(matches!(e, VlError::Inconsistent { .. }), "{e}");
        }
        let bad_cat = INST.replace(r#""category_id": 18, "bbox": [0"#, r#""category_id": 3, "bbox": [0"#);
        let neg_box = INST.replace("[1.5, 2, 30, 40]", "[1.5, 2, -30, 40]");
        for inst in [bad_cat, neg_box] {
            let e = CocoSplit::from_json_str("v", "d", CAPS, Some(&inst)).unwrap_err();
            assert!(matches!(e, VlError::Inconsistent { .. }), "{e}");
        }
    }

    #[test]
    fn load_reads_the_official_layout_and_reports_a_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let ann = dir.path().join("annotations");
        std::fs::create_dir_all(&ann).unwrap();
        std::fs::write(ann.join("captions_train2017.json"), CAPS).unwrap();
        std::fs::write(ann.join("captions_val2017.json"), CAPS).unwrap();
        std::fs::write(ann.join("instances_val2017.json"), INST).unwrap();
        let c = Coco::load(dir.path()).unwrap();
        assert!(c.train.categories.is_empty() && c.train.images[1].instances.is_empty());
        assert_eq!(c.val.images[1].instances.len(), 2);
        assert_eq!(c.val.image_path(&c.val.images[0]), dir.path().join("val2017/000000000004.jpg"));
        let e = CocoSplit::load(dir.path(), "test2017").unwrap_err();
        assert!(matches!(e, VlError::Io { .. }), "{e}");
    }

    #[test]
    fn karpathy_split_regroups_official_images_by_cocoid() {
        let train = CocoSplit::from_json_str("train2017", "/c/train2017", CAPS, None).unwrap();
        let val_caps = r#"{"images": [{"id": 77, "file_name": "77.jpg"}],
            "annotations": [{"id": 1, "image_id": 77, "caption": "A kite."}]}"#;
        let val = CocoSplit::from_json_str("val2017", "/c/val2017", val_caps, None).unwrap();
        let coco = Coco { train, val };
        let k = KarpathySplit::from_json_str(
            "k",
            r#"{"dataset": "coco", "images": [
                {"cocoid": 77, "split": "train", "filepath": "val2014", "filename": "COCO_val2014_000000000077.jpg",
                 "sentences": [{"raw": "A kite.", "tokens": ["a", "kite"]}]},
                {"cocoid": 9, "split": "test"}, {"cocoid": 4, "split": "restval"}, {"cocoid": 123, "split": "val"}]}"#,
        )
        .unwrap();
        let s = coco.karpathy(&k);
        assert_eq!(s.train.images.iter().map(|i| i.id).collect::<Vec<_>>(), vec![4, 77]);
        assert_eq!(
            s.train.image_paths(),
            vec![PathBuf::from("/c/train2017/000000000004.jpg"), "/c/val2017/77.jpg".into()]
        );
        assert_eq!(s.test.images.len(), 1);
        assert_eq!(s.test.images[0].captions.len(), 2);
        assert!(s.val.images.is_empty());
        assert_eq!(s.missing, 1);
        let dup = KarpathySplit::from_json_str(
            "k",
            r#"{"images": [{"cocoid": 1, "split": "val"}, {"cocoid": 1, "split": "test"}]}"#,
        );
        assert!(matches!(dup, Err(VlError::Inconsistent { .. })));
        let odd = KarpathySplit::from_json_str("k", r#"{"images": [{"cocoid": 1, "split": "dev"}]}"#);
        assert!(matches!(odd, Err(VlError::Inconsistent { .. })));
        assert!(matches!(KarpathySplit::from_json_str("k", "[]"), Err(VlError::Json { .. })));
    }
}
