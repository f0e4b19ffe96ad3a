//! The registry's new entries, as the bench builds them, on a small model with BERT's module names.

use peft_core::adapter::PeftModel;
use peft_core::nn::{Ctx, Linear, Module, RandomInit, Visitor};
use peft_core::testing::max_abs_diff;
use peft_core::train::{Loss, Trainer, TrainerConfig};
use peft_core::{Result, Tensor};

use crate::testutil::input;

const D: usize = 24;
const FF: usize = 48;

/// Two layers named as BERT's (`attention.self.{query,key,value}`, `attention.output.dense`,
/// `intermediate.dense`, `output.dense`) and a `classifier`; weights N(0, 0.05)-sized so some are below SaRA's
/// threshold.
struct BertNamed {
    layers: Vec<[Linear; 6]>,
    classifier: Linear,
}

impl BertNamed {
    fn new() -> Self {
        let init = RandomInit::new(2, 0.05);
        let l = |p: String, i: usize, o: usize| Linear::load(&p, i, o, true, &init).unwrap();
        let layers = (0..2)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                [
                    l(format!("{p}.attention.self.query"), D, D),
                    l(format!("{p}.attention.self.key"), D, D),
                    l(format!("{p}.attention.self.value"), D, D),
                    l(format!("{p}.attention.output.dense"), D, D),
                    l(format!("{p}.intermediate.dense"), D, FF),
                    l(format!("{p}.output.dense"), FF, D),
                ]
            })
            .collect();
        BertNamed { layers, classifier: Linear::load("classifier", D, 3, true, &init).unwrap().as_output() }
    }

    fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let mut h = x.clone();
        for [q, k, v, o, i, out] in &self.layers {
            let a = q.forward(&h, ctx)?.tanh().mul(&k.forward(&h, ctx)?)?.add(&v.forward(&h, ctx)?)?;
            h = h.add(&o.forward(&a, ctx)?)?;
            h = h.add(&out.forward(&i.forward(&h, ctx)?.gelu(), ctx)?)?;
        }
        self.classifier.forward(&h, ctx)
    }
}

impl Module for BertNamed {
    fn visit(&self, v: &mut dyn Visitor) {
        for l in &self.layers {
            for s in l {
                s.visit(v);
            }
        }
        self.classifier.visit(v);
    }
}

#[test]
fn new_registry_methods_train_save_and_reload_on_bert_names() {
    let x = input(6, D, 3);
    let y0 = BertNamed::new().forward(&x, &Ctx::eval()).unwrap();
    for spec in crate::methods().into_iter().filter(|s| ["mosa", "r-amt", "sara", "s2ft"].contains(&s.name.0)) {
        let mut config = spec.config();
        config.set_modules_to_save(vec!["classifier".into()]).unwrap();
        let mut pm = PeftModel::wrap(BertNamed::new(), 0);
        pm.add_adapter_boxed("default", config).unwrap();
        pm.set_adapter("default").unwrap();
        let y = pm.forward(&x, &Ctx::eval()).unwrap();
        assert!(max_abs_diff(y.as_slice(), y0.as_slice()) <= 1e-6, "{}: not the base model at init", spec.name.0);
        let trainable: usize = pm.trainable_params().iter().map(|p| p.numel()).sum();
        assert!(trainable > 3 * D + 3, "{}: {trainable} trainable", spec.name.0);
        let cfg = TrainerConfig { lr: spec.lr, total_steps: 3, ..TrainerConfig::default() };
        let mut t = Trainer::new(pm.trainable_params(), &pm, cfg).unwrap();
        let mut losses = Vec::new();
        for _ in 0..3 {
            let r = t.step(|ctx| Ok(Loss::Single(pm.forward(&x, ctx)?.square().mean_all()))).unwrap();
            losses.push(r.loss);
        }
        drop(t);
        assert!(losses.iter().all(|l| l.is_finite()), "{}: {losses:?}", spec.name.0);
        let y = pm.forward(&x, &Ctx::eval()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        pm.save_pretrained(dir.path()).unwrap();
        let (back, report) = PeftModel::from_pretrained(BertNamed::new(), dir.path(), &crate::registry()).unwrap();
        assert!(report.unexpected.is_empty(), "{}: {report:?}", spec.name.0);
        assert_eq!(back.forward(&x, &Ctx::eval()).unwrap().to_vec(), y.to_vec(), "{}", spec.name.0);
    }
}

/// The bench's target regexes (full match, as `ModulePattern::Regex` applies them) pick the same roles under
/// BERT's and DINOv2's parameter names, and nothing else (embeddings, LayerNorms, layer scales, the head).
#[test]
fn target_patterns_cover_bert_and_dinov2_names() {
    let full = |p: &str| regex::Regex::new(&format!(r"\A(?:{p})\z")).unwrap();
    let bert = [
        "bert.encoder.layer.3.attention.self.query",
        "bert.encoder.layer.3.attention.self.key",
        "bert.encoder.layer.3.attention.self.value",
        "bert.encoder.layer.3.attention.output.dense",
        "bert.encoder.layer.3.intermediate.dense",
        "bert.encoder.layer.3.output.dense",
    ];
    let dino = [
        "dinov2.encoder.layer.3.attention.attention.query",
        "dinov2.encoder.layer.3.attention.attention.key",
        "dinov2.encoder.layer.3.attention.attention.value",
        "dinov2.encoder.layer.3.attention.output.dense",
        "dinov2.encoder.layer.3.mlp.fc1",
        "dinov2.encoder.layer.3.mlp.fc2",
    ];
    let never = [
        "bert.embeddings.word_embeddings.weight",
        "bert.encoder.layer.3.attention.output.LayerNorm.weight",
        "bert.encoder.layer.3.output.LayerNorm.weight",
        "dinov2.encoder.layer.3.norm1.weight",
        "dinov2.encoder.layer.3.layer_scale1.lambda1",
        "dinov2.embeddings.patch_embeddings.projection.weight",
        "classifier.weight",
        "bert.pooler.dense.weight",
    ];
    // (pattern, roles it selects among q, k, v, o, up, down; on `.weight` names when `weights`)
    let cases: [(&str, [bool; 6], bool); 7] = [
        (crate::ENCODER_WEIGHTS, [true; 6], true),
        (crate::FFN_OUTPUTS, [false, false, false, false, false, true], false),
        (crate::ATTENTION_WEIGHTS, [true, true, true, true, false, false], true),
        (crate::s2ft::BERT_GROUPS[0], [false, false, true, false, false, false], false),
        (crate::s2ft::BERT_GROUPS[1], [false, false, false, true, false, false], false),
        (crate::s2ft::BERT_GROUPS[2], [false, false, false, false, true, false], false),
        (crate::s2ft::BERT_GROUPS[3], [false, false, false, false, false, true], false),
    ];
    for (pat, roles, weights) in cases {
        let re = full(pat);
        for names in [&bert, &dino] {
            for (name, &want) in names.iter().zip(&roles) {
                let name = if weights { format!("{name}.weight") } else { name.to_string() };
                assert_eq!(re.is_match(&name), want, "{pat} on {name}");
            }
        }
        for n in never {
            assert!(!re.is_match(n) && !re.is_match(n.trim_end_matches(".weight")), "{pat} matched {n}");
        }
    }
    let all = full(crate::ENCODER_LAYER_PARAMS);
    assert!(all.is_match("dinov2.encoder.layer.0.layer_scale1.lambda1") && !all.is_match("classifier.weight"));
}
