//! The Hugging Face PEFT adapter files: `adapter_config.json` (written as Python's `json.dumps(indent=2,
//! sort_keys=True)`) and `adapter_model.safetensors` (keys `base_model.model.<site>.lora_A.weight`, ...,
//! adapter name stripped, metadata `{"format": "pt"}`). The adapter `"default"` goes to `dir`, others to
//! `dir/<name>/`, as `PeftModel.save_pretrained` does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::ArrayD;
use peft_core::io::safetensors::{write_safetensors, SafeTensorsFile};
use peft_core::{Error, Result};

use crate::config::{num, InitLoraWeights, LoraConfig};
use crate::layer::convert_mutated_to_lora;
use crate::model::{base_param_saved, AdapterSet, LoraModel};

/// The config file name.
pub const CONFIG_NAME: &str = "adapter_config.json";
/// The weights file name.
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

fn io_err(e: impl std::fmt::Display) -> Error {
    Error::Invalid { op: "lora io", msg: e.to_string() }
}

/// Where adapter `name` lives under `dir`.
pub fn adapter_dir(dir: &Path, name: &str) -> PathBuf {
    if name == "default" {
        dir.to_path_buf()
    } else {
        dir.join(name)
    }
}

/// The file key of base parameter `pname`: PEFT wraps every adapted site, so its own parameters are saved as
/// `<site>.base_layer.<weight|bias>`.
fn base_key(model: &LoraModel, pname: &str) -> String {
    for a in model.adapters() {
        for (site, _) in &a.layers {
            if let Some(rest) = pname.strip_prefix(site.path()).and_then(|r| r.strip_prefix('.')) {
                if !rest.contains('.') {
                    return format!("{PREFIX}{}.base_layer.{rest}", site.path());
                }
            }
        }
    }
    format!("{PREFIX}{pname}")
}

/// The tensors PEFT's `get_peft_model_state_dict` returns for adapter `a`, by file key.
fn state_dict(model: &LoraModel, a: &AdapterSet) -> BTreeMap<String, ArrayD<f32>> {
    let mut out = BTreeMap::new();
    for (site, l) in &a.layers {
        let p = format!("{PREFIX}{}", site.path());
        out.insert(format!("{p}.lora_A.weight"), l.lora_a().value().to_owned());
        out.insert(format!("{p}.lora_B.weight"), l.lora_b().value().to_owned());
        if let Some(m) = l.magnitude() {
            out.insert(format!("{p}.lora_magnitude_vector"), m.value().to_owned());
        }
        if let Some(b) = l.lora_b_bias() {
            out.insert(format!("{p}.lora_B.bias"), b.value().to_owned());
        }
    }
    for bp in model.base_params() {
        if base_param_saved(a, bp.name()) {
            out.insert(base_key(model, bp.name()), bp.value().to_owned());
        }
    }
    out
}

fn write_files(dir: &Path, cfg: &LoraConfig, tensors: &BTreeMap<String, ArrayD<f32>>) -> Result<u64> {
    std::fs::create_dir_all(dir).map_err(|e| io_err(format!("{}: {e}", dir.display())))?;
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let wpath = dir.join(WEIGHTS_NAME);
    write_safetensors(&wpath, tensors.iter(), Some(&meta)).map_err(io_err)?;
    let text = cfg.to_json();
    let cpath = dir.join(CONFIG_NAME);
    peft_core::io::atomic::atomic_write(&cpath, |w| w.write_all(text.as_bytes())).map_err(io_err)?;
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    Ok(len(&wpath) + len(&cpath))
}

impl LoraModel {
    /// Saves every adapter (`"default"` into `dir`, others into `dir/<name>/`); returns the bytes written.
    /// Like PEFT, the saved config has `inference_mode = true`. Adapters from a base-mutating init (PiSSA, OLoRA)
    /// are saved as trained; use [`LoraModel::save_mutated_as_lora`] to ship them for the original base.
    ///
    /// # Errors
    /// IO errors as [`Error::Invalid`].
    pub fn save_pretrained(&self, dir: &Path) -> Result<u64> {
        let mut bytes = 0;
        for a in self.adapters() {
            let cfg = LoraConfig { inference_mode: true, ..a.config.clone() };
            bytes += write_files(&adapter_dir(dir, &a.name), &cfg, &state_dict(self, a))?;
        }
        Ok(bytes)
    }

