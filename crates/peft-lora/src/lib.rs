//! peft-lora will hold LoRA and its family (rsLoRA, DoRA, PiSSA/CorDA/EVA/LoLDU/LoRA-SB inits, ALLoRA, Hydra,
//! MoS, MixLoRA, Poly/MHR), weighted merges and the Hugging Face PEFT file format. Not built yet: see issue 4.
