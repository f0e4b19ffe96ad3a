//! peft-vision will hold ViT/DINOv2 adapter glue, bottleneck/parallel adapters, ZeroI2V, GDA/Tip-Adapter and the
//! VTAB-1k and COCO harnesses. Not built yet.
