//! peft-sparse will hold sparse fine-tuning methods (LT-SFT, SpIEL, S²FT, SaRA, SPT, mask tuning, SquareHead,
//! MoSA) as weight deltas on named parameters. Not built yet.
