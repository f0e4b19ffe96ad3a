//! LLM-Adapters' series and parallel bottlenecks on the real SmolLM2-135M-Instruct (the GGUF `scripts/
//! fetch_smollm2.sh` writes; skipped with a printed reason when absent, a failure under `CI=true`): the sites and
//! parameter counts of the LLaMA recipes, exact identity with the `mam_adapter` init, the documented small
//! non-identity of the fork's default `bert` init, and a save/load round trip.

use peft_adapters::bottleneck::AdapterInit;
use peft_adapters::llm_adapter::{LlmAdapterConfig, LlmAdapterTuner, Placement};
use peft_core::adapter::PeftModel;
use peft_core::nn::Ctx;
use peft_core::testing::{max_abs_diff, require_smollm2_gguf};
use peft_models::llama::Llama;

/// Any in-vocabulary ids exercise every layer.
const IDS: [usize; 6] = [1, 504, 2_000, 49, 9_000, 30];

fn logits(m: &Llama) -> Vec<f32> {
    peft_core::autograd::no_grad(|| m.forward(&IDS, [1, IDS.len()], None, &Ctx::eval())).unwrap().to_vec()
}

#[test]
fn llama_recipes_on_smollm2() {
    let Some(path) = require_smollm2_gguf() else { return };
    let base = Llama::from_gguf(&path).unwrap();
    let y0 = logits(&base);
    let (layers, d, ff) = (base.spec.layers, base.spec.hidden, base.spec.intermediate);
    assert_eq!((layers, d, ff), (30, 576, 1536));

    // Series on the inputs of gate_proj and up_proj, m = 32: 2·d·m per site, two sites per layer.
    let series = LlmAdapterConfig { init_weights: AdapterInit::MamAdapter, ..LlmAdapterConfig::llama_series(32) };
    let m = PeftModel::new(base, series, "default", 0).unwrap();
    assert_eq!(m.param_counts().0, layers * 2 * (2 * d * 32));
    let t = m.tuner("default").unwrap().as_any().downcast_ref::<LlmAdapterTuner>().unwrap();
    assert_eq!(t.layers().len(), 2 * layers);
    assert!(t.layers().iter().all(|(s, a)| a.placement() == Placement::InputSeries
        && (s.path().ends_with("gate_proj") || s.path().ends_with("up_proj"))));
    assert_eq!(logits(&m), y0, "mam_adapter init is the identity");
    drop(m);

    // Parallel on up_proj (d -> ff) and down_proj (ff -> d), m = 16, the fork's default init.
    let base = Llama::from_gguf(&path).unwrap();
    let m = PeftModel::new(base, LlmAdapterConfig::llama_parallel(16), "default", 3).unwrap();
    assert_eq!(m.param_counts().0, layers * 2 * 16 * (d + ff));
    let y = logits(&m);
    let delta = max_abs_diff(&y, &y0);
    let scale = y0.iter().fold(0f32, |a, v| a.max(v.abs()));
    eprintln!("llm-parallel, bert init: max |Δlogit| = {delta:.3e} (max |logit| {scale:.2})");
    assert!(delta > 0.0 && delta < 0.05 * scale, "bert init: {delta} vs {scale}");

    // Save, load into a fresh base, same logits.
    let dir = tempfile::tempdir().unwrap();
    m.save_pretrained(dir.path()).unwrap();
    let (loaded, report) =
        PeftModel::from_pretrained(Llama::from_gguf(&path).unwrap(), dir.path(), &peft_adapters::registry()).unwrap();
    assert!(report.unexpected.is_empty() && report.ignored_config.is_empty(), "{report:?}");
    assert_eq!(logits(&loaded), y);
}
