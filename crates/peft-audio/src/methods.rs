//! The PETL-AST method set on the Whisper encoder, one [`MethodSpec`] each, for trainers and
//! `cargo xtask bench --suite audio` ([`methods`]), and the parameter-budget sweep ([`budget_sweep`]).
//!
//! | name | method | sites |
//! |---|---|---|
//! | `linear` | linear probe (head + final LayerNorm, see [`crate::encoder::AudioClassifier::HEAD_MODULES`]) | — |
//! | `full` | full fine-tuning | every parameter |
//! | `bitfit` | BitFit (every bias) | parameter |
//! | `lora` | LoRA r 8, α 16 on `q_proj`, `v_proj` | linear |
//! | `pfeiffer` / `houlsby` | sequential bottleneck `h + f(h)` on the FFN / attention+FFN sites | residual |
//! | `pfeiffer-par` / `houlsby-par` | parallel bottleneck `h + f(x)` on the same sites | residual |
//! | `prompt` | 25 prompt tokens entering the first layer (VPT-shallow) | prefix |
//! | `prefix` | 24 prefix key/value rows per layer through PEFT's reparameterisation MLP | prefix |
//! | `conformer` | the Conformer convolution adapter, parallel on the FFN site, RR 96 ([`crate::conformer`]) | residual |
//!
//! Bottlenecks are PETL-AST's (`Linear d→d/RR → GELU → Linear`, up projection zero-initialised, no scaling) at
//! RR 16 (24 channels on Whisper-tiny's d = 384; PETL-AST's RR 96 would leave 4). Learning rates: PETL-AST's
//! (adapters, LoRA, BitFit, Conformer 5e-3; linear 1e-3 there, raised to 1e-2 here as peft-core's head-only
//! entry because the bench trains ~100x fewer steps; full fine-tuning 1e-4, peft-core's entry, PETL-AST 5e-5),
//! prompt 1e-2 (PETL-AST), prefix 1e-3 (peft-adapters measured the MLP prefix at chance with 1e-2 on MiniLM).
//! Not tuned on Whisper.

use peft_adapters::bottleneck::BottleneckConfig;
use peft_adapters::common::Activation;
use peft_adapters::prefix::PrefixTuningConfig;
use peft_adapters::prompt::PromptTuningConfig;
use peft_core::adapter::{BaseTuneConfig, DeltaConfig, MethodName, MethodSpec};
use peft_lora::LoraConfig;

use crate::conformer::ConformerConfig;

/// `"linear"`: linear probe.
pub const LINEAR: MethodName = MethodName("linear");
/// `"full"`: full fine-tuning.
pub const FULL: MethodName = MethodName("full");
/// `"bitfit"`.
pub const BITFIT: MethodName = MethodName("bitfit");
/// `"lora"`.
pub const LORA: MethodName = MethodName("lora");
/// `"pfeiffer"`: sequential bottleneck on the FFN sites.
pub const PFEIFFER: MethodName = MethodName("pfeiffer");
/// `"houlsby"`: sequential bottleneck on the attention and FFN sites.
pub const HOULSBY: MethodName = MethodName("houlsby");
/// `"pfeiffer-par"`: parallel bottleneck on the FFN sites.
pub const PFEIFFER_PAR: MethodName = MethodName("pfeiffer-par");
/// `"houlsby-par"`: parallel bottleneck on the attention and FFN sites.
pub const HOULSBY_PAR: MethodName = MethodName("houlsby-par");
/// `"prompt"`.
pub const PROMPT: MethodName = MethodName("prompt");
/// `"prefix"`.
pub const PREFIX: MethodName = MethodName("prefix");
/// `"conformer"`.
pub const CONFORMER: MethodName = MethodName("conformer");

/// A PETL-AST bottleneck: GELU, reduction `rr`, series or parallel, FFN or attention+FFN.
pub fn bottleneck(rr: f64, parallel: bool, houlsby: bool) -> BottleneckConfig {
    BottleneckConfig { mh_adapter: houlsby, is_parallel: parallel, ..BottleneckConfig::new(rr, Activation::Gelu) }
}