    /// Saves adapter `name`, trained from a PiSSA/OLoRA init, as a plain LoRA adapter for the *original* base
    /// weights (PEFT's `path_initial_model_for_weight_conversion`): `A' = [A; A₀]`, `B' = [B, −B₀]`, rank and
    /// `rank_pattern` doubled, alpha (and `alpha_pattern`) doubled (× √2 under rsLoRA), `init_lora_weights = true`.
    ///
    /// # Errors
    /// [`Error::Invalid`] when the adapter was not made by a base-mutating init; IO errors.
    pub fn save_mutated_as_lora(&self, dir: &Path, name: &str) -> Result<u64> {
        let a = self.adapter(name)?;
        let mut tensors = state_dict(self, a);
        for (site, l) in &a.layers {
            let Some((a0, b0)) = l.initial() else {
                crate::bail!("save_mutated_as_lora", "adapter `{name}` at `{}` has no mutated init", site.path());
            };
            let (a2, b2) =
                convert_mutated_to_lora(&l.lora_a().value().to_owned(), &l.lora_b().value().to_owned(), a0, b0)?;
            let p = format!("{PREFIX}{}", site.path());
            tensors.insert(format!("{p}.lora_A.weight"), a2);
            tensors.insert(format!("{p}.lora_B.weight"), b2);
        }
        let mut cfg =
            LoraConfig { inference_mode: true, init_lora_weights: InitLoraWeights::Bool(true), ..a.config.clone() };
        let f = if cfg.use_rslora { 2f64.sqrt() } else { 2.0 };
        cfg.r *= 2;
        cfg.lora_alpha = num(cfg.alpha() * f);
        for v in cfg.rank_pattern.values_mut() {
            *v = (v.as_u64().unwrap_or(0) * 2).into();
        }
        for v in cfg.alpha_pattern.values_mut() {
            *v = serde_json::Value::Number(num(v.as_f64().unwrap_or(f64::NAN) * f));
        }
        write_files(&adapter_dir(dir, name), &cfg, &tensors)
    }

    /// Loads the adapter saved in `dir` (the directory holding `adapter_config.json`) under `name`, inactive
    /// (call [`LoraModel::set_adapter`]). The init is not re-run on the base (a PiSSA/OLoRA adapter expects the
    /// residual base it was saved with). Returns warnings: ignored config keys and unexpected tensors.
    ///
    /// # Errors
    /// Missing files, an invalid config, missing or mis-shaped tensors.
    pub fn load_adapter(&mut self, dir: &Path, name: &str) -> Result<Vec<String>> {
        let text =
            std::fs::read_to_string(dir.join(CONFIG_NAME)).map_err(|e| io_err(format!("{}: {e}", dir.display())))?;
        let (cfg, mut warnings) = LoraConfig::from_json(&text)?;
        let file = SafeTensorsFile::open(dir.join(WEIGHTS_NAME)).map_err(io_err)?;
        let mut build = LoraConfig { init_lora_weights: InitLoraWeights::Bool(true), ..cfg.clone() };
        build.inference_mode = cfg.inference_mode;
        self.add_adapter(name, build)?;
        // Keep the config as read (init name included) for saving back.
        let set = self.adapters_mut().iter_mut().find(|a| a.name == name).expect("peft-rs bug: adapter just added");
        set.config = cfg;
        let mut used = Vec::new();
        let result = (|| {
            let set = self.adapter(name)?;
            for (site, l) in &set.layers {
                let p = format!("{PREFIX}{}", site.path());
                let mut put = |key: String, param: &peft_core::Param| -> Result<()> {
                    let v = file.get_checked(&key, &param.shape()).map_err(io_err)?;
                    param.set(v)?;
                    used.push(key);
                    Ok(())
                };
                put(format!("{p}.lora_A.weight"), l.lora_a())?;
                put(format!("{p}.lora_B.weight"), l.lora_b())?;
                if let Some(m) = l.magnitude() {
                    put(format!("{p}.lora_magnitude_vector"), m)?;
                }
                if let Some(b) = l.lora_b_bias() {
                    put(format!("{p}.lora_B.bias"), b)?;
                }
            }
            for bp in self.base_params() {
                let key = base_key(self, bp.name());
                if base_param_saved(set, bp.name()) && file.contains(&key) {
                    bp.set(file.get_checked(&key, &bp.shape()).map_err(io_err)?)?;
                    used.push(key);
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.delete_adapter(name)?;
            return Err(e);
        }
        for k in file.names() {
            if !used.iter().any(|u| u == k) {
                warnings.push(format!("{WEIGHTS_NAME}: unexpected tensor `{k}` ignored"));
            }
        }
        Ok(warnings)
    }
}

#[cfg(test)]
#[path = "io_tests.rs"]
mod tests;
