//! # peft-quant
//!
//! Quantized storage for frozen base weights, compatible with bitsandbytes (bnb):
//!
//! * **4-bit NF4 / FP4** block quantisation ([`Quant4`]): row-major flattened blocks of 32..4096 values (default
//!   64), one absmax per block, nearest code by bnb's CPU rule (`torch.bucketize` on the midpoints of the sorted
//!   table, [`codes`]), two codes per byte with the first element in the high nibble. `x̂ = table[q] · absmax[block]`.
//! * **Double quantisation** of the block scales ([`Absmax::Double`]): `absmax − mean(absmax)` quantized with the
//!   signed 8-bit dynamic map in blocks of 256 ([`Blockwise8`], bnb's CPU lookup-table rule): storage `4 + 8/64 +
//!   32/(64·256) = 4.127` bits per parameter at blocksize 64 (4.5 without).
//! * **Byte identity with bitsandbytes 0.50.2's CPU backend**, checked by `tests/bnb_identity.rs` on fixtures bnb
//!   generated (`tests/fixtures/identity/gen_bnb_identity.py`): NF4 and FP4, blocksizes 32, 64, …, 4096, double
//!   quantisation off and on, float32 input, element counts that are multiples of neither the blocksize nor 256 —
//!   packed codes, absmax, offset, nested codes and nested absmax identical byte for byte, dequantized values bit for
//!   bit (against bnb's reference dequantisation; its native CPU kernel differs where [`block4`]'s docs explain).
//!   bnb's CUDA kernels round differently (decision trees, a binary-searched 8-bit code) and are not the reference.
//! * **Row-wise int8** ([`Int8Rows`], LLM.int8()'s weight storage): `q = round(127 · x / absmax_row)`, byte-identical
//!   to bnb's `int8_vectorwise_quant(threshold=0)` (`tests/bnb_int8.rs`); the outlier decomposition and the int8
//!   activation GEMM are not implemented ([`int8`]).
//! * **Storage** ([`Checkpoint`]): bnb's safetensors layout (`<p>.weight`, `.weight.absmax`, `.weight.quant_map`,
//!   `.weight.nested_absmax`, `.weight.nested_quant_map`, `.weight.quant_state.bitsandbytes__nf4` JSON bytes),
//!   read and written byte-identically, atomic writes.
//! * **Quantized linear** ([`QuantLinear`]): a [`peft_core::nn::LinearBase`] that dequantises tiles of output rows
//!   on the fly (never the whole f32 weight) with gradients to the input only, and [`quantize_linear_sites`] to
//!   swap the bases of a model's selected [`peft_core::nn::Linear`] sites (QLoRA's frozen NF4 base).
//! * **Loading without a dense detour** ([`load`]): [`QuantizeOnLoad`] quantizes each linear as the backbone's
//!   constructor reads it (one dense linear alive at a time), [`BnbWeights`] loads linears straight from a bnb
//!   4-bit / int8 checkpoint into [`QuantLinear`] bases, [`bnb_checkpoint`] writes one.
//! * **ComPEFT** ([`compeft`]): top-k sparsified, ternarised PEFT updates with one scale and bit-packed storage.
//! * **QLoRA** ([`qlora`]): NF4-DQ base + LoRA as a tuner ([`QloraConfig`]), merge by dense export or
//!   re-quantization with its rounding error ([`QloraExt`]), byte accounting ([`QuantMemory`]), the `"qlora"`
//!   registry entry ([`methods`]).
//! * **LQ-LoRA** ([`lq_lora`]): `W ≈ Q + L1·L2` by alternating NF-b quantisation and truncated SVD, Fisher
//!   weighting, budgeted mixed-precision allocation (multiple-choice knapsack); saved as an `"LQ_LORA"` adapter
//!   plus its bit-packed base ([`lq_lora::save_pretrained`]), reloaded bit for bit through [`registry`].
//! * **Low-bit adapters** ([`onebit`]): 1-4 bit normal codebooks, straight-through fake quantisation (gradient
//!   through the normalisation statistics as the reference, or the identity), packing.
//! * **Low-bit LoRA** ([`lowbit_lora`]): LoRA trained with 1-4 bit fake-quantized `A`, `B` (`peft_type =
//!   "LORA_LOWBIT"`, registry entry `"lora-1bit"`), saved packed (codes + `μ, σ` per matrix) by [`LowBitModelExt`]
//!   and loaded through [`registry`].
//!
//! References: QLoRA (Dettmers et al. 2023, <https://arxiv.org/abs/2305.14314>); bitsandbytes 0.50.2
//! `bitsandbytes/functional.py` (`quantize_4bit`, `dequantize_4bit`, `create_dynamic_map`, `QuantState`),
//! `backends/default/ops.py` (`quantize_4bit`, `_dequantize_4bit_compute`), `backends/cpu/ops.py` and
//! `csrc/cpu_ops.cpp` (`quantize_cpu_impl`, `build_quantize_lut`, `dequantizeBlockwise4bitCpu`).
//!
//! ```
//! use peft_quant::{Checkpoint, Quant4, Quant4Config, QuantType};
//!
//! let w: Vec<f32> = (0..256 * 64).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
//! let cfg = Quant4Config { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true };
//! let q = Quant4::quantize(&w, &[256, 64], &cfg)?;
//! let w_hat = q.dequantize();
//! // Every element is within half the largest NF4 gap of its block's absmax (here absmax <= 1).
//! let half_gap = 0.5 * peft_quant::codes::max_gap(&peft_quant::codes::NF4);
//! assert!(w.iter().zip(&w_hat).all(|(a, b)| (a - b).abs() <= half_gap * 1.01));
//! // 4.127 bits per parameter with double quantisation.
//! let bits = 8.0 * (q.storage_bytes() - 4) as f64 / w.len() as f64;
//! assert!((bits - 4.127).abs() < 1e-3);
//!
//! // bnb's serialized layout, round-tripped through bytes.
//! let mut ckpt = Checkpoint::new();
//! ckpt.insert_quant4("model.layers.0.mlp.down_proj", &q)?;
//! let back = Checkpoint::from_bytes(&ckpt.to_bytes())?.quant4("model.layers.0.mlp.down_proj")?;
//! assert_eq!(back, q);
//! # Ok::<(), peft_quant::QuantError>(())
//! ```