/// The method set, in table order.
pub fn methods() -> Vec<MethodSpec> {
    vec![
        MethodSpec::new(LINEAR, BaseTuneConfig::head_only(), 1e-2),
        MethodSpec::new(FULL, BaseTuneConfig::full(), 1e-4),
        MethodSpec::new(BITFIT, DeltaConfig::bitfit(), 5e-3),
        MethodSpec::new(LORA, LoraConfig::new(8, 16.0, ["q_proj", "v_proj"]), 5e-3),
        MethodSpec::new(PFEIFFER, bottleneck(16.0, false, false), 5e-3),
        MethodSpec::new(HOULSBY, bottleneck(16.0, false, true), 5e-3),
        MethodSpec::new(PFEIFFER_PAR, bottleneck(16.0, true, false), 5e-3),
        MethodSpec::new(HOULSBY_PAR, bottleneck(16.0, true, true), 5e-3),
        MethodSpec::new(PROMPT, PromptTuningConfig::new(25), 1e-2),
        MethodSpec::new(PREFIX, PrefixTuningConfig::prefix(24), 1e-3),
        MethodSpec::new(CONFORMER, ConformerConfig::new(96.0), 5e-3),
    ]
}

/// The parameter-budget sweep: the Conformer adapter and the parallel Pfeiffer bottleneck at reduction 96, 24
/// and 6, and LoRA at rank 2, 8 and 32 (same learning rates as [`methods`]).
pub fn budget_sweep() -> Vec<MethodSpec> {
    const C: [(MethodName, f64); 3] = [
        (MethodName("conformer-rr96"), 96.0),
        (MethodName("conformer-rr24"), 24.0),
        (MethodName("conformer-rr6"), 6.0),
    ];
    const P: [(MethodName, f64); 3] = [
        (MethodName("pfeiffer-par-rr96"), 96.0),
        (MethodName("pfeiffer-par-rr24"), 24.0),
        (MethodName("pfeiffer-par-rr6"), 6.0),
    ];
    const L: [(MethodName, usize); 3] =
        [(MethodName("lora-r2"), 2), (MethodName("lora-r8"), 8), (MethodName("lora-r32"), 32)];
    let mut v = Vec::new();
    for (n, rr) in C {
        v.push(MethodSpec::new(n, ConformerConfig::new(rr), 5e-3));
    }
    for (n, rr) in P {
        v.push(MethodSpec::new(n, bottleneck(rr, true, false), 5e-3));
    }
    for (n, r) in L {
        v.push(MethodSpec::new(n, LoraConfig::new(r, 2.0 * r as f64, ["q_proj", "v_proj"]), 5e-3));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoder::tests::{feats, tiny_encoder};
    use crate::encoder::AudioClassifier;
    use peft_core::adapter::{duplicate_name, PeftModel};
    use peft_core::nn::Ctx;

    #[test]
    fn names_are_unique_and_every_method_attaches_to_the_whisper_encoder() {
        let all: Vec<MethodSpec> = methods().into_iter().chain(budget_sweep()).collect();
        assert_eq!(duplicate_name(&all), None);
        let x = feats(2, 12);
        for spec in all {
            let model = AudioClassifier::new(tiny_encoder(1), 3, 12, 0).expect("model");
            let base = model.logits(&x, &Ctx::eval()).expect("forward").to_vec();
            let mut cfg = spec.config();
            cfg.set_modules_to_save(AudioClassifier::HEAD_MODULES.iter().map(|s| s.to_string()).collect())
                .expect("mts");
            let mut pm = PeftModel::wrap(model, 0);
            pm.add_adapter_boxed("default", cfg).unwrap_or_else(|e| panic!("{}: {e}", spec.name));
            pm.set_adapter("default").expect("activate");
            let (trainable, _) = pm.param_counts();
            assert!(trainable > 0, "{}", spec.name);
            let y = pm.logits(&x, &Ctx::eval()).expect("forward").to_vec();
            // identity at init for every method but the prompt/prefix ones (new tokens change attention)
            let identity = !matches!(spec.name.0, "prompt" | "prefix");
            if identity {
                assert_eq!(y, base, "{} is not the base model at init", spec.name);
            } else {
                assert_ne!(y, base, "{}", spec.name);
                pm.disable_adapters().expect("disable");
                assert_eq!(pm.logits(&x, &Ctx::eval()).expect("forward").to_vec(), base, "{} disabled", spec.name);
            }
        }
    }
}
