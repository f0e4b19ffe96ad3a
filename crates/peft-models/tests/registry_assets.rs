//! `models::registry::load` picks the right architecture for every real backbone in the asset pack.

use peft_core::nn::{linear_sites, named_params};
use peft_core::testing::require_asset;
use peft_models::registry::load;

#[test]
fn registry_loads_each_backbone_with_named_sites() {
    for (rel, arch, site) in [
        ("models/all-MiniLM-L6-v2", "bert", "encoder.layer.0.attention.self.query"),
        ("models/dinov2-small", "dinov2", "encoder.layer.0.attention.attention.query"),
        ("models/whisper-tiny.en-encoder", "whisper", "layers.0.self_attn.q_proj"),
    ] {
        let Some(dir) = require_asset(rel) else { return };
        let m = load(&dir).unwrap_or_else(|e| panic!("{rel}: {e}"));
        assert_eq!(m.arch(), arch);
        let sites: Vec<String> = linear_sites(m.module()).iter().map(|s| s.path().to_string()).collect();
        assert!(sites.iter().any(|s| s == site), "{rel}: no site {site} in {:?}", &sites[..sites.len().min(4)]);
        assert!(named_params(m.module()).iter().all(|p| !p.trainable()), "{rel}: base params must start frozen");
    }
}
