//! peft-audio will hold log-mel features, Whisper-encoder/AST backbones with adapters and the audio
//! classification harness. Not built yet.
