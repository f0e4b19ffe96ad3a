//! AdapterHub (`adapters` 1.x) folders for bottleneck adapters: read one into a [`PeftModel`] as a
//! [`BottleneckConfig`] adapter, and write a bottleneck adapter back in AdapterHub's layout.
//!
//! The layout (`model.save_adapter(dir, name, use_safetensors=True)`, checked against adapters 1.3.0):
//! `adapter_config.json` holds `{"config": <BnConfig as a dict>, "hidden_size", "model_class", "model_name",
//! "model_type", "name", "version"}` (Python's `json.dumps(indent=2, sort_keys=True)`); `adapter.safetensors`
//! (no metadata) holds `<site>.adapters.<name>.adapter_down.0.{weight,bias}` and
//! `<site>.adapters.<name>.adapter_up.{weight,bias}`, `<site>` the module path in the saved model (a bare
//! `BertModel`: `encoder.layer.3.output`; a model with a head: `bert.encoder.layer.3.output`, the prefix is
//! dropped when the model has no such module).
//!
//! What maps: `mh_adapter`, `output_adapter`, `reduction_factor` (a number), `non_linearity`, `is_parallel`,
//! `scaling` (a number), `original_ln_before`, `init_weights` (`bert` / `mam_adapter`), `dropout` (AdapterHub
//! drops the adapter *output*: imported adapters get `dropout_on_output`). What AdapterHub's presets set and this
//! crate computes the same way: `original_ln_after = true`, `residual_before_ln = true` (the model applies its own
//! LayerNorm to `x + h + f`). Refused with [`AdaptersError::Unsupported`] (rather than loaded as something else):
//! adapter-internal LayerNorms (`ln_before`, `ln_after`), `use_gating`, PHM layers, invertible adapters
//! (`inv_adapter`), cross-attention adapters, `leave_out`, stochastic depth, `original_ln_after = false`,
//! `residual_before_ln = false`, `adapter_residual_before_ln = true`, per-layer reduction factors and learned
//! scaling. Checked in `tests/adapterhub_interop.rs` on all-MiniLM-L6-v2 for SeqBn, DoubleSeqBn (Houlsby), ParBn and
//! a SeqBn with reduction 12, GELU and dropout: AdapterHub's files give AdapterHub's outputs and are written back
//! byte for byte.
//!
//! ```no_run
//! use peft_core::adapter::PeftModel;
//! use peft_adapters::adapterhub;
//! use peft_models::bert::BertModel;
//!
//! let bert = BertModel::load("all-MiniLM-L6-v2")?;
//! let mut model = PeftModel::wrap(bert, 0);
//! let (meta, report) = adapterhub::load(&mut model, "saved/seq_bn".as_ref(), "lang")?;
//! assert!(report.is_clean());
//! model.set_adapter("lang")?;
//! adapterhub::save(&model, "lang", "export/lang".as_ref(), &meta)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use ndarray::ArrayD;
use peft_core::adapter::{AdapterTensors, LoadReport, PeftModel, TunerConfig};
use peft_core::io::safetensors::SafeTensorsFile;
use peft_core::nn::Module;
use serde_json::{json, Map, Value};

use crate::bottleneck::{AdapterInit, BottleneckConfig, BOTTLENECK_TYPE};
use crate::common::Activation;
use crate::error::{AdaptersError, Result};

/// AdapterHub's config file name.
pub const CONFIG_FILE: &str = peft_core::adapter::CONFIG_NAME;
/// AdapterHub's safetensors weights file name.
pub const WEIGHTS_FILE: &str = "adapter.safetensors";
/// The `version` written (the release the layout was checked against).
pub const VERSION: &str = "adapters.1.3.0";

/// The tensor suffixes of one site, AdapterHub's names.
const SUFFIXES: [&str; 4] = ["adapter_down.0.weight", "adapter_down.0.bias", "adapter_up.weight", "adapter_up.bias"];

/// The model description AdapterHub stores beside the config.
#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    /// The adapter's name in the file (`name`).
    pub name: String,
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `model_class` (`"BertModel"`).
    pub model_class: String,
    /// `model_name` (the checkpoint's name or path).
    pub model_name: String,
    /// `model_type` (`"bert"`).
    pub model_type: String,
    /// `version` as read (written as [`VERSION`]).
    pub version: String,
}

/// An IO result in this crate's error type (through peft-core's adapter error, which names the file).
fn io<T>(r: peft_core::io::IoResult<T>) -> Result<T> {
    r.map_err(|e| AdaptersError::Adapter(e.into()))
}

fn unsupported(what: impl Into<String>, reason: impl Into<String>) -> AdaptersError {
    AdaptersError::Unsupported { method: BOTTLENECK_TYPE, what: what.into(), reason: reason.into() }
}

