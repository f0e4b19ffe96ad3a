//! peft-quant will hold bitsandbytes-compatible NF4/FP4/int8 block quantisation, QLoRA, LQ-LoRA, ComPEFT and
//! 1-bit adapters. Not built yet: see issue 5.
