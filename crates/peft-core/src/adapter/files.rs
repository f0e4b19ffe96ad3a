//! PEFT's adapter folder: `adapter_config.json` (written as Python's `json.dumps(indent=2, sort_keys=True)`) and
//! `adapter_model.safetensors` (metadata `{"format": "pt"}`), the adapter `"default"` in the folder itself and
//! any other adapter in `<folder>/<name>/`, as `PeftModel.save_pretrained` lays them out. Both files are written
//! atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ndarray::ArrayD;

use crate::adapter::error::{AdapterError, AdapterResult};
use crate::adapter::pyjson;
use crate::io::safetensors::write_safetensors;

/// The config file name.
pub const CONFIG_NAME: &str = "adapter_config.json";
/// The weights file name.
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";

/// Where adapter `name` lives under `dir`.
pub fn adapter_dir(dir: &Path, name: &str) -> PathBuf {
    if name == "default" {
        dir.to_path_buf()
    } else {
        dir.join(name)
    }
}

/// Writes `config` and `tensors` (full file keys) into `dir`; returns the bytes written.
///
/// # Errors
/// IO errors, naming the file.
pub fn write_adapter_files(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &BTreeMap<String, ArrayD<f32>>,
) -> AdapterResult<u64> {
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_folder(dir, (CONFIG_NAME, config), (WEIGHTS_NAME, tensors), Some(&meta))
}

/// Writes a config/weights folder in another library's layout: `config` as Python's
/// `json.dumps(indent=2, sort_keys=True)` into `dir/<config file>` and `tensors` (with `metadata`, if any) into
/// `dir/<weights file>`, both atomically; returns the bytes written.
///
/// # Errors
/// IO errors, naming the file.
pub fn write_folder(
    dir: &Path,
    (config_name, config): (&str, &serde_json::Value),
    (weights_name, tensors): (&str, &BTreeMap<String, ArrayD<f32>>),
    metadata: Option<&BTreeMap<String, String>>,
) -> AdapterResult<u64> {
    std::fs::create_dir_all(dir).map_err(|e| crate::io::IoError::io(dir, e))?;
    let wpath = dir.join(weights_name);
    write_safetensors(&wpath, tensors.iter(), metadata)?;
    let text = pyjson::dumps(config);
    let cpath = dir.join(config_name);
    crate::io::atomic::atomic_write(&cpath, |w| w.write_all(text.as_bytes()))?;
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    Ok(len(&wpath) + len(&cpath))
}

/// Reads `dir/adapter_config.json` as a JSON object.
///
/// # Errors
/// [`crate::io::IoError`] for an unreadable file; [`AdapterError::Json`] for invalid JSON or a non-object.
pub fn read_config_json(dir: &Path) -> AdapterResult<(PathBuf, serde_json::Value)> {
    let path = dir.join(CONFIG_NAME);
    let text = std::fs::read_to_string(&path).map_err(|e| crate::io::IoError::io(&path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| AdapterError::Json { path: path.clone(), reason: e.to_string() })?;
    if !v.is_object() {
        return Err(AdapterError::Json { path, reason: "not a JSON object".into() });
    }
    Ok((path, v))
}