fn bad(field: &'static str, reason: impl Into<String>) -> AdaptersError {
    AdaptersError::config(BOTTLENECK_TYPE, field, reason)
}

/// AdapterHub's `BnConfig` as a [`BottleneckConfig`], refusing what this crate does not compute (module docs).
///
/// # Errors
/// [`AdaptersError::Unsupported`] naming the option; [`AdaptersError::InvalidConfig`] for wrongly typed fields.
pub fn config_from_json(c: &Map<String, Value>) -> Result<BottleneckConfig> {
    let get = |k: &str| c.get(k).unwrap_or(&Value::Null);
    let flag = |k: &'static str, default: bool| -> Result<bool> {
        match get(k) {
            Value::Null => Ok(default),
            Value::Bool(b) => Ok(*b),
            v => Err(bad(k, format!("must be true or false, got {v}"))),
        }
    };
    let num = |k: &'static str, default: f64| -> Result<f64> {
        match get(k) {
            Value::Null => Ok(default),
            Value::Number(n) => n.as_f64().ok_or_else(|| bad(k, format!("{n} is not a number"))),
            v => Err(unsupported(format!("`{k}` = {v}"), "only a single number is implemented")),
        }
    };
    if let Some(a) = c.get("architecture").and_then(Value::as_str) {
        if a != "bottleneck" {
            return Err(unsupported(format!("architecture `{a}`"), "only bottleneck adapters are read here"));
        }
    }
    for (k, want) in [
        ("ln_before", false),
        ("ln_after", false),
        ("use_gating", false),
        ("phm_layer", false),
        ("cross_adapter", false),
        ("adapter_residual_before_ln", false),
        ("original_ln_after", true),
        ("residual_before_ln", true),
    ] {
        if flag(k, want)? != want {
            return Err(unsupported(
                format!("`{k}` = {}", !want),
                "not implemented by this crate's bottleneck adapters",
            ));
        }
    }
    if !get("inv_adapter").is_null() {
        return Err(unsupported("`inv_adapter`", "invertible adapters are not implemented"));
    }
    if get("leave_out").as_array().is_some_and(|l| !l.is_empty()) {
        return Err(unsupported("`leave_out`", "every layer is adapted here"));
    }
    if num("stochastic_depth", 0.0)? != 0.0 {
        return Err(unsupported("`stochastic_depth`", "not implemented"));
    }
    let act: Activation = serde_json::from_value(get("non_linearity").clone())
        .map_err(|e| unsupported(format!("`non_linearity` = {}", get("non_linearity")), e.to_string()))?;
    let init = match get("init_weights").as_str() {
        Some("bert") | None => AdapterInit::Bert,
        Some("mam_adapter") => AdapterInit::MamAdapter,
        Some(o) => return Err(unsupported(format!("`init_weights` = {o:?}"), "only `bert` and `mam_adapter`")),
    };
    let cfg = BottleneckConfig {
        mh_adapter: flag("mh_adapter", false)?,
        output_adapter: flag("output_adapter", true)?,
        reduction_factor: num("reduction_factor", 16.0)?,
        non_linearity: act,
        is_parallel: flag("is_parallel", false)?,
        scaling: num("scaling", 1.0)?,
        original_ln_before: flag("original_ln_before", false)?,
        init_weights: init,
        dropout: num("dropout", 0.0)?,
        dropout_on_output: true,
        ..BottleneckConfig::new(16.0, act)
    };
    cfg.validate()?;
    Ok(cfg)
}

