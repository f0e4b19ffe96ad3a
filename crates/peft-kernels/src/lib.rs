//! peft-kernels will hold hand-written PTX kernels launched through cudarc (LoRA, BGMV/SGMV multi-adapter, NF4
//! dequant), each with a CPU reference. Not built yet.
