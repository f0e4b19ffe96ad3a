//! The heap an image costs the DINOv2 preprocessing, measured with the fuzz allocator's high-water mark (its own
//! test binary, so no other test moves the mark).
//!
//! The fuzz finding: `regressions/image/jpeg-3x1024-resized-to-87381x256-before-the-crop`, a 369-byte JPEG of 3 x
//! 1024 pixels, was resized whole to 87,381 x 256 (67 MB of RGB, 10-16 s per input in the instrumented build)
//! before the 224 x 224 center crop. Only the crop window is computed now: the horizontal pass makes 1024 x 224,
//! the vertical one 224 x 224.

use std::path::Path;

#[test]
fn an_extreme_aspect_ratio_jpeg_costs_its_crop_not_its_resize() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions/image/jpeg-3x1024-resized-to-87381x256-before-the-crop");
    let img = peft_models::image_proc::read_rgb(&file).expect("the regression input decodes");
    assert_eq!(img.dim(), (1024, 3, 3), "the input is 1024 rows x 3 columns");
    let before = peft_fuzz::alloc::peak();
    let out = peft_models::image_proc::Preprocess::dinov2_default().apply_rgb(&img).expect("preprocessing");
    assert_eq!(out.shape(), [3, 224, 224]);
    let grew = peft_fuzz::alloc::peak().saturating_sub(before);
    // 1024 x 224 x 3 bytes (688 KB) + 224 x 224 x 3 (150 KB) + the f32 output (602 KB) + coefficients: under 4 MiB.
    // The whole resize needed 87,381 x 256 x 3 bytes (67 MB) at once.
    assert!(grew < 4 << 20, "preprocessing raised the heap high-water mark by {grew} bytes");
}