/// A number as Python writes it: an integer when `integral` and whole, else a float.
fn py_number(v: f64, integral: bool) -> Value {
    if integral && v.fract() == 0.0 && v.abs() < 1e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

/// AdapterHub's full `BnConfig` dict for `cfg` (its defaults for every option this crate does not have).
///
/// # Errors
/// [`AdaptersError::Unsupported`] for a config AdapterHub cannot express (dropout on the adapter input).
pub fn config_to_json(cfg: &BottleneckConfig) -> Result<Value> {
    cfg.validate()?;
    if cfg.dropout > 0.0 && !cfg.dropout_on_output {
        return Err(unsupported(
            "dropout on the adapter input",
            "AdapterHub drops the adapter output; set dropout_on_output (or dropout 0) to export",
        ));
    }
    if !cfg.bias {
        return Err(unsupported("bias = false", "AdapterHub's bottleneck adapters always have biases"));
    }
    let act = serde_json::to_value(cfg.non_linearity).map_err(|e| bad("non_linearity", e.to_string()))?;
    let init = match cfg.init_weights {
        AdapterInit::Bert => "bert",
        AdapterInit::MamAdapter => "mam_adapter",
    };
    Ok(json!({
        "adapter_residual_before_ln": false,
        "cross_adapter": false,
        "dropout": cfg.dropout,
        "factorized_phm_W": true,
        "factorized_phm_rule": false,
        "hypercomplex_nonlinearity": "glorot-uniform",
        "init_weights": init,
        "init_weights_seed": null,
        "inv_adapter": null,
        "inv_adapter_reduction_factor": null,
        "is_parallel": cfg.is_parallel,
        "learn_phm": true,
        "leave_out": [],
        "ln_after": false,
        "ln_before": false,
        "mh_adapter": cfg.mh_adapter,
        "non_linearity": act,
        "original_ln_after": true,
        "original_ln_before": cfg.original_ln_before,
        "output_adapter": cfg.output_adapter,
        "phm_bias": true,
        "phm_c_init": "normal",
        "phm_dim": 4,
        "phm_init_range": 0.0001,
        "phm_layer": false,
        "phm_rank": 1,
        "reduction_factor": py_number(cfg.reduction_factor, true),
        "residual_before_ln": true,
        "scaling": py_number(cfg.scaling, false),
        "shared_W_phm": false,
        "shared_phm_rule": true,
        "stochastic_depth": 0.0,
        "use_gating": false,
    }))
}

/// Reads `dir`'s config: the adapter config and the model description.
///
/// # Errors
/// Unreadable or malformed files; unsupported options.
pub fn read_config(dir: &Path) -> Result<(BottleneckConfig, Meta)> {
    // AdapterHub's config file has PEFT's name: the same reader.
    let (path, v) = peft_core::adapter::read_config_json(dir)?;
    let Some(c) = v.get("config").and_then(Value::as_object) else {
        return Err(bad(
            "config",
            format!("{} has no `config` object (not an AdapterHub adapter folder)", path.display()),
        ));
    };
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let meta = Meta {
        name: s("name"),
        hidden_size: v.get("hidden_size").and_then(Value::as_u64).unwrap_or(0) as usize,
        model_class: s("model_class"),
        model_name: s("model_name"),
        model_type: s("model_type"),
        version: s("version"),
    };
    Ok((config_from_json(c)?, meta))
}

/// The key this crate uses (relative to the model root) for AdapterHub key `key` of adapter `name`, or `None` for
/// a key that is not one of that adapter's bottleneck tensors. `has_site` tells whether a module path exists in the
/// model (a leading model prefix such as `bert.` is dropped when the path without it does).
fn our_key(key: &str, name: &str, has_site: &dyn Fn(&str) -> bool) -> Option<String> {
    let marker = format!(".adapters.{name}.");
    let (site, suffix) = key.split_once(&marker)?;
    if !SUFFIXES.contains(&suffix) {
        return None;
    }
    let site = if has_site(site) {
        site.to_string()
    } else {
        match site.split_once('.') {
            Some((_, rest)) if has_site(rest) => rest.to_string(),
            _ => site.to_string(),
        }
    };
    Some(format!("{site}.{suffix}"))
}

/// Loads the AdapterHub folder `dir` into `model` as bottleneck adapter `name` (inactive, as
/// [`PeftModel::add_adapter`] adds it); returns the model description (for [`save`]) and what was applied.
///
/// # Errors
/// Unreadable files; unsupported options; a width that disagrees with the model; missing or mis-shaped tensors
/// (nothing stays attached then).
pub fn load<M: Module>(model: &mut PeftModel<M>, dir: &Path, name: &str) -> Result<(Meta, LoadReport)> {
    let (cfg, meta) = read_config(dir)?;
    let wpath = dir.join(WEIGHTS_FILE);
    let file = io(SafeTensorsFile::open(&wpath))?;
    let sites: Vec<String> =
        peft_core::nn::residual_sites(model.model()).iter().map(|s| s.path().to_string()).collect();
    let has_site = |p: &str| sites.iter().any(|s| s == p);
    let mut map = BTreeMap::new();
    let mut report = LoadReport::default();
    for k in file.names() {
        match our_key(k, &meta.name, &has_site) {
            Some(ours) => {
                map.insert(format!("base_model.model.{ours}"), io(file.get(k))?);
            }
            None => report.unexpected.push(k.to_string()),
        }
    }
    if meta.hidden_size != 0 {
        let d = crate::bottleneck::stream_width(model.model(), BOTTLENECK_TYPE)?;
        if d != meta.hidden_size {
            return Err(bad(
                "hidden_size",
                format!("the file is for width {}, the model is {d} wide", meta.hidden_size),
            ));
        }
    }
    let tensors = AdapterTensors::from_map(map, cfg.key_prefix(), &wpath.display().to_string());
    cfg.preflight(model.model(), &tensors)?;
    model.add_adapter(name, cfg)?;
    if let Err(e) = model.tuner(name).and_then(|t| t.load_state_dict(&tensors)) {
        model.delete_adapter(name)?;
        return Err(e.into());
    }
    let mut r2 = LoadReport::default();
    tensors.report_into(&mut r2);
    report.applied = r2.applied;
    report.unexpected.extend(r2.unexpected);
    Ok((meta, report))
}

/// Writes bottleneck adapter `adapter` of `model` into `dir` in AdapterHub's layout, named `meta.name`, with sites
/// as this model names them; returns the bytes written.
///
/// # Errors
/// [`AdaptersError::Unsupported`] for an adapter that is not a bottleneck adapter or that AdapterHub cannot
/// express; IO errors.
pub fn save<M: Module>(model: &PeftModel<M>, adapter: &str, dir: &Path, meta: &Meta) -> Result<u64> {
    let cfg = model.config(adapter)?;
    let Some(bn) = cfg.as_any().downcast_ref::<BottleneckConfig>() else {
        return Err(unsupported(format!("adapter `{adapter}` ({})", cfg.peft_type()), "only bottleneck adapters"));
    };
    let config = config_to_json(bn)?;
    let state = model.state_dict(adapter)?;
    let prefix = bn.key_prefix();
    let mut tensors: BTreeMap<String, ArrayD<f32>> = BTreeMap::new();
    for (k, v) in state {
        let rel = k.strip_prefix(prefix).unwrap_or(&k);
        let Some(suffix) = SUFFIXES.iter().find(|s| rel.ends_with(&format!(".{s}"))) else {
            return Err(unsupported(
                format!("tensor `{rel}`"),
                "AdapterHub's bottleneck files hold only the adapter (save the task head separately)",
            ));
        };
        let site = &rel[..rel.len() - suffix.len() - 1];
        tensors.insert(format!("{site}.adapters.{}.{suffix}", meta.name), v);
    }
    let top = json!({
        "config": config,
        "hidden_size": meta.hidden_size,
        "model_class": meta.model_class,
        "model_name": meta.model_name,
        "model_type": meta.model_type,
        "name": meta.name,
        "version": VERSION,
    });
    Ok(peft_core::adapter::write_folder(dir, (CONFIG_FILE, &top), (WEIGHTS_FILE, &tensors), None)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_with_and_without_a_model_prefix() {
        let has = |p: &str| p == "encoder.layer.0.output";
        assert_eq!(
            our_key("encoder.layer.0.output.adapters.a.adapter_up.bias", "a", &has).as_deref(),
            Some("encoder.layer.0.output.adapter_up.bias")
        );
        assert_eq!(
            our_key("bert.encoder.layer.0.output.adapters.a.adapter_down.0.weight", "a", &has).as_deref(),
            Some("encoder.layer.0.output.adapter_down.0.weight")
        );
        assert_eq!(our_key("encoder.layer.0.output.adapters.b.adapter_up.bias", "a", &has), None, "another adapter");
        assert_eq!(our_key("encoder.layer.0.output.adapters.a.adapter_norm_before.weight", "a", &has), None);
    }

    #[test]
    fn options_this_crate_does_not_compute_are_refused_by_name() {
        let base = config_to_json(&BottleneckConfig::seq_bn()).unwrap();
        for (k, v) in [
            ("ln_before", json!(true)),
            ("use_gating", json!(true)),
            ("phm_layer", json!(true)),
            ("original_ln_after", json!(false)),
            ("residual_before_ln", json!(false)),
            ("inv_adapter", json!("nice")),
            ("leave_out", json!([0])),
            ("reduction_factor", json!({"default": 16})),
            ("scaling", json!("learned")),
            ("non_linearity", json!("prelu")),
            ("init_weights", json!("houlsby")),
        ] {
            let mut c = base.as_object().unwrap().clone();
            c.insert(k.into(), v);
            let e = config_from_json(&c).unwrap_err();
            assert!(matches!(e, AdaptersError::Unsupported { .. }), "{k}: {e}");
            assert!(e.to_string().contains(k), "{k}: {e}");
        }
        let back = config_from_json(base.as_object().unwrap()).unwrap();
        assert_eq!(back, BottleneckConfig { dropout_on_output: true, ..BottleneckConfig::seq_bn() });
        let e = config_to_json(&BottleneckConfig { dropout: 0.1, ..BottleneckConfig::seq_bn() }).unwrap_err();
        assert!(e.to_string().contains("dropout"), "{e}");
    }
}