pub mod block4;
pub mod blockwise8;
pub mod codes;
pub mod compeft;
pub mod error;
pub mod int8;
pub mod linear;
pub mod load;
pub mod lowbit_lora;
pub mod lq_lora;
pub mod nf_storage;
pub mod onebit;
pub mod qlora;
pub mod storage;

pub use block4::{check_blocksize, Absmax, FloatDtype, Quant4, Quant4Config, QuantStorage, QuantType};
pub use blockwise8::Blockwise8;
pub use compeft::{ComPeft, ComPeftConfig, ComPeftMode, Selection, TaskVector};
pub use error::{QuantError, Result};
pub use int8::Int8Rows;
pub use linear::{quantize_linear_sites, QuantFormat, QuantLinear, QuantWeight};
pub use load::{bnb_checkpoint, BnbWeights, QuantizeOnLoad};
pub use lowbit_lora::{LowBitLoraConfig, LowBitModelExt};
pub use lq_lora::{LqLoraConfig, NfQuant};
pub use nf_storage::NfPacked;
pub use qlora::{methods, methods_for, QloraConfig, QloraExt, QuantMemory, RoundingError};
pub use storage::{Checkpoint, RawTensor};

/// The `peft_type`s peft-quant's adapters are saved as: peft-lora's (QLoRA adapters are plain `LORA` files) plus
/// `LORA_LOWBIT` ([`LowBitLoraConfig`]) and `LQ_LORA` ([`LqLoraConfig`], which loads only onto its saved base).
pub fn registry() -> peft_core::adapter::ConfigRegistry {
    peft_lora::registry().with::<LowBitLoraConfig>().with::<LqLoraConfig>()
}
