//! Source adapters of the composition methods (AdapterFusion, ScaLearn, Average) in `cargo xtask bench`: one SeqBn
//! adapter per source task, trained by the bench itself with the run's recipe and seed (recorded as that task's
//! `seqbn` row, so the single-task adapters appear in the same table) and saved under
//! `<run>/adapters/<task>-seqbn-s<seed>`. A composition run loads them, without their task heads, under the
//! tasks' names, then adds the block over them and trains it with a fresh head.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use peft_adapters::bottleneck::BottleneckConfig;
use peft_adapters::composition::CompositionConfig;
use peft_core::adapter::{AdapterTensors, MethodSpec, PeftConfig, PeftModel, TunerConfig, WEIGHTS_NAME};

use crate::glue::tasks::Task;
use crate::model::SeqClassifier;

/// The registry method the source adapters are trained with (SeqBn, as in the AdapterFusion and ScaLearn papers).
pub const SOURCE_METHOD: &str = "seqbn";

/// Source tasks when `--compose-from` is not given: every task of the asset pack with a training split except
/// WNLI (635 adversarial examples), the target's own adapter included as in AdapterFusion and ScaLearn.
pub const DEFAULT_SOURCES: [Task; 5] = [Task::Sst2, Task::Cola, Task::Stsb, Task::Mrpc, Task::Rte];

/// Whether `spec` is a composition block (it needs source adapters).
pub fn is_composition(spec: &MethodSpec) -> bool {
    spec.config.as_any().downcast_ref::<CompositionConfig>().is_some()
}

/// Where the source adapter of `task` for `seed` lives in run folder `run_dir`.
pub fn adapter_dir(run_dir: &Path, task: Task, seed: u64) -> PathBuf {
    run_dir.join("adapters").join(format!("{}-{SOURCE_METHOD}-s{seed}", task.name()))
}

/// Whether that adapter has been written.
pub fn trained(run_dir: &Path, task: Task, seed: u64) -> bool {
    adapter_dir(run_dir, task, seed).join(WEIGHTS_NAME).is_file()
}

/// Loads the source adapters of `tasks` (seed `seed`) into `pm` under the tasks' names (inactive, frozen once the
/// composition is the active adapter), and returns `config` with those names as its sources.
///
/// # Errors
/// A source adapter not trained yet, unreadable or not a bottleneck adapter; mis-shaped tensors.
pub fn attach(
    pm: &mut PeftModel<Box<dyn SeqClassifier>>,
    config: &CompositionConfig,
    tasks: &[Task],
    run_dir: &Path,
    seed: u64,
) -> Result<CompositionConfig> {
    let mut names = Vec::new();
    for &t in tasks {
        let dir = adapter_dir(run_dir, t, seed);
        if !trained(run_dir, t, seed) {
            bail!("source adapter for {t} (seed {seed}) is missing: {} has no {WEIGHTS_NAME}", dir.display());
        }
        let (path, v) = peft_core::adapter::read_config_json(&dir)?;
        let (mut cfg, _) = BottleneckConfig::from_json(&v).with_context(|| format!("reading {}", path.display()))?;
        // The source task's head is not used: the composition trains a head for the target task.
        cfg.modules_to_save = None;
        cfg.inference_mode = false;
        let tensors = AdapterTensors::open(&dir.join(WEIGHTS_NAME), cfg.key_prefix())?;
        cfg.preflight(pm.model().as_ref(), &tensors)?;
        pm.add_adapter(t.name(), cfg)?;
        pm.tuner(t.name())?.load_state_dict(&tensors)?;
        names.push(t.name().to_string());
    }
    Ok(CompositionConfig { sources: names, ..config.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TokBatch;
    use peft_core::nn::{Ctx, RandomInit, WeightSource};
    use peft_models::bert::{BertForSequenceClassification, BertModel, Pooling};

    fn tiny(outputs: usize) -> Box<dyn SeqClassifier> {
        let cfg = crate::model::tiny_bert_config();
        let bert = BertModel::from_source(&cfg, &RandomInit::new(3, 0.2)).unwrap();
        Box::new(BertForSequenceClassification::new(bert, outputs, Pooling::Mean, 0).unwrap())
    }

    fn batch() -> TokBatch {
        TokBatch {
            input_ids: vec![1, 5, 6, 2, 1, 7, 2, 0],
            token_type_ids: vec![0; 8],
            attention_mask: vec![1, 1, 1, 1, 1, 1, 1, 0],
            shape: [2, 4],
        }
    }

    /// A source adapter saved as the bench saves it (head in modules_to_save, STS-B's 1-output head) loads into a
    /// 2-class target model without its head; the composition over it runs; a missing source is named.
    #[test]
    fn sources_load_without_their_heads_and_a_missing_one_is_named() {
        let run = tempfile::tempdir().unwrap();
        let src_model = tiny(1);
        let head = crate::squarehead::head_modules(src_model.as_ref());
        let mut cfg = BottleneckConfig::seq_bn();
        cfg.modules_to_save = Some(head.clone());
        let src = PeftModel::new(src_model, cfg, "default", 0).unwrap();
        for p in src.adapter_params("default").unwrap() {
            p.set(RandomInit::new(9, 0.3).get(p.name(), &p.shape()).unwrap()).unwrap();
        }
        src.save_pretrained(&adapter_dir(run.path(), Task::Stsb, 0)).unwrap();
        assert!(trained(run.path(), Task::Stsb, 0) && !trained(run.path(), Task::Stsb, 1));

        let mut pm = PeftModel::wrap(tiny(2), 0);
        let block = CompositionConfig::scalearn_uniform(&[]);
        let e = attach(&mut pm, &block, &[Task::Stsb, Task::Rte], run.path(), 0).unwrap_err();
        assert!(e.to_string().contains("source adapter for RTE (seed 0) is missing"), "{e}");
        let mut pm = PeftModel::wrap(tiny(2), 0);
        let mut block = attach(&mut pm, &block, &[Task::Stsb], run.path(), 0).unwrap();
        assert_eq!(block.sources, ["stsb"]);
        let loaded = pm.state_dict("stsb").unwrap();
        let saved = src.state_dict("default").unwrap();
        for (k, v) in &loaded {
            assert_eq!(Some(v), saved.get(k), "{k}");
        }
        assert!(saved.keys().any(|k| k.contains("classifier")) && !loaded.keys().any(|k| k.contains("classifier")));
        block.modules_to_save = Some(head);
        pm.add_adapter("default", block).unwrap();
        pm.set_adapter("default").unwrap();
        let y = pm.logits(&batch(), &Ctx::eval()).unwrap();
        assert_eq!(y.shape(), &[2, 2]);
    }
}
